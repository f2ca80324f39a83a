//! The wire protocol through the proxy with a real driver (tokio-postgres):
//! simple and extended queries, prepared statements under transaction pooling,
//! formats, COPY, cancel, errors, transactions, session state.

use futures_util::{SinkExt, StreamExt};
use shardline_tests::{sqlstate, Env, EnvOptions};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_extended_queries() {
    let env = Env::start().await.unwrap();
    let c = env.connect().await;
    let rows = c
        .simple_query("SELECT 1 AS a, 'x' AS b; SELECT 2")
        .await
        .unwrap();
    let data: Vec<_> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap().to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(data, ["1", "2"]);
    // Extended protocol, unnamed statement, text and binary parameters/results.
    let row = c
        .query_one(
            "SELECT $1::int8 + 1, $2::text || '!', $3::float8",
            &[&41i64, &"hi", &1.5f64],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 42);
    assert_eq!(row.get::<_, String>(1), "hi!");
    assert_eq!(row.get::<_, f64>(2), 1.5);
    let rows = c
        .query(
            "SELECT g, repeat('x', g) FROM generate_series(1, 2000) g",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2000);
    assert_eq!(rows[1999].get::<_, String>(1).len(), 2000);
    // Empty query: EmptyQueryResponse, no rows, and the session carries on.
    let msgs = c.simple_query("").await.unwrap();
    assert!(!msgs
        .iter()
        .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))));
    assert_eq!(
        c.query_one("SELECT 5", &[]).await.unwrap().get::<_, i32>(0),
        5
    );
}

