//! Prometheus metrics, served in text format on the plain-HTTP
//! `metrics_listen` address.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// The scheduler's metrics.
pub struct Metrics {
    registry: Registry,
    pub acquires: Counter,
    pub cold_starts: Counter,
    pub throttles: Counter,
    pub start_failures: Counter,
    /// Instances drained to move load off hot nodes.
    pub rebalanced: Counter,
    /// Leases taken back at expiry (their holder never gave them back).
    pub leases_written_off: Counter,
    pub instances: Gauge,
    pub nodes_ready: Gauge,
    pub nodes: Gauge,
    /// Seconds from an acquire request to its lease (cold starts included).
    pub acquire_latency: Histogram,
    /// Seconds a call waited for the scheduler's state lock: the one place
    /// its calls take turns (held for decisions only, never across I/O).
    pub lock_wait: Histogram,
    /// Nodes whose certificates are revoked.
    pub revoked_nodes: Gauge,
    /// Agent certificates signed (renewals and bootstrap joins).
    pub certificates_issued: Counter,
    /// Bootstrap redemptions refused (unknown, used or expired tokens).
    pub bootstrap_refused: Counter,
    /// Internal calls refused for the caller's identity.
    pub refusals: kiln_internal_api::authz::Refusals,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kiln_scheduler");
        let acquires = Counter::default();
        let cold_starts = Counter::default();
        let throttles = Counter::default();
        let start_failures = Counter::default();
        let rebalanced = Counter::default();
        let leases_written_off = Counter::default();
        let instances = Gauge::default();
        let nodes_ready = Gauge::default();
        let nodes = Gauge::default();
        // 50 µs .. ~100 s.
        let acquire_latency = Histogram::new(exponential_buckets(0.000_05, 2.0, 22));
        // 1 µs .. ~1 s.
        let lock_wait = Histogram::new(exponential_buckets(0.000_001, 2.0, 20));
        registry.register(
            "state_lock_wait_seconds",
            "Time calls waited for the scheduler's state lock",
            lock_wait.clone(),
        );
        registry.register("acquires", "Leases granted", acquires.clone());
        registry.register(
            "cold_starts",
            "Instances created for a call",
            cold_starts.clone(),
        );
        registry.register(
            "throttles",
            "Acquires refused with ResourceThrottled",
            throttles.clone(),
        );
        registry.register(
            "instance_start_failures",
            "Instances the agent could not start",
            start_failures.clone(),
        );
        registry.register(
            "rebalanced_instances",
            "Instances drained to move load off nodes above the high watermark",
            rebalanced.clone(),
        );
        registry.register(
            "leases_written_off",
            "Leases taken back at expiry because their holder never gave them back \
             (a gateway that lost track of them, or one that kept them too long)",
            leases_written_off.clone(),
        );
        registry.register(
            "instances",
            "Instances known to the scheduler",
            instances.clone(),
        );
        registry.register("nodes_ready", "Nodes taking instances", nodes_ready.clone());
        registry.register("nodes", "Nodes known to the scheduler", nodes.clone());
        registry.register(
            "acquire_latency_seconds",
            "Time from an acquire request to its lease",
            acquire_latency.clone(),
        );
        let revoked_nodes = Gauge::default();
        let certificates_issued = Counter::default();
        let bootstrap_refused = Counter::default();
        registry.register(
            "revoked_nodes",
            "Nodes whose certificates are revoked",
            revoked_nodes.clone(),
        );
        registry.register(
            "certificates_issued",
            "Agent certificates signed (renewals and bootstrap joins)",
            certificates_issued.clone(),
        );
        registry.register(
            "bootstrap_refused",
            "Bootstrap token redemptions refused (unknown, used or expired tokens)",
            bootstrap_refused.clone(),
        );
        let refusals = kiln_internal_api::authz::Refusals::register(&mut registry);
        Self {
            registry,
            refusals,
            acquires,
            cold_starts,
            throttles,
            start_failures,
            rebalanced,
            leases_written_off,
            instances,
            nodes_ready,
            nodes,
            acquire_latency,
            lock_wait,
            revoked_nodes,
            certificates_issued,
            bootstrap_refused,
        }
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut s = String::new();
        encode(&mut s, &self.registry).expect("writing to a String cannot fail");
        s
    }
}

/// Serve `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    kiln_internal_api::server::serve_metrics(listener, move || metrics.render(), shutdown).await
}

/// Bind the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric() {
        let m = Metrics::default();
        m.acquires.inc();
        m.acquire_latency.observe(0.002);
        let text = m.render();
        for name in [
            "kiln_scheduler_acquires_total 1",
            "kiln_scheduler_cold_starts_total",
            "kiln_scheduler_throttles_total",
            "kiln_scheduler_rebalanced_instances_total",
            "kiln_scheduler_leases_written_off_total",
            "kiln_scheduler_instances",
            "kiln_scheduler_nodes",
            "kiln_scheduler_acquire_latency_seconds_bucket",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
