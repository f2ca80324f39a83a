//! Online moves' streams against real Postgres (three primaries, logical
//! replication between them): a stream copies exactly the rows its pair of
//! shards moves and keeps them current while clients write through a proxy
//! on the old config; stopped, it applies nothing more; removed (or swept
//! after a run that died), it leaves no subscription, slot or publication.

use shardline_config::Config;
use shardline_rebalance::db::{self, Login, Servers};
use shardline_rebalance::layout::Rebalance;
use shardline_rebalance::online::{self, Stream};
use shardline_tests::{start_proxy, Env, EnvOptions};
use std::time::{Duration, Instant};

const TABLES: &str = r#"
[sharding]
function = "consistent"

[[sharding.tables]]
name = "users"
column = "id"
[[sharding.tables]]
name = "orders"
column = "user_id"

[[reference_tables]]
name = "countries"
"#;

const SCHEMA: &str = "
CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, balance numeric(12,2));
CREATE TABLE orders (id bigint NOT NULL, user_id bigint NOT NULL, amount numeric, PRIMARY KEY (user_id, id));
CREATE TABLE countries (code text PRIMARY KEY, name text NOT NULL);
";

const USERS: i64 = 3_000;

fn rebalance(old: &str, new: &str) -> Rebalance {
    Rebalance::new(
        &Config::from_toml(old, "old").unwrap(),
        &Config::from_toml(new, "new").unwrap(),
    )
    .expect("a move")
}

/// Three primaries without replicas (moves work on primaries).
async fn three_primaries() -> Env {
    Env::start_with(EnvOptions {
        shards: 3,
        replicas_per_shard: 0,
        ..Default::default()
    })
    .await
    .expect("the servers start")
}

/// The superuser: Postgres 15 lets only superusers create subscriptions.
fn login() -> Login {
    Login {
        user: "postgres".into(),
        password: None,
        database: "app".into(),
    }
}

async fn servers(r: &Rebalance) -> Servers {
    let ids: Vec<usize> = (0..r.names.len()).collect();
    Servers::connect(&r.names, &r.primaries, &ids, &login())
        .await
        .expect("the primaries")
}

/// `(rows, checksum)` of what `s` moves of `table`, on its source and on
/// its target.
async fn both_sides(servers: &Servers, s: &Stream, table: &str) -> ((i64, String), (i64, String)) {
    let filter = s.filter(table).expect("the stream moves the table");
    let src = servers.get(s.source).await.unwrap();
    let cols = db::columns(&src, table).await.unwrap().expect("the table");
    let tgt = servers.get(s.target).await.unwrap();
    (
        db::checksum(&src, table, &cols, filter).await.unwrap(),
        db::checksum(&tgt, table, &cols, filter).await.unwrap(),
    )
}

