//! The gateway follows the scheduler's revocations: a revoked node's
//! certificate is refused on the internal listener within seconds and its
//! open connection dropped, while other nodes keep being served.

use std::time::Duration;

use kiln_core::NodeId;
use kiln_gateway::GatewayConfig;
use kiln_internal_api::{trust_paths, InternalClient, NodeRevoked};
use kiln_pki::DevPki;
use kiln_scheduler::SchedulerConfig;

fn url(addr: std::net::SocketAddr) -> String {
    format!("https://127.0.0.1:{}", addr.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_refuses_a_revoked_node_within_seconds() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&tmp.path().join("pki"), &[]).unwrap();
    let sched = kiln_scheduler::start(SchedulerConfig::new(
        tmp.path().join("scheduler"),
        "127.0.0.1:0".parse().unwrap(),
        pki.files("scheduler"),
    ))
    .await
    .unwrap();
    let gw = kiln_gateway::start(GatewayConfig::loopback(
        tmp.path().join("gateway"),
        "cn-hangzhou",
        &url(sched.addr()),
        &pki,
    ))
    .await
    .unwrap();
    let internal = url(gw.internal_addr());

    let a: NodeId = "n-a".parse().unwrap();
    let b: NodeId = "n-b".parse().unwrap();
    let from_a = InternalClient::new(&pki.agent(&a).unwrap()).unwrap();
    let from_b = InternalClient::new(&pki.agent(&b).unwrap()).unwrap();
    // Any answer (even a refusal of the route) means the handshake passed.
    let reached = |r: Result<serde_json::Value, kiln_internal_api::InternalClientError>| match r {
        Ok(_) => true,
        Err(e) => !e.is_unreachable(),
    };
    assert!(reached(from_a.get(&internal, "/v1/health").await));

    let operator = InternalClient::new(&pki.files("operator")).unwrap();
    let _: NodeRevoked = operator
        .post(&url(sched.addr()), &trust_paths::node_revoke(&a), &())
        .await
        .unwrap();

    let mut cut_off = false;
    for _ in 0..300 {
        if !reached(from_a.get(&internal, "/v1/health").await) {
            cut_off = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        cut_off,
        "the gateway still served the revoked node after 30 s"
    );
    let fresh_a = InternalClient::new(&pki.agent(&a).unwrap()).unwrap();
    assert!(!reached(fresh_a.get(&internal, "/v1/health").await));
    assert!(reached(from_b.get(&internal, "/v1/health").await));
    gw.shutdown().await;
    sched.shutdown().await;
}
