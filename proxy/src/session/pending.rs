//! What the session expects back from its server, in order.
//!
//! Every message forwarded to the server that the server answers gets an entry.
//! Entries say whether the answer goes to the client (`Forward`) or is hidden
//! because the proxy sent the message itself (`Swallow`), and `Synthetic`
//! entries are answers the proxy gives in place of the server, written when they
//! reach the front so the client sees answers in the order it asked.
//! After an error the server skips to Sync; `skip_to_sync` does the same here.

use crate::server::statements::Statement;
use shardline_router::effect::Effect;
use std::collections::VecDeque;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Forward,
    Swallow,
}

#[derive(Debug)]
pub enum Kind {
    /// A Parse; `statement` is set for named statements (forgotten if it fails).
    Parse {
        statement: Option<(Arc<Statement>, Box<[u8]>)>,
    },
    Bind,
    Close,
    /// A Describe of the client's statement of this name ("" unnamed).
    DescribeStatement(Box<[u8]>),
    DescribePortal,
    /// (Boxed, as in `Synthetic::Error`: rare and large, they would make
    /// every entry as large.)
    Execute {
        effect: Option<Box<Effect>>,
    },
    Sync,
    /// A simple query; one effect slot per statement, in order.
    Query {
        effects: VecDeque<Option<Effect>>,
    },
    FunctionCall,
    /// Where the client ended a COPY FROM STDIN (CopyDone/CopyFail); no answer.
    /// Syncs between a COPY's Execute and this mark are ignored by the server.
    CopyEnd,
    /// Answered by the proxy.
    Synthetic(Synthetic),
    /// The proxy's Execute of a portal that does not exist, failing the
    /// server's unit so that its implicit transaction is rolled back at
    /// the client's Sync, as the client was told (`client.rs::
    /// continues_here`). Its error is the proxy's own: not forwarded.
    Abort,
    /// The proxy's own query for the primary's WAL position after a write
    /// (read-your-writes); its row is kept, nothing reaches the client.
    LsnProbe(crate::PositionPending),
}

#[derive(Debug, Clone)]
pub enum Synthetic {
    ParseComplete,
    CloseComplete,
    CommandComplete(&'static str),
    /// Messages written as they are (a RowDescription and its rows).
    Rows(bytes::Bytes),
    /// ReadyForQuery with the transaction status current when it is written.
    ReadyForQuery,
    Error(Box<crate::protocol::backend::PgError>),
}

#[derive(Debug)]
pub struct Pending {
    pub kind: Kind,
    pub answer: Answer,
}

impl Pending {
    pub fn forward(kind: Kind) -> Self {
        Pending {
            kind,
            answer: Answer::Forward,
        }
    }
    pub fn swallow(kind: Kind) -> Self {
        Pending {
            kind,
            answer: Answer::Swallow,
        }
    }

    /// Whether server message `tag` completes this entry.
    pub fn ends_with(&self, tag: u8) -> bool {
        use crate::protocol::backend::*;
        match self.kind {
            Kind::Parse { .. } => tag == PARSE_COMPLETE,
            Kind::Bind => tag == BIND_COMPLETE,
            Kind::Close => tag == CLOSE_COMPLETE,
            Kind::DescribeStatement(_) | Kind::DescribePortal => {
                tag == ROW_DESCRIPTION || tag == NO_DATA
            }
            Kind::Execute { .. } => {
                matches!(tag, COMMAND_COMPLETE | EMPTY_QUERY | PORTAL_SUSPENDED)
            }
            Kind::Sync | Kind::Query { .. } | Kind::FunctionCall | Kind::LsnProbe(_) => {
                tag == READY_FOR_QUERY
            }
            Kind::Synthetic(_) | Kind::CopyEnd | Kind::Abort => false,
        }
    }

    /// Whether this entry is answered by ReadyForQuery (the end of a unit).
    pub fn is_sync_point(&self) -> bool {
        matches!(
            self.kind,
            Kind::Sync | Kind::Query { .. } | Kind::FunctionCall | Kind::LsnProbe(_)
        )
    }