fn slots(env: &Env, shard: usize) -> String {
    env.sql_shard(shard, "SELECT count(*) FROM pg_replication_slots")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_copy_the_moving_rows_follow_writes_and_leave_nothing() {
    let env = three_primaries().await;
    let old = env.shards_config(&[0, 1], TABLES);
    let new = env.shards_config(&[0, 1, 2], TABLES);
    for s in 0..3 {
        env.sql_shard(s, &format!("SET ROLE app; {SCHEMA}"));
    }
    let (_proxy, c) = start_proxy(&old).await;
    for first in (1..=USERS).step_by(500) {
        let ids = first..(first + 500).min(USERS + 1);
        let users: Vec<String> = ids.clone().map(|i| format!("({i}, 'u{i}', {i})")).collect();
        let orders: Vec<String> = ids
            .flat_map(|i| [format!("(1, {i}, 1)"), format!("(2, {i}, 2)")])
            .collect();
        for sql in [
            format!(
                "INSERT INTO users (id, name, balance) VALUES {}",
                users.join(",")
            ),
            format!(
                "INSERT INTO orders (id, user_id, amount) VALUES {}",
                orders.join(",")
            ),
        ] {
            c.batch_execute(&sql).await.expect("the data");
        }
    }
    c.batch_execute(
        "INSERT INTO countries (code, name) VALUES ('fr', 'France'), ('de', 'Germany'), ('jp', 'Japan')",
    )
    .await
    .expect("the reference rows");

    let r = rebalance(&old, &new);
    let servers = servers(&r).await;
    let streams = online::streams(&r, "run-1");
    // Consistent hashing: rows go from s0 and s1 to the new s2 only; the
    // reference table goes along from the default shard.
    let pairs: Vec<(usize, usize)> = streams.iter().map(|s| (s.source, s.target)).collect();
    assert_eq!(pairs, vec![(0, 2), (1, 2)]);
    assert_eq!(streams[0].filter("countries"), Some("true"));
    assert_eq!(streams[1].filter("countries"), None);
    online::requirements(&servers, &r, &streams)
        .await
        .expect("the servers allow online moves");
    for s in &streams {
        online::start(&servers, s, &login(), &r.primaries[s.source])
            .await
            .expect("the stream starts");
    }
    // Starting again keeps what exists (a rerun continues).
    online::start(&servers, &streams[0], &login(), &r.primaries[0])
        .await
        .unwrap();

    // Clients write through the proxy on the old config while rows copy:
    // updates, inserts and deletes, on moving keys and on staying keys.
    let writer = {
        let (proxy, c) = start_proxy(&old).await;
        tokio::spawn(async move {
            let _keep = proxy;
            let mut writes = 0u32;
            for i in 0..600i64 {
                let id = 1 + (i * 7919) % USERS;
                c.execute(
                    "UPDATE users SET balance = balance + 1, name = $2 WHERE id = $1",
                    &[&id, &format!("w{i}")],
                )
                .await
                .unwrap();
                let new_id = USERS + 1 + i;
                c.execute(
                    "INSERT INTO users (id, name, balance) VALUES ($1, 'new', 0)",
                    &[&new_id],
                )
                .await
                .unwrap();
                c.execute(
                    "INSERT INTO orders (id, user_id, amount) VALUES (3, $1, 1)",
                    &[&id],
                )
                .await
                .unwrap();
                if i % 3 == 0 {
                    c.execute("DELETE FROM orders WHERE user_id = $1 AND id = 1", &[&id])
                        .await
                        .unwrap();
                }
                if i % 50 == 0 {
                    c.execute(
                        "UPDATE countries SET name = name || '.' WHERE code = 'fr'",
                        &[],
                    )
                    .await
                    .unwrap();
                }
                writes += 1;
            }
            writes
        })
    };
    // Progress is readable while it runs.
    let p = online::progress(&servers, &streams[0]).await.unwrap();
    assert!(p.lag_bytes >= 0, "{p:?}");
    assert_eq!(writer.await.unwrap(), 600);

    // With the writes done, each target catches up to its source's
    // position, and both sides agree on every table the stream moves.
    for s in &streams {
        let lsn = online::current_lsn(&servers, s.source).await.unwrap();
        online::wait_applied(&servers, s, &lsn, Duration::from_secs(60))
            .await
            .expect("caught up");
        assert_eq!(online::progress(&servers, s).await.unwrap().copying, 0);
        for (table, _) in &s.tables {
            let (source, target) = both_sides(&servers, s, table).await;
            assert_eq!(
                source, target,
                "{table} from s{} to s{}",
                s.source, s.target
            );
            assert!(source.0 > 0, "{table} from s{} moves rows", s.source);
        }
    }
    // Nothing else arrived: the target holds exactly what the streams moved.
    let on_target = |table: &str| {
        env.sql_shard(2, &format!("SELECT count(*) FROM {table}"))
            .parse::<i64>()
            .unwrap()
    };
    let mut streamed = 0;
    for s in &streams {
        streamed += both_sides(&servers, s, "users").await.0 .0;
    }
    assert_eq!(on_target("users"), streamed);
    assert_eq!(
        env.sql_shard(2, "SELECT name FROM countries WHERE code = 'fr'"),
        env.sql_shard(0, "SELECT name FROM countries WHERE code = 'fr'")
    );

    // Stopped, a stream applies nothing more.
    let moving = env.sql_shard(
        2,
        "SELECT id FROM users WHERE id <= 3000 ORDER BY id LIMIT 1",
    );
    let source = (0..2)
        .find(|&s| {
            env.sql_shard(
                s,
                &format!("SELECT count(*) FROM users WHERE id = {moving}"),
            ) == "1"
        })
        .expect("the moving row's source");
    let stream = streams.iter().find(|s| s.source == source).unwrap();
    online::stop(&servers, stream, Duration::from_secs(30))
        .await
        .expect("stops");
    env.sql_shard(
        source,
        &format!("UPDATE users SET name = 'after stop' WHERE id = {moving}"),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_ne!(
        env.sql_shard(2, &format!("SELECT name FROM users WHERE id = {moving}")),
        "after stop"
    );

    // Removed, nothing is left on any server.
    for s in &streams {
        online::remove(&servers, s).await.expect("removed");
        online::remove(&servers, s)
            .await
            .expect("removing again is harmless");
    }
    assert_eq!(
        online::leftovers(&servers, &[0, 1, 2]).await.unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        (slots(&env, 0), slots(&env, 1), slots(&env, 2)),
        ("0".into(), "0".into(), "0".into())
    );

    // A run that died while copying: everything it left is found and swept.
    let again = online::streams(&r, "run-2");
    assert_ne!(again[0].name, streams[0].name);
    for s in &again {
        online::start(&servers, s, &login(), &r.primaries[s.source])
            .await
            .unwrap();
    }
    let left = online::leftovers(&servers, &[0, 1, 2]).await.unwrap();
    assert!(left.len() >= 6, "{left:?}");
    online::remove_leftovers(&servers, &[0, 1, 2])
        .await
        .expect("swept");
    let started = Instant::now();
    loop {
        let left = online::leftovers(&servers, &[0, 1, 2]).await.unwrap();
        if left.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "left behind: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        (slots(&env, 0), slots(&env, 1), slots(&env, 2)),
        ("0".into(), "0".into(), "0".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requirements_name_what_an_online_move_lacks() {
    let env = three_primaries().await;
    let tables = format!(
        "{TABLES}\n[[sharding.tables]]\nname = \"events\"\ncolumn = \"user_id\"\n[[sharding.tables]]\nname = \"visits\"\ncolumn = \"user_id\"\n"
    );
    for s in 0..3 {
        env.sql_shard(
            s,
            &format!(
                "{SCHEMA} CREATE TABLE events (user_id bigint, what text);
                 CREATE TABLE visits (id bigint PRIMARY KEY, user_id bigint NOT NULL);
                 CREATE ROLE mover LOGIN PASSWORD 'mover'; GRANT ALL ON ALL TABLES IN SCHEMA public TO mover;"
            ),
        );
    }
    let r = rebalance(
        &env.shards_config(&[0, 1], &tables),
        &env.shards_config(&[0, 1, 2], &tables),
    );
    let streams = online::streams(&r, "run");
    let err = online::requirements(&servers(&r).await, &r, &streams)
        .await
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("table events on shard s0") && err.contains("no replica identity"),
        "{err}"
    );
    assert!(
        err.contains("table visits on shard s0")
            && err.contains("does not include the sharding key user_id"),
        "{err}"
    );
    assert!(err.contains("Nothing was changed"), "{err}");

    // A role that is neither superuser nor replicating is told so.
    let mover = Login {
        user: "mover".into(),
        password: Some("mover".into()),
        database: "app".into(),
    };
    let ids: Vec<usize> = (0..3).collect();
    let as_mover = Servers::connect(&r.names, &r.primaries, &ids, &mover)
        .await
        .unwrap();
    let err = online::requirements(&as_mover, &r, &streams)
        .await
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("may not replicate") && err.contains("not a superuser"),
        "{err}"
    );

    // With identities fixed and the superuser, the same move may start.
    env.sql_shard(
        0,
        "ALTER TABLE events REPLICA IDENTITY FULL; ALTER TABLE visits REPLICA IDENTITY FULL",
    );
    env.sql_shard(
        1,
        "ALTER TABLE events REPLICA IDENTITY FULL; ALTER TABLE visits REPLICA IDENTITY FULL",
    );
    online::requirements(&servers(&r).await, &r, &streams)
        .await
        .expect("allowed");
}

/// What one load client saw.
#[derive(Default)]
struct ClientLog {
    /// Increments acknowledged, by key.
    increments: std::collections::BTreeMap<i64, i64>,
    /// Keys whose INSERT was acknowledged.
    inserted: Vec<i64>,
    failed: Vec<String>,
    /// Every transaction's time, for the pause each client saw.
    longest: Duration,
}

/// A client on `port` until `stop`: transactions incrementing random keys
/// of `rows`, and inserts of keys of its own (above `rows`), both on keys
/// that move and keys that stay.
fn client(
    port: u16,
    rows: i64,
    id: i64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<ClientLog> {
    tokio::spawn(async move {
        let mut log = ClientLog::default();
        let conn = format!("host=127.0.0.1 port={port} user=app password=app dbname=app");
        let (c, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
            .await
            .expect("a load client");
        tokio::spawn(connection);
        let mut n: i64 = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            n += 1;
            let started = Instant::now();
            let (sql, key, insert) = if n % 4 == 0 {
                let key = rows + 1 + id * 1_000_000 + n;
                (
                    format!("INSERT INTO accts (id, n) VALUES ({key}, 0)"),
                    key,
                    true,
                )
            } else {
                let key = 1 + (n * 7_919 + id * 104_729) % rows;
                (
                    format!("BEGIN; UPDATE accts SET n = n + 1 WHERE id = {key}; COMMIT"),
                    key,
                    false,
                )
            };
            match c.batch_execute(&sql).await {
                Ok(()) if insert => log.inserted.push(key),
                Ok(()) => *log.increments.entry(key).or_default() += 1,
                Err(e) => log.failed.push(format!("{sql}: {e}")),
            }
            log.longest = log.longest.max(started.elapsed());
        }
        log
    })
}

/// Three primaries; two proxies on one config file with the first two
/// shards; `accts` with `rows` rows and `serials` (a bigserial key) with
/// 1,000 on every shard, loaded through the proxies.
struct TwoProxies {
    env: Env,
    _files: shardline_tests::TempDir,
    two: String,
    three: String,
    /// The proxies' config file (the tool writes the new config over it).
    config: std::path::PathBuf,
    a: shardline_tests::ProxyProcess,
    b: shardline_tests::ProxyProcess,
}

impl TwoProxies {
    async fn start(name: &str, rows: i64) -> TwoProxies {
        TwoProxies::start_with(name, rows, 0).await
    }

    /// As `start`, with `replicas` streaming replicas per shard in the
    /// configs, which the proxies read from up to 60 s behind.
    async fn start_with(name: &str, rows: i64, replicas: usize) -> TwoProxies {
        let env = Env::start_with(EnvOptions {
            shards: 3,
            replicas_per_shard: replicas,
            ..Default::default()
        })
        .await
        .expect("the servers start");
        let files = shardline_tests::TempDir::new(name);
        let mut tables = "[sharding]\nfunction = \"consistent\"\n\n[[sharding.tables]]\nname = \"accts\"\ncolumn = \"id\"\n[[sharding.tables]]\nname = \"serials\"\ncolumn = \"id\"\n\n[admin]\nusers = [\"app\"]\n".to_string();
        if replicas > 0 {
            tables.push_str("\n[health]\nmax_replica_lag = \"60s\"\n");
        }
        let with_replicas = |mut text: String| {
            if replicas > 0 {
                for s in 0..3 {
                    let primary = format!("port = {} }}\n", env.node_port(env.shard_primary(s)));
                    text = text.replace(
                        &primary,
                        &format!(
                            "{primary}replicas = [{{ host = \"127.0.0.1\", port = {} }}]\n",
                            env.node_port(env.shard_replica(s))
                        ),
                    );
                }
            }
            text
        };
        let two = with_replicas(env.shards_config(&[0, 1], &tables));
        let three = with_replicas(env.shards_config(&[0, 1, 2], &tables));
        let config = files.write("shardline.toml", &two);
        for s in 0..3 {
            env.sql_shard(
                s,
                "SET ROLE app; CREATE TABLE accts (id bigint PRIMARY KEY, n bigint NOT NULL DEFAULT 0);
                 CREATE TABLE serials (id bigserial PRIMARY KEY, v int4);",
            );
        }
        let (a, loader) = shardline_tests::ProxyProcess::start_file(&config).await;
        let (b, _) = shardline_tests::ProxyProcess::start_file(&config).await;
        let mut inserts = vec![format!(
            "INSERT INTO serials (id, v) VALUES {}",
            (1..=1_000)
                .map(|k| format!("({k}, {k})"))
                .collect::<Vec<_>>()
                .join(",")
        )];
        for chunk in (1..=rows).collect::<Vec<_>>().chunks(2_000) {
            let values: Vec<String> = chunk.iter().map(|k| format!("({k})")).collect();
            inserts.push(format!(
                "INSERT INTO accts (id) VALUES {}",
                values.join(",")
            ));
        }
        for sql in inserts {
            loader
                .batch_execute(&sql)
                .await
                .expect("rows on both shards");
        }
        TwoProxies {
            env,
            _files: files,
            two,
            three,
            config,
            a,
            b,
        }
    }

    /// A config file beside the proxies' one.
    fn write(&self, name: &str, text: &str) -> std::path::PathBuf {
        self._files.write(name, text)
    }

    /// `apply --online` from the proxies' config to `to`, through both
    /// consoles, as the superuser.
    fn online(&self, to: &std::path::Path) -> Vec<String> {
        let admin = |p: u16| format!("postgres://app:app@127.0.0.1:{p}/shardline");
        self.move_args(
            "apply",
            to,
            &[
                "--online",
                "--admin",
                &admin(self.a.port),
                "--admin",
                &admin(self.b.port),
            ],
        )
    }

    /// `abort` of the move from the proxies' config to `to`.
    fn abort(&self, to: &std::path::Path) -> Vec<String> {
        self.move_args("abort", to, &[])
    }

    /// `verb` of the move from the proxies' config to `to`, as the
    /// superuser, then `extra`.
    fn move_args(&self, verb: &str, to: &std::path::Path, extra: &[&str]) -> Vec<String> {
        let (from, to) = (self.config.display().to_string(), to.display().to_string());
        [verb, "--from", &from, "--to", &to, "--user", "postgres"]
            .iter()
            .chain(extra)
            .map(|a| a.to_string())
            .collect()
    }

    /// `clients` load clients, alternating between the proxies, until the
    /// returned guard is dropped or `Load::finish`.
    fn load(&self, clients: i64, rows: i64) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|i| {
                let port = if i % 2 == 0 { self.a.port } else { self.b.port };
                client(port, rows, i, stop.clone())
            })
            .collect();
        Load {
            tasks,
            _stop: StopOnDrop(stop),
            rows,
        }
    }
}

/// Running load clients.
struct Load {
    tasks: Vec<tokio::task::JoinHandle<ClientLog>>,
    _stop: StopOnDrop,
    rows: i64,
}

impl Load {
    /// Stops the clients and checks that none saw an error and that every
    /// acknowledged write is in `accts` once, where `config` places it;
    /// returns the writes and each client's longest transaction, sorted.
    async fn finish(self, env: &Env, config: &str) -> (i64, Vec<Duration>) {
        self._stop
            .0
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let mut increments: std::collections::BTreeMap<i64, i64> = Default::default();
        let mut inserted = Vec::new();
        let mut longest = Vec::new();
        for task in self.tasks {
            let log = task.await.unwrap();
            assert!(
                log.failed.is_empty(),
                "a client saw errors: {:?}",
                log.failed
            );
            for (k, n) in log.increments {
                *increments.entry(k).or_default() += n;
            }
            inserted.extend(log.inserted);
            longest.push(log.longest);
        }
        let stored = placed_rows(env, config);
        assert_eq!(stored.len() as i64, self.rows + inserted.len() as i64);
        for k in &inserted {
            assert!(stored.contains_key(k), "acknowledged insert {k} is missing");
        }
        for (k, (n, _)) in stored.iter().filter(|(k, _)| **k <= self.rows) {
            assert_eq!(*n, increments.get(k).copied().unwrap_or(0), "key {k}");
        }
        longest.sort();
        (
            increments.values().sum::<i64>() + inserted.len() as i64,
            longest,
        )
    }
}

/// `apply --online` through two proxies' consoles while 16 clients write
/// to moving and staying keys: no client transaction fails, every
/// acknowledged write is there exactly once on the shard the new config
/// gives it, the new shard's sequence is past the ids moved there, the
/// proxies run the new placement, and no replication object or record of
/// the run is left on any server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_online_moves_rows_while_two_proxies_clients_write() {
    const ROWS: i64 = 20_000;
    let t = TwoProxies::start("online-apply", ROWS).await;
    let new = t.write("new.toml", &t.three);
    let load = t.load(16, ROWS);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, stdout, stderr) = tool(t.online(&new)).await;
    assert!(ok, "{stdout}{stderr}");
    assert!(stderr.contains("replication caught up"), "{stderr}");
    // Compared while the clients write to the moving rows: at one
    // position of each source, so every range is equal (a difference
    // would have stopped the run).
    assert!(
        stderr.contains("ranges equal at one position of their source")
            && !stderr.contains("not compared"),
        "{stderr}"
    );
    assert!(
        stderr.contains("paused 2 proxies for the cutover"),
        "{stderr}"
    );
    assert!(
        stdout.contains("2 proxies reloaded with the new placement"),
        "{stdout}"
    );
    // Clients go on through the new placement, then stop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (writes, longest) = load.finish(&t.env, &t.three).await;
    assert!(
        placed_rows(&t.env, &t.three).values().any(|(_, s)| *s == 2),
        "rows moved to the new shard"
    );
    assert_eq!(
        t.env.sql_shard(
            2,
            "SELECT pg_sequence_last_value('serials_id_seq') >= max(id) AND count(*) > 0 FROM serials"
        ),
        "t",
        "the new shard's sequence is past the ids moved there"
    );
    nothing_left(&t.env);
    eprintln!("{stderr}");
    eprintln!(
        "apply --online under load: {writes} writes acknowledged, none failed; longest transaction per client: median {:?}, max {:?}; {}",
        longest[longest.len() / 2],
        longest[longest.len() - 1],
        stdout.lines().last().unwrap_or("")
    );
}

