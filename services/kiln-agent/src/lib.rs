//! The Kiln agent: runs on every compute node, creates and destroys
//! sandboxes, keeps the node's code cache, forwards invocations into the
//! sandboxes, and keeps the scheduler informed.
//!
//! `start` wires the real backends (the container driver, the gateway as
//! code source, the scheduler over mTLS); `start_with` takes any
//! [`Backends`], which is how tests run the real API over a fake driver.
#![forbid(unsafe_code)]

pub mod api;
pub mod certs;
pub mod code;
pub mod config;
pub mod credentials;
pub mod error;
pub mod exec;
pub mod forward;
pub mod freeze;
pub mod hooks;
pub mod images;
pub mod instances;
pub mod leader_fence;
pub mod logs;
pub mod metrics;
pub mod microvm;
pub mod namespace;
pub mod registration;
pub mod runtime_addr;
pub mod testing;
pub mod usage;
pub mod websocket;

use std::net::SocketAddr;
use std::sync::Arc;

use kiln_core::{RuntimeName, SystemClock};
use kiln_internal_api::{NodeCapacity, NodeLabels};
use kiln_sandbox::{ContainerDriver, SandboxDriver};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use code::{CodeCache, CodeSource, GatewayCodeSource, Unpacker, ZipUnpacker};
pub use config::{AgentConfig, ConfigError, NodeConfig};
pub use error::AgentError;
pub use instances::{InstanceManager, ManagerSettings};
pub use kiln_internal_api::InvokeOutcome;
pub use namespace::enter_private_mount_namespace;
pub use registration::{HttpScheduler, SchedulerApi};

/// The side effects the agent drives.
pub struct Backends {
    pub driver: Arc<dyn SandboxDriver>,
    pub code_source: Arc<dyn CodeSource>,
    pub unpacker: Arc<dyn Unpacker>,
    pub scheduler: Arc<dyn SchedulerApi>,
}

/// A running agent.
pub struct AgentHandle {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    agent_url: String,
    node_id: kiln_core::NodeId,
    manager: Arc<InstanceManager>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    drain: bool,
    container: Option<Arc<ContainerDriver>>,
    microvm: Option<Arc<kiln_sandbox::MicroVmDriver>>,
    trust: Arc<certs::AgentTrust>,
}

impl AgentHandle {
    /// The mTLS API's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The node this agent serves: the one its certificate names.
    pub fn node_id(&self) -> &kiln_core::NodeId {
        &self.node_id
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// What the agent told the scheduler to use.
    pub fn agent_url(&self) -> &str {
        &self.agent_url
    }

    pub fn instances(&self) -> &Arc<InstanceManager> {
        &self.manager
    }

    /// The agent's metrics in Prometheus' text format (what the metrics
    /// listener serves).
    pub fn metrics_text(&self) -> String {
        self.manager.metrics.render()
    }

    /// The agent's live certificate and the revocations it enforces.
    pub fn trust(&self) -> &Arc<certs::AgentTrust> {
        &self.trust
    }

    /// Keep the certificate renewed and follow the cluster's revocations
    /// through `api` (the scheduler), until shutdown.
    pub fn keep_certificates(&mut self, api: Arc<dyn certs::CertificateApi>) {
        self.tasks.push(tokio::spawn(certs::run_renewal(
            self.trust.clone(),
            api.clone(),
            self.shutdown.subscribe(),
        )));
        self.tasks.push(tokio::spawn(certs::run_revocation_poll(
            self.trust.revocations().clone(),
            api,
            self.shutdown.subscribe(),
        )));
    }

    /// Stop serving and stop the background tasks. Instances stay (an
    /// agent restart adopts them) unless `drain_on_shutdown` is set.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        if self.drain {
            tracing::info!(
                instances = self.manager.ids().len(),
                "draining: destroying every instance"
            );
            self.manager.destroy_all().await;
        }
        if let Some(driver) = self.container {
            if let Err(e) = driver.shutdown().await {
                tracing::warn!(error = %e, "sandbox backend did not shut down cleanly");
            }
        }
        if let Some(driver) = self.microvm {
            if let Err(e) = driver.shutdown().await {
                tracing::warn!(error = %e, "microVM backend did not shut down cleanly");
            }
        }
        tracing::info!("agent stopped");
    }
}

