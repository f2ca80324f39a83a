//! Transactions on several shards with two-phase commit: atomic COMMIT and
//! ROLLBACK, failures before the decision rolling back everywhere, the
//! proxy killed (SIGKILL) before and after the decision with every
//! participant ending the same way once a proxy is back, and the startup
//! check of max_prepared_transactions.

use shardline_config::Config;
use shardline_router::hash::KeyValue;
use shardline_router::sharding::Sharding;
use shardline_tests::{sqlstate, start_proxy, Env, ProxyProcess};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

const SHARDING: &str = r#"
[sharding]
function = "pg_hash"
two_phase_commit = true
in_doubt_interval = "1s"

[[sharding.tables]]
name = "users"
column = "id"
"#;

/// A key of `users` on each shard: (on s0, on s1), counting from `from`.
fn keys(config: &str, from: i64) -> (i64, i64) {
    let sh = Sharding::from_config(&Config::from_toml(config, "t").expect("config"));
    let on = |s: usize| {
        (from..)
            .find(|&k| sh.groups[0].shard_of(Some(&KeyValue::Int(k))).ok() == Some(s))
            .expect("a key")
    };
    (on(0), on(1))
}

/// BEGIN, then the names of users `first` and `second` (on their shards, in
/// that order) set to `name`; the transaction is left open.
async fn rename_in_one_transaction(c: &Client, first: i64, second: i64, name: &str) {
    c.batch_execute("BEGIN").await.unwrap();
    for id in [first, second] {
        c.execute("UPDATE users SET name = $2 WHERE id = $1", &[&id, &name])
            .await
            .unwrap();
    }
}

fn names(env: &Env, shard: usize) -> String {
    env.sql_shard(
        shard,
        "SELECT coalesce(string_agg(id || '=' || name, ',' ORDER BY id), '') FROM users",
    )
}

fn prepared(env: &Env, shard: usize) -> usize {
    env.sql_shard(
        shard,
        "SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE 'sl:%'",
    )
    .parse()
    .unwrap()
}

