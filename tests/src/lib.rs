//! Test harness: real Postgres topologies and a Shardline proxy in front of them.
//!
//! A [`Backend`] starts the servers; [`LocalProcesses`] runs local binaries,
//! `containers::ContainerCluster` (feature `containers`) the project's images. An
//! [`Env`] is one topology, its roles and data, and a proxy configured for it.
//! Dropping an `Env` stops the proxy and every server, even when a test fails.

pub mod callgrind;
#[cfg(feature = "containers")]
pub mod containers;
pub mod drivers;
pub mod relay;

use anyhow::{Context as _, Result};
use shardline::cluster::{ClusterSpec, LocalCluster, NodeInfo};
use shardline::Proxy;
use shardline_config::Config;
use std::time::Duration;
use tokio_postgres::{Client, NoTls};

/// Starts and controls the Postgres servers of one topology.
pub trait Backend: Send + Sync {
    /// The back end itself, for what only one kind offers (a container's
    /// network cut: `containers::cluster`).
    fn as_any(&self) -> &dyn std::any::Any;
    fn nodes(&self) -> &[NodeInfo];
    /// Runs SQL as the superuser on a node; returns unaligned rows.
    fn psql(&self, node: &NodeInfo, database: &str, sql: &str) -> Result<String>;
    fn stop_node(&self, index: usize, mode: &str) -> Result<()>;
    fn start_node(&self, index: usize) -> Result<()>;
    fn wait_replicas_caught_up(&self, timeout: Duration) -> Result<()>;
    /// Turns TLS on for a node, with a self-signed certificate.
    fn enable_tls(&self, index: usize) -> Result<()>;
}

/// Local Postgres processes (see `shardline::cluster`).
pub struct LocalProcesses(pub LocalCluster);

impl Backend for LocalProcesses {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn nodes(&self) -> &[NodeInfo] {
        &self.0.nodes
    }
    fn psql(&self, node: &NodeInfo, database: &str, sql: &str) -> Result<String> {
        self.0.psql(node, database, sql)
    }
    fn stop_node(&self, index: usize, mode: &str) -> Result<()> {
        self.0.stop_node(index, mode)
    }
    fn start_node(&self, index: usize) -> Result<()> {
        self.0.start_node(index)
    }
    fn wait_replicas_caught_up(&self, timeout: Duration) -> Result<()> {
        self.0.wait_replicas_caught_up(timeout)
    }
    fn enable_tls(&self, index: usize) -> Result<()> {
        self.0.enable_tls(index)
    }
}

/// A self-signed certificate and key in a fresh directory (removed when the
/// `TempDir` drops): (dir, cert, key).
pub fn self_signed_cert() -> Result<(TempDir, std::path::PathBuf, std::path::PathBuf)> {
    let dir = TempDir::new("cert");
    let (cert, key) = (dir.path("cert.pem"), dir.path("key.pem"));
    let (ok, out) = run(&mut shardline::cluster::self_signed_cert_command(
        &cert, &key,
    ));
    anyhow::ensure!(ok, "openssl failed: {out}");
    Ok((dir, cert, key))
}

/// Runs psql (the real binary) with a connection string and SQL; returns (success, output).
pub fn psql(conninfo: &str, args: &[&str]) -> (bool, String) {
    let bin = shardline::cluster::PgBin::find()
        .map(|b| b.bindir.join("psql"))
        .unwrap_or_else(|_| "psql".into());
    run(std::process::Command::new(bin)
        .arg("-X")
        .arg("-v")
        .arg("ON_ERROR_STOP=1")
        .arg(conninfo)
        .args(args))
}

/// Roles created on the servers. `sl_md5`, `sl_password` and `sl_trust` are
/// authenticated by the servers with md5, cleartext and trust (see the
/// cluster's pg_hba.conf); every other role with SCRAM-SHA-256.
const ROLES: &str = "
CREATE ROLE app LOGIN PASSWORD 'app';
SET password_encryption = 'md5';
CREATE ROLE sl_md5 LOGIN PASSWORD 'md5pw';
RESET password_encryption;
CREATE ROLE sl_password LOGIN PASSWORD 'plainpw';
CREATE ROLE sl_trust LOGIN;
CREATE DATABASE app OWNER app;
GRANT ALL ON DATABASE app TO sl_md5, sl_password, sl_trust;
";

/// Users the proxy accepts in tests, by what they exercise.
pub const USERS_TOML: &str = r#"
[[users]]
name = "app"
password = "app"
database = "app"

[[users]]
name = "md5client"
auth = "md5"
password = "md5client-pw"
database = "app"
server_user = "app"
server_password = "app"

[[users]]
name = "trustclient"
auth = "trust"
database = "app"
server_user = "app"
server_password = "app"

[[users]]
name = "trustsingle"
auth = "trust"
database = "app"
pool_size = 1
server_user = "app"
server_password = "app"

[[users]]
name = "sl_md5"
password = "md5pw"
database = "app"

