//! Node failures under load: a replica killed or frozen, the primary
//! stopped, a replica promoted (by hand and by `auto_promote`), and two
//! nodes claiming to be primary.

use shardline_tests::{Env, EnvOptions, TempDir};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// Fast checks, with a timeout a saturated 2-core machine still meets: at
/// 500ms a busy primary's check sometimes missed it under the pgbench load,
/// marking the primary down and failing the reads that fell back to it.
const FAST_HEALTH: &str =
    "[health]\ninterval = \"200ms\"\ntimeout = \"800ms\"\nban_time = \"2s\"\n";

async fn cluster(replicas: usize, extra_toml: &str) -> Env {
    let env = Env::start_with(EnvOptions {
        replicas_per_shard: replicas,
        extra_toml: format!("{FAST_HEALTH}{extra_toml}"),
        pool_toml: "checkout_timeout = \"3s\"\nconnect_timeout = \"1s\"\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let (ok, out) = env.pgbench(&["-i", "-s", "1", "-q"]);
    assert!(ok, "{out}");
    env.wait_healthy().await;
    env
}

/// A server that closes the health check's own connection
/// (pg_terminate_backend, its `idle_session_timeout`) has not failed: the
/// check asks again at once on a new connection, and the node is neither
/// marked down nor banned. Before, it was banned for `ban_time` and every
/// pooled connection to it was cut: logins were refused ("no node is
/// reachable") and writes failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_check_connection_the_server_closed_bans_nothing() {
    let env = cluster(0, "").await;
    let node = env.proxy.as_ref().unwrap().shared.topology.shards[0].nodes[0].clone();
    let c = env.connect().await;
    let checker = "SELECT pid FROM pg_stat_activity WHERE application_name = 'shardline-health'";
    for round in 0..3 {
        let pid = env.sql(checker);
        assert!(!pid.is_empty(), "no health check connection");
        let checks = node.check_time.read().count;
        assert_eq!(env.sql(&format!("SELECT pg_terminate_backend({pid})")), "t");
        // Two checks published after it: the one that found the
        // connection closed, and one more.
        shardline_tests::wait_for("two health checks after the kill", || {
            let now = node.check_time.read().count;
            async move { now >= checks + 2 }
        })
        .await;
        assert!(
            !node.is_down() && !node.is_banned(),
            "round {round}: {}",
            node.last_error()
        );
        assert_eq!(node.last_error(), "", "round {round}");
        c.simple_query("INSERT INTO pgbench_history (tid, bid, aid, delta) VALUES (1, 1, 1, 1)")
            .await
            .unwrap();
    }
}

/// Runs pgbench select-only for `secs` in the background, logging each
/// transaction's latency under `dir`.
fn pgbench_reads(
    env: &Env,
    secs: u32,
    dir: &std::path::Path,
    mode: &'static str,
) -> std::thread::JoinHandle<(bool, String)> {
    std::fs::create_dir_all(dir).unwrap();
    let prefix = dir.join("tx").display().to_string();
    pgbench_in_background(
        env,
        mode,
        secs,
        &["-S", "-l", &format!("--log-prefix={prefix}")],
    )
}

/// Runs pgbench (8 clients, `mode`, `secs`, then `args`) in the background.
fn pgbench_in_background(
    env: &Env,
    mode: &'static str,
    secs: u32,
    args: &[&str],
) -> std::thread::JoinHandle<(bool, String)> {
    let mut cmd = std::process::Command::new("pgbench");
    cmd.env("PGPASSWORD", "app")
        .args(["-h", "127.0.0.1", "-p", &env.port.to_string(), "-U", "app"])
        .args([
            "-n",
            "-M",
            mode,
            "-c",
            "8",
            "-j",
            "2",
            "-T",
            &secs.to_string(),
        ])
        .args(args)
        .arg("app");
    std::thread::spawn(move || shardline_tests::run(&mut cmd))
}

/// pgbench ran more than `least` transactions by `mode` and no client failed.
fn none_failed(mode: &str, (ok, out): (bool, String), least: u64) -> u64 {
    assert!(ok && !out.contains("aborted"), "{mode}: {out}");
    let n = processed(&out);
    assert!(n > least, "{mode}: {out}");
    n
}

/// The slowest transaction pgbench logged (the log's third field, in µs).
fn max_latency(dir: &std::path::Path) -> Duration {
    let mut max = 0u64;
    for f in std::fs::read_dir(dir).unwrap().flatten() {
        for line in std::fs::read_to_string(f.path()).unwrap().lines() {
            if let Some(us) = line.split_whitespace().nth(2).and_then(|v| v.parse().ok()) {
                max = max.max(us);
            }
        }
    }
    Duration::from_micros(max)
}

fn processed(out: &str) -> u64 {
    out.lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next()?.trim().parse().ok())
        .unwrap_or(0)
}

/// Runs 5 s of pgbench reads and sends `signal` to the first replica 1.5 s
/// in; returns pgbench's (success, output) and its log directory.
async fn signal_replica_under_reads(
    env: &Env,
    signal: i32,
    mode: &'static str,
) -> (bool, String, TempDir) {
    fault_replica_under_reads(env, mode, |env, victim| env.signal_node(victim, signal)).await
}

