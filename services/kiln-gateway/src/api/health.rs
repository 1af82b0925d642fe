//! `GET /healthz` on the public listener: what a load balancer probes.
//! Unsigned, and it says nothing but whether this gateway should get
//! traffic: 200 `ok` when its store answers and it is not draining, else
//! 503 `draining` or `unavailable`. Nothing about the cluster, the store
//! or the version leaks through it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Method, Response, StatusCode};
use kiln_internal_api::server::{full, Body};

use crate::gateway::Gateway;

/// The path a load balancer probes.
pub const PATH: &str = "/healthz";

/// How long the store may take to answer before the gateway is reported
/// unavailable (a balancer's check times out after a few seconds).
const STORE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The answer to a request for [`PATH`].
pub async fn answer(gw: &Arc<Gateway>, method: &Method) -> Response<Body> {
    if method != Method::GET && method != Method::HEAD {
        let mut resp = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    if gw.draining.load(Ordering::Relaxed) {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "draining\n");
    }
    let store = gw.catalog.store.clone();
    let checked = tokio::time::timeout(
        STORE_CHECK_TIMEOUT,
        tokio::task::spawn_blocking(move || store.check()),
    )
    .await;
    match checked {
        Ok(Ok(Ok(()))) => plain(StatusCode::OK, "ok\n"),
        Ok(Ok(Err(e))) => {
            tracing::warn!(error = %e, "health check: the store does not answer");
            plain(StatusCode::SERVICE_UNAVAILABLE, "unavailable\n")
        }
        Ok(Err(_)) | Err(_) => {
            tracing::warn!(
                timeout_ms = STORE_CHECK_TIMEOUT.as_millis() as u64,
                "health check: the store did not answer in time"
            );
            plain(StatusCode::SERVICE_UNAVAILABLE, "unavailable\n")
        }
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(text));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
