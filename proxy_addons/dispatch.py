"""Event dispatch for the embedded Master: hook lists worked out once, hooks completed inline.

Two costs dominate a cache hit inside mitmproxy, and both are dispatch, not work:

1. mitmproxy's AddonManager finds the hooks of every event by walking every addon (and its children)
with getattr, and enters a context manager per addon, on every event of every flow; with our
addons on top of mitmproxy's that walk cost ~180 µs of the ~720 µs a cache hit took (profiled by
bench/cache.py). This manager keeps the same semantics (chain order, children, sync and async
hooks, errors logged per hook, AddonHalt stops the event) but caches the bound hooks per event
name, and forgets them whenever an addon is added or removed.

2. Every hook a layer yields (a hit has four: requestheaders, request, responseheaders, response)
becomes a named, tracked task, and its HookCompleted waits for the connection's event lock, so
each hook costs a task, a lock wait and an event-loop round trip even when every handler returns
without suspending (~30 µs of the ~420 µs a hit took). `InlineHookConnectionHandler` starts each hook as an eager task; when the task
is done at once (the common case) the layer is resumed right there, inside the same
`server_event`; when a handler really waits (an upstream fetch, a Redis call) the hook completes
later exactly as mitmproxy's own `hook_task` would. Order and semantics are unchanged: the layer
is paused on the hook until it completes either way.

3. Parsing the request line of an absolute-form request (an explicit-proxy client's `GET
http://host/path HTTP/1.1`) checks and IDNA-decodes the authority and then parses the whole URL
once more (mitmproxy's own "TODO: we can probably get rid of this check"): 10% of a hit. The
parse is a pure function of the line's bytes, so `memoize_request_lines` remembers it for the
lines seen most recently (a player asks for the same targets over and over); a bad line still
raises, every time.

4. Sending: a response leaves the layers as two `SendData` commands (its head, then its body), and
each one becomes a `send()` system call that wakes the client; `_InlineHooks` joins consecutive
`SendData` commands for the same TCP connection into one (bytes on a stream; order with every other
command kept). The system calls were 11% of a hit's CPU.

5. Every HTTP stream forks its connection's `Context`, and mitmproxy's `Context.fork` first builds
a `Server` (a dataclass, a uuid4 from os.urandom) only to replace it with the parent's: 6% of a
hit. `LeanForkContext.fork` copies the same four attributes without building it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import inspect
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator

from mitmproxy import addonmanager, exceptions, flow, hooks
from mitmproxy import version as mitmproxy_version
from mitmproxy.net.http.http1 import read as http1_read
from mitmproxy.proxy import commands, context, events, mode_servers
from mitmproxy.utils import asyncio_utils

log = logging.getLogger(__name__)


@functools.cache
def _field_names(hook_type: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(hook_type))


def hook_args(hook: hooks.Hook) -> list:
    """`Hook.args()` without `dataclasses.fields()` on every call (hooks are dataclasses)."""
    return [getattr(hook, name) for name in _field_names(type(hook))]


class CachedDispatchAddonManager(addonmanager.AddonManager):
    def __init__(self, master) -> None:
        super().__init__(master)
        self._hooks: dict[str, list[Callable]] = {}

    def register(self, addon):
        self._hooks.clear()
        return super().register(addon)

    def add(self, *addons):
        self._hooks.clear()
        super().add(*addons)

    def remove(self, addon):
        self._hooks.clear()
        super().remove(addon)

    def _hooks_for(self, event: hooks.Hook) -> list[Callable]:
        found = self._hooks.get(event.name)
        if found is None:
            found = [func for addon in self.chain for _, func in self._iter_hooks(addon, event)]
            self._hooks[event.name] = found
        return found

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        # As AddonManager.handle_lifecycle, with the hook's fields read once, not thrice.
        args = hook_args(event)
        await self._trigger(self._hooks_for(event), args)
        if isinstance(args[0], flow.Flow):
            update = self._hooks.get("update")
            if update is None:
                update = self._hooks_for(hooks.UpdateHook([]))
            if update:
                await self._trigger(update, ([args[0]],))

    async def trigger_event(self, event: hooks.Hook) -> None:
        await self._trigger(self._hooks_for(event), hook_args(event))

    async def _trigger(self, funcs: list[Callable], args) -> None:
        for func in funcs:
            try:
                result = func(*args)
                if result is not None and inspect.isawaitable(result):
                    await result
            except (exceptions.AddonHalt, exceptions.OptionsError) as exc:
                if isinstance(exc, exceptions.AddonHalt):
                    return
                raise
            except Exception as exc:  # as mitmproxy's safecall: an addon's error is logged, not fatal
                log.error("Addon error: %s", exc, exc_info=True)


class InlineHookConnectionHandler(mode_servers.ProxyConnectionHandler):
    """mitmproxy's connection handler, with hooks that finish at once completed inline (see above)."""

    async def handle_client(self) -> None:
        self.layer.context.__class__ = LeanForkContext  # the forks inherit the class
        self.layer = _InlineHooks(self.layer, self)
        await super().handle_client()


