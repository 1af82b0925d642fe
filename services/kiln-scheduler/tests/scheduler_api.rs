//! The real scheduler over real mTLS, with a fake agent that is itself an
//! mTLS HTTP/2 server.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use kiln_core::{FcErrorCode, InstanceId, InstanceSpec, RuntimeName, SandboxKind};
use kiln_internal_api::server::{self, full, json, no_content, read_json, serve_tls};
use kiln_internal_api::{
    paths, AccountLimits, AcquireLease, CreateInstance, FunctionRef, Heartbeat, HeartbeatResponse,
    InstanceCreated, InstanceInfo, InternalClient, InternalClientError, Lease, LeaseOutcome,
    NodeCapacity, NodeInfo, NodeLabels, ProvisionConfig, ProvisionStatus, PutProvision,
    RegisterNode, RegisterNodeResponse, ReleaseLease, ScheduledAction, Tenancy,
};
use kiln_pki::{DevPki, TlsFiles};
use kiln_scheduler::{SchedulerConfig, SchedulerHandle};
use tokio::net::TcpListener;

#[derive(Default)]
struct AgentLog {
    created: Vec<InstanceId>,
    /// Created with `always_allocate_cpu`.
    always_allocate_cpu: Vec<InstanceId>,
    destroyed: Vec<InstanceId>,
}

/// An agent that takes 200 ms to start an instance, refuses functions
/// named "broken", and records what it was asked.
struct FakeAgentServer {
    url: String,
    log: Arc<Mutex<AgentLog>>,
    stop: tokio::sync::watch::Sender<bool>,
}

async fn fake_agent(files: &TlsFiles) -> FakeAgentServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = kiln_pki::internal_server_config(files).unwrap();
    let log = Arc::new(Mutex::new(AgentLog::default()));
    let (stop, rx) = tokio::sync::watch::channel(false);
    let l = log.clone();
    tokio::spawn(serve_tls(
        listener,
        tls,
        move |req: Request<hyper::body::Incoming>, _conn| {
            let log = l.clone();
            async move {
                let path = req.uri().path().to_owned();
                match (req.method().clone(), path.as_str()) {
                    (Method::POST, paths::AGENT_INSTANCES) => {
                        let c: CreateInstance = read_json(req.into_body(), 1 << 20).await.unwrap();
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        if c.spec.function_name.as_str() == "broken" {
                            return server::error(
                                &kiln_core::FcError::new(
                                    FcErrorCode::FunctionNotStarted,
                                    "the runtime exited before listening on port 9000",
                                ),
                                "agent",
                            );
                        }
                        let mut log = log.lock().unwrap();
                        log.created.push(c.instance_id.clone());
                        if c.always_allocate_cpu {
                            log.always_allocate_cpu.push(c.instance_id.clone());
                        }
                        drop(log);
                        json(
                            StatusCode::OK,
                            &InstanceCreated {
                                instance_id: c.instance_id,
                                startup_ms: 200,
                            },
                        )
                    }
                    (Method::DELETE, p) if p.starts_with("/v1/instances/") => {
                        let id: InstanceId = p["/v1/instances/".len()..].parse().unwrap();
                        log.lock().unwrap().destroyed.push(id);
                        no_content()
                    }
                    _ => server::not_found(&path, "agent"),
                }
            }
        },
        async move {
            let mut rx = rx;
            let _ = rx.wait_for(|v| *v).await;
        },
    ));
    FakeAgentServer {
        url: format!("https://127.0.0.1:{}", addr.port()),
        log,
        stop,
    }
}

fn spec(function: &str, concurrency: u32) -> InstanceSpec {
    InstanceSpec {
        account_id: "100".parse().unwrap(),
        function_name: function.parse().unwrap(),
        revision: String::new(),
        version: None,
        runtime: RuntimeName::Custom,
        handler: "index.handler".into(),
        command: vec!["/code/server".into()],
        args: vec![],
        port: 9000,
        environment: Default::default(),
        memory_mb: 128,
        cpu_milli: 100,
        disk_mb: 512,
        timeout_s: 5,
        concurrency,
        code_digest: "ab".repeat(32),
        code_size: 1,
        initializer: None,
        pre_stop: None,
        layers: Vec::new(),
        role: None,
        network: None,
        image: None,
    }
    .seal()
}

fn registration(node_id: Option<kiln_core::NodeId>, agent_url: &str) -> RegisterNode {
    RegisterNode {
        node_id,
        agent_url: agent_url.to_owned(),
        capacity: NodeCapacity {
            memory_mb: 16 * 1024,
            cpu_milli: 16_000,
            max_instances: 500,
        },
        labels: NodeLabels {
            zone: "zone-a".into(),
            tenancy: Tenancy::Dedicated,
            sandbox_kinds: vec![SandboxKind::Container],
            dedicated_account: None,
            runtimes: None,
            network_isolation: Default::default(),
        },
        instances: vec![],
    }
}

async fn start_scheduler(dir: &Path, pki: &DevPki) -> SchedulerHandle {
    let mut config = SchedulerConfig::new(
        dir.join("scheduler"),
        "127.0.0.1:0".parse().unwrap(),
        pki.files("scheduler"),
    );
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    kiln_scheduler::start(config).await.unwrap()
}

