//! Bounded memory: what clients send cannot grow the proxy without bound.
//! Each test measures the proxy process's resident memory.

use shardline_tests::{memory_kib, memory_split_kib, wait_for, Env, ProxyProcess};
use std::time::Duration;

/// Prepared statements the clients closed (or left with) are forgotten:
/// 10,000 distinct 2 KB statements prepared and closed (20 MB of text,
/// 100 at a time) leave the proxy's resident memory within 8 MB of where
/// it started. Before, every one stayed in the process-wide registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_prepared_statements_are_forgotten() {
    let env = Env::primaries(1).await;
    let (proxy, c) = ProxyProcess::start(&env.shards_config(&[0], ""), &[]).await;
    let pid = proxy.pid();
    let pad = "x".repeat(2000);
    let batches = |from: usize, n: usize| {
        let (c, pad) = (&c, &pad);
        async move {
            for b in 0..n {
                let texts: Vec<String> = (0..100)
                    .map(|k| format!("SELECT '{pad}' || {}::text AS v", from + b * 100 + k))
                    .collect();
                let prepares = texts.iter().map(|t| c.prepare(t));
                // Dropping the statements sends their Close.
                for stmt in futures_util::future::join_all(prepares).await {
                    drop(stmt.unwrap());
                }
            }
            c.simple_query("SELECT 1").await.unwrap();
        }
    };
    batches(0, 20).await;
    let (_, before) = memory_kib(pid);
    batches(2000, 80).await;
    let (_, after) = memory_kib(pid);
    eprintln!("proxy RSS {before} KiB before 8,000 more statements, {after} KiB after");
    assert!(
        after < before + 8 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
}

/// The routing cache is bounded in bytes (`routing.cache_bytes`, here
/// 8 MiB): 1,000 distinct 40 KB statements (40 MB of shapes) leave the
/// proxy's resident memory within 16 MB of where it started; bounded only
/// by its entry count (10,000), it kept them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_routing_cache_is_bounded_in_bytes() {
    let env = Env::primaries(1).await;
    let config = env
        .shards_config(&[0], "")
        .replace("[pool]\n", "[routing]\ncache_bytes = 8388608\n[pool]\n");
    let (proxy, c) = ProxyProcess::start(&config, &[]).await;
    let pid = proxy.pid();
    let pad = "x".repeat(40_000);
    c.simple_query("SELECT 1").await.unwrap();
    let (_, before) = memory_kib(pid);
    for i in 0..1000 {
        // A comment is part of a statement's shape (it may carry a hint).
        c.simple_query(&format!("/* {pad} {i} */ SELECT {i}"))
            .await
            .unwrap();
    }
    let (_, after) = memory_kib(pid);
    eprintln!("proxy RSS {before} KiB before 1,000 distinct 40 KB statements, {after} KiB after");
    assert!(
        after < before + 16 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
}

