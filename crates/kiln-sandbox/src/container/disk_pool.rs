//! Writable-space images formatted ahead of time, so a cold start of the
//! default disk size only renames a ready image into the instance directory
//! and mounts it (mkfs.ext4 is off the critical path).
//!
//! The pool directory sits under the driver's state dir, on the same
//! filesystem as the instance dirs, so the hand-over is one `rename`. Its
//! images are never mounted; whatever a previous run left there (files
//! named `<prefix>-disk-*.img` / `.tmp`) is removed when the pool starts.
//! A background thread keeps up to `capacity` images ready; a failed format
//! is logged, its file removed, and retried after `retry_delay`; a refill
//! after a hand-over waits `refill_delay` (off the cold start's CPU).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::container::disk::{DiskError, DiskOps};

/// Ready images kept by default.
pub const DEFAULT_DISK_POOL: usize = 2;
/// How long a failed format waits before the next attempt.
pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(1);
/// How long the refill waits after a hand-over, so its mkfs does not
/// compete for CPU with the cold start that took the image.
pub const DEFAULT_REFILL_DELAY: Duration = Duration::from_millis(200);

/// What every image in the pool is.
#[derive(Debug, Clone)]
pub struct DiskPoolConfig {
    /// Where the ready images live (same filesystem as the instance dirs).
    pub dir: PathBuf,
    /// Every pool file's name starts with `<prefix>-disk-`.
    pub prefix: String,
    pub size_mb: u32,
    pub owner: u32,
    /// At most this many ready images; 0 turns the pool off.
    pub capacity: usize,
    pub retry_delay: Duration,
    pub refill_delay: Duration,
}

#[derive(Debug, Default)]
struct State {
    ready: VecDeque<PathBuf>,
    next: u64,
    stop: bool,
    /// No format attempt before this instant (after a failure or a
    /// hand-over).
    retry_at: Option<Instant>,
    failures: u64,
}

struct Shared {
    config: DiskPoolConfig,
    disk: Arc<dyn DiskOps>,
    state: Mutex<State>,
    wake: Condvar,
}

/// The pool and its refill thread (stopped on [`DiskPool::shutdown`] or
/// drop).
pub struct DiskPool {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for DiskPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskPool")
            .field("config", &self.shared.config)
            .field("ready", &self.ready_len())
            .finish_non_exhaustive()
    }
}

/// Whether `name` is one of the pool files of `prefix`.
fn is_pool_file(prefix: &str, name: &str) -> bool {
    name.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix("-disk-"))
        .is_some_and(|rest| rest.ends_with(".img") || rest.ends_with(".tmp"))
}

fn remove_pool_files(config: &DiskPoolConfig) -> std::io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(&config.dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !is_pool_file(&config.prefix, name) {
            continue;
        }
        // Only regular files: never follow or remove anything else.
        if !entry.file_type()?.is_file() {
            continue;
        }
        std::fs::remove_file(entry.path())?;
        removed += 1;
    }
    Ok(removed)
}

impl DiskPool {
    /// Create the pool directory, remove what a previous run left in it,
    /// and (unless `capacity` is 0) start filling it in the background.
    pub fn start(config: DiskPoolConfig, disk: Arc<dyn DiskOps>) -> std::io::Result<Self> {
        std::fs::create_dir_all(&config.dir)?;
        let removed = remove_pool_files(&config)?;
        if removed > 0 {
            tracing::info!(dir = %config.dir.display(), removed, "removed leftover pool images");
        }
        let capacity = config.capacity;
        let shared = Arc::new(Shared {
            config,
            disk,
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        });
        let thread = if capacity > 0 {
            let worker = shared.clone();
            Some(
                std::thread::Builder::new()
                    .name("kiln-disk-pool".into())
                    .spawn(move || refill(&worker))?,
            )
        } else {
            None
        };
        Ok(Self {
            shared,
            thread: Mutex::new(thread),
        })
    }

    /// How many images are ready.
    pub fn ready_len(&self) -> usize {
        self.shared.state.lock().expect("lock").ready.len()
    }

    /// How many formats failed so far.
    pub fn failures(&self) -> u64 {
        self.shared.state.lock().expect("lock").failures
    }

