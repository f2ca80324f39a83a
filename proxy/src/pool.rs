//! Pools of raw server connections, one per (node, user, database). A
//! connection goes back to a pool only when clean: sessions check before
//! giving it back (`PooledConnection::give_back`, which checks again; a
//! lent connection dropped on any other path is closed), `recycle` checks
//! before lending it, and a reaper closes idle and old connections.
//!
//! The pool is this crate's own (a mutex over a stack of idle connections
//! and a semaphore of lendable slots): a checkout that finds a connection
//! idle takes one uncontended lock and a permit, and returning it the
//! same, which a general-purpose pool's hooks, metrics and timeout layers
//! made several times dearer on every transaction.

use crate::clock::Mono;
use crate::protocol::backend::{sqlstate, PgError};
use crate::server::conn::{ServerConnection, ServerError, ServerTarget};
use shardline_config::PoolConfig;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
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

impl Manager {
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

    /// Whether an idle connection may be lent again (why not, else).
    fn recycle(&self, idle: &Idle, now: Mono) -> Result<(), &'static str> {
        let conn = &idle.conn;
        if !conn.is_clean() {
            return Err("connection is not clean");
        }
        if conn.generation < self.generation.load(Relaxed) {
            return Err("closed by RECONNECT");
        }
        if conn.listed.as_ref().is_some_and(|l| l.is_cut()) {
            return Err("its node failed a health check");
        }
        if now.since(idle.created) > self.max_lifetime {
            return Err("connection exceeded max_lifetime");
        }
        if now.since(idle.last_used) >= self.check_delay && conn.socket().has_closed_or_unread() {
            return Err("server closed the connection while idle");
        }
        Ok(())
    }
}

/// A connection waiting in its pool, with when it was opened and last
/// came back.
struct Idle {
    /// Boxed: a lent connection moves several times per checkout, and a
    /// pointer moves cheaply where its few hundred bytes would be copied.
    conn: Box<ServerConnection>,
    created: Mono,
    last_used: Mono,
}

/// What the pool's lock guards.
struct Slots {
    /// Idle connections, the one returned last on top (lent first: the
    /// others age out and the reaper closes them when traffic falls).
    idle: Vec<Idle>,
    /// Connections open (idle and lent) and being opened.
    size: usize,
    max_size: usize,
    /// Permits still to take out of the semaphore after a shrink: as many
    /// connections are closed as they come back instead of being kept.
    shrinking: usize,
}

struct Inner {
    manager: Manager,
    slots: Mutex<Slots>,
    /// One permit per connection that may be lent now (`max_size` less
    /// those lent): a checkout takes one, waiting in line when none is
    /// free, and a connection coming back gives it back.
    permits: tokio::sync::Semaphore,
    /// Checkouts waiting for a permit.
    waiting: AtomicUsize,
}

/// A bounded pool of connections to one server.
#[derive(Clone)]
pub struct Pool(Arc<Inner>);

/// The pool's sizes now (SHOW POOLS).
pub struct Status {
    pub max_size: usize,
    /// Connections open (idle and lent) and being opened.
    pub size: usize,
    pub available: usize,
    pub waiting: usize,
}

/// Why a checkout failed.
#[derive(Debug)]
pub enum CheckoutError {
    /// No connection became free in the time allowed.
    Wait,
    /// Opening a connection took longer than `connect_timeout`.
    Connect,
    /// Opening a connection failed.
    Backend(ServerError),
    /// The waiting client was ended (the console's KILL_CLIENT).
    Ended,
}