/// Runs 5 s of pgbench reads and applies `fault` to the first replica 1.5 s
/// in; returns pgbench's (success, output) and its log directory.
async fn fault_replica_under_reads(
    env: &Env,
    mode: &'static str,
    fault: impl FnOnce(&Env, usize),
) -> (bool, String, TempDir) {
    let victim = env.replicas()[0];
    let dir = TempDir::new("signal");
    let bench = pgbench_reads(env, 5, &dir.dir, mode);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    fault(env, victim);
    let (ok, out) = tokio::task::spawn_blocking(move || bench.join().unwrap())
        .await
        .unwrap();
    (ok, out, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_killed_under_read_load() {
    let env = cluster(2, "").await;
    let (ok, out, _logs) = signal_replica_under_reads(&env, libc::SIGKILL, "simple").await;
    // Reads in flight on the killed node ran again on the other replica.
    assert!(ok && !out.contains("aborted"), "{out}");
    assert!(processed(&out) > 500, "{out}");
    eprintln!("killed replica: {} reads, none failed", processed(&out));
    let shard = &env.proxy.as_ref().unwrap().shared.topology.shards[0];
    assert!(shard.nodes[1].is_down(), "the checker noticed");
}

/// A replica shut down at once (`pg_ctl -m immediate`: each backend is sent
/// SIGQUIT and may close its socket before or after saying FATAL) under
/// reads by every protocol: the reads in flight run again on the other
/// replica, and no client sees an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_stopped_at_once_under_read_load() {
    for mode in ["simple", "extended", "prepared"] {
        let env = cluster(2, "").await;
        let (ok, out, _logs) = fault_replica_under_reads(&env, mode, |env, victim| {
            env.backend.stop_node(victim, "immediate").unwrap()
        })
        .await;
        let n = none_failed(mode, (ok, out), 500);
        eprintln!("stopped replica ({mode}): {n} reads, none failed");
    }
}

/// A read whose replica is shut down at once while it runs: the server
/// flushes what it had buffered of the answer (ParseComplete, BindComplete,
/// RowDescription by the extended protocol; RowDescription by the simple
/// one), warns 57P01 and exits. None of it had been written to the client,
/// so it is taken back and the read runs again on the other replica: the
/// client gets one whole answer, as from one server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_answered_in_part_when_its_replica_stops_runs_again_whole() {
    use shardline_tests::{tags, wire, RawClient};
    let env = cluster(2, "").await;
    let sql = "SELECT pg_sleep(1.5), 'whole' AS answer";
    let extended = wire::unit(sql);
    let simple = vec![shardline_tests::message(
        b'Q',
        format!("{sql}\0").as_bytes(),
    )];
    for (mode, unit) in [("extended", extended), ("simple", simple)] {
        let mut raw = RawClient::login(env.port).await.unwrap();
        raw.send(&unit.concat()).await.unwrap();
        // The replica running it (seen in its own pg_stat_activity).
        let running = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE query = '{}'",
            sql.replace('\'', "''")
        );
        let started = Instant::now();
        let victim = loop {
            if let Some(r) = env
                .replicas()
                .into_iter()
                .find(|&r| env.sql_on(r, &running) == "1")
            {
                break r;
            }
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "{mode}: not seen running"
            );
        };
        env.backend.stop_node(victim, "immediate").unwrap();
        let answer = raw.until_ready().await.unwrap();
        let expected: &[u8] = if mode == "extended" {
            b"12TDCZ"
        } else {
            b"TDCZ"
        };
        assert_eq!(tags(&answer), expected, "{mode}: {answer:?}");
        assert!(
            answer
                .iter()
                .any(|m| m.0 == b'D' && m.1.ends_with(b"whole")),
            "{mode}: {answer:?}"
        );
        env.backend.start_node(victim).unwrap();
        env.wait_healthy().await;
    }
}

