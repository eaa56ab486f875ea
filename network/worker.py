"""The netlink worker: one scan, attach or detach in a short-lived process of its own.

    python -m network.worker    (a JSON request on stdin, a JSON reply on stdout)

pyroute2 adds 13 MiB to the process that imports it (RSS, measured), and a shim lives as
long as its pod: so the shim never imports it, and spawns this worker for each netlink
operation instead (~0.2 s on the host). The request names the operation, the netns and
its arguments; ``fd_socket`` is an inherited unix socket on which `attach` sends the tap's
queue fds (SCM_RIGHTS) before replying. The reply is ``{"ok": ...}`` or ``{"error": msg,
"config": bool}`` (config: the pod's netns cannot be wired as given).
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from network import rtnl, tap
from network.errors import NetworkConfigError
from network.netns import run_in_netns
from network.types import description_to_json, interface_from_json

T = TypeVar("T")


def _with_ipr(fn: Callable[[Any], T]) -> Callable[[], T]:
    def run() -> T:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            return fn(ipr)

    return run


def handle(request: dict[str, Any]) -> Any:
    """Carry out one request; its result (JSON-ready)."""
    op, netns = request["op"], str(request["netns"])
    if op == "scan":
        found = run_in_netns(netns, _with_ipr(lambda ipr: rtnl.scan(ipr, netns)))
        return description_to_json(found)
    if op == "attach":
        iface = interface_from_json(request["interface"])
        name, queues = str(request["tap"]), int(request["queues"])
        wire = rtnl.wire_tcfilter if request["model"] == "tcfilter" else rtnl.wire_macvtap
        fds = run_in_netns(netns, _with_ipr(lambda ipr: wire(ipr, iface, name, queues)))
        try:
            with socket.socket(fileno=int(request["fd_socket"])) as channel:
                socket.send_fds(channel, [b"fds"], list(fds))
        except BaseException:
            tap.close_all(fds)
            run_in_netns(netns, _with_ipr(lambda ipr: rtnl.unwire(ipr, iface.name, name)))
            raise
        return {"queues": len(fds)}
    if op == "detach":
        iface_name, name = str(request["interface"]), str(request["tap"])
        run_in_netns(netns, _with_ipr(lambda ipr: rtnl.unwire(ipr, iface_name, name)))
        return {}
    raise ValueError(f"unknown operation {op!r}")


def main() -> int:
    try:
        reply: dict[str, Any] = {"ok": handle(json.loads(sys.stdin.read()))}
    except NetworkConfigError as e:
        reply = {"error": str(e), "config": True}
    except Exception as e:  # pyroute2's NetlinkError included: the shim gets a reply
        reply = {"error": f"{type(e).__name__}: {e}", "config": False}
    sys.stdout.write(json.dumps(reply))
    return 0


if __name__ == "__main__":
    sys.exit(main())
