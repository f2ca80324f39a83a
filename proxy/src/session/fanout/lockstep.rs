//! The shards' answers merged in lockstep: every message other than a
//! row is a step all shards take together; rows stream through as each
//! shard sends them. Then the proxy's own BEGIN is ended and the writes'
//! positions are remembered.

use crate::pool::PooledConnection;
use crate::protocol::backend::{self, PgError};
use crate::protocol::frontend;
use crate::session::leg::{drain_after, Leg};
use crate::session::{Session, FLUSH_AT};
use bytes::BytesMut;

/// How far a merge went.
pub(super) enum Merged {
    /// The unit ended; whether it failed.
    Done(bool),
    /// Every shard is in COPY FROM STDIN mode.
    CopyIn,
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

/// The row limit of each Execute of a unit, in order (asyncpg's `fetchrow`
/// and `fetchval` ask for 1): the client gets at most that many of the
/// shards' rows together, then PortalSuspended, as one server answers.
/// Empty when no Execute has one.
#[derive(Default)]
pub(super) struct RowLimits {
    limits: Vec<u64>,
    next: usize,
}

impl RowLimits {
    pub(super) fn of(frames: &[crate::protocol::Frame]) -> RowLimits {
        let limits: Vec<u64> = frames
            .iter()
            .filter(|f| f.tag == frontend::EXECUTE)
            .map(|f| frontend::execute(f.body()).map_or(0, |(_, n)| n.max(0) as u64))
            .collect();
        RowLimits {
            limits: if limits.iter().any(|&n| n > 0) {
                limits
            } else {
                Vec::new()
            },
            next: 0,
        }
    }

    /// The limit of the Execute being answered, if it has one.
    fn current(&self) -> Option<u64> {
        self.limits.get(self.next).copied().filter(|&n| n > 0)
    }

