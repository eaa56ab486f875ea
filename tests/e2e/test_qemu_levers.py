"""QEMU performance settings, end to end: each is on QEMU's command line and does what it
is there for (the numbers behind the defaults: configuration.toml).

* ``firmware`` (qboot instead of SeaBIOS) and ``tcg_tb_size_mib`` (a bounded TCG
  translation cache): the pod works, no SeaBIOS on the console, QEMU's code buffer (its
  writable+executable mappings) is the configured size, not QEMU's 1 GiB;
* under TCG the agent starts crun at fixed addresses (``agent.crun_no_aslr``): the
  container's init and its execs still run randomised;
* under TCG the guest kernel does not zero what it allocates (``init_on_alloc=0``);
* under TCG the agent answers output in full flow in larger pieces
  (``agent.gather_output``): what a container writes arrives whole and in order, in
  fewer and larger ReadStdout answers;
* under TCG QEMU boots under ``SCHED_BATCH`` (every thread, from its exec), so pods booting
  at once on few cores preempt each other less, and serves under ``SCHED_OTHER``; nothing
  else we spawn is a batch job;
* under TCG the guest's scheduler lets a woken task preempt the running one only 4 ms
  behind it (``agent.sched_throughput``), and a tty still carries output whole;
* device drivers (virtio_net, the vsock transport, virtio_balloon) are loaded only when the
  VM has the device;
* ``reclaim_guest_freed_memory``: the guest binds virtio_balloon (the agent loads it only
  for the device), and memory a container touched and freed leaves QEMU again (its peak
  RSS shows the container really touched it).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time

import pytest

from common.constants import (
    CRUN_NO_ASLR_KERNEL_PARAM,
    GATHER_OUTPUT_KERNEL_PARAM,
    SCHED_THROUGHPUT_KERNEL_PARAM,
)
from tests.harness import procs
from tests.harness.kata import Kata
from tests.harness.procs import Proc
from tests.harness.pty import PtyProcess
from tests.harness.scenarios import IMAGE_REF, KATA, detached, explain, remove

QBOOT = "/usr/share/qemu/qboot.rom"
MIB = 1024 * 1024


def option(argv: tuple[str, ...] | list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def exec_out(kata: Kata, cid: str, exec_id: str, *cmd: str) -> str:
    res = kata.cd.ctr("task", "exec", "--exec-id", exec_id, cid, *cmd, timeout=120)
    assert res.returncode == 0, explain(res)
    return res.stdout


def rwx_mapping_bytes(pid: int) -> int:
    """Total size of a process's writable+executable mappings (TCG's code buffer)."""
    total = 0
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            if perms.startswith("rwx"):
                start, end = (int(x, 16) for x in span.split("-"))
                total += end - start
    return total


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:"))


def one_qemu(kata: Kata) -> Proc:
    (qemu,) = kata.qemu_processes()
    return qemu


def test_qboot_firmware_and_a_bounded_translation_cache(kata: Kata) -> None:
    kata.write_config({"hypervisor.qemu": {"firmware": QBOOT, "tcg_tb_size_mib": 16}})
    with detached(kata.cd, KATA, "lever-fw", "sleep", "120"):
        qemu = one_qemu(kata)
        assert option(qemu.argv, "-bios") == [QBOOT]
        assert option(qemu.argv, "-accel") == ["tcg,tb-size=16"]
        assert "accel=" not in option(qemu.argv, "-machine")[0]
        buffer = rwx_mapping_bytes(qemu.pid)
        assert 8 * MIB < buffer <= 16 * MIB, f"TCG code buffer is {buffer / MIB:.1f} MiB"
        assert exec_out(kata, "lever-fw", "p", "echo", "up") == "up\n"
        (sandbox,) = kata.sandbox_dirs()
        console = (sandbox / "console.log").read_bytes()
        assert b"kata-init" in console, console[-2000:]
        assert b"SeaBIOS" not in console and b"Booting from ROM" not in console


def test_freed_guest_memory_goes_back_to_the_host(kata: Kata) -> None:
    kata.write_config({"hypervisor.qemu": {"reclaim_guest_freed_memory": True,
                                           "default_memory": 1024}})
    with detached(kata.cd, KATA, "lever-fpr", "sleep", "120"):
        qemu = one_qemu(kata)
        balloon = [d for d in option(qemu.argv, "-device") if d.startswith("virtio-balloon-")]
        assert balloon in (["virtio-balloon-pci,id=balloon0,free-page-reporting=on"],
                           ["virtio-balloon-device,id=balloon0,free-page-reporting=on"])
        drivers = exec_out(kata, "lever-fpr", "d", "ls", "/sys/bus/virtio/drivers").split()
        assert "virtio_balloon" in drivers, drivers
        before = status_kib(qemu.pid, "VmRSS")
        exec_out(kata, "lever-fpr", "dd", "dd", "bs=256M", "count=1", "if=/dev/zero",
                 "of=/dev/null")
        peak = status_kib(qemu.pid, "VmHWM")
        assert peak - before > 200 * 1024, f"dd did not touch guest memory: {before}->{peak}"
        deadline, rss = time.monotonic() + 30, peak
        while time.monotonic() < deadline:
            rss = status_kib(qemu.pid, "VmRSS")
            if rss - before < 64 * 1024:
                break
            time.sleep(1)
        assert rss - before < 64 * 1024, (
            f"QEMU RSS {before} KiB idle, peak {peak}, still {rss} KiB 30 s after the free")


def test_crun_at_a_fixed_layout_leaves_the_container_randomised(kata: Kata) -> None:
    """crun runs without address-space randomisation under TCG (QEMU then reuses its
    translated code, ~80 ms per exec here); what it starts gets randomisation back."""
    with detached(kata.cd, KATA, "lever-aslr", "sleep", "120"):
        argv = one_qemu(kata).argv
        tcg = any("tcg" in a for a in option(argv, "-accel") + option(argv, "-machine"))
        assert (CRUN_NO_ASLR_KERNEL_PARAM in option(argv, "-append")[0].split()) is tcg
        # The container's init (its pid 1) and an exec'd process: the default personality,
        # without ADDR_NO_RANDOMIZE (0x0040000), which crun itself ran with.
        assert exec_out(kata, "lever-aslr", "p1", "cat", "/proc/1/personality") == "00000000\n"
        assert exec_out(kata, "lever-aslr", "p2", "cat", "/proc/self/personality") == (
            "00000000\n")
        stacks = {exec_out(kata, "lever-aslr", f"s{i}", "grep", "stack", "/proc/self/maps")
                  for i in range(3)}
        assert len(stacks) == 3, stacks  # each process's stack lands somewhere else


def test_under_tcg_the_guest_kernel_does_not_zero_its_allocations(kata: Kata) -> None:
    """Under TCG the guest kernel boots with `init_on_alloc=0` (emulated zeroing cost an
    exec ~35 % here); under KVM it keeps Debian's default, zeroing on."""
    with detached(kata.cd, KATA, "lever-init", "sleep", "120"):
        argv = one_qemu(kata).argv
        tcg = any("tcg" in a for a in option(argv, "-accel") + option(argv, "-machine"))
        # What the guest kernel booted with, read from inside the container.
        words = exec_out(kata, "lever-init", "c1", "cat", "/proc/cmdline").split()
        settings = [w for w in words if w.startswith("init_on_alloc=")]
        assert settings == (["init_on_alloc=0"] if tcg else []), words


