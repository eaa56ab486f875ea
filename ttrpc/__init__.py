"""ttrpc: containerd's lightweight RPC protocol (unary calls), sans-IO core plus asyncio I/O.

- :mod:`ttrpc.frames`: the sans-IO framing core (no asyncio, no sockets).
- :mod:`ttrpc.channel`: frames over an asyncio reader/writer pair (socket, pipe, char device).
- :mod:`ttrpc.server`: :class:`Server`, concurrent handlers per connection.
- :mod:`ttrpc.client`: :class:`Client`, concurrent calls multiplexed by stream id.
- :mod:`ttrpc.errors`: :class:`Code` and :class:`TtrpcError`.
"""

from ttrpc.client import Client
from ttrpc.errors import Code, TtrpcError
from ttrpc.server import Server

__all__ = ["Client", "Code", "Server", "TtrpcError"]
