//! Pools of raw server connections, one per (node, user, database), on
//! `deadpool::managed`. A connection goes back to a pool only when clean:
//! sessions check before returning it, `recycle` checks again before lending it,
//! and a reaper closes idle and old connections.

use crate::protocol::backend::{sqlstate, PgError};
use crate::server::conn::{ServerConnection, ServerError, ServerTarget};
use deadpool::managed::{
    self, Metrics, Object, PoolError, QueueMode, RecycleError, RecycleResult, TimeoutType, Timeouts,
};
use deadpool::Runtime;
use shardline_config::PoolConfig;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub struct Manager {
    target: ServerTarget,
    node: Arc<crate::health::NodeHealth>,
    max_prepared: usize,
    check_delay: Duration,
    max_lifetime: Duration,
    /// ParameterStatus values from the first connection, reported to clients at login.
    params: OnceLock<Arc<Vec<(String, String)>>>,
    /// Raised by the console's RECONNECT: connections opened before are
    /// closed instead of lent again.
    generation: AtomicU64,
    /// The pool's counters (connections being opened, opened, failed).
    counters: Arc<PoolCounters>,
}

impl managed::Manager for Manager {
    /// Boxed: the pool and the session move a lent connection several
    /// times per checkout, and a pointer moves cheaply where the
    /// connection's few hundred bytes would be copied each time.
    type Type = Box<ServerConnection>;
    type Error = ServerError;

    async fn create(&self) -> Result<Box<ServerConnection>, ServerError> {
        // A node that stops answering while the connection is opened (its
        // TCP handshake done by the kernel, its startup never answered)
        // fails its health check within interval + timeout: give up then,
        // not at connect_timeout, so a read goes elsewhere.
        let failure = self.node.failure();
        let _opening = Opening::start(&self.counters);
        let failed = || {
            self.counters.open_failures.fetch_add(1, Relaxed);
        };
        let mut conn = tokio::select! {
            conn = ServerConnection::connect(&self.target, self.max_prepared) => conn.inspect_err(|_| failed())?,
            () = failure => {
                failed();
                return Err(ServerError::Io {
                    addr: self.node.address.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the node failed its health check while the connection was opened",
                    ),
                })
            }
        };
        conn.listed = Some(self.node.list(&conn, &self.target));
        conn.generation = self.generation.load(Relaxed);
        self.counters.opened.fetch_add(1, Relaxed);
        tracing::debug!(server = %conn.addr, pid = conn.pid, "opened server connection");
        let _ = self.params.set(Arc::new(conn.params.clone()));
        Ok(Box::new(conn))
    }

    async fn recycle(
        &self,
        conn: &mut Box<ServerConnection>,
        metrics: &Metrics,
    ) -> RecycleResult<ServerError> {
        if !conn.is_clean() {
            return Err(RecycleError::message("connection is not clean"));
        }
        if conn.generation < self.generation.load(Relaxed) {
            return Err(RecycleError::message("closed by RECONNECT"));
        }
        // One clock read for both ages (it shows in a profile of short reads).
        let now = std::time::Instant::now();
        if now.saturating_duration_since(metrics.created) > self.max_lifetime {
            return Err(RecycleError::message("connection exceeded max_lifetime"));
        }
        let last_used = metrics.recycled.unwrap_or(metrics.created);
        if now.saturating_duration_since(last_used) > self.check_delay
            && conn.stream.has_closed_or_unread()
        {
            return Err(RecycleError::message(
                "server closed the connection while idle",
            ));
        }
        Ok(())
    }
}

pub type Pool = managed::Pool<Manager>;
pub type PooledConnection = Object<Manager>;

/// The pool for one node and one (user, database).
pub struct NodePool {
    pub pool: Pool,
    pub address: String,
    checkout_timeout: Duration,
    connect_timeout: Duration,
    /// The configured size (`apply_size` makes it the pool's).
    size: usize,
    /// Kept by the pool that replaces this one at a reload.
    pub counters: Arc<PoolCounters>,
}

/// What a pool counts for SHOW STATS.
#[derive(Default)]
pub struct PoolCounters {
    /// Checkouts (PgBouncer's server assignments).
    pub assignments: AtomicU64,
    /// Time clients spent waiting for a connection, µs.
    pub wait_us: AtomicU64,
    /// Each checkout's wait (0 when a connection was free at once).
    pub wait: crate::stats::Histogram,
    /// Checkouts that found no free connection within `checkout_timeout`.
    pub timeouts: AtomicU64,
    /// Server connections being opened now.
    pub opening: AtomicU64,
    /// Server connections opened, and attempts that failed.
    pub opened: AtomicU64,
    pub open_failures: AtomicU64,
}