const SCHEMA: &str = "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL,
    nick text, CONSTRAINT nick_once UNIQUE (nick) DEFERRABLE INITIALLY DEFERRED)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_on_two_shards_commits_or_rolls_back_everywhere() {
    let env = Env::primaries(2).await;
    let config = env.shards_config(&[0, 1], SHARDING);
    let (_proxy, c) = start_proxy(&config).await;
    c.batch_execute(SCHEMA).await.expect("schema");
    let (a, b) = keys(&config, 1);

    // COMMIT: both rows, on their shards; nothing left prepared.
    c.batch_execute("BEGIN").await.unwrap();
    c.execute("INSERT INTO users (id, name) VALUES ($1, 'a')", &[&a])
        .await
        .unwrap();
    c.execute("INSERT INTO users (id, name) VALUES ($1, 'b')", &[&b])
        .await
        .unwrap();
    // Back to the first shard: the same transaction sees its own row.
    let n: i64 = c
        .query_one("SELECT count(*) FROM users WHERE id = $1", &[&a])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    assert_eq!(names(&env, 0), "", "not visible before COMMIT");
    c.batch_execute("COMMIT").await.expect("commit");
    assert_eq!(names(&env, 0), format!("{a}=a"));
    assert_eq!(names(&env, 1), format!("{b}=b"));
    assert_eq!((prepared(&env, 0), prepared(&env, 1)), (0, 0));
    assert_eq!(
        env.sql_shard(0, "SELECT count(*) FROM shardline.txn_decisions"),
        "0"
    );

    // ROLLBACK: neither.
    rename_in_one_transaction(&c, b, a, "x").await;
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        (names(&env, 0), names(&env, 1)),
        (format!("{a}=a"), format!("{b}=b"))
    );

    // A failure at PREPARE (a deferred unique constraint on the second
    // shard) rolls back the first shard's write too, with the server's error.
    let (a2, b2) = keys(&config, 1000);
    c.execute(
        "INSERT INTO users (id, name, nick) VALUES ($1, 'n', 'taken')",
        &[&b2],
    )
    .await
    .unwrap();
    let (_, b3) = keys(&config, b2 + 1);
    c.batch_execute("BEGIN").await.unwrap();
    c.execute("INSERT INTO users (id, name) VALUES ($1, 'a2')", &[&a2])
        .await
        .unwrap();
    c.execute(
        "INSERT INTO users (id, name, nick) VALUES ($1, 'b3', 'taken')",
        &[&b3],
    )
    .await
    .expect("deferred: checked at commit");
    let err = c.batch_execute("COMMIT").await.expect_err("duplicate nick");
    assert_eq!(sqlstate(&err).as_deref(), Some("23505"), "{err:?}");
    assert!(!names(&env, 0).contains("a2"), "{}", names(&env, 0));
    assert!(!names(&env, 1).contains("b3"));
    assert_eq!((prepared(&env, 0), prepared(&env, 1)), (0, 0));

    // An error fails the whole transaction: another shard's statement gets
    // 25P02, and COMMIT rolls back.
    rename_in_one_transaction(&c, a, b, "y").await;
    let err = c
        .execute("INSERT INTO users (id, name) VALUES ($1, 'dup')", &[&b])
        .await
        .expect_err("duplicate key");
    assert_eq!(sqlstate(&err).as_deref(), Some("23505"));
    let err = c
        .execute("UPDATE users SET name = 'z' WHERE id = $1", &[&a])
        .await
        .expect_err("failed transaction");
    assert_eq!(sqlstate(&err).as_deref(), Some("25P02"), "{err:?}");
    c.batch_execute("COMMIT")
        .await
        .expect("COMMIT of a failed transaction rolls back");
    assert_eq!((names(&env, 0), names(&env, 1)).0, format!("{a}=a"));
    assert!(names(&env, 1).starts_with(&format!("{b}=b")));

    // Savepoints do not span shards: refused, and the transaction fails.
    rename_in_one_transaction(&c, a, b, "s").await;
    let err = c.batch_execute("SAVEPOINT p").await.expect_err("savepoint");
    assert_eq!(sqlstate(&err).as_deref(), Some("0A000"), "{err:?}");
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(names(&env, 0), format!("{a}=a"));

    // Statements on several shards at once run inside the transaction, on
    // its connections: a merged read sees the transaction's own writes on
    // both shards (outside it, neither), a keyless UPDATE and a multi-row
    // INSERT reach both shards, and ROLLBACK undoes all of it.
    rename_in_one_transaction(&c, a, b, "m").await;
    let seen: i64 = c
        .query_one("SELECT count(*) FROM users WHERE name = 'm'", &[])
        .await
        .expect("a merged read in the transaction")
        .get(0);
    assert_eq!(seen, 2);
    let updated = c
        .execute("UPDATE users SET nick = name || id WHERE name = 'm'", &[])
        .await
        .expect("a write on every shard in the transaction");
    assert_eq!(updated, 2);
    let (a4, b4) = keys(&config, b3 + 1);
    c.batch_execute(&format!(
        "INSERT INTO users (id, name) VALUES ({a4}, 'm'), ({b4}, 'm')"
    ))
    .await
    .expect("a multi-row INSERT split in the transaction");
    let rows = c
        .query("SELECT id FROM users WHERE name = 'm' ORDER BY id", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(
        names(&env, 0),
        format!("{a}=a"),
        "not visible before COMMIT"
    );
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(names(&env, 0), format!("{a}=a"));
    assert!(names(&env, 1).starts_with(&format!("{b}=b")));
    // Committed, the same reach both shards at once, in two phases.
    rename_in_one_transaction(&c, a, b, "m").await;
    c.execute("UPDATE users SET name = 'all' WHERE name = 'm'", &[])
        .await
        .unwrap();
    c.batch_execute("COMMIT").await.expect("commit");
    assert_eq!(names(&env, 0), format!("{a}=all"));
    assert!(names(&env, 1).starts_with(&format!("{b}=all")));
    assert_eq!((prepared(&env, 0), prepared(&env, 1)), (0, 0));
    // An error on one shard fails the transaction on all of them.
    rename_in_one_transaction(&c, a, b, "m").await;
    let err = c
        .query("SELECT 1 / (id - $1) FROM users", &[&a])
        .await
        .expect_err("division by zero on one shard");
    assert_eq!(sqlstate(&err).as_deref(), Some("22012"), "{err:?}");
    let err = c
        .execute("UPDATE users SET name = 'z' WHERE id = $1", &[&b])
        .await
        .expect_err("failed transaction");
    assert_eq!(sqlstate(&err).as_deref(), Some("25P02"), "{err:?}");
    c.batch_execute("COMMIT").await.expect("rolls back");
    assert_eq!(names(&env, 0), format!("{a}=all"));
    for (id, name) in [(a, "a"), (b, "b")] {
        c.execute("UPDATE users SET name = $2 WHERE id = $1", &[&id, &name])
            .await
            .unwrap();
    }

    // COMMIT and ROLLBACK over the extended protocol (as drivers that
    // prepare everything send them) end the transaction everywhere too.
    for (end, name) in [("ROLLBACK", "a"), ("COMMIT", "e")] {
        rename_in_one_transaction(&c, a, b, "e").await;
        c.execute(end, &[]).await.expect(end);
        assert_eq!(names(&env, 0), format!("{a}={name}"), "{end}");
        assert!(
            names(&env, 1).starts_with(&format!("{b}={}", if end == "COMMIT" { "e" } else { "b" }))
        );
    }
    assert_eq!((prepared(&env, 0), prepared(&env, 1)), (0, 0));
    // One unit, Parse + Bind + Execute + Sync, as pgjdbc sends COMMIT.
    {
        use shardline_tests::{message, tags, RawClient};
        let trust = format!(
            "{config}\n[[users]]\nname = \"trustclient\"\nauth = \"trust\"\ndatabase = \"app\"\nserver_user = \"app\"\nserver_password = \"app\"\n"
        );
        let (p, _c) = start_proxy(&trust).await;
        let mut raw = RawClient::login(p.local_addr.port()).await.unwrap();
        let q = |sql: &str| message(b'Q', format!("{sql}\0").as_bytes());
        for sql in [
            "BEGIN".to_string(),
            format!("UPDATE users SET name = 'j' WHERE id = {a}"),
            format!("UPDATE users SET name = 'j' WHERE id = {b}"),
        ] {
            let answer = raw.exchange(&[q(&sql)]).await.unwrap();
            assert_eq!(tags(&answer), b"CZ", "{sql}");
        }
        let answer = raw
            .exchange(&[
                message(b'P', b"\0COMMIT\0\0\0"),
                message(b'B', b"\0\0\0\0\0\0\0\0"),
                message(b'E', b"\0\0\0\0\0"),
                message(b'S', b""),
            ])
            .await
            .unwrap();
        assert_eq!(tags(&answer), b"12CZ");
        assert_eq!(answer[3].1, b"I");
        assert_eq!(names(&env, 0), format!("{a}=j"));
        assert!(names(&env, 1).starts_with(&format!("{b}=j")));
    }

    // Shards that join keep the transaction's isolation level, whether its
    // BEGIN came alone or with a statement.
    for begin in [
        "BEGIN ISOLATION LEVEL REPEATABLE READ".to_string(),
        format!("BEGIN ISOLATION LEVEL SERIALIZABLE; UPDATE users SET name = 'i' WHERE id = {a}"),
    ] {
        c.batch_execute(&begin).await.unwrap();
        let level = |k: i64| {
            let c = &c;
            async move {
                c.query_one(
                    "SELECT current_setting('transaction_isolation') FROM users WHERE id = $1",
                    &[&k],
                )
                .await
                .unwrap()
                .get::<_, String>(0)
            }
        };
        let first = level(a).await;
        assert_eq!(level(b).await, first, "{begin}");
        assert_ne!(first, "read committed");
        c.batch_execute("ROLLBACK").await.unwrap();
    }

    // Many transactions at once from several clients, all atomic.
    let mut tasks = Vec::new();
    for t in 0..4i64 {
        let cfg = config.clone();
        let (_p, c) = start_proxy(&cfg).await;
        tasks.push(tokio::spawn(async move {
            let _keep = _p;
            for i in 0..25i64 {
                let (x, y) = keys(&cfg, 10_000 + 1_000 * t + 10 * i);
                c.batch_execute("BEGIN").await.unwrap();
                c.execute("INSERT INTO users (id, name) VALUES ($1, 'm')", &[&x])
                    .await
                    .unwrap();
                c.execute("INSERT INTO users (id, name) VALUES ($1, 'm')", &[&y])
                    .await
                    .unwrap();
                c.batch_execute(if i % 5 == 4 { "ROLLBACK" } else { "COMMIT" })
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let count = |s| env.sql_shard(s, "SELECT count(*) FROM users WHERE name = 'm'");
    assert_eq!((count(0), count(1)), ("80".to_string(), "80".to_string()));
    assert_eq!((prepared(&env, 0), prepared(&env, 1)), (0, 0));
}

/// Runs BEGIN; a write on each shard; COMMIT through a proxy that stops at
/// `point` of the commit, kills it there, and starts a proxy again.
async fn crash_at(env: &Env, c0: &Client, point: &str, from: i64) -> (i64, i64) {
    let config = env.shards_config(&[0, 1], SHARDING);
    let (a, b) = keys(&config, from);
    let (mut proxy, c) = ProxyProcess::start(&config, &[("SHARDLINE_2PC_STOP_AT", point)]).await;
    c.batch_execute("BEGIN").await.unwrap();
    c.execute("INSERT INTO users (id, name) VALUES ($1, 'crash')", &[&a])
        .await
        .unwrap();
    c.execute("INSERT INTO users (id, name) VALUES ($1, 'crash')", &[&b])
        .await
        .unwrap();
    let commit = tokio::spawn(async move { c.batch_execute("COMMIT").await });
    // Wait for the second shard's PREPARE (and, past the decision, the
    // first shard's decision row).
    let started = Instant::now();
    loop {
        let decided = env.sql_shard(
            0,
            "SELECT count(*) FROM shardline.txn_decisions WHERE commit",
        ) != "0";
        if prepared(env, 1) == 1 && (point != "decided" || decided) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never reached {point}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.kill();
    assert!(
        commit.await.unwrap().is_err(),
        "the client lost its connection"
    );
    assert_eq!(prepared(env, 1), 1, "left in doubt by the crash");
    // The proxy started again settles it, at startup or within
    // in_doubt_interval (any proxy with the config would).
    let _ = c0;
    let (_again, _c) = ProxyProcess::start(&config, &[]).await;
    let started = Instant::now();
    while prepared(env, 1) != 0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "still in doubt"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_killed_mid_commit_leaves_every_shard_the_same() {
    let env = Env::primaries(2).await;
    let config = env.shards_config(&[0, 1], SHARDING);
    let (_proxy, c) = start_proxy(&config).await;
    c.batch_execute(SCHEMA).await.expect("schema");
    drop(_proxy);

    // Killed after PREPARE, before the decision: rolled back everywhere.
    let (a, b) = crash_at(&env, &c, "prepared", 1).await;
    let has =
        |s: usize, k: i64| env.sql_shard(s, &format!("SELECT count(*) FROM users WHERE id = {k}"));
    assert_eq!((has(0, a), has(1, b)), ("0".into(), "0".into()));
    assert_eq!(
        env.sql_shard(
            0,
            "SELECT count(*) FROM shardline.txn_decisions WHERE NOT commit"
        ),
        "1",
        "the rollback was recorded, so the coordinator can never commit it"
    );

    // Killed after the decision, before COMMIT PREPARED: committed everywhere.
    let (a, b) = crash_at(&env, &c, "decided", 100).await;
    assert_eq!((has(0, a), has(1, b)), ("1".into(), "1".into()));
    assert_eq!((prepared(&env, 0), prepared(&env, 1)), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_that_cannot_prepare_are_named_at_startup() {
    let env = Env::primaries(2).await;
    let node = env.shard_primary(1);
    env.sql_shard(1, "ALTER SYSTEM SET max_prepared_transactions = 0");
    env.backend.stop_node(node, "fast").unwrap();
    env.backend.start_node(node).unwrap();
    let config = env.shards_config(&[0, 1], SHARDING);
    let err = match shardline::Proxy::start(Config::from_toml(&config, "t").unwrap()).await {
        Ok(_) => panic!("started without prepared transactions"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("shard s1") && err.contains("max_prepared_transactions = 0"),
        "{err}"
    );
    // Without two-phase commit the proxy starts, and a transaction stays on one shard.
    let plain = config.replace("two_phase_commit = true", "two_phase_commit = false");
    let (_proxy, c) = start_proxy(&plain).await;
    c.batch_execute(SCHEMA).await.unwrap();
    let (a, b) = keys(&config, 1);
    c.batch_execute("BEGIN").await.unwrap();
    c.execute("INSERT INTO users (id, name) VALUES ($1, 'a')", &[&a])
        .await
        .unwrap();
    let err = c
        .execute("INSERT INTO users (id, name) VALUES ($1, 'b')", &[&b])
        .await
        .expect_err("second shard");
    assert_eq!(sqlstate(&err).as_deref(), Some("0A000"));
    assert!(format!("{err:?}").contains("two_phase_commit"), "{err:?}");
    c.batch_execute("ROLLBACK").await.unwrap();
}

/// The decision row is held before any participant prepares: a resolver
/// that sees a prepared participant then always finds the row (and waits on
/// it) instead of recording a rollback under a healthy commit. Here the row's
/// insert is held back by a lock; the other shard must not be prepared
/// meanwhile, and the commit succeeds once the lock goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participants_prepare_only_after_the_decision_row_is_held() {
    let env = Env::primaries(2).await;
    let config = env.shards_config(&[0, 1], SHARDING);
    let (_proxy, c) = start_proxy(&config).await;
    c.batch_execute(SCHEMA).await.expect("schema");
    let (a, b) = keys(&config, 1);

    let holder = env.connect_shard(0).await;
    holder
        .batch_execute("BEGIN; LOCK TABLE shardline.txn_decisions IN SHARE ROW EXCLUSIVE MODE")
        .await
        .unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    for k in [a, b] {
        c.execute("INSERT INTO users (id, name) VALUES ($1, 'held')", &[&k])
            .await
            .unwrap();
    }
    let commit = tokio::spawn(async move {
        let r = c.batch_execute("COMMIT").await;
        (c, r)
    });
    let started = Instant::now();
    while env.sql_shard(
        0,
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
         AND query LIKE 'INSERT INTO shardline.txn_decisions%'",
    ) != "1"
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the decision row's insert never waited on the lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Sent together with the insert, a PREPARE would be done in a few
    // milliseconds; give it ample time to show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        prepared(&env, 1),
        0,
        "a participant prepared before the decision row"
    );
    holder.batch_execute("COMMIT").await.unwrap();
    let (c, r) = commit.await.unwrap();
    r.expect("the commit succeeds once the decision row is written");
    let n = c
        .query_one("SELECT count(*) FROM users WHERE name = 'held'", &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(n, 2);
    assert_eq!((prepared(&env, 0), prepared(&env, 1)), (0, 0));
}

/// Two primaries behind a proxy with two-phase commit, the schema, and one
/// user on each shard: ids `a` (on s0, named "on s0") and `b` (on s1).
async fn one_user_per_shard() -> (Env, shardline::Proxy, Client, i64, i64) {
    let env = Env::primaries(2).await;
    let config = env.shards_config(&[0, 1], SHARDING);
    let (proxy, c) = start_proxy(&config).await;
    c.batch_execute(SCHEMA).await.expect("schema");
    let (a, b) = keys(&config, 1);
    c.execute(
        "INSERT INTO users (id, name) VALUES ($1, 'on s0'), ($2, 'on s1')",
        &[&a, &b],
    )
    .await
    .expect("rows on both shards");
    (env, proxy, c, a, b)
}

/// Cursors in a transaction on two shards: a FETCH, MOVE or CLOSE runs on
/// the shard the cursor was declared on, not the one the transaction used
/// last; declared over the simple and the extended protocol, quoted and
/// unquoted names. Before, the FETCH went to the last shard used and found
/// no cursor (34000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursors_are_read_where_they_were_declared() {
    let (_env, _proxy, c, a, b) = one_user_per_shard().await;
    let fetched = |rows: Vec<tokio_postgres::SimpleQueryMessage>| -> Vec<String> {
        rows.iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .collect()
    };
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute(&format!(
        "DECLARE lower_c CURSOR FOR SELECT name FROM users WHERE id = {a}"
    ))
    .await
    .expect("declared on s0");
    // Over the extended protocol, with the key bound.
    c.execute(
        "DECLARE \"Quoted\" CURSOR FOR SELECT name FROM users WHERE id = $1",
        &[&b],
    )
    .await
    .expect("declared on s1");
    // The transaction uses s0 last, then s1 last, between the reads.
    c.execute("UPDATE users SET name = name WHERE id = $1", &[&a])
        .await
        .unwrap();
    let rows = c.simple_query("FETCH NEXT FROM \"Quoted\"").await;
    assert_eq!(fetched(rows.expect("fetch on s1")), ["on s1"]);
    c.execute("UPDATE users SET name = name WHERE id = $1", &[&b])
        .await
        .unwrap();
    c.batch_execute("MOVE ABSOLUTE 0 IN LOWER_C")
        .await
        .expect("move on s0");
    let rows = c.simple_query("FETCH ALL FROM lower_c").await;
    assert_eq!(fetched(rows.expect("fetch on s0")), ["on s0"]);
    c.batch_execute("CLOSE lower_c; ")
        .await
        .expect("close on s0");
    c.batch_execute("CLOSE \"Quoted\"")
        .await
        .expect("close on s1");
    c.batch_execute("COMMIT").await.expect("commit");
    // A name not declared in the transaction: the server's own error.
    let e = c.simple_query("FETCH lower_c").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("34000"), "{e}");
}

/// A client kept on its connection by session state (a session advisory
/// lock) with two-phase commit on: its transaction stays on that
/// connection. A statement for another shard inside it is refused naming
/// the pin, and after the transaction the lock is still the client's.
/// Before, the transaction moved to the other shard, the kept connection
/// was parked and then given back to the pool with the lock held, and the
/// client's unlock found no lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_transaction_does_not_leave_its_connection() {
    let (env, _proxy, c, a, b) = one_user_per_shard().await;
    c.batch_execute("SELECT pg_advisory_lock(77)")
        .await
        .expect("lock");
    let holder = |shard: usize| {
        env.sql_shard(
            shard,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 77",
        )
    };
    let pinned = (0..2)
        .find(|&s| holder(s) == "1")
        .expect("the lock's shard");
    let other = if pinned == 0 { b } else { a };
    c.batch_execute("BEGIN").await.unwrap();
    let e = c
        .query("SELECT name FROM users WHERE id = $1", &[&other])
        .await
        .expect_err("another shard inside the kept connection's transaction");
    assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{e}");
    let msg = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    assert!(msg.contains("advisory lock"), "{msg}");
    c.batch_execute("ROLLBACK").await.unwrap();
    // Still the client's, on the same shard; its unlock finds it.
    assert_eq!(holder(pinned), "1");
    let unlocked: bool = c
        .query_one("SELECT pg_advisory_unlock(77)", &[])
        .await
        .expect("unlock")
        .get(0);
    assert!(unlocked, "the lock was the client's");
    assert_eq!(holder(pinned), "0");
}
