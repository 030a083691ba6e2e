"""Prometheus metrics of every Projectionist process (prometheus-client, its default registry).

The hot path only increments counters and observes histograms (no I/O, no allocation beyond a
label look-up); gauges of the caches are read when scraped, from sources the caches register.
Exposed at `GET /metrics`: on the control plane (loopback clients, or a bearer token), and on
the proxy's own ops listener (`PROJECTIONIST_PROXY_METRICS_PORT`, bound to loopback), never on a
listener the player uses. Names follow the Prometheus conventions (`_total`, `_seconds`, `_bytes`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# --- the proxy -----------------------------------------------------------------------------------
REQUESTS = Counter("projectionist_requests", "Requests to an upstream of rules.yaml, as answered",
                   ["upstream", "route", "status", "cache"])
REQUEST_SECONDS = Histogram("projectionist_request_duration_seconds", "Time to the answer's last byte",
                            ["upstream", "cache"], buckets=_LATENCY_BUCKETS)
UPSTREAM_ERRORS = Counter("projectionist_upstream_errors", "Upstreams that failed: no answer (error) or too late "
                          "(timeout)", ["upstream", "kind"])
RATELIMIT_EVENTS = Counter("projectionist_ratelimit_events", "Requests queued, refused or answered stale by a "
                           "rate limit", ["rule", "outcome"])
RATELIMIT_WAIT_SECONDS = Histogram("projectionist_ratelimit_wait_seconds", "How long queued requests waited",
                                   ["rule"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10))
RATELIMIT_WAITING = Gauge("projectionist_ratelimit_waiting", "Requests waiting for a rate-limit slot now")
CACHE_EVICTIONS = Counter("projectionist_cache_evictions", "Entries evicted to stay under a size cap", ["bucket"])
IMAGE_ENCODES = Counter("projectionist_image_encodes", "Images decoded and re-encoded or resized by the pool",
                        ["outcome"])
IMAGE_BYTES_SAVED = Counter("projectionist_image_saved_bytes", "Bytes re-encoding and resizing saved (source "
                            "minus sent)", ["bucket"])
USAGE_ROWS_WRITTEN = Counter("projectionist_usage_rows_written", "Usage rows committed to SQLite")
ANONYMOUS_REQUESTS = Counter("projectionist_anonymous_requests", "TMDB/Trakt requests without a user's surrogate, "
                             "by what proxy.anonymous did with them", ["upstream", "outcome"])
USAGE_ROWS_DROPPED = Counter("projectionist_usage_rows_dropped", "Usage rows that could not be written")

# --- the control plane ---------------------------------------------------------------------------
CONTROL_REQUESTS = Counter("projectionist_control_requests", "Requests to the control plane", ["route", "status"])
JOB_RUNS = Counter("projectionist_job_runs", "Runs of scheduled jobs, by how they ended", ["job", "status"])
JOB_SECONDS = Histogram("projectionist_job_duration_seconds", "Duration of job runs", ["job"],
                        buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600))


class RequestMetrics:
    """The per-request series of the proxy, with each label set's child looked up once:
    `labels()` builds a key and takes a lock on every call, the child's `inc()` only its own."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, str, str, str], object] = {}
        self._latency: dict[tuple[str, str], object] = {}

    def record(self, upstream: str, route: str, status: str, cache: str, seconds: float) -> None:
        key = (upstream, route, status, cache)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = REQUESTS.labels(*key)
        counter.inc()
        latency = self._latency.get((upstream, cache))
        if latency is None:
            latency = self._latency[(upstream, cache)] = REQUEST_SECONDS.labels(upstream, cache)
        latency.observe(seconds)


# --- cache sizes, read at scrape time -------------------------------------------------------------

CacheSource = Callable[[], tuple[str, str, int, int]]  # -> (bucket, layer, entries, bytes)


class _CacheSizes(Collector):
    def __init__(self) -> None:
        self._sources: list[CacheSource] = []
        self._lock = threading.Lock()

    def add(self, source: CacheSource) -> None:
        with self._lock:
            self._sources.append(source)

    def remove(self, source: CacheSource) -> None:
        with self._lock:
            if source in self._sources:
                self._sources.remove(source)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        entries = GaugeMetricFamily("projectionist_cache_entries", "Entries held by a cache", labels=["bucket", "layer"])
        size = GaugeMetricFamily("projectionist_cache_bytes", "Bytes held by a cache", labels=["bucket", "layer"])
        with self._lock:
            sources = list(self._sources)
        for source in sources:
            try:
                bucket, layer, count, nbytes = source()
            except Exception as exc:  # a cache being closed: skip it this scrape
                log.debug("cache size source failed: %s", exc)
                continue
            entries.add_metric([bucket, layer], count)
            size.add_metric([bucket, layer], nbytes)
        yield entries
        yield size


CACHE_SIZES = _CacheSizes()
REGISTRY.register(CACHE_SIZES)


def add_cache_source(source: CacheSource) -> None:
    CACHE_SIZES.add(source)


def remove_cache_source(source: CacheSource) -> None:
    CACHE_SIZES.remove(source)


def exposition() -> tuple[bytes, str]:
    """The text format of every metric of this process, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