def test_under_tcg_output_in_full_flow_arrives_whole_in_larger_answers(kata: Kata) -> None:
    """Under TCG the guest is told to gather output (agent/streams.py); 4 MiB written a
    few KiB at a time (`yes | head -c`) still reaches ctr whole and in order."""
    size = 4 * MIB
    with detached(kata.cd, KATA, "lever-gather", "sleep", "120"):
        argv = one_qemu(kata).argv
        tcg = any("tcg" in a for a in option(argv, "-accel") + option(argv, "-machine"))
        assert (GATHER_OUTPUT_KERNEL_PARAM in option(argv, "-append")[0].split()) is tcg
        pattern = "0123456789abcdef"
        out = exec_out(kata, "lever-gather", "g1", "sh", "-c",
                       f"yes {pattern} | head -c {size}")
        assert len(out) == size
        *lines, last = out.split("\n")
        assert all(line == pattern for line in lines), "output out of order or mangled"
        assert pattern.startswith(last)


def test_under_tcg_the_guest_scheduler_preempts_on_wakeup_less_eagerly(kata: Kata) -> None:
    """agent/init.py `tune_wakeups`: the guest kernel's wake-up granularity, read by a
    privileged container through debugfs of its own, is 4 ms under TCG (the kernel's own
    under KVM), and stays so when a vCPU comes online again (the kernel recomputes it
    then); 256 KiB of lines through a tty still arrive whole, each with its CR."""
    kata.write_config({"hypervisor.qemu": {"default_vcpus": 2}})
    res = kata.cd.ctr("run", "-d", "--privileged", "--runtime", KATA, IMAGE_REF,
                      "lever-sched", "sleep", "120", timeout=120)
    assert res.returncode == 0, explain(res)
    try:
        argv = one_qemu(kata).argv
        tcg = any("tcg" in a for a in option(argv, "-accel") + option(argv, "-machine"))
        assert (SCHED_THROUGHPUT_KERNEL_PARAM in option(argv, "-append")[0].split()) is tcg
        knob = "/sys/kernel/debug/sched/wakeup_granularity_ns"
        cpu1 = "/sys/devices/system/cpu/cpu1/online"
        values = exec_out(kata, "lever-sched", "g1", "sh", "-c",
                          f"mount -t debugfs none /sys/kernel/debug && cat {knob} && "
                          f"echo 0 > {cpu1} && echo 1 > {cpu1} && nproc && cat {knob}").split()
        assert values[1] == "2", values  # both vCPUs online again
        # Under KVM: the kernel's own, 2 ms for two vCPUs.
        assert [int(values[0]) == 4_000_000, int(values[2]) == 4_000_000] == [tcg, tcg], values
        lines = 256 * 1024 // 17
        argv = kata.cd.ctr_argv("task", "exec", "-t", "--exec-id", "t1", "lever-sched",
                                "sh", "-c", f"yes 0123456789abcdef | head -n {lines}")
        with PtyProcess(argv, kata.cd.env) as term:
            assert term.wait(120) == 0, term.output[-500:]
        # The guest's terminal turns each \n into \r\n; ctr's own (our pty, not raw for an
        # exec) adds one more \r on its way here.
        assert term.output == b"0123456789abcdef\r\r\n" * lines
    finally:
        remove(kata.cd, "lever-sched")


