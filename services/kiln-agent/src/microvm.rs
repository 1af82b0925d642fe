//! The agent over the microVM backend (`[sandbox] backend = "microvm"`, the
//! default on a multi-tenant node): the driver, its runtimes, and the same
//! code source and scheduler client as with containers.

use std::sync::Arc;

use kiln_internal_api::InternalClient;
use kiln_sandbox::net::SystemCommands;
use kiln_sandbox::MicroVmDriver;

use crate::{AgentConfig, AgentError, Backends, GatewayCodeSource, HttpScheduler, ZipUnpacker};

/// The microVM driver with every configured runtime's image ready.
pub async fn driver(config: &AgentConfig) -> Result<Arc<MicroVmDriver>, AgentError> {
    let mut vm_config = config.sandbox.microvm.clone();
    if vm_config.rootfs_dir.is_none() {
        // The same runtime trees the container backend builds.
        vm_config.rootfs_dir = Some(
            config
                .sandbox
                .container
                .rootfs_dir
                .clone()
                .unwrap_or_else(|| config.state_dir.join("rootfs")),
        );
    }
    let mut driver = MicroVmDriver::new(vm_config, &config.state_dir).await?;
    if let Some(region) = &config.region {
        driver = driver.with_region(region.clone());
    }
    // `[sandbox.network]`: the taps get the same isolation as veths do.
    if let Some(network) = config.sandbox_network() {
        driver = driver
            .isolate_network(network, Arc::new(SystemCommands))
            .await?;
    }
    for runtime in &config.runtimes {
        tracing::info!(runtime = %runtime, "preparing the runtime's microVM disk image");
        if let Err(e) = driver.ensure_runtime(*runtime).await {
            // Leave no isolation table behind a failed start.
            if let Err(cleanup) = driver.shutdown().await {
                tracing::warn!(error = %cleanup, "cannot clean up after a failed start");
            }
            return Err(e.into());
        }
    }
    driver.start_prewarm();
    Ok(Arc::new(driver))
}

/// The real backends around `driver`, calling out with `client` (the
/// agent's live certificate: see [`crate::certs::AgentTrust::client`]).
pub fn backends(
    config: &AgentConfig,
    driver: Arc<MicroVmDriver>,
    client: InternalClient,
) -> Result<Backends, AgentError> {
    Ok(Backends {
        driver,
        code_source: Arc::new(GatewayCodeSource::new(
            client.clone(),
            &config.gateway_internal_url,
        )),
        unpacker: Arc::new(ZipUnpacker),
        scheduler: Arc::new(HttpScheduler::new(client, config.scheduler_endpoints())),
    })
}
