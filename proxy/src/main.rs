//! The `shardline` command: run the proxy, check a configuration, or start the demo.

use anyhow::Result;
use clap::{Parser, Subcommand};
use shardline::{demo, Proxy};
use shardline_config::Config;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "shardline",
    version,
    about = "PostgreSQL sharding and read/write-splitting proxy"
)]
struct Cli {
    /// Configuration file [default: shardline.toml].
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Listen here instead of the config's proxy.listen (several proxies
    /// on one host reading one config file; a reload keeps it).
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<std::net::SocketAddr>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Validate the configuration and connect to every node.
    Check {
        /// Configuration file [default: shardline.toml].
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Zero-setup start: two local shards (each a Postgres primary with two
    /// streaming replicas) loaded with demo data, and the proxy in front of
    /// them. Ctrl-C removes everything.
    Demo {
        /// Port the proxy listens on.
        #[arg(long, default_value_t = 6432)]
        port: u16,
        /// Port of the metrics endpoints (/metrics, /health, /ready); 0
        /// picks a free one.
        #[arg(long, default_value_t = 0)]
        metrics_port: u16,
        /// Print the demo's schema and data as a psql script (to load
        /// through a proxy of your own) and exit; starts nothing.
        #[arg(long)]
        print_sql: bool,
    },
}

/// The configuration file named on the command line, or `shardline.toml`.
fn config_path(given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(|| PathBuf::from("shardline.toml"))
}

/// Loads the configuration; a missing default file says how to start.
fn load_config(path: &std::path::Path, named: bool) -> Result<Config> {
    if !named && !path.exists() {
        anyhow::bail!(
            "no configuration file: {} not found in this directory.\n  Run `shardline --config FILE` with your configuration (see config/examples/shardline.toml),\n  or `shardline demo` to start a local two-shard cluster with the proxy in front.",
            path.display()
        );
    }
    Ok(Config::load(path)?)
}

/// Serves until SIGINT/SIGTERM or the console's SHUTDOWN; SIGHUP rereads
/// the config file (as the console's RELOAD does).
async fn run_until_stopped(proxy: &Proxy) {
    let Ok(mut signals) = demo::Signals::new() else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    loop {
        tokio::select! {
            signal = signals.next() => match signal {
                demo::Signal::Stop => break,
                demo::Signal::Reload => {
                    tracing::info!("SIGHUP: rereading the configuration");
                    proxy.reload().await;
                }
            },
            () = proxy.shutdown_requested() => return,
        }
    }
    tracing::info!("signal received: no new clients; waiting for open transactions");
}

fn main() -> ExitCode {
    // Read (or refused) before anything else, so that even `--version`
    // says whether this build has the crash tests' stop points.
    shardline::twophase::crash_hook();
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Some(Cmd::Check { .. })
            | Some(Cmd::Demo {
                print_sql: true,
                ..
            })
    ) {
        // `shardline check | head`, `shardline demo --print-sql | head`: a
        // closed pipe ends the command quietly, as for any command-line tool
        // (sockets are unaffected: they send with MSG_NOSIGNAL).
        // SAFETY: called before any thread starts; restores the default action.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    // Buffers grown for one large message go back to the system when they
    // shrink: glibc raises its mmap threshold after each large free (up to
    // 32 MB), after which large buffers come from the heap, where freed
    // memory may stay resident. A fixed threshold keeps every allocation
    // of 256 KiB or more in a mapping of its own, unmapped when freed.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: called before any thread starts; it only sets a parameter.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
    raise_open_files_limit();
    // The proxy's config decides the thread count; other commands use the default.
    let workers = match (&cli.command, &cli.config) {
        (None, path) => Config::load(&config_path(path.clone())).map_or_else(
            |_| shardline_config::ProxyConfig::default().worker_threads(),
            |c| c.proxy.worker_threads(),
        ),
        _ => shardline_config::ProxyConfig::default().worker_threads(),
    };
    let runtime = match build_runtime(workers) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("shardline: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shardline: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft limit on open files to the hard one, as Go programs and
/// most servers do: every client holds a socket, every server connection
/// one, and every timer waiting (a login's deadline, a wait in line for a
/// pool slot) a timerfd, where the soft limit is often 1,024. Not an error
/// if it cannot (the limit stays as it was).
fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0
        || lim.rlim_cur >= lim.rlim_max
    {
        return;
    }
    // An unlimited hard limit is capped by the kernel's nr_open (1,048,576
    // by default), above which setrlimit fails: try that next.
    for soft in [lim.rlim_max, 1 << 20] {
        let raised = libc::rlimit {
            rlim_cur: soft.max(lim.rlim_cur),
            rlim_max: lim.rlim_max,
        };
        // SAFETY: plain system call with a valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return;
        }
    }
}

/// One worker: a current-thread runtime (no work stealing, no cross-thread
/// wakeups). More: the multi-threaded runtime. Either has no time driver,
/// which would cost every park a look at the timer wheel: the proxy's
/// timers are timerfds on the I/O driver (`shardline::timer`).
fn build_runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_io()
            .build()
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Some(Cmd::Demo {
            print_sql: true, ..
        }) => {
            print!("{}", demo::demo_sql());
            Ok(ExitCode::SUCCESS)
        }
        Some(Cmd::Demo {
            port, metrics_port, ..
        }) => {
            if cli.config.is_some() {
                anyhow::bail!("`demo` starts its own servers and writes its own configuration: --config does not apply (use `shardline --config FILE` to run with yours)");
            }
            shardline::init_logging(Default::default());
            demo::run(port, metrics_port).await?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Cmd::Check { config }) => {
            let named = config.is_some() || cli.config.is_some();
            let path = config_path(config.or(cli.config));
            let config = load_config(&path, named)?;
            let ok = shardline::check::run(&config, &path).await?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        None => {
            let named = cli.config.is_some();
            let path = config_path(cli.config);
            let mut config = load_config(&path, named)?;
            shardline::init_logging(config.proxy.log_format);
            if let Some(listen) = cli.listen {
                config.proxy.listen = listen;
            }
            let proxy = Proxy::start_from(config, Some(path), cli.listen.is_some()).await?;
            run_until_stopped(&proxy).await;
            proxy.shutdown();
            proxy.wait().await;
            tracing::info!("stopped");
            Ok(ExitCode::SUCCESS)
        }
    }
}
