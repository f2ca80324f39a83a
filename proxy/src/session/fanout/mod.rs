//! Units that run on several shards: broadcast writes and DDL, reads
//! without a sharding key, multi-row INSERTs split by shard, COPY FROM
//! split row by row.
//!
//! Each shard gets the unit on a connection of its own (writes inside a
//! BEGIN the proxy adds, so they commit only when every shard succeeded).
//! Answers are merged in lockstep: every message other than a row is a step
//! all shards take together; rows stream through as each shard sends them.
//! The first shard's RowDescription, ParseComplete ... reaches the client
//! once, CommandComplete counts are summed, the first error wins and ends
//! the unit, and one ReadyForQuery closes it. Nothing is buffered beyond a
//! message per shard, so memory stays bounded whatever the result size.
//!
//! A unit goes through four steps, each in its own file: what each shard
//! is sent is decided first, before any connection is taken
//! (`fanout_unit`, here); the connections are taken (`legs.rs`); each leg
//! is sent its part (`send.rs`) and the answers are merged in lockstep
//! (`lockstep.rs`, and `copy_in.rs` for COPY FROM STDIN split by row);
//! the legs end (`legs.rs`).

use crate::protocol::backend::{self, PgError};
use crate::protocol::{frontend, Frame};
use crate::session::analysis::Planned;
use crate::session::leg::Leg;
use crate::session::{End, Session};
use bytes::BytesMut;
use shardline_router::sharding::{shards_in, ShardMask, Sharding};
use shardline_router::shards::{Construct, CopyIn, Placement};
use shardline_router::{Target, UnitPlan};

mod copy_in;
mod legs;
pub(super) use legs::begin_on;
mod lockstep;
mod send;

use lockstep::{Merged, RowLimits};

/// What a unit on several shards sends, decided before any connection is
/// taken (`Session::fanout_unit`).
struct FanoutUnit {
    /// The client's messages of the unit.
    frames: Vec<Frame>,
    /// It may write (on the primaries).
    writes: bool,
    /// A write to reference tables only: every shard does the same.
    replicated: bool,
    /// Writes run inside a BEGIN the proxy commits when every shard succeeded.
    wrap: bool,
    /// Per shard, the unit's bytes; empty: the client's messages translated
    /// for the leg's connection.
    parts: Vec<(usize, BytesMut)>,
    /// The proxy's own messages in `parts`: shard, and where the message
    /// ends in that shard's part.
    own_ends: Vec<(usize, usize)>,
    /// A split INSERT's rows: the part (leg) holding each, in order.
    row_order: Option<Vec<usize>>,
    /// A COPY FROM STDIN split row by row.
    copy_in: Option<CopyIn>,
    /// A read whose rows are merged.
    merge: Option<crate::session::gather::MergeUnit>,
}

/// A unit on several shards that may run again, as it began
/// (`Session::before_read`).
#[derive(Clone, Copy)]
pub(in crate::session) struct BeforeRead {
    /// The client's output as the unit began.
    output: crate::stats::OutputMark,
    /// Times the unit ran already.
    tries: u8,
}

/// Whether a unit's messages may be sent again elsewhere: a query string,
/// or the extended protocol's messages without a named Parse or a Close
/// (which change what the client has prepared).
pub(in crate::session) fn may_run_again(frames: &[Frame]) -> bool {
    frames.iter().all(|f| match f.tag {
        frontend::PARSE => f.body().first() == Some(&0),
        frontend::QUERY
        | frontend::BIND
        | frontend::DESCRIBE
        | frontend::EXECUTE
        | frontend::SYNC
        | frontend::FLUSH => true,
        _ => false,
    })
}

/// A simple query Postgres refuses inside a transaction block (VACUUM,
/// CREATE DATABASE, ...): not wrapped in the proxy's BEGIN.
fn refuses_transaction_block(f: &Frame) -> bool {
    f.tag == frontend::QUERY
        && frontend::query(f.body())
            .ok()
            .and_then(|q| std::str::from_utf8(q).ok())
            .is_some_and(shardline_router::lexer::refuses_transaction_block)
}

