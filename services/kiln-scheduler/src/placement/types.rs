//! The placement core's records and lifecycle states.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use kiln_core::{
    AccountId, FcError, FunctionName, InstanceId, InstanceSpec, LeaseId, NodeId, SandboxKind,
};
use kiln_internal_api::{AccountLimits, NodeCapacity, NodeLabels, ProvisionConfig, Tenancy};
use serde::{Deserialize, Serialize};

/// A node's lifecycle.
///
/// ```text
/// Ready <-> Cordoned -> Draining -> (empty, or out of validity) Retired
///   ^----------uncordon--------'
/// any alive state -- silent --> Failed -- registers again --> Ready
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeState {
    /// Heartbeating; takes new instances.
    Ready,
    /// Takes no new instances; its instances keep serving.
    Cordoned,
    /// Takes no new instances and its instances take no new calls: each
    /// goes once its calls end.
    Draining,
    /// Silent for too long: its instances were written off; it must register
    /// again.
    Failed,
    /// Reached its maximum validity: the agent is told to re-provision and
    /// come back as a new node. Its id is never used again.
    Retired,
}

impl NodeState {
    pub const ALL: [Self; 5] = [
        Self::Ready,
        Self::Cordoned,
        Self::Draining,
        Self::Failed,
        Self::Retired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Cordoned => "cordoned",
            Self::Draining => "draining",
            Self::Failed => "failed",
            Self::Retired => "retired",
        }
    }

    pub fn can_place(self) -> bool {
        self == Self::Ready
    }

    /// Heartbeating, whether or not it takes new instances.
    pub fn is_alive(self) -> bool {
        matches!(self, Self::Ready | Self::Cordoned | Self::Draining)
    }
}

/// An instance's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    /// The agent is starting it; calls placed on it wait.
    Starting,
    /// Serving calls.
    Ready,
    /// Retired (the function changed or was deleted): no new calls,
    /// destroyed once idle.
    Draining,
    /// Broken: no new calls, destroyed once its in-flight calls end.
    Failed,
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Draining => "draining",
            Self::Failed => "failed",
        }
    }

    /// Whether new calls may be placed on it.
    pub fn takes_calls(self) -> bool {
        matches!(self, Self::Starting | Self::Ready)
    }

    /// Whether it is destroyed as soon as nothing runs on it.
    pub fn is_winding_down(self) -> bool {
        matches!(self, Self::Draining | Self::Failed)
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for InstanceState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [Self::Starting, Self::Ready, Self::Draining, Self::Failed]
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown instance state {s:?}"))
    }
}

impl FromStr for NodeState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown node state {s:?}"))
    }
}

/// The sandbox kind an instance needs on a node of this tenancy: a
/// multi-tenant node never runs a container.
pub fn sandbox_kind_for(tenancy: Tenancy) -> SandboxKind {
    match tenancy {
        Tenancy::MultiTenant => SandboxKind::Microvm,
        Tenancy::Dedicated => SandboxKind::Container,
    }
}

/// A compute node as the scheduler tracks it.
#[derive(Debug, Clone)]
pub struct Node {
    pub id: NodeId,
    pub agent_url: String,
    pub capacity: NodeCapacity,
    pub labels: NodeLabels,
    /// The one account a dedicated node serves: from its labels, or the
    /// first account placed on it.
    pub bound_account: Option<AccountId>,
    pub state: NodeState,
    pub last_heartbeat_ms: u64,
    /// When the node first registered under its id: its validity runs
    /// from here.
    pub registered_at_ms: u64,
    /// Draining because its validity runs out: retired once empty.
    pub reprovision: bool,
    pub used_memory_mb: u64,
    pub used_cpu_milli: u64,
    pub instances: HashSet<InstanceId>,
}

impl Node {
    pub fn free_memory_mb(&self) -> u64 {
        self.capacity.memory_mb.saturating_sub(self.used_memory_mb)
    }

    pub fn free_cpu_milli(&self) -> u64 {
        self.capacity.cpu_milli.saturating_sub(self.used_cpu_milli)
    }

    pub fn has_instance_slot(&self) -> bool {
        self.instances.len() < self.capacity.max_instances as usize
    }

    /// Whether instances of `account` may run here at all (tenancy and
    /// sandbox kind), regardless of room.
    pub fn accepts(&self, account: &AccountId) -> bool {
        let kind = sandbox_kind_for(self.labels.tenancy);
        if !self.labels.sandbox_kinds.contains(&kind) {
            return false;
        }
        match self.labels.tenancy {
            Tenancy::MultiTenant => true,
            Tenancy::Dedicated => self.bound_account.as_ref().is_none_or(|a| a == account),
        }
    }

    /// Whether an instance of `spec` may run here at all: its account
    /// (see [`Node::accepts`]), its runtime, which the node must offer,
    /// and its network configuration, which the node must enforce.
    pub fn accepts_spec(&self, spec: &InstanceSpec) -> bool {
        self.accepts(&spec.account_id)
            && self.labels.offers(spec.runtime)
            && self.enforces_network(spec)
    }

