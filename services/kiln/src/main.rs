use std::process::ExitCode;

use clap::Parser;

// glibc's malloc showed up at ~5% of the invoke path's CPU; mimalloc keeps
// the many small per-request allocations of hyper/h2/rustls cheaper.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = kiln::cli::Cli::parse();
    // A service of `kiln dev --postgres`: it sets up its own logging and
    // runtime, as its own binary does.
    if let kiln::cli::Command::Serve(command) = &cli.command {
        return kiln::serve::run(command, &cli.log);
    }
    // stderr: stdout carries the commands' answers.
    kiln_service::logging::init(
        cli.log.log_format,
        cli.default_log_filter(),
        kiln_service::Output::Stderr,
    );
    // Sandboxes mount overlays; keep those mounts out of the host's mount
    // namespace. This must happen before any thread exists.
    if cli.runs_agent() {
        if let Err(e) = kiln_agent::enter_private_mount_namespace() {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(kiln::cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
