"""Unit tests of sandbox/: config loading, spec rewrite, mount options, state record."""

from __future__ import annotations

from pathlib import Path

import pytest

from common import mountopts
from hostos import syscalls
from sandbox import storage
from sandbox.config import load_config
from sandbox.errors import InvalidArgumentError
from sandbox.oci import SharedBind, guest_mounts_dir, guest_rootfs, spec_for_guest
from sandbox.state import ProcessRecord, SandboxRecord, read_record, write_record
from sandbox.types import validate_id

REPO = Path(__file__).resolve().parents[2]


def test_default_configuration_loads() -> None:
    config = load_config(str(REPO / "configuration.toml"))
    assert config.hypervisor.name == "qemu" and config.warnings == ()
    assert config.state_dir == Path("/run/kata-py")
    assert config.agent.dial_timeout == 90


def test_config_lookup_uses_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('[hypervisor.qemu]\n[runtime]\nstate_dir = "/tmp/x"\n')
    monkeypatch.setenv("KATA_CONF_FILE", str(conf))
    assert load_config().state_dir == Path("/tmp/x")
    assert load_config(str(REPO / "configuration.toml")).state_dir == Path("/run/kata-py")


def test_config_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[hypervisor.qemu]\ndefault_memory = 'lots'\n")
    with pytest.raises(InvalidArgumentError, match="default_memory"):
        load_config(str(bad))
    with pytest.raises(InvalidArgumentError, match="failed to read configuration"):
        load_config(str(tmp_path / "missing.toml"))
    broken = tmp_path / "broken.toml"
    broken.write_text("[runtime\n")
    with pytest.raises(InvalidArgumentError, match="failed to parse"):
        load_config(str(broken))


@pytest.mark.parametrize("good", ["a", "t1", "abc.def-1_x", "A" * 76])
def test_valid_ids(good: str) -> None:
    assert validate_id("container", good) == good


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "-a", "a..b", "A" * 77, "a b", "."])
def test_invalid_ids(bad: str) -> None:
    with pytest.raises(InvalidArgumentError):
        validate_id("container", bad)


def test_spec_for_guest_rewrites_host_only_parts() -> None:
    spec = {
        "root": {"path": "rootfs", "readonly": True},
        "hooks": {"prestart": [{"path": "/usr/bin/x"}]},
        "process": {"args": ["sh"], "apparmorProfile": "p"},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": "/h", "options": ["rbind"]},
            {"destination": "/data", "source": "/d", "options": ["rbind", "ro"]},
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"},
                {"type": "network", "path": "/var/run/netns/x"},
                {"type": "ipc", "path": "/proc/1/ns/ipc"},
                {"type": "mount"},
            ],
            "devices": [{"path": "/dev/kvm"}],
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        },
    }
    out, binds = spec_for_guest(spec, "c1")
    assert out["root"] == {"path": guest_rootfs("c1"), "readonly": True}
    assert "hooks" not in out and "apparmorProfile" not in out["process"]
    # Host binds are shared: the guest binds from the share, the host mounts the sources.
    assert [m["source"] for m in out["mounts"]] == [
        "proc", f"{guest_mounts_dir('c1')}/0", f"{guest_mounts_dir('c1')}/1"]
    assert binds == [SharedBind("/h", "0", False), SharedBind("/d", "1", True)]
    # Host namespace paths go on: the agent maps a pod's onto its sandbox container's.
    assert out["linux"]["namespaces"] == [
        {"type": "pid"}, {"type": "ipc", "path": "/proc/1/ns/ipc"}, {"type": "mount"}]
    assert "devices" not in out["linux"]  # host devices; the cgroup rules stay
    assert out["linux"]["resources"]["devices"] == [{"allow": False, "access": "rwm"}]
    assert spec["root"]["path"] == "rootfs"  # the input is left alone


def test_parse_options() -> None:
    flags, data = mountopts.parse_options(["ro", "rbind", "lowerdir=/a:/b", "index=off"])
    assert flags == mountopts.MS_RDONLY | mountopts.MS_BIND | mountopts.MS_REC
    assert data == "lowerdir=/a:/b,index=off"
    assert mountopts.parse_options(["ro", "rw"]) == (0, "")


