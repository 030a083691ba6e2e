"""RedactSecrets: the logging filter that keeps credentials out of every log line."""

from __future__ import annotations

import json
import logging
import re
import secrets
import time

import pytest

from projectionist import redact as redact_mod
from projectionist.logs import JsonFormatter, setup_logging
from projectionist.redact import REDACTED, RedactSecrets

SURROGATE = "pj_" + secrets.token_urlsafe(24)
TMDB_V3 = secrets.token_hex(16)
TRAKT = secrets.token_hex(32)
JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ"
       ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")
REGISTERED = "Serv3r-Cr3dential!" + secrets.token_hex(4)

# (id, text, secret): `secret` must be gone from `text` once redacted.
SHAPES = [
    ("plex-token-query", "GET https://plex.example:32400/library/sections?X-Plex-Token=Zx9yQw3rT5uV7bN1mK2p&limit=10",
     "Zx9yQw3rT5uV7bN1mK2p"),
    ("plex-token-header", "header x-plex-token: Zx9yQw3rT5uV7bN1mK2q", "Zx9yQw3rT5uV7bN1mK2q"),
    ("plex-token-header-tuple", "headers=[(b'X-Plex-Token', b'Zx9yQw3rT5uV7bN1mK2r')]", "Zx9yQw3rT5uV7bN1mK2r"),
    ("api-key-query", "GET /3/movie/550?api_key=tmdbsecretvalue99&language=en", "tmdbsecretvalue99"),
    ("access-token-query", "GET /callback?access_token=atok-123456789&state=ok", "atok-123456789"),
    ("refresh-token-json", '{"refresh_token": "rtok-abcdefghij", "expires_in": 7776000}', "rtok-abcdefghij"),
    ("client-secret-form", "client_id=abc&client_secret=csec-0123456789&grant_type=refresh_token", "csec-0123456789"),
    ("auth-token-json", '{"user": {"authToken": "plexauth-9f8e7d6c5b", "username": "alice"}}', "plexauth-9f8e7d6c5b"),
    ("access-token-json", '{"accessToken":"acc-abcdef123456"}', "acc-abcdef123456"),
    ("auth-token-repr", "{'authToken': 'plexauth-0a1b2c3d4e'}", "plexauth-0a1b2c3d4e"),
    ("authorization-bearer", "Authorization: Bearer trakt-oauth-token-xyz123", "trakt-oauth-token-xyz123"),
    ("bearer-alone", "sent bearer tmdbv4readtoken.part2", "tmdbv4readtoken.part2"),
    ("trakt-api-key", "trakt-api-key: clientid-value-777", "clientid-value-777"),
    ("surrogate", f"resolved surrogate {SURROGATE} for user 3", SURROGATE),
    ("tmdb-v3-hex", f"using key {TMDB_V3} now", TMDB_V3),
    ("trakt-64-hex", f"token {TRAKT}.", TRAKT),
    ("jwt", f"id token {JWT} received", JWT),
    ("registered", f"injecting {REGISTERED} upstream", REGISTERED),
]
SHAPE_IDS = [s[0] for s in SHAPES]

ORDINARY = [
    "route plex.library.sections matched rule tmdb-images",
    "cache refreshed at 2024-05-01T12:30:45.123Z (+00:00)",
    "abcdefghijklmnopqrst",  # a 20-char word without a token prefix
    "request 123e4567-e89b-12d3-a456-426614174000 done",
    "token expired, asking the user to sign in again",
    "the bearer of bad news",
    "pj_short is not a surrogate",
    "commit 3f2a9c1d0e8b7a6f5e4d3c2b1a0f9e8d7c6b5a49 deployed",  # 40 hex: neither shape
    "GET /library/metadata/1234?includeExtras=1&limit=50 200 12.5ms",
    '{"authToken": null, "status": "ok"}',
]


@pytest.fixture(autouse=True)
def registry():
    saved = (set(RedactSecrets._registered), RedactSecrets._registered_re)
    RedactSecrets.register(REGISTERED)
    yield
    RedactSecrets._registered, RedactSecrets._registered_re = saved


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.setFormatter(JsonFormatter("test"))
        self.addFilter(RedactSecrets())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def log():
    logger = logging.getLogger(f"test.redact.{secrets.token_hex(4)}")
    handler = ListHandler()
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.lines = handler.lines
    yield logger
    logger.removeHandler(handler)


def only_line(log) -> tuple[str, dict]:
    assert len(log.lines) == 1
    return log.lines[0], json.loads(log.lines[0])


