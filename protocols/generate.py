"""Generate protocols/*_pb2.py(i) from protocols/*.proto with grpcio-tools.

Usage (from any directory): ``python -m protocols.generate [OUT_DIR]``; OUT_DIR defaults to the
repository root, so the modules land next to the protos. Protos import one another as
``protocols/<name>.proto`` and are passed to protoc by absolute path under ``-I<repo root>``,
so the generated modules import ``protocols.<name>_pb2`` whatever the working directory, and
the output is byte-for-byte reproducible (tests/unit/test_protocols.py checks that the
committed modules are not stale).
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protocols"


def proto_files() -> list[Path]:
    """Every .proto source of the project, sorted."""
    return sorted(PROTO_DIR.glob("*.proto"))


def protoc_args(out_dir: Path) -> list[str]:
    """The protoc argv that writes every proto's modules under ``out_dir/protocols``."""
    well_known = resources.files("grpc_tools") / "_proto"
    return [
        "protoc",
        f"-I{ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *(str(p) for p in proto_files()),
    ]


def generate(out_dir: Path) -> None:
    """Write the generated modules for every proto under ``out_dir/protocols``."""
    from grpc_tools import protoc  # type: ignore[import-untyped]  # dev-only dependency

    out_dir = out_dir.resolve()
    (out_dir / "protocols").mkdir(parents=True, exist_ok=True)
    if protoc.main(protoc_args(out_dir)) != 0:
        raise SystemExit("protoc failed; see the messages above")


def main(argv: list[str] | None = None) -> None:
    """Entry point: generate into OUT_DIR (default: the repository root)."""
    args = sys.argv[1:] if argv is None else argv
    generate(Path(args[0]) if args else ROOT)


if __name__ == "__main__":
    main()
