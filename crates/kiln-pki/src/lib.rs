//! The cluster CA and the TLS configurations built from it.
//!
//! Internal endpoints accept only clients holding a certificate issued by
//! the cluster CA; the public gateway listener speaks TLS 1.2 and 1.3 only
//! (rustls implements nothing older) with HTTP/2 and HTTP/1.1 by ALPN.
#![forbid(unsafe_code)]

mod identity;
mod live;
mod revocation;

pub use identity::{Identity, IdentityError, Role};
pub use live::{LiveIdentity, Validity};
pub use revocation::{
    serial_hex, PeerCert, RevocationCheckingClientVerifier, RevocationCheckingServerVerifier,
    RevocationList, RevocationSet,
};

use std::fs;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use serde::{Deserialize, Serialize};

/// Why TLS material could not be made or loaded.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("Cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("No PEM certificate in {0}")]
    NoCertificate(PathBuf),
    #[error("No PEM private key in {0}")]
    NoKey(PathBuf),
    #[error("Certificate generation failed")]
    Generate(#[from] rcgen::Error),
    #[error("Invalid TLS configuration")]
    Rustls(#[from] rustls::Error),
    #[error("Invalid certificate verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("Invalid identity")]
    Identity(#[from] IdentityError),
    #[error("Unreadable certificate material: {0}")]
    Parse(String),
    #[error("Invalid certificate signing request: {0}")]
    Csr(String),
}

/// How far back a new certificate's validity starts: grace for clocks
/// that run behind ours.
pub const NOT_BEFORE_GRACE: std::time::Duration = std::time::Duration::from_secs(300);

/// Paths of one party's TLS material: the CA it trusts, its certificate
/// chain and its key. The shape every service's config file uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate authority that can issue certificates.
pub struct Ca {
    params: CertificateParams,
    key: KeyPair,
    cert_pem: String,
}

/// A certificate and its key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// What a certificate may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
    /// Services that both serve and call (scheduler, agent, gateway).
    ServerAndClient,
}

impl Ca {
    /// A new self-signed CA valid for ten years.
    pub fn generate(common_name: &str) -> Result<Self, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "Kiln");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(3650);
        let key = KeyPair::generate()?;
        let cert = params.clone().self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            params,
            key,
        })
    }

    /// Load a CA written by [`Ca::write`].
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, PkiError> {
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        let key = KeyPair::from_pem(&key_pem)?;
        let params = CertificateParams::from_ca_cert_pem(&cert_pem)?;
        Ok(Self {
            params,
            key,
            cert_pem,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Write the CA certificate and key (key mode 0600).
    pub fn write(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        write(cert_path, &self.cert_pem, 0o644)?;
        write(key_path, &self.key.serialize_pem(), 0o600)
    }

    /// Issue the certificate `req` describes, signed by this CA, with a
    /// new key.
    pub fn issue(&self, req: &CertRequest) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let cert = leaf_params(req)?.signed_by(&key, &self.issuer()?, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Sign the public key of the PEM certificate signing request `csr`
    /// into a certificate that says exactly what `req` says: everything
    /// the request asks for beyond its key (names, identity, usages) is
    /// ignored. The request's self-signature must verify (proof that the
    /// caller holds the key). Answers the PEM chain: the certificate, then
    /// this CA's certificate when it is an intermediate.
    pub fn sign_csr(&self, csr_pem: &str, req: &CertRequest) -> Result<String, PkiError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::Csr(e.to_string()))?;
        let cert = leaf_params(req)?.signed_by(&csr.public_key, &self.issuer()?, &self.key)?;
        let mut chain = cert.pem();
        if !self.is_self_signed()? {
            chain.push_str(&self.cert_pem);
        }
        Ok(chain)
    }

    fn issuer(&self) -> Result<rcgen::Certificate, PkiError> {
        // Re-signing the CA's own parameters gives an issuer with the same
        // subject and key identifier as the CA certificate on disk.
        Ok(self.params.clone().self_signed(&self.key)?)
    }

    fn is_self_signed(&self) -> Result<bool, PkiError> {
        let der = rustls_pemfile::certs(&mut self.cert_pem.as_bytes())
            .next()
            .ok_or_else(|| PkiError::Parse("the CA file holds no certificate".to_owned()))?
            .map_err(|e| PkiError::Parse(e.to_string()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| PkiError::Parse(e.to_string()))?;
        Ok(parsed.subject() == parsed.issuer())
    }
}

/// The parameters of a leaf certificate `req` describes.
fn leaf_params(req: &CertRequest) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, req.common_name.as_str());
    dn.push(DnType::OrganizationName, "Kiln");
    params.distinguished_name = dn;
    let mut sans = san_names(&req.names)?;
    if let Some(identity) = &req.identity {
        sans.push(SanType::URI(identity.uri().try_into()?));
    }
    params.subject_alt_names = sans;
    // A random positive 128-bit serial: what a revocation list names.
    let mut serial: [u8; 16] = rand::random();
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = match req.usage {
        Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
        Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        Usage::ServerAndClient => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    };
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::try_from(NOT_BEFORE_GRACE).expect("small");
    params.not_after =
        now + time::Duration::try_from(req.lifetime).unwrap_or(time::Duration::days(730));
    Ok(params)
}

