"""Whether QEMU can boot a kernel file: a bzImage, or an ELF kernel with a PVH entry.

QEMU's ``-kernel`` takes a bzImage (the firmware runs its real-mode set-up, then the
kernel decompresses itself in the guest) or an uncompressed ELF ``vmlinux``, which it loads
directly and enters through the PVH entry point the kernel names in an ELF note (Xen's
``XEN_ELFNOTE_PHYS32_ENTRY``, built with ``CONFIG_PVH``). An ELF without that note makes
QEMU exit with "Error loading uncompressed kernel without PVH ELF Note" after the shim has
set everything up; `pvh_problem` finds it while the configuration is checked.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

ELF_MAGIC = b"\x7fELF"
PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18
#: Bounds on what is read: a kernel has a handful of program headers and small notes.
MAX_PROGRAM_HEADERS = 64
MAX_NOTES_BYTES = 64 * 1024


def pvh_problem(path: str) -> str | None:
    """None when `path` is not ELF (a bzImage) or is an ELF with a PVH entry note; else
    what is wrong with it."""
    with open(path, "rb") as f:
        ident = f.read(16)
        if ident[:4] != ELF_MAGIC:
            return None
        try:
            order = "<" if ident[5] == 1 else ">"
            found = any(_has_pvh_note(notes, order)
                        for notes in _note_segments(f, ident[4] == 2, order))
        except (struct.error, ValueError) as e:
            return f"is an ELF file whose headers cannot be read ({e})"
    return None if found else "is an ELF kernel without a PVH entry note, which QEMU needs"


def _note_segments(f: BinaryIO, is64: bool, order: str) -> list[bytes]:
    """The contents of each PT_NOTE segment (each cut at `MAX_NOTES_BYTES`)."""
    # (e_phoff, e_phentsize/e_phnum) and, in a program header, (p_offset, p_filesz)
    phoff_at, count_at, offset_at, size_at, word = (
        (0x20, 0x36, 0x08, 0x20, "Q") if is64 else (0x1C, 0x2A, 0x04, 0x10, "I"))
    f.seek(0)
    header = f.read(64)
    phoff, = struct.unpack_from(order + word, header, phoff_at)
    phentsize, phnum = struct.unpack_from(order + "HH", header, count_at)
    if phnum > MAX_PROGRAM_HEADERS:
        raise ValueError(f"{phnum} program headers")
    f.seek(phoff)
    table = f.read(phentsize * phnum)
    notes = []
    for entry in (table[i * phentsize:(i + 1) * phentsize] for i in range(phnum)):
        if struct.unpack_from(order + "I", entry, 0)[0] != PT_NOTE:
            continue
        offset, = struct.unpack_from(order + word, entry, offset_at)
        size, = struct.unpack_from(order + word, entry, size_at)
        f.seek(offset)
        notes.append(f.read(min(size, MAX_NOTES_BYTES)))
    return notes


def _has_pvh_note(notes: bytes, order: str) -> bool:
    """Whether the notes (namesz, descsz, type, name and desc padded to 4) hold Xen's
    PHYS32_ENTRY."""
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, kind = struct.unpack_from(order + "III", notes, pos)
        name = notes[pos + 12:pos + 12 + namesz].rstrip(b"\0")
        if name == b"Xen" and kind == XEN_ELFNOTE_PHYS32_ENTRY:
            return True
        pos += 12 + _pad4(namesz) + _pad4(descsz)
    return False


def _pad4(n: int) -> int:
    return (n + 3) & ~3
