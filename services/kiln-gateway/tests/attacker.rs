//! Issue 15's attacker: the agent certificate of compute node A, against
//! the real gateway, the real scheduler and a second real agent B (fake
//! sandbox driver, everything else real, mTLS with DevPki identities).
//! Each item of the issue's list is tried and must be refused with FC's
//! AccessDenied (403) and change nothing; the gateway's and the operator's
//! certificates still do what they legitimately do. docs/security.md's
//! route x role table is what these calls follow.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use kiln_agent::testing::{serve_http1, FakeDriver};
use kiln_agent::{
    AgentConfig, AgentHandle, Backends, GatewayCodeSource, HttpScheduler, NodeConfig, ZipUnpacker,
};
use kiln_core::NodeId;
use kiln_gateway::config::BootstrapKey;
use kiln_internal_api::server::full;
use kiln_internal_api::{paths, AccountLimits, InstanceInfo, InternalClient, NodeInfo, Tenancy};
use kiln_pki::DevPki;
use serde_json::{json, Value};
use tokio::net::TcpListener;

async fn start_agent(
    dir: &std::path::Path,
    pki: &DevPki,
    node: &NodeId,
    scheduler_url: &str,
    gateway_internal_url: &str,
) -> AgentHandle {
    // The "sandbox": a local runtime that answers every invocation.
    let runtime = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let runtime_addr = runtime.local_addr().unwrap();
    serve_http1(runtime, |_req: Request<hyper::body::Incoming>| async move {
        http::Response::new(full("ran"))
    });
    let tls = pki.agent(node).unwrap();
    let client = InternalClient::new(&tls).unwrap();
    let config = AgentConfig {
        bootstrap: None,
        state_dir: dir.join(node.as_str()),
        listen: "127.0.0.1:0".parse().unwrap(),
        advertise_url: None,
        scheduler_url: scheduler_url.into(),
        gateway_internal_url: gateway_internal_url.into(),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        region: Some("cn-test".into()),
        instance_start_timeout_ms: 10_000,
        drain_on_shutdown: false,
        runtimes: kiln_core::RuntimeName::ALL.to_vec(),
        tls,
        node: NodeConfig {
            zone: "zone-a".into(),
            tenancy: Tenancy::Dedicated,
            dedicated_account: None,
            memory_mb: 4096,
            cpu_milli: 4000,
            max_instances: 8,
        },
        sandbox: Default::default(),
        usage: Default::default(),
        limits: Default::default(),
        code_cache: Default::default(),
        images: Default::default(),
    };
    let backends = Backends {
        driver: Arc::new(FakeDriver::at(runtime_addr)),
        code_source: Arc::new(GatewayCodeSource::new(client.clone(), gateway_internal_url)),
        unpacker: Arc::new(ZipUnpacker),
        scheduler: Arc::new(HttpScheduler::new(
            client.clone(),
            kiln_internal_api::Endpoints::parse(scheduler_url).unwrap(),
        )),
    };
    let agent = kiln_agent::start_with(config, backends).await.unwrap();
    // Instances of functions with a role get their credentials from the
    // gateway, as a real node's do.
    agent
        .instances()
        .set_credential_source(Arc::new(
            kiln_agent::credentials::GatewayCredentialSource::new(client, gateway_internal_url),
        ))
        .await;
    agent
}

/// The FC error of a refused call: 403 AccessDenied naming the route.
async fn assert_denied(resp: http::Response<hyper::body::Incoming>, what: &str) -> String {
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "{what}: {}",
        String::from_utf8_lossy(&body)
    );
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["Code"], "AccessDenied", "{what}: {v}");
    let message = v["Message"].as_str().unwrap().to_owned();
    assert!(message.contains("role agent"), "{what}: {message}");
    message
}

fn request(method: Method, url: String, body: Value) -> Request<kiln_internal_api::server::Body> {
    Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(full(body.to_string()))
        .unwrap()
}

