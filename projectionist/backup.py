"""Backups of a Projectionist home: a consistent database snapshot plus what makes it usable.

A backup is one `.tar.gz`:

    manifest.json        format, time, schema version, the snapshot's SHA-256, what is inside
    projectionist.db     SQLite's online backup API (consistent while the services write)
    secrets.enc          (with a passphrase) the vault key(s), the proxy's CA (so that browsers
                         keep trusting it) and the dashboard password, encrypted with a key derived
                         from the passphrase (scrypt, then Fernet)

The database alone is unreadable where it matters: every token in it is encrypted under the vault
key. So `backup` wraps the key with a passphrase (`PROJECTIONIST_BACKUP_PASSPHRASE`, or asked on a
terminal) rather than writing it in the clear next to the data; `--no-secrets` leaves it out for
operators who keep `secret.key` (or `PROJECTIONIST_SECRET_KEY`) elsewhere. `restore` checks the
snapshot (hash, integrity), unwraps the secrets, puts both in the home and migrates it.

Automatic snapshots: `store.migrate` keeps `backups/pre-migration-*.db` (database only: migrations
never change the key), and the scheduled `backup` job (control/maintenance.py) keeps the newest
`retention.backups` archives in `<home>/backups/`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import secrets
import sqlite3
import tarfile
import tempfile
import time
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .store import connect, migrate, schema_version

PASSPHRASE_ENV = "PROJECTIONIST_BACKUP_PASSPHRASE"
FORMAT = 1
ARCHIVE_PREFIX = "projectionist-"
ARCHIVE_SUFFIX = ".tar.gz"
# What besides the database a home needs to work as before (relative to the home).
SECRET_FILES = ("secret.key", "mitmproxy/mitmproxy-ca.pem", "mitmproxy/mitmproxy-ca-cert.pem",
                "mitmproxy/mitmproxy-ca-cert.cer", "mitmproxy/mitmproxy-ca-cert.p12", "mitmproxy/mitmproxy-ca.p12",
                "mitmproxy/mitmproxy-dhparam.pem", "dashboard-password")
_SCRYPT = {"n": 2**15, "r": 8, "p": 1}


class BackupError(RuntimeError):
    """A backup that cannot be written or restored; the message says why."""


@dataclass(frozen=True)
class BackupResult:
    path: Path
    bytes: int
    schema_version: int
    secrets: bool


# --- snapshots ----------------------------------------------------------------------------------

def snapshot(db_path: Path, target: Path) -> None:
    """A consistent copy of a live database (SQLite's online backup API), written to `target`."""
    if not db_path.exists():
        raise BackupError(f"no database at {db_path}")
    with closing(connect(db_path)) as source, closing(sqlite3.connect(str(target))) as copy:
        source.backup(copy, pages=1024, sleep=0.005)  # in steps: writers are never locked out for long
        copy.execute("PRAGMA journal_mode = DELETE")  # one self-contained file


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- the wrapped secrets ---------------------------------------------------------------------------

def _derive(passphrase: str, salt: bytes) -> bytes:
    key = Scrypt(salt=salt, length=32, **_SCRYPT).derive(passphrase.encode())
    return base64.urlsafe_b64encode(key)


def wrap_secrets(home: Path, passphrase: str) -> bytes:
    files = {}
    for name in SECRET_FILES:
        path = home / name
        if path.is_file():
            files[name] = base64.b64encode(path.read_bytes()).decode()
    env_keys = os.environ.get("PROJECTIONIST_SECRET_KEY")
    if env_keys:  # the key lives in the environment: carry it as a key file
        files["secret.key"] = base64.b64encode(
            b"\n".join(k.strip().encode() for k in env_keys.split(",") if k.strip()) + b"\n").decode()
    if "secret.key" not in files:
        raise BackupError(f"no vault key: neither {home / 'secret.key'} nor PROJECTIONIST_SECRET_KEY")
    salt = secrets.token_bytes(16)
    token = Fernet(_derive(passphrase, salt)).encrypt(json.dumps({"files": files}).encode())
    return json.dumps({"kdf": "scrypt", **_SCRYPT, "salt": base64.b64encode(salt).decode(),
                       "token": token.decode()}).encode()


def unwrap_secrets(blob: bytes, passphrase: str) -> dict[str, bytes]:
    wrapped = json.loads(blob)
    try:
        plain = Fernet(_derive(passphrase, base64.b64decode(wrapped["salt"]))).decrypt(wrapped["token"].encode())
    except InvalidToken:
        raise BackupError("the passphrase does not open this backup's secrets") from None
    return {name: base64.b64decode(data) for name, data in json.loads(plain)["files"].items()}


# --- backup ---------------------------------------------------------------------------------------

def default_path(home: Path) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return home / "backups" / f"{ARCHIVE_PREFIX}{stamp}{ARCHIVE_SUFFIX}"


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o600) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, int(time.time())
    tar.addfile(info, io.BytesIO(data))


