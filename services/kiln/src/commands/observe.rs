//! `kiln logs`, `kiln instances` and `kiln exec`: a function's logs (Kiln's
//! GetFunctionLogs), its live instances (FC's ListInstances) and a command
//! or shell inside one of them (FC's InstanceExec, a WebSocket).

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Method;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::client::FcClient;

fn function_path(name: &str, rest: &str) -> String {
    format!(
        "/2023-03-30/functions/{}{rest}",
        percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC)
    )
}

/// One log line as printed: time, instance, request id, message.
pub fn format_line(v: &Value) -> String {
    let ts = v["timestamp"].as_u64().unwrap_or(0);
    let time = jiff::Timestamp::from_millisecond(ts as i64)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| ts.to_string());
    format!(
        "{time} {} {} {}",
        v["instanceId"].as_str().unwrap_or("-"),
        v["requestId"].as_str().unwrap_or("-"),
        v["message"].as_str().unwrap_or("")
    )
}

pub async fn logs(
    client: &FcClient,
    function: &str,
    request_id: Option<&str>,
    follow: bool,
    limit: Option<u32>,
) -> Result<()> {
    let path = function_path(function, "/logs");
    let mut since: Option<u64> = None;
    let mut seen_at_since: HashSet<String> = HashSet::new();
    loop {
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(r) = request_id {
            query.push(("requestId", r.to_owned()));
        }
        if let Some(s) = since {
            query.push(("since", s.to_string()));
        }
        if let Some(l) = limit {
            query.push(("limit", l.to_string()));
        }
        if follow && since.is_some() {
            query.push(("follow", "true".into()));
        }
        let q: Vec<(&str, &str)> = query.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let v = client
            .request(Method::GET, &path, &q, &[], Bytes::new())
            .await?
            .error_for_status()?
            .json()?;
        let empty = Vec::new();
        for line in v["logs"].as_array().unwrap_or(&empty) {
            let id = line["id"].as_str().unwrap_or("").to_owned();
            let ts = line["timestamp"].as_u64().unwrap_or(0);
            if Some(ts) == since && seen_at_since.contains(&id) {
                continue;
            }
            if Some(ts) != since {
                since = Some(ts);
                seen_at_since.clear();
            }
            seen_at_since.insert(id);
            println!("{}", format_line(line));
        }
        if !follow {
            return Ok(());
        }
        if since.is_none() {
            // Nothing yet: wait for the first line from now on.
            since = Some(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
            );
        }
    }
}

pub async fn instances(client: &FcClient, function: &str, json: bool) -> Result<()> {
    let v = client
        .request(
            Method::GET,
            &function_path(function, "/instances"),
            &[],
            &[],
            Bytes::new(),
        )
        .await?
        .error_for_status()?
        .json()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("{:<40} {:<10} {:<10}", "INSTANCE", "STATUS", "QUALIFIER");
    let empty = Vec::new();
    for i in v["instances"].as_array().unwrap_or(&empty) {
        println!(
            "{:<40} {:<10} {:<10}",
            i["instanceId"].as_str().unwrap_or("-"),
            i["status"].as_str().unwrap_or("-"),
            i["qualifier"].as_str().unwrap_or("-")
        );
    }
    Ok(())
}

/// Run `command` in the instance; stdin is forwarded, output printed.
/// Returns the command's exit code.
pub async fn exec(
    client: &FcClient,
    function: &str,
    instance: &str,
    command: &[String],
    tty: bool,
) -> Result<i32> {
    let creds = client.credentials();
    let path = function_path(
        function,
        &format!(
            "/instances/{}/exec",
            percent_encoding::utf8_percent_encode(instance, percent_encoding::NON_ALPHANUMERIC)
        ),
    );
    let mut query: Vec<(&str, &str)> = command.iter().map(|c| ("command", c.as_str())).collect();
    query.push(("stdin", "true"));
    query.push(("stdout", "true"));
    query.push(("stderr", "true"));
    query.push(("tty", if tty { "true" } else { "false" }));
    let path_and_query = format!("{path}?{}", crate::signing::encode_query(&query));
    let signed = crate::signing::signed_request(
        creds,
        Method::GET,
        &path_and_query,
        &[],
        Bytes::new(),
        Some("InstanceExec"),
    )?;
    let (mut parts, _) = signed.into_parts();
    let uri = parts.uri.clone();
    let host = uri.host().context("endpoint has no host")?.to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let h = &mut parts.headers;
    h.insert(
        http::header::HOST,
        uri.authority().context("no authority")?.as_str().parse()?,
    );
    h.insert(http::header::CONNECTION, "Upgrade".parse()?);
    h.insert(http::header::UPGRADE, "websocket".parse()?);
    h.insert("sec-websocket-version", "13".parse()?);
    h.insert(
        "sec-websocket-key",
        tokio_tungstenite::tungstenite::handshake::client::generate_key().parse()?,
    );
    // The WebSocket client wants its own scheme; the signature covers the
    // path and query only.
    parts.uri = format!(
        "wss://{}{}",
        uri.authority().context("no authority")?,
        uri.path_and_query().context("no path")?
    )
    .parse()?;
    let request = http::Request::from_parts(parts, ());

    let tls = kiln_pki::public_client_config(&creds.ca_cert)?;
    let mut tls = (*tls).clone();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .with_context(|| format!("cannot connect to {host}:{port}"))?;
    let name = rustls::pki_types::ServerName::try_from(host.clone())?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .context("TLS handshake failed")?;
    let (ws, _) = match tokio_tungstenite::client_async(request, stream).await {
        Ok(ok) => ok,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            bail!("InstanceExec refused ({}): {body}", resp.status());
        }
        Err(e) => return Err(e).context("WebSocket handshake failed"),
    };
    let (mut tx, mut rx) = ws.split();
    let stdin_task = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 8192];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut msg = vec![0u8];
                    msg.extend_from_slice(&buf[..n]);
                    if tx.send(Message::Binary(msg)).await.is_err() {
                        break;
                    }
                }
            }
        }
        // End of our stdin: the command's stdin closes with the stream.
        let _ = tx.send(Message::Binary(vec![0u8])).await;
        tx
    });
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut code = None;
    while let Some(msg) = rx.next().await {
        let data = match msg? {
            Message::Binary(b) => b,
            Message::Close(_) => break,
            _ => continue,
        };
        let Some((&channel, payload)) = data.split_first() else {
            continue;
        };
        match channel {
            1 => {
                stdout.write_all(payload).await?;
                stdout.flush().await?;
            }
            2 => {
                stderr.write_all(payload).await?;
                stderr.flush().await?;
            }
            3 => {
                let v: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
                if let Some(c) = v["exitCode"].as_i64() {
                    code = Some(c as i32);
                } else {
                    bail!(
                        "exec failed: {}",
                        v["error"].as_str().unwrap_or("unknown error")
                    );
                }
                break;
            }
            _ => {}
        }
    }
    stdin_task.abort();
    code.context("the session ended without an exit status")
}
