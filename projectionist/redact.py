"""Second line of defence against secrets in logs.

Code is meant never to log a credential. `RedactSecrets` is the net under that rule: a
`logging.Filter` on the handler `setup_logging` installs, rewriting every record before it is
formatted. It replaces with `[REDACTED]`:

- the value of credential parameters in query strings, headers, JSON and reprs
  (`X-Plex-Token=…`, `api_key=…`, `access_token`, `refresh_token`, `client_secret`, `authToken`,
  `accessToken`, `trakt-api-key: …`, `Authorization: Bearer …`, `"authToken": "…"`);
- token shapes wherever they appear: our surrogates (`pj_…`), 32-hex TMDB v3 keys, 64-hex Trakt
  tokens, JWTs (`eyJ….….…`), `Bearer …`;
- exact secret values registered at run time (`RedactSecrets.register(value)`), e.g. the server
  credentials the proxy loaded from the environment.

It is cheap: one precompiled alternation for the shapes, and one for the registered values
(rebuilt only when a value is registered).
"""

from __future__ import annotations

import logging
import re
import threading
import urllib.parse
from typing import Any

REDACTED = "[REDACTED]"
MIN_REGISTERED_LEN = 8

# Parameter / header / JSON key names whose value is a credential (matched case-insensitively).
_SECRET_NAMES = (
    "x-plex-token", "x_plex_token", "api_key", "apikey", "api-key", "access_token", "refresh_token",
    "client_secret", "authtoken", "accesstoken", "refreshtoken", "clientsecret", "trakt-api-key",
    "authorization", "password",
)
_NAMES = "|".join(re.escape(n) for n in sorted(_SECRET_NAMES, key=len, reverse=True))
_Q = r"""(?:\\?["'])"""  # a quote, possibly escaped (JSON inside a string)
_URLSAFE = r"A-Za-z0-9_\-"

_PATTERN = re.compile(
    # name, separator (= : %3D, or the comma of a ('name', 'value') tuple), optional auth scheme
    rf"(?P<kv>(?<![A-Za-z0-9_\-])(?i:{_NAMES}){_Q}?\s*(?:[:=]|%3[dD]|,\s*b?(?=[\"']))\s*(?:b?{_Q})?"
    rf"(?:(?i:bearer|basic|token)\s+)?)"
    rf"(?!(?:null|true|false|None)\b)[^\s\"'&,;#\\<>{{}}\[\]()]+"
    rf"|(?P<bearer>(?<![A-Za-z0-9_\-])(?i:bearer)\s+)[A-Za-z0-9._~+/=\-]{{8,}}"
    rf"|(?<![{_URLSAFE}])eyJ[{_URLSAFE}]{{5,}}\.[{_URLSAFE}]{{5,}}\.[{_URLSAFE}]*"
    rf"|(?<![A-Za-z0-9_\-])pj_[{_URLSAFE}]{{20,}}"
    r"|(?<![A-Za-z0-9])(?:[0-9a-fA-F]{64}|[0-9a-fA-F]{32})(?![A-Za-z0-9])"
)


def _replace(match: re.Match[str]) -> str:
    prefix = match.group("kv") or match.group("bearer")
    return prefix + REDACTED if prefix is not None else REDACTED


class RedactSecrets(logging.Filter):
    """Rewrites a record's message, exception text, stack and `fields` so no secret reaches the log."""

    _lock = threading.Lock()
    _registered: set[str] = set()
    _registered_re: re.Pattern[str] | None = None

    # --- the registry of exact secret values --------------------------------------------------

    @classmethod
    def register(cls, value: str | None) -> bool:
        """Redact this exact value from now on (every instance). Values under 8 characters are
        ignored (too likely to match ordinary text); returns whether the value was registered."""
        if not value or len(value) < MIN_REGISTERED_LEN:
            return False
        with cls._lock:
            variants = {value, urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value)}
            if variants <= cls._registered:
                return True
            cls._registered |= variants
            alternation = "|".join(re.escape(v) for v in sorted(cls._registered, key=len, reverse=True))
            cls._registered_re = re.compile(alternation)
        return True

    @classmethod
    def clear_registered(cls) -> None:
        with cls._lock:
            cls._registered = set()
            cls._registered_re = None

    # --- redaction ------------------------------------------------------------------------------

    @classmethod
    def redact(cls, text: str) -> str:
        registered = cls._registered_re
        if registered is not None:
            text = registered.sub(REDACTED, text)
        return _PATTERN.sub(_replace, text)

    @classmethod
    def redact_value(cls, value: Any) -> Any:
        """Redact strings inside a value (recursing into dicts, lists, tuples, sets; a dict entry
        named like a credential is redacted whole); other objects are rendered as the JSON
        formatter would (str) and redacted if that changes them."""
        if isinstance(value, str):
            return cls.redact(value)
        if value is None or isinstance(value, (bool, int, float)):
            return value
        if isinstance(value, dict):
            return {cls.redact(k) if isinstance(k, str) else k: cls._redact_field(k, v) for k, v in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)):
            return [cls.redact_value(v) for v in value]
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
            return cls.redact(value)
        text = str(value)
        redacted = cls.redact(text)
        return value if redacted == text else redacted

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep what we have, redacted, rather than raise here
            message = f"{record.msg!r} % {record.args!r}"
        record.msg = self.redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = _EXC_FORMATTER.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            # a new dict: the caller's own object is not ours to modify
            record.fields = {k: self._redact_field(k, v) for k, v in fields.items()}
        return True

    @classmethod
    def _redact_field(cls, key: Any, value: Any) -> Any:
        if isinstance(key, str) and key.lower().replace("-", "_") in _SECRET_FIELD_KEYS and value:
            return REDACTED
        return cls.redact_value(value)


_EXC_FORMATTER = logging.Formatter()
# A field with one of these names is a credential whatever its value looks like.
_SECRET_FIELD_KEYS = frozenset(n.replace("-", "_") for n in _SECRET_NAMES) | {"token", "secret"}
