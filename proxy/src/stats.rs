//! Traffic counters for the admin console's SHOW STATS family, in
//! PgBouncer's terms: transactions, queries (units answered: a simple
//! query, or an extended batch up to Sync), bytes, and time.
//!
//! A session counts its client's traffic in its own [`Meter`] and adds it
//! to its user's [`Stats`] once per answered unit (a handful of relaxed
//! atomic additions, no lock). Server assignments and the time spent
//! waiting for a connection are counted by the pools
//! (`pool::NodePool::checkout`). A background task turns the totals into
//! per-second averages every `admin.stats_period` ([`Averages`]).

use crate::clock::Mono;
use crate::protocol::backend::{sqlstate, PgError};
use shardline_router::shards::{Construct, Refusal};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One user's traffic since the proxy started.
#[derive(Default)]
pub struct Stats {
    pub xacts: AtomicU64,
    pub queries: AtomicU64,
    pub received: AtomicU64,
    pub sent: AtomicU64,
    pub xact_us: AtomicU64,
    pub query_us: AtomicU64,
    /// Time from a unit's first byte to its ReadyForQuery.
    pub query_time: Histogram,
    /// Time from a transaction's first byte to its ReadyForQuery `I`.
    pub xact_time: Histogram,
}

/// Buckets per histogram (each has one more slot past its last bound).
pub const BUCKETS: usize = 17;

/// Upper bounds of the latency histograms' buckets, in µs (the `le`
/// labels of `/metrics`, in seconds).
pub const LATENCY_US: [u64; BUCKETS] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000,
];

/// Upper bounds of the routing-time histogram's buckets, in ns: a cache
/// hit takes a few µs, a parse tens of µs, a long statement milliseconds.
pub const ROUTING_NS: [u64; BUCKETS] = [
    500, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000, 256_000, 512_000, 1_000_000,
    2_000_000, 4_000_000, 8_000_000, 16_000_000, 64_000_000,
];

/// A histogram recorded with relaxed atomic additions (one per
/// observation, two when it is not zero): no lock, nothing allocated.
pub struct Histogram {
    bounds: &'static [u64; BUCKETS],
    /// Units of the bounds in a second (1e6 for µs).
    per_second: u64,
    /// Observations per bucket (not cumulative); the last is past every bound.
    counts: [AtomicU64; BUCKETS + 1],
    sum: AtomicU64,
}

/// A latency histogram in µs.
impl Default for Histogram {
    fn default() -> Self {
        Histogram::with_bounds(&LATENCY_US, 1_000_000)
    }
}

/// A histogram as read: cumulative counts per bound, the number of
/// observations and their sum, in the histogram's unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramReading {
    pub bounds: &'static [u64; BUCKETS],
    pub per_second: u64,
    pub cumulative: [u64; BUCKETS],
    pub count: u64,
    pub sum: u64,
}

impl Histogram {
    pub fn with_bounds(bounds: &'static [u64; BUCKETS], per_second: u64) -> Histogram {
        Histogram {
            bounds,
            per_second,
            counts: Default::default(),
            sum: AtomicU64::new(0),
        }
    }

    /// Routing times, in ns.
    pub fn routing() -> Histogram {
        Histogram::with_bounds(&ROUTING_NS, 1_000_000_000)
    }

    /// Records `value`, in the histogram's unit (µs for latencies).
    #[inline]
    pub fn observe(&self, value: u64) {
        self.observe_in(self.bucket(value), value);
    }

    /// The bucket `value` falls in: found once for several histograms
    /// with the same bounds (`observe_in`).
    #[inline]
    pub fn bucket(&self, value: u64) -> usize {
        self.bounds.partition_point(|&bound| bound < value)
    }

    /// Records `value`, which falls in `bucket` (`bucket` of a histogram
    /// with the same bounds).
    #[inline]
    pub fn observe_in(&self, bucket: usize, value: u64) {
        debug_assert_eq!(bucket, self.bucket(value));
        self.counts[bucket].fetch_add(1, Relaxed);
        if value > 0 {
            self.sum.fetch_add(value, Relaxed);
        }
    }

