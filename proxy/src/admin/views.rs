//! The console's SHOW tables, built from the proxy's live state. Where
//! PgBouncer has the command, its columns come first, with its names and
//! in its order (tools read them by name); Shardline's own columns follow.

use super::command::{Show, HELP};
use crate::stats::Totals;
use crate::Shared;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime};

/// A column's type as the client is told (text format always).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Text,
    Int8,
    Numeric,
}

impl Type {
    pub fn oid(self) -> u32 {
        match self {
            Type::Text => 25,
            Type::Int8 => 20,
            Type::Numeric => 1700,
        }
    }
}

/// A SHOW reply.
pub struct Table {
    pub columns: Vec<(&'static str, Type)>,
    pub rows: Vec<Vec<Option<String>>>,
}

impl Table {
    fn new(columns: &[(&'static str, Type)]) -> Table {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    fn push(&mut self, row: Vec<Option<String>>) {
        debug_assert_eq!(row.len(), self.columns.len());
        self.rows.push(row);
    }
}

use Type::{Int8 as I, Numeric as N, Text as T};

fn t(s: impl Into<String>) -> Option<String> {
    Some(s.into())
}

fn n(v: impl Into<u128>) -> Option<String> {
    Some(v.into().to_string())
}

/// `host:port` split (the last colon: IPv6 addresses are bracketed).
fn host_port(address: &str) -> (String, String) {
    match address.rsplit_once(':') {
        Some((h, p)) => (h.trim_matches(['[', ']']).to_string(), p.to_string()),
        None => (address.to_string(), String::new()),
    }
}

/// A time as PgBouncer prints it (UTC here).
pub fn timestamp(at: SystemTime) -> String {
    let secs = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// A duration as the config file spells it.
fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// An enum value as the config file spells it (`RoundRobin` → `round_robin`).
pub(crate) fn snake(v: impl std::fmt::Debug) -> String {
    let mut out = String::new();
    for (i, c) in format!("{v:?}").chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

pub fn show(shared: &Shared, what: Show) -> Table {
    match what {
        Show::Help => help(),
        Show::Version => {
            let mut t = Table::new(&[("version", T)]);
            t.push(vec![self::t(format!(
                "Shardline {}",
                env!("CARGO_PKG_VERSION")
            ))]);
            t
        }
        Show::Config => config(shared),
        Show::Databases => databases(shared),
        Show::Pools => pools(shared),
        Show::Clients => clients(shared),
        Show::Servers => servers(shared),
        Show::Stats => stats(shared),
        Show::StatsTotals => stats_totals(shared),
        Show::StatsAverages => stats_averages(shared),
        Show::Users => users(shared),
        Show::Lists => lists(shared),
        Show::Mem => mem(shared),
        Show::Shards => shards(shared),
        Show::Routing => routing(shared),
        Show::Transactions => transactions(shared),
        Show::ReadYourWrites => read_your_writes(shared),
        Show::HotKeys => hot_keys(shared),
        Show::Skew => skew(shared),
        Show::Cache => cache(shared),
    }
}

fn help() -> Table {
    let mut t = Table::new(&[("command", T)]);
    for line in HELP {
        t.push(vec![self::t(*line)]);
    }
    t
}

/// Every setting with its value and its default (the value a config with
/// only its users and shards would have).
fn config(shared: &Shared) -> Table {
    let mut table = Table::new(&[("key", T), ("value", T), ("default", T), ("changeable", T)]);
    let defaults = shardline_config::Config {
        proxy: Default::default(),
        pool: Default::default(),
        tls: Default::default(),
        health: Default::default(),
        load_balancing: Default::default(),
        routing: Default::default(),
        sharding: Default::default(),
        admin: Default::default(),
        metrics: Default::default(),
        log: Default::default(),
        hot_keys: Default::default(),
        cache: Default::default(),
        ..(*shared.config).clone()
    };
    for ((key, value), (_, default)) in settings(&shared.config)
        .into_iter()
        .zip(settings(&defaults))
    {
        let changeable = super::RESTART_ONLY.contains(&key);
        table.push(vec![
            t(key),
            t(value),
            t(default),
            t(if changeable { "no" } else { "yes" }),
        ]);
    }
    // The file RELOAD rereads (empty when the proxy was started without
    // one: RELOAD then refuses), fixed until a restart.
    let file = shared
        .admin
        .live()
        .and_then(|l| l.path.as_ref().map(|p| p.display().to_string()))
        .unwrap_or_default();
    table.push(vec![t("config_file"), t(&file), t(""), t("no")]);
    table
}

pub(super) fn settings(c: &shardline_config::Config) -> Vec<(&'static str, String)> {
    let opt = |v: &Option<String>| v.clone().unwrap_or_default();
    let list = |v: &[String]| v.join(",");
    vec![
        ("proxy.listen", c.proxy.listen.to_string()),
        ("proxy.pool_mode", snake(c.proxy.pool_mode)),
        (
            "proxy.max_message_size",
            c.proxy.max_message_size.to_string(),
        ),
        ("proxy.shutdown_timeout", duration(c.proxy.shutdown_timeout)),
        ("proxy.auth_timeout", duration(c.proxy.auth_timeout)),
        ("proxy.log_format", snake(c.proxy.log_format)),
        ("proxy.workers", c.proxy.workers.to_string()),
        ("pool.size", c.pool.size.to_string()),
        ("pool.checkout_timeout", duration(c.pool.checkout_timeout)),
        ("pool.connect_timeout", duration(c.pool.connect_timeout)),
        ("pool.idle_timeout", duration(c.pool.idle_timeout)),
        ("pool.max_lifetime", duration(c.pool.max_lifetime)),
        (
            "pool.server_check_delay",
            duration(c.pool.server_check_delay),
        ),
        ("pool.server_tls", snake(c.pool.server_tls)),
        (
            "pool.prepared_statements_per_server",
            c.pool.prepared_statements_per_server.to_string(),
        ),
        ("pool.session_state", snake(c.pool.session_state)),
        ("tls.mode", snake(c.tls.mode)),
        ("health.interval", duration(c.health.interval)),
        ("health.timeout", duration(c.health.timeout)),
        ("health.max_replica_lag", duration(c.health.max_replica_lag)),
        (
            "health.max_replica_lag_bytes",
            c.health.max_replica_lag_bytes.to_string(),
        ),
        ("health.ban_time", duration(c.health.ban_time)),
        ("health.auto_promote", c.health.auto_promote.to_string()),
        (
            "health.auto_promote_after",
            duration(c.health.auto_promote_after),
        ),
        ("load_balancing.strategy", snake(c.load_balancing.strategy)),
        (
            "load_balancing.read_your_writes",
            snake(c.load_balancing.read_your_writes),
        ),
        (
            "load_balancing.primary_window",
            duration(c.load_balancing.primary_window),
        ),
        ("load_balancing.zone", opt(&c.load_balancing.zone)),
        (
            "load_balancing.replica_fallback_to_primary",
            c.load_balancing.replica_fallback_to_primary.to_string(),
        ),
        (
            "load_balancing.primary_reads",
            c.load_balancing.primary_reads.to_string(),
        ),
        (
            "load_balancing.replica_wait",
            duration(c.load_balancing.replica_wait),
        ),
        (
            "routing.writing_functions",
            list(&c.routing.writing_functions),
        ),
        (
            "routing.read_only_functions",
            list(&c.routing.read_only_functions),
        ),
        (
            "routing.unknown_functions_write",
            c.routing.unknown_functions_write.to_string(),
        ),
        ("routing.cache_size", c.routing.cache_size.to_string()),
        ("routing.cache_bytes", c.routing.cache_bytes.to_string()),
        ("routing.merge_memory", c.routing.merge_memory.to_string()),
        (
            "routing.merge_memory_total",
            c.routing.merge_memory_total.to_string(),
        ),
        ("sharding.placement", c.placement_fingerprint()),
        ("sharding.function", snake(c.sharding.function)),
        ("sharding.vnodes", c.sharding.vnodes.to_string()),
        ("sharding.key_type", snake(c.sharding.key_type)),
        ("sharding.default_shard", opt(&c.sharding.default_shard)),
        (
            "sharding.broadcast_writes",
            c.sharding.broadcast_writes.to_string(),
        ),
        (
            "sharding.two_phase_commit",
            c.sharding.two_phase_commit.to_string(),
        ),
        ("admin.users", list(&c.admin.users)),
        ("admin.database", c.admin.database.clone()),
        ("admin.pause_timeout", duration(c.admin.pause_timeout)),
        ("admin.max_hold", duration(c.admin.max_hold)),
        ("admin.stats_period", duration(c.admin.stats_period)),
        (
            "metrics.listen",
            c.metrics.listen.map(|a| a.to_string()).unwrap_or_default(),
        ),
        (
            "log.slow_statement",
            c.log.slow_statement.map(duration).unwrap_or_default(),
        ),
        ("hot_keys.window", duration(c.hot_keys.window)),
        ("hot_keys.top", c.hot_keys.top.to_string()),
        ("cache.max_bytes", c.cache.max_bytes.to_string()),
        ("cache.max_entries", c.cache.max_entries.to_string()),
        (
            "cache.max_result_bytes",
            c.cache.max_result_bytes.to_string(),
        ),
        ("cache.hints", c.cache.hints.to_string()),
        (
            "cache.tables",
            c.cache
                .tables
                .iter()
                .map(|t| format!("{}={}", t.name, duration(t.ttl)))
                .collect::<Vec<_>>()
                .join(","),
        ),
    ]
}

/// One row per client database, as PgBouncer has one per database entry
/// (tools label by `database`): its pools summed over every node of every
/// shard; `host` and `port` are NULL (SHOW SHARDS lists the nodes).
fn databases(shared: &Shared) -> Table {
    let mut table = Table::new(&[
        ("name", T),
        ("host", T),
        ("port", I),
        ("database", T),
        ("force_user", T),
        ("pool_size", I),
        ("min_pool_size", I),
        ("reserve_pool", I),
        ("pool_mode", T),
        ("max_connections", I),
        ("current_connections", I),
        ("paused", I),
        ("disabled", I),
        ("shards", I),
        ("nodes", I),
    ]);
    let all = match shared.topology.shards.len() {
        n if n >= 64 => u64::MAX,
        n => (1u64 << n) - 1,
    };
    let paused = shared.admin.pause.mask() & all == all;
    let mut by_db: BTreeMap<&str, Vec<&crate::UserEntry>> = BTreeMap::new();
    for u in shared.users.values() {
        by_db.entry(&u.database).or_default().push(u);
    }
    let nodes: usize = shared.topology.shards.iter().map(|s| s.nodes.len()).sum();
    for (db, users) in by_db {
        let (mut open, mut size) = (0, 0);
        for pool in users
            .iter()
            .flat_map(|u| u.pools.shards.iter().flat_map(|s| s.nodes.iter()))
        {
            open += pool.counts().0;
            size = size.max(pool.pool.status().max_size);
        }
        table.push(vec![
            t(db),
            None,
            None,
            t(db),
            None,
            n(size as u64),
            n(0u8),
            n(0u8),
            t(snake(shared.config.proxy.pool_mode)),
            n(0u8),
            n(open as u64),
            n(u8::from(paused)),
            n(0u8),
            n(shared.topology.shards.len() as u64),
            n(nodes as u64),
        ]);
    }
    table
}

/// The users in database order, then name order.
pub(crate) fn users_sorted(shared: &Shared) -> Vec<&std::sync::Arc<crate::UserEntry>> {
    let mut users: Vec<_> = shared.users.values().collect();
    users.sort_by(|a, b| (&a.database, &a.name).cmp(&(&b.database, &b.name)));
    users
}

/// One row per user, as PgBouncer has one per pool (tools label by
/// database and user): the user's pools on every node summed. `cl_active`:
/// the user's clients using a server connection now; `cl_waiting`: clients
/// waiting for one of its pools' connections; `maxwait`: the longest wait
/// among the user's waiting clients (a PAUSE's hold included). Connections
/// being opened count in `sv_active`.
fn pools(shared: &Shared) -> Table {
    let mut table = Table::new(&[
        ("database", T),
        ("user", T),
        ("cl_active", I),
        ("cl_waiting", I),
        ("cl_active_cancel_req", I),
        ("cl_waiting_cancel_req", I),
        ("sv_active", I),
        ("sv_active_cancel", I),
        ("sv_being_canceled", I),
        ("sv_idle", I),
        ("sv_used", I),
        ("sv_tested", I),
        ("sv_login", I),
        ("maxwait", I),
        ("maxwait_us", I),
        ("pool_mode", T),
        ("nodes", I),
    ]);
    let clients = shared.clients.list();
    for u in users_sorted(shared) {
        let mine: Vec<_> = clients
            .iter()
            .filter(|(_, c)| {
                !c.info.console && c.info.user == u.name && c.info.database == u.database
            })
            .collect();
        let maxwait = mine
            .iter()
            .filter_map(|(_, c)| c.waited())
            .max()
            .unwrap_or_default();
        let active = mine.iter().filter(|(_, c)| !c.servers().is_empty()).count();
        let (mut open, mut idle, mut waiting, mut nodes) = (0, 0, 0, 0);
        for pool in u.pools.shards.iter().flat_map(|s| s.nodes.iter()) {
            let (o, i, w) = pool.counts();
            open += o;
            idle += i;
            waiting += w;
            nodes += 1;
        }
        table.push(vec![
            t(&u.database),
            t(&u.name),
            n(active as u64),
            n(waiting as u64),
            n(0u8),
            n(0u8),
            n((open - idle) as u64),
            n(0u8),
            n(0u8),
            n(idle as u64),
            n(0u8),
            n(0u8),
            n(0u8),
            n(maxwait.as_secs()),
            n(maxwait.subsec_micros()),
            t(snake(u.mode)),
            n(nodes as u64),
        ]);
    }
    table
}

/// PgBouncer's columns of SHOW CLIENTS and SHOW SERVERS.
const CONNECTION_COLUMNS: [(&str, Type); 18] = [
    ("type", T),
    ("user", T),
    ("database", T),
    ("state", T),
    ("addr", T),
    ("port", I),
    ("local_addr", T),
    ("local_port", I),
    ("connect_time", T),
    ("request_time", T),
    ("wait", I),
    ("wait_us", I),
    ("close_needed", I),
    ("ptr", T),
    ("link", T),
    ("remote_pid", I),
    ("tls", T),
    ("application_name", T),
];

fn clients(shared: &Shared) -> Table {
    let mut table = Table::new(&[&CONNECTION_COLUMNS[..], &[("id", I)]].concat());
    for (id, c) in shared.clients.list() {
        let servers = c.servers();
        let waited = c.waited();
        let state = match (waited, servers.is_empty()) {
            (Some(_), _) => "waiting",
            (None, false) => "active",
            (None, true) => "idle",
        };
        let wait = waited.unwrap_or_default();
        let link = servers
            .iter()
            .map(|(addr, pid)| format!("{addr}/{pid}"))
            .collect::<Vec<_>>()
            .join(" ");
        table.push(vec![
            t("C"),
            t(&c.info.user),
            t(&c.info.database),
            t(state),
            t(c.info.peer.ip().to_string()),
            n(c.info.peer.port()),
            c.info.local.map(|a| a.ip().to_string()),
            c.info.local.map(|a| a.port().to_string()),
            t(timestamp(c.connected)),
            t(timestamp(c.requested())),
            n(wait.as_secs()),
            n(wait.subsec_micros()),
            n(0u8),
            t(format!("{id:x}")),
            t(link),
            n(servers.first().map_or(0, |(_, pid)| *pid as u32)),
            t(if c.info.tls { "TLS" } else { "" }),
            t(&c.info.application_name),
            n(id as u32),
        ]);
    }
    table
}

fn servers(shared: &Shared) -> Table {
    let mut table = Table::new(&[&CONNECTION_COLUMNS[..], &[("shard", T), ("role", T)]].concat());
    let clients = shared.clients.list();
    for (s, shard) in shared.topology.shards.iter().enumerate() {
        for (i, node) in shard.nodes.iter().enumerate() {
            let idle: HashSet<i32> = shared
                .users
                .values()
                .flat_map(|u| u.pools.shards[s].nodes[i].idle_pids())
                .collect();
            let (host, port) = host_port(&node.address);
            for conn in node.connections() {
                let link = clients.iter().find(|(_, c)| {
                    c.servers()
                        .iter()
                        .any(|(a, pid)| *pid == conn.pid && **a == *node.address)
                });
                let state = if idle.contains(&conn.pid) {
                    "idle"
                } else {
                    "active"
                };
                table.push(vec![
                    t("S"),
                    t(&conn.user),
                    t(&conn.database),
                    t(state),
                    t(&host),
                    t(&port),
                    conn.local.map(|a| a.ip().to_string()),
                    conn.local.map(|a| a.port().to_string()),
                    t(timestamp(conn.connected)),
                    t(timestamp(conn.connected)),
                    n(0u8),
                    n(0u8),
                    n(0u8),
                    t(format!("{:x}", conn.pid)),
                    link.map(|(id, _)| format!("{id:x}")),
                    n(conn.pid as u32),
                    t(""),
                    t(conn.application_name.unwrap_or("")),
                    t(&shard.name),
                    t(snake(node.role())),
                ]);
            }
        }
    }
    table
}

/// Totals since start, by client database (users of one database summed).
pub fn totals_by_database(shared: &Shared) -> Vec<(String, Totals)> {
    let mut by_db: BTreeMap<String, Totals> = BTreeMap::new();
    for u in shared.users.values() {
        let t = by_db.entry(u.database.clone()).or_default();
        t.add_stats(&u.stats);
        for shard in &u.pools.shards {
            for pool in &shard.nodes {
                t.assignments += pool.counters.assignments.load(Relaxed);
                t.wait_us += pool.counters.wait_us.load(Relaxed);
            }
        }
    }
    by_db.into_iter().collect()
}

fn totals_row(db: &str, t: &Totals) -> Vec<Option<String>> {
    vec![
        self::t(db),
        n(t.assignments),
        n(t.xacts),
        n(t.queries),
        n(t.received),
        n(t.sent),
        n(t.xact_us),
        n(t.query_us),
        n(t.wait_us),
    ]
}

fn stats(shared: &Shared) -> Table {
    let mut table = Table::new(&[
        ("database", T),
        ("total_server_assignment_count", I),
        ("total_xact_count", I),
        ("total_query_count", I),
        ("total_received", I),
        ("total_sent", I),
        ("total_xact_time", I),
        ("total_query_time", I),
        ("total_wait_time", I),
        ("avg_server_assignment_count", I),
        ("avg_xact_count", I),
        ("avg_query_count", I),
        ("avg_recv", I),
        ("avg_sent", I),
        ("avg_xact_time", I),
        ("avg_query_time", I),
        ("avg_wait_time", I),
        // PgBouncer before 1.8 (exporters written then still read it).
        ("total_requests", I),
    ]);
    for (db, totals) in totals_by_database(shared) {
        let mut row = totals_row(&db, &totals);
        let avg = shared.admin.averages.of(&db);
        row.extend(totals_row(&db, &avg).into_iter().skip(1));
        row.push(n(totals.queries));
        table.push(row);
    }
    table
}

const STATS_COLUMNS: [(&str, Type); 9] = [
    ("database", T),
    ("server_assignment_count", I),
    ("xact_count", I),
    ("query_count", I),
    ("bytes_received", I),
    ("bytes_sent", I),
    ("xact_time", I),
    ("query_time", I),
    ("wait_time", I),
];

fn stats_totals(shared: &Shared) -> Table {
    let mut table = Table::new(&STATS_COLUMNS);
    for (db, totals) in totals_by_database(shared) {
        table.push(totals_row(&db, &totals));
    }
    table
}

fn stats_averages(shared: &Shared) -> Table {
    let mut table = Table::new(&STATS_COLUMNS);
    for (db, _) in totals_by_database(shared) {
        table.push(totals_row(&db, &shared.admin.averages.of(&db)));
    }
    table
}

fn users(shared: &Shared) -> Table {
    let mut table = Table::new(&[("name", T), ("pool_mode", T), ("database", T), ("admin", I)]);
    for u in users_sorted(shared) {
        table.push(vec![
            t(&u.name),
            t(snake(u.mode)),
            t(&u.database),
            n(u8::from(shared.admin.is_admin(&u.name))),
        ]);
    }
    table
}

fn lists(shared: &Shared) -> Table {
    let mut table = Table::new(&[("list", T), ("items", I)]);
    let databases: HashSet<&str> = shared.users.values().map(|u| u.database.as_str()).collect();
    let (mut pools, mut free, mut used) = (0usize, 0usize, 0usize);
    for u in shared.users.values() {
        for shard in &u.pools.shards {
            for pool in &shard.nodes {
                let (open, idle, _) = pool.counts();
                pools += 1;
                free += idle;
                used += open - idle;
            }
        }
    }
    let clients = shared.clients.list();
    let items: [(&str, usize); 12] = [
        ("databases", databases.len()),
        ("users", shared.users.len()),
        ("pools", pools),
        ("free_clients", 0),
        ("used_clients", clients.len()),
        ("login_clients", 0),
        ("free_servers", free),
        ("used_servers", used),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
    ];
    for (list, count) in items {
        table.push(vec![t(list), n(count as u64)]);
    }
    table
}

/// Where the proxy's memory goes: `size` is the bound, `used` what is
/// taken, `free` what is left of the bound, `memtotal` bytes in all.
fn mem(shared: &Shared) -> Table {
    let mut table = Table::new(&[
        ("name", T),
        ("size", I),
        ("used", I),
        ("free", I),
        ("memtotal", I),
    ]);
    let (entries, bytes) = shared.router.cache_usage();
    let c = &shared.config.routing;
    table.push(vec![
        t("router_cache"),
        n(c.cache_bytes as u64),
        n(entries as u64),
        n(c.cache_size.saturating_sub(entries) as u64),
        n(bytes as u64),
    ]);
    let (entries, bytes) = shared.result_cache.usage();
    let cache = &shared.config.cache;
    table.push(vec![
        t("result_cache"),
        n(cache.max_bytes as u64),
        n(entries as u64),
        n(cache.max_entries.saturating_sub(entries) as u64),
        n(bytes as u64),
    ]);
    let merge = shared.merge_memory.used();
    table.push(vec![
        t("merge_memory"),
        n(c.merge_memory_total as u64),
        n(merge as u64),
        n(c.merge_memory_total.saturating_sub(merge) as u64),
        n(merge as u64),
    ]);
    let rss = crate::memory::resident_bytes();
    table.push(vec![
        t("process_resident"),
        None,
        None,
        None,
        rss.map(|b| b.to_string()),
    ]);
    table
}

/// Each node: where it is, what it is now, and its replication lag.
fn shards(shared: &Shared) -> Table {
    let mut table = Table::new(&[
        ("shard", T),
        ("node", I),
        ("host", T),
        ("port", I),
        ("role", T),
        ("state", T),
        ("banned_for_ms", I),
        ("lag_bytes", I),
        ("lag_ms", I),
        ("connections", I),
        ("paused", I),
        ("last_error", T),
    ]);
    let paused = shared.admin.pause.mask();
    for (s, shard) in shared.topology.shards.iter().enumerate() {
        for (i, node) in shard.nodes.iter().enumerate() {
            let (host, port) = host_port(&node.address);
            let banned = node.banned_for();
            let state = if node.is_down() {
                "down"
            } else if banned.is_some() {
                "banned"
            } else {
                "up"
            };
            let (lag_bytes, lag) = node.lag();
            let replica = node.role() == crate::health::Role::Replica;
            let error = node.last_error();
            table.push(vec![
                t(&shard.name),
                n(i as u64),
                t(host),
                t(port),
                t(snake(node.role())),
                t(state),
                banned.map(|d| d.as_millis().to_string()),
                replica.then(|| lag_bytes.to_string()),
                replica.then(|| lag.as_millis().to_string()),
                n(node.connections().len() as u64),
                n(u8::from(paused & (1 << s) != 0)),
                (!error.is_empty()).then_some(error),
            ]);
        }
    }
    table
}

fn routing(shared: &Shared) -> Table {
    let mut table = Table::new(&[("name", T), ("value", I)]);
    let stats = shared.router.stats();
    let (entries, bytes) = shared.router.cache_usage();
    let p = &shared.placements;
    let nanos = shared.route_nanos.load(Relaxed);
    let timed = shared.routes_timed.load(Relaxed);
    let rows: [(&str, u64); 14] = [
        ("statements_routed", stats.hits + stats.misses),
        ("cache_hits", stats.hits),
        ("cache_misses", stats.misses),
        ("cache_entries", entries as u64),
        ("cache_bytes", bytes as u64),
        ("parser_fallbacks", stats.fallbacks),
        ("avg_route_ns", nanos.checked_div(timed).unwrap_or(0)),
        ("placed_one_shard", p.one.load(Relaxed)),
        ("placed_fanout", p.fanout.load(Relaxed)),
        ("placed_merge", p.merge.load(Relaxed)),
        ("placed_split", p.split.load(Relaxed)),
        ("placed_copy_split", p.copy_split.load(Relaxed)),
        ("placed_pipeline", p.pipeline.load(Relaxed)),
        ("placed_refused", p.refused.load(Relaxed)),
    ];
    for (name, value) in rows {
        // No average before a statement was timed: NULL, not 0.
        let known = name != "avg_route_ns" || timed > 0;
        table.push(vec![t(name), n(value).filter(|_| known)]);
    }
    table
}

/// `part` of `whole` in percent, two decimals (0 of nothing).
fn percent(part: u64, whole: u64) -> Option<String> {
    Some(format!("{:.2}", part as f64 * 100.0 / whole.max(1) as f64))
}

/// The keys routed by the most in the window, per table group (the top
/// `hot_keys.top`): their share of the group's keyed traffic and of their
/// shard's, and their shard's share of all keyed traffic.
/// The result cache per table (the listed ones, then those cached by a
/// hint), and the whole cache's totals (table `*`).
fn cache(shared: &Shared) -> Table {
    let mut table = Table::new(&[
        ("table", T),
        ("ttl_ms", I),
        ("entries", I),
        ("bytes", I),
        ("hits", I),
        ("misses", I),
        ("evictions", I),
        ("invalidations", I),
    ]);
    let counters =
        |c: crate::cache::Counters| [n(c.hits), n(c.misses), n(c.evictions), n(c.invalidations)];
    for r in shared.result_cache.report() {
        let mut row = vec![
            t(r.table),
            r.ttl.map(|d| d.as_millis().to_string()),
            n(r.entries as u64),
            n(r.bytes as u64),
        ];
        row.extend(counters(r.counters));
        table.push(row);
    }
    let (entries, bytes) = shared.result_cache.usage();
    let mut row = vec![t("*"), None, n(entries as u64), n(bytes as u64)];
    row.extend(counters(shared.result_cache.totals()));
    table.push(row);
    table
}

fn hot_keys(shared: &Shared) -> Table {
    let mut table = Table::new(&[
        ("table_group", T),
        ("key", T),
        ("shard", T),
        ("statements", I),
        ("error", I),
        ("group_percent", N),
        ("shard_percent", N),
        ("shard_traffic_percent", N),
        ("window_seconds", I),
    ]);
    let (Some(hot), Some(sh)) = (&shared.hot_keys, &shared.sharding) else {
        return table;
    };
    let report = hot.report();
    let total = report.total();
    for (g, (group_total, keys)) in report.groups.iter().enumerate() {
        for k in keys.iter().take(shared.config.hot_keys.top) {
            let on_shard = report.shards.get(k.shard).copied().unwrap_or(0);
            table.push(vec![
                t(sh.groups[g].label()),
                t(k.key.to_string()),
                t(sh.shard_names.get(k.shard).cloned().unwrap_or_default()),
                n(k.count),
                n(k.error),
                percent(k.count, *group_total),
                percent(k.count, on_shard),
                percent(on_shard, total),
                n(report.covered.as_secs()),
            ]);
        }
    }
    table
}

/// Each shard's share of the keyed traffic in the hot-key window: 100 / the
/// shard count each when even.
fn skew(shared: &Shared) -> Table {
    let mut table = Table::new(&[
        ("shard", T),
        ("statements", I),
        ("percent", N),
        ("even_percent", N),
        ("window_seconds", I),
    ]);
    let (Some(hot), Some(sh)) = (&shared.hot_keys, &shared.sharding) else {
        return table;
    };
    let report = hot.report();
    let total = report.total();
    let even = percent(1, sh.shard_count() as u64);
    for (s, count) in report.shards.iter().enumerate() {
        table.push(vec![
            t(sh.shard_names[s].clone()),
            n(*count),
            percent(*count, total),
            even.clone(),
            n(report.covered.as_secs()),
        ]);
    }
    table
}

/// Clients in a transaction on several shards now.
fn transactions(shared: &Shared) -> Table {
    let mut table = Table::new(&[
        ("id", I),
        ("user", T),
        ("database", T),
        ("shards", T),
        ("servers", T),
    ]);
    for (id, c) in shared.clients.list() {
        let spanning = c.spanning();
        if spanning.count_ones() < 2 {
            continue;
        }
        let names: Vec<&str> = shared
            .topology
            .shards
            .iter()
            .enumerate()
            .filter(|(s, _)| spanning & (1 << s) != 0)
            .map(|(_, sh)| sh.name.as_str())
            .collect();
        let servers = c
            .servers()
            .iter()
            .map(|(a, pid)| format!("{a}/{pid}"))
            .collect::<Vec<_>>()
            .join(" ");
        table.push(vec![
            n(id as u32),
            t(&c.info.user),
            t(&c.info.database),
            t(names.join(",")),
            t(servers),
        ]);
    }
    table
}

/// Users whose reads wait on a write's position: the WAL position replicas
/// must have replayed, the primary-only window left, and commits whose
/// position is still being learned.
fn read_your_writes(shared: &Shared) -> Table {
    let mut table = Table::new(&[
        ("user", T),
        ("database", T),
        ("shard", T),
        ("lsn", T),
        ("primary_for_ms", I),
        ("positions_pending", I),
    ]);
    let now = crate::health::now_ms();
    for u in users_sorted(shared) {
        for (s, ryw) in u.ryw.iter().enumerate() {
            let lsn = ryw.lsn.load(Relaxed);
            let until = ryw.primary_until.load(Relaxed);
            let pending = ryw.positions_pending.load(Relaxed);
            let primary_for = until.saturating_sub(now);
            if lsn == 0 && primary_for == 0 && pending == 0 {
                continue;
            }
            let replayed = shared.topology.shards[s]
                .nodes
                .iter()
                .filter(|n| n.role() == crate::health::Role::Replica)
                .map(|n| n.lsn())
                .min()
                .unwrap_or(u64::MAX);
            if lsn <= replayed && primary_for == 0 && pending == 0 {
                // Every replica is past it: nothing waits on it any more.
                continue;
            }
            table.push(vec![
                t(&u.name),
                t(&u.database),
                t(&shared.topology.shards[s].name),
                t(format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)),
                n(primary_for),
                n(pending),
            ]);
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_as_utc_dates() {
        assert_eq!(timestamp(SystemTime::UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_245_261);
        assert_eq!(timestamp(t), "2026-12-02 21:01:01 UTC");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(timestamp(leap), "2000-02-29 00:00:00 UTC");
    }

    #[test]
    fn settings_print_as_the_config_spells_them() {
        assert_eq!(duration(Duration::from_millis(250)), "250ms");
        assert_eq!(duration(Duration::from_secs(30)), "30s");
        assert_eq!(snake(shardline_config::Strategy::RoundRobin), "round_robin");
        assert_eq!(
            host_port("127.0.0.1:5432"),
            ("127.0.0.1".into(), "5432".into())
        );
        assert_eq!(host_port("[::1]:6432"), ("::1".into(), "6432".into()));
    }
}