impl Pool {
    fn new(manager: Manager, max_size: usize) -> Pool {
        Pool(Arc::new(Inner {
            manager,
            slots: Mutex::new(Slots {
                idle: Vec::new(),
                size: 0,
                max_size,
                shrinking: 0,
            }),
            permits: tokio::sync::Semaphore::new(max_size),
            waiting: AtomicUsize::new(0),
        }))
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.0.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn manager(&self) -> &Manager {
        &self.0.manager
    }

    pub fn status(&self) -> Status {
        let s = self.slots();
        Status {
            max_size: s.max_size,
            size: s.size,
            available: s.idle.len(),
            waiting: self.0.waiting.load(Relaxed),
        }
    }

    /// A connection: an idle one that passes `recycle`, else a new one
    /// (opened within `connect_timeout`); waiting up to `wait` for a free
    /// slot (`Duration::ZERO`: not at all).
    async fn get(
        &self,
        wait: Duration,
        connect_timeout: Duration,
    ) -> Result<PooledConnection, CheckoutError> {
        match self.0.permits.try_acquire() {
            Ok(p) => p.forget(),
            Err(_) if wait.is_zero() => return Err(CheckoutError::Wait),
            Err(_) => {
                // Counted while it waits, however the wait ends (a client
                // that leaves drops this future mid-wait).
                struct Waiting<'a>(&'a AtomicUsize);
                impl Drop for Waiting<'_> {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Relaxed);
                    }
                }
                self.0.waiting.fetch_add(1, Relaxed);
                let _waiting = Waiting(&self.0.waiting);
                let got = crate::timer::timeout(wait, self.0.permits.acquire()).await;
                match got {
                    Ok(Ok(p)) => p.forget(),
                    // (The semaphore is never closed.)
                    Ok(Err(_)) | Err(_) => return Err(CheckoutError::Wait),
                }
            }
        }
        let slot = match self.idle_or_opening() {
            Ok(conn) => return Ok(conn),
            Err(slot) => slot,
        };
        // Counted in `size` (and uncounted by `slot` if it fails).
        match crate::timer::timeout(connect_timeout, self.0.manager.create()).await {
            Ok(Ok(conn)) => {
                std::mem::forget(slot);
                Ok(PooledConnection {
                    conn: Some(conn),
                    created: Mono::now(),
                    pool: self.clone(),
                })
            }
            Ok(Err(e)) => Err(CheckoutError::Backend(e)),
            Err(_) => Err(CheckoutError::Connect),
        }
    }

    /// A connection at once, without waiting: a permit is free and an
    /// idle connection passes `recycle` (the checkout of nearly every
    /// unit, run without the asynchronous path's futures). `None` leaves
    /// the pool as it was.
    pub fn try_idle(&self) -> Option<PooledConnection> {
        self.0.permits.try_acquire().ok()?.forget();
        // No idle one: the slot reserved for opening one is given back
        // with the permit when dropped.
        self.idle_or_opening().ok()
    }

    /// With a permit taken: an idle connection that passes `recycle`
    /// (those that fail are closed), else the slot for opening a new one,
    /// counted in `size`. The permit is the checkout's until the
    /// connection comes back (`PooledConnection::give_back`) or is closed, or the slot is
    /// dropped (`Slot::drop`).
    fn idle_or_opening(&self) -> Result<PooledConnection, Slot<'_>> {
        let mut slot = Slot {
            pool: self,
            opening: false,
        };
        let now = Mono::recent();
        loop {
            let popped = {
                let mut s = self.slots();
                let idle = s.idle.pop();
                if idle.is_none() {
                    s.size += 1;
                    slot.opening = true;
                }
                idle
            };
            let Some(idle) = popped else {
                return Err(slot);
            };
            match self.0.manager.recycle(&idle, now) {
                Ok(()) => {
                    std::mem::forget(slot);
                    return Ok(PooledConnection {
                        conn: Some(idle.conn),
                        created: idle.created,
                        pool: self.clone(),
                    });
                }
                Err(why) => {
                    tracing::debug!(server = %idle.conn.addr, why, "closed a pooled connection");
                    self.slots().size -= 1;
                }
            }
        }
    }

    /// Gives a lent connection's permit back (one a shrink still owes is
    /// kept instead).
    fn give_back_permit(&self, s: &mut Slots) {
        if s.shrinking > 0 {
            s.shrinking -= 1;
        } else {
            self.0.permits.add_permits(1);
        }
    }

    /// A lent connection comes back: kept idle, or closed when the pool
    /// is over its size.
    fn put(&self, mut conn: Box<ServerConnection>, created: Mono) {
        conn.idle();
        let mut s = self.slots();
        let closed = if s.size > s.max_size {
            s.size -= 1;
            Some(conn)
        } else {
            s.idle.push(Idle {
                conn,
                created,
                last_used: Mono::recent(),
            });
            None
        };
        self.give_back_permit(&mut s);
        drop(s);
        // Closed outside the lock.
        drop(closed);
    }

    /// A lent connection is closed instead of coming back.
    fn discard(&self) {
        let mut s = self.slots();
        s.size -= 1;
        self.give_back_permit(&mut s);
    }

    /// Changes the pool's size: a larger one lends more at once; a smaller
    /// one closes idle connections over it now and lent ones as they come
    /// back.
    pub fn resize(&self, max_size: usize) {
        let mut s = self.slots();
        let old = s.max_size;
        s.max_size = max_size;
        if max_size > old {
            // Owed permits are forgiven first.
            let mut more = max_size - old;
            let forgiven = more.min(s.shrinking);
            s.shrinking -= forgiven;
            more -= forgiven;
            self.0.permits.add_permits(more);
        } else {
            let fewer = old - max_size;
            let taken = self.0.permits.forget_permits(fewer);
            s.shrinking += fewer - taken;
        }
        // The idle ones returned longest ago (the stack's bottom) go first.
        let over = s.size.saturating_sub(max_size).min(s.idle.len());
        let closed: Vec<Idle> = s.idle.drain(..over).collect();
        s.size -= closed.len();
        drop(s);
        drop(closed);
    }

    /// Keeps the idle connections `keep` accepts (given the connection,
    /// its age and how long it has been idle) and closes the others;
    /// returns how many closed.
    pub fn retain(
        &self,
        mut keep: impl FnMut(&ServerConnection, Duration, Duration) -> bool,
    ) -> usize {
        let now = Mono::now();
        let mut closed = Vec::new();
        {
            let mut s = self.slots();
            let mut i = 0;
            while i < s.idle.len() {
                let idle = &s.idle[i];
                let age = now.since(idle.created);
                let unused = now.since(idle.last_used);
                if keep(&idle.conn, age, unused) {
                    i += 1;
                } else {
                    closed.push(s.idle.remove(i));
                }
            }
            s.size -= closed.len();
        }
        closed.len()
    }
}

