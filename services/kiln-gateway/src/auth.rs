//! Request authentication with kiln-auth's ACS3-HMAC-SHA256 [`Verifier`],
//! keys looked up in the catalog's in-memory view.
//!
//! Two steps, so an unsigned or stale request is turned away before its
//! body is read: [`Authenticate::precheck`] on the head, then
//! [`Authenticate::verify`] with the body the signature covers (which also
//! consumes the nonce).

use std::sync::Arc;

use http::request::Parts;
use kiln_auth::{AuthError, KeyLookup, RequestView, Verifier};
use kiln_core::{AccountId, Clock, FcError};

use crate::catalog::Catalog;

/// The verified signer of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub account_id: AccountId,
    pub access_key_id: String,
}

pub trait Authenticate: Send + Sync + 'static {
    /// Headers present and well-formed, date in the window, key known.
    fn precheck(&self, parts: &Parts) -> Result<(), FcError>;
    /// The full check: signature over head and body, nonce not replayed.
    fn verify(&self, parts: &Parts, body: &[u8]) -> Result<Caller, FcError>;
}

pub type SharedAuthenticator = Arc<dyn Authenticate>;

/// Keys for the verifier, from the catalog (memory only).
struct CatalogKeys(Arc<Catalog>);

impl KeyLookup for CatalogKeys {
    fn lookup(&self, access_key_id: &str) -> Option<Arc<kiln_auth::AccessKey>> {
        self.0.key(access_key_id)
    }
}

/// ACS3-HMAC-SHA256 against the store's keys.
pub struct SignatureAuthenticator {
    verifier: Verifier,
    keys: Arc<Catalog>,
}

pub fn signature_authenticator(
    catalog: Arc<Catalog>,
    clock: Arc<dyn Clock>,
) -> SharedAuthenticator {
    Arc::new(SignatureAuthenticator {
        verifier: Verifier::new(Arc::new(CatalogKeys(catalog.clone())), clock),
        keys: catalog,
    })
}

fn view(parts: &Parts) -> RequestView<'_> {
    RequestView::new(&parts.method, &parts.uri, &parts.headers)
}

impl Authenticate for SignatureAuthenticator {
    fn precheck(&self, parts: &Parts) -> Result<(), FcError> {
        let parsed = self.verifier.parse(view(parts))?;
        let id = parsed.access_key_id();
        if self.keys.key(id).is_none() {
            return Err(AuthError::UnknownAccessKey(id.chars().take(128).collect()).into());
        }
        Ok(())
    }

    fn verify(&self, parts: &Parts, body: &[u8]) -> Result<Caller, FcError> {
        let who = self.verifier.verify(view(parts), body)?;
        Ok(Caller {
            account_id: who.account_id().clone(),
            access_key_id: who.access_key_id().to_owned(),
        })
    }
}
