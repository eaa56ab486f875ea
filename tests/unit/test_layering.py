"""The layers of docs/contracts.md, checked from the source: imports point down only,
generated protobuf types stay at the edges (shim's Task service, agent_client, agent,
ttrpc), and the sandbox layer names no hypervisor.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROJECT = {"cli", "shim", "sandbox", "hypervisors", "agent_client", "network", "hostos",
           "ttrpc", "protocols", "agent", "common"}
# package -> project packages it may import (besides itself). `common` (shared constants,
# pure) is the bottom of both sides.
ALLOWED: dict[str, set[str]] = {
    "cli": {"sandbox", "common"},
    "shim": {"sandbox", "ttrpc", "protocols", "common"},
    "sandbox": {"hypervisors", "agent_client", "network", "hostos", "ttrpc", "common"},
    "hypervisors": {"hostos", "common"},
    "agent_client": {"ttrpc", "protocols", "common"},
    "network": {"hostos", "common"},
    "hostos": {"common"},
    "ttrpc": {"protocols"},
    "protocols": set(),
    "agent": {"ttrpc", "protocols", "common"},
    "common": set(),
}
PB2_USERS = {"shim", "agent_client", "agent", "ttrpc", "protocols"}


def project_imports(path: Path) -> set[str]:
    """Top-level project modules a file imports (module.submodule for protocols)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n.split(".")[0] in PROJECT}
    return found


def sources(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_down(package: str) -> None:
    bad = [
        f"{path.relative_to(REPO)} imports {name}"
        for path in sources(package)
        if not path.name.endswith("_pb2.py")
        for name in project_imports(path)
        if name.split(".")[0] not in ALLOWED[package] | {package}
    ]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", sorted(PROJECT - PB2_USERS))
def test_generated_types_stay_at_the_edges(package: str) -> None:
    bad = [
        f"{path.relative_to(REPO)} imports {name}"
        for path in sources(package)
        for name in project_imports(path)
        if name.endswith("_pb2")
    ]
    assert not bad, "protobuf types used below the edges:\n" + "\n".join(bad)


def test_the_checker_sees_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json\nfrom sandbox.types import Mount\nfrom protocols import task_pb2\n"
    )
    assert project_imports(probe) >= {"sandbox.types", "protocols.task_pb2"}


def _names(path: Path) -> set[str]:
    """Identifiers a file defines or uses, and the modules it imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found.add(node.name)
        elif isinstance(node, ast.arg):
            found.add(node.arg)
        elif isinstance(node, ast.alias):
            found |= {node.name, node.asname or ""}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("package", ["sandbox", "shim", "cli"])
def test_above_the_hypervisor_interface_no_hypervisor_is_named(package: str) -> None:
    specific = ("qemu", "qmp", "stratovirt", "virtiofsd")
    bad = [
        f"{path.relative_to(REPO)}: {name}"
        for path in sources(package)
        for name in sorted(_names(path))
        if any(word in name.lower() for word in specific)
    ]
    assert not bad, "hypervisor-specific names above the interface:\n" + "\n".join(bad)


def _strings(path: Path) -> list[tuple[int, str]]:
    """String literals of a file, docstrings left out."""
    tree = ast.parse(path.read_text())
    docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_the_only_hypervisor_string_in_sandbox_is_the_legacy_state_reader() -> None:
    hits = [(path.relative_to(REPO).as_posix(), line)
            for path in sources("sandbox") for line, text in _strings(path)
            if "qemu" in text.lower()]
    assert hits and {where for where, _ in hits} == {"sandbox/state.py"}, hits
