//! `kiln provision put|get|list|delete` and `kiln concurrency
//! put|get|list|delete`: FC's provision configs (provisioned instances)
//! and concurrency configs (a function's reserved concurrency) over the
//! signed public API.

use std::path::Path;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http::Method;
use serde_json::{Map, Value};

use crate::client::{FcClient, API_VERSION};

/// FC's two kinds of per-function configuration the CLI manages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Provision,
    Concurrency,
}

impl Kind {
    fn path(self, function: &str) -> String {
        match self {
            Kind::Provision => format!("/{API_VERSION}/functions/{function}/provision-config"),
            Kind::Concurrency => format!("/{API_VERSION}/functions/{function}/concurrency"),
        }
    }

    fn list_path(self) -> String {
        match self {
            Kind::Provision => format!("/{API_VERSION}/provision-configs"),
            Kind::Concurrency => format!("/{API_VERSION}/concurrency-configs"),
        }
    }

    /// The list answer's array.
    fn list_key(self) -> &'static str {
        match self {
            Kind::Provision => "provisionConfigs",
            Kind::Concurrency => "configs",
        }
    }
}

/// What `kiln provision put` was asked to set: a file of FC's
/// PutProvisionConfigInput (scheduled actions, target tracking), the flags
/// on top of it.
#[derive(Debug, Clone, Default)]
pub struct ProvisionOptions {
    pub file: Option<std::path::PathBuf>,
    pub target: Option<u32>,
    pub always_allocate_cpu: Option<bool>,
}

fn read_input(file: &Path) -> Result<String> {
    if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("cannot read stdin")
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))
    }
}

/// The PutProvisionConfig body. Without `target` (flag or file) FC refuses
/// it, so this does too, before sending anything.
pub fn provision_body(o: &ProvisionOptions) -> Result<Value> {
    let mut input = match &o.file {
        None => Map::new(),
        Some(f) => match serde_json::from_str(&read_input(f)?)
            .with_context(|| format!("{} is not JSON", f.display()))?
        {
            Value::Object(m) => m,
            _ => bail!(
                "{} must hold a JSON object (FC's PutProvisionConfigInput)",
                f.display()
            ),
        },
    };
    if let Some(t) = o.target {
        // `defaultTarget` wins over `target` in FC; set both alike.
        input.insert("target".into(), t.into());
        if input.contains_key("defaultTarget") {
            input.insert("defaultTarget".into(), t.into());
        }
    }
    if let Some(a) = o.always_allocate_cpu {
        input.insert("alwaysAllocateCPU".into(), a.into());
    }
    if !input.contains_key("target") && !input.contains_key("defaultTarget") {
        bail!("give the number of provisioned instances: --target N (or target in --file)");
    }
    Ok(Value::Object(input))
}

/// The PutConcurrencyConfig body.
pub fn concurrency_body(reserved: u32) -> Value {
    serde_json::json!({ "reservedConcurrency": reserved })
}

pub async fn put(client: &FcClient, kind: Kind, function: &str, body: &Value) -> Result<Value> {
    Ok(client
        .request(
            Method::PUT,
            &kind.path(function),
            &[],
            &[],
            Bytes::from(body.to_string()),
        )
        .await?
        .error_for_status()?
        .json()?)
}

pub async fn get(client: &FcClient, kind: Kind, function: &str) -> Result<Value> {
    Ok(client
        .request(Method::GET, &kind.path(function), &[], &[], Bytes::new())
        .await?
        .error_for_status()?
        .json()?)
}

pub async fn delete(client: &FcClient, kind: Kind, function: &str) -> Result<()> {
    client
        .request(Method::DELETE, &kind.path(function), &[], &[], Bytes::new())
        .await?
        .error_for_status()?;
    Ok(())
}

/// Every configuration of the account (following nextToken), or only
/// `function`'s.
pub async fn list(client: &FcClient, kind: Kind, function: Option<&str>) -> Result<Vec<Value>> {
    let mut all = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut q: Vec<(&str, &str)> = vec![("limit", "100")];
        if let Some(f) = function {
            q.push(("functionName", f));
        }
        if let Some(t) = &token {
            q.push(("nextToken", t));
        }
        let page = client
            .request(Method::GET, &kind.list_path(), &q, &[], Bytes::new())
            .await?
            .error_for_status()?
            .json()?;
        if let Some(items) = page.get(kind.list_key()).and_then(Value::as_array) {
            all.extend(items.iter().cloned());
        }
        match page.get("nextToken").and_then(Value::as_str) {
            Some(t) if !t.is_empty() => token = Some(t.to_owned()),
            _ => return Ok(all),
        }
    }
}

