//! `kiln-scheduler simulate`: the real placement core against in-process
//! fake agents, on a simulated clock.
//!
//! Two parts:
//! - [`bench`]: decision throughput. A populated cluster (100 nodes, 10,000
//!   functions, 50,000 instances by default) takes acquire-and-release pairs
//!   as fast as one thread can issue them, with a window of calls in flight;
//!   every pair is timed.
//! - [`simulate`]: a generated trace (steady, diurnal or bursty load over
//!   many small and a few hot functions) is replayed as a discrete-event
//!   simulation. Time is the simulation's own (passed to the core like the
//!   injected clock), so hours run in seconds; the fake agents start an
//!   instance after a simulated cold-start delay and calls end after their
//!   simulated duration. Scheduling latency is the wall-clock time the core
//!   takes to decide each acquire.
//!
//! Both drive [`Placement`] directly: the service around it adds a mutex,
//! a channel to the write-behind store and agent calls, none of which
//! change the decisions measured here.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::time::Instant;

use kiln_core::{FcErrorCode, InstanceId, InstanceSpec, LeaseId, RuntimeName};
use kiln_internal_api::{
    AccountLimits, LeaseOutcome, NodeCapacity, NodeLabels, RegisterNode, Tenancy,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::placement::{sandbox_kind_for, Acquired, Placement, PlacementConfig};

/// Latency percentiles over a set of timings, in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Percentiles {
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
}

impl Percentiles {
    /// Sorts `samples`.
    pub fn of(samples: &mut [u64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Self {
            p50_ns: at(0.50),
            p99_ns: at(0.99),
            p999_ns: at(0.999),
            max_ns: *samples.last().expect("not empty"),
        }
    }
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// A spec for the simulated fleet: `cpu_milli` follows FC's 1 vCPU per
/// 2 GB of the common configurations.
fn sim_spec(account: u32, function: u32, memory_mb: u32, concurrency: u32) -> InstanceSpec {
    InstanceSpec {
        account_id: format!("{}", 1_000_000 + account)
            .parse()
            .expect("numeric account id"),
        function_name: format!("fn-{function}").parse().expect("valid name"),
        revision: String::new(),
        version: None,
        runtime: RuntimeName::Custom,
        handler: "index.handler".into(),
        command: vec!["/code/server".into()],
        args: vec![],
        port: 9000,
        environment: Default::default(),
        memory_mb,
        cpu_milli: (memory_mb / 2).max(50),
        disk_mb: 512,
        timeout_s: 60,
        concurrency,
        code_digest: "ab".repeat(32),
        code_size: 1024,
        initializer: None,
        pre_stop: None,
        layers: Vec::new(),
        role: None,
        network: None,
        image: None,
    }
    .seal()
}

fn register_nodes(p: &mut Placement, count: usize, memory_mb: u64, max_instances: u32, now: u64) {
    for n in 0..count {
        let tenancy = Tenancy::MultiTenant;
        let req = RegisterNode {
            node_id: Some(format!("sim-node-{n:04}").parse().expect("valid node id")),
            agent_url: format!("https://10.0.{}.{}:7443", n / 250, n % 250 + 1),
            capacity: NodeCapacity {
                memory_mb,
                cpu_milli: memory_mb / 2,
                max_instances,
            },
            labels: NodeLabels {
                zone: format!("zone-{}", (b'a' + (n % 3) as u8) as char),
                tenancy,
                sandbox_kinds: vec![sandbox_kind_for(tenancy)],
                dedicated_account: None,
                runtimes: None,
                network_isolation: Default::default(),
            },
            instances: vec![],
        };
        p.register(&req, now).expect("valid simulated node");
    }
}

/// Limits that never bind: the bench measures decisions, not quotas.
fn unbounded_config() -> PlacementConfig {
    PlacementConfig {
        default_limits: AccountLimits {
            burst_instances: 1_000_000,
            memory_quota_mb: u64::MAX / 4,
            vcpu_quota_milli: u64::MAX / 4,
            scale_out_instances_per_minute: 1_000_000_000,
            scale_out_vcpus_per_minute: 1_000_000_000,
            functions: Default::default(),
        },
        node_failure_after_ms: u64::MAX / 4,
        ..PlacementConfig::default()
    }
}

// ---- bench --------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub nodes: usize,
    pub functions: usize,
    pub instances: usize,
    pub accounts: usize,
    /// Acquire-and-release pairs to time.
    pub decisions: usize,
    /// Calls held in flight while measuring.
    pub in_flight: usize,
    pub seed: u64,
}

impl Default for BenchConfig {
    fn default() -> Self {
        Self {
            nodes: 100,
            functions: 10_000,
            instances: 50_000,
            accounts: 100,
            decisions: 2_000_000,
            in_flight: 5_000,
            seed: 1,
        }
    }
}

#[derive(Debug, Clone)]
pub struct BenchReport {
    pub config: BenchConfig,
    pub setup_s: f64,
    pub instances_after: usize,
    /// Acquires refused for want of room (none when `in_flight` fits).
    pub refused: usize,
    pub elapsed_s: f64,
    pub decisions_per_s: f64,
    pub latency: Percentiles,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        writeln!(
            f,
            "bench: {} nodes, {} functions, {} accounts, {} instances (set up in {:.1} s), {} calls in flight",
            c.nodes, c.functions, c.accounts, self.instances_after, self.setup_s, c.in_flight
        )?;
        writeln!(
            f,
            "  {} acquire-and-release decisions in {:.2} s on one thread: {:.0} decisions/s ({} refused)",
            c.decisions, self.elapsed_s, self.decisions_per_s, self.refused
        )?;
        write!(
            f,
            "  decision latency (acquire + release): p50 {:.2} us, p99 {:.2} us, p99.9 {:.2} us, max {:.1} us",
            us(self.latency.p50_ns),
            us(self.latency.p99_ns),
            us(self.latency.p999_ns),
            us(self.latency.max_ns)
        )
    }
}

