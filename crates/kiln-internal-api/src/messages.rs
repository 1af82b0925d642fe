//! Control messages of the internal APIs, with their paths.

use std::collections::BTreeMap;

use kiln_core::{
    AccountId, FunctionName, InstanceId, InstanceSpec, LeaseId, NetworkSpec, NodeId, RuntimeName,
    SandboxKind,
};
use serde::{Deserialize, Serialize};

/// Paths, versioned. `{}` parts are filled by the helpers below.
pub mod paths {
    use kiln_core::{InstanceId, LeaseId, NodeId};

    // Scheduler.
    pub const NODES_REGISTER: &str = "/v1/nodes/register";
    pub fn node_heartbeat(node: &NodeId) -> String {
        format!("/v1/nodes/{node}/heartbeat")
    }
    pub const LEASES: &str = "/v1/leases";
    pub fn lease(lease: &LeaseId) -> String {
        format!("/v1/leases/{lease}")
    }
    pub const FUNCTIONS_RETIRE: &str = "/v1/functions/retire";
    /// PUT a `PutProvision`, DELETE a `FunctionRef`, GET the list of
    /// `ProvisionStatus`.
    pub const FUNCTIONS_PROVISION: &str = "/v1/functions/provision";
    pub const SCHEDULER_NODES: &str = "/v1/nodes";
    pub const SCHEDULER_INSTANCES: &str = "/v1/instances";
    /// Admin: POST, answers the node's `NodeInfo`. `action` is `cordon`,
    /// `drain` or `uncordon`.
    pub fn node_action(node: &NodeId, action: &str) -> String {
        format!("/v1/nodes/{node}/{action}")
    }
    /// Admin: GET, PUT (an `AccountLimits`) and DELETE (back to defaults).
    pub fn account_limits(account: &kiln_core::AccountId) -> String {
        format!("/v1/accounts/{account}/limits")
    }
    /// Admin: PUT (a `FunctionLimits`) and DELETE one function's entry of
    /// the account's limits, atomically (the other functions' and the
    /// account's own limits stay as they are).
    pub fn function_limits(
        account: &kiln_core::AccountId,
        function: &kiln_core::FunctionName,
    ) -> String {
        format!("/v1/accounts/{account}/functions/{function}/limits")
    }
    /// GET the account's `ProvisionDetail`s (status and configuration).
    pub fn account_provisions(account: &kiln_core::AccountId) -> String {
        format!("/v1/accounts/{account}/provisions")
    }

    // Agent.
    pub const AGENT_INSTANCES: &str = "/v1/instances";
    pub fn agent_instance(id: &InstanceId) -> String {
        format!("/v1/instances/{id}")
    }
    pub fn agent_invoke(id: &InstanceId) -> String {
        format!("/v1/instances/{id}/invoke")
    }
    /// GET with `Upgrade: websocket`: an HTTP trigger's WebSocket handshake
    /// passed to the instance's runtime; on its `101` the connection
    /// carries the WebSocket's bytes both ways (HTTP/1.1 only).
    pub fn agent_websocket(id: &InstanceId) -> String {
        format!("/v1/instances/{id}/websocket")
    }
    /// GET a function's `LogRecords` kept on the node (query: accountId,
    /// functionName, requestId, since, limit).
    pub const AGENT_LOGS: &str = "/v1/logs";
    /// POST: run a command in the instance; the request body streams the
    /// command's stdin and the answer its output, as `exec_frame`s.
    pub fn agent_exec(id: &InstanceId) -> String {
        format!("/v1/instances/{id}/exec")
    }

    /// Gateway: GET the `PlacedInstance` if `instance` is placed on `node`.
    pub fn placed_instance(node: &NodeId, instance: &InstanceId) -> String {
        format!("/v1/nodes/{node}/instances/{instance}")
    }
    /// Gateway: GET, 204 if `node` holds or creates an instance using the
    /// code package or layer `digest`.
    pub fn placed_code(node: &NodeId, digest: &str) -> String {
        format!("/v1/nodes/{node}/code/{digest}")
    }

