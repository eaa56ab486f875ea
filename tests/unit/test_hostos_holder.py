"""`hostos.holder`: a VMM (here `sleep`) lives as long as its owner socket is held, by
whichever process holds it, and its exit status reaches that owner."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from hostos.holder import holder_argv
from hostos.procs import start_time

REPO = Path(__file__).resolve().parents[2]


def _start(cmd: list[str]) -> tuple[subprocess.Popen[bytes], socket.socket, dict[str, int]]:
    ours, theirs = socket.socketpair()
    holder = subprocess.Popen(holder_argv(theirs.fileno(), (), False, cmd),
                              pass_fds=(theirs.fileno(),), cwd=REPO)
    theirs.close()
    ours.settimeout(10)
    hello = json.loads(ours.recv(4096))
    return holder, ours, hello


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if start_time(pid) is None or "Z" in _state(pid):
            return True
        time.sleep(0.02)
    return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_the_owner_learns_the_vmm_and_its_exit_status() -> None:
    holder, owner, hello = _start(["sh", "-c", "sleep 0.3; exit 3"])
    assert hello["start_time"] == start_time(hello["pid"])
    assert json.loads(owner.recv(4096)) == {"exited": 3}
    assert holder.wait(10) == 0
    owner.close()


def test_when_the_last_owner_lets_go_the_vmm_is_killed() -> None:
    holder, owner, hello = _start(["sleep", "60"])
    passed_on = os.dup(owner.fileno())  # as the VM cache hands it to a shim
    owner.close()
    time.sleep(0.3)
    assert start_time(hello["pid"]) is not None  # the other copy still holds it
    os.close(passed_on)
    assert _gone(hello["pid"]) and holder.wait(10) == 0


def test_a_holder_killed_with_sigkill_takes_its_vmm_along() -> None:
    holder, owner, hello = _start(["sleep", "60"])
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    assert _gone(hello["pid"])  # the VMM's parent-death signal
    owner.close()


def test_sigterm_kills_the_vmm_and_the_owner_hears_of_it() -> None:
    holder, owner, hello = _start(["sleep", "60"])
    holder.send_signal(signal.SIGTERM)
    assert json.loads(owner.recv(4096)) == {"exited": -signal.SIGKILL}
    assert holder.wait(10) == 0 and _gone(hello["pid"])
    owner.close()


def test_the_holder_runs_as_python_dash_m() -> None:
    argv = holder_argv(5, (7,), True, ["qemu", "-m", "1"])
    assert argv[:3] == [sys.executable, "-m", "hostos.holder"]
    assert argv[3:] == ["--owner-fd", "5", "--pass-fd", "7", "--cpu-bound", "--", "qemu",
                        "-m", "1"]
