"""`kata-vm-holder` (hostos/holder.c, the venv's build): a VMM (here `sleep`) lives as long
as its owner socket is held, by whichever process holds it, and its exit status reaches
that owner."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hostos.holder import PROGRAM, HolderMissing, holder_argv, holder_path
from hostos.procs import start_time

REPO = Path(__file__).resolve().parents[2]


def _start(cmd: list[str], pass_fds: tuple[int, ...] = (), cpu_bound: bool = False,
           preexec: Callable[[], object] | None = None,
           ) -> tuple[subprocess.Popen[bytes], socket.socket, dict[str, int]]:
    ours, theirs = socket.socketpair()
    holder = subprocess.Popen(holder_argv(theirs.fileno(), pass_fds, cpu_bound, cmd),
                              pass_fds=(theirs.fileno(), *pass_fds), cwd=REPO,
                              preexec_fn=preexec)
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


def test_the_exit_status_is_kept_when_the_parent_ignored_sigchld() -> None:
    """An ignored SIGCHLD survives exec; the holder must still see its VMM's status."""
    holder, owner, _hello = _start(["sh", "-c", "sleep 0.3; exit 3"],
                                   preexec=lambda: signal.signal(signal.SIGCHLD, signal.SIG_IGN))
    assert json.loads(owner.recv(4096)) == {"exited": 3}
    assert holder.wait(10) == 0
    owner.close()


def test_the_vmm_holds_no_copy_of_the_owner_socket_and_gets_only_the_passed_fds() -> None:
    """Else the VMM would keep its own VM alive, and inherit what it should not."""
    r, w = os.pipe()
    stray = os.open("/dev/null", os.O_RDONLY)  # inheritable, not passed
    try:
        holder, owner, hello = _start(["sleep", "60"], pass_fds=(r,))
        fds = {int(n): os.readlink(f"/proc/{hello['pid']}/fd/{n}")
               for n in os.listdir(f"/proc/{hello['pid']}/fd")}
        assert fds[0] == fds[1] == "/dev/null"
        assert fds[r].startswith("pipe:") and stray not in fds
        assert not any(target.startswith("socket:") for target in fds.values())
        owner.close()
        assert _gone(hello["pid"]) and holder.wait(10) == 0
    finally:
        for fd in (r, w, stray):
            os.close(fd)


def test_cpu_bound_runs_the_vmm_under_sched_batch() -> None:
    holder, owner, hello = _start(["sleep", "60"], cpu_bound=True)
    assert os.sched_getscheduler(hello["pid"]) == os.SCHED_BATCH
    owner.close()
    assert _gone(hello["pid"]) and holder.wait(10) == 0


def test_a_vmm_that_cannot_be_run_is_reported_without_a_hello() -> None:
    ours, theirs = socket.socketpair()
    holder = subprocess.run(holder_argv(theirs.fileno(), (), False, ["/nonexistent/qemu"]),
                            pass_fds=(theirs.fileno(),), capture_output=True, timeout=10)
    theirs.close()
    assert holder.returncode == 1
    assert b"failed to start /nonexistent/qemu: No such file" in holder.stderr
    ours.settimeout(5)
    assert ours.recv(4096) == b""  # no hello: the owner sees EOF
    ours.close()


@pytest.mark.parametrize("args, message", [
    ([], b"--owner-fd is required"),
    (["--owner-fd", "x", "--", "sleep"], b"--owner-fd takes a file descriptor"),
    (["--owner-fd", "99", "--", "sleep"], b"not an open file descriptor"),
    (["--owner-fd", "0"], b"no VMM command given"),
    (["--owner-fd", "0", "--pass-fd", "-1", "--", "sleep"], b"--pass-fd takes"),
    (["--bogus"], b"unknown argument"),
])
def test_bad_arguments_are_refused(args: list[str], message: bytes) -> None:
    res = subprocess.run([str(holder_path()), *args], capture_output=True, timeout=10,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 2 and message in res.stderr


def test_the_holder_is_the_program_beside_the_interpreter(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    argv = holder_argv(5, (7,), True, ["qemu", "-m", "1"])
    assert argv[0] == str(Path(sys.executable).parent / PROGRAM)
    assert argv[1:] == ["--owner-fd", "5", "--pass-fd", "7", "--cpu-bound", "--", "qemu",
                        "-m", "1"]
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python3"))
    with pytest.raises(HolderMissing, match="make venv"):
        holder_argv(5, (), False, ["qemu"])
