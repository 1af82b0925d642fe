//! kiln-guest: PID 1 inside a Kiln microVM.
//!
//! Boot: mount /proc /sys /dev /tmp /run, load the initramfs's modules,
//! read `kiln.channel=` from the kernel command line, then serve the host
//! over that channel (AF_VSOCK in production, virtio-serial in qemu tests)
//! with [`kiln_guest_proto`]. Configure sets up the network, assembles the
//! function's root (runtime disk + writable overlay, code at /code, layers
//! at /opt), switches into it and starts the function; calls are relayed
//! to its port, exec sessions run beside it, its output returns as logs.

pub mod channel;
pub mod cmdline;
pub mod exec;
pub mod fdio;
pub mod guest;
pub mod modules;
pub mod mounts;
pub mod net;
pub mod process;
pub mod relay;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cmdline::{BootArgs, Channel};
use guest::{Guest, Platform};

pub const GUEST_VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("Early mounts")]
    Mounts(#[from] mounts::MountError),
    #[error("Kernel modules")]
    Modules(#[from] modules::ModuleError),
    #[error("Reading the kernel command line")]
    Cmdline(#[source] std::io::Error),
    #[error(transparent)]
    Args(#[from] cmdline::BootArgsError),
    #[error("Bringing up loopback")]
    Loopback(#[from] net::NetError),
    #[error("Host channel")]
    Channel(#[from] channel::ChannelError),
    #[error("Starting the child reaper")]
    Reaper(#[source] std::io::Error),
}

/// Everything PID 1 does before the async runtime starts.
pub fn early_boot() -> Result<BootArgs, BootError> {
    mounts::apply_all(&mounts::RealMounts, &mounts::early_plan())?;
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let base = Path::new("/lib/modules").join(&release);
    let loaded = modules::load_all(
        &modules::FinitModule,
        &Path::new("/lib/modules").join("kiln.order"),
        &base,
    )?;
    tracing::info!(loaded, release = %release, "kernel modules loaded");
    net::loopback(&net::IoctlNet)?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").map_err(BootError::Cmdline)?;
    Ok(BootArgs::parse(&cmdline)?)
}

/// Serve the host forever (reconnections included).
pub async fn serve_host(args: BootArgs) -> Result<(), BootError> {
    let reaper = process::Reaper::start().map_err(BootError::Reaper)?;
    let guest = Arc::new(Guest::new(
        Platform {
            mounts: Box::new(mounts::RealMounts),
            net: Box::new(net::IoctlNet),
            pid1: true,
        },
        reaper,
        args.debug,
    ));
    match args.channel {
        Channel::Vsock(port) => {
            let listener = channel::VsockListener::bind(port)?;
            tracing::info!(port, "listening on vsock");
            loop {
                let stream = listener.accept().await?;
                tracing::info!("host connected");
                let guest = guest.clone();
                tokio::spawn(async move {
                    if let Err(e) = kiln_guest_proto::serve(stream, guest, GUEST_VERSION).await {
                        tracing::warn!(error = %e, "host connection ended with an error");
                    }
                });
            }
        }
        Channel::Serial(name) => {
            let path = wait_for_serial(&name).await?;
            tracing::info!(path = %path.display(), "serving on virtio-serial");
            loop {
                let stream = channel::open_serial(&path)?;
                if let Err(e) = kiln_guest_proto::serve(stream, guest.clone(), GUEST_VERSION).await
                {
                    tracing::warn!(error = %e, "host connection ended with an error");
                }
                // The host went away; wait a little before listening again.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The port appears when virtio_console has probed it.
async fn wait_for_serial(name: &str) -> Result<std::path::PathBuf, BootError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match channel::find_serial_port(Path::new("/sys"), name) {
            Ok(p) if p.exists() => return Ok(p),
            Ok(_) | Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Ok(p) => return Ok(p),
            Err(e) => return Err(e.into()),
        }
    }
}
