//! The server connection a session holds: where it belongs, what it was
//! chosen for, and what the current unit may still do elsewhere.
//!
//! Reset rule: everything here describes one attachment. When the
//! connection goes back to its pool (`Session::release_server`) or is lost,
//! `Purpose` and `Rerun` start over; the next unit sets them again when it
//! attaches (`finish_attach`).

use crate::pool::PooledConnection;
use bytes::BytesMut;

/// A server connection and the node it belongs to: the session's attached
/// one, a participant parked in a transaction on several shards.
pub(super) struct Placed {
    pub shard: usize,
    /// Index of the node in its shard.
    pub node: usize,
    pub conn: PooledConnection,
}

impl std::ops::Deref for Placed {
    type Target = PooledConnection;

    fn deref(&self) -> &PooledConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for Placed {
    fn deref_mut(&mut self) -> &mut PooledConnection {
        &mut self.conn
    }
}

/// What the attached connection was chosen for, which decides what may
/// follow on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) enum Purpose {
    /// Nothing that limits what follows (a read under session pooling, a
    /// statement that only prepares).
    #[default]
    Any,
    /// A read under transaction pooling (a replica, or the primary
    /// standing in): only reads and its own transaction may follow on it.
    Read,
    /// A unit that may write: every later statement on it may write too,
    /// so read-your-writes learns where the primary's WAL is afterwards.
    Write,
}

impl Purpose {
    /// The purpose a unit gives a connection it attaches: `read` when it
    /// serves a read under transaction pooling, `writes` when it may write.
    pub(super) fn of(read: bool, writes: bool) -> Purpose {
        match (writes, read) {
            (true, _) => Purpose::Write,
            (false, true) => Purpose::Read,
            (false, false) => Purpose::Any,
        }
    }

    /// After a pipeline inside a transaction on several shards: a read
    /// purpose no longer holds (the transaction spans shards); writes add.
    pub(super) fn in_transaction(self, writes: bool) -> Purpose {
        if writes || self == Purpose::Write {
            Purpose::Write
        } else {
            Purpose::Any
        }
    }
}

/// A unit's messages as sent, and the client statements they prepared.
#[derive(Debug)]
pub(super) struct Kept {
    pub sent: BytesMut,
    pub prepared: Vec<Box<[u8]>>,
}

/// A read that may run again on another node while nothing of it has
/// reached the client.
#[derive(Debug, Default)]
pub(super) struct Rerun {
    /// The unit's client messages as sent, while it can still run elsewhere.
    pub sent: Option<BytesMut>,
    /// Once answers were queued for the client: the unit's messages, while
    /// nothing more was sent on the connection and its answer is not
    /// complete. It may still run elsewhere if none of those answers was
    /// written (`take_late`): a server exiting at once (an immediate
    /// shutdown) first flushes what it had buffered of the answer.
    late: Option<Kept>,
    /// The client's output when the unit's messages began to be kept.
    from: crate::stats::OutputMark,
    /// Nodes that failed for the current unit (bit per node index).
    pub tried: u64,
    /// Client statement names the kept messages prepared: a re-run
    /// prepares them again, so they are forgotten first.
    pub prepared: Vec<Box<[u8]>>,
    /// The last unit's buffer, emptied, for the next to keep its messages
    /// in: a read allocates nothing for its copy.
    spare: BytesMut,
    /// Times the read on several shards put back in front of the client's
    /// buffer ran already (`fanout::run_read_again`), taken by the next
    /// unit on several shards as it begins (`before_read`).
    pub spread_again: u8,
}

impl Rerun {
    /// A buffer grown past this is not kept for the next unit.
    const SPARE_MAX: usize = 4096;

    /// Starts keeping the unit's messages (a read on an idle connection),
    /// the client's output standing at `from`.
    pub(super) fn keep(&mut self, from: crate::stats::OutputMark) {
        self.settled();
        let mut buf = std::mem::take(&mut self.spare);
        buf.reserve(256);
        self.sent = Some(buf);
        self.from = from;
    }

    /// Something was queued for the client: running the unit elsewhere
    /// would answer twice, unless that is taken back unwritten (`late`).
    #[inline]
    pub(super) fn answered(&mut self) {
        if self.sent.is_some() {
            self.set_aside();
        }
    }

    #[cold]
    fn set_aside(&mut self) {
        if let Some(sent) = self.sent.take() {
            self.late = Some(Kept {
                sent,
                prepared: std::mem::take(&mut self.prepared),
            });
        }
    }

    /// The unit's answer is complete, or more was sent behind it: it can
    /// no longer run elsewhere.
    #[inline]
    pub(super) fn settled(&mut self) {
        if self.sent.is_some() || self.late.is_some() {
            self.let_go();
        }
    }

