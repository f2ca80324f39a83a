//! Online moves: rows copied and kept current by Postgres logical
//! replication while clients keep writing, so traffic is held only for the
//! cutover.
//!
//! One *stream* per (source shard, target shard) pair that rows move
//! between:
//!
//! - on the source, a publication of every sharded table with a row filter
//!   on the placement the offline path renders (`Rebalance::moves_sql`: old
//!   owner the source, new owner the target, written without the array
//!   subscripts row filters refuse), plus, from the default shard
//!   to an added shard, every reference table whole;
//! - on the target, a subscription to it with `copy_data`: Postgres copies
//!   the rows matching the filter at the slot's consistent point and then
//!   applies every later change to them, in commit order.
//!
//! A subscription (rather than the tool decoding the stream itself) keeps
//! the copy and the apply in the servers: the initial copy runs one worker
//! per table, the apply is Postgres's own, and nothing passes through the
//! tool. What it needs: `wal_level = logical` and free slots and senders on
//! sources, the tool's role a superuser on targets (Postgres 15 lets only
//! superusers create subscriptions), and the targets able to reach the
//! sources at the addresses the config gives them.
//!
//! Everything is named `shardline_mv_<run>_<source id>_<target id>`
//! (publication, subscription and slot alike), so what a killed run left
//! can always be found and removed ([`leftovers`], [`remove_leftovers`]).

use crate::db::{Login, OnShard as _, Servers};
use crate::layout::{quote_ident, quote_table, Rebalance};
use anyhow::{bail, Result};
use shardline_config::Node;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// Every object an online move creates starts with this.
pub const PREFIX: &str = "shardline_mv_";

/// Rows moving from one shard to another, kept current by one
/// publication/subscription pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stream {
    pub source: usize,
    pub target: usize,
    /// The publication's, the subscription's and the slot's name.
    pub name: String,
    /// Tables with their row filter; `None` for a reference table (whole).
    pub tables: Vec<(String, Option<String>)>,
}

impl Stream {
    /// The rows of `table` this stream moves, as a WHERE clause that is the
    /// same on source and target.
    pub fn filter(&self, table: &str) -> Option<&str> {
        self.tables
            .iter()
            .find(|(t, _)| t == table)
            .map(|(_, f)| f.as_deref().unwrap_or("true"))
    }
}

/// The streams of a move: one per pair of shards rows can move between
/// (the ring's changed ranges say which; a change of function may move
/// rows between any two), with every sharded table filtered to the rows
/// that pair moves, and the reference tables from the default shard to each
/// added shard.
pub fn streams(r: &Rebalance, run: &str) -> Vec<Stream> {
    let run = short_id(run);
    let mut pairs: Vec<(usize, usize)> = Vec::new();
    if r.ranges_name_every_move() {
        for (_, _, _, from, to) in r.moving_ranges() {
            pairs.push((from, to));
        }
    } else {
        for &s in &r.old_ids {
            for &t in &r.new_ids {
                if s != t {
                    pairs.push((s, t));
                }
            }
        }
    }
    let home = r.home();
    for t in r.added() {
        pairs.push((home, t));
    }
    pairs.sort_unstable();
    pairs.dedup();
    pairs
        .into_iter()
        .map(|(source, target)| {
            let mut tables: Vec<(String, Option<String>)> = r
                .tables()
                .iter()
                .map(|t| (t.name.clone(), Some(r.moves_sql(t, source, target))))
                .collect();
            if source == home && r.added().contains(&target) {
                tables.extend(r.old.reference.iter().map(|t| (t.clone(), None)));
            }
            Stream {
                source,
                target,
                name: format!("{PREFIX}{run}_{source}_{target}"),
                tables,
            }
        })
        .collect()
}

/// Eight hex digits standing for a run id in object names (which Postgres
/// limits to 63 bytes of lowercase letters, digits and underscores).
fn short_id(run: &str) -> String {
    // FNV-1a: stable across builds and platforms.
    let mut h: u32 = 0x811c_9dc5;
    for b in run.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}")
}

/// `CREATE PUBLICATION` for a stream, on its source.
pub fn publication_sql(s: &Stream) -> String {
    let mut sql = format!("CREATE PUBLICATION {} FOR TABLE ", quote_ident(&s.name));
    for (i, (table, filter)) in s.tables.iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&quote_table(table));
        if let Some(f) = filter {
            let _ = write!(sql, " WHERE ({f})");
        }
    }
    sql
}

