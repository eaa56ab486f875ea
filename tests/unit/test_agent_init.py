"""agent.init: modules loaded only for the virtio devices the guest has; the scheduler
tuned under TCG (debugfs mounted for one write, then unmounted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import init, syscalls


def virtio_devices(root: Path, ids: dict[str, str]) -> Path:
    """A fake /sys/bus/virtio/devices: {entry: content of its ``device`` file}."""
    for entry, device in ids.items():
        (root / entry).mkdir(parents=True)
        (root / entry / "device").write_text(device)
    return root


@pytest.fixture(autouse=True)
def no_module_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake /sys/module: the host's own modules must not count."""
    sys_module = tmp_path / "sys-module"
    sys_module.mkdir()
    monkeypatch.setattr(init, "SYS_MODULE", str(sys_module))
    return sys_module


@pytest.fixture()
def loaded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    def finit_module(path: str, params: str = "") -> bool:
        calls.append(path)
        return True

    monkeypatch.setattr(syscalls, "finit_module", finit_module)
    return calls


def test_device_ids_read_from_sysfs(tmp_path: Path) -> None:
    root = virtio_devices(tmp_path, {"virtio0": "0x0003\n", "virtio1": "0x0005\n",
                                     "virtio2": "junk\n"})
    (root / "virtio3").mkdir()  # no device file: skipped
    assert init.virtio_device_ids(str(root)) == {3, 5}
    assert init.virtio_device_ids(str(tmp_path / "absent")) == set()


def test_balloon_module_loads_only_with_a_balloon(tmp_path: Path, loaded: list[str]) -> None:
    listing = tmp_path / "modules.virtio"
    listing.write_text("# id paths\n5 /m/virtio_balloon.ko\n16 /m/a.ko /m/b.ko\n")
    without = virtio_devices(tmp_path / "without", {"virtio0": "0x0003"})
    init.DeviceModules(str(listing), str(without)).load_present()
    assert loaded == []
    with_both = virtio_devices(tmp_path / "with", {"virtio0": "0x0003", "virtio1": "0x0005",
                                                   "virtio2": "0x0010"})
    init.DeviceModules(str(listing), str(with_both)).load_present()
    assert loaded == ["/m/virtio_balloon.ko", "/m/a.ko", "/m/b.ko"]


