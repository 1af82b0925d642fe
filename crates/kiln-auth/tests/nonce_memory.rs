//! Memory per remembered nonce, measured with a counting allocator: the
//! figure docs/security.md quotes ("The public edge") and the bound the
//! replay cache's sizing relies on.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use kiln_auth::nonce::{NonceCache, NonceLimits};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged, only counting bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn a_remembered_nonce_costs_at_most_24_bytes() {
    // A 15-minute skew: 60 buckets of 30 s over the 30-minute window.
    let skew_ms = 15 * 60 * 1000;
    let cache = NonceCache::new(NonceLimits::for_rate(20_000, 20_000, skew_ms));
    let before = LIVE.load(Ordering::Relaxed);
    // One account's signed requests spread over 15 minutes, dated as they
    // arrive: 300,000 nonces over 30 buckets.
    let n: u64 = 300_000;
    let mut nonce = String::new();
    for i in 0..n {
        use std::fmt::Write;
        nonce.clear();
        write!(nonce, "{i:032x}").unwrap();
        let now = i * 3; // 333 per second
        cache
            .check_and_insert("1234", "LTAIkey", &nonce, now + skew_ms, now)
            .unwrap();
    }
    let used = LIVE.load(Ordering::Relaxed) - before;
    let per_nonce = used as f64 / n as f64;
    println!("nonce cache: {n} nonces in {used} bytes: {per_nonce:.1} bytes per nonce");
    assert_eq!(cache.len() as u64, n);
    assert!(per_nonce <= 24.0, "{per_nonce:.1} bytes per nonce");
    assert!(per_nonce >= 9.0, "a u64 digest and a control byte at least");
}