    /// A step ended with `end`: an Execute's answer moves to the next one.
    fn ended(&mut self, end: u8) {
        if matches!(
            end,
            backend::COMMAND_COMPLETE | backend::PORTAL_SUSPENDED | backend::EMPTY_QUERY
        ) {
            self.next += 1;
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
    /// Merges the shards' answers to one unit: up to its end (whether it
    /// failed), or up to COPY FROM STDIN starting on every shard. With
    /// `row_order` (a split INSERT: the leg of each of its rows), rows
    /// (RETURNING) come back in the order of the INSERT's rows, as one
    /// server returns them, when every row returned one. A `replicated`
    /// write (reference tables only) is answered as one server would: the
    /// first shard's rows and tag, once every shard's tag agrees; shards
    /// that disagree fail the statement.
    pub(super) async fn merge(
        &mut self,
        legs: &mut [Leg],
        row_order: Option<&[usize]>,
        replicated: bool,
        limits: &mut RowLimits,
    ) -> Result<Merged, String> {
        let mut held: Vec<std::collections::VecDeque<BytesMut>> = match row_order {
            Some(_) => vec![Default::default(); legs.len()],
            None => Vec::new(),
        };
        loop {
            // One step: each shard's rows, then its next other message.
            let mut ends: Vec<BytesMut> = Vec::with_capacity(legs.len());
            // An Execute's row limit counts the rows of every shard.
            let cap = limits.current();
            let mut sent = 0u64;
            for (i, leg) in legs.iter_mut().enumerate() {
                // Rows go to the client as they came, in runs.
                let plain = held.is_empty() && !(replicated && i > 0) && cap.is_none();
                loop {
                    // Written out as it fills, within a shard's rows too: a
                    // shard's whole result is not held for a slow client.
                    if self.client_out.len() >= FLUSH_AT {
                        self.write_client().await.map_err(|e| e.to_string())?;
                    }
                    if plain && leg.take_rows(&mut self.client_out) {
                        continue;
                    }
                    let msg = self.leg_next(leg).await?;
                    match msg[0] {
                        backend::DATA_ROW if replicated && i > 0 => {}
                        backend::DATA_ROW if !held.is_empty() => held[i].push_back(msg),
                        backend::DATA_ROW if cap.is_some() => {
                            if cap.is_some_and(|c| sent < c) {
                                self.client_out.extend_from_slice(&msg);
                                sent += 1;
                            }
                        }
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
            limits.ended(ends[0][0]);
            if cap == Some(sent)
                && ends
                    .iter()
                    .all(|m| matches!(m[0], backend::COMMAND_COMPLETE | backend::PORTAL_SUSPENDED))
            {
                // The limit reached, whichever shards had more: the portal
                // is suspended, as a server says once it returned that many.
                backend::empty_message(&mut self.client_out, backend::PORTAL_SUSPENDED);
                continue;
            }
            if ends.iter().any(|m| m[0] != ends[0][0]) {
                return Err("shards answered the same statement differently".into());
            }
            let first = &ends[0];
            if first[0] == backend::COMMAND_COMPLETE {
                let tagged: Vec<(usize, &[u8])> = legs
                    .iter()
                    .map(|l| l.shard)
                    .zip(ends.iter().map(|m| &m[..]))
                    .collect();
                if let Err(e) = self.one_tag(&tagged, replicated) {
                    e.encode(&mut self.client_out);
                    drain_after(legs, &ends).await?;
                    return Ok(Merged::Done(true));
                }
            } else if first[0] == backend::COPY_IN_RESPONSE {
                self.client_out.extend_from_slice(first);
                return Ok(Merged::CopyIn);
            } else {
                self.client_out.extend_from_slice(first);
            }
        }
    }

    /// Answers the shards' CommandCompletes to one statement (`ends`: each
    /// shard's) with one: their counts summed (`UPDATE 5` for 2 and 3), or
    /// the first shard's tag when it has no count (`CREATE TABLE`). A
    /// `replicated` write (reference tables only) is answered with the
    /// first shard's tag once every shard's count agrees; shards that
    /// disagree are an error (the caller rolls the write back).
    pub(in crate::session) fn one_tag(
        &mut self,
        ends: &[(usize, &[u8])],
        replicated: bool,
    ) -> Result<(), PgError> {
        let Some(&(_, first)) = ends.first() else {
            return Ok(());
        };
        if ends.iter().any(|(_, m)| m[0] != first[0]) {
            return Err(PgError::error(
                "XX000",
                "shards answered the same statement differently",
            ));
        }
        let counts: Option<Vec<(&[u8], u64)>> = match first[0] {
            backend::COMMAND_COMPLETE => ends
                .iter()
                .map(|(_, m)| tag_count(backend::command_tag(&m[5..])))
                .collect(),
            _ => None,
        };
        match counts {
            Some(c) if replicated => {
                if c.iter().any(|x| x.1 != c[0].1) {
                    let tags: Vec<String> = ends
                        .iter()
                        .zip(&c)
                        .map(|((shard, _), x)| {
                            format!(
                                "{} {} on shard {}",
                                String::from_utf8_lossy(x.0),
                                x.1,
                                self.shared.topology.shards[*shard].name
                            )
                        })
                        .collect();
                    tracing::error!(tags = %tags.join(", "), traceparent = self.unit_trace().as_deref(), "a reference-table write did different things on different shards");
                    return Err(PgError::error(
                        "XX001",
                        format!(
                            "the copies of a reference table differ between shards: the same write gave {}; it is rolled back",
                            tags.join(", ")
                        ),
                    ));
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
        Ok(())
    }

    /// Ends the proxy's BEGIN on every shard: COMMIT when the unit succeeded
    /// everywhere, else ROLLBACK. A COMMIT failing after others succeeded
    /// is reported (the one case where shards can disagree without
    /// two-phase commit).
    pub(super) async fn finish_writes(&mut self, legs: &mut [Leg], failed: bool) {
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
    /// told the unit is done, so its next reads see the rows. Not of a leg
    /// on a replica (`Leg::replica`): it only read.
    pub(super) async fn remember_writes(&mut self, legs: &mut [Leg]) {
        for leg in legs.iter_mut().filter(|l| l.done && !l.replica) {
            self.remember_write(leg.shard, &mut leg.conn).await;
        }
    }

    /// Read-your-writes after a write on `shard` through `conn`.
    pub(in crate::session) async fn remember_write(
        &self,
        shard: usize,
        conn: &mut PooledConnection,
    ) {
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
                if let Ok((rows, _)) = conn
                    .simple_query(crate::session::route::WAL_POSITION_SQL)
                    .await
                {
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

    fn frames(messages: &[(u8, &[u8])]) -> Vec<crate::protocol::Frame> {
        let mut buf = BytesMut::new();
        for (tag, body) in messages {
            buf.extend_from_slice(&[*tag]);
            buf.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
            buf.extend_from_slice(body);
        }
        std::iter::from_fn(|| crate::protocol::next_frame(&mut buf, 1 << 20).unwrap()).collect()
    }

    #[test]
    fn row_limits_follow_the_executes_in_order() {
        let one = [0, 0, 0, 0, 1];
        let all = [0, 0, 0, 0, 0];
        // Parse, Bind, Execute(1), Bind, Execute(all), Sync.
        let f = frames(&[
            (b'P', b"\0SELECT 1\0\0\0"),
            (b'B', b"\0\0\0\0\0\0\0\0"),
            (b'E', &one),
            (b'B', b"\0\0\0\0\0\0\0\0"),
            (b'E', &all),
            (b'S', b""),
        ]);
        let mut l = RowLimits::of(&f);
        // ParseComplete and BindComplete leave the first Execute current.
        assert_eq!(l.current(), Some(1));
        l.ended(backend::PARSE_COMPLETE);
        l.ended(backend::BIND_COMPLETE);
        assert_eq!(l.current(), Some(1));
        l.ended(backend::PORTAL_SUSPENDED);
        l.ended(backend::BIND_COMPLETE);
        assert_eq!(l.current(), None);
        l.ended(backend::COMMAND_COMPLETE);
        assert_eq!(l.current(), None);
        // No limit anywhere: nothing to count.
        let f = frames(&[(b'E', &all), (b'S', b"")]);
        assert!(RowLimits::of(&f).limits.is_empty());
    }
}
