//! Two-phase commit across shards, and resolving what a crash leaves.
//!
//! A transaction that used several shards commits like this (the session
//! side is `session::distributed`):
//!
//! 1. The first shard it used is the coordinator. A decision row
//!    `(gid, commit = true)` is inserted into `shardline.txn_decisions`
//!    *inside* the coordinator's own transaction.
//! 2. Every other participant runs `PREPARE TRANSACTION gid`.
//! 3. The coordinator's plain COMMIT is the decision: it commits the
//!    coordinator's writes and the decision row together, or neither.
//! 4. `COMMIT PREPARED gid` on every other participant; the row is deleted.
//!
//! The decision lives in Postgres, next to the data, so any proxy can
//! settle any other proxy's transactions: for a prepared `sl:...`
//! transaction, the resolver inserts `(gid, commit = false)` on the
//! coordinator with `ON CONFLICT DO NOTHING`. Exactly one of the two rows
//! can exist: if the coordinator committed, the resolver's insert finds its
//! row (commit); if the coordinator's transaction died, the resolver's row
//! wins and the coordinator can never commit (rollback); while the
//! coordinator's transaction is still open, the insert waits on its
//! uncommitted key and gives up after `lock_timeout` (decided later).
//!
//! The decision row is inserted before any participant prepares, so a
//! resolver that sees a prepared participant always finds the row (held or
//! committed) and never takes the key from a healthy commit. The resolver
//! leaves transactions prepared less than `SETTLE_AFTER` ago to the commit
//! that is finishing them.

use crate::health::Topology;
use crate::server::{ServerConnection, ServerError, ServerTarget};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const SCHEMA_SQL: &str = "CREATE SCHEMA IF NOT EXISTS shardline; \
CREATE TABLE IF NOT EXISTS shardline.txn_decisions (gid text PRIMARY KEY, commit bool NOT NULL, \
decided_at timestamptz NOT NULL DEFAULT clock_timestamp())";

/// Prepared transactions of this proxy have gids `sl:<coordinator shard>:<id>`.
pub const GID_PREFIX: &str = "sl:";

/// How old a prepared transaction must be before the resolver settles it:
/// younger ones belong to commits still running, which finish them.
const SETTLE_AFTER: &str = "2 seconds";

/// How long the proxy keeps decision rows of finished transactions whose
/// participants it could not all reach.
const KEEP_DECISIONS: &str = "10 minutes";

/// One database's server logins, per shard and node.
pub struct DatabaseTargets {
    pub database: String,
    pub shards: Vec<Vec<ServerTarget>>,
}

pub struct Coordinator {
    pub databases: Vec<DatabaseTargets>,
    pub topology: Arc<Topology>,
    pub shard_names: Vec<String>,
    pub interval: Duration,
    /// Test hook: `SHARDLINE_2PC_STOP_AT=prepared|decided` stops a commit
    /// there (until the process is killed).
    stop_at: Option<&'static str>,
    node_id: u64,
    counter: AtomicU64,
    /// Where commits and resolutions are counted (`/metrics`).
    pub events: Arc<crate::stats::Events>,
}

/// A SQL string literal.
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The coordinator shard named in a gid.
pub fn coordinator_of(gid: &str) -> Option<&str> {
    let rest = gid.strip_prefix(GID_PREFIX)?;
    rest.rsplit_once(':').map(|(name, _)| name)
}

/// The crash tests' stop point for two-phase commits, from
/// `SHARDLINE_2PC_STOP_AT`. Only builds with the `crash-hooks` feature (the
/// tests') read it; others say once that they ignore it.
pub fn crash_hook() -> Option<&'static str> {
    static POINT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    POINT
        .get_or_init(|| {
            let point = std::env::var("SHARDLINE_2PC_STOP_AT").ok()?;
            if cfg!(feature = "crash-hooks") {
                Some(point)
            } else {
                eprintln!("shardline: SHARDLINE_2PC_STOP_AT is ignored: this build has no crash-test hooks (cargo feature crash-hooks)");
                None
            }
        })
        .as_deref()
}

