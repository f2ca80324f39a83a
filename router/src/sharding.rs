//! Which shard owns a key: the sharding functions (consistent-hash ring,
//! `pg_hash`, range, list), pinned keys, and the table map (sharded tables by
//! group, reference tables), compiled once from the config.
//!
//! Everything here is deterministic from the config alone, so every proxy
//! and `shardline-rebalance` compute the same placement.

use crate::hash::{self, KeyValue};
use shardline_config::{Config, KeyLiteral, KeyType, ShardGroup, ShardingFunction};
use std::collections::HashMap;

/// A set of shards, one bit per shard index (at most 64 shards).
pub type ShardMask = u64;

pub fn mask_of(shard: usize) -> ShardMask {
    1u64 << shard
}

/// The indexes of the shards in a mask, ascending.
pub fn shards_in(mask: ShardMask) -> impl Iterator<Item = usize> {
    (0..64).filter(move |i| mask & (1u64 << i) != 0)
}

/// A ring of virtual nodes over the 64-bit key hash.
///
/// Shard `s` with weight `w` owns `round(vnodes × w)` points (at least one;
/// none at weight 0: a shard that holds pinned keys only),
/// at `hash_bytes("<name>#<i>")`. A key belongs to the first point at or
/// after its hash, wrapping around. Adding a shard only adds points, so keys
/// move only to the new shard; removing one moves only its keys.
///
/// Finding a hash's point starts from a table over the hash's top bits
/// (`starts`): the first point of each of a power-of-two number of equal
/// slices of the hash space, about one point per slice, so a lookup
/// compares a point or two instead of searching the whole ring.
#[derive(Debug, Clone)]
pub struct Ring {
    points: Vec<(u64, u16)>,
    /// `starts[b]`: the index of the first point at or after slice `b`'s
    /// first hash (`b << shift`); one more entry, `points.len()`, ends the
    /// last slice.
    starts: Vec<u32>,
    shift: u32,
}

impl Ring {
    pub fn new<'a>(shards: impl IntoIterator<Item = (&'a str, f64)>, vnodes: u32) -> Ring {
        let mut points = Vec::new();
        for (index, (name, weight)) in shards.into_iter().enumerate() {
            let count = if weight == 0.0 {
                0
            } else {
                ((vnodes as f64 * weight).round() as u64).max(1)
            };
            for i in 0..count {
                let position = hash::hash_bytes(format!("{name}#{i}").as_bytes(), hash::SEED);
                points.push((position, index as u16));
            }
        }
        // Ties (vanishingly rare) resolve by shard index, deterministically.
        points.sort_unstable();
        // About one point per slice, at most 2^16 slices.
        let bits = points.len().next_power_of_two().trailing_zeros().min(16);
        let shift = 64 - bits;
        let mut starts = Vec::with_capacity((1 << bits) + 1);
        for b in 0..(1u64 << bits) {
            let first = b.checked_shl(shift).unwrap_or(0);
            starts.push(points.partition_point(|&(p, _)| p < first) as u32);
        }
        starts.push(points.len() as u32);
        Ring {
            points,
            starts,
            shift,
        }
    }

    pub fn shard_of_hash(&self, h: u64) -> usize {
        // (`shift` is 64 for a ring of at most one point: slice 0.)
        let b = h.checked_shr(self.shift).unwrap_or(0) as usize;
        let (lo, hi) = (self.starts[b] as usize, self.starts[b + 1] as usize);
        let i = lo + self.points[lo..hi].partition_point(|&(p, _)| p < h);
        // (No points at all: every weight 0, which the config refuses.)
        self.points
            .get(i)
            .or(self.points.first())
            .map_or(0, |&(_, shard)| shard as usize)
    }

    /// The ring as arcs: `(start, end, shard)` where hashes in `start..=end`
    /// belong to `shard`; the first arc starts at 0 and the last ends at
    /// `u64::MAX` (the wrap-around split in two). Adjacent arcs of one shard
    /// are merged.
    pub fn arcs(&self) -> Vec<(u64, u64, usize)> {
        let mut out: Vec<(u64, u64, usize)> = Vec::new();
        let mut start = 0u64;
        for &(p, s) in &self.points {
            push_arc(&mut out, start, p, s as usize);
            if p == u64::MAX {
                return out;
            }
            start = p + 1;
        }
        let Some(&(_, first)) = self.points.first() else {
            return vec![(0, u64::MAX, 0)];
        };
        let first = first as usize;
        push_arc(&mut out, start, u64::MAX, first);
        out
    }
}

