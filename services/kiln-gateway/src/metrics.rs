//! Prometheus metrics: requests by operation and code, invoke latency,
//! invocations in flight. Served as text on `metrics_listen`.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub operation: &'static str,
    /// The HTTP status (a number: building the label costs no allocation
    /// on every request; it is written as `code="200"` all the same).
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebSocketEndLabels {
    /// `closed` (both sides ended, which includes the agent closing it
    /// at the function's timeout), `error`, or `timeout` (cut by the
    /// gateway's own bound, the function's timeout plus the agent grace:
    /// the agent did not end it).
    pub how: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub invoke_seconds: Histogram,
    /// Seconds from asking the scheduler for a lease to holding it (a cold
    /// start's instance creation included; parked leases not counted).
    pub lease_acquire_seconds: Histogram,
    pub invocations_in_flight: Gauge,
    /// WebSockets through HTTP triggers open now.
    pub websockets_open: Gauge,
    /// WebSockets through HTTP triggers that ended, by how.
    pub websockets_ended: Family<WebSocketEndLabels, Counter>,
    /// Internal-listener calls refused for the caller's identity.
    pub refusals: kiln_internal_api::authz::Refusals,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Self::with_extra(|_| {})
    }

    /// [`Metrics::new`], with more metrics registered by `extra` (the async
    /// queue's).
    pub fn with_extra(extra: impl FnOnce(&mut Registry)) -> Arc<Self> {
        let mut registry = Registry::with_prefix("kiln_gateway");
        extra(&mut registry);
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Public API requests by operation and answer code",
            requests.clone(),
        );
        let invoke_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 18));
        registry.register(
            "invoke_seconds",
            "Sync invocation latency until the answer's headers",
            invoke_seconds.clone(),
        );
        let lease_acquire_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 20));
        registry.register(
            "lease_acquire_seconds",
            "Time to get a lease from the scheduler, instance start included",
            lease_acquire_seconds.clone(),
        );
        let invocations_in_flight = Gauge::default();
        registry.register(
            "invocations_in_flight",
            "Sync invocations being served",
            invocations_in_flight.clone(),
        );
        let websockets_open = Gauge::default();
        registry.register(
            "websockets_open",
            "WebSocket connections through HTTP triggers open now",
            websockets_open.clone(),
        );
        let websockets_ended = Family::<WebSocketEndLabels, Counter>::default();
        registry.register(
            "websockets_ended",
            "WebSocket connections through HTTP triggers that ended, by how (closed, error, timeout)",
            websockets_ended.clone(),
        );
        let refusals = kiln_internal_api::authz::Refusals::register(&mut registry);
        Arc::new(Self {
            refusals,
            registry,
            requests,
            invoke_seconds,
            lease_acquire_seconds,
            invocations_in_flight,
            websockets_open,
            websockets_ended,
        })
    }

    pub fn request(&self, operation: &'static str, code: u16) {
        self.requests
            .get_or_create(&RequestLabels { operation, code })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry)
            .expect("writing to a String cannot fail");
        s
    }
}

/// Serve `GET /metrics` over plain HTTP until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    kiln_internal_api::server::serve_metrics(listener, move || metrics.encode(), shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_every_family() {
        let m = Metrics::new();
        m.request("InvokeFunction", 200);
        m.invoke_seconds.observe(0.001);
        m.invocations_in_flight.inc();
        m.websockets_open.inc();
        m.websockets_ended
            .get_or_create(&WebSocketEndLabels { how: "timeout" })
            .inc();
        let text = m.encode();
        assert!(text.contains("kiln_gateway_websockets_open 1"));
        assert!(text.contains("kiln_gateway_websockets_ended_total{how=\"timeout\"} 1"));
        assert!(text
            .contains("kiln_gateway_requests_total{operation=\"InvokeFunction\",code=\"200\"} 1"));
        assert!(text.contains("kiln_gateway_invoke_seconds_bucket"));
        assert!(text.contains("kiln_gateway_invocations_in_flight 1"));
    }
}
