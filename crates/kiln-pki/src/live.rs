//! A certificate and key that can be replaced while a service runs.
//!
//! An agent's certificate is short-lived: before it expires the agent gets
//! a new one from the scheduler and swaps it in with [`LiveIdentity::swap`].
//! Its server and client TLS configurations resolve their certificate
//! through the holder on every handshake, so new connections present the
//! new certificate at once and open connections carry on undisturbed.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::ResolvesClientCert;
use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

use crate::{load_certs, load_key, PkiError};

/// What one certificate in a [`LiveIdentity`] is valid for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// The validity of a DER certificate.
    pub fn of(cert: &CertificateDer<'_>) -> Result<Self, PkiError> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
            .map_err(|e| PkiError::Parse(e.to_string()))?;
        let at = |t: x509_parser::time::ASN1Time| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
        };
        Ok(Self {
            not_before: at(parsed.validity().not_before),
            not_after: at(parsed.validity().not_after),
        })
    }

    /// When a certificate of this validity should be renewed: after two
    /// thirds of its lifetime (measured from issuance, which is five
    /// minutes after `not_before`: see [`crate::Ca::issue`]).
    pub fn renew_at(&self) -> SystemTime {
        let issued = self.not_before + crate::NOT_BEFORE_GRACE;
        let life = self
            .not_after
            .duration_since(issued)
            .unwrap_or(Duration::ZERO);
        issued + life * 2 / 3
    }
}

/// The certificate a service presents now, replaceable at run time.
pub struct LiveIdentity {
    current: RwLock<(Arc<CertifiedKey>, Validity)>,
}

impl fmt::Debug for LiveIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveIdentity")
            .field("validity", &self.validity())
            .finish()
    }
}

fn certified(
    certs: Vec<CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> Result<(Arc<CertifiedKey>, Validity), PkiError> {
    let validity = Validity::of(
        certs
            .first()
            .ok_or(PkiError::Parse("the certificate chain is empty".to_owned()))?,
    )?;
    let provider = rustls::crypto::ring::default_provider();
    let key = provider.key_provider.load_private_key(key)?;
    let ck = CertifiedKey::new(certs, key);
    // A key that does not belong to the certificate would fail every
    // handshake: refuse it here instead.
    ck.keys_match()?;
    Ok((Arc::new(ck), validity))
}

impl LiveIdentity {
    /// The certificate chain and key in `cert` and `key` (PEM files).
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Self>, PkiError> {
        let current = certified(load_certs(cert)?, load_key(key)?)?;
        Ok(Arc::new(Self {
            current: RwLock::new(current),
        }))
    }

    #[cfg(test)]
    pub(crate) fn load_pem_for_test(cert_pem: &str, key_pem: &str) -> Arc<Self> {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, cert_pem).unwrap();
        std::fs::write(&k, key_pem).unwrap();
        Self::load(&c, &k).unwrap()
    }

    /// Replace the certificate with the PEM chain and key given; refuses a
    /// key that does not match the certificate.
    pub fn swap_pem(&self, cert_pem: &str, key_pem: &str) -> Result<Validity, PkiError> {
        let certs = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| PkiError::Parse(e.to_string()))?;
        let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
            .map_err(|e| PkiError::Parse(e.to_string()))?
            .ok_or_else(|| PkiError::Parse("no private key in the PEM".to_owned()))?;
        let next = certified(certs, key)?;
        let validity = next.1;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(validity)
    }

    pub fn validity(&self) -> Validity {
        self.current.read().unwrap_or_else(|p| p.into_inner()).1
    }

    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// The leaf certificate presented now.
    pub fn leaf(&self) -> CertificateDer<'static> {
        self.certified_key().cert[0].clone()
    }
}

impl ResolvesServerCert for LiveIdentity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.certified_key())
    }
}

impl ResolvesClientCert for LiveIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.certified_key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
