//! `nix/kiln-pki.sh` (packaged by the flake as `kiln-pki`, used by the NixOS
//! VM tests and docs/joining.md) makes the cluster's certificates with
//! openssl. Kiln must accept them: the services load them with kiln-pki's
//! rustls configurations and complete a mutual-TLS handshake, and a
//! certificate from another CA is refused.

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
    pki(&cluster, &["issue", "agent", "compute1"]);
    pki(&cluster, &["issue-public", "gateway", "kiln.example"]);
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
    pki(&other, &["issue", "agent", "compute1"]);
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
    assert!(!run(&["issue", d, "agent", "x"]), "no CA yet");
    assert!(!run(&["frobnicate", d]));
    if !openssl_missing() {
        assert!(run(&["ca", d]));
        assert!(!run(&["issue", d, "Bad Role!", "x"]));
        assert!(!run(&["issue", d, "agent"]), "no names");
    }
}
