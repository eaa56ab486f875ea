"""The layers of docs/contracts.md, checked from the source: imports point down only, and
generated protobuf types stay at the edges (shim's Task service, agent_client, agent, ttrpc).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROJECT = {"shim", "sandbox", "hypervisors", "agent_client", "network", "ttrpc", "protocols",
           "agent"}
# package -> project packages it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "shim": {"sandbox", "hypervisors", "agent_client", "network", "ttrpc", "protocols"},
    "sandbox": {"hypervisors", "agent_client", "network", "ttrpc", "protocols"},
    "hypervisors": set(),
    "agent_client": {"ttrpc", "protocols"},
    "network": set(),
    "ttrpc": {"protocols"},
    "protocols": set(),
    "agent": {"ttrpc", "protocols"},
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
