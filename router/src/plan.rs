//! Where one unit of work runs: the primary or a replica.
//!
//! A unit is what the proxy sends before it may change server connection: a
//! simple query, or an extended-protocol batch up to Sync. Its statements'
//! routes decide together; an explicit transaction then stays on the
//! connection its first unit got.

use crate::cache::Route;
use crate::classify::Class;
use crate::hint::RoleHint;
use crate::lexer::words;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Primary,
    Replica,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitPlan {
    /// Run there. `writes` when the unit may write, so read-your-writes must
    /// learn where the primary's WAL was when it committed.
    Run { target: Target, writes: bool },
    /// A lone `BEGIN` (READ ONLY only with several shards): answer it and
    /// decide at the next statement, which may be `SET TRANSACTION READ
    /// ONLY` or choose the shard.
    DeferBegin,
    /// `COMMIT` or `ROLLBACK` right after a deferred `BEGIN`: nothing ran, so
    /// answer with this tag.
    EndEmpty(&'static str),
}

/// What a transaction may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadWrite,
    ReadOnly,
}

/// What the proxy knows about the unit it is about to send.
#[derive(Debug, Clone, Copy)]
pub struct UnitFacts<'a> {
    /// Routes of the unit's statements, in order.
    pub routes: &'a [Route],
    /// The unit is one statement alone: a simple query holding one, or an
    /// extended unit executing one (and nothing else but Parse, Describe
    /// and Sync), so a lone BEGIN in it may be answered by the proxy.
    pub simple_single: bool,
    /// Every message of the unit has arrived (a simple query, or up to Sync).
    pub complete: bool,
    /// A `BEGIN` was answered by the proxy and not yet sent, and whether
    /// it was READ ONLY.
    pub deferred_begin: Option<Access>,
    /// Several shards: a transaction's shard is chosen by its first
    /// statement that runs, so a lone `BEGIN READ ONLY` is deferred too.
    pub sharded: bool,
    /// With `deferred_begin`: the statement is a lone COMMIT/ROLLBACK (its tag).
    pub lone_end: Option<&'static str>,
    /// `SET shardline.role` for the session.
    pub session_role: Option<RoleHint>,
    /// The unit runs something (a simple query, an Execute, a function
    /// call), as opposed to only preparing and describing statements.
    pub executes: bool,
}

const PRIMARY: UnitPlan = UnitPlan::Run {
    target: Target::Primary,
    writes: true,
};
const REPLICA: UnitPlan = UnitPlan::Run {
    target: Target::Replica,
    writes: false,
};

pub fn plan_unit(f: &UnitFacts) -> UnitPlan {
    let first = f.routes.first();
    if let Some(role) = first.and_then(|r| r.role_hint).or(f.session_role) {
        return match role {
            RoleHint::Primary => UnitPlan::Run {
                target: Target::Primary,
                writes: !f.routes.iter().all(|r| is_read(r.class)),
            },
            RoleHint::Replica => REPLICA,
        };
    }
    if f.complete && !f.executes && f.routes.iter().all(|r| r.session_state.is_none()) {
        // Parse and Describe need only the schema, the same on every node:
        // a driver preparing a write is not stopped by a primary that is
        // down (the statement is prepared again where it runs), in a
        // transaction not begun yet too (preparing does not begin it).
        // Not a statement that leaves session state: preparing it pins
        // the client to the connection it runs on.
        return REPLICA;
    }
    if let Some(access) = f.deferred_begin {
        if let Some(tag) = f.lone_end {
            return UnitPlan::EndEmpty(tag);
        }
        return match (access, first.map(|r| r.class)) {
            (Access::ReadOnly, _) | (_, Some(Class::SetTransaction { read_only: true })) => REPLICA,
            _ => PRIMARY,
        };
    }
    if !f.complete {
        // The rest of the unit may write: only the primary is safe.
        return PRIMARY;
    }
    match first.map(|r| r.class) {
        // With several shards, the first statement chooses the shard (and
        // with it the replica).
        Some(Class::Begin { read_only: true }) if f.simple_single && f.sharded => {
            UnitPlan::DeferBegin
        }
        Some(Class::Begin { read_only: true }) => REPLICA,
        Some(Class::Begin { read_only: false }) if f.simple_single => UnitPlan::DeferBegin,
        Some(Class::Begin { read_only: false }) => match f.routes.get(1).map(|r| r.class) {
            Some(Class::SetTransaction { read_only: true }) => REPLICA,
            _ => PRIMARY,
        },
        _ if f.routes.iter().all(|r| is_read(r.class)) => REPLICA,
        _ => PRIMARY,
    }
}

