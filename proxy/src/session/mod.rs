//! One client connection after login: a state machine between the client's
//! socket and (at most) one borrowed server connection.
//!
//! The session forwards the client's raw frames and the server's raw replies.
//! It reads only what it must: message tags to know where units end, statement
//! names to map prepared statements, and the few commands that change session
//! state. Rows pass through whole, in runs (a merged read on several
//! shards is the one place rows are decoded: `gather.rs`).
//!
//! Where the server connection comes from is decided in [`Session::attach_server`]:
//! the one place a per-statement or per-transaction routing decision plugs in.
//! A connection is returned to its pool when the server is idle (`I`), nothing
//! sent is unanswered and the client is not mid-unit (transaction pooling), or
//! when the client leaves (session pooling).

mod analysis;
mod attach;
mod cached;
mod client;
mod copy;
mod distributed;
mod fanout;
mod gather;
mod io;
mod leg;
pub mod pending;
mod pipeline;
mod rename;
mod route;
mod server;
mod slow;
mod split;
pub mod startup;
mod txn;
mod unit;

use crate::clients::ClientSlot;
use crate::protocol::backend::{self, sqlstate, PgError};
use crate::server::statements::Statement;
use crate::server::vars::{self, SessionVars};
use crate::Shared;
use attach::{Placed, Purpose, Rerun};
use bytes::{Bytes, BytesMut};
use pending::{Kind, Pending, Synthetic};
use shardline_config::PoolMode;
use shardline_router::effect::Effect;
use shardline_router::shards::Construct;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use txn::Txn;
use unit::Inflow;

pub use startup::LoggedIn;

/// Client output is written out once this much is buffered.
const FLUSH_AT: usize = 64 * 1024;

/// What Postgres answers in a failed transaction, for one the proxy failed.
fn failed_transaction() -> PgError {
    PgError::error(
        sqlstate::IN_FAILED_SQL_TRANSACTION,
        "current transaction is aborted, commands ignored until end of transaction block",
    )
}

/// The console ended the client's session (KILL_CLIENT).
fn killed() -> PgError {
    PgError::fatal(
        sqlstate::ADMIN_SHUTDOWN,
        "terminating connection due to administrator command",
    )
}

/// A statement of an open transaction needs another shard, or several at
/// once, and the transaction may not take them in: without two-phase
/// commit, or (with it) a transaction reading from replicas or pooled by
/// session. `on`: the shard the transaction runs on, by name.
fn cross_shard_transaction(shared: &Shared, on: Option<&str>) -> PgError {
    let two_phase = shared.two_phase.is_some();
    let why = if two_phase {
        "a transaction reading from replicas (READ ONLY) or under session pooling may use one shard only"
    } else {
        "without sharding.two_phase_commit a transaction may use one shard only"
    };
    let message = match on {
        Some(name) => format!(
            "this transaction runs on shard {name}, and the statement needs another shard: {why}"
        ),
        None => format!("the statement needs several shards at once: {why}"),
    };
    let hint = if two_phase {
        "run it outside the transaction, or in a read-write transaction under transaction pooling"
    } else {
        "run it outside the transaction, keep the transaction's statements on one sharding key, or turn on sharding.two_phase_commit"
    };
    shared
        .events
        .refusals
        .refuse(Construct::Transaction, message)
        .with_hint(hint)
}

/// Stop reading a side while this much is waiting to be written to the other.
const BACKPRESSURE: usize = 256 * 1024;
/// How much of an unfinished unit the session holds before acting on it
/// (`must_act`): a unit waiting for its Sync is routed past this.
const UNIT_HOLD: usize = 1024 * 1024;
/// The client's bytes held while its session waits, beyond the message
/// still arriving (`io.rs::reads_client`); above `UNIT_HOLD`, so a unit
/// being gathered can always reach the point where it is acted on.
const CLIENT_IN_LIMIT: usize = 2 * UNIT_HOLD;

/// The commands the unit now answering completed, as its server reported
/// them: a unit whose one completion is ROLLBACK (a lone ROLLBACK, or a
/// COMMIT of a failed transaction, which the server answers so) committed
/// nothing, whatever the client's text looked like when it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Completed {
    Nothing,
    Rollback,
    Other,
}

impl Completed {
    /// After one more completion, ROLLBACK or not.
    fn then(self, rollback: bool) -> Completed {
        match self {
            Completed::Nothing if rollback => Completed::Rollback,
            _ => Completed::Other,
        }
    }
}

/// Whether a unit may run on the attached server.
pub(super) enum Fit {
    Yes,
    /// Yes, and before its end arrived (a Flush after a Bind, or more than
    /// is held): it opens as `Unit::Early`.
    Early,
    /// The transaction moves to another shard: a connection there joins it.
    Join,
    /// Its Sync has not arrived: wait for more of it.
    NotYet,
    /// Not on this server: route it once the server is released.
    Wait,
    /// Refused (inside a transaction on another shard); answered.
    Refused,
    /// Needs several shards: run on the transaction's connections there.
    Fanout,
    /// The client keeps its connection for its session state and is
    /// between transactions: the unit, for other shards, runs on
    /// connections borrowed for it.
    Beside,
}

/// What the front message means for a transaction on several shards.
pub(super) enum Next {
    /// A lone COMMIT or ROLLBACK.
    End(TxnEnd),
    Refuse(PgError),
    Other,
}

/// How the client ends a transaction on several shards.
#[derive(Debug, Clone, Copy)]
pub(super) struct TxnEnd {
    /// COMMIT (else ROLLBACK).
    pub commit: bool,
}

