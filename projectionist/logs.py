"""Logging of every Projectionist process: one format, one redaction, optional rotating files.

    PROJECTIONIST_LOG_FORMAT   json | text | auto (default): json unless stderr is a terminal
                               (containers get JSON, a shell gets readable key=value lines);
                               `projectionist --log-format ...` sets it for every service it starts
    PROJECTIONIST_LOG_LEVEL    DEBUG | INFO (default) | WARNING | ...
    PROJECTIONIST_LOG_DIR      also write <service>.log there (JSON lines, rotated at 10 MB, 5 kept)

Every handler carries `RedactSecrets`, so no line (message, fields, traceback) shows a credential.
mitmproxy's per-connection lines (client/server connect and disconnect) are debug, not info.
Datasette's server (uvicorn) logs through the same handlers (`uvicorn_log_config`).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path

from .redact import RedactSecrets

FORMAT_ENV = "PROJECTIONIST_LOG_FORMAT"
LEVEL_ENV = "PROJECTIONIST_LOG_LEVEL"
DIR_ENV = "PROJECTIONIST_LOG_DIR"
FORMATS = ("auto", "json", "text")
ROTATE_BYTES = 10 * 1024 * 1024
ROTATE_KEEP = 5


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in getattr(record, "fields", {}).items():
            entry[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:  # set (and redacted) by RedactSecrets when it ran
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def _kv_value(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if not text or any(c in text for c in ' "=\n\t'):
        return json.dumps(text)
    return text


class KeyValueFormatter(logging.Formatter):
    """`ts=... level=info service=control logger=control msg="request" method=GET status=200`:
    the same keys as the JSON lines, for reading on a terminal."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        pairs = [("ts", _timestamp(record)), ("level", record.levelname.lower()), ("service", self.service),
                 ("logger", record.name), ("msg", record.getMessage())]
        pairs += list(getattr(record, "fields", {}).items())
        line = " ".join(f"{key}={_kv_value(value)}" for key, value in pairs)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        return line


class ConnectionNoise(logging.Filter):
    """mitmproxy logs every client/server connect and disconnect at info: those are debug here."""

    PREFIXES = ("client connect", "client disconnect", "server connect", "server disconnect")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and isinstance(record.msg, str) and record.msg.startswith(self.PREFIXES):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def resolve_format(fmt: str | None = None, stream=None) -> str:
    fmt = (fmt or os.environ.get(FORMAT_ENV) or "auto").strip().lower()
    if fmt not in FORMATS:
        raise ValueError(f"{FORMAT_ENV} must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "auto":
        stream = stream or sys.stderr
        return "text" if getattr(stream, "isatty", lambda: False)() else "json"
    return fmt


def _formatter(fmt: str, service: str) -> logging.Formatter:
    return KeyValueFormatter(service) if fmt == "text" else JsonFormatter(service)


def setup_logging(service: str, level: str | None = None, fmt: str | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(resolve_format(fmt), service))
    handlers: list[logging.Handler] = [handler]
    directory = os.environ.get(DIR_ENV, "").strip()
    if directory:
        path = Path(directory).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        rotating = logging.handlers.RotatingFileHandler(path / f"{service}.log", maxBytes=ROTATE_BYTES,
                                                        backupCount=ROTATE_KEEP, encoding="utf-8")
        rotating.setFormatter(JsonFormatter(service))  # files are for tools: always JSON lines
        handlers.append(rotating)
    for h in handlers:
        h.addFilter(RedactSecrets())  # second line of defence: no credential reaches the log
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(level or os.environ.get(LEVEL_ENV, "INFO"))
    logging.captureWarnings(True)  # warnings too are log lines, not bare text on stderr
    # APScheduler says "Adding job tentatively" and "Running job" for every job at info; control.jobs
    # logs each run's outcome once, which is what an operator reads.
    for noisy in ("hpack", "asyncio", "watchfiles", "apscheduler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    connection = logging.getLogger("mitmproxy.proxy.server")
    if not any(isinstance(f, ConnectionNoise) for f in connection.filters):
        connection.addFilter(ConnectionNoise())


class AccessLine(logging.Filter):
    """uvicorn's access lines in the control plane's shape: msg "request" and method/path/status
    fields, the path without its query (queries may carry secrets)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5:
            _client, method, full_path, _version, status = args
            record.msg, record.args = "request", None
            record.fields = {"method": method, "path": str(full_path).split("?", 1)[0], "status": status}
        return True


def uvicorn_log_config() -> dict:
    """For uvicorn (Datasette's server): its loggers hand records to ours instead of printing."""
    loggers = {name: {"handlers": [], "propagate": True, "level": "INFO"} for name in ("uvicorn", "uvicorn.error")}
    loggers["uvicorn.access"] = {"handlers": [], "propagate": True, "level": "INFO", "filters": ["access"]}
    return {"version": 1, "disable_existing_loggers": False,
            "filters": {"access": {"()": AccessLine}}, "loggers": loggers}
