//! Remembers `x-acs-signature-nonce`s for as long as the request that
//! carried them could still be accepted, so a replay inside the window is
//! refused, with a fair share of the cache for every account.
//!
//! Sizing: a nonce must be remembered until its request's date leaves the
//! skew window (date + skew, so up to twice the skew after it arrives for
//! a request dated in the future). A gateway provisioned for `R` signed
//! requests per second with a skew of `S` seconds holds about `R * S`
//! nonces at steady state; that is the cache's `capacity`
//! ([`NonceLimits::for_rate`]).
//!
//! Fairness: every account has its own sub-cache behind its own lock. An
//! account may hold at most `account_max` nonces; and once the whole cache
//! holds `capacity`, an account holding more than its fair share
//! (`capacity / accounts with live nonces`) is refused while accounts
//! below their share are still admitted. One tenant sending at any rate
//! is therefore throttled (FC's `ResourceThrottled`, for that tenant only)
//! instead of turning the cache into a refusal for everyone; the total
//! never exceeds `2 * capacity`. Nothing is ever evicted early: forgetting
//! a nonce would re-open the replay window for it.
//!
//! Memory: entries are salted 64-bit digests of (access key id, nonce),
//! never the strings, kept in hash sets by expiry bucket (a sixtieth of
//! the window each), so a nonce costs 10 to 21 bytes (9 bytes a slot, at
//! a load between 7/16 and 7/8; `tests/nonce_memory.rs` measures it). A
//! bucket is dropped whole once everything in it has expired: a nonce is
//! remembered up to one bucket longer than needed, never shorter. A false
//! "used already" needs a 64-bit collision inside one account's window
//! (about `n / 2^64` per request with `n` nonces remembered).

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use sha2::{Digest, Sha256};

/// Why a nonce was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NonceError {
    #[error("Specified signature nonce was used already")]
    Replayed,
    /// The account holds its share of the replay cache.
    #[error("Too many signed requests of this account in the signature window")]
    AccountThrottled,
}

/// How big the cache may grow and how it is shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NonceLimits {
    /// Nonces the cache holds before accounts over their fair share are
    /// refused.
    pub capacity: usize,
    /// The most one account may hold, whatever the others do.
    pub account_max: usize,
    /// The longest a nonce is remembered (twice the skew): sets the
    /// expiry buckets' width.
    pub window_ms: u64,
}

impl NonceLimits {
    /// The default provisioned rate: a two-core gateway's full rate of
    /// signed warm calls is about 14,000 per second.
    pub const DEFAULT_RATE: u64 = 15_000;

    /// Capacity for `rate_per_s` signed requests per second sustained
    /// under a skew of `skew_ms` (`rate * skew`), every account allowed
    /// `account_rate_per_s` of it.
    pub fn for_rate(rate_per_s: u64, account_rate_per_s: u64, skew_ms: u64) -> Self {
        let per = |rate: u64| {
            usize::try_from(rate.saturating_mul(skew_ms) / 1000)
                .unwrap_or(usize::MAX)
                .max(1)
        };
        let capacity = per(rate_per_s);
        Self {
            capacity,
            account_max: per(account_rate_per_s).min(capacity),
            window_ms: skew_ms.saturating_mul(2).max(1),
        }
    }
}

const BUCKETS_PER_WINDOW: u64 = 60;
/// The whole cache is swept (expired buckets of idle accounts dropped)
/// at most this often.
const GLOBAL_SWEEP_MS: u64 = 1_000;

/// A bounded, per-account fair replay cache.
#[derive(Debug)]
pub struct NonceCache {
    salt: [u8; 16],
    limits: NonceLimits,
    bucket_ms: u64,
    accounts: RwLock<HashMap<Box<str>, Arc<Mutex<Account>>>>,
    /// Nonces remembered across accounts.
    total: AtomicUsize,
    /// Accounts with at least one nonce remembered.
    active: AtomicUsize,
    next_sweep_ms: AtomicU64,
}

/// Digests are uniformly distributed already (salted SHA-256): hash them
/// as they are.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type DigestSet = HashSet<u64, BuildHasherDefault<DigestHasher>>;

#[derive(Debug, Default)]
struct Account {
    /// By expiry, ascending: nonces whose expiry lies before `end_ms`
    /// (and after the previous bucket's end).
    buckets: VecDeque<Bucket>,
    len: usize,
}

#[derive(Debug)]
struct Bucket {
    end_ms: u64,
    digests: DigestSet,
}

impl NonceCache {
    pub fn new(limits: NonceLimits) -> Self {
        let mut salt = [0u8; 16];
        rand::Rng::fill(&mut rand::thread_rng(), &mut salt);
        Self {
            salt,
            limits,
            bucket_ms: (limits.window_ms / BUCKETS_PER_WINDOW).max(1),
            accounts: RwLock::new(HashMap::new()),
            total: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            next_sweep_ms: AtomicU64::new(0),
        }
    }

