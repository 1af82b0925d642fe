//! The placement core: nodes, instances and leases in memory, every
//! decision pure (no I/O, time passed in) and O(log n).
//!
//! Indexes kept beside the records make each decision cheap at the scale
//! the later simulator targets (100 nodes, 50,000 instances):
//! - per function revision, the instances with a free slot ordered by
//!   in-flight count, so "the busiest instance that still has room" is the
//!   last element;
//! - Ready nodes ordered by free memory, so "the node with the least free
//!   memory that still fits" is the first one at or above the request;
//! - idle instances ordered by last use and leases by expiry, so reaping
//!   touches only what is due.
//!
//! Every change that must survive a restart is appended to a journal the
//! caller drains ([`Placement::take_changes`]) and persists write-behind.

mod cron;
mod provision;
mod quota;
mod types;

#[cfg(test)]
mod property_tests;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use kiln_core::limits::{CONCURRENCY_MAX, CONCURRENCY_MIN};
use kiln_core::{
    AccountId, FcError, FcErrorCode, FunctionName, InstanceId, InstanceSpec, LeaseId, NodeId,
};
use kiln_internal_api::{
    AccountLimits, FunctionLimits, InstanceInfo, Lease, LeaseOutcome, NodeInfo, ProvisionConfig,
    ProvisionDetail, ProvisionStatus, RegisterNode, Tenancy,
};
use provision::{Provision, RETRY_AFTER_MS};

pub use quota::{default_account_limits, validate_limits, AccountUsage, MAX_FUNCTION_LIMITS};
use quota::{max_concurrency_error, ScaleOut};
pub use types::*;

/// Knobs of the core.
#[derive(Debug, Clone)]
pub struct PlacementConfig {
    /// The limits of every account without its own (admin API).
    pub default_limits: AccountLimits,
    pub idle_timeout_ms: u64,
    pub node_failure_after_ms: u64,
    /// A lease not released within the function's timeout plus this is
    /// taken back (its holder is gone).
    pub lease_grace_ms: u64,
    /// An instance that became ready this recently is not removed for
    /// missing from an agent's report (the report may predate it).
    pub reconcile_grace_ms: u64,
    /// A node is retired (its agent re-provisions it) this long after it
    /// registered; it is drained `node_drain_lead_ms` before.
    pub node_max_validity_ms: u64,
    pub node_drain_lead_ms: u64,
    /// An instance is destroyed this long after it was created; it stops
    /// taking calls `instance_drain_lead_ms` plus its function's timeout
    /// before, so every call it accepted can finish.
    pub instance_max_validity_ms: u64,
    pub instance_drain_lead_ms: u64,
    /// Moving load off hot nodes; off when `None`.
    pub rebalance: Option<RebalanceConfig>,
}

/// Rebalancing: new instances avoid nodes they would take over
/// `high_pct` of memory while another node has room (placement still
/// falls back to them rather than refuse), and every `every_ticks` ticks
/// the least-busy on-demand instances of a node above `high_pct` are
/// drained while a node below `low_pct` that accepts them has room, so
/// their replacements start elsewhere. Provisioned instances are never
/// moved; tenancy and quotas hold because replacements are placed like
/// any new instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebalanceConfig {
    pub every_ticks: u64,
    pub high_pct: u64,
    pub low_pct: u64,
    /// Instances drained per rebalancing round at most.
    pub max_moves: usize,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        Self {
            default_limits: default_account_limits(),
            idle_timeout_ms: 300_000,
            node_failure_after_ms: 10_000,
            lease_grace_ms: 90_000,
            reconcile_grace_ms: 5_000,
            node_max_validity_ms: 120 * 3_600_000,
            node_drain_lead_ms: 3_600_000,
            instance_max_validity_ms: 36 * 3_600_000,
            instance_drain_lead_ms: 600_000,
            rebalance: None,
        }
    }
}

/// Capacity and use over the nodes that take instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Utilisation {
    pub memory_mb: u64,
    pub memory_used_mb: u64,
    pub cpu_milli: u64,
    pub cpu_used_milli: u64,
}

/// The answer to an acquire.
#[derive(Debug)]
pub enum Acquired {
    /// A slot on a Ready instance: call it now.
    Ready(Lease),
    /// A slot on a Starting instance: wait for it to start. `create` is set
    /// when this call placed a new instance, which the caller must start.
    Starting {
        lease: Lease,
        create: Option<CreateJob>,
    },
}

impl Acquired {
    pub fn lease(&self) -> &Lease {
        match self {
            Self::Ready(l) | Self::Starting { lease: l, .. } => l,
        }
    }
}

/// The answer to a register.
#[derive(Debug)]
pub struct Registered {
    pub node_id: NodeId,
    /// Instances the agent runs that the scheduler does not know.
    pub destroy: Vec<InstanceId>,
    pub effects: Effects,
}

/// The answer to a heartbeat.
#[derive(Debug)]
pub struct HeartbeatOutcome {
    pub destroy: Vec<InstanceId>,
    pub reregister: bool,
    /// The node was retired: the agent must drop its id, destroy what it
    /// runs and register as a new node.
    pub reprovision: bool,
    pub effects: Effects,
}

struct LeaseRec {
    instance_id: InstanceId,
    expires_at_ms: u64,
    /// Its instance was lost (node failure, reconciliation): releasing it
    /// tells the caller so.
    written_off: bool,
}

type FnKey = (AccountId, FunctionName);
/// A provision configuration's: the function's, and its qualifier
/// (`LATEST` or an alias name).
type ProvKey = (AccountId, FunctionName, String);

fn fn_key(k: &ProvKey) -> FnKey {
    (k.0.clone(), k.1.clone())
}

/// All runtime state of the scheduler.
pub struct Placement {
    config: PlacementConfig,
    nodes: HashMap<NodeId, Node>,
    instances: HashMap<InstanceId, Instance>,
    leases: HashMap<LeaseId, LeaseRec>,
    /// Instances with a free slot, per function and revision, by in-flight.
    room: HashMap<FnKey, HashMap<String, BTreeSet<(u32, InstanceId)>>>,
    /// Every instance of a function.
    by_function: HashMap<FnKey, HashSet<InstanceId>>,
    /// Ready nodes by free memory.
    free_memory: BTreeMap<u64, BTreeSet<NodeId>>,
    idle: BTreeSet<(u64, InstanceId)>,
    lease_expiry: BTreeSet<(u64, LeaseId)>,
    per_account: HashMap<AccountId, AccountUsage>,
    /// Calls in flight per function (for its maximum concurrency).
    fn_in_flight: HashMap<FnKey, u32>,
    /// Accounts with limits of their own.
    limits: HashMap<AccountId, Arc<AccountLimits>>,
    default_limits: Arc<AccountLimits>,
    /// Provision configurations by function and qualifier.
    provisions: HashMap<ProvKey, Provision>,
    /// Instances still taking calls, by when age makes them drain.
    drain_by_age: BTreeSet<(u64, InstanceId)>,
    /// Instances drained for age, by when they are removed regardless.
    expire_by_age: BTreeSet<(u64, InstanceId)>,
    /// Accounts whose scale-out buckets are not full.
    scale_out: HashMap<AccountId, ScaleOut>,
    changes: Vec<Change>,
    /// Ticks so far (rebalancing runs every `every_ticks`).
    ticks: u64,
    /// Instances drained by rebalancing so far.
    rebalanced: u64,
    /// Leases taken back because their holder kept them past expiry.
    leases_written_off: u64,
}

impl Placement {
    pub fn new(config: PlacementConfig) -> Self {
        Self {
            default_limits: Arc::new(config.default_limits.clone()),
            config,
            nodes: HashMap::new(),
            instances: HashMap::new(),
            leases: HashMap::new(),
            room: HashMap::new(),
            by_function: HashMap::new(),
            free_memory: BTreeMap::new(),
            idle: BTreeSet::new(),
            lease_expiry: BTreeSet::new(),
            per_account: HashMap::new(),
            fn_in_flight: HashMap::new(),
            limits: HashMap::new(),
            scale_out: HashMap::new(),
            drain_by_age: BTreeSet::new(),
            expire_by_age: BTreeSet::new(),
            provisions: HashMap::new(),
            changes: Vec::new(),
            ticks: 0,
            rebalanced: 0,
            leases_written_off: 0,
        }
    }

