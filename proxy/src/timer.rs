//! The proxy's timers: each armed timer is a Linux timerfd on the runtime's
//! I/O driver.
//!
//! The proxy's runtime is built without tokio's time driver (see
//! `main.rs`). With it, every park of the runtime, about one per
//! transaction under load, locked the timer wheel, looked for its next
//! expiry and read the clock two or three times (about 480 instructions),
//! whether or not a timer was due. The proxy's timers are few and off the
//! statement path: health checks, the pool's and memory's ticks, a client's
//! login deadline, waits for a pool slot or a drain. Here each one that
//! must wait becomes a timerfd, registered with the same epoll as the
//! sockets: it costs nothing until armed, then a few system calls (create,
//! set, register, read, close) and nothing per park.
//!
//! A timer that cannot get a timerfd (the process is out of descriptors)
//! falls back to a tokio timer on a thread of its own, started then. The
//! thread is not started up front: a second thread makes glibc take its
//! multi-threaded path in every `send` and `recv` (about 25 instructions
//! each, some 190 per transaction).
//!
//! Code in the proxy uses these functions, never `tokio::time`'s
//! (`proxy/clippy.toml` refuses those): on the proxy's runtime those panic
//! ("timers are disabled").

use std::future::{Future, IntoFuture};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
pub use tokio::time::Instant;

/// A deadline passed before the future it guarded completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

impl std::fmt::Display for Elapsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("deadline has elapsed")
    }
}

impl std::error::Error for Elapsed {}

/// Completes at its deadline. Nothing is armed until it is first polled
/// before the deadline.
#[must_use = "a timer does nothing unless awaited"]
pub struct Sleep {
    deadline: Instant,
    armed: Armed,
}

enum Armed {
    No,
    Fd(AsyncFd<OwnedFd>),
    /// No timerfd could be had: a tokio timer on the fallback thread.
    Thread(Pin<Box<tokio::time::Sleep>>),
    /// Neither: the deadline is treated as passed (logged once).
    Failed,
}

/// Completes after `d`.
pub fn sleep(d: Duration) -> Sleep {
    sleep_until(far(Instant::now(), d))
}

/// Completes at `deadline`.
pub fn sleep_until(deadline: Instant) -> Sleep {
    Sleep {
        deadline,
        armed: Armed::No,
    }
}

/// `now + d`, or about thirty years on if that overflows.
fn far(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30))
}

impl Sleep {
    /// The time it completes.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Moves the deadline; an armed timerfd is set again, not replaced.
    pub fn reset(&mut self, deadline: Instant) {
        self.deadline = deadline;
        match &mut self.armed {
            Armed::Fd(fd) => {
                if set(fd.get_ref(), deadline).is_err() {
                    self.armed = Armed::No;
                }
            }
            Armed::Thread(s) => s.as_mut().reset(deadline),
            Armed::No | Armed::Failed => self.armed = Armed::No,
        }
    }

    fn arm(&mut self) {
        #[cfg(test)]
        tests::ARMED.with(|n| n.set(n.get() + 1));
        let fd = match tokio::runtime::Handle::try_current() {
            Ok(_) => timerfd(self.deadline),
            // Polled outside a runtime (no I/O driver to register with).
            Err(e) => Err(io::Error::other(e)),
        };
        self.armed = match fd {
            Ok(fd) => Armed::Fd(fd),
            Err(e) => match fallback_thread() {
                Some(handle) => {
                    let _entered = handle.enter();
                    #[allow(clippy::disallowed_methods)]
                    let s = tokio::time::sleep_until(self.deadline);
                    tracing::debug!(error = %e, "timer on the fallback thread");
                    Armed::Thread(Box::pin(s))
                }
                None => {
                    static LOGGED: std::sync::Once = std::sync::Once::new();
                    LOGGED.call_once(|| {
                        tracing::error!(error = %e, "cannot arm a timer: deadlines expire at once")
                    });
                    Armed::Failed
                }
            },
        };
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            match &mut this.armed {
                Armed::No => {
                    if Instant::now() >= this.deadline {
                        return Poll::Ready(());
                    }
                    this.arm();
                }
                Armed::Fd(fd) => {
                    let mut guard = match ready!(fd.poll_read_ready(cx)) {
                        Ok(g) => g,
                        // (Not seen on Linux; a timer of another kind then.)
                        Err(_) => {
                            this.armed = Armed::No;
                            continue;
                        }
                    };
                    match guard.try_io(|fd| read_expirations(fd.get_ref())) {
                        Ok(_) => return Poll::Ready(()),
                        Err(_would_block) => continue,
                    }
                }
                Armed::Thread(s) => return s.as_mut().poll(cx),
                Armed::Failed => return Poll::Ready(()),
            }
        }
    }
}

