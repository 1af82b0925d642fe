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
