//! What moves: two configs compared, and each config's placement written as
//! SQL so that the servers select, count and check rows themselves.
//!
//! Placement is the router's (`shardline_router::sharding`): the ring, the
//! other functions and pinned keys are compiled there and only rendered
//! here. A row's *owner* under a config is an SQL expression over its key
//! column giving a shard id, or NULL when the config places the key nowhere
//! (a range or list without it). Shard ids are positions in
//! [`Rebalance::names`], so owners under the old and the new config compare.

use shardline_config::{Config, KeyType, Node};
use shardline_router::hash::{self, KeyValue};
use shardline_router::sharding::{Function, Group, Sharding};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

/// `HASH_PARTITION_SEED` as the `int8` the servers' hash functions take.
pub const SEED_SQL: i64 = hash::SEED as i64;

/// `hash_combine64(0, h) = h + K` (mod 2^64): the row hash of a one-column key.
const ROW_HASH_ADD: u64 = 0x49a0_f4dd_15e5_a8e3;

/// A sharded table and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpec {
    /// As configured (lowercase), `table` or `schema.table`.
    pub name: String,
    pub column: String,
    pub key_type: KeyType,
    /// Index of its group in the router's `Sharding::groups`.
    pub group: usize,
}

impl TableSpec {
    /// The table name quoted for SQL.
    pub fn sql_name(&self) -> String {
        quote_table(&self.name)
    }

    /// The key column's 64-bit hash as the servers compute it, exactly the
    /// value [`KeyValue::hash`] gives (NULL for a NULL key).
    pub fn hash_sql(&self) -> String {
        let col = quote_ident(&self.column);
        match self.key_type {
            KeyType::Bigint => format!("hashint8extended({col}::int8, {SEED_SQL})"),
            KeyType::Text => format!("hashtextextended({col}::text, {SEED_SQL})"),
            KeyType::Uuid => format!("uuid_hash_extended({col}::uuid, {SEED_SQL})"),
        }
    }

    /// Where a row sits in the hash space, for cutting work into chunks:
    /// the key hash, 0 for a NULL key (where the ring puts NULL).
    pub fn position_sql(&self) -> String {
        format!("coalesce({}, 0)", self.hash_sql())
    }
}

/// One group's placement function, as the router compiled it.
#[derive(Debug, Clone, PartialEq)]
enum OwnerFn {
    /// `(first hash, shard)` in signed order, the first at `i64::MIN`.
    Ring(Vec<(i64, usize)>),
    PgHash(usize),
    Range(Vec<(i64, Option<i64>, usize)>),
    List(Vec<(KeyValue, usize)>),
}

/// Which shard a group places a key on, renderable as SQL.
#[derive(Debug, Clone, PartialEq)]
pub struct Owner {
    function: OwnerFn,
    pinned: Vec<(KeyValue, usize)>,
}

impl Owner {
    pub fn of_group(g: &Group) -> Owner {
        let function = match &g.function {
            Function::Ring(ring) => OwnerFn::Ring(signed_segments(&ring.arcs())),
            Function::PgHash { shards } => OwnerFn::PgHash(*shards),
            Function::Range(r) => OwnerFn::Range(r.clone()),
            Function::List(map) => OwnerFn::List(sorted(map.iter())),
        };
        Owner {
            function,
            pinned: sorted(g.pinned.iter()),
        }
    }

    /// The shard (local index) of a key: the same answer as the router's
    /// `Group::shard_of`, computed the way the SQL does.
    pub fn shard_of(&self, key: Option<&KeyValue>) -> Option<usize> {
        if let Some(k) = key {
            if let Some((_, s)) = self.pinned.iter().find(|(v, _)| v == k) {
                return Some(*s);
            }
        }
        match &self.function {
            OwnerFn::Ring(segments) => {
                let h = key.map_or(0, KeyValue::hash) as i64;
                let i = segments.partition_point(|&(start, _)| start <= h);
                Some(segments[i - 1].1)
            }
            OwnerFn::PgHash(n) => Some(match key {
                None => 0,
                Some(k) => (k.hash().wrapping_add(ROW_HASH_ADD) % *n as u64) as usize,
            }),
            OwnerFn::Range(ranges) => match key {
                Some(KeyValue::Int(v)) => ranges
                    .iter()
                    .find(|(lo, hi, _)| lo <= v && hi.is_none_or(|h| *v < h))
                    .map(|r| r.2),
                _ => None,
            },
            OwnerFn::List(values) => {
                key.and_then(|k| values.iter().find(|(v, _)| v == k).map(|(_, s)| *s))
            }
        }
    }

