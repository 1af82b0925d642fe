//! Function logs and instance login end to end on `kiln dev` (runc
//! sandboxes): lines attributed to the right call with concurrent calls on
//! one instance, FC's Tail, crash, timeout and OOM causes, logs that outlive the
//! instance, `kiln logs` (also --follow); ListInstances and InstanceExec
//! (`kiln instances`, `kiln exec`) inside the instance's namespaces, audited,
//! refused for an unknown instance and for a caller whose key does not
//! sign, with nothing changed.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::Method;
use serde_json::{json, Value};

use common::{example_zip, Dev};

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

async fn logs(c: &kiln::client::FcClient, query: &[(&str, &str)]) -> Vec<Value> {
    let v = c
        .request(
            Method::GET,
            "/2023-03-30/functions/logged/logs",
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
    v["logs"].as_array().cloned().unwrap_or_default()
}

fn messages(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l["message"].as_str().unwrap_or("").to_owned())
        .collect()
}

async fn instances(c: &kiln::client::FcClient) -> Vec<Value> {
    let v = c
        .request(
            Method::GET,
            "/2023-03-30/functions/logged/instances",
            &[],
            &[],
            Bytes::new(),
        )
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .unwrap();
    assert!(v["requestId"].is_string(), "{v}");
    v["instances"].as_array().cloned().unwrap_or_default()
}

