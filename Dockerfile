# Projectionist: one image for all three services (see docker-compose.yml).
#
#   docker build -t projectionist .
#   docker run --rm -p 127.0.0.1:8080:8080 -p 127.0.0.1:32401:32401 -p 127.0.0.1:3001:3001 \
#       -p 127.0.0.1:8001:8001 -v projectionist-data:/config projectionist    # everything in one container
#
# No secret is baked in: upstream credentials, keys and the proxy's CA are created at run time under
# PROJECTIONIST_HOME (/config, a volume). The services run as PUID:PGID (default 10001), never as
# root: the entrypoint (docker/entrypoint.sh) gives them /config and drops privileges; TZ sets the
# time zone of scheduled jobs (tzdata comes with the Python dependencies). Rules and Datasette metadata are copied to /etc/projectionist;
# mount a directory over them (docker-compose.yml does) and point PROJECTIONIST_RULES at it.

ARG PYTHON_IMAGE=python:3.12-slim

# --- build: install the project and its dependencies into a virtualenv ---------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# .dockerignore keeps .git, tests, local databases, caches and keys out of the context.
COPY . .
RUN pip install .

# --- runtime --------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="projectionist" \
      org.opencontainers.image.description="mitmproxy-based proxy, aiohttp control plane and Datasette dashboard for self-hosted Plex web players"

# /config belongs to the default service user before VOLUME: a new named volume copies this
# ownership (the entrypoint re-owns it for another PUID/PGID). Every service, Datasette included
# (its WAL -shm file), writes there.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/projectionist \
        --shell /usr/sbin/nologin projectionist \
    && mkdir -p /config /etc/projectionist \
    && chown projectionist:projectionist /config

COPY --from=build /opt/venv /opt/venv
COPY rules.yaml datasette_metadata.yml /etc/projectionist/
COPY docker/entrypoint.sh /usr/local/bin/projectionist-entrypoint

# The package is installed (not run from a checkout), so its repo-relative defaults for rules.yaml
# and datasette_metadata.yml do not exist: name the copies above explicitly.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PROJECTIONIST_HOME=/config \
    PROJECTIONIST_HOST=0.0.0.0 \
    PROJECTIONIST_RULES=/etc/projectionist/rules.yaml \
    PROJECTIONIST_DATASETTE_METADATA=/etc/projectionist/datasette_metadata.yml \
    PROJECTIONIST_PROXY_PORT=8080 \
    PROJECTIONIST_CONTROL_PORT=3001 \
    PROJECTIONIST_DASHBOARD_PORT=8001 \
    PUID=10001 \
    PGID=10001 \
    TZ=UTC

# Root only until the entrypoint has handed /config to PUID:PGID and dropped to that user.
USER root
WORKDIR /config
VOLUME ["/config"]
ENTRYPOINT ["/usr/local/bin/projectionist-entrypoint"]

# proxy (explicit HTTPS proxy), Plex reverse listener (rules.yaml `listen`), control plane, Datasette
EXPOSE 8080 32401 3001 8001

# Without a command the container runs everything (`projectionist run`); docker-compose.yml runs
# one service per container with `projectionist proxy|control|dashboard` instead.
CMD ["projectionist", "run"]