[[users]]
name = "sl_password"
password = "plainpw"
database = "app"

[[users]]
name = "sl_trust"
auth = "trust"
database = "app"

[[users]]
name = "sessionuser"
password = "session-pw"
database = "app"
pool_mode = "session"
server_user = "app"
server_password = "app"

[[users]]
name = "tinypool"
password = "tiny-pw"
database = "app"
pool_size = 2
server_user = "app"
server_password = "app"
"#;

/// What to start.
#[derive(Debug, Clone)]
pub struct EnvOptions {
    pub shards: usize,
    pub replicas_per_shard: usize,
    /// Extra TOML for `[proxy]` (after `listen`).
    pub proxy_toml: String,
    /// Extra TOML for `[pool]`.
    pub pool_toml: String,
    /// Extra top-level TOML (e.g. a `[tls]` table).
    pub extra_toml: String,
}

impl Default for EnvOptions {
    fn default() -> Self {
        EnvOptions {
            shards: 1,
            replicas_per_shard: 1,
            proxy_toml: String::new(),
            pool_toml: "checkout_timeout = \"3s\"\n".into(),
            extra_toml: String::new(),
        }
    }
}

/// One topology with its proxy.
pub struct Env {
    pub backend: Box<dyn Backend>,
    pub proxy: Option<Proxy>,
    pub port: u16,
    pub config_text: String,
}

impl Env {
    pub async fn start() -> Result<Env> {
        Env::start_with(EnvOptions::default()).await
    }

    /// `shards` primaries without replicas (the proxy's own config is not
    /// sharded: tests start proxies with `shards_config`).
    pub async fn primaries(shards: usize) -> Env {
        Env::start_with(EnvOptions {
            shards,
            replicas_per_shard: 0,
            ..Default::default()
        })
        .await
        .expect("primaries")
    }

    pub async fn start_with(opts: EnvOptions) -> Result<Env> {
        if let Ok(filter) = std::env::var("SHARDLINE_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
        let spec = ClusterSpec {
            shards: opts.shards,
            replicas_per_shard: opts.replicas_per_shard,
        };
        let cluster = tokio::task::spawn_blocking(move || -> Result<LocalCluster> {
            let c = LocalCluster::start(&spec)?;
            for p in c.nodes.iter().filter(|n| n.is_primary) {
                c.psql(p, "postgres", ROLES)?;
            }
            c.wait_replicas_caught_up(Duration::from_secs(30))?;
            Ok(c)
        })
        .await??;
        let shards = shardline::demo::shards_toml(&cluster);
        let backend: Box<dyn Backend> = Box::new(LocalProcesses(cluster));
        let text = format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\n{}\n[pool]\n{}\n{}\n{USERS_TOML}\n{shards}",
            opts.proxy_toml, opts.pool_toml, opts.extra_toml
        );
        let config = Config::from_toml(&text, "test.toml").context("test config")?;
        let proxy = Proxy::start(config).await?;
        let port = proxy.local_addr.port();
        Ok(Env {
            backend,
            proxy: Some(proxy),
            port,
            config_text: text,
        })
    }

    /// Two shards, each a primary and a replica, with the demo's sharding
    /// (and `extra` TOML after it), every node healthy.
    pub async fn demo_sharded(extra: &str) -> Env {
        let env = Env::start_with(EnvOptions {
            shards: 2,
            replicas_per_shard: 1,
            extra_toml: format!("{}\n{extra}", shardline::demo::demo_sharding_two_phase()),
            ..EnvOptions::default()
        })
        .await
        .expect("two shards with replicas");
        env.wait_healthy().await;
        env
    }

    pub fn primary(&self) -> &NodeInfo {
        self.backend
            .nodes()
            .iter()
            .find(|n| n.is_primary)
            .expect("a primary")
    }

    /// Runs SQL directly on the first primary as the superuser, in database `app`.
    pub fn sql(&self, sql: &str) -> String {
        self.backend
            .psql(self.primary(), "app", sql)
            .expect("direct SQL on the primary")
    }

    /// Waits until `sql` on node `index` (cluster order) answers `expected`.
    pub async fn wait_sql_on(&self, index: usize, sql: &str, expected: &str) {
        wait_answer(sql, expected, || self.sql_on(index, sql)).await
    }

    /// Waits until `sql` on the first primary answers `expected`.
    pub async fn wait_sql(&self, sql: &str, expected: &str) {
        wait_answer(sql, expected, || self.sql(sql)).await
    }

