"""The agent over virtio-vsock through our vhost-user back-end (issue 12), end to end.

This host has no /dev/vhost-vsock, so vsock here is always QEMU's vhost-user-vsock-pci
served by `hypervisors.vsock.backend`; the guest's agent listens on AF_VSOCK port 1024 and
the shim dials the back-end's hybrid socket (``CONNECT 1024``). The whole suite runs over
this channel with ``KATA_TEST_AGENT_CHANNEL=vhost-user`` (`make test-vsock`); `make test`
runs some of test_ctr_run.py's checks over it here (`test_kata_over_vsock`), and what is
specific to it: the device and the process really are there, bulk data both ways, several
streams at once, a port nobody listens on, the back-end's death, and the ``kernel``
back-end's refusal on a host without it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from agent_client.client import AgentClient
from tests.harness import kataconfig, procs, scenarios
from tests.harness.containerd import RUNTIME_BIN
from tests.harness.images import IMAGE_REF
from tests.harness.kata import Kata
from tests.harness.pty import PtyProcess
from tests.harness.scenarios import BOOT_TIMEOUT, KATA, detached, explain, wait_task_status

pytestmark = pytest.mark.skipif(not kataconfig.is_qemu(), reason="QEMU's vsock back-ends")

VHOST_USER = {"hypervisor.qemu": {"vsock_backend": "vhost-user", "use_vsock": True}}
BACKEND = "hypervisors.vsock.backend"
SETTLE = 30.0


def backends(kata: Kata) -> list[procs.Proc]:
    return procs.matching((BACKEND,), scope=[str(kata.cd.dir), str(kata.state_dir)])


def option(argv: tuple[str, ...], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def ppid(pid: int) -> int:
    stat_line = Path(f"/proc/{pid}/stat").read_text()
    return int(stat_line.rsplit(")", 1)[1].split()[1])


def hybrid_socket(kata: Kata) -> Path:
    (backend,) = backends(kata)
    return Path(option(backend.argv, "--name")[0])


def test_the_agent_is_reached_over_vsock_through_the_backend(kata: Kata) -> None:
    kata.write_config(VHOST_USER)
    with detached(kata.cd, KATA, "vs1", "sleep", "300"):
        (qemu,) = kata.qemu_processes()
        devices = option(qemu.argv, "-device")
        assert any(d.startswith(("vhost-user-vsock-pci,", "vhost-user-vsock-device,"))
                   for d in devices), devices  # q35, microvm
        assert not any(d.startswith("virtserialport,chardev=agent") for d in devices), devices
        assert any("memory-backend-memfd" in o and "share=on" in o
                   for o in option(qemu.argv, "-object"))
        (backend,) = backends(kata)
        sock = hybrid_socket(kata)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert ppid(backend.pid) == ppid(qemu.pid)  # both children of the shim
        (sandbox,) = kata.sandbox_dirs()
        console = (sandbox / "console.log").read_text(errors="replace")
        assert "serving on vsock port 1024" in console, console[-2000:]
        # The start-up log says which channel and why (containerd quotes the message).
        assert 'agent channel vsock_backend = \\"vhost-user\\": vsock through our back-end' \
            in kata.cd.log_path.read_text(errors="replace")
        res = kata.cd.ctr("task", "exec", "--exec-id", "e1", "vs1", "echo", "up", timeout=60)
        assert res.returncode == 0 and res.stdout == "up\n", explain(res)


def test_bulk_data_both_ways(kata: Kata) -> None:
    """4 MiB from the container's stdout, 2 MiB into its stdin: every byte arrives."""
    kata.write_config(VHOST_USER)
    res = kata.cd.ctr("run", "--rm", "--runtime", KATA, IMAGE_REF, "vs2", "sh", "-c",
                      "head -c 4194304 /dev/zero | tr '\\0' a", timeout=BOOT_TIMEOUT)
    assert res.returncode == 0, explain(res)[:500]
    assert res.stdout == "a" * 4194304, f"{len(res.stdout)} bytes"
    data = os.urandom(1 << 20).hex()  # 2 MiB of text
    res = kata.cd.ctr("run", "--rm", "--runtime", KATA, IMAGE_REF, "vs3", "md5sum",
                      input=data, timeout=BOOT_TIMEOUT)
    assert res.returncode == 0, explain(res)[:500]
    assert res.stdout.split()[0] == hashlib.md5(data.encode()).hexdigest()


