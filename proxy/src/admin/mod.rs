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
mod views;

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

/// The console's settings and the state its commands change.
pub struct Admin {
    pub users: Vec<String>,
    pub database: String,
    pub pause_timeout: Duration,
    pub max_hold: Duration,
    pub stats_period: Duration,
    pub pause: pause::Pause,
    pub averages: crate::stats::Averages,
    pub started: SystemTime,
    shutdown: watch::Sender<Option<Shutdown>>,
}

impl Admin {
    pub fn new(c: &shardline_config::AdminConfig) -> Admin {
        Admin {
            users: c.users.clone(),
            database: c.database.clone(),
            pause_timeout: c.pause_timeout,
            max_hold: c.max_hold,
            stats_period: c.stats_period,
            pause: pause::Pause::default(),
            averages: Default::default(),
            started: SystemTime::now(),
            shutdown: watch::channel(None).0,
        }
    }

    /// Whether this user may use the console.
    pub fn is_admin(&self, user: &str) -> bool {
        self.users.iter().any(|u| u == user)
    }

    /// Whether the console is on at all.
    pub fn enabled(&self) -> bool {
        !self.users.is_empty()
    }

    pub fn request_shutdown(&self, how: Shutdown) {
        self.shutdown.send_replace(Some(how));
    }

    /// Fires when the console asks the proxy to stop.
    pub fn shutdown_requests(&self) -> watch::Receiver<Option<Shutdown>> {
        self.shutdown.subscribe()
    }
}

/// Keeps the averages of SHOW STATS_AVERAGES current: a reading of the
/// totals every `admin.stats_period`.
pub async fn run_averages(shared: std::sync::Weak<crate::Shared>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let totals = views::totals_by_database(&shared);
        shared.admin.averages.update(totals, period);
    }
}