    pub fn conn_string(&self, user: &str, password: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname=app connect_timeout=10",
            self.port
        )
    }

    pub fn url(&self, user: &str, password: &str) -> String {
        format!("postgres://{user}:{password}@127.0.0.1:{}/app", self.port)
    }

    /// A tokio-postgres client through the proxy.
    pub async fn connect_as(
        &self,
        user: &str,
        password: &str,
    ) -> Result<Client, tokio_postgres::Error> {
        let (client, conn) =
            tokio_postgres::connect(&self.conn_string(user, password), NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// The default test user, `app`.
    pub async fn connect(&self) -> Client {
        self.connect_as("app", "app")
            .await
            .expect("connect through the proxy")
    }

    /// Server connections the proxy holds open to the first primary, by state.
    /// The most server connections the proxy's pools hold open to any one
    /// node, by state (health-check connections not counted).
    pub fn server_backends(&self, state: Option<&str>) -> usize {
        let filter = state
            .map(|s| format!(" AND state = '{s}'"))
            .unwrap_or_default();
        let sql = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'app' AND backend_type = 'client backend' AND pid <> pg_backend_pid() AND usename <> 'postgres' AND application_name <> 'shardline-health'{filter}"
        );
        (0..self.backend.nodes().len())
            .map(|i| self.sql_on(i, &sql).parse::<usize>().expect("a count"))
            .max()
            .unwrap_or(0)
    }

    /// Runs SQL directly on node `index` (cluster order) as the superuser, in database `app`.
    pub fn sql_on(&self, index: usize, sql: &str) -> String {
        self.backend
            .psql(&self.backend.nodes()[index], "app", sql)
            .expect("direct SQL on a node")
    }

    /// Runs pgbench (the real binary) through the proxy as `app`; returns
    /// (success, output).
    pub fn pgbench(&self, args: &[&str]) -> (bool, String) {
        run(std::process::Command::new("pgbench")
            .env("PGPASSWORD", "app")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "app"])
            .args(args)
            .arg("app"))
    }

    /// Index (cluster order) of shard `shard`'s primary.
    pub fn shard_primary(&self, shard: usize) -> usize {
        let name = format!("s{shard}");
        self.backend
            .nodes()
            .iter()
            .position(|n| n.is_primary && n.shard == name)
            .expect("the shard's primary")
    }

    /// Index (cluster order) of shard `shard`'s first replica.
    pub fn shard_replica(&self, shard: usize) -> usize {
        let name = format!("s{shard}");
        self.backend
            .nodes()
            .iter()
            .position(|n| !n.is_primary && n.shard == name)
            .expect("a replica of the shard")
    }

    /// Runs SQL directly on shard `shard`'s primary (superuser, database `app`).
    pub fn sql_shard(&self, shard: usize, sql: &str) -> String {
        self.sql_on(self.shard_primary(shard), sql)
    }

    /// A tokio-postgres client straight to shard `shard`'s primary, as `app`.
    pub async fn connect_shard(&self, shard: usize) -> Client {
        let port = self.node_port(self.shard_primary(shard));
        let (client, conn) = tokio_postgres::connect(
            &format!("host=127.0.0.1 port={port} user=app password=app dbname=app"),
            NoTls,
        )
        .await
        .expect("connect to a shard");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    /// A proxy config (any free port) whose shards are the primaries of the
    /// given shards of this environment (named `s<i>`, without replicas),
    /// with user `app` and `tables` (a `[sharding]` section ...) appended.
    pub fn shards_config(&self, shards: &[usize], tables: &str) -> String {
        let mut text = String::from(
            "[proxy]\nlisten = \"127.0.0.1:0\"\n[pool]\ncheckout_timeout = \"3s\"\n\n[[users]]\nname = \"app\"\npassword = \"app\"\ndatabase = \"app\"\n\n",
        );
        for &s in shards {
            text.push_str(&format!(
                "[[shards]]\nname = \"s{s}\"\nprimary = {{ host = \"127.0.0.1\", port = {} }}\n\n",
                self.node_port(self.shard_primary(s))
            ));
        }
        text.push_str(tables);
        text
    }

    pub fn node_port(&self, index: usize) -> u16 {
        self.backend.nodes()[index].port
    }

    /// Indexes (cluster order) of the first shard's replicas.
    pub fn replicas(&self) -> Vec<usize> {
        let nodes = self.backend.nodes();
        (0..nodes.len())
            .filter(|&i| !nodes[i].is_primary && nodes[i].shard == nodes[0].shard)
            .collect()
    }

    /// The processes of a node: its postmaster and every child.
    pub fn node_pids(&self, index: usize) -> Vec<i32> {
        let node = &self.backend.nodes()[index];
        let pidfile =
            std::fs::read_to_string(node.data_dir.join("postmaster.pid")).expect("postmaster.pid");
        let postmaster: i32 = pidfile
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("a pid");
        let mut pids = vec![postmaster];
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok());
            if ppid == Some(postmaster) {
                pids.push(pid);
            }
        }
        pids
    }

    /// Sends a signal to every process of a node (SIGKILL, SIGSTOP, SIGCONT ...).
    pub fn signal_node(&self, index: usize, signal: i32) {
        for pid in self.node_pids(index) {
            // SAFETY: plain kill(2) on processes this test started.
            unsafe { libc::kill(pid, signal) };
        }
    }

    /// Waits until every replica has replayed what its primary wrote and the
    /// proxy's health checks see every node up and in rotation.
    pub async fn wait_healthy(&self) {
        let backend = &self.backend;
        backend
            .wait_replicas_caught_up(Duration::from_secs(30))
            .expect("replicas catch up");
        let shared = self.proxy.as_ref().expect("a running proxy").shared.clone();
        let started = std::time::Instant::now();
        loop {
            let ok =
                shared.topology.shards.iter().all(|s| {
                    s.writer().is_ok() && s.nodes.iter().all(|n| !n.is_down() && n.lag_ok())
                });
            if ok {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the proxy never saw every node healthy"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the proxy, letting sessions finish.
    pub async fn stop_proxy(&mut self) {
        if let Some(p) = self.proxy.take() {
            p.shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(10), p.wait()).await;
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(p) = self.proxy.take() {
            p.shutdown();
        }
    }
}

/// The SQLSTATE of a tokio-postgres error, if the server (or proxy) sent one.
/// Starts a proxy in-process from config text; returns it (stopped when
/// dropped) and a client logged in through it as `app`.
pub async fn start_proxy(text: &str) -> (Proxy, Client) {
    start_proxy_for(text, "app").await
}

/// As [`start_proxy`], the client logged in to `database`.
pub async fn start_proxy_for(text: &str, database: &str) -> (Proxy, Client) {
    let proxy = Proxy::start(Config::from_toml(text, "test.toml").expect("a valid config"))
        .await
        .expect("the proxy starts");
    let (client, conn) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=app password=app dbname={database}",
            proxy.local_addr.port()
        ),
        NoTls,
    )
    .await
    .expect("connect through the proxy");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    (proxy, client)
}

