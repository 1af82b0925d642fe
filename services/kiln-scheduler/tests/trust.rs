//! The certificate lifecycle over real mTLS: revocation (refused at the
//! handshake, open connections dropped, persisted across a restart),
//! renewal with exactly the caller's identity, single-use bootstrap tokens.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kiln_core::{FcErrorCode, ManualClock, NodeId};
use kiln_internal_api::{
    trust_paths, Bootstrap, BootstrapToken, Bootstrapped, CreateBootstrapToken, InternalClient,
    InternalClientError, IssuedCertificate, NodeCapacity, NodeInfo, NodeLabels, NodeRevoked,
    RegisterNode, RenewCertificate, Tenancy,
};
use kiln_pki::{DevPki, Identity, RevocationList, Role, TlsFiles};
use kiln_scheduler::config::CertificateSettings;
use kiln_scheduler::{Overrides, SchedulerConfig, SchedulerHandle};

fn config(dir: &Path, pki: &DevPki, sign: bool) -> SchedulerConfig {
    let mut config = SchedulerConfig::new(
        dir.join("scheduler"),
        "127.0.0.1:0".parse().unwrap(),
        pki.files("scheduler"),
    );
    if sign {
        let mut c = CertificateSettings::new(pki.ca_cert(), pki.dir.join("ca-key.pem"));
        c.agent_cert_lifetime_s = 60;
        config.certificates = Some(c);
        config.bootstrap_listen = Some("127.0.0.1:0".parse().unwrap());
    }
    config
}

async fn start(dir: &Path, pki: &DevPki, sign: bool, clock: &ManualClock) -> SchedulerHandle {
    kiln_scheduler::start_with(
        config(dir, pki, sign),
        Overrides {
            clock: Some(Arc::new(clock.clone())),
            agent: None,
        },
    )
    .await
    .unwrap()
}

fn base(addr: std::net::SocketAddr) -> String {
    format!("https://127.0.0.1:{}", addr.port())
}

fn registration(node: &NodeId) -> RegisterNode {
    RegisterNode {
        node_id: Some(node.clone()),
        agent_url: "https://127.0.0.1:9".to_owned(),
        capacity: NodeCapacity {
            memory_mb: 4096,
            cpu_milli: 4000,
            max_instances: 10,
        },
        labels: NodeLabels {
            zone: "zone-a".into(),
            tenancy: Tenancy::Dedicated,
            sandbox_kinds: vec![kiln_core::SandboxKind::Container],
            dedicated_account: None,
            runtimes: None,
            network_isolation: Default::default(),
        },
        instances: vec![],
    }
}

fn code(e: &InternalClientError) -> Option<FcErrorCode> {
    match e {
        InternalClientError::Remote { error, .. } => Some(error.code),
        _ => None,
    }
}

