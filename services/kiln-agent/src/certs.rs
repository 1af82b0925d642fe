//! The agent's certificate upkeep: its short-lived certificate renewed
//! from the scheduler before it expires, and the cluster's revocations
//! followed so that this agent refuses revoked peers.
//!
//! The certificate lives in a [`LiveIdentity`] that the agent's server
//! and client TLS configurations resolve on every handshake: a renewal
//! applies to the next connection, in either direction, while open ones
//! carry on. The new key and certificate are written to the configured
//! files (each atomically: temporary file, fsync, rename) so a restart
//! starts from the newest pair.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kiln_internal_api::{
    trust_paths, Bootstrap, Bootstrapped, Endpoints, InternalClient, InternalClientError,
    IssuedCertificate, RenewCertificate,
};

use crate::config::BootstrapSettings;
use crate::AgentError;
use kiln_pki::{LiveIdentity, PkiError, RevocationList, RevocationSet, TlsFiles};
use tokio::sync::watch;

/// How often the revocation list is fetched.
pub const REVOCATION_POLL: Duration = Duration::from_secs(1);
/// The longest wait between failed renewal attempts.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// The agent's TLS identity and the revocations it enforces.
pub struct AgentTrust {
    files: TlsFiles,
    identity: Arc<LiveIdentity>,
    revoked: Arc<RevocationSet>,
}

impl AgentTrust {
    /// Load the certificate and key, finishing a renewal that a crash
    /// interrupted between its two renames (see [`write_pair`]).
    pub fn load(files: &TlsFiles) -> Result<Arc<Self>, PkiError> {
        let identity = match LiveIdentity::load(&files.cert, &files.key) {
            Ok(identity) => identity,
            Err(e) => {
                let (cert_next, key_next) = (next(&files.cert), next(&files.key));
                // The new key is in place, its certificate is not yet.
                if !cert_next.exists() || key_next.exists() {
                    return Err(e);
                }
                tracing::warn!(path = %files.cert.display(), "finishing an interrupted certificate renewal");
                std::fs::rename(&cert_next, &files.cert).map_err(|source| PkiError::Write {
                    path: files.cert.clone(),
                    source,
                })?;
                LiveIdentity::load(&files.cert, &files.key)?
            }
        };
        // Leftovers of a renewal interrupted before the key moved: the
        // files in place are the old, matching pair.
        for stale in [next(&files.cert), next(&files.key)] {
            let _ = std::fs::remove_file(stale);
        }
        Ok(Arc::new(Self {
            files: files.clone(),
            identity,
            revoked: RevocationSet::new(),
        }))
    }

    pub fn identity(&self) -> &Arc<LiveIdentity> {
        &self.identity
    }

    pub fn revocations(&self) -> &Arc<RevocationSet> {
        &self.revoked
    }

    /// The agent's mTLS listener: the live certificate, revoked clients
    /// refused.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, PkiError> {
        kiln_pki::internal_server_config_live(
            &self.files.ca,
            self.identity.clone(),
            self.revoked.clone(),
        )
    }

    /// A client presenting the live certificate and refusing revoked
    /// servers.
    pub fn client(&self) -> Result<InternalClient, PkiError> {
        Ok(InternalClient::revoking(
            kiln_pki::internal_client_config_live(
                &self.files.ca,
                self.identity.clone(),
                self.revoked.clone(),
            )?,
            self.revoked.clone(),
        ))
    }

    /// Renew now through `api`: a new key, a request for it, the signed
    /// certificate checked, written to the files and swapped in.
    pub async fn renew(&self, api: &dyn CertificateApi) -> Result<SystemTime, RenewError> {
        let names = kiln_pki::certificate_names(&self.identity.leaf())?;
        let (key_pem, csr_pem) = kiln_pki::new_key_and_csr(&names)?;
        let issued = api.renew(&RenewCertificate { csr_pem }).await?;
        let leaf = rustls_pemfile::certs(&mut issued.cert_pem.as_bytes())
            .next()
            .and_then(Result::ok)
            .ok_or_else(|| PkiError::Parse("the scheduler answered no certificate".to_owned()))?;
        let now = kiln_pki::Identity::from_certificate(&self.identity.leaf()).ok();
        if now.is_none() || kiln_pki::Identity::from_certificate(&leaf).ok() != now {
            // Never expected from a correct scheduler: keep the old one.
            return Err(RenewError::IdentityChanged);
        }
        // Swapping first proves the certificate parses and matches the
        // key; only then is it written.
        let validity = self.identity.swap_pem(&issued.cert_pem, &key_pem)?;
        write_pair(&self.files, issued.cert_pem, key_pem)?;
        Ok(validity.not_after)
    }
}

