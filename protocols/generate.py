"""Generate protocols/*_pb2.py(i) from protocols/*.proto with grpcio-tools.

Run from the repository root: ``python -m protocols.generate [OUT_DIR]``. Protos import one
another as ``protocols/<name>.proto`` so generated modules import ``protocols.<name>_pb2``.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def proto_files() -> list[Path]:
    """Every .proto source of the project, sorted."""
    return sorted((ROOT / "protocols").glob("*.proto"))


def generate(out_dir: Path) -> None:
    """Write the generated modules for every proto under ``out_dir/protocols``."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    well_known = resources.files("grpc_tools") / "_proto"
    (out_dir / "protocols").mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *(str(p.relative_to(ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")


def main() -> None:
    """Entry point: generate into OUT_DIR (default: the repository root)."""
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    generate(out)


if __name__ == "__main__":
    main()