    pub fn read(&self) -> HistogramReading {
        let mut cumulative = [0u64; BUCKETS];
        let mut running = 0u64;
        for (slot, count) in cumulative.iter_mut().zip(&self.counts) {
            running += count.load(Relaxed);
            *slot = running;
        }
        HistogramReading {
            bounds: self.bounds,
            per_second: self.per_second,
            cumulative,
            count: running + self.counts[BUCKETS].load(Relaxed),
            sum: self.sum.load(Relaxed),
        }
    }
}

/// Two-phase commits of transactions on several shards.
#[derive(Default)]
pub struct TwoPhase {
    /// Transactions whose participants all prepared.
    pub prepared: AtomicU64,
    pub committed: AtomicU64,
    /// Rolled back after some participant prepared (a PREPARE or the
    /// coordinator's COMMIT failed).
    pub rolled_back: AtomicU64,
    /// Left for the in-doubt check: the coordinator lost while committing,
    /// or a COMMIT PREPARED that failed.
    pub in_doubt: AtomicU64,
    /// Prepared transactions the in-doubt check finished (after a crash or
    /// a lost connection).
    pub resolved: AtomicU64,
}

/// How a unit was placed, for the latency histograms by placement kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kind {
    /// Not placed on a server (answered by the proxy), or not known.
    #[default]
    None,
    /// One shard, on the node (index in its shard) of the given role.
    One {
        shard: u16,
        node: u8,
        replica: bool,
    },
    FanOut,
    Merge,
    Split,
    Pipeline,
}

impl Kind {
    /// The placement kinds with a histogram of their own, by `index`.
    pub const NAMES: [&'static str; 5] = ["one_shard", "fan_out", "merge", "split", "pipeline"];

    fn index(self) -> Option<usize> {
        Some(match self {
            Kind::None => return None,
            Kind::One { .. } => 0,
            Kind::FanOut => 1,
            Kind::Merge => 2,
            Kind::Split => 3,
            Kind::Pipeline => 4,
        })
    }

    /// The kind of a multi-shard placement (`None` for one shard or none).
    pub fn of(place: &shardline_router::shards::Placement) -> Kind {
        use shardline_router::shards::Placement as P;
        match place {
            P::Many(_) => Kind::FanOut,
            P::Merge(_) => Kind::Merge,
            P::Split(_) | P::CopySplit(_) => Kind::Split,
            P::Pipeline(_) => Kind::Pipeline,
            P::Anywhere | P::Spread | P::One(_) | P::Refused(_) => Kind::None,
        }
    }
}

/// Process-wide counters and histograms for `/metrics` that no other
/// structure holds; kept across reloads.
pub struct Events {
    pub started: Instant,
    /// Unit latency by placement kind (`Kind::NAMES`).
    pub by_kind: [Histogram; 5],
    /// Errors sent to clients, by SQLSTATE class.
    pub errors: ErrorClasses,
    /// Reads sent to a primary because no replica had replayed the user's
    /// last write in time (read-your-writes).
    pub ryw_primary_reads: AtomicU64,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    /// Time to route a statement (one in 64 is timed), ns.
    pub routing: Histogram,
    pub two_phase: TwoPhase,
    /// 0A000 refusals the proxy made, by construct.
    pub refusals: Refusals,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            started: Instant::now(),
            by_kind: Default::default(),
            errors: ErrorClasses::default(),
            ryw_primary_reads: AtomicU64::new(0),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            routing: Histogram::routing(),
            two_phase: TwoPhase::default(),
            refusals: Refusals::default(),
        }
    }
}

/// The proxy's own 0A000 refusals, by construct ([`Construct::ALL`]).
#[derive(Default)]
pub struct Refusals([AtomicU64; Construct::ALL.len()]);

impl Refusals {
    /// Counts `r` when it refuses a construct; returns it as the client's error.
    pub fn error(&self, r: Refusal) -> PgError {
        if let Some(c) = r.construct {
            self.count(c);
        }
        PgError::error(r.code, r.message)
    }

    /// Counts a refusal of `c` made by the session; returns its 0A000.
    pub fn refuse(&self, c: Construct, message: impl Into<String>) -> PgError {
        self.count(c);
        PgError::error(sqlstate::FEATURE_NOT_SUPPORTED, message.into())
    }

    fn count(&self, c: Construct) {
        self.0[c.index()].fetch_add(1, Relaxed);
    }

