"""`NetworkModel`: the seam between a sandbox and its pod netns (``internetworking_model``).

A model scans the netns (`scan`), wires one interface to a tap the VMM can use (`attach`:
``tcfilter`` redirects between veth and tap with tc; ``macvtap`` stacks a passthru
macvtap on the veth), and undoes that (`detach`, idempotent, also from a
persisted record after a crash: `detach_recorded`). All netlink work is pyroute2's, on
a thread inside the netns, never ``ip`` or ``tc``; and it runs in a short-lived worker
process (`network.worker`), so the shim, which lives as long as its pod, never carries
pyroute2's 13 MiB. The worker sends tap fds back over a unix socket (SCM_RIGHTS).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import subprocess
import sys
from typing import Any, Protocol

from hostos.procs import clean_env, signal_child, wrapped_argv
from network import tap
from network.errors import NetworkConfigError, NetworkError
from network.types import (
    Endpoint,
    Interface,
    NetworkDescription,
    description_from_json,
    interface_to_json,
)

MODELS = ("tcfilter", "macvtap")


class NetworkModel(Protocol):
    """How a pod's interfaces reach its VM."""

    @property
    def name(self) -> str:
        """``tcfilter`` or ``macvtap``."""

    async def scan(self, netns_path: str) -> NetworkDescription:
        """What CNI put in the netns (interfaces, routes, neighbours)."""

    async def attach(self, netns_path: str, interface: Interface, position: int) -> Endpoint:
        """Create what the VMM needs for ``interface`` (the ``position``-th); its queue
        fds are the caller's to close once the VMM has them."""

    async def detach(self, netns_path: str, endpoint: Endpoint) -> None:
        """Remove everything `attach` created (idempotent)."""


WORKER = ("-m", "network.worker")
WORKER_TIMEOUT = 60.0
MAX_REPLY = 1 << 20


def _worker_request(request: dict[str, Any], fd_socket: int | None) -> bytes:
    return json.dumps({**request, "fd_socket": fd_socket}).encode()


def _worker_reply(out: bytes, err: bytes, code: int | None) -> Any:
    """The worker's result, or the error it reported (NetworkConfigError when the netns
    cannot be wired as given)."""
    try:
        reply = json.loads(out[:MAX_REPLY])
    except ValueError:
        raise NetworkError(f"the netlink worker failed (exit {code}): "
                           f"{err.decode(errors='replace')[-500:]}") from None
    if "error" in reply:
        raise (NetworkConfigError if reply.get("config") else NetworkError)(str(reply["error"]))
    return reply["ok"]


async def _run_worker(request: dict[str, Any], fds_expected: int = 0) -> tuple[Any, list[int]]:
    """Run one worker operation; its result and the fds it sent back."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours:
        try:
            proc = await asyncio.create_subprocess_exec(
                *wrapped_argv([sys.executable, *WORKER]), stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                pass_fds=(theirs.fileno(),), env=clean_env())
        finally:
            theirs_fd = theirs.fileno()
            theirs.close()
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(_worker_request(request, theirs_fd)), WORKER_TIMEOUT)
        except TimeoutError:
            signal_child(proc)
            await proc.wait()
            raise NetworkError(f"the netlink worker did not answer within "
                               f"{WORKER_TIMEOUT:.0f}s") from None
        result = _worker_reply(out, err, proc.returncode)
        fds: list[int] = []
        if fds_expected:
            ours.settimeout(5)
            _, fds, _, _ = socket.recv_fds(ours, 16, fds_expected)
        return result, fds


def _run_worker_blocking(request: dict[str, Any]) -> Any:
    """`_run_worker` without fds, for code without an event loop (``shim delete``)."""
    res = subprocess.run([sys.executable, *WORKER], input=_worker_request(request, None),
                         capture_output=True, timeout=WORKER_TIMEOUT, env=clean_env(),
                         check=False)
    return _worker_reply(res.stdout, res.stderr, res.returncode)


class NetlinkModel:
    """Both models: they differ in what `attach` stacks on the interface."""

    def __init__(self, name: str, queues: int = 1) -> None:
        if name not in MODELS:
            raise ValueError(f"unknown internetworking_model {name!r}: tcfilter, macvtap or none")
        self._name = name
        self.queues = queues

    @property
    def name(self) -> str:
        return self._name

    def tap_name(self, position: int) -> str:
        """tap<N>_kata (a tun device, private to its netns); a macvtap's name is unique on
        the host, as its char device is host-wide (open_macvtap_queues checks it)."""
        if self._name == "tcfilter":
            return f"tap{position}_kata"
        return f"mv{secrets.token_hex(3)}_kata"

    async def scan(self, netns_path: str) -> NetworkDescription:
        result, _ = await _run_worker({"op": "scan", "netns": netns_path})
        try:
            return description_from_json(result)
        except (ValueError, KeyError, TypeError) as e:
            raise NetworkError(f"the netlink worker's scan is malformed: {e}") from e

    async def attach(self, netns_path: str, interface: Interface, position: int) -> Endpoint:
        name = self.tap_name(position)
        _, fds = await _run_worker({
            "op": "attach", "netns": netns_path, "model": self._name, "tap": name,
            "queues": self.queues, "interface": interface_to_json(interface)},
            fds_expected=self.queues)
        try:
            return Endpoint(interface, self._name, name, tuple(fds), (name,))
        except ValueError:
            tap.close_all(fds)
            raise

    async def detach(self, netns_path: str, endpoint: Endpoint) -> None:
        await _run_worker({"op": "detach", "netns": netns_path,
                           "interface": endpoint.interface.name, "tap": endpoint.tap_name})


def detach_recorded(netns_path: str, interface_name: str, tap_name: str) -> None:
    """`detach` from what a sandbox's state recorded (blocking; for crash cleanup)."""
    _run_worker_blocking({"op": "detach", "netns": netns_path, "interface": interface_name,
                          "tap": tap_name})


def model_for(name: str, queues: int = 1) -> NetworkModel | None:
    """The model ``internetworking_model`` names; None for ``none``."""
    return None if name == "none" else NetlinkModel(name, queues)