/// Why a session ended.
#[derive(Debug)]
pub enum End {
    /// The client closed the socket or sent Terminate.
    ClientGone,
    /// Reported to the client as FATAL, then closed.
    Fatal(PgError),
}

/// The client's unnamed statement, kept so that a later Bind prepares it
/// again on whichever connection runs it.
struct Unnamed {
    /// Which Parse it was (unique in the process); a server connection
    /// records the token of the unnamed statement it holds.
    token: u64,
    /// The Parse body after the name: query text and parameter types (a
    /// slice of the client's frame, not a copy).
    definition: Bytes,
    effect: Option<Effect>,
    route: shardline_router::Route,
}

pub struct Session {
    shared: Arc<Shared>,
    login: LoggedIn,
    client_in: BytesMut,
    /// The unit at the front of `client_in` as `plan_unit` analysed it:
    /// plan, placement, statements' routes, keys (`analysis.rs`);
    /// forgotten by `forget_plan` wherever the buffer or the session's
    /// state changes other than by taking messages off its front.
    analysis: analysis::UnitAnalysis,
    client_out: BytesMut,
    /// The attached server connection and where it belongs (`attach.rs`).
    server: Option<Placed>,
    server_out: BytesMut,
    pending: VecDeque<Pending>,
    /// Session variables the client has set.
    vars: Arc<SessionVars>,
    /// Effects of the current transaction, applied when it commits.
    txn_effects: Vec<Effect>,
    /// An error occurred since the last ReadyForQuery.
    unit_failed: bool,
    /// The commands completed since the last ReadyForQuery.
    completed: Completed,
    /// The client's named statements. Looked up on every Bind, so hashed
    /// with foldhash (seeded per session) rather than SipHash, which cost
    /// about 200 instructions per look-up of a short name.
    statements: HashMap<Box<[u8]>, Arc<Statement>, foldhash::fast::RandomState>,
    /// Parameter types the servers reported for the client's statements
    /// (ParameterDescription of its Describe), by Parse definition: a
    /// merged read declares them in the statement it rewrites, so the
    /// shards type the parameters as they did for the client.
    described: HashMap<Bytes, Vec<u32>>,
    /// Effects of portals bound to session-changing statements (rare).
    portal_effects: HashMap<Box<[u8]>, Effect>,
    /// The client's unnamed statement.
    unnamed: Option<Unnamed>,
    /// What the proxy holds of the client's transaction: a BEGIN not sent
    /// yet, a failure of its own (`txn.rs`).
    txn: Txn,
    /// The client's transaction on several shards (`distributed.rs`).
    spanning: distributed::Spanning,
    /// `SET shardline.shard` / `SET shardline.sharding_key`.
    session_shard: Option<String>,
    session_key: Option<String>,
    /// `SET shardline.role`: every unit to the primary or to replicas.
    session_role: Option<shardline_router::RoleHint>,
    /// Something that may write ran since the last WAL position was taken:
    /// read-your-writes records the position when the connection is released.
    wrote: bool,
    /// A commit ended on the attached server whose WAL position is not
    /// known yet (taken with the position query at release).
    position_pending: Option<crate::PositionPending>,
    /// Under transaction pooling, why the client keeps its server
    /// connection: a statement left state on it (`Route::session_state`).
    pinned: Option<&'static str>,
    /// What the attached server was chosen for (`attach.rs`).
    purpose: Purpose,
    /// Hash of the client's address (client_hash balancing).
    client_hash: u64,
    /// The current read unit, while it can still run on another node.
    rerun: Rerun,
    /// Client messages wait for the attached server to finish its unit
    /// before they are routed.
    waiting: bool,
    /// How far the client's extended-protocol unit has reached (`unit.rs`).
    unit: unit::Unit,
    /// How the client's next messages are taken: as they come, waiting for
    /// the proxy's own Sync, skipped to Sync, or in COPY (`unit.rs`).
    inflow: unit::Inflow,
    /// The server sent a FATAL error and is closing the connection.
    server_fatal: Option<String>,
    /// The client's entry in the registry: where its cancel goes, what the
    /// console shows of it.
    client: Arc<ClientSlot>,
    /// The proxy is shutting down (`client.ending` fired STOP, seen in
    /// `poll_io`).
    stopping: bool,
    /// The client left (or was killed) while a unit waited on its shards
    /// (`Session::leg_next`): the unit's servers are cancelled, and the
    /// session ends with this once the unit is given up.
    left: Option<End>,
    /// The client's traffic, added to its user's stats per answered unit.
    meter: crate::stats::Meter,
    /// A cacheable unit read on a server: its reply, kept when it ends.
    fill: Option<Box<cached::Fill>>,
    /// Tables the client wrote, dropped from the result cache at each
    /// ReadyForQuery it is sent until it is idle.
    cache_writes: cached::Written,
    /// The client socket's read interest: not polled again while it waits
    /// and nothing woke it (`wake.rs`).
    client_read: crate::wake::ReadWatch,
    /// The waker registered last on `client.ending` (`Ending::poll_from`).
    ending_waker: Option<std::task::Waker>,
}

