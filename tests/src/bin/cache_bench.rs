//! The result cache's benchmark: a read-heavy workload on a cached
//! reference table (a point read by id among 250 rows), through Shardline
//! without and with the cache, and directly on the replica, interleaved in
//! one run on a primary and one streaming replica.
//!
//! cargo run --release -p shardline-tests --bin shardline-cache-bench -- [--seconds 10] [--clients 16] [--rounds 3]
//!
//! Prints per protocol mode (simple, extended, prepared) the median TPS,
//! average latency, the ratio to direct, and each proxy's CPU seconds per
//! 10k statements; then the cache's hits and misses (SHOW CACHE).

use anyhow::{bail, Result};
use shardline::cluster::{free_port, ClusterSpec, LocalCluster, PgBin};
use shardline_tests::callgrind::Reaped;
use shardline_tests::{cpu_seconds, median};
use std::process::Command;
use std::time::Duration;

const ROWS: u32 = 250;

fn main() -> Result<()> {
    let (mut seconds, mut clients, mut rounds) = (10u32, 16u32, 3u32);
    shardline_tests::numeric_flags(
        &mut [
            ("--seconds", &mut seconds),
            ("--clients", &mut clients),
            ("--rounds", &mut rounds),
        ],
        "shardline-cache-bench [--seconds 10] [--clients 16] [--rounds 3]",
    )?;
    let bin = PgBin::find()?;
    println!("starting a Postgres primary and a streaming replica ...");
    let cluster = LocalCluster::start(&ClusterSpec {
        shards: 1,
        replicas_per_shard: 1,
    })?;
    let primary = cluster.primary(0).clone();
    let replica = cluster
        .nodes
        .iter()
        .find(|n| !n.is_primary)
        .expect("a replica")
        .clone();
    cluster.psql(
        &primary,
        "postgres",
        "CREATE ROLE app LOGIN PASSWORD 'app'; CREATE DATABASE app OWNER app;",
    )?;
    cluster.psql(
        &primary,
        "app",
        &format!(
            "CREATE TABLE countries (id int PRIMARY KEY, code text NOT NULL, name text NOT NULL, population bigint);
             INSERT INTO countries SELECT g, 'c' || g, 'Country number ' || g, g * 100000 FROM generate_series(1, {ROWS}) g;
             ALTER TABLE countries OWNER TO app;"
        ),
    )?;
    cluster.wait_replicas_caught_up(Duration::from_secs(60))?;

    let mut children = Vec::new();
    let mut targets: Vec<(&str, u16, Option<u32>)> = vec![("direct (replica)", replica.port, None)];
    for (name, cache) in [
        ("shardline", ""),
        (
            "shardline+cache",
            "[cache]\n[[cache.tables]]\nname = \"countries\"\nttl = \"60s\"\n",
        ),
    ] {
        let port = free_port()?;
        let cfg = cluster
            .root
            .join(format!("{}.toml", name.replace('+', "-")));
        std::fs::write(
            &cfg,
            format!(
                "[proxy]\nlisten = \"127.0.0.1:{port}\"\n[pool]\nsize = {clients}\n\
                 [admin]\nusers = [\"app\"]\n{cache}\
                 [[users]]\nname = \"app\"\npassword = \"app\"\nauth = \"md5\"\ndatabase = \"app\"\n\
                 [[shards]]\nname = \"s0\"\nprimary = {{ host = \"127.0.0.1\", port = {} }}\n\
                 replicas = [{{ host = \"127.0.0.1\", port = {} }}]\n",
                primary.port, replica.port
            ),
        )?;
        let child = shardline_tests::spawn_bench_proxy(&cfg)?;
        targets.push((name, port, Some(child.id())));
        children.push(Reaped(child));
    }
    let script = cluster.root.join("point-read.sql");
    std::fs::write(
        &script,
        format!(
            "\\set id random(1, {ROWS})\nSELECT name, population FROM countries WHERE id = :id;\n"
        ),
    )?;
    // A client program of the Postgres install, logged in as app on `port`.
    let client = |program: &str, port: u16| {
        let mut cmd = Command::new(bin.bindir.join(program));
        cmd.env("PGPASSWORD", "app").args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "app",
        ]);
        cmd
    };
    let pgbench = |port: u16, mode: &str| -> Result<(f64, f64)> {
        let out = client("pgbench", port)
            .arg("-n")
            .args([
                "-c",
                &clients.to_string(),
                "-j",
                "2",
                "-T",
                &seconds.to_string(),
            ])
            .args(["-M", mode, "-f"])
            .arg(&script)
            .arg("app")
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if !out.status.success() {
            bail!("pgbench: {text}{}", String::from_utf8_lossy(&out.stderr));
        }
        let field = |prefix: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        };
        match (field("tps = "), field("latency average = ")) {
            (Some(tps), Some(lat)) => Ok((tps, lat)),
            _ => bail!("no tps in pgbench's output: {text}"),
        }
    };
    println!(
        "{clients} clients, {seconds} s per run, {rounds} rounds, targets interleaved; medians\n"
    );
    println!(
        "{:<9} {:<18} {:>10} {:>10} {:>9} {:>12}",
        "mode", "target", "tps", "lat ms", "vs direct", "CPU s/10k"
    );
    for mode in ["simple", "extended", "prepared"] {
        let mut samples: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> =
            vec![Default::default(); targets.len()];
        for _ in 0..rounds {
            for (i, (_, port, pid)) in targets.iter().enumerate() {
                let before = pid.and_then(cpu_seconds);
                let (tps, lat) = pgbench(*port, mode)?;
                let after = pid.and_then(cpu_seconds);
                samples[i].0.push(tps);
                samples[i].1.push(lat);
                if let (Some(b), Some(a)) = (before, after) {
                    samples[i]
                        .2
                        .push((a - b) / (tps * f64::from(seconds)) * 10_000.0);
                }
            }
        }
        let direct = median(&samples[0].0);
        for (i, (name, _, _)) in targets.iter().enumerate() {
            let tps = median(&samples[i].0);
            let cpu = median(&samples[i].2);
            println!(
                "{:<9} {:<18} {:>10.0} {:>10.3} {:>9.2} {:>12}",
                mode,
                name,
                tps,
                median(&samples[i].1),
                tps / direct,
                if cpu.is_nan() {
                    "-".to_string()
                } else {
                    format!("{cpu:.3}")
                }
            );
        }
    }
    let port = targets[2].1;
    let out = client("psql", port)
        .args(["-d", "shardline"])
        .args(["-c", "SHOW CACHE"])
        .output()?;
    println!(
        "\nshardline+cache, SHOW CACHE:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    drop(children);
    Ok(())
}
