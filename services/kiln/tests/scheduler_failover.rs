//! The leading scheduler killed (SIGKILL) under load, with a standby on
//! the same PostgreSQL: the gateway and the agent follow the new leader,
//! calls succeed again within 10 s, and afterwards every instance the
//! agent runs is one the new leader knows, each once (nothing leaked,
//! nothing placed twice).

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use kiln_internal_api::{paths, Endpoints, InstanceInfo, InternalClient, NodeInfo};
use kiln_test_support::postgres::PgServer;
use serde_json::json;

const KEY: (&str, &str, &str) = (
    "1300000000000002",
    "LTAIfailover",
    "failover-secret-0123456789",
);

fn scheduler(
    dir: &std::path::Path,
    pki: &kiln_pki::DevPki,
    name: &str,
    port: u16,
    pg: &str,
) -> String {
    format!(
        "state_dir = {:?}\nlisten = \"127.0.0.1:{port}\"\n\
         heartbeat_interval_ms = 300\nnode_failure_after_ms = 3000\n\
         [secrets]\nkey_file = {:?}\n\
         [cluster]\npostgres_url = {pg:?}\nadvertise_url = \"https://127.0.0.1:{port}\"\nlease_ms = 2000\n{}",
        dir.join(name),
        dir.join("secrets.key"),
        common::tls_table(pki, "scheduler")
    )
}

