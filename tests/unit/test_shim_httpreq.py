"""The metrics endpoint's sans-IO HTTP request-head parser and its responses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shim.httpreq import (
    MAX_FIELDS,
    MAX_HEAD,
    MAX_TARGET,
    Request,
    RequestError,
    error_response,
    parse_head,
    response,
)

GET = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n"


def test_a_whole_request() -> None:
    assert parse_head(GET) == Request("GET", "/metrics", "HTTP/1.1",
                                      (("host", "localhost"), ("accept", "*/*")))


@pytest.mark.parametrize("raw, target, path", [
    (b"GET / HTTP/1.0\r\n\r\n", "/", "/"),
    (b"GET /metrics?name=x HTTP/1.1\r\n\r\n", "/metrics?name=x", "/metrics"),
    (b"GET /metrics HTTP/1.1\n\n", "/metrics", "/metrics"),  # bare LF
    (b"GET /metrics HTTP/1.1\nHost: a\r\n\n", "/metrics", "/metrics"),  # mixed
])
def test_request_forms(raw: bytes, target: str, path: str) -> None:
    request = parse_head(raw)
    assert request is not None and (request.target, request.path) == (target, path)


def test_bytes_after_the_head_are_ignored() -> None:
    assert parse_head(GET + b"GET /other HTTP/1.1\r\n\r\n") == parse_head(GET)


def test_header_names_are_lower_cased_and_values_trimmed() -> None:
    request = parse_head(b"GET / HTTP/1.1\r\nX-Thing:  \tvalue with spaces \t\r\n\r\n")
    assert request is not None and request.headers == (("x-thing", "value with spaces"),)


@pytest.mark.parametrize("n", range(len(GET)))
def test_every_prefix_needs_more(n: int) -> None:
    assert parse_head(GET[:n]) is None


@pytest.mark.parametrize("raw, status", [
    (b"\r\n\r\n", 400),
    (b"GET /metrics\r\n\r\n", 400),
    (b"GET  /metrics HTTP/1.1\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1 extra\r\n\r\n", 400),
    (b"G(T /metrics HTTP/1.1\r\n\r\n", 400),
    (b"GET metrics HTTP/1.1\r\n\r\n", 400),
    (b"GET http://host/metrics HTTP/1.1\r\n\r\n", 400),
    (b"GET /met\x01rics HTTP/1.1\r\n\r\n", 400),
    (b"GET /m\xc3\xa9trics HTTP/1.1\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.x\r\n\r\n", 400),
    (b"GET /metrics FTP/1.1\r\n\r\n", 400),
    (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
    (b"GET /metrics HTTP/0.9\r\n\r\n", 505),
    (b"GET /" + b"a" * MAX_TARGET + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n: empty name\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: a\x7fb\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", 400),
    (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * (MAX_FIELDS + 1) + b"\r\n", 431),
])
def test_malformed_requests(raw: bytes, status: int) -> None:
    with pytest.raises(RequestError) as info:
        parse_head(raw)
    assert info.value.status == status


def test_content_length_zero_is_no_body() -> None:
    assert parse_head(b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n") is not None


def test_as_many_fields_as_allowed() -> None:
    raw = b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * MAX_FIELDS + b"\r\n"
    request = parse_head(raw)
    assert request is not None and len(request.headers) == MAX_FIELDS


def test_an_oversize_head_is_refused_before_it_ends() -> None:
    head = b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD
    with pytest.raises(RequestError) as info:
        parse_head(head)
    assert info.value.status == 431
    with pytest.raises(RequestError):
        parse_head(head + b"\r\n\r\n")  # and when it ends


def test_a_head_of_exactly_the_limit_is_served() -> None:
    start = b"GET / HTTP/1.1\r\nX: "
    raw = start + b"a" * (MAX_HEAD - len(start) - 4) + b"\r\n\r\n"
    assert len(raw) == MAX_HEAD and parse_head(raw) is not None
    longer = raw[:-4] + b"a\r\n\r\n"
    with pytest.raises(RequestError) as info:
        parse_head(longer)
    assert info.value.status == 431


@pytest.mark.parametrize("raw", [b"\x16\x03\x01\x02\x00", b"\x00", b"{", b"GET / HTTP/1.1 x\n"])
def test_garbage_is_refused_before_the_head_ends(raw: bytes) -> None:
    """A TLS hello, a NUL, a broken request line: no need to wait for the blank line."""
    with pytest.raises(RequestError) as info:
        parse_head(raw)
    assert info.value.status == 400


@given(st.binary(max_size=2 * MAX_HEAD))
def test_any_bytes_parse_or_raise_request_error(raw: bytes) -> None:
    try:
        result = parse_head(raw)
    except RequestError as e:
        assert e.status in (400, 414, 431, 505)
    else:
        assert result is None or isinstance(result, Request)
        assert result is not None or len(raw) <= MAX_HEAD


@given(st.integers(min_value=0, max_value=len(GET)))
def test_fed_in_any_two_parts_the_result_is_the_same(cut: int) -> None:
    first = parse_head(GET[:cut])
    assert first is None or cut == len(GET)
    assert parse_head(GET[:cut] + GET[cut:]) == parse_head(GET)


def test_responses_close_the_connection_and_say_their_length() -> None:
    raw = response(200, b"body\n", "text/plain; version=0.0.4", (("Allow", "GET"),))
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK" and body == b"body\n"
    assert {"Content-Length: 5", "Connection: close", "Allow: GET",
            "Content-Type: text/plain; version=0.0.4"} <= set(lines)


def test_an_error_response_carries_the_status_and_why() -> None:
    raw = error_response(RequestError(431, "too long"))
    assert raw.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert raw.endswith(b"\r\n\r\ntoo long\n")
