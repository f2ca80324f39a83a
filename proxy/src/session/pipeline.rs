//! A pipeline whose executions need different shards: several
//! Bind/Execute pairs before one Sync, each with its own key (asyncpg's and
//! psycopg's `executemany`, PgJDBC's batches). Each execution runs on the
//! shard its key names; the answers reach the client in the order it asked.
//!
//! Every shard gets the unit's Parses, Closes and the Sync, and only its
//! own executions (a statement on several shards, as a migration's DDL,
//! is an execution of each of them); writes run inside a BEGIN the proxy commits on every
//! shard only when nothing failed (as for other writes on several shards).
//! The answers are read in the client's order, each from the shard that
//! runs the message: a Parse is answered once, rows stream through. After
//! an error nothing more is forwarded (a server skips to Sync), every
//! shard is read to its ReadyForQuery, and the writes are rolled back.
//!
//! A pipeline run at a Flush (its client asked for results before its
//! Sync) takes the client's later messages part by part, and a shard it
//! had no leg on joins when an execution needs it (inside a client's
//! transaction, joining the transaction). One whose first part only read
//! runs outside the proxy's transaction until a part writes.
//!
//! Inside a client's transaction (with two-phase commit) the shards'
//! parts run on the transaction's own connections instead
//! (`distributed.rs`: `transaction_legs`, `keep_in_transaction`), so the
//! client's COMMIT commits them all in two phases. An error fails the
//! whole transaction, as one server would.

use super::fanout::{begin_on, may_run_again};
use super::leg::{drain_to_ready, parse_on, Leg};
use super::unit::Inflow;
use super::FLUSH_AT;
use super::{End, Session};
use crate::protocol::backend::{self, sqlstate, PgError};
use crate::protocol::{frontend, Frame};
use bytes::{Bytes, BytesMut};
use shardline_router::sharding::{mask_of, shards_in, ShardMask};
use shardline_router::shards::{Construct, Placement};
use shardline_router::Target;

/// A shard's part of a pipeline is written whole before its answers are
/// forwarded; what the server answers meanwhile is held, up to this.
const MAX_DRAINED: usize = 16 << 20;

/// The legs that run one statement of a split query string.
struct StatementLegs {
    legs: Vec<usize>,
    /// A write of reference tables only.
    replicated: bool,
    /// The statement may write.
    writes: bool,
}

/// Which legs a client message goes to.
#[derive(Clone, Copy)]
enum To {
    All,
    /// A Describe of a statement: answered by the first leg.
    First,
    One(usize),
    /// A statement on several shards (DDL, a write or read without a key):
    /// the legs of these bits, answered as one server (`relay_answers`).
    Several {
        legs: u64,
        replicated: bool,
    },
    Nowhere,
}

impl To {
    /// The legs a Bind placed here runs on, as bits (`All`, `First`:
    /// every one).
    fn bits(self) -> u64 {
        match self {
            To::One(i) => 1 << i,
            To::Several { legs, .. } => legs,
            To::Nowhere => 0,
            To::All | To::First => u64::MAX,
        }
    }
}

/// Where placing a pipeline's messages left off (`pipeline_legs`): the
/// legs of the last Bind (the Describe and Execute after it go there), the
/// leg of the last one placed on one shard (a Bind without a key runs
/// there), how many Binds were placed, and whether one of them writes.
#[derive(Clone, Copy)]
struct Placing {
    current: To,
    one: usize,
    bound: usize,
    writes: bool,
    /// The legs (bits) an execution that may write (or sets the
    /// transaction, or whose statement is not known) runs on.
    written: u64,
}

impl Default for Placing {
    fn default() -> Self {
        Placing {
            current: To::One(0),
            one: 0,
            bound: 0,
            writes: false,
            written: 0,
        }
    }
}

/// How a shard joins a pipeline's later part, as its first legs began:
/// inside the client's transaction (`begin`, the BEGIN a shard joining it
/// is sent), the transaction's connection there; outside, borrowed for
/// `target` (a replica where the primary is down, for a `read`, and once
/// wrapped for a shard only read so far: `add_legs`), in the proxy's
/// BEGIN when `wrap`.
struct Joins {
    target: Target,
    read: bool,
    wrap: bool,
    begin: Option<Bytes>,
}

