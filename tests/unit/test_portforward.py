"""Port forwarding (kubectl port-forward into a VM): the agent's side against real sockets
on this host, and the shim's `PortMirror` in a real network namespace over a fake agent
that echoes."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import FailedPrecondition, NotFound
from agent.portforward import PortForwards, listening_ports
from network.netns import run_in_netns
from sandbox import portforward as mirror_module
from sandbox.portforward import PortMirror

PROC_TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0
   1: 0100007F:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0
   2: 0100007F:A1B2 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0
"""


def test_listening_ports_are_read_from_proc(tmp_path: Path) -> None:
    tcp, tcp6 = tmp_path / "tcp", tmp_path / "tcp6"
    tcp.write_text(PROC_TCP)
    tcp6.write_text(PROC_TCP.splitlines()[0] + "\n   0: 00000000000000000000000000000000:01BB "
                    "00000000000000000000000000000000:0000 0A 0\n")
    assert listening_ports((str(tcp), str(tcp6), str(tmp_path / "gone"))) == [22, 443, 8080]


def test_a_connection_carries_bytes_both_ways_and_half_closes() -> None:
    async def main() -> None:
        got = asyncio.get_running_loop().create_future()

        async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            got.set_result(await reader.read())  # until our half-close
            writer.write(b"pong")
            await writer.drain()
            writer.close()

        srv = await asyncio.start_server(server, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        forwards = PortForwards()
        conn = await forwards.open(port)
        await forwards.write(conn, b"ping")
        await forwards.close_write(conn)
        assert await got == b"ping"
        assert await forwards.read(conn, 100) == b"pong"
        assert await forwards.read(conn, 100) == b""
        forwards.close(conn)
        with pytest.raises(NotFound):
            await forwards.read(conn, 1)
        srv.close()

    asyncio.run(main())


def test_a_port_nothing_listens_on_is_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connect is refused
        with pytest.raises(FailedPrecondition, match=f"nothing answers on port {port}"):
            asyncio.run(PortForwards().open(port))


class EchoAgent:
    """The agent calls PortMirror makes: one guest port that echoes in upper case."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.conns: dict[int, asyncio.Queue[bytes]] = {}
        self.closed: list[int] = []

    async def listening_ports(self) -> list[int]:
        return self.ports

    async def port_forward_open(self, port: int) -> int:
        conn_id = len(self.conns) + 1
        self.conns[conn_id] = asyncio.Queue()
        return conn_id

    async def port_forward_write(self, conn_id: int, data: bytes) -> None:
        await self.conns[conn_id].put(data.upper())

    async def port_forward_close_write(self, conn_id: int) -> None:
        await self.conns[conn_id].put(b"")

    async def port_forward_read(self, conn_id: int, size: int) -> bytes:
        return await self.conns[conn_id].get()

    async def port_forward_close(self, conn_id: int) -> None:
        self.closed.append(conn_id)


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    name = f"kpf{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=30)
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


def client(netns_path: str, port: int, data: bytes) -> bytes:
    """Connect to localhost:port inside the netns (as containerd does), send, read to EOF."""
    def talk() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out
    return run_in_netns(netns_path, talk)


def test_the_mirror_listens_in_the_netns_and_carries_connections(
        netns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mirror_module, "POLL_SECONDS", 0.05)
    with socket.socket() as probe:  # a free port number
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def main() -> None:
        agent = EchoAgent([port])
        mirror = PortMirror(netns, agent)  # type: ignore[arg-type]
        mirror.start()
        for _ in range(100):
            if mirror.ports:
                break
            await asyncio.sleep(0.02)
        assert mirror.ports == [port]
        payload = os.urandom(200_000).hex().encode()
        got = await asyncio.to_thread(client, netns, port, payload)
        assert got == payload.upper()
        # The client sees EOF (write_eof) just before the mirror closes the guest's end.
        for _ in range(100):
            if agent.closed:
                break
            await asyncio.sleep(0.02)
        assert agent.closed == [1]
        # The host's own loopback is not the netns's: nothing listens there.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        agent.ports = []  # the guest's server went away: so does the listener
        for _ in range(100):
            if not mirror.ports:
                break
            await asyncio.sleep(0.02)
        assert mirror.ports == []
        await mirror.close()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.to_thread(client, netns, port, b"x")

    asyncio.run(main())
