"""kata-runtime (cli/): check, list, env, version/usage, and the unimplemented commands."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from cli import check as cli_check
from cli import containerd_config
from cli import info as cli_info
from cli import listing as cli_list
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
    assert ("agent channel: serial (/dev/vhost-vsock absent: virtio-serial)" in out
            or "agent channel: kernel (/dev/vhost-vsock present" in out), out
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


def test_check_fails_an_elf_kernel_qemu_cannot_enter(
        tmp_path: Path, as_root: None, capsys: pytest.CaptureFixture[str]) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF\x02\x01" + bytes(58))  # an ELF64 header, no program headers
    code, out, _ = run(capsys, "check", "--config", str(write_config(tmp_path, kernel=str(kernel))))
    assert code == 1
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert fails == [f"FAIL  guest kernel (kernel): hypervisor.qemu.kernel: {kernel} is an ELF "
                     "kernel without a PVH entry note, which QEMU needs; use the kernel's "
                     "bzImage (vmlinuz) or a vmlinux built with CONFIG_PVH=y (`make guest` "
                     f"writes both) (in {tmp_path / 'configuration.toml'})"], out
    assert "ok    guest initrd" in out


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
    assert (live["status"], live["problem"]) == ("running", "")
    assert live["shim"] == {"pid": os.getpid(), "state": "alive"}
    assert live["vmm"]["state"] == "alive" and live["vmm"]["pid"] == os.getpid()
    assert live["hypervisor"] == "qemu"
    assert [p["state"] for p in live["processes"]] == ["alive", "alive"]
    assert (live["accelerator"], live["guest_kernel"]) == ("tcg", "6.1.0-test")
    assert live["containers"] == ["c1", "c2"]
    stale = entries["stale"]
    assert stale["shim"]["state"] == "dead"
    assert (stale["status"], stale["problem"]) == ("stale", f"stale: shim {NO_SUCH_PID} dead")
    assert stale["vmm"]["state"] == "pid reused"  # same pid, other start time
    assert stale["processes"][1]["state"] == "dead"
    assert [(e["namespace"], e["id"]) for e in json.loads(out)][:2] == [("", "legacy"),
                                                                         ("default", "garbage")]
    assert (live["namespace"], entries["stale"]["namespace"]) == ("default", "k8s.io")
    legacy = entries["legacy"]
    assert (legacy["hypervisor"], legacy["vmm"]["state"]) == ("qemu", "alive")
    assert (legacy["status"], legacy["kernel"], legacy["initrd"]) == ("stale", "", "")
    assert entries["partial"]["problem"].startswith("partial: no state.json")
    assert entries["unreadable"]["problem"].startswith("unreadable:")
    assert entries["garbage"]["problem"].startswith("invalid state.json")
    assert {i: entries[i]["status"] for i in ("partial", "unreadable", "garbage")} == {
        "partial": "partial", "unreadable": "invalid", "garbage": "invalid"}


def test_list_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_state(tmp_path)
    code, out, _ = run(capsys, "--config", str(write_config(tmp_path)), "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == list(cli_list.columns(wide=False))
    assert lines[0].split() == ["NAMESPACE", "ID", "STATUS", "CONTAINERS", "SHIM", "VMM",
                                "PROBLEM"]
    live = next(line for line in lines if line.startswith("default    live "))
    assert live.split() == ["default", "live", "running", "2", str(os.getpid()),
                            str(os.getpid()), "-"]
    assert "unreadable:" in next(line for line in lines if " unreadable " in line)
    assert "6.1.0-test" not in out  # the default table stays narrow


def test_list_without_state_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--config", str(write_config(tmp_path)), "list")
    assert code == 0 and out.startswith("no sandboxes in ")
    code, out, _ = run(capsys, "--config", str(write_config(tmp_path)), "list", "--json")
    assert code == 0 and json.loads(out) == []


def test_list_with_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--config", str(tmp_path / "absent.toml"), "list")
    assert code == 1 and "absent.toml" in err


def list_json(capsys: pytest.CaptureFixture[str], config: Path,
              *extra: str) -> list[dict[str, Any]]:
    code, out, _ = run(capsys, "--config", str(config), "list", *extra)
    assert code == 0
    entries: list[dict[str, Any]] = json.loads(out)
    return entries


SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "docs" /
                     "kata-runtime-list.schema.json").read_text())


def test_list_format_json_is_json_alias_and_matches_the_schema(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import jsonschema

    make_state(tmp_path)
    config = write_config(tmp_path)
    entries = list_json(capsys, config, "--format", "json")
    assert entries == list_json(capsys, config, "--json")
    jsonschema.validate(entries, SCHEMA)
    assert {e["status"] for e in entries} == {"running", "stale", "partial", "invalid"}


@pytest.mark.parametrize(("entry", "fault"), [
    ({"status": "bogus"}, "'bogus' is not one of"),
    ({"status": "running", "problem": "x"}, "'' was expected"),
    ({"status": "stale", "problem": ""}, "should be non-empty"),
    ({"status": "running", "vmm": None}, "None is not of type 'object'"),
    ({"status": "running", "kernel": None}, "None is not of type 'string'"),
])
def test_the_schema_rejects_what_list_must_not_print(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], entry: dict[str, Any],
        fault: str) -> None:
    import jsonschema

    make_state(tmp_path)
    live = next(e for e in list_json(capsys, write_config(tmp_path), "--json")
                if e["id"] == "live")
    jsonschema.validate([live], SCHEMA)
    with pytest.raises(jsonschema.ValidationError, match=fault):
        jsonschema.validate([{**live, **entry}], SCHEMA)
    missing = {k: v for k, v in live.items() if k != "initrd"}
    with pytest.raises(jsonschema.ValidationError, match="'initrd' is a required property"):
        jsonschema.validate([missing], SCHEMA)


def test_list_quiet_prints_ids_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_state(tmp_path)
    config = str(write_config(tmp_path))
    code, out, _ = run(capsys, "--config", config, "list", "-q")
    assert code == 0
    assert out.splitlines() == ["legacy", "garbage", "live", "partial", "unreadable", "stale"]
    assert run(capsys, "--config", config, "list", "--quiet", "--all")[1] == out
    (tmp_path / "state" / "sbs").rename(tmp_path / "gone")
    assert run(capsys, "--config", config, "list", "-q") == (0, "", "")


def test_list_all_adds_where_the_vm_came_from(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state_dir = make_state(tmp_path)
    live = sandbox_path(state_dir, "default", "live")
    record = json.loads((live / "state.json").read_text())
    write_record(live, dataclasses.replace(SandboxRecord.from_json(record),
                                           kernel="/k/vmlinuz", initrd="/k/loader.img",
                                           image="/k/rootfs.img"))
    code, out, _ = run(capsys, "--config", str(write_config(tmp_path)), "list", "--all")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAMESPACE", "ID", "STATUS", "CONTAINERS", "SHIM", "VMM",
                                "HYPERVISOR", "ACCEL", "RELEASE", "KERNEL", "INITRD", "IMAGE",
                                "PROBLEM"]
    row = next(line for line in lines if line.startswith("default    live ")).split()
    assert row[2:] == ["running", "2", str(os.getpid()), str(os.getpid()), "qemu", "tcg",
                       "6.1.0-test", "/k/vmlinuz", "/k/loader.img", "/k/rootfs.img", "-"]
    partial = next(line for line in lines if " partial " in line).split()
    assert partial[1:11] == ["partial", "partial"] + ["-"] * 8, partial  # no record: no cells


def test_state_records_without_kernel_and_initrd_still_load(tmp_path: Path) -> None:
    old = {"sandbox_id": "s", "version": 2, "namespace": "n", "hypervisor": "qemu",
           "shim_pid": 1, "processes": [], "containers": ["s"]}
    record = SandboxRecord.from_json(old)
    assert (record.kernel, record.initrd) == ("", "")
    back = SandboxRecord.from_json(dataclasses.replace(record, kernel="/k", initrd="/i").to_json())
    assert (back.kernel, back.initrd, back.containers) == ("/k", "/i", ["s"])


def _entry_for(tmp_path: Path, **record: Any) -> dict[str, Any]:
    from sandbox.inspect import describe_sandbox

    path = sandbox_path(tmp_path, "ns", "sb")
    path.mkdir(parents=True, exist_ok=True)
    write_record(path, SandboxRecord("sb", **record))
    return describe_sandbox(path, "ns")


def test_status_follows_the_shim_and_the_vmm(tmp_path: Path) -> None:
    me = os.getpid()
    mine = start_time(me)
    assert mine is not None
    alive_vmm = [ProcessRecord(me, mine, "vmm")]
    cases = [
        ({"shim_pid": me, "shim_start_time": mine, "processes": alive_vmm}, "running", ""),
        ({"shim_pid": me, "shim_start_time": mine + 1, "processes": alive_vmm}, "stale",
         f"stale: shim {me} pid reused"),
        ({"shim_pid": me, "shim_start_time": mine,
          "processes": [ProcessRecord(NO_SUCH_PID, 5, "vmm")]}, "stale",
         f"stale: VMM {NO_SUCH_PID} dead"),
        ({"shim_pid": me, "shim_start_time": mine}, "partial",
         "partial: no VMM recorded yet (starting or stopping)"),
        ({"shim_pid": 0, "processes": alive_vmm}, "running", ""),  # never named its shim
        ({"shim_pid": NO_SUCH_PID, "processes": []}, "stale", f"stale: shim {NO_SUCH_PID} dead"),
    ]
    for record, status, problem in cases:
        entry = _entry_for(tmp_path, **record)
        assert (entry["status"], entry["problem"]) == (status, problem), record
    other = sandbox_path(tmp_path, "ns", "sb")
    write_record(other, SandboxRecord("another", shim_pid=me, shim_start_time=mine,
                                      processes=alive_vmm))
    from sandbox.inspect import describe_sandbox

    entry = describe_sandbox(other, "ns")
    assert entry["status"] == "invalid" and "names sandbox 'another'" in entry["problem"]


# --- version: kata-runtime version and the shim's -v --------------------------------------

SAMPLE_MANIFEST = """# kata-py guest image (make guest); see build/README.md

