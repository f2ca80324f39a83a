//! Read or write? Every statement is parsed with sqlparser (PostgreSQL dialect)
//! and classified by the rules in SPEC.md; statements it cannot parse are
//! classified by their leading keywords. When unsure, it is a write.

use crate::lexer::Lexer;
use sqlparser::ast::{
    CopySource, Expr, Query, Select, Set, SetExpr, Statement, TransactionAccessMode,
    TransactionMode, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::collections::HashSet;
use std::ops::ControlFlow;

/// What a statement is, for routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// May run on a replica.
    Read,
    /// Must run on the primary.
    Write,
    /// BEGIN / START TRANSACTION; `read_only` when it says READ ONLY (and
    /// not SERIALIZABLE, which a hot standby refuses).
    Begin { read_only: bool },
    /// SET TRANSACTION ...; `read_only` as for `Begin`.
    SetTransaction { read_only: bool },
    /// COMMIT, ROLLBACK, SAVEPOINT, RELEASE, PREPARE TRANSACTION ...
    TransactionControl,
    /// SET, RESET, DISCARD, DEALLOCATE: session state, replayed by the proxy.
    Session,
}

/// How a classification was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    Parsed,
    /// sqlparser could not parse it; the leading keywords decided.
    Fallback,
}

/// Functions that write or take locks: a SELECT calling one is a write.
/// Not the advisory unlocks: a session lock is held only on a connection
/// kept for its client (a pinned client, session pooling), where the
/// unlock runs whatever its class; anywhere else there is nothing to
/// release, on any node (asyncpg's pool runs `pg_advisory_unlock_all()`
/// each time a connection goes back to it).
pub const WRITING_FUNCTIONS: &[&str] = &[
    "nextval",
    "setval",
    "set_config",
    "pg_notify",
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
    "txid_current",
    "pg_current_xact_id",
    "pg_create_restore_point",
    "pg_switch_wal",
    "pg_promote",
    "pg_create_physical_replication_slot",
    "pg_create_logical_replication_slot",
    "pg_drop_replication_slot",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "lo_create",
    "lo_import",
    "lo_unlink",
    "dblink_exec",
];

/// What the classifier needs to know beyond the SQL text.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The user's own functions that write (lowercase, unqualified).
    pub writing_functions: HashSet<String>,
    /// The user's functions known not to write; consulted when
    /// `unknown_functions_write` is set.
    pub read_only_functions: HashSet<String>,
    /// Treat calls to functions that are neither built-in readers nor in
    /// `read_only_functions` as writes (strict mode). Off by default: a SELECT
    /// calling an ordinary function is a read unless the function is listed as
    /// writing.
    pub unknown_functions_write: bool,
    /// The result cache's tables, when it is on: routes then say what each
    /// statement means to it (`Route::cache`).
    pub cache: Option<std::sync::Arc<crate::cacheable::CacheTables>>,
}

impl Options {
    fn writes(&self, function: &str) -> bool {
        WRITING_FUNCTIONS.contains(&function) || self.writing_functions.contains(function)
    }
}

/// Classifies one statement's text (a simple query may hold several: the
/// strongest class wins, a write over a read).
pub fn classify(sql: &str, options: &Options) -> (Class, Source) {
    match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(statements) => (classify_parsed(&statements, options), Source::Parsed),
        Err(_) => (fallback(sql), Source::Fallback),
    }
}

/// The class of parsed statements sent together.
pub fn classify_parsed(statements: &[Statement], options: &Options) -> Class {
    if let Some(begin) = reading_transaction(statements, options) {
        return begin;
    }
    statements
        .iter()
        .map(|s| classify_statement(s, options))
        .reduce(combine)
        .unwrap_or(Class::Read)
}

/// Statements sent together that begin a transaction and otherwise only
/// read (`BEGIN; SELECT ...; COMMIT`, the end optional): the class of
/// their BEGIN, as the same statements sent one by one are placed by it
/// (a READ ONLY one on a replica; a plain one on the primary, or while it
/// is down on a replica, read-only there). Not when the BEGIN asks for
/// what a hot standby refuses (READ WRITE, SERIALIZABLE): those stay a
/// write, for the primary alone.
fn reading_transaction(statements: &[Statement], options: &Options) -> Option<Class> {
    let (Statement::StartTransaction { modes, .. }, rest) = statements.split_first()? else {
        return None;
    };
    let refused = modes.iter().any(|m| {
        matches!(
            m,
            TransactionMode::AccessMode(TransactionAccessMode::ReadWrite)
                | TransactionMode::IsolationLevel(
                    sqlparser::ast::TransactionIsolationLevel::Serializable
                )
        )
    });
    let reads = match rest.split_last() {
        Some((
            Statement::Commit { .. }
            | Statement::Rollback {
                savepoint: None, ..
            },
            reads,
        )) => reads,
        _ => rest,
    };
    (!refused
        && !reads.is_empty()
        && reads
            .iter()
            .all(|s| classify_statement(s, options) == Class::Read))
    .then(|| Class::Begin {
        read_only: read_only(modes),
    })
}

