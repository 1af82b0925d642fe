//! The gateway's operator API for access keys (internal mTLS listener):
//! create, list, disable, enable and delete. A key's secret leaves the
//! gateway once, in the answer to its creation.

use kiln_core::AccountId;
use serde::{Deserialize, Serialize};

/// Paths of the key API.
pub mod paths {
    /// GET an [`super::AccessKeyList`]; POST a [`super::CreateAccessKey`],
    /// answers a [`super::CreatedAccessKey`].
    pub const ACCESS_KEYS: &str = "/v1/keys";
    /// DELETE: the key is gone (204).
    pub fn access_key(id: &str) -> String {
        format!("/v1/keys/{id}")
    }
    /// POST (no body): answers the key's [`super::AccessKeyInfo`].
    pub fn disable(id: &str) -> String {
        format!("/v1/keys/{id}/disable")
    }
    pub fn enable(id: &str) -> String {
        format!("/v1/keys/{id}/enable")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateAccessKey {
    pub account_id: AccountId,
}

/// Whether a key may sign requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessKeyStatus {
    Enabled,
    Disabled,
}

impl std::fmt::Display for AccessKeyStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Enabled => "enabled",
            Self::Disabled => "disabled",
        })
    }
}

/// A key as listed: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessKeyInfo {
    pub access_key_id: String,
    pub account_id: AccountId,
    pub status: AccessKeyStatus,
    pub created_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessKeyList {
    pub access_keys: Vec<AccessKeyInfo>,
}

/// The answer to a creation: the only time the secret is shown.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreatedAccessKey {
    pub access_key_id: String,
    pub account_id: AccountId,
    pub access_key_secret: String,
    pub created_ms: u64,
}

impl std::fmt::Debug for CreatedAccessKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedAccessKey")
            .field("access_key_id", &self.access_key_id)
            .field("account_id", &self.account_id)
            .field("access_key_secret", &"<redacted>")
            .field("created_ms", &self.created_ms)
            .finish()
    }
}