impl Session {
    pub fn new(shared: Arc<Shared>, login: LoggedIn, client: Arc<ClientSlot>) -> Session {
        let client_hash = {
            use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
            BuildHasherDefault::<DefaultHasher>::default().hash_one(login.peer.ip())
        };
        // `options=-c shardline.role=replica` and the like: the proxy's own.
        let mut session_role = None;
        let (mut session_shard, mut session_key) = (None, None);
        for (name, value) in vars::startup_settings(&login.params) {
            use shardline_router::hint::SessionSetting;
            let Some((prefix, name)) = name.split_once('.') else {
                continue;
            };
            if !prefix.eq_ignore_ascii_case("shardline") {
                continue;
            }
            match shardline_router::hint::setting(name, Some(value)) {
                Some(SessionSetting::Role(r)) => session_role = r,
                Some(SessionSetting::Shard(s)) => session_shard = s,
                Some(SessionSetting::Key(k)) => session_key = k,
                Some(SessionSetting::Show(_)) | None => {}
            }
        }
        Session {
            vars: Arc::new(SessionVars::from_startup(&login.params)),
            txn: Txn::Plain,
            spanning: Default::default(),
            session_shard,
            session_key,
            session_role,
            wrote: false,
            position_pending: None,
            pinned: None,
            purpose: Purpose::Any,
            client_hash,
            rerun: Rerun::default(),
            waiting: false,
            shared,
            login,
            client_in: BytesMut::with_capacity(8 * 1024),
            analysis: Default::default(),
            client_out: BytesMut::with_capacity(16 * 1024),
            server: None,
            server_out: BytesMut::with_capacity(8 * 1024),
            pending: VecDeque::with_capacity(16),
            txn_effects: Vec::new(),
            unit_failed: false,
            completed: Completed::Nothing,
            statements: HashMap::default(),
            described: HashMap::new(),
            portal_effects: HashMap::new(),
            unnamed: None,
            unit: unit::Unit::Closed,
            inflow: unit::Inflow::Open,
            server_fatal: None,
            client,
            stopping: false,
            left: None,
            meter: Default::default(),
            fill: None,
            cache_writes: Default::default(),
            client_read: Default::default(),
            ending_waker: None,
        }
    }

    fn mode(&self) -> PoolMode {
        self.login.user.mode
    }

    /// Whether the client keeps its server connection between transactions:
    /// session pooling, or a connection holding the client's session state.
    fn keeps_connection(&self) -> bool {
        self.mode() == PoolMode::Session || self.pinned.is_some()
    }

    /// Runs the session until the client leaves, then returns or discards the
    /// server connection.
    pub async fn run(mut self) {
        let end = self.event_loop().await;
        if let End::Fatal(e) = &end {
            tracing::debug!(user = %self.login.user.name, error = %e, "closing client");
            e.encode(&mut self.client_out);
        }
        let _ = crate::timer::timeout(Duration::from_secs(5), self.flush_client()).await;
        // A client that leaves right after its commit: the position is
        // still learned, for the user's other connections.
        let _ = crate::timer::timeout(Duration::from_secs(5), self.finish_positions()).await;
        self.finish_server().await;
        self.meter.finish(&self.login.user.stats);
    }

    async fn event_loop(&mut self) -> End {
        loop {
            self.forget_plan();
            if self.stopping && self.is_idle() {
                return End::Fatal(PgError::fatal(
                    sqlstate::ADMIN_SHUTDOWN,
                    "terminating connection because the proxy is shutting down",
                ));
            }
            let step = match std::future::poll_fn(|cx| self.poll_io(cx)).await {
                io::Event::ClientData => self.client_data().await,
                io::Event::ServerData => self.on_server_data(),
                io::Event::ClientClosed => Err(End::ClientGone),
                io::Event::ServerLost(e) => self.on_server_lost(e).map(|rerun| {
                    self.waiting |= rerun;
                }),
                io::Event::Stop => Ok(()),
                io::Event::Killed => Err(End::Fatal(killed())),
            };
            // Client messages held back until the server finished (or a read
            // to run again elsewhere) are routed now.
            let step = match step {
                Ok(()) if self.waiting && self.pending.is_empty() => self.client_data().await,
                other => other,
            };
            if let Err(end) = step {
                return end;
            }
            self.publish_spanning();
            self.shrink_buffers();
        }
    }

    /// Handles the client's messages, borrowing a server connection when one
    /// is needed: the only wait on this path.
    async fn client_data(&mut self) -> Result<(), End> {
        self.waiting = false;
        loop {
            self.route_large_ahead().await;
            match self.on_client_data()? {
                client::Flow::Done => break,
                client::Flow::Wait => {
                    self.waiting = true;
                    break;
                }
                client::Flow::EndDistributed(end) => self.end_distributed(end).await?,
                client::Flow::Fanout => {
                    let planned = self.plan_unit();
                    self.run_fanout(planned, true).await?
                }
                client::Flow::Beside => self.run_beside().await?,
                client::Flow::NeedServer if self.take_local_answer()? => {}
                client::Flow::NeedServer if matches!(self.txn, Txn::Failed { unsent: Some(_) }) => {
                    // A transaction refused before it reached any server.
                    self.in_unstarted_refused_transaction()?;
                }
                client::Flow::NeedServer => {
                    self.adopt_latest()?;
                    self.prepare_join().await;
                    if self.txn == (Txn::Failed { unsent: None }) && self.spanning.spans() {
                        // The joining shard could not begin: the unit fails.
                        self.fail_next_message(PgError::error(
                            sqlstate::CONNECTION_FAILURE,
                            "a shard of the transaction did not answer; the transaction is failed: send ROLLBACK",
                        ))?;
                        continue;
                    }
                    let planned = self.plan_unit();
                    if !planned.complete
                        && self.shared.several_nodes
                        && !self.must_act()
                        && self
                            .unit_messages()
                            .all(|(tag, body)| crate::protocol::frontend::well_formed(tag, body))
                    {
                        // The shard and the node depend on the whole unit
                        // (a Parse arriving alone would go to the primary):
                        // wait for its Sync. Not behind a malformed message:
                        // it is refused as it comes, as a server does.
                        break;
                    }
                    if self.shared.caching {
                        if let cached::Cached::Hit = self.cache_lookup(&planned)? {
                            continue;
                        }
                    }
                    let Some(entry) = self.held_by_pause(&planned).await? else {
                        // Held (then run afresh: a RELOAD during the pause
                        // may have moved its rows, so it is placed again
                        // on the configuration it now finds), or held past
                        // admin.max_hold and answered with an error.
                        continue;
                    };
                    if entry.is_some() {
                        if let Some(e) = self.placement_behind() {
                            self.fail_next_message(e)?;
                            continue;
                        }
                    }
                    self.run_unit(planned).await?;
                    // Its connection is lent now (a PAUSE sees it there).
                    drop(entry);
                }
            }
        }
        self.emit_unowed_synthetic();
        // Messages answered by the proxy alone may leave the connection idle.
        self.maybe_release();
        Ok(())
    }

