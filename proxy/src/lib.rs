//! Shardline: a PostgreSQL proxy. This crate holds the running proxy: the
//! listener, client sessions, the wire protocol, authentication, server
//! connection pools, and the `demo` and `check` commands. See ARCHITECTURE.md.

pub mod auth;
pub mod cancel;
pub mod check;
pub mod cluster;
pub mod demo;
pub mod protocol;
pub mod server;
pub mod session;
pub mod stream;
pub mod tls;

use anyhow::{Context as _, Result};
use server::pool::{NodePool, PoolSet, ShardPools};
use server::ServerTarget;
use shardline_config::{Config, PoolMode};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// A user the proxy accepts, with what it needs to serve them.
pub struct UserEntry {
    pub name: String,
    pub database: String,
    pub secret: auth::Secret,
    pub mode: PoolMode,
    pub pools: Arc<PoolSet>,
}

/// State every session shares; built once from the configuration.
pub struct Shared {
    pub users: HashMap<(String, String), Arc<UserEntry>>,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub cancel: Arc<cancel::CancelRegistry>,
    pub statements: session::prepared::StatementRegistry,
    /// Source of unique tokens (unnamed statement ownership).
    pub next_token: AtomicU64,
    pub max_message_size: usize,
    pub auth_timeout: Duration,
}

impl Shared {
    pub fn from_config(config: &Config) -> Result<Shared> {
        if config.shards.len() > 1 {
            // Routing by sharding key is not built yet; using only the first
            // shard would silently return partial results.
            anyhow::bail!(
                "{} shards are configured, but this version routes to a single shard; configure exactly one [[shards]] entry",
                config.shards.len()
            );
        }
        let server_tls = match config.pool.server_tls {
            shardline_config::ServerTlsMode::Disable => None,
            _ => Some(tls::connector(config.pool.server_tls_ca.as_deref())?),
        };
        let mut users = HashMap::new();
        for u in &config.users {
            let size = u.pool_size.unwrap_or(config.pool.size);
            let shards = config
                .shards
                .iter()
                .map(|s| {
                    let pool = |n: &shardline_config::Node| {
                        let target = ServerTarget {
                            host: n.host.clone(),
                            port: n.port,
                            user: u.server_user().to_string(),
                            password: u.server_password().map(str::to_string),
                            database: u.database.clone(),
                            tls_mode: config.pool.server_tls,
                            tls: server_tls.clone(),
                        };
                        NodePool::new(target, size, &config.pool)
                    };
                    ShardPools {
                        name: s.name.clone(),
                        primary: pool(&s.primary),
                        replicas: s.replicas.iter().map(pool).collect(),
                    }
                })
                .collect();
            let secret = auth::Secret::for_user(u).map_err(anyhow::Error::msg)?;
            let entry = UserEntry {
                name: u.name.clone(),
                database: u.database.clone(),
                secret,
                mode: u.pool_mode.unwrap_or(config.proxy.pool_mode),
                pools: Arc::new(PoolSet { shards }),
            };
            users.insert((u.name.clone(), u.database.clone()), Arc::new(entry));
        }
        let tls = match (&config.tls.cert, &config.tls.key) {
            (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
            _ => None,
        };
        Ok(Shared {
            users,
            tls,
            cancel: Arc::default(),
            statements: Default::default(),
            next_token: AtomicU64::new(1),
            max_message_size: config.proxy.max_message_size as usize,
            auth_timeout: config.proxy.auth_timeout,
        })
    }
}

/// A running proxy.
pub struct Proxy {
    pub local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Binds the listener and starts accepting clients.
    pub async fn start(config: Config) -> Result<Proxy> {
        let shared = Arc::new(Shared::from_config(&config)?);
        let listener = TcpListener::bind(config.proxy.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.proxy.listen))?;
        let local_addr = listener.local_addr()?;
        let (tx, rx) = watch::channel(false);
        let grace = config.proxy.shutdown_timeout;
        let task = tokio::spawn(accept_loop(listener, shared, rx, grace));
        tracing::info!(%local_addr, "shardline listening");
        Ok(Proxy {
            local_addr,
            shutdown: tx,
            task,
        })
    }

    /// Stops accepting; running transactions get `shutdown_timeout` to finish.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Waits until every session has ended (after `shutdown`).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let mut sessions = JoinSet::new();
    // One stop signal per session; ended sessions' senders are pruned as it grows.
    let mut stops: Vec<tokio::sync::oneshot::Sender<()>> = Vec::new();
    let mut prune_at = 64;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
                    stops.push(stop_tx);
                    if stops.len() >= prune_at {
                        stops.retain(|s| !s.is_closed());
                        prune_at = (stops.len() * 2).max(64);
                    }
                    sessions.spawn(serve_client(shared.clone(), tcp, peer, stop_rx));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    for s in stops.drain(..) {
        let _ = s.send(());
    }
    let open = sessions.len();
    if open > 0 {
        tracing::info!(open, ?grace, "shutting down: waiting for open transactions");
    }
    let drained = tokio::time::timeout(grace, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            remaining = sessions.len(),
            "shutdown timeout reached; closing remaining clients"
        );
        sessions.shutdown().await;
    }
}

async fn serve_client(
    shared: Arc<Shared>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    let started = tokio::time::timeout(
        shared.auth_timeout,
        session::startup::accept(&shared, tcp, peer),
    )
    .await;
    let Ok(session::startup::Outcome::LoggedIn(login, registration)) = started else {
        return;
    };
    let s = session::Session::new(shared.clone(), login, registration.slot.clone(), stop);
    s.run().await;
    drop(registration);
}

/// Sets up logging: `RUST_LOG` filters (default `info`), text or JSON.
pub fn init_logging(format: shardline_config::LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        shardline_config::LogFormat::Json => builder.json().try_init(),
        shardline_config::LogFormat::Text => builder.try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_shards_are_refused_until_routing_exists() {
        let text = r#"
            [[users]]
            name = "a"
            auth = "trust"
            database = "a"
            [[shards]]
            name = "s0"
            primary = { host = "127.0.0.1", port = 1 }
            [[shards]]
            name = "s1"
            primary = { host = "127.0.0.1", port = 2 }
        "#;
        let config = Config::from_toml(text, "t.toml").unwrap();
        let err = Shared::from_config(&config)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("2 shards are configured"), "{err}");
    }
}
