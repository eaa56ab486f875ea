"""The metrics endpoint's HTTP/1.x, sans IO: a bounded request-head parser and responses.

One request per connection, answered with ``Connection: close``; no bodies are read, so a
request that announces one is refused. The parser is a pure function of the bytes read so
far, in the manner of h11: `parse_head` returns None until the head (request line and
header fields, up to the blank line) is complete, then a `Request`, and raises
`RequestError` (with the status to answer) as soon as the bytes cannot become a valid
head, or exceed :data:`MAX_HEAD`. Bare LF line ends are accepted (RFC 9112, 2.2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_HEAD = 8192  # bytes of request line + header fields
MAX_TARGET = 1024
MAX_FIELDS = 64
TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
TARGET = re.compile(rb"/[\x21-\x7e]*")
VERSION = re.compile(rb"HTTP/(\d)\.(\d)")
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           414: "URI Too Long", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 503: "Service Unavailable",
           505: "HTTP Version Not Supported"}  # fmt: skip


class RequestError(ValueError):
    """The request cannot be served; ``status`` is what to answer."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


@dataclass(frozen=True)
class Request:
    """A parsed request head (header names lower-cased)."""

    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def path(self) -> str:
        """The target without its query."""
        return self.target.partition("?")[0]


def _head_end(buffer: bytes) -> int | None:
    """Where the head's blank line ends, or None if not yet read."""
    found = re.search(rb"\r?\n\r?\n", buffer)
    return found.end() if found else None


def parse_head(buffer: bytes) -> Request | None:
    """The request whose head ``buffer`` starts with; None if more bytes are needed."""
    end = _head_end(buffer[: MAX_HEAD + 1])
    if end is None or end > MAX_HEAD:
        if len(buffer) > MAX_HEAD:
            raise RequestError(431, f"request head longer than {MAX_HEAD} bytes")
        _check_request_line_so_far(buffer)
        return None
    lines = [line.rstrip(b"\r") for line in buffer[:end].split(b"\n")][:-2]
    if not lines:
        raise RequestError(400, "empty request")
    request = _request_line(lines[0])
    return Request(request.method, request.target, request.version, _fields(lines[1:]))


def _check_request_line_so_far(buffer: bytes) -> None:
    """Refuse early what no further bytes can fix (a client sending garbage slowly)."""
    line = buffer.split(b"\n", 1)[0]
    if b"\n" in buffer:
        _request_line(line.rstrip(b"\r"))
    elif line and not TOKEN.match(line[:1]):
        raise RequestError(400, "request line does not start with a method")


def _request_line(line: bytes) -> Request:
    parts = line.split(b" ")
    if len(parts) != 3:
        raise RequestError(400, "malformed request line")
    method, target, version = parts
    if not TOKEN.fullmatch(method):
        raise RequestError(400, "malformed method")
    if len(target) > MAX_TARGET:
        raise RequestError(414, f"request target longer than {MAX_TARGET} bytes")
    if not TARGET.fullmatch(target):
        raise RequestError(400, "request target is not an absolute path")
    numbers = VERSION.fullmatch(version)
    if numbers is None:
        raise RequestError(400, "malformed HTTP version")
    if numbers.group(1) != b"1":
        raise RequestError(505, "only HTTP/1.0 and HTTP/1.1 are served")
    return Request(method.decode(), target.decode(), version.decode())


def _fields(lines: list[bytes]) -> tuple[tuple[str, str], ...]:
    if len(lines) > MAX_FIELDS:
        raise RequestError(431, f"more than {MAX_FIELDS} header fields")
    fields = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not TOKEN.fullmatch(name):  # also refuses obsolete line folding
            raise RequestError(400, "malformed header field")
        text = value.strip(b" \t")
        if any((c < 0x20 and c != 0x09) or c == 0x7F for c in text):
            raise RequestError(400, "control character in a header field")
        fields.append((name.decode().lower(), text.decode("latin-1")))
    names = {name for name, _ in fields}
    if "transfer-encoding" in names or any(n == "content-length" and v != "0" for n, v in fields):
        raise RequestError(400, "request bodies are not accepted")
    return tuple(fields)


def response(status: int, body: bytes = b"", content_type: str = "text/plain; charset=utf-8",
             extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A whole response; the connection closes after it."""
    head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}",
            f"Content-Type: {content_type}", f"Content-Length: {len(body)}",
            "Connection: close", *(f"{name}: {value}" for name, value in extra)]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def error_response(error: RequestError) -> bytes:
    """The response to a request that cannot be served."""
    return response(error.status, f"{error}\n".encode())
