//! Temporary credentials (Kiln's stand-in for STS AssumeRole), stateless:
//! the security token carries its session (account, role, function,
//! instance, access key id, expiry) sealed with an HMAC under the
//! gateway's STS key, and the secret is derived from the access key id
//! under the same key. Nothing is stored per credential; a forged,
//! altered or expired token, or one presented with another access key,
//! is refused.

use std::io::Write;
use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use kiln_core::{AccountId, FcError, FcErrorCode, FunctionName};
use kiln_internal_api::TemporaryCredentials;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// FC's temporary access key ids start with this.
pub const STS_PREFIX: &str = "STS.";
const TOKEN_PREFIX: &str = "KILN1.";
const MAX_TOKEN: usize = 4096;

/// Why a security token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("Specified SecurityToken is malformed or was not issued by this service")]
    Malformed,
    #[error("Specified SecurityToken is expired")]
    Expired,
    #[error("Specified SecurityToken does not match the access key {0}")]
    Mismatch(String),
}

impl From<TokenError> for FcError {
    fn from(e: TokenError) -> Self {
        let code = match e {
            TokenError::Malformed => FcErrorCode::InvalidSecurityTokenMalformed,
            TokenError::Expired => FcErrorCode::InvalidSecurityTokenExpired,
            TokenError::Mismatch(_) => FcErrorCode::InvalidSecurityTokenMismatchWithAccessKey,
        };
        FcError::new(code, e.to_string())
    }
}

/// Why the STS key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum StsKeyError {
    #[error("Cannot read or write the STS key {path}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("STS key {0} is not 32 bytes")]
    Length(std::path::PathBuf),
}

/// What a token vouches for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Session {
    #[serde(rename = "ak")]
    pub access_key_id: String,
    #[serde(rename = "acct")]
    pub account_id: AccountId,
    pub role: String,
    #[serde(rename = "fn")]
    pub function_name: FunctionName,
    #[serde(rename = "iid")]
    pub instance_id: String,
    #[serde(rename = "exp")]
    pub expiration_ms: u64,
}

/// Issues and opens temporary credentials with one 32-byte key.
pub struct Sts {
    key: [u8; 32],
}

impl std::fmt::Debug for Sts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sts { key: <redacted> }")
    }
}

fn mac(key: &[u8; 32], domain: &[u8], data: &[u8]) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("any key length");
    m.update(domain);
    m.update(&[0]);
    m.update(data);
    m
}

impl Sts {
    pub fn new(key: [u8; 32]) -> Self {
        Self { key }
    }

