//! The policy both backends' pools of ready sandboxes follow (issue 20):
//! pre-made containers ([`crate::container::premade`]) and paused microVM
//! bases ([`crate::microvm::driver`]). What a pool holds and how a sandbox
//! is made and claimed is the backend's; how big each pool is and when it
//! is refilled is decided here, the same way for both:
//!
//! - **Demand** ([`Demand`]): cold starts are counted per pool key (a
//!   runtime for containers; runtime, memory and vCPUs for microVMs, whose
//!   memory size is fixed at boot) in buckets of [`DEMAND_BUCKET`]; a
//!   pool's demand is its busiest bucket within the configured window.
//! - **Targets** ([`plan`]): each pool aims at its demand (at least its
//!   floor: one for a built container runtime or a microVM `prewarm`
//!   size), at most `max_per_runtime`, and all pools together within the
//!   memory budget, each ready sandbox charged its cost (`sandbox_mb` for
//!   a container, the guest's memory size for a paused VM). The budget is
//!   shared out one sandbox at a time round the pools, the busiest first,
//!   so a small budget still gives every pool one before any gets two.
//! - **Pressure** ([`Meminfo`]): with less than
//!   [`PRESSURE_AVAILABLE_PERCENT`] of MemTotal available every target is
//!   zero: the pools shrink to nothing and stop refilling.
//! - **Refill** ([`Pacer`], [`next_to_make`]): one background task per
//!   driver removes sandboxes above their target first, then makes one
//!   for the emptiest pool (relative to its target) that fits the budget;
//!   it makes nothing while an ordinary cold start runs or within
//!   [`REFILL_QUIET`] of any cold start (it would compete with it for the
//!   same CPUs), unless it has made nothing for [`REFILL_MAX_DEFER`].

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Memory pressure: below this share of MemTotal available, the pools
/// shrink to nothing and stop refilling.
pub const PRESSURE_AVAILABLE_PERCENT: u64 = 10;
/// Demand is the busiest bucket of this length within the window.
pub const DEMAND_BUCKET: Duration = Duration::from_secs(10);
/// How long the refill waits after a failure, and between checks.
pub const RETRY_DELAY: Duration = Duration::from_secs(2);
pub const IDLE_CHECK: Duration = Duration::from_secs(5);
/// The refill makes nothing while an ordinary start runs or within this
/// long of any cold start (the new instance starts on the same CPUs)...
pub const REFILL_QUIET: Duration = Duration::from_millis(100);
/// ...unless it has made nothing for this long: under steady load it still
/// makes one a second.
pub const REFILL_MAX_DEFER: Duration = Duration::from_secs(1);

/// Cold starts per pool key in buckets of [`DEMAND_BUCKET`].
#[derive(Debug)]
pub struct Demand<K> {
    buckets: HashMap<K, VecDeque<(Instant, usize)>>,
}

impl<K> Default for Demand<K> {
    fn default() -> Self {
        Self {
            buckets: HashMap::new(),
        }
    }
}

impl<K: Copy + Eq + Hash> Demand<K> {
    /// One cold start of `key` at `now`.
    pub fn record(&mut self, key: K, now: Instant) {
        let q = self.buckets.entry(key).or_default();
        match q.back_mut() {
            Some((start, n)) if now.duration_since(*start) < DEMAND_BUCKET => *n += 1,
            _ => q.push_back((now, 1)),
        }
    }

    /// The busiest bucket of `key` within `window` before `now`.
    pub fn peak(&mut self, key: K, window: Duration, now: Instant) -> usize {
        let Some(q) = self.buckets.get_mut(&key) else {
            return 0;
        };
        while q
            .front()
            .is_some_and(|(start, _)| now.duration_since(*start) > window)
        {
            q.pop_front();
        }
        q.iter().map(|(_, n)| *n).max().unwrap_or(0)
    }

    /// Every key with demand within `window`, with its peak; keys whose
    /// demand left the window are forgotten.
    pub fn peaks(&mut self, window: Duration, now: Instant) -> Vec<(K, usize)> {
        let keys: Vec<K> = self.buckets.keys().copied().collect();
        let mut out = Vec::new();
        for k in keys {
            match self.peak(k, window, now) {
                0 => {
                    self.buckets.remove(&k);
                }
                n => out.push((k, n)),
            }
        }
        out
    }
}

