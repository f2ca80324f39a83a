//! The clients logged in, and where each one's CancelRequest goes.
//!
//! Every client gets the proxy's own key (BackendKeyData) and a slot here,
//! listed until it leaves. A cancel with that key is sent to the server
//! connections the client is using at that moment (one, or every shard of a
//! statement that runs on several), with each server's key, and to nothing
//! when it uses none: a client can only ever cancel its own query. The admin
//! console reads the same slots (SHOW CLIENTS, the links of SHOW SERVERS),
//! ends one (KILL_CLIENT), and names the clients a PAUSE waits for.

use crate::protocol::startup::{code_packet, CANCEL_REQUEST};
use futures_util::task::AtomicWaker;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio::io::AsyncWriteExt;

#[derive(Clone)]
struct Target {
    addr: Arc<str>,
    pid: i32,
    secret: i32,
}

/// Who a client is, as the console shows it.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub user: String,
    pub database: String,
    pub peer: SocketAddr,
    pub local: Option<SocketAddr>,
    pub application_name: String,
    pub tls: bool,
    /// A connection to the admin console.
    pub console: bool,
}

/// One client: who it is, the servers it uses now (where its cancel goes),
/// and how the console ends it.
pub struct ClientSlot {
    targets: Mutex<Vec<Target>>,
    pub info: ClientInfo,
    pub connected: SystemTime,
    /// When it began waiting (a server connection, a PAUSE), in
    /// `health::now_ms`; 0 while not waiting.
    wait_since: AtomicU64,
    /// When the client last sent a request (unix seconds).
    requested: AtomicU64,
    /// The shards of its transaction when it spans several (a mask).
    spanning: AtomicU64,
    /// How its session is ended from outside (shutdown, KILL_CLIENT).
    pub ending: Arc<Ending>,
}

/// What ends a session from outside: the proxy shutting down
/// ([`Ending::STOP`]) and the console's KILL_CLIENT ([`Ending::KILL`]). One
/// word and one waker, polled by the session at every wake-up: when
/// nothing fired that is a waker check and a load.
#[derive(Default)]
pub struct Ending {
    fired: AtomicU8,
    waker: AtomicWaker,
}

impl Ending {
    pub const STOP: u8 = 1;
    pub const KILL: u8 = 2;

    pub fn fire(&self, what: u8) {
        self.fired.fetch_or(what, Ordering::Release);
        self.waker.wake();
    }

    /// What has fired (a mask of `STOP`, `KILL`); the task is woken when
    /// more fires.
    pub fn poll(&self, cx: &mut std::task::Context<'_>) -> u8 {
        // Registered before the load: a fire in between is seen here or
        // wakes the task.
        self.waker.register(cx.waker());
        self.fired.load(Ordering::Acquire)
    }

