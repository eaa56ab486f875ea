"""logfmt lines, and a log FIFO that never blocks the daemon."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from shim.log import FifoHandler, LogfmtFormatter, kv


def record(msg: str, **fields: object) -> logging.LogRecord:
    rec = logging.LogRecord("shim", logging.INFO, __file__, 1, msg, None, None)
    rec.__dict__.update(kv(**fields))
    return rec


def test_logfmt_line() -> None:
    line = LogfmtFormatter({"sandbox": "pod1"}).format(
        record("container started", container="c1", pid=42, note='say "hi"\n'))
    assert line.startswith("time=") and line.split(" ")[0].endswith("Z")
    assert ' level=info msg="container started" sandbox=pod1 container=c1 pid=42 ' in line
    assert line.endswith('note="say \\"hi\\"\\n"')


def test_fifo_without_reader_drops_lines(tmp_path: Path) -> None:
    fifo = tmp_path / "log"
    os.mkfifo(fifo)
    handler = FifoHandler(fifo)
    handler.setFormatter(LogfmtFormatter())
    handler.emit(record("nobody reads"))
    assert handler.dropped == 1
    handler.close()


def test_fifo_lines_reach_the_reader_and_a_full_pipe_drops(tmp_path: Path) -> None:
    fifo = tmp_path / "log"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # as containerd opens it
    handler = FifoHandler(fifo)
    handler.setFormatter(LogfmtFormatter())
    handler.emit(record("hello", container="c1"))
    assert b'msg=hello container=c1\n' in os.read(reader, 4096)
    for _ in range(2000):  # ~200 KiB: more than a pipe holds
        handler.emit(record("x" * 100))
    assert handler.dropped > 0  # dropped, never blocked
    handler.close()
    os.close(reader)