fn san_names(names: &[String]) -> Result<Vec<SanType>, rcgen::Error> {
    names
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(n.clone().try_into()?)),
        })
        .collect()
}

/// The DNS names and IP addresses a DER certificate's subject alternative
/// names list (its identity URI aside).
pub fn certificate_names(cert: &CertificateDer<'_>) -> Result<Vec<String>, PkiError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| PkiError::Parse(e.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| PkiError::Parse(e.to_string()))?;
    let mut names = Vec::new();
    for name in san.iter().flat_map(|ext| ext.value.general_names.iter()) {
        match name {
            x509_parser::extensions::GeneralName::DNSName(d) => names.push((*d).to_owned()),
            x509_parser::extensions::GeneralName::IPAddress(ip) => {
                let ip = match ip.len() {
                    4 => std::net::IpAddr::from(<[u8; 4]>::try_from(*ip).expect("4 bytes")),
                    16 => std::net::IpAddr::from(<[u8; 16]>::try_from(*ip).expect("16 bytes")),
                    _ => continue,
                };
                names.push(ip.to_string());
            }
            _ => {}
        }
    }
    Ok(names)
}

/// The DNS names and IP addresses a PEM certificate signing request asks
/// for (after checking its signature).
pub fn csr_names(csr_pem: &str) -> Result<Vec<String>, PkiError> {
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| PkiError::Csr(e.to_string()))?;
    Ok(csr
        .params
        .subject_alt_names
        .iter()
        .filter_map(|n| match n {
            SanType::DnsName(d) => Some(d.as_str().to_owned()),
            SanType::IpAddress(ip) => Some(ip.to_string()),
            _ => None,
        })
        .collect())
}

/// A new key and a PEM certificate signing request for it: what an agent
/// sends to renew or to join. The request names only the DNS names and
/// addresses the agent serves under (`names`), which a CA may use when it
/// has nothing better (bootstrap); the identity is the CA's decision.
/// Answers `(key_pem, csr_pem)`.
pub fn new_key_and_csr(names: &[String]) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::new())?;
    params.subject_alt_names = san_names(names)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "kiln-agent");
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// What a certificate the CA issues says: its names, what it may be used
/// for, whose identity it carries and how long it lives.
#[derive(Debug, Clone)]
pub struct CertRequest {
    pub common_name: String,
    /// DNS names or IP addresses the holder serves under.
    pub names: Vec<String>,
    pub usage: Usage,
    /// The cluster identity (a `spiffe://` URI SAN); `None` only for the
    /// public gateway's server certificate.
    pub identity: Option<Identity>,
    pub lifetime: std::time::Duration,
}

impl CertRequest {
    /// Two years: the lifetime of service certificates made by hand.
    pub const DEFAULT_LIFETIME: std::time::Duration =
        std::time::Duration::from_secs(730 * 24 * 3600);

    /// A certificate for the cluster identity `identity`, named after it.
    pub fn for_identity(identity: Identity, usage: Usage) -> Self {
        Self {
            common_name: match identity.node() {
                Some(node) => format!("kiln-agent {node}"),
                None => format!("kiln-{}", identity.role()),
            },
            names: Vec::new(),
            usage,
            identity: Some(identity),
            lifetime: Self::DEFAULT_LIFETIME,
        }
    }

    /// A server certificate with no cluster identity (the public listener).
    pub fn public_server(common_name: &str) -> Self {
        Self {
            common_name: common_name.to_owned(),
            names: Vec::new(),
            usage: Usage::Server,
            identity: None,
            lifetime: Self::DEFAULT_LIFETIME,
        }
    }