/// Several statements sent together run together: any write makes the whole a write.
fn combine(a: Class, b: Class) -> Class {
    match (a, b) {
        (Class::Read, Class::Read) => Class::Read,
        (Class::Session, other) | (other, Class::Session) if other != Class::Write => other,
        _ => Class::Write,
    }
}

/// READ ONLY and able to run on a hot standby (which refuses SERIALIZABLE).
fn read_only(modes: &[TransactionMode]) -> bool {
    let ro = modes.iter().any(|m| {
        matches!(
            m,
            TransactionMode::AccessMode(TransactionAccessMode::ReadOnly)
        )
    });
    let serializable = modes.iter().any(|m| {
        matches!(
            m,
            TransactionMode::IsolationLevel(
                sqlparser::ast::TransactionIsolationLevel::Serializable
            )
        )
    });
    ro && !serializable
}

/// Whether an EXPLAIN runs its statement: `EXPLAIN ANALYZE`, or
/// `EXPLAIN (ANALYZE [true|on|1])`.
pub(crate) fn explain_analyzes(
    analyze: bool,
    utility: &Option<Vec<sqlparser::ast::UtilityOption>>,
) -> bool {
    analyze
        || utility.as_ref().is_some_and(|opts| {
            opts.iter().any(|o| {
                o.name.value.eq_ignore_ascii_case("analyze")
                    && o.arg.as_ref().is_none_or(|a| {
                        !matches!(
                            a.to_string().to_ascii_lowercase().as_str(),
                            "false" | "off" | "0"
                        )
                    })
            })
        })
}

pub fn classify_statement(statement: &Statement, options: &Options) -> Class {
    match statement {
        Statement::Query(q) => query_class(q, options),
        Statement::Explain {
            analyze,
            statement,
            options: utility,
            ..
        } => {
            // EXPLAIN alone does not run the statement; EXPLAIN ANALYZE does.
            match (
                explain_analyzes(*analyze, utility),
                classify_statement(statement, options),
            ) {
                (true, Class::Write) => Class::Write,
                _ => Class::Read,
            }
        }
        Statement::ExplainTable { .. }
        | Statement::ShowVariable { .. }
        | Statement::ShowVariables { .. }
        | Statement::ShowTables { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowFunctions { .. } => Class::Read,
        Statement::Copy {
            to: true, source, ..
        } => match source {
            CopySource::Query(q) => query_class(q, options),
            CopySource::Table { .. } => Class::Read,
        },
        Statement::StartTransaction { modes, .. } => Class::Begin {
            read_only: read_only(modes),
        },
        Statement::Set(Set::SetTransaction {
            modes,
            session: false,
            ..
        }) => Class::SetTransaction {
            read_only: read_only(modes),
        },
        Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::Savepoint { .. }
        | Statement::ReleaseSavepoint { .. } => Class::TransactionControl,
        Statement::Set(_)
        | Statement::Reset(_)
        | Statement::Discard { .. }
        | Statement::Deallocate { .. } => Class::Session,
        // Closing cursors and leaving channels: a cursor lives in its
        // transaction (on the transaction's connection) and WITH HOLD and
        // LISTEN need a kept connection, so outside one there is nothing
        // to close, on any node (asyncpg's pool reset: CLOSE ALL;
        // UNLISTEN *).
        Statement::Close { .. } | Statement::UNLISTEN { .. } => Class::Read,
        // INSERT/UPDATE/DELETE/MERGE, DDL, COPY FROM, CALL, LOCK, PREPARE,
        // EXECUTE, DECLARE and FETCH, and anything else: the primary.
        _ => Class::Write,
    }
}

fn query_class(query: &Query, options: &Options) -> Class {
    let mut v = WriteFinder {
        options,
        found: false,
    };
    let _ = query.visit(&mut v);
    if v.found {
        Class::Write
    } else {
        Class::Read
    }
}

/// Looks through a query at any depth for what makes it a write.
struct WriteFinder<'a> {
    options: &'a Options,
    found: bool,
}

