"""benchmarks.results: percentiles, the JSON against its schema, the table, the doc."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from benchmarks import results

REPO = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((REPO / "docs" / "bench-results.schema.json").read_text())


def a_run() -> dict:
    meta = results.machine_meta(REPO, "tcg", quick=True)
    return {"meta": meta, "figures": {
        "cold run": {"runc": {"wall s": [0.1, 0.2]}, "kata": {"wall s": [5.0, 6.0, 7.0]}},
        "boot floor": {"kata": {"QEMU spawn to /init s": [2.5]}}}}


@pytest.mark.parametrize(("values", "q", "expected"), [
    ([3.0], 0.9, 3.0), ([1.0, 2.0], 0.5, 1.5), ([5.0, 1.0, 3.0], 0.5, 3.0),
    (list(map(float, range(1, 11))), 0.9, 9.1), ([1.0, 2.0], 1.0, 2.0),
])
def test_percentile(values: list[float], q: float, expected: float) -> None:
    assert results.percentile(values, q) == pytest.approx(expected)


def test_a_run_validates_and_round_trips(tmp_path: Path) -> None:
    run = a_run()
    results.write_json(run, tmp_path / "r" / "run.json")
    back = json.loads((tmp_path / "r" / "run.json").read_text())
    jsonschema.validate(back, SCHEMA)
    assert back == run


def test_the_schema_refuses_a_summary_in_place_of_samples() -> None:
    run = a_run()
    run["figures"]["cold run"]["kata"]["wall s"] = 6.0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(run, SCHEMA)


def test_table_has_runc_first_and_median_p90_cells() -> None:
    text = results.table(a_run())
    header = next(line for line in text.splitlines() if line.startswith("| figure"))
    assert header == "| figure | metric | runc | kata |"
    assert "| cold run | wall s | 0.15 / 0.19 | 6 / 6.8 |" in text
    assert "| boot floor | QEMU spawn to /init s | - | 2.5 |" in text


def test_update_doc_replaces_only_between_the_markers(tmp_path: Path) -> None:
    doc = tmp_path / "perf.md"
    doc.write_text(f"intro\n{results.TABLE_BEGIN}\nold\n{results.TABLE_END}\noutro\n")
    results.update_doc(doc, "new\n")
    assert doc.read_text() == f"intro\n{results.TABLE_BEGIN}\nnew\n{results.TABLE_END}\noutro\n"
    (tmp_path / "bare.md").write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        results.update_doc(tmp_path / "bare.md", "x\n")


def test_chart_is_a_png(tmp_path: Path) -> None:
    results.chart(a_run(), tmp_path / "c.png", {"cold run": "wall s", "absent": "x"})
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
