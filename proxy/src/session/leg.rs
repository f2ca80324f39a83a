//! One shard's connection in a unit on several shards (`fanout/`,
//! `gather.rs`, `pipeline.rs`, `distributed.rs`): what is written to it and
//! what it owes back.
//!
//! The bytes for a leg are written by the unit's executor, the proxy's own
//! messages among them marked where they are written (`Leg::own`: the
//! session's settings, a BEGIN; through `rename::Owes`, a Parse of a
//! statement the connection lacks). When sent, they become the connection's pending queue
//! (`Leg::owe`), with the same entries and rules as a session's on one
//! connection (`pending.rs`), and `Leg::next` hides the answers to the
//! proxy's own messages at their place in the stream.

use super::pending::{self, Answer, Kind, Pending};
use crate::pool::PooledConnection;
use crate::protocol::backend;
use crate::protocol::frontend;
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

/// A client's Parse, recorded: the unnamed statement's token, or the named one.
pub(super) enum Parsed {
    Unnamed(u64),
    Named(Arc<crate::server::statements::Statement>),
}

/// A message in the bytes written for a leg, by where it ends: the
/// proxy's own (its answer hidden), and the server statement a Parse
/// prepares (forgotten by the connection if the Parse fails).
struct Mark {
    end: usize,
    own: bool,
    statement: Option<Arc<crate::server::statements::Statement>>,
}

/// One shard's part of a fan-out.
pub(super) struct Leg {
    pub(super) shard: usize,
    /// The node (in its shard) the connection belongs to.
    pub(super) node: usize,
    pub(super) conn: PooledConnection,
    /// Messages marked in the bytes being written for this leg (`own`,
    /// `prepares`), until they are sent (`owe`).
    marks: Vec<Mark>,
    /// What the server owes for the messages sent, in order: the same
    /// entries as a session's pending queue, the proxy's own answers
    /// swallowed (`next`).
    owed: VecDeque<Pending>,
    pub(super) done: bool,
    /// Joins the client's transaction with this unit: its BEGIN, sent first.
    pub(super) joins: Option<Bytes>,
    /// The session's attached connection before the unit: attached again
    /// after it (`Session::park_legs`).
    pub(super) attached: bool,
    /// Borrowed on a replica (a read served there while its primary is
    /// down): nothing is written through it, so no WAL position is asked
    /// of it (the query fails on a standby, and an unknown position sends
    /// the user's reads of the shard to its primary for a while).
    pub(super) replica: bool,
    /// Its connection failed (a read or write error, or the server's
    /// warning that it exits): the node is banned if the unit runs again.
    pub(super) lost: bool,
}

impl Leg {
    /// A connection with nothing in flight.
    pub(super) fn parked(shard: usize, node: usize, conn: PooledConnection) -> Leg {
        Leg {
            shard,
            node,
            conn,
            marks: Vec::new(),
            owed: Default::default(),
            done: true,
            joins: None,
            attached: false,
            replica: false,
            lost: false,
        }
    }

    /// The connection, out of the unit.
    pub(super) fn into_placed(self) -> super::attach::Placed {
        super::attach::Placed {
            shard: self.shard,
            node: self.node,
            conn: self.conn,
        }
    }

    /// The message just written at the end of `out` is the proxy's own:
    /// its answer is hidden from the client.
    pub(super) fn own(&mut self, out: &[u8]) {
        self.mark(out.len(), true, None);
    }

    pub(super) fn mark(
        &mut self,
        end: usize,
        own: bool,
        statement: Option<Arc<crate::server::statements::Statement>>,
    ) {
        self.marks.push(Mark {
            end,
            own,
            statement,
        });
    }

    /// `out` is about to be sent: what the server will owe for each of its
    /// messages, in order, the proxy's own (`own`) marked to be swallowed.
    fn owe(&mut self, out: &[u8]) {
        let marks = std::mem::take(&mut self.marks);
        self.owed.extend(owed_for(out, marks));
    }

