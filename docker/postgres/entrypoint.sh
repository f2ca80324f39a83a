#!/usr/bin/env bash
# Starts one Postgres node of a Shardline cluster.
#
#   ROLE=primary (default)   initdb, settings for streaming replication and
#                            two-phase commit, users and database, then the
#                            SQL files in /docker-entrypoint-initdb.d
#   ROLE=replica             pg_basebackup from PRIMARY_HOST, then a standby
#                            streaming from it
#
# Environment (defaults in brackets):
#   POSTGRES_PASSWORD          the superuser's password [postgres]
#   APP_USER, APP_PASSWORD     a login role (SCRAM) [app, app]
#   APP_DATABASE               a database owned by APP_USER [app]
#   REPLICATION_PASSWORD       password of role `replicator` [replicator]
#   PRIMARY_HOST, PRIMARY_PORT the primary a replica follows [-, 5432]
#   WAL_LEVEL                  [logical] (logical replication, for online moves)
#   MAX_PREPARED_TRANSACTIONS  [64] (Shardline's two-phase commit needs > 0)
#   POSTGRES_ARGS              extra `-c name=value` arguments for postgres
#
# A data directory that already holds a cluster is started as it is (a
# restarted container keeps its role, a promoted replica stays a primary).
set -euo pipefail

role="${ROLE:-primary}"
data="${PGDATA:-/var/lib/postgresql/data}"
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }

install -d -o postgres -g postgres -m 0700 "$data"
install -d -o postgres -g postgres /var/run/postgresql

if [ ! -s "$data/PG_VERSION" ]; then
    case "$role" in
    primary)
        pwfile="$(mktemp)"
        printf '%s\n' "${POSTGRES_PASSWORD:-postgres}" >"$pwfile"
        chown postgres "$pwfile"
        as_postgres initdb -D "$data" -U postgres --pwfile="$pwfile" \
            --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >/dev/null
        rm -f "$pwfile"
        cat >>"$data/postgresql.conf" <<CONF
listen_addresses = '*'
wal_level = ${WAL_LEVEL:-logical}
max_wal_senders = 16
wal_keep_size = '256MB'
hot_standby = on
hot_standby_feedback = on
max_prepared_transactions = ${MAX_PREPARED_TRANSACTIONS:-64}
max_connections = 200
CONF
        cat >>"$data/pg_hba.conf" <<HBA
host replication replicator all scram-sha-256
host all all all scram-sha-256
HBA
        as_postgres pg_ctl -D "$data" -o "-c listen_addresses=''" -w start >/dev/null
        psql=(as_postgres psql -X -q -v ON_ERROR_STOP=1 -U postgres)
        "${psql[@]}" -d postgres <<SQL
CREATE ROLE replicator REPLICATION LOGIN PASSWORD '${REPLICATION_PASSWORD:-replicator}';
CREATE ROLE "${APP_USER:-app}" LOGIN PASSWORD '${APP_PASSWORD:-app}';
CREATE DATABASE "${APP_DATABASE:-app}" OWNER "${APP_USER:-app}";
SQL
        for f in /docker-entrypoint-initdb.d/*.sql; do
            [ -e "$f" ] || continue
            echo "shardline-postgres: running $f"
            "${psql[@]}" -d postgres -f "$f"
        done
        as_postgres pg_ctl -D "$data" -m fast -w stop >/dev/null
        echo "shardline-postgres: primary initialised"
        ;;
    replica)
        : "${PRIMARY_HOST:?a replica needs PRIMARY_HOST}"
        port="${PRIMARY_PORT:-5432}"
        echo "shardline-postgres: waiting for primary $PRIMARY_HOST:$port"
        until pg_isready -q -h "$PRIMARY_HOST" -p "$port" -U replicator; do sleep 0.5; done
        export PGPASSWORD="${REPLICATION_PASSWORD:-replicator}"
        # The primary answers before its first start's initialisation is
        # over; retry until the replication role exists.
        until as_postgres env PGPASSWORD="$PGPASSWORD" pg_basebackup -h "$PRIMARY_HOST" -p "$port" \
            -U replicator -D "$data" -X stream -R -c fast 2>/tmp/basebackup.err; do
            rm -rf "${data:?}"/*
            sleep 1
        done
        unset PGPASSWORD
        echo "shardline-postgres: replica of $PRIMARY_HOST:$port initialised"
        ;;
    *)
        echo "shardline-postgres: ROLE must be primary or replica, not '$role'" >&2
        exit 2
        ;;
    esac
fi

# shellcheck disable=SC2086
exec setpriv --reuid=postgres --regid=postgres --init-groups postgres -D "$data" ${POSTGRES_ARGS:-}