    /// An SQL expression giving the owner's id (`ids[local index]`) for a
    /// row of `table`, or NULL where the config places the key nowhere.
    pub fn sql(&self, table: &TableSpec, ids: &[usize]) -> String {
        let col = quote_ident(&table.column);
        let function = match &self.function {
            OwnerFn::Ring(segments) => {
                let owners: Vec<String> =
                    segments.iter().map(|(_, s)| ids[*s].to_string()).collect();
                format!(
                    "('{{{}}}'::int4[])[{}]",
                    owners.join(","),
                    ring_bucket(table, segments)
                )
            }
            OwnerFn::PgHash(n) => {
                format!(
                    "('{{{}}}'::int4[])[1 + {}]",
                    join_ids(ids, *n),
                    hash_modulo(table, *n)
                )
            }
            OwnerFn::Range(_) | OwnerFn::List(_) => self.case_sql(table, ids),
        };
        if self.pinned.is_empty() {
            function
        } else {
            case_of(&col, &self.pinned, ids, &function)
        }
    }

    /// An SQL condition on a row of `table`: its owner is `id` (NULL where
    /// the config places the key nowhere), the same answer as
    /// `(sql) = id`, written without array subscripts so that a
    /// publication's row filter accepts it.
    pub fn is_sql(&self, table: &TableSpec, ids: &[usize], id: usize) -> String {
        let col = quote_ident(&table.column);
        let one_of = |expr: String, locals: Vec<usize>| {
            let list: Vec<String> = locals.iter().map(usize::to_string).collect();
            format!("{expr} = ANY ('{{{}}}'::int4[])", list.join(","))
        };
        let function = match &self.function {
            OwnerFn::Ring(segments) => one_of(
                ring_bucket(table, segments),
                (0..segments.len())
                    .filter(|&i| ids[segments[i].1] == id)
                    .map(|i| i + 1)
                    .collect(),
            ),
            OwnerFn::PgHash(n) => one_of(
                hash_modulo(table, *n),
                (0..*n).filter(|&k| ids[k] == id).collect(),
            ),
            OwnerFn::Range(_) | OwnerFn::List(_) => {
                format!("({}) = {id}", self.case_sql(table, ids))
            }
        };
        if self.pinned.is_empty() {
            return function;
        }
        let mut s = format!("CASE {col}");
        for (v, shard) in &self.pinned {
            let _ = write!(s, " WHEN {} THEN {}", literal(v), ids[*shard] == id);
        }
        let _ = write!(s, " ELSE {function} END");
        s
    }

    /// Range and list placements as a CASE giving the owner's id.
    fn case_sql(&self, table: &TableSpec, ids: &[usize]) -> String {
        let col = quote_ident(&table.column);
        match &self.function {
            OwnerFn::Range(ranges) => {
                let mut s = String::from("CASE");
                for (lo, hi, shard) in ranges {
                    let _ = write!(s, " WHEN {col} >= {lo}");
                    if let Some(hi) = hi {
                        let _ = write!(s, " AND {col} < {hi}");
                    }
                    let _ = write!(s, " THEN {}", ids[*shard]);
                }
                s.push_str(" END");
                s
            }
            OwnerFn::List(values) => case_of(&col, values, ids, "NULL"),
            OwnerFn::Ring(_) | OwnerFn::PgHash(_) => unreachable!("only range and list are CASEs"),
        }
    }
}

/// The 1-based ring segment a row of `table` falls in.
fn ring_bucket(table: &TableSpec, segments: &[(i64, usize)]) -> String {
    let starts: Vec<String> = segments
        .iter()
        .map(|(start, _)| start.to_string())
        .collect();
    format!(
        "width_bucket({}, '{{{}}}'::int8[])",
        table.position_sql(),
        starts.join(",")
    )
}

