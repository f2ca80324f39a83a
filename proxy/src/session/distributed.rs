//! Transactions that use several shards (`sharding.two_phase_commit`).
//!
//! The session keeps one attached connection, as for any transaction. When
//! a statement of the open transaction needs another shard, the attached
//! connection (idle inside its transaction) is *parked* and a connection on
//! the other shard joins: it starts with the transaction's own BEGIN,
//! swallowed like a deferred one. Going back to a shard already in the
//! transaction swaps the parked connection in again. COMMIT then runs the
//! two-phase protocol of `crate::twophase` over all of them; ROLLBACK
//! rolls each back. A statement on several shards at once runs on the
//! transaction's connections (`transaction_legs`: the attached one and the
//! parked ones of those shards, new ones joining elsewhere), which go back
//! into the transaction afterwards (`keep_in_transaction`). Savepoints stay
//! refused inside such a transaction.

use super::attach::{Placed, Purpose};
use super::leg::Leg;
use super::txn::Txn;
use super::{End, Fit, Next, Session, TxnEnd};
use crate::protocol::backend::{self, sqlstate, PgError};
use crate::protocol::{frontend, next_frame};
use crate::server::ServerError;
use crate::twophase::literal;
use bytes::{Bytes, BytesMut};
use futures_util::future::join_all;
use shardline_router::classify::Class;
use shardline_router::shards::Construct;
use std::sync::atomic::Ordering::Relaxed;

/// What the session holds of a transaction on several shards (two-phase
/// commit), besides its attached connection.
#[derive(Default)]
pub(super) struct Spanning {
    /// The transaction's connections on other shards, parked.
    pub parked: Vec<Placed>,
    /// The shard the transaction began on: its decision row is written
    /// there, and it commits first.
    pub coordinator: Option<usize>,
    /// A shard joins the transaction: its BEGIN is to be made
    /// (`prepare_join`).
    pub join_begin: bool,
    /// The transaction's cursors, each with the shard it was declared on:
    /// a FETCH, MOVE or CLOSE of one runs there (`Session::cursor_place`).
    pub cursors: Vec<(String, usize)>,
}

impl Spanning {
    /// Whether the transaction holds connections on other shards.
    pub fn spans(&self) -> bool {
        !self.parked.is_empty()
    }
}

/// A server's SQLSTATE, passed on when it is one (five letters or digits).
fn server_code(code: &str) -> std::borrow::Cow<'static, str> {
    if code.len() == 5 && code.bytes().all(|b| b.is_ascii_alphanumeric()) {
        code.to_string().into()
    } else {
        sqlstate::INTERNAL_ERROR.into()
    }
}

/// A server's error (or a lost connection) as the client's error.
fn client_error(e: &ServerError, shard: &str) -> PgError {
    match e {
        ServerError::Refused { fields, .. } => {
            PgError::error(server_code(&fields.code), fields.message.clone())
        }
        other => PgError::error(
            sqlstate::CONNECTION_FAILURE,
            format!("shard {shard}: {other}"),
        ),
    }
}

/// The BEGIN for a shard joining a transaction of this isolation level.
fn begin_frame(isolation: &str) -> Bytes {
    let level = match isolation {
        "serializable" => "SERIALIZABLE",
        "repeatable read" => "REPEATABLE READ",
        "read uncommitted" => "READ UNCOMMITTED",
        _ => "READ COMMITTED",
    };
    let mut b = BytesMut::new();
    frontend::write_query(&mut b, &format!("BEGIN ISOLATION LEVEL {level}"));
    b.freeze()
}

