//! Thaw latency against a warm call, on real runc (root only):
//! `cargo bench -p kiln-sandbox --bench thaw`.
//!
//! One custom.debian12 instance (Python's http.server). Per round: a warm
//! call on an unfrozen instance; then freeze, and time the thaw alone and
//! the thaw plus the same call. Prints the medians over the rounds; the
//! extra cost of a frozen instance's call is thaw + call - warm call.
//! Runs inside a private mount namespace like the tests; everything it
//! creates is removed when it ends, also on failure.

#[path = "../tests/support/harness.rs"]
mod harness;

use std::process::Command;
use std::time::{Duration, Instant};

use harness::*;
use kiln_core::RuntimeName;
use kiln_sandbox::{ContainerDriver, SandboxDriver};

const ROUNDS: usize = 25;
const INNER_BENCH: &str = "KILN_THAW_BENCH_IN_PRIVATE_MOUNT_NS";

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs us too,
    // where a one-round smoke run is enough.
    let smoke = !std::env::args().any(|a| a == "--bench");
    if std::env::var_os(INNER_BENCH).is_none() {
        if let Some((_, reason)) = skip_reason() {
            println!("SKIPPED thaw benchmark: {reason}");
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let status = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--"])
            .arg(exe)
            .args(std::env::args().skip(1))
            .env(INNER_BENCH, "1")
            .status()
            .expect("run the benchmark in a private mount namespace");
        assert!(status.success(), "thaw benchmark failed");
        return;
    }
    let rounds = if smoke { 1 } else { ROUNDS };
    let guard = Guard::new();
    let (_, seed) = random_suffix();
    runtime().block_on(async {
        let mut config = guard.config(seed);
        // The boost would make early warm calls faster than later ones.
        config.cold_start_boost_ms = 0;
        let driver = ContainerDriver::new(config, &guard.state()).await.unwrap();
        driver
            .ensure_runtime(RuntimeName::CustomDebian12)
            .await
            .expect("custom.debian12 root filesystem (debootstrap)");
        let code = code_dir(&guard);
        let env = [("HOST_SECRET", "/nonexistent".to_owned())];
        let (id, addr) = start(&driver, &code, 512, 1000, &env).await;
        let call = move || {
            let t = Instant::now();
            let r = get(addr, "/", Duration::from_secs(10));
            assert!(r.is_some(), "no answer");
            t.elapsed()
        };
        // Warm up the server and the host's caches.
        for _ in 0..5 {
            tokio::task::spawn_blocking(call).await.unwrap();
        }
        let (mut warm, mut thaw, mut thaw_call, mut freeze) = (vec![], vec![], vec![], vec![]);
        for _ in 0..rounds {
            warm.push(tokio::task::spawn_blocking(call).await.unwrap());
            let t = Instant::now();
            driver.freeze(&id).await.unwrap();
            freeze.push(t.elapsed());
            // Let it sit frozen a moment, as an idle instance would.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let t = Instant::now();
            driver.thaw(&id).await.unwrap();
            let thawed = t.elapsed();
            let answered = tokio::task::spawn_blocking(call).await.unwrap();
            thaw.push(thawed);
            thaw_call.push(thawed + answered);
        }
        let (w, th, tc, fr) = (
            median(warm),
            median(thaw),
            median(thaw_call),
            median(freeze),
        );
        println!("thaw benchmark ({rounds} rounds, medians, container backend, runc):");
        println!("  warm call, unfrozen instance : {}", ms(w));
        println!("  freeze                        : {}", ms(fr));
        println!("  thaw alone                    : {}", ms(th));
        println!("  thaw + call, frozen instance  : {}", ms(tc));
        println!(
            "  frozen / warm                 : {:.2}x",
            tc.as_secs_f64() / w.as_secs_f64()
        );
        driver.destroy(&id).await.unwrap();
        driver.shutdown().await.unwrap();
    });
}
