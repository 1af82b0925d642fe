//! What every Kiln test harness shares.
//!
//! [`skip`]: a test that cannot run here (no root, a missing host tool, no
//! SDK) says why, under one reason [`Category`]; the skip is appended to
//! `$KILN_SKIP_LOG` so `scripts/test.sh` can sum skips up after the run; and
//! under `CI=true` it fails the test instead, unless its category is one
//! that CI machines cannot provide (a KVM guest, a real cloud-hypervisor).
//! [`ovs::ensure_ovs`]: Open vSwitch's daemons running, for the VPC tests.
#![forbid(unsafe_code)]

pub mod captured_log;
pub mod ovs;
pub mod postgres;
pub mod skip;

pub use captured_log::CapturedLog;
pub use skip::{skip, Category};

/// A free loopback TCP port for a service a test starts as a separate
/// process. Picked below the kernel's ephemeral range (32768 and up by
/// default): a port the kernel chose for `:0` stays free only until it
/// hands it out again, to another test's outgoing connection or listener,
/// before the service binds it (seen in CI as "Address already in use").
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    for _ in 0..200 {
        // RandomState is seeded randomly per instance: no RNG crate needed.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u8(0);
        let port = 20_000 + (h.finish() % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in 20000-31999")
}

/// The executable `name` on `PATH`, if there is one.
pub fn which(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Whether this process runs with effective user ID 0.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}

/// The Python with FC's official SDK (`alibabacloud-fc20230330`) that
/// `KILN_FC_SDK_PYTHON` names; without one the calling test is skipped
/// (an [`Category::Sdk`] skip) and the caller returns.
pub fn sdk_python() -> Option<String> {
    match std::env::var("KILN_FC_SDK_PYTHON") {
        Ok(python) if !python.is_empty() => Some(python),
        _ => {
            skip(
                Category::Sdk,
                "set KILN_FC_SDK_PYTHON to a python with alibabacloud-fc20230330 \
                 (scripts/test.sh makes that virtualenv)",
            );
            None
        }
    }
}
