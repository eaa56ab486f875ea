"""Guest image: build helpers (pure logic) and checks on the built artifacts.

The artifact checks read $KATA_GUEST_DIR (default build/out), made by `make guest`; they fail
(with a message saying so) when the artifacts are missing.
"""

from __future__ import annotations

import importlib.util
import io
import os
import stat
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUEST_DIR = Path(os.environ.get("KATA_GUEST_DIR", ROOT / "build" / "out"))


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "build" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


gb = _load("guestbuild")
Entry = Any  # guestbuild.CpioEntry (loaded from a path, so no static type)


# --------------------------------------------------------------------------- pure logic

DEP = """
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko \
kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/fs/fuse/virtiofs.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko \
kernel/fs/fuse/fuse.ko
kernel/fs/fuse/fuse.ko:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko.xz: \
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vsock.ko:
""".replace("\\\n", "")


def test_module_closure_orders_dependencies_first() -> None:
    deps = gb.parse_modules_dep(DEP)
    order, skipped = gb.module_closure(
        ["virtio_pci", "virtiofs", "vmw-vsock-virtio-transport", "overlay"], deps, {"overlay"}
    )
    assert skipped == ["overlay"]
    assert len(order) == len(set(order)) == 10
    for i, path in enumerate(order):
        for dep in deps[path]:
            assert order.index(dep) < i, f"{dep} must load before {path}"
    assert order[-1].endswith("vmw_vsock_virtio_transport.ko.xz")


def test_module_closure_rejects_unknown_and_cycles() -> None:
    deps = gb.parse_modules_dep(DEP)
    with pytest.raises(gb.BuildError, match="nosuch"):
        gb.module_closure(["nosuch"], deps, set())
    cyc = gb.parse_modules_dep("a.ko: b.ko\nb.ko: a.ko\n")
    with pytest.raises(gb.BuildError, match="cycle"):
        gb.module_closure(["a"], cyc, set())


def test_module_names_and_decompressed_names() -> None:
    assert gb.module_name("kernel/fs/fuse/virtiofs.ko.zst") == "virtiofs"
    assert gb.module_name("kernel/x/foo-bar.ko") == "foo_bar"
    assert gb.decompressed_name("a/b.ko.xz") == "a/b.ko"
    assert gb.decompressed_name("a/b.ko") == "a/b.ko"


def test_parse_ldd() -> None:
    out = """\tlinux-vdso.so.1 (0x00007ffd)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f)
"""
    assert gb.parse_ldd(out, "x") == {
        "libc.so.6": "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/ld-linux-x86-64.so.2": "/lib64/ld-linux-x86-64.so.2",
    }
    with pytest.raises(gb.BuildError, match="libfoo"):
        gb.parse_ldd("\tlibfoo.so.1 => not found\n", "x")


def _bzimage(payload: bytes, size: int, version: int = 0x20F) -> bytes:
    """A bzImage's setup header (2 setup sectors) and `payload` with `size` appended."""
    setup = bytearray(3 * 512)
    setup[0x1F1] = 2
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<II", setup, 0x248, 16, len(payload) + 4)
    return bytes(setup) + bytes(16) + payload + struct.pack("<I", size)


@pytest.mark.parametrize("compress", ["gzip", "xz"])
def test_extract_vmlinux_from_a_bzimage(compress: str) -> None:
    import gzip
    import lzma

    elf = b"\x7fELF" + bytes(range(256)) * 64
    packed = gzip.compress(elf) if compress == "gzip" else lzma.compress(elf)
    assert gb.extract_vmlinux(_bzimage(packed, len(elf))) == elf


def test_extract_vmlinux_refuses_what_it_cannot_read() -> None:
    import gzip

    with pytest.raises(gb.BuildError, match="not a bzImage"):
        gb.extract_vmlinux(b"\x7fELF" + bytes(4096))
    with pytest.raises(gb.BuildError, match=r"boot protocol before 2\.08"):
        gb.extract_vmlinux(_bzimage(b"", 0, version=0x207))
    with pytest.raises(gb.BuildError, match="did not decompress to an ELF kernel of 9 bytes"):
        gb.extract_vmlinux(_bzimage(gzip.compress(b"\x7fELF-ish"), 9))
    with pytest.raises(gb.BuildError, match="of 5 bytes"):  # the appended size disagrees
        gb.extract_vmlinux(_bzimage(gzip.compress(b"\x7fELF-ish"), 5))


