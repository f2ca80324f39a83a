//! The servers: one small pool per shard primary, and the queries the
//! commands share (catalog checks, counts, checksums, table definitions).

use crate::layout::{quote_ident, quote_table};
use anyhow::{anyhow, bail, Context as _, Result};
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use shardline_config::{Config, Node};
use std::time::Duration;
use tokio_postgres::NoTls;

/// Who the tool logs in as on every primary.
#[derive(Debug, Clone)]
pub struct Login {
    pub user: String,
    pub password: Option<String>,
    pub database: String,
}

impl Login {
    /// The overrides, else `[health]`'s login, else the first user's server
    /// role and database (as the proxy's health checks do).
    pub fn resolve(
        config: &Config,
        user: Option<String>,
        password: Option<String>,
        database: Option<String>,
    ) -> Result<Login> {
        let first = config.users.first();
        let h = &config.health;
        let user = user
            .or_else(|| h.user.clone())
            .or_else(|| first.map(|u| u.server_user().to_string()))
            .context("no user to log in to the servers as: pass --user")?;
        let password = password
            .or_else(|| h.password.clone())
            .or_else(|| first.and_then(|u| u.server_password().map(str::to_string)));
        let database = database
            .or_else(|| h.database.clone())
            .or_else(|| first.map(|u| u.database.clone()))
            .context("no database: pass --database")?;
        Ok(Login {
            user,
            password,
            database,
        })
    }
}

impl Login {
    /// Connection settings for one server.
    fn config(&self, node: &Node, timeout: Duration) -> tokio_postgres::Config {
        let mut pg = tokio_postgres::Config::new();
        pg.host(&node.host)
            .port(node.port)
            .user(&self.user)
            .dbname(&self.database)
            .application_name("shardline-rebalance")
            .connect_timeout(timeout);
        if let Some(p) = &self.password {
            pg.password(p);
        }
        pg
    }
}

/// Settings that make row text identical on every server (checksums hash
/// each row's text form).
/// `synchronous_commit = on`: a delete receipt the tool saw committed is on
/// disk, whatever the server's default (a receipt lost in a crash would
/// leave rows on two shards). A lock held by someone else fails the
/// statement after `LOCK_TIMEOUT` instead of stalling the run unseen.
const SESSION_OPTIONS: &str = "-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=3 -c bytea_output=hex -c statement_timeout=0 -c lock_timeout=30s -c synchronous_commit=on";

/// How long a statement of the tool waits for a lock (as in `SESSION_OPTIONS`).
const LOCK_TIMEOUT: &str = "30s";

/// A pool per shard primary, by shard id.
pub struct Servers {
    pub names: Vec<String>,
    pub addresses: Vec<String>,
    pools: Vec<Option<Pool>>,
}

