//! `shardline demo`: a zero-setup start. Two shards (s0 and s1, each a
//! primary and two streaming replicas) from the local Postgres binaries, a
//! demo user and database, a sharded schema loaded through the proxy, and the
//! proxy in front, until Ctrl-C.

use crate::cluster::{ClusterSpec, LocalCluster};
use crate::Proxy;
use anyhow::{Context as _, Result};
use shardline_config::Config;
use std::time::Duration;

pub const DEMO_USER: &str = "app";
pub const DEMO_PASSWORD: &str = "app";
pub const DEMO_DATABASE: &str = "app";

/// The demo's sharding: users by id, orders co-located by user_id,
/// countries copied to every shard.
pub const DEMO_SHARDING: &str = r#"
[sharding]
function = "consistent"

[[sharding.tables]]
name = "users"
column = "id"

[[sharding.tables]]
name = "orders"
column = "user_id"

[[reference_tables]]
name = "countries"
"#;

/// The schema, created through the proxy (DDL reaches every shard).
const DEMO_SCHEMA: &str = "
CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, country text, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE orders (id bigint, user_id bigint NOT NULL, amount numeric(12,2) NOT NULL, created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (user_id, id));
CREATE TABLE countries (code text PRIMARY KEY, name text NOT NULL);
";

/// Creates the demo role and database on every primary.
pub fn load_demo(cluster: &LocalCluster) -> Result<()> {
    for p in cluster.nodes.iter().filter(|n| n.is_primary) {
        cluster.psql(
            p,
            "postgres",
            &format!("CREATE ROLE {DEMO_USER} LOGIN PASSWORD '{DEMO_PASSWORD}'"),
        )?;
        cluster.psql(
            p,
            "postgres",
            &format!("CREATE DATABASE {DEMO_DATABASE} OWNER {DEMO_USER}"),
        )?;
    }
    Ok(())
}

/// The demo's schema and data as one psql script, meant to be run through
/// the proxy: the users in one multi-row INSERT (split by shard), the orders
/// by COPY (split by row), the countries on every shard. `shardline demo
/// --print-sql` prints it (the container cluster loads it with psql).
pub fn demo_sql() -> String {
    use std::fmt::Write as _;
    let mut sql = String::from(DEMO_SCHEMA.trim_start());
    sql.push_str(
        "INSERT INTO countries (code, name) VALUES ('FR', 'France'), ('DE', 'Germany'), ('US', 'United States'), ('JP', 'Japan'), ('BR', 'Brazil');\n",
    );
    let countries = ["FR", "DE", "US", "JP", "BR"];
    sql.push_str("INSERT INTO users (id, name, country, created_at) VALUES ");
    for i in 1..=1000 {
        let sep = if i == 1 { "" } else { ", " };
        let _ = write!(
            sql,
            "{sep}({i}, 'user {i}', '{}', now() - interval '{i} hours')",
            countries[i % 5]
        );
    }
    sql.push_str(";\nCOPY orders (id, user_id, amount) FROM STDIN;\n");
    for i in 1..=5000 {
        let _ = writeln!(sql, "{i}\t{}\t{}.99", 1 + i % 1000, i % 500);
    }
    sql.push_str("\\.\n");
    sql
}

/// Loads [`demo_sql`] through the proxy listening on `port`.
pub fn load_through_proxy(cluster: &LocalCluster, port: u16) -> Result<()> {
    let url = format!("postgres://{DEMO_USER}:{DEMO_PASSWORD}@127.0.0.1:{port}/{DEMO_DATABASE}");
    cluster.psql_url(&url, &demo_sql())?;
    Ok(())
}

/// [`DEMO_SHARDING`] with two-phase commit on, as the demo runs it.
pub fn demo_sharding_two_phase() -> String {
    DEMO_SHARDING.replace(
        "function = \"consistent\"",
        "function = \"consistent\"\ntwo_phase_commit = true",
    )
}

