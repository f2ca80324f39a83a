//! The hot-key report: which sharding keys take the most traffic, per table
//! group, over a sliding window, in fixed memory whatever the key space.
//!
//! Each table group's keys go into a Space-Saving sketch (Metwally, Agrawal
//! and El Abbadi, 2005): [`CAPACITY`] counters; a key not counted takes the
//! smallest counter's place and inherits its count as its error. A key with
//! more than 1/[`CAPACITY`] of a group's traffic is always among those
//! counted, and its count is over by at most its error.
//!
//! The window is cut into [`SLICES`] slices, and every slice has its own
//! sketches in each of a few stripes; a session records into its client's
//! stripe (a lock other sessions seldom want: no global lock per
//! statement). A report merges the window's slices of every stripe.

use shardline_router::hash::KeyValue;
use shardline_router::shards::KeySeen;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Counters per table group, slice and stripe.
pub const CAPACITY: usize = 128;
/// Slices of the window; the report covers the last `SLICES - 1` whole ones
/// and the current one.
pub const SLICES: u64 = 6;

type Index = HashMap<KeyValue, u16, foldhash::fast::FixedState>;

/// One counted key.
#[derive(Debug, Clone)]
struct Counter {
    key: KeyValue,
    shard: u16,
    count: u64,
    /// How much of `count` may belong to the keys it replaced.
    error: u64,
    /// Where the counter is in `Sketch::heap`.
    at: u16,
}

/// A Space-Saving sketch: counters in stable slots, a min-heap of slot
/// numbers by count, and an index from key to slot.
#[derive(Default)]
struct Sketch {
    slots: Vec<Counter>,
    heap: Vec<u16>,
    index: Index,
}

impl Sketch {
    fn clear(&mut self) {
        self.slots.clear();
        self.heap.clear();
        self.index.clear();
    }

    fn is_full(&self) -> bool {
        self.slots.len() >= CAPACITY
    }

    /// The smallest count (0 while a counter is free): at most what a key
    /// not counted has had.
    fn floor(&self) -> u64 {
        match self.heap.first() {
            Some(&slot) if self.is_full() => self.slots[slot as usize].count,
            _ => 0,
        }
    }

    fn add(&mut self, key: &KeyValue, shard: usize) {
        let shard = shard.min(u16::MAX as usize) as u16;
        if let Some(&slot) = self.index.get(key) {
            let c = &mut self.slots[slot as usize];
            c.count += 1;
            let at = c.at as usize;
            self.sift_down(at);
            return;
        }
        if !self.is_full() {
            let slot = self.slots.len() as u16;
            let at = self.heap.len();
            self.slots.push(Counter {
                key: key.clone(),
                shard,
                count: 1,
                error: 0,
                at: at as u16,
            });
            self.heap.push(slot);
            self.index.insert(key.clone(), slot);
            self.sift_up(at);
            return;
        }
        // The least counted key gives its counter up.
        let slot = self.heap[0];
        let c = &mut self.slots[slot as usize];
        let old = std::mem::replace(&mut c.key, key.clone());
        c.shard = shard;
        c.error = c.count;
        c.count += 1;
        self.index.remove(&old);
        self.index.insert(key.clone(), slot);
        self.sift_down(0);
    }

    fn count_at(&self, at: usize) -> u64 {
        self.slots[self.heap[at] as usize].count
    }

    fn swap(&mut self, a: usize, b: usize) {
        self.heap.swap(a, b);
        self.slots[self.heap[a] as usize].at = a as u16;
        self.slots[self.heap[b] as usize].at = b as u16;
    }

    fn sift_up(&mut self, mut at: usize) {
        while at > 0 {
            let parent = (at - 1) / 2;
            if self.count_at(parent) <= self.count_at(at) {
                break;
            }
            self.swap(parent, at);
            at = parent;
        }
    }