/// The `shardline` binary running a config on a free port, with extra
/// environment variables; killed (SIGKILL) when dropped or by `kill`.
pub struct ProxyProcess {
    pub child: std::process::Child,
    pub port: u16,
    /// What the process logs (its stderr).
    pub log: Log,
    _dir: TempDir,
}

/// A child's stderr, kept (and echoed to the test's own) line by line, for
/// tests that wait for a log line.
#[derive(Clone, Default)]
pub struct Log(std::sync::Arc<std::sync::Mutex<String>>);

impl Log {
    pub fn capture(stderr: std::process::ChildStderr) -> Log {
        let log = Log::default();
        let sink = log.0.clone();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                eprintln!("{line}");
                let mut log = sink.lock().unwrap_or_else(|p| p.into_inner());
                log.push_str(&line);
                log.push('\n');
            }
        });
        log
    }

    pub fn text(&self) -> String {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// [`wait_for`] a line containing `what`.
    pub async fn wait_for(&self, what: &str) {
        wait_for(what, || {
            let found = self.text().contains(what);
            async move { found }
        })
        .await
    }
}

impl ProxyProcess {
    /// Starts the binary and returns it with a client logged in as `app`.
    pub async fn start(config: &str, env: &[(&str, &str)]) -> (ProxyProcess, Client) {
        let port = shardline::cluster::free_port().expect("a free port");
        let text = config.replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
        );
        let dir = TempDir::new("proxy");
        let cfg = dir.write("shardline.toml", &text);
        let mut cmd = std::process::Command::new(shardline_binary().expect("the shardline binary"));
        cmd.arg("--config").arg(&cfg);
        for (k, v) in env {
            cmd.env(k, v);
        }
        ProxyProcess::spawn(cmd, port, dir).listening().await
    }

    /// Starts the binary on the config file `path` as it is (shared by
    /// several proxies: each gets its own port with `--listen`), and
    /// returns it with a client logged in as `app`.
    pub async fn start_file(path: &std::path::Path) -> (ProxyProcess, Client) {
        let port = shardline::cluster::free_port().expect("a free port");
        let mut cmd = std::process::Command::new(shardline_binary().expect("the shardline binary"));
        cmd.arg("--config")
            .arg(path)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"));
        ProxyProcess::spawn(cmd, port, TempDir::new("proxy"))
            .listening()
            .await
    }

    fn spawn(mut cmd: std::process::Command, port: u16, dir: TempDir) -> ProxyProcess {
        let mut child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start shardline");
        let log = Log::capture(child.stderr.take().expect("stderr piped"));
        ProxyProcess {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    /// Waits until the process takes clients; returns it with a client
    /// logged in as `app`.
    async fn listening(self) -> (ProxyProcess, Client) {
        for _ in 0..300 {
            if let Ok(c) = self.try_client().await {
                return (self, c);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the proxy did not start listening on {}", self.port);
    }

    /// Another client logged in as `app`.
    pub async fn client(&self) -> Client {
        self.try_client().await.expect("a client of the proxy")
    }

    async fn try_client(&self) -> Result<Client, tokio_postgres::Error> {
        let conn = format!(
            "host=127.0.0.1 port={} user=app password=app dbname=app",
            self.port
        );
        let (c, conn) = tokio_postgres::connect(&conn, NoTls).await?;
        tokio::spawn(conn);
        Ok(c)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Writes a new config file where the process reads it (the same
    /// port), for a RELOAD or SIGHUP.
    pub fn rewrite_config(&self, config: &str) {
        let text = config.replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{}\"", self.port),
        );
        self._dir.write("shardline.toml", &text);
    }

    /// A client of the admin console (user `app`, an admin in the config).
    pub async fn console(&self) -> Client {
        let conn = format!(
            "host=127.0.0.1 port={} user=app password=app dbname=shardline",
            self.port
        );
        let (client, connection) = tokio_postgres::connect(&conn, NoTls)
            .await
            .expect("the admin console");
        tokio::spawn(connection);
        client
    }

    /// SIGKILL: the process ends wherever it is.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Any column's value as the server sent it (`None`: NULL), in whatever
/// format: for comparing answers byte for byte.
pub struct RawValue(pub Option<Vec<u8>>);

impl<'a> tokio_postgres::types::FromSql<'a> for RawValue {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawValue(Some(raw.to_vec())))
    }
    fn from_sql_null(
        _: &tokio_postgres::types::Type,
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawValue(None))
    }
    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }
}

