//! The container tier: Shardline's image in front of the Postgres node
//! image, as users deploy it (`docker/`), and the faults only containers can
//! make: a node cut off from the network while it keeps running, a frozen
//! node, a stopped container, `docker stop` of the proxy under load.
//!
//! Run with `cargo test --workspace --features shardline-tests/containers
//! --test containers -- --ignored` (`scripts/test.sh` does, after the
//! process tier); needs a Docker engine. The tests are `#[ignore]`d so that
//! the process tier, built with the same features, builds them in the same
//! build and lists them as ignored rather than running them. The images
//! are built from this checkout on first use (`docker/build.sh --binary`
//! with the tests' debug binary).

use shardline_config::Config;
use shardline_router::hash::KeyValue;
use shardline_router::sharding::Sharding;
use shardline_tests::containers::{cluster, ComposeCluster, ContainerCluster};
use shardline_tests::drivers::{self, run_driver};
use shardline_tests::{audit_users, Env};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// Checks every 200 ms, a failed check after 800 ms; a failed node is
/// skipped for 2 s.
const FAST_HEALTH: &str =
    "[health]\ninterval = \"200ms\"\ntimeout = \"800ms\"\nban_time = \"2s\"\n";

/// Two shards, each a primary and a streaming replica, in containers, with
/// Shardline's image in front and the demo's tables made through it.
async fn topology(extra_toml: &str) -> (Env, Sharding) {
    let nodes = ContainerCluster::start(2, 1).await.expect("the containers");
    let config = format!(
        "[proxy]\nlisten = \"0.0.0.0:6432\"\npool_mode = \"transaction\"\nshutdown_timeout = \"20s\"\n\
         [pool]\ncheckout_timeout = \"3s\"\nconnect_timeout = \"1s\"\n\
         [[users]]\nname = \"app\"\npassword = \"app\"\ndatabase = \"app\"\n\n{}{}{extra_toml}",
        nodes.shards_toml(),
        shardline::demo::demo_sharding_two_phase()
    );
    let env = nodes.with_proxy(config).await.expect("the Shardline image");
    let c = env.connect().await;
    c.batch_execute(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, country text, created_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE orders (id bigint, user_id bigint NOT NULL, amount numeric(12,2) NOT NULL, PRIMARY KEY (user_id, id));",
    )
    .await
    .expect("schema through the proxy");
    env.backend
        .wait_replicas_caught_up(Duration::from_secs(30))
        .unwrap();
    let sh = Sharding::from_config(&Config::from_toml(&env.config_text, "t").expect("config"));
    (env, sh)
}

/// The first key from `from` on that shard `shard` owns.
fn key_on(sh: &Sharding, shard: usize, from: i64) -> i64 {
    (from..)
        .find(|&k| sh.groups[0].shard_of(Some(&KeyValue::Int(k))) == Ok(shard))
        .unwrap()
}

/// BEGIN, users `a` and `b` (on two shards, each named after the other:
/// `pair <other key>`), COMMIT sent alone, as a transaction on several
/// shards asks.
async fn two_shard_transaction(c: &Client, a: i64, b: i64) -> Result<(), tokio_postgres::Error> {
    c.batch_execute("BEGIN").await?;
    for (key, other) in [(a, b), (b, a)] {
        c.batch_execute(&format!(
            "INSERT INTO users (id, name) VALUES ({key}, 'pair {other}')"
        ))
        .await?;
    }
    c.batch_execute("COMMIT").await
}

/// Whether the node that answered a read of `key` was a replica.
async fn read_on_replica(c: &Client, key: i64) -> Result<bool, tokio_postgres::Error> {
    let row = c
        .query_one(
            "SELECT pg_is_in_recovery(), count(*) FROM users WHERE id = $1",
            &[&key],
        )
        .await?;
    Ok(row.get(0))
}

