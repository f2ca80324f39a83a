//! `shardline-rebalance`: plan, apply and verify moving rows between shards
//! when shards are added or removed (or the placement changes).

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};
use shardline_config::Config;
use shardline_rebalance::apply::{self, ApplyOptions};
use shardline_rebalance::copy::Format;
use shardline_rebalance::db::Login;
use shardline_rebalance::layout::{Placement, Rebalance};
use shardline_rebalance::plan::{self, count};
use shardline_rebalance::proxies::Proxies;
use shardline_rebalance::verify;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "shardline-rebalance",
    version,
    about = "Move rows between Shardline shards when shards are added or removed",
    after_help = "Exit status: 0 success; 1 error (apply, plan) or misplaced rows found (verify); 2 usage error or verify could not check."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show which hash ranges and how many rows (per table and shard pair)
    /// would move from OLD to NEW. Changes nothing.
    Plan {
        #[arg(long, value_name = "OLD.toml")]
        from: PathBuf,
        #[arg(long, value_name = "NEW.toml")]
        to: PathBuf,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        login: LoginArgs,
    },
    /// Copy the moving rows to their new shards, verify them, delete them
    /// from their old shards, then install NEW as the config. Resumable:
    /// run it again after any interruption.
    Apply {
        #[arg(long, value_name = "OLD.toml")]
        from: PathBuf,
        #[arg(long, value_name = "NEW.toml")]
        to: PathBuf,
        /// Confirms that nothing writes to these shards while rows move.
        #[arg(long)]
        writes_stopped: bool,
        /// A proxy's admin console (postgres://USER:PASSWORD@HOST:PORT/shardline),
        /// once per proxy: each is PAUSEd for the move (its clients wait),
        /// RELOADed with the new config and checked, then RESUMEd. Implies
        /// --writes-stopped.
        #[arg(long, value_name = "URL")]
        admin: Vec<String>,
        /// Move while clients read and write: the moving rows are copied
        /// and kept current by logical replication, and the proxies (every
        /// one, with --admin) are paused only for the cutover. Needs
        /// wal_level = logical on the sources and a superuser login.
        #[arg(long, requires = "admin")]
        online: bool,
        /// With --online: the replication lag (bytes of WAL) at or under
        /// which the cutover starts.
        #[arg(long, default_value_t = 256 << 10, value_name = "BYTES")]
        max_lag: u64,
        /// Create tables missing on new shards from the default shard's definition.
        #[arg(long)]
        create_tables: bool,
        /// When a copied range no longer matches its source (a write got
        /// through after it was copied), copy the differing rows again from
        /// the source, verify the range and go on, instead of stopping.
        #[arg(long)]
        recopy_changed: bool,
        /// Rows per resumable step (a chunk of the hash space), roughly.
        #[arg(long, default_value_t = 250_000)]
        chunk_rows: u64,
        /// COPY format between servers.
        #[arg(long, value_enum, default_value_t = Format::Binary)]
        format: Format,
        /// Where NEW is installed when every moved row is verified
        /// (default: the --from file; the previous file is kept as
        /// FILE.before-rebalance).
        #[arg(long, value_name = "FILE")]
        config_out: Option<PathBuf>,
        #[command(flatten)]
        login: LoginArgs,
    },
    /// Undo an unfinished apply before any row was deleted from its old
    /// shard: rows it copied to new shards are removed, the old placement
    /// stays as it was. (Once deletes have started, only apply can finish.)
    Abort {
        #[arg(long, value_name = "OLD.toml")]
        from: PathBuf,
        #[arg(long, value_name = "NEW.toml")]
        to: PathBuf,
        #[command(flatten)]
        login: LoginArgs,
    },
    /// Check that every row is on the shard CONFIG places it on, and that
    /// reference tables are identical on every shard.
    Verify {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        login: LoginArgs,
    },
}

/// How to log in to the primaries (default: the config's `[health]` login,
/// else its first user's server role and database).
#[derive(Args)]
struct LoginArgs {
    /// Role on the servers.
    #[arg(long)]
    user: Option<String>,
    /// Password (or set PGPASSWORD).
    #[arg(long)]
    password: Option<String>,
    /// Database on the servers.
    #[arg(long)]
    database: Option<String>,
}

impl LoginArgs {
    fn resolve(self, config: &Config) -> Result<Login> {
        let password = self.password.or_else(|| std::env::var("PGPASSWORD").ok());
        Login::resolve(config, self.user, password, self.database)
    }
}