    /// Simple-protocol entries absorb an error and end at ReadyForQuery;
    /// extended-protocol entries end at the error.
    pub fn ends_with_error(&self) -> bool {
        !self.is_sync_point()
    }
}

/// The server entered COPY FROM STDIN mode for the front entry: it ignores
/// the Syncs the client sent after it, up to the client's CopyDone/CopyFail.
/// Removes them; returns whether that end mark was already in the queue.
pub fn enter_copy_in(queue: &mut VecDeque<Pending>) -> bool {
    let mut i = 1;
    while i < queue.len() {
        match queue[i].kind {
            Kind::CopyEnd => {
                queue.remove(i);
                return true;
            }
            Kind::Sync => {
                queue.remove(i);
            }
            _ => i += 1,
        }
    }
    false
}

/// How many ReadyForQuery the client still waits for among `queue`: one
/// per unit forwarded to the server (a Sync, a simple query, a function
/// call) and one per reply the proxy writes itself. A commit's reply held
/// for its WAL position (its unit's entry, the position query, then the
/// proxy's ReadyForQuery) is one reply, not two; units the client sent
/// behind a held reply are counted too.
pub fn owed_replies(queue: &VecDeque<Pending>) -> usize {
    let roles: Vec<Role> = queue
        .iter()
        .map(|p| match (&p.kind, p.answer) {
            (Kind::Synthetic(Synthetic::ReadyForQuery), _) => Role::ProxyReady,
            (Kind::LsnProbe(_), _) => Role::Probe,
            (_, Answer::Forward) if p.is_sync_point() => Role::Unit,
            _ => Role::Other,
        })
        .collect();
    owed(&roles)
}

/// Whether the server still owes an answer to an entry of `queue` (the
/// proxy's own answers, `Synthetic`, are not the server's).
pub fn awaits_server(queue: &VecDeque<Pending>) -> bool {
    queue
        .iter()
        .any(|p| !matches!(p.kind, Kind::Synthetic(_) | Kind::CopyEnd))
}

/// What an entry means for the replies a client waits for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    /// The end of a unit forwarded to the server.
    Unit,
    /// The position query.
    Probe,
    /// A ReadyForQuery the proxy writes.
    ProxyReady,
    Other,
}

fn owed(roles: &[Role]) -> usize {
    roles
        .iter()
        .enumerate()
        .filter(|&(i, r)| match r {
            Role::ProxyReady => true,
            // Held: its reply is the proxy's one after the position query.
            Role::Unit => roles.get(i + 1..i + 3) != Some(&[Role::Probe, Role::ProxyReady]),
            _ => false,
        })
        .count()
}

