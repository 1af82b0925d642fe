//! The server side: authenticate a signed request.
//!
//! [`Verifier::verify`] does it in one call; [`Verifier::parse`] and
//! [`Verifier::check`] split it around the key lookup for callers whose key
//! store is asynchronous. Checks run cheapest first and the nonce is only
//! recorded once the signature and body hash are proven, so requests
//! without the key cannot fill the replay cache.
//!
//! [`Verifier::check_head`] is the streaming form, for a server that must
//! not read a body before the request is known to be signed: the signature
//! covers `x-acs-content-sha256`, so the head alone proves the signer; the
//! nonce is recorded then (a replayed head is refused before its body is
//! read), and the body is checked against the signed hash while it streams
//! in ([`BodyCheck`]).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use hmac::Mac;
use http::{HeaderMap, Method, Request, Uri};
use kiln_core::limits::SIGNATURE_SKEW_MS;
use kiln_core::{AccountId, Clock, FcError, FcErrorCode};
use sha2::{Digest, Sha256};

use crate::canonical::{self, CanonicalInput};
use crate::date::{format_acs_date, parse_acs_date};
use crate::nonce::{NonceCache, NonceError, NonceLimits};
use crate::sign::signature_mac;
use crate::ALGORITHM;

const MAX_ACCESS_KEY_ID: usize = 128;
const MAX_NONCE: usize = 128;
const MAX_SIGNED_HEADERS: usize = 64;

/// An access key: its id, its secret and the account it acts for.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessKey {
    pub account_id: AccountId,
    pub access_key_id: String,
    pub secret: String,
}

impl fmt::Debug for AccessKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessKey")
            .field("account_id", &self.account_id)
            .field("access_key_id", &self.access_key_id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Where the verifier finds keys. Called once per request: keep it in memory.
pub trait KeyLookup: Send + Sync + 'static {
    fn lookup(&self, access_key_id: &str) -> Option<Arc<AccessKey>>;
}

/// Keys held in memory; the gateway loads its store into one and updates
/// it when keys change.
#[derive(Debug, Default)]
pub struct InMemoryKeys {
    keys: RwLock<HashMap<String, Arc<AccessKey>>>,
}

impl InMemoryKeys {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a key.
    pub fn insert(&self, key: AccessKey) {
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        keys.insert(key.access_key_id.clone(), Arc::new(key));
    }

    /// Removes a key; returns whether it existed.
    pub fn remove(&self, access_key_id: &str) -> bool {
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        keys.remove(access_key_id).is_some()
    }
}

impl KeyLookup for InMemoryKeys {
    fn lookup(&self, access_key_id: &str) -> Option<Arc<AccessKey>> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        keys.get(access_key_id).cloned()
    }
}

/// The parts of an incoming request the signature covers (the body is
/// passed separately). `uri` is the request target as received: its path
/// must still be percent-encoded, as hyper keeps it.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
}

impl<'a> RequestView<'a> {
    pub fn new(method: &'a Method, uri: &'a Uri, headers: &'a HeaderMap) -> Self {
        Self {
            method,
            uri,
            headers,
        }
    }

    pub fn of<B>(request: &'a Request<B>) -> Self {
        Self::new(request.method(), request.uri(), request.headers())
    }
}

/// Who signed a request.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub key: Arc<AccessKey>,
    /// `x-acs-security-token`, passed through for a later STS check.
    pub security_token: Option<String>,
}

impl Authenticated {
    pub fn account_id(&self) -> &AccountId {
        &self.key.account_id
    }

    pub fn access_key_id(&self) -> &str {
        &self.key.access_key_id
    }
}