    /// Each construct with its count.
    pub fn read(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Construct::ALL
            .iter()
            .map(|c| (c.label(), self.0[c.index()].load(Relaxed)))
    }
}

/// ErrorResponses by SQLSTATE class (its first two characters, digits or
/// capital letters), plus one slot for a code that could not be read.
pub struct ErrorClasses(Box<[AtomicU64]>);

const CLASS_DIGITS: usize = 36;

impl Default for ErrorClasses {
    fn default() -> Self {
        ErrorClasses(
            (0..CLASS_DIGITS * CLASS_DIGITS + 1)
                .map(|_| AtomicU64::new(0))
                .collect(),
        )
    }
}

impl ErrorClasses {
    fn digit(c: u8) -> Option<usize> {
        match c {
            b'0'..=b'9' => Some((c - b'0') as usize),
            b'A'..=b'Z' => Some((c - b'A') as usize + 10),
            _ => None,
        }
    }

    /// Counts an error of `code` (a SQLSTATE; anything else counts as unknown).
    pub fn count(&self, code: &[u8]) {
        let slot = match code {
            [a, b, ..] => Self::digit(*a)
                .zip(Self::digit(*b))
                .map(|(a, b)| a * CLASS_DIGITS + b),
            _ => None,
        };
        self.0[slot.unwrap_or(CLASS_DIGITS * CLASS_DIGITS)].fetch_add(1, Relaxed);
    }

    /// The classes counted so far (`"??"`: a code that could not be read).
    pub fn read(&self) -> Vec<(String, u64)> {
        let name = |d: usize| {
            if d < 10 {
                (b'0' + d as u8) as char
            } else {
                (b'A' + (d - 10) as u8) as char
            }
        };
        self.0
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let n = c.load(Relaxed);
                (n > 0).then(|| {
                    let class = if i == CLASS_DIGITS * CLASS_DIGITS {
                        "??".to_string()
                    } else {
                        format!("{}{}", name(i / CLASS_DIGITS), name(i % CLASS_DIGITS))
                    };
                    (class, n)
                })
            })
            .collect()
    }
}

/// Where a session's [`Meter`] records what it counts.
#[derive(Clone, Copy)]
pub struct Sinks<'a> {
    pub user: &'a Stats,
    pub events: &'a Events,
    /// The shards of the session's configuration (`Topology::shards`).
    pub shards: &'a [std::sync::Arc<crate::health::ShardHealth>],
    /// Units at least this slow (µs) are noted for the slow-statement log
    /// (`u64::MAX`: off).
    pub slow_us: u64,
}

/// Totals for a database (or one user), as SHOW STATS_TOTALS lists them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub assignments: u64,
    pub xacts: u64,
    pub queries: u64,
    pub received: u64,
    pub sent: u64,
    pub xact_us: u64,
    pub query_us: u64,
    pub wait_us: u64,
}

impl Totals {
    pub fn add_stats(&mut self, s: &Stats) {
        self.xacts += s.xacts.load(Relaxed);
        self.queries += s.queries.load(Relaxed);
        self.received += s.received.load(Relaxed);
        self.sent += s.sent.load(Relaxed);
        self.xact_us += s.xact_us.load(Relaxed);
        self.query_us += s.query_us.load(Relaxed);
    }

    /// PgBouncer's averages over `period` from two readings of the
    /// totals: counts and bytes per second; times per transaction and per
    /// query (µs); wait per assignment.
    pub fn averages(&self, earlier: &Totals, period: Duration) -> Totals {
        let secs = period.as_secs_f64().max(1e-3);
        let rate = |now: u64, then: u64| (now.saturating_sub(then) as f64 / secs).round() as u64;
        let per =
            |now: u64, then: u64, n: u64| now.saturating_sub(then).checked_div(n).unwrap_or(0);
        let xacts = self.xacts.saturating_sub(earlier.xacts);
        let queries = self.queries.saturating_sub(earlier.queries);
        let assignments = self.assignments.saturating_sub(earlier.assignments);
        Totals {
            assignments: rate(self.assignments, earlier.assignments),
            xacts: rate(self.xacts, earlier.xacts),
            queries: rate(self.queries, earlier.queries),
            received: rate(self.received, earlier.received),
            sent: rate(self.sent, earlier.sent),
            xact_us: per(self.xact_us, earlier.xact_us, xacts),
            query_us: per(self.query_us, earlier.query_us, queries),
            wait_us: per(self.wait_us, earlier.wait_us, assignments),
        }
    }
}

