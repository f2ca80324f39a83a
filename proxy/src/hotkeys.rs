//! The hot-key report: which sharding keys take the most traffic, per table
//! group, over a sliding window, in fixed memory whatever the key space.
//!
//! Each table group's keys go into a count-min sketch with conservative
//! update (Cormode and Muthukrishnan, 2005; Estan and Varghese, 2002):
//! [`DEPTH`] rows of [`WIDTH`] counters, a key adding to one counter per row
//! (only those at the key's current estimate, the smallest of its
//! counters). An estimate is never under the key's true count, and over it
//! by at most e/[`WIDTH`] of the keys counted with probability 1 - e^-[`DEPTH`]
//! (98%). Beside it, the [`CANDIDATES`] keys with the largest estimates are
//! kept by name: a key whose new estimate does not pass the smallest of
//! theirs costs a hash and [`DEPTH`] counter updates, nothing else, so a key
//! space far larger than the sketch does not make every statement evict
//! something.
//!
//! The window is cut into [`SLICES`] slices, and every slice has its own
//! sketches in each of a few stripes; a session records into its client's
//! stripe (a lock other sessions seldom want: no global lock per
//! statement). Count-min sketches add up: a report sums the window's
//! slices of every stripe, counter by counter, and estimates every
//! candidate from the sum.

use crate::clock::Mono;
use shardline_router::hash::KeyValue;
use shardline_router::shards::KeySeen;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Counters per row.
pub const WIDTH: usize = 1024;
/// Rows (each key's counters: one per row, from 16 bits of its hash each).
pub const DEPTH: usize = 4;
/// Keys kept by name per table group, slice and stripe.
pub const CANDIDATES: usize = 64;
/// Slices of the window; the report covers the last `SLICES - 1` whole ones
/// and the current one.
pub const SLICES: u64 = 6;

/// A key's 64-bit hash (the candidates' index, and the counters' places;
/// two keys with one hash would count as one).
fn hash_of(key: &KeyValue) -> u64 {
    use std::hash::BuildHasher as _;
    foldhash::fast::FixedState::with_seed(0x5eed_4b65_7973).hash_one(key)
}

/// A key's counter in each row.
fn cells(hash: u64) -> [usize; DEPTH] {
    std::array::from_fn(|row| row * WIDTH + ((hash >> (16 * row)) as usize & (WIDTH - 1)))
}

/// The index's hasher: its keys are hashes already.
#[derive(Default)]
struct Passthrough(u64);

impl std::hash::Hasher for Passthrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type Index = HashMap<u64, u16, std::hash::BuildHasherDefault<Passthrough>>;

/// A key kept by name, with its estimate when last seen.
#[derive(Debug, Clone)]
struct Candidate {
    key: KeyValue,
    hash: u64,
    shard: u16,
    estimate: u32,
}

/// One count-min sketch (`rows`, allocated at the first key) and its
/// candidates, with where the smallest estimate among them is once they
/// are [`CANDIDATES`].
#[derive(Default)]
struct Sketch {
    rows: Vec<u32>,
    candidates: Vec<Candidate>,
    index: Index,
    /// The smallest candidate estimate (0 while there is room).
    least: u32,
    least_at: usize,
}

impl Sketch {
    fn clear(&mut self) {
        self.rows.iter_mut().for_each(|c| *c = 0);
        self.candidates.clear();
        self.index.clear();
        self.least = 0;
        self.least_at = 0;
    }

    fn add(&mut self, key: &KeyValue, hash: u64, shard: usize) {
        if self.rows.is_empty() {
            self.rows = vec![0; DEPTH * WIDTH];
        }
        let cells = cells(hash);
        let estimate = cells
            .iter()
            .map(|&c| self.rows[c])
            .min()
            .unwrap_or(0)
            .saturating_add(1);
        for c in cells {
            let counter = &mut self.rows[c];
            *counter = (*counter).max(estimate);
        }
        if estimate <= self.least {
            return;
        }
        if let Some(&at) = self.index.get(&hash) {
            let at = at as usize;
            self.candidates[at].estimate = estimate;
            if at == self.least_at {
                self.find_least();
            }
            return;
        }
        let candidate = Candidate {
            key: key.clone(),
            hash,
            shard: shard.min(u16::MAX as usize) as u16,
            estimate,
        };
        if self.candidates.len() < CANDIDATES {
            self.index.insert(hash, self.candidates.len() as u16);
            self.candidates.push(candidate);
        } else {
            // The candidate with the smallest estimate gives its place up.
            let at = self.least_at;
            let old = std::mem::replace(&mut self.candidates[at], candidate);
            self.index.remove(&old.hash);
            self.index.insert(hash, at as u16);
        }
        self.find_least();
    }

