"""Lifecycles as data: an ``(state, op) -> next state | Refusal`` table, applied in one place.

Rule: every cell of a table is listed explicitly (tests walk them all); a forbidden cell is
a `Refusal` naming the error the caller gets and why. The state changes only after the
operation's side effect succeeded, so callers ask `transition` first (it raises for a
forbidden cell) and assign the returned state afterwards.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from sandbox.errors import SandboxError

S = TypeVar("S", bound=enum.Enum)
O = TypeVar("O", bound=enum.Enum)  # noqa: E741


@dataclass(frozen=True)
class Refusal:
    """A forbidden cell: the error to raise and why."""

    error: type[SandboxError]
    reason: str


def transition(table: Mapping[tuple[S, O], S | Refusal], state: S, op: O, what: str) -> S:
    """The state after ``op`` in ``state``; raise the cell's error if it is forbidden."""
    cell = table[(state, op)]
    if isinstance(cell, Refusal):
        raise cell.error(f"failed to {op.value} {what}: {cell.reason}")
    return cell


def missing_cells(table: Mapping[tuple[S, O], object], states: type[S], ops: type[O]) -> list[str]:
    """Cells of ``states`` x ``ops`` the table does not list (tests require none)."""
    return [f"{s.name}/{o.name}" for s in states for o in ops if (s, o) not in table]
