"""kata-runtime (cli/): check, list, env, version/usage, and the unimplemented commands."""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest

from cli import check as cli_check
from cli import info as cli_info
from cli import main as cli
from common.constants import RUNTIME_VERSION as VERSION
from hostos.procs import start_time
from hypervisors.qemu.checks import check_version
from hypervisors.qemu.config import QemuConfig
from sandbox.config import load_config
from sandbox.state import ProcessRecord, SandboxRecord, sandbox_path, write_record

NO_SUCH_PID = 4_194_305  # above the largest possible pid_max (2**22)


def write_config(tmp_path: Path, **qemu: Any) -> Path:
    """A configuration whose files all exist (a fake QEMU) unless ``qemu`` overrides them."""
    fake_qemu = tmp_path / "qemu-system-x86_64"
    fake_qemu.write_text("#!/bin/sh\necho 'QEMU emulator version 9.9.9'\necho second line\n")
    fake_qemu.chmod(0o755)
    virtiofsd = tmp_path / "virtiofsd"
    virtiofsd.write_text("#!/bin/sh\n")
    virtiofsd.chmod(0o755)
    for name in ("vmlinuz", "initrd.img"):
        (tmp_path / name).write_bytes(b"guest")
    table = {
        "path": str(fake_qemu), "kernel": str(tmp_path / "vmlinuz"),
        "initrd": str(tmp_path / "initrd.img"), "virtio_fs_daemon": str(virtiofsd),
        "accelerator": "tcg", "allow_tcg": True, **qemu,
    }
    lines = ["[hypervisor.qemu]"] + [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    lines += ["[agent.kata]", "dial_timeout = 5", "[runtime]",
              f"state_dir = {json.dumps(str(tmp_path / 'state'))}"]
    path = tmp_path / "configuration.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_check.os, "geteuid", lambda: 0)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- check -----------------------------------------------------------------------------------

def test_check_passes_when_everything_is_there(
        tmp_path: Path, as_root: None, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    code, out, _ = run(capsys, "--config", str(config), "check")
    assert code == 0, out
    assert f"ok    configuration: {config}" in out
    assert "ok    QEMU version: QEMU emulator version 9.9.9\n" in out
    assert "ok    accelerator: tcg (tcg: requested by configuration" in out
    assert "agent channel: /dev/vhost-vsock" in out
    assert "FAIL" not in out


def test_check_refuses_tcg_unless_allowed(
        tmp_path: Path, as_root: None, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--config", str(write_config(tmp_path, allow_tcg=False)), "check")
    assert code == 1
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert fails == ["FAIL  security boundary: guests run under TCG, which QEMU does not treat "
                     "as a security boundary; pods are refused until allow_tcg = true is set "
                     "in [hypervisor.qemu]"], out
    code, out, _ = run(capsys, "--config", str(write_config(tmp_path)), "check")
    assert code == 0 and "warn  security boundary: guests run under TCG" in out


def test_check_names_every_missing_file_and_the_fix(
        tmp_path: Path, as_root: None, capsys: pytest.CaptureFixture[str]) -> None:
    kernel, qemu = tmp_path / "nope" / "vmlinuz", tmp_path / "nope" / "qemu"
    config = write_config(tmp_path, kernel=str(kernel), path=str(qemu))
    code, out, _ = run(capsys, "check", "--config", str(config))  # --config after the command
    assert code == 1
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 2, out
    assert str(kernel) in fails[1] and "make guest" in fails[1]
    assert str(qemu) in fails[0] and "make deps" in fails[0]
    assert "QEMU version" not in out  # not run without a binary
    assert "ok    guest initrd" in out
    assert "2 check(s) failed" in out


def test_check_without_configuration_fails_with_the_fix(
        tmp_path: Path, as_root: None, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "absent.toml"
    code, out, _ = run(capsys, "--config", str(missing), "check")
    assert code == 1
    assert out.startswith(f"FAIL  configuration: failed to read configuration {missing}")
    assert "running as root" in out


def test_check_fails_when_not_root(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli_check.os, "geteuid", lambda: 1000)
    code, out, _ = run(capsys, "--config", str(write_config(tmp_path)), "check")
    assert code == 1
    assert "FAIL  running as root: euid 1000; run as root" in out


def test_check_reports_a_broken_qemu(tmp_path: Path) -> None:
    qemu = tmp_path / "qemu"
    qemu.write_text("#!/bin/sh\necho broken >&2\nexit 3\n")
    qemu.chmod(0o755)
    check = check_version(str(qemu))
    assert not check.ok and "broken" in check.detail


# --- list ------------------------------------------------------------------------------------

def make_state(tmp_path: Path) -> Path:
    state_dir = tmp_path / "state"
    me = os.getpid()
    my_start = start_time(me)
    assert my_start is not None
    live = sandbox_path(state_dir, "default", "live")
    live.mkdir(parents=True)
    write_record(live, SandboxRecord(
        "live", hypervisor="qemu", shim_pid=me, shim_start_time=my_start, accelerator="tcg",
        accelerator_reason="tcg: test",
        guest_kernel_release="6.1.0-test",
        processes=[ProcessRecord(me, my_start, "vmm"), ProcessRecord(me, my_start, "virtiofsd")],
        containers=["c1", "c2"]))
    stale = sandbox_path(state_dir, "k8s.io", "stale")
    stale.mkdir(parents=True)
    write_record(stale, SandboxRecord(
        "stale", shim_pid=NO_SUCH_PID, accelerator="kvm",
        processes=[ProcessRecord(me, my_start + 1, "vmm"),
                   ProcessRecord(NO_SUCH_PID, 1, "virtiofsd")]))
    # Written by the walking skeleton: no version, no hypervisor, the VMM's role is "qemu".
    legacy = state_dir / "sbs" / "legacy"  # before namespaces: sbs/<id>
    legacy.mkdir()
    (legacy / "state.json").write_text(json.dumps({
        "sandbox_id": "legacy", "shim_pid": NO_SUCH_PID, "shim_start_time": 1,
        "accelerator": "tcg", "accelerator_reason": "", "guest_kernel_release": "6.1",
        "processes": [{"pid": me, "start_time": my_start, "role": "qemu"}],
        "containers": ["legacy"]}))
    (sandbox_path(state_dir, "default", "partial")).mkdir()
    (sandbox_path(state_dir, "default", "unreadable") / "state.json").mkdir(parents=True)
    (sandbox_path(state_dir, "default", "garbage")).mkdir()
    (sandbox_path(state_dir, "default", "garbage") / "state.json").write_text("{not json")
    return state_dir


def test_list_json_reports_liveness_and_broken_dirs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_state(tmp_path)
    code, out, _ = run(capsys, "--config", str(write_config(tmp_path)), "list", "--json")
    assert code == 0
    entries = {e["id"]: e for e in json.loads(out)}
    assert sorted(entries) == ["garbage", "legacy", "live", "partial", "stale", "unreadable"]
    live = entries["live"]
    assert live["problem"] == ""
    assert live["shim"] == {"pid": os.getpid(), "state": "alive"}
    assert live["vmm"]["state"] == "alive" and live["vmm"]["pid"] == os.getpid()
    assert live["hypervisor"] == "qemu"
    assert [p["state"] for p in live["processes"]] == ["alive", "alive"]
    assert (live["accelerator"], live["guest_kernel"]) == ("tcg", "6.1.0-test")
    assert live["containers"] == ["c1", "c2"]
    stale = entries["stale"]
    assert stale["shim"]["state"] == "dead"
    assert stale["vmm"]["state"] == "pid reused"  # same pid, other start time
    assert stale["processes"][1]["state"] == "dead"
    assert [(e["namespace"], e["id"]) for e in json.loads(out)][:2] == [("", "legacy"),
                                                                         ("default", "garbage")]
    assert (live["namespace"], entries["stale"]["namespace"]) == ("default", "k8s.io")
    legacy = entries["legacy"]
    assert (legacy["hypervisor"], legacy["vmm"]["state"]) == ("qemu", "alive")
    assert legacy["problem"] == ""
    assert entries["partial"]["problem"].startswith("partial: no state.json")
    assert entries["unreadable"]["problem"].startswith("unreadable:")
    assert entries["garbage"]["problem"].startswith("invalid state.json")


def test_list_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_state(tmp_path)
    code, out, _ = run(capsys, "--config", str(write_config(tmp_path)), "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == list(cli_info.COLUMNS)
    live = next(line for line in lines if line.startswith("default    live "))
    assert f"{os.getpid()} alive" in live and "6.1.0-test" in live and "c1,c2" in live
    assert "unreadable:" in next(line for line in lines if " unreadable " in line)


def test_list_without_state_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--config", str(write_config(tmp_path)), "list")
    assert code == 0 and out.startswith("no sandboxes in ")
    code, out, _ = run(capsys, "--config", str(write_config(tmp_path)), "list", "--json")
    assert code == 0 and json.loads(out) == []


def test_list_with_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--config", str(tmp_path / "absent.toml"), "list")
    assert code == 1 and "absent.toml" in err


# --- env -------------------------------------------------------------------------------------

def test_env_json_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path)
    code, out, _ = run(capsys, "--config", str(path), "env", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc == cli_info.env_doc(load_config(str(path)))
    assert doc["meta"]["version"] == VERSION and doc["meta"]["config_path"] == str(path)
    assert set(doc["hypervisor.qemu"]) == {f.name for f in dataclasses.fields(QemuConfig)}
    assert doc["meta"]["warnings"] == []
    assert doc["hypervisor.qemu"]["accelerator"] == "tcg"
    assert doc["agent.kata"]["dial_timeout"] == 5.0
    assert doc["runtime"]["state_dir"] == str(tmp_path / "state")


def test_env_text_is_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path)
    code, out, _ = run(capsys, "--config", str(path), "env")
    assert code == 0
    parsed = tomllib.loads(out)
    doc = cli_info.env_doc(load_config(str(path)))
    assert parsed["hypervisor"]["qemu"] == doc["hypervisor.qemu"]
    assert parsed["agent"]["kata"] == doc["agent.kata"]
    assert parsed["runtime"] == doc["runtime"] and parsed["meta"] == doc["meta"]


# --- version, usage, unimplemented -----------------------------------------------------------

@pytest.mark.parametrize("flag", ["-v", "--version"])
def test_version(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, flag)
    assert (code, out) == (0, f"kata-runtime {VERSION}\n")


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "usage: kata-runtime" in out
    assert all(name in out for name in cli.COMMANDS)


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["list", "--bogus"]])
def test_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert "usage: kata-runtime" in err


@pytest.mark.parametrize("command", ["exec", "metrics"])
def test_unimplemented_commands_fail(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, command, "sandbox-1", "ls")
    assert code == 1 and out == ""
    assert f"failed to run {command}: not implemented yet" in err
