use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use kiln_gateway::GatewayConfig;

// glibc's malloc showed up at ~5% of the invoke path's CPU; mimalloc keeps
// the many small per-request allocations of hyper/h2/rustls cheaper.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Kiln's access service: the FC 2023-03-30 API.
#[derive(Parser)]
#[command(name = "kiln-gateway", version)]
struct Args {
    /// The gateway's TOML configuration file.
    #[arg(long, env = "KILN_GATEWAY_CONFIG")]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    use anyhow::Context;
    let config = GatewayConfig::load(&args.config)?;
    let handle = kiln_gateway::start(config)
        .await
        .context("Cannot start the gateway")?;
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
