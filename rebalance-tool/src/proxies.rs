//! The proxies' admin consoles, driven around a move (`apply --admin`):
//! PAUSE every proxy (clients wait, they get no error), move the rows,
//! RELOAD each with the new config and check it reports the new placement,
//! then RESUME.

use anyhow::{anyhow, bail, Context as _, Result};
use std::time::Instant;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

/// One proxy's console.
struct Console {
    /// `host:port`, for messages.
    label: String,
    client: Client,
}

impl Console {
    /// A setting's value in the proxy's SHOW CONFIG; `None` when it lists
    /// no such key.
    async fn setting(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .client
            .simple_query("SHOW CONFIG")
            .await
            .map_err(|e| anyhow!("proxy {}: SHOW CONFIG: {}", self.label, db_message(&e)))?
            .into_iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) if r.get(0) == Some(key) => {
                    Some(r.get(1).unwrap_or_default().to_string())
                }
                _ => None,
            }))
    }
}

/// The consoles of the proxies named by `--admin`.
pub struct Proxies {
    consoles: Vec<Console>,
    paused_at: Option<Instant>,
}

impl Proxies {
    /// Connects to every console (`postgres://user:password@host:port/shardline`)
    /// before anything is paused: a console that cannot be reached stops
    /// the run with nothing changed.
    pub async fn connect(urls: &[String]) -> Result<Proxies> {
        let mut consoles = Vec::new();
        for url in urls {
            let config: tokio_postgres::Config = url
                .parse()
                .with_context(|| format!("--admin {url}: not a connection URL"))?;
            let label = match (config.get_hosts().first(), config.get_ports().first()) {
                (Some(tokio_postgres::config::Host::Tcp(h)), Some(p)) => format!("{h}:{p}"),
                _ => url.clone(),
            };
            let (client, connection) = config
                .connect(NoTls)
                .await
                .with_context(|| format!("the admin console of proxy {label}"))?;
            tokio::spawn(connection);
            let console = Console { label, client };
            // RELOAD must be able to give it the new config: checked
            // before anything changes (a proxy that says nothing of its
            // file, an older one, is trusted).
            if console.setting("config_file").await?.as_deref() == Some("") {
                bail!(
                    "proxy {} was started without a config file, so RELOAD cannot give it the new config: start it with `shardline --config FILE`, FILE being the one this tool writes (--config-out, by default the --from file). Nothing was changed.",
                    console.label
                );
            }
            consoles.push(console);
        }
        Ok(Proxies {
            consoles,
            paused_at: None,
        })
    }

    /// Whether PAUSE was sent (and not yet answered by RESUME).
    pub fn paused(&self) -> bool {
        self.paused_at.is_some()
    }

    pub fn is_empty(&self) -> bool {
        self.consoles.is_empty()
    }

    pub fn len(&self) -> usize {
        self.consoles.len()
    }

    /// PAUSE on every proxy; if one fails, the ones paused are resumed.
    pub async fn pause(&mut self) -> Result<()> {
        self.paused_at = Some(Instant::now());
        for (i, c) in self.consoles.iter().enumerate() {
            if let Err(e) = c.client.simple_query("PAUSE").await {
                let why = db_message(&e);
                for done in &self.consoles[..i] {
                    let _ = done.client.simple_query("RESUME").await;
                }
                self.paused_at = None;
                bail!(
                    "proxy {} could not pause: {why}. Nothing was moved; the proxies paused before it were resumed",
                    c.label
                );
            }
        }
        Ok(())
    }

    /// RESUME on every proxy (each is tried); returns how long traffic was
    /// held. Nothing to do when they were not paused.
    pub async fn resume(&self) -> Result<f64> {
        if self.paused_at.is_none() {
            return Ok(0.0);
        }
        let mut failed = Vec::new();
        for c in &self.consoles {
            if let Err(e) = c.client.simple_query("RESUME").await {
                failed.push(format!("{}: {}", c.label, db_message(&e)));
            }
        }
        if !failed.is_empty() {
            bail!("RESUME failed on {}", failed.join("; "));
        }
        Ok(self.paused_at.map_or(0.0, |t| t.elapsed().as_secs_f64()))
    }

    /// RELOAD on every proxy, then checks each runs `placement` (the new
    /// config's fingerprint, SHOW CONFIG's `sharding.placement`).
    pub async fn reload(&self, placement: &str) -> Result<()> {
        for c in &self.consoles {
            c.client.simple_query("RELOAD").await.map_err(|e| {
                anyhow!(
                    "proxy {} refused the new config: {}",
                    c.label,
                    db_message(&e)
                )
            })?;
            let running = c.setting("sharding.placement").await?.unwrap_or_default();
            if running != placement {
                bail!(
                    "proxy {} reloaded but runs placement {running}, not the new config's {placement}: does it read the file the new config was written to?",
                    c.label
                );
            }
        }
        Ok(())
    }
}

fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string())
}
