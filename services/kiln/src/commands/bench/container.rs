//! Cold starts of a custom-container function whose image the node has
//! cached (issue 19), against the bare `runc run`s of the same root
//! filesystem and command: the image is the static baseline's root
//! filesystem as one layer (`/code/server` and the empty mount points),
//! with the baseline's command and environment, pushed to a local
//! registry (`kiln::registry`: Debian's docker-registry, TLS, basic auth)
//! started before the dev cluster so its agent trusts it.

use std::path::Path;

use anyhow::Result;
use serde_json::{json, Value};

use super::runc::Baseline;
use crate::registry::{self, Registry};

/// The image in the local registry.
pub(super) struct Image {
    registry: Registry,
    reference: String,
}

impl Image {
    /// Build and push the image; `None` (saying why) when the registry's
    /// programs are not installed.
    pub(super) fn push(binary: &Path, work: &Path) -> Result<Option<Image>> {
        let missing: Vec<&str> = registry::TOOLS
            .into_iter()
            .filter(|t| which(t).is_none())
            .collect();
        if !missing.is_empty() {
            eprintln!(
                "SKIPPED the custom-container cold start: {} not installed (scripts/install-deps.sh)",
                missing.join(", ")
            );
            return Ok(None);
        }
        let dir = work.join("image");
        let base = Baseline::static_binary(binary, &dir)?;
        let layer = registry::layer_of_dir(&base.rootfs)?;
        let layout = dir.join("layout");
        registry::write_layout(
            &layout,
            "v1",
            &[layer],
            json!({"Entrypoint": base.args, "Env": base.env}),
        )?;
        let registry = Registry::start()?;
        registry.push(&layout, "bench/echo", "v1")?;
        let reference = format!("{}/bench/echo:v1", registry.host());
        Ok(Some(Image {
            registry,
            reference,
        }))
    }

    /// The CA the agent must trust for the registry.
    pub(super) fn ca(&self) -> std::path::PathBuf {
        self.registry.ca_pem()
    }

    /// CreateFunction's body for a function `name` running the image.
    pub(super) fn function(&self, name: &str) -> Value {
        json!({
            "functionName": name,
            "runtime": "custom-container",
            "handler": "main",
            "memorySize": 512,
            "customContainerConfig": {
                "image": self.reference,
                "port": 9000,
                "registryConfig": {"authConfig": {
                    "userName": registry::USER, "password": registry::PASSWORD}},
            },
        })
    }
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}
