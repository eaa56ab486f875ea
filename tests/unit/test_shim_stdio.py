"""containerd IO endpoints with real FIFOs, files and a binary logger."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest

from sandbox.errors import InvalidArgumentError
from shim.stdio import open_stdio

LOGGER = """
import os, sys
out = os.fdopen(3, "rb"); err = os.fdopen(4, "rb")
os.close(5)  # ready
with open(sys.argv[2], "wb") as f:
    f.write(repr(sys.argv[1:]).encode() + b"\\n")
    f.write(f"{os.environ['CONTAINER_ID']} {os.environ['CONTAINER_NAMESPACE']}\\n".encode())
    f.write(out.read() + b"|" + err.read())
"""


def fifos(tmp: Path) -> tuple[str, str, str]:
    names = [str(tmp / n) for n in ("stdin", "stdout", "stderr")]
    for name in names:
        os.mkfifo(name)
    return names[0], names[1], names[2]


def test_fifo_outputs_reach_the_reader_and_end_with_eof(tmp_path: Path) -> None:
    _, stdout, stderr = fifos(tmp_path)

    async def run() -> tuple[bytes, bytes]:
        io = await open_stdio("", stdout, stderr, False, "c1", "default")  # no reader yet
        out_r = os.open(stdout, os.O_RDONLY | os.O_NONBLOCK)
        err_r = os.open(stderr, os.O_RDONLY | os.O_NONBLOCK)
        assert io.stdout is not None and io.stderr is not None
        await io.stdout.write(b"hello")
        await io.stderr.write(b"oops")
        await io.close()
        os.set_blocking(out_r, True)
        os.set_blocking(err_r, True)
        result = os.read(out_r, 100), os.read(err_r, 100)
        assert os.read(out_r, 100) == b""  # EOF: we were the last writer
        os.close(out_r)
        os.close(err_r)
        return result

    assert asyncio.run(run()) == (b"hello", b"oops")


def test_a_departed_reader_causes_no_error(tmp_path: Path) -> None:
    _, stdout, _ = fifos(tmp_path)

    async def run() -> None:
        io = await open_stdio("", stdout, "", False, "c1", "default")
        reader = os.open(stdout, os.O_RDONLY | os.O_NONBLOCK)
        os.close(reader)
        assert io.stdout is not None
        await io.stdout.write(b"nobody listens")
        assert not io.stdout.broken
        await io.close()

    asyncio.run(run())


def test_a_full_pipe_parks_the_writer_without_blocking_the_loop(tmp_path: Path) -> None:
    _, stdout, _ = fifos(tmp_path)

    async def run() -> int:
        io = await open_stdio("", stdout, "", False, "c1", "default")
        reader = os.open(stdout, os.O_RDONLY | os.O_NONBLOCK)
        assert io.stdout is not None
        big = b"x" * (1 << 20)
        writer = asyncio.ensure_future(io.stdout.write(big))
        await asyncio.sleep(0.05)
        assert not writer.done()  # the pipe is full; the loop still runs
        got = 0
        while got < len(big):
            try:
                got += len(os.read(reader, 1 << 16))
            except BlockingIOError:
                await asyncio.sleep(0.001)
        await writer
        await io.close()
        os.close(reader)
        return got

    assert asyncio.run(run()) == 1 << 20


def test_stdin_open_waits_for_the_writer_then_reads_to_eof(tmp_path: Path) -> None:
    stdin, _, _ = fifos(tmp_path)

    async def run() -> list[bytes]:
        io = await open_stdio(stdin, "", "", False, "c1", "default")
        assert io.stdin is not None
        assert io.stdin.try_read() is None  # not opened yet: no premature EOF
        writer = await asyncio.to_thread(os.open, stdin, os.O_WRONLY)
        os.write(writer, b"abc")
        chunks = [await io.stdin.read()]
        os.close(writer)
        chunks.append(await io.stdin.read())
        await io.close()
        return chunks

    assert asyncio.run(run()) == [b"abc", b""]


def test_closing_stdin_never_opened_by_the_client_returns(tmp_path: Path) -> None:
    stdin, _, _ = fifos(tmp_path)

    async def run() -> None:
        io = await open_stdio(stdin, "", "", False, "c1", "default")
        started = time.monotonic()
        await asyncio.wait_for(io.close(), 2)
        assert time.monotonic() - started < 1

    asyncio.run(run())


def test_terminal_has_no_stderr(tmp_path: Path) -> None:
    _, stdout, stderr = fifos(tmp_path)

    async def run() -> None:
        io = await open_stdio("", stdout, stderr, True, "c1", "default")
        assert io.stdout is not None and io.stderr is None
        await io.close()

    asyncio.run(run())


def test_file_uri_appends_both_streams(tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    log.write_bytes(b"old\n")
    uri = f"file://{log}"

    async def run() -> None:
        io = await open_stdio("", uri, uri, False, "c1", "default")
        assert io.stdout is not None and io.stderr is not None
        await io.stdout.write(b"out\n")
        await io.stderr.write(b"err\n")
        await io.close()

    asyncio.run(run())
    assert log.read_bytes() == b"old\nout\nerr\n"


def test_binary_logger_gets_pipes_args_env_and_is_stopped(tmp_path: Path) -> None:
    script = tmp_path / "logger"
    script.write_text(f"#!{sys.executable}\n{LOGGER}")
    script.chmod(0o755)
    record = tmp_path / "record"
    uri = f"binary://{script}?file={record}"

    async def run() -> None:
        io = await open_stdio("", uri, uri, False, "c1", "ns1")
        assert io.logger is not None and io.stdout is not None and io.stderr is not None
        await io.stdout.write(b"to-stdout")
        await io.stderr.write(b"to-stderr")
        await io.close()
        with pytest.raises(ChildProcessError):
            os.waitpid(io.logger.pid, os.WNOHANG)  # reaped

    asyncio.run(run())
    lines = record.read_bytes().split(b"\n")
    assert lines[0] == repr(["file", str(record)]).encode()
    assert lines[1] == b"c1 ns1"
    assert lines[2] == b"to-stdout|to-stderr"


def test_unknown_scheme_is_invalid(tmp_path: Path) -> None:
    async def run() -> None:
        with pytest.raises(InvalidArgumentError, match="unsupported scheme"):
            await open_stdio("", "tcp://x", "", False, "c1", "default")

    asyncio.run(run())


def test_closing_stdin_twice_closes_its_fd_once(tmp_path: Path) -> None:
    stdin, _, _ = fifos(tmp_path)

    async def run() -> None:
        io = await open_stdio(stdin, "", "", False, "c1", "default")
        assert io.stdin is not None
        writer = await asyncio.to_thread(os.open, stdin, os.O_WRONLY)
        os.write(writer, b"x")
        assert await io.stdin.read() == b"x"
        # A later fd may reuse the number: a second close must not touch it.
        await io.stdin.close()
        bystander = os.open(os.devnull, os.O_RDONLY)
        try:
            await io.stdin.close()
            await io.close()
            os.fstat(bystander)  # still open
        finally:
            os.close(bystander)
            os.close(writer)

    asyncio.run(run())
