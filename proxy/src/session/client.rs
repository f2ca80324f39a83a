//! Messages from the client: forwarded as they came, except prepared statement
//! names (mapped to server names) and the few commands the proxy answers itself.

use super::attach::Purpose;
use super::pending::{Answer, Kind, Pending, Synthetic};
use super::rename;
use super::unit::{Ends, Inflow};
use super::{End, Fit, Next, Session, TxnEnd};
use crate::protocol::backend::{sqlstate, PgError};
use crate::protocol::frontend::{self, Malformed};
use crate::protocol::{next_frame, peek_header, Frame};
use shardline_config::PoolMode;
use shardline_router::cacheable::CacheUse;
use shardline_router::effect::{self, Effect};
use shardline_router::shards::Construct;
use std::collections::VecDeque;
use std::sync::Arc;

/// A portal no client can have bound (its name is not a statement's
/// rename, `rename.rs`): the proxy's Execute of it fails the server's
/// unit (`Kind::Abort`).
const ABORT_PORTAL: &[u8] = b"shardline refused unit";

fn violation(message: impl Into<String>) -> End {
    End::Fatal(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, message))
}

impl From<Malformed> for End {
    fn from(m: Malformed) -> End {
        violation(m.to_string())
    }
}

/// What handling the client's buffered messages came to.
pub(super) enum Flow {
    /// Every complete message was handled.
    Done,
    /// COMMIT or ROLLBACK of a transaction on several shards.
    EndDistributed(TxnEnd),
    /// The next message needs a server connection and none is attached.
    NeedServer,
    /// The next unit needs several shards, inside the open transaction
    /// (two-phase commit): it runs on the transaction's connections there.
    Fanout,
    /// The next message starts a unit that may not run where the attached
    /// server is (a write behind a read on a replica): wait for that server
    /// to finish, then route it.
    Wait,
    /// The next unit is for other shards than the connection the client
    /// keeps for its session state: it runs beside it (`run_beside`).
    Beside,
}

/// Messages that must reach a server (when not answered by the proxy).
fn needs_server(tag: u8) -> bool {
    matches!(
        tag,
        frontend::QUERY
            | frontend::PARSE
            | frontend::BIND
            | frontend::DESCRIBE
            | frontend::EXECUTE
            | frontend::FUNCTION_CALL
    )
}

impl Session {
    /// Handles every complete client message, without waiting: when one needs
    /// a server connection that is not attached, stops before it and says so.
    pub(super) fn on_client_data(&mut self) -> Result<Flow, End> {
        loop {
            if self.inflow == Inflow::AfterSegment && !self.client_in.is_empty() {
                // Whether the rest of the unit is skipped (a failed Parse)
                // is known once the proxy's Sync is answered.
                return Ok(Flow::Wait);
            }
            if self.inflow == Inflow::CopyIn && self.server.is_some() {
                // COPY FROM STDIN's data goes to the server in runs, one
                // copy per run: it is forwarded with no bookkeeping.
                let run =
                    crate::protocol::run_of(&self.client_in, self.shared.max_message_size, |tag| {
                        tag == frontend::COPY_DATA
                    });
                if run > 0 {
                    let data = &self.client_in[..run];
                    self.rerun.record(data);
                    self.server_out.extend_from_slice(data);
                    self.unit.took(run);
                    bytes::Buf::advance(&mut self.client_in, run);
                    continue;
                }
            }
            // Read once: the steps below that fall through to handling
            // the message leave the buffer as it is.
            let header = match peek_header(&self.client_in, self.shared.max_message_size) {
                Ok(header) => header,
                Err(e) => return Err(violation(e.to_string())),
            };
            match header {
                Some((tag, len)) if needs_server(tag) && self.inflow != Inflow::SkipToSync => {
                    // The unit runs here before its end arrived.
                    let mut early = false;
                    if tag == frontend::BIND
                        && self.unit.unplaced()
                        && len <= self.client_in.len()
                        && self.shared.sharding.is_some()
                        && self.inflow == Inflow::Open
                        && !self.continues_here()?
                    {
                        continue;
                    }
                    if self.txn.failed() && !self.unit.is_open() {
                        // In a failed transaction, a unit is judged whole,
                        // and once the server owes nothing: a ROLLBACK the
                        // proxy answered at once ends the transaction only
                        // when the server has done it.
                        if !self.pending.is_empty() {
                            return Ok(Flow::Wait);
                        }
                        if !self.unit_arrived() {
                            return Ok(Flow::Done);
                        }
                    }
                    if self.spanning.spans() && !self.unit.is_open() {
                        match self.distributed_next()? {
                            Next::End(..) if !self.pending.is_empty() => return Ok(Flow::Wait),
                            Next::End(end) => return Ok(Flow::EndDistributed(end)),
                            Next::Refuse(e) => {
                                self.txn.fail();
                                self.fail_next_message(e)?;
                                continue;
                            }
                            Next::Other => {}
                        }
                    }
                    if self.server.is_none() {
                        return Ok(Flow::NeedServer);
                    }
                    if self.shared.sharding.is_some()
                        && self.mode() == PoolMode::Transaction
                        && !self.unit.is_open()
                        && !self.pending.is_empty()
                        && self.server.as_ref().is_some_and(|s| s.tx_status == b'I')
                        && matches!(
                            self.plan_unit().plan,
                            shardline_router::UnitPlan::DeferBegin
                        )
                    {
                        // A lone BEGIN while the connection finishes the
                        // proxy's own queries: it is deferred as always,
                        // once the connection is released.
                        return Ok(Flow::Wait);
                    }
                    if self.shared.sharding.is_some() && !self.unit.is_open() {
                        if self.txn.failed() && self.unit_ends_transaction()? {
                            self.end_refused_unit()?;
                            continue;
                        }
                        if self.txn.failed() {
                            if self.in_refused_transaction()? {
                                continue;
                            }
                        } else {
                            match self.fits_attached()? {
                                Fit::Yes => {}
                                Fit::Early => early = true,
                                Fit::Join => return Ok(Flow::NeedServer),
                                Fit::NotYet => return Ok(Flow::Done),
                                Fit::Wait => return Ok(Flow::Wait),
                                Fit::Refused => continue,
                                Fit::Fanout => return Ok(Flow::Fanout),
                                Fit::Beside => return Ok(Flow::Beside),
                            }
                        }
                    }
                    // A new unit behind one still in flight on a read server.
                    if self.purpose == Purpose::Read
                        && !self.unit.is_open()
                        && !self.pending.is_empty()
                        && !self.may_follow()
                    {
                        return Ok(Flow::Wait);
                    }
                    if !self.unit.is_open() && self.txn.has_begin() && self.plan_unit().executes {
                        if let Some(begin) = self.txn.take_begin() {
                            // The transaction's BEGIN, deferred until a
                            // statement runs: this unit runs here, so the
                            // BEGIN goes first (preparing starts nothing).
                            self.send_query_frame(&begin);
                            self.pending.push_back(Pending::swallow(Kind::Query {
                                effects: Default::default(),
                            }));
                        }
                    }
                    if early {
                        // What follows what it was placed by is placed as
                        // it comes (`continues_here`).
                        self.unit.early(self.unit_bytes());
                    }
                }
                _ => {}
            }
            match header {
                Some((tag, len)) if len <= self.client_in.len() && tag != frontend::PARSE => {
                    // Read where it lies: the handlers never read the
                    // client's buffer (it is empty to them meanwhile), so
                    // the message is handed to them as a slice of it and
                    // then dropped off its front, with no frame of its own.
                    let input = std::mem::take(&mut self.client_in);
                    let handled = self.on_client_message(tag, &input[..len], None);
                    debug_assert!(
                        self.client_in.is_empty(),
                        "a handler filled the client's buffer"
                    );
                    self.client_in = input;
                    bytes::Buf::advance(&mut self.client_in, len);
                    handled?;
                    continue;
                }
                _ => {}
            }
            // A Parse is split off as a frame: the unnamed statement's
            // definition is kept as a slice of it.
            let frame = match next_frame(&mut self.client_in, self.shared.max_message_size) {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(Flow::Done),
                Err(e) => return Err(violation(e.to_string())),
            };
            self.on_client_message(frame.tag, &frame.bytes, Some(&frame))?;
        }
    }

