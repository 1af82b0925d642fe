//! Revoked certificates, and the rustls verifiers that refuse them.
//!
//! The scheduler owns the cluster's revocation list (persisted; `kiln
//! nodes revoke NODE` adds to it); every other service polls it and keeps
//! a [`RevocationSet`] in memory. A certificate is revoked when its serial
//! is listed, or when it names a listed node: revoking a node revokes every
//! certificate that node ever held or will be issued, which is what an
//! operator who lost a machine means.
//!
//! [`RevocationCheckingClientVerifier`] and
//! [`RevocationCheckingServerVerifier`] wrap the WebPKI verifiers: a chain
//! must first verify against the cluster CA, then its leaf must not be
//! revoked. Servers also drop connections already open when their peer is
//! revoked: [`RevocationSet::subscribe`] wakes them, [`PeerCert`] says who
//! the peer was.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, RwLock};

use kiln_core::NodeId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use serde::{Deserialize, Serialize};

use crate::{Identity, IdentityError};

/// The cluster's revocation list as the scheduler serves it
/// (`GET /v1/revocations`): revoked nodes, and single certificates by
/// serial (lower-case hex, no leading zero bytes, as X.509 encodes it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationList {
    pub nodes: BTreeSet<NodeId>,
    pub serials: BTreeSet<String>,
}

impl RevocationList {
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.serials.is_empty()
    }
}

/// The serial and identity of one certificate, read once per handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// Lower-case hex of the serial's big-endian bytes.
    pub serial: String,
    /// `None` for a certificate that names no Kiln identity.
    pub identity: Option<Identity>,
}

impl PeerCert {
    /// Read `cert`; `None` when it is not a parseable X.509 certificate.
    pub fn from_der(cert: &CertificateDer<'_>) -> Option<Self> {
        Self::read(cert).map(|(peer, _)| peer)
    }

    /// Read `cert` once: its serial and identity, and why it has no
    /// identity when it has none. `None` when it is not a parseable X.509
    /// certificate.
    pub fn read(cert: &CertificateDer<'_>) -> Option<(Self, Result<(), IdentityError>)> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
        let (identity, why) = match Identity::from_x509(&parsed) {
            Ok(id) => (Some(id), Ok(())),
            Err(e) => (None, Err(e)),
        };
        Some((
            Self {
                serial: serial_hex(parsed.raw_serial()),
                identity,
            },
            why,
        ))
    }
}

impl fmt::Display for PeerCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.identity {
            Some(id) => write!(f, "{id} (serial {})", self.serial),
            None => write!(f, "serial {}", self.serial),
        }
    }
}

/// The canonical hex form of a DER serial: leading zero bytes (DER's sign
/// padding) dropped.
pub fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    let trimmed = &raw[start..];
    if trimmed.is_empty() {
        return "00".to_owned();
    }
    trimmed.iter().map(|b| format!("{b:02x}")).collect()
}

/// The revocations one service knows, shared by its verifiers and its
/// accept loop. Cheap to consult on every handshake.
#[derive(Debug)]
pub struct RevocationSet {
    list: RwLock<RevocationList>,
    /// Bumped on every change; open connections watch it.
    changed: tokio::sync::watch::Sender<u64>,
}

