//! The configuration schema, with defaults. Every struct denies unknown keys.
//! The reference for each key is `config/examples/shardline.toml` and the README.

use crate::duration::serde_duration;
use serde::{Deserialize, Deserializer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The whole configuration, validated and immutable once loaded.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub pool: PoolConfig,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub load_balancing: LoadBalancingConfig,
    #[serde(default)]
    pub routing: RoutingConfig,
    #[serde(default)]
    pub users: Vec<User>,
    #[serde(default)]
    pub shards: Vec<Shard>,
    #[serde(default)]
    pub sharding: ShardingConfig,
    /// Small tables copied whole to every shard.
    #[serde(default)]
    pub reference_tables: Vec<ReferenceTable>,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub hot_keys: HotKeysConfig,
    #[serde(default)]
    pub cache: CacheConfig,
}

/// The result cache: opt-in per table (`[[cache.tables]]`), or per
/// statement with a `/* shardline: cache=30s */` hint. Off while no table
/// is listed and no statement carries the hint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// What all cached results may hold together, in bytes.
    #[serde(default = "default_cache_max_bytes")]
    pub max_bytes: usize,
    /// How many results are kept at most.
    #[serde(default = "default_cache_max_entries")]
    pub max_entries: usize,
    /// A result larger than this (in bytes, as the client receives it) is
    /// not cached.
    #[serde(default = "default_cache_max_result_bytes")]
    pub max_result_bytes: usize,
    /// Tables whose reads may be cached, each with how long a result lives.
    #[serde(default)]
    pub tables: Vec<CachedTable>,
    /// Let a `/* shardline: cache=30s */` hint cache a statement whose
    /// tables are not listed (writes to every table are then tracked).
    #[serde(default)]
    pub hints: bool,
}

impl CacheConfig {
    /// Whether any result may be cached.
    pub fn enabled(&self) -> bool {
        self.hints || !self.tables.is_empty()
    }
}

/// One table whose reads may be cached.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CachedTable {
    /// The table's name as statements write it, unqualified or
    /// `schema.table` (matched without regard to case, as Postgres folds
    /// unquoted names).
    pub name: String,
    /// How long a cached result of this table is served at most.
    #[serde(with = "serde_duration")]
    pub ttl: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_bytes: default_cache_max_bytes(),
            max_entries: default_cache_max_entries(),
            max_result_bytes: default_cache_max_result_bytes(),
            tables: Vec::new(),
            hints: false,
        }
    }
}

fn default_cache_max_bytes() -> usize {
    64 * 1024 * 1024
}
fn default_cache_max_entries() -> usize {
    100_000
}
fn default_cache_max_result_bytes() -> usize {
    1024 * 1024
}

/// The hot-key report (SHOW HOT_KEYS, `/metrics`): the sharding keys routed
/// by, counted per table group over a sliding window.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HotKeysConfig {
    /// How far back the report looks; 0 turns counting off.
    #[serde(default = "default_hot_keys_window", with = "serde_duration")]
    pub window: Duration,
    /// Keys per table group the report and the metrics list.
    #[serde(default = "default_hot_keys_top")]
    pub top: usize,
}

impl Default for HotKeysConfig {
    fn default() -> Self {
        HotKeysConfig {
            window: default_hot_keys_window(),
            top: default_hot_keys_top(),
        }
    }
}

fn default_hot_keys_window() -> Duration {
    Duration::from_secs(60)
}
fn default_hot_keys_top() -> usize {
    10
}

/// What the proxy logs beyond its events.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A unit (a simple query, or an extended batch up to Sync) slower than
    /// this is logged once, with the shapes of its statements (constants
    /// blanked); off while unset.
    #[serde(default, with = "serde_opt_duration")]
    pub slow_statement: Option<Duration>,
}

mod serde_opt_duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = String::deserialize(d)?;
        crate::parse_duration(&s)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