/// A libpq connection string value, quoted.
fn conninfo_value(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// How a target logs in to a source for the subscription: the source's
/// address as the config gives it, the tool's own login.
pub fn conninfo(node: &Node, login: &Login) -> String {
    let mut s = format!(
        "host={} port={} user={} dbname={} application_name={}",
        conninfo_value(&node.host),
        node.port,
        conninfo_value(&login.user),
        conninfo_value(&login.database),
        conninfo_value("shardline-rebalance-online"),
    );
    if let Some(p) = &login.password {
        let _ = write!(s, " password={}", conninfo_value(p));
    }
    s
}

/// `CREATE SUBSCRIPTION` for a stream, on its target.
pub fn subscription_sql(s: &Stream, conninfo: &str) -> String {
    let name = quote_ident(&s.name);
    format!(
        "CREATE SUBSCRIPTION {name} CONNECTION '{}' PUBLICATION {name} WITH (copy_data = true, create_slot = true, slot_name = '{}', enabled = true)",
        conninfo.replace('\'', "''"),
        s.name
    )
}

/// Checks what online moves need, before anything is created; the error
/// lists every problem with what to do about it.
pub async fn requirements(servers: &Servers, r: &Rebalance, streams: &[Stream]) -> Result<()> {
    let mut problems = Vec::new();
    let mut sources: Vec<usize> = streams.iter().map(|s| s.source).collect();
    sources.sort_unstable();
    sources.dedup();
    let mut targets: Vec<usize> = streams.iter().map(|s| s.target).collect();
    targets.sort_unstable();
    targets.dedup();
    for &id in &sources {
        let c = servers.get(id).await?;
        let row = c
            .query_one(
                "SELECT current_setting('server_version_num')::int4, current_setting('wal_level'),
                    current_setting('max_replication_slots')::int4 - (SELECT count(*) FROM pg_replication_slots)::int4,
                    current_setting('max_wal_senders')::int4 - (SELECT count(*) FROM pg_stat_replication)::int4,
                    (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user)",
                &[],
            )
            .await
            .on(servers, id, "checking the online requirements")?;
        let (version, wal_level, slots, senders, replication): (i32, String, i32, i32, bool) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        let label = servers.label(id);
        let from_here = streams.iter().filter(|s| s.source == id).count() as i32;
        if version < 150000 {
            problems.push(format!("shard {label} runs Postgres {version}: online moves need 15 or later (publication row filters)"));
            continue;
        }
        if wal_level != "logical" {
            problems.push(format!("shard {label} has wal_level = {wal_level}: online moves need wal_level = logical (ALTER SYSTEM SET wal_level = logical, then restart the server)"));
        }
        // A slot per stream, and one per table while its initial copy runs.
        if slots < from_here + 1 {
            problems.push(format!("shard {label} has {slots} free replication slots: the move needs {} (raise max_replication_slots)", from_here + 1));
        }
        if senders < from_here + 1 {
            problems.push(format!("shard {label} has {senders} free WAL senders: the move needs {} (raise max_wal_senders)", from_here + 1));
        }
        if !replication {
            problems.push(format!("the tool's role on shard {label} may not replicate: ALTER ROLE ... REPLICATION (or log in as another role with --user)"));
        }
    }
    for &id in &targets {
        let c = servers.get(id).await?;
        let row = c
            .query_one(
                "SELECT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),
                    current_setting('max_logical_replication_workers')::int4,
                    current_setting('server_version_num')::int4",
                &[],
            )
            .await
            .on(servers, id, "checking the online requirements")?;
        let (superuser, workers, version): (bool, i32, i32) = (row.get(0), row.get(1), row.get(2));
        let label = servers.label(id);
        let into_here = streams.iter().filter(|s| s.target == id).count() as i32;
        if !superuser {
            problems.push(format!("the tool's role on shard {label} is not a superuser: Postgres {} lets only superusers create subscriptions (log in as one with --user)", version / 10000));
        }
        if workers < into_here + 1 {
            problems.push(format!("shard {label} allows {workers} logical replication workers: the move needs {} (raise max_logical_replication_workers and max_worker_processes)", into_here + 1));
        }
    }
    // Filtering updates and deletes needs the key in the old row, which
    // logical replication sends as the replica identity; a table without
    // one could not even be updated on the source once published.
    for s in streams {
        let c = servers.get(s.source).await?;
        for (table, filter) in &s.tables {
            let key = filter.as_ref().and_then(|_| {
                r.tables()
                    .iter()
                    .find(|t| t.name == *table)
                    .map(|t| t.column.clone())
            });
            let row = c
                .query_one(
                    "SELECT c.relreplident::text, coalesce((SELECT array_agg(a.attname::text) FROM pg_index i
                        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                        WHERE i.indrelid = c.oid AND ((c.relreplident = 'd' AND i.indisprimary)
                        OR (c.relreplident = 'i' AND i.indisreplident))), '{}')
                     FROM pg_class c WHERE c.oid = $1::text::regclass",
                    &[&quote_table(table)],
                )
                .await
                .on(servers, s.source, "reading replica identities")?;
            let (identity, columns): (String, Vec<String>) = (row.get(0), row.get(1));
            let fix = format!(
                "ALTER TABLE {} REPLICA IDENTITY FULL, or give it a primary key",
                quote_table(table)
            );
            let label = servers.label(s.source);
            if identity == "f" {
                continue;
            }
            if identity == "n" || columns.is_empty() {
                problems.push(format!("table {table} on shard {label} has no replica identity (no primary key): its updates and deletes cannot be replicated ({fix})"));
            } else if let Some(k) = key {
                if !columns.contains(&k) {
                    problems.push(format!("table {table} on shard {label}: its replica identity ({}) does not include the sharding key {k}, so updates and deletes of moving rows cannot be filtered ({fix} that includes {k})", columns.join(", ")));
                }
            }
        }
    }
    problems.sort();
    problems.dedup();
    if !problems.is_empty() {
        bail!(
            "an online move cannot start:\n  {}\nNothing was changed.",
            problems.join("\n  ")
        );
    }
    Ok(())
}