fn base(addr: SocketAddr) -> String {
    format!("https://127.0.0.1:{}", addr.port())
}

async fn release(client: &InternalClient, base: &str, lease: &Lease) {
    client
        .call::<_, ()>(
            Method::DELETE,
            base,
            &paths::lease(&lease.lease_id),
            Some(&ReleaseLease {
                outcome: LeaseOutcome::Ok,
            }),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_acquire_release_over_mtls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let agent = fake_agent(&pki.files("agent")).await;
    let handle = start_scheduler(dir.path(), &pki).await;
    let base = base(handle.addr());
    let client = InternalClient::new(&pki.files("gateway-internal")).unwrap();

    // Before any node: a retryable ServiceUnavailable.
    let err = client
        .post::<_, Lease>(
            &base,
            paths::LEASES,
            &AcquireLease {
                request_id: "r-0".into(),
                spec: spec("burst", 10),
            },
        )
        .await
        .unwrap_err();
    match err {
        InternalClientError::Remote { error, .. } => {
            assert_eq!(error.code, FcErrorCode::ServiceUnavailable)
        }
        other => panic!("expected a remote error, got {other}"),
    }

    let agent_client = InternalClient::new(&pki.files("agent")).unwrap();
    let reg: RegisterNodeResponse = agent_client
        .post(
            &base,
            paths::NODES_REGISTER,
            &registration(None, &agent.url),
        )
        .await
        .unwrap();
    assert_eq!(reg.heartbeat_interval_ms, 2_000);

    // 200 simultaneous calls, concurrency 10, 200 ms starts: ~20 instances.
    let s = spec("burst", 10);
    let calls = (0..200).map(|i| {
        let client = client.clone();
        let base = base.clone();
        let req = AcquireLease {
            request_id: format!("r-{i}"),
            spec: s.clone(),
        };
        tokio::spawn(async move { client.post::<_, Lease>(&base, paths::LEASES, &req).await })
    });
    let leases: Vec<Lease> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    let instances: HashSet<&InstanceId> = leases.iter().map(|l| &l.instance_id).collect();
    assert!(
        (20..=22).contains(&instances.len()),
        "{} instances for 200 calls at concurrency 10",
        instances.len()
    );
    assert_eq!(agent.log.lock().unwrap().created.len(), instances.len());
    assert!(leases
        .iter()
        .all(|l| l.agent_url == agent.url && l.node_id == reg.node_id));

    let listed: Vec<InstanceInfo> = client.get(&base, paths::SCHEDULER_INSTANCES).await.unwrap();
    assert_eq!(listed.len(), instances.len());
    assert_eq!(listed.iter().map(|i| i.in_flight).sum::<u32>(), 200);
    for l in &leases {
        release(&client, &base, l).await;
    }
    let listed: Vec<InstanceInfo> = client.get(&base, paths::SCHEDULER_INSTANCES).await.unwrap();
    assert!(listed.iter().all(|i| i.in_flight == 0));

    // Warm now: no cold start.
    let warm: Lease = client
        .post(
            &base,
            paths::LEASES,
            &AcquireLease {
                request_id: "r-warm".into(),
                spec: s.clone(),
            },
        )
        .await
        .unwrap();
    assert!(!warm.cold_start);
    release(&client, &base, &warm).await;

    // The agent's start error reaches the caller unchanged.
    let err = client
        .post::<_, Lease>(
            &base,
            paths::LEASES,
            &AcquireLease {
                request_id: "r-broken".into(),
                spec: spec("broken", 1),
            },
        )
        .await
        .unwrap_err();
    match err {
        InternalClientError::Remote { error, .. } => {
            assert_eq!(error.code, FcErrorCode::FunctionNotStarted);
            assert!(error.message.contains("port 9000"), "{}", error.message);
        }
        other => panic!("expected a remote error, got {other}"),
    }

    // Heartbeat reconciliation: a stray instance is to be destroyed.
    let stray = InstanceId::generate();
    let mut reported: Vec<InstanceId> = instances.iter().map(|i| (*i).clone()).collect();
    reported.push(stray.clone());
    let hb: HeartbeatResponse = agent_client
        .post(
            &base,
            &paths::node_heartbeat(&reg.node_id),
            &Heartbeat {
                instances: reported,
            },
        )
        .await
        .unwrap();
    assert_eq!(hb.destroy, vec![stray]);
    assert!(!hb.reregister);

    let nodes: Vec<NodeInfo> = client.get(&base, paths::SCHEDULER_NODES).await.unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].state, "ready");
    assert_eq!(nodes[0].instances as usize, instances.len());
    assert_eq!(
        nodes[0].labels.dedicated_account.as_ref().unwrap().as_str(),
        "100"
    );

    // Metrics.
    let text = scrape(handle.metrics_addr().unwrap()).await;
    assert!(text.contains("kiln_scheduler_acquires_total 201"), "{text}");
    assert!(text.contains(&format!(
        "kiln_scheduler_cold_starts_total {}",
        instances.len() + 1
    )));
    assert!(text.contains("kiln_scheduler_acquire_latency_seconds_count 201"));

    // A restart forgets nothing.
    handle.shutdown().await;
    let handle = start_scheduler(dir.path(), &pki).await;
    let base2 = base_of(&handle);
    let listed: Vec<InstanceInfo> = client
        .get(&base2, paths::SCHEDULER_INSTANCES)
        .await
        .unwrap();
    assert_eq!(listed.len(), instances.len());
    let reg2: RegisterNodeResponse = agent_client
        .post(
            &base2,
            paths::NODES_REGISTER,
            &RegisterNode {
                instances: instances.iter().map(|i| (*i).clone()).collect(),
                ..registration(Some(reg.node_id.clone()), &agent.url)
            },
        )
        .await
        .unwrap();
    assert_eq!(reg2.node_id, reg.node_id);
    assert!(reg2.destroy.is_empty());
    handle.shutdown().await;
    let _ = agent.stop.send(true);
}

