"""Fakes for the shim's unit tests: a scripted sandbox and an event recorder."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from sandbox.config import RuntimeConfig
from sandbox.errors import NotFoundError, UnavailableError
from sandbox.types import ContainerConfig, ExecConfig


@dataclass
class FakeProc:
    """One guest process: output to hand out, stdin received, an exit to wait for."""

    stdout: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    stderr: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    stdin: bytearray = field(default_factory=bytearray)
    stdin_closed: asyncio.Event = field(default_factory=asyncio.Event)
    exit: asyncio.Future[int] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    signals: list[tuple[int, bool]] = field(default_factory=list)

    def finish(self, status: int, out: bytes = b"", err: bytes = b"") -> None:
        """Write the last output, end both streams, then exit with ``status``."""
        for q, data in ((self.stdout, out), (self.stderr, err)):
            if data:
                q.put_nowait(data)
            q.put_nowait(b"")
        if not self.exit.done():
            self.exit.set_result(status)


class FakeSandbox:
    """Implements the sandbox API the shim uses, in memory."""

    instances: list[FakeSandbox] = []

    def __init__(self, sandbox_id: str, config: RuntimeConfig | None = None) -> None:
        self.id = sandbox_id
        self.config = config
        self.calls: list[tuple[str, ...]] = []
        self.procs: dict[tuple[str, str], FakeProc] = {}
        self.containers: set[str] = set()
        self.execs: dict[tuple[str, str], ExecConfig] = {}
        self.running = False
        self.fail_start: Exception | None = None
        self.next_pid = 100
        FakeSandbox.instances.append(self)

    qemu_pid = 4242
    accelerator = "tcg"
    guest_kernel_release = "6.1.0-fake"

    def proc(self, cid: str, eid: str = "") -> FakeProc:
        """The fake guest process (created on first use)."""
        return self.procs.setdefault((cid, eid), FakeProc())

    async def start(self, hostname: str = "") -> None:
        self.calls.append(("start", hostname))
        if self.fail_start is not None:
            raise self.fail_start
        self.running = True

    async def stop(self) -> None:
        self.calls.append(("stop",))
        self.running = False
        for p in self.procs.values():
            if not p.exit.done():
                p.exit.set_exception(UnavailableError("failed to wait: sandbox stopped"))
            p.stdout.put_nowait(b"")
            p.stderr.put_nowait(b"")

    async def create_container(self, c: ContainerConfig) -> None:
        self.calls.append(("create_container", c.container_id))
        self.containers.add(c.container_id)

    async def remove_container(self, container_id: str) -> None:
        self.calls.append(("remove_container", container_id))
        self.containers.discard(container_id)

    def add_exec(self, e: ExecConfig) -> None:
        self.calls.append(("add_exec", e.container_id, e.exec_id))
        self.execs[(e.container_id, e.exec_id)] = e

    async def remove_process(self, container_id: str, exec_id: str) -> None:
        self.calls.append(("remove_process", container_id, exec_id))
        if self.execs.pop((container_id, exec_id), None) is None:
            raise NotFoundError(f"exec {exec_id} not found")

    async def list_pids(self, container_id: str) -> list[int]:
        return [1, 7]

    async def start_process(self, container_id: str, exec_id: str) -> int:
        self.calls.append(("start_process", container_id, exec_id))
        if not self.running:
            raise UnavailableError("failed to start process: sandbox not running")
        self.proc(container_id, exec_id)
        self.next_pid += 1
        return self.next_pid

    async def wait_process(self, container_id: str, exec_id: str) -> int:
        return await asyncio.shield(self.proc(container_id, exec_id).exit)

    async def signal_process(
        self, container_id: str, exec_id: str, signal: int, all: bool = False
    ) -> None:
        p = self.proc(container_id, exec_id)
        p.signals.append((signal, all))
        if signal in (9, 15):
            p.finish(128 + signal)

    async def read_stdout(self, container_id: str, exec_id: str) -> bytes:
        return await self.proc(container_id, exec_id).stdout.get()

    async def read_stderr(self, container_id: str, exec_id: str) -> bytes:
        return await self.proc(container_id, exec_id).stderr.get()

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        self.proc(container_id, exec_id).stdin += data
        return len(data)

    async def close_stdin(self, container_id: str, exec_id: str) -> None:
        self.proc(container_id, exec_id).stdin_closed.set()

    async def resize_pty(self, container_id: str, exec_id: str, width: int, height: int) -> None:
        self.calls.append(("resize_pty", container_id, exec_id, str(width), str(height)))


class RecordingPublisher:
    """Stands in for events.Publisher: keeps (topic, message) in publish order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Message]] = []

    def publish(self, event: Message) -> None:
        from shim.events import TOPICS

        self.events.append((TOPICS[type(event)], event))

    def topics(self) -> list[str]:
        return [t for t, _ in self.events]


def write_bundle(path: Path, annotations: dict[str, str] | None = None, **spec: Any) -> Path:
    """A bundle dir with a config.json."""
    import json

    path.mkdir(parents=True, exist_ok=True)
    body = {"ociVersion": "1.0.2", "process": {"args": ["sh"]}, "root": {"path": "rootfs"}}
    body.update(spec)
    if annotations:
        body["annotations"] = annotations
    (path / "config.json").write_text(json.dumps(body))
    (path / "rootfs").mkdir(exist_ok=True)
    return path


def write_config(path: Path, state_dir: Path) -> Path:
    """A minimal configuration.toml."""
    path.write_text(f'[runtime]\nstate_dir = "{state_dir}"\n')
    return path