    /// The server connection for the next message could not be had: fail that
    /// message (and, for the extended protocol, the rest of its unit).
    pub(super) fn fail_next_message(&mut self, e: PgError) -> Result<(), End> {
        let frame = match next_frame(&mut self.client_in, self.shared.max_message_size) {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(()),
            Err(e) => return Err(violation(e.to_string())),
        };
        if frame.tag == frontend::QUERY {
            // Validate it as a server would before answering.
            frontend::query(frame.body())?;
        }
        let simple = matches!(frame.tag, frontend::QUERY | frontend::FUNCTION_CALL);
        self.fail_request(e, simple);
        Ok(())
    }

    /// Whether a unit placed `place` runs on the attached connection.
    fn runs_attached(&self, place: &shardline_router::shards::Placement) -> bool {
        use shardline_router::shards::Placement;
        match place {
            Placement::Anywhere | Placement::Spread => true,
            Placement::One(s) => Some(*s) == self.attached_shard(),
            _ => false,
        }
    }

    /// The name of the attached connection's shard.
    fn attached_shard_name(&self) -> Option<String> {
        let sh = self.shared.sharding.as_ref()?;
        sh.shard_names.get(self.attached_shard()?).cloned()
    }

    /// Bytes of the complete messages of the unit at the front of
    /// `client_in` (what its plan covers).
    fn unit_bytes(&self) -> usize {
        self.unit_messages().map(|(_, body)| 5 + body.len()).sum()
    }

    /// A Bind after the messages an early unit was placed by
    /// (`Unit::Early`: the client asked for results before its Sync), placed
    /// now with the messages buffered behind it. On the attached
    /// connection's shard it runs there (`true`). For another shard it
    /// cannot: the unit fails as a server's would, the client told why
    /// (0A000) and its messages skipped to its Sync, and the server's unit
    /// is made to fail too (`Kind::Abort`), so what ran of it is rolled
    /// back rather than committed by that Sync.
    fn continues_here(&mut self) -> Result<bool, End> {
        use shardline_router::shards::Placement;
        let planned = self.plan_unit();
        if self.runs_attached(&planned.place) {
            self.count_keys();
            self.unit.early(self.unit_bytes());
            return Ok(true);
        }
        let e = match planned.place {
            Placement::Refused(r) => self.shared.events.refusals.error(*r),
            _ => {
                let name = self.attached_shard_name().unwrap_or_default();
                self.shared.events.refusals.refuse(
                    Construct::Batch,
                    format!("this pipeline runs on shard {name} up to its Sync, as it was sent there before the Sync arrived (it asked for results with a Flush, or held more than 1 MiB), and this execution needs another shard; send a Sync before it"),
                )
            }
        };
        self.fail_next_message(e)?;
        frontend::write_execute(&mut self.server_out, ABORT_PORTAL, 0);
        self.pending.push_back(Pending::swallow(Kind::Abort));
        Ok(false)
    }

    /// Whether the unit at the front of `client_in` has arrived whole (a
    /// simple query or function call, or extended messages up to Sync), or
    /// must be acted on anyway (`must_act`: a Flush, or more than is held).
    fn unit_arrived(&self) -> bool {
        let mut tags = self.unit_messages().map(|(tag, _)| tag).peekable();
        tags.peek().is_some() && (tags.any(crate::protocol::ends_unit) || self.must_act())
    }

    /// Whether the unit at the front of the buffer may follow the one in
    /// flight on the attached read server: only another read. (Once that one
    /// is answered, the server is released, or kept for its transaction.)
    fn may_follow(&mut self) -> bool {
        matches!(
            self.plan_unit().plan,
            shardline_router::UnitPlan::Run {
                target: shardline_router::Target::Replica,
                ..
            }
        )
    }

    /// A query the proxy answers alone, taken before a connection is
    /// borrowed for it: `SET shardline.role|shard|sharding_key = ...` /
    /// `RESET ...` / `SHOW ...` (the proxy's settings), or a DEALLOCATE of
    /// the client's statements. Returns whether it was one.
    pub(super) fn take_local_answer(&mut self) -> Result<bool, End> {
        let Ok(Some((frontend::QUERY, len))) =
            peek_header(&self.client_in, self.shared.max_message_size)
        else {
            return Ok(false);
        };
        if self.client_in.len() < len {
            return Ok(false);
        }
        // The first word before the text is read whole (most are not one).
        let body = &self.client_in[5..len];
        if may_be_proxy_setting(body) {
            let Some(setting) = proxy_setting(frontend::query(body)?) else {
                return Ok(false);
            };
            let _ = next_frame(&mut self.client_in, usize::MAX);
            self.apply_proxy_setting(setting);
            return Ok(true);
        }
        // A DEALLOCATE of the client's statements, which live only here,
        // borrows nothing (a replica's read-your-writes wait, a shard
        // that is down): psycopg sends DEALLOCATE ALL after every failed
        // pipeline. Not in a failed transaction (the server refuses it
        // there) nor one on several shards (its own path).
        if !starts_with_word(body, b"deallocate") || self.txn.failed() || self.spanning.spans() {
            return Ok(false);
        }
        let effects = crate::protocol::text(frontend::query(body)?).and_then(effect::effects);
        let Some([Some(Effect::Deallocate(name))]) = effects.as_deref() else {
            return Ok(false);
        };
        let name = name.clone();
        if !self.deallocate_here(name.as_deref()) {
            return Ok(false);
        }
        let _ = next_frame(&mut self.client_in, usize::MAX);
        Ok(true)
    }

