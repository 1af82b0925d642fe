//! Prometheus metrics of the agent, served as text at `GET /metrics` on the
//! plain-HTTP `metrics_listen` address.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use kiln_internal_api::InvokeOutcome;

type Labels = Vec<(&'static str, &'static str)>;

/// Every metric of the agent. Counters for the invoke path are resolved
/// once here, so recording one is an atomic add.
pub struct Metrics {
    registry: Registry,
    pub instances: Gauge,
    pub creates_ok: Counter,
    pub creates_failed: Counter,
    pub create_seconds: Histogram,
    invocations: [Counter; 4],
    pub invoke_seconds: Histogram,
    /// Per-instance usage and freezing.
    pub usage: Arc<crate::usage::UsageMetrics>,
    /// Internal calls refused for the caller's identity.
    pub refusals: kiln_internal_api::authz::Refusals,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kiln_agent");
        let instances = Gauge::default();
        registry.register("instances", "Instances on this node", instances.clone());
        let creates = Family::<Labels, Counter>::default();
        registry.register(
            "instance_creates",
            "Instance creations by result",
            creates.clone(),
        );
        let create_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "instance_create_seconds",
            "From the create request to the runtime's port accepting",
            create_seconds.clone(),
        );
        let invocations = Family::<Labels, Counter>::default();
        registry.register(
            "invocations",
            "Invocations forwarded to runtimes, by outcome",
            invocations.clone(),
        );
        let invoke_seconds = Histogram::new(exponential_buckets(0.000_25, 2.0, 18));
        registry.register(
            "invoke_seconds",
            "From the invoke request to the runtime's response head",
            invoke_seconds.clone(),
        );
        let by_outcome = |o: InvokeOutcome| {
            let c = invocations
                .get_or_create(&vec![("outcome", o.as_str())])
                .clone();
            c
        };
        let usage = Arc::new(crate::usage::UsageMetrics::register(&mut registry));
        let creates_ok = creates.get_or_create(&vec![("result", "ok")]).clone();
        let creates_failed = creates.get_or_create(&vec![("result", "failed")]).clone();
        let refusals = kiln_internal_api::authz::Refusals::register(&mut registry);
        Self {
            refusals,
            instances,
            creates_ok,
            creates_failed,
            create_seconds,
            invocations: InvokeOutcome::ALL.map(by_outcome),
            invoke_seconds,
            usage,
            registry,
        }
    }

    pub fn invocation(&self, outcome: InvokeOutcome) {
        self.invocations[outcome as usize].inc();
    }

    pub fn invocations(&self, outcome: InvokeOutcome) -> u64 {
        self.invocations[outcome as usize].get()
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Serve `GET /metrics` over plain HTTP until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let stopped = async move { crate::registration::stopped(&mut shutdown).await };
    kiln_internal_api::server::serve_metrics(listener, move || metrics.render(), stopped).await
}

/// Bind the metrics listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, crate::AgentError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| crate::AgentError::Bind { addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric() {
        let m = Metrics::new();
        m.instances.set(3);
        m.creates_ok.inc();
        m.invocation(InvokeOutcome::Timeout);
        m.invoke_seconds.observe(0.001);
        let text = m.render();
        assert!(text.contains("kiln_agent_instances 3"), "{text}");
        assert!(
            text.contains("kiln_agent_instance_creates_total{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("kiln_agent_invocations_total{outcome=\"timeout\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("kiln_agent_invocations_total{outcome=\"ok\"} 0"),
            "{text}"
        );
        assert!(text.contains("kiln_agent_invoke_seconds_count 1"), "{text}");
        assert_eq!(m.invocations(InvokeOutcome::Timeout), 1);
    }
}
