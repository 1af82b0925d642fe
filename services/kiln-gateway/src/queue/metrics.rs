//! Prometheus metrics of the async queue: message events (enqueued,
//! dispatched, retried, finished by status, redelivered), the wait from
//! visible to dispatched, group-commit batch sizes and commit (fsync)
//! latency, depth per account and the age of the oldest waiting message.
//!
//! Counters move only once the transaction that did the work commits. The
//! depth gauge is refreshed by the dispatcher from the database; it names
//! at most [`DEPTH_ACCOUNTS`] accounts (the deepest) and sums the rest
//! under `account="other"`, so its label set stays bounded however many
//! accounts queue messages.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::TaskStatus;

/// The most accounts the depth gauge names; the others are summed under
/// `account="other"`.
pub const DEPTH_ACCOUNTS: usize = 32;

/// What happened to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    Enqueued,
    Dispatched,
    /// Dispatched again after its previous delivery's lease ran out (or its
    /// gateway died).
    Redelivered,
    Retried,
    Succeeded,
    Failed,
    Expired,
    Stopped,
    Invalid,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enqueued => "enqueued",
            Self::Dispatched => "dispatched",
            Self::Redelivered => "redelivered",
            Self::Retried => "retried",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Expired => "expired",
            Self::Stopped => "stopped",
            Self::Invalid => "invalid",
        }
    }

    /// The event of a task's final status (None for the others).
    pub fn finished(s: TaskStatus) -> Option<Self> {
        Some(match s {
            TaskStatus::Succeeded => Self::Succeeded,
            TaskStatus::Failed => Self::Failed,
            TaskStatus::Expired => Self::Expired,
            TaskStatus::Stopped => Self::Stopped,
            TaskStatus::Invalid => Self::Invalid,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccountLabels {
    account: String,
}

/// The queue's metrics; cheap to update from the writer thread.
pub struct QueueMetrics {
    events: Family<EventLabels, Counter>,
    dispatch_wait: Histogram,
    batch_ops: Histogram,
    commit_seconds: Histogram,
    depth: Family<AccountLabels, Gauge>,
    oldest_age: Gauge<f64, AtomicU64>,
}

impl Default for QueueMetrics {
    fn default() -> Self {
        Self {
            events: Family::default(),
            dispatch_wait: Histogram::new(exponential_buckets(0.001, 2.0, 20)),
            batch_ops: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            depth: Family::default(),
            oldest_age: Gauge::default(),
        }
    }
}

impl QueueMetrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Add these metrics to `registry` (names `<prefix>_async_...`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "async_messages",
            "Async messages by event: enqueued, dispatched, redelivered, retried, and finished as succeeded, failed, expired, stopped or invalid",
            self.events.clone(),
        );
        registry.register(
            "async_dispatch_wait_seconds",
            "Time from a message becoming visible (enqueued or its backoff ended) to its dispatch",
            self.dispatch_wait.clone(),
        );
        registry.register(
            "async_commit_batch_ops",
            "Queue operations applied per group-commit transaction",
            self.batch_ops.clone(),
        );
        registry.register(
            "async_commit_seconds",
            "Duration of one group-commit transaction, fsync included",
            self.commit_seconds.clone(),
        );
        registry.register(
            "async_queue_depth",
            "Unfinished async messages per account (the deepest accounts by name, the rest as other)",
            self.depth.clone(),
        );
        registry.register(
            "async_oldest_message_age_seconds",
            "Age of the oldest unfinished async message",
            self.oldest_age.clone(),
        );
    }

    pub fn count(&self, e: Event, n: u64) {
        if n > 0 {
            self.events
                .get_or_create(&EventLabels { event: e.as_str() })
                .inc_by(n);
        }
    }

    /// How many times `e` was counted.
    pub fn get(&self, e: Event) -> u64 {
        self.events
            .get_or_create(&EventLabels { event: e.as_str() })
            .get()
    }

    pub fn dispatch_waited(&self, wait_ms: u64) {
        self.dispatch_wait.observe(wait_ms as f64 / 1000.0);
    }

    pub fn committed(&self, ops: usize, took: Duration) {
        self.batch_ops.observe(ops as f64);
        self.commit_seconds.observe(took.as_secs_f64());
    }

    /// Replace the depth gauge with `per_account` (account, unfinished
    /// messages) and set the oldest message's age.
    pub fn set_depth(&self, mut per_account: Vec<(String, u64)>, oldest_age: Duration) {
        per_account.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let other: u64 = per_account.iter().skip(DEPTH_ACCOUNTS).map(|x| x.1).sum();
        self.depth.clear();
        for (account, n) in per_account.into_iter().take(DEPTH_ACCOUNTS) {
            self.depth
                .get_or_create(&AccountLabels { account })
                .set(n as i64);
        }
        if other > 0 {
            self.depth
                .get_or_create(&AccountLabels {
                    account: "other".into(),
                })
                .set(other as i64);
        }
        self.oldest_age.set(oldest_age.as_secs_f64());
    }

    pub fn encode(&self) -> String {
        let mut r = Registry::with_prefix("kiln_gateway");
        self.register(&mut r);
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &r)
            .expect("writing to a String cannot fail");
        s
    }
}