fn push_arc(out: &mut Vec<(u64, u64, usize)>, start: u64, end: u64, shard: usize) {
    if start > end {
        return;
    }
    match out.last_mut() {
        Some(last) if last.2 == shard && last.1.wrapping_add(1) == start => last.1 = end,
        _ => out.push((start, end, shard)),
    }
}

#[derive(Debug, Clone)]
pub enum Function {
    Ring(Ring),
    /// Row hash modulo the shard count.
    PgHash {
        shards: usize,
    },
    /// `(from, to, shard)`: keys in `from..to` (no `to`: no upper bound).
    Range(Vec<(i64, Option<i64>, usize)>),
    List(HashMap<KeyValue, usize>),
}

/// Tables placed alike (co-located by their keys).
#[derive(Debug, Clone)]
pub struct Group {
    /// Its place in `Sharding::groups` (0: the default group).
    pub index: usize,
    pub name: String,
    pub key_type: KeyType,
    pub function: Function,
    pub pinned: HashMap<KeyValue, usize>,
}

impl Group {
    /// The shard owning `key` (`None`: a NULL key). Errors when a range or
    /// list function has no entry for the key.
    pub fn shard_of(&self, key: Option<&KeyValue>) -> Result<usize, String> {
        // (Most groups pin no key: no hashing of the key for an empty map.)
        if let Some(&s) = key
            .filter(|_| !self.pinned.is_empty())
            .and_then(|k| self.pinned.get(k))
        {
            return Ok(s);
        }
        match &self.function {
            // NULL hashes as 0, as native partitioning's row hash does.
            Function::Ring(r) => Ok(r.shard_of_hash(key.map_or(0, KeyValue::hash))),
            Function::PgHash { shards } => Ok((hash::row_hash([key]) % *shards as u64) as usize),
            Function::Range(ranges) => {
                let v = match key {
                    Some(KeyValue::Int(v)) => *v,
                    _ => {
                        return Err(format!(
                            "no range of group {} holds key {key:?}",
                            self.label()
                        ))
                    }
                };
                ranges
                    .iter()
                    .find(|(lo, hi, _)| *lo <= v && hi.is_none_or(|h| v < h))
                    .map(|r| r.2)
                    .ok_or_else(|| format!("no range of group {} holds key {v}", self.label()))
            }
            Function::List(map) => key
                .and_then(|k| map.get(k).copied())
                .ok_or_else(|| format!("no list of group {} holds key {key:?}", self.label())),
        }
    }

    /// The group's name as shown (`default` for the default group).
    pub fn label(&self) -> &str {
        if self.name.is_empty() {
            "default"
        } else {
            &self.name
        }
    }

    /// A key as the column type reads it from text (a literal or a text
    /// parameter). `None` when the server would reject it anyway.
    pub fn key_from_text(&self, text: &str) -> Option<KeyValue> {
        match self.key_type {
            KeyType::Bigint => int8_from_text(text).map(KeyValue::Int),
            KeyType::Text => Some(KeyValue::Text(text.to_string())),
            KeyType::Uuid => hash::parse_uuid(text).map(KeyValue::Uuid),
        }
    }

    /// A key from a binary-format parameter.
    pub fn key_from_binary(&self, b: &[u8]) -> Option<KeyValue> {
        match self.key_type {
            KeyType::Bigint => match b.len() {
                2 => Some(KeyValue::Int(i16::from_be_bytes([b[0], b[1]]) as i64)),
                4 => Some(KeyValue::Int(i32::from_be_bytes(b.try_into().ok()?) as i64)),
                8 => Some(KeyValue::Int(i64::from_be_bytes(b.try_into().ok()?))),
                _ => None,
            },
            KeyType::Text => std::str::from_utf8(b)
                .ok()
                .map(|s| KeyValue::Text(s.into())),
            KeyType::Uuid => b.try_into().ok().map(KeyValue::Uuid),
        }
    }

