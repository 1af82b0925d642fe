//! The built-in runtimes (`python3.11`, `nodejs18` on Debian 12,
//! `python3.13`, `nodejs20` on Debian 13) end to end on `kiln dev` (runc
//! sandboxes, each release's shared tree with Kiln's bootstraps): a handler function echoes its event and reads its context
//! (request id, function metadata, its role's temporary credentials), its
//! initializer runs once per instance, an exception arrives in FC's error
//! shape, its logs carry FC's Start/End lines with the request id, and bad
//! handler strings are refused at CreateFunction/UpdateFunction without
//! changing anything.

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::Method;
use kiln::client::{ApiResponse, FcClient};
use serde_json::{json, Value};

use common::{curl, example_zip, Dev};

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

async fn logs(c: &FcClient, function: &str, query: &[(&str, &str)]) -> Vec<String> {
    let v = c
        .request(
            Method::GET,
            &format!("/2023-03-30/functions/{function}/logs"),
            query,
            &[],
            Bytes::new(),
        )
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .unwrap();
    v["logs"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|l| l["message"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// The function's log lines once one of them satisfies `pred` (or after
/// 10 s, for the assertion to show what there was).
async fn wait_for_line(
    c: &FcClient,
    function: &str,
    query: &[(&str, &str)],
    pred: impl Fn(&str) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let l = logs(c, function, query).await;
        if l.iter().any(|m| pred(m)) || Instant::now() > deadline {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn json_of(r: &ApiResponse) -> Value {
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&r.body)))
}

/// One language's runtime, example and the names its errors get.
struct Case {
    runtime: &'static str,
    example: &'static str,
    function: &'static str,
    /// The exception type the example raises for `{"fail": ...}`.
    error_type: &'static str,
    /// The file a stack frame of the function names.
    source: &'static str,
    /// The example's PreStop handler.
    pre_stop: &'static str,
}

const CASES: [Case; 4] = [
    Case {
        runtime: "python3.11",
        example: "python-hello",
        function: "py-hello",
        error_type: "ValueError",
        source: "index.py",
        pre_stop: "index.pre_stop",
    },
    Case {
        runtime: "nodejs18",
        example: "nodejs-hello",
        function: "js-hello",
        error_type: "RangeError",
        source: "index.js",
        pre_stop: "index.preStop",
    },
    // Debian 13's interpreters, the same examples unchanged.
    Case {
        runtime: "python3.13",
        example: "python-hello",
        function: "py13-hello",
        error_type: "ValueError",
        source: "index.py",
        pre_stop: "index.pre_stop",
    },
    Case {
        runtime: "nodejs20",
        example: "nodejs-hello",
        function: "js20-hello",
        error_type: "RangeError",
        source: "index.js",
        pre_stop: "index.preStop",
    },
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_nodejs_handlers_follow_fcs_event_handler_model() {
    if common::skip() {
        return;
    }
    let dev = Dev::start();
    let c = dev.client();
    let account = dev.creds.account_id.clone();

    // A role, for the context's temporary credentials.
    let policy = json!({"Version": "1", "Statement": [
        {"Effect": "Allow", "Action": ["fc:GetFunction"],
         "Resource": "acs:fc:*:*:functions/py-hello"}]});
    let r = c
        .request(
            Method::PUT,
            "/2023-03-30/roles/runner",
            &[],
            &[],
            Bytes::from(json!({"policy": policy}).to_string()),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let role = format!("acs:ram::{account}:role/runner");

    // `kiln runtimes` lists both, and says python3.11 is not FC's name.
    let out = dev.cli(&["runtimes"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("python3.11") && l.contains("python")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("nodejs18") && l.contains("nodejs")),
        "{table}"
    );
    assert!(
        table.contains("python3.11: not an FC runtime name"),
        "{table}"
    );
    assert!(
        table.contains("python3.13: not an FC runtime name"),
        "{table}"
    );
    assert!(
        !table.contains("nodejs20:") && !table.contains("nodejs18:"),
        "FC's own names get no note: {table}"
    );

    for case in &CASES {
        let name = case.function;
        let zip = example_zip(case.example);
        let doc = |handler: &str| {
            json!({
                "functionName": name,
                "runtime": case.runtime,
                "handler": handler,
                "memorySize": 256,
                "timeout": 10,
                "role": role,
                "instanceLifecycleConfig": {
                    "initializer": {"handler": "index.initialize", "timeout": 10},
                    "preStop": {"handler": case.pre_stop, "timeout": 5}},
                "code": {"zipFile": b64(&zip)},
            })
        };

        // Bad handler strings and a command are refused; nothing is created.
        for bad in ["index", "index.", "../index.handler", "/code/index.handler"] {
            let err = c.create_function(&doc(bad)).await.unwrap_err().to_string();
            assert!(
                err.contains("InvalidArgument") && err.contains("module.function"),
                "{}: {bad}: {err}",
                case.runtime
            );
            assert!(c.get_function(name).await.is_err(), "{bad} created {name}");
        }
        let mut with_command = doc("index.handler");
        with_command["customRuntimeConfig"] = json!({"command": ["/bin/sh"]});
        let err = c
            .create_function(&with_command)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("customRuntimeConfig"), "{err}");
        assert!(c.get_function(name).await.is_err());

        let created = c
            .create_function(&doc("index.handler"))
            .await
            .unwrap_or_else(|e| panic!("create {name} failed: {e}\n{}", dev.log_tail()));
        assert_eq!(created["runtime"], case.runtime);
        assert_eq!(created["handler"], "index.handler");

        // An update with a bad handler changes nothing.
        let err = c
            .update_function(name, &json!({"handler": "handler"}))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("InvalidArgument"), "{err}");
        assert_eq!(
            c.get_function(name).await.unwrap()["handler"],
            "index.handler"
        );

        // Two calls: the event echoed, the context's fields, and the
        // initializer ran once for both.
        let mut rids = Vec::new();
        for i in 0..2 {
            let event = json!({"n": i, "name": "Kiln"});
            let r = c
                .invoke(name, Bytes::from(event.to_string()), &[])
                .await
                .unwrap();
            assert_eq!(
                r.status,
                200,
                "{}: {}\n{}",
                case.runtime,
                String::from_utf8_lossy(&r.body),
                dev.log_tail()
            );
            assert!(r.header("x-fc-error-type").is_none());
            let rid = r.header("x-fc-request-id").unwrap().to_owned();
            let v = json_of(&r);
            assert_eq!(v["event"], event, "{v}");
            assert_eq!(v["requestId"], rid.as_str(), "{v}");
            assert_eq!(v["function"]["name"], name, "{v}");
            assert_eq!(v["function"]["handler"], "index.handler", "{v}");
            assert_eq!(v["function"]["memory"], 256, "{v}");
            assert_eq!(v["function"]["timeout"], 10, "{v}");
            assert_eq!(v["accountId"], account.as_str(), "{v}");
            assert_eq!(v["hasCredentials"], true, "{v}");
            assert_eq!(v["initializerRuns"], 1, "{}: call {i}: {v}", case.runtime);
            if case.runtime.starts_with("nodejs") {
                assert_eq!(v["isBuffer"], true, "the event is a Buffer: {v}");
            }
            rids.push(rid);
        }

        // Through an HTTP trigger: FC 3.0's HTTP event in (method, path,
        // query, headers without FC's own, body), the handler's answer out,
        // in FC's response shape when it uses it.
        let t: Value = c
            .request(
                Method::POST,
                &format!("/2023-03-30/functions/{name}/triggers"),
                &[],
                &[],
                Bytes::from(
                    json!({"triggerName": "web", "triggerType": "http",
                        "triggerConfig": json!({"authType": "anonymous",
                            "methods": ["GET", "POST"]}).to_string()})
                    .to_string(),
                ),
            )
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .unwrap();
        let url = t["httpTrigger"]["urlInternet"].as_str().unwrap().to_owned();
        let (status, head, body) = curl(
            &dev.creds.ca_cert,
            &[
                "-X",
                "POST",
                "-H",
                "x-custom: 7",
                "--data-binary",
                "hello",
                &format!("{url}/some/path?q=1&r=two"),
            ],
        );
        assert_eq!(
            status,
            200,
            "{}: {head}\n{}",
            case.runtime,
            String::from_utf8_lossy(&body)
        );
        let v: Value = serde_json::from_slice(&body).unwrap();
        let e = &v["event"];
        assert_eq!(e["version"], "v1", "{v}");
        assert_eq!(e["rawPath"], "/some/path", "{v}");
        assert_eq!(e["body"], "hello", "{v}");
        assert_eq!(e["isBase64Encoded"], false, "{v}");
        assert_eq!(e["queryParameters"], json!({"q": "1", "r": "two"}), "{v}");
        assert_eq!(e["headers"]["x-custom"], "7", "{v}");
        assert_eq!(e["requestContext"]["http"]["method"], "POST", "{v}");
        assert_eq!(e["requestContext"]["http"]["path"], "/some/path", "{v}");
        assert_eq!(e["requestContext"]["accountId"], account.as_str(), "{v}");
        assert_eq!(e["requestContext"]["requestId"], v["requestId"], "{v}");
        let host = url.trim_start_matches("https://");
        assert_eq!(
            e["requestContext"]["domainName"], host,
            "the name the caller used: {v}"
        );
        assert!(
            e["headers"]
                .as_object()
                .unwrap()
                .keys()
                .all(|k| !k.starts_with("x-fc-")),
            "FC's own headers (credentials among them) stay out of the event: {v}"
        );
        let (status, head, body) = curl(&dev.creds.ca_cert, &[&format!("{url}/shaped")]);
        assert_eq!(
            (status, body.as_slice()),
            (201, &b"shaped"[..]),
            "{}: {head}",
            case.runtime
        );
        assert!(head.contains("x-shaped: yes"), "{head}");
        c.request(
            Method::DELETE,
            &format!("/2023-03-30/functions/{name}/triggers/web"),
            &[],
            &[],
            Bytes::new(),
        )
        .await
        .unwrap()
        .error_for_status()
        .unwrap();

        // An uncaught exception: FC's error body and header.
        let r = c
            .invoke(
                name,
                Bytes::from_static(br#"{"fail": "no such thing"}"#),
                &[],
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(
            r.header("x-fc-error-type"),
            Some("UnhandledInvocationError")
        );
        let v = json_of(&r);
        assert_eq!(v["errorMessage"], "no such thing", "{v}");
        assert_eq!(v["errorType"], case.error_type, "{v}");
        let stack = v["stackTrace"].as_array().expect("a stack trace");
        assert!(
            stack
                .iter()
                .any(|f| f.as_str().unwrap_or("").contains(case.source)),
            "{v}"
        );
        assert!(
            !stack
                .iter()
                .any(|f| f.as_str().unwrap_or("").contains("bootstrap")),
            "the bootstrap's own frames are left out: {v}"
        );
        // The instance took the error in its stride: the next call is warm
        // and the initializer did not run again.
        let r = c
            .invoke(name, Bytes::from_static(b"{}"), &[])
            .await
            .unwrap();
        assert_eq!(json_of(&r)["initializerRuns"], 1);

        // Logs: FC's Start/End lines with the request id around the
        // function's own line, and the initializer's framing.
        let rid = rids[0].as_str();
        let lines = wait_for_line(&c, name, &[("requestId", rid)], |m| {
            m.starts_with("FC Invoke End RequestId:")
        })
        .await;
        assert_eq!(
            lines.first().map(String::as_str),
            Some(format!("FC Invoke Start RequestId: {rid}").as_str()),
            "{lines:?}"
        );
        assert_eq!(
            lines.last().map(String::as_str),
            Some(format!("FC Invoke End RequestId: {rid}").as_str()),
            "{lines:?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains(rid) && l.contains(&format!("hello from {name}"))),
            "{lines:?}"
        );
        // `kiln logs` shows the same call's lines.
        let out = dev.cli(&["logs", name, "--request-id", rid]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        for want in [
            format!("FC Invoke Start RequestId: {rid}"),
            format!("hello from {name}"),
            format!("FC Invoke End RequestId: {rid}"),
        ] {
            assert!(text.contains(&want), "{want} in:\n{text}");
        }
        let all = wait_for_line(&c, name, &[], |m| m.starts_with("FC Initialize End")).await;
        let starts = all
            .iter()
            .filter(|l| l.starts_with("FC Initialize Start RequestId: "))
            .count();
        assert_eq!(starts, 1, "one initializer per instance: {all:?}");
        assert!(all.iter().any(|l| l.contains("initializer ran")), "{all:?}");

        // A handler that names a function the module lacks fails the call
        // with a clear FC error (and a new revision, so a new instance).
        c.update_function(name, &json!({"handler": "index.nothere"}))
            .await
            .unwrap();
        let r = c
            .invoke(name, Bytes::from_static(b"{}"), &[])
            .await
            .unwrap();
        assert_eq!(
            r.header("x-fc-error-type"),
            Some("UnhandledInvocationError"),
            "{}",
            String::from_utf8_lossy(&r.body)
        );
        let v = json_of(&r);
        assert_eq!(v["errorType"], "HandlerNotFound", "{v}");
        assert!(
            v["errorMessage"].as_str().unwrap().contains("nothere"),
            "{v}"
        );
        // ... and one naming a module that is not there likewise.
        c.update_function(name, &json!({"handler": "missing.handler"}))
            .await
            .unwrap();
        let r = c
            .invoke(name, Bytes::from_static(b"{}"), &[])
            .await
            .unwrap();
        let v = json_of(&r);
        assert_eq!(v["errorType"], "ImportModuleError", "{v}");
        assert!(
            v["errorMessage"].as_str().unwrap().contains("missing"),
            "{v}"
        );
    }

    // Node.js's callback form answers like the async one.
    c.update_function("js-hello", &json!({"handler": "index.callbackHandler"}))
        .await
        .unwrap();
    let r = c
        .invoke("js-hello", Bytes::from_static(br#"{"cb": 1}"#), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = json_of(&r);
    assert_eq!(v["event"]["cb"], 1, "{v}");
    assert_eq!(v["requestId"], r.header("x-fc-request-id").unwrap(), "{v}");
    let r = c
        .invoke(
            "js-hello",
            Bytes::from_static(br#"{"fail": "by callback"}"#),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        r.header("x-fc-error-type"),
        Some("UnhandledInvocationError")
    );
    assert_eq!(json_of(&r)["errorMessage"], "by callback");

    // Deleting the functions releases their instances: each answers its
    // PreStop hook (the bootstraps call pre_stop / preStop) before it goes.
    for case in &CASES {
        c.delete_function(case.function).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = std::fs::read_to_string(dev.state.path().join("dev.log")).unwrap_or_default();
        let hooks = |outcome: &str| {
            log.lines()
                .filter(|l| l.contains(outcome) && l.contains("PreStop"))
                .count()
        };
        assert_eq!(hooks("lifecycle hook failed"), 0, "{}", dev.log_tail());
        if hooks("lifecycle hook succeeded") >= CASES.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "PreStop did not run on every instance:\n{}",
            dev.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