/// The HTTP endpoints for monitoring: `/metrics` (Prometheus text format),
/// `/health` and `/ready`. Off while `listen` is unset.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address the HTTP endpoints are served on (e.g. "127.0.0.1:9930").
    #[serde(default, deserialize_with = "optional_socket_addr")]
    pub listen: Option<SocketAddr>,
}

/// The admin console: a virtual database on the proxy's own port, for the
/// users listed here (off while the list is empty).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Users (names from `[[users]]`, authenticated with their secret) who
    /// may connect to the console.
    #[serde(default)]
    pub users: Vec<String>,
    /// The console's database name.
    #[serde(default = "default_admin_database")]
    pub database: String,
    /// How long PAUSE waits for open transactions to end before it fails
    /// (naming the clients that still hold one) and resumes.
    #[serde(default = "default_pause_timeout", with = "serde_duration")]
    pub pause_timeout: Duration,
    /// How long a client's unit may be held by a pause before it gets an
    /// error (57P03) instead of waiting on.
    #[serde(default = "default_max_hold", with = "serde_duration")]
    pub max_hold: Duration,
    /// The period SHOW STATS_AVERAGES averages over (PgBouncer's stats_period).
    #[serde(default = "default_stats_period", with = "serde_duration")]
    pub stats_period: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            users: Vec::new(),
            database: default_admin_database(),
            pause_timeout: default_pause_timeout(),
            max_hold: default_max_hold(),
            stats_period: default_stats_period(),
        }
    }
}

fn default_admin_database() -> String {
    "shardline".into()
}
fn default_pause_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_hold() -> Duration {
    Duration::from_secs(60)
}
fn default_stats_period() -> Duration {
    Duration::from_secs(60)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Address the proxy accepts clients on.
    #[serde(default = "default_listen", deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    #[serde(default)]
    pub pool_mode: PoolMode,
    /// Largest protocol message accepted from a client, in bytes.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: u32,
    /// How long running transactions may take to finish after SIGINT/SIGTERM.
    #[serde(default = "default_shutdown_timeout", with = "serde_duration")]
    pub shutdown_timeout: Duration,
    /// How long a client may take to complete startup and authentication.
    #[serde(default = "default_auth_timeout", with = "serde_duration")]
    pub auth_timeout: Duration,
    #[serde(default)]
    pub log_format: LogFormat,
    /// Threads serving clients; 0 picks half the CPU cores (at least one),
    /// leaving the rest to the Postgres servers and clients that often share
    /// the machine.
    #[serde(default)]
    pub workers: usize,
}