[debian packages]  package version sha256(.deb)
linux-image-6.1.0-57-cloud-amd64 6.1.192-3 4fdd
busybox-static 1:1.35.0-4 3d3f

[agent]
entry /src/agent/__main__.py
python 3.11.7
sources_sha256 33ba (43 files)

[outputs]  file bytes sha256
vmlinuz 14190528 1a7a
initrd.img 26977888 8f12
kernel-release 21 f1eb
"""


def guest_dir(tmp_path: Path, manifest: str | None = SAMPLE_MANIFEST) -> Path:
    """What `make guest` leaves: vmlinuz, initrd.img and (unless None) MANIFEST."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("vmlinuz", "initrd.img"):
        (out / name).write_bytes(b"guest")
    if manifest is not None:
        (out / "MANIFEST").write_text(manifest)
    return out


def test_the_manifest_is_summarized() -> None:
    from sandbox.versioninfo import summarize_manifest

    assert summarize_manifest(SAMPLE_MANIFEST) == {
        "kernel_package": "linux-image-6.1.0-57-cloud-amd64 6.1.192-3",
        "agent_python": "3.11.7", "agent_sources_sha256": "33ba (43 files)",
        "vmlinuz": "sha256 1a7a (14190528 bytes)",
        "initrd.img": "sha256 8f12 (26977888 bytes)"}
    assert summarize_manifest("garbage\n[outputs]\nvmlinuz 1\n") == {}