/// A proxy configuration for a local cluster, one `[[shards]]` entry per shard.
pub fn config_for(cluster: &LocalCluster, listen_port: u16) -> String {
    let mut toml = format!(
        "[proxy]\nlisten = \"127.0.0.1:{listen_port}\"\npool_mode = \"transaction\"\n\n\
         [[users]]\nname = \"{DEMO_USER}\"\npassword = \"{DEMO_PASSWORD}\"\ndatabase = \"{DEMO_DATABASE}\"\n\n\
         [admin]\nusers = [\"{DEMO_USER}\"]\n\n\
         [cache]\n[[cache.tables]]\nname = \"countries\"\nttl = \"60s\"\n\n"
    );
    toml.push_str(&shards_toml(cluster));
    if cluster
        .nodes
        .iter()
        .any(|n| n.shard != cluster.nodes[0].shard)
    {
        // The demo's servers allow prepared transactions: transactions may
        // span both shards.
        toml.push_str(&demo_sharding_two_phase());
    }
    toml
}

/// `[[shards]]` entries describing a local cluster.
pub fn shards_toml(cluster: &LocalCluster) -> String {
    let mut toml = String::new();
    let mut shards: Vec<&str> = cluster.nodes.iter().map(|n| n.shard.as_str()).collect();
    shards.dedup();
    for shard in shards {
        let nodes = cluster.nodes.iter().filter(|n| n.shard == shard);
        let (primary, replicas): (Vec<_>, Vec<_>) = nodes.partition(|n| n.is_primary);
        // Each replica in a zone of its own ("a", "b", ...), for zone preference.
        let replicas: Vec<String> = replicas
            .iter()
            .zip('a'..='z')
            .map(|(r, zone)| {
                format!(
                    "{{ host = \"127.0.0.1\", port = {}, zone = \"{zone}\" }}",
                    r.port
                )
            })
            .collect();
        toml.push_str(&format!(
            "[[shards]]\nname = \"{shard}\"\nprimary = {{ host = \"127.0.0.1\", port = {} }}\nreplicas = [{}]\n\n",
            primary[0].port,
            replicas.join(", ")
        ));
    }
    toml
}

