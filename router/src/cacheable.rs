//! What a statement means to the proxy's result cache: a read whose result
//! may be cached (and of which tables), a write that makes cached results
//! of some tables stale, or a statement that may write tables it does not
//! name (every cached result goes).
//!
//! Tables are named by their last identifier (`public.Countries` →
//! `countries`; a quoted name keeps its case): a write to `a.t` drops the
//! results of `b.t` too, which costs a refill, never a stale answer.

use crate::classify::{classify_statement, Class, Options};
use sqlparser::ast::{
    CopySource, Expr, ObjectName, Query, Statement, Value, ValueWithSpan, Visit, Visitor,
};
use std::collections::HashSet;
use std::ops::ControlFlow;
use std::sync::Arc;

/// What the result cache does with a statement.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub enum CacheUse {
    /// Nothing: not cacheable, writes no table, or the cache is off.
    #[default]
    None,
    /// A read whose result may be cached.
    Read(Arc<CachedRead>),
    /// Writes (at most) these tables.
    Writes(Arc<Box<[Box<str>]>>),
    /// May write tables it does not name: DO, CALL, a function that
    /// writes, DDL on a schema, text the parser could not read.
    WritesAny,
}

/// A read the cache may answer: the tables it reads, and the lifetime a
/// `/* shardline: cache=30s */` hint gives it (ms). (Behind one pointer:
/// every route carries a `CacheUse`, so it stays two words.)
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CachedRead {
    pub tables: Box<[Box<str>]>,
    pub ttl_ms: Option<u64>,
}

/// What the router knows of the cache's configuration.
#[derive(Debug, Clone, Default)]
pub struct CacheTables {
    /// Tables whose reads may be cached (last identifier, folded).
    pub tables: HashSet<Box<str>>,
    /// A hint may cache a statement over tables not listed; writes to every
    /// table are tracked then.
    pub hints: bool,
}

/// Functions whose result depends only on their arguments (and on session
/// settings, which are part of a cached result's key): a cacheable read
/// calls none but these. Anything else (now(), random(), a user's own
/// function) makes the statement bypass the cache.
const DETERMINISTIC_FUNCTIONS: &[&str] = &[
    "abs",
    "array_agg",
    "array_length",
    "avg",
    "bit_and",
    "bit_or",
    "bool_and",
    "bool_or",
    "btrim",
    "cardinality",
    "ceil",
    "ceiling",
    "char_length",
    "character_length",
    "coalesce",
    "concat",
    "concat_ws",
    "count",
    "every",
    "floor",
    "greatest",
    "initcap",
    "json_agg",
    "json_build_object",
    "jsonb_agg",
    "jsonb_build_object",
    "least",
    "left",
    "length",
    "lower",
    "lpad",
    "ltrim",
    "max",
    "md5",
    "min",
    "mod",
    "nullif",
    "octet_length",
    "position",
    "power",
    "repeat",
    "replace",
    "reverse",
    "right",
    "round",
    "rpad",
    "rtrim",
    "sign",
    "split_part",
    "sqrt",
    "string_agg",
    "strpos",
    "substr",
    "substring",
    "sum",
    "trim",
    "trunc",
    "upper",
];

/// String constants a cast turns into the time of the statement.
const TIME_WORDS: &[&str] = &["now", "today", "tomorrow", "yesterday"];

/// A table's name as the cache knows it: its last identifier, folded to
/// lower case unless quoted.
pub fn table_id(name: &ObjectName) -> Option<Box<str>> {
    let last = name.0.last()?.as_ident()?;
    Some(if last.quote_style.is_some() {
        last.value.as_str().into()
    } else {
        last.value.to_ascii_lowercase().into()
    })
}

