//! `shardline demo` as a user runs it: it prints a psql command that works,
//! two shards hold the demo data, each shard's two streaming replicas serve
//! its reads, and Ctrl-C removes everything.

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
    // A client that connects as soon as the demo's port accepts sees the
    // whole demo: the data is loaded before the port is taken.
    let early = std::thread::spawn(move || {
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if started.elapsed() > Duration::from_secs(120) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let url = format!("postgres://app:app@127.0.0.1:{port}/app");
        Some(psql(
            &url,
            &["-A", "-t", "-c", "SELECT count(*) FROM users"],
        ))
    });
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // A failing assertion below must not leave the demo and its servers running.
    let guard = StopOnDrop(child.id());
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
    // The metrics line follows the console's (the lines read on the way
    // are checked with the rest at the end).
    let mut read = Vec::new();
    let metrics = loop {
        let line = lines.next().expect("demo output").unwrap();
        if let Some(rest) = line.trim().strip_prefix("curl http://") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
        read.push(line);
    };
    let dir = dir.expect("the demo names its directory");
    let (ok, out) = early.join().unwrap().expect("the demo's port accepted");
    assert!(ok && out.trim() == "1000", "the first client saw: {out}");
    assert!(dir.join("shardline.toml").exists());

    let (ok, out) = psql(
        &url,
        &[
            "-A",
            "-t",
            "-c",
            "/* shardline: shard=s0 */ SELECT count(*) FROM users",
            "-c",
            "/* shardline: shard=s1 */ SELECT count(*) FROM users",
            "-c",
            "/* shardline: shard=s0, role=primary */ SELECT count(*) FROM pg_stat_replication",
            "-c",
            "/* shardline: shard=s1, role=primary */ SELECT count(*) FROM pg_stat_replication",
            "-c",
            "SELECT id FROM users WHERE country = 'FR'",
        ],
    );
    assert!(ok, "{out}");
    let got: Vec<&str> = out.lines().collect();
    let (a, b): (u32, u32) = (got[0].parse().unwrap(), got[1].parse().unwrap());
    assert_eq!(a + b, 1000, "{out}");
    assert!(a > 300 && b > 300, "both shards hold users: {out}");
    assert_eq!(&got[2..4], ["2", "2"], "{out}");
    assert_eq!(got.len() - 4, 200, "a keyless read sees every shard's rows");
    // The queries the demo prints: the key's shard answers, from both of
    // its replicas in turn; the co-located join runs there.
    let shown = "SELECT inet_server_port(), pg_is_in_recovery(), * FROM users WHERE id = 42;";
    let mut args = vec!["-A", "-t"];
    for _ in 0..4 {
        args.extend(["-c", shown]);
    }
    // Every replica replayed the data before the port opened; until the
    // health checker has checked them, reads may still come from the
    // primary.
    let started = Instant::now();
    let out = loop {
        let (ok, out) = psql(&url, &args);
        assert!(ok, "{out}");
        let ports: std::collections::HashSet<&str> =
            out.lines().map(|l| l.split('|').next().unwrap()).collect();
        if ports.len() == 2 || started.elapsed() > Duration::from_secs(20) {
            break out;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let ports: std::collections::HashSet<&str> =
        out.lines().map(|l| l.split('|').next().unwrap()).collect();
    assert_eq!(ports.len(), 2, "two replicas answered: {out}");
    assert!(
        out.lines().all(|l| l.split('|').nth(1) == Some("t")),
        "{out}"
    );
    let join =
        "SELECT u.name, o.amount FROM users u JOIN orders o ON o.user_id = u.id WHERE u.id = 42;";
    let (ok, out) = psql(&url, &["-A", "-t", "-c", join]);
    assert!(ok, "{out}");
    assert_eq!(out.lines().count(), 5, "{out}");
    // The demo's user is an admin: the console line it prints works.
    let console = format!("{}/shardline", url.rsplit_once('/').unwrap().0);
    let (ok, out) = psql(&console, &["-A", "-t", "-c", "SHOW SHARDS"]);
    assert!(ok, "{out}");
    assert_eq!(out.lines().count(), 6, "two shards of three nodes: {out}");
    // Key 42, read most above, leads the hot-key report.
    let (ok, out) = psql(&console, &["-A", "-t", "-c", "SHOW HOT_KEYS"]);
    assert!(ok, "{out}");
    assert!(out.starts_with("default|42|"), "{out}");
    // The cached read it prints: answered twice, the second from the cache.
    let cached = "SELECT code, name FROM countries ORDER BY code;";
    let (ok, out) = psql(&url, &["-A", "-t", "-c", cached, "-c", cached]);
    assert!(ok, "{out}");
    assert_eq!(out.lines().count(), 10, "{out}");
    assert!(out.starts_with("BR|Brazil"), "{out}");
    let (ok, out) = psql(&console, &["-A", "-t", "-c", "SHOW CACHE"]);
    assert!(ok, "{out}");
    let countries: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with("countries|"))
        .unwrap_or_else(|| panic!("{out}"))
        .split('|')
        .collect();
    // table, ttl_ms, entries, bytes, hits, misses, ...
    assert_eq!(&countries[1..3], ["60000", "1"], "{out}");
    assert_eq!(&countries[4..6], ["1", "1"], "one hit, one miss: {out}");
    let (ok, out) = psql(
        &console,
        &[
            "-A",
            "-t",
            "-c",
            "CACHE CLEAR countries",
            "-c",
            "SHOW CACHE",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("countries|60000|0|0|1|1|"), "{out}");
    // Started from its file: RELOAD rereads it (`shardline-rebalance
    // apply --admin` gives it a new config that way).
    let (ok, out) = psql(&console, &["-A", "-t", "-c", "RELOAD"]);
    assert!(ok, "RELOAD: {out}");
    // So does the metrics URL it prints.
    let (addr, path) = metrics.split_once('/').expect("host:port/path");
    assert_eq!(path, "metrics");
    let mut http = std::net::TcpStream::connect(addr).expect("the metrics port");
    std::io::Write::write_all(&mut http, b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut http, &mut answer).unwrap();
    assert_eq!(answer.split_whitespace().nth(1), Some("200"), "{answer}");
    assert!(
        answer.contains("shardline_node_up{shard=\"s1\""),
        "{answer}"
    );

    assert!(Command::new("kill")
        .arg("-INT")
        .arg(child.id().to_string())
        .status()
        .unwrap()
        .success());
    std::mem::forget(guard);
    let rest: Vec<String> = read
        .into_iter()
        .chain(lines.map_while(Result::ok))
        .collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "{rest:?}");
    assert!(
        rest.iter()
            .any(|l| l.contains("removed the demo directory")),
        "{rest:?}"
    );
    assert!(rest.iter().any(|l| l.trim() == shown), "{rest:?}");
    assert!(
        rest.iter()
            .any(|l| l.contains("/shardline -c 'SHOW POOLS'")),
        "{rest:?}"
    );
    assert!(!dir.exists(), "{} still exists", dir.display());
}

/// Sends SIGINT to the demo (which then stops its servers and removes its
/// directory) when dropped.
struct StopOnDrop(u32);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-INT")
            .arg(self.0.to_string())
            .status();
    }
}