/// Buffers grown for one large message shrink back: a 32 MB query and a
/// 32 MB result leave the proxy's resident memory within 16 MB of where it
/// started, moments after the reply (before, about 160 MB stayed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffers_shrink_after_a_large_message() {
    let env = Env::primaries(1).await;
    let (proxy, c) = ProxyProcess::start(&env.shards_config(&[0], ""), &[]).await;
    let pid = proxy.pid();
    c.simple_query("SELECT 1").await.unwrap();
    let (_, before) = memory_kib(pid);
    let big = "x".repeat(32 << 20);
    let query = format!("SELECT length('{big}')");
    drop(big);
    {
        let rows = c.simple_query(&query).await.unwrap();
        assert!(
            matches!(&rows[1], tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("33554432"))
        );
        let rows = c
            .simple_query("SELECT repeat('x', 32 << 20)")
            .await
            .unwrap();
        assert!(
            matches!(&rows[1], tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0).map(str::len) == Some(32 << 20))
        );
    }
    // The client has the last reply as the proxy's thread is still finishing
    // the event that sent it (a buffer shrinks once written out, a pooled
    // connection's when it is released): the memory is polled for, a few
    // milliseconds, not read at once. Buffers that never shrank stay.
    let started = std::time::Instant::now();
    let (peak, after) = loop {
        let (peak, now) = memory_kib(pid);
        if now < before + 16 * 1024 || started.elapsed() > Duration::from_secs(5) {
            break (peak, now);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!(
        "proxy RSS {before} KiB before 32 MB messages, {after} KiB {} ms after (peak {peak} KiB)",
        started.elapsed().as_millis()
    );
    assert!(
        after < before + 16 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
}

/// What a client sends while its session waits is not buffered without
/// bound: statements streamed behind a read that takes 3 s on a replica
/// (a write waits for the read's server to finish) leave the proxy's
/// resident memory within 16 MB of where it started; the client's writes
/// are slowed by TCP instead (before, all 200 MB sent were read in 0.2 s
/// and held).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_streaming_while_its_session_waits_is_slowed_not_buffered() {
    use shardline_tests::{message, RawClient};
    let env = Env::start().await.unwrap();
    let mut config = env.shards_config(&[0], "").replace(
        "[[shards]]",
        "[[users]]\nname = \"trustclient\"\nauth = \"trust\"\ndatabase = \"app\"\nserver_user = \"app\"\nserver_password = \"app\"\n\n[[shards]]",
    );
    // The shard's replica: a write behind a read served there waits for it.
    config.push_str(&format!(
        "replicas = [{{ host = \"127.0.0.1\", port = {} }}]\n",
        env.node_port(env.replicas()[0])
    ));
    let (proxy, c) = ProxyProcess::start(&config, &[]).await;
    c.batch_execute("CREATE TABLE held (n int)").await.unwrap();
    // The replica's first health check puts it in rotation.
    shardline_tests::wait_for("the replica to serve reads", || {
        let c = &c;
        async move {
            c.query_one(
                "/* shardline: role=replica */ SELECT pg_is_in_recovery()",
                &[],
            )
            .await
            .is_ok_and(|r| r.get::<_, bool>(0))
        }
    })
    .await;
    let pid = proxy.pid();
    let (_, before) = memory_kib(pid);
    let mut raw = RawClient::login(proxy.port).await.unwrap();
    raw.send(&message(
        b'Q',
        b"/* shardline: role=replica */ SELECT pg_sleep(3)\0",
    ))
    .await
    .unwrap();
    let chunk: Vec<u8> = (0..20_000)
        .flat_map(|_| message(b'Q', b"DELETE FROM held WHERE n = 1\0"))
        .collect();
    let (mut sent, mut most) = (0, before);
    // Sends for up to 2 s (while the read runs), 200 MB at most.
    let until = std::time::Instant::now() + Duration::from_secs(2);
    while sent < 200 << 20 {
        let left = until.saturating_duration_since(std::time::Instant::now());
        let Ok(Ok(())) = tokio::time::timeout(left, raw.send(&chunk)).await else {
            break;
        };
        sent += chunk.len();
        most = most.max(memory_kib(pid).1);
    }
    most = most.max(memory_kib(pid).1);
    eprintln!(
        "proxy RSS {before} KiB before, up to {most} KiB while {} MB were sent behind a waiting read",
        sent >> 20
    );
    assert!(
        most < before + 16 * 1024,
        "RSS grew from {before} to {most} KiB"
    );
}

/// A read on several shards is written to the client as it comes, not
/// held per shard: a keyless read of 100 MB over two shards (about 50 MB
/// from each) keeps the proxy's peak resident memory within 24 MB of
/// where it started. Before, each shard's rows were gathered whole before
/// any was written (the peak grew by one shard's result).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_on_several_shards_is_written_out_as_it_comes() {
    let env = Env::primaries(2).await;
    let tables = "[sharding]\nfunction = \"consistent\"\n[[sharding.tables]]\nname = \"users\"\ncolumn = \"id\"\n";
    let (proxy, c) = ProxyProcess::start(&env.shards_config(&[0, 1], tables), &[]).await;
    c.batch_execute("CREATE TABLE users (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    for id in 1..=20i64 {
        c.execute("INSERT INTO users (id) VALUES ($1)", &[&id])
            .await
            .unwrap();
    }
    for shard in 0..2 {
        let n = env.sql_shard(shard, "SELECT count(*) FROM users");
        assert!(
            n.parse::<i64>().unwrap() > 0,
            "shard {shard} holds {n} rows"
        );
    }
    let pid = proxy.pid();
    let (_, before) = memory_kib(pid);
    let rows = c
        .simple_query("SELECT u.id, repeat('x', 10000) FROM users u, generate_series(1, 500) g")
        .await
        .unwrap();
    let data = rows
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count();
    assert_eq!(data, 20 * 500);
    drop(rows);
    let (peak, after) = memory_kib(pid);
    eprintln!("proxy RSS {before} KiB before a 100 MB read on two shards, peak {peak} KiB, {after} KiB after");
    assert!(
        peak < before + 24 * 1024,
        "peak RSS {peak} KiB, from {before} KiB"
    );
}

/// Heap memory freed after a burst goes back to the system once the proxy
/// is idle (`proxy/src/memory.rs`): after 48 clients at once each read
/// 2,000 rows of 100 bytes and leave, the proxy trims its heap within
/// about two seconds, logging it, and its anonymous memory falls; it trims
/// once per idle period, again after the next query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freed_memory_goes_back_to_the_system_when_idle() {
    let env = Env::primaries(1).await;
    let (proxy, c) = ProxyProcess::start(
        &env.shards_config(&[0], ""),
        &[("RUST_LOG", "info,shardline::memory=debug")],
    )
    .await;
    let pid = proxy.pid();
    const TRIMMED: &str = "freed heap memory returned to the system";
    let trims = || proxy.log.text().matches(TRIMMED).count();
    // Idle since it started: a trim.
    wait_for("the first idle trim", || std::future::ready(trims() >= 1)).await;
    let first = trims();

    let clients = futures_util::future::join_all((0..48).map(|_| proxy.client())).await;
    let reads = clients
        .iter()
        .map(|c| c.simple_query("SELECT repeat('x', 100) FROM generate_series(1, 2000)"));
    for rows in futures_util::future::join_all(reads).await {
        assert_eq!(
            rows.unwrap().len(),
            2002,
            "2,000 rows, their description and tag"
        );
    }
    drop(clients);
    // Traffic moved within the last tick: no trim yet.
    let (busy_anon, _, _) = memory_split_kib(pid);
    assert_eq!(trims(), first, "a trim during the burst or right after it");
    wait_for("the idle trim after the burst", || {
        std::future::ready(trims() == first + 1)
    })
    .await;
    let (idle_anon, _, _) = memory_split_kib(pid);
    eprintln!("proxy anonymous memory {busy_anon} KiB after the burst, {idle_anon} KiB idle");
    assert!(
        idle_anon + 256 <= busy_anon,
        "anonymous memory went from {busy_anon} to only {idle_anon} KiB"
    );
    // Still idle: no other trim over the next ticks.
    tokio::time::sleep(shardline::memory::TICK * 3).await;
    assert_eq!(trims(), first + 1, "trimmed again while idle");
    // A new idle period after one query: one more.
    c.simple_query("SELECT 1").await.unwrap();
    wait_for("the idle trim after a query", || {
        std::future::ready(trims() == first + 2)
    })
    .await;
}
