"""The Debian package of `make deb`, installed with ``dpkg -i`` into a scratch root (its own
dpkg database; ``--force-depends`` because that database holds none of the dependencies,
which the test host's own packages are shown to satisfy), then removed with ``dpkg -r``.

The installed runtime runs containers through a private containerd whose PATH holds the
package's /usr/bin and nothing of the checkout (no .venv): the shim daemon's executable and
every file it maps must lie outside the checkout. A runtime variant (its own shim name and
configuration) starts from the package too. ``dpkg -r`` must leave no file and no process.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require, require_tools
from tests.harness import kataconfig, procs
from tests.harness.containerd import REPO, Containerd
from tests.harness.images import IMAGE_REF
from tests.harness.kata import Kata
from tests.harness.scenarios import detached, explain

DEB_STAMP = REPO / "build/out/runtime/deb.stamp"  # written by `make deb`: the .deb's path
BUILD_INFO = REPO / "build/out/runtime/BUILD_INFO"
SHIMS = ("containerd-shim-kata-v2", "containerd-shim-kata-qemu-v2",
         "containerd-shim-kata-qemu-microvm-v2", "containerd-shim-kata-stratovirt-v2")
CONF_DIR = "usr/share/defaults/kata-containers"
GUEST = "usr/share/kata-containers"
BUNDLE = "usr/libexec/kata-py"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
VARIANT = "qemu-microvm"


@pytest.fixture(scope="module")
def deb() -> Path:
    require(DEB_STAMP.is_file(), f"{DEB_STAMP} (run `make deb`)")
    path = Path(DEB_STAMP.read_text().strip())
    require(path.is_file(), f"{path} (run `make deb`)")
    require_tools("dpkg", "dpkg-deb")
    return path


def dpkg(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["dpkg", f"--root={root}", *args], capture_output=True, text=True,
                          timeout=300, env={"PATH": SYSTEM_PATH})


def package_files(root: Path) -> list[Path]:
    """What dpkg recorded as installed by kata-py (directories excluded)."""
    listed = dpkg(root, "-L", "kata-py")
    assert listed.returncode == 0, listed.stderr
    paths = [root / line.lstrip("/") for line in listed.stdout.splitlines() if line.strip()]
    return [p for p in paths if p.is_symlink() or not p.is_dir()]


def processes_under(root: Path) -> list[int]:
    """Pids whose executable lies below `root`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "exe").startswith(f"{root}/"):
                    found.append(int(entry.name))
    return found


def assert_removed(root: Path, files: list[Path]) -> None:
    """`dpkg -r`: every file it installed is gone, nothing but its database is left, and no
    process runs from the package."""
    res = dpkg(root, "-r", "kata-py")
    assert res.returncode == 0, res.stdout + res.stderr
    left = [str(f) for f in files if f.exists() or f.is_symlink()]
    assert left == [], f"left after dpkg -r: {left[:20]}"
    others = [str(p) for p in root.rglob("*")
              if not p.is_dir() and "var/lib/dpkg" not in str(p.relative_to(root))]
    assert others == [], others
    assert processes_under(root) == []


@pytest.fixture
def installed(deb: Path, tmp_path: Path) -> Iterator[Path]:
    """The package installed into a scratch root; removed afterwards if a test did not."""
    root = tmp_path / "root"
    for d in ("var/lib/dpkg/info", "var/lib/dpkg/updates"):
        (root / d).mkdir(parents=True)
    (root / "var/lib/dpkg/status").touch()
    res = dpkg(root, "--force-depends", "-i", str(deb))
    assert res.returncode == 0, res.stdout + res.stderr
    try:
        yield root
    finally:
        if dpkg(root, "-s", "kata-py").returncode == 0:
            procs.kill_all(processes_under(root))
            dpkg(root, "-r", "kata-py")


