"""Modules our dependencies import at start-up but our processes do not use: executed on
first use instead (`importlib.util.LazyLoader`).

Each name is imported on the way to serving (by protobuf's generated code, asyncio,
logging) and costs start-up CPU, which the guest agent pays ~20x under TCG, and memory
that stays in every shim daemon. Deferred, a module is registered in ``sys.modules`` and
runs when something first reads one of its attributes, so a path that does use it still
works. Measured in docs/performance.md ("Levers").

Only modules that our usual paths never touch belong here: deferring one that is used
moves its cost, it does not remove it. A later plain ``import name`` of a deferred module
runs it (the import system reads its ``__spec__``); ``from package import name`` does not.
`tests/unit/test_lazyimport.py` checks that the agent's and the shim's start-up leave them
unrun.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec, PathFinder
from importlib.util import LazyLoader
from types import ModuleType

DEFERRED = frozenset({
    # descriptor_pool and internal.builder import protobuf's pure-Python message
    # implementation (with text_format, its decoder, encoder and containers); with the upb
    # extension, which both sides use, nothing calls it.
    "google.protobuf.internal.python_message",
    # traceback's, for the text of exception groups and notes.
    "textwrap",
    # protobuf's well_known_types', for Timestamp <-> datetime conversions.
    "calendar",
})


class DeferredFinder:
    """A meta path finder for the names in `DEFERRED`: the usual path search, with the
    loader wrapped in a LazyLoader. Modules found elsewhere (a PyInstaller archive, a zip)
    are left to the finders after it, and import as usual."""

    @classmethod
    def find_spec(cls, name: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if name not in DEFERRED:
            return None
        spec = PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = LazyLoader(spec.loader)
        return spec


def install() -> None:
    """Defer the modules in `DEFERRED` not imported yet (first in ``sys.meta_path``)."""
    if DeferredFinder not in sys.meta_path:
        sys.meta_path.insert(0, DeferredFinder)


def is_deferred(module: ModuleType) -> bool:
    """Whether `module` is registered but has not run yet."""
    return type(module).__name__ == "_LazyModule"
