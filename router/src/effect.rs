//! Just enough SQL lexing to see the commands that change session state (SET,
//! RESET, DISCARD ALL, DEALLOCATE, LISTEN). This is session bookkeeping, not
//! routing: the fast path looks at one leading keyword and returns. The
//! lexer is the router crate's.

use crate::lexer::{first_keyword, split_statements, Lexer};

/// What a statement does to the session the proxy must keep across server connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// `SET name ...`: `statement` is replayed verbatim on other connections.
    Set {
        name: String,
        statement: String,
    },
    Reset(String),
    ResetAll,
    DiscardAll,
    /// `DEALLOCATE [PREPARE] name | ALL` (None = ALL).
    Deallocate(Option<String>),
    Listen,
    /// `DECLARE ... WITH HOLD CURSOR`: the cursor outlives the transaction
    /// on the server connection.
    HoldCursor,
}

impl Effect {
    /// Under transaction pooling, why this statement is refused: what it
    /// leaves on the server connection would reach the next client.
    pub fn pooling_refusal(&self) -> Option<(&'static str, &'static str)> {
        match self {
            Effect::Listen => Some((
                "LISTEN is not supported in transaction pooling mode",
                "notifications need a dedicated server connection: connect as a user with pool_mode = \"session\"",
            )),
            Effect::HoldCursor => Some((
                "DECLARE ... WITH HOLD is not supported in transaction pooling mode: the cursor would outlive the transaction on a connection other clients share",
                "use a cursor without HOLD inside a transaction, or connect as a user with pool_mode = \"session\"",
            )),
            _ => None,
        }
    }
}

/// Effects of each statement of a simple query, in order, or `None` when no
/// statement has one (the common case, decided without allocating).
pub fn effects(sql: &str) -> Option<Vec<Option<Effect>>> {
    if !may_have_effects(sql) {
        return None;
    }
    let stmts = split_statements(sql);
    let out: Vec<Option<Effect>> = stmts.iter().map(|s| statement_effect(s)).collect();
    out.iter().any(Option::is_some).then_some(out)
}

/// Whether [`effects`] (or [`statement_effect`]) can find an effect in
/// `sql`: it starts with a keyword of one, or holds several statements.
/// Decided by the keywords and semicolons alone, so one text decides it
/// for every text of the same shape (the router keeps it with the route,
/// `Route::effects`, and the proxy lexes only the texts it names).
pub fn may_have_effects(sql: &str) -> bool {
    has_inner_semicolon(sql) || is_effect_keyword(first_keyword(sql))
}

fn is_effect_keyword(k: &str) -> bool {
    ["set", "reset", "discard", "deallocate", "listen", "declare"]
        .iter()
        .any(|w| k.eq_ignore_ascii_case(w))
}

/// One statement that runs in a transaction of its own when sent outside
/// one (a write, or a SELECT calling a writing function): its commit ends
/// the query.
pub fn lone_autocommit_statement(sql: &str) -> bool {
    let first = first_keyword(sql);
    !has_inner_semicolon(sql)
        && [
            "insert", "update", "delete", "merge", "select", "with", "call",
        ]
        .iter()
        .any(|w| first.eq_ignore_ascii_case(w))
}

fn has_inner_semicolon(sql: &str) -> bool {
    match memchr::memchr(b';', sql.as_bytes()) {
        None => false,
        Some(i) => !sql[i..]
            .bytes()
            .all(|b| b == b';' || b.is_ascii_whitespace()),
    }
}

/// The effect of one statement (no trailing semicolon).
pub fn statement_effect(stmt: &str) -> Option<Effect> {
    if !is_effect_keyword(first_keyword(stmt)) {
        return None;
    }
    let words = Lexer::new(stmt).take(4).collect::<Vec<_>>();
    let w = |i: usize| words.get(i).map(|t| t.lower()).unwrap_or_default();
    match w(0).as_str() {
        "set" => {
            let (name_at, first) = match w(1).as_str() {
                "local" => return None,
                "session" if w(2) == "authorization" => {
                    return Some(set("session_authorization", stmt))
                }
                "session" if w(2) == "characteristics" => {
                    return Some(set("session_characteristics", stmt))
                }
                "session" => (2, w(2)),
                _ => (1, w(1)),
            };
            if words.len() <= name_at {
                return None;
            }
            match first.as_str() {
                "transaction" | "constraints" => None,
                "time" if w(name_at + 1) == "zone" => Some(set("timezone", stmt)),
                "names" => Some(set("client_encoding", stmt)),
                _ => {
                    let name = dotted_name(stmt, name_at)?;
                    Some(set(&name, stmt))
                }
            }
        }
        "reset" => match w(1).as_str() {
            "all" => Some(Effect::ResetAll),
            "session" if w(2) == "authorization" => {
                Some(Effect::Reset("session_authorization".into()))
            }
            "time" if w(2) == "zone" => Some(Effect::Reset("timezone".into())),
            "" => None,
            _ => Some(Effect::Reset(dotted_name(stmt, 1)?)),
        },
        "discard" if w(1) == "all" => Some(Effect::DiscardAll),
        "deallocate" => {
            let at = if w(1) == "prepare" { 2 } else { 1 };
            let t = words.get(at)?;
            if t.lower() == "all" && !t.quoted {
                Some(Effect::Deallocate(None))
            } else {
                Some(Effect::Deallocate(Some(t.ident())))
            }
        }
        "listen" => Some(Effect::Listen),
        "declare" => {
            // `WITH HOLD` before `CURSOR ... FOR`.
            let words: Vec<String> = Lexer::new(stmt)
                .take_while(|t| t.quoted || t.lower() != "for")
                .map(|t| t.lower())
                .collect();
            words
                .windows(2)
                .any(|w| w[0] == "with" && w[1] == "hold")
                .then_some(Effect::HoldCursor)
        }
        _ => None,
    }
}