/// The last period's averages by database, and the totals they started from.
#[derive(Default)]
pub struct Averages {
    inner: Mutex<AveragesInner>,
}

#[derive(Default)]
struct AveragesInner {
    last: Vec<(String, Totals)>,
    averages: Vec<(String, Totals)>,
}

impl Averages {
    /// Takes a new reading of the totals (by database): the averages are
    /// now those of the period since the last reading.
    pub fn update(&self, now: Vec<(String, Totals)>, period: Duration) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let averages = now
            .iter()
            .map(|(db, t)| {
                let earlier = inner
                    .last
                    .iter()
                    .find(|(d, _)| d == db)
                    .map(|(_, t)| *t)
                    .unwrap_or_default();
                (db.clone(), t.averages(&earlier, period))
            })
            .collect();
        inner.averages = averages;
        inner.last = now;
    }

    pub fn of(&self, database: &str) -> Totals {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner
            .averages
            .iter()
            .find(|(d, _)| d == database)
            .map(|(_, t)| *t)
            .unwrap_or_default()
    }
}

/// Units run, by how they were placed (SHOW ROUTING).
#[derive(Default)]
pub struct Placements {
    pub one: AtomicU64,
    pub fanout: AtomicU64,
    pub merge: AtomicU64,
    pub split: AtomicU64,
    pub copy_split: AtomicU64,
    pub pipeline: AtomicU64,
    pub refused: AtomicU64,
}

impl Placements {
    pub fn count(&self, place: &shardline_router::shards::Placement) {
        use shardline_router::shards::Placement as P;
        let counter = match place {
            P::Anywhere | P::Spread | P::One(_) => &self.one,
            P::Many(_) => &self.fanout,
            P::Merge(_) => &self.merge,
            P::Split(_) => &self.split,
            P::CopySplit(_) => &self.copy_split,
            P::Pipeline(_) => &self.pipeline,
            P::Refused(_) => &self.refused,
        };
        counter.fetch_add(1, Relaxed);
    }
}

/// A point in the client's output (`Meter::mark`), to take back what was
/// queued after it while none of it was written (`Meter::take_back`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OutputMark {
    sent: u64,
    uncounted: usize,
}

/// One session's count of its client's traffic, added to its user's
/// [`Stats`] when a unit is answered (a ReadyForQuery about to be written
/// to the client: the one place every executor's answers pass). Counted
/// before the write, so a client that reads its answer and then asks the
/// console finds it counted.
#[derive(Default)]
pub struct Meter {
    scan: Scan,
    /// Bytes at the front of the client's output buffer already counted.
    counted: usize,
    /// When the unit being answered began (the client's bytes arrived).
    unit_since: Option<Mono>,
    /// When the client's transaction began.
    xact_since: Option<Mono>,
    received: u64,
    sent: u64,
    /// Bytes counted since the session began (`sent` is added to the
    /// user's stats and starts again at each answer): a mark's position.
    counted_total: u64,
    /// Where the unit being answered runs.
    place: Kind,
    /// The slowest unit answered since the last look that was at least
    /// `Sinks::slow_us` slow (µs).
    slow: Option<u64>,
}

impl Meter {
    /// The unit being answered runs as `kind` (kept until changed).
    #[inline]
    pub fn place(&mut self, kind: Kind) {
        self.place = kind;
    }

    /// When the unit being answered began (its first bytes arrived).
    #[inline]
    pub fn unit_started(&self) -> Option<Mono> {
        self.unit_since
    }

    /// Where the client's output buffer `out` stands: what was counted
    /// (written, or about to be) and what is queued after it, uncounted.
    #[inline]
    pub fn mark(&self, out: &[u8]) -> OutputMark {
        OutputMark {
            sent: self.counted_total,
            uncounted: out.len() - self.counted(out),
        }
    }

