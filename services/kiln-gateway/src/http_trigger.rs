//! HTTP triggers: a request to `https://{function}-{id}.{domain}/any/path`
//! is a call of the trigger's function with the request's method, path,
//! query, headers and body; the function's status, headers and body are
//! the answer (FC's HTTP functions).
//!
//! The public listener routes by Host before API routing
//! ([`crate::api::handle`]): a host under one of the trigger domains
//! (`[http_triggers]`) is served here and nowhere else, so an API path
//! under a trigger's host is the function's path, and a host naming no
//! trigger gets FC's TriggerNotFound.
//!
//! ```text
//!   Host ─> trigger? ──no──> 404 TriggerNotFound
//!     │  internet URL disabled? ──> 403 AccessDenied
//!     │  method in `methods`? ──no──> 405 MethodNotAllowed
//!     │  an upgrade other than an HTTP/1.1 GET WebSocket handshake? ──> 400
//!     │  authType function: ACS3 signature of the function's account,
//!     │      checked as an API call's (head, then body hash) ──bad──> 403
//!     └─> invoke(InvokeRequest { http: method + path, .. }) ─> render_http
//!         (a WebSocket handshake: invoke::websocket, whose 101 joins the
//!          caller's connection to the function's until either closes or
//!          the function's timeout ends it)
//! ```
//!
//! Bodies stream both ways, within FC's 32 MB for a request: an anonymous
//! trigger's request body of [`STREAM_FROM`] bytes or more (or of unknown
//! length) goes to the function as it arrives; smaller ones, and every
//! `function` trigger's (whose hash the signature names, checked before
//! the function sees it), are read first, as an API invocation's. The
//! answer streams (chunked answers and server-sent events arrive as the
//! function writes them).

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use http::{header, HeaderValue, Request, Response};
use hyper::body::Incoming;
use kiln_core::{FcError, FcErrorCode, RequestId};
use kiln_internal_api::server::Body;
use tracing::Instrument;

use crate::api::{self, request, respond, ApiError, Route};
use crate::config::HttpTriggersConfig;
use crate::gateway::Gateway;
use crate::invoke::{self, HttpCall, InvokeRequest, LogType, StreamedBody};
use crate::triggers::AuthType;

/// FC's limit on a trigger request's path with its query.
pub const PATH_MAX: usize = 4 * 1024;

/// The trigger domains, and the port trigger URLs name.
#[derive(Debug)]
pub struct HttpTriggers {
    config: HttpTriggersConfig,
    /// The public listener's port, once bound (URLs name it unless 443).
    public_port: OnceLock<u16>,
}

/// A request's host under a trigger domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TriggerHost {
    /// What precedes the domain (a trigger's host label, if any has it).
    pub label: String,
    /// Under the intranet domain.
    pub intranet: bool,
}

impl HttpTriggers {
    pub fn new(config: HttpTriggersConfig) -> Self {
        Self {
            config,
            public_port: OnceLock::new(),
        }
    }

    /// Record the public listener's bound port.
    pub fn set_public_port(&self, port: u16) {
        let _ = self.public_port.set(port);
    }

    fn origin(&self, label: &str, domain: &str) -> String {
        match self.public_port.get() {
            Some(443) | None => format!("https://{label}.{domain}"),
            Some(p) => format!("https://{label}.{domain}:{p}"),
        }
    }

    /// A trigger's `urlInternet` and `urlIntranet` (empty without an
    /// intranet domain).
    pub fn urls(&self, label: &str) -> (String, String) {
        let internet = self.origin(label, &self.config.domain);
        let intranet = self
            .config
            .intranet_domain
            .as_deref()
            .map(|d| self.origin(label, d))
            .unwrap_or_default();
        (internet, intranet)
    }

