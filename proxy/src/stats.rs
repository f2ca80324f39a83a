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
    unit_since: Option<Instant>,
    /// When the client's transaction began.
    xact_since: Option<Instant>,
    received: u64,
    sent: u64,
}

impl Meter {
    /// The client sent `n` bytes; returns true when they begin a request
    /// (nothing was being answered).
    #[inline]
    pub fn received(&mut self, n: usize) -> bool {
        self.received += n as u64;
        if self.unit_since.is_some() {
            return false;
        }
        let now = Instant::now();
        self.unit_since = Some(now);
        self.xact_since.get_or_insert(now);
        true
    }

    /// The client's output buffer is about to be written: counts what was
    /// added to it since (`more`: the client has sent more than what is
    /// answered, so its next unit starts at once).
    pub fn queued(&mut self, out: &[u8], more: bool, stats: &Stats) {
        let counted = self.counted.min(out.len());
        self.counted = out.len();
        self.sent(&out[counted..], more, stats);
    }

    /// `n` bytes left the front of the output buffer.
    pub fn drained(&mut self, n: usize) {
        self.counted = self.counted.saturating_sub(n);
    }

    fn sent(&mut self, written: &[u8], more: bool, stats: &Stats) {
        self.sent += written.len() as u64;
        let mut ended = [0u8; 8];
        let n = self.scan.ready_statuses(written, &mut ended);
        if n == 0 {
            return;
        }
        let now = Instant::now();
        let (mut queries, mut xacts, mut query_us, mut xact_us) = (0u64, 0u64, 0u64, 0u64);
        for &status in &ended[..n.min(ended.len())] {
            queries += 1;
            if let Some(t) = self.unit_since.take() {
                query_us += now.saturating_duration_since(t).as_micros() as u64;
            }
            if status == b'I' {
                xacts += 1;
                if let Some(t) = self.xact_since.take() {
                    xact_us += now.saturating_duration_since(t).as_micros() as u64;
                }
            }
        }
        // Units beyond the few counted here (a long pipeline answered in
        // one write) count as queries without time.
        queries += n.saturating_sub(ended.len()) as u64;
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
}

impl Scan {
    /// Writes the statuses of the ReadyForQuery messages that end in
    /// `bytes` into `out` (as many as fit); returns how many there were.
    fn ready_statuses(&mut self, mut bytes: &[u8], out: &mut [u8]) -> usize {
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
                self.left -= k;
                bytes = &bytes[k..];
                continue;
            }
            let k = (5 - self.got).min(bytes.len());
            self.header[self.got..self.got + k].copy_from_slice(&bytes[..k]);
            self.got += k;
            bytes = &bytes[k..];
            if self.got == 5 {
                self.got = 0;
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                self.left = len.saturating_sub(4);
                self.ready = self.header[0] == b'Z' && self.left == 1;
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn ready_for_query_is_found_however_the_writes_split() {
        let mut stream = Vec::new();
        stream.extend(message(b'T', b"\0\x01xx"));
        stream.extend(message(b'Z', b"T"));
        stream.extend(message(b'D', b"ZZZZZ"));
        stream.extend(message(b'C', b"SELECT 1\0"));
        stream.extend(message(b'Z', b"I"));
        for cut in 0..stream.len() {
            for cut2 in cut..stream.len() {
                let mut scan = Scan::default();
                let mut seen = Vec::new();
                for part in [&stream[..cut], &stream[cut..cut2], &stream[cut2..]] {
                    let mut out = [0u8; 8];
                    let n = scan.ready_statuses(part, &mut out);
                    seen.extend_from_slice(&out[..n]);
                }
                assert_eq!(seen, b"TI", "cut at {cut} and {cut2}");
            }
        }
    }

    #[test]
    fn a_session_counts_queries_transactions_and_bytes() {
        let stats = Stats::default();
        let mut m = Meter::default();
        m.received(20);
        let mut out = message(b'Z', b"T");
        m.queued(&out, false, &stats);
        // Half of it written: nothing is counted twice.
        m.drained(3);
        out.drain(..3);
        m.queued(&out, false, &stats);
        assert_eq!(stats.queries.load(Relaxed), 1);
        m.drained(3);
        out.clear();
        m.received(10);
        let mut end = message(b'C', b"COMMIT\0");
        end.extend(message(b'Z', b"I"));
        m.queued(&end, false, &stats);
        assert_eq!(stats.queries.load(Relaxed), 2);
        assert_eq!(stats.xacts.load(Relaxed), 1);
        assert_eq!(stats.received.load(Relaxed), 30);
        assert_eq!(stats.sent.load(Relaxed), 6 + end.len() as u64);
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
