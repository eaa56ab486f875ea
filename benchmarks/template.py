"""What a VM template would give a pod's start: cold boot against restoring a saved VM.

    sudo .venv/bin/python -m benchmarks.template [-n 5] [--json FILE] [--config FILE]

Measures the lever of issue 11's pre-booted VMs before the feature exists, with QEMU alone
(`build/bootguest.py`'s `Guest`: the runtime's own command line, the agent on
virtio-serial; kernel, initrd, parameters and memory from ``--config``'s
``[hypervisor.qemu]``, else build/out's with bootguest's defaults and 2048 MiB; q35 only).
`make bench` runs it as its "VM template" figure. Both paths end when the agent
has answered ``CreateSandbox`` with the shared filesystem mounted, so they do the same work:

* cold: QEMU with virtiofsd and its ``vhost-user-fs-pci`` on the command line, boot,
  agent ``Check``, ``CreateSandbox``;
* template: once, a guest booted without the share until its agent serves, paused and saved
  (QMP ``migrate`` to a file). Per pod: QEMU started with ``-incoming defer``, the state
  loaded (``migrate-incoming``) and the VM continued; then virtiofsd started, its socket
  ``chardev-add``'ed and ``vhost-user-fs-pci`` hot-plugged into a PCIe root port that the
  template was booted with; agent ``Check``, ``CreateSandbox``.

Why the share is hot-plugged: QEMU 7.2 refuses to migrate a VM that has a vhost-user-fs
device ("non-migratable device"). Why the template is saved before any host connection: a
guest saved right after a host closed its agent session did not answer on restore.

Per path and round: seconds from QEMU's spawn to the sandbox created, and QEMU's PSS then.
Rounds interleave the two paths. Every process and file is removed on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent_client.client import AgentClient
from agent_client.types import StorageSpec
from benchmarks.floor import GuestImage, _bootguest
from benchmarks.measure import memory_kib
from common.constants import SHARED_FS_TAG
from hypervisors.qmp import QmpClient
from hypervisors.statepaths import StatePaths
from hypervisors.virtiofsd import virtiofsd_argv

GUEST_SHARED_DIR = "/run/kata-containers/shared/containers"
ROOT_PORT = "rp0"
#: The template's hot-plug slot, on the command line of the saved guest and of every restore.
ROOT_PORT_ARGS = ("-device", f"pcie-root-port,id={ROOT_PORT},bus=pcie.0,chassis=1,slot=1")
SERVING = "kata-agent: serving on"
WORK_PREFIX = "kata-template-bench-"  # its directory in /tmp: the state file and the share
TIMEOUT = 120.0


def _guest(image: GuestImage, share: Path | None, extra: tuple[str, ...] = ()) -> Any:
    if image.machine_type != "q35":
        raise ValueError(f"the template needs a q35 machine (a PCIe root port), not "
                         f"{image.machine_type}")
    return image.guest(share, extra)


async def _socket(guest: Any, path: Path) -> Path:
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():  # QEMU creates its server sockets while it starts
        if time.monotonic() > deadline or guest.proc.poll() is not None:
            raise RuntimeError(f"QEMU did not open {path}")
        await asyncio.sleep(0.01)
    return path


async def _qmp(guest: Any) -> QmpClient:
    return await QmpClient.connect(await _socket(guest, StatePaths(guest.tmp).qmp_socket))


async def _pass_file(qmp: QmpClient, path: Path, flags: int) -> None:
    """Hand QEMU an open file as monitor fd "state" (its seccomp sandbox forbids exec:)."""
    fd = os.open(path, flags, 0o600)
    try:
        await qmp.execute("getfd", {"fdname": "state"}, fds=[fd])
    finally:
        os.close(fd)


async def _create_sandbox(guest: Any) -> None:
    await _socket(guest, guest.agent_sock)
    agent = await AgentClient.connect(f"serial://{guest.agent_sock}", TIMEOUT)
    try:
        share = StorageSpec("virtio-fs", SHARED_FS_TAG, "virtiofs", GUEST_SHARED_DIR)
        await agent.create_sandbox("template-bench", "template-bench", [share])
    finally:
        await agent.close()


def _pss_mib(pid: int) -> float:
    return memory_kib(pid)[1] / 1024


async def save_template(image: GuestImage, state: Path) -> dict[str, float]:
    """Boot a guest without the share until its agent serves; pause it and save it."""
    with _guest(image, None, ROOT_PORT_ARGS) as guest:
        if guest.wait_for(SERVING, TIMEOUT) is None:
            raise RuntimeError(f"the template guest's agent never served:\n{guest.console()}")
        booted = time.monotonic() - guest.t0
        qmp = await _qmp(guest)
        try:
            started = time.monotonic()
            await qmp.execute("stop")
            await _pass_file(qmp, state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            await qmp.execute("migrate", {"uri": "fd:state"})
            status = await _migration_end(qmp)
        finally:
            await qmp.close()
        if status.get("status") != "completed":
            raise RuntimeError(f"saving the template failed: {status}")
        return {"boot to agent s": booted, "save s": time.monotonic() - started,
                "state MiB": state.stat().st_size / 2**20}


async def _migration_end(qmp: QmpClient) -> dict[str, Any]:
    while True:
        status: dict[str, Any] = await qmp.execute("query-migrate")
        if status.get("status") in ("completed", "failed", "cancelled"):
            return status
        await asyncio.sleep(0.05)


async def cold(image: GuestImage, share: Path) -> dict[str, float]:
    """Boot with the share on the command line, until the sandbox is created."""
    with _guest(image, share) as guest:
        await _create_sandbox(guest)
        return {"to sandbox s": time.monotonic() - guest.t0,
                "qemu PSS MiB": _pss_mib(guest.proc.pid)}


async def restored(image: GuestImage, state: Path, share: Path) -> dict[str, float]:
    """Restore the template, hot-plug the share, until the sandbox is created."""
    with _guest(image, None, (*ROOT_PORT_ARGS, "-incoming", "defer")) as guest:
        qmp = await _qmp(guest)
        virtiofsd = None
        try:
            await _pass_file(qmp, state, os.O_RDONLY)
            await qmp.execute("migrate-incoming", {"uri": "fd:state"})
            while (await qmp.execute("query-status"))["status"] == "inmigrate":
                await asyncio.sleep(0.02)
            await qmp.execute("cont")  # the template was saved paused
            running = time.monotonic() - guest.t0
            virtiofsd = _start_virtiofsd(Path(guest.tmp), share)
            await qmp.execute("chardev-add", {"id": "fs0-chr", "backend": {
                "type": "socket", "data": {"server": False, "addr": {
                    "type": "unix", "data": {"path": str(Path(guest.tmp) / "fs0.sock")}}}}})
            await qmp.execute("device_add", {"driver": "vhost-user-fs-pci", "id": "fs0",
                                             "chardev": "fs0-chr", "tag": SHARED_FS_TAG,
                                             "bus": ROOT_PORT})
            await _create_sandbox(guest)
            return {"to sandbox s": time.monotonic() - guest.t0, "running s": running,
                    "qemu PSS MiB": _pss_mib(guest.proc.pid)}
        finally:
            await qmp.close()
            guest.close()  # QEMU before its virtiofsd
            if virtiofsd is not None:
                virtiofsd.kill()
                virtiofsd.wait()


def _start_virtiofsd(tmp: Path, share: Path) -> subprocess.Popen[bytes]:
    socket_path = tmp / "fs0.sock"
    proc = subprocess.Popen(virtiofsd_argv(_bootguest().VIRTIOFSD, socket_path, share, "auto"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not socket_path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError("virtiofsd did not create its socket")
        time.sleep(0.01)
    return proc


async def measure(n: int, image: GuestImage | None = None) -> dict[str, Any]:
    """The template's own figures, then ``n`` interleaved rounds of cold and restored."""
    image = image or GuestImage()
    work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX))
    try:
        os.chmod(work, 0o700)
        share = work / "share"
        share.mkdir()
        state = work / "template.state"
        result: dict[str, Any] = {"template": await save_template(image, state),
                                  "cold": [], "restored": []}
        for i in range(n):
            order = ("cold", "restored") if i % 2 == 0 else ("restored", "cold")
            for path in order:
                sample = await (cold(image, share) if path == "cold"
                                else restored(image, state, share))
                result[path].append(sample)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def medians(samples: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]} if samples else {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=5, help="rounds (one cold, one restored each)")
    ap.add_argument("--json", type=Path, help="write every sample here")
    ap.add_argument("--config", type=Path, help="boot what this configuration.toml names")
    args = ap.parse_args(argv)
    image = GuestImage.from_config(args.config) if args.config else GuestImage()
    result = asyncio.run(measure(args.n, image))
    cold_m, restored_m = medians(result["cold"]), medians(result["restored"])
    print("template: " + ", ".join(f"{k} {v:.2f}" for k, v in result["template"].items()))
    for name, m in (("cold", cold_m), ("restored", restored_m)):
        print(f"{name:9} (median of {args.n}): " + ", ".join(f"{k} {v:.2f}" for k, v in m.items()))
    ratio = restored_m["to sandbox s"] / cold_m["to sandbox s"]
    print(f"restored / cold, spawn to sandbox created: {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
