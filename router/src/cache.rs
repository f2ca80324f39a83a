//! Parse once: routing results cached by statement text in a bounded LRU.
//! Prepared statements are classified once, when they are parsed.

use crate::classify::{classify_parsed, fallback, Class, Options, Source};
use crate::hint::{leading_hint, RoleHint};
use crate::sharding::Sharding;
use crate::shards::{analyze, analyze_unparsed, Constants, Template};
use lru::LruCache;
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// What the router decided for one statement text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    pub class: Class,
    pub source: Source,
    /// A leading-comment hint, which overrides the class for choosing a node.
    pub role_hint: Option<RoleHint>,
    /// Where each statement's rows live (when there are several shards).
    pub shards: Option<Arc<[Template]>>,
    /// One statement placed by one key and nothing else
    /// (`shards::one_key`): placed without the general path's steps.
    pub one_key: Option<crate::shards::OneKey>,
    /// State the statements leave on their server connection after the
    /// transaction (`classify::session_state`), which pooling must keep
    /// from other clients.
    pub session_state: Option<&'static str>,
    /// The text may change the session (SET, RESET, DISCARD, DEALLOCATE,
    /// LISTEN, DECLARE) or holds several statements
    /// (`effect::may_have_effects`): only then does the proxy look for
    /// its effects. Texts of one shape share their keywords and the
    /// semicolons between their statements, so the first one decides.
    pub effects: bool,
    /// What the statements mean to the result cache (`cacheable.rs`),
    /// read with [`Route::cache_use`]; `None` while it is off or when they
    /// mean nothing to it (one word: every statement's route carries it).
    pub cache: Option<Arc<crate::cacheable::CacheUse>>,
}

impl Route {
    /// The statements write reference tables only: every shard holds the
    /// same rows and answers the same, so one shard's answer stands for all.
    pub fn writes_reference_tables(&self) -> bool {
        self.shards.as_ref().is_some_and(|t| {
            !t.is_empty()
                && t.iter()
                    .all(|t| t.write && matches!(t.scope, crate::shards::Scope::Reference))
        })
    }

    /// What the statements mean to the result cache.
    pub fn cache_use(&self) -> &crate::cacheable::CacheUse {
        self.cache
            .as_deref()
            .unwrap_or(&crate::cacheable::CacheUse::None)
    }
}

/// Counters for observability (parse-cache hit rate, parser fallbacks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouterStats {
    pub hits: u64,
    pub misses: u64,
    pub fallbacks: u64,
}

/// Classification with a cache in front, bounded in entries and in bytes,
/// for one thread (tests, benchmarks); the proxy's sessions share a
/// [`SharedRouter`].
pub struct Router {
    /// The shared router with a single segment: one LRU, as the proxy's
    /// is per segment.
    shared: SharedRouter,
}

/// Statements whose shape is longer than this are routed without being
/// cached (parsed each time): one would take the room of many.
pub const MAX_CACHED_STATEMENT: usize = 64 * 1024;

/// The default bound on the cache's bytes.
pub const DEFAULT_CACHE_BYTES: usize = 64 * 1024 * 1024;

/// What one cache entry costs, roughly: its key, the route and its
/// templates, the LRU's bookkeeping.
fn entry_bytes(key: &str, route: &Route) -> usize {
    let templates = route.shards.as_ref().map_or(0, |t| t.len());
    key.len() + 160 + 256 * templates
}

/// A cache of routes by shape, bounded in entries and in estimated bytes
/// (least recently used entries go first).
struct Segment {
    cache: LruCache<Box<str>, Route>,
    bytes: usize,
    max_bytes: usize,
}

impl Segment {
    fn new(capacity: usize, max_bytes: usize) -> Segment {
        Segment {
            cache: LruCache::new(NonZeroUsize::new(capacity.max(1)).expect("at least one")),
            bytes: 0,
            max_bytes: max_bytes.max(1),
        }
    }

    fn get(&mut self, key: &str) -> Option<Route> {
        self.cache.get(key).cloned()
    }

    /// Caches a route unless its shape is too long.
    fn put(&mut self, key: &str, route: &Route) {
        if key.len() > MAX_CACHED_STATEMENT {
            return;
        }
        let size = entry_bytes(key, route);
        if let Some((k, old)) = self.cache.push(key.into(), route.clone()) {
            self.bytes -= entry_bytes(&k, &old);
        }
        self.bytes += size;
        while self.bytes > self.max_bytes {
            match self.cache.pop_lru() {
                Some((k, old)) => self.bytes -= entry_bytes(&k, &old),
                None => break,
            }
        }
    }
}

