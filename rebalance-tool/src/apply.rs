//! `apply`: moves the rows, verified and resumable.
//!
//! Work is cut into *steps*: one table, one source shard, one target shard,
//! one chunk of the hash space. Each step lives as a row of
//! `shardline.rebalance_steps` on its **target** and goes
//! `pending → copied → verified → done`:
//!
//! - copy: in one target transaction, the step's rows are streamed in with
//!   COPY and the step marked `copied`; a crash rolls both back;
//! - verify: row count and checksum of the step's rows on source and target
//!   must agree; the step is marked `verified` (a mismatch stops the run,
//!   nothing deleted);
//! - delete (after every step is verified, children before parents): in one
//!   source transaction the rows are deleted and a receipt is written to the
//!   source's `shardline.rebalance_deletes`; then the target step is marked
//!   `done`. A crash between the two finds the receipt and does not delete
//!   twice.
//!
//! A step's rows are those of its chunk whose owner is the source under the
//! old config and the target under the new one, so a rerun recomputes the
//! same sets. Steps of a target are recorded in one transaction before any
//! is copied; a rerun reads them back rather than re-cutting the work.

use crate::copy::{self, CopyError, Format};
use crate::db::{self, Column, Login, OnShard as _, Servers};
use crate::hide;
use crate::layout::{chunk_bounds, quote_ident, quote_table, Rebalance};
use crate::online::{self, Stream};
use crate::proxies::Proxies;
use anyhow::{bail, Context as _, Result};
use futures_util::future::join_all;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub struct ApplyOptions {
    /// The operator says writes are stopped (required).
    pub writes_stopped: bool,
    /// Create missing tables on targets from the source's definition.
    pub create_tables: bool,
    /// A range whose copy no longer matches its source is copied again
    /// (the rows that differ), verified, and the run goes on.
    pub recopy_changed: bool,
    /// Rows per step (a chunk of the hash space), roughly.
    pub chunk_rows: u64,
    pub format: Format,
    /// Where the new config is written when everything is verified.
    pub config_out: PathBuf,
    /// The new config file's text, written as it is.
    pub new_text: String,
    /// The new config's placement fingerprint (`Config::placement_fingerprint`),
    /// recorded on every shard before the first delete (`record_placement`).
    pub placement: String,
    /// Test hook: stop (sleep until killed) at `copy:N`, `verify`, `delete:N`,
    /// `finish`, or online at `stream`, `caught-up`, `pause` and `paused`.
    pub stop_at: Option<String>,
    /// Move online (`apply_online`): the largest replication lag, in bytes
    /// of the sources' WAL, at which the proxies are paused for the cutover.
    pub max_lag: u64,
    /// The proxies are paused for the whole move (offline, with `--admin`)
    /// and resume on the new config once it returns: the replicas of the
    /// shards rows moved between are waited for first, as online.
    pub proxies_paused: bool,
    /// The move is online (`apply_online`): reference tables stream to an
    /// added shard even where it holds the same rows already (it would
    /// miss the writes made to them while the rows copy).
    pub online: bool,
}

const STATE_DDL: &str = "
CREATE SCHEMA IF NOT EXISTS shardline;
CREATE TABLE IF NOT EXISTS shardline.rebalance_runs (
    run text PRIMARY KEY,
    placement text NOT NULL,
    state text NOT NULL CHECK (state IN ('running', 'finishing', 'aborting')),
    started timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS shardline.rebalance_steps (
    run text NOT NULL,
    table_name text NOT NULL,
    source text NOT NULL,
    target text NOT NULL,
    chunk int4 NOT NULL,
    first_hash int8 NOT NULL,
    last_hash int8 NOT NULL,
    reference bool NOT NULL,
    state text NOT NULL CHECK (state IN ('pending', 'copied', 'verified', 'done')),
    rows int8,
    checksum text,
    updated timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run, table_name, source, target, chunk)
);
CREATE TABLE IF NOT EXISTS shardline.rebalance_deletes (
    run text NOT NULL,
    table_name text NOT NULL,
    source text NOT NULL,
    target text NOT NULL,
    chunk int4 NOT NULL,
    rows int8 NOT NULL,
    deleted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run, table_name, source, target, chunk)
);";

/// The advisory lock key every run holds on every shard it touches.
const RUN_LOCK: i64 = 0x5368_6172_646c_696e; // "Shardlin"
/// How long a run waits for the tool's lock before saying another holds it.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

const STEP_KEY: &str =
    "run = $1 AND table_name = $2 AND source = $3 AND target = $4 AND chunk = $5";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum State {
    Pending,
    Copied,
    Verified,
    Done,
}

impl State {
    fn parse(s: &str) -> State {
        match s {
            "copied" => State::Copied,
            "verified" => State::Verified,
            "done" => State::Done,
            _ => State::Pending,
        }
    }
}

#[derive(Debug, Clone)]
struct Step {
    table: String,
    source: usize,
    target: usize,
    chunk: i32,
    first: i64,
    last: i64,
    reference: bool,
    state: State,
    rows: Option<i64>,
    /// Set when verified: the checksum both servers agreed on.
    checksum: Option<String>,
}

/// A table's primary key, as [`Run::recopy`] matches rows by it.
struct Key {
    columns: Vec<String>,
    /// The columns quoted, comma-separated.
    list: String,
    /// `ROW(list)::text`: one row's key as text, the same on every server.
    text: String,
}

/// How a step's copy differs from its source: keys (`Key::text`) of the
/// rows to write again and of the rows to remove from the copy.
struct Diff {
    key: Key,
    write: Vec<String>,
    gone: Vec<String>,
}

/// What a run did, for the summary.
#[derive(Debug, Default)]
pub struct Summary {
    /// `(table, from, to) → rows`.
    pub moved: BTreeMap<(String, String, String), u64>,
    pub steps: usize,
    pub copy_seconds: f64,
    pub verify_seconds: f64,
    pub delete_seconds: f64,
    pub total_seconds: f64,
    /// A run interrupted after every row moved was finished.
    pub already_complete: bool,
    /// Every row was already where the new config places it.
    pub nothing_to_move: bool,
    pub config_written: Option<PathBuf>,
    /// Set when the move reloaded and resumed the proxies itself (its
    /// moved rows were hidden, then deleted with traffic flowing): how
    /// long they held their clients, in seconds.
    pub held: Option<f64>,
}

impl Summary {
    pub fn rows(&self) -> u64 {
        self.moved.values().sum()
    }
}

/// Everything `apply` needs while it runs.
struct Run<'a> {
    r: &'a Rebalance,
    /// This run's id: chosen when it starts (`new_run_id`) and recorded in
    /// `shardline.rebalance_runs` on every shard, or read back from there
    /// to resume it. Steps and delete receipts carry it, so records of an
    /// earlier move between the same configs never stand for this one.
    id: String,
    servers: Servers,
    opts: &'a ApplyOptions,
    /// Columns per table (sharded and reference), from the default shard.
    columns: HashMap<String, Vec<Column>>,
    /// Sharded tables, then reference tables, parents before children.
    order: Vec<String>,
    /// Targets whose steps were recorded by an earlier run of this tool.
    resumed_targets: Vec<usize>,
    progress: MultiProgress,
    /// Rows moving per `(table, source, target)`, counted on every run
    /// before copying (a resumed run counts again).
    estimates: HashMap<(String, usize, usize), u64>,
    copies_started: u32,
    deletes_done: u32,
    /// Tables `--create-tables` made ("users on s2").
    created: Vec<String>,
    /// The tool's login, which online moves' subscriptions use too.
    login: Login,
    /// When an online move paused the proxies (`cutover_mark`).
    paused: Option<Instant>,
    /// Shards whose rows the online cutover checked for rows left behind
    /// before committing their deletes (`settle_online`).
    checked: Vec<usize>,
    /// A connection per shard holding the tool's advisory lock: one run at
    /// a time on these servers.
    _locks: Vec<deadpool_postgres::Object>,
}

pub async fn apply(r: &Rebalance, login: &Login, opts: &ApplyOptions) -> Result<Summary> {
    run_apply(r, login, opts, None).await
}

/// `apply --online`: the moving rows are copied and kept current by logical
/// replication while clients write ([`online`]); the proxies are paused
/// only for the cutover (catch up, verify, delete from the sources). They
/// are left paused on success, for the caller to RELOAD and RESUME, as
/// `apply` expects them paused from the start.
pub async fn apply_online(
    r: &Rebalance,
    login: &Login,
    opts: &ApplyOptions,
    proxies: &mut Proxies,
) -> Result<Summary> {
    run_apply(r, login, opts, Some(proxies)).await
}