    // Gateway (internal listener).
    pub fn code(digest: &str) -> String {
        format!("/v1/code/{digest}")
    }
    /// POST a `CredentialsRequest`, answers `TemporaryCredentials`.
    pub const CREDENTIALS: &str = "/v1/credentials";

    // Every service.
    pub const HEALTH: &str = "/v1/health";
}

/// Headers on the internal invoke path (gateway -> agent and back).
pub mod headers {
    /// Set by the agent on its answer: how the invocation ended (an
    /// [`crate::InvokeOutcome`]).
    pub const INVOKE_OUTCOME: &str = "x-kiln-invoke-outcome";
    /// FC's `x-fc-log-type`, passed by the gateway to the agent explicitly
    /// (the caller's `x-fc-*` headers are not forwarded).
    pub const LOG_TYPE: &str = "x-fc-log-type";
    /// FC's `x-fc-log-result`: the call's log tail, base64.
    pub const LOG_RESULT: &str = "x-fc-log-result";
    /// On a clustered scheduler's calls to agents: its leadership's
    /// fencing token. An agent that has heard of a newer leader refuses
    /// calls carrying an older token.
    pub const LEADER_TOKEN: &str = "x-kiln-leader-token";
}

/// What the scheduler placed as one instance on one node (the answer of
/// `GET /v1/nodes/{node}/instances/{instance}`, asked by the gateway).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacedInstance {
    pub account_id: AccountId,
    pub function_name: FunctionName,
    /// The role ARN of the instance's spec, if its function has one.
    pub role: Option<String>,
}

/// An agent asks the gateway for temporary credentials of the role of an
/// instance's function (`role` is the ARN of the instance's spec; the
/// gateway checks it is still the function's role).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsRequest {
    pub account_id: AccountId,
    pub function_name: FunctionName,
    pub role: String,
    pub instance_id: InstanceId,
}

/// Short-lived credentials for a role (FC's `Credentials` model: STS
/// access key, secret, security token, expiry).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemporaryCredentials {
    pub access_key_id: String,
    pub access_key_secret: String,
    pub security_token: String,
    /// Milliseconds since the epoch.
    pub expiration_ms: u64,
}

impl std::fmt::Debug for TemporaryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TemporaryCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("expiration_ms", &self.expiration_ms)
            .finish_non_exhaustive()
    }
}

/// What a node offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeCapacity {
    pub memory_mb: u64,
    pub cpu_milli: u64,
    pub max_instances: u32,
}

/// Who may run on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tenancy {
    /// Any account, microVM sandboxes only.
    MultiTenant,
    /// One account, container sandboxes.
    Dedicated,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeLabels {
    pub zone: String,
    pub tenancy: Tenancy,
    pub sandbox_kinds: Vec<SandboxKind>,
    /// For a dedicated node: the one account it serves. `None` means the
    /// node is handed to the first account placed on it.
    #[serde(default)]
    pub dedicated_account: Option<AccountId>,
    /// The runtimes the node can start instances of (its root filesystems
    /// or microVM disks are ready). `None` from agents that predate the
    /// field: they are taken to offer every runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtimes: Option<Vec<RuntimeName>>,
    /// The egress isolation the node enforces. Absent from agents that
    /// predate the field: none, so they get no function that asks for
    /// less than the internet.
    #[serde(default)]
    pub network_isolation: NetworkIsolation,
}

/// What a node can enforce of a function's network configuration
/// (`internetAccess`, `vpcConfig`). The default enforces nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkIsolation {
    /// Every instance's traffic is confined to its egress mode by the
    /// node's firewall (`[sandbox.network]`).
    pub enforced: bool,
    /// The VPCs the node attaches instances to.
    #[serde(default)]
    pub vpcs: Vec<String>,
}

