"""ttrpc.wire: the hand-encoded messages of `shim start` / `shim delete` are byte for byte
what protobuf itself serializes, over edge values (defaults left out, multi-byte varints,
negative and large numbers, non-ASCII ids)."""

from __future__ import annotations

import pytest
from google.protobuf import timestamp_pb2

from protocols import task_pb2, ttrpc_pb2
from ttrpc import wire

NS_CASES = [0, 1, 999_999_999, 1_000_000_000, 1_733_300_000_123_456_789, 2**62,
            -1, -1_500_000_000]


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**31 - 1, 2**32 - 1, 2**63 - 1, -1,
                                   -(2**63)])
def test_varints_match_protobuf(value: int) -> None:
    expected = timestamp_pb2.Timestamp(seconds=value).SerializeToString()
    assert wire.int_field(1, value) == expected


@pytest.mark.parametrize("ns", NS_CASES)
def test_timestamps_match_protobuf(ns: int) -> None:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    assert wire.timestamp(ns) == ts.SerializeToString()


@pytest.mark.parametrize("ns", NS_CASES)
@pytest.mark.parametrize(("pid", "status"), [(0, 0), (0, 137), (4242, 1), (2**32 - 1, 255)])
def test_delete_responses_match_protobuf(pid: int, status: int, ns: int) -> None:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    expected = task_pb2.DeleteResponse(pid=pid, exit_status=status, exited_at=ts)
    assert wire.delete_response(pid, status, ns) == expected.SerializeToString()
    assert task_pb2.DeleteResponse.FromString(wire.delete_response(pid, status, ns)) == expected


@pytest.mark.parametrize("cid", ["", "c", "pod-1", "x" * 200, "容器"])
def test_connect_requests_match_protobuf(cid: str) -> None:
    payload = task_pb2.ConnectRequest(id=cid).SerializeToString()
    assert wire.connect_request(cid) == payload
    expected = ttrpc_pb2.Request(service="containerd.task.v2.Task", method="Connect",
                                 payload=payload).SerializeToString()
    assert wire.ttrpc_request("containerd.task.v2.Task", "Connect", payload) == expected


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 1 << 20])
def test_ttrpc_responses_match_protobuf(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    expected = ttrpc_pb2.Response(payload=payload).SerializeToString()
    assert wire.ttrpc_response(payload) == expected
