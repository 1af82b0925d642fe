//! Who a cluster certificate speaks for: one role and, for an agent, one
//! compute node.
//!
//! The identity is the certificate's one URI subject alternative name, in
//! the SPIFFE ID form service meshes use (`spiffe://<trust domain>/<path>`):
//!
//! ```text
//! spiffe://<cluster>/gateway            the access service (internal side)
//! spiffe://<cluster>/scheduler          the scheduling service
//! spiffe://<cluster>/operator           a person or tool running `kiln`
//! spiffe://<cluster>/agent/<node-id>    the agent of one compute node
//! ```
//!
//! The trust domain names the cluster; the cluster CA is the trust anchor,
//! so a certificate it signed for another trust domain is still refused by
//! a service that checks [`Identity::trust_domain`]. A certificate with no
//! such URI, or with more than one, has no identity: every internal route
//! refuses it (fail closed).

use std::fmt;

use kiln_core::NodeId;
use rustls::pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

/// A role in the cluster: what a certificate's holder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Gateway,
    Scheduler,
    Agent,
    Operator,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Gateway, Role::Scheduler, Role::Agent, Role::Operator];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Scheduler => "scheduler",
            Role::Agent => "agent",
            Role::Operator => "operator",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The identity one certificate carries. An agent's names its node; no
/// other role's does (the constructors keep that invariant).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    trust_domain: String,
    role: Role,
    node: Option<NodeId>,
}

/// Why a certificate carries no usable identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("the certificate cannot be parsed: {0}")]
    Certificate(String),
    #[error("the certificate has no spiffe:// URI naming a Kiln role")]
    Missing,
    #[error("the certificate has {0} spiffe:// URIs; a Kiln certificate has exactly one")]
    Ambiguous(usize),
    #[error("{uri:?} is not a Kiln identity: {why}")]
    Malformed { uri: String, why: &'static str },
}

const SCHEME: &str = "spiffe://";

impl Identity {
    /// The identity of a gateway, scheduler or operator.
    ///
    /// # Panics
    /// For [`Role::Agent`], whose identity needs a node: use
    /// [`Identity::agent`].
    pub fn service(trust_domain: &str, role: Role) -> Result<Self, IdentityError> {
        assert!(role != Role::Agent, "an agent's identity names its node");
        Self::checked(trust_domain, role, None)
    }

    /// The identity of the agent of `node`.
    pub fn agent(trust_domain: &str, node: NodeId) -> Result<Self, IdentityError> {
        Self::checked(trust_domain, Role::Agent, Some(node))
    }

    fn checked(
        trust_domain: &str,
        role: Role,
        node: Option<NodeId>,
    ) -> Result<Self, IdentityError> {
        if !valid_trust_domain(trust_domain) {
            return Err(IdentityError::Malformed {
                uri: format!("{SCHEME}{trust_domain}/{role}"),
                why:
                    "the trust domain must be 1 to 255 lower-case letters, digits, '.', '-' or '_'",
            });
        }
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            role,
            node,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// The node an agent's certificate names; `None` for other roles.
    pub fn node(&self) -> Option<&NodeId> {
        self.node.as_ref()
    }

    /// The SPIFFE ID, as written into the certificate.
    pub fn uri(&self) -> String {
        match &self.node {
            Some(node) => format!("{SCHEME}{}/{}/{node}", self.trust_domain, self.role),
            None => format!("{SCHEME}{}/{}", self.trust_domain, self.role),
        }
    }

    /// Parse a SPIFFE ID written by [`Identity::uri`].
    pub fn parse_uri(uri: &str) -> Result<Self, IdentityError> {
        let malformed = |why| IdentityError::Malformed {
            uri: uri.to_owned(),
            why,
        };
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| malformed("it does not start with spiffe://"))?;
        let mut parts = rest.split('/');
        let trust_domain = parts.next().unwrap_or_default();
        let role = parts.next().and_then(Role::parse).ok_or_else(|| {
            malformed("the path is not gateway, scheduler, operator or agent/<node>")
        })?;
        let node = parts.next();
        if parts.next().is_some() {
            return Err(malformed("the path has too many segments"));
        }
        match (role, node) {
            (Role::Agent, Some(node)) => {
                let node = node
                    .parse::<NodeId>()
                    .map_err(|_| malformed("the node id is not a valid node id"))?;
                Self::agent(trust_domain, node)
            }
            (Role::Agent, None) => Err(malformed("an agent identity must name its node")),
            (_, Some(_)) => Err(malformed("only an agent identity names a node")),
            (role, None) => Self::service(trust_domain, role),
        }
        .map_err(|e| match e {
            IdentityError::Malformed { why, .. } => malformed(why),
            other => other,
        })
    }

    /// The identity of a DER certificate: its one `spiffe://` URI SAN.
    pub fn from_certificate(cert: &CertificateDer<'_>) -> Result<Self, IdentityError> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
            .map_err(|e| IdentityError::Certificate(e.to_string()))?;
        Self::from_x509(&parsed)
    }

    /// The identity of a certificate already parsed (one parse serves
    /// the identity and the serial, see [`crate::PeerCert`]).
    pub fn from_x509(parsed: &X509Certificate<'_>) -> Result<Self, IdentityError> {
        let san = parsed
            .subject_alternative_name()
            .map_err(|e| IdentityError::Certificate(e.to_string()))?;
        let uris: Vec<&str> = san
            .into_iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .filter_map(|name| match name {
                GeneralName::URI(uri) if uri.starts_with(SCHEME) => Some(*uri),
                _ => None,
            })
            .collect();
        match uris.as_slice() {
            [] => Err(IdentityError::Missing),
            [uri] => Self::parse_uri(uri),
            more => Err(IdentityError::Ambiguous(more.len())),
        }
    }
}

impl fmt::Display for Identity {
    /// `agent n-1a2b` / `gateway`: how logs and refusals name a peer.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.node {
            Some(node) => write!(f, "{} {node}", self.role),
            None => write!(f, "{}", self.role),
        }
    }
}

fn valid_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_round_trips_through_its_uri() {
        let node: NodeId = "n-1a2b".parse().unwrap();
        let ids = [
            Identity::service("kiln", Role::Gateway).unwrap(),
            Identity::service("kiln", Role::Scheduler).unwrap(),
            Identity::service("kiln", Role::Operator).unwrap(),
            Identity::agent("kiln", node.clone()).unwrap(),
        ];
        for id in ids {
            assert_eq!(Identity::parse_uri(&id.uri()).unwrap(), id);
        }
        assert_eq!(
            Identity::agent("dc1.example", node).unwrap().uri(),
            "spiffe://dc1.example/agent/n-1a2b"
        );
    }

    #[test]
    fn malformed_uris_are_refused() {
        for bad in [
            "https://kiln/gateway",
            "spiffe://kiln/admin",
            "spiffe://kiln/agent",
            "spiffe://kiln/agent/",
            "spiffe://kiln/agent/n 1",
            "spiffe://kiln/gateway/n-1",
            "spiffe://kiln/agent/n-1/extra",
            "spiffe:///gateway",
            "spiffe://KILN/gateway",
        ] {
            assert!(
                matches!(
                    Identity::parse_uri(bad),
                    Err(IdentityError::Malformed { .. })
                ),
                "{bad} was accepted"
            );
        }
    }
}