/// Waits for something the test cannot be told about (a backend gone, a
/// setting reloaded, a query running): polls `check` every 20 ms and panics
/// naming `what` when it does not hold within 30 s. Tests wait for the
/// condition itself, never for a fixed time.
pub async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "waited 30 s for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`wait_for`] an SQL answer; the panic names the last one.
async fn wait_answer(sql: &str, expected: &str, mut ask: impl FnMut() -> String) {
    let started = std::time::Instant::now();
    loop {
        let last = ask();
        if last == expected {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "waited 30 s for {sql:?} to answer {expected:?}; it answers {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_string())
}

/// Starts pgbench (the real binary) on a thread: `clients` clients for
/// `seconds` running `script` through the proxy on `port` as `app`;
/// joining gives (success, output).
pub fn pgbench_script(
    port: u16,
    clients: u32,
    seconds: u32,
    script: &std::path::Path,
) -> std::thread::JoinHandle<(bool, String)> {
    let script = script.to_path_buf();
    std::thread::spawn(move || {
        run(std::process::Command::new("pgbench")
            .env("PGPASSWORD", "app")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "app"])
            .args([
                "-n",
                "-c",
                &clients.to_string(),
                "-T",
                &seconds.to_string(),
                "-f",
            ])
            .arg(&script)
            .arg("app"))
    })
}

/// Runs a command and returns (success, stdout + stderr).
pub fn run(cmd: &mut std::process::Command) -> (bool, String) {
    match cmd.output() {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (false, format!("could not run {cmd:?}: {e}")),
    }
}

/// The `shardline` binary of the profile the tests were built with.
/// `cargo test --workspace` builds it (the proxy crate has integration tests);
/// when it is missing or older than the sources, it is built here.
pub fn shardline_binary() -> Result<std::path::PathBuf> {
    workspace_binary(
        "shardline",
        "shardline-proxy",
        &["proxy/src", "config/src", "router/src"],
    )
}

/// The `shardline-rebalance` binary, built as [`shardline_binary`] is.
pub fn rebalance_binary() -> Result<std::path::PathBuf> {
    workspace_binary(
        "shardline-rebalance",
        "shardline-rebalance",
        &["rebalance-tool/src", "config/src", "router/src"],
    )
}

/// Binary `name` of workspace package `package`, rebuilt when any file
/// under `sources` is newer.
fn workspace_binary(name: &str, package: &str, sources: &[&str]) -> Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    // Test binaries live in <profile>/deps, other binaries in <profile>.
    let mut profile_dir = exe.parent().context("binary location")?;
    if profile_dir.file_name().is_some_and(|n| n == "deps") {
        profile_dir = profile_dir.parent().context("binary location")?;
    }
    let bin = profile_dir.join(name);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
    let newest_source = sources
        .iter()
        .flat_map(|d| walk(&root.join(d)))
        .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .max();
    // A debug binary must carry the crash tests' stop points: one built by
    // a plain `cargo build` says it ignores them, and is built again here.
    let debug = profile_dir.file_name().is_some_and(|n| n != "release");
    let without_hooks = || {
        std::process::Command::new(&bin)
            .arg("--version")
            .env(hook_variable(name), "probe")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stderr).contains("is ignored"))
    };
    if built.is_some() && built >= newest_source && !(debug && without_hooks()) {
        return Ok(bin);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "-q", "--bin", name]).current_dir(&root);
    if debug {
        cmd.args(["-p", package, "--features", "crash-hooks"]);
    } else {
        // Built as the README and the image build it (features unified
        // over the workspace), so its functions have the names
        // proxy/hot-code.txt lists (proxy/build.rs).
        cmd.arg("--release");
    }
    let (ok, out) = run(&mut cmd);
    anyhow::ensure!(ok, "building {name} failed:\n{out}");
    anyhow::ensure!(bin.exists(), "{} missing after build", bin.display());
    Ok(bin)
}

