"""The proxy's access to the token vault and to the server's own credentials.

Vault calls are blocking (SQLite, crypto), so they run on one worker thread of their own; hooks
await them and the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from mitmproxy import ctx, exceptions

from projectionist.config import ServerCredentials
from projectionist.redact import RedactSecrets
from projectionist.vault import SecretBox, Vault, VaultKeyError

T = TypeVar("T")


class CredentialStore:
    def __init__(self) -> None:
        self.vault: Vault | None = None
        self.server = ServerCredentials.from_env()
        for secret in (self.server.tmdb_api_key, self.server.tmdb_read_token,
                       self.server.trakt_client_id, self.server.trakt_client_secret):
            RedactSecrets.register(secret)  # logs never show them, even by mistake
        self._executor: ThreadPoolExecutor | None = None

    def load(self, loader) -> None:
        loader.add_option("projectionist_home", str, "",
                          "Projectionist's state directory (holds secret.key unless PROJECTIONIST_SECRET_KEY is set).")

    def running(self) -> None:
        # Opened here, not in configure(): the database path is another addon's option.
        if self.vault is not None:
            return
        if not ctx.options.projectionist_home or not ctx.options.projectionist_db:
            raise exceptions.OptionsError("projectionist_home and projectionist_db must be set")
        try:
            box = SecretBox.load(Path(ctx.options.projectionist_home).expanduser())
        except VaultKeyError as exc:
            raise exceptions.OptionsError(str(exc)) from None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vault")
        # The connection is created on the worker thread that will use it.
        self.vault = self._executor.submit(Vault, Path(ctx.options.projectionist_db).expanduser(), box).result()

    async def signatures(self, message: str) -> list[str]:
        """HMAC-SHA256 of `message` under each of the vault's keys, newest first: the proxies of
        one deployment share the key, and sign what they ask each other with it (peer_bodies)."""
        if self.vault is None:
            return []
        return await self.call(self.vault.box.lookup_hashes, message)

    async def call(self, fn: Callable[..., T], *args) -> T:
        """Run a blocking vault method (e.g. `store.vault.resolve`) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def done(self) -> None:
        if self._executor is not None:
            if self.vault is not None:
                self._executor.submit(self.vault.close).result()
            self._executor.shutdown(wait=True)
            self._executor, self.vault = None, None
