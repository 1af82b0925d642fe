//! Where a burst's cold starts spend their time (issue 20's profile of the
//! gateway, scheduler and agent paths), from the services' own histograms:
//! each one's sum and count before and after the burst give the mean time
//! a call spent in that stage. Nested stages are subtracted from their
//! parent to give each hop's own share:
//!
//! ```text
//!   caller's call ─┬─ outside the gateway (TLS, HTTP, the client)
//!                  └─ gateway invoke ─┬─ lease wait ─┬─ gateway -> scheduler hop
//!                                     │              └─ scheduler acquire ─┬─ state lock waits
//!                                     │                                    ├─ agent create
//!                                     │                                    └─ scheduler's own
//!                                     ├─ agent invoke (the function)
//!                                     └─ the rest (gateway -> agent hop, answer)
//! ```
//!
//! A serialisation in Kiln shows as a stage whose mean grows with the
//! burst's parallelism while its work does not: lock waits, a hop's share.

use std::collections::HashMap;

/// Histograms read, by their exposition names.
const GATEWAY_INVOKE: &str = "kiln_gateway_invoke_seconds";
const LEASE_WAIT: &str = "kiln_gateway_lease_acquire_seconds";
const SCHED_ACQUIRE: &str = "kiln_scheduler_acquire_latency_seconds";
const LOCK_WAIT: &str = "kiln_scheduler_state_lock_wait_seconds";
const AGENT_CREATE: &str = "kiln_agent_instance_create_seconds";
const AGENT_INVOKE: &str = "kiln_agent_invoke_seconds";
const ALL: [&str; 6] = [
    GATEWAY_INVOKE,
    LEASE_WAIT,
    SCHED_ACQUIRE,
    LOCK_WAIT,
    AGENT_CREATE,
    AGENT_INVOKE,
];

/// Sum (seconds) and count of each histogram at one moment.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sample(HashMap<&'static str, (f64, u64)>);

impl Sample {
    /// Read from Prometheus text (the services' metrics, concatenated).
    pub(crate) fn parse(text: &str) -> Self {
        let mut out = HashMap::new();
        for name in ALL {
            let value = |suffix: &str| {
                let key = format!("{name}_{suffix} ");
                text.lines()
                    .find_map(|l| l.strip_prefix(key.as_str()))
                    .and_then(|v| v.trim().parse::<f64>().ok())
            };
            if let (Some(sum), Some(count)) = (value("sum"), value("count")) {
                out.insert(name, (sum, count as u64));
            }
        }
        Self(out)
    }

    /// Mean milliseconds per observation between `before` and `self`, and
    /// the number of observations.
    fn mean_ms(&self, before: &Sample, name: &str) -> (f64, u64) {
        let (s1, c1) = self.0.get(name).copied().unwrap_or_default();
        let (s0, c0) = before.0.get(name).copied().unwrap_or_default();
        let n = c1.saturating_sub(c0);
        if n == 0 {
            return (0.0, 0);
        }
        ((s1 - s0) * 1000.0 / n as f64, n)
    }
}

/// The breakdown of one burst: mean ms per call in each stage.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Stages {
    pub call: f64,
    pub gateway_invoke: f64,
    pub lease_wait: f64,
    pub scheduler_acquire: f64,
    pub agent_create: f64,
    pub agent_invoke: f64,
    /// Mean wait per lock taken, and how many were taken during the burst.
    pub lock_wait_each_us: f64,
    pub locks: u64,
    /// Lock waits summed, per cold start.
    pub lock_wait_per_start: f64,
}

impl Stages {
    /// `calls` are the callers' own times (ms) of the burst's calls.
    pub(crate) fn between(before: &Sample, after: &Sample, calls: &[f64]) -> Self {
        let call = if calls.is_empty() {
            0.0
        } else {
            calls.iter().sum::<f64>() / calls.len() as f64
        };
        let m = |name| after.mean_ms(before, name).0;
        let (lock_each_ms, locks) = after.mean_ms(before, LOCK_WAIT);
        let (_, starts) = after.mean_ms(before, AGENT_CREATE);
        Self {
            call,
            gateway_invoke: m(GATEWAY_INVOKE),
            lease_wait: m(LEASE_WAIT),
            scheduler_acquire: m(SCHED_ACQUIRE),
            agent_create: m(AGENT_CREATE),
            agent_invoke: m(AGENT_INVOKE),
            lock_wait_each_us: lock_each_ms * 1000.0,
            locks,
            lock_wait_per_start: if starts == 0 {
                0.0
            } else {
                lock_each_ms * locks as f64 / starts as f64
            },
        }
    }

