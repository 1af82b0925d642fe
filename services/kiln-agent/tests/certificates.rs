//! The agent's certificate upkeep against a real scheduler over mTLS: a
//! short-lived certificate renewed before it expires while the agent keeps
//! serving, and a revoked node refused by another agent within seconds.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kiln_agent::certs::HttpCertificateApi;
use kiln_agent::config::BootstrapSettings;
use kiln_agent::testing::{FakeCodeSource, FakeDriver, FakeScheduler};
use kiln_agent::{AgentConfig, AgentHandle, Backends, NodeConfig, ZipUnpacker};
use kiln_core::NodeId;
use kiln_internal_api::{
    paths, trust_paths, BootstrapToken, CreateBootstrapToken, InternalClient, NodeRevoked, Tenancy,
};
use kiln_pki::{CertRequest, DevPki, Identity, PeerCert, TlsFiles, Usage};
use kiln_scheduler::config::CertificateSettings;
use kiln_scheduler::{SchedulerConfig, SchedulerHandle};

async fn scheduler(dir: &Path, pki: &DevPki, lifetime_s: u64) -> SchedulerHandle {
    let mut config = SchedulerConfig::new(
        dir.join("scheduler"),
        "127.0.0.1:0".parse().unwrap(),
        pki.files("scheduler"),
    );
    let mut c = CertificateSettings::new(pki.ca_cert(), pki.dir.join("ca-key.pem"));
    c.agent_cert_lifetime_s = lifetime_s;
    config.certificates = Some(c);
    kiln_scheduler::start(config).await.unwrap()
}

fn url(addr: std::net::SocketAddr) -> String {
    format!("https://127.0.0.1:{}", addr.port())
}

/// An agent certificate for `node` living `lifetime`, in `dir`.
fn agent_files(dir: &Path, pki: &DevPki, node: &NodeId, lifetime: Duration) -> TlsFiles {
    let identity = Identity::agent(DevPki::TRUST_DOMAIN, node.clone()).unwrap();
    let issued = pki
        .ca()
        .issue(
            &CertRequest::for_identity(identity, Usage::ServerAndClient)
                .names(&["localhost".to_owned(), "127.0.0.1".to_owned()])
                .lifetime(lifetime),
        )
        .unwrap();
    let files = TlsFiles {
        ca: pki.ca_cert(),
        cert: dir.join(format!("{node}.pem")),
        key: dir.join(format!("{node}-key.pem")),
    };
    issued.write(&files.cert, &files.key).unwrap();
    files
}

async fn agent(dir: &Path, tls: TlsFiles, scheduler_url: &str) -> AgentHandle {
    let mut handle = kiln_agent::start_with(agent_config(dir, tls, scheduler_url), backends())
        .await
        .unwrap();
    let client = handle.trust().client().unwrap();
    handle.keep_certificates(Arc::new(HttpCertificateApi::new(
        client,
        kiln_internal_api::Endpoints::parse(scheduler_url).unwrap(),
    )));
    handle
}

fn backends() -> Backends {
    Backends {
        driver: Arc::new(FakeDriver::at("127.0.0.1:9".parse().unwrap())),
        code_source: Arc::new(FakeCodeSource::new(Duration::ZERO)),
        unpacker: Arc::new(ZipUnpacker),
        scheduler: Arc::new(FakeScheduler::new(1_000)),
    }
}

