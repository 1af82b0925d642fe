use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use kiln_gateway::GatewayConfig;
use kiln_service::{LogArgs, Service};

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
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    Service::new("kiln-gateway", args.config, &args.log).run(
        GatewayConfig::load,
        kiln_gateway::start,
        |handle| handle.shutdown(),
    )
}
