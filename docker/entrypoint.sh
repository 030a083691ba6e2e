#!/bin/sh
# The image's entrypoint (linuxserver.io conventions): the services run as PUID:PGID (default
# 10001:10001), never as root. Started as root (the default), it gives the state directory
# (/config) to that user and drops privileges; started as a non-root user (`docker run --user`,
# compose `user:`) it just runs the command.
set -eu
home="${PROJECTIONIST_HOME:-/config}"
if [ "$(id -u)" = "0" ]; then
  uid="${PUID:-10001}"
  gid="${PGID:-10001}"
  case "$uid$gid" in *[!0-9]*) echo "PUID and PGID must be numbers" >&2; exit 64;; esac
  if [ "$uid" = "0" ]; then echo "PUID=0 would run the services as root: choose another user" >&2; exit 64; fi
  mkdir -p "$home"
  # Only when the owner changed (first start, or a new PUID): a big cache is not walked every time.
  if [ "$(stat -c %u:%g "$home")" != "$uid:$gid" ]; then
    chown -R "$uid:$gid" "$home"
  fi
  export HOME="$home"
  exec setpriv --reuid="$uid" --regid="$gid" --clear-groups -- "$@"
fi
exec "$@"
