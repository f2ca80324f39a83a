//! SIGINT/SIGTERM behaviour: stop accepting, let open transactions finish (up
//! to shutdown_timeout), close idle clients with 57P01, then exit. Tested on
//! the real binary with a real signal.

use shardline_tests::{sqlstate, Env, EnvOptions};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_open_transactions_finish() {
    let env = Env::start_with(EnvOptions {
        proxy_toml: "shutdown_timeout = \"20s\"\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    env.sql("CREATE TABLE t (id int); GRANT ALL ON t TO app;");
    // Run the real binary on its own port with the same servers.
    let port = shardline::cluster::free_port().unwrap();
    let text = env.config_text.replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    let tmp = shardline_tests::TempDir::new("shutdown");
    let cfg = tmp.write("shardline.toml", &text);
    let bin = shardline_tests::shardline_binary().unwrap();
    // Started with a soft limit on open files below the hard one, as a
    // shell's 1,024 often is: the proxy raises it to the hard limit.
    let hard = open_files_limit(None).1;
    let low = (hard / 2).min(512);
    let mut command = Command::new(&bin);
    command.arg("--config").arg(&cfg).stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe; the closure allocates nothing.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
            let lim = libc::rlimit {
                rlim_cur: low,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = Reaped(command.spawn().unwrap());
    // Its log, line by line, for the waits below.
    let log = shardline_tests::Log::capture(child.0.stderr.take().unwrap());
    let logged = |what: &'static str| {
        let log = log.clone();
        async move { log.wait_for(what).await }
    };
    let conn = format!("host=127.0.0.1 port={port} user=app password=app dbname=app");
    let mut client = None;
    for _ in 0..100 {
        if let Ok((c, conn)) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await {
            tokio::spawn(conn);
            client = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let busy = client.expect("proxy started");
    let (soft, hard_seen) = open_files_limit(Some(child.0.id()));
    assert_eq!(hard_seen, hard);
    assert!(
        soft == hard || (hard == libc::RLIM_INFINITY && soft >= 1 << 20),
        "the proxy's soft limit on open files stayed {soft} (started at {low}, hard {hard})"
    );
    let (idle, c2) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(c2);

    // SIGHUP does not end the proxy: it rereads the (unchanged) config.
    assert!(Command::new("kill")
        .arg("-HUP")
        .arg(child.0.id().to_string())
        .status()
        .unwrap()
        .success());
    logged("configuration reloaded").await;
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "SIGHUP ended the proxy"
    );
    busy.simple_query("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let signalled = Instant::now();
    assert!(Command::new("kill")
        .arg("-TERM")
        .arg(child.0.id().to_string())
        .status()
        .unwrap()
        .success());
    logged("shutting down").await;
    shardline_tests::wait_for("the idle client to be closed", || {
        let closed = idle.is_closed();
        async move { closed }
    })
    .await;

    // No new clients.
    assert!(tokio_postgres::connect(&conn, tokio_postgres::NoTls)
        .await
        .is_err());
    // The idle client was told why it is being closed.
    let e = idle.simple_query("SELECT 1").await.unwrap_err();
    assert!(
        idle.is_closed() || sqlstate(&e).as_deref() == Some("57P01"),
        "{e:?}"
    );
    // The open transaction finishes and commits.
    busy.simple_query("INSERT INTO t VALUES (2); COMMIT")
        .await
        .unwrap();
    assert_eq!(env.sql("SELECT count(*) FROM t"), "2");

    // Then the proxy exits on its own, well before the 20s timeout.
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(10),
            "proxy did not exit"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success());
}

/// The proxy's process, killed if the test ends early (a failed assertion)
/// so that it does not outlive the test holding its port and output.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The soft and hard limits on open files of process `pid` (`None`: this
/// one), from /proc.
fn open_files_limit(pid: Option<u32>) -> (libc::rlim_t, libc::rlim_t) {
    let path = match pid {
        Some(p) => format!("/proc/{p}/limits"),
        None => "/proc/self/limits".into(),
    };
    let text = std::fs::read_to_string(&path).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("no open files line in {path}:\n{text}"));
    let value = |w: &str| match w {
        "unlimited" => libc::RLIM_INFINITY,
        n => n.parse().unwrap(),
    };
    let words: Vec<&str> = line["Max open files".len()..].split_whitespace().collect();
    (value(words[0]), value(words[1]))
}