/// What one transaction did, counted once it commits.
#[derive(Default)]
pub(crate) struct Tally {
    pub events: Vec<(Event, u64)>,
    pub waits_ms: Vec<u64>,
    /// Change of each account's unfinished messages in this batch.
    pub depth: std::collections::HashMap<String, i64>,
}

impl Tally {
    pub fn depth_add(&mut self, account: &str, d: i64) {
        match self.depth.get_mut(account) {
            Some(n) => *n += d,
            None => {
                self.depth.insert(account.to_owned(), d);
            }
        }
    }

    pub fn add(&mut self, e: Event) {
        match self.events.iter_mut().find(|(k, _)| *k == e) {
            Some((_, n)) => *n += 1,
            None => self.events.push((e, 1)),
        }
    }

    pub fn apply(self, m: &QueueMetrics) {
        for (e, n) in self.events {
            m.count(e, n);
        }
        for w in self.waits_ms {
            m.dispatch_waited(w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_names_the_deepest_accounts_and_sums_the_rest() {
        let m = QueueMetrics::default();
        let many: Vec<(String, u64)> = (0..100u64)
            .map(|i| (format!("acct{i:03}"), i + 1))
            .collect();
        m.set_depth(many, Duration::from_secs(7));
        let text = m.encode();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("kiln_gateway_async_queue_depth{"))
            .collect();
        assert_eq!(lines.len(), DEPTH_ACCOUNTS + 1, "{text}");
        assert!(text.contains("kiln_gateway_async_queue_depth{account=\"acct099\"} 100"));
        assert!(!text.contains("account=\"acct000\""), "{text}");
        // The 68 shallowest: 1 + 2 + ... + 68.
        assert!(
            text.contains("kiln_gateway_async_queue_depth{account=\"other\"} 2346"),
            "{text}"
        );
        assert!(
            text.contains("kiln_gateway_async_oldest_message_age_seconds 7"),
            "{text}"
        );
        // A refresh replaces the accounts (a drained one disappears).
        m.set_depth(vec![("a".into(), 3)], Duration::ZERO);
        let text = m.encode();
        assert!(!text.contains("acct099"), "{text}");
        assert!(text.contains("kiln_gateway_async_queue_depth{account=\"a\"} 3"));
    }

    #[test]
    fn tally_counts_only_when_applied() {
        let m = QueueMetrics::default();
        let mut t = Tally::default();
        t.add(Event::Enqueued);
        t.add(Event::Enqueued);
        t.add(Event::Failed);
        assert_eq!(m.get(Event::Enqueued), 0);
        t.apply(&m);
        assert_eq!(m.get(Event::Enqueued), 2);
        assert_eq!(m.get(Event::Failed), 1);
        assert_eq!(m.get(Event::Succeeded), 0);
    }
}
