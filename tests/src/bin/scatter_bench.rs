//! Scatter-gather and two-phase commit benchmark: four shards behind
//! Shardline against one unsharded Postgres holding the same rows, in one run.
//!
//! cargo run --release -p shardline-tests --bin shardline-scatter-bench -- [--rows N] [--runs N] [--txns N]
//!
//! - Cross-shard reads (ORDER BY ... LIMIT 100, a GROUP BY aggregate, a
//!   100,000-row ORDER BY): median time through Shardline, on the unsharded
//!   server, and the slowest shard running its part alone (the shards'
//!   statement, all four at once). Merge overhead is Shardline's time over
//!   the slowest shard's.
//! - Transactions writing two rows: both on one shard (a plain COMMIT),
//!   on two shards (two-phase commit), and on the unsharded server.

use anyhow::Result;
use shardline::cluster::free_port;

use std::time::{Duration, Instant};

struct Args {
    rows: u32,
    runs: u32,
    txns: u32,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        rows: 1_000_000,
        runs: 15,
        txns: 2000,
    };
    shardline_tests::numeric_flags(
        &mut [
            ("--rows", &mut a.rows),
            ("--runs", &mut a.runs),
            ("--txns", &mut a.txns),
        ],
        "shardline-scatter-bench [--rows 1000000] [--runs 15] [--txns 2000]",
    )?;
    Ok(a)
}

const SHARDS: usize = 4;

const SCHEMA: &str = "CREATE TABLE orders (user_id bigint NOT NULL, id bigint NOT NULL,
    amount numeric(12,2) NOT NULL, status text NOT NULL, PRIMARY KEY (user_id, id));
CREATE TABLE pairs (id bigint PRIMARY KEY, v int NOT NULL);";

const QUERIES: &[(&str, &str)] = &[
    (
        "ORDER BY ... LIMIT 100",
        "SELECT user_id, id, amount FROM orders ORDER BY amount DESC, user_id, id LIMIT 100",
    ),
    (
        "GROUP BY aggregate",
        "SELECT status, count(*), sum(amount), avg(amount), min(amount), max(amount) FROM orders GROUP BY status",
    ),
    (
        "ORDER BY, 100,000 rows",
        "SELECT user_id, id FROM orders ORDER BY user_id, id LIMIT 100000",
    ),
];

