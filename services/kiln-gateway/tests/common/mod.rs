//! What the gateway's integration tests share: the test accounts, a
//! signing HTTPS client for the public API and its answers, fake internal
//! services under the cluster's mTLS, and function packages.
//!
//! Each test file includes it with `mod common;` and adds the calls it
//! needs in its own `impl common::Api` block.
#![allow(dead_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kiln_core::{Clock, SystemClock};
use kiln_internal_api::server::{self, Body};
use kiln_pki::DevPki;
use serde_json::Value;
use tokio::net::TcpListener;

pub const ACCOUNT_A: &str = "1000000000000001";
pub const ACCOUNT_B: &str = "1000000000000002";
pub const AK_A: &str = "AKA0000000000001";
pub const SK_A: &str = "secret-of-account-a-0001";
pub const AK_B: &str = "AKB0000000000002";
pub const SK_B: &str = "secret-of-account-b-0002";

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

pub async fn read_all(body: hyper::body::Incoming) -> Bytes {
    body.collect().await.unwrap().to_bytes()
}

/// Resolves once `rx` says stop (or its sender is gone).
pub async fn stopped(mut rx: tokio::sync::watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            break;
        }
    }
}

/// A fake internal service (scheduler, agent) answering with `f` under
/// `tls` until `rx` says stop.
pub async fn serve_fake<F, Fut>(
    tls: Arc<rustls::ServerConfig>,
    rx: tokio::sync::watch::Receiver<bool>,
    f: F,
) -> SocketAddr
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    serve_until(tls, stopped(rx), f).await
}

/// A fake internal service answering with `f` under `tls` until `stop`
/// resolves (`std::future::pending()`: for the whole test).
pub async fn serve_until<F, Fut, S>(tls: Arc<rustls::ServerConfig>, stop: S, f: F) -> SocketAddr
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
    S: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(server::serve_tls(l, tls, move |req, _| f(req), stop));
    addr
}

/// A function package: a zip of `files`, executable.
pub fn zip_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    zip_with_mode(files, 0o755)
}

/// A zip of `files`, each with Unix permissions `mode`.
pub fn zip_with_mode(files: &[(&str, &[u8])], mode: u32) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .unix_permissions(mode);
    for (name, data) in files {
        w.start_file(*name, opts).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

pub fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// An HTTPS client trusting the dev CA, speaking HTTP/1.1 (or HTTP/2
/// only).
pub fn https_client(
    pki: &DevPki,
    h2_only: bool,
) -> Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>> {
    let mut tls = (*kiln_pki::public_client_config(&pki.ca_cert()).unwrap()).clone();
    // hyper-rustls sets ALPN itself from the enabled protocols.
    tls.alpn_protocols.clear();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let connector = if h2_only {
        b.enable_http2().wrap_connector(http)
    } else {
        b.enable_http1().wrap_connector(http)
    };
    Client::builder(TokioExecutor::new())
        .http2_only(h2_only)
        .build(connector)
}

/// A caller of the public API signing with one account's key.
pub struct Api {
    pub http: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    pub base: String,
    pub ak: &'static str,
    pub sk: &'static str,
    /// Dates the signatures (a manual clock to test time-dependent rules).
    pub clock: Arc<dyn Clock>,
}

/// The gateway's answer, read whole.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// A success: its JSON (null when empty).
    pub fn ok(&self) -> Value {
        assert!(
            self.status.is_success(),
            "{} {:?}",
            self.status,
            String::from_utf8_lossy(&self.body)
        );
        if self.body.is_empty() {
            Value::Null
        } else {
            self.json()
        }
    }

    /// An answer with exactly `status`: its JSON.
    pub fn ok_with(&self, status: StatusCode) -> Value {
        assert_eq!(
            self.status,
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        self.json()
    }

    /// An FC error: status, Code, RequestId equal to the header; returns
    /// the Message.
    pub fn fc_error(&self, status: u16, code: &str) -> String {
        assert_eq!(
            self.status.as_u16(),
            status,
            "{:?}",
            String::from_utf8_lossy(&self.body)
        );
        let v = self.json();
        assert_eq!(v["Code"], code, "{v}");
        assert_eq!(v["RequestId"].as_str(), Some(self.request_id()), "{v}");
        v["Message"].as_str().unwrap().to_owned()
    }

    pub fn request_id(&self) -> &str {
        self.headers
            .get("x-fc-request-id")
            .expect("x-fc-request-id on every answer")
            .to_str()
            .unwrap()
    }
}

impl Api {
    /// A caller of the gateway at `addr` (named `localhost`, as its dev
    /// certificate is), dating signatures by the system clock.
    pub fn new(
        pki: &DevPki,
        addr: SocketAddr,
        ak: &'static str,
        sk: &'static str,
        h2_only: bool,
    ) -> Api {
        Api {
            http: https_client(pki, h2_only),
            base: format!("https://localhost:{}", addr.port()),
            ak,
            sk,
            clock: Arc::new(SystemClock),
        }
    }

    /// The same caller dating its signatures by `clock`.
    pub fn with_clock(self, clock: Arc<dyn Clock>) -> Api {
        Api { clock, ..self }
    }

    /// A signed request (`content-type: application/json` when a body has
    /// no content type).
    pub fn signed(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        headers: &[(&str, &str)],
        date_ms: u64,
    ) -> Request<Full<Bytes>> {
        let uri: Uri = format!("{}{}", self.base, path).parse().unwrap();
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        if !body.is_empty() && !h.contains_key("content-type") {
            h.insert("content-type", "application/json".parse().unwrap());
        }
        let nonce = kiln_auth::new_nonce();
        let params = kiln_auth::SigningParams::new(self.ak, self.sk, date_ms, &nonce);
        kiln_auth::sign(&method, &uri, &mut h, &body, &params).unwrap();
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        *req.headers_mut() = h;
        req
    }

    pub async fn send(&self, req: Request<Full<Bytes>>) -> Answer {
        let resp = self.http.request(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        Answer {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    /// A signed call dated now (by [`Api::clock`]).
    pub async fn call_with(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let date = self.clock.now_ms();
        self.send(self.signed(method, path, body, headers, date))
            .await
    }

    pub async fn call(&self, method: Method, path: &str, body: Vec<u8>) -> Answer {
        self.call_with(method, path, body, &[]).await
    }
}

/// Run `tests/sdk/<script>` with the official Python SDK (`python`)
/// against the gateway at `addr`, signing with account A's key, with
/// `args` after the endpoint, key and CA; it must exit 0 and print `ok`.
pub async fn run_python_sdk(
    python: &str,
    script: &str,
    addr: SocketAddr,
    pki: &DevPki,
    args: &[&std::ffi::OsStr],
    ok: &str,
) {
    let out = tokio::process::Command::new(python)
        .arg(format!("{}/tests/sdk/{script}", env!("CARGO_MANIFEST_DIR")))
        .arg(format!("localhost:{}", addr.port()))
        .args([AK_A, SK_A])
        .arg(pki.ca_cert())
        .args(args)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK script {script} failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(ok), "{stdout}");
}
