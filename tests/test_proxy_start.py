"""The embedded proxy's start-up: a listener that cannot bind fails the start at once, with its
cause, and leaves no other listener bound behind it."""

from __future__ import annotations

import errno
import socket
import time

import pytest

import support
from support import free_port, start_embedded_proxy, write_test_rules


def bindable(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def test_a_taken_reverse_port_fails_the_start_at_once_and_releases_the_rest(tmp_path):
    from projectionist.config import Config
    from proxy_addons.runner import EmbeddedProxy

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        proxy_port = free_port()
        write_test_rules(tmp_path / "rules.yaml", taken)
        config = Config(home=tmp_path, rules_path=tmp_path / "rules.yaml", datasette_metadata=tmp_path / "unused.yml",
                        proxy_port=proxy_port)
        started = time.monotonic()
        with pytest.raises(OSError) as raised:
            await EmbeddedProxy(config).start(timeout=60)
        assert raised.value.errno == errno.EADDRINUSE
        assert time.monotonic() - started < 30, "the start waited for its timeout instead of failing"
        assert bindable(proxy_port), "the explicit proxy's listener stayed bound after the failed start"


async def test_the_test_helper_chooses_another_port_when_its_first_is_taken(tmp_path, monkeypatch):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        choices = iter([taken])
        monkeypatch.setattr(support, "free_port", lambda: next(choices, None) or free_port())
        proxy = await start_embedded_proxy(tmp_path, [])
        try:
            reverse = [port for mode, port in proxy.ports.items() if mode != "regular"]
            assert reverse and taken not in reverse
        finally:
            await proxy.stop()