    fn find_least(&mut self) {
        if self.candidates.len() < CANDIDATES {
            self.least = 0;
            return;
        }
        let (at, least) = self
            .candidates
            .iter()
            .enumerate()
            .map(|(i, c)| (i, c.estimate))
            .min_by_key(|&(_, e)| e)
            .unwrap_or((0, 0));
        self.least = least;
        self.least_at = at;
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
    start: Mono,
    slice: Duration,
    slice_ns: u64,
    groups: usize,
    shards: usize,
    stripes: Box<[Mutex<Vec<Slice>>]>,
}

/// A key in the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HotKey {
    pub key: KeyValue,
    pub shard: usize,
    /// Statements placed by the key in the window: an estimate never under
    /// the true number, and over it by at most `error` (with probability
    /// 98%: the count-min bound).
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
            .clamp(2, 16)
            .next_power_of_two();
        let slice = (window / SLICES as u32).max(Duration::from_millis(1));
        Some(HotKeys {
            start: Mono::now(),
            slice,
            slice_ns: slice.as_nanos() as u64,
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

    fn epoch(&self, at: Mono) -> u64 {
        at.nanos_since(self.start) / self.slice_ns
    }

    /// Counts `keys`, noted at `at` by a session of client `client`.
    pub fn record(&self, at: Mono, client: u64, keys: &[KeySeen]) {
        if keys.is_empty() {
            return;
        }
        let epoch = self.epoch(at);
        // (A power of two.)
        let stripe = &self.stripes[client as usize & (self.stripes.len() - 1)];
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
            slice.groups[k.group].add(&k.key, hash_of(&k.key), k.shard);
            slice.totals[k.group] += 1;
            slice.shards[k.shard] += 1;
        }
    }

    /// The window's counts, merged over stripes and slices.
    pub fn report(&self) -> Report {
        self.report_at(Mono::now())
    }

    fn report_at(&self, now: Mono) -> Report {
        let epoch = self.epoch(now);
        let oldest = epoch.saturating_sub(SLICES - 1);
        let since = self.start.after(self.slice * oldest as u32);
        let mut report = Report {
            covered: now.since(since),
            groups: vec![(0, Vec::new()); self.groups],
            shards: vec![0; self.shards],
        };
        // Per group: the window's counters summed, and every candidate.
        let mut sums: Vec<Vec<u64>> = vec![Vec::new(); self.groups];
        let mut named: Vec<HashMap<u64, (KeyValue, usize)>> = vec![HashMap::new(); self.groups];
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
                    if sketch.rows.is_empty() {
                        continue;
                    }
                    let sum = &mut sums[g];
                    sum.resize(DEPTH * WIDTH, 0);
                    for (total, n) in sum.iter_mut().zip(&sketch.rows) {
                        *total += u64::from(*n);
                    }
                    for c in &sketch.candidates {
                        named[g]
                            .entry(c.hash)
                            .or_insert_with(|| (c.key.clone(), c.shard as usize));
                    }
                }
            }
        }
        for (g, keys) in named.into_iter().enumerate() {
            let sum = &sums[g];
            // The count-min bound: over by at most e/WIDTH of the keys
            // counted, with probability 1 - e^-DEPTH.
            let error =
                (std::f64::consts::E * report.groups[g].0 as f64 / WIDTH as f64).ceil() as u64;
            let mut list: Vec<HotKey> = keys
                .into_iter()
                .map(|(hash, (key, shard))| HotKey {
                    key,
                    shard,
                    count: cells(hash).iter().map(|&c| sum[c]).min().unwrap_or(0),
                    error,
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

    /// A sketch's index names its candidates, and the smallest estimate
    /// among them is known.
    fn check(s: &Sketch) {
        for (at, c) in s.candidates.iter().enumerate() {
            assert_eq!(s.index[&c.hash] as usize, at);
        }
        assert_eq!(s.index.len(), s.candidates.len());
        if s.candidates.len() == CANDIDATES {
            let least = s.candidates.iter().map(|c| c.estimate).min().unwrap();
            assert_eq!((s.least, s.candidates[s.least_at].estimate), (least, least));
        }
    }

    fn estimate(s: &Sketch, key: i64) -> u64 {
        let cells = cells(hash_of(&KeyValue::Int(key)));
        cells.iter().map(|&c| u64::from(s.rows[c])).min().unwrap()
    }

    #[test]
    fn counts_are_exact_while_the_keys_are_few() {
        let mut s = Sketch::default();
        for i in 0..1000u64 {
            let key = KeyValue::Int((i % 10) as i64);
            s.add(&key, hash_of(&key), 0);
        }
        check(&s);
        assert_eq!(s.candidates.len(), 10);
        assert!((0..10).all(|k| estimate(&s, k) == 100));
    }

    /// Against exact counts of skewed streams over far more keys than the
    /// sketch holds: the heavy keys are candidates, estimates are never
    /// under the truth, and the heavy keys' within the count-min bound.
    #[test]
    fn heavy_keys_are_found_within_their_error() {
        for seed in [7, 8, 9] {
            heavy_keys_of(seed);
        }
    }

    fn heavy_keys_of(seed: u64) {
        let mut rng = crate::fuzz::Rng(seed);
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
            let key = KeyValue::Int(key);
            s.add(&key, hash_of(&key), 0);
        }
        check(&s);
        assert_eq!(s.candidates.len(), CANDIDATES);
        let bound = (std::f64::consts::E * n as f64 / WIDTH as f64).ceil() as u64;
        for (k, truth) in &exact {
            let e = estimate(&s, *k);
            assert!(*truth <= e, "{k}: estimate {e} under {truth}");
            if *truth > n / 200 {
                assert!(
                    s.index.contains_key(&hash_of(&KeyValue::Int(*k))),
                    "{k} ({truth}) not a candidate"
                );
                assert!(e - truth <= bound, "{k}: {e} for {truth}");
            }
        }
        let mut top: Vec<&Candidate> = s.candidates.iter().collect();
        top.sort_by_key(|c| std::cmp::Reverse(c.estimate));
        assert_eq!(
            (&top[0].key, &top[1].key),
            (&KeyValue::Int(42), &KeyValue::Int(7))
        );
    }

    #[test]
    fn a_report_merges_stripes_and_shows_shares() {
        let hk = HotKeys::new(Duration::from_secs(60), 2, 3).unwrap();
        for client in 0..40u64 {
            let mut keys = vec![seen(0, 42, 1); 3];
            keys.push(seen(0, client as i64 + 1000, 0));
            keys.push(seen(1, 5, 2));
            hk.record(Mono::now(), client, &keys);
        }
        hk.record(Mono::now(), 0, &[seen(9, 1, 0), seen(0, 1, 9)]);
        let r = hk.report();
        assert_eq!(r.groups[0].0, 160);
        assert_eq!(r.groups[1].0, 40);
        assert_eq!(r.shards, vec![40, 120, 40]);
        assert_eq!(r.total(), 200);
        let top = &r.groups[0].1[0];
        assert_eq!(
            (&top.key, top.shard, top.count, top.error),
            (&KeyValue::Int(42), 1, 120, 1),
            "e × 160 / 1024, rounded up"
        );
        assert_eq!(r.groups[0].1.len(), 41);
        assert_eq!(r.groups[1].1[0].count, 40);
        assert!(r.covered <= Duration::from_secs(60));
    }

    #[test]
    fn counts_leave_the_window() {
        let hk = HotKeys::new(Duration::from_secs(60), 1, 1).unwrap();
        let at = |s: u64| hk.start.after(Duration::from_millis(s * 1000 + 1));
        hk.record(at(0), 0, &[seen(0, 1, 0)]);
        hk.record(at(30), 0, &[seen(0, 2, 0)]);
        let r = hk.report_at(at(45));
        assert_eq!(r.groups[0].0, 2);
        assert_eq!(r.covered, Duration::from_millis(45_001));
        // 65 s in, the slices from 10 s on are in the window.
        let r = hk.report_at(at(65));
        assert_eq!(r.groups[0].0, 1);
        assert_eq!(r.groups[0].1[0].key, KeyValue::Int(2));
        assert_eq!(r.covered, Duration::from_millis(55_001));
        // A slice's place is taken by a later one: its counts go.
        hk.record(at(60), 0, &[seen(0, 3, 0)]);
        let r = hk.report_at(at(61));
        assert_eq!(r.groups[0].1.len(), 2);
        assert_eq!(hk.report_at(at(200)).total(), 0);
    }

    #[test]
    fn off_at_zero() {
        assert!(HotKeys::new(Duration::ZERO, 1, 1).is_none());
    }
}
