//! `credentials.json`: what a client needs to reach one Kiln endpoint, read
//! the way kubectl reads its kubeconfig.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Credentials {
    /// `https://host:port` of the public gateway.
    pub endpoint: String,
    pub account_id: String,
    pub access_key_id: String,
    pub access_key_secret: String,
    /// Path of the PEM a client must trust for `endpoint`.
    pub ca_cert: PathBuf,
    /// An STS token, for temporary credentials (sent as
    /// `x-acs-security-token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_token: Option<String>,
}

/// The environment variables FC's SDKs and Serverless Devs read for a key.
pub const ENV_ACCESS_KEY_ID: &str = "ALIBABA_CLOUD_ACCESS_KEY_ID";
pub const ENV_ACCESS_KEY_SECRET: &str = "ALIBABA_CLOUD_ACCESS_KEY_SECRET";
pub const ENV_SECURITY_TOKEN: &str = "ALIBABA_CLOUD_SECURITY_TOKEN";
pub const ENV_ACCOUNT_ID: &str = "ALIBABA_CLOUD_ACCOUNT_ID";

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error(
        "No credentials file at {0}: start `kiln dev` or pass --credentials FILE (or set KILN_CREDENTIALS)"
    )]
    Missing(PathBuf),
    #[error("Cannot read credentials file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Credentials file {path} is not valid: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("Cannot write credentials file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot find the home directory: set HOME or pass --credentials FILE")]
    NoHome,
    #[error(
        "{set} is set but {missing} is not: set both, or neither to use the credentials file's key"
    )]
    HalfAKey {
        set: &'static str,
        missing: &'static str,
    },
}

/// `~/.kiln`.
pub fn default_dir() -> Result<PathBuf, CredentialsError> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".kiln"))
        .ok_or(CredentialsError::NoHome)
}

/// `--credentials FILE`, else `$KILN_CREDENTIALS`, else
/// `~/.kiln/credentials.json`.
pub fn resolve_path(flag: Option<&Path>) -> Result<PathBuf, CredentialsError> {
    if let Some(p) = flag {
        return Ok(p.to_owned());
    }
    if let Some(p) = std::env::var_os("KILN_CREDENTIALS").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    Ok(default_dir()?.join("credentials.json"))
}

