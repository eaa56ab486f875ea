"""agent.debugconsole and agent.main's switch for it: a real shell on a real pty, bridged
to a stand-in for the virtio-serial port (the slave of another pty, in raw mode: its
master plays the host's socket; a hung-up master reads as EIO, the port's EOF)."""

from __future__ import annotations

import asyncio
import os
import re
import tty
from pathlib import Path

from agent import debugconsole
from agent import main as agent_main
from agent.main import kernel_words
from agent.reaper import Reaper
from common.constants import (
    CRUN_NO_ASLR_KERNEL_PARAM,
    DEBUG_CONSOLE_EXIT,
    DEBUG_CONSOLE_KERNEL_PARAM,
    GATHER_OUTPUT_KERNEL_PARAM,
    SCHED_THROUGHPUT_KERNEL_PARAM,
)

ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PS1": "$ ", "HOME": "/"}


def _port() -> tuple[int, int]:
    """(host end, port end) of a raw byte pipe that behaves like the port."""
    host, port = os.openpty()
    tty.setraw(port)
    os.set_blocking(host, False)
    return host, port


async def _read_until(fd: int, marker: bytes, timeout: float = 10.0) -> bytes:
    """Read ``fd`` until ``marker`` (a regex) matches."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    out = b""
    while not re.search(marker, out) and loop.time() < deadline:
        try:
            out += os.read(fd, 4096)
        except BlockingIOError:
            await asyncio.sleep(0.02)
    return out


def test_a_session_runs_a_shell_on_its_own_terminal_and_says_when_it_exits() -> None:
    async def main() -> tuple[bool, bytes]:
        reaper = Reaper()
        reaper.install(asyncio.get_running_loop())
        host, port = _port()
        try:
            # Field 6 of /proc/PID/stat is the session, 7 the controlling terminal.
            os.write(host, b"echo marker-$((6*7)); cut -d' ' -f6,7 /proc/$$/stat; "
                           b"echo pid=$$; exit 3\n")
            ended = await asyncio.wait_for(
                debugconsole.session(reaper, port, ("/bin/sh",), ENV), 20)
            return ended, await _read_until(host, re.escape(DEBUG_CONSOLE_EXIT))
        finally:
            reaper.uninstall()
            os.close(host)
            os.close(port)

    ended, out = asyncio.run(main())
    assert ended, out
    assert b"marker-42" in out and out.endswith(DEBUG_CONSOLE_EXIT), out
    pid = int(re.search(rb"pid=(\d+)", out).group(1))  # type: ignore[union-attr]
    session, ctty = re.search(rb"\n(\d+) (\d+)\r", out).groups()  # type: ignore[union-attr]
    assert int(session) == pid, "the shell leads a session of its own"
    assert int(ctty) != 0, "the pty is the shell's controlling terminal"


def test_the_host_leaving_hangs_the_shell_up() -> None:
    async def main() -> tuple[bool, int, bytes]:
        reaper = Reaper()
        reaper.install(asyncio.get_running_loop())
        host, port = _port()
        try:
            os.write(host, b"echo pid=$$\n")
            task = asyncio.ensure_future(debugconsole.session(reaper, port, ("/bin/sh",), ENV))
            out = await _read_until(host, rb"pid=\d+\r")
            pid = int(re.search(rb"pid=(\d+)", out).group(1))  # type: ignore[union-attr]
            os.close(host)  # the host goes away: the port reads EOF
            ended = await asyncio.wait_for(task, 20)
            return ended, pid, out
        finally:
            reaper.uninstall()
            os.close(port)

    ended, pid, out = asyncio.run(main())
    assert not ended, out
    assert not Path(f"/proc/{pid}").exists(), "the shell was reaped"


def test_the_console_is_only_served_when_the_kernel_asks(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyS0 panic=1 agent.debug_console quiet\n")
    assert DEBUG_CONSOLE_KERNEL_PARAM in kernel_words(str(cmdline))
    cmdline.write_text("console=ttyS0 agent.debug_console_vport=1026 xagent.debug_console\n")
    assert DEBUG_CONSOLE_KERNEL_PARAM not in kernel_words(str(cmdline))
    assert DEBUG_CONSOLE_KERNEL_PARAM not in kernel_words(str(tmp_path / "missing"))
    assert agent_main.DEBUG_CONSOLE_KERNEL_PARAM == DEBUG_CONSOLE_KERNEL_PARAM  # host's name


def test_crun_runs_at_a_fixed_layout_only_when_the_kernel_asks(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyS0 panic=1 agent.crun_no_aslr quiet\n")
    assert CRUN_NO_ASLR_KERNEL_PARAM in kernel_words(str(cmdline))
    cmdline.write_text("console=ttyS0 agent.crun_no_aslr=0 xagent.crun_no_aslr\n")
    assert CRUN_NO_ASLR_KERNEL_PARAM not in kernel_words(str(cmdline))
    assert CRUN_NO_ASLR_KERNEL_PARAM not in kernel_words(str(tmp_path / "missing"))
    assert agent_main.CRUN_NO_ASLR_KERNEL_PARAM == CRUN_NO_ASLR_KERNEL_PARAM  # host's name
    assert agent_main.GATHER_OUTPUT_KERNEL_PARAM == GATHER_OUTPUT_KERNEL_PARAM
    assert agent_main.SCHED_THROUGHPUT_KERNEL_PARAM == SCHED_THROUGHPUT_KERNEL_PARAM
