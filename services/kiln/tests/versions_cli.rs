//! `kiln versions` and `kiln aliases` (and `kiln invoke --qualifier`)
//! against a real gateway (in this process) with a fake scheduler and
//! agent: no root, no sandbox. The fake agent answers with the version the
//! scheduler was asked to place, so the CLI's output shows where each
//! call went.

mod common;

use std::process::Output;
use std::sync::{Arc, Mutex};

use base64::Engine;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use kiln_core::{InstanceId, LeaseId, NodeId};
use kiln_internal_api::server::{self, full};
use kiln_internal_api::{AcquireLease, Lease};
use kiln_pki::DevPki;
use serde_json::{json, Value};

const ACCOUNT: &str = "1000000000000002";
const AK: &str = "AKCLI00000000002";
const SK: &str = "secret-of-the-cli-test-002";

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_publishes_versions_and_rolls_aliases() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    // The version of the last lease: the agent answers with it.
    let placed: Arc<Mutex<String>> = Arc::default();
    let p = placed.clone();
    let agent = common::serve_fake(
        kiln_pki::internal_server_config(&pki.files("agent")).unwrap(),
        move |req: Request<hyper::body::Incoming>| {
            let p = p.clone();
            async move {
                let _ = req.into_body().collect().await;
                let v = p.lock().unwrap().clone();
                Response::builder()
                    .status(200)
                    .header("x-kiln-invoke-outcome", "ok")
                    .body(full(v))
                    .unwrap()
            }
        },
    )
    .await;
    let agent_url = format!("https://127.0.0.1:{}", agent.port());
    let p = placed.clone();
    let sched = common::serve_fake(
        kiln_pki::internal_server_config(&pki.files("scheduler")).unwrap(),
        move |req: Request<hyper::body::Incoming>| {
            let (agent_url, p) = (agent_url.clone(), p.clone());
            async move {
                let acquire = req.method() == Method::POST && req.uri().path() == "/v1/leases";
                let body = req.into_body().collect().await.unwrap().to_bytes();
                if !acquire {
                    return server::no_content();
                }
                let a: AcquireLease = serde_json::from_slice(&body).unwrap();
                *p.lock().unwrap() = a.spec.version.unwrap_or_else(|| "LATEST".into());
                server::json(
                    StatusCode::OK,
                    &Lease {
                        lease_id: LeaseId::generate(),
                        instance_id: InstanceId::generate(),
                        node_id: NodeId::generate(),
                        agent_url,
                        cold_start: false,
                        expires_in_ms: 600_000,
                    },
                )
            }
        },
    )
    .await;
    let (_gw, creds_path, client) = common::cli_gateway(
        dir.path(),
        &pki,
        &format!("https://127.0.0.1:{}", sched.port()),
        (ACCOUNT, AK, SK),
    )
    .await;
    let doc = |text: &[u8]| {
        let zip = common::one_file_zip("app.py", text);
        json!({
            "functionName": "web",
            "runtime": "custom.debian12",
            "handler": "index.handler",
            "customRuntimeConfig": {"command": ["python3", "/code/app.py"], "port": 9000},
            "code": {"zipFile": base64::engine::general_purpose::STANDARD.encode(zip)},
        })
    };
    client.create_function(&doc(b"one")).await.unwrap();

    let run = move |args: &[&str]| {
        let c = creds_path.clone();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
                .arg("--credentials")
                .arg(&c)
                .args(&args)
                .output()
                .unwrap()
        })
    };
    let ok = |o: Output| {
        assert!(o.status.success(), "{o:?}");
        stdout(&o)
    };

    let out = ok(
        run(&["versions", "publish", "web", "--description", "first"])
            .await
            .unwrap(),
    );
    let line = out.lines().nth(1).unwrap();
    assert!(line.starts_with("1 ") && line.ends_with("first"), "{out}");
    // Nothing changed: FC's error reaches the user.
    let o = run(&["versions", "publish", "web"]).await.unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("has not changed"),
        "{o:?}"
    );
    client.update_function("web", &doc(b"two")).await.unwrap();
    let v2: Value = serde_json::from_str(&ok(run(&["versions", "publish", "web", "-o", "json"])
        .await
        .unwrap()))
    .unwrap();
    assert_eq!(v2["versionId"], "2");
    let listed: Value = serde_json::from_str(&ok(run(&["versions", "list", "web", "-o", "json"])
        .await
        .unwrap()))
    .unwrap();
    let ids: Vec<_> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["versionId"].clone())
        .collect();
    assert_eq!(ids, [json!("2"), json!("1")]);

    // An alias with a canary; its table shows the share.
    let out = ok(run(&[
        "aliases",
        "create",
        "web",
        "prod",
        "--version",
        "1",
        "--weight",
        "2=0.25",
    ])
    .await
    .unwrap());
    assert!(out.lines().nth(1).unwrap().contains("2=25%"), "{out}");
    let o = run(&[
        "aliases",
        "create",
        "web",
        "bad",
        "--version",
        "1",
        "--weight",
        "2",
    ])
    .await
    .unwrap();
    assert!(!o.status.success(), "{o:?}");
    // Invoke by version and alias: the answer names the version that ran.
    assert_eq!(ok(run(&["invoke", "web", "-q", "1"]).await.unwrap()), "1\n");
    assert_eq!(ok(run(&["invoke", "web"]).await.unwrap()), "LATEST\n");
    // Roll forward: every call goes to version 2.
    let a: Value = serde_json::from_str(&ok(run(&[
        "aliases",
        "update",
        "web",
        "prod",
        "--version",
        "2",
        "--no-weights",
        "-o",
        "json",
    ])
    .await
    .unwrap()))
    .unwrap();
    assert_eq!(a["versionId"], "2");
    assert_eq!(a["additionalVersionWeight"], json!({}));
    for _ in 0..5 {
        assert_eq!(
            ok(run(&["invoke", "web", "--qualifier", "prod"])
                .await
                .unwrap()),
            "2\n"
        );
    }
    let got: Value =
        serde_json::from_str(&ok(run(&["aliases", "get", "web", "prod", "-o", "json"])
            .await
            .unwrap()))
        .unwrap();
    assert_eq!(got, a);
    let out = ok(run(&["aliases", "list", "web"]).await.unwrap());
    assert_eq!(out.lines().count(), 2, "{out}");
    // Version 2 is the alias's: refused; the alias goes first.
    let o = run(&["versions", "delete", "web", "2"]).await.unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("alias 'prod'"),
        "{o:?}"
    );
    ok(run(&["aliases", "delete", "web", "prod"]).await.unwrap());
    ok(run(&["versions", "delete", "web", "2"]).await.unwrap());
    ok(run(&["versions", "delete", "web", "1"]).await.unwrap());
    let out = ok(run(&["versions", "list", "web"]).await.unwrap());
    assert_eq!(out.lines().count(), 1, "only the header: {out}");
    let o = run(&["invoke", "web", "-q", "prod"]).await.unwrap();
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("AliasNotFound"),
        "{o:?}"
    );
}