    /// A unit that would begin a transaction on a paused shard waits here
    /// until the shard resumes (admin PAUSE). Units of a transaction
    /// already open on a server run on, so it can end. `Some` when the unit
    /// runs now, with the pause entry to drop once its connection is lent
    /// (a unit that begins a transaction); `None` when it was held: it is
    /// to be planned again (on the configuration found after the pause),
    /// or it outlasted `admin.max_hold` and was failed (57P03).
    async fn held_by_pause(
        &mut self,
        planned: &analysis::Planned,
    ) -> Result<Option<Option<crate::admin::pause::Entry>>, End> {
        if self.server.is_some() || self.spanning.spans() {
            return Ok(Some(None));
        }
        let (entry, paused) = crate::admin::pause::Pause::enter(&self.shared.admin);
        if paused == 0 {
            return Ok(Some(Some(entry)));
        }
        let shards = self.unit_shards(&planned.place);
        if paused & shards == 0 {
            return Ok(Some(Some(entry)));
        }
        drop(entry);
        let admin = &self.shared.admin;
        let max_hold = admin.settings().max_hold;
        self.client.waiting(true);
        let kill = self.client.ending.fired(crate::clients::Ending::KILL);
        let held = tokio::select! {
            held = admin.pause.hold(shards, max_hold) => Some(held),
            () = kill => None,
        };
        self.client.waiting(false);
        // `fired` registered its own waker.
        self.ending_waker = None;
        match held {
            None => Err(End::Fatal(killed())),
            Some(Ok(())) => {
                self.forget_plan();
                Ok(None)
            }
            Some(Err(_)) => {
                self.fail_next_message(
                    PgError::error(
                        sqlstate::CANNOT_CONNECT_NOW,
                        format!(
                            "the proxy is paused by its operator (admin PAUSE) and the statement waited admin.max_hold ({:?})",
                            max_hold
                        ),
                    )
                    .with_hint("retry once the proxy is resumed (admin RESUME)"),
                )?;
                Ok(None)
            }
        }
    }

    /// A shard records a placement other than this config's: rows were
    /// moved (`shardline-rebalance`) and this proxy was not reloaded, so it
    /// would miss rows or write where they no longer are. Every transaction
    /// is refused until it is reloaded; those already open run on.
    fn placement_behind(&self) -> Option<PgError> {
        let own = self.shared.placement;
        let shard = self.shared.topology.shards.iter().find(|s| {
            let recorded = s
                .recorded_placement
                .load(std::sync::atomic::Ordering::Relaxed);
            recorded != 0 && recorded != own
        })?;
        let recorded = shard
            .recorded_placement
            .load(std::sync::atomic::Ordering::Relaxed);
        Some(
            PgError::error(
                sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!(
                    "shard {} has rows placed by configuration {recorded:016x}, but this proxy runs {own:016x}: it was not reloaded after shardline-rebalance moved rows, and would miss them",
                    shard.name
                ),
            )
            .with_hint("reload this proxy with the new config (RELOAD in its admin console, or SIGHUP)"),
        )
    }

    /// The shards a placement may touch (every shard when it could be any).
    fn unit_shards(&self, place: &shardline_router::shards::Placement) -> u64 {
        use shardline_router::sharding::mask_of;
        use shardline_router::shards::Placement as P;
        let all = match self.shared.topology.shards.len() {
            n if n >= 64 => u64::MAX,
            n => (1u64 << n) - 1,
        };
        match place {
            P::One(s) => mask_of(*s),
            P::Anywhere => self.shard_for(place).map_or(all, mask_of),
            P::Many(m) | P::Merge(m) | P::Split(m) | P::CopySplit(m) | P::Pipeline(m) => *m,
            P::Spread => all,
            P::Refused(_) => 0,
        }
    }

