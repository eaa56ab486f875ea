"""Runtime-independent checks driven through ctr. Each asserts real behaviour and cleans up
what it created. test_harness_runc.py runs them with io.containerd.runc.v2 (which proves
the checks themselves), test_ctr_run.py with io.containerd.kata.v2."""

from __future__ import annotations

import contextlib
import itertools
import re
import subprocess
import time
from collections.abc import Callable, Iterator

from tests.harness.containerd import Containerd, wait_task_status
from tests.harness.images import IMAGE_REF
from tests.harness.procs import wait_until
from tests.harness.pty import PtyProcess

RUNC = "io.containerd.runc.v2"
KATA = "io.containerd.kata.v2"
Check = Callable[[Containerd, str], None]
BOOT_TIMEOUT = 120.0  # a TCG guest takes several seconds to boot; a hung shim fails


def explain(res: subprocess.CompletedProcess[str]) -> str:
    return (f"`{' '.join(map(str, res.args))}` exited {res.returncode}\n"
            f"stdout: {res.stdout!r}\nstderr: {res.stderr!r}")


def run_rm(cd: Containerd, runtime: str, cid: str, *cmd: str,
           input: str | None = None) -> subprocess.CompletedProcess[str]:
    """`ctr run --rm --runtime R busybox CID CMD...` (stdin: `input` or /dev/null)."""
    return cd.ctr("run", "--rm", "--runtime", runtime, IMAGE_REF, cid, *cmd, input=input,
                  timeout=BOOT_TIMEOUT)


def run_rm_args(cd: Containerd, runtime: str, options: list[str], cid: str,
                *cmd: str) -> subprocess.CompletedProcess[str]:
    """`ctr run --rm --runtime R OPTIONS busybox CID CMD...` (e.g. --mount, --annotation)."""
    return cd.ctr("run", "--rm", "--runtime", runtime, *options, IMAGE_REF, cid, *cmd,
                  timeout=BOOT_TIMEOUT)


def run_detached(cd: Containerd, runtime: str, cid: str, *cmd: str) -> None:
    res = cd.ctr("run", "-d", "--runtime", runtime, IMAGE_REF, cid, *cmd,
                 timeout=BOOT_TIMEOUT)
    assert res.returncode == 0, explain(res)
    status = wait_task_status(cd, cid, ["RUNNING"], timeout=30)
    assert status == "RUNNING", f"task {cid} is {status or 'gone'}, not RUNNING"


def remove(cd: Containerd, cid: str, signal: str = "SIGKILL") -> None:
    """Kill a task (all its processes), wait for it to stop, delete task and container."""
    if cd.tasks().get(cid) == "RUNNING":
        res = cd.ctr("task", "kill", "--all", "-s", signal, cid)
        assert res.returncode == 0, explain(res)
        status = wait_task_status(cd, cid, ["STOPPED"], timeout=30)
        assert status == "STOPPED", f"task {cid} is {status or 'gone'} after kill -s {signal}"
    if cid in cd.tasks():
        res = cd.ctr("task", "delete", cid)
        assert res.returncode == 0, explain(res)
    res = cd.ctr("container", "delete", cid)
    assert res.returncode == 0, explain(res)


@contextlib.contextmanager
def detached(cd: Containerd, runtime: str, cid: str, *cmd: str) -> Iterator[str]:
    """A container running `cmd` for the duration of the block; removed afterwards."""
    run_detached(cd, runtime, cid, *cmd)
    try:
        yield cid
    finally:
        if cid in cd.containers():
            remove(cd, cid)


# -- the checks ---------------------------------------------------------------------------

def check_echo(cd: Containerd, runtime: str) -> None:
    res = run_rm(cd, runtime, "t1", "echo", "hi")
    assert (res.returncode, res.stdout) == (0, "hi\n"), explain(res)


def check_exit_code(cd: Containerd, runtime: str) -> None:
    res = run_rm(cd, runtime, "t1", "sh", "-c", "exit 7")
    assert res.returncode == 7, explain(res)
    res = run_rm(cd, runtime, "t2", "false")
    assert res.returncode == 1, explain(res)


def check_stdout_stderr_apart(cd: Containerd, runtime: str) -> None:
    res = run_rm(cd, runtime, "t1", "sh", "-c", "echo out; echo err >&2")
    assert res.returncode == 0, explain(res)
    assert res.stdout == "out\n", explain(res)
    assert "err" in res.stderr.splitlines(), explain(res)
    assert "out" not in res.stderr, explain(res)


