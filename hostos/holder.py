"""A VM's holder: the parent of one VMM, alive as long as someone holds its owner socket.

Usage (the VM cache spawns it, `hypervisors.qemu.vm`; ``kata-py -m`` when frozen)::

    python -m hostos.holder --owner-fd N [--pass-fd M ...] [--cpu-bound] -- VMM ARGV...

Why: a VM the VM cache boots ahead must die with the cache while no pod has it, and with
the pod's shim once one has, not with the cache. The parent-death signal ties a process
to its parent, which never changes; so the VMM's parent is this holder (the VMM gets the
parent-death signal, `hostos.procs.wrapped_argv`), and the holder's life is tied to a
socket instead. Whoever holds the other end owns the VM, and the end can be handed to
another process (SCM_RIGHTS); once every copy of it is closed (its owner exited, also
with ``kill -9``), the holder kills the VMM and exits. The holder itself has no
parent-death signal: the cache may exit while a pod runs its VM.

What the holder says on the owner socket, one JSON line each: ``{"pid": P, "start_time":
T}`` once the VMM runs, then ``{"exited": S}`` when it exits (S as asyncio reports a
child's status: the exit code, or minus the signal). It reads nothing but the EOF.
SIGTERM, SIGINT or SIGHUP make it kill the VMM (and exit once it is gone).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

from hostos.procs import start_time, wrapped_argv, wrapper_exec_done

MODULE = "hostos.holder"
WRAPPER_EXEC_WAIT = 2.0


def holder_argv(owner_fd: int, pass_fds: tuple[int, ...], cpu_bound: bool,
                vmm_argv: list[str]) -> list[str]:
    """The holder's command line, run by the current interpreter (or the frozen runtime)."""
    fds = [arg for fd in pass_fds for arg in ("--pass-fd", str(fd))]
    return [sys.executable, "-m", MODULE, "--owner-fd", str(owner_fd), *fds,
            *(["--cpu-bound"] if cpu_bound else []), "--", *vmm_argv]


def _send(owner: socket.socket, message: dict[str, int]) -> None:
    with contextlib.suppress(OSError):  # no owner left: nobody to tell
        owner.sendall(json.dumps(message).encode() + b"\n")


def _wait_for_exec(pid: int) -> None:
    """Until the wrapper has exec'd the VMM (its parent-death signal is armed then)."""
    deadline = time.monotonic() + WRAPPER_EXEC_WAIT
    while time.monotonic() < deadline and not wrapper_exec_done(pid):
        time.sleep(0.001)


def hold(owner: socket.socket, vmm: subprocess.Popen[bytes]) -> int:
    """Until the VMM exits (its status goes to the owner) or the owner goes (it is killed)."""
    pidfd = os.pidfd_open(vmm.pid)
    poller = select.poll()
    poller.register(owner.fileno(), select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    while True:
        for fd, _events in poller.poll():
            if fd == pidfd:
                _send(owner, {"exited": vmm.wait()})
                return 0
            try:
                data = owner.recv(4096)
            except OSError:
                data = b""
            if not data:  # every owner is gone
                vmm.kill()
                vmm.wait()
                return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=MODULE)
    ap.add_argument("--owner-fd", type=int, required=True)
    ap.add_argument("--pass-fd", type=int, action="append", default=[])
    ap.add_argument("--cpu-bound", action="store_true")
    ap.add_argument("vmm", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    vmm_argv = args.vmm[1:] if args.vmm[:1] == ["--"] else args.vmm
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    owner = socket.socket(fileno=args.owner_fd)
    os.set_inheritable(owner.fileno(), False)
    try:
        vmm = subprocess.Popen(wrapped_argv(vmm_argv, args.cpu_bound),
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               pass_fds=tuple(args.pass_fd), close_fds=True)
    except OSError as e:
        sys.stderr.write(f"{MODULE}: failed to start {vmm_argv[:1]}: {e}\n")
        return 1
    for fd in args.pass_fd:  # the VMM has them
        with contextlib.suppress(OSError):
            os.close(fd)
    def stop(_sig: int, _frame: object) -> None:
        if vmm.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(vmm.pid, signal.SIGKILL)  # not reaped before `hold` waits for it

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    _wait_for_exec(vmm.pid)
    _send(owner, {"pid": vmm.pid, "start_time": start_time(vmm.pid) or 0})
    return hold(owner, vmm)


if __name__ == "__main__":
    sys.exit(main())