/// The environment variable of a binary's crash-test stop points.
fn hook_variable(binary: &str) -> &'static str {
    if binary == "shardline-rebalance" {
        "SHARDLINE_REBALANCE_STOP_AT"
    } else {
        "SHARDLINE_2PC_STOP_AT"
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// How a run under a kill point ended.
pub enum Killed {
    /// It reached the point and was killed there (SIGKILL).
    There,
    /// It ended by itself first, with this exit code and stderr.
    Ended(i32, String),
}

/// Runs the tool until it prints that it stopped at `point` and kills it;
/// unlike `apply_killed_at`, a run that ends before the point (fewer steps
/// than the point's number) is a result, not a failure.
pub fn killed_at_if_reached(point: &str, args: &[&str]) -> Killed {
    use std::io::BufRead as _;
    let mut child = std::process::Command::new(rebalance_binary().unwrap())
        .args(args)
        .env("SHARDLINE_REBALANCE_STOP_AT", point)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn shardline-rebalance");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) if line.contains(&format!("stopped at {point}")) => {
                unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
                let _ = child.wait();
                return Killed::There;
            }
            Ok(line) => seen.push(line),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().unwrap();
                return Killed::Ended(status.code().unwrap_or(-1), seen.join("\n"));
            }
            Err(_) => {}
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the tool never reached {point}:\n{}",
            seen.join("\n")
        );
    }
}

/// A fresh directory under the system temp dir, removed with everything in
/// it when dropped (also when a test fails).
pub struct TempDir {
    pub dir: std::path::PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("shardline-{tag}-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        TempDir { dir }
    }

    /// Writes `text` to `name` in the directory; returns its path.
    pub fn write(&self, name: &str, text: &str) -> std::path::PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, text).expect("write a temp file");
        p
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A client of `app` (password `app`, database `app`) on a local port.
pub async fn connect_app(port: u16) -> Result<Client> {
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=app password=app dbname=app"),
        NoTls,
    )
    .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// The `shardline` binary on a config file, in a session of its own as a
/// daemon runs (benchmarks); give it time to listen.
pub fn spawn_bench_proxy(cfg: &std::path::Path) -> Result<std::process::Child> {
    let mut cmd = std::process::Command::new(shardline_binary()?);
    cmd.arg("--config")
        .arg(cfg)
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::inherit());
    own_session(&mut cmd);
    let child = cmd.spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(child)
}

/// `shards` primaries (no replicas) for a benchmark, each with role and
/// database `app` (password `app`).
pub fn bench_cluster(shards: usize) -> Result<LocalCluster> {
    let cluster = LocalCluster::start(&ClusterSpec {
        shards,
        replicas_per_shard: 0,
    })?;
    for s in 0..shards {
        cluster.psql(
            cluster.primary(s),
            "postgres",
            "CREATE ROLE app LOGIN PASSWORD 'app'; CREATE DATABASE app OWNER app;",
        )?;
    }
    Ok(cluster)
}