async fn nodes(operator: &InternalClient, scheduler: &str) -> Vec<NodeInfo> {
    operator
        .get(scheduler, paths::SCHEDULER_NODES)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_certificate_of_node_a_is_trusted_with_node_a_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let sched_dir = dir.path().join("scheduler");
    std::fs::create_dir_all(&sched_dir).unwrap();
    let mut sched_config = kiln_scheduler::SchedulerConfig::new(
        sched_dir,
        "127.0.0.1:0".parse().unwrap(),
        pki.files("scheduler"),
    );
    sched_config.heartbeat_interval_ms = 200;
    let scheduler = kiln_scheduler::start(sched_config).await.unwrap();
    let scheduler_url = format!("https://127.0.0.1:{}", scheduler.addr().port());
    let key =
        |account: &str, ak: &str, sk: &str| BootstrapKey::new(account.parse().unwrap(), ak, sk);
    let gateway = kiln_gateway::start(kiln_gateway::GatewayConfig {
        lease_hold_ms: 0,
        bootstrap_keys: vec![key(ACCOUNT_A, AK_A, SK_A), key(ACCOUNT_B, AK_B, SK_B)],
        ..kiln_gateway::GatewayConfig::loopback(
            dir.path().join("gateway"),
            "cn-test",
            &scheduler_url,
            &pki,
        )
    })
    .await
    .unwrap();
    let gateway_internal = format!("https://127.0.0.1:{}", gateway.internal_addr().port());

    let (a_id, b_id): (NodeId, NodeId) = ("n-a".parse().unwrap(), "n-b".parse().unwrap());
    let agent_a = start_agent(dir.path(), &pki, &a_id, &scheduler_url, &gateway_internal).await;
    let agent_b = start_agent(dir.path(), &pki, &b_id, &scheduler_url, &gateway_internal).await;
    assert_eq!(agent_a.node_id(), &a_id, "the node id is the certificate's");
    let operator = InternalClient::new(&pki.files("operator")).unwrap();
    for _ in 0..200 {
        if nodes(&operator, &scheduler_url)
            .await
            .iter()
            .filter(|n| n.state == "ready")
            .count()
            == 2
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listed = nodes(&operator, &scheduler_url).await;
    assert_eq!(listed.len(), 2, "{listed:?}");

    // The victim: account B's function, with an instance on node B (A is
    // cordoned by the operator while it is placed).
    let victim = Api::new(&pki, gateway.public_addr(), AK_B, SK_B, false);
    let policy = json!({"Version": "1", "Statement": [
        {"Effect": "Allow", "Action": ["fc:GetFunction"],
         "Resource": "acs:fc:*:*:functions/victim"}]});
    let role = victim
        .call(
            Method::PUT,
            "/2023-03-30/roles/victim-role",
            serde_json::to_vec(&json!({"policy": policy})).unwrap(),
        )
        .await;
    assert_eq!(role.status, StatusCode::OK, "{:?}", role.body);
    let arn = format!("acs:ram::{ACCOUNT_B}:role/victim-role");
    let zip = zip_of(&[("app.py", b"print('secret of account B')\n")]);
    let created = victim
        .call(
            Method::POST,
            "/2023-03-30/functions",
            serde_json::to_vec(&json!({
                "functionName": "victim",
                "runtime": "custom.debian12",
                "handler": "index.handler",
                "memorySize": 128,
                "timeout": 10,
                "customRuntimeConfig": {"command": ["python3", "/code/app.py"], "port": 9000},
                "code": {"zipFile": b64(&zip)},
                "role": arn,
            }))
            .unwrap(),
        )
        .await;
    assert_eq!(created.status, StatusCode::OK, "{:?}", created.body);
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&zip))
    };
    let cordon = |node: &NodeId, action: &'static str| {
        let (operator, url, node) = (operator.clone(), scheduler_url.clone(), node.clone());
        async move {
            operator
                .post::<_, NodeInfo>(&url, &paths::node_action(&node, action), &())
                .await
        }
    };
    // The operator's certificate: admin routes work.
    cordon(&a_id, "cordon").await.unwrap();
    let invoked = victim
        .call(
            Method::POST,
            "/2023-03-30/functions/victim/invocations",
            b"{}".to_vec(),
        )
        .await;
    assert_eq!(
        invoked.status,
        StatusCode::OK,
        "{:?}",
        String::from_utf8_lossy(&invoked.body)
    );
    assert_eq!(&invoked.body[..], b"ran");
    cordon(&a_id, "uncordon").await.unwrap();
    let instances: Vec<InstanceInfo> = operator
        .get(&scheduler_url, paths::SCHEDULER_INSTANCES)
        .await
        .unwrap();
    assert_eq!(instances.len(), 1, "{instances:?}");
    let instance = instances[0].clone();
    assert_eq!(instance.node_id.as_ref(), Some(&b_id));
    // Agent B fetched that code and the role's credentials from the
    // gateway to start the instance: the placement checks let the
    // legitimate node through. It may ask again (credentials are renewed).
    let agent_b_client = InternalClient::new(&pki.agent(&b_id).unwrap()).unwrap();
    let credentials_body = json!({
        "account_id": ACCOUNT_B,
        "function_name": "victim",
        "role": arn,
        "instance_id": instance.instance_id,
    });
    let resp = agent_b_client
        .send(request(
            Method::POST,
            format!("{gateway_internal}{}", paths::CREDENTIALS),
            credentials_body.clone(),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // Even node B gets credentials only for that instance's own function
    // and role, not another role or account through its instance id.
    for (key, value) in [
        (
            "role",
            json!(format!("acs:ram::{ACCOUNT_B}:role/other-role")),
        ),
        ("account_id", json!(ACCOUNT_A)),
        ("function_name", json!("other")),
    ] {
        let mut body = credentials_body.clone();
        body[key] = value;
        let resp = agent_b_client
            .send(request(
                Method::POST,
                format!("{gateway_internal}{}", paths::CREDENTIALS),
                body,
            ))
            .await
            .unwrap();
        let m = assert_denied(resp, key).await;
        assert!(m.contains("not placed on node n-b"), "{m}");
    }

    let limits_before: AccountLimits = operator
        .get(
            &scheduler_url,
            &paths::account_limits(&ACCOUNT_B.parse().unwrap()),
        )
        .await
        .unwrap();

    // --- The attacker: node A's agent certificate. ---
    let attacker = InternalClient::new(&pki.agent(&a_id).unwrap()).unwrap();
    let agent_b_url = agent_b.agent_url().to_owned();
    let agent_a_url = agent_a.agent_url().to_owned();

    // 1. Run a command inside the victim's instance on node B (and on its
    //    own node: exec is the gateway's).
    for base in [&agent_b_url, &agent_a_url] {
        let exec = request(
            Method::POST,
            format!("{base}{}", paths::agent_exec(&instance.instance_id)),
            json!({"command": ["cat", "/code/app.py"]}),
        );
        let m = assert_denied(attacker.send(exec).await.unwrap(), "exec").await;
        assert!(m.contains("POST /v1/instances/{id}/exec"), "{m}");
    }
    // ...or invoke it, create or destroy instances on B.
    let resp = attacker
        .send(request(
            Method::POST,
            format!(
                "{agent_b_url}{}",
                paths::agent_invoke(&instance.instance_id)
            ),
            json!({}),
        ))
        .await
        .unwrap();
    assert_denied(resp, "invoke on B").await;
    let resp = attacker
        .send(request(
            Method::DELETE,
            format!(
                "{agent_b_url}{}",
                paths::agent_instance(&instance.instance_id)
            ),
            json!({}),
        ))
        .await
        .unwrap();
    assert_denied(resp, "destroy on B").await;

    // 2. Mint credentials for account B's function role.
    let resp = attacker
        .send(request(
            Method::POST,
            format!("{gateway_internal}{}", paths::CREDENTIALS),
            credentials_body.clone(),
        ))
        .await
        .unwrap();
    let m = assert_denied(resp, "credentials").await;
    assert!(m.contains("not placed on node n-a"), "{m}");

    // 3. Download account B's code by digest.
    let resp = attacker
        .send(
            Request::get(format!("{gateway_internal}{}", paths::code(&digest)))
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    let m = assert_denied(resp, "code").await;
    assert!(m.contains("GET /v1/code/{digest}"), "{m}");

    // 4. Change quotas, cordon or drain node B.
    let resp = attacker
        .send(request(
            Method::PUT,
            format!(
                "{scheduler_url}{}",
                paths::account_limits(&ACCOUNT_B.parse().unwrap())
            ),
            json!({"max_instances": 0}),
        ))
        .await
        .unwrap();
    assert_denied(resp, "limits").await;
    for action in ["cordon", "drain"] {
        let resp = attacker
            .send(request(
                Method::POST,
                format!("{scheduler_url}{}", paths::node_action(&b_id, action)),
                json!({}),
            ))
            .await
            .unwrap();
        assert_denied(resp, action).await;
    }

    // 5. Register under node B's id with its own URL, or beat for it.
    let resp = attacker
        .send(request(
            Method::POST,
            format!("{scheduler_url}{}", paths::NODES_REGISTER),
            json!({
                "node_id": b_id,
                "agent_url": agent_a_url,
                "capacity": {"memory_mb": 4096, "cpu_milli": 4000, "max_instances": 8},
                "labels": {"zone": "zone-a", "tenancy": "dedicated", "sandbox_kinds": ["container"]},
                "instances": [],
            }),
        ))
        .await
        .unwrap();
    let m = assert_denied(resp, "register as B").await;
    assert!(m.contains("n-a, not n-b"), "{m}");
    let resp = attacker
        .send(request(
            Method::POST,
            format!("{scheduler_url}{}", paths::node_heartbeat(&b_id)),
            json!({"instances": []}),
        ))
        .await
        .unwrap();
    assert_denied(resp, "heartbeat as B").await;

    // Nothing changed.
    let limits_after: AccountLimits = operator
        .get(
            &scheduler_url,
            &paths::account_limits(&ACCOUNT_B.parse().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(limits_after, limits_before);
    let listed = nodes(&operator, &scheduler_url).await;
    let b = listed.iter().find(|n| n.node_id == b_id).unwrap();
    assert_eq!(b.state, "ready");
    assert_eq!(b.agent_url, agent_b_url);
    let on_b: Vec<InstanceInfo> = operator
        .get(&agent_b_url, paths::AGENT_INSTANCES)
        .await
        .unwrap();
    assert_eq!(on_b.len(), 1);
    assert_eq!(on_b[0].instance_id, instance.instance_id);

    // The refusals are counted where they happened.
    let metrics_b = agent_b.metrics_addr().expect("agent metrics");
    let text = reqwest_metrics(metrics_b).await;
    assert!(
        text.contains(r#"kiln_agent_internal_refusals_total{role="agent",method="POST",route="/v1/instances/{id}/exec"} 1"#),
        "{text}"
    );

    // The gateway's certificate still invokes through the public API, and
    // the operator's still reads and sets limits.
    let again = victim
        .call(
            Method::POST,
            "/2023-03-30/functions/victim/invocations",
            b"{}".to_vec(),
        )
        .await;
    assert_eq!(
        again.status,
        StatusCode::OK,
        "{:?}",
        String::from_utf8_lossy(&again.body)
    );
    let gateway_client = InternalClient::new(&pki.files("gateway-internal")).unwrap();
    let resp = gateway_client
        .send(request(
            Method::POST,
            format!(
                "{agent_b_url}{}",
                paths::agent_invoke(&instance.instance_id)
            ),
            json!({}),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    agent_a.shutdown().await;
    agent_b.shutdown().await;
    gateway.shutdown().await;
    scheduler.shutdown().await;
}

/// The Prometheus text of a metrics listener (plain HTTP/1.1).
async fn reqwest_metrics(addr: std::net::SocketAddr) -> String {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            Request::get("/metrics")
                .header("host", "localhost")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}
