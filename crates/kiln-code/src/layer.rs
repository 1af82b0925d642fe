//! OCI image layers (tar, optionally gzip-compressed) unpacked into a
//! directory that overlayfs can use as a lower layer, with the zip
//! extractor's paranoia: every path relative and free of `..`, nothing
//! written through a symbolic link, no device nodes, FIFOs or sockets,
//! setuid/setgid bits dropped, file capabilities and other extended
//! attributes never applied, owners shifted into the sandbox's user
//! namespace, the bytes produced capped, and the whole layer written into
//! a sibling temporary directory that is renamed into place only once it
//! is complete.
//!
//! Whiteouts become overlayfs' own markers: `.wh.NAME` a 0/0 character
//! device `NAME` (made by the unpacker, never taken from the tar), and
//! `.wh..wh..opq` the `trusted.overlay.opaque` attribute on its directory.
//! Both need the host's root, as the agent is.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read};
use std::os::unix::fs::{lchown, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use rand::RngCore;
use sha2::{Digest, Sha256};

const NAME_MAX: usize = 255;
const PATH_MAX: usize = 4096;
/// Ids a sandbox's user namespace maps (`containerID 0..65536`).
const ID_RANGE: u64 = 65_536;
const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// How a layer blob is compressed (from its media type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    None,
    Gzip,
}

impl LayerCompression {
    /// The compression of a layer media type Kiln unpacks; `None` for
    /// others (zstd, foreign layers, non-layer blobs).
    pub fn of_media_type(media_type: &str) -> Option<Self> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Self::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Some(Self::Gzip),
            _ => None,
        }
    }
}

/// The limits one layer is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerLimits {
    /// Bytes of file content the layer may produce (what is left of the
    /// image's uncompressed size limit).
    pub max_bytes: u64,
    /// Entries, directories included.
    pub max_entries: usize,
}

/// What an unpacked layer holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// Bytes of file content written.
    pub bytes: u64,
    pub entries: usize,
    /// `sha256:<hex>` of the uncompressed tar: the image config's `diff_id`.
    pub diff_id: String,
}

/// Why a layer was refused or could not be written.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("Layer is not a readable tar archive: {0}")]
    Corrupt(String),
    #[error("Layer entry {path:?} is refused: {reason}")]
    Refused { path: String, reason: &'static str },
    #[error(
        "Layer entry {path:?} is a {kind}: images may not carry device nodes, FIFOs or sockets"
    )]
    SpecialFile { path: String, kind: &'static str },
    #[error("Layer entry {path:?} is owned by id {id}, outside the 0..65535 a sandbox maps")]
    Owner { path: String, id: u64 },
    #[error("Layer unpacks to more than {limit} bytes: the image exceeds its size limit")]
    TooLarge { limit: u64 },
    #[error("Layer has more than {limit} entries")]
    TooManyEntries { limit: usize },
    #[error("Cannot write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Destination {0} already exists")]
    DestinationExists(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LayerError + '_ {
    move |source| LayerError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Hashes what it reads: the uncompressed tar's digest.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Unpack the layer read from `blob` into `dest` (which must not exist;
/// created all or nothing). `id_base`: the host uid/gid the sandbox's root
/// maps to; every owner is shifted by it (`None`: owners are not set, for
/// tests without root).
pub fn unpack_layer(
    blob: impl Read,
    compression: LayerCompression,
    dest: &Path,
    id_base: Option<u32>,
    limits: LayerLimits,
) -> Result<LayerInfo, LayerError> {
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = dest
        .file_name()
        .ok_or_else(|| io_err(dest)(io::ErrorKind::InvalidInput.into()))?;
    let mut suffix = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut suffix);
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        hex::encode(suffix)
    ));
    fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    let result = match compression {
        LayerCompression::None => fill(blob, &tmp, id_base, limits),
        LayerCompression::Gzip => fill(
            flate2::read::MultiGzDecoder::new(blob),
            &tmp,
            id_base,
            limits,
        ),
    }
    .and_then(|info| {
        crate::extract::publish_dir(&tmp, dest, parent).map_err(|e| match e {
            crate::CodeError::DestinationExists(p) => LayerError::DestinationExists(p),
            other => LayerError::Io {
                path: dest.to_owned(),
                source: io::Error::other(other.to_string()),
            },
        })?;
        Ok(info)
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

/// A tar path made relative and checked: no `..`, no empty result, names
/// and length within Linux's limits.
fn clean_path(raw: &[u8]) -> Result<PathBuf, LayerError> {
    let shown = || {
        String::from_utf8_lossy(raw)
            .chars()
            .take(200)
            .collect::<String>()
    };
    let refused = |reason| LayerError::Refused {
        path: shown(),
        reason,
    };
    if raw.contains(&0) {
        return Err(refused("its name has a NUL byte"));
    }
    if raw.len() > PATH_MAX {
        return Err(refused("its path is longer than 4096 bytes"));
    }
    let path = Path::new(os(raw));
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => {
                if n.len() > NAME_MAX {
                    return Err(refused("a name in its path is longer than 255 bytes"));
                }
                out.push(n);
            }
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => return Err(refused("its path has a '..' component")),
            Component::Prefix(_) => return Err(refused("its path has a prefix")),
        }
    }
    Ok(out)
}