impl Session {
    /// Runs the unit at the front of `client_in` on several shards; inside
    /// the client's open transaction (two-phase commit) when `in_txn`:
    /// what each shard is sent is built first (`fanout_unit`), then the
    /// connections are taken (`take_legs`), the unit runs
    /// (`execute_fanout`), and the legs end (`finish_legs`).
    pub(super) async fn run_fanout(&mut self, planned: Planned, in_txn: bool) -> Result<(), End> {
        let UnitPlan::Run { target, writes } = planned.plan else {
            return Ok(());
        };
        if !planned.complete && !matches!(planned.place, Placement::Pipeline(_)) {
            return self.fail_next_message(self.shared.events.refusals.refuse(
                Construct::Batch,
                "a statement reaching several shards must end its unit with Sync before the proxy can run it",
            ));
        }
        let Some(sh) = self.shared.sharding.clone() else {
            return Ok(());
        };
        self.shared.placements.count(&planned.place);
        self.count_keys();
        self.meter.place(crate::stats::Kind::of(&planned.place));
        let frames = self.take_unit()?;
        let simple = frames.first().is_some_and(|f| f.tag == frontend::QUERY);
        if let Some(e) = self.session_state_refusal(&frames) {
            return self.fail_unit(e, simple);
        }
        let writes =
            writes || matches!(planned.place, Placement::Split(_) | Placement::CopySplit(_));
        let target = if writes { Target::Primary } else { target };
        if let Placement::Pipeline(mask) = planned.place {
            // Reads acted on before their Sync, outside a transaction: meant
            // for the primaries (the rest may write, and then the proxy
            // opens its transaction on every leg), each served by a replica
            // while its primary is down, as on one connection.
            let reads = planned.reads_only && !planned.complete && !in_txn;
            return self
                .run_pipeline(frames, mask, (target, reads), writes && !reads, in_txn)
                .await;
        }
        let mut unit = match self.fanout_unit(&planned.place, frames, &sh, writes, in_txn) {
            Ok(Some(unit)) => unit,
            Ok(None) => return Ok(()),
            Err(e) => return self.fail_unit(e, simple),
        };
        if unit.merge.is_some() {
            self.register_parses(&unit.frames)?;
        }
        let shards: Vec<usize> = unit.parts.iter().map(|(s, _)| *s).collect();
        // A read run ahead of a transaction whose BEGIN is held (`mod.rs::
        // read_ahead_of_transaction`) is meant for the primaries, and
        // served by a replica where one is down, as the transaction's
        // first read on one shard would be (`begins_on_standby`).
        let read = !writes
            && !in_txn
            && planned.reads_only
            && self.txn.has_begin()
            && self.begins_on_standby();
        let reads = if read { ShardMask::MAX } else { 0 };
        // A read may run again while nothing of it reached the client.
        let before = self.before_read(
            !writes && !in_txn && unit.copy_in.is_none() && may_run_again(&unit.frames),
        );
        let (mut legs, begin) = match self.take_legs(&shards, (target, reads), in_txn).await {
            Ok(x) => x,
            Err(e) => return self.fail_unit(e, simple),
        };
        let result = self.execute_fanout(&mut legs, &mut unit, &sh).await?;
        if let (Err(e), Some(before)) = (&result, before) {
            if self.run_read_again(&mut legs, &unit.frames, before, e) {
                return Ok(());
            }
        }
        self.finish_legs(legs, begin, unit.wrap, unit.writes, result)
            .await
    }

    /// Where the client's output stands before a unit on several shards
    /// that may run again (`may`), and how many times it ran already
    /// (taken: a unit that is not run again leaves none for the next).
    pub(in crate::session) fn before_read(&mut self, may: bool) -> Option<BeforeRead> {
        let tries = std::mem::take(&mut self.rerun.spread_again);
        may.then(|| BeforeRead {
            output: self.meter.mark(&self.client_out),
            tries,
        })
    }