impl Servers {
    /// Connects to the primaries of `ids` (indexes into `names`) and checks
    /// each answers; the error lists every one that does not.
    pub async fn connect(
        names: &[String],
        primaries: &[Node],
        ids: &[usize],
        login: &Login,
    ) -> Result<Servers> {
        let mut pools = vec![None; names.len()];
        let mut failures = Vec::new();
        for &id in ids {
            let node = &primaries[id];
            let mut pg = login.config(node, Duration::from_secs(5));
            pg.options(SESSION_OPTIONS);
            let manager = Manager::from_config(
                pg,
                NoTls,
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            let pool = Pool::builder(manager).max_size(4).build()?;
            match pool.get().await {
                Ok(c) => match c.simple_query("SELECT 1").await {
                    Ok(_) => pools[id] = Some(pool),
                    Err(e) => failures.push(format!(
                        "shard {} ({}): {}",
                        names[id],
                        node.address(),
                        describe(&e)
                    )),
                },
                Err(e) => {
                    // The server answered (a refused login, an unknown
                    // database) or did not (down, wrong address).
                    let answered = matches!(&e, deadpool_postgres::PoolError::Backend(b) if b.as_db_error().is_some());
                    failures.push(format!(
                        "shard {} ({}) {}: {}",
                        names[id],
                        node.address(),
                        if answered {
                            "refused the tool's login"
                        } else {
                            "is unreachable"
                        },
                        pool_error(&e)
                    ))
                }
            }
        }
        if !failures.is_empty() {
            bail!("{}", failures.join("\n"));
        }
        Ok(Servers {
            names: names.to_vec(),
            addresses: primaries.iter().map(Node::address).collect(),
            pools,
        })
    }

    pub async fn get(&self, id: usize) -> Result<Object> {
        let pool = self.pools[id]
            .as_ref()
            .ok_or_else(|| anyhow!("shard {} is not connected", self.names[id]))?;
        pool.get()
            .await
            .map_err(|e| anyhow!("shard {}: {}", self.names[id], pool_error(&e)))
    }

    /// "shard NAME (host:port)", for messages.
    pub fn label(&self, id: usize) -> String {
        format!("{} ({})", self.names[id], self.addresses[id])
    }
}

/// Replicas (of the given shards) that do not answer: `shard (host:port):
/// why`. The tool writes only to primaries, so these are warnings.
pub async fn unreachable_replicas(
    names: &[String],
    replicas: &[Vec<Node>],
    login: &Login,
) -> Vec<String> {
    let mut out = Vec::new();
    for (name, nodes) in names.iter().zip(replicas) {
        for node in nodes {
            if let Err(e) = login
                .config(node, Duration::from_secs(3))
                .connect(NoTls)
                .await
            {
                out.push(format!(
                    "replica of shard {name} ({}): {}",
                    node.address(),
                    describe(&e)
                ));
            }
        }
    }
    out
}

/// Waits at most `timeout` until the replica at `node` has replayed its
/// primary's WAL up to `lsn` (a server no longer in recovery counts as
/// done); the error says why not: it does not answer, or how far it got.
pub async fn replayed(
    node: &Node,
    login: &Login,
    lsn: &str,
    timeout: Duration,
) -> std::result::Result<(), String> {
    let started = std::time::Instant::now();
    let (c, conn) = login
        .config(node, Duration::from_secs(2))
        .connect(NoTls)
        .await
        .map_err(|e| describe(&e))?;
    let conn = tokio::spawn(conn);
    let result = loop {
        match c
            .query_one(
                "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, true), coalesce(pg_last_wal_replay_lsn()::text, '')",
                &[&lsn],
            )
            .await
        {
            Ok(row) if row.get::<_, bool>(0) => break Ok(()),
            Ok(row) if started.elapsed() > timeout => {
                break Err(format!(
                    "it replayed up to {} of {lsn} in {:.0} s",
                    row.get::<_, String>(1),
                    timeout.as_secs_f64()
                ))
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(2)).await,
            Err(e) => break Err(describe(&e)),
        }
    };
    drop(c);
    conn.abort();
    result
}

/// A server error with its SQLSTATE and detail, or the client error.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(d) = db.detail() {
                s.push_str(": ");
                s.push_str(d);
            }
            if db.code() == &tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE {
                s.push_str(&format!(
                    ". Another session held a lock the tool waited {LOCK_TIMEOUT} for (were writes stopped?); see who with: SELECT pid, usename, application_name, state, query FROM pg_stat_activity WHERE cardinality(pg_blocking_pids(pid)) > 0 OR pid IN (SELECT unnest(pg_blocking_pids(pid)) FROM pg_stat_activity)"
                ));
            }
            s
        }
        None => {
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(inner) = source {
                s.push_str(": ");
                s.push_str(&inner.to_string());
                source = inner.source();
            }
            s
        }
    }
}

fn pool_error(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => describe(e),
        other => other.to_string(),
    }
}

/// Context for a query error: which shard, what was being done.
pub trait OnShard<T> {
    fn on(self, servers: &Servers, id: usize, what: &str) -> Result<T>;
}

impl<T> OnShard<T> for std::result::Result<T, tokio_postgres::Error> {
    fn on(self, servers: &Servers, id: usize, what: &str) -> Result<T> {
        self.map_err(|e| anyhow!("{what} on shard {}: {}", servers.label(id), describe(&e)))
    }
}

