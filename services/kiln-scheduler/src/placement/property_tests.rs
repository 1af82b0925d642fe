//! Randomised test: thousands of random placements, releases, ticks,
//! registrations, operator actions and limit changes over a mix of
//! multi-tenant and dedicated nodes; after every step, tenancy, capacity
//! and every quota hold, and the indexes agree with the records.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use kiln_core::{AccountId, Clock, FunctionName, InstanceSpec, ManualClock, SandboxKind};
use kiln_internal_api::{
    AccountLimits, FunctionLimits, Lease, LeaseOutcome, ProvisionConfig, Tenancy,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::tests::{registration, spec};
use super::*;

const ACCOUNTS: u32 = 6;
const FUNCTIONS: u32 = 5;
const NODES: u32 = 8;

struct World {
    p: Placement,
    clock: ManualClock,
    rng: StdRng,
    leases: Vec<Lease>,
    /// Starts the fake agent has not answered yet.
    pending: Vec<InstanceId>,
    /// Per account, when each instance was placed (for the scale-out
    /// buckets' conformance).
    placed_at: HashMap<AccountId, VecDeque<(u64, u64)>>,
    placements: usize,
    throttled: usize,
}

fn random_limits(rng: &mut StdRng) -> AccountLimits {
    let burst = rng.gen_range(2..=12);
    let mut functions = std::collections::BTreeMap::new();
    let mut reserved_left = burst / 2;
    for f in 0..FUNCTIONS {
        if rng.gen_bool(0.3) {
            let reserved = if reserved_left > 0 && rng.gen_bool(0.5) {
                let r = rng.gen_range(0..=reserved_left);
                reserved_left -= r;
                Some(r)
            } else {
                None
            };
            let max = rng.gen_bool(0.5).then(|| rng.gen_range(1..=6));
            functions.insert(
                format!("f{f}").parse::<FunctionName>().unwrap(),
                FunctionLimits {
                    reserved_concurrency: reserved,
                    max_concurrency: max,
                },
            );
        }
    }
    AccountLimits {
        burst_instances: burst,
        memory_quota_mb: rng.gen_range(256..=8192),
        vcpu_quota_milli: rng.gen_range(200..=4000),
        scale_out_instances_per_minute: rng.gen_range(1..=20),
        scale_out_vcpus_per_minute: rng.gen_range(1..=2),
        functions,
    }
}

impl World {
    fn new(seed: u64) -> Self {
        let config = PlacementConfig {
            idle_timeout_ms: 30_000,
            node_failure_after_ms: 20_000,
            reconcile_grace_ms: 5_000,
            lease_grace_ms: 10_000,
            node_max_validity_ms: 3_600_000,
            node_drain_lead_ms: 600_000,
            instance_max_validity_ms: 1_800_000,
            instance_drain_lead_ms: 60_000,
            // Odd seeds rebalance often, with tight watermarks, so its
            // moves and its placement preference are exercised too.
            rebalance: (seed % 2 == 1).then_some(super::RebalanceConfig {
                every_ticks: 3,
                high_pct: 60,
                low_pct: 40,
                max_moves: 5,
            }),
            ..PlacementConfig::default()
        };
        Self {
            p: Placement::new(config),
            clock: ManualClock::new(1_000_000),
            rng: StdRng::seed_from_u64(seed),
            leases: Vec::new(),
            pending: Vec::new(),
            placed_at: HashMap::new(),
            placements: 0,
            throttled: 0,
        }
    }

    fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    fn random_spec(&mut self) -> InstanceSpec {
        let a = self.rng.gen_range(1..=ACCOUNTS);
        let f = self.rng.gen_range(0..FUNCTIONS);
        // Same function, same shape: one revision per function.
        let concurrency = 1 + (a + f) % 3;
        spec(
            &a.to_string(),
            &format!("f{f}"),
            concurrency,
            [256, 512, 1024][((a * 7 + f) % 3) as usize],
        )
    }

    fn register(&mut self) {
        let n = self.rng.gen_range(0..NODES);
        let tenancy = if self.rng.gen_bool(0.5) {
            Tenancy::MultiTenant
        } else {
            Tenancy::Dedicated
        };
        let preset = (tenancy == Tenancy::Dedicated && self.rng.gen_bool(0.3))
            .then(|| self.rng.gen_range(1..=ACCOUNTS).to_string());
        let mut r = registration(
            Some(&format!("n{n}")),
            self.rng.gen_range(2..=8) * 1024,
            tenancy,
            preset.as_deref(),
        );
        r.capacity.max_instances = self.rng.gen_range(2..=10);
        // Report what the scheduler placed there, mostly.
        if let Some(node) = self.p.node(&r.node_id.clone().unwrap()) {
            r.instances = node.instances.iter().cloned().collect();
        }
        let now = self.now();
        // A node names itself (its certificate does): one whose id was
        // retired comes back under the same id with a new validity.
        let _ = self.p.register(&r, now);
    }

    fn acquire(&mut self) {
        let s = self.random_spec();
        let before = self.p.instance_count();
        let now = self.now();
        match self.p.acquire(&s, now) {
            Ok(acquired) => {
                if let Acquired::Starting {
                    create: Some(job), ..
                } = &acquired
                {
                    self.pending.push(job.instance_id.clone());
                    self.placements += 1;
                    self.placed_at
                        .entry(s.account_id.clone())
                        .or_default()
                        .push_back((now, u64::from(s.cpu_milli)));
                    assert_eq!(self.p.instance_count(), before + 1);
                    self.check_new_instance(&job.instance_id);
                }
                self.check_concurrency(&s);
                self.leases.push(acquired.lease().clone());
            }
            Err(e) => {
                assert!(
                    matches!(
                        e.code,
                        kiln_core::FcErrorCode::ResourceThrottled
                            | kiln_core::FcErrorCode::ServiceUnavailable
                    ),
                    "{e:?}"
                );
                assert_eq!(self.p.instance_count(), before, "a refusal changes nothing");
                self.throttled += 1;
            }
        }
    }

    fn step(&mut self) {
        let now = self.now();
        match self.rng.gen_range(0..100) {
            0..=39 => self.acquire(),
            40..=59 => {
                if !self.leases.is_empty() {
                    let i = self.rng.gen_range(0..self.leases.len());
                    let l = self.leases.swap_remove(i);
                    let outcome = if self.rng.gen_bool(0.1) {
                        LeaseOutcome::InstanceFailed
                    } else {
                        LeaseOutcome::Ok
                    };
                    let _ = self.p.release(&l.lease_id, outcome, now);
                }
            }
            60..=71 => {
                if !self.pending.is_empty() {
                    let i = self.rng.gen_range(0..self.pending.len());
                    let id = self.pending.swap_remove(i);
                    if self.rng.gen_bool(0.9) {
                        self.p.instance_started(&id, now);
                    } else {
                        self.p.instance_start_failed(&id);
                    }
                }
            }
            72..=79 => {
                let ms = [10, 500, 5_000, 30_000, 200_000][self.rng.gen_range(0..5)];
                self.clock.advance(Duration::from_millis(ms));
                // Most nodes heartbeat; a silent one fails.
                let alive: Vec<NodeId> = self
                    .p
                    .nodes
                    .values()
                    .filter(|n| n.state.is_alive())
                    .map(|n| n.id.clone())
                    .collect();
                let now = self.now();
                for id in alive {
                    if self.rng.gen_bool(0.95) {
                        let reported: Vec<InstanceId> =
                            self.p.nodes[&id].instances.iter().cloned().collect();
                        self.p.heartbeat(&id, &reported, now);
                    }
                }
                let e = self.p.tick(now);
                self.created(&e);
            }
            94..=96 => {
                // Provisioned instances: placed by the scheduler itself.
                let s = self.random_spec();
                if self.rng.gen_bool(0.25) {
                    self.p.delete_provision(
                        &s.account_id,
                        &s.function_name,
                        kiln_internal_api::LATEST,
                    );
                } else {
                    let target = self.rng.gen_range(0..=4);
                    let config = ProvisionConfig {
                        target,
                        always_allocate_cpu: false,
                        scheduled_actions: vec![],
                        target_tracking_policies: vec![],
                    };
                    let e = self
                        .p
                        .put_provision(&s, kiln_internal_api::LATEST, config, now)
                        .unwrap();
                    self.created(&e);
                }
            }
            80..=87 => self.register(),
            88..=93 => {
                let id: NodeId = format!("n{}", self.rng.gen_range(0..NODES))
                    .parse()
                    .unwrap();
                let _ = match self.rng.gen_range(0..3) {
                    0 => self.p.cordon(&id),
                    1 => self.p.drain(&id).map(|_| ()),
                    _ => self.p.uncordon(&id),
                };
            }
            _ => {
                let a: AccountId = self
                    .rng
                    .gen_range(1..=ACCOUNTS)
                    .to_string()
                    .parse()
                    .unwrap();
                let l = random_limits(&mut self.rng);
                self.p.set_account_limits(&a, Some(l)).unwrap();
                // The buckets conform from here on.
                self.placed_at.remove(&a);
            }
        }
        self.p.take_changes();
        self.check_invariants();
    }

    /// Instances the scheduler placed on its own (provisioned).
    fn created(&mut self, e: &Effects) {
        let now = self.now();
        for job in &e.create {
            self.pending.push(job.instance_id.clone());
            self.placements += 1;
            self.placed_at
                .entry(job.spec.account_id.clone())
                .or_default()
                .push_back((now, u64::from(job.spec.cpu_milli)));
            self.check_new_instance(&job.instance_id);
        }
    }

    /// A new instance fits every limit of its account.
    fn check_new_instance(&self, id: &InstanceId) {
        let inst = &self.p.instances[id];
        let a = &inst.spec.account_id;
        let f = &inst.spec.function_name;
        let n = &self.p.nodes[&inst.node_id];
        assert!(n.state.can_place(), "placed on a node that takes instances");
        assert!(n.used_memory_mb <= n.capacity.memory_mb, "node memory");
        assert!(n.used_cpu_milli <= n.capacity.cpu_milli, "node cpu");
        assert!(n.instances.len() <= n.capacity.max_instances as usize);
        let l = self.p.account_limits(a);
        let u = self.p.account_usage(a);
        assert!(u.instances <= l.burst_instances, "burst pool");
        assert!(u.memory_mb <= l.memory_quota_mb, "memory quota");
        assert!(u.cpu_milli <= l.vcpu_quota_milli, "vCPU quota");
        let count = |name: &FunctionName| self.p.fn_instances(a, name);
        match l.functions.get(f).and_then(|x| x.reserved_concurrency) {
            Some(r) => assert!(count(f) <= r, "reserved concurrency"),
            None => {
                let (mut total, mut used) = (0, 0);
                for (name, x) in &l.functions {
                    if let Some(r) = x.reserved_concurrency {
                        total += r;
                        used += count(name);
                    }
                }
                assert!(
                    u.instances - used <= l.burst_instances - total,
                    "shared pool"
                );
            }
        }
        // Token bucket conformance: over every window ending now, placed
        // instances <= bucket size + rate x window.
        let times = &self.placed_at[a];
        let now = self.now();
        let per_min = u64::from(l.scale_out_instances_per_minute);
        let cpu_per_min = u64::from(l.scale_out_vcpus_per_minute) * 1000;
        let mut cpu = 0;
        for (k, (t, c)) in times.iter().rev().enumerate().take(64) {
            let n = k as u64 + 1;
            cpu += c;
            assert!(
                n * 60_000 <= per_min * 60_000 + per_min * (now - t),
                "scale-out rate: {n} instances since {t} at {per_min}/min"
            );
            assert!(
                cpu * 60_000 <= cpu_per_min * 60_000 + cpu_per_min * (now - t),
                "scale-out rate: {cpu} millicores since {t} at {cpu_per_min}/min"
            );
        }
    }

    fn check_concurrency(&self, s: &InstanceSpec) {
        let l = self.p.account_limits(&s.account_id);
        if let Some(max) = l
            .functions
            .get(&s.function_name)
            .and_then(|f| f.max_concurrency)
        {
            let key = (s.account_id.clone(), s.function_name.clone());
            assert!(
                self.p.fn_in_flight.get(&key).copied().unwrap_or(0) <= max,
                "max concurrency"
            );
        }
    }

    fn check_invariants(&self) {
        let p = &self.p;
        let mut usage: HashMap<&AccountId, AccountUsage> = HashMap::new();
        let mut in_flight: HashMap<FnKey, u32> = HashMap::new();
        for n in p.nodes.values() {
            let (mut mem, mut cpu) = (0, 0);
            if !n.state.is_alive() {
                assert!(n.instances.is_empty(), "a dead node holds no instances");
            }
            let kind = sandbox_kind_for(n.labels.tenancy);
            let mut accounts = std::collections::HashSet::new();
            for id in &n.instances {
                let i = &p.instances[id];
                assert_eq!(&i.node_id, &n.id);
                // Tenancy: multi-tenant nodes run microVMs only, dedicated
                // nodes containers of one account only.
                assert_eq!(i.sandbox, kind, "sandbox kind matches tenancy");
                match n.labels.tenancy {
                    Tenancy::MultiTenant => assert_eq!(i.sandbox, SandboxKind::Microvm),
                    Tenancy::Dedicated => {
                        assert_eq!(i.sandbox, SandboxKind::Container);
                        assert_eq!(
                            n.bound_account.as_ref(),
                            Some(&i.spec.account_id),
                            "a dedicated node serves its one account"
                        );
                    }
                }
                accounts.insert(&i.spec.account_id);
                mem += u64::from(i.spec.memory_mb);
                cpu += u64::from(i.spec.cpu_milli);
            }
            if n.labels.tenancy == Tenancy::Dedicated {
                assert!(accounts.len() <= 1);
            }
            // (A node may come back with less capacity than it uses: it
            // then takes nothing new; see check_new_instance.)
            assert_eq!(n.used_memory_mb, mem);
            assert_eq!(n.used_cpu_milli, cpu);
            let indexed = p.free_memory.values().any(|s| s.contains(&n.id));
            assert_eq!(indexed, n.state.can_place(), "free-memory index");
        }
        for i in p.instances.values() {
            let u = usage.entry(&i.spec.account_id).or_default();
            u.instances += 1;
            u.memory_mb += u64::from(i.spec.memory_mb);
            u.cpu_milli += u64::from(i.spec.cpu_milli);
            if i.in_flight > 0 {
                *in_flight
                    .entry((i.spec.account_id.clone(), i.spec.function_name.clone()))
                    .or_default() += i.in_flight;
            }
            assert_eq!(i.in_flight as usize, i.leases.len());
        }
        assert_eq!(usage.len(), p.per_account.len());
        for (a, u) in usage {
            assert_eq!(p.per_account[a], u, "account usage of {a}");
        }
        assert_eq!(in_flight, p.fn_in_flight, "in-flight per function");
    }
}

#[test]
fn tenancy_and_quotas_hold_over_thousands_of_random_placements() {
    let mut total_placements = 0;
    let mut total_throttled = 0;
    let mut total_rebalanced = 0;
    for seed in 0..8 {
        let mut w = World::new(seed);
        for _ in 0..NODES {
            w.register();
        }
        for _ in 0..3_000 {
            w.step();
        }
        total_placements += w.placements;
        total_throttled += w.throttled;
        total_rebalanced += w.p.rebalanced_count();
    }
    // The walk really exercised both sides. The counts vary a little from
    // process to process (hash maps iterate in a random order), so the
    // floors are well below what a run sees (rebalancing: 4 to 13 moves
    // since a node keeps its certificate's id when it comes back, where a
    // fresh id per return made more cool nodes and 18 to 30 moves).
    assert!(total_placements > 2_000, "{total_placements} placements");
    assert!(total_throttled > 500, "{total_throttled} refusals");
    assert!(
        total_rebalanced >= 2,
        "{total_rebalanced} rebalancing moves"
    );
}