/// Why a request was not authenticated. Converts into FC's error codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("required HTTP header {0} was not specified")]
    MissingHeader(&'static str),
    #[error("Authorization header is malformed: {0}")]
    MalformedAuthorization(&'static str),
    #[error("Signature algorithm {0:?} is not supported; sign with ACS3-HMAC-SHA256")]
    UnsupportedAlgorithm(String),
    #[error("Header {0} is malformed")]
    MalformedHeader(&'static str),
    #[error("Header {0} must be signed")]
    HeaderNotSigned(String),
    #[error("Signed header {0} is not in the request")]
    SignedHeaderMissing(String),
    #[error("invalid access key ID '{0}'")]
    UnknownAccessKey(String),
    #[error("The request signature we calculated does not match the signature you provided. Check your access key and signing method")]
    SignatureMismatch,
    #[error("x-acs-content-sha256 does not match the SHA-256 of the request body")]
    BodyHashMismatch,
    #[error("x-acs-accesskey-id does not match the access key of the signature")]
    AccessKeyIdMismatch,
    #[error("required HTTP header x-acs-date was not specified")]
    MissingDate,
    #[error("x-acs-date {0:?} is not a UTC time like 2024-01-01T00:00:00Z")]
    BadDate(String),
    #[error("The difference between the request time {date} and the server time {now} exceeds 15 minutes")]
    Skewed { date: String, now: String },
    #[error("Specified signature nonce was used already")]
    NonceUsed,
    #[error("Too many signed requests of this account in the signature window (the replay cache holds its share); slow down and retry")]
    NonceThrottled,
}

impl AuthError {
    pub fn code(&self) -> FcErrorCode {
        match self {
            Self::MissingHeader(_) => FcErrorCode::MissingRequiredHeader,
            Self::UnknownAccessKey(_) => FcErrorCode::InvalidAccessKeyId,
            Self::MissingDate | Self::BadDate(_) | Self::Skewed { .. } => {
                FcErrorCode::RequestTimeTooSkewed
            }
            Self::NonceUsed => FcErrorCode::SignatureNonceUsed,
            Self::NonceThrottled => FcErrorCode::ResourceThrottled,
            Self::MalformedAuthorization(_)
            | Self::UnsupportedAlgorithm(_)
            | Self::MalformedHeader(_)
            | Self::HeaderNotSigned(_)
            | Self::SignedHeaderMissing(_)
            | Self::SignatureMismatch
            | Self::BodyHashMismatch
            | Self::AccessKeyIdMismatch => FcErrorCode::SignatureNotMatch,
        }
    }
}

impl From<AuthError> for FcError {
    fn from(e: AuthError) -> Self {
        FcError::new(e.code(), e.to_string())
    }
}

/// A request whose signature fields are well-formed and whose date is in
/// the window; not yet checked against a key.
#[derive(Debug, Clone)]
pub struct ParsedRequest<'a> {
    view: RequestView<'a>,
    access_key_id: &'a str,
    signed_headers: &'a str,
    signature: [u8; 32],
    date_ms: u64,
    nonce: &'a str,
    payload_hex: &'a str,
    payload_sha256: [u8; 32],
    sts_access_key_id: Option<&'a str>,
    security_token: Option<&'a str>,
}

impl<'a> ParsedRequest<'a> {
    /// The `Credential` of the Authorization header: the key to look up.
    pub fn access_key_id(&self) -> &'a str {
        self.access_key_id
    }

    /// `x-acs-security-token`, sent with temporary (STS) credentials.
    pub fn security_token(&self) -> Option<&'a str> {
        self.security_token
    }

    /// `x-acs-signature-nonce` (for a replay check shared between
    /// several verifiers, on top of the [`Verifier`]'s own).
    pub fn nonce(&self) -> &'a str {
        self.nonce
    }

    /// The request's `x-acs-date`, in ms.
    pub fn date_ms(&self) -> u64 {
        self.date_ms
    }
}

/// Authenticates requests against a key store, a clock and a replay cache.
pub struct Verifier {
    keys: Arc<dyn KeyLookup>,
    clock: Arc<dyn Clock>,
    nonces: NonceCache,
    skew_ms: u64,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("skew_ms", &self.skew_ms)
            .field("nonces", &self.nonces.len())
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// FC's 15-minute window and a nonce cache sized for
    /// [`NonceLimits::DEFAULT_RATE`].
    pub fn new(keys: Arc<dyn KeyLookup>, clock: Arc<dyn Clock>) -> Self {
        Self {
            keys,
            clock,
            nonces: NonceCache::default(),
            skew_ms: SIGNATURE_SKEW_MS,
        }
    }

