//! Sharding benchmark: two shards behind Shardline against one direct
//! Postgres holding all the rows, in one run.
//!
//! cargo run --release -p shardline-tests --bin shardline-shard-bench -- [--seconds N] [--clients N] [--rows N] [--rounds N]
//!
//! - point query by key (pgbench custom script, prepared, simple and
//!   extended), TPS and average latency, with the ratio to direct, and the
//!   proxy's CPU per 10k transactions against the same proxy with a
//!   one-shard config in front of the direct server, at full speed and
//!   again with both proxies at one rate (pgbench -R); each mode runs
//!   `--rounds` times, the three targets interleaved, and the medians are
//!   shown (the proxy's CPU per transaction moves with throughput and with
//!   what else the machine runs: one run is not enough to tell 5%);
//! - with `--instructions N`, each proxy's user-space instructions per
//!   transaction under callgrind (N transactions per client and mode): the
//!   figure that tells what sharding costs the proxy without the
//!   machine's noise;
//! - multi-row INSERT (1,000 rows per statement, split by shard) and COPY
//!   (split row by row) in rows per second, against the same into the
//!   direct server.

use anyhow::{bail, Result};
use shardline::cluster::{free_port, PgBin};
use std::process::Command;
use std::time::Instant;

struct Args {
    seconds: u32,
    clients: u32,
    rows: u32,
    rounds: u32,
    instructions: u32,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        seconds: 10,
        clients: 16,
        rows: 200_000,
        rounds: 3,
        instructions: 0,
    };
    shardline_tests::numeric_flags(
        &mut [
            ("--seconds", &mut a.seconds),
            ("--clients", &mut a.clients),
            ("--rows", &mut a.rows),
            ("--rounds", &mut a.rounds),
            ("--instructions", &mut a.instructions),
        ],
        "shardline-shard-bench [--seconds 10] [--clients 16] [--rows 200000] [--rounds 3] [--instructions 0]",
    )?;
    a.rounds = a.rounds.max(1);
    Ok(a)
}

const SCHEMA: &str = "CREATE TABLE kv (id bigint PRIMARY KEY, v text NOT NULL);";

fn main() -> Result<()> {
    let args = parse_args()?;
    let bin = PgBin::find()?;
    println!("starting three Postgres servers: two shards and one direct ...");
    // s0 and s1 are the shards; s2 is the direct server holding every row.
    let cluster = shardline_tests::bench_cluster(3)?;
    let direct = cluster.primary(2).port;
    let (port, mut child, sharded_cfg) = start_proxy(
        &cluster,
        "shard-bench",
        args.clients,
        &[cluster.primary(0).port, cluster.primary(1).port],
        "[[sharding.tables]]\nname = \"kv\"\ncolumn = \"id\"\n",
    )?;
    // The same proxy with a one-shard config, in front of the direct
    // server: what sharding itself costs on a point query.
    let (one_port, mut one, one_cfg) =
        start_proxy(&cluster, "shard-bench-one", args.clients, &[direct], "")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let proxies = Proxies {
        sharded: (port, child.id()),
        one_shard: (one_port, one.id()),
        configs: [(port, sharded_cfg), (one_port, one_cfg)],
    };
    let result = rt.block_on(run(&args, &bin, &cluster, &proxies, direct));
    for c in [&mut child, &mut one] {
        let _ = c.kill();
        let _ = c.wait();
    }
    result
}

/// A Shardline process (its port and child) in front of `primaries`, one
/// shard each (s0, s1, ...), with `extra` TOML appended.
fn start_proxy(
    cluster: &shardline::cluster::LocalCluster,
    name: &str,
    pool: u32,
    primaries: &[u16],
    extra: &str,
) -> Result<(u16, std::process::Child, std::path::PathBuf)> {
    let port = free_port()?;
    let mut text = format!(
        "[proxy]\nlisten = \"127.0.0.1:{port}\"\n[pool]\nsize = {pool}\n\
         [[users]]\nname = \"app\"\npassword = \"app\"\nauth = \"md5\"\ndatabase = \"app\"\n"
    );
    for (i, p) in primaries.iter().enumerate() {
        text.push_str(&format!(
            "[[shards]]\nname = \"s{i}\"\nprimary = {{ host = \"127.0.0.1\", port = {p} }}\n"
        ));
    }
    text.push_str(extra);
    let cfg = cluster.root.join(format!("{name}.toml"));
    std::fs::write(&cfg, text)?;
    Ok((port, shardline_tests::spawn_bench_proxy(&cfg)?, cfg))
}

/// The two Shardline processes measured: port and pid.
struct Proxies {
    sharded: (u16, u32),
    one_shard: (u16, u32),
    /// Each one's port and config (sharded first), to start another
    /// instance under callgrind.
    configs: [(u16, std::path::PathBuf); 2],
}

