"""The metrics endpoint: the families a snapshot becomes (read back with prometheus_client's
own parser), the snapshot of a pod run by fakes, and the HTTP server's bounds."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sandbox import monitor as sandbox_monitor
from sandbox.monitor import AgentCall, CgroupStats, GuestStats, PodSnapshot, ProcessSample
from sandbox.pod import Pod
from shim import monitor as shim_monitor
from shim.exposition import render
from shim.monitor import Monitor
from tests.unit.fakes import FakeWorld, RecordingPublisher, fake_sandbox
from tests.unit.test_shim_service import Harness
from tests.unit.test_shim_service import run as run_pod

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """{sample name: {labels: value}} and {family name: type}."""
    samples: Samples = {}
    types = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples, types


def one(samples: Samples, name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


PROC = ProcessSample(cpu_seconds=1.5, rss_bytes=4096, pss_bytes=2048, open_fds=9, threads=3)


def test_every_family_of_a_full_snapshot() -> None:
    snap = PodSnapshot(
        "pod1", shim=PROC,
        processes={"vmm": PROC, "virtiofsd": ProcessSample(2.0, 10, None, 4, 1)},
        guest=GuestStats(512 << 20, 100 << 20, 300 << 20, 0.5, 0.25, 0.125, 60.0),
        containers={"c1": CgroupStats(cpu_stat={"usage_usec": 2_500_000}, memory_current=8192,
                                      memory_max=1 << 20, pids_current=2),
                    "c2": CgroupStats(memory_current=1)},
        agent_calls=[AgentCall("GetGuestStats", 0.03, True), AgentCall("StatsContainer", 0.02,
                     True), AgentCall("StatsContainer", 0.05, True)])
    samples, types = parse(render(snap, tasks=11).decode())
    sb = {"sandbox_id": "pod1"}
    assert one(samples, "kata_shim_cpu_seconds_total", **sb) == 1.5
    assert types["kata_shim_cpu_seconds"] == "counter"
    assert one(samples, "kata_shim_rss_bytes", **sb) == 4096
    assert one(samples, "kata_shim_tasks", **sb) == 11
    assert one(samples, "kata_hypervisor_pss_bytes", **sb) == 2048
    assert one(samples, "kata_hypervisor_open_fds", **sb) == 9
    assert one(samples, "kata_virtiofsd_cpu_seconds_total", **sb) == 2.0
    assert "kata_virtiofsd_pss_bytes" not in samples  # unknown, not 0
    assert "kata_hypervisor_tasks" not in samples
    assert one(samples, "kata_guest_memory_total_bytes", **sb) == 512 << 20
    assert one(samples, "kata_guest_load5", **sb) == 0.25
    assert one(samples, "kata_guest_uptime_seconds", **sb) == 60.0
    assert one(samples, "kata_container_cpu_seconds_total", container_id="c1", **sb) == 2.5
    assert one(samples, "kata_container_memory_usage_bytes", container_id="c2", **sb) == 1
    assert one(samples, "kata_container_memory_limit_bytes", container_id="c1", **sb) == 1 << 20
    assert len(samples["kata_container_memory_limit_bytes"]) == 1  # c2 has no limit
    assert one(samples, "kata_container_pids", container_id="c1", **sb) == 2
    assert one(samples, "kata_agent_up", **sb) == 1
    assert one(samples, "kata_agent_rpc_duration_seconds", method="StatsContainer",
               outcome="ok", **sb) == 0.05  # the slowest
    assert all(name.startswith("kata_") for name in types)


def test_a_bare_snapshot_still_says_the_agent_is_down() -> None:
    samples, _ = parse(render(PodSnapshot("pod1", agent_calls=[
        AgentCall("GetGuestStats", 5.0, False)]), tasks=1).decode())
    assert one(samples, "kata_agent_up", sandbox_id="pod1") == 0
    assert one(samples, "kata_agent_rpc_duration_seconds", sandbox_id="pod1",
               method="GetGuestStats", outcome="failed") == 5.0
    assert not any(n.startswith(("kata_shim", "kata_guest", "kata_hypervisor")) for n in samples)


@pytest.mark.parametrize("role", ["Bad-Role", "9lives", "x" * 40, ""])
def test_roles_that_are_no_metric_name_are_left_out(role: str) -> None:
    samples, _ = parse(render(PodSnapshot("p", processes={role: PROC}), tasks=1).decode())
    assert [n for n in samples if "cpu_seconds" in n] == []


def test_label_values_are_escaped() -> None:
    samples, _ = parse(render(PodSnapshot('a"b\\c', shim=PROC), tasks=1).decode())
    assert one(samples, "kata_shim_threads", sandbox_id='a"b\\c') == 3


# --- the endpoint over a pod run by fakes ----------------------------------------------


async def http(path: Path, request: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(request)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


def body_of(answer: bytes) -> str:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
    assert b"Content-Type: text/plain; version=" in head  # what prometheus_client pairs
    return body.decode()


GET = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"


def test_scrape(tmp_path: Path) -> None:
    """A running pod with a started container: every family, then no socket after it."""

    async def body(h: Harness) -> None:
        h.sandbox.monitor = Monitor(h.pod).start
        await h.create("pod")
        await h.call("Start", id="pod")
        sock = h.sandbox.monitor_socket
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600 and sock.is_socket()
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        samples, _ = parse(body_of(await http(sock, GET)))
        sb = {"sandbox_id": "pod"}
        assert one(samples, "kata_shim_rss_bytes", **sb) > 1 << 20
        assert one(samples, "kata_shim_tasks", **sb) >= 1
        assert one(samples, "kata_hypervisor_threads", **sb) >= 1  # the fake VMM: `sleep`
        assert one(samples, "kata_guest_memory_total_bytes", **sb) == 256 << 20
        assert one(samples, "kata_container_cpu_seconds_total", container_id="pod", **sb) \
            == 0.0015
        assert one(samples, "kata_container_memory_usage_bytes", container_id="pod", **sb) == 8192
        assert one(samples, "kata_agent_up", **sb) == 1
        assert ("guest_stats",) in h.agent.calls and ("stats_container", "pod") in h.agent.calls
        await h.pod.stop_sandbox()
        assert not sock.exists() and not sock.parent.exists()

    run_pod(body, tmp_path)


def test_mute_guest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest that does not answer costs the scrape only its guest figures."""
    monkeypatch.setattr(sandbox_monitor, "AGENT_TIMEOUT", 0.2)

    async def body(h: Harness) -> None:
        h.world.agent_fail_at = frozenset({"guest_stats_hangs"})
        h.sandbox.monitor = Monitor(h.pod).start
        await h.create("pod")
        samples, _ = parse(body_of(await http(h.sandbox.monitor_socket, GET)))
        assert one(samples, "kata_agent_up", sandbox_id="pod") == 0
        assert "kata_guest_memory_total_bytes" not in samples
        assert one(samples, "kata_shim_threads", sandbox_id="pod") >= 1

    run_pod(body, tmp_path)


