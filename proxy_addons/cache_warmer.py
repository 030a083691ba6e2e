"""The cache warmer: fetches what the player's Home and details pages will ask for, before anyone asks.

Run by the control plane's `cache-warm` job (control/warming.py: a flush request with target
"warm", carried out here because the proxy owns the caches and the credentials), it requests
through this proxy's own explicit listener, over HTTPS with the proxy's CA, exactly the URLs the
player sends: the TMDB lists of `warming.tmdb_lists`, the details-page requests of the first
`warming.details` titles of each, and their posters at `warming.poster_size`. Each request carries
`X-Projectionist-Warm` (stripped by the response cache before anything leaves): its misses are
background work that takes an upstream slot only when one is free, so warming never goes ahead
of a person: refused (429), it waits the Retry-After and tries again, and stops after many
refusals. usage_events records its requests with listener "warm". TMDB data is shared, so one warm run serves every user.

After a sign-in (the plex.tv resources answer the player receives, surrogates in it), the same
is done for that account's Plex server: `warming.plex_paths` (Home, each section's first page,
genres, collections), the thumbnails they list and the details pages (`plex_item_paths`) of
their first `details` items, with the server token the player was just handed, in that
account's partition. The proxy remembers those sign-ins (the most recent `REMEMBERED` accounts, in
memory): when the library-sync job sees the server's library change, a warm with trigger
"library-change" fetches each remembered account's Plex lists afresh (`Cache-Control: no-cache`:
the cache refetches and stores), so the next Home shows the new items from the cache.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections import OrderedDict
from pathlib import Path

import aiohttp
from mitmproxy import ctx, http

from projectionist.store import WARM_AFTER_LIBRARY_CHANGE

from . import flowinfo
from .response_cache import WARM_HEADER, ResponseCache
from .rules_watch import RulesWatcher

log = logging.getLogger(__name__)

TMDB_API = "https://api.themoviedb.org"
TMDB_IMAGES = "https://image.tmdb.org"
# What Chromium sends for an <img>: the image cache keys on the format negotiated from it.
IMAGE_ACCEPT = "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"
CONCURRENCY = 4  # a few at once: a person's requests queue behind none of them
MAX_YIELD = 5.0  # seconds waited after one refusal at most
# Per run; then it stops (the next scheduled run carries on). A refusal is the warmer yielding, not
# failing: background work only takes a slot free right now, so at a few workers on a 2/s key most
# attempts are refused even with nobody else about (about one a second per worker).
MAX_REFUSALS = 1000
REMEMBERED = 100  # signed-in accounts whose Plex lists a library change refreshes


class CacheWarmer:
    def __init__(self, watcher: RulesWatcher, cache: ResponseCache) -> None:
        self.watcher = watcher
        cache.warmer = self
        self._running: asyncio.Task | None = None
        self._plex_warming: set[tuple[int, str]] = set()
        # (user id, server URI) -> the server surrogate that account's player was handed
        self._signed_in: OrderedDict[tuple[int, str], str] = OrderedDict()

    async def response(self, flow: http.HTTPFlow) -> None:
        """After a sign-in (the player's plex.tv resources answer, surrogates in it by now): warm
        that account's Plex Home and library, with the server token the player was handed."""
        info = flowinfo.get(flow)
        rules = self.watcher.rules
        if (info is None or info.route != "plextv.resources" or info.user_id is None or rules is None
                or not rules.model.warming.enabled or not rules.model.warming.plex_paths
                or flow.response is None or flow.response.status_code != 200):
            return
        try:
            servers = [r for r in json.loads(flow.response.content or b"[]")
                       if isinstance(r, dict) and "server" in (r.get("provides") or "") and r.get("accessToken")]
        except ValueError:
            return
        if not servers or not servers[0].get("connections"):
            return
        base, token = servers[0]["connections"][0].get("uri"), servers[0]["accessToken"]
        if base:
            self._signed_in[(info.user_id, base)] = token
            self._signed_in.move_to_end((info.user_id, base))
            while len(self._signed_in) > REMEMBERED:
                self._signed_in.popitem(last=False)
        if base and (info.user_id, base) not in self._plex_warming:
            self._plex_warming.add((info.user_id, base))
            task = asyncio.get_running_loop().create_task(self._warm_plex(base.rstrip("/"), token))
            task.add_done_callback(lambda _: self._plex_warming.discard((info.user_id, base)))

    async def _warm_plex(self, base: str, token: str, refresh: bool = False) -> int:
        """The account's Plex Home and library; `refresh`: the lists are fetched afresh."""
        settings = self.watcher.rules.model.warming
        proxy = self._proxy_url()
        if proxy is None:
            return 0
        run = _Run(settings.max_requests)
        plex_proxy = None if base.startswith("http://127.0.0.1") or base.startswith("http://localhost") else proxy
        ca = Path(ctx.options.confdir).expanduser() / "mitmproxy-ca-cert.pem"
        context = ssl.create_default_context(cafile=str(ca))

        def url(path: str) -> str:
            return f"{base}{path}{'&' if '?' in path else '?'}X-Plex-Token={token}"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, limit=CONCURRENCY)) as session:
            sections = await run.get(session, plex_proxy, url("/library/sections"), fresh=refresh)
            keys = [d.get("key") for d in ((sections or {}).get("MediaContainer") or {}).get("Directory") or []]
            paths = [p for p in settings.plex_paths if "{section}" not in p]
            paths += [p.replace("{section}", str(k)) for p in settings.plex_paths if "{section}" in p for k in keys if k]
            answers = await asyncio.gather(*(run.get(session, plex_proxy, url(p), fresh=refresh) for p in paths))
            listed = [[m for m in (a.get("MediaContainer") or {}).get("Metadata") or [] if isinstance(m, dict)]
                      for a in answers if a]
            thumbs = {m["thumb"] for items in listed for m in items if m.get("thumb")}
            await asyncio.gather(*(run.get(session, plex_proxy, url(t)) for t in sorted(thumbs)))
            keys = {str(m["ratingKey"]) for items in listed for m in items[:settings.details] if m.get("ratingKey")}
            await asyncio.gather(*(run.get(session, plex_proxy, url(p.replace("{rk}", k)))
                                   for k in sorted(keys) for p in settings.plex_item_paths))
        log.info("cache warm (%s): %d Plex requests, %d from the server",
                 WARM_AFTER_LIBRARY_CHANGE if refresh else "sign-in", run.requests, run.fetched)
        return run.requests

    async def _refresh_signed_in(self) -> int:
        """After a library change: every remembered account's Plex lists, one account at a time."""
        made = 0
        for (_, base), token in list(self._signed_in.items()):
            made += await self._warm_plex(base.rstrip("/"), token, refresh=True)
        return made

    def _proxy_url(self) -> str | None:
        ps = ctx.master.addons.get("proxyserver")
        for server in ps.servers:
            if server.mode.type_name == "regular" and server.listen_addrs:
                return f"http://127.0.0.1:{server.listen_addrs[0][1]}"
        return None

    async def warm(self, trigger: str) -> int:
        """One run (one at a time): the number of requests made."""
        if self._running is not None and not self._running.done():
            return await asyncio.shield(self._running)
        work = self._refresh_signed_in() if trigger == WARM_AFTER_LIBRARY_CHANGE else self._warm(trigger)
        self._running = asyncio.get_running_loop().create_task(work)
        return await asyncio.shield(self._running)

    async def _warm(self, trigger: str) -> int:
        rules = self.watcher.rules
        proxy = self._proxy_url()
        if rules is None or proxy is None or not rules.model.warming.enabled:
            return 0
        settings = rules.model.warming
        ca = Path(ctx.options.confdir).expanduser() / "mitmproxy-ca-cert.pem"
        context = ssl.create_default_context(cafile=str(ca))
        run = _Run(settings.max_requests)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, limit=CONCURRENCY)) as session:
            async def get(url: str) -> dict | None:
                return await run.get(session, proxy, url)

            lists = await asyncio.gather(*(get(TMDB_API + path) for path in settings.tmdb_lists))
            titles = [(item.get("media_type") or _media_of(path), item)
                      for path, answer in zip(settings.tmdb_lists, lists) if answer
                      for item in (answer.get("results") or [])[:max(settings.details, 20)]]
            if settings.poster_size:
                posters = {item["poster_path"] for _, item in titles if item.get("poster_path")}
                await asyncio.gather(*(get(f"{TMDB_IMAGES}/t/p/{settings.poster_size}{p}") for p in sorted(posters)))
            per_list = [(path, (answer or {}).get("results") or []) for path, answer in zip(settings.tmdb_lists, lists)]
            detailed = {(item.get("media_type") or _media_of(path), item.get("id"))
                        for path, results in per_list for item in results[:settings.details]}
            for media, tmdb_id in sorted(detailed, key=str):
                if media in ("movie", "tv") and tmdb_id and not run.stopped:
                    await asyncio.gather(*(get(f"{TMDB_API}/3/{media}/{tmdb_id}{part}")
                                           for part in settings.detail_parts))
        log.info("cache warm (%s): %d requests, %d from the upstream, %s", trigger, run.requests, run.fetched,
                 "stopped by a rate limit" if run.stopped else "done")
        return run.requests