async fn run_apply(
    r: &Rebalance,
    login: &Login,
    opts: &ApplyOptions,
    mut proxies: Option<&mut Proxies>,
) -> Result<Summary> {
    let started = Instant::now();
    if proxies.is_none() && !opts.writes_stopped {
        bail!(
            "writes must be stopped while rows move: stop the applications (or the proxy) writing to these shards, then run again with --writes-stopped. Nothing was changed."
        );
    }
    let mut run = Run::open(r, login, opts).await?;
    let mut summary = Summary::default();
    for warning in db::unreachable_replicas(&r.new.shards, &r.new.replicas, login).await {
        run.log(&format!(
            "warning: {warning}; it will catch up from the primary's WAL when it returns"
        ));
    }

    let mut recorded = match run.recorded().await? {
        Some((_, RunState::Aborting)) => bail!(
            "an abort of this rebalance was interrupted: run `shardline-rebalance abort` with the same configs to finish it (it removes the copies it made), then apply again. Nothing was changed."
        ),
        other => other,
    };
    let resumed = recorded.is_some();
    let mut steps: Vec<Step> = Vec::new();
    // Moved rows hidden on their old shards, to delete once the proxies
    // run the new config.
    let mut deferred = false;
    let finishing = match recorded.take() {
        Some((id, state)) => {
            run.log(&format!(
                "resuming rebalance run {id} recorded on the servers"
            ));
            run.id = id;
            state == RunState::Finishing
        }
        None => {
            run.id = new_run_id(&r.run);
            false
        }
    };
    if finishing {
        summary.already_complete = true;
    } else {
        if resumed {
            steps = run.load_steps().await?;
        }
        run.check_tables().await?;
        run.log("counting the rows to move on every shard ...");
        let planned = run.plan_steps().await?;
        steps.extend(planned);
        if !steps.is_empty() {
            run.log(&format!(
                "{} steps ({} to copy, {} to verify, {} to delete)",
                steps.len(),
                steps.iter().filter(|s| s.state == State::Pending).count(),
                steps.iter().filter(|s| s.state <= State::Copied).count(),
                steps
                    .iter()
                    .filter(|s| s.state < State::Done && !s.reference)
                    .count()
            ));
            let t = Instant::now();
            let online = proxies.is_some();
            if let Some(proxies) = proxies.as_deref_mut() {
                run.stream_and_pause(&mut steps, resumed, proxies).await?;
            } else {
                run.refuse_streams().await?;
                run.copy_all(&mut steps).await?;
            }
            summary.copy_seconds = t.elapsed().as_secs_f64();
            run.stop_point("verify");
            let t = Instant::now();
            if online {
                deferred = run.settle_online(&mut steps).await?;
            }
            // Offline, and what an interrupted online cutover left.
            if deferred {
                summary.verify_seconds = t.elapsed().as_secs_f64();
            } else if steps.iter().any(|s| s.state != State::Done) {
                run.verify_all(&mut steps).await?;
                run.cutover_mark("moved rows verified");
                summary.verify_seconds = t.elapsed().as_secs_f64();
                // From the first delete on, a proxy still on the old
                // placement misses rows: the shards say which placement is
                // current, and such a proxy refuses statements until it is
                // reloaded.
                run.record_placement().await?;
                let t = Instant::now();
                run.delete_all(&mut steps).await?;
                run.cutover_mark("moved rows deleted from their old shards");
                summary.delete_seconds = t.elapsed().as_secs_f64();
            } else {
                summary.verify_seconds = t.elapsed().as_secs_f64();
            }
            run.advance_sequences(&steps).await?;
        }
    }
    if (resumed || !steps.is_empty()) && !deferred {
        run.finish().await?;
    }
    summary.nothing_to_move = !resumed && steps.is_empty();
    // Rows written after their range moved (writes were not stopped) are on
    // the wrong shard: lost with a removed shard, not found by key on a kept
    // one. The config is installed only when there are none.
    let left = run.left_behind().await?;
    run.cutover_mark("checked that no row is left behind");
    if !left.is_empty() {
        bail!(
            "{}: written after their rows moved (writes were not stopped), they are not where the new config looks for them (on a removed shard they would be lost with it). Every other row is moved and verified; the new config was not installed. Stop the writes, move those rows to the shards the new config gives them (INSERT them through a proxy running the new config, then DELETE them from the shard named), and run apply again: it moves nothing more and installs the config.",
            left.join("; ")
        );
    }
    for s in &steps {
        let key = (
            s.table.clone(),
            r.names[s.source].clone(),
            r.names[s.target].clone(),
        );
        *summary.moved.entry(key).or_default() += s.rows.unwrap_or(0).max(0) as u64;
    }
    summary.steps = steps.len();
    run.record_placement().await?;
    run.cutover_mark("placement recorded");
    if proxies.is_some() || opts.proxies_paused {
        run.replicas_replayed(&steps).await;
    }
    write_config(&opts.config_out, &opts.new_text).with_context(|| {
        format!(
            "every row is moved and verified, but the new config could not be written to {}; fix that and run apply again with the same configs (it moves nothing more and writes the config)",
            opts.config_out.display()
        )
    })?;
    summary.config_written = Some(opts.config_out.clone());
    if deferred {
        let proxies = proxies.expect("only an online move defers deletes");
        summary.held = Some(run.switch(proxies).await?);
        run.stop_point("resumed");
        let t = Instant::now();
        run.delete_deferred(&mut steps).await.context(
            "the proxies run the new config; the moved rows they no longer see are still on their old shards. Run the same apply --online again (with its --admin options) to delete them: it pauses the proxies while it does",
        )?;
        summary.delete_seconds = t.elapsed().as_secs_f64();
    }
    summary.total_seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Where a recorded run stands (`shardline.rebalance_runs.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunState {
    /// Steps are being recorded, copied, verified or deleted.
    Running,
    /// Every row moved; its records are being removed.
    Finishing,
    /// `abort` is removing the copies; only abort may go on.
    Aborting,
}

impl RunState {
    fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Finishing => "finishing",
            RunState::Aborting => "aborting",
        }
    }

    fn parse(s: &str) -> RunState {
        match s {
            "finishing" => RunState::Finishing,
            "aborting" => RunState::Aborting,
            _ => RunState::Running,
        }
    }
}

/// A run id: the configs' fingerprint (for people reading the records)
/// and when and by which process the run started (so it is never reused).
fn new_run_id(fingerprint: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}-{nanos:x}-{:x}",
        &fingerprint[..fingerprint.len().min(12)],
        std::process::id()
    )
}

/// Writes `text` to `path` atomically: a temporary file beside it, synced,
/// then renamed over it. The previous file is kept as
/// `<path>.before-rebalance`.
pub fn write_config(path: &std::path::Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    if let Ok(old) = std::fs::read_to_string(path) {
        if old == text {
            return Ok(());
        }
        let mut backup = path.as_os_str().to_owned();
        backup.push(".before-rebalance");
        std::fs::write(&backup, old)
            .with_context(|| format!("keeping the previous config as {backup:?}"))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)
        .with_context(|| format!("writing the new config to {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Whether a shard has the progress tables (created when a run first
/// records its steps, so a refused run leaves nothing behind).
async fn has_state_tables(c: &tokio_postgres::Client) -> Result<bool, tokio_postgres::Error> {
    let row = c
        .query_one(
            "SELECT to_regclass('shardline.rebalance_steps') IS NOT NULL AND to_regclass('shardline.rebalance_deletes') IS NOT NULL AND to_regclass('shardline.rebalance_runs') IS NOT NULL",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// Whether the shard holds a placement record (`record_placement`).
async fn has_placement_record(c: &tokio_postgres::Client) -> Result<bool, tokio_postgres::Error> {
    let row = c
        .query_one(
            "SELECT to_regclass('shardline_placement.current') IS NOT NULL",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// Options for opening a run only to look at (or undo) it.
fn inspecting(stop_at: Option<String>) -> ApplyOptions {
    ApplyOptions {
        writes_stopped: true,
        create_tables: false,
        recopy_changed: false,
        chunk_rows: 1,
        format: Format::Binary,
        config_out: PathBuf::new(),
        new_text: String::new(),
        placement: String::new(),
        stop_at,
        max_lag: 0,
        proxies_paused: false,
        online: false,
    }
}

/// Whether a run of this rebalance may have deleted rows from an old
/// shard: the new placement (`placement`) is recorded on a shard (that
/// happens right before the first delete, and stays once the run's own
/// records are gone), or the run's records say so. From then on proxies
/// must not go back to the old placement.
pub async fn deletes_started(r: &Rebalance, login: &Login, placement: &str) -> Result<bool> {
    let opts = inspecting(None);
    let mut run = Run::open(r, login, &opts).await?;
    for id in 0..r.names.len() {
        let c = run.servers.get(id).await?;
        if has_placement_record(&c)
            .await
            .on(&run.servers, id, "reading the recorded placement")?
        {
            let n: i64 = c
                .query_one(
                    "SELECT count(*) FROM shardline_placement.current WHERE fingerprint = $1",
                    &[&placement],
                )
                .await
                .on(&run.servers, id, "reading the recorded placement")?
                .get(0);
            if n > 0 {
                return Ok(true);
            }
        }
    }
    let Some((id, state)) = run.recorded().await? else {
        return Ok(false);
    };
    if state == RunState::Finishing {
        return Ok(true);
    }
    run.id = id;
    Ok(run.first_deletes().await?.is_some())
}

/// Whether the servers record an unfinished run of this rebalance.
pub async fn unfinished(r: &Rebalance, login: &Login) -> Result<bool> {
    let opts = inspecting(None);
    let run = Run::open(r, login, &opts).await?;
    Ok(run.recorded().await?.is_some())
}

/// Undoes an unfinished run before any row was deleted from its old shard:
/// the rows it copied are deleted from the new shards and its steps
/// forgotten, leaving the old placement as it was. Returns the rows removed.
pub async fn abort(
    r: &Rebalance,
    login: &Login,
    stop_at: Option<String>,
    restore: (&str, &str),
) -> Result<u64> {
    let opts = inspecting(stop_at);
    let mut run = Run::open(r, login, &opts).await?;
    let Some((id, state)) = run.recorded().await? else {
        bail!(
            "no run of this rebalance (configs {}) is recorded on the servers: nothing to abort",
            r.run
        );
    };
    if state == RunState::Finishing {
        bail!(
            "rebalance run {id} had moved every row; only its records remain. Run apply again with the same configs to finish it."
        );
    }
    run.id = id;
    if let Some((shard, deleted)) = run.first_deletes().await? {
        bail!(
            "rows of this rebalance were already deleted from (or hidden on) shard {shard} ({deleted} steps or tables): it cannot be undone, only finished. Run apply again with the same configs."
        );
    }
    // From here apply refuses until abort has finished (rerun abort).
    run.set_state(RunState::Aborting).await?;
    // An online run's streams stop before their copies are removed (an
    // apply worker would fail on rows gone from under it).
    let all: Vec<usize> = (0..r.names.len()).collect();
    online::remove_leftovers(&run.servers, &all).await?;
    let steps = run.load_steps().await?;
    run.order = run.table_order().await?;
    let mut removed = 0;
    let mut done = 0;
    for table in run.order.clone().iter().rev() {
        for s in steps.iter().filter(|s| s.table == *table) {
            let what = format!(
                "removing the copied rows of {} {} -> {} chunk {}",
                s.table, r.names[s.source], r.names[s.target], s.chunk
            );
            let mut target = run.servers.get(s.target).await?;
            let tx = target
                .transaction()
                .await
                .on(&run.servers, s.target, &what)?;
            if s.state != State::Pending {
                removed +=
                    tx.execute(&run.delete_sql(s), &[])
                        .await
                        .on(&run.servers, s.target, &what)?;
            }
            tx.execute(
                &format!("DELETE FROM shardline.rebalance_steps WHERE {STEP_KEY}"),
                &run.key_params(s),
            )
            .await
            .on(&run.servers, s.target, &what)?;
            tx.commit().await.on(&run.servers, s.target, &what)?;
            done += 1;
            run.stop_point(&format!("abort:{done}"));
        }
    }
    // The new placement may have been recorded just before the first
    // delete would have run: the old one is current again.
    run.restore_placement(restore).await?;
    run.forget().await?;
    Ok(removed)
}

impl<'a> Run<'a> {
    async fn open(r: &'a Rebalance, login: &Login, opts: &'a ApplyOptions) -> Result<Run<'a>> {
        let all: Vec<usize> = (0..r.names.len()).collect();
        let servers = Servers::connect(&r.names, &r.primaries, &all, login).await?;
        let mut locks = Vec::new();
        for &id in &all {
            let c = servers.get(id).await?;
            // The lock is a session's: a run that just ended (this
            // process's own, before it reads what that run left) frees it
            // once the server has seen its connections close, a moment
            // after they are dropped. Asked again for up to LOCK_WAIT.
            let waited = std::time::Instant::now();
            loop {
                let held: bool = c
                    .query_one("SELECT pg_try_advisory_lock($1)", &[&RUN_LOCK])
                    .await
                    .on(&servers, id, "taking the tool's lock")?
                    .get(0);
                if held {
                    break;
                }
                if waited.elapsed() >= LOCK_WAIT {
                    bail!(
                        "another shardline-rebalance is running against shard {} (it holds the tool's advisory lock): wait for it to end. Nothing was changed.",
                        servers.label(id)
                    );
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            locks.push(c);
        }
        Ok(Run {
            r,
            id: String::new(),
            servers,
            opts,
            columns: HashMap::new(),
            order: Vec::new(),
            resumed_targets: Vec::new(),
            progress: MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4)),
            estimates: HashMap::new(),
            copies_started: 0,
            deletes_done: 0,
            created: Vec::new(),
            login: login.clone(),
            paused: None,
            checked: Vec::new(),
            _locks: locks,
        })
    }

    /// Sharded and reference tables, tables referenced by foreign keys
    /// (on the default shard) before the tables referencing them.
    async fn table_order(&self) -> Result<Vec<String>> {
        let home = self.r.home();
        let mut names: Vec<String> = self.r.old.reference.clone();
        names.extend(self.r.tables().iter().map(|t| t.name.clone()));
        let c = self.servers.get(home).await?;
        let edges =
            db::foreign_keys(&c, &names)
                .await
                .on(&self.servers, home, "reading foreign keys")?;
        Ok(db::parents_first(names.len(), &edges)
            .into_iter()
            .map(|i| names[i].clone())
            .collect())
    }
}

/// Where the shards record the placement rows are in (one row), read by
/// every proxy's health check.
pub const PLACEMENT_DDL: &str = "
CREATE SCHEMA IF NOT EXISTS shardline_placement;
CREATE TABLE IF NOT EXISTS shardline_placement.current (fingerprint text NOT NULL, recorded timestamptz NOT NULL DEFAULT now());
GRANT USAGE ON SCHEMA shardline_placement TO PUBLIC;
GRANT SELECT ON shardline_placement.current TO PUBLIC;
";

impl Run<'_> {
    /// Records the new placement on every shard of both configs (once
    /// rows are about to leave their old shards, and again when the run
    /// ends): a proxy whose config says otherwise refuses statements.
    async fn record_placement(&mut self) -> Result<()> {
        if self.opts.placement.is_empty() {
            return Ok(());
        }
        let what = "recording the new placement";
        for id in 0..self.r.names.len() {
            let mut c = self.servers.get(id).await?;
            let tx = c.transaction().await.on(&self.servers, id, what)?;
            tx.batch_execute(PLACEMENT_DDL)
                .await
                .on(&self.servers, id, what)?;
            tx.execute("DELETE FROM shardline_placement.current", &[])
                .await
                .on(&self.servers, id, what)?;
            tx.execute(
                "INSERT INTO shardline_placement.current (fingerprint) VALUES ($1)",
                &[&self.opts.placement],
            )
            .await
            .on(&self.servers, id, what)?;
            tx.commit().await.on(&self.servers, id, what)?;
        }
        Ok(())
    }

    /// Where a shard records `restore.1` (the new placement), records
    /// `restore.0` (the old one) instead.
    async fn restore_placement(&mut self, restore: (&str, &str)) -> Result<()> {
        let what = "restoring the old placement's record";
        for id in 0..self.r.names.len() {
            let c = self.servers.get(id).await?;
            if has_placement_record(&c).await.on(&self.servers, id, what)? {
                c.execute(
                    "UPDATE shardline_placement.current SET fingerprint = $1, recorded = now() WHERE fingerprint = $2",
                    &[&restore.0, &restore.1],
                )
                .await
                .on(&self.servers, id, what)?;
            }
        }
        Ok(())
    }

    /// The first shard (label, and its count) holding delete receipts of
    /// this run, or moved rows hidden by its cutover, if any.
    async fn first_deletes(&mut self) -> Result<Option<(String, i64)>> {
        for id in 0..self.r.names.len() {
            let c = self.servers.get(id).await?;
            let hidden = c
                .query(hide::HIDDEN_SQL, &[])
                .await
                .on(&self.servers, id, "reading recorded progress")?
                .len();
            if hidden > 0 {
                return Ok(Some((self.servers.label(id), hidden as i64)));
            }
            if !has_state_tables(&c)
                .await
                .on(&self.servers, id, "reading recorded progress")?
            {
                continue;
            }
            let deleted: i64 = c
                .query_one(
                    "SELECT count(*) FROM shardline.rebalance_deletes WHERE run = $1",
                    &[&self.id],
                )
                .await
                .on(&self.servers, id, "reading recorded progress")?
                .get(0);
            if deleted > 0 {
                return Ok(Some((self.servers.label(id), deleted)));
            }
        }
        Ok(None)
    }

    fn log(&self, line: &str) {
        if self.progress.is_hidden() {
            eprintln!("{line}");
        } else {
            let _ = self.progress.println(line);
        }
    }

    /// The test hook: prints where it stopped and sleeps until killed.
    /// The crash tests' hook (`SHARDLINE_REBALANCE_STOP_AT`): `POINT` stops
    /// there for good (to be killed); `hold:MS:POINT` waits there MS
    /// milliseconds and goes on (for a server to be restarted meanwhile).
    fn stop_point(&self, point: &str) {
        let Some(at) = self.opts.stop_at.as_deref() else {
            return;
        };
        if at == point {
            eprintln!("shardline-rebalance: stopped at {point}");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        if let Some((ms, held)) = at
            .strip_prefix("hold:")
            .and_then(|rest| rest.split_once(':'))
        {
            if held == point {
                eprintln!("shardline-rebalance: holding at {point}");
                std::thread::sleep(std::time::Duration::from_millis(ms.parse().unwrap_or(0)));
            }
        }
    }

    async fn load_steps(&mut self) -> Result<Vec<Step>> {
        let mut steps = Vec::new();
        for &target in &self.r.new_ids {
            let c = self.servers.get(target).await?;
            if !has_state_tables(&c)
                .await
                .on(&self.servers, target, "reading recorded progress")?
            {
                continue;
            }
            let rows = c
                .query(
                    "SELECT table_name, source, chunk, first_hash, last_hash, reference, state, rows, checksum
                       FROM shardline.rebalance_steps WHERE run = $1 AND target = $2
                      ORDER BY table_name, source, chunk",
                    &[&self.id, &self.r.names[target]],
                )
                .await
                .on(&self.servers, target, "reading recorded progress")?;
            if !rows.is_empty() {
                self.resumed_targets.push(target);
            }
            for row in rows {
                let source: String = row.get(1);
                let Some(source) = self.r.names.iter().position(|n| *n == source) else {
                    bail!(
                        "shard {} records a step from unknown shard {source}",
                        self.r.names[target]
                    );
                };
                steps.push(Step {
                    table: row.get(0),
                    source,
                    target,
                    chunk: row.get(2),
                    first: row.get(3),
                    last: row.get(4),
                    reference: row.get(5),
                    state: State::parse(row.get(6)),
                    rows: row.get(7),
                    checksum: row.get(8),
                });
            }
        }
        Ok(steps)
    }

    /// Every table exists with the same columns on every shard of both
    /// configs (created on targets with `--create-tables`); the order
    /// tables are copied in (referenced tables first).
    async fn check_tables(&mut self) -> Result<()> {
        let r = self.r;
        let home = r.home();
        let mut names: Vec<String> = r.old.reference.clone();
        names.extend(r.tables().iter().map(|t| t.name.clone()));
        let home_client = self.servers.get(home).await?;
        let mut problems = Vec::new();
        for name in &names {
            match db::columns(&home_client, name).await.on(
                &self.servers,
                home,
                "reading the catalog",
            )? {
                Some(cols) => {
                    self.columns.insert(name.clone(), cols);
                }
                None => problems.push(format!(
                    "table {name} does not exist on the default shard {}",
                    self.servers.label(home)
                )),
            }
        }
        if !problems.is_empty() {
            bail!("{}\nNothing was changed.", problems.join("\n"));
        }
        self.order = self.table_order().await?;
        let sharded: Vec<String> = r.tables().iter().map(|t| t.name.clone()).collect();
        for id in 0..r.names.len() {
            let c = self.servers.get(id).await?;
            problems.extend(self.unsafe_to_move(&c, id, &sharded, &names).await.on(
                &self.servers,
                id,
                "reading the catalog",
            )?);
        }
        for &id in &r.old_ids {
            let c = self.servers.get(id).await?;
            let outside = db::outside_references(&c, &sharded, &names).await.on(
                &self.servers,
                id,
                "reading foreign keys",
            )?;
            for (child, constraint, parent) in outside {
                problems.push(format!(
                    "on shard {}, table {child} references {parent} (foreign key {constraint}) but is not a sharded or reference table: deleting moved rows of {parent} would cascade into it or fail. Shard {child} with {parent} (same group), or drop the constraint for the move.",
                    self.servers.label(id)
                ));
            }
        }
        if !problems.is_empty() {
            bail!("{}\nNothing was changed.", problems.join("\n"));
        }

        let mut to_create: Vec<(usize, String)> = Vec::new();
        for id in (0..r.names.len()).filter(|&i| i != home) {
            let c = self.servers.get(id).await?;
            for name in &self.order {
                let want = &self.columns[name];
                match db::columns(&c, name)
                    .await
                    .on(&self.servers, id, "reading the catalog")?
                {
                    Some(have) => {
                        let diff = db::column_differences(want, &have);
                        if !diff.is_empty() {
                            problems.push(format!(
                                "table {name} on shard {} differs from the default shard {}: {}",
                                self.servers.label(id),
                                r.names[home],
                                diff.join("; ")
                            ));
                        }
                    }
                    None if r.new_ids.contains(&id) && self.opts.create_tables => {
                        to_create.push((id, name.clone()))
                    }
                    None => problems.push(format!(
                        "table {name} does not exist on shard {}{}",
                        self.servers.label(id),
                        if r.new_ids.contains(&id) {
                            " (create it, or pass --create-tables to create it from the default shard's definition)"
                        } else {
                            ""
                        }
                    )),
                }
            }
        }
        if !problems.is_empty() {
            bail!("{}\nNothing was changed.", problems.join("\n"));
        }
        // Per shard, every missing table in one transaction: a failure
        // creates none there.
        let mut by_shard: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for (id, name) in to_create {
            by_shard.entry(id).or_default().push(name);
        }
        for (id, tables) in by_shard {
            let mut ddl = Vec::new();
            let mut notes = Vec::new();
            for name in &tables {
                ddl.extend(db::definition(&home_client, name).await.on(
                    &self.servers,
                    home,
                    "reading a table definition",
                )?);
                let missing = db::not_copied(&home_client, name).await.on(
                    &self.servers,
                    home,
                    "reading a table definition",
                )?;
                notes.push(if missing.is_empty() {
                    format!("created table {name} on shard {}", r.names[id])
                } else {
                    format!(
                        "created table {name} on shard {} (not copied from {}: {}; add them by hand if the table needs them)",
                        r.names[id],
                        r.names[home],
                        missing.join(", ")
                    )
                });
            }
            let c = self.servers.get(id).await?;
            if let Err(e) = c
                .batch_execute(&format!("BEGIN; {}; COMMIT", ddl.join(";\n")))
                .await
            {
                let _ = c.batch_execute("ROLLBACK").await;
                bail!(
                    "creating tables {} on shard {} from the default shard's definitions failed, and none was created there: {} (a foreign key to a table that is not on that shard?). Create them by hand, then run again without --create-tables. {}",
                    tables.join(", "),
                    self.servers.label(id),
                    db::describe(&e),
                    self.nothing_changed()
                );
            }
            for note in notes {
                self.log(&note);
            }
            self.created
                .extend(tables.iter().map(|t| format!("{t} on {}", r.names[id])));
        }
        Ok(())
    }

    /// "Nothing was changed", or what was: tables `--create-tables` made.
    fn nothing_changed(&self) -> String {
        if self.created.is_empty() {
            "Nothing was changed.".into()
        } else {
            format!(
                "Nothing else was changed (tables created: {}).",
                self.created.join(", ")
            )
        }
    }

    /// What would make the tool's copy or delete change rows that do not
    /// move, or move rows the proxy places elsewhere, on shard `id`: a
    /// foreign key from a sharded table to itself (its ON DELETE action
    /// would reach rows that stay), triggers on the moved tables (copying
    /// and deleting would fire them), and tables of the same name in
    /// another schema (the proxy shards every schema's table under an
    /// unqualified entry; the tool moves the one `search_path` finds).
    async fn unsafe_to_move(
        &self,
        c: &deadpool_postgres::Object,
        id: usize,
        sharded: &[String],
        all: &[String],
    ) -> Result<Vec<String>, tokio_postgres::Error> {
        let label = self.servers.label(id);
        let mut problems = Vec::new();
        for name in sharded {
            for row in c
                .query(
                    "SELECT conname::text FROM pg_constraint WHERE contype = 'f' AND conrelid = to_regclass($1) AND confrelid = conrelid",
                    &[&quote_table(name)],
                )
                .await?
            {
                problems.push(format!(
                    "on shard {label}, table {name} has a foreign key to itself ({}): deleting the moved rows would reach rows that stay (ON DELETE CASCADE deletes them, SET NULL changes them, NO ACTION stops the run halfway). Drop it for the move and create it again after.",
                    row.get::<_, String>(0)
                ));
            }
            if !name.contains('.') {
                let others: Vec<String> = c
                    .query(
                        "SELECT n.nspname::text FROM pg_class t JOIN pg_namespace n ON n.oid = t.relnamespace
                          WHERE t.relname = $1 AND t.relkind IN ('r', 'p') AND t.oid IS DISTINCT FROM to_regclass($2)
                          ORDER BY 1",
                        &[name, &quote_table(name)],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                if !others.is_empty() {
                    problems.push(format!(
                        "on shard {label}, a table {name} exists in schema(s) {} besides the one the tool moves: the proxy shards every schema's {name} under this entry, and this tool moves only the one search_path finds. Move those schemas' rows by hand, or rename the tables.",
                        others.join(", ")
                    ));
                }
            }
        }
        // Foreign keys between sharded tables must follow the key: the
        // child's key column referencing the parent's, in one group, so a
        // parent row and its children always move together.
        let names: Vec<String> = self
            .r
            .tables()
            .iter()
            .map(|t| quote_table(&t.name))
            .collect();
        let oids: Vec<Option<u32>> = c
            .query_one(
                "SELECT array(SELECT to_regclass(n)::oid FROM unnest($1::text[]) WITH ORDINALITY u(n, i) ORDER BY i)",
                &[&names],
            )
            .await?
            .get(0);
        for child in self.r.tables() {
            for row in c
                .query(
                    "SELECT k.conname::text, p.relname::text,
                            array(SELECT a.attname::text FROM unnest(k.conkey) WITH ORDINALITY u(n, i)
                                  JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.n ORDER BY u.i),
                            array(SELECT a.attname::text FROM unnest(k.confkey) WITH ORDINALITY u(n, i)
                                  JOIN pg_attribute a ON a.attrelid = k.confrelid AND a.attnum = u.n ORDER BY u.i),
                            k.confrelid
                       FROM pg_constraint k JOIN pg_class p ON p.oid = k.confrelid
                      WHERE k.contype = 'f' AND k.conrelid = to_regclass($1) AND k.confrelid <> k.conrelid",
                    &[&quote_table(&child.name)],
                )
                .await?
            {
                let (constraint, parent_rel, cols, pcols): (String, String, Vec<String>, Vec<String>) =
                    (row.get(0), row.get(1), row.get(2), row.get(3));
                let parent_oid: u32 = row.get(4);
                let parent = oids
                    .iter()
                    .zip(self.r.tables())
                    .find(|(oid, _)| **oid == Some(parent_oid))
                    .map(|(_, t)| t);
                let Some(parent) = parent else {
                    continue; // Reference or unsharded parents: checked elsewhere.
                };
                let follows = parent.group == child.group
                    && cols == [child.column.clone()]
                    && pcols == [parent.column.clone()];
                if !follows {
                    problems.push(format!(
                        "on shard {label}, foreign key {constraint} from {} ({}) to {parent_rel} ({}) does not follow the sharding key ({} of {}, {} of {}, in one group): deleting moved rows of {} could reach rows of {} that stay. Drop it for the move and create it again after.",
                        child.name,
                        cols.join(", "),
                        pcols.join(", "),
                        child.column,
                        child.name,
                        parent.column,
                        parent.name,
                        parent.name,
                        child.name
                    ));
                }
            }
        }
        for name in all {
            for row in c
                .query(
                    "SELECT tgname::text FROM pg_trigger WHERE tgrelid = to_regclass($1) AND NOT tgisinternal AND tgenabled <> 'D' ORDER BY 1",
                    &[&quote_table(name)],
                )
                .await?
            {
                problems.push(format!(
                    "on shard {label}, table {name} has trigger {}: copying and deleting moved rows would fire it, changing rows that do not move. Disable it for the move (ALTER TABLE {name} DISABLE TRIGGER {0}) and enable it after.",
                    row.get::<_, String>(0)
                ));
            }
        }
        Ok(problems)
    }

    /// Counts what moves and records the steps of targets that have none
    /// yet. Refuses when a shard without recorded steps holds rows the old
    /// config places elsewhere (they would be duplicated or lost).
    async fn plan_steps(&mut self) -> Result<Vec<Step>> {
        let r = self.r;
        let mut by_target: BTreeMap<usize, Vec<Step>> = BTreeMap::new();
        let mut problems = Vec::new();
        for t in r.tables() {
            let (old, new) = (r.old_owner_sql(t), r.new_owner_sql(t));
            let all: Vec<usize> = (0..r.names.len()).collect();
            let everywhere = db::owner_counts_on(&self.servers, &all, &t.name, &old, &new).await?;
            let moving = db::moving_pairs(&all, &everywhere);
            for (id, counts) in everywhere.into_iter().enumerate() {
                // A target of recorded steps holds rows copied there; others
                // must hold only their own rows, or rows already moved there
                // (by an earlier run) when nothing more moves to them from
                // the same shard.
                let misplaced: i64 = counts
                    .iter()
                    .filter(|c| c.old != Some(id as i32) && !c.moved_to(id, &moving))
                    .map(|c| c.rows)
                    .sum();
                if misplaced > 0 && !self.resumed_targets.contains(&id) {
                    problems.push(format!(
                        "shard {} holds {misplaced} rows of {} that the old config places on other shards (or nowhere): moving rows there could duplicate them. Check with `shardline-rebalance verify --config OLD`.",
                        self.servers.label(id),
                        t.name
                    ));
                    continue;
                }
                for db::OwnerCount { new: to, rows, .. } in
                    counts.into_iter().filter(|c| c.old == Some(id as i32))
                {
                    let Some(to) = to.map(|v| v as usize) else {
                        problems.push(format!(
                            "{rows} rows of {} on shard {} have no shard under the new config (a range or list without their key)",
                            t.name, r.names[id]
                        ));
                        continue;
                    };
                    if to == id {
                        continue;
                    }
                    self.estimates
                        .insert((t.name.clone(), id, to), rows.max(0) as u64);
                    if self.resumed_targets.contains(&to) {
                        continue;
                    }
                    let chunks = (rows as u64)
                        .div_ceil(self.opts.chunk_rows.max(1))
                        .clamp(1, 4096);
                    for (chunk, (first, last)) in
                        chunk_bounds(chunks as u32).into_iter().enumerate()
                    {
                        by_target.entry(to).or_default().push(Step {
                            table: t.name.clone(),
                            source: id,
                            target: to,
                            chunk: chunk as i32,
                            first,
                            last,
                            reference: false,
                            state: State::Pending,
                            rows: None,
                            checksum: None,
                        });
                    }
                }
            }
        }
        // Reference tables: copied whole from the default shard to added shards.
        let home = r.home();
        for table in &r.old.reference {
            let cols = &self.columns[table];
            let donor = self.servers.get(home).await?;
            let want = db::checksum(&donor, table, cols, "true").await.on(
                &self.servers,
                home,
                &format!("checksumming {table}"),
            )?;
            for target in r.added() {
                self.estimates
                    .insert((table.clone(), home, target), want.0.max(0) as u64);
                if self.resumed_targets.contains(&target) {
                    continue;
                }
                let c = self.servers.get(target).await?;
                let have = db::checksum(&c, table, cols, "true").await.on(
                    &self.servers,
                    target,
                    &format!("checksumming {table}"),
                )?;
                if have == want && want.0 > 0 && !self.opts.online {
                    continue;
                }
                if have.0 > 0 && have != want {
                    problems.push(format!(
                        "reference table {table} on new shard {} already holds {} rows that differ from the default shard's {}; empty it first",
                        self.servers.label(target),
                        have.0,
                        want.0
                    ));
                    continue;
                }
                by_target.entry(target).or_default().push(Step {
                    table: table.clone(),
                    source: home,
                    target,
                    chunk: 0,
                    first: i64::MIN,
                    last: i64::MAX,
                    reference: true,
                    state: State::Pending,
                    rows: None,
                    checksum: None,
                });
            }
        }
        if !problems.is_empty() {
            bail!("{}\n{}", problems.join("\n"), self.nothing_changed());
        }
        if by_target.is_empty() {
            return Ok(Vec::new());
        }
        // The run is recorded on every shard before its first step.
        for id in 0..r.names.len() {
            let c = self.servers.get(id).await?;
            c.batch_execute(STATE_DDL).await.on(
                &self.servers,
                id,
                "creating the progress tables (shardline.rebalance_runs)",
            )?;
            c.execute(
                "INSERT INTO shardline.rebalance_runs (run, placement, state) VALUES ($1, $2, 'running') ON CONFLICT (run) DO NOTHING",
                &[&self.id, &r.run],
            )
            .await
            .on(&self.servers, id, "recording the run")?;
        }
        let mut created = Vec::new();
        for (target, steps) in by_target {
            let mut c = self.servers.get(target).await?;
            let tx = c
                .transaction()
                .await
                .on(&self.servers, target, "recording steps")?;
            let insert = tx
                .prepare(
                    "INSERT INTO shardline.rebalance_steps
                        (run, table_name, source, target, chunk, first_hash, last_hash, reference, state)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending')",
                )
                .await
                .on(&self.servers, target, "recording steps")?;
            for s in &steps {
                tx.execute(
                    &insert,
                    &[
                        &self.id,
                        &s.table,
                        &r.names[s.source],
                        &r.names[s.target],
                        &s.chunk,
                        &s.first,
                        &s.last,
                        &s.reference,
                    ],
                )
                .await
                .on(&self.servers, target, "recording steps")?;
            }
            tx.commit()
                .await
                .on(&self.servers, target, "recording steps")?;
            created.extend(steps);
        }
        Ok(created)
    }

    /// The run of these configs recorded on the servers, if any, and its
    /// state. Refuses when a shard records an unfinished run between other
    /// configs (recorded by this version or, in its steps only, by an
    /// earlier one).
    async fn recorded(&self) -> Result<Option<(String, RunState)>> {
        let all: Vec<usize> = (0..self.r.names.len()).collect();
        let mut found: Option<(String, RunState)> = None;
        for rec in db::recorded_runs(&self.servers, &all).await? {
            if rec.placement != self.r.run {
                bail!(
                    "shard {} records an unfinished rebalance between other configs (run {}, started {}, {}). Finish it by running apply with its configs, or undo it with abort and its configs. Nothing was changed.",
                    rec.shard,
                    rec.run,
                    rec.started,
                    rec.state
                );
            }
            match &found {
                Some((other, _)) if *other != rec.run => bail!(
                    "shards record two runs of this rebalance ({other} and {}): look at shardline.rebalance_runs on every shard. Nothing was changed.",
                    rec.run
                ),
                _ => found = Some((rec.run, RunState::parse(&rec.state))),
            }
        }
        for id in all {
            let c = self.servers.get(id).await?;
            let legacy: bool = c
                .query_one(
                    "SELECT to_regclass('shardline.rebalance_steps') IS NOT NULL AND to_regclass('shardline.rebalance_runs') IS NULL",
                    &[],
                )
                .await
                .on(&self.servers, id, "reading recorded progress")?
                .get(0);
            if !legacy {
                continue;
            }
            // Steps recorded by an earlier version of the tool.
            let old = c
                .query(
                    "SELECT DISTINCT run FROM shardline.rebalance_steps WHERE state <> 'done'",
                    &[],
                )
                .await
                .on(&self.servers, id, "reading recorded progress")?;
            if let Some(other) = old.first() {
                bail!(
                    "shard {} records an unfinished rebalance (run {}) of an earlier shardline-rebalance: finish it with that version. Nothing was changed.",
                    self.servers.label(id),
                    other.get::<_, String>(0)
                );
            }
        }
        Ok(found)
    }

    /// Records the run's state on every shard that records the run.
    async fn set_state(&self, state: RunState) -> Result<()> {
        for id in 0..self.r.names.len() {
            let c = self.servers.get(id).await?;
            if !has_state_tables(&c)
                .await
                .on(&self.servers, id, "recording progress")?
            {
                continue;
            }
            c.execute(
                "UPDATE shardline.rebalance_runs SET state = $2 WHERE run = $1",
                &[&self.id, &state.as_str()],
            )
            .await
            .on(&self.servers, id, "recording progress")?;
        }
        Ok(())
    }

    /// Removes the run's records from every shard, and the progress tables
    /// (and the `shardline` schema) where no other run is recorded.
    async fn forget(&self) -> Result<()> {
        for id in 0..self.r.names.len() {
            let mut c = self.servers.get(id).await?;
            if !has_state_tables(&c)
                .await
                .on(&self.servers, id, "removing the run's records")?
            {
                continue;
            }
            let what = "removing the run's records";
            let tx = c.transaction().await.on(&self.servers, id, what)?;
            for table in ["rebalance_steps", "rebalance_deletes", "rebalance_runs"] {
                tx.execute(
                    &format!("DELETE FROM shardline.{table} WHERE run = $1"),
                    &[&self.id],
                )
                .await
                .on(&self.servers, id, what)?;
            }
            let left: i64 = tx
                .query_one(
                    "SELECT (SELECT count(*) FROM shardline.rebalance_steps) + (SELECT count(*) FROM shardline.rebalance_deletes) + (SELECT count(*) FROM shardline.rebalance_runs)",
                    &[],
                )
                .await
                .on(&self.servers, id, what)?
                .get(0);
            if left == 0 {
                tx.batch_execute(
                    "DROP TABLE shardline.rebalance_steps, shardline.rebalance_deletes, shardline.rebalance_runs",
                )
                .await
                .on(&self.servers, id, what)?;
                let others: i64 = tx
                    .query_one(
                        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'shardline'",
                        &[],
                    )
                    .await
                    .on(&self.servers, id, what)?
                    .get(0);
                if others == 0 {
                    tx.batch_execute("DROP SCHEMA IF EXISTS shardline")
                        .await
                        .on(&self.servers, id, what)?;
                }
            }
            tx.commit().await.on(&self.servers, id, what)?;
        }
        Ok(())
    }

    /// Sharded rows the new config places on another shard than the one
    /// holding them (named, by table): every row of a shard it removes, and
    /// rows of a kept shard whose key it places elsewhere. After a move,
    /// only rows written during it (writes were not stopped) can be there.
    /// Shards an online cutover checked inside their delete transactions
    /// are not read again.
    async fn left_behind(&self) -> Result<Vec<String>> {
        let removed = self.r.removed();
        let shards = join_all(
            removed
                .iter()
                .copied()
                .chain(self.r.new_ids.iter().copied())
                .filter(|id| !self.checked.contains(id))
                .map(|id| {
                    let gone = removed.contains(&id);
                    async move {
                        self.left_on(&self.servers.get(id).await?, id, gone, &HashMap::new())
                            .await
                    }
                }),
        )
        .await;
        Ok(shards.into_iter().collect::<Result<Vec<_>>>()?.concat())
    }

    /// `left_behind` on one shard (`gone`: one the new config removes),
    /// through `c` (a transaction sees its own deletes), less the rows per
    /// table verified as moved and not yet deleted (`moved`).
    async fn left_on<C: deadpool_postgres::GenericClient + Sync>(
        &self,
        c: &C,
        id: usize,
        gone: bool,
        moved: &HashMap<String, i64>,
    ) -> Result<Vec<String>> {
        let mut left = Vec::new();
        for t in self.r.tables() {
            let filter = if gone {
                "true".to_string()
            } else {
                format!("({}) <> {id}", self.r.new_owner_sql(t))
            };
            let n: i64 = c
                .query_one(
                    &format!(
                        "SELECT count(*) FROM {} WHERE {filter}",
                        quote_table(&t.name)
                    ),
                    &[],
                )
                .await
                .on(&self.servers, id, &format!("counting rows of {}", t.name))?
                .get::<_, i64>(0)
                - moved.get(&t.name).copied().unwrap_or(0);
            if n > 0 {
                left.push(if gone {
                    format!(
                        "shard {} (removed by the new config) holds {n} rows of {}",
                        self.r.names[id], t.name
                    )
                } else {
                    format!(
                        "shard {} holds {n} rows of {} that the new config places on other shards",
                        self.r.names[id], t.name
                    )
                });
            }
        }
        Ok(left)
    }

    /// The rows a step moves, as a WHERE clause (the same on both servers).
    fn filter(&self, s: &Step) -> String {
        if s.reference {
            return "true".into();
        }
        let r = self.r;
        let t = r
            .tables()
            .iter()
            .find(|t| t.name == s.table)
            .expect("steps name configured tables");
        // Cheapest first (Postgres evaluates them in this order, and stops
        // at the first false): on a source most rows stay, so the new owner
        // rules most out; a range over the whole hash space is no condition.
        let mut filter = format!(
            "{} = {} AND {} = {}",
            r.new_owner_sql(t),
            s.target,
            r.old_owner_sql(t),
            s.source
        );
        if (s.first, s.last) != (i64::MIN, i64::MAX) {
            let _ = write!(
                filter,
                " AND {} BETWEEN {} AND {}",
                t.position_sql(),
                s.first,
                s.last
            );
        }
        filter
    }

    /// Deletes a step's rows (from its source, or from its target on abort).
    fn delete_sql(&self, s: &Step) -> String {
        format!(
            "DELETE FROM {} WHERE {}",
            quote_table(&s.table),
            self.filter(s)
        )
    }

    /// The step's key (`$1`..`$5` of `STEP_KEY`) followed by `more`.
    fn step_params<'s>(
        &'s self,
        s: &'s Step,
        more: &[&'s (dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Vec<&'s (dyn tokio_postgres::types::ToSql + Sync)> {
        let mut params = self.key_params(s).to_vec();
        params.extend_from_slice(more);
        params
    }

    fn key_params<'s>(&'s self, s: &'s Step) -> [&'s (dyn tokio_postgres::types::ToSql + Sync); 5] {
        [
            &self.id,
            &s.table,
            &self.r.names[s.source],
            &self.r.names[s.target],
            &s.chunk,
        ]
    }

    fn bar(&self, len: u64, prefix: String, unit: &str) -> ProgressBar {
        let bar = self.progress.add(ProgressBar::new(len));
        let template = format!(
            "{{prefix:<28}} [{{bar:30}}] {{human_pos}}/{{human_len}} {unit}, {{rate}}, ETA {{eta}} {{msg}}"
        );
        bar.set_style(
            ProgressStyle::with_template(&template)
                .expect("a valid template")
                .with_key(
                    "rate",
                    |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = write!(w, "{:.0}/s", state.per_sec());
                    },
                )
                .progress_chars("=> "),
        );
        bar.set_prefix(prefix);
        bar
    }

    async fn copy_all(&mut self, steps: &mut [Step]) -> Result<()> {
        for table in self.order.clone() {
            let mine: Vec<usize> = (0..steps.len())
                .filter(|&i| steps[i].table == table)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let pending: Vec<usize> = mine
                .iter()
                .copied()
                .filter(|&i| steps[i].state == State::Pending)
                .collect();
            let done_rows: i64 = mine.iter().filter_map(|&i| steps[i].rows).sum();
            if pending.is_empty() {
                continue;
            }
            let estimate = self.estimate(&table, &pending, steps) + done_rows.max(0) as u64;
            let bar = self.bar(estimate, format!("copy {table}"), "rows");
            bar.set_position(done_rows.max(0) as u64);
            let started = Instant::now();
            for i in pending {
                let rows = self.copy_step(&steps[i], &bar).await?;
                steps[i].rows = Some(rows as i64);
                steps[i].state = State::Copied;
                if self.progress.is_hidden() {
                    let s = &steps[i];
                    eprintln!(
                        "copied {table} {} -> {} chunk {}: {rows} rows ({} of about {} rows of {table}, {:.0} rows/s)",
                        self.r.names[s.source],
                        self.r.names[s.target],
                        s.chunk,
                        bar.position(),
                        bar.length().unwrap_or(0),
                        bar.position() as f64 / started.elapsed().as_secs_f64().max(1e-3)
                    );
                }
            }
            bar.finish_with_message("copied");
        }
        Ok(())
    }

    /// Rows the pending steps of a table will copy, for the progress bar:
    /// each pair's rows as counted before copying, shared among its chunks.
    fn estimate(&self, table: &str, pending: &[usize], steps: &[Step]) -> u64 {
        let mut pairs: Vec<(usize, usize)> = pending
            .iter()
            .map(|&i| (steps[i].source, steps[i].target))
            .collect();
        pairs.dedup();
        pairs
            .into_iter()
            .map(|(source, target)| {
                let of_pair =
                    |x: &&Step| x.table == table && x.source == source && x.target == target;
                let all = steps.iter().filter(of_pair).count().max(1) as u64;
                let left = pending.iter().map(|&i| &steps[i]).filter(of_pair).count() as u64;
                let rows = self
                    .estimates
                    .get(&(table.to_string(), source, target))
                    .copied()
                    .unwrap_or(0);
                rows * left / all
            })
            .sum()
    }

    async fn copy_step(&mut self, s: &Step, bar: &ProgressBar) -> Result<u64> {
        let cols = &self.columns[&s.table];
        let list = db::copy_list(cols);
        let filter = self.filter(s);
        let table = quote_table(&s.table);
        let source = self.servers.get(s.source).await?;
        let mut target = self.servers.get(s.target).await?;
        let what = format!(
            "copying {} {} -> {} chunk {}",
            s.table, self.r.names[s.source], self.r.names[s.target], s.chunk
        );
        let tx = target
            .transaction()
            .await
            .on(&self.servers, s.target, &what)?;
        let state: String = tx
            .query_one(
                &format!("SELECT state FROM shardline.rebalance_steps WHERE {STEP_KEY} FOR UPDATE"),
                &self.key_params(s),
            )
            .await
            .on(&self.servers, s.target, &what)?
            .get(0);
        if State::parse(&state) != State::Pending {
            bail!(
                "{what}: the step is {state} on the target although it was pending when this run started; is another shardline-rebalance running?"
            );
        }
        if self.resumed_targets.contains(&s.target) {
            let present: i64 = tx
                .query_one(&format!("SELECT count(*) FROM {table} WHERE {filter}"), &[])
                .await
                .on(&self.servers, s.target, &what)?
                .get(0);
            if present > 0 {
                bail!(
                    "{what}: the target already holds {present} rows of this chunk although the step was never copied; remove them or check who wrote them. Nothing was deleted."
                );
            }
        }
        self.copies_started += 1;
        let point = format!("copy:{}", self.copies_started);
        let stop_at = self.opts.stop_at.clone();
        let rows = copy::stream(
            &source,
            &tx,
            &format!("SELECT {list} FROM {table} WHERE {filter}"),
            &format!("{table} ({list})"),
            self.opts.format,
            |n| bar.inc(n),
            || {
                if stop_at.as_deref() == Some(point.as_str()) {
                    eprintln!("shardline-rebalance: stopped at {point}");
                    loop {
                        std::thread::sleep(std::time::Duration::from_secs(3600));
                    }
                }
            },
        )
        .await
        .map_err(|e| self.copy_error(&what, s, e))?;
        tx.execute(
            &format!(
                "UPDATE shardline.rebalance_steps SET state = 'copied', rows = $6, updated = now() WHERE {STEP_KEY}"
            ),
            &self.step_params(s, &[&(rows as i64)]),
        )
        .await
        .on(&self.servers, s.target, &what)?;
        tx.commit().await.on(&self.servers, s.target, &what)?;
        Ok(rows)
    }

    fn copy_error(&self, what: &str, s: &Step, e: CopyError) -> anyhow::Error {
        match e {
            CopyError::Source(e) => anyhow::anyhow!(
                "{what}: reading from shard {}: {}",
                self.servers.label(s.source),
                db::describe(&e)
            ),
            CopyError::Target(e) => anyhow::anyhow!(
                "{what}: writing to shard {}: {}",
                self.servers.label(s.target),
                db::describe(&e)
            ),
        }
    }

    /// Verifies the copied steps and, with --recopy-changed, the steps an
    /// earlier run verified, against the source as it is now; with that
    /// option the ranges that differ are copied again ([`Run::recopy`]).
    async fn verify_all(&mut self, steps: &mut [Step]) -> Result<()> {
        let again = self.opts.recopy_changed;
        let todo: Vec<usize> = (0..steps.len())
            .filter(|&i| {
                steps[i].state == State::Copied || (again && steps[i].state == State::Verified)
            })
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        let bar = self.bar(todo.len() as u64, "verify".into(), "steps");
        let mut changed = Vec::new();
        for i in todo {
            let s = &steps[i];
            let what = format!(
                "verifying {} {} -> {} chunk {}",
                s.table, self.r.names[s.source], self.r.names[s.target], s.chunk
            );
            let (a, b) = self.checksums(s, &what).await?;
            bar.inc(1);
            // (Rows a stream copied were not counted.)
            if a != b || s.rows.is_some_and(|n| n != a.0) {
                if again {
                    changed.push(i);
                    continue;
                }
                bail!(
                    "verification failed for {}\n  copied: {} rows\nNothing was deleted; the copied rows stay on the target. Find what changed (were writes stopped?). Once writes are stopped, run again with --recopy-changed to copy the rows that differ again from the source, verify and go on; or undo the whole run with `shardline-rebalance abort` and the same configs (it removes the copies), then apply again.",
                    self.differs(s, &a, &b),
                    s.rows.unwrap_or(0)
                );
            }
            if s.state == State::Copied || s.checksum.as_ref() != Some(&a.1) {
                self.mark_verified(s, &a, &what).await?;
            }
            steps[i].state = State::Verified;
            steps[i].rows = Some(a.0);
            steps[i].checksum = Some(a.1);
        }
        bar.finish_with_message("verified");
        if !changed.is_empty() {
            self.recopy(steps, &changed).await?;
        }
        self.log("every copied range verified (row counts and checksums equal on both shards)");
        Ok(())
    }

    /// `(rows, checksum)` of a step's rows on its source and on its target.
    async fn checksums(&self, s: &Step, what: &str) -> Result<((i64, String), (i64, String))> {
        let (a, b) = tokio::join!(
            self.sum_on(s.source, s, what.to_string()),
            self.sum_on(s.target, s, what.to_string())
        );
        Ok((a?, b?))
    }

    /// A step whose sums differ on its source (`a`) and target (`b`), for
    /// messages.
    fn differs(&self, s: &Step, a: &(i64, String), b: &(i64, String)) -> String {
        format!(
            "{} {} -> {} chunk {} (hashes {}..={}):\n  source {}: {} rows, checksum {}\n  target {}: {} rows, checksum {}",
            s.table,
            self.r.names[s.source],
            self.r.names[s.target],
            s.chunk,
            s.first,
            s.last,
            self.servers.label(s.source),
            a.0,
            a.1,
            self.servers.label(s.target),
            b.0,
            b.1
        )
    }

    /// `(rows, checksum)` of a step's rows on shard `id`.
    async fn sum_on(&self, id: usize, s: &Step, what: String) -> Result<(i64, String)> {
        let c = self.servers.get(id).await?;
        db::checksum(&c, &s.table, &self.columns[&s.table], &self.filter(s))
            .await
            .on(&self.servers, id, &what)
    }

    /// Records a step as verified with the rows and checksum both servers
    /// agree on.
    async fn mark_verified(&self, s: &Step, sum: &(i64, String), what: &str) -> Result<()> {
        let target = self.servers.get(s.target).await?;
        target
            .execute(
                &format!(
                    "UPDATE shardline.rebalance_steps SET state = 'verified', rows = $6, checksum = $7, updated = now() WHERE {STEP_KEY}"
                ),
                &self.step_params(s, &[&sum.0, &sum.1]),
            )
            .await
            .on(&self.servers, s.target, what)?;
        Ok(())
    }

    /// --recopy-changed: makes the changed steps' rows on their targets what
    /// they are on their sources now. Rows that differ or are missing are
    /// written again from the source, parents first so that a new row finds
    /// the row it references (matched by primary key and updated in place,
    /// so foreign keys into them are untouched). Rows the source no longer
    /// has are then removed from the copy, children first (their ON DELETE
    /// actions do on the target what they did on the source). A table
    /// without a primary key that nothing references is copied again whole.
    /// Each range is then verified again and recorded with its new count
    /// and checksum. Every part can be repeated: a rerun compares again.
    async fn recopy(&self, steps: &mut [Step], changed: &[usize]) -> Result<()> {
        let mut diffs: HashMap<usize, Option<Diff>> = HashMap::new();
        for &i in changed {
            diffs.insert(i, self.diff(&steps[i]).await?);
        }
        let mut tally: HashMap<usize, (u64, u64)> = HashMap::new();
        for table in &self.order {
            for &i in changed.iter().filter(|&&i| steps[i].table == *table) {
                tally.entry(i).or_default().0 = self.rewrite(&steps[i], diffs[&i].as_ref()).await?;
            }
        }
        for table in self.order.iter().rev() {
            for &i in changed.iter().filter(|&&i| steps[i].table == *table) {
                if let Some(diff) = &diffs[&i] {
                    tally.entry(i).or_default().1 = self.remove_gone(&steps[i], diff).await?;
                }
            }
        }
        for &i in changed {
            let s = &steps[i];
            let what = format!(
                "verifying {} {} -> {} chunk {} after copying its changed rows again",
                s.table, self.r.names[s.source], self.r.names[s.target], s.chunk
            );
            let (now, copied) = self.checksums(s, &what).await?;
            if now != copied {
                bail!(
                    "{what}: the range still differs ({} rows, checksum {} on shard {}; {} rows, checksum {} on shard {}): something keeps writing to it. Nothing was deleted from this range. Stop the writes, then run again.",
                    now.0,
                    now.1,
                    self.servers.label(s.source),
                    copied.0,
                    copied.1,
                    self.servers.label(s.target)
                );
            }
            self.mark_verified(s, &now, &what).await?;
            let (written, removed) = tally[&i];
            self.log(&format!(
                "{} {} -> {} chunk {} had changed since it was copied: {written} rows written again and {removed} removed from the copy on {}; verified, {} rows",
                s.table,
                self.r.names[s.source],
                self.r.names[s.target],
                s.chunk,
                self.r.names[s.target],
                now.0
            ));
            let s = &mut steps[i];
            s.rows = Some(now.0);
            s.checksum = Some(now.1);
            s.state = State::Verified;
        }
        Ok(())
    }

    /// How a step's rows on its target differ from its source now, by
    /// primary key (`None` for a table without one, copied again whole).
    async fn diff(&self, s: &Step) -> Result<Option<Diff>> {
        let what = format!(
            "comparing the rows of {} {} -> {} chunk {}",
            s.table, self.r.names[s.source], self.r.names[s.target], s.chunk
        );
        let Some(key) = self.primary_key(s, &what).await? else {
            return Ok(None);
        };
        let sql = format!(
            "SELECT {}, {} FROM {} WHERE {}",
            key.text,
            db::row_hash_sql(&self.columns[&s.table]),
            quote_table(&s.table),
            self.filter(s)
        );
        let source = self.servers.get(s.source).await?;
        let target = self.servers.get(s.target).await?;
        let (a, b) = tokio::join!(source.query(&sql, &[]), target.query(&sql, &[]));
        let by_key = |rows: Vec<tokio_postgres::Row>| -> HashMap<String, i64> {
            rows.iter().map(|r| (r.get(0), r.get(1))).collect()
        };
        let now = by_key(a.on(&self.servers, s.source, &what)?);
        let copied = by_key(b.on(&self.servers, s.target, &what)?);
        let gone = copied
            .keys()
            .filter(|k| !now.contains_key(*k))
            .cloned()
            .collect();
        let write = now
            .into_iter()
            .filter(|(k, h)| copied.get(k) != Some(h))
            .map(|(k, _)| k)
            .collect();
        Ok(Some(Diff { key, write, gone }))
    }

    /// A step's primary key, or `None` without one (when something
    /// references the table, the rows cannot be matched up and the run
    /// stops).
    async fn primary_key(&self, s: &Step, what: &str) -> Result<Option<Key>> {
        let target = self.servers.get(s.target).await?;
        let (key, referenced) =
            db::key_and_referenced(&target, &s.table)
                .await
                .on(&self.servers, s.target, what)?;
        if key.is_empty() && referenced {
            bail!(
                "{what}: {} has no primary key and foreign keys reference it, so its changed rows cannot be matched up without touching the rows that reference them. Nothing was deleted from this range. Put the rows back as they were verified, then run again.",
                s.table
            );
        }
        Ok((!key.is_empty()).then(|| {
            let list = key
                .iter()
                .map(|c| quote_ident(c))
                .collect::<Vec<_>>()
                .join(", ");
            Key {
                text: format!("ROW({list})::text"),
                list,
                columns: key,
            }
        }))
    }

    /// Writes the rows of a step that differ on its target, or are missing
    /// there, again from its source (the whole range without a `diff`).
    /// Returns how many.
    async fn rewrite(&self, s: &Step, diff: Option<&Diff>) -> Result<u64> {
        let what = format!(
            "copying the changed rows of {} {} -> {} chunk {} again",
            s.table, self.r.names[s.source], self.r.names[s.target], s.chunk
        );
        let cols = &self.columns[&s.table];
        let list = db::copy_list(cols);
        let filter = self.filter(s);
        let table = quote_table(&s.table);
        let source = self.servers.get(s.source).await?;
        let mut target = self.servers.get(s.target).await?;
        let Some(Diff { key, write, .. }) = diff else {
            // Nothing references it: the whole range is copied again.
            let tx = target
                .transaction()
                .await
                .on(&self.servers, s.target, &what)?;
            tx.execute(&format!("DELETE FROM {table} WHERE {filter}"), &[])
                .await
                .on(&self.servers, s.target, &what)?;
            let n = copy::stream(
                &source,
                &tx,
                &format!("SELECT {list} FROM {table} WHERE {filter}"),
                &format!("{table} ({list})"),
                self.opts.format,
                |_| {},
                || {},
            )
            .await
            .map_err(|e| self.copy_error(&what, s, e))?;
            tx.commit().await.on(&self.servers, s.target, &what)?;
            return Ok(n);
        };
        if write.is_empty() {
            return Ok(0);
        }
        // Only rows of this range are overwritten: a key that a row outside
        // it holds on the target stops the run.
        let taken: i64 = target
            .query_one(
                &format!(
                    "SELECT count(*) FROM {table} WHERE {} = ANY($1) AND NOT ({filter})",
                    key.text
                ),
                &[write],
            )
            .await
            .on(&self.servers, s.target, &what)?
            .get(0);
        if taken > 0 {
            bail!(
                "{what}: {taken} changed rows have keys that rows outside this range hold on shard {}. Nothing was deleted from this range.",
                self.servers.label(s.target)
            );
        }
        let rows: String = source
            .query_one(
                &format!(
                    "SELECT coalesce(json_agg(x), '[]')::text FROM (SELECT {list} FROM {table} WHERE {filter} AND {} = ANY($1)) x",
                    key.text
                ),
                &[write],
            )
            .await
            .on(&self.servers, s.source, &what)?
            .get(0);
        let set: Vec<String> = cols
            .iter()
            .filter(|c| !c.generated && !key.columns.contains(&c.name))
            .map(|c| {
                let c = quote_ident(&c.name);
                format!("{c} = EXCLUDED.{c}")
            })
            .collect();
        let on_conflict = if set.is_empty() {
            "DO NOTHING".to_string()
        } else {
            format!("DO UPDATE SET {}", set.join(", "))
        };
        target
            .execute(
                &format!(
                    "INSERT INTO {table} ({list}) SELECT {list} FROM json_populate_recordset(NULL::{table}, $1::text::json) ON CONFLICT ({}) {on_conflict}",
                    key.list
                ),
                &[&rows],
            )
            .await
            .on(&self.servers, s.target, &what)?;
        Ok(write.len() as u64)
    }

    /// Removes from a step's target the rows its source no longer has.
    /// Returns how many.
    async fn remove_gone(&self, s: &Step, diff: &Diff) -> Result<u64> {
        let what = format!(
            "removing rows of {} {} -> {} chunk {} that its source no longer has",
            s.table, self.r.names[s.source], self.r.names[s.target], s.chunk
        );
        let Diff { key, gone, .. } = diff;
        if gone.is_empty() {
            return Ok(0);
        }
        let target = self.servers.get(s.target).await?;
        target
            .execute(
                &format!(
                    "DELETE FROM {} WHERE {} AND {} = ANY($1)",
                    quote_table(&s.table),
                    self.filter(s),
                    key.text
                ),
                &[gone],
            )
            .await
            .on(&self.servers, s.target, &what)
    }

    async fn delete_all(&mut self, steps: &mut [Step]) -> Result<()> {
        let todo = steps.iter().filter(|s| s.state == State::Verified).count();
        if todo == 0 {
            return Ok(());
        }
        let bar = self.bar(todo as u64, "delete moved rows".into(), "steps");
        // Children before parents, so a cascading foreign key finds nothing.
        for table in self.order.clone().iter().rev() {
            for s in steps.iter_mut() {
                if s.table != *table || s.state != State::Verified {
                    continue;
                }
                if !s.reference {
                    self.delete_step(s).await?;
                }
                let target = self.servers.get(s.target).await?;
                target
                    .execute(
                        &format!(
                            "UPDATE shardline.rebalance_steps SET state = 'done', updated = now() WHERE {STEP_KEY}"
                        ),
                        &self.key_params(s),
                    )
                    .await
                    .on(&self.servers, s.target, "recording progress")?;
                s.state = State::Done;
                bar.inc(1);
            }
        }
        bar.finish_with_message("done");
        Ok(())
    }

    /// Deletes a verified step's rows from its source, or stops the run
    /// when they are no longer the rows verified.
    async fn delete_step(&mut self, s: &Step) -> Result<()> {
        let what = format!(
            "deleting moved rows of {} from {} (chunk {} -> {})",
            s.table, self.r.names[s.source], s.chunk, self.r.names[s.target]
        );
        if let Some(now) = self.delete_rows(s, &what).await? {
            bail!(
                "{what}: the rows changed on the source after they were copied and verified ({now}). Were writes stopped? Nothing was deleted from this range; the copy on shard {} is the verified version. Stop the writes, then run again with --recopy-changed: the ranges that differ are copied again from their sources, verified, and the move goes on (or put those rows back as they were verified).",
                self.r.names[s.target],
            );
        }
        Ok(())
    }

    /// Deletes a step's rows from its source inside the caller's
    /// transaction `c` and returns how many it deleted and their checksum.
    /// A delete that changed other rows (a cascade, rule or trigger the
    /// checks missed) is an error; the caller's transaction must then be
    /// rolled back.
    async fn delete_counted<C: deadpool_postgres::GenericClient + Sync>(
        &self,
        c: &C,
        s: &Step,
        what: &str,
    ) -> Result<(i64, String)> {
        let cols = &self.columns[&s.table];
        // Rows this transaction inserted, updated and deleted per table,
        // before and after the delete: what the delete did, cascades and
        // rules included, not only what it returned.
        const CHANGES: &str =
            "SELECT relid, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_xact_user_tables";
        let changes = |rows: Vec<tokio_postgres::Row>| -> HashMap<u32, (i64, i64, i64)> {
            rows.iter()
                .map(|r| (r.get::<_, u32>(0), (r.get(1), r.get(2), r.get(3))))
                .collect()
        };
        let before = changes(
            c.query(CHANGES, &[])
                .await
                .on(&self.servers, s.source, what)?,
        );
        let gone = c
            .query_one(
                &db::delete_checksum_sql(
                    &s.table,
                    cols,
                    &self.filter(s),
                    // As the checksum it is compared with was made.
                    s.checksum
                        .as_deref()
                        .map_or_else(|| db::RowHash::for_columns(cols), db::RowHash::of_checksum),
                ),
                &[],
            )
            .await
            .on(&self.servers, s.source, what)?;
        let after = changes(
            c.query(CHANGES, &[])
                .await
                .on(&self.servers, s.source, what)?,
        );
        let (deleted, sum): (i64, String) = (gone.get(0), gone.get(1));
        let table_oid: Option<u32> = c
            .query_one("SELECT to_regclass($1)::oid", &[&quote_table(&s.table)])
            .await
            .on(&self.servers, s.source, what)?
            .get(0);
        let mut elsewhere = Vec::new();
        for (rel, now) in &after {
            let was = before.get(rel).copied().unwrap_or_default();
            let (ins, upd, del) = (now.0 - was.0, now.1 - was.1, now.2 - was.2);
            let expected_del = if Some(*rel) == table_oid { deleted } else { 0 };
            if ins != 0 || upd != 0 || del != expected_del {
                let name: String = c
                    .query_one("SELECT $1::oid::regclass::text", &[rel])
                    .await
                    .on(&self.servers, s.source, what)?
                    .get(0);
                elsewhere.push(format!(
                    "{name}: {} inserted, {upd} updated, {} deleted",
                    ins,
                    del - expected_del
                ));
            }
        }
        if !elsewhere.is_empty() {
            bail!(
                "{what}: the delete changed rows that do not move ({}): a cascade, rule or trigger the checks did not catch. Nothing was deleted from this range. Remove what does it for the move, then run again.",
                elsewhere.join("; ")
            );
        }
        Ok((deleted, sum))
    }

    /// Deletes a verified step's rows from its source, once: the receipt
    /// is written in the same transaction. When the source's rows are no
    /// longer the verified ones, nothing is deleted and what they are now
    /// is returned.
    async fn delete_rows(&mut self, s: &Step, what: &str) -> Result<Option<String>> {
        let mut source = self.servers.get(s.source).await?;
        let tx = source
            .transaction()
            .await
            .on(&self.servers, s.source, what)?;
        let receipt = tx
            .query_opt(
                &format!("SELECT rows FROM shardline.rebalance_deletes WHERE {STEP_KEY}"),
                &self.key_params(s),
            )
            .await
            .on(&self.servers, s.source, what)?;
        if receipt.is_some() {
            return Ok(None);
        }
        let (deleted, sum) = self.delete_counted(&tx, s, what).await?;
        let expected = s.rows.unwrap_or(0);
        if deleted != expected || s.checksum.as_ref().is_some_and(|c| *c != sum) {
            tx.rollback().await.on(&self.servers, s.source, what)?;
            return Ok(Some(format!(
                "{deleted} rows, checksum {sum}; verified: {expected} rows, checksum {}",
                s.checksum.as_deref().unwrap_or("?")
            )));
        }
        tx.execute(
            "INSERT INTO shardline.rebalance_deletes (run, table_name, source, target, chunk, rows) VALUES ($1, $2, $3, $4, $5, $6)",
            &self.step_params(s, &[&expected]),
        )
        .await
        .on(&self.servers, s.source, what)?;
        tx.commit().await.on(&self.servers, s.source, what)?;
        self.deletes_done += 1;
        self.stop_point(&format!("delete:{}", self.deletes_done));
        Ok(None)
    }
}

/// Online moves (`apply_online`): the copy by logical replication, and the
/// start of the cutover.
impl Run<'_> {
    /// An offline move must not run over an online one's replication: its
    /// deletes on the sources would reach the copies.
    async fn refuse_streams(&self) -> Result<()> {
        let all: Vec<usize> = (0..self.r.names.len()).collect();
        let left = online::leftovers(&self.servers, &all).await?;
        if !left.is_empty() {
            bail!(
                "an online move's replication is on the servers ({}): finish it with apply --online (with the same configs and --admin options), or undo it with abort. Nothing was changed.",
                left.join(", ")
            );
        }
        Ok(())
    }

    /// Starts (or continues) the streams, waits until they have copied
    /// every table and lag at most `max_lag`, compares the ranges once
    /// online, then PAUSEs every proxy, lets each stream apply everything up
    /// to its source's position, stops and removes it. The steps are left
    /// `copied`, for `verify_all` and `delete_all` to finish with traffic
    /// held. A run whose deletes had begun only pauses (its streams were
    /// removed before them).
    async fn stream_and_pause(
        &mut self,
        steps: &mut [Step],
        resumed: bool,
        proxies: &mut Proxies,
    ) -> Result<()> {
        let r = self.r;
        let all: Vec<usize> = (0..r.names.len()).collect();
        if self.first_deletes().await?.is_some() {
            online::remove_leftovers(&self.servers, &all).await?;
            proxies.pause().await?;
            self.log(&format!(
                "paused {} proxies: this run's cutover had begun deleting moved rows; it finishes now",
                proxies.len()
            ));
            return Ok(());
        }
        let streams = online::streams(r, &self.id);
        let mut found = Vec::new();
        for s in &streams {
            found.push(online::enabled(&self.servers, s).await?);
        }
        let copied = steps
            .iter()
            .any(|s| matches!(s.state, State::Copied | State::Verified));
        if found.contains(&Some(false)) || (resumed && copied && found.iter().all(Option::is_none))
        {
            bail!(
                "rows of this run were copied before, but no replication keeps them current (an interrupted cutover, or an offline run): run `shardline-rebalance abort` with the same configs (it removes the copies), then apply --online again. Nothing was changed."
            );
        }
        online::requirements(&self.servers, r, &streams).await?;
        for (s, found) in streams.iter().zip(&found) {
            if found.is_none() {
                self.empty_reference_copies(s, steps).await?;
            }
            online::start(&self.servers, s, &self.login, &r.primaries[s.source]).await?;
        }
        self.mark_streamed(steps).await?;
        self.log(&format!(
            "replicating the moving rows: {} streams ({})",
            streams.len(),
            streams
                .iter()
                .map(|s| format!("{} -> {}", r.names[s.source], r.names[s.target]))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        self.stop_point("stream");
        self.catch_up(&streams).await?;
        self.stop_point("caught-up");
        // From here on the targets confirm each change at its commit:
        // the comparison's held writes and the pause wait for that.
        self.reachable().await?;
        for s in &streams {
            online::flush_each_commit(&self.servers, s).await?;
        }
        self.compare_online(&streams, steps).await?;
        self.reachable().await?;
        // The lag at the pause is what clients wait for: close it again.
        self.catch_up(&streams).await?;
        self.stop_point("pause");
        proxies.pause().await?;
        self.paused = Some(Instant::now());
        self.log(&format!(
            "paused {} proxies for the cutover: their clients wait",
            proxies.len()
        ));
        self.stop_point("paused");
        let t = Instant::now();
        let servers = &self.servers;
        join_all(streams.iter().map(|s| async move {
            let lsn = online::current_lsn(servers, s.source).await?;
            online::wait_applied(servers, s, &lsn, CUTOVER_WAIT).await
        }))
        .await
        .into_iter()
        .collect::<Result<Vec<()>>>()?;
        let applied = t.elapsed();
        join_all(
            streams
                .iter()
                .map(|s| online::stop(servers, s, CUTOVER_WAIT)),
        )
        .await
        .into_iter()
        .collect::<Result<Vec<()>>>()?;
        let stopped = t.elapsed();
        join_all(streams.iter().map(|s| online::remove(servers, s)))
            .await
            .into_iter()
            .collect::<Result<Vec<()>>>()?;
        self.log(&format!(
            "cutover: the targets applied everything in {} ms, replication stopped in {} ms and removed in {} ms",
            applied.as_millis(),
            (stopped - applied).as_millis(),
            (t.elapsed() - stopped).as_millis()
        ));
        Ok(())
    }

    /// The online cutover's verify, with the proxies paused, every shard
    /// at once: the targets sum their copies while each source, in one
    /// open transaction, either sums its moved rows and hides them from the
    /// proxies ([`hide`]; a removed shard only sums them), or deletes them
    /// (children first, a receipt per range) and sums what it deleted.
    /// Each also counts the rows the new placement would miss. Only when
    /// every range agrees (rows and checksum, the sums the offline path
    /// compares) and nothing is missed are the ranges recorded as
    /// verified, the placement recorded and the transactions committed; a
    /// mismatch rolls every one back and stops the run with nothing hidden
    /// or deleted. Returns whether rows were left for `delete_all` to
    /// delete once the proxies resume (hiding takes a fraction of the time
    /// deleting does, and clients wait for this).
    async fn settle_online(&mut self, steps: &mut [Step]) -> Result<bool> {
        let todo: Vec<usize> = (0..steps.len())
            .filter(|&i| steps[i].state == State::Copied)
            .collect();
        if todo.is_empty() {
            return Ok(false);
        }
        let mut sources: Vec<usize> = todo
            .iter()
            .filter(|&&i| !steps[i].reference)
            .map(|&i| steps[i].source)
            .collect();
        sources.sort_unstable();
        sources.dedup();
        let removed = self.r.removed();
        let (all, this, removed) = (&*steps, &*self, &removed);
        let what = |s: &Step| {
            format!(
                "verifying {} {} -> {} chunk {}",
                s.table, this.r.names[s.source], this.r.names[s.target], s.chunk
            )
        };
        // Reference tables stay on their source: both sides are summed.
        let todo = &todo;
        let sum = |id: usize, i: usize| this.sum_on(id, &all[i], what(&all[i]));
        let started = Instant::now();
        let copies = async {
            let sums = join_all(todo.iter().map(|&i| sum(all[i].target, i))).await;
            (sums, started.elapsed())
        };
        let kept = join_all(
            todo.iter()
                .filter(|&&i| all[i].reference)
                .map(|&i| async move { Ok::<_, anyhow::Error>((i, sum(all[i].source, i).await?)) }),
        );
        let roles = self.r.proxy_roles();
        let roles = &roles;
        let deletes = join_all(sources.iter().map(|&id| async move {
            let c = OpenTxn::begin(this.servers.get(id).await?, &this.servers, id).await?;
            let mine: Vec<usize> = this
                .order
                .iter()
                .rev()
                .flat_map(|table| {
                    todo.iter().copied().filter(move |&i| {
                        let s = &all[i];
                        s.source == id && !s.reference && s.table == *table
                    })
                })
                .collect();
            let mut tables: Vec<String> = mine.iter().map(|&i| quote_table(&all[i].table)).collect();
            tables.dedup();
            // A removed shard's rows are not read through a proxy running
            // the new config: they need no hiding to be deleted later.
            let gone = removed.contains(&id);
            let hide = !gone
                && c.client()
                    .query_one(hide::CAN_HIDE_SQL, &[roles, &tables])
                    .await
                    .on(&this.servers, id, "reading roles and row security")?
                    .get::<_, bool>(0);
            let defer = gone || hide;
            let mut sums = Vec::new();
            let mut moved: HashMap<String, i64> = HashMap::new();
            if hide {
                // Nothing else changes these tables until the hiding
                // commits: the rows summed are the rows hidden. An
                // autovacuum in the way is cancelled at once.
                c.client()
                    .batch_execute(&format!(
                        "SET LOCAL lock_timeout = '{}ms'; SET LOCAL deadlock_timeout = '20ms'; LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
                        CUTOVER_LOCK_WAIT.as_millis(),
                        tables.join(", ")
                    ))
                    .await
                    .on(&this.servers, id, "locking the moving tables")?;
            }
            for &i in &mine {
                let s = &all[i];
                let what = what(s);
                let sum = if defer {
                    db::checksum(c.client(), &s.table, &this.columns[&s.table], &this.filter(s))
                        .await
                        .on(&this.servers, id, &what)?
                } else {
                    let sum = this.delete_counted(c.client(), s, &what).await?;
                    c.client()
                        .execute(
                            "INSERT INTO shardline.rebalance_deletes (run, table_name, source, target, chunk, rows) VALUES ($1, $2, $3, $4, $5, $6)",
                            &this.step_params(s, &[&sum.0]),
                        )
                        .await
                        .on(&this.servers, id, &what)?;
                    sum
                };
                *moved.entry(s.table.clone()).or_default() += sum.0;
                sums.push((i, sum));
            }
            if hide {
                for t in this.r.tables().iter().filter(|t| tables.contains(&quote_table(&t.name))) {
                    c.client()
                        .batch_execute(&hide::hide_sql(&quote_table(&t.name), &this.r.new_owner_is_sql(t, id)))
                        .await
                        .on(&this.servers, id, &format!("hiding the moved rows of {}", t.name))?;
                }
            }
            // What the new placement would miss once the moved rows are
            // gone, seen before anything commits.
            let counted = started.elapsed();
            let left = this.left_on(c.client(), id, gone, &moved).await?;
            Ok::<_, anyhow::Error>((c, sums, left, (id, counted, started.elapsed(), defer)))
        }));
        // The other shards' check for rows left behind, meanwhile: nothing
        // changes them until the proxies resume.
        let others: Vec<usize> = removed
            .iter()
            .copied()
            .chain(this.r.new_ids.iter().copied())
            .filter(|id| !sources.contains(id) && !this.checked.contains(id))
            .collect();
        let elsewhere = join_all(others.iter().map(|&id| async move {
            let c = this.servers.get(id).await?;
            this.left_on(&c, id, removed.contains(&id), &HashMap::new())
                .await
        }));
        let ((copies, summed), kept, deletes, elsewhere) =
            tokio::join!(copies, kept, deletes, elsewhere);
        let copies: HashMap<usize, (i64, String)> = todo
            .iter()
            .copied()
            .zip(copies.into_iter().collect::<Result<Vec<_>>>()?)
            .collect();
        let mut open = Vec::new();
        let mut sources_sums = kept.into_iter().collect::<Result<Vec<_>>>()?;
        let mut took = Vec::new();
        let mut left = elsewhere.into_iter().collect::<Result<Vec<_>>>()?.concat();
        let mut deferred = false;
        for d in deletes {
            let (c, sums, behind, (id, counted, t, later)) = d?;
            open.push(c);
            sources_sums.extend(sums);
            left.extend(behind);
            deferred |= later;
            took.push(format!(
                "{} {} ms ({} by {} ms)",
                self.r.names[id],
                t.as_millis(),
                if later {
                    "summed and hidden"
                } else {
                    "deleted"
                },
                counted.as_millis()
            ));
        }
        self.cutover_mark(&format!(
            "copies summed in {} ms, moved rows summed or deleted (not yet committed) and the rows left behind counted in {}; all",
            summed.as_millis(),
            took.join(", ")
        ));
        let mut differ = Vec::new();
        for (i, a) in &sources_sums {
            let (s, b) = (&steps[*i], &copies[i]);
            if a != b {
                differ.push(self.differs(s, a, b));
            }
        }
        if !differ.is_empty() {
            drop(open);
            bail!(
                "verification failed during the cutover: every delete was rolled back and the placement is unchanged:\n  {}\nThe copies stay on the targets: find what wrote to them, undo them with `shardline-rebalance abort` and the same configs, then apply --online again.",
                differ.join("\n  ")
            );
        }
        if !left.is_empty() {
            drop(open);
            bail!(
                "{}: rows no range of this move covers (written to the shard directly rather than through a proxy, or misplaced before), which the new placement would not find. Every delete was rolled back and the placement is unchanged. Undo the copies with `shardline-rebalance abort` and the same configs, put those rows on the shards the old config gives them, then apply --online again.",
                left.join("; ")
            );
        }
        for (i, a) in &sources_sums {
            let s = &steps[*i];
            self.mark_verified(s, a, &what(s)).await?;
        }
        for (i, a) in sources_sums {
            steps[i].state = State::Verified;
            steps[i].rows = Some(a.0);
            steps[i].checksum = Some(a.1);
        }
        self.cutover_mark("moved rows verified");
        // From the first commit on, a proxy on the old placement misses rows.
        self.record_placement().await?;
        join_all(open.into_iter().map(|t| t.commit(&self.servers)))
            .await
            .into_iter()
            .collect::<Result<Vec<()>>>()?;
        self.checked = sources;
        self.checked.extend(others);
        if deferred {
            self.cutover_mark("moved rows hidden from the proxies on their old shards");
            return Ok(true);
        }
        self.cutover_mark("moved rows deleted from their old shards");
        self.delete_all(steps).await?;
        Ok(false)
    }

    /// During an online cutover, says what was done how long after the
    /// pause (what the clients wait for).
    fn cutover_mark(&self, what: &str) {
        if let Some(t) = self.paused {
            self.log(&format!(
                "cutover: {what} at {} ms",
                t.elapsed().as_millis()
            ));
        }
    }

    /// Before a stream's subscription copies its tables: a reference table
    /// the added shard already holds (the planner found it equal to the
    /// default shard's, as a shard removed earlier leaves it) is emptied
    /// there, or the copy would fail on its first row for good. No proxy
    /// reads an added shard yet, and the stream copies the rows back.
    async fn empty_reference_copies(&self, stream: &Stream, steps: &[Step]) -> Result<()> {
        for s in steps.iter().filter(|s| {
            s.reference
                && s.state == State::Pending
                && s.source == stream.source
                && s.target == stream.target
        }) {
            let c = self.servers.get(s.target).await?;
            let n = c
                .execute(&format!("DELETE FROM {}", quote_table(&s.table)), &[])
                .await
                .on(
                    &self.servers,
                    s.target,
                    &format!("emptying reference table {} before its copy", s.table),
                )?;
            if n > 0 {
                self.log(&format!(
                    "reference table {} on {}: its {n} rows (equal to the default shard's) are copied again by the stream, which keeps them current",
                    s.table, self.r.names[s.target]
                ));
            }
        }
        Ok(())
    }

    /// Records the steps a stream copies as `copied` (rows not counted), so
    /// that abort removes them and the cutover verifies them.
    async fn mark_streamed(&self, steps: &mut [Step]) -> Result<()> {
        let mut targets: Vec<usize> = steps
            .iter()
            .filter(|s| s.state == State::Pending)
            .map(|s| s.target)
            .collect();
        targets.sort_unstable();
        targets.dedup();
        for id in targets {
            let c = self.servers.get(id).await?;
            c.execute(
                "UPDATE shardline.rebalance_steps SET state = 'copied', updated = now() WHERE run = $1 AND state = 'pending'",
                &[&self.id],
            )
            .await
            .on(&self.servers, id, "recording progress")?;
        }
        for s in steps.iter_mut().filter(|s| s.state == State::Pending) {
            s.state = State::Copied;
        }
        Ok(())
    }

    /// Waits until every stream has copied its tables and lags at most
    /// `max_lag` bytes, saying where they are about once a second.
    /// A server that stops answering meanwhile (restarted, failed over)
    /// is waited for up to `UNREACHABLE_WAIT`: the replication resumes by
    /// itself when it is back.
    async fn catch_up(&self, streams: &[Stream]) -> Result<()> {
        let started = Instant::now();
        let mut said = Instant::now();
        let mut failing: Option<Instant> = None;
        let mut stuck_since: Option<Instant> = None;
        // Each stream's worker errors when first seen, and how many since.
        let mut errors_at: Vec<Option<i64>> = vec![None; streams.len()];
        loop {
            let (mut copying, mut lag) = (0, 0);
            let mut trouble = None;
            let mut stuck = Vec::new();
            let mut failing_streams = Vec::new();
            for (i, s) in streams.iter().enumerate() {
                match online::progress(&self.servers, s).await {
                    Ok(p) => {
                        copying += p.copying;
                        lag = lag.max(p.lag_bytes);
                        let since = p.errors - *errors_at[i].get_or_insert(p.errors);
                        if since >= STREAM_ERRORS {
                            failing_streams.push(format!(
                                "{} -> {} ({since} errors)",
                                self.r.names[s.source], self.r.names[s.target]
                            ));
                        }
                        stuck.extend(p.stuck.iter().map(|t| {
                            format!(
                                "{t} ({} -> {})",
                                self.r.names[s.source], self.r.names[s.target]
                            )
                        }));
                    }
                    Err(e) => trouble = Some(e),
                }
            }
            if stuck.is_empty() {
                stuck_since = None;
            } else if stuck_since.get_or_insert_with(Instant::now).elapsed() > STUCK_WAIT {
                bail!(
                    "the initial copy of {} can never finish: its table-sync slot is gone from the source while the new shard still needs it (Postgres 15 can leave a copy so when the new shard restarts as the copy ends; its log repeats \"replication slot ... does not exist\"). Nothing was cut over and nothing deleted: run `shardline-rebalance abort` with the same configs (it removes the streams and the copies), then apply --online again.",
                    stuck.join(", ")
                );
            }
            if !failing_streams.is_empty() {
                bail!(
                    "the replication of {} fails again and again: each error stops the new shard's copy or apply worker, which starts over and fails the same way. The new shard's log says why (often a row already there, or a constraint or type the source's table does not have). Nothing was cut over and nothing deleted: fix the cause and run the same command again, or undo the move with `shardline-rebalance abort` and the same configs.",
                    failing_streams.join(", ")
                );
            }
            if let Some(e) = trouble {
                let since = *failing.get_or_insert_with(Instant::now);
                if since.elapsed() > UNREACHABLE_WAIT {
                    return Err(e.context(format!(
                        "the replication's progress could not be read for {} s; nothing was cut over: run the same command again once the servers answer (it goes on with the same streams), or abort",
                        UNREACHABLE_WAIT.as_secs()
                    )));
                }
                if said.elapsed() >= Duration::from_secs(1) {
                    said = Instant::now();
                    self.log(&format!("waiting for the servers: {e:#}"));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            failing = None;
            if copying == 0 && lag.max(0) as u64 <= self.opts.max_lag {
                self.log(&format!(
                    "replication caught up in {:.1} s (lag {} bytes)",
                    started.elapsed().as_secs_f64(),
                    lag
                ));
                return Ok(());
            }
            if said.elapsed() >= Duration::from_secs(1) {
                said = Instant::now();
                self.log(&format!(
                    "replicating: {copying} tables still copying, lag {lag} bytes (cutover at {} or less)",
                    self.opts.max_lag
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Compares every range while traffic flows, each stream's ranges at
    /// one position of its source: with writes to the stream's tables on
    /// the source held (a SHARE lock: reads go on), the source's snapshot
    /// is exported and the target's taken once it applied everything up to
    /// the source's current position; the lock is released and both sides
    /// are summed at those snapshots, so a range written meanwhile compares
    /// equal all the same. A range that differs stops the run before any
    /// pause. A stream whose position could not be held (a writer held its
    /// tables past `COMPARE_LOCK_WAIT` every time, or a server stopped
    /// answering) is left to the cutover's verification. The caller has
    /// waited for every shard to answer (`reachable`).
    async fn compare_online(&self, streams: &[Stream], steps: &[Step]) -> Result<()> {
        let started = Instant::now();
        let (mut equal, mut failed, mut differ, mut held) = (0, 0, Vec::new(), Vec::new());
        for stream in streams {
            let mine: Vec<&Step> = steps
                .iter()
                .filter(|s| {
                    s.state == State::Copied
                        && s.source == stream.source
                        && s.target == stream.target
                })
                .collect();
            if mine.is_empty() {
                continue;
            }
            match self.compare_stream(stream, &mine).await {
                Ok((sums, writes_held)) => {
                    held.push(format!(
                        "{} {} ms",
                        self.r.names[stream.source],
                        writes_held.as_millis()
                    ));
                    for (s, (a, b)) in mine.iter().zip(sums) {
                        if a == b {
                            equal += 1;
                        } else {
                            differ.push(self.differs(s, &a, &b));
                        }
                    }
                }
                Err(e) => {
                    self.log(&format!(
                        "comparing {} -> {}: {e:#}; its {} ranges are verified in the cutover",
                        self.r.names[stream.source],
                        self.r.names[stream.target],
                        mine.len()
                    ));
                    failed += mine.len();
                }
            }
        }
        if !differ.is_empty() {
            bail!(
                "verification failed before the cutover: these ranges differ between source and target at the same position of the source:\n  {}\nNothing was cut over or deleted, and the proxies were not paused. Find what wrote to the target directly, undo the copies with `shardline-rebalance abort` and the same configs, then apply --online again.",
                differ.join("\n  ")
            );
        }
        self.log(&format!(
            "compared online in {:.1} s: {equal} ranges equal at one position of their source (writes to its moving tables held {}){}",
            started.elapsed().as_secs_f64(),
            if held.is_empty() {
                "on no shard".to_string()
            } else {
                held.join(", ")
            },
            if failed > 0 {
                format!(", {failed} not compared (verified in the cutover)")
            } else {
                String::new()
            }
        ));
        Ok(())
    }

    /// The sums of `steps` (one stream's) on its source and target at one
    /// position of the source, and how long writes to their tables were
    /// held on the source for it.
    async fn compare_stream(
        &self,
        stream: &Stream,
        steps: &[&Step],
    ) -> Result<(Vec<((i64, String), (i64, String))>, Duration)> {
        let (source, target) = (stream.source, stream.target);
        let servers = &self.servers;
        let mut tables: Vec<String> = steps.iter().map(|s| quote_table(&s.table)).collect();
        tables.sort_unstable();
        tables.dedup();
        let lock_sql = format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SET LOCAL lock_timeout = '{}ms'; SET LOCAL deadlock_timeout = '20ms'; LOCK TABLE {} IN SHARE MODE",
            COMPARE_LOCK_WAIT.as_millis(),
            tables.join(", ")
        );
        let what = "holding writes for a comparison";
        let mut tries = 0;
        let (lock, locked) = loop {
            let c = servers.get(source).await?;
            let locked = Instant::now();
            match c.batch_execute(&lock_sql).await {
                Ok(()) => {
                    break (
                        OpenTxn {
                            c: Some(c),
                            id: source,
                        },
                        locked,
                    )
                }
                Err(e)
                    if tries < COMPARE_LOCK_TRIES
                        && matches!(
                            e.code(),
                            Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
                                | Some(&tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED)
                        ) =>
                {
                    // Not back to the pool inside a failed transaction.
                    drop(OpenTxn {
                        c: Some(c),
                        id: source,
                    });
                    tries += 1;
                    tokio::time::sleep(COMPARE_LOCK_WAIT).await;
                }
                Err(e) => return Err(e).on(servers, source, what),
            }
        };
        // The source's snapshot: after the lock, so every write to these
        // tables it misses is one that cannot happen until the lock goes.
        let snapshot: String = lock
            .client()
            .query_one("SELECT pg_export_snapshot()", &[])
            .await
            .on(servers, source, what)?
            .get(0);
        let lsn = online::current_lsn(servers, source).await?;
        online::wait_applied(servers, stream, &lsn, COMPARE_APPLY_WAIT).await?;
        let read_only = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET LOCAL max_parallel_workers_per_gather = 0";
        let there = OpenTxn::open(
            servers.get(target).await?,
            servers,
            target,
            &format!("{read_only}; SELECT 1"),
            what,
        )
        .await?;
        let here = OpenTxn::open(
            servers.get(source).await?,
            servers,
            source,
            &format!(
                "{read_only}; SET TRANSACTION SNAPSHOT '{}'",
                snapshot.replace('\'', "''")
            ),
            what,
        )
        .await?;
        lock.end(servers, "COMMIT", what).await?;
        let writes_held = locked.elapsed();
        let (a, b) = tokio::join!(
            self.sums_in(here.client(), source, steps),
            self.sums_in(there.client(), target, steps)
        );
        let (a, b) = (a?, b?);
        here.end(servers, "ROLLBACK", what).await?;
        there.end(servers, "ROLLBACK", what).await?;
        Ok((a.into_iter().zip(b).collect(), writes_held))
    }

    /// Before the proxies run the new config: waits until every replica the
    /// new config lists for a shard rows moved from or to has replayed its
    /// primary's WAL up to now (the hiding or deletes on an old shard, the
    /// last changes applied on a new one), so that a read a proxy sends to a
    /// replica once resumed neither sees a moved row on its old shard nor
    /// misses it on the new one. A replica that does not answer, or has not
    /// replayed that far within `REPLICA_WAIT` (far past the proxies'
    /// default `max_replica_lag`, beyond which they send it no reads), is
    /// named in a warning and not waited for.
    async fn replicas_replayed(&self, steps: &[Step]) {
        let mut ids: Vec<usize> = steps.iter().flat_map(|s| [s.source, s.target]).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut waits = Vec::new();
        for id in ids {
            let Some(k) = self
                .r
                .new
                .shards
                .iter()
                .position(|n| *n == self.r.names[id])
            else {
                continue;
            };
            let replicas = &self.r.new.replicas[k];
            if replicas.is_empty() {
                continue;
            }
            let lsn = async {
                let c = self.servers.get(id).await?;
                let row = c
                    .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
                    .await
                    .on(&self.servers, id, "reading the WAL position")?;
                Ok::<String, anyhow::Error>(row.get(0))
            };
            let lsn = match lsn.await {
                Ok(lsn) => lsn,
                Err(e) => {
                    self.log(&format!("warning: {e:#}; its replicas are not waited for"));
                    continue;
                }
            };
            for node in replicas {
                let lsn = lsn.clone();
                waits.push(async move {
                    (
                        id,
                        node,
                        db::replayed(node, &self.login, &lsn, REPLICA_WAIT).await,
                    )
                });
            }
        }
        let count = waits.len();
        let mut behind = 0;
        for (id, node, result) in join_all(waits).await {
            if let Err(why) = result {
                behind += 1;
                self.log(&format!(
                    "warning: replica {} of shard {}: {why}; until it replays the cutover, a read a proxy sends it may see moved rows on their old shard or miss them on the new one",
                    node.address(),
                    self.r.names[id]
                ));
            }
        }
        if count > 0 {
            let said = format!(
                "{} of {count} replicas replayed the cutover",
                count - behind
            );
            if self.paused.is_some() {
                self.cutover_mark(&said);
            } else {
                self.log(&said);
            }
        }
    }

    /// `(rows, checksum)` of each of `steps` on shard `id`, on connection
    /// `c` (in the transaction it has open).
    async fn sums_in(
        &self,
        c: &deadpool_postgres::Object,
        id: usize,
        steps: &[&Step],
    ) -> Result<Vec<(i64, String)>> {
        let mut sums = Vec::new();
        for s in steps {
            sums.push(
                db::checksum(c, &s.table, &self.columns[&s.table], &self.filter(s))
                    .await
                    .on(&self.servers, id, "comparing online")?,
            );
        }
        Ok(sums)
    }

    /// Waits until every shard answers, up to `UNREACHABLE_WAIT` (a
    /// restarted or failed-over server), saying so about once a second.
    async fn reachable(&self) -> Result<()> {
        let started = Instant::now();
        let mut said: Option<Instant> = None;
        loop {
            let mut down = None;
            for id in 0..self.r.names.len() {
                let answered = async {
                    let c = self.servers.get(id).await?;
                    c.simple_query("SELECT 1").await.on(
                        &self.servers,
                        id,
                        "checking that it answers",
                    )?;
                    Ok::<_, anyhow::Error>(())
                };
                if let Err(e) = answered.await {
                    down = Some(e);
                    break;
                }
            }
            let Some(e) = down else {
                return Ok(());
            };
            if started.elapsed() > UNREACHABLE_WAIT {
                return Err(e.context(format!(
                    "a server did not answer for {} s; nothing was cut over: run the same command again once the servers answer (it goes on with the same streams), or abort",
                    UNREACHABLE_WAIT.as_secs()
                )));
            }
            if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                said = Some(Instant::now());
                self.log(&format!("waiting for the servers: {e:#}"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Run<'_> {
    /// Sets the sequences of serial and identity columns of the tables rows
    /// moved to past the highest value there: the new shard's sequence
    /// started at 1, and a row inserted there with the column's default
    /// would collide with a moved one. A sequence already past it is left.
    async fn advance_sequences(&self, steps: &[Step]) -> Result<()> {
        let mut moved: Vec<(usize, &str)> = steps
            .iter()
            .filter(|s| !s.reference)
            .map(|s| (s.target, s.table.as_str()))
            .collect();
        moved.sort_unstable();
        moved.dedup();
        for (id, table) in moved {
            let what = format!("advancing the sequences of {table}");
            let c = self.servers.get(id).await?;
            let serials = c
                .query(
                    "SELECT quote_ident(a.attname), pg_get_serial_sequence($1, a.attname)
                       FROM pg_attribute a
                      WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
                        AND pg_get_serial_sequence($1, a.attname) IS NOT NULL",
                    &[&quote_table(table)],
                )
                .await
                .on(&self.servers, id, &what)?;
            for row in serials {
                let (column, sequence): (String, String) = (row.get(0), row.get(1));
                c.execute(
                    &format!(
                        "SELECT setval($1::text::regclass, m) FROM (SELECT max({column})::int8 AS m FROM {}) x
                          WHERE m > coalesce(pg_sequence_last_value($1::text::regclass), 0)",
                        quote_table(table)
                    ),
                    &[&sequence],
                )
                .await
                .on(&self.servers, id, &what)?;
            }
        }
        Ok(())
    }
}

/// The end of an online move whose moved rows were hidden (`settle_online`).
impl Run<'_> {
    /// RELOADs every proxy with the new config and RESUMEs them; returns
    /// how long they held their clients.
    async fn switch(&mut self, proxies: &mut Proxies) -> Result<f64> {
        proxies.reload(&self.opts.placement).await.map_err(|e| {
            e.context(format!(
                "every row is moved and verified and the new config is in {}; the proxies stay paused. Make each proxy read that file, then run RELOAD and RESUME in each console, then run the same apply --online again to delete the moved rows from their old shards",
                self.opts.config_out.display()
            ))
        })?;
        let held = proxies.resume().await?;
        self.cutover_mark("proxies reloaded and resumed");
        self.paused = None;
        self.log(&format!(
            "{} proxies run the new placement and were resumed after {held:.2} s; deleting the moved rows they no longer see",
            proxies.len()
        ));
        Ok(held)
    }

    /// Deletes the hidden rows (verified, with receipts, as offline), then
    /// removes the hiding and the run's records, and checks that no row is
    /// left where the new config would miss it.
    async fn delete_deferred(&mut self, steps: &mut [Step]) -> Result<()> {
        self.delete_all(steps).await?;
        self.finish().await?;
        self.checked.clear();
        let left = self.left_behind().await?;
        if !left.is_empty() {
            bail!(
                "{}: rows written straight to the shard (not through a proxy) after the cutover, which the new placement does not find. Move them to the shards the new config gives them (INSERT through a proxy, then DELETE them from the shard named)",
                left.join("; ")
            );
        }
        Ok(())
    }

    /// Every row of the run is moved: the hiding and the run's records go.
    async fn finish(&mut self) -> Result<()> {
        self.unhide_all().await?;
        self.set_state(RunState::Finishing).await?;
        self.stop_point("finish");
        self.forget().await?;
        self.cutover_mark("run records removed");
        Ok(())
    }

    /// Removes the hiding of moved rows from every table of every shard
    /// once they are deleted. Turning row security off needs a moment
    /// alone with the table, which clients' transactions may hold: it waits
    /// at most `UNHIDE_LOCK_WAIT` each time (clients queue behind it only
    /// that long) and tries again until `UNHIDE_WAIT` has passed.
    async fn unhide_all(&self) -> Result<()> {
        for id in 0..self.r.names.len() {
            let what = "removing the hiding of moved rows";
            let c = self.servers.get(id).await?;
            let hidden: Vec<String> = c
                .query(hide::HIDDEN_SQL, &[])
                .await
                .on(&self.servers, id, what)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            for table in hidden {
                let sql = format!(
                    "SELECT set_config('lock_timeout', '{}ms', true), set_config('deadlock_timeout', '20ms', true); {}",
                    UNHIDE_LOCK_WAIT.as_millis(),
                    hide::unhide_sql(&table)
                );
                let started = Instant::now();
                loop {
                    match c.batch_execute(&sql).await {
                        Ok(()) => break,
                        Err(e)
                            if e.code()
                                == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
                                && started.elapsed() < UNHIDE_WAIT =>
                        {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => {
                            return Err(e).on(&self.servers, id, &format!("{what} of {table}"))
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// How long removing the hiding waits for a table at a time, and in all.
const UNHIDE_LOCK_WAIT: Duration = Duration::from_millis(100);
const UNHIDE_WAIT: Duration = Duration::from_secs(300);

/// How long a table's copy may lack its table-sync slot before the move
/// stops (it is never that long while the copy is well).
const STUCK_WAIT: Duration = Duration::from_secs(10);

/// How many errors a stream's workers may raise during one catch-up before
/// the run stops (a worker retries about every 5 s,
/// `wal_retrieve_retry_interval`; a restarted server costs one or two).
const STREAM_ERRORS: i64 = 5;

/// How long the copy waits for a server that stopped answering.
const UNREACHABLE_WAIT: Duration = Duration::from_secs(60);

/// How long a stream may take to apply what is left, or to stop, once the
/// proxies are paused.
const CUTOVER_WAIT: Duration = Duration::from_secs(30);

/// How long the online comparison waits for the lock that holds writes to
/// a stream's tables on its source (writers queue behind it meanwhile), how
/// often it tries, and how long it then holds them at most while the target
/// applies what is left.
const COMPARE_LOCK_WAIT: Duration = Duration::from_millis(200);
const COMPARE_LOCK_TRIES: u32 = 25;
const COMPARE_APPLY_WAIT: Duration = Duration::from_secs(5);

/// How long the cutover waits for a replica to replay it.
const REPLICA_WAIT: Duration = Duration::from_secs(10);

/// How long the cutover waits for a lock on a moving table held by a
/// session other than a paused proxy's.
const CUTOVER_LOCK_WAIT: Duration = Duration::from_secs(5);

/// A source transaction the online cutover holds open until every range is
/// verified. Dropped without `commit`, its connection is closed rather than
/// returned to the pool, so the server rolls it back.
struct OpenTxn {
    c: Option<deadpool_postgres::Object>,
    id: usize,
}

impl OpenTxn {
    async fn begin(c: deadpool_postgres::Object, servers: &Servers, id: usize) -> Result<Self> {
        Self::open(
            c,
            servers,
            id,
            "BEGIN; SET LOCAL max_parallel_workers_per_gather = 0",
            "deleting moved rows",
        )
        .await
    }

    /// Runs `begin` (which opens a transaction) on `c`.
    async fn open(
        c: deadpool_postgres::Object,
        servers: &Servers,
        id: usize,
        begin: &str,
        what: &str,
    ) -> Result<Self> {
        let t = OpenTxn { c: Some(c), id };
        t.client()
            .batch_execute(begin)
            .await
            .on(servers, id, what)?;
        Ok(t)
    }

    fn client(&self) -> &deadpool_postgres::Object {
        self.c.as_ref().expect("open until committed or dropped")
    }

    async fn commit(self, servers: &Servers) -> Result<()> {
        self.end(servers, "COMMIT", "committing the deletes of moved rows")
            .await
    }

    /// Ends the transaction with `sql` (COMMIT or ROLLBACK); the connection
    /// goes back to the pool.
    async fn end(mut self, servers: &Servers, sql: &str, what: &str) -> Result<()> {
        self.client()
            .batch_execute(sql)
            .await
            .on(servers, self.id, what)?;
        drop(self.c.take());
        Ok(())
    }
}

impl Drop for OpenTxn {
    fn drop(&mut self) {
        if let Some(c) = self.c.take() {
            drop(deadpool_postgres::Object::take(c));
        }
    }
}