fn load(path: &Path) -> Result<(Config, String)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let config = Config::from_toml(&text, &path.display().to_string())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((config, text))
}

fn compare(from: &Path, to: &Path) -> Result<(Rebalance, Config, String)> {
    let (old, _) = load(from)?;
    let (new, text) = load(to)?;
    let r = Rebalance::new(&old, &new).map_err(|problems| {
        anyhow::anyhow!(
            "{} and {} cannot be reconciled by moving rows:\n  {}",
            from.display(),
            to.display(),
            problems.join("\n  ")
        )
    })?;
    Ok((r, old, text))
}

/// An online move installs the new config in FROM (keeping the old one
/// as FROM.before-rebalance) before it deletes the rows it hid: when it is
/// interrupted then, the same command finds FROM already new. Returns the
/// move from the kept config when the servers record it unfinished.
async fn interrupted(
    from: &Path,
    to: &Path,
    old: &Config,
    placement: &str,
    login: &Login,
) -> Option<Rebalance> {
    let mut before = from.as_os_str().to_owned();
    before.push(".before-rebalance");
    let before = PathBuf::from(before);
    if old.placement_fingerprint() != placement || !before.exists() {
        return None;
    }
    // A kept file of an earlier, finished move (whose removed shards may be
    // gone) is no reason to fail: the move FROM -> TO then runs as asked.
    let Ok((r, _, _)) = compare(&before, to) else {
        return None;
    };
    if !apply::unfinished(&r, login).await.unwrap_or(false) {
        return None;
    }
    println!(
        "{} is already the new config: going on with the move from {} recorded on the servers",
        from.display(),
        before.display()
    );
    Some(r)
}