/// Runs the tool to its end: (success, stdout, stderr).
async fn tool(args: Vec<String>) -> (bool, String, String) {
    tokio::task::spawn_blocking(move || {
        let out =
            std::process::Command::new(shardline_tests::rebalance_binary().expect("the tool"))
                .args(&args)
                .output()
                .expect("the tool runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

/// Every row of `accts` on the three shards, `id → (n, shard)`: each is on
/// one shard only, the one `config` places it on.
fn placed_rows(env: &Env, config: &str) -> std::collections::BTreeMap<i64, (i64, usize)> {
    let sharding = shardline_router::sharding::Sharding::from_config(
        &Config::from_toml(config, "config.toml").unwrap(),
    );
    let group = &sharding.groups[sharding.tables["accts"].group];
    let mut stored = std::collections::BTreeMap::new();
    for s in 0..3 {
        for line in env
            .sql_shard(s, "SELECT id || ':' || n FROM accts")
            .lines()
            .filter(|l| !l.is_empty())
        {
            let (id, n) = line.split_once(':').unwrap();
            let id: i64 = id.parse().unwrap();
            assert!(
                stored.insert(id, (n.parse().unwrap(), s)).is_none(),
                "row {id} is on two shards"
            );
            let owner = group
                .shard_of(Some(&shardline_router::hash::KeyValue::Int(id)))
                .unwrap();
            assert_eq!(sharding.shard_names[owner], format!("s{s}"), "row {id}");
        }
    }
    stored
}

/// No replication object, and no record of a run, on any of the three shards.
fn nothing_left(env: &Env) {
    for s in 0..3 {
        assert_eq!(
            env.sql_shard(
                s,
                "SELECT (SELECT count(*) FROM pg_replication_slots) + (SELECT count(*) FROM pg_publication) + (SELECT count(*) FROM pg_subscription)"
            ),
            "0",
            "replication objects left on s{s}"
        );
        assert_eq!(
            env.sql_shard(
                s,
                "SELECT count(*) FROM pg_namespace WHERE nspname = 'shardline'"
            ),
            "0",
            "the run's records are left on s{s}"
        );
        assert_eq!(
            env.sql_shard(
                s,
                "SELECT (SELECT count(*) FROM pg_policy) + (SELECT count(*) FROM pg_class WHERE relname = 'accts' AND (relrowsecurity OR relforcerowsecurity))"
            ),
            "0",
            "the hiding of moved rows is left on s{s}"
        );
    }
}

/// `apply --online` killed while it streams (a rerun continues the same
/// streams), killed with the proxies paused (their clients wait, and the
/// rerun finishes the cutover and resumes them), and killed while it
/// streams then undone by `abort`, and killed after the proxies resumed on
/// the new config but before the moved rows hidden on the old shards are
/// deleted (clients see each row once, abort refuses, a rerun finishes):
/// clients writing throughout see no error, every acknowledged write is
/// where the final config places it, and nothing of the moves (nor the
/// hiding) is left on any server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_online_killed_anywhere_is_finished_by_a_rerun_or_undone_by_abort() {
    const ROWS: i64 = 5_000;
    let t = TwoProxies::start("online-killed", ROWS).await;
    let grow = t.write("three.toml", &t.three);
    let shrink = t.write("two.toml", &t.two);
    let load = t.load(4, ROWS);
    let env = &t.env;
    let slots = |s: usize| env.sql_shard(s, "SELECT count(*) FROM pg_replication_slots");
    // 1. Killed while streaming: the rerun goes on with the same streams.
    assert!(killed(t.online(&grow), "stream").await);
    assert_ne!(
        (slots(0), slots(1)),
        ("0".into(), "0".into()),
        "the streams run on"
    );
    let (ok, out, err) = tool(t.online(&grow)).await;
    assert!(ok && out.contains("2 proxies reloaded"), "{out}{err}");
    nothing_left(env);
    assert!(placed_rows(env, &t.three).values().any(|(_, s)| *s == 2));

    // 2. Shrinking back, killed with the proxies paused: a new client waits
    // (it gets no error), and the rerun finishes and resumes it.
    assert!(killed(t.online(&shrink), "paused").await);
    let port = t.a.port;
    let probe = tokio::spawn(async move {
        let c = shardline_tests::connect_app(port).await.expect("a client");
        c.simple_query("SELECT n FROM accts WHERE id = 1")
            .await
            .map(|_| ())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!probe.is_finished(), "a paused proxy answered");
    let (ok, out, err) = tool(t.online(&shrink)).await;
    assert!(ok && out.contains("2 proxies reloaded"), "{out}{err}");
    probe
        .await
        .unwrap()
        .expect("the held query runs after the cutover");
    nothing_left(env);
    assert!(placed_rows(env, &t.two).values().all(|(_, s)| *s != 2));

    // 3. Growing again, killed while streaming, then undone: the copies on
    // s2 and the streams are gone, the proxies were never paused.
    assert!(killed(t.online(&grow), "stream").await);
    assert_ne!(
        env.sql_shard(2, "SELECT count(*) FROM pg_subscription"),
        "0"
    );
    let (ok, out, err) = tool(t.abort(&grow)).await;
    assert!(ok, "{out}{err}");
    nothing_left(env);
    assert_eq!(env.sql_shard(2, "SELECT count(*) FROM accts"), "0");

    // 4. Growing, killed once the proxies run the new config but before the
    // moved rows, hidden on s0 and s1, are deleted: clients see each row
    // once, abort refuses, and the rerun deletes them and the hiding.
    assert!(killed(t.online(&grow), "resumed").await);
    let c = shardline_tests::connect_app(t.a.port).await.unwrap();
    let ids: Vec<i64> = c
        .query("SELECT id FROM accts", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let distinct: std::collections::BTreeSet<i64> = ids.iter().copied().collect();
    assert_eq!(
        ids.len(),
        distinct.len(),
        "a keyless read saw moved rows twice"
    );
    assert!(ids.len() as i64 >= ROWS);
    let hidden = |s: usize| {
        env.sql_shard(s, "SELECT count(*) FROM accts")
            .parse::<i64>()
            .unwrap()
            - env
                .sql_shard(s, "SET ROLE app; SELECT count(*) FROM accts")
                .lines()
                .last()
                .unwrap()
                .parse::<i64>()
                .unwrap()
    };
    assert!(
        hidden(0) > 0 && hidden(1) > 0,
        "the moved rows wait on their old shards, hidden"
    );
    let (ok, out, err) = tool(t.abort(&grow)).await;
    assert!(!ok && err.contains("cannot be undone"), "{out}{err}");
    let (ok, out, err) = tool(t.online(&grow)).await;
    assert!(ok && out.contains("2 proxies reloaded"), "{out}{err}");
    nothing_left(env);
    load.finish(env, &t.three).await;
}

/// Runs the tool until it reaches the stop point `point` and kills it
/// there; false when it ended before reaching it.
async fn killed(args: Vec<String>, point: &'static str) -> bool {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        matches!(
            shardline_tests::killed_at_if_reached(point, &args),
            shardline_tests::Killed::There
        )
    })
    .await
    .unwrap()
}

/// Starts the tool and returns once it says it replicates the moving rows;
/// the handle gives (success, stdout, stderr) when it ends.
async fn replicating(args: Vec<String>) -> tokio::task::JoinHandle<(bool, String, String)> {
    run_until(args, None, "replicating the moving rows").await
}

/// Starts the tool (with the crash tests' hook `stop_at`) and returns once
/// a line it prints contains `marker`; the handle gives (success, stdout,
/// stderr) when it ends.
async fn run_until(
    args: Vec<String>,
    stop_at: Option<&'static str>,
    marker: &'static str,
) -> tokio::task::JoinHandle<(bool, String, String)> {
    let (reached_tx, reached) = std::sync::mpsc::channel();
    let run = tokio::task::spawn_blocking(move || {
        use std::io::BufRead as _;
        let mut tool = std::process::Command::new(shardline_tests::rebalance_binary().unwrap());
        if let Some(point) = stop_at {
            tool.env("SHARDLINE_REBALANCE_STOP_AT", point);
        }
        let mut child = tool
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the tool runs");
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(child.stderr.take().unwrap())
            .lines()
            .map_while(Result::ok)
        {
            if line.contains(marker) {
                let _ = reached_tx.send(());
            }
            lines.push(line);
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            lines.join("\n"),
        )
    });
    tokio::task::spawn_blocking(move || reached.recv_timeout(Duration::from_secs(120)))
        .await
        .unwrap()
        .expect("the tool reached the marker");
    run
}

/// `accts` rows on s0 and s1.
fn source_rows(env: &Env) -> Vec<i64> {
    (0..2)
        .map(|s| {
            env.sql_shard(s, "SELECT count(*) FROM accts")
                .parse()
                .unwrap()
        })
        .collect()
}

/// No source lost rows since `before` (the clients only add rows).
fn no_rows_lost(env: &Env, before: &[i64]) {
    for (s, (now, was)) in source_rows(env).iter().zip(before).enumerate() {
        assert!(now >= was, "s{s} lost rows: {was} -> {now}");
    }
}

/// A table's copy on the new shard that can never finish (its state says
/// copied but its table-sync slot is gone from the source, as Postgres 15
/// can leave it when the new shard restarts as the copy ends, made here by
/// hand): the tool stops within seconds with abort's advice instead of
/// waiting for ever, the proxies are never paused, and abort leaves
/// nothing behind. Clients write throughout and see no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_copy_left_without_its_sync_slot_stops_the_move_with_abort_advice() {
    const ROWS: i64 = 5_000;
    let t = TwoProxies::start("online-stuck", ROWS).await;
    let new = t.write("new.toml", &t.three);
    let load = t.load(4, ROWS);
    let env = &t.env;
    assert!(killed(t.online(&new), "caught-up").await);
    let sub = env.sql_shard(2, "SELECT subname FROM pg_subscription ORDER BY 1 LIMIT 1");
    env.sql_shard(
        2,
        &format!(
            "ALTER SUBSCRIPTION {sub} DISABLE; UPDATE pg_subscription_rel SET srsubstate = 'f' WHERE srrelid = 'accts'::regclass AND srsubid = (SELECT oid FROM pg_subscription WHERE subname = '{sub}'); ALTER SUBSCRIPTION {sub} ENABLE"
        ),
    );
    let started = std::time::Instant::now();
    let (ok, out, err) = tool(t.online(&new)).await;
    assert!(
        !ok && err.contains("can never finish") && err.contains("accts") && err.contains("abort"),
        "{out}{err}"
    );
    assert!(!err.contains("paused"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(
        env.sql_shard(2, "SELECT string_agg(srsubstate::text, '') FROM pg_subscription_rel WHERE srrelid = 'accts'::regclass AND srsubstate <> 'r'"),
        "f",
        "the copy made no progress while the tool waited"
    );
    let (ok, out, err) = tool(t.abort(&new)).await;
    assert!(ok, "{out}{err}");
    nothing_left(env);
    assert_eq!(env.sql_shard(2, "SELECT count(*) FROM accts"), "0");
    load.finish(env, &t.two).await;
}

/// A copy that differs from its source: written straight to the new shard
/// while the tool was down after the catch-up, the online comparison stops
/// the run before any pause; written after the comparison, the cutover's
/// verification deletes nothing and the proxies resume on the old
/// placement. A row written straight to an old shard that no range moves
/// and the new placement would miss: the cutover deletes nothing either.
/// `abort` removes the copies each time. Then killed after the catch-up
/// again, a rerun finishes the move. Clients write throughout and see no
/// error; every acknowledged write is in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_online_deletes_nothing_when_a_copy_differs_online_or_at_the_cutover() {
    const ROWS: i64 = 5_000;
    let t = TwoProxies::start("online-differs", ROWS).await;
    let grow = t.write("three.toml", &t.three);
    let load = t.load(4, ROWS);
    let env = &t.env;

    // Keys beyond the clients' ones: `stray` the new config gives s2,
    // `misplaced` both configs give s1.
    let shard_of = |config: &str, k: i64| {
        let sharding = shardline_router::sharding::Sharding::from_config(
            &Config::from_toml(config, "config.toml").unwrap(),
        );
        let group = &sharding.groups[sharding.tables["accts"].group];
        let s = group
            .shard_of(Some(&shardline_router::hash::KeyValue::Int(k)))
            .unwrap();
        sharding.shard_names[s].clone()
    };
    let stray = (900_000_000i64..)
        .find(|&k| shard_of(&t.three, k) == "s2")
        .unwrap();
    let misplaced = (900_000_000i64..)
        .find(|&k| shard_of(&t.two, k) == "s1" && shard_of(&t.three, k) == "s1")
        .unwrap();

    assert!(killed(t.online(&grow), "caught-up").await);
    assert_eq!(
        env.sql_shard(
            2,
            "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'"
        ),
        "0",
        "caught up: every table copied"
    );
    // Written to the copy before the online comparison: the run stops
    // there, before any pause.
    env.sql_shard(2, &format!("INSERT INTO accts (id, n) VALUES ({stray}, 0)"));
    let before = source_rows(env);
    let (ok, out, err) = tool(t.online(&grow)).await;
    assert!(!ok, "{out}{err}");
    assert!(
        err.contains("verification failed before the cutover")
            && err.contains("the proxies were not paused")
            && err.contains(" -> s2 chunk ")
            && err.contains("target s2 ("),
        "{err}"
    );
    assert!(!err.contains("paused 2 proxies"), "{err}");
    no_rows_lost(env, &before);
    env.sql_shard(2, &format!("DELETE FROM accts WHERE id = {stray}"));
    let (ok, out, err) = tool(t.abort(&grow)).await;
    assert!(ok, "{out}{err}");
    nothing_left(env);

    // Written after it, before the pause (the tool held there): the
    // cutover's verification finds it and rolls back.
    let run = run_until(t.online(&grow), Some("hold:3000:pause"), "compared online").await;
    env.sql_shard(2, &format!("INSERT INTO accts (id, n) VALUES ({stray}, 0)"));
    let before = source_rows(env);
    let (ok, out, err) = run.await.unwrap();
    assert!(!ok, "{out}{err}");
    assert!(
        err.contains("verification failed during the cutover")
            && err.contains("the proxies are resumed on the old config"),
        "{err}"
    );
    assert!(err.contains("paused 2 proxies for the cutover"), "{err}");
    no_rows_lost(env, &before);
    // The proxies answer again.
    let c = shardline_tests::connect_app(t.a.port).await.unwrap();
    c.simple_query("SELECT n FROM accts WHERE id = 1")
        .await
        .expect("resumed");
    env.sql_shard(2, &format!("DELETE FROM accts WHERE id = {stray}"));
    let (ok, out, err) = tool(t.abort(&grow)).await;
    assert!(ok, "{out}{err}");
    nothing_left(env);
    assert_eq!(env.sql_shard(2, "SELECT count(*) FROM accts"), "0");
    placed_rows(env, &t.two);

    // A row written straight to s0 while the rows copy, one both configs
    // place on s1: no range moves it, and after the deletes the new
    // placement would miss it. Seen inside the delete transactions:
    // nothing is deleted. (Written before the run, the plan refuses it.)
    let run = replicating(t.online(&grow)).await;
    env.sql_shard(
        0,
        &format!("INSERT INTO accts (id, n) VALUES ({misplaced}, 0)"),
    );
    let before = source_rows(env);
    let (ok, out, err) = run.await.unwrap();
    assert!(!ok, "{out}{err}");
    assert!(
        err.contains("rows no range of this move covers")
            && err.contains("shard s0 holds 1 rows of accts")
            && err.contains("the proxies are resumed on the old config"),
        "{err}"
    );
    no_rows_lost(env, &before);
    env.sql_shard(0, &format!("DELETE FROM accts WHERE id = {misplaced}"));
    let (ok, out, err) = tool(t.abort(&grow)).await;
    assert!(ok, "{out}{err}");
    nothing_left(env);
    placed_rows(env, &t.two);

    // Killed after the catch-up, the rerun finishes the move.
    assert!(killed(t.online(&grow), "caught-up").await);
    let (ok, out, err) = tool(t.online(&grow)).await;
    assert!(ok && out.contains("2 proxies reloaded"), "{out}{err}");
    load.finish(env, &t.three).await;
    assert!(placed_rows(env, &t.three).values().any(|(_, s)| *s == 2));
    nothing_left(env);
}

/// Stops the load clients when the test ends, also by a failed assertion
/// (they would run on and keep the test process alive).
struct StopOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The new shard restarted during the catch-up under 8 clients: the tool,
/// held just after the copy caught up, finds it down, waits for it, the
/// replication resumes by itself, and the move finishes as if nothing
/// happened (no client fails, every write there once).
///
/// The restart comes once every table's initial copy is done: on Postgres
/// 15 a restart just as a table's copy finishes can leave that copy stuck
/// for good (the target's table-sync worker retries forever: "replication
/// slot pg_<sub>_sync_<rel>_<id> does not exist"), which the README says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_online_outlives_a_restart_of_the_new_shard_during_the_catch_up() {
    const ROWS: i64 = 20_000;
    let t = TwoProxies::start("online-restart", ROWS).await;
    let new = t.write("new.toml", &t.three);
    let load = t.load(8, ROWS);
    // Held 2 s after the catch-up while the new shard is down for 5 s: it
    // wakes to a server that does not answer.
    let run = run_until(
        t.online(&new),
        Some("hold:2000:caught-up"),
        "holding at caught-up",
    )
    .await;
    let node = t.env.shard_primary(2);
    assert_eq!(
        t.env.sql_shard(
            2,
            "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'"
        ),
        "0",
        "every table copied"
    );
    t.env.backend.stop_node(node, "fast").unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    t.env.backend.start_node(node).unwrap();
    let (ok, stdout, stderr) = run.await.unwrap();
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("2 proxies reloaded"), "{stdout}");
    assert!(stderr.contains("waiting for the servers"), "{stderr}");
    load.finish(&t.env, &t.three).await;
    assert!(placed_rows(&t.env, &t.three).values().any(|(_, s)| *s == 2));
    nothing_left(&t.env);
}