/// A column as the catalog describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub type_name: String,
    /// `GENERATED ... STORED`: not copied, the target computes it.
    pub generated: bool,
    /// Its type (a domain's base type) has a default hash operator class
    /// of its own, so [`RowHash::Record`] can hash it.
    pub hashable: bool,
}

/// A table's columns in order, or `None` when the table does not exist.
pub async fn columns(
    client: &Object,
    table: &str,
) -> Result<Option<Vec<Column>>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attgenerated <> '',
                    to_regprocedure('hash_record_extended(record,bigint)') IS NOT NULL
                    AND EXISTS (SELECT 1 FROM pg_type t
                                  JOIN pg_opclass o ON o.opcintype = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
                                  JOIN pg_am m ON m.oid = o.opcmethod AND m.amname = 'hash'
                                  JOIN pg_amproc p ON p.amprocfamily = o.opcfamily AND p.amprocnum = 2
                                 WHERE t.oid = a.atttypid AND o.opcdefault)
               FROM pg_attribute a
              WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum",
            &[&quote_table(table)],
        )
        .await?;
    if rows.is_empty() {
        let exists: Option<u32> = client
            .query_one("SELECT to_regclass($1)::oid", &[&quote_table(table)])
            .await?
            .get(0);
        if exists.is_none() {
            return Ok(None);
        }
    }
    Ok(Some(
        rows.iter()
            .map(|r| Column {
                name: r.get(0),
                type_name: r.get(1),
                generated: r.get(2),
                hashable: r.get(3),
            })
            .collect(),
    ))
}

