//! Shardline: a PostgreSQL proxy. This crate holds the running proxy: the
//! listener, client sessions, the wire protocol, authentication, server
//! connection pools, and the `demo` and `check` commands. See ARCHITECTURE.md.

pub mod admin;
pub mod auth;
pub mod cache;
pub mod check;
pub mod clients;
pub mod clock;
pub mod cluster;
pub mod demo;
pub mod fuzz;
pub mod health;
pub mod hotkeys;
pub mod memory;
pub mod metrics;
pub mod pool;
pub mod protocol;
pub mod server;
pub mod session;
pub mod stats;
pub mod stream;
pub mod timer;
pub mod tls;
pub mod turn;
pub mod twophase;
pub(crate) mod wake;

use anyhow::{Context as _, Result};
use pool::{NodePool, PoolSet, ShardPools};
use server::ServerTarget;
use shardline_config::{Config, PoolMode};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// A user the proxy accepts, with what it needs to serve them.
pub struct UserEntry {
    pub name: String,
    pub database: String,
    pub secret: auth::Secret,
    pub mode: PoolMode,
    pub pools: Arc<PoolSet>,
    /// Read-your-writes per shard, shared by all of this user's connections
    /// (an application's pool writes on one connection and reads on another).
    pub ryw: Vec<Arc<ReadYourWritesState>>,
    /// Traffic of all this user's clients (SHOW STATS); kept across reloads.
    pub stats: Arc<stats::Stats>,
}

/// Where the user's last write left the primary, for read-your-writes.
#[derive(Default)]
pub struct ReadYourWritesState {
    /// Reads need replicas replayed at least this far (WAL position).
    pub lsn: std::sync::atomic::AtomicU64,
    /// Reads go to the primary until this time (`health::now_ms`).
    pub primary_until: std::sync::atomic::AtomicU64,
    /// Commits whose reply may have reached the client while their WAL
    /// position is not known yet: reads go to the primary meanwhile.
    pub positions_pending: std::sync::atomic::AtomicU32,
}

/// A commit of this user's on one shard whose WAL position is not known
/// yet. Unless held, its reply reaches the client before the position is
/// known: it is counted in `positions_pending` until the position is
/// recorded (the user's reads go to the primary meanwhile), and dropped
/// without one (the connection was lost) it sends the user's reads to the
/// primary for `fallback`. A reply held until the position is known
/// (`held`) needs neither: no read can depend on a commit its client has not
/// been told of, and the position is recorded before the reply is
/// released. If the position query fails the reply goes out all the same
/// (`released_unknown`), as an unheld one.
pub struct PositionPending {
    user: Arc<UserEntry>,
    shard: usize,
    fallback: Duration,
    settled: bool,
    released: bool,
    counted: bool,
}

impl PositionPending {
    pub fn new(user: Arc<UserEntry>, shard: usize, fallback: Duration) -> PositionPending {
        user.ryw[shard]
            .positions_pending
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        PositionPending {
            user,
            shard,
            fallback,
            settled: false,
            released: true,
            counted: true,
        }
    }

    /// The commit's reply waits for the position.
    pub fn held(mut self) -> PositionPending {
        self.uncount();
        self.released = false;
        self
    }

    /// The position query failed and the held reply is released: the
    /// user's reads go to the primary for `fallback`.
    pub fn released_unknown(&mut self) {
        self.released = true;
    }

    /// The primary's WAL position after the commit.
    pub fn settle(&mut self, lsn: u64) {
        self.user.ryw[self.shard]
            .lsn
            .fetch_max(lsn, std::sync::atomic::Ordering::SeqCst);
        self.settled = true;
    }