def test_a_monitor_that_cannot_start_leaves_the_pod_running(tmp_path: Path) -> None:
    async def refuse(path: Path) -> Callable[[], Awaitable[None]]:
        raise PermissionError(13, "refused")

    async def body(h: Harness) -> None:
        h.sandbox.monitor = refuse
        await h.create("pod")
        assert not h.sandbox.monitor_socket.exists()

    run_pod(body, tmp_path)


# --- the server's bounds (a pod that never booted: shim figures only) ------------------


def serve(tmp_path: Path, body: Callable[[Path], Awaitable[None]]) -> None:
    async def main() -> None:
        pod = Pod(fake_sandbox(tmp_path, FakeWorld()), RecordingPublisher())  # type: ignore[arg-type]
        path = tmp_path / "m.sock"
        stop = await Monitor(pod).start(path)
        try:
            await body(path)
        finally:
            await stop()
        assert not path.exists()

    asyncio.run(main())


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /other HTTP/1.1\r\n\r\n", b"404"),
    (b"GET /metrics/x HTTP/1.1\r\n\r\n", b"404"),
    (b"POST /metrics HTTP/1.1\r\n\r\n", b"405"),
    (b"\x16\x03\x01\x00\xa5\x01\x00\x00", b"400"),
    (b"GET /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", b"400"),
    (b"GET /metrics HTTP/3.0\r\n\r\n", b"505"),
    (b"GET /metrics HTTP/1.1\r\n", b"400"),  # then EOF: the head never ends
    (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000, b"431"),
])
def test_what_is_not_a_scrape(tmp_path: Path, request_bytes: bytes, status: bytes) -> None:
    async def body(path: Path) -> None:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(request_bytes)
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), 10)
        assert answer.split(b" ")[1] == status, answer
        assert b"Connection: close" in answer
        writer.close()

    serve(tmp_path, body)


def test_a_query_string_is_ignored(tmp_path: Path) -> None:
    async def body(path: Path) -> None:
        samples, _ = parse(body_of(await http(path, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")))
        assert one(samples, "kata_shim_open_fds", sandbox_id="pod") >= 3

    serve(tmp_path, body)


def test_a_silent_client_is_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shim_monitor, "REQUEST_TIMEOUT", 0.2)

    async def body(path: Path) -> None:
        reader, writer = await asyncio.open_unix_connection(str(path))
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, unanswered
        writer.close()

    serve(tmp_path, body)


def test_connections_beyond_the_cap_are_closed_at_once(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shim_monitor, "MAX_CONNECTIONS", 2)

    async def body(path: Path) -> None:
        idle = [await asyncio.open_unix_connection(str(path)) for _ in range(2)]
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(GET)
        with contextlib.suppress(ConnectionResetError):  # closed with our request unread
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        for _, w in idle:
            w.close()
        await asyncio.sleep(0.1)
        body_of(await http(path, GET))  # served again once they went

    serve(tmp_path, body)


def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    import socket

    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "m.sock"))
    stale.close()

    async def body(path: Path) -> None:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        body_of(await http(path, GET))

    serve(tmp_path, body)


def test_stop_ends_open_connections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        pod = Pod(fake_sandbox(tmp_path, FakeWorld()), RecordingPublisher())  # type: ignore[arg-type]
        path = tmp_path / "m.sock"
        stop = await Monitor(pod).start(path)
        reader, writer = await asyncio.open_unix_connection(str(path))
        await asyncio.sleep(0.05)
        await asyncio.wait_for(stop(), 5)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert not path.exists()

    asyncio.run(main())


def test_a_failing_collection_answers_500(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(pod: Pod) -> PodSnapshot:
        raise RuntimeError("bug")

    monkeypatch.setattr(shim_monitor, "snapshot", broken)

    async def body(path: Path) -> None:
        answer = await http(path, GET)
        assert answer.startswith(b"HTTP/1.1 500 Internal Server Error\r\n"), answer
        assert answer.endswith(b"\r\n\r\nfailed to collect metrics; see the shim's log\n")
        answer = await http(path, b"GET /nothing HTTP/1.1\r\n\r\n")  # still serving
        assert answer.startswith(b"HTTP/1.1 404 "), answer

    serve(tmp_path, body)