/// The columns COPY moves (every stored, non-generated column), quoted.
pub fn copy_list(cols: &[Column]) -> String {
    cols.iter()
        .filter(|c| !c.generated)
        .map(|c| quote_ident(&c.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Differences between a table's columns on two servers, readable.
pub fn column_differences(source: &[Column], target: &[Column]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, c) in source.iter().enumerate() {
        match target.get(i) {
            None => out.push(format!("column {} ({}) is missing", c.name, c.type_name)),
            Some(t) if t.name != c.name => out.push(format!(
                "column {} is {} there (columns must be in the same order)",
                i + 1,
                t.name
            )),
            Some(t) if t.type_name != c.type_name => out.push(format!(
                "column {} is {} there, {} here",
                c.name, t.type_name, c.type_name
            )),
            Some(t) if t.generated != c.generated => {
                out.push(format!("column {} is generated on one side only", c.name))
            }
            Some(_) => {}
        }
    }
    for c in target.iter().skip(source.len()) {
        out.push(format!(
            "column {} ({}) is extra there",
            c.name, c.type_name
        ));
    }
    out
}

/// How a checksum hashes each row. The checksum's text says which
/// ([`RowHash::of_checksum`]), so a sum recorded by one is compared with a
/// sum of the same kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowHash {
    /// The row's text (`ROW(...)::text`), hashed: any column type; equal
    /// means the same text.
    Text,
    /// `hash_record_extended` over the row, each column by its type's hash
    /// function: about twice as fast (most of a checksum's cost is the
    /// row's text); equal means equal values (`1.0` and `1.00` hash alike,
    /// as they compare equal). For tables whose columns all have one.
    Record,
}

/// What starts a [`RowHash::Record`] checksum.
const RECORD_TAG: &str = "r";

impl RowHash {
    /// The fastest kind every moved column of a table allows.
    pub fn for_columns(cols: &[Column]) -> RowHash {
        if cols.iter().filter(|c| !c.generated).all(|c| c.hashable) {
            RowHash::Record
        } else {
            RowHash::Text
        }
    }

    /// The kind a checksum this module computed was made with.
    pub fn of_checksum(sum: &str) -> RowHash {
        if sum.starts_with(RECORD_TAG) {
            RowHash::Record
        } else {
            RowHash::Text
        }
    }

    /// One row's hash: its moved columns.
    pub fn row_sql(self, cols: &[Column]) -> String {
        match self {
            RowHash::Text => format!("hashtextextended(ROW({})::text, 0)", copy_list(cols)),
            RowHash::Record => format!("hash_record_extended(ROW({}), 0)", copy_list(cols)),
        }
    }

    /// The checksum of the row hashes `h` (a column or expression).
    fn sum_sql(self, h: &str) -> String {
        match self {
            RowHash::Text => format!("coalesce(sum({h}), 0)::text"),
            RowHash::Record => format!("'{RECORD_TAG}' || coalesce(sum({h}), 0)::text"),
        }
    }
}

/// `(rows, checksum)` of the rows of `table` matching `filter`: a sum of
/// each row's hash, so the order rows are read in does not matter and
/// a duplicated or changed row shows.
pub fn checksum_sql(table: &str, cols: &[Column], filter: &str) -> String {
    let hash = RowHash::for_columns(cols);
    format!(
        "SELECT count(*), {} FROM {} WHERE {filter}",
        hash.sum_sql(&hash.row_sql(cols)),
        quote_table(table)
    )
}

/// One row's hash, as [`checksum_sql`] sums it.
pub fn row_hash_sql(cols: &[Column]) -> String {
    RowHash::for_columns(cols).row_sql(cols)
}

/// Deletes the rows of `table` matching `filter` and returns their
/// `(rows, checksum)` as [`checksum_sql`] computes it with `hash`, in one
/// statement: what was deleted is exactly what was summed.
pub fn delete_checksum_sql(table: &str, cols: &[Column], filter: &str, hash: RowHash) -> String {
    format!(
        "WITH shardline_deleted AS (DELETE FROM {} WHERE {filter} RETURNING {} AS h) SELECT count(*), {} FROM shardline_deleted",
        quote_table(table),
        hash.row_sql(cols),
        hash.sum_sql("h")
    )
}

pub async fn checksum(
    client: &Object,
    table: &str,
    cols: &[Column],
    filter: &str,
) -> Result<(i64, String), tokio_postgres::Error> {
    let row = client
        .query_one(&checksum_sql(table, cols, filter), &[])
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// A table's primary key columns in key order (empty without one), and
/// whether any foreign key references the table.
pub async fn key_and_referenced(
    client: &Object,
    table: &str,
) -> Result<(Vec<String>, bool), tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT coalesce((SELECT array_agg(a.attname::text ORDER BY k.n)
                                FROM pg_index i
                                CROSS JOIN unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
                                JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                               WHERE i.indrelid = to_regclass($1) AND i.indisprimary), '{}'),
                    EXISTS (SELECT 1 FROM pg_constraint
                             WHERE contype = 'f' AND confrelid = to_regclass($1))",
            &[&quote_table(table)],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// Foreign keys between the given tables on one server: `(child, parent)`
/// as indexes into `tables`.
pub async fn foreign_keys(
    client: &Object,
    tables: &[String],
) -> Result<Vec<(usize, usize)>, tokio_postgres::Error> {
    let names: Vec<String> = tables.iter().map(|t| quote_table(t)).collect();
    let rows = client
        .query(
            "SELECT c.i::int4, p.i::int4
               FROM pg_constraint k
               JOIN unnest($1::text[]) WITH ORDINALITY AS c(name, i) ON to_regclass(c.name) = k.conrelid
               JOIN unnest($1::text[]) WITH ORDINALITY AS p(name, i) ON to_regclass(p.name) = k.confrelid
              WHERE k.contype = 'f' AND k.conrelid <> k.confrelid",
            &[&names],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<_, i32>(0) as usize - 1,
                r.get::<_, i32>(1) as usize - 1,
            )
        })
        .collect())
}

