//! An agent process killed (SIGKILL) under load: its calls fail with a
//! retryable error, new calls succeed on the other node, nothing hangs; the
//! restarted agent removes what its predecessor left, its pre-made
//! sandboxes (`[sandbox.premade]`) included.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use kiln_internal_api::{InstanceInfo, InternalClient, NodeInfo};
use serde_json::{json, Value};

#[derive(Debug)]
struct Call {
    started: Duration,
    ended: Duration,
    status: u16,
    code: Option<String>,
    error_type: Option<String>,
}

/// Pre-made sandboxes on (appended to [`agent_config`], whose last table
/// is `[sandbox]`).
const PREMADE: &str = "[sandbox.premade]\nenabled = true\nbudget_mb = 256\n";

fn agent_config(
    dir: &std::path::Path,
    pki: &kiln_pki::DevPki,
    name: &str,
    port: u16,
    sp: u16,
    gi: u16,
    prefix: &str,
) -> String {
    format!(
        "state_dir = {:?}\nlisten = \"127.0.0.1:{port}\"\nscheduler_url = \"https://127.0.0.1:{sp}\"\n\
         gateway_internal_url = \"https://127.0.0.1:{gi}\"\ndrain_on_shutdown = true\n{}\
         [node]\nzone = {name:?}\ntenancy = \"dedicated\"\nmemory_mb = 4096\ncpu_milli = 16000\nmax_instances = 64\n\
         [sandbox]\nname_prefix = {prefix:?}\ninstance_subnet = {:?}\ncgroup_parent = {prefix:?}\nrootfs_dir = {:?}\n\
             insecure_network_isolation_disabled = true\n",
        dir.join(name),
        // Each node its own agent certificate: its node id is `name`.
        {
            pki.agent(&name.parse().unwrap()).unwrap();
            common::tls_table(pki, &format!("agent-{name}"))
        },
        common::run_subnet(),
        common::rootfs_cache()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_agent_under_load_moves_calls_to_the_other_node() {
    if common::skip() {
        return;
    }
    let (state, pki, (sp, gp, gi)) = common::cluster_dir("kiln-kill-");
    let dir = state.path();
    let agent_ports = [common::free_port(), common::free_port()];
    let prefix = common::run_tag();
    let prefixes = [format!("{prefix}a"), format!("{prefix}b")];
    let mut services = common::Services::new(
        dir,
        &prefix,
        &["scheduler", "gateway", "agent-a", "agent-b"],
    );
    // Heartbeats every 300 ms; a node silent for 1.5 s is written off.
    services.children.push(common::spawn_service(
        dir,
        "scheduler",
        "scheduler",
        &common::scheduler_config(
            dir,
            &pki,
            sp,
            "heartbeat_interval_ms = 300\nnode_failure_after_ms = 1500\n",
        ),
    ));
    services.children.push(common::spawn_service(
        dir,
        "gateway",
        "gateway",
        &common::gateway_config(
            dir,
            &pki,
            (sp, gp, gi),
            (
                "1300000000000001",
                "LTAIkilltest",
                "kill-test-secret-0123456789",
            ),
        ),
    ));
    let configs: Vec<String> = (0..2)
        .map(|i| {
            let name = ["agent-a", "agent-b"][i];
            agent_config(dir, &pki, name, agent_ports[i], sp, gi, &prefixes[i]) + PREMADE
        })
        .collect();
    for (i, name) in ["agent-a", "agent-b"].iter().enumerate() {
        services
            .children
            .push(common::spawn_service(dir, name, "agent", &configs[i]));
    }

    let internal = InternalClient::new(&pki.files("operator")).unwrap();
    let scheduler = format!("https://127.0.0.1:{sp}");
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let nodes: Result<Vec<NodeInfo>, _> = internal
            .get(&scheduler, kiln_internal_api::paths::SCHEDULER_NODES)
            .await;
        let ready = std::net::TcpStream::connect(("127.0.0.1", gp)).is_ok();
        if ready && nodes.is_ok_and(|n| n.len() == 2) {
            break;
        }
        services.check_alive();
        assert!(
            Instant::now() < deadline,
            "cluster never came up\n{}",
            services.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let c = Arc::new(common::loopback_client(
        &pki,
        gp,
        (
            "1300000000000001",
            "LTAIkilltest",
            "kill-test-secret-0123456789",
        ),
    ));
    c.create_function(&json!({
        "functionName": "steady",
        "runtime": "custom.debian12",
        "handler": "index.handler",
        "memorySize": 128,
        "instanceConcurrency": 2,
        "timeout": 10,
        "customRuntimeConfig": {"command": ["python3", "server.py"]},
        "code": {"zipFile": base64::engine::general_purpose::STANDARD.encode(common::example_zip("hello-python"))},
    }))
    .await
    .unwrap();

    // Steady load: 6 callers, each one call at a time, for 14 s.
    let t0 = Instant::now();
    let load_for = Duration::from_secs(14);
    let mut workers = Vec::new();
    for _ in 0..6 {
        let c = c.clone();
        workers.push(tokio::spawn(async move {
            let mut calls = Vec::new();
            while t0.elapsed() < load_for {
                let started = t0.elapsed();
                let r = tokio::time::timeout(
                    Duration::from_secs(60),
                    c.invoke("steady", Bytes::from_static(br#"{"sleep": 0.2}"#), &[]),
                )
                .await
                .expect("a call hung for 60 s");
                let call = match r {
                    Ok(r) => {
                        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
                        Call {
                            started,
                            ended: t0.elapsed(),
                            status: r.status.as_u16(),
                            code: v.get("Code").and_then(Value::as_str).map(str::to_owned),
                            error_type: r.header("x-fc-error-type").map(str::to_owned),
                        }
                    }
                    // Answers are read whole from the agent before the
                    // caller sees them, so even a call in flight when its
                    // node dies must get an FC error, never a broken stream.
                    Err(e) => Call {
                        started,
                        ended: t0.elapsed(),
                        status: 0,
                        code: Some(format!("stream broken: {e}")),
                        error_type: None,
                    },
                };
                calls.push(call);
            }
            calls
        }));
    }

    // After 4 s, SIGKILL the agent that hosts the function's instances.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let instances: Vec<InstanceInfo> = internal
        .get(&scheduler, kiln_internal_api::paths::SCHEDULER_INSTANCES)
        .await
        .unwrap();
    let nodes: Vec<NodeInfo> = internal
        .get(&scheduler, kiln_internal_api::paths::SCHEDULER_NODES)
        .await
        .unwrap();
    let busy_node = instances
        .iter()
        .find_map(|i| i.node_id.clone())
        .expect("the function has instances under load");
    let busy_url = &nodes
        .iter()
        .find(|n| n.node_id == busy_node)
        .unwrap()
        .agent_url;
    let victim = agent_ports
        .iter()
        .position(|p| busy_url.ends_with(&format!(":{p}")))
        .expect("the busy node is one of ours");
    let killed_at = t0.elapsed();
    services.children[2 + victim].kill().unwrap();
    services.children[2 + victim].wait().unwrap();
    eprintln!("killed agent {victim} at {killed_at:?}");

    let mut calls = Vec::new();
    for w in workers {
        calls.extend(w.await.unwrap());
    }
    let failed: Vec<&Call> = calls
        .iter()
        .filter(|c| c.status != 200 || c.error_type.is_some())
        .collect();
    let mut kinds: Vec<(u16, Option<String>)> =
        failed.iter().map(|c| (c.status, c.code.clone())).collect();
    kinds.sort();
    kinds.dedup();
    eprintln!(
        "{} calls, {} failed around the kill with {kinds:?}",
        calls.len(),
        failed.len()
    );
    // Failures only of calls in flight at the kill or made after it (not
    // "started within a second of it": under load a call can take longer),
    // and only retryable system errors.
    for f in &failed {
        assert!(f.ended >= killed_at, "a call failed before the kill: {f:?}");
        assert!(
            matches!(f.status, 429 | 500 | 503)
                && matches!(
                    f.code.as_deref(),
                    Some("ServiceUnavailable" | "InternalServerError" | "ResourceThrottled")
                ),
            "not a retryable system error: {f:?}"
        );
    }
    // Once the node is written off (1.5 s without a heartbeat), calls
    // succeed on the other one. 5 s leaves room for a loaded machine's
    // slow cold start there; a node never written off still fails this.
    let settled = killed_at + Duration::from_secs(5);
    let late: Vec<&Call> = calls.iter().filter(|c| c.started > settled).collect();
    assert!(
        late.len() >= 10,
        "too few calls after the failover: {}",
        late.len()
    );
    assert!(
        late.iter()
            .all(|c| c.status == 200 && c.error_type.is_none()),
        "calls still failing after the node was written off: {:?}",
        late.iter().filter(|c| c.status != 200).collect::<Vec<_>>()
    );
    let instances: Vec<InstanceInfo> = internal
        .get(&scheduler, kiln_internal_api::paths::SCHEDULER_INSTANCES)
        .await
        .unwrap();
    assert!(
        instances
            .iter()
            .filter(|i| i.function_name.as_str() == "steady")
            .all(|i| i.node_id.as_ref() != Some(&busy_node)),
        "instances still placed on the dead node: {instances:?}"
    );

    // The killed agent's containers outlive it; the restarted agent
    // removes them.
    let runc_root = dir.join(["agent-a", "agent-b"][victim]).join("runc");
    let containers = || {
        let out = std::process::Command::new("runc")
            .arg("--root")
            .arg(&runc_root)
            .args(["list", "-q"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let left = containers();
    assert!(
        !left.is_empty(),
        "the killed agent's containers are already gone?"
    );
    // Among them its pre-made sandboxes (`<prefix>-p<n>`) and their dirs.
    let pool_prefix = format!("{}-p", prefixes[victim]);
    assert!(
        left.iter().any(|c| c.starts_with(&pool_prefix)),
        "no pre-made sandbox among {left:?}"
    );
    let premade_dir = dir.join(["agent-a", "agent-b"][victim]).join("premade");
    assert!(std::fs::read_dir(&premade_dir).unwrap().next().is_some());
    let name = ["agent-a", "agent-b"][victim];
    // Restarted without pools, so that what is left is only what the
    // predecessor left.
    let restart = agent_config(
        dir,
        &pki,
        name,
        agent_ports[victim],
        sp,
        gi,
        &prefixes[victim],
    );
    services.children[2 + victim] = common::spawn_service(dir, name, "agent", &restart);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !containers().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the restarted agent left its predecessor's containers: {:?}\n{}",
            containers(),
            services.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // (Removed after the containers, in the same startup cleanup.)
    let pool_dirs = || -> Vec<_> {
        std::fs::read_dir(&premade_dir)
            .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default()
    };
    while !pool_dirs().is_empty() {
        assert!(
            Instant::now() < deadline,
            "pre-made sandboxes left: {:?}\n{}",
            pool_dirs(),
            services.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Their cgroups went with the containers.
    let root = std::path::Path::new("/sys/fs/cgroup");
    for h in std::iter::once(root.to_owned())
        .chain(std::fs::read_dir(root).unwrap().flatten().map(|e| e.path()))
    {
        if let Ok(children) = std::fs::read_dir(h.join(&prefixes[victim])) {
            let pool: Vec<_> = children
                .flatten()
                .map(|c| c.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&pool_prefix))
                .collect();
            assert!(pool.is_empty(), "pre-made sandbox cgroups left: {pool:?}");
        }
    }
}