    /// Rebuild from persisted records.
    ///
    /// Leases are not persisted: after a restart every in-flight count
    /// starts at 0 and calls running across the restart release leases the
    /// new process does not know, which is harmless (release is
    /// idempotent). Instances may then take a few more calls than their
    /// concurrency until those calls end. Idle clocks restart at `now`, and
    /// nodes get a full failure window to heartbeat again. Instances that
    /// were still starting are dropped: their start call died with the old
    /// process, and the agent's next report gets them destroyed if they
    /// exist.
    pub fn restore(
        config: PlacementConfig,
        nodes: Vec<NodeRecord>,
        instances: Vec<InstanceRecord>,
        now: u64,
    ) -> (Self, Effects) {
        let mut p = Self::new(config);
        for r in nodes {
            let node = Node {
                id: r.node_id.clone(),
                agent_url: r.agent_url,
                capacity: r.capacity,
                labels: r.labels,
                bound_account: r.bound_account,
                state: r.state,
                last_heartbeat_ms: now,
                registered_at_ms: if r.registered_at_ms == 0 {
                    now
                } else {
                    r.registered_at_ms
                },
                reprovision: r.reprovision,
                used_memory_mb: 0,
                used_cpu_milli: 0,
                instances: HashSet::new(),
            };
            p.nodes.insert(r.node_id.clone(), node);
            p.index_node(&r.node_id);
        }
        let mut effects = Effects::default();
        for r in instances {
            let node_ok = p.nodes.get(&r.node_id).is_some_and(|n| n.state.is_alive());
            if !node_ok || r.state == InstanceState::Starting {
                p.changes.push(Change::DeleteInstance(r.instance_id));
                continue;
            }
            let spec = Arc::new(r.spec);
            let sandbox = sandbox_kind_for(p.nodes[&r.node_id].labels.tenancy);
            p.insert_instance(Instance {
                sandbox,
                provisioned: r.provisioned,
                id: r.instance_id.clone(),
                node_id: r.node_id,
                spec,
                state: r.state,
                in_flight: 0,
                created_at_ms: r.created_at_ms,
                last_used_ms: now,
                ready_at_ms: Some(r.created_at_ms.min(now)),
                leases: HashSet::new(),
            });
            if r.state.is_winding_down() {
                effects.extend(p.remove_instance(&r.instance_id, None));
            }
        }
        (p, effects)
    }

