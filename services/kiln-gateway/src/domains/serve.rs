//! Requests addressed to a custom domain: the route for the path, its
//! methods, then the function's HTTP trigger for the route's qualifier,
//! called as a trigger request is ([`crate::http_trigger::call_trigger`]:
//! the trigger's authType and methods, streaming both ways, the function's
//! own status, headers and body).
//!
//! ```text
//!   no route for the path            404 PathNotSupported
//!   method not in the route's        405 MethodNotAllowed
//!   function gone                    404 FunctionNotFound
//!   no HTTP trigger for qualifier    404 TriggerNotFound
//! ```
//!
//! A request whose connection was not set up for the domain (its SNI
//! names another host, so another certificate and TLS settings served it)
//! gets 421 Misdirected Request: the domain's minimum TLS version cannot
//! be sidestepped by asking for another name in the handshake.
//!
//! As in FC, a trigger's `disableURLInternet` does not apply here: it
//! closes the trigger's own URL, not the custom domain.

use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response};
use hyper::body::Incoming;
use kiln_core::{FcError, FcErrorCode, RequestId};
use kiln_internal_api::server::Body;
use tracing::Instrument;

use super::DomainEntry;
use crate::api::{self, ApiError};
use crate::gateway::Gateway;

/// Serve one request addressed to `domain`.
pub async fn serve(
    gw: Arc<Gateway>,
    req: Request<Incoming>,
    domain: Arc<DomainEntry>,
    server_name: Option<Arc<str>>,
) -> Response<Body> {
    let started = Instant::now();
    let request_id = RequestId::generate_ordered();
    let span = tracing::info_span!(
        "custom_domain",
        request_id = %request_id,
        domain = %domain.record.domain_name,
        method = %req.method(),
        path = %req.uri().path(),
    );
    let (parts, body) = req.into_parts();
    let mut body = Some(body);
    let result = handle(
        &gw,
        parts,
        &mut body,
        &domain,
        server_name.as_deref(),
        &request_id,
    )
    .instrument(span.clone())
    .await;
    crate::http_trigger::answer(
        &gw,
        result,
        body,
        &span,
        &request_id,
        started,
        "CustomDomain",
    )
    .await
}

async fn handle(
    gw: &Arc<Gateway>,
    parts: http::request::Parts,
    body: &mut Option<Incoming>,
    domain: &DomainEntry,
    server_name: Option<&str>,
    request_id: &RequestId,
) -> Result<Response<Body>, ApiError> {
    let name = &domain.record.domain_name;
    let sni = server_name.map(|s| s.trim_end_matches('.').to_ascii_lowercase());
    if sni.as_deref() != Some(name.as_str()) {
        return Err(FcError::new(
            FcErrorCode::MisdirectedRequest,
            format!(
                "this connection was set up for {}, not for custom domain {name}: connect with {name} as the TLS server name (SNI)",
                sni.as_deref().unwrap_or("no server name")
            ),
        )
        .into());
    }
    let route = domain.route(parts.uri.path()).ok_or_else(|| {
        FcError::new(
            FcErrorCode::PathNotSupported,
            format!(
                "no route of custom domain {name} matches path {:?}",
                parts.uri.path()
            ),
        )
    })?;
    if !route.allows(&parts.method) {
        return Err(FcError::new(
            FcErrorCode::MethodNotAllowed,
            format!(
                "method {} is not allowed on route {:?} of custom domain {name}; it accepts {}",
                parts.method,
                route.path,
                route.methods.join(", ")
            ),
        )
        .into());
    }
    let account = &domain.record.account_id;
    let function = &route.function_name;
    if gw.catalog.function(account, function).is_none() {
        return Err(api::not_found(function).into());
    }
    let trigger = gw
        .catalog
        .triggers_of(account, function)
        .into_iter()
        .find(|t| t.http().is_some() && t.qualifier == route.qualifier)
        .ok_or_else(|| {
            FcError::new(
                FcErrorCode::TriggerNotFound,
                format!(
                    "function '{function}' has no HTTP trigger for qualifier {}: a custom domain route calls its function through that trigger; create one",
                    route.qualifier
                ),
            )
        })?;
    crate::http_trigger::call_trigger(gw, parts, body, &trigger, request_id).await
}