/// Populate a cluster, then time acquire-and-release pairs.
///
/// Each function gets `instances / functions` instances of concurrency 10;
/// the measured loop takes a lease on a random function and releases the
/// oldest of the `in_flight` leases it holds, so instances are busy and
/// free in a realistic mix.
pub fn bench(c: &BenchConfig) -> BenchReport {
    let t0 = Instant::now();
    let mut rng = StdRng::seed_from_u64(c.seed);
    let mut p = Placement::new(unbounded_config());
    let now = 1_000_000;
    let per_instance_mb = 128;
    let per_node = c.instances.div_ceil(c.nodes.max(1)) as u64;
    register_nodes(
        &mut p,
        c.nodes,
        per_node * per_instance_mb * 5 / 4,
        (per_node * 5 / 4) as u32 + 1,
        now,
    );
    let specs: Vec<InstanceSpec> = (0..c.functions)
        .map(|f| {
            sim_spec(
                (f % c.accounts) as u32,
                f as u32,
                per_instance_mb as u32,
                10,
            )
        })
        .collect();
    // Fill every function's instances: hold `concurrency` leases per
    // instance so each acquire beyond the first ten needs a new one.
    let per_fn = c.instances / c.functions.max(1);
    for (i, s) in specs.iter().enumerate() {
        let extra = usize::from(i < c.instances % c.functions.max(1));
        let mut held = Vec::new();
        for _ in 0..(per_fn + extra) * s.concurrency as usize {
            match p.acquire(s, now).expect("setup acquire") {
                Acquired::Ready(l) => held.push(l.lease_id),
                Acquired::Starting { lease, create } => {
                    if let Some(job) = create {
                        p.instance_started(&job.instance_id, now);
                    }
                    held.push(lease.lease_id);
                }
            }
        }
        for l in held {
            p.release(&l, LeaseOutcome::Ok, now).expect("setup release");
        }
    }
    p.take_changes();
    let setup_s = t0.elapsed().as_secs_f64();

    let picks: Vec<usize> = (0..c.decisions)
        .map(|_| rng.gen_range(0..specs.len()))
        .collect();
    let mut window: VecDeque<LeaseId> = VecDeque::with_capacity(c.in_flight + 1);
    let mut samples = Vec::with_capacity(c.decisions);
    let mut cold_created = 0usize;
    let mut refused = 0usize;
    let start = Instant::now();
    for (n, &f) in picks.iter().enumerate() {
        let t = Instant::now();
        let now = now + n as u64 / 1000;
        let lease = match p.acquire(&specs[f], now) {
            Ok(Acquired::Ready(l)) => Some(l),
            Ok(Acquired::Starting { lease, create }) => {
                if let Some(job) = create {
                    cold_created += 1;
                    p.instance_started(&job.instance_id, now);
                }
                Some(lease)
            }
            Err(_) => {
                refused += 1;
                None
            }
        };
        if let Some(lease) = lease {
            window.push_back(lease.lease_id);
        }
        if window.len() > c.in_flight {
            let old = window.pop_front().expect("non-empty window");
            p.release(&old, LeaseOutcome::Ok, now)
                .expect("bench release");
        }
        // The journal is drained by the service's writer in real life.
        if n % 1024 == 0 {
            p.take_changes();
        }
        samples.push(t.elapsed().as_nanos() as u64);
    }
    let elapsed_s = start.elapsed().as_secs_f64();
    tracing::debug!(cold_created, refused, "bench finished");
    BenchReport {
        config: c.clone(),
        setup_s,
        instances_after: p.instance_count(),
        refused,
        elapsed_s,
        decisions_per_s: c.decisions as f64 / elapsed_s,
        latency: Percentiles::of(&mut samples),
    }
}

