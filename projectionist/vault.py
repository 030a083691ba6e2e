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

import hashlib
import hmac
import os
import secrets
import sqlite3
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
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # O_EXCL: two processes starting at once must not write two different keys
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(Fernet.generate_key() + b"\n")
    return [line.strip() for line in path.read_bytes().splitlines() if line.strip()]


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
    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise VaultKeyError("no encryption key configured")
        try:
            self._fernet = MultiFernet([Fernet(k) for k in keys])
        except ValueError:
            raise VaultKeyError("an encryption key is malformed (expected 32 url-safe base64 bytes)") from None
        # Look-up hashes use a key derived from the newest encryption key, never the key itself.
        self._hmac_key = hashlib.sha256(b"projectionist-lookup\0" + keys[0]).digest()
        self.keys = keys

    @classmethod
    def load(cls, home: Path, create: bool = True) -> SecretBox:
        return cls(_read_keys(home, create))

    def encrypt(self, plaintext: str) -> bytes:
        return self._fernet.encrypt(plaintext.encode())

    def decrypt(self, token: bytes) -> str:
        try:
            return self._fernet.decrypt(token).decode()
        except InvalidToken:
            raise VaultKeyError("a stored secret does not decrypt with the configured key(s)") from None

    def rotate(self, token: bytes) -> bytes:
        return self._fernet.rotate(token)

    def lookup_hash(self, value: str) -> str:
        return hmac.new(self._hmac_key, value.encode(), hashlib.sha256).hexdigest()


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
        """The surrogate standing for `real`: the existing one for this user, or a new one."""
        real_hmac = self.box.lookup_hash(real)
        row = self.conn.execute(
            "SELECT surrogate_enc FROM vault_tokens WHERE real_hmac = ? AND kind = ? AND user_id IS ? "
            "AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?) ORDER BY id DESC LIMIT 1",
            (real_hmac, kind, user_id, utcnow_iso()),
        ).fetchone()
        if row:
            return self.box.decrypt(row[0])
        surrogate = SURROGATE_PREFIX + secrets.token_urlsafe(24)
        self.conn.execute(
            "INSERT INTO vault_tokens (kind, user_id, surrogate_hash, surrogate_enc, real_hmac, secret_enc,"
            " server_id, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (kind, user_id, surrogate_hash(surrogate), self.box.encrypt(surrogate), real_hmac,
             self.box.encrypt(real), server_id, utcnow_iso(), expires_at),
        )
        return surrogate

    def resolve(self, surrogate: str) -> VaultEntry | None:
        """The live entry behind a surrogate; None when unknown, revoked or expired."""
        row = self.conn.execute(
            "SELECT id, kind, user_id, secret_enc, server_id FROM vault_tokens WHERE surrogate_hash = ? "
            "AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?)",
            (surrogate_hash(surrogate), utcnow_iso()),
        ).fetchone()
        if row is None:
            return None
        return VaultEntry(row[0], row[1], row[2], self.box.decrypt(row[3]), row[4])

    def find_real(self, kind: str, real: str) -> VaultEntry | None:
        """The newest live entry for a real token a client presented (a pre-Projectionist client)."""
        row = self.conn.execute(
            "SELECT id, kind, user_id, secret_enc, server_id FROM vault_tokens WHERE real_hmac = ? "
            "AND kind = ? AND revoked_at IS NULL ORDER BY id DESC LIMIT 1",
            (self.box.lookup_hash(real), kind),
        ).fetchone()
        return VaultEntry(row[0], row[1], row[2], self.box.decrypt(row[3]), row[4]) if row else None

    def revoke_user(self, user_id: int) -> int:
        """Revoke every surrogate of a user (logout). Returns how many."""
        cur = self.conn.execute("UPDATE vault_tokens SET revoked_at = ? WHERE user_id = ? AND revoked_at IS NULL",
                                (utcnow_iso(), user_id))
        return cur.rowcount

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
    new and the old key (newest first) until every row is re-encrypted and committed."""
    from_env = bool(os.environ.get(KEY_ENV))
    old_keys = _read_keys(home, create=True)
    keys = old_keys if from_env else [Fernet.generate_key(), *old_keys]
    if not from_env:
        write_key_file(home, keys)
    box = SecretBox(keys)
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