def test_state_record_round_trip(tmp_path: Path) -> None:
    record = SandboxRecord("s1", hypervisor="fake", shim_pid=5,
                           processes=[ProcessRecord(1, 2, "vmm")])
    record.containers = ["a", "b"]
    write_record(tmp_path, record)
    assert read_record(tmp_path) == record
    assert record.vmm == ProcessRecord(1, 2, "vmm")
    (tmp_path / "state.json").write_text("{not json")
    assert read_record(tmp_path) is None


def test_a_state_file_written_before_hypervisors_were_pluggable_still_loads(
        tmp_path: Path) -> None:
    import json

    (tmp_path / "state.json").write_text(json.dumps({
        "sandbox_id": "s1", "shim_pid": 5, "shim_start_time": 9, "accelerator": "tcg",
        "accelerator_reason": "r", "guest_kernel_release": "6.1",
        "processes": [{"pid": 1, "start_time": 2, "role": "qemu"},
                      {"pid": 3, "start_time": 4, "role": "virtiofsd"}],
        "containers": ["s1"]}))
    old = read_record(tmp_path)
    assert old is not None
    assert (old.hypervisor, old.version) == ("qemu", 2)
    assert old.vmm == ProcessRecord(1, 2, "vmm")
    assert [p.role for p in old.processes] == ["vmm", "virtiofsd"]


def test_mounts_and_remove_tree(tmp_path: Path) -> None:
    target = tmp_path / "share" / "x"
    target.mkdir(parents=True)
    syscalls.mount("none", str(target), "tmpfs", 0, "size=1m")
    (target / "f").write_text("data")
    with pytest.raises(OSError, match="still mounted"):
        storage.remove_tree(tmp_path / "share")
    assert storage.mounts_under(tmp_path / "share") == [str(target)]
    storage.unmount_tree(tmp_path / "share")
    assert storage.mounts_under(tmp_path) == []
    storage.remove_tree(tmp_path / "share")
    assert not (tmp_path / "share").exists()


def test_guest_texts_are_bounded() -> None:
    from agent_client.client import _printable
    from agent_client.errors import MAX_GUEST_MESSAGE, AgentCallError, bounded
    from ttrpc import Code

    assert _printable("6.1.0-56-cloud-amd64", 64) == "6.1.0-56-cloud-amd64"
    assert _printable("a\nb\x1b[2Jc" + "x" * 100, 64) == "a?b?[2Jc" + "x" * 56
    huge = "e" * (MAX_GUEST_MESSAGE * 10)
    assert len(bounded(huge)) < MAX_GUEST_MESSAGE + 40
    assert bounded("short") == "short"
    error = AgentCallError("CreateContainer", Code.INVALID_ARGUMENT, huge)
    assert len(str(error)) < MAX_GUEST_MESSAGE + 80


def test_mount_targets_stay_inside_the_rootfs(tmp_path: Path) -> None:
    from sandbox.types import Mount

    bad = Mount("tmpfs", "none", "../../escape", ())
    with pytest.raises(OSError, match="leaves"):
        storage.mount_rootfs([bad], tmp_path, "rootfs")
    assert storage.mounts_under(tmp_path) == []


def test_shared_storage_follows_the_configuration() -> None:
    from sandbox.sandbox import shared_storage
    from tests.unit.fakes import FakeHypervisorConfig

    kind, share = shared_storage(FakeHypervisorConfig(shared_fs="virtio-fs"))
    assert (kind, share.fstype) == ("virtio-fs", "virtiofs")
    kind, nine = shared_storage(FakeHypervisorConfig(shared_fs="virtio-9p"))
    assert (kind, nine.driver, nine.fstype, nine.source) == ("virtio-9p", "9p", "9p", "kataShared")
    with pytest.raises(InvalidArgumentError, match=r"hypervisor\.fake\.shared_fs"):
        shared_storage(FakeHypervisorConfig(shared_fs="none"))


def test_bind_path_shares_files_and_dirs_read_only_when_asked(tmp_path: Path) -> None:
    src_dir, src_file = tmp_path / "vol", tmp_path / "hosts"
    src_dir.mkdir()
    (src_dir / "a").write_text("A")
    src_file.write_text("127.0.0.1 localhost\n")
    share = tmp_path / "share"
    share.mkdir()
    try:
        storage.bind_path(src_dir, share, "c/0", readonly=True)
        storage.bind_path(src_file, share, "c/1", readonly=False)
        assert (share / "c/0" / "a").read_text() == "A"
        assert (share / "c/1").read_text() == "127.0.0.1 localhost\n"
        with pytest.raises(OSError):
            (share / "c/0" / "b").write_text("no")  # read-only bind
        with pytest.raises(OSError, match="no such file"):
            storage.bind_path(tmp_path / "missing", share, "c/2", readonly=False)
    finally:
        storage.unmount_tree(share)
    assert storage.mounts_under(tmp_path) == []


