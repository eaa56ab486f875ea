"""benchmarks.pod_network's TCP sink, on loopback."""

from __future__ import annotations

import socket
import time

from benchmarks.pod_network import receiver


def test_the_sink_counts_a_stream_and_lets_go_at_once() -> None:
    start = time.monotonic()
    with receiver("127.0.0.1") as (port, results):
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(bytes(300_000))
        deadline = time.monotonic() + 5
        while not results and time.monotonic() < deadline:
            time.sleep(0.01)
    # Its thread was blocked in accept(): the sink used to wait 5 s for it every transfer.
    assert time.monotonic() - start < 2
    [(total, seconds)] = results
    assert total == 300_000 and seconds >= 0