    /// Accepts request dates up to `skew_ms` from the server's clock
    /// (FC's is 15 minutes); resize the nonce cache after changing it.
    pub fn with_skew_ms(self, skew_ms: u64) -> Self {
        Self { skew_ms, ..self }
    }

    /// The allowed difference between a request's date and the clock.
    pub fn skew_ms(&self) -> u64 {
        self.skew_ms
    }

    /// Bounds the replay cache and each account's share of it (an account
    /// beyond its share is throttled, retryably; see [`crate::nonce`]).
    pub fn with_nonce_limits(self, limits: NonceLimits) -> Self {
        Self {
            nonces: NonceCache::new(limits),
            ..self
        }
    }

    /// The replay cache's bounds.
    pub fn nonce_limits(&self) -> NonceLimits {
        self.nonces.limits()
    }

    /// Nonces currently remembered (for metrics).
    pub fn remembered_nonces(&self) -> usize {
        self.nonces.len()
    }

    /// Authenticates `request` with `body` (the complete body as received).
    pub fn verify(
        &self,
        request: RequestView<'_>,
        body: &[u8],
    ) -> Result<Authenticated, AuthError> {
        let parsed = self.parse(request)?;
        let key = self.keys.lookup(parsed.access_key_id);
        self.check(&parsed, key, &Sha256::digest(body).into())
    }

    /// Checks the shape of the signature headers and the date window.
    pub fn parse<'a>(&self, request: RequestView<'a>) -> Result<ParsedRequest<'a>, AuthError> {
        let headers = request.headers;
        let authorization =
            single(headers, "authorization")?.ok_or(AuthError::MissingHeader("Authorization"))?;
        let auth = parse_authorization(authorization)?;

        let date = match single(headers, "x-acs-date") {
            Ok(Some(d)) => d,
            Ok(None) => return Err(AuthError::MissingDate),
            Err(_) => return Err(AuthError::BadDate(printable(headers, "x-acs-date"))),
        };
        let date_ms = parse_acs_date(date).ok_or_else(|| AuthError::BadDate(clip(date)))?;
        let now_ms = self.clock.now_ms();
        if date_ms.abs_diff(now_ms) > self.skew_ms {
            return Err(AuthError::Skewed {
                date: format_acs_date(date_ms),
                now: format_acs_date(now_ms),
            });
        }

        let nonce = single(headers, "x-acs-signature-nonce")?
            .ok_or(AuthError::MissingHeader("x-acs-signature-nonce"))?;
        if nonce.is_empty() || nonce.len() > MAX_NONCE {
            return Err(AuthError::MalformedHeader("x-acs-signature-nonce"));
        }
        let payload_hex = single(headers, "x-acs-content-sha256")?
            .ok_or(AuthError::MissingHeader("x-acs-content-sha256"))?;
        let mut payload_sha256 = [0u8; 32];
        hex::decode_to_slice(payload_hex, &mut payload_sha256)
            .map_err(|_| AuthError::MalformedHeader("x-acs-content-sha256"))?;

        // Sorted and unique (parse_authorization checked), at most
        // MAX_SIGNED_HEADERS: split once, then search it per header.
        let signed: Vec<&str> = auth.signed_headers.split(';').collect();
        let is_signed = |name: &str| signed.binary_search(&name).is_ok();
        for required in [
            "host",
            "x-acs-content-sha256",
            "x-acs-date",
            "x-acs-signature-nonce",
        ] {
            if !is_signed(required) {
                return Err(AuthError::HeaderNotSigned(required.to_owned()));
            }
        }
        for name in headers.keys() {
            let name = name.as_str();
            if (name.starts_with("x-acs-") || name == "content-type") && !is_signed(name) {
                return Err(AuthError::HeaderNotSigned(name.to_owned()));
            }
        }

        Ok(ParsedRequest {
            view: request,
            access_key_id: auth.access_key_id,
            signed_headers: auth.signed_headers,
            signature: auth.signature,
            date_ms,
            nonce,
            payload_hex,
            payload_sha256,
            sts_access_key_id: single(headers, "x-acs-accesskey-id")?,
            security_token: single(headers, "x-acs-security-token")?,
        })
    }

    /// Checks the signature with `key` (from looking up
    /// [`ParsedRequest::access_key_id`]), the body hash, and the nonce.
    pub fn check(
        &self,
        parsed: &ParsedRequest<'_>,
        key: Option<Arc<AccessKey>>,
        body_sha256: &[u8; 32],
    ) -> Result<Authenticated, AuthError> {
        let key = self.check_signature(parsed, key)?;
        if parsed.payload_sha256 != *body_sha256 {
            return Err(AuthError::BodyHashMismatch);
        }
        self.record_nonce(parsed, key)
    }

    /// Checks the signature of the head with `key` and records the nonce,
    /// before any of the body is read; the body is then checked while it
    /// is read, with the returned [`BodyCheck`]. A request whose body does
    /// not match has used its nonce (its head was authentic).
    pub fn check_head(
        &self,
        parsed: &ParsedRequest<'_>,
        key: Option<Arc<AccessKey>>,
    ) -> Result<(Authenticated, BodyCheck), AuthError> {
        let key = self.check_signature(parsed, key)?;
        let who = self.record_nonce(parsed, key)?;
        Ok((who, BodyCheck::new(parsed.payload_sha256)))
    }

    fn check_signature(
        &self,
        parsed: &ParsedRequest<'_>,
        key: Option<Arc<AccessKey>>,
    ) -> Result<Arc<AccessKey>, AuthError> {
        let key = key.ok_or_else(|| AuthError::UnknownAccessKey(clip(parsed.access_key_id)))?;
        let view = parsed.view;
        let digest = canonical::digest(&CanonicalInput {
            method: view.method.as_str(),
            path: view.uri.path(),
            query: view.uri.query(),
            headers: view.headers,
            authority: view.uri.authority().map(|a| a.as_str()),
            signed_headers: parsed.signed_headers,
            payload_hex: parsed.payload_hex,
        })
        .map_err(|missing| AuthError::SignedHeaderMissing(missing.0))?;
        signature_mac(&key.secret, &digest)
            .verify_slice(&parsed.signature)
            .map_err(|_| AuthError::SignatureMismatch)?;
        if parsed
            .sts_access_key_id
            .is_some_and(|id| id != parsed.access_key_id)
        {
            return Err(AuthError::AccessKeyIdMismatch);
        }
        Ok(key)
    }

    fn record_nonce(
        &self,
        parsed: &ParsedRequest<'_>,
        key: Arc<AccessKey>,
    ) -> Result<Authenticated, AuthError> {
        self.nonces
            .check_and_insert(
                key.account_id.as_str(),
                parsed.access_key_id,
                parsed.nonce,
                parsed.date_ms + self.skew_ms,
                self.clock.now_ms(),
            )
            .map_err(|e| match e {
                NonceError::Replayed => AuthError::NonceUsed,
                NonceError::AccountThrottled => AuthError::NonceThrottled,
            })?;
        Ok(Authenticated {
            key,
            security_token: parsed.security_token.map(str::to_owned),
        })
    }
}

