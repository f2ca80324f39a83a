//! How far the client's extended-protocol unit has reached on the server.
//!
//! A unit runs from its first message to its Sync. While it is open the
//! connection cannot be released (the server would end it at the next
//! client's Sync), and a Flush may split off the part that only prepares
//! statements, before any Bind places it (`client.rs::prepare_only_segment`).

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) enum Unit {
    /// Nothing sent since the last Sync.
    #[default]
    Closed,
    /// Messages sent since the last Sync, none a Bind or Execute: the
    /// unit only prepares so far.
    Preparing,
    /// A Bind or Execute was sent: the unit is placed. `ends`: what its
    /// one execution so far does to the writes sent before it (`Ends`),
    /// read at its Sync (`client.rs::position_query_at_sync`).
    Bound { ends: Ends },
    /// The unit went to the server before its end arrived (a Flush after
    /// a Bind, as a psycopg pipeline fetching results sends, or more than
    /// the proxy holds): it was placed by its messages buffered then, of
    /// which `planned` bytes are still to be taken. A Bind after them is
    /// placed before it is sent (`client.rs::continues_here`): one for
    /// another shard cannot run on this connection.
    Early { planned: usize },
}

/// What a statement does to the writes of the transaction it ends, as
/// far as read-your-writes asks: a commit's position is learned (the
/// position query goes with it), writes discarded need none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) enum Ends {
    /// Anything else, or not known.
    #[default]
    Nothing,
    /// A COMMIT of the open transaction, or one statement in autocommit.
    Commits,
    /// A lone ROLLBACK or ABORT, or a COMMIT of a failed transaction:
    /// whatever the transaction wrote is gone.
    Discards,
}

impl Unit {
    pub(super) fn is_open(self) -> bool {
        self != Unit::Closed
    }

    /// A Parse, Describe or Close went to the server.
    pub(super) fn prepare(&mut self) {
        if *self == Unit::Closed {
            *self = Unit::Preparing;
        }
    }

    /// A Bind went to the server; `ends` is what its statement does when
    /// it is the unit's first (a second execution: the unit's effect is
    /// known only as its Sync may tell).
    pub(super) fn bind(&mut self, ends: Ends) {
        match self {
            Unit::Closed | Unit::Preparing => *self = Unit::Bound { ends },
            Unit::Bound { ends } => *ends = Ends::Nothing,
            Unit::Early { .. } => {}
        }
    }

    /// An Execute went to the server (of a portal bound in this unit or
    /// an earlier one), or a COPY it ran started.
    pub(super) fn execute(&mut self) {
        if matches!(self, Unit::Closed | Unit::Preparing) {
            *self = Unit::Bound {
                ends: Ends::Nothing,
            };
        }
    }

    /// Whether no Bind or Execute went to the server in this unit yet.
    pub(super) fn unbound(self) -> bool {
        matches!(self, Unit::Closed | Unit::Preparing)
    }

    /// What the unit's one execution does to the transaction's writes.
    pub(super) fn ends(self) -> Ends {
        match self {
            Unit::Bound { ends } => ends,
            _ => Ends::Nothing,
        }
    }

    /// The unit runs before its end arrived; its first `planned` bytes of
    /// messages were placed with it.
    pub(super) fn early(&mut self, planned: usize) {
        *self = Unit::Early { planned };
    }

    /// A client message of `len` bytes was taken.
    #[inline]
    pub(super) fn took(&mut self, len: usize) {
        if let Unit::Early { planned } = self {
            *planned = planned.saturating_sub(len);
        }
    }

    /// Whether the client's next Bind was not placed with the unit.
    pub(super) fn unplaced(self) -> bool {
        self == Unit::Early { planned: 0 }
    }

    /// The unit ended (its Sync, the proxy's own Sync after a prepare-only
    /// part, or the connection was lost).
    pub(super) fn close(&mut self) {
        *self = Unit::Closed;
    }
}

/// How the client's next messages are taken: as they come, or held back
/// by something between them and their Sync. One state at a time: each
/// ends at a Sync (the client's or the proxy's own) or a COPY's end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) enum Inflow {
    /// Each message is handled as it comes.
    #[default]
    Open,
    /// The proxy closed a prepare-only part of the unit with a Sync of its
    /// own (`client.rs::prepare_only_segment`): the client's next messages
    /// wait for its answer, which says whether they are skipped.
    AfterSegment,
    /// An error ended the unit (the server's, or one the proxy raised the
    /// way a server would): messages are dropped up to the client's Sync.
    SkipToSync,
    /// The server is in COPY FROM STDIN and ignores the client's Syncs
    /// until its CopyDone or CopyFail (or an error ends the COPY).
    CopyIn,
}