/// Every existing ancestor of `rel` under `root` must be a real directory:
/// nothing is ever written through a symbolic link the layer made.
fn check_parents(
    root: &Path,
    rel: &Path,
    shown: &str,
    implicit: &mut Vec<PathBuf>,
) -> Result<(), LayerError> {
    let mut at = root.to_owned();
    let mut comps: Vec<_> = rel.components().collect();
    comps.pop();
    for c in comps {
        at.push(c);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(LayerError::Refused {
                    path: shown.to_owned(),
                    reason: "a component of its path is not a directory (a link or a file)",
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&at).map_err(io_err(&at))?;
                fs::set_permissions(&at, Permissions::from_mode(0o755)).map_err(io_err(&at))?;
                implicit.push(at.clone());
            }
            Err(e) => return Err(io_err(&at)(e)),
        }
    }
    Ok(())
}

/// Remove what a later entry of the same layer replaces (tar semantics:
/// the last entry for a path wins), never following a link; a directory
/// replacing a directory is kept (its mode is updated).
fn clear_for(path: &Path, new_is_dir: bool) -> Result<(), LayerError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() && new_is_dir => Ok(()),
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(io_err(path)),
        Ok(_) => fs::remove_file(path).map_err(io_err(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn shift(id: u64, base: u32, shown: &str) -> Result<u32, LayerError> {
    if id >= ID_RANGE {
        return Err(LayerError::Owner {
            path: shown.to_owned(),
            id,
        });
    }
    Ok(base + id as u32)
}

fn fill(
    blob: impl Read,
    root: &Path,
    id_base: Option<u32>,
    limits: LayerLimits,
) -> Result<LayerInfo, LayerError> {
    let mut hashing = HashingReader {
        inner: blob,
        hasher: Sha256::new(),
    };
    let mut bytes = 0u64;
    let mut entries = 0usize;
    // Directory modes and owners are applied at the end, deepest first, so
    // a read-only directory does not stop its own entries being written.
    let mut dirs: HashMap<PathBuf, (u32, Option<(u32, u32)>)> = HashMap::new();
    // Directories the layer names only as parents: 0755, the image's root.
    let mut implicit: Vec<PathBuf> = Vec::new();
    {
        let mut archive = tar::Archive::new(&mut hashing);
        let iter = archive
            .entries()
            .map_err(|e| LayerError::Corrupt(e.to_string()))?;
        for entry in iter {
            let mut entry = entry.map_err(|e| LayerError::Corrupt(e.to_string()))?;
            let kind = entry.header().entry_type();
            if matches!(
                kind,
                tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
            ) {
                continue;
            }
            entries += 1;
            if entries > limits.max_entries {
                return Err(LayerError::TooManyEntries {
                    limit: limits.max_entries,
                });
            }
            let raw = entry.path_bytes().into_owned();
            let shown = String::from_utf8_lossy(&raw)
                .chars()
                .take(200)
                .collect::<String>();
            let rel = clean_path(&raw)?;
            if rel.as_os_str().is_empty() {
                // The layer's root itself ("./"): only its mode matters,
                // and the image's root is Kiln's to set.
                continue;
            }
            let header = entry.header();
            let mode = header
                .mode()
                .map_err(|e| LayerError::Corrupt(e.to_string()))?;
            let owner = match id_base {
                Some(base) => {
                    let uid = header
                        .uid()
                        .map_err(|e| LayerError::Corrupt(e.to_string()))?;
                    let gid = header
                        .gid()
                        .map_err(|e| LayerError::Corrupt(e.to_string()))?;
                    Some((shift(uid, base, &shown)?, shift(gid, base, &shown)?))
                }
                None => None,
            };
            let file_name = rel
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            check_parents(root, &rel, &shown, &mut implicit)?;
            let path = root.join(&rel);
            // Whiteouts: overlayfs' markers, made here.
            if file_name == OPAQUE_MARKER {
                let dir = path.parent().unwrap_or(root).to_owned();
                xattr::set(&dir, "trusted.overlay.opaque", b"y").map_err(io_err(&dir))?;
                continue;
            }
            if let Some(hidden) = file_name.strip_prefix(WHITEOUT_PREFIX) {
                if hidden.is_empty() || hidden.starts_with(WHITEOUT_PREFIX) {
                    return Err(LayerError::Refused {
                        path: shown,
                        reason: "it is a malformed whiteout",
                    });
                }
                let target = path.with_file_name(hidden);
                clear_for(&target, false)?;
                nix::sys::stat::mknod(
                    &target,
                    nix::sys::stat::SFlag::S_IFCHR,
                    nix::sys::stat::Mode::empty(),
                    nix::sys::stat::makedev(0, 0),
                )
                .map_err(|e| io_err(&target)(e.into()))?;
                if let Some((uid, gid)) = owner {
                    lchown(&target, Some(uid), Some(gid)).map_err(io_err(&target))?;
                }
                continue;
            }
            match kind {
                tar::EntryType::Directory => {
                    clear_for(&path, true)?;
                    if !path.is_dir() {
                        fs::create_dir(&path).map_err(io_err(&path))?;
                    }
                    // Sticky kept (a /tmp), setuid/setgid dropped.
                    dirs.insert(path, (mode & 0o1777, owner));
                }
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    clear_for(&path, false)?;
                    let size = entry.size();
                    if bytes.saturating_add(size) > limits.max_bytes {
                        return Err(LayerError::TooLarge {
                            limit: limits.max_bytes,
                        });
                    }
                    let file_mode = mode & 0o777;
                    let mut out = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .custom_flags(libc_o_nofollow())
                        .mode(0o600)
                        .open(&path)
                        .map_err(io_err(&path))?;
                    let copied = io::copy(&mut (&mut entry).take(size), &mut out)
                        .map_err(|e| LayerError::Corrupt(e.to_string()))?;
                    if copied != size {
                        return Err(LayerError::Corrupt(format!(
                            "{shown}: {copied} of {size} bytes"
                        )));
                    }
                    bytes += copied;
                    out.set_permissions(Permissions::from_mode(file_mode))
                        .map_err(io_err(&path))?;
                    if let Some((uid, gid)) = owner {
                        lchown(&path, Some(uid), Some(gid)).map_err(io_err(&path))?;
                    }
                    out.sync_all().map_err(io_err(&path))?;
                }
                tar::EntryType::Symlink => {
                    clear_for(&path, false)?;
                    let target = entry
                        .link_name_bytes()
                        .ok_or_else(|| {
                            LayerError::Corrupt(format!("{shown}: link without target"))
                        })?
                        .into_owned();
                    if target.is_empty() || target.len() > PATH_MAX || target.contains(&0) {
                        return Err(LayerError::Refused {
                            path: shown,
                            reason: "its link target is empty, too long or has a NUL byte",
                        });
                    }
                    // The target is resolved inside the sandbox's root at run
                    // time; here it is only stored, never followed.
                    std::os::unix::fs::symlink(os(&target), &path).map_err(io_err(&path))?;
                    if let Some((uid, gid)) = owner {
                        lchown(&path, Some(uid), Some(gid)).map_err(io_err(&path))?;
                    }
                }
                tar::EntryType::Link => {
                    clear_for(&path, false)?;
                    let target = entry
                        .link_name_bytes()
                        .ok_or_else(|| {
                            LayerError::Corrupt(format!("{shown}: link without target"))
                        })?
                        .into_owned();
                    let target_rel = clean_path(&target)?;
                    check_parents(root, &target_rel, &shown, &mut implicit)?;
                    let source = root.join(&target_rel);
                    // Only a regular file this layer already holds.
                    match fs::symlink_metadata(&source) {
                        Ok(m) if m.is_file() => {}
                        _ => {
                            return Err(LayerError::Refused {
                                path: shown,
                                reason: "it is a hard link to something other than a regular file of the same layer",
                            })
                        }
                    }
                    fs::hard_link(&source, &path).map_err(io_err(&path))?;
                }
                tar::EntryType::Char => {
                    return Err(LayerError::SpecialFile {
                        path: shown,
                        kind: "character device",
                    })
                }
                tar::EntryType::Block => {
                    return Err(LayerError::SpecialFile {
                        path: shown,
                        kind: "block device",
                    })
                }
                tar::EntryType::Fifo => {
                    return Err(LayerError::SpecialFile {
                        path: shown,
                        kind: "FIFO",
                    })
                }
                _ => {
                    return Err(LayerError::Refused {
                        path: shown,
                        reason: "its tar entry type is not a file, directory or link",
                    })
                }
            }
        }
    }
    // Whatever follows the archive's end (padding) is part of the blob.
    io::copy(&mut hashing, &mut io::sink()).map_err(|e| LayerError::Corrupt(e.to_string()))?;
    for dir in implicit {
        dirs.entry(dir).or_insert((0o755, id_base.map(|b| (b, b))));
    }
    let mut ordered: Vec<_> = dirs.into_iter().collect();
    ordered.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
    for (dir, (mode, owner)) in ordered {
        // A later entry may have replaced the directory (by a link, say):
        // chmod follows links, so only what is still a directory here.
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            _ => continue,
        }
        fs::set_permissions(&dir, Permissions::from_mode(mode)).map_err(io_err(&dir))?;
        if let Some((uid, gid)) = owner {
            lchown(&dir, Some(uid), Some(gid)).map_err(io_err(&dir))?;
        }
    }
    // The layer's root: traversable by the sandbox's users.
    fs::set_permissions(root, Permissions::from_mode(0o755)).map_err(io_err(root))?;
    if let Some(base) = id_base {
        lchown(root, Some(base), Some(base)).map_err(io_err(root))?;
    }
    File::open(root)
        .and_then(|d| d.sync_all())
        .map_err(io_err(root))?;
    Ok(LayerInfo {
        bytes,
        entries,
        diff_id: format!("sha256:{}", hex::encode(hashing.hasher.finalize())),
    })
}

