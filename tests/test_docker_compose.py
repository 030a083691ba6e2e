"""The Docker packaging, checked without a Docker engine.

`docker-compose config` (Debian's docker-compose 1.29, what CI installs) validates and resolves
docker-compose.yml; the resolved YAML is then checked for the three services, the shared volume,
the ports, the health checks (real readiness endpoints; start order by service_healthy), the
rules.yaml mount, PUID/PGID/TZ, the optional Redis profile and `.env.example` (every setting). The health-check commands are run for real
against stand-in servers, and the Dockerfile is read for what the image must be: python:3.12-slim,
a non-root user, the project installed, the state in /config, no secret, and commands that the
`projectionist` CLI really has.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path, PurePosixPath

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
SERVICES = ("proxy", "control", "datasette")
VOLUME = "projectionist-data"
EXPECTED_PORTS = {"proxy": {8080, 32401}, "control": {3001}, "datasette": {8001}}
EXPECTED_COMMANDS = {"proxy": "proxy", "control": "control", "datasette": "dashboard"}


# --- docker-compose config --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed, so docker-compose.yml cannot be validated: "
                    "apt-get install docker-compose  (Debian's package, compose 1.29)")
    # Only the variables the compose file uses may differ between machines: unset them so the
    # defaults written in the file are what gets checked.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROJECTIONIST_")}
    env.pop("COMPOSE_FILE", None)
    env.pop("COMPOSE_PROJECT_NAME", None)
    result = subprocess.run([exe, "-f", str(COMPOSE_FILE), "config"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, (
        f"`docker-compose -f docker-compose.yml config` exited {result.returncode}:\n"
        f"{result.stderr}{result.stdout}")
    config = yaml.safe_load(result.stdout)
    assert isinstance(config, dict) and "services" in config, result.stdout
    return config


def _volume_mounts(service: dict) -> list[dict]:
    """Normalise short ("src:dst[:mode]") and long volume syntax to {source, target, read_only}."""
    out = []
    for item in service.get("volumes", []):
        if isinstance(item, str):
            parts = item.split(":")
            mode = parts[2] if len(parts) > 2 else "rw"
            out.append({"source": parts[0], "target": parts[1],
                        "read_only": "ro" in mode.split(",")})
        else:
            out.append({"source": item.get("source"), "target": item["target"],
                        "read_only": bool(item.get("read_only"))})
    return out


def _published(service: dict) -> dict[int, tuple[str, int]]:
    """container port -> (host ip, host port) for every published port."""
    out = {}
    for item in service.get("ports", []):
        if isinstance(item, dict):
            out[int(item["target"])] = (item.get("host_ip", ""), int(item["published"]))
            continue
        spec = str(item).split("/")[0]
        parts = spec.split(":")
        container = int(parts[-1])
        host_port = int(parts[-2]) if len(parts) >= 2 else container
        host_ip = parts[-3] if len(parts) >= 3 else ""
        out[container] = (host_ip, host_port)
    return out


def test_the_three_services_exist(compose):
    assert set(SERVICES) <= set(compose["services"]), sorted(compose["services"])


@pytest.mark.parametrize("name", SERVICES)
def test_service_runs_its_subcommand_from_the_one_image(compose, name):
    service = compose["services"][name]
    command = service["command"]
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    assert argv == ["projectionist", EXPECTED_COMMANDS[name]], argv
    images = {s.get("image") for s in (compose["services"][n] for n in SERVICES)}
    assert len(images) == 1 and None not in images, f"one image for all services, got {images}"
    assert "build" in service, f"{name}: must build the image from this repository's Dockerfile"
    context = Path(service["build"]["context"] if isinstance(service["build"], dict) else service["build"])
    assert context.resolve() == REPO
    assert service.get("restart") == "unless-stopped"


def test_all_services_share_the_named_volume_at_config(compose):
    assert VOLUME in (compose.get("volumes") or {}), compose.get("volumes")
    for name in SERVICES:
        mounts = _volume_mounts(compose["services"][name])
        data = [m for m in mounts if m["target"] == "/config"]
        assert data and data[0]["source"] == VOLUME and not data[0]["read_only"], (name, mounts)
        env = compose["services"][name].get("environment", {})
        assert env.get("PROJECTIONIST_HOME", "/config") == "/config", (name, env)


@pytest.mark.parametrize("name", SERVICES)
def test_services_take_puid_pgid_and_tz(compose, name):
    env = compose["services"][name].get("environment", {})
    assert env.get("PUID") == "10001" and env.get("PGID") == "10001" and env.get("TZ") == "UTC", env


def test_no_obsolete_version_key():
    assert "version" not in yaml.safe_load(COMPOSE_FILE.read_text())


def test_redis_is_an_optional_profile(compose):
    redis = compose["services"].get("redis")
    assert redis and redis.get("profiles") == ["redis"], redis  # only with --profile redis
    assert redis["healthcheck"]["test"][:2] == ["CMD", "redis-cli"]
    for name in ("proxy", "control"):  # the shared budgets and job leases, once pointed at it
        assert "PROJECTIONIST_REDIS_URL" in compose["services"][name]["environment"], name
        assert "redis" not in (compose["services"][name].get("depends_on") or {}), name


def test_ports_are_the_no_docker_defaults(compose):
    for name, ports in EXPECTED_PORTS.items():
        published = _published(compose["services"][name])
        assert set(published) == ports, (name, published)
        for container_port, (_ip, host_port) in published.items():
            assert host_port == container_port, (name, published)
        env = compose["services"][name].get("environment", {})
        for var, default in (("PROJECTIONIST_PROXY_PORT", 8080), ("PROJECTIONIST_CONTROL_PORT", 3001),
                             ("PROJECTIONIST_DASHBOARD_PORT", 8001)):
            assert int(env.get(var, default)) == default, (name, var, env.get(var))
        assert env.get("PROJECTIONIST_HOST", "0.0.0.0") == "0.0.0.0", (name, env)


def test_published_plex_port_is_the_reverse_listener_in_rules_yaml(compose):
    rules = yaml.safe_load((REPO / "rules.yaml").read_text())
    listen = {u["listen"] for u in rules["upstreams"].values() if "listen" in u}
    assert listen and listen <= set(_published(compose["services"]["proxy"])), listen


@pytest.mark.parametrize("name", SERVICES)
def test_each_service_has_a_healthcheck(compose, name):
    check = compose["services"][name].get("healthcheck")
    assert check and not check.get("disable"), (name, check)
    test = check["test"]
    assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, test


def test_services_start_once_what_they_need_is_healthy(compose):
    expected = {"control": {"proxy"}, "datasette": {"proxy", "control"}}
    for name, needs in expected.items():
        depends = compose["services"][name].get("depends_on")
        assert isinstance(depends, dict) and set(depends) == needs, (name, depends)
        assert all(d.get("condition") == "service_healthy" for d in depends.values()), (name, depends)


def test_proxy_healthcheck_asks_the_proxys_readiness_endpoint(compose):
    command = " ".join(compose["services"]["proxy"]["healthcheck"]["test"])
    assert "/health" in command and "PROJECTIONIST_PROXY_METRICS_PORT" in command, command
    env = compose["services"]["proxy"]["environment"]
    assert env["PROJECTIONIST_PROXY_METRICS_PORT"] == "9464"
    assert 9464 not in _published(compose["services"]["proxy"])  # /metrics is not published


def _env_example() -> dict[str, str]:
    out = {}
    for line in (REPO / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_env_example_names_every_setting_the_containers_read(compose):
    example = _env_example()
    code = set()
    for package in ("launcher", "projectionist", "control", "proxy_addons"):
        for path in (REPO / package).rglob("*.py"):
            code |= set(re.findall(r"PROJECTIONIST_[A-Z0-9_]+", path.read_text()))
    # set by the compose file or the image itself, or internal to one process tree
    internal = {"PROJECTIONIST_HOME", "PROJECTIONIST_HOST", "PROJECTIONIST_PROXY_PORT", "PROJECTIONIST_CONTROL_PORT",
                "PROJECTIONIST_DASHBOARD_PORT", "PROJECTIONIST_PROXY_METRICS_PORT", "PROJECTIONIST_RULES",
                "PROJECTIONIST_DATASETTE_METADATA", "PROJECTIONIST_DEMO_PORT", "PROJECTIONIST_DASHBOARD_PASSWORD_HASH",
                "PROJECTIONIST_VENV",
                "PROJECTIONIST_PROXY_WORKER"}  # a worker's index, set by its supervisor
    assert code - internal <= set(example), sorted(code - internal - set(example))
    passed = set()
    for service in compose["services"].values():
        passed |= set(service.get("environment", {}))
    interpolation_only = {"PROJECTIONIST_PUBLISH", "PROJECTIONIST_RULES_DIR"}
    assert set(example) - interpolation_only <= passed, sorted(set(example) - interpolation_only - passed)
    assert not any(v for k, v in example.items() if re.search("SECRET|TOKEN|PASS|KEY", k)), "no secret values"
    assert ".env" in (REPO / ".gitignore").read_text().split()


def test_rules_are_a_read_only_directory_mount_so_edits_hot_reload(compose):
    proxy = compose["services"]["proxy"]
    rules = PurePosixPath(proxy["environment"]["PROJECTIONIST_RULES"])
    mounts = {m["target"]: m for m in _volume_mounts(proxy)}
    # The directory, not the file: a single-file bind mount neither delivers change events to the
    # watch on its directory nor follows an editor's save-by-rename.
    mount = mounts.get(str(rules.parent))
    assert mount is not None, f"{rules.parent} is not mounted: {mounts}"
    assert mount["read_only"], mount
    source = Path(mount["source"])
    assert source.is_absolute() and (source / rules.name).is_file(), mount


# --- the health checks, run for real ----------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _StandIn(http.server.BaseHTTPRequestHandler):
    health_status = "ok"
    health_code = 200

    def do_GET(self):  # noqa: N802
        if self.path == "/health":
            body = json.dumps({"status": self.health_status}).encode()
        elif self.path == "/-/versions.json":
            body = json.dumps({"datasette": {"version": "0.65.5"}}).encode()
        else:
            self.send_error(404)
            return
        self.send_response(self.health_code if self.path == "/health" else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        _StandIn.health_status, _StandIn.health_code = "ok", 200
        server.shutdown()
        server.server_close()


def _run_healthcheck(compose, name: str, port: int) -> int:
    test = compose["services"][name]["healthcheck"]["test"]
    if test[0] == "CMD-SHELL":
        argv = ["sh", "-c", test[1]]
    else:
        argv = list(test[1:])
    assert argv[0] in ("python", "python3"), f"{name}: the slim image has python, not curl: {argv}"
    argv[0] = sys.executable
    env = dict(os.environ, PROJECTIONIST_PROXY_PORT=str(port), PROJECTIONIST_CONTROL_PORT=str(port),
               PROJECTIONIST_DASHBOARD_PORT=str(port), PROJECTIONIST_PROXY_METRICS_PORT=str(port),
               # A proxy configured in the container must not capture the loopback check.
               HTTP_PROXY="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9", NO_PROXY="", no_proxy="")
    timeout = int(str(compose["services"][name]["healthcheck"].get("timeout", "5s")).rstrip("s")) + 5
    return subprocess.run(argv, env=env, capture_output=True, timeout=timeout).returncode


@pytest.mark.parametrize("name", SERVICES)
def test_healthcheck_passes_when_the_service_answers(compose, stand_in, name):
    assert _run_healthcheck(compose, name, stand_in.server_address[1]) == 0


@pytest.mark.parametrize("name", SERVICES)
def test_healthcheck_fails_when_nothing_listens(compose, name):
    assert _run_healthcheck(compose, name, _free_port()) != 0


def test_healthcheck_fails_when_not_ready(compose, stand_in):
    _StandIn.health_status = "degraded"
    assert _run_healthcheck(compose, "proxy", stand_in.server_address[1]) != 0


def test_control_healthcheck_degraded_by_plex_is_up_but_database_down_is_not(compose, stand_in):
    """Plex unreachable: /health says "degraded" with 200 (the control plane works, and /setup says
    why); the database unavailable: 503."""
    _StandIn.health_status = "degraded"
    assert _run_healthcheck(compose, "control", stand_in.server_address[1]) == 0
    _StandIn.health_code = 503
    assert _run_healthcheck(compose, "control", stand_in.server_address[1]) != 0


# --- Dockerfile ------------------------------------------------------------------------------------

def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # comment lines inside a continuation are removed by Docker too
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, args = current.partition(" ")
        out.append((keyword.upper(), args.strip()))
        current = ""
    return out


def _stages(instructions):
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in instructions:
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, args))
    return stages


def _env_pairs(args: str) -> dict[str, str]:
    tokens = shlex.split(args)
    if tokens and "=" not in tokens[0]:  # legacy `ENV KEY value with spaces`
        return {tokens[0]: " ".join(tokens[1:])}
    return dict(token.split("=", 1) for token in tokens)


def _exec_form(args: str) -> list[str]:
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return shlex.split(args)
    assert isinstance(value, list), args
    return value


@pytest.fixture(scope="module")
def dockerfile():
    instructions = _instructions(DOCKERFILE.read_text())
    args = {}
    for keyword, rest in instructions:
        if keyword == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key] = value
        if keyword == "FROM":
            break
    return instructions, args


@pytest.fixture(scope="module")
def cli_subcommands() -> set[str]:
    result = subprocess.run([sys.executable, "-m", "launcher", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    groups = [set(g.split(",")) for g in re.findall(r"\{([\w,-]+)\}", result.stdout)]
    commands = [g for g in groups if "run" in g]  # not the choices of an option (--log-format)
    assert commands, result.stdout
    return commands[0]


def _final_stage(dockerfile):
    instructions, _ = dockerfile
    return _stages(instructions)[-1]


def test_image_is_python_312_slim(dockerfile):
    instructions, args = dockerfile
    aliases: set[str] = set()
    for stage in _stages(instructions):
        words = stage[0][1].split()
        words = [w for w in words if not w.startswith("--")]  # --platform=...
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), words[0])
        if image not in aliases:  # FROM <earlier stage> is fine, any real base must be the slim one
            assert image == "python:3.12-slim", stage[0]
        if len(words) == 3 and words[1].upper() == "AS":
            aliases.add(words[2])


def test_image_runs_its_services_as_puid_pgid_never_root(dockerfile):
    """Either the image's USER is not root, or its entrypoint drops to PUID:PGID (run here for real)."""
    stage = _final_stage(dockerfile)
    users = [args for keyword, args in stage if keyword == "USER"]
    user = users[-1].split(":")[0] if users else "root"
    if user not in ("root", "0"):
        return
    entrypoint = [_exec_form(a) for k, a in stage if k == "ENTRYPOINT"]
    assert entrypoint, "a root image needs an entrypoint that drops privileges"
    copied = {shlex.split(a)[-1]: shlex.split(a)[-2] for k, a in stage if k == "COPY" and "--from" not in a}
    script = REPO / copied[entrypoint[-1][0]]
    if os.geteuid() != 0:
        pytest.skip("running the entrypoint's privilege drop needs root")
    import tempfile

    base = Path(tempfile.mkdtemp())  # pytest's own tmp dirs are 0700: another user cannot enter them
    base.chmod(0o755)
    try:
        env = dict(os.environ, PROJECTIONIST_HOME=str(base / "config"), PUID="65534", PGID="65534")
        out = subprocess.run([str(script), "sh", "-c", "id -u; id -g; touch \"$PROJECTIONIST_HOME/w\""],
                             env=env, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and out.stdout.split() == ["65534", "65534"], out
        assert (base / "config").stat().st_uid == 65534 and (base / "config" / "w").stat().st_uid == 65534
    finally:
        shutil.rmtree(base, ignore_errors=True)
    refused = subprocess.run([str(script), "true"], env=dict(env, PUID="0"), capture_output=True, text=True)
    assert refused.returncode != 0 and "root" in refused.stderr


def test_image_installs_the_project(dockerfile):
    instructions, _ = dockerfile
    runs = " ".join(args for keyword, args in instructions if keyword == "RUN")
    assert re.search(r"pip install (\S+ )*\.(\s|$)", runs), runs


def test_image_environment(dockerfile):
    env: dict[str, str] = {}
    for keyword, args in _final_stage(dockerfile):
        if keyword == "ENV":
            env.update(_env_pairs(args))
    assert env.get("PROJECTIONIST_HOME") == "/config", env
    assert env.get("PROJECTIONIST_HOST") == "0.0.0.0", env
    # rules.yaml and datasette_metadata.yml are copied in, and the variables name the copies (the
    # installed package's repo-relative defaults do not exist in an image).
    copied: dict[str, str] = {}
    for keyword, args in _final_stage(dockerfile):
        if keyword == "COPY" and "--from" not in args:
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            *sources, dest = parts
            for source in sources:
                target = dest + Path(source).name if dest.endswith("/") else dest
                copied[Path(source).name] = target
    assert copied.get("rules.yaml") == env.get("PROJECTIONIST_RULES"), (copied, env)
    assert copied.get("datasette_metadata.yml") == env.get("PROJECTIONIST_DATASETTE_METADATA"), (copied, env)


def test_image_bakes_in_no_secret(dockerfile):
    instructions, _ = dockerfile
    secretish = re.compile(r"secret|token|passw|api_?key|private", re.I)
    for keyword, args in instructions:
        if keyword == "ENV":
            names = _env_pairs(args)
        elif keyword == "ARG":
            names = {args.split("=", 1)[0]: ""}
        else:
            continue
        bad = [name for name in names if secretish.search(name)]
        assert not bad, f"{keyword} {args}: secrets belong in the environment at run time"
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    for pattern in (".git", ".env", "**/*.db", "**/*.pem", "**/*.key"):
        assert pattern in ignored, f".dockerignore must exclude {pattern}"


def _subcommand(argv: list[str]) -> str:
    assert "projectionist" in argv, argv
    rest = argv[argv.index("projectionist") + 1:]
    assert rest, argv
    return rest[0]


def test_dockerfile_command_is_a_real_subcommand(dockerfile, cli_subcommands):
    stage = _final_stage(dockerfile)
    entrypoint = [_exec_form(a) for k, a in stage if k == "ENTRYPOINT"]
    cmd = [_exec_form(a) for k, a in stage if k == "CMD"]
    assert cmd or entrypoint, "the image needs a default command"
    argv = (entrypoint[-1] if entrypoint else []) + (cmd[-1] if cmd else [])
    assert _subcommand(argv) in cli_subcommands, (argv, cli_subcommands)


def test_compose_commands_are_real_subcommands(compose, cli_subcommands):
    for name in SERVICES:
        command = compose["services"][name]["command"]
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        assert _subcommand(argv) in cli_subcommands, (name, argv, cli_subcommands)


# --- with a Docker engine: build and bring the stack up ------------------------------------------

def _docker_engine() -> str | None:
    exe = shutil.which("docker")
    if exe is None:
        return None
    probe = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=30)
    return exe if probe.returncode == 0 else None


def test_the_stack_builds_and_becomes_healthy_with_a_docker_engine(tmp_path):
    exe = _docker_engine()
    if exe is None:
        pytest.skip("no Docker engine on this machine (docker info fails or docker is absent): "
                    "the image is not built and the stack not started; `docker-compose config` is checked above")
    project = f"pjtest{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROJECTIONIST_")}
    base = [exe, "compose", "-p", project, "-f", str(COMPOSE_FILE)]
    try:
        up = subprocess.run([*base, "up", "-d", "--build", "--wait"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=1200)
        assert up.returncode == 0, up.stderr[-3000:]
        ps = subprocess.run([*base, "ps", "--format", "json"], cwd=REPO, env=env, capture_output=True, text=True)
        assert ps.returncode == 0 and "healthy" in ps.stdout, ps.stdout
    finally:
        subprocess.run([*base, "down", "-v"], cwd=REPO, env=env, capture_output=True, timeout=300)
