//! What the scheduler placed on which node, as the internal listener needs
//! it before it hands an agent temporary credentials or a code package:
//! asked of the scheduler (never taken from the agent's own claim), with
//! a short cache of the "yes" answers so that an instance's start (code,
//! layers, credentials) asks once.
//!
//! Only positive answers are cached: an instance placed a moment ago is
//! never refused because of a stale "no". A "yes" is kept for [`TTL`]:
//! an instance destroyed within that window can still fetch what it was
//! given anyway (its own code, its own role's credentials).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_core::{FcError, InstanceId, NodeId};
use kiln_internal_api::PlacedInstance;

use crate::scheduler::SharedScheduler;

/// How long a "yes" from the scheduler is believed.
pub const TTL: Duration = Duration::from_secs(5);
/// Entries kept per cache before it is emptied (a bound, not a tuning
/// knob: a node starts a handful of instances per TTL).
const MAX_ENTRIES: usize = 10_000;

struct Cache<K, V> {
    entries: Mutex<HashMap<K, (Instant, V)>>,
}

impl<K: std::hash::Hash + Eq, V: Clone> Cache<K, V> {
    fn new() -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, key: &K) -> Option<V> {
        let entries = self.entries.lock().expect("placement cache lock");
        entries
            .get(key)
            .filter(|(at, _)| at.elapsed() < TTL)
            .map(|(_, v)| v.clone())
    }

    fn put(&self, key: K, value: V) {
        let mut entries = self.entries.lock().expect("placement cache lock");
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, (at, _)| at.elapsed() < TTL);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(key, (Instant::now(), value));
    }
}

/// The scheduler's placements, as the internal listener asks them.
pub struct Placements {
    scheduler: SharedScheduler,
    instances: Cache<(NodeId, InstanceId), PlacedInstance>,
    code: Cache<(NodeId, String), ()>,
}

impl Placements {
    pub fn new(scheduler: SharedScheduler) -> Self {
        Self {
            scheduler,
            instances: Cache::new(),
            code: Cache::new(),
        }
    }

    /// The function of `instance` if the scheduler placed it on `node`.
    pub async fn instance(
        &self,
        node: &NodeId,
        instance: &InstanceId,
    ) -> Result<Option<PlacedInstance>, FcError> {
        let key = (node.clone(), instance.clone());
        if let Some(placed) = self.instances.get(&key) {
            return Ok(Some(placed));
        }
        let placed = self
            .scheduler
            .placed_instance(node, instance)
            .await
            .map_err(|e| unreachable_scheduler(&e))?;
        if let Some(p) = &placed {
            self.instances.put(key, p.clone());
        }
        Ok(placed)
    }

    /// Whether `node` holds or creates an instance using `digest`.
    pub async fn code(&self, node: &NodeId, digest: &str) -> Result<bool, FcError> {
        let key = (node.clone(), digest.to_owned());
        if self.code.get(&key).is_some() {
            return Ok(true);
        }
        let uses = self
            .scheduler
            .node_uses_code(node, digest)
            .await
            .map_err(|e| unreachable_scheduler(&e))?;
        if uses {
            self.code.put(key, ());
        }
        Ok(uses)
    }
}

