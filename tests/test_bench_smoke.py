"""bench/passthrough.py runs end to end: every mode answers, nothing fails, every proxied request is recorded.

No timing thresholds: this box is shared and noisy; the benchmark prints the numbers.
"""

from __future__ import annotations

from support import run_bench


def test_passthrough_bench_smoke():
    report = run_bench("passthrough.py", "--duration", "1", "--warmup", "0.2", "--connections", "4", timeout=90)

    modes = report["modes"]
    assert set(modes) == {"direct", "reverse", "explicit"}
    for name, mode in modes.items():
        assert mode["rps"] > 0, (name, mode)
        assert mode["count"] > 0, (name, mode)
        assert mode["errors"] == 0 and mode["failed"] == 0, (name, mode)
        assert mode["statuses"] == {"200": mode["completed"]}, (name, mode)

    usage = report["usage"]
    proxied = modes["reverse"]["completed"] + modes["explicit"]["completed"]
    assert usage["proxied_requests"] == proxied
    assert usage["rows"] == proxied, usage
    assert usage["rows_by_listener"] == {"reverse": modes["reverse"]["completed"],
                                         "regular": modes["explicit"]["completed"]}, usage
    assert usage["rows_by_route"] == {"plex.sections": modes["reverse"]["completed"],
                                      "tmdb.details": modes["explicit"]["completed"]}, usage
    assert usage["match"] and report["ok"], report["problems"]
    assert report["proxy_exit_code"] == 0
