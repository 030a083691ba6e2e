"""The token vault and secrets at rest: real SQLite files, real Fernet crypto, the real CLI."""

from __future__ import annotations

import multiprocessing
import os
import re
import secrets
import sqlite3
import stat
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.fernet import Fernet, InvalidToken

from projectionist import vault as vault_mod
from projectionist.config import REPO_ROOT
from projectionist.vault import (
    KEY_ENV,
    SURROGATE_PREFIX,
    SecretBox,
    Vault,
    VaultKeyError,
    key_file,
    rotate_key,
    upsert_plex_user,
)

SURROGATE_RE = re.compile(r"^pj_[A-Za-z0-9_-]{32,}$")


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def db_path(home) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    return home / "projectionist.db"  # Config.db_path: where the CLI looks


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def key_lines(home: Path) -> list[bytes]:
    return [line for line in key_file(home).read_bytes().splitlines() if line.strip()]


def iso(delta: timedelta) -> str:
    return (datetime.now(UTC) + delta).isoformat(timespec="seconds")


def real_token(label: str) -> str:
    return f"REAL-{label}-{secrets.token_hex(12)}"


def make_users(v: Vault) -> tuple[int, int]:
    return upsert_plex_user(v.conn, "1001", "alice"), upsert_plex_user(v.conn, "1002", "bob")


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != KEY_ENV and not k.startswith("PROJECTIONIST_")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-m", "launcher", *args], env=full_env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)


# --- keys ------------------------------------------------------------------------------------------


def test_key_file_created_0600_on_first_use_and_reused(home):
    assert not key_file(home).exists()
    box = SecretBox.load(home)
    path = key_file(home)
    assert path.exists()
    assert mode(path) == 0o600
    assert len(key_lines(home)) == 1
    Fernet(key_lines(home)[0])  # a valid Fernet key

    token = box.encrypt("hello")
    content = path.read_bytes()
    again = SecretBox.load(home)
    assert path.read_bytes() == content, "the key file must not be rewritten on later use"
    assert again.keys == box.keys
    assert again.decrypt(token) == "hello"
    assert mode(path) == 0o600


def test_no_key_and_create_false_is_a_clear_error(home):
    with pytest.raises(VaultKeyError, match="no key"):
        SecretBox.load(home, create=False)
    assert not key_file(home).exists()


def _create_key_worker(home: str, barrier, results, inbox, idx: int) -> None:
    """One of several processes starting at once: load (creating) the key, encrypt, then decrypt
    what another process encrypted."""
    try:
        barrier.wait(timeout=30)
        box = SecretBox.load(Path(home))
        results.put(("ct", idx, box.encrypt(f"from-{idx}")))
    except Exception as exc:  # report, don't hang the parent
        results.put(("error", idx, f"{type(exc).__name__}: {exc}"))
        return
    job = inbox.get(timeout=60)
    if job is None:
        return
    other_idx, other_ct = job
    try:
        results.put(("pt", idx, (other_idx, box.decrypt(other_ct))))
    except Exception as exc:
        results.put(("error", idx, f"{type(exc).__name__}: {exc}"))




@pytest.mark.parametrize("round_", range(3))
def test_processes_creating_the_key_at_once_share_one_key(tmp_path, round_):
    n = 4
    home = tmp_path / "home"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(n)
    results = ctx.Queue()
    inboxes = [ctx.Queue() for _ in range(n)]
    procs = [ctx.Process(target=_create_key_worker, args=(str(home), barrier, results, inboxes[i], i))
             for i in range(n)]
    for p in procs:
        p.start()
    try:
        cts, load_errors = {}, {}
        for _ in range(n):
            kind, idx, value = results.get(timeout=60)
            if kind == "error":
                load_errors[idx] = value
            else:
                cts[idx] = value
        ok = sorted(cts)
        # each process decrypts what the next one (that loaded a key) encrypted
        pairs = {i: ok[(k + 1) % len(ok)] for k, i in enumerate(ok)} if len(ok) > 1 else {}
        for i in range(n):
            inboxes[i].put((pairs[i], cts[pairs[i]]) if i in pairs else None)
        decrypted = {}
        for _ in pairs:
            kind, idx, value = results.get(timeout=60)
            assert kind == "pt", f"process {idx} could not decrypt another's secret: {value}"
            decrypted[idx] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert decrypted == {i: (j, f"from-{j}") for i, j in pairs.items()}
    assert len(key_lines(home)) == 1, "two processes must never write two different keys"
    assert mode(key_file(home)) == 0o600
    box = SecretBox.load(home)
    assert all(box.decrypt(ct) == f"from-{i}" for i, ct in cts.items())
    assert all(p.exitcode == 0 for p in procs)
    assert not load_errors, load_errors


