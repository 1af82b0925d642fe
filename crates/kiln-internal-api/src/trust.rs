//! Messages of the certificate lifecycle: renewal, single-use bootstrap
//! tokens, revocation (issue 15). The scheduler serves them.

use kiln_core::NodeId;
use serde::{Deserialize, Serialize};

/// Paths of the certificate lifecycle routes.
pub mod trust_paths {
    use kiln_core::NodeId;

    /// Scheduler, agent only: POST a [`super::RenewCertificate`], answers
    /// an [`super::IssuedCertificate`] for the caller's own identity.
    pub const CERTIFICATES_RENEW: &str = "/v1/certificates/renew";
    /// Scheduler, every cluster role: GET the [`kiln_pki::RevocationList`].
    pub const REVOCATIONS: &str = "/v1/revocations";
    /// Scheduler, operator: POST (empty body), answers [`super::NodeRevoked`].
    pub fn node_revoke(node: &NodeId) -> String {
        format!("/v1/nodes/{node}/revoke")
    }
    /// Scheduler, operator: POST a [`super::CreateBootstrapToken`],
    /// answers a [`super::BootstrapToken`].
    pub const BOOTSTRAP_TOKENS: &str = "/v1/bootstrap-tokens";
    /// The scheduler's bootstrap listener (server TLS only, no client
    /// certificate): POST a [`super::Bootstrap`], answers a
    /// [`super::Bootstrapped`].
    pub const BOOTSTRAP: &str = "/v1/bootstrap";
}

/// A certificate signing request (PEM) for a new key. Only its key is
/// used: the certificate names the caller's identity, whatever the
/// request asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewCertificate {
    pub csr_pem: String,
}

/// A certificate the scheduler signed: the PEM chain (leaf first) and
/// when it expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCertificate {
    pub cert_pem: String,
    pub not_after_ms: u64,
}

/// An operator asks for a token a new node joins with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateBootstrapToken {
    /// Seconds the token stays usable.
    pub ttl_s: u64,
    /// The node id the token joins as; generated when absent.
    #[serde(default)]
    pub node_id: Option<NodeId>,
}

/// A new bootstrap token: shown once, stored only as its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapToken {
    pub token: String,
    pub node_id: NodeId,
    pub expires_at_ms: u64,
}

/// A new node redeems its token for its first certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bootstrap {
    pub token: String,
    pub csr_pem: String,
}

/// What a redeemed token gives: the node's id and first certificate, and
/// the CA certificate that anchors the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bootstrapped {
    pub node_id: NodeId,
    pub certificate: IssuedCertificate,
    pub ca_pem: String,
}

/// A node's revocation, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRevoked {
    pub node_id: NodeId,
    pub revoked_at_ms: u64,
    /// The instances of the node written off (replaced elsewhere on
    /// demand, provisioned ones at once).
    pub instances_written_off: usize,
}

/// How often services fetch the scheduler's revocation list.
pub const REVOCATION_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Keep `set` equal to the scheduler's revocation list, fetched with
/// `client` every [`REVOCATION_POLL`], until `stop` resolves. A failed
/// fetch keeps the last list: a revocation is never forgotten because the
/// scheduler is briefly unreachable. (The agent has its own loop behind a
/// trait, for its fakes: `kiln_agent::certs`.)
pub async fn follow_revocations(
    client: crate::InternalClient,
    scheduler: crate::Endpoints,
    set: std::sync::Arc<kiln_pki::RevocationSet>,
    stop: impl std::future::Future<Output = ()>,
) {
    let client = client.with_timeout(std::time::Duration::from_secs(5));
    let mut failing = false;
    tokio::pin!(stop);
    loop {
        let fetched = scheduler
            .call(|base| {
                let client = &client;
                async move {
                    client
                        .get::<kiln_pki::RevocationList>(&base, trust_paths::REVOCATIONS)
                        .await
                }
            })
            .await;
        match fetched {
            Ok(list) => {
                if failing {
                    tracing::info!("revocation list reachable again");
                }
                failing = false;
                set.replace(list);
            }
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "cannot fetch the revocation list; keeping the last one");
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(REVOCATION_POLL) => {}
        }
    }
}
