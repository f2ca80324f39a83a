//! Reads whose rows are merged across shards: ORDER BY, LIMIT/OFFSET,
//! aggregates, GROUP BY/HAVING, DISTINCT (the router's `scatter::plan`).
//!
//! Each shard runs the plan's rewritten statement (hidden sort columns,
//! AVG as SUM and COUNT, LIMIT n+m). In the extended protocol the unit is
//! sent as the unnamed statement on every connection, with a Describe of
//! the portal added before each Execute so the proxy learns the columns'
//! types and formats (its answer is not forwarded).
//!
//! Sorted plans are merged as streams: one row per shard is held, the
//! smallest goes out, and that shard's next row is read, so memory stays at
//! a row per shard however many rows there are. Grouped plans hold one
//! entry per group (not per row) until every shard has answered.

use super::leg::{drain_after, Leg};
use super::Session;
use super::FLUSH_AT;
use crate::protocol::backend::{self, sqlstate, PgError};
use crate::protocol::rows::{client_row_description, data_row, row_description, row_values};
use crate::protocol::{frontend, Frame};
use bytes::{Bytes, BytesMut};
use shardline_router::gather::{client_columns, count_value, Collation, Compiled};
use shardline_router::merge::Value;
use shardline_router::scatter::MergePlan;
use shardline_router::shards::{Construct, Refusal};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How long a database's collation facts are trusted (DDL through the
/// proxy forgets them at once).
const COLLATION_TTL: Duration = Duration::from_secs(30);

/// Whether text orders as C does (the database's collation, and no column
/// or domain with another), and whether equal text is equal bytes.
const COLLATION_SQL: &str = "SELECT d.datcollate IN ('C', 'POSIX', 'C.UTF-8', 'C.utf8') \
 AND coalesce(to_jsonb(d) ->> 'datlocprovider', 'c') = 'c' \
 AND NOT EXISTS (SELECT 1 FROM pg_attribute a JOIN pg_collation c ON c.oid = a.attcollation \
   WHERE a.attnum > 0 AND c.collname NOT IN ('default', 'C', 'POSIX', 'ucs_basic') \
   AND NOT (c.collprovider = 'c' AND coalesce(c.collcollate, '') IN ('C', 'POSIX', 'C.UTF-8', 'C.utf8'))) \
 AND NOT EXISTS (SELECT 1 FROM pg_type t JOIN pg_collation c ON c.oid = t.typcollation \
   WHERE t.typtype = 'd' AND c.collname NOT IN ('default', 'C', 'POSIX', 'ucs_basic') \
   AND NOT (c.collprovider = 'c' AND coalesce(c.collcollate, '') IN ('C', 'POSIX', 'C.UTF-8', 'C.utf8'))), \
 NOT EXISTS (SELECT 1 FROM pg_attribute a JOIN pg_collation c ON c.oid = a.attcollation \
   WHERE NOT c.collisdeterministic) \
 FROM pg_database d WHERE d.datname = current_database()";

/// A merged unit: the plan and what the answers will hold.
pub(super) struct MergeUnit {
    pub plan: MergePlan,
    /// The rewritten statement with the client's parameter types, as a
    /// Parse definition.
    definition: Bytes,
    limit: Option<u64>,
    offset: u64,
    /// The Execute's row limit (asyncpg's `fetchrow`/`fetchval` ask for 1):
    /// at most this many rows, then PortalSuspended, as a server answers.
    max_rows: Option<u64>,
    simple: bool,
    /// For each RowDescription/NoData the shards will send: whether it
    /// answers the proxy's own Describe (the rows' columns follow).
    describes: VecDeque<bool>,
}

/// Merges with at least this many groups are finished (sorted, encoded)
/// on the blocking pool.
const FINISH_ELSEWHERE: usize = 16 * 1024;

fn malformed(what: &str) -> Refusal {
    Refusal::invalid(
        sqlstate::PROTOCOL_VIOLATION,
        format!("a shard sent a malformed {what}"),
    )
}