    /// The key in `path` (created with mode 0600 when absent), so tokens
    /// outlive a gateway restart.
    pub fn load_or_create(path: &Path) -> Result<Self, StsKeyError> {
        let io = |source| StsKeyError::Io {
            path: path.to_owned(),
            source,
        };
        match std::fs::read(path) {
            Ok(bytes) => {
                let key: [u8; 32] = bytes
                    .try_into()
                    .map_err(|_| StsKeyError::Length(path.to_owned()))?;
                Ok(Self::new(key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                rand::thread_rng().fill_bytes(&mut key);
                let tmp = path.with_extension("tmp");
                let mut opts = std::fs::OpenOptions::new();
                opts.write(true).create(true).truncate(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    opts.mode(0o600);
                }
                let mut f = opts.open(&tmp).map_err(io)?;
                f.write_all(&key).map_err(io)?;
                f.sync_all().map_err(io)?;
                std::fs::rename(&tmp, path).map_err(io)?;
                Ok(Self::new(key))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// A tag over `data` for `purpose` (say, a download URL), under the
    /// same key as tokens but in its own domain.
    pub fn tag(&self, purpose: &str, data: &[u8]) -> Vec<u8> {
        let domain = format!("tag:{purpose}");
        mac(&self.key, domain.as_bytes(), data)
            .finalize()
            .into_bytes()
            .to_vec()
    }

    /// Whether `tag` is [`Sts::tag`]'s for `purpose` and `data` (compared
    /// in constant time).
    pub fn check_tag(&self, purpose: &str, data: &[u8], tag: &[u8]) -> bool {
        let domain = format!("tag:{purpose}");
        mac(&self.key, domain.as_bytes(), data)
            .verify_slice(tag)
            .is_ok()
    }

    /// The secret of a temporary access key id.
    pub fn secret(&self, access_key_id: &str) -> String {
        B64.encode(
            mac(&self.key, b"secret", access_key_id.as_bytes())
                .finalize()
                .into_bytes(),
        )
    }

    /// New credentials for `session` (its `access_key_id` is replaced by a
    /// fresh one).
    pub fn issue(&self, mut session: Session) -> TemporaryCredentials {
        let mut id = [0u8; 15];
        rand::thread_rng().fill_bytes(&mut id);
        session.access_key_id = format!("{STS_PREFIX}{}", B64.encode(id));
        let payload = serde_json::to_vec(&session).expect("session serialises");
        let tag = mac(&self.key, b"token", &payload).finalize().into_bytes();
        TemporaryCredentials {
            access_key_secret: self.secret(&session.access_key_id),
            security_token: format!("{TOKEN_PREFIX}{}.{}", B64.encode(&payload), B64.encode(tag)),
            access_key_id: session.access_key_id,
            expiration_ms: session.expiration_ms,
        }
    }

    /// The session of `token` presented with `access_key_id` at `now_ms`.
    pub fn open(
        &self,
        token: &str,
        access_key_id: &str,
        now_ms: u64,
    ) -> Result<Session, TokenError> {
        if token.len() > MAX_TOKEN {
            return Err(TokenError::Malformed);
        }
        let rest = token
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(TokenError::Malformed)?;
        let (payload_b64, tag_b64) = rest.split_once('.').ok_or(TokenError::Malformed)?;
        let payload = B64.decode(payload_b64).map_err(|_| TokenError::Malformed)?;
        let tag = B64.decode(tag_b64).map_err(|_| TokenError::Malformed)?;
        mac(&self.key, b"token", &payload)
            .verify_slice(&tag)
            .map_err(|_| TokenError::Malformed)?;
        let session: Session =
            serde_json::from_slice(&payload).map_err(|_| TokenError::Malformed)?;
        if session.access_key_id != access_key_id {
            return Err(TokenError::Mismatch(
                access_key_id.chars().take(64).collect(),
            ));
        }
        if now_ms >= session.expiration_ms {
            return Err(TokenError::Expired);
        }
        Ok(session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(exp: u64) -> Session {
        Session {
            access_key_id: String::new(),
            account_id: "1".parse().unwrap(),
            role: "reader".into(),
            function_name: "f".parse().unwrap(),
            instance_id: "i-1".into(),
            expiration_ms: exp,
        }
    }

    #[test]
    fn issued_credentials_open_until_they_expire() {
        let sts = Sts::new([7; 32]);
        let c = sts.issue(session(10_000));
        assert!(c.access_key_id.starts_with(STS_PREFIX));
        assert_eq!(c.access_key_secret, sts.secret(&c.access_key_id));
        let s = sts
            .open(&c.security_token, &c.access_key_id, 9_999)
            .unwrap();
        assert_eq!((s.role.as_str(), s.expiration_ms), ("reader", 10_000));
        assert_eq!(
            sts.open(&c.security_token, &c.access_key_id, 10_000),
            Err(TokenError::Expired)
        );
        // Two issues never share a key id or a secret.
        let d = sts.issue(session(10_000));
        assert_ne!(c.access_key_id, d.access_key_id);
        assert_ne!(c.access_key_secret, d.access_key_secret);
    }

    #[test]
    fn forged_altered_or_misused_tokens_are_refused() {
        let sts = Sts::new([7; 32]);
        let c = sts.issue(session(10_000));
        // Another gateway's key.
        let other = Sts::new([8; 32]);
        assert_eq!(
            other.open(&c.security_token, &c.access_key_id, 1),
            Err(TokenError::Malformed)
        );
        // Payload changed (a later expiry), tag kept.
        let rest = c.security_token.strip_prefix(TOKEN_PREFIX).unwrap();
        let (_, tag) = rest.split_once('.').unwrap();
        let mut s = session(u64::MAX);
        s.access_key_id = c.access_key_id.clone();
        let forged = format!(
            "{TOKEN_PREFIX}{}.{tag}",
            B64.encode(serde_json::to_vec(&s).unwrap())
        );
        assert_eq!(
            sts.open(&forged, &c.access_key_id, 1),
            Err(TokenError::Malformed)
        );
        for junk in ["", "KILN1.", "KILN1.a.b", "x.y.z", &"K".repeat(5000)] {
            assert_eq!(
                sts.open(junk, &c.access_key_id, 1),
                Err(TokenError::Malformed)
            );
        }
        // A genuine token with another key id.
        let d = sts.issue(session(10_000));
        assert!(matches!(
            sts.open(&c.security_token, &d.access_key_id, 1),
            Err(TokenError::Mismatch(_))
        ));
    }

    #[test]
    fn the_key_file_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sts.key");
        let a = Sts::load_or_create(&path).unwrap();
        let c = a.issue(session(10_000));
        let b = Sts::load_or_create(&path).unwrap();
        assert!(b.open(&c.security_token, &c.access_key_id, 1).is_ok());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(
            Sts::load_or_create(&path),
            Err(StsKeyError::Length(_))
        ));
    }
}