/// A checkout's permit, and the connection it counts as being opened,
/// given back if the checkout fails (or is dropped while it waits for the
/// connection to open).
struct Slot<'a> {
    pool: &'a Pool,
    opening: bool,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut s = self.pool.slots();
        if self.opening {
            s.size -= 1;
        }
        self.pool.give_back_permit(&mut s);
    }
}

/// A connection lent by a pool. It goes back only through `give_back`,
/// which checks it is clean; `discard`, and a drop on any other path (an
/// early return, a cancelled future, a panic), close it. Whatever state a
/// path that forgot it left the connection in (a statement in flight, a
/// reply half read), the next client cannot meet it.
pub struct PooledConnection {
    conn: Option<Box<ServerConnection>>,
    created: Mono,
    pool: Pool,
}

impl PooledConnection {
    /// Closes the connection instead of returning it to its pool (it is
    /// not clean, or lost).
    pub fn discard(mut self) {
        self.close();
    }

    /// Returns the connection to its pool when it is clean (idle, outside
    /// a transaction, nothing unread: the caller has seen its last
    /// ReadyForQuery), else closes it; whether it went back.
    pub fn give_back(mut self) -> bool {
        let Some(conn) = self.conn.take() else {
            return false;
        };
        if conn.is_clean() {
            self.pool.put(conn, self.created);
            true
        } else {
            self.conn = Some(conn);
            self.close();
            false
        }
    }

    fn close(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.discard();
            drop(conn);
        }
    }
}

impl std::ops::Deref for PooledConnection {
    type Target = Box<ServerConnection>;

    fn deref(&self) -> &Box<ServerConnection> {
        self.conn
            .as_ref()
            .expect("a lent connection is there until dropped")
    }
}