/// The agent's trust: its certificate files, or, when they do not exist
/// yet and `[bootstrap]` is set, the first certificate got by redeeming
/// the bootstrap token (see [`join`]).
pub async fn load_or_join(config: &crate::AgentConfig) -> Result<Arc<AgentTrust>, AgentError> {
    // A pair in place, or one whose writing a crash interrupted.
    let have = (config.tls.cert.exists() && config.tls.key.exists())
        || (next(&config.tls.cert).exists() && config.tls.key.exists());
    if let (false, Some(b)) = (have, &config.bootstrap) {
        join(config, b).await?;
    }
    Ok(AgentTrust::load(&config.tls)?)
}

/// The names the agent's certificate carries: the host it advertises (or
/// listens on) and the configured extras.
fn join_names(config: &crate::AgentConfig, b: &BootstrapSettings) -> Vec<String> {
    let advertised = config
        .advertise_url
        .as_deref()
        .and_then(|u| u.parse::<http::Uri>().ok())
        .and_then(|u| u.host().map(|h| h.trim_matches(['[', ']']).to_owned()));
    let mut names: Vec<String> = advertised
        .into_iter()
        .chain((!config.listen.ip().is_unspecified()).then(|| config.listen.ip().to_string()))
        .chain(b.names.iter().cloned())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Redeem the bootstrap token: a new key, a request for it, the node id
/// and first certificate from the scheduler's bootstrap listener (whose
/// certificate must chain to `tls.ca`). The key and certificate are
/// written to the `tls` files, the node id to the state directory, and the
/// token file is removed (a token works once anyway).
pub async fn join(config: &crate::AgentConfig, b: &BootstrapSettings) -> Result<(), AgentError> {
    let fail = |m: String| AgentError::Bootstrap(m);
    let token = std::fs::read_to_string(&b.token_file)
        .map_err(|e| fail(format!("cannot read {}: {e}", b.token_file.display())))?
        .trim()
        .to_owned();
    let (key_pem, csr_pem) = kiln_pki::new_key_and_csr(&join_names(config, b))?;
    let client = InternalClient::with_config(kiln_pki::public_client_config(&config.tls.ca)?)
        .with_timeout(Duration::from_secs(30));
    let joined: Bootstrapped = client
        .post(
            b.url.trim_end_matches('/'),
            trust_paths::BOOTSTRAP,
            &Bootstrap { token, csr_pem },
        )
        .await
        .map_err(|e| {
            fail(format!(
                "{e} (ask an operator for a new token: kiln nodes bootstrap-token)"
            ))
        })?;
    let leaf = rustls_pemfile::certs(&mut joined.certificate.cert_pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| fail("the scheduler answered no certificate".to_owned()))?;
    let identity = kiln_pki::Identity::from_certificate(&leaf)
        .map_err(|e| fail(format!("the certificate names no identity: {e}")))?;
    if identity.role() != kiln_pki::Role::Agent || identity.node() != Some(&joined.node_id) {
        return Err(fail(format!(
            "the certificate names {identity}, not agent {}",
            joined.node_id
        )));
    }
    // The node id is the certificate's: the agent registers under it.
    write_pair(&config.tls, joined.certificate.cert_pem, key_pem)?;
    if let Err(e) = std::fs::remove_file(&b.token_file) {
        tracing::warn!(path = %b.token_file.display(), error = %e, "cannot remove the used bootstrap token");
    }
    tracing::info!(node_id = %joined.node_id, "joined the cluster with a bootstrap token");
    Ok(())
}

fn next(path: &std::path::Path) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".next");
    name.into()
}

