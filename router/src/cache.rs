//! Parse once: routing results cached by statement text in a bounded LRU.
//! Prepared statements are classified once, when they are parsed.

use crate::classify::{classify, Class, Options, Source};
use crate::hint::{leading_hint, RoleHint};
use lru::LruCache;
use std::num::NonZeroUsize;

/// What the router decided for one statement text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Route {
    pub class: Class,
    pub source: Source,
    /// A leading-comment hint, which overrides the class for choosing a node.
    pub role_hint: Option<RoleHint>,
}

/// Counters for observability (parse-cache hit rate, parser fallbacks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouterStats {
    pub hits: u64,
    pub misses: u64,
    pub fallbacks: u64,
}

/// Classification with a cache in front.
pub struct Router {
    options: Options,
    cache: LruCache<Box<str>, Route>,
    stats: RouterStats,
    /// Reused buffer for cache keys.
    key: String,
}

impl Router {
    pub fn new(options: Options, capacity: usize) -> Router {
        let capacity = NonZeroUsize::new(capacity.max(1)).expect("at least one");
        Router {
            options,
            cache: LruCache::new(capacity),
            stats: RouterStats::default(),
            key: String::new(),
        }
    }

    /// Routes a statement, from the cache when one of the same shape was
    /// seen before (`shape`: the same text up to constant values).
    pub fn route(&mut self, sql: &str) -> Route {
        shape(sql, &mut self.key);
        if let Some(r) = self.cache.get(self.key.as_str()) {
            self.stats.hits += 1;
            return *r;
        }
        self.stats.misses += 1;
        let route = route_uncached(sql, &self.options);
        if route.source == Source::Fallback {
            self.stats.fallbacks += 1;
        }
        self.cache.put(self.key.as_str().into(), route);
        route
    }

    pub fn stats(&self) -> RouterStats {
        self.stats
    }
}

/// The cache key of a statement: its text with every constant (number,
/// string, dollar-quoted string) replaced by a placeholder, so statements
/// that differ only in constants (`WHERE aid = 17`, `WHERE aid = 42`) share
/// one entry. A constant's value never changes the class; comments, which
/// carry hints, are kept.
pub fn shape(sql: &str, out: &mut String) {
    out.clear();
    let b = sql.as_bytes();
    let mut copied = 0;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let word = |x: u8| x.is_ascii_alphanumeric() || x == b'_' || x == b'$' || x >= 0x80;
        let (end, placeholder) = match c {
            b'\'' => (crate::lexer::skip_token(b, i), Some("''")),
            b'$' => match crate::lexer::skip_token(b, i) {
                j if j > i + 1 => (j, Some("''")),
                _ => (i + 1, None),
            },
            b'0'..=b'9' if i == 0 || !word(b[i - 1]) => {
                // A number: digits, '.', exponent (with sign), hex/underscores.
                let mut j = i + 1;
                while j < b.len()
                    && (word(b[j])
                        || b[j] == b'.'
                        || ((b[j] == b'+' || b[j] == b'-') && matches!(b[j - 1], b'e' | b'E')))
                {
                    j += 1;
                }
                (j, Some("0"))
            }
            b'"' | b'-' | b'/' => (crate::lexer::skip_token(b, i), None),
            _ => (i + 1, None),
        };
        if let Some(p) = placeholder {
            out.push_str(&sql[copied..i]);
            out.push_str(p);
            copied = end;
        }
        i = end;
    }
    out.push_str(&sql[copied..]);
}

/// Classifies without the cache.
pub fn route_uncached(sql: &str, options: &Options) -> Route {
    let (class, source) = classify(sql, options);
    Route {
        class,
        source,
        role_hint: leading_hint(sql).and_then(|h| h.role),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut r = Router::new(Options::default(), 2);
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
}
