"""bench/dashboard.py runs end to end on a small store: data through the product's writers, Datasette as
`projectionist dashboard` starts it, every canned query page and chart request timed and PASSing.

The 1M-row run (`python bench/dashboard.py`) is the real measurement; this only proves it works.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def test_dashboard_bench_smoke():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "dashboard.py"), "--rows", "3000", "--runs", "1",
                           "--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    report = json.loads(proc.stdout)
    assert report["ok"] and report["failed"] == 0
    assert report["tables"]["usage_events"] == 3000 and report["tables"]["usage_hourly"] > 0
    assert report["tables"]["plays"] > 0
    queries = yaml.safe_load((REPO / "datasette_metadata.yml").read_text())["databases"]["projectionist"]["queries"]
    names = {r["name"] for r in report["results"]}
    for query in queries:
        assert {f"{query} (page)", f"{query} (chart data)"} <= names
    for result in report["results"]:
        assert result["status"] == 200 and result["result"] == "PASS", result
        assert result["median_s"] < 1.0
