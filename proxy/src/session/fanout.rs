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

use super::analysis::Planned;
use super::leg::{drain_after, drain_to_ready, parse_on, Leg, Parsed};
use super::{End, Session, FLUSH_AT};
use crate::pool::PooledConnection;
use crate::protocol::backend::{self, sqlstate, PgError};
use crate::protocol::{frontend, next_frame, Frame};
use bytes::{Bytes, BytesMut};
use shardline_router::sharding::{shards_in, Sharding};
use shardline_router::shards::{Construct, CopyIn, Placement};
use shardline_router::{Target, UnitPlan};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How far a merge went.
enum Merged {
    /// The unit ended; whether it failed.
    Done(bool),
    /// Every shard is in COPY FROM STDIN mode.
    CopyIn,
}

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
    merge: Option<super::gather::MergeUnit>,
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

/// Rows held per leg, released in the order of a split INSERT's rows
/// (`order`: the leg of each) when each row returned exactly one; else
/// leg by leg.
fn release_in_order(
    held: &mut [std::collections::VecDeque<BytesMut>],
    order: &[usize],
    out: &mut BytesMut,
) {
    let total: usize = held.iter().map(|h| h.len()).sum();
    if total == order.len()
        && (0..held.len()).all(|l| held[l].len() == order.iter().filter(|&&x| x == l).count())
    {
        for &l in order {
            if let Some(row) = held[l].pop_front() {
                out.extend_from_slice(&row);
            }
        }
    }
    for h in held.iter_mut() {
        for row in h.drain(..) {
            out.extend_from_slice(&row);
        }
    }
}

