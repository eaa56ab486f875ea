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
# /opt/kata-agent/kata-agent is the Python interpreter; its standard library and the agent's
# packages are in /opt/kata-agent/lib, found from the binary's own path, and main.pyc is the
# agent's entry (build/README.md "Agent"). -I: no environment variables, user site or script
# directory on the path; -S: no site module.
echo "kata-init: exec /opt/kata-agent/kata-agent (uptime ${up}s)"
exec /opt/kata-agent/kata-agent -I -S /opt/kata-agent/main.pyc
