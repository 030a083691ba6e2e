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
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import logging
from collections import deque
from collections.abc import Callable, Iterator

from mitmproxy import addonmanager, exceptions, flow, hooks
from mitmproxy.proxy import commands, events, mode_servers
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
        self.layer = _InlineHooks(self.layer, self)
        await super().handle_client()


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
        while pending:
            for command in self.layer.handle_event(pending.popleft()):
                if not isinstance(command, commands.StartHook):
                    yield command
                elif self._run_hook(command) and command.blocking:
                    pending.append(events.HookCompleted(command))

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


def _log_hook_error(handler, hook: commands.StartHook, exc: BaseException) -> None:
    # The flow still resumes: a connection left paused on a failed hook would hang its client.
    handler.log(f"hook {hook.name} failed: {exc!r}", logging.ERROR, exc_info=(type(exc), exc, exc.__traceback__))


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
