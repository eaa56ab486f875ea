"""Blocking work (mount, umount, tree removal) off the event loop, finished even if the
caller is cancelled.

``asyncio.to_thread`` returns at once when its awaiting task is cancelled, but the thread
goes on: a mount made after the caller's clean-up ran would be left behind. `in_thread`
waits for the thread to finish before passing the cancellation on, so the undo steps that
follow see the world as it really is.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


async def in_thread(func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """``func(*args, **kwargs)`` in a worker thread; a cancellation waits for it to end."""
    work = asyncio.ensure_future(asyncio.to_thread(func, *args, **kwargs))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await work
        raise
