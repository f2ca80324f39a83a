//! The proxy's monotonic clock as whole nanoseconds.
//!
//! `Mono` reads `CLOCK_MONOTONIC`, the clock `std::time::Instant` reads on
//! Linux, and keeps it as one `u64`: a reading is one vDSO call and a
//! multiply, a difference one subtraction. The data path reads the clock a
//! few times per unit (the meter, the pool's recycle check and return, the
//! console's request time, the hot-key window); with `Instant` the
//! arithmetic around each reading (seconds and nanoseconds normalised and
//! checked) cost about as much as the reading itself.

use std::time::Duration;

/// A reading of the monotonic clock, in nanoseconds since an unspecified
/// start (the system's boot on Linux). Never 0 once read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mono(u64);

impl Mono {
    /// Now.
    #[inline]
    pub fn now() -> Mono {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC is
        // always available on Linux, so the call cannot fail.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        Mono((ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64)
    }

    /// Now, as read first in the current poll of a session
    /// (`turn::Turn`): the unit's meter and its pool checkout and return
    /// share one reading. Outside a session's poll, [`Mono::now`].
    #[inline]
    pub fn recent() -> Mono {
        Mono(crate::turn::now(|| Mono::now().0))
    }

    /// Nanoseconds from `earlier` to `self` (0 when `earlier` is later).
    #[inline]
    pub fn nanos_since(self, earlier: Mono) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// Microseconds from `earlier` to `self` (0 when `earlier` is later).
    #[inline]
    pub fn micros_since(self, earlier: Mono) -> u64 {
        self.nanos_since(earlier) / 1_000
    }

    /// The time from `earlier` to `self` (zero when `earlier` is later).
    #[inline]
    pub fn since(self, earlier: Mono) -> Duration {
        Duration::from_nanos(self.nanos_since(earlier))
    }

    /// `self` moved `d` later.
    pub fn after(self, d: Duration) -> Mono {
        Mono(
            self.0
                .saturating_add(d.as_nanos().min(u128::from(u64::MAX)) as u64),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_never_go_back_and_agree_with_instant() {
        let (m0, i0) = (Mono::now(), std::time::Instant::now());
        std::thread::sleep(Duration::from_millis(20));
        let (i1, m1) = (std::time::Instant::now(), Mono::now());
        assert!(m1 > m0 && m0 != Mono::default());
        // The same clock: the Mono interval holds the Instant one, read
        // inside it, and is not much longer.
        let mono = m1.since(m0);
        let instant = i1.duration_since(i0);
        assert!(mono >= instant, "{mono:?} < {instant:?}");
        assert!(
            mono - instant < Duration::from_millis(5),
            "{mono:?} vs {instant:?}"
        );
        assert!(mono >= Duration::from_millis(20));
    }

    #[test]
    fn differences_saturate_at_zero() {
        let (a, b) = (Mono(5_000), Mono(12_345_678));
        assert_eq!(b.nanos_since(a), 12_340_678);
        assert_eq!(b.micros_since(a), 12_340);
        assert_eq!(a.nanos_since(b), 0);
        assert_eq!(a.since(b), Duration::ZERO);
        assert_eq!(a.after(Duration::from_micros(3)), Mono(8_000));
        assert_eq!(b.after(Duration::MAX), Mono(u64::MAX));
    }
}