/// What broke a pipeline run part by part: a leg (the pipeline fails,
/// the session goes on) or a client message (the session ends).
enum Broke {
    Legs(String),
    Client(End),
}

impl From<String> for Broke {
    fn from(e: String) -> Self {
        Broke::Legs(e)
    }
}

/// The end of a statement's answer in a query string or an Execute's.
fn ends_statement(tag: u8) -> bool {
    tag == backend::COMMAND_COMPLETE || tag == backend::EMPTY_QUERY
}

/// The legs (indexes into `shards`) of the shards in `mask`, as bits.
fn legs_in(shards: &[usize], mask: ShardMask) -> u64 {
    shards
        .iter()
        .enumerate()
        .filter(|(_, &s)| mask & mask_of(s) != 0)
        .fold(0, |bits, (i, _)| bits | 1 << i)
}

/// The shards of `shards`, as a mask.
fn mask_of_shards(shards: &[usize]) -> ShardMask {
    shards.iter().fold(0, |m, &s| m | mask_of(s))
}

/// The shards of `shards` whose legs are in `bits`, as a mask.
fn shards_of_legs(shards: &[usize], bits: u64) -> ShardMask {
    shards
        .iter()
        .enumerate()
        .filter(|&(i, _)| bits & 1 << i != 0)
        .fold(0, |m, (_, &s)| m | mask_of(s))
}

/// The legs of `bits`, in order.
fn leg_list(bits: u64) -> Vec<usize> {
    (0..64).filter(|i| bits & 1 << i != 0).collect()
}

impl Session {
    /// Runs a pipeline whose executions need the shards of `mask`; inside
    /// the client's transaction when `in_txn` (its connections are on the
    /// primaries). `target` is the primary already when the unit writes;
    /// `read`: a replica serves a leg whose primary is down (reads acted on
    /// before their Sync). In a pipeline that writes, sent whole to its
    /// Sync, so does the leg of a shard it only reads: its reads run on a
    /// replica, in the proxy's transaction there, and the writes commit on
    /// the other shards.
    pub(super) async fn run_pipeline(
        &mut self,
        frames: Vec<Frame>,
        mask: ShardMask,
        (target, read): (Target, bool),
        writes: bool,
        in_txn: bool,
    ) -> Result<(), End> {
        let mut shards: Vec<usize> = shards_in(mask).collect();
        if frames.first().is_some_and(|f| f.tag == frontend::QUERY) {
            return self
                .run_query_pipeline(&frames[0], &shards, target, writes, in_txn)
                .await;
        }
        if frames.last().is_none_or(|f| f.tag != frontend::SYNC) {
            // Run at a Flush: until the pipeline has read the client's
            // Sync, an error ending it is answered at that Sync.
            self.inflow = Inflow::SkipToSync;
        }
        let mut placing = Placing::default();
        let to = match self.pipeline_legs(&frames, &mut shards, &mut placing) {
            Ok(to) => to,
            Err(e) => return self.fail_pipeline(e, in_txn),
        };
        // A replica serves the legs of shards a primary is down on: every
        // one for reads acted on before their Sync; in a whole pipeline
        // (to its Sync) that writes, those it only reads (a part sent
        // after a Flush may write anywhere).
        let synced = frames.last().is_some_and(|f| f.tag == frontend::SYNC);
        let reads = match (read, synced) {
            (true, _) => ShardMask::MAX,
            (false, true) if writes => shards_of_legs(&shards, !placing.written),
            _ => 0,
        };
        // A whole pipeline (to its Sync) that only reads may run again.
        let again = self
            .before_read(!writes && !in_txn && synced && may_run_again(&frames))
            .map(|before| (frames.clone(), before));
        let (mut legs, begin) = match self.take_legs(&shards, (target, reads), in_txn).await {
            Ok(x) => x,
            Err(e) => return self.fail_pipeline(e, in_txn),
        };
        let wrap = writes && !in_txn;
        let mut outs: Vec<BytesMut> = vec![BytesMut::new(); legs.len()];
        for (leg, out) in legs.iter_mut().zip(outs.iter_mut()) {
            self.leg_prelude(leg, wrap, out);
        }
        // A shard joins a later part as the first part's shards began.
        let mut joins = Joins {
            target,
            read,
            wrap,
            begin: begin.clone(),
        };
        let answered = match self
            .pipeline_parts(
                frames,
                to,
                &mut shards,
                (&mut legs, outs),
                placing,
                &mut joins,
            )
            .await
        {
            Ok(failed) => Ok(failed),
            Err(Broke::Legs(e)) => Err(e),
            // A client message the proxy cannot read ends the session:
            // the legs are cancelled and closed as when it leaves.
            Err(Broke::Client(end)) => {
                self.left = Some(end);
                Err(String::new())
            }
        };
        // (A pipeline that began with reads is wrapped once a part writes.)
        let wrap = joins.wrap;
        if let (Err(e), Some((frames, before)), false) = (&answered, &again, wrap) {
            if self.run_read_again(&mut legs, frames, *before, e) {
                return Ok(());
            }
        }
        self.finish_legs(legs, begin, wrap, writes || wrap, answered)
            .await
    }

