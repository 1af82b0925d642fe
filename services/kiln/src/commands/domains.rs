//! `kiln domains create|get|update|delete|list`: FC's custom domains (a
//! domain's certificate, TLS settings and routes from paths to functions).

use std::path::Path;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http::Method;
use serde_json::{json, Map, Value};

use crate::client::{FcClient, API_VERSION};

fn domains_path() -> String {
    format!("/{API_VERSION}/custom-domains")
}

async fn call(
    client: &FcClient,
    method: Method,
    path: &str,
    query: &[(&str, &str)],
    body: Option<Value>,
) -> Result<Value> {
    let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    let resp = client
        .request(method, path, query, &[], body)
        .await?
        .error_for_status()?;
    if resp.body.is_empty() {
        return Ok(Value::Null);
    }
    Ok(resp.json()?)
}

/// One `--route`: `PATH=FUNCTION[:QUALIFIER][@METHOD,METHOD]`, e.g.
/// `/api/*=api:prod@GET,POST`.
pub fn parse_route(s: &str) -> Result<Value> {
    let (path, target) = s
        .split_once('=')
        .with_context(|| format!("--route {s:?}: expected PATH=FUNCTION[:QUALIFIER][@GET,POST]"))?;
    if !path.starts_with('/') {
        bail!("--route {s:?}: the path must start with '/' (/, /a, /a/* or /*)");
    }
    let (target, methods) = match target.split_once('@') {
        Some((t, m)) => (t, Some(m)),
        None => (target, None),
    };
    let (function, qualifier) = match target.split_once(':') {
        Some((f, q)) => (f, Some(q)),
        None => (target, None),
    };
    if function.is_empty() {
        bail!("--route {s:?}: no function name after '='");
    }
    let mut r = Map::new();
    r.insert("path".into(), path.into());
    r.insert("functionName".into(), function.into());
    r.insert("qualifier".into(), qualifier.unwrap_or("LATEST").into());
    if let Some(m) = methods {
        let list: Vec<Value> = m
            .split(',')
            .filter(|m| !m.is_empty())
            .map(|m| m.to_ascii_uppercase().into())
            .collect();
        r.insert("methods".into(), list.into());
    }
    Ok(Value::Object(r))
}

/// A domain's fields for CreateCustomDomain / UpdateCustomDomain.
#[derive(Debug, Default, Clone)]
pub struct DomainFields {
    /// `(certificate PEM, key PEM, certName)`.
    pub cert: Option<(String, String, Option<String>)>,
    /// Replace the routes with these (`--route`); None keeps them.
    pub routes: Option<Vec<Value>>,
    pub min_tls: Option<String>,
}

impl DomainFields {
    /// Read the PEM files `--cert` and `--key` name.
    pub fn read_cert(
        cert: &Path,
        key: &Path,
        name: Option<String>,
    ) -> Result<(String, String, Option<String>)> {
        let c = std::fs::read_to_string(cert)
            .with_context(|| format!("cannot read the certificate {}", cert.display()))?;
        let k = std::fs::read_to_string(key)
            .with_context(|| format!("cannot read the private key {}", key.display()))?;
        Ok((c, k, name))
    }

    fn body(&self, name: Option<&str>) -> Value {
        let mut b = Map::new();
        if let Some(n) = name {
            b.insert("domainName".into(), n.into());
            b.insert("protocol".into(), "HTTPS".into());
        }
        if let Some((cert, key, cert_name)) = &self.cert {
            let mut c = json!({"certificate": cert, "privateKey": key});
            if let Some(n) = cert_name {
                c["certName"] = n.as_str().into();
            }
            b.insert("certConfig".into(), c);
        }
        if let Some(r) = &self.routes {
            b.insert("routeConfig".into(), json!({ "routes": r }));
        }
        if let Some(v) = &self.min_tls {
            b.insert("tlsConfig".into(), json!({ "minVersion": v }));
        }
        Value::Object(b)
    }
}

pub async fn create(client: &FcClient, domain: &str, fields: &DomainFields) -> Result<Value> {
    if fields.cert.is_none() {
        bail!("kiln domains create needs --cert and --key: Kiln serves custom domains over HTTPS");
    }
    call(
        client,
        Method::POST,
        &domains_path(),
        &[],
        Some(fields.body(Some(domain))),
    )
    .await
}