def test_the_manifest_is_found_beside_the_initrd_then_the_kernel(tmp_path: Path) -> None:
    from sandbox.versioninfo import find_manifest

    out = guest_dir(tmp_path)
    elsewhere = tmp_path / "kernels"
    elsewhere.mkdir()
    (elsewhere / "vmlinuz.container").symlink_to(out / "vmlinuz")
    manifest = out / "MANIFEST"
    assert find_manifest(str(elsewhere / "k"), str(out / "initrd.img")) == manifest
    assert find_manifest(str(out / "vmlinuz"), "") == manifest
    assert find_manifest(str(elsewhere / "vmlinuz.container"), "") == manifest  # via the link
    assert find_manifest(str(elsewhere / "k"), "") is None


def test_format_version_keeps_the_shape_of_containerds_shims() -> None:
    from sandbox.versioninfo import format_version

    doc = {"version": "1.2.3", "commit": "abc-dirty", "python": "3.11.7",
           "guest_image": {"manifest": "/g/MANIFEST", "sha256": "ff",
                           "facts": {"kernel_package": "linux-image-x 1", "vmlinuz": "sha256 1a"}}}
    assert format_version("containerd-shim-kata-v2", doc) == (
        "containerd-shim-kata-v2:\n"
        "  Version:  1.2.3\n"
        "  Revision: abc-dirty\n"
        "  Python version: 3.11.7\n"
        "  Guest image: /g/MANIFEST (sha256 ff)\n"
        "    kernel package: linux-image-x 1\n"
        "    vmlinuz: sha256 1a\n\n")
    unknown = {**doc, "guest_image": {"problem": "no MANIFEST beside ..."}}
    assert "  Guest image: unknown: no MANIFEST beside ...\n" in format_version("p", unknown)


