//! Heap memory freed under load goes back to the system once the proxy is
//! idle.
//!
//! glibc's allocator returns freed memory to the system only from the top
//! of the heap. After a burst (many clients, larger replies), the chunks
//! freed below a live one stay resident: about 1 MiB after a pgbench run
//! of 16 clients, an eighth of an idle proxy's resident memory. When no
//! client traffic moved for a whole tick, `malloc_trim` hands those pages
//! back (the memory stays the allocator's, free; touching it again costs a
//! page fault). It runs once per idle period, never while clients are
//! busy, so it takes nothing from the data path.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Weak;
use std::time::Duration;

/// How often the traffic counters are read.
pub const TICK: Duration = Duration::from_secs(1);

/// When to trim, from a reading of the traffic counters per tick.
#[derive(Debug, Default)]
pub struct IdleTrim {
    /// The reading at the last tick.
    last: Option<u64>,
    /// The reading the last trim was made at.
    trimmed_at: Option<u64>,
}

impl IdleTrim {
    /// Takes this tick's reading; true when the heap should be trimmed:
    /// nothing moved since the last tick, and something had since the last
    /// trim (a proxy that stays idle trims once). The first reading only
    /// starts the count.
    pub fn tick(&mut self, reading: u64) -> bool {
        let idle = self.last == Some(reading);
        self.last = Some(reading);
        if idle && self.trimmed_at != Some(reading) {
            self.trimmed_at = Some(reading);
            return true;
        }
        false
    }
}

/// Bytes and units the clients of the current config sent and received.
fn traffic(shared: &crate::Shared) -> u64 {
    shared.users.values().fold(0u64, |sum, u| {
        let s = &u.stats;
        sum.wrapping_add(s.received.load(Relaxed))
            .wrapping_add(s.sent.load(Relaxed))
            .wrapping_add(s.queries.load(Relaxed))
    })
}

/// Trims the heap after each idle tick (see the module), until the proxy
/// is gone.
pub async fn give_back_when_idle(live: Weak<crate::Live>) {
    let mut trim = IdleTrim::default();
    loop {
        crate::timer::sleep(TICK).await;
        let Some(shared) = live.upgrade().map(|l| l.current()) else {
            return;
        };
        if trim.tick(traffic(&shared)) {
            // On this thread: the proxy is idle, and the walk over the free
            // chunks takes well under a millisecond. (A blocking-pool thread
            // would cost more resident memory, its stack and the code that
            // starts it, than some trims give back.)
            trim_heap();
        }
    }
}

/// Returns the heap's free pages to the system; logs what it gave back.
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // The resident size is read only for the debug log: reading it
        // runs code the proxy otherwise never runs, resident once run.
        let logged = tracing::enabled!(tracing::Level::DEBUG);
        let kib = || resident_bytes().unwrap_or(0) / 1024;
        let before = if logged { kib() } else { 0 };
        // SAFETY: malloc_trim takes the allocator's own locks and only
        // releases free pages; no memory in use is touched.
        let released = unsafe { libc::malloc_trim(0) } == 1;
        if logged {
            tracing::debug!(
                released,
                before_kib = before,
                after_kib = kib(),
                "idle: freed heap memory returned to the system"
            );
        }
    }
}

/// The process's resident memory, bytes (Linux: /proc/self/statm): the
/// trim's debug log, SHOW MEM and the `resident_memory_bytes` metric.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_per_idle_period_and_never_while_busy() {
        let mut t = IdleTrim::default();
        // The first reading only starts the count, even if idle.
        assert!(!t.tick(0));
        // Idle from the start: one trim, then none while it stays idle.
        assert!(t.tick(0));
        assert!(!t.tick(0));
        assert!(!t.tick(0));
        // Busy: the counters move every tick.
        for r in [5, 9, 40, 41] {
            assert!(!t.tick(r), "trimmed while busy at {r}");
        }
        // Idle again: one trim.
        assert!(t.tick(41));
        assert!(!t.tick(41));
        // One burst between two ticks is a new idle period.
        assert!(!t.tick(50));
        assert!(t.tick(50));
    }

    #[test]
    fn resident_memory_is_read() {
        #[cfg(target_os = "linux")]
        assert!(resident_bytes().is_some_and(|b| b > 0));
    }
}