    /// The trigger host `req` is addressed to, if it is under a trigger
    /// domain.
    pub fn host_of<B>(&self, req: &Request<B>) -> Option<TriggerHost> {
        let host = match req.uri().host() {
            Some(h) => h.to_owned(),
            None => {
                let h = req.headers().get(header::HOST)?.to_str().ok()?;
                match h.rsplit_once(':') {
                    Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => {
                        name.to_owned()
                    }
                    _ => h.to_owned(),
                }
            }
        };
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let under = |domain: &str| {
            host.strip_suffix(domain)
                .and_then(|l| l.strip_suffix('.'))
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
        };
        if let Some(label) = under(&self.config.domain) {
            return Some(TriggerHost {
                label,
                intranet: false,
            });
        }
        let label = under(self.config.intranet_domain.as_deref()?)?;
        Some(TriggerHost {
            label,
            intranet: true,
        })
    }
}

/// Serve one request addressed to a trigger host.
pub async fn serve(gw: Arc<Gateway>, req: Request<Incoming>, host: TriggerHost) -> Response<Body> {
    let started = Instant::now();
    let request_id = RequestId::generate_ordered();
    // Debug, as the API's sync invocations (the warm path): at info,
    // formatting its fields for every call costs measurable CPU per call;
    // the access line names the request.
    let span = tracing::debug_span!(
        "http_trigger",
        request_id = %request_id,
        host = %host.label,
        method = %req.method(),
        path = %req.uri().path(),
    );
    let (parts, body) = req.into_parts();
    let mut body = Some(body);
    let result = handle(&gw, parts, &mut body, &host, &request_id)
        .instrument(span.clone())
        .await;
    answer(
        &gw,
        result,
        body,
        &span,
        &request_id,
        started,
        "HttpTrigger",
    )
    .await
}

/// The answer to a request a trigger serves (through its host or a custom
/// domain's route): the function's, or FC's error for a refusal (a small
/// unread body drained first), with the request id, the request metric
/// under `operation` and one debug line.
pub(crate) async fn answer(
    gw: &Gateway,
    result: Result<Response<Body>, ApiError>,
    mut body: Option<Incoming>,
    span: &tracing::Span,
    request_id: &RequestId,
    started: Instant,
    operation: &'static str,
) -> Response<Body> {
    if result.is_err() {
        if let Some(body) = body.take() {
            drain_small(body).await;
        }
    }
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            let fc = api::to_fc(&e);
            span.in_scope(|| {
                // Debug: any caller can trigger this line at will.
                tracing::debug!(code = fc.code.as_str(), message = %fc.message, operation, "request refused")
            });
            respond::fc_error(&fc, request_id.as_str())
        }
    };
    if let Ok(v) = HeaderValue::from_str(request_id.as_str()) {
        resp.headers_mut().insert(respond::REQUEST_ID, v);
    }
    gw.metrics.request(operation, resp.status().as_u16());
    span.in_scope(|| {
        tracing::debug!(
            status = resp.status().as_u16(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "answered"
        )
    });
    resp
}

/// A signature problem on a `function` trigger: FC's 403 (a missing
/// signature header is a refusal here, not a malformed API call).
fn refused(e: FcError) -> FcError {
    if e.code.http_status() == 403 {
        e
    } else {
        FcError::new(
            FcErrorCode::AccessDenied,
            format!("this HTTP trigger's authType is function: sign the request with an access key of the function's account ({})", e.message),
        )
    }
}

/// A refused request's small body is read (and dropped) before the
/// answer: an HTTP/2 client may otherwise take the reset of its unread
/// stream for a failure and never show the refusal. Large or slow bodies
/// are not waited for.
pub(crate) async fn drain_small(body: Incoming) {
    use http_body::Body as _;
    const DRAIN_MAX: u64 = 64 * 1024;
    if body.is_end_stream() || body.size_hint().upper().is_none_or(|n| n > DRAIN_MAX) {
        return;
    }
    let _ = request::read_body(body, DRAIN_MAX as usize).await;
}

