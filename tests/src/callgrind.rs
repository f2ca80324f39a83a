//! User-space instructions per transaction of a proxy, counted by
//! callgrind: a figure that does not move with the machine's load, where
//! CPU seconds move by several percent between runs. The kernel's share
//! (the sockets, most of a proxy's CPU) is not in it.

use anyhow::{Context as _, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A child process killed (and reaped) when dropped, so an error that
/// ends a benchmark early leaves no proxy running.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A proxy's program and config, to start another instance on another port.
pub struct Launch {
    pub program: PathBuf,
    /// The flag ahead of the config's path, if the program wants one.
    pub config_flag: Option<&'static str>,
    pub config: PathBuf,
    /// The config's line naming the port, and how to write it for another.
    pub port_line: String,
    pub port_text: fn(u16) -> String,
    /// Run as this user (PgBouncer refuses root).
    pub ids: Option<(u32, u32)>,
    /// The function that opens a server connection (its login: a SCRAM
    /// exchange costs tens of millions of instructions), whose cost is
    /// left out: a pool that grows during the counted run would otherwise
    /// charge one login to a few thousand transactions. `None` when the
    /// program has no symbols to find it by.
    pub connect_fn: Option<&'static str>,
}

/// A Shardline config's listen line for `port` (a `Launch::port_text`).
pub fn shardline_listen(port: u16) -> String {
    format!("listen = \"127.0.0.1:{port}\"")
}

/// The proxy's function that opens a server connection.
pub const SHARDLINE_CONNECT: &str =
    "shardline::server::conn::ServerConnection::connect::{{closure}}";

/// Instructions spent in `function` and what it calls (inclusive), over
/// its calls from outside it, in a callgrind dump's text.
pub fn inclusive_cost<'a>(dump: &'a str, function: &str) -> f64 {
    // Whether each name id is `function` (names are compressed: `fn=(7)
    // name` the first time an id is used, `fn=(7)` after).
    let mut is_it: std::collections::HashMap<&str, bool> = std::collections::HashMap::new();
    let mut matches = |rest: &'a str| -> bool {
        match rest.split_once(' ') {
            Some((id, given)) => *is_it.entry(id).or_insert(given == function),
            None => is_it.get(rest).copied().unwrap_or(false),
        }
    };
    let (mut total, mut caller_is_it, mut callee_is_it) = (0.0, false, false);
    // After a `calls=` line of a counted call: its cost line is next.
    let mut cost_next = false;
    for line in dump.lines() {
        if cost_next {
            cost_next = false;
            total += line
                .split_whitespace()
                .last()
                .and_then(|c| c.parse::<f64>().ok())
                .unwrap_or(0.0);
        } else if let Some(rest) = line.strip_prefix("fn=") {
            caller_is_it = matches(rest);
        } else if let Some(rest) = line.strip_prefix("cfn=") {
            callee_is_it = matches(rest);
        } else if line.starts_with("calls=") {
            cost_next = callee_is_it && !caller_is_it;
        }
    }
    total
}

/// Whether valgrind is installed (said on stdout when it is not).
pub fn available() -> bool {
    let there = Command::new("valgrind").arg("--version").output().is_ok();
    if !there {
        println!("\nvalgrind not installed (apt-get install valgrind): no instruction counts");
    }
    there
}