/// What one pool asks of the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Want<K> {
    pub key: K,
    /// Its recent demand (see [`Demand::peak`]).
    pub demand: usize,
    /// Kept at least this many (within the budget) whatever the demand.
    pub floor: usize,
    /// What one of its ready sandboxes is charged, in MiB.
    pub cost_mb: u64,
}

/// The limits every pool of a driver shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub budget_mb: u64,
    pub max_per_key: usize,
}

/// How many sandboxes each pool aims at: its demand (at least its floor),
/// at most `max_per_key`, all of them within the budget (shared out one at
/// a time round the pools, the busiest first; equal ones in the order
/// given), none under pressure. Every key of `wants` is in the answer.
pub fn plan<K: Copy + Eq + Hash>(
    limits: &Limits,
    wants: &[Want<K>],
    under_pressure: bool,
) -> HashMap<K, usize> {
    let mut out: HashMap<K, usize> = wants.iter().map(|w| (w.key, 0)).collect();
    if under_pressure {
        return out;
    }
    let mut wanted: Vec<(K, usize, u64)> = wants
        .iter()
        .map(|w| {
            (
                w.key,
                w.demand.max(w.floor).min(limits.max_per_key),
                w.cost_mb.max(1),
            )
        })
        .collect();
    // Stable: equal demand keeps the caller's order.
    wanted.sort_by_key(|(_, want, _)| std::cmp::Reverse(*want));
    let mut left = limits.budget_mb;
    let mut progress = true;
    while progress {
        progress = false;
        for (k, want, cost) in &wanted {
            let have = out.get_mut(k).expect("every key is planned");
            if *have < *want && left >= *cost {
                *have += 1;
                left -= cost;
                progress = true;
            }
        }
    }
    out
}

/// Which pool to make a sandbox for next, if any: among those below their
/// target, the emptiest relative to its target (ties in `order`), if one
/// more of it fits the budget beside the `charged_mb` already held (ready
/// and being made).
pub fn next_to_make<K: Copy + Eq + Hash>(
    targets: &HashMap<K, usize>,
    have: impl Fn(&K) -> usize,
    cost_mb: impl Fn(&K) -> u64,
    charged_mb: u64,
    budget_mb: u64,
    order: impl Fn(&K, &K) -> std::cmp::Ordering,
) -> Option<K> {
    let mut short: Vec<(K, usize, usize)> = targets
        .iter()
        .filter(|(k, t)| have(k) < **t)
        .map(|(k, t)| (*k, have(k), *t))
        .collect();
    short.sort_by(|a, b| (a.1 * b.2).cmp(&(b.1 * a.2)).then(order(&a.0, &b.0)));
    short
        .into_iter()
        .map(|(k, _, _)| k)
        .find(|k| charged_mb + cost_mb(k) <= budget_mb)
}

/// Where memory pressure is read from: `/proc/meminfo`, or a file of the
/// same format (tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meminfo {
    pub path: PathBuf,
}

impl Default for Meminfo {
    fn default() -> Self {
        Self {
            path: PathBuf::from("/proc/meminfo"),
        }
    }
}

impl Meminfo {
    /// Whether the host is short of memory; unreadable: no.
    pub fn under_pressure(&self) -> bool {
        std::fs::read_to_string(&self.path)
            .map(|text| under_pressure_in(&text))
            .unwrap_or(false)
    }
}

/// Whether `meminfo` (the format of `/proc/meminfo`) says less than
/// [`PRESSURE_AVAILABLE_PERCENT`] of MemTotal is available.
pub fn under_pressure_in(meminfo: &str) -> bool {
    let field = |name: &str| {
        meminfo.lines().find_map(|l| {
            l.strip_prefix(name)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse::<u64>()
                .ok()
        })
    };
    match (field("MemTotal:"), field("MemAvailable:")) {
        (Some(total), Some(available)) => available * 100 < total * PRESSURE_AVAILABLE_PERCENT,
        _ => false,
    }
}

/// When the refill may work: cold starts tell it when they begin (claims
/// and ordinary ones) and hold an [`OrdinaryStart`] while an ordinary one
/// runs; it wakes the refill when they end.
#[derive(Debug, Default)]
pub struct Pacer {
    ordinary: AtomicUsize,
    last_start: Mutex<Option<Instant>>,
    wake: tokio::sync::Notify,
}

