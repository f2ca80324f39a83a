//! CancelRequest routing. Clients get the proxy's own key (BackendKeyData); a
//! cancel with that key is sent to the server connections the client is using
//! at that moment (one, or every shard of a statement that runs on several),
//! with each server's key, and to nothing when it uses none. A client can only
//! ever cancel its own query.

use crate::protocol::startup::{code_packet, CANCEL_REQUEST};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::io::AsyncWriteExt;

#[derive(Clone)]
struct Target {
    addr: Arc<str>,
    pid: i32,
    secret: i32,
}

/// Where one client's cancel goes right now.
#[derive(Default)]
pub struct CancelSlot {
    targets: Mutex<Vec<Target>>,
}

impl CancelSlot {
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
}

#[derive(Default)]
pub struct CancelRegistry {
    clients: Mutex<HashMap<i32, (i32, Arc<CancelSlot>)>>,
}

/// A client's key; removes itself from the registry when dropped.
pub struct Registration {
    pub pid: i32,
    pub secret: i32,
    pub slot: Arc<CancelSlot>,
    registry: Arc<CancelRegistry>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut m) = self.registry.clients.lock() {
            m.remove(&self.pid);
        }
    }
}

impl CancelRegistry {
    pub fn register(self: &Arc<Self>) -> Registration {
        let slot = Arc::new(CancelSlot::default());
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
}