fn set(name: &str, stmt: &str) -> Effect {
    Effect::Set {
        name: name.to_string(),
        statement: stmt.trim().to_string(),
    }
}

/// Reads `a.b.c` starting at token `at` (GUC names are case-insensitive).
fn dotted_name(stmt: &str, at: usize) -> Option<String> {
    let mut toks = Lexer::new(stmt).skip(at).peekable();
    let mut name = toks.next()?.ident();
    while toks.peek().is_some_and(|t| t.text == ".") {
        toks.next();
        name.push('.');
        name.push_str(&toks.next()?.ident());
    }
    Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(s: &str) -> Option<Effect> {
        statement_effect(s)
    }

    #[test]
    fn fast_path_for_ordinary_queries() {
        assert_eq!(
            effects("SELECT abalance FROM pgbench_accounts WHERE aid = 5;"),
            None
        );
        assert_eq!(effects("  /* c */ select 1"), None);
        assert_eq!(effects("SELECT ';set x=1'"), None);
    }

    #[test]
    fn set_forms() {
        assert_eq!(
            one("SET search_path TO app, public"),
            Some(Effect::Set {
                name: "search_path".into(),
                statement: "SET search_path TO app, public".into()
            })
        );
        assert!(
            matches!(one("set SESSION DateStyle = 'ISO'"), Some(Effect::Set { name, .. }) if name == "datestyle")
        );
        assert!(
            matches!(one("SET TIME ZONE 'UTC'"), Some(Effect::Set { name, .. }) if name == "timezone")
        );
        assert!(
            matches!(one("SET NAMES 'UTF8'"), Some(Effect::Set { name, .. }) if name == "client_encoding")
        );
        assert!(
            matches!(one("SET shardline.role = replica"), Some(Effect::Set { name, .. }) if name == "shardline.role")
        );
        assert!(
            matches!(one("SET \"Foo\".bar = 1"), Some(Effect::Set { name, .. }) if name == "Foo.bar")
        );
        assert_eq!(one("SET LOCAL statement_timeout = 5"), None);
        assert_eq!(one("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"), None);
        assert_eq!(one("SET CONSTRAINTS ALL DEFERRED"), None);
    }

    #[test]
    fn reset_discard_deallocate_listen() {
        assert_eq!(one("RESET ALL"), Some(Effect::ResetAll));
        assert_eq!(
            one("reset statement_timeout"),
            Some(Effect::Reset("statement_timeout".into()))
        );
        assert_eq!(one("DISCARD ALL"), Some(Effect::DiscardAll));
        assert_eq!(one("DISCARD PLANS"), None);
        assert_eq!(one("DEALLOCATE ALL"), Some(Effect::Deallocate(None)));
        assert_eq!(
            one("deallocate prepare S_1"),
            Some(Effect::Deallocate(Some("s_1".into())))
        );
        assert_eq!(
            one("DEALLOCATE \"S_1\""),
            Some(Effect::Deallocate(Some("S_1".into())))
        );
        assert_eq!(one("LISTEN chan"), Some(Effect::Listen));
        assert_eq!(
            one("DECLARE c NO SCROLL CURSOR WITH HOLD FOR SELECT 1"),
            Some(Effect::HoldCursor)
        );
        assert_eq!(
            one("declare c cursor with hold for select 'with hold'"),
            Some(Effect::HoldCursor)
        );
        assert_eq!(one("DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1"), None);
        assert_eq!(one("DECLARE c CURSOR FOR SELECT 'with hold'"), None);
    }

    #[test]
    fn multi_statement_alignment() {
        let e = effects("SELECT 1; SET a.b = 1; SELECT ';'; RESET ALL;").unwrap();
        assert_eq!(e.len(), 4);
        assert!(e[0].is_none() && e[2].is_none());
        assert!(matches!(&e[1], Some(Effect::Set { name, .. }) if name == "a.b"));
        assert_eq!(e[3], Some(Effect::ResetAll));
    }
}