/// Counts a connection being opened until it is dropped.
struct Opening<'a>(&'a PoolCounters);

impl<'a> Opening<'a> {
    fn start(c: &'a PoolCounters) -> Opening<'a> {
        c.opening.fetch_add(1, Relaxed);
        Opening(c)
    }
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        self.0.opening.fetch_sub(1, Relaxed);
    }
}

impl NodePool {
    pub fn new(
        target: ServerTarget,
        node: Arc<crate::health::NodeHealth>,
        size: usize,
        cfg: &PoolConfig,
    ) -> Arc<NodePool> {
        let address = target.address();
        let manager = Manager {
            target,
            node,
            max_prepared: cfg.prepared_statements_per_server,
            check_delay: cfg.server_check_delay,
            max_lifetime: cfg.max_lifetime,
            params: OnceLock::new(),
            generation: AtomicU64::new(0),
            counters: Arc::default(),
        };
        let counters = manager.counters.clone();
        let pool = Pool::builder(manager)
            .max_size(size)
            .queue_mode(QueueMode::Lifo)
            .wait_timeout(Some(cfg.checkout_timeout))
            .create_timeout(Some(cfg.connect_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .expect("pool settings are valid and a runtime is set");
        let node = Arc::new(NodePool {
            pool,
            address,
            checkout_timeout: cfg.checkout_timeout,
            connect_timeout: cfg.connect_timeout,
            size,
            counters,
        });
        spawn_reaper(&node, cfg.idle_timeout, cfg.max_lifetime);
        node
    }

    /// The pool for `target` under a reloaded configuration: this one's
    /// connections and counters, resized, with the new timeouts; `None`
    /// when what its connections were opened with has changed (the
    /// target, or what its manager checks), and a new pool is needed.
    pub fn reused(
        self: &Arc<Self>,
        target: &ServerTarget,
        node: &Arc<crate::health::NodeHealth>,
        size: usize,
        cfg: &PoolConfig,
    ) -> Option<Arc<NodePool>> {
        let m = self.pool.manager();
        let same = Arc::ptr_eq(&m.node, node)
            && m.target.same_login(target)
            && m.max_prepared == cfg.prepared_statements_per_server
            && m.check_delay == cfg.server_check_delay
            && m.max_lifetime == cfg.max_lifetime;
        if !same {
            return None;
        }
        let node = Arc::new(NodePool {
            pool: self.pool.clone(),
            address: self.address.clone(),
            checkout_timeout: cfg.checkout_timeout,
            connect_timeout: cfg.connect_timeout,
            size,
            counters: self.counters.clone(),
        });
        spawn_reaper(&node, cfg.idle_timeout, cfg.max_lifetime);
        Some(node)
    }

    /// Borrows a clean connection, opening one if the pool has room, else
    /// waiting up to `checkout_timeout` (`waiter`, the client, is shown
    /// waiting meanwhile).
    pub async fn checkout(
        &self,
        waiter: Option<&crate::clients::ClientSlot>,
    ) -> Result<PooledConnection, PgError> {
        self.counters.assignments.fetch_add(1, Relaxed);
        // Most checkouts find a free connection: try without arming a timer.
        let now = Timeouts {
            wait: Some(Duration::ZERO),
            create: Some(self.connect_timeout),
            recycle: None,
        };
        match self.pool.timeout_get(&now).await {
            Err(PoolError::Timeout(TimeoutType::Wait)) => {}
            other => {
                self.counters.wait.observe(0);
                return other.map_err(|e| self.checkout_error(e));
            }
        }
        let wait = Timeouts {
            wait: Some(self.checkout_timeout),
            create: Some(self.connect_timeout),
            recycle: None,
        };
        let started = std::time::Instant::now();
        if let Some(w) = waiter {
            w.waiting(true);
        }
        let got = self.pool.timeout_get(&wait).await;
        if let Some(w) = waiter {
            w.waiting(false);
        }
        let waited = started.elapsed().as_micros() as u64;
        self.counters.wait_us.fetch_add(waited, Relaxed);
        self.counters.wait.observe(waited);
        if matches!(got, Err(PoolError::Timeout(TimeoutType::Wait))) {
            self.counters.timeouts.fetch_add(1, Relaxed);
        }
        got.map_err(|e| self.checkout_error(e))
    }

    /// Gives the pool its configured size (when a reload takes over; a
    /// smaller size closes connections as they come back).
    pub fn apply_size(&self) {
        if self.pool.status().max_size != self.size {
            self.pool.resize(self.size);
        }
    }

    /// Closes the idle connections now and the lent ones when they come
    /// back (the console's RECONNECT); returns how many closed now.
    pub fn reconnect(&self) -> usize {
        self.pool.manager().generation.fetch_add(1, Relaxed);
        self.pool.retain(|_, _| false).removed.len()
    }

    /// The backend pids of the connections idle in the pool now.
    pub fn idle_pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        self.pool.retain(|conn, _| {
            pids.push(conn.pid);
            true
        });
        pids
    }

    /// Connections open (lent and idle) and idle, and clients waiting.
    pub fn counts(&self) -> (usize, usize, usize) {
        let s = self.pool.status();
        (s.size, s.available.min(s.size), s.waiting)
    }

    fn checkout_error(&self, e: PoolError<ServerError>) -> PgError {
        match e {
            PoolError::Timeout(TimeoutType::Wait) => {
                let s = self.pool.status();
                PgError::error(
                    sqlstate::TOO_MANY_CONNECTIONS,
                    format!(
                        "no server connection to {} became free within {:?} ({} of {} in use)",
                        self.address,
                        self.checkout_timeout,
                        s.size - s.available.min(s.size),
                        s.max_size
                    ),
                )
                .with_hint("raise pool_size or pool.checkout_timeout, or shorten transactions")
            }
            PoolError::Timeout(_) => PgError::error(
                sqlstate::CANNOT_CONNECT,
                format!("timed out connecting to server {}", self.address),
            ),
            PoolError::Backend(ServerError::Refused { fields, addr }) => {
                // The server's own verdict (bad password, no such database ...).
                tracing::warn!(server = %addr, code = %fields.code, message = %fields.message, "server refused the proxy's login");
                let code = login_code(&fields.code);
                PgError::error(code, format!("server {addr}: {}", fields.message))
            }
            PoolError::Backend(e) => PgError::error(sqlstate::CANNOT_CONNECT, e.to_string()),
            PoolError::Closed => PgError::error(sqlstate::ADMIN_SHUTDOWN, "the pool is closed"),
            other => PgError::error(sqlstate::INTERNAL_ERROR, other.to_string()),
        }
    }

    /// Connections lent out now.
    pub fn in_use(&self) -> usize {
        let s = self.pool.status();
        s.size.saturating_sub(s.available)
    }

    /// A startup parameter of this pool's servers, if one was opened yet.
    pub fn known_param(&self, name: &str) -> Option<String> {
        let params = self.pool.manager().params.get()?;
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }

    /// Startup parameters to report to clients, opening a connection if none is known yet.
    pub async fn server_params(&self) -> Result<Arc<Vec<(String, String)>>, PgError> {
        if let Some(p) = self.pool.manager().params.get() {
            return Ok(p.clone());
        }
        let conn = self.checkout(None).await?;
        drop(conn);
        Ok(self
            .pool
            .manager()
            .params
            .get()
            .cloned()
            .unwrap_or_default())
    }
}

/// A login refused by a server, as the client sees it: the server's code
/// when it is one a client can act on, else 08001 (cannot connect).
fn login_code(code: &str) -> &'static str {
    use sqlstate::*;
    [
        INVALID_PASSWORD,
        INVALID_AUTHORIZATION,
        INVALID_CATALOG_NAME,
        TOO_MANY_CONNECTIONS,
        ADMIN_SHUTDOWN,
        "57P03",
    ]
    .into_iter()
    .find(|c| *c == code)
    .unwrap_or(CANNOT_CONNECT)
}

fn spawn_reaper(node: &Arc<NodePool>, idle: Duration, lifetime: Duration) {
    let weak = Arc::downgrade(node);
    let period =
        (idle.min(lifetime) / 4).clamp(Duration::from_millis(200), Duration::from_secs(30));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(node) = weak.upgrade() else { return };
            let removed = node
                .pool
                .retain(|_, m| m.last_used() < idle && m.age() < lifetime)
                .removed
                .len();
            if removed > 0 {
                tracing::debug!(server = %node.address, removed, "closed idle or expired server connections");
            }
        }
    });
}

/// Every pool one (user, database) can use, by shard.
pub struct PoolSet {
    pub shards: Vec<ShardPools>,
}

/// One shard's pools, in the order of its `ShardHealth::nodes` (the
/// configured primary first, then the replicas).
pub struct ShardPools {
    pub name: String,
    pub nodes: Vec<Arc<NodePool>>,
}
