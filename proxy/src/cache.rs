//! The result cache: the exact bytes a cacheable read answered (its
//! RowDescription, DataRows and CommandComplete, with the ParseComplete
//! and BindComplete of an extended unit), kept per key for the tables'
//! lifetime and dropped as soon as a write through this proxy reaches one
//! of the tables it read.
//!
//! Safety rests on two rules kept under one lock:
//! - a write's tables are invalidated (their generation raised, their
//!   entries removed) before the write's ReadyForQuery reaches its client;
//! - a fill (a miss, read on the primary) is stored only if none of its
//!   tables was invalidated since the read was sent (`Ticket`): a result
//!   read before a write committed never outlives the write's invalidation.
//!
//! Bounded in bytes, in entries and per result; least recently used
//! entries go first. One process-wide instance, kept across reloads (a
//! reload clears it).

use bytes::Bytes;
use lru::LruCache;
use shardline_config::CacheConfig;
use shardline_router::cacheable::configured_id;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What an entry costs beyond its key and reply: the LRU's node, the map
/// slots, the table sets' copies of the key handle.
const ENTRY_OVERHEAD: usize = 160;

#[derive(Default)]
pub struct ResultCache {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Settings {
    max_bytes: usize,
    max_entries: usize,
    max_result_bytes: usize,
    ttl: HashMap<Box<str>, Duration>,
}

struct Inner {
    settings: Settings,
    entries: LruCache<Bytes, Entry>,
    bytes: usize,
    tables: HashMap<Box<str>, TableState>,
    /// Raised by a write that may touch any table.
    any_gen: u64,
    totals: Counters,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            settings: Settings::default(),
            entries: LruCache::unbounded(),
            bytes: 0,
            tables: HashMap::new(),
            any_gen: 0,
            totals: Counters::default(),
        }
    }
}

#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counters {
    pub hits: u64,
    pub misses: u64,
    /// Entries removed for room (or past their lifetime).
    pub evictions: u64,
    /// Writes that dropped the table's entries.
    pub invalidations: u64,
}

#[derive(Default)]
struct TableState {
    gen: u64,
    keys: HashSet<Bytes>,
    bytes: usize,
    counters: Counters,
}

struct Entry {
    reply: Bytes,
    expires: Instant,
    tables: Box<[Box<str>]>,
    cost: usize,
}

/// The tables' generations when a fill was sent.
#[derive(Debug)]
pub struct Ticket {
    any_gen: u64,
    gens: Vec<u64>,
}

pub enum Lookup {
    Hit(Bytes),
    Miss(Ticket),
}

/// One row of SHOW CACHE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableReport {
    pub table: String,
    pub ttl: Option<Duration>,
    pub entries: usize,
    pub bytes: usize,
    pub counters: Counters,
}

impl ResultCache {
    pub fn new(config: &CacheConfig) -> ResultCache {
        let cache = ResultCache::default();
        cache.configure(config);
        cache
    }

