//! Bounded memory: what clients send cannot grow the proxy without bound.
//! Each test measures the proxy process's resident memory.

use shardline_tests::{memory_kib, Env, ProxyProcess};

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