impl Default for RevocationSet {
    fn default() -> Self {
        Self {
            list: RwLock::new(RevocationList::default()),
            changed: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl RevocationSet {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Replace the whole list (a poll of the scheduler's); wakes open
    /// connections only when something changed.
    pub fn replace(&self, list: RevocationList) {
        let mut current = self.list.write().unwrap_or_else(|p| p.into_inner());
        if *current == list {
            return;
        }
        *current = list;
        drop(current);
        self.changed.send_modify(|g| *g += 1);
    }

    /// Add one node; `false` when it was revoked already.
    pub fn revoke_node(&self, node: NodeId) -> bool {
        let added = self
            .list
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .nodes
            .insert(node);
        if added {
            self.changed.send_modify(|g| *g += 1);
        }
        added
    }

    /// Add one certificate serial (hex, as [`PeerCert::serial`]).
    pub fn revoke_serial(&self, serial: &str) -> bool {
        let added = self
            .list
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .serials
            .insert(serial.to_ascii_lowercase());
        if added {
            self.changed.send_modify(|g| *g += 1);
        }
        added
    }

    pub fn list(&self) -> RevocationList {
        self.list.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn is_node_revoked(&self, node: &NodeId) -> bool {
        self.list
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .nodes
            .contains(node)
    }

    /// Whether `peer` is revoked, by serial or by the node it names.
    pub fn is_revoked(&self, peer: &PeerCert) -> bool {
        let list = self.list.read().unwrap_or_else(|p| p.into_inner());
        list.serials.contains(&peer.serial)
            || peer
                .identity
                .as_ref()
                .and_then(Identity::node)
                .is_some_and(|n| list.nodes.contains(n))
    }

    /// Whether the DER certificate `cert` is revoked; an unparseable one
    /// counts as revoked (fail closed; WebPKI refused it already anyway).
    pub fn is_certificate_revoked(&self, cert: &CertificateDer<'_>) -> bool {
        match PeerCert::from_der(cert) {
            Some(peer) => self.is_revoked(&peer),
            None => true,
        }
    }

    /// A receiver that changes whenever the list does.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

fn revoked_error() -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Revoked)
}

/// A client verifier that refuses revoked certificates after `inner`
/// (WebPKI against the cluster CA) accepted the chain.
#[derive(Debug)]
pub struct RevocationCheckingClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: Arc<RevocationSet>,
}

impl RevocationCheckingClientVerifier {
    pub fn new(inner: Arc<dyn ClientCertVerifier>, revoked: Arc<RevocationSet>) -> Self {
        Self { inner, revoked }
    }
}

impl ClientCertVerifier for RevocationCheckingClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.revoked.is_certificate_revoked(end_entity) {
            return Err(revoked_error());
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A server verifier that refuses revoked certificates after `inner`
/// (WebPKI against the cluster CA) accepted the chain: a gateway or
/// scheduler calling a revoked agent fails at the handshake.
#[derive(Debug)]
pub struct RevocationCheckingServerVerifier {
    inner: Arc<dyn ServerCertVerifier>,
    revoked: Arc<RevocationSet>,
}

impl RevocationCheckingServerVerifier {
    pub fn new(inner: Arc<dyn ServerCertVerifier>, revoked: Arc<RevocationSet>) -> Self {
        Self { inner, revoked }
    }
}

impl ServerCertVerifier for RevocationCheckingServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        if self.revoked.is_certificate_revoked(end_entity) {
            return Err(revoked_error());
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_canonical_hex() {
        assert_eq!(serial_hex(&[0x00, 0x7f, 0x01]), "7f01");
        assert_eq!(serial_hex(&[0x00]), "00");
        assert_eq!(serial_hex(&[0xab, 0x00]), "ab00");
    }

    #[test]
    fn a_node_or_a_serial_revokes_and_wakes_subscribers() {
        let set = RevocationSet::new();
        let mut rx = set.subscribe();
        let node: NodeId = "n-a".parse().unwrap();
        let peer = PeerCert {
            serial: "0abc".into(),
            identity: Some(Identity::agent("kiln", node.clone()).unwrap()),
        };
        assert!(!set.is_revoked(&peer));
        assert!(set.revoke_node(node.clone()));
        assert!(!set.revoke_node(node.clone()));
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        assert!(set.is_revoked(&peer));

        let other = PeerCert {
            serial: "beef".into(),
            identity: Some(Identity::service("kiln", crate::Role::Gateway).unwrap()),
        };
        assert!(!set.is_revoked(&other));
        set.revoke_serial("BEEF");
        assert!(set.is_revoked(&other));

        // Replacing with the same list wakes nobody.
        rx.mark_unchanged();
        set.replace(set.list());
        assert!(!rx.has_changed().unwrap());
        set.replace(RevocationList::default());
        assert!(rx.has_changed().unwrap());
        assert!(!set.is_revoked(&peer));
    }
}
