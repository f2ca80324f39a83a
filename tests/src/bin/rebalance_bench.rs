//! Rebalance benchmark: rows per second `shardline-rebalance apply` moves
//! when a third shard joins two, end to end (counting, copying, verifying
//! every range, deleting), for narrow and for wide (1 KB) rows; against a
//! plain binary COPY of the same rows between the same servers (psql piped
//! into psql, no verification) taken in the same run.
//!
//! cargo run --release -p shardline-tests --bin shardline-rebalance-bench -- [--narrow-rows N] [--wide-rows N]

use anyhow::{bail, Context as _, Result};
use shardline::cluster::{LocalCluster, PgBin};
use shardline_config::Config;
use shardline_rebalance::layout::Placement;
use std::process::{Command, Stdio};
use std::time::Instant;

struct Args {
    narrow_rows: u32,
    wide_rows: u32,
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
    };
    shardline_tests::numeric_flags(
        &mut [
            ("--narrow-rows", &mut args.narrow_rows),
            ("--wide-rows", &mut args.wide_rows),
        ],
        "shardline-rebalance-bench [--narrow-rows 1000000] [--wide-rows 100000]",
    )?;
    let bin = PgBin::find()?;
    println!("starting three Postgres servers ...");
    let cluster = shardline_tests::bench_cluster(3)?;
    for s in 0..3 {
        let schema = format!(
            "SET ROLE app; {NARROW}; {WIDE}; {}; {};",
            NARROW.replace("narrow", "narrow_plain"),
            WIDE.replace("wide", "wide_plain")
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
    for (table, label, rows, select) in cases {
        let old = config(&cluster, 2, table);
        let new = config(&cluster, 3, table);
        let placement = Placement::new(
            &Config::from_toml(&old, "old.toml").map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        let spec = &placement.tables[0];
        println!("loading {rows} {label} onto s0 and s1 ...");
        for s in 0..2 {
            cluster.psql(
                cluster.primary(s),
                "app",
                &format!(
                    "SET ROLE app; INSERT INTO {table} SELECT {select} FROM (SELECT g::int8 AS id FROM generate_series(1, {rows}) g) x WHERE {} = {s}; VACUUM ANALYZE {table};",
                    placement.owner_sql(spec)
                ),
            )?;
        }
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
    Ok(())
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
