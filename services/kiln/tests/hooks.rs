//! FC's instance lifecycle hooks end to end on `kiln dev` (runc sandboxes):
//! the Initializer runs once per instance before its first call, a failing
//! one fails the call, and PreStop runs when the instance goes away.

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use serde_json::{json, Value};

use common::{example_zip, Dev};

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn dev_log(dev: &Dev) -> String {
    std::fs::read_to_string(dev.state.path().join("dev.log")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initializer_runs_once_before_the_first_call_and_pre_stop_on_release() {
    if common::skip() {
        return;
    }
    let dev = Dev::start();
    let c = dev.client();
    let zip = example_zip("hello-python");
    let lifecycle = json!({
        "initializer": {"handler": "index.initialize", "timeout": 10},
        "preStop": {"handler": "index.preStop", "timeout": 5},
    });
    let created = c
        .create_function(&json!({
            "functionName": "hooked",
            "runtime": "custom.debian12",
            "handler": "index.handler",
            "memorySize": 256,
            "timeout": 5,
            "customRuntimeConfig": {"command": ["python3", "server.py"], "port": 9000},
            "instanceLifecycleConfig": lifecycle,
            "code": {"zipFile": b64(&zip)},
        }))
        .await
        .unwrap_or_else(|e| panic!("create failed: {e}\n{}", dev.log_tail()));
    assert_eq!(created["instanceLifecycleConfig"], lifecycle);
    assert_eq!(
        c.get_function("hooked").await.unwrap()["instanceLifecycleConfig"],
        lifecycle
    );

    // Bad hook settings are refused and change nothing.
    let err = c
        .update_function(
            "hooked",
            &json!({"instanceLifecycleConfig": {"initializer": {"handler": "i", "timeout": 0}}}),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("InvalidArgument"), "{err}");
    assert_eq!(
        c.get_function("hooked").await.unwrap()["instanceLifecycleConfig"],
        lifecycle
    );

    // Three calls in a row on the one instance: the initializer ran once,
    // before the first of them.
    let mut rids = Vec::new();
    let mut lines = Vec::new();
    for _ in 0..3 {
        let r = c
            .invoke("hooked", Bytes::from_static(br#"{"hooks": true}"#), &[])
            .await
            .unwrap();
        assert_eq!(
            r.status,
            200,
            "{}\n{}",
            String::from_utf8_lossy(&r.body),
            dev.log_tail()
        );
        rids.push(r.header("x-fc-request-id").unwrap().to_owned());
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        lines = body["hooks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap().to_owned())
            .collect();
    }
    let kinds: Vec<&str> = lines.iter().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(
        kinds,
        ["initialize", "invoke", "invoke", "invoke"],
        "{lines:?}"
    );
    for (line, rid) in lines[1..].iter().zip(&rids) {
        assert_eq!(line.split(' ').nth(1), Some(rid.as_str()), "{lines:?}");
    }
    let init_id = lines[0].split(' ').nth(1).unwrap();
    assert!(!init_id.is_empty(), "{lines:?}");

    // A failing initializer fails the call as FC does: a function error
    // (HTTP 200, x-fc-error-type UnhandledInitializationError) whose body
    // names the InitializationError; the instance is discarded, so the
    // next call tries a fresh one (which fails the same way), each with an
    // initializer request id of its own.
    c.create_function(&json!({
        "functionName": "badinit",
        "runtime": "custom.debian12",
        "handler": "index.handler",
        "customRuntimeConfig": {"command": ["python3", "server.py"]},
        "environmentVariables": {"FAIL_INITIALIZER": "1"},
        "instanceLifecycleConfig": {"initializer": {"handler": "index.initialize"}},
        "code": {"zipFile": b64(&zip)},
    }))
    .await
    .unwrap();
    let mut init_ids = Vec::new();
    for _ in 0..2 {
        let r = c.invoke("badinit", Bytes::new(), &[]).await.unwrap();
        let body = String::from_utf8_lossy(&r.body).into_owned();
        assert_eq!(r.status, 200, "{body}");
        assert_eq!(
            r.header("x-fc-error-type"),
            Some("UnhandledInitializationError"),
            "{body}"
        );
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["errorType"], "InitializationError", "{body}");
        let message = v["errorMessage"].as_str().unwrap();
        assert!(message.contains("500"), "{body}");
        let call_id = r.header("x-fc-request-id").unwrap().to_owned();
        init_ids.push(call_id);
    }
    // Each failed initializer ran under a request id of its own (FC's
    // `FC Initialize Start RequestId:` id), not the caller's.
    let log = dev_log(&dev);
    let init_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("lifecycle hook failed") && l.contains("Initializer"))
        .collect();
    assert!(init_lines.len() >= 2, "{}", dev.log_tail());
    for call_id in &init_ids {
        assert!(
            !init_lines.iter().any(|l| l.contains(call_id.as_str())),
            "the initializer ran with the call's request id {call_id}"
        );
    }

    // Deleting the function releases its instance: PreStop runs first.
    c.delete_function("hooked").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = dev_log(&dev);
        if log
            .lines()
            .any(|l| l.contains("lifecycle hook succeeded") && l.contains("PreStop"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no PreStop after the function was deleted:\n{}",
            dev.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