    /// Writes `out` and empties it.
    pub(super) async fn write(&mut self, out: &mut BytesMut) -> Result<(), String> {
        self.owe(out);
        if let Err(e) = self.conn.writer().write_all(out).await {
            self.lost = true;
            return Err(format!("server {}: {e}", self.conn.addr));
        }
        out.clear();
        Ok(())
    }

    /// Writes `out` whole while taking in what the server answers
    /// meanwhile (kept in the connection's read buffer, up to `limit`
    /// bytes): a server blocked on sending its answers to a long pipeline
    /// would otherwise stop reading it, and both sides would wait forever.
    pub(super) async fn send_draining(&mut self, out: &[u8], limit: usize) -> Result<(), String> {
        use std::pin::Pin;
        use std::task::Poll;
        use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
        self.owe(out);
        let conn: &mut crate::server::ServerConnection = &mut self.conn;
        let addr = conn.addr.clone();
        let lost = &mut self.lost;
        let mut written = 0;
        let mut chunk = [0u8; 16 * 1024];
        std::future::poll_fn(|cx| {
            while written < out.len() {
                match Pin::new(conn.writer()).poll_write(cx, &out[written..]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(format!("server {addr} closed the connection")))
                    }
                    Poll::Ready(Ok(n)) => written += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(format!("server {addr}: {e}"))),
                    Poll::Pending => break,
                }
            }
            if written == out.len() {
                return match Pin::new(conn.writer()).poll_flush(cx) {
                    Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
                    Poll::Ready(Err(e)) => Poll::Ready(Err(format!("server {addr}: {e}"))),
                    Poll::Pending => Poll::Pending,
                };
            }
            // Blocked on writing: take in answers so the server goes on.
            loop {
                if conn.read_buf.len() > limit {
                    return Poll::Ready(Err(format!(
                        "the answers of server {addr} to one pipeline passed {} MiB before the pipeline was sent; send a Sync more often",
                        limit >> 20
                    )));
                }
                let mut buf = ReadBuf::new(&mut chunk);
                match Pin::new(conn.stream()).poll_read(cx, &mut buf) {
                    Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                        return Poll::Ready(Err(format!("server {addr} closed the connection")))
                    }
                    Poll::Ready(Ok(())) => conn.read_buf.extend_from_slice(buf.filled()),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(format!("server {addr}: {e}"))),
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await
        .inspect_err(|_| *lost = true)
    }

    /// Copies the run of rows at the front of what the shard has sent
    /// (already read, `backend::rows_run`) to `out`, when they are answers
    /// the unit sees (not the proxy's own): what `next` would return one by
    /// one, in one copy. Whether there was one.
    pub(super) fn take_rows(&mut self, out: &mut BytesMut) -> bool {
        if self
            .owed
            .front()
            .is_some_and(|p| p.answer == Answer::Swallow)
        {
            return false;
        }
        let run = backend::rows_run(&self.conn.read_buf);
        if run == 0 {
            return false;
        }
        out.extend_from_slice(&self.conn.read_buf[..run]);
        bytes::Buf::advance(&mut self.conn.read_buf, run);
        true
    }

    /// The next message from this shard that the client's unit should see:
    /// the answers to the proxy's own messages are swallowed, by position
    /// (`owed`), as a session swallows them on one connection. An error
    /// answering one of the proxy's own messages is returned: the unit
    /// fails with it.
    pub(super) async fn next(&mut self) -> Result<BytesMut, String> {
        loop {
            let msg = self
                .conn
                .raw_message()
                .await
                .inspect_err(|_| self.lost = true)?;
            if msg[0] == backend::NOTICE_RESPONSE {
                if let Some(reason) = backend::farewell_reason(&msg[5..]) {
                    // The server exits now (an immediate shutdown, a crash):
                    // the unit fails here, the warning kept from the client.
                    self.lost = true;
                    return Err(format!("server {}: {reason}", self.conn.addr));
                }
            }
            let (deliver, failed) = answer(&mut self.owed, msg[0]);
            if let Some(Pending {
                kind:
                    Kind::Parse {
                        statement: Some((stmt, _)),
                    },
                ..
            }) = failed
            {
                // Not prepared there after all.
                self.conn.statements.remove(stmt.id);
            }
            if deliver {
                return Ok(msg);
            }
        }
    }
}

