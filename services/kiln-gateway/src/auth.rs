//! Request authentication with kiln-auth's ACS3-HMAC-SHA256 [`Verifier`],
//! keys looked up in the catalog's in-memory view, and temporary (STS)
//! credentials opened with the gateway's STS key ([`crate::ram::sts`]).
//!
//! Two steps, both on the head, so no body is read before its request is
//! proven signed: [`Authenticate::precheck`] parses the signature fields
//! and resolves the signer once, then [`Authenticate::verify`] checks the
//! signature with that [`Prechecked`] (it covers `x-acs-content-sha256`)
//! and consumes the nonce; the body is then read with the returned
//! [`BodyCheck`], which fails the call at the body's end when it is not
//! the signed one (see [`crate::api::request::read_signed_body`]).
//!
//! In a cluster the nonce is also claimed in the database every gateway
//! shares ([`SharedNonces`], after the gateway's own cache, which keeps
//! the per-account limits in front): a nonce used on one gateway and
//! replayed to another inside the skew window is refused. It costs one
//! round trip to PostgreSQL per signed request ([`ReplayCheck::run`]).

use std::sync::Arc;

use http::request::Parts;
pub use kiln_auth::BodyCheck;
use kiln_auth::{AuthError, KeyLookup, NonceLimits, ParsedRequest, RequestView, Verifier};
use kiln_core::{AccountId, Clock, FcError};

use crate::catalog::Catalog;
use crate::ram::sts::{Session, TokenError, STS_PREFIX};
use crate::ram::Ram;

/// Who acts: the account itself (its access keys) or a role (temporary
/// credentials issued to a function's instance).
#[derive(Debug, Clone)]
pub enum Principal {
    Account,
    Role(Arc<Session>),
}

/// The verified signer of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub account_id: AccountId,
    pub access_key_id: String,
    pub principal: Principal,
}

/// A request head whose signature fields parsed and whose signer is known;
/// what [`Authenticate::verify`] needs besides the body.
pub struct Prechecked<'a> {
    parsed: ParsedRequest<'a>,
    key: Arc<kiln_auth::AccessKey>,
    principal: Principal,
}

pub trait Authenticate: Send + Sync + 'static {
    /// Headers present and well-formed, date in the window, key known
    /// (for temporary credentials: token authentic, unexpired, matching).
    fn precheck<'a>(&self, parts: &'a Parts) -> Result<Prechecked<'a>, FcError>;
    /// The signature over the head (which names the body's SHA-256) and
    /// the nonce (not replayed, the account within its share of the replay
    /// cache); the body is to be read with the [`BodyCheck`].
    fn verify(&self, head: Prechecked<'_>) -> Result<(Caller, BodyCheck), FcError>;
    /// In a cluster, the shared nonce claim to run once
    /// [`Authenticate::verify`] accepted the head (None alone).
    fn replay_check(&self, _head: &Prechecked<'_>) -> Option<ReplayCheck> {
        None
    }
}

pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

/// Signature nonces recorded where every gateway of a cluster sees them.
pub trait SharedNonces: Send + Sync + 'static {
    /// Record `nonce` of `access_key_id` until `expires_ms`: true if it
    /// was new (or its earlier record expired by `now_ms`), false if it is
    /// a replay. Err when the record cannot be checked.
    fn claim(
        &self,
        access_key_id: &str,
        nonce: &str,
        expires_ms: u64,
        now_ms: u64,
    ) -> BoxFuture<Result<bool, String>>;
}

/// One request's shared nonce claim.
pub struct ReplayCheck {
    shared: Arc<dyn SharedNonces>,
    access_key_id: String,
    nonce: String,
    expires_ms: u64,
    now_ms: u64,
}

impl ReplayCheck {
    /// Refuse a nonce another gateway (or this one) already recorded, with
    /// FC's `SignatureNonceUsed`; an unreachable database refuses the call
    /// (`ServiceUnavailable`, retryable) rather than skip the check.
    pub async fn run(self) -> Result<(), FcError> {
        match self
            .shared
            .claim(
                &self.access_key_id,
                &self.nonce,
                self.expires_ms,
                self.now_ms,
            )
            .await
        {
            Ok(true) => Ok(()),
            Ok(false) => Err(AuthError::NonceUsed.into()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot check the signature nonce in the shared database");
                Err(FcError::unavailable(
                    "the signature nonce cannot be checked right now; retry the request",
                ))
            }
        }
    }
}

pub type SharedAuthenticator = Arc<dyn Authenticate>;

/// Keys for the verifier, from the catalog (memory only).
struct CatalogKeys(Arc<Catalog>);

impl KeyLookup for CatalogKeys {
    fn lookup(&self, access_key_id: &str) -> Option<Arc<kiln_auth::AccessKey>> {
        self.0.key(access_key_id)
    }
}

/// ACS3-HMAC-SHA256 against the store's keys and the STS key.
pub struct SignatureAuthenticator {
    verifier: Verifier,
    keys: Arc<Catalog>,
    ram: Arc<Ram>,
    clock: Arc<dyn Clock>,
    shared: Option<Arc<dyn SharedNonces>>,
}