    /// Move a ready image to `dest` when one of `size_mb` and `owner` is
    /// ready; `false` means the caller formats its own. Wakes the refill.
    pub fn take(&self, dest: &Path, size_mb: u32, owner: u32) -> bool {
        let config = &self.shared.config;
        if config.capacity == 0 || size_mb != config.size_mb || owner != config.owner {
            return false;
        }
        let image = {
            let mut state = self.shared.state.lock().expect("lock");
            let image = state.ready.pop_front();
            let at = Instant::now() + config.refill_delay;
            state.retry_at = Some(state.retry_at.map_or(at, |r| r.max(at)));
            self.shared.wake.notify_all();
            image
        };
        let Some(image) = image else { return false };
        match std::fs::rename(&image, dest) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(image = %image.display(), error = %kiln_core::error_chain(&e), "cannot hand over a pool image");
                let _ = std::fs::remove_file(&image);
                false
            }
        }
    }

    /// Give `target` a mounted writable filesystem at `image`: a pool image
    /// when one fits, else a fresh one. Blocking (mkfs, mount).
    pub fn provide(
        &self,
        image: &Path,
        size_mb: u32,
        target: &Path,
        owner: u32,
    ) -> Result<(), DiskError> {
        if self.take(image, size_mb, owner) {
            tracing::debug!(image = %image.display(), "writable filesystem from the pool");
            self.shared.disk.mount(image, target)
        } else {
            self.shared.disk.create(image, size_mb, target, owner)
        }
    }

    /// Stop the refill thread (waiting for a format under way) and remove
    /// the ready images. Blocking.
    pub fn shutdown(&self) {
        self.stop();
        if let Some(thread) = self.thread.lock().expect("lock").take() {
            if thread.join().is_err() {
                tracing::warn!("the disk pool thread panicked");
            }
        }
        let ready: Vec<PathBuf> = self
            .shared
            .state
            .lock()
            .expect("lock")
            .ready
            .drain(..)
            .collect();
        for image in ready {
            if let Err(e) = std::fs::remove_file(&image) {
                tracing::warn!(image = %image.display(), error = %kiln_core::error_chain(&e), "cannot remove a pool image");
            }
        }
    }

    fn stop(&self) {
        self.shared.state.lock().expect("lock").stop = true;
        self.shared.wake.notify_all();
    }
}

