//! CreateCustomDomain, GetCustomDomain, UpdateCustomDomain,
//! DeleteCustomDomain, ListCustomDomains (see [`crate::domains`] for what
//! a custom domain is and how its requests are served). The private key
//! goes in and is never answered.

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use kiln_core::FcError;
use serde::Serialize;

use super::error::ApiError;
use super::request::page_by_name;
use super::respond::{json, no_content, Body};
use crate::auth::Caller;
use crate::domains::config::DomainInput;
use crate::domains::DomainEntry;
use crate::gateway::Gateway;
use crate::model::fc_time;

/// `CertConfig` as answered: no `privateKey`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct CertOutput {
    cert_name: String,
    certificate: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct TlsOutput {
    min_version: &'static str,
    max_version: &'static str,
    cipher_suites: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct PathOutput {
    path: String,
    function_name: String,
    qualifier: String,
    methods: Vec<String>,
}

#[derive(Debug, Serialize)]
struct RoutesOutput {
    routes: Vec<PathOutput>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AuthOutput {
    auth_type: &'static str,
}

#[derive(Debug, Serialize)]
struct WafOutput {
    #[serde(rename = "enableWAF")]
    enable_waf: bool,
}

/// `CustomDomain`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct CustomDomain {
    account_id: String,
    api_version: &'static str,
    auth_config: AuthOutput,
    cert_config: CertOutput,
    created_time: String,
    domain_name: String,
    last_modified_time: String,
    protocol: String,
    route_config: RoutesOutput,
    subdomain_count: String,
    tls_config: TlsOutput,
    waf_config: WafOutput,
}

impl CustomDomain {
    fn of(d: &DomainEntry) -> Self {
        let r = &d.record;
        Self {
            account_id: r.account_id.to_string(),
            api_version: super::API_VERSION,
            auth_config: AuthOutput {
                auth_type: "anonymous",
            },
            cert_config: CertOutput {
                cert_name: r.cert_name.clone(),
                certificate: r.certificate.clone(),
            },
            created_time: fc_time(r.created_ms),
            domain_name: r.domain_name.clone(),
            last_modified_time: fc_time(r.modified_ms),
            protocol: r.protocol.clone(),
            route_config: RoutesOutput {
                routes: r
                    .routes
                    .iter()
                    .map(|p| PathOutput {
                        path: p.path.clone(),
                        function_name: p.function_name.to_string(),
                        qualifier: p.qualifier.clone(),
                        methods: p.methods.clone(),
                    })
                    .collect(),
            },
            // FC counts a wildcard domain's subdomains; Kiln's domains are
            // plain names and have none.
            subdomain_count: "0".into(),
            tls_config: TlsOutput {
                min_version: r.tls.min_version.as_str(),
                max_version: r.tls.max_version.as_str(),
                cipher_suites: r.tls.cipher_suites.clone(),
            },
            waf_config: WafOutput { enable_waf: false },
        }
    }
}

/// `ListCustomDomainsOutput`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ListOutput {
    custom_domains: Vec<CustomDomain>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_token: Option<String>,
}

fn input(body: &Bytes) -> Result<DomainInput, FcError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(DomainInput::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| FcError::invalid_argument(format!("request body is invalid: {e}")))
}

pub async fn create(
    gw: &Arc<Gateway>,
    caller: &Caller,
    raw: Bytes,
) -> Result<Response<Body>, ApiError> {
    let input = input(&raw)?;
    let d = gw
        .domains
        .create(&caller.account_id, input, gw.clock.now_ms())
        .await?;
    tracing::info!(domain = %d.record.domain_name, routes = d.record.routes.len(), min_tls = d.record.tls.min_version.as_str(), "custom domain created");
    Ok(json(StatusCode::OK, &CustomDomain::of(&d)))
}

pub fn get(gw: &Arc<Gateway>, caller: &Caller, name: &str) -> Result<Response<Body>, ApiError> {
    let d = gw.domains.get(&caller.account_id, name)?;
    Ok(json(StatusCode::OK, &CustomDomain::of(&d)))
}

pub async fn update(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &str,
    raw: Bytes,
) -> Result<Response<Body>, ApiError> {
    let input = input(&raw)?;
    let d = gw
        .domains
        .update(&caller.account_id, name, input, gw.clock.now_ms())
        .await?;
    tracing::info!(domain = %d.record.domain_name, routes = d.record.routes.len(), "custom domain updated");
    Ok(json(StatusCode::OK, &CustomDomain::of(&d)))
}

pub async fn delete(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &str,
) -> Result<Response<Body>, ApiError> {
    gw.domains.delete(&caller.account_id, name).await?;
    tracing::info!(domain = name, "custom domain deleted");
    Ok(no_content())
}

pub fn list(
    gw: &Arc<Gateway>,
    caller: &Caller,
    parts: &http::request::Parts,
) -> Result<Response<Body>, ApiError> {
    let (page, next_token) = page_by_name(parts, gw.domains.of_account(&caller.account_id), |d| {
        &d.record.domain_name
    })?;
    Ok(json(
        StatusCode::OK,
        &ListOutput {
            custom_domains: page.iter().map(|d| CustomDomain::of(d)).collect(),
            next_token,
        },
    ))
}