    /// [`Ending::poll`] for a poller that keeps the waker it registered
    /// last in `registered`: while nothing has fired, the same waker is not
    /// registered again (a registration is two atomic exchanges, and a
    /// session polls at every wake-up). Nothing fired means no `fire` has
    /// taken the registered waker yet: one that comes wakes it.
    #[inline]
    pub fn poll_from(
        &self,
        cx: &mut std::task::Context<'_>,
        registered: &mut Option<std::task::Waker>,
    ) -> u8 {
        let fired = self.fired.load(Ordering::Acquire);
        if fired == 0 && registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return 0;
        }
        let fired = self.poll(cx);
        // (After a fire the waker was taken: registered again each time.)
        *registered = (fired == 0).then(|| cx.waker().clone());
        fired
    }

    /// Whether `what` has fired.
    pub fn has(&self, what: u8) -> bool {
        self.fired.load(Ordering::Acquire) & what != 0
    }

    /// Resolves when `what` fires.
    pub async fn fired(&self, what: u8) {
        std::future::poll_fn(|cx| {
            if self.poll(cx) & what != 0 {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await
    }
}

impl ClientSlot {
    fn new(info: ClientInfo, ending: Arc<Ending>) -> ClientSlot {
        ClientSlot {
            targets: Mutex::new(Vec::new()),
            info,
            connected: SystemTime::now(),
            wait_since: AtomicU64::new(0),
            requested: AtomicU64::new(crate::health::now_ms()),
            spanning: AtomicU64::new(0),
            ending,
        }
    }

    /// The servers the client uses now: (address, backend pid).
    pub fn servers(&self) -> Vec<(Arc<str>, i32)> {
        self.targets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|t| (t.addr.clone(), t.pid))
            .collect()
    }

    /// The client sent a request at `at` (the session's own clock read:
    /// none is taken here).
    pub fn request(&self, at: crate::clock::Mono) {
        self.requested.store(crate::health::ms_at(at), Relaxed);
    }

    /// When the client last sent a request (on the wall clock, for the
    /// console: the time kept is the proxy's monotonic one).
    pub fn requested(&self) -> SystemTime {
        let ago = crate::health::now_ms().saturating_sub(self.requested.load(Relaxed));
        SystemTime::now() - std::time::Duration::from_millis(ago)
    }

    /// The shards of the client's transaction on several shards (0 when it has none).
    pub fn set_spanning(&self, shards: u64) {
        self.spanning.store(shards, Relaxed);
    }

    pub fn spanning(&self) -> u64 {
        self.spanning.load(Relaxed)
    }

    /// The client waits (for a server connection, or a pause to end).
    pub fn waiting(&self, yes: bool) {
        let since = if yes { crate::health::now_ms() } else { 0 };
        self.wait_since.store(since, Relaxed);
    }

    /// How long the client has been waiting, if it is.
    pub fn waited(&self) -> Option<std::time::Duration> {
        match self.wait_since.load(Relaxed) {
            0 => None,
            since => Some(std::time::Duration::from_millis(
                crate::health::now_ms().saturating_sub(since),
            )),
        }
    }

    /// Ends the client's session (KILL_CLIENT): its session sees the kill
    /// at once and closes with 57P01.
    pub fn kill(&self) {
        self.ending.fire(Ending::KILL);
    }

    pub fn attach(&self, addr: Arc<str>, pid: i32, secret: i32) {
        self.attach_all(std::iter::once((addr, pid, secret)));
    }

    /// A statement running on several servers at once.
    pub fn attach_all(&self, servers: impl Iterator<Item = (Arc<str>, i32, i32)>) {
        let mut t = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        t.clear();
        t.extend(servers.map(|(addr, pid, secret)| Target { addr, pid, secret }));
    }

    pub fn detach(&self) {
        self.targets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Cancels what the client's servers run now, and forgets them: the
    /// client left in the middle of a statement, whose connection is to be
    /// closed. A server notices a closed connection only when it next
    /// reads or writes, so the statement (and the locks its transaction
    /// holds) would run on to its end.
    pub fn cancel_and_detach(&self) {
        let targets = std::mem::take(&mut *self.targets.lock().unwrap_or_else(|p| p.into_inner()));
        send_cancels(targets);
    }
}

/// Sends each target its CancelRequest, each on a connection of its own, in
/// the background.
fn send_cancels(targets: Vec<Target>) {
    for t in targets {
        tokio::spawn(async move {
            let sent = async {
                let mut s = tokio::net::TcpStream::connect(&*t.addr).await?;
                s.write_all(&code_packet(CANCEL_REQUEST, &[t.pid, t.secret]))
                    .await?;
                s.shutdown().await
            };
            if let Err(e) = sent.await {
                tracing::warn!(server = %t.addr, error = %e, "could not forward cancel request");
            }
        });
    }
}

/// Every client logged in, by the key the proxy gave it (its id in the
/// console).
#[derive(Default)]
pub struct Clients {
    clients: Mutex<HashMap<i32, (i32, Arc<ClientSlot>)>>,
}

/// A client's key and slot; removes itself from the registry when dropped.
pub struct Registration {
    pub pid: i32,
    pub secret: i32,
    pub slot: Arc<ClientSlot>,
    registry: Arc<Clients>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut m) = self.registry.clients.lock() {
            m.remove(&self.pid);
        }
    }
}