async fn handle(
    gw: &Arc<Gateway>,
    parts: http::request::Parts,
    body: &mut Option<Incoming>,
    host: &TriggerHost,
    request_id: &RequestId,
) -> Result<Response<Body>, ApiError> {
    let trigger = gw.catalog.trigger_by_host(&host.label).ok_or_else(|| {
        FcError::new(
            FcErrorCode::TriggerNotFound,
            format!("no HTTP trigger serves host {:?}", host.label),
        )
    })?;
    let Some(config) = trigger.http() else {
        return Err(FcError::new(
            FcErrorCode::TriggerNotFound,
            format!("no HTTP trigger serves host {:?}", host.label),
        )
        .into());
    };
    if !host.intranet && config.disable_url_internet {
        return Err(FcError::new(
            FcErrorCode::AccessDenied,
            format!(
                "trigger '{}' does not take calls on its internet URL (disableURLInternet); call its intranet URL",
                trigger.trigger_name
            ),
        )
        .into());
    }
    call_trigger(gw, parts, body, &trigger, request_id).await
}

/// Call `trigger`'s function with the request (the part of a trigger
/// request after its trigger is found; custom domains' routes come in
/// here with the trigger of their function and qualifier).
pub(crate) async fn call_trigger(
    gw: &Arc<Gateway>,
    mut parts: http::request::Parts,
    body: &mut Option<Incoming>,
    trigger: &crate::triggers::TriggerRecord,
    request_id: &RequestId,
) -> Result<Response<Body>, ApiError> {
    let Some(config) = trigger.http() else {
        return Err(FcError::new(
            FcErrorCode::TriggerNotFound,
            format!("trigger '{}' is not an HTTP trigger", trigger.trigger_name),
        )
        .into());
    };
    if !config.allows(&parts.method) {
        return Err(FcError::new(
            FcErrorCode::MethodNotAllowed,
            format!(
                "method {} is not allowed by trigger '{}'; it accepts {}",
                parts.method,
                trigger.trigger_name,
                config.methods.join(", ")
            ),
        )
        .into());
    }
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
    if path_and_query.len() > PATH_MAX {
        return Err(FcError::invalid_argument(format!(
            "the request's path and query are longer than {PATH_MAX} bytes"
        ))
        .into());
    }
    let upgrade = invoke::websocket::requested(&mut parts)?;
    let name = &trigger.function_name;
    // A VPC-only function takes no calls from the internet listener.
    if let Some(entry) = gw.catalog.function(&trigger.account_id, name) {
        let listener = parts
            .extensions
            .get::<api::vpc::Listener>()
            .cloned()
            .unwrap_or(api::vpc::Listener::Internet);
        api::vpc::check_access(&listener, name, &entry.record.config)?;
    }
    let limit = kiln_core::limits::SYNC_PAYLOAD_MAX;
    let mut stream = None;
    let payload = match config.auth_type {
        AuthType::Anonymous if streams(body.as_ref().expect("not read yet")) => {
            let b = take(body);
            request::check_declared_length(&b, limit)?;
            stream = Some(StreamedBody::new(b, limit));
            bytes::Bytes::new()
        }
        AuthType::Anonymous => request::read_body(take(body), limit).await?,
        AuthType::Function => {
            // As an API call: nothing of the body is read before the head
            // is proven signed; then it is hashed as it streams in.
            let head = gw.auth.precheck(&parts).map_err(refused)?;
            request::check_declared_length(body.as_ref().expect("not read yet"), limit)?;
            let replay = gw.auth.replay_check(&head);
            let (caller, check) = gw.auth.verify(head).map_err(refused)?;
            if let Some(r) = replay {
                // A replay is refused as such (403); a database that cannot
                // check the nonce is the service's failure (503), not the
                // caller's.
                r.run().await?;
            }
            if caller.account_id != trigger.account_id {
                return Err(FcError::new(
                    FcErrorCode::AccessDenied,
                    "the request is signed with a key of another account than the function's",
                )
                .into());
            }
            let body = request::read_signed_body(take(body), limit, check).await?;
            crate::ram::authz::authorize(
                &gw.ram,
                &gw.region,
                &caller,
                &Route::InvokeFunction { name: name.clone() },
            )?;
            body
        }
    };
    // The function sees its instance's address as Host (the agent's); the
    // name the caller used (trigger host or custom domain) and the scheme
    // travel as the usual forwarding headers, the gateway's own (a
    // caller's are replaced).
    let mut headers = parts.headers;
    if let Some(host) = headers.get(http::header::HOST).cloned() {
        headers.insert("x-forwarded-host", host);
    } else if let Some(authority) = parts.uri.authority() {
        if let Ok(v) = http::HeaderValue::from_str(authority.as_str()) {
            headers.insert("x-forwarded-host", v);
        }
    }
    headers.insert("x-forwarded-proto", http::HeaderValue::from_static("https"));
    let call = InvokeRequest {
        account_id: trigger.account_id.clone(),
        function: name.clone(),
        qualifier: trigger.qualifier(),
        payload,
        headers,
        log: LogType::None,
        request_id: request_id.clone(),
        http: Some(HttpCall {
            method: parts.method,
            path_and_query,
            pass_authorization: config.auth_type == AuthType::Anonymous,
        }),
        stream,
    };
    let result = match upgrade {
        Some(client) => invoke::websocket::websocket(gw, call, client).await,
        None => invoke::invoke(gw, call).await,
    };
    Ok(invoke::render_http(result)?)
}