    /// Between transactions (no server connection held, nothing the
    /// proxy keeps for an open transaction), the session moves to a
    /// reloaded configuration: its user's new entry (the session ends if
    /// the user was removed), the new router and topology, and its
    /// prepared statements routed again by the new placement.
    fn adopt_latest(&mut self) -> Result<(), End> {
        if self.shared.admin.latest() == self.shared.generation {
            return Ok(());
        }
        if self.server.is_some() || self.spanning.spans() || self.txn != Txn::Plain {
            return Ok(());
        }
        let Some(next) = self.shared.admin.live().map(|l| l.current()) else {
            return Ok(());
        };
        let key = (
            self.login.user.name.clone(),
            self.login.user.database.clone(),
        );
        let Some(user) = next.users.get(&key).cloned() else {
            return Err(End::Fatal(PgError::fatal(
                sqlstate::ADMIN_SHUTDOWN,
                format!(
                    "user \"{}\" was removed from the proxy's configuration (reload): this session ends",
                    key.0
                ),
            )));
        };
        self.shared = next;
        self.login.user = user;
        // Routes made by the old router are not looked at again.
        self.analysis.reset();
        self.rerun.reset();
        let names: Vec<Box<[u8]>> = self.statements.keys().cloned().collect();
        for name in names {
            let Some(old) = self.statements.get(&name).cloned() else {
                continue;
            };
            let text = old.definition.split(|b| *b == 0).next().unwrap_or_default();
            let route = self.route_text(text);
            let stmt = self
                .shared
                .statements
                .intern(&old.definition, old.effect.clone(), route);
            self.statements.insert(name, stmt);
        }
        let unnamed = self.unnamed.as_ref().map(|u| u.definition.clone());
        if let Some(definition) = unnamed {
            let text = definition.split(|b| *b == 0).next().unwrap_or_default();
            let route = self.route_text(text);
            if let Some(u) = self.unnamed.as_mut() {
                u.route = route;
            }
        }
        Ok(())
    }

    /// Shows the console the shards of a transaction spanning several
    /// (SHOW TRANSACTIONS); costs a load while there is none.
    fn publish_spanning(&self) {
        if !self.spanning.spans() && self.client.spanning() == 0 {
            return;
        }
        let mut mask = 0u64;
        if self.spanning.spans() {
            for p in &self.spanning.parked {
                mask |= shardline_router::sharding::mask_of(p.shard);
            }
            if let Some(s) = self.attached_shard() {
                mask |= shardline_router::sharding::mask_of(s);
            }
        }
        self.client.set_spanning(mask);
    }

    /// Runs the unit at the front of `client_in` where `planned` says.
    async fn run_unit(&mut self, planned: analysis::Planned) -> Result<(), End> {
        use shardline_router::shards::Placement;
        if let Placement::Refused(r) = &planned.place {
            self.shared.placements.count(&planned.place);
            return self.fail_next_message(self.shared.events.refusals.error((**r).clone()));
        }
        if !planned.complete
            && self.shared.sharding.is_some()
            && self.may_join()
            && self.peel_begin()?
        {
            // A BEGIN opening a unit acted on before its Sync (psycopg's
            // pipeline mode with autocommit off): held, so the rest runs in
            // the transaction as a pipeline that other shards may join
            // (`runs_as_pipeline`), or, when it only reads, on a replica
            // while its shard's primary is down.
            return Ok(());
        }
        let Some(shard) = self
            .shard_for(&planned.place)
            .map(|s| self.serving_shard(&planned, s))
        else {
            if self.shared.sharding.is_some() && planned.complete && self.peel_begin()? {
                // The rest of the unit is placed as the transaction's first
                // statement.
                return Ok(());
            }
            if self.txn.has_begin() {
                if self.read_ahead_of_transaction(&planned) {
                    // Before the transaction has touched a shard, a READ
                    // COMMITTED read sees what it would see inside it.
                    let planned = analysis::Planned {
                        plan: shardline_router::UnitPlan::Run {
                            target: shardline_router::Target::Primary,
                            writes: false,
                        },
                        ..planned
                    };
                    return self.run_fanout(planned, false).await;
                }
                if self.may_join() {
                    // The transaction's first statement needs several
                    // shards: each begins the transaction there.
                    return self.run_fanout(planned, true).await;
                }
                self.txn.fail();
                let e = if planned.reads_only && self.strict_isolation() {
                    self.shared.events.refusals.refuse(
                        Construct::Transaction,
                        "a read on several shards cannot begin a REPEATABLE READ or SERIALIZABLE transaction: its snapshot would not be the transaction's",
                    )
                    .with_hint("run the read outside the transaction, or begin it at READ COMMITTED")
                } else {
                    cross_shard_transaction(&self.shared, None)
                };
                return self.fail_next_message(e);
            }
            return self.run_fanout(planned, false).await;
        };
        match planned.plan {
            shardline_router::UnitPlan::DeferBegin => {
                self.meter.place(crate::stats::Kind::None);
                self.defer_begin()
            }
            shardline_router::UnitPlan::EndEmpty(tag) => {
                self.meter.place(crate::stats::Kind::None);
                self.end_empty(tag)
            }
            shardline_router::UnitPlan::Run { target, writes } => {
                self.shared.placements.count(&planned.place);
                self.count_keys();
                // Meant for the primary, though it only reads (`writes`;
                // not a hint's primary read): while the primary is down a
                // replica serves it, and a write that follows fails there,
                // as it would have on the primary. So it goes for a unit
                // acted on before its Sync (a Flush after an Execute),
                // whose rest may write, and for the first statement of a
                // transaction (BEGIN held; its unit complete or acted on at
                // a Flush, as psycopg's pipeline with autocommit off sends
                // it), which then runs read-only on the replica
                // (`begins_on_standby`).
                // A transaction sent with its reads (`begins_reading`: a
                // query string, PgJDBC's BEGIN with its first read) does
                // the same.
                let read = target == shardline_router::Target::Replica
                    || (writes
                        && self.mode() == PoolMode::Transaction
                        && if planned.reads_only {
                            if self.txn.has_begin() {
                                self.begins_on_standby()
                            } else {
                                !planned.complete
                            }
                        } else {
                            planned.begins_reading && !self.txn.has_begin() && self.standby_allows()
                        });
                if let Err(e) = self
                    .attach_server(target, writes, (read, planned.begins_reading), shard)
                    .await
                {
                    if self.client.ending.has(crate::clients::Ending::KILL) {
                        // Ended while it waited for a connection.
                        return Err(End::Fatal(killed()));
                    }
                    self.rerun.reset();
                    // A shard that could not join fails the whole transaction.
                    if self.spanning.spans() {
                        self.txn.fail();
                    }
                    self.fail_next_message(e)?;
                }
                Ok(())
            }
        }
    }

