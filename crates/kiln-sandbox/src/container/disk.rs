//! The instance's writable space: a sparse image file of the instance's
//! disk size, formatted ext4 and loop-mounted in the instance directory.
//! The `/code` overlay's upper and work dirs and the instance's `/tmp` live
//! on it, so a function that fills its disk gets ENOSPC at its own limit
//! (512 MB for standard instances, up to 10 GB for performance ones) and
//! never touches the host's filesystem. The image is sparse (only what is
//! written takes host space) and is deleted with the instance directory;
//! `mount -o loop` sets autoclear, so the loop device goes with the unmount.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Writable space when the spec asks for none.
pub const DEFAULT_DISK_MB: u32 = 512;
/// The most a performance instance may have (FC: 10 GB).
pub const MAX_DISK_MB: u32 = 10_240;

/// Why the writable filesystem could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk size {0} MB is outside 1..=10240 MB")]
    Size(u32),
    #[error("Cannot create the disk image {path}")]
    Image {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed: {message}")]
    Tool { tool: &'static str, message: String },
}

/// The instance's disk size in MB: the spec's, or the default.
pub fn disk_mb(spec_disk_mb: u32) -> Result<u32, DiskError> {
    match spec_disk_mb {
        0 => Ok(DEFAULT_DISK_MB),
        mb if mb <= MAX_DISK_MB => Ok(mb),
        mb => Err(DiskError::Size(mb)),
    }
}

/// Makes and mounts size-limited writable filesystems. Unmounting goes
/// through the [`crate::mounts::Mounter`] like every other mount.
pub trait DiskOps: Send + Sync + 'static {
    /// Create `image` (`size_mb`, sparse; it must not exist) and format it
    /// with its root owned by `owner`. Nothing is mounted, so this can be
    /// done ahead of time (see [`crate::container::disk_pool::DiskPool`]).
    fn format(&self, image: &Path, size_mb: u32, owner: u32) -> Result<(), DiskError>;

    /// Mount the formatted `image` at `target` (nosuid, nodev).
    fn mount(&self, image: &Path, target: &Path) -> Result<(), DiskError>;

    /// [`format`](Self::format) then [`mount`](Self::mount).
    fn create(
        &self,
        image: &Path,
        size_mb: u32,
        target: &Path,
        owner: u32,
    ) -> Result<(), DiskError> {
        self.format(image, size_mb, owner)?;
        self.mount(image, target)
    }
}

/// ext4 on a loop device, with mkfs.ext4 and mount(8).
#[derive(Debug, Default, Clone, Copy)]
pub struct LoopExt4;

fn run(tool: &'static str, cmd: &mut Command) -> Result<(), DiskError> {
    let out = cmd.output().map_err(|e| DiskError::Tool {
        tool,
        message: e.to_string(),
    })?;
    if out.status.success() {
        return Ok(());
    }
    Err(DiskError::Tool {
        tool,
        message: format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    })
}

impl DiskOps for LoopExt4 {
    fn format(&self, image: &Path, size_mb: u32, owner: u32) -> Result<(), DiskError> {
        if size_mb == 0 || size_mb > MAX_DISK_MB {
            return Err(DiskError::Size(size_mb));
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(image)
            .map_err(|source| DiskError::Image {
                path: image.to_owned(),
                source,
            })?;
        file.set_len(u64::from(size_mb) << 20)
            .map_err(|source| DiskError::Image {
                path: image.to_owned(),
                source,
            })?;
        drop(file);
        // No journal (the data dies with the instance), no reserved blocks
        // (the function gets all of it), lazy init (a few ms for 10 GB).
        run(
            "mkfs.ext4",
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", "0", "-O", "^has_journal"])
                .arg("-E")
                .arg(format!(
                    "nodiscard,lazy_itable_init=1,root_owner={owner}:{owner}"
                ))
                .arg(image),
        )
    }

    fn mount(&self, image: &Path, target: &Path) -> Result<(), DiskError> {
        run(
            "mount",
            Command::new("mount")
                .args(["-t", "ext4", "-o", "loop,nosuid,nodev,noatime"])
                .arg(image)
                .arg(target),
        )
    }
}

/// One call the fake saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskCall {
    pub image: PathBuf,
    pub size_mb: u32,
    pub target: PathBuf,
    pub owner: u32,
}