fn main() -> Result<()> {
    let args = parse_args()?;
    println!(
        "starting {} Postgres servers: {SHARDS} shards and one unsharded ...",
        SHARDS + 1
    );
    let cluster = shardline_tests::bench_cluster(SHARDS + 1)?;
    let shards: Vec<u16> = (0..SHARDS).map(|s| cluster.primary(s).port).collect();
    let direct = cluster.primary(SHARDS).port;
    let port = free_port()?;
    let cfg = cluster.root.join("scatter-bench.toml");
    let mut text = format!(
        "[proxy]\nlisten = \"127.0.0.1:{port}\"\n[pool]\nsize = 8\n\
         [[users]]\nname = \"app\"\npassword = \"app\"\nauth = \"md5\"\ndatabase = \"app\"\n\
         [sharding]\nfunction = \"pg_hash\"\ntwo_phase_commit = true\n\
         [[sharding.tables]]\nname = \"orders\"\ncolumn = \"user_id\"\n\
         [[sharding.tables]]\nname = \"pairs\"\ncolumn = \"id\"\n"
    );
    for (i, p) in shards.iter().enumerate() {
        text.push_str(&format!(
            "[[shards]]\nname = \"s{i}\"\nprimary = {{ host = \"127.0.0.1\", port = {p} }}\n"
        ));
    }
    std::fs::write(&cfg, &text)?;
    let sharding = shardline_router::sharding::Sharding::from_config(
        &shardline_config::Config::from_toml(&text, "bench")?,
    );
    let mut child = shardline_tests::spawn_bench_proxy(&cfg)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(run(&args, port, &shards, direct, &sharding));
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn run(
    args: &Args,
    proxy: u16,
    shards: &[u16],
    direct: u16,
    sharding: &shardline_router::sharding::Sharding,
) -> Result<()> {
    let through = shardline_tests::connect_app(proxy).await?;
    through.batch_execute(SCHEMA).await?;
    let oracle = shardline_tests::connect_app(direct).await?;
    oracle.batch_execute(SCHEMA).await?;
    println!("loading {} orders rows on each side ...", args.rows);
    let rows = |filter: &str| {
        format!(
            "INSERT INTO orders SELECT g % 50000, g, (hashint4(g)::int8 & 65535) / 100.0,
                (ARRAY['new','paid','shipped','refunded','cancelled'])[1 + g % 5]
               FROM generate_series(1, {}) g {filter}",
            args.rows
        )
    };
    oracle.batch_execute(&rows("")).await?;
    // Each shard gets its own keys (placed as the proxy places them).
    let owner = |k: i64| {
        sharding.groups[0]
            .shard_of(Some(&shardline_router::hash::KeyValue::Int(k)))
            .unwrap_or(0)
    };
    let mut per_shard: Vec<Vec<i64>> = vec![Vec::new(); shards.len()];
    for k in 0..50_000i64 {
        per_shard[owner(k)].push(k);
    }
    let shard_clients =
        futures_util::future::try_join_all(shards.iter().map(|&p| shardline_tests::connect_app(p)))
            .await?;
    for (c, keys) in shard_clients.iter().zip(&per_shard) {
        let list: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        c.batch_execute(&rows(&format!("WHERE g % 50000 IN ({})", list.join(","))))
            .await?;
        c.batch_execute("ANALYZE orders").await?;
    }
    oracle.batch_execute("ANALYZE orders").await?;

    println!();
    println!(
        "cross-shard reads, {SHARDS} shards, {} rows, median of {} runs (ms)",
        args.rows, args.runs
    );
    println!("| query | unsharded | slowest shard (4 at once) | slowest shard (alone) | Shardline | merge overhead | Shardline / unsharded |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, sql) in QUERIES {
        let plan = shardline_router::scatter::plan(sql, sharding)
            .map_err(|r| anyhow::anyhow!(r.message))?
            .ok_or_else(|| anyhow::anyhow!("no merge planned for {sql}"))?;
        let (mut direct_t, mut slowest_t, mut proxy_t) = (Vec::new(), Vec::new(), Vec::new());
        let mut alone_t = Vec::new();
        for run in 0..args.runs + 1 {
            let t = Instant::now();
            let a = oracle.simple_query(sql).await?;
            let d = t.elapsed();
            let t = Instant::now();
            let b = through.simple_query(sql).await?;
            let p = t.elapsed();
            anyhow::ensure!(
                a.len() == b.len(),
                "{name}: {} vs {} messages",
                a.len(),
                b.len()
            );
            // Every shard runs its part at once; the slowest decides.
            let parts = futures_util::future::try_join_all(shard_clients.iter().map(|c| async {
                let t = Instant::now();
                c.simple_query(&plan.sql).await.map(|_| t.elapsed())
            }))
            .await?;
            // And each alone: no other shard competing for the cores.
            let mut alone = Duration::ZERO;
            for c in &shard_clients {
                let t = Instant::now();
                c.simple_query(&plan.sql).await?;
                alone = alone.max(t.elapsed());
            }
            if run > 0 {
                alone_t.push(alone);
                direct_t.push(d);
                proxy_t.push(p);
                slowest_t.push(parts.into_iter().max().unwrap_or_default());
            }
        }
        let (d, s, p) = (median(direct_t), median(slowest_t), median(proxy_t));
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.2} | {:+.0}% | {:.2} |",
            ms(d),
            ms(s),
            ms(median(alone_t)),
            ms(p),
            (p.as_secs_f64() / s.as_secs_f64() - 1.0) * 100.0,
            p.as_secs_f64() / d.as_secs_f64()
        );
    }

    // Transactions: two rows on one shard, on two shards, and unsharded.
    let txns = args.txns as usize;
    let mut keys: Vec<Vec<i64>> = vec![Vec::new(); shards.len()];
    let mut k = 1_000_000i64;
    while keys[0].len() < 2 * txns || keys[1].len() < txns {
        keys[owner(k)].push(k);
        k += 1;
    }
    let mut table = Vec::new();
    for (name, client, two_shards) in [
        ("unsharded server", &oracle, false),
        ("Shardline, both rows on one shard", &through, false),
        ("Shardline, rows on two shards (2PC)", &through, true),
    ] {
        client.batch_execute("TRUNCATE pairs").await?;
        let started = Instant::now();
        for i in 0..txns {
            let a = keys[0][2 * i];
            let b = if two_shards {
                keys[1][i]
            } else {
                keys[0][2 * i + 1]
            };
            client.batch_execute("BEGIN").await?;
            client
                .execute("INSERT INTO pairs (id, v) VALUES ($1, 1)", &[&a])
                .await?;
            client
                .execute("INSERT INTO pairs (id, v) VALUES ($1, 1)", &[&b])
                .await?;
            client.batch_execute("COMMIT").await?;
        }
        table.push((name, started.elapsed() / txns as u32));
    }
    println!();
    println!("transactions writing two rows, one client, {txns} each");
    println!("| where | ms per transaction | vs one shard |");
    println!("|---|---:|---:|");
    let base = table[1].1.as_secs_f64();
    for (name, t) in &table {
        println!("| {name} | {:.3} | {:.2} |", ms(*t), t.as_secs_f64() / base);
    }
    Ok(())
}