impl Credentials {
    pub fn load(path: &Path) -> Result<Self, CredentialsError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CredentialsError::Missing(path.to_owned()))
            }
            Err(source) => {
                return Err(CredentialsError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let creds: Self = serde_json::from_str(&text).map_err(|e| CredentialsError::Invalid {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        if !creds.endpoint.starts_with("https://") {
            return Err(CredentialsError::Invalid {
                path: path.to_owned(),
                message: format!("endpoint {:?} must start with https://", creds.endpoint),
            });
        }
        Ok(creds)
    }

    /// The key FC users keep in their environment, over the file's:
    /// `ALIBABA_CLOUD_ACCESS_KEY_ID` and `_SECRET` together (one alone is
    /// an error, never half of each key), with `ALIBABA_CLOUD_SECURITY_TOKEN`
    /// for temporary credentials and `ALIBABA_CLOUD_ACCOUNT_ID`. The
    /// endpoint and the CA still come from the file.
    pub fn with_env(
        mut self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, CredentialsError> {
        let get = |k: &str| env(k).filter(|v| !v.is_empty());
        match (get(ENV_ACCESS_KEY_ID), get(ENV_ACCESS_KEY_SECRET)) {
            (Some(id), Some(secret)) => {
                self.access_key_id = id;
                self.access_key_secret = secret;
                self.security_token = get(ENV_SECURITY_TOKEN);
            }
            (Some(_), None) => {
                return Err(CredentialsError::HalfAKey {
                    set: ENV_ACCESS_KEY_ID,
                    missing: ENV_ACCESS_KEY_SECRET,
                })
            }
            (None, Some(_)) => {
                return Err(CredentialsError::HalfAKey {
                    set: ENV_ACCESS_KEY_SECRET,
                    missing: ENV_ACCESS_KEY_ID,
                })
            }
            (None, None) => {}
        }
        if let Some(account) = get(ENV_ACCOUNT_ID) {
            self.account_id = account;
        }
        Ok(self)
    }

    /// Write with mode 0600: the file holds a secret.
    pub fn write(&self, path: &Path) -> Result<(), CredentialsError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let err = |source| CredentialsError::Write {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        let text = serde_json::to_string_pretty(self).expect("credentials serialise");
        f.write_all(text.as_bytes()).map_err(err)?;
        f.write_all(b"\n").map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> Credentials {
        Credentials {
            endpoint: "https://127.0.0.1:8443".into(),
            account_id: "1234".into(),
            access_key_id: "ak".into(),
            access_key_secret: "sk".into(),
            ca_cert: dir.join("ca.pem"),
            security_token: None,
        }
    }

    #[test]
    fn round_trip_with_private_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c/credentials.json");
        let c = sample(dir.path());
        c.write(&path).unwrap();
        assert_eq!(Credentials::load(&path).unwrap(), c);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for k in [
            "endpoint",
            "accountId",
            "accessKeyId",
            "accessKeySecret",
            "caCert",
        ] {
            assert!(v.get(k).is_some(), "{k} missing");
        }
    }

    #[test]
    fn missing_and_bad_files_say_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let err = Credentials::load(&dir.path().join("nope.json")).unwrap_err();
        assert!(err.to_string().contains("kiln dev"));
        let path = dir.path().join("bad.json");
        std::fs::write(&path, "{\"endpoint\": 1}").unwrap();
        assert!(matches!(
            Credentials::load(&path).unwrap_err(),
            CredentialsError::Invalid { .. }
        ));
        let mut c = sample(dir.path());
        c.endpoint = "http://x".into();
        std::fs::write(&path, serde_json::to_string(&c).unwrap()).unwrap();
        assert!(Credentials::load(&path)
            .unwrap_err()
            .to_string()
            .contains("https://"));
    }

    #[test]
    fn the_environment_key_replaces_the_files_whole() {
        let dir = tempfile::tempdir().unwrap();
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(name, _)| *name == k)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let c = sample(dir.path())
            .with_env(env(&[
                (ENV_ACCESS_KEY_ID, "LTAIenv"),
                (ENV_ACCESS_KEY_SECRET, "env-secret"),
                (ENV_SECURITY_TOKEN, "sts-token"),
                (ENV_ACCOUNT_ID, "5678"),
            ]))
            .unwrap();
        assert_eq!(
            (c.access_key_id.as_str(), c.access_key_secret.as_str()),
            ("LTAIenv", "env-secret")
        );
        assert_eq!(c.security_token.as_deref(), Some("sts-token"));
        assert_eq!(c.account_id, "5678");
        assert_eq!(
            c.endpoint, "https://127.0.0.1:8443",
            "the endpoint stays the file's"
        );
        // No key in the environment: the file's, without a token.
        assert_eq!(
            sample(dir.path()).with_env(env(&[])).unwrap(),
            sample(dir.path())
        );
        // A token alone does not attach to the file's long-term key.
        let c = sample(dir.path())
            .with_env(env(&[(ENV_SECURITY_TOKEN, "stray")]))
            .unwrap();
        assert_eq!(c.security_token, None);
        // Half a key is refused, never mixed with the file's other half.
        for half in [
            &[(ENV_ACCESS_KEY_ID, "LTAIenv")][..],
            &[(ENV_ACCESS_KEY_SECRET, "env-secret")][..],
        ] {
            let pairs: &'static [(&'static str, &'static str)] = half;
            let err = sample(dir.path()).with_env(env(pairs)).unwrap_err();
            assert!(matches!(err, CredentialsError::HalfAKey { .. }), "{err}");
        }
    }

    #[test]
    fn flag_wins_over_env() {
        let p = resolve_path(Some(Path::new("/x/c.json"))).unwrap();
        assert_eq!(p, PathBuf::from("/x/c.json"));
    }
}