def ctr_piped(cd: Containerd, args: list[str], data: str, ready: Callable[[], bool],
              timeout: float = BOOT_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run ctr with `data` on a stdin pipe, written (and closed) only once `ready()`.

    ctr 1.6 races on stdin: it arms CloseIO only after the task (or exec) is created, and
    an EOF read earlier is dropped, so `echo hi | ctr run ... cat` hangs now and then even
    with runc (here: nearly always). Holding the pipe open until the process runs avoids it.
    """
    proc = cd.ctr_popen(*args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE)
    try:
        wait_until(lambda: proc.poll() is not None or ready(), timeout)
        out, err = proc.communicate(data.encode(), timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"`{' '.join(args)}` did not finish within {timeout}s") from exc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(errors="replace"),
                                       err.decode(errors="replace"))


def run_rm_piped(cd: Containerd, runtime: str, cid: str, data: str,
                 *cmd: str) -> subprocess.CompletedProcess[str]:
    args = ["run", "--rm", "--runtime", runtime, IMAGE_REF, cid, *cmd]
    return ctr_piped(cd, args, data, lambda: cd.tasks().get(cid) == "RUNNING")


def check_stdin(cd: Containerd, runtime: str) -> None:
    res = run_rm_piped(cd, runtime, "t1", "hi\n", "cat")
    assert (res.returncode, res.stdout) == (0, "hi\n"), explain(res)
    big = "0123456789abcdef" * 16384  # 256 KiB: more than any pipe or fifo buffer
    res = run_rm_piped(cd, runtime, "t2", big, "wc", "-c")
    assert res.returncode == 0 and res.stdout.split() == [str(len(big))], explain(res)


# ctr sizes the pty with ResizePty only after Start, so a process that asks at once may
# see 0x0 (busybox `stty size` then prints "stty: standard input", yet exits 0): poll.
WAIT_FOR_SIZE = ('for i in $(seq 100); do s=$(stty size 2>/dev/null); '
                 'case "$s" in [1-9]*" "[1-9]*) break;; esac; sleep 0.1; done; echo "size=$s"')


def check_tty_size(cd: Containerd, runtime: str) -> None:
    argv = cd.ctr_argv("run", "--rm", "-t", "--runtime", runtime, IMAGE_REF, "t1",
                       "sh", "-c", WAIT_FOR_SIZE)
    with PtyProcess(argv, cd.env, rows=40, cols=100) as term:
        term.expect(r"size=40 100\r", timeout=BOOT_TIMEOUT)
        assert term.wait(BOOT_TIMEOUT) == 0, term.output


def check_tty_resize(cd: Containerd, runtime: str) -> None:
    argv = cd.ctr_argv("run", "--rm", "-t", "--runtime", runtime, IMAGE_REF, "t1", "sh")
    with PtyProcess(argv, cd.env, rows=40, cols=100) as term:
        term.expect(r"# $|# \x1b", timeout=BOOT_TIMEOUT)  # the shell's prompt
        _expect_size_eventually(term, "40 100")
        # ctr sends its first Resize and only then listens for SIGWINCH (HandleConsoleResize),
        # so on a loaded host "40 100" can show while a SIGWINCH would still be lost. That
        # is ctr's window, for runc too (CI saw it): send the resize again on each try; the
        # new size must still cross containerd and the shim to show.
        _expect_size_eventually(term, "50 132", before_each=lambda: term.resize(50, 132))
        term.write("exit 0\n")
        assert term.wait(60) == 0, term.output


def _expect_size_eventually(term: PtyProcess, size: str, attempts: int = 20,
                            before_each: Callable[[], None] = lambda: None) -> None:
    """The resize travels ctr -> containerd -> shim asynchronously: ask until it shows
    (a quarter second apart: a loaded host may take seconds). `before_each` runs before
    each question."""
    for attempt in range(attempts):
        if attempt:
            time.sleep(0.25)
        before_each()
        start = len(term.output)
        term.write("stty size\n")
        m = term.expect(r"\n(\d+ \d+)\r*\n", timeout=30, start=start)
        if m.group(1).decode() == size:
            return
    raise AssertionError(f"terminal size never became {size}; output: {term.output!r}")


def check_exec(cd: Containerd, runtime: str) -> None:
    with detached(cd, runtime, "t1", "sleep", "300"):
        res = cd.ctr("task", "exec", "--exec-id", "e1", "t1", "sh", "-c", "exit 3")
        assert res.returncode == 3, explain(res)
        res = cd.ctr("task", "exec", "--exec-id", "e2", "t1", "sh", "-c",
                     "echo from-exec; echo exec-err >&2")
        assert (res.returncode, res.stdout) == (0, "from-exec\n"), explain(res)
        assert "exec-err" in res.stderr, explain(res)
        n = len(task_pids(cd, "t1"))
        res = ctr_piped(cd, ["task", "exec", "--exec-id", "e3", "t1", "cat"], "piped\n",
                        lambda: len(task_pids(cd, "t1")) > n)
        assert (res.returncode, res.stdout) == (0, "piped\n"), explain(res)
        assert cd.tasks().get("t1") == "RUNNING", "the container died during exec"


def task_pids(cd: Containerd, cid: str) -> list[int]:
    res = cd.ctr("task", "ps", cid)
    assert res.returncode == 0, explain(res)
    lines = res.stdout.splitlines()
    assert lines and lines[0].split()[:1] == ["PID"], explain(res)
    return [int(line.split()[0]) for line in lines[1:] if line.split()]


def task_pid(cd: Containerd, cid: str) -> int:
    """The init pid `ctr task ls` shows for `cid`."""
    for line in cd.ctr("task", "ls", check=True).stdout.splitlines()[1:]:
        fields = line.split()
        if fields[:1] == [cid]:
            return int(fields[1])
    raise AssertionError(f"no task {cid}")


def check_ps(cd: Containerd, runtime: str) -> None:
    """`ctr task ps` lists every process of the container, an exec's included."""
    with detached(cd, runtime, "t1", "sh", "-c", "sleep 300 & sleep 301"):
        pids = wait_pids(cd, "t1", 2)
        assert len(pids) >= 2 and all(p > 0 for p in pids), f"ctr task ps t1: {pids}"
        execing = cd.ctr_popen("task", "exec", "--exec-id", "ps-e1", "t1", "sleep", "302",
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with_exec = wait_pids(cd, "t1", 3)
            assert len(with_exec) >= 3, f"ctr task ps t1 with an exec: {with_exec}"
        finally:
            execing.kill()
            execing.wait()


def wait_pids(cd: Containerd, cid: str, n: int, tries: int = 50) -> list[int]:
    """`ctr task ps` until it lists at least `n` processes (the shell forks async)."""
    pids: list[int] = []
    for _ in range(tries):
        pids = task_pids(cd, cid)
        if len(pids) >= n:
            break
        time.sleep(0.2)
    return pids


TRAP_TERM = 'trap "exit 0" TERM; while true; do sleep 1; done'


def check_kill_term(cd: Containerd, runtime: str) -> None:
    run_detached(cd, runtime, "t1", "sh", "-c", TRAP_TERM)
    # Two processes (sh + its first sleep) prove the trap is set: PID 1 of a pid namespace
    # ignores a SIGTERM that arrives before it has a handler (slow guests make that likely).
    assert len(wait_pids(cd, "t1", 2)) >= 2, "the trap loop did not start"
    res = cd.ctr("task", "kill", "t1")  # SIGTERM by default
    assert res.returncode == 0, explain(res)
    status = wait_task_status(cd, "t1", ["STOPPED"], timeout=30)
    assert status == "STOPPED", f"task t1 is {status or 'gone'} 30 s after SIGTERM"
    res = cd.ctr("task", "delete", "t1")
    assert res.returncode == 0, explain(res)
    assert "t1" not in cd.tasks()
    res = cd.ctr("container", "delete", "t1")
    assert res.returncode == 0 and "t1" not in cd.containers(), explain(res)


def check_kill_all(cd: Containerd, runtime: str) -> None:
    run_detached(cd, runtime, "t1", "sh", "-c", "sleep 300 & sleep 301 & wait")
    wait_pids(cd, "t1", 3)
    res = cd.ctr("task", "kill", "--all", "-s", "KILL", "t1")
    assert res.returncode == 0, explain(res)
    status = wait_task_status(cd, "t1", ["STOPPED"], timeout=30)
    assert status == "STOPPED", f"task t1 is {status or 'gone'} 30 s after kill --all"
    assert cd.ctr("task", "delete", "t1").returncode == 0
    assert cd.ctr("container", "delete", "t1").returncode == 0
    assert "t1" not in cd.containers()


def check_missing_command(cd: Containerd, runtime: str) -> None:
    res = run_rm(cd, runtime, "t1", "/no/such/cmd")
    assert res.returncode != 0, explain(res)
    text = res.stderr + res.stdout
    assert re.search(r"no such file|not found|/no/such/cmd", text, re.I), explain(res)


def check_duplicate_id(cd: Containerd, runtime: str) -> None:
    with detached(cd, runtime, "t1", "sleep", "300"):
        res = cd.ctr("run", "-d", "--runtime", runtime, IMAGE_REF, "t1", "sleep", "300",
                     timeout=BOOT_TIMEOUT)
        assert res.returncode != 0, explain(res)
        assert "already exists" in res.stderr, explain(res)
        assert cd.tasks().get("t1") == "RUNNING", "the first t1 stopped"
        assert task_pids(cd, "t1"), "the first t1 has no processes left"


def check_id_reused_at_once(cd: Containerd, runtime: str) -> None:
    """A removed container's id runs again at once (`ctr rm x; ctr run x`): containerd
    starts the next shim of that id, on the same socket path, while the last one exits."""
    run_detached(cd, runtime, "t1", "sleep", "300")
    remove(cd, "t1")
    with detached(cd, runtime, "t1", "sleep", "300"):
        assert cd.tasks().get("t1") == "RUNNING"
    res = run_rm(cd, runtime, "t1", "echo", "again")
    assert (res.returncode, res.stdout.strip()) == (0, "again"), explain(res)


PROGRESS = "while :; do date +%s >> /tmp/ticks; sleep 0.2; done"


def _ticks(cd: Containerd, cid: str, exec_id: str) -> list[int]:
    res = cd.ctr("task", "exec", "--exec-id", exec_id, cid, "cat", "/tmp/ticks")
    assert res.returncode == 0, explain(res)
    return [int(t) for t in res.stdout.split()]


def check_pause_resume(cd: Containerd, runtime: str) -> None:
    """Pause freezes the container (no progress, PAUSED, /tasks/paused), Resume thaws it.
    The container's own clock shows it: while running it writes a time every 0.2 s, so a
    gap of 3 s or more between two of them is the pause."""
    with detached(cd, runtime, "t1", "sh", "-c", PROGRESS):
        time.sleep(1.5)
        res = cd.ctr("task", "pause", "t1")
        assert res.returncode == 0, explain(res)
        assert cd.tasks().get("t1") == "PAUSED", cd.tasks()
        time.sleep(5)
        res = cd.ctr("task", "resume", "t1")
        assert res.returncode == 0, explain(res)
        assert cd.tasks().get("t1") == "RUNNING", cd.tasks()
        time.sleep(2)
        ticks = _ticks(cd, "t1", "read")
        gaps = [(b - a, i) for i, (a, b) in enumerate(itertools.pairwise(ticks))]
        longest, at = max(gaps)
        assert longest >= 3, f"no pause in the container's progress: {ticks}"
        assert len(ticks) - at > 3, f"no progress after resume: {ticks}"
        topics = cd.events_path.read_text()
        assert "/tasks/paused" in topics and "/tasks/resumed" in topics


def check_metrics(cd: Containerd, runtime: str) -> None:
    """`ctr task metrics` decodes the task's cgroup v2 metrics: CPU and memory in use."""
    with detached(cd, runtime, "t1", "sh", "-c", "while :; do :; done"):
        time.sleep(1)
        res = cd.ctr("task", "metrics", "t1")
        assert res.returncode == 0, explain(res)
        values = dict(line.split(None, 1) for line in res.stdout.splitlines()[1:]
                      if len(line.split()) == 2)
        # cgroup v1 names (runc on a v1 host) or v2 names (the guest is cgroup v2).
        memory = values.get("memory.usage_in_bytes") or values.get("memory.usage")
        cpu = values.get("cpuacct.usage") or values.get("cpu.usage_usec")
        assert memory and int(memory) > 0, res.stdout
        assert cpu and int(cpu) > 0, res.stdout
