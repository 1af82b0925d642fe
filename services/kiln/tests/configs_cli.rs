//! `kiln provision put|get|list|delete` and `kiln concurrency
//! put|get|list|delete` against a real gateway and a real scheduler (in
//! this process, no node): no root, no sandbox.

mod common;

use std::process::Output;

use base64::Engine;
use kiln_pki::DevPki;
use serde_json::{json, Value};

const ACCOUNT: &str = "1000000000000002";
const AK: &str = "AKCLI00000000002";
const SK: &str = "secret-of-the-cli-test-002";

fn kiln(creds: &std::path::Path, args: &[String]) -> Output {
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

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_manages_provision_and_concurrency_configs() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let sched = common::loopback_scheduler(dir.path(), &pki).await;
    let (gw, creds_path, client) = common::cli_gateway(
        dir.path(),
        &pki,
        &format!("https://127.0.0.1:{}", sched.addr().port()),
        (ACCOUNT, AK, SK),
    )
    .await;
    let zip = common::one_file_zip("app.py", b"print('hi')\n");
    for name in ["web", "job"] {
        client
            .create_function(&json!({
                "functionName": name,
                "runtime": "custom.debian12",
                "handler": "index.handler",
                "customRuntimeConfig": {"command": ["python3", "/code/app.py"], "port": 9000},
                "code": {"zipFile": base64::engine::general_purpose::STANDARD.encode(&zip)},
            }))
            .await
            .unwrap();
    }

    let c = creds_path.clone();
    let run = move |args: &[&str]| {
        let c = c.clone();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        async move {
            tokio::task::spawn_blocking(move || kiln(&c, &args))
                .await
                .unwrap()
        }
    };
    let ok_json = |o: Output| -> Value {
        assert!(o.status.success(), "{o:?}");
        serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| panic!("{e}: {o:?}"))
    };

    // ---- provision ----
    // FC's default: alwaysAllocateCPU true when not given.
    let v = ok_json(run(&["provision", "put", "web", "--target", "2"]).await);
    assert_eq!(v["defaultTarget"], 2);
    assert_eq!(v["alwaysAllocateCPU"], true);
    assert_eq!(
        v["functionArn"],
        format!("acs:fc:cn-test:{ACCOUNT}:functions/web")
    );
    // A file of FC's input, with the flags on top.
    let file = dir.path().join("provision.json");
    std::fs::write(
        &file,
        json!({
            "target": 1,
            "scheduledActions": [{
                "name": "morning", "scheduleExpression": "cron(0 0 8 * * *)",
                "target": 3, "timeZone": "Asia/Shanghai"
            }]
        })
        .to_string(),
    )
    .unwrap();
    let v = ok_json(
        run(&[
            "provision",
            "put",
            "job",
            "--file",
            file.to_str().unwrap(),
            "--always-allocate-cpu",
            "false",
        ])
        .await,
    );
    assert_eq!(v["alwaysAllocateCPU"], false);
    assert_eq!(v["scheduledActions"][0]["timeZone"], "Asia/Shanghai");
    let got = ok_json(run(&["provision", "get", "job"]).await);
    assert_eq!(got["defaultTarget"], 1);
    assert_eq!(got["alwaysAllocateCPU"], false);
    assert_eq!(got["scheduledActions"], v["scheduledActions"]);

    let listed = ok_json(run(&["provision", "list", "--json"]).await);
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            c["functionArn"]
                .as_str()
                .unwrap()
                .rsplit('/')
                .next()
                .unwrap()
        })
        .collect();
    assert_eq!(names, vec!["job", "web"]);
    let only = ok_json(run(&["provision", "list", "--function", "web", "--json"]).await);
    assert_eq!(only.as_array().unwrap().len(), 1);
    // `-o json` is `--json`; `-o table` the default; anything else refused.
    let same = ok_json(run(&["provision", "list", "--function", "web", "-o", "json"]).await);
    assert_eq!(same, only);
    assert_eq!(
        stdout(&run(&["provision", "list", "-o", "table"]).await),
        stdout(&run(&["provision", "list"]).await)
    );
    let o = run(&["provision", "list", "-o", "yaml"]).await;
    assert!(!o.status.success() && stderr(&o).contains("yaml"), "{o:?}");
    let o = run(&["provision", "list"]).await;
    assert!(o.status.success(), "{o:?}");
    let table = stdout(&o);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("FUNCTION"), "{table}");
    let job: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(job[0], "job", "{table}");
    assert_eq!(job[4], "false", "{table}");
    let web: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!((web[0], web[1], web[4]), ("web", "2", "true"), "{table}");

    // Bad input gets FC's error and changes nothing.
    let o = run(&["provision", "put", "web", "--target", "10001"]).await;
    assert!(!o.status.success());
    assert!(stderr(&o).contains("InvalidArgument"), "{o:?}");
    let o = run(&["provision", "put", "web"]).await;
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--target"), "{o:?}");
    let o = run(&["provision", "put", "nope", "--target", "1"]).await;
    assert!(!o.status.success());
    assert!(stderr(&o).contains("FunctionNotFound"), "{o:?}");
    assert_eq!(
        ok_json(run(&["provision", "get", "web"]).await)["defaultTarget"],
        2
    );

    // `-o table`: one KEY VALUE line a field.
    let o = run(&["provision", "get", "web", "-o", "table"]).await;
    assert!(o.status.success(), "{o:?}");
    let table = stdout(&o);
    let line = table
        .lines()
        .find(|l| l.starts_with("defaultTarget"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .unwrap_or_else(|| panic!("{o:?}"));
    assert_eq!(line, vec!["defaultTarget", "2"]);

    // An action says what it did, or with `-o json` names it.
    let o = run(&["provision", "delete", "web", "-o", "json"]).await;
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(
        (v["functionName"].as_str(), v["deleted"].as_str()),
        (Some("web"), Some("provision"))
    );
    let o = run(&["provision", "delete", "web"]).await;
    assert!(o.status.success(), "{o:?}");
    assert!(stdout(&o).contains("deleted"), "{o:?}");
    let listed = ok_json(run(&["provision", "list", "--json"]).await);
    assert_eq!(listed.as_array().unwrap().len(), 1);

    // ---- concurrency ----
    let v = ok_json(run(&["concurrency", "put", "web", "--reserved", "5"]).await);
    assert_eq!(v["reservedConcurrency"], 5);
    let v = ok_json(run(&["concurrency", "get", "web"]).await);
    assert_eq!(v["reservedConcurrency"], 5);
    let o = run(&["concurrency", "list"]).await;
    assert!(o.status.success(), "{o:?}");
    let table = stdout(&o);
    assert_eq!(
        table
            .lines()
            .nth(1)
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>(),
        vec!["web", "5"],
        "{table}"
    );
    let o = run(&["concurrency", "put", "web", "--reserved", "-1"]).await;
    assert!(!o.status.success(), "clap refuses a negative count: {o:?}");
    let o = run(&["concurrency", "put", "web", "--reserved", "100001"]).await;
    assert!(stderr(&o).contains("InvalidArgument"), "{o:?}");
    assert_eq!(
        ok_json(run(&["concurrency", "get", "web"]).await)["reservedConcurrency"],
        5
    );
    let o = run(&["concurrency", "delete", "web"]).await;
    assert!(o.status.success(), "{o:?}");
    let listed = ok_json(run(&["concurrency", "list", "--json"]).await);
    assert!(listed.as_array().unwrap().is_empty(), "{listed}");

    gw.shutdown().await;
    sched.shutdown().await;
}
