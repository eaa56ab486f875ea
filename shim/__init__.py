"""containerd-shim-kata-v2: the containerd-facing layer (start/delete, daemon, Task API)."""

from common.constants import RUNTIME_VERSION as VERSION

__all__ = ["VERSION"]