    fn uncount(&mut self) {
        if std::mem::replace(&mut self.counted, false) {
            self.user.ryw[self.shard]
                .positions_pending
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl std::fmt::Debug for PositionPending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PositionPending(shard {})", self.shard)
    }
}

impl Drop for PositionPending {
    fn drop(&mut self) {
        if !self.settled && self.released {
            tracing::debug!(
                user = %self.user.name,
                shard = self.shard,
                for_ms = self.fallback.as_millis() as u64,
                "a commit's WAL position is unknown: the user's reads go to the primary meanwhile"
            );
            let until = health::now_ms() + self.fallback.as_millis() as u64;
            self.user.ryw[self.shard]
                .primary_until
                .fetch_max(until, std::sync::atomic::Ordering::SeqCst);
        }
        self.uncount();
    }
}

/// State every session shares; built once from the configuration.
pub struct Shared {
    pub users: HashMap<(String, String), Arc<UserEntry>>,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Plain-text clients are refused (`tls.mode = "require"`).
    pub tls_required: bool,
    /// Every client logged in: cancel keys, and what the console shows.
    pub clients: Arc<clients::Clients>,
    /// The admin console's settings and state (PAUSE, SHUTDOWN, averages,
    /// reloads); the same across reloads.
    pub admin: Arc<admin::Admin>,
    /// Which configuration this is: 0 at start, one more per reload. A
    /// session moves to the latest at its next transaction boundary.
    pub generation: u64,
    /// The configuration running (SHOW CONFIG).
    pub config: Arc<Config>,
    /// This config's placement (`Config::placement_fingerprint`, as a
    /// number): a shard recording another one (`shardline-rebalance` moved
    /// rows since) makes the sessions on this config refuse statements.
    pub placement: u64,
    /// The sharding keys routed by (SHOW HOT_KEYS), when there are several
    /// shards and `hot_keys.window` is not 0; kept across a reload that
    /// keeps the placement and the window.
    pub hot_keys: Option<Arc<hotkeys::HotKeys>>,
    /// The result cache (`[cache]`): one for the process, kept across
    /// reloads (each clears it), so a write by a session still on an
    /// older configuration drops what newer sessions cached.
    pub result_cache: Arc<cache::ResultCache>,
    /// Whether this configuration caches anything.
    pub caching: bool,
    /// Units run, by placement (SHOW ROUTING); kept across reloads.
    pub placements: Arc<stats::Placements>,
    /// Latency by placement kind, errors by class, reloads (`/metrics`);
    /// kept across reloads.
    pub events: Arc<stats::Events>,
    /// `log.slow_statement` in µs (`u64::MAX`: off).
    pub slow_us: u64,
    pub statements: server::statements::StatementRegistry,
    /// Source of unique tokens (unnamed statement ownership); one for the
    /// process, as server connections outlive a reload.
    pub next_token: Arc<AtomicU64>,
    pub max_message_size: usize,
    pub auth_timeout: Duration,
    /// Roles, bans and lag of every node.
    pub topology: Arc<health::Topology>,
    /// Read/write classification with its cache (shared by all sessions;
    /// no lock is held while a statement is parsed).
    pub router: shardline_router::SharedRouter,
    /// Shard placement, when there are several shards.
    pub sharding: Option<Arc<shardline_router::sharding::Sharding>>,
    /// More than one node could run a client's statement (several shards,
    /// or replicas): a unit is planned once it has arrived (its Sync, or a
    /// Flush), not from its first messages, and under transaction pooling
    /// a Flush after statements are only prepared ends the server's unit
    /// there, so that the rest is placed on its own
    /// (`session/client.rs::prepare_only_segment`).
    pub several_nodes: bool,
    /// Turns for reference-table reads spread over shards.
    pub spread: AtomicU64,
    /// Time spent routing the statements timed (lookup, parse, classify), in ns.
    pub route_nanos: AtomicU64,
    /// Routes timed into `route_nanos` (a sample of them).
    pub routes_timed: AtomicU64,
    pub balancing: Balancing,
    pub ban_time: Duration,
    /// Transaction pooling and statements leaving state on the connection.
    pub session_state: shardline_config::SessionStatePolicy,
    /// Per database: what its collations let cross-shard merges do with
    /// text, and when that was asked.
    pub collations: std::sync::Mutex<
        HashMap<String, (std::time::Instant, shardline_router::gather::Collation)>,
    >,
    /// Two-phase commit of transactions on several shards, when enabled.
    pub two_phase: Option<Arc<twophase::Coordinator>>,
    /// What cross-shard merges hold (`routing.merge_memory`, `_total`).
    pub merge_memory: MergeMemory,
    /// Targets for the health checkers, by shard and node.
    health_targets: Vec<Vec<ServerTarget>>,
    health: shardline_config::HealthConfig,
}

/// The hot-key counts for `config`: the previous config's, when it places
/// keys alike and counts over the same window.
fn hot_keys(
    config: &Config,
    sharding: Option<&shardline_router::sharding::Sharding>,
    previous: Option<&Shared>,
) -> Option<Arc<hotkeys::HotKeys>> {
    let sh = sharding?;
    if let Some(p) = previous {
        let same = p.config.hot_keys.window == config.hot_keys.window
            && p.config.placement_fingerprint() == config.placement_fingerprint();
        if let Some(kept) = p
            .hot_keys
            .as_ref()
            .filter(|h| same && h.fits(sh.groups.len(), sh.shard_count()))
        {
            return Some(kept.clone());
        }
    }
    hotkeys::HotKeys::new(config.hot_keys.window, sh.groups.len(), sh.shard_count()).map(Arc::new)
}

/// The memory cross-shard merges hold (groups, DISTINCT values): at most
/// `per_query` for one, `total` for all at once. Merges reserve in steps
/// of `MERGE_STEP`, so the shared counter is touched once a MiB, not once
/// a row.
pub struct MergeMemory {
    per_query: usize,
    total: usize,
    used: std::sync::atomic::AtomicUsize,
}

const MERGE_STEP: usize = 1 << 20;

impl MergeMemory {
    pub fn new(per_query: usize, total: usize) -> MergeMemory {
        MergeMemory {
            per_query,
            total,
            used: Default::default(),
        }
    }

