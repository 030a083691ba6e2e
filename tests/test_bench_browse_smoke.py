"""bench/browse.py end to end: Chromium through the proxy, two sessions and the direct baseline.

Asserted here is what does not depend on this (shared, noisy) machine's speed: every page
loaded without a failed request, session 2 (fresh profile, fresh sign-in of the same account)
finds what session 1 stored, no Projectionist-made 429, and every miss has a reason.
"""

from __future__ import annotations

import pytest

from support import run_bench

pytestmark = [pytest.mark.e2e, pytest.mark.browser]


def test_browse_bench_smoke():
    report = run_bench("browse.py", "--think", "0.5", "--pause", "0.5", timeout=400)
    for name in ("session1", "session2", "direct"):
        assert report[name]["failures"] == [], (name, report[name]["failures"])
    first, second = report["session1"], report["session2"]
    assert first["cacheable"] >= 50 and second["cacheable"] == first["cacheable"]
    assert second["hit_ratio_cacheable"] >= 0.95, second["misses_by_reason"]
    assert first["projectionist_429"] == second["projectionist_429"] == 0
    assert "none" not in first["misses_by_reason"] and "none" not in second["not_cacheable_by_reason"]
    assert all(report["home_ms"][k] for k in ("cold", "warm", "direct"))
