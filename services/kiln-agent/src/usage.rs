//! Per-instance usage on the agent's Prometheus endpoint: CPU, memory, OOM
//! kills, processes, network bytes (from the sandbox's cgroup and host-side
//! interface, sampled every few seconds) and freezing (frozen state,
//! freeze/thaw counts, thaw latency). Every series is labelled with the
//! instance id; `kiln_agent_instance_info` maps it to the function. Series
//! of destroyed instances are removed at the next sample.

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_core::InstanceId;
use kiln_sandbox::driver::SandboxStats;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::instances::InstanceManager;

type Id = Vec<(&'static str, String)>;
type Info = Vec<(&'static str, String)>;

fn id_labels(id: &InstanceId) -> Id {
    vec![("instance_id", id.to_string())]
}

/// The per-instance and freezing metrics.
pub struct UsageMetrics {
    pub freezes: Counter,
    pub thaws: Counter,
    pub freeze_failures: Counter,
    pub thaw_seconds: Histogram,
    info: Family<Info, Gauge>,
    frozen: Family<Id, Gauge>,
    instance_freezes: Family<Id, Counter>,
    instance_thaws: Family<Id, Counter>,
    cpu_seconds: Family<Id, Gauge<f64, AtomicU64>>,
    cpu_throttled_seconds: Family<Id, Gauge<f64, AtomicU64>>,
    memory_bytes: Family<Id, Gauge>,
    memory_limit_bytes: Family<Id, Gauge>,
    oom_kills: Family<Id, Gauge>,
    pids: Family<Id, Gauge>,
    rx_bytes: Family<Id, Gauge>,
    tx_bytes: Family<Id, Gauge>,
    /// Label sets present now: instance id and function.
    known: Mutex<HashSet<(InstanceId, String)>>,
}

impl UsageMetrics {
    /// Create the metrics and register them (prefixed by the registry's
    /// own prefix, `kiln_agent`).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            freezes: Counter::default(),
            thaws: Counter::default(),
            freeze_failures: Counter::default(),
            thaw_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            info: Family::default(),
            frozen: Family::default(),
            instance_freezes: Family::default(),
            instance_thaws: Family::default(),
            cpu_seconds: Family::default(),
            cpu_throttled_seconds: Family::default(),
            memory_bytes: Family::default(),
            memory_limit_bytes: Family::default(),
            oom_kills: Family::default(),
            pids: Family::default(),
            rx_bytes: Family::default(),
            tx_bytes: Family::default(),
            known: Mutex::default(),
        };
        registry.register("freezes", "Idle instances frozen", m.freezes.clone());
        registry.register(
            "thaws",
            "Frozen instances thawed for a call",
            m.thaws.clone(),
        );
        registry.register(
            "freeze_failures",
            "Freezes that failed (the instance stays running)",
            m.freeze_failures.clone(),
        );
        registry.register(
            "thaw_seconds",
            "How long thawing an instance before its call took",
            m.thaw_seconds.clone(),
        );
        registry.register(
            "instance_info",
            "1 per instance, labelled with its function",
            m.info.clone(),
        );
        registry.register(
            "instance_frozen",
            "1 while the instance is frozen",
            m.frozen.clone(),
        );
        registry.register(
            "instance_freezes",
            "Times the instance was frozen",
            m.instance_freezes.clone(),
        );
        registry.register(
            "instance_thaws",
            "Times the instance was thawed for a call",
            m.instance_thaws.clone(),
        );
        registry.register(
            "instance_cpu_seconds",
            "CPU time the instance has used",
            m.cpu_seconds.clone(),
        );
        registry.register(
            "instance_cpu_throttled_seconds",
            "Time the instance's CPU quota held it back",
            m.cpu_throttled_seconds.clone(),
        );
        registry.register(
            "instance_memory_bytes",
            "Memory the instance uses (its cgroup's charge, page cache included)",
            m.memory_bytes.clone(),
        );
        registry.register(
            "instance_memory_limit_bytes",
            "The instance's memory limit",
            m.memory_limit_bytes.clone(),
        );
        registry.register(
            "instance_oom_kills",
            "Processes of the instance killed for exceeding its memory",
            m.oom_kills.clone(),
        );
        registry.register(
            "instance_pids",
            "Processes and threads in the instance",
            m.pids.clone(),
        );
        registry.register(
            "instance_network_receive_bytes",
            "Bytes the instance received on its network interface (a container's invocations arrive over its loopback and are not counted)",
            m.rx_bytes.clone(),
        );
        registry.register(
            "instance_network_transmit_bytes",
            "Bytes the instance sent on its network interface (a container's answers to invocations leave over its loopback and are not counted)",
            m.tx_bytes.clone(),
        );
        m
    }

    pub(crate) fn frozen(&self, id: &InstanceId) {
        self.freezes.inc();
        self.instance_freezes.get_or_create(&id_labels(id)).inc();
        self.frozen.get_or_create(&id_labels(id)).set(1);
    }

    pub(crate) fn thawed(&self, id: &InstanceId, took: Duration) {
        self.thaws.inc();
        self.thaw_seconds.observe(took.as_secs_f64());
        self.instance_thaws.get_or_create(&id_labels(id)).inc();
        self.frozen.get_or_create(&id_labels(id)).set(0);
    }

    pub(crate) fn freeze_failed(&self) {
        self.freeze_failures.inc();
    }

    pub(crate) fn forget_frozen(&self, id: &InstanceId) {
        self.frozen.get_or_create(&id_labels(id)).set(0);
    }

    /// Record one sample of an instance.
    pub fn record(&self, id: &InstanceId, function: &str, s: &SandboxStats) {
        let l = id_labels(id);
        self.known
            .lock()
            .expect("usage lock")
            .insert((id.clone(), function.to_owned()));
        self.info
            .get_or_create(&vec![
                ("instance_id", id.to_string()),
                ("function", function.to_owned()),
            ])
            .set(1);
        let clamp = |v: u64| v.min(i64::MAX as u64) as i64;
        self.cpu_seconds
            .get_or_create(&l)
            .set(s.cpu_usage_us as f64 / 1e6);
        self.cpu_throttled_seconds
            .get_or_create(&l)
            .set(s.cpu_throttled_us as f64 / 1e6);
        self.memory_bytes
            .get_or_create(&l)
            .set(clamp(s.memory_bytes));
        if let Some(limit) = s.memory_limit_bytes {
            self.memory_limit_bytes.get_or_create(&l).set(clamp(limit));
        }
        self.oom_kills.get_or_create(&l).set(clamp(s.oom_kills));
        self.pids.get_or_create(&l).set(clamp(s.pids));
        if let Some(rx) = s.net_rx_bytes {
            self.rx_bytes.get_or_create(&l).set(clamp(rx));
        }
        if let Some(tx) = s.net_tx_bytes {
            self.tx_bytes.get_or_create(&l).set(clamp(tx));
        }
        self.frozen.get_or_create(&l).set(i64::from(s.frozen));
    }

    /// Remove every series of instances not in `alive`.
    pub fn retain(&self, alive: &HashSet<InstanceId>) {
        let mut known = self.known.lock().expect("usage lock");
        let gone: Vec<(InstanceId, String)> = known
            .iter()
            .filter(|(id, _)| !alive.contains(id))
            .cloned()
            .collect();
        for (id, function) in gone {
            let l = id_labels(&id);
            self.info.remove(&vec![
                ("instance_id", id.to_string()),
                ("function", function.clone()),
            ]);
            self.frozen.remove(&l);
            self.instance_freezes.remove(&l);
            self.instance_thaws.remove(&l);
            self.cpu_seconds.remove(&l);
            self.cpu_throttled_seconds.remove(&l);
            self.memory_bytes.remove(&l);
            self.memory_limit_bytes.remove(&l);
            self.oom_kills.remove(&l);
            self.pids.remove(&l);
            self.rx_bytes.remove(&l);
            self.tx_bytes.remove(&l);
            known.remove(&(id, function));
        }
    }
}