/// `pg_hash`'s local shard index of a row of `table`: the row hash as an
/// unsigned 64-bit number, modulo n; a NULL key's row hash is 0.
fn hash_modulo(table: &TableSpec, n: usize) -> String {
    format!(
        "CASE WHEN {} IS NULL THEN 0 ELSE ((({}::numeric + 18446744073709551616 + {ROW_HASH_ADD}) % 18446744073709551616) % {n})::int4 END",
        quote_ident(&table.column),
        table.hash_sql()
    )
}

fn join_ids(ids: &[usize], n: usize) -> String {
    ids[..n]
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn case_of(col: &str, values: &[(KeyValue, usize)], ids: &[usize], otherwise: &str) -> String {
    if values.is_empty() {
        return otherwise.to_string();
    }
    let mut s = format!("CASE {col}");
    for (v, shard) in values {
        let _ = write!(s, " WHEN {} THEN {}", literal(v), ids[*shard]);
    }
    let _ = write!(s, " ELSE {otherwise} END");
    s
}

fn sorted<'a>(it: impl Iterator<Item = (&'a KeyValue, &'a usize)>) -> Vec<(KeyValue, usize)> {
    let mut v: Vec<(KeyValue, usize)> = it.map(|(k, s)| (k.clone(), *s)).collect();
    v.sort_by_key(|(k, _)| literal(k));
    v
}

/// A key as an SQL literal of its type.
pub fn literal(k: &KeyValue) -> String {
    match k {
        KeyValue::Int(v) => v.to_string(),
        KeyValue::Text(t) => format!("'{}'", t.replace('\'', "''")),
        KeyValue::Uuid(_) => format!("'{k}'::uuid"),
    }
}

/// The ring's arcs (unsigned hash order) as segments in the servers'
/// signed `int8` order: `(first hash, shard)`, sorted, the first at
/// `i64::MIN`, adjacent segments of one shard merged.
fn signed_segments(arcs: &[(u64, u64, usize)]) -> Vec<(i64, usize)> {
    const HALF: u64 = 1 << 63;
    let mut starts: Vec<(i64, usize)> = Vec::with_capacity(arcs.len() + 1);
    for &(start, end, shard) in arcs {
        starts.push((start as i64, shard));
        if start < HALF && end >= HALF {
            starts.push((HALF as i64, shard));
        }
    }
    starts.sort_unstable();
    let mut out: Vec<(i64, usize)> = Vec::with_capacity(starts.len());
    for (start, shard) in starts {
        if out.last().is_none_or(|l| l.1 != shard) {
            out.push((start, shard));
        }
    }
    out
}

pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `table` or `schema.table`, each part quoted.
pub fn quote_table(name: &str) -> String {
    name.split('.')
        .map(quote_ident)
        .collect::<Vec<_>>()
        .join(".")
}

/// One config's placement: its shards and every table's owner.
#[derive(Debug, Clone)]
pub struct Placement {
    pub shards: Vec<String>,
    pub primaries: Vec<Node>,
    pub replicas: Vec<Vec<Node>>,
    pub tables: Vec<TableSpec>,
    /// Per group of the router's `Sharding`.
    pub owners: Vec<Owner>,
    pub group_names: Vec<String>,
    pub reference: Vec<String>,
    pub default_shard: String,
    /// The roles the proxies log in to the servers as (`server_user` of
    /// every user).
    pub roles: Vec<String>,
}

impl Placement {
    pub fn new(config: &Config) -> Placement {
        let sharding = Sharding::from_config(config);
        let mut tables: Vec<TableSpec> = config
            .sharding
            .tables
            .iter()
            .map(|t| {
                let rule = sharding.tables[&t.name.to_ascii_lowercase()].clone();
                TableSpec {
                    name: t.name.to_ascii_lowercase(),
                    column: rule.column,
                    key_type: sharding.groups[rule.group].key_type,
                    group: rule.group,
                }
            })
            .collect();
        tables.dedup_by(|a, b| a.name == b.name);
        Placement {
            shards: sharding.shard_names.clone(),
            primaries: config.shards.iter().map(|s| s.primary.clone()).collect(),
            replicas: config.shards.iter().map(|s| s.replicas.clone()).collect(),
            tables,
            owners: sharding.groups.iter().map(Owner::of_group).collect(),
            group_names: sharding.groups.iter().map(|g| g.name.clone()).collect(),
            reference: config
                .reference_tables
                .iter()
                .map(|t| t.name.to_ascii_lowercase())
                .collect(),
            default_shard: sharding.shard_names[sharding.default_shard].clone(),
            roles: config
                .users
                .iter()
                .map(|u| u.server_user().to_string())
                .collect(),
        }
    }

