//! Per-account resource bounds (`[tenant_bounds]`): how many functions,
//! how many bytes of code, how many layer versions an account may store,
//! and how many async messages it may have waiting. One tenant filling any
//! of them changes nothing for the others.
//!
//! The stored bounds are checked under the catalog's write lock, so two
//! concurrent creates cannot both pass the last free slot; in a cluster
//! the write is checked again ([`Bound`]) inside its own transaction under
//! a per-account lock in the shared database, against every gateway's
//! rows. The queue depth is checked by the queue's writer inside the
//! enqueue's transaction.
//! A request over a stored bound is refused with FC's `LimitExceeded`
//! (HTTP 400, not retryable: free something or have the bound raised); a
//! full async queue with `ResourceThrottled` (HTTP 429, retryable: the
//! queue drains). Nothing already stored or accepted is ever dropped.

use std::collections::HashMap;

use kiln_core::{AccountId, FcError, FcErrorCode};
use serde::{Deserialize, Serialize};

/// `[tenant_bounds]`: the defaults of every account, and overrides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantBoundsConfig {
    /// Functions per account.
    pub max_functions: u64,
    /// Bytes of code packages per account: the zips of its functions, of
    /// their published versions (a package a version shares with its
    /// function's LATEST counts once) and of its layer versions.
    pub max_code_bytes: u64,
    /// Layer versions per account (each holds a zip).
    pub max_layer_versions: u64,
    /// Async messages not yet finished (waiting, running or retrying) per
    /// account; an async invoke beyond it is refused with
    /// `ResourceThrottled`.
    pub max_async_queue_depth: u64,
    /// Per-account overrides (`[[tenant_bounds.accounts]]`); a bound an
    /// override leaves out keeps its default.
    pub accounts: Vec<AccountBounds>,
}

/// Default bounds, in the range of FC's default quotas: a few hundred
/// functions and layers, tens of GB of code, and an async backlog deep
/// enough for bursts yet bounded on disk (100,000 messages of at most
/// 128 KiB each).
impl Default for TenantBoundsConfig {
    fn default() -> Self {
        Self {
            max_functions: 500,
            max_code_bytes: 50 * 1024 * 1024 * 1024,
            max_layer_versions: 500,
            max_async_queue_depth: 100_000,
            accounts: Vec::new(),
        }
    }
}

/// `[[tenant_bounds.accounts]]`: one account's own bounds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountBounds {
    pub account_id: AccountId,
    #[serde(default)]
    pub max_functions: Option<u64>,
    #[serde(default)]
    pub max_code_bytes: Option<u64>,
    #[serde(default)]
    pub max_layer_versions: Option<u64>,
    #[serde(default)]
    pub max_async_queue_depth: Option<u64>,
}

impl TenantBoundsConfig {
    pub fn validate(&self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for a in &self.accounts {
            if !seen.insert(&a.account_id) {
                return Err(format!(
                    "tenant_bounds.accounts: account {} appears twice",
                    a.account_id
                ));
            }
        }
        let all = std::iter::once(self.limits_default()).chain(
            self.accounts
                .iter()
                .map(|a| self.limits_default().overridden(a)),
        );
        for l in all {
            if l.async_queue_depth == 0 {
                return Err(
                    "tenant_bounds: max_async_queue_depth must be at least 1 (an account \
                     that may not invoke asynchronously needs a RAM policy, not a bound)"
                        .into(),
                );
            }
        }
        Ok(())
    }

    fn limits_default(&self) -> Limits {
        Limits {
            functions: self.max_functions,
            code_bytes: self.max_code_bytes,
            layer_versions: self.max_layer_versions,
            async_queue_depth: self.max_async_queue_depth,
        }
    }
}

/// One account's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub functions: u64,
    pub code_bytes: u64,
    pub layer_versions: u64,
    pub async_queue_depth: u64,
}

impl Limits {
    fn overridden(self, a: &AccountBounds) -> Self {
        Self {
            functions: a.max_functions.unwrap_or(self.functions),
            code_bytes: a.max_code_bytes.unwrap_or(self.code_bytes),
            layer_versions: a.max_layer_versions.unwrap_or(self.layer_versions),
            async_queue_depth: a.max_async_queue_depth.unwrap_or(self.async_queue_depth),
        }
    }
}

/// The configured bounds, resolved per account.
#[derive(Debug, Clone)]
pub struct Bounds {
    default: Limits,
    accounts: HashMap<AccountId, Limits>,
}

impl Default for Bounds {
    fn default() -> Self {
        Self::from_config(&TenantBoundsConfig::default())
    }
}

impl Bounds {
    pub fn from_config(c: &TenantBoundsConfig) -> Self {
        let default = c.limits_default();
        Self {
            default,
            accounts: c
                .accounts
                .iter()
                .map(|a| (a.account_id.clone(), default.overridden(a)))
                .collect(),
        }
    }

    pub fn of(&self, account: &AccountId) -> Limits {
        self.accounts.get(account).copied().unwrap_or(self.default)
    }
}

/// What an account stores now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub functions: u64,
    pub code_bytes: u64,
    pub layer_versions: u64,
}

fn exceeded(message: String) -> FcError {
    FcError::new(FcErrorCode::LimitExceeded, message)
}

