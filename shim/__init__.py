"""containerd-shim-kata-v2: the containerd-facing layer (start/delete, daemon, Task API)."""

import sys

from common import lazyimport
from common.constants import RUNTIME_VERSION as VERSION
from shim import tls

if sys.argv and tls.is_shim_process(sys.argv[0]):
    tls.leave_out()  # before anything imports hashlib or asyncio: shim/tls.py
    lazyimport.install()  # and what protobuf and asyncio import unused: common/lazyimport.py

__all__ = ["VERSION"]
