//! Request authentication with kiln-auth's ACS3-HMAC-SHA256 [`Verifier`],
//! keys looked up in the catalog's in-memory view, and temporary (STS)
//! credentials opened with the gateway's STS key ([`crate::ram::sts`]).
//!
//! Two steps, so an unsigned or stale request is turned away before its
//! body is read: [`Authenticate::precheck`] on the head, which parses the
//! signature fields and resolves the signer once, then
//! [`Authenticate::verify`] with that [`Prechecked`] and the body the
//! signature covers (which also consumes the nonce).

use std::sync::Arc;

use http::request::Parts;
use kiln_auth::{AuthError, KeyLookup, ParsedRequest, RequestView, Verifier};
use kiln_core::{AccountId, Clock, FcError};
use sha2::{Digest, Sha256};

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
    /// The full check: signature over head and body, nonce not replayed.
    fn verify(&self, head: Prechecked<'_>, body: &[u8]) -> Result<Caller, FcError>;
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
}

pub fn signature_authenticator(
    catalog: Arc<Catalog>,
    ram: Arc<Ram>,
    clock: Arc<dyn Clock>,
) -> SharedAuthenticator {
    Arc::new(SignatureAuthenticator {
        verifier: Verifier::new(Arc::new(CatalogKeys(catalog.clone())), clock.clone()),
        keys: catalog,
        ram,
        clock,
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

    fn verify(&self, head: Prechecked<'_>, body: &[u8]) -> Result<Caller, FcError> {
        let who =
            self.verifier
                .check(&head.parsed, Some(head.key), &Sha256::digest(body).into())?;
        Ok(Caller {
            account_id: who.account_id().clone(),
            access_key_id: who.access_key_id().to_owned(),
            principal: head.principal,
        })
    }
}