impl ProxyConfig {
    /// The number of worker threads to run.
    pub fn worker_threads(&self) -> usize {
        if self.workers > 0 {
            return self.workers;
        }
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        cores.div_ceil(2).max(1)
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: default_listen(),
            pool_mode: PoolMode::default(),
            max_message_size: default_max_message_size(),
            shutdown_timeout: default_shutdown_timeout(),
            auth_timeout: default_auth_timeout(),
            log_format: LogFormat::default(),
            workers: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A server connection is lent to a client for one transaction.
    #[default]
    Transaction,
    /// A server connection is lent to a client for its whole session.
    Session,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Server connection pool settings, shared by every (node, user, database) pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Server connections per node for each user, unless the user sets its own.
    #[serde(default = "default_pool_size")]
    pub size: usize,
    /// How long a client waits for a free server connection before an error.
    #[serde(default = "default_checkout_timeout", with = "serde_duration")]
    pub checkout_timeout: Duration,
    /// How long opening and authenticating a server connection may take.
    #[serde(default = "default_connect_timeout", with = "serde_duration")]
    pub connect_timeout: Duration,
    /// A server connection unused this long is closed.
    #[serde(default = "default_idle_timeout", with = "serde_duration")]
    pub idle_timeout: Duration,
    /// A server connection older than this is closed when next idle.
    #[serde(default = "default_max_lifetime", with = "serde_duration")]
    pub max_lifetime: Duration,
    /// A connection idle at least this long is checked for a closed socket
    /// (or bytes nobody asked for) before reuse; 0 (the default): always.
    #[serde(default = "default_server_check_delay", with = "serde_duration")]
    pub server_check_delay: Duration,
    /// TLS towards servers.
    #[serde(default)]
    pub server_tls: ServerTlsMode,
    /// CA bundle used to verify server certificates (verify-full when set).
    #[serde(default)]
    pub server_tls_ca: Option<PathBuf>,
    /// Named prepared statements kept per server connection before the oldest is closed.
    #[serde(default = "default_prepared_cache_size")]
    pub prepared_statements_per_server: usize,
    /// Under transaction pooling, a statement that leaves state on its server
    /// connection (temporary tables, session advisory locks, SQL PREPARE).
    #[serde(default)]
    pub session_state: SessionStatePolicy,
}

/// What transaction pooling does with a statement that leaves state on the
/// server connection after its transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionStatePolicy {
    /// The client keeps that server connection until it leaves (or runs
    /// DISCARD ALL); it is reset before anyone else gets it.
    #[default]
    Pin,
    /// The statement is refused with 0A000.
    Refuse,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            size: default_pool_size(),
            checkout_timeout: default_checkout_timeout(),
            connect_timeout: default_connect_timeout(),
            idle_timeout: default_idle_timeout(),
            max_lifetime: default_max_lifetime(),
            server_check_delay: default_server_check_delay(),
            server_tls: ServerTlsMode::default(),
            server_tls_ca: None,
            prepared_statements_per_server: default_prepared_cache_size(),
            session_state: SessionStatePolicy::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerTlsMode {
    /// Plain TCP to servers.
    #[default]
    Disable,
    /// TLS when the server offers it, plain otherwise.
    Prefer,
    /// TLS or no connection.
    Require,
}

/// The health and lag checker: every node is polled each `interval`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    #[serde(default = "default_health_interval", with = "serde_duration")]
    pub interval: Duration,
    /// A check (connect + query) taking longer than this fails.
    #[serde(default = "default_health_timeout", with = "serde_duration")]
    pub timeout: Duration,
    /// A replica further behind than this (in time) gets no reads.
    #[serde(default = "default_max_replica_lag", with = "serde_duration")]
    pub max_replica_lag: Duration,
    /// A replica further behind than this many WAL bytes gets no reads.
    #[serde(default = "default_max_replica_lag_bytes")]
    pub max_replica_lag_bytes: u64,
    /// A node that refused connections or failed a check is skipped this long.
    #[serde(default = "default_ban_time", with = "serde_duration")]
    pub ban_time: Duration,
    /// Promote the most caught-up replica after the primary has been
    /// unreachable for `auto_promote_after`. Off by default.
    #[serde(default)]
    pub auto_promote: bool,
    #[serde(default = "default_auto_promote_after", with = "serde_duration")]
    pub auto_promote_after: Duration,
    /// Role used for checks (default: the first user's server role).
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// Database used for checks (default: the first user's database).
    #[serde(default)]
    pub database: Option<String>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: default_health_interval(),
            timeout: default_health_timeout(),
            max_replica_lag: default_max_replica_lag(),
            max_replica_lag_bytes: default_max_replica_lag_bytes(),
            ban_time: default_ban_time(),
            auto_promote: false,
            auto_promote_after: default_auto_promote_after(),
            user: None,
            password: None,
            database: None,
        }
    }
}

