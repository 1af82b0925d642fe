//! `kiln deploy -f s.yaml`: every function of a Serverless Devs project
//! (see [`crate::project`]), created or updated, then its async invoke,
//! concurrency and provision configs, its VPC bindings and its triggers
//! (created, or updated in place; triggers the file does not name stay).

use std::path::Path;

use anyhow::{bail, Context, Result};
use base64::Engine;
use bytes::Bytes;
use http::Method;
use serde_json::{json, Value};

use crate::client::{ClientError, FcClient, API_VERSION};
use crate::project::{FunctionPlan, Project};
use crate::zipdir::zip_dir;

/// Deploy every function of `project`, in the file's order, printing one
/// line per change.
pub async fn deploy(client: &FcClient, project: &Project) -> Result<()> {
    for note in &project.notes {
        eprintln!("note: {note}");
    }
    for f in &project.functions {
        deploy_function(client, f)
            .await
            .with_context(|| format!("deploying resource {} (function {})", f.resource, f.name))?;
    }
    Ok(())
}

async fn deploy_function(client: &FcClient, f: &FunctionPlan) -> Result<()> {
    let mut body = f.function.clone();
    if let Some(code) = &f.code {
        let zip = package(code)?;
        body.insert(
            "code".into(),
            json!({ "zipFile": base64::engine::general_purpose::STANDARD.encode(zip) }),
        );
    }
    match client.get_function(&f.name).await {
        Ok(_) => {
            body.remove("functionName");
            let out = client
                .update_function(&f.name, &Value::Object(body))
                .await?;
            println!("updated function {}{}", f.name, code_note(&out));
        }
        Err(ClientError::Api { code, .. }) if code == "FunctionNotFound" => {
            // A custom-container function's code is its image.
            let container = f.function.get("runtime") == Some(&json!("custom-container"));
            if f.code.is_none() && !container {
                bail!("props.code is required to create the function");
            }
            let out = client.create_function(&Value::Object(body)).await?;
            println!("created function {}{}", f.name, code_note(&out));
        }
        Err(e) => return Err(e.into()),
    }
    let fpath = format!("/{API_VERSION}/functions/{}", f.name);
    if let Some(c) = &f.async_invoke_config {
        put(client, &format!("{fpath}/async-invoke-config"), c).await?;
        println!("  async invoke config set");
    }
    if let Some(c) = &f.concurrency {
        put(client, &format!("{fpath}/concurrency"), c).await?;
        println!("  concurrency config set");
    }
    if let Some(c) = &f.provision {
        put(client, &format!("{fpath}/provision-config"), c).await?;
        println!("  provision config set");
    }
    if let Some(ids) = &f.vpc_ids {
        bind_vpcs(client, &fpath, ids).await?;
    }
    for t in &f.triggers {
        deploy_trigger(client, &fpath, t).await?;
    }
    Ok(())
}

/// Create the trigger, or update the function's trigger of that name
/// (its type cannot change: the gateway says so); print an HTTP
/// trigger's URL.
async fn deploy_trigger(client: &FcClient, fpath: &str, t: &Value) -> Result<()> {
    let name = t["triggerName"].as_str().unwrap_or_default();
    let path = format!("{fpath}/triggers/{name}");
    let existing = client
        .request(Method::GET, &path, &[], &[], Bytes::new())
        .await?;
    let (out, verb) = if existing.status == 404
        && existing
            .json()
            .ok()
            .and_then(|v| v["Code"].as_str().map(str::to_owned))
            .as_deref()
            == Some("TriggerNotFound")
    {
        let out = client
            .request(
                Method::POST,
                &format!("{fpath}/triggers"),
                &[],
                &[],
                Bytes::from(t.to_string()),
            )
            .await?
            .error_for_status()?
            .json()?;
        (out, "created")
    } else {
        existing.error_for_status()?;
        let mut body = t.clone();
        if let Some(m) = body.as_object_mut() {
            for k in ["triggerName", "triggerType", "sourceArn"] {
                m.remove(k);
            }
        }
        let out = client
            .request(Method::PUT, &path, &[], &[], Bytes::from(body.to_string()))
            .await?
            .error_for_status()?
            .json()?;
        (out, "updated")
    };
    match out["httpTrigger"]["urlInternet"].as_str() {
        Some(url) => println!("  {verb} trigger {name}: {url}"),
        None => println!("  {verb} trigger {name}"),
    }
    Ok(())
}

/// A folder zipped, or a `.zip` file as it is.
fn package(code: &Path) -> Result<Vec<u8>> {
    if code.is_dir() {
        return Ok(zip_dir(code)?);
    }
    if code
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("zip"))
    {
        return std::fs::read(code).with_context(|| format!("cannot read {}", code.display()));
    }
    bail!(
        "props.code: {} is neither a folder nor a .zip file",
        code.display()
    )
}

fn code_note(out: &Value) -> String {
    match (out.get("codeChecksum"), out.get("codeSize")) {
        (Some(c), Some(s)) => format!(
            " (codeChecksum {}, codeSize {s})",
            c.as_str().unwrap_or("?")
        ),
        _ => String::new(),
    }
}

async fn put(client: &FcClient, path: &str, body: &Value) -> Result<()> {
    client
        .request(Method::PUT, path, &[], &[], Bytes::from(body.to_string()))
        .await?
        .error_for_status()?;
    Ok(())
}

/// Bind the listed VPCs and unbind the others.
async fn bind_vpcs(client: &FcClient, fpath: &str, ids: &[String]) -> Result<()> {
    let path = format!("{fpath}/vpc-bindings");
    let current = client
        .request(Method::GET, &path, &[], &[], Bytes::new())
        .await?
        .error_for_status()?
        .json()?;
    let bound: Vec<String> = current
        .get("vpcIds")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    for id in ids.iter().filter(|id| !bound.contains(id)) {
        client
            .request(
                Method::POST,
                &path,
                &[],
                &[],
                Bytes::from(json!({ "vpcId": id }).to_string()),
            )
            .await?
            .error_for_status()?;
        println!("  bound to VPC {id}");
    }
    for id in bound.iter().filter(|id| !ids.contains(id)) {
        client
            .request(
                Method::DELETE,
                &format!("{path}/{id}"),
                &[],
                &[],
                Bytes::new(),
            )
            .await?
            .error_for_status()?;
        println!("  unbound from VPC {id}");
    }
    Ok(())
}
