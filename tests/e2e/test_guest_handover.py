"""The hand-over calls of a VM restored from a template, against the real guest agent.

The real guest image (build/out, `make guest`) boots under QEMU with the runtime's own
command line (build/bootguest.py: virtio-serial agent channel, virtio-fs share); the test
drives its agent with the host's `agent_client.AgentClient`, as the sandbox layer does:

* SetGuestDateTime an hour ahead, read back by `date +%s` run in a container in the guest;
* ReseedRandomDev with 64 host bytes: the guest kernel takes them and reseeds its CRNG;
* a virtio-fs tag that never appears is waited for (bounded), then refused clearly.

Nothing may be left behind: QEMU and virtiofsd are stopped, their temp dir removed.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_client import AgentCallError, AgentClient, StorageSpec
from common.constants import GUEST_SHARED_DIR, SHARED_FS_TAG
from sandbox.oci import spec_for_guest
from tests.e2e.test_guest_boot import ACCEL, BOOT_TIMEOUT, GUEST_DIR, _leftovers, bg
from tests.harness.images import busybox_rootfs
from ttrpc import Code

CRUN = "/usr/bin/crun"
BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "date", "sleep", "cat")
CID = "clock"
HOUR = 3600
SERVING = r"kata-agent: serving on"


def _rootfs(share: Path) -> Path:
    """A busybox rootfs where the guest finds a container's (sandbox.oci.guest_rootfs)."""
    return busybox_rootfs(share / "containers" / CID / "rootfs", APPLETS)


def _spec(workdir: Path) -> dict[str, Any]:
    """crun's default spec, as the guest should run it (`sleep`, no terminal)."""
    subprocess.run([CRUN, "spec"], cwd=workdir, check=True)
    spec: dict[str, Any] = json.loads((workdir / "config.json").read_text())
    (workdir / "config.json").unlink()
    spec["process"].update(args=["sleep", "600"], terminal=False, env=["PATH=/bin"])
    return spec_for_guest(spec, CID)[0]


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[Any]:
    """A booted guest whose agent serves; closed and checked for leftovers afterwards."""
    for path in (bg.QEMU, bg.VIRTIOFSD, CRUN, BUSYBOX):
        assert Path(path).exists(), f"{path} missing (make deps)"
    assert os.geteuid() == 0, "the guest tests need root (virtiofsd)"
    kernel, initrd = GUEST_DIR / "vmlinux", GUEST_DIR / "initrd.img"
    assert kernel.exists() and initrd.exists(), "build the guest first (make guest)"
    share = tmp_path / "share"
    _rootfs(share)
    g = bg.Guest(kernel, initrd, bg.DEFAULT_PARAMS, accel=ACCEL, memory_mib=512,
                 share_dir=share)
    try:
        assert g.wait_for(SERVING, BOOT_TIMEOUT) is not None, \
            f"the agent did not start serving:\n{g.console()}"
        yield g
    finally:
        g.close()
    assert not _leftovers(str(g.tmp)), "QEMU or virtiofsd left behind"
    assert not g.tmp.exists()


async def _connect(g: Any) -> AgentClient:
    return await AgentClient.connect(f"serial://{g.agent_sock}", timeout=60)


async def _guest_date(agent: AgentClient, spec: dict[str, Any], exec_id: str) -> int:
    """`date +%s` in the guest, through an exec in the running container."""
    process = {**spec["process"], "args": ["date", "+%s"]}
    await agent.exec_process(CID, exec_id, process, stdin=False)
    out = b""
    while chunk := await agent.read_stdout(CID, exec_id):
        out += chunk
    assert (await agent.wait_process(CID, exec_id)).status == 0, out
    await agent.remove_process(CID, exec_id)
    return int(out.decode().strip())


def test_set_guest_time_an_hour_ahead_and_reseed(guest: Any, tmp_path: Path) -> None:
    spec = _spec(tmp_path)

    async def main() -> None:
        agent = await _connect(guest)
        try:
            share = StorageSpec("virtio-fs", SHARED_FS_TAG, "virtiofs", GUEST_SHARED_DIR)
            await agent.create_sandbox("handover", "handover", [share])
            await agent.create_container(CID, spec, terminal=False, stdin=False)
            await agent.start_container(CID)

            t0 = time.time()
            before = await _guest_date(agent, spec, "before")
            t1 = time.time()
            # The guest's clock starts from the host's (QEMU's RTC): near the host's.
            assert t0 - 10 <= before <= t1 + 10, (t0, before, t1)

            t2 = time.time()
            await agent.set_guest_time(int(t2) + HOUR, 0)
            after = await _guest_date(agent, spec, "after")
            t3 = time.time()
            assert int(t2) + HOUR <= after <= t3 + HOUR + 2, (t2, after, t3)

            with pytest.raises(AgentCallError) as info:  # validated in the guest
                await agent.set_guest_time(int(t3), 1_000_000)
            assert info.value.code is Code.INVALID_ARGUMENT, info.value

            await agent.reseed_random(os.urandom(64))
            with pytest.raises(AgentCallError) as info:
                await agent.reseed_random(b"x" * 4097)
            assert info.value.code is Code.INVALID_ARGUMENT, info.value

            await agent.remove_container(CID)
            await agent.destroy_sandbox()
        finally:
            await agent.close()

    asyncio.run(main())
    # The real kernel (6.1) took the bytes and reseeded its CRNG: the agent says which.
    assert guest.wait_for(r"kata-agent: random: 64 bytes mixed in, CRNG reseeded", 10) \
        is not None, guest.console()
    assert guest.wait_for(r"kata-agent: clock set: .* step=\+3[56]\d\d\.", 1) is not None, \
        guest.console()


def test_a_virtiofs_tag_that_never_appears_is_refused_after_the_wait(guest: Any) -> None:
    async def main() -> None:
        agent = await _connect(guest)
        try:
            missing = StorageSpec("virtio-fs", "noSuchTag", "virtiofs", GUEST_SHARED_DIR)
            started = time.monotonic()
            with pytest.raises(AgentCallError) as info:
                await agent.create_sandbox("late", "late", [missing])
            took = time.monotonic() - started
            assert info.value.code is Code.INVALID_ARGUMENT, info.value
            # The real kernel says EINVAL for an unknown tag; the agent waited, then gave up.
            assert "[Errno 22]" in info.value.message, info.value  # EINVAL
            assert "no virtio-fs device with tag 'noSuchTag' appeared" in info.value.message
            assert 10 <= took < 40, f"gave up after {took:.1f}s"
            # The agent served the share it does have all the while.
            await agent.health_check(5)
        finally:
            await agent.close()

    asyncio.run(main())
    assert guest.wait_for(r"virtio-fs tag 'noSuchTag' not there yet", 1) is not None