/// Call until the call fails at the transport (the connection dropped or
/// the handshake refused); generous, never a timing assertion.
async fn until_refused(client: &InternalClient, base: &str) -> InternalClientError {
    for _ in 0..300 {
        match client
            .get::<RevocationList>(base, trust_paths::REVOCATIONS)
            .await
        {
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => return e,
        }
    }
    panic!("a revoked certificate was still served after 30 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_is_cut_off_at_once_and_stays_revoked_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let clock = ManualClock::new(1_000_000);
    let handle = start(dir.path(), &pki, false, &clock).await;
    let base = base(handle.addr());
    let a: NodeId = "n-a".parse().unwrap();
    let agent_a = InternalClient::new(&pki.agent(&a).unwrap()).unwrap();
    let operator = InternalClient::new(&pki.files("operator")).unwrap();
    let gateway = InternalClient::new(&pki.files("gateway-internal")).unwrap();

    // A registers and holds an open HTTP/2 connection.
    let _: serde_json::Value = agent_a
        .post(
            &base,
            kiln_internal_api::paths::NODES_REGISTER,
            &registration(&a),
        )
        .await
        .unwrap();
    let list: RevocationList = agent_a.get(&base, trust_paths::REVOCATIONS).await.unwrap();
    assert!(list.is_empty());

    // Only an operator revokes.
    for who in [&agent_a, &gateway] {
        let e = who
            .post::<_, NodeRevoked>(&base, &trust_paths::node_revoke(&a), &())
            .await
            .unwrap_err();
        assert_eq!(code(&e), Some(FcErrorCode::AccessDenied), "{e}");
    }
    let revoked: NodeRevoked = operator
        .post(&base, &trust_paths::node_revoke(&a), &())
        .await
        .unwrap();
    assert_eq!(revoked.node_id, a);
    assert_eq!(revoked.revoked_at_ms, 1_000_000);

    // A's open connection is dropped and its next handshake refused.
    let e = until_refused(&agent_a, &base).await;
    assert!(e.is_unreachable(), "{e}");
    let e = agent_a
        .get::<RevocationList>(&base, trust_paths::REVOCATIONS)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("Revoked") || e.is_unreachable(),
        "{e}"
    );

    // Everyone else is served and sees the revocation; the node is retired.
    let list: RevocationList = gateway.get(&base, trust_paths::REVOCATIONS).await.unwrap();
    assert!(list.nodes.contains(&a));
    let nodes: Vec<NodeInfo> = gateway
        .get(&base, kiln_internal_api::paths::SCHEDULER_NODES)
        .await
        .unwrap();
    let node = nodes.iter().find(|n| n.node_id == a).unwrap();
    assert_eq!(serde_json::to_value(&node.state).unwrap(), "retired");
    // Nobody registers the revoked id again, whatever certificate it holds.
    let e = gateway
        .post::<_, serde_json::Value>(
            &base,
            kiln_internal_api::paths::NODES_REGISTER,
            &registration(&a),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(FcErrorCode::AccessDenied), "{e}");
    // Revoking again answers the first revocation's time.
    clock.advance(Duration::from_secs(5));
    let again: NodeRevoked = operator
        .post(&base, &trust_paths::node_revoke(&a), &())
        .await
        .unwrap();
    assert_eq!(again.revoked_at_ms, 1_000_000);

    // After a restart A is still refused and the list still names it.
    handle.shutdown().await;
    let handle = start(dir.path(), &pki, false, &clock).await;
    let base = self::base(handle.addr());
    let metrics = handle.scheduler().metrics().render();
    assert!(
        metrics.contains("kiln_scheduler_revoked_nodes 1\n"),
        "{metrics}"
    );
    let fresh_a = InternalClient::new(&pki.agent(&a).unwrap()).unwrap();
    let e = fresh_a
        .get::<RevocationList>(&base, trust_paths::REVOCATIONS)
        .await
        .unwrap_err();
    assert!(e.is_unreachable(), "{e}");
    let gateway = InternalClient::new(&pki.files("gateway-internal")).unwrap();
    let list: RevocationList = gateway.get(&base, trust_paths::REVOCATIONS).await.unwrap();
    assert!(list.nodes.contains(&a));
    // Another node is untouched.
    let b: NodeId = "n-b".parse().unwrap();
    let agent_b = InternalClient::new(&pki.agent(&b).unwrap()).unwrap();
    let _: RevocationList = agent_b.get(&base, trust_paths::REVOCATIONS).await.unwrap();
    handle.shutdown().await;
}

fn leaf_identity(pem: &str) -> Identity {
    let der = rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    Identity::from_certificate(&der).unwrap()
}

