//! End-to-end benchmark: pgbench against direct Postgres, Shardline and (when
//! installed) PgBouncer, interleaved in one run, on one local primary.
//!
//! cargo run --release -p shardline-tests --bin shardline-bench -- [--seconds N] [--clients N] [--rounds N]
//!
//! Prints TPS, average latency, the ratio to direct Postgres, and each proxy's
//! CPU seconds per 10k transactions (from /proc, user + system).
//!
//! `SHARDLINE_BENCH_BINARY=path/to/shardline` benchmarks that build of the
//! proxy (e.g. `target/pgo/release/shardline`, from `scripts/pgo-build.sh`)
//! in place of the workspace's release build.
//!
//! `SHARDLINE_BENCH_BASELINE=path/to/shardline` adds another build of the
//! proxy on the same config as target `baseline`, interleaved with this
//! one: what a change costs, in one run.
//!
//! Target `relay` is a bare relay on tokio (`shardline_tests::relay`, run
//! by this program as `shardline-bench --relay CONFIG`): one server
//! connection per client, bytes copied both ways, nothing parsed or
//! pooled. Its CPU is the floor of any proxy that reads and writes through
//! tokio, beside PgBouncer's.
//!
//! `--instructions N` also counts each proxy's user-space instructions per
//! transaction under callgrind (valgrind), N transactions per client and
//! mode: a count that does not move with the machine's load, where CPU
//! seconds move by several percent between runs. The kernel's share (the
//! sockets, most of a proxy's CPU) is not in it.

use anyhow::{bail, Context as _, Result};
use shardline::cluster::{free_port, ClusterSpec, LocalCluster, PgBin};
use shardline_tests::callgrind::{self, Launch, Reaped};
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

struct Args {
    seconds: u32,
    clients: u32,
    rounds: u32,
    scale: u32,
    instructions: u32,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        seconds: 10,
        clients: 16,
        rounds: 2,
        scale: 10,
        instructions: 0,
    };
    shardline_tests::numeric_flags(
        &mut [
            ("--seconds", &mut a.seconds),
            ("--clients", &mut a.clients),
            ("--rounds", &mut a.rounds),
            ("--scale", &mut a.scale),
            ("--instructions", &mut a.instructions),
        ],
        "shardline-bench [--seconds 10] [--clients 16] [--rounds 2] [--scale 10] [--instructions 0]",
    )?;
    Ok(a)
}

/// A benchmark target: where pgbench connects and which process to charge CPU to.
struct Target {
    name: &'static str,
    port: u16,
    pid: Option<u32>,
    /// How to start another instance of the proxy (for `--instructions`).
    launch: Option<Launch>,
}

#[derive(Default, Clone)]
struct Sample {
    tps: Vec<f64>,
    latency_ms: Vec<f64>,
    cpu_per_10k: Vec<f64>,
    /// The user-space part of `cpu_per_10k` (the rest is the kernel's).
    user_per_10k: Vec<f64>,
    failed: bool,
    note: String,
}

/// The Shardline build benchmarked: `SHARDLINE_BENCH_BINARY`, else the
/// workspace's release build.
fn proxy_binary() -> Result<std::path::PathBuf> {
    match std::env::var_os("SHARDLINE_BENCH_BINARY") {
        Some(path) => Ok(path.into()),
        None => shardline_tests::shardline_binary(),
    }
}

fn field(out: &str, prefix: &str) -> Option<f64> {
    out.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.split_whitespace().next()?.split('/').next()?.parse().ok())
}