/// Bodies from this size on (or of unknown size) are streamed to the
/// function rather than read first (anonymous triggers: a `function`
/// trigger's body is checked against its signature before the call).
pub const STREAM_FROM: u64 = 1024 * 1024;

fn streams(body: &Incoming) -> bool {
    use http_body::Body as _;
    !body.is_end_stream() && body.size_hint().exact().is_none_or(|n| n >= STREAM_FROM)
}

fn take(body: &mut Option<Incoming>) -> Incoming {
    body.take().expect("the body is read once")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn triggers(intranet: Option<&str>) -> HttpTriggers {
        HttpTriggers::new(HttpTriggersConfig {
            domain: "fcapp.localhost".into(),
            intranet_domain: intranet.map(str::to_owned),
            ..HttpTriggersConfig::default()
        })
    }

    fn req(host: &str) -> Request<()> {
        Request::get("/a?b=1")
            .header(header::HOST, host)
            .body(())
            .unwrap()
    }

    #[test]
    fn hosts_under_the_trigger_domains_are_trigger_hosts() {
        let t = triggers(Some("fcapp-vpc.localhost"));
        assert_eq!(
            t.host_of(&req("f-abc.fcapp.localhost:9443")),
            Some(TriggerHost {
                label: "f-abc".into(),
                intranet: false
            })
        );
        assert_eq!(
            t.host_of(&req("F-ABC.FCAPP.localhost.")),
            Some(TriggerHost {
                label: "f-abc".into(),
                intranet: false
            })
        );
        assert_eq!(
            t.host_of(&req("f-abc.fcapp-vpc.localhost")),
            Some(TriggerHost {
                label: "f-abc".into(),
                intranet: true
            })
        );
        for api in [
            "localhost:9443",
            "127.0.0.1",
            "fcapp.localhost",
            "xfcapp.localhost",
        ] {
            assert_eq!(t.host_of(&req(api)), None, "{api}");
        }
        // HTTP/2's authority wins over a Host header.
        let r = Request::get("https://g-1.fcapp.localhost/x")
            .header(header::HOST, "localhost")
            .body(())
            .unwrap();
        assert_eq!(t.host_of(&r).unwrap().label, "g-1");
    }

    #[test]
    fn urls_name_the_port_unless_443() {
        let t = triggers(None);
        t.set_public_port(9443);
        assert_eq!(
            t.urls("f-1"),
            ("https://f-1.fcapp.localhost:9443".into(), String::new())
        );
        let t = triggers(Some("vpc.example"));
        t.set_public_port(443);
        assert_eq!(
            t.urls("f-1"),
            (
                "https://f-1.fcapp.localhost".into(),
                "https://f-1.vpc.example".into()
            )
        );
    }
}
