"""Kubernetes pods through containerd's CRI plugin, driven by a kubelet stand-in (the
Python CRI client): containerd picks our shim from the RuntimeClass handler `kata`, which
the shipped `kata-runtime containerd-config add` wrote into containerd's configuration.
"""

from __future__ import annotations

import os
import time
import uuid

import grpc
import pytest

from tests.harness import kataconfig, procs
from tests.harness.cri import streaming
from tests.harness.cri.client import ContainerOptions, Kubelet, PodOptions
from tests.harness.images import IMAGE_REF
from tests.harness.kata import CRI_HANDLER, Kata

BOOT_ID = ["cat", "/proc/sys/kernel/random/boot_id"]
RUNNING = 1  # runtime.v1 ContainerState CONTAINER_RUNNING
SANDBOX_READY = 0




def out(kubelet: Kubelet, cid: str, cmd: list[str]) -> str:
    res = kubelet.exec_sync(cid, cmd, timeout=60)
    assert res.exit_code == 0, (cmd, res)
    return res.stdout.decode().strip()


def test_a_pod_of_three_containers_is_one_vm_sharing_ipc_and_hostname(
        cri: tuple[Kata, Kubelet]) -> None:
    kata, kubelet = cri
    pod = kubelet.run_pod("three", CRI_HANDLER, PodOptions(hostname="three-host"))
    assert kubelet.pod_status(pod.id).state == SANDBOX_READY
    cids = [kubelet.start_container(pod, f"c{i}", IMAGE_REF, ["sleep", "300"])
            for i in range(3)]
    assert len(kata.shim_daemons()) == 1, kata.shim_daemons()
    assert len(kata.qemu_processes()) == 1, kata.qemu_processes()

    assert len({out(kubelet, cid, BOOT_ID) for cid in cids}) == 1, "containers in other VMs"
    assert {out(kubelet, cid, ["hostname"]) for cid in cids} == {"three-host"}
    # IPC and UTS: one namespace each for the whole pod (busybox has no ipcmk to make a
    # SysV segment, so the namespace identities are compared).
    for ns in ("ipc", "uts"):
        seen = {out(kubelet, cid, ["readlink", f"/proc/self/ns/{ns}"]) for cid in cids}
        assert len(seen) == 1, f"the pod's containers are in different {ns} namespaces: {seen}"

    # /etc/hosts and /etc/resolv.conf are the files CRI wrote for the pod, as with runc, and
    # /dev/shm is one for the whole pod.
    sandbox_dir = kata.cd.root / "io.containerd.grpc.v1.cri" / "sandboxes" / pod.id
    for name in ("hosts", "resolv.conf"):
        assert out(kubelet, cids[1], ["cat", f"/etc/{name}"]) == \
            (sandbox_dir / name).read_text().strip()
    out(kubelet, cids[0], ["sh", "-c", "echo shared > /dev/shm/pod-file"])
    assert out(kubelet, cids[2], ["cat", "/dev/shm/pod-file"]) == "shared"

    listed = {c.id: c for c in kubelet.list_containers(pod.id)}
    assert set(listed) == set(cids)
    assert all(c.state == RUNNING for c in listed.values())
    assert kubelet.container_status(cids[2]).state == RUNNING

    kubelet.stop_pod(pod.id)
    kubelet.remove_pod(pod.id)
    assert kubelet.list_pods() == []  # the leak check then finds nothing of ours


def test_two_pods_are_two_vms(cri: tuple[Kata, Kubelet]) -> None:
    kata, kubelet = cri
    pods = [kubelet.run_pod(name, CRI_HANDLER) for name in ("pa", "pb")]
    a, b = (kubelet.start_container(p, "app", IMAGE_REF, ["sleep", "300"]) for p in pods)
    assert len(kata.qemu_processes()) == 2
    assert out(kubelet, a, BOOT_ID) != out(kubelet, b, BOOT_ID)
    out(kubelet, a, ["sh", "-c", "echo secret > /tmp/only-in-a"])
    res = kubelet.exec_sync(b, ["cat", "/tmp/only-in-a"], timeout=60)
    assert res.exit_code != 0 and b"secret" not in res.stdout