// ---- trace-driven simulation -------------------------------------------

/// The shape of the load over time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// A constant rate.
    Steady,
    /// A 24-hour sine: from 20 % of the mean rate at night to 180 % at noon.
    Diurnal,
    /// 40 % of the mean rate, with a one-minute burst at 6.4x every ten
    /// minutes (the mean stays the configured rate).
    Bursty,
}

impl Workload {
    pub const ALL: [Self; 3] = [Self::Steady, Self::Diurnal, Self::Bursty];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Steady => "steady",
            Self::Diurnal => "diurnal",
            Self::Bursty => "bursty",
        }
    }

    /// Calls per second at simulated second `s`, for mean rate `mean`.
    pub fn rate(self, mean: f64, s: u64) -> f64 {
        match self {
            Self::Steady => mean,
            Self::Diurnal => {
                let day = (s % 86_400) as f64 / 86_400.0;
                // Trough at midnight, peak at noon.
                mean * (1.0 - 0.8 * (2.0 * std::f64::consts::PI * day).cos())
            }
            Self::Bursty => {
                if s % 600 < 60 {
                    mean * 6.4
                } else {
                    mean * 0.4
                }
            }
        }
    }
}

impl FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|w| w.as_str() == s)
            .ok_or_else(|| format!("unknown workload {s:?}: steady, diurnal or bursty"))
    }
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub workload: Workload,
    /// Simulated duration.
    pub hours: f64,
    /// Mean calls per second over the whole cluster.
    pub mean_rate: f64,
    pub nodes: usize,
    pub node_memory_mb: u64,
    pub accounts: usize,
    /// Functions in all; `hot_functions` of them take `hot_share` of calls.
    pub functions: usize,
    pub hot_functions: usize,
    pub hot_share: f64,
    /// How long a fake agent takes to start an instance.
    pub cold_start_ms: u64,
    pub idle_timeout_ms: u64,
    pub seed: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            workload: Workload::Steady,
            hours: 6.0,
            mean_rate: 200.0,
            nodes: 20,
            node_memory_mb: 64 * 1024,
            accounts: 50,
            functions: 2_000,
            hot_functions: 20,
            hot_share: 0.6,
            cold_start_ms: 300,
            idle_timeout_ms: 300_000,
            seed: 7,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SimReport {
    pub workload: Workload,
    pub hours: f64,
    pub calls: u64,
    pub served: u64,
    pub cold_starts: u64,
    /// Calls that waited for an instance another call started.
    pub waited_for_start: u64,
    pub throttled: u64,
    pub unavailable: u64,
    pub instance_seconds: f64,
    pub peak_instances: usize,
    pub mean_memory_utilisation: f64,
    pub peak_memory_utilisation: f64,
    pub mean_cpu_utilisation: f64,
    pub latency: Percentiles,
    pub wall_s: f64,
}

