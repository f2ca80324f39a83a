//! What the proxy knows about each node: its role, whether it answers, how
//! far a replica lags, and bans. A checker task per shard polls every node
//! each `health.interval` over its own connections; sessions read the results
//! (atomics only) when they choose where a unit runs.
//!
//! Lag is measured against the shard's primary: bytes of WAL not yet replayed,
//! and time since the last replayed commit while anything is still to replay.
//! A replica that has replayed everything the primary wrote has no lag, however
//! long the primary has been idle.

use crate::clock::Mono;
use crate::protocol::backend::{sqlstate, PgError};
use crate::server::conn::{Connections, Listed};
use crate::server::conn::{ServerConnection, ServerTarget};
use shardline_config::HealthConfig;
use shardline_router::balance::{self, Candidate, Strategy};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The start of the proxy's monotonic clock (its first reading).
fn clock_base() -> Mono {
    static BASE: OnceLock<Mono> = OnceLock::new();
    *BASE.get_or_init(Mono::now)
}

/// Milliseconds on the proxy's monotonic clock.
pub fn now_ms() -> u64 {
    ms_at(Mono::now())
}

/// `at` in milliseconds on the proxy's monotonic clock (0 is never one).
pub fn ms_at(at: Mono) -> u64 {
    at.nanos_since(clock_base()) / 1_000_000 + 1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    Unknown = 0,
    Primary = 1,
    Replica = 2,
}

/// One node (server) of a shard.
pub struct NodeHealth {
    pub address: String,
    pub zone: Option<String>,
    role: AtomicU8,
    /// The last check failed.
    down: AtomicBool,
    /// No reads before this time (ms); set by failed checks and refused connections.
    banned_until: AtomicU64,
    lag_ok: AtomicBool,
    replay_lsn: AtomicU64,
    lag_bytes: AtomicU64,
    lag_ms: AtomicU64,
    last_error: Mutex<String>,
    conns: Arc<Connections>,
    /// Woken when a failed check cuts the node's connections: connections
    /// still being opened give up too.
    failed: tokio::sync::Notify,
    /// How long each health check took (µs; a timed-out one: the timeout).
    pub check_time: crate::stats::Histogram,
}

impl NodeHealth {
    pub(crate) fn new(address: String, zone: Option<String>, role: Role) -> NodeHealth {
        NodeHealth {
            address,
            zone,
            role: AtomicU8::new(role as u8),
            down: AtomicBool::new(false),
            banned_until: AtomicU64::new(0),
            lag_ok: AtomicBool::new(true),
            replay_lsn: AtomicU64::new(0),
            lag_bytes: AtomicU64::new(0),
            lag_ms: AtomicU64::new(0),
            last_error: Mutex::new(String::new()),
            conns: Arc::default(),
            failed: tokio::sync::Notify::new(),
            check_time: Default::default(),
        }
    }

