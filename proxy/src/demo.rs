//! `shardline demo`: a zero-setup start. One shard (a primary and a streaming
//! replica) from the local Postgres binaries, a demo user and database with a
//! little data, and the proxy in front, until Ctrl-C.

use crate::cluster::{ClusterSpec, LocalCluster};
use crate::Proxy;
use anyhow::{Context as _, Result};
use shardline_config::Config;
use std::time::Duration;

pub const DEMO_USER: &str = "app";
pub const DEMO_PASSWORD: &str = "app";
pub const DEMO_DATABASE: &str = "app";

const DEMO_DATA: &str = "
CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, country text, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE orders (id bigint, user_id bigint NOT NULL, amount numeric(12,2) NOT NULL, created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (user_id, id));
INSERT INTO users SELECT i, 'user ' || i, (ARRAY['FR','DE','US','JP','BR'])[1 + i % 5], now() - i * interval '1 hour' FROM generate_series(1, 1000) i;
INSERT INTO orders SELECT i, 1 + i % 1000, (i % 500) + 0.99, now() - i * interval '1 minute' FROM generate_series(1, 5000) i;
ALTER TABLE users OWNER TO app;
ALTER TABLE orders OWNER TO app;
";

/// Creates the demo role, database and data on a cluster's first primary.
pub fn load_demo(cluster: &LocalCluster) -> Result<()> {
    let p = cluster.primary(0);
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
    cluster.psql(p, DEMO_DATABASE, DEMO_DATA)?;
    Ok(())
}

/// A proxy configuration for a local cluster, one `[[shards]]` entry per shard.
pub fn config_for(cluster: &LocalCluster, listen_port: u16) -> String {
    let mut toml = format!(
        "[proxy]\nlisten = \"127.0.0.1:{listen_port}\"\npool_mode = \"transaction\"\n\n\
         [[users]]\nname = \"{DEMO_USER}\"\npassword = \"{DEMO_PASSWORD}\"\ndatabase = \"{DEMO_DATABASE}\"\n\n"
    );
    toml.push_str(&shards_toml(cluster));
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

pub async fn run(port: u16) -> Result<()> {
    let cluster = tokio::task::spawn_blocking(|| -> Result<LocalCluster> {
        let c = LocalCluster::start(&ClusterSpec {
            shards: 1,
            replicas_per_shard: 2,
        })?;
        load_demo(&c)?;
        // Start with every replica caught up, so reads spread at once.
        c.wait_replicas_caught_up(Duration::from_secs(30))?;
        Ok(c)
    })
    .await??;
    let text = config_for(&cluster, port);
    let path = cluster.root.join("shardline.toml");
    std::fs::write(&path, &text)?;
    let config = Config::from_toml(&text, &path.display().to_string())?;
    let proxy = Proxy::start(config).await.with_context(|| {
        format!("starting the proxy on port {port} (use --port to pick another)")
    })?;
    let p = cluster.primary(0);
    let replicas: Vec<String> = cluster
        .nodes
        .iter()
        .filter(|n| !n.is_primary)
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    println!();
    println!("Shardline demo is running.");
    println!(
        "  shard s0: primary 127.0.0.1:{} and streaming replicas {}",
        p.port,
        replicas.join(", ")
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
    println!();
    println!("See which node answers (reads rotate over the replicas; writes go to the primary):");
    println!("  SELECT inet_server_port(), pg_is_in_recovery();");
    println!("  INSERT INTO users (id, name) VALUES (1001, 'me') RETURNING inet_server_port();");
    println!("(Right after a write, your reads go to the primary until the replicas have replayed it: read-your-writes.)");
    println!();
    println!("Press Ctrl-C to stop and remove everything.");
    wait_for_signal().await;
    println!("\nStopping...");
    proxy.shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(5), proxy.wait()).await;
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

/// Resolves on SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}
