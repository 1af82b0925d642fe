//! Provisioned instances across function updates: LATEST's provision
//! configuration follows its function to the new revision (the scheduler
//! pauses it until then), an alias's follows the alias to its new version.

use std::sync::Arc;

use kiln_core::{AccountId, FunctionName, InstanceSpec};
use kiln_internal_api::{InternalClientError, PutProvision};

use crate::gateway::Gateway;
use crate::versions::Qualifier;

/// After an alias moved: its provision configuration, if it has one, is
/// put again with the spec of the alias's new version (the old version's
/// provisioned instances become on-demand). Best effort: a failure is
/// logged, and the next PutProvisionConfig of the alias repairs it.
pub async fn follow_alias(gw: &Gateway, account: &AccountId, name: &FunctionName, alias: &str) {
    let r: Result<(), String> = async {
        let found = gw
            .scheduler
            .provisions(account)
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|d| &d.status.function_name == name && d.status.qualifier == alias);
        let Some(d) = found else { return Ok(()) };
        let q = Qualifier::Alias(alias.to_owned());
        let spec = crate::api::provision::provision_spec(gw, account, name, &q)
            .map_err(|e| e.to_string())?;
        gw.scheduler
            .put_provision(&PutProvision {
                spec,
                config: d.config,
                qualifier: alias.to_owned(),
            })
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(function = %name, alias, "provision config follows the alias to its new version");
        Ok(())
    }
    .await;
    if let Err(e) = r {
        tracing::warn!(function = %name, alias, error = %e, "the alias's provisioned instances stay on its old version until the next PutProvisionConfig");
    }
}

/// After an alias was deleted: its provision configuration goes with it.
pub async fn drop_alias(gw: &Gateway, account: &AccountId, name: &FunctionName, alias: &str) {
    if let Err(e) = crate::api::provision::remove(gw, account, name, alias).await {
        tracing::warn!(function = %name, alias, error = ?e, "the deleted alias's provision config stays at the scheduler");
    }
}

/// After a function changed: its provision configuration, if any, is put
/// again with the new spec. Best effort in the background; the retry is
/// another PutProvisionConfig.
pub fn follow_update(gw: &Arc<Gateway>, account: &AccountId, spec: InstanceSpec) {
    let gw = gw.clone();
    let account = account.clone();
    tokio::spawn(async move {
        let name = spec.function_name.clone();
        let r: Result<(), InternalClientError> = async {
            let found = gw
                .scheduler
                .provisions(&account)
                .await?
                .into_iter()
                .find(|d| {
                    d.status.function_name == name
                        && d.status.qualifier == kiln_internal_api::LATEST
                });
            if let Some(d) = found {
                let req = PutProvision {
                    spec,
                    config: d.config,
                    qualifier: kiln_internal_api::LATEST.to_owned(),
                };
                gw.scheduler.put_provision(&req).await?;
                tracing::info!(function = %name, "provision config follows the new revision");
            }
            Ok(())
        }
        .await;
        if let Err(e) = r {
            tracing::warn!(function = %name, error = %e, "provisioned instances stay paused until the next PutProvisionConfig");
        }
    });
}
