//! Which socket woke the session: a read whose last poll was pending is not
//! polled again until its own wake-up comes.
//!
//! tokio keeps the waker a pending read registered until the socket becomes
//! readable, and readiness alone wakes it. A session woken by its server's
//! answer would otherwise poll its client's socket again on the way (about
//! 200 instructions, the coop budget, the readiness check, the waker
//! compare), only to be told what it already knows. The read is polled with
//! a waker of its own that notes the wake-up and then wakes the task.
//!
//! A session watches its client's socket and its server connection's (the
//! watch of a server connection lives in it, `ServerConnection`, and goes
//! with it through the pool: a connection lent again is not polled before
//! its server has sent anything, whichever session last polled it).
//!
//! The protocol is `AtomicWaker`'s: the waker sets the flag, then takes and
//! wakes the registered task; a poll registers the task, then reads the
//! flag, on every poll that relies on a wake-up to come (a skipped one
//! too). The registration costs far less than the read it spares.

use futures_util::task::AtomicWaker;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

/// What the read's waker notes: it fired, and the task to wake.
#[derive(Default)]
struct Fired {
    fired: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Fired {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// One socket's read interest, polled through [`ReadWatch::poll`] only.
pub(crate) struct ReadWatch {
    fired: Arc<Fired>,
    /// The waker the read is polled with (made once: tokio compares it with
    /// the one it holds and keeps that one when they are the same).
    waker: Waker,
    /// The last poll was pending, and the socket holds `waker` since.
    parked: bool,
    /// A task is registered (and not let go by `release`).
    holds_task: bool,
}

impl Default for ReadWatch {
    fn default() -> Self {
        let fired = Arc::new(Fired::default());
        ReadWatch {
            waker: Waker::from(fired.clone()),
            fired,
            parked: false,
            holds_task: false,
        }
    }
}

impl ReadWatch {
    /// Polls `read` with the watch's waker, unless its last poll was
    /// pending and nothing woke it since: then it is pending still. A read
    /// of the socket other than through this watch must be preceded by
    /// [`Self::forget`], or a wake-up could be missed. The task woken is
    /// the one that polled last (a session is one task, polled with its
    /// own waker).
    #[inline]
    pub fn poll<T>(
        &mut self,
        cx: &mut Context<'_>,
        read: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        if self.parked {
            // The task is registered on every skip, before the flag is
            // read: a wake-up noted after the read then finds it. The
            // registration made when the read went pending is not enough:
            // a wake-up of an earlier read, whose flag this task has
            // already consumed, may take that registration late (waking
            // the task for nothing) and leave none for the next one.
            self.fired.task.register(cx.waker());
            self.holds_task = true;
            if !self.fired.fired.swap(false, Ordering::AcqRel) {
                return Poll::Pending;
            }
        } else {
            // (A wake-up of a read already answered.)
            self.fired.fired.store(false, Ordering::Relaxed);
        }
        let polled = read(&mut Context::from_waker(&self.waker));
        self.parked = polled.is_pending();
        if self.parked {
            self.fired.task.register(cx.waker());
            self.holds_task = true;
            if self.fired.fired.load(Ordering::Acquire) {
                // Woken before the task was registered: poll again.
                cx.waker().wake_by_ref();
            }
        }
        polled
    }

    /// The socket is about to be read otherwise (its reader may hold
    /// another waker from then on): the next poll reads.
    pub fn forget(&mut self) {
        self.parked = false;
    }

    /// No task polls the socket for now (a connection back in its pool):
    /// the task registered last is let go, so a finished session's task is
    /// not kept alive by an idle connection. A wake-up meanwhile is still
    /// noted, and the next poll reads.
    #[inline]
    pub fn release(&mut self) {
        if self.holds_task {
            self.holds_task = false;
            drop(self.fired.task.take());
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its wake-ups.
    #[derive(Default)]
    pub(crate) struct Count(pub(crate) AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A task that counts its wake-ups, and its waker.
    pub(crate) fn counted_task() -> (Arc<Count>, Waker) {
        let task = Arc::new(Count::default());
        (task.clone(), Waker::from(task))
    }

    #[test]
    fn a_pending_read_is_polled_again_only_after_its_wake_up() {
        let (task, task_waker) = counted_task();
        let mut cx = Context::from_waker(&task_waker);
        let mut watch = ReadWatch::default();
        let polls = std::cell::Cell::new(0);
        let held = std::cell::RefCell::new(None::<Waker>);
        // A socket with nothing to read: it keeps the waker it is polled with.
        let pending = |cx: &mut Context<'_>| {
            polls.set(polls.get() + 1);
            *held.borrow_mut() = Some(cx.waker().clone());
            Poll::<()>::Pending
        };
        assert!(watch.poll(&mut cx, pending).is_pending());
        // Woken by something else: the read is not polled again.
        assert!(watch.poll(&mut cx, pending).is_pending());
        assert!(watch.poll(&mut cx, pending).is_pending());
        assert_eq!(polls.get(), 1);
        // The socket's wake-up wakes the task and lets the next poll read.
        held.take().unwrap().wake();
        assert_eq!(task.0.load(Ordering::Relaxed), 1);
        let ready = |_: &mut Context<'_>| {
            polls.set(polls.get() + 1);
            Poll::Ready(())
        };
        assert!(watch.poll(&mut cx, ready).is_ready());
        // After a read that was ready, the next poll reads again.
        assert!(watch.poll(&mut cx, ready).is_ready());
        assert_eq!(polls.get(), 3);
        // Pending again, then woken before anything else: read again.
        assert!(watch.poll(&mut cx, pending).is_pending());
        held.take().unwrap().wake_by_ref();
        assert!(watch.poll(&mut cx, pending).is_pending());
        assert_eq!(polls.get(), 5);
        assert_eq!(task.0.load(Ordering::Relaxed), 2);
    }

    /// A wake-up of an earlier read that takes the task's registration
    /// late (after the task consumed its flag and registered again, for
    /// the next read) wakes the task for nothing; the skip that follows
    /// registers it again, so the next read's wake-up still wakes it. Seen
    /// under load: a session that never read its client's next request.
    #[test]
    fn a_late_wake_up_taking_the_registration_loses_no_later_one() {
        let (task, task_waker) = counted_task();
        let mut cx = Context::from_waker(&task_waker);
        let mut watch = ReadWatch::default();
        let held = std::cell::RefCell::new(None::<Waker>);
        let pending = |cx: &mut Context<'_>| {
            *held.borrow_mut() = Some(cx.waker().clone());
            Poll::<()>::Pending
        };
        // The read goes pending; the task is registered.
        assert!(watch.poll(&mut cx, pending).is_pending());
        // The late half of an earlier wake-up: the registration is taken
        // (and the task woken), the flag long consumed.
        watch.fired.task.take().unwrap().wake();
        assert_eq!(task.0.load(Ordering::Relaxed), 1);
        // Woken for nothing: the read is skipped.
        let mut polled = false;
        assert!(watch
            .poll(&mut cx, |_| {
                polled = true;
                Poll::<()>::Pending
            })
            .is_pending());
        assert!(!polled);
        // The read's own wake-up (its data came) wakes the task.
        held.take().unwrap().wake();
        assert_eq!(task.0.load(Ordering::Relaxed), 2, "the task was woken");
        assert!(watch.poll(&mut cx, |_| Poll::Ready(())).is_ready());
    }

    #[test]
    fn after_forget_the_next_poll_reads() {
        let (_task, task_waker) = counted_task();
        let mut cx = Context::from_waker(&task_waker);
        let mut watch = ReadWatch::default();
        assert!(watch.poll(&mut cx, |_| Poll::<()>::Pending).is_pending());
        watch.forget();
        let mut polled = false;
        let _ = watch.poll(&mut cx, |_| {
            polled = true;
            Poll::<()>::Pending
        });
        assert!(polled);
    }
}