    /// The owner expression of a table, ids being this config's shard indexes.
    pub fn owner_sql(&self, table: &TableSpec) -> String {
        let ids: Vec<usize> = (0..self.shards.len()).collect();
        self.owners[table.group].sql(table, &ids)
    }

    /// `Owner::is_sql` of a table for this config's shard index `shard`.
    pub fn owner_is_sql(&self, table: &TableSpec, shard: usize) -> String {
        let ids: Vec<usize> = (0..self.shards.len()).collect();
        self.owners[table.group].is_sql(table, &ids, shard)
    }
}

/// Two configs compared: the shards of both, and per table the owner under
/// each. Built only when rows can be moved from one placement to the other.
#[derive(Debug, Clone)]
pub struct Rebalance {
    pub old: Placement,
    pub new: Placement,
    /// Every shard of either config: the old ones in order, then new ones.
    pub names: Vec<String>,
    pub primaries: Vec<Node>,
    /// Indexes into `names` of the old and of the new config's shards.
    pub old_ids: Vec<usize>,
    pub new_ids: Vec<usize>,
    /// Identifies this move (both placements and the tables): progress
    /// recorded on the servers belongs to one run.
    pub run: String,
}

impl Rebalance {
    /// Compares the configs. Errors name what cannot be reconciled by
    /// moving rows: tables, key columns, key types, reference tables, the
    /// default shard (home of unsharded tables), or a shard whose primary
    /// moved.
    pub fn new(old_config: &Config, new_config: &Config) -> Result<Rebalance, Vec<String>> {
        let old = Placement::new(old_config);
        let new = Placement::new(new_config);
        let mut problems = Vec::new();

        let mut names = old.shards.clone();
        let mut primaries = old.primaries.clone();
        for (name, node) in new.shards.iter().zip(&new.primaries) {
            match names.iter().position(|n| n == name) {
                Some(i) if primaries[i].host != node.host || primaries[i].port != node.port => {
                    problems.push(format!(
                        "shard {name}: its primary is {} in the old config and {} in the new one; a shard keeps its server across a rebalance (rename the shard if it is a different server)",
                        primaries[i].address(),
                        node.address()
                    ))
                }
                Some(_) => {}
                None => {
                    names.push(name.clone());
                    primaries.push(node.clone());
                }
            }
        }
        let id = |n: &String| names.iter().position(|x| x == n).unwrap_or(0);
        let old_ids: Vec<usize> = old.shards.iter().map(id).collect();
        let new_ids: Vec<usize> = new.shards.iter().map(id).collect();

        let by_name = |p: &Placement| -> BTreeMap<String, TableSpec> {
            p.tables
                .iter()
                .map(|t| (t.name.clone(), t.clone()))
                .collect()
        };
        let (old_tables, new_tables) = (by_name(&old), by_name(&new));
        for (name, t) in &old_tables {
            match new_tables.get(name) {
                None => problems.push(format!(
                    "table {name} is sharded in the old config but not in the new one; a rebalance moves rows of tables sharded in both"
                )),
                Some(n) if n.column != t.column => problems.push(format!(
                    "table {name}: its key column is {} in the old config and {} in the new one; rows cannot be re-keyed by moving them",
                    t.column, n.column
                )),
                Some(n) if n.key_type != t.key_type => problems.push(format!(
                    "table {name}: its key type is {:?} in the old config and {:?} in the new one; the key hashes would differ",
                    t.key_type, n.key_type
                )),
                Some(_) => {}
            }
        }
        for name in new_tables.keys().filter(|n| !old_tables.contains_key(*n)) {
            problems.push(format!(
                "table {name} is sharded in the new config but not in the old one; a rebalance moves rows of tables sharded in both"
            ));
        }
        let old_ref: BTreeSet<&String> = old.reference.iter().collect();
        let new_ref: BTreeSet<&String> = new.reference.iter().collect();
        if old_ref != new_ref {
            problems.push(format!(
                "reference tables differ: {:?} in the old config, {:?} in the new one; keep the same reference tables across a rebalance",
                old_ref, new_ref
            ));
        }
        if old.default_shard != new.default_shard {
            problems.push(format!(
                "the default shard (home of unsharded tables) is {} in the old config and {} in the new one; shardline-rebalance does not move unsharded tables, keep the default shard",
                old.default_shard, new.default_shard
            ));
        }
        if !problems.is_empty() {
            return Err(problems);
        }

        let mut rebalance = Rebalance {
            old,
            new,
            names,
            primaries,
            old_ids,
            new_ids,
            run: String::new(),
        };
        let mut fingerprint = rebalance.names.join(",");
        for t in &rebalance.old.tables {
            let _ = write!(
                fingerprint,
                "|{}.{}:{}:{}",
                t.name,
                t.column,
                rebalance.old_owner_sql(t),
                rebalance.new_owner_sql(t)
            );
        }
        for r in &rebalance.old.reference {
            let _ = write!(fingerprint, "|ref {r}");
        }
        rebalance.run = format!(
            "{:016x}{:016x}",
            hash::hash_bytes(fingerprint.as_bytes(), hash::SEED),
            hash::hash_bytes(fingerprint.as_bytes(), 0)
        );
        Ok(rebalance)
    }