    /// Changes since the last call, oldest first.
    pub fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes)
    }

    pub fn instance(&self, id: &InstanceId) -> Option<&Instance> {
        self.instances.get(id)
    }

    pub fn node(&self, id: &NodeId) -> Option<&Node> {
        self.nodes.get(id)
    }

    pub fn instance_count(&self) -> usize {
        self.instances.len()
    }

    pub fn ready_node_count(&self) -> usize {
        self.nodes.values().filter(|n| n.state.can_place()).count()
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// Capacity and use summed over the nodes that take instances.
    pub fn utilisation(&self) -> Utilisation {
        let mut u = Utilisation::default();
        for n in self.nodes.values().filter(|n| n.state.can_place()) {
            u.memory_mb += n.capacity.memory_mb;
            u.memory_used_mb += n.used_memory_mb;
            u.cpu_milli += n.capacity.cpu_milli;
            u.cpu_used_milli += n.used_cpu_milli;
        }
        u
    }

    // ---- leases ---------------------------------------------------------

    /// A slot for one call of `spec`: on the busiest instance of the same
    /// revision that has room (Starting included, so a burst shares the
    /// instances it is already starting), else on a new instance on the
    /// node where it packs best.
    ///
    /// The spec is checked (sealed, in FC's limits) only when it would
    /// shape a new instance: a warm call runs on an instance built from a
    /// spec checked before, so the hot path skips hashing the spec.
    pub fn acquire(&mut self, spec: &InstanceSpec, now: u64) -> Result<Acquired, FcError> {
        let key = (spec.account_id.clone(), spec.function_name.clone());
        if let Some(max) = self.max_concurrency(&spec.account_id, &spec.function_name) {
            if self.fn_in_flight.get(&key).copied().unwrap_or(0) >= max {
                return Err(max_concurrency_error(
                    &spec.account_id,
                    &spec.function_name,
                    max,
                ));
            }
        }
        let warm = self
            .room
            .get(&key)
            .and_then(|revs| revs.get(&spec.revision))
            .and_then(|set| set.last())
            .map(|(_, id)| id.clone());
        if let Some(id) = warm {
            let lease = self.take_slot(&id, false, now);
            let starting = self.instances[&id].state == InstanceState::Starting;
            return Ok(if starting {
                Acquired::Starting {
                    lease,
                    create: None,
                }
            } else {
                Acquired::Ready(lease)
            });
        }
        self.place(spec, now)
    }

    fn place(&mut self, spec: &InstanceSpec, now: u64) -> Result<Acquired, FcError> {
        check_spec(spec)?;
        if self.nodes.is_empty() {
            return Err(FcError::unavailable(
                "no compute node is registered; retry once an agent has joined",
            ));
        }
        if self.ready_node_count() == 0 {
            return Err(FcError::unavailable(
                "no compute node is healthy; retry later",
            ));
        }
        self.check_quotas(spec, now)?;
        let node_id = self.best_node(spec)?;
        let job = self.create_instance(Arc::new(spec.clone()), node_id, false, now);
        let lease = self.take_slot(&job.instance_id, true, now);
        Ok(Acquired::Starting {
            lease,
            create: Some(job),
        })
    }

    /// Put a new Starting instance on `node_id` (already checked against
    /// the quotas and the node's room) and spend the scale-out tokens.
    fn create_instance(
        &mut self,
        spec: Arc<InstanceSpec>,
        node_id: NodeId,
        provisioned: bool,
        now: u64,
    ) -> CreateJob {
        self.scale_out
            .entry(spec.account_id.clone())
            .or_insert_with(|| ScaleOut::new(&self.default_limits, now))
            .take(u64::from(spec.cpu_milli));
        let id = InstanceId::generate();
        self.insert_instance(Instance {
            sandbox: sandbox_kind_for(self.nodes[&node_id].labels.tenancy),
            provisioned,
            id: id.clone(),
            node_id: node_id.clone(),
            spec: spec.clone(),
            state: InstanceState::Starting,
            in_flight: 0,
            created_at_ms: now,
            last_used_ms: now,
            ready_at_ms: None,
            leases: HashSet::new(),
        });
        let node = self.nodes.get_mut(&node_id).expect("chosen node exists");
        if node.labels.tenancy == Tenancy::Dedicated && node.bound_account.is_none() {
            node.bound_account = Some(spec.account_id.clone());
            tracing::info!(node_id = %node_id, account_id = %spec.account_id, "dedicated node bound to its first account");
            let record = node.record();
            self.changes.push(Change::UpsertNode(record));
        }
        let agent_url = self.nodes[&node_id].agent_url.clone();
        let always_allocate_cpu = self.always_allocates_cpu(&self.instances[&id]);
        CreateJob {
            instance_id: id,
            node_id,
            agent_url,
            spec,
            always_allocate_cpu,
        }
    }

    // ---- provisioned instances ------------------------------------------

    /// FC's PutProvisionConfig for the function's `qualifier` (LATEST or
    /// an alias): keep instances of `spec` (the revision it names now)
    /// started as the configuration says. Answers the new instances to
    /// start.
    pub fn put_provision(
        &mut self,
        spec: &InstanceSpec,
        qualifier: &str,
        config: ProvisionConfig,
        now: u64,
    ) -> Result<Effects, FcError> {
        check_spec(spec)?;
        let provision = Provision::new(Some(Arc::new(spec.clone())), config.clone(), now)?;
        let key = (
            spec.account_id.clone(),
            spec.function_name.clone(),
            qualifier.to_owned(),
        );
        let before = self.provisions.insert(key.clone(), provision);
        self.changes.push(Change::UpsertProvision(ProvisionRecord {
            account_id: key.0.clone(),
            function_name: key.1.clone(),
            qualifier: key.2.clone(),
            spec: Some(spec.clone()),
            config,
        }));
        // An alias moved to another version: the old version's provisioned
        // instances are on-demand now.
        if before.is_some_and(|b| b.spec.is_some_and(|s| s.revision != spec.revision)) {
            self.unprovision_uncovered(&fn_key(&key));
        }
        tracing::info!(account_id = %key.0, function = %key.1, qualifier = %key.2, "provision configuration set");
        Ok(self.reconcile_provision(&key, now))
    }

    /// Remove a provision configuration: its instances become on-demand
    /// (released once idle).
    pub fn delete_provision(
        &mut self,
        account: &AccountId,
        function: &FunctionName,
        qualifier: &str,
    ) -> bool {
        let key = (account.clone(), function.clone(), qualifier.to_owned());
        if self.provisions.remove(&key).is_none() {
            return false;
        }
        self.changes.push(Change::DeleteProvision(
            account.clone(),
            function.clone(),
            qualifier.to_owned(),
        ));
        self.unprovision_uncovered(&fn_key(&key));
        true
    }

    /// Remove every provision configuration of a function.
    fn delete_provisions_of(&mut self, account: &AccountId, function: &FunctionName) {
        let qualifiers: Vec<String> = self
            .provisions
            .keys()
            .filter(|(a, f, _)| a == account && f == function)
            .map(|(_, _, q)| q.clone())
            .collect();
        for q in qualifiers {
            self.delete_provision(account, function, &q);
        }
    }

    /// The revisions the function's provision configurations keep started.
    fn provisioned_revisions(&self, key: &FnKey) -> HashSet<String> {
        self.provisions
            .iter()
            .filter(|((a, f, _), _)| a == &key.0 && f == &key.1)
            .filter_map(|(_, p)| p.spec.as_ref().map(|s| s.revision.clone()))
            .collect()
    }

    /// Provisioned instances of revisions no configuration of the function
    /// keeps any more become on-demand.
    fn unprovision_uncovered(&mut self, key: &FnKey) {
        let kept = self.provisioned_revisions(key);
        let ids: Vec<InstanceId> = self
            .by_function
            .get(key)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for id in ids {
            let i = &self.instances[&id];
            if i.provisioned && !kept.contains(&i.spec.revision) {
                self.update_instance(&id, |i| i.provisioned = false);
                let record = self.instances[&id].record();
                self.changes.push(Change::UpsertInstance(record));
            }
        }
    }

    /// Install persisted provision configurations (at start, not journaled).
    pub fn load_provisions(&mut self, all: Vec<ProvisionRecord>, now: u64) {
        for r in all {
            match Provision::new(r.spec.map(Arc::new), r.config, now) {
                Ok(p) => {
                    self.provisions
                        .insert((r.account_id, r.function_name, r.qualifier), p);
                }
                Err(e) => {
                    tracing::error!(account_id = %r.account_id, function = %r.function_name, error = %e, "ignoring a stored provision configuration")
                }
            }
        }
    }

    pub fn provisions_info(&self) -> Vec<ProvisionStatus> {
        let mut v: Vec<ProvisionStatus> = self
            .provisions
            .iter()
            .map(|(key, p)| {
                let ids = self.current_provisioned(&fn_key(key), p);
                let mut zones = std::collections::BTreeMap::new();
                for id in &ids {
                    let zone = self.nodes[&self.instances[id].node_id].labels.zone.clone();
                    *zones.entry(zone).or_insert(0) += 1;
                }
                ProvisionStatus {
                    account_id: key.0.clone(),
                    function_name: key.1.clone(),
                    qualifier: key.2.clone(),
                    target: p.config.target,
                    desired: p.desired(self.fn_in_flight.get(&fn_key(key)).copied().unwrap_or(0)),
                    current: ids.len() as u32,
                    zones,
                }
            })
            .collect();
        v.sort_by(|a, b| {
            (&a.account_id, &a.function_name, &a.qualifier).cmp(&(
                &b.account_id,
                &b.function_name,
                &b.qualifier,
            ))
        });
        v
    }

    /// The account's provision configurations with their status, by
    /// function name.
    pub fn provision_details(&self, account: &AccountId) -> Vec<ProvisionDetail> {
        self.provisions_info()
            .into_iter()
            .filter(|s| &s.account_id == account)
            .filter_map(|status| {
                let key = (
                    status.account_id.clone(),
                    status.function_name.clone(),
                    status.qualifier.clone(),
                );
                let config = self.provisions.get(&key)?.config.clone();
                Some(ProvisionDetail { status, config })
            })
            .collect()
    }

    /// FC's `alwaysAllocateCPU`: whether the agent must keep `i` unfrozen
    /// while idle. Only a provisioned instance whose function's provision
    /// configuration says so; on-demand instances (those of a deleted
    /// configuration and those drained for scale-in included) are frozen
    /// between calls.
    fn always_allocates_cpu(&self, i: &Instance) -> bool {
        i.provisioned
            && self.provisions.iter().any(|((a, f, _), p)| {
                a == &i.spec.account_id
                    && f == &i.spec.function_name
                    && p.config.always_allocate_cpu
                    && p.spec
                        .as_ref()
                        .is_some_and(|s| s.revision == i.spec.revision)
            })
    }

    /// The instances of `node` the agent must never freeze while idle
    /// (answered with every heartbeat, so a provision configuration change
    /// reaches the instances already running within one heartbeat).
    pub fn always_allocated_on(&self, node: &NodeId) -> Vec<InstanceId> {
        let Some(n) = self.nodes.get(node) else {
            return Vec::new();
        };
        let mut v: Vec<InstanceId> = n
            .instances
            .iter()
            .filter(|id| {
                self.instances
                    .get(*id)
                    .is_some_and(|i| self.always_allocates_cpu(i))
            })
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Provisioned instances of the configuration's revision taking calls.
    fn current_provisioned(&self, key: &FnKey, p: &Provision) -> Vec<InstanceId> {
        let Some(spec) = &p.spec else {
            return Vec::new();
        };
        self.by_function
            .get(key)
            .map(|s| {
                s.iter()
                    .filter(|id| {
                        let i = &self.instances[*id];
                        i.provisioned && i.state.takes_calls() && i.spec.revision == spec.revision
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    fn reconcile_provisions(&mut self, now: u64) -> Effects {
        let keys: Vec<ProvKey> = self.provisions.keys().cloned().collect();
        let mut effects = Effects::default();
        for key in keys {
            effects.extend(self.reconcile_provision(&key, now));
        }
        effects
    }

    /// Start or drain provisioned instances until the function has what its
    /// configuration asks for now.
    fn reconcile_provision(&mut self, key: &ProvKey, now: u64) -> Effects {
        let mut effects = Effects::default();
        let fkey = fn_key(key);
        let in_flight = self.fn_in_flight.get(&fkey).copied().unwrap_or(0);
        let Some(p) = self.provisions.get_mut(key) else {
            return effects;
        };
        p.advance(now);
        if p.start_failed {
            p.start_failed = false;
            p.next_attempt_ms = now + RETRY_AFTER_MS;
        }
        let desired = p.desired(in_flight) as usize;
        let Some(spec) = p.spec.clone() else {
            return effects;
        };
        let next_attempt = p.next_attempt_ms;
        let p = self.provisions[key].clone();
        let mut current = self.current_provisioned(&fkey, &p);
        if current.len() < desired && now >= next_attempt {
            for _ in current.len()..desired {
                let placed = self
                    .check_quotas(&spec, now)
                    .and_then(|()| self.spread_node(&spec, &fkey));
                match placed {
                    Ok(node) => {
                        effects
                            .create
                            .push(self.create_instance(spec.clone(), node, true, now));
                    }
                    Err(e) => {
                        tracing::debug!(account_id = %key.0, function = %key.1, error = %e, "cannot place a provisioned instance now");
                        break;
                    }
                }
            }
        } else if current.len() > desired {
            // Idle ones first, then the least busy, newest first.
            let extra = current.len() - desired;
            current.sort_by_key(|id| {
                let i = &self.instances[id];
                (i.in_flight, std::cmp::Reverse(i.created_at_ms))
            });
            for id in current.into_iter().take(extra) {
                self.update_instance(&id, |i| {
                    i.provisioned = false;
                    i.state = InstanceState::Draining;
                });
                let record = self.instances[&id].record();
                self.changes.push(Change::UpsertInstance(record));
                effects.extend(self.destroy_if_done(&id));
            }
        }
        effects
    }

    /// For a provisioned instance: a node that fits, in the zone holding
    /// the fewest of the function's provisioned instances.
    fn spread_node(&self, spec: &InstanceSpec, key: &FnKey) -> Result<NodeId, FcError> {
        let mut per_zone: HashMap<&str, usize> = HashMap::new();
        if let Some(ids) = self.by_function.get(key) {
            for id in ids {
                let i = &self.instances[id];
                if i.provisioned && i.state.takes_calls() {
                    *per_zone
                        .entry(self.nodes[&i.node_id].labels.zone.as_str())
                        .or_default() += 1;
                }
            }
        }
        let memory = u64::from(spec.memory_mb);
        let cpu = u64::from(spec.cpu_milli);
        let mut best: Option<(usize, &NodeId)> = None;
        for (_, ids) in self.free_memory.range(memory..) {
            for id in ids {
                let n = &self.nodes[id];
                if n.free_cpu_milli() >= cpu && n.has_instance_slot() && n.accepts_spec(spec) {
                    let load = per_zone.get(n.labels.zone.as_str()).copied().unwrap_or(0);
                    if best.is_none_or(|(b, _)| load < b) {
                        best = Some((load, id));
                    }
                }
            }
        }
        match best {
            Some((_, id)) => Ok(id.clone()),
            None => self.best_node(spec),
        }
    }

    /// The limits in force for `account`.
    pub fn account_limits(&self, account: &AccountId) -> Arc<AccountLimits> {
        self.limits
            .get(account)
            .unwrap_or(&self.default_limits)
            .clone()
    }

    /// What `account` holds now.
    pub fn account_usage(&self, account: &AccountId) -> AccountUsage {
        self.per_account.get(account).copied().unwrap_or_default()
    }

    /// Give `account` limits of its own, or (`None`) back the defaults.
    /// Instances already over a lowered limit stay; new ones must fit.
    pub fn set_account_limits(
        &mut self,
        account: &AccountId,
        limits: Option<AccountLimits>,
    ) -> Result<(), FcError> {
        match limits {
            Some(l) => {
                validate_limits(&l)?;
                self.limits.insert(account.clone(), Arc::new(l.clone()));
                self.changes
                    .push(Change::UpsertAccountLimits(account.clone(), l));
            }
            None => {
                self.limits.remove(account);
                self.changes
                    .push(Change::DeleteAccountLimits(account.clone()));
            }
        }
        tracing::info!(account_id = %account, "account limits changed");
        Ok(())
    }

    /// Set (or with `None` remove) one function's entry of the account's
    /// limits, keeping everything else in force (the defaults become the
    /// account's own limits if it had none). Validated whole: on error
    /// nothing changes. Answers the limits now in force.
    pub fn set_function_limits(
        &mut self,
        account: &AccountId,
        function: &FunctionName,
        limits: Option<FunctionLimits>,
    ) -> Result<Arc<AccountLimits>, FcError> {
        let mut l = (*self.account_limits(account)).clone();
        match limits {
            Some(f) if f.reserved_concurrency.is_some() || f.max_concurrency.is_some() => {
                l.functions.insert(function.clone(), f);
            }
            _ => {
                l.functions.remove(function);
            }
        }
        self.set_account_limits(account, Some(l))?;
        Ok(self.account_limits(account))
    }

    /// Install persisted per-account limits (at start, not journaled).
    pub fn load_account_limits(&mut self, all: Vec<(AccountId, AccountLimits)>) {
        for (a, l) in all {
            self.limits.insert(a, Arc::new(l));
        }
    }

    fn max_concurrency(&self, account: &AccountId, function: &FunctionName) -> Option<u32> {
        if self.limits.is_empty() && self.default_limits.functions.is_empty() {
            return None;
        }
        self.limits
            .get(account)
            .unwrap_or(&self.default_limits)
            .functions
            .get(function)
            .and_then(|f| f.max_concurrency)
    }

    fn fn_instances(&self, account: &AccountId, function: &FunctionName) -> u32 {
        self.by_function
            .get(&(account.clone(), function.clone()))
            .map_or(0, |s| s.len() as u32)
    }

    /// Whether the account may add an instance of `spec` now: reserved
    /// concurrency or burst pool, memory and vCPU quotas, scale-out rate.
    /// The error names the limit.
    fn check_quotas(&mut self, spec: &InstanceSpec, now: u64) -> Result<(), FcError> {
        let account = &spec.account_id;
        let function = &spec.function_name;
        let l = self.account_limits(account);
        let usage = self.account_usage(account);
        match l
            .functions
            .get(function)
            .and_then(|f| f.reserved_concurrency)
        {
            Some(reserved) => {
                if self.fn_instances(account, function) >= reserved {
                    return Err(FcError::throttled(format!(
                        "function {function} of account {account} reached its reserved \
                         concurrency of {reserved} instances"
                    )));
                }
            }
            None => {
                let mut reserved_total = 0u32;
                let mut reserved_used = 0u32;
                for (name, f) in &l.functions {
                    if let Some(r) = f.reserved_concurrency {
                        reserved_total += r;
                        reserved_used += self.fn_instances(account, name);
                    }
                }
                let pool = l.burst_instances.saturating_sub(reserved_total);
                if usage.instances.saturating_sub(reserved_used) >= pool {
                    return Err(FcError::throttled(format!(
                        "account {account} reached its burst pool of {} instances \
                         ({reserved_total} of them reserved for functions)",
                        l.burst_instances
                    )));
                }
            }
        }
        if usage.instances >= l.burst_instances {
            return Err(FcError::throttled(format!(
                "account {account} reached its burst pool of {} instances",
                l.burst_instances
            )));
        }
        if usage.memory_mb + u64::from(spec.memory_mb) > l.memory_quota_mb {
            return Err(FcError::throttled(format!(
                "account {account} would exceed its memory quota of {} MB ({} MB in use, the \
                 instance needs {} MB)",
                l.memory_quota_mb, usage.memory_mb, spec.memory_mb
            )));
        }
        if usage.cpu_milli + u64::from(spec.cpu_milli) > l.vcpu_quota_milli {
            return Err(FcError::throttled(format!(
                "account {account} would exceed its vCPU quota of {} vCPUs ({} in use, the \
                 instance needs {})",
                l.vcpu_quota_milli as f64 / 1000.0,
                usage.cpu_milli as f64 / 1000.0,
                f64::from(spec.cpu_milli) / 1000.0
            )));
        }
        self.scale_out
            .entry(account.clone())
            .or_insert_with(|| ScaleOut::new(&l, now))
            .check(&l, account, u64::from(spec.cpu_milli), now)
    }

    /// The Ready node with the least free memory that still fits the
    /// instance's memory, cpu and instance count and accepts its account.
    fn best_node(&self, spec: &InstanceSpec) -> Result<NodeId, FcError> {
        let memory = u64::from(spec.memory_mb);
        let cpu = u64::from(spec.cpu_milli);
        // Rebalancing: a node the instance would push over the high
        // watermark is only the fallback.
        let high = self.config.rebalance.map(|r| r.high_pct);
        let mut fallback = None;
        for (_, ids) in self.free_memory.range(memory..) {
            for id in ids {
                let n = &self.nodes[id];
                if n.free_cpu_milli() >= cpu && n.has_instance_slot() && n.accepts_spec(spec) {
                    match high {
                        Some(h) if (n.used_memory_mb + memory) * 100 > h * n.capacity.memory_mb => {
                            fallback.get_or_insert(id);
                        }
                        _ => return Ok(id.clone()),
                    }
                }
            }
        }
        if let Some(id) = fallback {
            return Ok(id.clone());
        }
        // No node offers the runtime: no amount of room helps.
        if !self
            .nodes
            .values()
            .any(|n| n.state.can_place() && n.labels.offers(spec.runtime))
        {
            return Err(FcError::unavailable(format!(
                "no compute node offers runtime {}; retry once a node that offers it has \
                 joined, or use another runtime",
                spec.runtime
            )));
        }
        // No node enforces the function's network configuration: never
        // place it where it would run with less isolation than it asks for.
        let offering: Vec<&Node> = self
            .nodes
            .values()
            .filter(|n| n.state.can_place() && n.labels.offers(spec.runtime))
            .collect();
        if !offering.iter().any(|n| n.enforces_network(spec)) {
            // Each distinct reason once: "no isolation" from some nodes,
            // "does not serve VPC x" from others.
            let mut whys: Vec<String> = offering
                .iter()
                .filter_map(|n| n.labels.network_isolation.refusal(spec.network.as_ref()))
                .collect();
            whys.sort();
            whys.dedup();
            let why = whys.join("; ");
            return Err(FcError::new(
                FcErrorCode::FunctionNotStarted,
                format!(
                    "no compute node can enforce the function's network configuration ({why}); \
                     add [sandbox.network] (and the VPC) to a node's agent configuration, or \
                     change the function's internetAccess/vpcConfig"
                ),
            ));
        }
        // No room: say what ran out, over the nodes this instance may use.
        let eligible: Vec<&Node> = self
            .nodes
            .values()
            .filter(|n| n.state.can_place() && n.accepts_spec(spec))
            .collect();
        if eligible.is_empty() {
            return Err(FcError::throttled(format!(
                "no compute node accepts instances of account {} on runtime {}: every healthy \
                 node that offers the runtime is dedicated to another account or lacks the \
                 sandbox kind its tenancy needs",
                spec.account_id, spec.runtime
            )));
        }
        let mut short = Vec::new();
        if eligible.iter().all(|n| n.free_memory_mb() < memory) {
            short.push("memory");
        }
        if eligible.iter().all(|n| n.free_cpu_milli() < cpu) {
            short.push("cpu");
        }
        if eligible.iter().all(|n| !n.has_instance_slot()) {
            short.push("instance slots");
        }
        if short.is_empty() {
            short.push("memory and cpu together");
        }
        Err(FcError::throttled(format!(
            "no compute node has room for an instance of {} MB memory and {} millicores: \
             out of {} on {} eligible node(s)",
            spec.memory_mb,
            spec.cpu_milli,
            short.join(", "),
            eligible.len()
        )))
    }

    fn take_slot(&mut self, id: &InstanceId, cold_start: bool, now: u64) -> Lease {
        let lease_id = LeaseId::generate();
        let timeout_ms = u64::from(self.instances[id].spec.timeout_s) * 1000;
        let expires_in_ms = timeout_ms + self.config.lease_grace_ms;
        let expires_at_ms = now + expires_in_ms;
        self.update_instance(id, |i| {
            i.in_flight += 1;
            i.last_used_ms = now;
            i.leases.insert(lease_id.clone());
        });
        self.leases.insert(
            lease_id.clone(),
            LeaseRec {
                instance_id: id.clone(),
                expires_at_ms,
                written_off: false,
            },
        );
        self.lease_expiry.insert((expires_at_ms, lease_id.clone()));
        let inst = &self.instances[id];
        Lease {
            lease_id,
            instance_id: id.clone(),
            node_id: inst.node_id.clone(),
            agent_url: self.nodes[&inst.node_id].agent_url.clone(),
            cold_start,
            expires_in_ms,
        }
    }

    /// Give a slot back. An unknown lease is not an error (release is
    /// idempotent, and leases do not survive a restart); a lease whose
    /// instance was lost answers a retryable `ServiceUnavailable`.
    pub fn release(
        &mut self,
        lease_id: &LeaseId,
        outcome: LeaseOutcome,
        now: u64,
    ) -> Result<Effects, FcError> {
        let Some(rec) = self.leases.remove(lease_id) else {
            return Ok(Effects::default());
        };
        self.lease_expiry
            .remove(&(rec.expires_at_ms, lease_id.clone()));
        if rec.written_off {
            return Err(FcError::unavailable(
                "the instance serving this call was lost with its node; retry the call",
            ));
        }
        let id = rec.instance_id;
        self.update_instance(&id, |i| {
            i.in_flight = i.in_flight.saturating_sub(1);
            i.last_used_ms = now;
            i.leases.remove(lease_id);
            if outcome == LeaseOutcome::InstanceFailed && i.state != InstanceState::Failed {
                tracing::info!(instance_id = %i.id, "instance failed; it takes no new calls");
                i.state = InstanceState::Failed;
            }
        });
        if outcome == LeaseOutcome::InstanceFailed {
            let record = self.instances[&id].record();
            self.changes.push(Change::UpsertInstance(record));
        }
        Ok(self.destroy_if_done(&id))
    }

    /// Remove a winding-down instance once nothing runs on it and its start
    /// has finished.
    fn destroy_if_done(&mut self, id: &InstanceId) -> Effects {
        match self.instances.get(id) {
            Some(i) if i.state.is_winding_down() && i.in_flight == 0 && i.ready_at_ms.is_some() => {
                self.remove_instance(id, None)
            }
            _ => Effects::default(),
        }
    }

    // ---- instance lifecycle ---------------------------------------------

    /// The agent started the instance. `false` when the core no longer
    /// knows it (its node failed meanwhile): the caller destroys it.
    pub fn instance_started(&mut self, id: &InstanceId, now: u64) -> (bool, Effects) {
        if !self.instances.contains_key(id) {
            return (false, Effects::default());
        }
        self.update_instance(id, |i| {
            i.ready_at_ms = Some(now);
            if i.state == InstanceState::Starting {
                i.state = InstanceState::Ready;
            }
        });
        let record = self.instances[id].record();
        self.changes.push(Change::UpsertInstance(record));
        (true, self.destroy_if_done(id))
    }

    /// The agent could not start the instance: forget it and the leases
    /// waiting on it (their callers get the agent's error). The returned
    /// destroy asks the agent to clean up whatever it half made.
    pub fn instance_start_failed(&mut self, id: &InstanceId) -> Option<Destroy> {
        let leases: Vec<LeaseId> = self.instances.get(id)?.leases.iter().cloned().collect();
        for l in leases {
            if let Some(rec) = self.leases.remove(&l) {
                self.lease_expiry.remove(&(rec.expires_at_ms, l));
            }
        }
        self.update_instance(id, |i| {
            i.leases.clear();
            i.in_flight = 0;
            i.state = InstanceState::Failed;
        });
        let inst = &self.instances[id];
        if inst.provisioned {
            let (account, function, revision) = (
                inst.spec.account_id.clone(),
                inst.spec.function_name.clone(),
                inst.spec.revision.clone(),
            );
            for ((a, f, _), p) in self.provisions.iter_mut() {
                if a == &account
                    && f == &function
                    && p.spec.as_ref().is_some_and(|s| s.revision == revision)
                {
                    p.start_failed = true;
                }
            }
        }
        let node = self.instances[id].node_id.clone();
        let url = self.nodes.get(&node).map(|n| n.agent_url.clone());
        self.remove_instance(id, None);
        url.map(|agent_url| Destroy {
            instance_id: id.clone(),
            node_id: node,
            agent_url,
        })
    }

    /// A function changed (`keep` is its new revision) or was deleted
    /// (`keep` is `None`): its other instances take no new calls and go
    /// once idle. Instances of `versions` (the revisions of its published
    /// versions) stay as well.
    pub fn retire(
        &mut self,
        account: &AccountId,
        function: &FunctionName,
        keep: Option<&str>,
        versions: &[String],
    ) -> Effects {
        let key = (account.clone(), function.clone());
        // A deleted function loses its provisioning; a changed one pauses
        // LATEST's until the next PutProvision brings the new spec, and an
        // alias's whose version is gone (the alias moves first, so only a
        // deleted function's or a stale one's).
        match keep {
            None => {
                self.delete_provisions_of(account, function);
            }
            Some(rev) => {
                let mut paused = Vec::new();
                for ((a, f, q), p) in self.provisions.iter_mut() {
                    if a != account || f != function {
                        continue;
                    }
                    let stays = |r: &str| {
                        if q == kiln_internal_api::LATEST {
                            r == rev
                        } else {
                            versions.iter().any(|v| v == r)
                        }
                    };
                    if p.spec.as_ref().is_some_and(|s| !stays(&s.revision)) {
                        p.spec = None;
                        paused.push(ProvisionRecord {
                            account_id: account.clone(),
                            function_name: function.clone(),
                            qualifier: q.clone(),
                            spec: None,
                            config: p.config.clone(),
                        });
                    }
                }
                for record in paused {
                    self.changes.push(Change::UpsertProvision(record));
                }
            }
        }
        let ids: Vec<InstanceId> = self
            .by_function
            .get(&key)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        let mut effects = Effects::default();
        for id in ids {
            let inst = &self.instances[&id];
            if keep == Some(inst.spec.revision.as_str())
                || versions.contains(&inst.spec.revision)
                || !inst.state.takes_calls()
            {
                continue;
            }
            self.update_instance(&id, |i| i.state = InstanceState::Draining);
            let record = self.instances[&id].record();
            self.changes.push(Change::UpsertInstance(record));
            effects.extend(self.destroy_if_done(&id));
        }
        effects
    }

    /// DisableFunctionInvocation with `abortOngoingRequest`: after
    /// [`Self::retire`], the function's winding-down instances go now, with
    /// their calls in flight (their leases are written off, so the agent's
    /// cut-off answers are the callers' errors) and starts not finished.
    pub fn abort_retired(&mut self, account: &AccountId, function: &FunctionName) -> Effects {
        let key = (account.clone(), function.clone());
        let ids: Vec<InstanceId> = self
            .by_function
            .get(&key)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        let mut effects = Effects::default();
        for id in ids {
            if self.instances[&id].state.is_winding_down() {
                effects.extend(self.remove_instance(&id, None));
            }
        }
        effects
    }

    /// Periodic work: destroy instances idle past the timeout, take back
    /// leases whose holder vanished, write off silent nodes.
    pub fn tick(&mut self, now: u64) -> Effects {
        let mut effects = Effects::default();
        let idle_before = now.saturating_sub(self.config.idle_timeout_ms);
        while let Some((last_used, id)) = self.idle.first().cloned() {
            if last_used > idle_before {
                break;
            }
            tracing::info!(instance_id = %id, idle_ms = now - last_used, "instance idle; releasing it");
            effects.extend(self.remove_instance(&id, None));
        }
        while let Some((expires, lease_id)) = self.lease_expiry.first().cloned() {
            if expires > now {
                break;
            }
            tracing::warn!(lease_id = %lease_id, "lease was never released; taking it back");
            self.leases_written_off += 1;
            // A written-off lease answers Err: nothing is left to free.
            if let Ok(e) = self.release(&lease_id, LeaseOutcome::Ok, now) {
                effects.extend(e);
            }
        }
        effects.extend(self.check_nodes(now));
        effects.extend(self.age_instances(now));
        effects.extend(self.age_nodes(now));
        effects.extend(self.reconcile_provisions(now));
        self.ticks += 1;
        if let Some(r) = self.config.rebalance {
            if self.ticks.is_multiple_of(r.every_ticks.max(1)) {
                effects.extend(self.rebalance(&r));
            }
        }
        let limits = &self.limits;
        let defaults = &self.default_limits;
        self.scale_out
            .retain(|a, b| !b.is_full(limits.get(a).unwrap_or(defaults), now));
        effects
    }

    /// Instances drained by rebalancing since start.
    pub fn rebalanced_count(&self) -> u64 {
        self.rebalanced
    }

    /// Leases taken back at expiry since start: each one a holder (a
    /// gateway) that kept a slot longer than it was granted for.
    pub fn leases_written_off_count(&self) -> u64 {
        self.leases_written_off
    }

    /// One rebalancing round (see [`RebalanceConfig`]).
    fn rebalance(&mut self, r: &RebalanceConfig) -> Effects {
        let over = |used: u64, cap: u64, pct: u64| used * 100 > pct * cap;
        let mut hot: Vec<(u64, NodeId)> = Vec::new();
        // Cool nodes with what this round already plans to put on them:
        // (id, memory, cpu, instances).
        let mut cool: Vec<(NodeId, u64, u64, usize)> = Vec::new();
        for n in self.nodes.values() {
            if !n.state.can_place() || n.capacity.memory_mb == 0 {
                continue;
            }
            if over(n.used_memory_mb, n.capacity.memory_mb, r.high_pct) {
                hot.push((n.used_memory_mb * 100 / n.capacity.memory_mb, n.id.clone()));
            } else if n.used_memory_mb * 100 < r.low_pct * n.capacity.memory_mb {
                cool.push((n.id.clone(), 0, 0, 0));
            }
        }
        if hot.is_empty() || cool.is_empty() {
            return Effects::default();
        }
        // The hottest first; ties by id, so rounds are reproducible.
        hot.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        let mut effects = Effects::default();
        let mut moves = 0;
        for (_, hot_id) in hot {
            let node = &self.nodes[&hot_id];
            let (cap, mut used) = (node.capacity.memory_mb, node.used_memory_mb);
            // The least busy first, then the least recently used.
            let mut candidates: Vec<(u32, u64, InstanceId)> = node
                .instances
                .iter()
                .map(|id| &self.instances[id])
                .filter(|i| i.state == InstanceState::Ready && !i.provisioned)
                .map(|i| (i.in_flight, i.last_used_ms, i.id.clone()))
                .collect();
            candidates.sort();
            for (_, _, id) in candidates {
                if moves >= r.max_moves || !over(used, cap, r.high_pct) {
                    break;
                }
                let inst = &self.instances[&id];
                let (memory, cpu) = (
                    u64::from(inst.spec.memory_mb),
                    u64::from(inst.spec.cpu_milli),
                );
                let spec = inst.spec.clone();
                let nodes = &self.nodes;
                let Some(target) = cool.iter_mut().find(|(c, m, p, k)| {
                    let c = &nodes[c];
                    c.accepts_spec(&spec)
                        && c.free_memory_mb() >= m + memory
                        && c.free_cpu_milli() >= p + cpu
                        && c.instances.len() + k < c.capacity.max_instances as usize
                        && !over(
                            c.used_memory_mb + m + memory,
                            c.capacity.memory_mb,
                            r.high_pct,
                        )
                }) else {
                    continue;
                };
                target.1 += memory;
                target.2 += cpu;
                target.3 += 1;
                tracing::info!(instance_id = %id, from = %hot_id, room_on = %target.0, "rebalancing: draining an instance of a hot node");
                self.update_instance(&id, |i| i.state = InstanceState::Draining);
                let record = self.instances[&id].record();
                self.changes.push(Change::UpsertInstance(record));
                effects.extend(self.destroy_if_done(&id));
                used = used.saturating_sub(memory);
                moves += 1;
                self.rebalanced += 1;
            }
            if moves >= r.max_moves {
                break;
            }
        }
        effects
    }

    fn check_nodes(&mut self, now: u64) -> Effects {
        let silent: Vec<NodeId> = self
            .nodes
            .values()
            .filter(|n| {
                n.state.is_alive() && n.last_heartbeat_ms + self.config.node_failure_after_ms <= now
            })
            .map(|n| n.id.clone())
            .collect();
        let mut effects = Effects::default();
        for id in silent {
            tracing::warn!(node_id = %id, "node stopped heartbeating; writing off its instances");
            self.unindex_node(&id);
            let node = self.nodes.get_mut(&id).expect("silent node exists");
            node.state = NodeState::Failed;
            let instances: Vec<InstanceId> = node.instances.iter().cloned().collect();
            let record = node.record();
            self.changes.push(Change::UpsertNode(record));
            let err = FcError::unavailable(format!(
                "compute node {id} stopped answering; retry the call"
            ));
            for i in instances {
                effects.extend(self.remove_instance(&i, Some(err.clone())));
            }
        }
        effects
    }

    /// Instances near their maximum validity stop taking calls (the next
    /// call starts a replacement) and go once idle; one still busy at the
    /// end of its validity is removed, its calls answered retryably.
    fn age_instances(&mut self, now: u64) -> Effects {
        let mut effects = Effects::default();
        while let Some((at, id)) = self.drain_by_age.first().cloned() {
            if at > now {
                break;
            }
            self.drain_by_age.remove(&(at, id.clone()));
            let Some(inst) = self.instances.get(&id) else {
                continue;
            };
            if inst.state.takes_calls() {
                tracing::info!(instance_id = %id, "instance near its maximum validity; draining it");
                self.update_instance(&id, |i| i.state = InstanceState::Draining);
                let record = self.instances[&id].record();
                self.changes.push(Change::UpsertInstance(record));
            }
            let expire = self.expire_at(&self.instances[&id]);
            self.expire_by_age.insert((expire, id.clone()));
            effects.extend(self.destroy_if_done(&id));
        }
        while let Some((at, id)) = self.expire_by_age.first().cloned() {
            if at > now {
                break;
            }
            self.expire_by_age.remove(&(at, id.clone()));
            tracing::warn!(instance_id = %id, "instance reached its maximum validity while busy; removing it");
            // Its node's agent is alive: the instance is destroyed there
            // too, and the calls still on it are answered retryably.
            effects.extend(self.remove_instance(&id, None));
        }
        effects
    }

    /// Nodes near their maximum validity are drained; a drained one (or
    /// one out of validity) is retired and its agent told to re-provision.
    fn age_nodes(&mut self, now: u64) -> Effects {
        let validity = self.config.node_max_validity_ms;
        let lead = self.config.node_drain_lead_ms;
        let mut to_drain = Vec::new();
        let mut to_retire = Vec::new();
        for n in self.nodes.values() {
            if !n.state.is_alive() {
                continue;
            }
            let end = n.registered_at_ms + validity;
            if n.reprovision && (n.instances.is_empty() || now >= end) {
                to_retire.push(n.id.clone());
            } else if !n.reprovision && now + lead >= end {
                to_drain.push(n.id.clone());
            }
        }
        let mut effects = Effects::default();
        for id in to_drain {
            tracing::info!(node_id = %id, "node near its maximum validity; draining it");
            self.nodes.get_mut(&id).expect("listed node").reprovision = true;
            effects.extend(self.set_draining(&id));
        }
        for id in to_retire {
            tracing::info!(node_id = %id, "node drained for re-provisioning; retiring it");
            self.unindex_node(&id);
            let node = self.nodes.get_mut(&id).expect("listed node");
            node.state = NodeState::Retired;
            let left: Vec<InstanceId> = node.instances.iter().cloned().collect();
            let record = node.record();
            self.changes.push(Change::UpsertNode(record));
            let err = FcError::unavailable(format!(
                "compute node {id} reached its maximum validity; retry the call"
            ));
            // The agent destroys everything when it re-provisions.
            for i in left {
                effects.extend(self.remove_instance(&i, Some(err.clone())));
            }
        }
        effects
    }

    // ---- nodes ----------------------------------------------------------

    fn alive_node(&self, id: &NodeId) -> Result<&Node, FcError> {
        match self.nodes.get(id) {
            Some(n) if n.state.is_alive() => Ok(n),
            Some(n) => Err(FcError::invalid_argument(format!(
                "node {id} is {}; only a ready, cordoned or draining node can change state",
                n.state.as_str()
            ))),
            None => Err(FcError::invalid_argument(format!(
                "node {id} is not registered"
            ))),
        }
    }

    fn set_state(&mut self, id: &NodeId, state: NodeState) {
        self.unindex_node(id);
        let node = self.nodes.get_mut(id).expect("checked node");
        node.state = state;
        let record = node.record();
        self.index_node(id);
        self.changes.push(Change::UpsertNode(record));
    }

    /// The node's certificate was revoked: it is untrusted from now on.
    /// Its instances are written off at once (their calls answered
    /// retryably, replacements start elsewhere: provisioned ones at the
    /// next tick, on-demand ones with the next call) and it is retired, so
    /// its id is never placed on again. Answers how many instances went.
    /// A node not (yet) known is a no-op: the revocation still refuses it.
    pub fn revoke_node(&mut self, id: &NodeId) -> (usize, Effects) {
        let Some(node) = self.nodes.get(id) else {
            return (0, Effects::default());
        };
        let instances: Vec<InstanceId> = node.instances.iter().cloned().collect();
        self.unindex_node(id);
        let node = self.nodes.get_mut(id).expect("known node");
        node.state = NodeState::Retired;
        let record = node.record();
        self.changes.push(Change::UpsertNode(record));
        let err = FcError::unavailable(format!("compute node {id} was revoked; retry the call"));
        let mut effects = Effects::default();
        for i in &instances {
            effects.extend(self.remove_instance(i, Some(err.clone())));
        }
        // Nothing is sent to a revoked node: its agent is not trusted to
        // act on it, and its certificate no longer passes our verifier.
        effects.destroy.retain(|d| d.node_id != *id);
        tracing::warn!(node_id = %id, instances = instances.len(), "node revoked; its instances are written off");
        (instances.len(), effects)
    }

    /// No new instances on the node; its instances keep serving.
    pub fn cordon(&mut self, id: &NodeId) -> Result<(), FcError> {
        if self.alive_node(id)?.state == NodeState::Ready {
            self.set_state(id, NodeState::Cordoned);
            tracing::info!(node_id = %id, "node cordoned");
        }
        Ok(())
    }

    /// No new instances, and no new calls on its instances: each goes once
    /// its calls end.
    pub fn drain(&mut self, id: &NodeId) -> Result<Effects, FcError> {
        self.alive_node(id)?;
        tracing::info!(node_id = %id, "node draining");
        Ok(self.set_draining(id))
    }

    fn set_draining(&mut self, id: &NodeId) -> Effects {
        self.set_state(id, NodeState::Draining);
        let ids: Vec<InstanceId> = self.nodes[id].instances.iter().cloned().collect();
        let mut effects = Effects::default();
        for i in ids {
            if !self.instances[&i].state.takes_calls() {
                continue;
            }
            self.update_instance(&i, |inst| inst.state = InstanceState::Draining);
            let record = self.instances[&i].record();
            self.changes.push(Change::UpsertInstance(record));
            effects.extend(self.destroy_if_done(&i));
        }
        effects
    }

    /// Take new instances again (instances already draining still go). A
    /// node drained for its validity is drained again at the next tick.
    pub fn uncordon(&mut self, id: &NodeId) -> Result<(), FcError> {
        self.alive_node(id)?;
        self.nodes.get_mut(id).expect("checked node").reprovision = false;
        self.set_state(id, NodeState::Ready);
        tracing::info!(node_id = %id, "node uncordoned");
        Ok(())
    }

    /// The agent URL of `id` while the node is alive (ready, cordoned or
    /// draining).
    pub fn live_agent_url(&self, id: &NodeId) -> Option<&str> {
        self.nodes
            .get(id)
            .filter(|n| n.state.is_alive())
            .map(|n| n.agent_url.as_str())
    }

    /// The spec of `instance` if it is placed on `node` (starting, ready
    /// or draining).
    pub fn placed_on(&self, node: &NodeId, instance: &InstanceId) -> Option<&InstanceSpec> {
        self.instances
            .get(instance)
            .filter(|i| i.node_id == *node)
            .map(|i| &*i.spec)
    }

    /// Whether an instance placed on `node` uses the code package or layer
    /// `digest`.
    pub fn node_uses_code(&self, node: &NodeId, digest: &str) -> bool {
        let Some(n) = self.nodes.get(node) else {
            return false;
        };
        n.instances
            .iter()
            .filter_map(|i| self.instances.get(i))
            .any(|i| i.spec.code_digest == digest || i.spec.layers.iter().any(|l| l == digest))
    }

    /// An agent (re)joins. It keeps the id it sends back; the instances it
    /// reports are reconciled with the scheduler's view.
    pub fn register(&mut self, req: &RegisterNode, now: u64) -> Result<Registered, FcError> {
        check_registration(req)?;
        let retired = req.node_id.as_ref().is_some_and(|id| {
            self.nodes
                .get(id)
                .is_some_and(|n| n.state == NodeState::Retired)
        });
        let id = match &req.node_id {
            // A node names itself (its certificate does): a retired one
            // that comes back after re-provisioning starts a new validity.
            Some(id) => id.clone(),
            None => loop {
                let id = NodeId::generate();
                if !self.nodes.contains_key(&id) {
                    break id;
                }
            },
        };
        let mut effects = Effects::default();
        if self.nodes.contains_key(&id) {
            self.unindex_node(&id);
            // A node that comes back with another tenancy or dedicated
            // account cannot keep what it ran: the instances are written
            // off, and the report below gets them destroyed.
            let node = &self.nodes[&id];
            let changed = node.labels.tenancy != req.labels.tenancy
                || (req.labels.dedicated_account.is_some()
                    && node.bound_account.is_some()
                    && node.bound_account != req.labels.dedicated_account);
            if changed && !node.instances.is_empty() {
                tracing::warn!(node_id = %id, "node registered with new tenancy; writing off its instances");
                let lost: Vec<InstanceId> = node.instances.iter().cloned().collect();
                let err = FcError::unavailable(format!(
                    "compute node {id} changed its tenancy; retry the call"
                ));
                for i in lost {
                    effects.extend(self.remove_instance(&i, Some(err.clone())));
                }
                self.unindex_node(&id);
            }
            let node = self.nodes.get_mut(&id).expect("known node");
            if changed {
                node.bound_account = None;
            }
            node.agent_url = req.agent_url.clone();
            node.capacity = req.capacity.clone();
            node.labels = req.labels.clone();
            if req.labels.tenancy == Tenancy::MultiTenant {
                node.bound_account = None;
            } else if req.labels.dedicated_account.is_some() {
                node.bound_account = req.labels.dedicated_account.clone();
            }
            if retired {
                node.registered_at_ms = now;
                node.reprovision = false;
            }
            // Cordoned and draining nodes stay so across an agent restart.
            if !node.state.is_alive() {
                node.state = NodeState::Ready;
            }
            node.last_heartbeat_ms = now;
        } else {
            self.nodes.insert(
                id.clone(),
                Node {
                    id: id.clone(),
                    agent_url: req.agent_url.clone(),
                    capacity: req.capacity.clone(),
                    labels: req.labels.clone(),
                    bound_account: req.labels.dedicated_account.clone(),
                    state: NodeState::Ready,
                    last_heartbeat_ms: now,
                    registered_at_ms: now,
                    reprovision: false,
                    used_memory_mb: 0,
                    used_cpu_milli: 0,
                    instances: HashSet::new(),
                },
            );
        }
        self.index_node(&id);
        let record = self.nodes[&id].record();
        self.changes.push(Change::UpsertNode(record));
        tracing::info!(node_id = %id, agent_url = %req.agent_url, "node registered");
        let (destroy, e) = self.reconcile(&id, &req.instances, now);
        effects.extend(e);
        Ok(Registered {
            node_id: id,
            destroy,
            effects,
        })
    }

    pub fn heartbeat(
        &mut self,
        id: &NodeId,
        reported: &[InstanceId],
        now: u64,
    ) -> HeartbeatOutcome {
        match self.nodes.get_mut(id) {
            Some(n) if n.state.is_alive() => n.last_heartbeat_ms = now,
            Some(n) if n.state == NodeState::Retired => {
                return HeartbeatOutcome {
                    destroy: Vec::new(),
                    reregister: false,
                    reprovision: true,
                    effects: Effects::default(),
                }
            }
            _ => {
                return HeartbeatOutcome {
                    destroy: Vec::new(),
                    reregister: true,
                    reprovision: false,
                    effects: Effects::default(),
                }
            }
        }
        let (destroy, effects) = self.reconcile(id, reported, now);
        HeartbeatOutcome {
            destroy,
            reregister: false,
            reprovision: false,
            effects,
        }
    }

    /// Compare an agent's report with the scheduler's view: what the agent
    /// runs and the scheduler does not know is to be destroyed; what the
    /// scheduler placed there and the agent no longer runs is forgotten.
    fn reconcile(
        &mut self,
        node_id: &NodeId,
        reported: &[InstanceId],
        now: u64,
    ) -> (Vec<InstanceId>, Effects) {
        let destroy: Vec<InstanceId> = reported
            .iter()
            .filter(|id| self.instances.get(id).is_none_or(|i| &i.node_id != node_id))
            .cloned()
            .collect();
        let reported: HashSet<&InstanceId> = reported.iter().collect();
        let grace = self.config.reconcile_grace_ms;
        let lost: Vec<InstanceId> = self.nodes[node_id]
            .instances
            .iter()
            .filter(|id| !reported.contains(id))
            .filter(|id| {
                self.instances[*id]
                    .ready_at_ms
                    .is_some_and(|at| at + grace <= now)
            })
            .cloned()
            .collect();
        let mut effects = Effects::default();
        for id in lost {
            tracing::warn!(node_id = %node_id, instance_id = %id, "agent no longer runs instance; forgetting it");
            let err =
                FcError::unavailable("the instance serving this call was lost; retry the call");
            effects.extend(self.remove_instance(&id, Some(err)));
        }
        if !destroy.is_empty() {
            tracing::info!(node_id = %node_id, count = destroy.len(), "agent runs unknown instances; asking it to destroy them");
        }
        (destroy, effects)
    }

    // ---- views ----------------------------------------------------------

    pub fn node_info(&self, id: &NodeId) -> Option<NodeInfo> {
        self.nodes.get(id).map(node_info)
    }

    pub fn nodes_info(&self) -> Vec<NodeInfo> {
        let mut v: Vec<NodeInfo> = self.nodes.values().map(node_info).collect();
        v.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        v
    }

    pub fn instances_info(&self) -> Vec<InstanceInfo> {
        let mut v: Vec<InstanceInfo> = self
            .instances
            .values()
            .map(|i| InstanceInfo {
                instance_id: i.id.clone(),
                account_id: i.spec.account_id.clone(),
                function_name: i.spec.function_name.clone(),
                revision: i.spec.revision.clone(),
                node_id: Some(i.node_id.clone()),
                in_flight: i.in_flight,
                concurrency: i.spec.concurrency,
                created_at_ms: i.created_at_ms,
                last_used_ms: i.last_used_ms,
                always_allocate_cpu: self.always_allocates_cpu(i),
            })
            .collect();
        v.sort_by(|a, b| {
            (
                &a.account_id,
                &a.function_name,
                a.created_at_ms,
                &a.instance_id,
            )
                .cmp(&(
                    &b.account_id,
                    &b.function_name,
                    b.created_at_ms,
                    &b.instance_id,
                ))
        });
        v
    }

    // ---- index upkeep ---------------------------------------------------

    fn insert_instance(&mut self, inst: Instance) {
        let id = inst.id.clone();
        let key = (
            inst.spec.account_id.clone(),
            inst.spec.function_name.clone(),
        );
        let usage = self.per_account.entry(key.0.clone()).or_default();
        usage.instances += 1;
        usage.memory_mb += u64::from(inst.spec.memory_mb);
        usage.cpu_milli += u64::from(inst.spec.cpu_milli);
        if inst.in_flight > 0 {
            *self.fn_in_flight.entry(key.clone()).or_default() += inst.in_flight;
        }
        self.by_function.entry(key).or_default().insert(id.clone());
        self.unindex_node(&inst.node_id);
        let node = self
            .nodes
            .get_mut(&inst.node_id)
            .expect("instance's node exists");
        node.used_memory_mb += u64::from(inst.spec.memory_mb);
        node.used_cpu_milli += u64::from(inst.spec.cpu_milli);
        node.instances.insert(id.clone());
        let node_id = inst.node_id.clone();
        self.instances.insert(id.clone(), inst);
        self.index_node(&node_id);
        self.index_instance(&id);
        let inst = &self.instances[&id];
        let drain_at = self.drain_at(inst);
        if inst.state.takes_calls() {
            self.drain_by_age.insert((drain_at, id.clone()));
        }
        let record = self.instances[&id].record();
        self.changes.push(Change::UpsertInstance(record));
    }

    /// When age makes an instance stop taking calls: early enough for a
    /// call accepted just before to finish within its timeout.
    fn drain_at(&self, i: &Instance) -> u64 {
        (i.created_at_ms + self.config.instance_max_validity_ms)
            .saturating_sub(self.config.instance_drain_lead_ms + u64::from(i.spec.timeout_s) * 1000)
    }

    fn expire_at(&self, i: &Instance) -> u64 {
        i.created_at_ms + self.config.instance_max_validity_ms
    }

    /// Forget an instance and give its node's room back. Its remaining
    /// leases are written off; if it was starting, its waiters fail with
    /// `abort_error`. Asks the agent to destroy it when `abort_error` is
    /// `None` (the agent is presumed alive) and its node is Ready.
    fn remove_instance(&mut self, id: &InstanceId, abort_error: Option<FcError>) -> Effects {
        let mut effects = Effects::default();
        self.unindex_instance(id);
        let Some(inst) = self.instances.remove(id) else {
            return effects;
        };
        self.drain_by_age
            .remove(&(self.drain_at(&inst), id.clone()));
        self.expire_by_age
            .remove(&(self.expire_at(&inst), id.clone()));
        for l in &inst.leases {
            if let Some(rec) = self.leases.get_mut(l) {
                rec.written_off = true;
            }
        }
        let key = (
            inst.spec.account_id.clone(),
            inst.spec.function_name.clone(),
        );
        if let Some(u) = self.per_account.get_mut(&key.0) {
            u.instances -= 1;
            u.memory_mb -= u64::from(inst.spec.memory_mb);
            u.cpu_milli -= u64::from(inst.spec.cpu_milli);
            if u.instances == 0 {
                self.per_account.remove(&key.0);
            }
        }
        self.add_in_flight(&key, -i64::from(inst.in_flight));
        if let Some(set) = self.by_function.get_mut(&key) {
            set.remove(id);
            if set.is_empty() {
                self.by_function.remove(&key);
            }
        }
        let was_indexed = self
            .nodes
            .get(&inst.node_id)
            .is_some_and(|n| n.state.can_place());
        self.unindex_node(&inst.node_id);
        if let Some(node) = self.nodes.get_mut(&inst.node_id) {
            node.used_memory_mb = node
                .used_memory_mb
                .saturating_sub(u64::from(inst.spec.memory_mb));
            node.used_cpu_milli = node
                .used_cpu_milli
                .saturating_sub(u64::from(inst.spec.cpu_milli));
            node.instances.remove(id);
            if abort_error.is_none() && node.state.is_alive() {
                effects.destroy.push(Destroy {
                    instance_id: id.clone(),
                    node_id: node.id.clone(),
                    agent_url: node.agent_url.clone(),
                });
            }
        }
        if was_indexed {
            self.index_node(&inst.node_id);
        }
        if inst.ready_at_ms.is_none() {
            let err = abort_error.unwrap_or_else(|| {
                FcError::unavailable("the instance was removed before it started; retry the call")
            });
            effects.aborted_starts.push((id.clone(), err));
        }
        self.changes.push(Change::DeleteInstance(id.clone()));
        effects
    }

    /// Apply `f` to an instance, keeping the room and idle indexes right.
    fn update_instance(&mut self, id: &InstanceId, f: impl FnOnce(&mut Instance)) {
        self.unindex_instance(id);
        let mut moved = None;
        if let Some(i) = self.instances.get_mut(id) {
            let before = i.in_flight;
            f(i);
            if i.in_flight != before {
                let key = (i.spec.account_id.clone(), i.spec.function_name.clone());
                moved = Some((key, i64::from(i.in_flight) - i64::from(before)));
            }
        }
        if let Some((key, delta)) = moved {
            self.add_in_flight(&key, delta);
        }
        self.index_instance(id);
    }

    fn add_in_flight(&mut self, key: &FnKey, delta: i64) {
        if delta == 0 {
            return;
        }
        if delta > 0 {
            *self.fn_in_flight.entry(key.clone()).or_default() += delta as u32;
        } else if let Some(n) = self.fn_in_flight.get_mut(key) {
            *n = n.saturating_sub(delta.unsigned_abs() as u32);
            if *n == 0 {
                self.fn_in_flight.remove(key);
            }
        }
    }

    fn index_instance(&mut self, id: &InstanceId) {
        let Some(i) = self.instances.get(id) else {
            return;
        };
        if i.has_room() {
            self.room
                .entry((i.spec.account_id.clone(), i.spec.function_name.clone()))
                .or_default()
                .entry(i.spec.revision.clone())
                .or_default()
                .insert((i.in_flight, id.clone()));
        }
        if i.is_idle() {
            self.idle.insert((i.last_used_ms, id.clone()));
        }
    }

    fn unindex_instance(&mut self, id: &InstanceId) {
        let Some(i) = self.instances.get(id) else {
            return;
        };
        if i.has_room() {
            let key = (i.spec.account_id.clone(), i.spec.function_name.clone());
            if let Some(revs) = self.room.get_mut(&key) {
                if let Some(set) = revs.get_mut(&i.spec.revision) {
                    set.remove(&(i.in_flight, id.clone()));
                    if set.is_empty() {
                        revs.remove(&i.spec.revision);
                    }
                }
                if revs.is_empty() {
                    self.room.remove(&key);
                }
            }
        }
        if i.is_idle() {
            self.idle.remove(&(i.last_used_ms, id.clone()));
        }
    }

    fn index_node(&mut self, id: &NodeId) {
        let Some(n) = self.nodes.get(id) else { return };
        if n.state.can_place() {
            self.free_memory
                .entry(n.free_memory_mb())
                .or_default()
                .insert(id.clone());
        }
    }

    fn unindex_node(&mut self, id: &NodeId) {
        let Some(n) = self.nodes.get(id) else { return };
        let free = n.free_memory_mb();
        if let Some(set) = self.free_memory.get_mut(&free) {
            set.remove(id);
            if set.is_empty() {
                self.free_memory.remove(&free);
            }
        }
    }
}

fn node_info(n: &Node) -> NodeInfo {
    let mut labels = n.labels.clone();
    if labels.tenancy == Tenancy::Dedicated {
        labels.dedicated_account = n.bound_account.clone();
    }
    NodeInfo {
        node_id: n.id.clone(),
        agent_url: n.agent_url.clone(),
        capacity: n.capacity.clone(),
        labels,
        state: n.state.as_str().to_owned(),
        instances: n.instances.len() as u32,
        memory_used_mb: n.used_memory_mb,
        last_heartbeat_ms: n.last_heartbeat_ms,
    }
}

/// A spec from the network is checked before it shapes any decision.
fn check_spec(spec: &InstanceSpec) -> Result<(), FcError> {
    if !spec.is_sealed() {
        return Err(FcError::invalid_argument(
            "spec.revision does not match the spec's content",
        ));
    }
    if !(CONCURRENCY_MIN..=CONCURRENCY_MAX).contains(&spec.concurrency) {
        return Err(FcError::invalid_argument(format!(
            "spec.concurrency must be between {CONCURRENCY_MIN} and {CONCURRENCY_MAX}"
        )));
    }
    if spec.memory_mb == 0 || spec.cpu_milli == 0 {
        return Err(FcError::invalid_argument(
            "spec.memory_mb and spec.cpu_milli must be positive",
        ));
    }
    Ok(())
}

fn check_registration(req: &RegisterNode) -> Result<(), FcError> {
    let url_ok = req
        .agent_url
        .parse::<http::Uri>()
        .ok()
        .is_some_and(|u| u.scheme_str() == Some("https") && u.host().is_some());
    if !url_ok {
        return Err(FcError::invalid_argument(format!(
            "agent_url {:?} is not an https://host:port URL",
            req.agent_url.chars().take(200).collect::<String>()
        )));
    }
    let c = &req.capacity;
    if c.memory_mb == 0 || c.cpu_milli == 0 || c.max_instances == 0 {
        return Err(FcError::invalid_argument(
            "capacity.memory_mb, capacity.cpu_milli and capacity.max_instances must be positive",
        ));
    }
    let kind = sandbox_kind_for(req.labels.tenancy);
    if !req.labels.sandbox_kinds.contains(&kind) {
        return Err(FcError::invalid_argument(format!(
            "a {:?} node must offer {:?} sandboxes",
            req.labels.tenancy, kind
        )));
    }
    if req.labels.tenancy == Tenancy::MultiTenant && req.labels.dedicated_account.is_some() {
        return Err(FcError::invalid_argument(
            "a multi-tenant node cannot have a dedicated_account",
        ));
    }
    if req.labels.runtimes.as_ref().is_some_and(Vec::is_empty) {
        return Err(FcError::invalid_argument(
            "labels.runtimes must name at least one runtime (or be absent)",
        ));
    }
    if req.labels.zone.is_empty() || req.labels.zone.len() > 64 {
        return Err(FcError::invalid_argument(
            "labels.zone must be 1 to 64 characters",
        ));
    }
    Ok(())
}
