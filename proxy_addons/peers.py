"""What one proxy process learns that the others need, shared through Redis (with proxy.redis_url).

The workers of one proxy (launcher/workers.py) and the proxies of other machines each see only
the requests that reach them, but a player's next request may reach another:

- **Plex servers' connections** (plex.tv `resources`, binding.PlexConnections): the router lets a
  request through to a `*.plex.direct` name only when it is a known connection of a server. What a
  process learns it writes to a Redis hash; a process that does not know a name looks there before
  it refuses (so the hash is read only on such misses, not on every request).
- **Transcode sessions** (plex_tokens): a segment request carries no token; the process that saw
  the session start shares the token it used, encrypted with the vault's key (tokens at rest are
  encrypted; Redis holds no secret in clear), with the destination it may go to.

Keys carry the database's id (users and vault entries are per database). Every call fails soft
(SharedTier.call): Redis down, each process knows what it saw itself, as without Redis.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

from mitmproxy import ctx

from projectionist.shared_tier import SharedTier
from projectionist.store import database_id

from .binding import Address
from .credentials import CredentialStore
from .rules_watch import RulesWatcher

log = logging.getLogger(__name__)

PREFIX = "projectionist:peers:"
CONNECTIONS_TTL = 7 * 86400  # s: a server's connections unseen in any resources answer this long are gone
SESSION_TTL = 6 * 3600  # s: a transcode session's token, kept for its segments
REFRESH_MIN_INTERVAL = 0.05  # s: unknown names in a burst share one read of the hash
WRITES_IN_FLIGHT_MAX = 64


class Peers:
    def __init__(self, watcher: RulesWatcher, router, store: CredentialStore) -> None:
        self.watcher = watcher
        self.router = router
        self.store = store
        self.tier: SharedTier | None = None
        self._database = ""
        self._refreshing: asyncio.Task | None = None
        self._refreshed_at = -REFRESH_MIN_INTERVAL
        self._writes: set[asyncio.Task] = set()

    @property
    def enabled(self) -> bool:
        return self.tier is not None and self.tier.available()

    def running(self) -> None:
        if self.tier is not None or not (url := self.watcher.redis_url):
            return
        self._database = database_id(Path(ctx.options.projectionist_db).expanduser())
        self.tier = SharedTier(url, 0, self._database, prefix=PREFIX)
        self.router.plex_connections.on_change = self._connections_changed

    async def done(self) -> None:
        if self.tier is not None:
            self.router.plex_connections.on_change = None
            if self._writes:
                await asyncio.wait(list(self._writes), timeout=2)
            await self.tier.close()
            self.tier = None

    def _name(self, what: str) -> str:
        return f"{PREFIX}{self._database}:{what}"

    # --- Plex connections ------------------------------------------------------------------------

    def _connections_changed(self, server_id: str, addresses: set[Address] | None) -> None:
        if self.tier is None or len(self._writes) >= WRITES_IN_FLIGHT_MAX:
            return
        name, client = self._name("plex-connections"), self.tier.client

        async def write() -> None:
            if addresses is None:
                await client.hdel(name, server_id)
                return
            async with client.pipeline(transaction=False) as pipe:
                pipe.hset(name, server_id, json.dumps(sorted(addresses)))
                pipe.expire(name, CONNECTIONS_TTL)
                await pipe.execute()
        task = asyncio.get_running_loop().create_task(self.tier.call(write))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def written(self) -> None:
        """Until what this process learned is in Redis (a resources answer waits for it, so that
        the player's next request finds it whichever process it reaches)."""
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=1)

    async def refresh_connections(self) -> None:
        """Every server's connections as the processes have learned them (one read for a burst)."""
        if not self.enabled:
            return
        if self._refreshing is None or self._refreshing.done():
            if time.monotonic() - self._refreshed_at < REFRESH_MIN_INTERVAL:
                return
            self._refreshing = asyncio.get_running_loop().create_task(self._read_connections())
        await asyncio.shield(self._refreshing)

    async def _read_connections(self) -> None:
        known = await self.tier.call(lambda: self.tier.client.hgetall(self._name("plex-connections"))) or {}
        self._refreshed_at = time.monotonic()
        for server_id, data in known.items():
            try:
                addresses = [(host, int(port)) for host, port in json.loads(data)]
            except (ValueError, TypeError):
                continue
            self.router.plex_connections.absorb(server_id.decode(), addresses)

    # --- transcode sessions ----------------------------------------------------------------------

    async def share_session(self, sid: str, real: str, user_id: int | None, destination: Address) -> None:
        if not self.enabled or self.store.vault is None:
            return
        sealed = await self.store.call(self.store.vault.box.encrypt, real)
        data = json.dumps({"token": sealed.decode(), "user": user_id, "to": list(destination)})
        await self.tier.call(lambda: self.tier.client.set(self._name(f"transcode:{sid}"), data, ex=SESSION_TTL))

    async def session(self, sid: str) -> tuple[str, int | None, Address] | None:
        """(token, user id, destination) of a session another process saw start, or None."""
        if not self.enabled or self.store.vault is None:
            return None
        data = await self.tier.call(lambda: self.tier.client.get(self._name(f"transcode:{sid}")))
        if not data:
            return None
        try:
            found = json.loads(data)
            real = await self.store.call(self.store.vault.box.decrypt, found["token"].encode())
            host, port = found["to"]
            return real, found.get("user"), (str(host), int(port))
        except Exception as exc:  # another key (another machine's vault), damaged: no session
            log.debug("transcode session %s not usable here (%s)", sid[:8], type(exc).__name__)
            return None