/// One cold start on the ordinary path (see [`Pacer::ordinary_start`]).
#[derive(Debug)]
pub struct OrdinaryStart {
    pacer: Arc<Pacer>,
}

impl Drop for OrdinaryStart {
    fn drop(&mut self) {
        if self.pacer.ordinary.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.pacer.wake.notify_one();
        }
    }
}

impl Pacer {
    /// A cold start (a claim, or a start the pool did not serve) at `now`.
    pub fn started(&self, now: Instant) {
        *self.last_start.lock().expect("lock") = Some(now);
    }

    /// Count a cold start on the ordinary path until the guard drops: the
    /// refill defers its work meanwhile (up to [`REFILL_MAX_DEFER`]), so a
    /// burst the pool cannot serve is not slowed by it refilling.
    pub fn ordinary_start(self: &Arc<Self>) -> OrdinaryStart {
        self.ordinary.fetch_add(1, Ordering::AcqRel);
        self.started(Instant::now());
        OrdinaryStart {
            pacer: self.clone(),
        }
    }

    /// Whether the refill, having last made a sandbox at `last_made`,
    /// should wait (for [`REFILL_QUIET`] or a wake-up) before making one.
    pub fn defer(&self, now: Instant, last_made: Instant) -> bool {
        let recent = self
            .last_start
            .lock()
            .expect("lock")
            .is_some_and(|t| now.saturating_duration_since(t) < REFILL_QUIET);
        let busy = self.ordinary.load(Ordering::Acquire) > 0 || recent;
        busy && now.saturating_duration_since(last_made) < REFILL_MAX_DEFER
    }

