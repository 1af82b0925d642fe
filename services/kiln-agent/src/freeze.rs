//! Idle freezing: an instance with no call in flight is frozen (cgroup
//! freezer for containers, `vm.pause` for microVMs) a short, configurable
//! delay after its last call ends, and thawed before its next call runs.
//! A frozen instance uses no CPU; its memory stays.
//!
//! Per instance, one async lock orders freezes and thaws: a call marks
//! itself in flight first and then takes the lock, and a pending freeze
//! checks under the same lock that nothing is in flight and no call came
//! since it was scheduled, so a call never runs on a frozen instance.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_core::InstanceId;
use kiln_sandbox::{SandboxDriver, SandboxError};
use tracing::Instrument;

use crate::instances::Instance;
use crate::usage::UsageMetrics;

const OFF: u64 = u64::MAX;

#[derive(Default)]
struct Entry {
    /// Whether the sandbox is frozen; held across a freeze or a thaw.
    frozen: tokio::sync::Mutex<bool>,
    /// Bumped by every call, so a freeze scheduled before it gives up.
    generation: AtomicU64,
    /// The instance is going away: nothing freezes it again.
    released: AtomicBool,
}

/// Freezes idle instances and thaws them for their calls.
pub struct Freezer {
    driver: Arc<dyn SandboxDriver>,
    metrics: Arc<UsageMetrics>,
    delay_ms: AtomicU64,
    entries: Mutex<HashMap<InstanceId, Arc<Entry>>>,
}

impl Freezer {
    /// A freezer that is off until [`Freezer::set_delay`] turns it on.
    pub fn new(driver: Arc<dyn SandboxDriver>, metrics: Arc<UsageMetrics>) -> Self {
        Self {
            driver,
            metrics,
            delay_ms: AtomicU64::new(OFF),
            entries: Mutex::default(),
        }
    }

    /// Freeze instances `delay` after their last call; None: never.
    pub fn set_delay(&self, delay: Option<Duration>) {
        let ms = delay.map_or(OFF, |d| (d.as_millis() as u64).min(OFF - 1));
        self.delay_ms.store(ms, Ordering::Relaxed);
    }

