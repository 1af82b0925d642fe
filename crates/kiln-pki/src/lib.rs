//! The cluster CA and the TLS configurations built from it.
//!
//! Internal endpoints accept only clients holding a certificate issued by
//! the cluster CA; the public gateway listener speaks TLS 1.2 and 1.3 only
//! (rustls implements nothing older) with HTTP/2 and HTTP/1.1 by ALPN.
#![forbid(unsafe_code)]

mod identity;

pub use identity::{Identity, IdentityError, Role};

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
    #[error("Invalid client verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("Invalid identity")]
    Identity(#[from] IdentityError),
}

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

    /// Issue the certificate `req` describes, signed by this CA.
    pub fn issue(&self, req: &CertRequest) -> Result<Issued, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, req.common_name.as_str());
        dn.push(DnType::OrganizationName, "Kiln");
        params.distinguished_name = dn;
        let mut sans = req
            .names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(n.clone().try_into()?)),
            })
            .collect::<Result<Vec<_>, rcgen::Error>>()?;
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
        // Five minutes of grace for clocks that run behind ours.
        params.not_before = now - time::Duration::minutes(5);
        params.not_after =
            now + time::Duration::try_from(req.lifetime).unwrap_or(time::Duration::days(730));
        let key = KeyPair::generate()?;
        let issuer = self.params.clone().self_signed(&self.key)?;
        let cert = params.signed_by(&key, &issuer, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
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
                "gateway" => {
                    // Loopback names too: `kiln dev` and the tests reach
                    // the public listener as localhost.
                    let mut names = vec![
                        "localhost".to_owned(),
                        "127.0.0.1".to_owned(),
                        "::1".to_owned(),
                    ];
                    names.extend(public_names.iter().cloned());
                    names.sort();
                    names.dedup();
                    CertRequest::public_server("kiln-gateway").names(&names)
                }
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
            let current = load_certs(&files.cert)?
                .first()
                .and_then(|c| Identity::from_certificate(c).ok());
            if current == req.identity {
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
}