    /// Takes back what was queued in `out` since `mark`, when none of it
    /// was counted (a byte is counted before it is written, so none of it
    /// reached the client). Whether it could.
    pub fn take_back(&self, out: &mut bytes::BytesMut, mark: OutputMark) -> bool {
        if self.counted_total != mark.sent {
            return false;
        }
        let uncounted = out.len() - self.counted(out);
        let Some(added) = uncounted.checked_sub(mark.uncounted) else {
            return false;
        };
        out.truncate(out.len() - added);
        true
    }

    /// Where the units answered last ran.
    pub fn placed(&self) -> Kind {
        self.place
    }

    /// The slowest unit past the slow-statement bound answered since the
    /// last call, µs.
    #[inline]
    pub fn take_slow(&mut self) -> Option<u64> {
        self.slow.take()
    }

    /// The client sent `n` bytes; returns when, if they begin a request
    /// (nothing was being answered).
    #[inline]
    pub fn received(&mut self, n: usize) -> Option<Mono> {
        self.received += n as u64;
        if self.unit_since.is_some() {
            return None;
        }
        let now = Mono::recent();
        self.unit_since = Some(now);
        self.xact_since.get_or_insert(now);
        Some(now)
    }

    /// The client's output buffer is about to be written: counts what was
    /// added to it since (`more`: the client has sent more than what is
    /// answered, so its next unit starts at once). Returns the status of
    /// the last ReadyForQuery among them (0 when there were more than the
    /// scan keeps: a status not known).
    #[inline]
    pub fn queued(&mut self, out: &[u8], more: bool, to: Sinks<'_>) -> Option<u8> {
        let counted = self.counted.min(out.len());
        if counted == out.len() {
            return None;
        }
        self.counted = out.len();
        self.sent(&out[counted..], more, to)
    }

    /// Bytes at the front of `out` counted already (the rest is new).
    #[inline]
    pub fn counted(&self, out: &[u8]) -> usize {
        self.counted.min(out.len())
    }

    /// `n` bytes left the front of the output buffer.
    pub fn drained(&mut self, n: usize) {
        self.counted = self.counted.saturating_sub(n);
    }

    fn sent(&mut self, written: &[u8], more: bool, to: Sinks<'_>) -> Option<u8> {
        let stats = to.user;
        self.sent += written.len() as u64;
        self.counted_total += written.len() as u64;
        let mut ended = [0u8; 8];
        let n = self
            .scan
            .ready_statuses(written, &mut ended, &to.events.errors);
        if n == 0 {
            return None;
        }
        let now = Mono::recent();
        let by_kind = self.place.index().map(|i| &to.events.by_kind[i]);
        let by_shard = match self.place {
            Kind::One { shard, replica, .. } => to
                .shards
                .get(shard as usize)
                .map(|s| &s.latency[usize::from(replica)]),
            _ => None,
        };
        let (mut xacts, mut query_us, mut xact_us) = (0u64, 0u64, 0u64);
        // Every unit answered goes into the histograms, as into the
        // counters: one whose start was not seen apart (it arrived while
        // another was answered, or is past the few statuses read from one
        // write) counts as answered at once.
        // The unit's histograms share their bounds: one bucket search.
        let observe_unit = |us: u64| {
            let bucket = stats.query_time.bucket(us);
            stats.query_time.observe_in(bucket, us);
            if let Some(h) = by_kind {
                h.observe_in(bucket, us);
            }
            if let Some(h) = by_shard {
                h.observe_in(bucket, us);
            }
        };
        for &status in &ended[..n.min(ended.len())] {
            let since = self.unit_since.take();
            let us = since.map_or(0, |t| now.micros_since(t));
            query_us += us;
            observe_unit(us);
            if us >= to.slow_us {
                self.slow = Some(self.slow.map_or(us, |s| s.max(us)));
            }
            if status == b'I' {
                xacts += 1;
                let us = match self.xact_since.take() {
                    // A transaction of one unit: its time is the unit's.
                    t if t == since => us,
                    t => t.map_or(0, |t| now.micros_since(t)),
                };
                xact_us += us;
                stats.xact_time.observe(us);
            }
        }
        // Units beyond the statuses read here (a long pipeline answered in
        // one write) count without time, and so do their transactions.
        for _ in ended.len()..n {
            observe_unit(0);
        }
        let queries = n as u64;
        if more {
            self.unit_since = Some(now);
            self.xact_since.get_or_insert(now);
        }
        stats.queries.fetch_add(queries, Relaxed);
        stats.query_us.fetch_add(query_us, Relaxed);
        if xacts > 0 {
            stats.xacts.fetch_add(xacts, Relaxed);
            stats.xact_us.fetch_add(xact_us, Relaxed);
        }
        self.finish(stats);
        Some(if n > ended.len() { 0 } else { ended[n - 1] })
    }

