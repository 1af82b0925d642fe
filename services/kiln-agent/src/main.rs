//! `kiln-agent --config FILE`: the compute-node agent.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use kiln_agent::AgentConfig;
use kiln_service::{LogArgs, Service};

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
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let service = Service::new("kiln-agent", args.config, &args.log);
    // Before any thread exists: every thread the runtime starts later
    // inherits the private mount namespace (see namespace.rs).
    if let Err(e) = kiln_agent::enter_private_mount_namespace() {
        return service.fail(e);
    }
    service.run(AgentConfig::load, kiln_agent::start, |handle| {
        handle.shutdown()
    })
}
