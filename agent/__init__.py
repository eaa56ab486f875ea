"""The guest agent: PID 1 of the VM, serving the agent API over ttrpc (see agent.main)."""

import time as _time

# The earliest Python-level instant of the agent process: start-up is measured from here.
STARTED_MONOTONIC = _time.monotonic()