def test_a_failing_module_is_reported_and_the_rest_load(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    listing = tmp_path / "modules.virtio"
    listing.write_text("bad /m/x.ko\n5 /m/bad.ko /m/good.ko\n")
    calls: list[str] = []

    def finit_module(path: str, params: str = "") -> bool:
        calls.append(path)
        if "bad" in path:
            raise OSError(8, "Exec format error", path)
        return True

    monkeypatch.setattr(syscalls, "finit_module", finit_module)
    init.DeviceModules(str(listing),
                       str(virtio_devices(tmp_path / "d", {"v": "0x5"}))).load_present()
    assert calls == ["/m/bad.ko", "/m/good.ko"]
    assert "cannot load module /m/bad.ko" in capsys.readouterr().err


def test_no_list_no_work(tmp_path: Path, loaded: list[str]) -> None:
    init.DeviceModules(str(tmp_path / "none"), str(tmp_path)).load_present()
    assert loaded == []


def test_a_device_kind_loads_once_and_a_later_device_gets_its_modules(
        tmp_path: Path, loaded: list[str]) -> None:
    """Hot-plug: a NIC that appears after the boot loads virtio_net when asked again, and
    modules already loaded are not loaded twice."""
    listing = tmp_path / "modules.virtio"
    listing.write_text("1 /m/failover.ko /m/virtio_net.ko\n5 /m/virtio_balloon.ko\n")
    devices = virtio_devices(tmp_path / "d", {"virtio0": "0x0005"})
    modules = init.DeviceModules(str(listing), str(devices))
    modules.load_present()
    assert loaded == ["/m/virtio_balloon.ko"]
    modules.load_present()
    assert loaded == ["/m/virtio_balloon.ko"]
    virtio_devices(devices, {"virtio1": "0x0001"})  # the hot-plugged NIC
    modules.load_present()
    modules.load_present()
    assert loaded == ["/m/virtio_balloon.ko", "/m/failover.ko", "/m/virtio_net.ko"]


def test_modules_already_loaded_are_not_loaded_again(
        tmp_path: Path, loaded: list[str], no_module_loaded: Path) -> None:
    """The shared root image's loader has loaded virtio_pci and its dependencies; the
    image's list names them too. A built-in module's directory (no initstate) is not a
    loaded module."""
    (no_module_loaded / "virtio_pci" / "initstate").parent.mkdir()
    (no_module_loaded / "virtio_pci" / "initstate").write_text("live\n")
    (no_module_loaded / "fuse").mkdir()
    listing = tmp_path / "modules.list"
    listing.write_text("/lib/modules/r/kernel/virtio_pci.ko\n/lib/modules/r/fuse.ko\n"
                       "/lib/modules/r/virtio-console.ko\n")
    init.load_modules(str(listing))
    assert loaded == ["/lib/modules/r/fuse.ko", "/lib/modules/r/virtio-console.ko"]
    (no_module_loaded / "virtio_console" / "initstate").parent.mkdir()
    (no_module_loaded / "virtio_console" / "initstate").write_text("live\n")
    init.load_modules(str(listing))
    assert loaded[2:] == ["/lib/modules/r/fuse.ko"]


class FakeDebugfs:
    """syscalls.mount/umount for `init.tune_wakeups`: a mount makes ``sched/`` appear."""

    def __init__(self, knob: bool = True, mount_error: OSError | None = None) -> None:
        self.knob, self.mount_error = knob, mount_error
        self.calls: list[tuple[str, ...]] = []

    def mount(self, source: str, target: str, fstype: str, flags: int = 0,
              data: str = "") -> None:
        self.calls.append(("mount", fstype, target))
        if self.mount_error is not None:
            raise self.mount_error
        if self.knob:
            (Path(target) / "sched").mkdir()
            (Path(target) / "sched" / "wakeup_granularity_ns").write_text("1000000\n")
            (Path(target) / "sched" / "tunable_scaling").write_text("1\n")

    def umount(self, target: str, flags: int = 0) -> None:
        self.calls.append(("umount", target, str(flags)))
        for path in sorted(Path(target).rglob("*"), reverse=True):  # what unmounting hides
            path.unlink() if path.is_file() else path.rmdir()


def test_wakeup_granularity_is_written_and_debugfs_left_unmounted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake, written = FakeDebugfs(), {}
    real_umount = fake.umount

    def umount(target: str, flags: int = 0) -> None:
        sched = Path(target) / "sched"
        written["value"] = (sched / "wakeup_granularity_ns").read_text()
        written["scaling"] = (sched / "tunable_scaling").read_text()
        real_umount(target, flags)

    monkeypatch.setattr(syscalls, "mount", fake.mount)
    monkeypatch.setattr(syscalls, "umount", umount)
    mount_dir = tmp_path / "debugfs"
    init.tune_wakeups(mount_dir=str(mount_dir))
    # The scaling mode written back as it was (the kernel then bases later values on ours).
    assert written == {"value": str(init.WAKEUP_GRANULARITY_NS), "scaling": "1"}
    assert init.WAKEUP_GRANULARITY_NS == 4_000_000
    assert fake.calls == [("mount", "debugfs", str(mount_dir)),
                          ("umount", str(mount_dir), str(syscalls.MNT_DETACH))]
    assert not mount_dir.exists()


def test_a_kernel_without_the_knob_is_reported_and_debugfs_still_unmounted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeDebugfs(knob=False)
    monkeypatch.setattr(syscalls, "mount", fake.mount)
    monkeypatch.setattr(syscalls, "umount", fake.umount)
    mount_dir = tmp_path / "debugfs"
    init.tune_wakeups(mount_dir=str(mount_dir))
    assert "cannot set the scheduler's wake-up granularity" in capsys.readouterr().err
    assert [c[0] for c in fake.calls] == ["mount", "umount"]
    assert not mount_dir.exists()


def test_no_debugfs_is_reported_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeDebugfs(mount_error=OSError(19, "No such device"))
    monkeypatch.setattr(syscalls, "mount", fake.mount)
    monkeypatch.setattr(syscalls, "umount", fake.umount)
    mount_dir = tmp_path / "debugfs"
    init.tune_wakeups(mount_dir=str(mount_dir))
    assert "cannot mount debugfs" in capsys.readouterr().err
    assert [c[0] for c in fake.calls] == ["mount"]
    assert not mount_dir.exists()
