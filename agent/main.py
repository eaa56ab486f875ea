"""kata-agent main: parse flags, do PID-1 duties, serve the agent API until killed.

Theory of operation
-------------------
Two modes, one code path:

* guest (default, no ``--listen``): the agent is PID 1, exec'd by busybox ``/init``. It
  runs :func:`agent.init.setup` (modules, mounts, cgroup2, device links), then serves on
  vsock or the virtio-serial port. PID 1 reaps every orphan in the VM: :mod:`agent.reaper`.
* host (``--listen unix:PATH``): for tests. No init duties (they would clobber the host);
  the agent makes itself a child subreaper so container processes still come to it, and
  ``--crun-root``/``--run-dir``/``--cgroup-parent`` keep its state private.

Start-up is what the guest pays for under TCG, so imports are few and late: this module
imports only the standard library at first; protobuf, ttrpc and the service arrive in
:func:`_serve`. When serving begins one line goes to the console (stderr), e.g.
``kata-agent: serving on /dev/vport1p1 after 0.93s (guest uptime 3.41s)``; the same
numbers are kept for GetGuestDetails. "after" counts from the agent's exec when /init
exported ``KATA_AGENT_EXEC_UPTIME`` (its /proc/uptime reading before ``exec``), else from
the process start time in /proc/self/stat (host mode), else from the first agent import.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import TYPE_CHECKING

import agent

if TYPE_CHECKING:
    import asyncio

    from agent.channel import ServeFn
    from agent.container import Containers
    from agent.reaper import Reaper

USAGE = """\
usage: kata-agent [--listen unix:PATH | vsock:PORT | serial:DEV] [--run-dir DIR]
                  [--crun PATH] [--crun-root DIR] [--cgroup-parent PATH] [--cgroup-root DIR]

Without --listen: guest mode (PID 1): init duties, then serve on vsock port 1024 or the
virtio-serial port agent.channel.0. With --listen: host/test mode (a child subreaper).
--cgroup-parent "" runs crun without cgroups (hosts with cgroup v1).
"""


class Options:
    """The flags. A plain class: importing dataclasses (and defining one) is ~0.3 s of the
    guest's start-up under TCG."""

    def __init__(self) -> None:
        self.listen: str | None = None
        self.run_dir = "/run/kata-containers"
        self.crun = "/usr/bin/crun"
        self.crun_root = "/run/crun"
        self.cgroup_parent = "/kata"
        self.cgroup_root = "/sys/fs/cgroup"


_FLAGS = {
    "--listen": "listen", "--run-dir": "run_dir", "--crun": "crun", "--crun-root": "crun_root",
    "--cgroup-parent": "cgroup_parent", "--cgroup-root": "cgroup_root",
}


def parse_args(argv: list[str]) -> Options | None:
    """Flags as ``--name value`` or ``--name=value``; None means --help. (No argparse:
    it is a measurable import under TCG.)"""
    opts = Options()
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            return None
        name, eq, value = arg.partition("=")
        if name not in _FLAGS:
            raise SystemExit(f"kata-agent: unknown argument {arg!r}\n{USAGE}")
        if not eq:
            if not args:
                raise SystemExit(f"kata-agent: {name} needs a value")
            value = args.pop(0)
        setattr(opts, _FLAGS[name], value)
    return opts


