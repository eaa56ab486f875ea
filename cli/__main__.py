"""``python -m cli``: the kata-runtime CLI."""

import sys

from cli.main import main

sys.exit(main())
