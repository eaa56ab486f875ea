# Guest image: kernel + initrd with the frozen agent (see build/README.md).
# Called by the top-level Makefile: $(MAKE) -f build/guest.mk GUEST_DIR=... PY=... VENV=...
# Every step is rebuilt only when one of its inputs changed; with nothing changed a second
# run does nothing.
# This file's path (before the include appends to MAKEFILE_LIST), for `refresh`.
THIS_MK := $(lastword $(MAKEFILE_LIST))
include $(dir $(THIS_MK))common.mk
GUEST_DIR ?= $(B)/out
WORK ?= $(B)/work
CACHE ?= $(B)/cache
VENV ?= $(ROOT)/.venv
PY ?= $(VENV)/bin/python
# Prints the binary the venv's Python runs on: the guest runs the agent on that interpreter
# (build/README.md "Agent").
BASE_PYTHON = $(PY) -c 'import os, sys; print(os.path.realpath(sys._base_executable))'
# The agent's entry script; a stub may be substituted while testing the image itself.
AGENT_ENTRY ?= $(ROOT)/agent/__main__.py
# none | gzip | zstd | lz4: none boots fastest under TCG (measured, build/README.md).
INITRD_COMPRESSION ?= none
# Comma-separated kernel modules (their dependencies are added); empty: the default set.
GUEST_MODULES ?=

override GUEST_DIR := $(abspath $(GUEST_DIR))
override AGENT_ENTRY := $(abspath $(AGENT_ENTRY))