class _Run:
    """One warm run's requests: bounded in number and in refusals."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.requests = self.fetched = self.refusals = self.urls = 0
        self.stopped = False

    async def get(self, session: aiohttp.ClientSession, proxy: str | None, url: str, fresh: bool = False
                  ) -> dict | None:
        if self.stopped or self.urls >= self.budget:
            return None
        image = "/t/p/" in url or "/thumb/" in url or "/art/" in url
        headers = {WARM_HEADER: "1", "Accept": IMAGE_ACCEPT if image else "application/json"}
        if fresh:  # RFC 9111: the cache fetches anew (and stores the answer)
            headers["Cache-Control"] = "no-cache"
        if "themoviedb" in url:
            headers["Authorization"] = "Bearer projectionist-warmer"  # any placeholder: the proxy injects its key
        self.urls += 1  # the budget is in URLs: a refusal is a yield, tried again
        while not self.stopped:
            self.requests += 1  # every one sent (a usage row each)
            try:
                async with session.get(url, proxy=proxy, headers=headers,
                                       timeout=aiohttp.ClientTimeout(total=30)) as r:
                    body = await r.read()
                    if r.status == 429:  # no free slot: yield to people for as long as the limiter says
                        self.refusals += 1
                        if self.refusals > MAX_REFUSALS:
                            self.stopped = True  # the budget stays tight: the next run goes on
                            return None
                        await asyncio.sleep(min(MAX_YIELD, float(r.headers.get("Retry-After") or 1)))
                        continue
                    if "hit" not in (r.headers.get("Cache-Status") or ""):
                        self.fetched += 1
                    if r.status != 200 or "json" not in r.headers.get("Content-Type", ""):
                        return None
                    return json.loads(body)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.info("cache warm: %s failed (%s)", url.split("?")[0], type(exc).__name__)
                return None
        return None


def _media_of(path: str) -> str:
    return "tv" if "/tv" in path else "movie"