/// Rows per second for the multi-row INSERT and COPY loads of `rows` rows.
async fn load(port: u16, rows: u32, first: u32) -> Result<(f64, f64)> {
    let c = shardline_tests::connect_app(port).await?;
    let started = Instant::now();
    let mut k = first;
    while k < first + rows {
        let end = (k + 1000).min(first + rows);
        let values: Vec<String> = (k..end).map(|i| format!("({i}, 'value {i}')")).collect();
        c.batch_execute(&format!(
            "INSERT INTO kv (id, v) VALUES {}",
            values.join(",")
        ))
        .await?;
        k = end;
    }
    let insert = rows as f64 / started.elapsed().as_secs_f64();
    use futures_util::SinkExt;
    let started = Instant::now();
    let sink = c.copy_in("COPY kv (id, v) FROM STDIN").await?;
    futures_util::pin_mut!(sink);
    let mut buf = String::new();
    for i in first + rows..first + 2 * rows {
        buf.push_str(&format!("{i}\tvalue {i}\n"));
        if buf.len() > 64 * 1024 {
            sink.send(bytes::Bytes::from(std::mem::take(&mut buf)))
                .await?;
        }
    }
    sink.send(bytes::Bytes::from(buf)).await?;
    let n = sink.finish().await?;
    anyhow::ensure!(n == rows as u64, "COPY reported {n} rows");
    let copy = rows as f64 / started.elapsed().as_secs_f64();
    Ok((insert, copy))
}

async fn run(
    args: &Args,
    bin: &PgBin,
    cluster: &shardline::cluster::LocalCluster,
    proxies: &Proxies,
    direct: u16,
) -> Result<()> {
    let proxy = proxies.sharded.0;
    for port in [proxy, direct] {
        shardline_tests::connect_app(port)
            .await?
            .batch_execute(SCHEMA)
            .await?;
    }
    println!(
        "loading {} rows by multi-row INSERT and {} by COPY into each target ...",
        args.rows, args.rows
    );
    let mut loads = Vec::new();
    for (name, port) in [("direct", direct), ("shardline, 2 shards", proxy)] {
        let (insert, copy) = load(port, args.rows, 0).await?;
        loads.push((name, insert, copy));
    }
    let script = std::env::temp_dir().join(format!("shardline-point-{}.sql", std::process::id()));
    std::fs::write(
        &script,
        format!(
            "\\set id random(0, {})\nSELECT v FROM kv WHERE id = :id;\n",
            2 * args.rows - 1
        ),
    )?;
    // pgbench's output, run against `port` with `extra` arguments.
    let run_pgbench = |port: u16, extra: &[&str]| -> Result<String> {
        let out = Command::new(bin.bindir.join("pgbench"))
            .env("PGPASSWORD", "app")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "app"])
            .args(extra)
            .arg("app")
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if !out.status.success() {
            bail!("pgbench: {text}{}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(text)
    };
    let script_arg = script.to_string_lossy().to_string();
    let (clients, seconds) = (args.clients.to_string(), args.seconds.to_string());
    // TPS and average latency of one timed run (`extra`: e.g. a rate).
    let pgbench_with = |port: u16, mode: &str, extra: &[&str]| -> Result<(f64, f64)> {
        let mut a = vec![
            "-n",
            "-M",
            mode,
            "-c",
            &clients,
            "-j",
            "2",
            "-T",
            &seconds,
            "-f",
            &script_arg,
        ];
        a.extend_from_slice(extra);
        let text = run_pgbench(port, &a)?;
        let field = |prefix: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        Ok((field("tps = "), field("latency average = ")))
    };
    println!();
    println!(
        "point query by key, {} clients, {} s x {} rounds interleaved, medians (direct: one server holding every row)",
        args.clients, args.seconds, args.rounds
    );
    println!("| mode | direct TPS | Shardline TPS (ratio) | latency ms direct / Shardline | Shardline one-shard config TPS | proxy CPU s / 10k txn, 2 shards / one shard |");
    println!("|---|---:|---:|---:|---:|---:|");
    // Proxy CPU seconds per 10k transactions of one run through `proxy`.
    let through_with =
        |(port, pid): (u16, u32), mode: &str, extra: &[&str]| -> Result<(f64, f64, f64)> {
            let before = shardline_tests::cpu_seconds(pid).unwrap_or(0.0);
            let (tps, latency) = pgbench_with(port, mode, extra)?;
            let used = shardline_tests::cpu_seconds(pid).unwrap_or(0.0) - before;
            let txns = tps * args.seconds as f64;
            Ok((tps, latency, used / (txns / 10_000.0).max(1e-9)))
        };
    // Per mode: the rate both proxies ran at, and each one's CPU there.
    let mut same_rate: Vec<(&str, f64, f64, f64)> = Vec::new();
    use shardline_tests::median;
    for mode in ["prepared", "simple", "extended"] {
        // Per round: direct TPS and latency, sharded TPS, latency and CPU,
        // one-shard TPS and CPU.
        let mut runs: [Vec<f64>; 7] = Default::default();
        for _ in 0..args.rounds {
            let (d, dl) = pgbench_with(direct, mode, &[])?;
            let (s, sl, s_cpu) = through_with(proxies.sharded, mode, &[])?;
            let (o, _, o_cpu) = through_with(proxies.one_shard, mode, &[])?;
            for (v, x) in runs.iter_mut().zip([d, dl, s, sl, s_cpu, o, o_cpu]) {
                v.push(x);
            }
        }
        let [d, dl, s, sl, s_cpu, o, o_cpu] = runs.map(|v| median(&v));
        println!(
            "| {mode} | {d:.0} | {s:.0} ({:.2}) | {dl:.3} / {sl:.3} | {o:.0} | {s_cpu:.3} / {o_cpu:.3} ({:.2}) |",
            s / d.max(1.0),
            s_cpu / o_cpu.max(1e-9)
        );
        // At full speed the two-shard proxy runs at another throughput
        // than the one-shard one (two servers share the cores), and a
        // proxy's CPU per transaction moves with throughput (fewer events
        // per wake-up when slower): both again at one rate, below either's
        // full speed, tell what sharding itself costs.
        let rate = (0.8 * s.min(o)).round().max(1.0);
        let rate_text = format!("{rate:.0}");
        let (mut two, mut one) = (Vec::new(), Vec::new());
        for _ in 0..args.rounds {
            two.push(through_with(proxies.sharded, mode, &["-R", &rate_text])?.2);
            one.push(through_with(proxies.one_shard, mode, &["-R", &rate_text])?.2);
        }
        same_rate.push((mode, rate, median(&two), median(&one)));
    }
    println!();
    println!("the same at one rate (80% of the slower proxy's TPS above), proxy CPU s / 10k txn, medians");
    println!("| mode | rate (TPS) | 2 shards | one shard | ratio |");
    println!("|---|---:|---:|---:|---:|");
    for (mode, rate, two, one) in &same_rate {
        println!(
            "| {mode} | {rate:.0} | {two:.3} | {one:.3} | {:.2} |",
            two / one.max(1e-9)
        );
    }
    if args.instructions > 0 && shardline_tests::callgrind::available() {
        instructions(args, cluster, proxies, &run_pgbench, &script_arg)?;
    }
    let _ = std::fs::remove_file(&script);
    println!();
    println!("loading, rows per second ({} rows each)", args.rows);
    println!("| target | multi-row INSERT (1,000 rows per statement) | COPY FROM STDIN |");
    println!("|---|---:|---:|");
    let base = loads[0];
    for (name, insert, copy) in &loads {
        println!(
            "| {name} | {insert:.0} ({:.2}) | {copy:.0} ({:.2}) |",
            insert / base.1,
            copy / base.2
        );
    }
    Ok(())
}