/// Creates a stream's publication and subscription (what exists already is
/// kept: a rerun continues a stream).
pub async fn start(servers: &Servers, s: &Stream, login: &Login, source: &Node) -> Result<()> {
    create_once(
        servers,
        s.source,
        "SELECT 1 FROM pg_publication WHERE pubname = $1",
        &s.name,
        &publication_sql(s),
        "the publication",
    )
    .await?;
    create_once(
        servers,
        s.target,
        "SELECT 1 FROM pg_subscription WHERE subname = $1",
        &s.name,
        &subscription_sql(s, &conninfo(source, login)),
        "the subscription",
    )
    .await
}

/// Runs `create` on `id` unless `exists` (a query on `name`) finds a row.
async fn create_once(
    servers: &Servers,
    id: usize,
    exists: &str,
    name: &str,
    create: &str,
    what: &str,
) -> Result<()> {
    let c = servers.get(id).await?;
    let found = c
        .query_opt(exists, &[&name])
        .await
        .on(servers, id, &format!("looking for {what}"))?
        .is_some();
    if !found {
        c.batch_execute(create)
            .await
            .on(servers, id, &format!("creating {what}"))?;
    }
    Ok(())
}

/// Makes the target flush each change it applies at its commit, as the
/// cutover nears. A subscription commits asynchronously by default (fast,
/// and safe: the source sends again what was not flushed), so its
/// confirmed position trails what it applied by the target's WAL writer,
/// and waiting for it would hold the paused clients longer.
pub async fn flush_each_commit(servers: &Servers, s: &Stream) -> Result<()> {
    let tgt = servers.get(s.target).await?;
    tgt.batch_execute(&format!(
        "ALTER SUBSCRIPTION {} SET (synchronous_commit = 'on')",
        quote_ident(&s.name)
    ))
    .await
    .on(servers, s.target, "changing the subscription")?;
    Ok(())
}

/// Whether a stream's subscription exists on its target, and if so
/// whether it is enabled (a disabled one was stopped for a cutover).
pub async fn enabled(servers: &Servers, s: &Stream) -> Result<Option<bool>> {
    let tgt = servers.get(s.target).await?;
    Ok(tgt
        .query_opt(
            "SELECT subenabled FROM pg_subscription WHERE subname = $1",
            &[&s.name],
        )
        .await
        .on(servers, s.target, "looking for the subscription")?
        .map(|r| r.get(0)))
}

