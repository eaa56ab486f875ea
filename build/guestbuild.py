#!/usr/bin/env python3
"""Guest image helpers for ``make guest`` (see build/README.md).

Subcommands:
  initrd    assemble the initrd tree (busybox, crun + libraries, kernel modules, the frozen
            agent, /init) and write it as a newc cpio, optionally compressed
  manifest  write MANIFEST: package versions, sizes and sha256 of the inputs and outputs
  list      list the entries of a (possibly compressed) newc cpio
  vmlinux   the uncompressed ELF kernel inside a bzImage (QEMU boots it through its PVH
            entry: no decompression in the guest, no copy of the kernel in QEMU's memory)

Only the standard library is used, so the host python3 runs this as well as the venv's.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

# Modules every guest loads at start; their dependency closure comes from modules.dep.
DEFAULT_MODULES: tuple[str, ...] = (
    "virtio_pci",
    "virtio_mmio",  # microvm (and StratoVirt): devices without PCI
    "virtio_console",
    "fuse",
    "virtiofs",
    "overlay",
)
# Modules the agent loads only when the guest has the virtio device (by virtio device id)
# that needs them: each costs guest start-up time under TCG (build/README.md "Modules").
# 1: a NIC (pods with a network; a NIC hot-plugged later gets its driver when the host
# asks the agent to set it up), 2: a disk, 5: the balloon (reclaim_guest_freed_memory),
# 19: virtio-vsock (the agent's channel when the VM has one).
DEVICE_MODULES: tuple[tuple[int, str], ...] = (
    (1, "virtio_net"),
    (2, "virtio_blk"),
    (5, "virtio_balloon"),
    (19, "vmw_vsock_virtio_transport"),
)
LIB_DIR = "lib/x86_64-linux-gnu"
LOADER = "lib64/ld-linux-x86-64.so.2"
AGENT_DIR = "opt/kata-agent"
ENTRY_PYC = "main.pyc"  # in AGENT_DIR: the agent's entry script, run by /init
MODULES_LIST = "etc/kata-agent/modules.list"
DEVICE_MODULES_LIST = "etc/kata-agent/modules.virtio"
KO_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


class BuildError(Exception):
    """A build input is missing or inconsistent."""


# --------------------------------------------------------------------------- kernel modules


def module_name(path: str) -> str:
    """``kernel/fs/fuse/virtiofs.ko.xz`` -> ``virtiofs`` (dashes normalised to underscores)."""
    base = path.rsplit("/", 1)[-1]
    for suffix in KO_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """modules.dep (``path: dep dep ...``) -> {path: [dep paths]}."""
    deps: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        path, _, rest = line.partition(":")
        deps[path.strip()] = rest.split()
    return deps


def parse_modules_builtin(text: str) -> set[str]:
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def module_closure(
    wanted: Iterable[str], deps: dict[str, list[str]], builtin: set[str]
) -> tuple[list[str], list[str]]:
    """Paths of ``wanted`` and everything they need, each after its dependencies.

    Returns (load order, names skipped because they are built in)."""
    by_name = {module_name(p): p for p in deps}
    order: list[str] = []
    done: set[str] = set()
    skipped: list[str] = []

    def visit(path: str, stack: tuple[str, ...]) -> None:
        if path in done:
            return
        if path in stack:
            raise BuildError(f"module dependency cycle: {' -> '.join((*stack, path))}")
        for dep in deps.get(path, []):
            visit(dep, (*stack, path))
        done.add(path)
        order.append(path)

    for raw in wanted:
        name = raw.replace("-", "_")
        if name in by_name:
            visit(by_name[name], ())
        elif name in builtin:
            skipped.append(name)
        else:
            raise BuildError(f"kernel module {name!r} is neither in modules.dep nor built in")
    return order, skipped


def decompressed_name(path: str) -> str:
    for suffix in (".xz", ".zst", ".gz"):
        if path.endswith(".ko" + suffix):
            return path[: -len(suffix)]
    return path


def read_module(path: Path) -> bytes:
    """A module's ELF bytes, decompressed when the package ships .ko.xz/.zst/.gz
    (finit_module on a compressed module needs kernel support we do not rely on)."""
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        return subprocess.run(["zstd", "-dc", str(path)], check=True, stdout=subprocess.PIPE).stdout
    return path.read_bytes()


# --------------------------------------------------------------------------- shared libraries


def is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def parse_ldd(text: str, what: str) -> dict[str, str]:
    """ldd output -> {name: resolved path}; the loader appears under its absolute path."""
    libs: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or "statically linked" in line or "not a dynamic executable" in line:
            continue
        if "=>" in line:
            name, _, rest = line.partition("=>")
            target = rest.strip().split(" (", 1)[0].strip()
            if target == "not found" or not target:
                raise BuildError(f"{what}: library {name.strip()} not found by ldd")
            libs[name.strip()] = target
        else:
            first = line.split(" (", 1)[0].strip()
            if first.startswith("/"):
                libs[first] = first  # the dynamic loader
            # linux-vdso.so.1 and friends have no file
    return libs


def ldd(path: Path, lib_dir: Path | None = None) -> dict[str, str]:
    """``path``'s libraries as ld.so would resolve them, ``lib_dir`` searched first."""
    env = {**os.environ, "LD_LIBRARY_PATH": str(lib_dir)} if lib_dir else None
    proc = subprocess.run(
        ["ldd", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env,
    )
    if proc.returncode != 0:
        if "not a dynamic executable" in proc.stdout:
            return {}
        raise BuildError(f"ldd {path} failed: {proc.stdout.strip()}")
    return parse_ldd(proc.stdout, str(path))


# --------------------------------------------------------------------------- cpio (newc)


@dataclass(frozen=True)
class CpioEntry:
    name: str  # without leading slash
    mode: int  # full st_mode (type | permissions)
    data: bytes = b""  # file contents, or symlink target
    rdev: tuple[int, int] = (0, 0)


def _pad4(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


def write_cpio(out: BinaryIO, entries: Iterable[CpioEntry], mtime: int = 0) -> None:
    """A deterministic newc archive: owner root, fixed mtime, inode = index."""
    trailer = CpioEntry("TRAILER!!!", 0)
    for index, e in enumerate([*entries, trailer], start=1):
        name = e.name.encode() + b"\0"
        ino = 0 if e is trailer else index
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        fields = (
            ino, e.mode, 0, 0, nlink, mtime, len(e.data),
            0, 0, e.rdev[0], e.rdev[1], len(name), 0,
        )  # fmt: skip
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        out.write(header + name + _pad4(len(header) + len(name)))
        out.write(e.data + _pad4(len(e.data)))


def read_cpio(data: bytes) -> Iterator[CpioEntry]:
    """Parse a newc archive (uncompressed bytes)."""
    pos = 0
    while pos < len(data):
        if data[pos : pos + 6] != b"070701":
            raise BuildError(f"bad cpio magic at {pos}")
        f = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        pos += 110
        name = data[pos : pos + namesize - 1].decode()
        pos += namesize
        pos += (4 - pos % 4) % 4
        body = data[pos : pos + size]
        pos += size
        pos += (4 - pos % 4) % 4
        if name == "TRAILER!!!":
            return
        yield CpioEntry(name, mode, body, (rmaj, rmin))


def decompress_any(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        return subprocess.run(
            ["zstd", "-dc"], input=data, check=True, stdout=subprocess.PIPE
        ).stdout
    if data[:4] == b"\x02\x21\x4c\x18":  # lz4 legacy (what the kernel reads)
        return subprocess.run(["lz4", "-dc"], input=data, check=True, stdout=subprocess.PIPE).stdout
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data, format=lzma.FORMAT_XZ)
    return data


#: The bzImage setup header (Documentation/arch/x86/boot.rst): its magic, and where the
#: compressed kernel (payload_offset, payload_length, from boot protocol 2.08) is.
_HDRS_OFFSET, _HDRS = 0x202, b"HdrS"
_SETUP_SECTS, _VERSION, _PAYLOAD = 0x1F1, 0x206, 0x248


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel a bzImage carries compressed (gzip, xz, zstd or lz4)."""
    if bzimage[_HDRS_OFFSET:_HDRS_OFFSET + 4] != _HDRS:
        raise BuildError("not a bzImage (no HdrS setup header)")
    if int.from_bytes(bzimage[_VERSION:_VERSION + 2], "little") < 0x208:
        raise BuildError("bzImage boot protocol before 2.08: no payload offset")
    setup_bytes = ((bzimage[_SETUP_SECTS] or 4) + 1) * 512
    offset = setup_bytes + int.from_bytes(bzimage[_PAYLOAD:_PAYLOAD + 4], "little")
    length = int.from_bytes(bzimage[_PAYLOAD + 4:_PAYLOAD + 8], "little")
    # The kernel's build appends the uncompressed size to every compressed payload.
    payload = bzimage[offset:offset + length - 4]
    size = int.from_bytes(bzimage[offset + length - 4:offset + length], "little")
    elf = decompress_any(payload)
    if elf[:4] != b"\x7fELF" or len(elf) != size:
        raise BuildError(f"the bzImage's payload ({payload[:4].hex()}...) did not "
                         f"decompress to an ELF kernel of {size} bytes")
    return elf


def tree_entries(root: Path) -> Iterator[CpioEntry]:
    """Entries for everything under ``root``, parents before children, sorted."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted([*dirnames, *filenames]):
            p = base / name
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                yield CpioEntry(rel, stat.S_IFLNK | 0o777, os.readlink(p).encode())
            elif stat.S_ISDIR(st.st_mode):
                yield CpioEntry(rel, stat.S_IFDIR | stat.S_IMODE(st.st_mode))
            elif stat.S_ISREG(st.st_mode):
                yield CpioEntry(rel, stat.S_IFREG | stat.S_IMODE(st.st_mode), p.read_bytes())
            else:
                raise BuildError(f"unsupported file type in the initrd tree: {p}")


# --------------------------------------------------------------------------- initrd tree

INIT_DEVICES = (  # created in the archive so no mknod is needed at build time
    CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
    CpioEntry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
)


@dataclass
class TreeInfo:
    kernel_release: str
    modules: list[str] = field(default_factory=list)
    device_modules: list[str] = field(default_factory=list)  # "<virtio id> <path>..."
    builtin_skipped: list[str] = field(default_factory=list)
    libraries: dict[str, str] = field(default_factory=dict)  # guest path -> host source
    agent_bytes: int = 0
    tree_bytes: int = 0
    interpreter: str = ""  # host file /opt/kata-agent/kata-agent was copied from


def _copy(src: Path, dst: Path, mode: int | None = None) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    os.chmod(dst, mode if mode is not None else stat.S_IMODE(src.stat().st_mode))


def kernel_release(kernel_root: Path) -> str:
    rels = sorted(p.name for p in (kernel_root / "lib/modules").iterdir() if p.is_dir())
    if len(rels) != 1:
        raise BuildError(f"expected one kernel release in {kernel_root}/lib/modules, got {rels}")
    return rels[0]


def kernel_modules(kernel_root: Path) -> tuple[Path, dict[str, list[str]], set[str]]:
    """The unpacked kernel's module directory, its modules.dep and its built-in modules."""
    rel = kernel_release(kernel_root)
    src_dir = kernel_root / "lib/modules" / rel
    dep_file = src_dir / "modules.dep"
    if not dep_file.is_file():
        raise BuildError(f"{dep_file} missing: run depmod -b {kernel_root} {rel}")
    builtin_file = src_dir / "modules.builtin"
    builtin = parse_modules_builtin(builtin_file.read_text()) if builtin_file.is_file() else set()
    return src_dir, parse_modules_dep(dep_file.read_text()), builtin


def add_modules(tree: Path, kernel_root: Path, wanted: Sequence[str], info: TreeInfo) -> None:
    rel = info.kernel_release
    src_dir, deps, builtin = kernel_modules(kernel_root)
    order, skipped = module_closure(wanted, deps, builtin)
    dst_dir = tree / "lib/modules" / rel
    guest_paths = [_add_module(src_dir, dst_dir, rel, path) for path in order]
    # Per device: what its module needs beyond the list, dependencies first.
    device_lines: list[str] = []
    on_demand: list[str] = []
    for device_id, name in DEVICE_MODULES:
        extra, _ = module_closure([name], deps, builtin)
        extra = [p for p in extra if p not in order]
        on_demand += [p for p in extra if p not in on_demand]
        if extra:
            paths = [_add_module(src_dir, dst_dir, rel, p) for p in extra]
            device_lines.append(" ".join([str(device_id), *paths]))
    # A modules.dep for the chosen set, so busybox modprobe works for debugging.
    lines = [
        f"{decompressed_name(p)}: {' '.join(decompressed_name(d) for d in deps.get(p, []))}"
        for p in [*order, *on_demand]
    ]
    (dst_dir / "modules.dep").write_text("\n".join(lines) + "\n")
    ml = tree / MODULES_LIST
    ml.parent.mkdir(parents=True, exist_ok=True)
    ml.write_text("".join(p + "\n" for p in guest_paths))
    (tree / DEVICE_MODULES_LIST).write_text("".join(line + "\n" for line in device_lines))
    info.modules = guest_paths
    info.device_modules = device_lines
    info.builtin_skipped = skipped


def _add_module(src_dir: Path, dst_dir: Path, rel: str, path: str) -> str:
    """Copy one module (uncompressed) into the tree; its path in the guest."""
    out_rel = decompressed_name(path)
    out = dst_dir / out_rel
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(read_module(src_dir / path))
    out.chmod(0o644)
    return f"/lib/modules/{rel}/{out_rel}"


def add_libraries(
    tree: Path, elves: Sequence[Path], info: TreeInfo, lib_dir: Path | None = None,
) -> None:
    """Copy the shared libraries ``elves`` need (per ldd) to /lib/x86_64-linux-gnu, and link
    the loader from /lib64. Libraries in ``lib_dir`` replace the host's of that name (the
    crun-only libsystemd, build/crun-nosystemd.c), and so do their dependencies."""
    needed: dict[str, str] = {}
    for elf in elves:
        for name, path in ldd(elf, lib_dir).items():
            needed["ld-linux-x86-64.so.2" if name.startswith("/") else Path(name).name] = path
    for name, src in sorted(needed.items()):
        real = Path(os.path.realpath(src))
        dst = tree / LIB_DIR / name
        _copy(real, dst, 0o755)
        info.libraries[f"/{LIB_DIR}/{name}"] = str(real)
    if "ld-linux-x86-64.so.2" in needed:
        loader = tree / LOADER
        loader.parent.mkdir(parents=True, exist_ok=True)
        loader.symlink_to(f"../{LIB_DIR}/ld-linux-x86-64.so.2")


def has_symbol_table(path: Path) -> bool:
    out = subprocess.run(["readelf", "-S", "--wide", str(path)], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return " .symtab " in out


def strip_symbols(paths: Iterable[Path]) -> None:
    """Strip the symbol tables and debug sections Debian's packages already went without:
    an interpreter built from source (pyenv's) carries them, ~17 MiB in its libpython."""
    for path in paths:
        if path.is_file() and not path.is_symlink() and is_elf(path) and has_symbol_table(path):
            subprocess.run(["strip", str(path)], check=True)


def add_busybox(tree: Path, busybox: Path) -> None:
    _copy(busybox, tree / "bin/busybox", 0o755)
    listing = subprocess.run(
        [str(busybox), "--list-full"], check=True, stdout=subprocess.PIPE, text=True
    ).stdout
    for applet in listing.split():
        link = tree / applet
        if applet == "bin/busybox" or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        depth = applet.count("/")
        link.symlink_to("../" * depth + "bin/busybox")


def bundle_python_dir(bundle: Path) -> str:
    """``python3.11``: the bundle's ``_internal/python3.X`` (its lib-dynload's parent)."""
    found = sorted(p.name for p in (bundle / "_internal").glob("python3.*") if p.is_dir())
    if len(found) != 1:
        raise BuildError(f"{bundle}: expected one _internal/python3.X directory, found {found}")
    return found[0]


def interpreter_python_dir(interpreter: Path) -> str:
    """``python3.11`` for the interpreter binary, by asking it."""
    code = "import sys; print('python%d.%d' % sys.version_info[:2])"
    out = subprocess.run([str(interpreter), "-I", "-S", "-c", code], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return out.strip()


def compile_entry(interpreter: Path, entry: Path, out: Path) -> None:
    """``entry`` as bytecode, by the interpreter that runs it, with PyInstaller's
    ``--optimize 1`` like the rest of the agent. The file name the code records is the
    entry's own name, not the build's path (as PyInstaller records module names)."""
    if not entry.is_file():
        raise BuildError(f"{entry}: no agent entry script")
    code = ("import py_compile, sys; py_compile.compile(sys.argv[1], cfile=sys.argv[2], "
            "dfile=sys.argv[3], doraise=True, optimize=1)")
    subprocess.run([str(interpreter), "-I", "-S", "-c", code, str(entry), str(out), entry.name],
                   check=True)
    out.chmod(0o644)


def add_agent(tree: Path, bundle: Path, interpreter: Path, entry: Path,
              info: TreeInfo) -> list[Path]:
    """The agent as the interpreter binary ``/opt/kata-agent/kata-agent`` with the modules
    PyInstaller collected (``bundle``, a --onedir bundle) in its standard library directory
    ``/opt/kata-agent/lib/python3.X``, which the interpreter finds from its own path, and
    the entry script compiled to ``/opt/kata-agent/main.pyc`` (what /init runs).

    PyInstaller's launcher, its shared libpython and its bootstrap are left out: started
    through them, the agent spent 0.06 s (pyenv's interpreter) to 0.12 s (Debian's) more of
    every guest's start under TCG (build/README.md "Agent"). The bundle's own libraries go
    to the system directory. Returns the ELF files whose libraries the guest needs."""
    exe = bundle / "kata-agent"
    internal = bundle / "_internal"
    if not (exe.is_file() and internal.is_dir()):
        raise BuildError(f"{bundle}: no PyInstaller onedir agent bundle (freeze-agent.sh)")
    pydir = bundle_python_dir(bundle)
    if interpreter_python_dir(interpreter) != pydir:
        raise BuildError(f"{interpreter} is not {pydir}, the Python the agent bundle was "
                         "built with: pass the venv's base interpreter")
    home = tree / AGENT_DIR
    stdlib = home / "lib" / pydir
    shutil.copytree(internal, stdlib, symlinks=True, ignore=shutil.ignore_patterns(pydir))
    shutil.copytree(internal / pydir / "lib-dynload", stdlib / "lib-dynload", symlinks=True)
    for lib in [p for p in stdlib.iterdir() if p.name.startswith("lib") and ".so" in p.name]:
        if not lib.name.startswith("libpython"):
            _copy(lib, tree / LIB_DIR / lib.name, 0o755)
            info.libraries[f"/{LIB_DIR}/{lib.name}"] = f"{internal}/{lib.name}"
        lib.unlink()
    _copy(interpreter, home / "kata-agent", 0o755)
    info.interpreter = str(interpreter)
    compile_entry(interpreter, entry, home / ENTRY_PYC)
    files = [p for p in home.rglob("*") if p.is_file() and not p.is_symlink()]
    info.agent_bytes = sum(p.stat().st_size for p in files)
    return [home / "kata-agent", *(p for p in files if is_elf(p) and p.name != "kata-agent")]


def build_tree(
    tree: Path,
    kernel_root: Path,
    busybox: Path,
    crun: Path,
    agent: Path,
    interpreter: Path,
    entry: Path,
    init: Path,
    modules: Sequence[str],
    lib_dir: Path | None = None,
) -> TreeInfo:
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    for d in ("proc", "sys", "dev", "run", "tmp", "etc/kata-agent", "root", "mnt", "newroot"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    (tree / "tmp").chmod(0o1777)
    (tree / "root").chmod(0o700)
    (tree / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (tree / "etc/group").write_text("root:x:0:\n")
    (tree / "etc/hostname").write_text("kata\n")
    _copy(init, tree / "init", 0o755)

    info = TreeInfo(kernel_release=kernel_release(kernel_root))
    add_busybox(tree, busybox)
    _copy(crun, tree / "usr/bin/crun", 0o755)

    agent_elves = add_agent(tree, agent, interpreter, entry, info)
    add_libraries(tree, [tree / "usr/bin/crun", *agent_elves], info, lib_dir)
    strip_symbols([agent_elves[0], *(tree / LIB_DIR).iterdir()])
    add_modules(tree, kernel_root, modules, info)
    info.tree_bytes = sum(
        st.st_size for st in (p.lstat() for p in tree.rglob("*")) if stat.S_ISREG(st.st_mode)
    )
    return info


def write_initrd(tree: Path, out: Path, compression: str) -> None:
    tmp = out.with_name(out.name + ".tmp")
    raw = out.with_name(out.name + ".cpio")
    with raw.open("wb") as f:
        write_cpio(f, [*tree_entries(tree), *INIT_DEVICES])
    if compression == "none":
        raw.replace(tmp)
    elif compression == "gzip":
        with raw.open("rb") as src, gzip.open(tmp, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
    elif compression == "zstd":
        subprocess.run(["zstd", "-q", "-f", "-19", str(raw), "-o", str(tmp)], check=True)
        raw.unlink()
    elif compression == "lz4":
        subprocess.run(["lz4", "-q", "-f", "-l", "-9", str(raw), str(tmp)], check=True)
        raw.unlink()
    else:
        raise BuildError(f"unknown initrd compression {compression!r}")
    tmp.replace(out)


# --------------------------------------------------------------------------- manifest


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def debian_package_of(path: str) -> str:
    """``dpkg -S`` owner and version of a host file (``?`` when dpkg does not know it)."""
    candidates = [path, os.path.realpath(path)]
    real = os.path.realpath(path)
    if real.startswith("/usr/lib/"):
        candidates.append(real.removeprefix("/usr"))
    for cand in candidates:
        proc = subprocess.run(
            ["dpkg", "-S", cand], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        if proc.returncode == 0 and proc.stdout:
            pkg = proc.stdout.split(":", 1)[0].split(",")[0].strip()
            ver = subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", pkg],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            ).stdout.strip()
            return f"{pkg} {ver}"
    return "?"


def write_manifest(args: argparse.Namespace) -> None:
    info = json.loads(Path(args.info).read_text())
    out_dir = Path(args.out_dir)
    lines = ["# kata-py guest image (make guest); see build/README.md", ""]
    lines.append("[debian packages]  package version sha256(.deb)")
    for raw in Path(args.debs_lock).read_text().splitlines():
        if not raw.strip() or raw.startswith("#"):
            continue
        pkg, ver, fname = raw.split()[:3]
        deb = Path(args.debs_lock).parent / fname
        lines.append(f"{pkg} {ver} {sha256(deb)}")
    lines += ["", "[agent]"]
    lines.append(f"entry {args.agent_entry}")
    lines.append(f"python {args.python_version}")
    interpreter = info.get("interpreter", "")
    lines.append(f"interpreter {interpreter} ({debian_package_of(interpreter)})")
    h = hashlib.sha256()
    for src in sorted(args.agent_sources):
        h.update(src.encode() + b"\0" + Path(src).read_bytes())
    lines.append(f"sources_sha256 {h.hexdigest()} ({len(args.agent_sources)} files)")
    lines.append(f"bundle_bytes {info['agent_bytes']}")
    lines += ["", "[libraries]  guest path <- host file (debian package)"]
    for guest, host in sorted(info["libraries"].items()):
        lines.append(f"{guest} <- {host} ({debian_package_of(host)})")
    lines += ["", f"[modules]  kernel {info['kernel_release']}, load order"]
    lines += info["modules"]
    lines += ["", "[device modules]  virtio device id, modules loaded when the guest has it"]
    lines += info.get("device_modules", [])
    if info["builtin_skipped"]:
        lines.append(f"# built in, skipped: {' '.join(info['builtin_skipped'])}")
    lines += ["", "[outputs]  file bytes sha256"]
    for name in ("vmlinux", "vmlinuz", "initrd.img", "kernel-release", "rootfs.img",
                 "rootfs-loader.img"):
        p = out_dir / name
        if not p.exists() and name.startswith("rootfs"):  # a guest dir made without one
            continue
        lines.append(f"{name} {p.stat().st_size} {sha256(p)}")
    lines.append(f"# initrd compression: {args.compression}; tree bytes {info['tree_bytes']}")
    tmp = out_dir / "MANIFEST.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out_dir / "MANIFEST")


# --------------------------------------------------------------------------- CLI


def cmd_initrd(args: argparse.Namespace) -> None:
    modules = args.modules.split(",") if args.modules else list(DEFAULT_MODULES)
    info = build_tree(
        tree=Path(args.tree),
        kernel_root=Path(args.kernel_root),
        busybox=Path(args.busybox),
        crun=Path(args.crun),
        agent=Path(args.agent),
        interpreter=Path(args.interpreter),
        entry=Path(args.entry),
        init=Path(args.init),
        modules=[m for m in modules if m],
        lib_dir=Path(args.lib_dir) if args.lib_dir else None,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_initrd(Path(args.tree), out, args.compression)
    Path(args.info).write_text(json.dumps(info.__dict__, indent=1, sort_keys=True) + "\n")
    print(
        f"guestbuild: {out} {out.stat().st_size / 2**20:.1f} MiB ({args.compression}); "
        f"agent {info.agent_bytes / 2**20:.1f} MiB, {len(info.modules)} modules, "
        f"{len(info.libraries)} libraries"
    )


def cmd_list(args: argparse.Namespace) -> None:
    for e in read_cpio(decompress_any(Path(args.initrd).read_bytes())):
        kind = stat.filemode(e.mode)
        extra = f" -> {e.data.decode()}" if stat.S_ISLNK(e.mode) else ""
        print(f"{kind} {len(e.data):>10} /{e.name}{extra}")


def cmd_vmlinux(args: argparse.Namespace) -> None:
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(extract_vmlinux(Path(args.bzimage).read_bytes()))
    tmp.replace(out)
    print(f"guestbuild: {out} {out.stat().st_size / 2**20:.1f} MiB (ELF, from {args.bzimage})")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="guestbuild", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("initrd")
    p.add_argument("--tree", required=True, help="staging directory (recreated)")
    p.add_argument("--kernel-root", required=True, help="extracted kernel package (depmod run)")
    p.add_argument("--busybox", required=True)
    p.add_argument("--crun", required=True)
    p.add_argument("--agent", required=True, help="PyInstaller onedir bundle directory")
    p.add_argument("--interpreter", required=True,
                   help="the Python binary the bundle was built with (the venv's base)")
    p.add_argument("--entry", required=True, help="the agent's entry script")
    p.add_argument("--init", required=True)
    p.add_argument("--modules", default="", help="comma separated (default: %(default)s)")
    p.add_argument("--lib-dir", default="",
                   help="libraries that replace the host's of the same name (searched first)")
    p.add_argument("--compression", choices=("none", "gzip", "zstd", "lz4"), default="none")
    p.add_argument("--out", required=True)
    p.add_argument("--info", required=True, help="JSON summary for the manifest")
    p.set_defaults(func=cmd_initrd)
    m = sub.add_parser("manifest")
    m.add_argument("--info", required=True)
    m.add_argument("--debs-lock", required=True)
    m.add_argument("--out-dir", required=True)
    m.add_argument("--agent-entry", required=True)
    m.add_argument("--python-version", required=True)
    m.add_argument("--compression", required=True)
    m.add_argument("agent_sources", nargs="*")
    m.set_defaults(func=write_manifest)
    vm = sub.add_parser("vmlinux")
    vm.add_argument("bzimage")
    vm.add_argument("--out", required=True)
    vm.set_defaults(func=cmd_vmlinux)
    ls = sub.add_parser("list")
    ls.add_argument("initrd")
    ls.set_defaults(func=cmd_list)
    args = ap.parse_args(argv)
    try:
        args.func(args)
    except (BuildError, subprocess.CalledProcessError, OSError) as exc:
        print(f"guestbuild: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