impl Session {
    /// Called before routing a unit while the transaction has parked
    /// participants.
    pub(super) fn distributed_next(&self) -> Result<Next, End> {
        let refuse = || {
            Next::Refuse(self.shared.events.refusals.refuse(
                Construct::Transaction,
                "SAVEPOINT, RELEASE, ROLLBACK TO and PREPARE TRANSACTION are not supported in a transaction that spans shards, nor a COMMIT or ROLLBACK sent with other statements; the transaction is failed: send ROLLBACK",
            ))
        };
        if let Some((frontend::QUERY, body)) = self.unit_messages().next() {
            let text = frontend::query(body)?;
            let sql = String::from_utf8_lossy(text);
            if let Some(tag) = shardline_router::lone_transaction_end(&sql) {
                return Ok(Next::End(TxnEnd {
                    commit: tag == "COMMIT",
                }));
            }
            if self.route_text(text).class == Class::TransactionControl {
                return Ok(refuse());
            }
            return Ok(Next::Other);
        }
        let executed = self.unit_executions()?;
        let ends: Vec<Option<&'static str>> = executed
            .iter()
            .map(|q| shardline_router::lone_transaction_end(&String::from_utf8_lossy(q)))
            .collect();
        if let [Some(tag)] = ends.as_slice() {
            return Ok(Next::End(TxnEnd {
                commit: *tag == "COMMIT",
            }));
        }
        let control = executed
            .iter()
            .any(|q| self.route_text(q).class == Class::TransactionControl);
        Ok(if control { refuse() } else { Next::Other })
    }

    /// The statement texts an extended-protocol unit at the front of
    /// `client_in` executes, one per Execute, up to its Sync (a Parse alone
    /// executes nothing).
    pub(super) fn unit_executions(&self) -> Result<Vec<Vec<u8>>, End> {
        let mut parsed: Vec<(&[u8], &[u8])> = Vec::new();
        let mut bound: Option<Vec<u8>> = None;
        let mut executed: Vec<Vec<u8>> = Vec::new();
        for (tag, body) in self.unit_messages() {
            match tag {
                frontend::PARSE => {
                    let p = frontend::parse(body)?;
                    parsed.retain(|(name, _)| *name != p.name);
                    parsed.push((p.name, p.query));
                }
                frontend::BIND => {
                    let b = frontend::bind(body)?;
                    bound = match parsed.iter().find(|(name, _)| *name == b.statement) {
                        Some((_, q)) => Some(q.to_vec()),
                        None => self
                            .bound_definition(b.statement)
                            .map(|d| super::route::definition_query(&d).to_vec()),
                    };
                }
                frontend::EXECUTE => executed.extend(bound.clone()),
                _ => {}
            }
        }
        Ok(executed)
    }