    /// Forgets the client's statement `name` (`None`: all of them) and
    /// answers the DEALLOCATE; false when it is not one of the client's
    /// (a server's to answer), and nothing is done.
    fn deallocate_here(&mut self, name: Option<&str>) -> bool {
        let tag = match name {
            None => {
                self.statements.clear();
                "DEALLOCATE ALL"
            }
            Some(n) if self.statements.remove(n.as_bytes()).is_some() => "DEALLOCATE",
            Some(_) => return false,
        };
        self.synthetic(Synthetic::CommandComplete(tag));
        self.synthetic(Synthetic::ReadyForQuery);
        true
    }

    /// Applies (or shows) a proxy setting of the session, answered here.
    fn apply_proxy_setting(&mut self, setting: ProxySetting) {
        use shardline_router::hint::SessionSetting;
        let ProxySetting::Alone(setting) = setting else {
            let e = PgError::error(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "SET, RESET and SHOW of shardline.role, shardline.shard and shardline.sharding_key must be sent alone, not with other statements in one query string",
            )
            .with_hint("send it as a query of its own");
            self.fail_request(e, true);
            return;
        };
        let set = match setting {
            SessionSetting::Role(role) => {
                self.session_role = role;
                role.is_some()
            }
            SessionSetting::Shard(shard) => {
                if let (Some(name), Some(sh)) = (&shard, &self.shared.sharding) {
                    if sh.shard_index(name).is_none() {
                        let e = PgError::error(
                            sqlstate::INVALID_PARAMETER_VALUE,
                            format!(
                                "no shard is named \"{name}\" (shards: {})",
                                sh.shard_names.join(", ")
                            ),
                        );
                        self.fail_request(e, true);
                        return;
                    }
                }
                let set = shard.is_some();
                self.session_shard = shard;
                set
            }
            SessionSetting::Key(key) => {
                let set = key.is_some();
                self.session_key = key;
                set
            }
            SessionSetting::Show(name) => {
                let value = match name {
                    "role" => self.session_role.map(|r| match r {
                        shardline_router::RoleHint::Primary => "primary".to_string(),
                        shardline_router::RoleHint::Replica => "replica".to_string(),
                    }),
                    "shard" => self.session_shard.clone(),
                    _ => self.session_key.clone(),
                };
                let mut rows = bytes::BytesMut::new();
                crate::protocol::backend::text_rows(
                    &mut rows,
                    &format!("shardline.{name}"),
                    &[value.as_deref().unwrap_or("auto")],
                );
                self.synthetic(Synthetic::Rows(rows.freeze()));
                self.synthetic(Synthetic::CommandComplete("SHOW"));
                self.synthetic(Synthetic::ReadyForQuery);
                return;
            }
        };
        let tag = if set { "SET" } else { "RESET" };
        self.synthetic(Synthetic::CommandComplete(tag));
        self.synthetic(Synthetic::ReadyForQuery);
    }

    /// With several shards, whether the unit at the front of `client_in`
    /// may run on the attached server's shard.
    fn fits_attached(&mut self) -> Result<Fit, End> {
        use shardline_router::shards::Placement;
        let planned = self.plan_unit();
        if !planned.complete && !self.must_act() {
            return Ok(Fit::NotYet);
        }
        let early = !planned.complete && planned.executes;
        // A session-pooled client keeps its connection (as does one whose
        // connection holds its session state): like a transaction.
        let session = self.keeps_connection();
        let in_txn = session
            || (self.server.as_ref().is_some_and(|s| s.tx_status != b'I')
                && self.pending.is_empty());
        if early && !session && !self.pending.is_empty() {
            // Acted on before its Sync while the connection still waits for
            // answers (the client's last unit, or the proxy's own query:
            // the read-your-writes position after a ROLLBACK): placed once
            // they are in, by the transaction's state then; between
            // transactions, on a connection released, as a pipeline that
            // may take other shards (`runs_as_pipeline`), not begun here.
            return Ok(Fit::Wait);
        }
        if self.runs_attached(&planned.place) {
            // The unit runs on the attached server.
            self.count_keys();
            return Ok(if early { Fit::Early } else { Fit::Yes });
        }
        if !self.pending.is_empty() {
            // Not known yet whether a transaction is open: decide once the
            // server has answered.
            return Ok(Fit::Wait);
        }
        if self.pinned.is_some()
            && self.mode() == PoolMode::Transaction
            && !self.txn.has_begin()
            && planned.complete
            && matches!(planned.plan, shardline_router::UnitPlan::Run { .. })
            && !matches!(planned.place, Placement::Refused(_))
            && self.server.as_ref().is_some_and(|s| s.tx_status == b'I')
        {
            // Kept for its session state, between transactions: the unit
            // runs on connections borrowed for it, as any client's would.
            return Ok(Fit::Beside);
        }
        if session && self.server.as_ref().is_some_and(|s| s.tx_status == b'I') {
            let name = self.attached_shard_name().unwrap_or_default();
            let e = match (&planned.place, self.pinned_refusal(&name)) {
                // Refused wherever it would run: its own reason.
                (Placement::Refused(r), _) => self.shared.events.refusals.error((**r).clone()),
                (_, Some(e)) => e,
                (_, None) => self.shared.events.refusals.refuse(
                    Construct::SessionPooling,
                    format!("this session is bound to shard {name} (session pooling), and the statement needs another shard"),
                )
                .with_hint("use transaction pooling for sharded tables, or SET shardline.shard before the first statement"),
            };
            self.fail_next_message(e)?;
            return Ok(Fit::Refused);
        }
        if !in_txn {
            return Ok(Fit::Wait);
        }
        if let Placement::One(s) = planned.place {
            if let Some(fit) = self.join_shard(s)? {
                return Ok(match fit {
                    Fit::Yes if early => Fit::Early,
                    fit => fit,
                });
            }
        }
        let several = matches!(
            planned.place,
            Placement::Many(_)
                | Placement::Merge(_)
                | Placement::Split(_)
                | Placement::CopySplit(_)
                | Placement::Pipeline(_)
        );
        if several && !session && self.may_join() {
            if self.server.as_ref().is_some_and(|s| s.tx_status == b'E') {
                self.fail_next_message(super::failed_transaction())?;
                return Ok(Fit::Refused);
            }
            return Ok(Fit::Fanout);
        }
        let e = match planned.place {
            Placement::Refused(r) => self.shared.events.refusals.error(*r),
            Placement::One(_) => {
                let name = self.attached_shard_name();
                match self.pinned_refusal(name.as_deref().unwrap_or_default()) {
                    Some(e) => e,
                    None => super::cross_shard_transaction(&self.shared, name.as_deref()),
                }
            }
            _ => super::cross_shard_transaction(&self.shared, None),
        };
        self.txn.fail();
        self.fail_next_message(e)?;
        Ok(Fit::Refused)
    }

