//! The three services as separate processes on separate addresses, each
//! configured by its own file, doing the whole invoke path.

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use kiln::credentials::Credentials;
use kiln_internal_api::{InternalClient, NodeInfo};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_run_as_separate_processes_from_config_files() {
    if common::skip() {
        return;
    }
    let (state, pki, (sp, gp, gi)) = common::cluster_dir("kiln-sep-");
    let dir = state.path();
    let ap = common::free_port();
    let prefix = common::run_tag();
    let mut services = common::Services::new(dir, &prefix, &["scheduler", "gateway", "agent"]);
    services.children.push(common::spawn_service(
        dir,
        "scheduler",
        "scheduler",
        &common::scheduler_config(dir, &pki, sp, ""),
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
                "1200000000000001",
                "LTAIseparate",
                "separate-secret-0123456789",
            ),
        ),
    ));
    services.children.push(common::spawn_service(
        dir,
        "agent",
        "agent",
        &format!(
            "state_dir = {:?}\nlisten = \"127.0.0.1:{ap}\"\nscheduler_url = \"https://127.0.0.1:{sp}\"\n\
             gateway_internal_url = \"https://127.0.0.1:{gi}\"\ndrain_on_shutdown = true\n{}\
             [node]\nzone = \"z1\"\ntenancy = \"dedicated\"\nmemory_mb = 4096\ncpu_milli = 16000\nmax_instances = 64\n\
             [sandbox]\nname_prefix = {prefix:?}\ninstance_subnet = {:?}\ncgroup_parent = {prefix:?}\nrootfs_dir = {:?}\n\
             insecure_network_isolation_disabled = true\n",
            dir.join("agent"),
            common::tls_table(&pki, "agent"),
            common::run_subnet(),
            common::rootfs_cache()
        ),
    ));

    // Wait for the agent to register (the first start builds the runtime).
    let internal = InternalClient::new(&pki.files("operator")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let nodes: Result<Vec<NodeInfo>, _> = internal
            .get(
                &format!("https://127.0.0.1:{sp}"),
                kiln_internal_api::paths::SCHEDULER_NODES,
            )
            .await;
        if nodes.is_ok_and(|n| !n.is_empty()) {
            break;
        }
        services.check_alive();
        assert!(
            Instant::now() < deadline,
            "agent never registered\n{}",
            services.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // And for the gateway's public listener.
    while std::net::TcpStream::connect(("127.0.0.1", gp)).is_err() {
        services.check_alive();
        assert!(
            Instant::now() < deadline,
            "gateway never listened\n{}",
            services.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let creds = Credentials {
        endpoint: format!("https://127.0.0.1:{gp}"),
        account_id: "1200000000000001".into(),
        access_key_id: "LTAIseparate".into(),
        access_key_secret: "separate-secret-0123456789".into(),
        ca_cert: pki.ca_cert(),
        security_token: None,
    };
    let c = kiln::client::FcClient::new(creds.clone()).unwrap();
    let zip = common::example_zip("hello-python");
    c.create_function(&json!({
        "functionName": "sep",
        "runtime": "custom.debian12",
        "handler": "index.handler",
        "customRuntimeConfig": {"command": ["python3", "server.py"]},
        "code": {"zipFile": base64::engine::general_purpose::STANDARD.encode(&zip)},
    }))
    .await
    .unwrap();
    let r = c
        .invoke("sep", Bytes::from_static(b"over the wire"), &[])
        .await
        .unwrap();
    assert_eq!(
        r.status,
        200,
        "{}\n{}",
        String::from_utf8_lossy(&r.body),
        services.logs()
    );
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["echo"], "over the wire");

    // A wrong secret is refused with FC's error and changes nothing.
    let bad = kiln::client::FcClient::new(Credentials {
        access_key_secret: "wrong".into(),
        ..creds
    })
    .unwrap();
    let r = bad
        .request(
            http::Method::DELETE,
            "/2023-03-30/functions/sep",
            &[],
            &[],
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    let e: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(e["Code"], "SignatureNotMatch");
    c.get_function("sep").await.unwrap();
}