def test_empty_key_file_is_a_clear_error_not_a_new_key(home):
    """The key file is linked into place fully written, so an empty one is damage: never replaced
    silently (that would orphan every stored secret)."""
    home.mkdir(parents=True)
    key_file(home).write_bytes(b"")
    with pytest.raises(VaultKeyError, match="is empty"):
        SecretBox.load(home)
    assert key_file(home).read_bytes() == b""


def test_env_key_takes_precedence_over_key_file(home, monkeypatch):
    file_box = SecretBox.load(home)
    env_key = Fernet.generate_key()
    monkeypatch.setenv(KEY_ENV, env_key.decode())
    env_box = SecretBox.load(home)
    assert env_box.keys == [env_key]
    token = env_box.encrypt("secret")
    with pytest.raises(VaultKeyError):
        file_box.decrypt(token)
    assert SecretBox([env_key]).decrypt(token) == "secret"


def test_env_key_does_not_create_a_key_file(home, monkeypatch):
    monkeypatch.setenv(KEY_ENV, f" {Fernet.generate_key().decode()} , {Fernet.generate_key().decode()} ")
    box = SecretBox.load(home)
    assert len(box.keys) == 2  # comma-separated, whitespace tolerated
    assert not key_file(home).exists()


@pytest.mark.parametrize("bad", ["not-a-key", "c2hvcnQ=", Fernet.generate_key().decode() + ",garbage-key-value"])
def test_malformed_env_key_is_a_clear_error(home, monkeypatch, bad):
    monkeypatch.setenv(KEY_ENV, bad)
    with pytest.raises(VaultKeyError) as err:
        SecretBox.load(home)
    message = str(err.value)
    assert "malformed" in message and "32 url-safe base64" in message
    for part in bad.split(","):
        assert part not in message, "the error must not echo key material"


def test_malformed_key_file_is_a_clear_error(home):
    home.mkdir(parents=True)
    key_file(home).write_bytes(b"this is not a fernet key\n")
    with pytest.raises(VaultKeyError, match="malformed"):
        SecretBox.load(home)


def test_wrong_key_cannot_decrypt_stored_rows(db_path):
    right, wrong = SecretBox([Fernet.generate_key()]), SecretBox([Fernet.generate_key()])
    v = Vault(db_path, right)
    alice, _ = make_users(v)
    real = real_token("plex")
    s = v.surrogate_for("plex", real, alice)
    v.set_user_credential(alice, "tmdb_api_key", "custom-tmdb-key-123456")
    v.close()

    w = Vault(db_path, wrong)
    try:
        with pytest.raises(VaultKeyError, match="does not decrypt"):
            w.resolve(s)
        with pytest.raises(VaultKeyError):
            w.user_credential(alice, "tmdb_api_key")
        assert w.find_real("plex", real) is None  # the look-up HMAC is keyed: no match, no garbage
    finally:
        w.close()
    v = Vault(db_path, right)
    try:
        assert v.resolve(s).real == real
    finally:
        v.close()


# --- surrogates ------------------------------------------------------------------------------------


@pytest.fixture
def vault(db_path):
    v = Vault(db_path, SecretBox.load(db_path.parent))
    yield v
    v.close()


def test_surrogate_shape_and_uniqueness(vault):
    alice, bob = make_users(vault)
    reals = [real_token(f"t{i}") for i in range(20)]
    surrogates = [vault.surrogate_for("plex", r, alice) for r in reals]
    for s in surrogates:
        assert s.startswith(SURROGATE_PREFIX)
        assert SURROGATE_RE.match(s), s
        assert len(s) - len(SURROGATE_PREFIX) >= 32
    assert len(set(surrogates)) == len(surrogates)
    # same (kind, real, user) while live -> the same surrogate
    assert [vault.surrogate_for("plex", r, alice) for r in reals] == surrogates
    # another user or another kind -> another surrogate
    assert vault.surrogate_for("plex", reals[0], bob) != surrogates[0]
    assert vault.surrogate_for("trakt", reals[0], alice) != surrogates[0]
    assert vault.surrogate_for("plex", reals[0], None) != surrogates[0]
    assert vault.surrogate_for("plex", reals[0], None) == vault.surrogate_for("plex", reals[0], None)