    /// In a transaction failed by a refused statement: COMMIT becomes
    /// ROLLBACK, ROLLBACK (to a savepoint too) goes through, anything else
    /// gets 25P02 as Postgres answers in a failed transaction. Returns
    /// whether the message was handled here.
    fn in_refused_transaction(&mut self) -> Result<bool, End> {
        let Ok(Some((tag, len))) = peek_header(&self.client_in, self.shared.max_message_size)
        else {
            return Ok(false);
        };
        if tag == frontend::QUERY && self.client_in.len() >= len {
            let text =
                String::from_utf8_lossy(frontend::query(&self.client_in[5..len])?).into_owned();
            let words = shardline_router::lexer::leading_words(&text, 2);
            match words.first().map(String::as_str) {
                Some("rollback" | "abort") => {
                    // ROLLBACK TO SAVEPOINT recovers the transaction; a
                    // plain ROLLBACK ends it (and the release clears the flag).
                    if words.get(1).map(String::as_str) == Some("to") {
                        self.txn.recover();
                    }
                    return Ok(false);
                }
                Some("commit" | "end")
                    if shardline_router::lone_transaction_end(&text).is_some() =>
                {
                    let _ = next_frame(&mut self.client_in, usize::MAX);
                    self.send_own_query("ROLLBACK");
                    self.pending.push_back(Pending::forward(Kind::Query {
                        effects: Default::default(),
                    }));
                    return Ok(true);
                }
                _ => {}
            }
        }
        if !needs_server(tag) {
            return Ok(false);
        }
        self.fail_next_message(super::failed_transaction())?;
        Ok(true)
    }

    /// Handles one client message: `tag`, and its `bytes` with the header.
    /// `frame` is the message as a frame of its own, when it was split off
    /// the buffer (a Parse always is: the unnamed statement's definition is
    /// kept as a slice of it).
    fn on_client_message(
        &mut self,
        tag: u8,
        bytes: &[u8],
        frame: Option<&Frame>,
    ) -> Result<(), End> {
        self.unit.took(bytes.len());
        if self.inflow.drops(tag) {
            return Ok(());
        }
        self.rerun.record(bytes);
        if self.purpose == Purpose::Write
            && matches!(
                tag,
                frontend::QUERY | frontend::EXECUTE | frontend::FUNCTION_CALL
            )
        {
            self.wrote = true;
        }
        let body = &bytes[5..];
        match tag {
            frontend::QUERY => self.on_query(bytes),
            frontend::PARSE => match frame {
                Some(f) => self.on_parse(f),
                None => self.on_parse(&Frame {
                    tag,
                    bytes: bytes::Bytes::copy_from_slice(bytes),
                }),
            },
            frontend::BIND => self.on_bind(bytes),
            frontend::DESCRIBE => self.on_describe(bytes),
            frontend::EXECUTE => {
                let portal = frontend::execute_portal(body)?;
                let effect = if self.portal_effects.is_empty() {
                    None
                } else {
                    self.portal_effects.get(portal).cloned().map(Box::new)
                };
                self.unit.execute();
                self.server_out.extend_from_slice(bytes);
                self.pending
                    .push_back(Pending::forward(Kind::Execute { effect }));
                Ok(())
            }
            frontend::CLOSE => self.on_close(bytes),
            frontend::SYNC => {
                if !self.inflow.sync() {
                    // The server ignores Sync during COPY FROM STDIN; so do we.
                    self.server_out.extend_from_slice(bytes);
                    return Ok(());
                }
                let probe = self.position_query_at_sync();
                self.unit.close();
                if self.server.is_none() {
                    self.synthetic(Synthetic::ReadyForQuery);
                } else {
                    self.server_out.extend_from_slice(bytes);
                    self.pending.push_back(Pending::forward(Kind::Sync));
                    if let Some(probe) = probe {
                        self.queue_position_query(probe);
                    }
                }
                Ok(())
            }
            frontend::FLUSH if self.prepare_only_segment() => {
                // Parse/Describe answered now, the Binds to come: close the
                // server's unit here so the connection can be released and
                // the rest of the client's unit placed by its own keys.
                frontend::write_sync(&mut self.server_out);
                self.pending.push_back(Pending::swallow(Kind::Sync));
                self.unit.close();
                self.inflow = Inflow::AfterSegment;
                Ok(())
            }
            frontend::FLUSH => {
                // Only while the server owes answers: with none, it has
                // nothing to flush, and a Flush queued then may outlive
                // the connection it was meant for (taken by a transaction
                // on several shards ending) and keep the next one attached
                // (nothing answers it, so nothing releases it).
                if self.server.is_some() && super::pending::awaits_server(&self.pending) {
                    self.server_out.extend_from_slice(bytes);
                }
                Ok(())
            }
            frontend::FUNCTION_CALL => {
                if self.shared.caching {
                    // A function may write any table.
                    self.note_cache_use(&CacheUse::WritesAny);
                }
                self.server_out.extend_from_slice(bytes);
                self.pending.push_back(Pending::forward(Kind::FunctionCall));
                Ok(())
            }
            frontend::COPY_DATA | frontend::COPY_DONE | frontend::COPY_FAIL => {
                // Only meaningful during COPY FROM STDIN; a server ignores strays too.
                if self.server.is_some() {
                    self.server_out.extend_from_slice(bytes);
                    if tag != frontend::COPY_DATA
                        && !self.inflow.copy_ended()
                        && !self.pending.is_empty()
                    {
                        // Marks where the copy data ended for a CopyInResponse
                        // still on its way; with nothing pending, none can come.
                        self.pending.push_back(Pending::forward(Kind::CopyEnd));
                    }
                }
                Ok(())
            }
            frontend::TERMINATE => Err(End::ClientGone),
            tag => Err(violation(format!(
                "invalid frontend message type {}",
                tag as char
            ))),
        }
    }

    /// A Flush ends a part of the unit that only prepares statements
    /// (Parse, Describe, Close; nothing bound yet), when more than one node
    /// could run the rest (`splits_at_flush`): where the Binds run is not
    /// known yet. The part was planned as a unit of its own.
    fn prepare_only_segment(&self) -> bool {
        self.unit == super::unit::Unit::Preparing
            && self.inflow != Inflow::CopyIn
            && self.server.is_some()
            && self.splits_at_flush()
    }

    /// Under transaction pooling with several shards or replicas, a Flush
    /// after messages that only prepare ends the server's unit: the part
    /// before it runs on any node that has the schema (a driver preparing
    /// with Flush, as asyncpg does, is not stopped by the default shard's
    /// primary being down), the Binds where their keys and writes say.
    pub(super) fn splits_at_flush(&self) -> bool {
        self.shared.several_nodes && self.mode() == PoolMode::Transaction
    }

