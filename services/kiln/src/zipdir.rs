//! Zip a folder into a code package, the way `kiln deploy` uploads it.

use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ZipDirError {
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("Cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot build the zip")]
    Zip(#[from] zip::result::ZipError),
}

/// Zip every regular file below `dir` (symlinks and special files are
/// skipped), keeping the executable bit. Entries are sorted, so the same
/// folder gives the same bytes and the same code checksum.
pub fn zip_dir(dir: &Path) -> Result<Vec<u8>, ZipDirError> {
    if !dir.is_dir() {
        return Err(ZipDirError::NotADirectory(dir.to_owned()));
    }
    let mut files = Vec::new();
    collect(dir, dir, &mut files)?;
    files.sort();
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for rel in files {
        let path = dir.join(&rel);
        let meta = std::fs::metadata(&path).map_err(|source| ZipDirError::Read {
            path: path.clone(),
            source,
        })?;
        use std::os::unix::fs::PermissionsExt;
        let mode = if meta.permissions().mode() & 0o111 != 0 {
            0o755
        } else {
            0o644
        };
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .last_modified_time(zip::DateTime::default())
            .unix_permissions(mode);
        let name = rel.to_string_lossy().replace('\\', "/");
        out.start_file(name, options)?;
        let data = std::fs::read(&path).map_err(|source| ZipDirError::Read {
            path: path.clone(),
            source,
        })?;
        out.write_all(&data)
            .map_err(|source| ZipDirError::Read { path, source })?;
    }
    Ok(out.finish()?.into_inner())
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), ZipDirError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ZipDirError::Read {
        path: dir.to_owned(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| ZipDirError::Read {
            path: dir.to_owned(),
            source,
        })?;
        let ty = entry.file_type().map_err(|source| ZipDirError::Read {
            path: entry.path(),
            source,
        })?;
        let path = entry.path();
        if ty.is_dir() {
            collect(root, &path, out)?;
        } else if ty.is_file() {
            out.push(path.strip_prefix(root).expect("below root").to_owned());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn zips_files_with_modes_deterministically() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("a.txt"), "A").unwrap();
        std::fs::write(dir.path().join("sub/run"), "#!/bin/sh").unwrap();
        std::fs::set_permissions(
            dir.path().join("sub/run"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let bytes = zip_dir(dir.path()).unwrap();
        assert_eq!(bytes, zip_dir(dir.path()).unwrap());
        let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
        assert_eq!(z.len(), 2);
        let mut s = String::new();
        z.by_name("a.txt").unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "A");
        assert_eq!(
            z.by_name("sub/run").unwrap().unix_mode().unwrap() & 0o777,
            0o755
        );
    }

    #[test]
    fn refuses_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, "x").unwrap();
        assert!(matches!(zip_dir(&f), Err(ZipDirError::NotADirectory(_))));
    }
}
