"""What wiring a pod's network can fail with."""

from __future__ import annotations


class NetworkError(Exception):
    """A netlink or tap operation failed."""


class NetworkConfigError(NetworkError):
    """The pod's network cannot be wired as given (bad netns, no interface, an interface
    type we cannot wire): the message says what to change."""