    /// A read on several shards that failed because a shard's connection
    /// was lost (a replica stopped or killed under it) runs again, as a
    /// read on one shard does (`on_server_lost`), when nothing of it was
    /// sent to the client: what it queued is taken back, the failed legs'
    /// nodes are banned, every leg's connection is closed, and the unit
    /// goes back in front of the client's buffer to be placed again.
    /// At most twice per unit. Whether it will.
    pub(in crate::session) fn run_read_again(
        &mut self,
        legs: &mut Vec<Leg>,
        frames: &[Frame],
        before: BeforeRead,
        e: &str,
    ) -> bool {
        if self.left.is_some()
            || before.tries >= 2
            || !legs.iter().any(|l| l.lost)
            || !self.meter.take_back(&mut self.client_out, before.output)
        {
            return false;
        }
        self.rerun.spread_again = before.tries + 1;
        self.client.detach();
        for leg in legs.drain(..) {
            if leg.lost {
                self.shared.topology.shards[leg.shard].nodes[leg.node].ban(self.shared.ban_time, e);
            }
            leg.conn.discard();
        }
        let mut again = BytesMut::with_capacity(
            frames.iter().map(|f| f.bytes.len()).sum::<usize>() + self.client_in.len(),
        );
        for f in frames {
            again.extend_from_slice(&f.bytes);
        }
        again.extend_from_slice(&self.client_in);
        self.client_in = again;
        self.forget_plan();
        tracing::info!(error = %e, traceparent = self.unit_trace().as_deref(), "re-running the read on several shards");
        true
    }

    /// A unit for other shards from a client that keeps its connection
    /// for its session state (`Fit::Beside`): run on connections borrowed
    /// for it, outside any transaction (one shard is a fan-out of one);
    /// the kept connection waits, and cancels go to it again after.
    pub(super) async fn run_beside(&mut self) -> Result<(), End> {
        let mut planned = self.plan_unit();
        if let Placement::One(s) = planned.place {
            planned.place = Placement::Many(shardline_router::sharding::mask_of(s));
        }
        let result = self.run_fanout(planned, false).await;
        if let Some(s) = &self.server {
            self.client.attach(s.addr.clone(), s.pid, s.secret);
        }
        result
    }

    /// Under transaction pooling, session state the unit would leave on
    /// several shards' connections (each would keep it): refused.
    fn session_state_refusal(&self, frames: &[Frame]) -> Option<PgError> {
        if self.mode() != shardline_config::PoolMode::Transaction {
            return None;
        }
        let what = frames.iter().find_map(|f| {
            let text = match f.tag {
                frontend::QUERY => frontend::query(f.body()).ok()?,
                frontend::PARSE => frontend::parse(f.body()).ok()?.query,
                _ => return None,
            };
            self.route_text(text).session_state
        })?;
        Some(
            self.shared.events.refusals.refuse(
                Construct::SessionState,
                format!("{what} on several shards is not supported under transaction pooling: it would outlive the transaction on connections other clients share"),
            )
            .with_hint("name the shard (a key, or a /* shardline: shard=NAME */ comment), or connect as a user with pool_mode = \"session\""),
        )
    }