/// Where a stream stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Tables whose initial copy has not finished.
    pub copying: i64,
    /// Bytes of the source's WAL the target has not confirmed applying.
    pub lag_bytes: i64,
    /// Tables whose copy finished but whose table-sync slot is gone from
    /// the source: on Postgres 15 a restart of the target at the wrong
    /// moment leaves a table so, and its sync worker then fails for good
    /// ("replication slot pg_<sub>_sync_<rel>_<id> does not exist").
    pub stuck: Vec<String>,
    /// Errors the subscription's workers raised so far (initial copies and
    /// apply, `pg_stat_subscription_stats`): each makes a worker exit and
    /// start again, so a cause that stays (a row already on the target, a
    /// constraint the source lacks) repeats forever.
    pub errors: i64,
}

/// A stream's progress, from the target's subscription and the source's slot.
pub async fn progress(servers: &Servers, s: &Stream) -> Result<Progress> {
    let tgt = servers.get(s.target).await?;
    let copying: i64 = tgt
        .query_one(
            "SELECT count(*) FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid
             WHERE s.subname = $1 AND r.srsubstate <> 'r'",
            &[&s.name],
        )
        .await
        .on(servers, s.target, "reading the subscription's state")?
        .get(0);
    let src = servers.get(s.source).await?;
    let lag: Option<i64> = src
        .query_opt(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1",
            &[&s.name],
        )
        .await
        .on(servers, s.source, "reading the replication slot")?
        .and_then(|r| r.get(0));
    let Some(lag_bytes) = lag else {
        bail!(
            "stream {}: the replication slot on shard {} is missing or has not started",
            s.name,
            servers.label(s.source)
        );
    };
    let mut stuck = Vec::new();
    if copying > 0 {
        // A table whose copy is finished ('f') catches up on its own slot
        // until it is synchronized: without that slot it never is.
        for row in tgt
            .query(
                "SELECT r.srrelid::regclass::text, s.oid, r.srrelid FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid
                 WHERE s.subname = $1 AND r.srsubstate = 'f'",
                &[&s.name],
            )
            .await
            .on(servers, s.target, "reading the subscription's state")?
        {
            let (table, sub, rel): (String, u32, u32) = (row.get(0), row.get(1), row.get(2));
            let slots: i64 = src
                .query_one(
                    "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE $1",
                    &[&format!("pg\\_{sub}\\_sync\\_{rel}\\_%")],
                )
                .await
                .on(servers, s.source, "reading the replication slots")?
                .get(0);
            if slots == 0 {
                stuck.push(table);
            }
        }
    }
    let errors: i64 = tgt
        .query_opt(
            "SELECT sync_error_count + apply_error_count FROM pg_stat_subscription_stats WHERE subname = $1",
            &[&s.name],
        )
        .await
        .on(servers, s.target, "reading the subscription's errors")?
        .map_or(0, |r| r.get(0));
    Ok(Progress {
        copying,
        lag_bytes,
        stuck,
        errors,
    })
}

/// A position of the source's WAL at or after every transaction committed
/// so far, and flushed: a walsender streams only flushed WAL, so waiting
/// for an unflushed position would wait for the WAL writer (up to
/// `wal_writer_delay`), and an asynchronous commit's record may lie past
/// the flush position. A transaction with an xid, committed synchronously
/// (the tool's sessions use `synchronous_commit = on`), flushes everything
/// before its commit.
pub async fn current_lsn(servers: &Servers, source: usize) -> Result<String> {
    let c = servers.get(source).await?;
    c.batch_execute("BEGIN; SELECT txid_current(); COMMIT")
        .await
        .on(servers, source, "reading the WAL position")?;
    Ok(c.query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
        .await
        .on(servers, source, "reading the WAL position")?
        .get(0))
}