    /// A unit that opens with a lone BEGIN and goes on with statements for
    /// several shards (PgJDBC with autocommit off sends the BEGIN in the
    /// unit of the transaction's first statement): the BEGIN's messages
    /// are answered here and the BEGIN deferred as if it had come alone,
    /// so the rest is placed as the transaction's first statement. Only
    /// `[Parse] Bind [Describe] Execute` of the BEGIN, outside any
    /// transaction. Returns whether it did.
    pub(super) fn peel_begin(&mut self) -> Result<bool, End> {
        use shardline_router::classify::Class;
        if self.mode() != shardline_config::PoolMode::Transaction
            || self.server.is_some()
            || self.txn.has_begin()
            || self.spanning.spans()
            || !self.pending.is_empty()
        {
            return Ok(false);
        }
        let mut taken = 0;
        let mut parsed: Option<(&[u8], &[u8])> = None;
        let mut text: Option<Vec<u8>> = None;
        for (tag, body) in self.unit_messages() {
            taken += 1;
            match tag {
                frontend::PARSE if taken == 1 => {
                    let p = frontend::parse(body)?;
                    parsed = Some((p.name, p.query));
                }
                frontend::BIND if text.is_none() => {
                    let b = frontend::bind(body)?;
                    text = match parsed {
                        Some((name, query)) if name == b.statement => Some(query.to_vec()),
                        Some(_) => return Ok(false),
                        None => self
                            .bound_definition(b.statement)
                            .map(|d| super::route::definition_query(&d).to_vec()),
                    };
                }
                frontend::DESCRIBE if text.is_some() && body.first() == Some(&b'P') => {}
                frontend::EXECUTE if text.is_some() => break,
                _ => return Ok(false),
            }
        }
        let Some(text) = text else { return Ok(false) };
        if self.route_text(&text).class != (Class::Begin { read_only: false }) {
            return Ok(false);
        }
        let mut frames = Vec::with_capacity(taken);
        for _ in 0..taken {
            let Some(f) = next_frame(&mut self.client_in, usize::MAX).map_err(|e| {
                End::Fatal(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string()))
            })?
            else {
                break;
            };
            frames.push(f);
        }
        self.hold_extended_begin(&frames)?;
        Ok(true)
    }

    /// Holds a BEGIN sent by the extended protocol, its messages (`frames`)
    /// taken off the buffer: its Parse recorded, the messages answered as
    /// a server answers them, and the simple query of the text its Bind
    /// names kept to go with the transaction's first statement.
    pub(super) fn hold_extended_begin(
        &mut self,
        frames: &[crate::protocol::Frame],
    ) -> Result<(), End> {
        self.answer_alone(frames, "BEGIN")?;
        let mut text = Vec::new();
        for f in frames.iter().filter(|f| f.tag == frontend::BIND) {
            let b = frontend::bind(f.body())?;
            if let Some((_, definition)) = self.session_statement(b.statement) {
                text = super::route::definition_query(definition).to_vec();
            }
        }
        let mut begin = BytesMut::new();
        frontend::write_query(&mut begin, &String::from_utf8_lossy(&text));
        self.txn.set_begin(begin.freeze());
        Ok(())
    }

    /// Answers a unit the proxy runs alone (`frames`, taken off the
    /// buffer), as a server would, its statement completing with `tag`:
    /// a simple query's CommandComplete, or the extended protocol's
    /// answers to each message, its Parses recorded.
    pub(super) fn answer_alone(
        &mut self,
        frames: &[crate::protocol::Frame],
        tag: &str,
    ) -> Result<(), End> {
        for f in frames.iter().filter(|f| f.tag == frontend::PARSE) {
            self.record_parse(f)?;
        }
        answer_frames(&mut self.client_out, frames, Ok(tag));
        Ok(())
    }

    /// The extended-protocol unit at the front (complete up to its Sync)
    /// executes one lone COMMIT, END, ROLLBACK or ABORT.
    pub(super) fn unit_ends_transaction(&self) -> Result<bool, End> {
        if self
            .unit_messages()
            .next()
            .is_none_or(|(tag, _)| tag == frontend::QUERY)
            || !self
                .unit_messages()
                .any(|(tag, _)| crate::protocol::ends_unit(tag))
        {
            return Ok(false);
        }
        Ok(match self.unit_executions()?.as_slice() {
            [q] => shardline_router::lone_transaction_end(&String::from_utf8_lossy(q)).is_some(),
            _ => false,
        })
    }

    /// In a transaction the proxy failed (a refused statement): an
    /// extended-protocol COMMIT or ROLLBACK ends it as ROLLBACK, answered
    /// message by message as the server would (PgJDBC's `rollback()`).
    pub(super) fn end_refused_unit(&mut self) -> Result<(), End> {
        let frames = self.take_unit()?;
        self.register_parses(&frames)?;
        if self.server.is_some() {
            // Answered before the server's ROLLBACK completes; the next unit
            // waits for it on this connection (the flag clears at its `I`).
            self.send_own_query("ROLLBACK");
            self.pending.push_back(super::pending::Pending::swallow(
                super::pending::Kind::Query {
                    effects: Default::default(),
                },
            ));
        } else {
            self.txn = Txn::Plain;
        }
        self.txn_effects.clear();
        answer_unit(&mut self.client_out, &frames, Ok("ROLLBACK"));
        Ok(())
    }

    /// Whether the transaction may take in other shards now: two-phase
    /// commit on, transaction pooling, not reading from replicas, and
    /// nothing in flight.
    pub(super) fn may_join(&self) -> bool {
        self.shared.two_phase.is_some()
            && self.mode() == shardline_config::PoolMode::Transaction
            && self.purpose != Purpose::Read
            && self.pending.is_empty()
            // A kept connection (session state) is never parked: ending
            // the transaction elsewhere would give it back to the pool
            // with the client's state on it.
            && self.pinned.is_none()
    }

    /// The open transaction needs shard `shard`: park the attached
    /// connection and bring that shard's in. `None`: not allowed here (the
    /// caller refuses as without two-phase commit).
    pub(super) fn join_shard(&mut self, shard: usize) -> Result<Option<Fit>, End> {
        let allowed = self.may_join();
        let Some(status) = self
            .server
            .as_ref()
            .map(|s| s.tx_status)
            .filter(|_| allowed)
        else {
            return Ok(None);
        };
        if status == b'E' {
            self.fail_next_message(PgError::error(
                sqlstate::IN_FAILED_SQL_TRANSACTION,
                "current transaction is aborted, commands ignored until end of transaction block",
            ))?;
            return Ok(Some(Fit::Refused));
        }
        let Some(parked) = self.take_attached() else {
            return Ok(None);
        };
        self.client.detach();
        self.spanning.coordinator.get_or_insert(parked.shard);
        self.spanning.parked.push(parked);
        if let Some(i) = self.spanning.parked.iter().position(|p| p.shard == shard) {
            let p = self.spanning.parked.swap_remove(i);
            self.client
                .attach(p.conn.addr.clone(), p.conn.pid, p.conn.secret);
            self.server = Some(p);
            return Ok(Some(Fit::Yes));
        }
        // A new participant: it begins with the transaction's isolation
        // level (asked of the connection just parked, before it attaches).
        self.spanning.join_begin = true;
        Ok(Some(Fit::Join))
    }

    /// Before a joining shard attaches: its BEGIN, at the isolation level
    /// of the transaction (asked of the participant parked last).
    pub(super) async fn prepare_join(&mut self) {
        if !std::mem::take(&mut self.spanning.join_begin) {
            return;
        }
        let level = self.transaction_isolation().await;
        match level {
            Some(level) => self.txn.set_begin(begin_frame(&level)),
            // The participant did not answer: the transaction is failed.
            None => self.txn.fail(),
        }
    }

    /// COMMIT or ROLLBACK of a transaction that used several shards.
    pub(super) async fn end_distributed(&mut self, end: TxnEnd) -> Result<(), End> {
        let TxnEnd { commit } = end;
        // The unit's messages: the one query, or everything up to Sync.
        let frames = self.take_unit()?;
        self.register_parses(&frames)?;
        self.spanning.cursors.clear();
        let mut conns = std::mem::take(&mut self.spanning.parked);
        if let Some(attached) = self.take_attached() {
            conns.push(attached);
        }
        self.detach();
        if let Some(i) = conns
            .iter()
            .position(|p| Some(p.shard) == self.spanning.coordinator)
        {
            let c = conns.remove(i);
            conns.insert(0, c);
        }
        // A refused statement or a join that failed leaves the transaction failed.
        let failed = self.txn.failed()
            || self.txn.has_begin()
            || conns.iter().any(|p| p.conn.tx_status != b'T');
        self.txn = Txn::Plain;
        self.spanning.coordinator = None;
        let effects = std::mem::take(&mut self.txn_effects);
        let outcome = if commit && !failed {
            self.commit_everywhere(&mut conns).await
        } else {
            rollback_all(&mut conns).await;
            Ok("ROLLBACK")
        };
        match outcome {
            Ok(tag) => {
                if tag == "COMMIT" {
                    for e in &effects {
                        self.commit_effect(e);
                    }
                    let this = &*self;
                    join_all(
                        conns
                            .iter_mut()
                            .filter(|p| p.conn.is_clean())
                            .map(|p| this.remember_write(p.shard, &mut p.conn)),
                    )
                    .await;
                }
                answer_unit(&mut self.client_out, &frames, Ok(tag));
            }
            Err(e) => answer_unit(&mut self.client_out, &frames, Err(e)),
        }
        for p in conns {
            p.conn.give_back();
        }
        self.wrote = false;
        Ok(())
    }

    /// A connection on each of `shards` inside the client's transaction:
    /// the attached one and parked participants where the transaction has
    /// one, new ones (joining) elsewhere. Also the BEGIN the joining ones
    /// are sent: the client's deferred BEGIN, or one at the isolation level
    /// of the transaction.
    pub(super) async fn transaction_legs(
        &mut self,
        shards: &[usize],
    ) -> Result<(Vec<Leg>, Bytes), PgError> {
        let deferred = self.txn.take_begin();
        let begin = match &deferred {
            Some(b) => b.clone(),
            None => match self.transaction_isolation().await {
                Some(level) => begin_frame(&level),
                None => {
                    return Err(PgError::error(
                        sqlstate::CONNECTION_FAILURE,
                        "a shard of the transaction did not answer; the transaction is failed: send ROLLBACK",
                    ))
                }
            },
        };
        self.client.detach();
        let mut held = self.participants_on(shards);
        if let Some(attached) = self.take_attached() {
            let mut leg = Leg::parked(attached.shard, attached.node, attached.conn);
            leg.attached = true;
            held.push(leg);
        }
        let mut legs = Vec::with_capacity(shards.len());
        for &shard in shards {
            match self.transaction_leg(shard, &mut held, &begin).await {
                Ok(leg) => legs.push(leg),
                Err(e) => {
                    // Nothing was sent: the transaction keeps what it had.
                    legs.extend(held);
                    if let Some(begin) = deferred {
                        self.txn.set_begin(begin);
                    }
                    self.park_legs(legs.into_iter().filter(|l| l.joins.is_none()).collect());
                    return Err(e);
                }
            }
        }
        // The attached connection, when its shard is not one of these.
        self.park_legs(held);
        // In use from here: a leg not read back to its ReadyForQuery (the
        // unit failed before or while it ran) leaves the transaction.
        for leg in &mut legs {
            leg.done = false;
        }
        self.cancels_reach(&legs);
        Ok((legs, begin))
    }

    /// The transaction's parked participants on `shards`, taken as legs.
    fn participants_on(&mut self, shards: &[usize]) -> Vec<Leg> {
        self.spanning
            .parked
            .extract_if(.., |p| shards.contains(&p.shard))
            .map(|p| Leg::parked(p.shard, p.node, p.conn))
            .collect()
    }

    /// The transaction's connection on `shard`: one of `held` (the
    /// transaction's own), else a primary's, joining with `begin`.
    async fn transaction_leg(
        &mut self,
        shard: usize,
        held: &mut Vec<Leg>,
        begin: &Bytes,
    ) -> Result<Leg, PgError> {
        if let Some(i) = held.iter().position(|h| h.shard == shard) {
            return Ok(held.swap_remove(i));
        }
        let mut tried = 0;
        let (conn, node, _) = self
            .borrow(shard, shardline_router::Target::Primary, false, &mut tried)
            .await?;
        let mut leg = Leg::parked(shard, node, conn);
        leg.joins = Some(begin.clone());
        Ok(leg)
    }

    /// Connections on `shards` for a later part of a pipeline inside the
    /// client's transaction (none of them its legs yet): a parked
    /// participant's, else a primary's joining with `begin`. On an error
    /// the participants taken are parked again.
    pub(super) async fn more_transaction_legs(
        &mut self,
        shards: &[usize],
        begin: &Bytes,
    ) -> Result<Vec<Leg>, PgError> {
        let mut held = self.participants_on(shards);
        let mut legs = Vec::with_capacity(shards.len());
        for &shard in shards {
            match self.transaction_leg(shard, &mut held, begin).await {
                Ok(mut leg) => {
                    leg.done = false;
                    legs.push(leg);
                }
                Err(e) => {
                    let own = legs.into_iter().chain(held).filter(|l| l.joins.is_none());
                    self.spanning.parked.extend(own.map(Leg::into_placed));
                    return Err(e);
                }
            }
        }
        Ok(legs)
    }

    /// The transaction's isolation level, asked of its attached connection,
    /// else of the participant parked last.
    pub(super) async fn transaction_isolation(&mut self) -> Option<String> {
        let conn = match self.server.as_mut() {
            Some(c) => c,
            None => &mut self.spanning.parked.last_mut()?.conn,
        };
        conn.simple_query("SELECT current_setting('transaction_isolation')")
            .await
            .ok()
            .and_then(|(rows, _)| rows.into_iter().next())
            .and_then(|r| r.into_iter().next().flatten())
    }

    /// Legs back into the client's transaction: the one on the shard that
    /// was attached (else the first) attached again, the others parked.
    /// Legs not read to their ReadyForQuery or broken are closed (their
    /// part of the transaction rolls back); returns whether every leg
    /// survived.
    fn park_legs(&mut self, legs: Vec<Leg>) -> bool {
        let mut whole = true;
        let attached = self.server.is_some();
        let mut kept = Vec::with_capacity(legs.len());
        for l in legs {
            if l.done && !l.conn.broken && l.conn.tx_status != b'I' {
                kept.push(l);
            } else {
                whole = false;
                l.conn.discard();
            }
        }
        let mut legs = kept;
        if !attached && !legs.is_empty() {
            let i = legs.iter().position(|l| l.attached).unwrap_or(0);
            let leg = legs.swap_remove(i);
            self.client
                .attach(leg.conn.addr.clone(), leg.conn.pid, leg.conn.secret);
            self.server = Some(leg.into_placed());
        }
        self.spanning
            .parked
            .extend(legs.into_iter().map(Leg::into_placed));
        whole
    }

    /// After a pipeline inside the client's transaction: its connections
    /// stay in the transaction (a shard that lost its part fails it), the
    /// client is told the transaction's state.
    pub(super) fn keep_in_transaction(
        &mut self,
        legs: Vec<Leg>,
        begin: Bytes,
        writes: bool,
        failed: bool,
    ) {
        self.client.detach();
        let whole = self.park_legs(legs);
        if let Some(s) = self.server.as_ref() {
            self.client.attach(s.addr.clone(), s.pid, s.secret);
        } else {
            // No shard holds the transaction now: it is failed before any
            // server, as a refused first statement leaves one.
            self.txn.set_begin(begin);
        }
        if let Some(shard) = self.attached_shard() {
            self.spanning.coordinator.get_or_insert(shard);
        }
        self.purpose = self.purpose.in_transaction(writes);
        self.rerun.answered();
        self.wrote |= writes;
        let failed = failed || !whole;
        if failed {
            self.txn.fail();
        }
        self.unit_ready(if failed { b'E' } else { b'T' });
    }

    fn shard_name(&self, shard: usize) -> String {
        self.shared.topology.shards[shard].name.clone()
    }

    /// The two-phase commit: decision row on the coordinator (first), PREPARE
    /// on the others, the coordinator's COMMIT as the decision, then COMMIT
    /// PREPARED. Fails (rolling back everywhere) until the decision.
    async fn commit_everywhere(&mut self, conns: &mut [Placed]) -> Result<&'static str, PgError> {
        let Some(tp) = self.shared.two_phase.clone() else {
            return Err(PgError::error(
                sqlstate::INTERNAL_ERROR,
                "a transaction on several shards without two-phase commit",
            ));
        };
        let gid = tp.new_gid(conns[0].shard);
        let g = literal(&gid);
        let (coordinator, others) = conns.split_at_mut(1);
        let coord = &mut coordinator[0];
        // The decision row first, then the PREPAREs: once a participant is
        // prepared, a resolver (of any proxy) may look for its decision, and
        // it must find the row held by this open transaction and wait on
        // it. Sent together, a resolver could insert its rollback row in
        // between and fail a healthy commit.
        let record =
            format!("INSERT INTO shardline.txn_decisions (gid, commit) VALUES ({g}, true)");
        let prepare = format!("PREPARE TRANSACTION {g}");
        let mut failure = coord.conn.simple_query(&record).await.err().map(|e| {
            client_error(&e, &self.shard_name(coord.shard)).with_hint(
                "two-phase commit records its decisions in shardline.txn_decisions on the transaction's first shard",
            )
        });
        let prepares = if failure.is_none() {
            join_all(others.iter_mut().map(|p| p.conn.simple_query(&prepare))).await
        } else {
            Vec::new()
        };
        let mut prepared: Vec<bool> = prepares.iter().map(|r| r.is_ok()).collect();
        prepared.resize(others.len(), false);
        for (p, r) in others.iter().zip(prepares) {
            if let (None, Err(e)) = (&failure, r) {
                failure = Some(client_error(&e, &self.shard_name(p.shard)));
            }
        }
        let counts = &tp.events.two_phase;
        if let Some(err) = failure {
            counts.rolled_back.fetch_add(1, Relaxed);
            let rollback = format!("ROLLBACK PREPARED {g}");
            join_all(others.iter_mut().zip(&prepared).map(|(p, &done)| {
                p.conn
                    .simple_query(if done { rollback.as_str() } else { "ROLLBACK" })
            }))
            .await;
            let _ = coord.conn.simple_query("ROLLBACK").await;
            return Err(err);
        }
        counts.prepared.fetch_add(1, Relaxed);
        tp.maybe_stop("prepared", &gid).await;
        match coord.conn.simple_query("COMMIT").await {
            Ok(_) => {}
            Err(ServerError::Refused { fields, .. }) => {
                counts.rolled_back.fetch_add(1, Relaxed);
                // The coordinator refused to commit (a deferred constraint):
                // nothing was decided; the others roll back.
                for p in others.iter_mut() {
                    let _ = p.conn.simple_query(&format!("ROLLBACK PREPARED {g}")).await;
                }
                return Err(PgError::error(server_code(&fields.code), fields.message));
            }
            Err(e) => {
                counts.in_doubt.fetch_add(1, Relaxed);
                coord.conn.broken = true;
                tracing::error!(%gid, error = %e, traceparent = self.unit_trace().as_deref(), "lost the coordinator shard while committing; the in-doubt check settles it");
                return Err(PgError::error(
                    "08007",
                    format!(
                        "the connection to shard {} was lost while committing ({e}); the transaction is committed everywhere or rolled back everywhere once the proxy's in-doubt check runs",
                        self.shard_name(coord.shard)
                    ),
                ));
            }
        }
        tp.maybe_stop("decided", &gid).await;
        let mut finished = true;
        let commit = format!("COMMIT PREPARED {g}");
        let done = join_all(others.iter_mut().map(|p| p.conn.simple_query(&commit))).await;
        for (p, r) in others.iter_mut().zip(done) {
            if let Err(e) = r {
                finished = false;
                p.conn.broken = true;
                tracing::warn!(%gid, shard = %self.shard_name(p.shard), error = %e, traceparent = self.unit_trace().as_deref(), "COMMIT PREPARED failed; the in-doubt check finishes it");
            }
        }
        counts.committed.fetch_add(1, Relaxed);
        if !finished {
            counts.in_doubt.fetch_add(1, Relaxed);
        }
        if finished {
            let forget = format!("DELETE FROM shardline.txn_decisions WHERE gid = {g}");
            let _ = coord.conn.simple_query(&forget).await;
        }
        Ok("COMMIT")
    }
}

