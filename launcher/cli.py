"""`projectionist`: run the whole system or one of its services, and check rules.yaml.

    projectionist run [--demo]      proxy + control plane + dashboard (+ fake upstreams with --demo)
    projectionist proxy | control | dashboard
    projectionist check-rules [FILE]
    projectionist migrate
    projectionist rotate-key
    projectionist test [PYTEST ARGS]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from projectionist.config import PORT_VARIABLES, PRIVATE_UMASK, REPO_ROOT, Config, ConfigError
from projectionist.lifetime import child_preexec
from projectionist.rules import RulesError, load_rules

# Fake upstream names (fake_upstreams) -> upstream names in the shipped rules.yaml.
DEMO_UPSTREAMS = {"plex": "plex", "plextv": "plextv", "tmdb": "tmdb",
                  "tmdb_images": "tmdb-images", "trakt": "trakt"}
# Upstreams of the shipped rules.yaml that one of those fakes also serves: the fake plex.tv answers
# app.plex.tv's sign-in page (an Approve button), the fake Trakt trakt.tv/activate, in the demo.
DEMO_ALSO_SERVES = {"plex-web": "plextv", "trakt-web": "trakt"}


log = logging.getLogger("projectionist")

class StartError(Exception):
    """A service cannot start for a reason the user fixes (exit 2, one line, no traceback)."""


def service_ports(config: Config, service: str) -> list[tuple[int, str]]:
    """(port, the setting that moves it) for each port `service` listens on."""
    if service == "proxy":
        ports = [(config.proxy_port, PORT_VARIABLES["proxy"])]
        if config.proxy_metrics_port:
            ports.append((config.proxy_metrics_port, PORT_VARIABLES["proxy metrics"]))
        try:
            rules = load_rules(config.rules_path)
        except RulesError:
            return ports
        return ports + [(port, f"upstreams.{name}.listen in {config.rules_path}")
                        for port, name in rules.reverse_listeners().items()]
    return [(config.control_port if service == "control" else config.dashboard_port,
             PORT_VARIABLES["control plane" if service == "control" else "dashboard"])]


def ensure_ports_free(config: Config, service: str) -> None:
    """Fail before starting anything (so nothing is left behind) when a port is taken."""
    import errno
    import socket

    for port, setting in service_ports(config, service):
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
            try:
                probe.bind((config.host, port))
            except OSError as exc:
                why = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be used ({exc.strerror})"
                raise StartError(f"port {port} on {config.host} for the {service} {why}; "
                                 f"stop what holds it or change {setting}") from None


def cmd_check_rules(args: argparse.Namespace) -> int:
    path = Path(args.file) if args.file else Config.from_env().rules_path
    try:
        rules = load_rules(path)
    except RulesError as exc:
        print(exc, file=sys.stderr)
        print(f"{len(exc.problems)} problem(s) in {path}", file=sys.stderr)
        return 1
    for warning in rules.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{path}: OK ({len(rules.upstreams)} upstreams, {len(rules.routes)} routes"
          f"{f', {len(rules.warnings)} warning(s)' if rules.warnings else ''})")
    return 0


def cmd_migrate(_args: argparse.Namespace) -> int:
    from projectionist.store import open_db, schema_version

    config = Config.from_env()
    db = open_db(config.db_path)
    print(f"{config.db_path}: schema version {schema_version(db.conn)}")
    return 0


def cmd_rotate_key(_args: argparse.Namespace) -> int:
    from projectionist.vault import KEY_ENV, rotate_key

    config = Config.from_env()
    count = rotate_key(config.home, config.db_path)
    where = f"the key(s) in {KEY_ENV} (the first one is now the only one needed)" if os.environ.get(KEY_ENV) \
        else f"a new key in {config.home / 'secret.key'}"
    print(f"re-encrypted {count} secret(s) with {where}")
    return 0


def _passphrase(confirm: bool) -> str | None:
    from projectionist.backup import PASSPHRASE_ENV

    if os.environ.get(PASSPHRASE_ENV):
        return os.environ[PASSPHRASE_ENV]
    if not sys.stdin.isatty():
        return None
    import getpass

    phrase = getpass.getpass("Backup passphrase (protects the vault key and the proxy's CA): ")
    if confirm and phrase and getpass.getpass("Again: ") != phrase:
        raise SystemExit("the passphrases differ")
    return phrase or None


def cmd_backup(args: argparse.Namespace) -> int:
    from projectionist.backup import PASSPHRASE_ENV, BackupError, backup

    config = Config.from_env()
    phrase = None if args.no_secrets else _passphrase(confirm=True)
    if phrase is None and not args.no_secrets:
        print(f"a backup carries the vault key (without it the tokens in the database are unreadable), wrapped "
              f"with a passphrase: set {PASSPHRASE_ENV}, or pass --no-secrets if you keep secret.key elsewhere",
              file=sys.stderr)
        return 2
    try:
        result = backup(config.home, config.db_path, Path(args.file).expanduser() if args.file else None, phrase)
    except BackupError as exc:
        print(f"backup failed: {exc}", file=sys.stderr)
        return 1
    what = "database, vault key and proxy CA (passphrase-wrapped)" if result.secrets else "database only"
    print(f"{result.path}: {result.bytes} bytes, schema version {result.schema_version}, {what}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from projectionist.backup import BackupError, read_manifest, restore

    config = Config.from_env()
    archive = Path(args.file).expanduser()
    try:
        manifest = read_manifest(archive)
        phrase = _passphrase(confirm=False) if manifest.get("secrets") else None
        manifest = restore(archive, config.home, config.db_path, phrase, force=args.force)
    except BackupError as exc:
        print(f"restore failed: {exc}", file=sys.stderr)
        return 1
    print(f"restored {archive} ({manifest['created_at']}, schema version {manifest['schema_version']}, now "
          f"{manifest['migrated_to']}) into {config.home}" + ("" if manifest["secrets"] else
          "; it carried no secrets: put the vault key (secret.key or PROJECTIONIST_SECRET_KEY) back yourself"))
    return 0


def cmd_proxy(_args: argparse.Namespace) -> int:
    from proxy_addons.runner import serve

    from projectionist.logs import setup_logging

    from .workers import Supervisor, WorkersError, metrics_port, proxy_command, worker_count, worker_index

    if not sys.flags.optimize:  # started as `projectionist proxy`: the same process, with -O
        os.execv(sys.executable, [*proxy_command()[:-1], *sys.argv[1:]])
    config = Config.from_env()
    index = worker_index()
    if index is None:  # a worker's ports are its siblings' too
        ensure_ports_free(config, "proxy")
    try:
        count = worker_count(load_rules(config.rules_path))
    except RulesError as exc:
        raise StartError(f"the proxy did not start: {exc}") from None
    except WorkersError as exc:
        raise StartError(str(exc)) from None
    if count > 1 and index is None:
        setup_logging("proxy")
        ensure_proxy_ca(config)
        return Supervisor(count).run()
    setup_logging("proxy" if index is None else f"proxy-{index}")
    try:
        asyncio.run(serve(config, share_ports=index is not None, metrics_port=metrics_port(config, index)))
    except (RuntimeError, OSError) as exc:  # a listener that did not start (a port taken since the check)
        raise StartError(f"the proxy did not start: {exc}") from None
    return 0


def ensure_proxy_ca(config: Config) -> None:
    """mitmproxy creates its CA on first start when there is none; workers starting together would
    each create one, and all but the last written would sign certificates nobody trusts. The
    supervisor creates it once, as mitmproxy's tlsconfig would (CertStore.from_store)."""
    from mitmproxy import certs
    from mitmproxy.options import CONF_BASENAME, KEY_SIZE

    config.ensure_dirs()
    certs.CertStore.from_store(config.mitmproxy_confdir, CONF_BASENAME, KEY_SIZE)