impl NetworkIsolation {
    /// Why an instance with `network` cannot be placed on such a node;
    /// `None` when it can. FC's default (internet access, no VPC) runs on
    /// every node: one without isolation exists only when its operator
    /// said so explicitly (`insecure_network_isolation_disabled`).
    pub fn refusal(&self, network: Option<&NetworkSpec>) -> Option<String> {
        let network = network?;
        if network.internet_access && network.vpc.is_none() {
            return None;
        }
        if !self.enforced {
            return Some(format!(
                "the node has no network isolation, so it cannot enforce {}",
                if network.internet_access {
                    "the function's vpcConfig"
                } else {
                    "internetAccess: false"
                }
            ));
        }
        match &network.vpc {
            Some(v) if !self.vpcs.contains(&v.vpc_id) => {
                Some(format!("the node does not serve VPC {}", v.vpc_id))
            }
            _ => None,
        }
    }
}

impl NodeLabels {
    /// Whether the node offers `runtime`.
    pub fn offers(&self, runtime: RuntimeName) -> bool {
        self.runtimes
            .as_ref()
            .is_none_or(|offered| offered.contains(&runtime))
    }
}

/// Agent -> scheduler, at start and whenever the scheduler has forgotten
/// the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterNode {
    /// The id the node had before (a restart keeps it); `None` on first boot.
    pub node_id: Option<NodeId>,
    /// Where the scheduler and the gateway reach the agent, `https://host:port`.
    pub agent_url: String,
    pub capacity: NodeCapacity,
    pub labels: NodeLabels,
    /// The instances the agent runs right now.
    pub instances: Vec<InstanceId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterNodeResponse {
    pub node_id: NodeId,
    pub heartbeat_interval_ms: u64,
    /// Instances the agent runs that the scheduler does not know: destroy.
    pub destroy: Vec<InstanceId>,
    /// A clustered scheduler's fencing token (see
    /// [`headers::LEADER_TOKEN`]); absent from a single scheduler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_token: Option<i64>,
}

/// Agent -> scheduler, every `heartbeat_interval_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub instances: Vec<InstanceId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatResponse {
    /// Instances the agent runs that the scheduler does not know: destroy.
    pub destroy: Vec<InstanceId>,
    /// The scheduler does not know this node (it was written off): register
    /// again.
    pub reregister: bool,
    /// The node reached its maximum validity and was retired: destroy every
    /// instance, forget the node id and register as a new node. Sent only
    /// when true, so agents that predate it keep parsing the answer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reprovision: bool,
    /// A clustered scheduler's fencing token (see
    /// [`headers::LEADER_TOKEN`]); absent from a single scheduler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_token: Option<i64>,
    /// The node's instances that must never be frozen while idle
    /// (provisioned, with FC's `alwaysAllocateCPU`); every other instance of
    /// the node may be. The whole set every time, so a lost answer is
    /// mended by the next one. Sent only when not empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub always_allocate_cpu: Vec<InstanceId>,
}

/// Gateway -> scheduler: a slot for one invocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcquireLease {
    pub request_id: String,
    pub spec: InstanceSpec,
}

/// A slot on an instance, held until released.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    pub lease_id: LeaseId,
    pub instance_id: InstanceId,
    pub node_id: NodeId,
    pub agent_url: String,
    /// The instance was created for this lease.
    pub cold_start: bool,
    /// How long after granting it the scheduler keeps this lease before
    /// writing it off as abandoned (the function's timeout plus a grace)
    /// and handing its slot to another call. A holder must not start a
    /// call on it that could outlast this. 0 (a scheduler that does not
    /// say): use it for one call only.
    #[serde(default)]
    pub expires_in_ms: u64,
}

/// How the invocation on a lease ended; decides the instance's fate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LeaseOutcome {
    /// The instance answered (success or function error): keep it.
    Ok,
    /// The instance is broken (crashed, timed out, unreachable): replace it.
    InstanceFailed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseLease {
    pub outcome: LeaseOutcome,
}