impl Inflow {
    /// Whether a client message with `tag` is dropped (skipping to Sync).
    pub(super) fn drops(self, tag: u8) -> bool {
        self == Inflow::SkipToSync
            && tag != crate::protocol::frontend::SYNC
            && tag != crate::protocol::frontend::TERMINATE
    }

    /// The answer to the proxy's own Sync after a prepare-only part came:
    /// a unit that failed there is skipped to the client's Sync.
    pub(super) fn segment_answered(&mut self, failed: bool) {
        if *self == Inflow::AfterSegment {
            *self = if failed {
                Inflow::SkipToSync
            } else {
                Inflow::Open
            };
        }
    }

    /// The client's Sync: whether it ends the unit (not while the server
    /// ignores Syncs in COPY FROM STDIN).
    pub(super) fn sync(&mut self) -> bool {
        match self {
            Inflow::CopyIn => false,
            _ => {
                *self = Inflow::Open;
                true
            }
        }
    }

    /// The COPY ended on the server (the client's CopyDone or CopyFail,
    /// or an error): Syncs count again. Whether it was in COPY.
    pub(super) fn copy_ended(&mut self) -> bool {
        let was = *self == Inflow::CopyIn;
        if was {
            *self = Inflow::Open;
        }
        was
    }
}

#[cfg(test)]
mod tests {
    use super::{Ends, Inflow, Unit};
    use crate::protocol::frontend::{PARSE, SYNC, TERMINATE};

    #[test]
    fn a_failed_segment_skips_to_the_clients_sync() {
        let mut f = Inflow::AfterSegment;
        f.segment_answered(false);
        assert_eq!(f, Inflow::Open);
        assert!(!f.drops(PARSE));
        let mut f = Inflow::AfterSegment;
        f.segment_answered(true);
        assert_eq!(f, Inflow::SkipToSync);
        assert!(f.drops(PARSE));
        assert!(!f.drops(SYNC) && !f.drops(TERMINATE));
        assert!(f.sync(), "the client's Sync ends the skipped unit");
        assert_eq!(f, Inflow::Open);
        let mut f = Inflow::SkipToSync;
        f.segment_answered(false);
        assert_eq!(f, Inflow::SkipToSync, "only a pending segment is answered");
    }

    #[test]
    fn syncs_do_not_count_during_copy_in() {
        let mut f = Inflow::CopyIn;
        assert!(!f.drops(PARSE));
        assert!(!f.sync(), "the server ignores Sync during COPY FROM STDIN");
        assert_eq!(f, Inflow::CopyIn);
        assert!(f.copy_ended());
        assert_eq!(f, Inflow::Open);
        assert!(f.sync());
        assert!(!f.copy_ended(), "not in COPY: nothing ends");
    }

    #[test]
    fn a_unit_prepares_then_binds_then_closes() {
        let mut u = Unit::default();
        assert!(!u.is_open());
        u.prepare();
        assert_eq!(u, Unit::Preparing);
        u.bind(Ends::Nothing);
        u.prepare();
        assert_eq!(
            u,
            Unit::Bound {
                ends: Ends::Nothing
            },
            "a Parse after a Bind keeps the unit placed"
        );
        assert!(u.is_open());
        u.close();
        assert_eq!(u, Unit::Closed);
        u.prepare();
        assert_eq!(u, Unit::Preparing, "a closed unit forgets its Binds");
    }

    #[test]
    fn a_unit_commits_only_through_its_one_execution() {
        for ends in [Ends::Commits, Ends::Discards] {
            let mut u = Unit::default();
            u.prepare();
            assert!(u.unbound());
            u.bind(ends);
            u.execute();
            assert_eq!(u.ends(), ends, "its Execute keeps what its Bind said");
            u.bind(ends);
            assert_eq!(u.ends(), Ends::Nothing, "a second execution: not known");
            u.close();
            u.execute();
            assert_eq!(
                u.ends(),
                Ends::Nothing,
                "an Execute of a portal bound before"
            );
            u.close();
            u.bind(Ends::Nothing);
            assert!(u.ends() == Ends::Nothing && !u.unbound());
            u.early(10);
            u.bind(ends);
            assert_eq!(
                u.ends(),
                Ends::Nothing,
                "an early unit is not one execution"
            );
        }
    }

    #[test]
    fn an_early_unit_counts_down_what_was_placed_with_it() {
        let mut u = Unit::default();
        u.early(30);
        assert!(u.is_open() && !u.unplaced());
        u.prepare();
        u.bind(Ends::Commits);
        u.execute();
        u.took(20);
        assert_eq!(
            u,
            Unit::Early { planned: 10 },
            "Parse and Bind keep it early"
        );
        u.took(15);
        assert!(
            u.unplaced(),
            "past what was placed: the next Bind is placed"
        );
        u.early(12);
        assert!(!u.unplaced());
        u.close();
        assert!(!u.is_open() && !u.unplaced());
    }
}
