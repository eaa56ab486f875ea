#!/bin/sh
# kata-py guest /init (busybox sh): mount the API filesystems, then hand PID 1 to the agent.
# Keep it short: every command costs ~20x its host time under QEMU TCG.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
read -r up _ </proc/uptime
# The agent reports its start-up time from here (see agent/main.py).
export KATA_AGENT_EXEC_UPTIME="$up"
echo "kata-init: exec /opt/kata-agent/kata-agent (uptime ${up}s)"
exec /opt/kata-agent/kata-agent
