#!/usr/bin/env bash
# Installs what running and testing Shardline needs on Debian/Ubuntu, skipping
# what is already there: PostgreSQL server binaries (pg_ctl, initdb, postgres),
# psql and pgbench, openssl (test certificates), Node.js, a JDK and Go, and the
# Python, Node, Java (PgJDBC) and Go (pgx) drivers of the driver matrix.
# The benchmarks' comparison tools are optional: --with-pgbouncer installs
# PgBouncer and valgrind (shardline-bench --instructions counts with callgrind).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

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
python3 -m pip --version >/dev/null 2>&1 || packages+=(python3-pip)
command -v npm >/dev/null 2>&1 || packages+=(npm)
command -v javac >/dev/null 2>&1 || packages+=(default-jdk-headless)
[ -f /usr/share/java/postgresql.jar ] || packages+=(libpostgresql-jdbc-java)
# pgx (Go), from Debian's packages: built in GOPATH mode, no module download.
command -v go >/dev/null 2>&1 || packages+=(golang-go)
[ -d /usr/share/gocode/src/github.com/jackc/pgx/v4 ] || packages+=(golang-github-jackc-pgx-v4-dev)
if [ "${1:-}" = "--with-pgbouncer" ]; then
  if ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
    packages+=(pgbouncer)
  fi
  command -v valgrind >/dev/null 2>&1 || packages+=(valgrind)
fi
if [ "${#packages[@]}" -gt 0 ]; then
  echo "setup: installing ${packages[*]}"
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq "${packages[@]}" >/dev/null
fi
# Postgres refuses to run as root; as root the servers run as 'postgres'.
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  useradd --system --create-home postgres
fi
# Python drivers for the driver matrix (tests/tests/drivers.rs).
if ! python3 -c 'import psycopg, asyncpg, sqlalchemy, psycopg2' >/dev/null 2>&1; then
  echo "setup: installing psycopg 3, asyncpg, SQLAlchemy, psycopg2"
  py_drivers=('psycopg[binary]>=3.1' 'asyncpg>=0.29' 'sqlalchemy>=2.0' 'psycopg2-binary>=2.9')
  python3 -m pip install --quiet --disable-pip-version-check "${py_drivers[@]}" ||
    python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "${py_drivers[@]}"
fi
# node-postgres for the driver matrix, into tests/drivers/node/node_modules.
node_dir="$(dirname "$0")/../tests/drivers/node"
if [ ! -d "$node_dir/node_modules/pg" ]; then
  echo "setup: installing node-postgres"
  (cd "$node_dir" && npm install --silent --no-audit --no-fund >/dev/null)
fi
echo "setup: ready"