/// Every shard has a replica that replays 1 s behind its primary
/// (`recovery_min_apply_delay`), which the proxies read from. The cutover
/// waits for the replicas to replay the hiding of the moved rows (and the
/// new shard's last applied changes) before the proxies resume, so a
/// keyless read through each proxy right after the resume, which the
/// replicas answer, sees every row exactly once. The same command then
/// finishes the move. An offline move back, with the proxies paused
/// throughout, resumes them only once the replicas have the rows too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_online_resumes_the_proxies_once_the_replicas_replayed_the_cutover() {
    const ROWS: i64 = 5_000;
    let t = TwoProxies::start_with("online-replicas", ROWS, 1).await;
    let env = &t.env;
    let grow = t.write("three.toml", &t.three);
    for s in 0..3 {
        let replica = env.shard_replica(s);
        env.sql_on(replica, "ALTER SYSTEM SET recovery_min_apply_delay = '1s'");
        env.sql_on(replica, "SELECT pg_reload_conf()");
    }
    let every_row_once = |ids: Vec<i64>, what: &str| {
        let mut ids = ids;
        ids.sort_unstable();
        let n = ids.len();
        ids.dedup();
        assert_eq!(n, ids.len(), "{what}: a keyless read saw moved rows twice");
        let missing = (1..=ROWS).filter(|k| ids.binary_search(k).is_err()).count();
        assert_eq!(
            (missing, ids.len()),
            (0, ROWS as usize),
            "{what}: (rows missing, rows seen)"
        );
    };
    let read = |port: u16| async move {
        let c = shardline_tests::connect_app(port).await.unwrap();
        c.query("SELECT id FROM accts", &[])
            .await
            .expect("a keyless read")
            .iter()
            .map(|r| r.get::<_, i64>(0))
            .collect::<Vec<_>>()
    };
    // The replicas answer the proxies' reads once they have the rows.
    shardline_tests::wait_for("the replicas to have every row", || async {
        read(t.a.port).await.len() == ROWS as usize
    })
    .await;

    assert!(killed(t.online(&grow), "resumed").await);
    every_row_once(read(t.a.port).await, "proxy a right after the resume");
    every_row_once(read(t.b.port).await, "proxy b right after the resume");
    assert!(
        env.sql_shard(0, "SELECT count(*) FROM pg_policy") != "0",
        "the moved rows are only hidden on their old shards yet"
    );

    let (ok, out, err) = tool(t.online(&grow)).await;
    assert!(ok, "{out}{err}");
    every_row_once(read(t.a.port).await, "proxy a after the move");
    assert!(placed_rows(env, &t.three).values().any(|(_, s)| *s == 2));
    nothing_left(env);

    // Offline back to two shards, the proxies paused for the whole move:
    // they resume once the replicas of s0 and s1 replayed the rows moved
    // back there, so a read right after finds every one.
    let shrink = t.write("two.toml", &t.two);
    let admin = |p: u16| format!("postgres://app:app@127.0.0.1:{p}/shardline");
    let (ok, out, err) = tool(t.move_args(
        "apply",
        &shrink,
        &["--admin", &admin(t.a.port), "--admin", &admin(t.b.port)],
    ))
    .await;
    assert!(
        ok && out.contains("2 proxies reloaded") && err.contains("2 of 2 replicas replayed"),
        "{out}{err}"
    );
    every_row_once(read(t.a.port).await, "proxy a right after the offline move");
    every_row_once(read(t.b.port).await, "proxy b right after the offline move");
    placed_rows(env, &t.two);
}

