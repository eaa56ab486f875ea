"""Generate the CRI (runtime.v1) modules the test kubelet uses, from api.proto.

api.proto is the Kubernetes CRI definition, taken unchanged from kubernetes/cri-api (see
README.md here). ``python -m tests.harness.cri.generate [OUT_DIR]`` writes api_pb2.py and
api_pb2_grpc.py under OUT_DIR/tests/harness/cri (default: the repository root).
tests/unit/test_cri_client.py checks that the committed modules are not stale.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PROTO = Path(__file__).resolve().parent / "api.proto"


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc  # type: ignore[import-untyped]  # dev-only dependency

    out_dir = out_dir.resolve()
    (out_dir / "tests" / "harness" / "cri").mkdir(parents=True, exist_ok=True)
    argv = ["protoc", f"-I{ROOT}", f"-I{resources.files('grpc_tools') / '_proto'}",
            f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", str(PROTO)]
    if protoc.main(argv) != 0:
        raise SystemExit("protoc failed; see the messages above")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
