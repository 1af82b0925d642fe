//! A thin typed client of cloud-hypervisor's REST API over its unix API
//! socket (`--api-socket path=...`): one HTTP/1.1 connection per call, each
//! call bounded by a timeout so a hung VMM cannot hang the agent.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

use super::api::{
    DiskConfig, PciDeviceInfo, RestoreConfig, VmConfig, VmCounters, VmInfo, VmSnapshotConfig,
    VmmPingResponse,
};

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum VmmApiError {
    #[error("Cannot connect to the VMM's API socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} did not answer within {timeout:?}")]
    TimedOut { op: &'static str, timeout: Duration },
    #[error("{op} failed at the HTTP level")]
    Http {
        op: &'static str,
        #[source]
        source: hyper::Error,
    },
    #[error("{op} answered {status}: {body}")]
    Status {
        op: &'static str,
        status: StatusCode,
        body: String,
    },
    #[error("{op} answered a body that does not match the API")]
    Decode {
        op: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

/// One VMM's API.
#[derive(Debug, Clone)]
pub struct VmmClient {
    socket: PathBuf,
    timeout: Duration,
}

impl VmmClient {
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            socket: socket.into(),
            timeout,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The same VMM with another per-call timeout (boot and restore may
    /// take longer than a ping).
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        Self {
            socket: self.socket.clone(),
            timeout,
        }
    }

    async fn call(
        &self,
        op: &'static str,
        method: Method,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, VmmApiError> {
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.call_inner(op, method, body)).await {
            Ok(r) => r,
            Err(_) => Err(VmmApiError::TimedOut { op, timeout }),
        }
    }

    async fn call_inner(
        &self,
        op: &'static str,
        method: Method,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, VmmApiError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| VmmApiError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| VmmApiError::Http { op, source })?;
        let conn = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://localhost/api/v1/{op}"))
            .header(http::header::HOST, "localhost")
            .header(http::header::ACCEPT, "application/json");
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("request is well formed");
        let result = async {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|source| VmmApiError::Http { op, source })?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|source| VmmApiError::Http { op, source })?
                .to_bytes();
            if status.is_success() {
                Ok(bytes)
            } else {
                Err(VmmApiError::Status {
                    op,
                    status,
                    body: String::from_utf8_lossy(&bytes).trim().to_owned(),
                })
            }
        }
        .await;
        conn.abort();
        result
    }

    async fn put<T: Serialize>(
        &self,
        op: &'static str,
        body: Option<&T>,
    ) -> Result<(), VmmApiError> {
        let body = body.map(|b| serde_json::to_vec(b).expect("API bodies serialise"));
        self.call(op, Method::PUT, body).await.map(|_| ())
    }

    async fn get<T: DeserializeOwned>(&self, op: &'static str) -> Result<T, VmmApiError> {
        let bytes = self.call(op, Method::GET, None).await?;
        serde_json::from_slice(&bytes).map_err(|source| VmmApiError::Decode { op, source })
    }

    pub async fn ping(&self) -> Result<VmmPingResponse, VmmApiError> {
        self.get("vmm.ping").await
    }

    pub async fn shutdown_vmm(&self) -> Result<(), VmmApiError> {
        self.put::<()>("vmm.shutdown", None).await
    }

    pub async fn create(&self, config: &VmConfig) -> Result<(), VmmApiError> {
        self.put("vm.create", Some(config)).await
    }

    pub async fn boot(&self) -> Result<(), VmmApiError> {
        self.put::<()>("vm.boot", None).await
    }

    pub async fn info(&self) -> Result<VmInfo, VmmApiError> {
        self.get("vm.info").await
    }

    pub async fn counters(&self) -> Result<VmCounters, VmmApiError> {
        self.get("vm.counters").await
    }

    pub async fn pause(&self) -> Result<(), VmmApiError> {
        self.put::<()>("vm.pause", None).await
    }

    pub async fn resume(&self) -> Result<(), VmmApiError> {
        self.put::<()>("vm.resume", None).await
    }

    /// Snapshot a paused VM into `dir` (`file://` URL).
    pub async fn snapshot(&self, dir: &Path) -> Result<(), VmmApiError> {
        let body = VmSnapshotConfig {
            destination_url: format!("file://{}", dir.display()),
        };
        self.put("vm.snapshot", Some(&body)).await
    }

    /// Restore a VM from the snapshot in `dir`; it stays paused unless
    /// `resume`.
    pub async fn restore(&self, dir: &Path, resume: bool) -> Result<(), VmmApiError> {
        let body = RestoreConfig {
            source_url: format!("file://{}", dir.display()),
            prefault: None,
            resume: Some(resume),
        };
        self.put("vm.restore", Some(&body)).await
    }

    /// Hot-plug a disk into the running VM.
    pub async fn add_disk(&self, disk: &DiskConfig) -> Result<PciDeviceInfo, VmmApiError> {
        let body = serde_json::to_vec(disk).expect("API bodies serialise");
        let bytes = self.call("vm.add-disk", Method::PUT, Some(body)).await?;
        serde_json::from_slice(&bytes).map_err(|source| VmmApiError::Decode {
            op: "vm.add-disk",
            source,
        })
    }

    pub async fn shutdown(&self) -> Result<(), VmmApiError> {
        self.put::<()>("vm.shutdown", None).await
    }

    pub async fn delete(&self) -> Result<(), VmmApiError> {
        self.put::<()>("vm.delete", None).await
    }
}