/// Foreign keys from tables outside `known` into one of `sharded`:
/// `(referencing table, constraint, referenced table)`. Deleting moved rows
/// would cascade into such a table (or fail), so a rebalance refuses them.
pub async fn outside_references(
    client: &Object,
    sharded: &[String],
    known: &[String],
) -> Result<Vec<(String, String, String)>, tokio_postgres::Error> {
    let quoted = |v: &[String]| v.iter().map(|t| quote_table(t)).collect::<Vec<_>>();
    let rows = client
        .query(
            "SELECT k.conrelid::regclass::text, k.conname::text, p.i::int4
               FROM pg_constraint k
               JOIN unnest($1::text[]) WITH ORDINALITY AS p(name, i) ON to_regclass(p.name) = k.confrelid
              WHERE k.contype = 'f'
                AND NOT EXISTS (SELECT 1 FROM unnest($2::text[]) AS c(name)
                                 WHERE to_regclass(c.name) = k.conrelid)",
            &[&quoted(sharded), &quoted(known)],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let parent = sharded[r.get::<_, i32>(2) as usize - 1].clone();
            (r.get(0), r.get(1), parent)
        })
        .collect())
}

/// Tables ordered so that a table comes after the tables it references
/// (config order otherwise). Cycles keep config order.
pub fn parents_first(count: usize, edges: &[(usize, usize)]) -> Vec<usize> {
    let mut order = Vec::with_capacity(count);
    let mut placed = vec![false; count];
    while order.len() < count {
        let next = (0..count)
            .find(|&t| {
                !placed[t]
                    && edges
                        .iter()
                        .all(|&(child, parent)| child != t || parent == t || placed[parent])
            })
            .or_else(|| (0..count).find(|&t| !placed[t]));
        let Some(t) = next else { break };
        placed[t] = true;
        order.push(t);
    }
    order
}

/// Statements recreating a table as the source has it: sequences its
/// defaults use, columns, defaults, identity, constraints and indexes.
/// Foreign keys are created too, so referenced tables must exist first.
pub async fn definition(
    client: &Object,
    table: &str,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let name = quote_table(table);
    let mut out = Vec::new();
    if let Some((schema, _)) = table.split_once('.') {
        out.push(format!(
            "CREATE SCHEMA IF NOT EXISTS {}",
            quote_ident(schema)
        ));
    }
    let sequences = client
        .query(
            "SELECT DISTINCT s.oid::regclass::text
               FROM pg_attrdef ad
               JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
               JOIN pg_class s ON s.oid = d.refobjid AND s.relkind = 'S'
              WHERE ad.adrelid = to_regclass($1)",
            &[&name],
        )
        .await?;
    for s in &sequences {
        out.push(format!(
            "CREATE SEQUENCE IF NOT EXISTS {}",
            s.get::<_, String>(0)
        ));
    }
    let cols = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                    pg_get_expr(d.adbin, d.adrelid), a.attidentity::text, a.attgenerated::text
               FROM pg_attribute a
               LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
              WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum",
            &[&name],
        )
        .await?;
    let mut defs: Vec<String> = Vec::new();
    for c in &cols {
        let mut d = format!("{} {}", quote_ident(c.get(0)), c.get::<_, String>(1));
        let default: Option<String> = c.get(3);
        let identity: String = c.get(4);
        let generated: String = c.get(5);
        match (identity.as_str(), generated.as_str(), default) {
            ("a", _, _) => d.push_str(" GENERATED ALWAYS AS IDENTITY"),
            ("d", _, _) => d.push_str(" GENERATED BY DEFAULT AS IDENTITY"),
            (_, "s", Some(expr)) => d.push_str(&format!(" GENERATED ALWAYS AS ({expr}) STORED")),
            (_, _, Some(expr)) => d.push_str(&format!(" DEFAULT {expr}")),
            _ => {}
        }
        if c.get::<_, bool>(2) {
            d.push_str(" NOT NULL");
        }
        defs.push(d);
    }
    let constraints = client
        .query(
            "SELECT conname::text, pg_get_constraintdef(oid)
               FROM pg_constraint
              WHERE conrelid = to_regclass($1) AND contype IN ('p', 'u', 'c', 'x', 'f')
              ORDER BY contype = 'f', conname",
            &[&name],
        )
        .await?;
    for c in &constraints {
        defs.push(format!(
            "CONSTRAINT {} {}",
            quote_ident(c.get(0)),
            c.get::<_, String>(1)
        ));
    }
    out.push(format!("CREATE TABLE {name} ({})", defs.join(", ")));
    let indexes = client
        .query(
            "SELECT pg_get_indexdef(i.indexrelid)
               FROM pg_index i
              WHERE i.indrelid = to_regclass($1)
                AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)",
            &[&name],
        )
        .await?;
    out.extend(indexes.iter().map(|r| r.get::<_, String>(0)));
    Ok(out)
}

