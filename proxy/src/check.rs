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
    Ok(ok)
}
