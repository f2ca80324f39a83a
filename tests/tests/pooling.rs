//! Pool behaviour: more clients than connections, checkout timeouts, dirty
//! connections never reused, idle and lifetime limits, dead idle connections.

use shardline_tests::{sqlstate, Env, EnvOptions};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_clients_than_connections() {
    let env = Env::start().await.unwrap();
    env.sql("CREATE TABLE hits (client int, n int); GRANT ALL ON hits TO app;");
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut c = env.connect_as("tinypool", "tiny-pw").await.unwrap();
        tasks.push(tokio::spawn(async move {
            for n in 0..10 {
                let tx = c.transaction().await.unwrap();
                tx.execute("INSERT INTO hits VALUES ($1, $2)", &[&i, &n])
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(env.sql("SELECT count(*) FROM hits"), "200");
    assert!(env.server_backends(None) <= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_timeout_is_a_clear_error() {
    let env = Env::start_with(EnvOptions {
        pool_toml: "checkout_timeout = \"1s\"\n".into(),
        // One node, so the reads below need the primary's pool too.
        replicas_per_shard: 0,
        ..Default::default()
    })
    .await
    .unwrap();
    // Two clients hold both connections of the pool in open transactions.
    let a = env.connect_as("tinypool", "tiny-pw").await.unwrap();
    let b = env.connect_as("tinypool", "tiny-pw").await.unwrap();
    a.simple_query("BEGIN; SELECT 1").await.unwrap();
    b.simple_query("BEGIN; SELECT 1").await.unwrap();
    let c = env.connect_as("tinypool", "tiny-pw").await.unwrap();
    let started = Instant::now();
    let e = c.simple_query("SELECT 1").await.unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(sqlstate(&e).as_deref(), Some("53300"), "{e}");
    let msg = e.as_db_error().unwrap().message().to_string();
    assert!(
        msg.contains("no server connection") && msg.contains("1s"),
        "{msg}"
    );
    // The waiting client is fine once a connection frees up.
    a.simple_query("COMMIT").await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    b.simple_query("COMMIT").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_mid_transaction_leaves_nothing_dirty() {
    let env = Env::start().await.unwrap();
    env.sql("CREATE TABLE t (id int); GRANT ALL ON t TO app;");
    for _ in 0..3 {
        let c = env.connect_as("tinypool", "tiny-pw").await.unwrap();
        c.simple_query("BEGIN; INSERT INTO t VALUES (1)")
            .await
            .unwrap();
        drop(c); // disconnect without COMMIT
    }
    // The half-done transactions were rolled back, not handed to someone else.
    shardline_tests::wait_for("the abandoned transactions to end", || {
        let done = env.server_backends(Some("idle in transaction")) == 0;
        async move { done }
    })
    .await;
    assert_eq!(env.sql("SELECT count(*) FROM t"), "0");
    let c = env.connect_as("tinypool", "tiny-pw").await.unwrap();
    for i in 0..4 {
        let r = c.query_one("SELECT count(*) FROM t", &[]).await.unwrap();
        assert_eq!(r.get::<_, i64>(0), i);
        // Not inside anyone's transaction: BEGIN gives no warning and COMMIT commits.
        c.simple_query("BEGIN; INSERT INTO t VALUES (2); COMMIT")
            .await
            .unwrap();
    }
    assert_eq!(env.sql("SELECT count(*) FROM t"), "4");

    // Mid-query disconnect (the server is still sending rows).
    let c = env.connect_as("tinypool", "tiny-pw").await.unwrap();
    let q = tokio::spawn(async move {
        c.simple_query("SELECT pg_sleep(0.5), g FROM generate_series(1, 3) g")
            .await
    });
    // (on whichever node serves the read)
    let running = |n: usize| {
        let on = |i| {
            env.sql_on(i, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(0.5)%' AND state = 'active'")
        };
        let count: usize = (0..env.backend.nodes().len())
            .map(|i| on(i).parse::<usize>().unwrap())
            .sum();
        async move { count == n }
    };
    shardline_tests::wait_for("the query to run", || running(1)).await;
    q.abort();
    shardline_tests::wait_for("the query to end", || running(0)).await;
    let c = env.connect_as("tinypool", "tiny-pw").await.unwrap();
    for _ in 0..4 {
        assert_eq!(
            c.query_one("SELECT 3", &[]).await.unwrap().get::<_, i32>(0),
            3
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_and_max_lifetime() {
    let env = Env::start_with(EnvOptions {
        pool_toml: "idle_timeout = \"1s\"\nmax_lifetime = \"2s\"\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let c = env.connect().await;
    let pid1: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(env.server_backends(None), 1);
    // The reaper closes the idle connection.
    shardline_tests::wait_for("the idle connection to be closed", || {
        let done = env.server_backends(None) == 0;
        async move { done }
    })
    .await;
    // Lifetime: keep a connection busy; it is replaced once older than 2s.
    let mut pids = std::collections::HashSet::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(4500) {
        let p: i32 = c
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        pids.insert(p);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!pids.contains(&pid1));
    assert!(
        pids.len() >= 2,
        "connection replaced after max_lifetime: {pids:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_is_invisible() {
    // Default pool settings: idle connections are checked at every reuse.
    let env = Env::start_with(EnvOptions {
        replicas_per_shard: 0,
        ..Default::default()
    })
    .await
    .unwrap();
    let c = env.connect().await;
    let before: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    env.backend.stop_node(0, "fast").unwrap();
    env.backend.start_node(0).unwrap();
    // A health check may have caught the restart; wait for the next good one.
    env.wait_healthy().await;
    // The pooled connection died with the server; the client never sees it.
    let after: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(before, after);
}

/// A server that closes pooled connections while they are idle
/// (pg_terminate_backend, its `idle_session_timeout`) costs no client
/// anything: the next statement, a write sent at once, gets a connection
/// that is open, not the FATAL the closed one left behind ("terminating
/// connection due to administrator command", as the answer to an INSERT
/// that never ran).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_server_closed_while_idle_are_not_lent() {
    let env = Env::start_with(EnvOptions {
        replicas_per_shard: 0,
        ..Default::default()
    })
    .await
    .unwrap();
    env.sql("CREATE TABLE closed_idle (n int); GRANT ALL ON closed_idle TO app;");
    env.wait_healthy().await;
    let c = env.connect().await;
    let pooled =
        "FROM pg_stat_activity WHERE usename = 'app' AND application_name <> 'shardline-health'";
    for round in 0..5 {
        c.simple_query(&format!("INSERT INTO closed_idle VALUES ({round})"))
            .await
            .unwrap();
        let killed = env.sql(&format!("SELECT count(pg_terminate_backend(pid)) {pooled}"));
        assert_ne!(killed, "0");
        env.wait_sql(&format!("SELECT count(*) {pooled}"), "0")
            .await;
        c.simple_query(&format!("INSERT INTO closed_idle VALUES ({})", 100 + round))
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
    }
    assert_eq!(env.sql("SELECT count(*) FROM closed_idle"), "10");
}

/// A client that leaves in the middle of a statement leaves nothing
/// running: the proxy cancels the statement before closing its server
/// connection, so the transaction rolls back and its locks go at once. A
/// server notices a closed connection only when it next reads or writes:
/// before, the statement ran to its end (here a minute) holding the row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_statement_leaves_nothing_running() {
    use shardline_tests::{tags, wire::query, RawClient};
    let env = Env::start_with(EnvOptions {
        replicas_per_shard: 0,
        ..Default::default()
    })
    .await
    .unwrap();
    env.sql("CREATE TABLE left_locked (id int PRIMARY KEY, v text); INSERT INTO left_locked VALUES (1, 'before'); GRANT ALL ON left_locked TO app;");
    let sleeping = "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'";
    for round in 0..2 {
        let mut a = RawClient::login(env.port).await.unwrap();
        for sql in ["BEGIN", "UPDATE left_locked SET v = 'left' WHERE id = 1"] {
            let r = a.exchange(&[query(sql)]).await.unwrap();
            assert_eq!(tags(&r), b"CZ", "{sql}: {r:?}");
        }
        a.send(&query("SELECT pg_sleep(60)")).await.unwrap();
        env.wait_sql(sleeping, "1").await;
        drop(a);
        env.wait_sql(sleeping, "0").await;
        let b = env.connect().await;
        let updated = b
            .execute("UPDATE left_locked SET v = 'after' WHERE id = 1", &[])
            .await
            .unwrap();
        assert_eq!(updated, 1, "round {round}");
    }
    assert_eq!(env.sql("SELECT v FROM left_locked"), "after");
}

/// The temp table, session advisory lock and SQL prepared statement a
/// client leaves on its server connection under transaction pooling: that
/// client keeps the connection (`pool.session_state = "pin"`, the default),
/// nobody else ever sees them, and the connection is reset when it leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_stays_with_its_client() {
    let env = Env::start().await.unwrap();
    // tinypool: two server connections per node.
    let a = env.connect_as("tinypool", "tiny-pw").await.unwrap();
    a.simple_query("CREATE TEMP TABLE mine (x int); INSERT INTO mine VALUES (41)")
        .await
        .unwrap();
    a.simple_query("SELECT pg_advisory_lock(7)").await.unwrap();
    a.simple_query("PREPARE q AS SELECT 1").await.unwrap();
    let b = env.connect_as("tinypool", "tiny-pw").await.unwrap();
    for round in 0..10 {
        // The client that made them still has them, on every statement.
        let x: i32 = a
            .query_one("SELECT x + 1 FROM mine", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(x, 42);
        a.simple_query("EXECUTE q").await.unwrap();
        // Nobody else does, and the lock excludes them.
        assert_eq!(others_see(&b).await, (false, false, false), "round {round}");
    }
    drop(a);
    env.wait_sql(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'",
        "0",
    )
    .await;
    // Reset before anyone else got the connection: lock free, nothing left.
    for _ in 0..4 {
        let c = env.connect_as("tinypool", "tiny-pw").await.unwrap();
        assert_eq!(others_see(&c).await, (false, true, false));
    }
}

/// `pool.session_state = "refuse"`: such statements fail with 0A000 naming
/// what they would leave behind, over the simple and the extended
/// protocol; their transaction-level forms run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_can_be_refused() {
    let env = Env::start_with(EnvOptions {
        pool_toml: "session_state = \"refuse\"\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let c = env.connect().await;
    for (sql, says) in [
        ("CREATE TEMP TABLE t (x int)", "temporary"),
        ("SELECT pg_advisory_lock(1)", "advisory"),
        ("PREPARE q AS SELECT 1", "PREPARE"),
    ] {
        let e = c.simple_query(sql).await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{sql}: {e}");
        let msg = e.as_db_error().unwrap().message().to_string();
        assert!(msg.contains(says) && msg.contains("refuse"), "{msg}");
    }
    let e = c
        .query("SELECT pg_try_advisory_lock($1)", &[&1i64])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{e}");
    c.batch_execute(
        "BEGIN; SELECT pg_advisory_xact_lock(1); CREATE TEMP TABLE t (x int) ON COMMIT DROP; COMMIT",
    )
    .await
    .unwrap();
}

/// What another client sees of the state left by `session_state_stays_with_its_client`'s
/// first client: its temp table, whether it gets lock 7 (released at once),
/// its prepared statement.
async fn others_see(c: &tokio_postgres::Client) -> (bool, bool, bool) {
    let row = c
        .query_one(
            "SELECT to_regclass('pg_temp.mine') IS NOT NULL, pg_try_advisory_lock(7), \
             EXISTS (SELECT 1 FROM pg_prepared_statements WHERE name = 'q')",
            &[],
        )
        .await
        .unwrap();
    let seen: (bool, bool, bool) = (row.get(0), row.get(1), row.get(2));
    if seen.1 {
        c.simple_query("SELECT pg_advisory_unlock(7)")
            .await
            .unwrap();
    }
    seen
}