/// `acs:fc:REGION:ACCOUNT:functions/NAME` -> `NAME`.
fn function_of(config: &Value) -> String {
    let arn = config
        .get("functionArn")
        .and_then(Value::as_str)
        .unwrap_or("-");
    arn.rsplit_once("functions/")
        .map_or(arn, |(_, name)| name)
        .to_owned()
}

fn field(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(v) => v.to_string(),
    }
}

/// What `kiln provision` and `kiln concurrency` do, the same for both.
pub enum Action<'a> {
    Put {
        function: &'a str,
        body: Value,
        json: bool,
    },
    Get {
        function: &'a str,
        json: bool,
    },
    List {
        function: Option<&'a str>,
        json: bool,
    },
    Delete {
        function: &'a str,
        json: bool,
    },
}

/// Carry out `action` on `kind`'s configurations and print the result.
pub async fn run(client: &FcClient, kind: Kind, action: Action<'_>) -> Result<()> {
    match action {
        Action::Put {
            function,
            body,
            json,
        } => crate::output::object(&put(client, kind, function, &body).await?, json)?,
        Action::Get { function, json } => {
            crate::output::object(&get(client, kind, function).await?, json)?
        }
        Action::List { function, json } => {
            let all = list(client, kind, function).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                print!("{}", table(kind, &all));
            }
        }
        Action::Delete { function, json } => {
            delete(client, kind, function).await?;
            let what = match kind {
                Kind::Provision => "provision",
                Kind::Concurrency => "concurrency",
            };
            let v = serde_json::json!({"functionName": function, "deleted": what});
            crate::output::done(
                &v,
                json,
                &format!("deleted the {what} config of {function}"),
            )?;
        }
    }
    Ok(())
}

/// One line per configuration.
pub fn table(kind: Kind, configs: &[Value]) -> String {
    let mut out = match kind {
        Kind::Provision => format!(
            "{:<40} {:>7} {:>7} {:>8} {:<19} {:>9} {:>8}\n",
            "FUNCTION",
            "TARGET",
            "CURRENT",
            "DEFAULT",
            "ALWAYS_ALLOCATE_CPU",
            "SCHEDULES",
            "TRACKING"
        ),
        Kind::Concurrency => format!("{:<40} {:>8}\n", "FUNCTION", "RESERVED"),
    };
    for c in configs {
        let count = |k: &str| c.get(k).and_then(Value::as_array).map_or(0, Vec::len);
        out.push_str(&match kind {
            Kind::Provision => format!(
                "{:<40} {:>7} {:>7} {:>8} {:<19} {:>9} {:>8}\n",
                function_of(c),
                field(c, "target"),
                field(c, "current"),
                field(c, "defaultTarget"),
                field(c, "alwaysAllocateCPU"),
                count("scheduledActions"),
                count("targetTrackingPolicies"),
            ),
            Kind::Concurrency => format!(
                "{:<40} {:>8}\n",
                function_of(c),
                field(c, "reservedConcurrency")
            ),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flags_go_on_top_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.json");
        std::fs::write(
            &f,
            r#"{"defaultTarget": 1, "scheduledActions": [{"name": "a"}]}"#,
        )
        .unwrap();
        let body = provision_body(&ProvisionOptions {
            file: Some(f.clone()),
            target: Some(4),
            always_allocate_cpu: Some(false),
        })
        .unwrap();
        assert_eq!(body["target"], 4);
        assert_eq!(body["defaultTarget"], 4);
        assert_eq!(body["alwaysAllocateCPU"], false);
        assert_eq!(body["scheduledActions"][0]["name"], "a");
        // Left out, alwaysAllocateCPU is the server's (FC's) default.
        let body = provision_body(&ProvisionOptions {
            target: Some(2),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(body, json!({"target": 2}));
        let e = provision_body(&ProvisionOptions::default()).unwrap_err();
        assert!(e.to_string().contains("--target"), "{e}");
        std::fs::write(&f, "[1]").unwrap();
        let e = provision_body(&ProvisionOptions {
            file: Some(f),
            target: Some(1),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("JSON object"), "{e}");
    }

    #[test]
    fn tables_show_each_config() {
        let p = table(
            Kind::Provision,
            &[
                json!({"functionArn": "acs:fc:cn-test:1:functions/web", "target": 3,
                     "current": 2, "defaultTarget": 1, "alwaysAllocateCPU": false,
                     "scheduledActions": [{}], "targetTrackingPolicies": []}),
            ],
        );
        let line = p.lines().nth(1).unwrap();
        assert!(line.starts_with("web "), "{p}");
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols, vec!["web", "3", "2", "1", "false", "1", "0"]);
        let c = table(
            Kind::Concurrency,
            &[json!({"functionArn": "acs:fc:cn-test:1:functions/job", "reservedConcurrency": 7})],
        );
        assert_eq!(
            c.lines()
                .nth(1)
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>(),
            vec!["job", "7"]
        );
    }
}