/// A client speaking raw protocol bytes, for inputs no driver would send.
pub struct RawClient {
    pub stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

/// A protocol message: tag and body.
pub type RawMessage = (u8, Vec<u8>);

impl RawClient {
    /// Wraps a connected stream that has not logged in.
    pub fn from_stream(stream: tokio::net::TcpStream) -> RawClient {
        RawClient {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connects and logs in as `trustclient` (no password exchange).
    pub async fn login(port: u16) -> Result<RawClient> {
        RawClient::login_as(port, "trustclient").await
    }

    /// Connects and logs in as a user the proxy trusts.
    pub async fn login_as(port: u16, user: &str) -> Result<RawClient> {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let mut c = RawClient {
            stream,
            buf: Vec::new(),
        };
        let startup =
            shardline::protocol::startup::startup_message(&[("user", user), ("database", "app")]);
        c.send(&startup).await?;
        loop {
            match c.recv(Duration::from_secs(10)).await? {
                Some((b'Z', _)) => return Ok(c),
                Some((b'E', body)) => {
                    anyhow::bail!("login failed: {}", String::from_utf8_lossy(&body))
                }
                Some(_) => {}
                None => anyhow::bail!("closed during login"),
            }
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    /// Next message, or `None` when the proxy closed the connection.
    pub async fn recv(&mut self, timeout: Duration) -> Result<Option<RawMessage>> {
        use tokio::io::AsyncReadExt;
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if self.buf.len() > len {
                    let msg: Vec<u8> = self.buf.drain(..len + 1).collect();
                    return Ok(Some((msg[0], msg[5..].to_vec())));
                }
            }
            let mut chunk = [0u8; 8192];
            let n = tokio::time::timeout(timeout, self.stream.read(&mut chunk)).await??;
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Starts `COPY ... FROM STDIN` (`sql`) with a simple query; returns
    /// once the CopyInResponse is in.
    pub async fn start_copy_in(&mut self, sql: &str) -> Result<()> {
        let mut q = sql.as_bytes().to_vec();
        q.push(0);
        self.send(&message(b'Q', &q)).await?;
        match self.recv(Duration::from_secs(10)).await? {
            Some((b'G', _)) => Ok(()),
            other => anyhow::bail!("no CopyInResponse: {other:?}"),
        }
    }

    /// Sends the messages in one write and returns the answers up to ReadyForQuery.
    pub async fn exchange(&mut self, messages: &[Vec<u8>]) -> Result<Vec<RawMessage>> {
        self.send(&messages.concat()).await?;
        self.until_ready().await
    }

    /// Every message until the proxy closes the connection.
    pub async fn until_closed(&mut self) -> Result<Vec<RawMessage>> {
        let mut out = Vec::new();
        while let Some(m) = self.recv(Duration::from_secs(10)).await? {
            out.push(m);
        }
        Ok(out)
    }

    /// Every message up to and including the next ReadyForQuery.
    pub async fn until_ready(&mut self) -> Result<Vec<RawMessage>> {
        let mut out = Vec::new();
        while let Some(m) = self.recv(Duration::from_secs(10)).await? {
            let done = m.0 == b'Z';
            out.push(m);
            if done {
                return Ok(out);
            }
        }
        anyhow::bail!("connection closed before ReadyForQuery: {out:?}")
    }
}

/// The value of parameter `name` as the client knows it after `msgs`: the
/// last ParameterStatus that reports it.
pub fn parameter_status(msgs: &[RawMessage], name: &str) -> Option<String> {
    msgs.iter()
        .filter(|(t, _)| *t == b'S')
        .filter_map(|(_, body)| {
            let mut parts = body.split(|&b| b == 0);
            let k = parts.next()?;
            let v = parts.next()?;
            (k == name.as_bytes()).then(|| String::from_utf8_lossy(v).into_owned())
        })
        .next_back()
}

/// The tags of a list of messages, for compact assertions (`b"1EZ"`).
pub fn tags(messages: &[RawMessage]) -> Vec<u8> {
    messages.iter().map(|m| m.0).collect()
}

/// The SQLSTATE in an ErrorResponse body.
pub fn error_code(body: &[u8]) -> String {
    shardline::protocol::backend::parse_error_fields(body).code
}

/// A frontend message: tag + length + body.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// Starts the process in a session of its own, as a daemon runs. With the
/// kernel's scheduler autogroups, a proxy left in the benchmark's session
/// would share one CPU share with pgbench (the Postgres servers already have
/// their own sessions), which skews the comparison.
pub fn own_session(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
}

/// Reads `--name N` flags of a benchmark's command line into `flags`
/// (name, value with its default); `-h` prints `usage` and exits.
pub fn numeric_flags(flags: &mut [(&str, &mut u32)], usage: &str) -> Result<()> {
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{usage}");
            std::process::exit(0);
        }
        let Some((_, value)) = flags.iter_mut().find(|(name, _)| *name == flag) else {
            anyhow::bail!("unknown argument {flag}\n{usage}");
        };
        **value = it
            .next()
            .context("missing value")?
            .parse()
            .with_context(|| format!("{flag}: not a number"))?;
    }
    Ok(())
}

/// The ids in table `users` (bigint key `id`, first sharding group) on each
/// of the first `shards` shards' primaries, read on the servers directly;
/// panics on a row that is not on the shard owning its key. Sorted.
pub fn audit_users(
    env: &Env,
    sh: &shardline_router::sharding::Sharding,
    shards: usize,
) -> Vec<i64> {
    let mut ids = Vec::new();
    for s in 0..shards {
        let list = env.sql_shard(
            s,
            "SELECT coalesce(string_agg(id::text, ','), '') FROM users",
        );
        for id in list.split(',').filter(|x| !x.is_empty()) {
            let k: i64 = id.parse().expect("an id");
            let owner = sh.groups[0]
                .shard_of(Some(&shardline_router::hash::KeyValue::Int(k)))
                .expect("owner");
            assert_eq!(owner, s, "user {k} is on shard {s}, owned by shard {owner}");
            ids.push(k);
        }
    }
    ids.sort();
    ids
}

/// Extended-protocol messages as drivers send them, for tests that choose
/// the batching themselves.
pub mod wire {
    use super::message;

    /// Parse of `sql` as statement `name`, declaring `types` (OIDs; 0 for none).
    pub fn parse(name: &str, sql: &str, types: &[u32]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(name.as_bytes());
        b.push(0);
        b.extend_from_slice(sql.as_bytes());
        b.push(0);
        b.extend_from_slice(&(types.len() as i16).to_be_bytes());
        for t in types {
            b.extend_from_slice(&t.to_be_bytes());
        }
        message(b'P', &b)
    }

    /// Bind of statement `stmt` to the unnamed portal: parameters as
    /// `(format, value)` (format 1 is binary), results in `result_format`.
    pub fn bind(stmt: &str, params: &[(i16, Option<&[u8]>)], result_format: i16) -> Vec<u8> {
        let mut b = vec![0];
        b.extend_from_slice(stmt.as_bytes());
        b.push(0);
        b.extend_from_slice(&(params.len() as i16).to_be_bytes());
        for (f, _) in params {
            b.extend_from_slice(&f.to_be_bytes());
        }
        b.extend_from_slice(&(params.len() as i16).to_be_bytes());
        for (_, v) in params {
            match v {
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v);
                }
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&result_format.to_be_bytes());
        message(b'B', &b)
    }

    /// Describe of a statement (`b'S'`) or portal (`b'P'`).
    pub fn describe(kind: u8, name: &str) -> Vec<u8> {
        let mut b = vec![kind];
        b.extend_from_slice(name.as_bytes());
        b.push(0);
        message(b'D', &b)
    }

    /// Execute of the unnamed portal, every row.
    pub fn execute() -> Vec<u8> {
        message(b'E', &[0, 0, 0, 0, 0])
    }

    /// Execute of the unnamed portal, at most `rows` rows (PortalSuspended
    /// when more are left).
    pub fn execute_rows(rows: i32) -> Vec<u8> {
        let mut b = vec![0];
        b.extend_from_slice(&rows.to_be_bytes());
        message(b'E', &b)
    }

    /// One statement as a unit of its own, the unnamed way drivers send
    /// it: Parse, Bind (no parameters), Describe of the portal, Execute, Sync.
    pub fn unit(sql: &str) -> Vec<Vec<u8>> {
        vec![
            parse("", sql, &[]),
            bind("", &[], 0),
            describe(b'P', ""),
            execute(),
            sync(),
        ]
    }

    pub fn sync() -> Vec<u8> {
        message(b'S', b"")
    }

    pub fn flush() -> Vec<u8> {
        message(b'H', b"")
    }

    /// A simple query.
    pub fn query(sql: &str) -> Vec<u8> {
        let mut b = sql.as_bytes().to_vec();
        b.push(0);
        message(b'Q', &b)
    }
}

/// CPU seconds (user + system) process `pid` has used so far.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    cpu_split(pid).map(|(user, system)| user + system)
}

/// CPU seconds process `pid` has used so far, in user space and in the
/// kernel (its system calls: for a proxy, mostly the sockets' sends and
/// receives).
pub fn cpu_split(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the ")" of the command name; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Option<f64> { f.get(i)?.parse::<f64>().ok() };
    Some((ticks(11)? / 100.0, ticks(12)? / 100.0))
}

/// The median of a benchmark's rounds (the mean of the middle two when
/// even; NaN for none).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// VmHWM (peak resident set) and VmRSS of a process, in KiB.
/// Where a process's resident memory is (KiB), from `/proc/PID/smaps`:
/// anonymous (heap, stacks, written data), the program's own file pages
/// (its code and read-only data, clean and shared with the page cache),
/// and shared libraries' pages.
pub fn memory_split_kib(pid: u32) -> (u64, u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    let exe = exe.to_string_lossy();
    let (mut anon, mut program, mut libs) = (0, 0, 0);
    let mut path = String::new();
    for line in smaps.lines() {
        if let Some(kib) = line.strip_prefix("Rss:") {
            let kib: u64 = kib
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0);
            if path == exe {
                program += kib;
            } else if path.starts_with('/') {
                libs += kib;
            } else {
                anon += kib;
            }
        } else if line.split_whitespace().next().is_some_and(|w| {
            w.contains('-') && w.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
        }) {
            // A mapping's header: address range, perms, offset, dev, inode, path.
            path = line.split_whitespace().nth(5).unwrap_or("").to_string();
        }
    }
    (anon, program, libs)
}