    fn sift_down(&mut self, mut at: usize) {
        loop {
            let (l, r) = (2 * at + 1, 2 * at + 2);
            let mut least = at;
            if l < self.heap.len() && self.count_at(l) < self.count_at(least) {
                least = l;
            }
            if r < self.heap.len() && self.count_at(r) < self.count_at(least) {
                least = r;
            }
            if least == at {
                return;
            }
            self.swap(at, least);
            at = least;
        }
    }
}

/// One slice of the window in one stripe.
#[derive(Default)]
struct Slice {
    /// Which slice of time this is (ms since start / slice length).
    epoch: u64,
    /// By table group.
    groups: Vec<Sketch>,
    /// Keys counted by table group.
    totals: Vec<u64>,
    /// Keys counted by the shard that owns them.
    shards: Vec<u64>,
}

impl Slice {
    fn reset(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.groups.iter_mut().for_each(Sketch::clear);
        self.totals.iter_mut().for_each(|t| *t = 0);
        self.shards.iter_mut().for_each(|t| *t = 0);
    }
}

/// The sharding keys routed by, counted per table group over a sliding
/// window.
pub struct HotKeys {
    start: Instant,
    slice: Duration,
    groups: usize,
    shards: usize,
    stripes: Box<[Mutex<Vec<Slice>>]>,
}

/// A key in the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HotKey {
    pub key: KeyValue,
    pub shard: usize,
    /// Statements placed by the key in the window (an estimate: the true
    /// number is within `error` below it, or above it by as much when the
    /// key was not always counted).
    pub count: u64,
    pub error: u64,
}

/// What the window holds.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// How much time the report covers.
    pub covered: Duration,
    /// By table group: keys counted, and the keys by count (most first).
    pub groups: Vec<(u64, Vec<HotKey>)>,
    /// Keys counted by the shard that owns them.
    pub shards: Vec<u64>,
}

impl Report {
    /// Keys counted in every group.
    pub fn total(&self) -> u64 {
        self.shards.iter().sum()
    }
}

impl HotKeys {
    /// Counting over `window` (`None` when it is 0: off), for `groups`
    /// table groups over `shards` shards.
    pub fn new(window: Duration, groups: usize, shards: usize) -> Option<HotKeys> {
        if window.is_zero() {
            return None;
        }
        let stripes = std::thread::available_parallelism()
            .map_or(2, |n| n.get() * 2)
            .clamp(2, 16);
        Some(HotKeys {
            start: Instant::now(),
            slice: (window / SLICES as u32).max(Duration::from_millis(1)),
            groups,
            shards,
            stripes: (0..stripes)
                .map(|_| Mutex::new((0..SLICES).map(|_| Slice::default()).collect()))
                .collect(),
        })
    }

    /// Whether this counts for `groups` groups over `shards` shards (a
    /// reload that keeps both keeps the counts).
    pub fn fits(&self, groups: usize, shards: usize) -> bool {
        self.groups == groups && self.shards == shards
    }

    fn epoch(&self, at: Instant) -> u64 {
        (at.saturating_duration_since(self.start).as_nanos() / self.slice.as_nanos()) as u64
    }

    /// Counts `keys`, noted by a session of client `client`.
    pub fn record(&self, client: u64, keys: &[KeySeen]) {
        if !keys.is_empty() {
            self.record_at(Instant::now(), client, keys);
        }
    }

    fn record_at(&self, at: Instant, client: u64, keys: &[KeySeen]) {
        let epoch = self.epoch(at);
        let stripe = &self.stripes[client as usize % self.stripes.len()];
        let mut slices = stripe.lock().unwrap_or_else(|p| p.into_inner());
        let slice = &mut slices[(epoch % SLICES) as usize];
        if slice.epoch != epoch || slice.groups.len() != self.groups {
            if slice.groups.len() != self.groups {
                slice.groups.resize_with(self.groups, Sketch::default);
                slice.totals.resize(self.groups, 0);
                slice.shards.resize(self.shards, 0);
            }
            slice.reset(epoch);
        }
        for k in keys {
            if k.group >= self.groups || k.shard >= self.shards {
                continue;
            }
            slice.groups[k.group].add(&k.key, k.shard);
            slice.totals[k.group] += 1;
            slice.shards[k.shard] += 1;
        }
    }