impl Router {
    /// `sharding`: set when there are several shards (statements are then
    /// also analysed for their shards).
    pub fn new(options: Options, capacity: usize, sharding: Option<Arc<Sharding>>) -> Router {
        Router {
            shared: SharedRouter::with_segments(
                options,
                capacity,
                DEFAULT_CACHE_BYTES,
                sharding,
                1,
            ),
        }
    }

    /// Bounds the cache's bytes (least recently used entries go first).
    pub fn with_max_bytes(self, max_bytes: usize) -> Router {
        for segment in self.shared.segments.iter() {
            segment.lock().unwrap_or_else(|p| p.into_inner()).max_bytes = max_bytes.max(1);
        }
        self
    }

    /// The cache's entries and estimated bytes.
    pub fn cache_usage(&self) -> (usize, usize) {
        self.shared.cache_usage()
    }

    /// Routes a statement, from the cache when one of the same shape was
    /// seen before (`shape`: the same text up to constant values).
    pub fn route(&mut self, sql: &str) -> Route {
        self.shared.route(sql)
    }

    pub fn stats(&self) -> RouterStats {
        self.shared.stats()
    }
}

/// The router as the proxy's sessions share it: the cache is cut into
/// segments by the shape's hash, each behind its own lock, taken only to
/// look up or to store. A statement is shaped and parsed with no lock
/// held, so a cache miss (a parse, milliseconds for a long statement) on
/// one client never holds up another client's hit.
pub struct SharedRouter {
    uncached: Uncached,
    segments: Box<[std::sync::Mutex<Segment>]>,
    /// (A session's [`ShapeMemo`](crate::memo::ShapeMemo) counts its hits
    /// here too.)
    pub(crate) hits: AtomicU64,
    misses: AtomicU64,
    fallbacks: AtomicU64,
}

/// Segments of a [`SharedRouter`]'s cache.
const SEGMENTS: usize = 16;

impl SharedRouter {
    /// As [`Router::new`] with [`Router::with_max_bytes`]: `capacity`
    /// entries and `max_bytes` in all, shared evenly by the segments.
    pub fn new(
        options: Options,
        capacity: usize,
        max_bytes: usize,
        sharding: Option<Arc<Sharding>>,
    ) -> SharedRouter {
        SharedRouter::with_segments(options, capacity, max_bytes, sharding, SEGMENTS)
    }

    fn with_segments(
        options: Options,
        capacity: usize,
        max_bytes: usize,
        sharding: Option<Arc<Sharding>>,
        segments: usize,
    ) -> SharedRouter {
        let segments = (0..segments)
            .map(|_| {
                std::sync::Mutex::new(Segment::new(
                    capacity.div_ceil(segments),
                    max_bytes.div_ceil(segments),
                ))
            })
            .collect();
        SharedRouter {
            uncached: Uncached { options, sharding },
            segments,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
        }
    }