    /// The shard for a unit that may run on any (no table) and only reads:
    /// the default shard, unless it cannot serve it (its primary down, for
    /// a unit that needs a primary: a transaction's first statement, as
    /// SQLAlchemy begins each connection with `SELECT version()` in a
    /// transaction; every node down, for one a replica may serve, as an
    /// application's `SELECT 1` health check), then another shard that can,
    /// as every shard gives the same answer.
    fn serving_shard(&self, planned: &analysis::Planned, shard: usize) -> usize {
        use shardline_router::shards::Placement;
        use shardline_router::{Target, UnitPlan};
        let shards = &self.shared.topology.shards;
        if shards.len() < 2 || !planned.reads_only || !matches!(planned.place, Placement::Anywhere)
        {
            return shard;
        }
        let UnitPlan::Run { target, .. } = planned.plan else {
            return shard;
        };
        let serves = |s: usize| match target {
            Target::Primary => shards[s].writer().is_ok(),
            Target::Replica => shards[s].nodes.iter().any(|n| !n.is_down()),
        };
        if serves(shard) {
            return shard;
        }
        (0..shards.len()).find(|&s| serves(s)).unwrap_or(shard)
    }

    /// A read on several shards while the transaction's BEGIN is still
    /// deferred (no shard touched, nothing written) at READ COMMITTED: each
    /// statement takes a new snapshot there, so running it outside the
    /// transaction gives the same rows. Other isolation levels take the
    /// transaction's snapshot at its first statement: not this way.
    fn read_ahead_of_transaction(&self, planned: &analysis::Planned) -> bool {
        use shardline_router::shards::Placement;
        self.txn.has_begin()
            && planned.reads_only
            && !self.spanning.spans()
            && self.server.is_none()
            && matches!(planned.place, Placement::Many(_) | Placement::Merge(_))
            && !self.strict_isolation()
    }

    /// The deferred BEGIN (or the session's default) asks for REPEATABLE
    /// READ or SERIALIZABLE.
    fn strict_isolation(&self) -> bool {
        let strict = |s: &str| {
            let s = s.to_ascii_lowercase();
            s.contains("repeatable") || s.contains("serializable")
        };
        self.txn
            .begin()
            .is_some_and(|b| strict(&String::from_utf8_lossy(&b[5..])))
            || self
                .vars
                .get("default_transaction_isolation")
                .is_some_and(strict)
    }

    /// Whether the transaction whose BEGIN is held may begin on a replica
    /// when its shard's primary is down: it is the client's own (not a
    /// shard joining a transaction on several), and neither its BEGIN nor
    /// the session's default asks for what a hot standby refuses (READ
    /// WRITE, SERIALIZABLE).
    fn begins_on_standby(&self) -> bool {
        self.txn
            .begin()
            .is_some_and(|b| !route::standby_refuses(b.get(5..).unwrap_or_default()))
            && self.standby_allows()
    }

    /// What the session adds to a BEGIN that may run on a hot standby: no
    /// transaction on several shards, and no default isolation the
    /// standby refuses (SERIALIZABLE).
    fn standby_allows(&self) -> bool {
        !self.spanning.spans()
            && !self
                .vars
                .get("default_transaction_isolation")
                .is_some_and(|s| route::standby_refuses(s.as_bytes()))
    }

    /// In a transaction refused before its BEGIN reached a server: COMMIT,
    /// END, ROLLBACK or ABORT end it (as ROLLBACK); anything else gets 25P02.
    fn in_unstarted_refused_transaction(&mut self) -> Result<(), End> {
        if self.unit_ends_transaction()? {
            return self.end_refused_unit();
        }
        if let Ok(Some((crate::protocol::frontend::QUERY, len))) =
            crate::protocol::peek_header(&self.client_in, self.shared.max_message_size)
        {
            if self.client_in.len() >= len {
                let text = String::from_utf8_lossy(crate::protocol::frontend::query(
                    &self.client_in[5..len],
                )?)
                .into_owned();
                if shardline_router::lone_transaction_end(&text).is_some() {
                    return self.end_empty("ROLLBACK");
                }
            }
        }
        self.fail_next_message(failed_transaction())
    }