/// Gateway -> scheduler: a function changed or was deleted; its instances
/// of other revisions take no new calls and go once idle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetireFunction {
    pub account_id: AccountId,
    pub function_name: FunctionName,
    /// The revision that stays (LATEST's); `None` when the function was
    /// deleted.
    pub keep_revision: Option<String>,
    /// Revisions of the function's published versions, which stay too
    /// (their instances serve calls to those versions and their aliases).
    /// Absent from the JSON when the function has none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep_versions: Vec<String>,
    /// DisableFunctionInvocation's `abortOngoingRequest`: instances that
    /// do not stay are destroyed now, calls in flight included (their
    /// callers get an error), instead of after their last call. Sent only
    /// when true, so older schedulers keep parsing the request.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub abort_in_flight: bool,
}

/// Scheduler -> agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateInstance {
    pub instance_id: InstanceId,
    pub spec: InstanceSpec,
    /// FC's `alwaysAllocateCPU` for a provisioned instance: never frozen
    /// while idle, so it keeps its CPU for background work. False for
    /// on-demand instances. A property of the instance, not of the
    /// function's revision (a provision config change reaches running
    /// instances through [`HeartbeatResponse::always_allocate_cpu`]).
    /// Sent only when true, so older agents keep parsing the request.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub always_allocate_cpu: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceCreated {
    pub instance_id: InstanceId,
    /// From the create request to the runtime's port answering.
    pub startup_ms: u64,
}

/// One instance as the agent or the scheduler reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceInfo {
    pub instance_id: InstanceId,
    pub account_id: AccountId,
    pub function_name: FunctionName,
    pub revision: String,
    pub node_id: Option<NodeId>,
    pub in_flight: u32,
    pub concurrency: u32,
    pub created_at_ms: u64,
    pub last_used_ms: u64,
    /// Never frozen while idle (a provisioned instance with FC's
    /// `alwaysAllocateCPU`). Sent only when true.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub always_allocate_cpu: bool,
}

/// A node as the scheduler reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeInfo {
    pub node_id: NodeId,
    pub agent_url: String,
    pub capacity: NodeCapacity,
    pub labels: NodeLabels,
    pub state: String,
    pub instances: u32,
    pub memory_used_mb: u64,
    pub last_heartbeat_ms: u64,
}

/// An account's quotas and throttles, as the scheduler enforces them
/// (admin API `/v1/accounts/{id}/limits`). A new instance of the account
/// must fit every one of them; a call over any gets `ResourceThrottled`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountLimits {
    /// Instances the account may hold at once (FC's burst pool).
    pub burst_instances: u32,
    /// Memory of all the account's instances together.
    pub memory_quota_mb: u64,
    /// vCPUs of all the account's instances together, in thousandths.
    pub vcpu_quota_milli: u64,
    /// New instances per minute (a token bucket of this size refilling
    /// over a minute).
    pub scale_out_instances_per_minute: u32,
    /// vCPUs of new instances per minute (likewise).
    pub scale_out_vcpus_per_minute: u32,
    /// Per-function limits, by function name.
    #[serde(default)]
    pub functions: BTreeMap<FunctionName, FunctionLimits>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionLimits {
    /// Instances set aside for this function out of the account's burst
    /// pool; also the most it may hold.
    #[serde(default)]
    pub reserved_concurrency: Option<u32>,
    /// Concurrent calls of the function, across its instances.
    #[serde(default)]
    pub max_concurrency: Option<u32>,
}

/// A function's qualifier a provision configuration is for: `LATEST` (the
/// default, absent from the JSON so older peers keep parsing it) or an
/// alias name.
pub const LATEST: &str = "LATEST";

fn latest() -> String {
    LATEST.to_owned()
}

fn is_latest(q: &str) -> bool {
    q == LATEST
}

/// A function (and, for a provision configuration, its qualifier), by
/// account and name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionRef {
    pub account_id: AccountId,
    pub function_name: FunctionName,
    #[serde(default = "latest", skip_serializing_if = "is_latest")]
    pub qualifier: String,
}