/// Start the agent with its real backends. Prepares every configured
/// runtime's root filesystem first (the first build of `custom.debian12`,
/// and of each Debian release's tree of the built-in runtimes, runs debootstrap and takes a
/// few minutes; later starts reuse it).
pub async fn start(mut config: AgentConfig) -> Result<AgentHandle, AgentError> {
    config.validate()?;
    config.require_network_isolation()?;
    config.warn_insecure();
    if config.sandbox.backend_for(config.node.tenancy) == kiln_core::SandboxKind::Microvm {
        // Container images run on container nodes only (for now): a
        // microVM node does not offer them, so none is placed here.
        if config.runtimes.iter().any(|r| r.is_container_image()) {
            tracing::info!("custom-container is not offered: it needs the container backend");
            config.runtimes.retain(|r| !r.is_container_image());
        }
        let driver = microvm::driver(&config).await?;
        let trust = certs::load_or_join(&config).await?;
        let client = trust.client()?;
        let backends = microvm::backends(&config, driver.clone(), client.clone())?;
        let schedulers = config.scheduler_endpoints();
        let mut handle = start_with_trust(config, backends, trust).await?;
        handle.keep_certificates(Arc::new(certs::HttpCertificateApi::new(client, schedulers)));
        handle.microvm = Some(driver);
        return Ok(handle);
    }
    // Before minutes of runtime preparation: an agent without its node's
    // certificate cannot join.
    registration::node_identity(&config.tls.cert)?;
    let mut container = config.sandbox.container.clone();
    container.network = config.sandbox_network();
    // The root filesystems before the driver: a stop during their first
    // build (minutes) then leaves nothing on the host to clean up.
    for runtime in &config.runtimes {
        if *runtime != RuntimeName::Custom {
            tracing::info!(
                runtime = %runtime,
                "preparing the runtime root filesystem; the first build runs debootstrap and takes a few minutes"
            );
        }
        kiln_sandbox::container::prepare_runtime(&container, &config.state_dir, *runtime).await?;
        tracing::info!(runtime = %runtime, "runtime ready");
    }
    let mut driver = ContainerDriver::new(container, &config.state_dir).await?;
    if let Some(region) = &config.region {
        driver = driver.with_region(region.clone());
    }
    let driver = Arc::new(driver);
    let trust = certs::load_or_join(&config).await?;
    let client = trust.client()?;
    let credential_source = Arc::new(credentials::GatewayCredentialSource::new(
        client.clone(),
        &config.gateway_internal_url,
    ));
    let backends = Backends {
        driver: driver.clone(),
        code_source: Arc::new(GatewayCodeSource::new(
            client.clone(),
            &config.gateway_internal_url,
        )),
        unpacker: Arc::new(ZipUnpacker),
        scheduler: Arc::new(HttpScheduler::new(
            client.clone(),
            config.scheduler_endpoints(),
        )),
    };
    let schedulers = config.scheduler_endpoints();
    let mut handle = start_with_trust(config, backends, trust).await?;
    handle.keep_certificates(Arc::new(certs::HttpCertificateApi::new(client, schedulers)));
    handle
        .manager
        .set_credential_source(credential_source)
        .await;
    handle.container = Some(driver);
    Ok(handle)
}

/// Start the agent over the given backends.
pub async fn start_with(
    config: AgentConfig,
    backends: Backends,
) -> Result<AgentHandle, AgentError> {
    let trust = certs::load_or_join(&config).await?;
    start_with_trust(config, backends, trust).await
}