/// Polls reads of `key` until `on_replica` holds; how long it took.
async fn reads_move(c: &Client, key: i64, on_replica: bool, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let read = tokio::time::timeout(Duration::from_secs(10), read_on_replica(c, key)).await;
        match read {
            Ok(Ok(r)) if r == on_replica => return started.elapsed(),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("a read failed: {e:?}"),
            Err(_) => panic!("a read waited 10 s"),
        }
        assert!(
            started.elapsed() < limit,
            "reads of {key} not on the {} after {limit:?}",
            if on_replica { "replica" } else { "primary" }
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `docker compose up` of docker/compose.yml as the README says, then what
/// a user does first: psql, a cross-shard merge, a transaction on both
/// shards (two-phase commit), pgbench, and the driver matrix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "container tier: needs a Docker engine; scripts/test.sh runs it with --ignored"]
async fn compose_cluster_end_to_end() {
    let started = Instant::now();
    let env = ComposeCluster::start().await.expect("docker compose up");
    let up = started.elapsed();
    let url = env.url("app", "app");
    let sh = Sharding::from_config(&Config::from_toml(&env.config_text, "t").expect("config"));

    // psql: the demo's data, loaded through the proxy, is all there.
    let (ok, out) = shardline_tests::psql(
        &url,
        &[
            "-At",
            "-c",
            "SELECT count(*) FROM users",
            "-c",
            "SELECT count(*) FROM orders",
            "-c",
            "SELECT count(*) FROM countries",
        ],
    );
    assert!(ok, "{out}");
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["1000", "5000", "5"],
        "{out}"
    );
    // ... and split by key: each shard holds exactly the users it owns.
    let demo_users: Vec<i64> = (1..=1000).collect();
    assert_eq!(audit_users(&env, &sh, 2), demo_users);

    // A merged aggregate equals what the shards hold between them.
    let (ok, merged) = shardline_tests::psql(
        &url,
        &[
            "-At",
            "-c",
            "SELECT count(*), sum(amount), max(amount) FROM orders",
        ],
    );
    assert!(ok, "{merged}");
    let per_shard: Vec<Vec<f64>> = (0..2)
        .map(|s| {
            env.sql_shard(s, "SELECT count(*), sum(amount), max(amount) FROM orders")
                .split('|')
                .map(|v| v.parse().unwrap())
                .collect()
        })
        .collect();
    let expected = format!(
        "{}|{:.2}|{:.2}",
        per_shard[0][0] + per_shard[1][0],
        per_shard[0][1] + per_shard[1][1],
        per_shard[0][2].max(per_shard[1][2])
    );
    assert_eq!(merged.trim(), expected);
    assert!(per_shard[0][0] > 0.0 && per_shard[1][0] > 0.0);

    // A transaction writing on both shards commits on both (2PC), leaving
    // nothing prepared behind.
    let (a, b) = (key_on(&sh, 0, 50_000), key_on(&sh, 1, 50_000));
    let c = env.connect().await;
    two_shard_transaction(&c, a, b)
        .await
        .expect("a transaction on both shards");
    assert_eq!(
        env.sql_shard(0, &format!("SELECT count(*) FROM users WHERE id = {a}")),
        "1"
    );
    assert_eq!(
        env.sql_shard(1, &format!("SELECT count(*) FROM users WHERE id = {b}")),
        "1"
    );
    for s in 0..2 {
        assert_eq!(
            env.sql_shard(s, "SELECT count(*) FROM pg_prepared_xacts"),
            "0"
        );
    }

    // pgbench: its tables (not sharded: on the default shard), then its
    // read/write script; no transaction may fail.
    let (ok, out) = env.pgbench(&["-i", "-s", "1", "-q"]);
    assert!(ok, "{out}");
    let (ok, out) = env.pgbench(&["-n", "-c", "4", "-j", "2", "-T", "5"]);
    assert!(
        ok && out.contains("number of failed transactions: 0"),
        "{out}"
    );
    let tps = out
        .lines()
        .find(|l| l.starts_with("tps"))
        .unwrap_or_default()
        .to_string();

    // The driver matrix, on the cluster users start.
    let mut before = demo_users;
    before.extend([a, b]);
    before.sort();
    let mut first_key = 100_000;
    for driver in [
        drivers::python(&env),
        drivers::node(&env),
        drivers::jdbc(&env),
        drivers::pgx(&env),
    ] {
        let name = driver.name;
        let out = run_driver(&env, &sh, driver, first_key, &before).await;
        before = audit_users(&env, &sh, 2);
        eprintln!("compose: {name} passed ({} lines)", out.lines().count());
        first_key += 100_000;
    }
    eprintln!(
        "compose cluster: up and loaded in {up:?}; pgbench {tps}; whole test {:?}",
        started.elapsed()
    );
}

/// The fault tests' start: the topology with fast health checks, a user on
/// shard `shard`, and a client reading it from the shard's replica (one
/// that never wrote: read-your-writes does not pin it). Returns the
/// client, the key and the replica's index.
async fn reading_a_replica(shard: usize) -> (Env, Client, i64, usize) {
    let (env, sh) = topology(FAST_HEALTH).await;
    let key = key_on(&sh, shard, 1);
    env.connect()
        .await
        .execute("INSERT INTO users (id, name) VALUES ($1, 'k')", &[&key])
        .await
        .unwrap();
    let reader = env.connect().await;
    reads_move(&reader, key, true, Duration::from_secs(30)).await;
    let replica = env.shard_replica(shard);
    (env, reader, key, replica)
}

/// A replica cut off from the network keeps running; its reads move to the
/// primary within the health timeout (a read waiting on it is cut and run
/// again), and come back once it is reconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "container tier: needs a Docker engine; scripts/test.sh runs it with --ignored"]
async fn a_replica_cut_off_from_the_network() {
    let (env, reader, key, replica) = reading_a_replica(0).await;
    cluster(&env).disconnect(replica).unwrap();
    let away = reads_move(&reader, key, false, Duration::from_secs(10)).await;
    cluster(&env).reconnect(replica).unwrap();
    let back = reads_move(&reader, key, true, Duration::from_secs(30)).await;
    eprintln!("network cut: reads left the replica after {away:?}, came back {back:?} after it was reconnected");
}

/// A frozen replica (`docker pause`: its sockets open, nothing answering):
/// reads move away within the timeouts, and come back when it thaws.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "container tier: needs a Docker engine; scripts/test.sh runs it with --ignored"]
async fn a_frozen_replica() {
    let (env, reader, key, replica) = reading_a_replica(1).await;
    cluster(&env).pause(replica).unwrap();
    let away = reads_move(&reader, key, false, Duration::from_secs(10)).await;
    // Every read while it stays frozen is answered, none waiting on it.
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(3) {
        let t = Instant::now();
        assert!(!read_on_replica(&reader, key).await.unwrap());
        slowest = slowest.max(t.elapsed());
    }
    cluster(&env).unpause(replica).unwrap();
    let back = reads_move(&reader, key, true, Duration::from_secs(30)).await;
    assert!(slowest < Duration::from_secs(2), "a read took {slowest:?}");
    eprintln!("frozen replica: reads left it after {away:?} (then slowest {slowest:?}), came back {back:?} after it thawed");
}

/// The primary's container stopped: writes to its shard fail with an error
/// (no hang), the other shard keeps working, and with `auto_promote` the
/// replica is promoted and takes the writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "container tier: needs a Docker engine; scripts/test.sh runs it with --ignored"]
async fn failover_with_the_primary_container_stopped() {
    let (env, sh) = topology(&format!(
        "{FAST_HEALTH}auto_promote = true\nauto_promote_after = \"2s\"\n[load_balancing]\nread_your_writes = \"off\"\n"
    ))
    .await;
    // The health-check role (the first user, app) must be allowed to promote.
    for s in 0..2 {
        env.sql_shard(
            s,
            "GRANT EXECUTE ON FUNCTION pg_promote(boolean, integer) TO app",
        );
    }
    let k1 = key_on(&sh, 1, 1);
    let c = env.connect().await;
    let primary = env.shard_primary(0);
    env.backend.stop_node(primary, "fast").unwrap();
    let stopped = Instant::now();
    let mut errors = 0;
    let mut next = 1_000_000;
    let took = loop {
        next = key_on(&sh, 0, next + 1);
        let k = next;
        let attempt = tokio::time::timeout(
            Duration::from_secs(10),
            c.execute("INSERT INTO users (id, name) VALUES ($1, 'after')", &[&k]),
        )
        .await
        .expect("a write answered within 10 s");
        match attempt {
            Ok(_) => break stopped.elapsed(),
            Err(_) => errors += 1,
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(30),
            "writes did not resume"
        );
        // The other shard is unaffected meanwhile.
        c.execute(
            "INSERT INTO users (id, name) VALUES ($1, 'other') ON CONFLICT (id) DO NOTHING",
            &[&k1],
        )
        .await
        .expect("the other shard takes writes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        errors > 0,
        "the primary's writes failed until the promotion"
    );
    // The write went to the promoted replica.
    let replica = env.shard_replica(0);
    assert_eq!(env.sql_on(replica, "SELECT pg_is_in_recovery()"), "f");
    assert_eq!(
        env.sql_on(
            replica,
            &format!("SELECT count(*) FROM users WHERE id = {next}")
        ),
        "1"
    );
    eprintln!("primary container stopped: {errors} writes refused, then writes resumed on the promoted replica after {took:?}");
}

/// `docker stop` of the Shardline container while clients run transactions
/// on both shards: it stops accepting, lets open transactions finish, exits
/// 0; every transaction a client saw commit is on both shards, and none is
/// half there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "container tier: needs a Docker engine; scripts/test.sh runs it with --ignored"]
async fn docker_stop_of_shardline_under_load() {
    let (env, _) = topology("").await;
    let mut clients = Vec::new();
    for w in 0..4i64 {
        let c = env.connect().await;
        let sh = Sharding::from_config(&Config::from_toml(&env.config_text, "t").unwrap());
        clients.push(tokio::spawn(async move {
            let mut committed = Vec::new();
            let mut from = 10_000_000 * (w + 1);
            loop {
                let a = key_on(&sh, 0, from);
                let b = key_on(&sh, 1, a + 1);
                from = b + 1;
                match two_shard_transaction(&c, a, b).await {
                    Ok(()) => committed.push((a, b)),
                    Err(_) => return committed,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let took = cluster(&env).stop_proxy(Duration::from_secs(30)).unwrap();
    let mut committed = Vec::new();
    for c in clients {
        committed.extend(c.await.unwrap());
    }
    let (code, log) = cluster(&env).proxy_exit().unwrap();
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("stopped"), "{log}");
    assert!(committed.len() > 10, "{} transactions", committed.len());
    // Every committed pair is on its two shards; no key is there without its pair.
    let on = |s: usize| -> Vec<(i64, i64)> {
        env.sql_shard(
            s,
            "SELECT id, split_part(name, ' ', 2) FROM users WHERE name LIKE 'pair %'",
        )
        .lines()
        .map(|l| {
            let (k, p) = l.split_once('|').unwrap();
            (k.parse().unwrap(), p.parse().unwrap())
        })
        .collect()
    };
    let (s0, s1) = (on(0), on(1));
    let pairs0: std::collections::BTreeSet<(i64, i64)> = s0.iter().copied().collect();
    let pairs1: std::collections::BTreeSet<(i64, i64)> = s1.iter().map(|&(b, a)| (a, b)).collect();
    assert_eq!(pairs0, pairs1, "a transaction is on one shard only");
    for pair in &committed {
        assert!(pairs0.contains(pair), "committed {pair:?} is missing");
    }
    for s in 0..2 {
        assert_eq!(
            env.sql_shard(s, "SELECT count(*) FROM pg_prepared_xacts"),
            "0"
        );
    }
    eprintln!(
        "docker stop under load: {} transactions committed, {} on the shards, stopped in {took:?}",
        committed.len(),
        pairs0.len()
    );
}
