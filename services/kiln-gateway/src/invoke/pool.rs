//! A short-lived pool of leases per function revision, so a warm call does
//! not pay two scheduler round trips. After a call that left its instance
//! healthy, the lease is parked for `hold` before it is released; a call of
//! the same revision in that window takes it over. The scheduler keeps
//! seeing the slot as busy, so bin-packing and idle release stay correct
//! (an instance is at most `hold` late to go idle).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_internal_api::{Lease, LeaseOutcome};

use crate::scheduler::SharedScheduler;

struct Parked {
    lease: Lease,
    until: Instant,
}

pub struct LeasePool {
    hold: Duration,
    scheduler: SharedScheduler,
    parked: Mutex<HashMap<String, Vec<Parked>>>,
}

impl LeasePool {
    pub fn new(hold: Duration, scheduler: SharedScheduler) -> Arc<Self> {
        Arc::new(Self {
            hold,
            scheduler,
            parked: Mutex::new(HashMap::new()),
        })
    }

    /// A parked lease of `revision` still inside its window.
    pub fn take(&self, revision: &str) -> Option<Lease> {
        if self.hold.is_zero() {
            return None;
        }
        let now = Instant::now();
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        let list = parked.get_mut(revision)?;
        // Most recently parked first: its instance is the warmest.
        while let Some(p) = list.pop() {
            if p.until > now {
                return Some(p.lease);
            }
            // Expired: the sweeper would release it; do it here instead.
            self.release(p.lease, LeaseOutcome::Ok);
        }
        None
    }

    /// The call on `lease` ended: park a healthy lease, release the rest.
    pub fn give_back(&self, revision: &str, lease: Lease, outcome: LeaseOutcome) {
        if self.hold.is_zero() || outcome != LeaseOutcome::Ok {
            self.release(lease, outcome);
            return;
        }
        let parked_lease = Parked {
            lease,
            until: Instant::now() + self.hold,
        };
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        // The revision is copied only the first time it parks a lease.
        match parked.get_mut(revision) {
            Some(list) => list.push(parked_lease),
            None => {
                parked.insert(revision.to_owned(), vec![parked_lease]);
            }
        }
    }

    /// Release every lease whose window has passed (all of them if `all`).
    pub fn sweep(&self, all: bool) -> usize {
        let expired = self.drain(all);
        let n = expired.len();
        for lease in expired {
            self.release(lease, LeaseOutcome::Ok);
        }
        n
    }

    fn drain(&self, all: bool) -> Vec<Lease> {
        let now = Instant::now();
        let mut expired = Vec::new();
        {
            let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
            parked.retain(|_, list| {
                let (gone, keep): (Vec<_>, Vec<_>) =
                    list.drain(..).partition(|p| all || p.until <= now);
                expired.extend(gone.into_iter().map(|p| p.lease));
                *list = keep;
                !list.is_empty()
            });
        }
        expired
    }

    pub fn parked(&self) -> usize {
        self.parked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(Vec::len)
            .sum()
    }

    /// DELETE the lease at the scheduler, in the background.
    pub fn release(&self, lease: Lease, outcome: LeaseOutcome) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(release(self.scheduler.clone(), lease, outcome));
    }

    /// Release expired leases every `hold / 2` until `stop` resolves, then
    /// release all.
    pub async fn run_sweeper(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        if self.hold.is_zero() {
            stop.await;
            return;
        }
        tokio::pin!(stop);
        let mut tick = tokio::time::interval((self.hold / 2).max(Duration::from_millis(10)));
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = tick.tick() => { self.sweep(false); }
            }
        }
        for lease in self.drain(true) {
            release(self.scheduler.clone(), lease, LeaseOutcome::Ok).await;
        }
    }
}

async fn release(scheduler: SharedScheduler, lease: Lease, outcome: LeaseOutcome) {
    if let Err(e) = scheduler.release_lease(&lease.lease_id, outcome).await {
        tracing::warn!(lease = %lease.lease_id, error = %e, "cannot release lease");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::fake::FakeScheduler;
    use kiln_core::{InstanceId, LeaseId, NodeId};

    fn lease() -> Lease {
        Lease {
            lease_id: LeaseId::generate(),
            instance_id: InstanceId::generate(),
            node_id: NodeId::generate(),
            agent_url: "https://127.0.0.1:1".into(),
            cold_start: false,
        }
    }

    fn pool(hold_ms: u64) -> (Arc<LeasePool>, Arc<FakeScheduler>) {
        let scheduler = Arc::new(FakeScheduler::default());
        let pool = LeasePool::new(Duration::from_millis(hold_ms), scheduler.clone());
        (pool, scheduler)
    }

    /// Releases run in the background: wait for `n` of them.
    async fn released(s: &FakeScheduler, n: usize) -> Vec<(LeaseId, LeaseOutcome)> {
        for _ in 0..200 {
            if s.released.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        s.released.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn healthy_leases_are_reused_within_the_window_only() {
        let (p, s) = pool(100);
        let l = lease();
        p.give_back("r1", l.clone(), LeaseOutcome::Ok);
        assert!(p.take("r2").is_none(), "another revision never gets it");
        assert_eq!(p.take("r1").unwrap().lease_id, l.lease_id);
        assert!(p.take("r1").is_none());
        let failed = lease();
        p.give_back("r1", failed.clone(), LeaseOutcome::InstanceFailed);
        assert_eq!(p.parked(), 0, "a failed instance's lease is released");
        assert_eq!(
            released(&s, 1).await,
            vec![(failed.lease_id, LeaseOutcome::InstanceFailed)]
        );
        p.give_back("r1", lease(), LeaseOutcome::Ok);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(p.take("r1").is_none(), "expired leases are not handed out");
        p.give_back("r1", lease(), LeaseOutcome::Ok);
        assert_eq!(p.sweep(false), 0);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(p.sweep(false), 1);
        assert_eq!(p.parked(), 0);
        assert_eq!(released(&s, 3).await.len(), 3, "swept leases go back as ok");
    }

    #[tokio::test]
    async fn zero_hold_disables_parking() {
        let (p, s) = pool(0);
        let l = lease();
        p.give_back("r1", l.clone(), LeaseOutcome::Ok);
        assert_eq!(p.parked(), 0);
        assert_eq!(released(&s, 1).await, vec![(l.lease_id, LeaseOutcome::Ok)]);
        assert!(p.take("r1").is_none());
    }
}
