"""Shared fixtures. `stack` is the whole system as `projectionist run` starts it, on free ports,
against the fake upstreams; see tests/support.py."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# tests/support.py, and the benchmarks' process helpers (bench/_stack.py), which tests share
sys.path[:0] = [str(TESTS), str(TESTS.parent / "bench")]

from _stack import RedisServer  # noqa: E402
from support import FakesThread, make_stack  # noqa: E402


@pytest.fixture(scope="session")
def fakes():
    with FakesThread() as running:
        yield running


@pytest.fixture(scope="session")
def stack(fakes, tmp_path_factory):
    stack = make_stack(tmp_path_factory.mktemp("stack"), fakes).start()
    try:
        yield stack
    finally:
        code = stack.stop()
        assert code == 0, f"`projectionist run` exited with {code}:\n{stack.logs()}"


@pytest.fixture
def vault(stack):
    """The stack's token vault, opened as the services open it."""
    from projectionist.vault import SecretBox, Vault

    v = Vault(stack.db_path, SecretBox.load(stack.home, create=False))
    yield v
    v.close()


@pytest.fixture
def clean_fakes(fakes, stack):
    """The fakes with no requests recorded, behind an empty response cache: what a test then sees
    at the fakes is what its own requests caused."""
    stack.flush_cache()
    fakes.clear()
    return fakes


@pytest.fixture(scope="module")
def redis_server():
    """A throw-away redis-server on a free port for one test module (skipped without one)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    with RedisServer() as server:
        yield server
