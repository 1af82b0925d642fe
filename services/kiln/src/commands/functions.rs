//! `kiln deploy`, `kiln invoke`, `kiln functions list|get|delete`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use base64::Engine;
use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::client::{ClientError, FcClient};
use crate::zipdir::zip_dir;

/// What `kiln deploy` was asked to set.
#[derive(Debug, Clone, Default)]
pub struct DeployOptions {
    pub path: PathBuf,
    pub name: String,
    pub runtime: Option<String>,
    pub command: Option<String>,
    pub args: Vec<String>,
    pub memory_mb: Option<u32>,
    pub concurrency: Option<u32>,
    pub timeout_s: Option<u32>,
    pub port: Option<u16>,
    pub env: Vec<String>,
}

/// The command FC should run when the user gave none: the conventions of
/// the examples (`server.py` runs under python3, `server` is a binary).
fn infer_command(dir: &Path) -> Option<Vec<String>> {
    if dir.join("server.py").is_file() {
        Some(vec!["python3".into(), "server.py".into()])
    } else if dir.join("server").is_file() {
        Some(vec!["/code/server".into()])
    } else {
        None
    }
}

fn runtime_is_built_in(runtime: Option<&str>) -> bool {
    runtime
        .and_then(|r| r.parse::<kiln_core::RuntimeName>().ok())
        .is_some_and(|r| r.handler_language().is_some())
}

/// Build the CreateFunction/UpdateFunction body from the options.
pub fn function_input(opts: &DeployOptions, zip: &[u8], creating: bool) -> Result<Value> {
    let mut input = Map::new();
    if creating {
        input.insert("functionName".into(), json!(opts.name));
    }
    let runtime = opts
        .runtime
        .clone()
        .or_else(|| creating.then(|| "custom.debian12".to_owned()));
    if let Some(r) = runtime {
        input.insert("runtime".into(), json!(r));
    }
    // A built-in runtime (python3.11, nodejs18) runs Kiln's bootstrap,
    // which calls the handler (index.handler): there is no command to infer.
    let built_in = runtime_is_built_in(opts.runtime.as_deref());
    let command = match &opts.command {
        Some(c) => Some(c.split_whitespace().map(str::to_owned).collect::<Vec<_>>()),
        None if built_in => None,
        None => infer_command(&opts.path),
    };
    if creating && command.is_none() && !built_in {
        bail!(
            "cannot tell how to start the function in {}: pass --command (for example --command \"python3 server.py\")",
            opts.path.display()
        );
    }
    if command.is_some() || !opts.args.is_empty() || opts.port.is_some() {
        let mut crc = Map::new();
        if let Some(c) = command {
            crc.insert("command".into(), json!(c));
        }
        if !opts.args.is_empty() {
            crc.insert("args".into(), json!(opts.args));
        }
        crc.insert("port".into(), json!(opts.port.unwrap_or(9000)));
        input.insert("customRuntimeConfig".into(), Value::Object(crc));
    }
    if let Some(m) = opts.memory_mb {
        input.insert("memorySize".into(), json!(m));
    }
    if let Some(c) = opts.concurrency {
        input.insert("instanceConcurrency".into(), json!(c));
    }
    if let Some(t) = opts.timeout_s {
        input.insert("timeout".into(), json!(t));
    }
    if creating {
        input.entry("handler").or_insert(json!("index.handler"));
    }
    if !opts.env.is_empty() {
        let mut env = Map::new();
        for kv in &opts.env {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--env {kv:?} must look like NAME=VALUE"))?;
            env.insert(k.to_owned(), json!(v));
        }
        input.insert("environmentVariables".into(), Value::Object(env));
    }
    input.insert(
        "code".into(),
        json!({ "zipFile": base64::engine::general_purpose::STANDARD.encode(zip) }),
    );
    Ok(Value::Object(input))
}

/// Create the function, or update it when it exists.
pub async fn deploy(client: &FcClient, opts: &DeployOptions) -> Result<Value> {
    let zip = zip_dir(&opts.path)?;
    match client.get_function(&opts.name).await {
        Ok(_) => {
            let input = function_input(opts, &zip, false)?;
            Ok(client.update_function(&opts.name, &input).await?)
        }
        Err(ClientError::Api { code, .. }) if code == "FunctionNotFound" => {
            let input = function_input(opts, &zip, true)?;
            Ok(client.create_function(&input).await?)
        }
        Err(e) => Err(e.into()),
    }
}