    /// Takes a (reloaded) configuration: every entry goes, and every fill
    /// in flight is not stored.
    pub fn configure(&self, config: &CacheConfig) {
        let mut inner = self.lock();
        inner.settings = Settings {
            max_bytes: config.max_bytes,
            max_entries: config.max_entries,
            max_result_bytes: config.max_result_bytes,
            ttl: config
                .tables
                .iter()
                .map(|t| (configured_id(&t.name), t.ttl))
                .collect(),
        };
        inner.drop_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The reply kept for `key`, or a ticket to fill it with.
    pub fn lookup(&self, key: &[u8], tables: &[Box<str>], now: Instant) -> Lookup {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let hit = match inner.entries.get(key) {
            Some(e) if e.expires > now => Some(e.reply.clone()),
            Some(_) => {
                inner.remove(key, true);
                None
            }
            None => None,
        };
        let hit_or_miss = |c: &mut Counters| match hit {
            Some(_) => c.hits += 1,
            None => c.misses += 1,
        };
        hit_or_miss(&mut inner.totals);
        let mut gens = Vec::with_capacity(tables.len());
        for t in tables {
            let state = inner.tables.entry(t.clone()).or_default();
            hit_or_miss(&mut state.counters);
            gens.push(state.gen);
        }
        match hit {
            Some(reply) => Lookup::Hit(reply),
            None => Lookup::Miss(Ticket {
                any_gen: inner.any_gen,
                gens,
            }),
        }
    }

    /// The lifetime of a result over `tables`: the hint's, else the
    /// shortest of the tables' (`None`: a table not listed, no hint).
    pub fn ttl(&self, tables: &[Box<str>], hint_ms: Option<u64>) -> Option<Duration> {
        if let Some(ms) = hint_ms {
            return Some(Duration::from_millis(ms));
        }
        let inner = self.lock();
        tables
            .iter()
            .map(|t| inner.settings.ttl.get(t).copied())
            .try_fold(Duration::MAX, |min, t| Some(min.min(t?)))
    }

    /// Whether a reply of `len` bytes may be kept.
    pub fn fits(&self, len: usize) -> bool {
        len <= self.lock().settings.max_result_bytes
    }

    /// Keeps a fill's reply, unless one of its tables was written since
    /// its ticket was taken. Returns whether it was kept.
    pub fn store(
        &self,
        key: Bytes,
        tables: &[Box<str>],
        ticket: Ticket,
        reply: Bytes,
        expires: Instant,
    ) -> bool {
        let mut inner = self.lock();
        let inner = &mut *inner;
        if ticket.any_gen != inner.any_gen || reply.len() > inner.settings.max_result_bytes {
            return false;
        }
        let current = tables
            .iter()
            .map(|t| inner.tables.get(t).map_or(0, |s| s.gen));
        if !current.eq(ticket.gens.iter().copied()) {
            return false;
        }
        let cost = key.len() + reply.len() + ENTRY_OVERHEAD + 16 * tables.len();
        if cost > inner.settings.max_bytes {
            return false;
        }
        inner.remove(&key, false);
        while inner.bytes + cost > inner.settings.max_bytes
            || inner.entries.len() >= inner.settings.max_entries
        {
            let Some(oldest) = inner.entries.peek_lru().map(|(k, _)| k.clone()) else {
                break;
            };
            inner.remove(&oldest, true);
        }
        for t in tables {
            let state = inner.tables.entry(t.clone()).or_default();
            state.keys.insert(key.clone());
            state.bytes += cost;
        }
        inner.bytes += cost;
        inner.entries.put(
            key,
            Entry {
                reply,
                expires,
                tables: tables.into(),
                cost,
            },
        );
        true
    }

    /// A write reached `tables`: their results go, and fills in flight
    /// over them are not stored.
    pub fn invalidate(&self, tables: &[Box<str>]) {
        let mut inner = self.lock();
        for t in tables {
            inner.drop_table(t, true);
        }
    }

    /// A write that may reach any table: every result goes.
    pub fn invalidate_all(&self) {
        let mut inner = self.lock();
        inner.drop_all();
        inner.totals.invalidations += 1;
    }

    /// CACHE CLEAR [table]: returns how many results went.
    pub fn clear(&self, table: Option<&str>) -> usize {
        let mut inner = self.lock();
        let before = inner.entries.len();
        match table {
            Some(t) => inner.drop_table(&configured_id(t), false),
            None => inner.drop_all(),
        }
        before - inner.entries.len()
    }

    /// (entries, bytes) held.
    pub fn usage(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.entries.len(), inner.bytes)
    }

    pub fn totals(&self) -> Counters {
        self.lock().totals
    }