def test_cpio_round_trip() -> None:
    entries = [
        gb.CpioEntry("bin", stat.S_IFDIR | 0o755),
        gb.CpioEntry("bin/busybox", stat.S_IFREG | 0o755, b"\x7fELF" + b"x" * 13),
        gb.CpioEntry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
        gb.CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
    ]
    buf = io.BytesIO()
    gb.write_cpio(buf, entries)
    data = buf.getvalue()
    assert len(data) % 4 == 0
    assert list(gb.read_cpio(data)) == entries


# --------------------------------------------------------------------------- artifacts


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} missing: build the guest first (make guest)")
    return path


@pytest.fixture(scope="module")
def initrd() -> dict[str, Entry]:
    data = gb.decompress_any(_need(GUEST_DIR / "initrd.img").read_bytes())
    return {"/" + e.name: e for e in gb.read_cpio(data)}


@pytest.fixture(scope="module")
def release() -> str:
    return _need(GUEST_DIR / "kernel-release").read_text().strip()


def _resolve(files: dict[str, Entry], path: str, depth: int = 0) -> Entry:
    """Follow symlinks inside the archive."""
    assert depth < 10, f"symlink loop at {path}"
    assert path in files, f"{path} not in the initrd"
    e = files[path]
    if stat.S_ISLNK(e.mode):
        target = e.data.decode()
        full = (
            target
            if target.startswith("/")
            else os.path.normpath(os.path.join(os.path.dirname(path), target))
        )
        return _resolve(files, full, depth + 1)
    return e


def _elf_sections(data: bytes) -> dict[str, bytes]:
    assert data[:4] == b"\x7fELF" and data[4] == 2, "64-bit ELF expected"
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    hdrs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = hdrs[shstrndx]
    names = data[strtab[4] : strtab[4] + strtab[5]]
    out: dict[str, bytes] = {}
    for h in hdrs:
        name = names[h[0] : names.index(b"\0", h[0])].decode()
        out[name] = data[h[4] : h[4] + h[5]]
    return out


def _needed(data: bytes) -> tuple[list[str], str | None]:
    """DT_NEEDED names and PT_INTERP of an ELF file."""
    sec = _elf_sections(data)
    dynstr = sec.get(".dynstr", b"")
    needed = []
    dyn = sec.get(".dynamic", b"")
    for off in range(0, len(dyn), 16):
        tag, val = struct.unpack_from("<qQ", dyn, off)
        if tag == 0:
            break
        if tag == 1:  # DT_NEEDED
            needed.append(dynstr[val : dynstr.index(b"\0", val)].decode())
    interp = sec.get(".interp")
    return needed, interp.rstrip(b"\0").decode() if interp else None


def _check_libs(files: dict[str, Entry], exe: str, extra_dirs: tuple[str, ...]) -> set[str]:
    """Every library ``exe`` loads is in the image; returns the paths of its closure."""
    todo = [exe]
    seen: set[str] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        needed, interp = _needed(_resolve(files, path).data)
        if interp:
            _resolve(files, interp)
        for lib in needed:
            cands = [f"{d}/{lib}" for d in ("/lib/x86_64-linux-gnu", *extra_dirs)]
            found = [c for c in cands if c in files]
            assert found, f"{lib} needed by {path} is not in {cands}"
            todo.append(found[0])
    return seen


def test_init_script(initrd: dict[str, Entry]) -> None:
    init = initrd["/init"]
    assert stat.S_ISREG(init.mode) and init.mode & 0o111
    text = init.data.decode()
    assert text.startswith("#!/bin/sh\n")
    for fs in ("proc", "sysfs", "devtmpfs"):
        assert f"-t {fs}" in text
    assert "kata-init:" in text
    assert text.rstrip().splitlines()[-1] == (
        "exec /opt/kata-agent/kata-agent -I -S /opt/kata-agent/main.pyc")


