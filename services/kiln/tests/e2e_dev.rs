//! `kiln dev` end to end: signed HTTPS API -> gateway -> scheduler -> agent
//! -> runc sandbox -> function, and back.

mod common;

use base64::Engine;
use bytes::Bytes;
use serde_json::{json, Value};

use common::{example_zip, Dev};

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_cluster_runs_a_python_function_end_to_end() {
    if common::skip() {
        return;
    }
    let dev = Dev::start();
    let c = dev.client();
    let zip = example_zip("hello-python");
    let created = c
        .create_function(&json!({
            "functionName": "hello",
            "runtime": "custom.debian12",
            "handler": "index.handler",
            "memorySize": 256,
            "timeout": 5,
            "customRuntimeConfig": {"command": ["python3", "server.py"], "port": 9000},
            "environmentVariables": {"GREETING": "hi"},
            "code": {"zipFile": b64(&zip)},
        }))
        .await
        .unwrap_or_else(|e| panic!("create failed: {e}\n{}", dev.log_tail()));
    assert_eq!(created["functionName"], "hello");
    assert_eq!(created["codeSize"], json!(zip.len()));
    assert!(created["codeChecksum"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));

    // A successful call: FC's headers reach the function, its answer comes back.
    let r = c
        .invoke("hello", Bytes::from_static(br#"{"x": 1}"#), &[])
        .await
        .unwrap();
    assert_eq!(
        r.status,
        200,
        "{}\n{}",
        String::from_utf8_lossy(&r.body),
        dev.log_tail()
    );
    let rid = r
        .header("x-fc-request-id")
        .expect("x-fc-request-id")
        .to_owned();
    assert!(r.header("x-fc-error-type").is_none());
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["requestId"], json!(rid));
    assert_eq!(body["functionName"], "hello");
    assert_eq!(body["memory"], "256");
    assert_eq!(body["env"], "hi");
    assert_eq!(body["echo"], r#"{"x": 1}"#);

    // A function error carries x-fc-error-type and the function's body.
    let r = c
        .invoke("hello", Bytes::from_static(br#"{"fail": true}"#), &[])
        .await
        .unwrap();
    assert!(
        r.header("x-fc-error-type").is_some(),
        "no x-fc-error-type: {r:?}"
    );
    assert!(r.header("x-fc-request-id").is_some());
    assert!(String::from_utf8_lossy(&r.body).contains("failed on demand"));

    // A crash is an unhandled error; the next call gets a fresh instance.
    let r = c
        .invoke("hello", Bytes::from_static(br#"{"crash": true}"#), &[])
        .await
        .unwrap();
    assert!(
        r.header("x-fc-error-type").is_some(),
        "crash not reported: {r:?}"
    );
    let r = c.invoke("hello", Bytes::new(), &[]).await.unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    // The code is read-only below the overlay: a write to /code stays in
    // the instance, a write to the runtime root filesystem fails.
    let r = c
        .invoke(
            "hello",
            Bytes::from_static(br#"{"write": "/code/scratch"}"#),
            &[],
        )
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["wrote"], true, "{body}");
    let r = c
        .invoke("hello", Bytes::from_static(br#"{"write": "/usr/x"}"#), &[])
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["wrote"], false, "{body}");

    // Update: new calls see the new configuration.
    let updated = c
        .update_function(
            "hello",
            &json!({"environmentVariables": {"GREETING": "bonjour"}}),
        )
        .await
        .unwrap();
    assert_eq!(updated["environmentVariables"]["GREETING"], "bonjour");
    let r = c.invoke("hello", Bytes::new(), &[]).await.unwrap();
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["env"], "bonjour");

    // Unknown function: FC's error shape.
    let r = c.invoke("nope", Bytes::new(), &[]).await.unwrap();
    assert_eq!(r.status, 404);
    let e: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(e["Code"], "FunctionNotFound");
    assert_eq!(e["RequestId"], json!(r.header("x-fc-request-id").unwrap()));

    let listed = c.list_functions(Some("hel")).await.unwrap();
    assert_eq!(listed.len(), 1);
    c.delete_function("hello").await.unwrap();
    let err = c.get_function("hello").await.unwrap_err().to_string();
    assert!(err.contains("FunctionNotFound"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_binary_runs_on_the_empty_custom_runtime() {
    if common::skip() {
        return;
    }
    let code = tempfile::tempdir().unwrap();
    common::build_static_echo(code.path());
    let zip = kiln::zipdir::zip_dir(code.path()).unwrap();
    let dev = Dev::start();
    let c = dev.client();
    c.create_function(&json!({
        "functionName": "echo",
        "runtime": "custom",
        "handler": "main",
        "memorySize": 128,
        "customRuntimeConfig": {"command": ["/code/server"]},
        "code": {"zipFile": b64(&zip)},
    }))
    .await
    .unwrap();
    let r = c
        .invoke("echo", Bytes::from_static(b"ping"), &[])
        .await
        .unwrap();
    assert_eq!(
        r.status,
        200,
        "{}\n{}",
        String::from_utf8_lossy(&r.body),
        dev.log_tail()
    );
    assert_eq!(&r.body[..], b"ping");
    assert_eq!(
        r.header("x-echo-request-id"),
        r.header("x-fc-request-id"),
        "the function must see the call's request id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_deploys_invokes_lists_and_deletes() {
    if common::skip() {
        return;
    }
    let dev = Dev::start();
    let example = common::repo_root().join("examples/hello-python");
    let out = dev.cli(&[
        "deploy",
        example.to_str().unwrap(),
        "--name",
        "clihello",
        "--memory",
        "256",
        "--env",
        "GREETING=from-cli",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = dev.cli(&["invoke", "clihello", "--data", "abc"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        dev.log_tail()
    );
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["env"], "from-cli");
    assert_eq!(body["echo"], "abc");
    // Deploying again updates in place.
    let out = dev.cli(&[
        "deploy",
        example.to_str().unwrap(),
        "--name",
        "clihello",
        "--concurrency",
        "5",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = dev.cli(&["functions", "get", "clihello"]);
    let f: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(f["instanceConcurrency"], 5);
    let out = dev.cli(&["functions", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("clihello"));
    let out = dev.cli(&["functions", "delete", "clihello"]);
    assert!(out.status.success());
    let out = dev.cli(&["invoke", "clihello"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("FunctionNotFound"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_over_its_memory_is_killed_and_replaced() {
    if common::skip() {
        return;
    }
    let dev = Dev::start();
    let c = dev.client();
    c.create_function(&json!({
        "functionName": "hungry",
        "runtime": "custom.debian12",
        "handler": "index.handler",
        "memorySize": 128,
        "customRuntimeConfig": {"command": ["python3", "server.py"]},
        "code": {"zipFile": b64(&example_zip("hello-python"))},
    }))
    .await
    .unwrap();
    // Within the limit: fine.
    let r = c
        .invoke("hungry", Bytes::from_static(br#"{"alloc": 16}"#), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.header("x-fc-error-type").is_none());
    // Three times the limit: the kernel kills the process, the call gets
    // FC's unhandled error, and the instance is replaced.
    let r = c
        .invoke("hungry", Bytes::from_static(br#"{"alloc": 400}"#), &[])
        .await
        .unwrap();
    assert_eq!(
        r.header("x-fc-error-type"),
        Some("UnhandledInvocationError"),
        "{} {}\n{}",
        r.status,
        String::from_utf8_lossy(&r.body),
        dev.log_tail()
    );
    let r = c.invoke("hungry", Bytes::new(), &[]).await.unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.header("x-fc-error-type").is_none());
}

/// The s.yaml example deploys with `kiln deploy -f` and runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_s_yaml_example_deploys_and_runs() {
    if common::skip() {
        return;
    }
    let dev = Dev::start();
    let project = common::repo_root().join("examples/s-yaml/s.yaml");
    let out = dev.cli(&["deploy", "-f", project.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = dev.cli(&["invoke", "s-hello", "--data", "from-yaml"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        dev.log_tail()
    );
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["echo"], "from-yaml");
    assert_eq!(body["env"], "hello from s.yaml");
}
