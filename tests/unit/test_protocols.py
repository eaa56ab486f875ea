"""The generated protobuf modules: not stale, and wire-compatible with containerd."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.descriptor import Descriptor

from protocols import (
    events_forward_pb2,
    events_pb2,
    generate,
    mount_pb2,
    runtimeoptions_pb2,
    task_pb2,
    task_types_pb2,
)

REPO = Path(generate.__file__).resolve().parent.parent


def test_committed_modules_are_not_stale(tmp_path: Path) -> None:
    # Run from an unrelated cwd: generation must not depend on it.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(
        [sys.executable, "-m", "protocols.generate", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        check=True,
    )
    fresh = sorted(p.name for p in (tmp_path / "protocols").iterdir())
    committed = sorted(
        p.name for p in (REPO / "protocols").iterdir() if p.name.endswith(("_pb2.py", "_pb2.pyi"))
    )
    assert fresh == committed, "run `python -m protocols.generate`"
    for name in fresh:
        new = (tmp_path / "protocols" / name).read_text()
        assert (REPO / "protocols" / name).read_text() == new, f"{name} is stale: regenerate"


# message -> {field: number}, from containerd's .proto files (see the protocol brief).
# fmt: off
FIELDS: dict[str, dict[str, int]] = {
    "containerd.types.Mount": {"type": 1, "source": 2, "target": 3, "options": 4},
    "containerd.v1.types.ProcessInfo": {"pid": 1, "info": 2},
    "containerd.task.v2.CreateTaskRequest": {
        "id": 1, "bundle": 2, "rootfs": 3, "terminal": 4, "stdin": 5, "stdout": 6,
        "stderr": 7, "checkpoint": 8, "parent_checkpoint": 9, "options": 10,
    },
    "containerd.task.v2.CreateTaskResponse": {"pid": 1},
    "containerd.task.v2.StateRequest": {"id": 1, "exec_id": 2},
    "containerd.task.v2.StateResponse": {
        "id": 1, "bundle": 2, "pid": 3, "status": 4, "stdin": 5, "stdout": 6, "stderr": 7,
        "terminal": 8, "exit_status": 9, "exited_at": 10, "exec_id": 11,
    },
    "containerd.task.v2.StartRequest": {"id": 1, "exec_id": 2},
    "containerd.task.v2.StartResponse": {"pid": 1},
    "containerd.task.v2.DeleteRequest": {"id": 1, "exec_id": 2},
    "containerd.task.v2.DeleteResponse": {"pid": 1, "exit_status": 2, "exited_at": 3},
    "containerd.task.v2.PidsRequest": {"id": 1},
    "containerd.task.v2.PidsResponse": {"processes": 1},
    "containerd.task.v2.PauseRequest": {"id": 1},
    "containerd.task.v2.ResumeRequest": {"id": 1},
    "containerd.task.v2.CheckpointTaskRequest": {"id": 1, "path": 2, "options": 3},
    "containerd.task.v2.KillRequest": {"id": 1, "exec_id": 2, "signal": 3, "all": 4},
    "containerd.task.v2.ExecProcessRequest": {
        "id": 1, "exec_id": 2, "terminal": 3, "stdin": 4, "stdout": 5, "stderr": 6, "spec": 7,
    },
    "containerd.task.v2.ResizePtyRequest": {"id": 1, "exec_id": 2, "width": 3, "height": 4},
    "containerd.task.v2.CloseIORequest": {"id": 1, "exec_id": 2, "stdin": 3},
    "containerd.task.v2.UpdateTaskRequest": {"id": 1, "resources": 2, "annotations": 3},
    "containerd.task.v2.WaitRequest": {"id": 1, "exec_id": 2},
    "containerd.task.v2.WaitResponse": {"exit_status": 1, "exited_at": 2},
    "containerd.task.v2.StatsRequest": {"id": 1},
    "containerd.task.v2.StatsResponse": {"stats": 1},
    "containerd.task.v2.ConnectRequest": {"id": 1},
    "containerd.task.v2.ConnectResponse": {"shim_pid": 1, "task_pid": 2, "version": 3},
    "containerd.task.v2.ShutdownRequest": {"id": 1, "now": 2},
    "containerd.events.TaskCreate": {
        "container_id": 1, "bundle": 2, "rootfs": 3, "io": 4, "checkpoint": 5, "pid": 6,
    },
    "containerd.events.TaskIO": {"stdin": 1, "stdout": 2, "stderr": 3, "terminal": 4},
    "containerd.events.TaskStart": {"container_id": 1, "pid": 2},
    "containerd.events.TaskExit": {
        "container_id": 1, "id": 2, "pid": 3, "exit_status": 4, "exited_at": 5,
    },
    "containerd.events.TaskDelete": {
        "container_id": 1, "pid": 2, "exit_status": 3, "exited_at": 4, "id": 5,
    },
    "containerd.events.TaskOOM": {"container_id": 1},
    "containerd.events.TaskExecAdded": {"container_id": 1, "exec_id": 2},
    "containerd.events.TaskExecStarted": {"container_id": 1, "exec_id": 2, "pid": 3},
    "containerd.events.TaskPaused": {"container_id": 1},
    "containerd.events.TaskResumed": {"container_id": 1},
    "containerd.events.TaskCheckpointed": {"container_id": 1, "checkpoint": 2},
    "containerd.services.events.ttrpc.v1.ForwardRequest": {"envelope": 1},
    "containerd.services.events.ttrpc.v1.Envelope": {
        "timestamp": 1, "namespace": 2, "topic": 3, "event": 4,
    },
    "runtimeoptions.v1.Options": {"type_url": 1, "config_path": 2, "config_body": 3},
}
# fmt: on

MODULES = [mount_pb2, task_types_pb2, task_pb2, events_pb2, events_forward_pb2, runtimeoptions_pb2]


def all_messages() -> dict[str, Descriptor]:
    return {d.full_name: d for m in MODULES for d in m.DESCRIPTOR.message_types_by_name.values()}


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_field_numbers_match_containerd(name: str) -> None:
    descriptor = all_messages()[name]
    assert {f.name: f.number for f in descriptor.fields} == FIELDS[name]


def test_every_message_is_pinned() -> None:
    unpinned = set(all_messages()) - set(FIELDS) - {"containerd.task.v2.ExecProcessResponse"}
    assert not unpinned


def test_task_service_has_the_17_rpcs() -> None:
    service = task_pb2.DESCRIPTOR.services_by_name["Task"]
    assert service.full_name == "containerd.task.v2.Task"
    empty = "google.protobuf.Empty"
    assert {m.name: (m.input_type.name, m.output_type.full_name) for m in service.methods} == {
        "State": ("StateRequest", "containerd.task.v2.StateResponse"),
        "Create": ("CreateTaskRequest", "containerd.task.v2.CreateTaskResponse"),
        "Start": ("StartRequest", "containerd.task.v2.StartResponse"),
        "Delete": ("DeleteRequest", "containerd.task.v2.DeleteResponse"),
        "Pids": ("PidsRequest", "containerd.task.v2.PidsResponse"),
        "Pause": ("PauseRequest", empty),
        "Resume": ("ResumeRequest", empty),
        "Checkpoint": ("CheckpointTaskRequest", empty),
        "Kill": ("KillRequest", empty),
        "Exec": ("ExecProcessRequest", empty),
        "ResizePty": ("ResizePtyRequest", empty),
        "CloseIO": ("CloseIORequest", empty),
        "Update": ("UpdateTaskRequest", empty),
        "Wait": ("WaitRequest", "containerd.task.v2.WaitResponse"),
        "Stats": ("StatsRequest", "containerd.task.v2.StatsResponse"),
        "Connect": ("ConnectRequest", "containerd.task.v2.ConnectResponse"),
        "Shutdown": ("ShutdownRequest", empty),
    }


def test_events_service_name() -> None:
    service = events_forward_pb2.DESCRIPTOR.services_by_name["Events"]
    assert service.full_name == "containerd.services.events.ttrpc.v1.Events"
    assert [m.name for m in service.methods] == ["Forward"]


def test_status_enum_values() -> None:
    assert dict(task_types_pb2.Status.items()) == {
        "UNKNOWN": 0,
        "CREATED": 1,
        "RUNNING": 2,
        "STOPPED": 3,
        "PAUSED": 4,
        "PAUSING": 5,
    }


def test_task_exit_bytes() -> None:
    event = events_pb2.TaskExit(
        container_id="c",
        id="e",
        pid=7,
        exit_status=137,
        exited_at=timestamp_pb2.Timestamp(seconds=1),
    )
    assert event.SerializeToString() == bytes.fromhex("0a0163 120165 1807 208901 2a020801")


def test_create_task_request_bytes() -> None:
    request = task_pb2.CreateTaskRequest(
        id="i",
        bundle="b",
        terminal=True,
        stdin="0",
        stdout="1",
        stderr="2",
        rootfs=[mount_pb2.Mount(type="t", source="s", target="g", options=["o"])],
        options=any_pb2.Any(type_url="u"),
    )
    expected = (
        "0a0169 120162"  # id=1, bundle=2
        "1a0c 0a0174 120173 1a0167 22016f"  # rootfs=3: Mount{type=1, source=2, target=3, options=4}
        "2001 2a0130 320131 3a0132"  # terminal=4, stdin=5, stdout=6, stderr=7
        "5203 0a0175"  # options=10: Any{type_url=1}
    )
    assert request.SerializeToString() == bytes.fromhex(expected)


def test_envelope_bytes() -> None:
    forward = events_forward_pb2.ForwardRequest(
        envelope=events_forward_pb2.Envelope(
            timestamp=timestamp_pb2.Timestamp(seconds=2),
            namespace="n",
            topic="/t",
            event=any_pb2.Any(type_url="containerd.events.TaskOOM", value=b"\x0a\x01c"),
        )
    )
    event_any = field(1, b"containerd.events.TaskOOM") + field(2, bytes.fromhex("0a0163"))
    envelope = (
        field(1, bytes.fromhex("0802")) + field(2, b"n") + field(3, b"/t") + field(4, event_any)
    )
    assert forward.SerializeToString() == field(1, envelope)


def field(number: int, body: bytes) -> bytes:
    """A length-delimited field (wire type 2) with a short (< 128 bytes) body."""
    assert len(body) < 128
    return bytes([number << 3 | 2, len(body)]) + body


def test_event_type_urls() -> None:
    assert events_pb2.TaskExit.DESCRIPTOR.full_name == "containerd.events.TaskExit"
    assert runtimeoptions_pb2.Options.DESCRIPTOR.full_name == "runtimeoptions.v1.Options"


# Agent messages that must read as Kata's (src/libs/protocols/protos/agent.proto), so that a
# capture or a Kata tool reads them alike: message -> {field: number}.
KATA_AGENT_FIELDS: dict[str, dict[str, int]] = {
    "SetGuestDateTimeRequest": {"Sec": 1, "Usec": 2},
    "ReseedRandomDevRequest": {"data": 2},
}


@pytest.mark.parametrize("name", sorted(KATA_AGENT_FIELDS))
def test_agent_field_numbers_match_kata(name: str) -> None:
    from protocols import agent_pb2

    descriptor = agent_pb2.DESCRIPTOR.message_types_by_name[name]
    assert {f.name: f.number for f in descriptor.fields} == KATA_AGENT_FIELDS[name]


def test_agent_restore_rpcs_take_kata_requests_and_return_empty() -> None:
    from protocols import agent_pb2

    service = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
    methods = {m.name: (m.input_type.name, m.output_type.full_name) for m in service.methods}
    assert methods["SetGuestDateTime"] == ("SetGuestDateTimeRequest", "google.protobuf.Empty")
    assert methods["ReseedRandomDev"] == ("ReseedRandomDevRequest", "google.protobuf.Empty")
    # Sec=1, Usec=2 (varints); data=2 (length-delimited): the bytes Kata's agent decodes.
    time_req = agent_pb2.SetGuestDateTimeRequest(Sec=1_700_000_000, Usec=5)
    assert time_req.SerializeToString() == bytes.fromhex("08 80e2cfaa06 1005")
    assert agent_pb2.ReseedRandomDevRequest(data=b"ab").SerializeToString() == field(2, b"ab")