/// A configured table name (`t` or `schema.t`) as the cache knows it.
pub fn configured_id(name: &str) -> Box<str> {
    let last = name.trim().rsplit('.').next().unwrap_or(name);
    match last.strip_prefix('"').and_then(|l| l.strip_suffix('"')) {
        Some(quoted) => quoted.replace("\"\"", "\"").into(),
        None => last.to_ascii_lowercase().into(),
    }
}

/// What parsed statements sent together mean to the cache. `class` is
/// their combined class (`options` classify each), `hint_ttl` the leading
/// hint's `cache=` (`Some(0)`: `cache=off`).
pub fn cache_use(
    statements: &[Statement],
    class: Class,
    options: &Options,
    hint_ttl: Option<u64>,
    cache: &CacheTables,
) -> CacheUse {
    if class == Class::Read {
        return match statements {
            [Statement::Query(q)] if hint_ttl != Some(0) => read_use(q, hint_ttl, cache),
            _ => CacheUse::None,
        };
    }
    let mut written: Vec<Box<str>> = Vec::new();
    for s in statements {
        if classify_statement(s, options) != Class::Write {
            continue;
        }
        match statement_writes(s) {
            Some(tables) => written.extend(tables),
            None => return CacheUse::WritesAny,
        }
    }
    if !cache.hints {
        written.retain(|t| cache.tables.contains(t));
    }
    written.sort_unstable();
    written.dedup();
    if written.is_empty() {
        CacheUse::None
    } else {
        CacheUse::Writes(Arc::new(written.into()))
    }
}

/// What a statement the parser could not read means: a write may be anything.
pub fn unparsed_use(class: Class) -> CacheUse {
    match class {
        Class::Write => CacheUse::WritesAny,
        _ => CacheUse::None,
    }
}

fn read_use(query: &Query, hint_ttl: Option<u64>, cache: &CacheTables) -> CacheUse {
    let mut v = ReadFinder {
        locks: false,
        tables: Vec::new(),
    };
    if query.visit(&mut v).is_break() || v.tables.is_empty() {
        return CacheUse::None;
    }
    let listed = v.tables.iter().all(|t| cache.tables.contains(t));
    let hinted = cache.hints && hint_ttl.is_some();
    if !(listed || hinted) {
        return CacheUse::None;
    }
    v.tables.sort_unstable();
    v.tables.dedup();
    CacheUse::Read(Arc::new(CachedRead {
        tables: v.tables.into(),
        ttl_ms: hint_ttl,
    }))
}

/// The tables a writing statement may change, or `None` when it may change
/// tables it does not name. Every table it mentions is counted (those it
/// only reads too): a result dropped for nothing costs a refill only.
fn statement_writes(statement: &Statement) -> Option<Vec<Box<str>>> {
    use sqlparser::ast::ObjectType;
    match statement {
        Statement::Insert(_)
        | Statement::Update(_)
        | Statement::Delete(_)
        | Statement::Merge(_)
        | Statement::CreateTable(_)
        | Statement::AlterTable(_)
        | Statement::CreateIndex(_) => {}
        Statement::Query(q) => {
            // Classed a write for its locks alone (FOR UPDATE) changes
            // nothing; one that writes is written off whole below.
            let mut v = ReadFinder {
                locks: true,
                tables: Vec::new(),
            };
            return q.visit(&mut v).is_continue().then(Vec::new);
        }
        Statement::Truncate(t) if t.cascade.is_none() => {}
        Statement::Drop {
            object_type: ObjectType::Table | ObjectType::View | ObjectType::MaterializedView,
            cascade: false,
            ..
        } => {}
        Statement::Copy {
            source: CopySource::Table { table_name, .. },
            to: false,
            ..
        } => return table_id(table_name).map(|t| vec![t]),
        // A query that writes (a writing function, a data-modifying WITH)
        // and everything else: CALL, DO, LOCK, DDL on other objects.
        _ => return None,
    }
    let mut tables = Vec::new();
    let found = statement.visit(&mut Relations(&mut tables));
    (found.is_continue() && !tables.is_empty()).then_some(tables)
}