/// Sample every ready instance once.
pub async fn sample(manager: &InstanceManager) {
    let mut alive = HashSet::new();
    for id in manager.ids() {
        let Some(instance) = manager.get(id.as_str()) else {
            continue;
        };
        alive.insert(id.clone());
        match manager.driver.stats(&id).await {
            Ok(Some(stats)) => {
                manager
                    .metrics
                    .usage
                    .record(&id, instance.spec.function_name.as_str(), &stats)
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(instance_id = %id, error = %e, "no usage sample"),
        }
    }
    manager.metrics.usage.retain(&alive);
}

/// Sample usage every `interval` until `shutdown` turns true.
pub async fn run_sampler(
    manager: Arc<InstanceManager>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => sample(&manager).await,
            _ = crate::registration::stopped(&mut shutdown) => return,
        }
    }
}

/// FC's message for a call whose instance was killed for exceeding its
/// memory: the function error FC gives any call whose process exited,
/// with the memory it had reached.
pub fn memory_exceeded_message(duration: Duration, memory_mb: u32) -> String {
    format!(
        "Process exited unexpectedly before completing request (duration: {}ms, maxMemoryUsage: {:.2}MB): the function exceeded its memory limit of {} MB and was killed",
        duration.as_millis(),
        f64::from(memory_mb),
        memory_mb
    )
}

/// Whether the instance's processes were killed for exceeding its memory.
pub async fn oom_killed(manager: &InstanceManager, id: &InstanceId) -> bool {
    matches!(manager.driver.stats(id).await, Ok(Some(s)) if s.oom_kills > 0)
}