def test_package_contents_and_dependencies(deb: Path, installed: Path) -> None:
    fields = {f: subprocess.run(["dpkg-deb", "-f", str(deb), f], capture_output=True,
                                text=True, check=True).stdout.strip()
              for f in ("Package", "Version", "Architecture", "Depends")}
    info = json.loads(BUILD_INFO.read_text())
    assert fields["Package"] == "kata-py" and fields["Architecture"] == "amd64"
    assert fields["Version"] == info["version"]
    depends = [d.strip() for d in fields["Depends"].split(",")]
    for wanted in ("qemu-system-x86 (>= 1:7.2)", "containerd (>= 1.6) | containerd.io (>= 1.6)",
                   "qemu-system-common (>= 1:7.2)", "util-linux (>= 2.38)"):
        assert wanted in depends, depends
    # qemu-system-common is virtiofsd's provider on Debian 12 (the configuration's path).
    owner = subprocess.run(["dpkg", "-S", "/usr/lib/qemu/virtiofsd"], capture_output=True,
                           text=True, timeout=60)
    assert owner.stdout.startswith("qemu-system-common:"), owner.stdout + owner.stderr
    # This Debian 12 host satisfies every dependency: apt would install the package alone.
    sim = subprocess.run(["apt-get", "install", "--simulate", "-q", str(deb)],
                         capture_output=True, text=True, timeout=120)
    assert sim.returncode == 0 and "0 upgraded, 1 newly installed, 0 to remove" in sim.stdout, \
        sim.stdout + sim.stderr

    root = installed
    files = package_files(root)
    for name in ("kata-runtime", *SHIMS):
        link = root / "usr/bin" / name
        assert link in files and link.is_symlink(), name
        assert os.readlink(link) == "../libexec/kata-py/kata-py"
        assert link.resolve() == root / BUNDLE / "kata-py"
    for name in ("vmlinux.container", "vmlinuz.container", "kata-containers-initrd.img",
                 "kata-containers.img", "kata-containers-image-loader.img", "MANIFEST"):
        assert root / GUEST / name in files, name
    for name in ("configuration.toml", *(f"configuration-{v}.toml" for v in
                                         ("qemu", "qemu-microvm", "stratovirt"))):
        assert root / CONF_DIR / name in files, name
    snippet = (root / "usr/share/kata-py/containerd/kata.toml").read_text()
    assert 'runtime_type = "io.containerd.kata.v2"' in snippet, snippet
    # Nothing installed names the checkout (no link into it, no path baked into a file);
    # the guest's MANIFEST records where its agent was built from, as provenance only.
    needle = str(REPO).encode()
    assert [str(f) for f in files if f.is_symlink() and str(REPO) in str(f.resolve())] == []
    assert [str(f) for f in files if not f.is_symlink() and f.name != "MANIFEST"
            and needle in f.read_bytes()] == []

    # The frozen shim runs without any Python or venv on PATH and reports its build.
    res = subprocess.run([str(root / "usr/bin/containerd-shim-kata-v2"), "-v"],
                         capture_output=True, text=True, timeout=60,
                         env={"PATH": SYSTEM_PATH}, cwd="/")
    assert res.returncode == 0, res.stderr
    assert info["version"] in res.stdout and info["commit"] in res.stdout, res.stdout
    # The netlink worker the shim spawns as `<program> -m network.worker` (no `python -m`
    # when frozen) has pyroute2: in a fresh netns its scan finds only lo.
    request = json.dumps({"op": "scan", "netns": "/proc/self/ns/net", "fd_socket": None})
    res = subprocess.run(["unshare", "--net", "--", str(root / BUNDLE / "kata-py"), "-m",
                          "network.worker"], input=request, capture_output=True, text=True,
                         timeout=60, env={"PATH": SYSTEM_PATH})
    reply = json.loads(res.stdout)
    assert reply.get("config") is True and "has no interface but lo" in reply["error"], reply
    assert_removed(root, files)


def installed_config(root: Path, variant: str, path: Path, state_dir: Path) -> Path:
    """The package's configuration (of `variant`, '' = the default), with the test settings
    and the guest the package installed."""
    name = f"configuration-{variant}.toml" if variant else "configuration.toml"
    # The guest files the package installed, as the configuration names them.
    shipped = tomllib.loads((root / CONF_DIR / name).read_text())["hypervisor"]
    files = {k: v for table in shipped.values() for k, v in table.items()
             if k in ("kernel", "initrd", "image") and v}
    guest = {kataconfig.HYPERVISOR: {k: str(root / Path(v).relative_to("/"))
                                     for k, v in files.items()}}
    base = root / CONF_DIR / name
    return kataconfig.write(path, kataconfig.overrides_for_tests(state_dir, base=base), guest,
                            base=base)