/// Gateway -> scheduler: FC's PutProvisionConfig for the function's
/// `qualifier` (LATEST or an alias), with the spec of the revision it
/// names now (LATEST's, or the alias's version's): provisioned instances
/// start without a call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutProvision {
    pub spec: InstanceSpec,
    pub config: ProvisionConfig,
    #[serde(default = "latest", skip_serializing_if = "is_latest")]
    pub qualifier: String,
}

/// FC's provision configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisionConfig {
    /// Instances kept started, never released for idleness.
    pub target: u32,
    #[serde(default)]
    pub always_allocate_cpu: bool,
    /// The latest action to fire sets the target.
    #[serde(default)]
    pub scheduled_actions: Vec<ScheduledAction>,
    /// When present, the target follows the function's concurrency.
    #[serde(default)]
    pub target_tracking_policies: Vec<TargetTrackingPolicy>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduledAction {
    pub name: String,
    /// `cron(S M H DoM Mon DoW)`.
    pub schedule_expression: String,
    pub target: u32,
    /// IANA name; UTC when absent.
    #[serde(default)]
    pub time_zone: Option<String>,
    /// The action fires only between these (RFC 3339, or a local date-time
    /// in `time_zone`), when given.
    #[serde(default)]
    pub start_time: Option<String>,
    #[serde(default)]
    pub end_time: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetTrackingPolicy {
    pub name: String,
    /// `ProvisionedConcurrencyUtilization`.
    pub metric_type: String,
    /// Wanted utilisation of the provisioned instances' slots, (0, 1].
    pub metric_target: f64,
    pub min_capacity: u32,
    pub max_capacity: u32,
    /// The policy applies only between these (RFC 3339, or a local
    /// date-time in `time_zone`), when given.
    #[serde(default)]
    pub start_time: Option<String>,
    #[serde(default)]
    pub end_time: Option<String>,
    #[serde(default)]
    pub time_zone: Option<String>,
}

/// A provision configuration as the scheduler applies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisionStatus {
    pub account_id: AccountId,
    pub function_name: FunctionName,
    #[serde(default = "latest", skip_serializing_if = "is_latest")]
    pub qualifier: String,
    /// The configured target.
    pub target: u32,
    /// What schedules and tracking ask for now.
    pub desired: u32,
    /// Provisioned instances of the current revision taking calls.
    pub current: u32,
    /// Instances per zone.
    pub zones: BTreeMap<String, u32>,
}

/// A provision configuration with what the scheduler makes of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisionDetail {
    pub status: ProvisionStatus,
    pub config: ProvisionConfig,
}

/// One line of a function's log, as the agent keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LogRecord {
    /// Unique on the node (agent process nonce and sequence).
    pub id: String,
    pub timestamp_ms: u64,
    pub instance_id: InstanceId,
    /// The call the line belongs to; none for the instance's own lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    pub message: String,
}

/// The agent's answer to `GET /v1/logs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LogRecords {
    pub records: Vec<LogRecord>,
}

/// What the gateway asks an agent to run in an instance (`agent_exec`):
/// sent as the `x-kiln-exec` header, JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecStart {
    pub command: Vec<String>,
    pub tty: bool,
    pub stdin: bool,
    /// Who asked (account and access key), for the audit line.
    pub principal: String,
}

/// Framing of an exec session on the internal hop: one channel byte
/// (FC's/Kubernetes' numbering: 0 stdin, 1 stdout, 2 stderr, 3 status), a
/// big-endian u32 length, the payload. Status carries JSON
/// `{"exitCode": n}` or `{"error": "..."}` and ends the session.
pub mod exec_frame {
    pub const STDIN: u8 = 0;
    pub const STDOUT: u8 = 1;
    pub const STDERR: u8 = 2;
    pub const STATUS: u8 = 3;
    pub const HEADER: &str = "x-kiln-exec";
    /// The largest payload a frame may carry.
    pub const MAX: usize = 1 << 20;