impl Drop for DiskPool {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The refill loop: format one image whenever fewer than `capacity` are
/// ready, until stopped.
fn refill(shared: &Shared) {
    let config = &shared.config;
    loop {
        let n = {
            let mut state = shared.state.lock().expect("lock");
            loop {
                if state.stop {
                    return;
                }
                let now = Instant::now();
                match state.retry_at {
                    Some(at) if at > now => {
                        state = shared.wake.wait_timeout(state, at - now).expect("lock").0;
                    }
                    _ if state.ready.len() >= config.capacity => {
                        state = shared.wake.wait(state).expect("lock");
                    }
                    _ => break,
                }
            }
            state.retry_at = None;
            state.next += 1;
            state.next
        };
        let name = format!("{}-disk-{n}", config.prefix);
        let tmp = config.dir.join(format!("{name}.tmp"));
        let image = config.dir.join(format!("{name}.img"));
        let made = shared
            .disk
            .format(&tmp, config.size_mb, config.owner)
            .map_err(|e| e.to_string())
            .and_then(|()| std::fs::rename(&tmp, &image).map_err(|e| e.to_string()));
        let mut state = shared.state.lock().expect("lock");
        match made {
            Ok(()) if state.stop => {
                drop(state);
                let _ = std::fs::remove_file(&image);
                return;
            }
            Ok(()) => state.ready.push_back(image),
            Err(error) => {
                state.failures += 1;
                state.retry_at = Some(Instant::now() + config.retry_delay);
                drop(state);
                tracing::warn!(
                    image = %tmp.display(),
                    error = %error,
                    retry_in_ms = config.retry_delay.as_millis() as u64,
                    "cannot pre-format a disk image; retrying later"
                );
                let _ = std::fs::remove_file(&tmp);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::disk::{LoopExt4, RecordingDisk};

    fn config(dir: &Path, capacity: usize) -> DiskPoolConfig {
        DiskPoolConfig {
            dir: dir.join("pool"),
            prefix: "kt".into(),
            size_mb: 512,
            owner: 4242,
            capacity,
            retry_delay: Duration::from_millis(50),
            refill_delay: Duration::from_millis(1),
        }
    }

    /// Poll `cond` for up to 5 s.
    fn eventually(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn pool_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_hit_renames_a_ready_image_mounts_it_and_refills() {
        let tmp = tempfile::tempdir().unwrap();
        let disk = Arc::new(RecordingDisk::new());
        let pool = DiskPool::start(config(tmp.path(), 2), disk.clone()).unwrap();
        eventually("two ready images", || pool.ready_len() == 2);
        assert_eq!(disk.formats().len(), 2);
        assert!(disk
            .formats()
            .iter()
            .all(|f| f.size_mb == 512 && f.owner == 4242));

        let dest = tmp.path().join("disk.img");
        let target = tmp.path().join("disk");
        pool.provide(&dest, 512, &target, 4242).unwrap();
        assert!(dest.is_file());
        assert_eq!(disk.mounts(), [(dest.clone(), target)]);
        assert!(disk.calls().is_empty(), "a hit formats nothing on the path");
        // The handed-out image left the pool; the refill replaces it.
        eventually("the refill", || disk.formats().len() == 3);
        eventually("two ready again", || pool.ready_len() == 2);
        assert_eq!(pool_files(&tmp.path().join("pool")).len(), 2);

        pool.shutdown();
        assert_eq!(pool.ready_len(), 0);
        assert!(pool_files(&tmp.path().join("pool")).is_empty());
    }

    #[test]
    fn another_size_or_owner_formats_its_own() {
        let tmp = tempfile::tempdir().unwrap();
        let disk = Arc::new(RecordingDisk::new());
        let pool = DiskPool::start(config(tmp.path(), 1), disk.clone()).unwrap();
        eventually("one ready image", || pool.ready_len() == 1);
        let dest = tmp.path().join("disk.img");
        let target = tmp.path().join("disk");
        pool.provide(&dest, 10_240, &target, 4242).unwrap();
        pool.provide(&dest, 512, &target, 7).unwrap();
        assert_eq!(disk.calls().len(), 2);
        assert_eq!(disk.calls()[0].size_mb, 10_240);
        assert_eq!(disk.calls()[1].owner, 7);
        assert!(disk.mounts().is_empty());
        assert_eq!(pool.ready_len(), 1, "the pool image stays");
        assert!(!dest.exists());
        pool.shutdown();
    }

    #[test]
    fn a_pool_of_zero_never_formats() {
        let tmp = tempfile::tempdir().unwrap();
        let disk = Arc::new(RecordingDisk::new());
        let pool = DiskPool::start(config(tmp.path(), 0), disk.clone()).unwrap();
        let dest = tmp.path().join("disk.img");
        pool.provide(&dest, 512, &tmp.path().join("disk"), 4242)
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(disk.formats().is_empty());
        assert_eq!(disk.calls().len(), 1);
        assert!(pool_files(&tmp.path().join("pool")).is_empty());
        pool.shutdown();
    }

    #[test]
    fn leftovers_of_this_prefix_are_removed_at_start() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pool");
        std::fs::create_dir_all(dir.join("kt-disk-9.img")).unwrap(); // a dir: kept
        for name in [
            "kt-disk-1.img",
            "kt-disk-2.tmp",
            "other-disk-1.img",
            "kt-disk-3.txt",
        ] {
            std::fs::write(dir.join(name), b"x").unwrap();
        }
        let disk = Arc::new(RecordingDisk::new());
        let pool = DiskPool::start(config(tmp.path(), 0), disk).unwrap();
        assert_eq!(
            pool_files(&dir),
            ["kt-disk-3.txt", "kt-disk-9.img", "other-disk-1.img"]
        );
        pool.shutdown();
    }

    #[test]
    fn a_failed_format_is_retried_later_and_never_handed_out() {
        let tmp = tempfile::tempdir().unwrap();
        let disk = Arc::new(RecordingDisk::new());
        disk.fail_formats(2);
        let pool = DiskPool::start(config(tmp.path(), 1), disk.clone()).unwrap();
        eventually("the first failure", || pool.failures() >= 1);
        // While failing, nothing is ready: a create formats its own.
        if pool.ready_len() == 0 {
            let dest = tmp.path().join("a.img");
            assert!(!pool.take(&dest, 512, 4242));
            assert!(!dest.exists());
        }
        eventually("a ready image after the retries", || pool.ready_len() == 1);
        assert_eq!(pool.failures(), 2);
        assert_eq!(disk.formats().len(), 1);
        // The failed attempts' files are gone; only the ready image is left.
        assert_eq!(pool_files(&tmp.path().join("pool")).len(), 1);
        pool.shutdown();
    }

    /// The real mkfs.ext4 on a temp file (no mount): a pooled image is a
    /// formatted ext4 whose root belongs to the owner.
    #[test]
    fn real_images_are_formatted_ahead_of_time() {
        if std::process::Command::new("mkfs.ext4")
            .arg("-V")
            .output()
            .is_err()
        {
            return kiln_test_support::skip(
                kiln_test_support::Category::Tool,
                "mkfs.ext4 is not installed (run scripts/install-deps.sh)",
            );
        }
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = config(tmp.path(), 1);
        cfg.size_mb = 16;
        let pool = DiskPool::start(cfg, Arc::new(LoopExt4)).unwrap();
        eventually("one real image", || pool.ready_len() == 1);
        let dest = tmp.path().join("disk.img");
        assert!(pool.take(&dest, 16, 4242));
        assert_eq!(std::fs::metadata(&dest).unwrap().len(), 16 << 20);
        let out = std::process::Command::new("debugfs")
            .args(["-R", "stat /"])
            .arg(&dest)
            .output();
        match out {
            Ok(out) if out.status.success() => {
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(text.contains("User:  4242"), "{text}");
            }
            _ => eprintln!("debugfs unavailable: root owner not checked"),
        }
        pool.shutdown();
    }
}
