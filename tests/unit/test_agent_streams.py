"""agent.streams: on-demand reads, EOF, pty EIO, close wakes parked readers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty

import pytest

from agent.errors import FailedPrecondition
from agent.streams import StreamReader, StreamWriter
from ttrpc.pipepayload import PipePayload


async def taken(reader: StreamReader, n: int) -> bytes:
    """What ``take`` answers, as bytes: a PipePayload's bulk read from its pipe, then
    released, as the connection does once it has spliced it."""
    got = await reader.take(n)
    if isinstance(got, bytes):
        return got
    try:
        return os.read(got.fd, got.size)
    finally:
        got.release()


def test_pipe_data_then_eof() -> None:
    async def main() -> None:
        r, w = os.pipe()
        reader = StreamReader(r)
        os.write(w, b"early")               # written before anyone reads: kept in the pipe
        assert await reader.read(100) == b"early"
        later = asyncio.ensure_future(reader.read(100))
        await asyncio.sleep(0.01)
        assert not later.done()              # a long poll
        os.write(w, b"late")
        assert await later == b"late"
        os.close(w)
        assert await reader.read(100) == b""
        assert await reader.read(100) == b""  # EOF is sticky
        assert reader.closed

    asyncio.run(main())


def test_close_wakes_parked_reader() -> None:
    async def main() -> None:
        r, w = os.pipe()
        reader = StreamReader(r)
        parked = asyncio.ensure_future(reader.read(10))
        await asyncio.sleep(0.01)
        reader.close_now()
        assert await asyncio.wait_for(parked, 1) == b""
        os.close(w)

    asyncio.run(main())


def test_close_between_wake_up_and_resume_leaves_no_registration() -> None:
    """A reader woken (its fd readable) but not yet resumed when the fd is closed: the loop
    must not keep the fd's number registered, or the next fd given that number cannot be
    waited on (epoll forgot the closed one: asyncio's MOD fails with ENOENT)."""
    async def main() -> None:
        r, w = os.pipe()
        reader = StreamReader(r)
        parked = asyncio.ensure_future(reader.read(10))
        await asyncio.sleep(0.01)
        assert reader._ready is not None
        reader._ready.set_result(None)  # what the loop's readiness callback does
        reader.close_now()              # before the parked task is back
        os.close(w)
        assert await asyncio.wait_for(parked, 1) == b""
        r2, w2 = os.pipe()             # the lowest free numbers: r's again
        assert r2 == r
        again = StreamReader(r2)
        later = asyncio.ensure_future(again.read(10))
        await asyncio.sleep(0.01)
        os.write(w2, b"ok")
        assert await asyncio.wait_for(later, 1) == b"ok"
        again.close_now()
        os.close(w2)

    asyncio.run(main())


def test_writer_blocks_until_drained_then_closes() -> None:
    async def main() -> None:
        r, w = os.pipe()
        os.set_blocking(r, False)            # the test drains it between loop iterations
        writer = StreamWriter(w)
        big = b"x" * (1 << 20)               # far more than a pipe buffer
        writing = asyncio.ensure_future(writer.write(big))
        got = b""
        while len(got) < len(big):
            await asyncio.sleep(0)
            with contextlib.suppress(BlockingIOError):
                got += os.read(r, 1 << 16)
        assert await writing == len(big)
        await writer.close()
        assert os.read(r, 10) == b""         # EOF reached the reader
        with pytest.raises(FailedPrecondition):
            await writer.write(b"more")
        os.close(r)

    asyncio.run(main())


def test_broken_pipe_is_failed_precondition() -> None:
    async def main() -> None:
        r, w = os.pipe()
        os.close(r)
        with pytest.raises(FailedPrecondition):
            await StreamWriter(w).write(b"x")

    asyncio.run(main())


def test_pty_hangup_is_eof() -> None:
    async def main() -> None:
        master, slave = pty.openpty()
        reader = StreamReader(master)
        os.write(slave, b"hi\n")
        assert b"hi" in await reader.read(100)
        os.close(slave)                      # the process side hung up: EIO on the master
        assert await reader.read(100) == b""

    asyncio.run(main())



def test_output_in_full_flow_is_gathered_into_one_answer() -> None:
    """A gathering reader whose first read finds GATHER_FROM bytes or more waits GATHER_FOR
    and adds what came meanwhile, up to the request's size."""
    from agent import streams

    async def main() -> None:
        r, w = os.pipe()
        reader = StreamReader(r, gather=True)
        loop = asyncio.get_running_loop()
        os.write(w, b"a" * streams.GATHER_FROM)
        loop.call_later(streams.GATHER_FOR / 4, os.write, w, b"b" * 100)
        assert await taken(reader, 1 << 20) == b"a" * streams.GATHER_FROM + b"b" * 100
        # The request's size is the limit: the rest waits for the next read.
        os.write(w, b"c" * (streams.GATHER_FROM + 10))
        assert await taken(reader, streams.GATHER_FROM + 5) == b"c" * (streams.GATHER_FROM + 5)
        assert await taken(reader, 100) == b"c" * 5
        os.close(w)
        assert await taken(reader, 100) == b""

    asyncio.run(main())


def test_a_trickle_is_answered_at_once_and_gathering_keeps_the_end_of_stream() -> None:
    from agent import streams

    async def main() -> None:
        r, w = os.pipe()
        reader = StreamReader(r, gather=True)
        os.write(w, b"small")
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await taken(reader, 1 << 20) == b"small"
        assert loop.time() - start < streams.GATHER_FOR  # no gathering for a trickle
        os.write(w, b"x" * streams.GATHER_FROM)
        os.close(w)  # end of stream while gathering: the data first, then b""
        assert await taken(reader, 1 << 20) == b"x" * streams.GATHER_FROM
        assert await taken(reader, 1 << 20) == b""
        assert reader.closed

    asyncio.run(main())


def test_a_reader_that_does_not_gather_answers_at_once() -> None:
    from agent import streams

    async def main() -> None:
        r, w = os.pipe()
        reader = StreamReader(r)
        loop = asyncio.get_running_loop()
        os.write(w, b"a" * streams.GATHER_FROM)
        loop.call_later(streams.GATHER_FOR / 4, os.write, w, b"b" * 100)
        assert await taken(reader, 1 << 20) == b"a" * streams.GATHER_FROM
        assert await taken(reader, 1 << 20) == b"b" * 100
        reader.close_now()
        os.close(w)

    asyncio.run(main())


def test_take_from_a_pipe_leaves_the_bytes_in_it_and_holds_the_reader() -> None:
    async def main() -> None:
        r, w = os.pipe()
        reader = StreamReader(r)
        os.write(w, b"0123456789")
        first = await reader.take(4)
        assert isinstance(first, PipePayload)
        assert first.size == 4 and first.head == b""
        second = asyncio.ensure_future(reader.take(100))
        await asyncio.sleep(0.01)
        assert not second.done()  # nobody else reads until the first is released
        assert os.read(first.fd, first.size) == b"0123"
        first.release()
        rest = await second
        assert isinstance(rest, PipePayload) and rest.size == 6
        assert os.read(rest.fd, rest.size) == b"456789"
        rest.release()
        os.close(w)
        assert await reader.take(100) == b""
        assert await reader.take(100) == b""  # end of stream is sticky, and unlocked
        assert reader.closed

    asyncio.run(main())


def test_a_held_payload_survives_the_reader_being_closed() -> None:
    """RemoveContainer closes the ends while an answer is on its way: its bytes stay
    readable through the payload's own fd until it is released."""
    async def main() -> None:
        r, w = os.pipe()
        reader = StreamReader(r)
        os.write(w, b"late words")
        held = await reader.take(100)
        assert isinstance(held, PipePayload)
        reader.close_now()
        assert os.read(held.fd, held.size) == b"late words"
        held.release()
        assert await reader.take(100) == b""
        os.close(w)

    asyncio.run(main())


def test_take_from_a_pty_reads() -> None:
    async def main() -> None:
        master, slave = pty.openpty()
        reader = StreamReader(master)
        assert not reader.is_pipe
        os.write(slave, b"tty\n")
        assert await reader.take(100) == b"tty\r\n"
        reader.close_now()
        os.close(slave)

    asyncio.run(main())


def test_a_cancelled_gathering_take_releases_the_reader() -> None:
    from agent import streams

    async def main() -> None:
        r, w = os.pipe()
        reader = StreamReader(r, gather=True)
        os.write(w, b"g" * streams.GATHER_FROM)
        gathering = asyncio.ensure_future(reader.take(1 << 20))
        await asyncio.sleep(streams.GATHER_FOR / 4)
        gathering.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gathering
        assert await taken(reader, 1 << 20) == b"g" * streams.GATHER_FROM
        reader.close_now()
        os.close(w)

    asyncio.run(main())


def test_fionread_is_termios_s() -> None:
    import termios

    from agent import streams
    assert streams.FIONREAD == termios.FIONREAD
