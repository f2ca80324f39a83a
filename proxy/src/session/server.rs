//! Messages from the server: copied to the client unless the proxy asked the
//! question itself, with the bookkeeping that keeps the pending queue, the
//! session variables and the prepared statements true.

use super::pending::{skip_to_sync, Answer, Kind, Pending};
use super::unit::Inflow;
use super::{Completed, End, Session};
use crate::protocol::backend::{self, sqlstate, PgError};
use crate::protocol::peek_header;
use bytes::Buf;

/// The WAL position in the position query's DataRow (`body`): one text
/// column, the position as a decimal number (`WAL_POSITION_SQL`).
fn probe_position(body: &[u8]) -> Option<u64> {
    let mut r = crate::protocol::Reader::new(body);
    match (r.i16(), r.i32()) {
        (Some(1), Some(len)) if len > 0 => r.bytes(len as usize).and_then(decimal),
        _ => None,
    }
}

/// An unsigned decimal number of ASCII digits only (no sign or space),
/// read without a string check; `None` past `u64::MAX`. (After each commit
/// that read-your-writes follows.)
fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        let d = d.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(d))
    })
}

/// The command tags whose completion changes what the session keeps
/// (`Session::on_command_complete`): a COMMIT makes the transaction's
/// effects hold, a ROLLBACK drops them, DISCARD ALL and DEALLOCATE ALL
/// empty the server's prepared statements.
fn changes_session_state(tag: &[u8]) -> bool {
    matches!(
        tag,
        b"COMMIT" | b"ROLLBACK" | b"DISCARD ALL" | b"DEALLOCATE ALL"
    )
}