    /// Runs a pipeline's messages on its legs part by part, each part what
    /// the client has sent so far (`frames`, placed as `to`): to its Sync,
    /// or, when the client asked for results before it (a Flush, as
    /// psycopg's `executemany(..., returning=True)` does), each part
    /// answered and the next read from the client, placed by `placing`
    /// (on the legs it has, or, with `joins`, on legs added for the shards
    /// it needs, as `joins` says; without, a shard it has no leg on fails
    /// the pipeline). A part that writes in a pipeline not wrapped yet
    /// (its first part only read) opens the proxy's transaction on every
    /// leg first: what the legs ran since the pipeline began is in it.
    /// Whether it failed; every leg is read to its ReadyForQuery.
    async fn pipeline_parts(
        &mut self,
        mut frames: Vec<Frame>,
        mut to: Vec<To>,
        shards: &mut Vec<usize>,
        (legs, mut outs): (&mut Vec<Leg>, Vec<BytesMut>),
        mut placing: Placing,
        joins: &mut Joins,
    ) -> Result<bool, Broke> {
        let mut failed = false;
        loop {
            let synced = frames.last().is_some_and(|f| f.tag == frontend::SYNC);
            if synced {
                // (The unit's end is read: its ReadyForQuery is the proxy's.)
                self.inflow = Inflow::Open;
            }
            if !failed {
                self.pipeline_part(&frames, &to, legs, &mut outs)
                    .map_err(Broke::Client)?;
                if !synced {
                    // Everything sent is answered now: the client may be
                    // waiting for any of it.
                    outs.iter_mut().for_each(frontend::write_flush);
                }
                send_parts(legs, &outs).await?;
                outs.iter_mut().for_each(BytesMut::clear);
                failed = self.pipeline_answers(&frames, &to, legs).await?;
                if synced {
                    drain_to_ready(legs).await?;
                    return Ok(failed);
                }
            } else if synced {
                // Failed before its Sync, which every leg now gets: a leg
                // that failed skipped to it, the others' parts are rolled
                // back (`finish_legs`).
                for (leg, out) in legs.iter_mut().zip(outs.iter_mut()) {
                    frontend::write_sync(out);
                    leg.write(out).await?;
                }
                drain_to_ready(legs).await?;
                return Ok(true);
            }
            self.write_client().await.map_err(|e| e.to_string())?;
            frames = self.next_part().await?;
            if !failed {
                let placed = self.pipeline_legs(&frames, shards, &mut placing);
                let joined = match &placed {
                    Ok(_) => {
                        if placing.writes && !joins.wrap && joins.begin.is_none() {
                            for (leg, out) in legs.iter_mut().zip(outs.iter_mut()) {
                                begin_on(leg, out);
                            }
                            joins.wrap = true;
                            // From here a shard joins on its primary
                            // unless the pipeline has only read it so far.
                            joins.read = false;
                        }
                        if shards.len() > legs.len() {
                            self.add_legs(shards, legs, &mut outs, joins, placing.written)
                                .await
                        } else {
                            Ok(())
                        }
                    }
                    Err(_) => Ok(()),
                };
                to = match joined.and(placed) {
                    Ok(to) => to,
                    Err(e) => {
                        shards.truncate(legs.len());
                        e.encode(&mut self.client_out);
                        failed = true;
                        Vec::new()
                    }
                };
            }
        }
    }