class LeanForkContext(context.Context):
    """mitmproxy's Context, whose fork() does not build a Server only to drop it (see above)."""

    def fork(self) -> context.Context:
        forked = object.__new__(type(self))
        forked.client = self.client
        forked.options = self.options
        forked.server = self.server
        forked.layers = self.layers.copy()
        return forked


class _InlineHooks:
    """Wraps a connection's top layer: runs the hooks it yields, resumes it when they are done."""

    def __init__(self, layer, handler: InlineHookConnectionHandler) -> None:
        self.layer = layer
        self.handler = handler
        self.context = layer.context

    def __getattr__(self, name: str):
        return getattr(self.layer, name)

    def __repr__(self) -> str:
        return repr(self.layer)

    def handle_event(self, event: events.Event) -> Iterator[commands.Command]:
        pending = deque([event])
        unsent: list[commands.SendData] = []  # consecutive SendData for one TCP connection (see above)
        while pending:
            for command in self.layer.handle_event(pending.popleft()):
                if isinstance(command, commands.SendData) and command.connection.transport_protocol == "tcp":
                    if unsent and unsent[0].connection is not command.connection:
                        yield _joined(unsent)
                    unsent.append(command)
                    continue
                if unsent:
                    yield _joined(unsent)
                if not isinstance(command, commands.StartHook):
                    yield command
                elif self._run_hook(command) and command.blocking:
                    pending.append(events.HookCompleted(command))
        if unsent:
            yield _joined(unsent)

    def _run_hook(self, hook: commands.StartHook) -> bool:
        """Start the hook's handlers eagerly; True if they are already done, else the hook completes
        in the background. As ProxyConnectionHandler.handle_hook, whose timeout-watchdog disarm
        only matters while a handler waits, so only the waiting part pays for it."""
        (data,) = hook_args(hook)
        task = asyncio.Task(self.handler.master.addons.handle_lifecycle(hook), loop=asyncio.get_running_loop(),
                            eager_start=True)
        if task.done() and not (isinstance(data, flow.Flow) and data.intercepted):
            if not task.cancelled() and (exc := task.exception()) is not None:
                _log_hook_error(self.handler, hook, exc)
            return True
        asyncio_utils.create_task(self._complete_later(task, hook, data), name=f"handle_hook({hook.name})",
                                  keep_ref=True, client=self.handler.client.peername)
        return False

    async def _complete_later(self, task: asyncio.Task, hook: commands.StartHook, data) -> None:
        with self.handler.timeout_watchdog.disarm():
            try:
                await task
            except Exception as exc:  # addon errors are logged by the manager; this is mitmproxy's own
                _log_hook_error(self.handler, hook, exc)
            if isinstance(data, flow.Flow):
                await data.wait_for_resume()
        if hook.blocking:
            await self.handler.server_event(events.HookCompleted(hook))


def _joined(unsent: list[commands.SendData]) -> commands.SendData:
    """The list's SendData commands (all for one connection) as one; the list is emptied."""
    joined = unsent[0] if len(unsent) == 1 else commands.SendData(unsent[0].connection,
                                                                   b"".join(c.data for c in unsent))
    unsent.clear()
    return joined


def _log_hook_error(handler, hook: commands.StartHook, exc: BaseException) -> None:
    # The flow still resumes: a connection left paused on a failed hook would hang its client.
    handler.log(f"hook {hook.name} failed: {exc!r}", logging.ERROR, exc_info=(type(exc), exc, exc.__traceback__))


# --- the guard: the private internals above were written against, checked at start -----------

STOCK_DISPATCH_ENV = "PROJECTIONIST_STOCK_DISPATCH"

