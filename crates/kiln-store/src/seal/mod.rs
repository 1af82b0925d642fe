//! Secrets at rest: values a store must not hold in plaintext (access key
//! secrets, function environment variables) are sealed with AES-256-GCM
//! before they reach it. The gateway's and the scheduler's stores use it.
//!
//! A sealed value is the text `kiln1:<key id>:<base64url(nonce ‖ ciphertext ‖ tag)>`:
//! a fresh random 96-bit nonce per value, and as associated data the
//! identity of the row and column it belongs to ([`Aad`]), so a ciphertext
//! copied into another row (another key id, another function) does not
//! open. The key id (the first 8 hex digits of a SHA-256 of the key) names
//! the key a value was sealed with: a service opens values sealed with
//! its current key or any of `[secrets] previous_key_files`, and reseals
//! the latter under the current key when it starts, which is how a key is
//! rotated (docs/security.md, "Secrets at rest").

mod config;
mod key_file;

pub use config::{load_sealer, SecretsConfig};

use std::collections::BTreeMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::aead::{Aad as RingAad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};

pub use key_file::{generate_key_file, load_key_file, KeyFileError};

/// The version tag every sealed value starts with.
const PREFIX: &str = "kiln1";

/// Why a sealed value could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("sealed value is malformed (not `{PREFIX}:<key id>:<base64>`)")]
    Malformed,
    #[error(
        "sealed with key {0}, which is neither [secrets] key_file nor one of \
         [secrets] previous_key_files; add the key it was sealed with to previous_key_files"
    )]
    UnknownKey(String),
    #[error("sealed value does not open: it was altered or belongs to another row")]
    Forged,
}

/// What a sealed value is bound to: the table and column, then the fields
/// that identify its row. Opening under any other identity fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aad(Vec<u8>);

impl Aad {
    /// `column` is `table.column`; `row` the row's identifying fields in a
    /// fixed order (NUL-separated, so `("a","bc")` and `("ab","c")` differ).
    pub fn new(column: &str, row: &[&str]) -> Self {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(b"kiln-secret\0");
        b.extend_from_slice(column.as_bytes());
        for f in row {
            b.push(0);
            b.extend_from_slice(f.as_bytes());
        }
        Self(b)
    }
}

struct Key {
    id: String,
    aead: LessSafeKey,
}

impl Key {
    fn new(bytes: &[u8; 32]) -> Self {
        Self {
            id: key_id(bytes),
            aead: LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("32-byte key")),
        }
    }
}

/// The id a key's values carry: 8 hex digits of a domain-separated SHA-256.
pub fn key_id(key: &[u8; 32]) -> String {
    let d = Sha256::new()
        .chain_update(b"kiln secrets key id\0")
        .chain_update(key)
        .finalize();
    hex::encode(&d[..4])
}

/// Seals under the current key; opens under the current or a previous one.
pub struct Sealer {
    current: Key,
    previous: Vec<Key>,
    rng: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("current", &self.current.id)
            .field(
                "previous",
                &self.previous.iter().map(|k| &k.id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Sealer {
    pub fn new(current: &[u8; 32], previous: &[[u8; 32]]) -> Self {
        Self {
            current: Key::new(current),
            previous: previous.iter().map(Key::new).collect(),
            rng: SystemRandom::new(),
        }
    }

    /// A sealer with a fresh random key and no previous keys: for stores
    /// that live in memory only, and tests.
    pub fn random() -> Self {
        let mut k = [0u8; 32];
        SystemRandom::new()
            .fill(&mut k)
            .expect("the system random source works");
        Self::new(&k, &[])
    }

    /// The id of the key new values are sealed with.
    pub fn current_key_id(&self) -> &str {
        &self.current.id
    }

    pub fn seal(&self, aad: &Aad, plaintext: &[u8]) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .expect("the system random source works");
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + 16);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let tag = self
            .current
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                RingAad::from(&aad.0),
                &mut out[NONCE_LEN..],
            )
            .expect("AES-GCM seals any length Kiln stores");
        out.extend_from_slice(tag.as_ref());
        format!("{PREFIX}:{}:{}", self.current.id, B64.encode(out))
    }