/// Rows go to the client in runs, one copy per run (`server.rs::rows_run`).
/// What a client receives for many rows over several reads, rows then an
/// error, notices between rows, COPY TO STDOUT, a portal read in parts and
/// a query string of several statements is, message for message, what the
/// server sends a client connected to it directly; and after them the
/// connection is free for another client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_reach_the_client_as_the_server_sent_them() {
    use shardline_tests::wire::{bind, describe, execute_rows, parse, query, sync, unit};
    use shardline_tests::RawClient;
    let env = Env::start().await.unwrap();
    env.sql(
        "CREATE FUNCTION noisy(g int) RETURNS int LANGUAGE plpgsql AS \
         $$ BEGIN IF g % 97 = 0 THEN RAISE NOTICE 'row %', g; END IF; RETURN g; END $$",
    );
    let units: Vec<Vec<Vec<u8>>> = vec![
        vec![query(
            "SELECT g, repeat('x', g % 300) FROM generate_series(1, 3000) g",
        )],
        vec![query(
            "SELECT 10 / (700 - g) FROM generate_series(1, 1000) g",
        )],
        vec![query("SELECT noisy(g) FROM generate_series(1, 1000) g")],
        vec![query(
            "COPY (SELECT g, g * 2 FROM generate_series(1, 2000) g) TO STDOUT",
        )],
        vec![
            parse("", "SELECT g FROM generate_series(1, 250) g", &[]),
            bind("", &[], 0),
            execute_rows(100),
            execute_rows(100),
            execute_rows(100),
            sync(),
        ],
        vec![query(
            "SELECT 1; SELECT g FROM generate_series(1, 500) g; SELECT 1 / 0",
        )],
        // Describe answered by a RowDescription (it ends the Describe's
        // entry), then the rows.
        unit("SELECT g, 'x' FROM generate_series(1, 300) g"),
        vec![
            parse(
                "d",
                "SELECT $1::int + g FROM generate_series(1, 300) g",
                &[],
            ),
            describe(b'S', "d"),
            bind("d", &[(0, Some(b"5"))], 0),
            execute_rows(0),
            sync(),
        ],
        // The connection's queue is right after them: the next units are
        // answered as they should be.
        vec![query("SELECT 2")],
        unit("SELECT 3"),
    ];
    let mut direct = RawClient::login_as(env.primary().port, "sl_trust")
        .await
        .unwrap();
    // A pool of one connection: another client gets it only if this one's
    // queue ends empty after each unit (the connection is released).
    let mut proxied = RawClient::login_as(env.port, "trustsingle").await.unwrap();
    for unit in &units {
        let want = direct.exchange(unit).await.unwrap();
        let got = proxied.exchange(unit).await.unwrap();
        let first_difference = want.iter().zip(&got).position(|(w, g)| w != g);
        assert!(
            got.len() == want.len() && first_difference.is_none(),
            "{:?}: {} messages through the proxy, {} direct; first difference at {:?}",
            String::from_utf8_lossy(&unit[0]),
            got.len(),
            want.len(),
            first_difference
        );
    }
    let mut other = RawClient::login_as(env.port, "trustsingle").await.unwrap();
    let answer = other.exchange(&[query("SELECT 1")]).await.unwrap();
    assert_eq!(
        shardline_tests::tags(&answer),
        b"TDCZ",
        "the pool's one connection was not released: {answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_survive_transaction_pooling() {
    let env = Env::start().await.unwrap();
    env.sql("CREATE TABLE kv (k int PRIMARY KEY, v text); GRANT ALL ON kv TO app;");
    // Created on the primary directly (not through the proxy, so no
    // read-your-writes position): the replicas have it before it is read.
    env.wait_healthy().await;
    // Many clients share a small pool; each prepares once and executes across
    // many transactions, landing on whatever server connection is free.
    let mut tasks = Vec::new();
    for client_no in 0..6 {
        let c = env.connect_as("tinypool", "tiny-pw").await.unwrap();
        tasks.push(tokio::spawn(async move {
            let insert = c.prepare("INSERT INTO kv VALUES ($1, $2)").await.unwrap();
            let select = c.prepare("SELECT v FROM kv WHERE k = $1").await.unwrap();
            for i in 0..50 {
                let k = client_no * 1000 + i;
                c.execute(&insert, &[&k, &format!("v{k}")]).await.unwrap();
                let row = c.query_one(&select, &[&k]).await.unwrap();
                assert_eq!(row.get::<_, String>(0), format!("v{k}"));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(env.sql("SELECT count(*) FROM kv"), "300");
    // The pool never grew past its size.
    assert!(env.server_backends(None) <= 2, "tinypool has pool_size = 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statement_errors_and_names() {
    let env = Env::start().await.unwrap();
    let c = env.connect().await;
    // A failing Parse leaves nothing behind; the real error reaches the client.
    let e = c.prepare("SELECT * FROM no_such_table").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42P01"));
    assert!(e.as_db_error().unwrap().message().contains("no_such_table"));
    // Statements with the same text from two clients share nothing visible.
    let c2 = env.connect().await;
    let s1 = c.prepare("SELECT $1::int * 2").await.unwrap();
    let s2 = c2.prepare("SELECT $1::int * 2").await.unwrap();
    assert_eq!(c.query_one(&s1, &[&2]).await.unwrap().get::<_, i32>(0), 4);
    assert_eq!(c2.query_one(&s2, &[&3]).await.unwrap().get::<_, i32>(0), 6);
    drop(s1); // tokio-postgres sends Close for the statement
    assert_eq!(c2.query_one(&s2, &[&5]).await.unwrap().get::<_, i32>(0), 10);
    // Pipelined: several executions in flight at once on one client.
    let s = c.prepare("SELECT $1::int + 0").await.unwrap();
    let params: Vec<i32> = (0..20).collect();
    let args: Vec<[&(dyn tokio_postgres::types::ToSql + Sync); 1]> =
        params.iter().map(|i| [i as _]).collect();
    let futs: Vec<_> = args.iter().map(|a| c.query_one(&s, a)).collect();
    let results = futures_util::future::join_all(futs).await;
    for (i, r) in results.into_iter().enumerate() {
        assert_eq!(r.unwrap().get::<_, i32>(0), i as i32);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_and_errors() {
    let env = Env::start().await.unwrap();
    env.sql("CREATE TABLE t (id int PRIMARY KEY); GRANT ALL ON t TO app;");
    let mut c = env.connect().await;
    // Commit.
    let tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO t VALUES (1)", &[]).await.unwrap();
    tx.commit().await.unwrap();
    // Rollback.
    let tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO t VALUES (2)", &[]).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(env.sql("SELECT string_agg(id::text, ',') FROM t"), "1");
    // Errors keep SQLSTATE, message and detail.
    let e = c
        .execute("INSERT INTO t VALUES (1)", &[])
        .await
        .unwrap_err();
    let db = e.as_db_error().unwrap();
    assert_eq!(db.code().code(), "23505");
    assert!(db.detail().unwrap_or_default().contains("(id)=(1)"));
    let e = c.simple_query("SELECT 1/0").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("22012"));
    // An error inside a transaction aborts it; the session carries on after.
    c.simple_query("BEGIN").await.unwrap();
    assert!(c.simple_query("SELECT 1/0").await.is_err());
    let e = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("25P02"));
    c.simple_query("ROLLBACK").await.unwrap();
    assert_eq!(
        c.query_one("SELECT 7", &[]).await.unwrap().get::<_, i32>(0),
        7
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out() {
    let env = Env::start().await.unwrap();
    env.sql("CREATE TABLE c (id int, name text); GRANT ALL ON c TO app;");
    let c = env.connect().await;
    let sink = c.copy_in("COPY c FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut data = String::new();
    for i in 0..10_000 {
        data.push_str(&format!("{i}\tname {i}\n"));
    }
    sink.send(bytes::Bytes::from(data)).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 10_000);
    assert_eq!(env.sql("SELECT count(*), sum(id) FROM c"), "10000|49995000");
    let stream = c
        .copy_out("COPY (SELECT * FROM c ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    futures_util::pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.lines().count(), 10_000);
    assert_eq!(text.lines().next(), Some("0\tname 0"));
    // A failed COPY (bad data) reports the server's error and leaves the session usable.
    let sink = c.copy_in("COPY c FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"not-a-number\tx\n"))
        .await
        .unwrap();
    let e = sink.finish().await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("22P02"));
    assert_eq!(
        c.query_one("SELECT count(*) FROM c", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        10_000
    );
}

/// COPY FROM STDIN sent one CopyData per row, as some drivers do (psql
/// and libpq fill 8 KB messages): forwarded in runs (`client.rs`), 50,000
/// rows sent in one write arrive whole and in order, and the session goes
/// on after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_one_message_per_row() {
    use shardline_tests::{message, RawClient};
    let env = Env::start().await.unwrap();
    env.sql("CREATE TABLE rows_in (n int, t text); GRANT ALL ON rows_in TO app;");
    let mut c = RawClient::login(env.port).await.unwrap();
    c.start_copy_in("COPY rows_in FROM STDIN").await.unwrap();
    let mut data: Vec<u8> = (0..50_000)
        .flat_map(|i| message(b'd', format!("{i}\trow {i}\n").as_bytes()))
        .collect();
    data.extend(message(b'c', b""));
    c.send(&data).await.unwrap();
    let answer = c.until_ready().await.unwrap();
    assert_eq!(shardline_tests::tags(&answer), b"CZ", "{answer:?}");
    assert_eq!(
        env.sql("SELECT count(*), sum(n), count(*) FILTER (WHERE t = 'row ' || n) FROM rows_in"),
        "50000|1249975000|50000"
    );
    let answer = c.exchange(&[message(b'Q', b"SELECT 1\0")]).await.unwrap();
    assert_eq!(shardline_tests::tags(&answer), b"TDCZ", "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_right_query() {
    let env = Env::start().await.unwrap();
    let c = env.connect().await;
    let other = env.connect().await;
    let token = c.cancel_token();
    let slow = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(30)").await });
    let busy_other =
        tokio::spawn(async move { other.simple_query("SELECT pg_sleep(1), 'other'").await });
    // Cancel once the query runs on a node (a cancel that arrives before
    // is dropped, as PgBouncer drops it): a fixed sleep raced a busy machine.
    let running = "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'";
    let nodes = env.backend.nodes().len();
    for _ in 0..200 {
        if (0..nodes).any(|i| env.sql_on(i, running) == "1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e}");
    // The other client's query was not cancelled.
    assert!(busy_other.await.unwrap().is_ok());
}

/// Checks `a`'s settings several times while `b` keeps the pool's other
/// connection busy, so `a` moves between server connections.
async fn expect_settings(
    a: &tokio_postgres::Client,
    b: &tokio_postgres::Client,
    names: &[&str],
    values: &[&str],
) {
    let sql = format!(
        "SELECT {}",
        names
            .iter()
            .map(|n| format!("current_setting('{n}')"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for _ in 0..5 {
        let r = a.query_one(&sql, &[]).await.unwrap();
        let got: Vec<String> = (0..names.len()).map(|i| r.get(i)).collect();
        assert_eq!(got, values, "{names:?}");
        b.simple_query("SELECT 1").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_settings_survive_transaction_pooling() {
    let env = Env::start().await.unwrap();
    let a = env.connect_as("tinypool", "tiny-pw").await.unwrap();
    let b = env.connect_as("tinypool", "tiny-pw").await.unwrap();
    a.simple_query("SET statement_timeout = '1234ms'")
        .await
        .unwrap();
    a.execute("SET application_name = 'client-a'", &[])
        .await
        .unwrap(); // extended protocol
    b.simple_query("SET search_path = pg_catalog")
        .await
        .unwrap();
    for _ in 0..20 {
        // Interleave so both clients move between the two server connections.
        let (ra, rb) = tokio::join!(
            a.query_one("SELECT current_setting('statement_timeout'), current_setting('application_name'), current_setting('search_path')", &[]),
            b.query_one("SELECT current_setting('statement_timeout'), current_setting('search_path')", &[])
        );
        let ra = ra.unwrap();
        let rb = rb.unwrap();
        assert_eq!(ra.get::<_, String>(0), "1234ms");
        assert_eq!(ra.get::<_, String>(1), "client-a");
        assert_eq!(ra.get::<_, String>(2), "\"$user\", public");
        assert_eq!(rb.get::<_, String>(0), "0");
        assert_eq!(rb.get::<_, String>(1), "pg_catalog");
    }
    // A SET rolled back with its transaction does not stick.
    a.simple_query("BEGIN; SET work_mem = '7MB'; ROLLBACK")
        .await
        .unwrap();
    // The same with each statement a query of its own: the ROLLBACK's
    // completion is what drops the SET (a completion the session may
    // otherwise forward without looking at it).
    for sql in ["BEGIN", "SET work_mem = '7MB'", "ROLLBACK"] {
        a.simple_query(sql).await.unwrap();
    }
    expect_settings(&a, &b, &["work_mem"], &["4MB"]).await;
    // A SET in a failed implicit transaction does not stick either.
    assert!(a
        .simple_query("SET work_mem = '9MB'; SELECT 1/0")
        .await
        .is_err());
    let v: String = a
        .query_one("SELECT current_setting('work_mem')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "4MB");
    // Committed in a transaction: sticks.
    a.simple_query("BEGIN; SET work_mem = '8MB'; COMMIT")
        .await
        .unwrap();
    // RESET clears one, RESET ALL clears all; each checked across connection switches.
    a.simple_query("RESET statement_timeout").await.unwrap();
    expect_settings(&a, &b, &["statement_timeout", "work_mem"], &["0", "8MB"]).await;
    a.simple_query("RESET ALL").await.unwrap();
    expect_settings(&a, &b, &["work_mem", "application_name"], &["4MB", ""]).await;
    // Startup parameters are session settings too.
    let (c, conn) = tokio_postgres::connect(
        &format!(
            "{} options='-c statement_timeout=4321'",
            env.conn_string("tinypool", "tiny-pw")
        ),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for _ in 0..5 {
        let v: String = c
            .query_one("SELECT current_setting('statement_timeout')", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(v, "4321ms");
        a.simple_query("SELECT 1").await.unwrap();
        b.simple_query("SELECT 1").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_all_and_deallocate() {
    let env = Env::start().await.unwrap();
    let c = env.connect().await;
    let s = c.prepare("SELECT 11").await.unwrap();
    c.simple_query("SET statement_timeout = 999").await.unwrap();
    c.simple_query("DISCARD ALL").await.unwrap();
    // Client statements are gone, as they would be on a server.
    let e = c.query(&s, &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("26000"), "{e}");
    let v: String = c
        .query_one("SELECT current_setting('statement_timeout')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "0");
    c.simple_query("DEALLOCATE ALL").await.unwrap();
    // SQL-level PREPARE/EXECUTE/DEALLOCATE inside one transaction work.
    c.simple_query("BEGIN; PREPARE p AS SELECT 5; EXECUTE p; DEALLOCATE p; COMMIT")
        .await
        .unwrap();
}

/// The client's prepared statements live in the proxy, so DEALLOCATE of
/// them (psycopg sends DEALLOCATE ALL after every failed pipeline) is
/// answered without a server: here with the only server stopped. A name
/// the proxy does not know still goes to a server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocating_client_statements_needs_no_server() {
    use shardline_tests::wire::{parse, query, sync};
    use shardline_tests::{error_code, tags, RawClient};
    // A read gives up on the stopped shard after interval + 2 × timeout.
    let env = Env::start_with(EnvOptions {
        replicas_per_shard: 0,
        extra_toml: "[health]\ninterval = \"100ms\"\ntimeout = \"300ms\"\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut c = RawClient::login(env.port).await.unwrap();
    for name in ["s1", "s2"] {
        let r = c
            .exchange(&[parse(name, "SELECT 1", &[]), sync()])
            .await
            .unwrap();
        assert_eq!(tags(&r), b"1Z", "{r:?}");
    }
    env.backend.stop_node(0, "immediate").unwrap();
    // What needs a server fails (the first time on the pooled connection
    // the stop closed, which goes with it; then no connection opens).
    let fails = |r: &mut Vec<shardline_tests::RawMessage>, sql: &str| {
        // (The server's notice of its shutdown may come first.)
        r.retain(|m| m.0 != b'N');
        assert_eq!(tags(r), b"EZ", "{sql}: {r:?}");
        let code = error_code(&r[0].1);
        assert!(code.starts_with("08") || code == "57P03", "{sql}: {code}");
    };
    for sql in ["SELECT 1", "SELECT 2"] {
        fails(&mut c.exchange(&[query(sql)]).await.unwrap(), sql);
    }
    for (sql, tag) in [
        ("DEALLOCATE s1", "DEALLOCATE"),
        ("  deallocate prepare s2;", "DEALLOCATE"),
        ("DEALLOCATE ALL", "DEALLOCATE ALL"),
    ] {
        let r = c.exchange(&[query(sql)]).await.unwrap();
        assert_eq!(tags(&r), b"CZ", "{sql}: {r:?}");
        assert_eq!(r[0].1, format!("{tag}\0").as_bytes(), "{sql}");
    }
    // A name it does not know is a server's to answer.
    fails(
        &mut c.exchange(&[query("DEALLOCATE s1")]).await.unwrap(),
        "again",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_needs_session_pooling() {
    let env = Env::start().await.unwrap();
    let c = env.connect().await;
    let e = c.simple_query("LISTEN events").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("0A000"));
    assert!(e
        .as_db_error()
        .unwrap()
        .message()
        .contains("transaction pooling"));
    assert_eq!(
        c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );

    // Session pooling: LISTEN works and the notification arrives.
    let (s, mut conn) = tokio_postgres::connect(
        &env.conn_string("sessionuser", "session-pw"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    s.simple_query("LISTEN events").await.unwrap();
    c.simple_query("NOTIFY events, 'hello'").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, "hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_pooling_keeps_one_connection() {
    let env = Env::start().await.unwrap();
    let s = env.connect_as("sessionuser", "session-pw").await.unwrap();
    let pid: i32 = s
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    s.simple_query("CREATE TEMP TABLE tmp (x int)")
        .await
        .unwrap();
    for _ in 0..5 {
        let p: i32 = s
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(p, pid);
    }
    drop(s);
    env.wait_sql(
        "SELECT count(*) FROM pg_class WHERE relname = 'tmp' AND relpersistence = 't'",
        "0",
    )
    .await;
    // The next session gets a reset connection: no temp table left behind.
    let s2 = env.connect_as("sessionuser", "session-pw").await.unwrap();
    let n: i64 = s2
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname = 'tmp' AND relpersistence = 't'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameter_status_and_notices_reach_the_client() {
    let env = Env::start_with(EnvOptions::default()).await.unwrap();
    let (c, mut conn) =
        tokio_postgres::connect(&env.conn_string("app", "app"), tokio_postgres::NoTls)
            .await
            .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notice(n) = m {
                let _ = tx.send(n.message().to_string());
            }
        }
    });
    c.simple_query("DO $$ BEGIN RAISE NOTICE 'hello from plpgsql'; END $$")
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, "hello from plpgsql");
}

/// Settings from the startup packet (`options=-c TimeZone=... -c
/// DateStyle=...`) are what the session reports in ParameterStatus, not the
/// servers' defaults; the server's own spelling follows with the first
/// statement, and the last report matches what the server runs with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_options_are_reported_in_parameter_status() {
    use shardline_tests::RawClient;
    let env = Env::start_with(EnvOptions::default()).await.unwrap();
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", env.port))
        .await
        .unwrap();
    let mut c = RawClient::from_stream(stream);
    let startup = shardline::protocol::startup::startup_message(&[
        ("user", "trustclient"),
        ("database", "app"),
        ("options", "-c TimeZone=Asia/Tokyo -c DateStyle=SQL,DMY"),
    ]);
    c.send(&startup).await.unwrap();
    let login = c.until_ready().await.unwrap();
    let reported = shardline_tests::parameter_status;
    assert_eq!(reported(&login, "TimeZone").as_deref(), Some("Asia/Tokyo"));
    assert_eq!(reported(&login, "DateStyle").as_deref(), Some("SQL,DMY"));
    let answers = c
        .exchange(&[shardline_tests::wire::query("SHOW DateStyle")])
        .await
        .unwrap();
    let shown = answers
        .iter()
        .find(|m| m.0 == b'D')
        .map(|m| String::from_utf8_lossy(&m.1[6..]).into_owned())
        .unwrap();
    assert_eq!(shown, "SQL, DMY");
    let last = reported(&answers, "DateStyle").or(reported(&login, "DateStyle"));
    assert_eq!(last.as_deref(), Some("SQL, DMY"), "{answers:?}");
}