    pub fn role(&self) -> Role {
        match self.role.load(Relaxed) {
            1 => Role::Primary,
            2 => Role::Replica,
            _ => Role::Unknown,
        }
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Relaxed)
    }

    /// Banned now. Reads the clock only while a ban is set; an expired
    /// ban is cleared, so a node never banned, or no longer, costs a load.
    pub fn is_banned(&self) -> bool {
        let until = self.banned_until.load(Relaxed);
        if until == 0 {
            return false;
        }
        if until > now_ms() {
            return true;
        }
        // A ban set meanwhile (a larger value) stays.
        let _ = self
            .banned_until
            .compare_exchange(until, 0, Relaxed, Relaxed);
        false
    }

    /// How much longer the node is banned, if it is.
    pub fn banned_for(&self) -> Option<Duration> {
        let until = self.banned_until.load(Relaxed);
        let now = now_ms();
        (until > now).then(|| Duration::from_millis(until - now))
    }

    /// Replay position (replicas) or WAL position (primaries) at the last check.
    pub fn lsn(&self) -> u64 {
        self.replay_lsn.load(Relaxed)
    }

    pub fn lag(&self) -> (u64, Duration) {
        (
            self.lag_bytes.load(Relaxed),
            Duration::from_millis(self.lag_ms.load(Relaxed)),
        )
    }

    pub fn lag_ok(&self) -> bool {
        self.lag_ok.load(Relaxed)
    }

    pub fn last_error(&self) -> String {
        self.last_error
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default()
    }

    /// Keeps reads away from this node for `time`.
    pub fn ban(&self, time: Duration, reason: &str) {
        let until = now_ms() + time.as_millis() as u64;
        let before = self.banned_until.fetch_max(until, Relaxed);
        if before <= now_ms() {
            tracing::warn!(node = %self.address, ?time, reason, "node banned");
        }
        if let Ok(mut e) = self.last_error.lock() {
            *e = reason.to_string();
        }
    }

    /// Resolves when a failed check next cuts this node's connections
    /// (created before the check: a check failing meanwhile is not missed).
    pub fn failure(&self) -> tokio::sync::futures::Notified<'_> {
        self.failed.notified()
    }

    /// Lists a server connection so it can be cut if the node fails.
    pub fn list(&self, conn: &ServerConnection, target: &crate::server::ServerTarget) -> Listed {
        self.conns.list(conn, target)
    }

    /// The open connections to this node (SHOW SERVERS).
    pub fn connections(&self) -> Vec<crate::server::conn::Listing> {
        self.conns.listings()
    }

    /// Shuts down every connection to this node, so sessions waiting on a
    /// node that stopped answering fail (and retry elsewhere) at once.
    /// Returns how many it cut.
    fn cut_connections(&self) -> usize {
        self.failed.notify_waiters();
        self.conns.cut()
    }
}

const NO_WRITER: usize = usize::MAX;
const DUAL: usize = usize::MAX - 1;

/// One shard: its nodes (index 0 is the configured primary, then the
/// replicas in config order) and where writes go now.
pub struct ShardHealth {
    pub name: String,
    pub nodes: Vec<Arc<NodeHealth>>,
    writer: AtomicUsize,
    dual: Mutex<(usize, usize)>,
    ticket: AtomicU64,
    /// Reads waiting for a replica to replay their user's writes; while
    /// any wait, the shard's `PositionPoller` asks the replicas.
    waiting: AtomicUsize,
    /// Wakes the poller when a read starts waiting.
    wanted: tokio::sync::Notify,
    /// Woken when the poller has learned new replay positions.
    advanced: tokio::sync::Notify,
    /// The placement its primary records (`placement_hash`; 0: none).
    pub recorded_placement: AtomicU64,
    /// Latency of units run on this shard alone, on its primary and on a
    /// replica (`/metrics`); kept with the shard across reloads.
    pub latency: [crate::stats::Histogram; 2],
    /// Times writes moved from one node to another (failovers, switchovers).
    pub primary_changes: AtomicU64,
}

/// A read waiting for replay positions (`ShardHealth::wait_for_position`);
/// counted while it lives.
struct Waiting<'a>(&'a ShardHealth);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Relaxed);
    }
}

/// What a read may use.
#[derive(Clone, Copy)]
pub struct ReadRequest<'a> {
    pub strategy: Strategy,
    pub zone: Option<&'a str>,
    pub client: u64,
    /// Read-your-writes: only nodes that replayed at least this far.
    pub min_lsn: u64,
    /// Nodes already tried for this unit (bit per node index).
    pub exclude: u64,
    pub primary_reads: bool,
    /// Server connections in use per node, for least_connections.
    pub in_use: &'a (dyn Fn(usize) -> usize + Sync),
}

impl ShardHealth {
    pub fn new(shard: &shardline_config::Shard) -> ShardHealth {
        let mut nodes = vec![Arc::new(NodeHealth::new(
            shard.primary.address(),
            shard.primary.zone.clone(),
            Role::Primary,
        ))];
        for r in &shard.replicas {
            nodes.push(Arc::new(NodeHealth::new(
                r.address(),
                r.zone.clone(),
                Role::Replica,
            )));
        }
        ShardHealth {
            name: shard.name.clone(),
            nodes,
            writer: AtomicUsize::new(0),
            dual: Mutex::new((0, 0)),
            ticket: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            wanted: tokio::sync::Notify::new(),
            advanced: tokio::sync::Notify::new(),
            recorded_placement: AtomicU64::new(0),
            latency: Default::default(),
            primary_changes: AtomicU64::new(0),
        }
    }