    /// The report's lines, each stage's own share of a mean call.
    pub(crate) fn report(&self) -> String {
        let line = |what: &str, ms: f64| {
            let share = if self.call > 0.0 {
                100.0 * ms / self.call
            } else {
                0.0
            };
            format!("    {what:<44} {ms:>8.1}ms {share:>5.1}%\n")
        };
        let mut out = String::from("  where a mean cold call went (services' histograms):\n");
        out += &line("caller's call (mean)", self.call);
        out += &line(
            "outside the gateway (client, TLS, HTTP)",
            self.call - self.gateway_invoke,
        );
        out += &line(
            "gateway -> scheduler hop",
            self.lease_wait - self.scheduler_acquire,
        );
        out += &line(
            "scheduler's own (decision, create RPC)",
            self.scheduler_acquire - self.agent_create,
        );
        out += &line("agent create (sandbox, until the port)", self.agent_create);
        out += &line("agent invoke (the function's answer)", self.agent_invoke);
        out += &line(
            "gateway -> agent hop and the rest",
            self.gateway_invoke - self.lease_wait - self.agent_invoke,
        );
        out += &format!(
            "    scheduler state lock: {} taken, {:.1}us mean wait, {:.3}ms per start\n",
            self.locks, self.lock_wait_each_us, self.lock_wait_per_start
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "\
# TYPE kiln_gateway_invoke_seconds histogram
kiln_gateway_invoke_seconds_sum 1.0
kiln_gateway_invoke_seconds_count 10
kiln_gateway_lease_acquire_seconds_sum 0.5
kiln_gateway_lease_acquire_seconds_count 10
kiln_scheduler_acquire_latency_seconds_sum 0.4
kiln_scheduler_acquire_latency_seconds_count 10
kiln_scheduler_state_lock_wait_seconds_sum 0.0
kiln_scheduler_state_lock_wait_seconds_count 100
kiln_agent_instance_create_seconds_sum 0.3
kiln_agent_instance_create_seconds_count 10
kiln_agent_invoke_seconds_sum 0.1
kiln_agent_invoke_seconds_count 10
";

    fn after(text: &str) -> String {
        // Four cold calls more: 100 ms in the gateway each, 60 waiting
        // for the lease, 50 in the scheduler's acquire, 40 creating, 20 in
        // the function; 40 locks with 2 ms of waiting in all.
        text.replace("invoke_seconds_sum 1.0", "invoke_seconds_sum 1.4")
            .replace(
                "invoke_seconds_count 10\nkiln_gateway_lease",
                "invoke_seconds_count 14\nkiln_gateway_lease",
            )
            .replace("acquire_seconds_sum 0.5", "acquire_seconds_sum 0.74")
            .replace("acquire_seconds_count 10", "acquire_seconds_count 14")
            .replace("latency_seconds_sum 0.4", "latency_seconds_sum 0.6")
            .replace("latency_seconds_count 10", "latency_seconds_count 14")
            .replace("wait_seconds_sum 0.0", "wait_seconds_sum 0.002")
            .replace("wait_seconds_count 100", "wait_seconds_count 140")
            .replace("create_seconds_sum 0.3", "create_seconds_sum 0.46")
            .replace("create_seconds_count 10", "create_seconds_count 14")
            .replace(
                "agent_invoke_seconds_sum 0.1",
                "agent_invoke_seconds_sum 0.18",
            )
            .replace(
                "agent_invoke_seconds_count 10",
                "agent_invoke_seconds_count 14",
            )
    }

    #[test]
    fn stages_are_means_of_the_histograms_deltas() {
        let before = Sample::parse(BEFORE);
        let after = Sample::parse(&after(BEFORE));
        let s = Stages::between(&before, &after, &[110.0, 130.0, 120.0, 120.0]);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
        assert!(close(s.call, 120.0), "{s:?}");
        assert!(close(s.gateway_invoke, 100.0), "{s:?}");
        assert!(close(s.lease_wait, 60.0), "{s:?}");
        assert!(close(s.scheduler_acquire, 50.0), "{s:?}");
        assert!(close(s.agent_create, 40.0), "{s:?}");
        assert!(close(s.agent_invoke, 20.0), "{s:?}");
        assert_eq!(s.locks, 40);
        assert!(close(s.lock_wait_each_us, 50.0), "{s:?}");
        assert!(close(s.lock_wait_per_start, 0.5), "{s:?}");
        let r = s.report();
        assert!(r.contains("gateway -> scheduler hop"), "{r}");
        assert!(r.contains("10.0ms"), "the hop's 60 - 50: {r}");
    }

    #[test]
    fn missing_or_unchanged_histograms_give_zero_not_nan() {
        let s = Stages::between(&Sample::parse(""), &Sample::parse(BEFORE), &[]);
        assert_eq!(s.call, 0.0);
        let same = Stages::between(&Sample::parse(BEFORE), &Sample::parse(BEFORE), &[5.0]);
        assert_eq!((same.agent_create, same.locks), (0.0, 0));
        assert!(!same.report().contains("NaN"));
    }
}