    fn literal(&self, k: &KeyLiteral) -> Option<KeyValue> {
        match k {
            KeyLiteral::Int(v) => Some(KeyValue::Int(*v)),
            KeyLiteral::Text(t) => self.key_from_text(t),
        }
    }
}

/// An integer key read from text as `str::parse` reads it, after
/// trimming: plain digits with an optional minus sign (what constants and
/// drivers' text parameters almost always are) are read in one pass, and
/// anything else goes the general way.
fn int8_from_text(text: &str) -> Option<i64> {
    plain_int(text.as_bytes()).or_else(|| text.trim().parse().ok())
}

/// An integer written plainly (`42`, `-42`: up to 18 digits, no sign but
/// `-`, no spaces), read from its bytes; `None` for any other text, which
/// the general parse then reads.
pub(crate) fn plain_int(b: &[u8]) -> Option<i64> {
    match b {
        [b'-', digits @ ..] => plain_digits(digits).map(|v| -v),
        _ => plain_digits(b),
    }
}

/// `digits` as a number when they are 1 to 18 ASCII digits (which cannot
/// overflow an i64), in one pass; `None` for anything else.
pub(crate) fn plain_digits(digits: &[u8]) -> Option<i64> {
    if digits.is_empty() || digits.len() > 18 {
        return None;
    }
    let mut v = 0i64;
    for &d in digits {
        let x = d.wrapping_sub(b'0');
        if x > 9 {
            return None;
        }
        v = v * 10 + i64::from(x);
    }
    Some(v)
}

/// A sharded table: its group and key column (lowercase).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRule {
    pub group: usize,
    pub column: String,
}

/// What the router knows about tables and shards.
#[derive(Debug, Clone)]
pub struct Sharding {
    pub shard_names: Vec<String>,
    /// `[0]` is the default group.
    pub groups: Vec<Group>,
    /// Sharded tables by name (lowercase, unqualified and as configured).
    pub tables: HashMap<String, TableRule>,
    pub reference: std::collections::HashSet<String>,
    pub default_shard: usize,
    pub broadcast_writes: bool,
}

impl Sharding {
    pub fn from_config(c: &Config) -> Sharding {
        let shard_names: Vec<String> = c.shards.iter().map(|s| s.name.clone()).collect();
        let index = |name: &str| shard_names.iter().position(|n| n == name).unwrap_or(0);
        let build = |g: &ShardGroup| {
            let mut group = Group {
                index: 0,
                name: g.name.clone(),
                key_type: g.key_type,
                function: Function::PgHash { shards: 1 },
                pinned: HashMap::new(),
            };
            group.function = match g.function {
                ShardingFunction::Consistent => Function::Ring(Ring::new(
                    c.shards.iter().map(|s| (s.name.as_str(), s.weight)),
                    g.vnodes,
                )),
                ShardingFunction::PgHash => Function::PgHash {
                    shards: c.shards.len(),
                },
                ShardingFunction::Range => Function::Range(
                    g.ranges
                        .iter()
                        .map(|r| (r.from.unwrap_or(i64::MIN), r.to, index(&r.shard)))
                        .collect(),
                ),
                ShardingFunction::List => Function::List(
                    g.lists
                        .iter()
                        .flat_map(|l| l.values.iter().map(move |v| (v, index(&l.shard))))
                        .filter_map(|(v, s)| group.literal(v).map(|k| (k, s)))
                        .collect(),
                ),
            };
            group.pinned = g
                .pinned
                .iter()
                .filter_map(|p| group.literal(&p.key).map(|k| (k, index(&p.shard))))
                .collect();
            group
        };
        let mut groups = vec![build(&c.sharding.default_group())];
        groups.extend(c.sharding.groups.iter().map(build));
        for (i, g) in groups.iter_mut().enumerate() {
            g.index = i;
        }
        let mut tables = HashMap::new();
        for t in &c.sharding.tables {
            let group = t
                .group
                .as_ref()
                .and_then(|g| c.sharding.groups.iter().position(|x| &x.name == g))
                .map_or(0, |i| i + 1);
            let rule = TableRule {
                group,
                column: t.column.to_ascii_lowercase(),
            };
            tables.insert(t.name.to_ascii_lowercase(), rule);
        }
        let reference = c
            .reference_tables
            .iter()
            .map(|t| t.name.to_ascii_lowercase())
            .collect();
        Sharding {
            default_shard: c.sharding.default_shard.as_deref().map_or(0, index),
            shard_names,
            groups,
            tables,
            reference,
            broadcast_writes: c.sharding.broadcast_writes,
        }
    }

