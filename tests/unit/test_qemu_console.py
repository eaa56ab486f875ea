"""The guest console copier: everything arrives, and the files on disk stay bounded."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hypervisors.console import ConsoleLog


async def _feed(console: ConsoleLog, chunks: list[bytes]) -> None:
    await console.start()
    _, writer = await asyncio.open_unix_connection(str(console.socket_path))
    for chunk in chunks:
        writer.write(chunk)
        await writer.drain()
    writer.close()
    await writer.wait_closed()
    for _ in range(100):  # the copy ends when it sees our EOF
        if console._copy is not None and console._copy.done():
            break
        await asyncio.sleep(0.01)
    await console.stop()


def test_console_is_copied_and_socket_removed(tmp_path: Path) -> None:
    console = ConsoleLog(tmp_path / "c.sock", tmp_path / "console.log")
    asyncio.run(_feed(console, [b"Linux version 6.1\n", b"kata-agent: serving\n"]))
    assert (tmp_path / "console.log").read_bytes() == b"Linux version 6.1\nkata-agent: serving\n"
    assert not (tmp_path / "c.sock").exists()


def test_a_flooding_guest_cannot_fill_the_disk(tmp_path: Path) -> None:
    console = ConsoleLog(tmp_path / "c.sock", tmp_path / "console.log", max_bytes=4096)
    chunks = [b"%05d" % i + b"x" * 995 for i in range(100)]  # 100 kB, 1000 bytes each
    asyncio.run(_feed(console, chunks))
    current = (tmp_path / "console.log").read_bytes()
    previous = (tmp_path / "console.log.1").read_bytes()
    assert len(current) <= 4096 and len(previous) <= 4096
    assert current.endswith(chunks[-1])  # the latest output is always kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["console.log", "console.log.1"]


def test_a_flooding_stderr_is_capped_and_its_end_kept(tmp_path: Path) -> None:
    """QEMU's and virtiofsd's stderr: a child writing 3 MiB leaves at most 2 x the cap."""
    from hostos.procs import spawn
    from hypervisors.console import StderrLog

    log_path = tmp_path / "vmm.stderr"
    script = "import sys; sys.stderr.write('x' * (3 << 20) + 'LAST WORDS\\n')"

    async def run() -> int:
        import sys

        proc = await spawn([sys.executable, "-c", script], asyncio.subprocess.PIPE)
        stderr = StderrLog(proc.stderr, log_path, max_bytes=1 << 20)
        code = await proc.wait()
        await stderr.finished(5)
        await stderr.stop()
        return code

    assert asyncio.run(run()) == 0
    rotated = log_path.with_name("vmm.stderr.1")
    assert log_path.stat().st_size <= 1 << 20 and rotated.stat().st_size == 1 << 20
    assert log_path.read_text().endswith("LAST WORDS\n")


async def _wait_for(path: Path, data: bytes) -> bytes:
    for _ in range(200):
        if path.exists() and data in path.read_bytes():
            break
        await asyncio.sleep(0.01)
    return path.read_bytes()


def test_a_console_handed_over_goes_on_in_the_new_owners_log(tmp_path: Path) -> None:
    """The VM cache's daemon detaches a cached VM's console; the pod's shim adopts it."""
    async def main() -> tuple[bytes, bytes, bool]:
        cache = ConsoleLog(tmp_path / "c.sock", tmp_path / "cache.log")
        await cache.start()
        _, vmm = await asyncio.open_unix_connection(str(cache.socket_path))
        vmm.write(b"booted\n")
        await _wait_for(cache.log_path, b"booted\n")
        fd = await cache.detach()
        assert fd is not None
        socket_gone = not cache.socket_path.exists()  # nothing else may connect
        pod = ConsoleLog(tmp_path / "p.sock", tmp_path / "pod.log")
        await pod.adopt(fd)
        vmm.write(b"container output\n")
        got = await _wait_for(pod.log_path, b"container output\n")
        await cache.stop()
        await pod.stop()
        vmm.close()
        return cache.log_path.read_bytes(), got, socket_gone

    cache_log, pod_log, socket_gone = asyncio.run(main())
    assert cache_log == b"booted\n" and pod_log == b"container output\n" and socket_gone


def test_a_console_nobody_connected_to_gives_nothing_away(tmp_path: Path) -> None:
    async def main() -> int | None:
        console = ConsoleLog(tmp_path / "c.sock", tmp_path / "console.log")
        await console.start()
        fd = await console.detach()
        await console.stop()
        return fd

    assert asyncio.run(main()) is None
