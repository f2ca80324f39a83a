//! The result cache against a real primary and streaming replica: cached
//! reads are answered by the proxy (a row changed behind its back stays
//! hidden until the table's lifetime passes), a write through the proxy on
//! any connection drops the table's results before its reply, the exact
//! bytes of an extended-protocol answer are kept, and no client reads a
//! result older than its own last write.

use shardline_tests::{wire as fe, Env, EnvOptions, RawClient};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, SimpleQueryMessage};

const CACHE: &str = "
[metrics]
listen = \"127.0.0.1:0\"
[cache]
hints = true
[[cache.tables]]
name = \"countries\"
ttl = \"60s\"
[[cache.tables]]
name = \"public.rates\"
ttl = \"1s\"
";

async fn env() -> Env {
    let env = Env::start_with(EnvOptions {
        replicas_per_shard: 1,
        extra_toml: CACHE.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    env.wait_healthy().await;
    let c = env.connect().await;
    c.batch_execute(
        "CREATE TABLE countries (code text PRIMARY KEY, name text NOT NULL, n int NOT NULL DEFAULT 0);
         INSERT INTO countries (code, name) VALUES ('fr', 'France'), ('de', 'Deutschland'), ('jp', 'Nihon');
         CREATE TABLE rates (code text PRIMARY KEY, rate numeric NOT NULL);
         INSERT INTO rates VALUES ('eur', 1.0);
         CREATE TABLE plain (id int PRIMARY KEY, v int NOT NULL);
         INSERT INTO plain VALUES (1, 1);",
    )
    .await
    .unwrap();
    for i in env.replicas() {
        // The table first (a query on it fails until it is replayed).
        env.wait_sql_on(
            i,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'plain'",
            "1",
        )
        .await;
        env.wait_sql_on(i, "SELECT count(*) FROM plain", "1").await;
    }
    env
}

fn totals(env: &Env) -> shardline::cache::Counters {
    env.proxy.as_ref().unwrap().shared.result_cache.totals()
}

async fn one(c: &Client, sql: &str) -> String {
    c.simple_query(sql)
        .await
        .unwrap()
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_string()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_cached_until_a_write_through_the_proxy() {
    let env = env().await;
    let c = env.connect().await;
    let other = env.connect().await;
    let sql = "SELECT name FROM countries WHERE code = 'fr'";
    assert_eq!(one(&c, sql).await, "France");
    let before = totals(&env);
    // Changed behind the proxy's back: the cached answer stands (within
    // the table's lifetime), by the simple and the extended protocol.
    env.sql("UPDATE countries SET name = 'Changed' WHERE code = 'fr'");
    assert_eq!(one(&c, sql).await, "France");
    let bound = "SELECT name FROM countries WHERE code = $1";
    let row = c.query_one(bound, &[&"de"]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "Deutschland");
    env.sql("UPDATE countries SET name = 'Geändert' WHERE code = 'de'");
    for _ in 0..3 {
        let row = other.query_one(bound, &[&"de"]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), "Deutschland");
    }
    let after = totals(&env);
    assert_eq!(after.hits - before.hits, 4, "{before:?} {after:?}");

    // A write through the proxy, on another connection, drops the table's
    // results: the next read is the server's, at once.
    other
        .execute("UPDATE countries SET n = n + 1 WHERE code = 'jp'", &[])
        .await
        .unwrap();
    assert_eq!(one(&c, sql).await, "Changed");
    let row = c.query_one(bound, &[&"de"]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "Geändert");
    assert!(totals(&env).invalidations > after.invalidations);

    // What bypasses the cache: a table not listed, a volatile function, a
    // transaction, a hint turning it off.
    env.sql("UPDATE countries SET name = 'Again' WHERE code = 'fr'");
    let still = one(&c, sql).await;
    assert_eq!(still, "Changed", "cached again after the write");
    let misses = totals(&env).misses;
    for bypass in [
        "SELECT name || now()::text FROM countries WHERE code = 'fr'",
        "SELECT v FROM plain WHERE id = 1",
        "/* shardline: cache=off */ SELECT name FROM countries WHERE code = 'fr'",
    ] {
        one(&c, bypass).await;
        one(&c, bypass).await;
    }
    c.batch_execute("BEGIN").await.unwrap();
    assert_eq!(
        one(&c, sql).await,
        "Again",
        "a transaction reads the server"
    );
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(totals(&env).misses, misses, "bypasses are not looked up");

    // A hint caches a table not listed (hints = true).
    let hinted = "/* shardline: cache=30s */ SELECT v FROM plain WHERE id = 1";
    assert_eq!(one(&c, hinted).await, "1");
    env.sql("UPDATE plain SET v = 2");
    assert_eq!(one(&c, hinted).await, "1");
    other.execute("UPDATE plain SET v = 3", &[]).await.unwrap();
    assert_eq!(one(&c, hinted).await, "3");

    // The console: SHOW CACHE, CACHE CLEAR.
    let shared = &env.proxy.as_ref().unwrap().shared;
    let report = shared.result_cache.report();
    let countries = report.iter().find(|r| r.table == "countries").unwrap();
    assert!(
        countries.entries >= 2 && countries.bytes > 0,
        "{countries:?}"
    );
    assert_eq!(countries.ttl, Some(Duration::from_secs(60)));
    assert!(report.iter().any(|r| r.table == "plain" && r.ttl.is_none()));
    // The metrics.
    let addr = env.proxy.as_ref().unwrap().metrics_addr.unwrap();
    let mut http = std::net::TcpStream::connect(addr).unwrap();
    std::io::Write::write_all(&mut http, b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    std::io::Read::read_to_string(&mut http, &mut body).unwrap();
    let hits: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("shardline_result_cache_hits_total{table=\"countries\"} "))
        .unwrap_or_else(|| panic!("{body}"))
        .parse()
        .unwrap();
    assert!(hits >= 4.0, "{hits}");
    assert!(body.contains("shardline_result_cache_bytes{table=\"*\"}"));
    assert!(shared.result_cache.clear(Some("countries")) >= 2);
    assert_eq!(one(&c, sql).await, "Again");
}

/// A row changed elsewhere shows once the table's lifetime (1 s) passed,
/// never later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_elsewhere_shows_within_the_lifetime() {
    let env = env().await;
    let c = env.connect().await;
    let sql = "SELECT rate FROM rates WHERE code = 'eur'";
    assert_eq!(one(&c, sql).await, "1.0");
    let changed = Instant::now();
    env.sql("UPDATE rates SET rate = 2.0");
    loop {
        let seen = one(&c, sql).await;
        if seen == "2.0" {
            break;
        }
        assert_eq!(seen, "1.0");
        assert!(
            changed.elapsed() < Duration::from_millis(1500),
            "still the old rate {:?} after the change",
            changed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(totals(&env).hits >= 1);
}

/// The bytes a hit answers are the bytes the server answered, for an
/// extended unit with binary results; the unit's unnamed statement stays
/// the client's (a later Bind without Parse runs it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_answers_the_servers_exact_bytes() {
    let env = env().await;
    let unit = |code: &str| {
        vec![
            fe::parse(
                "",
                "SELECT code, name, n FROM countries WHERE code = $1",
                &[25],
            ),
            fe::bind("", &[(0, Some(code.as_bytes()))], 1),
            fe::describe(b'P', ""),
            fe::execute(),
            fe::sync(),
        ]
    };
    let mut raw = RawClient::login(env.port).await.unwrap();
    let first = raw.exchange(&unit("jp")).await.unwrap();
    let before = totals(&env);
    let second = raw.exchange(&unit("jp")).await.unwrap();
    assert_eq!(totals(&env).hits, before.hits + 1);
    assert_eq!(first, second);
    assert_eq!(shardline_tests::tags(&second), b"12TDCZ".to_vec());
    // Bind again without Parse: the statement the hit stood for.
    let again = raw
        .exchange(&[
            fe::bind("", &[(0, Some(b"fr"))], 0),
            fe::execute(),
            fe::sync(),
        ])
        .await
        .unwrap();
    assert_eq!(shardline_tests::tags(&again), b"2DCZ".to_vec());
    assert!(String::from_utf8_lossy(&again[1].1).contains("France"));

    // A lone Sync (answered by the proxy) in the same write as a miss: its
    // ReadyForQuery is not taken for the miss's reply.
    let mut raw = RawClient::login(env.port).await.unwrap();
    let mut both = vec![fe::sync()];
    both.extend(unit("de"));
    let lone = raw.exchange(&both).await.unwrap();
    assert_eq!(shardline_tests::tags(&lone), b"Z".to_vec());
    let filled = raw.until_ready().await.unwrap();
    assert_eq!(shardline_tests::tags(&filled), b"12TDCZ".to_vec());
    let hit = raw.exchange(&unit("de")).await.unwrap();
    assert_eq!(hit, filled);
}

/// Many clients write their own row on one connection and read it on
/// another (cacheable reads, some hitting): none reads a value older than
/// its own last write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_reads_older_than_its_own_write() {
    let env = env().await;
    let setup = env.connect().await;
    setup
        .batch_execute(
            "INSERT INTO countries (code, name) SELECT 'c' || g, 'C' || g FROM generate_series(0, 7) g",
        )
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let writer = env.connect().await;
        let reader = env.connect().await;
        tasks.push(tokio::spawn(async move {
            let code = format!("c{w}");
            let mut stale = 0;
            for i in 1..=60 {
                writer
                    .execute("UPDATE countries SET n = $1 WHERE code = $2", &[&i, &code])
                    .await
                    .unwrap();
                for _ in 0..3 {
                    let n: i32 = reader
                        .query_one("SELECT n FROM countries WHERE code = $1", &[&code])
                        .await
                        .unwrap()
                        .get(0);
                    if n != i {
                        stale += 1;
                    }
                    // Everyone's rows, a read every writer invalidates.
                    let all = reader
                        .simple_query("SELECT sum(n) FROM countries")
                        .await
                        .unwrap();
                    assert!(!all.is_empty());
                }
            }
            (stale, reader, code)
        }));
    }
    let mut stale = 0;
    let mut readers = Vec::new();
    for t in tasks {
        let (s, reader, code) = t.await.unwrap();
        stale += s;
        readers.push((reader, code));
    }
    assert_eq!(stale, 0, "reads older than their client's own write");
    let during = totals(&env);
    assert!(during.hits > 0 && during.invalidations >= 480, "{during:?}");
    // Writes over: each row's last value, twice, the second from the cache.
    for (reader, code) in &readers {
        for _ in 0..2 {
            let n: i32 = reader
                .query_one("SELECT n FROM countries WHERE code = $1", &[code])
                .await
                .unwrap()
                .get(0);
            assert_eq!(n, 60);
        }
    }
    assert!(totals(&env).hits >= during.hits + 8);
}