/// A proxy started without a config file cannot be RELOADed with the new
/// config (the demo's was, once): `apply --online --admin` refuses it
/// before it pauses or changes anything, naming it; the proxies started
/// from the file say which file they reread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_without_a_config_file_is_refused_before_anything_changes() {
    let t = TwoProxies::start("online-no-file", 100).await;
    let grow = t.write("three.toml", &t.three);
    let (no_file, client) = start_proxy(&t.two).await;
    let console = |p: u16| format!("postgres://app:app@127.0.0.1:{p}/shardline");
    let file_of = |p: u16| async move {
        let (c, conn) = tokio_postgres::connect(&console(p), tokio_postgres::NoTls)
            .await
            .expect("the console");
        tokio::spawn(conn);
        c.simple_query("SHOW CONFIG")
            .await
            .unwrap()
            .into_iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("config_file") => {
                    r.get(1).map(str::to_string)
                }
                _ => None,
            })
            .expect("SHOW CONFIG lists config_file")
    };
    assert_eq!(file_of(no_file.local_addr.port()).await, "");
    assert_eq!(file_of(t.a.port).await, t.config.display().to_string());

    let mut args = t.online(&grow);
    args.extend(["--admin".into(), console(no_file.local_addr.port())]);
    let (ok, out, err) = tool(args).await;
    assert!(!ok, "{out}{err}");
    let port = no_file.local_addr.port();
    assert!(
        err.contains(&format!(
            "proxy 127.0.0.1:{port} was started without a config file"
        )) && err.contains("Nothing was changed"),
        "{err}"
    );
    assert!(!err.contains("paused"), "{err}");
    // Nothing paused, nothing on the servers.
    client
        .simple_query("SELECT n FROM accts WHERE id = 1")
        .await
        .expect("not paused");
    nothing_left(&t.env);
    assert_eq!(t.env.sql_shard(2, "SELECT count(*) FROM accts"), "0");
}

