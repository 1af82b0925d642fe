//! `kiln invoke --async` and `kiln tasks list|get|stop` against a real
//! gateway (in this process) with a fake scheduler and agent: no root, no
//! sandbox.

mod common;

use std::process::Output;
use std::time::Duration;

use base64::Engine;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use kiln_core::{InstanceId, LeaseId, NodeId};
use kiln_internal_api::server::{self, full};
use kiln_internal_api::Lease;
use kiln_pki::DevPki;
use serde_json::{json, Value};

const ACCOUNT: &str = "1000000000000001";
const AK: &str = "AKCLI00000000001";
const SK: &str = "secret-of-the-cli-test-001";

fn kiln(creds: &std::path::Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--credentials")
        .arg(creds)
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_invokes_async_and_manages_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let agent = common::serve_fake(
        kiln_pki::internal_server_config(&pki.files("agent")).unwrap(),
        |req: Request<hyper::body::Incoming>| async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            Response::builder()
                .status(200)
                .header("x-kiln-invoke-outcome", "ok")
                .body(full(body))
                .unwrap()
        },
    )
    .await;
    let agent_url = format!("https://127.0.0.1:{}", agent.port());
    let sched = common::serve_fake(
        kiln_pki::internal_server_config(&pki.files("scheduler")).unwrap(),
        move |req: Request<hyper::body::Incoming>| {
            let agent_url = agent_url.clone();
            async move {
                let post = req.method() == Method::POST;
                let _ = req.into_body().collect().await;
                if post {
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
                } else {
                    server::no_content()
                }
            }
        },
    )
    .await;
    let (gw, creds_path, client) = common::cli_gateway(
        dir.path(),
        &pki,
        &format!("https://127.0.0.1:{}", sched.port()),
        (ACCOUNT, AK, SK),
    )
    .await;
    let zip = common::one_file_zip("app.py", b"print('hi')\n");
    client
        .create_function(&json!({
            "functionName": "worker",
            "runtime": "custom.debian12",
            "handler": "index.handler",
            "customRuntimeConfig": {"command": ["python3", "/code/app.py"], "port": 9000},
            "code": {"zipFile": base64::engine::general_purpose::STANDARD.encode(zip)},
        }))
        .await
        .unwrap();
    // Task mode: FC tracks async invocations as tasks only with asyncTask.
    let r = client
        .request(
            Method::PUT,
            "/2023-03-30/functions/worker/async-invoke-config",
            &[],
            &[],
            json!({"asyncTask": true}).to_string().into(),
        )
        .await
        .unwrap();
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );

    let c = creds_path.clone();
    let run = move |args: Vec<String>| {
        let c = c.clone();
        tokio::task::spawn_blocking(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            kiln(&c, &a)
        })
    };
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    let o = run(args(&[
        "invoke",
        "worker",
        "--data",
        "hello",
        "--async",
        "--task-id",
        "job-1",
    ]))
    .await
    .unwrap();
    assert!(o.status.success(), "{o:?}");
    let out = stdout(&o);
    assert!(
        out.starts_with("accepted: request ") && out.contains("task job-1"),
        "{out}"
    );

    let mut task = Value::Null;
    for _ in 0..100 {
        let o = run(args(&["tasks", "get", "worker", "job-1"]))
            .await
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        task = serde_json::from_str(&stdout(&o)).unwrap();
        if task["status"] == "Succeeded" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(task["status"], "Succeeded", "{task}");
    assert_eq!(task["returnPayload"], "hello");

    let o = run(args(&[
        "tasks", "list", "worker", "--prefix", "job-", "--json",
    ]))
    .await
    .unwrap();
    let listed: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let o = run(args(&["tasks", "list", "worker"])).await.unwrap();
    let table = stdout(&o);
    assert!(
        table.lines().nth(1).unwrap().starts_with("job-1"),
        "{table}"
    );

    // FC's errors reach the user; a finished task is not stopped.
    let o = run(args(&["tasks", "stop", "worker", "job-1"]))
        .await
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("InvalidArgument"),
        "{o:?}"
    );
    let o = run(args(&["tasks", "get", "worker", "nope"]))
        .await
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("AsyncTaskNotFound"),
        "{o:?}"
    );
    let o = run(args(&["tasks", "list", "worker", "--status", "Sleeping"]))
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("InvalidArgument"),
        "{o:?}"
    );
    gw.shutdown().await;
}
