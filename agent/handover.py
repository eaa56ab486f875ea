"""What a VM restored from a template needs from the host: its wall clock, fresh entropy.

Theory of operation
-------------------
A guest restored from a saved, already-booted template wakes with the template's wall
clock (stale by however long the template was kept) and the template's kernel RNG state,
which every clone shares: two clones would draw the same "random" bytes. So the host hands
over, as Kata's agent API does:

* ``SetGuestDateTime``: clock_settime(CLOCK_REALTIME) to the host's time (validated first:
  the host is outside the guest's trust boundary, and a wild clock breaks TLS and logs);
* ``ReseedRandomDev``: the host's bytes are written to /dev/random (which mixes them into
  the input pool, crediting no entropy), then the RNDRESEEDCRNG ioctl makes the CRNG reseed
  from that pool now instead of at its next scheduled reseed. A kernel without the ioctl
  (before 4.17: ENOTTY/EINVAL) or whose CRNG is not ready yet (ENODATA: it then seeds from
  the pool, which holds our bytes) still has them mixed in: reported, not an error.

The clock and the ioctl are injected so that unit tests need neither root nor a guest.
Imported by the service on first use only: a booting guest pays nothing for it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Callable

from agent.errors import InvalidArgument
from agent.init import warn

RANDOM_DEVICE = "/dev/random"
# _IO('R', 0x07) from <linux/random.h>: reseed the CRNG from the input pool now.
RNDRESEEDCRNG = 0x5207
MAX_SEED_BYTES = 4096  # the host sends 64; a bound, so a host cannot make us write much
# 2200-01-01T00:00:00Z: later than any real clock, and far inside what both the kernel
# (KTIME_SEC_MAX) and Python's int64 nanoseconds (year 2262) accept.
MAX_EPOCH_SECONDS = 7_258_118_400
# errno values of an RNDRESEEDCRNG the kernel cannot do, with the bytes still mixed in.
_RESEED_UNSUPPORTED = {errno.ENOTTY: "the kernel has no RNDRESEEDCRNG",
                       errno.EINVAL: "the kernel has no RNDRESEEDCRNG",
                       errno.ENODATA: "the CRNG is not initialised yet"}

SetClock = Callable[[int], None]  # nanoseconds since the Epoch
Ioctl = Callable[[int, int], object]


def _set_realtime(ns: int) -> None:
    time.clock_settime_ns(time.CLOCK_REALTIME, ns)


def _ioctl(fd: int, request: int) -> object:
    return fcntl.ioctl(fd, request)


class Handover:
    """The two hand-over steps; ``set_clock``, ``random_device`` and ``ioctl`` are
    injectable (tests)."""

    def __init__(self, set_clock: SetClock = _set_realtime, random_device: str = RANDOM_DEVICE,
                 ioctl: Ioctl = _ioctl) -> None:
        self._set_clock = set_clock
        self._random_device = random_device
        self._ioctl = ioctl

    def set_time(self, sec: int, usec: int) -> int:
        """Set the wall clock to ``sec`` + ``usec``/1e6 since the Epoch; returns the step
        taken (ns; positive when the clock moved forward)."""
        if not 0 <= sec <= MAX_EPOCH_SECONDS:
            raise InvalidArgument(f"Sec {sec} is not a plausible time: "
                                  f"want 0..{MAX_EPOCH_SECONDS}")
        if not 0 <= usec < 1_000_000:
            raise InvalidArgument(f"Usec {usec} is out of range: want 0..999999")
        target = sec * 1_000_000_000 + usec * 1_000
        step = target - time.time_ns()
        self._set_clock(target)
        warn(f"clock set: sec={sec} usec={usec} step={step / 1e9:+.3f}s")
        return step

    def reseed(self, data: bytes) -> bool:
        """Mix ``data`` into the kernel's input pool and reseed the CRNG from it; returns
        whether the CRNG reseeded now (False: the kernel cannot, the bytes are mixed in)."""
        if not data:
            raise InvalidArgument("data is empty: nothing to reseed with")
        if len(data) > MAX_SEED_BYTES:
            raise InvalidArgument(f"data is {len(data)} bytes; the limit is {MAX_SEED_BYTES}")
        fd = os.open(self._random_device, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            view = memoryview(data)
            while view:  # a write to /dev/random takes it all; loop for any other file
                view = view[os.write(fd, view):]
            try:
                self._ioctl(fd, RNDRESEEDCRNG)
            except OSError as exc:
                why = _RESEED_UNSUPPORTED.get(exc.errno or 0)
                if why is None:
                    raise
                warn(f"random: {len(data)} bytes mixed in; no reseed now: {why} ({exc})")
                return False
        finally:
            os.close(fd)
        warn(f"random: {len(data)} bytes mixed in, CRNG reseeded")
        return True