    /// The node writes go to, or why there is none.
    pub fn writer(&self) -> Result<usize, PgError> {
        match self.writer.load(Relaxed) {
            DUAL => {
                let (a, b) = self.dual.lock().map(|d| *d).unwrap_or((0, 0));
                Err(PgError::error(
                    sqlstate::CANNOT_CONNECT_NOW,
                    format!(
                        "shard {}: both {} and {} report being the primary; writes are refused until one of them steps down",
                        self.name, self.nodes[a].address, self.nodes[b].address
                    ),
                ))
            }
            NO_WRITER => Err(PgError::error(
                sqlstate::CONNECTION_FAILURE,
                format!(
                    "shard {} has no primary: no node reports being one; writes fail until a replica is promoted",
                    self.name
                ),
            )),
            i if self.nodes[i].is_down() => Err(PgError::error(
                sqlstate::CONNECTION_FAILURE,
                format!(
                    "shard {}: primary {} is unavailable ({}); writes fail until it is back or a replica is promoted",
                    self.name,
                    self.nodes[i].address,
                    self.nodes[i].last_error()
                ),
            )),
            i => Ok(i),
        }
    }

    /// A replica for a read that needs one replayed past `req.min_lsn`,
    /// waiting up to `wait` for one to get there (the shard's replicas are
    /// asked their position every poll meanwhile). `None` when none did,
    /// or none could even without the position.
    pub async fn wait_for_position(&self, req: &ReadRequest<'_>, wait: Duration) -> Option<usize> {
        if wait.is_zero() || req.min_lsn == 0 {
            return None;
        }
        // Only worth waiting if a replica would serve the read but for
        // the position.
        self.reader(&ReadRequest { min_lsn: 0, ..*req })?;
        self.waiting.fetch_add(1, Relaxed);
        let _waiting = Waiting(self);
        self.wanted.notify_one();
        let deadline = crate::timer::Instant::now() + wait;
        loop {
            let advanced = self.advanced.notified();
            if let Some(i) = self.reader(req) {
                return Some(i);
            }
            if crate::timer::timeout_at(deadline, advanced).await.is_err() {
                return self.reader(req);
            }
        }
    }

    /// A node for a read: an eligible replica by the strategy, else `None`.
    pub fn reader(&self, req: &ReadRequest) -> Option<usize> {
        // A shard's few nodes on the stack: choosing allocates nothing.
        let mut cands: smallvec::SmallVec<[Candidate; 8]> = smallvec::SmallVec::new();
        let writer = self.writer.load(Relaxed);
        for (i, n) in self.nodes.iter().enumerate() {
            let role_ok = match n.role() {
                Role::Replica => n.lag_ok() && n.lsn() >= req.min_lsn,
                Role::Primary => req.primary_reads && i == writer,
                Role::Unknown => false,
            };
            if role_ok && req.exclude & (1 << i) == 0 && !n.is_down() && !n.is_banned() {
                cands.push(Candidate {
                    node: i,
                    local: req.zone.is_some() && n.zone.as_deref() == req.zone,
                    in_use: if req.strategy == Strategy::LeastConnections {
                        (req.in_use)(i)
                    } else {
                        0
                    },
                });
            }
        }
        let ticket = match req.strategy {
            Strategy::Random => rand::random(),
            _ => self.ticket.fetch_add(1, Relaxed),
        };
        balance::choose(&cands, req.strategy, ticket, req.client)
    }
}

/// Every shard's health, shared by the sessions and the checkers.
pub struct Topology {
    pub shards: Vec<Arc<ShardHealth>>,
}

impl Topology {
    pub fn new(config: &shardline_config::Config) -> Topology {
        Topology::reusing(config, None)
    }