impl SimReport {
    pub fn cold_start_ratio(&self) -> f64 {
        if self.served == 0 {
            0.0
        } else {
            self.cold_starts as f64 / self.served as f64
        }
    }
}

impl fmt::Display for SimReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "simulate {}: {:.1} simulated hours in {:.1} s wall clock",
            self.workload.as_str(),
            self.hours,
            self.wall_s
        )?;
        writeln!(
            f,
            "  calls {} served {} throttled {} unavailable {}",
            self.calls, self.served, self.throttled, self.unavailable
        )?;
        writeln!(
            f,
            "  cold starts {} (ratio {:.4}), calls that waited for a start {}",
            self.cold_starts,
            self.cold_start_ratio(),
            self.waited_for_start
        )?;
        writeln!(
            f,
            "  instance-seconds {:.0}, peak instances {}",
            self.instance_seconds, self.peak_instances
        )?;
        writeln!(
            f,
            "  node utilisation: memory mean {:.1} % peak {:.1} %, cpu mean {:.1} %",
            self.mean_memory_utilisation * 100.0,
            self.peak_memory_utilisation * 100.0,
            self.mean_cpu_utilisation * 100.0
        )?;
        write!(
            f,
            "  scheduling latency (acquire decision): p50 {:.2} us, p99 {:.2} us, max {:.1} us",
            us(self.latency.p50_ns),
            us(self.latency.p99_ns),
            us(self.latency.max_ns)
        )
    }
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// The fake agent finished starting the instance.
    Started(InstanceId),
    /// A call ends and releases its lease.
    End(LeaseId),
}

struct FnProfile {
    spec: InstanceSpec,
    mean_duration_ms: f64,
}

/// Draw a Poisson count (Knuth for small means, a rounded normal for large).
fn poisson(rng: &mut StdRng, mean: f64) -> u64 {
    if mean <= 0.0 {
        return 0;
    }
    if mean < 30.0 {
        let limit = (-mean).exp();
        let mut k = 0;
        let mut prod: f64 = rng.gen();
        while prod > limit {
            k += 1;
            prod *= rng.gen::<f64>();
        }
        return k;
    }
    // Box-Muller.
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    (mean + z * mean.sqrt()).round().max(0.0) as u64
}

fn exponential(rng: &mut StdRng, mean: f64) -> f64 {
    let u: f64 = rng.gen_range(f64::EPSILON..1.0);
    -u.ln() * mean
}

type EventQueue = BinaryHeap<Reverse<(u64, u64, Event)>>;

/// Play every event due at or before `until`: the fake agents' starts and
/// the calls' ends.
fn run_events_until(
    p: &mut Placement,
    events: &mut EventQueue,
    waiting: &mut HashMap<InstanceId, Vec<(LeaseId, u64)>>,
    seq: &mut u64,
    until: u64,
) {
    while let Some(Reverse((at, _, _))) = events.peek() {
        if *at > until {
            break;
        }
        let Reverse((at, _, ev)) = events.pop().expect("peeked");
        match ev {
            Event::Started(id) => {
                p.instance_started(&id, at);
                for (lease, dur) in waiting.remove(&id).unwrap_or_default() {
                    *seq += 1;
                    events.push(Reverse((at + dur, *seq, Event::End(lease))));
                }
            }
            Event::End(lease) => {
                // An error here means the instance was lost, which the
                // simulation does not do; the call would be retried.
                let _ = p.release(&lease, LeaseOutcome::Ok, at);
            }
        }
    }
}