def test_kata_runtime_version_and_shim_v_print_the_same(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from shim.main import main as shim_main

    out = guest_dir(tmp_path)
    config = write_config(tmp_path, kernel=str(out / "vmlinuz"), initrd=str(out / "initrd.img"))
    code, cli_text, _ = run(capsys, "--config", str(config), "version")
    assert code == 0
    monkeypatch.setenv("KATA_CONF_FILE", str(config))
    monkeypatch.setattr("sys.argv", ["/usr/local/bin/containerd-shim-kata-v2", "-v"])
    assert shim_main(["-v"]) == 0
    shim_text = capsys.readouterr().out
    assert cli_text.split("\n", 1)[1] == shim_text.split("\n", 1)[1]
    assert (cli_text.split("\n")[0], shim_text.split("\n")[0]) == (
        "kata-runtime:", "containerd-shim-kata-v2:")
    digest = hashlib.sha256(SAMPLE_MANIFEST.encode()).hexdigest()
    assert f"  Guest image: {out / 'MANIFEST'} (sha256 {digest})\n" in cli_text
    assert "    initrd.img: sha256 8f12 (26977888 bytes)\n" in cli_text
    code, text, _ = run(capsys, "--config", str(config), "version", "--json")
    doc = json.loads(text)
    assert (doc["version"], doc["config"]) == (VERSION, str(config))
    assert doc["guest_image"]["facts"]["vmlinuz"] == "sha256 1a7a (14190528 bytes)"


def test_version_says_why_the_guest_image_is_unknown(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = guest_dir(tmp_path, manifest=None)
    config = write_config(tmp_path, kernel=str(out / "vmlinuz"), initrd=str(out / "initrd.img"))
    code, text, _ = run(capsys, "--config", str(config), "version")
    assert code == 0
    assert f"  Guest image: unknown: no MANIFEST beside the configured initrd ({out}" in text
    code, text, _ = run(capsys, "--config", str(tmp_path / "absent.toml"), "version")
    assert code == 0 and "  Guest image: unknown: no configuration (failed to read" in text
    assert text.splitlines()[1] == f"  Version:  {VERSION}"


def test_build_info_file_wins_over_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from common import buildinfo

    info = tmp_path / "BUILD_INFO"
    info.write_text(json.dumps({"version": "9.9.9", "commit": "f" * 40, "extra": 1}))
    monkeypatch.setattr(buildinfo, "build_info_paths", lambda: [tmp_path / "none", info])
    assert buildinfo.build_info() == buildinfo.BuildInfo("9.9.9", "f" * 40, str(info))
    assert buildinfo.version() == "9.9.9"
    for bad in ("[1, 2]", "{not json", json.dumps({"commit": 5})):
        info.write_text(bad)
        found = buildinfo.read_build_info(info)
        assert found is None or (found.version, found.commit) == (VERSION, "unknown"), bad


def test_a_frozen_build_reads_build_info_beside_its_executable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from common import buildinfo

    bundle = tmp_path / "kata-py"
    (bundle / "bin").mkdir(parents=True)
    (bundle / "kata-py").write_text("")
    (bundle / "bin" / "containerd-shim-kata-v2").symlink_to("../kata-py")
    monkeypatch.setattr("sys.frozen", True, raising=False)
    monkeypatch.setattr("sys.executable", str(bundle / "bin" / "containerd-shim-kata-v2"))
    monkeypatch.setattr("sys._MEIPASS", str(bundle / "_internal"), raising=False)
    assert buildinfo.build_info() == buildinfo.BuildInfo(VERSION, "unknown", "")  # no git
    (bundle / "BUILD_INFO").write_text(json.dumps({"version": VERSION, "commit": "abc"}))
    assert buildinfo.build_info().commit == "abc"


def test_a_source_checkout_asks_git(tmp_path: Path) -> None:
    import subprocess

    from common import buildinfo

    assert buildinfo.git_commit(tmp_path) is None  # not a checkout
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "f").write_text("1")
    subprocess.run([*git, "add", "f"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert buildinfo.git_commit(tmp_path) == head
    (tmp_path / "untracked").write_text("x")
    assert buildinfo.git_commit(tmp_path) == head
    (tmp_path / "f").write_text("2")
    assert buildinfo.git_commit(tmp_path) == f"{head}-dirty"


# --- check --json and containerd ---------------------------------------------------------

def fake_containerd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "containerd").write_text(f"#!/bin/sh\n{script}\n")
    (bin_dir / "containerd").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))