def cmd_control(_args: argparse.Namespace) -> int:
    from control.app import serve

    from projectionist.logs import setup_logging

    config = Config.from_env()
    ensure_ports_free(config, "control")
    setup_logging("control")
    serve(config)
    return 0


def cmd_dashboard(_args: argparse.Namespace) -> int:
    from projectionist.dashboard import UnsafeMetadata, datasette_command, datasette_env
    from projectionist.store import open_db

    config = Config.from_env()
    ensure_ports_free(config, "dashboard")
    try:
        cmd = datasette_command(config)
        config.ensure_dirs()
        env = datasette_env(config)  # the admin password's hash, for the Basic auth plugin
    except UnsafeMetadata as exc:
        print(exc, file=sys.stderr)
        return 1
    open_db(config.db_path).conn.close()  # Datasette must find the schema, not an empty file
    os.execve(cmd[0], cmd, env)


def cmd_test(args: argparse.Namespace) -> int:
    os.chdir(REPO_ROOT)
    cmd = [sys.executable, "-m", "pytest", *args.pytest_args]
    os.execv(cmd[0], cmd)


# --- run: supervise every service ---------------------------------------------------------------

def _wait_http(url: str, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status < 500:
                    return True
        except urllib.error.HTTPError as exc:  # the dashboard answers 401 to anyone but the admin: it is up
            if exc.code == 401:
                return True
            time.sleep(0.2)
        except OSError:
            time.sleep(0.2)
    return False


def _wait_port(host: str, port: int, deadline: float) -> bool:
    import socket

    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.2)
    return False


