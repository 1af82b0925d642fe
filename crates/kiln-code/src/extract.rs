//! Writing a checked plan to disk: into a sibling temporary directory,
//! fsynced, then renamed into place without replacing anything.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{Read, Seek};
use std::os::unix::fs::{chown, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::RngCore;
use zip::ZipArchive;

use crate::entries::{copy_checked, Kind, Limits, Plan, COPY_BUFFER};
use crate::CodeError;

/// Returns the number of bytes unzipped.
pub(crate) fn extract<R: Read + Seek>(
    archive: &mut ZipArchive<R>,
    plan: &Plan,
    dest: &Path,
    owner: Option<(u32, u32)>,
    limits: &Limits,
) -> Result<u64, CodeError> {
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dest_name = dest
        .file_name()
        .ok_or_else(|| io_error(dest, std::io::ErrorKind::InvalidInput.into()))?;
    let mut suffix = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut suffix);
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        dest_name.to_string_lossy(),
        hex::encode(suffix)
    ));
    fs::create_dir(&tmp).map_err(|e| io_error(&tmp, e))?;
    let result = fill(archive, plan, &tmp, owner, limits)
        .and_then(|produced| publish_dir(&tmp, dest, parent).map(|()| produced));
    if result.is_err() {
        // Only our own fresh directory: nothing is mounted below it.
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

fn fill<R: Read + Seek>(
    archive: &mut ZipArchive<R>,
    plan: &Plan,
    root: &Path,
    owner: Option<(u32, u32)>,
    limits: &Limits,
) -> Result<u64, CodeError> {
    let mut produced = 0u64;
    let mut buf = vec![0u8; COPY_BUFFER];
    for entry in &plan.entries {
        let path = root.join(&entry.path);
        match entry.kind {
            Kind::Dir => create_dirs(&path)?,
            Kind::File { executable } => {
                if let Some(dir) = path.parent() {
                    create_dirs(dir)?;
                }
                let mode = if executable { 0o755 } else { 0o644 };
                let mut out = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .open(&path)
                    .map_err(|e| io_error(&path, e))?;
                let mut file = archive
                    .by_index(entry.index)
                    .map_err(|e| CodeError::Corrupt(e.to_string()))?;
                copy_checked(&mut file, entry, &mut out, &mut produced, limits, &mut buf)
                    .map_err(|e| e.into_code_error(&path))?;
                // The umask may have narrowed the mode given at creation.
                out.set_permissions(Permissions::from_mode(mode))
                    .map_err(|e| io_error(&path, e))?;
                out.sync_all().map_err(|e| io_error(&path, e))?;
            }
        }
    }
    finish_tree(root, owner)?;
    Ok(produced)
}

fn create_dirs(path: &Path) -> Result<(), CodeError> {
    fs::create_dir_all(path).map_err(|e| io_error(path, e))
}

/// Directory modes, ownership and fsync, bottom-up, over the tree we just
/// wrote (it holds only directories and regular files).
fn finish_tree(dir: &Path, owner: Option<(u32, u32)>) -> Result<(), CodeError> {
    for child in fs::read_dir(dir).map_err(|e| io_error(dir, e))? {
        let child = child.map_err(|e| io_error(dir, e))?;
        let path = child.path();
        let kind = child.file_type().map_err(|e| io_error(&path, e))?;
        if kind.is_dir() {
            finish_tree(&path, owner)?;
        } else if let Some((uid, gid)) = owner {
            chown(&path, Some(uid), Some(gid)).map_err(|e| io_error(&path, e))?;
        }
    }
    fs::set_permissions(dir, Permissions::from_mode(0o755)).map_err(|e| io_error(dir, e))?;
    if let Some((uid, gid)) = owner {
        chown(dir, Some(uid), Some(gid)).map_err(|e| io_error(dir, e))?;
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(dir, e))
}

/// Renames `tmp` to `dest` unless `dest` exists, then makes the rename durable.
pub(crate) fn publish_dir(tmp: &Path, dest: &Path, parent: &Path) -> Result<(), CodeError> {
    rename_noreplace(tmp, dest)?;
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(parent, e))
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn rename_noreplace(tmp: &Path, dest: &Path) -> Result<(), CodeError> {
    use nix::errno::Errno;
    use nix::fcntl::{renameat2, RenameFlags};
    match renameat2(None, tmp, None, dest, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        Err(Errno::EEXIST) | Err(Errno::ENOTEMPTY) => {
            Err(CodeError::DestinationExists(dest.to_owned()))
        }
        // File systems without RENAME_NOREPLACE: check, then rename.
        Err(Errno::EINVAL) | Err(Errno::ENOSYS) => rename_checked(tmp, dest),
        Err(e) => Err(io_error(dest, e.into())),
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn rename_noreplace(tmp: &Path, dest: &Path) -> Result<(), CodeError> {
    rename_checked(tmp, dest)
}

fn rename_checked(tmp: &Path, dest: &Path) -> Result<(), CodeError> {
    if dest.symlink_metadata().is_ok() {
        return Err(CodeError::DestinationExists(dest.to_owned()));
    }
    fs::rename(tmp, dest).map_err(|e| io_error(dest, e))
}

fn io_error(path: &Path, source: std::io::Error) -> CodeError {
    CodeError::Io {
        path: PathBuf::from(path),
        source,
    }
}