    /// The default shard's id: home of unsharded tables, and the shard
    /// whose table definitions and reference rows are the model.
    pub fn home(&self) -> usize {
        self.names
            .iter()
            .position(|n| *n == self.old.default_shard)
            .unwrap_or(0)
    }

    /// A group's name for people: `default` for the default group.
    pub fn group_name(&self, group: usize) -> String {
        match &self.old.group_names[group] {
            n if n.is_empty() => "default".into(),
            n => n.clone(),
        }
    }

    /// The sharded tables (in the old config's order).
    pub fn tables(&self) -> &[TableSpec] {
        &self.old.tables
    }

    pub fn old_owner_sql(&self, t: &TableSpec) -> String {
        self.old.owners[t.group].sql(t, &self.old_ids)
    }

    pub fn new_owner_sql(&self, t: &TableSpec) -> String {
        let spec = self.new_spec(t);
        self.new.owners[spec.group].sql(spec, &self.new_ids)
    }

    /// The new config's entry for a table of the old one.
    fn new_spec<'t>(&'t self, t: &'t TableSpec) -> &'t TableSpec {
        self.new
            .tables
            .iter()
            .find(|n| n.name == t.name)
            .unwrap_or(t)
    }

    /// A condition (publication row filters accept it): the row of `t` is
    /// owned by `source` under the old config and by `target` under the new.
    pub fn moves_sql(&self, t: &TableSpec, source: usize, target: usize) -> String {
        let spec = self.new_spec(t);
        format!(
            "({}) AND ({})",
            self.old.owners[t.group].is_sql(t, &self.old_ids, source),
            self.new.owners[spec.group].is_sql(spec, &self.new_ids, target)
        )
    }

    /// A condition: the new config places the row of `t` on `id`.
    pub fn new_owner_is_sql(&self, t: &TableSpec, id: usize) -> String {
        let spec = self.new_spec(t);
        self.new.owners[spec.group].is_sql(spec, &self.new_ids, id)
    }

    /// The roles proxies of either config log in to the servers as.
    pub fn proxy_roles(&self) -> Vec<String> {
        let mut roles: Vec<String> = self
            .old
            .roles
            .iter()
            .chain(&self.new.roles)
            .cloned()
            .collect();
        roles.sort();
        roles.dedup();
        roles
    }

    /// The new config's owner of a key, as an id into `names`.
    pub fn new_owner(&self, t: &TableSpec, key: Option<&KeyValue>) -> Option<usize> {
        let spec = self.new_spec(t);
        self.new.owners[spec.group]
            .shard_of(key)
            .map(|s| self.new_ids[s])
    }