/// Runs anywhere: reads, and session commands (replayed on every connection).
fn is_read(class: Class) -> bool {
    matches!(class, Class::Read | Class::Session)
}

/// A statement that only ends a transaction (`COMMIT`, `END`, `ROLLBACK`,
/// `ABORT`, optionally with `WORK` or `TRANSACTION`): its command tag.
pub fn lone_transaction_end(sql: &str) -> Option<&'static str> {
    // Asked of every statement a writing client sends. A text that begins
    // with a letter begins with its first word (no comment, string or
    // punctuation before it): unless that letter begins one of the four,
    // the answer is known from it.
    if let Some(&b) = sql.as_bytes().iter().find(|b| !b.is_ascii_whitespace()) {
        if b.is_ascii_alphabetic() && !matches!(b.to_ascii_lowercase(), b'c' | b'e' | b'r' | b'a') {
            return None;
        }
    }
    let text = sql.trim_end_matches([';', ' ', '\n', '\t', '\r']);
    // Letters and spaces only, as drivers send it: no comment, string or
    // punctuation to lex.
    if text
        .bytes()
        .all(|b| b.is_ascii_alphabetic() || b.is_ascii_whitespace())
    {
        return transaction_end_tag(text.split_ascii_whitespace());
    }
    transaction_end_tag(words(text))
}

