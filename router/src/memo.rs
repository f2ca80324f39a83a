//! A session's memory of the statement texts it routed last. Applications
//! send the same few statements over and over with other constants; a text
//! that differs from a remembered one only inside its constants has the
//! same shape, so it takes the remembered route, and its constants' places
//! are read as the text is compared, without shaping the text or looking
//! it up in the shared cache.
//!
//! A text matches a remembered one when it is the remembered text with
//! each constant replaced by a constant of the same kind (a number by a
//! number, a quoted string by a quoted string, a dollar-quoted one by a
//! dollar-quoted one), every byte between them the same. The constants are
//! found by the lexer's own rules (`lexer::number_end`, `lexer::skip_token`)
//! at the places the remembered text had them. The lexer decides a token
//! from its first byte and the byte before it, so with the same bytes
//! before and the same kind of first byte, it finds the same tokens and
//! the shapes are equal. A remembered text has a byte between any two of
//! its constants (so the byte before each is one of its own), and nothing
//! else is assumed: anything that does not match exactly is routed
//! through the shared cache. Debug builds check every match against the
//! shapes.

use crate::cache::{Route, SharedRouter};
use crate::lexer;
use std::sync::atomic::Ordering::Relaxed;

/// Texts remembered per session: a loop of statements up to this long is
/// routed from memory after its first turn. pgbench's read/write script
/// has eleven shapes (a negative constant is an operator and a number, so
/// each of its four statements with `:delta` comes in two).
pub const ENTRIES: usize = 16;
/// The longest text remembered, in bytes (a session holds at most
/// `ENTRIES` of them).
pub const MAX_TEXT: usize = 1024;

/// Where a constant is in a text: start and end offsets.
type Span = (usize, usize);

/// The last texts a session routed, with their routes and constants.
#[derive(Default)]
pub struct ShapeMemo {
    entries: Vec<Entry>,
    /// Where the next search starts: after the last match, so a session
    /// that runs a loop of statements finds the next one first.
    next: usize,
    /// Where the next text is kept when all places are taken.
    victim: usize,
    /// The router the routes came from (its address; the memory is
    /// dropped when another one routes).
    router: usize,
}

struct Entry {
    text: Box<str>,
    constants: Box<[Span]>,
    route: Route,
}

impl ShapeMemo {
    /// [`SharedRouter::route_noting`]: `sql`'s route, with `constants`
    /// set to where its constants are, from a remembered text of the same
    /// shape when there is one (counted as a hit of the router's cache),
    /// else from the router (and remembered).
    pub fn route_noting(
        &mut self,
        router: &SharedRouter,
        sql: &str,
        constants: &mut Vec<Span>,
    ) -> Route {
        let id = router as *const SharedRouter as usize;
        if self.router != id {
            self.forget();
            self.router = id;
        }
        if let Some(i) = self.find(sql.as_bytes(), constants) {
            let entry = &self.entries[i];
            #[cfg(debug_assertions)]
            entry.check(sql, constants);
            self.next = (i + 1) % self.entries.len();
            router.hits.fetch_add(1, Relaxed);
            return entry.route.clone();
        }
        let route = router.route_noting(sql, constants);
        self.remember(sql, constants, &route);
        route
    }

    /// The remembered text `sql` matches, searched from `next`;
    /// `constants` gets where its constants are.
    fn find(&self, sql: &[u8], constants: &mut Vec<Span>) -> Option<usize> {
        let n = self.entries.len();
        (0..n)
            .map(|k| (self.next + k) % n)
            .find(|&i| self.entries[i].matches(sql, constants))
    }

    /// Forgets every text (the router's settings may have changed).
    pub fn forget(&mut self) {
        self.entries.clear();
        self.next = 0;
        self.victim = 0;
    }

    fn remember(&mut self, sql: &str, constants: &[Span], route: &Route) {
        // A block comment is compared byte for byte, where the shape
        // blanks it: a tracing tag (sqlcommenter's traceparent) differs on
        // every statement, and each would evict a text that repeats.
        if sql.len() > MAX_TEXT || sql.contains("/*") {
            return;
        }
        // A byte of the text between any two constants (the lexer reads
        // the byte before a constant to tell where it starts).
        let mut end = 0;
        for (k, &(start, stop)) in constants.iter().enumerate() {
            if k > 0 && start <= end {
                return;
            }
            end = stop;
        }
        let entry = Entry {
            text: sql.into(),
            constants: constants.into(),
            route: route.clone(),
        };
        if self.entries.len() < ENTRIES {
            self.entries.push(entry);
            self.next = self.entries.len() - 1;
        } else {
            self.entries[self.victim] = entry;
            self.next = self.victim;
            self.victim = (self.victim + 1) % ENTRIES;
        }
    }
}