/// The SHA-256 of a body as it streams in, checked at its end against the
/// signed `x-acs-content-sha256`.
#[derive(Clone)]
pub struct BodyCheck {
    hasher: Sha256,
    expected: [u8; 32],
}

impl fmt::Debug for BodyCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BodyCheck")
            .field("expected", &hex::encode(self.expected))
            .finish_non_exhaustive()
    }
}

impl BodyCheck {
    pub fn new(expected: [u8; 32]) -> Self {
        Self {
            hasher: Sha256::new(),
            expected,
        }
    }

    /// Hashes the next piece of the body.
    pub fn update(&mut self, chunk: &[u8]) {
        self.hasher.update(chunk);
    }

    /// At the body's end: whether what was read is what was signed.
    pub fn finish(self) -> Result<(), AuthError> {
        if <[u8; 32]>::from(self.hasher.finalize()) == self.expected {
            Ok(())
        } else {
            Err(AuthError::BodyHashMismatch)
        }
    }
}

struct Authorization<'a> {
    access_key_id: &'a str,
    signed_headers: &'a str,
    signature: [u8; 32],
}

/// `ACS3-HMAC-SHA256 Credential=<id>,SignedHeaders=<a;b>,Signature=<hex>`.
fn parse_authorization(value: &str) -> Result<Authorization<'_>, AuthError> {
    use AuthError::MalformedAuthorization as Bad;
    let (algorithm, rest) = value.trim().split_once(' ').ok_or(Bad(
        "expected '<algorithm> Credential=...,SignedHeaders=...,Signature=...'",
    ))?;
    if algorithm != ALGORITHM {
        return Err(AuthError::UnsupportedAlgorithm(clip(algorithm)));
    }
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (k, v) = part
            .trim()
            .split_once('=')
            .ok_or(Bad("each field must be name=value"))?;
        let slot = match k {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed,
            "Signature" => &mut signature,
            _ => return Err(Bad("unknown field")),
        };
        if slot.replace(v).is_some() {
            return Err(Bad("repeated field"));
        }
    }
    let access_key_id = credential.ok_or(Bad("Credential is missing"))?;
    if access_key_id.is_empty()
        || access_key_id.len() > MAX_ACCESS_KEY_ID
        || !access_key_id.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(Bad("Credential is not an access key id"));
    }
    let signed_headers = signed.ok_or(Bad("SignedHeaders is missing"))?;
    let mut previous: Option<&str> = None;
    for (i, name) in signed_headers.split(';').enumerate() {
        if i >= MAX_SIGNED_HEADERS {
            return Err(Bad("SignedHeaders lists too many headers"));
        }
        let token =
            |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.!#$%&'*+^`|~".contains(&b);
        if name.is_empty() || !name.bytes().all(token) {
            return Err(Bad(
                "SignedHeaders must be lower-case header names separated by ';'",
            ));
        }
        if previous.is_some_and(|p| p >= name) {
            return Err(Bad("SignedHeaders must be sorted and unique"));
        }
        previous = Some(name);
    }
    let signature_hex = signature.ok_or(Bad("Signature is missing"))?;
    let mut signature = [0u8; 32];
    hex::decode_to_slice(signature_hex, &mut signature)
        .map_err(|_| Bad("Signature must be 64 hex digits"))?;
    Ok(Authorization {
        access_key_id,
        signed_headers,
        signature,
    })
}

