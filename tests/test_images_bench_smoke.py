"""bench/images.py runs end to end: every answer is right (misses then hits, WebP, no errors).

No timing thresholds (the p99 target is printed by the benchmark, not asserted here: this box is
shared and noisy); the WebP saving is deterministic and is asserted.
"""

from __future__ import annotations

from support import run_bench


def test_images_bench_smoke():
    report = run_bench("images.py", "--images", "50", "--duration", "0.5", "--warmup", "0.2", "--rounds", "1",
                       "--connections", "4", timeout=180)
    assert report["ok"] and report["problems"] == [], report["problems"]
    miss = report["miss"]
    assert miss["images"] == 50 and miss["content_types"] == {"image/webp": 50}
    assert miss["second_pass_outcomes"] == ["hit"] and miss["webp_only_saved_fraction"] >= 0.25
    assert report["verdicts"]["webp_saves_25pct"]
    assert report["hit"]["classes"] == {"hit": report["hit"]["completed"]} and report["hit"]["rps"] > 0
    assert report["reencode_load"]["requests"] > 0 and report["reencode_load"]["outcomes"] == ["miss"]
    for kind in ("idle", "loaded", "control"):
        assert all(r["errors"] == 0 and r["count"] > 0 for r in report["api_rounds"][kind]), kind
    assert report["exit_codes"] == {"proxy": 0}
