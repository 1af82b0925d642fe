//! The node's code cache: each code package fetched once from the gateway
//! by its sha256, verified, and extracted once into
//! `state_dir/code/<sha256>`, immutable from then on and shared by every
//! instance of every function with that code.
//!
//! The cache is bounded (`[code_cache] max_bytes`): when a new package
//! takes it over, the least recently used directories go, except those
//! pinned by an instance (from before its sandbox is made until it is
//! destroyed) or being prepared. Eviction renames a directory out of the
//! way under the same lock pins are taken with, so an instance never sees
//! its code disappear and a later request fetches it again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use kiln_core::FcError;
use kiln_internal_api::server::empty;
use kiln_internal_api::{paths, InternalClient, InternalClientError};
use sha2::{Digest, Sha256};

/// Why a code package could not be made available.
#[derive(Debug, thiserror::Error)]
pub enum CodeCacheError {
    #[error("Invalid code digest {0:?}: expected 64 lower-case hex digits")]
    BadDigest(String),
    #[error("Cannot fetch code package {digest}")]
    Fetch {
        digest: String,
        #[source]
        source: InternalClientError,
    },
    #[error("Code package {digest} is larger than {limit} bytes")]
    TooLarge { digest: String, limit: usize },
    #[error("Code package {expected} failed verification: its content hashes to {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error("Cannot extract code package {digest}: {error}")]
    Extract { digest: String, error: FcError },
    #[error("Cannot prepare the code directory {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl CodeCacheError {
    /// What the scheduler (and the public caller) is told.
    pub fn to_fc(&self) -> FcError {
        match self {
            Self::BadDigest(_) => FcError::invalid_argument(self.to_string()),
            Self::Fetch { source, .. } => match source {
                InternalClientError::Remote { error, .. } => error.clone(),
                other => other.to_fc(),
            },
            Self::Extract { error, .. } => error.clone(),
            Self::TooLarge { .. } | Self::DigestMismatch { .. } | Self::Io { .. } => {
                FcError::internal(self.to_string())
            }
        }
    }
}

/// Where code packages come from.
#[async_trait::async_trait]
pub trait CodeSource: Send + Sync + 'static {
    /// The zip whose sha256 is `digest`, at most `limit` bytes.
    async fn fetch(&self, digest: &str, limit: usize) -> Result<Bytes, CodeCacheError>;
}

/// The gateway's internal listener: `GET /v1/code/<sha256>`.
pub struct GatewayCodeSource {
    client: InternalClient,
    base: String,
}

impl GatewayCodeSource {
    pub fn new(client: InternalClient, gateway_internal_url: &str) -> Self {
        Self {
            client,
            base: gateway_internal_url.trim_end_matches('/').to_owned(),
        }
    }
}

#[async_trait::async_trait]
impl CodeSource for GatewayCodeSource {
    async fn fetch(&self, digest: &str, limit: usize) -> Result<Bytes, CodeCacheError> {
        let url = format!("{}{}", self.base, paths::code(digest));
        let fetch_err = |source| CodeCacheError::Fetch {
            digest: digest.to_owned(),
            source,
        };
        let req = Request::builder()
            .method(Method::GET)
            .uri(&url)
            .body(empty())
            .map_err(|e| {
                fetch_err(InternalClientError::Transport {
                    url: url.clone(),
                    message: e.to_string(),
                })
            })?;
        let resp = self.client.send(req).await.map_err(fetch_err)?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), limit).collect().await;
        let bytes = match body {
            Ok(c) => c.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(CodeCacheError::TooLarge {
                    digest: digest.to_owned(),
                    limit,
                })
            }
            Err(e) => {
                return Err(fetch_err(InternalClientError::Transport {
                    url,
                    message: e.to_string(),
                }))
            }
        };
        if status != StatusCode::OK {
            return Err(fetch_err(InternalClientError::Remote {
                url,
                error: kiln_internal_api::client::remote_error(status, &bytes),
            }));
        }
        Ok(bytes)
    }
}

/// Turns a verified zip into a directory. `dest` does not exist; the
/// implementation creates it atomically (all or nothing).
pub trait Unpacker: Send + Sync + 'static {
    fn unpack(&self, zip: &[u8], dest: &Path, owner: Option<(u32, u32)>) -> Result<(), FcError>;
}

