"""Pod networks for tests, all on this machine: a network namespace with a veth whose
other end stays on the host (what a CNI plugin makes), a bounded HTTP server on the host
side, and what of ours is left in a netns. Observed with iproute2, not with the product's
own netlink code, so a test cannot agree with a bug of ours.
"""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import secrets
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass

OURS = ("_kata",)  # our links are tap<N>_kata / mv<hex>_kata
MODELS = ["tcfilter", "macvtap"]  # internetworking_model values that wire a NIC


def ip(*args: str, check: bool = True) -> str:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and res.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


def tc(*args: str) -> str:
    return subprocess.run(["tc", *args], capture_output=True, text=True, timeout=30,
                          check=True).stdout


@dataclass
class PodNetns:
    """/run/netns/<name> with eth0 (``pod_ip``/24, default route via ``host_ip``) and the
    veth's host end ``host_if`` (``host_ip``/24); also an IPv6 address on each end."""

    name: str
    host_if: str
    host_ip: str
    pod_ip: str
    pod_ip6: str
    host_ip6: str

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def pod_mac(self) -> str:
        return ip("-n", self.name, "-br", "link", "show", "eth0").split()[2]

    def leftovers(self) -> list[str]:
        """Links of ours and ingress qdiscs in the netns ([] when clean)."""
        found = [line for line in ip("-n", self.name, "-o", "link").splitlines()
                 if any(o in line for o in OURS) or "macvtap" in line]
        found += [q for q in tc("-n", self.name, "qdisc", "show").splitlines()
                  if "ingress" in q]
        return found


@contextlib.contextmanager
def pod_netns(kind: str = "veth", second: bool = False) -> Iterator[PodNetns]:
    """A pod netns as CNI leaves it (``kind`` other than veth: eth0 is that device
    instead, for refusals); ``second``: a second veth ``net1`` in 10.<a>.<b+1>.0/24 (host
    end ``<host_if>b``, .1); removed afterwards with whatever is in it."""
    tag = secrets.token_hex(3)
    a, b = secrets.randbelow(200) + 50, secrets.randbelow(255)  # b + 1: the second veth
    # Written as `ip` prints them (b = 0 is "fd00:c0::2", not "fd00:c0:0::2"): tests compare.
    v6 = [ipaddress.IPv6Address(f"fd00:{a:x}:{b:x}::{n}").compressed for n in (2, 1)]
    net = PodNetns(f"kn{tag}", f"kh{tag}", f"10.{a}.{b}.1", f"10.{a}.{b}.2", *v6)
    ip("netns", "add", net.name)
    try:
        if kind == "veth":
            ip("link", "add", net.host_if, "type", "veth", "peer", "name", "eth0", "netns",
               net.name)
            ip("addr", "add", f"{net.host_ip}/24", "dev", net.host_if)
            ip("-6", "addr", "add", f"{net.host_ip6}/64", "dev", net.host_if, "nodad")
            ip("link", "set", net.host_if, "up")
            ip("-n", net.name, "addr", "add", f"{net.pod_ip}/24", "dev", "eth0")
            ip("-n", net.name, "-6", "addr", "add", f"{net.pod_ip6}/64", "dev", "eth0", "nodad")
            ip("-n", net.name, "link", "set", "eth0", "up")
            ip("-n", net.name, "route", "add", "default", "via", net.host_ip)
            if second:
                other = f"{net.host_if}b"
                ip("link", "add", other, "type", "veth", "peer", "name", "net1", "netns",
                   net.name)
                ip("addr", "add", f"10.{a}.{b + 1}.1/24", "dev", other)
                ip("link", "set", other, "up")
                ip("-n", net.name, "addr", "add", f"10.{a}.{b + 1}.2/24", "dev", "net1")
                ip("-n", net.name, "link", "set", "net1", "up")
        elif kind != "empty":
            ip("-n", net.name, "link", "add", "eth0", "type", kind)
            ip("-n", net.name, "link", "set", "eth0", "up")
        yield net
    finally:
        ip("link", "del", f"{net.host_if}b", check=False)
        ip("link", "del", net.host_if, check=False)
        ip("netns", "del", net.name, check=False)


class _Handler(http.server.BaseHTTPRequestHandler):
    payload = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def http_server(address: str, payload: bytes) -> Iterator[int]:
    """Serve ``payload`` at http://address:<port>/ (the port yielded) for the block."""
    handler = type("Handler", (_Handler,), {"payload": payload})
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    server_class = type("Server", (http.server.ThreadingHTTPServer,),
                        {"address_family": family})
    server = server_class((address, 0), handler)
    server.timeout = 10
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def fetch(url: str, limit: int = 1 << 20, timeout: float = 30.0) -> bytes:
    """GET ``url`` from the host (at most ``limit`` bytes)."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as r:
        return bytes(r.read(limit))


def fetched(url: str, into: list[bytes]) -> bool:
    """Try `fetch` once (for wait_until): True, with the body appended to ``into``, once it
    answers."""
    try:
        into.append(fetch(url, timeout=5))
        return True
    except OSError:
        return False


def http_get(host: str, port: int) -> str:
    """A shell pipeline fetching http://host:port/ inside a busybox container (its static
    wget crashes resolving the service name; nc takes numbers)."""
    return f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 20 {host} {port}"
