"""Run a command on a pseudo-terminal we own (for `ctr run -t`)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Mapping, Sequence
from types import TracebackType


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class PtyProcess:
    """A child whose stdin/stdout/stderr are the slave side of a fresh pty."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], rows: int = 24,
                 cols: int = 80) -> None:
        self.master, slave = os.openpty()
        set_winsize(slave, rows, cols)
        try:
            self.proc = subprocess.Popen(list(argv), stdin=slave, stdout=slave, stderr=slave,
                                         env=dict(env), start_new_session=True)
        finally:
            os.close(slave)
        self.output = b""

    def __enter__(self) -> PtyProcess:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _read(self, timeout: float) -> bool:
        """Read what is available within `timeout`; False at end of output."""
        ready, _, _ = select.select([self.master], [], [], max(timeout, 0))
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: every slave fd closed
            return False
        self.output += data
        return bool(data)

    def expect(self, pattern: str, timeout: float = 60.0, start: int = 0) -> re.Match[bytes]:
        """Wait until `pattern` (a regex) matches the output after offset `start`."""
        regex = re.compile(pattern.encode())
        deadline = time.monotonic() + timeout
        while not (m := regex.search(self.output, start)):
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(min(left, 0.5)):
                if m := regex.search(self.output, start):
                    return m
                raise AssertionError(f"{pattern!r} not seen on the terminal within "
                                     f"{timeout}s; output: {self.output!r}")
        return m

    def write(self, text: str) -> None:
        os.write(self.master, text.encode())

    def resize(self, rows: int, cols: int) -> None:
        """Change the window size and tell the child, as a terminal emulator would."""
        set_winsize(self.master, rows, cols)
        self.proc.send_signal(signal.SIGWINCH)

    def wait(self, timeout: float = 60.0) -> int:
        """Drain the output until the child exits; return its exit code."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.proc.args!r} did not exit within {timeout}s; "
                                     f"output: {self.output!r}")
            self._read(0.2)
        end = time.monotonic() + 1.0
        while time.monotonic() < end and self._read(0.05):
            pass
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        with contextlib.suppress(OSError):
            os.close(self.master)