impl Clients {
    pub fn register(self: &Arc<Self>, info: ClientInfo, ending: Arc<Ending>) -> Registration {
        let slot = Arc::new(ClientSlot::new(info, ending));
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let (pid, secret) = loop {
            let pid = (rand::random::<u32>() & 0x7fff_ffff) as i32;
            if pid != 0 && !clients.contains_key(&pid) {
                break (pid, rand::random::<i32>());
            }
        };
        clients.insert(pid, (secret, slot.clone()));
        Registration {
            pid,
            secret,
            slot,
            registry: self.clone(),
        }
    }

    /// Every client, by id, in id order.
    pub fn list(&self) -> Vec<(i32, Arc<ClientSlot>)> {
        let clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<_> = clients
            .iter()
            .map(|(id, (_, slot))| (*id, slot.clone()))
            .collect();
        all.sort_by_key(|(id, _)| *id);
        all
    }

    /// The client with this id.
    pub fn get(&self, id: i32) -> Option<Arc<ClientSlot>> {
        let clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients.get(&id).map(|(_, slot)| slot.clone())
    }

    /// Forwards a cancel for the client with this key, if it has a query running.
    pub fn cancel(&self, pid: i32, secret: i32) {
        let targets = {
            let clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
            match clients.get(&pid) {
                Some((s, slot))
                    if crate::auth::constant_time_eq(&s.to_be_bytes(), &secret.to_be_bytes()) =>
                {
                    slot.targets
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone()
                }
                _ => Vec::new(),
            }
        };
        if targets.is_empty() {
            tracing::debug!(pid, "cancel request matches no running query");
            return;
        }
        send_cancels(targets);
    }
}

#[cfg(test)]
mod tests {
    use super::Ending;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_poller_registers_its_waker_once_until_something_fires() {
        use crate::wake::tests::Count;
        use std::sync::atomic::Ordering::Relaxed;
        use std::task::{Context, Waker};
        let ending = Ending::default();
        let (a, b) = (Arc::new(Count::default()), Arc::new(Count::default()));
        let (wa, wb) = (Waker::from(a.clone()), Waker::from(b.clone()));
        let mut registered = None;
        let mut poll = |w: &Waker| ending.poll_from(&mut Context::from_waker(w), &mut registered);
        assert_eq!(poll(&wa), 0);
        assert_eq!(poll(&wa), 0);
        // Another waker takes the registration.
        assert_eq!(poll(&wb), 0);
        ending.fire(Ending::STOP);
        assert_eq!((a.0.load(Relaxed), b.0.load(Relaxed)), (0, 1));
        // The fire took the waker: polled again, it is registered again,
        // and the next fire wakes it too.
        assert_eq!(poll(&wb), Ending::STOP);
        assert_eq!(poll(&wb), Ending::STOP);
        ending.fire(Ending::KILL);
        assert_eq!(b.0.load(Relaxed), 2);
    }

    #[tokio::test]
    async fn a_fired_ending_wakes_its_waiting_session_and_stays_fired() {
        let ending = Arc::new(Ending::default());
        let waiting = tokio::spawn({
            let ending = ending.clone();
            async move { ending.fired(Ending::KILL).await }
        });
        // A STOP does not end a wait for KILL.
        ending.fire(Ending::STOP);
        crate::timer::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        assert!(ending.has(Ending::STOP) && !ending.has(Ending::KILL));
        ending.fire(Ending::KILL);
        assert!(ending.has(Ending::KILL));
        crate::timer::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken by the kill")
            .unwrap();
        let seen = std::future::poll_fn(|cx| std::task::Poll::Ready(ending.poll(cx))).await;
        assert_eq!(seen, Ending::STOP | Ending::KILL);
    }
}
