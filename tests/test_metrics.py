"""`/metrics` after scripted traffic: the proxy's ops listener (real embedded proxy, a local TMDB
upstream, the shipped rules with a tight TMDB limit), the image metrics (fake image upstreams),
and the control plane's (its own thread and home)."""

from __future__ import annotations

import asyncio
import os

import aiohttp
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from support import FAKE_TO_RULES, free_port, wait_for, write_test_rules
from test_control_schemathesis import ControlThread
from test_ratelimit import UNCACHED, Proxy, Upstream, limit_rules

from projectionist.config import Config
from projectionist.metrics import exposition
from proxy_addons.runner import EmbeddedProxy


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(values: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in values.items() if n == name and want <= ls)


@pytest.fixture
async def upstream():
    async with Upstream() as up:
        yield up


async def test_proxy_metrics_after_scripted_traffic(tmp_path, upstream):
    rules = write_test_rules(tmp_path / "rules.yaml", free_port(), limit_rules())
    port = free_port()
    config = Config(home=tmp_path, rules_path=rules, datasette_metadata=tmp_path / "unused.yml", proxy_port=0,
                    upstream_overrides=tuple(f"{n}={upstream.url}" for n in ("tmdb", "plex", "plextv")),
                    proxy_metrics_port=port)
    proxy = await EmbeddedProxy(config).start()
    metrics_url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as session:
        async def scrape() -> dict:
            async with session.get(metrics_url + "/metrics") as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
                return samples(await r.text())

        try:
            async def health():
                async with session.get(metrics_url + "/health") as r:
                    return r.status, await r.json()
            status, body = await health()
            for _ in range(50):  # the listener starts with the proxy; readiness follows the listeners
                if status == 200:
                    break
                await asyncio.sleep(0.1)
                status, body = await health()
            assert status == 200 and body["status"] == "ok" and body["listeners"] >= 2
            before = await scrape()
            client = Proxy(proxy, session)
            paths = [f"/3/movie/{i}" for i in range(12)]  # distinct misses over a 2/s, burst 4 limit
            first = await asyncio.gather(*(client.tmdb(p) for p in paths))
            ok = [p for p, (s, *_) in zip(paths, first) if s == 200]
            refused = len(paths) - len(ok)
            await asyncio.gather(*(client.tmdb(p) for p in ok * 2))  # hits
            await upstream.stop()
            dead, *_ = await client.tmdb(UNCACHED + "?dead=1")
            after = await scrape()
        finally:
            await proxy.stop()

    def delta(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("projectionist_requests_total", upstream="tmdb", route="tmdb.details", status="200",
                 cache="miss") == len(ok)
    assert delta("projectionist_requests_total", upstream="tmdb", route="tmdb.details", cache="hit") == 2 * len(ok)
    assert refused and delta("projectionist_requests_total", upstream="tmdb", status="429") >= refused
    assert delta("projectionist_request_duration_seconds_count", upstream="tmdb") >= 12 + 2 * len(ok)
    assert delta("projectionist_ratelimit_events_total", outcome="queued") >= 1
    assert delta("projectionist_ratelimit_events_total", outcome="refused") == refused
    assert delta("projectionist_ratelimit_wait_seconds_count") >= 1
    assert total(after, "projectionist_ratelimit_waiting") == 0
    assert dead in (502, 504) and delta("projectionist_upstream_errors_total", upstream="tmdb") >= 1
    assert total(after, "projectionist_cache_entries", bucket="api", layer="memory") >= len(ok)
    assert total(after, "projectionist_cache_bytes", bucket="api", layer="disk") > 0
    assert delta("projectionist_usage_rows_written_total") >= 0
    # The listener is loopback only and stops with the proxy.
    with pytest.raises(requests.ConnectionError):
        requests.get(metrics_url + "/metrics", timeout=2)


async def test_image_encodes_and_bytes_saved_are_counted(tmp_path):
    from test_images_proxy import image_proxy

    before = samples(exposition()[0].decode())
    async with image_proxy(tmp_path) as env:
        assert (await env.tmdb("/t/p/w342/metrics-poster.jpg"))[0] == 200
        assert (await env.tmdb("/t/p/w342/metrics-poster.jpg"))[0] == 200
    after = samples(exposition()[0].decode())
    assert total(after, "projectionist_image_encodes_total", outcome="ok") - \
        total(before, "projectionist_image_encodes_total", outcome="ok") == 1
    assert total(after, "projectionist_image_saved_bytes_total", bucket="images") > \
        total(before, "projectionist_image_saved_bytes_total", bucket="images")


def test_control_plane_metrics_only_for_local_scrapers_or_the_token(tmp_path, fakes, monkeypatch):
    monkeypatch.setenv("PROJECTIONIST_METRICS_TOKEN", "metrics-scrape-token-0123")
    overrides = tuple(f"{FAKE_TO_RULES[n]}={u}" for n, u in fakes.urls.items() if n in FAKE_TO_RULES)
    with ControlThread(tmp_path, overrides=overrides) as control:
        assert requests.get(control.url + "/health", timeout=10).status_code == 200
        assert requests.get(control.url + "/api/jobs", timeout=10).status_code == 401

        def scraped():
            r = requests.get(control.url + "/metrics", timeout=10)
            assert r.status_code == 200
            values = samples(r.text)
            return values if total(values, "projectionist_job_runs_total", job="retention", status="ok") else None
        values = wait_for(scraped, 20, what="the start-up retention run in the metrics")
        assert total(values, "projectionist_control_requests_total", route="/health", status="200") >= 1
        assert total(values, "projectionist_control_requests_total", route="/api/jobs", status="401") >= 1
        assert total(values, "projectionist_job_duration_seconds_count", job="retention") >= 1
        relayed = requests.get(control.url + "/metrics", headers={"X-Forwarded-For": "203.0.113.9"}, timeout=10)
        assert relayed.status_code == 404 and "projectionist_" not in relayed.text
        with_token = requests.get(control.url + "/metrics", timeout=10, headers={
            "X-Forwarded-For": "203.0.113.9", "Authorization": "Bearer metrics-scrape-token-0123"})
        assert with_token.status_code == 200 and "projectionist_job_runs_total" in with_token.text
        wrong = requests.get(control.url + "/metrics", timeout=10, headers={
            "X-Forwarded-For": "203.0.113.9", "Authorization": "Bearer nope"})
        assert wrong.status_code == 404
    assert os.environ["PROJECTIONIST_METRICS_TOKEN"]


def test_the_grafana_dashboard_charts_metrics_that_exist():
    import json
    import re

    from support import REPO

    import proxy_addons.runner  # noqa: F401  (every module that defines metrics)
    import control.app  # noqa: F401

    dashboard = json.loads((REPO / "deploy" / "grafana" / "projectionist.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    charted = {name for e in exprs for name in re.findall(r"projectionist_\w+", e)}
    exposed = {name for name, _ in samples(exposition()[0].decode())} | {
        f.name for f in text_string_to_metric_families(exposition()[0].decode())}
    missing = {n for n in charted if n not in exposed and n.removesuffix("_bucket") not in exposed
               and n.removesuffix("_total") not in exposed}
    assert len(charted) >= 12 and not missing, missing