    /// The window's counts, merged over stripes and slices.
    pub fn report(&self) -> Report {
        self.report_at(Instant::now())
    }

    fn report_at(&self, now: Instant) -> Report {
        let epoch = self.epoch(now);
        let oldest = epoch.saturating_sub(SLICES - 1);
        let since = self.start + self.slice * oldest as u32;
        let mut report = Report {
            covered: now.saturating_duration_since(since),
            groups: vec![(0, Vec::new()); self.groups],
            shards: vec![0; self.shards],
        };
        // Per group: key → (shard, count, error, floors of full sketches
        // that counted it), and the floors of every full sketch.
        type Merged = HashMap<KeyValue, (usize, u64, u64, u64)>;
        let mut merged: Vec<Merged> = vec![HashMap::new(); self.groups];
        let mut floors = vec![0u64; self.groups];
        for stripe in self.stripes.iter() {
            let slices = stripe.lock().unwrap_or_else(|p| p.into_inner());
            for slice in slices.iter() {
                if slice.epoch < oldest || slice.epoch > epoch || slice.groups.is_empty() {
                    continue;
                }
                for (s, n) in slice.shards.iter().enumerate() {
                    report.shards[s] += n;
                }
                for (g, sketch) in slice.groups.iter().enumerate() {
                    report.groups[g].0 += slice.totals[g];
                    let floor = sketch.floor();
                    floors[g] += floor;
                    for c in &sketch.slots {
                        let e =
                            merged[g]
                                .entry(c.key.clone())
                                .or_insert((c.shard as usize, 0, 0, 0));
                        e.1 += c.count;
                        e.2 += c.error;
                        e.3 += floor;
                    }
                }
            }
        }
        for (g, keys) in merged.into_iter().enumerate() {
            let mut list: Vec<HotKey> = keys
                .into_iter()
                .map(|(key, (shard, count, error, counted_floors))| HotKey {
                    key,
                    shard,
                    count,
                    // A full sketch that did not count the key may have
                    // seen it up to its floor times.
                    error: error + (floors[g] - counted_floors),
                })
                .collect();
            list.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.key.cmp(&b.key)));
            report.groups[g].1 = list;
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(group: usize, key: i64, shard: usize) -> KeySeen {
        KeySeen {
            group,
            shard,
            key: KeyValue::Int(key),
        }
    }

    /// A sketch keeps its heap ordered and its index true whatever comes.
    fn check(s: &Sketch) {
        for at in 1..s.heap.len() {
            assert!(s.count_at((at - 1) / 2) <= s.count_at(at));
        }
        for (slot, c) in s.slots.iter().enumerate() {
            assert_eq!(s.heap[c.at as usize] as usize, slot);
            assert_eq!(s.index[&c.key] as usize, slot);
        }
        assert_eq!(s.index.len(), s.slots.len());
    }

    #[test]
    fn counts_are_exact_while_the_keys_fit() {
        let mut s = Sketch::default();
        for i in 0..1000u64 {
            s.add(&KeyValue::Int((i % 10) as i64), 0);
        }
        check(&s);
        assert_eq!(s.slots.len(), 10);
        assert!(s.slots.iter().all(|c| c.count == 100 && c.error == 0));
        assert_eq!(s.floor(), 0, "not full: a key not counted was never seen");
    }