    /// What each shard of `place` is sent for the unit, decided before any
    /// connection is taken; `None` for a placement that is not a fan-out.
    fn fanout_unit(
        &self,
        place: &Placement,
        frames: Vec<Frame>,
        sh: &Sharding,
        writes: bool,
        in_txn: bool,
    ) -> Result<Option<FanoutUnit>, PgError> {
        let simple = frames.first().is_some_and(|f| f.tag == frontend::QUERY);
        let mut unit = FanoutUnit {
            writes,
            replicated: writes && self.writes_reference_tables(&frames),
            // Writes run in a transaction the proxy commits when every
            // shard succeeded, except statements Postgres refuses in one.
            wrap: writes && !in_txn && !frames.iter().any(refuses_transaction_block),
            parts: Vec::new(),
            own_ends: Vec::new(),
            row_order: None,
            copy_in: None,
            merge: None,
            frames,
        };
        match place {
            Placement::Split(_) => {
                let split = self.split_unit(&unit.frames, sh, simple)?;
                unit.parts = split.parts;
                unit.own_ends = split.own_ends;
                unit.row_order = split.row_order;
            }
            Placement::Many(mask) | Placement::CopySplit(mask) | Placement::Merge(mask) => {
                if let Placement::Merge(_) = place {
                    unit.merge = self.merge_unit(&unit.frames)?;
                }
                if let Placement::CopySplit(_) = place {
                    unit.copy_in = Some(self.copy_template(&unit.frames).ok_or_else(|| {
                        self.shared.events.refusals.refuse(
                            Construct::Copy,
                            "this COPY FROM STDIN cannot be split by shard",
                        )
                    })?);
                }
                unit.parts = shards_in(*mask).map(|s| (s, BytesMut::new())).collect();
            }
            _ => return Ok(None),
        }
        Ok(Some(unit))
    }

