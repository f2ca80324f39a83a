//! Taking a connection on each shard of a fan-out, and giving them back
//! when the unit ends or fails.

use crate::protocol::backend::{sqlstate, PgError};
use crate::protocol::frontend;
use crate::session::leg::Leg;
use crate::session::{End, Session};
use bytes::{Bytes, BytesMut};
use shardline_router::sharding::{mask_of, ShardMask};
use shardline_router::Target;
use tokio::io::AsyncWriteExt;

/// The proxy's BEGIN for `leg`, its answer skipped. A simple query: the
/// connection's unnamed statement and portal are gone after it.
pub(in crate::session) fn begin_on(leg: &mut Leg, out: &mut BytesMut) {
    frontend::write_query(out, "BEGIN");
    leg.own(out);
    leg.conn.unnamed_token = 0;
}

impl Session {
    /// A connection on each of `shards`: borrowed for this unit (for
    /// `target`; on the shards of `reads`, which the unit only reads, a
    /// replica where the primary is down), or (inside the client's
    /// transaction) the transaction's own, with the BEGIN of the
    /// transaction for the shards that join it.
    pub(in crate::session) async fn take_legs(
        &mut self,
        shards: &[usize],
        (target, reads): (Target, ShardMask),
        in_txn: bool,
    ) -> Result<(Vec<Leg>, Option<Bytes>), PgError> {
        if in_txn {
            let (legs, begin) = self.transaction_legs(shards).await?;
            Ok((legs, Some(begin)))
        } else {
            Ok((self.borrow_legs(shards, target, reads).await?, None))
        }
    }

    /// After a unit on several shards (`result`: whether it failed, or what
    /// broke): borrowed legs end as `end_fanout` or `fail_legs` says; the
    /// transaction's legs stay in it.
    pub(in crate::session) async fn finish_legs(
        &mut self,
        legs: Vec<Leg>,
        begin: Option<Bytes>,
        wrap: bool,
        writes: bool,
        result: Result<bool, String>,
    ) -> Result<(), End> {
        if let Some(end) = self.left.take() {
            // The client is gone mid-unit (`Session::leg_next`): what its
            // shards run is cancelled, then their connections closed (a
            // wrapped write, or the client's transaction, rolls back with
            // them), and the session ends.
            self.client.cancel_and_detach();
            for leg in legs {
                leg.conn.discard();
            }
            return Err(end);
        }
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

    /// A connection on each of `shards` for `target` (on the shards of
    /// `reads`, a replica where the primary is down), the CancelRequest
    /// routed to all of them.
    pub(in crate::session) async fn borrow_legs(
        &mut self,
        shards: &[usize],
        target: Target,
        reads: ShardMask,
    ) -> Result<Vec<Leg>, PgError> {
        let mut legs: Vec<Leg> = Vec::with_capacity(shards.len());
        for &shard in shards {
            let mut tried = 0;
            let read = reads & mask_of(shard) != 0 || target == Target::Replica;
            let (conn, node, placed) = self.borrow(shard, target, read, &mut tried).await?;
            self.fill_on(placed);
            let mut leg = Leg::parked(shard, node, conn);
            leg.done = false;
            leg.replica = placed == Target::Replica;
            legs.push(leg);
        }
        self.cancels_reach(&legs);
        Ok(legs)
    }

    /// Routes the client's CancelRequest to every leg of `legs`.
    pub(in crate::session) fn cancels_reach(&self, legs: &[Leg]) {
        self.client.attach_all(
            legs.iter()
                .map(|l| (l.conn.addr.clone(), l.conn.pid, l.conn.secret)),
        );
    }

    /// What a leg is sent before the unit: the session's settings when the
    /// connection's differ, the proxy's BEGIN for writes (`wrap`), or the
    /// BEGIN of the client's transaction it joins; answers skipped. Both are simple queries: the connection's unnamed
    /// statement is gone after them.
    pub(in crate::session) fn leg_prelude(&self, leg: &mut Leg, wrap: bool, out: &mut BytesMut) {
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
            begin_on(leg, out);
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
    pub(in crate::session) async fn end_fanout(
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
            if leg.done {
                leg.conn.give_back();
            } else {
                leg.conn.discard();
            }
        }
    }

    /// A server failed mid-unit: roll back what the others did, report it.
    pub(in crate::session) async fn fail_legs(
        &mut self,
        legs: Vec<Leg>,
        msg: String,
    ) -> Result<(), End> {
        self.client.detach();
        tracing::warn!(error = %msg, traceparent = self.unit_trace().as_deref(), "multi-shard statement failed");
        for mut leg in legs {
            // Whatever state the connection is in, it is not reused.
            let _ = leg.conn.stream().shutdown().await;
            leg.conn.discard();
        }
        PgError::error(sqlstate::CONNECTION_FAILURE, msg).encode(&mut self.client_out);
        self.fanout_ready(true);
        Ok(())
    }
}
