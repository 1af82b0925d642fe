//! How the operator commands (`kiln nodes`, `kiln limits`, `kiln keys`)
//! reach a running `kiln dev`: the service URL it wrote to
//! `<state>/cluster.json`, and a client presenting the operator's
//! certificate from `<state>/pki` (the only identity those routes admit).

use std::path::Path;

use anyhow::{bail, Context, Result};
use kiln_internal_api::InternalClient;

/// The URL under `url_key` in `<state_dir>/cluster.json`, and an
/// operator's client (10 s per call).
pub fn connect(state_dir: &Path, url_key: &str) -> Result<(String, InternalClient)> {
    let path = state_dir.join("cluster.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {} (is `kiln dev` running with this state directory?)",
            path.display()
        )
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let Some(url) = v.get(url_key).and_then(|u| u.as_str()) else {
        bail!("{} has no {url_key}", path.display());
    };
    let pki_dir = state_dir.join("pki");
    let client = InternalClient::new(&kiln_pki::DevPki::files_in(&pki_dir, "operator"))
        .with_context(|| {
            format!(
                "cannot load the operator certificate from {}",
                pki_dir.display()
            )
        })?
        .with_timeout(std::time::Duration::from_secs(10));
    Ok((url.trim_end_matches('/').to_owned(), client))
}