/// Waits until the target has applied (and flushed) every change of the
/// source up to `lsn`, and every table's initial copy is done.
pub async fn wait_applied(
    servers: &Servers,
    s: &Stream,
    lsn: &str,
    timeout: Duration,
) -> Result<()> {
    let started = Instant::now();
    let src = servers.get(s.source).await?;
    loop {
        let done: Option<bool> = src
            .query_opt(
                "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
                &[&s.name, &lsn],
            )
            .await
            .on(servers, s.source, "reading the replication slot")?
            .and_then(|r| r.get(0));
        if done == Some(true) && progress(servers, s).await?.copying == 0 {
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!(
                "stream {} from shard {} to shard {} did not apply the source's changes up to {lsn} within {:.0} s",
                s.name,
                servers.label(s.source),
                servers.label(s.target),
                timeout.as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Stops applying: the subscription is disabled and its workers gone, so
/// nothing the source does from now on reaches the target. A worker
/// notices a disabled subscription within a second; it is ended at once
/// instead (the launcher starts no other for a disabled subscription).
pub async fn stop(servers: &Servers, s: &Stream, timeout: Duration) -> Result<()> {
    let tgt = servers.get(s.target).await?;
    tgt.batch_execute(&format!(
        "ALTER SUBSCRIPTION {} DISABLE",
        quote_ident(&s.name)
    ))
    .await
    .on(servers, s.target, "disabling the subscription")?;
    let started = Instant::now();
    loop {
        let running: i64 = tgt
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_subscription WHERE subname = $1 AND pid IS NOT NULL",
                &[&s.name],
            )
            .await
            .on(servers, s.target, "waiting for the subscription to stop")?
            .get(0);
        if running == 0 {
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!(
                "the subscription {} on shard {} did not stop within {:.0} s",
                s.name,
                servers.label(s.target),
                timeout.as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// What online moves left on `ids`: subscriptions, slots and publications
/// named with [`PREFIX`], and the slots of their initial copies, as
/// "kind name on shard".
pub async fn leftovers(servers: &Servers, ids: &[usize]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for &id in ids {
        let c = servers.get(id).await?;
        let rows = c
            .query(
                "SELECT 'subscription', subname::text FROM pg_subscription WHERE subname LIKE 'shardline\\_mv\\_%'
                 UNION ALL SELECT 'replication slot', slot_name::text FROM pg_replication_slots
                    WHERE slot_name LIKE 'shardline\\_mv\\_%' OR slot_name LIKE 'pg\\_%\\_sync\\_%'
                 UNION ALL SELECT 'publication', pubname::text FROM pg_publication WHERE pubname LIKE 'shardline\\_mv\\_%'",
                &[],
            )
            .await
            .on(servers, id, "looking for online-move leftovers")?;
        for r in rows {
            out.push(format!(
                "{} {} on shard {}",
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                servers.names[id]
            ));
        }
    }
    Ok(out)
}

/// Removes a stream: its subscription on the target (without touching the
/// source: slots are dropped below), then its slots and publication on the
/// source. Safe to run again, and on what a killed run left.
pub async fn remove(servers: &Servers, s: &Stream) -> Result<()> {
    let tgt = servers.get(s.target).await?;
    let sub: Option<u32> = tgt
        .query_opt(
            "SELECT oid FROM pg_subscription WHERE subname = $1",
            &[&s.name],
        )
        .await
        .on(servers, s.target, "looking for the subscription")?
        .map(|r| r.get(0));
    let src = servers.get(s.source).await?;
    if let Some(oid) = sub {
        drop_subscription(servers, s.target, &s.name).await?;
        drop_slots(servers, s.source, &format!("pg\\_{oid}\\_sync\\_%")).await?;
    }
    drop_slots(servers, s.source, &s.name.replace('_', "\\_")).await?;
    src.batch_execute(&format!(
        "DROP PUBLICATION IF EXISTS {}",
        quote_ident(&s.name)
    ))
    .await
    .on(servers, s.source, "removing the publication")?;
    Ok(())
}

/// Drops subscription `name` on `id` without reaching its source (its
/// slot is detached first; the caller drops the slots on the source).
async fn drop_subscription(servers: &Servers, id: usize, name: &str) -> Result<()> {
    let c = servers.get(id).await?;
    let q = quote_ident(name);
    for sql in [
        format!("ALTER SUBSCRIPTION {q} DISABLE"),
        format!("ALTER SUBSCRIPTION {q} SET (slot_name = NONE)"),
        format!("DROP SUBSCRIPTION {q}"),
    ] {
        c.batch_execute(&sql)
            .await
            .on(servers, id, "removing a subscription")?;
    }
    Ok(())
}

/// Drops the replication slots on `id` whose names are LIKE `pattern`,
/// ending the sender that holds one first.
async fn drop_slots(servers: &Servers, id: usize, pattern: &str) -> Result<()> {
    let c = servers.get(id).await?;
    let started = Instant::now();
    loop {
        let rows = c
            .query(
                "SELECT slot_name::text, active_pid FROM pg_replication_slots WHERE slot_name LIKE $1",
                &[&pattern],
            )
            .await
            .on(servers, id, "reading replication slots")?;
        if rows.is_empty() {
            return Ok(());
        }
        for r in rows {
            let (slot, pid): (String, Option<i32>) = (r.get(0), r.get(1));
            if let Some(pid) = pid {
                let _ = c.execute("SELECT pg_terminate_backend($1)", &[&pid]).await;
                continue;
            }
            // Another session may take or drop it meanwhile: look again.
            let _ = c
                .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await;
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "replication slots LIKE {pattern} on shard {} could not be dropped within 30 s",
                servers.label(id)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Removes everything any online move left on `ids` (subscriptions first,
/// then slots and publications).
pub async fn remove_leftovers(servers: &Servers, ids: &[usize]) -> Result<()> {
    for &id in ids {
        let c = servers.get(id).await?;
        let subs: Vec<(String, u32)> = c
            .query(
                "SELECT subname::text, oid FROM pg_subscription WHERE subname LIKE 'shardline\\_mv\\_%'",
                &[],
            )
            .await
            .on(servers, id, "looking for subscriptions")?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        for (name, _) in &subs {
            drop_subscription(servers, id, name).await?;
        }
        for &other in ids {
            for (_, oid) in &subs {
                drop_slots(servers, other, &format!("pg\\_{oid}\\_sync\\_%")).await?;
            }
        }
    }
    for &id in ids {
        drop_slots(servers, id, "shardline\\_mv\\_%").await?;
        let c = servers.get(id).await?;
        let pubs: Vec<String> = c
            .query(
                "SELECT pubname::text FROM pg_publication WHERE pubname LIKE 'shardline\\_mv\\_%'",
                &[],
            )
            .await
            .on(servers, id, "looking for publications")?
            .into_iter()
            .map(|r| r.get(0))
            .collect();
        for p in pubs {
            c.batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", quote_ident(&p)))
                .await
                .on(servers, id, "removing a publication")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_postgres_identifiers() {
        let id = short_id("0daf20e945acfd39f9dde0d45bba97b4-18a2b3c4d5e6f-1234");
        assert_eq!(id.len(), 8);
        assert_eq!(
            id,
            short_id("0daf20e945acfd39f9dde0d45bba97b4-18a2b3c4d5e6f-1234")
        );
        assert_ne!(
            id,
            short_id("0daf20e945acfd39f9dde0d45bba97b4-18a2b3c4d5e70-1234")
        );
        let name = format!("{PREFIX}{id}_12_13");
        assert!(name.len() <= 63);
        assert!(name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
    }

    #[test]
    fn conninfo_values_are_quoted() {
        let node = Node {
            host: "db.internal".into(),
            port: 5433,
            zone: None,
        };
        let login = Login {
            user: "o'brien".into(),
            password: Some(r"p\w d".into()),
            database: "app".into(),
        };
        assert_eq!(
            conninfo(&node, &login),
            r"host='db.internal' port=5433 user='o\'brien' dbname='app' application_name='shardline-rebalance-online' password='p\\w d'"
        );
        let s = Stream {
            source: 0,
            target: 2,
            name: "shardline_mv_x_0_2".into(),
            tables: vec![
                ("users".into(), Some("id > 1".into())),
                ("countries".into(), None),
            ],
        };
        assert_eq!(
            publication_sql(&s),
            r#"CREATE PUBLICATION "shardline_mv_x_0_2" FOR TABLE "users" WHERE (id > 1), "countries""#
        );
        assert!(subscription_sql(&s, &conninfo(&node, &login)).contains(r"user=''o\''brien''"));
        assert_eq!(s.filter("countries"), Some("true"));
        assert_eq!(s.filter("users"), Some("id > 1"));
        assert_eq!(s.filter("orders"), None);
    }
}
