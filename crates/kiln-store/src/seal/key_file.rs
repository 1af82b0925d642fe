//! The sealing key's file: 32 random bytes, or 64 hex digits (a trailing
//! newline allowed), readable by the gateway's user only.
//!
//! A key file readable or writable by group or others, or owned by another
//! user, is refused with the path and the fix. The one exception is a file
//! systemd hands the service with `LoadCredential=` (under
//! `$CREDENTIALS_DIRECTORY`): systemd writes it root-owned, mode 0400, on a
//! private read-only mount, and grants the service's user read access with
//! an ACL entry, which `stat` shows as a group read bit (the ACL mask).
//! There, root ownership and that one bit are accepted; any other bit is not.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rand::RngCore;

/// Why the key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("Cannot read the secrets key file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot create the secrets key file {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Secrets key file {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error(
        "Secrets key file {path} is readable or writable by group or others (mode {mode:03o}); \
         run `chmod 600 {path}`"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error(
        "Secrets key file {path} is owned by uid {owner}, not by the gateway's uid {uid}; \
         run `chown {uid} {path}` (and `chmod 600 {path}`)"
    )]
    Owner { path: PathBuf, owner: u32, uid: u32 },
    #[error(
        "Secrets key file {path} must hold 32 random bytes or 64 hex digits; create one with \
         `(umask 077; head -c 32 /dev/urandom > {path})`"
    )]
    Format { path: PathBuf },
}

/// Read and check a key file (see the module docs for what is refused).
pub fn load_key_file(path: &Path) -> Result<[u8; 32], KeyFileError> {
    let read = |source| KeyFileError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read)?;
    // The checks and the read are on one open file: no swap in between.
    let meta = file.metadata().map_err(read)?;
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    check_access(
        path,
        &meta,
        nix::unistd::geteuid().as_raw(),
        credentials.as_deref(),
    )?;
    let mut bytes = Vec::with_capacity(66);
    Read::by_ref(&mut file)
        .take(130)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    parse_key(&bytes).ok_or_else(|| KeyFileError::Format {
        path: path.to_owned(),
    })
}

fn check_access(
    path: &Path,
    meta: &std::fs::Metadata,
    uid: u32,
    credentials_dir: Option<&Path>,
) -> Result<(), KeyFileError> {
    if !meta.is_file() {
        return Err(KeyFileError::NotAFile {
            path: path.to_owned(),
        });
    }
    let mode = meta.mode() & 0o777;
    let from_systemd = credentials_dir.is_some_and(|d| path.starts_with(d));
    let (allowed_bits, owner_ok) = if from_systemd {
        (0o740, meta.uid() == uid || meta.uid() == 0)
    } else {
        (0o700, meta.uid() == uid)
    };
    if mode & !allowed_bits != 0 {
        return Err(KeyFileError::Exposed {
            path: path.to_owned(),
            mode,
        });
    }
    if !owner_ok {
        return Err(KeyFileError::Owner {
            path: path.to_owned(),
            owner: meta.uid(),
            uid,
        });
    }
    Ok(())
}

fn parse_key(bytes: &[u8]) -> Option<[u8; 32]> {
    if let Ok(raw) = <[u8; 32]>::try_from(bytes) {
        return Some(raw);
    }
    let text = std::str::from_utf8(bytes)
        .ok()?
        .trim_end_matches(['\n', '\r']);
    let mut key = [0u8; 32];
    hex::decode_to_slice(text, &mut key).ok()?;
    Some(key)
}

