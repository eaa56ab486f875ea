"""Security contexts as the kubelet sets them, applied in the guest as runc applies them on
a host: each setting is read back from inside the container.

One pod (one VM) serves the whole module; each test adds a container with one setting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import leak_checked
from tests.harness.cri.client import ContainerOptions, Kubelet, Pod, PodOptions
from tests.harness.images import IMAGE_REF
from tests.harness.kata import CRI_HANDLER, kata_cri_containerd

CAP_CHOWN, CAP_NET_ADMIN, CAP_SYS_ADMIN = 0, 12, 21
SYSCTLS = {"kernel.shm_rmid_forced": "1", "net.ipv4.ip_unprivileged_port_start": "80"}


@pytest.fixture(scope="module")
def pod(guest_release: str,
        request: pytest.FixtureRequest) -> Iterator[tuple[Kubelet, Pod]]:
    with kata_cri_containerd() as kata, leak_checked(kata.cd, request, kata.state_dir):
        kubelet = Kubelet(kata.cd.address, kata.cd.dir / "pod-logs")
        try:
            yield kubelet, kubelet.run_pod("secure", CRI_HANDLER,
                                           PodOptions(sysctls=SYSCTLS, privileged=True))
        finally:
            with contextlib.suppress(Exception):
                kubelet.remove_all()
            kubelet.close()


_names = iter(range(1000))


def run(pod: tuple[Kubelet, Pod], script: str, opts: ContainerOptions | None = None) -> str:
    """Run `script` in a new container of the pod with `opts`; its output (exit 0 asserted)."""
    kubelet, sandbox = pod
    cid = kubelet.start_container(sandbox, f"c{next(_names)}", IMAGE_REF, ["sleep", "300"],
                                  opts)
    try:
        res = kubelet.exec_sync(cid, ["sh", "-c", script], timeout=60)
        assert res.exit_code == 0, res
        return res.stdout.decode()
    finally:
        kubelet.stop_container(cid, timeout=0)
        kubelet.remove_container(cid)


def status(pod: tuple[Kubelet, Pod], opts: ContainerOptions | None = None) -> dict[str, str]:
    text = run(pod, "cat /proc/self/status", opts)
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def caps(pod: tuple[Kubelet, Pod], opts: ContainerOptions | None = None) -> int:
    return int(status(pod, opts)["CapEff"], 16)


def test_default_capabilities_are_runcs_default_set(pod: tuple[Kubelet, Pod]) -> None:
    effective = caps(pod)
    assert effective & (1 << CAP_CHOWN)
    assert not effective & (1 << CAP_SYS_ADMIN) and not effective & (1 << CAP_NET_ADMIN)


def test_added_and_dropped_capabilities(pod: tuple[Kubelet, Pod]) -> None:
    effective = caps(pod, ContainerOptions(add_capabilities=["NET_ADMIN"],
                                           drop_capabilities=["CHOWN"]))
    assert effective & (1 << CAP_NET_ADMIN), hex(effective)
    assert not effective & (1 << CAP_CHOWN), hex(effective)


def test_privileged_has_every_capability_and_the_guests_devices(
        pod: tuple[Kubelet, Pod]) -> None:
    opts = ContainerOptions(privileged=True)
    effective = caps(pod, opts)
    assert effective & (1 << CAP_SYS_ADMIN), hex(effective)
    out = run(pod, "ls /dev; echo; grep ' /sys ' /proc/mounts", opts)
    devices, _, sys_mount = out.partition("\n\n")
    assert "rw" in sys_mount.split()[3].split(","), f"/sys is not writable: {sys_mount}"
    # The guest's devices (its serial console), never the host's, nor the agent's channel.
    assert "ttyS0" in devices.split(), devices
    assert not [d for d in devices.split() if d.startswith("vport")], devices
    assert "ttyS0" not in run(pod, "ls /dev").split(), "an unprivileged container got it"


def test_run_as_user_group_and_supplemental_groups(pod: tuple[Kubelet, Pod]) -> None:
    st = status(pod, ContainerOptions(run_as_user=1000, run_as_group=2000,
                                      supplemental_groups=[3000, 3001]))
    assert st["Uid"].split()[0] == "1000" and st["Gid"].split()[0] == "2000", st
    assert {"2000", "3000", "3001"} <= set(st["Groups"].split()), st["Groups"]


def test_no_new_privileges(pod: tuple[Kubelet, Pod]) -> None:
    assert status(pod, ContainerOptions(no_new_privs=True))["NoNewPrivs"] == "1"
    assert status(pod)["NoNewPrivs"] == "0"


def test_masked_and_read_only_paths(pod: tuple[Kubelet, Pod]) -> None:
    opts = ContainerOptions(masked_paths=["/proc/cpuinfo"], readonly_paths=["/proc/sys"])
    out = run(pod, "wc -c < /proc/cpuinfo; grep ' /proc/sys ' /proc/mounts", opts)
    size, _, mount = out.partition("\n")
    assert size.strip() == "0", f"/proc/cpuinfo is not masked: {size} bytes"
    assert "ro" in mount.split()[3].split(","), f"/proc/sys is not read-only: {mount}"
    # Without them, the same paths are as usual.
    assert int(run(pod, "wc -c < /proc/cpuinfo").strip()) > 0


def test_pod_sysctls_are_set(pod: tuple[Kubelet, Pod]) -> None:
    out = run(pod, "cat /proc/sys/kernel/shm_rmid_forced "
                   "/proc/sys/net/ipv4/ip_unprivileged_port_start")
    assert out.split() == ["1", "80"], out


def test_device_cgroup_rules_are_applied(pod: tuple[Kubelet, Pod]) -> None:
    """CRI's default rules deny every device but the standard ones: a node made in the
    container (CAP_MKNOD is in the default set) cannot be opened."""
    out = run(pod, "mknod /tmp/mem c 1 1 && (head -c1 /tmp/mem >/dev/null 2>&1 "
                   "&& echo OPENED || echo DENIED); head -c1 /dev/zero | wc -c")
    assert out.split() == ["DENIED", "1"], out