fn base_of(h: &SchedulerHandle) -> String {
    base(h.addr())
}

async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

#[tokio::test]
async fn bad_requests_get_fc_errors_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let handle = start_scheduler(dir.path(), &pki).await;
    let base = base(handle.addr());
    let client = InternalClient::new(&pki.files("gateway-internal")).unwrap();
    let agent_client = InternalClient::new(&pki.agent(&"n-a".parse().unwrap()).unwrap()).unwrap();

    let raw = |method: Method, path: &str, body: &'static str| {
        Request::builder()
            .method(method)
            .uri(format!("{base}{path}"))
            .header("x-fc-request-id", "req-42")
            .body(full(body))
            .unwrap()
    };
    let cases = [
        (
            raw(Method::POST, "/v1/leases", "{not json"),
            400,
            "InvalidArgument",
        ),
        // Node routes are the agents': the gateway is refused before its
        // body or path parameters are looked at.
        (
            raw(Method::POST, "/v1/nodes/register", r#"{"node_id":null}"#),
            403,
            "AccessDenied",
        ),
        (
            raw(
                Method::POST,
                "/v1/nodes/BAD!/heartbeat",
                r#"{"instances":[]}"#,
            ),
            403,
            "AccessDenied",
        ),
        (
            raw(Method::DELETE, "/v1/leases/l-1", r#"{"outcome":"maybe"}"#),
            400,
            "InvalidArgument",
        ),
        (raw(Method::GET, "/v1/leases", ""), 405, "MethodNotAllowed"),
        (raw(Method::GET, "/v1/nothing", ""), 404, "PathNotSupported"),
        (
            raw(
                Method::POST,
                "/v1/functions/retire",
                r#"{"account_id":"1","function_name":"f","keep_revision":"zz"}"#,
            ),
            400,
            "InvalidArgument",
        ),
    ];
    for (req, status, code) in cases {
        let what = format!("{} {}", req.method(), req.uri());
        let resp = client.send(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{what}");
        assert_eq!(resp.headers()["x-fc-request-id"], "req-42");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["Code"], code, "{what}: {v}");
        assert_eq!(v["RequestId"], "req-42");
        assert!(!v["Message"].as_str().unwrap().is_empty());
    }
    // From the agent: malformed bodies are 400s (and a node id that is
    // not its own a 403, malformed or not).
    let resp = agent_client
        .send(raw(
            Method::POST,
            "/v1/nodes/BAD!/heartbeat",
            r#"{"instances":[]}"#,
        ))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    for (path, body) in [
        ("/v1/nodes/register", r#"{"node_id":null}"#),
        ("/v1/nodes/n-a/heartbeat", "{not json"),
    ] {
        let resp = agent_client
            .send(raw(Method::POST, path, body))
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400, "{path}");
    }
    // A registration with an inconsistent tenancy is refused.
    let mut r = registration(None, "https://127.0.0.1:1");
    r.labels.tenancy = Tenancy::MultiTenant;
    let err = agent_client
        .post::<_, RegisterNodeResponse>(&base, paths::NODES_REGISTER, &r)
        .await
        .unwrap_err();
    assert!(
        matches!(err, InternalClientError::Remote { ref error, .. } if error.code == FcErrorCode::InvalidArgument)
    );
    // Nothing changed.
    let nodes: Vec<NodeInfo> = client.get(&base, paths::SCHEDULER_NODES).await.unwrap();
    assert!(nodes.is_empty());
    let health: serde_json::Value = client.get(&base, paths::HEALTH).await.unwrap();
    assert_eq!(health["status"], "ok");
    handle.shutdown().await;
}

#[tokio::test]
async fn clients_without_a_cluster_certificate_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let handle = start_scheduler(dir.path(), &pki).await;
    let base = base(handle.addr());

    // A certificate from another CA.
    let rogue = kiln_pki::Ca::generate("rogue").unwrap();
    let gateway =
        kiln_pki::Identity::service(DevPki::TRUST_DOMAIN, kiln_pki::Role::Gateway).unwrap();
    let issued = rogue
        .issue(&kiln_pki::CertRequest::for_identity(
            gateway,
            kiln_pki::Usage::Client,
        ))
        .unwrap();
    let cert = dir.path().join("rogue.pem");
    let key = dir.path().join("rogue-key.pem");
    issued.write(&cert, &key).unwrap();
    let intruder = InternalClient::new(&TlsFiles {
        ca: pki.ca_cert(),
        cert,
        key,
    })
    .unwrap();
    let err = intruder
        .get::<serde_json::Value>(&base, paths::HEALTH)
        .await
        .unwrap_err();
    assert!(err.is_unreachable(), "{err}");
    assert!(err.to_string().contains("UnknownCA"), "{err}");

    // A certificate of the cluster CA that names no identity (an older
    // one): the handshake completes, every route refuses it, health too.
    let mut anonymous = kiln_pki::CertRequest::public_server("no-identity");
    anonymous.usage = kiln_pki::Usage::Client;
    let files = pki.files("no-identity");
    pki.ca()
        .issue(&anonymous)
        .unwrap()
        .write(&files.cert, &files.key)
        .unwrap();
    let nameless = InternalClient::new(&files).unwrap();
    for path in [paths::HEALTH, paths::SCHEDULER_NODES] {
        let err = nameless
            .get::<serde_json::Value>(&base, path)
            .await
            .unwrap_err();
        let e = err.to_fc();
        assert_eq!(e.code, FcErrorCode::AccessDenied, "{path}: {err}");
        assert!(
            e.message.contains("names no Kiln identity"),
            "{}",
            e.message
        );
    }
    let refused = handle
        .scheduler()
        .metrics()
        .refusals
        .count(None, &Method::GET, "/v1/health");
    assert_eq!(refused, 1);

    // No certificate at all.
    let mut tls = (*kiln_pki::public_client_config(&pki.ca_cert()).unwrap()).clone();
    tls.alpn_protocols.clear();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http2()
        .wrap_connector({
            let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
            http.enforce_http(false);
            http
        });
    let anon = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build::<_, http_body_util::Empty<bytes::Bytes>>(connector);
    let r = anon.get(format!("{base}/v1/health").parse().unwrap()).await;
    let err = r.expect_err("a client without a certificate was served");
    let chain = format!("{err:?}");
    assert!(chain.contains("CertificateRequired"), "{chain}");

    // The cluster's own certificate works.
    let ok = InternalClient::new(&pki.files("gateway-internal")).unwrap();
    let v: serde_json::Value = ok.get(&base, paths::HEALTH).await.unwrap();
    assert_eq!(v["status"], "ok");
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_limits_admin_api_persists_and_throttles() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let agent = fake_agent(&pki.files("agent")).await;
    let handle = start_scheduler(dir.path(), &pki).await;
    let base = base(handle.addr());
    let client = InternalClient::new(&pki.files("gateway-internal")).unwrap();
    let account: kiln_core::AccountId = "100".parse().unwrap();
    let path = paths::account_limits(&account);

    let defaults: AccountLimits = client.get(&base, &path).await.unwrap();
    assert_eq!(defaults.burst_instances, 300);
    assert_eq!(defaults.scale_out_vcpus_per_minute, 360);

    // Nonsense is refused and changes nothing.
    let mut bad = defaults.clone();
    bad.burst_instances = 0;
    let err = client
        .call::<_, AccountLimits>(Method::PUT, &base, &path, Some(&bad))
        .await
        .unwrap_err();
    assert!(
        matches!(err, InternalClientError::Remote { ref error, .. } if error.code == FcErrorCode::InvalidArgument && error.message.contains("burst_instances")),
        "{err}"
    );
    let unknown = client
        .send(
            Request::builder()
                .method(Method::PUT)
                .uri(format!("{base}{path}"))
                .body(full(r#"{"burst_instancez":3}"#))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::BAD_REQUEST);
    let still: AccountLimits = client.get(&base, &path).await.unwrap();
    assert_eq!(still, defaults);

    let mut one = defaults.clone();
    one.burst_instances = 1;
    let stored: AccountLimits = client
        .call(Method::PUT, &base, &path, Some(&one))
        .await
        .unwrap();
    assert_eq!(stored, one);

    // The limits survive a restart.
    handle.shutdown().await;
    let handle = start_scheduler(dir.path(), &pki).await;
    let base = base_of(&handle);
    let got: AccountLimits = client.get(&base, &path).await.unwrap();
    assert_eq!(got.burst_instances, 1);

    let agent_client = InternalClient::new(&pki.files("agent")).unwrap();
    let _: RegisterNodeResponse = agent_client
        .post(
            &base,
            paths::NODES_REGISTER,
            &registration(None, &agent.url),
        )
        .await
        .unwrap();
    let acquire = |function: &'static str| {
        let client = client.clone();
        let base = base.clone();
        async move {
            client
                .post::<_, Lease>(
                    &base,
                    paths::LEASES,
                    &AcquireLease {
                        request_id: format!("r-{function}"),
                        spec: spec(function, 1),
                    },
                )
                .await
        }
    };
    let lease = acquire("first").await.unwrap();
    match acquire("second").await.unwrap_err() {
        InternalClientError::Remote { error, .. } => {
            assert_eq!(error.code.http_status(), 429);
            assert_eq!(error.code, FcErrorCode::ResourceThrottled);
            assert!(
                error.message.contains("burst pool of 1"),
                "{}",
                error.message
            );
        }
        other => panic!("expected a throttle, got {other}"),
    }
    release(&client, &base, &lease).await;

    // Back to the defaults.
    client.delete(&base, &path).await.unwrap();
    let got: AccountLimits = client.get(&base, &path).await.unwrap();
    assert_eq!(got, defaults);
    acquire("second").await.unwrap();
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_cordon_drain_and_uncordon_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let agent = fake_agent(&pki.files("agent")).await;
    let handle = start_scheduler(dir.path(), &pki).await;
    let base = base(handle.addr());
    let client = InternalClient::new(&pki.files("gateway-internal")).unwrap();
    let agent_client = InternalClient::new(&pki.files("agent")).unwrap();
    let reg: RegisterNodeResponse = agent_client
        .post(
            &base,
            paths::NODES_REGISTER,
            &registration(None, &agent.url),
        )
        .await
        .unwrap();
    let node = reg.node_id;
    let act = |action: &'static str| {
        let client = client.clone();
        let base = base.clone();
        let node = node.clone();
        async move {
            client
                .post::<_, NodeInfo>(&base, &paths::node_action(&node, action), &())
                .await
        }
    };
    let lease: Lease = client
        .post(
            &base,
            paths::LEASES,
            &AcquireLease {
                request_id: "r-1".into(),
                spec: spec("f", 1),
            },
        )
        .await
        .unwrap();

    assert_eq!(act("cordon").await.unwrap().state, "cordoned");
    let err = client
        .post::<_, Lease>(
            &base,
            paths::LEASES,
            &AcquireLease {
                request_id: "r-2".into(),
                spec: spec("g", 1),
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, InternalClientError::Remote { ref error, .. } if error.code == FcErrorCode::ServiceUnavailable),
        "{err}"
    );
    let drained = act("drain").await.unwrap();
    assert_eq!(drained.state, "draining");
    assert_eq!(drained.instances, 1, "its call is still running");
    release(&client, &base, &lease).await;
    let nodes: Vec<NodeInfo> = client.get(&base, paths::SCHEDULER_NODES).await.unwrap();
    assert_eq!(nodes[0].instances, 0);
    assert_eq!(act("uncordon").await.unwrap().state, "ready");
    // The heartbeat answer omits `reprovision` unless it is true.
    let raw = agent_client
        .send(
            Request::builder()
                .method(Method::POST)
                .uri(format!("{base}{}", paths::node_heartbeat(&node)))
                .body(full(r#"{"instances":[]}"#))
                .unwrap(),
        )
        .await
        .unwrap();
    let body = raw.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(v.get("reprovision").is_none(), "{v}");
    let hb: HeartbeatResponse = serde_json::from_value(v).unwrap();
    assert!(!hb.reprovision);

    // Unknown nodes and bad ids are refused.
    let err = client
        .post::<_, NodeInfo>(&base, "/v1/nodes/n-nope/drain", &())
        .await
        .unwrap_err();
    assert!(
        matches!(err, InternalClientError::Remote { ref error, .. } if error.code == FcErrorCode::InvalidArgument && error.message.contains("not registered")),
        "{err}"
    );
    handle.shutdown().await;
}

/// A fake agent in a runtime of its own, heartbeating like a real one:
/// shutting the runtime down kills it like a process (its sockets close,
/// its heartbeats stop).
struct AgentProcess {
    rt: Option<tokio::runtime::Runtime>,
    url: String,
    log: Arc<Mutex<AgentLog>>,
}

impl AgentProcess {
    async fn start(files: TlsFiles) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        rt.spawn(async move {
            let agent = fake_agent(&files).await;
            let _ = tx.send((agent.url.clone(), agent.log.clone()));
            // Keep serving until the runtime dies.
            let _keep = agent;
            std::future::pending::<()>().await;
        });
        let (url, log) = rx.await.unwrap();
        Self {
            url,
            log,
            rt: Some(rt),
        }
    }

    fn heartbeat(&self, client: InternalClient, base: String, node: kiln_core::NodeId) {
        let log = self.log.clone();
        self.rt.as_ref().unwrap().spawn(async move {
            loop {
                let instances: Vec<InstanceId> = {
                    let log = log.lock().unwrap();
                    log.created
                        .iter()
                        .filter(|i| !log.destroyed.contains(i))
                        .cloned()
                        .collect()
                };
                let _ = client
                    .post::<_, HeartbeatResponse>(
                        &base,
                        &paths::node_heartbeat(&node),
                        &Heartbeat { instances },
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }

    fn kill(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_killed_under_load_fails_its_calls_retryably_and_nothing_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let mut config = SchedulerConfig::new(
        dir.path().join("scheduler"),
        "127.0.0.1:0".parse().unwrap(),
        pki.files("scheduler"),
    );
    config.heartbeat_interval_ms = 100;
    config.node_failure_after_ms = 400;
    config.instance_start_timeout_ms = 2_000;
    let handle = kiln_scheduler::start(config).await.unwrap();
    let base = base(handle.addr());
    let client = InternalClient::new(&pki.files("gateway-internal"))
        .unwrap()
        .with_timeout(Duration::from_secs(5));
    let a_client = InternalClient::new(&pki.agent(&"n-a".parse().unwrap()).unwrap()).unwrap();
    let b_client = InternalClient::new(&pki.agent(&"n-b".parse().unwrap()).unwrap()).unwrap();
    let register = |agent_client: InternalClient, url: String| {
        let base = base.clone();
        async move {
            agent_client
                .post::<_, RegisterNodeResponse>(
                    &base,
                    paths::NODES_REGISTER,
                    &registration(None, &url),
                )
                .await
                .unwrap()
                .node_id
        }
    };
    let mut a = AgentProcess::start(pki.files("agent")).await;
    let a_id = register(a_client.clone(), a.url.clone()).await;
    assert_eq!(a_id.as_str(), "n-a", "the node id is the certificate's");
    a.heartbeat(a_client.clone(), base.clone(), a_id.clone());
    let acquire = |function: &'static str, i: usize| {
        let client = client.clone();
        let base = base.clone();
        async move {
            tokio::time::timeout(
                Duration::from_secs(10),
                client.post::<_, Lease>(
                    &base,
                    paths::LEASES,
                    &AcquireLease {
                        request_id: format!("r-{function}-{i}"),
                        spec: spec(function, 4),
                    },
                ),
            )
            .await
            .expect("an acquire hung")
        }
    };
    // Calls in flight on A when it dies.
    let mut on_a = Vec::new();
    for i in 0..8 {
        let l = acquire("held", i).await.unwrap();
        assert_eq!(l.node_id, a_id);
        on_a.push(l);
    }
    let b = AgentProcess::start(pki.files("agent")).await;
    let b_id = register(b_client.clone(), b.url.clone()).await;
    b.heartbeat(b_client.clone(), base.clone(), b_id.clone());

    // Load: workers acquire, "run" 20 ms, release, and note every outcome.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..6 {
        let stop = stop.clone();
        let client = client.clone();
        let base = base.clone();
        workers.push(tokio::spawn(async move {
            let mut outcomes: Vec<(std::time::Instant, Result<kiln_core::NodeId, FcErrorCode>)> =
                Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                i += 1;
                let started = std::time::Instant::now();
                let req = AcquireLease {
                    request_id: format!("w{w}-{i}"),
                    spec: spec("load", 4),
                };
                let r = tokio::time::timeout(
                    Duration::from_secs(10),
                    client.post::<_, Lease>(&base, paths::LEASES, &req),
                )
                .await
                .expect("an acquire hung");
                let outcome = match r {
                    Ok(l) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        let rel = tokio::time::timeout(
                            Duration::from_secs(10),
                            client.call::<_, ()>(
                                Method::DELETE,
                                &base,
                                &paths::lease(&l.lease_id),
                                Some(&ReleaseLease {
                                    outcome: LeaseOutcome::Ok,
                                }),
                            ),
                        )
                        .await
                        .expect("a release hung");
                        rel.map(|()| l.node_id).map_err(|e| e.to_fc().code)
                    }
                    Err(e) => Err(e.to_fc().code),
                };
                outcomes.push((started, outcome));
            }
            outcomes
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.kill();
    let killed = std::time::Instant::now();
    // The scheduler notices within its failure window and a tick.
    let mut noticed = None;
    for _ in 0..100 {
        let nodes: Vec<NodeInfo> = client.get(&base, paths::SCHEDULER_NODES).await.unwrap();
        if nodes
            .iter()
            .any(|n| n.node_id == a_id && n.state == "failed")
        {
            noticed = Some(std::time::Instant::now());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let noticed = noticed.expect("the dead agent's node was never marked failed");
    assert!(noticed - killed < Duration::from_secs(3));
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut ok_after = 0;
    for w in workers {
        for (started, outcome) in w.await.unwrap() {
            match outcome {
                Ok(node) => {
                    if started > noticed {
                        assert_eq!(node, b_id, "a new call went to the dead node");
                        ok_after += 1;
                    }
                }
                Err(code) => {
                    assert_eq!(code, FcErrorCode::ServiceUnavailable, "not retryable");
                    assert!(
                        started < noticed,
                        "a call failed after the failure was known"
                    );
                }
            }
        }
    }
    assert!(
        ok_after > 20,
        "only {ok_after} calls succeeded on the live node"
    );
    // The calls that were running on A end with a retryable error.
    for l in on_a {
        let err = client
            .call::<_, ()>(
                Method::DELETE,
                &base,
                &paths::lease(&l.lease_id),
                Some(&ReleaseLease {
                    outcome: LeaseOutcome::Ok,
                }),
            )
            .await
            .unwrap_err();
        assert_eq!(err.to_fc().code, FcErrorCode::ServiceUnavailable);
        assert!(err.to_fc().message.contains("retry"), "{err}");
    }
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_configs_start_instances_in_the_background_and_persist() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let agent = fake_agent(&pki.files("agent")).await;
    let handle = start_scheduler(dir.path(), &pki).await;
    let base = base(handle.addr());
    let client = InternalClient::new(&pki.files("gateway-internal")).unwrap();
    let agent_client = InternalClient::new(&pki.files("agent")).unwrap();
    let reg: RegisterNodeResponse = agent_client
        .post(
            &base,
            paths::NODES_REGISTER,
            &registration(None, &agent.url),
        )
        .await
        .unwrap();
    let put = |target: u32, expr: &str| PutProvision {
        spec: spec("prov", 1),
        qualifier: kiln_internal_api::LATEST.into(),
        config: ProvisionConfig {
            target,
            always_allocate_cpu: true,
            scheduled_actions: if expr.is_empty() {
                vec![]
            } else {
                vec![ScheduledAction {
                    name: "a".into(),
                    schedule_expression: expr.into(),
                    target: 1,
                    time_zone: None,
                    start_time: None,
                    end_time: None,
                }]
            },
            target_tracking_policies: vec![],
        },
    };
    // A bad schedule is refused and changes nothing.
    let err = client
        .call::<_, ProvisionStatus>(
            Method::PUT,
            &base,
            paths::FUNCTIONS_PROVISION,
            Some(&put(2, "cron(0 0 99 * * *)")),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, InternalClientError::Remote { ref error, .. } if error.code == FcErrorCode::InvalidArgument && error.message.contains("hours")),
        "{err}"
    );
    let list: Vec<ProvisionStatus> = client.get(&base, paths::FUNCTIONS_PROVISION).await.unwrap();
    assert!(list.is_empty());

    let status: ProvisionStatus = client
        .call(
            Method::PUT,
            &base,
            paths::FUNCTIONS_PROVISION,
            Some(&put(2, "")),
        )
        .await
        .unwrap();
    assert_eq!((status.target, status.desired), (2, 2));
    // The agent starts them without any call.
    let mut started = false;
    for _ in 0..100 {
        if agent.log.lock().unwrap().created.len() == 2 {
            started = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(started, "provisioned instances were never started");
    // FC's alwaysAllocateCPU travels with each provisioned instance, and
    // every heartbeat answers the node's instances that must stay unfrozen.
    let provisioned = agent.log.lock().unwrap().created.clone();
    assert_eq!(agent.log.lock().unwrap().always_allocate_cpu, provisioned);
    let beat: HeartbeatResponse = agent_client
        .post(
            &base,
            &paths::node_heartbeat(&reg.node_id),
            &Heartbeat {
                instances: provisioned.clone(),
            },
        )
        .await
        .unwrap();
    let mut sorted = provisioned.clone();
    sorted.sort();
    assert_eq!(beat.always_allocate_cpu, sorted);
    let lease: Lease = client
        .post(
            &base,
            paths::LEASES,
            &AcquireLease {
                request_id: "r-p".into(),
                spec: spec("prov", 1),
            },
        )
        .await
        .unwrap();
    assert!(!lease.cold_start);
    release(&client, &base, &lease).await;
    // An on-demand instance is created without it.
    let lease: Lease = client
        .post(
            &base,
            paths::LEASES,
            &AcquireLease {
                request_id: "r-od".into(),
                spec: spec("ondemand", 1),
            },
        )
        .await
        .unwrap();
    assert!(lease.cold_start);
    release(&client, &base, &lease).await;
    {
        let log = agent.log.lock().unwrap();
        assert_eq!(log.created.len(), 3);
        assert_eq!(log.always_allocate_cpu, provisioned);
    }

    // The configuration and its instances survive a restart.
    handle.shutdown().await;
    let handle = start_scheduler(dir.path(), &pki).await;
    let base = base_of(&handle);
    let list: Vec<ProvisionStatus> = client.get(&base, paths::FUNCTIONS_PROVISION).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!((list[0].target, list[0].current), (2, 2));
    let f = FunctionRef {
        account_id: "100".parse().unwrap(),
        function_name: "prov".parse().unwrap(),
        qualifier: kiln_internal_api::LATEST.into(),
    };
    client
        .call::<_, ()>(Method::DELETE, &base, paths::FUNCTIONS_PROVISION, Some(&f))
        .await
        .unwrap();
    let err = client
        .call::<_, ()>(Method::DELETE, &base, paths::FUNCTIONS_PROVISION, Some(&f))
        .await
        .unwrap_err();
    assert!(
        matches!(err, InternalClientError::Remote { ref error, .. } if error.code == FcErrorCode::FunctionNotFound),
        "{err}"
    );
    let list: Vec<ProvisionStatus> = client.get(&base, paths::FUNCTIONS_PROVISION).await.unwrap();
    assert!(list.is_empty());
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_past_its_validity_is_told_to_reprovision_over_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let agent = fake_agent(&pki.files("agent")).await;
    let clock = kiln_core::ManualClock::new(1_000_000);
    let mut config = SchedulerConfig::new(
        dir.path().join("scheduler"),
        "127.0.0.1:0".parse().unwrap(),
        pki.files("scheduler"),
    );
    // Silence is never fatal here: the clock jumps days.
    config.node_failure_after_ms = u64::MAX / 4;
    let handle = kiln_scheduler::start_with(
        config,
        kiln_scheduler::Overrides {
            clock: Some(Arc::new(clock.clone())),
            agent: None,
        },
    )
    .await
    .unwrap();
    let base = base(handle.addr());
    let agent_client = InternalClient::new(&pki.files("agent")).unwrap();
    let reg: RegisterNodeResponse = agent_client
        .post(
            &base,
            paths::NODES_REGISTER,
            &registration(None, &agent.url),
        )
        .await
        .unwrap();
    let beat = || {
        let agent_client = agent_client.clone();
        let base = base.clone();
        let node = reg.node_id.clone();
        async move {
            agent_client
                .post::<_, HeartbeatResponse>(
                    &base,
                    &paths::node_heartbeat(&node),
                    &Heartbeat { instances: vec![] },
                )
                .await
                .unwrap()
        }
    };
    assert!(!beat().await.reprovision);
    // 120 h pass in an instant; the scheduler's ticks drain, then retire.
    clock.advance(Duration::from_secs(120 * 3600));
    let mut told = false;
    for _ in 0..100 {
        if beat().await.reprovision {
            told = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(told, "the agent was never told to re-provision");
    let client = InternalClient::new(&pki.files("operator")).unwrap();
    let state = |nodes: Vec<NodeInfo>| {
        nodes
            .iter()
            .find(|n| n.node_id == reg.node_id)
            .map(|n| n.state.clone())
            .unwrap()
    };
    let nodes: Vec<NodeInfo> = client.get(&base, paths::SCHEDULER_NODES).await.unwrap();
    assert_eq!(state(nodes), "retired");
    // It comes back under its certificate's id, ready, with a new validity.
    let again: RegisterNodeResponse = agent_client
        .post(
            &base,
            paths::NODES_REGISTER,
            &registration(Some(reg.node_id.clone()), &agent.url),
        )
        .await
        .unwrap();
    assert_eq!(again.node_id, reg.node_id);
    let nodes: Vec<NodeInfo> = client.get(&base, paths::SCHEDULER_NODES).await.unwrap();
    assert_eq!(state(nodes), "ready");
    assert!(!beat().await.reprovision);
    handle.shutdown().await;
}

/// A second certificate for node `node` (as a stolen bootstrap or a
/// duplicated node would have), written as `<name>.pem` in the PKI dir.
fn second_agent_certificate(pki: &DevPki, node: &kiln_core::NodeId, name: &str) -> TlsFiles {
    let identity = kiln_pki::Identity::agent(DevPki::TRUST_DOMAIN, node.clone()).unwrap();
    let files = pki.files(name);
    pki.ca()
        .issue(
            &kiln_pki::CertRequest::for_identity(identity, kiln_pki::Usage::ServerAndClient)
                .names(&["127.0.0.1".to_owned()]),
        )
        .unwrap()
        .write(&files.cert, &files.key)
        .unwrap();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_node_is_not_taken_over_from_another_certificate_at_another_url() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let handle = start_scheduler(dir.path(), &pki).await;
    let base = base(handle.addr());
    let node: kiln_core::NodeId = "n-a".parse().unwrap();
    let real = InternalClient::new(&pki.agent(&node).unwrap()).unwrap();
    let twin = InternalClient::new(&second_agent_certificate(&pki, &node, "twin")).unwrap();
    let operator = InternalClient::new(&pki.files("operator")).unwrap();
    let url_of = |nodes: Vec<NodeInfo>| {
        nodes
            .into_iter()
            .find(|n| n.node_id == node)
            .map(|n| n.agent_url)
    };

    let reg: RegisterNodeResponse = real
        .post(
            &base,
            paths::NODES_REGISTER,
            &registration(None, "https://127.0.0.1:7001"),
        )
        .await
        .unwrap();
    assert_eq!(reg.node_id, node, "no node id: the certificate's");
    // Another certificate for the same node, at another URL, while the
    // node is live: refused, and the node still points at the real agent.
    let err = twin
        .post::<_, RegisterNodeResponse>(
            &base,
            paths::NODES_REGISTER,
            &registration(Some(node.clone()), "https://127.0.0.1:7002"),
        )
        .await
        .unwrap_err();
    let e = err.to_fc();
    assert_eq!(e.code, FcErrorCode::AccessDenied, "{e:?}");
    assert!(
        e.message.contains("live at https://127.0.0.1:7001"),
        "{}",
        e.message
    );
    let nodes: Vec<NodeInfo> = operator.get(&base, paths::SCHEDULER_NODES).await.unwrap();
    assert_eq!(url_of(nodes).as_deref(), Some("https://127.0.0.1:7001"));
    // The real agent restarted on another port: the same certificate moves.
    real.post::<_, RegisterNodeResponse>(
        &base,
        paths::NODES_REGISTER,
        &registration(Some(node.clone()), "https://127.0.0.1:7003"),
    )
    .await
    .unwrap();
    // A renewed certificate at the node's URL is the node itself.
    twin.post::<_, RegisterNodeResponse>(
        &base,
        paths::NODES_REGISTER,
        &registration(Some(node.clone()), "https://127.0.0.1:7003"),
    )
    .await
    .unwrap();
    let nodes: Vec<NodeInfo> = operator.get(&base, paths::SCHEDULER_NODES).await.unwrap();
    assert_eq!(url_of(nodes).as_deref(), Some("https://127.0.0.1:7003"));
    handle.shutdown().await;
}
