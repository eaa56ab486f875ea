"""Which build of the host runtime this is: its version and the git commit it was built from.

The contract with the packaging step (build/freeze-runtime.sh): a build that has no git
checkout beside it carries a ``BUILD_INFO`` file, one JSON object::

    {"version": "0.1.0", "commit": "<40 hex digits>[-dirty]"}

``commit`` may be ``"unknown"``; other keys are ignored. It is looked for, first found wins:

1. ``<directory of this module>/BUILD_INFO`` (``common/BUILD_INFO``: an installed wheel, or a
   frozen bundle that adds it as data into ``common/``);
2. in a frozen (PyInstaller) program: ``<directory of the real executable>/BUILD_INFO``,
   then ``<sys._MEIPASS>/BUILD_INFO`` (the onedir bundle's top, where freeze-runtime.sh
   writes it, and its contents directory).

Without one, a source checkout asks git at run time (``git rev-parse HEAD``, and
``-dirty`` when tracked files differ from it): two short commands, run only when someone
asks for the version (``shim -v``, ``kata-runtime version``), never on ``start``/``delete``.
Anything else reports ``unknown``. Standard library only: the frozen shim imports this.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from common.constants import RUNTIME_VERSION

BUILD_INFO = "BUILD_INFO"
UNKNOWN = "unknown"
GIT_TIMEOUT = 5.0
MAX_BUILD_INFO = 4096  # bytes: the file is one small object
SOURCE_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class BuildInfo:
    version: str
    commit: str
    #: Where the commit came from: the BUILD_INFO path, "git", or "" (unknown).
    source: str = ""


def build_info_paths() -> list[Path]:
    """Where a BUILD_INFO file may be, in the order above."""
    paths = [Path(__file__).with_name(BUILD_INFO)]
    if getattr(sys, "frozen", False):
        paths.append(Path(os.path.realpath(sys.executable)).parent / BUILD_INFO)
        meipass = getattr(sys, "_MEIPASS", "")
        if meipass:
            paths.append(Path(meipass) / BUILD_INFO)
    return paths


def read_build_info(path: Path) -> BuildInfo | None:
    """The file's version and commit; None if absent or not the object described above."""
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(MAX_BUILD_INFO + 1)[:MAX_BUILD_INFO])
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    version, commit = doc.get("version"), doc.get("commit")
    return BuildInfo(version if isinstance(version, str) and version else RUNTIME_VERSION,
                     commit if isinstance(commit, str) and commit else UNKNOWN, str(path))


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=GIT_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit(root: Path = SOURCE_ROOT) -> str | None:
    """HEAD of the checkout at ``root`` (``-dirty`` if tracked files changed), or None."""
    if not (root / ".git").exists():
        return None
    head = _git(root, "rev-parse", "--verify", "HEAD")
    if not head:
        return None
    # --no-optional-locks: status must not rewrite the index of a checkout others work in.
    changes = _git(root, "--no-optional-locks", "status", "--porcelain", "--untracked-files=no")
    return f"{head}-dirty" if changes else head


def recorded_build_info() -> BuildInfo | None:
    """The first BUILD_INFO found (`build_info_paths`), or None."""
    return next((b for b in map(read_build_info, build_info_paths()) if b), None)


def build_info() -> BuildInfo:
    """This program's version and commit (runs git in a source checkout: not for hot paths)."""
    found = recorded_build_info()
    if found is not None:
        return found
    commit = None if getattr(sys, "frozen", False) else git_commit()
    return BuildInfo(RUNTIME_VERSION, commit or UNKNOWN, "git" if commit else "")


def version() -> str:
    """The version alone: reads BUILD_INFO if there is one, never runs git."""
    found = recorded_build_info()
    return found.version if found else RUNTIME_VERSION
