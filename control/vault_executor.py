"""One worker thread that owns the vault and its SQLite connection.

Vault calls are blocking (SQLite, Fernet); every identity, session and settings operation of the
control plane runs here, one at a time, so the event loop never waits on the disk and the
connection is only ever used by the thread that created it. Operations are plain functions taking
the `Vault` first: `await app[VAULT].run(create_session, user_id, ...)`.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

from projectionist.vault import SecretBox, Vault

P = ParamSpec("P")
T = TypeVar("T")


class VaultExecutor:
    def __init__(self, db_path: Path, home: Path) -> None:
        self.db_path = db_path
        self.home = home
        self._executor: ThreadPoolExecutor | None = None
        self.vault: Vault | None = None

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="control-vault")
        loop = asyncio.get_running_loop()
        # Created on the worker: the key file may be created (I/O) and the connection is the worker's.
        self.vault = await loop.run_in_executor(
            self._executor, lambda: Vault(self.db_path, SecretBox.load(self.home)))

    async def run(self, fn: Callable[Concatenate[Vault, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        if self._executor is None or self.vault is None:
            raise RuntimeError("the vault executor is not running")
        vault = self.vault
        return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: fn(vault, *args, **kwargs))

    async def close(self) -> None:
        if self._executor is None:
            return
        if self.vault is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.vault.close)
        self._executor.shutdown(wait=True)
        self._executor, self.vault = None, None


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT on an autocommit connection (the store's connections are).
    Inside another one it joins it: the outermost block commits or rolls back everything."""
    if conn.in_transaction:
        yield conn
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