    pub fn old_owner(&self, t: &TableSpec, key: Option<&KeyValue>) -> Option<usize> {
        self.old.owners[t.group]
            .shard_of(key)
            .map(|s| self.old_ids[s])
    }

    /// Shards (ids) only the new config has: reference tables are copied there.
    pub fn added(&self) -> Vec<usize> {
        self.new_ids
            .iter()
            .copied()
            .filter(|i| !self.old_ids.contains(i))
            .collect()
    }

    /// Shards (ids) only the old config has: all their rows leave.
    pub fn removed(&self) -> Vec<usize> {
        self.old_ids
            .iter()
            .copied()
            .filter(|i| !self.new_ids.contains(i))
            .collect()
    }

    /// The new config's owner of the old config's group `g` (matched by
    /// name), if the new config has that group.
    fn new_owner_of_group(&self, g: usize) -> Option<&Owner> {
        let name = &self.old.group_names[g];
        self.new
            .group_names
            .iter()
            .position(|n| n == name)
            .map(|i| &self.new.owners[i])
    }

    /// Whether [`Rebalance::moving_ranges`] names every pair of shards rows
    /// move between: every group is on the ring in both configs, with the
    /// same pinned keys.
    pub fn ranges_name_every_move(&self) -> bool {
        self.old.owners.iter().enumerate().all(|(g, old)| {
            let Some(new) = self.new_owner_of_group(g) else {
                return false;
            };
            matches!(
                (&old.function, &new.function),
                (OwnerFn::Ring(_), OwnerFn::Ring(_))
            ) && old.pinned == new.pinned
        })
    }

    /// Hash ranges that change owner, for groups on the ring in both
    /// configs: `(group, first hash, last hash, from id, to id)` over the
    /// signed hash order, adjacent ranges of one move merged.
    pub fn moving_ranges(&self) -> Vec<(usize, i64, i64, usize, usize)> {
        let mut out: Vec<(usize, i64, i64, usize, usize)> = Vec::new();
        for (g, old) in self.old.owners.iter().enumerate() {
            let Some(new) = self.new_owner_of_group(g) else {
                continue;
            };
            let (OwnerFn::Ring(a), OwnerFn::Ring(b)) = (&old.function, &new.function) else {
                continue;
            };
            let mut bounds: Vec<i64> = a.iter().chain(b).map(|s| s.0).collect();
            bounds.sort_unstable();
            bounds.dedup();
            let owner =
                |segs: &[(i64, usize)], h: i64| segs[segs.partition_point(|&(s, _)| s <= h) - 1].1;
            for (i, &start) in bounds.iter().enumerate() {
                let end = bounds.get(i + 1).map_or(i64::MAX, |n| n - 1);
                let from = self.old_ids[owner(a, start)];
                let to = self.new_ids[owner(b, start)];
                if from == to {
                    continue;
                }
                match out.last_mut() {
                    Some((lg, _, e, f, t))
                        if *lg == g && *f == from && *t == to && e.wrapping_add(1) == start =>
                    {
                        *e = end
                    }
                    _ => out.push((g, start, end, from, to)),
                }
            }
        }
        out
    }
}