/// The scheduler could not answer: the agent retries (fail closed, never
/// "yes" by default).
fn unreachable_scheduler(e: &kiln_internal_api::InternalClientError) -> FcError {
    tracing::warn!(error = %e, "cannot ask the scheduler about a placement");
    FcError::unavailable("the scheduler cannot confirm the placement right now; retry")
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use futures_util::future::BoxFuture;

    use super::*;
    use crate::scheduler::SchedulerClient;

    /// Places instance i-1 (and code "ab") on n-a only; counts questions.
    #[derive(Default)]
    struct OnePlacement {
        asked: AtomicUsize,
    }

    type R<T> = Result<T, kiln_internal_api::InternalClientError>;

    fn nope<T>() -> R<T> {
        Err(kiln_internal_api::InternalClientError::Transport {
            url: "fake://".into(),
            message: "not used".into(),
        })
    }

    impl SchedulerClient for OnePlacement {
        fn acquire_lease(&self, _: bytes::Bytes) -> BoxFuture<'_, R<kiln_internal_api::Lease>> {
            Box::pin(async { nope() })
        }
        fn release_lease<'a>(
            &'a self,
            _: &'a kiln_core::LeaseId,
            _: kiln_internal_api::LeaseOutcome,
        ) -> BoxFuture<'a, R<()>> {
            Box::pin(async { nope() })
        }
        fn retire_function<'a>(
            &'a self,
            _: &'a kiln_internal_api::RetireFunction,
        ) -> BoxFuture<'a, R<()>> {
            Box::pin(async { nope() })
        }
        fn nodes(&self) -> BoxFuture<'_, R<Vec<kiln_internal_api::NodeInfo>>> {
            Box::pin(async { nope() })
        }
        fn instances(&self) -> BoxFuture<'_, R<Vec<kiln_internal_api::InstanceInfo>>> {
            Box::pin(async { nope() })
        }
        fn provisions<'a>(
            &'a self,
            _: &'a kiln_core::AccountId,
        ) -> BoxFuture<'a, R<Vec<kiln_internal_api::ProvisionDetail>>> {
            Box::pin(async { nope() })
        }
        fn put_provision<'a>(
            &'a self,
            _: &'a kiln_internal_api::PutProvision,
        ) -> BoxFuture<'a, R<kiln_internal_api::ProvisionStatus>> {
            Box::pin(async { nope() })
        }
        fn delete_provision<'a>(
            &'a self,
            _: &'a kiln_internal_api::FunctionRef,
        ) -> BoxFuture<'a, R<()>> {
            Box::pin(async { nope() })
        }
        fn account_limits<'a>(
            &'a self,
            _: &'a kiln_core::AccountId,
        ) -> BoxFuture<'a, R<kiln_internal_api::AccountLimits>> {
            Box::pin(async { nope() })
        }
        fn set_function_limits<'a>(
            &'a self,
            _: &'a kiln_core::AccountId,
            _: &'a kiln_core::FunctionName,
            _: Option<&'a kiln_internal_api::FunctionLimits>,
        ) -> BoxFuture<'a, R<kiln_internal_api::AccountLimits>> {
            Box::pin(async { nope() })
        }
        fn placed_instance<'a>(
            &'a self,
            node: &'a NodeId,
            instance: &'a InstanceId,
        ) -> BoxFuture<'a, R<Option<PlacedInstance>>> {
            self.asked.fetch_add(1, Ordering::SeqCst);
            let yes = node.as_str() == "n-a" && instance.as_str() == "i-1";
            Box::pin(async move {
                Ok(yes.then(|| PlacedInstance {
                    account_id: "123".parse().unwrap(),
                    function_name: "f".parse().unwrap(),
                    role: None,
                }))
            })
        }
        fn node_uses_code<'a>(
            &'a self,
            node: &'a NodeId,
            digest: &'a str,
        ) -> BoxFuture<'a, R<bool>> {
            self.asked.fetch_add(1, Ordering::SeqCst);
            let yes = node.as_str() == "n-a" && digest == "ab";
            Box::pin(async move { Ok(yes) })
        }
    }

    #[tokio::test]
    async fn yes_is_cached_and_no_is_asked_again() {
        let sched = Arc::new(OnePlacement::default());
        let p = Placements::new(sched.clone());
        let a: NodeId = "n-a".parse().unwrap();
        let b: NodeId = "n-b".parse().unwrap();
        let i1: InstanceId = "i-1".parse().unwrap();
        assert!(p.instance(&a, &i1).await.unwrap().is_some());
        assert!(p.instance(&a, &i1).await.unwrap().is_some());
        assert_eq!(sched.asked.load(Ordering::SeqCst), 1);
        assert!(p.instance(&b, &i1).await.unwrap().is_none());
        assert!(p.instance(&b, &i1).await.unwrap().is_none());
        assert_eq!(sched.asked.load(Ordering::SeqCst), 3);
        assert!(p.code(&a, "ab").await.unwrap());
        assert!(p.code(&a, "ab").await.unwrap());
        assert!(!p.code(&b, "ab").await.unwrap());
        assert!(!p.code(&a, "cd").await.unwrap());
        assert_eq!(sched.asked.load(Ordering::SeqCst), 6);
    }
}
