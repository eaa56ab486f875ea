"""A pod's network, side by side: runc, and kata with each internetworking model, in one
run of one private containerd, each container in a network namespace wired the way CNI's
bridge plugin leaves one (a veth whose host end holds the gateway address).

    sudo .venv/bin/python -m benchmarks.pod_network [-n 3] [--mib 32]

For each runtime, one container (``ctr run --with-ns network:<netns>``); between it and
the veth's host end (nothing else is ever a target):

* ``upload``: the container sends ``--mib`` MiB (``dd | nc``) to a receiver on the bridge;
  MiB/s from the first byte to the end of the stream, as the receiver sees it;
* ``download``: the host sends ``--mib`` MiB to ``nc -l`` in the container; MiB/s from
  connect to the container's close;
* ``rtt``: the container pings the gateway 20 times, 0.2 s apart; busybox's average.

(Both runtimes are driven with ctr, each container joining a netns this module wires, so
that the two see the same network; the CRI pod start is `benchmarks.suite`'s figure 3.)

Each figure is the median of ``-n`` transfers. Not part of `make test` (a smoke run is:
tests/e2e/test_bench_network.py).
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from tests.harness.images import IMAGE_REF
from tests.harness.kata import Kata, kata_containerd
from tests.harness.podnet import pod_netns
from tests.harness.scenarios import BOOT_TIMEOUT, KATA, remove

CHUNK = 1 << 16
PORT_IN_POD = 5001
TIMEOUT = 300.0
#: (runtime as reported, kata's internetworking model; "" for runc), in the order they run.
RUNTIMES = (("runc", ""), ("kata tcfilter", "tcfilter"), ("kata macvtap", "macvtap"))


@dataclass
class Figures:
    runtime: str
    upload_mib_s: float
    download_mib_s: float
    rtt_ms: float


@contextmanager
def receiver(address: str) -> Iterator[tuple[int, list[tuple[int, float]]]]:
    """A TCP sink on ``address``: yields its port and, per connection, (bytes, seconds
    from first byte to end of stream)."""
    server = socket.create_server((address, 0))
    server.settimeout(TIMEOUT)
    results: list[tuple[int, float]] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(TIMEOUT)
                first = conn.recv(CHUNK)
                start, total = time.monotonic(), len(first)
                while chunk := conn.recv(CHUNK):
                    total += len(chunk)
                results.append((total, time.monotonic() - start))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], results
    finally:
        # close() alone leaves accept() blocked (the join then waited its whole 5 s after
        # every transfer); shutdown() wakes it on Linux.
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(5)


@dataclass
class Box:
    """One running container: how to run a shell script in it."""

    kata: Kata
    cid: str
    execs: int = 0

    def sh(self, script: str) -> str:
        self.execs += 1
        res = self.kata.cd.ctr("task", "exec", "--exec-id", f"b{self.execs}", self.cid,
                               "sh", "-c", script, timeout=TIMEOUT)
        if res.returncode != 0:
            raise RuntimeError(f"{script!r} failed: {res.stderr}")
        return res.stdout


def upload(box: Box, gateway: str, mib: int) -> float:
    with receiver(gateway) as (port, results):
        box.sh(f"dd if=/dev/zero bs=64k count={mib * 16} 2>/dev/null | "
               f"nc -w 30 {gateway} {port}")
        deadline = time.monotonic() + 30
        while not results and time.monotonic() < deadline:
            time.sleep(0.05)
    total, seconds = results[0]
    if total != mib << 20:
        raise RuntimeError(f"upload: received {total} bytes of {mib << 20}")
    return total / (1 << 20) / seconds


def download(box: Box, pod_ip: str, mib: int) -> float:
    done = threading.Thread(target=box.sh, args=(
        f"nc -l -p {PORT_IN_POD} > /tmp/sink; wc -c < /tmp/sink; rm /tmp/sink",))
    done.start()
    block = bytes(CHUNK)
    deadline = time.monotonic() + 60
    while True:  # nc -l takes a moment to listen inside the guest
        try:
            conn = socket.create_connection((pod_ip, PORT_IN_POD), timeout=TIMEOUT)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    with conn:
        start = time.monotonic()
        for _ in range((mib << 20) // CHUNK):
            conn.sendall(block)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)  # the container's nc closes once it has read everything
        seconds = time.monotonic() - start
    done.join(TIMEOUT)
    return mib / seconds


def rtt(box: Box, gateway: str, pings: int) -> float:
    out = box.sh(f"ping -c {pings} -i 0.2 -W 5 {gateway}")
    m = re.search(r"min/avg/max = [\d.]+/([\d.]+)/", out)
    if not m:
        raise RuntimeError(f"no ping summary in {out!r}")
    return float(m.group(1))


def measure(kata: Kata, runtime: str, model: str, n: int, mib: int, pings: int) -> Figures:
    if model:
        kata.write_config({"runtime": {"internetworking_model": model}})
    cid = f"net-{model or 'runc'}"
    with pod_netns() as net:
        res = kata.cd.ctr("run", "-d", "--runtime", KATA if model else "io.containerd.runc.v2",
                          "--with-ns", f"network:{net.path}", IMAGE_REF, cid, "sleep", "3600",
                          timeout=BOOT_TIMEOUT)
        if res.returncode != 0:
            raise RuntimeError(f"{runtime}: {res.stderr}")
        try:
            box = Box(kata, cid)
            ups = [upload(box, net.host_ip, mib) for _ in range(n)]
            downs = [download(box, net.pod_ip, mib) for _ in range(n)]
            return Figures(runtime, statistics.median(ups), statistics.median(downs),
                           rtt(box, net.host_ip, pings))
        finally:
            remove(kata.cd, cid)


def run(n: int, mib: int, runtimes: Sequence[tuple[str, str]] = RUNTIMES,
        pings: int = 20) -> list[Figures]:
    """Each of `runtimes` (all of `RUNTIMES` by default), one after the other, in one
    private containerd; `pings` to the gateway for the rtt."""
    with kata_containerd() as kata:
        return [measure(kata, runtime, model, n, mib, pings) for runtime, model in runtimes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=3, help="transfers per direction")
    parser.add_argument("--mib", type=int, default=32, help="MiB per transfer")
    args = parser.parse_args()
    figures = run(args.n, args.mib)
    print(f"{args.mib} MiB per transfer, median of {args.n}; rtt: 20 pings to the gateway")
    print("| runtime | pod -> host MiB/s | host -> pod MiB/s | rtt ms |")
    print("|---|---|---|---|")
    for f in figures:
        print(f"| {f.runtime} | {f.upload_mib_s:.1f} | {f.download_mib_s:.1f} | "
              f"{f.rtt_ms:.3f} |")


if __name__ == "__main__":
    main()