fn agent_config(dir: &Path, tls: TlsFiles, scheduler_url: &str) -> AgentConfig {
    AgentConfig {
        state_dir: dir.to_owned(),
        listen: "127.0.0.1:0".parse().unwrap(),
        advertise_url: None,
        scheduler_url: scheduler_url.to_owned(),
        gateway_internal_url: "https://127.0.0.1:1".into(),
        metrics_listen: None,
        region: None,
        instance_start_timeout_ms: 2_000,
        drain_on_shutdown: false,
        runtimes: kiln_core::RuntimeName::ALL.to_vec(),
        tls,
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

fn serial(handle: &AgentHandle) -> String {
    PeerCert::from_der(&handle.trust().identity().leaf())
        .unwrap()
        .serial
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_a_20_s_certificate_keeps_serving_across_its_expiry() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&tmp.path().join("pki"), &[]).unwrap();
    let sched = scheduler(tmp.path(), &pki, 20).await;
    let node: NodeId = "n-short".parse().unwrap();
    let files = agent_files(tmp.path(), &pki, &node, Duration::from_secs(20));
    let first_expiry = kiln_pki::Validity::of(&kiln_pki::load_certs(&files.cert).unwrap()[0])
        .unwrap()
        .not_after;
    let handle = agent(&tmp.path().join("agent"), files.clone(), &url(sched.addr())).await;
    let agent_url = url(handle.addr());

    // One connection held open from the start, and a fresh one per probe.
    let held = InternalClient::new(&pki.files("scheduler")).unwrap();
    let mut serials = HashSet::from([serial(&handle)]);
    let mut probes = 0;
    // Until well past the first certificate's expiry (and at least three
    // lifetimes of 20 s), every call succeeds.
    while SystemTime::now() < first_expiry + Duration::from_secs(40) {
        let fresh = InternalClient::new(&pki.files("gateway-internal")).unwrap();
        let v: serde_json::Value = fresh.get(&agent_url, paths::HEALTH).await.unwrap();
        assert_eq!(v["status"], "ok");
        let v: serde_json::Value = held.get(&agent_url, paths::HEALTH).await.unwrap();
        assert_eq!(v["status"], "ok");
        // The agent calls out with its current certificate too.
        let _: kiln_pki::RevocationList = handle
            .trust()
            .client()
            .unwrap()
            .get(&url(sched.addr()), trust_paths::REVOCATIONS)
            .await
            .unwrap();
        serials.insert(serial(&handle));
        probes += 1;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(probes >= 10, "only {probes} probes ran");
    // Renewed at least twice, always as the same node.
    assert!(
        serials.len() >= 3,
        "renewed only {} times",
        serials.len() - 1
    );
    let leaf = handle.trust().identity().leaf();
    assert_eq!(
        Identity::from_certificate(&leaf).unwrap().node(),
        Some(&node)
    );
    assert!(kiln_pki::Validity::of(&leaf).unwrap().not_after > first_expiry);
    // The files hold the certificate in use, with its key.
    assert_eq!(kiln_pki::load_certs(&files.cert).unwrap()[0], leaf);
    kiln_pki::LiveIdentity::load(&files.cert, &files.key).unwrap();
    handle.shutdown().await;
    sched.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_agent_refuses_a_revoked_node_within_seconds() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&tmp.path().join("pki"), &[]).unwrap();
    let sched = scheduler(tmp.path(), &pki, 3600).await;
    let a: NodeId = "n-a".parse().unwrap();
    let b: NodeId = "n-b".parse().unwrap();
    let b_files = agent_files(tmp.path(), &pki, &b, Duration::from_secs(3600));
    let agent_b = agent(&tmp.path().join("b"), b_files, &url(sched.addr())).await;
    let b_url = url(agent_b.addr());

    // A (attacker or not) reaches B over an open connection.
    let from_a = InternalClient::new(&pki.agent(&a).unwrap()).unwrap();
    let _: serde_json::Value = from_a.get(&b_url, paths::HEALTH).await.unwrap();

    let operator = InternalClient::new(&pki.files("operator")).unwrap();
    let revoked: NodeRevoked = operator
        .post(&url(sched.addr()), &trust_paths::node_revoke(&a), &())
        .await
        .unwrap();
    assert_eq!(revoked.node_id, a);

    // B learns it from the scheduler (polled every second): A's open
    // connection is dropped and its handshakes refused. Generous bound.
    let mut refused = None;
    for _ in 0..300 {
        match from_a.get::<serde_json::Value>(&b_url, paths::HEALTH).await {
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.expect("agent B still served the revoked node after 30 s");
    assert!(e.is_unreachable(), "{e}");
    let fresh_a = InternalClient::new(&pki.agent(&a).unwrap()).unwrap();
    let e = fresh_a
        .get::<serde_json::Value>(&b_url, paths::HEALTH)
        .await
        .unwrap_err();
    assert!(e.is_unreachable(), "{e}");
    assert!(agent_b.trust().revocations().is_node_revoked(&a));

    // B still serves the cluster and is not revoked itself.
    let gw = InternalClient::new(&pki.files("gateway-internal")).unwrap();
    let _: serde_json::Value = gw.get(&b_url, paths::HEALTH).await.unwrap();
    agent_b.shutdown().await;
    sched.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_joins_once_with_a_bootstrap_token() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&tmp.path().join("pki"), &[]).unwrap();
    let mut config = SchedulerConfig::new(
        tmp.path().join("scheduler"),
        "127.0.0.1:0".parse().unwrap(),
        pki.files("scheduler"),
    );
    config.certificates = Some(CertificateSettings::new(
        pki.ca_cert(),
        pki.dir.join("ca-key.pem"),
    ));
    config.bootstrap_listen = Some("127.0.0.1:0".parse().unwrap());
    let sched = kiln_scheduler::start(config).await.unwrap();
    let operator = InternalClient::new(&pki.files("operator")).unwrap();
    let token: BootstrapToken = operator
        .post(
            &url(sched.addr()),
            trust_paths::BOOTSTRAP_TOKENS,
            &CreateBootstrapToken {
                ttl_s: 600,
                node_id: None,
            },
        )
        .await
        .unwrap();

    // The node has the CA certificate and the token, nothing else.
    let node_dir = tmp.path().join("node");
    std::fs::create_dir_all(&node_dir).unwrap();
    std::fs::copy(pki.ca_cert(), node_dir.join("ca.pem")).unwrap();
    let token_file = node_dir.join("bootstrap-token");
    std::fs::write(&token_file, format!("{}\n", token.token)).unwrap();
    let tls = TlsFiles {
        ca: node_dir.join("ca.pem"),
        cert: node_dir.join("agent.pem"),
        key: node_dir.join("agent-key.pem"),
    };
    let settings = BootstrapSettings {
        url: url(sched.bootstrap_addr().unwrap()),
        token_file: token_file.clone(),
        names: vec!["localhost".to_owned()],
    };
    let mut config = agent_config(&node_dir.join("state"), tls.clone(), &url(sched.addr()));
    config.bootstrap = Some(settings.clone());
    let handle = kiln_agent::start_with(config.clone(), backends())
        .await
        .unwrap();

    // It holds a certificate for the token's node (the node id it
    // registers under) and serves with it; the token file is gone.
    let leaf = handle.trust().identity().leaf();
    assert_eq!(
        Identity::from_certificate(&leaf).unwrap().node(),
        Some(&token.node_id)
    );
    assert!(!token_file.exists());
    let gw = InternalClient::new(&pki.files("gateway-internal")).unwrap();
    let v: serde_json::Value = gw.get(&url(handle.addr()), paths::HEALTH).await.unwrap();
    assert_eq!(v["status"], "ok");
    handle.shutdown().await;

    // The same token again, on another machine: refused, nothing written.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(&token_file, &token.token).unwrap();
    let mut again = agent_config(
        &other.join("state"),
        TlsFiles {
            ca: pki.ca_cert(),
            cert: other.join("agent.pem"),
            key: other.join("agent-key.pem"),
        },
        &url(sched.addr()),
    );
    again.bootstrap = Some(settings);
    let err = match kiln_agent::start_with(again, backends()).await {
        Ok(_) => panic!("a used token joined a second node"),
        Err(e) => kiln_core::error_chain(&e),
    };
    assert!(err.contains("bootstrap token"), "{err}");
    assert!(
        err.contains("AccessDenied") || err.contains("already used"),
        "{err}"
    );
    assert!(!other.join("agent.pem").exists());
    sched.shutdown().await;
}
