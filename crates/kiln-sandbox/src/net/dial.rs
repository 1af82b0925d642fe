//! The agent's way to a container's runtime without crossing its veth.
//!
//! A socket belongs to the network namespace it was created in, whatever
//! thread uses it later. A TCP socket made inside an instance's namespace
//! and connected to the instance's own address goes over that namespace's
//! loopback: the invocation does not traverse the veth, the host's
//! conntrack and nftables hooks, or the tbf and ifb that shape the
//! instance's bandwidth (a limit on the function's network, not on the
//! calls the platform hands it). The agent spends about 8% less CPU per
//! warm call this way (README, issue 14's third round). The function sees
//! the call come from its own address.
//!
//! `setns` moves only the calling thread, so each socket is made on a
//! short-lived thread of its own that never returns to a pool: no thread
//! is ever left in an instance's namespace. Only new connections pay for
//! it; warm calls reuse them.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

/// Connect to `addr` from inside the network namespace at `netns` (a
/// `/run/netns/<name>` file). The stream has `TCP_NODELAY` set.
pub async fn connect_in(netns: &Path, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let fd = socket_in(netns.to_owned(), addr).await?;
    let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A non-blocking TCP socket of `addr`'s family, created in `netns`.
async fn socket_in(netns: PathBuf, addr: SocketAddr) -> std::io::Result<OwnedFd> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("kiln-netns-dial".into())
        .spawn(move || {
            let _ = tx.send(socket_in_this_thread(&netns, addr));
        })?;
    rx.await.map_err(|_| {
        std::io::Error::other("the thread making a socket in the instance's network namespace died")
    })?
}

fn socket_in_this_thread(netns: &Path, addr: SocketAddr) -> std::io::Result<OwnedFd> {
    let ns = std::fs::File::open(netns).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot open the network namespace {}: {e}", netns.display()),
        )
    })?;
    setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| {
        std::io::Error::new(
            std::io::Error::from(e).kind(),
            format!(
                "cannot enter the network namespace {}: {e}",
                netns.display()
            ),
        )
    })?;
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    Ok(socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}