/// [`start_with`] serving with `trust`'s live certificate and
/// revocations (shared with the clients the backends use).
async fn start_with_trust(
    config: AgentConfig,
    backends: Backends,
    trust: Arc<certs::AgentTrust>,
) -> Result<AgentHandle, AgentError> {
    config.validate()?;
    let node_id = registration::node_identity(&config.tls.cert)?;
    let state_err = |path: &std::path::Path| {
        let path = path.to_owned();
        move |source| AgentError::State { path, source }
    };
    std::fs::create_dir_all(&config.state_dir).map_err(state_err(&config.state_dir))?;
    let tls = trust.server_config()?;

    let metrics = Arc::new(metrics::Metrics::new());
    let uid_base = config.sandbox.uid_base;
    let code = CodeCache::new(
        config.code_dir(),
        Some((uid_base, uid_base)),
        backends.code_source,
        backends.unpacker,
    )
    .with_max_bytes(config.code_cache.max_bytes);
    let images = if config.runtimes.iter().any(|r| r.is_container_image()) {
        Some(Arc::new(
            images::ImageCache::new(images::ImageCacheSettings {
                dir: config.images_dir(),
                id_base: Some(uid_base),
                ca_bundle: config.images.ca_bundle.clone(),
                max_image_mb: config.images.max_image_mb,
                budget_mb: config.images.budget_mb,
                pull_timeout: std::time::Duration::from_secs(config.images.pull_timeout_s),
            })
            .map_err(|e| {
                AgentError::Config(crate::config::ConfigError::Invalid(format!(
                    "images: {}",
                    kiln_core::error_chain(&e)
                )))
            })?,
        ))
    } else {
        None
    };
    let manager = InstanceManager::new(
        backends.driver.clone(),
        code,
        ManagerSettings {
            memory_mb: config.node.memory_mb,
            max_instances: config.node.max_instances,
            runtimes: config.runtimes.clone(),
            start_timeout: config.instance_start_timeout(),
            region: config.region.clone(),
            records_dir: config.state_dir.join("instance-records"),
            network_isolation: config.network_isolation(),
            vpc_owners: config
                .sandbox
                .network
                .iter()
                .flat_map(|n| &n.vpcs)
                .map(|v| (v.id.clone(), v.owners.clone()))
                .collect(),
        },
        metrics.clone(),
        Arc::new(SystemClock),
    );
    let manager = Arc::new(match images {
        Some(images) => manager.with_images(images),
        None => manager,
    });
    manager.reconcile().await?;
    manager.freezer.set_delay(config.usage.freeze_delay());

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| AgentError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| AgentError::Bind {
        addr: config.listen,
        source,
    })?;
    let agent_url = config
        .advertise_url
        .clone()
        .unwrap_or_else(|| format!("https://{addr}"));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();

    let metrics_addr = match config.metrics_listen {
        Some(at) => {
            let l = metrics::bind(at).await?;
            let bound = l
                .local_addr()
                .map_err(|source| AgentError::Bind { addr: at, source })?;
            tasks.push(tokio::spawn(metrics::serve(
                l,
                metrics.clone(),
                shutdown_rx.clone(),
            )));
            Some(bound)
        }
        None => None,
    };

    tasks.push(tokio::spawn(usage::run_sampler(
        manager.clone(),
        config.usage.sample_interval(),
        shutdown_rx.clone(),
    )));

    // The background reader of every instance's console.
    let log_manager = manager.clone();
    let mut log_shutdown = shutdown_rx.clone();
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(logs::POLL_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => log_manager.drain_logs(),
                _ = registration::stopped(&mut log_shutdown) => break,
            }
        }
    }));

    let handler_manager = manager.clone();
    let handler = move |req, conn| api::handle(handler_manager.clone(), req, conn);
    let mut server_shutdown = shutdown_rx.clone();
    let server_revoked = trust.revocations().clone();
    let server_limits = config.limits.clone();
    tasks.push(tokio::spawn(async move {
        kiln_internal_api::server::serve(
            listener,
            tls,
            Some(server_revoked),
            server_limits,
            handler,
            async move {
                registration::stopped(&mut server_shutdown).await;
            },
        )
        .await;
    }));

    let node = registration::NodeDescription {
        agent_url: agent_url.clone(),
        capacity: NodeCapacity {
            memory_mb: config.node.memory_mb,
            cpu_milli: config.node.cpu_milli,
            max_instances: config.node.max_instances,
        },
        labels: NodeLabels {
            zone: config.node.zone.clone(),
            tenancy: config.node.tenancy,
            sandbox_kinds: vec![backends.driver.kind()],
            dedicated_account: config.node.dedicated_account.clone(),
            // Both backends prepared every configured runtime above.
            runtimes: Some(config.runtimes.clone()),
            network_isolation: config.network_isolation(),
        },
    };
    tasks.push(tokio::spawn(registration::run(
        backends.scheduler,
        manager.clone(),
        node,
        node_id.clone(),
        shutdown_rx,
    )));
    tracing::info!(%addr, %agent_url, %node_id, metrics = ?metrics_addr, "agent serving");
    Ok(AgentHandle {
        addr,
        metrics_addr,
        agent_url,
        node_id,
        manager,
        shutdown: shutdown_tx,
        tasks,
        drain: config.drain_on_shutdown,
        container: None,
        microvm: None,
        trust,
    })
}