/// What the server will owe for the messages of `out`, in order; `marks`
/// (in the order written) say which are the proxy's own and which Parse
/// prepares which statement.
fn owed_for(out: &[u8], marks: Vec<Mark>) -> Vec<Pending> {
    let mut marks = marks.into_iter().peekable();
    let mut owed = Vec::new();
    let mut end = 0;
    for (tag, body) in crate::protocol::complete_frames(out, usize::MAX) {
        end += 5 + body.len();
        let mark = marks.next_if(|m| m.end == end);
        let Some(mut kind) = owed_kind(tag, body) else {
            continue;
        };
        let (own, statement) = mark.map_or((false, None), |m| (m.own, m.statement));
        if let (Kind::Parse { statement: s }, Some(stmt)) = (&mut kind, statement) {
            *s = Some((stmt, Box::default()));
        }
        owed.push(if own {
            Pending::swallow(kind)
        } else {
            Pending::forward(kind)
        });
    }
    owed
}

/// Where server message `tag` falls in what the connection owes (`owed`,
/// updated): whether it reaches the unit (answers to the proxy's own
/// messages do not, except an error, which fails the unit), and the entry
/// an error ended, if any.
fn answer(owed: &mut VecDeque<Pending>, tag: u8) -> (bool, Option<Pending>) {
    let Some(front) = owed.front() else {
        // Nothing known to be owed: everything goes to the unit.
        return (true, None);
    };
    let own = front.answer == Answer::Swallow;
    match tag {
        backend::NOTICE_RESPONSE | backend::NOTIFICATION | backend::PARAMETER_STATUS => {}
        backend::ERROR_RESPONSE => {
            let mut failed = None;
            if front.ends_with_error() {
                failed = owed.pop_front();
                // The server skips to the next Sync.
                pending::skip_to_sync(owed);
            }
            return (true, failed);
        }
        backend::COPY_IN_RESPONSE => {
            // The server ignores the Syncs sent after the COPY until the
            // client's CopyDone or CopyFail.
            pending::enter_copy_in(owed);
        }
        _ => {
            if front.ends_with(tag) {
                owed.pop_front();
            }
        }
    }
    (!own, None)
}

/// What the server owes for a message sent to it (tag and body), if it answers.
fn owed_kind(tag: u8, body: &[u8]) -> Option<Kind> {
    Some(match tag {
        frontend::PARSE => Kind::Parse { statement: None },
        frontend::BIND => Kind::Bind,
        frontend::CLOSE => Kind::Close,
        frontend::DESCRIBE if body.first() == Some(&b'S') => {
            Kind::DescribeStatement(Box::default())
        }
        frontend::DESCRIBE => Kind::DescribePortal,
        frontend::EXECUTE => Kind::Execute { effect: None },
        frontend::SYNC => Kind::Sync,
        frontend::QUERY => Kind::Query {
            effects: Default::default(),
        },
        frontend::FUNCTION_CALL => Kind::FunctionCall,
        _ => return None,
    })
}

/// Reads every leg to its ReadyForQuery (after a unit's last answer, or
/// after an error, when the shards skip to it).
pub(super) async fn drain_to_ready(legs: &mut [Leg]) -> Result<(), String> {
    for leg in legs.iter_mut() {
        while leg.next().await?[0] != backend::READY_FOR_QUERY {}
        leg.done = true;
    }
    Ok(())
}

