//! PAUSE and RESUME. A pause holds, by shard, every unit that would begin
//! a transaction there (a session with no server connection, outside a
//! transaction on several shards): the client waits, it gets no error.
//! Units of transactions already open run on, so they can end. RESUME lets
//! the held units run at once. A unit held longer than `admin.max_hold`
//! gets 57P03 instead of waiting on.

use shardline_router::sharding::ShardMask;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tokio::sync::watch;

/// The paused shards, as a mask.
pub struct Pause {
    /// The mask, read by every unit that begins a transaction (one load).
    mask: AtomicU64,
    /// The same, for the units held to wait on.
    changed: watch::Sender<ShardMask>,
}

impl Default for Pause {
    fn default() -> Self {
        Pause {
            mask: AtomicU64::new(0),
            changed: watch::channel(0).0,
        }
    }
}

/// A held unit waited `admin.max_hold` and the pause went on.
#[derive(Debug, PartialEq, Eq)]
pub struct HoldExpired;

impl Pause {
    /// The paused shards.
    #[inline]
    pub fn mask(&self) -> ShardMask {
        self.mask.load(Relaxed)
    }

    pub fn pause(&self, shards: ShardMask) {
        self.changed.send_modify(|m| {
            *m |= shards;
            self.mask.store(*m, Relaxed);
        });
    }

    pub fn resume(&self, shards: ShardMask) {
        self.changed.send_modify(|m| {
            *m &= !shards;
            self.mask.store(*m, Relaxed);
        });
    }

    /// Waits until none of `shards` is paused, for at most `max_hold`.
    pub async fn hold(&self, shards: ShardMask, max_hold: Duration) -> Result<(), HoldExpired> {
        let mut rx = self.changed.subscribe();
        let cleared = tokio::time::timeout(max_hold, rx.wait_for(|m| m & shards == 0)).await;
        match cleared {
            Ok(_) => Ok(()),
            Err(_) => Err(HoldExpired),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_held_unit_runs_when_its_shards_resume() {
        let p = std::sync::Arc::new(Pause::default());
        p.pause(0b11);
        assert_eq!(p.mask(), 0b11);
        let held = tokio::spawn({
            let p = p.clone();
            async move { p.hold(0b10, Duration::from_secs(10)).await }
        });
        p.resume(0b01);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!held.is_finished(), "shard 1 is still paused");
        p.resume(0b10);
        assert_eq!(held.await.expect("task"), Ok(()));
        assert_eq!(p.mask(), 0);
    }

    #[tokio::test]
    async fn a_hold_ends_with_an_error_after_max_hold() {
        let p = Pause::default();
        p.pause(1);
        let r = p.hold(1, Duration::from_millis(20)).await;
        assert_eq!(r, Err(HoldExpired));
        assert_eq!(p.hold(2, Duration::from_millis(20)).await, Ok(()));
    }
}