/// The number ending a command tag (`UPDATE 3`, `INSERT 0 3`, `SELECT 3`),
/// with the tag before it.
fn tag_count(tag: &[u8]) -> Option<(&[u8], u64)> {
    let s = std::str::from_utf8(tag).ok()?;
    let (head, n) = s.rsplit_once(' ')?;
    let n = n.parse().ok()?;
    matches!(
        head.split(' ').next(),
        Some("SELECT" | "UPDATE" | "DELETE" | "INSERT" | "COPY" | "MERGE" | "FETCH" | "MOVE")
    )
    .then_some((&tag[..head.len()], n))
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
        if !planned.complete {
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
            return self
                .run_pipeline(frames, mask, target, writes, in_txn)
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
        let (mut legs, begin) = match self.take_legs(&shards, target, in_txn).await {
            Ok(x) => x,
            Err(e) => return self.fail_unit(e, simple),
        };
        let result = self.execute_fanout(&mut legs, &mut unit, &sh).await?;
        self.finish_legs(legs, begin, unit.wrap, unit.writes, result)
            .await
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
                self.merge(legs, unit.row_order.as_deref(), unit.replicated)
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

    /// A connection on each of `shards`: borrowed for this unit, or (inside
    /// the client's transaction) the transaction's own, with the BEGIN of
    /// the transaction for the shards that join it.
    pub(super) async fn take_legs(
        &mut self,
        shards: &[usize],
        target: Target,
        in_txn: bool,
    ) -> Result<(Vec<Leg>, Option<Bytes>), PgError> {
        if in_txn {
            let (legs, begin) = self.transaction_legs(shards).await?;
            Ok((legs, Some(begin)))
        } else {
            Ok((self.borrow_legs(shards, target).await?, None))
        }
    }

    /// After a unit on several shards (`result`: whether it failed, or what
    /// broke): borrowed legs end as `end_fanout` or `fail_legs` says; the
    /// transaction's legs stay in it.
    pub(super) async fn finish_legs(
        &mut self,
        legs: Vec<Leg>,
        begin: Option<Bytes>,
        wrap: bool,
        writes: bool,
        result: Result<bool, String>,
    ) -> Result<(), End> {
        match (result, begin) {
            (Ok(failed), None) => {
                self.end_fanout(legs, wrap, writes, failed).await;
                Ok(())
            }
            (Err(e), None) => self.fail_legs(legs, e).await,
            (Ok(failed), Some(begin)) => {
                self.keep_in_transaction(legs, begin, writes, failed);
                Ok(())
            }
            (Err(e), Some(begin)) => {
                // The shards that did not answer lose their part: closed.
                tracing::warn!(error = %e, traceparent = self.unit_trace().as_deref(), "statement in a transaction on several shards failed");
                PgError::error(sqlstate::CONNECTION_FAILURE, e).encode(&mut self.client_out);
                self.keep_in_transaction(legs, begin, writes, true);
                Ok(())
            }
        }
    }

    /// A connection on each of `shards` for `target`, the CancelRequest
    /// routed to all of them.
    pub(super) async fn borrow_legs(
        &mut self,
        shards: &[usize],
        target: Target,
    ) -> Result<Vec<Leg>, PgError> {
        let mut legs: Vec<Leg> = Vec::with_capacity(shards.len());
        for &shard in shards {
            let mut tried = 0;
            let (conn, node, placed) = self.borrow(shard, target, &mut tried).await?;
            self.fill_on(placed);
            let mut leg = Leg::parked(shard, node, conn);
            leg.done = false;
            legs.push(leg);
        }
        self.client.attach_all(
            legs.iter()
                .map(|l| (l.conn.addr.clone(), l.conn.pid, l.conn.secret)),
        );
        Ok(legs)
    }

    /// What a leg is sent before the unit: the session's settings when the
    /// connection's differ, the proxy's BEGIN for writes (`wrap`), or the
    /// BEGIN of the client's transaction it joins; answers skipped. Both are simple queries: the connection's unnamed
    /// statement is gone after them.
    pub(super) fn leg_prelude(&self, leg: &mut Leg, wrap: bool, out: &mut BytesMut) {
        if *leg.conn.vars != *self.vars {
            let sql = self.vars.replay_sql(&leg.conn.vars);
            if !sql.is_empty() {
                frontend::write_query(out, &sql);
                leg.own(out);
                leg.conn.unnamed_token = 0;
            }
            leg.conn.vars = self.vars.clone();
        }
        if wrap {
            frontend::write_query(out, "BEGIN");
            leg.own(out);
            leg.conn.unnamed_token = 0;
        }
        if let Some(begin) = leg.joins.take() {
            out.extend_from_slice(&begin);
            leg.own(out);
            leg.conn.unnamed_token = 0;
        }
    }

    /// After a unit on several shards: the proxy's BEGIN ended (COMMIT only
    /// if nothing failed), read-your-writes positions taken, one
    /// ReadyForQuery for the client, connections not clean discarded.
    pub(super) async fn end_fanout(
        &mut self,
        mut legs: Vec<Leg>,
        wrap: bool,
        writes: bool,
        failed: bool,
    ) {
        self.client.detach();
        if wrap {
            self.finish_writes(&mut legs, failed).await;
        }
        if writes && !failed {
            self.remember_writes(&mut legs).await;
        }
        self.fanout_ready(failed);
        for leg in legs {
            if !leg.conn.is_clean() || !leg.done {
                leg.conn.discard();
            }
        }
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
        backend::ready_for_query(&mut self.client_out, status);
    }

    /// A server failed mid-unit: roll back what the others did, report it.
    pub(super) async fn fail_legs(&mut self, legs: Vec<Leg>, msg: String) -> Result<(), End> {
        self.client.detach();
        tracing::warn!(error = %msg, traceparent = self.unit_trace().as_deref(), "multi-shard statement failed");
        for mut leg in legs {
            // Whatever state the connection is in, it is not reused.
            let _ = leg.conn.stream.shutdown().await;
            leg.conn.discard();
        }
        PgError::error(sqlstate::CONNECTION_FAILURE, msg).encode(&mut self.client_out);
        self.fanout_ready(true);
        Ok(())
    }

    /// Writes the unit's client frames for one shard's connection: named
    /// statements under their server names, prepared there when missing.
    pub(super) fn translate(
        &mut self,
        frames: &[crate::protocol::Frame],
        leg: &mut Leg,
        out: &mut BytesMut,
    ) -> Result<(), End> {
        for f in frames {
            match f.tag {
                frontend::PARSE => {
                    let parsed = self.record_parse(f)?;
                    parse_on(leg, &parsed, f, out);
                }
                frontend::BIND => {
                    let b = frontend::bind(f.body())?;
                    if b.statement.is_empty() {
                        self.unnamed_on(leg, out);
                        out.extend_from_slice(&f.bytes);
                        continue;
                    }
                    let Some(stmt) = self.statements.get(b.statement).cloned() else {
                        // Unknown: the server reports it, as it would.
                        out.extend_from_slice(&f.bytes);
                        continue;
                    };
                    super::rename::ensure(leg, out, &stmt);
                    frontend::write_bind(out, b.portal, &stmt.server_name, b.rest);
                }
                frontend::DESCRIBE => {
                    let (kind, name) = frontend::target(f.body(), "Describe")?;
                    match (kind, self.statements.get(name).cloned()) {
                        (b'S', Some(stmt)) if !name.is_empty() => {
                            super::rename::ensure(leg, out, &stmt);
                            frontend::write_target(
                                out,
                                frontend::DESCRIBE,
                                b'S',
                                &stmt.server_name,
                            );
                        }
                        (b'S', _) if name.is_empty() => {
                            self.unnamed_on(leg, out);
                            out.extend_from_slice(&f.bytes);
                        }
                        _ => out.extend_from_slice(&f.bytes),
                    }
                }
                frontend::CLOSE => self.close_on_shard(f, out)?,
                _ => out.extend_from_slice(&f.bytes),
            }
        }
        Ok(())
    }

    /// A client's Close on a shard's connection: a named statement is
    /// forgotten by the client only (server statements stay for other
    /// clients), answered alike by closing a name never prepared.
    pub(super) fn close_on_shard(
        &mut self,
        f: &crate::protocol::Frame,
        out: &mut BytesMut,
    ) -> Result<(), End> {
        let (kind, name) = frontend::target(f.body(), "Close")?;
        if kind == b'S' && !name.is_empty() {
            self.statements.remove(name);
            frontend::write_target(out, frontend::CLOSE, b'S', b"_sl_never_prepared");
        } else {
            out.extend_from_slice(&f.bytes);
        }
        Ok(())
    }

    /// Records a client's Parse as its statement (unnamed, or named under
    /// the process-wide server name).
    pub(super) fn record_parse(&mut self, f: &crate::protocol::Frame) -> Result<Parsed, End> {
        let p = frontend::parse(f.body())?;
        let route = self.route_text(p.query);
        let effect = super::route::parse_effect(&route, p.query);
        if p.name.is_empty() {
            let token = self.remember_unnamed(f, p.definition.len(), effect, route);
            return Ok(Parsed::Unnamed(token));
        }
        let stmt = self.shared.statements.intern(p.definition, effect, route);
        self.statements.insert(p.name.into(), stmt.clone());
        Ok(Parsed::Named(stmt))
    }

    fn unnamed_on(&self, leg: &mut Leg, out: &mut BytesMut) {
        if let Some(u) = &self.unnamed {
            super::rename::ensure_unnamed(leg, out, u.token, &u.definition);
        }
    }

    /// Whether the unit's statements write reference tables only (every
    /// shard holds the same rows and does the same).
    fn writes_reference_tables(&self, frames: &[crate::protocol::Frame]) -> bool {
        use shardline_router::shards::Scope;
        let replicated = |route: &shardline_router::Route| {
            route.shards.as_ref().is_some_and(|t| {
                !t.is_empty()
                    && t.iter()
                        .all(|t| t.write && matches!(t.scope, Scope::Reference))
            })
        };
        let mut statements = super::route::UnitStatements::default();
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
            if !replicated(&route) {
                return false;
            }
            any = true;
        }
        any
    }

    /// Merges the shards' answers to one unit: up to its end (whether it
    /// failed), or up to COPY FROM STDIN starting on every shard. With
    /// `row_order` (a split INSERT: the leg of each of its rows), rows
    /// (RETURNING) come back in the order of the INSERT's rows, as one
    /// server returns them, when every row returned one. A `replicated`
    /// write (reference tables only) is answered as one server would: the
    /// first shard's rows and tag, once every shard's tag agrees; shards
    /// that disagree fail the statement.
    async fn merge(
        &mut self,
        legs: &mut [Leg],
        row_order: Option<&[usize]>,
        replicated: bool,
    ) -> Result<Merged, String> {
        let mut held: Vec<std::collections::VecDeque<BytesMut>> = match row_order {
            Some(_) => vec![Default::default(); legs.len()],
            None => Vec::new(),
        };
        loop {
            // One step: each shard's rows, then its next other message.
            let mut ends: Vec<BytesMut> = Vec::with_capacity(legs.len());
            for (i, leg) in legs.iter_mut().enumerate() {
                // Rows go to the client as they came, in runs.
                let plain = held.is_empty() && !(replicated && i > 0);
                loop {
                    // Written out as it fills, within a shard's rows too: a
                    // shard's whole result is not held for a slow client.
                    if self.client_out.len() >= FLUSH_AT {
                        self.write_client().await.map_err(|e| e.to_string())?;
                    }
                    if plain && leg.take_rows(&mut self.client_out) {
                        continue;
                    }
                    let msg = leg.next().await?;
                    match msg[0] {
                        backend::DATA_ROW if replicated && i > 0 => {}
                        backend::DATA_ROW if !held.is_empty() => held[i].push_back(msg),
                        backend::DATA_ROW | frontend::COPY_DATA => {
                            self.client_out.extend_from_slice(&msg);
                        }
                        // Every shard says the same (e.g. "table does not
                        // exist, skipping"): once is enough.
                        backend::NOTICE_RESPONSE | backend::NOTIFICATION if i == 0 => {
                            self.client_out.extend_from_slice(&msg);
                        }
                        backend::NOTICE_RESPONSE | backend::NOTIFICATION => {}
                        backend::PARAMETER_STATUS => {}
                        _ => {
                            ends.push(msg);
                            break;
                        }
                    }
                }
            }
            if let Some(order) = row_order {
                release_in_order(&mut held, order, &mut self.client_out);
            }
            let all_ready = ends.iter().all(|m| m[0] == backend::READY_FOR_QUERY);
            if all_ready {
                for leg in legs.iter_mut() {
                    leg.done = true;
                }
                return Ok(Merged::Done(false));
            }
            if let Some(err) = ends.iter().find(|m| m[0] == backend::ERROR_RESPONSE) {
                self.client_out.extend_from_slice(err);
                // Every shard skips to its ReadyForQuery.
                drain_after(legs, &ends).await?;
                return Ok(Merged::Done(true));
            }
            if ends.iter().any(|m| m[0] != ends[0][0]) {
                return Err("shards answered the same statement differently".into());
            }
            let first = &ends[0];
            if first[0] == backend::COMMAND_COMPLETE {
                let counts: Option<Vec<(&[u8], u64)>> = ends
                    .iter()
                    .map(|m| tag_count(backend::command_tag(&m[5..])))
                    .collect();
                match counts {
                    Some(c) if replicated => {
                        if c.iter().any(|x| x.1 != c[0].1) {
                            let tags: Vec<String> = legs
                                .iter()
                                .zip(&c)
                                .map(|(l, x)| {
                                    format!(
                                        "{} {} on shard {}",
                                        String::from_utf8_lossy(x.0),
                                        x.1,
                                        self.shared.topology.shards[l.shard].name
                                    )
                                })
                                .collect();
                            tracing::error!(tags = %tags.join(", "), traceparent = self.unit_trace().as_deref(), "a reference-table write did different things on different shards");
                            PgError::error(
                                "XX001",
                                format!(
                                    "the copies of a reference table differ between shards: the same write gave {}; it is rolled back",
                                    tags.join(", ")
                                ),
                            )
                            .encode(&mut self.client_out);
                            drain_after(legs, &ends).await?;
                            return Ok(Merged::Done(true));
                        }
                        self.client_out.extend_from_slice(first);
                    }
                    Some(c) => {
                        let total: u64 = c.iter().map(|x| x.1).sum();
                        let head = String::from_utf8_lossy(c[0].0);
                        backend::command_complete(&mut self.client_out, &format!("{head} {total}"));
                    }
                    None => self.client_out.extend_from_slice(first),
                }
            } else if first[0] == backend::COPY_IN_RESPONSE {
                self.client_out.extend_from_slice(first);
                return Ok(Merged::CopyIn);
            } else {
                self.client_out.extend_from_slice(first);
            }
        }
    }

    /// Ends the proxy's BEGIN on every shard: COMMIT when the unit succeeded
    /// everywhere, else ROLLBACK. A COMMIT failing after others succeeded
    /// is reported (the one case where shards can disagree without
    /// two-phase commit).
    async fn finish_writes(&mut self, legs: &mut [Leg], failed: bool) {
        let end = if failed { "ROLLBACK" } else { "COMMIT" };
        let mut committed = Vec::new();
        let mut errors = Vec::new();
        for leg in legs.iter_mut() {
            if !leg.done {
                continue;
            }
            match leg.conn.simple_query(end).await {
                Ok(_) => committed.push(leg.shard),
                Err(e) => {
                    leg.done = false;
                    errors.push((leg.shard, e.to_string()));
                }
            }
        }
        if !failed && !errors.is_empty() {
            let names = |v: &[usize]| {
                v.iter()
                    .map(|&s| self.shared.topology.shards[s].name.clone())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let failed_on: Vec<usize> = errors.iter().map(|e| e.0).collect();
            let msg = format!(
                "COMMIT failed on shard(s) {} ({}); it succeeded on shard(s) {}",
                names(&failed_on),
                errors
                    .iter()
                    .map(|e| e.1.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
                names(&committed)
            );
            tracing::error!(%msg, traceparent = self.unit_trace().as_deref(), "multi-shard write partly committed");
            PgError::error("40003", msg).encode(&mut self.client_out);
        }
    }

    /// Read-your-writes after a unit that wrote on several shards: each
    /// shard's WAL position (or the primary window), before the client is
    /// told the unit is done, so its next reads see the rows.
    async fn remember_writes(&mut self, legs: &mut [Leg]) {
        for leg in legs.iter_mut().filter(|l| l.done) {
            self.remember_write(leg.shard, &mut leg.conn).await;
        }
    }

    /// Read-your-writes after a write on `shard` through `conn`.
    pub(super) async fn remember_write(&self, shard: usize, conn: &mut PooledConnection) {
        use shardline_config::ReadYourWrites;
        use std::sync::atomic::Ordering::Relaxed;
        let b = &self.shared.balancing;
        match b.read_your_writes {
            ReadYourWrites::Off => {}
            ReadYourWrites::PrimaryWindow => {
                let until = crate::health::now_ms() + b.primary_window.as_millis() as u64;
                self.login.user.ryw[shard]
                    .primary_until
                    .fetch_max(until, Relaxed);
            }
            ReadYourWrites::Lsn if !self.learns_positions(shard) => {}
            ReadYourWrites::Lsn => {
                // Unsettled (the query failed), reads go to the primary for a while.
                let mut pending = crate::PositionPending::new(
                    self.login.user.clone(),
                    shard,
                    self.shared.ban_time,
                );
                if let Ok((rows, _)) = conn.simple_query(super::route::WAL_POSITION_SQL).await {
                    let lsn = rows
                        .first()
                        .and_then(|r| r.first().cloned().flatten())
                        .and_then(|v| v.parse::<u64>().ok());
                    if let Some(lsn) = lsn {
                        pending.settle(lsn);
                    }
                }
            }
        }
    }

    /// COPY FROM STDIN split by row: the client's data is read here, each
    /// row sent to the shard owning its key (every shard for a reference
    /// table), streaming.
    async fn merge_copy(
        &mut self,
        legs: &mut [Leg],
        sh: &shardline_router::sharding::Sharding,
        mut c: CopyIn,
        simple: bool,
        replicated: bool,
    ) -> Result<bool, String> {
        let group = match sh.table(&c.table) {
            shardline_router::sharding::TableKind::Sharded(r) => Some(r.group),
            _ => None,
        };
        let mut error: Option<String> = None;
        if group.is_some() && c.key_column.is_none() {
            c.key_column = self.key_position(&c).await;
            if c.key_column.is_none() {
                error = Some(format!(
                    "cannot find the sharding key column \"{}\" of table \"{}\" for COPY; name the columns in the COPY",
                    c.column, c.table
                ));
            }
        }
        self.write_client().await.map_err(|e| e.to_string())?;
        let mut splitter = super::copy::RowSplitter::new(c.clone());
        let mut outs: Vec<BytesMut> = legs.iter().map(|_| BytesMut::new()).collect();
        let shard_list: Vec<usize> = legs.iter().map(|l| l.shard).collect();
        loop {
            let frame = self.next_client_frame().await?;
            match frame.tag {
                frontend::COPY_DATA => {
                    if error.is_some() {
                        continue;
                    }
                    let data = &frame.bytes[5..];
                    if let Some(g) = group {
                        let gr = &sh.groups[g];
                        let r = splitter.push(data, |row, key| {
                            super::copy::route_row(gr, &shard_list, &mut outs, row, key)
                        });
                        if let Err(e) = r {
                            error = Some(e);
                            continue;
                        }
                    } else {
                        for o in outs.iter_mut() {
                            super::copy::put_copy_data(o, data);
                        }
                    }
                    for (leg, out) in legs.iter_mut().zip(outs.iter_mut()) {
                        if out.len() >= FLUSH_AT {
                            leg.write(out).await?;
                        }
                    }
                }
                frontend::COPY_DONE | frontend::COPY_FAIL => {
                    if group.is_some() && error.is_none() {
                        let gr = &sh.groups[group.unwrap_or(0)];
                        if let Err(e) = splitter.finish(|row, key| {
                            super::copy::route_row(gr, &shard_list, &mut outs, row, key)
                        }) {
                            error = Some(e);
                        }
                    }
                    let fail = frame.tag == frontend::COPY_FAIL || error.is_some();
                    for (leg, out) in legs.iter_mut().zip(outs.iter_mut()) {
                        if fail {
                            out.clear();
                            backend::put_message(out, frontend::COPY_FAIL, |b| {
                                backend::put_cstr(
                                    b,
                                    error
                                        .as_deref()
                                        .unwrap_or("COPY cancelled by the client")
                                        .as_bytes(),
                                )
                            });
                        } else {
                            backend::put_message(out, frontend::COPY_DONE, |_| {});
                        }
                        leg.write(out).await?;
                    }
                    if !simple {
                        // The servers ignored the Sync sent with the COPY;
                        // they answer the one after CopyDone.
                        self.forward_next_sync(legs).await?;
                    }
                    break;
                }
                frontend::FLUSH | frontend::SYNC => {}
                _ => return Err("unexpected message during COPY".into()),
            }
        }
        if let Some(e) = &error {
            // The shards report their own error for the CopyFail; ours is clearer.
            drain_to_ready(legs).await?;
            let e = if e.starts_with("invalid sharding key") {
                PgError::error("22P04", e.clone())
            } else {
                self.shared
                    .events
                    .refusals
                    .refuse(Construct::Copy, e.clone())
            };
            e.encode(&mut self.client_out);
            return Ok(true);
        }
        match self.merge(legs, None, replicated).await? {
            Merged::Done(failed) => Ok(failed),
            Merged::CopyIn => Err("a second COPY in one unit".into()),
        }
    }

    /// Waits for the client's next Sync and sends it to every shard.
    async fn forward_next_sync(&mut self, legs: &mut [Leg]) -> Result<(), String> {
        loop {
            let f = self.next_client_frame().await?;
            if f.tag == frontend::SYNC {
                for leg in legs.iter_mut() {
                    leg.write(&mut BytesMut::from(&f.bytes[..])).await?;
                }
                return Ok(());
            }
        }
    }

    /// The client's next message, read from its socket here (during COPY
    /// the fan-out owns the session).
    async fn next_client_frame(&mut self) -> Result<crate::protocol::Frame, String> {
        loop {
            match next_frame(&mut self.client_in, self.shared.max_message_size) {
                Ok(Some(f)) => return Ok(f),
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
            self.forget_plan();
            let n = self
                .login
                .stream
                .read_buf(&mut self.client_in)
                .await
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("client closed the connection during COPY".into());
            }
        }
    }

    /// The key column's position in the table (a COPY naming no columns).
    async fn key_position(&self, c: &CopyIn) -> Option<usize> {
        let sh = self.shared.sharding.clone()?;
        let mut tried = 0;
        let (mut conn, _, _) = self
            .borrow(sh.default_shard, Target::Primary, &mut tried)
            .await
            .ok()?;
        let sql = format!(
            "SELECT a.attname FROM pg_attribute a WHERE a.attrelid = '{}'::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            c.table.replace('\'', "''")
        );
        let (rows, _) = conn.simple_query(&sql).await.ok()?;
        rows.iter()
            .position(|r| r.first().and_then(|x| x.as_deref()) == Some(c.column.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_tags_sum() {
        assert_eq!(tag_count(b"INSERT 0 3"), Some((&b"INSERT 0"[..], 3)));
        assert_eq!(tag_count(b"UPDATE 7"), Some((&b"UPDATE"[..], 7)));
        assert_eq!(tag_count(b"CREATE TABLE"), None);
    }
}
