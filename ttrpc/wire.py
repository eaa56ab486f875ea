"""Protobuf's wire encoding for the few fixed messages `shim start` and `shim delete` send,
and for the envelope of every successful ttrpc answer.

`shim start` and `shim delete` run once per container each, as short-lived processes;
importing protobuf's runtime and the Task API's generated module cost each ~19 ms of CPU on
the host (docs/performance.md "Levers"). What they send is small and fixed: a ttrpc
``Request`` carrying a ``ConnectRequest``, and a ``DeleteResponse`` with a
``google.protobuf.Timestamp``. The ttrpc server wraps each answer's payload in a
``Response`` with `ttrpc_response`: one copy of the payload instead of protobuf's two, which
the guest agent pays per byte of container output under TCG. Field numbers are those of
protocols/ttrpc.proto and protocols/task.proto; as protobuf does, fields at their default
value (0, empty) are left out and the others are written in field-number order, so the
bytes equal protobuf's own
(tests/unit/test_ttrpc_wire.py compares them). Pure: no I/O.
"""

from __future__ import annotations

VARINT = 0
LENGTH_DELIMITED = 2
_NS_PER_S = 1_000_000_000


def varint(value: int) -> bytes:
    """Base-128 varint; negative numbers as their 64-bit two's complement (int32/int64)."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def int_field(number: int, value: int) -> bytes:
    """A varint field (uint32, int32, int64); nothing at the default 0."""
    return varint(number << 3 | VARINT) + varint(value) if value else b""


def field_prefix(number: int, length: int) -> bytes:
    """What comes before a length-delimited field's ``length`` bytes: its tag and length."""
    return varint(number << 3 | LENGTH_DELIMITED) + varint(length)


def message_field(number: int, value: bytes) -> bytes:
    """A length-delimited field, written even when empty (a set embedded message)."""
    return field_prefix(number, len(value)) + value


def bytes_field(number: int, value: bytes) -> bytes:
    """A bytes or string field; nothing when empty (proto3's default)."""
    return message_field(number, value) if value else b""


def ttrpc_request(service: str, method: str, payload: bytes) -> bytes:
    """ttrpc.Request{service = 1, method = 2, payload = 3} (no timeout, no metadata)."""
    return (bytes_field(1, service.encode()) + bytes_field(2, method.encode())
            + bytes_field(3, payload))  # fmt: skip


#: ttrpc.Response's payload field.
RESPONSE_PAYLOAD = 2


def ttrpc_response(payload: bytes) -> bytes:
    """ttrpc.Response{payload = 2}, without a status (a successful call)."""
    return bytes_field(RESPONSE_PAYLOAD, payload)


def connect_request(container_id: str) -> bytes:
    """containerd.task.v2.ConnectRequest{id = 1}."""
    return bytes_field(1, container_id.encode())


def timestamp(ns: int) -> bytes:
    """google.protobuf.Timestamp{seconds = 1, nanos = 2} of nanoseconds since the epoch."""
    seconds, nanos = divmod(ns, _NS_PER_S)
    return int_field(1, seconds) + int_field(2, nanos)


def delete_response(pid: int, exit_status: int, exited_at_ns: int) -> bytes:
    """containerd.task.v2.DeleteResponse{pid = 1, exit_status = 2, exited_at = 3}."""
    return int_field(1, pid) + int_field(2, exit_status) + message_field(3, timestamp(exited_at_ns))
