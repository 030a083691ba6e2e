"""Fake upstreams for tests and the offline demo: real aiohttp servers that speak the wire formats of
Plex Media Server, plex.tv (+ discover.provider.plex.tv), TMDB v3, image.tmdb.org and Trakt.

    async with FakeUpstreams() as fakes:
        fakes.urls["plex"], fakes.requests["tmdb"], fakes.tmdb.mode_429 = True, fakes.set_down("tmdb", True)

Credentials the fakes accept are constants in `fake_upstreams.data`.
"""

from .common import RecordedRequest
from .server import NAMES, FakeUpstreams

__all__ = ["FakeUpstreams", "RecordedRequest", "NAMES"]
