"""`kata-runtime containerd-config`: the CRI handler block in containerd's configuration."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from cli import containerd_config as cc
from cli.main import main

REPO = Path(__file__).resolve().parents[2]
OPERATOR_CONFIG = """version = 2
root = "/var/lib/containerd"

[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
"""


def runtimes(text: str) -> dict[str, dict[str, object]]:
    doc = tomllib.loads(text)
    return doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]  # type: ignore[no-any-return]


def test_add_keeps_the_operators_settings_and_adds_the_handler() -> None:
    text = cc.add(OPERATOR_CONFIG, cc.Handler("kata", "/etc/kata-containers/configuration.toml"))
    assert text.startswith(OPERATOR_CONFIG)
    kata = runtimes(text)["kata"]
    assert kata == {"runtime_type": "io.containerd.kata.v2",
                    "pod_annotations": ["io.katacontainers.*"],
                    "privileged_without_host_devices": True,
                    "options": {"ConfigPath": "/etc/kata-containers/configuration.toml"}}
    assert runtimes(text)["runc"] == {"runtime_type": "io.containerd.runc.v2"}


def test_add_is_idempotent_and_remove_restores_the_original() -> None:
    once = cc.add(OPERATOR_CONFIG, cc.Handler())
    assert cc.add(once, cc.Handler()) == once
    updated = cc.add(once, cc.Handler(kata_config="/opt/k.toml"))
    assert runtimes(updated)["kata"]["options"] == {"ConfigPath": "/opt/k.toml"}
    assert updated.count("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kata]") == 1
    assert cc.remove(updated, "kata") == OPERATOR_CONFIG
    assert cc.remove(OPERATOR_CONFIG, "kata") == OPERATOR_CONFIG


def test_two_handlers_live_side_by_side() -> None:
    both = cc.add(cc.add(OPERATOR_CONFIG, cc.Handler("kata")), cc.Handler("kata-qemu"))
    assert {"kata", "kata-qemu", "runc"} <= set(runtimes(both))
    assert set(runtimes(cc.remove(both, "kata"))) == {"kata-qemu", "runc"}


def test_an_empty_file_becomes_a_version_2_configuration_that_keeps_runc() -> None:
    text = cc.add("", cc.Handler())
    assert tomllib.loads(text)["version"] == 2
    # Defining any runtime hides containerd's built-in runc, CRI's default: keep it.
    assert runtimes(text)["runc"] == {"runtime_type": "io.containerd.runc.v2"}
    assert "kata" in runtimes(text)
    assert cc.remove(text, "kata") == "version = 2\n"
    assert cc.add(OPERATOR_CONFIG, cc.Handler()).count("runtimes.runc]") == 1


@pytest.mark.parametrize(("text", "message"), [
    ('[plugins.cri]\nsystemd_cgroup = true\n', "version 1"),
    ("version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kata]\n"
     "runtime_type = \"x\"\n", "outside our block"),
    ("version = 2\n[broken\n", "not valid TOML"),
])
def test_configurations_it_cannot_change_safely_are_refused(text: str, message: str) -> None:
    with pytest.raises(cc.ConfigEditError, match=message):
        cc.add(text, cc.Handler())


def test_a_block_without_its_end_marker_is_refused() -> None:
    text = cc.add(OPERATOR_CONFIG, cc.Handler())
    broken = "\n".join(line for line in text.splitlines() if not line.startswith("# <<<"))
    with pytest.raises(cc.ConfigEditError, match="no end marker"):
        cc.remove(broken, "kata")


@pytest.mark.parametrize("handler", ["Kata", "kata_1", "-kata", ""])
def test_handler_names_must_be_dns_labels(handler: str) -> None:
    with pytest.raises(cc.ConfigEditError, match="DNS label"):
        cc.Handler(handler)


def test_the_command_keeps_a_backup_and_does_not_rewrite_an_unchanged_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_text(OPERATOR_CONFIG)
    os.chmod(config, 0o600)
    assert main(["containerd-config", "add", "--file", str(config)]) == 0
    assert "restart containerd" in capsys.readouterr().out
    assert (tmp_path / "config.toml.kata-backup").read_text() == OPERATOR_CONFIG
    assert config.stat().st_mode & 0o777 == 0o600
    mtime = config.stat().st_mtime_ns
    assert main(["containerd-config", "add", "--file", str(config)]) == 0
    assert "nothing to change" in capsys.readouterr().out
    assert config.stat().st_mtime_ns == mtime
    assert main(["containerd-config", "remove", "--file", str(config)]) == 0
    assert config.read_text() == OPERATOR_CONFIG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml",
                                                          "config.toml.kata-backup"]


def test_the_command_reports_a_refusal_and_leaves_the_file_alone(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[plugins.cri]\n")
    assert main(["containerd-config", "add", "--file", str(config)]) == 1
    assert "version 1" in capsys.readouterr().err
    assert config.read_text() == "[plugins.cri]\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.toml"]


def test_containerd_accepts_the_result(tmp_path: Path) -> None:
    """containerd itself parses the file (its `config dump` fails on a bad one)."""
    config = tmp_path / "config.toml"
    config.write_text(cc.add(OPERATOR_CONFIG, cc.Handler(kata_config="/etc/k.toml")))
    res = subprocess.run(["containerd", "--config", str(config), "config", "dump"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert 'runtime_type = "io.containerd.kata.v2"' in res.stdout
    assert "/etc/k.toml" in res.stdout


def test_the_committed_cri_modules_are_not_stale(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "tests.harness.cri.generate", str(tmp_path)],
                   cwd=tmp_path, env=env, check=True)
    for name in ("api_pb2.py", "api_pb2_grpc.py"):
        fresh = (tmp_path / "tests" / "harness" / "cri" / name).read_text()
        assert fresh == (REPO / "tests" / "harness" / "cri" / name).read_text(), \
            "run `python -m tests.harness.cri.generate`"


def test_the_shipped_runtimeclasses_name_our_handlers() -> None:
    text = (REPO / "build" / "kubernetes" / "runtimeclass.yaml").read_text()
    handlers = []
    for doc in text.split("\n---\n"):
        lines = [line for line in doc.splitlines() if line and not line.startswith("#")]
        fields = dict(line.strip().split(":", 1) for line in lines if ":" in line)
        assert fields["apiVersion"].strip() == "node.k8s.io/v1"
        assert fields["kind"].strip() == "RuntimeClass"
        assert fields["name"].strip() == fields["handler"].strip()
        assert fields["memory"].strip() == '"400Mi"'  # docs/kubernetes.md: measured
        handlers.append(fields["handler"].strip())
    # The default, then one per runtime variant (docs/hypervisors.md).
    assert handlers == [cc.DEFAULT_HANDLER, "kata-qemu", "kata-qemu-microvm", "kata-stratovirt"]
