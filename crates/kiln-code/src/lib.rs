//! Code packages: the zip a function's code arrives in.
//!
//! [`inspect`] decides whether the gateway accepts an upload: it reads the
//! central directory, refuses entries that could escape the package root or
//! are not plain files and directories, and decompresses every entry to
//! prove the archive is intact and within FC's unzipped limit, counting the
//! bytes actually produced rather than trusting the declared sizes.
//! [`extract`] repeats those checks while writing the files into a sibling
//! temporary directory and renames it into place only when everything
//! succeeded, so a reader never sees a partial package.
#![forbid(unsafe_code)]

mod entries;
mod extract;
pub mod layer;

use std::io::{self, Cursor};
use std::path::{Path, PathBuf};

use kiln_core::limits::{CODE_UNZIPPED_MAX, CODE_ZIP_MAX};
use kiln_core::FcError;
use sha2::{Digest, Sha256};
use zip::ZipArchive;

pub use entries::Limits;
pub use layer::{unpack_layer, LayerCompression, LayerError, LayerInfo, LayerLimits};

/// What Kiln records about an accepted package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeInfo {
    /// Lower-case hex SHA-256 of the zip bytes (FC's `codeChecksum` is
    /// derived from the same bytes).
    pub sha256: String,
    /// Size of the zip in bytes (FC's `codeSize`).
    pub size: u64,
    /// Total size of the files once unzipped.
    pub unzipped_size: u64,
    /// Entries in the archive, directories included.
    pub entries: usize,
}

/// Why a package was refused or could not be extracted.
#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    #[error("Code package is {size} bytes, over the limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    #[error("Code package is not a valid zip archive: {0}")]
    Corrupt(String),
    #[error("Code package has {count} entries, over the limit of {limit}")]
    TooManyEntries { count: usize, limit: usize },
    #[error("Code package entry {name:?} {reason}")]
    InvalidEntry { name: String, reason: &'static str },
    #[error("Code package unzips to more than {limit} bytes")]
    UnzippedTooLarge { limit: u64 },
    #[error("Code package entry {name:?} has a suspicious compression ratio ({ratio}:1)")]
    SuspiciousRatio { name: String, ratio: u64 },
    #[error("Destination {0} already exists")]
    DestinationExists(PathBuf),
    #[error("Failed to write code package to {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl From<CodeError> for FcError {
    fn from(e: CodeError) -> Self {
        match e {
            // Failures on our side, not the caller's.
            CodeError::DestinationExists(_) | CodeError::Io { .. } => {
                FcError::internal(kiln_core::error_chain(&e))
            }
            _ => FcError::invalid_argument(e.to_string()),
        }
    }
}

/// Validates a package against FC's limits.
pub fn inspect(zip: &[u8]) -> Result<CodeInfo, CodeError> {
    inspect_with_limits(zip, &Limits::default())
}

/// [`inspect`] with explicit limits.
pub fn inspect_with_limits(zip: &[u8], limits: &Limits) -> Result<CodeInfo, CodeError> {
    let mut archive = open(zip, limits)?;
    let plan = entries::plan(&mut archive, limits)?;
    let mut produced = 0u64;
    let mut buf = vec![0u8; entries::COPY_BUFFER];
    for entry in plan.files() {
        let mut file = archive.by_index(entry.index).map_err(corrupt)?;
        entries::copy_checked(
            &mut file,
            entry,
            &mut io::sink(),
            &mut produced,
            limits,
            &mut buf,
        )
        .map_err(|e| e.into_code_error(Path::new("")))?;
    }
    Ok(info(zip, produced, archive.len()))
}

/// Extracts a package to `dest`, which must not exist. Files keep the
/// zip's exec bit (0755, else 0644), directories are 0755, and everything
/// is owned by `owner` (uid, gid) when given.
pub fn extract(zip: &[u8], dest: &Path, owner: Option<(u32, u32)>) -> Result<CodeInfo, CodeError> {
    extract_with_limits(zip, dest, owner, &Limits::default())
}

/// [`extract`] with explicit limits.
pub fn extract_with_limits(
    zip: &[u8],
    dest: &Path,
    owner: Option<(u32, u32)>,
    limits: &Limits,
) -> Result<CodeInfo, CodeError> {
    if dest.symlink_metadata().is_ok() {
        return Err(CodeError::DestinationExists(dest.to_owned()));
    }
    let mut archive = open(zip, limits)?;
    let plan = entries::plan(&mut archive, limits)?;
    let produced = extract::extract(&mut archive, &plan, dest, owner, limits)?;
    Ok(info(zip, produced, archive.len()))
}

fn open<'a>(zip: &'a [u8], limits: &Limits) -> Result<ZipArchive<Cursor<&'a [u8]>>, CodeError> {
    if zip.len() as u64 > limits.zip_max {
        return Err(CodeError::TooLarge {
            size: zip.len() as u64,
            limit: limits.zip_max,
        });
    }
    ZipArchive::new(Cursor::new(zip)).map_err(corrupt)
}

fn info(zip: &[u8], unzipped_size: u64, entries: usize) -> CodeInfo {
    CodeInfo {
        sha256: hex::encode(Sha256::digest(zip)),
        size: zip.len() as u64,
        unzipped_size,
        entries,
    }
}

fn corrupt(e: impl std::fmt::Display) -> CodeError {
    CodeError::Corrupt(e.to_string())
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            zip_max: CODE_ZIP_MAX as u64,
            unzipped_max: CODE_UNZIPPED_MAX,
            entries_max: 100_000,
            ratio_max: 200,
            ratio_min_size: 8 * 1024 * 1024,
        }
    }
}