    pub fn encode(channel: u8, payload: &[u8]) -> bytes::Bytes {
        let mut v = Vec::with_capacity(5 + payload.len());
        v.push(channel);
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v.into()
    }

    /// Take whole frames off the front of `buf`; `Err` on a frame over
    /// [`MAX`].
    pub fn decode(buf: &mut Vec<u8>) -> Result<Vec<(u8, Vec<u8>)>, String> {
        let mut out = Vec::new();
        loop {
            if buf.len() < 5 {
                return Ok(out);
            }
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if len > MAX {
                return Err(format!("exec frame of {len} bytes is over {MAX}"));
            }
            if buf.len() < 5 + len {
                return Ok(out);
            }
            let payload = buf[5..5 + len].to_vec();
            let channel = buf[0];
            buf.drain(..5 + len);
            out.push((channel, payload));
        }
    }
}

#[cfg(test)]
mod node_labels_tests {
    use super::*;

    #[test]
    fn labels_from_older_agents_offer_every_runtime() {
        let old = r#"{"zone":"zone-a","tenancy":"dedicated","sandbox_kinds":["container"]}"#;
        let labels: NodeLabels = serde_json::from_str(old).unwrap();
        assert_eq!(labels.runtimes, None);
        assert!(RuntimeName::ALL.into_iter().all(|r| labels.offers(r)));
        // Unreported stays unreported: an older scheduler parses it too.
        assert!(!serde_json::to_string(&labels).unwrap().contains("runtimes"));

        let new = r#"{"zone":"zone-a","tenancy":"dedicated","sandbox_kinds":["container"],
            "runtimes":["custom"]}"#;
        let labels: NodeLabels = serde_json::from_str(new).unwrap();
        assert!(labels.offers(RuntimeName::Custom));
        assert!(!labels.offers(RuntimeName::CustomDebian12));
        let back: NodeLabels =
            serde_json::from_str(&serde_json::to_string(&labels).unwrap()).unwrap();
        assert_eq!(back, labels);
    }

    #[test]
    fn older_agents_enforce_no_network_isolation() {
        let old = r#"{"zone":"zone-a","tenancy":"dedicated","sandbox_kinds":["container"]}"#;
        let labels: NodeLabels = serde_json::from_str(old).unwrap();
        assert_eq!(labels.network_isolation, NetworkIsolation::default());
        assert!(!labels.network_isolation.enforced);
    }

    #[test]
    fn nodes_take_only_functions_whose_network_they_enforce() {
        let vpc = |id: &str| kiln_core::VpcAttachment {
            vpc_id: id.into(),
            vswitch_ids: vec!["vsw-a".into()],
            security_group_id: "sg-a".into(),
        };
        let spec = |internet_access, vpc| NetworkSpec {
            internet_access,
            vpc,
        };
        let none = NetworkIsolation::default();
        let full = NetworkIsolation {
            enforced: true,
            vpcs: vec!["vpc-a".into()],
        };
        // FC's default, spelled out or not, runs anywhere.
        for n in [&none, &full] {
            assert_eq!(n.refusal(None), None);
            assert_eq!(n.refusal(Some(&spec(true, None))), None);
        }
        let why = none.refusal(Some(&spec(false, None))).unwrap();
        assert!(why.contains("internetAccess: false"), "{why}");
        let why = none.refusal(Some(&spec(true, Some(vpc("vpc-a"))))).unwrap();
        assert!(why.contains("vpcConfig"), "{why}");
        assert_eq!(full.refusal(Some(&spec(false, None))), None);
        assert_eq!(full.refusal(Some(&spec(false, Some(vpc("vpc-a"))))), None);
        assert_eq!(full.refusal(Some(&spec(true, Some(vpc("vpc-a"))))), None);
        let why = full
            .refusal(Some(&spec(false, Some(vpc("vpc-b")))))
            .unwrap();
        assert!(why.contains("VPC vpc-b"), "{why}");
    }
}