/// The authenticator; `shared` is the cluster's nonce record (None alone).
pub fn signature_authenticator(
    catalog: Arc<Catalog>,
    ram: Arc<Ram>,
    clock: Arc<dyn Clock>,
    signatures: &crate::config::SignatureConfig,
    shared: Option<Arc<dyn SharedNonces>>,
) -> SharedAuthenticator {
    let skew_ms = signatures.skew_s.saturating_mul(1000);
    Arc::new(SignatureAuthenticator {
        verifier: Verifier::new(Arc::new(CatalogKeys(catalog.clone())), clock.clone())
            .with_skew_ms(skew_ms)
            .with_nonce_limits(NonceLimits::for_rate(
                signatures.provisioned_rps,
                signatures.account_rps(),
                skew_ms,
            )),
        keys: catalog,
        ram,
        clock,
        shared,
    })
}

fn view(parts: &Parts) -> RequestView<'_> {
    RequestView::new(&parts.method, &parts.uri, &parts.headers)
}

/// The key a request is signed with, and who it stands for.
type Signer = (Arc<kiln_auth::AccessKey>, Principal);

impl SignatureAuthenticator {
    fn signer(&self, parsed: &ParsedRequest<'_>) -> Result<Signer, FcError> {
        let id = parsed.access_key_id();
        match (id.starts_with(STS_PREFIX), parsed.security_token()) {
            (true, Some(token)) => {
                let session = self.ram.sts.open(token, id, self.clock.now_ms())?;
                let key = Arc::new(kiln_auth::AccessKey {
                    account_id: session.account_id.clone(),
                    access_key_id: id.to_owned(),
                    secret: self.ram.sts.secret(id),
                });
                Ok((key, Principal::Role(Arc::new(session))))
            }
            (true, None) => Err(FcError::from(AuthError::MissingHeader(
                "x-acs-security-token",
            ))),
            // A token with an account key: not a pair this service issued.
            (false, Some(_)) => Err(TokenError::Mismatch(id.chars().take(64).collect()).into()),
            (false, None) => match self.keys.key(id) {
                Some(k) => Ok((k, Principal::Account)),
                None => Err(AuthError::UnknownAccessKey(id.chars().take(128).collect()).into()),
            },
        }
    }
}

impl Authenticate for SignatureAuthenticator {
    fn precheck<'a>(&self, parts: &'a Parts) -> Result<Prechecked<'a>, FcError> {
        let parsed = self.verifier.parse(view(parts))?;
        let (key, principal) = self.signer(&parsed)?;
        Ok(Prechecked {
            parsed,
            key,
            principal,
        })
    }

    fn verify(&self, head: Prechecked<'_>) -> Result<(Caller, BodyCheck), FcError> {
        let (who, body) = self.verifier.check_head(&head.parsed, Some(head.key))?;
        let caller = Caller {
            account_id: who.account_id().clone(),
            access_key_id: who.access_key_id().to_owned(),
            principal: head.principal,
        };
        Ok((caller, body))
    }

    fn replay_check(&self, head: &Prechecked<'_>) -> Option<ReplayCheck> {
        let shared = self.shared.as_ref()?;
        Some(ReplayCheck {
            shared: shared.clone(),
            access_key_id: head.parsed.access_key_id().to_owned(),
            nonce: head.parsed.nonce().to_owned(),
            expires_ms: head
                .parsed
                .date_ms()
                .saturating_add(self.verifier.skew_ms()),
            now_ms: self.clock.now_ms(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shared nonce record that answers `answer` to every claim.
    struct Answers(Result<bool, String>);

    impl SharedNonces for Answers {
        fn claim(&self, _: &str, _: &str, _: u64, _: u64) -> BoxFuture<Result<bool, String>> {
            let answer = self.0.clone();
            Box::pin(async move { answer })
        }
    }

    fn check(answer: Result<bool, String>) -> ReplayCheck {
        ReplayCheck {
            shared: Arc::new(Answers(answer)),
            access_key_id: "AK1".into(),
            nonce: "n-1".into(),
            expires_ms: 10_000,
            now_ms: 1_000,
        }
    }

    /// A new nonce passes, a replay is FC's SignatureNonceUsed, and a
    /// record that cannot be reached refuses the call as retryable
    /// (503): the check is never skipped.
    #[tokio::test]
    async fn the_shared_check_fails_closed() {
        assert!(check(Ok(true)).run().await.is_ok());
        let replay = check(Ok(false)).run().await.unwrap_err();
        assert_eq!(replay.code, kiln_core::FcErrorCode::SignatureNonceUsed);
        let down = check(Err("connection refused".into()))
            .run()
            .await
            .unwrap_err();
        assert_eq!(down.code, kiln_core::FcErrorCode::ServiceUnavailable);
        assert_eq!(down.code.http_status(), 503);
    }
}
