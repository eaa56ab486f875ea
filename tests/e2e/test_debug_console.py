"""`kata-runtime exec <sandbox-id>`: a root shell in the guest VM over the debug console
port, only where `[agent.kata] debug_console_enabled = true`; refused otherwise.

The shell is driven through a pty, as an operator's terminal would drive it. That it runs
in the guest and not in the container: its /proc/1/cmdline is the agent's (in the container
it would be `sleep`), and /proc/version names the guest kernel.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

from tests.harness import kataconfig
from tests.harness.containerd import RUNTIME_BIN
from tests.harness.kata import Kata
from tests.harness.pty import PtyProcess
from tests.harness.scenarios import KATA, detached

KATA_RUNTIME = RUNTIME_BIN / "kata-runtime"
#: The console on its virtio-serial port: the agent on serial too, also in a run of the
#: suite that puts it on vsock (the console on vsock: tests/e2e/test_agent_vsock.py).
ENABLED = {"agent.kata": {"debug_console_enabled": True},
           kataconfig.HYPERVISOR: {"use_vsock": False} if kataconfig.is_qemu() else {}}
#: Seconds for a guest shell to answer under TCG (the VM is already up).
ANSWER = 60.0


def _exec_argv(kata: Kata, *args: str) -> list[str]:
    return [str(KATA_RUNTIME), "--config", str(kata.config_path), "exec", *args]


def _console_sockets(kata: Kata) -> list[Path]:
    return sorted((kata.state_dir / "sk").glob("*/debug-console.sock"))


def test_exec_gives_a_root_shell_in_the_guest(kata: Kata) -> None:
    kata.write_config(ENABLED)
    cid = "kdebug"
    with detached(kata.cd, KATA, cid, "sleep", "300"):
        sockets = _console_sockets(kata)
        assert len(sockets) == 1, sockets
        mode = os.stat(sockets[0]).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, oct(mode)
        # The port, and the kernel parameter that has the agent serve it.
        assert any("name=agent.debug_console.0" in p.cmdline
                   and " agent.debug_console " in p.cmdline
                   for p in kata.qemu_processes()), kata.qemu_processes()
        assert "debug console enabled" in kata.cd.log_path.read_text(errors="replace")

        with PtyProcess(_exec_argv(kata, cid), os.environ) as term:
            term.expect(r"type Ctrl-\] to leave", timeout=30)
            term.write("cat /proc/version; echo marker-$((6*7))\r")
            term.expect(r"marker-42", timeout=ANSWER)
            assert f"Linux version {kata.guest_release} ".encode() in term.output
            term.write("tr '\\0' ' ' </proc/1/cmdline; echo; echo pid1-$((1+1))\r")
            pid1 = term.expect(r"\n([^\r\n]*)\r\npid1-2", timeout=ANSWER).group(1)
            assert b"kata-agent" in pid1, term.output
            term.write("exit\r")
            assert term.wait(ANSWER) == 0, term.output
        assert b"debug console closed (the shell exited)" in term.output, term.output

        # A new session gets a new shell; Ctrl-] leaves it.
        with PtyProcess(_exec_argv(kata, "--namespace", kata.cd.namespace, cid),
                        os.environ) as term:
            term.expect(r"type Ctrl-\] to leave", timeout=30)
            term.write("echo again-$((2+3))\r")
            term.expect(r"again-5", timeout=ANSWER)
            term.write("\x1d")
            assert term.wait(30) == 0, term.output
        assert b"debug console closed (Ctrl-] typed)" in term.output, term.output

        # Not a terminal: stdin is sent, then `exit` ends the shell.
        done = subprocess.run(_exec_argv(kata, cid), input="echo piped-$((3*3))\n",
                              capture_output=True, text=True, timeout=ANSWER, check=False)
        assert done.returncode == 0, done
        assert "piped-9" in done.stdout, done


def test_exec_is_refused_when_the_console_is_disabled(kata: Kata) -> None:
    cid = "kplain"
    with detached(kata.cd, KATA, cid, "sleep", "300"):
        assert _console_sockets(kata) == []
        assert not any("debug_console" in p.cmdline for p in kata.qemu_processes())
        done = subprocess.run(_exec_argv(kata, cid), capture_output=True, text=True,
                              timeout=30, stdin=subprocess.DEVNULL, check=False)
        assert done.returncode == 1, done
        assert (f"debug console is disabled for sandbox {cid}: set debug_console_enabled = "
                f"true under [agent.kata] in {kata.config_path} and restart the pod"
                in done.stderr), done.stderr
        assert done.stdout == ""
    done = subprocess.run(_exec_argv(kata, cid), capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 1 and re.search(f"no sandbox {cid} |sandbox {cid} is not running",
                                              done.stderr), done