    pub fn shard_count(&self) -> usize {
        self.shard_names.len()
    }

    pub fn all_shards(&self) -> ShardMask {
        if self.shard_names.len() >= 64 {
            u64::MAX
        } else {
            (1u64 << self.shard_names.len()) - 1
        }
    }

    pub fn shard_index(&self, name: &str) -> Option<usize> {
        self.shard_names.iter().position(|n| n == name)
    }

    /// How a table (`name` or `schema.name`, lowercase) is placed. A
    /// configured `users` matches any schema's `users`; a configured
    /// `app.users` only that spelling.
    pub fn table(&self, name: &str) -> TableKind {
        let short = name.rsplit('.').next().unwrap_or(name);
        for n in [name, short] {
            if let Some(rule) = self.tables.get(n) {
                return TableKind::Sharded(rule.clone());
            }
            if self.reference.contains(n) {
                return TableKind::Reference;
            }
        }
        TableKind::Unsharded
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableKind {
    Sharded(TableRule),
    Reference,
    Unsharded,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(n: usize, vnodes: u32) -> Ring {
        let names: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
        Ring::new(names.iter().map(|s| (s.as_str(), 1.0)), vnodes)
    }

    /// The ring's lookup table finds what a search of the whole ring
    /// finds: at every point, beside it, at both ends, for rings of one
    /// point to thousands.
    #[test]
    fn the_slice_table_finds_the_point_a_full_search_finds() {
        let searched = |r: &Ring, h: u64| {
            let i = r.points.partition_point(|&(p, _)| p < h);
            r.points
                .get(i)
                .or(r.points.first())
                .map_or(0, |p| p.1 as usize)
        };
        let rings = [
            Ring::new([("only", 0.001)], 1),
            Ring::new([("a", 1.0), ("b", 1.0)], 1),
            Ring::new([("a", 1.0), ("b", 0.0), ("c", 2.0)], 3),
            ring(2, 256),
            ring(5, 100),
            ring(16, 1000),
        ];
        for r in &rings {
            let mut probes = vec![0, 1, u64::MAX, u64::MAX - 1, 1 << 63];
            for &(p, _) in &r.points {
                probes.extend([p, p.wrapping_sub(1), p.wrapping_add(1)]);
            }
            probes.extend(keys().take(20_000));
            for h in probes {
                assert_eq!(
                    r.shard_of_hash(h),
                    searched(r, h),
                    "hash {h:#x}, {} points",
                    r.points.len()
                );
            }
        }
    }

    #[test]
    fn an_integer_key_reads_as_str_parse_reads_it() {
        let g = |t: &str| int8_from_text(t);
        for t in [
            "0",
            "-0",
            "7",
            "007",
            "-42",
            "123456789012345678",
            "-123456789012345678",
            "9223372036854775807",
            "-9223372036854775808",
            "9223372036854775808",
            "99999999999999999999",
            " 12 ",
            "+5",
            "-",
            "",
            "1.5",
            "1e3",
            "12a",
            "--1",
            "٣",
            "1_000",
            "0x10",
        ] {
            assert_eq!(g(t), t.trim().parse::<i64>().ok(), "{t:?}");
        }
    }

    fn keys() -> impl Iterator<Item = u64> {
        (0..100_000i64).map(|k| KeyValue::Int(k).hash())
    }

    #[test]
    fn adding_a_shard_moves_about_one_in_n_plus_one_and_only_to_it() {
        for n in 2..=8 {
            let (before, after) = (ring(n, 256), ring(n + 1, 256));
            let mut moved = 0;
            for h in keys() {
                let (a, b) = (before.shard_of_hash(h), after.shard_of_hash(h));
                if a != b {
                    assert_eq!(b, n, "a key moved between old shards");
                    moved += 1;
                }
            }
            let share = moved as f64 / 100_000.0;
            let expected = 1.0 / (n + 1) as f64;
            assert!(
                (share - expected).abs() < 0.25 * expected,
                "{n} → {}: moved {share:.3}, expected about {expected:.3}",
                n + 1
            );
        }
    }

    #[test]
    fn removing_a_shard_moves_only_its_keys() {
        let before = ring(4, 256);
        let after = Ring::new([("s0", 1.0), ("s1", 1.0), ("s3", 1.0)], 256);
        let renumber = [0, 1, usize::MAX, 2];
        for h in keys() {
            let a = before.shard_of_hash(h);
            if a != 2 {
                assert_eq!(after.shard_of_hash(h), renumber[a]);
            }
        }
    }

    /// With 256 virtual nodes, each shard's share is within 20% of its
    /// weight's share (the stated tolerance).
    #[test]
    fn weights_are_respected() {
        for weights in [[1.0, 1.0, 1.0], [1.0, 2.0, 1.0], [0.5, 1.0, 3.0]] {
            let r = Ring::new(
                [("a", weights[0]), ("b", weights[1]), ("c", weights[2])],
                256,
            );
            let mut counts = [0u32; 3];
            for h in keys() {
                counts[r.shard_of_hash(h)] += 1;
            }
            let total: f64 = weights.iter().sum();
            for i in 0..3 {
                let share = counts[i] as f64 / 100_000.0;
                let expected = weights[i] / total;
                assert!(
                    (share - expected).abs() < 0.2 * expected,
                    "weights {weights:?}: shard {i} has {share:.3}, expected {expected:.3}"
                );
            }
        }
    }

    /// A shard of weight 0 owns no point: adding it moves no key, and it
    /// holds only the keys pinned to it.
    #[test]
    fn a_shard_of_weight_zero_holds_only_pinned_keys() {
        let before = ring(2, 64);
        let after = Ring::new([("s0", 1.0), ("s1", 1.0), ("hot", 0.0)], 64);
        for h in keys() {
            assert_eq!(after.shard_of_hash(h), before.shard_of_hash(h));
        }
        assert!(after.arcs().iter().all(|a| a.2 != 2));
        let mut group = Group {
            index: 0,
            name: String::new(),
            key_type: KeyType::Bigint,
            function: Function::Ring(after),
            pinned: HashMap::new(),
        };
        group.pinned.insert(KeyValue::Int(42), 2);
        assert_eq!(group.shard_of(Some(&KeyValue::Int(42))), Ok(2));
        assert_ne!(group.shard_of(Some(&KeyValue::Int(43))), Ok(2));
    }

    #[test]
    fn arcs_cover_the_ring_and_agree_with_lookup() {
        let r = ring(3, 16);
        let arcs = r.arcs();
        assert_eq!(arcs[0].0, 0);
        assert_eq!(arcs.last().unwrap().1, u64::MAX);
        for w in arcs.windows(2) {
            assert_eq!(w[0].1 + 1, w[1].0);
        }
        for h in keys().take(10_000) {
            let arc = arcs.iter().find(|a| a.0 <= h && h <= a.1).unwrap();
            assert_eq!(arc.2, r.shard_of_hash(h));
        }
    }

    #[test]
    fn same_names_same_ring() {
        let (a, b) = (ring(5, 64), ring(5, 64));
        for h in keys().take(1000) {
            assert_eq!(a.shard_of_hash(h), b.shard_of_hash(h));
        }
    }
}