@pytest.mark.parametrize(("text", "secret"), [s[1:] for s in SHAPES], ids=SHAPE_IDS)
def test_redact_string(text, secret):
    out = RedactSecrets.redact(text)
    assert secret not in out
    assert REDACTED in out


@pytest.mark.parametrize(("text", "secret"), [s[1:] for s in SHAPES], ids=SHAPE_IDS)
def test_in_message(log, text, secret):
    log.info(text)
    line, entry = only_line(log)
    assert secret not in line
    assert REDACTED in entry["msg"]


@pytest.mark.parametrize(("text", "secret"), [s[1:] for s in SHAPES], ids=SHAPE_IDS)
def test_in_args(log, text, secret):
    log.warning("upstream call %s failed with %d", text, 502)
    line, entry = only_line(log)
    assert secret not in line
    assert entry["msg"].startswith("upstream call ") and entry["msg"].endswith(" failed with 502")


@pytest.mark.parametrize(("text", "secret"), [s[1:] for s in SHAPES], ids=SHAPE_IDS)
def test_in_exception_traceback(log, text, secret):
    def fails(url):
        raise RuntimeError(f"upstream refused {url}")

    try:
        try:
            fails(text)
        except RuntimeError as exc:
            raise ValueError(f"while handling {text}") from exc
    except ValueError:
        log.exception("request failed")
    line, entry = only_line(log)
    assert secret not in line
    assert "RuntimeError: upstream refused" in entry["exc"] and "ValueError: while handling" in entry["exc"]
    assert REDACTED in entry["exc"]


@pytest.mark.parametrize(("text", "secret"), [s[1:] for s in SHAPES], ids=SHAPE_IDS)
def test_in_fields(log, text, secret):
    fields = {"url": text, "nested": {"list": [1, text, None]}, "status": 401, "route": "plex.library"}
    log.info("request", extra={"fields": fields})
    line, entry = only_line(log)
    assert secret not in line
    assert REDACTED in entry["url"] and REDACTED in entry["nested"]["list"][1]
    assert entry["status"] == 401 and entry["route"] == "plex.library" and entry["nested"]["list"][0] == 1
    assert fields["url"] == text, "the caller's dict is not modified"


def test_field_named_like_a_credential_is_redacted_whatever_its_value(log):
    log.info("login", extra={"fields": {"authToken": "short", "X-Plex-Token": "abc", "user": "alice"}})
    _, entry = only_line(log)
    assert entry["authToken"] == REDACTED and entry["X-Plex-Token"] == REDACTED and entry["user"] == "alice"


def test_non_string_field_values(log):
    class Url:
        def __str__(self):
            return f"https://api.themoviedb.org/3/movie/1?api_key={TMDB_V3}"

    log.info("x", extra={"fields": {"url": Url(), "raw": f"Bearer {TRAKT}".encode(), "flag": True, "n": 1.5}})
    line, entry = only_line(log)
    assert TMDB_V3 not in line and TRAKT not in line
    assert entry["flag"] is True and entry["n"] == 1.5


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_text_is_left_alone(log, text):
    assert RedactSecrets.redact(text) == text
    log.info("%s", text, extra={"fields": {"detail": text}})
    _, entry = only_line(log)
    assert entry["msg"] == text and entry["detail"] == text


def test_keeps_context_around_the_secret():
    assert RedactSecrets.redact("/a?X-Plex-Token=abcdefgh123&x=1") == f"/a?X-Plex-Token={REDACTED}&x=1"
    assert RedactSecrets.redact('{"authToken": "abc12345"}') == f'{{"authToken": "{REDACTED}"}}'
    assert RedactSecrets.redact("Authorization: Bearer abcdefgh1234") == f"Authorization: Bearer {REDACTED}"
    assert RedactSecrets.redact("?access_token=aaaa&refresh_token=bbbb#f") == \
        f"?access_token={REDACTED}&refresh_token={REDACTED}#f"


def test_several_secrets_in_one_message():
    text = f"X-Plex-Token=tokentoken1 api_key={TMDB_V3} {SURROGATE} {JWT} {REGISTERED}"
    out = RedactSecrets.redact(text)
    for secret in ("tokentoken1", TMDB_V3, SURROGATE, JWT, REGISTERED):
        assert secret not in out
    assert out.count(REDACTED) == 5


