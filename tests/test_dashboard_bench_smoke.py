"""bench/dashboard.py runs end to end on a small store: data through the product's writers, Datasette as
`projectionist dashboard` starts it, every canned query page and chart request, and every chart of the dashboard home, timed and PASSing.

The 1M-row run (`python bench/dashboard.py`) is the real measurement; this only proves it works.
"""

from __future__ import annotations

import yaml

from support import REPO, run_bench


def test_dashboard_bench_smoke():
    # The home's 300 ms is for the 1M-row run; here a busy machine must not make it flaky.
    report = run_bench("dashboard.py", "--rows", "3000", "--runs", "1", "--home-limit-ms", "1000", timeout=120)
    assert report["ok"] and report["failed"] == 0
    assert report["tables"]["usage_events"] == 3000 and report["tables"]["usage_hourly"] > 0
    assert report["tables"]["plays"] > 0
    queries = yaml.safe_load((REPO / "datasette_metadata.yml").read_text())["databases"]["projectionist"]["queries"]
    names = {r["name"] for r in report["results"]}
    for query in queries:
        assert {f"{query} (page)", f"{query} (chart data)"} <= names
    home = yaml.safe_load((REPO / "datasette_metadata.yml").read_text())["plugins"]["datasette-dashboards"]["home"]
    timed = {r["path"].split("sql=")[1].split("&")[0] for r in report["results"] if r.get("home") and "sql=" in r["path"]}
    assert timed == {chart["query"] for chart in home["charts"].values()}  # every chart of the home
    live = [r for r in report["results"] if r["path"].endswith("sql=live_activity&_shape=objects")]
    assert [r["rows"] for r in live] == [3]  # the generated plays still open: timed with rows to find
    assert {"home dashboard (page)", "home dashboard (page, filtered)"} <= names
    for result in report["results"]:
        assert result["status"] == 200 and result["result"] == "PASS", result
        assert result["median_s"] < 1.0
