//! The checks every entry passes before a byte is written: its path, its
//! type, its declared sizes, and no clash with another entry.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

use zip::{CompressionMethod, ZipArchive};

use crate::CodeError;

pub(crate) const COPY_BUFFER: usize = 64 * 1024;
const NAME_MAX: usize = 255;
const PATH_MAX: usize = 4096;
const S_IFMT: u32 = 0o170_000;
const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFLNK: u32 = 0o120_000;

/// The limits a package is held to. [`Default`] is FC's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Zip bytes.
    pub zip_max: u64,
    /// Sum of the unzipped file sizes.
    pub unzipped_max: u64,
    /// Entries, directories included.
    pub entries_max: usize,
    /// Largest uncompressed:compressed ratio allowed for an entry of at
    /// least `ratio_min_size` bytes (deflate tops out near 1032:1).
    pub ratio_max: u64,
    pub ratio_min_size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Dir,
    File { executable: bool },
}

#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub index: usize,
    pub name: String,
    /// Relative, normalised, free of `..` and empty components.
    pub path: PathBuf,
    pub kind: Kind,
    /// Declared uncompressed size; the bytes produced must match it.
    pub size: u64,
}

#[derive(Debug)]
pub(crate) struct Plan {
    pub entries: Vec<Entry>,
}

impl Plan {
    pub fn files(&self) -> impl Iterator<Item = &Entry> {
        self.entries
            .iter()
            .filter(|e| matches!(e.kind, Kind::File { .. }))
    }
}

/// Reads the central directory and checks every entry without decompressing.
pub(crate) fn plan<R: Read + Seek>(
    archive: &mut ZipArchive<R>,
    limits: &Limits,
) -> Result<Plan, CodeError> {
    if archive.len() > limits.entries_max {
        return Err(CodeError::TooManyEntries {
            count: archive.len(),
            limit: limits.entries_max,
        });
    }
    let mut entries = Vec::with_capacity(archive.len());
    let mut declared = 0u64;
    for index in 0..archive.len() {
        let file = archive
            .by_index_raw(index)
            .map_err(|e| CodeError::Corrupt(e.to_string()))?;
        let name = file.name().to_owned();
        let bad = |reason| CodeError::InvalidEntry {
            name: clip(&name),
            reason,
        };
        if file.encrypted() {
            return Err(bad("is encrypted"));
        }
        if !matches!(
            file.compression(),
            CompressionMethod::Stored | CompressionMethod::Deflated
        ) {
            return Err(bad(
                "uses a compression method other than stored or deflate",
            ));
        }
        let mode = file.unix_mode().unwrap_or(0);
        let is_dir = file.is_dir();
        match mode & S_IFMT {
            0 => {}
            S_IFREG if !is_dir => {}
            S_IFDIR if is_dir => {}
            S_IFLNK => return Err(bad("is a symbolic link")),
            _ => return Err(bad("is not a regular file or directory")),
        }
        let size = file.size();
        if is_dir && size != 0 {
            return Err(bad("is a directory with contents"));
        }
        declared = declared.saturating_add(size);
        if declared > limits.unzipped_max {
            return Err(CodeError::UnzippedTooLarge {
                limit: limits.unzipped_max,
            });
        }
        let compressed = file.compressed_size().max(1);
        if size >= limits.ratio_min_size && size / compressed > limits.ratio_max {
            return Err(CodeError::SuspiciousRatio {
                name: clip(&name),
                ratio: size / compressed,
            });
        }
        let Some(path) = safe_path(&name).map_err(bad)? else {
            if is_dir {
                continue; // "./": the root itself
            }
            return Err(bad("has an empty path"));
        };
        let kind = if is_dir {
            Kind::Dir
        } else {
            Kind::File {
                executable: mode & 0o111 != 0,
            }
        };
        entries.push(Entry {
            index,
            name,
            path,
            kind,
            size,
        });
    }
    check_clashes(&entries)?;
    Ok(Plan { entries })
}

