//! `shardline demo` as a user runs it: it prints a psql command that works,
//! two streaming replicas serve the reads, and Ctrl-C removes everything.

use shardline_tests::{psql, shardline_binary};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn demo_starts_serves_and_cleans_up() {
    let port = shardline::cluster::free_port().unwrap();
    let mut child = Command::new(shardline_binary().unwrap())
        .args(["demo", "--port", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut url, mut dir) = (None, None);
    let started = Instant::now();
    while url.is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "demo did not start"
        );
        let line = lines.next().expect("demo output").unwrap();
        if let Some(d) = line.trim().strip_prefix("data and config: ") {
            dir = Some(std::path::PathBuf::from(d));
        }
        if let Some(u) = line.trim().strip_prefix("psql ") {
            url = Some(u.to_string());
        }
    }
    let url = url.unwrap();
    assert_eq!(url, format!("postgres://app:app@127.0.0.1:{port}/app"));
    let dir = dir.expect("the demo names its directory");
    assert!(dir.join("shardline.toml").exists());

    let (ok, out) = psql(
        &url,
        &[
            "-A",
            "-t",
            "-c",
            "SELECT count(*) FROM users",
            "-c",
            "/* shardline: role=primary */ SELECT count(*) FROM pg_stat_replication",
        ],
    );
    assert!(ok, "{out}");
    assert_eq!(out.lines().collect::<Vec<_>>(), ["1000", "2"], "{out}");
    // The query the demo prints: reads rotate over both replicas.
    let shown = "SELECT inet_server_port(), pg_is_in_recovery();";
    let mut args = vec!["-A", "-t"];
    for _ in 0..4 {
        args.extend(["-c", shown]);
    }
    let (ok, out) = psql(&url, &args);
    assert!(ok, "{out}");
    let answers: std::collections::HashSet<&str> = out.lines().collect();
    assert_eq!(answers.len(), 2, "two replicas answered: {out}");
    assert!(answers.iter().all(|l| l.ends_with("|t")), "{out}");

    assert!(Command::new("kill")
        .arg("-INT")
        .arg(child.id().to_string())
        .status()
        .unwrap()
        .success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "{rest:?}");
    assert!(
        rest.iter()
            .any(|l| l.contains("removed the demo directory")),
        "{rest:?}"
    );
    assert!(rest.iter().any(|l| l.trim() == shown), "{rest:?}");
    assert!(!dir.exists(), "{} still exists", dir.display());
}
