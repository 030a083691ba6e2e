"""rules.yaml as the control plane sees it: re-read when the file changes, like the proxy does.

The PAC file and the setup page must follow the rules the proxy runs, including after a reload;
a stat per request (in a thread) is cheaper than a watcher for a page asked for once in a while.
An invalid edit keeps the previous rules, as the proxy's watcher does.
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

    def _load_if_changed(self) -> Rules:
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp or self._rules is None:
            try:
                self._rules = load_rules(self.path)
            except RulesError as exc:
                if self._rules is None:
                    raise
                log.error("rules.yaml not reloaded; keeping the previous rules:\n%s", exc)
            self._stamp = stamp
        return self._rules

    async def get(self) -> Rules:
        async with self._lock:
            return await asyncio.to_thread(self._load_if_changed)
