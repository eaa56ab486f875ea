"""The shim speaks no TLS: its processes start without ``ssl`` and OpenSSL's ``_hashlib``.

asyncio imports ``ssl`` when it can (for TLS transports we never open), and ``hashlib``
prefers OpenSSL's ``_hashlib``; both load libssl and libcrypto. Marking the modules absent
before anything imports them makes asyncio go without TLS and hashlib use its built-in
SHA-256: 4.4 MiB less PSS per shim daemon and some CPU per shim process (measured on the
host, docs/performance.md). `shim/__init__.py` does it first thing in a shim's own process
(known by the name it was run as), so a test or tool importing the package keeps its ssl.
Only the metrics endpoint needs ``ssl`` back, because ``prometheus_client.exposition``
imports it unconditionally: `allow` before that import.
"""

from __future__ import annotations

import os
import sys

MODULES = ("ssl", "_ssl", "_hashlib")
#: The names a shim process runs as: containerd-shim-kata-v2 and its variants, and
#: ``python -m shim`` (shim/__main__.py, the daemon's fallback command).
PROGRAM_PREFIX = "containerd-shim-kata"
MODULE_ENTRY = os.path.join("shim", "__main__.py")


def is_shim_process(argv0: str) -> bool:
    return os.path.basename(argv0).startswith(PROGRAM_PREFIX) or argv0.endswith(MODULE_ENTRY)


def leave_out() -> None:
    """Make later imports of the TLS modules fail (ImportError), unless already loaded."""
    for name in MODULES:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def allow() -> None:
    """Undo `leave_out` for modules not loaded since, so they import for real."""
    for name in MODULES:
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]