def test_resolve_returns_real_user_kind_and_server(vault):
    alice, bob = make_users(vault)
    plex, trakt = real_token("plex"), real_token("trakt")
    s1 = vault.surrogate_for("plex", plex, alice, server_id="srv-1")
    s2 = vault.surrogate_for("trakt", trakt, bob)
    e1, e2 = vault.resolve(s1), vault.resolve(s2)
    assert (e1.real, e1.user_id, e1.kind, e1.server_id) == (plex, alice, "plex", "srv-1")
    assert (e2.real, e2.user_id, e2.kind, e2.server_id) == (trakt, bob, "trakt", None)
    assert vault.find_real("plex", plex).id == e1.id
    assert vault.find_real("trakt", plex) is None
    assert vault.find_real("plex", real_token("unknown")) is None


def test_a_token_two_servers_share_gets_one_surrogate_per_server(vault):
    """An owner's servers all take the account token: each server's surrogate resolves to that
    server only, and the account's sign-in surrogate is the first server's (bound at resources)."""
    alice, _ = make_users(vault)
    account = real_token("account")
    signed_in = vault.surrogate_for("plex", account, alice)
    first = vault.surrogate_for("plex", account, alice, server_id="srv-1")
    second = vault.surrogate_for("plex", account, alice, server_id="srv-2")
    assert first == signed_in and second != first
    assert vault.resolve(first).server_id == "srv-1" and vault.resolve(second).server_id == "srv-2"
    assert vault.resolve(second).real == account
    assert vault.surrogate_for("plex", account, alice, server_id="srv-2") == second
    assert vault.surrogate_for("plex", account, alice, server_id="srv-1") == first


def _flip(s: str, i: int) -> str:
    c = s[i]
    return s[:i] + ("A" if c != "A" else "B") + s[i + 1:]