def _start_fakes(env: dict[str, str]) -> tuple[subprocess.Popen, list[str]]:
    base_port = env.get("PROJECTIONIST_DEMO_PORT", "18100")
    fakes = subprocess.Popen([sys.executable, "-m", "fake_upstreams", "--base-port", base_port],
                             env=env, stdout=subprocess.PIPE, text=True, preexec_fn=child_preexec())
    overrides: dict[str, str] = {}
    while len(overrides) < len(DEMO_UPSTREAMS):
        line = fakes.stdout.readline()
        if not line:
            raise SystemExit("the fake upstreams did not start")
        name, sep, url = line.strip().partition("=")
        if sep and name in DEMO_UPSTREAMS:
            overrides[DEMO_UPSTREAMS[name]] = url
    for upstream, fake in DEMO_ALSO_SERVES.items():
        overrides[upstream] = overrides[DEMO_UPSTREAMS[fake]]
    return fakes, [f"{name}={url}" for name, url in overrides.items()]


def demo_credentials() -> dict[str, str]:
    """The app credentials the fake upstreams accept, which the demo's proxy injects (Trakt's
    client id and secret; the fake TMDB takes the shipped default key)."""
    from fake_upstreams.data import TRAKT_CLIENT_ID, TRAKT_CLIENT_SECRET

    return {"PROJECTIONIST_TRAKT_CLIENT_ID": TRAKT_CLIENT_ID, "PROJECTIONIST_TRAKT_CLIENT_SECRET": TRAKT_CLIENT_SECRET}


def cmd_run(args: argparse.Namespace) -> int:
    from projectionist.logs import setup_logging
    from projectionist.store import open_db

    setup_logging("supervisor")  # its own lines look like the services' (stdout keeps the banner)

    config = Config.from_env()
    try:
        from .workers import WorkersError, worker_count

        worker_count(load_rules(config.rules_path))  # a count the proxy would refuse stops run here
    except RulesError as exc:
        print(f"{exc}\nNot starting: fix {config.rules_path} first.", file=sys.stderr)
        return 1
    except WorkersError as exc:
        raise StartError(str(exc)) from None
    for service in ("proxy", "control", "dashboard"):
        ensure_ports_free(config, service)
    config.ensure_dirs()
    open_db(config.db_path).conn.close()  # migrate once, before the services race for it

    env = dict(os.environ, PROJECTIONIST_HOME=str(config.home))
    children: dict[str, subprocess.Popen] = {}
    if args.demo:
        children["fakes"], overrides = _start_fakes(env)
        env["PROJECTIONIST_UPSTREAMS"] = ",".join(overrides)
        env.update(demo_credentials())
    from .workers import proxy_command

    for service in ("proxy", "control", "dashboard"):
        # Services log to stderr (Datasette's server logs to stdout): stdout carries only the banner.
        command = proxy_command() if service == "proxy" else [sys.executable, "-m", "launcher", service]
        children[service] = subprocess.Popen(command, env=env,
                                             stdout=sys.stderr, preexec_fn=child_preexec())

    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    deadline = time.monotonic() + 60
    host = config.host
    ready = (_wait_port(host, config.proxy_port, deadline)
             and _wait_http(f"http://{host}:{config.control_port}/health", deadline)
             and _wait_http(f"http://{host}:{config.dashboard_port}/-/versions.json", deadline))
    if ready:
        print(_banner(config, demo=args.demo, upstreams=_upstream_checks(config)), flush=True)
    else:
        log.error("a service did not become ready; stopping")
        stopping = True

    exit_code = 0
    while not stopping:
        for name, child in children.items():
            if child.poll() is not None:
                log.error("a service exited; stopping", extra={"fields": {"service": name, "code": child.returncode}})
                exit_code, stopping = 1, True
                break
        time.sleep(0.5)
    _terminate(children.values())
    return exit_code or (0 if ready else 1)