    /// Ends the unit's copy, its buffer kept for the next unit's.
    fn let_go(&mut self) {
        let buf = match (self.sent.take(), self.late.take()) {
            (Some(buf), _) | (None, Some(Kept { sent: buf, .. })) => buf,
            (None, None) => return,
        };
        self.prepared.clear();
        if buf.capacity() <= Self::SPARE_MAX {
            let mut buf = buf;
            buf.clear();
            self.spare = buf;
        }
    }

    /// Client bytes sent on the connection: kept with the unit's while it
    /// may run elsewhere; after an answer, they end that.
    #[inline]
    pub(super) fn record(&mut self, bytes: &[u8]) {
        if let Some(sent) = self.sent.as_mut() {
            sent.extend_from_slice(bytes);
        } else if self.late.is_some() {
            self.settled();
        }
    }

    /// The unit's messages and the statements they prepared, answered but
    /// not settled, with where the client's output stood before them.
    pub(super) fn take_late(&mut self) -> Option<(Kept, crate::stats::OutputMark)> {
        Some((self.late.take()?, self.from))
    }

    /// Whether the unit may still run elsewhere.
    pub(super) fn possible(&self) -> bool {
        self.sent.is_some()
    }

    /// The kept messages prepared client statement `name`.
    pub(super) fn prepares(&mut self, name: &[u8]) {
        if self.sent.is_some() {
            self.prepared.push(name.into());
        }
    }

    /// The unit is over: the next starts with every node untried.
    pub(super) fn reset(&mut self) {
        self.settled();
        self.tried = 0;
        self.spread_again = 0;
    }

    /// Marks `node` failed for this unit.
    pub(super) fn tried_node(&mut self, node: usize) {
        self.tried |= 1u64 << node.min(63);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purpose_of_an_attachment() {
        assert_eq!(Purpose::of(false, false), Purpose::Any);
        assert_eq!(Purpose::of(true, false), Purpose::Read);
        assert_eq!(Purpose::of(false, true), Purpose::Write);
        // A write never counts as a read, whatever served it.
        assert_eq!(Purpose::of(true, true), Purpose::Write);
    }

    #[test]
    fn purpose_inside_a_transaction_on_several_shards() {
        assert_eq!(Purpose::Read.in_transaction(false), Purpose::Any);
        assert_eq!(Purpose::Read.in_transaction(true), Purpose::Write);
        assert_eq!(Purpose::Write.in_transaction(false), Purpose::Write);
        assert_eq!(Purpose::Any.in_transaction(false), Purpose::Any);
    }

    #[test]
    fn rerun_forgets_on_answer_and_reset() {
        let mut r = Rerun::default();
        r.keep(Default::default());
        r.tried_node(2);
        r.tried_node(200);
        assert!(r.sent.is_some());
        assert_eq!(r.tried, (1 << 2) | (1 << 63));
        r.answered();
        assert!(r.sent.is_none());
        assert_eq!(r.tried, (1 << 2) | (1 << 63));
        r.reset();
        assert_eq!(r.tried, 0);
    }

    /// Answered, a unit's messages are kept aside until its answer is
    /// complete or more is sent behind it.
    #[test]
    fn an_answered_unit_is_kept_aside_until_settled() {
        let mut r = Rerun::default();
        r.keep(Default::default());
        r.record(b"Q\0\0\0\x05x");
        r.prepares(b"s1");
        r.answered();
        assert!(!r.possible());
        let (kept, _) = r.take_late().expect("kept aside");
        assert_eq!(&kept.sent[..], b"Q\0\0\0\x05x");
        assert_eq!(kept.prepared, vec![Box::from(&b"s1"[..])]);
        // More sent behind the answered unit: it cannot run alone again.
        r.keep(Default::default());
        r.answered();
        r.record(b"S\0\0\0\x04");
        assert!(r.take_late().is_none());
        // Its answer complete.
        r.keep(Default::default());
        r.answered();
        r.settled();
        assert!(r.take_late().is_none());
    }

    /// The copy of one read's messages is kept in the last one's buffer,
    /// empty; a buffer grown large is let go.
    #[test]
    fn rerun_keeps_each_unit_in_the_last_ones_buffer() {
        let mut r = Rerun::default();
        r.keep(Default::default());
        r.sent.as_mut().unwrap().extend_from_slice(b"Q\0\0\0\x05x");
        let at = r.sent.as_ref().unwrap().as_ptr();
        r.answered();
        r.keep(Default::default());
        let buf = r.sent.as_ref().unwrap();
        assert!(buf.is_empty(), "a unit starts with an empty copy");
        assert_eq!(buf.as_ptr(), at, "the same buffer");
        r.reset();
        assert!(r.sent.is_none() && r.prepared.is_empty());
        r.keep(Default::default());
        r.sent
            .as_mut()
            .unwrap()
            .extend_from_slice(&[0; 2 * Rerun::SPARE_MAX]);
        r.answered();
        r.keep(Default::default());
        assert!(r.sent.as_ref().unwrap().capacity() < Rerun::SPARE_MAX);
    }
}
