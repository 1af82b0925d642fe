//! Reading and writing cgroup files, shared by both layouts.

use std::path::Path;
use std::time::{Duration, Instant};

use super::CgroupError;

/// How long a freeze may take before it is reported as failed.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

/// `path` relative to a hierarchy's root; refuses anything that could
/// leave it.
pub(super) fn check_path(path: &str) -> Result<&str, CgroupError> {
    let rel = path.strip_prefix('/').unwrap_or("");
    if rel.is_empty()
        || rel
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(CgroupError::InvalidPath(path.to_owned()));
    }
    Ok(rel)
}

pub(super) fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Io {
        path: path.to_owned(),
        source,
    })
}

pub(super) fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Io {
        path: path.to_owned(),
        source,
    })
}

pub(super) fn parse_u64(path: &Path, s: &str) -> Result<u64, CgroupError> {
    s.trim().parse().map_err(|_| CgroupError::Parse {
        path: path.to_owned(),
        contents: s.to_owned(),
    })
}

pub(super) fn read_u64(path: &Path) -> Result<u64, CgroupError> {
    parse_u64(path, &read(path)?)
}

/// `key value` lines (cpu.stat, memory.events, memory.oom_control).
pub(super) fn keyed(path: &Path, key: &str) -> Result<Option<u64>, CgroupError> {
    let text = read(path)?;
    for line in text.lines() {
        let mut it = line.split_whitespace();
        if it.next() == Some(key) {
            return it.next().map(|v| parse_u64(path, v)).transpose();
        }
    }
    Ok(None)
}

pub(super) fn rmdir_if_present(dir: &Path) -> Result<(), CgroupError> {
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CgroupError::Io {
            path: dir.to_owned(),
            source,
        }),
    }
}

pub(super) fn wait_until(
    path: &str,
    mut done: impl FnMut() -> Result<bool, CgroupError>,
) -> Result<(), CgroupError> {
    let start = Instant::now();
    let mut pause = Duration::from_micros(50);
    loop {
        if done()? {
            return Ok(());
        }
        if start.elapsed() > FREEZE_TIMEOUT {
            return Err(CgroupError::FreezeTimeout(path.to_owned()));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

/// Create `dir` and its parents, as runc does for a container.
pub(super) fn mkdir_all(dir: &Path) -> Result<(), CgroupError> {
    std::fs::create_dir_all(dir).map_err(|source| CgroupError::Io {
        path: dir.to_owned(),
        source,
    })
}

/// Write `value` to `file` when the kernel offers it (a controller not
/// enabled for the cgroup has no files).
pub(super) fn write_if_present(file: &Path, value: &str) -> Result<(), CgroupError> {
    if file.exists() {
        write(file, value)?;
    }
    Ok(())
}
