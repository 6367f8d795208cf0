#!/usr/bin/env bash
# Install the PostgreSQL server binaries (initdb, postgres) when they are missing: Debian/Ubuntu's
# `postgresql` package, quietly, without creating or starting the package's own cluster
# (infra/services.py runs its own server on 127.0.0.1 in a state folder).
set -euo pipefail
if command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-postgres: initdb not found and no apt-get here; install PostgreSQL >= 13 server binaries" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo -n"; fi
echo "ensure-postgres: installing the Debian package postgresql (server binaries)" >&2
$SUDO mkdir -p /etc/postgresql-common
echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.conf >/dev/null
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || { echo "ensure-postgres: install finished but no initdb" >&2; exit 1; }
