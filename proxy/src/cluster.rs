//! Real Postgres topologies from local binaries: N shards, each a primary and
//! streaming replicas, in a temporary directory on free loopback ports.
//! `shardline demo` runs one; the integration tests run many.
//!
//! Speed matters (tests start dozens): `initdb` runs once into a template shared
//! by every process, and each node is a copy of it. Replicas are copies taken
//! before their primary first starts, so they share its history and stream from
//! its first WAL record without a base backup. Sockets live outside the data
//! directories. Postgres refuses to run as root, so as root every server runs as
//! the `postgres` user.

use anyhow::{anyhow, bail, Context as _, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The directory holding `pg_ctl`, `initdb`, `postgres`, `psql`.
#[derive(Debug, Clone)]
pub struct PgBin {
    pub bindir: PathBuf,
}

impl PgBin {
    /// Looks in PATH, then `pg_config --bindir`, then /usr/lib/postgresql/*/bin.
    pub fn find() -> Result<PgBin> {
        let has_all = |d: &Path| {
            ["pg_ctl", "initdb", "postgres"]
                .iter()
                .all(|b| d.join(b).is_file())
        };
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                if has_all(&dir) {
                    // Follow symlinks (Debian links into /usr/lib/postgresql/N/bin).
                    let real = std::fs::canonicalize(dir.join("pg_ctl")).ok();
                    let dir = real
                        .and_then(|p| p.parent().map(Path::to_path_buf))
                        .filter(|d| has_all(d))
                        .unwrap_or(dir);
                    return Ok(PgBin { bindir: dir });
                }
            }
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if out.status.success() && has_all(&dir) {
                return Ok(PgBin { bindir: dir });
            }
        }
        let mut candidates: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let v: u32 = e.file_name().to_str()?.parse().ok()?;
                let bin = e.path().join("bin");
                has_all(&bin).then_some((v, bin))
            })
            .collect();
        candidates.sort();
        candidates
            .pop()
            .map(|(_, bindir)| PgBin { bindir })
            .ok_or_else(|| anyhow!("PostgreSQL server binaries not found (looked in PATH, pg_config --bindir and /usr/lib/postgresql/*/bin); install them, e.g. apt-get install postgresql"))
    }

    pub fn cmd(&self, name: &str) -> Command {
        Command::new(self.bindir.join(name))
    }

    fn version(&self) -> String {
        self.cmd("postgres")
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    }
}

/// The user servers run as when we are root.
#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

fn run_as() -> Result<Option<RunAs>> {
    let id = |flag: &str, who: Option<&str>| -> Result<u32> {
        let mut c = Command::new("id");
        c.arg(flag);
        if let Some(w) = who {
            c.arg(w);
        }
        let out = c.output().context("running id")?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| anyhow!("cannot read {} of {:?}", flag, who))
    };
    if id("-u", None)? != 0 {
        return Ok(None);
    }
    let uid = id("-u", Some("postgres")).context(
        "running as root, and Postgres refuses to run as root; create a `postgres` user (apt-get install postgresql does)",
    )?;
    Ok(Some(RunAs {
        uid,
        gid: id("-g", Some("postgres"))?,
    }))
}

#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub shards: usize,
    pub replicas_per_shard: usize,
}

#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub name: String,
    pub shard: String,
    pub is_primary: bool,
    pub port: u16,
    pub data_dir: PathBuf,
    pub socket_dir: PathBuf,
}

/// A running set of Postgres servers; stopped and removed on drop.
pub struct LocalCluster {
    pub root: PathBuf,
    pub nodes: Vec<NodeInfo>,
    bin: PgBin,
    run_as: Option<RunAs>,
}

/// An `openssl` command writing a self-signed EC certificate for 127.0.0.1.
pub fn self_signed_cert_command(cert: &Path, key: &Path) -> Command {
    let mut c = Command::new("openssl");
    c.args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ])
    .args(["-days", "2", "-subj", "/CN=127.0.0.1"])
    .arg("-keyout")
    .arg(key)
    .arg("-out")
    .arg(cert);
    c
}

