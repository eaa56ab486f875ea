"""Generate the cffi out-of-line ABI modules of both sides: ``hostos/_libc_cffi.py`` (host)
and ``agent/_libc_cffi.py`` (guest), each with only the libc calls its side uses.

Usage: ``python -m hostos.ffi_build [OUT_ROOT]`` (default: the repository root).
In-line ABI mode (``ffi.cdef`` at import) parses C with pycparser on every start: ~70 ms
measured on these hosts for two declarations, paid by every ``shim delete`` and, ~20x
slower under TCG, by the guest agent. An out-of-line module carries the parsed
declarations and imports in ~3 ms (host). tests/unit/test_hostos.py checks that the
committed modules are not stale. This is a development tool: neither side imports it.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULE = "_libc_cffi"

COMMON_CDEF = """
int mount(const char *source, const char *target, const char *filesystemtype,
          unsigned long mountflags, const void *data);
int umount2(const char *target, int flags);
long syscall(long number, ...);
"""

# openat2(2) and mount_setattr(2) have no libc wrapper: syscall() with these structs.
HOST_CDEF = COMMON_CDEF + """
int unshare(int flags);
int malloc_trim(size_t pad);
struct open_how { uint64_t flags; uint64_t mode; uint64_t resolve; };
struct mount_attr { uint64_t attr_set; uint64_t attr_clr; uint64_t propagation;
                    uint64_t userns_fd; };
"""

# prctl is variadic in libc; the calls we make pass only integers, which the x86_64
# calling convention passes alike either way.
GUEST_CDEF = COMMON_CDEF + """
int prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4,
          unsigned long arg5);
"""

#: package directory -> declarations
MODULES = {"hostos": HOST_CDEF, "agent": GUEST_CDEF}


def generate(out_root: Path = ROOT) -> list[Path]:
    """Write ``<out_root>/<package>/_libc_cffi.py`` for each side; their paths."""
    from cffi import FFI

    written = []
    for package, cdef in MODULES.items():
        ffi = FFI()
        ffi.set_source(MODULE, None)
        ffi.cdef(cdef)
        (out_root / package).mkdir(parents=True, exist_ok=True)
        written.append(Path(ffi.compile(tmpdir=str(out_root / package))))
    return written


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