    /// Under transaction pooling, for a client kept on its connection by
    /// session state: the refusal of a statement for another shard than
    /// the kept connection's (`name`), naming what keeps it.
    fn pinned_refusal(&self, name: &str) -> Option<PgError> {
        let what = self
            .pinned
            .filter(|_| self.mode() == PoolMode::Transaction)?;
        Some(self.shared.events.refusals.refuse(
            Construct::SessionState,
            format!("this client keeps its connection to shard {name} because it holds {what} (pool.session_state = \"pin\"), and the statement needs another shard"),
        )
        .with_hint("run DISCARD ALL to give the connection back, or use protocol-level prepared statements, transaction-level locks and ON COMMIT DROP temporary tables, which pin nothing"))
    }

    /// Under transaction pooling, a statement that leaves state on the
    /// server connection (the route's `session_state`): by `pool.session_state`,
    /// the client keeps this connection until it leaves or runs DISCARD ALL
    /// (it is reset before anyone else gets it), or the statement is
    /// refused with 0A000 naming it.
    fn keep_session_state(&mut self, state: Option<&'static str>) -> Result<(), PgError> {
        if !self.may_keep_session_state() {
            return Ok(());
        }
        let Some(what) = state else {
            return Ok(());
        };
        match self.shared.session_state {
            shardline_config::SessionStatePolicy::Refuse => Err(self.shared.events.refusals.refuse(
                Construct::SessionState,
                format!(
                    "{what} would outlive the transaction on a server connection other clients share, and pool.session_state is \"refuse\""
                ),
            )
            .with_hint("use a transaction-level form (pg_advisory_xact_lock, CREATE TEMP ... ON COMMIT DROP inside a transaction, protocol-level prepared statements), set pool.session_state = \"pin\", or connect as a user with pool_mode = \"session\"")),
            shardline_config::SessionStatePolicy::Pin => {
                tracing::info!(user = %self.login.user.name, state = what, traceparent = self.unit_trace().as_deref(), "client keeps its server connection until it leaves");
                self.pinned = Some(what);
                Ok(())
            }
        }
    }

    /// Whether a statement's session state matters: under transaction
    /// pooling, to a client not yet pinned to its connection.
    fn may_keep_session_state(&self) -> bool {
        self.mode() == PoolMode::Transaction && self.pinned.is_none()
    }