fn main() -> ExitCode {
    // Read (or refused) before anything else, so that even `--version`
    // says whether this build has the crash tests' stop points.
    crash_hook();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("shardline-rebalance: {e}");
            return ExitCode::from(1);
        }
    };
    let verifying = matches!(cli.command, Command::Verify { .. });
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shardline-rebalance: {e:#}");
            ExitCode::from(if verifying { 2 } else { 1 })
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Plan {
            from,
            to,
            json,
            login,
        } => {
            let (r, old, _) = compare(&from, &to)?;
            let report = plan::plan(&r, &login.resolve(&old)?).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Apply {
            from,
            to,
            writes_stopped,
            create_tables,
            recopy_changed,
            chunk_rows,
            format,
            config_out,
            login,
            admin,
            online,
            max_lag,
        } => {
            let (r, old, new_text) = compare(&from, &to)?;
            let mut r = r;
            let placement = Config::from_toml(&new_text, &to.display().to_string())
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .placement_fingerprint();
            let config_out = config_out.unwrap_or_else(|| from.clone());
            let login = login.resolve(&old)?;
            if let Some(earlier) = interrupted(&from, &to, &old, &placement, &login).await {
                r = earlier;
            }
            let mut proxies = Proxies::connect(&admin).await?;
            if !proxies.is_empty() && !online {
                proxies.pause().await?;
                println!(
                    "paused {} proxies: their clients wait while rows move",
                    proxies.len()
                );
            }
            let opts = ApplyOptions {
                writes_stopped: writes_stopped || !proxies.is_empty(),
                create_tables,
                recopy_changed,
                chunk_rows,
                format,
                config_out,
                new_text,
                placement: placement.clone(),
                stop_at: crash_hook(),
                max_lag,
                proxies_paused: !online && proxies.paused(),
                online,
            };
            let moved = if online {
                apply::apply_online(&r, &login, &opts, &mut proxies).await
            } else {
                apply::apply(&r, &login, &opts).await
            };
            let s = match moved {
                Ok(s) => s,
                Err(e) if !proxies.paused() => return Err(e),
                Err(e) => {
                    const STAY_PAUSED: &str = "so the proxies stay paused (the old placement would miss them). Run the same apply again (with its --admin options) to finish: it reloads and resumes them";
                    return Err(match apply::deletes_started(&r, &login, &placement).await {
                        Ok(false) => match proxies.resume().await {
                            Ok(_) => e.context("nothing was deleted: the proxies are resumed on the old config"),
                            Err(r) => e.context(format!("nothing was deleted, but resuming failed ({r:#}): run RESUME in each proxy's console")),
                        },
                        Ok(true) => e.context(format!("rows may already be deleted from their old shards, {STAY_PAUSED}")),
                        Err(d) => e.context(format!("whether rows were deleted from their old shards could not be read ({d:#}), {STAY_PAUSED}")),
                    });
                }
            };
            let rows = s.rows() as i64;
            if s.nothing_to_move {
                println!("Nothing to move: every row is already where the new config places it.");
            } else if s.already_complete && s.rows() == 0 {
                println!(
                    "This rebalance had already moved every row: its records are removed now."
                );
            } else if online && s.held.is_some() {
                println!(
                    "Moved {} rows in {:.1} s: copy and catch-up {:.1} s, then with the proxies paused verify and hide the moved rows {:.1} s; deleted from their old shards after the proxies resumed in {:.1} s.",
                    count(rows),
                    s.total_seconds,
                    s.copy_seconds,
                    s.verify_seconds,
                    s.delete_seconds
                );
            } else if online {
                println!(
                    "Moved {} rows in {:.1} s: copy and catch-up {:.1} s, then with the proxies paused verify and delete {:.1} s.",
                    count(rows),
                    s.total_seconds,
                    s.copy_seconds,
                    s.verify_seconds + s.delete_seconds
                );
            } else {
                println!(
                    "Moved {} rows in {:.1} s ({} rows/s): copy {:.1} s, verify {:.1} s, delete {:.1} s.",
                    count(rows),
                    s.total_seconds,
                    count((rows as f64 / s.total_seconds.max(1e-3)) as i64),
                    s.copy_seconds,
                    s.verify_seconds,
                    s.delete_seconds
                );
            }
            if !s.moved.is_empty() {
                let table: Vec<Vec<String>> = s
                    .moved
                    .iter()
                    .map(|((t, from, to), n)| {
                        vec![t.clone(), from.clone(), to.clone(), count(*n as i64)]
                    })
                    .collect();
                print!("{}", plan::table(&["table", "from", "to", " rows"], &table));
            }
            if proxies.is_empty() {
                if let Some(path) = &s.config_written {
                    println!(
                        "The new config is in {}. Reload every proxy with it (RELOAD in its admin console, or SIGHUP), then let traffic back (RESUME).",
                        path.display()
                    );
                }
                return Ok(ExitCode::SUCCESS);
            }
            if let Some(held) = s.held {
                println!(
                    "{} proxies reloaded with the new placement ({placement}) and resumed; their clients were held for {held:.2} s.",
                    proxies.len()
                );
                return Ok(ExitCode::SUCCESS);
            }
            if s.config_written.is_none() {
                let held = proxies.resume().await?;
                println!("No config was written: the proxies are resumed as they were (held {held:.2} s).");
                return Ok(ExitCode::SUCCESS);
            }
            if let Err(e) = proxies.reload(&placement).await {
                return Err(e.context(format!(
                    "every row is moved and the new config is in {}; the proxies stay paused. Make each proxy read that file, then run RELOAD and RESUME in each console",
                    opts.config_out.display()
                )));
            }
            let held = proxies.resume().await?;
            println!(
                "{} proxies reloaded with the new placement ({placement}) and resumed; their clients were held for {held:.2} s.",
                proxies.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Abort { from, to, login } => {
            let (r, old, _) = compare(&from, &to)?;
            let (new, _) = load(&to)?;
            let fingerprints = (old.placement_fingerprint(), new.placement_fingerprint());
            let login = login.resolve(&old)?;
            let r = interrupted(&from, &to, &old, &fingerprints.1, &login)
                .await
                .unwrap_or(r);
            let removed =
                apply::abort(&r, &login, crash_hook(), (&fingerprints.0, &fingerprints.1)).await?;
            println!(
                "Aborted rebalance {}: removed {} copied rows from their new shards. Every row is where {} places it.",
                r.run,
                count(removed as i64),
                from.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify {
            config,
            json,
            login,
        } => {
            let (c, _) = load(&config)?;
            let report = verify::verify(&Placement::new(&c), &login.resolve(&c)?).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(if report.clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

/// The crash tests' stop point (`SHARDLINE_REBALANCE_STOP_AT`). Only builds
/// with the `crash-hooks` feature (the tests') read it; others say once that
/// they ignore it.
fn crash_hook() -> Option<String> {
    static POINT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    POINT
        .get_or_init(|| {
            let point = std::env::var("SHARDLINE_REBALANCE_STOP_AT").ok()?;
            if cfg!(feature = "crash-hooks") {
                Some(point)
            } else {
                eprintln!("shardline-rebalance: SHARDLINE_REBALANCE_STOP_AT is ignored: this build has no crash-test hooks (cargo feature crash-hooks)");
                None
            }
        })
        .clone()
}