def backup(home: Path, db_path: Path, target: Path | None = None, passphrase: str | None = None) -> BackupResult:
    """Write a backup archive; with a passphrase it carries the secrets too."""
    target = target or default_path(home)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".backup-") as work:
        copy = Path(work) / "projectionist.db"
        snapshot(db_path, copy)
        with closing(sqlite3.connect(str(copy))) as conn:
            version = schema_version(conn)
        wrapped = wrap_secrets(home, passphrase) if passphrase else None
        manifest = {"format": FORMAT, "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                    "schema_version": version, "db_sha256": _sha256(copy), "db_bytes": copy.stat().st_size,
                    "secrets": wrapped is not None}
        partial = Path(work) / "archive.tar.gz"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # the data is private too
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            _add_bytes(tar, "manifest.json", json.dumps(manifest, indent=2).encode(), 0o644)
            tar.add(copy, arcname="projectionist.db")
            if wrapped is not None:
                _add_bytes(tar, "secrets.enc", wrapped)
        os.replace(partial, target)
    return BackupResult(target, target.stat().st_size, version, wrapped is not None)


def prune_backups(directory: Path, keep: int, prefix: str = ARCHIVE_PREFIX, suffix: str = ARCHIVE_SUFFIX) -> list[Path]:
    """Delete all but the newest `keep` archives (by name: their names sort by time)."""
    found = sorted(p for p in directory.glob(f"{prefix}*{suffix}") if p.is_file())
    doomed = found[:-keep] if keep > 0 else found
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


# --- restore --------------------------------------------------------------------------------------

_UNREADABLE = (OSError, EOFError, tarfile.TarError, KeyError, ValueError)


def read_manifest(archive: Path) -> dict:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            return json.load(tar.extractfile("manifest.json"))
    except _UNREADABLE as exc:
        raise BackupError(f"{archive} is not a Projectionist backup ({type(exc).__name__})") from None


def restore(archive: Path, home: Path, db_path: Path, passphrase: str | None = None, force: bool = False) -> dict:
    """Bring a backup back into `home` (stop the services first). Returns the manifest."""
    manifest = read_manifest(archive)
    if manifest.get("format") != FORMAT:
        raise BackupError(f"backup format {manifest.get('format')!r} is not supported (expected {FORMAT})")
    if db_path.exists() and not force:
        raise BackupError(f"{db_path} exists: restore into an empty home, or pass --force to replace it "
                          "(the current database is kept as projectionist.db.before-restore-*)")
    if manifest["secrets"] and not passphrase:
        raise BackupError(f"this backup's secrets need its passphrase ({PASSPHRASE_ENV})")
    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home, prefix=".restore-") as work, tarfile.open(archive, "r:gz") as tar:
        copy = Path(work) / "projectionist.db"
        try:
            with tar.extractfile("projectionist.db") as src, copy.open("wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            wrapped = tar.extractfile("secrets.enc").read() if manifest["secrets"] else None
        except _UNREADABLE as exc:
            raise BackupError(f"{archive} is damaged ({type(exc).__name__}): nothing was restored") from None
        if _sha256(copy) != manifest["db_sha256"]:
            raise BackupError("the backup's database does not match its manifest (damaged file)")
        with closing(sqlite3.connect(str(copy))) as conn:
            if conn.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
                raise BackupError("the backup's database fails SQLite's integrity check")
        files = unwrap_secrets(wrapped, passphrase) if wrapped is not None else {}
        existing_key = home / "secret.key"
        if "secret.key" in files and existing_key.exists() and existing_key.read_bytes() != files["secret.key"] \
                and not force:
            raise BackupError(f"{existing_key} holds another key: pass --force to replace it")
        if db_path.exists():
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            os.replace(db_path, db_path.with_name(f"{db_path.name}.before-restore-{stamp}"))
        for suffix in ("-wal", "-shm"):  # the old database's, never to be applied to the restored one
            db_path.with_name(db_path.name + suffix).unlink(missing_ok=True)
        for name, data in files.items():
            path = home / name
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path.with_suffix(path.suffix + ".restoring"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(path.with_suffix(path.suffix + ".restoring"), path)
        db_path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(copy, db_path)
    with closing(connect(db_path)) as conn:
        manifest["migrated_to"] = migrate(conn)  # a backup from an older release is brought up to date
    return manifest