impl Session {
    pub(super) fn on_server_data(&mut self) -> Result<(), End> {
        // Answers change what a unit's plan reads (a failed Parse's
        // statement is forgotten, a session effect commits).
        self.forget_plan();
        let Some(server) = self.server.as_mut() else {
            return Ok(());
        };
        let mut buf = std::mem::take(&mut server.read_buf);
        let mut pos = 0;
        let result = loop {
            let (tag, len) = match peek_header(&buf[pos..], usize::MAX) {
                Ok(Some(h)) => h,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e.to_string()),
            };
            if buf.len() - pos < len {
                break Ok(());
            }
            if tag == backend::ROW_DESCRIPTION {
                if let Some(taken) = self.take_probe_reply(&buf[pos..]) {
                    pos += taken;
                    continue;
                }
            }
            if matches!(
                tag,
                backend::DATA_ROW | backend::COPY_DATA | backend::ROW_DESCRIPTION
            ) {
                if let Some(describes) = self.forwarded_front() {
                    // Rows, and a RowDescription that ends no entry (not
                    // a Describe's answer), go to the client in runs: one
                    // copy for the run and none of the per-message
                    // bookkeeping, which they never touch.
                    let joins = |t: u8| {
                        matches!(t, backend::DATA_ROW | backend::COPY_DATA)
                            || (t == backend::ROW_DESCRIPTION && !describes)
                    };
                    if joins(tag) {
                        let end = pos
                            + len
                            + crate::protocol::run_of(&buf[pos + len..], usize::MAX, joins);
                        self.client_out.extend_from_slice(&buf[pos..end]);
                        self.rerun.answered();
                        pos = end;
                        continue;
                    }
                }
            }
            let msg = &buf[pos..pos + len];
            pos += len;
            if let Some(ends) = self.answers_plainly(tag, &msg[5..]) {
                // An answer with nothing to keep: forwarded as the rows
                // before it were, ending its entry when it is the end.
                self.client_out.extend_from_slice(msg);
                self.rerun.answered();
                if ends {
                    self.pending.pop_front();
                    self.drain_synthetic();
                }
                continue;
            }
            if let Err(e) = self.on_server_message(tag, msg) {
                break Err(e);
            }
        };
        buf.advance(pos);
        if let Some(server) = self.server.as_mut() {
            server.read_buf = buf;
        }
        if let Err(message) = result {
            return self.server_desync(message);
        }
        if let Some(reason) = self.server_fatal.take() {
            // The server ends the connection after a FATAL; stop using it now so
            // the client's next request goes to a live connection.
            let rerun = self.on_server_lost(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                reason,
            ))?;
            // The event loop routes the re-queued read once nothing is pending.
            self.waiting |= rerun;
            return Ok(());
        }
        self.maybe_release();
        Ok(())
    }

    /// Whether the answer `tag` (`body`) needs none of `on_server_message`'s
    /// bookkeeping beyond forwarding it and, when it ends the front entry,
    /// popping that (`Some(true)`): the front entry is the client's
    /// (`Answer::Forward`), and the answer is
    /// - ParseComplete, BindComplete, CloseComplete, NoData,
    ///   PortalSuspended, or a Describe's RowDescription, ending its entry
    ///   (those `on_server_message` only pops);
    /// - a CommandComplete whose tag changes nothing the session keeps
    ///   (`changes_session_state`), under a simple query with no session
    ///   effects queued (`Some(false)`: the entry ends at ReadyForQuery) or
    ///   ending an Execute that has none.
    ///
    /// Errors, ReadyForQuery, ParameterDescription and the COPY answers
    /// always take the per-message step. An extended unit's answers then
    /// take one such step in all, its ReadyForQuery's.
    #[inline]
    fn answers_plainly(&mut self, tag: u8, body: &[u8]) -> Option<bool> {
        use backend::*;
        if !matches!(
            tag,
            COMMAND_COMPLETE
                | PARSE_COMPLETE
                | BIND_COMPLETE
                | CLOSE_COMPLETE
                | NO_DATA
                | PORTAL_SUSPENDED
                | ROW_DESCRIPTION
        ) {
            return None;
        }
        self.drain_synthetic();
        let front = self
            .pending
            .front()
            .filter(|p| p.answer == Answer::Forward)?;
        if tag != COMMAND_COMPLETE {
            return front.ends_with(tag).then_some(true);
        }
        if changes_session_state(command_tag(body)) {
            return None;
        }
        self.completed = Completed::Other;
        match &front.kind {
            Kind::Query { effects } if effects.is_empty() => Some(false),
            Kind::Execute { effect: None } => Some(true),
            _ => None,
        }
    }

    /// Whether the server's rows go to the client as they are, in a run:
    /// the front entry (once the proxy's own answers ahead of it are out)
    /// is a question of the client's (the proxy's own, the read-your-writes
    /// position query among them, are swallowed). `Some(true)` when a
    /// RowDescription ends that entry (a Describe).
    #[inline]
    fn forwarded_front(&mut self) -> Option<bool> {
        self.drain_synthetic();
        let front = self
            .pending
            .front()
            .filter(|p| p.answer == Answer::Forward)?;
        Some(front.ends_with(backend::ROW_DESCRIPTION))
    }

    pub(super) fn on_server_message(&mut self, tag: u8, msg: &[u8]) -> Result<(), String> {
        use backend::*;
        if matches!(tag, NOTICE_RESPONSE | NOTIFICATION) {
            if tag == NOTICE_RESPONSE && self.note_farewell(&msg[5..]) {
                return Ok(());
            }
            self.client_out.extend_from_slice(msg);
            self.rerun.answered();
            return Ok(());
        }
        if tag == PARAMETER_STATUS {
            // Reports caused by the proxy's replay of the client's settings
            // reach the client too: they carry the server's own spelling of
            // the values (`SQL, DMY` for `SQL,DMY`), and the replay ends in
            // the client's settings, so the last report is the true one.
            self.client_out.extend_from_slice(msg);
            return Ok(());
        }
        self.drain_synthetic();
        if matches!(self.pending.front(), Some(p) if matches!(p.kind, Kind::LsnProbe(_))) {
            return self.on_lsn_probe(tag, msg);
        }
        if self.pending.is_empty() {
            if tag == ERROR_RESPONSE {
                // A FATAL sent before the server closes (shutdown,
                // pg_terminate_backend, timeouts) with nothing asked of it.
                let fatal = self.note_fatal(&msg[5..]);
                if !(fatal && self.client_session_survives() && !self.keeps_connection()) {
                    // The client's transaction or session ends with the
                    // connection: it hears why, as from the server.
                    self.client_out.extend_from_slice(msg);
                }
                // Else only the connection ends: the client, idle or
                // between answers, goes on with its next unit elsewhere.
                return Ok(());
            }
            return Err(format!("unexpected message '{}' from server", tag as char));
        }
        if tag == ERROR_RESPONSE && self.rerun.sent.is_some() && self.note_fatal(&msg[5..]) {
            // The node is going away before answering: the read runs elsewhere.
            return Ok(());
        }
        if tag == PARAMETER_DESCRIPTION {
            if let Some(Pending {
                kind: Kind::DescribeStatement(name),
                ..
            }) = self.pending.front()
            {
                if let Some(definition) = self.bound_definition(&name.clone()) {
                    // Bounded: a client preparing ever new texts starts over.
                    if self.described.len() >= 256 {
                        self.described.clear();
                    }
                    self.described
                        .insert(definition, parameter_types(&msg[5..]));
                }
            }
        }
        let survives = tag == ERROR_RESPONSE && self.client_session_survives();
        if tag == READY_FOR_QUERY {
            self.forget_rolled_back_writes(&msg[5..]);
        }
        let hold = tag == READY_FOR_QUERY && self.holds_reply(&msg[5..]);
        let client_status = match msg.get(5) {
            Some(&status) if tag == READY_FOR_QUERY => Some(self.txn.client_status(status)),
            _ => None,
        };
        let Some(front) = self.pending.front_mut() else {
            return Err("no pending request".into());
        };
        if (front.answer == Answer::Forward && !hold)
            || (tag == ERROR_RESPONSE && !matches!(front.kind, Kind::Abort))
        {
            let start = self.client_out.len();
            self.client_out.extend_from_slice(msg);
            if let Some(status) = client_status {
                // A statement prepared while the client's BEGIN waits, or a
                // transaction the proxy failed: `client_status`.
                if let Some(last) = self.client_out.last_mut() {
                    *last = status;
                }
            }
            if survives {
                // The server's connection ends, not the client's session: a
                // FATAL would make the client hang up.
                downgrade_fatal(&mut self.client_out[start..]);
            }
            // An answer reached the client: the unit can no longer be re-run elsewhere.
            self.rerun.answered();
        }
        let body = &msg[5..];
        match tag {
            ERROR_RESPONSE => {
                self.unit_failed = true;
                // (`note_fatal` would borrow the session `front` holds.)
                if let Some(reason) = fatal_reason(body) {
                    self.server_fatal = Some(reason);
                }
                // An error ends COPY FROM STDIN mode on the server.
                self.inflow.copy_ended();
                if let Kind::Query { effects } = &mut front.kind {
                    effects.clear();
                }
                if front.ends_with_error() {
                    let mut undone: Vec<Pending> = self.pending.pop_front().into_iter().collect();
                    undone.extend(skip_to_sync(&mut self.pending));
                    for p in undone {
                        self.forget_failed(p);
                    }
                    if self.pending.is_empty() && self.unit.is_open() {
                        // The client's Sync is still to come (answers were
                        // read at a Flush): the server skips everything
                        // up to it, and so does the proxy, sending none of
                        // it (nothing it sent would be answered).
                        self.inflow = Inflow::SkipToSync;
                    }
                }
            }
            COMMAND_COMPLETE | EMPTY_QUERY => {
                let effect = match &mut front.kind {
                    Kind::Query { effects } => effects.pop_front().flatten(),
                    Kind::Execute { effect } => effect.take().map(|e| *e),
                    _ => None,
                };
                if tag == COMMAND_COMPLETE {
                    self.on_command_complete(command_tag(body), effect);
                }
                self.pop_if_ended(tag);
            }
            COPY_IN_RESPONSE => {
                let extended = matches!(front.kind, Kind::Execute { .. });
                let ended = super::pending::enter_copy_in(&mut self.pending);
                if !ended {
                    self.inflow = Inflow::CopyIn;
                    if extended {
                        // The unit (its Execute runs the COPY) now ends at
                        // the Sync the client sends after CopyDone.
                        self.unit.execute();
                    }
                }
            }
            READY_FOR_QUERY => {
                // A unit's answer is complete: it no longer runs elsewhere.
                self.rerun.settled();
                let status = *body.first().ok_or("empty ReadyForQuery")?;
                if let Some(server) = self.server.as_mut() {
                    server.tx_status = status;
                }
                if matches!(front.kind, Kind::Sync) && front.answer == Answer::Swallow {
                    // The proxy's Sync after a Parse that failed: the client
                    // is still in its unit, whose rest a server would skip.
                    self.inflow.segment_answered(self.unit_failed);
                }
                if status == b'I'
                    && self.wrote
                    && front.answer == Answer::Forward
                    && self.position_pending.is_none()
                    && !hold
                {
                    // A commit whose reply the client is about to get: until
                    // its position is known, the user's reads go to the
                    // primary. (Not the end of the proxy's own query ahead
                    // of the client's unit, e.g. a replayed SET: the
                    // client's writes have not run yet.)
                    self.position_pending = self.position_guard();
                }
                if status == b'I' && !self.txn.has_begin() {
                    // The failed transaction is over (the connection may
                    // still be busy with the proxy's own queries).
                    self.txn.recover();
                }
                self.on_ready(status);
                self.pop_if_ended(tag);
                if hold
                    && !matches!(self.pending.front(), Some(p) if matches!(p.kind, Kind::LsnProbe(_)))
                {
                    self.hold_reply();
                }
            }
            _ => self.pop_if_ended(tag),
        }
        self.drain_synthetic();
        Ok(())
    }

    /// Whether the ReadyForQuery (`body`) ending the client's last unit
    /// waits for the commit's WAL position (read-your-writes `lsn`, under
    /// transaction pooling): the position query goes out right away, and
    /// the client gets its ReadyForQuery with the answer. Until then the
    /// commit is not done for the client, so a primary lost meanwhile
    /// leaves no write whose position is unknown: a read on another
    /// connection can always be served by a replica that replayed past the
    /// user's writes. A client that sent more units behind this one gets
    /// its reply at once (the position query follows them).
    fn holds_reply(&self, body: &[u8]) -> bool {
        if self.pending.len() >= 2
            && matches!(self.pending.get(1), Some(p) if matches!(p.kind, Kind::LsnProbe(_)))
            && self
                .pending
                .front()
                .is_some_and(|p| p.answer == Answer::Forward && p.is_sync_point())
        {
            // The position query went with the unit (`client.rs::
            // position_query_with`); the reply is queued behind it.
            return true;
        }
        body.first() == Some(&b'I')
            && self.wrote
            && !self.txn.has_begin()
            && self.pending.len() == 1
            && self.pending.front().is_some_and(|p| {
                p.answer == Answer::Forward && matches!(p.kind, Kind::Sync | Kind::Query { .. })
            })
            && self.mode() == shardline_config::PoolMode::Transaction
            && self.learns_positions_here()
    }

    /// At the ReadyForQuery (`body`) of a unit whose one completion was
    /// ROLLBACK (a lone ROLLBACK, or a COMMIT the server turned into one
    /// because the transaction had failed): when no other unit of the
    /// client's is in flight, the writes noted are those rolled back (every
    /// earlier unit is answered, and a commit among them took a position
    /// guard, which keeps them noted), so no position is asked for them.
    /// Only where commits take that guard (`learns_positions`): elsewhere
    /// a commit pipelined ahead of the ROLLBACK is noted by `wrote` alone
    /// until the connection is released (`primary_window`).
    /// Decided here, on the server's word, and not when the unit was sent:
    /// a client that sends its COMMIT before the failed statement's
    /// ReadyForQuery is read sends it while the transaction still looks
    /// open (`client.rs::position_query_with` only sees an idle session).
    fn forget_rolled_back_writes(&mut self, body: &[u8]) {
        let completed = std::mem::replace(&mut self.completed, Completed::Nothing);
        if completed == Completed::Rollback
            && body.first() == Some(&b'I')
            && self.pending.len() == 1
            && self.learns_positions_here()
            && self
                .pending
                .front()
                .is_some_and(|p| p.answer == Answer::Forward && p.is_sync_point())
        {
            self.forget_discarded_writes();
        }
    }

    /// Sends the position query for the commit just answered, with the
    /// client's ReadyForQuery queued behind its answer.
    fn hold_reply(&mut self) {
        self.wrote = false;
        let Some(probe) = self
            .position_pending
            .take()
            .or_else(|| self.position_guard().map(crate::PositionPending::held))
        else {
            // No position to learn: the reply goes out as it is.
            self.synthetic(super::Synthetic::ReadyForQuery);
            return;
        };
        self.send_own_query(super::route::WAL_POSITION_SQL);
        self.pending
            .push_back(Pending::swallow(Kind::LsnProbe(probe)));
        self.pending.push_back(Pending::forward(Kind::Synthetic(
            super::Synthetic::ReadyForQuery,
        )));
    }

    /// Whether an ErrorResponse (`body`) is FATAL or PANIC: the server
    /// closes the connection after it, which is then given up
    /// (`server_fatal`, with the reason).
    fn note_fatal(&mut self, body: &[u8]) -> bool {
        let reason = fatal_reason(body);
        let fatal = reason.is_some();
        if fatal {
            self.server_fatal = reason;
        }
        fatal
    }

    /// A notice saying the server closes the connection now: an immediate
    /// shutdown or a crash of another backend warns (57P01, 57P02) and
    /// exits, often before the socket's unread bytes are taken, so the
    /// close comes as a reset. The connection is dropped after this read,
    /// as after a FATAL. Returns true when the notice is not for the
    /// client: the unit runs elsewhere (nothing of it was answered), or
    /// the client is idle and its session outlives the connection.
    fn note_farewell(&mut self, body: &[u8]) -> bool {
        let Some(reason) = backend::farewell_reason(body) else {
            return false;
        };
        self.server_fatal = Some(reason);
        self.rerun.possible()
            || (self.pending.is_empty()
                && self.client_session_survives()
                && !self.keeps_connection())
    }

    /// Whether losing the server now leaves the client's session intact
    /// (no transaction lost, transaction pooling).
    fn client_session_survives(&self) -> bool {
        self.mode() == shardline_config::PoolMode::Transaction
            && self.server.as_ref().is_some_and(|s| s.tx_status == b'I')
    }

    /// The whole answer to the read-your-writes position query at the
    /// front of `buf` (RowDescription, one DataRow, CommandComplete,
    /// ReadyForQuery), taken in one step when the probe is the front
    /// entry and all four messages are here: settles the probe, ends its
    /// entry and returns the bytes taken. Anything else (an error, a
    /// partial answer, another front entry) is left to the per-message
    /// step, `on_lsn_probe`.
    fn take_probe_reply(&mut self, buf: &[u8]) -> Option<usize> {
        use backend::*;
        let Some(Pending {
            kind: Kind::LsnProbe(probe),
            ..
        }) = self.pending.front_mut()
        else {
            return None;
        };
        let mut pos = 0;
        let (mut lsn, mut status) = (0, 0);
        for expected in [ROW_DESCRIPTION, DATA_ROW, COMMAND_COMPLETE, READY_FOR_QUERY] {
            let (tag, len) = peek_header(&buf[pos..], usize::MAX).ok()??;
            if tag != expected || buf.len() - pos < len {
                return None;
            }
            let body = &buf[pos + 5..pos + len];
            match tag {
                DATA_ROW => lsn = probe_position(body)?,
                READY_FOR_QUERY => status = *body.first()?,
                _ => {}
            }
            pos += len;
        }
        probe.settle(lsn);
        self.probe_ended(status);
        Some(pos)
    }

    /// The position query's ReadyForQuery (`status`): its entry ends.
    fn probe_ended(&mut self, status: u8) {
        if let Some(server) = self.server.as_mut() {
            server.tx_status = status;
        }
        self.pending.pop_front();
        // Answers the proxy gave while the query ran come next.
        self.drain_synthetic();
    }

    /// The answer to the read-your-writes position query: hidden from the client.
    fn on_lsn_probe(&mut self, tag: u8, msg: &[u8]) -> Result<(), String> {
        use backend::*;
        let body = &msg[5..];
        match tag {
            DATA_ROW => {
                if let (Some(lsn), Some(Kind::LsnProbe(probe))) = (
                    probe_position(body),
                    self.pending.front_mut().map(|p| &mut p.kind),
                ) {
                    probe.settle(lsn);
                }
            }
            ERROR_RESPONSE => {
                // Not a primary any more (or an odd server): the probe ends
                // unsettled, and reads go to the primary until the checker
                // has seen the cluster again.
                let fields = backend::parse_error_fields(body);
                tracing::debug!(code = %fields.code, message = %fields.message, "WAL position query failed");
                if self.note_fatal(body) {
                    // The connection ends (a primary stopping): a held
                    // reply becomes the connection's error, never a
                    // confirmation, so it leaves nothing behind.
                } else if let Some(Kind::LsnProbe(probe)) =
                    self.pending.front_mut().map(|p| &mut p.kind)
                {
                    // The held reply goes out with its position unknown.
                    probe.released_unknown();
                }
            }
            READY_FOR_QUERY => {
                // A unit's answer is complete: it no longer runs elsewhere.
                self.rerun.settled();
                let status = *body.first().ok_or("empty ReadyForQuery")?;
                self.probe_ended(status);
            }
            _ => {}
        }
        Ok(())
    }

    fn pop_if_ended(&mut self, tag: u8) {
        if self.pending.front().is_some_and(|p| p.ends_with(tag)) {
            self.pending.pop_front();
        }
    }

    /// A Parse the server did not carry out: its statement does not exist there.
    fn forget_failed(&mut self, p: Pending) {
        if let Kind::Parse {
            statement: Some((stmt, client_name)),
        } = p.kind
        {
            if let Some(server) = self.server.as_mut() {
                server.statements.remove(stmt.id);
            }
            if !client_name.is_empty()
                && self
                    .statements
                    .get(&client_name)
                    .is_some_and(|s| s.id == stmt.id)
            {
                self.statements.remove(&client_name);
            }
        }
    }

    fn on_command_complete(
        &mut self,
        tag: &[u8],
        effect: Option<shardline_router::effect::Effect>,
    ) {
        // (The tags matched below are those `changes_session_state`
        // names: a completion without one may skip this, `answers_plainly`.)
        self.completed = self.completed.then(tag == b"ROLLBACK");
        match tag {
            _ if !changes_session_state(tag) => {}
            b"COMMIT" => {
                for e in std::mem::take(&mut self.txn_effects) {
                    self.commit_effect(&e);
                }
            }
            b"ROLLBACK" => self.txn_effects.clear(),
            b"DISCARD ALL" | b"DEALLOCATE ALL" => {
                if tag == b"DISCARD ALL" {
                    // The client's session state is gone with it.
                    self.pinned = None;
                }
                // The server dropped every prepared statement it had.
                if let Some(server) = self.server.as_mut() {
                    server.statements.clear();
                    server.unnamed_token = 0;
                }
            }
            _ => {}
        }
        if let Some(e) = effect {
            self.txn_effects.push(e);
        }
    }

    /// End of a unit: effects of a committed implicit transaction take hold; an
    /// implicit transaction that failed took them with it.
    fn on_ready(&mut self, status: u8) {
        if status == b'I' {
            if self.unit_failed {
                self.txn_effects.clear();
            }
            for e in std::mem::take(&mut self.txn_effects) {
                self.commit_effect(&e);
            }
        }
        self.unit_failed = false;
    }

    /// The server said something that does not fit the protocol: its state is
    /// unknown, so it is discarded and the client told.
    fn server_desync(&mut self, message: String) -> Result<(), End> {
        let addr = self
            .server
            .as_ref()
            .map(|s| s.addr.to_string())
            .unwrap_or_default();
        if let Some(server) = self.server.as_mut() {
            server.broken = true;
        }
        self.release_server();
        tracing::error!(server = %addr, %message, "protocol desynchronisation; connection discarded");
        Err(End::Fatal(PgError::fatal(
            sqlstate::PROTOCOL_VIOLATION,
            format!(
                "server {addr} sent an unexpected message ({message}); the connection was closed"
            ),
        )))
    }
}

