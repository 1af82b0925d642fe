//! Provisioned instances across function updates: a provision
//! configuration follows its function to the new revision (the scheduler
//! pauses it until then).

use std::sync::Arc;

use kiln_core::{AccountId, InstanceSpec};
use kiln_internal_api::{InternalClientError, PutProvision};

use crate::gateway::Gateway;

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
                .find(|d| d.status.function_name == name);
            if let Some(d) = found {
                let req = PutProvision {
                    spec,
                    config: d.config,
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