def trace(what: str) -> None:
    """With ``KATA_AGENT_TRACE`` set (e.g. ``KATA_AGENT_TRACE=1`` on the kernel command line,
    which the kernel passes to /init's environment), print the uptime at start-up steps."""
    if os.environ.get("KATA_AGENT_TRACE"):
        print(f"kata-agent: trace {what} uptime={uptime():.3f}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    trace("main")
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    if opts is None:
        print(USAGE, end="")
        return 0
    guest = opts.listen is None
    import asyncio  # not before --help: asyncio alone is ~50 ms of imports on the host

    from agent import init, syscalls

    trace("imported asyncio")
    if guest and os.getpid() == 1:
        init.setup()
        trace("init done")
    elif guest:
        init.warn("not PID 1: skipping init duties")
    else:
        syscalls.set_child_subreaper()
    # SIGTERM/SIGINT in host mode cancel the serve task; containers are removed on the way out.
    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        asyncio.run(_serve(opts, guest))
    return 0


def end_startup_gc() -> None:
    """Turn the garbage collector back on (``agent/__main__.py`` keeps it off during the
    start-up). What start-up made lives as long as the agent: freezing it keeps the
    collections that follow from walking it again."""
    import gc

    gc.freeze()
    gc.enable()


def uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def seconds_since_exec(now_uptime: float) -> float:
    """Time from the agent's exec (best available estimate, see module docstring)."""
    exported = os.environ.get("KATA_AGENT_EXEC_UPTIME")
    if exported:
        try:
            return now_uptime - float(exported)
        except ValueError:
            pass
    if os.getpid() != 1:
        try:
            with open("/proc/self/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return now_uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return time.monotonic() - agent.STARTED_MONOTONIC


async def _serve(opts: Options, guest: bool) -> None:
    import asyncio
    import signal

    from agent import channel, init
    from agent.container import Containers, RuntimeConfig
    from agent.crun import CrunConfig
    from agent.reaper import Reaper
    from agent.service import SERVICE, AgentService, StartupInfo
    from agent.storage import Storages
    from ttrpc import Server

    trace("imported service")
    loop = asyncio.get_running_loop()
    reaper = Reaper()
    reaper.install(loop)
    flags = kernel_words() if guest else frozenset()  # one read of /proc/cmdline
    if SCHED_THROUGHPUT_KERNEL_PARAM in flags:
        init.tune_wakeups()
    config = RuntimeConfig(
        run_dir=opts.run_dir, cgroup_root=opts.cgroup_root, cgroup_parent=opts.cgroup_parent,
        crun=CrunConfig(binary=opts.crun, root=opts.crun_root, cgroups=bool(opts.cgroup_parent),
                        fixed_layout=CRUN_NO_ASLR_KERNEL_PARAM in flags),
        gather_output=GATHER_OUTPUT_KERNEL_PARAM in flags,
    )
    os.makedirs(config.run_dir, mode=0o711, exist_ok=True)
    containers = Containers(config, reaper)
    startup = StartupInfo()
    service = AgentService(containers, Storages(config.run_dir), startup, set_hostname=guest,
                           network=guest, vm_ends_with_sandbox=guest)
    server = Server()
    server.register(SERVICE, service.methods())

    def on_ready(where: str) -> None:
        end_startup_gc()
        startup.uptime_seconds = now = uptime()
        startup.init_seconds = seconds_since_exec(now)
        init.warn(f"serving on {where} after {startup.init_seconds:.2f}s "
                  f"(guest uptime {now:.2f}s)")
        if guest:
            init.link_virtio_ports()  # ports appear asynchronously after module load

    task = asyncio.current_task()
    assert task is not None
    if not guest:  # host mode: a clean stop that leaves no container behind
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
    # The console's own code is imported only when the host asked for it (it sets
    # `DEBUG_CONSOLE_KERNEL_PARAM` only where the configuration enables the console).
    console = _start_debug_console(reaper) if DEBUG_CONSOLE_KERNEL_PARAM in flags else None
    try:
        await channel.serve(_connection_handler(server.serve_connection), opts.listen,
                            on_ready)
    finally:
        if console is not None:
            console.cancel()
        await asyncio.shield(_teardown(containers))
        reaper.uninstall()


#: common.constants' kernel parameters, spelt out so that a guest without the console
#: imports nothing for it (a unit test keeps them equal).
DEBUG_CONSOLE_KERNEL_PARAM = "agent.debug_console"
CRUN_NO_ASLR_KERNEL_PARAM = "agent.crun_no_aslr"
GATHER_OUTPUT_KERNEL_PARAM = "agent.gather_output"
SCHED_THROUGHPUT_KERNEL_PARAM = "agent.sched_throughput"


def kernel_words(cmdline: str = "/proc/cmdline") -> frozenset[str]:
    """The words of the kernel command line, where the host leaves the agent its flags
    (none if it cannot be read)."""
    try:
        with open(cmdline) as f:
            return frozenset(f.read().split())
    except OSError:
        return frozenset()


def _start_debug_console(reaper: Reaper) -> asyncio.Future[None]:
    import asyncio

    from agent import channel, debugconsole
    from common.constants import DEBUG_CONSOLE_VSOCK_PORT

    debugconsole.log("enabled by the kernel command line (a root shell for the host's "
                     "kata-runtime exec)")  # fmt: skip
    if channel.vsock_available():  # the agent serves on vsock: the console beside it
        return asyncio.ensure_future(debugconsole.serve_vsock(reaper, DEBUG_CONSOLE_VSOCK_PORT))
    return asyncio.ensure_future(debugconsole.serve(reaper))


def _connection_handler(serve: ServeFn) -> ServeFn:
    """`serve`, or a lying wrapper of it when a test asks for one (see agent.hostile)."""
    if not os.environ.get("KATA_AGENT_HOSTILE"):
        return serve
    from agent import hostile

    choice = hostile.from_environment()
    if choice is None:
        print(f"kata-agent: ignoring KATA_AGENT_HOSTILE={os.environ['KATA_AGENT_HOSTILE']!r}: "
              f"want <{'|'.join(hostile.MODES)}>:<method>", file=sys.stderr, flush=True)
        return serve
    print(f"kata-agent: test mode: {choice[0]} at the first {choice[1]}", file=sys.stderr,
          flush=True)
    return hostile.wrap(serve, *choice)


async def _teardown(containers: Containers) -> None:
    try:
        await containers.remove_all()
    except Exception as exc:  # teardown goes on: report, never mask the original exit
        print(f"kata-agent: teardown: {exc}", file=sys.stderr, flush=True)