/// `Ok(None)` for a name that is the root itself.
fn safe_path(name: &str) -> Result<Option<PathBuf>, &'static str> {
    if name.contains('\0') {
        return Err("contains a NUL character");
    }
    if name.contains('\\') {
        return Err("contains a backslash; zip paths use '/'");
    }
    if name.starts_with('/') {
        return Err("is an absolute path");
    }
    if name.len() > PATH_MAX {
        return Err("has a path over 4096 bytes");
    }
    let mut path = PathBuf::new();
    for component in name.split('/') {
        match component {
            "" | "." => {}
            ".." => return Err("escapes the package root with '..'"),
            c if c.len() > NAME_MAX => return Err("has a path component over 255 bytes"),
            c => path.push(c),
        }
    }
    Ok((!path.as_os_str().is_empty()).then_some(path))
}

/// No two entries for the same path (directories excepted), and no file
/// where another entry needs a directory.
fn check_clashes(entries: &[Entry]) -> Result<(), CodeError> {
    let mut kinds: HashMap<&Path, Kind> = HashMap::with_capacity(entries.len());
    let mut parents: HashSet<&Path> = HashSet::new();
    for e in entries {
        let clash = |reason| CodeError::InvalidEntry {
            name: clip(&e.name),
            reason,
        };
        match (kinds.insert(&e.path, e.kind), e.kind) {
            (None, _) | (Some(Kind::Dir), Kind::Dir) => {}
            _ => return Err(clash("appears more than once")),
        }
        let mut ancestor = e.path.parent();
        while let Some(a) = ancestor.filter(|a| !a.as_os_str().is_empty()) {
            if !parents.insert(a) {
                break; // its ancestors are in already
            }
            ancestor = a.parent();
        }
    }
    for e in entries {
        if matches!(e.kind, Kind::File { .. }) && parents.contains(e.path.as_path()) {
            return Err(CodeError::InvalidEntry {
                name: clip(&e.name),
                reason: "is a file but other entries use it as a directory",
            });
        }
    }
    Ok(())
}

pub(crate) enum CopyError {
    Read(io::Error),
    Write(io::Error),
    Refused(CodeError),
}

impl CopyError {
    pub fn into_code_error(self, dest: &Path) -> CodeError {
        match self {
            Self::Read(e) => CodeError::Corrupt(e.to_string()),
            Self::Write(source) => CodeError::Io {
                path: dest.to_owned(),
                source,
            },
            Self::Refused(e) => e,
        }
    }
}

/// Copies one entry, counting the bytes actually produced: an entry that
/// decompresses to more (or less) than it declared is corrupt, whatever its
/// checksum says, and the total may never pass the limit.
pub(crate) fn copy_checked(
    reader: &mut impl Read,
    entry: &Entry,
    writer: &mut impl Write,
    produced: &mut u64,
    limits: &Limits,
    buf: &mut [u8],
) -> Result<(), CopyError> {
    let mut written = 0u64;
    loop {
        let n = match reader.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        written += n as u64;
        *produced += n as u64;
        if written > entry.size {
            return Err(CopyError::Refused(CodeError::Corrupt(format!(
                "entry {:?} is larger than its declared size",
                clip(&entry.name)
            ))));
        }
        if *produced > limits.unzipped_max {
            return Err(CopyError::Refused(CodeError::UnzippedTooLarge {
                limit: limits.unzipped_max,
            }));
        }
        writer.write_all(&buf[..n]).map_err(CopyError::Write)?;
    }
    if written != entry.size {
        return Err(CopyError::Refused(CodeError::Corrupt(format!(
            "entry {:?} is shorter than its declared size",
            clip(&entry.name)
        ))));
    }
    Ok(())
}

/// A name from the archive, made short and printable for a message.
pub(crate) fn clip(name: &str) -> String {
    name.chars()
        .take(200)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(safe_path("a/b.txt"), Ok(Some(PathBuf::from("a/b.txt"))));
        assert_eq!(safe_path("./a//b/"), Ok(Some(PathBuf::from("a/b"))));
        assert_eq!(safe_path("./"), Ok(None));
        assert!(safe_path("../x").is_err());
        assert!(safe_path("a/../../x").is_err());
        assert!(safe_path("a/..").is_err());
        assert!(safe_path("/abs").is_err());
        assert!(safe_path("a\\..\\x").is_err());
        assert!(safe_path("a\0b").is_err());
        assert!(safe_path(&"x".repeat(256)).is_err());
        assert!(safe_path(&"ab/".repeat(1400)).is_err());
    }
}
