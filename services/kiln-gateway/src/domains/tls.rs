//! A custom domain's TLS: its certificate checked at Create/Update (PEM,
//! key matches, names the domain, within its validity), the rustls
//! configuration built from it and its `tlsConfig`, and the public
//! listener's selector that picks that configuration by SNI (falling back
//! to the gateway's own).
//!
//! The selector runs on the ClientHello ([`kiln_internal_api::server::ServerTls`]),
//! so a TLSv1.3-only domain refuses a TLS 1.2 handshake with rustls's own
//! `protocol_version` alert, and only offers the suites it allows.

use std::sync::Arc;

use kiln_core::FcError;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::ClientHello;
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use super::config::{TlsSettings, TlsVersion};
use super::Domains;

/// A checked certificate chain and key.
#[derive(Debug)]
pub struct DomainCert {
    pub key: Arc<CertifiedKey>,
    /// The leaf's DNS names.
    pub names: Vec<String>,
}

fn invalid(msg: String) -> FcError {
    FcError::invalid_argument(msg)
}

/// Check `certificate` and `private_key` (PEM) for `domain`, and its
/// validity at `now_s` (Unix seconds) when given.
pub fn check_cert(
    domain: &str,
    certificate: &str,
    private_key: &str,
    now_s: Option<i64>,
) -> Result<DomainCert, FcError> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(certificate.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| {
                invalid(format!(
                    "certConfig.certificate is not a PEM certificate chain: {e}"
                ))
            })?;
    let Some(leaf) = certs.first() else {
        return Err(invalid(
            "certConfig.certificate holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        ));
    };
    let key = PrivateKeyDer::from_pem_slice(private_key.as_bytes()).map_err(|_| {
        invalid(
            "certConfig.privateKey is not a PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC)".into(),
        )
    })?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| invalid(format!("certConfig.certificate cannot be parsed: {e}")))?;
    let validity = parsed.validity();
    let now_s = now_s.unwrap_or_else(|| validity.not_before.timestamp());
    if validity.not_after.timestamp() < now_s {
        return Err(invalid(format!(
            "certConfig.certificate expired on {}; renew it",
            validity.not_after
        )));
    }
    if validity.not_before.timestamp() > now_s {
        return Err(invalid(format!(
            "certConfig.certificate is not valid before {}",
            validity.not_before
        )));
    }
    let names = kiln_pki::certificate_names(leaf)
        .map_err(|e| invalid(format!("certConfig.certificate cannot be parsed: {e}")))?;
    if !names.iter().any(|n| covers(n, domain)) {
        return Err(invalid(format!(
            "certConfig.certificate does not cover {domain}: its subject alternative names are [{}]",
            names.join(", ")
        )));
    }
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| invalid(format!("certConfig.privateKey cannot be used: {e}")))?;
    let key = CertifiedKey::new(certs, signing);
    key.keys_match().map_err(|_| {
        invalid("certConfig.privateKey does not match certConfig.certificate's public key".into())
    })?;
    Ok(DomainCert {
        key: Arc::new(key),
        names,
    })
}

/// Whether a certificate name covers `domain` (a `*.` wildcard covers one
/// label).
pub fn covers(name: &str, domain: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    match name.strip_prefix("*.") {
        Some(rest) => domain
            .split_once('.')
            .is_some_and(|(label, tail)| !label.is_empty() && tail == rest),
        None => name == domain,
    }
}

fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// The suites Kiln serves, by FC's (IANA) name: TLS 1.3 suites are
/// `TLS_AES_128_GCM_SHA256` and the like, TLS 1.2 suites
/// `TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256` and the like.
fn suite_name(s: &rustls::SupportedCipherSuite) -> String {
    let debug = format!("{:?}", s.suite());
    match debug.strip_prefix("TLS13_") {
        Some(rest) => format!("TLS_{rest}"),
        None => debug,
    }
}

