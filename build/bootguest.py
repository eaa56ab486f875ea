#!/usr/bin/env python3
"""Boot the guest image under QEMU and time it (see build/README.md).

    build/bootguest.py [--kernel build/out/vmlinux] [--initrd build/out/initrd.img]
                       [--image build/out/rootfs.img --initrd build/out/rootfs-loader.img]
                       [--params "..."] [--append "..."] [--virtiofs DIR] [--repeat N]
                       [--until REGEX] [--timeout S] [--kill-after-until]

Starts QEMU (TCG unless --accel kvm) with the command line the runtime itself builds
(`hypervisors.qemu.args.build_argv`: the console on a unix socket we listen on, a
virtio-serial port named agent.channel.0 on a unix socket and optionally a virtio-fs share,
tag kataShared, served by /usr/lib/qemu/virtiofsd), timestamps every console line on the
host, and prints when the kernel ran /init ("kata-init:" marker) and the first line after
it. QEMU and virtiofsd are always stopped on the way out. Importable: ``Guest`` is what
tests/e2e uses.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the runtime's own packages, run from anywhere

from common.constants import SHARED_FS_TAG  # noqa: E402
from hostos.procs import wrapped_argv  # noqa: E402
from hypervisors.accel import host_tsc_khz  # noqa: E402
from hypervisors.base import SharedFsDevice  # noqa: E402
from hypervisors.qemu.args import AgentChannel, VmParams, build_argv  # noqa: E402
from hypervisors.qemu.config import QemuConfig  # noqa: E402
from hypervisors.statepaths import StatePaths  # noqa: E402
from hypervisors.virtiofsd import virtiofsd_argv  # noqa: E402

QEMU = "/usr/bin/qemu-system-x86_64"
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
CONSOLE_ACCEPT_TIMEOUT = 30.0
# Terminal control sequences (SeaBIOS clears the screen on the serial console): dropped so
# that lines start with what the guest printed.
ESCAPES = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-Za-z\\-_])")
# Recommended guest kernel command line (measured under TCG, see build/README.md); the
# runtime's argv builder puts console=ttyS0 first.
DEFAULT_PARAMS = (
    "quiet panic=-1 reboot=k tsc=reliable no_timer_check noreplace-smp "
    "rcupdate.rcu_expedited=1 i8042.direct=1 i8042.dumbkbd=1 i8042.nopnp=1 i8042.noaux=1 "
    "cryptomgr.notests net.ifnames=0 pci=lastbus=0 mitigations=off 8250.nr_uarts=1 "
    "random.trust_cpu=on"
)
INIT_MARKER = "kata-init:"


class Guest:
    """One QEMU guest with its console captured line by line (host timestamps)."""

    def __init__(
        self,
        kernel: Path,
        initrd: Path,
        params: str,
        *,
        memory_mib: int = 2048,
        accel: str = "tcg",
        machine_type: str = "q35",
        share_dir: Path | None = None,
        extra_args: Sequence[str] = (),
        image: Path | None = None,
    ) -> None:
        for what, path in (("kernel", kernel), ("initrd", initrd), ("qemu", Path(QEMU))):
            if not path.exists():
                raise FileNotFoundError(f"{what} {path} not found")
        self.tmp = Path(tempfile.mkdtemp(prefix="kata-bootguest-"))
        paths = StatePaths(self.tmp)
        self.agent_sock = paths.agent_socket
        self.lines: list[tuple[float, str]] = []
        # QEMU's CPU seconds (user+sys, all threads) when each line arrived: under TCG this
        # tracks guest work and is far less noisy than wall time on a shared host.
        self.cpu: list[float] = []
        self.last_match = -1
        self._cond = threading.Condition()
        self.virtiofsd: subprocess.Popen[bytes] | None = None
        config = QemuConfig(path=QEMU, kernel=str(kernel), initrd=str(initrd),
                            kernel_params=params, default_memory=memory_mib,
                            machine_type=machine_type, image=str(image or ""),
                            shared_fs="virtio-fs" if share_dir else "none")  # fmt: skip
        share = None if share_dir is None else SharedFsDevice(
            share_dir.resolve(), "virtio-fs", SHARED_FS_TAG)
        vm = VmParams(sandbox_id=f"bootguest-{os.getpid()}", paths=paths,
                      accelerator="kvm" if accel == "kvm" else "tcg",
                      agent_channel=AgentChannel.SERIAL, shared_fs=share,
                      host_tsc_khz=host_tsc_khz(),
                      image_bytes=image.stat().st_size if image else 0)  # fmt: skip
        self._console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._console.bind(str(paths.console_socket))  # QEMU connects at start-up
            self._console.listen(1)
            self._console.settimeout(CONSOLE_ACCEPT_TIMEOUT)
            if share is not None:
                self._start_virtiofsd(paths, share.source)
            self.argv = [*build_argv(config, vm), *extra_args]
            self.t0 = time.monotonic()
            # Behind the parent-death wrapper: QEMU dies with this script, even on SIGKILL.
            self.proc = subprocess.Popen(
                wrapped_argv(self.argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=open(self.tmp / "qemu.log", "wb"),  # noqa: SIM115
            )
        except BaseException:
            self._console.close()
            self._stop_virtiofsd()
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _start_virtiofsd(self, paths: StatePaths, source: Path) -> None:
        argv = virtiofsd_argv(VIRTIOFSD, paths.virtiofsd_socket, source, "auto")
        self.virtiofsd = subprocess.Popen(
            wrapped_argv(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(paths.virtiofsd_stderr, "wb"),  # noqa: SIM115
        )
        deadline = time.monotonic() + 5
        while not paths.virtiofsd_socket.exists():
            if self.virtiofsd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"virtiofsd did not start: {paths.virtiofsd_stderr}")
            time.sleep(0.01)

    def _console_lines(self) -> list[bytes] | socket.SocketIO:
        try:
            conn, _ = self._console.accept()
        except OSError:
            return []  # QEMU never connected (it failed to start): see qemu.log
        finally:
            self._console.close()
        return conn.makefile("rb")  # type: ignore[return-value]

    def _read(self) -> None:
        for raw in self._console_lines():
            line = ESCAPES.sub("", raw.decode(errors="replace")).rstrip("\r\n")
            cpu = self.cpu_seconds()
            with self._cond:
                self.lines.append((time.monotonic() - self.t0, line))
                self.cpu.append(cpu)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def cpu_seconds(self) -> float:
        """QEMU's CPU time so far (utime + stime from /proc/PID/stat), 0.0 if unreadable."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0

    def wait_for(self, pattern: str, timeout: float, since: int = 0) -> tuple[float, str] | None:
        """First console line (from index ``since`` on) matching ``pattern``: (host seconds
        since spawn, line), or None on timeout or when QEMU exited without printing it.
        ``self.last_match`` is then the index of that line."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = since
        with self._cond:
            while True:
                for i, (t, line) in enumerate(self.lines[seen:], start=seen):
                    if rx.search(line):
                        self.last_match = i
                        return t, line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    return None
                self._cond.wait(min(left, 0.2))

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def console(self) -> str:
        with self._cond:
            return "\n".join(f"[{t:7.3f}] {line}" for t, line in self.lines)

    def _stop_virtiofsd(self) -> None:
        if self.virtiofsd is not None and self.virtiofsd.poll() is None:
            self.virtiofsd.terminate()
            try:
                self.virtiofsd.wait(5)
            except subprocess.TimeoutExpired:
                self.virtiofsd.kill()
                self.virtiofsd.wait()

    def close(self) -> None:
        """Stop QEMU (SIGTERM, then SIGKILL) and virtiofsd; remove the temp dir."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        self._stop_virtiofsd()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def boot_once(args: argparse.Namespace) -> dict[str, float]:
    params = f"{args.params} {args.append}".strip()
    share = Path(args.virtiofs) if args.virtiofs else None
    with Guest(
        Path(args.kernel), Path(args.initrd), params, memory_mib=args.memory,
        accel=args.accel, machine_type=args.machine, share_dir=share,
        extra_args=args.qemu_arg, image=Path(args.image) if args.image else None,
    ) as g:  # fmt: skip
        init = g.wait_for(re.escape(INIT_MARKER), args.timeout)
        after = None
        init_idx = g.last_match
        if init is not None:
            after = g.wait_for(args.until, args.timeout, since=g.last_match + 1)
        rc = None if args.kill_after_until else g.wait_exit(args.timeout)
        if args.verbose:
            print(g.console())
        res: dict[str, float] = {}
        if init is not None:
            res["host_to_init"] = init[0]
            res["qemu_cpu_at_init"] = g.cpu[init_idx]
            m = re.search(r"uptime ([0-9.]+)s", init[1])
            if m:
                res["guest_uptime_at_init"] = float(m.group(1))
        if after is not None:
            res["host_to_until"] = after[0]
            res["qemu_cpu_at_until"] = g.cpu[g.last_match]
            m = re.search(r"after ([0-9.]+)s", after[1])
            if m:
                res["agent_exec_to_serving"] = float(m.group(1))
            m = re.search(r"uptime[= ]([0-9.]+)", after[1])
            if m:
                res["guest_uptime_at_until"] = float(m.group(1))
        if rc is not None:
            res["host_to_exit"] = time.monotonic() - g.t0
        if init is None or after is None:
            print(g.console(), file=sys.stderr)
            raise SystemExit(f"bootguest: did not see {INIT_MARKER!r} / {args.until!r}")
    return res


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernel", default=str(ROOT / "build/out/vmlinux"))
    ap.add_argument("--initrd", default=str(ROOT / "build/out/initrd.img"))
    ap.add_argument("--params", default=DEFAULT_PARAMS, help="base kernel command line")
    ap.add_argument("--append", default="", help="added to --params")
    ap.add_argument("--virtiofs", default="", help="share this directory as tag kataShared")
    ap.add_argument("--image", default="",
                    help="shared root image (then --initrd is its loader, rootfs-loader.img)")
    ap.add_argument("--memory", type=int, default=2048)
    ap.add_argument("--accel", default="tcg")
    ap.add_argument("--machine", default="q35", help="q35 or microvm (virtio-mmio)")
    ap.add_argument("--qemu-arg", action="append", default=[],
                    help="extra QEMU argument (repeat), e.g. --qemu-arg=-bios --qemu-arg=FILE")
    ap.add_argument(
        "--until", default=r".", help="regex of the line to time after /init (default: the first)"
    )
    ap.add_argument("--kill-after-until", action="store_true", help="do not wait for poweroff")
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("-v", "--verbose", action="store_true", help="print the console")
    args = ap.parse_args(argv)
    runs = []
    for i in range(args.repeat):
        res = boot_once(args)
        runs.append(res)
        print(f"run {i + 1}: " + " ".join(f"{k}={v:.2f}" for k, v in res.items()), flush=True)
    if args.repeat > 1:
        keys = sorted({k for r in runs for k in r})
        for name, fn in (("median", statistics.median), ("min", min)):
            print(f"{name}: " + " ".join(
                f"{k}={fn(r[k] for r in runs if k in r):.2f}" for k in keys
            ))  # fmt: skip
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
