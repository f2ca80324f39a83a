#!/usr/bin/env bash
# Installs what running and testing Shardline needs on Debian/Ubuntu, skipping
# what is already there: PostgreSQL server binaries (pg_ctl, initdb, postgres),
# psql and pgbench, openssl (test certificates), Node.js, a JDK and Go, the
# Python, Node, Java (PgJDBC) and Go (pgx) drivers of the driver matrix, and
# cargo-nextest (the tests' runner).
# The benchmarks' comparison tools are optional: --with-pgbouncer installs
# PgBouncer and valgrind (shardline-bench --instructions counts with callgrind).
# --with-docker installs a Docker engine (Debian's docker.io), debootstrap
# (the base image where no registry answers) and docker-compose where the
# CLI has no compose plugin, and starts the engine when none runs: the
# container tier (tests/tests/containers.rs). --demo installs only what
# `shardline demo` needs (the Postgres binaries and psql).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

demo=0 pgbouncer=0 docker=0
for arg in "$@"; do
  case "$arg" in
  --demo) demo=1 ;;
  --with-pgbouncer) pgbouncer=1 ;;
  --with-docker) docker=1 ;;
  *) echo "usage: scripts/setup-debian.sh [--demo] [--with-pgbouncer] [--with-docker]" >&2; exit 2 ;;
  esac
done

sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"

have_pg_server() {
  command -v pg_ctl >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null
}

packages=()
have_pg_server || packages+=(postgresql postgresql-contrib)
command -v psql >/dev/null 2>&1 || packages+=(postgresql-client)
command -v pgbench >/dev/null 2>&1 || packages+=(postgresql-contrib)
command -v openssl >/dev/null 2>&1 || packages+=(openssl)
if [ "$demo" = 0 ]; then
  python3 -m pip --version >/dev/null 2>&1 || packages+=(python3-pip)
  command -v npm >/dev/null 2>&1 || packages+=(npm)
  command -v javac >/dev/null 2>&1 || packages+=(default-jdk-headless)
  [ -f /usr/share/java/postgresql.jar ] || packages+=(libpostgresql-jdbc-java)
  # pgx (Go), from Debian's packages: built in GOPATH mode, no module download.
  command -v go >/dev/null 2>&1 || packages+=(golang-go)
  [ -d /usr/share/gocode/src/github.com/jackc/pgx/v4 ] || packages+=(golang-github-jackc-pgx-v4-dev)
  # A PgBouncer exporter, scraping the admin console in the tests.
  command -v prometheus-pgbouncer-exporter >/dev/null 2>&1 || packages+=(prometheus-pgbouncer-exporter)
  # promtool checks the proxy's /metrics output in the tests.
  command -v promtool >/dev/null 2>&1 || packages+=(prometheus)
fi
if [ "$docker" = 1 ]; then
  command -v dockerd >/dev/null 2>&1 || packages+=(docker.io)
  command -v debootstrap >/dev/null 2>&1 || packages+=(debootstrap)
  if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
    packages+=(docker-compose)
  fi
fi
if [ "$pgbouncer" = 1 ]; then
  if ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
    packages+=(pgbouncer)
  fi
  command -v valgrind >/dev/null 2>&1 || packages+=(valgrind)
fi
if [ "${#packages[@]}" -gt 0 ]; then
  echo "setup: installing ${packages[*]}"
  $sudo apt-get update -qq
  # Packages that ship a service (prometheus, the exporter) must not start
  # one on a shared port: the tests run what they need themselves.
  no_services=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod +x /usr/sbin/policy-rc.d
    no_services=1
  fi
  $sudo apt-get install -y -qq "${packages[@]}" >/dev/null
  if [ "$no_services" = 1 ]; then
    $sudo rm -f /usr/sbin/policy-rc.d
  fi
fi
# Postgres refuses to run as root; as root the servers run as 'postgres'.
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  useradd --system --create-home postgres
fi
if [ "$docker" = 1 ] && ! docker version >/dev/null 2>&1; then
  # No engine answers: start one (systemd where it runs, else dockerd itself).
  if [ -d /run/systemd/system ]; then
    $sudo systemctl start docker
  else
    echo "setup: starting dockerd (log: /var/log/shardline-dockerd.log)"
    $sudo sh -c 'nohup dockerd >/var/log/shardline-dockerd.log 2>&1 &'
  fi
  for _ in $(seq 1 60); do
    docker version >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker version >/dev/null 2>&1 || { echo "setup: the Docker engine did not start" >&2; tail -20 /var/log/shardline-dockerd.log >&2 || true; exit 1; }
fi
if [ "$demo" = 1 ]; then
  echo "setup: ready"
  exit 0
fi
# Python drivers for the driver matrix (tests/tests/drivers.rs).
if ! python3 -c 'import psycopg, asyncpg, sqlalchemy, psycopg2, greenlet' >/dev/null 2>&1; then
  echo "setup: installing psycopg 3, asyncpg, SQLAlchemy (with greenlet, for its asyncio API), psycopg2"
  py_drivers=('psycopg[binary]>=3.1' 'asyncpg>=0.29' 'sqlalchemy>=2.0' 'greenlet>=3' 'psycopg2-binary>=2.9')
  python3 -m pip install --quiet --disable-pip-version-check "${py_drivers[@]}" ||
    python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "${py_drivers[@]}"
fi
# cargo-nextest runs the process tier (scripts/test.sh), from crates.io.
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest (cargo install, a few minutes)"
  cargo install --locked --quiet cargo-nextest
fi
# node-postgres for the driver matrix, into tests/drivers/node/node_modules.
node_dir="$(dirname "$0")/../tests/drivers/node"
if [ ! -d "$node_dir/node_modules/pg" ]; then
  echo "setup: installing node-postgres"
  (cd "$node_dir" && npm install --silent --no-audit --no-fund >/dev/null)
fi
echo "setup: ready"
