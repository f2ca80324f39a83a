//! PAUSE and RESUME. A pause holds, by shard, every unit that would begin
//! a transaction there (a session with no server connection, outside a
//! transaction on several shards): the client waits, it gets no error.
//! Units of transactions already open run on, so they can end. RESUME lets
//! the held units run at once. A unit held longer than `admin.max_hold`
//! gets 57P03 instead of waiting on.

use shardline_router::sharding::ShardMask;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;
use tokio::sync::watch;

/// The paused shards, as a mask.
pub struct Pause {
    /// The mask, read by every unit that begins a transaction (one load).
    mask: AtomicU64,
    /// The same, for the units held to wait on.
    changed: watch::Sender<ShardMask>,
    /// Units between their look at the mask and their connection's
    /// checkout: a PAUSE waits for them too, or one could look before the
    /// pause began and check out after it was done.
    entering: AtomicUsize,
}

/// A unit beginning a transaction, from its look at the mask until it
/// holds its connection (dropped then, or before it waits in a hold).
pub struct Entry(std::sync::Arc<super::Admin>);

impl Drop for Entry {
    fn drop(&mut self) {
        self.0.pause.entering.fetch_sub(1, SeqCst);
    }
}

impl Default for Pause {
    fn default() -> Self {
        Pause {
            mask: AtomicU64::new(0),
            changed: watch::channel(0).0,
            entering: AtomicUsize::new(0),
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
        self.mask.load(SeqCst)
    }

    /// A unit begins a transaction: counted until the entry is dropped;
    /// then it reads the mask.
    pub fn enter(admin: &std::sync::Arc<super::Admin>) -> (Entry, ShardMask) {
        admin.pause.entering.fetch_add(1, SeqCst);
        let entry = Entry(admin.clone());
        let mask = admin.pause.mask();
        (entry, mask)
    }

    /// Units between their look at the mask and their checkout.
    pub fn entering(&self) -> usize {
        self.entering.load(SeqCst)
    }

    pub fn pause(&self, shards: ShardMask) {
        self.changed.send_modify(|m| {
            *m |= shards;
            self.mask.store(*m, SeqCst);
        });
    }

    pub fn resume(&self, shards: ShardMask) {
        self.changed.send_modify(|m| {
            *m &= !shards;
            self.mask.store(*m, SeqCst);
        });
    }

    /// Waits until none of `shards` is paused, for at most `max_hold`.
    pub async fn hold(&self, shards: ShardMask, max_hold: Duration) -> Result<(), HoldExpired> {
        let mut rx = self.changed.subscribe();
        let cleared = crate::timer::timeout(max_hold, rx.wait_for(|m| m & shards == 0)).await;
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
        crate::timer::sleep(Duration::from_millis(30)).await;
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
