"""Run a function inside a pod's network namespace, on a thread of its own.

setns(2) moves only the calling thread, so each call gets a fresh thread that enters the
netns, runs the function (netlink sockets and tap fds made there belong to that netns)
and ends: no thread of a pool is ever left in a pod's namespace.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Callable
from typing import TypeVar

from hostos.syscalls import CLONE_NEWNET, setns
from network.errors import NetworkConfigError

T = TypeVar("T")


def run_in_netns(netns_path: str, fn: Callable[[], T]) -> T:
    """``fn()`` on a new thread inside ``netns_path``; its result or its exception."""
    try:
        fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise NetworkConfigError(f"cannot open the network namespace {netns_path!r}: "
                                 f"{e.strerror}") from e
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            setns(fd, CLONE_NEWNET, netns_path)
        except OSError as e:
            error.append(NetworkConfigError(
                f"{netns_path!r} is not a network namespace ({e.strerror}): give the "
                "path of one, such as /var/run/netns/<name>"))
            return
        try:
            result.append(fn())
        except BaseException as e:  # handed to the caller's thread
            error.append(e)

    try:
        worker = threading.Thread(target=body, name="netns", daemon=True)
        worker.start()
        worker.join()
    finally:
        os.close(fd)
    if error:
        raise error[0]
    return result[0]


async def in_netns(netns_path: str, fn: Callable[[], T]) -> T:
    """`run_in_netns` off the event loop."""
    return await asyncio.to_thread(run_in_netns, netns_path, fn)


def listen_tcp(netns_path: str, host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` inside the netns (a socket keeps the netns
    it was made in, whichever thread then serves it); non-blocking, close-on-exec."""

    def make() -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(64)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    return run_in_netns(netns_path, make)
