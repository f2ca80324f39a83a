//! Cross-shard merges beyond the differential corpus: LIMIT/OFFSET as bound
//! parameters, text order under a non-C (ICU) database and under a column
//! collation, and a million-row ORDER BY streamed through the proxy binary
//! with its memory measured.

use shardline_tests::{memory_kib, sqlstate, start_proxy, Env, ProxyProcess};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

const SHARDING: &str = shardline::demo::DEMO_SHARDING;

const SCHEMA: &str =
    "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, city text, age int4 NOT NULL)";

/// 400 users with names that sort differently in C and in en-US.
async fn load(c: &Client) -> Vec<(i64, String, Option<String>, i32)> {
    let names = [
        "apple", "Apple", "banana", "Banana", "éclair", "Zebra", "zebra", "Ölberg",
    ];
    let rows: Vec<(i64, String, Option<String>, i32)> = (1..=400)
        .map(|i: i64| {
            let city = (i % 7 != 0).then(|| names[(i % 5) as usize].to_string());
            (
                i,
                format!("{} {i}", names[(i % 8) as usize]),
                city,
                18 + (i % 50) as i32,
            )
        })
        .collect();
    c.batch_execute(SCHEMA).await.expect("schema");
    let values: Vec<String> = rows
        .iter()
        .map(|(id, name, city, age)| {
            let city = city
                .as_ref()
                .map_or("NULL".to_string(), |c| format!("'{c}'"));
            format!("({id}, '{name}', {city}, {age})")
        })
        .collect();
    c.batch_execute(&format!(
        "INSERT INTO users (id, name, city, age) VALUES {}",
        values.join(", ")
    ))
    .await
    .expect("rows");
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_and_offset_bound_as_parameters() {
    let env = Env::primaries(2).await;
    let (_proxy, c) = start_proxy(&env.shards_config(&[0, 1], SHARDING)).await;
    let rows = load(&c).await;
    for s in 0..2 {
        let n: usize = env
            .sql_shard(s, "SELECT count(*) FROM users")
            .parse()
            .unwrap();
        assert!(n > 100, "rows on every shard");
    }
    let stmt = c
        .prepare("SELECT id, name FROM users ORDER BY id DESC LIMIT $1 OFFSET $2")
        .await
        .expect("prepare");
    for (limit, offset) in [(5i64, 0i64), (7, 10), (0, 3), (1000, 395), (3, 500)] {
        let got: Vec<i64> = c
            .query(&stmt, &[&limit, &offset])
            .await
            .expect("merged")
            .iter()
            .map(|r| r.get(0))
            .collect();
        let want: Vec<i64> = rows
            .iter()
            .rev()
            .map(|r| r.0)
            .skip(offset as usize)
            .take(limit as usize)
            .collect();
        assert_eq!(got, want, "LIMIT {limit} OFFSET {offset}");
    }
    // OFFSET alone, bound as a parameter (nothing to push down).
    let got: Vec<i64> = c
        .query(
            "SELECT id FROM users ORDER BY id DESC OFFSET $1",
            &[&390i64],
        )
        .await
        .expect("OFFSET $1 alone")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let want: Vec<i64> = rows.iter().rev().map(|r| r.0).skip(390).collect();
    assert_eq!(got, want);
    // NULL means no limit; a negative one fails as on the server.
    let all = c
        .query(&stmt, &[&None::<i64>, &0i64])
        .await
        .expect("no limit");
    assert_eq!(all.len(), 400);
    let err = c
        .query(&stmt, &[&-1i64, &0i64])
        .await
        .expect_err("negative");
    assert_eq!(sqlstate(&err).as_deref(), Some("2201W"), "{err}");
    let err = c
        .query(&stmt, &[&1i64, &-2i64])
        .await
        .expect_err("negative");
    assert_eq!(sqlstate(&err).as_deref(), Some("2201X"), "{err}");
    // Grouped, with the group count and average per city.
    let got = c
        .query(
            "SELECT city, count(*), avg(age) FROM users GROUP BY city ORDER BY city NULLS FIRST LIMIT $1",
            &[&3i64],
        )
        .await
        .expect("grouped");
    let mut cities: Vec<Option<String>> = rows.iter().map(|r| r.2.clone()).collect();
    cities.sort_by(|a, b| match (a, b) {
        (None, None) => std::cmp::Ordering::Equal,
        (None, _) => std::cmp::Ordering::Less,
        (_, None) => std::cmp::Ordering::Greater,
        (Some(x), Some(y)) => x.as_bytes().cmp(y.as_bytes()),
    });
    cities.dedup();
    let names: Vec<Option<String>> = got.iter().map(|r| r.get(0)).collect();
    assert_eq!(names, cities[..3]);
    let nulls = rows.iter().filter(|r| r.2.is_none()).count() as i64;
    assert_eq!(got[0].get::<_, i64>(1), nulls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_order_follows_the_collation_or_is_refused() {
    let env = Env::primaries(2).await;
    for s in 0..2 {
        env.sql_shard(
            s,
            "CREATE DATABASE icu OWNER app ENCODING 'UTF8' LOCALE_PROVIDER icu ICU_LOCALE 'en-US' TEMPLATE template0",
        );
    }
    let config = env
        .shards_config(&[0, 1], SHARDING)
        .replace("database = \"app\"", "database = \"icu\"");
    let (proxy, icu) = shardline_tests::start_proxy_for(&config, "icu").await;
    let rows = load(&icu).await;

    // en-US orders "apple" before "Apple" before "banana"; a bytewise merge
    // would not: refused, in both protocols.
    for sql in [
        "SELECT name FROM users ORDER BY name",
        "SELECT min(name) FROM users",
        "SELECT city, count(*) FROM users GROUP BY city ORDER BY city",
    ] {
        let err = icu.simple_query(sql).await.expect_err(sql);
        assert_eq!(sqlstate(&err).as_deref(), Some("0A000"), "{sql}: {err:?}");
        assert!(format!("{err:?}").contains("collation"), "{sql}: {err:?}");
        let err = icu.query(sql, &[]).await.expect_err(sql);
        assert_eq!(sqlstate(&err).as_deref(), Some("0A000"), "{sql}: {err}");
    }
    // COLLATE "C" is exact anywhere; numbers need no collation; grouping
    // text needs only equality.
    let got: Vec<String> = icu
        .query("SELECT name FROM users ORDER BY name COLLATE \"C\"", &[])
        .await
        .expect("C order")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut want: Vec<String> = rows.iter().map(|r| r.1.clone()).collect();
    want.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    assert_eq!(got, want);
    let got: Vec<i64> = icu
        .query("SELECT id FROM users ORDER BY age, id LIMIT 50", &[])
        .await
        .expect("numeric order")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut want: Vec<(i32, i64)> = rows.iter().map(|r| (r.3, r.0)).collect();
    want.sort();
    assert_eq!(got, want.iter().take(50).map(|w| w.1).collect::<Vec<_>>());
    let groups = icu
        .query("SELECT city, count(*) FROM users GROUP BY city", &[])
        .await
        .expect("text groups");
    let mut counts = std::collections::BTreeMap::new();
    for r in &rows {
        *counts.entry(r.2.clone()).or_insert(0i64) += 1;
    }
    let got: std::collections::BTreeMap<Option<String>, i64> =
        groups.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(got, counts);
    drop(proxy);

    // In a C database, a column with another collation makes text order
    // unmergeable too, from the moment it is created through the proxy.
    let (_proxy, c) = start_proxy(&env.shards_config(&[0, 1], SHARDING)).await;
    load(&c).await;
    c.query("SELECT name FROM users ORDER BY name", &[])
        .await
        .expect("C database: merged");
    c.batch_execute("CREATE TABLE labels (id bigint, label text COLLATE \"en-US-x-icu\")")
        .await
        .expect("ddl");
    let err = c
        .query("SELECT name FROM users ORDER BY name", &[])
        .await
        .expect_err("a non-C column exists now");
    assert_eq!(sqlstate(&err).as_deref(), Some("0A000"), "{err}");
}

/// Two shards' primaries behind the proxy binary (its config edited by
/// `config`), with `users (id, name)` holding keys 1..=`rows`, half on each
/// shard (written there directly: a merge does not care which shard holds
/// which key), `name` computed by `name` from `g`.
async fn users_behind_a_proxy_process(
    config: impl FnOnce(String) -> String,
    rows: i64,
    name: &str,
) -> (Env, ProxyProcess, Client) {
    let env = Env::primaries(2).await;
    let (proxy, c) = ProxyProcess::start(&config(env.shards_config(&[0, 1], SHARDING)), &[]).await;
    c.batch_execute("CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL)")
        .await
        .expect("schema");
    for s in 0..2 {
        env.sql_shard(
            s,
            &format!("INSERT INTO users SELECT g, {name} FROM generate_series(1, {rows}) g WHERE g % 2 = {s}"),
        );
    }
    (env, proxy, c)
}

/// A merge that would hold more than `routing.merge_memory` (here 16 MiB)
/// fails with 53200 naming the setting, and the proxy's resident memory
/// stays within 64 MB of where it started: 500,000 groups from two
/// shards (about 300 MB held before, with no limit). The session goes on,
/// and a merge of few groups runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_past_its_memory_budget_fails_with_53200() {
    let (_env, proxy, c) = users_behind_a_proxy_process(
        |c| c.replace("[pool]\n", "[routing]\nmerge_memory = 16777216\n[pool]\n"),
        500_000,
        "md5(g::text)",
    )
    .await;
    let pid = proxy.pid();
    c.simple_query("SELECT 1").await.expect("warm");
    let (_, before) = memory_kib(pid);
    for sql in [
        "SELECT name, count(*) FROM users GROUP BY name",
        "SELECT DISTINCT name FROM users",
        "SELECT count(DISTINCT name) FROM users",
    ] {
        let e = c.simple_query(sql).await.expect_err(sql);
        assert_eq!(sqlstate(&e).as_deref(), Some("53200"), "{sql}: {e}");
        let message = e.as_db_error().unwrap().message().to_string();
        assert!(
            message.contains("routing.merge_memory (16777216 bytes)"),
            "{message}"
        );
    }
    let (peak, after) = memory_kib(pid);
    println!("500,000 groups refused: proxy resident {before} KiB before, {after} KiB after, peak {peak} KiB");
    assert!(
        peak < before + 64 * 1024,
        "peak {peak} KiB from {before} KiB"
    );
    let few: Vec<(i32, i64)> = c
        .query("SELECT length(name), count(*) FROM users GROUP BY 1", &[])
        .await
        .expect("few groups")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(few, vec![(32, 500_000)]);
}

/// A large merge does not stall other clients on the same worker thread
/// (`workers = 1`): while one client groups 1,000,000 rows from two shards,
/// another's `SELECT 1` keeps a p99 latency under 50 ms (before, the merge
/// held the thread for its whole run: every other client waited seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_merge_does_not_stall_other_clients() {
    const ROWS: i64 = 1_000_000;
    let (_env, proxy, c) = users_behind_a_proxy_process(
        |c| {
            c.replace("[proxy]\n", "[proxy]\nworkers = 1\n").replace(
                "[pool]\n",
                "[routing]\nmerge_memory = 2147483648\nmerge_memory_total = 2147483648\n[pool]\n",
            )
        },
        ROWS,
        "md5(g::text)",
    )
    .await;
    let canary = shardline_tests::connect_app(proxy.port).await.unwrap();
    canary.simple_query("SELECT 1").await.unwrap();
    let merge = tokio::spawn(async move {
        let started = Instant::now();
        let rows = c
            .simple_query("SELECT name, count(*) FROM users GROUP BY name ORDER BY name")
            .await
            .expect("merged");
        let n = rows
            .iter()
            .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
            .count();
        (n, started.elapsed())
    });
    let mut latencies = Vec::new();
    while !merge.is_finished() {
        let t = Instant::now();
        canary.simple_query("SELECT 1").await.unwrap();
        latencies.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (n, took) = merge.await.unwrap();
    assert_eq!(n as i64, ROWS);
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    let max = latencies[latencies.len() - 1];
    println!(
        "{ROWS} groups merged in {took:?}; canary: {} queries meanwhile, p99 {p99:?}, max {max:?}",
        latencies.len()
    );
    assert!(
        latencies.len() >= 20,
        "the merge ended before the canary ran"
    );
    assert!(
        p99 < Duration::from_millis(50),
        "canary p99 {p99:?} (max {max:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_row_order_by_streams_in_bounded_memory() {
    // 500,000 rows on each shard, ~120 bytes a row.
    let (_env, proxy, c) =
        users_behind_a_proxy_process(|c| c, 1_000_000, "repeat(md5(g::text), 3)").await;
    let pid = proxy.pid();
    c.simple_query("SELECT 1").await.expect("warm");
    let (_, before) = memory_kib(pid);
    let started = Instant::now();
    let rows = c
        .query_raw(
            "SELECT id, name FROM users ORDER BY id",
            std::iter::empty::<i64>(),
        )
        .await
        .expect("merged");
    let mut rows = std::pin::pin!(rows);
    let mut n = 0i64;
    let mut bytes = 0usize;
    use futures_util::StreamExt;
    while let Some(r) = rows.next().await {
        let r = r.expect("row");
        let id: i64 = r.get(0);
        n += 1;
        assert_eq!(id, n, "rows arrive in key order");
        bytes += r.get::<_, &str>(1).len() + 8;
    }
    let elapsed = started.elapsed();
    let (peak, after) = memory_kib(pid);
    assert_eq!(n, 1_000_000);
    println!(
        "1,000,000 rows ({} MiB of values) merged in {:.1} s; proxy resident: {} KiB before, {} KiB after, peak {} KiB",
        bytes >> 20,
        elapsed.as_secs_f64(),
        before,
        after,
        peak
    );
    // Holding the result would take over 100 MiB; the merge holds a row per shard.
    assert!(
        peak < before + 48 * 1024,
        "peak resident {peak} KiB, {before} KiB before"
    );
}

/// A RowDescription's fields as the client compares them: name, type, type
/// size and modifier, format (the table OID differs between servers).
fn fields(messages: &[shardline_tests::RawMessage]) -> Vec<(String, u32, i16, i32, i16)> {
    let Some((_, body)) = messages.iter().find(|m| m.0 == b'T') else {
        panic!("no RowDescription in {:?}", shardline_tests::tags(messages));
    };
    let n = i16::from_be_bytes([body[0], body[1]]) as usize;
    let mut pos = 2;
    let mut out = Vec::new();
    for _ in 0..n {
        let end = pos + body[pos..].iter().position(|&b| b == 0).unwrap();
        let name = String::from_utf8_lossy(&body[pos..end]).into_owned();
        let f = &body[end + 1..end + 19];
        out.push((
            name,
            u32::from_be_bytes(f[6..10].try_into().unwrap()),
            i16::from_be_bytes(f[10..12].try_into().unwrap()),
            i32::from_be_bytes(f[12..16].try_into().unwrap()),
            i16::from_be_bytes(f[16..18].try_into().unwrap()),
        ));
        pos = end + 19;
    }
    out
}

/// The DataRows of an answer, as bytes.
fn data_rows(messages: &[shardline_tests::RawMessage]) -> Vec<Vec<u8>> {
    messages
        .iter()
        .filter(|m| m.0 == b'D')
        .map(|m| m.1.clone())
        .collect()
}

/// Parse, Bind (with these result formats), Describe portal, Execute, Sync
/// of one unnamed statement.
fn extended_unit(sql: &str, result_formats: &[i16]) -> [Vec<u8>; 5] {
    use shardline_tests::message;
    let mut parse = vec![0];
    parse.extend_from_slice(sql.as_bytes());
    parse.extend_from_slice(&[0, 0, 0]);
    let mut bind = vec![0, 0, 0, 0, 0, 0];
    bind.extend_from_slice(&(result_formats.len() as i16).to_be_bytes());
    for f in result_formats {
        bind.extend_from_slice(&f.to_be_bytes());
    }
    [
        message(b'P', &parse),
        message(b'B', &bind),
        message(b'D', b"P\0"),
        message(b'E', &[0, 0, 0, 0, 0]),
        message(b'S', b""),
    ]
}

/// Three primaries: s0 and s1 behind a proxy, s2 unsharded, each side
/// loaded with the same rows; a raw client through the proxy and one
/// straight to s2 (the oracle), with the proxy kept running.
async fn through_and_direct() -> (
    Env,
    shardline::Proxy,
    shardline_tests::RawClient,
    shardline_tests::RawClient,
) {
    use shardline_tests::RawClient;
    let env = Env::primaries(3).await;
    let config = format!(
        "{}\n[[users]]\nname = \"trustclient\"\nauth = \"trust\"\ndatabase = \"app\"\nserver_user = \"app\"\nserver_password = \"app\"\n",
        env.shards_config(&[0, 1], SHARDING)
    );
    let (proxy, c) = start_proxy(&config).await;
    load(&c).await;
    let rows = load(&env.connect_shard(2).await).await;
    assert_eq!(rows.len(), 400);
    env.sql_shard(2, "GRANT SELECT ON ALL TABLES IN SCHEMA public TO sl_trust");
    let through = RawClient::login(proxy.local_addr.port()).await.unwrap();
    let direct = RawClient::login_as(env.node_port(env.shard_primary(2)), "sl_trust")
        .await
        .unwrap();
    (env, proxy, through, direct)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_descriptions_are_the_unsharded_servers() {
    use shardline_tests::message;
    let (_env, _proxy, mut through, mut direct) = through_and_direct().await;
    let cstr = |s: &str| {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    };
    for sql in [
        "SELECT avg(age), count(*), sum(id), min(name), max(city) FROM users",
        "SELECT city, avg(age) AS mean FROM users GROUP BY city ORDER BY mean DESC, city LIMIT 3",
        "SELECT name FROM users ORDER BY age DESC, id LIMIT 5",
        "SELECT * FROM users ORDER BY lower(name), id LIMIT 4",
        "SELECT DISTINCT age FROM users ORDER BY age LIMIT 3",
    ] {
        // Simple protocol: text.
        let q = message(b'Q', &cstr(sql));
        let (p, o) = (
            through.exchange(std::slice::from_ref(&q)).await.unwrap(),
            direct.exchange(&[q]).await.unwrap(),
        );
        assert_eq!(fields(&p), fields(&o), "simple: {sql}");
        assert_eq!(data_rows(&p), data_rows(&o), "simple: {sql}");
        // Extended, one unit as psycopg sends it: Parse, Bind (binary
        // results), Describe portal, Execute, Sync.
        let unit = extended_unit(sql, &[1]);
        let (p, o) = (
            through.exchange(&unit).await.unwrap(),
            direct.exchange(&unit).await.unwrap(),
        );
        assert_eq!(
            shardline_tests::tags(&p),
            shardline_tests::tags(&o),
            "extended: {sql}"
        );
        assert_eq!(fields(&p), fields(&o), "extended: {sql}");
        assert_eq!(data_rows(&p), data_rows(&o), "extended: {sql}");
    }
    // A result format per column (as pgjdbc binds): the hidden sort column
    // gets one too.
    let unit = extended_unit(
        "SELECT name, age FROM users ORDER BY id DESC LIMIT 5",
        &[0, 1],
    );
    let (p, o) = (
        through.exchange(&unit).await.unwrap(),
        direct.exchange(&unit).await.unwrap(),
    );
    assert_eq!(
        shardline_tests::tags(&p),
        shardline_tests::tags(&o),
        "{p:?}"
    );
    assert_eq!(fields(&p), fields(&o));
    assert_eq!(data_rows(&p), data_rows(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_shard_merge_can_be_cancelled() {
    let env = Env::primaries(2).await;
    let (_proxy, c) = start_proxy(&env.shards_config(&[0, 1], SHARDING)).await;
    load(&c).await;
    let token = c.cancel_token();
    let started = Instant::now();
    let slow = tokio::spawn(async move {
        c.query(
            "SELECT city, count(*) FROM users WHERE pg_sleep(30) IS NOT NULL GROUP BY city",
            &[],
        )
        .await
    });
    // Cancel once the statement runs on both shards.
    let active = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30)%' AND state = 'active' AND pid <> pg_backend_pid()";
    while (0..2).any(|s| env.sql_shard(s, active) == "0") {
        assert!(started.elapsed() < Duration::from_secs(20), "never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel sent");
    let err = tokio::time::timeout(Duration::from_secs(20), slow)
        .await
        .expect("the cancel stopped it")
        .unwrap()
        .expect_err("cancelled");
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(25));
    for s in 0..2 {
        assert_eq!(env.sql_shard(s, active), "0", "still running on shard {s}");
    }
}

/// Waits (20 s at most, else fails with `what`) until `until` holds of
/// the two shards' answers to `sql`.
async fn wait_shards(env: &Env, sql: &str, until: impl Fn(&[String]) -> bool, what: &str) {
    let started = Instant::now();
    loop {
        let answers: Vec<String> = (0..2).map(|s| env.sql_shard(s, sql)).collect();
        if until(&answers) {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client that goes away while its statement runs on both shards (a
/// merge, rows streamed in lockstep, a write the proxy wraps in its own
/// transaction), its socket closed or killed from the console, leaves
/// nothing running: each shard's statement is cancelled, the write rolled
/// back, its row locks freed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_statement_on_several_shards_leaves_nothing_running() {
    let env = Env::primaries(2).await;
    let config = format!(
        "{}\n[admin]\nusers = [\"app\"]\n",
        env.shards_config(&[0, 1], SHARDING).replacen(
            "[[shards]]",
            "[[users]]\nname = \"trustclient\"\nauth = \"trust\"\ndatabase = \"app\"\nserver_user = \"app\"\nserver_password = \"app\"\n\n[[shards]]",
            1,
        )
    );
    let (proxy, c) = start_proxy(&config).await;
    load(&c).await;
    let url = |db: &str, name: &str| {
        format!(
            "host=127.0.0.1 port={} user=app password=app dbname={db} application_name={name}",
            proxy.local_addr.port()
        )
    };
    let (admin, conn) = tokio_postgres::connect(&url("shardline", "admin"), tokio_postgres::NoTls)
        .await
        .expect("the console");
    tokio::spawn(conn);
    let active = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(60)%' AND state = 'active' AND pid <> pg_backend_pid()";
    let on_neither = |n: &[String]| n.iter().all(|n| n == "0");
    let statements = [
        "SELECT city, count(*) FROM users WHERE pg_sleep(60) IS NOT NULL GROUP BY city",
        "SELECT id FROM users WHERE pg_sleep(60) IS NOT NULL",
        "UPDATE users SET age = age + 1 WHERE pg_sleep(60) IS NOT NULL",
    ];
    for (round, (sql, killed)) in statements
        .into_iter()
        .flat_map(|sql| [(sql, false), (sql, true)])
        .enumerate()
    {
        let name = format!("leaving{round}");
        let (leaving, conn) = tokio_postgres::connect(&url("app", &name), tokio_postgres::NoTls)
            .await
            .expect("connect");
        let socket = tokio::spawn(conn);
        let statement = tokio::spawn(async move { leaving.simple_query(sql).await });
        let on_both = |n: &[String]| n.iter().all(|n| n != "0");
        wait_shards(&env, active, on_both, &format!("{sql}: never started")).await;
        if killed {
            let id = crate::admin::client_id(&admin, &name).await;
            admin
                .simple_query(&format!("KILL_CLIENT {id}"))
                .await
                .unwrap();
            let e = tokio::time::timeout(Duration::from_secs(20), statement)
                .await
                .expect("the killed client is answered")
                .unwrap()
                .expect_err("killed");
            assert!(
                e.is_closed() || sqlstate(&e).as_deref() == Some("57P01"),
                "{sql}: {e}"
            );
        } else {
            // The client's socket closes with its connection task.
            socket.abort();
            let _ = statement.await;
        }
        let what = format!("{sql} (killed: {killed}): still running 20 s after its client left");
        wait_shards(&env, active, on_neither, &what).await;
        // Nothing written, nothing locked: a write of every row goes through.
        let updated = tokio::time::timeout(
            Duration::from_secs(10),
            c.execute("UPDATE users SET name = name", &[]),
        )
        .await
        .expect("no row is locked")
        .expect("update");
        assert_eq!(updated, 400, "{sql}");
    }
    // A pipeline whose executions go to both shards (Parse once, a Bind
    // and Execute per key, one Sync), its client gone while it runs.
    let keys: Vec<String> = (0..2)
        .map(|s| env.sql_shard(s, "SELECT min(id) FROM users"))
        .collect();
    let mut pipeline = shardline_tests::wire::parse(
        "s",
        "UPDATE users SET age = age + 1 WHERE id = $1 AND pg_sleep(60) IS NOT NULL",
        &[20],
    );
    for key in &keys {
        pipeline.extend(shardline_tests::wire::bind(
            "s",
            &[(0, Some(key.as_bytes()))],
            0,
        ));
        pipeline.extend(shardline_tests::wire::execute());
    }
    pipeline.extend(shardline_tests::wire::sync());
    let mut raw = shardline_tests::RawClient::login(proxy.local_addr.port())
        .await
        .expect("login");
    raw.send(&pipeline).await.unwrap();
    let on_one = |n: &[String]| n.iter().any(|n| n != "0");
    wait_shards(&env, active, on_one, "the pipeline never started").await;
    drop(raw);
    let what = "the pipeline still runs 20 s after its client left";
    wait_shards(&env, active, on_neither, what).await;
    let ages: i64 = c
        .query_one("SELECT sum(age) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    let want: i64 = (1..=400i64).map(|i| 18 + i % 50).sum();
    assert_eq!(ages, want, "the write that lost its client rolled back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_failing_mid_merge_fails_the_statement_not_the_session() {
    let env = Env::primaries(2).await;
    let (_proxy, c) = start_proxy(&env.shards_config(&[0, 1], SHARDING)).await;
    load(&c).await;
    for sql in [
        // Division by zero at id 250, after rows of both shards were merged.
        "SELECT id, 1 / (id - 250) FROM users ORDER BY id",
        "SELECT city, sum(1 / (id - 250)) FROM users GROUP BY city",
    ] {
        // Bounded: a merge that missed the error would wait forever.
        let within = Duration::from_secs(20);
        let err = tokio::time::timeout(within, c.simple_query(sql))
            .await
            .expect("answered")
            .expect_err(sql);
        assert_eq!(sqlstate(&err).as_deref(), Some("22012"), "{sql}: {err:?}");
        let err = tokio::time::timeout(within, c.query(sql, &[]))
            .await
            .expect("answered")
            .expect_err(sql);
        assert_eq!(sqlstate(&err).as_deref(), Some("22012"), "{sql}: {err:?}");
        let n: i64 = c
            .query_one("SELECT count(*) FROM users", &[])
            .await
            .expect("the session goes on")
            .get(0);
        assert_eq!(n, 400);
    }
}

/// psycopg 3, as applications use it: merged reads in text and binary,
/// prepared or not, with parameters, equal to an unsharded server's; and a
/// transaction on both shards committed and rolled back by the driver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_reads_merged_and_commits_across_shards() {
    let env = Env::primaries(3).await;
    let config = env.shards_config(&[0, 1], SHARDING).replace(
        "function = \"consistent\"",
        "function = \"consistent\"\ntwo_phase_commit = true",
    );
    let (proxy, c) = start_proxy(&config).await;
    load(&c).await;
    load(&env.connect_shard(2).await).await;
    let sh = shardline_router::sharding::Sharding::from_config(
        &shardline_config::Config::from_toml(&config, "t").unwrap(),
    );
    let key_on = |s: usize| {
        (1..=400i64)
            .find(|&k| {
                sh.groups[0]
                    .shard_of(Some(&shardline_router::hash::KeyValue::Int(k)))
                    .ok()
                    == Some(s)
            })
            .unwrap()
    };
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/psycopg_sharded_check.py");
    let (ok, out) = shardline_tests::run(
        std::process::Command::new("python3")
            .arg(script)
            .arg(format!(
                "postgresql://app:app@127.0.0.1:{}/app",
                proxy.local_addr.port()
            ))
            .arg(format!(
                "postgresql://app:app@127.0.0.1:{}/app",
                env.node_port(env.shard_primary(2))
            ))
            .arg(key_on(0).to_string())
            .arg(key_on(1).to_string()),
    );
    assert!(ok && out.contains("all checks passed"), "{out}");
    assert!(out.contains("20 merged reads equal"), "{out}");
}

/// The shard holding user 1.
fn shard_of_one(env: &Env) -> usize {
    (0..2)
        .find(|&s| env.sql_shard(s, "SELECT count(*) FROM users WHERE id = 1") == "1")
        .expect("user 1 somewhere")
}

/// Runs `statements` one by one, then a keyless read that must fail; rolls
/// back and returns the read's error.
async fn keyless_read_in(c: &Client, statements: &[&str]) -> tokio_postgres::Error {
    for sql in statements {
        c.batch_execute(sql).await.unwrap();
    }
    let err = c
        .query("SELECT count(*) FROM users", &[])
        .await
        .expect_err("refused");
    c.batch_execute("ROLLBACK").await.unwrap();
    err
}

/// A read on several shards as a transaction's first statement (drivers
/// such as psycopg open a transaction before every first statement): merged,
/// and the transaction goes on; where the snapshot would differ, refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_may_begin_with_a_read_on_every_shard() {
    let env = Env::primaries(2).await;
    let (_proxy, c) = start_proxy(&env.shards_config(&[0, 1], SHARDING)).await;
    let rows = load(&c).await;
    c.batch_execute("BEGIN").await.unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .expect("merged in a transaction")
        .get(0);
    assert_eq!(n, rows.len() as i64);
    c.batch_execute("UPDATE users SET name = 'in txn' WHERE id = 1")
        .await
        .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        env.sql_shard(shard_of_one(&env), "SELECT name FROM users WHERE id = 1"),
        "in txn"
    );

    // After a write, the read would have to see it on one shard: refused.
    let err = keyless_read_in(&c, &["BEGIN", "UPDATE users SET name = 'x' WHERE id = 1"]).await;
    assert_eq!(sqlstate(&err).as_deref(), Some("0A000"));
    // REPEATABLE READ takes its snapshot at the first statement: refused.
    let err = keyless_read_in(&c, &["BEGIN ISOLATION LEVEL REPEATABLE READ"]).await;
    assert_eq!(sqlstate(&err).as_deref(), Some("0A000"));

    // A read that fails fails the transaction, as on one server.
    c.batch_execute("BEGIN").await.unwrap();
    let err = c
        .query("SELECT sum(1 / (id - 250)) FROM users", &[])
        .await
        .expect_err("division by zero");
    assert_eq!(sqlstate(&err).as_deref(), Some("22012"));
    let err = c
        .query("SELECT 1", &[])
        .await
        .expect_err("failed transaction");
    assert_eq!(sqlstate(&err).as_deref(), Some("25P02"));
    c.batch_execute("ROLLBACK").await.unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 400);
}

/// A very large statement does not stall the other clients of its worker
/// thread: while one client sends 32 MB queries (a string constant of
/// 32 MB), a canary's p99 latency on the same single worker stays under
/// 50 ms. Its routing (lexing, parsing) runs on the blocking pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_very_large_statement_does_not_stall_other_clients() {
    let (_env, proxy, c) = users_behind_a_proxy_process(
        |c| c.replace("[proxy]\n", "[proxy]\nworkers = 1\n"),
        10,
        "md5(g::text)",
    )
    .await;
    let canary = shardline_tests::connect_app(proxy.port).await.unwrap();
    canary.simple_query("SELECT 1").await.unwrap();
    let big = "x".repeat(32 << 20);
    let query = format!("SELECT length('{big}')");
    drop(big);
    let large = tokio::spawn(async move {
        let started = Instant::now();
        for _ in 0..3 {
            let rows = c.simple_query(&query).await.expect("large query");
            assert!(
                matches!(&rows[1], tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("33554432"))
            );
        }
        started.elapsed()
    });
    let mut latencies = Vec::new();
    while !large.is_finished() {
        let t = Instant::now();
        canary.simple_query("SELECT 1").await.unwrap();
        latencies.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = large.await.unwrap();
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    let max = latencies[latencies.len() - 1];
    println!(
        "three 32 MB queries in {took:?}; canary: {} queries meanwhile, p99 {p99:?}, max {max:?}",
        latencies.len()
    );
    assert!(
        latencies.len() >= 20,
        "the large queries ended before the canary ran"
    );
    assert!(
        p99 < Duration::from_millis(50),
        "canary p99 {p99:?} (max {max:?})"
    );
}

/// An Execute with a row limit (asyncpg's `fetchrow` and `fetchval` ask for
/// one row) over rows of several shards is answered as one server holding
/// every row answers: at most that many rows of all shards together, then
/// PortalSuspended once that many were returned, CommandComplete when fewer
/// exist, wherever the rows are (one shard, both, none). Executing the
/// portal again for the rest is refused: the rows past the limit are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_limit_counts_the_rows_of_every_shard() {
    use shardline_tests::wire::{bind, execute, execute_rows, parse, sync};
    use shardline_tests::{error_code, tags};
    let (env, _proxy, mut through, mut direct) = through_and_direct().await;
    for s in 0..2 {
        let n = env.sql_shard(s, "SELECT count(*) FROM users WHERE age = 20");
        assert_ne!(n, "0", "shard {s} holds rows of age 20");
    }
    for sql in [
        // One row, on one shard: the other has none.
        "SELECT id, name FROM users WHERE name = 'apple 40'",
        // No row anywhere.
        "SELECT id, name FROM users WHERE name = 'nobody'",
        // Eight rows, on both shards.
        "SELECT id, name FROM users WHERE age = 20",
    ] {
        for limit in [1, 3, 8, 9, 0] {
            let unit = [
                parse("", sql, &[]),
                bind("", &[], 0),
                execute_rows(limit),
                sync(),
            ];
            let (p, o) = (
                through.exchange(&unit).await.unwrap(),
                direct.exchange(&unit).await.unwrap(),
            );
            assert_eq!(tags(&p), tags(&o), "{sql} with a limit of {limit}: {p:?}");
            assert_eq!(
                p.last_chunk::<2>().map(|m| m[0].clone()),
                o.last_chunk::<2>().map(|m| m[0].clone()),
                "{sql} with a limit of {limit}: the same end"
            );
            if !sql.contains("age") {
                assert_eq!(
                    data_rows(&p),
                    data_rows(&o),
                    "{sql} with a limit of {limit}"
                );
            }
        }
    }
    // The rest of the rows cannot be had: the portal executed again is
    // refused, with or without a limit.
    for again in [execute(), execute_rows(2)] {
        let msgs = through
            .exchange(&[
                parse("", "SELECT id FROM users WHERE age = 20", &[]),
                bind("", &[], 0),
                execute_rows(1),
                again,
                sync(),
            ])
            .await
            .unwrap();
        let err = msgs.iter().find(|m| m.0 == b'E').expect("an error");
        assert_eq!(error_code(&err.1), "0A000", "{msgs:?}");
    }
    // On one shard's rows it is the server's portal, fetched in batches.
    let msgs = through
        .exchange(&[
            parse("", "SELECT id FROM users WHERE id = $1", &[]),
            bind("", &[(0, Some(b"40"))], 0),
            execute_rows(1),
            execute_rows(1),
            sync(),
        ])
        .await
        .unwrap();
    assert_eq!(tags(&msgs), b"12DsCZ", "{msgs:?}");
}