/// Two shards of `replicas` replicas each (fast health checks, `pool`
/// settings), table `users` sharded by `id` and created, and a client.
async fn users_on_two_shards(replicas: usize, pool: &str) -> (Env, Client) {
    let env = Env::start_with(EnvOptions {
        shards: 2,
        replicas_per_shard: replicas,
        extra_toml: format!(
            "{FAST_HEALTH}[sharding]\nfunction = \"consistent\"\n[[sharding.tables]]\nname = \"users\"\ncolumn = \"id\"\n"
        ),
        pool_toml: pool.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let c = env.connect().await;
    create_users(&c, 0).await;
    (env, c)
}

/// Table `users`, with users 1 to `n` (named `user <id>`).
async fn create_users(c: &Client, n: i64) {
    c.batch_execute("CREATE TABLE users (id bigint PRIMARY KEY, name text)")
        .await
        .unwrap();
    if n > 0 {
        insert_users(c, n).await;
    }
}

/// Users 1 to `n` (named `user <id>`) into table `users`.
async fn insert_users(c: &Client, n: i64) {
    let rows: Vec<String> = (1..=n).map(|k| format!("({k}, 'user {k}')")).collect();
    c.batch_execute(&format!(
        "INSERT INTO users (id, name) VALUES {}",
        rows.join(", ")
    ))
    .await
    .unwrap();
}

/// Reads on several shards by every protocol (a count without a key,
/// concatenated; an ORDER BY with LIMIT, merged; reads by two keys sent
/// together, as a query string or a pipeline), with two shards of two
/// replicas each: three replicas stopped at once (`pg_ctl -m immediate`)
/// and the last one frozen, each 1.5 s into a run. A read that lost its
/// shard's connection before anything of it reached the client runs
/// again, and no client sees an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_on_several_shards_runs_again_when_a_replica_stops() {
    let (env, c) =
        users_on_two_shards(2, "checkout_timeout = \"3s\"\nconnect_timeout = \"1s\"\n").await;
    insert_users(&c, 200).await;
    env.wait_healthy().await;
    let script = TempDir::new("spread-script");
    // Keyless reads (concatenated, merged), then reads by two keys sent
    // together: a query string in the simple protocol, a pipeline in the
    // extended ones.
    let keyless = "\\set a random(1, 200)\n\\set b random(1, 200)\n\
                   SELECT count(*) FROM users;\n\
                   SELECT id FROM users ORDER BY id DESC LIMIT 3;\n";
    let by_keys = |mode: &str| {
        let path = script.dir.join(format!("{mode}.sql"));
        let together = if mode == "simple" {
            "SELECT name FROM users WHERE id = :a \\; SELECT name FROM users WHERE id = :b;\n"
        } else {
            "\\startpipeline\nSELECT name FROM users WHERE id = :a;\n\
             SELECT name FROM users WHERE id = :b;\n\\endpipeline\n"
        };
        // Repeated: most reads in flight when the replica stops are these
        // (a query string's two statements answer faster than a pipeline).
        let together = together.repeat(if mode == "simple" { 8 } else { 3 });
        std::fs::write(&path, format!("{keyless}{together}")).unwrap();
        path.display().to_string()
    };
    // Both shards' replicas, stopped one per protocol.
    let victims: Vec<usize> = (0..env.backend.nodes().len())
        .filter(|&i| !env.backend.nodes()[i].is_primary)
        .collect();
    // The last replica frozen instead, under the query strings: every read
    // that reaches it waits until the checker cuts its connections.
    let faults = [
        ("simple", false),
        ("extended", false),
        ("prepared", false),
        ("simple", true),
    ];
    for ((mode, frozen), victim) in faults.into_iter().zip(victims) {
        let bench = pgbench_in_background(&env, mode, 4, &["-f", &by_keys(mode)]);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        if frozen {
            env.signal_node(victim, libc::SIGSTOP);
        } else {
            env.backend.stop_node(victim, "immediate").unwrap();
        }
        let result = tokio::task::spawn_blocking(move || bench.join().unwrap())
            .await
            .unwrap();
        if frozen {
            env.signal_node(victim, libc::SIGCONT);
        }
        let n = none_failed(mode, result, 100);
        eprintln!(
            "replica {} under reads on two shards ({mode}): {n} transactions, none failed",
            if frozen { "frozen" } else { "stopped" }
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_replica_delays_no_read_beyond_the_timeouts() {
    frozen_replica_under("simple").await;
}

/// The same with each read in the extended protocol (Parse, Bind, Describe,
/// Execute, Sync: one unit), and with prepared statements (the Parse in a
/// unit of its own first, then Bind/Execute/Sync units).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_replica_delays_no_extended_or_prepared_read() {
    frozen_replica_under("extended").await;
    frozen_replica_under("prepared").await;
}

async fn frozen_replica_under(mode: &'static str) {
    let env = cluster(2, "").await;
    let (ok, out, dir) = signal_replica_under_reads(&env, libc::SIGSTOP, mode).await;
    env.signal_node(env.replicas()[0], libc::SIGCONT);
    assert!(ok && !out.contains("aborted"), "{out}");
    // A read waiting on the frozen node is cut when a check times out
    // (interval 200ms + timeout 800ms) and runs elsewhere; a connection
    // being opened to it gives up then too.
    let worst = max_latency(&dir.dir);
    eprintln!(
        "frozen replica ({mode}): {} reads, slowest {worst:?}",
        processed(&out)
    );
    assert!(
        worst < Duration::from_millis(2500),
        "slowest read took {worst:?}\n{out}"
    );
}

async fn insert_port(c: &Client) -> Result<u16, tokio_postgres::Error> {
    let row = c
        .query_one(
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, inet_server_port(), now()) RETURNING delta",
            &[],
        )
        .await?;
    Ok(row.get::<_, i32>(0) as u16)
}

/// Retries `insert_port` until it succeeds or `limit` passes.
async fn write_succeeds_within(c: &Client, limit: Duration) -> (u16, Duration) {
    let started = Instant::now();
    loop {
        match insert_port(c).await {
            Ok(port) => return (port, started.elapsed()),
            Err(e) => assert!(started.elapsed() < limit, "writes did not resume: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_down_then_promotion_then_two_primaries() {
    let env = cluster(2, "[load_balancing]\nread_your_writes = \"off\"\n").await;
    let [r1, _] = env.replicas()[..] else {
        panic!("two replicas")
    };
    let c = env.connect().await;
    assert_eq!(insert_port(&c).await.unwrap(), env.node_port(0));

    let dir = TempDir::new("primary");
    let bench = pgbench_reads(&env, 6, &dir.dir, "simple");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    env.backend.stop_node(0, "immediate").unwrap();
    // From the moment it stops, before and after the checker notices,
    // writes fail with one code, 08006 (a refused connection was 08001).
    let stopped = Instant::now();
    let mut codes = std::collections::BTreeSet::new();
    while stopped.elapsed() < Duration::from_millis(600) {
        if let Err(e) = insert_port(&c).await {
            codes.insert(shardline_tests::sqlstate(&e).unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(codes.into_iter().collect::<Vec<_>>(), ["08006"]);

    // Writes fail at once with a connection-class error naming the shard.
    let started = Instant::now();
    let e = insert_port(&c).await.unwrap_err();
    let db = e.as_db_error().expect("a server-style error");
    // 08006 however the primary failed (refused, shutting down, marked down).
    assert_eq!(db.code().code(), "08006", "{db:?}");
    assert!(
        db.message().contains("shard s0") && db.message().contains("writes fail"),
        "{}",
        db.message()
    );
    assert!(started.elapsed() < Duration::from_millis(500), "fails fast");
    // Reads keep working.
    let n: i64 = c
        .query_one("SELECT count(*) FROM pgbench_branches", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);

    // An operator promotes replica 1: writes follow within two intervals (plus slack).
    env.sql_on(r1, "SELECT pg_promote()");
    let (port, took) = write_succeeds_within(&c, Duration::from_secs(5)).await;
    assert_eq!(port, env.node_port(r1), "writes go to the promoted node");
    assert!(
        took < Duration::from_millis(1500),
        "promotion noticed after {took:?}"
    );
    eprintln!("writes resumed on the promoted replica {took:?} after pg_promote()");

    let (ok, out) = tokio::task::spawn_blocking(move || bench.join().unwrap())
        .await
        .unwrap();
    assert!(
        ok && !out.contains("aborted"),
        "reads survived the primary's loss:\n{out}"
    );

    // The old primary comes back still believing it is primary.
    env.backend.start_node(0).unwrap();
    let started = Instant::now();
    let message = loop {
        match insert_port(&c).await {
            Err(e)
                if e.as_db_error()
                    .is_some_and(|d| d.message().contains("both")) =>
            {
                break e.as_db_error().unwrap().message().to_string();
            }
            _ => assert!(
                started.elapsed() < Duration::from_secs(5),
                "two primaries not noticed"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for i in [0, r1] {
        let addr = format!("127.0.0.1:{}", env.node_port(i));
        assert!(message.contains(&addr), "{message} names {addr}");
    }
    // Once the old primary is gone again, writes resume.
    env.backend.stop_node(0, "fast").unwrap();
    let (port, _) = write_succeeds_within(&c, Duration::from_secs(5)).await;
    assert_eq!(port, env.node_port(r1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_promote_picks_a_replica_after_the_grace_time() {
    let env = cluster(
        2,
        "auto_promote = true\nauto_promote_after = \"1s\"\n[load_balancing]\nread_your_writes = \"off\"\n",
    )
    .await;
    // The health-check role (the first user, app) must be allowed to promote.
    env.sql("GRANT EXECUTE ON FUNCTION pg_promote(boolean, integer) TO app");
    env.wait_healthy().await;
    let c = env.connect().await;
    env.backend.stop_node(0, "immediate").unwrap();
    let started = Instant::now();
    let (port, took) = write_succeeds_within(&c, Duration::from_secs(10)).await;
    let replicas: Vec<u16> = env.replicas().iter().map(|&i| env.node_port(i)).collect();
    assert!(replicas.contains(&port), "{port} is one of {replicas:?}");
    assert!(
        took >= Duration::from_millis(900),
        "waited for the grace time ({took:?})"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    eprintln!("auto_promote: writes resumed {took:?} after the primary stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_the_primary_when_every_replica_is_down() {
    let env = cluster(2, "[load_balancing]\nread_your_writes = \"off\"\n").await;
    let c = env.connect().await;
    for r in env.replicas() {
        env.backend.stop_node(r, "immediate").unwrap();
    }
    // Reads in flight or on pooled connections to the dead replicas run again
    // on the primary; none fails.
    for _ in 0..20 {
        let port: i32 = c
            .query_one("SELECT inet_server_port()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(port as u16, env.node_port(0));
    }
}

/// A read that finds every node of its shard down waits for one; when the
/// primary answers again first (no replica yet), the read runs there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_waiting_through_an_outage_takes_the_primary_when_it_returns() {
    // Stopped nodes refuse at once; the long timeout only stretches the
    // read's wait (interval + 2 x timeout) past the primary's restart.
    let env = Env::start_with(EnvOptions {
        replicas_per_shard: 1,
        extra_toml: "[health]\ninterval = \"200ms\"\ntimeout = \"4s\"\nban_time = \"30s\"\n\
                     [load_balancing]\nread_your_writes = \"off\"\n"
            .into(),
        pool_toml: "connect_timeout = \"1s\"\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    env.wait_healthy().await;
    let [r] = env.replicas()[..] else {
        panic!("one replica")
    };
    let shard = env.proxy.as_ref().unwrap().shared.topology.shards[0].clone();
    let c = env.connect().await;
    env.backend.stop_node(r, "immediate").unwrap();
    env.backend.stop_node(0, "immediate").unwrap();
    let started = Instant::now();
    while !(shard.nodes[0].is_down() && shard.nodes[r].is_down()) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "outage noticed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let read = tokio::spawn(async move {
        c.query_one("SELECT inet_server_port()", &[])
            .await
            .map(|r| r.get::<_, i32>(0) as u16)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!read.is_finished(), "the read waits for a node");
    env.backend.start_node(0).unwrap();
    let port = read
        .await
        .unwrap()
        .expect("the read runs on the returned primary");
    assert_eq!(port, env.node_port(0));
}

/// What a writing user's readers saw while the primary was out.
#[derive(Default, Debug)]
struct OutageReads {
    during: u64,
    failed: Vec<String>,
    stale: u64,
}

/// One user writing (an increasing number per commit) and four of its
/// connections reading the newest number, under read-your-writes `lsn`;
/// `outage` takes the primary out 1 s in and `recover` brings it back 3 s
/// later. Every read must succeed and see every write acknowledged before
/// it started.
async fn reads_through_a_primary_outage(
    env: &Env,
    outage: impl FnOnce(),
    recover: impl FnOnce(),
) -> OutageReads {
    use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::SeqCst};
    use std::sync::Arc;
    let acked = Arc::new(AtomicI64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let out = Arc::new(AtomicBool::new(false));
    let during = Arc::new(AtomicU64::new(0));
    let writer = {
        let (c, acked, stop) = (env.connect().await, acked.clone(), stop.clone());
        let start: i64 = c
            .query_one("SELECT coalesce(max(v), 0) FROM marks", &[])
            .await
            .unwrap()
            .get(0);
        acked.store(start, SeqCst);
        tokio::spawn(async move {
            let mut n = start;
            while !stop.load(SeqCst) {
                n += 1;
                match c.execute("INSERT INTO marks VALUES ($1)", &[&n]).await {
                    Ok(_) => acked.store(n, SeqCst),
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        })
    };
    let mut readers = Vec::new();
    for _ in 0..4 {
        let c = env.connect().await;
        let (acked, stop, out, during) = (acked.clone(), stop.clone(), out.clone(), during.clone());
        // Prepared once, as drivers do (a unit preparing a new named
        // statement is not run again elsewhere).
        let newest = c
            .prepare("SELECT coalesce(max(v), 0) FROM marks")
            .await
            .unwrap();
        readers.push(tokio::spawn(async move {
            let (mut failed, mut stale) = (Vec::new(), 0);
            while !stop.load(SeqCst) {
                let want = acked.load(SeqCst);
                let in_outage = out.load(SeqCst);
                match c.query_one(&newest, &[]).await {
                    Ok(row) => {
                        if row.get::<_, i64>(0) < want {
                            stale += 1;
                        }
                        if in_outage && out.load(SeqCst) {
                            during.fetch_add(1, SeqCst);
                        }
                    }
                    Err(e) => {
                        failed.push(format!(
                            "{}: {}",
                            shardline_tests::sqlstate(&e).unwrap_or_default(),
                            e.as_db_error()
                                .map_or(e.to_string(), |d| d.message().into())
                        ));
                        if c.is_closed() {
                            break;
                        }
                    }
                }
            }
            (failed, stale)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    outage();
    out.store(true, SeqCst);
    tokio::time::sleep(Duration::from_millis(3000)).await;
    out.store(false, SeqCst);
    stop.store(true, SeqCst);
    let mut result = OutageReads::default();
    for r in readers {
        let (failed, stale) = tokio::time::timeout(Duration::from_secs(30), r)
            .await
            .expect("a reader hung")
            .unwrap();
        result.failed.extend(failed);
        result.stale += stale;
    }
    result.during = during.load(SeqCst);
    recover();
    tokio::time::timeout(Duration::from_secs(30), writer)
        .await
        .expect("the writer hung")
        .unwrap();
    result
}

/// Reads of a user who was writing go on while the primary is stopped:
/// each goes to a replica that has replayed the user's last write (asked
/// directly; a commit's reply waits for its WAL position, so none is
/// acknowledged with its position unknown), none is stale, none fails
/// with the primary's write error.
/// With the primary frozen (SIGSTOP, which stops its processes one by one:
/// a commit can be acknowledged after its WAL sender stopped, so no replica
/// may ever get it) a read may fail, but only with the read error 57P03
/// naming read-your-writes, never stale and never with the write error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writing_users_reads_go_on_while_the_primary_is_out() {
    let env = cluster(1, "").await;
    env.connect()
        .await
        .batch_execute("CREATE TABLE marks (v bigint)")
        .await
        .unwrap();
    env.wait_healthy().await;
    let frozen = reads_through_a_primary_outage(
        &env,
        || env.signal_node(0, libc::SIGSTOP),
        || env.signal_node(0, libc::SIGCONT),
    )
    .await;
    eprintln!("primary frozen: {frozen:?}");
    env.wait_healthy().await;
    let stopped = reads_through_a_primary_outage(
        &env,
        || env.backend.stop_node(0, "fast").unwrap(),
        || env.backend.start_node(0).unwrap(),
    )
    .await;
    eprintln!("primary stopped: {stopped:?}");
    assert_eq!(frozen.stale, 0, "primary frozen: stale reads");
    assert!(
        frozen
            .failed
            .iter()
            .all(|f| f.starts_with("57P03") && f.contains("read-your-writes")),
        "primary frozen: {:?}",
        frozen.failed
    );
    // A clean stop: every write reached the replicas, every read is served
    // (the stop's FATAL 57P01 re-runs a read in flight and ends no client's
    // connection).
    assert!(
        stopped.failed.is_empty(),
        "primary stopped: {:?}",
        stopped.failed
    );
    assert_eq!(stopped.stale, 0, "primary stopped: stale reads");
    assert!(
        stopped.during > 20,
        "primary stopped: reads went on ({stopped:?})"
    );
}

/// A server connection that ends while the client has nothing in flight
/// on it (the FATAL 57P01 of a shutdown or `pg_terminate_backend`, here
/// after the client's Execute was answered and before its Sync) costs the
/// client no connection under transaction pooling: it gets an ERROR at its
/// Sync, never the server's FATAL (on which drivers hang up), and its
/// session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_ended_between_answers_leaves_the_client_connected() {
    use shardline_tests::{tags, wire::*, RawClient};
    let env = cluster(0, "[load_balancing]\nread_your_writes = \"off\"\n").await;
    let mut c = RawClient::login(env.port).await.unwrap();
    c.send(
        &[
            parse("", "SELECT pg_backend_pid()", &[]),
            bind("", &[], 0),
            execute(),
            flush(),
        ]
        .concat(),
    )
    .await
    .unwrap();
    let mut pid = String::new();
    loop {
        let (tag, body) = c.recv(Duration::from_secs(10)).await.unwrap().unwrap();
        match tag {
            b'D' => pid = String::from_utf8_lossy(&body[6..]).into_owned(),
            b'C' => break,
            _ => {}
        }
    }
    let ended = env.sql(&format!("SELECT pg_terminate_backend({pid})"));
    assert!(ended.contains('t'), "{ended}");
    env.wait_sql(
        &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"),
        "0",
    )
    .await;
    c.send(&sync()).await.unwrap();
    let msgs = c.until_ready().await.unwrap();
    for (tag, body) in &msgs {
        assert!(
            *tag != b'E' || !body.windows(6).any(|w| w == b"SFATAL"),
            "the server's FATAL reached the client: {msgs:?}"
        );
    }
    let msgs = c.exchange(&[query("SELECT 1")]).await.unwrap();
    assert_eq!(tags(&msgs), b"TDCZ", "{msgs:?}");
}

/// A read that opens a new connection to a replica that has frozen (the
/// kernel completes the TCP handshake, the startup is never answered)
/// gives up when the node fails its health check (interval 200ms +
/// timeout 800ms), not at connect_timeout (10s here), and runs on the
/// primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_being_opened_to_a_frozen_replica_gives_up_at_the_failed_check() {
    let env = Env::start_with(EnvOptions {
        replicas_per_shard: 1,
        extra_toml: format!("{FAST_HEALTH}[load_balancing]\nread_your_writes = \"off\"\n"),
        pool_toml: "connect_timeout = \"10s\"\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    env.wait_healthy().await;
    // Logging in opens a connection to the primary only.
    let c = env.connect().await;
    let replica = env.replicas()[0];
    env.signal_node(replica, libc::SIGSTOP);
    let started = Instant::now();
    let port: i32 = c
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    let took = started.elapsed();
    env.signal_node(replica, libc::SIGCONT);
    eprintln!("read with a frozen replica: {took:?} on port {port}");
    assert_eq!(port as u16, env.node_port(0), "ran on the primary");
    assert!(took < Duration::from_millis(2500), "took {took:?}");
}

/// A driver that prepares each statement before running it (tokio-postgres'
/// `query` with a text: Parse/Describe/Sync, then Bind/Execute/Sync, then
/// Close/Sync) loses no read to a frozen replica: whichever unit is waiting
/// on it when the checker cuts it runs again elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_replica_loses_no_read_of_a_preparing_driver() {
    let env = cluster(1, "").await;
    let victim = env.replicas()[0];
    let reader = env.connect().await;
    let stop = Instant::now() + Duration::from_secs(4);
    let mut reads = 0;
    let mut slowest = Duration::ZERO;
    let mut frozen = false;
    while Instant::now() < stop {
        if !frozen && stop - Instant::now() < Duration::from_secs(3) {
            env.signal_node(victim, libc::SIGSTOP);
            frozen = true;
        }
        let t = Instant::now();
        let row = reader
            .query_one(
                "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
                &[&7i32],
            )
            .await;
        if let Err(e) = row {
            env.signal_node(victim, libc::SIGCONT);
            panic!("read {reads} failed: {e:?}");
        }
        slowest = slowest.max(t.elapsed());
        reads += 1;
    }
    env.signal_node(victim, libc::SIGCONT);
    eprintln!("frozen replica, preparing driver: {reads} reads, slowest {slowest:?}");
    assert!(slowest < Duration::from_millis(2500), "{slowest:?}");
}

/// With one shard's primary down, a driver that prepares each statement
/// (Parse/Describe/Sync first) still writes to the other shard: a unit that
/// only prepares runs on any node, not on the default shard's primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preparing_driver_writes_to_a_shard_whose_primary_is_up() {
    let (env, c) = users_on_two_shards(1, "checkout_timeout = \"3s\"\n").await;
    env.wait_healthy().await;
    let sh = shardline_router::sharding::Sharding::from_config(
        &shardline_config::Config::from_toml(&env.config_text, "t").unwrap(),
    );
    let on = |shard: usize| {
        (1i64..)
            .find(|&k| {
                sh.groups[0].shard_of(Some(&shardline_router::hash::KeyValue::Int(k))) == Ok(shard)
            })
            .unwrap()
    };
    let (default, other) = (sh.default_shard, 1 - sh.default_shard);
    env.backend
        .stop_node(env.shard_primary(default), "immediate")
        .unwrap();
    // A statement text this connection has not prepared yet.
    c.execute(
        "INSERT INTO users (id, name) VALUES ($1, 'while the other shard is down')",
        &[&on(other)],
    )
    .await
    .expect("a write to the shard whose primary is up");
    let err = c
        .execute(
            "INSERT INTO users (id, name) VALUES ($1, 'on the shard that is down')",
            &[&on(default)],
        )
        .await
        .expect_err("the shard whose primary is down refuses writes");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::CONNECTION_FAILURE),
        "{err:?}"
    );
}

/// `shards` shards of one replica each, checked every 200 ms (a stopped
/// primary refuses connections at once; a replica's check on a busy
/// machine gets time to answer: banned, the reads it serves would go to
/// the primary that is down), the console for `app`; with several,
/// `users` sharded by `id` (two-phase commit as `two_phase`). Users 1 to
/// 8 created, a client, the default shard, and the keys on it and on the
/// others.
async fn users_by_default_shard(
    shards: usize,
    two_phase: bool,
) -> (Env, Client, usize, Vec<i64>, Vec<i64>) {
    let env = Env::start_with(EnvOptions {
        shards,
        replicas_per_shard: 1,
        extra_toml: format!(
            "[health]\ninterval = \"200ms\"\ntimeout = \"5s\"\nban_time = \"1s\"\n[admin]\nusers = [\"app\"]\n{}",
            if shards > 1 {
                format!("[sharding]\nfunction = \"consistent\"\ntwo_phase_commit = {two_phase}\n[[sharding.tables]]\nname = \"users\"\ncolumn = \"id\"\n")
            } else {
                String::new()
            }
        ),
        ..Default::default()
    })
    .await
    .unwrap();
    let c = env.connect().await;
    create_users(&c, 8).await;
    env.wait_healthy().await;
    let config = shardline_config::Config::from_toml(&env.config_text, "t").unwrap();
    let sharding = (shards > 1).then(|| shardline_router::sharding::Sharding::from_config(&config));
    let default = sharding.as_ref().map_or(0, |s| s.default_shard);
    let on = |k: i64| {
        sharding.as_ref().map_or(0, |s| {
            s.groups[0]
                .shard_of(Some(&shardline_router::hash::KeyValue::Int(k)))
                .unwrap()
        })
    };
    let (on_default, elsewhere) = (1i64..=8).partition(|&k| on(k) == default);
    (env, c, default, on_default, elsewhere)
}

/// asyncpg prepares each statement with Parse, Describe and Flush before it
/// binds it. With the default shard's primary down, that prepare ran on the
/// primary (the part before the Flush was planned as a unit that might still
/// write), so every statement failed, reads of the other shard's keys too.
/// Now reads of every key go on (from the replicas where the primary is
/// down), in autocommit and in transactions (one whose first statement
/// reads begins on a replica there, read-only: psycopg2 and SQLAlchemy open
/// one before every read); writes succeed where the primary is up and fail
/// with a connection error where it is down. With
/// two shards, and with one shard and its replica; also a Parse arriving
/// alone, and a read acted on at a Flush (pg-cursor's batching).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_every_shard_go_on_while_the_default_primary_is_down() {
    // (With two-phase commit a transaction may span shards: a pipeline in
    // one takes other shards as it goes, `runs_as_pipeline`.)
    for (shards, two_phase) in [(2, false), (2, true), (1, false)] {
        let (env, _, default, on_default, elsewhere) =
            users_by_default_shard(shards, two_phase).await;
        let list = |keys: &[i64]| {
            keys.iter()
                .map(|k| k.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let (up, down) = (list(&elsewhere), list(&on_default));
        assert!(!down.is_empty() && (shards == 1 || !up.is_empty()));
        env.backend
            .stop_node(env.shard_primary(default), "immediate")
            .unwrap();
        let mut cmd = std::process::Command::new("python3");
        cmd.arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/drivers/primary_down.py"
        ))
        .arg(env.url("app", "app"))
        .arg(&up)
        .arg(&down);
        let (ok, out) = tokio::task::spawn_blocking(move || shardline_tests::run(&mut cmd))
            .await
            .unwrap();
        assert!(
            ok && out.contains("all checks passed"),
            "{shards} shard(s), two-phase commit {two_phase}, up {up:?}, down {down:?} (asyncpg is installed by scripts/setup-debian.sh):\n{out}"
        );
        // A Parse arriving alone (asyncpg without its statement cache
        // writes it on its own, then Bind, Execute, Sync) is planned with
        // the rest of its unit, once its Sync is here: it does not go to
        // the primary because nothing after it has arrived yet.
        use shardline_tests::wire::{bind, execute, parse, sync};
        let mut raw = shardline_tests::RawClient::login(env.port).await.unwrap();
        for key in down.split(',') {
            raw.send(&parse("", "SELECT name FROM users WHERE id = $1", &[]))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            let msgs = raw
                .exchange(&[bind("", &[(0, Some(key.as_bytes()))], 0), execute(), sync()])
                .await
                .unwrap();
            assert_eq!(
                shardline_tests::tags(&msgs),
                b"12DCZ",
                "{shards} shard(s), key {key}: {msgs:?}"
            );
            // A read acted on before its Sync (pg-cursor: Parse, Bind,
            // Execute with a row limit, Flush) is meant for the primary,
            // as the rest of its unit may write; with the primary down it
            // is read from a replica.
            raw.send(
                &[
                    parse("", "SELECT name FROM users WHERE id = $1", &[]),
                    bind("", &[(0, Some(key.as_bytes()))], 0),
                    shardline_tests::wire::execute_rows(1),
                    shardline_tests::wire::flush(),
                ]
                .concat(),
            )
            .await
            .unwrap();
            let mut got = Vec::new();
            while !matches!(got.last(), Some(b's' | b'C' | b'E')) {
                let (tag, _) = raw.recv(Duration::from_secs(10)).await.unwrap().unwrap();
                got.push(tag);
            }
            let msgs = raw.exchange(&[sync()]).await.unwrap();
            got.extend(shardline_tests::tags(&msgs));
            assert_eq!(got, b"12DsZ", "{shards} shard(s), key {key}, Flush");
        }
        if shards > 1 {
            // The whole default shard down: what any shard answers (an
            // application's health check, a transaction's first statement)
            // is answered by the other, and its keys are read.
            env.backend
                .stop_node(env.shard_replica(default), "immediate")
                .unwrap();
            let replica = &env.proxy.as_ref().unwrap().shared.topology.shards[default].nodes[1];
            let started = std::time::Instant::now();
            while !replica.is_down() {
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "the replica's check"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let c = env.connect().await;
            for sql in ["SELECT 1", "SELECT pg_catalog.version()"] {
                c.simple_query(sql)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
                c.query(sql, &[])
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
            c.batch_execute("BEGIN").await.unwrap();
            c.simple_query("SELECT pg_catalog.version()")
                .await
                .expect("a transaction's first statement for any shard");
            let key: i64 = up.split(',').next().unwrap().parse().unwrap();
            let name: String = c
                .query_one("SELECT name FROM users WHERE id = $1", &[&key])
                .await
                .unwrap()
                .get(0);
            assert_eq!(name, format!("user {key}"));
            c.batch_execute("COMMIT").await.unwrap();
            // The down shard's keys: a read error naming the outage, not
            // the user's writes.
            let key: i64 = down.split(',').next().unwrap().parse().unwrap();
            let err = c
                .query_one("SELECT name FROM users WHERE id = $1", &[&key])
                .await
                .expect_err("every node of the key's shard is down");
            let message = err
                .as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or_default();
            assert_eq!(
                shardline_tests::sqlstate(&err).as_deref(),
                Some("57P03"),
                "{err:?}"
            );
            assert!(
                message.contains("no replica is up") && !message.contains("read-your-writes"),
                "{message}"
            );
        }
    }
}

/// A transaction sent with its reads (a query string `BEGIN; SELECT ...;
/// COMMIT`, or an extended unit of BEGIN and a read, as PgJDBC sends with
/// autocommit off: by hand and by PgJDBC itself) reads on as the same statements sent one by one do:
/// `BEGIN READ ONLY` in such a string runs on a replica, and while the
/// shard's primary is down a plain BEGIN with reads begins on a replica
/// too (read-only there: a write in it fails with 25006); one running on
/// the primary as it stops runs again there, whole. What a hot standby
/// refuses (READ WRITE, SERIALIZABLE) waits for the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_sent_with_its_reads_reads_on_while_the_primary_is_down() {
    use shardline_tests::wire::{bind, execute, parse, query, sync};
    for shards in [1, 2] {
        let (env, c, default, keys, _) = users_by_default_shard(shards, false).await;
        let key = keys[0];
        let read = format!("SELECT name, pg_is_in_recovery() FROM users WHERE id = {key}");
        let rows = |msgs: Vec<tokio_postgres::SimpleQueryMessage>| -> Vec<(String, String)> {
            msgs.into_iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => {
                        Some((r.get(0).unwrap().to_string(), r.get(1).unwrap().to_string()))
                    }
                    _ => None,
                })
                .collect()
        };
        let name = format!("user {key}");
        let on_replica = vec![(name.clone(), "t".to_string())];
        // With the primary up, a READ ONLY transaction sent whole goes to
        // a replica once it has the user's writes (read-your-writes).
        shardline_tests::wait_for("a READ ONLY transaction string on a replica", || {
            let (c, sql, on_replica) =
                (&c, format!("BEGIN READ ONLY; {read}; COMMIT"), &on_replica);
            async move { rows(c.simple_query(&sql).await.unwrap()) == *on_replica }
        })
        .await;
        // The primary stops in the middle of such a transaction: nothing
        // of it reached the client, so it runs again, whole, on a replica.
        let primary = env.shard_primary(default);
        let slow = format!("BEGIN; SELECT pg_sleep(1.5), name FROM users WHERE id = {key}; COMMIT");
        let mut raw = shardline_tests::RawClient::login(env.port).await.unwrap();
        raw.send(&query(&slow)).await.unwrap();
        let running = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE query = '{}'",
            slow.replace('\'', "''")
        );
        shardline_tests::wait_for("the transaction running on the primary", || {
            let seen = env.sql_on(primary, &running) == "1";
            async move { seen }
        })
        .await;
        env.backend.stop_node(primary, "immediate").unwrap();
        let answer = raw.until_ready().await.unwrap();
        assert_eq!(
            shardline_tests::tags(&answer),
            b"CTDCCZ",
            "{shards} shard(s): {answer:?}"
        );
        assert!(
            answer
                .iter()
                .any(|m| m.0 == b'D' && m.1.ends_with(name.as_bytes())),
            "{answer:?}"
        );
        let c = env.connect().await;
        for begin in [
            "BEGIN",
            "BEGIN READ ONLY",
            "START TRANSACTION ISOLATION LEVEL REPEATABLE READ",
        ] {
            let got = c
                .simple_query(&format!("{begin}; {read}; COMMIT"))
                .await
                .unwrap_or_else(|e| panic!("{shards} shard(s), {begin}: {e}"));
            assert_eq!(rows(got), on_replica, "{begin}");
        }
        // Left open: it goes on on the replica, where a write fails.
        let got = c.simple_query(&format!("BEGIN; {read}")).await.unwrap();
        assert_eq!(rows(got), on_replica);
        let e = c
            .simple_query(&format!("UPDATE users SET name = 'x' WHERE id = {key}"))
            .await
            .expect_err("a write in a transaction begun on a replica");
        assert_eq!(
            shardline_tests::sqlstate(&e).as_deref(),
            Some("25006"),
            "{e}"
        );
        c.simple_query("ROLLBACK").await.unwrap();
        // What a hot standby refuses waits for the primary: 08006.
        for begin in ["BEGIN READ WRITE", "BEGIN ISOLATION LEVEL SERIALIZABLE"] {
            let e = c
                .simple_query(&format!("{begin}; {read}; COMMIT"))
                .await
                .expect_err(begin);
            assert_eq!(
                shardline_tests::sqlstate(&e).as_deref(),
                Some("08006"),
                "{begin}: {e}"
            );
        }
        // By the extended protocol, BEGIN and the first read in one unit.
        let k = key.to_string();
        let msgs = raw
            .exchange(&[
                parse("", "BEGIN", &[]),
                bind("", &[], 0),
                execute(),
                parse(
                    "",
                    "SELECT name, pg_is_in_recovery() FROM users WHERE id = $1",
                    &[],
                ),
                bind("", &[(0, Some(k.as_bytes()))], 0),
                execute(),
                sync(),
            ])
            .await
            .unwrap();
        assert_eq!(
            shardline_tests::tags(&msgs),
            b"12C12DCZ",
            "{shards} shard(s): {msgs:?}"
        );
        assert_eq!(msgs.last().unwrap().1, b"T", "in the transaction");
        let msgs = raw.exchange(&[query("COMMIT")]).await.unwrap();
        assert_eq!(shardline_tests::tags(&msgs), b"CZ", "{msgs:?}");
        // PgJDBC itself, autocommit off.
        let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        let driver = shardline_tests::drivers::jdbc_primary_down(&env);
        shardline_tests::drivers::run_checks(driver, &keys).await;
    }
}
