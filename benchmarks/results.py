"""One bench run's results: every sample, written as JSON, a Markdown table and a chart.

A run is ``{"meta": {...}, "figures": {figure: {runtime: {metric: [samples]}}}}``: the
machine, accelerator and commit in ``meta``; nothing summarised away, so a later reader
can recompute anything. `docs/bench-results.schema.json` is its schema (the smoke test in
`make test` validates against it). The table and chart are made from the JSON alone.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

Samples = dict[str, list[float]]  # metric -> samples
Figure = dict[str, Samples]  # runtime -> metrics
TABLE_BEGIN = "<!-- bench-table:begin (written by `make bench`) -->"
TABLE_END = "<!-- bench-table:end -->"


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; the value itself for one sample."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def machine_meta(repo: Path, accelerator: str, quick: bool) -> dict[str, Any]:
    """Where and what was measured."""
    def git(*args: str) -> str:
        res = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
        return res.stdout.strip()

    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor())
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "host": platform.node(), "kernel": platform.release(), "cpu": cpu,
        "cpus": os.cpu_count(), "memory_mib": mem_kib // 1024,
        "accelerator": accelerator, "quick": quick,
    }


def write_json(run: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run, indent=1, sort_keys=True) + "\n")


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    p50 = statistics.median(values)
    if len(values) == 1:
        return f"{p50:.3g}"
    return f"{p50:.3g} / {percentile(values, 0.9):.3g}"


def table(run: Mapping[str, Any]) -> str:
    """Markdown: one row per (figure, metric), one column per runtime; cells p50 / p90."""
    figures: dict[str, Figure] = run["figures"]
    runtimes = sorted({r for fig in figures.values() for r in fig},
                      key=lambda r: (r != "runc", r))
    meta = run["meta"]
    lines = [
        f"Run of {meta['date']}, commit `{meta['commit'][:10]}`"
        f"{' (uncommitted changes)' if meta['dirty'] else ''}, {meta['cpus']} CPUs "
        f"({meta['cpu']}), {meta['memory_mib']} MiB, accelerator {meta['accelerator']}"
        f"{', QUICK' if meta['quick'] else ''}. Cells: median / p90 (one value: n=1).",
        "",
        "| figure | metric | " + " | ".join(runtimes) + " |",
        "|---|---|" + "---|" * len(runtimes),
    ]
    lines[1:1] = [f"Note: {note}" for note in meta.get("notes", [])]
    for name, fig in figures.items():
        metrics = list(dict.fromkeys(m for r in runtimes for m in fig.get(r, {})))
        for metric in metrics:
            cells = [_cell(fig.get(r, {}).get(metric, [])) for r in runtimes]
            lines.append(f"| {name} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def update_doc(doc: Path, text: str) -> None:
    """Replace what lies between the table markers of `doc` with `text`."""
    body = doc.read_text()
    head, sep, rest = body.partition(TABLE_BEGIN)
    _, sep2, tail = rest.partition(TABLE_END)
    if not (sep and sep2):
        raise ValueError(f"{doc}: no {TABLE_BEGIN!r} ... {TABLE_END!r} markers")
    doc.write_text(f"{head}{TABLE_BEGIN}\n{text}{TABLE_END}{tail}")


def chart(run: Mapping[str, Any], path: Path, figures: Mapping[str, str]) -> None:
    """Bars of the medians of `figures` ({figure: metric}) per runtime, one panel each."""
    import matplotlib  # only here: the bench needs it, the runtime never does

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    shown = [(f, m) for f, m in figures.items() if f in run["figures"]]
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.4), squeeze=False)
    for ax, (name, metric) in zip(axes[0], shown, strict=True):
        data = {r: v[metric] for r, v in run["figures"][name].items() if v.get(metric)}
        ax.bar(list(data), [statistics.median(v) for v in data.values()],
               color=["#888" if r == "runc" else "#3a7" for r in data])
        ax.set_title(f"{name}\n{metric}", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    meta = run["meta"]
    fig.suptitle(f"{meta['commit'][:10]} {meta['accelerator']} {meta['date']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