/// Instructions per transaction of `launch` for each of `runs` (a name and
/// pgbench's arguments, without the port and without `-t`): an instance of
/// its own under callgrind in `dir`, warmed up (20 transactions per
/// client), its counters zeroed, then `per_client` transactions per client
/// of `clients` counted and dumped, less what opening server connections
/// cost (`Launch::connect_fn`). `pgbench(port, args)` runs pgbench. A run
/// that fails (PgBouncer's prepared mode) is said and gives `None`.
pub fn per_transaction(
    dir: &Path,
    name: &str,
    launch: &Launch,
    runs: &[(&str, Vec<&str>)],
    pgbench: &dyn Fn(u16, &[&str]) -> Result<String>,
    clients: u32,
    per_client: u32,
) -> Result<Vec<Option<f64>>> {
    use std::os::unix::process::CommandExt;
    let port = shardline::cluster::free_port()?;
    std::fs::create_dir_all(dir)?;
    let text = std::fs::read_to_string(&launch.config)?;
    let config = dir.join(launch.config.file_name().context("config name")?);
    std::fs::write(
        &config,
        text.replace(&launch.port_line, &(launch.port_text)(port)),
    )?;
    let as_user = |cmd: &mut Command| {
        if let Some((uid, gid)) = launch.ids {
            let _ = Command::new("chown")
                .arg("-R")
                .arg(format!("{uid}:{gid}"))
                .arg(dir)
                .status();
            cmd.uid(uid).gid(gid);
        }
    };
    let mut cmd = Command::new("valgrind");
    cmd.arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}/out.%p", dir.display()))
        .arg(&launch.program)
        .args(launch.config_flag)
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("valgrind.log"))?);
    as_user(&mut cmd);
    crate::own_session(&mut cmd);
    let child = Reaped(cmd.spawn()?);
    let pid = child.0.id().to_string();
    let control = |what: &str| -> Result<()> {
        let mut c = Command::new("callgrind_control");
        c.arg(what)
            .arg(&pid)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        as_user(&mut c);
        anyhow::ensure!(c.status()?.success(), "callgrind_control {what} {pid}");
        Ok(())
    };
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "{name} did not start under valgrind (see {})",
            dir.join("valgrind.log").display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let fails = |run: &str, e: anyhow::Error| {
        let why = e.to_string();
        let why = why
            .lines()
            .find(|l| l.contains("ERROR"))
            .unwrap_or("failed");
        println!("instructions: {run} through {name} fails: {why}");
    };
    let dumps = || -> Result<Vec<PathBuf>> {
        Ok(std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("out."))
            })
            .collect())
    };
    let clients_text = clients.to_string();
    let per_client_text = per_client.to_string();
    let txns = f64::from(per_client) * f64::from(clients);
    let mut counts = Vec::new();
    for (run, flags) in runs {
        let mut a = vec!["-n", "-c", clients_text.as_str(), "-j", "2"];
        a.extend_from_slice(flags);
        // Connections, caches and pools warmed; then only the run counts.
        if let Err(e) = pgbench(port, &[a.as_slice(), &["-t", "20"]].concat()) {
            fails(run, e);
            counts.push(None);
            continue;
        }
        // Counted twice, the lower kept: a count can only be inflated (a
        // zeroing command that reaches the program late, or not at all,
        // leaves earlier work in the dump), and one run in a few dozen
        // was, through PgBouncer and Shardline alike.
        let mut best: Option<f64> = None;
        for _ in 0..2 {
            control("-z")?;
            let result = pgbench(
                port,
                &[a.as_slice(), &["-t", per_client_text.as_str()]].concat(),
            );
            let before = dumps()?;
            control("-d")?;
            // The dump this command wrote: the file that was not there.
            let waited = std::time::Instant::now();
            let dump = loop {
                if let Some(p) = dumps()?.into_iter().find(|p| !before.contains(p)) {
                    break p;
                }
                anyhow::ensure!(
                    waited.elapsed() < Duration::from_secs(30),
                    "no callgrind dump from {name}"
                );
                std::thread::sleep(Duration::from_millis(100));
            };
            std::thread::sleep(Duration::from_millis(300));
            let text = std::fs::read_to_string(&dump)?;
            let summary: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix("summary: "))
                .and_then(|v| v.trim().parse().ok())
                .context("no summary in the callgrind dump")?;
            let total = summary - launch.connect_fn.map_or(0.0, |f| inclusive_cost(&text, f));
            match result {
                Ok(_) => best = Some(best.map_or(total, |b: f64| b.min(total))),
                Err(e) => {
                    fails(run, e);
                    best = None;
                    break;
                }
            }
        }
        counts.push(best.map(|t| t / txns));
    }
    drop(child);
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_functions_inclusive_cost_counts_calls_from_outside_it_only() {
        let dump = "events: Ir\nsummary: 1000\n\
            fn=(1) main\n5 10\ncfn=(2) login\ncalls=1 3\n5 700\ncfn=(3) work\ncalls=2 4\n6 200\n\
            fn=(2)\n3 600\ncfn=(2)\ncalls=1 3\n* 50\ncfn=(3)\ncalls=1 4\n+1 40\n\
            fn=(3)\n4 240\ncfn=(2)\ncalls=1 3\n* 60\n";
        // main -> login 700, work -> login 60; login's call to itself is in
        // the 700 already.
        assert_eq!(inclusive_cost(dump, "login"), 760.0);
        // main -> work 200, login -> work 40.
        assert_eq!(inclusive_cost(dump, "work"), 240.0);
        assert_eq!(inclusive_cost(dump, "absent"), 0.0);
    }
}
