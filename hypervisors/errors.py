"""Errors raised by the hypervisors layer.

Theory of operation: every failure that leaves this package is a `HypervisorError` (or a
subclass) whose message reads ``failed to <verb> <noun>: <cause>``. The layer above
(sandbox/) maps them onto its own error categories; nothing here knows about ttrpc codes.
Causes are chained with ``raise ... from``.
"""

from __future__ import annotations


class HypervisorError(Exception):
    """A VM, QMP or virtiofsd operation failed."""


class HypervisorTimeout(HypervisorError, TimeoutError):
    """A VM, QMP or virtiofsd operation did not finish within its timeout."""


class QmpError(HypervisorError):
    """The QMP connection failed or QEMU answered a command with an error."""


class QmpCommandError(QmpError):
    """QEMU answered a QMP command with ``{"error": {"class": ..., "desc": ...}}``."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        """Record which command failed and QEMU's error class and description."""
        super().__init__(f"failed to execute QMP command {command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class HypervisorUnsupported(HypervisorError):
    """The hypervisor (or this version's driver for it) cannot do what was asked."""


class HypervisorRefused(HypervisorError):
    """The configuration forbids what this VM would need (e.g. TCG when it is not allowed)."""
