"""Resource figures from /proc: the host's (hostos.procstat) and the guest's (agent.sysstats),
read from fake /proc trees and from this very process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent import sysstats
from hostos.procs import start_time
from hostos.procstat import ProcessSample, parse_pss, parse_stat, sample

PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")


def stat_line(comm: str = "qemu-system-x86", state: str = "S", utime: int = 250,
              stime: int = 50, threads: int = 7, started: int = 12345, rss: int = 1000) -> bytes:
    fields = ["0"] * 50
    fields[3 - 3], fields[14 - 3], fields[15 - 3] = state, str(utime), str(stime)
    fields[20 - 3], fields[22 - 3], fields[24 - 3] = str(threads), str(started), str(rss)
    return f"4242 ({comm}) {' '.join(fields)}\n".encode()


def fake_proc(tmp: Path, pid: int = 4242, stat: bytes | None = None, fds: int = 3,
              smaps: str | None = "Rss: 9 kB\nPss:   2048 kB\nPss_Anon: 1 kB\n") -> Path:
    base = tmp / str(pid)
    (base / "fd").mkdir(parents=True)
    (base / "stat").write_bytes(stat_line() if stat is None else stat)
    for n in range(fds):
        (base / "fd" / str(n)).touch()
    if smaps is not None:
        (base / "smaps_rollup").write_text(smaps)
    return tmp


def test_a_process_from_a_fake_proc(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path)
    assert sample(4242, 12345, proc) == ProcessSample(
        cpu_seconds=300 / TICK, rss_bytes=1000 * PAGE, pss_bytes=2048 * 1024, open_fds=3,
        threads=7)


def test_a_comm_with_spaces_and_parentheses(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, stat=stat_line(comm="a ) (b) c", threads=2))
    reading = sample(4242, None, proc)
    assert reading is not None and reading.threads == 2


@pytest.mark.parametrize("stat, started", [
    (stat_line(started=999), 12345),  # the pid was reused
    (stat_line(state="Z"), 12345),  # a zombie
    (stat_line(state="X"), None),
    (b"4242 no parenthesis", None),
    (b"4242 (short) S 1 2\n", None),
    (b"4242 (bad) S " + b"x " * 50, None),
])
def test_gone_or_unreadable_processes_are_none(tmp_path: Path, stat: bytes,
                                              started: int | None) -> None:
    assert sample(4242, started, fake_proc(tmp_path, stat=stat)) is None


def test_a_missing_process_is_none(tmp_path: Path) -> None:
    assert sample(4242, None, tmp_path) is None


def test_no_smaps_rollup_leaves_pss_unknown(tmp_path: Path) -> None:
    reading = sample(4242, None, fake_proc(tmp_path, smaps=None))
    assert reading is not None and reading.pss_bytes is None and reading.rss_bytes > 0


@pytest.mark.parametrize("text, pss", [
    ("Rss: 1 kB\nPss: 10 kB\n", 10240),
    ("Pss_Anon: 3 kB\nPss: 4 kB\n", 4096),
    ("Pss:\n", None),
    ("Pss: lots kB\n", None),
    ("", None),
])
def test_parse_pss(text: str, pss: int | None) -> None:
    assert parse_pss(text) == pss


def test_parse_stat_numbers_fields_from_three() -> None:
    fields = parse_stat(b"1 (x) R 7 8\n")
    assert fields == {3: "R", 4: "7", 5: "8"}


def test_this_process_for_real() -> None:
    reading = sample(os.getpid(), start_time(os.getpid()))
    assert reading is not None
    assert reading.rss_bytes > 1 << 20 and reading.open_fds >= 3 and reading.threads >= 1
    assert reading.cpu_seconds >= 0


# --- the guest's side (agent.sysstats) ----------------------------------------------------

MEMINFO = "MemTotal:        2014512 kB\nMemFree:         1801234 kB\n" \
          "MemAvailable:    1900000 kB\nBuffers:            1234 kB\n"


def test_meminfo_in_bytes() -> None:
    assert sysstats.parse_meminfo(MEMINFO) == {
        "mem_total_bytes": 2014512 * 1024, "mem_free_bytes": 1801234 * 1024,
        "mem_available_bytes": 1900000 * 1024}


@pytest.mark.parametrize("text", ["", "MemTotal:\n", "MemTotal: x kB\n", "garbage"])
def test_meminfo_without_numbers_reports_nothing(text: str) -> None:
    assert sysstats.parse_meminfo(text) == {}


def test_loadavg_and_uptime() -> None:
    assert sysstats.parse_loadavg("0.50 0.25 0.12 1/80 321\n") == {
        "load1": 0.5, "load5": 0.25, "load15": 0.12}
    assert sysstats.parse_uptime("42.50 80.00\n") == {"uptime_seconds": 42.5}


@pytest.mark.parametrize("text", ["", "0.5", "a b c", "0.5 0.2 x"])
def test_broken_loadavg_reports_nothing(text: str) -> None:
    assert sysstats.parse_loadavg(text) == {}


@pytest.mark.parametrize("text", ["", "x 1.0", "\n"])
def test_broken_uptime_reports_nothing(text: str) -> None:
    assert sysstats.parse_uptime(text) == {}


def test_guest_stats_from_a_fake_proc(tmp_path: Path) -> None:
    (tmp_path / "meminfo").write_text(MEMINFO)
    (tmp_path / "loadavg").write_text("1.00 2.00 3.00 1/80 321\n")
    (tmp_path / "uptime").write_text("7.25 1.00\n")
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "status").write_text("Name:\tkata-agent\nVmRSS:\t   31416 kB\n")
    stats = sysstats.guest_stats(tmp_path)
    assert stats["agent_rss_bytes"] == 31416 * 1024
    assert stats["mem_total_bytes"] == 2014512 * 1024 and stats["load15"] == 3.0
    assert stats["uptime_seconds"] == 7.25


def test_guest_stats_of_this_host_fit_the_response() -> None:
    from protocols import agent_pb2 as pb

    response = pb.GuestStatsResponse(**sysstats.guest_stats())  # type: ignore[arg-type]
    assert 0 < response.mem_available_bytes <= response.mem_total_bytes
    assert response.uptime_seconds > 0
    assert 0 < response.agent_rss_bytes < response.mem_total_bytes


@pytest.mark.parametrize("text", ["", "VmRSS:\t12 MB\n", "VmRSS:\tx kB\n", "VmRSS:\n"])
def test_broken_status_reports_no_rss(text: str) -> None:
    assert sysstats.parse_status_rss(text) == {}
