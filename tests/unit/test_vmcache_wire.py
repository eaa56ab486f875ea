"""The VM cache's wire (`hypervisors.vmcache_wire`): every message bounded and checked."""

from __future__ import annotations

import pytest

from hypervisors import vmcache_wire as wire

CLAIMED = {"ok": True, "pid": 42, "start_time": 1234, "dir": "/run/c.sock.d/vm-1",
           "accelerator": "tcg", "reason": "no KVM"}


def test_a_message_round_trips_as_one_line() -> None:
    line = wire.encode({"op": "claim", "sandbox": "pod1"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    first, rest = wire.split_line(line + b'{"op"')
    assert first is not None and wire.decode(first) == {"op": "claim", "sandbox": "pod1"}
    assert rest == b'{"op"'


def test_a_partial_line_waits_and_an_endless_one_is_refused() -> None:
    assert wire.split_line(b'{"op": "desc') == (None, b'{"op": "desc')
    with pytest.raises(wire.WireError, match="over 65536 bytes"):
        wire.split_line(b"x" * (wire.MAX_LINE + 1))
    with pytest.raises(wire.WireError, match="over 65536 bytes"):
        wire.split_line(b"x" * wire.MAX_LINE + b"\n")
    with pytest.raises(wire.WireError, match="over"):
        wire.encode({"vm": "x" * wire.MAX_LINE})


@pytest.mark.parametrize(("line", "words"), [
    (b"{", "not JSON"), (b"[1]", "not a JSON object"), (b'"x"', "not a JSON object")])
def test_what_is_not_a_json_object_is_refused(line: bytes, words: str) -> None:
    with pytest.raises(wire.WireError, match=words):
        wire.decode(line)


@pytest.mark.parametrize(("message", "expected"), [
    ({"op": "describe"}, ("describe", "")), ({"op": "stop"}, ("stop", "")),
    ({"op": "claim", "sandbox": "p"}, ("claim", "p"))])
def test_requests(message: dict[str, object], expected: tuple[str, str]) -> None:
    assert wire.request_op(message) == expected


@pytest.mark.parametrize("message", [
    {}, {"op": "boot"}, {"op": 3}, {"op": "claim"}, {"op": "claim", "sandbox": ""},
    {"op": "claim", "sandbox": 7}, {"op": "claim", "sandbox": "x" * 257}])
def test_a_bad_request_is_refused(message: dict[str, object]) -> None:
    with pytest.raises(wire.WireError):
        wire.request_op(message)


def test_a_claim_reply_is_checked_field_by_field() -> None:
    assert wire.claimed(CLAIMED) == wire.Claimed(42, 1234, "/run/c.sock.d/vm-1", "tcg",
                                                 "no KVM")
    for key in ("pid", "start_time", "dir", "accelerator", "reason"):
        with pytest.raises(wire.WireError, match=f"no '{key}'"):
            wire.claimed({k: v for k, v in CLAIMED.items() if k != key})
    for key, bad in (("pid", 0), ("pid", True), ("pid", "42"), ("start_time", -1),
                     ("dir", 3), ("accelerator", "hvf"), ("reason", None)):
        with pytest.raises(wire.WireError, match="wrong type"):
            wire.claimed({**CLAIMED, key: bad})


def test_errors() -> None:
    assert wire.reply_error({"ok": True}) is None
    assert wire.reply_error({"ok": False, "error": "all taken"}) == "all taken"
    assert "without saying why" in (wire.reply_error({"ok": "yes"}) or "")
    assert len(wire.reply_error({"error": "x" * 10_000}) or "") == 500
