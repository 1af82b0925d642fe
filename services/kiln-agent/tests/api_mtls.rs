//! The real agent API over mutual TLS (DevPki in a temporary directory),
//! with a fake sandbox driver whose "sandbox" is a local HTTP server.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kiln_agent::testing::{sample_spec, serve_http1, FakeDriver, FakeScheduler};
use kiln_agent::{AgentConfig, Backends, GatewayCodeSource, NodeConfig, ZipUnpacker};
use kiln_core::InstanceId;
use kiln_internal_api::server::{full, stream, Body};
use kiln_internal_api::{
    paths, CreateInstance, InstanceCreated, InstanceInfo, InternalClient, Tenancy,
};
use kiln_pki::DevPki;
use tokio::net::TcpListener;

/// A package with one file.
fn zip_package() -> Vec<u8> {
    use std::io::Write;
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    w.start_file(
        "server.sh",
        zip::write::SimpleFileOptions::default().unix_permissions(0o755),
    )
    .unwrap();
    w.write_all(b"#!/bin/sh\n").unwrap();
    w.finish().unwrap().into_inner()
}

/// The gateway's internal listener: serves one package by digest, over
/// mTLS with the gateway's identity.
async fn fake_gateway(
    pki: &DevPki,
    zip: Vec<u8>,
) -> (String, String, Arc<std::sync::atomic::AtomicUsize>) {
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(&zip));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let tls = kiln_pki::internal_server_config(&pki.files("gateway-internal")).unwrap();
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (zip, want, count) = (Bytes::from(zip), digest.clone(), served.clone());
    tokio::spawn(kiln_internal_api::server::serve_tls(
        listener,
        tls,
        move |req: Request<hyper::body::Incoming>, _conn| {
            let (zip, want, count) = (zip.clone(), want.clone(), count.clone());
            async move {
                if req.uri().path() == paths::code(&want) {
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    http::Response::new(full(zip))
                } else {
                    kiln_internal_api::server::error(
                        &kiln_core::FcError::new(
                            kiln_core::FcErrorCode::FunctionNotFound,
                            "no such code",
                        ),
                        "r",
                    )
                }
            }
        },
        std::future::pending(),
    ));
    (url, digest, served)
}

fn config(state: &std::path::Path, pki: &DevPki, drain: bool) -> AgentConfig {
    AgentConfig {
        state_dir: state.join("agent"),
        listen: "127.0.0.1:0".parse().unwrap(),
        advertise_url: None,
        scheduler_url: "https://127.0.0.1:1".into(),
        gateway_internal_url: "https://127.0.0.1:1".into(),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        region: Some("cn-hangzhou".into()),
        instance_start_timeout_ms: 2_000,
        drain_on_shutdown: drain,
        runtimes: kiln_core::RuntimeName::ALL.to_vec(),
        tls: pki.files("agent"),
        bootstrap: None,
        node: NodeConfig {
            zone: "zone-a".into(),
            tenancy: Tenancy::Dedicated,
            dedicated_account: None,
            memory_mb: 4096,
            cpu_milli: 2000,
            max_instances: 8,
        },
        sandbox: Default::default(),
        usage: Default::default(),
        limits: Default::default(),
        code_cache: Default::default(),
        images: Default::default(),
    }
}

struct Fakes {
    driver: Arc<FakeDriver>,
    gateway_url: String,
    pki_agent: kiln_pki::TlsFiles,
    scheduler: Arc<FakeScheduler>,
}

impl Fakes {
    /// Real code source (the gateway over mTLS) and unpacker; fake driver
    /// and scheduler.
    fn backends(&self) -> Backends {
        let client = InternalClient::new(&self.pki_agent).unwrap();
        Backends {
            driver: self.driver.clone(),
            code_source: Arc::new(GatewayCodeSource::new(client, &self.gateway_url)),
            unpacker: Arc::new(ZipUnpacker),
            scheduler: self.scheduler.clone(),
        }
    }
}

