//! `kiln nodes revoke` end to end, with the real service binaries and two
//! agents: the revoked node is refused by the scheduler, the gateway and
//! the other agent within seconds, and its function's instance is
//! replaced on the other node.

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use kiln::credentials::Credentials;
use kiln_core::NodeId;
use kiln_internal_api::{paths, trust_paths, InstanceInfo, InternalClient, NodeInfo, NodeRevoked};
use serde_json::json;

fn agent_config(
    dir: &std::path::Path,
    pki: &kiln_pki::DevPki,
    node: &NodeId,
    port: u16,
    sp: u16,
    gi: u16,
    prefix: &str,
) -> String {
    let tls = pki.agent(node).unwrap();
    format!(
        "state_dir = {:?}\nlisten = \"127.0.0.1:{port}\"\nscheduler_url = \"https://127.0.0.1:{sp}\"\n\
         gateway_internal_url = \"https://127.0.0.1:{gi}\"\ndrain_on_shutdown = true\n\
         [tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
         [node]\nzone = \"zone-a\"\ntenancy = \"dedicated\"\nmemory_mb = 4096\ncpu_milli = 16000\nmax_instances = 64\n\
         [sandbox]\nname_prefix = {prefix:?}\ninstance_subnet = {:?}\ncgroup_parent = {prefix:?}\nrootfs_dir = {:?}\n\
             insecure_network_isolation_disabled = true\n",
        dir.join(node.as_str()),
        tls.ca,
        tls.cert,
        tls.key,
        common::run_subnet(),
        common::rootfs_cache()
    )
}