/// Removes the entries the server skips after an error: everything before the
/// next Sync. Returns them so the caller can undo their bookkeeping.
pub fn skip_to_sync(queue: &mut VecDeque<Pending>) -> Vec<Pending> {
    let mut skipped = Vec::new();
    while let Some(front) = queue.front() {
        if front.is_sync_point() {
            break;
        }
        skipped.extend(queue.pop_front());
    }
    skipped
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::backend::*;

    #[test]
    fn an_entry_is_small() {
        // Five or so entries are queued and taken per unit: each move
        // copies the whole entry, so the rare large payloads are boxed.
        assert!(
            std::mem::size_of::<Pending>() <= 56,
            "{} bytes",
            std::mem::size_of::<Pending>()
        );
    }

    #[test]
    fn only_the_servers_answers_are_awaited() {
        let mut q = VecDeque::new();
        assert!(!awaits_server(&q));
        q.push_back(Pending::forward(Kind::Synthetic(Synthetic::ReadyForQuery)));
        q.push_back(Pending::forward(Kind::CopyEnd));
        assert!(!awaits_server(&q), "the proxy's own answers");
        q.push_back(Pending::swallow(Kind::Sync));
        assert!(awaits_server(&q), "the proxy's own Sync is answered");
    }

    #[test]
    fn endings() {
        assert!(Pending::forward(Kind::Bind).ends_with(BIND_COMPLETE));
        assert!(!Pending::forward(Kind::DescribeStatement(Box::default()))
            .ends_with(PARAMETER_DESCRIPTION));
        assert!(Pending::forward(Kind::DescribeStatement(Box::default())).ends_with(NO_DATA));
        assert!(Pending::forward(Kind::Execute { effect: None }).ends_with(PORTAL_SUSPENDED));
        assert!(!Pending::forward(Kind::Query {
            effects: VecDeque::new()
        })
        .ends_with(COMMAND_COMPLETE));
        assert!(Pending::forward(Kind::Query {
            effects: VecDeque::new()
        })
        .ends_with(READY_FOR_QUERY));
    }

    #[test]
    fn replies_owed_when_the_server_is_lost() {
        use Role::*;
        assert_eq!(owed(&[]), 0);
        // A unit in flight (Bind, Execute, Sync); the proxy's own queries
        // owe the client nothing.
        assert_eq!(owed(&[Other, Other, Unit]), 1);
        assert_eq!(owed(&[Other, Probe]), 0);
        // A commit's reply held after its unit was answered.
        assert_eq!(owed(&[Probe, ProxyReady]), 1);
        // The position query sent with the commit: one reply.
        assert_eq!(owed(&[Unit, Probe, ProxyReady]), 1);
        // Units sent behind a held reply wait for their own.
        assert_eq!(owed(&[Probe, ProxyReady, Other, Other, Unit]), 2);
        assert_eq!(owed(&[Unit, Probe, ProxyReady, Unit]), 2);
        assert_eq!(owed(&[Unit, Unit, Probe, ProxyReady]), 2);
    }

    #[test]
    fn copy_in_ignores_syncs_until_copy_end() {
        let mut q: VecDeque<Pending> = [
            Pending::forward(Kind::Execute { effect: None }),
            Pending::forward(Kind::Sync),
            Pending::forward(Kind::CopyEnd),
            Pending::forward(Kind::Sync),
        ]
        .into();
        assert!(enter_copy_in(&mut q));
        assert_eq!(q.len(), 2);
        assert!(matches!(q[1].kind, Kind::Sync));
        let mut q: VecDeque<Pending> = [
            Pending::forward(Kind::Execute { effect: None }),
            Pending::forward(Kind::Sync),
        ]
        .into();
        assert!(!enter_copy_in(&mut q));
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn error_skips_to_sync() {
        let mut q: VecDeque<Pending> = [
            Pending::forward(Kind::Bind),
            Pending::forward(Kind::Synthetic(Synthetic::ParseComplete)),
            Pending::forward(Kind::Execute { effect: None }),
            Pending::forward(Kind::Sync),
            Pending::forward(Kind::Bind),
        ]
        .into();
        let skipped = skip_to_sync(&mut q);
        assert_eq!(skipped.len(), 3);
        assert!(matches!(q.front().unwrap().kind, Kind::Sync));
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn the_proxys_abort_is_answered_only_by_its_error() {
        // No message but the error it provokes ends it; that error skips
        // to the client's Sync, the proxy's refusal before it included
        // when a server error came first (one error per unit).
        let abort = Pending::swallow(Kind::Abort);
        for tag in [COMMAND_COMPLETE, BIND_COMPLETE, READY_FOR_QUERY, NO_DATA] {
            assert!(!abort.ends_with(tag));
        }
        assert!(abort.ends_with_error() && !abort.is_sync_point());
        let mut q: VecDeque<Pending> = [
            Pending::forward(Kind::Execute { effect: None }),
            Pending::forward(Kind::Synthetic(Synthetic::Error(Box::new(PgError::error(
                "0A000", "refused",
            ))))),
            abort,
            Pending::forward(Kind::Sync),
        ]
        .into();
        q.pop_front();
        assert_eq!(skip_to_sync(&mut q).len(), 2);
        assert!(matches!(q.front().unwrap().kind, Kind::Sync));
    }
}