async def _streams(sock: Path) -> list[str]:
    """Three more agent connections at once (each answers Check), and one to a guest port
    nobody listens on (refused: the back-end closes it without ``OK``)."""
    address = f"hvsock://{sock}:1024"
    clients = await asyncio.gather(*(AgentClient.connect(address, 30) for _ in range(3)))
    try:
        await asyncio.gather(*(c.health_check(10) for c in clients))
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    reader, writer = await asyncio.open_unix_connection(str(sock))
    writer.write(b"CONNECT 4321\n")
    refused = await asyncio.wait_for(reader.read(), 20)
    writer.close()
    return ["ok", refused.decode()]


def test_several_streams_at_once_and_a_refused_port(kata: Kata) -> None:
    kata.write_config(VHOST_USER)
    with detached(kata.cd, KATA, "vs4", "sleep", "300"):
        ok, refused = asyncio.run(_streams(hybrid_socket(kata)))
        assert ok == "ok" and refused == "", refused
        res = kata.cd.ctr("task", "exec", "--exec-id", "e1", "vs4", "echo", "still", timeout=60)
        assert res.returncode == 0 and res.stdout == "still\n", explain(res)


def test_killing_the_backend_ends_the_task_and_leaves_nothing(kata: Kata) -> None:
    kata.write_config(VHOST_USER)
    res = kata.cd.ctr("run", "-d", "--runtime", KATA, IMAGE_REF, "vs5", "sleep", "300",
                      timeout=BOOT_TIMEOUT)
    assert res.returncode == 0, explain(res)
    assert wait_task_status(kata.cd, "vs5", ["RUNNING"], timeout=30) == "RUNNING"
    (backend,) = backends(kata)
    os.kill(backend.pid, signal.SIGKILL)
    assert wait_task_status(kata.cd, "vs5", ["STOPPED"], timeout=SETTLE) == "STOPPED"
    assert procs.wait_until(lambda: not kata.qemu_processes(), SETTLE), kata.qemu_processes()
    res = kata.cd.ctr("task", "delete", "vs5", timeout=60)
    assert res.returncode == 0, explain(res)
    res = kata.cd.ctr("container", "delete", "vs5")
    assert res.returncode == 0, explain(res)
    # The kata fixture then checks that no process, socket or state directory is left.


@pytest.mark.parametrize("check", [
    scenarios.check_exec,
    scenarios.check_tty_resize,
    scenarios.check_pause_resume,
], ids=lambda c: c.__name__.removeprefix("check_"))
def test_kata_over_vsock(kata: Kata, check: scenarios.Check) -> None:
    """Some of test_ctr_run.py's checks over this channel in every `make test`
    (`make test-vsock` runs the whole suite over it)."""
    kata.write_config(VHOST_USER)
    check(kata.cd, KATA)


def test_the_debug_console_is_on_its_own_vsock_port(kata: Kata) -> None:
    """With the agent on vsock, ``kata-runtime exec`` reaches the guest shell on vsock port
    1026 through the same back-end: no virtio-serial port is added for it."""
    kata.write_config(VHOST_USER, {"agent.kata": {"debug_console_enabled": True}})
    with detached(kata.cd, KATA, "vs7", "sleep", "300"):
        (qemu,) = kata.qemu_processes()
        assert "virtserialport" not in qemu.cmdline and " agent.debug_console " in qemu.cmdline
        assert not list((kata.state_dir / "sk").glob("*/debug-console.sock"))
        argv = [str(RUNTIME_BIN / "kata-runtime"), "--config", str(kata.config_path), "exec"]
        with PtyProcess([*argv, "vs7"], os.environ) as term:
            term.expect(r"type Ctrl-\] to leave", timeout=30)
            term.write("tr '\\0' ' ' </proc/1/cmdline; echo; echo marker-$((6*7))\r")
            pid1 = term.expect(r"\n([^\r\n]*)\r\nmarker-42", timeout=60).group(1)
            assert b"kata-agent" in pid1, term.output
            term.write("exit\r")
            assert term.wait(60) == 0, term.output
        assert b"debug console closed (the shell exited)" in term.output, term.output
        done = subprocess.run([*argv, "vs7"], input="echo piped-$((3*3))\n",
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0 and "piped-9" in done.stdout, done


def test_the_kernel_backend_is_refused_here_with_the_fix(kata: Kata) -> None:
    if Path("/dev/vhost-vsock").exists():
        pytest.skip("this host has /dev/vhost-vsock")  # the suite's hosts do not
    kata.write_config({"hypervisor.qemu": {"vsock_backend": "kernel"}})
    res = kata.cd.ctr("run", "--rm", "--runtime", KATA, IMAGE_REF, "vs6", "true",
                      timeout=BOOT_TIMEOUT)
    assert res.returncode != 0
    assert "modprobe vhost_vsock" in res.stderr, explain(res)
    subprocess.run(kata.cd.ctr_argv("container", "delete", "vs6"), env=kata.cd.env,
                   capture_output=True, check=False)
