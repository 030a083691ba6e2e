"""Disk writes that may fail (a full disk, a read-only directory or file) without failing anything
else: the write is skipped, reads go on, one warning a minute at most, and writes are tried again
every few seconds, so recovery is automatic (issue 16 case 4)."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class DiskWrites:
    def __init__(self, what: str, retry_after: float = 5.0, warn_every: float = 60.0) -> None:
        self.what = what
        self.retry_after = retry_after
        self.warn_every = warn_every
        self.skipped = 0
        self.failing = False
        self._paused_until = 0.0
        self._warned_at = -warn_every
        self._lock = threading.Lock()

    def attempt(self, write: Callable[[], object]) -> bool:
        """Run `write()`; False if it failed or was skipped while the disk is failing."""
        now = time.monotonic()
        if now < self._paused_until:
            self.skipped += 1
            return False
        try:
            write()
        except (OSError, sqlite3.Error) as exc:
            with self._lock:
                self.skipped += 1
                self.failing = True
                self._paused_until = now + self.retry_after
                if now - self._warned_at >= self.warn_every:
                    self._warned_at = now
                    log.warning("%s: writes skipped, reads still served (%s: %s); retrying every %g s",
                                self.what, type(exc).__name__, exc, self.retry_after)
            return False
        if self.failing:
            self.failing = False
            log.warning("%s: writes work again (%d skipped)", self.what, self.skipped)
        return True
