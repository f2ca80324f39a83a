//! `/metrics`: the proxy's state in the Prometheus text format.
//!
//! Nothing here runs on the data path. Sessions, pools and health checks
//! keep relaxed atomic counters and lock-free histograms (`stats.rs`,
//! `pool::PoolCounters`, `health`); a scrape reads them, with the same
//! sources as the admin console's SHOW views, into the `prometheus` crate's
//! metric families, which its encoder writes out.

pub mod http;

use std::sync::atomic::Ordering::Relaxed;

use prometheus::proto::{self, MetricFamily, MetricType};

use crate::admin::views::{snake, users_sorted};
use crate::memory::resident_bytes;
use crate::stats::{HistogramReading, Kind};
use crate::Shared;

type Labels = Vec<(&'static str, String)>;

/// Metric families as they are built, in the order they are written.
#[derive(Default)]
struct Families(Vec<MetricFamily>);

fn labelled(labels: Labels) -> proto::Metric {
    let mut m = proto::Metric::default();
    m.set_label(
        labels
            .into_iter()
            .map(|(name, value)| {
                let mut pair = proto::LabelPair::default();
                pair.set_name(name.to_string());
                pair.set_value(value);
                pair
            })
            .collect(),
    );
    m
}

impl Families {
    fn family(&mut self, name: &str, help: &str, kind: MetricType) -> &mut MetricFamily {
        let mut f = MetricFamily::default();
        f.set_name(format!("shardline_{name}"));
        f.set_help(help.to_string());
        f.set_field_type(kind);
        self.0.push(f);
        self.0.last_mut().expect("just pushed")
    }

    fn counter(&mut self, name: &str, help: &str, rows: impl IntoIterator<Item = (Labels, u64)>) {
        let f = self.family(name, help, MetricType::COUNTER);
        for (labels, value) in rows {
            let mut c = proto::Counter::default();
            c.set_value(value as f64);
            let mut m = labelled(labels);
            m.set_counter(c);
            f.mut_metric().push(m);
        }
    }

    fn gauge(&mut self, name: &str, help: &str, rows: impl IntoIterator<Item = (Labels, f64)>) {
        let f = self.family(name, help, MetricType::GAUGE);
        for (labels, value) in rows {
            let mut g = proto::Gauge::default();
            g.set_value(value);
            let mut m = labelled(labels);
            m.set_gauge(g);
            f.mut_metric().push(m);
        }
    }

    /// Histograms, written in seconds.
    fn histogram(
        &mut self,
        name: &str,
        help: &str,
        rows: impl IntoIterator<Item = (Labels, HistogramReading)>,
    ) {
        let f = self.family(name, help, MetricType::HISTOGRAM);
        for (labels, r) in rows {
            let mut h = proto::Histogram::default();
            h.set_sample_count(r.count);
            let unit = r.per_second as f64;
            h.set_sample_sum(r.sum as f64 / unit);
            h.set_bucket(
                r.bounds
                    .iter()
                    .zip(r.cumulative)
                    .map(|(bound, count)| {
                        let mut b = proto::Bucket::default();
                        b.set_upper_bound(*bound as f64 / unit);
                        b.set_cumulative_count(count);
                        b
                    })
                    .collect(),
            );
            let mut m = labelled(labels);
            m.set_histogram(h);
            f.mut_metric().push(m);
        }
    }
}

fn user_labels(user: &str, database: &str) -> Labels {
    vec![
        ("user", user.to_string()),
        ("database", database.to_string()),
    ]
}

/// Every metric, in the Prometheus text format (version 0.0.4).
pub fn render(shared: &Shared) -> String {
    let mut f = Families::default();
    process(&mut f, shared);
    traffic(&mut f, shared);
    pools(&mut f, shared);
    nodes(&mut f, shared);
    routing(&mut f, shared);
    result_cache(&mut f, shared);
    hot_keys(&mut f, shared);
    // A family with no sample (no user, no error yet) is left out: the
    // format has no way to say "none".
    f.0.retain(|family| !family.get_metric().is_empty());
    prometheus::TextEncoder::new()
        .encode_to_string(&f.0)
        .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
}

fn process(f: &mut Families, shared: &Shared) {
    let events = &shared.events;
    f.gauge(
        "uptime_seconds",
        "Seconds since the proxy started.",
        [(vec![], events.started.elapsed().as_secs_f64())],
    );
    if let Some(rss) = resident_bytes() {
        f.gauge(
            "resident_memory_bytes",
            "The process's resident memory.",
            [(vec![], rss as f64)],
        );
    }
    f.gauge(
        "config_generation",
        "The configuration running: 0 at start, one more per reload applied.",
        [(vec![], shared.generation as f64)],
    );
    f.counter(
        "config_reloads_total",
        "Reloads (RELOAD, SIGHUP) applied and refused.",
        [
            (
                vec![("result", "ok".into())],
                events.reloads_ok.load(Relaxed),
            ),
            (
                vec![("result", "failed".into())],
                events.reloads_failed.load(Relaxed),
            ),
        ],
    );
}

fn traffic(f: &mut Families, shared: &Shared) {
    let users = users_sorted(shared);
    let clients = shared.clients.list();
    let per_user = |pick: &dyn Fn(&crate::clients::ClientSlot) -> bool| {
        users
            .iter()
            .map(|u| {
                let n = clients
                    .iter()
                    .filter(|(_, c)| {
                        !c.info.console
                            && c.info.user == u.name
                            && c.info.database == u.database
                            && pick(c)
                    })
                    .count();
                (user_labels(&u.name, &u.database), n as f64)
            })
            .collect::<Vec<_>>()
    };
    f.gauge(
        "client_connections",
        "Clients logged in (admin console connections not counted).",
        per_user(&|_| true),
    );
    f.gauge(
        "clients_active",
        "Clients holding a server connection now.",
        per_user(&|c| !c.servers().is_empty()),
    );
    f.gauge(
        "clients_waiting",
        "Clients waiting for a server connection now.",
        per_user(&|c| c.waited().is_some()),
    );
    let stat = |pick: fn(&crate::stats::Stats) -> u64| {
        users
            .iter()
            .map(move |u| (user_labels(&u.name, &u.database), pick(&u.stats)))
    };
    f.counter(
        "transactions_total",
        "Transactions answered (a ReadyForQuery with status idle reached the client).",
        stat(|s| s.xacts.load(Relaxed)),
    );
    f.counter(
        "queries_total",
        "Units answered: a simple query, or an extended batch up to Sync.",
        stat(|s| s.queries.load(Relaxed)),
    );
    f.counter(
        "client_received_bytes_total",
        "Bytes received from clients.",
        stat(|s| s.received.load(Relaxed)),
    );
    f.counter(
        "client_sent_bytes_total",
        "Bytes sent to clients.",
        stat(|s| s.sent.load(Relaxed)),
    );
    f.histogram(
        "query_duration_seconds",
        "Time from a unit's first byte to its ReadyForQuery, by user.",
        users
            .iter()
            .map(|u| (user_labels(&u.name, &u.database), u.stats.query_time.read())),
    );
    f.histogram(
        "transaction_duration_seconds",
        "Time from a transaction's first byte to the ReadyForQuery that ends it, by user.",
        users
            .iter()
            .map(|u| (user_labels(&u.name, &u.database), u.stats.xact_time.read())),
    );
    f.histogram(
        "placement_query_duration_seconds",
        "Unit latency by placement: one shard, fan-out (several shards, answers concatenated), merge (rows merged by the proxy), split (INSERT or COPY rows cut by shard), pipeline (a batch whose statements need different shards).",
        Kind::NAMES
            .iter()
            .zip(&shared.events.by_kind)
            .map(|(kind, h)| (vec![("placement", kind.to_string())], h.read())),
    );
    f.histogram(
        "shard_query_duration_seconds",
        "Latency of units run on one shard, by shard and the role of the node that ran them.",
        shared.topology.shards.iter().flat_map(|s| {
            ["primary", "replica"]
                .into_iter()
                .zip(&s.latency)
                .map(|(role, h)| {
                    (
                        vec![("shard", s.name.clone()), ("role", role.to_string())],
                        h.read(),
                    )
                })
        }),
    );
    f.counter(
        "errors_total",
        "ErrorResponses sent to clients, by SQLSTATE class (the code's first two characters; ?? when it could not be read).",
        shared
            .events
            .errors
            .read()
            .into_iter()
            .map(|(class, n)| (vec![("class", class)], n)),
    );
    f.counter(
        "refusals_total",
        "Statements the proxy refused with 0A000 (it cannot run them exactly across shards, or under the pooling mode), by the construct refused.",
        shared
            .events
            .refusals
            .read()
            .map(|(construct, n)| (vec![("construct", construct.to_string())], n)),
    );
    f.counter(
        "read_your_writes_primary_reads_total",
        "Reads sent to a primary because no replica had replayed the user's last write within load_balancing.replica_wait.",
        [(vec![], shared.events.ryw_primary_reads.load(Relaxed))],
    );
    let tp = &shared.events.two_phase;
    f.counter(
        "two_phase_total",
        "Transactions on several shards by how their two-phase commit went: prepared (every participant), committed, rolled_back (after a failed PREPARE or a refused commit), in_doubt (left to the in-doubt check: the coordinator or a participant lost while committing).",
        [
            ("prepared", &tp.prepared),
            ("committed", &tp.committed),
            ("rolled_back", &tp.rolled_back),
            ("in_doubt", &tp.in_doubt),
        ]
        .into_iter()
        .map(|(outcome, n)| (vec![("outcome", outcome.to_string())], n.load(Relaxed))),
    );
    f.counter(
        "two_phase_resolved_total",
        "Prepared transactions the in-doubt check committed or rolled back (after a crash or a lost connection).",
        [(vec![], tp.resolved.load(Relaxed))],
    );
    f.gauge(
        "distributed_transactions",
        "Client transactions open on several shards now.",
        [(
            vec![],
            clients
                .iter()
                .filter(|(_, c)| c.spanning().count_ones() >= 2)
                .count() as f64,
        )],
    );
}

/// A pool's labels: its user and database, and its node.
fn pool_labels(u: &crate::UserEntry, shard: &str, node: &crate::health::NodeHealth) -> Labels {
    let mut l = user_labels(&u.name, &u.database);
    l.push(("shard", shard.to_string()));
    l.push(("node", node.address.clone()));
    l.push(("role", snake(node.role())));
    l
}

fn pools(f: &mut Families, shared: &Shared) {
    let users = users_sorted(shared);
    let mut active = Vec::new();
    let mut idle = Vec::new();
    let mut checkouts = Vec::new();
    let mut timeouts = Vec::new();
    let mut waits = Vec::new();
    let mut opening = Vec::new();
    let mut opened = Vec::new();
    let mut failed = Vec::new();
    for u in &users {
        for (pools, health) in u.pools.shards.iter().zip(&shared.topology.shards) {
            for (pool, node) in pools.nodes.iter().zip(&health.nodes) {
                let labels = pool_labels(u, &pools.name, node);
                let (open, free, _) = pool.counts();
                active.push((labels.clone(), (open - free) as f64));
                idle.push((labels.clone(), free as f64));
                checkouts.push((labels.clone(), pool.counters.assignments.load(Relaxed)));
                timeouts.push((labels.clone(), pool.counters.timeouts.load(Relaxed)));
                let c = &pool.counters;
                opening.push((labels.clone(), c.opening.load(Relaxed) as f64));
                opened.push((labels.clone(), c.opened.load(Relaxed)));
                failed.push((labels.clone(), c.open_failures.load(Relaxed)));
                waits.push((labels, pool.counters.wait.read()));
            }
        }
    }
    f.gauge(
        "pool_server_connections_active",
        "Server connections lent to clients (or being opened for one).",
        active,
    );
    f.gauge(
        "pool_server_connections_idle",
        "Server connections idle in the pool.",
        idle,
    );
    f.gauge(
        "pool_server_connections_opening",
        "Server connections being opened now (also counted as active).",
        opening,
    );
    f.counter(
        "pool_server_connections_opened_total",
        "Server connections the pool opened.",
        opened,
    );
    f.counter(
        "pool_server_connect_failures_total",
        "Attempts to open a server connection that failed (refused, unreachable, login failed, timed out).",
        failed,
    );
    f.counter(
        "pool_checkouts_total",
        "Server connections taken from the pool (PgBouncer's server assignments).",
        checkouts,
    );
    f.counter(
        "pool_checkout_timeouts_total",
        "Checkouts that found no free connection within pool.checkout_timeout (53300 to the client).",
        timeouts,
    );
    f.histogram(
        "pool_checkout_wait_seconds",
        "How long a checkout waited for a connection (0 when one was free).",
        waits,
    );
}

fn nodes(f: &mut Families, shared: &Shared) {
    let paused = shared.admin.pause.mask();
    let mut up = Vec::new();
    let mut banned = Vec::new();
    let mut lag_bytes = Vec::new();
    let mut lag_seconds = Vec::new();
    let mut connections = Vec::new();
    let mut checks = Vec::new();
    for shard in &shared.topology.shards {
        for node in &shard.nodes {
            let role = node.role();
            let labels = vec![
                ("shard", shard.name.clone()),
                ("node", node.address.clone()),
                ("role", snake(role)),
            ];
            up.push((labels.clone(), f64::from(u8::from(!node.is_down()))));
            banned.push((labels.clone(), f64::from(u8::from(node.is_banned()))));
            connections.push((labels.clone(), node.connections().len() as f64));
            checks.push((labels.clone(), node.check_time.read()));
            if role == crate::health::Role::Replica {
                let (bytes, time) = node.lag();
                lag_bytes.push((labels.clone(), bytes as f64));
                lag_seconds.push((labels, time.as_secs_f64()));
            }
        }
    }
    f.gauge(
        "node_up",
        "1 when the node's last health check succeeded.",
        up,
    );
    f.gauge(
        "node_banned",
        "1 while the node is banned (skipped for reads after a failure).",
        banned,
    );
    f.gauge(
        "node_replay_lag_bytes",
        "WAL bytes a replica is behind its primary.",
        lag_bytes,
    );
    f.gauge(
        "node_replay_lag_seconds",
        "How long ago the primary passed the position a replica has replayed.",
        lag_seconds,
    );
    f.gauge(
        "node_server_connections",
        "Server connections open to the node (every pool, and the proxy's own).",
        connections,
    );
    f.histogram(
        "node_health_check_duration_seconds",
        "How long each health check of the node took (a timed-out one counts as health.timeout).",
        checks,
    );
    f.counter(
        "shard_primary_changes_total",
        "Times a shard's writes moved to another node (failover, switchover).",
        shared.topology.shards.iter().map(|s| {
            (
                vec![("shard", s.name.clone())],
                s.primary_changes.load(Relaxed),
            )
        }),
    );
    f.gauge(
        "shard_paused",
        "1 while the admin console's PAUSE holds the shard's new units.",
        shared.topology.shards.iter().enumerate().map(|(i, s)| {
            (
                vec![("shard", s.name.clone())],
                f64::from(u8::from(paused & (1 << i) != 0)),
            )
        }),
    );
}

/// The result cache, per table and in total (`table="*"`); nothing while
/// the configuration caches nothing.
fn result_cache(f: &mut Families, shared: &Shared) {
    if !shared.caching {
        return;
    }
    let cache = &shared.result_cache;
    let tables = cache.report();
    let totals = cache.totals();
    let (entries, bytes) = cache.usage();
    let rows = |pick: fn(&crate::cache::Counters) -> u64| {
        let mut rows: Vec<(Labels, u64)> = tables
            .iter()
            .map(|r| (vec![("table", r.table.clone())], pick(&r.counters)))
            .collect();
        rows.push((vec![("table", "*".to_string())], pick(&totals)));
        rows
    };
    f.counter(
        "result_cache_hits_total",
        "Reads answered from the result cache, per table read (and in total: table=\"*\").",
        rows(|c| c.hits),
    );
    f.counter(
        "result_cache_misses_total",
        "Cacheable reads not in the cache (read on the primary and kept).",
        rows(|c| c.misses),
    );
    f.counter(
        "result_cache_evictions_total",
        "Cached results removed for room or past their lifetime.",
        rows(|c| c.evictions),
    );
    f.counter(
        "result_cache_invalidations_total",
        "Writes through the proxy that dropped a table's cached results.",
        rows(|c| c.invalidations),
    );
    let mut sizes: Vec<(Labels, f64)> = tables
        .iter()
        .map(|r| (vec![("table", r.table.clone())], r.bytes as f64))
        .collect();
    sizes.push((vec![("table", "*".to_string())], bytes as f64));
    f.gauge(
        "result_cache_bytes",
        "Bytes the cached results hold (bounded by cache.max_bytes; a result over several tables counts in each).",
        sizes,
    );
    f.gauge(
        "result_cache_entries",
        "Results in the cache.",
        [(vec![], entries as f64)],
    );
}

fn routing(f: &mut Families, shared: &Shared) {
    let stats = shared.router.stats();
    let (entries, bytes) = shared.router.cache_usage();
    f.counter(
        "router_statements_total",
        "Statement texts routed (cache hits and misses; restarts at a reload, which builds a new cache).",
        [(vec![], stats.hits + stats.misses)],
    );
    f.counter(
        "router_cache_hits_total",
        "Statements whose route came from the cache (keyed by the text with its constants blanked).",
        [(vec![], stats.hits)],
    );
    f.counter(
        "router_cache_misses_total",
        "Statements parsed to be routed.",
        [(vec![], stats.misses)],
    );
    f.counter(
        "router_parser_fallbacks_total",
        "Statements the SQL parser could not read, routed by their leading keyword.",
        [(vec![], stats.fallbacks)],
    );
    f.gauge(
        "router_cache_entries",
        "Routes in the cache.",
        [(vec![], entries as f64)],
    );
    f.gauge(
        "router_cache_bytes",
        "Estimated bytes the cache holds (bounded by routing.cache_bytes).",
        [(vec![], bytes as f64)],
    );
    f.histogram(
        "router_route_duration_seconds",
        "Time to route a statement text: cache look-up, and a parse on a miss (one statement in 64 is timed).",
        [(vec![], shared.events.routing.read())],
    );
    let p = &shared.placements;
    f.counter(
        "units_placed_total",
        "Units by placement; refused: 0A000 and other refusals the router gave.",
        [
            ("one_shard", &p.one),
            ("fan_out", &p.fanout),
            ("merge", &p.merge),
            ("split", &p.split),
            ("copy_split", &p.copy_split),
            ("pipeline", &p.pipeline),
            ("refused", &p.refused),
        ]
        .into_iter()
        .map(|(kind, n)| (vec![("placement", kind.to_string())], n.load(Relaxed))),
    );
}

/// The hot-key report (SHOW HOT_KEYS, SHOW SKEW): the top keys of each
/// table group and each shard's share of the keyed traffic, over the
/// window. The key labels change as keys come and go.
fn hot_keys(f: &mut Families, shared: &Shared) {
    let (Some(hot), Some(sh)) = (&shared.hot_keys, &shared.sharding) else {
        return;
    };
    let report = hot.report();
    let total = report.total();
    let share = |part: u64, whole: u64| part as f64 / whole.max(1) as f64;
    f.gauge(
        "hot_keys_window_seconds",
        "Seconds of traffic the hot-key figures cover (hot_keys.window, filling after a start or a placement change).",
        [(vec![], report.covered.as_secs_f64())],
    );
    let top: Vec<(Labels, u64, u64)> = report
        .groups
        .iter()
        .enumerate()
        .flat_map(|(g, (group_total, keys))| {
            keys.iter().take(shared.config.hot_keys.top).map(move |k| {
                let labels = vec![
                    ("table_group", sh.groups[g].label().to_string()),
                    ("key", k.key.to_string()),
                    (
                        "shard",
                        sh.shard_names.get(k.shard).cloned().unwrap_or_default(),
                    ),
                ];
                (labels, k.count, *group_total)
            })
        })
        .collect();
    f.gauge(
        "hot_key_statements",
        "Statements placed by the key in the window (an estimate within SHOW HOT_KEYS' error), for the top hot_keys.top keys of each table group.",
        top.iter().map(|(l, count, _)| (l.clone(), *count as f64)),
    );
    f.gauge(
        "hot_key_group_share",
        "The key's share (0 to 1) of its table group's keyed statements in the window.",
        top.iter()
            .map(|(l, count, of)| (l.clone(), share(*count, *of))),
    );
    f.gauge(
        "shard_keyed_statements",
        "Statements placed on the shard by a sharding key in the hot-key window (one per key).",
        report
            .shards
            .iter()
            .enumerate()
            .map(|(s, n)| (vec![("shard", sh.shard_names[s].clone())], *n as f64)),
    );
    f.gauge(
        "shard_traffic_share",
        "The shard's share (0 to 1) of all keyed statements in the window: 1 / shards each when even.",
        report
            .shards
            .iter()
            .enumerate()
            .map(|(s, n)| (vec![("shard", sh.shard_names[s].clone())], share(*n, total))),
    );
}

/// Whether the proxy can serve writes: every shard has a primary that its
/// last health check reached. The shards without one, when not.
pub fn readiness(shared: &Shared) -> Result<(), Vec<(String, String)>> {
    let missing: Vec<(String, String)> = shared
        .topology
        .shards
        .iter()
        .filter_map(|s| match s.writer() {
            Ok(w) if !s.nodes[w].is_down() => None,
            Ok(w) => Some((
                s.name.clone(),
                format!("primary {} is down", s.nodes[w].address),
            )),
            Err(e) => Some((s.name.clone(), e.message)),
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[[users]]
name = "app"
password = "secret"
database = "app"

[[shards]]
name = "s0"
primary = { host = "127.0.0.1", port = 1 }
replicas = [{ host = "127.0.0.1", port = 2 }]

[[shards]]
name = "s1"
primary = { host = "127.0.0.1", port = 3 }

[[sharding.tables]]
name = "users"
column = "id"
"#;

    fn shared() -> Shared {
        let config = shardline_config::Config::from_toml(CONFIG, "test").expect("config");
        Shared::from_config(&config).expect("state")
    }

    #[tokio::test]
    async fn every_family_has_help_and_type_and_histograms_end_at_inf() {
        let shared = shared();
        shared
            .users
            .values()
            .next()
            .unwrap()
            .stats
            .query_time
            .observe(1_500);
        shared.topology.shards[0].latency[1].observe(700);
        shared.events.errors.count(b"42P01");
        let text = render(&shared);
        let mut typed = std::collections::HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                typed.insert(name.to_string(), kind.to_string());
            }
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|f| typed.get(*f).map(String::as_str) == Some("histogram"))
                })
                .unwrap_or(name);
            assert!(typed.contains_key(family), "{name} has no TYPE:\n{text}");
            assert!(
                text.contains(&format!("# HELP {family} ")),
                "{family} has no HELP"
            );
        }
        assert!(text.contains(
            "shardline_query_duration_seconds_bucket{user=\"app\",database=\"app\",le=\"0.0025\"} 1"
        ));
        assert!(text.contains(
            "shardline_query_duration_seconds_bucket{user=\"app\",database=\"app\",le=\"+Inf\"} 1"
        ));
        assert!(text.contains(
            "shardline_query_duration_seconds_sum{user=\"app\",database=\"app\"} 0.0015"
        ));
        assert!(text.contains(
            "shardline_shard_query_duration_seconds_count{shard=\"s0\",role=\"replica\"} 1"
        ));
        assert!(text.contains("shardline_errors_total{class=\"42\"} 1"));
        // Counters are named as written (the classic format: no suffix added).
        assert_eq!(typed["shardline_queries_total"], "counter");
        // Replicas only have lag; nodes not yet checked are listed.
        assert_eq!(text.matches("shardline_node_up{").count(), 3);
    }

    #[tokio::test]
    async fn ready_once_every_shard_has_a_primary_that_is_up() {
        // The proxy runs a health round before it listens; here none has
        // run and each shard's configured primary is taken as it is.
        assert_eq!(readiness(&shared()), Ok(()));
    }
}