    pub fn names(mut self, names: &[String]) -> Self {
        self.names.extend(names.iter().cloned());
        self
    }

    pub fn lifetime(mut self, lifetime: std::time::Duration) -> Self {
        self.lifetime = lifetime;
        self
    }
}

impl Issued {
    /// Write certificate and key (key mode 0600).
    pub fn write(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        write(cert_path, &self.cert_pem, 0o644)?;
        write(key_path, &self.key_pem, 0o600)
    }
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_owned(),
        source,
    })
}

fn write(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |source| PkiError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(err)?;
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(err)?;
        f.write_all(contents.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
    }
    fs::rename(&tmp, path).map_err(err)
}

/// Load every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let pem = read(path)?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(pem.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| PkiError::Read {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(PkiError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

/// Load the first private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut BufReader::new(pem.as_bytes()))
        .map_err(|source| PkiError::Read {
            path: path.to_owned(),
            source,
        })?
        .ok_or_else(|| PkiError::NoKey(path.to_owned()))
}

fn root_store(ca: &Path) -> Result<rustls::RootCertStore, PkiError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The public listener: TLS 1.2 and 1.3, ALPN h2 and http/1.1, no client
/// certificate.
pub fn public_server_config(
    cert: &Path,
    key: &Path,
) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(load_certs(cert)?, load_key(key)?)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// An internal listener: TLS 1.3 only, HTTP/2 (control calls) or HTTP/1.1
/// (the gateway's invocation data path), a client certificate
/// issued by the cluster CA required.
pub fn internal_server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(&files.ca)?), provider())
            .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// An internal client: trusts only the cluster CA, presents its own
/// certificate, speaks HTTP/2.
pub fn internal_client_config(files: &TlsFiles) -> Result<Arc<rustls::ClientConfig>, PkiError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(root_store(&files.ca)?)
        .with_client_auth_cert(load_certs(&files.cert)?, load_key(&files.key)?)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// An internal listener like [`internal_server_config`] whose certificate
/// is `identity` (replaceable while serving) and which refuses client
/// certificates `revoked` lists.
pub fn internal_server_config_live(
    ca: &Path,
    identity: Arc<LiveIdentity>,
    revoked: Arc<RevocationSet>,
) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(ca)?), provider())
        .build()?;
    let verifier = Arc::new(RevocationCheckingClientVerifier::new(webpki, revoked));
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(identity);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// An internal client like [`internal_client_config`] presenting
/// `identity` (replaceable while running) and refusing servers whose
/// certificate `revoked` lists.
pub fn internal_client_config_live(
    ca: &Path,
    identity: Arc<LiveIdentity>,
    revoked: Arc<RevocationSet>,
) -> Result<Arc<rustls::ClientConfig>, PkiError> {
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(root_store(ca)?),
        provider(),
    )
    .build()?;
    let verifier = Arc::new(RevocationCheckingServerVerifier::new(webpki, revoked));
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(identity);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A client of the public API that trusts `ca` (for the CLI and tests).
pub fn public_client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, PkiError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(root_store(ca)?)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The TLS material of a single-machine cluster, as `kiln dev` lays it out
/// under `dir`: `ca.pem`, `ca-key.pem`, and `<name>.pem`/`<name>-key.pem`
/// for the public gateway listener (`gateway`, no cluster identity) and
/// each identity: `gateway-internal`, `scheduler`, `operator`, `agent`
/// (the node [`DevPki::NODE`]) and `agent-<node>` for further agents.
pub struct DevPki {
    pub dir: PathBuf,
    ca: Ca,
}

impl DevPki {
    /// The trust domain of a `kiln dev` cluster's identities.
    pub const TRUST_DOMAIN: &'static str = "kiln-dev";
    /// The node id in the certificate `files("agent")` names.
    pub const NODE: &'static str = "n-dev";
    pub const ROLES: [&'static str; 5] = [
        "gateway",
        "gateway-internal",
        "scheduler",
        "agent",
        "operator",
    ];

