"""`pvh_problem`: which kernel files QEMU can boot (a bzImage, or an ELF with a PVH note)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from hypervisors.config import ConfigError
from hypervisors.qemu.config import QemuConfig
from hypervisors.qemu.kernelfile import MAX_PROGRAM_HEADERS, XEN_ELFNOTE_PHYS32_ENTRY, pvh_problem


def note(name: bytes, kind: int, desc: bytes) -> bytes:
    def pad(b: bytes) -> bytes:
        return b + bytes(-len(b) % 4)
    return struct.pack("<III", len(name), len(desc), kind) + pad(name) + pad(desc)


def elf64(notes: list[bytes], extra_headers: int = 0) -> bytes:
    """An ELF64 file: one PT_LOAD, one PT_NOTE per entry of `notes`."""
    phnum = 1 + len(notes) + extra_headers
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x20, 64)
    struct.pack_into("<HH", header, 0x36, 56, phnum)
    body_at = 64 + 56 * phnum
    table, body = b"", b""
    table += struct.pack("<IIQQQQQQ", 1, 5, 0, 0, 0, 0, 0, 0)  # PT_LOAD
    for n in notes:
        table += struct.pack("<IIQQQQQQ", 4, 4, body_at + len(body), 0, 0, len(n), len(n), 4)
        body += n
    table += bytes(56 * extra_headers)
    return bytes(header) + table + body


PVH = note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<Q", 0x1000850))


@pytest.mark.parametrize("notes", [
    [PVH], [note(b"GNU\0", 3, b"id"), PVH],
    [note(b"Linux\0", 6, b"x"), note(b"Xen\0", 6, b"linux\0") + PVH]])
def test_an_elf_with_the_pvh_note_boots(tmp_path: Path, notes: list[bytes]) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(elf64(notes))
    assert pvh_problem(str(kernel)) is None


def test_a_bzimage_is_not_checked(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(bytes(0x202) + b"HdrS" + bytes(100))
    assert pvh_problem(str(kernel)) is None


@pytest.mark.parametrize(("data", "words"), [
    (elf64([]), "without a PVH entry note"),
    (elf64([note(b"Xen\0", 6, b"linux\0")]), "without a PVH entry note"),
    (elf64([note(b"GNU\0", XEN_ELFNOTE_PHYS32_ENTRY, b"x")]), "without a PVH entry note"),
    (elf64([PVH], extra_headers=MAX_PROGRAM_HEADERS), "headers cannot be read"),
    (elf64([PVH])[:80], "headers cannot be read"),
])
def test_other_elf_files_are_named(tmp_path: Path, data: bytes, words: str) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(data)
    problem = pvh_problem(str(kernel))
    assert problem is not None and words in problem


def test_the_configuration_check_names_key_file_and_fix(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(elf64([]))
    config = QemuConfig.from_table({"kernel": str(kernel), "initrd": "", "path": "/bin/true",
                                    "shared_fs": "none"})
    with pytest.raises(ConfigError, match=rf"kernel: {kernel} is an ELF kernel without a PVH "
                                          r"entry note, which QEMU needs; use the kernel's "
                                          r"bzImage \(vmlinuz\)"):
        config.check_files("cfg.toml")
    kernel.write_bytes(elf64([PVH]))
    config.check_files("cfg.toml")