    /// The WAL position query to send right behind this simple query,
    /// when the query commits this client's writes (read-your-writes `lsn`
    /// under transaction pooling, nothing else in flight): a COMMIT/END of
    /// a transaction that wrote, or one writing statement outside a
    /// transaction.
    fn position_query_with<'t>(
        &mut self,
        utf8: &mut impl FnMut() -> Option<&'t str>,
    ) -> Option<crate::PositionPending> {
        // The session's state first: reads and units with others in flight
        // never look at the text.
        let eligible = self.wrote && self.pending.is_empty() && self.position_may_go_along();
        let server = self.server.as_ref().filter(|_| eligible)?;
        // A text that is not UTF-8 commits nothing the proxy knows of.
        match ending(utf8().unwrap_or(""), server.tx_status) {
            Ends::Commits => self.position_guard_held(),
            Ends::Discards => {
                self.forget_discarded_writes();
                None
            }
            Ends::Nothing => None,
        }
    }

    /// At the client's Sync, before the unit closes: the guard of the
    /// commit whose position query goes right behind the Sync, when the
    /// unit's one execution commits (`Unit::Bound { commits }`, noted by
    /// `on_bind`) and no earlier unit is in flight: an extended-protocol
    /// COMMIT or autocommit write, as `position_query_with` for a query.
    fn position_query_at_sync(&mut self) -> Option<crate::PositionPending> {
        let ends = self.unit.ends();
        if !(self.wrote && ends != Ends::Nothing && self.position_may_follow()) {
            return None;
        }
        if ends == Ends::Discards {
            self.forget_discarded_writes();
            return None;
        }
        self.position_guard_held()
    }

    /// A unit that discards its transaction's writes (a lone ROLLBACK, a
    /// COMMIT of a failed transaction) with no earlier unit in flight:
    /// the writes noted since the last position query were all in that
    /// transaction (a commit's ReadyForQuery took the position, or a guard
    /// for it, `server.rs`), so no position is asked at its end. A guard
    /// taken earlier still needs its position: the writes stay noted.
    pub(super) fn forget_discarded_writes(&mut self) {
        if self.position_pending.is_none() {
            self.wrote = false;
        }
    }

    /// What the session's state allows of a position query sent along
    /// with a unit: transaction pooling, no connection kept, no BEGIN
    /// held.
    fn position_may_go_along(&self) -> bool {
        self.pinned.is_none() && !self.txn.has_begin() && self.mode() == PoolMode::Transaction
    }

    /// What the session's state allows of a position query sent right
    /// behind the unit being sent: as `position_may_go_along`, and no
    /// earlier unit in flight (after a BEGIN just sent for it, the
    /// connection's status says nothing of the transaction it runs in).
    fn position_may_follow(&self) -> bool {
        self.position_may_go_along() && !self.pending.iter().any(|p| p.is_sync_point())
    }

    /// The guard of the commit whose position query goes with its unit:
    /// one taken earlier for this session's writes, or a new one when the
    /// shard learns positions.
    fn position_guard_held(&mut self) -> Option<crate::PositionPending> {
        let guard = match self.position_pending.take() {
            Some(earlier) => earlier,
            None => self.position_guard()?,
        };
        self.wrote = false;
        Some(guard.held())
    }

    /// What a Bind of `route`'s statement, the unit's first, does to the
    /// transaction's writes (`Ends`):
    /// only looked at on a connection taken for writing, where the
    /// position of a commit may be learned.
    fn bind_ends(&self, route: Option<&shardline_router::Route>, definition: &[u8]) -> Ends {
        use shardline_router::classify::Class;
        if self.purpose != Purpose::Write || !self.unit.unbound() {
            return Ends::Nothing;
        }
        let (Some(route), Some(server)) = (route, self.server.as_ref()) else {
            return Ends::Nothing;
        };
        // Only the statements that may end a transaction are read, and
        // only where a commit's position is learned and may be asked at
        // the unit's Sync (`position_query_at_sync`): not the writes inside
        // a transaction (nor its first, sent behind the BEGIN the proxy
        // held, while the status still says idle), nor anything on a
        // shard without replicas.
        if !(matches!(
            (server.tx_status, route.class),
            (b'T' | b'E', Class::TransactionControl) | (b'I', Class::Write)
        ) && self.learns_positions(server.shard)
            && self.position_may_follow())
        {
            return Ends::Nothing;
        }
        crate::protocol::text(super::route::definition_query(definition))
            .map_or(Ends::Nothing, |text| ending(text, server.tx_status))
    }

    fn on_query(&mut self, bytes: &[u8]) -> Result<(), End> {
        let text = frontend::query(&bytes[5..])?;
        if let Some(setting) = proxy_setting(text) {
            // With a connection attached: a session-pooled client's is
            // chosen for good; in a transaction the setting applies to the
            // statements routed after it ends.
            let changes = matches!(setting, ProxySetting::Alone(ref s) if !matches!(s, shardline_router::hint::SessionSetting::Show(_)));
            if self.mode() == PoolMode::Session && changes {
                let e = self.shared.events.refusals.refuse(
                    Construct::SessionPooling,
                    "under session pooling the session's connection is chosen at its first statement: shardline.role, shardline.shard and shardline.sharding_key can be set only before it",
                )
                .with_hint("set them in the startup options (options=-c shardline.role=replica) or before the first statement");
                self.fail_request(e, true);
            } else {
                self.apply_proxy_setting(setting);
            }
            return Ok(());
        }
        // Routed once for the steps below that need it (a unit's plan
        // routed it already: found by content); a session that keeps its
        // connection routes nothing here. Effects are looked for only in
        // a text whose shape may have some (a text that is not UTF-8 has
        // none).
        // The text as a string, checked once for all the steps that read it.
        let mut checked: Option<Option<&str>> = None;
        let mut utf8 = || *checked.get_or_insert_with(|| crate::protocol::text(text));
        let route = (self.shared.caching || self.may_keep_session_state())
            .then(|| self.query_facts(text, &mut utf8));
        let effects = if route.as_ref().is_none_or(|r| r.effects) {
            utf8().and_then(effect::effects)
        } else {
            None
        };
        if let Some(effects) = &effects {
            if let [Some(Effect::Deallocate(name))] = effects.as_slice() {
                // Client statement names exist only in the proxy.
                if self.deallocate_here(name.as_deref()) {
                    return Ok(());
                }
            }
            let refusal = effects.iter().flatten().find_map(Effect::pooling_refusal);
            if self.refused_under_pooling(refusal, true) {
                return Ok(());
            }
        }
        if let Some(route) = &route {
            if let Err(e) = self.keep_session_state(route.session_state) {
                self.fail_request(e, true);
                return Ok(());
            }
            if route.effects && self.shared.sharding.is_some() {
                // A DECLARE is among the texts that may have effects.
                let route = self.route_text(text);
                self.note_cursor(&route);
            }
            if self.shared.caching {
                self.note_cache_use(route.cache.as_deref().unwrap_or(&CacheUse::None));
            }
        }
        let probe = self.position_query_with(&mut utf8);
        self.send_query_frame(bytes);
        let effects: VecDeque<_> = effects.map(Into::into).unwrap_or_default();
        self.pending
            .push_back(Pending::forward(Kind::Query { effects }));
        if let Some(probe) = probe {
            self.queue_position_query(probe);
        }
        Ok(())
    }

    /// Sends the position query right behind a unit that commits, answered
    /// with it: the client's ReadyForQuery waits for the position without
    /// a round trip of its own (see `server.rs::holds_reply`).
    fn queue_position_query(&mut self, probe: crate::PositionPending) {
        self.send_own_query(super::route::WAL_POSITION_SQL);
        self.pending
            .push_back(Pending::swallow(Kind::LsnProbe(probe)));
        self.pending
            .push_back(Pending::forward(Kind::Synthetic(Synthetic::ReadyForQuery)));
    }

    /// Under transaction pooling, fails the request a statement with
    /// session-wide effect (LISTEN, ...) came in: its `refusal`.
    fn refused_under_pooling(
        &mut self,
        refusal: Option<(&'static str, &'static str)>,
        simple: bool,
    ) -> bool {
        let (PoolMode::Transaction, Some((message, hint))) = (self.mode(), refusal) else {
            return false;
        };
        let e = self
            .shared
            .events
            .refusals
            .refuse(Construct::SessionState, message)
            .with_hint(hint);
        self.fail_request(e, simple);
        true
    }

    fn on_parse(&mut self, f: &Frame) -> Result<(), End> {
        let p = frontend::parse(f.body())?;
        let route = self.route_text(p.query);
        let effect = super::route::parse_effect(&route, p.query);
        let refusal = effect.as_ref().and_then(Effect::pooling_refusal);
        if self.refused_under_pooling(refusal, false) {
            // The same over the extended protocol.
            return Ok(());
        }
        if let Err(e) = self.keep_session_state(route.session_state) {
            self.fail_request(e, false);
            return Ok(());
        }
        if p.name.is_empty() {
            let token = self.remember_unnamed(f, p.definition.len(), effect, route);
            if let Some(server) = self.server.as_mut() {
                server.unnamed_token = token;
            }
            self.unit.prepare();
            self.server_out.extend_from_slice(&f.bytes);
            self.pending
                .push_back(Pending::forward(Kind::Parse { statement: None }));
            return Ok(());
        }
        if self.statements.contains_key(p.name) {
            let name = String::from_utf8_lossy(p.name);
            let e = PgError::error(
                "42P05",
                format!("prepared statement \"{name}\" already exists"),
            );
            self.fail_request(e, false);
            return Ok(());
        }
        // A re-run elsewhere forgets the name before preparing it again.
        self.rerun.prepares(p.name);
        let stmt = self.shared.statements.intern(p.definition, effect, route);
        let client_name: Box<[u8]> = p.name.into();
        self.statements.insert(client_name.clone(), stmt.clone());
        self.unit.prepare();
        let held = self
            .server
            .as_mut()
            .is_some_and(|s| s.statements.contains(stmt.id));
        if held {
            self.synthetic(Synthetic::ParseComplete);
        } else {
            self.prepare_on_server(&stmt, Answer::Forward, Some(client_name));
        }
        Ok(())
    }

    /// Sends a Parse for `stmt` under its server name, closing the least recently
    /// used statement if the connection holds too many.
    fn prepare_on_server(
        &mut self,
        stmt: &Arc<crate::server::statements::Statement>,
        answer: Answer,
        client_name: Option<Box<[u8]>>,
    ) {
        if let Some((mut to, out)) = self.attached() {
            rename::prepare(&mut to, out, stmt, answer, client_name.unwrap_or_default());
        }
    }

    /// The attached connection as the rename layer writes to it (what its
    /// messages owe going to the session's pending queue), and the bytes
    /// being written for it.
    fn attached(&mut self) -> Option<(Attached<'_>, &mut bytes::BytesMut)> {
        let server = self.server.as_mut()?;
        let to = Attached {
            conn: &mut server.conn,
            pending: &mut self.pending,
        };
        Some((to, &mut self.server_out))
    }

    /// Looks up a client statement name, raising the server's error if unknown.
    fn client_statement(
        &mut self,
        name: &[u8],
    ) -> Option<Arc<crate::server::statements::Statement>> {
        let found = self.statements.get(name).cloned();
        if found.is_none() {
            let name = String::from_utf8_lossy(name);
            let e = PgError::error(
                sqlstate::INVALID_SQL_STATEMENT_NAME,
                format!("prepared statement \"{name}\" does not exist"),
            );
            self.fail_request(e, false);
        }
        found
    }

    /// Makes sure the attached server holds `stmt`, preparing it there if not.
    fn ensure_prepared(&mut self, stmt: &Arc<crate::server::statements::Statement>) {
        if let Some((mut to, out)) = self.attached() {
            rename::ensure(&mut to, out, stmt);
        }
    }

    /// Makes sure the attached server's unnamed statement is this client's.
    fn ensure_unnamed(&mut self) {
        // (Fields borrowed apart: the definition is not copied.)
        let (Some(unnamed), Some(server)) = (&self.unnamed, self.server.as_mut()) else {
            return;
        };
        let mut to = Attached {
            conn: &mut server.conn,
            pending: &mut self.pending,
        };
        let out = &mut self.server_out;
        rename::ensure_unnamed(&mut to, out, unnamed.token, &unnamed.definition);
    }

    fn on_bind(&mut self, bytes: &[u8]) -> Result<(), End> {
        let b = frontend::bind(&bytes[5..])?;
        let stmt = if b.statement.is_empty() {
            None
        } else {
            match self.client_statement(b.statement) {
                Some(s) => Some(s),
                None => return Ok(()),
            }
        };
        let route = match &stmt {
            Some(s) => Some(&s.route),
            None => self.unnamed.as_ref().map(|u| &u.route),
        };
        let definition = match &stmt {
            Some(s) => &s.definition[..],
            None => self.unnamed.as_ref().map_or(&[][..], |u| &u.definition[..]),
        };
        self.unit.bind(self.bind_ends(route, definition));
        if let Some(route) = route.filter(|r| r.effects && r.shards.is_some()) {
            // A DECLARE is among the texts that may have effects.
            let route = route.clone();
            self.note_cursor(&route);
        }
        if self.shared.caching {
            let cache = match &stmt {
                Some(s) => s.route.cache.clone(),
                None => match &self.unnamed {
                    Some(u) => u.route.cache.clone(),
                    None => Some(std::sync::Arc::new(CacheUse::WritesAny)),
                },
            };
            if let Some(cache) = cache {
                self.note_cache_use(&cache);
            }
        }
        let effect = match &stmt {
            Some(s) => s.effect.clone(),
            None => self.unnamed.as_ref().and_then(|u| u.effect.clone()),
        };
        match effect {
            Some(e) => {
                self.portal_effects.insert(b.portal.into(), e);
            }
            None if !self.portal_effects.is_empty() => {
                self.portal_effects.remove(b.portal);
            }
            None => {}
        }
        match stmt {
            Some(stmt) => {
                self.ensure_prepared(&stmt);
                frontend::write_bind(&mut self.server_out, b.portal, &stmt.server_name, b.rest);
            }
            None => {
                self.ensure_unnamed();
                self.server_out.extend_from_slice(bytes);
            }
        }
        self.pending.push_back(Pending::forward(Kind::Bind));
        Ok(())
    }

    fn on_describe(&mut self, bytes: &[u8]) -> Result<(), End> {
        let (kind, name) = frontend::target(&bytes[5..], "Describe")?;
        let stmt = if kind == b'S' && !name.is_empty() {
            match self.client_statement(name) {
                Some(s) => Some(s),
                None => return Ok(()),
            }
        } else {
            None
        };
        self.unit.prepare();
        match (kind, stmt) {
            (_, Some(stmt)) => {
                self.ensure_prepared(&stmt);
                frontend::write_target(
                    &mut self.server_out,
                    frontend::DESCRIBE,
                    b'S',
                    &stmt.server_name,
                );
            }
            (b'S', None) => {
                self.ensure_unnamed();
                self.server_out.extend_from_slice(bytes);
            }
            _ => self.server_out.extend_from_slice(bytes),
        }
        let kind = if kind == b'S' {
            Kind::DescribeStatement(name.into())
        } else {
            Kind::DescribePortal
        };
        self.pending.push_back(Pending::forward(kind));
        Ok(())
    }

    fn on_close(&mut self, bytes: &[u8]) -> Result<(), End> {
        let (kind, name) = frontend::target(&bytes[5..], "Close")?;
        if kind == b'S' && !name.is_empty() {
            // The server keeps the statement for other clients; only this client's name goes.
            self.statements.remove(name);
            self.synthetic(Synthetic::CloseComplete);
            return Ok(());
        }
        if kind == b'P' {
            self.portal_effects.remove(name);
        }
        if self.server.is_none() {
            // Nothing of this client's lives on a server between transactions.
            self.synthetic(Synthetic::CloseComplete);
            return Ok(());
        }
        self.unit.prepare();
        self.server_out.extend_from_slice(bytes);
        self.pending.push_back(Pending::forward(Kind::Close));
        Ok(())
    }
}

