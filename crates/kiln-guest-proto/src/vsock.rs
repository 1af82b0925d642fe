//! cloud-hypervisor's hybrid vsock: the guest's AF_VSOCK ports are reached
//! through one unix socket on the host. The host connects, writes
//! `CONNECT <port>\n` and reads `OK <host-side-port>\n`; after that the
//! stream is the guest connection.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// The vsock port kiln-guest listens on.
pub const GUEST_VSOCK_PORT: u32 = 1024;

/// Longest handshake reply accepted.
const MAX_REPLY: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum VsockConnectError {
    #[error("Connecting to the vsock socket {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Hybrid vsock handshake I/O")]
    Io(#[from] std::io::Error),
    #[error("Hybrid vsock handshake refused: {0:?}")]
    Refused(String),
    #[error("Timed out connecting to guest vsock port {0}")]
    Timeout(u32),
}

/// Connect once to `port` in the guest through cloud-hypervisor's socket.
pub async fn connect_hybrid_vsock(path: &Path, port: u32) -> Result<UnixStream, VsockConnectError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| VsockConnectError::Connect {
            path: path.display().to_string(),
            source,
        })?;
    handshake(stream, port).await
}

/// Run the `CONNECT`/`OK` handshake on an already connected stream.
pub async fn handshake(mut stream: UnixStream, port: u32) -> Result<UnixStream, VsockConnectError> {
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    // Read byte by byte: anything after the newline belongs to the guest.
    let mut reader = BufReader::with_capacity(1, &mut stream);
    let mut line = Vec::new();
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Err(VsockConnectError::Refused(
                String::from_utf8_lossy(&line).into_owned(),
            ));
        }
        let byte = buf[0];
        reader.consume(1);
        if byte == b'\n' {
            break;
        }
        line.push(byte);
        if line.len() > MAX_REPLY {
            return Err(VsockConnectError::Refused(
                String::from_utf8_lossy(&line).into_owned(),
            ));
        }
    }
    let text = String::from_utf8_lossy(&line);
    let mut parts = text.split(' ');
    match (
        parts.next(),
        parts.next().map(|p| p.trim().parse::<u32>()),
        parts.next(),
    ) {
        (Some("OK"), Some(Ok(_)), None) => Ok(stream),
        _ => Err(VsockConnectError::Refused(text.into_owned())),
    }
}

/// Retry [`connect_hybrid_vsock`] until the guest listens or `timeout`
/// passes (cloud-hypervisor closes the stream while nothing listens).
pub async fn connect_hybrid_vsock_retry(
    path: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, VsockConnectError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match connect_hybrid_vsock(path, port).await {
            Ok(s) => return Ok(s),
            Err(e) => {
                if tokio::time::Instant::now() >= deadline {
                    tracing::debug!(error = %e, port, "hybrid vsock connect gave up");
                    return Err(VsockConnectError::Timeout(port));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;

    async fn fake_vmm(reply: &'static str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 13];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"CONNECT 1024\n");
            s.write_all(reply.as_bytes()).await.unwrap();
            s.write_all(b"guest-bytes").await.unwrap();
        });
        (dir, path)
    }

    #[tokio::test]
    async fn handshake_ok_keeps_following_bytes() {
        let (_dir, path) = fake_vmm("OK 1073741824\n").await;
        let mut s = connect_hybrid_vsock(&path, GUEST_VSOCK_PORT).await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"guest-bytes");
    }

    #[tokio::test]
    async fn handshake_refused() {
        let (_dir, path) = fake_vmm("ERR nope\n").await;
        assert!(matches!(
            connect_hybrid_vsock(&path, GUEST_VSOCK_PORT).await,
            Err(VsockConnectError::Refused(r)) if r == "ERR nope"
        ));
    }

    #[tokio::test]
    async fn missing_socket_times_out() {
        let path = std::path::Path::new("/nonexistent/kiln/vsock.sock");
        assert!(matches!(
            connect_hybrid_vsock(path, 1).await,
            Err(VsockConnectError::Connect { .. })
        ));
        assert!(matches!(
            connect_hybrid_vsock_retry(path, 1, Duration::from_millis(50)).await,
            Err(VsockConnectError::Timeout(1))
        ));
    }
}
