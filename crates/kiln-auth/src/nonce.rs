//! Remembers `x-acs-signature-nonce`s for as long as the request that
//! carried them could still be accepted, so a replay inside the window is
//! refused.
//!
//! Entries are 128-bit digests of (access key id, nonce), never the
//! strings, and live in sharded maps behind short-held locks. The cache has
//! a hard capacity: when a shard is full of unexpired nonces new requests
//! are refused rather than old nonces forgotten, because forgetting one
//! would re-open the replay window for it.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

const SHARDS: usize = 16;

/// Why a nonce was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NonceError {
    #[error("Specified signature nonce was used already")]
    Replayed,
    #[error("Too many signed requests in the signature window")]
    CacheFull,
}

/// A bounded replay cache.
#[derive(Debug)]
pub struct NonceCache {
    shards: Vec<Mutex<Shard>>,
    shard_capacity: usize,
}

#[derive(Debug, Default)]
struct Shard {
    /// digest -> the time (ms) after which the nonce may be forgotten.
    expiry: HashMap<u128, u64>,
    /// Insertion order, for sweeping. Expiries are roughly but not strictly
    /// increasing; an entry behind a later one waits for it, which only
    /// delays forgetting, never shortens it.
    order: VecDeque<(u64, u128)>,
}

impl NonceCache {
    /// Default capacity: about a million nonces (some 60 MB when full).
    pub const DEFAULT_CAPACITY: usize = 1 << 20;

    pub fn new(capacity: usize) -> Self {
        let shard_capacity = capacity.div_ceil(SHARDS).max(1);
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            shard_capacity,
        }
    }

    /// The digest under which a nonce of an access key is remembered.
    pub fn key(access_key_id: &str, nonce: &str) -> u128 {
        let mut h = Sha256::new();
        h.update(access_key_id.as_bytes());
        h.update([0u8]);
        h.update(nonce.as_bytes());
        let d = h.finalize();
        let mut first = [0u8; 16];
        first.copy_from_slice(&d[..16]);
        u128::from_le_bytes(first)
    }

    /// Records `key` until `expires_at_ms`, or refuses it when it is
    /// already recorded and not yet expired at `now_ms`.
    pub fn check_and_insert(
        &self,
        key: u128,
        expires_at_ms: u64,
        now_ms: u64,
    ) -> Result<(), NonceError> {
        let shard = &self.shards[(key as usize) % self.shards.len()];
        let mut shard = shard
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        shard.sweep(now_ms);
        if let Some(&until) = shard.expiry.get(&key) {
            if until > now_ms {
                return Err(NonceError::Replayed);
            }
        }
        if shard.expiry.len() >= self.shard_capacity {
            return Err(NonceError::CacheFull);
        }
        shard.expiry.insert(key, expires_at_ms);
        shard.order.push_back((expires_at_ms, key));
        Ok(())
    }

    /// Number of remembered nonces (expired ones may still be counted
    /// until the next sweep of their shard).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|s| s.expiry.len()).unwrap_or(0))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for NonceCache {
    fn default() -> Self {
        Self::new(Self::DEFAULT_CAPACITY)
    }
}

impl Shard {
    fn sweep(&mut self, now_ms: u64) {
        while let Some(&(until, key)) = self.order.front() {
            if until > now_ms {
                break;
            }
            self.order.pop_front();
            // Only forget the entry this queue slot was recording: the same
            // key may have been re-inserted with a later expiry since.
            if self.expiry.get(&key) == Some(&until) {
                self.expiry.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_inside_window_is_refused_and_forgotten_after() {
        let c = NonceCache::new(100);
        let k = NonceCache::key("ak", "n1");
        c.check_and_insert(k, 1_000, 0).unwrap();
        assert_eq!(c.check_and_insert(k, 1_000, 999), Err(NonceError::Replayed));
        // Past its expiry the nonce is forgotten (the date check refuses such a request anyway).
        c.check_and_insert(k, 3_000, 1_000).unwrap();
        assert_eq!(
            c.check_and_insert(k, 3_000, 2_000),
            Err(NonceError::Replayed)
        );
    }

    #[test]
    fn nonces_are_scoped_per_access_key() {
        let c = NonceCache::new(100);
        c.check_and_insert(NonceCache::key("a", "n"), 10, 0)
            .unwrap();
        c.check_and_insert(NonceCache::key("b", "n"), 10, 0)
            .unwrap();
        assert_ne!(NonceCache::key("a", "bn"), NonceCache::key("ab", "n"));
    }

    #[test]
    fn full_cache_refuses_instead_of_forgetting() {
        let c = NonceCache::new(SHARDS); // one entry per shard
        let mut refused = 0;
        let mut accepted = Vec::new();
        for i in 0..200 {
            let k = NonceCache::key("ak", &i.to_string());
            match c.check_and_insert(k, 1_000, 0) {
                Ok(()) => accepted.push(k),
                Err(e) => {
                    assert_eq!(e, NonceError::CacheFull);
                    refused += 1;
                }
            }
        }
        assert_eq!(accepted.len(), SHARDS);
        assert_eq!(refused, 200 - SHARDS);
        for k in &accepted {
            assert_eq!(c.check_and_insert(*k, 1_000, 1), Err(NonceError::Replayed));
        }
        // Once the window has passed, room comes back.
        c.check_and_insert(NonceCache::key("ak", "late"), 5_000, 1_000)
            .unwrap();
        assert!(c.len() <= SHARDS);
    }

    #[test]
    fn sweep_keeps_reinserted_keys() {
        // One shard, so the queue order is fully under the test's control.
        let c = NonceCache {
            shards: vec![Mutex::new(Shard::default())],
            shard_capacity: 10,
        };
        let (a, k) = (NonceCache::key("ak", "a"), NonceCache::key("ak", "k"));
        c.check_and_insert(a, 100, 0).unwrap();
        c.check_and_insert(k, 10, 0).unwrap();
        // k expired at 10 but sits behind a in the queue; it may be recorded again.
        c.check_and_insert(k, 160, 20).unwrap();
        // Sweeping a and k's first slot must not forget k's second recording.
        assert_eq!(c.check_and_insert(k, 160, 120), Err(NonceError::Replayed));
        c.check_and_insert(a, 200, 120).unwrap();
    }
}
