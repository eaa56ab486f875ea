"""containerd-shim-kata-v2: the containerd-facing layer (start/delete, daemon, Task API)."""

VERSION = "0.1.0"