/// The attached connection as the rename layer writes to it: what the
/// proxy's messages owe goes to the session's pending queue.
struct Attached<'a> {
    conn: &'a mut crate::server::ServerConnection,
    pending: &'a mut VecDeque<Pending>,
}

impl rename::Owes for Attached<'_> {
    fn held(&mut self) -> (&mut crate::server::statements::ServerStatements, &mut u64) {
        (&mut self.conn.statements, &mut self.conn.unnamed_token)
    }

    fn own(&mut self, _: &[u8], kind: Kind) {
        self.pending.push_back(Pending::swallow(kind));
    }

    fn prepares(
        &mut self,
        _: &[u8],
        stmt: &Arc<crate::server::statements::Statement>,
        answer: Answer,
        client_name: Box<[u8]>,
    ) {
        let statement = Some((stmt.clone(), client_name));
        self.pending.push_back(Pending {
            kind: Kind::Parse { statement },
            answer,
        });
    }
}

/// `SET [SESSION] shardline.<name> ...` or `RESET shardline.<name>` alone.
/// A cheap check first: most queries are not about it.
fn proxy_setting(text: &[u8]) -> Option<ProxySetting> {
    use shardline_router::hint::session_setting;
    if !may_be_proxy_setting(text) {
        return None;
    }
    let text = crate::protocol::text(text)?;
    let statements = shardline_router::lexer::split_statements(text);
    if statements.len() == 1 {
        return session_setting(text).map(ProxySetting::Alone);
    }
    // Among other statements it would reach the server, which takes any
    // dotted name, and change nothing here.
    statements
        .iter()
        .any(|s| session_setting(s).is_some())
        .then_some(ProxySetting::NotAlone)
}

/// A statement about the proxy's own settings (`shardline.*`).
#[derive(Debug)]
enum ProxySetting {
    /// Sent alone: applied (or shown) by the proxy.
    Alone(shardline_router::hint::SessionSetting),
    /// With other statements in one query string: refused.
    NotAlone,
}

