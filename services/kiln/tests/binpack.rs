//! 200 concurrent calls that each take 0.5 s, on a function with
//! instanceConcurrency 10, all succeed on about 20 instances.

mod common;

use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use kiln_internal_api::{InstanceInfo, InternalClient};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_slow_calls_pack_onto_about_twenty_instances() {
    if common::skip() {
        return;
    }
    let dev = common::Dev::start();
    let c = Arc::new(dev.client());
    let zip = common::example_zip("hello-python");
    c.create_function(&json!({
        "functionName": "slow",
        "runtime": "custom.debian12",
        "handler": "index.handler",
        "memorySize": 128,
        "instanceConcurrency": 10,
        "timeout": 30,
        "customRuntimeConfig": {"command": ["python3", "server.py"]},
        "code": {"zipFile": base64::engine::general_purpose::STANDARD.encode(&zip)},
    }))
    .await
    .unwrap();

    let mut calls = Vec::new();
    for _ in 0..200 {
        let c = c.clone();
        calls.push(tokio::spawn(async move {
            c.invoke("slow", Bytes::from_static(br#"{"sleep": 0.5}"#), &[])
                .await
        }));
    }
    let mut ok = 0;
    let mut failures = Vec::new();
    for call in calls {
        match call.await.unwrap() {
            Ok(r) if r.status == 200 && r.header("x-fc-error-type").is_none() => ok += 1,
            Ok(r) => failures.push(format!("{} {}", r.status, String::from_utf8_lossy(&r.body))),
            Err(e) => failures.push(e.to_string()),
        }
    }
    assert_eq!(ok, 200, "failures: {failures:?}\n{}", dev.log_tail());

    // Ask the scheduler how many instances served them.
    let cluster: Value = serde_json::from_str(
        &std::fs::read_to_string(dev.state.path().join("cluster.json")).unwrap(),
    )
    .unwrap();
    let operator = kiln_pki::DevPki::files_in(&dev.state.path().join("pki"), "operator");
    let client = InternalClient::new(&operator).unwrap();
    let instances: Vec<InstanceInfo> = client
        .get(
            cluster["schedulerUrl"].as_str().unwrap(),
            kiln_internal_api::paths::SCHEDULER_INSTANCES,
        )
        .await
        .unwrap();
    let n = instances
        .iter()
        .filter(|i| i.function_name.as_str() == "slow")
        .count();
    eprintln!("200 concurrent calls were served by {n} instances");
    assert!(
        (20..=30).contains(&n),
        "expected about 20 instances for 200 calls at concurrency 10, got {n}"
    );
}
