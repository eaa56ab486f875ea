"""The vhost-user-vsock back-end process: one per VM, like virtiofsd.

Usage (the shim spawns it, `hypervisors.vsock.process`)::

    python -m hypervisors.vsock.backend --vhost-user-fd N --hybrid-fd M --guest-cid CID \
        --name HYBRID_SOCKET_PATH

Both fds are unix sockets the parent already bound (0600, in the sandbox's socket dir) and
listens on, so neither QEMU nor a client can come before the back-end is ready, and the
socket files are the parent's to remove.

Theory of operation: one asyncio loop, no threads. The first connection on the vhost-user
socket is QEMU's (the listener is closed then: nothing else may drive the device). Its
messages (with their fds, `socket.recv_fds`) go through `vhost_user.Parser` to
`VsockDevice.handle`; each reply is sent back at once. The kick eventfds of the two rings
are watched with ``add_reader`` (re-registered around every control message, since a message
may close or replace them); a kick runs the device's data path, and every `Output` is
carried out by `_apply`: the call eventfds of the queues it used are written, a device
failure is logged and reported on the err eventfd, and host events go to the hybrid clients
(`clients.HostClients`).

The process ends when QEMU disconnects (the VM is gone), on a malformed or refused
vhost-user message (exit 1: the front-end broke the protocol, the VM's supervisor then ends
the VM), or on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import mmap
import os
import signal
import socket
import sys

from hypervisors.vsock import vhost_user as vu
from hypervisors.vsock.clients import HostClients
from hypervisors.vsock.device import NUM_QUEUES, RX, TX, Output, VsockDevice
from hypervisors.vsock.errors import VsockError

log = logging.getLogger("vsock-backend")

RECV_SIZE = 64 * 1024
#: SCM_RIGHTS room: SET_MEM_TABLE carries one fd per region, at most 8.
MAX_FDS = vu.MAX_REGIONS


class Mappings:
    """The device's `Mapper`/`Unmapper`: shared mmaps of the guest's memory fds."""

    def __init__(self) -> None:
        self._maps: dict[int, tuple[mmap.mmap, memoryview]] = {}

    def map(self, fd: int, size: int, offset: int) -> memoryview:
        """``size`` bytes of `fd` from ``offset`` (mmap offsets are page-aligned: map from
        the page below and slice)."""
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        m = mmap.mmap(fd, size + offset - start, flags=mmap.MAP_SHARED,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        whole = memoryview(m)
        view = whole[offset - start:]
        whole.release()
        self._maps[id(view)] = (m, view)
        return view

    def unmap(self, view: memoryview) -> None:
        """Undo one `map` (the device dropped every view into it)."""
        m, ours = self._maps.pop(id(view))
        ours.release()
        try:
            m.close()
        except BufferError:  # a view is still alive somewhere: the GC unmaps it later
            log.warning("guest memory mapping still in use at unmap")

    def close(self) -> None:
        """Unmap everything left."""
        for _, view in list(self._maps.values()):
            self.unmap(view)


class Backend:
    """One device, its QEMU connection and its hybrid clients."""

    def __init__(self, guest_cid: int) -> None:
        """A back-end for guest `guest_cid`; `run` serves it."""
        self._mappings = Mappings()
        self.device = VsockDevice(guest_cid, self._mappings.map, self._mappings.unmap)
        self._parser = vu.Parser()
        self._loop = asyncio.get_running_loop()
        self._clients = HostClients(self.device, self._apply)
        self._kicks: list[int | None] = [None] * NUM_QUEUES
        self._conn: socket.socket | None = None
        self._done: asyncio.Future[int] = self._loop.create_future()

    async def run(self, vhost_listener: socket.socket, hybrid_listener: socket.socket) -> int:
        """Serve until QEMU leaves; the exit status."""
        self._clients.listen(hybrid_listener)
        conn, _ = await self._loop.sock_accept(vhost_listener)
        vhost_listener.close()
        conn.setblocking(False)
        self._conn = conn
        log.info("QEMU connected (guest CID %d)", self.device.guest_cid)
        self._loop.add_reader(conn.fileno(), self._on_message)
        try:
            return await self._done
        finally:
            self.close()

    def stop(self, code: int) -> None:
        """End `run` with `code`."""
        if not self._done.done():
            self._done.set_result(code)

    def close(self) -> None:
        """Release everything: clients, kick readers, the connection, fds, mappings."""
        self._clients.close()
        self._unwatch_kicks()
        if self._conn is not None:
            self._loop.remove_reader(self._conn.fileno())
            self._conn.close()
            self._conn = None
        self.device.close()
        for fd in self._parser.pending_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._mappings.close()

    # -- the vhost-user connection ------------------------------------------------------

    def _on_message(self) -> None:
        assert self._conn is not None
        try:
            data, fds, flags, _ = socket.recv_fds(self._conn, RECV_SIZE, MAX_FDS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.error("vhost-user connection failed: %s", exc)
            self.stop(1)
            return
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            log.error("vhost-user message with more fds than %d: closing", MAX_FDS)
            self.stop(1)
            return
        if not data:
            log.info("QEMU disconnected")
            self.stop(0)
            return
        try:
            for message in self._parser.feed(data, fds):
                self._handle(message)
        except VsockError as exc:
            log.error("vhost-user protocol error: %s", exc)
            self.stop(1)

    def _handle(self, message: vu.Message) -> None:
        assert self._conn is not None
        self._unwatch_kicks()  # the message may close or replace a kick fd
        try:
            out = self.device.handle(message)
        finally:
            self._watch_kicks()
        if out.reply is not None:
            self._conn.setblocking(True)  # QEMU waits for it: a short blocking send
            try:
                self._conn.sendall(out.reply)
            finally:
                self._conn.setblocking(False)
        self._apply(out)

    # -- the data path ------------------------------------------------------------------

    def _watch_kicks(self) -> None:
        for index in range(NUM_QUEUES):
            fd = self.device.kick_fd(index)
            if fd is not None:
                self._loop.add_reader(fd, self._on_kick, index)
            self._kicks[index] = fd

    def _unwatch_kicks(self) -> None:
        for index, fd in enumerate(self._kicks):
            if fd is not None:
                self._loop.remove_reader(fd)
            self._kicks[index] = None

    def _on_kick(self, index: int) -> None:
        fd = self._kicks[index]
        if fd is None:
            return
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(fd)
        self._apply(self.device.on_tx_kick() if index == TX else self.device.on_rx_kick())

    def _apply(self, out: Output) -> None:
        for index in sorted(out.signal):
            fd = self.device.call_fd(index)
            if fd is not None:
                os.eventfd_write(fd, 1)
        if out.failure is not None:
            log.error("device failed: %s (every stream reset)", out.failure)
            for index in (RX, TX):
                err = self.device.err_fd(index)
                if err is not None:
                    os.eventfd_write(err, 1)
        self._clients.dispatch(out.events)


def _listener(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX:
        sock.detach()
        raise ValueError(f"fd {fd} is not a unix socket")
    return sock


async def serve(guest_cid: int, vhost_fd: int, hybrid_fd: int) -> int:
    """Run one back-end on the inherited listening sockets; the exit status."""
    backend = Backend(guest_cid)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, backend.stop, 0)
    return await backend.run(_listener(vhost_fd), _listener(hybrid_fd))


def main(argv: list[str] | None = None) -> int:
    """Entry point (``python -m hypervisors.vsock.backend``)."""
    parser = argparse.ArgumentParser(prog="vsock-backend")
    parser.add_argument("--vhost-user-fd", type=int, required=True)
    parser.add_argument("--hybrid-fd", type=int, required=True)
    parser.add_argument("--guest-cid", type=int, required=True)
    parser.add_argument("--name", default="", help="whose back-end this is (logs only)")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format=f"%(asctime)s %(levelname)s vsock-backend[{args.name}]: "
                               "%(message)s")
    try:
        return asyncio.run(serve(args.guest_cid, args.vhost_user_fd, args.hybrid_fd))
    except (ValueError, OSError, VsockError) as exc:
        log.error("cannot serve: %s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
