#!/bin/sh
# kata-py guest /init (busybox sh): make the root pivotable, mount the API filesystems,
# then hand PID 1 to the agent. Keep it short: every command costs ~20x under QEMU TCG.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
if [ "$1" != "stage2" ]; then
    # The initramfs root cannot be pivot_root'ed (crun needs that for every container).
    # Put a bind mount of it on top of / and chroot into that: same files, no copying.
    mount -o bind / /newroot
    cd /newroot
    mount -o move . /
    exec chroot . /init stage2
fi
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
read -r up _ </proc/uptime
# The agent reports its start-up time from here (see agent/main.py).
export KATA_AGENT_EXEC_UPTIME="$up"
# The PyInstaller (onedir) launcher re-execs itself once to put its _internal/ on
# LD_LIBRARY_PATH (dlopen'ed libpython and the extensions need it); an exec costs ~20x under
# TCG. Giving it the environment of that second run (what the bootloader itself would set)
# makes the first run the final one. Values must match the bundle's layout.
export LD_LIBRARY_PATH=/opt/kata-agent/_internal _PYI_ARCHIVE_FILE=/opt/kata-agent/kata-agent \
    _PYI_PARENT_PROCESS_LEVEL=-1
echo "kata-init: exec /opt/kata-agent/kata-agent (uptime ${up}s)"
exec /opt/kata-agent/kata-agent
