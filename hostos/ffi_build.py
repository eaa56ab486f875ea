"""Generate hostos/_libc_cffi.py: cffi's out-of-line ABI module for the libc calls we use.

Usage: ``python -m hostos.ffi_build [OUT_DIR]`` (default: this package's directory).
In-line ABI mode (``ffi.cdef`` at import) parses C with pycparser on every start: ~70 ms
measured on these hosts for two declarations, paid by every ``shim delete``. The
out-of-line module carries the parsed declarations and imports in ~3 ms.
tests/unit/test_hostos.py checks the committed module is not stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

MODULE = "_libc_cffi"
HERE = Path(__file__).resolve().parent

CDEF = """
int mount(const char *source, const char *target, const char *filesystemtype,
          unsigned long mountflags, const void *data);
int umount2(const char *target, int flags);
"""


def generate(out_dir: Path = HERE) -> Path:
    """Write ``<out_dir>/_libc_cffi.py``; its path."""
    from cffi import FFI

    ffi = FFI()
    ffi.set_source(MODULE, None)
    ffi.cdef(CDEF)
    return Path(ffi.compile(tmpdir=str(out_dir)))


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
