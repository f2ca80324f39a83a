//! COPY FROM STDIN split by row: the client's data is read here and each
//! row sent to the shard that owns its key.

use super::lockstep::Merged;
use crate::protocol::backend::{self, PgError};
use crate::protocol::{frontend, next_frame};
use crate::session::leg::{drain_to_ready, Leg};
use crate::session::{Session, FLUSH_AT};
use bytes::BytesMut;
use shardline_router::shards::{Construct, CopyIn};
use shardline_router::Target;
use tokio::io::AsyncReadExt;

impl Session {
    /// COPY FROM STDIN split by row: the client's data is read here, each
    /// row sent to the shard owning its key (every shard for a reference
    /// table), streaming.
    pub(super) async fn merge_copy(
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
        let mut splitter = crate::session::copy::RowSplitter::new(c.clone());
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
                            crate::session::copy::route_row(gr, &shard_list, &mut outs, row, key)
                        });
                        if let Err(e) = r {
                            error = Some(e);
                            continue;
                        }
                    } else {
                        for o in outs.iter_mut() {
                            crate::session::copy::put_copy_data(o, data);
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
                            crate::session::copy::route_row(gr, &shard_list, &mut outs, row, key)
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
        match self
            .merge(legs, None, replicated, &mut Default::default())
            .await?
        {
            Merged::Done(failed) => Ok(failed),
            Merged::CopyIn => Err("a second COPY in one unit".into()),
        }
    }

    /// Waits for the client's next Sync and sends it to every shard.
    pub(super) async fn forward_next_sync(&mut self, legs: &mut [Leg]) -> Result<(), String> {
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

    /// The client's next message, read from its socket here (during COPY,
    /// or a pipeline spanning shards read part by part, the fan-out owns
    /// the session).
    pub(in crate::session) async fn next_client_frame(
        &mut self,
    ) -> Result<crate::protocol::Frame, String> {
        loop {
            match next_frame(&mut self.client_in, self.shared.max_message_size) {
                Ok(Some(f)) => return Ok(f),
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
            self.forget_plan();
            // Read here, not through `poll_io`'s watch (`wake.rs`).
            self.client_read.forget();
            let n = self
                .login
                .stream
                .read_buf(&mut self.client_in)
                .await
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("client closed the connection in a unit spanning shards".into());
            }
        }
    }

    /// The key column's position in the table (a COPY naming no columns).
    pub(super) async fn key_position(&self, c: &CopyIn) -> Option<usize> {
        let sh = self.shared.sharding.clone()?;
        let mut tried = 0;
        let (mut conn, _, _) = self
            .borrow(sh.default_shard, Target::Primary, false, &mut tried)
            .await
            .ok()?;
        let sql = format!(
            "SELECT a.attname FROM pg_attribute a WHERE a.attrelid = '{}'::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            c.table.replace('\'', "''")
        );
        let answer = conn.simple_query(&sql).await;
        conn.give_back();
        let (rows, _) = answer.ok()?;
        rows.iter()
            .position(|r| r.first().and_then(|x| x.as_deref()) == Some(c.column.as_str()))
    }
}
