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
    /// Configuration file.
    #[arg(short, long, global = true, default_value = "shardline.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Validate the configuration and connect to every node.
    Check,
    /// Start a local Postgres shard (primary + replica) and the proxy in front of it.
    Demo {
        /// Port the proxy listens on.
        #[arg(long, default_value_t = 6432)]
        port: u16,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The proxy's config decides the thread count; other commands use the default.
    let workers = match (&cli.command, Config::load(&cli.config)) {
        (None, Ok(c)) => c.proxy.worker_threads(),
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

/// One worker: a current-thread runtime (no work stealing, no cross-thread
/// wakeups). More: the multi-threaded runtime.
fn build_runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Some(Cmd::Demo { port }) => {
            shardline::init_logging(Default::default());
            demo::run(port).await?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Cmd::Check) => {
            let config = Config::load(&cli.config)?;
            println!("{}: configuration is valid", cli.config.display());
            let ok = shardline::check::run(&config).await?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        None => {
            let config = Config::load(&cli.config)?;
            shardline::init_logging(config.proxy.log_format);
            let proxy = Proxy::start(config).await?;
            demo::wait_for_signal().await;
            tracing::info!("signal received: no new clients; waiting for open transactions");
            proxy.shutdown();
            proxy.wait().await;
            tracing::info!("stopped");
            Ok(ExitCode::SUCCESS)
        }
    }
}