    /// Create the CA and every role's certificate unless they exist (and
    /// carry the identity they should: certificates of an older `kiln dev`
    /// are reissued). `public_names` are the names the public gateway
    /// answers to.
    pub fn ensure(dir: &Path, public_names: &[String]) -> Result<Self, PkiError> {
        let ca_cert = dir.join("ca.pem");
        let ca_key = dir.join("ca-key.pem");
        let ca = if ca_cert.exists() && ca_key.exists() {
            Ca::load(&ca_cert, &ca_key)?
        } else {
            let ca = Ca::generate("Kiln cluster CA")?;
            ca.write(&ca_cert, &ca_key)?;
            ca
        };
        let pki = Self {
            dir: dir.to_owned(),
            ca,
        };
        for role in Self::ROLES {
            let req = match role {
                // Local names too, as before identities: tests and the CLI
                // call a dev gateway at https://localhost.
                "gateway" => CertRequest::public_server("kiln-gateway")
                    .names(&Self::local_names("gateway"))
                    .names(public_names),
                "gateway-internal" => pki.service_request(Role::Gateway, Usage::ServerAndClient)?,
                "scheduler" => pki.service_request(Role::Scheduler, Usage::ServerAndClient)?,
                "operator" => pki.service_request(Role::Operator, Usage::Client)?,
                _ => {
                    let node = Self::NODE.parse().expect("a valid node id");
                    pki.agent_request(node)?
                }
            };
            pki.ensure_issued(role, &req)?;
        }
        Ok(pki)
    }

    /// The certificate of the agent of `node` (made on first use).
    pub fn agent(&self, node: &kiln_core::NodeId) -> Result<TlsFiles, PkiError> {
        let name = format!("agent-{node}");
        self.ensure_issued(&name, &self.agent_request(node.clone())?)?;
        Ok(self.files(&name))
    }

    /// The CA, to issue further certificates (short-lived ones in tests).
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    fn service_request(&self, role: Role, usage: Usage) -> Result<CertRequest, PkiError> {
        let identity = Identity::service(Self::TRUST_DOMAIN, role)?;
        Ok(CertRequest::for_identity(identity, usage).names(&Self::local_names(role.as_str())))
    }

    fn agent_request(&self, node: kiln_core::NodeId) -> Result<CertRequest, PkiError> {
        let identity = Identity::agent(Self::TRUST_DOMAIN, node)?;
        Ok(CertRequest::for_identity(identity, Usage::ServerAndClient)
            .names(&Self::local_names("agent")))
    }

