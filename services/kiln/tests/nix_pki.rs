//! `nix/kiln-pki.sh` (packaged by the flake as `kiln-pki`, used by the NixOS
//! VM tests and docs/joining.md) makes the cluster's certificates with
//! openssl. Kiln must accept them: the services load them with kiln-pki's
//! rustls configurations and complete a mutual-TLS handshake, a
//! certificate from another CA is refused, and each certificate names the
//! identity its role is authorised by (`spiffe://<trust domain>/<role>`).

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_pki::DevPki;
use rustls::pki_types::ServerName;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../nix/kiln-pki.sh")
}

fn pki(dir: &Path, args: &[&str]) {
    let out = Command::new("bash")
        .arg(script())
        .arg(args[0])
        .arg(dir)
        .args(&args[1..])
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "kiln-pki {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn openssl_missing() -> bool {
    Command::new("openssl").arg("version").output().is_err()
}

async fn handshake(server: &Path, server_role: &str, client: &Path, name: &str) -> bool {
    let server_config =
        kiln_pki::internal_server_config(&DevPki::files_in(server, server_role)).unwrap();
    let client_config =
        kiln_pki::internal_client_config(&DevPki::files_in(client, "agent")).unwrap();
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config);
    let connector = tokio_rustls::TlsConnector::from(client_config);
    let name = ServerName::try_from(name.to_owned()).unwrap();
    let (s, c) = tokio::join!(acceptor.accept(a), connector.connect(name, b));
    match (s, c) {
        (Ok(s), Ok(_)) => {
            assert!(s.get_ref().1.peer_certificates().is_some());
            true
        }
        _ => false,
    }
}

#[tokio::test]
async fn script_certificates_complete_mutual_tls_and_strangers_are_refused() {
    if openssl_missing() {
        return kiln_test_support::skip(
            kiln_test_support::Category::Tool,
            "openssl is not installed (run scripts/install-deps.sh)",
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let cluster = dir.path().join("cluster");
    pki(&cluster, &["ca"]);
    pki(&cluster, &["issue", "scheduler", "control", "192.168.1.1"]);
    pki(&cluster, &["issue", "gateway-internal", "control"]);
    pki(&cluster, &["issue", "agent", "n-compute1", "compute1"]);
    pki(&cluster, &["issue", "operator"]);
    pki(&cluster, &["issue-public", "gateway", "kiln.example"]);
    let identity = |role: &str| {
        let certs = kiln_pki::load_certs(&DevPki::files_in(&cluster, role).cert).unwrap();
        kiln_pki::Identity::from_certificate(&certs[0])
    };
    let id = |role: &str| identity(role).unwrap();
    assert_eq!(id("scheduler").uri(), "spiffe://kiln/scheduler");
    assert_eq!(id("gateway-internal").role(), kiln_pki::Role::Gateway);
    assert_eq!(id("agent").uri(), "spiffe://kiln/agent/n-compute1");
    assert_eq!(id("agent").node().map(|n| n.as_str()), Some("n-compute1"));
    assert_eq!(id("operator").role(), kiln_pki::Role::Operator);
    // The public listener's certificate names no cluster identity.
    assert!(identity("gateway").is_err());
    // The operator's certificate is a client's only: it cannot serve.
    let operator_server =
        kiln_pki::internal_server_config(&DevPki::files_in(&cluster, "operator")).unwrap();
    let client_config =
        kiln_pki::internal_client_config(&DevPki::files_in(&cluster, "agent")).unwrap();
    let (a, b) = tokio::io::duplex(64 * 1024);
    let (s, c) = tokio::join!(
        tokio_rustls::TlsAcceptor::from(operator_server).accept(a),
        tokio_rustls::TlsConnector::from(client_config)
            .connect(ServerName::try_from("control".to_owned()).unwrap(), b)
    );
    assert!(
        s.is_err() || c.is_err(),
        "an operator certificate served TLS"
    );
    // The agent's node id, in the script's own trust domain.
    let out = Command::new("bash")
        .arg(script())
        .args([
            "issue",
            cluster.to_str().unwrap(),
            "agent",
            "n-2",
            "compute2",
        ])
        .env("KILN_TRUST_DOMAIN", "dc1.example")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(id("agent").uri(), "spiffe://dc1.example/agent/n-2");
    pki(&cluster, &["issue", "agent", "n-compute1", "compute1"]);
    // `ca` again keeps the CA, so issued certificates stay valid.
    let ca_cert = cluster.join("ca.pem");
    let before = std::fs::read(&ca_cert).unwrap();
    pki(&cluster, &["ca"]);
    assert_eq!(before, std::fs::read(&ca_cert).unwrap());

    let gw = DevPki::files_in(&cluster, "gateway");
    kiln_pki::public_server_config(&gw.cert, &gw.key).expect("public listener loads");
    assert!(handshake(&cluster, "scheduler", &cluster, "control").await);
    assert!(handshake(&cluster, "scheduler", &cluster, "192.168.1.1").await);
    // A name the certificate does not carry fails.
    assert!(!handshake(&cluster, "scheduler", &cluster, "elsewhere").await);

    // An agent whose certificate another CA issued is refused.
    let other = dir.path().join("other");
    pki(&other, &["ca"]);
    pki(&other, &["issue", "agent", "n-compute1", "compute1"]);
    let mut stranger = DevPki::files_in(&other, "agent");
    stranger.ca = ca_cert.clone();
    let stranger_dir = dir.path().join("stranger");
    std::fs::create_dir_all(&stranger_dir).unwrap();
    for (from, to) in [
        (&stranger.ca, "ca.pem"),
        (&stranger.cert, "agent.pem"),
        (&stranger.key, "agent-key.pem"),
    ] {
        std::fs::copy(from, stranger_dir.join(to)).unwrap();
    }
    assert!(!handshake(&cluster, "scheduler", &stranger_dir, "control").await);
}

#[test]
fn bad_arguments_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new("bash")
            .arg(script())
            .args(args)
            .output()
            .unwrap()
            .status
            .success()
    };
    let d = dir.path().to_str().unwrap();
    assert!(!run(&[]));
    assert!(!run(&["issue", d, "agent", "n-1", "x"]), "no CA yet");
    assert!(!run(&["frobnicate", d]));
    if !openssl_missing() {
        assert!(run(&["ca", d]));
        assert!(!run(&["issue", d, "Bad Role!", "x"]));
        assert!(!run(&["issue", d, "agent"]), "no node id");
        assert!(!run(&["issue", d, "agent", "n-1"]), "no names");
        assert!(!run(&["issue", d, "agent", "Not A Node!", "x"]));
        assert!(!run(&["issue", d, "admin", "x"]), "no such role");
        assert!(!run(&["issue", d, "operator", "x"]), "client-only");
        assert!(run(&["issue", d, "operator"]));
    }
}