/// A change that adds `functions` functions, `layer_versions` layer
/// versions and replaces `freed` bytes of code by `added` bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Change {
    pub functions: u64,
    pub layer_versions: u64,
    pub added_bytes: u64,
    pub freed_bytes: u64,
}

/// A change and the limits it must stay within, handed to a store that
/// several gateways share: it checks them against the database, under a
/// per-account lock, in the write's own transaction (each gateway's view
/// may lag another's writes by a few milliseconds).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub limits: Limits,
    pub change: Change,
}

/// Refuse `change` if it takes `account` over a bound. A change that adds
/// nothing of a kind is never refused for that kind (an account above a
/// lowered bound may still update and delete).
pub fn check(
    account: &AccountId,
    limits: Limits,
    usage: Usage,
    change: Change,
) -> Result<(), FcError> {
    if change.functions > 0 && usage.functions + change.functions > limits.functions {
        return Err(exceeded(format!(
            "account {account} has {} functions, its limit is {}: delete a function or ask \
             the operator to raise tenant_bounds.max_functions",
            usage.functions, limits.functions
        )));
    }
    if change.layer_versions > 0
        && usage.layer_versions + change.layer_versions > limits.layer_versions
    {
        return Err(exceeded(format!(
            "account {account} has {} layer versions, its limit is {}: delete a layer version \
             or ask the operator to raise tenant_bounds.max_layer_versions",
            usage.layer_versions, limits.layer_versions
        )));
    }
    if change.added_bytes > change.freed_bytes {
        let after =
            usage.code_bytes - change.freed_bytes.min(usage.code_bytes) + change.added_bytes;
        if after > limits.code_bytes {
            return Err(exceeded(format!(
                "account {account} stores {} bytes of code; this package of {} bytes would \
                 take it over its limit of {} bytes: delete functions or layer versions or ask \
                 the operator to raise tenant_bounds.max_code_bytes",
                usage.code_bytes, change.added_bytes, limits.code_bytes
            )));
        }
    }
    Ok(())
}

/// The answer to an async invoke into a full queue.
pub fn queue_full(account: &str, depth: u64, limit: u64) -> FcError {
    FcError::throttled(format!(
        "account {account} has {depth} async invocations waiting, its limit is {limit}: \
         retry later, when some have run"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acct(s: &str) -> AccountId {
        s.parse().unwrap()
    }

    #[test]
    fn overrides_replace_only_what_they_name() {
        let c: TenantBoundsConfig = toml::from_str(
            "max_functions = 10\n[[accounts]]\naccount_id = \"200\"\nmax_functions = 2\n",
        )
        .unwrap();
        c.validate().unwrap();
        let b = Bounds::from_config(&c);
        assert_eq!(b.of(&acct("100")).functions, 10);
        assert_eq!(b.of(&acct("200")).functions, 2);
        assert_eq!(
            b.of(&acct("200")).async_queue_depth,
            TenantBoundsConfig::default().max_async_queue_depth
        );
    }

    #[test]
    fn bad_configs_are_refused() {
        let twice = "[[accounts]]\naccount_id = \"1\"\n[[accounts]]\naccount_id = \"1\"\n";
        let c: TenantBoundsConfig = toml::from_str(twice).unwrap();
        assert!(c.validate().unwrap_err().contains("twice"));
        let c: TenantBoundsConfig = toml::from_str("max_async_queue_depth = 0\n").unwrap();
        assert!(c.validate().is_err());
        assert!(toml::from_str::<TenantBoundsConfig>("max_functionz = 1\n").is_err());
    }

    #[test]
    fn each_bound_is_refused_with_limit_exceeded() {
        let l = Limits {
            functions: 2,
            code_bytes: 100,
            layer_versions: 1,
            async_queue_depth: 5,
        };
        let a = acct("100");
        let full = Usage {
            functions: 2,
            code_bytes: 90,
            layer_versions: 1,
        };
        let one_fn = Change {
            functions: 1,
            ..Default::default()
        };
        let e = check(&a, l, full, one_fn).unwrap_err();
        assert_eq!(e.code, FcErrorCode::LimitExceeded);
        assert!(e.message.contains("max_functions"), "{}", e.message);
        let one_layer = Change {
            layer_versions: 1,
            ..Default::default()
        };
        assert!(check(&a, l, full, one_layer)
            .unwrap_err()
            .message
            .contains("max_layer_versions"));
        let bytes = Change {
            added_bytes: 11,
            ..Default::default()
        };
        assert!(check(&a, l, full, bytes)
            .unwrap_err()
            .message
            .contains("max_code_bytes"));
        // Exactly at the bound is allowed; a replacement frees its old size.
        let fits = Change {
            added_bytes: 10,
            ..Default::default()
        };
        check(&a, l, full, fits).unwrap();
        let replace = Change {
            added_bytes: 50,
            freed_bytes: 40,
            ..Default::default()
        };
        check(&a, l, full, replace).unwrap();
        // Above a lowered bound, a change that adds nothing still passes.
        let over = Usage {
            functions: 9,
            code_bytes: 900,
            layer_versions: 9,
        };
        let shrink = Change {
            added_bytes: 10,
            freed_bytes: 20,
            ..Default::default()
        };
        check(&a, l, over, shrink).unwrap();
        assert_eq!(queue_full("100", 5, 5).code, FcErrorCode::ResourceThrottled);
    }
}
