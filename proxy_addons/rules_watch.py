"""Loads rules.yaml and hot-reloads it when it changes on disk.

The directory is watched, not the file: editors save by writing a temporary file and renaming it
over the old one, which a watch on the file itself would lose. A valid edit replaces the rules in
one assignment, so a request in flight keeps the match it was given; an invalid edit keeps the
previous rules and logs every problem with its line number.

Nothing stops the watch: a file that cannot be read or decoded (permissions, a directory, a
deleted file, random bytes) is logged in one line and the running rules stay. A file is applied
only once two reads `SETTLE` seconds apart are equal, so a file caught half-written (which may
well be valid YAML, with half the routes) is not.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import watchfiles
from mitmproxy import ctx, exceptions

from projectionist.rules import Rules, RulesError, decode_rules, load_rules, parse_rules, read_rules_bytes
from projectionist.shared_tier import redis_url

log = logging.getLogger(__name__)

SETTLE = 0.15  # seconds between the two reads that must agree
MAX_SETTLE_ROUNDS = 40  # a file still changing after ~6 s is read again at its next change


class RulesWatcher:
    def __init__(self) -> None:
        self.rules: Rules | None = None
        self.path: Path | None = None
        self.reloads = 0
        self._subscribers: list[Callable[[Rules], None]] = []
        self._task: asyncio.Task | None = None

    def subscribe(self, callback: Callable[[Rules], None]) -> None:
        """Call `callback(rules)` after every successful reload (not the initial load)."""
        self._subscribers.append(callback)

    def load(self, loader) -> None:
        loader.add_option("projectionist_rules", str, "", "Path of Projectionist's rules.yaml.")
        loader.add_option("projectionist_rules_watch", bool, True, "Reload rules.yaml when it changes.")

    def configure(self, updated) -> None:
        if "projectionist_rules" not in updated:
            return
        if not ctx.options.projectionist_rules:
            raise exceptions.OptionsError("projectionist_rules must name a rules.yaml file")
        path = Path(ctx.options.projectionist_rules).expanduser().resolve()
        try:
            self.rules = load_rules(path)
        except RulesError as exc:
            raise exceptions.OptionsError(f"invalid rules file:\n{exc}") from None
        self.path = path
        if self._task is not None:  # a new path while running: watch that one instead
            self._task.cancel()
            self._task = asyncio.get_running_loop().create_task(self._watch(path))

    @property
    def redis_url(self) -> str | None:
        """The shared tier's Redis (PROJECTIONIST_REDIS_URL wins over proxy.redis_url); None: none."""
        return redis_url(self.rules.model.proxy.redis_url if self.rules is not None else None)

    def running(self) -> None:
        # Synchronous on purpose: an async running() breaks mitmproxy's script hot reload.
        if self.path is not None and ctx.options.projectionist_rules_watch and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch(self.path))

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _watch(self, path: Path) -> None:
        def concerns_rules_file(_change: watchfiles.Change, changed: str) -> bool:
            return Path(changed).name == path.name

        while True:  # the watch itself must not end (e.g. its directory removed and made again)
            try:
                # Small debounce: a valid edit must apply well within a second.
                async for _ in watchfiles.awatch(path.parent, watch_filter=concerns_rules_file,
                                                 debounce=100, step=20, recursive=False):
                    await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("watching %s failed (%s); keeping the current rules, retrying in 1 s",
                          path, _cause(exc))
            await asyncio.sleep(1)

    async def reload(self) -> bool:
        """Re-read the file once it has settled; keep the current rules if it cannot be read or
        is invalid."""
        assert self.path is not None
        try:
            rules = await self._read_settled(self.path)
        except asyncio.CancelledError:
            raise
        except RulesError as exc:
            log.error("rules.yaml not reloaded; keeping the previous rules: %s", "; ".join(map(str, exc.problems)))
            return False
        except Exception as exc:  # anything else must not end the watch either
            log.error("rules.yaml not reloaded; keeping the previous rules: %s: %s", self.path, _cause(exc))
            return False
        if rules is None:
            log.warning("rules.yaml not reloaded: %s is still changing; waiting for its next change", self.path)
            return False
        self.rules = rules
        self.reloads += 1
        log.info("rules reloaded from %s (%d upstreams, %d routes)",
                 self.path, len(rules.upstreams), len(rules.routes))
        for callback in self._subscribers:
            try:
                callback(rules)
            except Exception:
                log.exception("applying reloaded rules failed")
        return True

    async def _read_settled(self, path: Path) -> Rules | None:
        """The rules of `path` once two reads SETTLE apart agree (None if it never settles)."""
        data = await asyncio.to_thread(read_rules_bytes, path)
        for _ in range(MAX_SETTLE_ROUNDS):
            await asyncio.sleep(SETTLE)
            again = await asyncio.to_thread(read_rules_bytes, path)
            if again == data:
                # What `check-rules` runs: decoding, YAML, schema and cross-references.
                return await asyncio.to_thread(parse_rules, decode_rules(data, str(path)), str(path))
            data = again
        return None


def _cause(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