def _sandbox_with_state(tmp_path: Path, record: SandboxRecord | None) -> tuple[object, Path]:
    from tests.unit.fakes import FakeWorld, fake_sandbox

    sb = fake_sandbox(tmp_path, FakeWorld(), "pod1")
    sb.state_path.mkdir(parents=True)
    (sb.state_path / "shared").mkdir()
    if record is not None:
        write_record(sb.state_path, record)
    return sb, sb.state_path


def test_state_left_by_a_dead_shim_is_cleaned_before_a_new_start(tmp_path: Path) -> None:
    dead = SandboxRecord("pod1", shim_pid=4194303, shim_start_time=1)  # no such process
    sb, path = _sandbox_with_state(tmp_path, dead)
    sb._clear_stale_state()  # type: ignore[attr-defined]
    assert not path.exists()
    sb, path = _sandbox_with_state(tmp_path, None)  # partial: no state.json at all
    sb._clear_stale_state()  # type: ignore[attr-defined]
    assert not path.exists()


def test_state_of_a_live_shim_is_left_alone(tmp_path: Path) -> None:
    import os

    from hostos.procs import start_time
    from sandbox.errors import AlreadyExistsError

    me = SandboxRecord("pod1", shim_pid=os.getpid(), shim_start_time=start_time(os.getpid()) or 0)
    sb, path = _sandbox_with_state(tmp_path, me)
    with pytest.raises(AlreadyExistsError, match="still runs it"):
        sb._clear_stale_state()  # type: ignore[attr-defined]
    assert (path / "state.json").exists()


def _record_in(state_dir: Path, namespace: str, sandbox_id: str, shim_pid: int,
               shim_start: int, victim: int) -> Path:
    from hostos.procs import start_time
    from sandbox.state import sandbox_path

    path = sandbox_path(state_dir, namespace, sandbox_id)
    (path / "mounts").mkdir(parents=True)
    write_record(path, SandboxRecord(sandbox_id, namespace=namespace, shim_pid=shim_pid,
                                     shim_start_time=shim_start,
                                     processes=[ProcessRecord(victim, start_time(victim) or 0,
                                                              "vmm")]))  # fmt: skip
    return path


def test_crash_cleanup_never_touches_a_sandbox_whose_shim_lives(tmp_path: Path) -> None:
    import os
    import subprocess

    from hostos.procs import start_time
    from sandbox.cleanup import cleanup_after_crash

    vmm = subprocess.Popen(["sleep", "60"])  # stands in for a running VM
    try:
        me, started = os.getpid(), start_time(os.getpid()) or 0
        live = _record_in(tmp_path, "a", "t1", me, started, vmm.pid)
        # `shim delete` of t1 in namespace b: a sandbox of its own, not a's.
        assert cleanup_after_crash(tmp_path, "b", "t1") is False
        # Even for a's own id: while its recorded shim runs, nothing is killed or removed.
        assert cleanup_after_crash(tmp_path, "a", "t1") is False
        assert vmm.poll() is None and (live / "state.json").exists()
        # Once that shim is gone (a dead pid), the same call cleans up.
        dead = _record_in(tmp_path, "c", "t1", 4_194_304, 1, vmm.pid)
        assert cleanup_after_crash(tmp_path, "c", "t1") is True
        assert vmm.wait(5) == -9 and not dead.exists() and live.exists()
    finally:
        vmm.kill()
        vmm.wait()


def test_a_sandbox_from_before_namespaces_is_still_cleaned(tmp_path: Path) -> None:
    import json

    from sandbox.cleanup import cleanup_after_crash

    legacy = tmp_path / "sbs" / "t1"
    (legacy / "shared").mkdir(parents=True)
    (legacy / "state.json").write_text(json.dumps({"sandbox_id": "t1", "shim_pid": 4_194_304,
                                                   "processes": []}))  # fmt: skip
    assert cleanup_after_crash(tmp_path, "default", "t1") is True
    assert not legacy.exists()
    (tmp_path / "sbs" / "default").mkdir()  # a namespace directory named like an id
    assert cleanup_after_crash(tmp_path, "x", "default") is False
    assert (tmp_path / "sbs" / "default").exists()