/// A reference table the added shard already holds (equal to the default
/// shard's, as a shard removed earlier leaves it) is streamed again: the
/// copy does not fail on its first row, and a row written to it through a
/// proxy while the rows copy reaches the new shard. Then a move whose copy
/// can never succeed (the target's table has a constraint the moving rows
/// break) stops with the cause after a few of the workers' retries instead
/// of waiting forever, and `abort` leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_tables_stream_to_a_shard_that_had_them_and_a_copy_that_always_fails_stops() {
    let t = TwoProxies::start("online-reference", 2_000).await;
    let env = &t.env;
    for s in 0..3 {
        env.sql_shard(
            s,
            "SET ROLE app; CREATE TABLE countries (code text PRIMARY KEY, name text NOT NULL);
             INSERT INTO countries VALUES ('fr', 'France'), ('de', 'Germany'), ('br', 'Brazil');",
        );
    }
    let reference = "\n[[reference_tables]]\nname = \"countries\"\n";
    let (two, three) = (
        format!("{}{reference}", t.two),
        format!("{}{reference}", t.three),
    );
    std::fs::write(&t.config, &two).unwrap();
    for p in [&t.a, &t.b] {
        p.console().await.simple_query("RELOAD").await.unwrap();
    }
    let grow = t.write("three.toml", &three);
    let run = replicating(t.online(&grow)).await;
    let c = shardline_tests::connect_app(t.a.port).await.unwrap();
    c.batch_execute("INSERT INTO countries VALUES ('zz', 'Zed')")
        .await
        .unwrap();
    let (ok, out, err) = run.await.unwrap();
    assert!(ok && out.contains("2 proxies reloaded"), "{out}{err}");
    let countries = "SELECT string_agg(code, ',' ORDER BY code) FROM countries";
    assert_eq!(env.sql_shard(2, countries), "br,de,fr,zz");
    assert_eq!(env.sql_shard(0, countries), "br,de,fr,zz");
    nothing_left(env);

    // Back to two shards, with s0 refusing every row it would take.
    env.sql_shard(
        0,
        "ALTER TABLE accts ADD CONSTRAINT only_old CHECK (id <= 0) NOT VALID",
    );
    let shrink = t.write("two.toml", &two);
    let started = Instant::now();
    let (ok, out, err) = tool(t.online(&shrink)).await;
    assert!(!ok, "{out}{err}");
    assert!(
        err.contains("s2 -> s0") && err.contains("fails again and again"),
        "{err}"
    );
    assert!(!err.contains("paused"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(120));
    let (ok, out, err) = tool(t.abort(&shrink)).await;
    assert!(ok, "{out}{err}");
    env.sql_shard(0, "ALTER TABLE accts DROP CONSTRAINT only_old");
    nothing_left(env);
    placed_rows(env, &three);
}
