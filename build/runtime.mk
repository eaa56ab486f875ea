# The host runtime frozen with PyInstaller (shim + kata-runtime, one onedir bundle; see
# build/freeze-runtime.sh), and the Debian package made of it (build/deb.sh). Called by
# the top-level Makefile:
#   $(MAKE) -f build/runtime.mk RUNTIME_DIR=... VENV=... [GUEST_DIR=... deb]
# Rebuilt only when one of its inputs changed; with nothing changed a second run does nothing.
include $(dir $(lastword $(MAKEFILE_LIST)))common.mk
RUNTIME_DIR ?= $(B)/out/runtime
VENV ?= $(ROOT)/.venv
GUEST_DIR ?= $(B)/out
override RUNTIME_DIR := $(abspath $(RUNTIME_DIR))
override GUEST_DIR := $(abspath $(GUEST_DIR))

# Inputs: the host packages' sources, the generated protocol modules, the entry point.
HOST_PACKAGES := cli common hostos shim sandbox hypervisors agent_client network ttrpc protocols
RUNTIME_SRCS := $(sort \
    $(shell cd $(ROOT) && find $(HOST_PACKAGES) -name '*.py' -not -path '*/__pycache__/*' \
            2>/dev/null | sed 's|^|$(ROOT)/|') \
    $(B)/runtime-entry.py $(VENV)/bin/kata-vm-holder)
VENV_STAMP := $(wildcard $(VENV)/.installed)
BUNDLE := $(RUNTIME_DIR)/kata-py

.PHONY: runtime deb clean-runtime
runtime: $(RUNTIME_DIR)/BUILD_INFO
deb: $(RUNTIME_DIR)/deb.stamp

$(RUNTIME_DIR)/BUILD_INFO: $(RUNTIME_SRCS) $(VENV_STAMP) $(B)/freeze-runtime.sh \
                           $(B)/pyinstaller-onedir.sh $(B)/runtime.mk $(B)/common.mk
	$(B)/freeze-runtime.sh $(VENV) $(RUNTIME_DIR)
	cp $(BUNDLE)/BUILD_INFO $@

# The .deb lands beside the guest (build/out/kata-py_<version>_amd64.deb); deb.stamp
# holds its path.
DEB_INPUTS := $(RUNTIME_DIR)/BUILD_INFO \
    $(GUEST_DIR)/vmlinux $(GUEST_DIR)/vmlinuz $(GUEST_DIR)/initrd.img $(wildcard $(GUEST_DIR)/MANIFEST) \
    $(wildcard $(ROOT)/configuration*.toml) $(ROOT)/cli/containerd_config.py \
    $(B)/deb.sh $(B)/install.sh $(wildcard $(B)/debian/*)
$(RUNTIME_DIR)/deb.stamp: $(DEB_INPUTS)
	$(B)/deb.sh $(BUNDLE) $(GUEST_DIR) $(VENV) $(GUEST_DIR) | tail -1 >$@.tmp
	lintian --fail-on error $$(cat $@.tmp)
	mv $@.tmp $@

clean-runtime:
	rm -rf $(RUNTIME_DIR)