/// Reads every leg to its ReadyForQuery, `ends` holding each leg's last
/// message read (a ReadyForQuery there ends it already).
pub(super) async fn drain_after(legs: &mut [Leg], ends: &[BytesMut]) -> Result<(), String> {
    for (leg, end) in legs.iter_mut().zip(ends) {
        if end[0] != backend::READY_FOR_QUERY {
            while leg.next().await?[0] != backend::READY_FOR_QUERY {}
        }
        leg.done = true;
    }
    Ok(())
}

/// Writes a client's Parse (recorded as `parsed`) for one leg: the unnamed
/// statement as sent, a named one under its server name, closed first
/// (answer skipped) so the Parse answers on every shard alike, whether the
/// connection held the statement or not.
pub(super) fn parse_on(
    leg: &mut Leg,
    parsed: &Parsed,
    f: &crate::protocol::Frame,
    out: &mut BytesMut,
) {
    match parsed {
        Parsed::Unnamed(token) => {
            leg.conn.unnamed_token = *token;
            out.extend_from_slice(&f.bytes);
        }
        Parsed::Named(stmt) => {
            // Closed first: the connection may hold it under that name.
            frontend::write_target(out, frontend::CLOSE, b'S', &stmt.server_name);
            leg.own(out);
            super::rename::prepare(leg, out, stmt, Answer::Forward, Box::default());
        }
    }
}

impl super::rename::Owes for Leg {
    fn held(&mut self) -> (&mut crate::server::statements::ServerStatements, &mut u64) {
        let conn: &mut crate::server::ServerConnection = &mut self.conn;
        (&mut conn.statements, &mut conn.unnamed_token)
    }

    /// (The kind is read from the bytes when they are sent: `owe`.)
    fn own(&mut self, out: &[u8], _: Kind) {
        self.mark(out.len(), true, None);
    }

    fn prepares(
        &mut self,
        out: &[u8],
        stmt: &Arc<crate::server::statements::Statement>,
        answer: Answer,
        _: Box<[u8]>,
    ) {
        self.mark(out.len(), answer == Answer::Swallow, Some(stmt.clone()));
    }
}