    /// Borrows a leg for each shard of `shards` past the legs a pipeline
    /// has (shards its later part joined), sent first what the others
    /// were (`leg_prelude`); statements reach it as they are bound there
    /// (`translate`). Cancels reach every leg. Outside a transaction, a
    /// shard the pipeline has only read so far (its leg not in
    /// `written`) is read on a replica while its primary is down, as the
    /// first part's reads are; a later write there fails (25006), as in a
    /// transaction begun on a replica.
    async fn add_legs(
        &mut self,
        shards: &[usize],
        legs: &mut Vec<Leg>,
        outs: &mut Vec<BytesMut>,
        joins: &Joins,
        written: u64,
    ) -> Result<(), PgError> {
        let more = &shards[legs.len()..];
        let more = match &joins.begin {
            Some(begin) => self.more_transaction_legs(more, begin).await?,
            None => {
                let reads = if joins.read {
                    ShardMask::MAX
                } else {
                    shards_of_legs(shards, !written)
                };
                self.borrow_legs(more, joins.target, reads).await?
            }
        };
        for mut leg in more {
            let mut out = BytesMut::new();
            self.leg_prelude(&mut leg, joins.wrap, &mut out);
            legs.push(leg);
            outs.push(out);
        }
        self.cancels_reach(legs);
        Ok(())
    }

    /// Writes one part of a pipeline to its legs' buffers, each message
    /// where `to` places it.
    fn pipeline_part(
        &mut self,
        frames: &[Frame],
        to: &[To],
        legs: &mut [Leg],
        outs: &mut [BytesMut],
    ) -> Result<(), End> {
        for (f, to) in frames.iter().zip(to) {
            match (*to, f.tag) {
                (To::All, frontend::PARSE) => {
                    let parsed = self.record_parse(f)?;
                    for (leg, out) in legs.iter_mut().zip(outs.iter_mut()) {
                        parse_on(leg, &parsed, f, out);
                    }
                }
                (To::All, frontend::SYNC | frontend::FLUSH) => {
                    for out in outs.iter_mut() {
                        out.extend_from_slice(&f.bytes);
                    }
                }
                (To::All, _) => {
                    for (leg, out) in legs.iter_mut().zip(outs.iter_mut()) {
                        self.translate(std::slice::from_ref(f), leg, out)?;
                    }
                }
                (To::First, _) => {
                    self.translate(std::slice::from_ref(f), &mut legs[0], &mut outs[0])?
                }
                (To::One(i), _) => {
                    self.translate(std::slice::from_ref(f), &mut legs[i], &mut outs[i])?
                }
                (To::Several { legs: bits, .. }, _) => {
                    for i in leg_list(bits) {
                        self.translate(std::slice::from_ref(f), &mut legs[i], &mut outs[i])?;
                    }
                }
                (To::Nowhere, _) => {}
            }
        }
        Ok(())
    }

