//! The agent's own mount namespace.
//!
//! The container backend mounts things for every instance (the per-instance
//! overlay over the code, the `/tmp` tmpfs, bind mounts into the bundle).
//! Doing that in the host's mount namespace would leak those mounts to the
//! host (and, with shared propagation, into every other namespace that
//! shares a peer group with `/`), and a crashed agent would leave them
//! behind. Instead the agent moves into a private copy of the host's mount
//! table first: its mounts are invisible to the host, host mounts made later
//! do not propagate in, and when the agent's last process exits the kernel
//! drops every mount that only it referenced. Running containers keep their
//! own mount namespaces, so they are unaffected by an agent restart.
//!
//! `unshare(CLONE_NEWNS)` acts on the calling thread only (it implies
//! `CLONE_FS`, so the thread gets its own copy of the filesystem context).
//! Threads created afterwards by that thread inherit the new namespace, so
//! the call must happen on the main thread before the tokio runtime (or any
//! other thread) starts; `main.rs` does it first thing, and `kiln dev` does
//! the same.

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};

use crate::AgentError;

/// Move the calling thread into a new mount namespace whose mounts are all
/// private (no propagation to or from the host). Call before any other
/// thread exists; needs CAP_SYS_ADMIN.
pub fn enter_private_mount_namespace() -> Result<(), AgentError> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(|source| AgentError::MountNamespace {
        step: "unshare(CLONE_NEWNS)",
        source,
    })?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|source| AgentError::MountNamespace {
        step: "making / recursively private",
        source,
    })?;
    tracing::debug!("entered a private mount namespace");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns_of(path: &str) -> String {
        std::fs::read_link(path)
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn a_thread_moves_into_its_own_private_namespace() {
        if !nix::unistd::Uid::effective().is_root() {
            return kiln_test_support::skip(
                kiln_test_support::Category::Root,
                "entering a mount namespace needs root",
            );
        }
        let before = ns_of("/proc/thread-self/ns/mnt");
        // A thread of its own: the test harness's other threads (and the
        // process's main thread) stay in the host's namespace.
        let (inside, child_of_inside, propagation) = std::thread::spawn(|| {
            enter_private_mount_namespace().unwrap();
            let inside = ns_of("/proc/thread-self/ns/mnt");
            let child = std::thread::spawn(|| ns_of("/proc/thread-self/ns/mnt"))
                .join()
                .unwrap();
            let mountinfo = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
            let root = mountinfo
                .lines()
                .find(|l| l.split(' ').nth(4) == Some("/"))
                .unwrap()
                .to_owned();
            (inside, child, root)
        })
        .join()
        .unwrap();
        assert_ne!(before, inside, "the thread got a new mount namespace");
        assert_eq!(inside, child_of_inside, "later threads inherit it");
        assert_eq!(before, ns_of("/proc/thread-self/ns/mnt"));
        // Optional fields (7th on) carry `shared:N` for shared mounts.
        assert!(!propagation.contains("shared:"), "{propagation}");
    }
}