/// Answers the unit that ended the transaction as a server would: each
/// message in order, the outcome at the Execute (or the query), after an
/// error nothing until ReadyForQuery.
fn answer_unit(
    out: &mut BytesMut,
    frames: &[crate::protocol::Frame],
    outcome: Result<&str, PgError>,
) {
    answer_frames(out, frames, outcome);
    backend::ready_for_query(out, b'I');
}

/// Answers messages as a server would, the outcome at the Execute (or the
/// query), after an error nothing.
fn answer_frames(
    out: &mut BytesMut,
    frames: &[crate::protocol::Frame],
    outcome: Result<&str, PgError>,
) {
    let mut outcome = Some(outcome);
    let mut failed = false;
    for f in frames {
        match f.tag {
            frontend::QUERY | frontend::EXECUTE => match outcome.take() {
                Some(Ok(tag)) => backend::command_complete(out, tag),
                Some(Err(e)) => {
                    e.encode(out);
                    failed = true;
                }
                None => {}
            },
            _ if failed => {}
            frontend::PARSE => backend::empty_message(out, backend::PARSE_COMPLETE),
            frontend::BIND => backend::empty_message(out, backend::BIND_COMPLETE),
            frontend::CLOSE => backend::empty_message(out, backend::CLOSE_COMPLETE),
            frontend::DESCRIBE => {
                if f.body().first() == Some(&b'S') {
                    backend::put_message(out, backend::PARAMETER_DESCRIPTION, |b| {
                        b.extend_from_slice(&0i16.to_be_bytes())
                    });
                }
                backend::empty_message(out, backend::NO_DATA);
            }
            _ => {}
        }
    }
}