/// Create a key file with a fresh random key (64 hex digits and a newline),
/// mode 0600, unless one exists; either way the key is checked and
/// returned. Used for `kiln dev` and a gateway whose config names no key.
pub fn generate_key_file(path: &Path) -> Result<[u8; 32], KeyFileError> {
    let create = |source| KeyFileError::Create {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(create)?;
    }
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(format!("{}\n", hex::encode(key)).as_bytes())?;
        f.sync_all()?;
        // Never replaces a key another process created meanwhile.
        std::fs::hard_link(&tmp, path)
    })();
    let _ = std::fs::remove_file(&tmp);
    match written {
        Ok(()) => {
            if let Some(dir) = path.parent() {
                let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
            }
            tracing::info!(path = %path.display(), "created the secrets key file");
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(create(e)),
    }
    load_key_file(path)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn write(path: &Path, bytes: &[u8], mode: u32) {
        std::fs::write(path, bytes).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn raw_and_hex_keys_load_and_anything_else_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        write(&p, &[7u8; 32], 0o600);
        assert_eq!(load_key_file(&p).unwrap(), [7u8; 32]);
        write(&p, format!("{}\n", "ab".repeat(32)).as_bytes(), 0o400);
        assert_eq!(load_key_file(&p).unwrap(), [0xab; 32]);
        for bad in [&b"short"[..], &[1u8; 33], "zz".repeat(32).as_bytes()] {
            write(&p, bad, 0o600);
            let e = load_key_file(&p).unwrap_err();
            assert!(matches!(e, KeyFileError::Format { .. }), "{e}");
            assert!(e.to_string().contains("head -c 32 /dev/urandom"), "{e}");
        }
        let e = load_key_file(&dir.path().join("absent")).unwrap_err();
        assert!(e.to_string().contains("absent"), "{e}");
        let e = load_key_file(dir.path()).unwrap_err();
        assert!(matches!(e, KeyFileError::NotAFile { .. }), "{e}");
    }

    #[test]
    fn a_key_file_others_can_reach_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secrets.key");
        for mode in [0o644, 0o640, 0o604, 0o620, 0o602, 0o660] {
            write(&p, &[1u8; 32], mode);
            let e = load_key_file(&p).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, KeyFileError::Exposed { .. }), "{mode:o}: {msg}");
            assert!(msg.contains(&format!("chmod 600 {}", p.display())), "{msg}");
        }
        write(&p, &[1u8; 32], 0o600);
        load_key_file(&p).unwrap();
    }

    #[test]
    fn a_key_file_of_another_user_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secrets.key");
        write(&p, &[1u8; 32], 0o600);
        let meta = std::fs::metadata(&p).unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let other = me.wrapping_add(4242);
        let e = check_access(&p, &meta, other, None).unwrap_err();
        assert!(matches!(e, KeyFileError::Owner { .. }), "{e}");
        assert!(e.to_string().contains(&format!("chown {other}")), "{e}");
        check_access(&p, &meta, me, None).unwrap();
    }

    #[test]
    fn a_systemd_credential_may_be_root_owned_with_an_acl_mask() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("credentials");
        std::fs::create_dir(&creds).unwrap();
        let p = creds.join("secrets-key_file");
        // systemd's credential for a dynamic user: 0400 plus an ACL entry,
        // which stat shows as 0440.
        write(&p, &[1u8; 32], 0o440);
        let meta = std::fs::metadata(&p).unwrap();
        let service_uid = meta.uid().wrapping_add(61000);
        if meta.uid() == 0 {
            check_access(&p, &meta, service_uid, Some(&creds)).unwrap();
        }
        check_access(&p, &meta, meta.uid(), Some(&creds)).unwrap();
        // Outside the credentials directory the same file is refused...
        assert!(check_access(&p, &meta, meta.uid(), None).is_err());
        // ...and inside it, a bit for others still is.
        write(&p, &[1u8; 32], 0o444);
        let meta = std::fs::metadata(&p).unwrap();
        let e = check_access(&p, &meta, meta.uid(), Some(&creds)).unwrap_err();
        assert!(matches!(e, KeyFileError::Exposed { .. }), "{e}");
    }

    #[test]
    fn generate_creates_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/secrets.key");
        let k = generate_key_file(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(generate_key_file(&p).unwrap(), k, "an existing key is kept");
        assert_eq!(load_key_file(&p).unwrap(), k);
        let leftovers: Vec<_> = std::fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    }
}