fn os(b: &[u8]) -> &std::ffi::OsStr {
    std::os::unix::ffi::OsStrExt::from_bytes(b)
}

fn libc_o_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    fn limits() -> LayerLimits {
        LayerLimits {
            max_bytes: 1 << 20,
            max_entries: 1000,
        }
    }

    enum E<'a> {
        Dir(&'a str, u32),
        File(&'a str, &'a [u8], u32),
        Sym(&'a str, &'a str),
        Hard(&'a str, &'a str),
        Char(&'a str),
    }

    fn tar_of(entries: &[E<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            match e {
                E::Dir(p, m) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(*m);
                    h.set_size(0);
                    b.append_data(&mut h, p, io::empty()).unwrap();
                }
                E::File(p, data, m) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*m);
                    h.set_size(data.len() as u64);
                    // Raw names: the builder refuses `..` itself.
                    set_raw_name(&mut h, p);
                    h.set_cksum();
                    b.append(&h, *data).unwrap();
                }
                E::Sym(p, t) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    h.set_mode(0o777);
                    b.append_link(&mut h, p, t).unwrap();
                }
                E::Hard(p, t) => {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    h.set_mode(0o644);
                    set_raw_name(&mut h, p);
                    h.set_link_name(t).unwrap();
                    h.set_cksum();
                    b.append(&h, io::empty()).unwrap();
                }
                E::Char(p) => {
                    h.set_entry_type(tar::EntryType::Char);
                    h.set_size(0);
                    h.set_mode(0o666);
                    b.append_data(&mut h, p, io::empty()).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    fn set_raw_name(h: &mut tar::Header, p: &str) {
        let name = &mut h.as_old_mut().name;
        name.fill(0);
        name[..p.len()].copy_from_slice(p.as_bytes());
    }

    fn unpack(tar: &[u8]) -> (tempfile::TempDir, Result<LayerInfo, LayerError>) {
        let tmp = tempfile::tempdir().unwrap();
        let r = unpack_layer(
            tar,
            LayerCompression::None,
            &tmp.path().join("l"),
            None,
            limits(),
        );
        (tmp, r)
    }

    #[test]
    fn files_dirs_links_unpack_with_modes_and_without_setuid() {
        let tar = tar_of(&[
            E::Dir("usr/", 0o755),
            E::Dir("usr/bin/", 0o555),
            E::File("usr/bin/app", b"#!/bin/sh\n", 0o4755),
            E::Sym("bin", "usr/bin"),
            E::Hard("usr/bin/app2", "usr/bin/app"),
            E::Dir("tmp/", 0o1777),
        ]);
        let (tmp, r) = unpack(&tar);
        let info = r.unwrap();
        let root = tmp.path().join("l");
        let app = fs::metadata(root.join("usr/bin/app")).unwrap();
        assert_eq!(app.mode() & 0o7777, 0o755, "setuid must be dropped");
        assert_eq!(
            fs::read_link(root.join("bin")).unwrap(),
            Path::new("usr/bin")
        );
        assert_eq!(
            fs::metadata(root.join("usr/bin/app2")).unwrap().ino(),
            app.ino()
        );
        assert_eq!(
            fs::metadata(root.join("usr/bin")).unwrap().mode() & 0o7777,
            0o555
        );
        assert_eq!(
            fs::metadata(root.join("tmp")).unwrap().mode() & 0o7777,
            0o1777
        );
        assert_eq!(info.bytes, 10);
        assert_eq!(
            info.diff_id,
            format!("sha256:{}", hex::encode(Sha256::digest(&tar)))
        );
        // Only the layer: no temporary directory left beside it.
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn escapes_links_followed_and_devices_are_refused_and_leave_nothing() {
        for (what, tar) in [
            ("dotdot", tar_of(&[E::File("../evil", b"x", 0o644)])),
            (
                "nested dotdot",
                tar_of(&[E::File("a/../../evil", b"x", 0o644)]),
            ),
            (
                "write through a link",
                tar_of(&[E::Sym("etc", "/etc"), E::File("etc/evil", b"x", 0o644)]),
            ),
            (
                "hard link out",
                tar_of(&[E::Hard("passwd", "../../etc/passwd")]),
            ),
            (
                "hard link to a link",
                tar_of(&[E::Sym("s", "/etc/shadow"), E::Hard("h", "s")]),
            ),
            ("device", tar_of(&[E::Char("dev/mem")])),
        ] {
            let (tmp, r) = unpack(&tar);
            assert!(r.is_err(), "{what} was accepted");
            assert_eq!(
                fs::read_dir(tmp.path()).unwrap().count(),
                0,
                "{what} left files behind"
            );
        }
    }

    /// Corrupted layers (bytes flipped in a valid one with links, hard
    /// links and directories) give an error or a layer, never a panic, and
    /// never anything outside the layer's directory.
    #[test]
    fn mutated_layers_never_panic_or_escape() {
        let tar = tar_of(&[
            E::Dir("a/", 0o755),
            E::File("a/f", b"hello world", 0o644),
            E::Sym("a/s", "../../outside"),
            E::Hard("a/h", "a/f"),
            E::File("b/g", &[7u8; 3000], 0o755),
        ]);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..300 {
            let mut t = tar.clone();
            for _ in 0..1 + next() % 8 {
                let i = (next() as usize) % t.len();
                t[i] = next() as u8;
            }
            let tmp = tempfile::tempdir().unwrap();
            let outer = tmp.path().join("outer");
            fs::create_dir(&outer).unwrap();
            let _ = unpack_layer(
                &t[..],
                LayerCompression::None,
                &outer.join("l"),
                None,
                limits(),
            );
            for e in fs::read_dir(&outer).unwrap().flatten() {
                assert_eq!(e.file_name(), "l", "something beside the layer");
            }
            assert_eq!(
                fs::read_dir(tmp.path()).unwrap().count(),
                1,
                "something outside"
            );
        }
    }

    #[test]
    fn a_directory_replaced_by_a_link_never_changes_what_the_link_names() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        fs::create_dir(&victim).unwrap();
        fs::set_permissions(&victim, Permissions::from_mode(0o700)).unwrap();
        let tar = tar_of(&[E::Dir("x/", 0o777), E::Sym("x", victim.to_str().unwrap())]);
        unpack_layer(
            &tar[..],
            LayerCompression::None,
            &tmp.path().join("l"),
            None,
            limits(),
        )
        .unwrap();
        assert_eq!(fs::metadata(&victim).unwrap().mode() & 0o777, 0o700);
        assert!(fs::symlink_metadata(tmp.path().join("l/x"))
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn the_size_limit_holds_while_unpacking() {
        let big = vec![7u8; 4096];
        let tar = tar_of(&[E::File("a", &big, 0o644), E::File("b", &big, 0o644)]);
        let tmp = tempfile::tempdir().unwrap();
        let err = unpack_layer(
            &tar[..],
            LayerCompression::None,
            &tmp.path().join("l"),
            None,
            LayerLimits {
                max_bytes: 6000,
                max_entries: 10,
            },
        )
        .unwrap_err();
        assert!(matches!(err, LayerError::TooLarge { limit: 6000 }), "{err}");
    }

    #[test]
    fn gzip_layers_unpack_and_later_entries_win() {
        use std::io::Write;
        let tar = tar_of(&[E::File("f", b"one", 0o644), E::File("f", b"two", 0o600)]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let info = unpack_layer(
            &gz[..],
            LayerCompression::Gzip,
            &tmp.path().join("l"),
            None,
            limits(),
        )
        .unwrap();
        assert_eq!(fs::read(tmp.path().join("l/f")).unwrap(), b"two");
        // The diff id is the uncompressed tar's.
        assert_eq!(
            info.diff_id,
            format!("sha256:{}", hex::encode(Sha256::digest(&tar)))
        );
    }

    /// Whiteouts need the host's root (mknod, trusted.* attributes).
    #[test]
    fn whiteouts_become_overlay_markers() {
        if !nix::unistd::Uid::effective().is_root() {
            kiln_test_support::skip(
                kiln_test_support::Category::Root,
                "whiteouts are character devices and trusted.* attributes",
            );
            return;
        }
        let tar = tar_of(&[
            E::Dir("etc/", 0o755),
            E::File("etc/.wh.motd", b"", 0o644),
            E::Dir("var/cache/", 0o755),
            E::File("var/cache/.wh..wh..opq", b"", 0o644),
        ]);
        let tmp = tempfile::tempdir().unwrap();
        unpack_layer(
            &tar[..],
            LayerCompression::None,
            &tmp.path().join("l"),
            Some(100_000),
            limits(),
        )
        .unwrap();
        let root = tmp.path().join("l");
        let wh = fs::symlink_metadata(root.join("etc/motd")).unwrap();
        assert!(wh.file_type().is_char_device());
        assert_eq!(wh.rdev(), 0);
        assert!(!root.join("etc/.wh.motd").exists());
        assert_eq!(
            xattr::get(root.join("var/cache"), "trusted.overlay.opaque").unwrap(),
            Some(b"y".to_vec())
        );
        assert!(!root.join("var/cache/.wh..wh..opq").exists());
        assert_eq!(fs::metadata(root.join("etc")).unwrap().uid(), 100_000);
    }
}
