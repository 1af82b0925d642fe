//! The client side: sign a request as `alibabacloud_tea_openapi`'s
//! `do_request` does, for the CLI and for tests.

use hmac::{Hmac, Mac};
use http::header::{HeaderName, HeaderValue, AUTHORIZATION, HOST};
use http::{HeaderMap, Method, Request, Uri};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::canonical::{self, CanonicalInput};
use crate::date::format_acs_date;
use crate::{ALGORITHM, API_VERSION};

/// What a signature is made from besides the request itself.
#[derive(Clone, Copy)]
pub struct SigningParams<'a> {
    pub access_key_id: &'a str,
    pub access_key_secret: &'a str,
    /// STS token: sent as `x-acs-security-token` with `x-acs-accesskey-id`.
    pub security_token: Option<&'a str>,
    /// `x-acs-action`, e.g. `InvokeFunction`.
    pub action: Option<&'a str>,
    /// `x-acs-version`.
    pub version: &'a str,
    /// The request time, milliseconds since the epoch (sent to the second).
    pub date_ms: u64,
    /// `x-acs-signature-nonce`; unique per request (see [`new_nonce`]).
    pub nonce: &'a str,
}

impl<'a> SigningParams<'a> {
    pub fn new(
        access_key_id: &'a str,
        access_key_secret: &'a str,
        date_ms: u64,
        nonce: &'a str,
    ) -> Self {
        Self {
            access_key_id,
            access_key_secret,
            security_token: None,
            action: None,
            version: API_VERSION,
            date_ms,
            nonce,
        }
    }

    pub fn with_action(self, action: &'a str) -> Self {
        Self {
            action: Some(action),
            ..self
        }
    }
}

impl std::fmt::Debug for SigningParams<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningParams")
            .field("access_key_id", &self.access_key_id)
            .field("action", &self.action)
            .field("date_ms", &self.date_ms)
            .finish_non_exhaustive()
    }
}

/// Why a request could not be signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("Request has neither a Host header nor an authority in its URI")]
    MissingHost,
    #[error("Value for header {0} is not a valid HTTP header value")]
    InvalidHeaderValue(&'static str),
}

/// Headers that HTTP/2 drops or a proxy rewrites; signing them would make
/// the signature depend on the transport.
const UNSIGNED: [&str; 7] = [
    "authorization",
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
];

/// A fresh nonce: 32 random hex digits (the Python SDK sends an MD5 hex).
pub fn new_nonce() -> String {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Adds `host` (from the URI when absent), `x-acs-version`, `x-acs-action`,
/// `x-acs-date`, `x-acs-signature-nonce`, `x-acs-content-sha256`, the STS
/// headers when a token is given, and `authorization`, signing every header
/// then present (as the Python SDK does) except hop-by-hop ones.
pub fn sign(
    method: &Method,
    uri: &Uri,
    headers: &mut HeaderMap,
    body: &[u8],
    params: &SigningParams<'_>,
) -> Result<(), SignError> {
    if !headers.contains_key(HOST) {
        let authority = uri.authority().ok_or(SignError::MissingHost)?;
        headers.insert(HOST, value(authority.as_str(), "host")?);
    }
    set(headers, "x-acs-version", params.version)?;
    if let Some(action) = params.action {
        set(headers, "x-acs-action", action)?;
    }
    set(headers, "x-acs-date", &format_acs_date(params.date_ms))?;
    set(headers, "x-acs-signature-nonce", params.nonce)?;
    let payload_hex = hex::encode(Sha256::digest(body));
    set(headers, "x-acs-content-sha256", &payload_hex)?;
    if let Some(token) = params.security_token.filter(|t| !t.is_empty()) {
        set(headers, "x-acs-accesskey-id", params.access_key_id)?;
        set(headers, "x-acs-security-token", token)?;
    }
    headers.remove(AUTHORIZATION);

    let mut names: Vec<&str> = headers
        .keys()
        .map(HeaderName::as_str)
        .filter(|n| !UNSIGNED.contains(n))
        .collect();
    names.sort_unstable();
    let signed_headers = names.join(";");
    let digest = canonical::digest(&CanonicalInput {
        method: method.as_str(),
        path: uri.path(),
        query: uri.query(),
        headers,
        authority: None,
        signed_headers: &signed_headers,
        payload_hex: &payload_hex,
    })
    .map_err(|_| SignError::MissingHost)?;
    let signature = signature_hex(params.access_key_secret, &digest);
    let authorization = format!(
        "{ALGORITHM} Credential={},SignedHeaders={signed_headers},Signature={signature}",
        params.access_key_id
    );
    headers.insert(AUTHORIZATION, value(&authorization, "authorization")?);
    Ok(())
}

/// [`sign`] for an `http::Request` whose body is in memory.
pub fn sign_request<B: AsRef<[u8]>>(
    request: &mut Request<B>,
    params: &SigningParams<'_>,
) -> Result<(), SignError> {
    let (method, uri) = (request.method().clone(), request.uri().clone());
    let body = request.body().as_ref().to_vec();
    sign(&method, &uri, request.headers_mut(), &body, params)
}

/// hex(HMAC-SHA256(secret, "ACS3-HMAC-SHA256\n" + hex(canonical digest))).
pub(crate) fn signature_hex(secret: &str, canonical_digest: &[u8; 32]) -> String {
    hex::encode(signature_bytes(secret, canonical_digest))
}

pub(crate) fn signature_mac(secret: &str, canonical_digest: &[u8; 32]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(ALGORITHM.as_bytes());
    mac.update(b"\n");
    let mut hex_digest = [0u8; 64];
    // Writing 32 bytes as hex into 64 bytes cannot fail.
    let _ = hex::encode_to_slice(canonical_digest, &mut hex_digest);
    mac.update(&hex_digest);
    mac
}

fn signature_bytes(secret: &str, canonical_digest: &[u8; 32]) -> [u8; 32] {
    signature_mac(secret, canonical_digest)
        .finalize()
        .into_bytes()
        .into()
}

fn set(headers: &mut HeaderMap, name: &'static str, v: &str) -> Result<(), SignError> {
    headers.insert(HeaderName::from_static(name), value(v, name)?);
    Ok(())
}

fn value(v: &str, name: &'static str) -> Result<HeaderValue, SignError> {
    HeaderValue::from_str(v).map_err(|_| SignError::InvalidHeaderValue(name))
}
