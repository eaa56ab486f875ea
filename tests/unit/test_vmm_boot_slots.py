"""VmmVm's boot slots: under TCG a cold boot waits for a host-wide slot (bounded), holds
it until `booted` or stop, and a KVM boot or a restore never waits."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from pathlib import Path

import pytest

from hostos import slots
from hypervisors import vmm
from hypervisors.accel import AccelChoice
from hypervisors.base import VmSpec
from hypervisors.qemu.config import QemuConfig
from hypervisors.qemu.vm import Qemu

CONFIG = QemuConfig(kernel="/k/vmlinuz", initrd="/k/initrd.img", default_memory=512)


def make_vm(tmp_path: Path, accelerator: str = "tcg") -> Qemu:
    vm = Qemu(CONFIG, VmSpec("s1", tmp_path / "s1", boot_slots=tmp_path / "slots"))
    vm._accel = AccelChoice(accelerator, "test")  # type: ignore[arg-type]
    return vm


def takes_none(vm: Qemu, within: float) -> None:
    """`_take_boot_slot` returns within ``within`` seconds holding no slot."""
    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            await asyncio.wait_for(vm._take_boot_slot(stack), within)
            assert vm._boot_slot is None

    asyncio.run(main())


def hold_all(directory: Path) -> list[int]:
    held = []
    while (fd := slots.try_take(directory, slots.host_cpus())) is not None:
        held.append(fd)
    return held


def test_a_cold_tcg_boot_waits_for_a_slot_and_holds_it_until_booted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    vm = make_vm(tmp_path)
    held = hold_all(tmp_path / "slots")
    caplog.set_level(logging.INFO)

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            waiting = asyncio.ensure_future(vm._take_boot_slot(stack))
            await asyncio.sleep(0.3)
            assert not waiting.done()  # every slot is held
            slots.give_back(held.pop())
            await asyncio.wait_for(waiting, 5)
            assert slots.try_take(tmp_path / "slots", slots.host_cpus()) is None  # ours
            vm.booted()
            fd = slots.try_take(tmp_path / "slots", slots.host_cpus())
            assert fd is not None  # given back at `booted`
            held.append(fd)

    asyncio.run(main())
    assert "s1 waits for a boot slot" in caplog.text and "took a boot slot after" in caplog.text
    for fd in held:
        slots.give_back(fd)


def test_a_failed_or_stopped_start_gives_its_slot_back(tmp_path: Path) -> None:
    vm = make_vm(tmp_path)

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            await vm._take_boot_slot(stack)
            assert vm._boot_slot is not None
        # the start's stack unwound (a failed start, or stop)
        assert vm._boot_slot is None

    asyncio.run(main())
    held = hold_all(tmp_path / "slots")
    assert len(held) == slots.host_cpus()
    for fd in held:
        slots.give_back(fd)


def test_the_wait_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(vmm, "TIMEOUTS", dataclasses.replace(vmm.TIMEOUTS, boot_slot=0.2))
    vm = make_vm(tmp_path)
    held = hold_all(tmp_path / "slots")
    takes_none(vm, 5)
    assert "boots without a boot slot: none came free" in caplog.text
    for fd in held:
        slots.give_back(fd)


@pytest.mark.parametrize("case", ["kvm", "restore", "no slots"])
def test_no_slot_is_taken_under_kvm_for_a_restore_or_without_a_directory(
        tmp_path: Path, case: str) -> None:
    vm = make_vm(tmp_path, "kvm" if case == "kvm" else "tcg")
    if case == "restore":
        vm._template = object()  # type: ignore[assignment]
    if case == "no slots":
        vm.spec = dataclasses.replace(vm.spec, boot_slots=None)
    held = hold_all(tmp_path / "slots")
    takes_none(vm, 1)
    for fd in held:
        slots.give_back(fd)