#[tokio::test]
async fn the_agent_api_over_mtls() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&tmp.path().join("pki"), &[]).unwrap();

    // The function's runtime: answers with what it was sent.
    let runtime = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let runtime_addr = runtime.local_addr().unwrap();
    serve_http1(runtime, |req: Request<hyper::body::Incoming>| async move {
        let name = req.headers()["x-fc-function-name"].clone();
        http::Response::builder()
            .header("x-function", name)
            .body(stream(req.into_body()))
            .unwrap()
    });
    let (gateway_url, digest, served) = fake_gateway(&pki, zip_package()).await;
    let fakes = Fakes {
        driver: Arc::new(FakeDriver::at(runtime_addr)),
        gateway_url,
        pki_agent: pki.files("agent"),
        scheduler: Arc::new(FakeScheduler::new(50)),
    };

    let agent = kiln_agent::start_with(config(tmp.path(), &pki, false), fakes.backends())
        .await
        .unwrap();
    let base = format!("https://{}", agent.addr());
    assert_eq!(agent.agent_url(), base);
    // The gateway's identity invokes; the scheduler's places and removes
    // instances (each may call only its own routes).
    let client = InternalClient::new(&pki.files("gateway-internal")).unwrap();
    let scheduler = InternalClient::new(&pki.files("scheduler")).unwrap();

    let health: serde_json::Value = client.get(&base, paths::HEALTH).await.unwrap();
    assert_eq!(health["status"], "ok");

    let id = InstanceId::generate();
    let created: InstanceCreated = scheduler
        .post(
            &base,
            paths::AGENT_INSTANCES,
            &CreateInstance {
                instance_id: id.clone(),
                spec: sample_spec(&digest, 9000),
                always_allocate_cpu: false,
            },
        )
        .await
        .unwrap();
    assert_eq!(created.instance_id, id);
    // The code came from the gateway, verified and extracted once.
    let code_dir = &fakes.driver.requests()[0].code_dir;
    assert_eq!(
        std::fs::read(code_dir.join("server.sh")).unwrap(),
        b"#!/bin/sh\n"
    );
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 1);

    // Code the gateway does not have: its error reaches the scheduler.
    let mut missing = sample_spec(&"ab".repeat(32), 9000);
    missing.code_digest = "ab".repeat(32);
    let err = scheduler
        .post::<_, InstanceCreated>(
            &base,
            paths::AGENT_INSTANCES,
            &CreateInstance {
                instance_id: InstanceId::generate(),
                spec: missing.seal(),
                always_allocate_cpu: false,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.to_fc().code, kiln_core::FcErrorCode::FunctionNotFound);

    // Invoke over HTTP/2 + mTLS, the body streamed through.
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("{base}{}", paths::agent_invoke(&id)))
        .header("x-fc-request-id", "r-1")
        .body(full(Bytes::from_static(b"payload")))
        .unwrap();
    let resp = client.send(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        kiln_internal_api::InvokeOutcome::of(resp.headers()),
        Some(Ok(kiln_internal_api::InvokeOutcome::Ok))
    );
    assert_eq!(resp.headers()["x-function"], "hello");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"payload");

    // A large payload crosses HTTP/2 flow control and back intact.
    let big: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("{base}{}", paths::agent_invoke(&id)))
        .body(full(Bytes::from(big.clone())))
        .unwrap();
    let resp = client.send(req).await.unwrap();
    assert_eq!(
        kiln_internal_api::InvokeOutcome::of(resp.headers()),
        Some(Ok(kiln_internal_api::InvokeOutcome::Ok))
    );
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(
        body[..] == big[..],
        "echoed {} of {} bytes",
        body.len(),
        big.len()
    );

    let list: Vec<InstanceInfo> = scheduler.get(&base, paths::AGENT_INSTANCES).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].instance_id, id);
    assert_eq!(list[0].in_flight, 0);

    // Registered with the scheduler, reporting the instance.
    for _ in 0..200 {
        if !fakes.scheduler.state.lock().unwrap().heartbeats.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    {
        let s = fakes.scheduler.state.lock().unwrap();
        assert_eq!(s.registrations[0].agent_url, base);
        assert_eq!(s.heartbeats.last().unwrap().1.instances, vec![id.clone()]);
    }
    assert_eq!(
        list[0].node_id,
        Some(
            fakes.scheduler.state.lock().unwrap().heartbeats[0]
                .0
                .clone()
        )
    );

    // Bad input: an FC error, nothing changed.
    let err = scheduler
        .call::<serde_json::Value, serde_json::Value>(
            Method::POST,
            &base,
            paths::AGENT_INSTANCES,
            Some(&serde_json::json!({"instance_id": "x"})),
        )
        .await
        .unwrap_err();
    assert_eq!(err.to_fc().code, kiln_core::FcErrorCode::InvalidArgument);
    let err = scheduler
        .delete(&base, "/v1/instances/..%2Fetc")
        .await
        .unwrap_err();
    assert_eq!(err.to_fc().code, kiln_core::FcErrorCode::InvalidArgument);
    let err = client
        .get::<serde_json::Value>(&base, "/v1/nothing")
        .await
        .unwrap_err();
    assert_eq!(err.to_fc().code, kiln_core::FcErrorCode::PathNotSupported);
    assert_eq!(agent.instances().ids(), vec![id.clone()]);

    // The gateway may not create or destroy, nor the scheduler invoke: 403
    // AccessDenied, nothing changed.
    let err = client
        .delete(&base, &paths::agent_instance(&id))
        .await
        .unwrap_err();
    assert_eq!(err.to_fc().code, kiln_core::FcErrorCode::AccessDenied);
    assert_eq!(
        err.to_fc().message,
        "role gateway may not call DELETE /v1/instances/{id}"
    );
    let resp = scheduler
        .send(
            Request::builder()
                .method(Method::POST)
                .uri(format!("{base}{}", paths::agent_invoke(&id)))
                .body(full(Bytes::from_static(b"payload")))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(agent.instances().ids(), vec![id.clone()]);

    // Metrics on the plain-HTTP listener.
    let metrics_url = format!("http://{}/metrics", agent.metrics_addr().unwrap());
    let plain: Client<_, Body> = Client::builder(TokioExecutor::new()).build_http();
    let resp = plain.get(metrics_url.parse().unwrap()).await.unwrap();
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(
        text.contains("kiln_agent_invocations_total{outcome=\"ok\"} 2"),
        "{text}"
    );
    assert!(text.contains("kiln_agent_instances 1"), "{text}");
    assert!(
        text.contains(
            r#"kiln_agent_internal_refusals_total{role="gateway",method="DELETE",route="/v1/instances/{id}"} 1"#
        ),
        "{text}"
    );

    // No client certificate, no service.
    let mut tls = (*kiln_pki::public_client_config(&pki.ca_cert()).unwrap()).clone();
    tls.alpn_protocols.clear();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http2()
        .build();
    let anonymous: Client<_, Body> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(https);
    let refused = anonymous
        .get(format!("{base}{}", paths::HEALTH).parse().unwrap())
        .await;
    assert!(
        refused.is_err(),
        "a client without a certificate was served"
    );

    // Shutdown keeps instances; a restarted agent adopts them.
    agent.shutdown().await;
    assert!(fakes.driver.exists(&id));
    let agent = kiln_agent::start_with(config(tmp.path(), &pki, true), fakes.backends())
        .await
        .unwrap();
    let base = format!("https://{}", agent.addr());
    let list: Vec<InstanceInfo> = scheduler.get(&base, paths::AGENT_INSTANCES).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].instance_id, id);

    // DELETE is idempotent.
    let other = InstanceId::generate();
    scheduler
        .delete(&base, &paths::agent_instance(&other))
        .await
        .unwrap();

    // Draining destroys everything.
    agent.shutdown().await;
    assert!(!fakes.driver.exists(&id));
    assert!(fakes.driver.destroyed().contains(&id));
}