fn main() -> Result<()> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if let [flag, config] = argv.as_slice() {
        if flag == "--relay" {
            return shardline_tests::relay::run(std::path::Path::new(config));
        }
    }
    let args = parse_args()?;
    let bin = PgBin::find()?;
    println!(
        "starting a Postgres primary and two streaming replicas (scale {}) ...",
        args.scale
    );
    let cluster = LocalCluster::start(&ClusterSpec {
        shards: 1,
        replicas_per_shard: 2,
    })?;
    let primary = cluster.primary(0).clone();
    cluster.psql(
        &primary,
        "postgres",
        "CREATE ROLE app LOGIN PASSWORD 'app'; CREATE DATABASE app OWNER app;",
    )?;
    let pgbench = |port: u16, extra: &[&str]| -> Result<String> {
        let out = Command::new(bin.bindir.join("pgbench"))
            .env("PGPASSWORD", "app")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "app"])
            .args(extra)
            .arg("app")
            .output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!("{text}");
        }
        Ok(text)
    };
    pgbench(primary.port, &["-i", "-q", "-s", &args.scale.to_string()])?;
    cluster.wait_replicas_caught_up(Duration::from_secs(120))?;
    let replicas: Vec<_> = cluster
        .nodes
        .iter()
        .filter(|n| !n.is_primary)
        .cloned()
        .collect();

    let pool_size = args.clients;
    let mut targets = vec![Target {
        name: "direct",
        port: primary.port,
        pid: None,
        launch: None,
    }];
    let mut children: Vec<Reaped> = Vec::new();

    // Shardline, release build, as a separate process.
    let shardline = proxy_binary()?;
    let sl_port = free_port()?;
    let sl_cfg = cluster.root.join("bench-shardline.toml");
    std::fs::write(
        &sl_cfg,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{sl_port}\"\npool_mode = \"transaction\"\n[pool]\nsize = {pool_size}\n\
             [[users]]\nname = \"app\"\npassword = \"app\"\nauth = \"md5\"\ndatabase = \"app\"\n\
             [[shards]]\nname = \"s0\"\nprimary = {{ host = \"127.0.0.1\", port = {} }}\n",
            primary.port
        ),
    )?;
    let listen = callgrind::shardline_listen;
    // A proxy on `config` (listening on `port`), started and added.
    let mut start = |name: &'static str,
                     program: &std::path::Path,
                     config: std::path::PathBuf,
                     port: u16|
     -> Result<()> {
        let mut cmd = Command::new(program);
        cmd.arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::inherit());
        shardline_tests::own_session(&mut cmd);
        let child = cmd.spawn()?;
        targets.push(Target {
            name,
            port,
            pid: Some(child.id()),
            launch: Some(Launch {
                program: program.to_path_buf(),
                config_flag: Some("--config"),
                config,
                port_line: listen(port),
                port_text: listen,
                ids: None,
                connect_fn: Some(callgrind::SHARDLINE_CONNECT),
            }),
        });
        children.push(Reaped(child));
        Ok(())
    };
    start("shardline", &shardline, sl_cfg.clone(), sl_port)?;

    // Another build of Shardline on the same config, interleaved with this
    // one (SHARDLINE_BENCH_BASELINE=path/to/shardline): what a change
    // costs, measured in the same run.
    if let Some(baseline) = std::env::var_os("SHARDLINE_BENCH_BASELINE") {
        let port = free_port()?;
        let cfg = cluster.root.join("bench-baseline.toml");
        std::fs::write(
            &cfg,
            std::fs::read_to_string(&sl_cfg)?.replace(&listen(sl_port), &listen(port)),
        )?;
        start("baseline", std::path::Path::new(&baseline), cfg, port)?;
    }

    // Shardline with the two replicas: reads go to them.
    let rw_port = free_port()?;
    let rw_cfg = cluster.root.join("bench-shardline-replicas.toml");
    let replica_list: Vec<String> = replicas
        .iter()
        .map(|r| format!("{{ host = \"127.0.0.1\", port = {} }}", r.port))
        .collect();
    std::fs::write(
        &rw_cfg,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{rw_port}\"\npool_mode = \"transaction\"\n[pool]\nsize = {pool_size}\n\
             [[users]]\nname = \"app\"\npassword = \"app\"\nauth = \"md5\"\ndatabase = \"app\"\n\
             [[shards]]\nname = \"s0\"\nprimary = {{ host = \"127.0.0.1\", port = {} }}\nreplicas = [{}]\n",
            primary.port,
            replica_list.join(", ")
        ),
    )?;
    let rw_log = cluster.root.join("bench-shardline-replicas.log");
    let mut cmd = Command::new(&shardline);
    cmd.arg("--config")
        .arg(&rw_cfg)
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&rw_log)?);
    shardline_tests::own_session(&mut cmd);
    let mut rw_child = Reaped(cmd.spawn()?);
    targets.push(Target {
        name: "shardline+replicas",
        port: rw_port,
        pid: Some(rw_child.0.id()),
        launch: Some(Launch {
            program: shardline.clone(),
            config_flag: Some("--config"),
            config: rw_cfg.clone(),
            port_line: listen(rw_port),
            port_text: listen,
            ids: None,
            connect_fn: Some(callgrind::SHARDLINE_CONNECT),
        }),
    });

    // PgBouncer, if installed, with the same pool size and mode.
    let pgbouncer = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    match pgbouncer {
        Some(pgb) => {
            let port = free_port()?;
            let dir = cluster.root.join("pgbouncer");
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("userlist.txt"), "\"app\" \"app\"\n")?;
            std::fs::write(
                dir.join("pgbouncer.ini"),
                format!(
                    "[databases]\napp = host=127.0.0.1 port={} dbname=app\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
                     unix_socket_dir =\nauth_type = md5\nauth_file = {}/userlist.txt\npool_mode = transaction\n\
                     default_pool_size = {pool_size}\nmax_client_conn = 1000\nlogfile = {}/pgbouncer.log\n",
                    primary.port,
                    dir.display(),
                    dir.display()
                ),
            )?;
            let mut cmd = Command::new(pgb);
            cmd.arg(dir.join("pgbouncer.ini")).stdout(Stdio::null()).stderr(Stdio::null());
            // PgBouncer refuses to run as root.
            let ids = postgres_ids();
            if let Some((uid, gid)) = ids {
                use std::os::unix::process::CommandExt;
                let _ = Command::new("chown").arg("-R").arg(format!("{uid}:{gid}")).arg(&dir).status();
                cmd.uid(uid).gid(gid);
            }
            shardline_tests::own_session(&mut cmd);
            let child = cmd.spawn()?;
            let listen_port = |port: u16| format!("listen_port = {port}");
            targets.push(Target {
                name: "pgbouncer",
                port,
                pid: Some(child.id()),
                launch: Some(Launch {
                    program: pgb.into(),
                    config_flag: None,
                    config: dir.join("pgbouncer.ini"),
                    port_line: listen_port(port),
                    port_text: listen_port,
                    ids,
                    // Stripped: its login is in the count when its pool grows.
                    connect_fn: None,
                }),
            });
            children.push(Reaped(child));
        }
        None => println!("PgBouncer not installed (scripts/setup-debian.sh --with-pgbouncer); comparing with direct only"),
    }

    // The floor of a proxy on tokio: this program as a bare relay.
    let relay_port = free_port()?;
    let relay_cfg = cluster.root.join("bench-relay.conf");
    std::fs::write(
        &relay_cfg,
        shardline_tests::relay::config(relay_port, primary.port),
    )?;
    let this = std::env::current_exe()?;
    let mut cmd = Command::new(&this);
    cmd.arg("--relay").arg(&relay_cfg).stderr(Stdio::inherit());
    shardline_tests::own_session(&mut cmd);
    let child = cmd.spawn()?;
    targets.push(Target {
        name: "relay",
        port: relay_port,
        pid: Some(child.id()),
        launch: Some(Launch {
            program: this,
            config_flag: Some("--relay"),
            config: relay_cfg,
            port_line: shardline_tests::relay::listen_line(relay_port),
            port_text: shardline_tests::relay::listen_line,
            ids: None,
            connect_fn: None,
        }),
    });
    children.push(Reaped(child));
    std::thread::sleep(Duration::from_millis(500));
    for t in &targets {
        pgbench(t.port, &["-n", "-S", "-T", "1", "-c", "2"])
            .with_context(|| format!("warming up {}", t.name))?;
    }

    // A read of 100 rows (about 10 KB) per transaction: the reply's rows,
    // not its round trip, are most of the proxy's work.
    let range = cluster.root.join("bench-range.sql");
    std::fs::write(
        &range,
        "\\set a random(1, 100000 * :scale - 99)\n\
         SELECT * FROM pgbench_accounts WHERE aid BETWEEN :a AND :a + 99;\n",
    )?;
    let range = range.to_string_lossy().into_owned();
    let all_modes: [(&str, &[&str]); 6] = [
        ("select-only simple", &["-S", "-M", "simple"]),
        ("select-only extended", &["-S", "-M", "extended"]),
        ("select-only prepared", &["-S", "-M", "prepared"]),
        ("read/write (tpcb-like)", &["-M", "simple"]),
        // BEGIN, each statement and COMMIT as units of the extended
        // protocol, as drivers send a transaction's statements.
        ("read/write extended", &["-M", "extended"]),
        ("range read, 100 rows", &["-f", &range, "-M", "extended"]),
    ];
    // `SHARDLINE_BENCH_MODES=read/write,range` runs only the modes whose
    // names contain one of these.
    let only = std::env::var("SHARDLINE_BENCH_MODES").unwrap_or_default();
    let modes: Vec<(&str, &[&str])> = all_modes
        .into_iter()
        .filter(|(m, _)| only.is_empty() || only.split(',').any(|o| m.contains(o.trim())))
        .collect();
    let mut results: BTreeMap<(usize, usize), Sample> = BTreeMap::new();
    // Each proxy's resident memory before any run (KiB).
    let rss_start: Vec<Option<u64>> = targets
        .iter()
        .map(|t| t.pid.map(|p| shardline_tests::memory_kib(p).1))
        .collect();
    let secs = args.seconds.to_string();
    let clients = args.clients.to_string();
    for round in 1..=args.rounds {
        for (mi, (mode, flags)) in modes.iter().enumerate() {
            for (ti, t) in targets.iter().enumerate() {
                let mut a = vec!["-n", "-T", secs.as_str(), "-c", clients.as_str(), "-j", "2"];
                a.extend_from_slice(flags);
                let cpu0 = t.pid.and_then(shardline_tests::cpu_split);
                let run = pgbench(t.port, &a);
                let cpu1 = t.pid.and_then(shardline_tests::cpu_split);
                let s = results.entry((mi, ti)).or_default();
                match run {
                    Ok(out) => {
                        let tps = field(&out, "tps = ").unwrap_or(0.0);
                        let lat = field(&out, "latency average = ").unwrap_or(0.0);
                        let txns = field(&out, "number of transactions actually processed: ")
                            .unwrap_or(0.0);
                        s.tps.push(tps);
                        s.latency_ms.push(lat);
                        if let (Some((ua, sa)), Some((ub, sb))) = (cpu0, cpu1) {
                            if txns > 0.0 {
                                let per_10k = |s: f64| s / (txns / 10_000.0);
                                s.cpu_per_10k.push(per_10k(ub + sb - ua - sa));
                                s.user_per_10k.push(per_10k(ub - ua));
                            }
                        }
                        println!("round {round} {mode:<24} {:<10} {tps:>10.0} tps", t.name);
                    }
                    Err(e) => {
                        s.failed = true;
                        s.note = e
                            .to_string()
                            .lines()
                            .find(|l| l.contains("error") || l.contains("ERROR"))
                            .unwrap_or("failed")
                            .to_string();
                        println!("round {round} {mode:<24} {:<10} failed: {}", t.name, s.note);
                    }
                }
            }
        }
    }

    // Idle again: what each proxy keeps after the load.
    std::thread::sleep(Duration::from_secs(3));
    let rss_after: Vec<Option<(u64, u64)>> = targets
        .iter()
        .map(|t| t.pid.map(shardline_tests::memory_kib))
        .collect();
    let rss_split: Vec<Option<(u64, u64, u64)>> = targets
        .iter()
        .map(|t| t.pid.map(shardline_tests::memory_split_kib))
        .collect();
    use shardline_tests::median;
    println!();
    println!(
        "pgbench, {} clients, {} s x {} rounds interleaved, scale {}, pool size {pool_size}, {} cores",
        args.clients,
        args.seconds,
        args.rounds,
        args.scale,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!();
    println!("Medians of the rounds.");
    println!();
    println!(
        "| mode | target | TPS | avg latency (ms) | ratio to direct | proxy CPU s / 10k txn | of which user space |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for (mi, (mode, _)) in modes.iter().enumerate() {
        let direct = results
            .get(&(mi, 0))
            .map(|s| median(&s.tps))
            .unwrap_or(f64::NAN);
        for (ti, t) in targets.iter().enumerate() {
            let s = results.get(&(mi, ti)).cloned().unwrap_or_default();
            if s.failed {
                println!(
                    "| {mode} | {} | fails | | | ({}) | |",
                    t.name,
                    s.note.replace('|', "/")
                );
                continue;
            }
            let tps = median(&s.tps);
            let (cpu, user) = if t.pid.is_some() {
                (
                    format!("{:.3}", median(&s.cpu_per_10k)),
                    format!("{:.3}", median(&s.user_per_10k)),
                )
            } else {
                ("-".into(), "-".into())
            };
            println!(
                "| {mode} | {} | {tps:.0} | {:.3} | {:.2} | {cpu} | {user} |",
                t.name,
                median(&s.latency_ms),
                tps / direct
            );
        }
    }

    println!();
    println!("| proxy | RSS at start (MiB) | peak RSS (MiB) | RSS idle after the runs (MiB) |");
    println!("|---|---:|---:|---:|");
    let mib = |kib: u64| kib as f64 / 1024.0;
    for ((t, start), after) in targets.iter().zip(&rss_start).zip(&rss_after) {
        if let (Some(start), Some((peak, idle))) = (start, after) {
            println!(
                "| {} | {:.1} | {:.1} | {:.1} |",
                t.name,
                mib(*start),
                mib(*peak),
                mib(*idle)
            );
        }
    }
    println!();
    println!("Where the idle RSS is (MiB): anonymous memory (heap, stacks), the program's own");
    println!("file pages (code, read-only data: clean, shared with the page cache) and shared libraries.");
    println!();
    println!("| proxy | anonymous | program file pages | shared libraries |");
    println!("|---|---:|---:|---:|");
    for (t, split) in targets.iter().zip(&rss_split) {
        if let Some((anon, program, libs)) = split {
            println!(
                "| {} | {:.1} | {:.1} | {:.1} |",
                t.name,
                mib(*anon),
                mib(*program),
                mib(*libs)
            );
        }
    }
    if let Some((found, listed)) = shardline_tests::hot_code_found(&shardline) {
        // The code order behind the program file pages (proxy/build.rs).
        println!();
        println!(
            "code order: {found} of the {listed} functions proxy/hot-code.txt lists are in this build{}",
            if found * 10 < listed * 9 {
                " (stale: scripts/hot-code.sh writes it again)"
            } else {
                ""
            }
        );
    }
    if let Some(packed) = shardline_tests::relocations_packed(&shardline) {
        println!(
            "relocations: {}",
            if packed {
                "packed (DT_RELR)"
            } else {
                "not packed: the loader reads about 500 KB of them at start (proxy/build.rs: glibc before 2.36, or another linker)"
            }
        );
    }

    // Where the reads went: transactions committed per node during one more
    // select-only run through Shardline with replicas.
    let commits = |n: &shardline::cluster::NodeInfo| -> f64 {
        cluster
            .psql(
                n,
                "postgres",
                "SELECT sum(xact_commit) FROM pg_stat_database",
            )
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(f64::NAN)
    };
    let nodes: Vec<_> = std::iter::once(primary.clone())
        .chain(replicas.iter().cloned())
        .collect();
    let before: Vec<f64> = nodes.iter().map(&commits).collect();
    let out = pgbench(
        rw_port,
        &[
            "-n",
            "-S",
            "-M",
            "simple",
            "-T",
            secs.as_str(),
            "-c",
            clients.as_str(),
            "-j",
            "2",
        ],
    )?;
    let after: Vec<f64> = nodes.iter().map(&commits).collect();
    println!();
    println!(
        "reads through shardline+replicas (select-only simple, {:.0} tps): transactions per node",
        field(&out, "tps = ").unwrap_or(0.0)
    );
    for (i, n) in nodes.iter().enumerate() {
        let role = if i == 0 { "primary" } else { "replica" };
        println!("  {role} 127.0.0.1:{}: {:.0}", n.port, after[i] - before[i]);
    }
    // The router's own counters, logged by the proxy when it stops.
    unsafe { libc::kill(rw_child.0.id() as i32, libc::SIGTERM) };
    let _ = rw_child.0.wait();
    let log = std::fs::read_to_string(&rw_log).unwrap_or_default();
    match log.lines().find(|l| l.contains("router statistics")) {
        Some(line) => println!(
            "classification: {}",
            line.split("router statistics")
                .nth(1)
                .unwrap_or(line)
                .trim()
        ),
        None => println!("classification: no statistics logged"),
    }
    read_your_writes_mix(&cluster, &pgbench, &rw_cfg, &replicas, &args)?;
    if args.instructions > 0 {
        instruction_counts(&cluster, &pgbench, &targets, &modes, &args)?;
    }
    drop(children);
    drop(cluster);
    Ok(())
}