/// Whether `text` (a Query's body will do: its first word comes before
/// the NUL) starts with SET, RESET or SHOW, compared in place: most texts
/// differ within the first word.
fn may_be_proxy_setting(text: &[u8]) -> bool {
    let Some(start) = text.iter().position(|b| !b.is_ascii_whitespace()) else {
        return false;
    };
    let rest = &text[start..];
    // Letter by letter: a SELECT is turned away at its third.
    let is = |i: usize, c: u8| rest.get(i).is_some_and(|b| b.to_ascii_lowercase() == c);
    let ends = |i: usize| rest.get(i).is_some_and(u8::is_ascii_whitespace);
    match rest.first().map(u8::to_ascii_lowercase) {
        Some(b's') if is(1, b'e') => is(2, b't') && ends(3),
        Some(b's') => is(1, b'h') && is(2, b'o') && is(3, b'w') && ends(4),
        Some(b'r') => {
            rest.get(..5)
                .is_some_and(|w| w.eq_ignore_ascii_case(b"reset"))
                && ends(5)
        }
        _ => false,
    }
}

/// Whether `text` starts with the word `word` (lower case), after
/// whitespace, compared in place.
fn starts_with_word(text: &[u8], word: &[u8]) -> bool {
    let Some(start) = text.iter().position(|b| !b.is_ascii_whitespace()) else {
        return false;
    };
    let rest = &text[start..];
    rest.get(..word.len())
        .is_some_and(|w| w.eq_ignore_ascii_case(word))
        && rest
            .get(word.len())
            .is_none_or(|b| !b.is_ascii_alphanumeric() && *b != b'_')
}

/// What running `text` on a connection whose transaction status is
/// `status` does to the transaction's writes: a COMMIT of an open
/// transaction, or one statement that runs in a transaction of its own,
/// commits; a lone ROLLBACK/ABORT, or a COMMIT of a failed transaction
/// (or of none), discards them.
fn ending(text: &str, status: u8) -> Ends {
    match shardline_router::lone_transaction_end(text) {
        Some("COMMIT") if status == b'T' => Ends::Commits,
        Some(_) => Ends::Discards,
        None if status == b'I' && effect::lone_autocommit_statement(text) => Ends::Commits,
        None => Ends::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::{ending, proxy_setting, starts_with_word, Ends, ProxySetting};

    #[test]
    fn a_commit_is_a_commit_of_an_open_transaction_or_one_autocommit_statement() {
        let commits = |text, status| ending(text, status) == Ends::Commits;
        assert!(commits("COMMIT", b'T'));
        assert!(commits("end", b'T'));
        assert!(!commits("COMMIT", b'I'), "nothing open: nothing committed");
        assert!(!commits("COMMIT", b'E'), "a failed transaction rolls back");
        assert!(!commits("ROLLBACK", b'T'));
        assert!(!commits("PREPARE TRANSACTION 'x'", b'T'));
        assert!(commits("INSERT INTO t VALUES ($1)", b'I'));
        assert!(commits("UPDATE t SET a = 1", b'I'));
        assert!(
            !commits("INSERT INTO t VALUES ($1)", b'T'),
            "inside a transaction a write commits nothing"
        );
        assert!(!commits("BEGIN", b'I'));
        assert!(!commits("SET a = 1", b'I'));
    }

    #[test]
    fn a_lone_rollback_or_a_failed_commit_discards_the_writes() {
        for (text, status) in [
            ("ROLLBACK", b'T'),
            ("abort", b'T'),
            ("ROLLBACK WORK;", b'E'),
            ("COMMIT", b'E'),
        ] {
            assert_eq!(ending(text, status), Ends::Discards, "{text}");
        }
        for (text, status) in [
            // Not a lone end: what the rest does is not read.
            ("ROLLBACK; INSERT INTO t VALUES (1)", b'T'),
            ("ROLLBACK TO SAVEPOINT a", b'T'),
            ("PREPARE TRANSACTION 'x'", b'T'),
            ("INSERT INTO t VALUES (1)", b'T'),
        ] {
            assert_eq!(ending(text, status), Ends::Nothing, "{text}");
        }
    }
    use shardline_router::hint::SessionSetting;

    #[test]
    fn proxy_settings_are_found_by_their_first_word_only() {
        assert!(matches!(
            proxy_setting(b"SET shardline.role = primary"),
            Some(ProxySetting::Alone(SessionSetting::Role(Some(_))))
        ));
        assert!(matches!(
            proxy_setting(b" \n reset\tshardline.shard"),
            Some(ProxySetting::Alone(SessionSetting::Shard(None)))
        ));
        assert!(matches!(
            proxy_setting(b"Show shardline.sharding_key"),
            Some(ProxySetting::Alone(SessionSetting::Show(_)))
        ));
        assert!(matches!(
            proxy_setting(b"SET shardline.role = primary;"),
            Some(ProxySetting::Alone(SessionSetting::Role(Some(_))))
        ));
        for text in [
            &b"SET shardline.role = primary; SELECT 1"[..],
            b"SET search_path = a; SET shardline.shard = s1;",
            b"SHOW shardline.shard; SHOW shardline.role",
        ] {
            assert!(
                matches!(proxy_setting(text), Some(ProxySetting::NotAlone)),
                "{text:?}"
            );
        }
        for text in [
            &b"SELECT shardline.role"[..],
            b"SET",
            b"SETshardline.role = primary",
            b"settings shardline.role",
            b"SET search_path = a",
            b"SET search_path = a; SELECT 1",
            b"",
            b"   ",
            b"\xff\xfe",
        ] {
            assert!(proxy_setting(text).is_none(), "{text:?}");
        }
    }

    /// The first-word test ahead of reading a Query's text: a Query body
    /// (text and its NUL) passes it as its text does.
    #[test]
    fn the_first_word_test_passes_set_reset_and_show_only() {
        use super::may_be_proxy_setting as may;
        for (text, expected) in [
            (&b"SET x"[..], true),
            (b"set\tx", true),
            (b"  Show x", true),
            (b"RESET x", true),
            (b"\nreset\nx", true),
            (b"SET shardline.role = primary\0", true),
            (b"SELECT 1\0", false),
            (b"SETX", false),
            (b"SET", false),
            (b"SET\0", false),
            (b"SE", false),
            (b"S", false),
            (b"SHOWx", false),
            (b"sho x", false),
            (b"reset", false),
            (b"resets x", false),
            (b"rest x", false),
            (b"", false),
            (b"  ", false),
            (b"\xff", false),
        ] {
            assert_eq!(may(text), expected, "{text:?}");
        }
    }

    #[test]
    fn a_first_word_ends_where_an_identifier_would() {
        for (text, expected) in [
            (&b"DEALLOCATE ALL\0"[..], true),
            (b"  deallocate prepare s1", true),
            (b"Deallocate\0", true),
            (b"deallocate;", true),
            (b"deallocate\tx", true),
            (b"deallocated x", false),
            (b"deallocate_x", false),
            (b"dealloc x", false),
            (b"/* c */ deallocate all", false),
            (b"", false),
        ] {
            assert_eq!(starts_with_word(text, b"deallocate"), expected, "{text:?}");
        }
    }
}