# Inputs of the frozen agent: its sources and the generated protocol modules.
AGENT_SRCS := $(sort $(AGENT_ENTRY) \
    $(shell find $(ROOT)/agent $(ROOT)/ttrpc $(ROOT)/common -name '*.py' -not -path '*/__pycache__/*' \
            2>/dev/null) \
    $(wildcard $(ROOT)/protocols/__init__.py $(ROOT)/protocols/*_pb2.py))
VENV_STAMP := $(wildcard $(VENV)/.installed)
DEBS := $(wildcard $(CACHE)/*.deb)

# Settings that are not files become files, rewritten only when they change.
define setting
$(shell mkdir -p $(WORK) && f=$(WORK)/$(1).cfg && \
    if [ "$$(cat $$f 2>/dev/null)" != "$(2)" ]; then echo "$(2)" >$$f; fi)
endef
$(call setting,agent,$(AGENT_ENTRY))
$(call setting,initrd,$(INITRD_COMPRESSION) $(GUEST_MODULES))

OUTPUTS := $(GUEST_DIR)/vmlinux $(GUEST_DIR)/vmlinuz $(GUEST_DIR)/initrd.img \
           $(GUEST_DIR)/kernel-release $(GUEST_DIR)/rootfs.img $(GUEST_DIR)/rootfs-loader.img $(GUEST_DIR)/MANIFEST

.PHONY: guest refresh clean-guest
guest: $(OUTPUTS)

# Debian packages -> build/cache (+ debs.lock with the versions).
$(CACHE)/debs.lock: $(B)/fetch-debs.sh
	$(B)/fetch-debs.sh $(CACHE)
	touch $@

# Unpacked packages + depmod -> build/work/debs.
$(WORK)/debs.stamp: $(CACHE)/debs.lock $(DEBS) $(B)/extract-debs.sh
	$(B)/extract-debs.sh $(CACHE) $(WORK)
	touch $@

# The agent frozen with PyInstaller -> build/work/agent/kata-agent/.
$(WORK)/agent.stamp: $(AGENT_SRCS) $(WORK)/agent.cfg $(VENV_STAMP) \
                     $(B)/freeze-agent.sh $(B)/pyinstaller-onedir.sh $(B)/agent-excludes.txt
	@[ -f "$(AGENT_ENTRY)" ] || { echo "guest.mk: agent entry $(AGENT_ENTRY) not found" \
	    "(the guest agent is agent/__main__.py; AGENT_ENTRY=... to use another)" >&2; exit 1; }
	$(B)/freeze-agent.sh $(VENV) $(AGENT_ENTRY) $(WORK)/agent
	touch $@

# crun's libsystemd in the guest: the functions crun imports, none usable there (see the
# source); Debian's would bring five more libraries into every crun call.
$(WORK)/crun-libs/libsystemd.so.0: $(B)/crun-nosystemd.c $(B)/crun-nosystemd.map
	mkdir -p $(dir $@)
	$(CC) -O2 -Wall -Wextra -Werror -shared -fPIC -Wl,-soname,libsystemd.so.0 \
	    -Wl,--version-script=$(B)/crun-nosystemd.map -o $@.tmp $(B)/crun-nosystemd.c
	mv $@.tmp $@

$(GUEST_DIR)/initrd.img: $(WORK)/debs.stamp $(WORK)/agent.stamp $(WORK)/initrd.cfg \
                         $(B)/guestbuild.py $(B)/init.sh $(WORK)/crun-libs/libsystemd.so.0
	$(PY) $(B)/guestbuild.py initrd --tree $(WORK)/tree \
	    --kernel-root $(WORK)/debs/linux-image \
	    --busybox $(WORK)/debs/busybox-static/bin/busybox \
	    --crun $(WORK)/debs/crun/usr/bin/crun \
	    --agent $(WORK)/agent/kata-agent --init $(B)/init.sh \
	    --interpreter "$$($(BASE_PYTHON))" --entry $(AGENT_ENTRY) \
	    --modules "$(GUEST_MODULES)" --compression $(INITRD_COMPRESSION) \
	    --lib-dir $(WORK)/crun-libs \
	    --out $@ --info $(WORK)/initrd-info.json

# The shared read-only root image (the initrd's tree as ext4) and the initrd that mounts it
# (build/README.md, "Shared root image"). The loader is static: the loader initrd has no
# libraries.
$(GUEST_DIR)/rootfs.img: $(GUEST_DIR)/initrd.img $(B)/rootimage.py
	$(PY) $(B)/rootimage.py image --tree $(WORK)/tree --out $@

$(WORK)/rootfs-loader: $(B)/rootfs-loader.c
	mkdir -p $(dir $@)
	$(CC) -static -Os -s -Wall -Wextra -Werror -o $@.tmp $(B)/rootfs-loader.c
	mv $@.tmp $@

$(GUEST_DIR)/rootfs-loader.img: $(WORK)/rootfs-loader $(WORK)/debs.stamp $(B)/rootimage.py \
                                $(B)/guestbuild.py
	$(PY) $(B)/rootimage.py loader --kernel-root $(WORK)/debs/linux-image \
	    --loader $(WORK)/rootfs-loader --out $@

$(GUEST_DIR)/kernel-release: $(WORK)/debs.stamp
	mkdir -p $(GUEST_DIR)
	cp $(WORK)/debs/kernel-release $@

$(GUEST_DIR)/vmlinuz: $(WORK)/debs.stamp
	mkdir -p $(GUEST_DIR)
	cp $(WORK)/debs/linux-image/boot/vmlinuz-$$(cat $(WORK)/debs/kernel-release) $@.tmp
	mv $@.tmp $@

# The same kernel uncompressed: QEMU boots it through its PVH entry (build/README.md).
$(GUEST_DIR)/vmlinux: $(GUEST_DIR)/vmlinuz $(B)/guestbuild.py
	$(PY) $(B)/guestbuild.py vmlinux $< --out $@

$(GUEST_DIR)/MANIFEST: $(GUEST_DIR)/vmlinux $(GUEST_DIR)/vmlinuz $(GUEST_DIR)/initrd.img \
                       $(GUEST_DIR)/kernel-release $(GUEST_DIR)/rootfs.img $(GUEST_DIR)/rootfs-loader.img
	$(PY) $(B)/guestbuild.py manifest --info $(WORK)/initrd-info.json \
	    --debs-lock $(CACHE)/debs.lock --out-dir $(GUEST_DIR) \
	    --agent-entry $(AGENT_ENTRY) --compression $(INITRD_COMPRESSION) \
	    --python-version "$$($(PY) -c 'import sys; print(sys.version.split()[0])')" \
	    $(AGENT_SRCS)
	@echo "guest: $(GUEST_DIR): vmlinux $$(du -h $(GUEST_DIR)/vmlinux | cut -f1)," \
	    "vmlinuz $$(du -h $(GUEST_DIR)/vmlinuz | cut -f1)," \
	    "initrd.img $$(du -h $(GUEST_DIR)/initrd.img | cut -f1) ($(INITRD_COMPRESSION))," \
	    "rootfs.img $$(du -h --apparent-size $(GUEST_DIR)/rootfs.img | cut -f1)" \
	    "+ rootfs-loader.img $$(du -h $(GUEST_DIR)/rootfs-loader.img | cut -f1)"

# Pick up newer Debian packages (the .debs stay cached until then).
refresh:
	rm -f $(CACHE)/debs.lock
	$(MAKE) -f $(THIS_MK) guest

clean-guest:
	rm -rf $(GUEST_DIR) $(WORK)