def test_check_json_carries_every_line_and_the_verdict(
        tmp_path: Path, as_root: None, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake_containerd(tmp_path, monkeypatch, "echo containerd example.org/containerd 1.7.99 abc")
    cd_config = tmp_path / "containerd.toml"
    cd_config.write_text(containerd_config.add("", containerd_config.Handler("kata-fast")))
    config = str(write_config(tmp_path))
    code, out, _ = run(capsys, "--config", config, "check", "--json",
                       "--containerd-config", str(cd_config))
    assert code == 0
    doc = json.loads(out)
    assert (doc["ok"], doc["failed"]) == (True, [])
    by_name = {c["name"]: c for c in doc["checks"]}
    assert by_name["containerd"] == {"name": "containerd", "result": "ok", "required": False,
                                     "detail": "containerd example.org/containerd 1.7.99 abc"}
    assert by_name["containerd CRI handler"]["detail"] == \
        f"kata-fast (io.containerd.kata.v2) in {cd_config}"
    assert by_name["security boundary"]["result"] == "warn"
    code, text, _ = run(capsys, "--config", config, "check", "--containerd-config",
                        str(cd_config))
    assert code == 0
    assert text.splitlines()[:len(doc["checks"])] == [cli_check.line(cli_check.HostCheck(
        c["name"], c["result"] == "ok", c["detail"], c["required"])) for c in doc["checks"]]
    code, out, _ = run(capsys, "--config", str(tmp_path / "absent.toml"), "check", "--json")
    assert code == 1 and json.loads(out)["failed"] == ["configuration"]


def test_check_without_containerd_says_so(
        tmp_path: Path, as_root: None, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    code, out, _ = run(capsys, "--config", str(write_config(tmp_path)), "check",
                       "--containerd-config", str(tmp_path / "none.toml"))
    assert code == 0, out  # warnings only: ctr needs no handler, containerd may be elsewhere
    assert "warn  containerd: `containerd` not found on PATH (Debian: apt-get install " \
           "containerd)\n" in out
    assert f"warn  containerd CRI handler: {tmp_path / 'none.toml'} does not exist" in out


def test_check_reports_a_failing_containerd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_containerd(tmp_path, monkeypatch, "echo 'cannot run' >&2; exit 3")
    check = cli_check.check_containerd_version()
    assert (check.ok, check.required) == (False, False)
    assert check.detail.endswith("--version failed: cannot run")


@pytest.mark.parametrize(("text", "found"), [
    ('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata]\n'
     'runtime_type = "io.containerd.kata.v2"\n'
     '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n'
     'runtime_type = "io.containerd.runc.v2"\n', [("kata", "io.containerd.kata.v2")]),
    ('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.micro]\n'
     'runtime_type = "io.containerd.kata-qemu-microvm.v2"\n',
     [("micro", "io.containerd.kata-qemu-microvm.v2")]),
    ('[plugins.cri.containerd.runtimes.kata]\nruntime_type = "io.containerd.kata.v2"\n',
     [("kata", "io.containerd.kata.v2")]),  # version 1
    ('version = 3\n[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.k]\n'
     'runtime_type = "io.containerd.kata.v2"\n', [("k", "io.containerd.kata.v2")]),
    ('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.x]\n'
     'runtime_type = "io.containerd.kata.v3"\n', []),
    ('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes]\nx = 1\n', []),
])
def test_kata_handlers_are_found_by_runtime_type(text: str,
                                                 found: list[tuple[str, str]]) -> None:
    assert containerd_config.kata_handlers(tomllib.loads(text)) == found


def test_check_reports_an_unreadable_containerd_config(tmp_path: Path) -> None:
    bad = tmp_path / "config.toml"
    bad.write_text("version = [")
    check = cli_check.check_containerd_handler(str(bad))
    assert not check.ok and "is not valid TOML" in check.detail
    bad.write_text('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n')
    check = cli_check.check_containerd_handler(str(bad))
    assert not check.ok and "kata-runtime containerd-config add" in check.detail


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


# exec: test_debug_console.py; metrics: test_cli_metrics.py


def _with_factory(config: Path, template: Path) -> Path:
    config.write_text(config.read_text() + f'[factory]\nenable_template = true\n'
                      f'template_path = "{template}"\n')
    return config


def test_factory_status_destroy_and_a_refused_init(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    template = tmp_path / "tpl"
    config = str(_with_factory(write_config(tmp_path), template))
    code, out, _ = run(capsys, "--config", config, "factory", "status")
    assert code == 1, out
    assert "VM templates: on" in out and "not usable: no VM template at" in out, out
    assert "kata-runtime factory init" in out
    code, out, _ = run(capsys, "--config", config, "factory", "destroy")
    assert code == 0 and f"VM template {template} was not there" in out, out
    template.mkdir(mode=0o700)
    (template / "state").write_bytes(b"x")
    (template / "template.json").write_text("{}")
    code, out, _ = run(capsys, "--config", config, "factory", "destroy", "--json")
    assert code == 0 and json.loads(out) == {"path": str(template), "removed": True,
                                         "vm_cache_stopped": False,
                                         "vm_cache_leftovers_removed": False}, out
    assert not template.exists()
    (tmp_path / "m").mkdir()
    microvm = str(_with_factory(write_config(tmp_path / "m", machine_type="microvm"), template))
    code, _, err = run(capsys, "--config", microvm, "factory", "init")
    assert code == 1 and "has no PCIe root ports" in err, err
    assert not template.exists()  # refused before anything was made


def test_check_and_factory_status_say_when_no_vm_cache_serves(
        tmp_path: Path, as_root: None, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path)
    endpoint = tmp_path / "c.sock"
    path.write_text(path.read_text() + f'[factory]\nvm_cache_number = 2\n'
                    f'vm_cache_endpoint = "{endpoint}"\n')
    code, out, _ = run(capsys, "--config", str(path), "check")
    assert code == 0, out  # informational: pods boot without a cache
    assert f"warn  VM cache: {endpoint}: pods boot: no VM cache answers: No such file" in out
    assert "kata-vm-holder is missing" not in out
    with monkeypatch.context() as patch:  # an install without the holder: said too
        patch.setattr(sys, "executable", str(tmp_path / "python3"))
        code, out, _ = run(capsys, "--config", str(path), "check")
    assert code == 0 and "kata-vm-holder is missing" in out and "make venv" in out, out
    code, out, _ = run(capsys, "--config", str(path), "factory", "status", "--json")
    doc = json.loads(out)["vm_cache"]
    assert code == 1 and (doc["serving"], doc["vm_cache_number"]) == (False, 2), out
    code, out, _ = run(capsys, "--config", str(path), "factory", "destroy", "--json")
    assert code == 0 and json.loads(out)["vm_cache_stopped"] is False, out
    assert json.loads(out)["vm_cache_leftovers_removed"] is False, out
    (tmp_path / "c.sock.d" / "vm-1").mkdir(parents=True)  # as a cache killed with -9 left
    code, out, _ = run(capsys, "--config", str(path), "factory", "destroy")
    assert code == 0 and "what a killed VM cache left was removed" in out, out
    assert not (tmp_path / "c.sock.d").exists()


def test_check_says_whether_pods_are_restored_from_the_template(
        tmp_path: Path, as_root: None, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(_with_factory(write_config(tmp_path), tmp_path / "tpl"))
    code, out, _ = run(capsys, "--config", config, "check")
    assert code == 0, out  # informational: pods boot without a template
    assert f"warn  VM template: {tmp_path / 'tpl'}: not usable, pods boot: no VM template" \
        in out, out