pub async fn update(client: &FcClient, domain: &str, fields: &DomainFields) -> Result<Value> {
    call(
        client,
        Method::PUT,
        &format!("{}/{domain}", domains_path()),
        &[],
        Some(fields.body(None)),
    )
    .await
}

pub async fn get(client: &FcClient, domain: &str) -> Result<Value> {
    call(
        client,
        Method::GET,
        &format!("{}/{domain}", domains_path()),
        &[],
        None,
    )
    .await
}

pub async fn delete(client: &FcClient, domain: &str) -> Result<()> {
    call(
        client,
        Method::DELETE,
        &format!("{}/{domain}", domains_path()),
        &[],
        None,
    )
    .await?;
    Ok(())
}

/// ListCustomDomains, every page.
pub async fn list(client: &FcClient, prefix: Option<&str>) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut q: Vec<(&str, &str)> = vec![("limit", "100")];
        if let Some(p) = prefix {
            q.push(("prefix", p));
        }
        if let Some(t) = &token {
            q.push(("nextToken", t));
        }
        let page = call(client, Method::GET, &domains_path(), &q, None).await?;
        if let Some(items) = page.get("customDomains").and_then(Value::as_array) {
            out.extend(items.iter().cloned());
        }
        match page.get("nextToken").and_then(Value::as_str) {
            Some(t) if !t.is_empty() => token = Some(t.to_owned()),
            _ => return Ok(out),
        }
    }
}

fn field(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::String(_)) | Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

/// A domain's routes in one cell: `/api/*->api:LATEST[GET,POST]`.
fn routes(d: &Value) -> String {
    let Some(rs) = d
        .get("routeConfig")
        .and_then(|r| r.get("routes"))
        .and_then(Value::as_array)
        .filter(|r| !r.is_empty())
    else {
        return "-".into();
    };
    rs.iter()
        .map(|r| {
            let methods = r
                .get("methods")
                .and_then(Value::as_array)
                .filter(|m| !m.is_empty())
                .map(|m| {
                    let m: Vec<&str> = m.iter().filter_map(Value::as_str).collect();
                    format!("[{}]", m.join(","))
                })
                .unwrap_or_default();
            format!(
                "{}->{}:{}{methods}",
                field(r, "path"),
                field(r, "functionName"),
                field(r, "qualifier")
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// One line per domain.
pub fn table(domains: &[Value]) -> String {
    let mut out = format!(
        "{:<32} {:<8} {:<8} {:<21} {}\n",
        "DOMAIN", "PROTOCOL", "MIN TLS", "MODIFIED", "ROUTES"
    );
    for d in domains {
        let min = d
            .get("tlsConfig")
            .map(|t| field(t, "minVersion"))
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<32} {:<8} {:<8} {:<21} {}\n",
            field(d, "domainName"),
            field(d, "protocol"),
            min,
            field(d, "lastModifiedTime"),
            routes(d)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_from_the_flag() {
        assert_eq!(
            parse_route("/api/*=api:prod@get,POST").unwrap(),
            json!({"path": "/api/*", "functionName": "api", "qualifier": "prod", "methods": ["GET", "POST"]})
        );
        assert_eq!(
            parse_route("/*=web").unwrap(),
            json!({"path": "/*", "functionName": "web", "qualifier": "LATEST"})
        );
        for bad in ["/a", "a=web", "/a="] {
            assert!(parse_route(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bodies_and_table_are_fcs() {
        let f = DomainFields {
            cert: Some(("C".into(), "K".into(), Some("n".into()))),
            routes: Some(vec![parse_route("/*=web").unwrap()]),
            min_tls: Some("TLSv1.3".into()),
        };
        let b = f.body(Some("shop.example.com"));
        assert_eq!(b["protocol"], "HTTPS");
        assert_eq!(
            b["certConfig"],
            json!({"certificate": "C", "privateKey": "K", "certName": "n"})
        );
        assert_eq!(b["tlsConfig"]["minVersion"], "TLSv1.3");
        assert!(DomainFields::default()
            .body(None)
            .as_object()
            .unwrap()
            .is_empty());
        let d = json!({"domainName": "shop.example.com", "protocol": "HTTPS",
            "tlsConfig": {"minVersion": "TLSv1.2"},
            "routeConfig": {"routes": [{"path": "/api/*", "functionName": "api", "qualifier": "LATEST", "methods": ["GET"]}]}});
        let out = table(&[d]);
        assert!(out.contains("shop.example.com"), "{out}");
        assert!(out.contains("/api/*->api:LATEST[GET]"), "{out}");
    }
}