/// Fetches, verifies and extracts code packages, once per digest.
pub struct CodeCache {
    dir: PathBuf,
    owner: Option<(u32, u32)>,
    source: Arc<dyn CodeSource>,
    unpacker: Arc<dyn Unpacker>,
    /// One lock per digest being prepared: concurrent creates of the same
    /// code wait for the first one's download instead of starting their own.
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The most bytes of extracted code kept; `None`: unbounded.
    max_bytes: Option<u64>,
    lru: Mutex<Lru>,
}

/// What the cache holds, when each was last used, and who uses it.
#[derive(Default)]
struct Lru {
    entries: HashMap<String, Entry>,
    total: u64,
    tick: u64,
    /// Digests each instance uses (its code and layers).
    pins: HashMap<String, Vec<String>>,
    /// How many instances use each digest.
    pinned: HashMap<String, usize>,
    evicted: u64,
}

struct Entry {
    bytes: u64,
    used: u64,
}

impl Lru {
    fn touch(&mut self, digest: &str) {
        self.tick += 1;
        if let Some(e) = self.entries.get_mut(digest) {
            e.used = self.tick;
        }
    }

    fn insert(&mut self, digest: &str, bytes: u64) {
        self.tick += 1;
        let old = self.entries.insert(
            digest.to_owned(),
            Entry {
                bytes,
                used: self.tick,
            },
        );
        self.total = self.total - old.map_or(0, |e| e.bytes) + bytes;
    }
}

/// The bytes of the files under `path` (not following links).
fn dir_bytes(path: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![path.to_owned()];
    while let Some(p) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&p) else {
            continue;
        };
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

