"""Pod networking through containerd's CRI plugin and real CNI plugins (bridge +
host-local from containernetworking-plugins): the pod's address lands on the guest's eth0,
traffic flows both ways with the host and between pods, DNS and hostname are what CRI
asked for, and removing the pod leaves nothing (CNI's teardown included).

All traffic stays on the test's own bridge (its gateway is the host's end); transfers are
bounded in size and time.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import pytest

from tests.harness.containerd import cni_gateway
from tests.harness.cri import streaming
from tests.harness.cri.client import Kubelet, PodOptions
from tests.harness.images import IMAGE_REF
from tests.harness.kata import CRI_HANDLER, Kata
from tests.harness.podnet import MODELS, fetched, http_get, http_server
from tests.harness.procs import wait_until

PAYLOAD = os.urandom(256 * 1024)
SERVE = ("mkdir -p /w && echo pong-from-{name} > /w/i && head -c 262144 /dev/zero | tr '\\0' x"
         " > /w/big && exec httpd -f -p 8080 -h /w")




def sh(kubelet: Kubelet, cid: str, script: str) -> str:
    res = kubelet.exec_sync(cid, ["sh", "-c", script], timeout=90)
    assert res.exit_code == 0, (script, res)
    return res.stdout.decode()


def bridge_ports(kata: Kata) -> list[str]:
    brif = Path(f"/sys/class/net/{kata.cd.bridge}/brif")
    return sorted(os.listdir(brif)) if brif.is_dir() else []


@pytest.mark.parametrize("model", MODELS)
def test_pods_on_the_cni_bridge_reach_the_host_and_each_other(
        cri: tuple[Kata, Kubelet], model: str) -> None:
    kata, kubelet = cri
    kata.write_config({"runtime": {"internetworking_model": model}})
    gateway = cni_gateway(kata.cd.dir / "cni")
    opts = PodOptions(hostname="web-host", dns_servers=[gateway],
                      dns_searches=["ns1.svc.cluster.test"], dns_options=["ndots:5"])
    web = kubelet.run_pod("web", CRI_HANDLER, opts)
    web_ip = kubelet.pod_status(web.id).network.ip
    app = kubelet.start_container(web, "app", IMAGE_REF, ["sleep", "300"])
    kubelet.start_container(web, "srv", IMAGE_REF, ["sh", "-c", SERVE.format(name="web")])

    shown = sh(kubelet, app, "ip -o -4 addr show eth0; hostname; cat /etc/resolv.conf")
    assert f"inet {web_ip}/24" in shown, shown
    assert "web-host" in shown.split(), shown
    assert f"nameserver {gateway}" in shown and "search ns1.svc.cluster.test" in shown, shown
    assert "options ndots:5" in shown, shown
    assert "PING-OK" in sh(kubelet, app, f"ping -c 2 -W 5 {gateway} >/dev/null && echo PING-OK")

    with http_server(gateway, PAYLOAD) as port:  # the host side serves, the pod fetches
        got = sh(kubelet, app, f"{http_get(gateway, port)} | tail -c {len(PAYLOAD)} | md5sum")
    assert hashlib.md5(PAYLOAD).hexdigest() in got, got
    answers: list[bytes] = []  # the pod serves, the host fetches
    wait_until(lambda: fetched(f"http://{web_ip}:8080/i", answers), 60, 0.5)
    assert answers and answers[0] == b"pong-from-web\n", answers

    peer = kubelet.run_pod("peer", CRI_HANDLER)
    peer_app = kubelet.start_container(peer, "app", IMAGE_REF, ["sleep", "300"])
    assert "PING-OK" in sh(kubelet, peer_app, f"ping -c 2 -W 5 {web_ip} >/dev/null && echo PING-OK")
    got = sh(kubelet, peer_app, f"printf 'GET /i HTTP/1.0\\r\\n\\r\\n' | nc -w 20 {web_ip} 8080")
    assert "pong-from-web" in got, got

    for pod in (web, peer):
        kubelet.stop_pod(pod.id)
        kubelet.remove_pod(pod.id)
    assert bridge_ports(kata) == [], "CNI's teardown left veths on the bridge"
    assert "failed to destroy network" not in kata.cd.log_path.read_text()


def test_a_pod_whose_shim_was_killed_is_torn_down_cleanly(cri: tuple[Kata, Kubelet]) -> None:
    kata, kubelet = cri
    pod = kubelet.run_pod("doomed", CRI_HANDLER)
    kubelet.start_container(pod, "app", IMAGE_REF, ["sleep", "300"])
    assert len(bridge_ports(kata)) == 1
    for shim in kata.shim_daemons():
        os.kill(shim.pid, signal.SIGKILL)
    wait_until(lambda: not kata.qemu_processes(), 60, 0.2)
    kubelet.stop_pod(pod.id)
    kubelet.remove_pod(pod.id)
    assert bridge_ports(kata) == [], "CNI's teardown left veths on the bridge"
    assert "failed to destroy network" not in kata.cd.log_path.read_text()


def test_a_host_network_pod_is_refused_with_a_clear_error(cri: tuple[Kata, Kubelet]) -> None:
    import grpc

    _, kubelet = cri
    with pytest.raises(grpc.RpcError) as raised:
        kubelet.run_pod("hostnet", CRI_HANDLER, PodOptions(host_network=True))
    assert "host's network" in (raised.value.details() or ""), raised.value.details()


def forward(kubelet: Kubelet, pod_id: str, port: int, send: bytes, until: bytes,
            timeout: float = 90.0) -> streaming.ForwardResult:
    """kubectl port-forward's part: PortForward, then the stream (the shim mirrors a guest
    port within a few seconds of it listening, so retry until ``until`` comes back)."""
    deadline = time.monotonic() + timeout
    while True:
        result = streaming.port_forward(kubelet.port_forward_url(pod_id, port), send,
                                        timeout=20, until=until)
        if until in result.data or time.monotonic() > deadline:
            return result
        time.sleep(1)


def test_port_forward_reaches_a_server_in_the_pod(cri: tuple[Kata, Kubelet]) -> None:
    """Where Kata fails: containerd dials localhost:<port> in the pod's netns on the host;
    the shim mirrors the guest's listening ports there."""
    _, kubelet = cri
    pod = kubelet.run_pod("fwd", CRI_HANDLER)
    kubelet.start_container(pod, "srv", IMAGE_REF, ["sh", "-c", SERVE.format(name="fwd")])
    got = forward(kubelet, pod.id, 8080, b"GET /i HTTP/1.0\r\n\r\n", b"pong-from-fwd")
    assert b"pong-from-fwd" in got.data, got
    body = b"x" * 262144  # 256 KiB back through the agent channel
    big = forward(kubelet, pod.id, 8080, b"GET /big HTTP/1.0\r\n\r\n", b"\r\n\r\n" + body)
    assert big.data.endswith(b"\r\n\r\n" + body), len(big.data)
    # A port nothing listens on: containerd's dial fails and says so on the error channel.
    none = streaming.port_forward(kubelet.port_forward_url(pod.id, 9), b"hi", timeout=20)
    assert none.data == b"" and none.errors, none
    kubelet.stop_pod(pod.id)
    kubelet.remove_pod(pod.id)
