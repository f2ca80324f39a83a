//! The client's statements on a server connection, for every executor.
//!
//! A named statement runs under its process-wide server name
//! (`Statement::server_name`) and is prepared on a connection the first
//! time one of the client's messages needs it there, after the Close of
//! the statement it evicts when the connection holds its limit; the
//! client's unnamed statement is prepared again on a connection whose
//! unnamed statement is another's. The executor says where what these
//! messages owe is recorded (`Owes`): the session's pending queue on its
//! one connection, a leg's marks in a fan-out. Both hide the answers to
//! the proxy's own messages by the same entries (`pending.rs`).

use super::pending::{Answer, Kind};
use crate::protocol::frontend;
use crate::server::statements::{ServerStatements, Statement};
use bytes::BytesMut;
use std::sync::Arc;

/// A connection being written to, and where what its messages owe goes.
pub(super) trait Owes {
    /// The statements the connection holds and its unnamed statement's
    /// token.
    fn held(&mut self) -> (&mut ServerStatements, &mut u64);
    /// `out` ends with a message of the proxy's own, owing `kind`: its
    /// answer is hidden.
    fn own(&mut self, out: &[u8], kind: Kind);
    /// `out` ends with a Parse of `stmt` (the connection forgets it if the
    /// Parse fails); its answer reaches the client when `answer` says so,
    /// for the client's name `client_name`.
    fn prepares(
        &mut self,
        out: &[u8],
        stmt: &Arc<Statement>,
        answer: Answer,
        client_name: Box<[u8]>,
    );
}

/// Writes a Parse of `stmt` under its server name, after the Close of the
/// statement it evicts from the connection.
pub(super) fn prepare(
    to: &mut impl Owes,
    out: &mut BytesMut,
    stmt: &Arc<Statement>,
    answer: Answer,
    client_name: Box<[u8]>,
) {
    if let Some(evicted) = to.held().0.insert(stmt) {
        frontend::write_target(out, frontend::CLOSE, b'S', &evicted.server_name);
        to.own(out, Kind::Close);
    }
    frontend::write_parse(out, &stmt.server_name, &stmt.definition);
    to.prepares(out, stmt, answer, client_name);
}

/// Prepares `stmt` on the connection (its answer hidden) unless it holds
/// it already.
pub(super) fn ensure(to: &mut impl Owes, out: &mut BytesMut, stmt: &Arc<Statement>) {
    if !to.held().0.contains(stmt.id) {
        prepare(to, out, stmt, Answer::Swallow, Box::default());
    }
}

/// Makes the connection's unnamed statement the client's (`token`, its
/// Parse `definition`), its answer hidden, unless it is already.
pub(super) fn ensure_unnamed(
    to: &mut impl Owes,
    out: &mut BytesMut,
    token: u64,
    definition: &[u8],
) {
    let held = to.held().1;
    if *held != token {
        *held = token;
        frontend::write_parse(out, b"", definition);
        to.own(out, Kind::Parse { statement: None });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection's holdings and what was recorded, by message.
    struct Recorded {
        statements: ServerStatements,
        unnamed: u64,
        /// (tag, end in `out`, hidden, statement prepared).
        owed: Vec<(u8, usize, bool, Option<u64>)>,
    }

    impl Owes for Recorded {
        fn held(&mut self) -> (&mut ServerStatements, &mut u64) {
            (&mut self.statements, &mut self.unnamed)
        }
        fn own(&mut self, out: &[u8], kind: Kind) {
            let tag = match kind {
                Kind::Close => frontend::CLOSE,
                _ => frontend::PARSE,
            };
            self.owed.push((tag, out.len(), true, None));
        }
        fn prepares(&mut self, out: &[u8], stmt: &Arc<Statement>, answer: Answer, _: Box<[u8]>) {
            let hidden = answer == Answer::Swallow;
            self.owed
                .push((frontend::PARSE, out.len(), hidden, Some(stmt.id)));
        }
    }

    /// A statement is prepared once per connection, the least recently used
    /// one closed first when the connection holds its limit; the unnamed
    /// statement is prepared again only for another token. Every message
    /// written is recorded where it ends.
    #[test]
    fn statements_are_prepared_once_per_connection() {
        let registry = crate::server::statements::StatementRegistry::default();
        let route = shardline_router::cache::route_uncached("SELECT 1", &Default::default(), None);
        let s: Vec<_> = (0..3)
            .map(|i| registry.intern(format!("SELECT {i}\0\0\0").as_bytes(), None, route.clone()))
            .collect();
        let mut to = Recorded {
            statements: ServerStatements::new(2),
            unnamed: 0,
            owed: Vec::new(),
        };
        let mut out = BytesMut::new();
        prepare(
            &mut to,
            &mut out,
            &s[0],
            Answer::Forward,
            b"mine".to_vec().into(),
        );
        ensure(&mut to, &mut out, &s[0]);
        ensure(&mut to, &mut out, &s[1]);
        ensure(&mut to, &mut out, &s[2]);
        ensure_unnamed(&mut to, &mut out, 7, b"SELECT 9\0\0\0");
        ensure_unnamed(&mut to, &mut out, 7, b"SELECT 9\0\0\0");
        let written: Vec<(u8, usize)> = crate::protocol::complete_frames(&out, usize::MAX)
            .scan(0, |end, (tag, body)| {
                *end += 5 + body.len();
                Some((tag, *end))
            })
            .collect();
        let recorded: Vec<(u8, usize)> = to.owed.iter().map(|&(t, e, ..)| (t, e)).collect();
        assert_eq!(written, recorded, "each message recorded where it ends");
        let what: Vec<(u8, bool, Option<u64>)> =
            to.owed.iter().map(|&(t, _, h, s)| (t, h, s)).collect();
        let (p, c) = (frontend::PARSE, frontend::CLOSE);
        assert_eq!(
            what,
            [
                (p, false, Some(s[0].id)),
                (p, true, Some(s[1].id)),
                (c, true, None),
                (p, true, Some(s[2].id)),
                (p, true, None),
            ]
        );
        assert!(
            !to.statements.contains(s[0].id),
            "the least recently used went"
        );
        assert_eq!(to.unnamed, 7);
    }
}