def test_exec_sync_returns_output_and_exit_code_and_enforces_its_timeout(
        cri: tuple[Kata, Kubelet]) -> None:
    _, kubelet = cri
    pod = kubelet.run_pod("exec", CRI_HANDLER)
    cid = kubelet.start_container(pod, "app", IMAGE_REF, ["sleep", "300"])
    res = kubelet.exec_sync(cid, ["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=60)
    assert (res.stdout, res.stderr, res.exit_code) == (b"out\n", b"err\n", 3)

    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        kubelet.exec_sync(cid, ["sleep", "120"], timeout=3)
    assert time.monotonic() - started < 60, "ExecSync's timeout was not enforced"
    assert "timeout" in (raised.value.details() or "").lower(), raised.value.details()
    # The pod still answers after a timed-out exec.
    assert out(kubelet, cid, ["echo", "alive"]) == "alive"
    # A program the image lacks: an error naming it (`ctr task exec` hung on it once:
    # tests/e2e/test_events_logs_io.py), and the pod goes on.
    with pytest.raises(grpc.RpcError) as raised:
        kubelet.exec_sync(cid, ["/no/such/program"], timeout=60)
    assert "/no/such/program" in (raised.value.details() or ""), raised.value.details()
    assert out(kubelet, cid, ["echo", "alive"]) == "alive"


def test_a_container_log_reaches_the_cri_log_path_and_can_be_reopened(
        cri: tuple[Kata, Kubelet]) -> None:
    _, kubelet = cri
    pod = kubelet.run_pod("logs", CRI_HANDLER)
    cid = kubelet.start_container(
        pod, "app", IMAGE_REF,
        ["sh", "-c", "echo first; while [ ! -e /tmp/go ]; do sleep 0.2; done; echo second; "
                     "echo third >&2; sleep 300"])
    log = pod.log_dir / "app" / "0.log"
    deadline = time.monotonic() + 30
    while b"first" not in (log.read_bytes() if log.exists() else b""):
        assert time.monotonic() < deadline, "no output in the CRI log"
        time.sleep(0.2)
    # CRI log format: <RFC3339Nano time> <stream> <P|F> <content>
    first = log.read_text().splitlines()[0].split(" ", 3)
    assert first[1:] == ["stdout", "F", "first"], first

    rotated = log.with_name("0.log.1")
    log.rename(rotated)
    kubelet.reopen_log(cid)
    out(kubelet, cid, ["touch", "/tmp/go"])
    deadline = time.monotonic() + 30
    while b"third" not in (log.read_bytes() if log.exists() else b""):
        assert time.monotonic() < deadline, "no output in the reopened CRI log"
        time.sleep(0.2)
    streams = [line.split(" ", 3)[1:] for line in log.read_text().splitlines()]
    # stdout and stderr are separate pipes and pumps, in the guest and in containerd's CRI
    # logger: their relative order in the file is not guaranteed (runc's neither).
    assert sorted(streams) == [["stderr", "F", "third"], ["stdout", "F", "second"]], streams
    assert "second" not in rotated.read_text()


def test_a_pod_survives_a_containerd_restart(cri: tuple[Kata, Kubelet]) -> None:
    kata, kubelet = cri
    pod = kubelet.run_pod("restart", CRI_HANDLER)
    cid = kubelet.start_container(pod, "app", IMAGE_REF, ["sleep", "300"])
    boot = out(kubelet, cid, BOOT_ID)
    kata.cd.restart()
    kubelet.reconnect()
    assert [p.id for p in kubelet.list_pods()] == [pod.id]
    assert kubelet.pod_status(pod.id).state == SANDBOX_READY
    assert kubelet.container_status(cid).state == RUNNING
    assert out(kubelet, cid, BOOT_ID) == boot, "the pod's VM changed"
    kubelet.stop_pod(pod.id)
    kubelet.remove_pod(pod.id)


def test_a_container_that_fails_to_start_is_reported_and_the_pod_goes_on(
        cri: tuple[Kata, Kubelet]) -> None:
    _, kubelet = cri
    pod = kubelet.run_pod("bad", CRI_HANDLER)
    with pytest.raises(grpc.RpcError) as raised:
        kubelet.start_container(pod, "nope", IMAGE_REF, ["/no/such/program"])
    assert "/no/such/program" in (raised.value.details() or ""), raised.value.details()
    cid = kubelet.start_container(pod, "app", IMAGE_REF, ["sleep", "300"],
                                  ContainerOptions())
    assert out(kubelet, cid, ["echo", "ok"]) == "ok"


def test_share_process_namespace_shows_the_pods_processes(cri: tuple[Kata, Kubelet]) -> None:
    _, kubelet = cri
    shared = kubelet.run_pod("shared", CRI_HANDLER, PodOptions(share_pid=True))
    alone = kubelet.run_pod("alone", CRI_HANDLER)
    a = kubelet.start_container(shared, "app", IMAGE_REF, ["sleep", "300"])
    b = kubelet.start_container(alone, "app", IMAGE_REF, ["sleep", "300"])
    # The pause container's `sleep infinity` is PID 1 of a shared PID namespace.
    assert "infinity" in out(kubelet, a, ["cat", "/proc/1/cmdline"])
    assert "infinity" not in out(kubelet, b, ["ps", "-o", "args"])


CGROUP_FILE = ("cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup | head -1)/{name} "
               "2>/dev/null || cat /sys/fs/cgroup/{name}")


def test_container_stats_show_a_busy_containers_cpu_and_memory(
        cri: tuple[Kata, Kubelet]) -> None:
    _, kubelet = cri
    pod = kubelet.run_pod("stats", CRI_HANDLER)
    cid = kubelet.start_container(pod, "busy", IMAGE_REF, ["sh", "-c", "while :; do :; done"])
    time.sleep(2)
    stats = kubelet.container_stats(cid)
    assert stats.attributes.id == cid
    assert stats.cpu.usage_core_nano_seconds.value > 0, stats
    assert stats.memory.working_set_bytes.value > 0, stats
    later = kubelet.container_stats(cid)
    assert later.cpu.usage_core_nano_seconds.value > stats.cpu.usage_core_nano_seconds.value
    listed = {s.attributes.id for s in kubelet.list_container_stats(pod.id)}
    assert listed == {cid}


def test_update_container_resources_changes_what_the_container_sees(
        cri: tuple[Kata, Kubelet]) -> None:
    from tests.harness.cri.api_pb2 import LinuxContainerResources

    _, kubelet = cri
    pod = kubelet.run_pod("update", CRI_HANDLER)
    cid = kubelet.start_container(pod, "app", IMAGE_REF, ["sleep", "300"],
                                  ContainerOptions(memory_limit_bytes=512 << 20))
    limit = ["sh", "-c", CGROUP_FILE.format(name="memory.max")]
    assert out(kubelet, cid, limit) == str(512 << 20)
    kubelet.update_resources(cid, LinuxContainerResources(memory_limit_in_bytes=256 << 20,
                                                          cpu_period=100000, cpu_quota=50000))
    assert out(kubelet, cid, limit) == str(256 << 20)
    cpu_max = out(kubelet, cid, ["sh", "-c", CGROUP_FILE.format(name="cpu.max")])
    assert cpu_max == "50000 100000", cpu_max


def test_a_container_past_its_memory_limit_is_reported_oom_killed(
        cri: tuple[Kata, Kubelet]) -> None:
    _, kubelet = cri
    pod = kubelet.run_pod("oom", CRI_HANDLER)
    # tail keeps a whole "line" of /dev/zero in memory: 256 MiB past a 32 MiB limit.
    cid = kubelet.start_container(pod, "hog", IMAGE_REF,
                                  ["sh", "-c", "head -c 268435456 /dev/zero | tail"],
                                  ContainerOptions(memory_limit_bytes=32 << 20))
    deadline = time.monotonic() + 60
    while (status := kubelet.container_status(cid)).state == RUNNING:
        assert time.monotonic() < deadline, "the container did not hit its limit"
        time.sleep(0.5)
    assert status.reason == "OOMKilled", (status.reason, status.exit_code, status.message)
    assert status.exit_code == 137


def test_a_container_sees_the_pods_limits_not_the_hosts(cri: tuple[Kata, Kubelet]) -> None:
    """The VM is sized from the pod's limits (static_sandbox_resource_mgmt): a pod of
    768 MiB and 2 CPUs sees about that in /proc/meminfo, `free` and `nproc`. (The test
    configuration's defaults are 512 MiB and 1 vCPU, so an unsized VM fails this.)"""
    _, kubelet = cri
    limit, quota, period = 768 << 20, 200000, 100000
    pod = kubelet.run_pod("sized", CRI_HANDLER, PodOptions(memory_limit_bytes=limit,
                                                           cpu_quota=quota, cpu_period=period))
    cid = kubelet.start_container(pod, "jvm", IMAGE_REF, ["sleep", "300"],
                                  ContainerOptions(memory_limit_bytes=limit, cpu_quota=quota,
                                                   cpu_period=period))
    assert out(kubelet, cid, ["nproc"]) == "2"
    meminfo = out(kubelet, cid, ["grep", "MemTotal", "/proc/meminfo"])
    total_kib = int(meminfo.split()[1])
    host_kib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 1024
    # About the limit: more than 90 % of it, less than limit + the 256 MiB base.
    assert limit // 1024 * 0.9 < total_kib < (limit + (256 << 20)) // 1024, meminfo
    assert total_kib < host_kib // 2, f"the container sees the host's memory: {meminfo}"
    free_total = int(out(kubelet, cid, ["free", "-k"]).splitlines()[1].split()[1])
    assert free_total == total_kib


def test_a_pod_larger_than_the_maximum_is_refused_clearly(cri: tuple[Kata, Kubelet]) -> None:
    kata, kubelet = cri
    kata.write_config({kataconfig.HYPERVISOR: {"default_maxmemory": 1024}})
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        kubelet.run_pod("huge", CRI_HANDLER, PodOptions(memory_limit_bytes=4 << 30))
    assert "default_maxmemory" in (raised.value.details() or ""), raised.value.details()
    assert time.monotonic() - started < 60, "the refusal took as long as a boot"
    assert not kata.qemu_processes()


HV = "io.katacontainers.config.hypervisor."
NEEDS_HOTPLUG = pytest.mark.skipif(not kataconfig.can_hotplug(),
                                   reason="this machine type cannot hot-plug (microvm)")


def test_hypervisor_annotations_are_honoured_only_where_the_configuration_allows(
        cri: tuple[Kata, Kubelet]) -> None:
    kata, kubelet = cri
    # Not enabled (the default): refused, naming the annotation and the rule.
    with pytest.raises(grpc.RpcError) as raised:
        kubelet.run_pod("plain", CRI_HANDLER,
                        PodOptions(annotations={HV + "kernel_params": "ktest.mark=1"}))
    assert f"annotation {HV}kernel_params is not enabled" in (raised.value.details() or "")

    kata.write_config({kataconfig.HYPERVISOR: {
        "enable_annotations": ["kernel_params", "path"],
        "valid_hypervisor_paths": ["/usr/bin/qemu-system-*"]}})
    # A hypervisor binary outside valid_hypervisor_paths: refused before anything runs.
    with pytest.raises(grpc.RpcError) as raised:
        kubelet.run_pod("evil", CRI_HANDLER, PodOptions(annotations={HV + "path": "/tmp/qemu"}))
    details = raised.value.details() or ""
    assert f"annotation {HV}path: /tmp/qemu is not allowed: valid_hypervisor_paths" in details
    assert not kata.qemu_processes()
    # Enabled: the guest kernel gets the parameter.
    pod = kubelet.run_pod("marked", CRI_HANDLER,
                          PodOptions(annotations={HV + "kernel_params": "ktest.mark=42"}))
    cid = kubelet.start_container(pod, "app", IMAGE_REF, ["sleep", "300"])
    assert "ktest.mark=42" in out(kubelet, cid, ["cat", "/proc/cmdline"]).split()


def cgroup_of(pid: int) -> str:
    """The process's cgroup lines (v1: one per hierarchy; v2: one)."""
    with open(f"/proc/{pid}/cgroup") as f:
        return f.read()


def systemd_parent() -> str:
    """A pod slice as the kubelet's systemd driver names it (nested slices)."""
    top = f"ktest{uuid.uuid4().hex[:6]}"
    return f"/{top}.slice/{top}-pod{uuid.uuid4().hex[:8]}.slice"


def vm_rss_bytes(pid: int) -> int:
    """QEMU's resident anonymous and shared memory: the guest's RAM and QEMU's own heap.
    Not its file pages (the kernel it maps, its libraries): page cache is charged to the
    cgroup that first read it, and every VM shares it."""
    with open(f"/proc/{pid}/status") as f:
        return sum(int(line.split()[1]) * 1024 for line in f
                   if line.startswith(("RssAnon:", "RssShmem:")))


@pytest.mark.parametrize("driver", ["cgroupfs", "systemd"])
def test_the_vm_runs_in_the_pods_cgroup_and_pod_stats_see_it(
        cri: tuple[Kata, Kubelet], driver: str) -> None:
    kata, kubelet = cri
    parent = (systemd_parent() if driver == "systemd"
              else f"/ktest-{uuid.uuid4().hex[:8]}/pod{uuid.uuid4().hex[:8]}")
    pod = kubelet.run_pod("accounted", CRI_HANDLER, PodOptions(cgroup_parent=parent))
    # CRI names the sandbox cgroup <parent>/<id>, or for a slice the unit
    # <slice>:cri-containerd:<id>, which lives in <parent>/cri-containerd-<id>.scope.
    sandbox_cgroup = (f"{parent}/cri-containerd-{pod.id}.scope" if driver == "systemd"
                      else f"{parent}/{pod.id}")
    kubelet.start_container(pod, "busy", IMAGE_REF, ["sh", "-c", "while :; do :; done"])
    vm_processes = [*kata.qemu_processes(),
                    *procs.matching(["virtiofsd"], scope=[str(kata.cd.dir)]),
                    *kata.shim_daemons()]
    assert len(vm_processes) >= 3
    for p in vm_processes:
        assert sandbox_cgroup in cgroup_of(p.pid), (p.argv[0], cgroup_of(p.pid))
    time.sleep(2)
    stats = kubelet.pod_stats(pod.id)
    qemu_rss = sum(vm_rss_bytes(p.pid) for p in kata.qemu_processes())
    assert stats.linux.cpu.usage_core_nano_seconds.value > 0, stats
    # The guest's RAM is QEMU's: the pod's working set holds most of QEMU's resident
    # anonymous and shared memory (free page reporting hands freed guest pages back, so no
    # fixed size is right).
    working_set = stats.linux.memory.working_set_bytes.value
    assert working_set > max(64 << 20, qemu_rss // 2), \
        f"the VM's memory is missing: working set {working_set}, QEMU RSS {qemu_rss}"
    listed = {s.attributes.id: s for s in kubelet.list_pod_stats()}
    assert listed[pod.id].linux.cpu.usage_core_nano_seconds.value > 0
    pod_cgroup = kubelet.pod_cgroups[-1]
    assert pod_cgroup.children(), "no sandbox cgroup under the pod's"
    kubelet.stop_pod(pod.id)
    kubelet.remove_pod(pod.id)
    assert pod_cgroup.children() == [], "the sandbox cgroup was left behind"


def test_exec_and_attach_through_the_streaming_server(cri: tuple[Kata, Kubelet]) -> None:
    """As kubectl exec / attach: WebSocket (v4.channel.k8s.io) to CRI's streaming server."""
    _, kubelet = cri
    pod = kubelet.run_pod("stream", CRI_HANDLER)
    cid = kubelet.start_container(
        pod, "app", IMAGE_REF,
        ["sh", "-c", "while :; do echo tick; sleep 0.5; done"])
    res = streaming.stream(kubelet.exec_url(cid, ["sh", "-c", "echo out; echo err >&2; exit 3"]))
    assert (res.stdout, res.stderr, res.exit_code) == (b"out\n", b"err\n", 3), res
    ok = streaming.stream(kubelet.exec_url(cid, ["cat", "/proc/sys/kernel/random/boot_id"]))
    assert ok.exit_code == 0 and ok.stdout.strip() == out(kubelet, cid, BOOT_ID).encode()
    attached = streaming.stream(kubelet.attach_url(cid), timeout=30, until=b"tick\ntick\n")
    assert b"tick\ntick\n" in attached.stdout, attached


@NEEDS_HOTPLUG
def test_a_pod_whose_cpu_limit_grows_gets_vcpus_hot_plugged(cri: tuple[Kata, Kubelet]) -> None:
    from tests.harness.cri.api_pb2 import LinuxContainerResources

    kata, kubelet = cri
    kata.write_config({kataconfig.HYPERVISOR: {"default_maxvcpus": 2}})
    one_cpu = {"cpu_quota": 100000, "cpu_period": 100000}
    pod = kubelet.run_pod("growing", CRI_HANDLER, PodOptions(**one_cpu))
    cid = kubelet.start_container(pod, "app", IMAGE_REF, ["sleep", "300"],
                                  ContainerOptions(**one_cpu))
    assert out(kubelet, cid, ["nproc"]) == "1"
    kubelet.update_resources(cid, LinuxContainerResources(cpu_quota=200000, cpu_period=100000))
    assert out(kubelet, cid, ["nproc"]) == "2", "the hot-plugged vCPU is not online"
    cpu_max = out(kubelet, cid, ["sh", "-c", CGROUP_FILE.format(name="cpu.max")])
    assert cpu_max == "200000 100000"


@NEEDS_HOTPLUG
def test_a_pod_whose_memory_limit_grows_gets_memory_hot_plugged(
        cri: tuple[Kata, Kubelet]) -> None:
    from tests.harness.cri.api_pb2 import LinuxContainerResources

    kata, kubelet = cri
    kata.write_config({kataconfig.HYPERVISOR: {"memory_slots": 10}})  # off by default
    small, large = 256 << 20, 768 << 20
    pod = kubelet.run_pod("swelling", CRI_HANDLER, PodOptions(memory_limit_bytes=small))
    cid = kubelet.start_container(pod, "app", IMAGE_REF, ["sleep", "300"],
                                  ContainerOptions(memory_limit_bytes=small))

    def mem_total_mib() -> int:
        return int(out(kubelet, cid, ["grep", "MemTotal", "/proc/meminfo"]).split()[1]) >> 10

    before = mem_total_mib()
    assert before < 512, before  # 256 MiB base + 256 MiB limit, minus the kernel's share
    kubelet.update_resources(cid, LinuxContainerResources(memory_limit_in_bytes=large))
    after = mem_total_mib()
    assert after >= before + 400, f"MemTotal {before} -> {after} MiB: nothing was hot-plugged"
    limit = ["sh", "-c", CGROUP_FILE.format(name="memory.max")]
    assert out(kubelet, cid, limit) == str(large)
    # The new memory is usable: one process holds 400 MiB (dd's single 400 MiB block, every
    # page written by the read from /dev/zero); the VM it booted as had less than that free.
    # (The earlier probe, `head -c 400M /dev/zero | tail`, ran at ~2.3 MiB/s under TCG here:
    # busybox tail, not the hot-plugged memory, made it time out.)
    res = kubelet.exec_sync(cid, ["dd", "if=/dev/zero", "of=/dev/null", "bs=419430400",
                                  "count=1"], timeout=120)
    assert res.exit_code == 0 and b"1+0 records in" in res.stderr, res
