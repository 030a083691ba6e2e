"""Secrets at rest and the token vault.

- `SecretBox` encrypts with Fernet (AES-CBC + HMAC-SHA256, from `cryptography`): authenticated,
  and `MultiFernet` decrypts with any of several keys, which is what makes key rotation safe.
  Keys come from `PROJECTIONIST_SECRET_KEY` (comma-separated, newest first) or from the key file
  `<home>/secret.key`, created on first use with mode 0600.
- `Vault` hands out surrogates for real upstream tokens. A surrogate is random (192 bits),
  bound to one user, revocable, and stored only hashed (for look-up) and encrypted (to hand the
  same surrogate out again for the same real token).

All methods are blocking SQLite/crypto calls: async callers run them in a thread.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import os
import secrets
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from .store import connect, migrate, utcnow_iso

SURROGATE_PREFIX = "pj_"
KEY_ENV = "PROJECTIONIST_SECRET_KEY"


class VaultKeyError(RuntimeError):
    """The encryption key is missing, malformed or does not match the stored secrets."""


def key_file(home: Path) -> Path:
    return home / "secret.key"


def _read_keys(home: Path, create: bool) -> list[bytes]:
    if env := os.environ.get(KEY_ENV):
        return [k.strip().encode() for k in env.split(",") if k.strip()]
    path = key_file(home)
    if not path.exists():
        if not create:
            raise VaultKeyError(f"no key: set {KEY_ENV} or create {path}")
        _create_key_file(path)
    keys = [line.strip() for line in path.read_bytes().splitlines() if line.strip()]
    if not keys:
        raise VaultKeyError(f"{path} is empty: restore the key, or delete the file to start a new vault")
    return keys


def _create_key_file(path: Path) -> None:
    """Write a new key to a private temporary file, then link it into place: the key file never
    exists half-written, and when two processes race the first link wins and both use its key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(Fernet.generate_key() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink()


def write_key_file(home: Path, keys: list[bytes]) -> None:
    """Replace the key file atomically (newest key first), keeping mode 0600."""
    path = key_file(home)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(b"\n".join(keys) + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class SecretBox:
    def __init__(self, keys: list[bytes], home: Path | None = None) -> None:
        self.home = home  # the key file's directory, when keys come from it: to follow rotations
        self._use(keys)

    def _use(self, keys: list[bytes]) -> None:
        if not keys:
            raise VaultKeyError("no encryption key configured")
        try:
            fernet = MultiFernet([Fernet(k) for k in keys])
        except ValueError:
            raise VaultKeyError("an encryption key is malformed (expected 32 url-safe base64 bytes)") from None
        self._fernet = fernet
        # Look-up hashes use keys derived from the encryption keys, never the keys themselves;
        # one per key, so that rows hashed before a rotation are still found during it.
        self._hmac_keys = [hashlib.sha256(b"projectionist-lookup\0" + k).digest() for k in keys]
        self.keys = keys
        self._key_file_mtime = self._key_file_stamp()

    @classmethod
    def load(cls, home: Path, create: bool = True) -> SecretBox:
        return cls(_read_keys(home, create), None if os.environ.get(KEY_ENV) else home)

    def _key_file_stamp(self) -> int | None:
        if self.home is None:
            return None
        try:
            return key_file(self.home).stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def _follow_rotation(self) -> bool:
        """Re-read the key file if `rotate-key` replaced it since we loaded it."""
        if self.home is None or self._key_file_stamp() == self._key_file_mtime:
            return False
        path = key_file(self.home)
        self._use([line.strip() for line in path.read_bytes().splitlines() if line.strip()])
        return True

    def encrypt(self, plaintext: str) -> bytes:
        self._follow_rotation()  # never write under a key that a finished rotation dropped
        return self._fernet.encrypt(plaintext.encode())

    def decrypt(self, token: bytes) -> str:
        try:
            return self._fernet.decrypt(token).decode()
        except InvalidToken:
            if self._follow_rotation():
                return self.decrypt(token)
            raise VaultKeyError("a stored secret does not decrypt with the configured key(s)") from None

    def rotate(self, token: bytes) -> bytes:
        return self._fernet.rotate(token)

    def lookup_hashes(self, value: str) -> list[str]:
        self._follow_rotation()
        return [hmac.new(k, value.encode(), hashlib.sha256).hexdigest() for k in self._hmac_keys]

    def lookup_hash(self, value: str) -> str:
        """The hash new rows are stored under (the newest key's)."""
        return self.lookup_hashes(value)[0]


def surrogate_hash(surrogate: str) -> str:
    # The surrogate is 192 random bits: a plain hash cannot be reversed by guessing.
    return hashlib.sha256(surrogate.encode()).hexdigest()


def is_surrogate(value: str | None) -> bool:
    return bool(value) and value.startswith(SURROGATE_PREFIX)


@dataclass(frozen=True)
class VaultEntry:
    id: int
    kind: str
    user_id: int | None
    real: str
    server_id: str | None


class Vault:
    def __init__(self, db_path: Path | str, box: SecretBox) -> None:
        self.box = box
        self.conn = connect(db_path)
        migrate(self.conn)

    def close(self) -> None:
        self.conn.close()

    # --- tokens ---------------------------------------------------------------------------------

    def surrogate_for(self, kind: str, real: str, user_id: int | None, server_id: str | None = None,
                      expires_at: str | None = None) -> str:
        """The surrogate standing for `real`: the existing one for this user, or a new one. A token
        first seen without a server (a Plex account token) that a server lists as its own access
        token (an owner's, on plex.tv `resources`) is bound to that server from then on; a second
        server listing the same token (an owner's servers all take the account token) gets a
        surrogate of its own, so that each surrogate names the one server it may go to."""
        hashes = self.box.lookup_hashes(real)
        row = self.conn.execute(
            f"SELECT surrogate_enc, id, server_id FROM vault_tokens WHERE real_hmac IN ({_marks(hashes)}) AND kind = ? "
            "AND user_id IS ? AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?) "
            "AND (? IS NULL OR server_id IS NULL OR server_id = ?) "
            "ORDER BY (? IS NOT NULL AND server_id IS NULL), id DESC LIMIT 1",  # this server's own row first
            (*hashes, kind, user_id, utcnow_iso(), server_id, server_id, server_id),
        ).fetchone()
        if row:
            if server_id is not None and row[2] is None:
                self.conn.execute("UPDATE vault_tokens SET server_id = ? WHERE id = ?", (server_id, row[1]))
            self._heal(row[1])
            return self.box.decrypt(row[0])
        surrogate = SURROGATE_PREFIX + secrets.token_urlsafe(24)
        self.conn.execute(
            "INSERT INTO vault_tokens (kind, user_id, surrogate_hash, surrogate_enc, real_hmac, secret_enc,"
            " server_id, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (kind, user_id, surrogate_hash(surrogate), self.box.encrypt(surrogate), hashes[0],
             self.box.encrypt(real), server_id, utcnow_iso(), expires_at),
        )
        return surrogate

    def resolve(self, surrogate: str) -> VaultEntry | None:
        """The live entry behind a surrogate; None when unknown, revoked, expired, its real token was
        found dead by the token-health job, or its user was disabled by an admin (even a surrogate
        vaulted after that: a player signing in again)."""
        row = self.conn.execute(
            "SELECT id, kind, user_id, secret_enc, server_id FROM vault_tokens WHERE surrogate_hash = ? "
            "AND revoked_at IS NULL AND invalid_at IS NULL AND (expires_at IS NULL OR expires_at > ?) AND (user_id IS NULL OR "
            "NOT EXISTS (SELECT 1 FROM users u WHERE u.id = vault_tokens.user_id AND u.disabled_at IS NOT NULL))",
            (surrogate_hash(surrogate), utcnow_iso()),
        ).fetchone()
        if row is None:
            return None
        return VaultEntry(row[0], row[1], row[2], self.box.decrypt(row[3]), row[4])

    def find_real(self, kind: str, real: str) -> VaultEntry | None:
        """The newest live entry for a real token a client presented (a pre-Projectionist client)."""
        hashes = self.box.lookup_hashes(real)
        row = self.conn.execute(
            f"SELECT id, kind, user_id, secret_enc, server_id FROM vault_tokens WHERE real_hmac IN ({_marks(hashes)}) "
            "AND kind = ? AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?) ORDER BY id DESC LIMIT 1",
            (*hashes, kind, utcnow_iso()),
        ).fetchone()
        return VaultEntry(row[0], row[1], row[2], self.box.decrypt(row[3]), row[4]) if row else None

    def newest(self, kind: str, user_id: int) -> tuple[str, str | None] | None:
        """(real, expires_at) of the user's newest live entry of `kind`."""
        row = self.conn.execute(
            "SELECT secret_enc, expires_at FROM vault_tokens WHERE user_id = ? AND kind = ? AND revoked_at IS NULL "
            "ORDER BY id DESC LIMIT 1", (user_id, kind)).fetchone()
        return (self.box.decrypt(row[0]), row[1]) if row else None

    def repoint(self, kind: str, user_id: int, old_real: str, new_real: str, expires_at: str | None) -> int:
        """Let the user's live surrogates for `old_real` stand for `new_real` (a refreshed OAuth
        token: the client keeps its surrogate). Returns how many entries changed."""
        hashes = self.box.lookup_hashes(old_real)
        return self.conn.execute(
            f"UPDATE vault_tokens SET secret_enc = ?, real_hmac = ?, expires_at = ?, invalid_at = NULL WHERE kind = ? AND user_id = ? "
            f"AND revoked_at IS NULL AND real_hmac IN ({_marks(hashes)})",
            (self.box.encrypt(new_real), self.box.lookup_hash(new_real), expires_at, kind, user_id, *hashes),
        ).rowcount

    def revoke_user(self, user_id: int, kinds: Iterable[str] | None = None) -> int:
        """Revoke every surrogate of a user (logout), or those of `kinds`. Returns how many."""
        kinds = tuple(kinds) if kinds is not None else None
        sql = "UPDATE vault_tokens SET revoked_at = ? WHERE user_id = ? AND revoked_at IS NULL"
        if kinds is not None:
            sql += f" AND kind IN ({_marks(kinds)})"
        return self.conn.execute(sql, (utcnow_iso(), user_id, *(kinds or ()))).rowcount

    # --- token health ---------------------------------------------------------------------------

    def live_tokens(self, kinds: Iterable[str]) -> list[tuple[int, str, int | None, str]]:
        """(id, kind, user_id, real) of every live, not yet invalid token of `kinds`, to be checked."""
        kinds = tuple(kinds)
        rows = self.conn.execute(
            f"SELECT id, kind, user_id, secret_enc FROM vault_tokens WHERE kind IN ({_marks(kinds)}) AND revoked_at IS NULL "
            "AND invalid_at IS NULL AND (expires_at IS NULL OR expires_at > ?) ORDER BY id", (*kinds, utcnow_iso())).fetchall()
        return [(row_id, kind, user_id, self.box.decrypt(secret)) for row_id, kind, user_id, secret in rows]

    def mark_invalid(self, kind: str, real: str) -> list[int | None]:
        """The upstream refused `real`: every live entry of it stops resolving. Returns whose they were."""
        hashes = self.box.lookup_hashes(real)
        users = [row[0] for row in self.conn.execute(
            f"UPDATE vault_tokens SET invalid_at = ? WHERE kind = ? AND real_hmac IN ({_marks(hashes)}) "
            "AND revoked_at IS NULL AND invalid_at IS NULL RETURNING user_id", (utcnow_iso(), kind, *hashes))]
        for user_id in sorted(set(users), key=lambda u: -1 if u is None else u):
            self._health_event(user_id, kind, "invalid")
        return users

    def _heal(self, row_id: int) -> None:
        """A token vaulted again (a fresh sign-in showed it live): its surrogates resolve again, and
        so do the user's other tokens of that kind (a Plex sign-in stands for the account's server
        tokens too, whose answer may come from the cache); a still dead one is found by the next check."""
        row = self.conn.execute("SELECT user_id, kind FROM vault_tokens WHERE id = ? AND invalid_at IS NOT NULL",
                                (row_id,)).fetchone()
        if row is None:
            return
        user_id, kind = row
        self.conn.execute("UPDATE vault_tokens SET invalid_at = NULL WHERE kind = ? AND invalid_at IS NOT NULL AND "
                          "(id = ? OR (user_id = ? AND revoked_at IS NULL))", (kind, row_id, user_id))
        self._health_event(user_id, kind, "healed")

    def _health_event(self, user_id: int | None, kind: str, event: str) -> None:
        self.conn.execute("INSERT INTO token_health_events (ts, user_id, kind, event) VALUES (?, ?, ?, ?)",
                          (utcnow_iso(), user_id, kind, event))

    def needs_sign_in(self, user_id: int, kinds: Iterable[str]) -> list[str]:
        """The kinds whose newest live token of this user was found dead: "sign in again"."""
        out = []
        for kind in kinds:
            row = self.conn.execute(
                "SELECT invalid_at FROM vault_tokens WHERE user_id = ? AND kind = ? AND revoked_at IS NULL "
                "ORDER BY id DESC LIMIT 1", (user_id, kind)).fetchone()
            if row and row[0] is not None:
                out.append(kind)
        return out

    def revoke(self, surrogate: str) -> bool:
        cur = self.conn.execute("UPDATE vault_tokens SET revoked_at = ? WHERE surrogate_hash = ? AND revoked_at IS NULL",
                                (utcnow_iso(), surrogate_hash(surrogate)))
        return cur.rowcount == 1

    # --- per-user credentials (e.g. a custom TMDB key) -----------------------------------------

    def set_user_credential(self, user_id: int, name: str, secret: str) -> None:
        self.conn.execute(
            "INSERT INTO user_credentials (user_id, name, secret_enc, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (user_id, name) DO UPDATE SET secret_enc = excluded.secret_enc, updated_at = excluded.updated_at",
            (user_id, name, self.box.encrypt(secret), utcnow_iso()),
        )

    def user_credential(self, user_id: int, name: str) -> str | None:
        row = self.conn.execute("SELECT secret_enc FROM user_credentials WHERE user_id = ? AND name = ?",
                                (user_id, name)).fetchone()
        return self.box.decrypt(row[0]) if row else None

    def delete_user_credential(self, user_id: int, name: str) -> bool:
        return self.conn.execute("DELETE FROM user_credentials WHERE user_id = ? AND name = ?",
                                 (user_id, name)).rowcount == 1


def _marks(values: list) -> str:
    return ", ".join("?" for _ in values)


def upsert_plex_user(conn: sqlite3.Connection, account_id: str, username: str, email: str | None = None,
                     thumb: str | None = None) -> int:
    """The users row for a Plex account (created on first sight); returns its id."""
    now = utcnow_iso()
    conn.execute(
        "INSERT INTO users (plex_account_id, username, email, thumb, created_at, last_seen_at) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (plex_account_id) DO UPDATE SET "
        "username = excluded.username, email = coalesce(excluded.email, email), "
        "thumb = coalesce(excluded.thumb, thumb), last_seen_at = excluded.last_seen_at",
        (str(account_id), username, email, thumb, now, now),
    )
    return conn.execute("SELECT id FROM users WHERE plex_account_id = ?", (str(account_id),)).fetchone()[0]


def rotate_key(home: Path, db_path: Path) -> int:
    """Re-encrypt every secret under a new key. Crash-safe at every step: the key file holds the
    new and the old key (newest first) until every row is re-encrypted and committed. Running
    services follow: they re-read the key file when it changes."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "secret.key.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one rotation at a time
        return _rotate_key_locked(home, db_path)


def _rotate_key_locked(home: Path, db_path: Path) -> int:
    from_env = bool(os.environ.get(KEY_ENV))
    old_keys = _read_keys(home, create=True)
    keys = old_keys if from_env else [Fernet.generate_key(), *old_keys]
    if not from_env:
        write_key_file(home, keys)
    box = SecretBox(keys)  # not following the file: this function is the one changing it
    conn = connect(db_path)
    migrate(conn)
    count = 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        for row_id, secret_enc, surrogate_enc in conn.execute(
                "SELECT id, secret_enc, surrogate_enc FROM vault_tokens").fetchall():
            real = box.decrypt(secret_enc)
            conn.execute("UPDATE vault_tokens SET secret_enc = ?, surrogate_enc = ?, real_hmac = ? WHERE id = ?",
                         (box.rotate(secret_enc), box.rotate(surrogate_enc), box.lookup_hash(real), row_id))
            count += 1
        for user_id, name, secret_enc in conn.execute(
                "SELECT user_id, name, secret_enc FROM user_credentials").fetchall():
            conn.execute("UPDATE user_credentials SET secret_enc = ? WHERE user_id = ? AND name = ?",
                         (box.rotate(secret_enc), user_id, name))
            count += 1
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    finally:
        conn.close()
    if not from_env:
        write_key_file(home, keys[:1])  # every row now decrypts with the newest key alone
    return count