    fn local_names(role: &str) -> Vec<String> {
        vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
            format!("kiln-{role}"),
        ]
    }

    /// Issue `name`'s certificate unless one with the same identity exists.
    fn ensure_issued(&self, name: &str, req: &CertRequest) -> Result<(), PkiError> {
        let files = self.files(name);
        if files.cert.exists() && files.key.exists() {
            let certs = load_certs(&files.cert)?;
            let current = certs
                .first()
                .and_then(|c| Identity::from_certificate(c).ok());
            // A name asked for now (a new public name, the HTTP triggers'
            // wildcard) that the certificate lacks also reissues it.
            let names = certs
                .first()
                .and_then(|c| certificate_names(c).ok())
                .unwrap_or_default();
            if current == req.identity && req.names.iter().all(|n| names.contains(n)) {
                return Ok(());
            }
        }
        let mut req = req.clone();
        req.names.sort();
        req.names.dedup();
        self.ca.issue(&req)?.write(&files.cert, &files.key)
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn files(&self, name: &str) -> TlsFiles {
        Self::files_in(&self.dir, name)
    }

    /// The paths of `name`'s material in a dev PKI directory that exists
    /// already (the CLI reading a running `kiln dev`'s state).
    pub fn files_in(dir: &Path, name: &str) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}-key.pem")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_pki_builds_every_config_and_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(dir.path(), &["kiln.example".into()]).unwrap();
        let before = fs::read_to_string(pki.ca_cert()).unwrap();
        let gw = pki.files("gateway");
        public_server_config(&gw.cert, &gw.key).unwrap();
        internal_server_config(&pki.files("scheduler")).unwrap();
        internal_client_config(&pki.files("agent")).unwrap();
        public_client_config(&pki.ca_cert()).unwrap();
        DevPki::ensure(dir.path(), &[]).unwrap();
        assert_eq!(before, fs::read_to_string(pki.ca_cert()).unwrap());
    }

    #[test]
    fn loaded_ca_issues_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("test").unwrap();
        ca.write(&dir.path().join("c.pem"), &dir.path().join("k.pem"))
            .unwrap();
        let ca = Ca::load(&dir.path().join("c.pem"), &dir.path().join("k.pem")).unwrap();
        let identity = Identity::service("kiln", Role::Operator).unwrap();
        let issued = ca
            .issue(&CertRequest::for_identity(identity.clone(), Usage::Client))
            .unwrap();
        assert!(issued.cert_pem.contains("BEGIN CERTIFICATE"));
        let der = rustls_pemfile::certs(&mut issued.cert_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(Identity::from_certificate(&der).unwrap(), identity);
    }

    #[test]
    fn dev_pki_certificates_carry_their_identities() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(dir.path(), &[]).unwrap();
        let identity = |name: &str| {
            let cert = load_certs(&pki.files(name).cert).unwrap();
            Identity::from_certificate(&cert[0])
        };
        assert_eq!(identity("gateway"), Err(IdentityError::Missing));
        assert_eq!(identity("gateway-internal").unwrap().role(), Role::Gateway);
        assert_eq!(identity("scheduler").unwrap().role(), Role::Scheduler);
        assert_eq!(identity("operator").unwrap().role(), Role::Operator);
        let agent = identity("agent").unwrap();
        assert_eq!(
            (agent.role(), agent.node().unwrap().as_str()),
            (Role::Agent, DevPki::NODE)
        );
        let node: kiln_core::NodeId = "n-other".parse().unwrap();
        let files = pki.agent(&node).unwrap();
        let other = Identity::from_certificate(&load_certs(&files.cert).unwrap()[0]).unwrap();
        assert_eq!(other.node(), Some(&node));
        assert_eq!(other.trust_domain(), DevPki::TRUST_DOMAIN);
    }

    #[test]
    fn an_old_dev_certificate_without_identity_is_reissued() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(dir.path(), &[]).unwrap();
        let files = pki.files("scheduler");
        pki.ca()
            .issue(&CertRequest {
                identity: None,
                ..CertRequest::public_server("kiln-scheduler")
            })
            .unwrap()
            .write(&files.cert, &files.key)
            .unwrap();
        let pki = DevPki::ensure(dir.path(), &[]).unwrap();
        let cert = load_certs(&pki.files("scheduler").cert).unwrap();
        assert_eq!(
            Identity::from_certificate(&cert[0]).unwrap().role(),
            Role::Scheduler
        );
    }

    /// Drive a TLS handshake between `client` and `server` in memory.
    fn handshake(
        client: Arc<rustls::ClientConfig>,
        server: Arc<rustls::ServerConfig>,
    ) -> Result<(), rustls::Error> {
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut c = rustls::ClientConnection::new(client, name)?;
        let mut s = rustls::ServerConnection::new(server)?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
            }
            s.process_new_packets()?;
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
            }
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        panic!("the handshake did not finish");
    }

    fn leaf_of(pem: &str) -> CertificateDer<'static> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .unwrap()
            .unwrap()
    }

    #[test]
    fn a_csr_gets_exactly_the_identity_the_ca_decides() {
        let ca = Ca::generate("test").unwrap();
        // A request asking for the scheduler's identity and a DNS name.
        let key = KeyPair::generate().unwrap();
        let mut asked = CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
        asked.subject_alt_names.push(SanType::URI(
            "spiffe://kiln/scheduler".to_owned().try_into().unwrap(),
        ));
        let csr = asked.serialize_request(&key).unwrap().pem().unwrap();
        let node: kiln_core::NodeId = "n-a".parse().unwrap();
        let identity = Identity::agent("kiln", node).unwrap();
        let chain = ca
            .sign_csr(
                &csr,
                &CertRequest::for_identity(identity.clone(), Usage::ServerAndClient)
                    .lifetime(std::time::Duration::from_secs(3600)),
            )
            .unwrap();
        let leaf = leaf_of(&chain);
        assert_eq!(Identity::from_certificate(&leaf).unwrap(), identity);
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
        let text = format!("{:?}", parsed.subject_alternative_name());
        assert!(!text.contains("evil.example"), "{text}");
        // The certificate is for the request's key, and lives an hour.
        let validity = Validity::of(&leaf).unwrap();
        let life = validity
            .not_after
            .duration_since(validity.not_before)
            .unwrap();
        assert_eq!(life.as_secs(), 3600 + NOT_BEFORE_GRACE.as_secs());
        let live = LiveIdentity::load_pem_for_test(&chain, &key.serialize_pem());
        assert_eq!(live.leaf(), leaf);
        // A request whose signature does not match its contents is refused.
        let mut lines: Vec<String> = csr.lines().map(str::to_owned).collect();
        let body = &mut lines[3];
        let flipped = if body.starts_with('A') { "B" } else { "A" };
        body.replace_range(0..1, flipped);
        let bad = lines.join("\n");
        assert!(ca
            .sign_csr(&bad, &CertRequest::for_identity(identity, Usage::Client))
            .is_err());
    }

    #[test]
    fn new_csrs_are_signable() {
        let ca = Ca::generate("test").unwrap();
        let names = vec!["node-b.example".to_owned(), "10.0.0.2".to_owned()];
        let (key, csr) = new_key_and_csr(&names).unwrap();
        assert_eq!(csr_names(&csr).unwrap(), names);
        let identity = Identity::agent("kiln", "n-b".parse().unwrap()).unwrap();
        let chain = ca
            .sign_csr(&csr, &CertRequest::for_identity(identity, Usage::Client))
            .unwrap();
        let live = LiveIdentity::load_pem_for_test(&chain, &key);
        // The CA named nothing: the request's names are not copied.
        assert!(certificate_names(&live.leaf()).unwrap().is_empty());
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(dir.path(), &[]).unwrap();
        let agent = load_certs(&pki.files("agent").cert).unwrap();
        let names = certificate_names(&agent[0]).unwrap();
        assert!(names.contains(&"127.0.0.1".to_owned()), "{names:?}");
        assert!(names.contains(&"localhost".to_owned()), "{names:?}");
    }

    #[test]
    fn revoked_peers_fail_the_handshake_both_ways_and_swaps_take_effect() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(dir.path(), &[]).unwrap();
        let node: kiln_core::NodeId = DevPki::NODE.parse().unwrap();
        let agent = pki.files("agent");
        let sched = pki.files("scheduler");
        let agent_id = LiveIdentity::load(&agent.cert, &agent.key).unwrap();
        let sched_id = LiveIdentity::load(&sched.cert, &sched.key).unwrap();
        let revoked = RevocationSet::new();
        let ca = pki.ca_cert();
        let server = |id: &Arc<LiveIdentity>| {
            internal_server_config_live(&ca, id.clone(), revoked.clone()).unwrap()
        };
        let client = |id: &Arc<LiveIdentity>| {
            internal_client_config_live(&ca, id.clone(), revoked.clone()).unwrap()
        };
        handshake(client(&agent_id), server(&sched_id)).unwrap();
        handshake(client(&sched_id), server(&agent_id)).unwrap();

        // A fresh certificate for the same node, swapped in live, serves.
        let renewed = pki
            .ca()
            .issue(
                &CertRequest::for_identity(
                    Identity::agent(DevPki::TRUST_DOMAIN, node.clone()).unwrap(),
                    Usage::ServerAndClient,
                )
                .names(&["localhost".to_owned()]),
            )
            .unwrap();
        let before = agent_id.leaf();
        agent_id
            .swap_pem(&renewed.cert_pem, &renewed.key_pem)
            .unwrap();
        assert_ne!(agent_id.leaf(), before);
        handshake(client(&agent_id), server(&sched_id)).unwrap();

        // A mismatched key is refused and changes nothing.
        let other = pki
            .ca()
            .issue(&CertRequest::for_identity(
                Identity::agent(DevPki::TRUST_DOMAIN, node.clone()).unwrap(),
                Usage::ServerAndClient,
            ))
            .unwrap();
        assert!(agent_id
            .swap_pem(&renewed.cert_pem, &other.key_pem)
            .is_err());
        handshake(client(&agent_id), server(&sched_id)).unwrap();

        // Revoking the node refuses it as a client and as a server.
        revoked.revoke_node(node);
        let e = handshake(client(&agent_id), server(&sched_id)).unwrap_err();
        assert_eq!(
            e,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
        );
        let e = handshake(client(&sched_id), server(&agent_id)).unwrap_err();
        assert_eq!(
            e,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
        );

        // Revoking one serial leaves the holder's other certificates alone.
        revoked.replace(RevocationList::default());
        let serial = PeerCert::from_der(&sched_id.leaf()).unwrap().serial;
        revoked.revoke_serial(&serial);
        assert!(handshake(client(&agent_id), server(&sched_id)).is_err());
        let gw = pki.files("gateway-internal");
        let gw_id = LiveIdentity::load(&gw.cert, &gw.key).unwrap();
        handshake(client(&gw_id), server(&agent_id)).unwrap();
    }
}