/// Wait until the function's log has a line matching `pred`.
async fn wait_for_line(
    c: &kiln::client::FcClient,
    query: &[(&str, &str)],
    pred: impl Fn(&str) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let l = logs(c, query).await;
        if messages(&l).iter().any(|m| pred(m)) || Instant::now() > deadline {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_attributed_kept_and_served_and_exec_runs_inside_the_instance() {
    if common::skip() {
        return;
    }
    let dev = Dev::start();
    let c = dev.client();
    c.create_function(&json!({
        "functionName": "logged",
        "runtime": "custom.debian12",
        "handler": "index.handler",
        "memorySize": 256,
        "timeout": 3,
        "instanceConcurrency": 4,
        "customRuntimeConfig": {"command": ["python3", "server.py"], "port": 9000},
        "code": {"zipFile": b64(&example_zip("hello-python"))},
    }))
    .await
    .unwrap_or_else(|e| panic!("create failed: {e}\n{}", dev.log_tail()));
    let warm = c
        .invoke("logged", Bytes::from_static(b"{}"), &[])
        .await
        .unwrap();
    assert_eq!(warm.status, 200, "{}", dev.log_tail());

    // Two calls at once on the one instance, each logging as it goes, with
    // FC's Tail.
    let call = |c: kiln::client::FcClient| async move {
        c.invoke(
            "logged",
            Bytes::from_static(br#"{"log": 6, "every": 0.15}"#),
            &[("x-fc-log-type", "Tail")],
        )
        .await
        .unwrap()
    };
    let (a, b) = tokio::join!(call(c.clone()), call(c.clone()));
    let rid = |r: &kiln::client::ApiResponse| r.header("x-fc-request-id").unwrap().to_owned();
    let (rid_a, rid_b) = (rid(&a), rid(&b));
    for (r, mine, other) in [(&a, &rid_a, &rid_b), (&b, &rid_b, &rid_a)] {
        assert_eq!(r.status, 200);
        let tail = base64::engine::general_purpose::STANDARD
            .decode(
                r.header("x-fc-log-result")
                    .expect("a Tail answer has x-fc-log-result"),
            )
            .unwrap();
        let tail = String::from_utf8(tail).unwrap();
        let lines: Vec<&str> = tail.lines().collect();
        assert_eq!(
            lines.first(),
            Some(&format!("FC Invoke Start RequestId: {mine}").as_str()),
            "{tail}"
        );
        assert_eq!(
            lines.last(),
            Some(&format!("FC Invoke End RequestId: {mine}").as_str()),
            "{tail}"
        );
        assert_eq!(
            lines.iter().filter(|l| l.contains("[INFO] line")).count(),
            6,
            "{tail}"
        );
        assert!(lines.iter().all(|l| l.contains(mine.as_str())), "{tail}");
        assert!(!tail.contains(other.as_str()), "{tail}");
    }
    // A call without Tail gets no log result.
    let plain = c
        .invoke("logged", Bytes::from_static(b"{}"), &[])
        .await
        .unwrap();
    assert!(plain.header("x-fc-log-result").is_none());
    // A bad log type is refused.
    let bad = c
        .invoke(
            "logged",
            Bytes::from_static(b"{}"),
            &[("x-fc-log-type", "Everything")],
        )
        .await
        .unwrap();
    assert_eq!(bad.status, 400);

    // The API: each call's lines under its request id, one instance.
    let only_a = logs(&c, &[("requestId", &rid_a)]).await;
    // Start, "handling", six lines, End.
    assert_eq!(only_a.len(), 9, "{only_a:?}");
    assert!(only_a.iter().all(|l| l["requestId"] == rid_a.as_str()));
    let only_b = logs(&c, &[("requestId", &rid_b)]).await;
    assert_eq!(only_b.len(), 9, "{only_b:?}");
    assert_eq!(
        only_a[0]["instanceId"], only_b[0]["instanceId"],
        "both calls on one instance"
    );
    let instance = only_a[0]["instanceId"].as_str().unwrap().to_owned();

    // ListInstances, FC's shape.
    let listed = instances(&c).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["instanceId"], instance.as_str());
    assert_eq!(listed[0]["status"], "Running");
    assert!(listed[0]["createdTimeMs"].as_u64().unwrap() > 0);

    // InstanceExec: inside the instance's namespaces, its files only.
    let out = dev.cli(&["exec", "logged", &instance, "--", "cat", "/proc/1/cmdline"]);
    let cmdline = String::from_utf8_lossy(&out.stdout).replace('\0', " ");
    assert!(out.status.success(), "{out:?}");
    assert!(
        cmdline.contains("python3") && cmdline.contains("server.py"),
        "{cmdline}"
    );
    let out = dev.cli(&["exec", "logged", &instance, "--", "ls", "/code"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("server.py"),
        "{out:?}"
    );
    let host_only = dev.state.path().join("credentials.json");
    let out = dev.cli(&[
        "exec",
        "logged",
        &instance,
        "--",
        "cat",
        host_only.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the host's file is not there: {out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No such file"),
        "{out:?}"
    );
    // stdin reaches the command and its end closes it.
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--credentials")
        .arg(&dev.creds_path)
        .args([
            "exec",
            "logged",
            &instance,
            "--",
            "sh",
            "-c",
            "read x; echo got:$x; exit 4",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "got:hello\n");

    // A terminal session: an interactive shell reading its commands.
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--credentials")
        .arg(&dev.creds_path)
        .args(["exec", "--tty", "logged", &instance, "--", "/bin/sh"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"test -t 0 && echo is-a-terminal; exit 3\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("is-a-terminal"),
        "{out:?}"
    );

    // Unknown instance: FC's error, nothing changes.
    let out = dev.cli(&["exec", "logged", "i-does-not-exist", "--", "ls"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("InstanceNotFound"),
        "{out:?}"
    );
    // A caller whose key does not sign is refused before anything runs.
    let mut forged = dev.creds.clone();
    forged.access_key_secret = "not-the-secret".into();
    let forged_path = dev.state.path().join("forged.json");
    std::fs::write(&forged_path, serde_json::to_vec(&forged).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--credentials")
        .arg(&forged_path)
        .args(["exec", "logged", &instance, "--", "touch", "/tmp/forged"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("403"),
        "{out:?}"
    );
    let out = dev.cli(&["exec", "logged", &instance, "--", "ls", "/tmp/forged"]);
    assert!(
        !out.status.success(),
        "the refused command did not run: {out:?}"
    );
    assert_eq!(instances(&c).await.len(), 1);

    // Authorization by operation: temporary credentials of a role that may
    // list instances but not exec are refused (AccessDenied) before
    // anything starts; a role that may exec gets past authorization (to
    // the WebSocket check, since this request does not upgrade).
    let account = dev.creds.account_id.clone();
    let role_creds = |name: &'static str, actions: Value| {
        let c = c.clone();
        let account = account.clone();
        async move {
            let policy = json!({"Version": "1", "Statement": [
                {"Effect": "Allow", "Action": actions,
                 "Resource": "acs:fc:*:*:functions/logged"}]});
            let r = c
                .request(
                    Method::PUT,
                    &format!("/2023-03-30/roles/{name}"),
                    &[],
                    &[],
                    Bytes::from(json!({ "policy": policy }).to_string()),
                )
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            let function = format!("{name}-fn");
            c.create_function(&json!({
                "functionName": function,
                "runtime": "custom.debian12",
                "handler": "index.handler",
                "memorySize": 128,
                "timeout": 10,
                "role": format!("acs:ram::{account}:role/{name}"),
                "customRuntimeConfig": {"command": ["python3", "server.py"], "port": 9000},
                "code": {"zipFile": b64(&example_zip("sts-python"))},
            }))
            .await
            .unwrap();
            let r = c
                .invoke(&function, Bytes::from_static(b"{}"), &[])
                .await
                .unwrap();
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            let s = |k: &str| v["env"][k].as_str().unwrap().to_owned();
            (s("accessKeyId"), s("accessKeySecret"), s("securityToken"))
        }
    };
    let as_role = |creds: &(String, String, String), path: String| {
        let mut k = dev.creds.clone();
        k.access_key_id = creds.0.clone();
        k.access_key_secret = creds.1.clone();
        let token = creds.2.clone();
        async move {
            kiln::client::FcClient::new(k)
                .unwrap()
                .request(
                    Method::GET,
                    &path,
                    &[("command", "ls")],
                    &[("x-acs-security-token", token.as_str())],
                    Bytes::new(),
                )
                .await
                .unwrap()
        }
    };
    let exec_path = format!("/2023-03-30/functions/logged/instances/{instance}/exec");
    let lister = role_creds("lister", json!(["fc:ListInstances"])).await;
    let r = as_role(&lister, "/2023-03-30/functions/logged/instances".into()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = as_role(&lister, exec_path.clone()).await;
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json().unwrap()["Code"], "AccessDenied");
    let operator = role_creds("operator", json!(["fc:InstanceExec"])).await;
    let r = as_role(&operator, exec_path).await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("WebSocket"));

    // Every session is audited in the function's log, the refused ones not.
    let audit = wait_for_line(&c, &[], |m| m.contains("ls /tmp/forged")).await;
    let audit: Vec<String> = messages(&audit)
        .into_iter()
        .filter(|m| m.starts_with("Exec session"))
        .collect();
    assert!(
        audit.iter().any(|m| m.starts_with("Exec session ended")
            && m.contains("cat /proc/1/cmdline")
            && m.contains("exit code 0")
            && m.contains(&instance)
            && m.contains(&dev.creds.access_key_id)),
        "{audit:?}"
    );
    assert!(audit.iter().any(|m| m.contains("exit code 4")), "{audit:?}");
    assert!(
        !audit.iter().any(|m| m.contains("touch /tmp/forged")),
        "{audit:?}"
    );

    // `kiln logs --request-id` prints that call's lines only.
    let out = dev.cli(&["logs", "logged", "--request-id", &rid_a]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text.lines().count(), 9, "{text}");
    assert!(!text.contains(&rid_b), "{text}");

    // --follow prints a call made after it started.
    let mut follow = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--credentials")
        .arg(&dev.creds_path)
        .args(["logs", "logged", "--follow"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = c
        .invoke("logged", Bytes::from_static(br#"{"log": 1}"#), &[])
        .await
        .unwrap();
    let rid_later = rid(&later);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    common::terminate(&mut follow, Duration::from_secs(2));
    let mut followed = String::new();
    follow
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut followed)
        .unwrap();
    assert!(
        followed.contains(&format!("FC Invoke End RequestId: {rid_later}")),
        "{followed}"
    );

    // A crash and a timeout are recorded with their cause; the logs of the
    // instances they took down stay.
    let crashed = c
        .invoke("logged", Bytes::from_static(br#"{"crash": true}"#), &[])
        .await
        .unwrap();
    let rid_crash = rid(&crashed);
    let crash_lines = messages(&logs(&c, &[("requestId", &rid_crash)]).await);
    assert!(
        crash_lines
            .iter()
            .any(|m| m.starts_with("Error: Process exited unexpectedly")),
        "{crash_lines:?}"
    );
    let timed = c
        .invoke("logged", Bytes::from_static(br#"{"sleep": 10}"#), &[])
        .await
        .unwrap();
    let rid_timeout = rid(&timed);
    let timeout_lines = messages(&logs(&c, &[("requestId", &rid_timeout)]).await);
    assert!(
        timeout_lines.contains(&"Error: Function timed out after 3 seconds".to_owned()),
        "{timeout_lines:?}"
    );
    assert_eq!(
        timeout_lines.last().unwrap(),
        &format!("FC Invoke End RequestId: {rid_timeout}")
    );
    let oom = c
        .invoke("logged", Bytes::from_static(br#"{"alloc": 400}"#), &[])
        .await
        .unwrap();
    let rid_oom = rid(&oom);
    let oom_lines = messages(&logs(&c, &[("requestId", &rid_oom)]).await);
    assert!(
        oom_lines
            .iter()
            .any(|m| m.starts_with("Error:") && m.contains("exceeded its memory limit of 256 MB")),
        "{oom_lines:?}"
    );
    let all = wait_for_line(&c, &[], |m| {
        m.contains("failed (") && m.contains("replaced")
    })
    .await;
    assert!(
        messages(&all)
            .iter()
            .any(|m| m.contains(&format!("Instance {instance} failed"))),
        "{:?}",
        messages(&all)
    );
    // The first instance is gone; its calls' lines are still served.
    assert_eq!(logs(&c, &[("requestId", &rid_a)]).await.len(), 9);
    assert!(instances(&c)
        .await
        .iter()
        .all(|i| i["instanceId"] != instance.as_str()));

    // Bad queries: FC's error shape.
    let bad = c
        .request(
            Method::GET,
            "/2023-03-30/functions/logged/logs",
            &[("limit", "0")],
            &[],
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json().unwrap()["Code"], "InvalidArgument");
    let missing = c
        .request(
            Method::GET,
            "/2023-03-30/functions/nope/logs",
            &[],
            &[],
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(missing.json().unwrap()["Code"], "FunctionNotFound");
}