    /// SHOW CACHE: the listed tables, then others seen (hinted statements).
    pub fn report(&self) -> Vec<TableReport> {
        let inner = self.lock();
        let mut names: Vec<&Box<str>> = inner.settings.ttl.keys().collect();
        let mut others: Vec<&Box<str>> = inner
            .tables
            .keys()
            .filter(|t| !inner.settings.ttl.contains_key(*t))
            .collect();
        names.sort();
        others.sort();
        names
            .into_iter()
            .chain(others)
            .map(|t| {
                let state = inner.tables.get(t);
                TableReport {
                    table: t.to_string(),
                    ttl: inner.settings.ttl.get(t).copied(),
                    entries: state.map_or(0, |s| s.keys.len()),
                    bytes: state.map_or(0, |s| s.bytes),
                    counters: state.map(|s| s.counters).unwrap_or_default(),
                }
            })
            .collect()
    }
}

impl Inner {
    /// Removes one entry (`evicted`: for room or age, counted).
    fn remove(&mut self, key: &[u8], evicted: bool) {
        let Some(entry) = self.entries.pop(key) else {
            return;
        };
        self.bytes -= entry.cost;
        if evicted {
            self.totals.evictions += 1;
        }
        for t in entry.tables.iter() {
            if let Some(state) = self.tables.get_mut(t) {
                state.keys.remove(key);
                state.bytes -= entry.cost;
                if evicted {
                    state.counters.evictions += 1;
                }
            }
        }
    }

    fn drop_table(&mut self, table: &str, by_write: bool) {
        let Some(state) = self.tables.get_mut(table) else {
            if by_write {
                // Not seen yet: a fill over it may be in flight (its ticket
                // holds generation 0).
                self.tables.insert(
                    table.into(),
                    TableState {
                        gen: 1,
                        ..Default::default()
                    },
                );
                self.totals.invalidations += 1;
            }
            return;
        };
        state.gen += 1;
        if by_write {
            state.counters.invalidations += 1;
            self.totals.invalidations += 1;
        }
        let keys: Vec<Bytes> = state.keys.drain().collect();
        for k in keys {
            self.remove(&k, false);
        }
    }

