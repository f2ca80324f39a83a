//! A bare relay on tokio, the benchmark's floor for a proxy built on it:
//! each client gets a server connection of its own and bytes are copied
//! both ways, one task per direction, 16 KiB at a time. Nothing is read,
//! routed, pooled or counted, so its CPU per transaction is what tokio's
//! reads, writes and wake-ups cost alone (`shardline-bench`, target
//! `relay`).
//!
//! Its config file has two lines: `listen = 127.0.0.1:PORT` and
//! `upstream = 127.0.0.1:PORT`.
//!
//! The same relay, recording, sits in front of a test's server
//! (`Recording`): what a proxy wrote to its server in one write.

use anyhow::{Context as _, Result};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// The config's listen line for `port` (a `Launch::port_text`).
pub fn listen_line(port: u16) -> String {
    format!("listen = 127.0.0.1:{port}")
}

/// The relay's config for `listen_port`, relaying to `upstream_port`.
pub fn config(listen_port: u16, upstream_port: u16) -> String {
    format!(
        "{}\nupstream = 127.0.0.1:{upstream_port}\n",
        listen_line(listen_port)
    )
}

/// Runs the relay of the config at `path` until the process is killed, on
/// one thread (as a one-worker Shardline and PgBouncer run).
pub fn run(path: &std::path::Path) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let value = |key: &str| -> Result<String> {
        text.lines()
            .find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == key).then(|| v.trim().to_string())
            })
            .with_context(|| format!("{key} missing from {}", path.display()))
    };
    let (listen, upstream) = (value("listen")?, value("upstream")?);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(&listen).await?;
        loop {
            let (client, _) = listener.accept().await?;
            tokio::spawn(relay(client, upstream.clone(), None));
        }
    })
}

/// Relays one client to a connection of its own to `upstream` until
/// either side closes; `record` keeps what the client writes.
async fn relay(client: TcpStream, upstream: String, record: Option<Pieces>) {
    let Ok(server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::spawn(pump(server_read, client_write, None));
    pump(client_read, server_write, record).await;
}

/// Copies what `from` reads to `to` until either side closes, keeping
/// each read in `record`.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    record: Option<Pieces>,
) {
    let mut buf = vec![0u8; 16 << 10];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        if let Some(record) = &record {
            record.lock().unwrap().push(buf[..n].to_vec());
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// What a recording relay's clients wrote, one entry per read, over all
/// its connections in order. A client's write of a few hundred bytes
/// arrives in one read; two writes separated by the server's answer never
/// share one.
pub type Pieces = std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>;

/// A relay in front of a server, in the calling runtime, keeping what its
/// clients write (`Pieces`): which messages a proxy sent its server in
/// one write. Stops accepting when dropped.
pub struct Recording {
    pub port: u16,
    pieces: Pieces,
    accept: tokio::task::JoinHandle<()>,
}

impl Recording {
    /// Relays to `127.0.0.1:upstream`.
    pub async fn start(upstream: u16) -> Result<Recording> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let pieces = Pieces::default();
        let record = pieces.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let to = format!("127.0.0.1:{upstream}");
                tokio::spawn(relay(client, to, Some(record.clone())));
            }
        });
        Ok(Recording {
            port,
            pieces,
            accept,
        })
    }

    /// The pieces kept since the last call.
    pub fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.pieces.lock().unwrap())
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