    /// Bytes reserved by merges running now.
    pub fn used(&self) -> usize {
        self.used.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// An empty reservation for one merge; released when dropped.
    pub fn reserve(&self) -> MergeReservation<'_> {
        MergeReservation {
            memory: self,
            held: 0,
        }
    }
}

/// One merge's share of `MergeMemory`.
pub struct MergeReservation<'a> {
    memory: &'a MergeMemory,
    held: usize,
}

impl MergeReservation<'_> {
    /// Grows the reservation to cover `bytes`, or says which bound it
    /// would pass (SQLSTATE 53200, the setting named).
    pub fn cover(&mut self, bytes: usize) -> Result<(), (&'static str, String)> {
        use std::sync::atomic::Ordering::Relaxed;
        if bytes <= self.held {
            return Ok(());
        }
        let m = self.memory;
        if bytes > m.per_query {
            return Err((
                "53200",
                format!(
                    "this query's cross-shard merge needs more than routing.merge_memory ({} bytes) for its groups; group by the sharding key (each shard then answers whole groups), narrow the query, or raise routing.merge_memory",
                    m.per_query
                ),
            ));
        }
        let grow = (bytes + MERGE_STEP).min(m.per_query) - self.held;
        let before = m.used.fetch_add(grow, Relaxed);
        if before + grow > m.total {
            m.used.fetch_sub(grow, Relaxed);
            return Err((
                "53200",
                format!(
                    "cross-shard merges running now hold routing.merge_memory_total ({} bytes) between them: this query's merge cannot grow; try again, or raise routing.merge_memory_total",
                    m.total
                ),
            ));
        }
        self.held += grow;
        Ok(())
    }
}