/// `lone_transaction_end` of a statement's words.
fn transaction_end_tag<'a>(mut words: impl Iterator<Item = &'a str>) -> Option<&'static str> {
    // The first word decides most of the rest, without allocating.
    let is = |w: &str, of: &[&str]| of.iter().any(|k| w.eq_ignore_ascii_case(k));
    let first = words.next()?;
    let tag = if is(first, &["commit", "end"]) {
        "COMMIT"
    } else if is(first, &["rollback", "abort"]) {
        "ROLLBACK"
    } else {
        return None;
    };
    match (words.next(), words.next()) {
        (None, _) => Some(tag),
        (Some(w), None) if is(w, &["work", "transaction"]) => Some(tag),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::route_uncached;
    use crate::classify::Options;

    fn routes(sqls: &[&str]) -> Vec<Route> {
        sqls.iter()
            .map(|s| route_uncached(s, &Options::default(), None))
            .collect()
    }

    /// A whole unit of one simple query that executes, on one shard, no
    /// BEGIN held, no hint.
    fn facts(routes: &[Route]) -> UnitFacts<'_> {
        UnitFacts {
            routes,
            simple_single: true,
            complete: true,
            deferred_begin: None,
            sharded: false,
            lone_end: None,
            session_role: None,
            executes: true,
        }
    }

    fn plan(sqls: &[&str], simple_single: bool) -> UnitPlan {
        plan_unit(&UnitFacts {
            simple_single,
            ..facts(&routes(sqls))
        })
    }

    fn after_begin(sql: &str) -> UnitPlan {
        plan_unit(&UnitFacts {
            deferred_begin: Some(Access::ReadWrite),
            lone_end: lone_transaction_end(sql),
            ..facts(&routes(&[sql]))
        })
    }

    #[test]
    fn reads_go_to_replicas_and_writes_to_the_primary() {
        assert_eq!(plan(&["SELECT 1"], true), REPLICA);
        assert_eq!(plan(&["SELECT 1", "SHOW work_mem"], false), REPLICA);
        assert_eq!(plan(&["SET search_path TO app"], true), REPLICA);
        assert_eq!(plan(&["SELECT 1", "UPDATE t SET a = 1"], false), PRIMARY);
        assert_eq!(plan(&["SELECT * FROM t FOR UPDATE"], true), PRIMARY);
        assert_eq!(plan(&["SELECT nextval('s')"], true), PRIMARY);
        assert_eq!(plan(&["COMMIT"], true), PRIMARY);
        // Nothing but Describe/Close of existing objects: anywhere.
        assert_eq!(plan(&[], false), REPLICA);
    }

    #[test]
    fn read_only_transactions_wait_for_their_shard() {
        let r = routes(&["BEGIN READ ONLY"]);
        let mut f = UnitFacts {
            sharded: true,
            ..facts(&r)
        };
        assert_eq!(plan_unit(&f), UnitPlan::DeferBegin);
        // With a statement behind it in the query string: where it is.
        f.simple_single = false;
        assert_eq!(plan_unit(&f), REPLICA);
        // The first statement after it runs on a replica, writes too (the
        // server refuses them in a read-only transaction).
        let r = routes(&["UPDATE t SET a = 1"]);
        f.routes = &r;
        f.deferred_begin = Some(Access::ReadOnly);
        assert_eq!(plan_unit(&f), REPLICA);
        let r = routes(&["COMMIT"]);
        f.routes = &r;
        f.lone_end = Some("COMMIT");
        assert_eq!(plan_unit(&f), UnitPlan::EndEmpty("COMMIT"));
    }

    #[test]
    fn read_only_transactions_may_use_a_replica() {
        assert_eq!(plan(&["BEGIN READ ONLY"], true), REPLICA);
        assert_eq!(plan(&["START TRANSACTION READ ONLY"], true), REPLICA);
        assert_eq!(
            plan(&["BEGIN", "SET TRANSACTION READ ONLY"], false),
            REPLICA
        );
        assert_eq!(plan(&["BEGIN", "SELECT 1"], false), PRIMARY);
        // A query string holding the transaction's reads, as those sent
        // after a lone BEGIN READ ONLY are placed; a plain BEGIN's on the
        // primary (the proxy's to move to a replica while it is down).
        assert_eq!(plan(&["BEGIN READ ONLY; SELECT 1; COMMIT"], false), REPLICA);
        assert_eq!(plan(&["BEGIN; SELECT 1; COMMIT"], false), PRIMARY);
        assert_eq!(
            plan(&["BEGIN READ ONLY; UPDATE t SET a = 1"], false),
            PRIMARY
        );
        assert_eq!(
            plan(&["BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY"], true),
            UnitPlan::DeferBegin
        );
        assert_eq!(plan(&["BEGIN"], true), UnitPlan::DeferBegin);
        assert_eq!(after_begin("SET TRANSACTION READ ONLY"), REPLICA);
        assert_eq!(after_begin("SELECT 1"), PRIMARY);
        assert_eq!(after_begin("commit;"), UnitPlan::EndEmpty("COMMIT"));
        assert_eq!(after_begin("ROLLBACK WORK"), UnitPlan::EndEmpty("ROLLBACK"));
        assert_eq!(after_begin("COMMIT AND CHAIN"), PRIMARY);
    }

    #[test]
    fn incomplete_units_go_to_the_primary() {
        let r = routes(&["SELECT 1"]);
        let f = UnitFacts {
            simple_single: false,
            complete: false,
            ..facts(&r)
        };
        assert_eq!(plan_unit(&f), PRIMARY);
    }

    #[test]
    fn preparing_a_write_runs_on_any_node() {
        let r = routes(&["INSERT INTO t VALUES ($1)"]);
        let mut f = UnitFacts {
            simple_single: false,
            executes: false,
            ..facts(&r)
        };
        assert_eq!(plan_unit(&f), REPLICA);
        f.executes = true;
        assert_eq!(plan_unit(&f), PRIMARY);
        // Not before its Sync: the rest may execute.
        f.executes = false;
        f.complete = false;
        assert_eq!(plan_unit(&f), PRIMARY);
        // Nor a statement that pins its client to the connection.
        let r = routes(&["SELECT pg_try_advisory_lock(7)"]);
        f.routes = &r;
        f.complete = true;
        assert_eq!(plan_unit(&f), PRIMARY);
        // In a transaction not begun yet (its BEGIN deferred), preparing
        // does not begin it: any node; executing goes to the primary.
        let r = routes(&["SELECT name FROM users WHERE id = $1"]);
        f.routes = &r;
        f.deferred_begin = Some(Access::ReadWrite);
        assert_eq!(plan_unit(&f), REPLICA);
        f.executes = true;
        assert_eq!(plan_unit(&f), PRIMARY);
    }

    #[test]
    fn hints_override_the_class() {
        assert_eq!(
            plan(&["/* shardline: role=primary */ SELECT 1"], true),
            UnitPlan::Run {
                target: Target::Primary,
                writes: false
            }
        );
        assert_eq!(
            plan(&["/* shardline: role=replica */ SELECT nextval('s')"], true),
            REPLICA
        );
        let r = routes(&["SELECT 1"]);
        let f = UnitFacts {
            session_role: Some(RoleHint::Primary),
            ..facts(&r)
        };
        assert_eq!(
            plan_unit(&f),
            UnitPlan::Run {
                target: Target::Primary,
                writes: false
            }
        );
    }

    #[test]
    fn lone_transaction_ends() {
        assert_eq!(lone_transaction_end("END"), Some("COMMIT"));
        assert_eq!(lone_transaction_end(" abort ;"), Some("ROLLBACK"));
        assert_eq!(lone_transaction_end("COMMIT PREPARED 'x'"), None);
        assert_eq!(lone_transaction_end("ROLLBACK TO SAVEPOINT a"), None);
        assert_eq!(lone_transaction_end("SELECT 1"), None);
        // Answered from the first letter, or by the words when something
        // comes before the first word or the letter may begin one.
        assert_eq!(lone_transaction_end("\n\t UPDATE t SET a = 1"), None);
        // Letters and spaces alone, and with what needs the lexer.
        assert_eq!(lone_transaction_end(" commit\n work ;\n"), Some("COMMIT"));
        assert_eq!(lone_transaction_end("end transaction"), Some("COMMIT"));
        assert_eq!(lone_transaction_end("ROLLBACK TRANSACTION now"), None);
        assert_eq!(lone_transaction_end("end /* done */"), Some("COMMIT"));
        assert_eq!(lone_transaction_end("-- bye\nROLLBACK"), Some("ROLLBACK"));
        assert_eq!(lone_transaction_end("commit; commit"), None);
        assert_eq!(lone_transaction_end("end work; select 1"), None);
        assert_eq!(lone_transaction_end("\n commit work;"), Some("COMMIT"));
        assert_eq!(lone_transaction_end("Rollback"), Some("ROLLBACK"));
        assert_eq!(lone_transaction_end("/* tag */ COMMIT"), Some("COMMIT"));
        assert_eq!(
            lone_transaction_end("-- c\nEND TRANSACTION"),
            Some("COMMIT")
        );
        assert_eq!(lone_transaction_end("(commit)"), Some("COMMIT"));
        assert_eq!(lone_transaction_end("analyze t"), None);
        assert_eq!(lone_transaction_end("enda"), None);
        assert_eq!(lone_transaction_end(" ; "), None);
        assert_eq!(lone_transaction_end(""), None);
    }
}
