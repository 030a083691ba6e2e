"""bench/scale.py runs end to end with --strict: proxies of 1, 2 and 4 workers on one redis-server,
one upstream fetch for 200 identical cold requests over 4 workers, every URL proxy A fetched a hit
through proxy B, a usage row per response (committed by the control plane from the event stream),
no failed request. The req/s figures are printed by the benchmark, not asserted."""

from __future__ import annotations

import shutil

import pytest
from support import run_bench


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed (.ci/run installs it)")
def test_scale_bench_smoke():
    report = run_bench("scale.py", "--duration", "0.5", "--warmup", "0.2", "--connections", "4", "--strict",
                       timeout=240)
    assert report["ok"] and report["failed"] == 0 and report["exit_codes"] == [0] * 7
    assert report["cold"]["upstream_fetches"] == 1 and sum(report["cold"]["outcomes"].values()) == 200
    assert report["spread"]["hit_ratio_b"] == 1.0
    assert report["usage"]["rows"] == report["usage"]["responses"] > 200 and report["usage"]["through_stream"]
    assert {int(k) for k in report["hits"]} == {1, 2, 4}
    assert all(figures["hit_ratio"] == 1.0 and figures["rps"] > 0 for figures in report["hits"].values())