def test_unknown_tampered_revoked_expired_surrogates_do_not_resolve(vault):
    alice, _ = make_users(vault)
    s = vault.surrogate_for("plex", real_token("plex"), alice)
    assert vault.resolve(s) is not None
    assert vault.resolve(SURROGATE_PREFIX + secrets.token_urlsafe(24)) is None
    assert vault.resolve("") is None
    assert vault.resolve("not-a-surrogate") is None
    for i in (len(SURROGATE_PREFIX), len(s) // 2, len(s) - 1):
        assert vault.resolve(_flip(s, i)) is None
    assert vault.resolve(s + "x") is None and vault.resolve(s[:-1]) is None

    assert vault.revoke(s) is True
    assert vault.resolve(s) is None
    assert vault.revoke(s) is False

    expired_real = real_token("exp")
    expired = vault.surrogate_for("plex", expired_real, alice, expires_at=iso(timedelta(seconds=-5)))
    assert vault.resolve(expired) is None
    live = vault.surrogate_for("plex", real_token("live"), alice, expires_at=iso(timedelta(hours=1)))
    assert vault.resolve(live) is not None
    # an expired surrogate is not handed out again
    again = vault.surrogate_for("plex", expired_real, alice)
    assert again != expired and vault.resolve(again).real == expired_real


def test_revoke_user_revokes_only_that_user(vault):
    alice, bob = make_users(vault)
    a_reals = [real_token("a1"), real_token("a2")]
    a = [vault.surrogate_for("plex", a_reals[0], alice), vault.surrogate_for("trakt", a_reals[1], alice)]
    b_real = real_token("b")
    b = vault.surrogate_for("plex", b_real, bob)
    shared = vault.surrogate_for("plex", a_reals[0], bob)  # the same real token, bob's surrogate

    assert vault.revoke_user(alice) == 2
    assert all(vault.resolve(s) is None for s in a)
    assert vault.resolve(b).real == b_real
    assert vault.resolve(shared).real == a_reals[0]
    assert vault.revoke_user(alice) == 0

    # after revocation the same real token gets a new surrogate, which works
    fresh = vault.surrogate_for("plex", a_reals[0], alice)
    assert fresh not in a and fresh != shared
    assert vault.resolve(fresh).real == a_reals[0]
    assert vault.resolve(a[0]) is None


def test_revoke_user_of_some_kinds_keeps_the_others(vault):
    alice, _ = make_users(vault)
    plex = vault.surrogate_for("plex", real_token("p"), alice)
    access = vault.surrogate_for("trakt_access", real_token("ta"), alice)
    refresh = vault.surrogate_for("trakt_refresh", real_token("tr"), alice)
    assert vault.revoke_user(alice, ("trakt_access", "trakt_refresh")) == 2
    assert vault.resolve(access) is None and vault.resolve(refresh) is None
    assert vault.resolve(plex) is not None
    assert vault.revoke_user(alice, ()) == 0


def test_repoint_keeps_the_surrogate_and_only_that_users(vault):
    alice, bob = make_users(vault)
    old, new = real_token("old"), real_token("new")
    mine = vault.surrogate_for("trakt_access", old, alice)
    theirs = vault.surrogate_for("trakt_access", old, bob)
    later = iso(timedelta(days=90))
    assert vault.repoint("trakt_access", alice, old, new, later) == 1
    assert vault.resolve(mine).real == new
    assert vault.resolve(theirs).real == old
    assert vault.find_real("trakt_access", new).id == vault.resolve(mine).id
    assert vault.newest("trakt_access", alice) == (new, later)
    assert vault.repoint("trakt_access", alice, old, new, later) == 0  # nothing stands for `old` any more
    assert vault.newest("plex", alice) is None


def test_user_credentials_roundtrip(vault):
    alice, bob = make_users(vault)
    assert vault.user_credential(alice, "tmdb_api_key") is None
    vault.set_user_credential(alice, "tmdb_api_key", "first-value-123")
    vault.set_user_credential(alice, "tmdb_api_key", "second-value-456")
    assert vault.user_credential(alice, "tmdb_api_key") == "second-value-456"
    assert vault.user_credential(bob, "tmdb_api_key") is None
    assert vault.delete_user_credential(alice, "tmdb_api_key") is True
    assert vault.delete_user_credential(alice, "tmdb_api_key") is False
    assert vault.user_credential(alice, "tmdb_api_key") is None


# --- nothing secret at rest ------------------------------------------------------------------------


def _raw_files(db_path: Path) -> dict[str, bytes]:
    files = {}
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(db_path) + suffix)
        if p.exists():
            files[p.name] = p.read_bytes()
    return files


def _leaks(files: dict[str, bytes], needles: list[str]) -> list[tuple[str, str]]:
    return [(name, n) for name, data in files.items() for n in needles
            if n.encode() in data or n.encode("utf-16-le") in data]


def test_nothing_secret_at_rest(db_path):
    key = Fernet.generate_key()
    v = Vault(db_path, SecretBox([key]))
    alice, bob = make_users(v)
    reals = [real_token("plex-a"), real_token("plex-b"), secrets.token_hex(32), "db55323b8d3e4154498498a75642b381"]
    surrogates = [v.surrogate_for("plex", reals[0], alice, server_id="srv"),
                  v.surrogate_for("plex", reals[1], bob),
                  v.surrogate_for("trakt", reals[2], alice),
                  v.surrogate_for("tmdb", reals[3], None)]
    custom = "my-own-tmdb-key-" + secrets.token_hex(8)
    v.set_user_credential(alice, "tmdb_api_key", custom)
    needles = [*reals, *surrogates, custom, key.decode()]

    # while open: the data sits in the WAL
    files = _raw_files(db_path)
    assert f"{db_path.name}-wal" in files and len(files[f"{db_path.name}-wal"]) > 0
    assert _leaks(files, needles) == []

    # after a checkpoint into the main file, and after close
    v.conn.execute("PRAGMA wal_checkpoint(FULL)")
    assert _leaks(_raw_files(db_path), needles) == []
    v.close()
    files = _raw_files(db_path)
    assert _leaks(files, needles) == []
    assert len(files[db_path.name]) > 0
    # sanity: the search does find what is stored in clear
    assert _leaks(files, ["alice"]) != []


# --- key rotation ----------------------------------------------------------------------------------


