#!/usr/bin/env python3
"""Boot the guest image under QEMU and time it (see build/README.md).

    build/bootguest.py [--kernel build/out/vmlinuz] [--initrd build/out/initrd.img]
                       [--params "..."] [--append "..."] [--virtiofs DIR] [--repeat N]
                       [--until REGEX] [--timeout S] [--kill-after-until]

Starts QEMU (TCG unless --accel kvm) with the console on a pipe, a virtio-serial port named
agent.channel.0 on a unix socket and optionally a virtio-fs share (tag kataShared, served by
/usr/lib/qemu/virtiofsd), timestamps every console line on the host, and prints when the
kernel ran /init ("kata-init:" marker) and the first line after it. QEMU and virtiofsd are
always stopped on the way out. Importable: ``Guest`` is what tests/e2e uses.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QEMU = "/usr/bin/qemu-system-x86_64"
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
# Recommended guest kernel command line (measured under TCG, see build/README.md).
DEFAULT_PARAMS = (
    "console=ttyS0 quiet panic=-1 reboot=k tsc=reliable no_timer_check noreplace-smp "
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
        share_dir: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        for what, path in (("kernel", kernel), ("initrd", initrd), ("qemu", Path(QEMU))):
            if not path.exists():
                raise FileNotFoundError(f"{what} {path} not found")
        self.tmp = Path(tempfile.mkdtemp(prefix="kata-bootguest-"))
        self.agent_sock = self.tmp / "agent.sock"
        self.lines: list[tuple[float, str]] = []
        # QEMU's CPU seconds (user+sys, all threads) when each line arrived: under TCG this
        # tracks guest work and is far less noisy than wall time on a shared host.
        self.cpu: list[float] = []
        self.last_match = -1
        self._cond = threading.Condition()
        self.virtiofsd: subprocess.Popen[bytes] | None = None
        argv = [
            QEMU, "-accel", accel, "-machine", "q35", "-cpu", "max", "-smp", "1",
            "-m", str(memory_mib), "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", "stdio", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", params,
            "-device", "virtio-serial-pci,id=serial0",
            "-chardev", f"socket,id=agent0,path={self.agent_sock},server=on,wait=off",
            "-device", "virtserialport,chardev=agent0,name=agent.channel.0",
        ]  # fmt: skip
        try:
            if share_dir is not None:
                fs_sock = self.tmp / "virtiofsd.sock"
                self.virtiofsd = subprocess.Popen(
                    [VIRTIOFSD, f"--socket-path={fs_sock}", "-o", f"source={share_dir.resolve()}",
                     "-o", "cache=auto"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=open(self.tmp / "virtiofsd.log", "wb"),  # noqa: SIM115
                )  # fmt: skip
                deadline = time.monotonic() + 5
                while not fs_sock.exists():
                    if self.virtiofsd.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"virtiofsd did not start: {self.tmp}/virtiofsd.log")
                    time.sleep(0.01)
                argv += [
                    "-object", f"memory-backend-memfd,id=mem,size={memory_mib}M,share=on",
                    "-numa", "node,memdev=mem",
                    "-chardev", f"socket,id=fs0,path={fs_sock}",
                    "-device", "vhost-user-fs-pci,chardev=fs0,tag=kataShared",
                ]  # fmt: skip
            argv += list(extra_args)
            self.argv = argv
            self.t0 = time.monotonic()
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        except BaseException:
            self._stop_virtiofsd()
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
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
        accel=args.accel, share_dir=share, extra_args=args.qemu_arg,
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
    ap.add_argument("--kernel", default=str(ROOT / "build/out/vmlinuz"))
    ap.add_argument("--initrd", default=str(ROOT / "build/out/initrd.img"))
    ap.add_argument("--params", default=DEFAULT_PARAMS, help="base kernel command line")
    ap.add_argument("--append", default="", help="added to --params")
    ap.add_argument("--virtiofs", default="", help="share this directory as tag kataShared")
    ap.add_argument("--memory", type=int, default=2048)
    ap.add_argument("--accel", default="tcg")
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