impl Drop for MergeReservation<'_> {
    fn drop(&mut self) {
        self.memory
            .used
            .fetch_sub(self.held, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Load-balancing settings in the form sessions use.
pub struct Balancing {
    pub strategy: shardline_router::balance::Strategy,
    pub read_your_writes: shardline_config::ReadYourWrites,
    pub primary_window: Duration,
    pub zone: Option<String>,
    pub fallback_to_primary: bool,
    pub primary_reads: bool,
    pub replica_wait: Duration,
    pub position_interval: Duration,
}

impl Balancing {
    fn from_config(c: &shardline_config::LoadBalancingConfig) -> Balancing {
        use shardline_config::Strategy as S;
        use shardline_router::balance::Strategy;
        Balancing {
            strategy: match c.strategy {
                S::RoundRobin => Strategy::RoundRobin,
                S::LeastConnections => Strategy::LeastConnections,
                S::Random => Strategy::Random,
                S::ClientHash => Strategy::ClientHash,
            },
            read_your_writes: c.read_your_writes,
            primary_window: c.primary_window,
            zone: c.zone.clone(),
            fallback_to_primary: c.replica_fallback_to_primary,
            primary_reads: c.primary_reads,
            replica_wait: c.replica_wait,
            position_interval: c.position_interval.max(Duration::from_micros(100)),
        }
    }
}

fn router_options(config: &Config) -> shardline_router::Options {
    let c = &config.routing;
    let lower = |v: &[String]| v.iter().map(|f| f.to_ascii_lowercase()).collect();
    let cache = config.cache.enabled().then(|| {
        Arc::new(shardline_router::cacheable::CacheTables {
            tables: config
                .cache
                .tables
                .iter()
                .map(|t| shardline_router::cacheable::configured_id(&t.name))
                .collect(),
            hints: config.cache.hints,
        })
    });
    shardline_router::Options {
        writing_functions: lower(&c.writing_functions),
        read_only_functions: lower(&c.read_only_functions),
        unknown_functions_write: c.unknown_functions_write,
        cache,
    }
}

impl Shared {
    pub fn from_config(config: &Config) -> Result<Shared> {
        Shared::build(config, None)
    }

    /// The state for `config`; at a reload, `previous` lends what lasts:
    /// the clients, the console's state and counters, every node's health,
    /// and the pools (with their connections) whose logins are unchanged.
    pub fn build(config: &Config, previous: Option<&Shared>) -> Result<Shared> {
        let server_tls = match config.pool.server_tls {
            shardline_config::ServerTlsMode::Disable => None,
            _ => Some(tls::connector(config.pool.server_tls_ca.as_deref())?),
        };
        let topology = Arc::new(health::Topology::reusing(
            config,
            previous.map(|p| &*p.topology),
        ));
        let target_for = |n: &shardline_config::Node,
                          user: &str,
                          password: Option<&str>,
                          database: &str| ServerTarget {
            host: n.host.clone(),
            port: n.port,
            user: user.to_string(),
            password: password.map(str::to_string),
            database: database.to_string(),
            tls_mode: config.pool.server_tls,
            tls: server_tls.clone(),
            application_name: None,
        };
        let nodes_of = |s: &shardline_config::Shard| {
            std::iter::once(&s.primary)
                .chain(&s.replicas)
                .cloned()
                .collect::<Vec<_>>()
        };
        // The proxy's own logins to every node, by shard.
        let own_targets = |app: &'static str, user: &str, password: Option<&str>, db: &str| {
            config
                .shards
                .iter()
                .map(|s| {
                    nodes_of(s)
                        .iter()
                        .map(|n| ServerTarget {
                            application_name: Some(app),
                            ..target_for(n, user, password, db)
                        })
                        .collect()
                })
                .collect::<Vec<Vec<ServerTarget>>>()
        };
        let health_targets = match config.users.first() {
            Some(first) => {
                let h = &config.health;
                let user = h.user.as_deref().unwrap_or(first.server_user());
                let password = h.password.as_deref().or(first.server_password());
                let database = h.database.as_deref().unwrap_or(&first.database);
                own_targets("shardline-health", user, password, database)
            }
            None => Vec::new(),
        };
        let mut users = HashMap::new();
        for u in &config.users {
            let size = u.pool_size.unwrap_or(config.pool.size);
            let before = previous.and_then(|p| p.users.get(&(u.name.clone(), u.database.clone())));
            let pool_before = |address: &str| {
                before.and_then(|b| {
                    b.pools
                        .shards
                        .iter()
                        .flat_map(|s| s.nodes.iter())
                        .find(|p| p.address == address)
                })
            };
            let shards = config
                .shards
                .iter()
                .zip(&topology.shards)
                .map(|(s, health)| ShardPools {
                    name: s.name.clone(),
                    nodes: nodes_of(s)
                        .iter()
                        .zip(&health.nodes)
                        .map(|(n, h)| {
                            let target =
                                target_for(n, u.server_user(), u.server_password(), &u.database);
                            pool_before(&target.address())
                                .and_then(|p| p.reused(&target, h, size, &config.pool))
                                .unwrap_or_else(|| {
                                    NodePool::new(target, h.clone(), size, &config.pool)
                                })
                        })
                        .collect(),
                })
                .collect();
            let secret = auth::Secret::for_user(u).map_err(anyhow::Error::msg)?;
            let ryw_before = |name: &str| {
                let b = before?;
                let i = b.pools.shards.iter().position(|s| s.name == name)?;
                b.ryw.get(i).cloned()
            };
            let entry = UserEntry {
                name: u.name.clone(),
                database: u.database.clone(),
                secret,
                mode: u.pool_mode.unwrap_or(config.proxy.pool_mode),
                pools: Arc::new(PoolSet { shards }),
                ryw: config
                    .shards
                    .iter()
                    .map(|s| ryw_before(&s.name).unwrap_or_default())
                    .collect(),
                stats: before.map(|b| b.stats.clone()).unwrap_or_default(),
            };
            users.insert((u.name.clone(), u.database.clone()), Arc::new(entry));
        }
        let events: Arc<stats::Events> = previous.map(|p| p.events.clone()).unwrap_or_default();
        let sharding = (config.shards.len() > 1)
            .then(|| Arc::new(shardline_router::sharding::Sharding::from_config(config)));
        let two_phase = (sharding.is_some() && config.sharding.two_phase_commit).then(|| {
            // One login per database: its first user's.
            let mut databases: Vec<twophase::DatabaseTargets> = Vec::new();
            for u in &config.users {
                if databases.iter().any(|d| d.database == u.database) {
                    continue;
                }
                databases.push(twophase::DatabaseTargets {
                    database: u.database.clone(),
                    shards: own_targets(
                        "shardline-2pc",
                        u.server_user(),
                        u.server_password(),
                        &u.database,
                    ),
                });
            }
            Arc::new(twophase::Coordinator::new(
                databases,
                topology.clone(),
                config.shards.iter().map(|s| s.name.clone()).collect(),
                config.sharding.in_doubt_interval,
                events.clone(),
            ))
        });
        let tls = match (&config.tls.cert, &config.tls.key) {
            (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
            _ => None,
        };
        let router = shardline_router::SharedRouter::new(
            router_options(config),
            config.routing.cache_size,
            config.routing.cache_bytes,
            sharding.clone(),
        );
        Ok(Shared {
            users,
            tls_required: config.tls.mode == shardline_config::ClientTlsMode::Require,
            tls,
            clients: previous.map(|p| p.clients.clone()).unwrap_or_default(),
            // The console's settings of a reloaded config apply when it
            // takes over (`Live::reload`).
            admin: match previous {
                Some(p) => p.admin.clone(),
                None => Arc::new(admin::Admin::new(&config.admin)),
            },
            generation: previous.map_or(0, |p| p.generation + 1),
            config: Arc::new(config.clone()),
            placements: previous.map(|p| p.placements.clone()).unwrap_or_default(),
            events,
            slow_us: config
                .log
                .slow_statement
                .map_or(u64::MAX, |d| d.as_micros().min(u64::MAX as u128) as u64),
            placement: health::placement_hash(&config.placement_fingerprint()),
            hot_keys: hot_keys(config, sharding.as_deref(), previous),
            result_cache: match previous {
                Some(p) => {
                    p.result_cache.configure(&config.cache);
                    p.result_cache.clone()
                }
                None => Arc::new(cache::ResultCache::new(&config.cache)),
            },
            caching: config.cache.enabled(),
            statements: Default::default(),
            next_token: previous
                .map(|p| p.next_token.clone())
                .unwrap_or_else(|| Arc::new(AtomicU64::new(1))),
            max_message_size: config.proxy.max_message_size as usize,
            auth_timeout: config.proxy.auth_timeout,
            topology,
            router,
            several_nodes: sharding.is_some()
                || config.shards.iter().any(|s| !s.replicas.is_empty()),
            sharding,
            spread: AtomicU64::new(0),
            route_nanos: AtomicU64::new(0),
            routes_timed: AtomicU64::new(0),
            collations: Default::default(),
            two_phase,
            merge_memory: MergeMemory::new(
                config.routing.merge_memory,
                config.routing.merge_memory_total,
            ),
            balancing: Balancing::from_config(&config.load_balancing),
            ban_time: config.health.ban_time,
            session_state: config.pool.session_state,
            health_targets,
            health: config.health.clone(),
        })
    }

    /// Logs the classification counters (at shutdown).
    pub fn log_router_stats(&self) {
        let stats = self.router.stats();
        let routed = stats.hits + stats.misses;
        let nanos = self.route_nanos.load(std::sync::atomic::Ordering::Relaxed);
        let timed = self.routes_timed.load(std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            routed,
            cache_hits = stats.hits,
            parser_fallbacks = stats.fallbacks,
            avg_route_ns = nanos.checked_div(timed).unwrap_or(0),
            "router statistics"
        );
    }

    /// A checker per shard, each having checked every node once.
    pub async fn check_health_once(&self) -> Vec<health::Checker> {
        let mut checkers: Vec<_> = self
            .topology
            .shards
            .iter()
            .zip(&self.health_targets)
            .map(|(shard, targets)| {
                health::Checker::new(shard.clone(), targets.clone(), self.health.clone())
            })
            .collect();
        futures_util::future::join_all(checkers.iter_mut().map(|c| c.round())).await;
        checkers
    }

    /// Checks every node once, then keeps checking in the background.
    /// With read-your-writes `lsn`, a position poller per shard too
    /// (asking only while reads wait for a replica).
    async fn start_health_checks(&self) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks: Vec<_> = self
            .check_health_once()
            .await
            .into_iter()
            .map(|c| tokio::spawn(c.run()))
            .collect();
        let lb = &self.balancing;
        if lb.read_your_writes == shardline_config::ReadYourWrites::Lsn
            && !lb.replica_wait.is_zero()
        {
            for (shard, targets) in self.topology.shards.iter().zip(&self.health_targets) {
                let poller = health::PositionPoller::new(
                    shard.clone(),
                    targets.clone(),
                    lb.position_interval,
                    self.health.timeout,
                );
                tasks.push(tokio::spawn(poller.run()));
            }
        }
        tasks
    }

    /// ParameterStatus values for a new client: from the first shard's
    /// primary, or any node that answers, of that shard or, when none of
    /// it does, of the others (a client logs in while a shard is down).
    pub async fn server_params(
        &self,
        user: &UserEntry,
    ) -> Result<Arc<Vec<(String, String)>>, protocol::backend::PgError> {
        let mut last = None;
        for (shard, pools) in self.topology.shards.iter().zip(&user.pools.shards) {
            for i in shard.writer().ok().into_iter().chain(0..pools.nodes.len()) {
                if shard.nodes[i].is_down() {
                    continue;
                }
                match pools.nodes[i].server_params().await {
                    Ok(p) => return Ok(p),
                    Err(e) => last = Some(e),
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            let why: Vec<String> = self
                .topology
                .shards
                .iter()
                .flat_map(|s| &s.nodes)
                .map(|n| format!("{}: {}", n.address, n.last_error()))
                .collect();
            protocol::backend::PgError::error(
                protocol::backend::sqlstate::CONNECTION_FAILURE,
                format!("no node is reachable ({})", why.join("; ")),
            )
        }))
    }
}

/// The running configuration, replaced whole by a reload (RELOAD, SIGHUP):
/// new clients get the latest, and a session moves to it at its next
/// transaction boundary.
pub struct Live {
    current: std::sync::RwLock<Arc<Shared>>,
    /// The file the configuration came from (`None`: given in code).
    path: Option<std::path::PathBuf>,
    /// The listen address came from the command line: a reload keeps it
    /// without a word.
    listen_fixed: bool,
    /// The current configuration's background work (health checks, 2PC
    /// resolution); held through a reload, so reloads run one at a time.
    tasks: tokio::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Live {
    pub fn current(&self) -> Arc<Shared> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Rereads the config file, validates all of it, and applies it whole,
    /// or keeps the running configuration and says why. Returns what
    /// changed, and the settings that wait for a restart.
    pub async fn reload(&self) -> std::result::Result<Vec<String>, String> {
        let outcome = self.reload_file().await;
        let events = &self.current().events;
        let counter = match outcome {
            Ok(_) => &events.reloads_ok,
            Err(_) => &events.reloads_failed,
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        outcome
    }

    async fn reload_file(&self) -> std::result::Result<Vec<String>, String> {
        let mut tasks = self.tasks.lock().await;
        let Some(path) = &self.path else {
            return Err(
                "the proxy was started without a config file: there is nothing to reread".into(),
            );
        };
        let mut config = Config::load(path).map_err(|e| e.to_string())?;
        let old = self.current();
        let mut notes = Vec::new();
        let running = &old.config.proxy;
        if self.listen_fixed {
            config.proxy.listen = running.listen;
        }
        if config.proxy.listen != running.listen {
            notes.push(format!(
                "proxy.listen stays {} until a restart (the file says {})",
                running.listen, config.proxy.listen
            ));
            config.proxy.listen = running.listen;
        }
        if config.proxy.workers != running.workers {
            notes.push(format!(
                "proxy.workers stays {} until a restart (the file says {})",
                running.workers, config.proxy.workers
            ));
            config.proxy.workers = running.workers;
        }
        if config.proxy.log_format != running.log_format {
            notes.push("proxy.log_format stays as it is until a restart".into());
            config.proxy.log_format = running.log_format;
        }
        let metrics = old.config.metrics.listen;
        if config.metrics.listen != metrics {
            let show = |a: Option<SocketAddr>| a.map_or("unset".to_string(), |a| a.to_string());
            notes.push(format!(
                "metrics.listen stays {} until a restart (the file says {})",
                show(metrics),
                show(config.metrics.listen)
            ));
            config.metrics.listen = metrics;
        }
        let next = Arc::new(Shared::build(&config, Some(&old)).map_err(|e| format!("{e:#}"))?);
        let started = next
            .start_tasks(false)
            .await
            .map_err(|e| format!("{e:#}"))?;
        let mut changes = admin::changes(&old.config, &next.config);
        if changes.is_empty() {
            changes.push("nothing changed".into());
        }
        changes.extend(notes);
        // From here nothing fails: the new configuration takes over whole.
        next.admin.configure(&config.admin);
        for pool in next
            .users
            .values()
            .flat_map(|u| u.pools.shards.iter().flat_map(|s| s.nodes.iter()))
        {
            pool.apply_size();
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next.clone();
        next.admin.set_latest(next.generation);
        for t in tasks.drain(..) {
            t.abort();
        }
        *tasks = started;
        tracing::info!(generation = next.generation, changes = %changes.join("; "), "configuration reloaded");
        Ok(changes)
    }
}

/// A running proxy.
pub struct Proxy {
    pub local_addr: SocketAddr,
    /// Where `/metrics`, `/health` and `/ready` are served (`metrics.listen`).
    pub metrics_addr: Option<SocketAddr>,
    /// The configuration it started with (`live` has the current one).
    pub shared: Arc<Shared>,
    pub live: Arc<Live>,
    shutdown: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    averages: Option<tokio::task::JoinHandle<()>>,
    metrics: Option<tokio::task::JoinHandle<()>>,
    /// Freed heap back to the system when idle (`memory.rs`).
    trim: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Ok(mut tasks) = self.live.tasks.try_lock() {
            for t in tasks.drain(..) {
                t.abort();
            }
        }
        for t in [&self.averages, &self.metrics, &self.trim]
            .into_iter()
            .flatten()
        {
            t.abort();
        }
    }
}

impl Shared {
    /// The background work of this configuration: health checks (one
    /// round done before it returns, so its nodes' states are known), and
    /// two-phase commit's resolution of in-doubt transactions (refusing
    /// servers that cannot prepare; at `start`, settling what a crash left).
    async fn start_tasks(&self, start: bool) -> Result<Vec<tokio::task::JoinHandle<()>>> {
        let mut tasks = self.start_health_checks().await;
        if let Some(tp) = &self.two_phase {
            if let Err(e) = tp.prepare_servers().await {
                for t in &tasks {
                    t.abort();
                }
                return Err(e);
            }
            if start {
                let settled = tp.resolve_once().await;
                if settled > 0 {
                    tracing::info!(settled, "in-doubt transactions resolved at startup");
                }
            }
            tasks.push(tp.clone().spawn());
        }
        Ok(tasks)
    }
}

impl Proxy {
    /// Binds the listener and starts accepting clients.
    pub async fn start(config: Config) -> Result<Proxy> {
        Proxy::start_from(config, None, false).await
    }

    /// As `start`, with the file `config` was read from: RELOAD and SIGHUP
    /// reread it (keeping the listen address when `listen_fixed`: it was
    /// given on the command line).
    pub async fn start_from(
        config: Config,
        path: Option<std::path::PathBuf>,
        listen_fixed: bool,
    ) -> Result<Proxy> {
        let shared = Arc::new(Shared::from_config(&config)?);
        let listener = TcpListener::bind(config.proxy.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.proxy.listen))?;
        let local_addr = listener.local_addr()?;
        let metrics_listener = match config.metrics.listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} (metrics.listen)"))?,
            ),
            None => None,
        };
        let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
        let tasks = shared.start_tasks(true).await?;
        let live = Arc::new(Live {
            current: std::sync::RwLock::new(shared.clone()),
            path,
            listen_fixed,
            tasks: tokio::sync::Mutex::new(tasks),
        });
        shared.admin.set_live(&live);
        let averages = Some(tokio::spawn(admin::run_averages(Arc::downgrade(&live))));
        let trim = Some(tokio::spawn(memory::give_back_when_idle(Arc::downgrade(
            &live,
        ))));
        let metrics = metrics_listener.map(|l| {
            tracing::info!(address = %metrics_addr.expect("bound"), "metrics at /metrics, /health, /ready");
            tokio::spawn(metrics::http::serve(l, Arc::downgrade(&live)))
        });
        let (tx, rx) = watch::channel(false);
        let grace = config.proxy.shutdown_timeout;
        let task = tokio::spawn({
            let live = live.clone();
            async move {
                accept_loop(listener, &live, rx, grace).await;
                live.current().log_router_stats();
            }
        });
        tracing::info!(%local_addr, "shardline listening");
        Ok(Proxy {
            local_addr,
            metrics_addr,
            shared,
            live,
            shutdown: tx,
            task: Some(task),
            averages,
            trim,
            metrics,
        })
    }

    /// Stops accepting; running transactions get `shutdown_timeout` to finish.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Resolves when the admin console's SHUTDOWN asks the proxy to stop
    /// (the proxy is already stopping: `wait` for it).
    pub async fn shutdown_requested(&self) {
        let mut rx = self.shared.admin.shutdown_requests();
        let _ = rx.wait_for(Option::is_some).await;
    }

    /// Rereads the config file and applies it (SIGHUP); logs the outcome.
    pub async fn reload(&self) {
        match self.live.reload().await {
            Ok(_) => {}
            Err(why) => tracing::error!(%why, "reload refused: the running configuration stays"),
        }
    }

    /// Waits until every session has ended (after `shutdown`).
    pub async fn wait(mut self) {
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    live: &Live,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let mut sessions = JoinSet::new();
    // Each session's ending, to stop it; ended sessions' are pruned as it grows.
    let mut stops: Vec<Arc<clients::Ending>> = Vec::new();
    let mut prune_at = 64;
    let mut admin_shutdown = live.current().admin.shutdown_requests();
    let mut grace = grace;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    let ending = Arc::new(clients::Ending::default());
                    stops.push(ending.clone());
                    if stops.len() >= prune_at {
                        stops.retain(|s| Arc::strong_count(s) > 1);
                        prune_at = (stops.len() * 2).max(64);
                    }
                    sessions.spawn(serve_client(live.current(), tcp, peer, ending));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    crate::timer::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            _ = shutdown.changed() => break,
            Ok(()) = admin_shutdown.changed() => {
                if *admin_shutdown.borrow() == Some(admin::Shutdown::Now) {
                    // SHUTDOWN: clients are closed now, not after their
                    // transactions (idle ones are told why first).
                    grace = Duration::from_millis(100);
                }
                break;
            }
        }
    }
    drop(listener);
    for s in stops.drain(..) {
        s.fire(clients::Ending::STOP);
    }
    let open = sessions.len();
    if open > 0 {
        tracing::info!(open, ?grace, "shutting down: waiting for open transactions");
    }
    let drained = crate::timer::timeout(grace, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            remaining = sessions.len(),
            "shutdown timeout reached; closing remaining clients"
        );
        sessions.shutdown().await;
    }
}

