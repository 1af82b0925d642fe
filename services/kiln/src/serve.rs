//! `kiln serve gateway|scheduler|agent --config FILE` and `kiln serve exec --
//! PROGRAM ...` (hidden): how `kiln dev --postgres` runs each service of
//! its cluster as an OS process of its own from the one `kiln` binary, so
//! the README's one-binary quickstart works for a cluster too. A served
//! service behaves exactly as its own binary (`kiln-gateway`,
//! `kiln-scheduler`: the same start, stop and exit codes).
//!
//! With `KILN_DEV_PARENT=<pid>` in its environment (set by `kiln dev`),
//! the process asks the kernel for SIGKILL when the thread that started
//! it ends, and exits at once if that parent is already gone: nothing
//! `kiln dev` starts outlives it, even when `kiln dev` is killed.
//! `exec` does the same, then replaces itself with PROGRAM (HAProxy),
//! which keeps the death signal across `execve`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use kiln_service::{LogArgs, Service};

/// The environment variable naming the `kiln dev` process a served
/// service must not outlive.
pub const PARENT_ENV: &str = "KILN_DEV_PARENT";

#[derive(Debug, Subcommand)]
pub enum ServeCommand {
    /// The access service, as `kiln-gateway --config FILE`.
    Gateway {
        #[arg(long)]
        config: PathBuf,
    },
    /// The scheduling service, as `kiln-scheduler --config FILE`.
    Scheduler {
        #[arg(long)]
        config: PathBuf,
    },
    /// The compute-node agent, as `kiln-agent --config FILE` (a further
    /// node beside `kiln dev`'s own, e.g. one dedicated to an account).
    Agent {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run PROGRAM with ARGS (HAProxy) so that it dies with `kiln dev`.
    Exec {
        #[arg(last = true, required = true)]
        command: Vec<OsString>,
    },
}

/// Run the served service (in place of the CLI's runtime and logging:
/// the service sets up its own).
pub fn run(command: &ServeCommand, log: &LogArgs) -> ExitCode {
    if let Err(e) = die_with_parent() {
        eprintln!("kiln serve: {e:#}");
        return ExitCode::FAILURE;
    }
    match command {
        ServeCommand::Gateway { config } => Service::new("kiln-gateway", config, log).run(
            kiln_gateway::GatewayConfig::load,
            kiln_gateway::start,
            |handle| handle.shutdown(),
        ),
        ServeCommand::Scheduler { config } => Service::new("kiln-scheduler", config, log)
            .run_until(
                kiln_scheduler::SchedulerConfig::load,
                kiln_scheduler::start,
                |handle| handle.deposed(),
                |handle| handle.shutdown(),
            ),
        ServeCommand::Agent { config } => {
            let service = Service::new("kiln-agent", config, log);
            // Before any thread exists (main starts none before this):
            // every thread the runtime starts inherits the private mount
            // namespace.
            if let Err(e) = kiln_agent::enter_private_mount_namespace() {
                return service.fail(e);
            }
            service.run(kiln_agent::AgentConfig::load, kiln_agent::start, |handle| {
                handle.shutdown()
            })
        }
        ServeCommand::Exec { command } => {
            use std::os::unix::process::CommandExt;
            let err = std::process::Command::new(&command[0])
                .args(&command[1..])
                .exec();
            eprintln!(
                "kiln serve: cannot run {}: {err}",
                PathBuf::from(&command[0]).display()
            );
            ExitCode::FAILURE
        }
    }
}

/// Under `kiln dev` (`KILN_DEV_PARENT` set): SIGKILL this process when its
/// parent goes, and stop now if it already has.
fn die_with_parent() -> anyhow::Result<()> {
    let Some(parent) = std::env::var_os(PARENT_ENV) else {
        return Ok(());
    };
    let parent: i32 = parent
        .to_str()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("{PARENT_ENV} must be a process id, not {parent:?}"))?;
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| anyhow::anyhow!("cannot ask for a signal on the parent's death: {e}"))?;
    // The parent may have died between our fork and the prctl.
    if nix::unistd::getppid().as_raw() != parent {
        anyhow::bail!("kiln dev (pid {parent}) is gone; not starting");
    }
    Ok(())
}
