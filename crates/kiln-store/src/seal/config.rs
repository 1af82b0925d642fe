//! `[secrets]` in a service's config, and the [`Sealer`] it gives.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{generate_key_file, load_key_file, KeyFileError, Sealer};

/// `[secrets]`: the sealing key and the keys it replaced (docs/security.md,
/// "Secrets at rest").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsConfig {
    /// 32 random bytes or 64 hex digits, mode 0600, owned by the service's
    /// user (or a systemd credential). Never generated: it must exist.
    pub key_file: PathBuf,
    /// Keys values may still be sealed with: opened, and resealed under
    /// `key_file` when the service starts. Drop them after that start.
    #[serde(default)]
    pub previous_key_files: Vec<PathBuf>,
}

impl SecretsConfig {
    /// Refuse key files in the Nix store, which every user can read.
    pub fn validate(&self) -> Result<(), String> {
        for p in std::iter::once(&self.key_file).chain(&self.previous_key_files) {
            if p.starts_with("/nix/store") {
                return Err(format!(
                    "secrets key file {} is in the Nix store, which every user can read; \
                     keep it outside and hand it over with systemd LoadCredential=",
                    p.display()
                ));
            }
        }
        Ok(())
    }
}

/// The sealer of `[secrets]`, or, when the config names none, of a key
/// kept at `default_key_file` (created on first start, 0600), with a
/// warning: production services name a key file kept apart from the data.
pub fn load_sealer(
    config: Option<&SecretsConfig>,
    default_key_file: &Path,
) -> Result<Sealer, KeyFileError> {
    match config {
        Some(s) => {
            let current = load_key_file(&s.key_file)?;
            let previous = s
                .previous_key_files
                .iter()
                .map(|p| load_key_file(p))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Sealer::new(&current, &previous))
        }
        None => {
            tracing::warn!(
                path = %default_key_file.display(),
                "[secrets] key_file is not set: sealing with a key kept in the state directory; \
                 production services name a key file kept apart from the data (a systemd credential)"
            );
            Ok(Sealer::new(&generate_key_file(default_key_file)?, &[]))
        }
    }
}
