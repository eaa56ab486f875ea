"""Kata e2e: task events reach containerd in order, the shim logs into containerd's log,
and the `file://` and `binary://` stdio schemes work (real containerd, QEMU, guest, agent).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from tests.harness.containerd import Containerd
from tests.harness.images import IMAGE_REF
from tests.harness.kata import Kata
from tests.harness.procs import wait_until
from tests.harness.scenarios import BOOT_TIMEOUT, KATA, detached, explain, remove, run_detached


def task_events(cd: Containerd, cid: str) -> list[tuple[str, dict[str, object]]]:
    """(topic, payload) of every /tasks/ event about container `cid`, in arrival order."""
    found = []
    for line in cd.events_path.read_text(errors="replace").splitlines():
        head, brace, body = line.partition(" {")
        topic = head.split()[-1] if head.split() else ""
        if not brace or not topic.startswith("/tasks/"):
            continue
        payload = json.loads("{" + body)
        if payload.get("container_id") == cid:
            found.append((topic, payload))
    return found


def test_task_events_arrive_in_order(kata: Kata) -> None:
    cd = kata.cd
    run_detached(cd, KATA, "t1", "sleep", "300")
    res = cd.ctr("task", "exec", "--exec-id", "e1", "t1", "sh", "-c", "exit 3",
                 timeout=BOOT_TIMEOUT)
    assert res.returncode == 3, explain(res)
    remove(cd, "t1")
    wanted = ["/tasks/create", "/tasks/start", "/tasks/exec-added", "/tasks/exec-started",
              "/tasks/exit", "/tasks/exit", "/tasks/delete"]

    def complete() -> bool:
        topics = [t for t, _ in task_events(cd, "t1")]
        return all(topics.count(t) >= wanted.count(t) for t in set(wanted))

    assert wait_until(complete, 15), f"events so far: {task_events(cd, 't1')}"
    events = task_events(cd, "t1")
    keys = [(t, str(p.get("id") or p.get("exec_id") or "")) for t, p in events]

    def at(topic: str, ident: str = "") -> int:
        return keys.index((topic, ident))

    assert at("/tasks/create") < at("/tasks/start") < at("/tasks/exec-added", "e1")
    assert at("/tasks/exec-added", "e1") < at("/tasks/exec-started", "e1")
    assert at("/tasks/exec-started", "e1") < at("/tasks/exit", "e1") < at("/tasks/exit", "t1")
    assert at("/tasks/exit", "t1") < at("/tasks/delete", "t1"), keys
    statuses = {p.get("id"): p.get("exit_status") for t, p in events if t == "/tasks/exit"}
    assert statuses == {"e1": 3, "t1": 137}, events


def test_shim_logs_structured_lines_into_containerd_log(kata: Kata) -> None:
    with detached(kata.cd, KATA, "t1", "sleep", "300"):
        pass
    log = kata.cd.log_path.read_text(errors="replace")
    ours = [line for line in log.splitlines() if "sandbox=t1" in line]
    started = [line for line in ours if 'msg="sandbox started"' in line]
    assert started, f"no 'sandbox started' line from the shim in {kata.cd.log_path}"
    for key in ("hypervisor=qemu", "accelerator=", "vmm_pid=", "guest_kernel=", "boot_seconds="):
        assert key in started[0], started[0]
    assert any("container=t1" in line and 'msg="process started"' in line for line in ours)


def test_file_log_uri_gets_both_streams(kata: Kata, tmp_path: Path) -> None:
    out = tmp_path / "t1.log"
    res = kata.cd.ctr("run", "--rm", "--runtime", KATA, "--log-uri", f"file://{out}",
                      IMAGE_REF, "t1", "sh", "-c", "echo to-out; echo to-err >&2",
                      timeout=BOOT_TIMEOUT)
    assert res.returncode == 0, explain(res)
    assert sorted(out.read_text().split()) == ["to-err", "to-out"]


LOGGER = """#!/bin/sh
# binary:// logger: fd 3 = stdout, fd 4 = stderr, fd 5 = ready pipe (close when ready).
exec 5>&-
cat <&3 >"$2/stdout" &
cat <&4 >"$2/stderr" &
wait
"""


def test_binary_log_uri_runs_the_logger(kata: Kata, tmp_path: Path) -> None:
    logger = tmp_path / "logger.sh"
    logger.write_text(LOGGER)
    logger.chmod(logger.stat().st_mode | stat.S_IXUSR)
    res = kata.cd.ctr("run", "--rm", "--runtime", KATA, "--log-uri",
                      f"binary://{logger}?dir={tmp_path}", IMAGE_REF, "t1",
                      "sh", "-c", "echo to-out; echo to-err >&2", timeout=BOOT_TIMEOUT)
    assert res.returncode == 0, explain(res)
    assert wait_until(lambda: (tmp_path / "stderr").exists()
                      and (tmp_path / "stderr").read_text() == "to-err\n", 10)
    assert (tmp_path / "stdout").read_text() == "to-out\n"
    # The logger is stopped with the task: nothing of it is left running.
    assert wait_until(lambda: not [p for p in os.listdir("/proc") if p.isdigit()
                                   and str(logger) in _cmdline(p)], 10)


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_exec_with_a_tty_of_its_own(kata: Kata) -> None:
    from tests.harness.pty import PtyProcess
    from tests.harness.scenarios import WAIT_FOR_SIZE

    with detached(kata.cd, KATA, "t1", "sleep", "300"):
        argv = kata.cd.ctr_argv("task", "exec", "-t", "--exec-id", "e1", "t1",
                                "sh", "-c", f"tty; {WAIT_FOR_SIZE}; exit 5")
        with PtyProcess(argv, kata.cd.env, rows=33, cols=77) as term:
            term.expect(r"/dev/pts/\d+", timeout=BOOT_TIMEOUT)
            term.expect(r"size=33 77\r", timeout=BOOT_TIMEOUT)
            assert term.wait(BOOT_TIMEOUT) == 5, term.output


def test_an_exec_of_a_missing_program_fails_at_once_and_the_pod_goes_on(kata: Kata) -> None:
    """`ctr task exec` of a program the image lacks reports crun's error instead of
    hanging (containerd's Go client waits for EOF on its fifos before it reports a failed
    start). With and without a tty; the container still runs afterwards."""
    from tests.harness.pty import PtyProcess

    with detached(kata.cd, KATA, "t1", "sleep", "300"):
        res = kata.cd.ctr("task", "exec", "--exec-id", "e1", "t1", "/no/such", timeout=60)
        assert res.returncode != 0, explain(res)
        assert "/no/such" in res.stderr and "not found" in res.stderr, explain(res)
        argv = kata.cd.ctr_argv("task", "exec", "-t", "--exec-id", "e2", "t1", "/no/such/tty")
        with PtyProcess(argv, kata.cd.env, rows=24, cols=80) as term:
            assert term.wait(60) != 0, term.output
            assert b"/no/such/tty" in term.output, term.output
        res = kata.cd.ctr("task", "exec", "--exec-id", "e1", "t1", "echo", "alive", timeout=60)
        assert (res.returncode, res.stdout) == (0, "alive\n"), explain(res)
