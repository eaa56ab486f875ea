"""Where the time of one cold `ctr run --rm` goes, read from containerd's log. Pure: no I/O.

containerd keeps every line our shim logs (logfmt, with ``sandbox=<id>`` and a wall-clock
``time=``). The bench notes the wall clock when it started `ctr` and when `ctr` returned;
between the two, these shim events mark the phases:

=====================  ==========================================================
phase                  from -> to
=====================  ==========================================================
shim start             ctr started -> ``shim daemon serving`` (ctr, containerd's
                       container and snapshot, the shim's ``start`` and daemon)
host prep + VMM spawn  daemon serving -> ``vm started`` (state dir, cgroup, netns,
                       virtiofsd, QEMU spawned and answering QMP)
firmware               ``vm started`` -> guest kernel start: what is left of the
                       agent wait once the guest's own uptime is taken out
kernel to /init        the guest's uptime when /init exec'd the agent
agent start            the agent's exec -> serving (guest clock)
sandbox setup          ``agent ready`` -> ``sandbox started`` (sandbox, network, monitor)
container create       -> ``container created``
container start        -> ``process started``
run + output           -> ``process exited``
teardown               -> ctr returned (exit event, delete, VM stop, shim exit)
=====================  ==========================================================
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime

PHASES = ("shim start", "host prep + VMM spawn", "firmware", "kernel to /init",
          "agent start", "sandbox setup", "container create", "container start",
          "run + output", "teardown")
#: Shim events, in order: (message, the phase that ends there).
EVENTS = (
    ("shim daemon serving", "shim start"),
    ("vm started", "host prep + VMM spawn"),
    ("agent ready", None),  # firmware / kernel / agent: split with the guest's clock below
    ("sandbox started", "sandbox setup"),
    ("container created", "container create"),
    ("process started", "container start"),
    ("process exited", "run + output"),
)
LINE = re.compile(r'^time="?(?P<time>[0-9T:.\-]+)Z"? level=\w+ msg=(?:"(?P<q>[^"]*)"|(?P<u>\S+))')
AGENT_READY = re.compile(r"agent ready: started in (?P<agent>[0-9.]+)s, "
                         r"serving at guest uptime (?P<uptime>[0-9.]+)s")


def timestamp(text: str) -> float:
    """Seconds since the epoch of a log time (UTC, any number of fraction digits)."""
    whole, _, fraction = text.partition(".")
    base = datetime.fromisoformat(whole + "+00:00").timestamp()
    return base + (float(f"0.{fraction}") if fraction else 0.0)


def shim_events(log_lines: Iterable[str], sandbox_id: str) -> dict[str, tuple[float, str]]:
    """First time of each `EVENTS` message logged for `sandbox_id`, with its line."""
    wanted = {msg for msg, _ in EVENTS}
    tag = f"sandbox={sandbox_id} "
    found: dict[str, tuple[float, str]] = {}
    for line in log_lines:
        if tag not in line:
            continue
        m = LINE.match(line)
        if m is None:
            continue
        msg = m["q"] if m["q"] is not None else m["u"]
        if msg.startswith("vm started"):
            msg = "vm started"  # its fields are inside the message
        elif msg.startswith("agent ready"):
            msg = "agent ready"
        if msg in wanted and msg not in found:
            found[msg] = (timestamp(m["time"]), line)
    return found


def breakdown(started: float, ended: float, events: dict[str, tuple[float, str]]
              ) -> dict[str, float]:
    """Seconds per phase of `PHASES`; {} when an event is missing (a log line changed)."""
    if any(msg not in events for msg, _ in EVENTS):
        return {}
    ready = AGENT_READY.search(events["agent ready"][1])
    if ready is None:
        return {}
    phases: dict[str, float] = {}
    previous = started
    for msg, phase in EVENTS:
        at = events[msg][0]
        if phase is not None:
            phases[phase] = at - previous
        else:
            uptime, agent = float(ready["uptime"]), float(ready["agent"])
            phases["firmware"] = (at - previous) - uptime
            phases["kernel to /init"] = uptime - agent
            phases["agent start"] = agent
        previous = at
    phases["teardown"] = ended - previous
    return {name: phases[name] for name in PHASES}
