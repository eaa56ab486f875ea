"""The test harness's containerd configuration (tests/harness/containerd.py)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tests.harness import containerd as hc

# CapEff of root in a container without CAP_SYS_RESOURCE (bit 24), and of a full root.
WITHOUT = "000001fffeffffff"
WITH = "000001ffffffffff"


def status(tmp_path: Path, cap_eff: str) -> Path:
    path = tmp_path / "status"
    path.write_text(f"Name:\tpython\nCapInh:\t0000000000000000\nCapEff:\t{cap_eff}\n")
    return path


@pytest.mark.parametrize(("cap_eff", "can"), [(WITHOUT, False), (WITH, True)])
def test_cap_sys_resource_is_read_from_capeff(tmp_path: Path, cap_eff: str, can: bool) -> None:
    assert hc.can_lower_oom_scores(status(tmp_path, cap_eff)) is can


@pytest.mark.parametrize("can", [False, True])
def test_cri_keeps_oom_scores_settable_where_root_cannot_lower_them(
        monkeypatch: pytest.MonkeyPatch, can: bool) -> None:
    monkeypatch.setattr(hc, "can_lower_oom_scores", lambda: can)
    cri = tomllib.loads(hc.config_toml(True))["plugins"][hc.CRI_PLUGIN]
    assert cri["restrict_oom_score_adj"] is (not can)
    assert "restrict_oom_score_adj" not in hc.config_toml(False)
