//! FC's alwaysAllocateCPU on `kiln dev` with real runc containers: an idle
//! provisioned instance of a config with it keeps running (its cgroup is
//! never frozen) while an on-demand instance is frozen after its call;
//! turning it off in the provision config freezes the provisioned one
//! too, without replacing it. Every wait polls the cgroup with a deadline.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::Method;
use serde_json::{json, Value};

use common::{example_zip, Dev};

/// The freezer cgroup of the container of instance `id` (cgroup v1:
/// `freezer.state`; v2: `cgroup.freeze`), found by its name's suffix.
/// The freezer file of instance `id`'s cgroup, named after its container:
/// `<prefix>-<instance id>`, or the pre-made sandbox's id it was claimed
/// from (`container` in the agent's instance record).
fn freezer_file(dev: &Dev, id: &str) -> Option<PathBuf> {
    let record = kiln::dev_config::agent_state_dir(dev.state.path())
        .join("instances")
        .join(id)
        .join("instance.json");
    let container = std::fs::read(record)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|r| r["container"].as_str().map(str::to_owned));
    let suffix = match container {
        Some(c) => c,
        None => format!("-{id}"),
    };
    let mut dirs = vec![
        PathBuf::from("/sys/fs/cgroup/freezer"),
        PathBuf::from("/sys/fs/cgroup/unified"),
        PathBuf::from("/sys/fs/cgroup"),
    ];
    let mut depth = 0;
    while depth < 4 && !dirs.is_empty() {
        let mut next = Vec::new();
        for d in dirs {
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                if !p.is_dir() {
                    continue;
                }
                if p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(&suffix))
                {
                    for f in ["freezer.state", "cgroup.freeze"] {
                        if p.join(f).is_file() {
                            return Some(p.join(f));
                        }
                    }
                }
                next.push(p);
            }
        }
        dirs = next;
        depth += 1;
    }
    None
}

fn frozen(file: &PathBuf) -> bool {
    let s = std::fs::read_to_string(file).unwrap_or_default();
    let s = s.trim();
    s == "FROZEN" || s == "1"
}

async fn instances(c: &kiln::client::FcClient, function: &str) -> Vec<String> {
    let v: Value = c
        .request(
            Method::GET,
            &format!("/2023-03-30/functions/{function}/instances"),
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
    v["instances"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|i| i["instanceId"].as_str().map(str::to_owned))
        .collect()
}

async fn until<F: std::future::Future<Output = bool>>(
    what: &str,
    dev: &Dev,
    secs: u64,
    mut f: impl FnMut() -> F,
) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}\n{}", dev.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_always_allocated_provisioned_instance_is_not_frozen() {
    if common::skip() {
        return;
    }
    let dev = Dev::start();
    let c = dev.client();
    let zip = base64::engine::general_purpose::STANDARD.encode(example_zip("hello-python"));
    for name in ["kept", "ondemand"] {
        c.create_function(&json!({
            "functionName": name,
            "runtime": "custom.debian12",
            "handler": "index.handler",
            "memorySize": 128,
            "timeout": 3,
            "customRuntimeConfig": {"command": ["python3", "server.py"], "port": 9000},
            "code": {"zipFile": zip},
        }))
        .await
        .unwrap_or_else(|e| panic!("create failed: {e}\n{}", dev.log_tail()));
    }
    // FC's default: alwaysAllocateCPU true when left out.
    let o = dev.cli(&["provision", "put", "kept", "--target", "1"]);
    assert!(o.status.success(), "{o:?}");
    let put: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(put["alwaysAllocateCPU"], true);
    let mut kept = Vec::new();
    until("the provisioned instance", &dev, 60, || {
        let c = c.clone();
        async move { instances(&c, "kept").await.len() == 1 }
    })
    .await;
    kept.extend(instances(&c, "kept").await);
    // Listed while it starts; its container's cgroup comes once it runs.
    until(
        "the provisioned instance's freezer cgroup",
        &dev,
        60,
        || {
            let id = kept[0].clone();
            let found = freezer_file(&dev, &id).is_some();
            async move { found }
        },
    )
    .await;
    let kept_file = freezer_file(&dev, &kept[0]).unwrap();

    // One call each: the provisioned instance's call first, so had it been
    // scheduled, its freeze would come before the on-demand one's.
    let r = c
        .invoke("kept", Bytes::from_static(b"{}"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", dev.log_tail());
    let r = c
        .invoke("ondemand", Bytes::from_static(b"{}"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", dev.log_tail());
    assert_eq!(
        instances(&c, "kept").await,
        kept,
        "the call stayed on the provisioned instance"
    );
    let od = instances(&c, "ondemand").await;
    assert_eq!(od.len(), 1);
    let od_file = freezer_file(&dev, &od[0]).expect("the on-demand instance's freezer cgroup");
    until("the on-demand instance frozen", &dev, 30, || {
        let f = od_file.clone();
        async move { frozen(&f) }
    })
    .await;
    assert!(
        !frozen(&kept_file),
        "an always-allocated instance was frozen"
    );

    // Idle mode: the same instance, frozen within a heartbeat.
    let o = dev.cli(&[
        "provision",
        "put",
        "kept",
        "--target",
        "1",
        "--always-allocate-cpu",
        "false",
    ]);
    assert!(o.status.success(), "{o:?}");
    until("the provisioned instance frozen", &dev, 30, || {
        let f = kept_file.clone();
        async move { frozen(&f) }
    })
    .await;
    assert_eq!(instances(&c, "kept").await, kept, "not replaced");
    // ...and thawed again, without a call, once it is back on.
    let o = dev.cli(&[
        "provision",
        "put",
        "kept",
        "--target",
        "1",
        "--always-allocate-cpu",
        "true",
    ]);
    assert!(o.status.success(), "{o:?}");
    until("the provisioned instance thawed", &dev, 30, || {
        let f = kept_file.clone();
        async move { !frozen(&f) }
    })
    .await;
    let r = c
        .invoke("kept", Bytes::from_static(b"{}"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", dev.log_tail());
}