/// One image the fake formatted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatCall {
    pub image: PathBuf,
    pub size_mb: u32,
    pub owner: u32,
}

/// A fake that records what it was asked and leaves `target` a plain dir.
/// `format` writes an empty `image` (so it can be renamed like a real one);
/// `create` records one [`DiskCall`] and touches nothing.
#[derive(Debug, Default)]
pub struct RecordingDisk {
    calls: Mutex<Vec<DiskCall>>,
    formats: Mutex<Vec<FormatCall>>,
    mounts: Mutex<Vec<(PathBuf, PathBuf)>>,
    failing_formats: Mutex<u32>,
}

impl RecordingDisk {
    pub fn new() -> Self {
        Self::default()
    }

    /// `create` calls.
    pub fn calls(&self) -> Vec<DiskCall> {
        self.calls.lock().expect("lock").clone()
    }

    /// Successful `format` calls.
    pub fn formats(&self) -> Vec<FormatCall> {
        self.formats.lock().expect("lock").clone()
    }

    /// `mount` calls: (image, target).
    pub fn mounts(&self) -> Vec<(PathBuf, PathBuf)> {
        self.mounts.lock().expect("lock").clone()
    }

    /// Make the next `n` formats fail (as a broken mkfs.ext4 would).
    pub fn fail_formats(&self, n: u32) {
        *self.failing_formats.lock().expect("lock") = n;
    }
}

impl DiskOps for RecordingDisk {
    fn format(&self, image: &Path, size_mb: u32, owner: u32) -> Result<(), DiskError> {
        if size_mb == 0 || size_mb > MAX_DISK_MB {
            return Err(DiskError::Size(size_mb));
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(image)
            .map_err(|source| DiskError::Image {
                path: image.to_owned(),
                source,
            })?;
        {
            let mut failing = self.failing_formats.lock().expect("lock");
            if *failing > 0 {
                *failing -= 1;
                return Err(DiskError::Tool {
                    tool: "mkfs.ext4",
                    message: "injected failure".into(),
                });
            }
        }
        self.formats.lock().expect("lock").push(FormatCall {
            image: image.to_owned(),
            size_mb,
            owner,
        });
        Ok(())
    }

    fn mount(&self, image: &Path, target: &Path) -> Result<(), DiskError> {
        self.mounts
            .lock()
            .expect("lock")
            .push((image.to_owned(), target.to_owned()));
        Ok(())
    }

    fn create(
        &self,
        image: &Path,
        size_mb: u32,
        target: &Path,
        owner: u32,
    ) -> Result<(), DiskError> {
        if size_mb == 0 || size_mb > MAX_DISK_MB {
            return Err(DiskError::Size(size_mb));
        }
        self.calls.lock().expect("lock").push(DiskCall {
            image: image.to_owned(),
            size_mb,
            target: target.to_owned(),
            owner,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_default_and_are_capped() {
        assert_eq!(disk_mb(0).unwrap(), 512);
        assert_eq!(disk_mb(10_240).unwrap(), 10_240);
        assert!(matches!(disk_mb(10_241), Err(DiskError::Size(10_241))));
        assert!(LoopExt4
            .create(Path::new("/nonexistent/x.img"), 0, Path::new("/x"), 1)
            .is_err());
    }

    #[test]
    fn a_missing_image_directory_is_a_clear_error() {
        let err = LoopExt4
            .create(Path::new("/nonexistent/dir/x.img"), 16, Path::new("/x"), 1)
            .unwrap_err();
        assert!(matches!(err, DiskError::Image { .. }), "{err}");
    }
}