impl Entry {
    /// Whether `text` is this entry's text with other constants of the
    /// same kinds; `constants` gets where they are.
    fn matches(&self, text: &[u8], constants: &mut Vec<Span>) -> bool {
        constants.clear();
        let had = self.text.as_bytes();
        let (mut at, mut from) = (0usize, 0);
        for &(start, stop) in self.constants.iter() {
            let between = &had[from..start];
            let end = at + between.len();
            if text.get(at..end) != Some(between) {
                return false;
            }
            at = end;
            let Some(&first) = text.get(at) else {
                return false;
            };
            let ends = match had[start] {
                b'0'..=b'9' if first.is_ascii_digit() => lexer::number_end(text, at),
                b'\'' if first == b'\'' => lexer::skip_token(text, at),
                b'$' if first == b'$' => match lexer::skip_token(text, at) {
                    j if j > at + 1 => j,
                    _ => return false,
                },
                _ => return false,
            };
            constants.push((at, ends));
            at = ends;
            from = stop;
        }
        text.get(at..) == Some(&had[from..])
    }

    /// (Debug builds.) A match has the remembered text's shape, and its
    /// constants where the shape finds them.
    #[cfg(debug_assertions)]
    fn check(&self, text: &str, constants: &[Span]) {
        let (mut had, mut has) = (String::new(), String::new());
        let (mut had_constants, mut has_constants) = (Vec::new(), Vec::new());
        crate::cache::shape_noting(&self.text, &mut had, &mut had_constants);
        crate::cache::shape_noting(text, &mut has, &mut has_constants);
        debug_assert_eq!(
            (&has, &has_constants[..]),
            (&had, constants),
            "a remembered text's match has its shape: {:?} against {:?}",
            text,
            self.text
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::shape_noting;
    use crate::Options;

    /// A router, a memory, and a second router that sees the same texts
    /// without a memory: the answer to compare with.
    struct Check {
        router: SharedRouter,
        alone: SharedRouter,
        memo: ShapeMemo,
    }

    fn router() -> SharedRouter {
        SharedRouter::new(Options::default(), 1000, 1 << 20, None)
    }

    impl Check {
        fn new() -> Check {
            Check {
                router: router(),
                alone: router(),
                memo: ShapeMemo::default(),
            }
        }

        /// Routes `text` through the memory, checking the answer and the
        /// constants against the router alone and the shape; true when
        /// the memory answered.
        fn routed(&mut self, text: &str) -> bool {
            let r = &self.router;
            let ours = self.memo.router == r as *const SharedRouter as usize
                && self.memo.find(text.as_bytes(), &mut Vec::new()).is_some();
            let before = r.stats();
            let mut constants = Vec::new();
            let route = self.memo.route_noting(r, text, &mut constants);
            let after = r.stats();
            // Every answer counts as one look-up; the memory's as a hit.
            assert_eq!(after.hits + after.misses, before.hits + before.misses + 1);
            if ours {
                assert_eq!(after.hits, before.hits + 1);
            }
            let mut shape = String::new();
            let mut expected = Vec::new();
            shape_noting(text, &mut shape, &mut expected);
            assert_eq!(constants, expected, "constants of {text:?}");
            assert_eq!(route, self.alone.route(text), "route of {text:?}");
            ours
        }
    }

    #[test]
    fn texts_that_differ_in_their_constants_take_the_remembered_route() {
        let mut c = Check::new();
        assert!(!c.routed("SELECT abalance FROM pgbench_accounts WHERE aid = 12345"));
        for text in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 7",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1.5e+10",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 0x1F",
        ] {
            assert!(c.routed(text), "{text}");
        }
        assert!(!c.routed("UPDATE t SET v = 'x' WHERE k = $$a$$ AND n = 5;"));
        for text in [
            "UPDATE t SET v = 'it''s' WHERE k = $$b$$ AND n = 50;",
            "UPDATE t SET v = '' WHERE k = $q$x$q$ AND n = 5;",
        ] {
            assert!(c.routed(text), "{text}");
        }
        // The memory's answers were counted as the router's hits.
        assert_eq!((c.router.stats().hits, c.router.stats().misses), (5, 2));
    }

    #[test]
    fn anything_but_other_constants_of_the_same_kinds_is_routed_again() {
        for text in [
            // A constant of another kind.
            "SELECT v FROM t WHERE k = '5' AND s = 'a' /* x */",
            "SELECT v FROM t WHERE k = 5 AND s = 7 /* x */",
            "SELECT v FROM t WHERE k = 5 AND s = $$a$$ /* x */",
            // Something else between the constants.
            "SELECT v FROM t WHERE k = 5 AND z = 'a' /* x */",
            "SELECT v FROM t WHERE k = 5  AND s = 'a' /* x */",
            "SELECT v FROM t WHERE k = 5 AND s = 'a' /* y */",
            "SELECT v FROM t WHERE k = 5 AND s = 'a'",
            "SELECT v FROM t WHERE k = 5 AND s = 'a' /* x */ ",
            // The constant runs into what follows it.
            "SELECT v FROM t WHERE k = 5AND s = 'a' /* x */",
            // An unterminated string.
            "SELECT v FROM t WHERE k = 5 AND s = 'a /* x */",
            // A parameter where a constant was.
            "SELECT v FROM t WHERE k = $1 AND s = 'a' /* x */",
            // Cut short.
            "SELECT v FROM t WHERE k = ",
            "",
        ] {
            // (Against that text alone.)
            let mut c = Check::new();
            assert!(!c.routed("SELECT v FROM t WHERE k = 5 AND s = 'a' /* x */"));
            assert!(!c.routed(text), "{text}");
        }
        // E'' strings read backslashes: the byte before the quote is
        // compared with the rest.
        let mut c = Check::new();
        assert!(!c.routed("SELECT E'a\\'b', 1"));
        assert!(c.routed("SELECT E'c\\'d', 2"));
        assert!(!c.routed("SELECT X'a\\'b', 1"));
    }

    #[test]
    fn texts_with_adjacent_constants_or_over_the_limit_are_not_remembered() {
        let mut c = Check::new();
        // A number then a string, nothing between.
        assert!(!c.routed("SELECT 5'x'"));
        assert!(!c.routed("SELECT 6'y'"));
        assert!(c.memo.entries.is_empty());
        let long = format!("SELECT 1 FROM t WHERE s = '{}'", "a".repeat(MAX_TEXT));
        assert!(!c.routed(&long));
        assert!(c.memo.entries.is_empty());
    }

    #[test]
    fn texts_with_block_comments_are_not_remembered() {
        let mut c = Check::new();
        assert!(!c.routed("SELECT v FROM t WHERE k = 1"));
        for i in 0..3 {
            let tagged = format!("/*traceparent='00-{i}-01'*/ SELECT v FROM t WHERE k = {i}");
            assert!(!c.routed(&tagged));
        }
        // The text that repeats is still there.
        assert_eq!(c.memo.entries.len(), 1);
        assert!(c.routed("SELECT v FROM t WHERE k = 2"));
    }

    #[test]
    fn a_loop_of_statements_finds_each_first_and_the_oldest_is_replaced() {
        let mut c = Check::new();
        let loop_of = |i: usize| {
            [
                "BEGIN".to_string(),
                format!("UPDATE a SET v = v + {i} WHERE k = {i}"),
                format!("SELECT v FROM a WHERE k = {i}"),
                format!("INSERT INTO h VALUES ({i}, {i}, 'n{i}')"),
                "END".to_string(),
            ]
        };
        let first = loop_of(1);
        for text in &first {
            c.routed(text);
        }
        for (k, text) in loop_of(2).iter().enumerate() {
            assert!(c.routed(text), "{text}");
            // The loop's next statement is the first one tried.
            let next = &c.memo.entries[c.memo.next].text;
            assert_eq!(&**next, first[(k + 1) % first.len()].as_str());
        }
        // More shapes than places: the oldest go.
        for i in 0..ENTRIES {
            c.routed(&format!("SELECT c{i} FROM t WHERE k = 1"));
        }
        assert_eq!(c.memo.entries.len(), ENTRIES);
        assert!(c.routed("SELECT c0 FROM t WHERE k = 2"));
        assert!(!c.routed("UPDATE a SET v = v + 1 WHERE k = 1"));
    }

    #[test]
    fn another_router_starts_from_nothing() {
        let (a, b) = (router(), router());
        let mut memo = ShapeMemo::default();
        let mut constants = Vec::new();
        memo.route_noting(&a, "SELECT 1", &mut constants);
        memo.route_noting(&a, "SELECT 2", &mut constants);
        assert_eq!((a.stats().hits, a.stats().misses), (1, 1));
        memo.route_noting(&b, "SELECT 3", &mut constants);
        assert_eq!((b.stats().hits, b.stats().misses), (0, 1));
        assert_eq!(memo.entries.len(), 1);
    }

    /// Random edits of real statements: whatever the memory answers is
    /// the router's answer, with the shape's constants.
    #[test]
    fn random_edits_of_the_corpus_route_as_the_router_does() {
        let texts: Vec<&str> = include_str!("../tests/corpus.txt")
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('\t').map(|(_, t)| t))
            .collect();
        assert!(texts.len() > 100);
        let mut c = Check::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n.max(1) as u64) as usize
        };
        let bytes: &[u8] = b"0123456789'$ aE.e-+/*\"x;\n";
        let mut answered = 0;
        for round in 0..20_000 {
            // A few statements at a time, as an application sends them.
            let base = texts[(round / 500 * 5 + rand(5)) % texts.len()];
            let mut t = base.as_bytes().to_vec();
            // Constants replaced by others, and now and then any byte.
            for _ in 0..rand(4) {
                let at = rand(t.len() + 1);
                match rand(4) {
                    0 | 1 if at < t.len() && t[at].is_ascii_digit() => {
                        t[at] = b'0' + rand(10) as u8;
                        if rand(2) == 0 {
                            t.insert(at, b'1');
                        }
                    }
                    2 if at < t.len() => t[at] = bytes[rand(bytes.len())],
                    3 => t.insert(at, bytes[rand(bytes.len())]),
                    _ if at < t.len() => {
                        t.remove(at);
                    }
                    _ => {}
                }
            }
            let Ok(text) = String::from_utf8(t) else {
                continue;
            };
            answered += usize::from(c.routed(&text));
            if round % 997 == 0 {
                c.memo.forget();
            }
        }
        assert!(answered > 1000, "{answered}");
    }
}