/// The signed hash space cut into `count` contiguous chunks that cover it.
pub fn chunk_bounds(count: u32) -> Vec<(i64, i64)> {
    let count = count.max(1) as i128;
    let span = (i64::MAX as i128 - i64::MIN as i128 + 1) / count;
    (0..count)
        .map(|i| {
            let lo = i64::MIN as i128 + i * span;
            let hi = if i == count - 1 {
                i64::MAX as i128
            } else {
                lo + span - 1
            };
            (lo as i64, hi as i64)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn config(shards: &[&str], extra: &str) -> Config {
        let mut text =
            String::from("[[users]]\nname = \"app\"\npassword = \"app\"\ndatabase = \"app\"\n");
        for (i, s) in shards.iter().enumerate() {
            let _ = write!(
                text,
                "[[shards]]\nname = \"{s}\"\nprimary = {{ host = \"127.0.0.1\", port = {} }}\n",
                5400 + i
            );
        }
        text.push_str(extra);
        Config::from_toml(&text, "t.toml").unwrap_or_else(|e| panic!("{e}"))
    }

    const TABLES: &str = "[sharding]\n[[sharding.tables]]\nname = \"users\"\ncolumn = \"id\"\n[[sharding.tables]]\nname = \"orders\"\ncolumn = \"user_id\"\n[[reference_tables]]\nname = \"countries\"\n";

    fn keys() -> impl Iterator<Item = KeyValue> {
        let ints =
            (-500i64..500).map(|i| KeyValue::Int(i.wrapping_mul(0x9E37_79B9_7F4A_7C15u64 as i64)));
        let texts = (0..500).map(|i| KeyValue::Text(format!("key-{i}")));
        let extremes = [i64::MIN, i64::MAX, 0, -1, 1]
            .into_iter()
            .map(KeyValue::Int);
        ints.chain(texts).chain(extremes)
    }

    #[test]
    fn owner_agrees_with_the_router_for_every_function() {
        let configs = [
            TABLES.to_string(),
            TABLES.replace("[sharding]\n", "[sharding]\nfunction = \"pg_hash\"\n"),
            TABLES.replace("[sharding]\n", "[sharding]\npinned = [{ key = 7, shard = \"s2\" }, { key = -3, shard = \"s0\" }]\nvnodes = 16\n"),
            TABLES.replace(
                "[sharding]\n",
                "[sharding]\nfunction = \"range\"\nranges = [{ shard = \"s0\", to = 0 }, { shard = \"s1\", from = 0, to = 100 }, { shard = \"s2\", from = 100 }]\n",
            ),
            TABLES.replace(
                "[sharding]\n",
                "[sharding]\nfunction = \"list\"\nlists = [{ shard = \"s1\", values = [1, 2, 3] }, { shard = \"s2\", values = [-7] }]\n",
            ),
        ];
        for text in configs {
            let c = config(&["s0", "s1", "s2"], &text);
            let sharding = Sharding::from_config(&c);
            let owner = Owner::of_group(&sharding.groups[0]);
            for k in keys() {
                let k = match (&sharding.groups[0].function, k) {
                    (Function::Range(_) | Function::List(_), KeyValue::Text(_)) => continue,
                    (_, k) => k,
                };
                assert_eq!(
                    owner.shard_of(Some(&k)),
                    sharding.groups[0].shard_of(Some(&k)).ok(),
                    "{k:?} under {text}"
                );
            }
            assert_eq!(owner.shard_of(None), sharding.groups[0].shard_of(None).ok());
        }
    }

    #[test]
    fn signed_segments_cover_the_ring() {
        for n in 1..6 {
            let names: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
            let ring =
                shardline_router::sharding::Ring::new(names.iter().map(|s| (s.as_str(), 1.0)), 64);
            let segments = signed_segments(&ring.arcs());
            assert_eq!(segments[0].0, i64::MIN);
            assert!(segments
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 != w[1].1));
            for h in [0u64, 1, u64::MAX, 1 << 63, (1 << 63) - 1]
                .into_iter()
                .chain((0..2000u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
            {
                let i = segments.partition_point(|&(s, _)| s <= h as i64);
                assert_eq!(segments[i - 1].1, ring.shard_of_hash(h), "hash {h}");
            }
        }
    }

    #[test]
    fn growing_moves_keys_only_to_the_new_shard() {
        let old = config(&["s0", "s1"], TABLES);
        let new = config(&["s0", "s1", "s2"], TABLES);
        let r = Rebalance::new(&old, &new).unwrap();
        assert_eq!(r.names, ["s0", "s1", "s2"]);
        assert_eq!(r.added(), [2]);
        let ranges = r.moving_ranges();
        assert!(!ranges.is_empty());
        let share: f64 = ranges
            .iter()
            .map(|m| (m.2 as i128 - m.1 as i128 + 1) as f64)
            .sum::<f64>()
            / 2f64.powi(64);
        assert!(
            ranges.len() <= 256 && (0.25..0.42).contains(&share),
            "{} ranges, {share}",
            ranges.len()
        );
        assert!(ranges.iter().all(|m| m.4 == 2 && m.3 != 2));
        let t = &r.tables()[0];
        let (mut moved, mut total) = (0, 0);
        for k in (0..30_000i64).map(KeyValue::Int) {
            let (from, to) = (r.old_owner(t, Some(&k)), r.new_owner(t, Some(&k)));
            total += 1;
            if from != to {
                moved += 1;
                assert_eq!(to, Some(2));
                let h = k.hash() as i64;
                assert!(ranges
                    .iter()
                    .any(|m| m.1 <= h && h <= m.2 && Some(m.3) == from));
            }
        }
        let share = moved as f64 / total as f64;
        assert!((0.25..0.42).contains(&share), "{share}");
        // Shrinking back moves the same keys the other way; same configs, same run.
        let back = Rebalance::new(&new, &old).unwrap();
        assert_eq!(back.removed(), [2]);
        assert!(back.moving_ranges().iter().all(|m| m.3 == 2));
        assert_eq!(r.run, Rebalance::new(&old, &new).unwrap().run);
        assert_ne!(r.run, back.run);
    }

    #[test]
    fn refuses_what_moving_rows_cannot_reconcile() {
        let old = config(&["s0", "s1"], TABLES);
        let cases = [
            (
                TABLES.replace("column = \"user_id\"", "column = \"uid\""),
                "key column",
            ),
            (
                TABLES.replace("[sharding]\n", "[sharding]\nkey_type = \"text\"\n"),
                "key type",
            ),
            (
                TABLES.replace("name = \"countries\"", "name = \"currencies\""),
                "reference tables differ",
            ),
            (
                TABLES.replace(
                    "[[sharding.tables]]\nname = \"orders\"\ncolumn = \"user_id\"\n",
                    "",
                ),
                "not in the new one",
            ),
            (
                TABLES.replace("[sharding]\n", "[sharding]\ndefault_shard = \"s1\"\n"),
                "default shard",
            ),
        ];
        for (text, expect) in cases {
            let new = config(&["s0", "s1", "s2"], &text);
            let err = Rebalance::new(&old, &new).unwrap_err().join("\n");
            assert!(err.contains(expect), "{expect}: {err}");
        }
        // A shard whose server changed.
        let mut moved = config(&["s0", "s1"], TABLES);
        moved.shards[1].primary.port = 6000;
        let err = Rebalance::new(&old, &moved).unwrap_err().join("\n");
        assert!(err.contains("shard s1: its primary is"), "{err}");
        // Removing the default shard.
        let new = config(&["s1"], TABLES);
        let err = Rebalance::new(&old, &new).unwrap_err().join("\n");
        assert!(err.contains("default shard"), "{err}");
    }

    #[test]
    fn changing_the_function_is_a_rebalance_too() {
        let old = config(&["s0", "s1"], TABLES);
        let new = config(
            &["s0", "s1"],
            &TABLES.replace("[sharding]\n", "[sharding]\nfunction = \"pg_hash\"\n"),
        );
        let r = Rebalance::new(&old, &new).unwrap();
        let sql = r.new_owner_sql(&r.tables()[0]);
        assert!(sql.contains("18446744073709551616"), "{sql}");
        assert!(
            r.moving_ranges().is_empty(),
            "ranges are listed for ring-to-ring moves only"
        );
    }

    #[test]
    fn chunks_cover_the_hash_space_once() {
        for n in [1u32, 2, 3, 7, 64, 1000] {
            let c = chunk_bounds(n);
            assert_eq!(c.len(), n as usize);
            assert_eq!(c[0].0, i64::MIN);
            assert_eq!(c.last().unwrap().1, i64::MAX);
            assert!(c
                .windows(2)
                .all(|w| w[0].1 + 1 == w[1].0 && w[0].0 <= w[0].1));
        }
    }

    #[test]
    fn sql_literals_and_names_are_quoted() {
        assert_eq!(literal(&KeyValue::Text("o'k".into())), "'o''k'");
        assert_eq!(quote_table("app.Users"), "\"app\".\"Users\"");
        let u = hash::parse_uuid("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").unwrap();
        assert_eq!(
            literal(&KeyValue::Uuid(u)),
            "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid"
        );
    }
}
