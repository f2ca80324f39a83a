//! Read/write splitting against a real primary and two streaming replicas:
//! which node answers is told apart by `inet_server_port()`.

use shardline_tests::{Env, EnvOptions};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio_postgres::{Client, SimpleQueryMessage};

async fn two_replicas(extra_toml: &str) -> Env {
    let env = Env::start_with(EnvOptions {
        replicas_per_shard: 2,
        extra_toml: extra_toml.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    env.wait_healthy().await;
    env
}

/// The port of the server that ran `sql` (its first column), by the simple protocol.
async fn port_of(c: &Client, sql: &str) -> u16 {
    let msgs = c.simple_query(sql).await.unwrap();
    let row = msgs
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap().to_string()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql} returned no row"));
    row.parse().unwrap()
}

/// Counts, per port, where `n` runs of `sql` landed.
async fn spread(c: &Client, sql: &str, n: usize) -> HashMap<u16, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        *counts.entry(port_of(c, sql).await).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_replicas_and_writes_to_the_primary() {
    // Read-your-writes would (rightly) send reads after writes to the primary.
    let env = two_replicas("[load_balancing]\nread_your_writes = \"off\"\n").await;
    let primary = env.node_port(0);
    let replicas: Vec<u16> = env.replicas().iter().map(|&i| env.node_port(i)).collect();
    let mut c = env.connect().await;
    c.batch_execute(
        "CREATE TABLE t (id serial PRIMARY KEY, port int); CREATE SEQUENCE s;
         CREATE FUNCTION my_writer() RETURNS int LANGUAGE sql AS 'SELECT 1';",
    )
    .await
    .unwrap();
    env.wait_healthy().await;

    // Reads, by the simple and the extended protocol.
    let read = port_of(&c, "SELECT inet_server_port()").await;
    assert!(replicas.contains(&read), "{read} not in {replicas:?}");
    let row = c
        .query_one("SELECT inet_server_port(), pg_is_in_recovery()", &[])
        .await
        .unwrap();
    assert!(replicas.contains(&(row.get::<_, i32>(0) as u16)));
    assert!(row.get::<_, bool>(1), "answered by a replica");
    assert!(replicas.contains(&port_of(&c, "SHOW port").await));
    assert!(replicas
        .contains(&port_of(&c, "WITH x AS (SELECT 1) SELECT inet_server_port() FROM x").await));

    // Writes and what must count as one.
    for sql in [
        "INSERT INTO t (port) VALUES (inet_server_port()) RETURNING port",
        "UPDATE t SET port = inet_server_port() RETURNING port",
        "SELECT inet_server_port() FROM t FOR UPDATE",
        "SELECT inet_server_port() FROM t FOR NO KEY UPDATE",
        "SELECT inet_server_port() FROM t FOR SHARE",
        "WITH w AS (INSERT INTO t (port) VALUES (0) RETURNING id) SELECT inet_server_port() FROM w",
        "SELECT inet_server_port() FROM (SELECT nextval('s')) x",
        "SELECT inet_server_port() FROM (SELECT pg_advisory_xact_lock(1)) x",
        "SELECT inet_server_port() FROM (SELECT set_config('x.y', '1', false)) x",
    ] {
        assert_eq!(port_of(&c, sql).await, primary, "{sql}");
    }
    let row = c
        .query_one(
            "INSERT INTO t (port) VALUES (inet_server_port()) RETURNING port",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, i32>(0) as u16,
        primary,
        "extended-protocol write"
    );

    // READ ONLY transactions may run on a replica; others run on the primary.
    for begin in [
        "BEGIN READ ONLY",
        "START TRANSACTION READ ONLY",
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
    ] {
        c.simple_query(begin).await.unwrap();
        let p = port_of(&c, "SELECT inet_server_port()").await;
        let again = port_of(&c, "SELECT inet_server_port()").await;
        c.simple_query("COMMIT").await.unwrap();
        assert!(replicas.contains(&p), "{begin}: {p}");
        assert_eq!(
            p, again,
            "{begin}: one connection for the whole transaction"
        );
    }
    let tx = c.build_transaction().read_only(true).start().await.unwrap();
    let p: i32 = tx
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    tx.commit().await.unwrap();
    assert!(
        replicas.contains(&(p as u16)),
        "tokio-postgres read-only transaction"
    );

    c.simple_query("BEGIN").await.unwrap();
    c.simple_query("SET TRANSACTION READ ONLY").await.unwrap();
    let p = port_of(&c, "SELECT inet_server_port()").await;
    let e = c
        .simple_query("INSERT INTO t (port) VALUES (1)")
        .await
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("25006"), "{e}");
    c.simple_query("ROLLBACK").await.unwrap();
    assert!(
        replicas.contains(&p),
        "BEGIN; SET TRANSACTION READ ONLY: {p}"
    );

    c.simple_query("BEGIN").await.unwrap();
    assert_eq!(port_of(&c, "SELECT inet_server_port()").await, primary);
    c.simple_query("COMMIT").await.unwrap();
    let tx = c.transaction().await.unwrap();
    let p: i32 = tx
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    tx.commit().await.unwrap();
    assert_eq!(
        p as u16, primary,
        "a read-write transaction runs on the primary"
    );
    // A transaction that does nothing is answered without a server.
    c.simple_query("BEGIN").await.unwrap();
    c.simple_query("COMMIT").await.unwrap();
    assert!(c.is_closed() || c.simple_query("SELECT 1").await.is_ok());

    // Hints.
    assert_eq!(
        port_of(
            &c,
            "/* shardline: role=primary */ SELECT inet_server_port()"
        )
        .await,
        primary
    );
    c.simple_query("SET shardline.role = primary")
        .await
        .unwrap();
    assert_eq!(port_of(&c, "SELECT inet_server_port()").await, primary);
    c.simple_query("RESET shardline.role").await.unwrap();
    assert!(replicas.contains(&port_of(&c, "SELECT inet_server_port()").await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_own_writing_functions_go_to_the_primary() {
    let env = two_replicas("[routing]\nwriting_functions = [\"Bump\"]\n").await;
    let primary = env.node_port(0);
    let c = env.connect().await;
    c.batch_execute(
        "CREATE TABLE counter (n int); INSERT INTO counter VALUES (0);
         CREATE FUNCTION bump() RETURNS int LANGUAGE sql AS 'UPDATE counter SET n = n + 1 RETURNING n';",
    )
    .await
    .unwrap();
    assert_eq!(
        port_of(&c, "SELECT inet_server_port() FROM (SELECT bump()) x").await,
        primary
    );
    let n: i32 = c.query_one("SELECT bump()", &[]).await.unwrap().get(0);
    assert_eq!(n, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balancing_strategies() {
    // Round robin: alternates between the two replicas.
    let env = two_replicas("").await;
    let replicas: Vec<u16> = env.replicas().iter().map(|&i| env.node_port(i)).collect();
    let c = env.connect().await;
    let counts = spread(&c, "SELECT inet_server_port()", 100).await;
    for r in &replicas {
        let n = counts.get(r).copied().unwrap_or(0);
        assert!((45..=55).contains(&n), "round_robin {counts:?}");
    }
    drop(env);

    // Random: both get a fair share.
    let env = two_replicas("[load_balancing]\nstrategy = \"random\"\n").await;
    let c = env.connect().await;
    let counts = spread(&c, "SELECT inet_server_port()", 200).await;
    assert_eq!(counts.len(), 2, "random {counts:?}");
    assert!(
        counts.values().all(|&n| (60..=140).contains(&n)),
        "random {counts:?}"
    );
    drop(env);

    // Least connections: a replica busy with an open transaction gets no new reads.
    let env = two_replicas("[load_balancing]\nstrategy = \"least_connections\"\n").await;
    let busy_client = env.connect().await;
    busy_client.simple_query("BEGIN READ ONLY").await.unwrap();
    let busy = port_of(&busy_client, "SELECT inet_server_port()").await;
    let c = env.connect().await;
    let counts = spread(&c, "SELECT inet_server_port()", 30).await;
    assert_eq!(
        counts.get(&busy),
        None,
        "least_connections {counts:?} (busy: {busy})"
    );
    busy_client.simple_query("COMMIT").await.unwrap();
    let counts = spread(&c, "SELECT inet_server_port()", 30).await;
    assert_eq!(counts.len(), 2, "both idle again: {counts:?}");
    drop(env);

    // Client hash: every connection from one address lands on one replica.
    let env = two_replicas("[load_balancing]\nstrategy = \"client_hash\"\n").await;
    let mut seen = HashMap::new();
    for _ in 0..5 {
        let c = env.connect().await;
        for (port, n) in spread(&c, "SELECT inet_server_port()", 10).await {
            *seen.entry(port).or_insert(0) += n;
        }
    }
    assert_eq!(seen.len(), 1, "client_hash is sticky: {seen:?}");
    drop(env);

    // Zone preference: replicas in the proxy's zone first (the harness puts
    // replica 1 in zone "a" and replica 2 in zone "b").
    let env = two_replicas("[load_balancing]\nzone = \"b\"\n").await;
    let second = env.node_port(env.replicas()[1]);
    let c = env.connect().await;
    let counts = spread(&c, "SELECT inet_server_port()", 20).await;
    assert_eq!(counts.get(&second), Some(&20), "zone {counts:?}");
}

/// Pauses WAL replay on a replica, writes, and waits for the proxy to act.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_replica_leaves_rotation_and_comes_back() {
    // Read-your-writes off: the writer below is the same user as the reader.
    let env = two_replicas(
        "[health]\ninterval = \"200ms\"\nmax_replica_lag = \"500ms\"\n[load_balancing]\nread_your_writes = \"off\"\n",
    )
    .await;
    let [r1, r2] = env.replicas()[..] else {
        panic!("two replicas")
    };
    let (p1, p2) = (env.node_port(r1), env.node_port(r2));
    let c = env.connect().await;
    c.batch_execute("CREATE TABLE ticks (n int)").await.unwrap();
    env.wait_healthy().await;

    env.sql_on(r1, "SELECT pg_wal_replay_pause()");
    // Keep writing so the paused replica falls further behind.
    let writer = env.connect().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let w = tokio::spawn(async move {
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            writer
                .execute("INSERT INTO ticks VALUES (1)", &[])
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let shard = env.proxy.as_ref().unwrap().shared.topology.shards[0].clone();
    let started = Instant::now();
    while shard.nodes[1].lag_ok() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "lag never noticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (bytes, time) = shard.nodes[1].lag();
    assert!(
        bytes > 0 && time > Duration::from_millis(500),
        "{bytes} {time:?}"
    );
    let counts = spread(&c, "SELECT inet_server_port()", 20).await;
    let state: Vec<_> = shard
        .nodes
        .iter()
        .map(|n| {
            (
                n.address.clone(),
                n.role(),
                n.lag(),
                n.lag_ok(),
                n.is_down(),
            )
        })
        .collect();
    assert_eq!(
        counts.get(&p2),
        Some(&20),
        "lagging replica out: {counts:?} {state:?}"
    );

    env.sql_on(r1, "SELECT pg_wal_replay_resume()");
    let started = Instant::now();
    while !shard.nodes[1].lag_ok() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counts = spread(&c, "SELECT inet_server_port()", 20).await;
    assert!(
        counts.get(&p1).copied().unwrap_or(0) > 0,
        "back in rotation: {counts:?}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    w.await.unwrap();

    // Idle primary, caught-up replicas: no lag, however old the last commit
    // (a time in the scenario, not a wait for a condition).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for n in &shard.nodes[1..] {
        assert_eq!(n.lag(), (0, Duration::ZERO), "{}", n.address);
        assert!(n.lag_ok());
    }
}

/// Two replicas applying WAL `delay` late (lag bounds in `toml` keep them
/// in rotation), and a table `kv` created through the proxy.
async fn delayed_replicas(toml: &str, delay: &str) -> Env {
    let env = two_replicas(toml).await;
    env.connect()
        .await
        .batch_execute("CREATE TABLE kv (k int PRIMARY KEY, v int)")
        .await
        .unwrap();
    env.wait_healthy().await;
    for r in env.replicas() {
        env.sql_on(
            r,
            &format!(
                "ALTER SYSTEM SET recovery_min_apply_delay = '{delay}'; SELECT pg_reload_conf();"
            ),
        );
        env.wait_sql_on(r, "SHOW recovery_min_apply_delay", delay)
            .await;
    }
    env
}

/// Both replicas apply WAL 2s late; the lag bounds are loose so they stay in
/// rotation. A write followed at once by a read must see the write, unless
/// read-your-writes is off.
async fn read_after_write(mode: &str) -> (usize, usize) {
    let toml = format!(
        "[health]\ninterval = \"200ms\"\nmax_replica_lag = \"1h\"\nmax_replica_lag_bytes = 1000000000\n\
         [load_balancing]\nread_your_writes = \"{mode}\"\nprimary_window = \"5s\"\n"
    );
    let env = delayed_replicas(&toml, "2s").await;
    let c = env.connect().await;
    let (mut fresh, mut stale) = (0, 0);
    for k in 0..10 {
        c.execute("INSERT INTO kv VALUES ($1, $1)", &[&k])
            .await
            .unwrap();
        let found = c
            .query_opt("SELECT v FROM kv WHERE k = $1", &[&k])
            .await
            .unwrap();
        if found.is_some() {
            fresh += 1;
        } else {
            stale += 1;
        }
    }
    (fresh, stale)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_lsn() {
    assert_eq!(read_after_write("lsn").await, (10, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_primary_window() {
    assert_eq!(read_after_write("primary_window").await, (10, 0));
}

/// Under `primary_window`, a write committed by a unit the client sent
/// in one write with a ROLLBACK behind it (outside any transaction, so it
/// undoes nothing) still sends the user's reads to the primary: the
/// ROLLBACK's answer forgets the writes noted only where each commit took
/// a position of its own (`lsn`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_sent_with_a_rollback_keeps_its_primary_window() {
    use shardline_tests::{wire::query, RawClient};
    let toml = "[health]\ninterval = \"200ms\"\nmax_replica_lag = \"1h\"\nmax_replica_lag_bytes = 1000000000\n\
         [load_balancing]\nread_your_writes = \"primary_window\"\nprimary_window = \"30s\"\n";
    let env = delayed_replicas(toml, "5s").await;
    let reader = env.connect_as("trustclient", "unused").await.unwrap();
    let mut raw = RawClient::login(env.port).await.unwrap();
    raw.send(&[query("INSERT INTO kv VALUES (1, 1)"), query("ROLLBACK")].concat())
        .await
        .unwrap();
    raw.until_ready().await.unwrap();
    raw.until_ready().await.unwrap();
    let found = reader
        .query_opt("SELECT v FROM kv WHERE k = 1", &[])
        .await
        .unwrap();
    assert!(found.is_some(), "read by a replica behind the write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_off_reads_stale_data() {
    let (_, stale) = read_after_write("off").await;
    assert!(
        stale > 0,
        "with read_your_writes off, a delayed replica serves stale reads"
    );
}

/// A unit that commits takes its WAL position query to the primary in
/// the same write (the client's reply then waits for no round trip of its
/// own): a COMMIT by the simple and by the extended protocol, and one
/// write outside a transaction by the extended protocol. The first write
/// of a transaction, sent behind the BEGIN the proxy held, commits
/// nothing and takes none. Seen by a relay in front of the primary that
/// keeps each piece the proxy writes to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commits_position_query_goes_in_the_commits_write() {
    let env = Env::start().await.unwrap();
    env.sql("CREATE TABLE carried (n int); GRANT ALL ON carried TO app;");
    let primary = env.primary().port;
    let relay = shardline_tests::relay::Recording::start(primary)
        .await
        .unwrap();
    let text = env.config_text.replace(
        &format!("port = {primary} }}"),
        &format!("port = {} }}", relay.port),
    );
    assert_ne!(text, env.config_text, "the primary is behind the relay");
    let (_proxy, c) = shardline_tests::start_proxy(&text).await;
    // What the proxy wrote to the primary while `run` ran: the piece that
    // begins with `first` (a message tag) and holds `marker` (empty: any),
    // and whether the position query is in it, for each such piece.
    async fn carried<F: std::future::Future<Output = ()>>(
        relay: &shardline_tests::relay::Recording,
        run: F,
        first: u8,
        marker: &[u8],
    ) -> Vec<bool> {
        relay.take();
        run.await;
        let position = b"pg_current_wal";
        let has = |piece: &[u8], what: &[u8]| {
            what.is_empty() || piece.windows(what.len()).any(|w| w == what)
        };
        relay
            .take()
            .iter()
            .filter(|p| p.first() == Some(&first) && has(p, marker))
            .map(|p| has(p, position))
            .collect()
    }

    // A row by the extended protocol (tokio-postgres: Parse/Describe/Sync,
    // then Bind/Execute/Sync).
    let insert = |n: i32| {
        let c = &c;
        async move {
            c.execute("INSERT INTO carried VALUES ($1)", &[&n])
                .await
                .unwrap();
        }
    };

    // By the simple protocol: the COMMIT's Query and the position query.
    c.batch_execute("BEGIN; INSERT INTO carried VALUES (1)")
        .await
        .unwrap();
    let commit = carried(
        &relay,
        async { c.batch_execute("COMMIT").await.unwrap() },
        b'Q',
        b"COMMIT\0",
    )
    .await;
    assert_eq!(commit, [true], "simple COMMIT");

    // By the extended protocol. The BEGIN is held and goes ahead of the
    // INSERT's Bind, which commits nothing.
    c.execute("BEGIN", &[]).await.unwrap();
    let first = carried(&relay, insert(2), b'Q', b"BEGIN").await;
    assert_eq!(first, [false], "the BEGIN sent with the first write");
    let commit = carried(
        &relay,
        async { c.execute("COMMIT", &[]).await.map(drop).unwrap() },
        b'B',
        b"",
    )
    .await;
    assert_eq!(commit, [true], "extended COMMIT");

    // One write outside a transaction, by the extended protocol.
    let autocommit = carried(&relay, insert(3), b'B', b"").await;
    assert_eq!(autocommit, [true], "extended write outside a transaction");
    assert_eq!(env.sql("SELECT count(*) FROM carried"), "3");
}

/// After a write the proxy asks the primary for its WAL position before
/// releasing the connection; answers the proxy gives itself meanwhile
/// (DEALLOCATE ALL of client-side statements) must still reach the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_answers_behind_the_wal_position_query() {
    use shardline_tests::{message, tags, RawClient};
    let env = two_replicas("").await;
    env.sql("CREATE TABLE w (n int); GRANT ALL ON w TO app;");
    env.wait_healthy().await;
    let mut c = RawClient::login(env.port).await.unwrap();
    for _ in 0..50 {
        let msgs = c
            .exchange(&[message(b'Q', b"INSERT INTO w VALUES (1)\0")])
            .await
            .unwrap();
        assert_eq!(tags(&msgs), b"CZ");
        let msgs = tokio::time::timeout(
            Duration::from_secs(5),
            c.exchange(&[message(b'Q', b"DEALLOCATE ALL\0")]),
        )
        .await
        .expect("DEALLOCATE ALL answered")
        .unwrap();
        assert_eq!(tags(&msgs), b"CZ");
    }
}

/// Preparing a writing statement runs nothing: it is prepared on a replica
/// (only the schema is needed), and no WAL position query follows it (it
/// would cost the prepare a round trip, and pin the user's reads to the
/// primary until answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preparing_a_write_runs_on_a_replica_and_asks_no_position() {
    let env = Env::start_with(EnvOptions {
        replicas_per_shard: 1,
        pool_toml: "size = 1".into(),
        // The prepare after each write waits for the replica to replay it
        // (read-your-writes holds for Parse too: a user's own DDL); on a
        // loaded machine that can take longer than the default 20 ms,
        // after which the prepare would go to the primary.
        extra_toml: "[load_balancing]\nreplica_wait = \"10s\"\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    env.sql("CREATE TABLE w (n int); GRANT ALL ON w TO app;");
    env.wait_healthy().await;
    let c = env.connect().await;
    let replica = env.replicas()[0];
    let last = |node: usize| {
        env.sql_on(
            node,
            "SELECT query FROM pg_stat_activity WHERE usename = 'app' \
             AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
        )
    };
    for i in 0..5 {
        // A write first: the position query follows it.
        c.execute("INSERT INTO w VALUES (1)", &[]).await.unwrap();
        let text = format!("INSERT INTO w VALUES ($1) /* prepared {i} */");
        c.prepare(&text).await.unwrap();
        // The proxy's one connection to the replica ran the Parse last ...
        let on_replica = last(replica);
        assert!(on_replica.contains(&text), "last statements: {on_replica}");
        // ... and the primary's ran no statement of the prepare.
        let on_primary = last(0);
        assert!(!on_primary.contains(&text), "last statements: {on_primary}");
    }
}

/// A write pipelined behind a read waits until the read's server is done,
/// and is still routed when that server fails mid-read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_behind_a_read_whose_replica_fails() {
    use shardline_tests::{message, tags, RawClient};
    let env = two_replicas("[load_balancing]\nread_your_writes = \"off\"\n").await;
    env.sql("CREATE TABLE p (port int); GRANT ALL ON p TO app;");
    env.wait_healthy().await;
    let mut c = RawClient::login(env.port).await.unwrap();
    let read = message(b'Q', b"SELECT inet_server_port() FROM pg_sleep(0.8)\0");
    let write = message(b'Q', b"INSERT INTO p VALUES (inet_server_port())\0");
    c.send(&[read, write].concat()).await.unwrap();
    // Kill (SIGKILL) the replica running the read: its socket just closes.
    let running = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(0.8)%' AND pid <> pg_backend_pid()";
    let mut reader = None;
    shardline_tests::wait_for("the read to run on a replica", || {
        reader = env
            .replicas()
            .into_iter()
            .find(|&r| env.sql_on(r, running) == "1");
        let found = reader.is_some();
        async move { found }
    })
    .await;
    env.signal_node(reader.unwrap(), libc::SIGKILL);
    // Postgres sends the RowDescription before it sleeps: an answer reached
    // the client, so the read is not re-run; it fails with the server's error.
    let first = c.until_ready().await.unwrap();
    eprintln!(
        "read answered: {:?}",
        String::from_utf8_lossy(&tags(&first))
    );
    assert!(
        tags(&first) == b"TDCZ" || tags(&first) == b"TEZ",
        "{first:?}"
    );
    let second = c.until_ready().await.unwrap();
    assert_eq!(tags(&second), b"CZ", "{second:?}");
    assert_eq!(env.sql("SELECT port FROM p"), env.node_port(0).to_string());
}

/// Read-your-writes when the writer leaves at once: a write on a new
/// connection that closes right after its commit (`psql -c`, a script, a
/// serverless handler), then a read on a new connection, never misses the
/// row; nor does a read at once on another connection of a kept pool.
/// Each round waits until the replicas have applied the previous round's
/// write, so only the new write's position can keep the read off them.
/// Eight users (read-your-writes is per user) run their rounds at once:
/// 1,200 rounds in all, half of the writers `psql -c` processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_holds_when_the_writer_leaves_at_once() {
    const USERS: i32 = 8;
    const ROUNDS: i32 = 150;
    let mut toml = String::from(
        "[health]\ninterval = \"100ms\"\nmax_replica_lag = \"1h\"\nmax_replica_lag_bytes = 100000000000\n",
    );
    for u in 0..USERS {
        toml.push_str(&format!(
            "[[users]]\nname = \"writer{u}\"\nauth = \"trust\"\ndatabase = \"app\"\nserver_user = \"app\"\nserver_password = \"app\"\n"
        ));
    }
    let env = std::sync::Arc::new(delayed_replicas(&toml, "300ms").await);
    let replica_ports: Vec<u16> = env.replicas().iter().map(|&r| env.node_port(r)).collect();
    let mut workers = Vec::new();
    for u in 0..USERS {
        let env = env.clone();
        let replica_ports = replica_ports.clone();
        workers.push(tokio::spawn(async move {
            let user = format!("writer{u}");
            let connect = || env.connect_as(&user, "unused");
            let (mut stale, mut replica_reads) = (Vec::new(), 0);
            for r in 0..ROUNDS {
                let k = u * ROUNDS + r;
                tokio::time::sleep(Duration::from_millis(450)).await;
                // The replicas serve this user again once past its last write.
                let probe = connect().await.unwrap();
                if replica_ports.contains(&port_of(&probe, "SELECT inet_server_port()").await) {
                    replica_reads += 1;
                }
                drop(probe);
                // Half the writers are psql processes (`psql -c`), half
                // in-process clients dropped at once.
                if r % 2 == 0 {
                    let conninfo = env.conn_string(&user, "unused");
                    let sql = format!("INSERT INTO kv VALUES ({k}, {k})");
                    let (ok, out) = tokio::task::spawn_blocking(move || {
                        shardline_tests::psql(&conninfo, &["-c", &sql])
                    })
                    .await
                    .unwrap();
                    assert!(ok, "{out}");
                } else {
                    let writer = connect().await.unwrap();
                    writer
                        .execute("INSERT INTO kv VALUES ($1, $1)", &[&k])
                        .await
                        .unwrap();
                    drop(writer);
                }
                let reader = connect().await.unwrap();
                let found = reader
                    .query_opt("SELECT v FROM kv WHERE k = $1", &[&k])
                    .await
                    .unwrap();
                if found.is_none() {
                    stale.push(k);
                }
            }
            (stale, replica_reads)
        }));
    }
    let (mut stale, mut replica_reads) = (Vec::new(), 0);
    for w in workers {
        let (s, r) = w.await.unwrap();
        stale.extend(s);
        replica_reads += r;
    }
    assert!(
        stale.is_empty(),
        "stale reads after the writer left: {stale:?}"
    );
    let rounds = USERS * ROUNDS;
    assert!(
        replica_reads > rounds / 2,
        "the replicas served {replica_reads} of {rounds} reads between writes"
    );
    // A kept pool: write on one connection, read at once on another.
    let connect = || env.connect_as("trustclient", "unused");
    let (a, b) = (connect().await.unwrap(), connect().await.unwrap());
    for k in 10_000..10_300 {
        a.execute("INSERT INTO kv VALUES ($1, $1)", &[&k])
            .await
            .unwrap();
        let found = b
            .query_opt("SELECT v FROM kv WHERE k = $1", &[&k])
            .await
            .unwrap();
        assert!(found.is_some(), "stale read of {k} on another connection");
    }
    // Transactions by the extended protocol, as drivers send them (BEGIN,
    // INSERT and COMMIT each prepared, then bound and executed up to a
    // Sync): the commit's position query goes right behind its Sync. Each
    // round first lets the replicas apply the last one; as they apply the
    // INSERT's WAL at once and only the commit record late, a position
    // taken before the commit would let the read on the other connection
    // reach a replica without the row.
    for k in 20_000..20_020 {
        tokio::time::sleep(Duration::from_millis(450)).await;
        a.execute("BEGIN", &[]).await.unwrap();
        a.execute("INSERT INTO kv VALUES ($1, $1)", &[&k])
            .await
            .unwrap();
        a.execute("COMMIT", &[]).await.unwrap();
        let found = b
            .query_opt("SELECT v FROM kv WHERE k = $1", &[&k])
            .await
            .unwrap();
        assert!(
            found.is_some(),
            "stale read of {k} after an extended COMMIT"
        );
    }
}

/// The proxy's own settings: `shardline.role` from the startup options
/// sends a session-pooled client to a replica; SET after its first
/// statement is refused (its connection is chosen), not silently ignored;
/// SHOW answers what is in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_settings_from_startup_options_and_show() {
    let env = two_replicas("").await;
    let replica_ports: Vec<u16> = env.replicas().iter().map(|&r| env.node_port(r)).collect();
    let conninfo = format!(
        "{} options='-c shardline.role=replica'",
        env.conn_string("sessionuser", "session-pw")
    );
    let (c, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let show = |msgs: Vec<SimpleQueryMessage>| {
        msgs.iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap().to_string()),
                _ => None,
            })
            .unwrap()
    };
    assert_eq!(
        show(c.simple_query("SHOW shardline.role").await.unwrap()),
        "replica"
    );
    assert!(replica_ports.contains(&port_of(&c, "SELECT inet_server_port()").await));
    let e = c
        .simple_query("SET shardline.role = primary")
        .await
        .expect_err("refused once the session has its connection");
    assert_eq!(
        shardline_tests::sqlstate(&e).as_deref(),
        Some("0A000"),
        "{e}"
    );
    // Transaction pooling: SET and SHOW answered by the proxy.
    let t = env.connect().await;
    assert_eq!(
        show(t.simple_query("SHOW shardline.role").await.unwrap()),
        "auto"
    );
    t.batch_execute("SET shardline.role = primary")
        .await
        .unwrap();
    assert_eq!(
        show(t.simple_query("SHOW shardline.role").await.unwrap()),
        "primary"
    );
    assert_eq!(
        port_of(&t, "SELECT inet_server_port()").await,
        env.node_port(0)
    );
    // Ended by a semicolon, as psql sends them: still the proxy's.
    t.batch_execute("SET shardline.role = replica;")
        .await
        .unwrap();
    assert_eq!(
        show(t.simple_query("SHOW shardline.role;").await.unwrap()),
        "replica"
    );
    assert!(replica_ports.contains(&port_of(&t, "SELECT inet_server_port()").await));
    t.batch_execute("RESET shardline.role ;").await.unwrap();
    assert_eq!(
        show(t.simple_query("SHOW shardline.role ;").await.unwrap()),
        "auto"
    );
    // With other statements in one query string: refused, not passed to
    // the server (which would take any dotted name and change nothing).
    let e = t
        .simple_query("SET shardline.role = primary; SELECT 1")
        .await
        .expect_err("not alone");
    assert_eq!(
        shardline_tests::sqlstate(&e).as_deref(),
        Some("0A000"),
        "{e}"
    );
    assert_eq!(
        show(t.simple_query("SHOW shardline.role").await.unwrap()),
        "auto"
    );
}

/// One user writing steadily on some connections and reading on others
/// (read-your-writes `lsn`, 10% writes over 16 connections): reads wait
/// briefly for a replica to replay the user's last write instead of going
/// to the primary, so the replicas serve most of them, and none is stale
/// (each sees every write acknowledged before it started). Before, with
/// replica positions known only as of the last health check, nearly every
/// read went to the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writing_users_reads_stay_on_replicas() {
    writing_user_reads(false).await;
}

/// The same with each write in a transaction (BEGIN, INSERT, COMMIT, as
/// pgbench's scripts and ORMs write) and each connection's own session
/// variable, replayed ahead of its units on whichever server connection it
/// gets. Before, the replayed SET's ReadyForQuery was taken for the end of
/// a write: a position guard was left behind, counted as pending for good,
/// and every read of the user went to the primary (0.3% on replicas).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writing_users_reads_stay_on_replicas_with_transactions_and_settings() {
    writing_user_reads(true).await;
}

async fn writing_user_reads(transactions: bool) {
    use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::SeqCst};
    use std::sync::Arc;
    let env = two_replicas("").await;
    env.connect()
        .await
        .batch_execute("CREATE TABLE marks (v bigint)")
        .await
        .unwrap();
    env.wait_healthy().await;
    let primary = env.node_port(0);
    let next = Arc::new(AtomicI64::new(0));
    let acked = Arc::new(AtomicI64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (on_replicas, on_primary, stale) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut tasks = Vec::new();
    for client in 0..16u64 {
        let c = env.connect().await;
        if transactions {
            c.batch_execute(&format!("SET application_name = 'client-{client}'"))
                .await
                .unwrap();
        }
        let (next, acked, stop) = (next.clone(), acked.clone(), stop.clone());
        let (on_replicas, on_primary, stale) =
            (on_replicas.clone(), on_primary.clone(), stale.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = client;
            while !stop.load(SeqCst) {
                i += 1;
                if i % 10 == 0 {
                    let n = next.fetch_add(1, SeqCst) + 1;
                    if transactions {
                        c.batch_execute("BEGIN").await.unwrap();
                    }
                    c.execute("INSERT INTO marks VALUES ($1)", &[&n])
                        .await
                        .unwrap();
                    if transactions {
                        c.batch_execute("COMMIT").await.unwrap();
                    }
                    acked.fetch_max(n, SeqCst);
                } else {
                    let want = acked.load(SeqCst);
                    let row = c
                        .query_one(
                            "SELECT coalesce(max(v), 0), inet_server_port() FROM marks",
                            &[],
                        )
                        .await
                        .unwrap();
                    if row.get::<_, i64>(0) < want {
                        stale.fetch_add(1, SeqCst);
                    }
                    if row.get::<_, i32>(1) as u16 == primary {
                        on_primary.fetch_add(1, SeqCst);
                    } else {
                        on_replicas.fetch_add(1, SeqCst);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let (r, p, s) = (
        on_replicas.load(SeqCst),
        on_primary.load(SeqCst),
        stale.load(SeqCst),
    );
    eprintln!(
        "{} writes; reads: {r} on replicas, {p} on the primary ({:.0}% on replicas), {s} stale",
        next.load(SeqCst),
        100.0 * r as f64 / (r + p).max(1) as f64
    );
    assert_eq!(s, 0, "stale reads");
    assert!(r >= 4 * p, "replicas served {r} reads, the primary {p}");
}

/// Caught-up replicas stay in rotation while the primary writes WAL
/// without committing (a long load in one transaction, on a direct
/// connection): reads keep going to them. Before, a replica any bytes
/// behind was dated by its last replayed commit, so half a second into
/// such a load (`max_replica_lag`) both left rotation and every read went
/// to the primary; now it is dated by when the primary passed its position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_stay_in_rotation_during_a_long_uncommitted_load() {
    let env = two_replicas("[load_balancing]\nread_your_writes = \"off\"\n").await;
    let primary = env.node_port(0);
    let c = env.connect().await;
    c.batch_execute("CREATE TABLE load (v int)").await.unwrap();
    env.wait_healthy().await;
    let direct = env.connect_shard(0).await;
    let loading = tokio::spawn(async move {
        direct.batch_execute("BEGIN").await.unwrap();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            direct
                .batch_execute("INSERT INTO load SELECT generate_series(1, 5000)")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        direct.batch_execute("ROLLBACK").await.unwrap();
    });
    // Past max_replica_lag and more than one health check into the load.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut on_primary = 0;
    for _ in 0..40 {
        if port_of(&c, "SELECT inet_server_port()").await == primary {
            on_primary += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!loading.is_finished(), "the load ended before the reads");
    loading.await.unwrap();
    assert_eq!(
        on_primary, 0,
        "{on_primary} of 40 reads went to the primary during the load"
    );
}

/// With `lsn` read-your-writes (the default), a write's WAL position is
/// asked only where replicas could serve the user's next read: a shard
/// that is its primary alone answers every read, so its writes cost no
/// position query. Seen on the server: the last query of the pool's
/// connection after a committed write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_are_asked_only_where_replicas_read() {
    let asked = |env: &Env| {
        env.sql_on(
            0,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'app' AND backend_type = 'client backend' \
             AND usename = 'app' AND application_name <> 'shardline-health' AND query LIKE '%pg_current_wal%'",
        )
    };
    for (replicas, expected) in [(0, "0"), (1, "1")] {
        let env = Env::start_with(EnvOptions {
            replicas_per_shard: replicas,
            pool_toml: "size = 1\ncheckout_timeout = \"3s\"\n".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        env.wait_healthy().await;
        let c = env.connect().await;
        c.batch_execute("CREATE TABLE IF NOT EXISTS positions (id int)")
            .await
            .unwrap();
        c.batch_execute("BEGIN; INSERT INTO positions VALUES (1); COMMIT")
            .await
            .unwrap();
        c.batch_execute("INSERT INTO positions VALUES (2)")
            .await
            .unwrap();
        assert_eq!(asked(&env), expected, "{replicas} replicas");
        assert_eq!(env.sql("SELECT count(*) FROM positions"), "2");
    }
}

/// A transaction rolled back asks no WAL position: nothing it wrote
/// remains for a read to wait for, so its ROLLBACK is answered at once.
/// Before, any write in it made the proxy ask the primary's position
/// behind the ROLLBACK and hold the reply for it (a round trip for the
/// client, a query for the primary). By the simple and the extended
/// protocol, and a COMMIT of a failed transaction (which rolls back);
/// a committed one still asks. Also when the client sends its statements
/// in one write, the COMMIT before the failing statement's answer (as
/// tokio-postgres may): the proxy then sends the COMMIT while the
/// transaction still looks open, and decides at its answer, which the
/// server gives as ROLLBACK. Seen on the server: the last query of the
/// primary's connection last used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_transaction_asks_no_position() {
    let env = Env::start_with(EnvOptions {
        replicas_per_shard: 1,
        pool_toml: "size = 1\ncheckout_timeout = \"3s\"\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    env.wait_healthy().await;
    let last = || {
        env.sql_on(
            0,
            "SELECT query FROM pg_stat_activity WHERE datname = 'app' AND backend_type = 'client backend' \
             AND usename = 'app' AND application_name <> 'shardline-health' \
             ORDER BY state_change DESC LIMIT 1",
        )
    };
    let c = env.connect().await;
    c.batch_execute("CREATE TABLE IF NOT EXISTS undone (id int)")
        .await
        .unwrap();
    // By the simple protocol.
    undone_transaction(&c, false, 1, false, "ROLLBACK").await;
    assert_eq!(last(), "ROLLBACK", "simple protocol");
    // By the extended protocol (Parse/Describe/Sync, then Bind/Execute/Sync).
    undone_transaction(&c, true, 2, false, "ROLLBACK").await;
    assert_eq!(last(), "ROLLBACK", "extended protocol");
    // A COMMIT of a failed transaction rolls it back.
    undone_transaction(&c, false, 3, true, "COMMIT").await;
    assert_eq!(last(), "COMMIT", "a failed transaction's COMMIT");
    undone_transaction(&c, true, 4, true, "COMMIT").await;
    assert_eq!(last(), "COMMIT", "the same by the extended protocol");
    assert_eq!(env.sql("SELECT count(*) FROM undone"), "0");
    // A committed transaction still asks, by either protocol.
    undone_transaction(&c, false, 5, false, "COMMIT").await;
    assert!(last().contains("pg_current_wal"), "simple: {}", last());
    undone_transaction(&c, true, 6, false, "COMMIT").await;
    assert!(last().contains("pg_current_wal"), "extended: {}", last());
    // And the reads after a rollback are served (from the replica, once
    // it has the commits).
    undone_transaction(&c, true, 7, false, "ROLLBACK").await;
    let rows = c
        .query("SELECT id FROM undone ORDER BY id", &[])
        .await
        .unwrap();
    let ids: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, [5, 6]);
    // Every statement in one write, by either protocol.
    let mut raw = shardline_tests::RawClient::login(env.port).await.unwrap();
    for (extended, id, fail, end, asks) in [
        (false, 11, true, "COMMIT", false),
        (true, 12, true, "COMMIT", false),
        (false, 13, false, "ROLLBACK", false),
        (true, 14, false, "ROLLBACK", false),
        (false, 15, false, "COMMIT", true),
        (true, 16, false, "COMMIT", true),
    ] {
        let insert = format!("INSERT INTO undone VALUES ({id})");
        let mut statements = vec!["BEGIN", &insert];
        if fail {
            statements.push("SELECT 1/0");
        }
        statements.push(end);
        let write: Vec<Vec<u8>> = statements
            .iter()
            .flat_map(|sql| match extended {
                true => shardline_tests::wire::unit(sql),
                false => vec![shardline_tests::wire::query(sql)],
            })
            .collect();
        raw.send(&write.concat()).await.unwrap();
        for _ in &statements {
            raw.until_ready().await.unwrap();
        }
        let what = format!("{end} in one write (extended {extended}, failed {fail})");
        match asks {
            true => assert!(last().contains("pg_current_wal"), "{what}: {}", last()),
            false => assert_eq!(last(), end, "{what}"),
        }
    }
    assert_eq!(
        env.sql("SELECT string_agg(id::text, ',' ORDER BY id) FROM undone"),
        "5,6,15,16"
    );
}

/// BEGIN, a row `id` into `undone`, a failing statement when `fail`, then
/// `end`: by the simple protocol, or the extended one (tokio-postgres:
/// Parse/Describe/Sync, then Bind/Execute/Sync).
async fn undone_transaction(
    c: &tokio_postgres::Client,
    extended: bool,
    id: i32,
    fail: bool,
    end: &str,
) {
    if extended {
        c.execute("BEGIN", &[]).await.unwrap();
        c.execute("INSERT INTO undone VALUES ($1)", &[&id])
            .await
            .unwrap();
        if fail {
            c.execute("SELECT 1/0", &[]).await.unwrap_err();
        }
        c.execute(end, &[]).await.unwrap();
    } else {
        c.batch_execute("BEGIN").await.unwrap();
        c.batch_execute(&format!("INSERT INTO undone VALUES ({id})"))
            .await
            .unwrap();
        if fail {
            c.batch_execute("SELECT 1/0").await.unwrap_err();
        }
        c.batch_execute(end).await.unwrap();
    }
}

/// Each statement text is routed (shaped and looked up in the router's
/// cache) once, however many steps of its unit read it: the router's
/// counters grow by one per statement sent, by the simple protocol, by a
/// driver's prepare-then-execute, and inside a transaction. Before, the
/// steps after the unit's plan (`on_query`, `on_parse`) routed the text
/// again.
#[tokio::test]
async fn each_statement_is_routed_once() {
    let env = two_replicas("").await;
    let c = env.connect().await;
    c.batch_execute("CREATE TABLE IF NOT EXISTS routed_once (id int)")
        .await
        .unwrap();
    let routed = || {
        let s = env.proxy.as_ref().unwrap().shared.router.stats();
        s.hits + s.misses
    };
    let before = routed();
    for i in 0..10 {
        c.simple_query(&format!("SELECT {i} FROM routed_once"))
            .await
            .unwrap();
    }
    assert_eq!(routed() - before, 10, "simple queries");
    let before = routed();
    for i in 0..10 {
        // tokio-postgres: Parse + Describe + Sync, then Bind + Execute + Sync.
        c.query("SELECT $1::int FROM routed_once", &[&i])
            .await
            .unwrap();
    }
    assert_eq!(routed() - before, 10, "prepared and executed");
    let before = routed();
    for i in 0..5 {
        c.simple_query("BEGIN").await.unwrap();
        c.simple_query(&format!("INSERT INTO routed_once VALUES ({i})"))
            .await
            .unwrap();
        c.simple_query("SELECT count(*) FROM routed_once")
            .await
            .unwrap();
        c.simple_query("COMMIT").await.unwrap();
    }
    assert_eq!(routed() - before, 20, "transactions");
}
