//! What one poll of a session's task shares: one reading of the clock, and
//! a few socket operations made straight on the socket.
//!
//! A session's task is polled once per event: its client's request, its
//! server's answer. Within one poll ([`Turn`]):
//! - The clock is read once ([`crate::clock::Mono::recent`]). The meter
//!   (a unit's start and end) and the pool (the recycle check at checkout,
//!   the return) read it four times per unit otherwise, about 24 ns each on
//!   a virtual machine's TSC clock; a poll lasts microseconds, below what
//!   they measure.
//! - The first [`DIRECT_OPS`] reads and writes of plain sockets are tried on
//!   the socket at once ([`take_direct`], `stream.rs::direct`), past tokio's
//!   cooperative budget and readiness poll (about 60 to 100 instructions
//!   each). A read or write that would block then registers the task as
//!   before. Past them, the operations take tokio's budgeted path again: a
//!   session relaying a long stream in one poll still yields to the other
//!   sessions of its thread when the budget runs out.
//!
//! Outside a turn (startup, health checks, the console) the clock is read
//! each time and sockets take tokio's path.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Socket operations one poll may make straight on the socket. A unit
/// takes four (the client's request read, the server's write, its answer
/// read, the client's write), a pipeline a few more.
pub const DIRECT_OPS: u8 = 16;

thread_local! {
    /// Direct socket operations left in the current turn (0: none open).
    static DIRECT: Cell<u8> = const { Cell::new(0) };
    /// The turn's clock reading (0: none yet, or no turn open).
    static NOW: Cell<u64> = const { Cell::new(0) };
    /// A turn is open on this thread.
    static OPEN: Cell<bool> = const { Cell::new(false) };
}

/// A future whose every poll is a turn.
pub struct Turn<F>(pub F);

impl<F: Future> Future for Turn<F> {
    type Output = F::Output;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let _open = Open::new();
        // SAFETY: the inner future is never moved out of the pinned `Turn`
        // (structural pinning of its one field).
        unsafe { self.map_unchecked_mut(|t| &mut t.0) }.poll(cx)
    }
}

/// An open turn; closed when dropped (a panic in the poll closes it too).
struct Open;

impl Open {
    #[inline]
    fn new() -> Open {
        OPEN.set(true);
        DIRECT.set(DIRECT_OPS);
        NOW.set(0);
        Open
    }
}

impl Drop for Open {
    #[inline]
    fn drop(&mut self) {
        OPEN.set(false);
        DIRECT.set(0);
        NOW.set(0);
    }
}

/// Whether the next socket operation may be tried straight on the socket
/// (counted against the turn's allowance).
#[inline]
pub fn take_direct() -> bool {
    DIRECT.with(|d| {
        let left = d.get();
        d.set(left.saturating_sub(1));
        left > 0
    })
}

/// The turn's clock reading, read by `read` at its first use; outside a
/// turn, `read` each time.
#[inline]
pub(crate) fn now(read: impl FnOnce() -> u64) -> u64 {
    if !OPEN.get() {
        return read();
    }
    match NOW.get() {
        0 => {
            let t = read();
            NOW.set(t);
            t
        }
        t => t,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    /// Polls `f` once inside a turn.
    fn poll_in_turn<T>(f: impl FnOnce() -> T) -> T {
        let mut f = Some(f);
        let mut out = None;
        let mut turn = std::pin::pin!(Turn(std::future::poll_fn(|_| {
            out = Some((f.take().unwrap())());
            Poll::Ready(())
        })));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(turn.as_mut().poll(&mut cx).is_ready());
        out.unwrap()
    }

    #[test]
    fn a_turn_reads_the_clock_once_and_outside_every_time() {
        let reads = Cell::new(0u64);
        let read = || {
            reads.set(reads.get() + 1);
            100 + reads.get()
        };
        let inside = poll_in_turn(|| [now(read), now(read), now(read)]);
        assert_eq!(inside, [101, 101, 101]);
        assert_eq!(reads.get(), 1);
        // A new turn reads afresh; outside one, every call reads.
        assert_eq!(poll_in_turn(|| now(read)), 102);
        assert_eq!([now(read), now(read)], [103, 104]);
    }

    #[test]
    fn a_turn_allows_a_few_direct_operations_and_none_outside() {
        assert!(!take_direct());
        let allowed = poll_in_turn(|| (0..DIRECT_OPS + 4).filter(|_| take_direct()).count());
        assert_eq!(allowed, usize::from(DIRECT_OPS));
        assert!(!take_direct(), "the allowance ends with the turn");
        assert!(poll_in_turn(take_direct), "and starts again in the next");
    }
}