/// Rows of a table on one server that have the same owners under two
/// placements (`None`: placed nowhere).
#[derive(Debug, Clone, Copy)]
pub struct OwnerCount {
    pub old: Option<i32>,
    pub new: Option<i32>,
    pub rows: i64,
    pub bytes: i64,
}

impl OwnerCount {
    /// Rows on shard `id` that an earlier run moved there: the new config
    /// places them on `id`, and nothing more moves there from their old
    /// shard (`moving`, from [`moving_pairs`]).
    pub fn moved_to(&self, id: usize, moving: &[(i32, i32)]) -> bool {
        self.new == Some(id as i32)
            && self
                .old
                .is_some_and(|from| !moving.contains(&(from, id as i32)))
    }
}

/// The (old owner, new owner) pairs with rows still to move: rows on their
/// old owner (`ids[i]` holds `counts[i]`) that the new config places on
/// another shard.
pub fn moving_pairs(ids: &[usize], counts: &[Vec<OwnerCount>]) -> Vec<(i32, i32)> {
    ids.iter()
        .zip(counts)
        .flat_map(|(&id, counts)| {
            counts.iter().filter_map(move |c| match (c.old, c.new) {
                (Some(from), Some(to)) if from == id as i32 && to != from && c.rows > 0 => {
                    Some((from, to))
                }
                _ => None,
            })
        })
        .collect()
}

/// Rows of `table` on one server grouped by their owner under two
/// placements.
pub async fn owner_counts(
    client: &Object,
    table: &str,
    old_owner: &str,
    new_owner: &str,
) -> Result<Vec<OwnerCount>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT {old_owner}, {new_owner}, count(*), coalesce(sum(pg_column_size(shardline_row.*)), 0)::int8
           FROM {} shardline_row GROUP BY 1, 2",
        quote_table(table)
    );
    Ok(client
        .query(&sql, &[])
        .await?
        .iter()
        .map(|r| OwnerCount {
            old: r.get(0),
            new: r.get(1),
            rows: r.get(2),
            bytes: r.get(3),
        })
        .collect())
}

/// Which of `ids` have `table`: `(present, missing)`.
pub async fn present_on(
    servers: &Servers,
    ids: &[usize],
    table: &str,
) -> Result<(Vec<usize>, Vec<usize>)> {
    let (mut present, mut missing) = (Vec::new(), Vec::new());
    for &id in ids {
        let c = servers.get(id).await?;
        match columns(&c, table)
            .await
            .on(servers, id, "reading the catalog")?
        {
            Some(_) => present.push(id),
            None => missing.push(id),
        }
    }
    Ok((present, missing))
}