    /// The topology of a reloaded configuration: a shard whose nodes are
    /// unchanged is kept as it is (its primary, after a failover too), and
    /// a node still configured keeps its state (role, ban, lag, its listed
    /// connections) wherever it now is.
    pub fn reusing(config: &shardline_config::Config, old: Option<&Topology>) -> Topology {
        let old_nodes: Vec<&Arc<NodeHealth>> = old
            .map(|t| t.shards.iter().flat_map(|s| s.nodes.iter()).collect())
            .unwrap_or_default();
        let shards = config
            .shards
            .iter()
            .map(|s| {
                let addresses: Vec<String> = std::iter::once(&s.primary)
                    .chain(&s.replicas)
                    .map(|n| n.address())
                    .collect();
                let previous = old.and_then(|t| t.shards.iter().find(|o| o.name == s.name));
                if let Some(p) = previous {
                    let same = p.nodes.len() == addresses.len()
                        && p.nodes.iter().zip(&addresses).all(|(n, a)| n.address == *a)
                        && p.nodes
                            .iter()
                            .zip(std::iter::once(&s.primary).chain(&s.replicas))
                            .all(|(n, c)| n.zone == c.zone);
                    if same {
                        return p.clone();
                    }
                }
                let mut fresh = ShardHealth::new(s);
                for node in fresh.nodes.iter_mut() {
                    if let Some(kept) = old_nodes
                        .iter()
                        .find(|o| o.address == node.address && o.zone == node.zone)
                    {
                        *node = (*kept).clone();
                    }
                }
                if let Some(writer) = previous
                    .and_then(|p| p.writer().ok().map(|w| p.nodes[w].address.clone()))
                    .and_then(|a| fresh.nodes.iter().position(|n| n.address == a))
                {
                    fresh.writer.store(writer, Relaxed);
                }
                Arc::new(fresh)
            })
            .collect();
        Topology { shards }
    }
}

/// What one check of a node found.
struct Observation {
    in_recovery: bool,
    /// Primary: WAL flushed (what replicas can have). Replica: last replayed position.
    lsn: u64,
    /// Replica: milliseconds since the last replayed commit (`None`: none
    /// replayed since it started).
    replay_age_ms: Option<u64>,
    /// The node holds a placement record (`shardline_placement.current`).
    placement_recorded: bool,
}

const CHECK_SQL: &str = "SELECT pg_is_in_recovery(), \
    (CASE WHEN pg_is_in_recovery() THEN COALESCE(pg_last_wal_replay_lsn(), '0/0') \
     ELSE pg_current_wal_flush_lsn() END - '0/0'::pg_lsn)::bigint, \
    COALESCE(floor(extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp()) * 1000), -1)::bigint, \
    to_regclass('shardline_placement.current') IS NOT NULL";

/// The placement `shardline-rebalance` recorded on a shard (when it has).
const PLACEMENT_SQL: &str = "SELECT fingerprint FROM shardline_placement.current LIMIT 1";

/// A placement fingerprint (16 hex digits) as a number; 0 when none.
pub fn placement_hash(fingerprint: &str) -> u64 {
    u64::from_str_radix(fingerprint, 16).unwrap_or(0)
}