/// A nonblocking CLOCK_MONOTONIC timerfd (the clock `Instant` reads) set
/// to fire at `deadline`, on the current runtime's I/O driver.
fn timerfd(deadline: Instant) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: plain system call; a valid descriptor is owned below.
    let raw = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor just opened and owned by no one else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set(&fd, deadline)?;
    // SAFETY: the `OwnedFd` is open, owned by the `AsyncFd` for its whole
    // life and always names the same descriptor.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(|e| e.into_parts().1)
}

/// Sets `fd` to fire once, at `deadline` (at once if it has passed).
fn set(fd: &OwnedFd, deadline: Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    // A zero it_value disarms a timerfd: fire in a nanosecond instead.
    let left = left.max(Duration::from_nanos(1));
    let spec = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: libc::timespec {
            tv_sec: left.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_nsec: left.subsec_nanos() as libc::c_long,
        },
    };
    // SAFETY: `fd` is an open timerfd and `spec` a valid itimerspec.
    let r = unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads a timerfd's expiration count (WouldBlock while it has not fired).
fn read_expirations(fd: &OwnedFd) -> io::Result<u64> {
    let mut n = 0u64;
    // SAFETY: reads 8 bytes into `n`, which is 8 bytes long.
    let r = unsafe { libc::read(fd.as_raw_fd(), (&mut n as *mut u64).cast(), 8) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n)
}

/// The fallback thread's runtime (time driver only), started on first
/// need; `None` when it cannot be.
fn fallback_thread() -> Option<&'static tokio::runtime::Handle> {
    static HANDLE: OnceLock<Option<tokio::runtime::Handle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .ok()?;
            let handle = runtime.handle().clone();
            std::thread::Builder::new()
                .name("shardline-timer".into())
                .stack_size(256 * 1024)
                .spawn(move || runtime.block_on(std::future::pending::<()>()))
                .ok()?;
            Some(handle)
        })
        .as_ref()
}

/// `fut`, or `Elapsed` if it has not completed after `d`.
pub fn timeout<F: IntoFuture>(
    d: Duration,
    fut: F,
) -> impl Future<Output = Result<F::Output, Elapsed>> {
    timeout_at(far(Instant::now(), d), fut)
}

/// `fut`, or `Elapsed` if it has not completed by `deadline`. A future
/// that completes on its first poll arms no timer.
pub fn timeout_at<F: IntoFuture>(
    deadline: Instant,
    fut: F,
) -> impl Future<Output = Result<F::Output, Elapsed>> {
    let fut = fut.into_future();
    async move {
        let mut fut = std::pin::pin!(fut);
        let mut sleep = sleep_until(deadline);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(v) = fut.as_mut().poll(cx) {
                return Poll::Ready(Ok(v));
            }
            Pin::new(&mut sleep).poll(cx).map(|()| Err(Elapsed))
        })
        .await
    }
}

/// Ticks every `period`, the first at once. A late tick delays the ones
/// after it rather than bursting to catch up. One timerfd serves every
/// tick.
pub struct Interval {
    period: Duration,
    sleep: Sleep,
}

/// See [`Interval`].
pub fn interval(period: Duration) -> Interval {
    Interval {
        period,
        sleep: sleep_until(Instant::now()),
    }
}