    /// Wake the refill (a pool changed, a start ended, shutdown).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Wait for [`Pacer::wake`] or `timeout`, whichever comes first.
    pub async fn sleep(&self, timeout: Duration) {
        tokio::select! {
            _ = self.wake.notified() => {}
            _ = tokio::time::sleep(timeout) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(key: &'static str, demand: usize, floor: usize, cost_mb: u64) -> Want<&'static str> {
        Want {
            key,
            demand,
            floor,
            cost_mb,
        }
    }

    #[test]
    fn targets_follow_demand_within_max_and_budget() {
        let limits = Limits {
            budget_mb: 4096,
            max_per_key: 16,
        };
        let p = plan(&limits, &[want("a", 24, 1, 32), want("b", 3, 1, 32)], false);
        assert_eq!((p["a"], p["b"]), (16, 3));
        // Floors hold idle pools; no floor and no demand: nothing.
        let p = plan(&limits, &[want("a", 0, 1, 32), want("b", 0, 0, 32)], false);
        assert_eq!((p["a"], p["b"]), (1, 0));
        // Pressure: everything goes.
        let p = plan(&limits, &[want("a", 24, 1, 32)], true);
        assert_eq!(p["a"], 0);
    }

    #[test]
    fn the_budget_is_shared_one_at_a_time_busiest_first() {
        let small = Limits {
            budget_mb: 256,
            max_per_key: 16,
        };
        let p = plan(&small, &[want("a", 24, 1, 32), want("b", 3, 1, 32)], false);
        assert_eq!(p["a"] + p["b"], 8);
        assert_eq!(p["b"], 3);
        let one = Limits {
            budget_mb: 32,
            ..small
        };
        let p = plan(&one, &[want("b", 3, 1, 32), want("a", 24, 1, 32)], false);
        assert_eq!((p["a"], p["b"]), (1, 0), "the busiest first");
        // Equal demand: the caller's order decides.
        let p = plan(&one, &[want("b", 2, 1, 32), want("a", 2, 1, 32)], false);
        assert_eq!((p["a"], p["b"]), (0, 1));
    }

    #[test]
    fn each_sandbox_is_charged_its_own_cost() {
        // 1024 MB: two 512 MB VMs, or one and four 128 MB ones.
        let limits = Limits {
            budget_mb: 1024,
            max_per_key: 8,
        };
        let p = plan(&limits, &[want("big", 5, 0, 512)], false);
        assert_eq!(p["big"], 2);
        let p = plan(
            &limits,
            &[want("big", 5, 0, 512), want("small", 4, 0, 128)],
            false,
        );
        assert_eq!((p["big"], p["small"]), (1, 4));
        let charged: u64 = p["big"] as u64 * 512 + p["small"] as u64 * 128;
        assert!(charged <= 1024);
        // A sandbox larger than the budget is never planned.
        let p = plan(&limits, &[want("huge", 3, 1, 2048)], false);
        assert_eq!(p["huge"], 0);
    }

    #[test]
    fn demand_is_the_busiest_bucket_in_the_window_on_a_fake_clock() {
        let mut d = Demand::default();
        let t0 = Instant::now();
        for _ in 0..5 {
            d.record("a", t0);
        }
        d.record("a", t0 + Duration::from_secs(30));
        let w = Duration::from_secs(60);
        assert_eq!(d.peak("a", w, t0 + Duration::from_secs(31)), 5);
        assert_eq!(d.peaks(w, t0 + Duration::from_secs(31)), [("a", 5)]);
        assert_eq!(d.peak("a", w, t0 + Duration::from_secs(70)), 1);
        assert_eq!(d.peak("a", w, t0 + Duration::from_secs(100)), 0);
        assert_eq!(d.peaks(w, t0 + Duration::from_secs(100)), []);
        assert!(d.buckets.is_empty(), "forgotten once out of the window");
        assert_eq!(d.peak("b", w, t0), 0);
    }

    #[test]
    fn the_emptiest_pool_that_fits_is_made_next() {
        let targets: HashMap<&str, usize> = [("a", 4), ("b", 2), ("c", 1)].into();
        let have = |_: &&str| 1;
        let order = |a: &&str, b: &&str| a.cmp(b);
        // a: 1/4 beats b: 1/2; c is full.
        assert_eq!(
            next_to_make(&targets, have, |_| 32, 96, 1024, order),
            Some("a")
        );
        // a's sandbox does not fit, b's does.
        let cost = |k: &&str| if *k == "a" { 512 } else { 32 };
        assert_eq!(
            next_to_make(&targets, have, cost, 600, 1024, order),
            Some("b")
        );
        // Nothing fits, or nothing is short.
        assert_eq!(
            next_to_make(&targets, have, |_| 32, 1000, 1024, order),
            None
        );
        assert_eq!(next_to_make(&targets, |_| 9, |_| 32, 0, 1024, order), None);
    }

    #[test]
    fn pressure_is_read_from_meminfo() {
        let meminfo = |available: u64| {
            format!("MemTotal:       1000000 kB\nMemFree:   5 kB\nMemAvailable:   {available} kB\n")
        };
        assert!(under_pressure_in(&meminfo(99_999)));
        assert!(!under_pressure_in(&meminfo(100_000)));
        assert!(!under_pressure_in("garbage"), "unreadable: no pressure");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meminfo");
        std::fs::write(&path, meminfo(50_000)).unwrap();
        assert!(Meminfo { path: path.clone() }.under_pressure());
        std::fs::write(&path, meminfo(500_000)).unwrap();
        assert!(!Meminfo { path }.under_pressure());
        assert!(!Meminfo {
            path: dir.path().join("missing")
        }
        .under_pressure());
    }

    #[tokio::test]
    async fn the_refill_waits_for_cold_starts_but_not_forever() {
        let pacer = Arc::new(Pacer::default());
        let t0 = Instant::now();
        let long_ago = t0 - Duration::from_secs(10);
        assert!(!pacer.defer(t0, long_ago), "idle: make");
        pacer.started(t0);
        assert!(pacer.defer(t0 + Duration::from_millis(50), t0));
        assert!(!pacer.defer(t0 + REFILL_QUIET, t0), "quiet again");
        let guard = pacer.ordinary_start();
        let now = Instant::now();
        let later = now + Duration::from_millis(500);
        assert!(pacer.defer(later, now), "an ordinary start runs");
        assert!(
            !pacer.defer(later, now - REFILL_MAX_DEFER),
            "made nothing for a second: make one anyway"
        );
        drop(guard);
        // The end of the last ordinary start wakes the refill at once.
        tokio::time::timeout(Duration::from_secs(1), pacer.sleep(Duration::from_secs(60)))
            .await
            .expect("woken");
        assert!(!pacer.defer(later, now));
    }
}
