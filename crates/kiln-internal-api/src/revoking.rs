//! Client connections that end when the server's certificate is revoked.
//!
//! A revoked certificate is refused at the next handshake by the client
//! TLS configuration's verifier ([`kiln_pki::internal_client_config_live`]);
//! this closes what was already open: a pooled keep-alive connection to an
//! agent whose node is revoked fails its next read or write (and an idle
//! one is woken and closed at once), so no call is sent over it again and
//! the pool reconnects, which the verifier refuses. The server side does
//! the same for its accepted connections (`server::serve_tls_revocable`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::Uri;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use kiln_pki::{PeerCert, RevocationSet};
use tokio::net::TcpStream;
use tokio::sync::watch;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Inner = MaybeHttpsStream<TokioIo<TcpStream>>;

/// An HTTPS connector whose connections follow `revoked` (when given).
#[derive(Clone)]
pub struct RevokingConnector {
    inner: HttpsConnector<HttpConnector>,
    revoked: Option<Arc<RevocationSet>>,
}

impl RevokingConnector {
    pub fn new(inner: HttpsConnector<HttpConnector>, revoked: Option<Arc<RevocationSet>>) -> Self {
        Self { inner, revoked }
    }
}

impl tower_service::Service<Uri> for RevokingConnector {
    type Response = RevokingStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<RevokingStream, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let revoked = self.revoked.clone();
        Box::pin(async move {
            let stream = connecting.await?;
            let cert = match &stream {
                MaybeHttpsStream::Https(tls) => tls.inner().get_ref().1.peer_certificates(),
                MaybeHttpsStream::Http(_) => None,
            }
            .and_then(|c| c.first())
            .cloned();
            Ok(RevokingStream::watching(stream, revoked, cert.as_ref())?)
        })
    }
}

/// Waits for the next change of a revocation set, handing its receiver
/// back (`None` once the set is gone).
type NextChange = Pin<Box<dyn Future<Output = Option<watch::Receiver<u64>>> + Send>>;

fn next_change(mut rx: watch::Receiver<u64>) -> NextChange {
    Box::pin(async move { rx.changed().await.ok().map(|()| rx) })
}

struct Watch {
    set: Arc<RevocationSet>,
    cert: PeerCert,
    /// Only ever reached through `&mut self` (`Mutex::get_mut`, no
    /// locking): the mutex makes the stream `Sync`, as the bodies that
    /// carry it must be, though the future itself is not.
    next: std::sync::Mutex<NextChange>,
}

impl Watch {
    fn new(set: Arc<RevocationSet>, cert: PeerCert) -> Self {
        let next = std::sync::Mutex::new(next_change(set.subscribe()));
        Self { set, cert, next }
    }
}

/// A client connection that fails every read and write once the server's
/// certificate is revoked.
pub struct RevokingStream<T = Inner> {
    inner: T,
    watch: Option<Watch>,
    revoked: bool,
}

impl<T> RevokingStream<T> {
    /// `inner`, a connection to a server that presented `server_cert`,
    /// followed in `revoked` (when given; a plain connection or one
    /// without a certificate is not followed). Refused when the
    /// certificate was revoked between the handshake's check and now.
    pub fn watching(
        inner: T,
        revoked: Option<Arc<RevocationSet>>,
        server_cert: Option<&rustls::pki_types::CertificateDer<'_>>,
    ) -> Result<Self, String> {
        let watch = match (revoked, server_cert.and_then(PeerCert::from_der)) {
            (Some(set), Some(cert)) => {
                if set.is_revoked(&cert) {
                    return Err(format!("server certificate {cert} is revoked"));
                }
                Some(Watch::new(set, cert))
            }
            _ => None,
        };
        Ok(Self {
            inner,
            watch,
            revoked: false,
        })
    }

    /// Follow the revocation set's changes (registering the task's waker,
    /// so an idle connection is woken by a revocation); an error once the
    /// server's certificate is revoked.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        while !self.revoked {
            let Some(watch) = self.watch.as_mut() else {
                break;
            };
            let next = watch.next.get_mut().unwrap_or_else(|p| p.into_inner());
            match next.as_mut().poll(cx) {
                Poll::Pending => break,
                Poll::Ready(None) => self.watch = None,
                Poll::Ready(Some(rx)) => {
                    if watch.set.is_revoked(&watch.cert) {
                        tracing::warn!(server_cert = %watch.cert, "server certificate revoked; closing the connection to it");
                        self.revoked = true;
                    } else {
                        *next = next_change(rx);
                    }
                }
            }
        }
        if self.revoked {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the server's certificate was revoked",
            ));
        }
        Ok(())
    }
}

impl<T: Read + Unpin> Read for RevokingStream<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for RevokingStream<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<T: Connection> Connection for RevokingStream<T> {
    fn connected(&self) -> Connected {
        self.inner.connected()
    }
}