/// The one value of a header: `None` if absent; an error if repeated or not
/// visible ASCII.
fn single<'h>(headers: &'h HeaderMap, name: &'static str) -> Result<Option<&'h str>, AuthError> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    let bad = || {
        if name == "authorization" {
            AuthError::MalformedAuthorization("must appear once, in visible ASCII")
        } else {
            AuthError::MalformedHeader(name)
        }
    };
    if values.next().is_some() {
        return Err(bad());
    }
    first.to_str().map(Some).map_err(|_| bad())
}

/// A caller-supplied value, made safe and short for an error message.
fn clip(s: &str) -> String {
    s.chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

fn printable(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .map(|v| clip(&String::from_utf8_lossy(v.as_bytes())))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::HeaderValue;
    use kiln_core::ManualClock;

    use super::*;
    use crate::sign::{sign, SigningParams};

    const NOW: u64 = 1_764_000_000_000;
    const AK: &str = "LTAItestkey";
    const SECRET: &str = "s3cr3t";

    fn setup() -> (Verifier, ManualClock) {
        let keys = InMemoryKeys::new();
        keys.insert(AccessKey {
            account_id: "1234".parse().unwrap(),
            access_key_id: AK.into(),
            secret: SECRET.into(),
        });
        let clock = ManualClock::new(NOW);
        (
            Verifier::new(Arc::new(keys), Arc::new(clock.clone())),
            clock,
        )
    }

    struct Req {
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Vec<u8>,
    }

    impl Req {
        fn view(&self) -> RequestView<'_> {
            RequestView::new(&self.method, &self.uri, &self.headers)
        }
    }

    fn signed_with(nonce: &str, date_ms: u64, secret: &str, body: &[u8]) -> Req {
        let method = Method::POST;
        let uri: Uri = "https://127.0.0.1:8443/2023-03-30/functions/f%2Dx/invocations?qualifier=LATEST&a=b%20c"
            .parse()
            .unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            "content-type",
            HeaderValue::from_static("application/octet-stream"),
        );
        headers.insert("x-fc-invocation-type", HeaderValue::from_static("Sync"));
        let params = SigningParams::new(AK, secret, date_ms, nonce).with_action("InvokeFunction");
        sign(&method, &uri, &mut headers, body, &params).unwrap();
        // What reaches a server: origin-form target, Host header.
        let uri = uri.path_and_query().unwrap().as_str().parse().unwrap();
        Req {
            method,
            uri,
            headers,
            body: body.to_vec(),
        }
    }

    fn signed(nonce: &str) -> Req {
        signed_with(nonce, NOW, SECRET, b"payload")
    }

    fn verify(v: &Verifier, r: &Req) -> Result<Authenticated, AuthError> {
        v.verify(r.view(), &r.body)
    }

    #[test]
    fn round_trip() {
        let (v, _) = setup();
        let r = signed("n-1");
        let a = verify(&v, &r).unwrap();
        assert_eq!(a.account_id().as_str(), "1234");
        assert_eq!(a.access_key_id(), AK);
        assert_eq!(a.security_token, None);
        assert!(format!("{:?}", a.key).contains("<redacted>"));
    }

    #[test]
    fn http2_authority_stands_in_for_host() {
        let (v, _) = setup();
        let mut r = signed("n-h2");
        let host = r.headers.remove("host").unwrap();
        r.uri = format!(
            "https://{}{}",
            host.to_str().unwrap(),
            r.uri.path_and_query().unwrap()
        )
        .parse()
        .unwrap();
        verify(&v, &r).unwrap();
    }

    #[test]
    fn security_token_is_passed_through() {
        let (v, _) = setup();
        let method = Method::GET;
        let uri: Uri = "http://h:1/2023-03-30/functions".parse().unwrap();
        let mut headers = HeaderMap::new();
        let params = SigningParams {
            security_token: Some("sts-token"),
            ..SigningParams::new(AK, SECRET, NOW, "n-sts")
        };
        sign(&method, &uri, &mut headers, b"", &params).unwrap();
        let a = v
            .verify(RequestView::new(&method, &uri, &headers), b"")
            .unwrap();
        assert_eq!(a.security_token.as_deref(), Some("sts-token"));
        // x-acs-accesskey-id must name the signing key.
        let mut h2 = HeaderMap::new();
        let p2 = SigningParams {
            nonce: "n-sts2",
            ..params
        };
        // Signing with a token sets the header, so forge it after signing.
        sign(&method, &uri, &mut h2, b"", &p2).unwrap();
        h2.insert("x-acs-accesskey-id", HeaderValue::from_static("other"));
        let e = v
            .verify(RequestView::new(&method, &uri, &h2), b"")
            .unwrap_err();
        assert_eq!(e.code(), FcErrorCode::SignatureNotMatch);
    }

    #[test]
    fn replay_is_refused_within_window() {
        let (v, clock) = setup();
        let r = signed("n-replay");
        verify(&v, &r).unwrap();
        clock.advance(Duration::from_secs(14 * 60));
        let e = verify(&v, &r).unwrap_err();
        assert_eq!(e, AuthError::NonceUsed);
        let fc = FcError::from(e);
        assert_eq!(fc.code, FcErrorCode::SignatureNonceUsed);
        assert_eq!(fc.message, "Specified signature nonce was used already");
        // After the window the date check refuses it instead.
        clock.advance(Duration::from_secs(2 * 60));
        assert_eq!(
            verify(&v, &r).unwrap_err().code(),
            FcErrorCode::RequestTimeTooSkewed
        );
        // The same nonce from another key is a different nonce.
        assert_eq!(v.remembered_nonces(), 1);
    }

    #[test]
    fn unknown_key() {
        let (v, _) = setup();
        let mut r = signed("n-k");
        let auth = r.headers["authorization"]
            .to_str()
            .unwrap()
            .replace(AK, "LTAIother");
        r.headers.insert("authorization", auth.parse().unwrap());
        let e = FcError::from(verify(&v, &r).unwrap_err());
        assert_eq!(e.code, FcErrorCode::InvalidAccessKeyId);
        assert_eq!(e.message, "invalid access key ID 'LTAIother'");
    }

    #[test]
    fn wrong_secret_tampering_and_body_mismatch() {
        let (v, _) = setup();
        let r = signed_with("n-s", NOW, "wrong", b"payload");
        assert_eq!(verify(&v, &r).unwrap_err(), AuthError::SignatureMismatch);

        for (name, value) in [
            ("x-acs-action", "DeleteFunction"),
            ("content-type", "text/plain"),
            ("host", "evil:1"),
            ("x-acs-signature-nonce", "other"),
        ] {
            let mut r = signed(&format!("n-t-{name}"));
            r.headers.insert(name, value.parse().unwrap());
            assert_eq!(
                verify(&v, &r).unwrap_err(),
                AuthError::SignatureMismatch,
                "{name}"
            );
        }
        let mut r = signed("n-path");
        r.uri = "/2023-03-30/functions/other/invocations?qualifier=LATEST&a=b%20c"
            .parse()
            .unwrap();
        assert_eq!(verify(&v, &r).unwrap_err(), AuthError::SignatureMismatch);
        let mut r = signed("n-query");
        r.uri = "/2023-03-30/functions/f%2Dx/invocations?qualifier=1&a=b%20c"
            .parse()
            .unwrap();
        assert_eq!(verify(&v, &r).unwrap_err(), AuthError::SignatureMismatch);
        let mut r = signed("n-method");
        r.method = Method::PUT;
        assert_eq!(verify(&v, &r).unwrap_err(), AuthError::SignatureMismatch);

        let mut r = signed("n-body");
        r.body = b"other payload".to_vec();
        let e = verify(&v, &r).unwrap_err();
        assert_eq!(e, AuthError::BodyHashMismatch);
        assert_eq!(e.code(), FcErrorCode::SignatureNotMatch);
        // A failed request does not burn its nonce.
        r.body = b"payload".to_vec();
        verify(&v, &r).unwrap();
    }

    #[test]
    fn unsigned_headers_may_change_but_acs_headers_must_be_signed() {
        let (v, _) = setup();
        let mut r = signed("n-u");
        r.headers
            .insert("user-agent", "added by a proxy".parse().unwrap());
        r.headers.insert("content-length", "7".parse().unwrap());
        r.headers
            .insert("x-forwarded-for", "1.2.3.4".parse().unwrap());
        verify(&v, &r).unwrap();

        let mut r = signed("n-u2");
        r.headers.insert("x-acs-extra", "1".parse().unwrap());
        assert_eq!(
            verify(&v, &r).unwrap_err(),
            AuthError::HeaderNotSigned("x-acs-extra".into())
        );
    }

    #[test]
    fn dates_outside_or_malformed_are_too_skewed() {
        let (v, clock) = setup();
        let r = signed("n-d1");
        clock.set(NOW + SIGNATURE_SKEW_MS + 1000);
        let e = FcError::from(verify(&v, &r).unwrap_err());
        assert_eq!(e.code, FcErrorCode::RequestTimeTooSkewed);
        clock.set(NOW - SIGNATURE_SKEW_MS - 1000);
        assert_eq!(
            verify(&v, &r).unwrap_err().code(),
            FcErrorCode::RequestTimeTooSkewed
        );
        clock.set(NOW + SIGNATURE_SKEW_MS); // exactly at the edge is accepted
        verify(&v, &r).unwrap();

        clock.set(NOW);
        let mut r = signed("n-d2");
        r.headers.insert("x-acs-date", "yesterday".parse().unwrap());
        assert!(matches!(verify(&v, &r).unwrap_err(), AuthError::BadDate(_)));
        r.headers.remove("x-acs-date");
        assert_eq!(verify(&v, &r).unwrap_err(), AuthError::MissingDate);
        assert_eq!(
            AuthError::MissingDate.code(),
            FcErrorCode::RequestTimeTooSkewed
        );
    }

    #[test]
    fn missing_headers() {
        let (v, _) = setup();
        for (name, shown) in [
            ("authorization", "Authorization"),
            ("x-acs-signature-nonce", "x-acs-signature-nonce"),
            ("x-acs-content-sha256", "x-acs-content-sha256"),
        ] {
            let mut r = signed("n-m");
            r.headers.remove(name);
            let e = FcError::from(verify(&v, &r).unwrap_err());
            assert_eq!(e.code, FcErrorCode::MissingRequiredHeader, "{name}");
            assert_eq!(
                e.message,
                format!("required HTTP header {shown} was not specified")
            );
        }
    }

    #[test]
    fn malformed_authorization() {
        let (v, _) = setup();
        let good = signed("n-a").headers["authorization"]
            .to_str()
            .unwrap()
            .to_owned();
        let sig = good.rsplit_once("Signature=").unwrap().1.to_owned();
        for bad in [
            "".to_owned(),
            "ACS3-HMAC-SHA256".to_owned(),
            good.replace("ACS3-HMAC-SHA256", "ACS3-HMAC-SM3"),
            good.replace("Credential=", "Cred="),
            good.replace(",Signature=", ",Signature=zz"),
            good.replace(&sig, &sig[..10]),
            good.replace("SignedHeaders=", "SignedHeaders=zzz;"),
            good.replace("SignedHeaders=", "SignedHeaders=Host;"),
            good.replace("SignedHeaders=", "SignedHeaders=;"),
            format!("{good},Signature={sig}"),
            good.replace(&format!("Credential={AK}"), "Credential="),
            good.replace("content-type;", ""),
            good.replace("host;", ""),
        ] {
            let mut r = signed("n-a");
            r.headers.insert("authorization", bad.parse().unwrap());
            let e = verify(&v, &r).unwrap_err();
            assert_eq!(e.code(), FcErrorCode::SignatureNotMatch, "{bad:?}: {e}");
        }
        let mut r = signed("n-a2");
        let dup = r.headers["authorization"].clone();
        r.headers.append("authorization", dup);
        assert_eq!(
            verify(&v, &r).unwrap_err().code(),
            FcErrorCode::SignatureNotMatch
        );
    }

    #[test]
    fn signed_header_absent_from_request() {
        let (v, _) = setup();
        let mut r = signed("n-abs");
        r.headers.remove("x-fc-invocation-type");
        assert_eq!(
            verify(&v, &r).unwrap_err(),
            AuthError::SignedHeaderMissing("x-fc-invocation-type".into())
        );
    }

    #[test]
    fn an_account_over_its_nonce_share_is_throttled_retryably() {
        let (v, _) = setup();
        let v = v.with_nonce_limits(NonceLimits {
            capacity: 4,
            account_max: 2,
            window_ms: 2 * SIGNATURE_SKEW_MS,
        });
        verify(&v, &signed("n-full-1")).unwrap();
        verify(&v, &signed("n-full-2")).unwrap();
        let e = verify(&v, &signed("n-full-3")).unwrap_err();
        assert_eq!(e, AuthError::NonceThrottled);
        assert_eq!(e.code(), FcErrorCode::ResourceThrottled);
        assert!(e.code().is_retryable());
    }

    #[test]
    fn check_head_proves_the_signer_before_the_body_and_checks_it_streamed() {
        let (v, _) = setup();
        let r = signed("n-head");
        let parsed = v.parse(r.view()).unwrap();
        let key = v.keys.lookup(parsed.access_key_id());
        let (who, mut body) = v.check_head(&parsed, key.clone()).unwrap();
        assert_eq!(who.account_id().as_str(), "1234");
        body.update(b"pay");
        body.update(b"load");
        body.finish().unwrap();
        // The head's nonce is used: a replay is refused before any body.
        assert_eq!(
            v.check_head(&parsed, key.clone()).unwrap_err(),
            AuthError::NonceUsed
        );
        // Another body than the signed one fails at its end.
        let r = signed("n-head2");
        let parsed = v.parse(r.view()).unwrap();
        let (_, mut body) = v.check_head(&parsed, key).unwrap();
        body.update(b"payloaX");
        assert_eq!(body.finish().unwrap_err(), AuthError::BodyHashMismatch);
        // A wrong secret is refused on the head alone.
        let r = signed_with("n-head3", NOW, "wrong", b"payload");
        let parsed = v.parse(r.view()).unwrap();
        let key = v.keys.lookup(parsed.access_key_id());
        assert_eq!(
            v.check_head(&parsed, key).unwrap_err(),
            AuthError::SignatureMismatch
        );
    }
}
