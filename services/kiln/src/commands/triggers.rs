//! `kiln triggers create|get|update|delete|list`: FC's triggers (HTTP
//! triggers, whose URL the table shows, and timer triggers).

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http::Method;
use serde_json::{json, Map, Value};

use crate::client::{FcClient, API_VERSION};

fn triggers_path(function: &str) -> String {
    format!("/{API_VERSION}/functions/{function}/triggers")
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

/// An HTTP trigger's configuration from the CLI's flags.
pub fn http_config(methods: &[String], auth: &str, disable_url_internet: bool) -> Result<String> {
    if methods.is_empty() {
        bail!("an HTTP trigger needs --method (repeatable), e.g. --method GET --method POST");
    }
    Ok(json!({
        "methods": methods.iter().map(|m| m.to_ascii_uppercase()).collect::<Vec<_>>(),
        "authType": auth,
        "disableURLInternet": disable_url_internet,
    })
    .to_string())
}

/// A timer trigger's configuration from the CLI's flags.
pub fn timer_config(cron: &str, payload: Option<&str>, enable: bool) -> String {
    let mut c = Map::new();
    c.insert("cronExpression".into(), cron.into());
    if let Some(p) = payload {
        c.insert("payload".into(), p.into());
    }
    c.insert("enable".into(), enable.into());
    Value::Object(c).to_string()
}

/// A trigger's fields for CreateTrigger / UpdateTrigger.
#[derive(Debug, Default, Clone)]
pub struct TriggerFields {
    pub trigger_type: Option<String>,
    /// The configuration's JSON (FC takes it as a string).
    pub config: Option<String>,
    pub qualifier: Option<String>,
    pub description: Option<String>,
}

impl TriggerFields {
    fn body(&self, name: Option<&str>) -> Value {
        let mut b = Map::new();
        if let Some(n) = name {
            b.insert("triggerName".into(), n.into());
        }
        if let Some(t) = &self.trigger_type {
            b.insert("triggerType".into(), t.as_str().into());
        }
        if let Some(c) = &self.config {
            b.insert("triggerConfig".into(), c.as_str().into());
        }
        if let Some(q) = &self.qualifier {
            b.insert("qualifier".into(), q.as_str().into());
        }
        if let Some(d) = &self.description {
            b.insert("description".into(), d.as_str().into());
        }
        Value::Object(b)
    }
}

/// Check that `config` is JSON before sending it (the gateway checks it
/// for the trigger's type).
pub fn check_json(config: &str) -> Result<()> {
    serde_json::from_str::<Value>(config)
        .map(|_| ())
        .context("--config is not valid JSON")
}

pub async fn create(
    client: &FcClient,
    function: &str,
    trigger: &str,
    fields: &TriggerFields,
) -> Result<Value> {
    call(
        client,
        Method::POST,
        &triggers_path(function),
        &[],
        Some(fields.body(Some(trigger))),
    )
    .await
}

pub async fn update(
    client: &FcClient,
    function: &str,
    trigger: &str,
    fields: &TriggerFields,
) -> Result<Value> {
    call(
        client,
        Method::PUT,
        &format!("{}/{trigger}", triggers_path(function)),
        &[],
        Some(fields.body(None)),
    )
    .await
}

pub async fn get(client: &FcClient, function: &str, trigger: &str) -> Result<Value> {
    call(
        client,
        Method::GET,
        &format!("{}/{trigger}", triggers_path(function)),
        &[],
        None,
    )
    .await
}

pub async fn delete(client: &FcClient, function: &str, trigger: &str) -> Result<()> {
    call(
        client,
        Method::DELETE,
        &format!("{}/{trigger}", triggers_path(function)),
        &[],
        None,
    )
    .await?;
    Ok(())
}

/// ListTriggers, every page.
pub async fn list(client: &FcClient, function: &str, prefix: Option<&str>) -> Result<Vec<Value>> {
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
        let page = call(client, Method::GET, &triggers_path(function), &q, None).await?;
        if let Some(items) = page.get("triggers").and_then(Value::as_array) {
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

/// What a trigger does, in a word: an HTTP trigger's URL, a timer's
/// schedule.
fn target(t: &Value) -> String {
    if let Some(url) = t
        .get("httpTrigger")
        .and_then(|h| h.get("urlInternet"))
        .and_then(Value::as_str)
    {
        return url.to_owned();
    }
    t.get("triggerConfig")
        .and_then(Value::as_str)
        .and_then(|c| serde_json::from_str::<Value>(c).ok())
        .and_then(|c| {
            c.get("cronExpression")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "-".into())
}

/// One line per trigger.
pub fn table(triggers: &[Value]) -> String {
    let mut out = format!(
        "{:<24} {:<6} {:<10} {:<21} {}\n",
        "TRIGGER", "TYPE", "QUALIFIER", "MODIFIED", "URL/SCHEDULE"
    );
    for t in triggers {
        out.push_str(&format!(
            "{:<24} {:<6} {:<10} {:<21} {}\n",
            field(t, "triggerName"),
            field(t, "triggerType"),
            field(t, "qualifier"),
            field(t, "lastModifiedTime"),
            target(t)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_are_fcs_json() {
        let c: Value =
            serde_json::from_str(&http_config(&["get".into()], "function", true).unwrap()).unwrap();
        assert_eq!(
            c,
            json!({"methods": ["GET"], "authType": "function", "disableURLInternet": true})
        );
        assert!(http_config(&[], "anonymous", false).is_err());
        let t: Value = serde_json::from_str(&timer_config("@every 1m", None, true)).unwrap();
        assert_eq!(t, json!({"cronExpression": "@every 1m", "enable": true}));
        assert!(check_json("{").is_err());
    }

    #[test]
    fn the_table_shows_urls_and_schedules() {
        let h = json!({"triggerName": "web", "triggerType": "http", "qualifier": "LATEST",
            "httpTrigger": {"urlInternet": "https://f-1.fcapp.localhost:9443", "urlIntranet": ""}});
        let t = json!({"triggerName": "tick", "triggerType": "timer", "qualifier": "LATEST",
            "triggerConfig": "{\"cronExpression\":\"@every 5m\"}"});
        let out = table(&[h, t]);
        assert!(out.contains("https://f-1.fcapp.localhost:9443"), "{out}");
        assert!(out.contains("@every 5m"), "{out}");
    }
}
