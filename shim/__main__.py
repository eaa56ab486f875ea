"""``python -m shim``: how ``start`` re-executes the shim as its daemon."""

import sys

from shim.main import main

sys.exit(main())
