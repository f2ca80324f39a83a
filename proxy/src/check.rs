//! `shardline check`: validate the configuration and reach every node as every user.

use crate::server::ServerConnection;
use crate::Shared;
use anyhow::Result;
use shardline_config::Config;

/// Prints that the configuration (`file`) is valid once everything it
/// names could be loaded (certificates, CA files), then one line per (user,
/// node); returns whether all succeeded.
pub async fn run(config: &Config, file: &std::path::Path) -> Result<bool> {
    let shared = Shared::from_config(config)?;
    println!("{}: configuration is valid", file.display());
    let two_phase = config.sharding.two_phase_commit && config.shards.len() > 1;
    let mut ok = true;
    for entry in shared.users.values() {
        for shard in &entry.pools.shards {
            for (i, node) in shard.nodes.iter().enumerate() {
                let role = if i == 0 { "primary" } else { "replica" };
                match node.checkout(None).await {
                    Ok(mut conn) => {
                        let conn: &mut ServerConnection = &mut conn;
                        println!(
                            "ok    {}/{} shard {} {role} {} (server pid {})",
                            entry.name, entry.database, shard.name, node.address, conn.pid
                        );
                        if two_phase && i == 0 && !prepared_transactions_allowed(conn).await {
                            ok = false;
                            println!(
                                "FAIL  shard {} primary {}: max_prepared_transactions is 0, and sharding.two_phase_commit needs it above 0 (set it in postgresql.conf and restart the server)",
                                shard.name, node.address
                            );
                        }
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

/// Whether the server allows PREPARE TRANSACTION (two-phase commit).
async fn prepared_transactions_allowed(conn: &mut ServerConnection) -> bool {
    match conn.simple_query("SHOW max_prepared_transactions").await {
        Ok((rows, _)) => rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .and_then(|v| v.parse::<u32>().ok())
            .is_some_and(|n| n > 0),
        Err(_) => false,
    }
}