# sha256 (first 16 hex digits) of the source of every mitmproxy internal this module replaces or
# mirrors, as in mitmproxy 12.3.1 (pyproject pins the range). Another source means other
# semantics may hide behind the same names: the stock dispatch is used instead.
EXPECTED_INTERNALS = {
    "addonmanager.AddonManager.handle_lifecycle": "38c97e792d1db5b7",
    "addonmanager.AddonManager.trigger_event": "b763c59bc4992e33",
    "addonmanager.AddonManager._iter_hooks": "350b419ab7284091",
    "addonmanager.AddonManager.register": "01ddcca314eebbd3",
    "addonmanager.AddonManager.add": "6c26295c4f0f4eb9",
    "addonmanager.AddonManager.remove": "2e93aab2204a39f6",
    "mode_servers.ProxyConnectionHandler.handle_hook": "9f8b52fd798203c9",
    "server.ConnectionHandler.hook_task": "9ac7970160526268",
    "server.ConnectionHandler.server_event": "a2b42657ebe8bf6d",
    "server.ConnectionHandler.handle_client": "01f1b7cc991c4711",
    "server.TimeoutWatchdog.disarm": "99af75f94eed883a",
    "context.Context.__init__": "7ee4176662abb9c7",
    "context.Context.fork": "cad9374a0689f10a",
    "read._read_request_line": "f212df4b4badf61b",
    "read.read_request_head": "d7a54f7078584448",
}


def _source_digest(dotted: str) -> str | None:
    from mitmproxy.proxy import server

    module_name, *path = dotted.split(".")
    target = {"addonmanager": addonmanager, "mode_servers": mode_servers, "server": server,
              "read": http1_read, "context": context}[module_name]
    try:
        for name in path:
            target = getattr(target, name)
        target = inspect.unwrap(target)
        return hashlib.sha256(inspect.getsource(target).encode()).hexdigest()[:16]
    except (AttributeError, OSError, TypeError):
        return None


def unexpected_internals() -> list[str]:
    """The internals whose source is not the one this module was written against (once installed,
    InlineHookConnectionHandler inherits handle_hook, so the check reads the same source)."""
    return [name for name, digest in EXPECTED_INTERNALS.items() if _source_digest(name) != digest]


def choose_dispatch(master) -> bool:
    """Install the cached, inline dispatch on `master` when the internals are the expected ones
    (True); else keep mitmproxy's stock dispatch, with one warning (False). The environment's
    PROJECTIONIST_STOCK_DISPATCH=1 forces the stock dispatch (CI runs the end-to-end tests so)."""
    if os.environ.get(STOCK_DISPATCH_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        log.info("%s is set: mitmproxy's stock hook dispatch", STOCK_DISPATCH_ENV)
        restore_stock_hooks()
        return False
    changed = unexpected_internals()
    if changed:
        log.warning("mitmproxy %s changed internals the fast dispatch replaces (%s); using mitmproxy's stock "
                    "dispatch (correct, slower)", mitmproxy_version.VERSION, ", ".join(changed))
        restore_stock_hooks()
        return False
    master.addons = CachedDispatchAddonManager(master)  # before any addon is added
    memoize_request_lines()
    return install_inline_hooks()


def restore_stock_hooks() -> None:
    if mode_servers.ProxyConnectionHandler is InlineHookConnectionHandler:
        mode_servers.ProxyConnectionHandler = InlineHookConnectionHandler.__base__
    http1_read._read_request_line = inspect.unwrap(http1_read._read_request_line)


REQUEST_LINES_REMEMBERED = 2048


def memoize_request_lines() -> None:
    """mitmproxy's request-line parse, remembered per line (process-wide; idempotent).
    `read_request_head` calls it through the module global, so replacing that is enough."""
    parse = http1_read._read_request_line
    if not hasattr(parse, "cache_info"):
        http1_read._read_request_line = functools.lru_cache(maxsize=REQUEST_LINES_REMEMBERED)(parse)


def install_inline_hooks() -> bool:
    """Make mitmproxy's listeners use InlineHookConnectionHandler (process-wide; idempotent).

    mitmproxy builds connection handlers from the module global `mode_servers.ProxyConnectionHandler`
    and has no option for another class; if a future version moves it, the stock handler stays.
    """
    current = getattr(mode_servers, "ProxyConnectionHandler", None)
    if current is InlineHookConnectionHandler:
        return True
    if current is not InlineHookConnectionHandler.__base__:
        log.warning("mitmproxy's connection handler is not the expected class; hooks are dispatched as tasks")
        return False
    mode_servers.ProxyConnectionHandler = InlineHookConnectionHandler
    return True