@contextlib.contextmanager
def installed_containerd(root: Path, guest_release: str, image: Path) -> Iterator[Kata]:
    """A private containerd that finds the shims in the package's /usr/bin only."""
    cd = Containerd()
    with contextlib.closing(cd):
        kata = Kata(cd, cd.dir / "configuration.toml", cd.dir / "kata-state", guest_release)
        installed_config(root, "", kata.config_path, kata.state_dir)
        installed_config(root, VARIANT, cd.dir / f"configuration-{VARIANT}.toml",
                         kata.state_dir)
        cd.extra_env.update(PATH=f"{root / 'usr/bin'}:{SYSTEM_PATH}",
                            KATA_CONF_FILE=str(kata.config_path))
        assert str(REPO) not in cd.env["PATH"], cd.env["PATH"]
        cd.start()
        cd.import_image(image, IMAGE_REF)
        yield kata


def daemon_of(kata: Kata, shim: str) -> procs.Proc:
    daemons = [p for p in kata.shim_daemons() if os.path.basename(p.argv[0]) == shim]
    assert len(daemons) == 1, kata.shim_daemons()
    return daemons[0]


def assert_outside_checkout(pid: int, root: Path) -> None:
    """The process runs the package's program and maps nothing from the checkout."""
    assert os.readlink(f"/proc/{pid}/exe") == str(root / BUNDLE / "kata-py")
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert str(REPO) not in maps, [line for line in maps.splitlines() if str(REPO) in line][:5]
    assert f"{root / BUNDLE}/_internal/libpython3" in maps


def test_installed_package_runs_containers_without_the_checkout(
        installed: Path, guest_release: str, busybox_image: Path,
        request: pytest.FixtureRequest) -> None:
    from tests.e2e.conftest import leak_checked

    root = installed
    files = package_files(root)
    with installed_containerd(root, guest_release, busybox_image) as kata, \
            leak_checked(kata.cd, request, kata.state_dir):
        with detached(kata.cd, "io.containerd.kata.v2", "pkg-q35", "sleep", "120"):
            res = kata.cd.ctr("task", "exec", "--exec-id", "e1", "pkg-q35", "uname", "-r")
            assert res.returncode == 0 and res.stdout.strip() == guest_release, explain(res)
            daemon = daemon_of(kata, "containerd-shim-kata-v2")
            assert daemon.argv[0] == str(root / "usr/bin/containerd-shim-kata-v2")
            assert_outside_checkout(daemon.pid, root)
        # The variant's shim name selects configuration-qemu-microvm.toml (a microvm).
        runtime = f"io.containerd.kata-{VARIANT}.v2"
        with detached(kata.cd, runtime, "pkg-mvm", "sleep", "120"):
            res = kata.cd.ctr("task", "exec", "--exec-id", "e1", "pkg-mvm", "uname", "-r")
            assert res.returncode == 0 and res.stdout.strip() == guest_release, explain(res)
            daemon = daemon_of(kata, f"containerd-shim-kata-{VARIANT}-v2")
            assert_outside_checkout(daemon.pid, root)
            (qemu,) = [p for p in kata.qemu_processes() if "pkg-mvm" in p.cmdline]
            assert qemu.argv[qemu.argv.index("-machine") + 1].startswith("microvm,")
    assert processes_under(root) == []
    assert_removed(root, files)


def test_the_deb_installs_and_runs_on_a_fresh_debian_root(deb: Path, busybox_image: Path) -> None:
    """The README's .deb path as a new user takes it (build/try-deb-fresh.sh): a fresh
    bookworm root from debootstrap, `apt-get install ./kata-py_*.deb` there (apt fetches
    the dependencies), that root's own containerd runs busybox in a VM, `apt-get purge`
    leaves nothing. Needs the Debian mirror, as `make guest` does."""
    before = set(Path("/var/tmp").glob("kata-fresh.*"))
    done = subprocess.run([str(REPO / "build/try-deb-fresh.sh"), str(deb), str(busybox_image)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, explain(done)
    guest = [line for line in done.stdout.splitlines() if "guest kernel:" in line]
    assert guest and kataconfig.GUEST_DIR.joinpath("kernel-release").read_text().strip() in guest[0]
    assert "nothing of kata-py left" in done.stdout, done.stdout
    assert set(Path("/var/tmp").glob("kata-fresh.*")) == before  # the fresh root is removed
