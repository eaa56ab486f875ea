"""Mount table helpers (/proc/self/mountinfo)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit() and i + 4 <= len(field):
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [_unescape(line.split()[4]) for line in f if line.strip()]


def _under(path: str, root: str) -> bool:
    root = root.rstrip("/")
    return path == root or path.startswith(root + "/")


def mounts_under(roots: Iterable[str]) -> list[str]:
    rs = [r for r in roots if r]
    return [m for m in mount_points() if any(_under(m, r) for r in rs)]


def unmount_under(roots: Iterable[str], timeout: float = 30.0) -> list[str]:
    """Lazily unmount everything below `roots`, deepest first; return what stayed mounted."""
    for point in sorted(set(mounts_under(roots)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=timeout,
                       check=False)
    return mounts_under(roots)