/// Runs `sql` on the node's connection of the checker's (or poller's),
/// opening it first if there is none.
async fn ask(
    conn: &mut Option<ServerConnection>,
    target: &ServerTarget,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, String> {
    if conn.is_none() {
        *conn = Some(
            ServerConnection::connect(target, 0)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    let c = conn.as_mut().expect("just connected");
    let (rows, _) = c.simple_query(sql).await.map_err(|e| e.to_string())?;
    Ok(rows)
}

async fn check(
    conn: &mut Option<ServerConnection>,
    target: &ServerTarget,
) -> Result<Observation, String> {
    let rows = ask(conn, target, CHECK_SQL).await?;
    let row = rows.first().ok_or("health check returned no row")?;
    let col = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    Ok(Observation {
        in_recovery: col(0) == "t",
        lsn: col(1).parse().unwrap_or(0),
        replay_age_ms: col(2)
            .parse::<i64>()
            .ok()
            .and_then(|v| u64::try_from(v).ok()),
        placement_recorded: col(3) == "t",
    })
}

/// A replica's replay position, as the poller asks it.
const POSITION_SQL: &str =
    "SELECT (COALESCE(pg_last_wal_replay_lsn(), '0/0') - '0/0'::pg_lsn)::bigint";

/// Asks a shard's replicas their replay position every `interval`, only
/// while reads wait for one to replay their user's writes
/// (`ShardHealth::wait_for_position`): the health check's positions are up
/// to `health.interval` old, far behind a user writing steadily, whose
/// reads would all go to the primary. Idle, it sends nothing.
pub struct PositionPoller {
    shard: Arc<ShardHealth>,
    targets: Vec<ServerTarget>,
    conns: Vec<Option<ServerConnection>>,
    interval: Duration,
    timeout: Duration,
}

impl PositionPoller {
    pub fn new(
        shard: Arc<ShardHealth>,
        targets: Vec<ServerTarget>,
        interval: Duration,
        timeout: Duration,
    ) -> Self {
        let conns = targets.iter().map(|_| None).collect();
        PositionPoller {
            shard,
            targets,
            conns,
            interval,
            timeout,
        }
    }

    pub async fn run(mut self) {
        loop {
            if self.shard.waiting.load(Relaxed) == 0 {
                // A permit is stored if a read started waiting meanwhile.
                self.shard.wanted.notified().await;
            }
            self.poll().await;
            self.shard.advanced.notify_waiters();
            crate::timer::sleep(self.interval).await;
        }
    }

    /// Asks every replica that is up, concurrently.
    async fn poll(&mut self) {
        let (shard, timeout) = (&self.shard, self.timeout);
        let asks = self
            .conns
            .iter_mut()
            .zip(&self.targets)
            .enumerate()
            .filter(|(i, _)| {
                let n = &shard.nodes[*i];
                n.role() == Role::Replica && !n.is_down()
            })
            .map(|(i, (conn, target))| async move {
                let asked = crate::timer::timeout(timeout, async {
                    ask(conn, target, POSITION_SQL)
                        .await?
                        .first()
                        .and_then(|r| r.first().cloned().flatten())
                        .and_then(|v| v.parse::<u64>().ok())
                        .ok_or_else(|| "no position".to_string())
                })
                .await;
                match asked {
                    Ok(Ok(lsn)) => {
                        shard.nodes[i].replay_lsn.fetch_max(lsn, Relaxed);
                    }
                    // The health check judges the node; this only stops asking.
                    _ => *conn = None,
                }
            });
        futures_util::future::join_all(asks).await;
    }
}

/// The checker of one shard.
pub struct Checker {
    shard: Arc<ShardHealth>,
    targets: Vec<ServerTarget>,
    conns: Vec<Option<ServerConnection>>,
    cfg: HealthConfig,
    /// Since when no usable primary has been seen (for auto_promote).
    writer_lost_since: Option<Instant>,
    /// Per node: since when it has lagged beyond the bound, and whether
    /// that was warned about (a burst of writes makes replicas lag for a
    /// moment; that is logged at info, a lag that lasts at warn).
    lagging_since: Vec<Option<(Instant, bool)>>,
    /// The primary's WAL position at recent checks, oldest first: when the
    /// primary was where a replica is now (`lag_ms`).
    heads: std::collections::VecDeque<(Instant, u64)>,
}

/// Checks whose primary position is kept for dating replicas' positions.
const HEAD_SAMPLES: usize = 64;

/// How far behind in time a replica at `lsn` is, at `now`: since when the
/// primary has been past `lsn`, from the primary's positions at recent
/// checks (`heads`, oldest first, the last one taken with `lsn`),
/// interpolated between the two checks around it. A replica older than
/// every sample is dated by its last replayed commit (`replay_age_ms`)
/// or the oldest sample, whichever is older. Unlike the last replayed
/// commit alone, this does not age a caught-up replica while the primary
/// writes WAL without committing (a long load, a vacuum).
pub fn lag_ms(
    heads: &std::collections::VecDeque<(Instant, u64)>,
    now: Instant,
    lsn: u64,
    replay_age_ms: Option<u64>,
) -> u64 {
    let Some(&(_, head)) = heads.back() else {
        return replay_age_ms.unwrap_or(u64::MAX);
    };
    if lsn >= head {
        return 0;
    }
    // The last check at which the primary was not yet past `lsn`.
    let Some(i) = heads.iter().rposition(|&(_, h)| h <= lsn) else {
        let oldest = now.saturating_duration_since(heads[0].0).as_millis() as u64;
        return replay_age_ms.unwrap_or(u64::MAX).max(oldest);
    };
    let (t0, h0) = heads[i];
    let (t1, h1) = heads[i + 1];
    let span = t1.saturating_duration_since(t0).as_secs_f64();
    let part = (lsn - h0) as f64 / (h1 - h0).max(1) as f64;
    let at = t0 + std::time::Duration::from_secs_f64(span * part);
    now.saturating_duration_since(at).as_millis() as u64
}

/// A replica out of rotation for this long is warned about.
const LAG_WARN_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

impl Checker {
    pub fn new(shard: Arc<ShardHealth>, targets: Vec<ServerTarget>, cfg: HealthConfig) -> Self {
        let conns = targets.iter().map(|_| None).collect();
        let lagging_since = targets.iter().map(|_| None).collect();
        Checker {
            shard,
            targets,
            conns,
            cfg,
            writer_lost_since: None,
            lagging_since,
            heads: std::collections::VecDeque::new(),
        }
    }

    /// Checks every node once, concurrently, and publishes the results.
    /// Returns whether every node answered.
    pub async fn round(&mut self) -> bool {
        let timeout = self.cfg.timeout;
        let checks = self
            .conns
            .iter_mut()
            .zip(&self.targets)
            .map(|(conn, target)| async move {
                let started = std::time::Instant::now();
                let kept = conn.is_some();
                let mut r = crate::timer::timeout(timeout, check(conn, target)).await;
                if kept && matches!(r, Ok(Err(_))) {
                    // The kept connection failed, not the wait: a server
                    // that closed it (pg_terminate_backend, its
                    // idle_session_timeout) is asked again at once on a
                    // new one, within what is left of the timeout, before
                    // its node is taken for down.
                    *conn = None;
                    let left = timeout.saturating_sub(started.elapsed());
                    r = crate::timer::timeout(left, check(conn, target)).await;
                }
                let r = match r {
                    Ok(r) => r,
                    Err(_) => Err(format!("health check timed out after {timeout:?}")),
                };
                if r.is_err() {
                    *conn = None;
                }
                (r, started.elapsed())
            });
        let timed = futures_util::future::join_all(checks).await;
        let mut results = Vec::with_capacity(timed.len());
        for (node, (r, took)) in self.shard.nodes.iter().zip(timed) {
            node.check_time.observe(took.as_micros() as u64);
            results.push(r);
        }
        let all_up = results.iter().all(Result::is_ok);
        // The placement the primary records (after a rebalance), read only
        // where the record exists.
        let primary = results
            .iter()
            .position(|r| r.as_ref().is_ok_and(|o| !o.in_recovery));
        if let Some(i) = primary {
            let recorded = match &results[i] {
                Ok(o) if o.placement_recorded => {
                    let asked = crate::timer::timeout(
                        timeout,
                        ask(&mut self.conns[i], &self.targets[i], PLACEMENT_SQL),
                    )
                    .await;
                    match asked {
                        Ok(Ok(rows)) => rows
                            .first()
                            .and_then(|r| r.first().cloned().flatten())
                            .map_or(0, |f| placement_hash(&f)),
                        // Unknown this round: keep what was known.
                        _ => self.shard.recorded_placement.load(Relaxed),
                    }
                }
                _ => 0,
            };
            self.shard.recorded_placement.store(recorded, Relaxed);
        }
        self.publish(results).await;
        all_up
    }

    async fn publish(&mut self, results: Vec<Result<Observation, String>>) {
        let shard = &self.shard;
        let mut primaries = Vec::new();
        for (i, r) in results.iter().enumerate() {
            let node = &shard.nodes[i];
            match r {
                Ok(o) => {
                    if node.down.swap(false, Relaxed) {
                        tracing::info!(shard = %shard.name, node = %node.address, "node is answering again");
                    }
                    let role = if o.in_recovery {
                        Role::Replica
                    } else {
                        primaries.push(i);
                        Role::Primary
                    };
                    node.role.store(role as u8, Relaxed);
                    node.replay_lsn.store(o.lsn, Relaxed);
                }
                Err(e) => {
                    if !node.down.swap(true, Relaxed) {
                        tracing::warn!(shard = %shard.name, node = %node.address, error = %e, "health check failed");
                    }
                    node.ban(self.cfg.ban_time, e);
                    let cut = node.cut_connections();
                    if cut > 0 {
                        tracing::warn!(node = %node.address, connections = cut, "closed connections to a failed node");
                    }
                }
            }
        }
        let previous = shard.writer.load(Relaxed);
        let writer = match primaries.as_slice() {
            [one] => *one,
            [a, b, ..] => {
                if let Ok(mut d) = shard.dual.lock() {
                    *d = (*a, *b);
                }
                if previous != DUAL {
                    tracing::error!(shard = %shard.name, first = %shard.nodes[*a].address, second = %shard.nodes[*b].address,
                        "two nodes report being the primary; refusing writes to this shard");
                }
                DUAL
            }
            // Keep pointing at a primary that stopped answering: writes then
            // fail naming it. One that answers as a replica is no primary.
            [] if previous < DUAL && shard.nodes[previous].is_down() => previous,
            [] => NO_WRITER,
        };
        if writer != previous {
            if writer < DUAL && previous < DUAL {
                shard.primary_changes.fetch_add(1, Relaxed);
            }
            if writer < DUAL {
                tracing::warn!(shard = %shard.name, primary = %shard.nodes[writer].address, "writes now go to this node");
            } else if writer == NO_WRITER {
                tracing::error!(shard = %shard.name, "no node reports being the primary");
            }
        }
        shard.writer.store(writer, Relaxed);

        // Lag, against the primary's WAL position when there is one primary.
        let head = if writer < DUAL && results[writer].is_ok() {
            shard.nodes[writer].lsn()
        } else {
            results.iter().flatten().map(|o| o.lsn).max().unwrap_or(0)
        };
        let max_ms = self.cfg.max_replica_lag.as_millis() as u64;
        let now = Instant::now();
        if self.heads.back().is_some_and(|&(_, h)| head < h) {
            // Another primary (a promotion): its positions start afresh.
            self.heads.clear();
        }
        self.heads.push_back((now, head));
        if self.heads.len() > HEAD_SAMPLES {
            self.heads.pop_front();
        }
        for (i, r) in results.iter().enumerate() {
            let (Ok(o), node) = (r, &shard.nodes[i]) else {
                continue;
            };
            if !o.in_recovery {
                node.lag_bytes.store(0, Relaxed);
                node.lag_ms.store(0, Relaxed);
                continue;
            }
            let bytes = head.saturating_sub(o.lsn);
            // Behind, with no replayed commit to date it by: assume the worst.
            let ms = if bytes == 0 {
                0
            } else {
                lag_ms(&self.heads, now, o.lsn, o.replay_age_ms)
            };
            node.lag_bytes.store(bytes, Relaxed);
            node.lag_ms.store(ms, Relaxed);
            let ok = bytes <= self.cfg.max_replica_lag_bytes && ms <= max_ms;
            if node.lag_ok.swap(ok, Relaxed) != ok {
                if ok {
                    tracing::info!(node = %node.address, lag_bytes = bytes, lag_ms = ms, "replica caught up; back in rotation");
                } else {
                    tracing::info!(node = %node.address, lag_bytes = bytes, lag_ms = ms, "replica lags beyond the bound; out of rotation until it catches up");
                }
            }
            let since = &mut self.lagging_since[i];
            match (ok, since.as_mut()) {
                (true, _) => *since = None,
                (false, None) => *since = Some((Instant::now(), false)),
                (false, Some((start, warned))) if !*warned && start.elapsed() >= LAG_WARN_AFTER => {
                    *warned = true;
                    tracing::warn!(node = %node.address, lag_bytes = bytes, lag_ms = ms, for_s = start.elapsed().as_secs(), "replica has lagged beyond the bound for a while; still out of rotation");
                }
                (false, Some(_)) => {}
            }
        }
        self.maybe_promote(writer, &results).await;
    }

    /// `auto_promote`: the primary has been gone for the grace time and no
    /// node claims the role: promote the replica that replayed furthest.
    async fn maybe_promote(&mut self, writer: usize, results: &[Result<Observation, String>]) {
        let usable = writer < DUAL && results[writer].is_ok();
        if usable || writer == DUAL {
            self.writer_lost_since = None;
            return;
        }
        let since = *self.writer_lost_since.get_or_insert_with(Instant::now);
        if !self.cfg.auto_promote || since.elapsed() < self.cfg.auto_promote_after {
            return;
        }
        let best = results
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                r.as_ref()
                    .ok()
                    .filter(|o| o.in_recovery)
                    .map(|o| (o.lsn, i))
            })
            .max();
        let Some((lsn, i)) = best else { return };
        let address = self.shard.nodes[i].address.clone();
        tracing::warn!(shard = %self.shard.name, node = %address, lsn, "primary unreachable; promoting the most caught-up replica");
        let Some(conn) = self.conns[i].as_mut() else {
            return;
        };
        match conn.simple_query("SELECT pg_promote(true, 30)").await {
            Ok(_) => {
                self.writer_lost_since = None;
                tracing::warn!(shard = %self.shard.name, node = %address, "replica promoted");
            }
            Err(e) => {
                tracing::error!(shard = %self.shard.name, node = %address, error = %e, "promotion failed")
            }
        }
    }

    /// Checks forever, every `interval`; four times as often while a node
    /// is down, so a restarted node is back in use quickly.
    pub async fn run(mut self) {
        let interval = self.cfg.interval;
        let mut all_up = true;
        loop {
            let pause = if all_up {
                interval
            } else {
                (interval / 4).max(Duration::from_millis(10))
            };
            crate::timer::sleep(pause).await;
            all_up = self.round().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ban holds for its time and then clears itself (a node once banned
    /// costs no clock read per look-up afterwards); a longer ban set
    /// meanwhile is kept.
    #[test]
    fn a_ban_ends_on_time_and_clears() {
        let n = NodeHealth::new("n:1".into(), None, Role::Replica);
        assert!(!n.is_banned());
        n.ban(std::time::Duration::from_millis(40), "test");
        assert!(n.is_banned());
        std::thread::sleep(std::time::Duration::from_millis(60));
        assert!(!n.is_banned());
        assert_eq!(n.banned_until.load(Relaxed), 0, "an expired ban is cleared");
        n.ban(std::time::Duration::from_secs(60), "test");
        assert!(n.is_banned());
    }

    #[test]
    fn replica_lag_is_dated_by_the_primarys_positions() {
        use std::collections::VecDeque;
        use std::time::Duration;
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // The primary wrote 1,000 bytes a second for 3 s, with no commit.
        let heads: VecDeque<(Instant, u64)> =
            (0..=3).map(|s| (at(s * 1000), 10_000 + s * 1000)).collect();
        let now = at(3000);
        // Caught up with the last check: no lag, whatever the last commit.
        assert_eq!(lag_ms(&heads, now, 13_000, Some(60_000)), 0);
        // 100 bytes behind: the primary was there 100 ms ago.
        assert_eq!(lag_ms(&heads, now, 12_900, Some(60_000)), 100);
        // 1.5 s behind.
        assert_eq!(lag_ms(&heads, now, 11_500, None), 1500);
        // Older than every sample: the last replayed commit, or the oldest
        // sample's age, whichever is older.
        assert_eq!(lag_ms(&heads, now, 9_000, Some(60_000)), 60_000);
        assert_eq!(lag_ms(&heads, now, 9_000, Some(10)), 3000);
        assert_eq!(lag_ms(&heads, now, 9_000, None), u64::MAX);
        // No sample yet: the last replayed commit.
        assert_eq!(lag_ms(&VecDeque::new(), now, 1, Some(7)), 7);
    }
}