impl Visitor for WriteFinder<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        // FOR UPDATE / FOR SHARE / FOR NO KEY UPDATE / FOR KEY SHARE.
        if !query.locks.is_empty() {
            return self.stop();
        }
        if matches!(
            &*query.body,
            SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_)
        ) {
            return self.stop();
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<()> {
        // SELECT ... INTO new_table creates a table.
        if select.into.is_some() {
            return self.stop();
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<()> {
        // Data-modifying statements nested in WITH.
        if !matches!(statement, Statement::Query(_)) {
            return self.stop();
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = expr {
            let name = function_name(&f.name.to_string());
            let writes = self.options.writes(&name)
                || (self.options.unknown_functions_write
                    && !self.options.read_only_functions.contains(&name));
            if writes {
                return self.stop();
            }
        }
        ControlFlow::Continue(())
    }
}

impl WriteFinder<'_> {
    fn stop(&mut self) -> ControlFlow<()> {
        self.found = true;
        ControlFlow::Break(())
    }
}

/// `pg_catalog."NextVal"` → `nextval`; quoted names keep their case.
fn function_name(qualified: &str) -> String {
    let last = qualified.rsplit('.').next().unwrap_or(qualified);
    if last.starts_with('"') {
        last.trim_matches('"').replace("\"\"", "\"")
    } else {
        last.to_ascii_lowercase()
    }
}

/// Leading-keyword classification for statements sqlparser cannot read
/// (DO blocks, VACUUM, REFRESH MATERIALIZED VIEW, newer syntax ...).
pub fn fallback(sql: &str) -> Class {
    let words = crate::lexer::leading_words(sql, 8);
    let w = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
    let has = |kw: &str| words.iter().any(|x| x == kw);
    match w(0) {
        // TABLE name is SELECT * FROM name.
        "show" | "table" => Class::Read,
        // EXPLAIN without ANALYZE runs nothing.
        "explain" if !has("analyze") => Class::Read,
        "begin" | "start" => Class::Begin {
            read_only: has("only") && !has("write") && !has("serializable"),
        },
        "commit" | "end" | "rollback" | "abort" | "savepoint" | "release" | "prepare"
            if w(0) != "prepare" || w(1) == "transaction" =>
        {
            Class::TransactionControl
        }
        "set" if w(1) == "transaction" => Class::SetTransaction {
            read_only: has("only") && !has("write") && !has("serializable"),
        },
        "set" | "reset" | "discard" | "deallocate" => Class::Session,
        // SELECT that did not parse, DO, VACUUM, REFRESH, anything else.
        _ => Class::Write,
    }
}

/// What a query string leaves on its server connection after the
/// transaction, which the next client of a pooled connection would see:
/// a temporary table (or view, sequence), a session-level advisory lock,
/// a prepared statement made with SQL `PREPARE`. `None` for everything
/// else (decided without lexing unless a telling word appears).
pub fn session_state(sql: &str) -> Option<&'static str> {
    let has = |word: &str| {
        sql.as_bytes()
            .windows(word.len())
            .any(|w| w.eq_ignore_ascii_case(word.as_bytes()))
    };
    if !(has("advisory") || has("temp") || has("prepare")) {
        return None;
    }
    let mut start = true;
    let mut prev: Vec<String> = Vec::new();
    // A CREATE TEMP seen in this statement, unless ON COMMIT DROP follows.
    let mut temp = false;
    let mut last3: [String; 3] = Default::default();
    for t in Lexer::new(sql) {
        if t.text == ";" {
            if temp {
                return Some(TEMP);
            }
            start = true;
            prev.clear();
            continue;
        }
        let w = t.lower();
        last3.rotate_left(1);
        last3[2] = w.clone();
        if temp && last3 == ["on", "commit", "drop"] {
            temp = false;
            start = false;
            continue;
        }
        if matches!(
            w.as_str(),
            "pg_advisory_lock"
                | "pg_advisory_lock_shared"
                | "pg_try_advisory_lock"
                | "pg_try_advisory_lock_shared"
        ) {
            return Some("a session-level advisory lock (pg_advisory_lock)");
        }
        if start {
            match (prev.first().map(String::as_str), prev.len(), w.as_str()) {
                (Some("create"), 1 | 2, "temp" | "temporary") => {
                    temp = true;
                    start = false;
                }
                (Some("prepare"), 1, "transaction") => start = false,
                (Some("prepare"), 1, _) => {
                    return Some("a prepared statement made with SQL PREPARE")
                }
                (Some("create"), 1, "local" | "global") => {}
                (Some(_), _, _) => start = false,
                (None, _, _) => {}
            }
            if start {
                prev.push(w);
            }
        }
    }
    temp.then_some(TEMP)
}

const TEMP: &str = "a temporary table, view or sequence (CREATE TEMP)";

#[cfg(test)]
mod tests {
    #[test]
    fn session_state_is_recognised() {
        for (sql, what) in [
            ("CREATE TEMP TABLE t (x int)", "CREATE TEMP"),
            ("create temporary table t as select 1", "CREATE TEMP"),
            ("CREATE LOCAL TEMP VIEW v AS SELECT 1", "CREATE TEMP"),
            ("SELECT 1; CREATE TEMP SEQUENCE s", "CREATE TEMP"),
            ("SELECT pg_advisory_lock(42)", "advisory"),
            ("select PG_TRY_ADVISORY_LOCK(1, 2), 1", "advisory"),
            ("SELECT pg_advisory_lock_shared($1)", "advisory"),
            ("PREPARE q (int) AS SELECT $1", "PREPARE"),
            (
                "CREATE TEMP TABLE a (x int) ON COMMIT DROP; CREATE TEMP TABLE b (x int)",
                "CREATE TEMP",
            ),
        ] {
            let found = session_state(sql).unwrap_or_else(|| panic!("{sql}"));
            assert!(found.contains(what), "{sql}: {found}");
        }
        for sql in [
            "SELECT pg_advisory_xact_lock(42)",
            "SELECT 'pg_advisory_lock(1)'",
            "SELECT temperature FROM weather",
            "CREATE TABLE temp (x int)",
            "PREPARE TRANSACTION 'x'",
            "SELECT * FROM t WHERE note = 'create temp table'",
            "-- pg_advisory_lock\nSELECT 1",
            "INSERT INTO prepared (x) VALUES (1)",
            "CREATE TEMP TABLE t (x int) ON COMMIT DROP",
            "BEGIN; create temporary table t on commit drop as select 1; COMMIT",
        ] {
            assert_eq!(session_state(sql), None, "{sql}");
        }
    }

    use super::*;

    #[test]
    fn a_transaction_sent_with_its_reads_is_classed_by_its_begin() {
        let o = Options::default();
        let begin = |read_only| Class::Begin { read_only };
        for (sql, class) in [
            ("BEGIN; SELECT 1; COMMIT", begin(false)),
            (
                "BEGIN READ ONLY; SELECT * FROM t WHERE id = 1; END",
                begin(true),
            ),
            ("begin; select 1; rollback", begin(false)),
            (
                "START TRANSACTION ISOLATION LEVEL REPEATABLE READ; SELECT 1; SELECT 2",
                begin(false),
            ),
            ("BEGIN READ ONLY; SHOW TimeZone", begin(true)),
            // A write, a writing function, or a setting among them.
            ("BEGIN; UPDATE t SET x = 1; COMMIT", Class::Write),
            ("BEGIN READ ONLY; SELECT nextval('s')", Class::Write),
            ("BEGIN; SET x = 1; SELECT 1", Class::Write),
            // What a hot standby refuses.
            ("BEGIN READ WRITE; SELECT 1; COMMIT", Class::Write),
            ("BEGIN ISOLATION LEVEL SERIALIZABLE; SELECT 1", Class::Write),
            (
                "BEGIN READ ONLY, ISOLATION LEVEL SERIALIZABLE; SELECT 1",
                Class::Write,
            ),
            // Nothing read, a statement after the end, or not a BEGIN first.
            ("BEGIN; COMMIT", Class::Write),
            ("BEGIN; SELECT 1; COMMIT; SELECT 2", Class::Write),
            ("BEGIN; SELECT 1; ROLLBACK TO SAVEPOINT a", Class::Write),
            ("SELECT 1; BEGIN", Class::Write),
            // Alone, as before.
            ("BEGIN", begin(false)),
            ("BEGIN READ ONLY", begin(true)),
        ] {
            assert_eq!(classify(sql, &o).0, class, "{sql}");
        }
    }

    #[test]
    fn unparseable_statements_fall_back_to_keywords() {
        let o = Options::default();
        for (sql, class) in [
            (
                "IMPORT FOREIGN SCHEMA public FROM SERVER remote INTO local",
                Class::Write,
            ),
            ("TABLE users", Class::Read),
        ] {
            assert_eq!(classify(sql, &o), (class, Source::Fallback), "{sql}");
        }
        assert_eq!(fallback("SHOW ALL THE THINGS ("), Class::Read);
        assert_eq!(fallback("EXPLAIN SELECT ((("), Class::Read);
        assert_eq!(fallback("EXPLAIN ANALYZE SELECT ((("), Class::Write);
        assert_eq!(
            fallback("BEGIN READ ONLY ((("),
            Class::Begin { read_only: true }
        );
        assert_eq!(fallback("SELECT ((( FOR NO KEY UPDATE"), Class::Write);
        assert_eq!(
            fallback("PREPARE TRANSACTION 'x' ((("),
            Class::TransactionControl
        );
        assert_eq!(fallback("PREPARE q AS ((("), Class::Write);
        assert_eq!(fallback(""), Class::Write);
    }
}
