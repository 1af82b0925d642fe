//! kiln-guest: PID 1 of a Kiln microVM. See the library for what it does.

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_GUEST_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    if let Err(e) = run() {
        eprintln!("kiln-guest: {e:#}");
    }
    // PID 1 must not exit (the kernel would panic): power the VM off.
    if std::process::id() == 1 {
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    }
    std::process::exit(1);
}

fn run() -> anyhow::Result<()> {
    if std::process::id() != 1 {
        anyhow::bail!("kiln-guest runs as PID 1 inside a microVM");
    }
    let args = kiln_guest::early_boot()?;
    tracing::info!(channel = ?args.channel, "kiln-guest {} booting", kiln_guest::GUEST_VERSION);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(kiln_guest::serve_host(args))?;
    Ok(())
}