pub fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl CodeCache {
    /// `owner`: the uid/gid the extracted files belong to (the sandbox's
    /// mapped root, so a function can read its code but the host's root
    /// owns nothing inside a sandbox).
    pub fn new(
        dir: PathBuf,
        owner: Option<(u32, u32)>,
        source: Arc<dyn CodeSource>,
        unpacker: Arc<dyn Unpacker>,
    ) -> Self {
        Self {
            dir,
            owner,
            source,
            unpacker,
            inflight: Mutex::new(HashMap::new()),
            max_bytes: None,
            lru: Mutex::new(Lru::default()),
        }
    }

    /// The same cache bounded to `max_bytes` of extracted code; what is
    /// already on disk is counted, oldest first by modification time.
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = Some(max_bytes);
        let mut found: Vec<(std::time::SystemTime, String, u64)> = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let path = e.path();
                if name.starts_with(".evicted-") {
                    // An eviction interrupted by a crash.
                    let _ = std::fs::remove_dir_all(&path);
                    continue;
                }
                if !is_digest(&name) || !path.is_dir() {
                    continue;
                }
                let mtime = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                found.push((mtime, name, dir_bytes(&path)));
            }
        }
        found.sort();
        let lru = self.lru.get_mut().expect("code cache lock");
        for (_, digest, bytes) in found {
            lru.insert(&digest, bytes);
        }
        self
    }

    /// Keep `digests` (an instance's code and layers) until [`unpin`]:
    /// call before [`ensure`] so nothing evicts them in between.
    ///
    /// [`unpin`]: CodeCache::unpin
    /// [`ensure`]: CodeCache::ensure
    pub fn pin(&self, instance: &str, digests: Vec<String>) {
        let mut lru = self.lru.lock().expect("code cache lock");
        for d in &digests {
            *lru.pinned.entry(d.clone()).or_default() += 1;
        }
        if let Some(old) = lru.pins.insert(instance.to_owned(), digests) {
            for d in old {
                Self::release(&mut lru, &d);
            }
        }
    }

    /// The instance is gone: its code may be evicted.
    pub fn unpin(&self, instance: &str) {
        let mut lru = self.lru.lock().expect("code cache lock");
        if let Some(old) = lru.pins.remove(instance) {
            for d in old {
                Self::release(&mut lru, &d);
            }
        }
    }

    fn release(lru: &mut Lru, digest: &str) {
        if let Some(n) = lru.pinned.get_mut(digest) {
            *n -= 1;
            if *n == 0 {
                lru.pinned.remove(digest);
            }
        }
    }

    /// Whether an instance uses `digest`.
    pub fn is_pinned(&self, digest: &str) -> bool {
        self.lru
            .lock()
            .expect("code cache lock")
            .pinned
            .contains_key(digest)
    }

    /// Bytes of extracted code held now, and directories evicted so far.
    pub fn usage(&self) -> (u64, u64) {
        let lru = self.lru.lock().expect("code cache lock");
        (lru.total, lru.evicted)
    }

    /// Evict least recently used, unpinned directories until the cache is
    /// within its bound (or nothing more may go).
    fn evict(&self, keep: &str) {
        let Some(max) = self.max_bytes else {
            return;
        };
        let mut doomed = Vec::new();
        {
            let inflight: std::collections::HashSet<String> = self
                .inflight
                .lock()
                .expect("code cache lock")
                .keys()
                .cloned()
                .collect();
            let mut lru = self.lru.lock().expect("code cache lock");
            while lru.total > max {
                let victim = lru
                    .entries
                    .iter()
                    .filter(|(d, _)| {
                        *d != keep && !lru.pinned.contains_key(*d) && !inflight.contains(*d)
                    })
                    .min_by_key(|(_, e)| e.used)
                    .map(|(d, _)| d.clone());
                let Some(digest) = victim else {
                    tracing::warn!(
                        total = lru.total,
                        max,
                        "code cache over its bound, but every package is in use"
                    );
                    break;
                };
                let entry = lru.entries.remove(&digest).expect("present");
                lru.total -= entry.bytes;
                // Renamed under the lock: a pin taken after this sees the
                // directory gone and fetches it again.
                let from = self.path_of(&digest);
                let to = self.dir.join(format!(".evicted-{digest}"));
                match std::fs::rename(&from, &to) {
                    Ok(()) => {
                        lru.evicted += 1;
                        doomed.push((digest, to, entry.bytes));
                    }
                    Err(e) => {
                        tracing::warn!(digest, error = %e, "cannot evict code package");
                    }
                }
            }
        }
        for (digest, path, bytes) in doomed {
            if let Err(e) = std::fs::remove_dir_all(&path) {
                tracing::warn!(digest, path = %path.display(), error = %e, "cannot remove evicted code package");
            }
            tracing::info!(digest, bytes, "code package evicted (least recently used)");
        }
    }

    pub fn path_of(&self, digest: &str) -> PathBuf {
        self.dir.join(digest)
    }

    /// The extracted directory of `digest`, fetching and extracting it
    /// unless it is there already.
    pub async fn ensure(&self, digest: &str, size_hint: u64) -> Result<PathBuf, CodeCacheError> {
        if !is_digest(digest) {
            return Err(CodeCacheError::BadDigest(digest.chars().take(80).collect()));
        }
        let dest = self.path_of(digest);
        if dest.is_dir() {
            self.lru.lock().expect("code cache lock").touch(digest);
            return Ok(dest);
        }
        let lock = {
            let mut map = self.inflight.lock().expect("code cache lock");
            map.entry(digest.to_owned()).or_default().clone()
        };
        let result = {
            let _held = lock.lock().await;
            if dest.is_dir() {
                Ok(dest.clone())
            } else {
                self.fetch_and_extract(digest, size_hint, &dest)
                    .await
                    .map(|()| dest.clone())
            }
        };
        {
            let mut map = self.inflight.lock().expect("code cache lock");
            // The map's entry plus ours: nobody else waits on it.
            if Arc::strong_count(&lock) <= 2 {
                map.remove(digest);
            }
        }
        if result.is_ok() {
            self.evict(digest);
        }
        result
    }

    async fn fetch_and_extract(
        &self,
        digest: &str,
        size_hint: u64,
        dest: &Path,
    ) -> Result<(), CodeCacheError> {
        let started = std::time::Instant::now();
        let limit = kiln_core::limits::CODE_ZIP_MAX;
        let zip = self.source.fetch(digest, limit).await?;
        let actual = hex::encode(Sha256::digest(&zip));
        if actual != digest {
            tracing::error!(digest, %actual, "code package failed verification; refused");
            return Err(CodeCacheError::DigestMismatch {
                expected: digest.to_owned(),
                actual,
            });
        }
        std::fs::create_dir_all(&self.dir).map_err(|source| CodeCacheError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let unpacker = self.unpacker.clone();
        let owner = self.owner;
        let dest_owned = dest.to_owned();
        let size = zip.len();
        let unpacked =
            tokio::task::spawn_blocking(move || unpacker.unpack(&zip, &dest_owned, owner))
                .await
                .unwrap_or_else(|e| {
                    Err(FcError::internal(format!("code extraction panicked: {e}")))
                });
        unpacked.map_err(|error| CodeCacheError::Extract {
            digest: digest.to_owned(),
            error,
        })?;
        if self.max_bytes.is_some() {
            let d = dest.to_owned();
            let bytes = tokio::task::spawn_blocking(move || dir_bytes(&d))
                .await
                .unwrap_or(0);
            self.lru
                .lock()
                .expect("code cache lock")
                .insert(digest, bytes);
        }
        tracing::info!(
            digest,
            size,
            expected_size = size_hint,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "code package extracted"
        );
        Ok(())
    }
}