/// The rustls configuration serving a domain.
pub fn server_config(cert: &DomainCert, tls: &TlsSettings) -> Result<Arc<ServerConfig>, FcError> {
    let mut provider = provider();
    if !tls.cipher_suites.is_empty() {
        let all = provider.cipher_suites.clone();
        let mut chosen = Vec::new();
        for name in &tls.cipher_suites {
            let upper = name.to_ascii_uppercase();
            let found = all
                .iter()
                .find(|s| suite_name(s) == upper || format!("{:?}", s.suite()) == upper);
            match found {
                Some(s) => chosen.push(*s),
                None => {
                    return Err(invalid(format!(
                        "tlsConfig.cipherSuites: {name:?} is not served by Kiln; it serves {}",
                        all.iter().map(suite_name).collect::<Vec<_>>().join(", ")
                    )))
                }
            }
        }
        for (v, label) in [
            (TlsVersion::Tls12, rustls::ProtocolVersion::TLSv1_2),
            (TlsVersion::Tls13, rustls::ProtocolVersion::TLSv1_3),
        ] {
            let allowed = tls.min_version <= v && v <= tls.max_version;
            if allowed && !chosen.iter().any(|s| s.version().version == label) {
                return Err(invalid(format!(
                    "tlsConfig.cipherSuites names no {} suite, but the domain allows {}: add one or narrow minVersion/maxVersion",
                    v.as_str(),
                    v.as_str()
                )));
            }
        }
        provider.cipher_suites = chosen;
    }
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = [
        (TlsVersion::Tls13, &rustls::version::TLS13),
        (TlsVersion::Tls12, &rustls::version::TLS12),
    ]
    .into_iter()
    .filter(|(v, _)| tls.min_version <= *v && *v <= tls.max_version)
    .map(|(_, p)| p)
    .collect();
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&versions)
        .map_err(|e| invalid(format!("tlsConfig cannot be served: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(OneCert(cert.key.clone())));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A domain's configuration serves its one certificate chain.
#[derive(Debug)]
struct OneCert(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for OneCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// The public listener's TLS: a custom domain's configuration by SNI, the
/// gateway's own otherwise.
pub struct Selector {
    pub default: Arc<ServerConfig>,
    pub domains: Arc<Domains>,
}

impl kiln_internal_api::server::TlsSelector for Selector {
    fn select(&self, hello: &ClientHello<'_>) -> Arc<ServerConfig> {
        hello
            .server_name()
            .and_then(|sni| self.domains.tls_for(sni))
            .unwrap_or_else(|| self.default.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_cover_one_label() {
        assert!(covers("shop.example.com", "shop.example.com"));
        assert!(covers("SHOP.example.com.", "shop.example.com"));
        assert!(covers("*.example.com", "shop.example.com"));
        assert!(!covers("*.example.com", "a.shop.example.com"));
        assert!(!covers("*.example.com", "example.com"));
        assert!(!covers("other.example.com", "shop.example.com"));
    }

    fn issued(names: &[&str]) -> kiln_pki::Issued {
        let ca = kiln_pki::Ca::generate("test ca").unwrap();
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        ca.issue(&kiln_pki::CertRequest::public_server(&names[0]).names(&names))
            .unwrap()
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    #[test]
    fn certificates_are_checked() {
        let good = issued(&["shop.example.com"]);
        let other = issued(&["shop.example.com"]);
        let c = check_cert(
            "shop.example.com",
            &good.cert_pem,
            &good.key_pem,
            Some(now()),
        )
        .unwrap();
        assert_eq!(c.names, vec!["shop.example.com"]);
        let cases = [
            (
                check_cert(
                    "other.example.com",
                    &good.cert_pem,
                    &good.key_pem,
                    Some(now()),
                ),
                "does not cover",
            ),
            (
                check_cert(
                    "shop.example.com",
                    &good.cert_pem,
                    &other.key_pem,
                    Some(now()),
                ),
                "does not match",
            ),
            (
                check_cert("shop.example.com", "not pem", &good.key_pem, Some(now())),
                "certConfig.certificate",
            ),
            (
                check_cert("shop.example.com", &good.cert_pem, "not pem", Some(now())),
                "certConfig.privateKey",
            ),
            (
                check_cert(
                    "shop.example.com",
                    &good.cert_pem,
                    &good.key_pem,
                    Some(now() + 3 * 365 * 86400),
                ),
                "expired",
            ),
        ];
        for (r, why) in cases {
            let e = r.unwrap_err();
            assert_eq!(e.code, kiln_core::FcErrorCode::InvalidArgument);
            assert!(e.message.contains(why), "{} / {why}", e.message);
        }
    }

    #[test]
    fn cipher_suites_are_checked_against_what_is_served() {
        let good = issued(&["shop.example.com"]);
        let c = check_cert(
            "shop.example.com",
            &good.cert_pem,
            &good.key_pem,
            Some(now()),
        )
        .unwrap();
        let settings = |min: TlsVersion, suites: &[&str]| TlsSettings {
            min_version: min,
            max_version: TlsVersion::Tls13,
            cipher_suites: suites.iter().map(|s| (*s).to_owned()).collect(),
        };
        server_config(
            &c,
            &settings(TlsVersion::Tls13, &["TLS_AES_128_GCM_SHA256"]),
        )
        .unwrap();
        server_config(
            &c,
            &settings(
                TlsVersion::Tls12,
                &[
                    "TLS_AES_256_GCM_SHA384",
                    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
                ],
            ),
        )
        .unwrap();
        let e = server_config(
            &c,
            &settings(TlsVersion::Tls12, &["TLS_AES_128_GCM_SHA256"]),
        )
        .unwrap_err();
        assert!(e.message.contains("no TLSv1.2 suite"), "{}", e.message);
        let e = server_config(
            &c,
            &settings(TlsVersion::Tls13, &["TLS_RSA_WITH_RC4_128_SHA"]),
        )
        .unwrap_err();
        assert!(e.message.contains("not served"), "{}", e.message);
    }
}
