//! Rebalance benchmark: rows per second `shardline-rebalance apply` moves
//! when a third shard joins two, end to end (counting, copying, verifying
//! every range, deleting), for narrow and for wide (1 KB) rows; against a
//! plain binary COPY of the same rows between the same servers (psql piped
//! into psql, no verification) taken in the same run. Then `apply --online`
//! on a table of the narrow rows' shape while `--clients` clients write
//! through two proxies: the copy phase's rows/s (against the offline
//! apply's), the pause each client saw, and a check that no client failed
//! and every acknowledged write is there.
//!
//! cargo run --release -p shardline-tests --bin shardline-rebalance-bench -- [--narrow-rows N] [--wide-rows N] [--online-rows N] [--clients N]

use anyhow::{bail, Context as _, Result};
use shardline::cluster::{LocalCluster, PgBin};
use shardline_config::Config;
use shardline_rebalance::layout::Placement;
use std::process::{Command, Stdio};
use std::time::Instant;

struct Args {
    narrow_rows: u32,
    wide_rows: u32,
    online_rows: u32,
    clients: u32,
}

const NARROW: &str =
    "CREATE TABLE narrow (id bigint PRIMARY KEY, a int4 NOT NULL, b text NOT NULL)";
const WIDE: &str = "CREATE TABLE wide (id bigint PRIMARY KEY, payload text NOT NULL)";

fn config(cluster: &LocalCluster, shards: usize, table: &str) -> String {
    let mut text =
        String::from("[[users]]\nname = \"app\"\npassword = \"app\"\ndatabase = \"app\"\n");
    for s in 0..shards {
        text.push_str(&format!(
            "[[shards]]\nname = \"s{s}\"\nprimary = {{ host = \"127.0.0.1\", port = {} }}\n",
            cluster.primary(s).port
        ));
    }
    text.push_str(&format!(
        "[[sharding.tables]]\nname = \"{table}\"\ncolumn = \"id\"\n"
    ));
    text
}