    /// Routes a statement, from the cache when one of the same shape was
    /// seen before.
    pub fn route(&self, sql: &str) -> Route {
        thread_local! {
            static CONSTANTS: std::cell::RefCell<Vec<(usize, usize)>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        CONSTANTS.with(|c| self.route_noting(sql, &mut c.borrow_mut()))
    }

    /// [`route`](Self::route), also noting where each constant of `sql`
    /// is (see [`shape_noting`]).
    pub fn route_noting(&self, sql: &str, constants: &mut Vec<(usize, usize)>) -> Route {
        thread_local! {
            static KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        KEY.with(|key| {
            let mut key = key.borrow_mut();
            shape_noting(sql, &mut key, constants);
            let segment = &self.segments[segment_of(&key) % self.segments.len()];
            let lock = || segment.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(route) = lock().get(&key) {
                self.hits.fetch_add(1, Relaxed);
                return route;
            }
            let route = self.uncached.route(sql);
            self.misses.fetch_add(1, Relaxed);
            if route.source == Source::Fallback {
                self.fallbacks.fetch_add(1, Relaxed);
            }
            lock().put(&key, &route);
            route
        })
    }

    pub fn stats(&self) -> RouterStats {
        RouterStats {
            hits: self.hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
            fallbacks: self.fallbacks.load(Relaxed),
        }
    }

    /// The cache's entries and estimated bytes, over all segments.
    pub fn cache_usage(&self) -> (usize, usize) {
        self.segments.iter().fold((0, 0), |(n, b), s| {
            let s = s.lock().unwrap_or_else(|p| p.into_inner());
            (n + s.cache.len(), b + s.bytes)
        })
    }
}

/// A shape's hash, which picks its segment: a multiply per 8 bytes of the key
/// (segments need spread, not resistance to chosen keys).
fn segment_of(key: &str) -> usize {
    let mix = |h: u64, word: u64| (h.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    let mut h: u64 = key.len() as u64;
    let mut chunks = key.as_bytes().chunks_exact(8);
    for chunk in &mut chunks {
        // (Whole words read in place: a copy per word was a call to memcpy.)
        h = mix(h, u64::from_le_bytes(chunk.try_into().unwrap_or_default()));
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        let mut word = [0u8; 8];
        word[..tail.len()].copy_from_slice(tail);
        h = mix(h, u64::from_le_bytes(word));
    }
    (h >> 32) as usize
}

/// What routing a statement needs, without the cache: owned, so it can be
/// sent to another thread.
#[derive(Debug, Clone)]
struct Uncached {
    options: Options,
    sharding: Option<Arc<Sharding>>,
}

impl Uncached {
    fn route(&self, sql: &str) -> Route {
        route_uncached(sql, &self.options, self.sharding.as_deref())
    }
}

/// The cache key of a statement: its text with every constant (number,
/// string, dollar-quoted string) replaced by a placeholder, so statements
/// that differ only in constants (`WHERE aid = 17`, `WHERE aid = 42`) share
/// one entry. A constant's value never changes the class; comments, which
/// carry hints, are kept.
pub fn shape(sql: &str, out: &mut String) {
    shape_noting(sql, out, &mut Vec::new());
}

/// [`shape`], also noting where each constant of `sql` is (`constants`,
/// cleared first): the key of a statement is read from them
/// (`KeyInput::constants`) without scanning the text again.
///
/// Block comments other than routing hints (`/* shardline: ... */`) are
/// blanked too (`/**/`): tracing tags such as sqlcommenter's
/// `/*traceparent='00-...'*/` differ on every statement and would
/// otherwise make each one a cache miss.
pub fn shape_noting(sql: &str, out: &mut String, constants: &mut Vec<(usize, usize)>) {
    out.clear();
    constants.clear();
    let mut copied = 0;
    crate::lexer::scan_tokens(sql, |spot| match spot {
        crate::lexer::Spot::Constant(start, end) => {
            constants.push((start, end));
            out.push_str(&sql[copied..start]);
            out.push_str(if sql.as_bytes()[start].is_ascii_digit() {
                "0"
            } else {
                "''"
            });
            copied = end;
        }
        crate::lexer::Spot::Comment(start, end) => {
            let text = &sql[start..end];
            let closed = text.len() >= 4 && text.ends_with("*/");
            if closed
                && !text[2..text.len() - 2]
                    .trim_start()
                    .starts_with("shardline:")
            {
                out.push_str(&sql[copied..start]);
                out.push_str("/**/");
                copied = end;
            }
        }
    });
    out.push_str(&sql[copied..]);
}

/// Classifies (and, with `sharding`, analyses) without the cache: one parse.
pub fn route_uncached(sql: &str, options: &Options, sharding: Option<&Sharding>) -> Route {
    let hint = leading_hint(sql);
    let mut parsed = Parser::parse_sql(&PostgreSqlDialect {}, sql);
    if let Ok(statements) = parsed.as_mut() {
        crate::shards::unwrap_only(statements);
    }
    let (class, source) = match &parsed {
        Ok(statements) => (classify_parsed(statements, options), Source::Parsed),
        Err(_) => (fallback(sql), Source::Fallback),
    };
    let shards = sharding.map(|sh| {
        let mut templates: Vec<Template> = match &parsed {
            Ok(statements) if !statements.is_empty() => {
                let consts = Constants::new(sql);
                statements.iter().map(|s| analyze(s, &consts, sh)).collect()
            }
            Ok(_) => vec![],
            Err(e) => vec![analyze_unparsed(sql, &e.to_string(), sh)],
        };
        if let Some(first) = templates.first_mut() {
            first.hint = hint
                .clone()
                .filter(|h| h.shard.is_some() || h.key.is_some());
        }
        Arc::from(templates)
    });
    let cache = match (&options.cache, &parsed) {
        (None, _) => crate::cacheable::CacheUse::None,
        (Some(tables), Ok(statements)) => crate::cacheable::cache_use(
            statements,
            class,
            options,
            hint.as_ref().and_then(|h| h.cache),
            tables,
        ),
        (Some(_), Err(_)) => crate::cacheable::unparsed_use(class),
    };
    let cache = (cache != crate::cacheable::CacheUse::None).then(|| Arc::new(cache));
    // A statement the router refuses never runs, so it leaves nothing on
    // a connection (preparing it pins no one).
    let refused = shards
        .as_deref()
        .is_some_and(|t: &[crate::shards::Template]| t.iter().any(|t| t.refusal.is_some()));
    Route {
        class,
        source,
        role_hint: hint.and_then(|h| h.role),
        one_key: shards.as_deref().and_then(crate::shards::one_key),
        shards,
        session_state: crate::classify::session_state(sql).filter(|_| !refused),
        effects: crate::effect::may_have_effects(sql),
        cache,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sqlcommenter's tags (a new traceparent per statement) share one
    /// cache entry; routing hints keep theirs, and constants are still
    /// found where they are in the text.
    #[test]
    fn comments_other_than_hints_do_not_split_the_cache() {
        let shaped = |sql: &str| {
            let (mut out, mut constants) = (String::new(), Vec::new());
            shape_noting(sql, &mut out, &mut constants);
            (out, constants)
        };
        let a = "SELECT * FROM t WHERE id = 7 /*traceparent='00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'*/";
        let b = "SELECT * FROM t WHERE id = 8 /*traceparent='00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'*/";
        let (sa, ca) = shaped(a);
        assert_eq!(sa, shaped(b).0);
        assert_eq!(sa, "SELECT * FROM t WHERE id = 0 /**/");
        assert_eq!(ca, vec![(27, 28)], "the quoted trace id is no constant");
        let leading = "/* controller='index',traceparent='00-a-b-01' */ SELECT 1";
        assert_eq!(shaped(leading).0, "/**/ SELECT 0");
        let hinted = shaped("/* shardline: shard=s1 */ SELECT 1").0;
        assert_eq!(hinted, "/* shardline: shard=s1 */ SELECT 0");
        assert_ne!(hinted, shaped("/* shardline: shard=s0 */ SELECT 1").0);
        // An unterminated comment stays as written.
        assert_eq!(shaped("SELECT 1 /* open").0, "SELECT 0 /* open");
        let mut r = Router::new(Options::default(), 100, None);
        r.route(a);
        r.route(b);
        assert_eq!((r.stats().hits, r.stats().misses), (1, 1));
    }

    /// Distinct large statements fill the cache up to its byte bound, not
    /// its entry count; statements above `MAX_CACHED_STATEMENT` are not
    /// kept at all; the routes stay right either way.
    #[test]
    fn the_cache_is_bounded_in_bytes() {
        let mut r = Router::new(Options::default(), 10_000, None).with_max_bytes(1 << 20);
        let pad = "x".repeat(20_000);
        for i in 0..500 {
            let route = r.route(&format!("SELECT col_{pad}_{i} FROM t"));
            assert_eq!(route.class, Class::Read);
        }
        let (entries, bytes) = r.cache_usage();
        assert!(bytes <= 1 << 20, "{bytes} bytes");
        assert!((40..=60).contains(&entries), "{entries} entries");
        let huge = format!("UPDATE t SET a = 1 WHERE b_{} = 2", "y".repeat(100_000));
        assert_eq!(r.route(&huge).class, Class::Write);
        assert_eq!(r.route(&huge).class, Class::Write);
        assert_eq!(
            r.stats().hits,
            0,
            "a statement above the limit is not cached"
        );
    }

    fn key(sql: &str) -> String {
        let mut k = String::new();
        shape(sql, &mut k);
        k
    }

    #[test]
    fn constants_do_not_change_the_shape() {
        assert_eq!(
            key("SELECT abalance FROM pgbench_accounts WHERE aid = 17;"),
            key("SELECT abalance FROM pgbench_accounts WHERE aid = 90210;")
        );
        assert_eq!(
            key("SELECT 'it''s', E'a\\'b', $$x$$, 1.5e-3, t1.c2 FROM t1"),
            "SELECT '', E'', '', 0, t1.c2 FROM t1"
        );
        // Parameters, identifiers with digits, quoted names and comments stay.
        assert_eq!(
            key("SELECT $1, \"9x\" FROM a1 /* shardline: role=primary */"),
            "SELECT $1, \"9x\" FROM a1 /* shardline: role=primary */"
        );
        assert_ne!(key("SELECT 1"), key("SELECT 1 FOR UPDATE"));
    }

    #[test]
    fn caches_and_counts() {
        let mut r = Router::new(Options::default(), 2, None);
        assert_eq!(r.route("SELECT 1").class, Class::Read);
        assert_eq!(r.route("SELECT 1").class, Class::Read);
        assert_eq!(
            r.route("IMPORT FOREIGN SCHEMA public FROM SERVER remote INTO local")
                .source,
            Source::Fallback
        );
        r.route("SELECT 2 AS b");
        r.route("SELECT 3 AS c"); // evicts the least recently used
        assert_eq!(
            r.stats(),
            RouterStats {
                hits: 1,
                misses: 4,
                fallbacks: 1
            }
        );
        let hinted = r.route("/* shardline: role=primary */ SELECT 1");
        assert_eq!(
            (hinted.class, hinted.role_hint),
            (Class::Read, Some(RoleHint::Primary))
        );
    }

    /// The shared router routes as the single-threaded one does, counts
    /// alike, keeps its bounds over all segments, and serves many threads
    /// at once (a miss parses with no lock held).
    #[test]
    fn the_shared_router_routes_and_bounds_as_one() {
        let shared = SharedRouter::new(Options::default(), 10_000, 1 << 20, None);
        let mut one = Router::new(Options::default(), 10_000, None).with_max_bytes(1 << 20);
        let texts = [
            "SELECT 1",
            "SELECT 2",
            "UPDATE t SET a = 1",
            "/* shardline: role=primary */ SELECT 1",
            "IMPORT FOREIGN SCHEMA public FROM SERVER remote INTO local",
        ];
        for t in texts.iter().chain(texts.iter()) {
            assert_eq!(shared.route(t), one.route(t), "{t}");
        }
        assert_eq!(shared.stats(), one.stats());
        let pad = "x".repeat(20_000);
        std::thread::scope(|s| {
            for thread in 0..4 {
                let (shared, pad) = (&shared, &pad);
                s.spawn(move || {
                    for i in 0..200 {
                        let route = shared.route(&format!("SELECT col_{pad}_{thread}_{i} FROM t"));
                        assert_eq!(route.class, Class::Read);
                    }
                });
            }
        });
        let (entries, bytes) = shared.cache_usage();
        assert!(bytes <= (1 << 20) + SEGMENTS * 21_000, "{bytes} bytes");
        assert!(entries < 100, "{entries} entries");
        let stats = shared.stats();
        assert_eq!(stats.hits + stats.misses, 10 + 800);
    }

    /// Shapes spread over every segment.
    #[test]
    fn shapes_spread_over_the_segments() {
        let mut used = [0usize; SEGMENTS];
        for i in 0..1600 {
            used[segment_of(&format!("SELECT c{i} FROM t WHERE id = $1")) % SEGMENTS] += 1;
        }
        assert!(used.iter().all(|&n| (50..=150).contains(&n)), "{used:?}");
    }

    /// Whole words and the tail mix as one zero-padded word per 8 bytes.
    #[test]
    fn a_shape_hashes_as_padded_words() {
        let padded = |key: &str| {
            let mut h: u64 = key.len() as u64;
            for chunk in key.as_bytes().chunks(8) {
                let mut word = [0u8; 8];
                word[..chunk.len()].copy_from_slice(chunk);
                h = (h.rotate_left(5) ^ u64::from_le_bytes(word))
                    .wrapping_mul(0x517c_c1b7_2722_0a95);
            }
            (h >> 32) as usize
        };
        let text = "SELECT abalance FROM pgbench_accounts WHERE aid = 0";
        for n in 0..=text.len() {
            assert_eq!(segment_of(&text[..n]), padded(&text[..n]), "{n}");
        }
    }
}
