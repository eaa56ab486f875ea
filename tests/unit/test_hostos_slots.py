"""hostos/slots.py: host-wide slots held by flock, freed with their holder."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hostos import slots

ROOT = Path(__file__).resolve().parents[2]


def test_no_more_holders_than_slots_and_a_given_back_slot_is_free(tmp_path: Path) -> None:
    directory = tmp_path / "boot-slots"
    first, second = slots.try_take(directory, 2), slots.try_take(directory, 2)
    assert first is not None and second is not None
    assert slots.try_take(directory, 2) is None
    slots.give_back(first)
    third = slots.try_take(directory, 2)
    assert third is not None and slots.try_take(directory, 2) is None
    for fd in (second, third):
        slots.give_back(fd)
    slots.give_back(third)  # twice: harmless


def test_the_slots_are_root_only_and_not_inherited(tmp_path: Path) -> None:
    directory = tmp_path / "boot-slots"
    fd = slots.try_take(directory, 1)
    assert fd is not None
    try:
        assert directory.stat().st_mode & 0o777 == 0o700
        assert (directory / "0").stat().st_mode & 0o777 == 0o600
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        slots.give_back(fd)


def test_a_link_is_never_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "linked").symlink_to(elsewhere)
    with pytest.raises(OSError) as err:
        slots.try_take(tmp_path / "linked", 1)
    assert err.value.errno in (errno.ELOOP, errno.ENOTDIR)
    directory = tmp_path / "boot-slots"
    directory.mkdir(mode=0o700)
    (directory / "0").symlink_to(elsewhere / "target")
    with pytest.raises(OSError) as err:
        slots.try_take(directory, 1)
    assert err.value.errno == errno.ELOOP
    assert not (elsewhere / "target").exists()


def test_a_holder_killed_with_sigkill_frees_its_slot(tmp_path: Path) -> None:
    directory = tmp_path / "boot-slots"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
         "from hostos import slots\n"
         f"assert slots.try_take(Path({str(directory)!r}), 1) is not None\n"
         "print('held', flush=True)\ntime.sleep(60)\n"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert slots.try_take(directory, 1) is None
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    fd = slots.try_take(directory, 1)
    assert fd is not None
    slots.give_back(fd)


def test_host_cpus_follows_the_affinity() -> None:
    assert slots.host_cpus() == len(os.sched_getaffinity(0)) >= 1