    /// Bytes counted but not yet added (at the end of the session).
    pub fn finish(&mut self, stats: &Stats) {
        stats
            .received
            .fetch_add(std::mem::take(&mut self.received), Relaxed);
        stats
            .sent
            .fetch_add(std::mem::take(&mut self.sent), Relaxed);
    }
}

/// Follows the message boundaries of the bytes written to the client
/// (which may end mid-message) to find each ReadyForQuery and its status.
#[derive(Default)]
struct Scan {
    header: [u8; 5],
    /// Header bytes seen of the next message (0..5).
    got: usize,
    /// Body bytes still to pass of the current message.
    left: usize,
    /// The current message is a ReadyForQuery (its one body byte is the status).
    ready: bool,
    /// The current message is an ErrorResponse: its first body bytes, where
    /// the SQLSTATE is (servers send the severity fields, then the code).
    error: Option<([u8; ERROR_HEAD], usize)>,
}

/// Body bytes of an ErrorResponse kept to find its code.
const ERROR_HEAD: usize = 48;

/// The SQLSTATE field (`C`) among an ErrorResponse's first fields.
fn error_code(head: &[u8]) -> Option<&[u8]> {
    let mut rest = head;
    while let [kind, tail @ ..] = rest {
        if *kind == 0 {
            return None;
        }
        let end = memchr::memchr(0, tail)?;
        if *kind == b'C' {
            return Some(&tail[..end]);
        }
        rest = &tail[end + 1..];
    }
    None
}