/// A placement that attaches an instance to a VPC its account does not
/// own is refused by the agent, even when it comes with the scheduler's
/// real credentials (a scheduler that is wrong, or someone holding its
/// key): FC's AccessDenied, nothing created. The owner's placement passes
/// the check.
/// A runtime that takes HTTP/1.1 upgrades and echoes the upgraded
/// connection's bytes (the agent copies bytes; it does not read frames).
fn serve_upgrading_runtime(listener: TcpListener) {
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |mut req: Request<hyper::body::Incoming>| async move {
                        let path = req.uri().to_string();
                        if req.headers().get(http::header::UPGRADE).is_none() {
                            return Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .status(400)
                                    .body(full("no upgrade"))
                                    .unwrap(),
                            );
                        }
                        let on = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            if let Ok(up) = on.await {
                                let (mut r, mut w) =
                                    tokio::io::split(hyper_util::rt::TokioIo::new(up));
                                let _ = tokio::io::copy(&mut r, &mut w).await;
                            }
                        });
                        Ok(http::Response::builder()
                            .status(StatusCode::SWITCHING_PROTOCOLS)
                            .header("connection", "Upgrade")
                            .header("upgrade", "websocket")
                            .header("x-seen", path)
                            .body(kiln_internal_api::server::empty())
                            .unwrap())
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
}