/// The real unpacker: `kiln_code::extract` (validates every entry, writes
/// into a sibling temp dir, fsyncs, renames into place).
pub struct ZipUnpacker;

impl Unpacker for ZipUnpacker {
    fn unpack(&self, zip: &[u8], dest: &Path, owner: Option<(u32, u32)>) -> Result<(), FcError> {
        kiln_code::extract(zip, dest, owner)
            .map(|_| ())
            .map_err(FcError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{DirUnpacker, FakeCodeSource};
    use kiln_core::FcErrorCode;
    use std::time::Duration;

    fn cache(dir: &Path, source: Arc<FakeCodeSource>) -> Arc<CodeCache> {
        Arc::new(CodeCache::new(
            dir.join("code"),
            None,
            source,
            Arc::new(DirUnpacker),
        ))
    }

    #[tokio::test]
    async fn the_least_recently_used_unpinned_package_is_evicted() {
        let tmp = tempfile::tempdir().unwrap();
        let source = Arc::new(FakeCodeSource::new(Duration::ZERO));
        let [a, b, c, d] = [b'a', b'b', b'c', b'd'].map(|x| source.add(vec![x; 1000]));
        let cache = CodeCache::new(
            tmp.path().join("code"),
            None,
            source.clone(),
            Arc::new(DirUnpacker),
        )
        .with_max_bytes(2500);
        for x in [&a, &b] {
            cache.ensure(x, 1000).await.unwrap();
        }
        // a used again: b is now the oldest.
        cache.ensure(&a, 1000).await.unwrap();
        cache.ensure(&c, 1000).await.unwrap();
        assert!(cache.path_of(&a).is_dir());
        assert!(!cache.path_of(&b).exists(), "b should have gone");
        assert!(cache.path_of(&c).is_dir());
        assert_eq!(cache.usage(), (2000, 1));
        // An instance's packages stay however old they get.
        cache.pin("i-1", vec![a.clone()]);
        cache.ensure(&c, 1000).await.unwrap();
        cache.ensure(&d, 1000).await.unwrap();
        assert!(cache.path_of(&a).is_dir(), "a pinned package was evicted");
        assert!(!cache.path_of(&c).exists());
        // Every package in use: over the bound rather than evicting one.
        cache.pin("i-2", vec![d.clone()]);
        cache.ensure(&b, 1000).await.unwrap();
        assert_eq!(cache.usage().0, 3000);
        assert!(cache.path_of(&a).is_dir() && cache.path_of(&d).is_dir());
        // Unpinned, the oldest goes at the next insert; a package evicted
        // is fetched again when asked for.
        cache.unpin("i-1");
        let fetches = source.fetches();
        cache.ensure(&c, 1000).await.unwrap();
        assert_eq!(source.fetches(), fetches + 1);
        assert!(!cache.path_of(&a).exists());
        // A restarted agent counts what is on disk.
        let again = CodeCache::new(
            tmp.path().join("code"),
            None,
            source.clone(),
            Arc::new(DirUnpacker),
        )
        .with_max_bytes(2500);
        assert_eq!(again.usage().0, cache.usage().0);
        assert!(std::fs::read_dir(tmp.path().join("code"))
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with(".evicted-")));
    }

    #[tokio::test]
    async fn one_download_for_concurrent_requests() {
        let tmp = tempfile::tempdir().unwrap();
        let source = Arc::new(FakeCodeSource::new(Duration::from_millis(50)));
        let digest = source.add(b"zip-bytes".to_vec());
        let cache = cache(tmp.path(), source.clone());
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let cache = cache.clone();
                let digest = digest.clone();
                tokio::spawn(async move { cache.ensure(&digest, 9).await })
            })
            .collect();
        for t in tasks {
            let dir = t.await.unwrap().unwrap();
            assert_eq!(std::fs::read(dir.join("payload")).unwrap(), b"zip-bytes");
        }
        assert_eq!(source.fetches(), 1);
        // Extracted once, kept: later requests do not fetch again.
        cache.ensure(&digest, 9).await.unwrap();
        assert_eq!(source.fetches(), 1);
        assert!(cache.inflight.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_mismatching_package_is_refused_and_not_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let source = Arc::new(FakeCodeSource::new(Duration::ZERO));
        let digest = "ab".repeat(32);
        source.insert_raw(&digest, b"not what the digest says".to_vec());
        let cache = cache(tmp.path(), source.clone());
        let err = cache.ensure(&digest, 1).await.unwrap_err();
        assert!(
            matches!(err, CodeCacheError::DigestMismatch { .. }),
            "{err}"
        );
        assert_eq!(err.to_fc().code, FcErrorCode::InternalServerError);
        assert!(!cache.path_of(&digest).exists());
    }

