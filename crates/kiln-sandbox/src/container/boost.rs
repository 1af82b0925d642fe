//! The cold-start boost: an instance starts with more CPU than its own
//! (FC gives a cold start up to 20 s of it) and drops to its quota after
//! the configured window.

use kiln_core::InstanceId;
use tracing::Instrument;

use super::ContainerDriver;

impl ContainerDriver {
    /// The CPU an instance starts with, when it is more than its own.
    pub(super) fn boost_cpu_milli(&self, spec: &kiln_core::InstanceSpec) -> Option<u32> {
        let boost = self.config.cold_start_cpu_milli;
        (self.config.cold_start_boost_ms > 0 && boost > crate::process::instance_cpu_milli(spec))
            .then_some(boost)
    }

    /// After the cold-start window, drop the instance to its steady quota.
    pub(super) fn end_boost_later(&self, id: &InstanceId, cpu_milli: u32) {
        let cgroups = self.cgroups.clone();
        let path = self.cgroups_path(id);
        let window = std::time::Duration::from_millis(self.config.cold_start_boost_ms);
        let span = tracing::debug_span!("cold_start_boost", instance_id = %id);
        let task = tokio::spawn(
            async move {
                tokio::time::sleep(window).await;
                let quota = crate::cgroup::cpu_quota(cpu_milli);
                match cgroups.set_cpu_quota(&path, quota, crate::cgroup::CPU_PERIOD_US) {
                    Ok(()) => tracing::debug!(quota, "cold-start boost over"),
                    Err(e) => tracing::warn!(error = %kiln_core::error_chain(&e), "cannot end the cold-start boost"),
                }
            }
            .instrument(span),
        );
        if let Some(old) = self.boosts.lock().expect("lock").insert(id.clone(), task) {
            old.abort();
        }
    }
}