/// One user reading and writing (90% select-only, 10% simple-update
/// transactions, read-your-writes `lsn`) through a fresh Shardline with the
/// replicas, while a checker of the same user writes a counter and reads
/// it back on the next transaction: which share of the reads the replicas
/// serve, and whether any read missed the user's own write (the checker's
/// read divides by zero then, and pgbench aborts that client).
fn read_your_writes_mix(
    cluster: &LocalCluster,
    pgbench: &(dyn Fn(u16, &[&str]) -> Result<String> + Sync),
    rw_cfg: &std::path::Path,
    replicas: &[shardline::cluster::NodeInfo],
    args: &Args,
) -> Result<()> {
    let primary = cluster.primary(0).clone();
    cluster.psql(
        &primary,
        "app",
        "DROP TABLE IF EXISTS ryw_check; CREATE TABLE ryw_check (id int PRIMARY KEY, v bigint NOT NULL); \
         INSERT INTO ryw_check SELECT g, 0 FROM generate_series(0, 63) g; ALTER TABLE ryw_check OWNER TO app;",
    )?;
    cluster.wait_replicas_caught_up(Duration::from_secs(60))?;
    let checker = cluster.root.join("ryw-checker.sql");
    std::fs::write(
        &checker,
        "UPDATE ryw_check SET v = v + 1 WHERE id = :client_id RETURNING v AS expected \\gset\n\
         SELECT 1 / (v >= :expected)::int FROM ryw_check WHERE id = :client_id;\n",
    )?;
    // Reads of pgbench_accounts by its key, per replica (statistics are
    // flushed when a server connection ends: read with no proxy running).
    let index_scans = |n: &shardline::cluster::NodeInfo| -> f64 {
        cluster
            .psql(
                n,
                "app",
                "SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = 'pgbench_accounts_pkey'",
            )
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(f64::NAN)
    };
    std::thread::sleep(Duration::from_millis(500));
    let before: Vec<f64> = replicas.iter().map(index_scans).collect();
    let port = free_port()?;
    let cfg = cluster.root.join("bench-shardline-ryw.toml");
    let text = std::fs::read_to_string(rw_cfg)?;
    let listen = text
        .lines()
        .find(|l| l.starts_with("listen"))
        .context("listen line")?;
    std::fs::write(
        &cfg,
        text.replace(listen, &format!("listen = \"127.0.0.1:{port}\"")),
    )?;
    let mut cmd = Command::new(proxy_binary()?);
    cmd.arg("--config")
        .arg(&cfg)
        .env(
            "RUST_LOG",
            std::env::var("SHARDLINE_BENCH_LOG").unwrap_or("warn".into()),
        )
        .stderr(Stdio::inherit());
    shardline_tests::own_session(&mut cmd);
    let mut proxy = Reaped(cmd.spawn()?);
    std::thread::sleep(Duration::from_millis(1500));
    let secs = args.seconds.to_string();
    let clients = args.clients.to_string();
    let checker_arg = checker.display().to_string();
    let sampling = std::sync::atomic::AtomicBool::new(true);
    let (mix, check, lags) = std::thread::scope(|s| {
        // The replicas' replay lag meanwhile, from the primary, every 100 ms.
        let lags = s.spawn(|| {
            let mut ms: Vec<f64> = Vec::new();
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(v) = cluster.psql(
                    &primary,
                    "postgres",
                    "SELECT coalesce(max(extract(epoch FROM replay_lag) * 1000), 0) FROM pg_stat_replication",
                ) {
                    if let Ok(v) = v.trim().parse() {
                        ms.push(v);
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            ms
        });
        let check = s.spawn(|| {
            pgbench(
                port,
                &[
                    "-n",
                    "-f",
                    &checker_arg,
                    "-M",
                    "simple",
                    "-T",
                    &secs,
                    "-c",
                    "2",
                ],
            )
        });
        let mix = pgbench(
            port,
            &[
                "-n",
                "-b",
                "select-only@9",
                "-b",
                "simple-update@1",
                "-M",
                "simple",
                "-T",
                &secs,
                "-c",
                &clients,
                "-j",
                "2",
            ],
        );
        let check = check.join().expect("checker thread");
        sampling.store(false, std::sync::atomic::Ordering::Relaxed);
        (mix, check, lags.join().expect("sampler thread"))
    });
    unsafe { libc::kill(proxy.0.id() as i32, libc::SIGTERM) };
    let _ = proxy.0.wait();
    std::thread::sleep(Duration::from_millis(500));
    let after: Vec<f64> = replicas.iter().map(index_scans).collect();
    let mix = mix?;
    // Per script: "SQL script 1: <builtin: select only>", then a line
    // " - 12345 transactions (90.1% of total, tps = ...)".
    let lines: Vec<&str> = mix.lines().collect();
    let per_script: Vec<f64> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("SQL script"))
        .filter_map(|(i, _)| {
            let line = lines[i + 1..]
                .iter()
                .find(|l| l.contains(" transactions ("))?;
            line.trim_start_matches([' ', '-'])
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    let reads = per_script.first().copied().unwrap_or(f64::NAN);
    let writes = per_script.get(1).copied().unwrap_or(f64::NAN);
    let on_replicas: f64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
    println!();
    println!(
        "read-your-writes mix through shardline+replicas (one user, {} clients, 90% select-only, 10% simple-update, {} s):",
        args.clients, args.seconds
    );
    println!(
        "  {:.0} tps; {reads:.0} reads, {writes:.0} writes; replicas served {on_replicas:.0} reads ({:.1}%)",
        field(&mix, "tps = ").unwrap_or(0.0),
        100.0 * on_replicas / reads
    );
    let mut lags = lags;
    lags.sort_by(f64::total_cmp);
    if !lags.is_empty() {
        println!(
            "  replicas' replay lag meanwhile (pg_stat_replication, every 100 ms): median {:.1} ms, max {:.1} ms",
            lags[lags.len() / 2],
            lags[lags.len() - 1]
        );
    }
    match check {
        Ok(out) => println!(
            "  checker (2 clients writing then reading their counter): {:.0} transactions, 0 stale reads",
            field(&out, "number of transactions actually processed: ").unwrap_or(0.0)
        ),
        Err(e) => println!(
            "  checker FAILED (a read missed its user's write, or an error): {}",
            e.to_string()
                .lines()
                .find(|l| l.contains("aborted") || l.contains("ERROR"))
                .unwrap_or("failed")
        ),
    }
    Ok(())
}

/// User-space instructions per transaction of each proxy in each mode,
/// each counted on an instance of its own under callgrind
/// (`callgrind::per_transaction`).
fn instruction_counts(
    cluster: &LocalCluster,
    pgbench: &dyn Fn(u16, &[&str]) -> Result<String>,
    targets: &[Target],
    modes: &[(&str, &[&str])],
    args: &Args,
) -> Result<()> {
    if !callgrind::available() {
        return Ok(());
    }
    let runs: Vec<(&str, Vec<&str>)> = modes.iter().map(|(m, f)| (*m, f.to_vec())).collect();
    // Per measured target: its name and each mode's count.
    let mut counts: Vec<(&str, Vec<Option<f64>>)> = Vec::new();
    for (ti, t) in targets.iter().enumerate() {
        let Some(l) = &t.launch else { continue };
        let dir = cluster.root.join(format!("callgrind-{ti}"));
        let each = callgrind::per_transaction(
            &dir,
            t.name,
            l,
            &runs,
            pgbench,
            args.clients,
            args.instructions,
        )?;
        counts.push((t.name, each));
    }
    println!();
    println!(
        "user-space instructions per transaction (callgrind, {} transactions per client, {} clients)",
        args.instructions, args.clients
    );
    let names: Vec<&str> = counts.iter().map(|(n, _)| *n).collect();
    println!("| mode | {} |", names.join(" | "));
    println!("|---|{}", "---:|".repeat(names.len()));
    for (mi, (mode, _)) in modes.iter().enumerate() {
        let cells: Vec<String> = counts
            .iter()
            .map(|(_, each)| each[mi].map_or("fails".into(), |n| format!("{n:.0}")))
            .collect();
        println!("| {mode} | {} |", cells.join(" | "));
    }
    Ok(())
}

fn postgres_ids() -> Option<(u32, u32)> {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")?;
    if !is_root {
        return None;
    }
    let id = |f: &str| -> Option<u32> {
        String::from_utf8_lossy(
            &Command::new("id")
                .args([f, "postgres"])
                .output()
                .ok()?
                .stdout,
        )
        .trim()
        .parse()
        .ok()
    };
    Some((id("-u")?, id("-g")?))
}
