"""The frozen runtime's one program with several names (build/runtime-entry.py) and how a
frozen shim re-executes itself as its daemon (shim/manager.py self_command)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

from shim import manager

REPO = Path(__file__).resolve().parents[2]


def load_entry() -> ModuleType:
    spec = importlib.util.spec_from_file_location("runtime_entry", REPO / "build/runtime-entry.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def entry(monkeypatch: pytest.MonkeyPatch) -> tuple[ModuleType, list[tuple[str, list[str]]]]:
    """The entry module, with the programs it dispatches to replaced by recorders."""
    import cli.main
    import network.worker
    import shim.main

    calls: list[tuple[str, list[str]]] = []
    for name, module in (("shim", shim.main), ("cli", cli.main), ("worker", network.worker)):
        monkeypatch.setattr(module, "main",
                            lambda name=name: calls.append((name, list(sys.argv))) or 7)
    return load_entry(), calls


@pytest.mark.parametrize("argv0, program", [
    ("/usr/bin/containerd-shim-kata-v2", "shim"),
    ("/usr/bin/containerd-shim-kata-qemu-microvm-v2", "shim"),
    ("kata-runtime", "cli"),
])
def test_the_name_selects_the_program(entry: tuple[ModuleType, list[tuple[str, list[str]]]],
                                      monkeypatch: pytest.MonkeyPatch, argv0: str,
                                      program: str) -> None:
    module, calls = entry
    monkeypatch.setattr(sys, "argv", [argv0, "-v"])
    assert module.main() == 7
    assert calls == [(program, [argv0, "-v"])]


def test_an_unknown_name_is_refused(entry: tuple[ModuleType, list[tuple[str, list[str]]]],
                                    monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    module, calls = entry
    monkeypatch.setattr(sys, "argv", ["/usr/libexec/kata-py/kata-py", "start"])
    assert module.main() == 2
    assert calls == [] and "kata-runtime" in capsys.readouterr().err


def test_dash_m_runs_only_internal_modules(entry: tuple[ModuleType, list[tuple[str, list[str]]]],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    module, calls = entry
    monkeypatch.setattr(sys, "argv", ["/x/kata-py", "-m", "network.worker", "arg"])
    assert module.main() == 7
    assert calls == [("worker", ["/x/kata-py", "arg"])]
    monkeypatch.setattr(sys, "argv", ["/x/kata-py", "-m", "os"])
    assert module.main() == 2
    assert len(calls) == 1


def test_the_bootloaders_environment_is_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_entry()
    monkeypatch.setenv("LD_LIBRARY_PATH", "/usr/libexec/kata-py/_internal")
    monkeypatch.setenv("LD_LIBRARY_PATH_ORIG", "/opt/lib")
    monkeypatch.setenv("_PYI_ARCHIVE_FILE", "/usr/libexec/kata-py/kata-py")
    module.restore_environment()
    assert os.environ["LD_LIBRARY_PATH"] == "/opt/lib"
    assert "LD_LIBRARY_PATH_ORIG" not in os.environ and "_PYI_ARCHIVE_FILE" not in os.environ
    monkeypatch.setenv("LD_LIBRARY_PATH", "/usr/libexec/kata-py/_internal")
    module.restore_environment()
    assert "LD_LIBRARY_PATH" not in os.environ


@pytest.fixture
def frozen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake frozen program: sys.frozen set, sys.executable a file in tmp_path."""
    program = tmp_path / "libexec" / "kata-py"
    program.parent.mkdir()
    program.write_text("")
    program.chmod(0o755)
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "executable", str(program))
    return program


def test_a_frozen_variant_shim_reexecutes_under_its_own_name(
        frozen: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    link = tmp_path / "bin" / "containerd-shim-kata-qemu-microvm-v2"
    link.parent.mkdir()
    link.symlink_to(os.path.relpath(frozen, link.parent))
    monkeypatch.setattr(sys, "argv", [str(link), "start"])
    assert manager.self_command() == [str(link)]
    # found on PATH when run by a bare name
    monkeypatch.setenv("PATH", str(link.parent))
    monkeypatch.setattr(sys, "argv", [link.name, "start"])
    assert manager.self_command() == [str(link)]


def test_a_frozen_shim_under_another_name_falls_back_to_dash_m(
        frozen: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "containerd-shim-kata-v2"  # the right name, another file
    other.write_text("")
    for argv0 in (str(frozen), str(other)):
        monkeypatch.setattr(sys, "argv", [argv0, "start"])
        assert manager.self_command() == [str(frozen), "-m", "shim.main"]