/// How many of the functions `proxy/hot-code.txt` lists (the release
/// link's code order, `proxy/build.rs`) `binary` has: (found, listed). A
/// list gone stale (functions renamed, a new toolchain or dependency)
/// orders less of the code; `scripts/hot-code.sh` writes it again.
pub fn hot_code_found(binary: &std::path::Path) -> Option<(usize, usize)> {
    let list = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../proxy/hot-code.txt"
    ))
    .ok()?;
    let out = std::process::Command::new("nm")
        .arg("--defined-only")
        .arg(binary)
        .output()
        .ok()?;
    let symbols = String::from_utf8_lossy(&out.stdout);
    let have: std::collections::HashSet<&str> = symbols
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    let listed: Vec<&str> = list.lines().filter(|l| !l.is_empty()).collect();
    let found = listed.iter().filter(|s| have.contains(**s)).count();
    Some((found, listed.len()))
}

/// Whether `binary`'s relative relocations are packed (a DT_RELR entry in
/// its dynamic section, `proxy/build.rs`); `None` without `readelf`.
pub fn relocations_packed(binary: &std::path::Path) -> Option<bool> {
    let out = std::process::Command::new("readelf")
        .arg("-d")
        .arg(binary)
        .output()
        .ok()?;
    out.status.success().then_some(())?;
    Some(String::from_utf8_lossy(&out.stdout).contains("(RELR)"))
}

pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}