/// Notes a relation's table, or stops at a name that is not one.
fn push_table(tables: &mut Vec<Box<str>>, relation: &ObjectName) -> ControlFlow<()> {
    match table_id(relation) {
        Some(t) => {
            tables.push(t);
            ControlFlow::Continue(())
        }
        None => ControlFlow::Break(()),
    }
}

struct Relations<'a>(&'a mut Vec<Box<str>>);

impl Visitor for Relations<'_> {
    type Break = ();

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        push_table(self.0, relation)
    }
}

/// The tables a read reads; stops at what makes its result depend on
/// more than the tables' rows (a function not known deterministic, a time
/// word cast to a date, a data-modifying WITH), and at a locking clause
/// unless `locks`.
struct ReadFinder {
    locks: bool,
    tables: Vec<Box<str>>,
}

impl Visitor for ReadFinder {
    type Break = ();

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        push_table(&mut self.tables, relation)
    }

    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<()> {
        if matches!(statement, Statement::Query(_)) {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(())
        }
    }

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if self.locks || query.locks.is_empty() {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(())
        }
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        match expr {
            Expr::Function(f) => {
                let name = f
                    .name
                    .0
                    .last()
                    .and_then(|p| p.as_ident())
                    .map(|i| i.value.to_ascii_lowercase());
                match name {
                    Some(n) if DETERMINISTIC_FUNCTIONS.contains(&n.as_str()) => {
                        ControlFlow::Continue(())
                    }
                    _ => ControlFlow::Break(()),
                }
            }
            _ => ControlFlow::Continue(()),
        }
    }

    fn pre_visit_value(&mut self, value: &ValueWithSpan) -> ControlFlow<()> {
        match &value.value {
            Value::SingleQuotedString(s)
                if TIME_WORDS.contains(&s.trim().to_ascii_lowercase().as_str()) =>
            {
                ControlFlow::Break(())
            }
            _ => ControlFlow::Continue(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlparser::dialect::PostgreSqlDialect;
    use sqlparser::parser::Parser;

    fn tables(names: &[&str], hints: bool) -> CacheTables {
        CacheTables {
            tables: names.iter().map(|n| configured_id(n)).collect(),
            hints,
        }
    }

    fn use_of(sql: &str, hint_ttl: Option<u64>, cache: &CacheTables) -> CacheUse {
        let parsed = Parser::parse_sql(&PostgreSqlDialect {}, sql).unwrap();
        let class = crate::classify::classify_parsed(&parsed, &Default::default());
        cache_use(&parsed, class, &Default::default(), hint_ttl, cache)
    }

    fn read(names: &[&str], ttl_ms: Option<u64>) -> CacheUse {
        CacheUse::Read(Arc::new(CachedRead {
            tables: names.iter().map(|n| Box::from(*n)).collect(),
            ttl_ms,
        }))
    }

    fn writes(names: &[&str]) -> CacheUse {
        CacheUse::Writes(Arc::new(names.iter().map(|n| Box::from(*n)).collect()))
    }

    #[test]
    fn a_routes_cache_use_is_one_word() {
        assert_eq!(std::mem::size_of::<Option<Arc<CacheUse>>>(), 8);
    }

    #[test]
    fn reads_of_listed_tables_only_are_cacheable() {
        let c = tables(&["countries", "public.currencies"], false);
        assert_eq!(
            use_of("SELECT * FROM countries WHERE code = $1", None, &c),
            read(&["countries"], None)
        );
        assert_eq!(
            use_of(
                "SELECT c.name, count(*) FROM public.Countries c JOIN currencies x ON x.code = c.currency GROUP BY 1 ORDER BY 1",
                None,
                &c
            ),
            read(&["countries", "currencies"], None)
        );
        // A table not listed, a catalog, a CTE's name: not cached.
        for sql in [
            "SELECT * FROM countries JOIN users USING (id)",
            "SELECT * FROM pg_class",
            "WITH x AS (SELECT * FROM countries) SELECT * FROM x",
            "SELECT 1",
        ] {
            assert_eq!(use_of(sql, None, &c), CacheUse::None, "{sql}");
        }
        // A quoted name keeps its case.
        assert_eq!(
            use_of("SELECT * FROM \"Countries\"", None, &c),
            CacheUse::None
        );
    }

    #[test]
    fn volatile_reads_and_locks_bypass_the_cache() {
        let c = tables(&["countries"], false);
        for sql in [
            "SELECT now(), name FROM countries",
            "SELECT * FROM countries WHERE created < CURRENT_TIMESTAMP",
            "SELECT random() FROM countries",
            "SELECT my_function(name) FROM countries",
            "SELECT * FROM countries WHERE day = 'today'::date",
            "SELECT * FROM countries FOR UPDATE",
        ] {
            assert_eq!(use_of(sql, None, &c), CacheUse::None, "{sql}");
        }
        // A read that writes drops every result.
        assert_eq!(
            use_of("SELECT nextval('s') FROM countries", None, &c),
            CacheUse::WritesAny
        );
        assert_eq!(
            use_of(
                "SELECT upper(name), count(*) FROM countries GROUP BY 1",
                None,
                &c
            ),
            read(&["countries"], None)
        );
    }

    #[test]
    fn a_hint_caches_unlisted_tables_only_when_allowed() {
        let sql = "SELECT * FROM users WHERE id = 1";
        assert_eq!(
            use_of(sql, Some(30_000), &tables(&[], true)),
            read(&["users"], Some(30_000))
        );
        assert_eq!(
            use_of(sql, Some(30_000), &tables(&[], false)),
            CacheUse::None
        );
        // cache=off turns a listed table's caching off for the statement.
        assert_eq!(
            use_of("SELECT * FROM users", Some(0), &tables(&["users"], false)),
            CacheUse::None
        );
    }

    #[test]
    fn writes_name_the_tables_they_change() {
        let c = tables(&["countries", "currencies"], false);
        assert_eq!(
            use_of("INSERT INTO countries VALUES (1)", None, &c),
            writes(&["countries"])
        );
        assert_eq!(
            use_of(
                "UPDATE public.countries SET x = 1 FROM currencies WHERE currencies.id = countries.id",
                None,
                &c
            ),
            writes(&["countries", "currencies"])
        );
        assert_eq!(
            use_of("DELETE FROM countries; TRUNCATE currencies", None, &c),
            writes(&["countries", "currencies"])
        );
        assert_eq!(
            use_of("COPY countries FROM STDIN", None, &c),
            writes(&["countries"])
        );
        assert_eq!(
            use_of("ALTER TABLE countries ADD COLUMN y int", None, &c),
            writes(&["countries"])
        );
        // Writes to tables not cached mean nothing, unless hints may cache any.
        assert_eq!(
            use_of("INSERT INTO users VALUES (1)", None, &c),
            CacheUse::None
        );
        assert_eq!(
            use_of("INSERT INTO users VALUES (1)", None, &tables(&[], true)),
            writes(&["users"])
        );
        // What may write anything drops everything.
        for sql in [
            "CALL refresh()",
            "TRUNCATE users CASCADE",
            "DROP SCHEMA s CASCADE",
            "SELECT nextval('s')",
            "WITH d AS (DELETE FROM users RETURNING *) SELECT * FROM d",
        ] {
            assert_eq!(use_of(sql, None, &c), CacheUse::WritesAny, "{sql}");
        }
        assert_eq!(unparsed_use(Class::Write), CacheUse::WritesAny);
        // Session and transaction statements change no table.
        for sql in [
            "BEGIN",
            "COMMIT",
            "SET search_path = x",
            "SELECT * FROM users",
        ] {
            assert_eq!(use_of(sql, None, &c), CacheUse::None, "{sql}");
        }
    }
}