impl super::Session {
    /// `leg`'s next message for the client, as `Leg::next`, unless the
    /// client leaves first (its socket closed, or killed from the
    /// console): then an error that gives the unit up, the reason kept in
    /// `left` for `finish_legs` to cancel the unit's servers and end the
    /// session. A statement on several shards would otherwise
    /// run to its end, holding its locks, after its client is gone.
    pub(super) async fn leg_next(&mut self, leg: &mut Leg) -> Result<BytesMut, String> {
        let next = leg.next();
        let mut next = std::pin::pin!(next);
        std::future::poll_fn(|cx| {
            if let std::task::Poll::Ready(msg) = next.as_mut().poll(cx) {
                return std::task::Poll::Ready(msg);
            }
            if self.left.is_none() {
                let std::task::Poll::Ready(end) = self.poll_client_left(cx) else {
                    return std::task::Poll::Pending;
                };
                self.left = Some(end);
            }
            std::task::Poll::Ready(Err("the client left".into()))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Messages for a leg: (tag, the proxy's own) each, with its marks.
    fn written(messages: &[(u8, bool)]) -> (BytesMut, Vec<Mark>) {
        let mut out = BytesMut::new();
        let mut marks = Vec::new();
        for &(tag, own) in messages {
            let body: &[u8] = if tag == frontend::DESCRIBE {
                b"S\0"
            } else {
                b""
            };
            backend::put_message(&mut out, tag, |b| b.extend_from_slice(body));
            if own {
                marks.push(Mark {
                    end: out.len(),
                    own: true,
                    statement: None,
                });
            }
        }
        (out, marks)
    }

    /// The tags of `replies` that reach the unit.
    fn delivered(owed: &mut VecDeque<Pending>, replies: &[u8]) -> Vec<u8> {
        replies
            .iter()
            .copied()
            .filter(|&t| answer(owed, t).0)
            .collect()
    }

    const P: u8 = frontend::PARSE;
    const B: u8 = frontend::BIND;
    const E: u8 = frontend::EXECUTE;
    const S: u8 = frontend::SYNC;
    const Q: u8 = frontend::QUERY;

    #[test]
    fn own_answers_are_hidden_where_they_are_owed() {
        // A statement prepared by the proxy after the client's first
        // execution: its ParseComplete is the fifth answer, not the first.
        let (out, marks) = written(&[
            (P, false),
            (B, false),
            (E, false),
            (P, true),
            (B, false),
            (E, false),
            (S, false),
        ]);
        let mut owed: VecDeque<Pending> = owed_for(&out, marks).into();
        assert_eq!(delivered(&mut owed, b"12DC12DCZ"), b"12DC2DCZ".to_vec());
        assert!(owed.is_empty());
    }

    #[test]
    fn own_queries_first_are_hidden_to_their_ready() {
        // The session's settings and BEGIN, then the client's unit.
        let (out, marks) = written(&[
            (Q, true),
            (Q, true),
            (P, false),
            (frontend::DESCRIBE, false),
            (B, false),
            (E, false),
            (S, false),
        ]);
        let mut owed: VecDeque<Pending> = owed_for(&out, marks).into();
        assert_eq!(delivered(&mut owed, b"SCZCZ1tT2DCZ"), b"1tT2DCZ".to_vec());
        assert!(owed.is_empty());
    }

    #[test]
    fn errors_skip_to_the_sync_and_own_errors_fail_the_unit() {
        // The client's Bind fails: the server skips the proxy's Parse and
        // the rest to the Sync.
        let (out, marks) = written(&[(P, false), (B, false), (P, true), (B, false), (S, false)]);
        let mut owed: VecDeque<Pending> = owed_for(&out, marks).into();
        assert_eq!(delivered(&mut owed, b"1EZ"), b"1EZ".to_vec());
        assert!(owed.is_empty());
        // The proxy's own Parse fails: the error reaches the unit and names
        // the entry it ended.
        let (out, marks) = written(&[(P, true), (B, false), (E, false), (S, false)]);
        let mut owed: VecDeque<Pending> = owed_for(&out, marks).into();
        let (deliver, failed) = answer(&mut owed, backend::ERROR_RESPONSE);
        assert!(deliver);
        assert!(matches!(failed.map(|p| p.kind), Some(Kind::Parse { .. })));
        assert_eq!(delivered(&mut owed, b"Z"), b"Z".to_vec());
        // An own query's error reaches the unit; its ReadyForQuery does not.
        let (out, marks) = written(&[(Q, true), (Q, false)]);
        let mut owed: VecDeque<Pending> = owed_for(&out, marks).into();
        assert_eq!(delivered(&mut owed, b"EZCZ"), b"ECZ".to_vec());
    }

    #[test]
    fn copy_in_drops_the_syncs_the_server_ignores() {
        let (out, marks) = written(&[(P, false), (B, false), (E, false), (S, false)]);
        let mut owed: VecDeque<Pending> = owed_for(&out, marks).into();
        assert_eq!(delivered(&mut owed, b"12G"), b"12G".to_vec());
        // The Sync after CopyDone is the one answered.
        let (out, marks) = written(&[(frontend::COPY_DONE, false), (S, false)]);
        owed.extend(owed_for(&out, marks));
        assert_eq!(delivered(&mut owed, b"CZ"), b"CZ".to_vec());
        assert!(owed.is_empty());
    }

    #[test]
    fn nothing_owed_delivers_everything() {
        let mut owed = VecDeque::new();
        assert_eq!(delivered(&mut owed, b"DCZ"), b"DCZ".to_vec());
    }
}