/// Invoke and print the body; a function error prints to stderr and fails.
pub async fn invoke(
    client: &FcClient,
    name: &str,
    qualifier: Option<&str>,
    payload: Bytes,
) -> Result<()> {
    let resp = client
        .invoke_qualified(name, qualifier, payload, &[])
        .await?;
    if let Some(kind) = resp.header("x-fc-error-type") {
        let kind = kind.to_owned();
        eprintln!(
            "function error ({kind}), request {}:",
            resp.header("x-fc-request-id").unwrap_or("?")
        );
        eprintln!("{}", String::from_utf8_lossy(&resp.body));
        bail!("the function returned an error ({kind})");
    }
    let resp = resp.error_for_status()?;
    use std::io::Write;
    let mut out = std::io::stdout();
    out.write_all(&resp.body)?;
    if !resp.body.ends_with(b"\n") {
        out.write_all(b"\n")?;
    }
    Ok(())
}

pub fn print_table(functions: &[Value]) {
    println!(
        "{:<32} {:<16} {:>8} {:>6} {:<20}",
        "NAME", "RUNTIME", "MEMORY", "CONC", "LAST MODIFIED"
    );
    for f in functions {
        let s = |k: &str| {
            f.get(k)
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| v.to_string())
                })
                .unwrap_or_default()
        };
        println!(
            "{:<32} {:<16} {:>8} {:>6} {:<20}",
            s("functionName"),
            s("runtime"),
            s("memorySize"),
            s("instanceConcurrency"),
            s("lastModifiedTime")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_body_has_fc_fields() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("server.py"), "print(1)").unwrap();
        let opts = DeployOptions {
            path: dir.path().to_owned(),
            name: "hello".into(),
            memory_mb: Some(256),
            concurrency: Some(10),
            env: vec!["GREETING=hi=there".into()],
            ..Default::default()
        };
        let v = function_input(&opts, b"zip", true).unwrap();
        assert_eq!(v["functionName"], "hello");
        assert_eq!(v["runtime"], "custom.debian12");
        assert_eq!(
            v["customRuntimeConfig"]["command"],
            json!(["python3", "server.py"])
        );
        assert_eq!(v["customRuntimeConfig"]["port"], 9000);
        assert_eq!(v["memorySize"], 256);
        assert_eq!(v["instanceConcurrency"], 10);
        assert_eq!(v["environmentVariables"]["GREETING"], "hi=there");
        assert_eq!(v["code"]["zipFile"], "emlw");
    }

    #[test]
    fn built_in_runtimes_need_no_command() {
        let dir = tempfile::tempdir().unwrap();
        // Even with a server.py there, the bootstrap runs the handler.
        std::fs::write(dir.path().join("server.py"), "print(1)").unwrap();
        let opts = DeployOptions {
            path: dir.path().to_owned(),
            name: "py".into(),
            runtime: Some("python3.11".into()),
            ..Default::default()
        };
        let v = function_input(&opts, b"zip", true).unwrap();
        assert_eq!(v["runtime"], "python3.11");
        assert_eq!(v["handler"], "index.handler");
        assert!(v.get("customRuntimeConfig").is_none());
    }

    #[test]
    fn update_body_leaves_unset_fields_alone() {
        let dir = tempfile::tempdir().unwrap();
        let opts = DeployOptions {
            path: dir.path().to_owned(),
            name: "hello".into(),
            ..Default::default()
        };
        let v = function_input(&opts, b"zip", false).unwrap();
        assert!(v.get("functionName").is_none());
        assert!(v.get("runtime").is_none());
        assert!(v.get("memorySize").is_none());
        assert!(v.get("code").is_some());
    }

    #[test]
    fn create_without_a_command_says_what_to_pass() {
        let dir = tempfile::tempdir().unwrap();
        let opts = DeployOptions {
            path: dir.path().to_owned(),
            name: "x".into(),
            ..Default::default()
        };
        let err = function_input(&opts, b"", true).unwrap_err().to_string();
        assert!(err.contains("--command"));
        let bad_env = DeployOptions {
            env: vec!["NOVALUE".into()],
            command: Some("a".into()),
            ..opts
        };
        assert!(function_input(&bad_env, b"", true).is_err());
    }
}