/// The client's RowDescription of a merge, from a shard's.
fn client_description(plan: &MergePlan, msg: &[u8]) -> Result<Vec<u8>, Refusal> {
    let fields = row_description(msg).ok_or_else(|| malformed("RowDescription"))?;
    let cols = client_columns(plan, fields.len())?;
    client_row_description(msg, &cols).ok_or_else(|| malformed("RowDescription"))
}

/// The values of a shard's DataRow.
fn values(msg: &[u8]) -> Result<Vec<Option<&[u8]>>, Refusal> {
    row_values(msg).ok_or_else(|| malformed("DataRow"))
}

impl MergeUnit {
    /// The most rows the client gets: the statement's LIMIT or the
    /// Execute's row limit, whichever is smaller.
    fn cap(&self) -> Option<u64> {
        match (self.limit, self.max_rows) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

impl Session {
    /// Plans the merge of the unit's one statement. `Ok(None)`: the rows
    /// only need concatenating.
    pub(super) fn merge_unit(&self, frames: &[Frame]) -> Result<Option<MergeUnit>, PgError> {
        let Some(sh) = self.shared.sharding.clone() else {
            return Ok(None);
        };
        let unsupported = |c, m: &str| self.shared.events.refusals.refuse(c, m);
        let malformed =
            |m: frontend::Malformed| PgError::error(sqlstate::PROTOCOL_VIOLATION, m.to_string());
        let simple = frames.first().is_some_and(|f| f.tag == frontend::QUERY);
        // The statement's definition (query, NUL, parameter types).
        let mut definition: Option<Bytes> = None;
        let mut params = frontend::Params::new();
        let mut executes = 0;
        let mut max_rows = None;
        for f in frames {
            match f.tag {
                frontend::QUERY => {
                    let q = frontend::query(f.body()).map_err(malformed)?;
                    let mut d = q.to_vec();
                    d.extend_from_slice(&[0, 0, 0]);
                    definition = Some(d.into());
                }
                frontend::PARSE => {
                    let p = frontend::parse(f.body()).map_err(malformed)?;
                    definition = Some(Bytes::copy_from_slice(p.definition));
                }
                frontend::BIND => {
                    let b = frontend::bind(f.body()).map_err(malformed)?;
                    if definition.is_none() {
                        definition = self.bound_definition(b.statement);
                    }
                    params = frontend::bind_params(b.rest).unwrap_or_default();
                }
                frontend::DESCRIBE => {
                    let (kind, name) = frontend::target(f.body(), "Describe").map_err(malformed)?;
                    if kind == b'S' && definition.is_none() {
                        definition = self.bound_definition(name);
                    }
                }
                frontend::EXECUTE => {
                    executes += 1;
                    let (portal, row_limit) = frontend::execute(f.body()).map_err(malformed)?;
                    let limit = Some(row_limit).filter(|&n| n > 0);
                    if limit.is_some() && !portal.is_empty() {
                        // A cursor fetched in batches would need the merge
                        // kept open between units.
                        return Err(unsupported(
                            Construct::Cursor,
                            "fetching a cross-shard merged result in batches from a named portal (a cursor) is not supported; fetch it whole",
                        ));
                    }
                    // The unnamed portal ends with the unit: its first rows
                    // are all the client can fetch.
                    max_rows = limit.map(|n| n as u64);
                }
                _ => {}
            }
        }
        if executes > 1 {
            return Err(unsupported(
                Construct::Batch,
                "several executions of cross-shard merged statements in one pipeline are not supported; send a Sync after each",
            ));
        }
        let Some(definition) = definition else {
            return Ok(None);
        };
        let query = super::route::definition_query(&definition);
        let types = &definition[query.len()..];
        let sql = std::str::from_utf8(query)
            .map_err(|_| unsupported(Construct::Merge, "statement text is not UTF-8"))?;
        let Some(plan) = shardline_router::scatter::plan(sql, &sh)
            .map_err(|r| self.shared.events.refusals.error(r))?
        else {
            return Ok(None);
        };
        let limit = count_value(plan.limit, &params, "LIMIT")
            .map_err(|r| self.shared.events.refusals.error(r))?;
        let offset = count_value(plan.offset, &params, "OFFSET")
            .map_err(|r| self.shared.events.refusals.error(r))?
            .unwrap_or(0);
        let mut d = plan.sql.as_bytes().to_vec();
        // No types declared (asyncpg): declare those the server inferred
        // for the client's own statement, which the client binds with; the
        // rewritten text could infer others (a HAVING parameter becomes a
        // select-list column, typed text).
        let declared = frontend::definition_param_types(&definition).len();
        match self.described.get(&definition) {
            Some(oids) if declared == 0 && !oids.is_empty() => {
                d.push(0);
                d.extend_from_slice(&(oids.len() as i16).to_be_bytes());
                for oid in oids {
                    d.extend_from_slice(&oid.to_be_bytes());
                }
            }
            _ => d.extend_from_slice(types),
        }
        Ok(Some(MergeUnit {
            plan,
            definition: d.into(),
            limit,
            offset,
            max_rows,
            simple,
            describes: VecDeque::new(),
        }))
    }

    pub(super) fn bound_definition(&self, name: &[u8]) -> Option<Bytes> {
        if name.is_empty() {
            self.unnamed.as_ref().map(|u| u.definition.clone())
        } else {
            self.statements.get(name).map(|s| s.definition.clone())
        }
    }

    /// Records the unit's Parse messages as the client's statements (so
    /// later Binds find them); the shards get the rewritten text instead.
    pub(super) fn register_parses(&mut self, frames: &[Frame]) -> Result<(), super::End> {
        for f in frames.iter().filter(|f| f.tag == frontend::PARSE) {
            self.record_parse(f)?;
        }
        Ok(())
    }

    /// Writes the unit for one shard: every statement as the unnamed one
    /// holding the rewritten text, a Describe of the portal before each
    /// Execute.
    pub(super) fn translate_merge(
        &mut self,
        frames: &[Frame],
        leg: &mut Leg,
        unit: &mut MergeUnit,
        out: &mut BytesMut,
    ) -> Result<(), super::End> {
        let mut describes = VecDeque::new();
        let mut parsed = false;
        let mut portal: &[u8] = b"";
        let parse = |out: &mut BytesMut, leg: &mut Leg, injected: bool| {
            frontend::write_parse(out, b"", &unit.definition);
            if injected {
                leg.own(out);
            }
        };
        for f in frames {
            match f.tag {
                frontend::QUERY => frontend::write_query(out, &unit.plan.sql),
                frontend::PARSE => {
                    parse(out, leg, false);
                    parsed = true;
                }
                frontend::BIND => {
                    if !parsed {
                        parse(out, leg, true);
                        parsed = true;
                    }
                    let b = frontend::bind(f.body())?;
                    portal = b.portal;
                    let rest = frontend::with_extra_result_columns(b.rest, unit.plan.hidden)
                        .ok_or(frontend::Malformed("Bind"))?;
                    frontend::write_bind(out, b.portal, b"", &rest);
                }
                frontend::DESCRIBE => {
                    let (kind, name) = frontend::target(f.body(), "Describe")?;
                    if kind == b'S' {
                        if !parsed {
                            parse(out, leg, true);
                            parsed = true;
                        }
                        frontend::write_target(out, frontend::DESCRIBE, b'S', b"");
                    } else {
                        frontend::write_target(out, frontend::DESCRIBE, b'P', name);
                    }
                    describes.push_back(false);
                }
                frontend::EXECUTE => {
                    frontend::write_target(out, frontend::DESCRIBE, b'P', portal);
                    describes.push_back(true);
                    // Every shard runs to the end: the row limit applies
                    // to the merged rows.
                    frontend::write_execute(out, portal, 0);
                }
                frontend::CLOSE => self.close_on_shard(f, out)?,
                _ => out.extend_from_slice(&f.bytes),
            }
        }
        // The connection's unnamed statement is no longer any client's.
        leg.conn.unnamed_token = 0;
        unit.describes = describes;
        Ok(())
    }

    /// What the database's collations allow, asked once per database (on
    /// an idle connection, before the unit is sent).
    pub(super) async fn collation(&self, leg: &mut Leg) -> Result<Collation, String> {
        let db = self.login.user.database.clone();
        {
            let cache = self
                .shared
                .collations
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some((at, c)) = cache.get(&db) {
                if at.elapsed() < COLLATION_TTL {
                    return Ok(*c);
                }
            }
        }
        let (rows, _) = leg
            .conn
            .simple_query(COLLATION_SQL)
            .await
            .map_err(|e| format!("server {}: {e}", leg.conn.addr))?;
        let flag = |i: usize| {
            rows.first()
                .and_then(|r| r.get(i).cloned().flatten())
                .is_some_and(|v| v == "t")
        };
        let c = Collation {
            c_order: flag(0),
            deterministic: flag(1),
        };
        self.shared
            .collations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(db, (Instant::now(), c));
        Ok(c)
    }

    /// Merges the shards' answers to a merged unit; whether it failed.
    pub(super) async fn gather(
        &mut self,
        legs: &mut [Leg],
        unit: &mut MergeUnit,
        coll: Collation,
    ) -> Result<bool, String> {
        loop {
            let mut ends: Vec<BytesMut> = Vec::with_capacity(legs.len());
            for (i, leg) in legs.iter_mut().enumerate() {
                ends.push(self.next_end(leg, i == 0).await?);
            }
            if ends.iter().all(|m| m[0] == backend::READY_FOR_QUERY) {
                for leg in legs.iter_mut() {
                    leg.done = true;
                }
                return Ok(false);
            }
            if let Some(err) = ends.iter().find(|m| m[0] == backend::ERROR_RESPONSE) {
                self.client_out.extend_from_slice(err);
                drain_after(legs, &ends).await?;
                return Ok(true);
            }
            if ends.iter().any(|m| m[0] != ends[0][0]) {
                return Err("shards answered the same statement differently".into());
            }
            let tag = ends[0][0];
            if tag != backend::ROW_DESCRIPTION && tag != backend::NO_DATA {
                self.client_out.extend_from_slice(&ends[0]);
                continue;
            }
            // A simple query's description, or the proxy's own Describe
            // before an Execute, gives the columns of the rows that follow.
            let rows_follow = unit.simple || unit.describes.pop_front().unwrap_or(false);
            if tag == backend::NO_DATA || !rows_follow {
                if tag == backend::NO_DATA {
                    if !rows_follow {
                        self.client_out.extend_from_slice(&ends[0]);
                    }
                } else {
                    match client_description(&unit.plan, &ends[0]) {
                        Ok(d) => self.client_out.extend_from_slice(&d),
                        Err(r) => return self.fail_merge(legs, &ends, r).await,
                    }
                }
                continue;
            }
            let compiled = row_description(&ends[0])
                .ok_or_else(|| malformed("RowDescription"))
                .and_then(|fields| Compiled::new(&unit.plan, &fields, coll))
                .and_then(|c| Ok((c, client_description(&unit.plan, &ends[0])?)));
            let compiled = match compiled {
                Ok((c, description)) => {
                    if unit.simple {
                        self.client_out.extend_from_slice(&description);
                    }
                    c
                }
                Err(r) => return self.fail_merge(legs, &ends, r).await,
            };
            if self.merge_rows(legs, &compiled, unit).await? {
                // Failed: every shard was read to its ReadyForQuery.
                return Ok(true);
            }
        }
    }

    /// The next message of a leg other than a notice (the first leg's
    /// notices reach the client once).
    async fn next_end(&mut self, leg: &mut Leg, first: bool) -> Result<BytesMut, String> {
        loop {
            let msg = self.leg_next(leg).await?;
            match msg[0] {
                backend::NOTICE_RESPONSE | backend::NOTIFICATION => {
                    if first {
                        self.client_out.extend_from_slice(&msg);
                    }
                }
                backend::PARAMETER_STATUS => {}
                _ => return Ok(msg),
            }
        }
    }

    async fn fail_merge(
        &mut self,
        legs: &mut [Leg],
        ends: &[BytesMut],
        r: Refusal,
    ) -> Result<bool, String> {
        self.shared
            .events
            .refusals
            .error(r)
            .encode(&mut self.client_out);
        drain_after(legs, ends).await?;
        Ok(true)
    }

    /// The rows of one execution, merged; then its CommandComplete.
    /// Whether it failed (the error is already written, and every shard
    /// read to its ReadyForQuery).
    async fn merge_rows(
        &mut self,
        legs: &mut [Leg],
        c: &Compiled,
        unit: &MergeUnit,
    ) -> Result<bool, String> {
        let n = legs.len();
        let mut ends: Vec<Option<BytesMut>> = vec![None; n];
        let mut error: Option<Refusal> = None;
        let mut emitted = 0u64;
        if c.grouped() {
            let mut groups = c.grouper();
            let shared = self.shared.clone();
            let mut budget = shared.merge_memory.reserve();
            for (i, leg) in legs.iter_mut().enumerate() {
                loop {
                    let msg = self.next_end(leg, i == 0).await?;
                    if msg[0] != backend::DATA_ROW {
                        ends[i] = Some(msg);
                        break;
                    }
                    if error.is_none() {
                        // Past the budget the groups are dropped and the
                        // rest of the rows only read.
                        let added = values(&msg).and_then(|v| groups.add(&v)).and_then(|()| {
                            budget
                                .cover(groups.bytes())
                                .map_err(|(code, message)| Refusal::invalid(code, message))
                        });
                        if let Err(r) = added {
                            error = Some(r);
                            groups = c.grouper();
                            budget = shared.merge_memory.reserve();
                        }
                    }
                }
            }
            if error.is_none()
                && ends
                    .iter()
                    .flatten()
                    .all(|m| m[0] == backend::COMMAND_COMPLETE)
            {
                let (cap, offset) = (unit.cap(), unit.offset);
                let groups = groups.into_groups();
                let finish = move |c: &Compiled, groups| {
                    let mut out = BytesMut::new();
                    c.finish_groups(groups, cap, offset, |row| {
                        data_row(row.iter().map(|v| v.as_deref()), &mut out)
                    })
                    .map(|n| (n, out))
                };
                let finished = if groups.len() < FINISH_ELSEWHERE {
                    finish(c, groups)
                } else {
                    // Sorting and encoding many groups takes a while: not
                    // on the thread serving other clients.
                    let c = c.clone();
                    tokio::task::spawn_blocking(move || finish(&c, groups))
                        .await
                        .map_err(|e| format!("merge: {e}"))?
                };
                match finished {
                    Ok((rows, out)) => {
                        emitted = rows;
                        self.client_out.extend_from_slice(&out);
                    }
                    Err(r) => error = Some(r),
                }
            }
        } else {
            // One row per shard, the smallest first.
            let mut heads: Vec<Option<(BytesMut, Vec<Option<Value>>)>> = vec![None; n];
            for i in 0..n {
                self.refill(&mut legs[i], i, c, &mut heads[i], &mut ends[i], &mut error)
                    .await?;
            }
            let mut skip = unit.offset;
            let mut last: Option<Vec<Option<Value>>> = None;
            // The sort key of the last row sent (FETCH FIRST ... WITH TIES).
            let mut last_sent: Option<Vec<Option<Value>>> = None;
            while error.is_none() {
                let full = unit.cap().is_some_and(|l| emitted >= l);
                let ties = unit.plan.with_ties && unit.max_rows.is_none_or(|m| emitted < m);
                if full && !ties {
                    break;
                }
                let mut best: Option<usize> = None;
                for i in 0..n {
                    let Some((_, key)) = &heads[i] else { continue };
                    let better = match best.and_then(|b| heads[b].as_ref()) {
                        Some((_, min)) => c.compare(key, min) == std::cmp::Ordering::Less,
                        None => true,
                    };
                    if better {
                        best = Some(i);
                    }
                    if !c.sorted() {
                        break;
                    }
                }
                let Some(i) = best else { break };
                if full {
                    let tied = matches!((&heads[i], &last_sent), (Some((_, key)), Some(sent))
                        if c.compare(key, sent) == std::cmp::Ordering::Equal);
                    if !tied {
                        break;
                    }
                }
                let Some((row, key)) = heads[i].take() else {
                    break;
                };
                self.refill(&mut legs[i], i, c, &mut heads[i], &mut ends[i], &mut error)
                    .await?;
                // A row goes out as the shard sent it unless it loses
                // hidden columns or is compared for DISTINCT ON.
                let whole = c.visible() == c.width();
                let vals = if whole && !c.distinct() {
                    Vec::new()
                } else {
                    match values(&row) {
                        Ok(v) => v,
                        Err(r) => {
                            error = Some(r);
                            break;
                        }
                    }
                };
                match c.distinct_key(&vals) {
                    Ok(Some(k)) => {
                        if last.as_ref() == Some(&k) {
                            continue;
                        }
                        last = Some(k);
                    }
                    Ok(None) => {}
                    Err(r) => {
                        error = Some(r);
                        break;
                    }
                }
                if skip > 0 {
                    skip -= 1;
                    continue;
                }
                if whole {
                    self.client_out.extend_from_slice(&row);
                } else {
                    data_row(vals.iter().take(c.visible()).copied(), &mut self.client_out);
                }
                if unit.plan.with_ties {
                    last_sent = Some(key);
                }
                emitted += 1;
                if self.client_out.len() >= FLUSH_AT {
                    self.write_client().await.map_err(|e| e.to_string())?;
                }
            }
            // Rows past the LIMIT (at most LIMIT + OFFSET per shard) are read and dropped.
            for (i, leg) in legs.iter_mut().enumerate() {
                while ends[i].is_none() {
                    let msg = self.next_end(leg, i == 0).await?;
                    if msg[0] != backend::DATA_ROW {
                        ends[i] = Some(msg);
                    }
                }
            }
        }
        let ends: Vec<BytesMut> = ends.into_iter().flatten().collect();
        if let Some(err) = ends.iter().find(|m| m[0] == backend::ERROR_RESPONSE) {
            self.client_out.extend_from_slice(err);
            drain_after(legs, &ends).await?;
            return Ok(true);
        }
        if let Some(r) = error {
            self.shared
                .events
                .refusals
                .error(r)
                .encode(&mut self.client_out);
            drain_after(legs, &ends).await?;
            return Ok(true);
        }
        if ends.iter().any(|m| m[0] != backend::COMMAND_COMPLETE) {
            return Err("shards ended a merged result differently".into());
        }
        if unit.max_rows == Some(emitted) {
            // The server stops at the row limit without looking further.
            backend::empty_message(&mut self.client_out, backend::PORTAL_SUSPENDED);
        } else {
            backend::command_complete(&mut self.client_out, &format!("SELECT {emitted}"));
        }
        Ok(false)
    }

    /// Reads a leg's next row into `head`, or its end into `end`.
    async fn refill(
        &mut self,
        leg: &mut Leg,
        i: usize,
        c: &Compiled,
        head: &mut Option<(BytesMut, Vec<Option<Value>>)>,
        end: &mut Option<BytesMut>,
        error: &mut Option<Refusal>,
    ) -> Result<(), String> {
        if end.is_some() {
            return Ok(());
        }
        let msg = self.next_end(leg, i == 0).await?;
        if msg[0] != backend::DATA_ROW {
            *end = Some(msg);
            return Ok(());
        }
        let key = if c.sorted() {
            match values(&msg).and_then(|v| c.sort_key(&v)) {
                Ok(k) => k,
                Err(r) => {
                    *error = Some(r);
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        *head = Some((msg, key));
        Ok(())
    }
}