    pub fn open(&self, aad: &Aad, sealed: &str) -> Result<Vec<u8>, SealError> {
        let (id, body) = parse(sealed)?;
        let key = std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|k| k.id == id)
            .ok_or_else(|| SealError::UnknownKey(id.to_owned()))?;
        let mut bytes = B64.decode(body).map_err(|_| SealError::Malformed)?;
        if bytes.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(SealError::Malformed);
        }
        let nonce: [u8; NONCE_LEN] = bytes[..NONCE_LEN].try_into().expect("length checked");
        let plain = key
            .aead
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                RingAad::from(&aad.0),
                &mut bytes[NONCE_LEN..],
            )
            .map_err(|_| SealError::Forged)?;
        Ok(plain.to_vec())
    }

    /// Open a value holding UTF-8 text.
    pub fn open_string(&self, aad: &Aad, sealed: &str) -> Result<String, SealError> {
        String::from_utf8(self.open(aad, sealed)?).map_err(|_| SealError::Forged)
    }

    /// Whether `sealed` is sealed under the current key (else a start
    /// reseals it).
    pub fn is_current(&self, sealed: &str) -> bool {
        matches!(parse(sealed), Ok((id, _)) if id == self.current.id)
    }
}

fn parse(sealed: &str) -> Result<(&str, &str), SealError> {
    let mut parts = sealed.splitn(3, ':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(PREFIX), Some(id), Some(body)) if !id.is_empty() => Ok((id, body)),
        _ => Err(SealError::Malformed),
    }
}

/// Seal a function's environment (names and values, one JSON object).
pub fn seal_environment(sealer: &Sealer, aad: &Aad, env: &BTreeMap<String, String>) -> String {
    sealer.seal(
        aad,
        &serde_json::to_vec(env).expect("a string map serialises"),
    )
}

/// Open a function's environment sealed by [`seal_environment`].
pub fn open_environment(
    sealer: &Sealer,
    aad: &Aad,
    sealed: &str,
) -> Result<BTreeMap<String, String>, SealError> {
    serde_json::from_slice(&sealer.open(aad, sealed)?).map_err(|_| SealError::Forged)
}

/// After a sealing pass changed rows: rewrite the file (`VACUUM`) and
/// truncate the WAL, so no page still holding an old plaintext survives.
pub fn scrub_old_pages(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    conn.execute_batch("VACUUM;")?;
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_with_a_fresh_nonce_each() {
        let s = Sealer::random();
        let aad = Aad::new("access_keys.secret", &["AK1", "100"]);
        let a = s.seal(&aad, b"hunter2-hunter2");
        let b = s.seal(&aad, b"hunter2-hunter2");
        assert_ne!(a, b, "a nonce is never reused");
        assert!(a.starts_with(&format!("kiln1:{}:", s.current_key_id())));
        assert!(!a.contains("hunter2"));
        assert_eq!(s.open(&aad, &a).unwrap(), b"hunter2-hunter2");
        assert!(s.is_current(&a));
    }

    #[test]
    fn another_rows_identity_or_an_altered_value_does_not_open() {
        let s = Sealer::random();
        let sealed = s.seal(&Aad::new("access_keys.secret", &["AK1", "100"]), b"x");
        for other in [
            Aad::new("access_keys.secret", &["AK2", "100"]),
            Aad::new("access_keys.secret", &["AK1", "200"]),
            Aad::new("functions.environment", &["AK1", "100"]),
            Aad::new("access_keys.secret", &["AK1", "100", ""]),
        ] {
            assert_eq!(s.open(&other, &sealed), Err(SealError::Forged));
        }
        let aad = Aad::new("access_keys.secret", &["AK1", "100"]);
        let mut tampered = sealed.clone().into_bytes();
        let last = tampered.len() - 2;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert_eq!(s.open(&aad, &tampered), Err(SealError::Forged));
        assert_eq!(s.open(&aad, "plain secret"), Err(SealError::Malformed));
        assert_eq!(
            s.open(&aad, "kiln1:abc:!!"),
            Err(SealError::UnknownKey("abc".into()))
        );
        let id = s.current_key_id().to_owned();
        assert_eq!(
            s.open(&aad, &format!("kiln1:{id}:AAAA")),
            Err(SealError::Malformed)
        );
    }

    #[test]
    fn previous_keys_open_and_are_not_current() {
        let (old, new) = ([1u8; 32], [2u8; 32]);
        let aad = Aad::new("t.c", &["r"]);
        let sealed = Sealer::new(&old, &[]).seal(&aad, b"v");
        let rotated = Sealer::new(&new, &[old]);
        assert!(!rotated.is_current(&sealed));
        assert_eq!(rotated.open(&aad, &sealed).unwrap(), b"v");
        let without = Sealer::new(&new, &[]);
        assert_eq!(
            without.open(&aad, &sealed),
            Err(SealError::UnknownKey(key_id(&old)))
        );
        assert_ne!(key_id(&old), key_id(&new));
    }
}
