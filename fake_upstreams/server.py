"""`FakeUpstreams`: every fake upstream on 127.0.0.1, started and stopped together."""

from __future__ import annotations

from types import TracebackType

from aiohttp import web

from . import images, plex, plex_second, plextv, tmdb, trakt
from .common import FakeState, RecordedRequest

NAMES = ("plex", "plextv", "tmdb", "tmdb_images", "trakt")


class FakeUpstreams:
    """Start all fakes (plex first, so plex.tv's resources can point at its URL).

    Attributes: `urls[name]`, `requests[name]` (the live lists of RecordedRequest), and the per-fake state
    objects `plex`, `plextv`, `tmdb`, `tmdb_images`, `trakt` (test hooks and switches live there).
    `ports` pins chosen fakes to fixed ports; the rest get free ones. `latency` delays every answer
    of the named fakes by that many seconds (a remote server; `state.latency` changes it later).
    """

    def __init__(self, host: str = "127.0.0.1", ports: dict[str, int] | None = None,
                 latency: dict[str, float] | None = None) -> None:
        unknown = (set(ports or {}) | set(latency or {})) - set(NAMES)
        if unknown:
            raise ValueError(f"unknown fake(s): {sorted(unknown)}")
        self.host = host
        self.ports = dict(ports or {})
        self.plex = plex.PlexState()
        self.plextv = plextv.PlexTvState()
        self.tmdb = tmdb.TmdbState()
        self.tmdb_images = images.ImagesState()
        self.trakt = trakt.TraktState()
        # The owner's second Plex server: outside `urls`/`requests` (which name the upstreams a
        # stack routes), at `second_plex_url`; plex.tv lists it while `plextv.list_second_server`.
        self.second_plex = plex_second.SecondPlexState()
        self.second_plex_url = ""
        self.urls: dict[str, str] = {}
        self._runners: list[web.AppRunner] = []
        for name, seconds in (latency or {}).items():  # e.g. {"plex": 0.08, "tmdb": 0.15}
            self.states[name].latency = seconds

    @property
    def states(self) -> dict[str, FakeState]:
        return {name: getattr(self, name) for name in NAMES}

    @property
    def requests(self) -> dict[str, list[RecordedRequest]]:
        return {name: state.requests for name, state in self.states.items()}

    def clear(self) -> None:
        """Forget every recorded request (state such as pins, watchlists and sessions is kept)."""
        for state in (*self.states.values(), self.second_plex):
            state.clear()

    def set_down(self, name: str, down: bool = True) -> None:
        """Make a fake drop every connection without answering (see `common.build_app`)."""
        self.states[name].down = down

    async def _serve(self, name: str, app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, self.host, self.ports.get(name, 0))
        await site.start()
        port = runner.addresses[-1][1]
        self.urls[name] = f"http://{self.host}:{port}"
        return self.urls[name]

    async def start(self) -> "FakeUpstreams":
        try:
            self.plextv.pms_url = await self._serve("plex", plex.create_app(self.plex))
            await self._serve("plextv", plextv.create_app(self.plextv))
            await self._serve("tmdb", tmdb.create_app(self.tmdb))
            await self._serve("tmdb_images", images.create_app(self.tmdb_images))
            await self._serve("trakt", trakt.create_app(self.trakt))
            self.second_plex_url = await self._serve("plex_second", plex_second.create_app(self.second_plex))
            del self.urls["plex_second"]
            self.plextv.second_pms_url = self.second_plex_url
        except BaseException:
            await self.stop()
            raise
        return self

    async def stop(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()

    async def __aenter__(self) -> "FakeUpstreams":
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
