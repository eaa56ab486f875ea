"""Entry point: ``python -m agent`` and the PyInstaller-frozen ``/opt/kata-agent/kata-agent``."""

import sys

from agent.main import main

sys.exit(main())