    #[tokio::test]
    async fn bad_digests_never_touch_the_filesystem() {
        let tmp = tempfile::tempdir().unwrap();
        let source = Arc::new(FakeCodeSource::new(Duration::ZERO));
        let cache = cache(tmp.path(), source.clone());
        for bad in ["../../etc", "AB".repeat(32).as_str(), "", &"a".repeat(63)] {
            let err = cache.ensure(bad, 1).await.unwrap_err();
            assert_eq!(err.to_fc().code, FcErrorCode::InvalidArgument);
        }
        assert_eq!(source.fetches(), 0);
        assert!(!tmp.path().join("code").exists());
    }

    fn zip_of(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
        use std::io::Write;
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        for (name, data, mode) in files {
            let opts = zip::write::SimpleFileOptions::default().unix_permissions(*mode);
            w.start_file(*name, opts).unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    #[tokio::test]
    async fn real_packages_extract_owned_by_the_mapped_root() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let tmp = tempfile::tempdir().unwrap();
        let source = Arc::new(FakeCodeSource::new(Duration::ZERO));
        let digest = source.add(zip_of(&[
            ("bootstrap", b"#!/bin/sh\n", 0o755),
            ("data.txt", b"hi", 0o644),
        ]));
        let root = nix::unistd::Uid::effective().is_root();
        let owner = root.then_some((100_000, 100_000));
        let cache = CodeCache::new(
            tmp.path().join("code"),
            owner,
            source.clone(),
            Arc::new(ZipUnpacker),
        );
        let dir = cache.ensure(&digest, 0).await.unwrap();
        assert_eq!(std::fs::read(dir.join("data.txt")).unwrap(), b"hi");
        let boot = std::fs::metadata(dir.join("bootstrap")).unwrap();
        assert_eq!(boot.permissions().mode() & 0o777, 0o755);
        if root {
            assert_eq!((boot.uid(), boot.gid()), (100_000, 100_000));
        }
        // Nothing but the package next to it (no temp leftovers).
        assert_eq!(
            std::fs::read_dir(tmp.path().join("code")).unwrap().count(),
            1
        );

        // A package escaping its root is refused: the caller's mistake.
        let evil = source.add(zip_of(&[("../evil", b"x", 0o644)]));
        let err = cache.ensure(&evil, 0).await.unwrap_err();
        assert_eq!(err.to_fc().code, FcErrorCode::InvalidArgument, "{err}");
        assert!(!tmp.path().join("evil").exists());
        assert!(!cache.path_of(&evil).exists());
    }

    #[tokio::test]
    async fn a_missing_package_reports_the_gateways_error() {
        let tmp = tempfile::tempdir().unwrap();
        let source = Arc::new(FakeCodeSource::new(Duration::ZERO));
        let cache = cache(tmp.path(), source.clone());
        let err = cache.ensure(&"cd".repeat(32), 1).await.unwrap_err();
        assert_eq!(err.to_fc().code, FcErrorCode::FunctionNotFound);
    }
}
