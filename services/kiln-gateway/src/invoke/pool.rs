//! A short-lived pool of leases per function revision, so a warm call does
//! not pay two scheduler round trips. After a call that left its instance
//! healthy, the lease is parked for `hold` before it is released; a call of
//! the same revision in that window takes it over. The scheduler keeps
//! seeing the slot as busy, so bin-packing and idle release stay correct
//! (an instance is at most `hold` late to go idle).
//!
//! A lease lives only as long as the scheduler granted it for
//! ([`Lease::expires_in_ms`]): past that the scheduler writes it off and
//! hands the slot to another call. So a parked lease is handed to a call
//! only if that call's whole deadline fits before the lease's expiry, and
//! one that no longer fits is released: under steady load each lease is
//! given back and a fresh one acquired once per lifetime, never used
//! past it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_internal_api::{Lease, LeaseOutcome};

use crate::scheduler::SharedScheduler;

/// A lease and when the scheduler writes it off.
#[derive(Debug, Clone)]
pub struct Held {
    pub lease: Lease,
    /// The scheduler's expiry, measured from when the grant arrived (a
    /// little after the scheduler's own clock started it; its grace,
    /// tens of seconds, covers the difference).
    pub expires: Instant,
}

impl Held {
    /// `lease` as granted at `at`. A lease without an expiry is good for
    /// the call it was acquired for only.
    pub fn granted(lease: Lease, at: Instant) -> Self {
        let expires = at + Duration::from_millis(lease.expires_in_ms);
        Self { lease, expires }
    }

    /// Whether a call that may run for `need` can start on it at `now`.
    fn fits(&self, now: Instant, need: Duration) -> bool {
        now + need < self.expires
    }
}

struct Parked {
    held: Held,
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

    /// A parked lease of `revision` still inside its window, on which a
    /// call lasting up to `need` ends before the scheduler's expiry.
    pub fn take(&self, revision: &str, need: Duration) -> Option<Held> {
        if self.hold.is_zero() {
            return None;
        }
        let now = Instant::now();
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        let list = parked.get_mut(revision)?;
        // Most recently parked first: its instance is the warmest.
        while let Some(p) = list.pop() {
            if p.until > now && p.held.fits(now, need) {
                return Some(p.held);
            }
            // Out of its window, or too near its expiry for this call:
            // give it back now rather than let the scheduler write it off.
            self.release(p.held.lease, LeaseOutcome::Ok);
        }
        None
    }