/// [`owner_counts`] of one table on several shards at once (one query per
/// shard, concurrently): the results in the order of `ids`.
pub async fn owner_counts_on(
    servers: &Servers,
    ids: &[usize],
    table: &str,
    old_owner: &str,
    new_owner: &str,
) -> Result<Vec<Vec<OwnerCount>>> {
    let what = format!("counting rows of {table}");
    let work = ids.iter().map(|&id| {
        let what = &what;
        async move {
            let c = servers.get(id).await?;
            owner_counts(&c, table, old_owner, new_owner)
                .await
                .on(servers, id, what)
        }
    });
    futures_util::future::try_join_all(work).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_come_first() {
        // 0 references 2, 1 references 0; 3 is alone.
        assert_eq!(parents_first(4, &[(0, 2), (1, 0)]), vec![2, 0, 1, 3]);
        // A cycle keeps config order.
        assert_eq!(parents_first(2, &[(0, 1), (1, 0)]), vec![0, 1]);
        assert_eq!(parents_first(3, &[]), vec![0, 1, 2]);
    }

    #[test]
    fn checksums_say_how_rows_were_hashed() {
        let col = |n: &str, hashable: bool, generated: bool| Column {
            name: n.into(),
            type_name: "t".into(),
            generated,
            hashable,
        };
        let all = [col("id", true, false), col("g", false, true)];
        assert_eq!(RowHash::for_columns(&all), RowHash::Record);
        let sql = checksum_sql("t", &all, "true");
        assert!(
            sql.contains("'r' || coalesce(sum(hash_record_extended(ROW(\"id\"), 0)), 0)::text"),
            "{sql}"
        );
        let some = [col("id", true, false), col("doc", false, false)];
        assert_eq!(RowHash::for_columns(&some), RowHash::Text);
        assert!(checksum_sql("t", &some, "true")
            .contains("coalesce(sum(hashtextextended(ROW(\"id\", \"doc\")::text, 0)), 0)::text"));
        // A delete sums as the checksum it is compared with was made.
        let d = delete_checksum_sql("t", &all, "true", RowHash::Text);
        assert!(
            d.contains("RETURNING hashtextextended(ROW(\"id\")::text, 0) AS h"),
            "{d}"
        );
        assert_eq!(RowHash::of_checksum("r-12"), RowHash::Record);
        assert_eq!(RowHash::of_checksum("-12"), RowHash::Text);
        assert_eq!(RowHash::of_checksum("0"), RowHash::Text);
    }

    #[test]
    fn column_differences_are_named() {
        let c = |n: &str, t: &str| Column {
            name: n.into(),
            type_name: t.into(),
            generated: false,
            hashable: true,
        };
        let source = [c("id", "bigint"), c("name", "text")];
        assert!(column_differences(&source, &source).is_empty());
        let d = column_differences(&source, &[c("id", "integer")]);
        assert_eq!(
            d,
            [
                "column id is integer there, bigint here",
                "column name (text) is missing"
            ]
        );
        let d = column_differences(
            &source,
            &[c("id", "bigint"), c("name", "text"), c("x", "int")],
        );
        assert_eq!(d, ["column x (int) is extra there"]);
    }
}

/// A run recorded in `shardline.rebalance_runs` on a shard.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecordedRun {
    pub shard: String,
    pub run: String,
    /// The fingerprint of the configs it moves between (`Rebalance::run`).
    pub placement: String,
    pub state: String,
    pub started: String,
}

/// The runs recorded on the shards `ids` (none where the table is absent).
pub async fn recorded_runs(servers: &Servers, ids: &[usize]) -> Result<Vec<RecordedRun>> {
    let mut out = Vec::new();
    for &id in ids {
        let c = servers.get(id).await?;
        let what = "reading recorded progress";
        let exists: bool = c
            .query_one(
                "SELECT to_regclass('shardline.rebalance_runs') IS NOT NULL",
                &[],
            )
            .await
            .on(servers, id, what)?
            .get(0);
        if !exists {
            continue;
        }
        for row in c
            .query(
                "SELECT run, placement, state, started::text FROM shardline.rebalance_runs ORDER BY started",
                &[],
            )
            .await
            .on(servers, id, what)?
        {
            out.push(RecordedRun {
                shard: servers.names[id].clone(),
                run: row.get(0),
                placement: row.get(1),
                state: row.get(2),
                started: row.get(3),
            });
        }
    }
    Ok(out)
}

/// What `definition` does not carry over for `table`: grants, row-level
/// security, partitioning, column collations other than the default, and
/// triggers (named as a person would look for them).
pub async fn not_copied(
    client: &Object,
    table: &str,
) -> Result<Vec<&'static str>, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT c.relacl IS NOT NULL, c.relrowsecurity, c.relkind = 'p',
                    EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0
                             AND NOT a.attisdropped AND a.attcollation NOT IN (0, 100)),
                    EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal)
               FROM pg_class c WHERE c.oid = to_regclass($1)",
            &[&quote_table(table)],
        )
        .await?;
    let names = [
        "grants",
        "row-level security",
        "partitioning",
        "column collations",
        "triggers",
    ];
    Ok((0..names.len())
        .filter(|&i| row.get::<_, bool>(i))
        .map(|i| names[i])
        .collect())
}