def _populate(db_path: Path, box: SecretBox) -> dict:
    v = Vault(db_path, box)
    try:
        alice, bob = make_users(v)
        tokens = {}
        for kind, user in (("plex", alice), ("plex", bob), ("trakt", alice), ("tmdb", None)):
            real = real_token(kind)
            tokens[v.surrogate_for(kind, real, user)] = (kind, real, user)
        revoked_real = real_token("revoked")
        revoked = v.surrogate_for("plex", revoked_real, bob)
        v.revoke(revoked)
        v.set_user_credential(alice, "tmdb_api_key", "alice-custom-tmdb-key")
        v.set_user_credential(bob, "trakt_token", "bob-trakt-token-value")
        return {"tokens": tokens, "revoked": revoked, "alice": alice, "bob": bob, "rows": 5 + 2}
    finally:
        v.close()


def _check_all_readable(db_path: Path, box: SecretBox, data: dict, find_real: bool = True) -> None:
    v = Vault(db_path, box)
    try:
        for surrogate, (kind, real, user) in data["tokens"].items():
            entry = v.resolve(surrogate)
            assert entry is not None and (entry.kind, entry.real, entry.user_id) == (kind, real, user)
            if find_real:
                assert v.find_real(kind, real).id == entry.id, "the look-up HMAC must match the newest key"
                assert v.surrogate_for(kind, real, user) == surrogate
        assert v.resolve(data["revoked"]) is None
        assert v.user_credential(data["alice"], "tmdb_api_key") == "alice-custom-tmdb-key"
        assert v.user_credential(data["bob"], "trakt_token") == "bob-trakt-token-value"
    finally:
        v.close()


def _raw_ciphertexts(db_path: Path) -> list[bytes]:
    conn = sqlite3.connect(db_path)
    try:
        rows = [c for r in conn.execute("SELECT secret_enc, surrogate_enc FROM vault_tokens") for c in r]
        rows += [r[0] for r in conn.execute("SELECT secret_enc FROM user_credentials")]
        return rows
    finally:
        conn.close()


def _assert_key_cannot_decrypt_any_row(db_path: Path, key: bytes) -> None:
    cts = _raw_ciphertexts(db_path)
    assert cts
    f = Fernet(key)
    for ct in cts:
        with pytest.raises(InvalidToken):
            f.decrypt(ct)


def test_rotate_key_cli(home, db_path):
    data = _populate(db_path, SecretBox.load(home))
    (old_key,) = key_lines(home)

    result = cli("rotate-key", env={"PROJECTIONIST_HOME": str(home)})
    assert result.returncode == 0, result.stderr
    assert f"re-encrypted {data['rows']} secret(s)" in result.stdout
    assert "new key" in result.stdout

    lines = key_lines(home)
    assert len(lines) == 1 and lines[0] != old_key
    Fernet(lines[0])
    assert mode(key_file(home)) == 0o600
    assert not key_file(home).with_suffix(".tmp").exists()

    _check_all_readable(db_path, SecretBox.load(home), data)
    _assert_key_cannot_decrypt_any_row(db_path, old_key)
    v = Vault(db_path, SecretBox([old_key]))
    try:
        with pytest.raises(VaultKeyError):
            v.resolve(next(iter(data["tokens"])))
    finally:
        v.close()

    # twice in a row is fine too
    result = cli("rotate-key", env={"PROJECTIONIST_HOME": str(home)})
    assert result.returncode == 0, result.stderr
    assert key_lines(home) != lines and len(key_lines(home)) == 1
    _check_all_readable(db_path, SecretBox.load(home), data)


class Crash(Exception):
    pass


