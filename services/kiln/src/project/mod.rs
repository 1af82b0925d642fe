//! A Serverless Devs project (`s.yaml`, edition 3.0.0, `fc3` component)
//! read into what `kiln deploy -f` sends: per function its CreateFunction
//! or UpdateFunction body, its code folder or zip, and its async invoke,
//! concurrency and provision configs, VPC bindings and triggers.
//!
//! Nothing is half-deployed: the whole file is read, checked and its
//! expressions resolved first, and every property Kiln does not support
//! is named with where it is (one error listing all of them), before any
//! call is made.

pub mod vars;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use vars::{join, Scope};

/// The project's top-level keys Kiln reads.
const PROJECT_KEYS: &[&str] = &["edition", "name", "access", "vars", "resources"];

/// `props` that become the function's own configuration (as
/// CreateFunction takes them); the gateway checks their values.
const FUNCTION_PROPS: &[&str] = &[
    "functionName",
    "description",
    "runtime",
    "handler",
    "memorySize",
    "cpu",
    "diskSize",
    "timeout",
    "instanceConcurrency",
    "environmentVariables",
    "customRuntimeConfig",
    "customContainerConfig",
    "instanceLifecycleConfig",
    "layers",
    "internetAccess",
    "vpcConfig",
    "role",
    "logConfig",
    "tracingConfig",
    "tags",
    "resourceGroupId",
    "disableInjectCredentials",
];

/// `props` with their own calls, or read by `kiln deploy` itself.
const OTHER_PROPS: &[&str] = &[
    "region",
    "code",
    "asyncInvokeConfig",
    "concurrencyConfig",
    "provisionConfig",
    "vpcBinding",
    "triggers",
];

/// The keys of an fc3 trigger Kiln reads.
const TRIGGER_KEYS: &[&str] = &[
    "triggerName",
    "triggerType",
    "triggerConfig",
    "qualifier",
    "description",
    "invocationRole",
    "sourceArn",
];

/// Why a known fc3 property is not supported, where a reason helps.
fn unsupported_reason(prop: &str) -> &'static str {
    match prop {
        "nasConfig" | "ossMountConfig" | "juiceFsConfig" | "polarFsConfig" => {
            "Kiln instances have no network file systems: keep data in a service the function calls"
        }
        "gpuConfig" => "Kiln has no GPU instances",
        "customDNS" => "Kiln instances use the node's resolver; custom DNS is not supported",
        "endpoint" => "Kiln deploys to the endpoint of its credentials file (--credentials)",
        _ => "not a property Kiln knows for an fc3 resource",
    }
}

/// One function of the project and everything deployed with it.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionPlan {
    /// The resource's key under `resources`.
    pub resource: String,
    pub name: String,
    /// CreateFunction's body without `code` (and with `functionName`).
    pub function: Map<String, Value>,
    /// A folder (zipped on deploy) or a `.zip` file.
    pub code: Option<PathBuf>,
    /// PutAsyncInvokeConfig's body.
    pub async_invoke_config: Option<Value>,
    /// PutConcurrencyConfig's body.
    pub concurrency: Option<Value>,
    /// PutProvisionConfig's body.
    pub provision: Option<Value>,
    /// The VPCs the function is bound to (CreateVpcBinding per id; others
    /// are removed).
    pub vpc_ids: Option<Vec<String>>,
    /// CreateTrigger bodies (`triggerConfig` as FC's JSON string); each is
    /// created, or updated when the function has it.
    pub triggers: Vec<Value>,
}

/// A checked project.
#[derive(Debug, Clone, PartialEq)]
pub struct Project {
    pub name: Option<String>,
    pub functions: Vec<FunctionPlan>,
    /// Things read but not acted on (`access`, `region`), to print.
    pub notes: Vec<String>,
}

/// Read and check `path` (resolving `${env(...)}` with `env`).
pub fn load(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Project> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    parse(&text, &dir, env).with_context(|| format!("{} cannot be deployed", path.display()))
}

