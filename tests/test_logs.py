"""One log format across every process, and no secret in any line: a fresh `projectionist run`
(supervisor, proxy, control plane, dashboard) with JSON logs and a log directory, after scripted
traffic (sign-in, TMDB with the server's key, Plex with real and surrogate tokens, the dashboard)."""

from __future__ import annotations

import io
import json
import logging

import pytest
import requests
from support import free_port, make_stack
from test_control_e2e import REAL_SECRETS, ControlClient

from fake_upstreams.data import PLEX_SERVER_TOKEN, TMDB_V3_KEY
from projectionist.logs import JsonFormatter, KeyValueFormatter, resolve_format, setup_logging
from projectionist.redact import RedactSecrets

pytestmark = pytest.mark.e2e

KEYS = {"ts", "level", "service", "logger", "msg"}


def test_every_process_logs_one_format_without_secrets(fakes, tmp_path, monkeypatch):
    log_dir = tmp_path / "logs"
    monkeypatch.setenv("PROJECTIONIST_LOG_FORMAT", "json")
    monkeypatch.setenv("PROJECTIONIST_LOG_DIR", str(log_dir))
    monkeypatch.setenv("PROJECTIONIST_PROXY_METRICS_PORT", str(free_port()))
    stack = make_stack(tmp_path / "home", fakes).start()
    try:
        ControlClient(stack).login()
        stack.run_client("import json, tmdbsimple; print(json.dumps(tmdbsimple.Movies(603).info()['id']))",
                         TMDB_API_KEY=TMDB_V3_KEY)
        stack.run_client(  # a real server token in the URL: swapped, never logged
            "import json, requests\n"
            f"r = requests.get({stack.plex_url!r} + '/library/sections', params={{'X-Plex-Token': {PLEX_SERVER_TOKEN!r}}})\n"
            "print(json.dumps(r.status_code))")
        stack.run_client(  # a failing upstream call with a credential in it
            "import json, requests\n"
            f"r = requests.get('https://api.themoviedb.org/3/movie/999999999', params={{'api_key': {TMDB_V3_KEY!r}}})\n"
            "print(json.dumps(r.status_code))")
        requests.get(stack.dashboard_url + "/-/versions.json?token=" + PLEX_SERVER_TOKEN, timeout=10)
        requests.get(stack.control_url + "/api/auth/plex/1?X-Plex-Token=" + PLEX_SERVER_TOKEN, timeout=10)
    finally:
        assert stack.stop() == 0
    text = stack.log_path.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    services, levels = set(), {}
    for line in lines:
        entry = json.loads(line)  # every line of every process is one JSON object
        assert KEYS <= set(entry), line
        services.add(entry["service"])
        levels.setdefault(entry["msg"].split(" ")[0], set()).add(entry["level"])
        assert not (entry["msg"].startswith(("client connect", "client disconnect", "server connect"))
                    and entry["level"] != "debug"), line
        # the scheduler's own bookkeeping is noise beside control.jobs' one line per run
        assert not (entry["logger"].startswith("apscheduler") and entry["level"] in ("debug", "info")), line
    assert {"supervisor", "proxy", "control", "dashboard"} <= services, services
    dashboard = [json.loads(line) for line in lines if json.loads(line)["logger"] == "uvicorn.access"]
    assert any(e["msg"] == "request" and e["path"] == "/-/versions.json" for e in dashboard)  # Datasette's too
    for secret in REAL_SECRETS:
        assert secret not in text, "a real credential reached the log"
    files = {p.name: p.read_text() for p in log_dir.iterdir()}
    assert {"supervisor.log", "proxy.log", "control.log", "dashboard.log"} <= set(files), files.keys()
    for name, content in files.items():
        assert content.strip(), name
        for line in content.splitlines():
            assert KEYS <= set(json.loads(line)), (name, line)
        for secret in REAL_SECRETS:
            assert secret not in content, f"a real credential reached {name}"


def test_text_format_is_key_value_and_redacted(monkeypatch):
    record = logging.LogRecord("control", logging.INFO, __file__, 1, "request with X-Plex-Token=%s", (PLEX_SERVER_TOKEN,), None)
    record.fields = {"path": "/api/x y", "status": 200}
    RedactSecrets().filter(record)
    line = KeyValueFormatter("control").format(record)
    assert line.startswith("ts=") and " level=info service=control logger=control " in line
    assert 'path="/api/x y" status=200' in line and PLEX_SERVER_TOKEN not in line
    as_json = json.loads(JsonFormatter("control").format(record))
    assert as_json["path"] == "/api/x y" and PLEX_SERVER_TOKEN not in json.dumps(as_json)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True
    assert resolve_format("auto", Terminal()) == "text"
    assert resolve_format("auto", io.StringIO()) == "json"  # a container's stderr is no terminal
    with pytest.raises(ValueError):
        resolve_format("xml")


def test_connection_noise_is_debug(capsys, monkeypatch):
    monkeypatch.setenv("PROJECTIONIST_LOG_FORMAT", "json")
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("proxy", level="INFO")
        logging.getLogger("mitmproxy.proxy.server").info("client connect")
        logging.getLogger("mitmproxy.proxy.server").info("something else")
        err = capsys.readouterr().err
        assert "client connect" not in err and "something else" in err
        setup_logging("proxy", level="DEBUG")
        logging.getLogger("mitmproxy.proxy.server").info("client disconnect")
        entry = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert entry["msg"] == "client disconnect" and entry["level"] == "debug"
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
