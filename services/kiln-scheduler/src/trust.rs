//! The certificate lifecycle the scheduler owns: the cluster's revocation
//! list, agent certificate renewal and single-use bootstrap tokens.
//!
//! Revocations are stored before they are answered and loaded at start;
//! the in-memory [`RevocationSet`] is what this scheduler's own TLS
//! verifiers consult and what `GET /v1/revocations` serves to the gateway
//! and the agents, which poll it.
//!
//! Signing needs `[certificates]` in the configuration: the CA
//! certificate and key the scheduler signs agent certificates with (see
//! docs/security.md for why an intermediate is the better choice).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kiln_core::{Clock, FcError, FcErrorCode, NodeId};
use kiln_internal_api::{
    Bootstrap, BootstrapToken, Bootstrapped, CreateBootstrapToken, IssuedCertificate,
};
use kiln_pki::{Ca, CertRequest, Identity, RevocationSet, Role, Usage};
use sha2::{Digest, Sha256};

use crate::store::{Redeemed, SchedulerStoreError, TrustStore};

/// At most this many DNS names or addresses in a bootstrap request.
const MAX_BOOTSTRAP_NAMES: usize = 16;

/// Signs agent certificates.
pub struct Issuer {
    pub ca: Ca,
    /// The cluster's root CA certificate (PEM), handed to joining nodes.
    pub root_pem: String,
    /// How long an agent certificate lives.
    pub lifetime: Duration,
    /// The longest a bootstrap token may stay valid.
    pub max_token_ttl: Duration,
}

/// The scheduler's side of the certificate lifecycle.
pub struct Trust {
    store: Arc<dyn TrustStore>,
    revoked: Arc<RevocationSet>,
    issuer: Option<Issuer>,
    clock: Arc<dyn Clock>,
    trust_domain: String,
}

fn store_error(e: SchedulerStoreError) -> FcError {
    tracing::error!(error = %kiln_core::error_chain(&e), "cannot use the trust store");
    FcError::internal("the scheduler cannot read or write its state; see its log")
}

fn denied(message: impl Into<String>) -> FcError {
    FcError::new(FcErrorCode::AccessDenied, message)
}

impl Trust {
    /// Load the stored revocations. `trust_domain` is the one of the
    /// scheduler's own certificate: the one every issued identity names.
    pub fn open(
        store: Arc<dyn TrustStore>,
        clock: Arc<dyn Clock>,
        trust_domain: &str,
        issuer: Option<Issuer>,
    ) -> Result<Self, SchedulerStoreError> {
        let revoked = RevocationSet::new();
        let nodes = store.revoked_nodes()?;
        for (node, _) in &nodes {
            revoked.revoke_node(node.clone());
        }
        tracing::info!(revoked_nodes = nodes.len(), "revocations loaded");
        Ok(Self {
            store,
            revoked,
            issuer,
            clock,
            trust_domain: trust_domain.to_owned(),
        })
    }

    /// The client certificate (SHA-256) each node last registered with,
    /// as stored.
    pub fn node_holders(&self) -> Result<Vec<(NodeId, [u8; 32])>, FcError> {
        self.store.node_holders().map_err(store_error)
    }

    /// Store that `node` registered with the certificate `sha256`, so that
    /// after a restart a live node is still not taken over by another
    /// certificate.
    pub fn record_holder(&self, node: &NodeId, sha256: &[u8; 32]) -> Result<(), FcError> {
        self.store
            .set_node_holder(node, sha256)
            .map_err(store_error)
    }

    /// The set this scheduler's verifiers and accept loop consult.
    pub fn revocations(&self) -> &Arc<RevocationSet> {
        &self.revoked
    }

    pub fn is_revoked(&self, node: &NodeId) -> bool {
        self.revoked.is_node_revoked(node)
    }

    /// Revoke every certificate of `node`, durably, then at once here.
    /// Answers when it was first revoked.
    pub fn revoke(&self, node: &NodeId) -> Result<u64, FcError> {
        let at = self
            .store
            .revoke_node(node, self.clock.now_ms())
            .map_err(store_error)?;
        if self.revoked.revoke_node(node.clone()) {
            tracing::warn!(node_id = %node, "node revoked");
        }
        Ok(at)
    }

    fn issuer(&self) -> Result<&Issuer, FcError> {
        self.issuer.as_ref().ok_or_else(|| {
            FcError::new(
                FcErrorCode::InvalidArgument,
                "this scheduler signs no certificates: set [certificates] in its configuration",
            )
        })
    }

    fn issue(
        &self,
        issuer: &Issuer,
        identity: Identity,
        names: &[String],
        csr_pem: &str,
    ) -> Result<IssuedCertificate, FcError> {
        let req = CertRequest::for_identity(identity, Usage::ServerAndClient)
            .names(names)
            .lifetime(issuer.lifetime);
        let cert_pem = issuer.ca.sign_csr(csr_pem, &req).map_err(|e| {
            FcError::invalid_argument(format!(
                "cannot sign the certificate request: {}",
                kiln_core::error_chain(&e)
            ))
        })?;
        let not_after = SystemTime::now() + issuer.lifetime;
        Ok(IssuedCertificate {
            cert_pem,
            not_after_ms: not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or_default(),
        })
    }

