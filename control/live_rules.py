"""rules.yaml as the control plane sees it: re-read when the file changes, like the proxy does.

The PAC file and the setup page must follow the rules the proxy runs, including after a reload;
a stat per request (in a thread) is cheaper than a watcher for a page asked for once in a while.
An invalid edit keeps the previous rules, as the proxy's watcher does; with no valid file yet,
`get()` answers None and `problem` says why (the pages say so instead of failing).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from projectionist.rules import Rules, RulesError, load_rules

log = logging.getLogger("control.rules")


class LiveRules:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._rules: Rules | None = None
        self._stamp: tuple[int, int] | None = None
        self._lock = asyncio.Lock()
        self.problem: str | None = None

    def _load_if_changed(self) -> Rules | None:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            self.problem = f"cannot read {self.path}: {exc.strerror}"
            return self._rules
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                self._rules, self.problem = load_rules(self.path), None
            except (RulesError, OSError) as exc:
                self.problem = f"{self.path} is not valid:\n{exc}"
                if self._rules is not None:
                    log.error("rules.yaml not reloaded; keeping the previous rules:\n%s", exc)
            self._stamp = stamp
        return self._rules

    async def get(self) -> Rules | None:
        async with self._lock:
            return await asyncio.to_thread(self._load_if_changed)
