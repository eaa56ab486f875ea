#!/usr/bin/env bash
# The README's "install from the .deb" path as a new user takes it, on a fresh Debian 12
# root: debootstrap bookworm into a scratch directory, `apt-get install ./kata-py_*.deb`
# there (apt fetches the dependencies from the mirror), start that root's own containerd,
# run busybox in a VM with `ctr run --runtime io.containerd.kata.v2`, then `apt-get purge`
# and check that the package left nothing. The host's kernel is shared (a chroot, not a
# new machine), everything in userland is the fresh root's.
#
#   sudo build/try-deb-fresh.sh build/out/kata-py_0.1.0_amd64.deb busybox.oci.tar
#
# It runs in private mount and PID namespaces (unshare): no mount reaches the host, and
# every process started in the fresh root (containerd, shims, QEMU) ends with it, also on
# a failure. Needs network access to the Debian mirror; takes several minutes.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 <kata-py .deb> <busybox OCI tar>" >&2; exit 2; }
deb=$(realpath "$1"); image=$(realpath "$2")
mirror=${MIRROR:-http://deb.debian.org/debian}
root=$(mktemp -d /var/tmp/kata-fresh.XXXXXX)
# KEEP=1 keeps the fresh root for a look after a failure (chroot into it).
trap '[ -n "${KEEP:-}" ] && echo "kept: $root" || rm -rf --one-file-system "$root"' EXIT

step() { printf '\n== %s\n' "$*"; }

if ! command -v debootstrap >/dev/null; then
    step "apt-get install debootstrap (on this host)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
fi
step "debootstrap bookworm (minbase) into $root"
debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.debootstrap.log" 2>&1 \
    || { tail -20 "$root.debootstrap.log"; exit 1; }
rm -f "$root.debootstrap.log"
cp "$deb" "$image" "$root/tmp/"
cp /etc/resolv.conf "$root/etc/resolv.conf"

# What runs inside the fresh root, in a private mount namespace.
cat >"$root/tmp/inside.sh" <<EOF
set -euo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive
step() { printf '\n== %s\n' "\$*"; }
step "apt-get install ./$(basename "$deb")"
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends /tmp/$(basename "$deb") >/tmp/apt.log 2>&1 \
    || { tail -30 /tmp/apt.log; exit 1; }
# (no `head` here: under pipefail its early exit would fail the step with SIGPIPE)
echo "  \$(grep -c '^Setting up ' /tmp/apt.log) packages set up, among them:"
grep -E '^Setting up (kata-py|qemu-system-x86|containerd) ' /tmp/apt.log | sed 's/^/  /' || true
step "kata-runtime version; kata-runtime check"
kata-runtime version
kata-runtime check || true   # no KVM here: check says so, and how to allow TCG
step "allow TCG (no KVM on this machine), as the README says"
mkdir -p /etc/kata-containers
sed 's/^allow_tcg = false/allow_tcg = true/' /usr/share/defaults/kata-containers/configuration.toml \
    >/etc/kata-containers/configuration.toml
step "containerd of the fresh root"
containerd >/tmp/containerd.log 2>&1 &
cd_pid=\$!
for _ in \$(seq 50); do ctr version >/dev/null 2>&1 && break; sleep 0.2; done
ctr version | sed 's/^/  /'
ctr image import /tmp/$(basename "$image") >/dev/null
step "ctr run --rm --runtime io.containerd.kata.v2 ... uname -r"
guest=\$(ctr run --rm --runtime io.containerd.kata.v2 docker.io/library/busybox:latest fresh1 uname -r) \
    || { echo "FAIL: ctr run; containerd's log, tail:" >&2; tail -40 /tmp/containerd.log >&2; exit 1; }
echo "  guest kernel: \$guest; host kernel: \$(uname -r)"
[ "\$guest" != "\$(uname -r)" ] || { echo "FAIL: the container ran on the host's kernel" >&2; exit 1; }
kill \$cd_pid; wait \$cd_pid || true
step "apt-get purge kata-py"
apt-get purge -y -q kata-py >/dev/null
left=\$(ls /usr/libexec/kata-py /usr/share/kata-containers /usr/share/defaults/kata-containers \
            /usr/bin/kata-runtime /usr/bin/containerd-shim-kata-v2 2>/dev/null || true)
[ -z "\$left" ] || { echo "FAIL: left after purge: \$left" >&2; exit 1; }
procs=\$(for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' <"\$f" 2>/dev/null; echo; done \
        | grep -E '[c]ontainerd-shim-kata|[q]emu-system|[v]irtiofsd' || true)
[ -z "\$procs" ] || { echo "FAIL: processes left: \$procs" >&2; exit 1; }
! grep -E '/run/kata-py|/kata-containers' /proc/self/mountinfo || { echo "FAIL: mounts left" >&2; exit 1; }
echo "  nothing of kata-py left"
EOF

unshare --mount --propagation private --pid --fork bash -euo pipefail -c '
    root=$1
    # The fresh root must be a mount point, as on a machine of its own: the shim makes "/"
    # a slave of the host mounts, which a plain directory cannot be.
    mount --bind "$root" "$root"
    mount -t proc proc "$root/proc"
    mount --rbind /sys "$root/sys"
    mount --rbind /dev "$root/dev"
    mount -t tmpfs tmpfs "$root/run"
    chroot "$root" bash /tmp/inside.sh' _ "$root"
step "passed: installed, ran a container in a VM, purged; $root removed"