    /// Space-Saving's guarantees, against exact counts of a skewed stream
    /// over far more keys than counters: every key above 1/CAPACITY of the
    /// stream is counted, and each count is over by at most its error.
    #[test]
    fn heavy_keys_are_found_within_their_error() {
        let mut rng = crate::fuzz::Rng(7);
        let mut s = Sketch::default();
        let mut exact: HashMap<i64, u64> = HashMap::new();
        let n = 200_000u64;
        for _ in 0..n {
            let key = match rng.below(100) {
                0..=29 => 42,
                30..=39 => 7,
                40..=44 => rng.below(5) as i64 + 100,
                _ => rng.below(100_000) as i64 + 1_000,
            };
            *exact.entry(key).or_default() += 1;
            s.add(&KeyValue::Int(key), 0);
        }
        check(&s);
        assert_eq!(s.slots.len(), CAPACITY);
        for c in &s.slots {
            let KeyValue::Int(k) = c.key else { panic!() };
            let truth = exact.get(&k).copied().unwrap_or(0);
            assert!(
                truth <= c.count && c.count - c.error <= truth,
                "{k}: {c:?} vs {truth}"
            );
        }
        for (k, truth) in &exact {
            if *truth > n / CAPACITY as u64 {
                assert!(
                    s.index.contains_key(&KeyValue::Int(*k)),
                    "{k} ({truth}) not counted"
                );
            }
        }
        let mut top: Vec<&Counter> = s.slots.iter().collect();
        top.sort_by_key(|c| std::cmp::Reverse(c.count));
        assert_eq!(top[0].key, KeyValue::Int(42));
        assert_eq!(top[1].key, KeyValue::Int(7));
    }

    #[test]
    fn a_report_merges_stripes_and_shows_shares() {
        let hk = HotKeys::new(Duration::from_secs(60), 2, 3).unwrap();
        for client in 0..40u64 {
            let mut keys = vec![seen(0, 42, 1); 3];
            keys.push(seen(0, client as i64 + 1000, 0));
            keys.push(seen(1, 5, 2));
            hk.record(client, &keys);
        }
        hk.record(0, &[seen(9, 1, 0), seen(0, 1, 9)]);
        let r = hk.report();
        assert_eq!(r.groups[0].0, 160);
        assert_eq!(r.groups[1].0, 40);
        assert_eq!(r.shards, vec![40, 120, 40]);
        assert_eq!(r.total(), 200);
        let top = &r.groups[0].1[0];
        assert_eq!(
            (&top.key, top.shard, top.count, top.error),
            (&KeyValue::Int(42), 1, 120, 0)
        );
        assert_eq!(r.groups[0].1.len(), 41);
        assert_eq!(r.groups[1].1[0].count, 40);
        assert!(r.covered <= Duration::from_secs(60));
    }

    #[test]
    fn counts_leave_the_window() {
        let hk = HotKeys::new(Duration::from_secs(60), 1, 1).unwrap();
        let at = |s: u64| hk.start + Duration::from_millis(s * 1000 + 1);
        hk.record_at(at(0), 0, &[seen(0, 1, 0)]);
        hk.record_at(at(30), 0, &[seen(0, 2, 0)]);
        let r = hk.report_at(at(45));
        assert_eq!(r.groups[0].0, 2);
        assert_eq!(r.covered, Duration::from_millis(45_001));
        // 65 s in, the slices from 10 s on are in the window.
        let r = hk.report_at(at(65));
        assert_eq!(r.groups[0].0, 1);
        assert_eq!(r.groups[0].1[0].key, KeyValue::Int(2));
        assert_eq!(r.covered, Duration::from_millis(55_001));
        // A slice's place is taken by a later one: its counts go.
        hk.record_at(at(60), 0, &[seen(0, 3, 0)]);
        let r = hk.report_at(at(61));
        assert_eq!(r.groups[0].1.len(), 2);
        assert_eq!(hk.report_at(at(200)).total(), 0);
    }

    #[test]
    fn off_at_zero() {
        assert!(HotKeys::new(Duration::ZERO, 1, 1).is_none());
    }
}