/// GET `path` from whichever scheduler leads.
async fn via<T: serde::de::DeserializeOwned>(
    leader: &Endpoints,
    internal: &InternalClient,
    path: &str,
) -> Result<T, kiln_internal_api::InternalClientError> {
    leader
        .call(|base| async move { internal.get(&base, path).await })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leading_scheduler_under_load_loses_nothing() {
    if common::skip() {
        return;
    }
    let Some(pg) = PgServer::start() else { return };
    let pg_url = pg.create_database("failover_e2e");
    let (state, pki, (sa, gp, gi)) = common::cluster_dir("kiln-sfail-");
    let dir = state.path();
    let (sb, agent_port) = (common::free_port(), common::free_port());
    let key = dir.join("secrets.key");
    std::fs::write(&key, "cd".repeat(32)).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let prefix = common::run_tag();
    let mut services = common::Services::new(
        dir,
        &prefix,
        &["scheduler-a", "scheduler-b", "gateway", "agent"],
    );
    let both = format!("https://127.0.0.1:{sa},https://127.0.0.1:{sb}");
    let internal = InternalClient::new(&pki.files("operator"))
        .unwrap()
        .with_timeout(Duration::from_secs(3));
    let (url_a, url_b) = (
        format!("https://127.0.0.1:{sa}"),
        format!("https://127.0.0.1:{sb}"),
    );

    // A leads before B starts.
    services.children.push(common::spawn_service(
        dir,
        "scheduler-a",
        "scheduler",
        &scheduler(dir, &pki, "scheduler-a", sa, &pg_url),
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    while internal
        .get::<serde_json::Value>(&url_a, paths::HEALTH)
        .await
        .is_err()
    {
        services.check_alive();
        assert!(
            Instant::now() < deadline,
            "A never led\n{}",
            services.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    services.children.push(common::spawn_service(
        dir,
        "scheduler-b",
        "scheduler",
        &scheduler(dir, &pki, "scheduler-b", sb, &pg_url),
    ));
    let gateway = common::gateway_config(dir, &pki, (sa, gp, gi), KEY).replace(
        &format!("scheduler_url = \"https://127.0.0.1:{sa}\""),
        &format!("scheduler_url = {both:?}"),
    );
    assert!(gateway.contains(&both));
    services
        .children
        .push(common::spawn_service(dir, "gateway", "gateway", &gateway));
    let agent = format!(
        "state_dir = {:?}\nlisten = \"127.0.0.1:{agent_port}\"\nscheduler_url = {both:?}\n\
         gateway_internal_url = \"https://127.0.0.1:{gi}\"\n{}\
         [node]\ntenancy = \"dedicated\"\nmemory_mb = 4096\ncpu_milli = 16000\nmax_instances = 64\n\
         [sandbox]\nname_prefix = {prefix:?}\ninstance_subnet = {:?}\ncgroup_parent = {prefix:?}\nrootfs_dir = {:?}\n\
         insecure_network_isolation_disabled = true\n",
        dir.join("agent"),
        common::tls_table(&pki, "agent"),
        common::run_subnet(),
        common::rootfs_cache()
    );
    services
        .children
        .push(common::spawn_service(dir, "agent", "agent", &agent));

    let leader = Endpoints::parse(&both).unwrap();
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let nodes: Result<Vec<NodeInfo>, _> = via(&leader, &internal, paths::SCHEDULER_NODES).await;
        let ready = std::net::TcpStream::connect(("127.0.0.1", gp)).is_ok();
        if ready && nodes.is_ok_and(|n| n.len() == 1) {
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

    let c = Arc::new(common::loopback_client(&pki, gp, KEY));
    c.create_function(&json!({
        "functionName": "steady",
        "runtime": "custom.debian12",
        "handler": "index.handler",
        "memorySize": 128,
        "instanceConcurrency": 1,
        "timeout": 10,
        "customRuntimeConfig": {"command": ["python3", "server.py"]},
        "code": {"zipFile": base64::engine::general_purpose::STANDARD.encode(common::example_zip("hello-python"))},
    }))
    .await
    .unwrap();

    // Four callers, one call at a time each, for 16 s; A dies at 4 s.
    let t0 = Instant::now();
    let load_for = Duration::from_secs(16);
    let mut workers = Vec::new();
    for _ in 0..4 {
        let c = c.clone();
        workers.push(tokio::spawn(async move {
            let mut calls = Vec::new();
            while t0.elapsed() < load_for {
                let started = t0.elapsed();
                let r = tokio::time::timeout(
                    Duration::from_secs(60),
                    c.invoke("steady", Bytes::from_static(br#"{"sleep": 0.1}"#), &[]),
                )
                .await
                .expect("a call hung for 60 s");
                let ok =
                    matches!(&r, Ok(r) if r.status == 200 && r.header("x-fc-error-type").is_none());
                let what = match &r {
                    Ok(r) => format!("{} {}", r.status, String::from_utf8_lossy(&r.body)),
                    Err(e) => format!("{e}"),
                };
                calls.push((started, ok, what));
            }
            calls
        }));
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let killed_at = t0.elapsed();
    services.children[0].kill().unwrap();
    services.children[0].wait().unwrap();
    eprintln!("killed the leading scheduler at {killed_at:?}");

    let mut calls = Vec::new();
    for w in workers {
        calls.extend(w.await.unwrap());
    }
    let failed: Vec<_> = calls.iter().filter(|c| !c.1).collect();
    let last_failure = failed.iter().map(|c| c.0).max();
    eprintln!(
        "{} calls, {} failed; last failed call started at {last_failure:?} (kill at {killed_at:?})",
        calls.len(),
        failed.len()
    );
    for f in &failed {
        assert!(
            f.0 + Duration::from_secs(1) >= killed_at,
            "failed before the kill: {f:?}"
        );
        assert!(
            f.2.contains("ServiceUnavailable")
                || f.2.contains("ResourceThrottled")
                || f.2.contains("InternalServerError"),
            "not a retryable system error: {f:?}"
        );
    }
    let settled = killed_at + Duration::from_secs(10);
    let late: Vec<_> = calls.iter().filter(|c| c.0 > settled).collect();
    assert!(
        late.len() >= 5,
        "too few calls after the failover: {}",
        late.len()
    );
    assert!(
        late.iter().all(|c| c.1),
        "calls still failing 10 s after the leader died: {:?}\n{}",
        late.iter().filter(|c| !c.1).collect::<Vec<_>>(),
        services.logs()
    );

    // Every container the agent runs is an instance B knows, once.
    let runc_root = dir.join("agent").join("runc");
    let containers = || -> BTreeSet<String> {
        let out = std::process::Command::new("runc")
            .arg("--root")
            .arg(&runc_root)
            .args(["list", "-q"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let instances: Vec<InstanceInfo> = via(&leader, &internal, paths::SCHEDULER_INSTANCES)
            .await
            .unwrap();
        let ids: Vec<String> = instances
            .iter()
            .map(|i| i.instance_id.as_str().to_owned())
            .collect();
        let known: BTreeSet<String> = ids.iter().cloned().collect();
        assert_eq!(known.len(), ids.len(), "an instance listed twice: {ids:?}");
        let running = containers();
        let unknown: Vec<&String> = running
            .iter()
            .filter(|c| !known.iter().any(|k| c.contains(k.as_str())))
            .collect();
        if unknown.is_empty() && running.len() == known.len() {
            eprintln!("{} instances, all known to the new leader", known.len());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent runs instances the leader does not know, or the reverse:\n\
             running {running:?}\nknown {known:?}\n{}",
            services.logs()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(leader.current(), url_b, "B leads");

    // The agent has B's token (2: A held 1) from B's heartbeat answers and
    // refuses A's, whatever A might still send.
    let agent_url = format!("https://127.0.0.1:{agent_port}");
    let as_scheduler = InternalClient::new(&pki.files("scheduler")).unwrap();
    let gone = paths::agent_instance(&"i-00000000000000000000000000000000".parse().unwrap());
    let refused = as_scheduler
        .with_leader_token(1)
        .delete(&agent_url, &gone)
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, kiln_internal_api::InternalClientError::Remote { error, .. }
            if error.kind == Some(kiln_core::FcErrorKind::NotLeader)),
        "{refused}"
    );
    as_scheduler
        .with_leader_token(2)
        .delete(&agent_url, &gone)
        .await
        .expect("the leader's own token passes");
    let log = |name: &str| std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap();
    assert!(
        log("agent").contains("following the scheduler that answers"),
        "the agent never followed B:\n{}",
        services.logs()
    );
    eprintln!(
        "the gateway followed B: {}",
        log("gateway").contains("following the scheduler that answers")
    );
    drop(services);
    drop(pg);
}