    fn delay(&self) -> Option<Duration> {
        match self.delay_ms.load(Ordering::Relaxed) {
            OFF => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    fn entry(&self, id: &InstanceId) -> Arc<Entry> {
        let mut entries = self.entries.lock().expect("freezer lock");
        // Every call looks its entry up: the id is copied only when new.
        if let Some(entry) = entries.get(id) {
            return entry.clone();
        }
        entries.entry(id.clone()).or_default().clone()
    }

    /// Whether the instance is frozen now.
    pub fn is_frozen(&self, id: &InstanceId) -> bool {
        let entry = self.entries.lock().expect("freezer lock").get(id).cloned();
        entry.is_some_and(|e| e.frozen.try_lock().map(|f| *f).unwrap_or(false))
    }

    /// Before a call runs (the call is already counted in flight): thaw
    /// the instance if it is frozen. Returns how long the thaw took.
    pub async fn before_call(&self, id: &InstanceId) -> Result<Option<Duration>, SandboxError> {
        self.thaw_entry(id, &self.entry(id)).await
    }

    /// Cancel any pending freeze of the entry and thaw it if it is frozen;
    /// how long the thaw took, None when it was not frozen.
    async fn thaw_entry(
        &self,
        id: &InstanceId,
        entry: &Entry,
    ) -> Result<Option<Duration>, SandboxError> {
        entry.generation.fetch_add(1, Ordering::AcqRel);
        let mut frozen = entry.frozen.lock().await;
        if !*frozen {
            return Ok(None);
        }
        let started = Instant::now();
        self.driver.thaw(id).await?;
        let took = started.elapsed();
        *frozen = false;
        self.metrics.thawed(id, took);
        tracing::debug!(instance_id = %id, thaw_us = took.as_micros() as u64, "instance thawed");
        Ok(Some(took))
    }

    /// An instance turned always-allocated (FC's `alwaysAllocateCPU`):
    /// give up any pending freeze and thaw it now if it is frozen, so its
    /// background work runs again without waiting for a call.
    pub async fn hold(&self, id: &InstanceId) -> Result<(), SandboxError> {
        let entry = self.entries.lock().expect("freezer lock").get(id).cloned();
        if let Some(entry) = entry {
            self.thaw_entry(id, &entry).await?;
        }
        Ok(())
    }

    /// After a call ended: when nothing is in flight, freeze the instance
    /// after the delay unless another call comes first. An instance with
    /// FC's `alwaysAllocateCPU` is never frozen.
    pub fn after_call(self: &Arc<Self>, instance: &Arc<Instance>) {
        let Some(delay) = self.delay() else { return };
        if instance.in_flight() > 0
            || !instance.state().can_invoke()
            || instance.always_allocate_cpu()
        {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let entry = self.entry(&instance.id);
        let generation = entry.generation.load(Ordering::Acquire);
        let this = self.clone();
        let instance = instance.clone();
        let span = tracing::debug_span!("instance_freeze", instance_id = %instance.id);
        runtime.spawn(
            async move {
                tokio::time::sleep(delay).await;
                let mut frozen = entry.frozen.lock().await;
                let idle = instance.in_flight() == 0
                    && entry.generation.load(Ordering::Acquire) == generation
                    && !entry.released.load(Ordering::Acquire)
                    && instance.state().can_invoke()
                    && !instance.always_allocate_cpu();
                if *frozen || !idle {
                    return;
                }
                match this.driver.freeze(&instance.id).await {
                    Ok(()) => {
                        *frozen = true;
                        this.metrics.frozen(&instance.id);
                        tracing::debug!("idle instance frozen");
                    }
                    Err(e) => {
                        this.metrics.freeze_failed();
                        tracing::warn!(error = %kiln_core::error_chain(&e), "cannot freeze idle instance");
                    }
                }
            }
            .instrument(span),
        );
    }

    /// The instance is going away (PreStop, destroy): thaw it so its
    /// processes can stop, and never freeze it again.
    pub async fn release(&self, id: &InstanceId) {
        let entry = self.entries.lock().expect("freezer lock").remove(id);
        let Some(entry) = entry else { return };
        entry.released.store(true, Ordering::Release);
        let mut frozen = entry.frozen.lock().await;
        if *frozen {
            match self.driver.thaw(id).await {
                Ok(()) => *frozen = false,
                Err(e) => {
                    tracing::warn!(instance_id = %id, error = %kiln_core::error_chain(&e), "cannot thaw released instance")
                }
            }
        }
        self.metrics.forget_frozen(id);
    }
}

/// Keeps an instance awake for work that is not a call (an InstanceExec
/// session): counted in flight, so no freeze can start, until dropped.
pub struct AwakeGuard {
    manager: Arc<crate::instances::InstanceManager>,
    instance: Arc<Instance>,
}

impl Drop for AwakeGuard {
    fn drop(&mut self) {
        self.instance.leave(self.manager.clock.now_ms());
        self.manager.freezer.after_call(&self.instance);
    }
}

impl crate::instances::InstanceManager {
    /// Thaw `instance` if it is frozen and keep it from being frozen while
    /// the guard lives (move the guard into whatever runs the session).
    pub async fn hold_awake(
        self: &Arc<Self>,
        instance: &Arc<Instance>,
    ) -> Result<AwakeGuard, SandboxError> {
        instance.enter(self.clock.now_ms());
        let guard = AwakeGuard {
            manager: self.clone(),
            instance: instance.clone(),
        };
        self.freezer.before_call(&instance.id).await?;
        Ok(guard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{manager, sample_spec, FakeCodeSource, FakeDriver};
    use kiln_internal_api::CreateInstance;

    async fn wait_frozen(driver: &FakeDriver, id: &InstanceId, frozen: bool) {
        for _ in 0..500 {
            if driver.is_frozen(id) == frozen {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("instance {id} never became frozen={frozen}");
    }

    /// A call's bracket as the forwarder runs it.
    async fn call(m: &crate::instances::InstanceManager, i: &Arc<Instance>) {
        i.enter(0);
        m.freezer.before_call(&i.id).await.unwrap();
        i.leave(0);
        m.freezer.after_call(i);
    }

    #[tokio::test]
    async fn always_allocated_instances_are_never_frozen_and_the_flag_follows_the_scheduler() {
        let runtime = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let driver = Arc::new(FakeDriver::at(runtime.local_addr().unwrap()));
        let code = Arc::new(FakeCodeSource::new(Duration::ZERO));
        let digest = code.add(b"zip".to_vec());
        let m = manager(dir.path(), driver.clone(), code.clone());
        m.freezer.set_delay(Some(Duration::from_millis(20)));
        let mut ids = Vec::new();
        for always_allocate_cpu in [true, false] {
            let id = InstanceId::generate();
            m.create(CreateInstance {
                instance_id: id.clone(),
                spec: sample_spec(&digest, 9000),
                always_allocate_cpu,
            })
            .await
            .unwrap();
            ids.push(id);
        }
        let (always, on_demand) = (
            m.get(ids[0].as_str()).unwrap(),
            m.get(ids[1].as_str()).unwrap(),
        );
        assert!(always.always_allocate_cpu() && !on_demand.always_allocate_cpu());
        let listed: Vec<bool> = ids
            .iter()
            .map(|id| {
                m.list()
                    .into_iter()
                    .find(|i| &i.instance_id == id)
                    .unwrap()
                    .always_allocate_cpu
            })
            .collect();
        assert_eq!(listed, vec![true, false]);

        // After a call each, only the on-demand one is frozen: the
        // always-allocated one schedules no freeze at all.
        call(&m, &always).await;
        call(&m, &on_demand).await;
        wait_frozen(&driver, &on_demand.id, true).await;
        assert!(!driver.is_frozen(&always.id));
        assert_eq!(driver.freeze_counts(), (1, 0));

        // The scheduler drops the flag (alwaysAllocateCPU turned off): the
        // idle instance is frozen like any other, without waiting for a call.
        m.set_always_allocate_cpu(&[]).await;
        assert!(!always.always_allocate_cpu());
        wait_frozen(&driver, &always.id, true).await;
        // ...and sets it again: thawed at once, its background work resumes.
        m.set_always_allocate_cpu(std::slice::from_ref(&always.id))
            .await;
        assert!(!driver.is_frozen(&always.id));
        assert!(driver.is_frozen(&on_demand.id), "others stay frozen");
        assert_eq!(driver.freeze_counts(), (2, 1));

        // A freeze already pending when the flag is set gives up: the
        // instance is still thawed once a freeze would long have happened,
        // and a later call never freezes it.
        call(&m, &on_demand).await;
        m.set_always_allocate_cpu(&ids).await;
        call(&m, &on_demand).await;
        call(&m, &always).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!driver.is_frozen(&on_demand.id) && !driver.is_frozen(&always.id));
        assert_eq!(driver.freeze_counts(), (2, 2));

        // A restarted agent keeps the flag from its records.
        m.set_always_allocate_cpu(std::slice::from_ref(&always.id))
            .await;
        let restarted = manager(dir.path(), driver.clone(), code);
        restarted.reconcile().await.unwrap();
        assert!(restarted
            .get(ids[0].as_str())
            .unwrap()
            .always_allocate_cpu());
        assert!(!restarted
            .get(ids[1].as_str())
            .unwrap()
            .always_allocate_cpu());
    }
}
