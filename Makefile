# containerd-shim-kata-v2 (Python). Every target does its own set-up.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
# Guest artifacts (kernel, initrd, modules): see build/README.md.
GUEST_DIR ?= $(CURDIR)/build/out
# The host runtime frozen with PyInstaller (build/freeze-runtime.sh).
RUNTIME_DIR ?= $(CURDIR)/build/out/runtime
# End-to-end tests run on E2E_JOBS pytest-xdist workers, a file per worker at a time (each test
# has its own private containerd; leak checks are scoped to it). 2 halves `make test` on 2 cores.
E2E_JOBS ?= 2
E2E_PYTEST = $(PY) -m pytest -q -n $(E2E_JOBS) --dist loadfile --durations=15
CORE_PACKAGES := cli common hostos shim sandbox hypervisors agent_client network ttrpc agent

.PHONY: all deps venv protos guest lint unit e2e test test-frozen try-deb test-microvm test-vsock test-stratovirt soak bench \
	demo install uninstall clean runtime deb

all: venv

# Host packages from Debian (QEMU, containerd, crun, ...); idempotent.
deps:
	build/host-deps.sh

venv: $(VENV)/.installed $(VENV)/bin/kata-vm-holder
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# A cached VM's holder (hostos/holder.c), found beside the interpreter (hostos/holder.py).
HOLDER_CFLAGS := -O2 -s -Wall -Wextra -Werror -D_FORTIFY_SOURCE=2 -fstack-protector-strong \
	-Wl,-z,relro,-z,now
$(VENV)/bin/kata-vm-holder: hostos/holder.c $(VENV)/.installed
	@command -v $(CC) >/dev/null || { echo "$(CC) not found: run make deps" >&2; exit 1; }
	$(CC) $(HOLDER_CFLAGS) -o $@.tmp $< && mv $@.tmp $@

# Regenerate protocols/*_pb2.py from protocols/*.proto (tests fail when stale).
protos: venv
	$(PY) -m protocols.generate

# Guest kernel + initrd with the frozen agent; rebuilt only when an input changed.
guest: deps venv
	$(MAKE) --no-print-directory -f build/guest.mk GUEST_DIR=$(GUEST_DIR) PY=$(PY) VENV=$(VENV)

# Shim + kata-runtime frozen (one onedir bundle); rebuilt only when an input changed.
runtime: venv
	$(MAKE) --no-print-directory -f build/runtime.mk RUNTIME_DIR=$(RUNTIME_DIR) VENV=$(VENV)

# The Debian package (build/out/kata-py_<version>_amd64.deb, checked by lintian); cached.
deb: deps venv guest runtime
	$(MAKE) --no-print-directory -f build/runtime.mk RUNTIME_DIR=$(RUNTIME_DIR) VENV=$(VENV) \
		GUEST_DIR=$(GUEST_DIR) deb

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy $(CORE_PACKAGES)

unit: venv
	$(PY) -m pytest -q tests/unit

# tests/e2e/test_install.py and test_package.py use the frozen runtime and the .deb (cached).
e2e: deps venv guest runtime deb
	$(E2E_PYTEST) tests/e2e

test: deps venv guest runtime deb lint
	$(PY) -m pytest -q tests/unit
	$(E2E_PYTEST) tests/e2e

# The .deb as a new user installs it on a fresh Debian 12 root (debootstrap, from the
# mirror): apt-get install, a container in a VM, apt-get purge (build/try-deb-fresh.sh).
try-deb: deb
	build/try-deb-fresh.sh "$$(cat $(RUNTIME_DIR)/deb.stamp)" \
		"$$($(PY) -c 'from tests.harness.images import busybox_image_tar as t; print(t())')"

# The whole e2e suite against the frozen runtime (the bundle the .deb ships), not the source tree.
test-frozen: deps venv guest runtime deb
	KATA_TEST_BIN=$(RUNTIME_DIR)/kata-py/bin $(E2E_PYTEST) tests/e2e

# The whole e2e suite on QEMU's microvm machine (configuration-qemu-microvm.toml); `make test`
# runs a subset of it (tests/e2e/test_microvm.py).
test-microvm: deps venv guest
	KATA_TEST_CONFIG=$(CURDIR)/configuration-qemu-microvm.toml $(E2E_PYTEST) tests/e2e

# The whole e2e suite with the agent on vsock through our vhost-user back-end instead of
# virtio-serial (docs/vsock.md); `make test` runs a subset (tests/e2e/test_agent_vsock.py).
test-vsock: deps venv guest runtime deb
	KATA_TEST_AGENT_CHANNEL=vhost-user $(E2E_PYTEST) tests/e2e

# The e2e suite on StratoVirt, for hosts that have it and KVM (docs/stratovirt.md).
test-stratovirt: deps venv guest
	@test -n "$(STRATOVIRT)" || { echo "usage: make test-stratovirt STRATOVIRT=/path/to/stratovirt" >&2; exit 2; }
	@test -x "$(STRATOVIRT)" || { echo "test-stratovirt: $(STRATOVIRT) is not an executable" >&2; exit 2; }
	KATA_TEST_CONFIG=$(CURDIR)/configuration-stratovirt.toml KATA_TEST_VMM=$(STRATOVIRT) \
		$(E2E_PYTEST) tests/e2e

# Long run: 200 container cycles in one pod and 50 pod cycles, resources before/after
# (figures in docs/reliability.md). `make test` runs a few cycles of it.
soak: deps venv guest
	$(PY) -m benchmarks.soak
	KATA_FAULT_ROUNDS=3 $(PY) -m pytest -q tests/e2e/test_fault_matrix.py

# Every figure of docs/performance.md side by side with runc in one run (benchmarks/suite.py):
# samples as JSON, a chart and the table under build/out/bench/, the table also rewritten in
# docs/performance.md. QUICK=1: a few samples each, docs untouched (what `make test` runs).
# Then the pod network and q35-against-microvm figures (README).
QUICK ?=
bench: deps venv guest
ifeq ($(QUICK),)
	$(PY) -m benchmarks.suite --doc docs/performance.md
	$(PY) -m benchmarks.pod_network -n 3 --mib 32
	$(PY) -m benchmarks.machines -n 5
	$(PY) -m benchmarks.agent_channel -n 3
else
	$(PY) -m benchmarks.suite --quick
endif

demo: deps venv guest
	$(PY) -m tests.demo

install: deps venv guest runtime
	build/install.sh $(RUNTIME_DIR)/kata-py $(GUEST_DIR)

uninstall:
	build/install.sh --uninstall

clean:
	rm -rf $(VENV) build/out build/work .pytest_cache .mypy_cache .ruff_cache