def test_layout(initrd: dict[str, Entry]) -> None:
    for d in ("/proc", "/sys", "/dev", "/run", "/tmp", "/etc"):
        assert stat.S_ISDIR(initrd[d].mode), d
    console = initrd["/dev/console"]
    assert stat.S_ISCHR(console.mode) and console.rdev == (5, 1)
    assert initrd["/etc/passwd"].data.startswith(b"root:x:0:0:")
    assert initrd["/etc/group"].data.startswith(b"root:x:0:")
    assert stat.S_ISREG(initrd["/bin/busybox"].mode)
    for applet in ("/bin/sh", "/bin/mount", "/sbin/poweroff", "/sbin/insmod"):
        assert stat.S_ISREG(_resolve(initrd, applet).mode), applet
        assert _resolve(initrd, applet) is initrd["/bin/busybox"]


def test_crun_and_its_libraries(initrd: dict[str, Entry]) -> None:
    crun = initrd["/usr/bin/crun"]
    assert stat.S_ISREG(crun.mode) and crun.mode & 0o111
    _check_libs(initrd, "/usr/bin/crun", ())


#: What Debian's libsystemd would bring into every crun call (build/crun-nosystemd.c).
LIBSYSTEMD_DEPENDENCIES = ("libgcrypt", "libgpg-error", "liblzma", "libzstd", "liblz4")