    pub fn limits(&self) -> NonceLimits {
        self.limits
    }

    /// The digest under which a nonce of an access key is remembered.
    fn digest(&self, access_key_id: &str, nonce: &str) -> u64 {
        let mut h = Sha256::new();
        h.update(self.salt);
        h.update(access_key_id.as_bytes());
        h.update([0u8]);
        h.update(nonce.as_bytes());
        let d = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&d[..8]);
        u64::from_le_bytes(first)
    }

    /// Records `nonce` of `access_key_id` (acting for `account`) until
    /// `expires_at_ms`, or refuses it: already recorded and not expired at
    /// `now_ms`, or the account over its share.
    pub fn check_and_insert(
        &self,
        account: &str,
        access_key_id: &str,
        nonce: &str,
        expires_at_ms: u64,
        now_ms: u64,
    ) -> Result<(), NonceError> {
        self.maybe_sweep_all(now_ms);
        let digest = self.digest(access_key_id, nonce);
        let account = self.account(account);
        let mut acct = account.lock().unwrap_or_else(|p| p.into_inner());
        self.sweep(&mut acct, now_ms);
        if acct.buckets.iter().any(|b| b.digests.contains(&digest)) {
            return Err(NonceError::Replayed);
        }
        if acct.len >= self.limits.account_max {
            return Err(NonceError::AccountThrottled);
        }
        let total = self.total.load(Ordering::Relaxed);
        if total >= self.limits.capacity {
            // Full: only accounts below their fair share still get in.
            let sharing = self.active.load(Ordering::Relaxed) + usize::from(acct.len == 0);
            let fair = self.limits.capacity / sharing.max(1);
            if acct.len >= fair || total >= self.limits.capacity.saturating_mul(2) {
                return Err(NonceError::AccountThrottled);
            }
        }
        let end_ms = (expires_at_ms / self.bucket_ms + 1).saturating_mul(self.bucket_ms);
        let at = acct.buckets.partition_point(|b| b.end_ms < end_ms);
        if acct.buckets.get(at).is_none_or(|b| b.end_ms != end_ms) {
            acct.buckets.insert(
                at,
                Bucket {
                    end_ms,
                    digests: DigestSet::default(),
                },
            );
        }
        acct.buckets[at].digests.insert(digest);
        if acct.len == 0 {
            self.active.fetch_add(1, Ordering::Relaxed);
        }
        acct.len += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn account(&self, account: &str) -> Arc<Mutex<Account>> {
        if let Some(a) = self
            .accounts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(account)
        {
            return a.clone();
        }
        // Accounts are never removed (an empty one is a few dozen bytes,
        // and only accounts with a valid signature get here), so a handle
        // taken here is never orphaned.
        self.accounts
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(account.into())
            .or_default()
            .clone()
    }

    /// Drops `acct`'s buckets whose every nonce has expired at `now_ms`.
    fn sweep(&self, acct: &mut Account, now_ms: u64) {
        let before = acct.len;
        while acct.buckets.front().is_some_and(|b| b.end_ms <= now_ms) {
            if let Some(b) = acct.buckets.pop_front() {
                acct.len -= b.digests.len();
                self.total.fetch_sub(b.digests.len(), Ordering::Relaxed);
            }
        }
        if before > 0 && acct.len == 0 {
            self.active.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Sweeps every account now and then, so accounts that went quiet give
    /// their room back.
    fn maybe_sweep_all(&self, now_ms: u64) {
        let due = self.next_sweep_ms.load(Ordering::Relaxed);
        if now_ms < due
            || self
                .next_sweep_ms
                .compare_exchange(
                    due,
                    now_ms + GLOBAL_SWEEP_MS,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return;
        }
        let accounts: Vec<_> = self
            .accounts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for a in accounts {
            let mut acct = a.lock().unwrap_or_else(|p| p.into_inner());
            self.sweep(&mut acct, now_ms);
        }
    }

    /// Number of remembered nonces (expired ones may still be counted
    /// until their bucket is swept).
    pub fn len(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Nonces remembered for `account`.
    pub fn account_len(&self, account: &str) -> usize {
        self.accounts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(account)
            .map_or(0, |a| a.lock().unwrap_or_else(|p| p.into_inner()).len)
    }
}

impl Default for NonceCache {
    fn default() -> Self {
        Self::new(NonceLimits::for_rate(
            NonceLimits::DEFAULT_RATE,
            NonceLimits::DEFAULT_RATE,
            kiln_core::limits::SIGNATURE_SKEW_MS,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(capacity: usize, account_max: usize) -> NonceLimits {
        NonceLimits {
            capacity,
            account_max,
            window_ms: 6_000,
        }
    }

    #[test]
    fn replay_inside_window_is_refused_and_forgotten_after() {
        let c = NonceCache::new(limits(100, 100));
        c.check_and_insert("1", "ak", "n1", 1_000, 0).unwrap();
        assert_eq!(
            c.check_and_insert("1", "ak", "n1", 1_000, 999),
            Err(NonceError::Replayed)
        );
        // Past its bucket (100 ms wide here) the nonce is forgotten (the
        // date check refuses such a request anyway).
        c.check_and_insert("1", "ak", "n1", 3_000, 1_100).unwrap();
        assert_eq!(
            c.check_and_insert("1", "ak", "n1", 3_000, 2_000),
            Err(NonceError::Replayed)
        );
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn nonces_are_scoped_per_access_key() {
        let c = NonceCache::new(limits(100, 100));
        c.check_and_insert("1", "a", "n", 10, 0).unwrap();
        c.check_and_insert("1", "b", "n", 10, 0).unwrap();
        assert_ne!(c.digest("a", "bn"), c.digest("ab", "n"));
        // Salted per process: digests cannot be ground in advance.
        assert_ne!(
            c.digest("a", "n"),
            NonceCache::new(limits(1, 1)).digest("a", "n")
        );
    }

    #[test]
    fn an_account_over_its_share_is_throttled_and_others_are_not() {
        let c = NonceCache::new(limits(100, 80));
        let mut accepted = 0;
        for i in 0..200 {
            match c.check_and_insert("greedy", "ak-g", &i.to_string(), 1_000, 0) {
                Ok(()) => accepted += 1,
                Err(e) => assert_eq!(e, NonceError::AccountThrottled),
            }
        }
        // Its own cap first.
        assert_eq!(accepted, 80);
        // Others fill the rest...
        for i in 0..20 {
            c.check_and_insert("b", "ak-b", &i.to_string(), 1_000, 0)
                .unwrap();
        }
        assert_eq!(c.len(), 100);
        // ...and the cache is full, yet an account below its fair share
        // (100 / 3 accounts) still gets in while the greedy one does not.
        for i in 0..30 {
            c.check_and_insert("c", "ak-c", &i.to_string(), 1_000, 1)
                .unwrap();
        }
        assert_eq!(
            c.check_and_insert("greedy", "ak-g", "more", 1_000, 1),
            Err(NonceError::AccountThrottled)
        );
        // b is at 20 < 33: still admitted.
        c.check_and_insert("b", "ak-b", "more", 1_000, 1).unwrap();
        // A throttled account's accepted nonces are still remembered.
        assert_eq!(
            c.check_and_insert("greedy", "ak-g", "0", 1_000, 1),
            Err(NonceError::Replayed)
        );
        assert_eq!(c.account_len("greedy"), 80);
        // Once the window has passed, room comes back for everyone.
        c.check_and_insert("greedy", "ak-g", "late", 5_000, 1_200)
            .unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c.account_len("c"), 0);
    }

    #[test]
    fn quiet_accounts_give_room_back_on_the_global_sweep() {
        let c = NonceCache::new(limits(10, 10));
        for i in 0..10 {
            c.check_and_insert("quiet", "ak", &i.to_string(), 500, 0)
                .unwrap();
        }
        assert_eq!(c.len(), 10);
        c.check_and_insert("other", "ak2", "x", 5_000, 2_000)
            .unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c.active.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn buckets_stay_ordered_whatever_the_arrival_order() {
        let c = NonceCache::new(limits(100, 100));
        for (i, e) in [900u64, 100, 500, 100, 5_000, 300].iter().enumerate() {
            c.check_and_insert("1", "ak", &i.to_string(), *e, 0)
                .unwrap();
        }
        let a = c.account("1");
        let a = a.lock().unwrap();
        let ends: Vec<u64> = a.buckets.iter().map(|b| b.end_ms).collect();
        assert!(ends.windows(2).all(|w| w[0] < w[1]), "{ends:?}");
        assert_eq!(a.len, 6);
        drop(a);
        // At 600 the buckets ending at or before it are gone; the rest stay.
        c.check_and_insert("1", "ak", "late", 5_000, 600).unwrap();
        assert_eq!(c.account_len("1"), 3);
        for (i, e) in [(0, 900), (4, 5_000)] {
            assert_eq!(
                c.check_and_insert("1", "ak", &i.to_string(), e, 600),
                Err(NonceError::Replayed)
            );
        }
    }

    #[test]
    fn sizing_follows_rate_and_skew() {
        let l = NonceLimits::for_rate(15_000, 5_000, 900_000);
        assert_eq!(l.capacity, 13_500_000);
        assert_eq!(l.account_max, 4_500_000);
        assert_eq!(l.window_ms, 1_800_000);
        let l = NonceLimits::for_rate(10, 100, 1_000);
        assert_eq!(
            l.account_max, l.capacity,
            "an account never exceeds the whole"
        );
    }
}
