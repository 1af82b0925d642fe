//! One access line per request, at info, target `kiln::access`, written by
//! [`crate::server::serve_tls`] so every listener (the gateway's public and
//! internal ones, the scheduler, the agent) has it by construction.
//!
//! Fields: `method`, `path` (the URI path only: a query string can carry a
//! presigned URL's credentials and is never logged), `status`,
//! `duration_us` (until the response head is ready; a streamed body may
//! flow on), `request_id`, `peer`, `bytes_in` and `bytes_out` when the
//! length is known without reading the body.
//!
//! The warm invoke path goes through here, so it costs nothing when the
//! target is disabled (`RUST_LOG=info,kiln::access=off`): [`begin`] checks
//! first and copies nothing; when enabled it keeps reference-counted
//! handles to the request's path and id rather than copies.

use std::net::SocketAddr;
use std::time::Instant;

use http::{HeaderValue, Method, Request, Response, Uri};
use http_body::Body;

/// The tracing target of access lines, for filters.
pub const TARGET: &str = "kiln::access";

const REQUEST_ID: &str = "x-fc-request-id";

/// A request being served, to be logged when its response is ready.
pub struct Pending {
    method: Method,
    uri: Uri,
    request_id: Option<HeaderValue>,
    bytes_in: Option<u64>,
    peer: SocketAddr,
    started: Instant,
}

/// Start timing `req`, or `None` when access lines are disabled.
pub fn begin<B: Body>(req: &Request<B>, peer: SocketAddr) -> Option<Pending> {
    if !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
        return None;
    }
    Some(Pending {
        method: req.method().clone(),
        uri: req.uri().clone(),
        request_id: req.headers().get(REQUEST_ID).cloned(),
        bytes_in: req.body().size_hint().exact(),
        peer,
        started: Instant::now(),
    })
}

impl Pending {
    /// Write the access line for `resp`.
    pub fn finish<B: Body>(self, resp: &Response<B>) {
        // The service's own id (the gateway mints one per request) wins
        // over the one the caller sent.
        let request_id = resp
            .headers()
            .get(REQUEST_ID)
            .or(self.request_id.as_ref())
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        tracing::info!(
            target: TARGET,
            method = %self.method,
            path = %self.uri.path(),
            status = resp.status().as_u16(),
            duration_us = self.started.elapsed().as_micros() as u64,
            request_id = %request_id,
            peer = %self.peer,
            bytes_in = self.bytes_in,
            bytes_out = resp.body().size_hint().exact(),
            "access"
        );
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::Full;
    use kiln_test_support::CapturedLog;

    use super::*;

    fn request() -> Request<Full<bytes::Bytes>> {
        Request::builder()
            .method(Method::POST)
            .uri("/2023-03-30/functions/f/invocations?x-acs-signature=secret&token=t")
            .header(REQUEST_ID, "from-caller")
            .body(Full::new(bytes::Bytes::from_static(b"hello")))
            .unwrap()
    }

    #[test]
    fn one_line_with_every_field_and_no_query() {
        let out = CapturedLog::default();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(out.clone())
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let pending = begin(&request(), "192.0.2.1:4000".parse().unwrap()).unwrap();
            let resp = Response::builder()
                .status(202)
                .header(REQUEST_ID, "minted")
                .body(Full::new(bytes::Bytes::from_static(b"ok!")))
                .unwrap();
            pending.finish(&resp);
        });
        let text = out.text();
        assert!(!text.contains("secret"), "{text}");
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["target"], TARGET);
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["method"], "POST");
        assert_eq!(line["path"], "/2023-03-30/functions/f/invocations");
        assert_eq!(line["status"], 202);
        assert_eq!(line["request_id"], "minted");
        assert_eq!(line["peer"], "192.0.2.1:4000");
        assert_eq!(line["bytes_in"], 5);
        assert_eq!(line["bytes_out"], 3);
        assert!(line["duration_us"].is_u64());
    }

    #[test]
    fn nothing_is_kept_when_access_lines_are_off() {
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            assert!(begin(&request(), "192.0.2.1:4000".parse().unwrap()).is_none());
        });
    }

    #[test]
    fn the_callers_request_id_when_the_service_sets_none() {
        let out = CapturedLog::default();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(out.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let pending = begin(&request(), "192.0.2.1:4000".parse().unwrap()).unwrap();
            pending.finish(&Response::new(Full::new(bytes::Bytes::new())));
        });
        let text = out.text();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["request_id"], "from-caller");
        assert_eq!(line["status"], 200);
    }
}
