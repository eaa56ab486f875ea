"""Show that containers run in a VM: `make demo` (python -m tests.demo; needs root).

Starts a private containerd with the kata shim, runs busybox, prints the host's and the
guest's kernel release, the QEMU process and its accelerator, and the wall time of
`ctr run --rm ... uname -r`. Cleans everything up, also on failure.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

from tests.harness import kataconfig, leaks
from tests.harness.kata import Kata, accelerator, kata_containerd
from tests.harness.scenarios import KATA, detached, explain, run_rm

SLEEPER = "demo-sleeper"


def prerequisites() -> list[str]:
    missing = [] if os.geteuid() == 0 else ["root"]
    missing += [str(kataconfig.GUEST_DIR / f) for f in ("vmlinux", "vmlinuz", "initrd.img",
                                                         "rootfs.img", "rootfs-loader.img",
                                                         "kernel-release")
                if not (kataconfig.GUEST_DIR / f).is_file()]
    return missing


def show(label: str, value: object) -> None:
    print(f"{label:<26} {value}")


def accel_from_state(sandbox: Path) -> str | None:
    try:
        state = json.loads((sandbox / "state.json").read_text())
    except (OSError, ValueError):
        return None
    found = re.search(r'"accel(?:erator)?"\s*:\s*"(\w+)"', json.dumps(state))
    return found.group(1) if found else None


def accel_from_log(kata: Kata) -> str | None:
    lines = [ln for ln in kata.cd.log_tail(5000).splitlines() if "accel" in ln.lower()]
    return lines[-1].strip()[:200] if lines else None


def show_vm(kata: Kata) -> None:
    """Start a sleeping container and show its VM."""
    with detached(kata.cd, KATA, SLEEPER, "sleep", "60"):
        qemus = [p for p in kata.qemu_processes() if SLEEPER in p.cmdline]
        if not qemus:
            raise SystemExit(f"no QEMU process for {SLEEPER}: {kata.qemu_processes()}")
        show("QEMU pid", qemus[0].pid)
        show("QEMU command line", qemus[0].cmdline)
        show("accelerator (QEMU argv)", accelerator(qemus[0].argv))
        # sbs/<namespace>/<id> (Kata.sandbox_dirs)
        sandbox = next((d for d in kata.sandbox_dirs() if d.name == SLEEPER), None)
        found = accel_from_state(sandbox) if sandbox else None
        show("accelerator (state.json)", found or "(not recorded)")
        show("accelerator (shim log)", accel_from_log(kata) or "(not logged)")


def run_demo(kata: Kata) -> None:
    show("host kernel release", os.uname().release)
    show("guest kernel (build/out)", kata.guest_release)
    start = time.monotonic()
    res = run_rm(kata.cd, KATA, "demo", "uname", "-r")
    wall = time.monotonic() - start
    if res.returncode != 0:
        raise SystemExit(f"ctr run failed:\n{explain(res)}")
    show("guest `uname -r`", res.stdout.strip())
    show("ctr run --rm wall time", f"{wall:.2f} s")
    show_vm(kata)


def main() -> int:
    if missing := prerequisites():
        print(f"demo: missing {', '.join(missing)} (run as root after `make guest`)",
              file=sys.stderr)
        return 1
    with kata_containerd() as kata:
        before = leaks.snapshot(kata.cd, kata_state_dir=str(kata.state_dir))
        show("private containerd", kata.cd.address)
        show("kata configuration", kata.config_path)
        try:
            run_demo(kata)
        except BaseException:
            print(kata.cd.log_tail(40), file=sys.stderr)
            raise
        leaks.assert_no_leaks(before)
        show("leftovers", "none (no QEMU, virtiofsd, shim, mount or state dir)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