/// How reads are spread over replicas.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancingConfig {
    #[serde(default)]
    pub strategy: Strategy,
    #[serde(default)]
    pub read_your_writes: ReadYourWrites,
    /// With `read_your_writes = "primary_window"`: how long after a write a
    /// client's reads go to the primary.
    #[serde(default = "default_primary_window", with = "serde_duration")]
    pub primary_window: Duration,
    /// The proxy's zone: replicas with the same `zone` are preferred.
    #[serde(default)]
    pub zone: Option<String>,
    /// With no eligible replica, read from the primary (true) or fail the read (false).
    #[serde(default = "default_true")]
    pub replica_fallback_to_primary: bool,
    /// Send reads to the primary too, as one more candidate (default: replicas only).
    #[serde(default)]
    pub primary_reads: bool,
    /// With `read_your_writes = "lsn"`: how long a read waits for a replica
    /// to replay the user's last write (replicas' positions are then asked
    /// every `position_interval`) before it goes to the primary. 0: at once.
    #[serde(default = "default_replica_wait", with = "serde_duration")]
    pub replica_wait: Duration,
    /// How often replicas' replay positions are asked while a read waits.
    #[serde(default = "default_position_interval", with = "serde_duration")]
    pub position_interval: Duration,
}

fn default_replica_wait() -> Duration {
    Duration::from_millis(20)
}

fn default_position_interval() -> Duration {
    Duration::from_millis(1)
}

impl Default for LoadBalancingConfig {
    fn default() -> Self {
        LoadBalancingConfig {
            strategy: Strategy::default(),
            read_your_writes: ReadYourWrites::default(),
            primary_window: default_primary_window(),
            zone: None,
            replica_fallback_to_primary: true,
            primary_reads: false,
            replica_wait: default_replica_wait(),
            position_interval: default_position_interval(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    #[default]
    RoundRobin,
    LeastConnections,
    Random,
    ClientHash,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadYourWrites {
    /// After a write commits, the client's reads go only to replicas that
    /// replayed past the primary's WAL position at that commit.
    #[default]
    Lsn,
    /// The client's reads go to the primary for `primary_window` after a write.
    PrimaryWindow,
    Off,
}

/// Read/write classification settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Your functions that write: a SELECT calling one goes to the primary.
    #[serde(default)]
    pub writing_functions: Vec<String>,
    /// Strict mode: a SELECT calling any function not built in and not
    /// listed in `read_only_functions` goes to the primary.
    #[serde(default)]
    pub unknown_functions_write: bool,
    #[serde(default)]
    pub read_only_functions: Vec<String>,
    /// Routing results cached by statement text.
    #[serde(default = "default_route_cache")]
    pub cache_size: usize,
    /// The routing cache's bound in bytes (its keys are statement texts).
    #[serde(default = "default_route_cache_bytes")]
    pub cache_bytes: usize,
    /// What one cross-shard merge may hold (groups, DISTINCT values), in
    /// estimated bytes; past it the query fails with 53200.
    #[serde(default = "default_merge_memory")]
    pub merge_memory: usize,
    /// What all merges running at once may hold together, in bytes.
    #[serde(default = "default_merge_memory_total")]
    pub merge_memory_total: usize,
}

fn default_route_cache_bytes() -> usize {
    64 * 1024 * 1024
}

fn default_merge_memory() -> usize {
    256 * 1024 * 1024
}

fn default_merge_memory_total() -> usize {
    1024 * 1024 * 1024
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            writing_functions: Vec::new(),
            unknown_functions_write: false,
            read_only_functions: Vec::new(),
            cache_size: default_route_cache(),
            cache_bytes: default_route_cache_bytes(),
            merge_memory: default_merge_memory(),
            merge_memory_total: default_merge_memory_total(),
        }
    }
}

/// TLS towards clients: both files or neither.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Whether clients may (`allow`) or must (`require`) use TLS.
    #[serde(default)]
    pub mode: ClientTlsMode,
}

/// TLS towards clients, when a certificate is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientTlsMode {
    /// Clients that ask for TLS get it; others connect in plain text.
    #[default]
    Allow,
    /// Plain-text clients are refused (28000) before they authenticate.
    Require,
}

/// Someone allowed to connect to the proxy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    /// Plain text, an md5 hash (`md5` + 32 hex digits) or a SCRAM-SHA-256 verifier.
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub auth: AuthMethod,
    /// The database this user connects to, on the proxy and on the servers.
    pub database: String,
    /// Server connections per node for this user (default: `pool.size`).
    #[serde(default)]
    pub pool_size: Option<usize>,
    #[serde(default)]
    pub pool_mode: Option<PoolMode>,
    /// The role used on the servers (default: `name`).
    #[serde(default)]
    pub server_user: Option<String>,
    /// The password used on the servers (default: `password` when it is plain text).
    #[serde(default)]
    pub server_password: Option<String>,
}

