//! `kiln versions publish|list|delete` and `kiln aliases
//! create|get|update|delete|list`: FC's function versions and aliases.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http::Method;
use serde_json::{json, Map, Value};

use crate::client::{FcClient, API_VERSION};

fn versions_path(function: &str) -> String {
    format!("/{API_VERSION}/functions/{function}/versions")
}

fn aliases_path(function: &str) -> String {
    format!("/{API_VERSION}/functions/{function}/aliases")
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

/// Every item of a paged listing under `key`, following nextToken.
async fn all_pages(
    client: &FcClient,
    path: &str,
    key: &str,
    extra: &[(&str, &str)],
) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut q: Vec<(&str, &str)> = vec![("limit", "100")];
        q.extend_from_slice(extra);
        if let Some(t) = &token {
            q.push(("nextToken", t));
        }
        let page = call(client, Method::GET, path, &q, None).await?;
        if let Some(items) = page.get(key).and_then(Value::as_array) {
            out.extend(items.iter().cloned());
        }
        match page.get("nextToken").and_then(Value::as_str) {
            Some(t) if !t.is_empty() => token = Some(t.to_owned()),
            _ => return Ok(out),
        }
    }
}

/// PublishFunctionVersion: snapshot LATEST as the next version.
pub async fn publish(
    client: &FcClient,
    function: &str,
    description: Option<&str>,
) -> Result<Value> {
    let mut body = Map::new();
    if let Some(d) = description {
        body.insert("description".into(), d.into());
    }
    call(
        client,
        Method::POST,
        &versions_path(function),
        &[],
        Some(Value::Object(body)),
    )
    .await
}

/// ListFunctionVersions, newest first.
pub async fn list(client: &FcClient, function: &str) -> Result<Vec<Value>> {
    all_pages(client, &versions_path(function), "versions", &[]).await
}

pub async fn delete(client: &FcClient, function: &str, version: &str) -> Result<()> {
    call(
        client,
        Method::DELETE,
        &format!("{}/{version}", versions_path(function)),
        &[],
        None,
    )
    .await?;
    Ok(())
}

/// `--weight VERSION=FRACTION`, repeated: FC's additionalVersionWeight.
pub fn parse_weights(weights: &[String]) -> Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    for w in weights {
        let (v, f) = w
            .split_once('=')
            .with_context(|| format!("--weight {w:?} is not VERSION=FRACTION (say 2=0.1)"))?;
        let f: f64 = f
            .parse()
            .with_context(|| format!("--weight {w:?}: {f:?} is not a number"))?;
        if out.insert(v.to_owned(), f).is_some() {
            bail!("--weight names version {v} twice");
        }
    }
    Ok(out)
}

/// An alias's fields for CreateAlias / UpdateAlias.
#[derive(Debug, Default, Clone)]
pub struct AliasFields {
    pub version: Option<String>,
    pub description: Option<String>,
    /// `Some(empty)` clears the canary weights.
    pub weights: Option<BTreeMap<String, f64>>,
}

impl AliasFields {
    fn body(&self, alias: Option<&str>) -> Value {
        let mut b = Map::new();
        if let Some(a) = alias {
            b.insert("aliasName".into(), a.into());
        }
        if let Some(v) = &self.version {
            b.insert("versionId".into(), v.as_str().into());
        }
        if let Some(d) = &self.description {
            b.insert("description".into(), d.as_str().into());
        }
        if let Some(w) = &self.weights {
            b.insert("additionalVersionWeight".into(), json!(w));
        }
        Value::Object(b)
    }
}

pub async fn create_alias(
    client: &FcClient,
    function: &str,
    alias: &str,
    fields: &AliasFields,
) -> Result<Value> {
    call(
        client,
        Method::POST,
        &aliases_path(function),
        &[],
        Some(fields.body(Some(alias))),
    )
    .await
}

pub async fn update_alias(
    client: &FcClient,
    function: &str,
    alias: &str,
    fields: &AliasFields,
) -> Result<Value> {
    call(
        client,
        Method::PUT,
        &format!("{}/{alias}", aliases_path(function)),
        &[],
        Some(fields.body(None)),
    )
    .await
}

pub async fn get_alias(client: &FcClient, function: &str, alias: &str) -> Result<Value> {
    call(
        client,
        Method::GET,
        &format!("{}/{alias}", aliases_path(function)),
        &[],
        None,
    )
    .await
}

pub async fn delete_alias(client: &FcClient, function: &str, alias: &str) -> Result<()> {
    call(
        client,
        Method::DELETE,
        &format!("{}/{alias}", aliases_path(function)),
        &[],
        None,
    )
    .await?;
    Ok(())
}

pub async fn list_aliases(
    client: &FcClient,
    function: &str,
    prefix: Option<&str>,
) -> Result<Vec<Value>> {
    let extra: Vec<(&str, &str)> = prefix.map(|p| ("prefix", p)).into_iter().collect();
    all_pages(client, &aliases_path(function), "aliases", &extra).await
}

fn field(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::String(_)) | Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

/// One line per version.
pub fn versions_table(versions: &[Value]) -> String {
    let mut out = format!("{:<8} {:<21} {}\n", "VERSION", "CREATED", "DESCRIPTION");
    for v in versions {
        out.push_str(&format!(
            "{:<8} {:<21} {}\n",
            field(v, "versionId"),
            field(v, "createdTime"),
            field(v, "description")
        ));
    }
    out
}

/// An alias's canary weights as `2=10%`.
fn weights(a: &Value) -> String {
    let Some(w) = a.get("additionalVersionWeight").and_then(Value::as_object) else {
        return "-".into();
    };
    if w.is_empty() {
        return "-".into();
    }
    w.iter()
        .map(|(v, f)| format!("{v}={}%", f.as_f64().unwrap_or(0.0) * 100.0))
        .collect::<Vec<_>>()
        .join(",")
}

/// One line per alias.
pub fn aliases_table(aliases: &[Value]) -> String {
    let mut out = format!(
        "{:<24} {:<8} {:<16} {:<21} {}\n",
        "ALIAS", "VERSION", "CANARY", "MODIFIED", "DESCRIPTION"
    );
    for a in aliases {
        out.push_str(&format!(
            "{:<24} {:<8} {:<16} {:<21} {}\n",
            field(a, "aliasName"),
            field(a, "versionId"),
            weights(a),
            field(a, "lastModifiedTime"),
            field(a, "description")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_parse_and_refuse_garbage() {
        let w = parse_weights(&["2=0.1".into(), "3=0.05".into()]).unwrap();
        assert_eq!(w["2"], 0.1);
        assert_eq!(w["3"], 0.05);
        assert!(parse_weights(&["2".into()]).is_err());
        assert!(parse_weights(&["2=x".into()]).is_err());
        assert!(parse_weights(&["2=0.1".into(), "2=0.2".into()]).is_err());
        assert!(parse_weights(&[]).unwrap().is_empty());
    }

    #[test]
    fn tables_show_each_item() {
        let a = json!({"aliasName": "prod", "versionId": "1", "additionalVersionWeight": {"2": 0.1},
                       "lastModifiedTime": "2026-12-06T09:00:00Z", "description": ""});
        let t = aliases_table(&[a]);
        let line = t.lines().nth(1).unwrap();
        assert!(line.starts_with("prod") && line.contains("2=10%"), "{line}");
        let v =
            json!({"versionId": "3", "createdTime": "2026-12-06T09:00:00Z", "description": "x"});
        assert!(versions_table(&[v])
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("3 "));
    }
}