fn write_files(dir: &Path, name: &str, ca: &Path, cert_pem: &str, key_pem: &str) -> TlsFiles {
    let files = TlsFiles {
        ca: ca.to_owned(),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}-key.pem")),
    };
    std::fs::write(&files.cert, cert_pem).unwrap();
    std::fs::write(&files.key, key_pem).unwrap();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_renew_with_exactly_their_own_identity() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let clock = ManualClock::new(1_000_000);
    let handle = start(dir.path(), &pki, true, &clock).await;
    let base = base(handle.addr());
    let a: NodeId = "n-a".parse().unwrap();
    let agent_a = InternalClient::new(&pki.agent(&a).unwrap()).unwrap();

    // The request asks for another node's identity; the answer ignores it.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut asked = rcgen::CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
    asked.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://kiln-dev/agent/n-b".to_owned().try_into().unwrap(),
    ));
    let csr_pem = asked.serialize_request(&key).unwrap().pem().unwrap();
    let issued: IssuedCertificate = agent_a
        .post(
            &base,
            trust_paths::CERTIFICATES_RENEW,
            &RenewCertificate {
                csr_pem: csr_pem.clone(),
            },
        )
        .await
        .unwrap();
    let identity = leaf_identity(&issued.cert_pem);
    assert_eq!(identity.role(), Role::Agent);
    assert_eq!(identity.node(), Some(&a));
    let leaf = rustls_pemfile::certs(&mut issued.cert_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let names = kiln_pki::certificate_names(&leaf).unwrap();
    assert!(!names.contains(&"evil.example".to_owned()), "{names:?}");
    assert!(names.contains(&"127.0.0.1".to_owned()), "{names:?}");
    let validity = kiln_pki::Validity::of(&leaf).unwrap();
    let life = validity
        .not_after
        .duration_since(validity.not_before)
        .unwrap();
    assert_eq!(life, Duration::from_secs(60) + kiln_pki::NOT_BEFORE_GRACE);

    // The renewed certificate works.
    let renewed = write_files(
        dir.path(),
        "renewed",
        &pki.ca_cert(),
        &issued.cert_pem,
        &key.serialize_pem(),
    );
    let renewed = InternalClient::new(&renewed).unwrap();
    let _: RevocationList = renewed.get(&base, trust_paths::REVOCATIONS).await.unwrap();

    // Other roles do not renew here.
    for name in ["gateway-internal", "operator"] {
        let c = InternalClient::new(&pki.files(name)).unwrap();
        let e = c
            .post::<_, IssuedCertificate>(
                &base,
                trust_paths::CERTIFICATES_RENEW,
                &RenewCertificate {
                    csr_pem: csr_pem.clone(),
                },
            )
            .await
            .unwrap_err();
        assert_eq!(code(&e), Some(FcErrorCode::AccessDenied), "{name}: {e}");
    }
    // A request that is not a CSR is a bad request, not a certificate.
    let e = agent_a
        .post::<_, IssuedCertificate>(
            &base,
            trust_paths::CERTIFICATES_RENEW,
            &RenewCertificate {
                csr_pem:
                    "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                        .into(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(FcErrorCode::InvalidArgument), "{e}");
    handle.shutdown().await;
}

#[tokio::test]
async fn a_ca_key_readable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let key = pki.dir.join("ca-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = match kiln_scheduler::start(config(dir.path(), &pki, true)).await {
        Ok(_) => panic!("started with a group-readable CA key"),
        Err(e) => kiln_core::error_chain(&e),
    };
    assert!(err.contains("chmod 600"), "{err}");
}

/// A client with no certificate (a node that has not joined yet).
fn anonymous(ca: &Path) -> InternalClient {
    InternalClient::with_config(kiln_pki::public_client_config(ca).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_tokens_work_once_and_expire() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let clock = ManualClock::new(1_000_000);
    let handle = start(dir.path(), &pki, true, &clock).await;
    let base = base(handle.addr());
    let boot = self::base(handle.bootstrap_addr().unwrap());
    let operator = InternalClient::new(&pki.files("operator")).unwrap();
    let new_token = |ttl_s| {
        let operator = operator.clone();
        let base = base.clone();
        async move {
            operator
                .post::<_, BootstrapToken>(
                    &base,
                    trust_paths::BOOTSTRAP_TOKENS,
                    &CreateBootstrapToken {
                        ttl_s,
                        node_id: None,
                    },
                )
                .await
        }
    };
    let token = new_token(600).await.unwrap();
    assert_eq!(token.expires_at_ms, 1_000_000 + 600_000);
    // Agents and gateways mint no tokens.
    let gw = InternalClient::new(&pki.files("gateway-internal")).unwrap();
    let e = gw
        .post::<_, BootstrapToken>(
            &base,
            trust_paths::BOOTSTRAP_TOKENS,
            &CreateBootstrapToken {
                ttl_s: 60,
                node_id: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(FcErrorCode::AccessDenied), "{e}");

    let anon = anonymous(&pki.ca_cert());
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let (key_pem, csr_pem) = kiln_pki::new_key_and_csr(&names).unwrap();
    let joined: Bootstrapped = anon
        .post(
            &boot,
            trust_paths::BOOTSTRAP,
            &Bootstrap {
                token: token.token.clone(),
                csr_pem: csr_pem.clone(),
            },
        )
        .await
        .unwrap();
    assert_eq!(joined.node_id, token.node_id);
    assert_eq!(
        joined.ca_pem,
        std::fs::read_to_string(pki.ca_cert()).unwrap()
    );
    let identity = leaf_identity(&joined.certificate.cert_pem);
    assert_eq!(identity.node(), Some(&token.node_id));
    // The new certificate is a cluster certificate.
    let files = write_files(
        dir.path(),
        "joined",
        &pki.ca_cert(),
        &joined.certificate.cert_pem,
        &key_pem,
    );
    let node = InternalClient::new(&files).unwrap();
    let _: RevocationList = node.get(&base, trust_paths::REVOCATIONS).await.unwrap();

    // Used once: refused the second time.
    let again = anon
        .post::<_, Bootstrapped>(
            &boot,
            trust_paths::BOOTSTRAP,
            &Bootstrap {
                token: token.token.clone(),
                csr_pem: csr_pem.clone(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(&again), Some(FcErrorCode::AccessDenied), "{again}");

    // Expired: refused.
    let late = new_token(60).await.unwrap();
    clock.advance(Duration::from_secs(61));
    let e = anon
        .post::<_, Bootstrapped>(
            &boot,
            trust_paths::BOOTSTRAP,
            &Bootstrap {
                token: late.token.clone(),
                csr_pem: csr_pem.clone(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(FcErrorCode::AccessDenied), "{e}");
    // A made-up token: refused alike.
    let e = anon
        .post::<_, Bootstrapped>(
            &boot,
            trust_paths::BOOTSTRAP,
            &Bootstrap {
                token: "00".repeat(32),
                csr_pem: csr_pem.clone(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(FcErrorCode::AccessDenied), "{e}");

    let metrics = handle.scheduler().metrics().render();
    assert!(
        metrics.contains("kiln_scheduler_certificates_issued_total 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kiln_scheduler_bootstrap_refused_total 3\n"),
        "{metrics}"
    );

    // The bootstrap listener serves nothing else, and the mTLS listener
    // does not serve bootstrap to a caller without a certificate.
    let e = anon
        .get::<RevocationList>(&boot, trust_paths::REVOCATIONS)
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(FcErrorCode::PathNotSupported), "{e}");
    let e = anon
        .post::<_, Bootstrapped>(
            &base,
            trust_paths::BOOTSTRAP,
            &Bootstrap {
                token: token.token,
                csr_pem,
            },
        )
        .await
        .unwrap_err();
    assert!(e.is_unreachable(), "{e}");

    // A revoked node's token is refused even when fresh.
    let c: NodeId = "n-c".parse().unwrap();
    let _: NodeRevoked = operator
        .post(&base, &trust_paths::node_revoke(&c), &())
        .await
        .unwrap();
    let e = operator
        .post::<_, BootstrapToken>(
            &base,
            trust_paths::BOOTSTRAP_TOKENS,
            &CreateBootstrapToken {
                ttl_s: 60,
                node_id: Some(c),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(FcErrorCode::InvalidArgument), "{e}");
    handle.shutdown().await;
}

fn spec(function: &str) -> kiln_core::InstanceSpec {
    kiln_core::InstanceSpec {
        account_id: "100".parse().unwrap(),
        function_name: function.parse().unwrap(),
        revision: String::new(),
        version: None,
        runtime: kiln_core::RuntimeName::Custom,
        handler: "index.handler".into(),
        command: vec!["/code/server".into()],
        args: vec![],
        port: 9000,
        environment: Default::default(),
        memory_mb: 128,
        cpu_milli: 100,
        disk_mb: 512,
        timeout_s: 5,
        concurrency: 1,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_nodes_instances_are_replaced_on_another_node() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let agent = kiln_scheduler::FakeAgent::new(Duration::ZERO);
    let handle = kiln_scheduler::start_with(
        config(dir.path(), &pki, false),
        Overrides {
            clock: None,
            agent: Some(agent.clone()),
        },
    )
    .await
    .unwrap();
    let base = base(handle.addr());
    let a: NodeId = "n-a".parse().unwrap();
    let b: NodeId = "n-b".parse().unwrap();
    let gateway = InternalClient::new(&pki.files("gateway-internal")).unwrap();
    let operator = InternalClient::new(&pki.files("operator")).unwrap();
    let agent_a = InternalClient::new(&pki.agent(&a).unwrap()).unwrap();
    let agent_b = InternalClient::new(&pki.agent(&b).unwrap()).unwrap();
    let acquire = |request_id: &'static str| {
        let gateway = gateway.clone();
        let base = base.clone();
        async move {
            gateway
                .post::<_, kiln_internal_api::Lease>(
                    &base,
                    kiln_internal_api::paths::LEASES,
                    &kiln_internal_api::AcquireLease {
                        request_id: request_id.into(),
                        spec: spec("f"),
                    },
                )
                .await
                .unwrap()
        }
    };

    // Only A exists: the instance lands there.
    let _: serde_json::Value = agent_a
        .post(
            &base,
            kiln_internal_api::paths::NODES_REGISTER,
            &registration(&a),
        )
        .await
        .unwrap();
    let on_a = acquire("r-1").await;
    assert_eq!(on_a.node_id, a);
    let mut on_b_reg = registration(&b);
    on_b_reg.agent_url = "https://127.0.0.1:10".to_owned();
    let _: serde_json::Value = agent_b
        .post(&base, kiln_internal_api::paths::NODES_REGISTER, &on_b_reg)
        .await
        .unwrap();

    let revoked: NodeRevoked = operator
        .post(&base, &trust_paths::node_revoke(&a), &())
        .await
        .unwrap();
    assert_eq!(revoked.instances_written_off, 1);
    // The instance is gone from the scheduler's view, and the next call
    // gets a new instance on B.
    let instances: Vec<kiln_internal_api::InstanceInfo> = gateway
        .get(&base, kiln_internal_api::paths::SCHEDULER_INSTANCES)
        .await
        .unwrap();
    assert!(
        instances.iter().all(|i| i.node_id.as_ref() != Some(&a)),
        "{instances:?}"
    );
    let on_b = acquire("r-2").await;
    assert_eq!(on_b.node_id, b);
    assert_ne!(on_b.instance_id, on_a.instance_id);
    assert!(on_b.cold_start);
    // Nothing is placed on A again.
    for r in ["r-3", "r-4"] {
        assert_eq!(acquire(r).await.node_id, b);
    }
    handle.shutdown().await;
}
