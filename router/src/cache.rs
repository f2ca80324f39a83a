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
}

impl Router {
    pub fn new(options: Options, capacity: usize) -> Router {
        let capacity = NonZeroUsize::new(capacity.max(1)).expect("at least one");
        Router {
            options,
            cache: LruCache::new(capacity),
            stats: RouterStats::default(),
        }
    }

    /// Routes a statement, from the cache when it was seen before.
    pub fn route(&mut self, sql: &str) -> Route {
        if let Some(r) = self.cache.get(sql) {
            self.stats.hits += 1;
            return *r;
        }
        self.stats.misses += 1;
        let route = route_uncached(sql, &self.options);
        if route.source == Source::Fallback {
            self.stats.fallbacks += 1;
        }
        self.cache.put(sql.into(), route);
        route
    }

    pub fn stats(&self) -> RouterStats {
        self.stats
    }
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
        r.route("SELECT 2");
        r.route("SELECT 3"); // evicts the least recently used
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