impl Interval {
    /// Waits for the next tick; returns when it was due.
    pub async fn tick(&mut self) -> Instant {
        (&mut self.sleep).await;
        let due = self.sleep.deadline();
        let next = far(Instant::now(), self.period);
        self.sleep.reset(next);
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        /// Timers armed on this thread (each test's runtime runs on its own).
        pub(super) static ARMED: Cell<usize> = const { Cell::new(0) };
    }

    fn armed() -> usize {
        ARMED.with(Cell::get)
    }

    fn runtime() -> tokio::runtime::Runtime {
        // As the binary builds it: no time driver.
        tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap()
    }

    /// Timers fire on a runtime without a time driver (where
    /// `tokio::time::sleep` would panic), no earlier than asked.
    #[test]
    fn timers_work_on_a_runtime_without_a_time_driver() {
        runtime().block_on(async {
            let t0 = std::time::Instant::now();
            sleep(Duration::from_millis(30)).await;
            assert!(t0.elapsed() >= Duration::from_millis(30));

            let never = std::future::pending::<()>();
            let t0 = std::time::Instant::now();
            assert_eq!(
                timeout(Duration::from_millis(20), never).await,
                Err(Elapsed)
            );
            assert!(t0.elapsed() >= Duration::from_millis(20));

            let deadline = Instant::now() + Duration::from_millis(10);
            let never = std::future::pending::<()>();
            assert!(timeout_at(deadline, never).await.is_err());
            // A passed deadline completes at once, arming nothing.
            let before = armed();
            sleep_until(deadline).await;
            assert_eq!(armed(), before);

            let mut tick = interval(Duration::from_millis(15));
            let t0 = std::time::Instant::now();
            let before = armed();
            for _ in 0..4 {
                tick.tick().await;
            }
            // The first tick is at once, the next three 15 ms apart, all
            // on one timerfd.
            assert!(t0.elapsed() >= Duration::from_millis(45));
            assert_eq!(armed(), before + 1);
        });
    }

    /// The earlier of two timers wins; the later one, dropped, is gone.
    #[test]
    fn the_earlier_timer_wins() {
        runtime().block_on(async {
            let won = tokio::select! {
                _ = sleep(Duration::from_secs(5)) => false,
                _ = sleep(Duration::from_millis(5)) => true,
            };
            assert!(won);
        });
    }

    /// A future ready at once arms nothing; one that waits arms a timer.
    #[test]
    fn timeout_arms_a_timer_only_for_a_future_that_waits() {
        runtime().block_on(async {
            let before = armed();
            assert_eq!(timeout(Duration::from_secs(5), async { 7 }).await, Ok(7));
            assert_eq!(armed(), before);

            let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
            let mut waiting = std::pin::pin!(timeout(Duration::from_secs(5), rx));
            let mut cx = Context::from_waker(std::task::Waker::noop());
            assert!(waiting.as_mut().poll(&mut cx).is_pending());
            assert_eq!(armed(), before + 1);
            tx.send(3).unwrap();
            assert_eq!(waiting.await, Ok(Ok(3)));
        });
    }

    /// Outside any runtime a timer still fires (on the fallback thread).
    #[test]
    fn a_timer_polled_outside_a_runtime_uses_the_fallback_thread() {
        let t0 = std::time::Instant::now();
        let mut s = sleep(Duration::from_millis(10));
        let waker = std::sync::Arc::new(Flag::default());
        let w = std::task::Waker::from(waker.clone());
        let mut cx = Context::from_waker(&w);
        assert!(Pin::new(&mut s).poll(&mut cx).is_pending());
        assert!(matches!(s.armed, Armed::Thread(_)));
        while !waker.0.load(std::sync::atomic::Ordering::SeqCst) {
            assert!(t0.elapsed() < Duration::from_secs(10), "never woken");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(Pin::new(&mut s).poll(&mut cx).is_ready());
        assert!(t0.elapsed() >= Duration::from_millis(10));
    }

    #[derive(Default)]
    struct Flag(std::sync::atomic::AtomicBool);

    impl std::task::Wake for Flag {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}