/// The point query's user-space instructions per transaction through the
/// two-shard and the one-shard proxy, each mode.
fn instructions(
    args: &Args,
    cluster: &shardline::cluster::LocalCluster,
    proxies: &Proxies,
    pgbench: &dyn Fn(u16, &[&str]) -> Result<String>,
    script: &str,
) -> Result<()> {
    let modes = ["prepared", "simple", "extended"];
    let runs: Vec<(&str, Vec<&str>)> = modes
        .iter()
        .map(|m| (*m, vec!["-M", *m, "-f", script]))
        .collect();
    let mut counts = Vec::new();
    for (i, (port, config)) in proxies.configs.iter().enumerate() {
        let launch = shardline_tests::callgrind::Launch {
            program: shardline_tests::shardline_binary()?,
            config_flag: Some("--config"),
            config: config.clone(),
            port_line: shardline_tests::callgrind::shardline_listen(*port),
            port_text: shardline_tests::callgrind::shardline_listen,
            ids: None,
            connect_fn: Some(shardline_tests::callgrind::SHARDLINE_CONNECT),
        };
        counts.push(shardline_tests::callgrind::per_transaction(
            &cluster.root.join(format!("callgrind-{i}")),
            if i == 0 { "two shards" } else { "one shard" },
            &launch,
            &runs,
            pgbench,
            args.clients,
            args.instructions,
        )?);
    }
    println!();
    println!(
        "point query, user-space instructions per transaction (callgrind, {} transactions per client, {} clients)",
        args.instructions, args.clients
    );
    println!("| mode | two shards | one shard | ratio |");
    println!("|---|---:|---:|---:|");
    for (mi, mode) in modes.iter().enumerate() {
        let cell = |c: Option<f64>| c.map_or("fails".to_string(), |n| format!("{n:.0}"));
        let (two, one) = (counts[0][mi], counts[1][mi]);
        let ratio = match (two, one) {
            (Some(t), Some(o)) => format!("{:.3}", t / o),
            _ => "-".into(),
        };
        println!("| {mode} | {} | {} | {ratio} |", cell(two), cell(one));
    }
    Ok(())
}