def test_under_tcg_qemu_boots_as_a_batch_job_then_serves_normally(kata: Kata) -> None:
    """hostos.procs: a VMM emulating its guest's CPU is exec'd through `chrt --batch 0`, so
    its threads boot under SCHED_BATCH; once the agent serves (`VmmVm.booted`) every thread
    is back under SCHED_OTHER. The shim and virtiofsd never leave it."""
    argv = kata.cd.ctr_argv("run", "-d", "--runtime", KATA, IMAGE_REF, "lever-batch",
                            "sleep", "120")
    run = subprocess.Popen(argv, env=kata.cd.env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    seen: set[int] = set()  # the policies of QEMU's main thread while ctr runs
    try:
        while run.poll() is None:
            for vmm in kata.qemu_processes():
                with contextlib.suppress(OSError):
                    seen.add(os.sched_getscheduler(vmm.pid))
            time.sleep(0.02)
        _, err = run.communicate()
        assert run.returncode == 0, err
        qemu = one_qemu(kata)
        tcg = any("tcg" in a for a in option(qemu.argv, "-accel") + option(qemu.argv, "-machine"))
        assert (os.SCHED_BATCH in seen) is tcg, seen
        threads = [int(t) for t in os.listdir(f"/proc/{qemu.pid}/task")]
        assert len(threads) >= 3, threads  # main loop, vCPU, RCU at least
        assert {os.sched_getscheduler(t) for t in threads} == {os.SCHED_OTHER}
        helpers = procs.matching(["virtiofsd"], scope=[str(kata.cd.dir)])
        others = [p.pid for p in kata.shim_daemons() + helpers if p.pid != qemu.pid]
        assert len(others) >= 2, others  # the shim and virtiofsd
        assert {os.sched_getscheduler(p) for p in others} == {os.SCHED_OTHER}
        assert exec_out(kata, "lever-batch", "b1", "echo", "up") == "up\n"
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        remove(kata.cd, "lever-batch")


def test_under_tcg_no_more_vms_boot_at_once_than_the_host_has_cpus(kata: Kata) -> None:
    """hostos.slots: one pod more than the host has CPUs, started at once. Under TCG a cold
    boot takes a host-wide boot slot before QEMU starts and gives it back once the agent
    serves, so no more QEMUs than CPUs are ever booting (a booting QEMU is the one under
    SCHED_BATCH), the pod that waited says so, and every pod runs."""
    cpus = len(os.sched_getaffinity(0))
    if cpus > 4:
        pytest.skip(f"{cpus + 1} VMs at once under TCG is too many for a test")
    ids = [f"lever-slot{i}" for i in range(cpus + 1)]
    runs = [subprocess.Popen(kata.cd.ctr_argv("run", "-d", "--runtime", KATA, IMAGE_REF, cid,
                                              "sleep", "120"),
                             env=kata.cd.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for cid in ids]  # fmt: skip
    booting_at_once: list[int] = []
    try:
        while any(run.poll() is None for run in runs):
            booting = 0
            for vmm in kata.qemu_processes():
                with contextlib.suppress(OSError):
                    booting += os.sched_getscheduler(vmm.pid) == os.SCHED_BATCH
            booting_at_once.append(booting)
            time.sleep(0.02)
        for run in runs:
            _, err = run.communicate()
            assert run.returncode == 0, err
        if not any("tcg" in " ".join(q.argv) for q in kata.qemu_processes()):
            pytest.skip("the VMs run under KVM: boots are not limited")
        assert max(booting_at_once) == cpus, booting_at_once
        log = kata.cd.log_path.read_text(errors="replace")
        assert "waits for a boot slot" in log and "took a boot slot after" in log, log[-3000:]
        assert len(kata.qemu_processes()) == cpus + 1
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait()
        for cid in ids:
            if cid in kata.cd.containers():
                remove(kata.cd, cid)


def test_device_drivers_load_only_for_the_devices_the_vm_has(kata: Kata) -> None:
    """The agent loads a device's modules only when the VM has that device (each costs
    start-up time under TCG): a `ctr run` pod has no NIC, so no virtio_net; the vsock
    transport is there exactly when the agent's channel is vsock, the balloon driver when
    the VM has a balloon. (A NIC hot-plugged later: tests/e2e/test_vm_template.py.)"""
    with detached(kata.cd, KATA, "lever-mods", "sleep", "120"):
        devices = option(one_qemu(kata).argv, "-device")
        has = {kind: any(kind in d.split(",")[0] for d in devices)
               for kind in ("virtio-net", "vsock", "virtio-balloon")}
        drivers = set(exec_out(kata, "lever-mods", "d", "ls", "/sys/bus/virtio/drivers").split())
        modules = {line.split()[0] for line in
                   exec_out(kata, "lever-mods", "m", "cat", "/proc/modules").splitlines()}
        assert "virtio_console" in drivers and "virtiofs" in modules, (drivers, modules)
        assert not has["virtio-net"], devices
        assert "virtio_net" not in modules and "failover" not in modules, modules
        assert ("vmw_vsock_virtio_transport" in modules) == has["vsock"], (
            devices, modules)
        assert ("virtio_balloon" in modules) == has["virtio-balloon"], (devices, modules)