fn websocket_request(
    base: &str,
    id: &InstanceId,
) -> Request<kiln_internal_api::invoke_client::Payload> {
    Request::builder()
        .method(Method::GET)
        .uri(format!("{base}{}", paths::agent_websocket(id)))
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header(kiln_internal_api::invoke::HTTP_METHOD_HEADER, "GET")
        .header(kiln_internal_api::invoke::HTTP_PATH_HEADER, "/chat?room=1")
        .header("x-fc-request-id", "r-ws")
        .body(kiln_internal_api::invoke_client::whole(Bytes::new()))
        .unwrap()
}

async fn in_flight(scheduler: &InternalClient, base: &str) -> u32 {
    let list: Vec<InstanceInfo> = scheduler.get(base, paths::AGENT_INSTANCES).await.unwrap();
    list[0].in_flight
}

/// An HTTP trigger's WebSocket through the agent over mutual TLS: only the
/// gateway's identity gets an upgrade; the function's `101` comes back,
/// bytes go both ways, and the open connection is one call in flight on
/// its instance until it closes.
#[tokio::test]
async fn websocket_upgrades_are_the_gateways_alone() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&tmp.path().join("pki"), &[]).unwrap();
    let runtime = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let runtime_addr = runtime.local_addr().unwrap();
    serve_upgrading_runtime(runtime);
    let (gateway_url, digest, _) = fake_gateway(&pki, zip_package()).await;
    let fakes = Fakes {
        driver: Arc::new(FakeDriver::at(runtime_addr)),
        gateway_url,
        pki_agent: pki.files("agent"),
        scheduler: Arc::new(FakeScheduler::new(50)),
    };
    let agent = kiln_agent::start_with(config(tmp.path(), &pki, false), fakes.backends())
        .await
        .unwrap();
    let base = format!("https://{}", agent.addr());
    let scheduler = InternalClient::new(&pki.files("scheduler")).unwrap();
    let id = InstanceId::generate();
    let _: InstanceCreated = scheduler
        .post(
            &base,
            paths::AGENT_INSTANCES,
            &CreateInstance {
                instance_id: id.clone(),
                spec: sample_spec(&digest, 9000),
                always_allocate_cpu: false,
            },
        )
        .await
        .unwrap();

    // The scheduler's identity, or another agent's, gets no upgrade.
    for role in ["scheduler", "agent"] {
        let intruder = kiln_internal_api::InvokeClient::new(
            kiln_pki::internal_client_config(&pki.files(role)).unwrap(),
        );
        let resp = intruder
            .send_upgrade(websocket_request(&base, &id))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{role}");
    }
    assert_eq!(in_flight(&scheduler, &base).await, 0);

    // The gateway's: the runtime's 101, with the caller's path.
    let gateway = kiln_internal_api::InvokeClient::new(
        kiln_pki::internal_client_config(&pki.files("gateway-internal")).unwrap(),
    );
    let mut resp = gateway
        .send_upgrade(websocket_request(&base, &id))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(resp.headers()["upgrade"], "websocket");
    assert_eq!(resp.headers()["x-seen"], "/chat?room=1");
    assert_eq!(
        kiln_internal_api::InvokeOutcome::of(resp.headers()),
        Some(Ok(kiln_internal_api::InvokeOutcome::Ok))
    );
    let mut io = hyper_util::rt::TokioIo::new(hyper::upgrade::on(&mut resp).await.unwrap());
    for msg in [&b"ping"[..], &[0u8, 255, 1, 254][..]] {
        io.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        io.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
    }
    // Open: one call in flight on the instance; closed: none.
    assert_eq!(in_flight(&scheduler, &base).await, 1);
    drop(io);
    let mut left = 1;
    for _ in 0..200 {
        left = in_flight(&scheduler, &base).await;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(left, 0, "the closed WebSocket still counts");

    // A request that is no HTTP/1.1 upgrade (here over HTTP/2, the
    // control client's protocol) is refused.
    let control = InternalClient::new(&pki.files("gateway-internal")).unwrap();
    let resp = control
        .send(
            Request::builder()
                .method(Method::GET)
                .uri(format!("{base}{}", paths::agent_websocket(&id)))
                .body(kiln_internal_api::server::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn the_agent_refuses_a_vpc_its_account_does_not_own() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&tmp.path().join("pki"), &[]).unwrap();
    let runtime = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let runtime_addr = runtime.local_addr().unwrap();
    serve_http1(runtime, |_req: Request<hyper::body::Incoming>| async move {
        http::Response::builder().body(full("ok")).unwrap()
    });
    let (gateway_url, digest, _served) = fake_gateway(&pki, zip_package()).await;
    let fakes = Fakes {
        driver: Arc::new(FakeDriver::at(runtime_addr)),
        gateway_url,
        pki_agent: pki.files("agent"),
        scheduler: Arc::new(FakeScheduler::new(50)),
    };
    let mut c = config(tmp.path(), &pki, false);
    c.sandbox.network = Some(
        serde_json::from_value(serde_json::json!({
            "vpcs": [{
                "id": "vpc-a",
                "cidr": "192.168.0.0/16",
                "owners": ["1234"],
                "vswitches": [{"id": "vsw-a", "cidr": "192.168.10.0/24",
                    "gateway": "192.168.10.1", "instance_pool": "192.168.10.128/25"}],
                "security_groups": [{"id": "sg-a"}],
            }],
        }))
        .unwrap(),
    );
    let agent = kiln_agent::start_with(c, fakes.backends()).await.unwrap();
    let base = format!("https://{}", agent.addr());
    let scheduler = InternalClient::new(&pki.files("scheduler")).unwrap();
    let spec = |account: &str| {
        let mut s = sample_spec(&digest, 9000);
        s.account_id = account.parse().unwrap();
        s.network = Some(kiln_core::NetworkSpec {
            internet_access: false,
            vpc: Some(kiln_core::VpcAttachment {
                vpc_id: "vpc-a".into(),
                vswitch_ids: vec!["vsw-a".into()],
                security_group_id: "sg-a".into(),
            }),
        });
        s.seal()
    };

    let err = scheduler
        .post::<_, InstanceCreated>(
            &base,
            paths::AGENT_INSTANCES,
            &CreateInstance {
                instance_id: InstanceId::generate(),
                spec: spec("5678"),
                always_allocate_cpu: false,
            },
        )
        .await
        .unwrap_err();
    let fc = err.to_fc();
    assert_eq!(fc.code, kiln_core::FcErrorCode::AccessDenied, "{fc:?}");
    assert!(
        fc.message.contains("5678") && fc.message.contains("vpc-a"),
        "{}",
        fc.message
    );
    assert!(fakes.driver.requests().is_empty(), "a sandbox was made");
    let list: Vec<InstanceInfo> = scheduler.get(&base, paths::AGENT_INSTANCES).await.unwrap();
    assert!(list.is_empty());

    // The owner's instance is placed.
    scheduler
        .post::<_, InstanceCreated>(
            &base,
            paths::AGENT_INSTANCES,
            &CreateInstance {
                instance_id: InstanceId::generate(),
                spec: spec("1234"),
                always_allocate_cpu: false,
            },
        )
        .await
        .unwrap();
    assert_eq!(fakes.driver.requests().len(), 1);
    agent.shutdown().await;
}
