"""`make soak` kept working: a few container and pod cycles through benchmarks/soak.py
(the full run, 200 and 50 cycles, is `make soak`; its figures are in docs/reliability.md)."""

from __future__ import annotations

import pytest

from benchmarks import soak


def test_a_short_soak_is_flat(guest_release: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = soak.main(["--containers", "3", "--pods", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "3 container cycles" in out and "2 pod cycles" in out
    assert "flat: no growth" in out