impl Coordinator {
    pub fn new(
        databases: Vec<DatabaseTargets>,
        topology: Arc<Topology>,
        shard_names: Vec<String>,
        interval: Duration,
        events: Arc<crate::stats::Events>,
    ) -> Coordinator {
        Coordinator {
            events,
            databases,
            topology,
            shard_names,
            interval,
            stop_at: crash_hook(),
            node_id: rand::random(),
            counter: AtomicU64::new(0),
        }
    }

    /// A gid no other transaction of any proxy uses.
    pub fn new_gid(&self, coordinator: usize) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!(
            "{GID_PREFIX}{}:{:016x}{n:x}",
            self.shard_names[coordinator], self.node_id
        )
    }

    /// The test hook: waits forever at `point` when asked to.
    pub async fn maybe_stop(&self, point: &str, gid: &str) {
        if self.stop_at == Some(point) {
            eprintln!("shardline: two-phase commit of {gid} stopped at {point}");
            std::future::pending::<()>().await;
        }
    }

    async fn connect(
        &self,
        db: &DatabaseTargets,
        shard: usize,
    ) -> Result<ServerConnection, String> {
        let node = self.topology.shards[shard]
            .writer()
            .map_err(|e| e.message.clone())?;
        let target = &db.shards[shard][node];
        ServerConnection::connect(target, 0)
            .await
            .map_err(|e| e.to_string())
    }

    /// At startup: every reachable primary allows prepared transactions and
    /// has the decisions table. A server with `max_prepared_transactions =
    /// 0` stops the start; an unreachable one is checked on a later pass.
    pub async fn prepare_servers(&self) -> anyhow::Result<()> {
        for db in &self.databases {
            for shard in 0..self.shard_names.len() {
                let mut conn = match self.connect(db, shard).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(shard = %self.shard_names[shard], error = %e, "two-phase commit: shard not reachable at startup");
                        continue;
                    }
                };
                let (rows, _) = conn
                    .simple_query("SHOW max_prepared_transactions")
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                let max: i64 = rows
                    .first()
                    .and_then(|r| r.first().cloned().flatten())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if max <= 0 {
                    anyhow::bail!(
                        "sharding.two_phase_commit is on, but shard {} ({}) has max_prepared_transactions = 0: set it above 0 (at least the number of cross-shard commits at once) in its postgresql.conf and restart it, or turn two_phase_commit off",
                        self.shard_names[shard],
                        conn.addr
                    );
                }
                conn.simple_query(SCHEMA_SQL).await.map_err(|e| {
                    anyhow::anyhow!(
                        "two-phase commit: cannot create shardline.txn_decisions on shard {} (database {}): {e}",
                        self.shard_names[shard],
                        db.database
                    )
                })?;
            }
        }
        Ok(())
    }

    /// Settles every prepared transaction of ours found on any shard, by its
    /// recorded decision; then forgets old decisions nobody needs.
    /// Returns how many it settled.
    pub async fn resolve_once(&self) -> usize {
        let mut settled = 0;
        for db in &self.databases {
            settled += self.resolve_database(db).await;
        }
        settled
    }

    async fn resolve_database(&self, db: &DatabaseTargets) -> usize {
        let n = self.shard_names.len();
        let mut conns: Vec<Option<ServerConnection>> = Vec::with_capacity(n);
        for shard in 0..n {
            conns.push(match self.connect(db, shard).await {
                Ok(mut c) => match c.simple_query("SET lock_timeout = '1s'").await {
                    Ok(_) => Some(c),
                    Err(_) => None,
                },
                Err(e) => {
                    tracing::debug!(shard = %self.shard_names[shard], error = %e, "in-doubt check: shard not reachable");
                    None
                }
            });
        }
        // Old decisions first: any participant still prepared shows below.
        let mut old: Vec<(usize, String)> = Vec::new();
        for (shard, conn) in conns.iter_mut().enumerate() {
            if let Some(c) = conn {
                let sql = format!("SELECT gid FROM shardline.txn_decisions WHERE decided_at < now() - interval '{KEEP_DECISIONS}'");
                if let Ok((rows, _)) = c.simple_query(&sql).await {
                    old.extend(
                        rows.into_iter()
                            .filter_map(|r| r.into_iter().next().flatten())
                            .map(|g| (shard, g)),
                    );
                }
            }
        }
        let mut prepared: Vec<(usize, String)> = Vec::new();
        let mut complete = true;
        for (shard, conn) in conns.iter_mut().enumerate() {
            let Some(c) = conn else {
                complete = false;
                continue;
            };
            let sql = format!(
                "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() AND gid LIKE '{GID_PREFIX}%' AND prepared < now() - interval '{SETTLE_AFTER}' ORDER BY prepared"
            );
            match c.simple_query(&sql).await {
                Ok((rows, _)) => prepared.extend(
                    rows.into_iter()
                        .filter_map(|r| r.into_iter().next().flatten())
                        .map(|g| (shard, g)),
                ),
                Err(_) => complete = false,
            }
        }
        let mut settled = 0;
        for (shard, gid) in &prepared {
            let Some(coordinator) = coordinator_of(gid)
                .and_then(|name| self.shard_names.iter().position(|s| s == name))
            else {
                tracing::warn!(%gid, "in-doubt transaction names an unknown coordinator shard; left alone");
                continue;
            };
            let decision = match conns[coordinator].as_mut() {
                Some(c) => decide(c, gid).await,
                None => continue,
            };
            let commit = match decision {
                Ok(Some(commit)) => commit,
                Ok(None) => continue, // still being committed
                Err(e) => {
                    tracing::warn!(%gid, error = %e, "in-doubt transaction: no decision yet");
                    continue;
                }
            };
            let sql = format!(
                "{} PREPARED {}",
                if commit { "COMMIT" } else { "ROLLBACK" },
                literal(gid)
            );
            if let Some(c) = conns[*shard].as_mut() {
                match c.simple_query(&sql).await {
                    Ok(_) => {
                        settled += 1;
                        self.events
                            .two_phase
                            .resolved
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::info!(%gid, shard = %self.shard_names[*shard], committed = commit, "in-doubt transaction resolved");
                    }
                    Err(e) => {
                        tracing::warn!(%gid, error = %e, "in-doubt transaction: could not finish it")
                    }
                }
            }
        }
        if complete {
            for (shard, gid) in old {
                if prepared.iter().any(|(_, g)| *g == gid) {
                    continue;
                }
                if let Some(c) = conns[shard].as_mut() {
                    let sql = format!(
                        "DELETE FROM shardline.txn_decisions WHERE gid = {}",
                        literal(&gid)
                    );
                    let _ = c.simple_query(&sql).await;
                }
            }
        }
        settled
    }

    /// Resolves in the background every `interval`.
    pub fn spawn(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                crate::timer::sleep(self.interval).await;
                self.resolve_once().await;
            }
        })
    }
}

