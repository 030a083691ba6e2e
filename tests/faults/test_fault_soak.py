"""Issue 16 cases 6 and 7 through bench/soak.py (a short run): unique misses through the real
proxy process, RSS, fds, DB and cache sizes sampled, then a scripted kill -9 and the rows lost."""

from __future__ import annotations

from support import run_bench


def test_soak_short_run_reports_and_loses_at_most_100_ms():
    report = run_bench("soak.py", "--duration", "12", "--interval", "2", timeout=180)
    assert report["errors"] == 0 and report["requests"] > 100
    assert report["lost_window_s"] <= 0.1 and report["rows"] >= report["acked"] - report["rows_lost"]
    fds = [s["fds"] for s in report["samples"][1:]]
    assert max(fds) - min(fds) <= 5, fds  # no descriptor leak per request
    assert all({"rss_mb", "fds", "db_mb", "cache_dir_mb"} <= set(s) for s in report["samples"])
