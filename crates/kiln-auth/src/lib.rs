//! ACS3-HMAC-SHA256, the request signature of FC 3.0's API.
//!
//! The canonical request is built exactly as the official SDKs build it
//! (`alibabacloud_tea_openapi.utils.get_authorization` in Python,
//! `OpenApiUtil.getAuthorization` in `@alicloud/openapi-core`):
//!
//! ```text
//! METHOD \n
//! PATH (as sent, already percent-encoded) \n
//! sorted query: key=RFC3986(value) joined by & \n
//! for each signed header (sorted, lower-case): name:trimmed values sorted and joined by , \n
//! \n
//! signed header names joined by ; \n
//! hex(sha256(body))            (the x-acs-content-sha256 header)
//! ```
//!
//! The string to sign is `ACS3-HMAC-SHA256\n` + hex(sha256(canonical request)),
//! the signature hex(HMAC-SHA256(secret, string to sign)), and the header
//! `Authorization: ACS3-HMAC-SHA256 Credential=<id>,SignedHeaders=<a;b>,Signature=<hex>`.
//! The Python SDK signs every header it sets, the Node SDK only `host`,
//! `content-type` and `x-acs-*`; the verifier follows whatever list the
//! request names, after checking that the headers that matter are on it.
#![forbid(unsafe_code)]

mod canonical;
pub mod date;
pub mod nonce;
pub mod sign;
pub mod verify;

pub use nonce::{NonceCache, NonceLimits};
pub use sign::{new_nonce, sign, sign_request, SignError, SigningParams};
pub use verify::{
    AccessKey, AuthError, Authenticated, BodyCheck, InMemoryKeys, KeyLookup, ParsedRequest,
    RequestView, Verifier,
};

/// The only algorithm Kiln accepts (the SDKs' default).
pub const ALGORITHM: &str = "ACS3-HMAC-SHA256";
/// FC 3.0's API version, sent as `x-acs-version`.
pub const API_VERSION: &str = "2023-03-30";