impl Scan {
    /// Writes the statuses of the ReadyForQuery messages that end in
    /// `bytes` into `out` (as many as fit); returns how many there were.
    /// ErrorResponses that end in `bytes` are counted in `errors`.
    fn ready_statuses(&mut self, mut bytes: &[u8], out: &mut [u8], errors: &ErrorClasses) -> usize {
        let mut n = 0;
        while !bytes.is_empty() {
            if self.left > 0 {
                if self.ready {
                    if let Some(slot) = out.get_mut(n) {
                        *slot = bytes[0];
                    }
                    n += 1;
                    self.ready = false;
                }
                let k = self.left.min(bytes.len());
                if let Some((head, got)) = self.error.as_mut() {
                    let take = k.min(ERROR_HEAD - *got);
                    head[*got..*got + take].copy_from_slice(&bytes[..take]);
                    *got += take;
                }
                self.left -= k;
                bytes = &bytes[k..];
                if self.left == 0 {
                    if let Some((head, got)) = self.error.take() {
                        errors.count(error_code(&head[..got]).unwrap_or_default());
                    }
                }
                continue;
            }
            if self.got == 0 {
                // Whole messages that are neither a ReadyForQuery nor an
                // error (rows, mostly) are passed over at once.
                while let [tag, a, b, c, d, ..] = *bytes {
                    let len = u32::from_be_bytes([a, b, c, d]) as usize;
                    if tag == b'Z' || tag == b'E' || len < 4 || bytes.len() <= len {
                        break;
                    }
                    bytes = &bytes[len + 1..];
                }
                if bytes.is_empty() {
                    break;
                }
            }
            let header = match bytes {
                // A whole header, read in place (the usual case).
                [tag, a, b, c, d, rest @ ..] if self.got == 0 => {
                    bytes = rest;
                    Some((*tag, u32::from_be_bytes([*a, *b, *c, *d])))
                }
                _ => {
                    let k = (5 - self.got).min(bytes.len());
                    self.header[self.got..self.got + k].copy_from_slice(&bytes[..k]);
                    self.got += k;
                    bytes = &bytes[k..];
                    (self.got == 5).then(|| {
                        self.got = 0;
                        let [tag, a, b, c, d] = self.header;
                        (tag, u32::from_be_bytes([a, b, c, d]))
                    })
                }
            };
            if let Some((tag, len)) = header {
                self.left = (len as usize).saturating_sub(4);
                self.ready = tag == b'Z' && self.left == 1;
                if tag == b'E' {
                    if self.left == 0 {
                        errors.count(b"");
                    } else {
                        self.error = Some(([0; ERROR_HEAD], 0));
                    }
                }
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    /// What was queued after a mark is taken back only while none of it
    /// was counted; bytes written from before the mark do not move it.
    #[test]
    fn output_is_taken_back_to_a_mark_until_counted() {
        let mut m = Meter::default();
        let mut out = bytes::BytesMut::new();
        out.extend_from_slice(b"older");
        // The older bytes counted, then half of them written.
        m.counted = out.len();
        m.counted_total = 5;
        let mark = m.mark(&out);
        bytes::Buf::advance(&mut out, 3);
        m.drained(3);
        out.extend_from_slice(b"answer");
        assert!(m.take_back(&mut out, mark));
        assert_eq!(&out[..], b"er");
        // Counted (about to be written): not taken back.
        out.extend_from_slice(b"answer");
        m.counted = out.len();
        m.counted_total += 6;
        assert!(!m.take_back(&mut out, mark));
        assert_eq!(&out[..], b"eranswer");
    }

    use super::*;

    use crate::protocol::test_message as message;

    #[test]
    fn ready_for_query_is_found_however_the_writes_split() {
        let mut stream = Vec::new();
        stream.extend(message(b'T', b"\0\x01xx"));
        stream.extend(message(b'Z', b"T"));
        stream.extend(message(b'D', b"ZZZZZ"));
        stream.extend(message(b'C', b"SELECT 1\0"));
        stream.extend(message(b'Z', b"I"));
        // Rows in a run (passed over whole), an error between them, an
        // empty row and a message too short to have a length.
        stream.extend(message(b'D', b"Z"));
        stream.extend(message(b'D', b""));
        stream.extend(message(b'E', b"SERROR\0C42P01\0Mno\0\0"));
        stream.extend(message(b'd', b"EEEE"));
        stream.extend(message(b'Z', b"E"));
        for cut in 0..stream.len() {
            for cut2 in cut..stream.len() {
                let errors = ErrorClasses::default();
                let mut scan = Scan::default();
                let mut seen = Vec::new();
                for part in [&stream[..cut], &stream[cut..cut2], &stream[cut2..]] {
                    let mut out = [0u8; 8];
                    let n = scan.ready_statuses(part, &mut out, &errors);
                    seen.extend_from_slice(&out[..n]);
                }
                assert_eq!(seen, b"TIE", "cut at {cut} and {cut2}");
                assert_eq!(
                    errors.read(),
                    [("42".to_string(), 1)],
                    "cut at {cut} and {cut2}"
                );
            }
        }
    }

    /// The stats a test's meter counts into, with no shards.
    fn sinks<'a>(user: &'a Stats, events: &'a Events, slow_us: u64) -> Sinks<'a> {
        Sinks {
            user,
            events,
            shards: &[],
            slow_us,
        }
    }

    /// An answer counted and written after a mark (a ReadyForQuery, which
    /// hands the unit's bytes to the user's stats) keeps it from being
    /// taken back, whatever is queued after it.
    #[test]
    fn an_answer_written_after_a_mark_is_never_taken_back() {
        let stats = Stats::default();
        let events = Events::default();
        let sinks = sinks(&stats, &events, 1_000_000);
        let mut m = Meter::default();
        let mut out = bytes::BytesMut::new();
        m.received(10);
        out.extend_from_slice(&message(b'Z', b"I"));
        let mark = m.mark(&out);
        m.queued(&out, false, sinks);
        m.drained(out.len());
        out.clear();
        out.extend_from_slice(&message(b'T', b"\0\0"));
        assert!(!m.take_back(&mut out, mark));
        assert_eq!(out.len(), 7);
    }

    #[test]
    fn a_session_counts_queries_transactions_and_bytes() {
        let stats = Stats::default();
        let events = Events::default();
        let sinks = sinks(&stats, &events, 1_000_000);
        let mut m = Meter::default();
        m.place(Kind::FanOut);
        m.received(20);
        let mut out = message(b'Z', b"T");
        m.queued(&out, false, sinks);
        // Half of it written: nothing is counted twice.
        m.drained(3);
        out.drain(..3);
        m.queued(&out, false, sinks);
        assert_eq!(stats.queries.load(Relaxed), 1);
        m.drained(3);
        out.clear();
        m.received(10);
        let mut end = message(b'C', b"COMMIT\0");
        end.extend(message(b'Z', b"I"));
        m.queued(&end, false, sinks);
        assert_eq!(stats.queries.load(Relaxed), 2);
        assert_eq!(stats.xacts.load(Relaxed), 1);
        assert_eq!(stats.received.load(Relaxed), 30);
        assert_eq!(stats.sent.load(Relaxed), 6 + end.len() as u64);
        assert_eq!(stats.query_time.read().count, 2);
        assert_eq!(stats.xact_time.read().count, 1);
        assert_eq!(events.by_kind[1].read().count, 2, "fan_out");
        assert_eq!(events.by_kind[0].read().count, 0);
    }

    #[test]
    fn every_unit_counted_is_in_the_histograms() {
        let stats = Stats::default();
        let events = Events::default();
        let sinks = sinks(&stats, &events, u64::MAX);
        let mut m = Meter::default();
        m.place(Kind::Merge);
        // Two units sent together, and a long pipeline, each answered in
        // one write: only the first unit's start is seen apart.
        m.received(30);
        let two = [message(b'Z', b"T"), message(b'Z', b"I")].concat();
        m.queued(&two, false, sinks);
        m.drained(two.len());
        m.received(300);
        let many: Vec<u8> = (0..20).flat_map(|_| message(b'Z', b"I")).collect();
        m.queued(&many, false, sinks);
        assert_eq!(stats.queries.load(Relaxed), 22);
        assert_eq!(stats.query_time.read().count, 22);
        assert_eq!(events.by_kind[2].read().count, 22);
    }

    #[test]
    fn errors_are_counted_by_class_however_the_writes_split() {
        let mut stream = Vec::new();
        stream.extend(message(b'E', b"SERROR\0VERROR\0C42P01\0Mno such table\0\0"));
        stream.extend(message(b'Z', b"I"));
        stream.extend(message(b'E', b"SFATAL\0C57P01\0Mbye\0\0"));
        // A code too far in to be read, and a message with no body.
        let far = [&b"M"[..], &[b'x'; 60], b"\0C22012\0\0"].concat();
        stream.extend(message(b'E', &far));
        stream.extend(message(b'E', b""));
        for cut in 0..stream.len() {
            let errors = ErrorClasses::default();
            let mut scan = Scan::default();
            let mut out = [0u8; 8];
            let mut n = scan.ready_statuses(&stream[..cut], &mut out, &errors);
            n += scan.ready_statuses(&stream[cut..], &mut out, &errors);
            assert_eq!(n, 1);
            let mut read = errors.read();
            read.sort();
            assert_eq!(
                read,
                vec![("42".into(), 1), ("57".into(), 1), ("??".into(), 2)],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative_with_le_bounds() {
        let h = Histogram::default();
        for us in [0, 100, 101, 1_000, 40_000_000] {
            h.observe(us);
        }
        let r = h.read();
        assert_eq!(r.count, 5);
        assert_eq!(r.sum, 100 + 101 + 1_000 + 40_000_000);
        assert_eq!(r.cumulative[0], 2, "0 and 100 are <= 100 µs");
        assert_eq!(r.cumulative[1], 3, "101 is <= 250 µs");
        assert_eq!(r.cumulative[3], 4, "1000 is <= 1 ms");
        assert_eq!(r.cumulative[BUCKETS - 1], 4, "40 s is past every bound");
    }

    #[test]
    fn averages_are_per_second_and_per_unit() {
        let earlier = Totals {
            xacts: 10,
            queries: 20,
            xact_us: 1000,
            query_us: 1000,
            ..Totals::default()
        };
        let now = Totals {
            xacts: 30,
            queries: 60,
            xact_us: 3000,
            query_us: 5000,
            received: 400,
            ..Totals::default()
        };
        let a = now.averages(&earlier, Duration::from_secs(2));
        assert_eq!((a.xacts, a.queries, a.received), (10, 20, 200));
        assert_eq!((a.xact_us, a.query_us, a.wait_us), (100, 100, 0));
    }
}