/// Check a project's text; relative code paths are taken from `dir`.
pub fn parse(text: &str, dir: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Project> {
    let doc: Value = serde_yaml_ng::from_str(text).context("not valid YAML")?;
    let Value::Object(mut doc) = doc else {
        bail!("the file must be a YAML map with edition, name and resources");
    };
    let mut errors = Vec::new();
    let mut notes = Vec::new();

    match doc.get("edition") {
        Some(Value::String(e)) if e == "3.0.0" => {}
        Some(other) => errors.push(format!(
            "edition: {other} is not supported: Kiln reads Serverless Devs edition 3.0.0 projects (fc3 components)"
        )),
        None => errors.push("edition: missing (Kiln reads edition: 3.0.0)".into()),
    }
    for key in doc.keys() {
        if !PROJECT_KEYS.contains(&key.as_str()) {
            errors.push(format!(
                "{key}: not supported by kiln deploy (it reads edition, name, access, vars and resources)"
            ));
        }
    }
    if let Some(access) = doc.get("access") {
        notes.push(format!(
            "access {access}: Kiln signs with the key in its credentials file, not a Serverless Devs alias"
        ));
    }

    // vars may use env(); then everything else may use both.
    let mut vars = match doc.remove("vars") {
        None => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => {
            errors.push("vars: must be a map".into());
            Map::new()
        }
    };
    {
        let empty = Map::new();
        let scope = Scope { vars: &empty, env };
        let mut v = Value::Object(std::mem::take(&mut vars));
        vars::resolve(&mut v, &scope, "vars", &mut errors);
        if let Value::Object(m) = v {
            vars = m;
        }
    }
    let scope = Scope { vars: &vars, env };
    let name = doc.get("name").and_then(Value::as_str).map(str::to_owned);

    let resources = match doc.remove("resources") {
        Some(Value::Object(r)) if !r.is_empty() => r,
        Some(Value::Object(_)) | None => {
            errors.push("resources: missing or empty (nothing to deploy)".into());
            Map::new()
        }
        Some(_) => {
            errors.push("resources: must be a map of resource names to components".into());
            Map::new()
        }
    };
    let mut functions = Vec::new();
    let mut names = BTreeSet::new();
    for (key, resource) in resources {
        let at = format!("resources.{key}");
        let Value::Object(mut resource) = resource else {
            errors.push(format!("{at}: must be a map with component and props"));
            continue;
        };
        for k in resource.keys() {
            if k != "component" && k != "props" {
                errors.push(format!(
                    "{at}.{k}: not supported by kiln deploy (it reads component and props)"
                ));
            }
        }
        match resource.get("component").and_then(Value::as_str) {
            Some(c) if c == "fc3" || c.starts_with("fc3@") => {}
            Some(c) => {
                errors.push(format!(
                    "{at}.component: {c} is not supported: Kiln deploys fc3 resources only"
                ));
                continue;
            }
            None => {
                errors.push(format!("{at}.component: missing (Kiln deploys fc3)"));
                continue;
            }
        }
        let mut props = match resource.remove("props") {
            Some(v @ Value::Object(_)) => v,
            _ => {
                errors.push(format!("{at}.props: missing or not a map"));
                continue;
            }
        };
        vars::resolve(&mut props, &scope, &join(&at, "props"), &mut errors);
        let Value::Object(props) = props else {
            unreachable!()
        };
        if let Some(plan) = plan_function(&key, props, dir, &mut errors, &mut notes) {
            if !names.insert(plan.name.clone()) {
                errors.push(format!(
                    "{at}.props.functionName: {} is deployed by another resource too",
                    plan.name
                ));
            }
            functions.push(plan);
        }
    }
    if !errors.is_empty() {
        bail!(
            "{} problem(s), nothing was deployed:\n  - {}",
            errors.len(),
            errors.join("\n  - ")
        );
    }
    Ok(Project {
        name,
        functions,
        notes,
    })
}

fn plan_function(
    resource: &str,
    mut props: Map<String, Value>,
    dir: &Path,
    errors: &mut Vec<String>,
    notes: &mut Vec<String>,
) -> Option<FunctionPlan> {
    let at = format!("resources.{resource}.props");
    let before = errors.len();
    for key in props.keys() {
        if !FUNCTION_PROPS.contains(&key.as_str()) && !OTHER_PROPS.contains(&key.as_str()) {
            errors.push(format!("{at}.{key}: {}", unsupported_reason(key)));
        }
    }
    if let Some(region) = props.remove("region") {
        notes.push(format!(
            "{at}.region {region}: Kiln deploys to the region of the cluster in its credentials file"
        ));
    }
    let name = match props.get("functionName") {
        Some(Value::String(n)) if !n.is_empty() => n.clone(),
        _ => {
            errors.push(format!("{at}.functionName: missing or not a string"));
            String::new()
        }
    };
    let code = match props.remove("code") {
        None => None,
        Some(Value::String(p)) => {
            let path = dir.join(&p);
            if !path.exists() {
                errors.push(format!(
                    "{at}.code: {} does not exist (paths are relative to the s.yaml's folder)",
                    path.display()
                ));
            }
            Some(path)
        }
        Some(_) => {
            errors.push(format!(
                "{at}.code: code in OSS is not supported; give a folder or a .zip file"
            ));
            None
        }
    };
    let async_invoke_config = props.remove("asyncInvokeConfig");
    let concurrency = props.remove("concurrencyConfig");
    if let Some(c) = &concurrency {
        check_keys(
            c,
            &["reservedConcurrency"],
            &format!("{at}.concurrencyConfig"),
            errors,
        );
    }
    let provision = props
        .remove("provisionConfig")
        .map(|p| provision_body(p, &format!("{at}.provisionConfig"), errors));
    let vpc_ids = props.remove("vpcBinding").map(|v| {
        let at = format!("{at}.vpcBinding");
        check_keys(&v, &["vpcIds"], &at, errors);
        match v.get("vpcIds").map(|ids| {
            ids.as_array()
                .map(|a| a.iter().map(|i| i.as_str().map(str::to_owned)).collect())
        }) {
            Some(Some(Some(ids))) => ids,
            _ => {
                errors.push(format!("{at}.vpcIds: must be a list of VPC ids"));
                Vec::new()
            }
        }
    });
    let triggers = match props.remove("triggers") {
        None => Vec::new(),
        Some(Value::Array(list)) => list
            .into_iter()
            .enumerate()
            .filter_map(|(i, t)| trigger_body(t, &format!("{at}.triggers[{i}]"), errors))
            .collect(),
        Some(_) => {
            errors.push(format!("{at}.triggers: must be a list of triggers"));
            Vec::new()
        }
    };
    if errors.len() > before {
        return None;
    }
    Some(FunctionPlan {
        resource: resource.to_owned(),
        name,
        function: props,
        code,
        async_invoke_config,
        concurrency,
        provision,
        vpc_ids,
        triggers,
    })
}

/// An fc3 trigger as CreateTrigger's body: only http and timer (the types
/// Kiln serves); `triggerConfig` written as a map becomes FC's JSON string.
fn trigger_body(t: Value, at: &str, errors: &mut Vec<String>) -> Option<Value> {
    check_keys(&t, TRIGGER_KEYS, at, errors);
    let mut m = t.as_object()?.clone();
    match m.get("triggerName") {
        Some(Value::String(n)) if !n.is_empty() => {}
        _ => errors.push(format!("{at}.triggerName: missing or not a string")),
    }
    match m.get("triggerType").and_then(Value::as_str) {
        Some("http" | "timer") => {}
        Some(other) => errors.push(format!(
            "{at}.triggerType: {other} triggers are not supported by Kiln (it has no such event source); http and timer are"
        )),
        None => errors.push(format!("{at}.triggerType: missing (http or timer)")),
    }
    match m.remove("triggerConfig") {
        Some(Value::String(s)) => {
            m.insert("triggerConfig".into(), Value::String(s));
        }
        Some(c @ Value::Object(_)) => {
            m.insert("triggerConfig".into(), Value::String(c.to_string()));
        }
        _ => errors.push(format!("{at}.triggerConfig: missing or not a map")),
    }
    Some(Value::Object(m))
}

fn check_keys(v: &Value, known: &[&str], at: &str, errors: &mut Vec<String>) {
    match v.as_object() {
        Some(m) => {
            for k in m.keys() {
                if !known.contains(&k.as_str()) {
                    errors.push(format!(
                        "{at}.{k}: not supported (Kiln reads {})",
                        known.join(", ")
                    ));
                }
            }
        }
        None => errors.push(format!("{at}: must be a map")),
    }
}

/// fc3's provisionConfig as PutProvisionConfig's body: `defaultTarget` is
/// the API's `target`.
fn provision_body(p: Value, at: &str, errors: &mut Vec<String>) -> Value {
    check_keys(
        &p,
        &[
            "defaultTarget",
            "alwaysAllocateCPU",
            "alwaysAllocateGPU",
            "scheduledActions",
            "targetTrackingPolicies",
        ],
        at,
        errors,
    );
    let mut body = Map::new();
    let Some(m) = p.as_object() else {
        return Value::Object(body);
    };
    if m.get("alwaysAllocateGPU") == Some(&Value::Bool(true)) {
        errors.push(format!("{at}.alwaysAllocateGPU: Kiln has no GPU instances"));
    }
    match m.get("defaultTarget") {
        Some(t) => {
            body.insert("target".into(), t.clone());
        }
        None => errors.push(format!("{at}.defaultTarget: missing")),
    }
    for k in [
        "alwaysAllocateCPU",
        "scheduledActions",
        "targetTrackingPolicies",
    ] {
        if let Some(v) = m.get(k) {
            body.insert(k.into(), v.clone());
        }
    }
    Value::Object(body)
}

#[cfg(test)]
mod tests;