/// Runs the demo: the proxy on `port`, its metrics on `metrics_port`
/// (0: a free port).
pub async fn run(port: u16, metrics_port: u16) -> Result<()> {
    // The port is taken only once the data is in: checked now, so a busy
    // port fails before the servers start.
    drop(
        std::net::TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("port {port} is not free (use --port to pick another)"))?,
    );
    let cluster = tokio::task::spawn_blocking(|| -> Result<LocalCluster> {
        let c = LocalCluster::start(&ClusterSpec {
            shards: 2,
            replicas_per_shard: 2,
        })?;
        load_demo(&c)?;
        // Start with every replica caught up, so reads spread at once.
        c.wait_replicas_caught_up(Duration::from_secs(30))?;
        Ok(c)
    })
    .await??;
    // The data goes in through a proxy of its own on a port no client
    // knows, and every replica replays it, before the demo's port accepts
    // anyone: a client never sees a half-loaded demo.
    let loader = Proxy::start(Config::from_toml(&config_for(&cluster, 0), "demo loader")?).await?;
    let listen = loader.local_addr.port();
    let cluster = tokio::task::spawn_blocking(move || -> Result<LocalCluster> {
        load_through_proxy(&cluster, listen)?;
        cluster.wait_replicas_caught_up(Duration::from_secs(30))?;
        Ok(cluster)
    })
    .await??;
    loader.shutdown();
    let _ = crate::timer::timeout(Duration::from_secs(5), loader.wait()).await;
    let text = format!(
        "{}\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
        config_for(&cluster, port)
    );
    let path = cluster.root.join("shardline.toml");
    std::fs::write(&path, &text)?;
    let config = Config::from_toml(&text, &path.display().to_string())?;
    // Started from its file, so RELOAD and SIGHUP reread it (as
    // `shardline-rebalance apply --admin` needs).
    let proxy = Proxy::start_from(config, Some(path.clone()), false).await.with_context(|| {
        format!("starting the proxy on port {port} (use --port to pick another, and --metrics-port for its metrics)")
    })?;
    println!();
    println!("Shardline demo is running.");
    for p in cluster.nodes.iter().filter(|n| n.is_primary) {
        let replicas: Vec<String> = cluster
            .nodes
            .iter()
            .filter(|n| !n.is_primary && n.shard == p.shard)
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        println!(
            "  shard {}: primary 127.0.0.1:{} and streaming replicas {}",
            p.shard,
            p.port,
            replicas.join(", ")
        );
    }
    println!(
        "  users are sharded by id, orders by user_id (co-located), countries is on every shard"
    );
    if is_root() {
        println!("  (running as root: the Postgres servers run as the 'postgres' user)");
    }
    println!("  data and config: {}", cluster.root.display());
    println!();
    println!("Connect with:");
    println!(
        "  psql postgres://{DEMO_USER}:{DEMO_PASSWORD}@127.0.0.1:{}/{DEMO_DATABASE}",
        proxy.local_addr.port()
    );
    println!("Admin console (SHOW HELP lists its commands):");
    println!(
        "  psql postgres://{DEMO_USER}:{DEMO_PASSWORD}@127.0.0.1:{}/shardline -c 'SHOW POOLS' -c 'SHOW HOT_KEYS'",
        proxy.local_addr.port()
    );
    if let Some(m) = proxy.metrics_addr {
        println!("Metrics (Prometheus), health and readiness:");
        println!("  curl http://{m}/metrics   (also /health and /ready)");
    }
    println!();
    println!(
        "See which shard and node answers (reads go to replicas, writes to the key's primary):"
    );
    println!("  SELECT inet_server_port(), pg_is_in_recovery(), * FROM users WHERE id = 42;");
    println!(
        "  SELECT u.name, o.amount FROM users u JOIN orders o ON o.user_id = u.id WHERE u.id = 42;"
    );
    println!("  INSERT INTO users (id, name) VALUES (1001, 'me') RETURNING inet_server_port();");
    println!("  SELECT inet_server_port(), count(*) FROM users WHERE id = 7 GROUP BY 1;");
    println!("Queries without a key run on both shards, their rows merged as one server would return them:");
    println!("  SELECT country, count(*), min(created_at) FROM users GROUP BY country ORDER BY count(*) DESC;");
    println!("  SELECT u.name, sum(o.amount) AS spent FROM users u JOIN orders o ON o.user_id = u.id GROUP BY u.name ORDER BY spent DESC LIMIT 5;");
    println!("A transaction may write on both shards (two-phase commit):");
    println!("  BEGIN; UPDATE users SET name = 'one' WHERE id = 1; UPDATE users SET name = 'two' WHERE id = 2; COMMIT;");
    println!("(Right after a write, your reads go to the primary until the replicas have replayed it: read-your-writes.)");
    println!("Reads of countries are cached for 60 s (a write through the proxy drops them at once); run this twice,");
    println!("then SHOW CACHE in the console shows the hit:");
    println!("  SELECT code, name FROM countries ORDER BY code;");
    println!();
    println!("Press Ctrl-C to stop and remove everything.");
    wait_for_signal().await;
    println!("\nStopping...");
    proxy.shutdown();
    let _ = crate::timer::timeout(Duration::from_secs(5), proxy.wait()).await;
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    println!("Stopped; removed the demo directory.");
    Ok(())
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Resolves on SIGINT or SIGTERM. SIGHUP (which would otherwise end the
/// process) is logged and ignored until configuration reload exists.
/// What the process was signalled to do.
pub enum Signal {
    /// SIGINT or SIGTERM.
    Stop,
    /// SIGHUP.
    Reload,
}

/// The signals a running proxy answers.
pub struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    pub async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.int.recv() => Signal::Stop,
            _ = self.term.recv() => Signal::Stop,
            _ = self.hup.recv() => Signal::Reload,
        }
    }
}

/// Waits for SIGINT or SIGTERM (the demo has no config file: SIGHUP is
/// ignored).
pub async fn wait_for_signal() {
    let Ok(mut signals) = Signals::new() else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    while let Signal::Reload = signals.next().await {
        tracing::warn!("SIGHUP received and ignored: the demo has no config file to reread");
    }
}
