//! Real client programs through the proxy: psql, pgbench (simple, extended,
//! prepared and read/write), and psycopg 3.

use shardline_tests::{psql, run, Env};
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_commands() {
    let env = Env::start().await.unwrap();
    let url = env.url("app", "app");
    let (ok, out) = psql(
        &url,
        &[
            "-c",
            "CREATE TABLE items (id int PRIMARY KEY, name text)",
            "-c",
            "INSERT INTO items SELECT g, 'n' || g FROM generate_series(1, 100) g",
            "-c",
            "\\d items",
            "-c",
            "\\dt",
            "-c",
            "SELECT count(*) AS n FROM items",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("Table \"public.items\""), "{out}");
    assert!(out.contains("items_pkey"), "{out}");
    assert!(out.contains(" 100"), "{out}");
    // \copy goes through COPY FROM STDIN / TO STDOUT.
    let tmp = shardline_tests::TempDir::new("copy");
    let file = tmp.path("items.csv");
    let copy_out = format!("\\copy items TO '{}' CSV", file.display());
    let (ok, out) = psql(&url, &["-c", &copy_out, "-c", "TRUNCATE items"]);
    assert!(ok, "{out}");
    let copy_in = format!("\\copy items FROM '{}' CSV", file.display());
    let (ok, out) = psql(
        &url,
        &[
            "-c",
            &copy_in,
            "-A",
            "-t",
            "-c",
            "SELECT count(*), sum(id) FROM items",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("100|5050"), "{out}");
    // An error is reported with its SQLSTATE (VERBOSITY verbose prints it).
    let (ok, out) = psql(
        &url,
        &[
            "-v",
            "VERBOSITY=verbose",
            "-c",
            "SELECT * FROM missing_table",
        ],
    );
    assert!(!ok && out.contains("42P01"), "{out}");
}

fn pgbench(env: &Env, args: &[&str]) -> String {
    let (ok, out) = env.pgbench(args);
    assert!(ok, "pgbench {args:?} failed:\n{out}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_all_modes_without_failures() {
    let env = Env::start().await.unwrap();
    pgbench(&env, &["-i", "-s", "1", "-q"]);
    for mode in ["simple", "extended", "prepared"] {
        for script in [&["-S"][..], &["-N"][..]] {
            let mut args = vec!["-n", "-T", "3", "-c", "8", "-j", "2", "-M", mode];
            args.extend_from_slice(script);
            let out = pgbench(&env, &args);
            assert!(
                out.contains("number of failed transactions: 0 (0.000%)"),
                "{mode} {script:?}:\n{out}"
            );
            let processed = out
                .lines()
                .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
                .and_then(|v| v.split('/').next()?.trim().parse::<u64>().ok())
                .unwrap_or(0);
            assert!(
                processed > 100,
                "{mode} {script:?} processed {processed}:\n{out}"
            );
        }
    }
    // The default read/write script keeps the books balanced.
    pgbench(&env, &["-n", "-T", "3", "-c", "4", "-M", "prepared"]);
    let sums = env.sql("SELECT (SELECT sum(abalance) FROM pgbench_accounts) = (SELECT sum(delta) FROM pgbench_history)");
    assert_eq!(sums, "t");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3() {
    let env = Env::start().await.unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/psycopg_check.py");
    let (ok, out) = run(Command::new("python3")
        .arg(script)
        .arg(format!("postgresql://app:app@127.0.0.1:{}/app", env.port)));
    assert!(
        ok,
        "psycopg checks failed (is psycopg installed? .ci/run installs it):\n{out}"
    );
    assert!(out.contains("all checks passed"), "{out}");
}

/// `shardline check` against real servers: every user logs in everywhere,
/// and the roles and lag come from the servers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_roles_and_lag() {
    let env = shardline_tests::Env::start_with(shardline_tests::EnvOptions {
        replicas_per_shard: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let tmp = shardline_tests::TempDir::new("check");
    let path = tmp.write("shardline.toml", &env.config_text);
    let bin = shardline_tests::shardline_binary().unwrap();
    let (ok, out) = run(Command::new(&bin).arg("check").arg("--config").arg(&path));
    assert!(ok, "{out}");
    let primary = format!("health shard s0 127.0.0.1:{}: primary", env.node_port(0));
    assert!(out.contains(&primary), "{out}");
    for r in env.replicas() {
        let replica = format!(
            "health shard s0 127.0.0.1:{}: replica, lag 0 bytes",
            env.node_port(r)
        );
        assert!(out.contains(&replica), "{out}");
    }
    // Piped into `head`, the output ends quietly, without a panic.
    let (_, piped) = run(Command::new("sh").arg("-c").arg(format!(
        "{} check --config {} | head -1",
        bin.display(),
        path.display()
    )));
    assert!(!piped.contains("panicked"), "{piped}");
    // Started where there is no configuration, it says how to start.
    let empty = shardline_tests::TempDir::new("noconfig");
    std::fs::create_dir_all(empty.path("")).unwrap();
    let (ok, out) = run(Command::new(&bin).current_dir(empty.path("")));
    assert!(!ok && out.contains("shardline demo"), "{out}");
    // The demo writes its own configuration: --config is refused.
    let (ok, out) = run(Command::new(&bin).args(["demo", "--config", "x.toml"]));
    assert!(!ok && out.contains("--config"), "{out}");
    // A stopped replica makes the check fail and says why.
    env.backend.stop_node(env.replicas()[0], "fast").unwrap();
    let (ok, out) = run(Command::new(shardline_tests::shardline_binary().unwrap())
        .arg("check")
        .arg("--config")
        .arg(&path));
    assert!(!ok && out.contains("DOWN"), "{out}");
}