fn main() -> Result<()> {
    let mut args = Args {
        narrow_rows: 1_000_000,
        wide_rows: 100_000,
        online_rows: 1_000_000,
        clients: 16,
    };
    shardline_tests::numeric_flags(
        &mut [
            ("--narrow-rows", &mut args.narrow_rows),
            ("--wide-rows", &mut args.wide_rows),
            ("--online-rows", &mut args.online_rows),
            ("--clients", &mut args.clients),
        ],
        "shardline-rebalance-bench [--narrow-rows 1000000] [--wide-rows 100000] [--online-rows 1000000] [--clients 16]",
    )?;
    let bin = PgBin::find()?;
    println!("starting three Postgres servers ...");
    let cluster = shardline_tests::bench_cluster(3)?;
    for s in 0..3 {
        let schema = format!(
            "SET ROLE app; {NARROW}; {WIDE}; {}; {}; {};",
            NARROW.replace("narrow", "narrow_plain"),
            WIDE.replace("wide", "wide_plain"),
            NARROW.replace("narrow", "narrow_online")
        );
        cluster.psql(cluster.primary(s), "app", &schema)?;
    }
    let dir = cluster.root.join("rebalance-bench");
    std::fs::create_dir_all(&dir)?;
    let tool = shardline_tests::rebalance_binary()?;

    let cases = [
        (
            "narrow",
            "narrow rows (bigint, int4, ~20-byte text)",
            args.narrow_rows,
            "id, (id % 100000)::int4, 'row number ' || id".to_string(),
        ),
        (
            "wide",
            "wide rows (bigint, 1 KB text)",
            args.wide_rows,
            "id, repeat(md5(id::text), 32)".to_string(),
        ),
    ];
    let mut report = Vec::new();
    let mut narrow_rate = None;
    for (table, label, rows, select) in cases {
        let old = config(&cluster, 2, table);
        let new = config(&cluster, 3, table);
        let placement = Placement::new(
            &Config::from_toml(&old, "old.toml").map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        let spec = &placement.tables[0];
        println!("loading {rows} {label} onto s0 and s1 ...");
        load(&cluster, table, &select, rows, &placement.owner_sql(spec))?;
        let old_path = dir.join(format!("{table}-old.toml"));
        let new_path = dir.join(format!("{table}-new.toml"));
        std::fs::write(&old_path, &old)?;
        std::fs::write(&new_path, &new)?;

        // Baseline: the same rows, COPY binary from each source into s2's
        // copy of the table, psql piped into psql.
        let new_placement = Placement::new(
            &Config::from_toml(&new, "new.toml").map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        let new_owner = new_placement.owner_sql(&new_placement.tables[0]);
        let started = Instant::now();
        let mut plain_rows = 0u64;
        for s in 0..2 {
            let out = pipe(
                &bin.bindir.join("psql"),
                cluster.primary(s).port,
                &format!("\\copy (SELECT * FROM {table} WHERE {new_owner} = 2) TO STDOUT (FORMAT binary)"),
                cluster.primary(2).port,
                &format!("\\copy {table}_plain FROM STDIN (FORMAT binary)"),
            )?;
            plain_rows += out;
        }
        let plain = started.elapsed().as_secs_f64();

        println!("moving with shardline-rebalance apply ...");
        let started = Instant::now();
        let out = Command::new(&tool)
            .args(["apply", "--from"])
            .arg(&old_path)
            .arg("--to")
            .arg(&new_path)
            .arg("--writes-stopped")
            .stderr(Stdio::null())
            .output()?;
        let elapsed = started.elapsed().as_secs_f64();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "apply failed:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let summary = stdout.lines().next().unwrap_or_default().to_string();
        let moved: u64 = summary
            .split_whitespace()
            .nth(1)
            .context("summary line")?
            .replace(',', "")
            .parse()?;
        if moved != plain_rows {
            bail!("apply moved {moved} rows, the plain copy {plain_rows}");
        }
        let verify = Command::new(&tool)
            .args(["verify", "--config"])
            .arg(&new_path)
            .output()?;
        if !verify.status.success() {
            bail!(
                "verify after apply failed:\n{}",
                String::from_utf8_lossy(&verify.stdout)
            );
        }
        if table == "narrow" {
            narrow_rate = Some(moved as f64 / elapsed);
        }
        report.push(format!(
            "| {label} | {rows} | {moved} | {elapsed:.2} s | {:.0} | {:.0} | {:.2} |\n  apply said: {summary}",
            moved as f64 / elapsed,
            plain_rows as f64 / plain,
            (moved as f64 / elapsed) / (plain_rows as f64 / plain)
        ));
    }
    println!("\n| rows | loaded on 2 shards | moved to the 3rd | apply, wall clock | apply rows/s | plain COPY rows/s | ratio |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in report {
        println!("{r}");
    }
    if args.online_rows > 0 {
        let line = online(
            &cluster,
            &dir,
            &tool,
            args.online_rows,
            args.clients,
            narrow_rate,
        )?;
        println!("\n{line}");
    }
    Ok(())
}

/// Rows `1..=rows` of `table` (`select` over `id`) onto s0 and s1, each on
/// the shard `owner` (the old config's placement) gives it.
fn load(cluster: &LocalCluster, table: &str, select: &str, rows: u32, owner: &str) -> Result<()> {
    for s in 0..2 {
        cluster.psql(
            cluster.primary(s),
            "app",
            &format!(
                "SET ROLE app; INSERT INTO {table} SELECT {select} FROM (SELECT g::int8 AS id FROM generate_series(1, {rows}) g) x WHERE {owner} = {s}; VACUUM ANALYZE {table};"
            ),
        )?;
    }
    Ok(())
}

/// What one load client did.
#[derive(Default)]
struct ClientLog {
    increments: i64,
    inserted: i64,
    failed: Vec<String>,
    longest: std::time::Duration,
}

/// `apply --online` adding s2 to a `rows`-row table of the narrow rows'
/// shape while `clients` clients (half through each of two proxies) run
/// transactions incrementing a random row's `a` and inserting rows of
/// their own. Returns the report line.
fn online(
    cluster: &LocalCluster,
    dir: &std::path::Path,
    tool: &std::path::Path,
    rows: u32,
    clients: u32,
    offline_rate: Option<f64>,
) -> Result<String> {
    let table = "narrow_online";
    let admin = "[admin]\nusers = [\"app\"]\n";
    let old = format!("{}{admin}", config(cluster, 2, table));
    let new = format!("{}{admin}", config(cluster, 3, table));
    let placement =
        Placement::new(&Config::from_toml(&old, "old.toml").map_err(|e| anyhow::anyhow!("{e}"))?);
    println!("loading {rows} narrow rows for the online move onto s0 and s1 ...");
    load(
        cluster,
        table,
        "id, (id % 100000)::int4, 'row number ' || id",
        rows,
        &placement.owner_sql(&placement.tables[0]),
    )?;
    // The offline moves above recorded their placement on the shards;
    // proxies of this table's config would refuse to run against it.
    for s in 0..3 {
        cluster.psql(
            cluster.primary(s),
            "app",
            "DROP SCHEMA IF EXISTS shardline_placement CASCADE",
        )?;
    }
    let old_path = dir.join("online.toml");
    let new_path = dir.join("online-new.toml");
    std::fs::write(&old_path, &old)?;
    std::fs::write(&new_path, &new)?;
    let sum = |shards: usize| -> Result<(i64, i64)> {
        let mut total = (0, 0);
        for s in 0..shards {
            let out = cluster.psql(
                cluster.primary(s),
                "app",
                &format!("SELECT count(*) || ' ' || coalesce(sum(a), 0) FROM {table}"),
            )?;
            let mut it = out
                .split_whitespace()
                .map(|v| v.parse::<i64>().unwrap_or(-1));
            total.0 += it.next().unwrap_or(-1);
            total.1 += it.next().unwrap_or(-1);
        }
        Ok(total)
    };
    let before = sum(2)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let tool = tool.to_path_buf();
    let (logs, out, caught_up) = runtime.block_on(async move {
        let (a, _) = shardline_tests::ProxyProcess::start_file(&old_path).await;
        let (b, _) = shardline_tests::ProxyProcess::start_file(&old_path).await;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks: Vec<_> = (0..clients as i64)
            .map(|i| {
                let port = if i % 2 == 0 { a.port } else { b.port };
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut log = ClientLog::default();
                    let c = shardline_tests::connect_app(port)
                        .await
                        .expect("a load client");
                    let mut n: i64 = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        n += 1;
                        let t = Instant::now();
                        let insert = n % 4 == 0;
                        let sql = if insert {
                            let key = rows as i64 + 1 + i * 100_000_000 + n;
                            format!("INSERT INTO {table} (id, a, b) VALUES ({key}, 0, 'new')")
                        } else {
                            let key = 1 + (n * 7_919 + i * 104_729) % rows as i64;
                            format!("BEGIN; UPDATE {table} SET a = a + 1 WHERE id = {key}; COMMIT")
                        };
                        match c.batch_execute(&sql).await {
                            Ok(()) if insert => log.inserted += 1,
                            Ok(()) => log.increments += 1,
                            Err(e) => log.failed.push(format!(
                                "{sql}: {}",
                                e.as_db_error()
                                    .map_or(e.to_string(), |d| d.message().to_string())
                            )),
                        }
                        log.longest = log.longest.max(t.elapsed());
                    }
                    log
                })
            })
            .collect();
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let admin = |p: u16| format!("postgres://app:app@127.0.0.1:{p}/shardline");
        let mut args: Vec<String> = vec!["apply".into(), "--online".into(), "--from".into()];
        args.push(old_path.display().to_string());
        args.push("--to".into());
        args.push(new_path.display().to_string());
        for p in [a.port, b.port] {
            args.push("--admin".into());
            args.push(admin(p));
        }
        args.push("--user".into());
        args.push("postgres".into());
        let started_at = Instant::now();
        let (out, caught_up) = tokio::task::spawn_blocking(move || -> Result<_> {
            use std::io::BufRead as _;
            let mut child = Command::new(&tool)
                .args(&args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?;
            let mut caught_up = None;
            let mut lines = Vec::new();
            for line in std::io::BufReader::new(child.stderr.take().context("stderr")?)
                .lines()
                .map_while(Result::ok)
            {
                if caught_up.is_none() && line.starts_with("replication caught up") {
                    caught_up = Some(started_at.elapsed());
                }
                lines.push(line);
            }
            let out = child.wait_with_output()?;
            Ok((
                (
                    out.status.success(),
                    String::from_utf8_lossy(&out.stdout).into_owned(),
                    lines.join("\n"),
                ),
                caught_up,
            ))
        })
        .await
        .expect("the tool's thread")
        .expect("the tool runs");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut logs = Vec::new();
        for t in tasks {
            logs.push(t.await.expect("a load client"));
        }
        drop((a, b));
        (logs, out, caught_up)
    });
    let (ok, stdout, stderr) = out;
    if !ok {
        bail!("apply --online failed:\n{stdout}\n{stderr}");
    }
    let failed: Vec<&String> = logs.iter().flat_map(|l| &l.failed).collect();
    if !failed.is_empty() {
        bail!(
            "{} client transactions failed, e.g. {}",
            failed.len(),
            failed[0]
        );
    }
    let increments: i64 = logs.iter().map(|l| l.increments).sum();
    let inserted: i64 = logs.iter().map(|l| l.inserted).sum();
    let after = sum(3)?;
    if after != (before.0 + inserted, before.1 + increments) {
        bail!(
            "after the move: {after:?} (rows, sum of a); expected ({}, {})",
            before.0 + inserted,
            before.1 + increments
        );
    }
    let moved: i64 = cluster
        .psql(
            cluster.primary(2),
            "app",
            &format!("SELECT count(*) FROM {table} WHERE id <= {rows}"),
        )?
        .trim()
        .parse()?;
    let copy = caught_up.context("the tool never said replication caught up")?;
    let mut longest: Vec<f64> = logs.iter().map(|l| l.longest.as_secs_f64()).collect();
    longest.sort_by(f64::total_cmp);
    let cutover: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("cutover:") || l.starts_with("compared online"))
        .collect();
    Ok(format!(
        "apply --online, {rows} narrow rows, {clients} clients through 2 proxies: {} writes acknowledged, 0 failed, every one there; from the tool's start to replication caught up {:.1} s for the {moved} rows that moved to s2 = {:.0} rows/s{}; longest transaction per client (the pause): median {:.3} s, max {:.3} s\n  {}\n  apply said: {}",
        increments + inserted,
        copy.as_secs_f64(),
        moved as f64 / copy.as_secs_f64(),
        offline_rate.map_or(String::new(), |r| format!(" ({:.2}x the offline apply's {r:.0} rows/s)", moved as f64 / copy.as_secs_f64() / r)),
        longest[longest.len() / 2],
        longest[longest.len() - 1],
        cutover.join("\n  "),
        stdout
            .lines()
            .filter(|l| l.starts_with("Moved") || l.contains("proxies reloaded"))
            .collect::<Vec<_>>()
            .join("\n  ")
    ))
}

/// `psql -c OUT` on one server piped into `psql -c IN` on another; returns
/// the rows the second reports.
fn pipe(psql: &std::path::Path, from: u16, out: &str, to: u16, into: &str) -> Result<u64> {
    let conn = |port: u16| format!("host=127.0.0.1 port={port} user=app password=app dbname=app");
    let mut source = Command::new(psql)
        .args(["-X", "-q", &conn(from), "-c", out])
        .stdout(Stdio::piped())
        .spawn()?;
    let sink = Command::new(psql)
        .args(["-X", &conn(to), "-c", into])
        .stdin(source.stdout.take().context("psql stdout")?)
        .output()?;
    source.wait()?;
    let text = String::from_utf8_lossy(&sink.stdout);
    if !sink.status.success() {
        bail!(
            "plain copy failed: {text}{}",
            String::from_utf8_lossy(&sink.stderr)
        );
    }
    text.trim()
        .strip_prefix("COPY ")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("psql said {text}"))
}