    /// A new certificate for the calling agent: exactly its identity, the
    /// names its current certificate has, the configured lifetime, and the
    /// key of `csr_pem` (everything else the request asks is ignored).
    pub fn renew(
        &self,
        caller: Option<&Identity>,
        current: Option<&rustls::pki_types::CertificateDer<'_>>,
        csr_pem: &str,
    ) -> Result<IssuedCertificate, FcError> {
        let issuer = self.issuer()?;
        let (Some(identity), Some(current)) = (caller, current) else {
            return Err(denied(
                "only an agent's certificate can be renewed, and this one names no identity",
            ));
        };
        let Some(node) = identity.node().filter(|_| identity.role() == Role::Agent) else {
            return Err(denied(format!(
                "role {} cannot renew a certificate here: only agents renew from the scheduler",
                identity.role()
            )));
        };
        if identity.trust_domain() != self.trust_domain {
            return Err(denied(format!(
                "the certificate is for trust domain {}, not this cluster's {}",
                identity.trust_domain(),
                self.trust_domain
            )));
        }
        // The handshake refuses a revoked certificate already; checked
        // again in case it was revoked while the connection was open.
        if self.is_revoked(node) {
            return Err(denied(format!("node {node} is revoked")));
        }
        let names = kiln_pki::certificate_names(current)
            .map_err(|e| FcError::invalid_argument(e.to_string()))?;
        let issued = self.issue(issuer, identity.clone(), &names, csr_pem)?;
        tracing::info!(node_id = %node, not_after_ms = issued.not_after_ms, "agent certificate renewed");
        Ok(issued)
    }

    /// A single-use token a new node joins with.
    pub fn create_token(&self, req: &CreateBootstrapToken) -> Result<BootstrapToken, FcError> {
        let issuer = self.issuer()?;
        let ttl = Duration::from_secs(req.ttl_s);
        if req.ttl_s == 0 || ttl > issuer.max_token_ttl {
            return Err(FcError::invalid_argument(format!(
                "ttl_s must be between 1 and {}",
                issuer.max_token_ttl.as_secs()
            )));
        }
        let node_id = req.node_id.clone().unwrap_or_else(NodeId::generate);
        if self.is_revoked(&node_id) {
            return Err(FcError::invalid_argument(format!(
                "node {node_id} is revoked; a revoked node id never joins again"
            )));
        }
        let token = hex::encode(rand::random::<[u8; 32]>());
        let now = self.clock.now_ms();
        let expires_at_ms = now + ttl.as_millis() as u64;
        self.store
            .add_bootstrap_token(&token_hash(&token), &node_id, now, expires_at_ms)
            .map_err(store_error)?;
        tracing::info!(node_id = %node_id, expires_at_ms, "bootstrap token created");
        Ok(BootstrapToken {
            token,
            node_id,
            expires_at_ms,
        })
    }

    /// Redeem a bootstrap token for the node's first certificate. The
    /// certificate names the node the token was made for and the DNS names
    /// and addresses the request asks for. A token works once, before it
    /// expires; every refusal is logged with the caller's address and
    /// answered with the same message (no oracle for guessing).
    pub fn redeem(&self, req: &Bootstrap, peer: SocketAddr) -> Result<Bootstrapped, FcError> {
        let issuer = self.issuer()?;
        let refused = || denied("the bootstrap token is unknown, already used or expired");
        // Check the request before the token is spent on it.
        let names = kiln_pki::csr_names(&req.csr_pem).map_err(|e| {
            FcError::invalid_argument(format!("invalid certificate signing request: {e}"))
        })?;
        if names.len() > MAX_BOOTSTRAP_NAMES {
            return Err(FcError::invalid_argument(format!(
                "the request names {} hosts; at most {MAX_BOOTSTRAP_NAMES} are allowed",
                names.len()
            )));
        }
        let now = self.clock.now_ms();
        let node_id = match self
            .store
            .redeem_bootstrap_token(&token_hash(&req.token), now)
            .map_err(store_error)?
        {
            Redeemed::Node(node) => node,
            Redeemed::Unknown => {
                tracing::warn!(%peer, "bootstrap refused: unknown token");
                return Err(refused());
            }
            Redeemed::Used {
                node_id,
                used_at_ms,
            } => {
                tracing::warn!(%peer, %node_id, used_at_ms, "bootstrap refused: token already used");
                return Err(refused());
            }
            Redeemed::Expired {
                node_id,
                expires_at_ms,
            } => {
                tracing::warn!(%peer, %node_id, expires_at_ms, "bootstrap refused: token expired");
                return Err(refused());
            }
        };
        if self.is_revoked(&node_id) {
            tracing::warn!(%peer, %node_id, "bootstrap refused: the token's node is revoked");
            return Err(refused());
        }
        let identity = Identity::agent(&self.trust_domain, node_id.clone())
            .map_err(|e| FcError::internal(e.to_string()))?;
        let certificate = self.issue(issuer, identity, &names, &req.csr_pem)?;
        tracing::info!(%peer, %node_id, "node bootstrapped with a single-use token");
        Ok(Bootstrapped {
            node_id,
            certificate,
            ca_pem: issuer.root_pem.clone(),
        })
    }
}

/// How a token is stored: its SHA-256, hex. A token is 256 random bits,
/// so no salt or slow hash is needed against guessing.
fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}
