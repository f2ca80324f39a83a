//! `shardline check`: validate the configuration and reach every node as every user.

use crate::server::ServerConnection;
use crate::Shared;
use anyhow::Result;
use shardline_config::Config;

/// Prints one line per (user, node); returns whether all succeeded.
pub async fn run(config: &Config) -> Result<bool> {
    let shared = Shared::from_config(config)?;
    let mut ok = true;
    for entry in shared.users.values() {
        for shard in &entry.pools.shards {
            for (i, node) in shard.nodes.iter().enumerate() {
                let role = if i == 0 { "primary" } else { "replica" };
                match node.checkout().await {
                    Ok(conn) => {
                        let conn: &ServerConnection = &conn;
                        println!(
                            "ok    {}/{} shard {} {role} {} (server pid {})",
                            entry.name, entry.database, shard.name, node.address, conn.pid
                        );
                    }
                    Err(e) => {
                        ok = false;
                        println!(
                            "FAIL  {}/{} shard {} {role} {}: {}",
                            entry.name, entry.database, shard.name, node.address, e.message
                        );
                    }
                }
            }
        }
    }
    // What the health checker sees: roles come from the servers, not the config.
    shared.check_health_once().await;
    for shard in &shared.topology.shards {
        let writer = shard.writer();
        for node in &shard.nodes {
            let (bytes, time) = node.lag();
            let state = if node.is_down() {
                ok = false;
                format!("DOWN ({})", node.last_error())
            } else {
                match node.role() {
                    crate::health::Role::Primary => "primary".to_string(),
                    _ => format!(
                        "replica, lag {bytes} bytes / {time:?}{}",
                        if node.lag_ok() {
                            ""
                        } else {
                            " (over the bound: no reads)"
                        }
                    ),
                }
            };
            println!("health shard {} {}: {state}", shard.name, node.address);
        }
        if let Err(e) = writer {
            ok = false;
            println!("FAIL  shard {}: {}", shard.name, e.message);
        }
    }
    Ok(ok)
}