/// Replace the certificate and key files with a new pair so that a crash
/// at any point leaves a pair [`AgentTrust::load`] can use: both are
/// written in full beside the old ones (`.next`, fsynced), then the key
/// is renamed into place, then the certificate.
fn write_pair(files: &TlsFiles, cert_pem: String, key_pem: String) -> Result<(), PkiError> {
    let (cert_next, key_next) = (next(&files.cert), next(&files.key));
    kiln_pki::Issued { cert_pem, key_pem }.write(&cert_next, &key_next)?;
    for (from, to) in [(&key_next, &files.key), (&cert_next, &files.cert)] {
        std::fs::rename(from, to).map_err(|source| PkiError::Write {
            path: to.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Why a renewal failed.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error("the scheduler refused or could not be reached")]
    Call(#[from] InternalClientError),
    #[error("the new certificate could not be used or stored")]
    Pki(#[from] PkiError),
    #[error("the scheduler answered a certificate for another identity; it was not used")]
    IdentityChanged,
}

/// The scheduler's certificate routes.
#[async_trait::async_trait]
pub trait CertificateApi: Send + Sync + 'static {
    async fn renew(&self, req: &RenewCertificate)
        -> Result<IssuedCertificate, InternalClientError>;
    async fn revocations(&self) -> Result<RevocationList, InternalClientError>;
}

/// The real scheduler, over the agent's live mTLS client.
pub struct HttpCertificateApi {
    client: InternalClient,
    endpoints: Endpoints,
}

impl HttpCertificateApi {
    pub fn new(client: InternalClient, endpoints: Endpoints) -> Self {
        Self {
            client: client.with_timeout(Duration::from_secs(10)),
            endpoints,
        }
    }
}

#[async_trait::async_trait]
impl CertificateApi for HttpCertificateApi {
    async fn renew(
        &self,
        req: &RenewCertificate,
    ) -> Result<IssuedCertificate, InternalClientError> {
        self.endpoints
            .call(|base| async move {
                self.client
                    .post(&base, trust_paths::CERTIFICATES_RENEW, req)
                    .await
            })
            .await
    }

    async fn revocations(&self) -> Result<RevocationList, InternalClientError> {
        self.endpoints
            .call(|base| async move { self.client.get(&base, trust_paths::REVOCATIONS).await })
            .await
    }
}

async fn sleep_or_stop(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = shutdown.wait_for(|v| *v) => true,
    }
}

/// Renew at two thirds of each certificate's lifetime until `shutdown`;
/// a failed attempt is retried sooner and sooner as expiry nears (never
/// more than 30 s apart).
pub async fn run_renewal(
    trust: Arc<AgentTrust>,
    api: Arc<dyn CertificateApi>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut retry: Option<Duration> = None;
    loop {
        let validity = trust.identity.validity();
        let wait = match retry {
            Some(r) => r,
            None => validity
                .renew_at()
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO),
        };
        if sleep_or_stop(wait, &mut shutdown).await {
            return;
        }
        match trust.renew(api.as_ref()).await {
            Ok(not_after) => {
                retry = None;
                let valid_for = not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                tracing::info!(
                    valid_for_s = valid_for.as_secs(),
                    "agent certificate renewed"
                );
            }
            Err(e) => {
                let left = validity
                    .not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                let next = (left / 10).clamp(Duration::from_secs(1), RETRY_MAX);
                tracing::warn!(
                    error = %kiln_core::error_chain(&e),
                    expires_in_s = left.as_secs(),
                    retry_in_s = next.as_secs(),
                    "cannot renew the agent certificate; the agent stops being trusted when it expires"
                );
                retry = Some(next);
            }
        }
    }
}

/// Fetch the revocation list every [`REVOCATION_POLL`] until `shutdown`.
/// A failed fetch keeps the last list (revocations are never forgotten
/// because the scheduler is briefly unreachable).
pub async fn run_revocation_poll(
    revoked: Arc<RevocationSet>,
    api: Arc<dyn CertificateApi>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut failing = false;
    loop {
        match api.revocations().await {
            Ok(list) => {
                if failing {
                    tracing::info!("revocation list reachable again");
                }
                failing = false;
                revoked.replace(list);
            }
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "cannot fetch the revocation list; keeping the last one");
            }
            Err(_) => {}
        }
        if sleep_or_stop(REVOCATION_POLL, &mut shutdown).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_pki::{CertRequest, DevPki, Identity, Usage};

    #[test]
    fn a_renewal_interrupted_between_its_renames_is_finished_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(dir.path(), &[]).unwrap();
        let files = pki.files("agent");
        let node: kiln_core::NodeId = DevPki::NODE.parse().unwrap();
        let issue = || {
            pki.ca()
                .issue(&CertRequest::for_identity(
                    Identity::agent(DevPki::TRUST_DOMAIN, node.clone()).unwrap(),
                    Usage::ServerAndClient,
                ))
                .unwrap()
        };
        // A complete write: the new pair is in place, nothing left over.
        let first = issue();
        write_pair(&files, first.cert_pem.clone(), first.key_pem.clone()).unwrap();
        let t = AgentTrust::load(&files).unwrap();
        assert_eq!(
            std::fs::read_to_string(&files.cert).unwrap(),
            first.cert_pem
        );
        assert!(!next(&files.cert).exists() && !next(&files.key).exists());
        drop(t);

        // Crash after the key moved, before the certificate did.
        let second = issue();
        kiln_pki::Issued {
            cert_pem: second.cert_pem.clone(),
            key_pem: second.key_pem.clone(),
        }
        .write(&next(&files.cert), &next(&files.key))
        .unwrap();
        std::fs::rename(next(&files.key), &files.key).unwrap();
        assert!(LiveIdentity::load(&files.cert, &files.key).is_err());
        let t = AgentTrust::load(&files).unwrap();
        assert_eq!(
            std::fs::read_to_string(&files.cert).unwrap(),
            second.cert_pem
        );
        assert!(!next(&files.cert).exists());
        drop(t);

        // Crash before the key moved: the old pair stays, leftovers go.
        let third = issue();
        kiln_pki::Issued {
            cert_pem: third.cert_pem,
            key_pem: third.key_pem,
        }
        .write(&next(&files.cert), &next(&files.key))
        .unwrap();
        AgentTrust::load(&files).unwrap();
        assert_eq!(
            std::fs::read_to_string(&files.cert).unwrap(),
            second.cert_pem
        );
        assert!(!next(&files.cert).exists() && !next(&files.key).exists());
    }
}