    /// Whether the node can enforce the spec's egress mode and VPC.
    pub fn enforces_network(&self, spec: &InstanceSpec) -> bool {
        self.labels
            .network_isolation
            .refusal(spec.network.as_ref())
            .is_none()
    }

    pub fn record(&self) -> NodeRecord {
        NodeRecord {
            node_id: self.id.clone(),
            agent_url: self.agent_url.clone(),
            capacity: self.capacity.clone(),
            labels: self.labels.clone(),
            bound_account: self.bound_account.clone(),
            state: self.state,
            last_heartbeat_ms: self.last_heartbeat_ms,
            registered_at_ms: self.registered_at_ms,
            reprovision: self.reprovision,
        }
    }
}

/// One sandbox running one revision of one function.
#[derive(Debug, Clone)]
pub struct Instance {
    pub id: InstanceId,
    pub node_id: NodeId,
    pub spec: Arc<InstanceSpec>,
    pub state: InstanceState,
    pub in_flight: u32,
    pub created_at_ms: u64,
    pub last_used_ms: u64,
    /// When the agent reported it started; `None` while starting.
    pub ready_at_ms: Option<u64>,
    pub leases: HashSet<LeaseId>,
    /// The sandbox kind its node's tenancy gave it when it was placed.
    pub sandbox: SandboxKind,
    /// Kept by a provision configuration, not released for idleness.
    pub provisioned: bool,
}

impl Instance {
    pub fn has_room(&self) -> bool {
        self.state.takes_calls() && self.in_flight < self.spec.concurrency
    }

    /// Idle and subject to the idle timeout (provisioned instances never
    /// are).
    pub fn is_idle(&self) -> bool {
        self.state == InstanceState::Ready && self.in_flight == 0 && !self.provisioned
    }

    pub fn record(&self) -> InstanceRecord {
        InstanceRecord {
            instance_id: self.id.clone(),
            node_id: self.node_id.clone(),
            spec: (*self.spec).clone(),
            state: self.state,
            created_at_ms: self.created_at_ms,
            provisioned: self.provisioned,
        }
    }
}

/// A node as persisted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub node_id: NodeId,
    pub agent_url: String,
    pub capacity: NodeCapacity,
    pub labels: NodeLabels,
    pub bound_account: Option<AccountId>,
    pub state: NodeState,
    pub last_heartbeat_ms: u64,
    pub registered_at_ms: u64,
    pub reprovision: bool,
}

/// An instance as persisted. In-flight counts and leases are not: see
/// [`super::Placement::restore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRecord {
    pub instance_id: InstanceId,
    pub node_id: NodeId,
    pub spec: InstanceSpec,
    pub state: InstanceState,
    pub created_at_ms: u64,
    pub provisioned: bool,
}

/// A state change to persist, in the order it happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    UpsertNode(NodeRecord),
    UpsertInstance(InstanceRecord),
    DeleteInstance(InstanceId),
    UpsertAccountLimits(AccountId, AccountLimits),
    DeleteAccountLimits(AccountId),
    UpsertProvision(ProvisionRecord),
    /// Account, function, qualifier.
    DeleteProvision(AccountId, FunctionName, String),
}

/// A provision configuration as persisted.
#[derive(Debug, Clone, PartialEq)]
pub struct ProvisionRecord {
    pub account_id: AccountId,
    pub function_name: FunctionName,
    /// `LATEST` or an alias name.
    pub qualifier: String,
    /// `None` while paused (the function changed since).
    pub spec: Option<InstanceSpec>,
    pub config: ProvisionConfig,
}

/// An instance the agent must destroy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destroy {
    pub instance_id: InstanceId,
    pub node_id: NodeId,
    pub agent_url: String,
}

/// Side effects a core operation asks its caller to carry out.
#[derive(Debug, Default)]
pub struct Effects {
    /// Agent calls: DELETE these instances.
    pub destroy: Vec<Destroy>,
    /// Starting instances that were removed: every call waiting for one of
    /// them fails with the error.
    pub aborted_starts: Vec<(InstanceId, FcError)>,
    /// Agent calls: start these (provisioned) instances; no call waits.
    pub create: Vec<CreateJob>,
}

impl Effects {
    pub fn extend(&mut self, other: Effects) {
        self.destroy.extend(other.destroy);
        self.aborted_starts.extend(other.aborted_starts);
        self.create.extend(other.create);
    }

    pub fn is_empty(&self) -> bool {
        self.destroy.is_empty() && self.aborted_starts.is_empty() && self.create.is_empty()
    }
}

/// What the agent needs to start an instance the core just placed.
#[derive(Debug, Clone)]
pub struct CreateJob {
    pub instance_id: InstanceId,
    pub node_id: NodeId,
    pub agent_url: String,
    pub spec: Arc<InstanceSpec>,
    /// A provisioned instance whose configuration has FC's
    /// `alwaysAllocateCPU`: the agent never freezes it while idle.
    pub always_allocate_cpu: bool,
}