/// The decision for `gid` on its coordinator: records "rollback" unless a
/// commit was recorded. `Ok(None)`: the coordinator's transaction is still
/// open (the insert waited on its row and timed out).
async fn decide(c: &mut ServerConnection, gid: &str) -> Result<Option<bool>, String> {
    let g = literal(gid);
    let insert = format!(
        "INSERT INTO shardline.txn_decisions (gid, commit) VALUES ({g}, false) ON CONFLICT (gid) DO NOTHING"
    );
    match c.simple_query(&insert).await {
        Ok(_) => {}
        Err(ServerError::Refused { fields, .. }) if fields.code == "55P03" => return Ok(None),
        Err(e) => return Err(e.to_string()),
    }
    let (rows, _) = c
        .simple_query(&format!(
            "SELECT commit FROM shardline.txn_decisions WHERE gid = {g}"
        ))
        .await
        .map_err(|e| e.to_string())?;
    match rows
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .as_deref()
    {
        Some("t") => Ok(Some(true)),
        Some("f") => Ok(Some(false)),
        _ => Err("no decision row after recording one".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gids_name_their_coordinator() {
        assert_eq!(coordinator_of("sl:s1:00ab12"), Some("s1"));
        assert_eq!(coordinator_of("sl:east:a:00ab12"), Some("east:a"));
        assert_eq!(coordinator_of("other:s1:1"), None);
        assert_eq!(coordinator_of("sl:nocolon"), None);
        assert_eq!(literal("it's"), "'it''s'");
    }
}
