//! `kiln keys create|list|disable|enable|delete`: the gateway's access key
//! API on its internal mTLS listener (operator only), reached with the
//! dev cluster's certificate (`<state>/pki`) at the address `kiln dev`
//! wrote to `<state>/cluster.json`. A key's secret is printed once, by
//! `create`; nothing shows it again.

use std::path::Path;

use anyhow::{bail, Context, Result};
use kiln_core::AccountId;
use kiln_internal_api::keys::{
    paths, AccessKeyInfo, AccessKeyList, CreateAccessKey, CreatedAccessKey,
};
use kiln_internal_api::InternalClient;

/// The gateway's internal listener, and a client with a cluster certificate.
pub struct Gateway {
    url: String,
    client: InternalClient,
}

/// A key id as the CLI accepts it (what the gateway hands out and
/// bootstrap keys use); anything else never reaches the gateway.
fn key_id(id: &str) -> Result<&str> {
    if !kiln_gateway::config::valid_access_key_id(id) {
        bail!("{id:?} is not an access key id (1 to 128 letters or digits)");
    }
    Ok(id)
}

impl Gateway {
    pub fn new(url: &str, client: InternalClient) -> Self {
        Self {
            url: url.trim_end_matches('/').to_owned(),
            client: client.with_timeout(std::time::Duration::from_secs(10)),
        }
    }

    /// The gateway of the `kiln dev` at `state_dir`, as the operator.
    pub fn from_state_dir(state_dir: &Path) -> Result<Self> {
        let (url, client) = super::operator::connect(state_dir, "gatewayInternalUrl")?;
        Ok(Self::new(&url, client))
    }

    pub async fn create(&self, account: &str) -> Result<CreatedAccessKey> {
        let account_id: AccountId = account
            .parse()
            .with_context(|| format!("{account:?} is not an account id"))?;
        self.client
            .post(
                &self.url,
                paths::ACCESS_KEYS,
                &CreateAccessKey { account_id },
            )
            .await
            .with_context(|| format!("cannot create an access key for account {account}"))
    }

    pub async fn list(&self) -> Result<Vec<AccessKeyInfo>> {
        let l: AccessKeyList = self
            .client
            .get(&self.url, paths::ACCESS_KEYS)
            .await
            .context("cannot list access keys")?;
        Ok(l.access_keys)
    }

    pub async fn set_enabled(&self, id: &str, enabled: bool) -> Result<AccessKeyInfo> {
        let id = key_id(id)?;
        let (path, verb) = if enabled {
            (paths::enable(id), "enable")
        } else {
            (paths::disable(id), "disable")
        };
        self.client
            .post(&self.url, &path, &())
            .await
            .with_context(|| format!("cannot {verb} access key {id}"))
    }

    pub async fn delete(&self, id: &str) -> Result<()> {
        let id = key_id(id)?;
        self.client
            .delete(&self.url, &paths::access_key(id))
            .await
            .with_context(|| format!("cannot delete access key {id}"))
    }
}

pub fn print_created(k: &CreatedAccessKey) {
    println!(
        "access key {} for account {}",
        k.access_key_id, k.account_id
    );
    println!("secret: {}", k.access_key_secret);
    println!("The secret is shown this once: store it now (kiln keys list never shows it).");
}

pub fn print_table(keys: &[AccessKeyInfo]) {
    println!(
        "{:<28} {:<20} {:<9} CREATED",
        "ACCESS KEY", "ACCOUNT", "STATUS"
    );
    for k in keys {
        let created =
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(k.created_ms) * 1_000_000)
                .ok()
                .and_then(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_else(|| k.created_ms.to_string());
        println!(
            "{:<28} {:<20} {:<9} {}",
            k.access_key_id, k.account_id, k.status, created
        );
    }
}