impl std::ops::DerefMut for PooledConnection {
    fn deref_mut(&mut self) -> &mut Box<ServerConnection> {
        self.conn
            .as_mut()
            .expect("a lent connection is there until dropped")
    }
}

impl Drop for PooledConnection {
    /// Neither given back nor discarded: closed (`give_back`).
    fn drop(&mut self) {
        if let Some(conn) = self.conn.as_ref() {
            tracing::debug!(server = %conn.addr, pid = conn.pid, "a lent connection was dropped without being given back; closed");
            self.close();
        }
    }
}

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
        let pool = Pool::new(manager, size);
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

    /// Borrows an idle clean connection if one is free now, without
    /// waiting or opening one (`checkout` does both): the common case,
    /// tried before the asynchronous path is entered at all.
    pub fn try_checkout(&self) -> Option<PooledConnection> {
        let conn = self.pool.try_idle()?;
        self.counters.assignments.fetch_add(1, Relaxed);
        self.counters.wait.observe(0);
        Some(conn)
    }

    /// Borrows a clean connection, opening one if the pool has room, else
    /// waiting up to `checkout_timeout` (`waiter`, the client, is shown
    /// waiting meanwhile).
    pub async fn checkout(
        &self,
        waiter: Option<&crate::clients::ClientSlot>,
    ) -> Result<PooledConnection, PgError> {
        match self.try_checkout() {
            Some(conn) => Ok(conn),
            None => self.checkout_slow(waiter).await,
        }
    }

    /// `checkout` once `try_checkout` found no idle connection: opens one
    /// if the pool has room, else waits (for a caller that tried first).
    pub async fn checkout_slow(
        &self,
        waiter: Option<&crate::clients::ClientSlot>,
    ) -> Result<PooledConnection, PgError> {
        self.counters.assignments.fetch_add(1, Relaxed);
        // A free slot to open a connection in: try without arming a timer.
        match self.pool.get(Duration::ZERO, self.connect_timeout).await {
            Err(CheckoutError::Wait) => {}
            other => {
                self.counters.wait.observe(0);
                return other.map_err(|e| self.checkout_error(e));
            }
        }
        let started = std::time::Instant::now();
        if let Some(w) = waiter {
            w.waiting(true);
        }
        // A client ended while it waits (KILL_CLIENT) stops waiting at once.
        let got = match waiter {
            Some(w) => {
                let ended = w.ending.fired(crate::clients::Ending::KILL);
                tokio::select! {
                    got = self.pool.get(self.checkout_timeout, self.connect_timeout) => got,
                    () = ended => Err(CheckoutError::Ended),
                }
            }
            None => {
                self.pool
                    .get(self.checkout_timeout, self.connect_timeout)
                    .await
            }
        };
        if let Some(w) = waiter {
            w.waiting(false);
        }
        let waited = started.elapsed().as_micros() as u64;
        self.counters.wait_us.fetch_add(waited, Relaxed);
        self.counters.wait.observe(waited);
        if matches!(got, Err(CheckoutError::Wait)) {
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
        self.pool.retain(|_, _, _| false)
    }

    /// The backend pids of the connections idle in the pool now.
    pub fn idle_pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        self.pool.retain(|conn, _, _| {
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

    fn checkout_error(&self, e: CheckoutError) -> PgError {
        match e {
            CheckoutError::Wait => {
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
            CheckoutError::Connect => PgError::error(
                sqlstate::CANNOT_CONNECT,
                format!("timed out connecting to server {}", self.address),
            ),
            CheckoutError::Backend(ServerError::Refused { fields, addr }) => {
                // The server's own verdict (bad password, no such database ...).
                tracing::warn!(server = %addr, code = %fields.code, message = %fields.message, "server refused the proxy's login");
                let code = login_code(&fields.code);
                PgError::error(code, format!("server {addr}: {}", fields.message))
            }
            CheckoutError::Backend(e) => PgError::error(sqlstate::CANNOT_CONNECT, e.to_string()),
            // (Not a node's failure: the session ends the client.)
            CheckoutError::Ended => PgError::error(
                sqlstate::QUERY_CANCELED,
                "the client was ended while it waited for a server connection",
            ),
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
        self.checkout(None).await?.give_back();
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
        let mut tick = crate::timer::interval(period);
        loop {
            tick.tick().await;
            let Some(node) = weak.upgrade() else { return };
            let removed = node
                .pool
                .retain(|_, age, unused| unused < idle && age < lifetime);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{NodeHealth, Role};
    use crate::server::conn::tests::local_pair;
    use tokio::io::AsyncReadExt;

    fn node_pool() -> Arc<NodePool> {
        let target = ServerTarget {
            host: "127.0.0.1".into(),
            port: 1,
            user: "u".into(),
            password: None,
            database: "d".into(),
            tls_mode: shardline_config::ServerTlsMode::Disable,
            tls: None,
            application_name: None,
        };
        let node = Arc::new(NodeHealth::new(target.address(), None, Role::Primary));
        NodePool::new(target, node, 2, &PoolConfig::default())
    }

    impl Pool {
        /// `conn` lent as if opened by a checkout.
        fn lend(&self, conn: ServerConnection) -> PooledConnection {
            self.0.permits.try_acquire().expect("a free slot").forget();
            self.slots().size += 1;
            PooledConnection {
                conn: Some(Box::new(conn)),
                created: Mono::now(),
                pool: self.clone(),
            }
        }
    }

    /// (size, idle, lendable now)
    fn sizes(pool: &Pool) -> (usize, usize, usize) {
        let s = pool.status();
        (s.size, s.available, pool.0.permits.available_permits())
    }

    async fn assert_closed(mut peer: tokio::net::TcpStream) {
        let mut byte = [0u8; 1];
        let n = crate::timer::timeout(Duration::from_secs(5), peer.read(&mut byte))
            .await
            .expect("the peer learns at once");
        assert_eq!(n.expect("read"), 0, "the server sees the connection closed");
    }

    /// A clean connection given back is lent again; one dropped on a path
    /// that did not give it back (an early return, a cancelled future) is
    /// closed, whatever it looks like, and its slot freed.
    #[tokio::test]
    async fn only_a_connection_given_back_is_lent_again() {
        let pool = node_pool().pool.clone();
        let (conn, _peer) = local_pair().await;
        let lent = pool.lend(conn);
        assert_eq!(sizes(&pool), (1, 0, 1));
        assert!(lent.give_back(), "a clean connection goes back");
        assert_eq!(sizes(&pool), (1, 1, 2));
        let again = pool.try_idle().expect("lent again");
        assert_eq!(sizes(&pool), (1, 0, 1));
        drop(again);
        assert_eq!(sizes(&pool), (0, 0, 2), "dropped: closed, its slot free");
        assert!(pool.try_idle().is_none(), "nothing idle to lend");
        assert_eq!(sizes(&pool), (0, 0, 2));

        // Looks clean (idle, nothing unread), as one whose statement is
        // still running does: dropped, it is closed all the same.
        let (conn, peer) = local_pair().await;
        drop(pool.lend(conn));
        assert_eq!(sizes(&pool), (0, 0, 2));
        assert_closed(peer).await;
    }

    /// `give_back` checks: a connection in a transaction, broken, or with
    /// bytes unread is closed instead.
    #[tokio::test]
    async fn a_connection_not_clean_is_closed_when_given_back() {
        let pool = node_pool().pool.clone();
        let dirty: [fn(&mut ServerConnection); 3] = [
            |c| c.tx_status = b'T',
            |c| c.broken = true,
            |c| c.read_buf.extend_from_slice(b"Z"),
        ];
        for make_dirty in dirty {
            let (mut conn, peer) = local_pair().await;
            make_dirty(&mut conn);
            assert!(!pool.lend(conn).give_back(), "not taken back");
            assert_eq!(sizes(&pool), (0, 0, 2));
            assert_closed(peer).await;
        }
    }
}