/// A miss is read on the primary: with the replica's replay paused, a
/// write through the proxy by one user is what another user's next read
/// shows and keeps, not the replica's older rows for the table's lifetime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_is_never_older_than_a_write_through_the_proxy() {
    let env = env().await;
    let writer = env.connect().await;
    let other = env.connect_as("tinypool", "tiny-pw").await.unwrap();
    let sql = "SELECT name FROM countries WHERE code = 'fr'";
    assert_eq!(one(&other, sql).await, "France");
    let replica = env.replicas()[0];
    env.sql_on(replica, "SELECT pg_wal_replay_pause()");
    writer
        .execute("UPDATE countries SET name = 'Paris' WHERE code = 'fr'", &[])
        .await
        .unwrap();
    // The replica still has the old row (a fill read there would keep it).
    assert_eq!(
        env.sql_on(replica, "SELECT name FROM countries WHERE code = 'fr'"),
        "France"
    );
    for _ in 0..3 {
        assert_eq!(one(&other, sql).await, "Paris");
    }
    env.sql_on(replica, "SELECT pg_wal_replay_resume()");
}

/// With the primary stopped, a miss is still answered (by the replica, as
/// any read would be), and it is not kept: only the primary's reads are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_with_the_primary_down_is_read_on_a_replica_and_not_kept() {
    let env = env().await;
    let c = env.connect().await;
    let primary = (0..=env.replicas().len())
        .find(|i| !env.replicas().contains(i))
        .unwrap();
    // Stopped and gone before the reads (a signal alone returns before the
    // server stops, and a read that reaches it first is rightly kept).
    env.backend.stop_node(primary, "fast").unwrap();
    let sql = "SELECT name FROM countries WHERE code = 'jp'";
    let before = totals(&env);
    for _ in 0..2 {
        assert_eq!(one(&c, sql).await, "Nihon");
    }
    let after = totals(&env);
    // (A read sent again after the lost primary is looked up again.)
    assert_eq!(after.hits, before.hits);
    assert!(after.misses >= before.misses + 2, "{after:?}");
    assert_eq!(env.proxy.as_ref().unwrap().shared.result_cache.usage().0, 0);
}