/// Whether a call with `client` got through the TLS handshake (any
/// answer, even a refusal of the route, means it did).
async fn reached(client: &InternalClient, base: &str, path: &str) -> bool {
    match client.get::<serde_json::Value>(base, path).await {
        Ok(_) => true,
        Err(e) => !e.is_unreachable(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_is_refused_everywhere_and_its_instances_move() {
    if common::skip() {
        return;
    }
    let (state, pki, (sp, gp, gi)) = common::cluster_dir("kiln-revoke-");
    let dir = state.path();
    let nodes: [NodeId; 2] = ["n-a".parse().unwrap(), "n-b".parse().unwrap()];
    let agent_ports = [common::free_port(), common::free_port()];
    let prefix = common::run_tag();
    let mut services = common::Services::new(
        dir,
        &prefix,
        &["scheduler", "gateway", "agent-a", "agent-b"],
    );
    services.children.push(common::spawn_service(
        dir,
        "scheduler",
        "scheduler",
        &common::scheduler_config(dir, &pki, sp, "heartbeat_interval_ms = 300\n"),
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
                "1300000000000002",
                "LTAIrevoketest",
                "revoke-test-secret-0123456789",
            ),
        ),
    ));
    for (i, name) in ["agent-a", "agent-b"].iter().enumerate() {
        // Each agent registers as the node its certificate names.
        std::fs::create_dir_all(dir.join(nodes[i].as_str())).unwrap();
        let config = agent_config(
            dir,
            &pki,
            &nodes[i],
            agent_ports[i],
            sp,
            gi,
            &format!("{prefix}{i}"),
        );
        services
            .children
            .push(common::spawn_service(dir, name, "agent", &config));
    }

    let operator = InternalClient::new(&pki.files("operator")).unwrap();
    let scheduler = format!("https://127.0.0.1:{sp}");
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let listed: Result<Vec<NodeInfo>, _> =
            operator.get(&scheduler, paths::SCHEDULER_NODES).await;
        let ready = std::net::TcpStream::connect(("127.0.0.1", gp)).is_ok();
        if ready && listed.is_ok_and(|n| n.len() == 2) {
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

    let c = kiln::client::FcClient::new(Credentials {
        endpoint: format!("https://127.0.0.1:{gp}"),
        account_id: "1300000000000002".into(),
        access_key_id: "LTAIrevoketest".into(),
        access_key_secret: "revoke-test-secret-0123456789".into(),
        ca_cert: pki.ca_cert(),
        security_token: None,
    })
    .unwrap();
    c.create_function(&json!({
        "functionName": "moved",
        "runtime": "custom.debian12",
        "handler": "index.handler",
        "memorySize": 128,
        "timeout": 10,
        "customRuntimeConfig": {"command": ["python3", "server.py"]},
        "code": {"zipFile": base64::engine::general_purpose::STANDARD.encode(common::example_zip("hello-python"))},
    }))
    .await
    .unwrap();
    let r = c
        .invoke("moved", Bytes::from_static(b"{}"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", services.logs());
    let instances: Vec<InstanceInfo> = operator
        .get(&scheduler, paths::SCHEDULER_INSTANCES)
        .await
        .unwrap();
    let victim = instances
        .iter()
        .find(|i| i.function_name.as_str() == "moved")
        .and_then(|i| i.node_id.clone())
        .expect("the function has an instance");
    let v = nodes.iter().position(|n| *n == victim).unwrap();
    let other = 1 - v;
    let other_url = format!("https://127.0.0.1:{}", agent_ports[other]);
    let gateway_internal = format!("https://127.0.0.1:{gi}");

    // Before: the victim's certificate is served everywhere.
    let as_victim = InternalClient::new(&pki.agent(&victim).unwrap()).unwrap();
    assert!(reached(&as_victim, &scheduler, trust_paths::REVOCATIONS).await);
    assert!(reached(&as_victim, &gateway_internal, paths::HEALTH).await);
    assert!(reached(&as_victim, &other_url, paths::HEALTH).await);

    let revoked_at = Instant::now();
    let revoked: NodeRevoked = operator
        .post(&scheduler, &trust_paths::node_revoke(&victim), &())
        .await
        .unwrap();
    assert_eq!(revoked.instances_written_off, 1);

    // Each service refuses it (fresh connections each probe). The bound is
    // generous for a loaded machine; the time it took is printed.
    let mut pending = vec![
        ("scheduler", scheduler.clone(), trust_paths::REVOCATIONS),
        ("gateway", gateway_internal.clone(), paths::HEALTH),
        ("agent", other_url.clone(), paths::HEALTH),
    ];
    while !pending.is_empty() {
        let fresh = InternalClient::new(&pki.agent(&victim).unwrap()).unwrap();
        let mut still = Vec::new();
        for (who, base, path) in pending {
            if reached(&fresh, &base, path).await {
                still.push((who, base, path));
            } else {
                eprintln!(
                    "{who} refuses the revoked node after {:?}",
                    revoked_at.elapsed()
                );
            }
        }
        pending = still;
        assert!(
            revoked_at.elapsed() < Duration::from_secs(60),
            "still served after 60 s by {:?}\n{}",
            pending.iter().map(|p| p.0).collect::<Vec<_>>(),
            services.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The connections opened before the revocation are gone too.
    assert!(!reached(&as_victim, &other_url, paths::HEALTH).await);

    // The function is served from the other node.
    let r = c
        .invoke("moved", Bytes::from_static(b"{}"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", services.logs());
    let instances: Vec<InstanceInfo> = operator
        .get(&scheduler, paths::SCHEDULER_INSTANCES)
        .await
        .unwrap();
    let moved: Vec<_> = instances
        .iter()
        .filter(|i| i.function_name.as_str() == "moved")
        .collect();
    assert!(!moved.is_empty());
    assert!(
        moved
            .iter()
            .all(|i| i.node_id.as_ref() == Some(&nodes[other])),
        "{moved:?}"
    );
    // The healthy node is untouched.
    let as_other = InternalClient::new(&pki.agent(&nodes[other]).unwrap()).unwrap();
    assert!(reached(&as_other, &scheduler, trust_paths::REVOCATIONS).await);
}