def test_rotate_key_crash_before_commit_is_recoverable(home, db_path, monkeypatch):
    data = _populate(db_path, SecretBox.load(home))
    (old_key,) = key_lines(home)

    calls = {"n": 0}
    real_rotate = SecretBox.rotate

    def crashing_rotate(self, token):
        calls["n"] += 1
        if calls["n"] == 3:  # midway through the rows
            # the key file already holds [new, old]
            assert len(key_lines(home)) == 2 and key_lines(home)[1] == old_key
            raise Crash("simulated crash")
        return real_rotate(self, token)

    monkeypatch.setattr(SecretBox, "rotate", crashing_rotate)
    with pytest.raises(Crash):
        rotate_key(home, db_path)
    monkeypatch.setattr(SecretBox, "rotate", real_rotate)

    new_key, second = key_lines(home)
    assert second == old_key and new_key != old_key
    assert mode(key_file(home)) == 0o600
    # every row is still under the old key (nothing was committed) and readable with the keys on disk
    for ct in _raw_ciphertexts(db_path):
        Fernet(old_key).decrypt(ct)
    _check_all_readable(db_path, SecretBox.load(home), data, find_real=False)

    # running rotate again completes
    result = cli("rotate-key", env={"PROJECTIONIST_HOME": str(home)})
    assert result.returncode == 0, result.stderr
    assert f"re-encrypted {data['rows']} secret(s)" in result.stdout
    (final,) = key_lines(home)
    assert final not in (old_key, new_key)
    _check_all_readable(db_path, SecretBox.load(home), data)
    _assert_key_cannot_decrypt_any_row(db_path, old_key)
    _assert_key_cannot_decrypt_any_row(db_path, new_key)


HARD_CRASH = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from projectionist import vault
    n = 0
    original = vault.SecretBox.rotate
    def rotate(self, token):
        global n
        n += 1
        if n == 3:
            os._exit(137)  # like SIGKILL: no rollback, no finally, transaction left open
        return original(self, token)
    vault.SecretBox.rotate = rotate
    vault.rotate_key(Path(sys.argv[1]), Path(sys.argv[2]))
""")


def test_rotate_key_hard_crash_mid_transaction_is_recoverable(home, db_path):
    data = _populate(db_path, SecretBox.load(home))
    (old_key,) = key_lines(home)
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    result = subprocess.run([sys.executable, "-c", HARD_CRASH, str(home), str(db_path)], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 137, result.stderr
    assert len(key_lines(home)) == 2 and key_lines(home)[1] == old_key
    _check_all_readable(db_path, SecretBox.load(home), data, find_real=False)

    result = cli("rotate-key", env={"PROJECTIONIST_HOME": str(home)})
    assert result.returncode == 0, result.stderr
    assert len(key_lines(home)) == 1
    _check_all_readable(db_path, SecretBox.load(home), data)
    _assert_key_cannot_decrypt_any_row(db_path, old_key)


def test_find_real_works_while_rotation_is_pending(home, db_path):
    data = _populate(db_path, SecretBox.load(home))
    (old_key,) = key_lines(home)
    vault_mod.write_key_file(home, [Fernet.generate_key(), old_key])  # state after a crash mid-rotation
    _check_all_readable(db_path, SecretBox.load(home), data, find_real=True)


def test_rotate_key_with_env_keys(home, db_path):
    old_key, new_key = Fernet.generate_key(), Fernet.generate_key()
    data = _populate(db_path, SecretBox([old_key]))

    result = cli("rotate-key", env={"PROJECTIONIST_HOME": str(home),
                                    KEY_ENV: f"{new_key.decode()},{old_key.decode()}"})
    assert result.returncode == 0, result.stderr
    assert f"re-encrypted {data['rows']} secret(s)" in result.stdout
    assert "the first one is now the only one needed" in result.stdout
    assert KEY_ENV in result.stdout
    assert old_key.decode() not in result.stdout + result.stderr
    assert new_key.decode() not in result.stdout + result.stderr
    assert not key_file(home).exists(), "env keys: no key file is written"

    _check_all_readable(db_path, SecretBox([new_key]), data)
    _assert_key_cannot_decrypt_any_row(db_path, old_key)


def test_a_running_service_follows_a_rotation(home, db_path):
    """The proxy keeps its SecretBox for its lifetime: after `rotate-key` it must still decrypt
    every row, and must not write new rows under the key the rotation dropped."""
    running = SecretBox.load(home)
    vault = Vault(db_path, running)
    surrogate = vault.surrogate_for("plex", "real-token-before-rotation", None)
    (old_key,) = key_lines(home)
    result = cli("rotate-key", env={"PROJECTIONIST_HOME": str(home)})
    assert result.returncode == 0, result.stderr
    assert vault.resolve(surrogate).real == "real-token-before-rotation"
    assert vault.find_real("plex", "real-token-before-rotation") is not None
    later = vault.surrogate_for("plex", "real-token-after-rotation", None)
    vault.close()
    _assert_key_cannot_decrypt_any_row(db_path, old_key)
    assert Vault(db_path, SecretBox.load(home)).resolve(later).real == "real-token-after-rotation"