    /// The client's next messages in a pipeline it asked results of before
    /// its Sync: at least one, up to its Sync. A simple query or a function
    /// call cannot be among them.
    async fn next_part(&mut self) -> Result<Vec<Frame>, String> {
        let mut frames = vec![self.next_client_frame().await?];
        loop {
            let last = frames.last().map_or(frontend::SYNC, |f| f.tag);
            if matches!(last, frontend::QUERY | frontend::FUNCTION_CALL) {
                return Err(
                    "a simple query or function call inside a pipeline spanning shards, before its Sync"
                        .into(),
                );
            }
            if last == frontend::SYNC {
                return Ok(frames);
            }
            match crate::protocol::next_frame(&mut self.client_in, self.shared.max_message_size) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => return Ok(frames),
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// A query string whose statements need different shards (psql -c
    /// "INSERT ...; INSERT ...", pgx's batches over the simple protocol):
    /// each shard is sent its own statements as one query string, in their
    /// order, and the answers are read statement by statement from the
    /// shard that runs each. As one server runs a query string, the
    /// statements are one transaction: writes inside a proxy BEGIN
    /// committed on every shard only when all succeeded (or the client's
    /// own transaction), nothing answered after an error.
    async fn run_query_pipeline(
        &mut self,
        frame: &Frame,
        shards: &[usize],
        target: Target,
        writes: bool,
        in_txn: bool,
    ) -> Result<(), End> {
        let text = frontend::query(frame.body())?;
        let sql = String::from_utf8_lossy(text).into_owned();
        let statements = shardline_router::lexer::split_statements(&sql);
        // Each statement where the unit's plan placed it.
        let placements = match &self.analysis.routes.parts {
            parts if !parts.is_empty() => parts.clone(),
            _ => self.place_each(&self.route_text(text), text, &[]),
        };
        let to = match self.statement_legs(&statements, &placements, shards) {
            Ok(to) => to,
            Err(e) => return self.fail_pipeline(e, in_txn),
        };
        // Shards the string only reads: a replica where the primary is down.
        let written = to.iter().filter(|s| s.writes).fold(0, |bits, s| {
            bits | s.legs.iter().fold(0, |b, &i| b | 1 << i)
        });
        let reads = if writes {
            shards_of_legs(shards, !written)
        } else {
            0
        };
        let before = self.before_read(!writes && !in_txn);
        let (mut legs, begin) = match self.take_legs(shards, (target, reads), in_txn).await {
            Ok(x) => x,
            Err(e) => return self.fail_pipeline(e, in_txn),
        };
        let wrap = writes && !in_txn;
        let mut outs = Vec::with_capacity(legs.len());
        for (i, leg) in legs.iter_mut().enumerate() {
            let mut out = BytesMut::new();
            self.leg_prelude(leg, wrap, &mut out);
            let mine: Vec<&str> = statements
                .iter()
                .zip(&to)
                .filter(|(_, runs)| runs.legs.contains(&i))
                .map(|(s, _)| *s)
                .collect();
            frontend::write_query(&mut out, &mine.join(";\n"));
            leg.conn.unnamed_token = 0;
            outs.push(out);
        }
        let answered = match send_parts(&mut legs, &outs).await {
            Ok(()) => self.statement_answers(&to, &mut legs).await,
            Err(e) => Err(e),
        };
        if let (Err(e), Some(before)) = (&answered, before) {
            if self.run_read_again(&mut legs, std::slice::from_ref(frame), before, e) {
                return Ok(());
            }
        }
        self.finish_legs(legs, begin, wrap, writes, answered).await
    }

    /// The legs of each statement of a query string: its key's shard, the
    /// previous statement's (one without a key), or each of its shards (DDL,
    /// a write or a read without a key). Transaction control, session
    /// settings and COPY cannot be split.
    fn statement_legs(
        &self,
        statements: &[&str],
        placements: &[Placement],
        shards: &[usize],
    ) -> Result<Vec<StatementLegs>, PgError> {
        use shardline_router::classify::Class;
        if statements.len() != placements.len() {
            return Err(self.shared.events.refusals.refuse(
                Construct::Batch,
                "statements sent together in one query string reach different shards, and the proxy could not tell them apart; send them separately",
            ));
        }
        let mut current = 0;
        let mut to = Vec::with_capacity(statements.len());
        for (sql, place) in statements.iter().zip(placements) {
            let route = self.route_text(sql.as_bytes());
            match route.class {
                Class::Begin { .. } | Class::TransactionControl | Class::SetTransaction { .. } | Class::Session => {
                    return Err(self.shared.events.refusals.refuse(
                        Construct::Batch,
                        "a query string whose statements need different shards may not hold BEGIN, COMMIT, ROLLBACK, savepoints or SET; send those on their own",
                    ))
                }
                _ if shardline_router::lexer::first_keyword(sql).eq_ignore_ascii_case("copy") => {
                    // Its data would come amid the other statements' answers.
                    return Err(self.shared.events.refusals.refuse(
                        Construct::Batch,
                        "a query string whose statements need different shards may not hold COPY; send it on its own",
                    ));
                }
                _ => {}
            }
            let legs = match place {
                Placement::One(s) => {
                    if let Some(i) = shards.iter().position(|x| x == s) {
                        current = i;
                    }
                    vec![current]
                }
                Placement::Many(m) => leg_list(legs_in(shards, *m)),
                _ => vec![current],
            };
            to.push(StatementLegs {
                legs,
                replicated: route.writes_reference_tables(),
                writes: route.class == Class::Write,
            });
        }
        Ok(to)
    }

    /// Reads the answers of a split query string statement by statement,
    /// from the legs that run each, and every leg to its ReadyForQuery;
    /// returns whether a statement failed.
    async fn statement_answers(
        &mut self,
        to: &[StatementLegs],
        legs: &mut [Leg],
    ) -> Result<bool, String> {
        let mut failed = false;
        for runs in to {
            let answered = match runs.legs.as_slice() {
                &[i] => match self
                    .relay_answer(&mut legs[i], ends_statement, |_| true)
                    .await?
                {
                    Some(end) => {
                        self.client_out.extend_from_slice(&end);
                        true
                    }
                    None => false,
                },
                several => self.relay_answers(legs, several, runs.replicated).await?,
            };
            if !answered {
                failed = true;
                break;
            }
        }
        drain_to_ready(legs).await?;
        Ok(failed)
    }

    /// Forwards the answers of `several` legs to one statement as one
    /// server's: the first leg's, then the others' rows (none more for a
    /// write of reference tables, whose copies answer alike), and one
    /// command tag: their counts summed (`UPDATE 5`), or the tag they all
    /// gave (`CREATE TABLE`). `Ok(false)` after an error, forwarded.
    async fn relay_answers(
        &mut self,
        legs: &mut [Leg],
        several: &[usize],
        replicated: bool,
    ) -> Result<bool, String> {
        let mut ends: Vec<(usize, BytesMut)> = Vec::with_capacity(several.len());
        for (n, &i) in several.iter().enumerate() {
            // Said once, by the first leg: the rows' description, notices
            // ("... does not exist, skipping"), a copy's rows.
            let forward = |t: u8| n == 0 || (t == backend::DATA_ROW && !replicated);
            match self
                .relay_answer(&mut legs[i], ends_statement, forward)
                .await?
            {
                Some(end) => ends.push((legs[i].shard, end)),
                None => return Ok(false),
            }
        }
        let tagged: Vec<(usize, &[u8])> = ends.iter().map(|(s, m)| (*s, &m[..])).collect();
        match self.one_tag(&tagged, replicated) {
            Ok(()) => Ok(true),
            Err(e) => {
                e.encode(&mut self.client_out);
                Ok(false)
            }
        }
    }

    /// Where each message of the unit goes: Parse, Close, Flush and Sync to
    /// every leg, a Describe of a statement to the first, a Bind and the
    /// Describe and Execute after it to the leg of the Bind's key (to each
    /// leg of its shards for a statement on several, answered as by one
    /// server; a Bind without a key to the last keyed one's); SET
    /// TRANSACTION to every leg, answered once. (A BEGIN opening the unit
    /// was taken off it before: `peel_begin`.) Other transaction control
    /// cannot be split. `placing` carries where the previous part left off
    /// (a part read after the client asked for results). A Bind needing
    /// shards without a leg adds them to `shards` (their legs are taken
    /// before the part is sent, `add_legs`); a placement the legs cannot
    /// run (a merge, a split) fails the pipeline.
    /// `placing` notes a Bind that writes: the proxy's transaction opens
    /// on every leg before it (`pipeline_parts`) if its first part only
    /// read.
    fn pipeline_legs(
        &self,
        frames: &[Frame],
        shards: &mut Vec<usize>,
        placing: &mut Placing,
    ) -> Result<Vec<To>, PgError> {
        use shardline_router::classify::Class;
        let malformed =
            |m: frontend::Malformed| PgError::error(sqlstate::PROTOCOL_VIOLATION, m.to_string());
        let beyond = |what: &str| {
            self.shared.events.refusals.refuse(
                Construct::Batch,
                format!("this execution {what} in a pipeline that asked for results before its Sync: a later part of it runs on one shard or several, not merged or split; send a Sync before it"),
            )
        };
        let mut statements = super::route::UnitStatements::default();
        let mut to = Vec::with_capacity(frames.len());
        // The unit's plan placed each Bind whose statement it knew, in order.
        let parts = &self.analysis.routes.parts;
        for f in frames {
            to.push(match f.tag {
                frontend::PARSE => {
                    let p = frontend::parse(f.body()).map_err(malformed)?;
                    statements.parse(&p, self.route_text(p.query));
                    To::All
                }
                frontend::BIND => {
                    let b = frontend::bind(f.body()).map_err(malformed)?;
                    let known = statements.bound(self, b.statement);
                    if known
                        .as_ref()
                        .is_none_or(|(route, _)| !matches!(route.class, Class::Read | Class::Write))
                    {
                        // Not known, or sets the transaction: every leg.
                        placing.written = u64::MAX;
                    }
                    if let Some((route, definition)) = known {
                        let placed = parts.get(placing.bound).cloned();
                        placing.bound += 1;
                        placing.writes |= route.class == Class::Write;
                        match route.class {
                            Class::SetTransaction { .. } => placing.current = To::All,
                            Class::Begin { .. } | Class::TransactionControl | Class::Session => {
                                return Err(self.shared.events.refusals.refuse(
                                    Construct::Batch,
                                    "a pipeline whose statements need different shards may not hold BEGIN, COMMIT, ROLLBACK, savepoints or SET; send those with a Sync of their own",
                                ))
                            }
                            _ => {}
                        }
                        if !matches!(route.class, Class::SetTransaction { .. }) {
                            let placed = placed.unwrap_or_else(|| {
                                let params = frontend::bind_params(b.rest).unwrap_or_default();
                                self.place(&route, definition, &params)
                            });
                            // A shard without a leg joins the pipeline
                            // (`add_legs`).
                            let mask = match placed {
                                Placement::One(s) => mask_of(s),
                                Placement::Many(m) => m,
                                _ => 0,
                            };
                            shards.extend(shards_in(mask & !mask_of_shards(shards)));
                            placing.current = match placed {
                                Placement::One(s) => {
                                    placing.one = shards
                                        .iter()
                                        .position(|&x| x == s)
                                        .ok_or_else(|| beyond("needs another shard"))?;
                                    To::One(placing.one)
                                }
                                Placement::Many(m) if legs_in(shards, m).count_ones() == m.count_ones() => {
                                    To::Several {
                                        legs: legs_in(shards, m),
                                        replicated: route.writes_reference_tables(),
                                    }
                                }
                                Placement::Anywhere => To::One(placing.one),
                                _ => return Err(beyond("needs other shards")),
                            };
                            if route.class == Class::Write {
                                placing.written |= placing.current.bits();
                            }
                        }
                    }
                    placing.current
                }
                frontend::DESCRIBE if f.body().first() == Some(&b'S') => To::First,
                frontend::EXECUTE
                    if matches!(placing.current, To::Several { .. })
                        && frontend::execute(f.body()).is_ok_and(|(_, rows)| rows > 0) =>
                {
                    return Err(self.shared.events.refusals.refuse(
                        Construct::Batch,
                        "a statement on several shards in a pipeline cannot be executed with a row limit; send it with a Sync of its own",
                    ))
                }
                frontend::DESCRIBE | frontend::EXECUTE => placing.current,
                frontend::CLOSE | frontend::SYNC | frontend::FLUSH => To::All,
                _ => To::Nowhere,
            });
        }
        Ok(to)
    }

    /// Reads the legs' answers in the order of the client's messages (up
    /// to the Sync) and forwards them; returns whether the unit failed.
    /// After an error nothing more is read here (`drain_to_ready` reads
    /// every leg to its ReadyForQuery once the Sync is sent).
    async fn pipeline_answers(
        &mut self,
        frames: &[Frame],
        to: &[To],
        legs: &mut [Leg],
    ) -> Result<bool, String> {
        let all: Vec<usize> = (0..legs.len()).collect();
        let mut failed = false;
        'frames: for (f, to) in frames.iter().zip(to) {
            let from: &[usize] = match to {
                _ if f.tag == frontend::SYNC => break,
                // (No answer.)
                _ if f.tag == frontend::FLUSH => continue,
                To::All => &all,
                To::First => &all[..1],
                To::One(i) => std::slice::from_ref(&all[*i]),
                To::Several {
                    legs: bits,
                    replicated,
                } if f.tag == frontend::EXECUTE => {
                    if !self
                        .relay_answers(legs, &leg_list(*bits), *replicated)
                        .await?
                    {
                        failed = true;
                        break 'frames;
                    }
                    continue;
                }
                To::Several { legs: bits, .. } => &leg_list(*bits),
                To::Nowhere => continue,
            };
            for (n, &i) in from.iter().enumerate() {
                // The message's answer: forwarded once for all legs.
                let ends = |t: u8| {
                    !matches!(
                        t,
                        backend::DATA_ROW
                            | backend::PARAMETER_DESCRIPTION
                            | backend::NOTICE_RESPONSE
                            | backend::NOTIFICATION
                    )
                };
                match self.relay_answer(&mut legs[i], ends, |_| true).await? {
                    Some(end) if n == 0 => self.client_out.extend_from_slice(&end),
                    Some(_) => {}
                    None => {
                        failed = true;
                        break 'frames;
                    }
                }
            }
        }
        Ok(failed)
    }

    /// Forwards one leg's answer to one client message or statement: the
    /// messages `forward` accepts (never ParameterStatus), up to the one
    /// `ends` accepts, returned unforwarded. An error is forwarded and ends
    /// the unit: `Ok(None)`. ReadyForQuery or COPY here means the shard ran
    /// something the proxy did not split: an error.
    async fn relay_answer(
        &mut self,
        leg: &mut Leg,
        ends: impl Fn(u8) -> bool,
        forward: impl Fn(u8) -> bool,
    ) -> Result<Option<BytesMut>, String> {
        loop {
            let msg = self.leg_next(leg).await?;
            match msg[0] {
                backend::PARAMETER_STATUS => {}
                backend::ERROR_RESPONSE => {
                    self.client_out.extend_from_slice(&msg);
                    return Ok(None);
                }
                backend::READY_FOR_QUERY
                | backend::COPY_IN_RESPONSE
                | backend::COPY_OUT_RESPONSE => return Err(self.unexpected(leg, msg[0])),
                tag if ends(tag) => return Ok(Some(msg)),
                tag if forward(tag) => self.client_out.extend_from_slice(&msg),
                _ => {}
            }
            if self.client_out.len() >= FLUSH_AT {
                self.write_client().await.map_err(|e| e.to_string())?;
            }
        }
    }

    /// A leg answered what the proxy did not send it: ReadyForQuery or COPY
    /// among statements spanning shards.
    fn unexpected(&self, leg: &Leg, tag: u8) -> String {
        format!(
            "shard {} answered statements sent together unexpectedly ('{}'); COPY cannot run among statements spanning shards",
            self.shared.topology.shards[leg.shard].name,
            tag as char
        )
    }

    /// The pipeline failed before anything was sent (inside the client's
    /// transaction: which is failed, as by any error).
    fn fail_pipeline(&mut self, e: PgError, in_txn: bool) -> Result<(), End> {
        e.encode(&mut self.client_out);
        if in_txn {
            self.txn.fail();
        }
        self.unit_ready(if in_txn { b'E' } else { b'I' });
        Ok(())
    }
}

/// Writes each leg its part of the unit (taking in the answers meanwhile).
async fn send_parts(legs: &mut [Leg], outs: &[BytesMut]) -> Result<(), String> {
    for (leg, out) in legs.iter_mut().zip(outs) {
        leg.send_draining(out, MAX_DRAINED).await?;
    }
    Ok(())
}