def _versioned_symbols(tmp: Path, data: bytes, which: str) -> set[str]:
    """``name@VERSION`` of the sd_* symbols an ELF defines or imports (``nm -D``)."""
    path = tmp / f"elf-{which}"
    path.write_bytes(data)
    out = subprocess.run(["nm", "-D", f"--{which}-only", str(path)], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return {line.split()[-1].replace("@@", "@") for line in out.splitlines()
            if line.split()[-1].startswith("sd_")}


def test_crun_gets_the_guest_libsystemd(initrd: dict[str, Entry], tmp_path: Path) -> None:
    closure = _check_libs(initrd, "/usr/bin/crun", ())
    brought = [p for p in closure for dep in LIBSYSTEMD_DEPENDENCIES if dep in p]
    assert not brought, f"crun loads Debian libsystemd's dependencies: {brought}"
    libsystemd = _resolve(initrd, "/lib/x86_64-linux-gnu/libsystemd.so.0").data
    assert len(libsystemd) < 64 * 2**10, f"libsystemd is {len(libsystemd)} bytes, not ours"
    imported = _versioned_symbols(tmp_path, initrd["/usr/bin/crun"].data, "undefined")
    defined = _versioned_symbols(tmp_path, libsystemd, "defined")
    assert imported, "crun imports no sd_* symbol: is it still linked with libsystemd?"
    assert imported <= defined, f"missing from the guest libsystemd: {imported - defined}"


def test_the_agent_runs_on_the_interpreter_with_its_modules_beside_it(
        initrd: dict[str, Entry]) -> None:
    """/opt/kata-agent/kata-agent is the Python binary; the standard library and our
    packages are plain .pyc files in its prefix; no PyInstaller launcher, bootstrap or
    bundled library directory (guestbuild.add_agent)."""
    exe = initrd["/opt/kata-agent/kata-agent"]
    assert stat.S_ISREG(exe.mode) and exe.mode & 0o111
    assert b"Py_BytesMain" in exe.data, "not a Python interpreter"
    closure = _check_libs(initrd, "/opt/kata-agent/kata-agent", ())
    stdlib = "/opt/kata-agent/lib/python3.11"
    assert "/opt/kata-agent/main.pyc" in initrd
    for landmark in ("os.pyc", "encodings/__init__.pyc", "agent/__main__.pyc",
                     "google/_upb", "lib-dynload"):
        assert f"{stdlib}/{landmark}" in initrd, landmark
    assert not [p for p in initrd if "/_internal" in p or "pyimod" in p or "pyiboot" in p]
    # Every extension module's libraries are in the system directory: the bundle drops
    # libstdc++, which protobuf's upb module names but never calls (build/freeze-agent.sh).
    objects = [p for p in initrd if p.startswith(f"{stdlib}/") and ".so" in p
               and stat.S_ISREG(initrd[p].mode)]
    assert objects, "no extension modules"
    for obj in objects:
        _check_libs(initrd, obj, ())
    for lib in closure:
        assert ".symtab" not in _elf_sections(_resolve(initrd, lib).data), lib
    size = sum(len(e.data) for p, e in initrd.items() if p.startswith("/opt/kata-agent/"))
    assert size < 40 * 2**20, f"agent bundle grew to {size / 2**20:.1f} MiB"
    for dead in ("tkinter", "unittest", "pydoc_data", "grpc_tools", "libcrypto", "libssl",
                 "libstdc++"):
        hits = [p for p in initrd if dead in p and (p.startswith("/opt/kata-agent/")
                                                    or p.startswith("/lib/"))]
        assert not hits, f"pruned module {dead} is in the guest: {hits[:3]}"


def test_modules_list(initrd: dict[str, Entry], release: str) -> None:
    listing = initrd["/etc/kata-agent/modules.list"].data.decode().splitlines()
    assert listing, "modules.list is empty"
    names = [gb.module_name(p) for p in listing]
    for want in gb.DEFAULT_MODULES:
        assert want in names, f"{want} missing from modules.list"
    for i, path in enumerate(listing):
        assert path.startswith(f"/lib/modules/{release}/") and path.endswith(".ko"), path
        mod = initrd[path]
        assert mod.data[:4] == b"\x7fELF", f"{path} is not an uncompressed module"
        modinfo = _elf_sections(mod.data)[".modinfo"].split(b"\0")
        deps = [f.split(b"=", 1)[1].decode() for f in modinfo if f.startswith(b"depends=")]
        for dep in deps[0].split(",") if deps and deps[0] else []:
            dep = dep.replace("-", "_")
            assert dep in names[:i], f"{names[i]} needs {dep}, which is not listed before it"


def test_device_modules_are_in_the_image_but_not_in_the_load_list(
        initrd: dict[str, Entry]) -> None:
    listing = initrd["/etc/kata-agent/modules.list"].data.decode().splitlines()
    lines = [line.split() for line in
             initrd["/etc/kata-agent/modules.virtio"].data.decode().splitlines()]
    by_id = {int(device): paths for device, *paths in lines}
    assert set(by_id) == {device for device, _ in gb.DEVICE_MODULES}
    # Each line has what its module needs beyond the list, dependencies first; what they
    # share with the list (virtio, virtio_ring) is loaded from the list.
    assert [gb.module_name(p) for p in by_id[5]] == ["virtio_balloon"]
    assert [gb.module_name(p) for p in by_id[1]] == ["failover", "net_failover", "virtio_net"]
    assert [gb.module_name(p) for p in by_id[2]] == ["virtio_blk"]
    assert [gb.module_name(p) for p in by_id[19]] == [
        "vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport"]
    for path in (p for paths in by_id.values() for p in paths):
        assert path not in listing, f"{path} would load on every boot"
        assert initrd[path].data[:4] == b"\x7fELF"


def test_kernel_release_matches(initrd: dict[str, Entry], release: str) -> None:
    mod_dirs = {
        p.split("/")[3] for p in initrd if p.startswith("/lib/modules/") and p.count("/") > 3
    }
    assert mod_dirs == {release}
    kernel = _need(GUEST_DIR / "vmlinuz").read_bytes()
    assert kernel[0x202:0x206] == b"HdrS", "vmlinuz is not a bzImage"
    (ver_off,) = struct.unpack_from("<H", kernel, 0x20E)
    version = kernel[0x200 + ver_off : 0x200 + ver_off + 256].split(b"\0")[0].decode()
    assert version.split()[0] == release, f"vmlinuz is {version!r}, modules are {release}"


def test_vmlinux_is_the_bzimages_kernel_with_a_pvh_entry(release: str) -> None:
    from hypervisors.qemu.kernelfile import pvh_problem

    vmlinux = _need(GUEST_DIR / "vmlinux")
    assert pvh_problem(str(vmlinux)) is None
    assert gb.extract_vmlinux(_need(GUEST_DIR / "vmlinuz").read_bytes()) == vmlinux.read_bytes()
    assert release.encode() in vmlinux.read_bytes()


def test_manifest(release: str) -> None:
    text = _need(GUEST_DIR / "MANIFEST").read_text()
    assert f"linux-image-{release} " in text
    for want in ("busybox-static ", "crun ", "initrd.img ", "vmlinux ", "vmlinuz ",
                 "[libraries]"):
        assert want in text, want


def _fake_bundle(root: Path, pydir: str) -> Path:
    bundle = root / "bundle"
    internal = bundle / "_internal"
    (internal / pydir / "lib-dynload").mkdir(parents=True)
    (internal / pydir / "lib-dynload" / "zlib.cpython-311-x86_64-linux-gnu.so").write_bytes(b"x")
    (internal / "agent").mkdir()
    (internal / "agent" / "__main__.pyc").write_bytes(b"pyc")
    (internal / "libpython3.11.so.1.0").write_bytes(b"lib")
    (internal / "libz.so.1").write_bytes(b"z")
    (bundle / "kata-agent").write_bytes(b"launcher")
    return bundle


def test_add_agent_lays_the_bundle_out_as_the_interpreters_prefix(tmp_path: Path) -> None:
    interpreter = Path(os.path.realpath(sys._base_executable))
    tree = tmp_path / "tree"
    info = gb.TreeInfo(kernel_release="x")
    entry = tmp_path / "entry.py"
    entry.write_text("import sys\nprint(sys.argv)\n")
    elves = gb.add_agent(tree, _fake_bundle(tmp_path, "python3.11"), interpreter, entry, info)
    home = tree / gb.AGENT_DIR
    assert elves[0] == home / "kata-agent"
    assert (home / "kata-agent").read_bytes() == interpreter.read_bytes()
    stdlib = home / "lib/python3.11"
    assert (stdlib / "agent/__main__.pyc").read_bytes() == b"pyc"
    assert (stdlib / "lib-dynload/zlib.cpython-311-x86_64-linux-gnu.so").is_file()
    assert not (stdlib / "python3.11").exists() and not (stdlib / "libpython3.11.so.1.0").exists()
    # The bundle's libraries go where ld.so looks without LD_LIBRARY_PATH; libpython, if the
    # interpreter needs it, comes with its other libraries.
    assert (tree / gb.LIB_DIR / "libz.so.1").read_bytes() == b"z"
    assert not (tree / gb.LIB_DIR / "libpython3.11.so.1.0").exists()
    assert info.agent_bytes > interpreter.stat().st_size
    # The entry, compiled by the interpreter that runs it, and runnable as /init runs it.
    run = subprocess.run([str(interpreter), "-I", "-S", str(home / "main.pyc"), "x"],
                         check=True, stdout=subprocess.PIPE, text=True)
    assert run.stdout.strip().endswith("'x']"), run.stdout
    assert str(tmp_path).encode() not in (home / "main.pyc").read_bytes()  # no build path


def test_add_agent_refuses_a_bundle_of_another_python(tmp_path: Path) -> None:
    interpreter = Path(os.path.realpath(sys._base_executable))
    with pytest.raises(gb.BuildError, match=r"python3\.10, the Python the agent bundle"):
        gb.add_agent(tmp_path / "tree", _fake_bundle(tmp_path, "python3.10"), interpreter,
                     tmp_path / "entry.py", gb.TreeInfo(kernel_release="x"))
    with pytest.raises(gb.BuildError, match="no PyInstaller onedir agent bundle"):
        gb.add_agent(tmp_path / "tree2", tmp_path / "nothing", interpreter,
                     tmp_path / "entry.py", gb.TreeInfo(kernel_release="x"))
