"""The debug console on the host side: `[agent.kata] debug_console_enabled`, the VM's second
virtio-serial port (QEMU q35 and microvm, StratoVirt), the kernel parameter and state the
sandbox layer adds, and `kata-runtime exec` (refusals, the in-band end, the bridge, the
terminal restored). The guest side is test_agent_debugconsole.py; the whole path is
tests/e2e/test_debug_console.py."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import select
import shutil
import socket
import tempfile
import termios
import threading
from pathlib import Path

import pytest

from cli import debug_console as exec_cli
from cli import main as cli
from common.constants import (
    DEBUG_CONSOLE_EXIT,
    DEBUG_CONSOLE_KERNEL_PARAM,
    DEBUG_CONSOLE_PORT_NAME,
)
from hostos.procs import start_time
from hypervisors.accel import AccelChoice
from hypervisors.base import VmSpec
from hypervisors.qemu.args import AgentChannel, VmParams, build_argv
from hypervisors.qemu.config import QemuConfig
from hypervisors.qemu.vm import Qemu
from hypervisors.statepaths import StatePaths
from hypervisors.stratovirt import args as sv_args
from hypervisors.stratovirt.config import StratovirtConfig
from sandbox.config import load_config
from sandbox.errors import InvalidArgumentError
from sandbox.inspect import debug_console_address
from sandbox.state import (
    ProcessRecord,
    SandboxRecord,
    read_record,
    sandbox_path,
    socket_dir_path,
    write_record,
)
from tests.harness.stratovirt_peer import FakeVm, pairs
from tests.unit.fakes import FakeWorld, fake_sandbox

REPO = Path(__file__).resolve().parents[2]
STATE = Path("/run/kata-py/sk/0123")
CONSOLE_SOCK = STATE / "debug-console.sock"
QEMU = QemuConfig(kernel="/k/vmlinuz", initrd="/k/initrd.img")
NO_SUCH_PID = 4_194_305


# -- configuration ------------------------------------------------------------------------

def _config(tmp_path: Path, agent: str) -> Path:
    path = tmp_path / "configuration.toml"
    path.write_text(f"[hypervisor.qemu]\n[agent.kata]\n{agent}\n")
    return path


def test_the_console_is_off_unless_the_configuration_enables_it(tmp_path: Path) -> None:
    assert not load_config(str(_config(tmp_path, ""))).agent.debug_console_enabled
    config = load_config(str(_config(tmp_path, "debug_console_enabled = true")))
    assert config.agent.debug_console_enabled and config.warnings == ()
    with pytest.raises(InvalidArgumentError, match=r"debug_console_enabled .* wrong type"):
        load_config(str(_config(tmp_path, 'debug_console_enabled = "yes"')))
    # Kata 1.x's spelling is not ours: still reported, not honoured.
    config = load_config(str(_config(tmp_path, "debug_console = true")))
    assert not config.agent.debug_console_enabled
    assert any("unknown key agent.kata.debug_console " in w for w in config.warnings)


@pytest.mark.parametrize("name", ["configuration.toml", "configuration-qemu-microvm.toml",
                                  "configuration-stratovirt.toml"])
def test_shipped_configurations_say_it_and_keep_it_off(name: str) -> None:
    text = (REPO / name).read_text()
    assert "\ndebug_console_enabled = false\n" in text
    assert not load_config(str(REPO / name)).agent.debug_console_enabled


# -- QEMU ---------------------------------------------------------------------------------

def _qemu_argv(config: QemuConfig = QEMU, **kw: object) -> list[str]:
    base: dict[str, object] = {"sandbox_id": "sb1", "paths": StatePaths(STATE),
                               "accelerator": "tcg"}
    return build_argv(config, VmParams(**{**base, **kw}))  # type: ignore[arg-type]


PORT = ["-chardev", f"socket,id=debugconsole,path={CONSOLE_SOCK},server=on,wait=off",
        "-device", f"virtserialport,chardev=debugconsole,name={DEBUG_CONSOLE_PORT_NAME}"]


def test_qemu_has_no_console_port_unless_asked() -> None:
    argv = _qemu_argv()
    assert not any("debug" in a for a in argv), argv


def test_qemu_q35_puts_the_port_on_the_agents_virtio_serial_bus() -> None:
    argv = _qemu_argv(debug_console=True)
    agent = argv.index("virtserialport,chardev=agent,name=agent.channel.0")
    assert argv[agent + 1:agent + 5] == PORT
    assert argv.count("virtio-serial-pci,id=serial0") == 1


def test_qemu_microvm_uses_virtio_serial_on_mmio() -> None:
    argv = _qemu_argv(QemuConfig(kernel="/k/vmlinuz", initrd="", machine_type="microvm"),
                      debug_console=True)
    assert argv.count("virtio-serial-device,id=serial0") == 1
    assert not any(a.endswith("-pci") or "-pci," in a for a in argv), argv
    assert " ".join(PORT) in " ".join(argv)


@pytest.mark.parametrize("channel", [AgentChannel.VSOCK, AgentChannel.VHOST_USER_VSOCK])
def test_qemu_with_the_agent_on_vsock_has_no_console_port(channel: AgentChannel) -> None:
    """The agent serves the console on vsock port 1026 then: no virtio-serial at all."""
    argv = _qemu_argv(agent_channel=channel, guest_cid=7, debug_console=True)
    assert not [a for a in argv if "virtio-serial" in a or "virtserialport" in a], argv
    assert argv == _qemu_argv(agent_channel=channel, guest_cid=7)


@pytest.mark.parametrize(("agent", "console"), [
    ("vsock://7:1024", "vsock://7:1026"),
    ("hvsock:///run/x/vsock.sock:1024", "hvsock:///run/x/vsock.sock:1026"),
    ("serial:///run/x/agent.sock", ""),
    ("", ""),
])
def test_the_console_is_beside_a_vsock_agent(agent: str, console: str) -> None:
    assert debug_console_address(agent) == console


def test_the_qemu_driver_passes_the_spec_on(tmp_path: Path) -> None:
    vm = Qemu(QEMU, VmSpec("sb1", tmp_path, kernel_params=(DEBUG_CONSOLE_KERNEL_PARAM,),
                           debug_console=True))
    vm._accel = AccelChoice("tcg", "test")
    argv = vm.build_argv()
    assert argv[argv.index("-append") + 1].endswith(f" {DEBUG_CONSOLE_KERNEL_PARAM}")
    assert f"path={tmp_path}/debug-console.sock" in " ".join(argv)
    assert tmp_path / "debug-console.sock" in vm.paths.sockets()  # removed at stop


# -- StratoVirt ---------------------------------------------------------------------------

def _sv_params(**kw: object) -> sv_args.VmParams:
    return sv_args.VmParams(**{"sandbox_id": "sb1", "paths": StatePaths(STATE), **kw})  # type: ignore[arg-type]


def test_stratovirt_with_the_agent_on_vsock_has_no_console_port(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    config = StratovirtConfig(kernel=str(kernel), initrd="", default_memory=256)
    argv = sv_args.build_argv(config, _sv_params(
        agent_channel=sv_args.AgentChannel.VSOCK, guest_cid=9, debug_console=True))
    FakeVm(pairs(argv[1:])).check()  # StratoVirt's documented grammar
    plain = sv_args.build_argv(config, _sv_params(agent_channel=sv_args.AgentChannel.VSOCK,
                                                  guest_cid=9))
    assert argv == plain and "virtio-serial-device,id=virtio-serial0" not in argv


def test_stratovirt_refuses_a_second_serial_port_with_the_fix() -> None:
    config = StratovirtConfig(kernel="/k/vmlinuz", initrd="")
    with pytest.raises(ValueError, match=r"microvm has one, taken by the agent channel.*"
                                         r"use_vsock = true"):
        sv_args.build_argv(config, _sv_params(debug_console=True))


# -- the sandbox layer --------------------------------------------------------------------

@pytest.mark.parametrize("enabled", [False, True])
def test_the_sandbox_asks_for_the_port_and_the_kernel_parameter(
        tmp_path: Path, enabled: bool, caplog: pytest.LogCaptureFixture) -> None:
    import dataclasses

    from sandbox.types import SandboxSpec

    world = FakeWorld()
    sandbox = fake_sandbox(tmp_path, world)
    sandbox.config = dataclasses.replace(sandbox.config, agent=dataclasses.replace(
        sandbox.config.agent, debug_console_enabled=enabled))
    sandbox._record.debug_console = enabled

    async def main() -> SandboxRecord | None:
        try:
            await sandbox.start(SandboxSpec(hostname="h"))
            return read_record(sandbox.state_path)
        finally:
            await sandbox.stop()

    with caplog.at_level(logging.WARNING):
        record = asyncio.run(main())
    spec = world.vm.spec
    assert spec.debug_console is enabled
    assert (DEBUG_CONSOLE_KERNEL_PARAM in spec.kernel_params) is enabled
    assert record is not None and record.debug_console is enabled
    warned = [r for r in caplog.records if r.getMessage().startswith("debug console enabled")]
    assert len(warned) == (1 if enabled else 0)
    if enabled:
        assert warned[0].levelno == logging.WARNING
        assert warned[0].kv["sandbox"] == "pod"  # type: ignore[attr-defined]


def test_the_record_keeps_the_console_and_the_configuration(tmp_path: Path) -> None:
    world = FakeWorld()
    sandbox = fake_sandbox(tmp_path, world)
    assert sandbox._record.config_path == str(tmp_path / "configuration.toml")
    doc = sandbox._record.to_json()
    assert SandboxRecord.from_json({**doc, "debug_console": True}).debug_console
    assert not SandboxRecord.from_json({**doc, "debug_console": "yes"}).debug_console
    assert not SandboxRecord.from_json({"sandbox_id": "old"}).debug_console


# -- kata-runtime exec --------------------------------------------------------------------

def _sandbox(state: Path, sid: str, ns: str = "default", console: bool = True,
             alive: bool = True, config_path: str = "/etc/kata/configuration.toml") -> None:
    me, mine = os.getpid(), start_time(os.getpid()) or 0
    path = sandbox_path(state, ns, sid)
    path.mkdir(parents=True)
    shim = (me, mine) if alive else (NO_SUCH_PID, 1)
    write_record(path, SandboxRecord(
        sid, namespace=ns, hypervisor="qemu", shim_pid=shim[0], shim_start_time=shim[1],
        processes=[ProcessRecord(*shim, "vmm")], debug_console=console,
        config_path=config_path))


def _cli_config(tmp_path: Path, state: Path | None = None) -> Path:
    path = tmp_path / "configuration.toml"
    path.write_text(f'[hypervisor.qemu]\n[runtime]\nstate_dir = "{state or tmp_path / "state"}"\n')
    return path


def _exec(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli.main(["--config", str(_cli_config(tmp_path)), "exec", *args])
    out, err = capsys.readouterr()
    assert out == ""
    return code, err


def test_exec_needs_a_sandbox_id(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["exec"]) == 2
    assert "sandbox-id" in capsys.readouterr().err


def test_exec_refuses_an_unknown_sandbox(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _exec(tmp_path, capsys, "nope")
    assert code == 1 and "kata-runtime: no sandbox nope under " in err
    _sandbox(tmp_path / "state", "pod", ns="a")
    code, err = _exec(tmp_path, capsys, "--namespace", "b", "pod")
    assert code == 1 and "no sandbox pod in namespace b" in err


def test_exec_refuses_when_the_console_is_disabled(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    _sandbox(tmp_path / "state", "pod", console=False, config_path="/x/configuration.toml")
    code, err = _exec(tmp_path, capsys, "pod")
    assert code == 1
    assert err == ("kata-runtime: debug console is disabled for sandbox pod: set "
                   "debug_console_enabled = true under [agent.kata] in /x/configuration.toml "
                   "and restart the pod\n")


def test_exec_refuses_a_sandbox_that_is_not_running(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    _sandbox(tmp_path / "state", "pod", alive=False)
    code, err = _exec(tmp_path, capsys, "pod")
    assert code == 1 and "kata-runtime: sandbox pod is not running" in err


def test_exec_asks_for_a_namespace_when_the_id_is_in_several(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _sandbox(tmp_path / "state", "pod", ns="a")
    _sandbox(tmp_path / "state", "pod", ns="b")
    code, err = _exec(tmp_path, capsys, "pod")
    assert code == 1 and "exists in namespaces a, b: choose one with --namespace" in err


def test_exec_says_when_the_socket_does_not_answer(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    _sandbox(tmp_path / "state", "pod", ns="a")
    code, err = _exec(tmp_path, capsys, "-n", "a", "pod")
    sock = socket_dir_path(tmp_path / "state", "a", "pod") / "debug-console.sock"
    assert code == 1
    assert f"failed to connect to the debug console of sandbox pod at {sock}" in err


def test_exec_connects_to_the_sandboxs_socket(tmp_path: Path) -> None:
    state = Path(tempfile.mkdtemp(prefix="kdc"))  # short: sun_path holds 107 bytes
    try:
        _sandbox(state, "pod", ns="a")
        path = socket_dir_path(state, "a", "pod") / "debug-console.sock"
        path.parent.mkdir(parents=True)
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(path))
            server.listen(1)
            config = load_config(str(_cli_config(tmp_path, state)))
            with exec_cli.connect(config, "pod", None) as client:
                assert client.getpeername() == str(path)
    finally:
        shutil.rmtree(state)


@pytest.mark.parametrize("chunks", [
    [b"out" + DEBUG_CONSOLE_EXIT + b"junk"],
    [b"out\x1b", DEBUG_CONSOLE_EXIT[1:]],
    [b"o", b"ut" + DEBUG_CONSOLE_EXIT[:5], DEBUG_CONSOLE_EXIT[5:-1], DEBUG_CONSOLE_EXIT[-1:]],
])
def test_the_end_of_a_session_is_found_across_reads(chunks: list[bytes]) -> None:
    scanner = exec_cli.ExitScanner()
    shown, ended = b"", False
    for chunk in chunks:
        part, ended = scanner.feed(chunk)
        shown += part
    assert (shown, ended) == (b"out", True)


def test_output_that_only_looks_like_the_start_of_the_end_is_shown() -> None:
    scanner = exec_cli.ExitScanner()
    assert scanner.feed(b"a\x1b") == (b"a", False)
    assert scanner.feed(b"[0m") == (b"\x1b[0m", False)


def _serve_once(server: socket.socket, reply: bytes, got: list[bytes]) -> None:
    conn, _ = server.accept()
    with conn:
        data = b""
        while not data.endswith(b"exit\n"):
            data += conn.recv(4096)
        got.append(data)
        conn.sendall(reply)
        conn.recv(1)  # until the client leaves


def test_the_bridge_sends_stdin_then_exit_and_stops_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    got: list[bytes] = []
    with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX) as client:
        server.bind(str(path))
        server.listen(1)
        peer = threading.Thread(target=_serve_once, daemon=True, args=(
            server, b"hello\r\n" + DEBUG_CONSOLE_EXIT + b"after", got))
        peer.start()
        client.connect(str(path))
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        os.write(in_w, b"echo x")  # no newline: one comes before the EOF
        os.close(in_w)
        why = exec_cli.Bridge(client, in_r, out_w, escape=False).run()
        os.close(out_w)
        shown = os.read(out_r, 4096)
        for fd in (in_r, out_r):
            os.close(fd)
    peer.join(5)
    assert why == "the shell exited"
    assert got == [b"echo x\nexit\n"] and shown == b"hello\r\n"


def test_ctrl_close_bracket_leaves_and_sends_what_came_before(tmp_path: Path) -> None:
    a, b = socket.socketpair()
    in_r, in_w = os.pipe()
    with a, b:
        os.write(in_w, b"ls\r\x1dnot sent")
        why = exec_cli.Bridge(a, in_r, os.open(os.devnull, os.O_WRONLY), escape=True).run()
        b.settimeout(2)
        assert b.recv(100) == b"ls\r"
    os.close(in_r)
    os.close(in_w)
    assert why == "Ctrl-] typed"


def test_the_terminal_comes_back_whatever_happens() -> None:
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        os.write(master, b"typed ahead\r")
        assert select.select([slave], [], [], 5)[0]  # a whole line, taken in cooked mode
        os.set_blocking(slave, False)  # a flushed line fails the read below, not hangs it
        with pytest.raises(RuntimeError), exec_cli._restored_terminal(slave):
            assert termios.tcgetattr(slave)[3] & termios.ICANON == 0  # raw inside
            assert os.read(slave, 100) == b"typed ahead\n"  # not flushed going raw
            raise RuntimeError("boom")
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_exec_arguments() -> None:
    parser = argparse.ArgumentParser()
    exec_cli.add_arguments(parser)
    args = parser.parse_args(["pod", "--namespace", "k8s.io"])
    assert (args.sandbox_id, args.namespace) == ("pod", "k8s.io")
