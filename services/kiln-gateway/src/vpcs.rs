//! Which accounts may bind functions to which VPC (`[[vpcs]]`).
//!
//! A VPC is a network the operator runs; the agents attach instances to it
//! (their `[sandbox.network]` names its vSwitches and security groups, and
//! the same owners). The gateway refuses a function's `vpcConfig` and a
//! CreateVpcBinding for a VPC the caller's account does not own, with FC's
//! `AccessDenied` (HTTP 403): the request is well formed, the caller lacks
//! the right to the resource it names. The answer is the same for a VPC
//! that does not exist, so that a tenant cannot probe which VPCs others
//! have. An agent checks again when it places an instance (a scheduler or
//! gateway that is wrong or forged gets no further).

use std::collections::HashMap;

use kiln_core::{AccountId, FcError, FcErrorCode};
use serde::{Deserialize, Serialize};

/// `[[vpcs]]`: one VPC and the accounts that may attach functions to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VpcOwners {
    pub id: String,
    pub owners: Vec<AccountId>,
}

/// Every VPC's owners, by VPC id.
#[derive(Debug, Clone, Default)]
pub struct VpcRegistry {
    owners: HashMap<String, Vec<AccountId>>,
}

/// Why `[[vpcs]]` cannot be used.
pub fn validate(vpcs: &[VpcOwners]) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for v in vpcs {
        crate::validate::check_network_id("vpcs.id", "vpc-", &v.id).map_err(|e| e.message)?;
        if !seen.insert(v.id.as_str()) {
            return Err(format!("vpcs: {} appears twice", v.id));
        }
        if v.owners.is_empty() {
            return Err(format!(
                "vpcs: {} names no owners (leave out a VPC no account may use)",
                v.id
            ));
        }
    }
    Ok(())
}

impl VpcRegistry {
    pub fn from_config(vpcs: &[VpcOwners]) -> Self {
        Self {
            owners: vpcs
                .iter()
                .map(|v| (v.id.clone(), v.owners.clone()))
                .collect(),
        }
    }

    /// May `account` attach functions to `vpc_id`?
    pub fn check(&self, account: &AccountId, vpc_id: &str) -> Result<(), FcError> {
        if self.owners.get(vpc_id).is_some_and(|o| o.contains(account)) {
            return Ok(());
        }
        Err(FcError::new(
            FcErrorCode::AccessDenied,
            format!(
                "account {account} may not attach functions to VPC {vpc_id}: it is not one of \
                 the VPC's owners (ask the operator to add it to that VPC's owners in the \
                 gateway's and agents' configuration)"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_owners_pass_and_unknown_vpcs_look_the_same() {
        let a: AccountId = "100".parse().unwrap();
        let b: AccountId = "200".parse().unwrap();
        let vpcs = vec![VpcOwners {
            id: "vpc-a".into(),
            owners: vec![a.clone()],
        }];
        validate(&vpcs).unwrap();
        let r = VpcRegistry::from_config(&vpcs);
        r.check(&a, "vpc-a").unwrap();
        let not_owner = r.check(&b, "vpc-a").unwrap_err();
        assert_eq!(not_owner.code, FcErrorCode::AccessDenied);
        assert_eq!(not_owner.code.http_status(), 403);
        let unknown = r.check(&b, "vpc-zz").unwrap_err();
        assert_eq!(
            unknown.message.replace("vpc-zz", "X"),
            not_owner.message.replace("vpc-a", "X")
        );
    }

    #[test]
    fn bad_registries_are_refused() {
        let v = |id: &str, owners: &[&str]| VpcOwners {
            id: id.into(),
            owners: owners.iter().map(|o| o.parse().unwrap()).collect(),
        };
        assert!(validate(&[v("vpc-a", &[])]).is_err());
        assert!(validate(&[v("a", &["1"])]).is_err());
        assert!(validate(&[v("vpc-a", &["1"]), v("vpc-a", &["2"])]).is_err());
    }
}
