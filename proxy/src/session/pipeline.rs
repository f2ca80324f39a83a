//! A pipeline whose executions need different shards: several
//! Bind/Execute pairs before one Sync, each with its own key (asyncpg's and
//! psycopg's `executemany`, PgJDBC's batches). Each execution runs on the
//! shard its key names; the answers reach the client in the order it asked.
//!
//! Every shard gets the unit's Parses, Closes and the Sync, and only its
//! own executions; writes run inside a BEGIN the proxy commits on every
//! shard only when nothing failed (as for other writes on several shards).
//! The answers are read in the client's order, each from the shard that
//! runs the message: a Parse is answered once, rows stream through. After
//! an error nothing more is forwarded (a server skips to Sync), every
//! shard is read to its ReadyForQuery, and the writes are rolled back.

use super::fanout::{parse_on, Leg, FLUSH_AT};
use super::{End, Session};
use crate::protocol::backend::{self, sqlstate, PgError};
use crate::protocol::{frontend, Frame};
use bytes::BytesMut;
use shardline_router::sharding::{shards_in, ShardMask};
use shardline_router::shards::Placement;
use shardline_router::Target;
use tokio::io::AsyncWriteExt;

/// A shard's part of a pipeline is written whole before any answer is
/// read; kept small enough that the server can take it in while its
/// answers wait.
const MAX_PART: usize = 64 * 1024;

/// Which legs a client message goes to.
#[derive(Clone, Copy)]
enum To {
    All,
    /// A Describe of a statement: answered by the first leg.
    First,
    One(usize),
    Nowhere,
}

impl Session {
    pub(super) async fn run_pipeline(
        &mut self,
        frames: Vec<Frame>,
        mask: ShardMask,
        target: Target,
        writes: bool,
    ) -> Result<(), End> {
        let shards: Vec<usize> = shards_in(mask).collect();
        let to = match self.pipeline_legs(&frames, &shards) {
            Ok(to) => to,
            Err(e) => return self.fail_pipeline(e),
        };
        let target = if writes { Target::Primary } else { target };
        let mut legs = match self.borrow_legs(&shards, target).await {
            Ok(legs) => legs,
            Err(e) => return self.fail_pipeline(e),
        };
        let mut outs: Vec<BytesMut> = vec![BytesMut::new(); legs.len()];
        for (leg, out) in legs.iter_mut().zip(outs.iter_mut()) {
            self.leg_prelude(leg, writes, out);
        }
        for (f, to) in frames.iter().zip(&to) {
            match (*to, f.tag) {
                (To::All, frontend::PARSE) => {
                    let parsed = self.record_parse(f)?;
                    for (leg, out) in legs.iter_mut().zip(outs.iter_mut()) {
                        parse_on(leg, &parsed, f, out);
                    }
                }
                (To::All, frontend::SYNC) => {
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
                (To::Nowhere, _) => {}
            }
        }
        if outs.iter().any(|o| o.len() > MAX_PART) {
            // Nothing was sent, but the connections' bookkeeping (settings,
            // statements) says it was: they are closed, not returned.
            self.cancel.detach();
            for leg in legs {
                drop(deadpool::managed::Object::take(leg.conn));
            }
            return self.fail_pipeline(PgError::error(
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!("a pipeline whose statements need different shards may carry at most {} KiB per shard before its Sync; send a Sync more often", MAX_PART / 1024),
            ));
        }
        for (leg, out) in legs.iter_mut().zip(&outs) {
            if let Err(e) = leg.conn.stream.write_all(out).await {
                let msg = format!("server {}: {e}", leg.conn.addr);
                return self.fail_legs(legs, msg).await;
            }
        }
        match self.pipeline_answers(&frames, &to, &mut legs).await {
            Ok(failed) => {
                self.end_fanout(legs, writes, writes, failed).await;
                Ok(())
            }
            Err(e) => self.fail_legs(legs, e).await,
        }
    }

    /// Where each message of the unit goes: Parse, Close and Sync to every
    /// leg, a Describe of a statement to the first, a Bind and the Describe
    /// and Execute after it to the leg of the Bind's key.
    fn pipeline_legs(&self, frames: &[Frame], shards: &[usize]) -> Result<Vec<To>, PgError> {
        let malformed =
            |m: frontend::Malformed| PgError::error(sqlstate::PROTOCOL_VIOLATION, m.to_string());
        let mut statements = super::route::UnitStatements::default();
        let mut current = 0;
        let mut to = Vec::with_capacity(frames.len());
        for f in frames {
            to.push(match f.tag {
                frontend::PARSE => {
                    let p = frontend::parse(f.body()).map_err(malformed)?;
                    statements.parse(self, &p);
                    To::All
                }
                frontend::BIND => {
                    let b = frontend::bind(f.body()).map_err(malformed)?;
                    if let Some((route, definition)) = statements.bound(self, b.statement) {
                        let params = frontend::bind_params(b.rest).unwrap_or_default();
                        if let Placement::One(s) = self.place(&route, definition, &params) {
                            current = shards.iter().position(|&x| x == s).unwrap_or(current);
                        }
                    }
                    To::One(current)
                }
                frontend::DESCRIBE if f.body().first() == Some(&b'S') => To::First,
                frontend::DESCRIBE | frontend::EXECUTE => To::One(current),
                frontend::CLOSE | frontend::SYNC => To::All,
                _ => To::Nowhere,
            });
        }
        Ok(to)
    }

    /// Reads the legs' answers in the order of the client's messages and
    /// forwards them; returns whether the unit failed. Every leg is read
    /// to its ReadyForQuery.
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
                To::All => &all,
                To::First => &all[..1],
                To::One(i) => std::slice::from_ref(&all[*i]),
                To::Nowhere => continue,
            };
            for (n, &i) in from.iter().enumerate() {
                loop {
                    let msg = legs[i].next().await?;
                    match msg[0] {
                        backend::DATA_ROW | backend::PARAMETER_DESCRIPTION => {
                            self.client_out.extend_from_slice(&msg);
                        }
                        backend::NOTICE_RESPONSE | backend::NOTIFICATION => {
                            self.client_out.extend_from_slice(&msg);
                        }
                        backend::PARAMETER_STATUS => {}
                        backend::ERROR_RESPONSE => {
                            self.client_out.extend_from_slice(&msg);
                            failed = true;
                            break 'frames;
                        }
                        backend::READY_FOR_QUERY
                        | backend::COPY_IN_RESPONSE
                        | backend::COPY_OUT_RESPONSE => {
                            return Err(format!(
                                "shard {} answered a pipeline unexpectedly ('{}'); COPY cannot run in a pipeline spanning shards",
                                self.shared.topology.shards[legs[i].shard].name,
                                msg[0] as char
                            ));
                        }
                        _ => {
                            // The message's answer: once for all legs.
                            if n == 0 {
                                self.client_out.extend_from_slice(&msg);
                            }
                            break;
                        }
                    }
                    if self.client_out.len() >= FLUSH_AT {
                        self.write_client().await.map_err(|e| e.to_string())?;
                    }
                }
            }
        }
        for leg in legs.iter_mut() {
            while leg.next().await?[0] != backend::READY_FOR_QUERY {}
            leg.done = true;
        }
        Ok(failed)
    }

    /// The pipeline failed before anything was sent.
    fn fail_pipeline(&mut self, e: PgError) -> Result<(), End> {
        e.encode(&mut self.client_out);
        backend::ready_for_query(&mut self.client_out, b'I');
        Ok(())
    }
}
