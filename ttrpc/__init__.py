"""ttrpc: containerd's lightweight RPC protocol (unary calls), sans-IO core plus asyncio I/O.

- :mod:`ttrpc.frames`: the sans-IO framing core (no asyncio, no sockets).
- :mod:`ttrpc.channel`: frames over an asyncio reader/writer pair (socket, pipe, char device).
- :mod:`ttrpc.server`: :class:`Server`, concurrent handlers per connection.
- :mod:`ttrpc.pipepayload`: answers whose bulk is spliced from a pipe, not copied.
- :mod:`ttrpc.client`: :class:`Client`, concurrent calls multiplexed by stream id.
- :mod:`ttrpc.errors`: :class:`Code` and :class:`TtrpcError`.
"""

from typing import TYPE_CHECKING, Any

from ttrpc.errors import Code, TtrpcError

if TYPE_CHECKING:
    from ttrpc.client import Client
    from ttrpc.server import Server

__all__ = ["Client", "Code", "Server", "TtrpcError"]


def __getattr__(name: str) -> Any:
    """Client and Server bring asyncio in: load them on first use, so that a process that
    only needs the error codes (`shim start`/`delete`, every ~100 ms there counts) does not."""
    if name == "Client":
        from ttrpc.client import Client

        return Client
    if name == "Server":
        from ttrpc.server import Server

        return Server
    raise AttributeError(f"module 'ttrpc' has no attribute {name!r}")
