"""The agent's reading of cgroup v2 files (Stats, OOM reports)."""

from __future__ import annotations

from pathlib import Path

from agent import cgroup


def test_flat_keyed_files_are_parsed_leniently_and_bounded() -> None:
    text = "usage_usec 1500\nuser_usec 1000\nbroken\nneg -1\nspaced  7\n"
    assert cgroup.parse_flat_keyed(text) == {"usage_usec": 1500, "user_usec": 1000, "spaced": 7}
    many = "\n".join(f"k{i} {i}" for i in range(1000))
    assert len(cgroup.parse_flat_keyed(many)) == cgroup.MAX_KEYS


def test_single_values() -> None:
    assert cgroup.parse_single("536870912\n") == 536870912
    assert cgroup.parse_single("max\n") == 0
    assert cgroup.parse_single("") == 0


def test_stats_and_oom_kills_from_a_cgroup_dir(tmp_path: Path) -> None:
    files = {"cpu.stat": "usage_usec 10\n", "memory.current": "4096\n", "memory.max": "max\n",
             "memory.events": "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
             "pids.current": "2\n", "pids.max": "max\n", "memory.stat": "anon 1024\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    stats = cgroup.stats(str(tmp_path))
    assert stats["cpu_stat"] == {"usage_usec": 10}
    assert (stats["memory_current"], stats["memory_max"], stats["pids_current"]) == (4096, 0, 2)
    assert stats["memory_swap_current"] == 0  # missing file
    assert cgroup.oom_kills(str(tmp_path)) == 1
    (tmp_path / "memory.events").write_text("oom_kill 0\n")
    assert cgroup.oom_kills(str(tmp_path)) == 0


def test_a_link_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "real").write_text("usage_usec 5\n")
    (tmp_path / "cpu.stat").symlink_to(tmp_path / "real")
    assert cgroup.stats(str(tmp_path))["cpu_stat"] == {}