    fn drop_all(&mut self) {
        self.any_gen += 1;
        self.entries.clear();
        self.bytes = 0;
        for state in self.tables.values_mut() {
            state.keys.clear();
            state.bytes = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(tables: &[(&str, u64)], max_bytes: usize) -> CacheConfig {
        CacheConfig {
            max_bytes,
            max_entries: 1000,
            max_result_bytes: 1024,
            tables: tables
                .iter()
                .map(|(n, s)| shardline_config::CachedTable {
                    name: n.to_string(),
                    ttl: Duration::from_secs(*s),
                })
                .collect(),
            hints: false,
        }
    }

    fn names(t: &[&str]) -> Vec<Box<str>> {
        t.iter().map(|n| Box::from(*n)).collect()
    }

    /// A miss's ticket for `key` (panics on a hit).
    fn miss(c: &ResultCache, key: &str, tables: &[Box<str>]) -> Ticket {
        match c.lookup(key.as_bytes(), tables, Instant::now()) {
            Lookup::Miss(t) => t,
            Lookup::Hit(_) => panic!("expected a miss for {key}"),
        }
    }

    /// Stores `reply` for `key` with `ticket`, living `ttl`.
    fn keep(
        c: &ResultCache,
        key: &str,
        tables: &[Box<str>],
        ticket: Ticket,
        reply: &str,
        ttl: Duration,
    ) -> bool {
        c.store(
            Bytes::copy_from_slice(key.as_bytes()),
            tables,
            ticket,
            Bytes::copy_from_slice(reply.as_bytes()),
            Instant::now() + ttl,
        )
    }

    /// A miss filled at once, living a minute.
    fn fill(c: &ResultCache, key: &str, tables: &[Box<str>], reply: &str) -> bool {
        let ticket = miss(c, key, tables);
        keep(c, key, tables, ticket, reply, Duration::from_secs(60))
    }

    fn hit(c: &ResultCache, key: &str, tables: &[Box<str>]) -> Option<Bytes> {
        match c.lookup(key.as_bytes(), tables, Instant::now()) {
            Lookup::Hit(b) => Some(b),
            Lookup::Miss(_) => None,
        }
    }

    #[test]
    fn a_write_drops_its_tables_results_and_only_theirs() {
        let c = ResultCache::new(&config(&[("a", 60), ("Public.B", 30)], 1 << 20));
        let (a, b, ab) = (names(&["a"]), names(&["b"]), names(&["a", "b"]));
        assert!(fill(&c, "qa", &a, "ra"));
        assert!(fill(&c, "qb", &b, "rb"));
        assert!(fill(&c, "qab", &ab, "rab"));
        assert_eq!(hit(&c, "qa", &a).as_deref(), Some(&b"ra"[..]));
        c.invalidate(&names(&["b"]));
        assert!(hit(&c, "qb", &b).is_none());
        assert!(hit(&c, "qab", &ab).is_none());
        assert_eq!(hit(&c, "qa", &a).as_deref(), Some(&b"ra"[..]));
        assert_eq!(c.usage().0, 1);
        let report = c.report();
        assert_eq!(report[1].table, "b");
        assert_eq!(report[1].ttl, Some(Duration::from_secs(30)));
        assert_eq!(report[1].counters.invalidations, 1);
        assert_eq!(c.ttl(&ab, None), Some(Duration::from_secs(30)));
        assert_eq!(c.ttl(&names(&["c"]), None), None);
        assert_eq!(
            c.ttl(&names(&["c"]), Some(5)),
            Some(Duration::from_millis(5))
        );
    }

    /// A fill whose read was sent before a write's invalidation is not
    /// kept: it may hold rows from before the write.
    #[test]
    fn a_fill_raced_by_a_write_is_not_kept() {
        let c = ResultCache::new(&config(&[("a", 60)], 1 << 20));
        let a = names(&["a"]);
        let ticket = miss(&c, "q", &a);
        c.invalidate(&a);
        let minute = Duration::from_secs(60);
        assert!(!keep(&c, "q", &a, ticket, "old", minute));
        assert!(hit(&c, "q", &a).is_none());
        // The same for a table never seen before the write, and for a
        // write to any table.
        let n = names(&["new"]);
        let ticket = miss(&c, "q2", &n);
        c.invalidate_all();
        assert!(!keep(&c, "q2", &n, ticket, "x", minute));
    }

    /// A reload's configuration empties the cache, and a fill sent before
    /// it is not kept (its tables' lifetimes may have changed).
    #[test]
    fn a_new_configuration_empties_the_cache() {
        let c = ResultCache::new(&config(&[("a", 60)], 1 << 20));
        let a = names(&["a"]);
        assert!(fill(&c, "q", &a, "r"));
        let ticket = miss(&c, "q2", &a);
        c.configure(&config(&[("a", 5)], 1 << 20));
        assert_eq!(c.usage(), (0, 0));
        assert!(!keep(&c, "q2", &a, ticket, "r", Duration::from_secs(5)));
        assert_eq!(c.ttl(&a, None), Some(Duration::from_secs(5)));
    }

    #[test]
    fn bounded_in_bytes_entries_and_result_size_and_aged() {
        let per = 1 + 2 + ENTRY_OVERHEAD + 16;
        let c = ResultCache::new(&config(&[("a", 60)], 3 * per));
        let a = names(&["a"]);
        for k in ["1", "2", "3"] {
            assert!(fill(&c, k, &a, "rr"));
        }
        assert!(hit(&c, "1", &a).is_some()); // "2" is now the oldest
        assert!(fill(&c, "4", &a, "rr"));
        assert!(hit(&c, "2", &a).is_none());
        assert!(hit(&c, "1", &a).is_some());
        assert_eq!(c.usage(), (3, 3 * per));
        assert_eq!(c.totals().evictions, 1);
        assert!(!fill(&c, "big", &a, &"x".repeat(2000)));
        // Past its lifetime an entry is gone.
        let ticket = miss(&c, "old", &a);
        assert!(keep(&c, "old", &a, ticket, "r", Duration::ZERO));
        assert!(hit(&c, "old", &a).is_none());
        // Its room (one byte more than an entry of the others) cost two.
        assert_eq!(c.clear(None), 1);
        assert_eq!(c.usage(), (0, 0));
    }
}