async fn serve_client(
    shared: Arc<Shared>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    ending: Arc<clients::Ending>,
) {
    let started = crate::timer::timeout(
        shared.auth_timeout,
        session::startup::accept(&shared, tcp, peer, ending),
    )
    .await;
    match started {
        Ok(session::startup::Outcome::LoggedIn(login, registration)) => {
            let s = session::Session::new(shared.clone(), login, registration.slot.clone());
            // Each poll of the session is a turn (`turn.rs`).
            turn::Turn(s.run()).await;
            drop(registration);
        }
        Ok(session::startup::Outcome::Console(stream, registration)) => {
            admin::console::serve(shared, stream, registration).await;
        }
        Ok(session::startup::Outcome::Done) | Err(_) => {}
    }
}

/// Sets up logging: `RUST_LOG` filters (default `info`), text or JSON.
pub fn init_logging(format: shardline_config::LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match format {
        shardline_config::LogFormat::Json => builder.json().try_init(),
        shardline_config::LogFormat::Text => builder.try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::{MergeMemory, MERGE_STEP};

    #[test]
    fn merges_reserve_within_their_bounds() {
        let m = MergeMemory::new(4 * MERGE_STEP, 6 * MERGE_STEP);
        let mut a = m.reserve();
        a.cover(10).unwrap();
        // Reserved a step ahead: the shared counter is not touched per row.
        assert_eq!(m.used(), MERGE_STEP + 10);
        a.cover(MERGE_STEP).unwrap();
        assert_eq!(m.used(), MERGE_STEP + 10);
        // One merge: at most `per_query`.
        let (code, message) = a.cover(4 * MERGE_STEP + 1).unwrap_err();
        assert_eq!(code, "53200");
        assert!(message.contains("routing.merge_memory ("), "{message}");
        a.cover(3 * MERGE_STEP).unwrap();
        assert_eq!(m.used(), 4 * MERGE_STEP);
        // All merges: at most `total`.
        let mut b = m.reserve();
        b.cover(MERGE_STEP / 2).unwrap();
        let (_, message) = b.cover(3 * MERGE_STEP).unwrap_err();
        assert!(message.contains("routing.merge_memory_total"), "{message}");
        assert_eq!(m.used(), 4 * MERGE_STEP + MERGE_STEP + MERGE_STEP / 2);
        drop(a);
        b.cover(3 * MERGE_STEP).unwrap();
        drop(b);
        assert_eq!(m.used(), 0);
    }
}