/// A free loopback port for a server to take once we release it. Picked
/// below the OS's ephemeral range (32768 and up on Linux), where the ports
/// of outgoing connections and of listeners on port 0 come from: a port
/// released there can be taken by any connection before the server binds
/// it, which made node starts fail under load. A port is handed out once
/// per process: a port picked but not bound yet (the next node of the
/// same cluster, or another test's, started at the same time) would
/// otherwise pass the bind test again and be given twice.
pub fn free_port() -> Result<u16> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for _ in 0..100 {
        let port = 20_000 + rand::random::<u16>() % 12_000;
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return Ok(port);
        }
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn check(out: Output, what: &str) -> Result<Output> {
    if out.status.success() {
        Ok(out)
    } else {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

const SERVER_CONF: &str = "
listen_addresses = '127.0.0.1'
wal_level = logical
max_wal_senders = 16
max_replication_slots = 16
wal_keep_size = '256MB'
hot_standby = on
hot_standby_feedback = on
fsync = off
synchronous_commit = on
full_page_writes = off
shared_buffers = '32MB'
max_connections = 300
max_prepared_transactions = 50
password_encryption = 'scram-sha-256'
log_min_messages = warning
log_line_prefix = '%m [%p] '
";

/// Roles named here get these server-side auth methods; every other role uses SCRAM.
const HBA: &str = "
local all all trust
host replication all 127.0.0.1/32 trust
host all postgres 127.0.0.1/32 trust
host all sl_trust 127.0.0.1/32 trust
host all sl_md5 127.0.0.1/32 md5
host all sl_password 127.0.0.1/32 password
host all all 127.0.0.1/32 scram-sha-256
";

/// Removes clusters left behind by processes that died without cleaning up
/// (a test killed by a signal never runs its destructors): for each
/// `shardline-<pid>-*` directory whose process is gone, stops the servers
/// listed in its nodes' `postmaster.pid` and deletes it.
fn sweep_abandoned() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(owner) = name
            .strip_prefix("shardline-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 only checks whether the process exists.
        if unsafe { libc::kill(owner, 0) } == 0 {
            continue;
        }
        let dir = entry.path();
        for node in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let pidfile = node.path().join("postmaster.pid");
            let Some(pid) = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|t| t.lines().next()?.trim().parse::<i32>().ok())
            else {
                continue;
            };
            // Only a postmaster still serving this directory.
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&*node.path().to_string_lossy()) {
                // SAFETY: SIGQUIT (immediate shutdown) to a postmaster of ours.
                unsafe { libc::kill(pid, libc::SIGQUIT) };
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

impl LocalCluster {
    pub fn start(spec: &ClusterSpec) -> Result<LocalCluster> {
        sweep_abandoned();
        let bin = PgBin::find()?;
        let run_as = run_as()?;
        let template = template(&bin, run_as)?;
        let root = std::env::temp_dir().join(format!(
            "shardline-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&root)?;
        let mut cluster = LocalCluster {
            root: root.clone(),
            nodes: Vec::new(),
            bin,
            run_as,
        };
        for s in 0..spec.shards {
            let shard = format!("s{s}");
            let primary_port = free_port()?;
            for r in 0..=spec.replicas_per_shard {
                let is_primary = r == 0;
                let name = if is_primary {
                    format!("{shard}-primary")
                } else {
                    format!("{shard}-replica{r}")
                };
                let data_dir = root.join(&name);
                let socket_dir = root.join(format!("{name}.sock"));
                std::fs::create_dir_all(&socket_dir)?;
                check(
                    Command::new("cp")
                        .arg("-a")
                        .arg(&template)
                        .arg(&data_dir)
                        .output()?,
                    "copying the template",
                )?;
                let port = if is_primary {
                    primary_port
                } else {
                    free_port()?
                };
                if !is_primary {
                    std::fs::write(data_dir.join("standby.signal"), "")?;
                    let conninfo = format!(
                        "\nprimary_conninfo = 'host=127.0.0.1 port={primary_port} user=postgres application_name={name}'\n"
                    );
                    append(&data_dir.join("postgresql.auto.conf"), &conninfo)?;
                }
                cluster.nodes.push(NodeInfo {
                    name,
                    shard: shard.clone(),
                    is_primary,
                    port,
                    data_dir,
                    socket_dir,
                });
            }
        }
        cluster.chown(&root)?;
        // Primaries first: replicas connect to them as they come up.
        for primaries in [true, false] {
            let idx: Vec<usize> = (0..cluster.nodes.len())
                .filter(|&i| cluster.nodes[i].is_primary == primaries)
                .collect();
            let children = idx
                .iter()
                .map(|&i| cluster.pg_ctl_start(i))
                .collect::<Result<Vec<_>>>()?;
            for (child, &i) in children.into_iter().zip(&idx) {
                let out = child.wait_with_output()?;
                if !out.status.success() {
                    let log = std::fs::read_to_string(cluster.log_path(i)).unwrap_or_default();
                    bail!(
                        "starting {} failed: {}\n{log}",
                        cluster.nodes[i].name,
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
        }
        Ok(cluster)
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.root.join(format!("{}.log", self.nodes[i].name))
    }

    fn as_server_user(&self, c: &mut Command) {
        use std::os::unix::process::CommandExt;
        if let Some(r) = self.run_as {
            c.uid(r.uid).gid(r.gid);
        }
    }

    fn chown(&self, path: &Path) -> Result<()> {
        if let Some(r) = self.run_as {
            check(
                Command::new("chown")
                    .arg("-R")
                    .arg(format!("{}:{}", r.uid, r.gid))
                    .arg(path)
                    .output()?,
                "chown",
            )?;
        }
        Ok(())
    }

    fn pg_ctl_start(&self, i: usize) -> Result<std::process::Child> {
        let n = &self.nodes[i];
        let mut c = self.bin.cmd("pg_ctl");
        c.arg("-D")
            .arg(&n.data_dir)
            .arg("-l")
            .arg(self.log_path(i))
            .arg("-w")
            .arg("-t")
            .arg("60")
            .arg("-o")
            .arg(format!("-p {} -k {}", n.port, n.socket_dir.display()))
            .arg("start")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.as_server_user(&mut c);
        Ok(c.spawn()?)
    }

    /// Starts a stopped node again.
    pub fn start_node(&self, i: usize) -> Result<()> {
        let out = self.pg_ctl_start(i)?.wait_with_output()?;
        check(out, &format!("starting {}", self.nodes[i].name)).map(|_| ())
    }

    /// Stops a node: `fast` (clean) or `immediate` (as if it crashed).
    pub fn stop_node(&self, i: usize, mode: &str) -> Result<()> {
        let mut c = self.bin.cmd("pg_ctl");
        c.arg("-D")
            .arg(&self.nodes[i].data_dir)
            .args(["-m", mode, "-w", "-t", "60", "stop"]);
        self.as_server_user(&mut c);
        check(c.output()?, &format!("stopping {}", self.nodes[i].name)).map(|_| ())
    }

    /// Gives a node a self-signed certificate and turns TLS on (`ssl = on`).
    pub fn enable_tls(&self, i: usize) -> Result<()> {
        let n = &self.nodes[i];
        let mut c = self_signed_cert_command(
            &n.data_dir.join("server.crt"),
            &n.data_dir.join("server.key"),
        );
        self.as_server_user(&mut c);
        check(
            c.output().context("running openssl")?,
            "generating a server certificate",
        )?;
        self.psql(
            n,
            "postgres",
            "ALTER SYSTEM SET ssl = on; SELECT pg_reload_conf();",
        )?;
        Ok(())
    }

    pub fn primary(&self, shard: usize) -> &NodeInfo {
        self.nodes
            .iter()
            .filter(|n| n.is_primary)
            .nth(shard)
            .expect("shard exists")
    }

    /// Runs SQL as the superuser over the node's Unix socket; returns unaligned rows.
    /// Statements run one by one (not in one transaction), stopping at the first error.
    pub fn psql(&self, node: &NodeInfo, database: &str, sql: &str) -> Result<String> {
        let socket = node.socket_dir.display().to_string();
        let port = node.port.to_string();
        let args = ["-U", "postgres", "-h", &socket, "-p", &port, "-d", database];
        self.run_psql(&args, sql, &format!("psql on {}", node.name))
    }

    /// Runs SQL through psql with a connection URL (e.g. through the proxy).
    pub fn psql_url(&self, url: &str, sql: &str) -> Result<String> {
        self.run_psql(&["-d", url], sql, "psql through the proxy")
    }

    fn run_psql(&self, target: &[&str], sql: &str, what: &str) -> Result<String> {
        use std::io::Write;
        let mut child = Command::new(self.bin.bindir.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-f", "-"])
            .args(target)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running psql")?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(sql.as_bytes())?;
        }
        let out = check(child.wait_with_output()?, what)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Waits until every replica of the cluster has replayed what its primary has written.
    pub fn wait_replicas_caught_up(&self, timeout: Duration) -> Result<()> {
        wait_caught_up(&self.nodes, |n, sql| self.psql(n, "postgres", sql), timeout)
    }
}

/// Waits until each replica among `nodes` has replayed what its shard's
/// primary had written when asked; `psql` runs SQL on a node as the
/// superuser (local processes and containers reach their nodes differently).
pub fn wait_caught_up(
    nodes: &[NodeInfo],
    psql: impl Fn(&NodeInfo, &str) -> Result<String>,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    for p in nodes.iter().filter(|n| n.is_primary) {
        let lsn = psql(p, "SELECT pg_current_wal_lsn()")?;
        let sql = format!("SELECT coalesce(pg_last_wal_replay_lsn() >= '{lsn}', false)");
        for r in nodes.iter().filter(|n| !n.is_primary && n.shard == p.shard) {
            while psql(r, &sql)? != "t" {
                if Instant::now() > deadline {
                    bail!("replica {} did not catch up with {lsn}", r.name);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    Ok(())
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].data_dir.join("postmaster.pid").exists() {
                let _ = self.stop_node(i, "immediate");
            }
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// An initdb'd, configured data directory shared by every process of this
/// machine for this Postgres version; created once, atomically.
fn template(bin: &PgBin, run_as: Option<RunAs>) -> Result<PathBuf> {
    let version = bin.version();
    let tag: String = format!("{version}{SERVER_CONF}{HBA}")
        .bytes()
        .fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        })
        .to_string();
    let base = std::env::temp_dir().join("shardline-templates");
    let dir = base.join(&tag);
    if dir.join("PG_VERSION").exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&base)?;
    let tmp = base.join(format!(
        "{tag}.tmp-{}-{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&tmp)?;
    let chown = |p: &Path| -> Result<()> {
        if let Some(r) = run_as {
            check(
                Command::new("chown")
                    .arg("-R")
                    .arg(format!("{}:{}", r.uid, r.gid))
                    .arg(p)
                    .output()?,
                "chown",
            )?;
        }
        Ok(())
    };
    chown(&tmp)?;
    let mut c = bin.cmd("initdb");
    c.arg("-D").arg(&tmp).args([
        "-U",
        "postgres",
        "-A",
        "trust",
        "-E",
        "UTF8",
        "--locale=C",
        "--no-sync",
        "--no-instructions",
    ]);
    if let Some(r) = run_as {
        use std::os::unix::process::CommandExt;
        c.uid(r.uid).gid(r.gid);
    }
    check(c.output().context("running initdb")?, "initdb")?;
    append(&tmp.join("postgresql.conf"), SERVER_CONF)?;
    std::fs::write(tmp.join("pg_hba.conf"), HBA)?;
    chown(&tmp)?;
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another process won the race; use its template.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    if !dir.join("PG_VERSION").exists() {
        bail!(
            "could not create the Postgres template in {}",
            dir.display()
        );
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_port_is_handed_out_once() {
        // 300 random picks of 12,000 ports repeat one almost surely
        // (about 98%) unless the ports given are remembered.
        let ports: Vec<u16> = (0..300)
            .map(|_| super::free_port().expect("a free port"))
            .collect();
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len());
    }
}