impl User {
    pub fn server_user(&self) -> &str {
        self.server_user.as_deref().unwrap_or(&self.name)
    }

    /// The plain password to present to servers, if any.
    pub fn server_password(&self) -> Option<&str> {
        self.server_password.as_deref().or_else(|| {
            self.password
                .as_deref()
                .filter(|p| password_kind(p) == PasswordKind::Plain)
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum AuthMethod {
    #[default]
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "trust")]
    Trust,
}

/// How a configured password is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordKind {
    Plain,
    Md5,
    Scram,
}

pub fn password_kind(p: &str) -> PasswordKind {
    if p.starts_with("SCRAM-SHA-256$") {
        PasswordKind::Scram
    } else if p.len() == 35 && p.starts_with("md5") && p[3..].bytes().all(|b| b.is_ascii_hexdigit())
    {
        PasswordKind::Md5
    } else {
        PasswordKind::Plain
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shard {
    pub name: String,
    pub primary: Node,
    #[serde(default)]
    pub replicas: Vec<Node>,
    /// Share of the key space under `consistent` hashing, relative to the
    /// other shards (1.0 each by default).
    #[serde(default = "default_weight")]
    pub weight: f64,
}

/// How rows are spread over shards.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardingConfig {
    /// The placement of tables that name no group (the default group).
    #[serde(default)]
    pub function: ShardingFunction,
    #[serde(default = "default_vnodes")]
    pub vnodes: u32,
    #[serde(default)]
    pub key_type: KeyType,
    #[serde(default)]
    pub ranges: Vec<RangeBound>,
    #[serde(default)]
    pub lists: Vec<ListEntry>,
    #[serde(default)]
    pub pinned: Vec<PinnedKey>,
    /// Where unsharded tables live; the first shard when unset.
    #[serde(default)]
    pub default_shard: Option<String>,
    /// UPDATE and DELETE without a sharding key run on every shard; when
    /// false they are refused.
    #[serde(default = "default_true")]
    pub broadcast_writes: bool,
    /// A transaction may write on several shards and commits with
    /// two-phase commit (the servers need max_prepared_transactions > 0).
    #[serde(default)]
    pub two_phase_commit: bool,
    /// How often prepared transactions left by a failure are resolved.
    #[serde(default = "default_in_doubt_interval", with = "serde_duration")]
    pub in_doubt_interval: Duration,
    #[serde(default)]
    pub tables: Vec<ShardedTable>,
    /// Further placements, for tables sharded by a different key.
    #[serde(default)]
    pub groups: Vec<ShardGroup>,
}

impl Default for ShardingConfig {
    fn default() -> Self {
        ShardingConfig {
            function: ShardingFunction::default(),
            vnodes: default_vnodes(),
            key_type: KeyType::default(),
            ranges: Vec::new(),
            lists: Vec::new(),
            pinned: Vec::new(),
            default_shard: None,
            broadcast_writes: true,
            two_phase_commit: false,
            in_doubt_interval: default_in_doubt_interval(),
            tables: Vec::new(),
            groups: Vec::new(),
        }
    }
}

impl ShardingConfig {
    /// The default group, as a group.
    pub fn default_group(&self) -> ShardGroup {
        ShardGroup {
            name: String::new(),
            function: self.function,
            vnodes: self.vnodes,
            key_type: self.key_type,
            ranges: self.ranges.clone(),
            lists: self.lists.clone(),
            pinned: self.pinned.clone(),
        }
    }
}

/// Tables placed alike: co-located by their keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardGroup {
    pub name: String,
    #[serde(default)]
    pub function: ShardingFunction,
    #[serde(default = "default_vnodes")]
    pub vnodes: u32,
    #[serde(default)]
    pub key_type: KeyType,
    #[serde(default)]
    pub ranges: Vec<RangeBound>,
    #[serde(default)]
    pub lists: Vec<ListEntry>,
    #[serde(default)]
    pub pinned: Vec<PinnedKey>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardingFunction {
    /// A ring of virtual nodes over the 64-bit key hash.
    #[default]
    Consistent,
    /// Key hash modulo the shard count: native `PARTITION BY HASH` placement.
    PgHash,
    /// Ranges of integer keys.
    Range,
    /// Lists of key values.
    List,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyType {
    #[default]
    #[serde(
        alias = "int8",
        alias = "integer",
        alias = "int4",
        alias = "int",
        alias = "smallint",
        alias = "int2"
    )]
    Bigint,
    #[serde(alias = "varchar")]
    Text,
    Uuid,
}

/// A key as written in the config: a number or a string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(untagged)]
pub enum KeyLiteral {
    Int(i64),
    Text(String),
}

/// Keys from `from` (inclusive) to `to` (exclusive) live on `shard`; an
/// absent bound is open.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeBound {
    pub shard: String,
    #[serde(default)]
    pub from: Option<i64>,
    #[serde(default)]
    pub to: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListEntry {
    pub shard: String,
    pub values: Vec<KeyLiteral>,
}

/// A key placed on a named shard whatever the function says.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinnedKey {
    pub key: KeyLiteral,
    pub shard: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardedTable {
    /// `users` or `schema.users`.
    pub name: String,
    /// The sharding key column.
    pub column: String,
    /// A `[[sharding.groups]]` name; the default group when unset.
    #[serde(default)]
    pub group: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceTable {
    pub name: String,
}

/// One Postgres server.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub host: String,
    #[serde(default = "default_pg_port")]
    pub port: u16,
    /// Availability zone, for zone-preferring load balancing.
    #[serde(default)]
    pub zone: Option<String>,
}

impl Node {
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    let fail = || {
        serde::de::Error::custom(format!(
            "expected an IP address or `localhost` and a port, such as \"127.0.0.1:6432\", found \"{s}\""
        ))
    };
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    // `localhost` is the loopback address (no resolver needed).
    match s.rsplit_once(':') {
        Some((host, port)) if host.eq_ignore_ascii_case("localhost") => {
            let port: u16 = port.parse().map_err(|_| fail())?;
            Ok(SocketAddr::from(([127, 0, 0, 1], port)))
        }
        _ => Err(fail()),
    }
}

fn optional_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    socket_addr(d).map(Some)
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 6432))
}
fn default_max_message_size() -> u32 {
    64 * 1024 * 1024
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_auth_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_pool_size() -> usize {
    20
}
fn default_checkout_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_max_lifetime() -> Duration {
    Duration::from_secs(3600)
}
fn default_server_check_delay() -> Duration {
    // Every reuse: the check is a non-blocking read that tokio skips (no
    // syscall) unless the socket saw an event since its last read, and a
    // server that closed an idle connection (pg_terminate_backend,
    // idle_session_timeout) must not answer the next client's statement
    // with its FATAL.
    Duration::ZERO
}
fn default_prepared_cache_size() -> usize {
    500
}
fn default_pg_port() -> u16 {
    5432
}
fn default_health_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_health_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_max_replica_lag() -> Duration {
    Duration::from_millis(500)
}
fn default_max_replica_lag_bytes() -> u64 {
    16 * 1024 * 1024
}
fn default_ban_time() -> Duration {
    Duration::from_secs(10)
}
fn default_auto_promote_after() -> Duration {
    Duration::from_secs(10)
}
fn default_primary_window() -> Duration {
    Duration::from_secs(1)
}
fn default_route_cache() -> usize {
    10_000
}
fn default_weight() -> f64 {
    1.0
}
fn default_vnodes() -> u32 {
    256
}
fn default_in_doubt_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_true() -> bool {
    true
}