def _terminate(children) -> None:
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + 10
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()


def _upstream_checks(config: Config, timeout: float = 10.0) -> dict[str, dict] | None:
    """The control plane's first check of each Plex server (its /health), or None if it is late."""
    import json

    url = f"http://{_local(config.host)}:{config.control_port}/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                health = json.load(response)
            if health.get("upstreams_checked"):
                return health.get("upstreams", {})
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    return None


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def _shown_host(host: str) -> str:
    """The host to print in URLs: a wildcard listen address is reached under this machine's name."""
    import socket

    return socket.gethostname() if host in ("", "0.0.0.0", "::") else host


def _upstream_lines(upstreams: dict[str, dict] | None) -> list[str]:
    if upstreams is None:
        return ["  Plex                  not checked yet (see /health)"]
    lines = []
    for name, check in upstreams.items():
        label = f"  Plex ({name})".ljust(24)
        if check.get("ok"):
            lines.append(f"{label}{check['url']} answers (Plex Media Server {check.get('version')})")
        else:
            lines.append(f"{label}UNREACHABLE since {check.get('since')}: {check.get('detail')}")
    return lines


def _banner(config: Config, demo: bool, upstreams: dict[str, dict] | None = None) -> str:
    from projectionist.rules import load_rules
    from projectionist.dashboard import login_hint

    rules = load_rules(config.rules_path)
    host = _shown_host(config.host)
    reverse = ", ".join(f"http://{host}:{port} ({name})"
                        for port, name in rules.reverse_listeners().items())
    return "\n".join([
        "Projectionist is running" + (" in offline demo mode (fake upstreams)" if demo else "") + ":",
        f"  explicit HTTPS proxy  http://{host}:{config.proxy_port}",
        f"  proxy PAC file        http://{host}:{config.control_port}/proxy.pac",
        f"  Plex reverse proxy    {reverse or '(none declared in rules.yaml)'}",
        *_upstream_lines(upstreams),
        f"  control plane         http://{host}:{config.control_port}/ (health: /health)",
        f"  dashboard             http://{host}:{config.dashboard_port}/",
        f"  dashboard login       {login_hint(config)}",
        f"  state                 {config.home}",
        f"  proxy CA to trust     {config.ca_cert_path} (or download it from /setup)",
        "Ctrl-C stops everything.",
        f"Next: open http://{host}:{config.control_port}/setup",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="projectionist", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from projectionist.logs import FORMAT_ENV, FORMATS

    logging_options = argparse.ArgumentParser(add_help=False)
    logging_options.add_argument("--log-format", choices=FORMATS, default=argparse.SUPPRESS,
                                 help="json | text (key=value) | auto: json unless stderr is a terminal "
                                      f"(default: {FORMAT_ENV} or auto); passed on to every service")
    parser._add_container_actions(logging_options)
    sub = parser.add_subparsers(dest="command", required=True)
    from projectionist.environment import help_for

    def add_command(name: str, **kwargs) -> argparse.ArgumentParser:
        # Each command's --help ends with the environment variables it reads.
        return sub.add_parser(name, epilog=help_for(name), formatter_class=argparse.RawDescriptionHelpFormatter,
                              description=kwargs.get("help"), **kwargs)

    workers_option = argparse.ArgumentParser(add_help=False)
    workers_option.add_argument("--workers", type=int, default=argparse.SUPPRESS, metavar="N",
                                help="proxy processes sharing its ports (default: proxy.workers, else with "
                                     "proxy.redis_url the cores, at most 4, else 1); more than 1 needs Redis")
    run = add_command("run", help="start proxy, control plane and dashboard", parents=[logging_options, workers_option])
    run.add_argument("--demo", action="store_true", help="also start fake upstreams and route to them")
    run.set_defaults(func=cmd_run)
    add_command("proxy", help="run the proxy", parents=[logging_options, workers_option]).set_defaults(func=cmd_proxy)
    for name, func, text in (("control", cmd_control, "run the control plane"),
                             ("dashboard", cmd_dashboard, "run Datasette"),
                             ("migrate", cmd_migrate, "create or migrate the database"),
                             ("rotate-key", cmd_rotate_key, "re-encrypt every stored secret under a new key")):
        add_command(name, help=text, parents=[logging_options]).set_defaults(func=func)
    backup = add_command("backup", help="write a consistent backup (safe while running)")
    backup.add_argument("file", nargs="?", help="archive to write (default: <home>/backups/projectionist-<time>.tar.gz)")
    backup.add_argument("--no-secrets", action="store_true",
                        help="leave the vault key and the proxy CA out (you keep them elsewhere)")
    backup.set_defaults(func=cmd_backup)
    restore = add_command("restore", help="bring a backup back into the home (stop the services first)")
    restore.add_argument("file")
    restore.add_argument("--force", action="store_true", help="replace an existing database and key")
    restore.set_defaults(func=cmd_restore)
    check = add_command("check-rules", help="validate rules.yaml; exit 1 with line-numbered errors")
    check.add_argument("file", nargs="?", help="the rules file to check (default: PROJECTIONIST_RULES or the shipped one)")
    check.set_defaults(func=cmd_check_rules)
    test = add_command("test", help="run the test suite (other arguments go to pytest, e.g. tests/test_rules.py -x)")
    test.set_defaults(func=cmd_test)
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "log_format", None):
        os.environ[FORMAT_ENV] = args.log_format  # this process and the services it starts
    if getattr(args, "workers", None) is not None:
        from .workers import WORKERS_ENV

        os.environ[WORKERS_ENV] = str(args.workers)  # read by the proxy (and passed to it by run)
    if args.command != "test":
        os.umask(PRIVATE_UMASK)  # state, logs and backups are private from the first file on
    if args.command == "test":
        args.pytest_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command in SERVICES:
            check_environment()
        if args.command in USES_DEFAULT_FILES and not getattr(args, "file", None):
            _install_defaults()
        return args.func(args)
    except (ConfigError, StartError) as exc:
        print(f"projectionist: {exc}", file=sys.stderr)
        return 2


# Commands that read rules.yaml or datasette_metadata.yml.
USES_DEFAULT_FILES = {"run", "proxy", "control", "dashboard", "check-rules"}
SERVICES = {"run", "proxy", "control", "dashboard"}
REDIS_SCHEMES = ("redis", "rediss", "unix")


def check_environment() -> None:
    """Every PROJECTIONIST_* value the services parse, parsed here first: a bad one is a ConfigError
    naming the variable, the value and what is allowed, before anything starts (not a traceback
    from a service that already runs beside the others)."""
    from urllib.parse import urlsplit

    from control.options import ControlOptions
    from projectionist.config import parse_overrides

    from projectionist.dashboard_guard import throttle_from_env
    from projectionist.logs import FORMAT_ENV, FORMATS, resolve_format

    def overrides() -> None:
        value = os.environ.get("PROJECTIONIST_UPSTREAMS", "")
        try:
            parse_overrides([p for p in value.split(",") if p.strip()])
        except ValueError as exc:
            raise ValueError(f"PROJECTIONIST_UPSTREAMS={value!r} is not valid: {exc}") from None

    def redis_url() -> None:  # the value is not repeated: it may hold a password
        value = os.environ.get("PROJECTIONIST_REDIS_URL", "").strip()
        if value and urlsplit(value).scheme not in REDIS_SCHEMES:
            raise ValueError("PROJECTIONIST_REDIS_URL is not valid: use a redis://, rediss:// or unix:// URL")

    def log_format() -> None:
        try:
            resolve_format()
        except ValueError:
            value = os.environ.get(FORMAT_ENV, "")
            raise ValueError(f"{FORMAT_ENV}={value!r} is not valid: use one of {', '.join(FORMATS)}") from None

    for check in (ControlOptions.from_env, overrides, redis_url, log_format, throttle_from_env):
        try:
            check()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def _install_defaults() -> None:
    """An installed package's first start copies the default files to the home (config.py); say where."""
    for path in Config.from_env().install_defaults():
        print(f"projectionist: wrote the default {path.name} to {path} (first start): edit this copy",
              file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