    /// Sends each leg its part of `unit` and merges the answers: whether
    /// the unit failed, or what broke.
    async fn execute_fanout(
        &mut self,
        legs: &mut [Leg],
        unit: &mut FanoutUnit,
        sh: &Sharding,
    ) -> Result<Result<bool, String>, End> {
        // What each shard is sent: the session's settings, BEGIN for
        // writes, then the unit (named statements under their server names).
        let mut sends = Vec::with_capacity(legs.len());
        for (leg, (_, part)) in legs.iter_mut().zip(std::mem::take(&mut unit.parts)) {
            let mut out = BytesMut::new();
            self.leg_prelude(leg, unit.wrap, &mut out);
            if let Some(merge) = unit.merge.as_mut() {
                self.translate_merge(&unit.frames, leg, merge, &mut out)?;
            } else if part.is_empty() {
                self.translate(&unit.frames, leg, &mut out)?;
            } else {
                // The part's own messages (a Parse the client did not send).
                let base = out.len();
                for &(shard, end) in &unit.own_ends {
                    if shard == leg.shard {
                        leg.mark(base + end, true, None);
                    }
                }
                out.extend_from_slice(&part);
            }
            sends.push(out);
        }
        let collation = match (&unit.merge, legs.first_mut()) {
            (Some(_), Some(leg)) => match self.collation(leg).await {
                Ok(c) => Some(c),
                Err(e) => return Ok(Err(e)),
            },
            _ => None,
        };
        if unit.writes {
            // A schema change may give a column another collation.
            self.shared
                .collations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
        for (leg, out) in legs.iter_mut().zip(sends.iter_mut()) {
            if let Err(e) = leg.write(out).await {
                return Ok(Err(e));
            }
        }
        let merged = match (unit.merge.as_mut(), collation) {
            (Some(merge), Some(c)) => self.gather(legs, merge, c).await.map(Merged::Done),
            _ => {
                let mut limits = RowLimits::of(&unit.frames);
                self.merge(
                    legs,
                    unit.row_order.as_deref(),
                    unit.replicated,
                    &mut limits,
                )
                .await
            }
        };
        Ok(match merged {
            Ok(Merged::CopyIn) => match unit.copy_in.take() {
                Some(c) => {
                    let simple = unit
                        .frames
                        .first()
                        .is_some_and(|f| f.tag == frontend::QUERY);
                    self.merge_copy(legs, sh, c, simple, unit.replicated).await
                }
                None => Err("COPY FROM STDIN reached several shards unexpectedly".into()),
            },
            Ok(Merged::Done(failed)) => Ok(failed),
            Err(e) => Err(e),
        })
    }

    /// The COPY options of the unit's single simple query.
    fn copy_template(&self, frames: &[crate::protocol::Frame]) -> Option<CopyIn> {
        let mut route = None;
        for f in frames {
            match f.tag {
                frontend::QUERY => route = Some(self.route_text(frontend::query(f.body()).ok()?)),
                frontend::PARSE => {
                    route = Some(self.route_text(frontend::parse(f.body()).ok()?.query))
                }
                frontend::BIND => {
                    let b = frontend::bind(f.body()).ok()?;
                    if route.is_none() || !b.statement.is_empty() {
                        if let Some((r, _)) = self.session_statement(b.statement) {
                            route = Some(r);
                        }
                    }
                }
                _ => {}
            }
        }
        route?.shards.as_ref()?.first()?.copy_in.clone()
    }

    /// Fails the unit that was taken off the buffer (or is at its front).
    fn fail_unit(&mut self, e: PgError, simple: bool) -> Result<(), End> {
        e.encode(&mut self.client_out);
        if !simple {
            // The rest of the unit, up to its Sync, was consumed already.
        }
        self.fanout_ready(true);
        Ok(())
    }

    /// ReadyForQuery after a fan-out: idle, or in the client's transaction
    /// (failed by an error, as Postgres fails one).
    fn fanout_ready(&mut self, failed: bool) {
        let in_txn = self.txn.has_begin()
            || self.spanning.spans()
            || self.server.as_ref().is_some_and(|s| s.tx_status != b'I');
        let status = match (in_txn, failed) {
            (false, _) => b'I',
            (true, false) => b'T',
            (true, true) => {
                self.txn.fail();
                b'E'
            }
        };
        self.unit_ready(status);
    }

    /// The ReadyForQuery ending a unit on several shards, with `status`;
    /// none yet when the client's Sync is still to come (a pipeline run at
    /// a Flush that failed before it: `Inflow::SkipToSync` answers it).
    pub(in crate::session) fn unit_ready(&mut self, status: u8) {
        if self.inflow != crate::session::unit::Inflow::SkipToSync {
            backend::ready_for_query(&mut self.client_out, status);
        }
    }

    /// Whether the unit's statements write reference tables only (every
    /// shard holds the same rows and does the same).
    fn writes_reference_tables(&self, frames: &[crate::protocol::Frame]) -> bool {
        let mut statements = crate::session::route::UnitStatements::default();
        let mut any = false;
        for f in frames {
            let route = match f.tag {
                frontend::QUERY => match frontend::query(f.body()) {
                    Ok(q) => self.route_text(q),
                    Err(_) => return false,
                },
                frontend::PARSE => {
                    if let Ok(p) = frontend::parse(f.body()) {
                        statements.parse(&p, self.route_text(p.query));
                    }
                    continue;
                }
                frontend::BIND => match frontend::bind(f.body())
                    .ok()
                    .and_then(|b| statements.bound(self, b.statement))
                {
                    Some((route, _)) => route,
                    None => return false,
                },
                _ => continue,
            };
            if !route.writes_reference_tables() {
                return false;
            }
            any = true;
        }
        any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Frame {
        let mut bytes = BytesMut::new();
        backend::put_message(&mut bytes, tag, |b| b.extend_from_slice(body));
        Frame {
            tag,
            bytes: bytes.freeze(),
        }
    }

    #[test]
    fn what_may_be_sent_again() {
        let unnamed = frame(frontend::PARSE, b"\0SELECT 1\0\0\0");
        let named = frame(frontend::PARSE, b"s1\0SELECT 1\0\0\0");
        let rest = [
            frame(frontend::BIND, b"\0s1\0\0\0\0\0\0\0"),
            frame(frontend::DESCRIBE, b"P\0"),
            frame(frontend::EXECUTE, b"\0\0\0\0\0"),
            frame(frontend::SYNC, b""),
        ];
        let unit = |first: &Frame| {
            let mut v = vec![first.clone()];
            v.extend(rest.iter().cloned());
            v
        };
        assert!(may_run_again(&[frame(frontend::QUERY, b"SELECT 1\0")]));
        assert!(may_run_again(&unit(&unnamed)));
        assert!(may_run_again(&rest), "a prepared statement bound");
        assert!(!may_run_again(&unit(&named)), "prepares a name");
        assert!(!may_run_again(&unit(&frame(frontend::CLOSE, b"Ss1\0"))));
    }
}
