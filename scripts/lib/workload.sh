# The workload the release-build scripts run a proxy under: sourced by
# scripts/hot-code.sh (functions run, for the code order) and
# scripts/pgo-build.sh (profile-guided optimization), so both learn from
# the same traffic. The caller sets `bin` (a shardline binary with the
# `demo` command) and defines `launch CONFIG`, which runs a proxy on the
# config file in its place (`exec`: stopped by SIGINT, it ends as the
# proxy does).
# Starts `shardline demo` for its servers and writes two configs over
# them: `$sharded` (the demo's: two shards with replicas, sharding, the
# result cache and metrics) and `$single` (one shard, no sharding), with
# @PORT@ and @MPORT@ for the listen and metrics ports; `run_workloads`
# profiles both under pgbench (simple, extended, prepared; reads, writes,
# keyless and merged reads, two-phase commits), the admin console and a
# metrics scrape. Files go to `$work`, a scratch directory removed on
# exit, with the processes in `pids` stopped.

work=$(mktemp -d /tmp/shardline-workload.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_port() {
    for _ in $(seq 1 600); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.2
    done
    echo "nothing listens on port $1" >&2
    return 1
}

demo_port=$(free_port)
: >"$work/demo.log"
"$bin" demo --port "$demo_port" --metrics-port "$(free_port)" >"$work/demo.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 600); do
    grep -q "Shardline demo is running" "$work/demo.log" && break
    sleep 0.5
done
data=$(grep -o "data and config: .*" "$work/demo.log" | sed 's/data and config: //')
[ -f "$data/shardline.toml" ] || { cat "$work/demo.log" >&2; exit 1; }
s0=$(grep -m1 -o 'primary = { host = "127.0.0.1", port = [0-9]*' "$data/shardline.toml" | grep -o '[0-9]*$')
s0_replicas=$(grep -m1 '^replicas' "$data/shardline.toml")
export PGPASSWORD=app
pgbench -q -i -s 1 -h 127.0.0.1 -p "$s0" -U app app >/dev/null 2>&1

# Config 1: the demo's (two shards, replicas, cache, metrics) on new ports.
sharded=$work/sharded.toml
sed -e "s/^listen = \"127.0.0.1:$demo_port\"/listen = \"127.0.0.1:@PORT@\"/" \
    -e "s/^listen = \"127.0.0.1:[0-9]*\"$/listen = \"127.0.0.1:@MPORT@\"/" "$data/shardline.toml" >"$sharded"
# Config 2: one shard, no sharding.
single=$work/single.toml
cat >"$single" <<EOF
[proxy]
listen = "127.0.0.1:@PORT@"
pool_mode = "transaction"
[pool]
size = 16
[[users]]
name = "app"
password = "app"
database = "app"
[admin]
users = ["app"]
[[shards]]
name = "s0"
primary = { host = "127.0.0.1", port = $s0 }
$s0_replicas
EOF

cat >"$work/point.sql" <<'EOF'
\set id random(1, 1000)
SELECT * FROM users WHERE id = :id;
EOF
cat >"$work/write.sql" <<'EOF'
\set id random(1, 1000)
UPDATE users SET name = name WHERE id = :id;
EOF
cat >"$work/mixed.sql" <<'EOF'
SELECT count(*) FROM users;
SELECT country, count(*) FROM users GROUP BY country ORDER BY 2 DESC;
SELECT * FROM countries;
BEGIN;
UPDATE users SET name = name WHERE id = 1;
UPDATE users SET name = name WHERE id = 2;
COMMIT;
EOF

bench() {
    pgbench -n -c 8 -j 2 -t 60 -h 127.0.0.1 -p "$1" -U app "${@:2}" app >/dev/null
}
console() {
    psql -X -q "postgres://app:app@127.0.0.1:$1/shardline" \
        -c 'SHOW POOLS' -c 'SHOW STATS' -c 'SHOW CLIENTS' -c 'SHOW SERVERS' >/dev/null
}
sharded_load() {
    for mode in simple extended prepared; do
        bench "$1" -M "$mode" -f "$work/point.sql"
        bench "$1" -M "$mode" -f "$work/write.sql"
    done
    pgbench -n -c 2 -t 20 -h 127.0.0.1 -p "$1" -U app -f "$work/mixed.sql" app >/dev/null
    console "$1"
    python3 -c "import urllib.request, sys; urllib.request.urlopen(f'http://127.0.0.1:{sys.argv[1]}/metrics').read()" "$2"
}
single_load() {
    for mode in simple extended prepared; do
        bench "$1" -M "$mode" -S
    done
    bench "$1" -M simple
    bench "$1" -M extended
    console "$1"
}

# Runs the caller's `launch` on config $1 (its file, its ports filled in),
# then the workload function $2 against it, and stops the proxy.
profile() {
    local config=$1 workload=$2 port mport
    port=$(free_port)
    mport=$(free_port)
    sed -i -e "s/@PORT@/$port/" -e "s/@MPORT@/$mport/" "$config"
    launch "$config" >"$work/$(basename "$config" .toml).log" 2>&1 &
    local proxy=$!
    wait_port "$port"
    "$workload" "$port" "$mport"
    kill -INT "$proxy"
    wait "$proxy" || true
}

run_workloads() {
    profile "$sharded" sharded_load
    profile "$single" single_load
}