async fn rollback_all(conns: &mut [Placed]) {
    for p in conns.iter_mut() {
        if p.conn.simple_query("ROLLBACK").await.is_err() {
            p.conn.broken = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::answer_frames;
    use crate::protocol::backend::{sqlstate, PgError};
    use crate::protocol::{frontend, next_frame};
    use bytes::BytesMut;

    /// The tags of the messages in `out`, and each message's body.
    fn messages(out: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>) {
        let (mut tags, mut bodies, mut rest) = (Vec::new(), Vec::new(), out);
        while let [tag, a, b, c, d, ..] = *rest {
            let len = u32::from_be_bytes([a, b, c, d]) as usize;
            tags.push(tag);
            bodies.push(rest[5..len + 1].to_vec());
            rest = &rest[len + 1..];
        }
        (tags, bodies)
    }

    #[test]
    fn a_unit_the_proxy_runs_alone_is_answered_as_a_server_answers_it() {
        // A named COMMIT with Describes of its statement and portal, then
        // its Sync (answered by the caller's ReadyForQuery).
        let mut unit = BytesMut::new();
        frontend::write_parse(&mut unit, b"e", b"COMMIT\0\0\0");
        frontend::write_target(&mut unit, frontend::DESCRIBE, b'S', b"e");
        frontend::write_bind(&mut unit, b"", b"e", &[0, 0, 0, 0, 0, 0]);
        frontend::write_target(&mut unit, frontend::DESCRIBE, b'P', b"");
        frontend::write_execute(&mut unit, b"", 0);
        frontend::write_sync(&mut unit);
        let mut frames = Vec::new();
        while let Some(f) = next_frame(&mut unit, usize::MAX).unwrap() {
            frames.push(f);
        }
        let mut out = BytesMut::new();
        answer_frames(&mut out, &frames, Ok("COMMIT"));
        let (tags, bodies) = messages(&out);
        assert_eq!(tags, b"1tn2nC");
        assert_eq!(bodies[1], [0, 0], "no parameters");
        assert_eq!(bodies[5], b"COMMIT\0");
        // A simple query: its CommandComplete.
        let mut out = BytesMut::new();
        let mut q = BytesMut::new();
        frontend::write_query(&mut q, "ROLLBACK");
        let q = next_frame(&mut q, usize::MAX).unwrap().unwrap();
        answer_frames(&mut out, &[q], Ok("ROLLBACK"));
        assert_eq!(
            messages(&out),
            (b"C".to_vec(), vec![b"ROLLBACK\0".to_vec()])
        );
        // An error at the Execute: nothing after it.
        let mut out = BytesMut::new();
        let e = PgError::error(sqlstate::CONNECTION_FAILURE, "gone");
        answer_frames(&mut out, &frames, Err(e));
        assert_eq!(messages(&out).0, b"1tn2nE");
    }
}
