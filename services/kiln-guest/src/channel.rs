//! The host channel: an AF_VSOCK listener (production) or a virtio-serial
//! port (tests under qemu). Each yields one byte stream per host connection.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};
use tokio::io::unix::AsyncFd;

use crate::fdio::FdStream;

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("Listening on vsock port {port}")]
    Vsock {
        port: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("No virtio-serial port named {0:?}")]
    NoSuchPort(String),
    #[error("Opening {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Accepting a vsock connection")]
    Accept(#[source] std::io::Error),
}

pub struct VsockListener {
    fd: AsyncFd<OwnedFd>,
}

impl VsockListener {
    pub fn bind(port: u32) -> Result<VsockListener, ChannelError> {
        let err = |source: std::io::Error| ChannelError::Vsock { port, source };
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(|e| err(e.into()))?;
        bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))
            .map_err(|e| err(e.into()))?;
        listen(&fd, Backlog::new(8).map_err(|e| err(e.into()))?).map_err(|e| err(e.into()))?;
        Ok(VsockListener {
            fd: crate::fdio::register(fd).map_err(err)?,
        })
    }

    pub async fn accept(&self) -> Result<FdStream, ChannelError> {
        loop {
            let mut guard = self.fd.readable().await.map_err(ChannelError::Accept)?;
            match guard.try_io(|fd| {
                accept4(fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC).map_err(std::io::Error::from)
            }) {
                Ok(Ok(raw)) => {
                    // SAFETY: accept4 just returned this descriptor; nothing
                    // else owns it.
                    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                    return FdStream::new(fd).map_err(ChannelError::Accept);
                }
                Ok(Err(e)) => return Err(ChannelError::Accept(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

/// `/dev/vportNpM` of the virtio-serial port called `name` (what udev's
/// /dev/virtio-ports/NAME links to; the guest has no udev).
pub fn find_serial_port(sysfs: &Path, name: &str) -> Result<PathBuf, ChannelError> {
    let dir = sysfs.join("class/virtio-ports");
    let entries = std::fs::read_dir(&dir).map_err(|_| ChannelError::NoSuchPort(name.into()))?;
    for entry in entries.flatten() {
        let port_name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if port_name.trim() == name {
            return Ok(Path::new("/dev").join(entry.file_name()));
        }
    }
    Err(ChannelError::NoSuchPort(name.into()))
}

pub fn open_serial(path: &Path) -> Result<FdStream, ChannelError> {
    let err = |source| ChannelError::Open {
        path: path.into(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(err)?;
    FdStream::new(OwnedFd::from(file)).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_ports_by_name() {
        let dir = tempfile::tempdir().unwrap();
        for (port, name) in [("vport1p1", "other"), ("vport2p1", "kiln.0")] {
            let p = dir.path().join("class/virtio-ports").join(port);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("name"), format!("{name}\n")).unwrap();
        }
        assert_eq!(
            find_serial_port(dir.path(), "kiln.0").unwrap(),
            Path::new("/dev/vport2p1")
        );
        assert!(matches!(
            find_serial_port(dir.path(), "nope"),
            Err(ChannelError::NoSuchPort(_))
        ));
    }

    #[tokio::test]
    async fn vsock_listener_binds() {
        let port = 40_000 + std::process::id() % 20_000;
        match VsockListener::bind(port) {
            Ok(_) => {}
            Err(ChannelError::Vsock { source, .. })
                if source.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
            {
                kiln_test_support::skip(
                    kiln_test_support::Category::Kernel,
                    "this kernel has no AF_VSOCK",
                );
            }
            Err(e) => panic!("{e:?}"),
        }
    }
}
