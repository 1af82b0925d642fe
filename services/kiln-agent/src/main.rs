//! `kiln-agent --config FILE`: the compute-node agent.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

// glibc's malloc showed up at ~5% of the invoke path's CPU; mimalloc keeps
// the many small per-request allocations of hyper/h2/rustls cheaper.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "kiln-agent", version, about = "Kiln's compute-node agent")]
struct Args {
    /// The agent's TOML configuration.
    #[arg(long, env = "KILN_AGENT_CONFIG")]
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Before any thread exists: every thread the runtime starts later
    // inherits the private mount namespace (see namespace.rs).
    if let Err(e) = kiln_agent::enter_private_mount_namespace() {
        eprintln!("kiln-agent: {}", kiln_core::error_chain(&e));
        return ExitCode::FAILURE;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kiln-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln-agent: {}", kiln_core::error_chain(&*e));
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let config = kiln_agent::AgentConfig::load(&args.config)
        .with_context(|| format!("Cannot use {}", args.config.display()))?;
    let handle = kiln_agent::start(config)
        .await
        .context("Cannot start the agent")?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("Cannot install the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    handle.shutdown().await;
    Ok(())
}