/// The type OIDs of a ParameterDescription body (count, then OIDs).
fn parameter_types(body: &[u8]) -> Vec<u32> {
    let mut r = crate::protocol::Reader::new(body);
    let n = r.i16().unwrap_or(0).max(0);
    (0..n).map_while(|_| r.i32().map(|t| t as u32)).collect()
}

/// For a FATAL or PANIC ErrorResponse (`body`): its code and message.
fn fatal_reason(body: &[u8]) -> Option<String> {
    let fields = backend::parse_error_fields(body);
    (fields.severity == "FATAL" || fields.severity == "PANIC")
        .then(|| format!("{} {}", fields.code, fields.message))
}

/// Rewrites an ErrorResponse's FATAL or PANIC severity to ERROR, in place
/// (the words have the same length).
fn downgrade_fatal(msg: &mut [u8]) {
    let mut i = 5;
    while i < msg.len() && msg[i] != 0 {
        let field = msg[i];
        let start = i + 1;
        let end = msg[start..]
            .iter()
            .position(|&b| b == 0)
            .map_or(msg.len(), |p| start + p);
        if matches!(field, b'S' | b'V') && matches!(&msg[start..end], b"FATAL" | b"PANIC") {
            msg[start..end].copy_from_slice(b"ERROR");
        }
        i = end + 1;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_unit_whose_one_completion_is_rollback_rolled_back() {
        use super::Completed;
        let after =
            |rollbacks: &[bool]| rollbacks.iter().fold(Completed::Nothing, |c, &r| c.then(r));
        assert_eq!(after(&[]), Completed::Nothing);
        assert_eq!(after(&[true]), Completed::Rollback);
        // `INSERT; ROLLBACK`, `ROLLBACK; INSERT`, `COMMIT; ... ROLLBACK`:
        // what else ran is not known to be undone.
        assert_eq!(after(&[false, true]), Completed::Other);
        assert_eq!(after(&[true, false]), Completed::Other);
        assert_eq!(after(&[true, true]), Completed::Other);
    }

    #[test]
    fn the_position_is_read_from_one_text_column() {
        let row = |value: Option<&[u8]>| {
            let mut body = 1i16.to_be_bytes().to_vec();
            match value {
                Some(v) => {
                    body.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    body.extend_from_slice(v);
                }
                None => body.extend_from_slice(&(-1i32).to_be_bytes()),
            }
            body
        };
        assert_eq!(
            super::probe_position(&row(Some(b"50331816"))),
            Some(50331816)
        );
        assert_eq!(super::probe_position(&row(None)), None, "NULL: no position");
        assert_eq!(super::probe_position(&row(Some(b"0/3000"))), None);
        assert_eq!(
            super::probe_position(&row(Some(b"5033"))[..8]),
            None,
            "cut short"
        );
        assert_eq!(super::probe_position(&[0, 2]), None, "two columns");
        assert_eq!(super::probe_position(&row(Some(b""))), None, "empty");
        assert_eq!(super::probe_position(&row(Some(b"-5"))), None);
        assert_eq!(super::probe_position(&row(Some(b" 5"))), None);
        assert_eq!(super::probe_position(&row(Some(b"5:"))), None);
        let max = u64::MAX.to_string();
        assert_eq!(
            super::probe_position(&row(Some(max.as_bytes()))),
            Some(u64::MAX)
        );
        assert_eq!(
            super::probe_position(&row(Some(b"18446744073709551616"))),
            None,
            "past u64"
        );
    }

    #[test]
    fn fatal_becomes_error() {
        let mut buf = bytes::BytesMut::new();
        crate::protocol::backend::PgError::fatal("57P01", "terminating connection")
            .encode(&mut buf);
        super::downgrade_fatal(&mut buf);
        let fields = crate::protocol::backend::parse_error_fields(&buf[5..]);
        assert_eq!(
            (fields.severity.as_str(), fields.code.as_str()),
            ("ERROR", "57P01")
        );
        assert_eq!(fields.message, "terminating connection");
    }
}
