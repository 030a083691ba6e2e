"""Child processes end with their parent, however the parent ends (`kill -9` included), as a
systemd unit's processes do: no image worker or service is left behind by a crash or a failed
start (issue 16 case 5)."""

from __future__ import annotations

import os
import signal
import threading
import time

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent (thread) ends. Linux only."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig)) == 0
    except (OSError, AttributeError):
        return False


def die_with(ancestor_pid: int, sig: int = signal.SIGKILL) -> None:
    """End this process when its parent or `ancestor_pid` ends. The parent-death signal covers the
    direct parent (for a pool worker, the forkserver); a watchdog thread covers `ancestor_pid` (the
    proxy, a grandparent), and a parent that died before the signal was armed."""
    set_parent_death_signal(sig)

    def alive() -> bool:
        try:
            os.kill(ancestor_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True

    def watch() -> None:
        while alive():
            time.sleep(0.5)
        os._exit(1)

    if not alive():
        os._exit(1)
    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def child_preexec(sig: int = signal.SIGTERM):
    """A `preexec_fn` for subprocess.Popen: the child gets `sig` when this process ends, and
    exits at once if this process is already gone."""
    parent = os.getpid()

    def preexec() -> None:
        set_parent_death_signal(sig)
        if os.getppid() != parent:
            os._exit(1)

    return preexec