/// Replay a generated trace through the placement core.
pub fn simulate(c: &SimConfig, placement: PlacementConfig) -> SimReport {
    let wall = Instant::now();
    let mut rng = StdRng::seed_from_u64(c.seed);
    let start_ms: u64 = 1_700_000_000_000;
    let mut p = Placement::new(PlacementConfig {
        idle_timeout_ms: c.idle_timeout_ms,
        node_failure_after_ms: u64::MAX / 4,
        ..placement
    });
    register_nodes(&mut p, c.nodes, c.node_memory_mb, 1_000, start_ms);
    let sizes = [128u32, 256, 512, 1024, 2048];
    let fns: Vec<FnProfile> = (0..c.functions)
        .map(|f| {
            let hot = f < c.hot_functions;
            let memory = if hot { 512 } else { sizes[rng.gen_range(0..3)] };
            let concurrency = if hot { 20 } else { rng.gen_range(1..=2) };
            FnProfile {
                spec: sim_spec((f % c.accounts) as u32, f as u32, memory, concurrency),
                mean_duration_ms: if hot {
                    80.0
                } else {
                    rng.gen_range(20.0..400.0)
                },
            }
        })
        .collect();
    let small = c.functions - c.hot_functions.min(c.functions);

    let mut events: EventQueue = BinaryHeap::new();
    let mut seq = 0u64;
    let mut waiting: HashMap<InstanceId, Vec<(LeaseId, u64)>> = HashMap::new();
    let mut r = SimReport {
        workload: c.workload,
        hours: c.hours,
        calls: 0,
        served: 0,
        cold_starts: 0,
        waited_for_start: 0,
        throttled: 0,
        unavailable: 0,
        instance_seconds: 0.0,
        peak_instances: 0,
        mean_memory_utilisation: 0.0,
        peak_memory_utilisation: 0.0,
        mean_cpu_utilisation: 0.0,
        latency: Percentiles::default(),
        wall_s: 0.0,
    };
    let mut samples: Vec<u64> = Vec::new();
    let (mut mem_sum, mut cpu_sum) = (0.0, 0.0);
    let seconds = (c.hours * 3600.0).ceil() as u64;

    for s in 0..seconds {
        let second_start = start_ms + s * 1000;
        run_events_until(&mut p, &mut events, &mut waiting, &mut seq, second_start);
        p.tick(second_start);
        p.take_changes();
        let u = p.utilisation();
        let mem = u.memory_used_mb as f64 / u.memory_mb.max(1) as f64;
        mem_sum += mem;
        cpu_sum += u.cpu_used_milli as f64 / u.cpu_milli.max(1) as f64;
        r.peak_memory_utilisation = r.peak_memory_utilisation.max(mem);
        r.instance_seconds += p.instance_count() as f64;
        r.peak_instances = r.peak_instances.max(p.instance_count());

        let n = poisson(&mut rng, c.workload.rate(c.mean_rate, s));
        let mut offsets: Vec<u64> = (0..n).map(|_| rng.gen_range(0..1000)).collect();
        offsets.sort_unstable();
        for off in offsets {
            let now = second_start + off;
            run_events_until(&mut p, &mut events, &mut waiting, &mut seq, now);
            let f = if small == 0 || (c.hot_functions > 0 && rng.gen_bool(c.hot_share)) {
                rng.gen_range(0..c.hot_functions.max(1).min(c.functions))
            } else {
                c.hot_functions + rng.gen_range(0..small)
            };
            let profile = &fns[f];
            let dur = exponential(&mut rng, profile.mean_duration_ms).ceil() as u64 + 1;
            r.calls += 1;
            let t = Instant::now();
            let result = p.acquire(&profile.spec, now);
            samples.push(t.elapsed().as_nanos() as u64);
            match result {
                Ok(Acquired::Ready(lease)) => {
                    r.served += 1;
                    seq += 1;
                    events.push(Reverse((now + dur, seq, Event::End(lease.lease_id))));
                }
                Ok(Acquired::Starting { lease, create }) => {
                    r.served += 1;
                    if let Some(job) = create {
                        r.cold_starts += 1;
                        let start = c.cold_start_ms / 2 + rng.gen_range(0..=c.cold_start_ms);
                        seq += 1;
                        events.push(Reverse((now + start, seq, Event::Started(job.instance_id))));
                    } else {
                        r.waited_for_start += 1;
                    }
                    waiting
                        .entry(lease.instance_id)
                        .or_default()
                        .push((lease.lease_id, dur));
                }
                Err(e) if e.code == FcErrorCode::ResourceThrottled => r.throttled += 1,
                Err(_) => r.unavailable += 1,
            }
        }
    }
    run_events_until(&mut p, &mut events, &mut waiting, &mut seq, u64::MAX);
    r.mean_memory_utilisation = mem_sum / seconds.max(1) as f64;
    r.mean_cpu_utilisation = cpu_sum / seconds.max(1) as f64;
    r.latency = Percentiles::of(&mut samples);
    r.wall_s = wall.elapsed().as_secs_f64();
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::default_account_limits;

    #[test]
    fn percentiles_pick_the_right_ranks() {
        let mut v: Vec<u64> = (1..=1000).rev().collect();
        let p = Percentiles::of(&mut v);
        assert_eq!(p.p50_ns, 501);
        assert_eq!(p.p99_ns, 990);
        assert_eq!(p.max_ns, 1000);
        assert_eq!(Percentiles::of(&mut []), Percentiles::default());
    }

    #[test]
    fn workload_rates_keep_their_mean() {
        for w in Workload::ALL {
            let day: f64 = (0..86_400).map(|s| w.rate(100.0, s)).sum::<f64>() / 86_400.0;
            assert!((day - 100.0).abs() < 0.5, "{}: mean {day}", w.as_str());
        }
        assert!(Workload::Diurnal.rate(100.0, 0) < 25.0);
        assert!(Workload::Diurnal.rate(100.0, 43_200) > 175.0);
        assert_eq!(Workload::Bursty.rate(100.0, 30), 640.0);
        assert_eq!("bursty".parse::<Workload>().unwrap(), Workload::Bursty);
        assert!("spiky".parse::<Workload>().is_err());
    }

    #[test]
    fn bench_keeps_the_population_and_counts_every_decision() {
        let c = BenchConfig {
            nodes: 10,
            functions: 100,
            instances: 500,
            accounts: 10,
            decisions: 20_000,
            in_flight: 200,
            seed: 3,
        };
        let r = bench(&c);
        // 200 calls in flight over 500 instances of concurrency 10 never
        // need a new instance.
        assert_eq!(r.instances_after, 500);
        assert_eq!(r.refused, 0);
        assert!(r.decisions_per_s > 0.0);
        assert!(r.latency.p50_ns <= r.latency.p99_ns);
        assert!(r.latency.p99_ns <= r.latency.max_ns);
        let text = r.to_string();
        assert!(
            text.contains("decisions/s") && text.contains("p99"),
            "{text}"
        );
    }

    #[test]
    fn a_short_simulation_accounts_for_every_call() {
        let c = SimConfig {
            hours: 0.25,
            mean_rate: 40.0,
            nodes: 4,
            functions: 200,
            hot_functions: 4,
            accounts: 10,
            idle_timeout_ms: 60_000,
            ..SimConfig::default()
        };
        for w in Workload::ALL {
            let r = simulate(
                &SimConfig {
                    workload: w,
                    ..c.clone()
                },
                PlacementConfig::default(),
            );
            // The diurnal day starts at its midnight trough.
            assert!(r.calls > 5_000, "{}: {} calls", w.as_str(), r.calls);
            assert_eq!(r.calls, r.served + r.throttled + r.unavailable);
            assert!(r.cold_starts > 0 && r.cold_starts < r.served);
            assert!((0.0..1.0).contains(&r.cold_start_ratio()));
            assert!(r.instance_seconds > 0.0);
            assert!(r.peak_memory_utilisation <= 1.0);
            assert!(r.mean_memory_utilisation > 0.0);
            assert!(r.to_string().contains("cold starts"));
        }
    }

    #[test]
    fn a_small_burst_pool_throttles_bursts() {
        let c = SimConfig {
            workload: Workload::Bursty,
            hours: 0.2,
            mean_rate: 100.0,
            nodes: 4,
            functions: 300,
            hot_functions: 0,
            accounts: 1,
            ..SimConfig::default()
        };
        let r = simulate(
            &c,
            PlacementConfig {
                default_limits: AccountLimits {
                    burst_instances: 10,
                    ..default_account_limits()
                },
                ..PlacementConfig::default()
            },
        );
        assert!(r.throttled > 0, "{r}");
        assert!(r.peak_instances <= 10, "{r}");
    }
}
