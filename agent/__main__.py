"""Entry point: ``python -m agent``; in the guest ``/opt/kata-agent/main.pyc``, this file
compiled (build/guestbuild.py)."""

import gc
import sys

# No cyclic garbage collection while the agent imports and starts: some 40 collections
# would walk the growing heap, ~15 % of the start-up's CPU (measured on the host), and
# under TCG that is the guest's critical path. agent.main turns it back on once serving.
gc.disable()

from common import lazyimport  # noqa: E402

lazyimport.install()  # before asyncio and protobuf import what we never run: common/lazyimport.py

from agent.main import main  # noqa: E402

sys.exit(main())
