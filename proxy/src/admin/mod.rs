//! The admin console: a virtual database (`admin.database`, default
//! `shardline`) on the proxy's own port for the users in `admin.users`. It
//! is a small Postgres server of its own: it answers, never forwards, in
//! PgBouncer's column layouts where PgBouncer has the command.
//!
//! - `command.rs`: the console's statements, parsed (pure).
//! - `views.rs`: the SHOW tables, built from the proxy's state.
//! - `console.rs`: one console connection: reads simple queries, runs
//!   them, encodes the replies with the `pgwire` crate's message types.
//! - `pause.rs`: PAUSE / RESUME, and the hold a paused unit waits in.

mod command;
pub mod console;
pub mod pause;
pub(crate) mod views;

use std::time::{Duration, SystemTime};
use tokio::sync::watch;

/// How SHUTDOWN asked the proxy to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Close every client now (PgBouncer's SHUTDOWN).
    Now,
    /// Stop accepting and let open transactions finish (`proxy.shutdown_timeout`),
    /// as on SIGTERM (PgBouncer's SHUTDOWN WAIT_FOR_SERVERS).
    WaitForServers,
}

/// The console's settings and the state its commands change. One for the
/// process: a reload changes its settings, and keeps its state.
pub struct Admin {
    settings: std::sync::RwLock<Settings>,
    pub pause: pause::Pause,
    pub averages: crate::stats::Averages,
    pub started: SystemTime,
    shutdown: watch::Sender<Option<Shutdown>>,
    /// The configuration sessions move to (set when the proxy starts).
    live: std::sync::OnceLock<std::sync::Weak<crate::Live>>,
    /// The latest configuration's generation (`Shared::generation`).
    latest: std::sync::atomic::AtomicU64,
}

/// `[admin]` as configured.
#[derive(Debug, Clone)]
pub struct Settings {
    pub users: Vec<String>,
    pub database: String,
    pub pause_timeout: Duration,
    pub max_hold: Duration,
    pub stats_period: Duration,
}

impl Settings {
    fn of(c: &shardline_config::AdminConfig) -> Settings {
        Settings {
            users: c.users.clone(),
            database: c.database.clone(),
            pause_timeout: c.pause_timeout,
            max_hold: c.max_hold,
            stats_period: c.stats_period,
        }
    }
}

impl Admin {
    pub fn new(c: &shardline_config::AdminConfig) -> Admin {
        Admin {
            settings: std::sync::RwLock::new(Settings::of(c)),
            pause: pause::Pause::default(),
            averages: Default::default(),
            started: SystemTime::now(),
            shutdown: watch::channel(None).0,
            live: std::sync::OnceLock::new(),
            latest: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn settings(&self) -> Settings {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A reloaded configuration's `[admin]` takes over.
    pub fn configure(&self, c: &shardline_config::AdminConfig) {
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = Settings::of(c);
    }

    /// Whether this user may use the console.
    pub fn is_admin(&self, user: &str) -> bool {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .users
            .iter()
            .any(|u| u == user)
    }

    /// The console's database, when the console is on (some user may use it).
    pub fn console_database(&self) -> Option<String> {
        let s = self.settings.read().unwrap_or_else(|p| p.into_inner());
        (!s.users.is_empty()).then(|| s.database.clone())
    }

    pub fn request_shutdown(&self, how: Shutdown) {
        self.shutdown.send_replace(Some(how));
    }

    /// Fires when the console asks the proxy to stop.
    pub fn shutdown_requests(&self) -> watch::Receiver<Option<Shutdown>> {
        self.shutdown.subscribe()
    }

    /// Where the running configuration lives (for RELOAD and for sessions
    /// moving to a reloaded one).
    pub fn set_live(&self, live: &std::sync::Arc<crate::Live>) {
        let _ = self.live.set(std::sync::Arc::downgrade(live));
    }

    pub fn live(&self) -> Option<std::sync::Arc<crate::Live>> {
        self.live.get()?.upgrade()
    }

    /// The generation sessions should run on.
    #[inline]
    pub fn latest(&self) -> u64 {
        self.latest.load(std::sync::atomic::Ordering::Acquire)
    }

    pub(crate) fn set_latest(&self, generation: u64) {
        self.latest
            .store(generation, std::sync::atomic::Ordering::Release);
    }
}

/// Settings a reload cannot change: they keep their running value until
/// a restart (the reload says so, and applies the rest).
pub const RESTART_ONLY: [&str; 4] = [
    "proxy.listen",
    "proxy.workers",
    "proxy.log_format",
    "metrics.listen",
];

/// What a reload from `old` to `new` changes, one line each (passwords
/// are never shown: a changed user says only that it changed).
pub fn changes(old: &shardline_config::Config, new: &shardline_config::Config) -> Vec<String> {
    let mut out = Vec::new();
    for ((key, before), (_, after)) in views::settings(old).into_iter().zip(views::settings(new)) {
        if before != after {
            out.push(format!("{key}: {before} -> {after}"));
        }
    }
    let nodes = |s: &shardline_config::Shard| -> Vec<String> {
        std::iter::once(&s.primary)
            .chain(&s.replicas)
            .map(|n| n.address())
            .collect()
    };
    for s in &new.shards {
        match old.shards.iter().find(|o| o.name == s.name) {
            None => out.push(format!("shard {} added ({})", s.name, nodes(s).join(", "))),
            Some(o) => {
                let (was, now) = (nodes(o), nodes(s));
                if was[0] != now[0] {
                    out.push(format!(
                        "shard {}: primary {} -> {}",
                        s.name, was[0], now[0]
                    ));
                }
                for a in now[1..].iter().filter(|a| !was[1..].contains(a)) {
                    out.push(format!("shard {}: replica {a} added", s.name));
                }
                for a in was[1..].iter().filter(|a| !now[1..].contains(a)) {
                    out.push(format!("shard {}: replica {a} removed", s.name));
                }
            }
        }
    }
    for o in old
        .shards
        .iter()
        .filter(|o| !new.shards.iter().any(|s| s.name == o.name))
    {
        out.push(format!("shard {} removed", o.name));
    }
    let key = |u: &shardline_config::User| format!("{}@{}", u.name, u.database);
    for u in &new.users {
        match old.users.iter().find(|o| key(o) == key(u)) {
            None => out.push(format!("user {} added", key(u))),
            Some(o) if format!("{o:?}") != format!("{u:?}") => {
                out.push(format!("user {} changed", key(u)))
            }
            Some(_) => {}
        }
    }
    for o in old
        .users
        .iter()
        .filter(|o| !new.users.iter().any(|u| key(u) == key(o)))
    {
        out.push(format!(
            "user {} removed (its sessions end at their next transaction boundary)",
            key(o)
        ));
    }
    out
}

/// Keeps the averages of SHOW STATS_AVERAGES current: a reading of the
/// totals every `admin.stats_period`.
pub async fn run_averages(live: std::sync::Weak<crate::Live>) {
    loop {
        let Some(period) = live
            .upgrade()
            .map(|l| l.current().admin.settings().stats_period)
        else {
            return;
        };
        crate::timer::sleep(period).await;
        let Some(shared) = live.upgrade().map(|l| l.current()) else {
            return;
        };
        let totals = views::totals_by_database(&shared);
        shared.admin.averages.update(totals, period);
    }
}