def test_register():
    assert RedactSecrets.register("short7!") is False  # under 8 chars: ignored
    assert RedactSecrets.redact("a short7! b") == "a short7! b"
    assert RedactSecrets.register(None) is False and RedactSecrets.register("") is False

    first, second = "first-secret-" + secrets.token_hex(3), "zz" + secrets.token_hex(5)
    assert RedactSecrets.register(first) is True
    assert RedactSecrets.register(second) is True  # the alternation is rebuilt with both
    assert RedactSecrets.register(first) is True  # idempotent
    out = RedactSecrets.redact(f"{first} and {second} and {REGISTERED}")
    assert out == f"{REDACTED} and {REDACTED} and {REDACTED}"
    # the longest registered value wins over a registered prefix of it
    RedactSecrets.register("prefix-value")
    RedactSecrets.register("prefix-value-and-more")
    assert RedactSecrets.redact("x prefix-value-and-more y") == f"x {REDACTED} y"
    # url-encoded, as it would appear in a logged URL
    RedactSecrets.register("pa ss/word+1")
    assert RedactSecrets.redact("/x?secret=pa%20ss%2Fword%2B1") == f"/x?secret={REDACTED}"
    # regex metacharacters are literal
    RedactSecrets.register("a.b*c+d?e")
    assert RedactSecrets.redact("aXbbbcdde") == "aXbbbcdde"
    assert RedactSecrets.redact("a.b*c+d?e") == REDACTED


def test_registered_applies_to_every_filter_instance(log):
    value = "late-registered-" + secrets.token_hex(4)
    log.info("before %s", value)
    RedactSecrets.register(value)
    log.info("after %s", value)
    assert value in log.lines[0]
    assert value not in log.lines[1]


def test_args_are_rendered_then_cleared():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "token %s for %s", (SURROGATE, "alice"), None)
    assert RedactSecrets().filter(record) is True
    assert record.args is None
    assert record.msg == f"token {REDACTED} for alice"
    assert record.getMessage() == record.msg


def test_bad_format_args_do_not_raise(log):
    log.info("two %s %s", f"X-Plex-Token={SURROGATE}")  # one arg missing
    line, _ = only_line(log)
    assert SURROGATE not in line


def test_dict_args_and_percent_in_rendered_message(log):
    log.info("%(who)s used %(key)s at 100%%", {"who": "alice", "key": TMDB_V3})
    _, entry = only_line(log)
    assert entry["msg"] == f"alice used {REDACTED} at 100%"


def test_single_precompiled_pattern():
    assert isinstance(redact_mod._PATTERN, re.Pattern)
    assert isinstance(RedactSecrets._registered_re, re.Pattern)


def test_cheap():
    text = ("GET /library/metadata/1234/children?includeExtras=1&X-Plex-Token=abcdefghijklmnop "
            "200 12.5ms route=plex.library.children user=3 cache=hit ") * 2
    start = time.perf_counter()
    for _ in range(5000):
        RedactSecrets.redact(text)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"{elapsed / 5000 * 1e6:.1f} µs per message"


# --- end to end: the handler setup_logging installs -----------------------------------------------


@pytest.fixture
def root_logging():
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    yield
    root.handlers[:], root.level = saved[0], saved[1]


def test_setup_logging_installs_the_filter(root_logging, capfd):
    setup_logging("test", level="DEBUG")
    handler = logging.getLogger().handlers[0]
    assert any(isinstance(f, RedactSecrets) for f in handler.filters)

    logger = logging.getLogger("projectionist.e2e")
    logger.info("GET /library?X-Plex-Token=%s", "plexrealtoken1234")
    logger.info("proxied", extra={"fields": {"url": f"/3/search?api_key={TMDB_V3}",
                                             "headers": {"Authorization": f"Bearer {JWT}", "trakt-api-key": TRAKT}}})
    logging.getLogger("mitmproxy.proxy").warning("client sent %s", SURROGATE)
    RedactSecrets.register("env-secret-value-xyz")
    try:
        raise ConnectionError(f"upstream said: invalid token env-secret-value-xyz; body {{\"authToken\": \"{TRAKT}\"}}")
    except ConnectionError:
        logger.exception("upstream failed")

    err = capfd.readouterr().err
    for secret in ("plexrealtoken1234", TMDB_V3, JWT, TRAKT, SURROGATE, "env-secret-value-xyz", REGISTERED):
        assert secret not in err
    entries = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert len(entries) == 4
    assert all(e["service"] == "test" for e in entries)
    assert entries[0]["msg"] == f"GET /library?X-Plex-Token={REDACTED}"
    assert entries[1]["url"] == f"/3/search?api_key={REDACTED}"
    assert entries[1]["headers"] == {"Authorization": REDACTED, "trakt-api-key": REDACTED}
    assert entries[2]["logger"] == "mitmproxy.proxy" and entries[2]["msg"] == f"client sent {REDACTED}"
    assert entries[3]["level"] == "error" and "ConnectionError" in entries[3]["exc"]
    assert REDACTED in entries[3]["exc"]