    /// Takes the unit at the front of `client_in` off the buffer: one
    /// simple query or function call, or extended messages up to Sync.
    fn take_unit(&mut self) -> Result<Vec<crate::protocol::Frame>, End> {
        let mut frames = Vec::new();
        while let Some(f) =
            crate::protocol::next_frame(&mut self.client_in, self.shared.max_message_size).map_err(
                |e| End::Fatal(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string())),
            )?
        {
            let last = crate::protocol::ends_unit(f.tag);
            frames.push(f);
            if last {
                break;
            }
        }
        Ok(frames)
    }

    /// An incomplete unit must be routed now anyway: the client asked for
    /// answers (Flush) or sent more than we hold back. (Asked of a unit
    /// whose end has not come: its frames are every complete message.)
    fn must_act(&self) -> bool {
        self.client_in.len() > UNIT_HOLD
            || self
                .unit_messages()
                .any(|(tag, _)| tag == crate::protocol::frontend::FLUSH)
    }

    /// Nothing in flight: safe to close at shutdown.
    fn is_idle(&self) -> bool {
        self.pending.is_empty()
            && !self.unit.is_open()
            && self.server.as_ref().is_none_or(|s| s.tx_status == b'I')
    }

    /// Returns the server connection to its pool when the client is between
    /// transactions (transaction pooling only).
    fn maybe_release(&mut self) {
        let releasable = !self.keeps_connection()
            && self.pending.is_empty()
            && !self.unit.is_open()
            && self.server_out.is_empty()
            && self.server.as_ref().is_some_and(|s| s.tx_status == b'I');
        if releasable && !self.after_write() {
            self.release_server();
        }
    }

    fn release_server(&mut self) {
        self.detach();
        self.txn.recover();
        self.spanning.coordinator = None;
        self.spanning.cursors.clear();
        if let Some(Placed { mut conn, .. }) = self.server.take() {
            io::shrink(&mut conn.read_buf);
            conn.give_back();
        }
    }

    /// What describes the attachment starts over (`attach.rs`): the
    /// connection is going back to its pool, lost, or parked.
    fn detach(&mut self) {
        self.rerun.reset();
        self.purpose = Purpose::Any;
        self.client.detach();
    }

    /// The attached connection, taken for a transaction on several shards
    /// (parked, or made a leg). Nothing may wait to be written to it but
    /// stray COPY messages, which a server ignores outside COPY:
    /// `server_out` holds only messages with a pending entry (a Flush only
    /// while the server owes answers), all answered before a unit is
    /// placed. Dropped with it: they would reach the next connection.
    fn take_attached(&mut self) -> Option<Placed> {
        use crate::protocol::frontend::{COPY_DATA, COPY_DONE, COPY_FAIL};
        let placed = self.server.take()?;
        debug_assert_eq!(
            crate::protocol::run_of(&self.server_out, usize::MAX, |t| {
                matches!(t, COPY_DATA | COPY_DONE | COPY_FAIL)
            }),
            self.server_out.len(),
            "bytes left for a connection taken for several shards"
        );
        self.server_out.clear();
        Some(placed)
    }

    /// Queues a simple query of the proxy's own for the attached server.
    fn send_own_query(&mut self, sql: &str) {
        crate::protocol::frontend::write_query(&mut self.server_out, sql);
        self.forget_unnamed();
    }

    /// Queues a Query message as the client sent it.
    fn send_query_frame(&mut self, frame: &[u8]) {
        self.server_out.extend_from_slice(frame);
        self.forget_unnamed();
    }

    /// Records the client's Parse `f` of the unnamed statement (whose
    /// definition is the frame's last `definition_len` bytes); returns its token.
    fn remember_unnamed(
        &mut self,
        f: &crate::protocol::Frame,
        definition_len: usize,
        effect: Option<Effect>,
        route: shardline_router::Route,
    ) -> u64 {
        let token = self
            .shared
            .next_token
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.unnamed = Some(Unnamed {
            token,
            definition: f.bytes.slice(f.bytes.len() - definition_len..),
            effect,
            route,
        });
        token
    }

    /// A simple query drops the server's unnamed statement: a later Bind of
    /// the client's re-Parses it.
    fn forget_unnamed(&mut self) {
        if let Some(server) = self.server.as_mut() {
            server.unnamed_token = 0;
        }
    }

    /// Answers in place of the server, in order with the server's answers.
    /// While the unit may still run elsewhere, the answer waits in the queue
    /// even with nothing ahead of it: it goes out with the server's first
    /// answer (or when the client's messages are all handled and the server
    /// owes nothing), so a unit whose server is lost before answering has
    /// told the client nothing and can run again.
    fn synthetic(&mut self, s: Synthetic) {
        if self.pending.is_empty() && !self.rerun.possible() {
            self.emit(s);
        } else {
            self.pending.push_back(Pending::forward(Kind::Synthetic(s)));
        }
    }

    fn emit(&mut self, s: Synthetic) {
        // Answered here: re-running the unit elsewhere would answer twice.
        self.rerun.answered();
        let out = &mut self.client_out;
        match s {
            Synthetic::ParseComplete => backend::empty_message(out, backend::PARSE_COMPLETE),
            Synthetic::CloseComplete => backend::empty_message(out, backend::CLOSE_COMPLETE),
            Synthetic::CommandComplete(tag) => backend::command_complete(out, tag),
            Synthetic::Rows(messages) => out.extend_from_slice(&messages),
            Synthetic::ReadyForQuery => {
                let status = self
                    .txn
                    .client_status(self.server.as_ref().map_or(b'I', |s| s.tx_status));
                backend::ready_for_query(&mut self.client_out, status)
            }
            Synthetic::Error(e) => e.encode(out),
        }
    }

    /// Emits the queue's answers when they are all the proxy's own: no
    /// server answer will come to send them.
    fn emit_unowed_synthetic(&mut self) {
        if self
            .pending
            .iter()
            .all(|p| matches!(p.kind, Kind::Synthetic(_)))
        {
            self.drain_synthetic();
        }
    }

    /// Emits synthetic answers that have reached the front of the queue
    /// (checked after every server message: the check is inlined, the
    /// emitting is not).
    #[inline]
    fn drain_synthetic(&mut self) {
        if matches!(
            self.pending.front(),
            Some(Pending {
                kind: Kind::Synthetic(_),
                ..
            })
        ) {
            self.emit_front_synthetic();
        }
    }

    #[inline(never)]
    fn emit_front_synthetic(&mut self) {
        while let Some(Pending {
            kind: Kind::Synthetic(_),
            ..
        }) = self.pending.front()
        {
            if let Some(Pending {
                kind: Kind::Synthetic(s),
                ..
            }) = self.pending.pop_front()
            {
                self.emit(s);
            }
        }
    }

    /// Reports a proxy-side error for the current request, the way a server would.
    fn fail_request(&mut self, e: PgError, simple: bool) {
        self.synthetic(Synthetic::Error(Box::new(e)));
        if simple {
            self.synthetic(Synthetic::ReadyForQuery);
        } else {
            self.inflow = Inflow::SkipToSync;
        }
    }

    /// The unit's plan is made again when next asked (`plan_unit`).
    fn forget_plan(&mut self) {
        self.analysis.forget();
    }

    /// Applies a committed session effect to the client and its server.
    fn commit_effect(&mut self, effect: &Effect) {
        self.forget_plan();
        if let Some(next) = self.vars.apply(effect) {
            self.vars = next;
        }
        if matches!(effect, Effect::DiscardAll) {
            self.statements.clear();
            self.described.clear();
            self.portal_effects.clear();
            self.unnamed = None;
        }
        if let Some(server) = self.server.as_mut() {
            server.vars = self.vars.clone();
        }
    }

    /// The server connection is gone: re-run a read that nothing was
    /// answered for on another node (returns true), else tell the client and
    /// carry on if its session state survived (it was not inside a transaction).
    fn on_server_lost(&mut self, e: std::io::Error) -> Result<bool, End> {
        let Some(Placed { shard, node, conn }) = self.server.take() else {
            return Ok(false);
        };
        // The unit's messages and the nodes it tried outlive the
        // connection: the read may run again elsewhere.
        let mut rerun = std::mem::take(&mut self.rerun);
        self.detach();
        let addr = conn.addr.clone();
        let in_txn = conn.tx_status != b'I';
        conn.discard();
        tracing::warn!(server = %addr, error = %e, traceparent = self.unit_trace().as_deref(), "server connection lost");
        let sent = match rerun.sent.take() {
            Some(sent) => Some(sent),
            // Answers were queued, none written (the server flushed
            // part of one as it exited): they are taken back. Not after
            // an error (a FATAL ends the unit as the server answered it).
            None if !in_txn && !self.unit_failed => rerun.take_late().and_then(|(kept, from)| {
                rerun.prepared = kept.prepared;
                self.meter
                    .take_back(&mut self.client_out, from)
                    .then_some(kept.sent)
            }),
            None => None,
        };
        if let Some(sent) = sent.filter(|_| !in_txn) {
            let nodes = &self.shared.topology.shards[shard].nodes;
            nodes[node].ban(self.shared.ban_time, &e.to_string());
            self.rerun.tried = rerun.tried;
            self.rerun.tried_node(node);
            for name in &rerun.prepared {
                self.statements.remove(name);
            }
            self.pending.clear();
            self.server_out.clear();
            self.txn_effects.clear();
            self.inflow = Inflow::Open;
            self.unit_failed = false;
            self.completed = Completed::Nothing;
            self.unit.close();
            self.wrote = false;
            let mut again = sent;
            again.extend_from_slice(&self.client_in);
            self.client_in = again;
            self.forget_plan();
            tracing::info!(server = %addr, traceparent = self.unit_trace().as_deref(), "re-running the read on another node");
            return Ok(true);
        }
        let msg = format!("server connection to {addr} was lost: {e}");
        if in_txn || self.keeps_connection() {
            return Err(End::Fatal(PgError::fatal(
                sqlstate::CONNECTION_FAILURE,
                msg,
            )));
        }
        // Units the client is waiting on, including a commit's reply held
        // for its WAL position and units sent behind it: the client learns
        // the connection was lost before its commit was confirmed.
        let sync_points = pending::owed_replies(&self.pending);
        self.pending.clear();
        self.server_out.clear();
        self.txn_effects.clear();
        self.inflow = Inflow::Open;
        let err = PgError::error(sqlstate::CONNECTION_FAILURE, msg);
        // The server may have said why before closing (e.g. FATAL 57P01); one error per unit.
        let mut reported = self.unit_failed;
        self.unit_failed = false;
        self.completed = Completed::Nothing;
        if sync_points == 0 && self.unit.is_open() {
            // Mid-unit (answers read up to a Flush): the error ends the
            // unit, as the server's would; the rest is skipped to its Sync.
            if !reported {
                err.encode(&mut self.client_out);
            }
            self.inflow = Inflow::SkipToSync;
        }
        for _ in 0..sync_points {
            if !std::mem::replace(&mut reported, false) {
                err.encode(&mut self.client_out);
            }
            backend::ready_for_query(&mut self.client_out, b'I');
        }
        self.unit.close();
        Ok(false)
    }

    /// At the end of a session: return a clean server connection, discard a dirty one.
    async fn finish_server(&mut self) {
        // Parked participants hold open transactions: closing them rolls back.
        for p in self.spanning.parked.drain(..) {
            p.conn.discard();
        }
        let Some(Placed { mut conn, .. }) = self.server.take() else {
            return;
        };
        let clean = conn.is_clean()
            && self.pending.is_empty()
            && !self.unit.is_open()
            && self.server_out.is_empty();
        if !clean {
            if pending::awaits_server(&self.pending) {
                // The client left mid-statement: the server would run it
                // to its end (holding its locks) before it noticed.
                self.client.cancel_and_detach();
            } else {
                self.client.detach();
            }
            conn.discard();
            return;
        }
        self.client.detach();
        if self.keeps_connection() {
            // Leave nothing of this client's session behind for the next one.
            let reset =
                crate::timer::timeout(Duration::from_secs(5), io::reset_connection(&mut conn))
                    .await;
            if !matches!(reset, Ok(Ok(()))) {
                conn.discard();
                return;
            }
        }
        conn.give_back();
    }
}
