//! Records as stored rows, the same for every backend: ids and states as
//! text, capacities, labels, limits and configs as JSON text, times as
//! signed milliseconds, function environments sealed ([`sealed_env`]).
//! A backend only moves these rows in and out of its tables.

use kiln_core::AccountId;
use kiln_internal_api::AccountLimits;
use kiln_store::seal::Sealer;

use super::{corrupt, SchedulerStoreError};
use crate::placement::{InstanceRecord, NodeRecord, ProvisionRecord};
use crate::sealed_env::{self, instance_aad, provision_aad};

/// A `nodes` row.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct NodeRow {
    pub node_id: String,
    pub agent_url: String,
    pub capacity: String,
    pub labels: String,
    pub bound_account: Option<String>,
    pub state: String,
    pub last_heartbeat_ms: i64,
    pub registered_at_ms: i64,
    pub reprovision: bool,
}

impl NodeRow {
    pub fn encode(n: &NodeRecord) -> Self {
        Self {
            node_id: n.node_id.as_str().to_owned(),
            agent_url: n.agent_url.clone(),
            capacity: serde_json::to_string(&n.capacity).expect("serialises"),
            labels: serde_json::to_string(&n.labels).expect("serialises"),
            bound_account: n.bound_account.as_ref().map(|a| a.as_str().to_owned()),
            state: n.state.as_str().to_owned(),
            last_heartbeat_ms: n.last_heartbeat_ms as i64,
            registered_at_ms: n.registered_at_ms as i64,
            reprovision: n.reprovision,
        }
    }

    pub fn decode(self) -> Result<NodeRecord, SchedulerStoreError> {
        let e = |r: String| corrupt("node", &self.node_id, r);
        Ok(NodeRecord {
            node_id: self.node_id.parse().map_err(|x| e(format!("{x}")))?,
            agent_url: self.agent_url.clone(),
            capacity: serde_json::from_str(&self.capacity).map_err(|x| e(x.to_string()))?,
            labels: serde_json::from_str(&self.labels).map_err(|x| e(x.to_string()))?,
            bound_account: self
                .bound_account
                .as_deref()
                .map(str::parse)
                .transpose()
                .map_err(|x| e(format!("{x}")))?,
            state: self.state.parse().map_err(e)?,
            last_heartbeat_ms: self.last_heartbeat_ms.max(0) as u64,
            registered_at_ms: self.registered_at_ms.max(0) as u64,
            reprovision: self.reprovision,
        })
    }
}

/// An `instances` row.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct InstanceRow {
    pub instance_id: String,
    pub node_id: String,
    /// The spec's JSON without its environment.
    pub spec: String,
    pub state: String,
    pub created_at_ms: i64,
    pub provisioned: bool,
    pub env_sealed: Option<String>,
}

impl InstanceRow {
    pub fn encode(sealer: &Sealer, i: &InstanceRecord) -> Self {
        let (spec, env_sealed) =
            sealed_env::split(sealer, &instance_aad(i.instance_id.as_str()), &i.spec);
        Self {
            instance_id: i.instance_id.as_str().to_owned(),
            node_id: i.node_id.as_str().to_owned(),
            spec,
            state: i.state.as_str().to_owned(),
            created_at_ms: i.created_at_ms as i64,
            provisioned: i.provisioned,
            env_sealed,
        }
    }

    pub fn decode(self, sealer: &Sealer) -> Result<InstanceRecord, SchedulerStoreError> {
        let e = |r: String| corrupt("instance", &self.instance_id, r);
        let spec = sealed_env::join(
            sealer,
            &instance_aad(&self.instance_id),
            &self.spec,
            self.env_sealed.as_deref(),
        )
        .map_err(e)?;
        Ok(InstanceRecord {
            instance_id: self.instance_id.parse().map_err(|x| e(format!("{x}")))?,
            node_id: self.node_id.parse().map_err(|x| e(format!("{x}")))?,
            spec,
            state: self.state.parse().map_err(e)?,
            created_at_ms: self.created_at_ms.max(0) as u64,
            provisioned: self.provisioned,
        })
    }
}

/// A `provisions` row.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ProvisionRow {
    pub account_id: String,
    pub function_name: String,
    pub qualifier: String,
    /// `None` while the provision is paused.
    pub spec: Option<String>,
    pub config: String,
    pub env_sealed: Option<String>,
}

impl ProvisionRow {
    pub fn encode(sealer: &Sealer, p: &ProvisionRecord) -> Self {
        let aad = provision_aad(
            p.account_id.as_str(),
            p.function_name.as_str(),
            &p.qualifier,
        );
        let (spec, env_sealed) = match &p.spec {
            Some(s) => {
                let (spec, env) = sealed_env::split(sealer, &aad, s);
                (Some(spec), env)
            }
            None => (None, None),
        };
        Self {
            account_id: p.account_id.as_str().to_owned(),
            function_name: p.function_name.as_str().to_owned(),
            qualifier: p.qualifier.clone(),
            spec,
            config: serde_json::to_string(&p.config).expect("serialises"),
            env_sealed,
        }
    }

    pub fn decode(self, sealer: &Sealer) -> Result<ProvisionRecord, SchedulerStoreError> {
        let (a, f) = (&self.account_id, &self.function_name);
        let q = &self.qualifier;
        let e = |r: String| corrupt("provision", &format!("{a}/{f} ({q})"), r);
        let aad = provision_aad(a, f, q);
        Ok(ProvisionRecord {
            account_id: a.parse().map_err(|x| e(format!("{x}")))?,
            function_name: f.parse().map_err(|x| e(format!("{x}")))?,
            qualifier: q.clone(),
            spec: self
                .spec
                .as_deref()
                .map(|s| sealed_env::join(sealer, &aad, s, self.env_sealed.as_deref()))
                .transpose()
                .map_err(e)?,
            config: serde_json::from_str(&self.config).map_err(|x| e(x.to_string()))?,
        })
    }
}

pub(super) fn encode_limits(limits: &AccountLimits) -> String {
    serde_json::to_string(limits).expect("serialises")
}

pub(super) fn decode_limits(
    account: String,
    limits: String,
) -> Result<(AccountId, AccountLimits), SchedulerStoreError> {
    let e = |r: String| corrupt("account limits", &account, r);
    Ok((
        account.parse().map_err(|x| e(format!("{x}")))?,
        serde_json::from_str(&limits).map_err(|x| e(x.to_string()))?,
    ))
}

/// A `bootstrap_tokens` row.
pub(super) fn decode_token(
    (token_sha256, node, created, expires, used): (String, String, i64, i64, Option<i64>),
) -> Result<super::StoredToken, SchedulerStoreError> {
    Ok(super::StoredToken {
        node_id: decode_node_id("bootstrap token", &node)?,
        token_sha256,
        created_at_ms: created.max(0) as u64,
        expires_at_ms: expires.max(0) as u64,
        used_at_ms: used.map(|u| u.max(0) as u64),
    })
}

/// A stored node id (revocations, holders, tokens).
pub(super) fn decode_node_id(
    what: &'static str,
    id: &str,
) -> Result<kiln_core::NodeId, SchedulerStoreError> {
    id.parse().map_err(|x| corrupt(what, id, format!("{x}")))
}

/// A stored SHA-256 in hex.
pub(super) fn decode_sha256(
    what: &'static str,
    id: &str,
    hex: &str,
) -> Result<[u8; 32], SchedulerStoreError> {
    hex::decode(hex)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| corrupt(what, id, "not a SHA-256 in hex"))
}
