"""agent.storage: a virtio-fs tag that is not there yet is waited for (bounded); nothing else."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from agent.errors import InvalidArgument
from agent.storage import VIRTIOFS_WAIT_SECONDS, StorageRequest, Storages


class FlakyMount:
    """mount(2) that fails with ``err`` for the first ``failures`` calls, then succeeds."""

    def __init__(self, failures: int, err: int = errno.EINVAL) -> None:
        self.failures = failures
        self.err = err
        self.calls: list[tuple[str, str, str]] = []

    def __call__(self, source: str, target: str, fstype: str, flags: int, data: str) -> None:
        self.calls.append((source, target, fstype))
        if len(self.calls) <= self.failures:
            raise OSError(self.err, os.strerror(self.err), source)


def storages(tmp_path: Path, mount: FlakyMount, sleeps: list[float]) -> Storages:
    async def sleep(seconds: float) -> None:  # records instead of sleeping
        sleeps.append(seconds)

    return Storages(str(tmp_path), mount=mount, umount=lambda t, f: None, sleep=sleep)


def share(tmp_path: Path, driver: str = "virtio-fs") -> StorageRequest:
    return StorageRequest(driver, "kataShared", "", (), f"{tmp_path}/shared")


@pytest.mark.parametrize("err", [errno.EINVAL, errno.ENOENT])
def test_a_tag_still_probing_is_mounted_on_the_third_try(tmp_path: Path, err: int) -> None:
    mount, sleeps = FlakyMount(failures=2, err=err), []
    st = storages(tmp_path, mount, sleeps)
    target = asyncio.run(st.add(share(tmp_path)))
    assert target == f"{tmp_path}/shared"
    assert mount.calls == [("kataShared", target, "virtiofs")] * 3
    assert sleeps == [0.05, 0.1]  # short sleeps, growing
    assert st.mounted == [target]


def test_a_tag_that_never_appears_fails_after_about_ten_seconds(tmp_path: Path) -> None:
    mount, sleeps = FlakyMount(failures=1000), []
    st = storages(tmp_path, mount, sleeps)
    with pytest.raises(InvalidArgument) as info:
        asyncio.run(st.add(share(tmp_path)))
    assert sum(sleeps) == pytest.approx(VIRTIOFS_WAIT_SECONDS)
    assert VIRTIOFS_WAIT_SECONDS == 10.0 and max(sleeps) <= 0.5
    assert len(mount.calls) == len(sleeps) + 1  # one last try after the last sleep
    message = str(info.value)
    assert message.startswith(f"mount virtio-fs kataShared on {tmp_path}/shared: ")
    assert "Invalid argument" in message
    assert "still failing after 10.0s: no virtio-fs device with tag 'kataShared' appeared" \
        in message
    assert st.mounted == []


def test_other_errors_fail_at_once(tmp_path: Path) -> None:
    mount, sleeps = FlakyMount(failures=1, err=errno.EPERM), []
    with pytest.raises(InvalidArgument, match="Operation not permitted"):
        asyncio.run(storages(tmp_path, mount, sleeps).add(share(tmp_path)))
    assert len(mount.calls) == 1 and sleeps == []


@pytest.mark.parametrize("driver", ["9p", "local"])
def test_other_drivers_fail_at_once(tmp_path: Path, driver: str) -> None:
    mount, sleeps = FlakyMount(failures=1), []
    with pytest.raises(InvalidArgument) as info:
        asyncio.run(storages(tmp_path, mount, sleeps).add(share(tmp_path, driver)))
    assert len(mount.calls) == 1 and sleeps == []
    assert str(info.value).startswith(f"mount {driver} kataShared on {tmp_path}/shared: [Errno 22]")
    assert "still failing" not in str(info.value)


def test_the_wait_does_not_block_the_event_loop(tmp_path: Path) -> None:
    mount = FlakyMount(failures=3)
    st = Storages(str(tmp_path), mount=mount, umount=lambda t, f: None, virtiofs_wait=2.0)

    async def main() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.ensure_future(ticker())
        await st.add(share(tmp_path))  # real asyncio.sleep: 0.05 + 0.1 + 0.2 s
        task.cancel()
        return ticks

    assert asyncio.run(main()) >= 10
    assert len(mount.calls) == 4
