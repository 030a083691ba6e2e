"""bench/cache.py runs end to end: every mode answers without errors, hits are hits, the replay runs.

No timing thresholds (the ratio and the hit-rate targets are printed by the benchmark, not asserted
here): this box is shared and noisy.
"""

from __future__ import annotations

from support import run_bench


def test_cache_bench_smoke():
    report = run_bench("cache.py", "--duration", "1", "--warmup", "0.2", "--connections", "4", timeout=120)
    assert report["ok"] and report["problems"] == [], report["problems"]

    modes = report["modes"]
    assert set(modes) == {"direct", "mitmdump", "passthrough", "hit"}
    for name, mode in modes.items():
        assert mode["rps"] > 0 and mode["count"] > 0, (name, mode)
        assert mode["errors"] == 0 and mode["failed"] == 0, (name, mode)
        assert mode["statuses"] == {"200": mode["completed"]}, (name, mode)
        assert mode["p50_ms"] is not None and mode["p99_ms"] is not None, (name, mode)

    # Every response of the hit mode, warm-up included, said `Cache-Status: ...; hit`, and the
    # upstream was not asked; the pass-through mode was never answered by the cache.
    hit = modes["hit"]
    assert hit["classes"] == {"hit": hit["completed"]}, hit["classes"]
    assert hit["primed_with"].startswith("Projectionist") and "fwd=uri-miss" in hit["primed_with"]
    # Counted by the upstream itself: its process's CPU over a window is not zero even when idle.
    assert hit["upstream_requests"] == 0, hit["upstream_requests"]
    assert "hit" not in modes["passthrough"]["classes"], modes["passthrough"]["classes"]

    ratios = report["ratios"]
    assert ratios["hit_vs_mitmdump"] > 0 and ratios["hit_vs_projectionist_passthrough"] > 0
    # The figure is the median of three alternating rounds, each a ratio of its own pair.
    assert len(report["rounds"]) == 3 and ratios["hit_vs_mitmdump"] == sorted(report["rounds"])[1]
    assert len(modes["hit"]["rounds_rps"]) == len(modes["mitmdump"]["rounds_rps"]) == 3
    assert set(report["verdicts"]) == {"hit_vs_mitmdump", "replay_hit_rate", "replay_hit_rate_cacheable"}

    replay = report["replay"]
    assert replay["ran"], replay
    first, second = replay["first"], replay["second"]
    assert first["requests"] == second["requests"] == replay["steps"] > 0
    assert first["errors"] == 0 and second["errors"] == 0, (first, second)
    assert {"home", "library", "details", "search", "player"} <= set(second["by_phase"])
    assert second["hits"] > first["hits"], (first, second)
    assert 0 < second["cacheable_requests"] < second["requests"]  # player start is not cacheable
    assert second["by_phase"]["player"]["hits"] == 0
    assert replay["usage_hits_match"], replay["usage_rows_cache"]

    assert set(report["exit_codes"].values()) == {0}, report["exit_codes"]