    /// The call on `held` ended: park a healthy lease that can still serve
    /// another call of up to `need` after the window, release the rest.
    pub fn give_back(&self, revision: &str, held: Held, need: Duration, outcome: LeaseOutcome) {
        let now = Instant::now();
        if self.hold.is_zero() || outcome != LeaseOutcome::Ok || !held.fits(now, need + self.hold) {
            self.release(held.lease, outcome);
            return;
        }
        let p = Parked {
            held,
            until: now + self.hold,
        };
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        // The revision is copied only the first time it parks a lease.
        match parked.get_mut(revision) {
            Some(list) => list.push(p),
            None => {
                parked.insert(revision.to_owned(), vec![p]);
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
                expired.extend(gone.into_iter().map(|p| p.held.lease));
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

    /// A call's deadline in these tests.
    const NEED: Duration = Duration::from_millis(50);

    /// A lease granted now for `life_ms`.
    fn lease_for(life_ms: u64) -> Held {
        Held::granted(
            Lease {
                lease_id: LeaseId::generate(),
                instance_id: InstanceId::generate(),
                node_id: NodeId::generate(),
                agent_url: "https://127.0.0.1:1".into(),
                cold_start: false,
                expires_in_ms: life_ms,
            },
            Instant::now(),
        )
    }

    fn lease() -> Held {
        lease_for(600_000)
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
        let id = l.lease.lease_id.clone();
        p.give_back("r1", l, NEED, LeaseOutcome::Ok);
        assert!(
            p.take("r2", NEED).is_none(),
            "another revision never gets it"
        );
        assert_eq!(p.take("r1", NEED).unwrap().lease.lease_id, id);
        assert!(p.take("r1", NEED).is_none());
        let failed = lease();
        let failed_id = failed.lease.lease_id.clone();
        p.give_back("r1", failed, NEED, LeaseOutcome::InstanceFailed);
        assert_eq!(p.parked(), 0, "a failed instance's lease is released");
        assert_eq!(
            released(&s, 1).await,
            vec![(failed_id, LeaseOutcome::InstanceFailed)]
        );
        p.give_back("r1", lease(), NEED, LeaseOutcome::Ok);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(
            p.take("r1", NEED).is_none(),
            "expired leases are not handed out"
        );
        p.give_back("r1", lease(), NEED, LeaseOutcome::Ok);
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
        let id = l.lease.lease_id.clone();
        p.give_back("r1", l, NEED, LeaseOutcome::Ok);
        assert_eq!(p.parked(), 0);
        assert_eq!(released(&s, 1).await, vec![(id, LeaseOutcome::Ok)]);
        assert!(p.take("r1", NEED).is_none());
    }

    /// The soak's bug: a lease handed from call to call was never given
    /// back, the scheduler wrote it off at its expiry while a call was on
    /// it and gave the slot to another. Now no call starts on a lease it
    /// could outlive, and such a lease goes back to the scheduler instead.
    #[tokio::test]
    async fn a_lease_is_never_used_past_its_expiry() {
        let hold = Duration::from_millis(100);
        let (p, s) = pool(100);
        // Granted for 300 ms, for calls of up to 50 ms.
        let l = lease_for(300);
        let id = l.lease.lease_id.clone();
        let expires = l.expires;
        let mut uses = 0;
        let mut current = Some(l);
        // Back to back calls: each takes the parked lease, runs, parks it.
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(600) {
            if let Some(held) = current.take() {
                p.give_back("r1", held, NEED, LeaseOutcome::Ok);
            }
            match p.take("r1", NEED) {
                Some(held) => {
                    assert!(
                        Instant::now() + NEED < expires,
                        "a call was started on a lease it may outlive"
                    );
                    uses += 1;
                    current = Some(held);
                }
                None => break,
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            uses > 5,
            "the lease was reused while it fitted ({uses} uses)"
        );
        assert!(
            Instant::now() + NEED + hold + Duration::from_millis(30) >= expires,
            "it stopped being handed out only near its expiry"
        );
        assert_eq!(p.parked(), 0, "it is not parked any more");
        assert!(
            Instant::now() < expires,
            "and it went back before the scheduler's expiry"
        );
        assert_eq!(released(&s, 1).await, vec![(id, LeaseOutcome::Ok)]);
    }

    #[tokio::test]
    async fn leases_without_an_expiry_serve_one_call() {
        let (p, s) = pool(10_000);
        let l = lease_for(0);
        let id = l.lease.lease_id.clone();
        p.give_back("r1", l, NEED, LeaseOutcome::Ok);
        assert_eq!(p.parked(), 0);
        assert!(p.take("r1", NEED).is_none());
        assert_eq!(released(&s, 1).await, vec![(id, LeaseOutcome::Ok)]);
    }

    #[tokio::test]
    async fn a_parked_lease_too_old_for_a_longer_call_is_released() {
        // Parked for 50 ms calls, then a call of the same revision with a
        // longer deadline (the function's timeout was raised) arrives.
        let (p, s) = pool(100);
        let l = lease_for(1_000);
        let id = l.lease.lease_id.clone();
        p.give_back("r1", l, NEED, LeaseOutcome::Ok);
        assert_eq!(p.parked(), 1);
        assert!(p.take("r1", Duration::from_secs(5)).is_none());
        assert_eq!(p.parked(), 0);
        assert_eq!(released(&s, 1).await, vec![(id, LeaseOutcome::Ok)]);
    }
}
