//! kiln-gateway: Kiln's access service.
//!
//! The public HTTPS listener serves FC's 2023-03-30 API (function CRUD and
//! sync invocation) to signed requests; the internal mTLS listener serves
//! code packages to agents. Metadata lives in SQLite with an in-memory view
//! for the request path (see [`catalog`]).
#![forbid(unsafe_code)]

pub mod access_keys;
pub mod agent;
pub mod api;
pub mod auth;
pub mod bounds;
pub mod catalog;
pub mod checksum;
pub mod code;
pub mod config;
pub mod domains;
pub mod gateway;
pub mod http_trigger;
pub mod invoke;
pub mod layers;
pub mod metrics;
pub mod model;
pub mod placements;
pub mod provisioning;
pub mod queue;
pub mod ram;
pub mod runtimes;
pub mod scheduler;
pub mod secrets;
pub mod store;
pub mod timers;
pub mod triggers;
pub mod validate;
pub mod versions;
pub mod vpcs;

use std::net::SocketAddr;
use std::sync::Arc;

use kiln_core::{Clock, SystemClock};
use kiln_internal_api::InternalClient;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use config::{ConfigError, GatewayCluster, GatewayConfig};

use crate::catalog::{Catalog, CatalogError};
use crate::gateway::Gateway;
use crate::metrics::Metrics;
use crate::store::{AccessKey, CodeFiles};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("Cannot create state directory {path}")]
    StateDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot open the metadata store")]
    Store(#[from] kiln_store::StoreError),
    #[error("Cannot load the metadata store")]
    Catalog(#[from] CatalogError),
    #[error("Cannot open the metadata store")]
    Meta(#[from] store::MetaStoreError),
    #[error("Cannot load the custom domains")]
    Domains(#[from] domains::DomainsLoadError),
    #[error("Cannot load the secrets key")]
    SecretsKey(#[from] secrets::KeyFileError),
    #[error("Cannot load the STS key")]
    StsKey(#[from] ram::sts::StsKeyError),
    #[error("Cannot load roles")]
    Roles(#[from] ram::RoleError),
    #[error("Cannot open the async queue")]
    Queue(#[from] queue::QueueError),
    #[error("Cannot build the webhook client")]
    Webhooks(#[from] queue::invoker::WebhookClientError),
    #[error("Cannot load TLS material")]
    Tls(#[from] kiln_pki::PkiError),
    #[error("Cannot bind the {listener} listener on {addr}")]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running gateway.
pub struct GatewayHandle {
    public_addr: SocketAddr,
    internal_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    vpc_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    gw: Arc<Gateway>,
    /// `public.drain_delay_ms`.
    drain_delay: std::time::Duration,
}

impl GatewayHandle {
    /// The public (FC API) listener.
    pub fn addr(&self) -> SocketAddr {
        self.public_addr
    }

    pub fn public_addr(&self) -> SocketAddr {
        self.public_addr
    }

    /// The internal (mTLS) listener agents fetch code from.
    pub fn internal_addr(&self) -> SocketAddr {
        self.internal_addr
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The gateway's metrics in Prometheus' text format (what the metrics
    /// listener serves).
    pub fn metrics_text(&self) -> String {
        self.gw.metrics.encode()
    }

    /// The VPC listener, when configured.
    pub fn vpc_addr(&self) -> Option<SocketAddr> {
        self.vpc_addr
    }

    /// Report draining on `/healthz` for `public.drain_delay_ms`, then
    /// stop accepting connections, drain them and stop background tasks.
    pub async fn shutdown(self) {
        self.gw
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if !self.drain_delay.is_zero() {
            tracing::info!(
                drain_delay_ms = self.drain_delay.as_millis() as u64,
                "draining: /healthz answers 503 while the load balancer moves traffic away"
            );
            tokio::time::sleep(self.drain_delay).await;
        }
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

async fn bind(listener: &'static str, addr: SocketAddr) -> Result<TcpListener, GatewayError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| GatewayError::Bind {
            listener,
            addr,
            source,
        })
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            break;
        }
    }
}

/// The sealing key of `[secrets]`, or the state directory's own (created
/// on first start) when the config names none.
fn load_sealer(config: &GatewayConfig) -> Result<secrets::Sealer, GatewayError> {
    Ok(secrets::load_sealer(
        config.secrets.as_ref(),
        &config.default_key_file(),
    )?)
}

/// Start the gateway with the system clock.
pub async fn start(config: GatewayConfig) -> Result<GatewayHandle, GatewayError> {
    start_with_clock(config, Arc::new(SystemClock)).await
}

/// Start the gateway: open the store, ensure bootstrap keys, bind every
/// listener, return once serving.
pub async fn start_with_clock(
    config: GatewayConfig,
    clock: Arc<dyn Clock>,
) -> Result<GatewayHandle, GatewayError> {
    config.validate()?;
    // In a cluster the async queue, nonces and timer ticks are shared.
    let cluster = queue::cluster::open(&config).await?;
    std::fs::create_dir_all(&config.state_dir).map_err(|source| GatewayError::StateDir {
        path: config.state_dir.clone(),
        source,
    })?;
    let code = CodeFiles::new(config.code_dir()).map_err(|source| GatewayError::StateDir {
        path: config.code_dir(),
        source,
    })?;
    let sealer = Arc::new(load_sealer(&config)?);
    // Metadata: SQLite, or the cluster's PostgreSQL (store::changes keeps
    // this gateway's views in step with the others').
    let stores = match &config.cluster {
        Some(c) => store::Stores::open_cluster(c, sealer.clone(), code)?,
        None => store::Stores::sqlite(&config.db_path(), sealer.clone(), code)?,
    };
    let domains = Arc::new(domains::Domains::open(
        stores.domains.clone(),
        sealer,
        std::iter::once(config.http_triggers.domain.clone())
            .chain(config.http_triggers.intranet_domain.clone())
            .collect(),
        kiln_pki::certificate_names(&kiln_pki::load_certs(&config.public.cert)?[0])?,
    )?);
    let catalog = Arc::new(
        Catalog::open(stores.meta.clone(), stores.code.clone())
            .await?
            .with_bounds(bounds::Bounds::from_config(&config.tenant_bounds)),
    );
    let ram = Arc::new(
        ram::Ram::open(
            stores.roles.clone(),
            match stores.shared_sts_key()? {
                Some(key) => ram::Sts::new(key),
                None => ram::Sts::load_or_create(&config.state_dir.join("sts.key"))?,
            },
            config.credentials_lifetime_s,
            clock.clone(),
        )
        .await?,
    );
    for k in &config.bootstrap_keys {
        catalog
            .ensure_key(
                AccessKey {
                    access_key_id: k.access_key_id.clone(),
                    account_id: k.account_id.clone(),
                    secret: k.access_key_secret.clone(),
                },
                clock.now_ms(),
            )
            .await?;
    }

    let public_tls = kiln_pki::public_server_config(&config.public.cert, &config.public.key)?;
    // Revoked nodes (followed from the scheduler) are refused on the
    // internal listener and as servers of the gateway's calls.
    let revoked = kiln_pki::RevocationSet::new();
    let identity = kiln_pki::LiveIdentity::load(&config.tls.cert, &config.tls.key)?;
    let internal_tls =
        kiln_pki::internal_server_config_live(&config.tls.ca, identity.clone(), revoked.clone())?;
    let client_tls =
        kiln_pki::internal_client_config_live(&config.tls.ca, identity, revoked.clone())?;
    let internal = InternalClient::revoking(client_tls.clone(), revoked.clone());
    let invoke_client = kiln_internal_api::InvokeClient::revoking(client_tls, revoked.clone());
    let queue = match &cluster {
        Some(c) => c.queue.clone(),
        None => queue::Queue::open(&config.queue_path())?,
    };
    let metrics = Metrics::with_extra(|r| queue.metrics().register(r));
    let scheduler: scheduler::SharedScheduler = Arc::new(scheduler::HttpScheduler::new(
        internal.clone(),
        config.scheduler_endpoints(),
    ));
    let internal_api = Arc::new(api::internal::Internal {
        catalog: catalog.clone(),
        ram: ram.clone(),
        placements: placements::Placements::new(scheduler.clone()),
        refusals: metrics.refusals.clone(),
    });
    let leases = invoke::pool::LeasePool::new(
        std::time::Duration::from_millis(config.lease_hold_ms),
        scheduler.clone(),
    );

    let configs = Arc::new(queue::dispatch::Configs::load(&queue).await?);
    let webhooks = queue::invoker::webhook_client(config.async_queue.webhook_ca.as_deref())?;
    let aq = &config.async_queue;
    let mut settings = queue::dispatch::DispatchSettings {
        max_in_flight: aq.max_in_flight,
        per_queue: aq.per_queue,
        lease_ms: aq.lease_ms,
        backoff_cap: std::time::Duration::from_millis(aq.backoff_cap_ms),
        retention_ms: aq.task_retention_s.saturating_mul(1000),
        ..Default::default()
    };
    if cluster.is_some() {
        settings = queue::cluster::shared_timings(settings);
    }
    let runtimes = Arc::new(
        runtimes::RuntimeCatalogue::from_config(&config.runtimes)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?,
    );
    let gw = Arc::new_cyclic(|me| Gateway {
        catalog: catalog.clone(),
        runtimes,
        auth: auth::signature_authenticator(
            catalog.clone(),
            ram.clone(),
            clock.clone(),
            &config.signatures,
            cluster.as_ref().map(|c| c.shared_nonces()),
        ),
        ram: ram.clone(),
        agents: Arc::new(agent::HttpAgent::new(invoke_client, internal.clone())),
        scheduler,
        leases: leases.clone(),
        region: config.region.clone(),
        http_triggers: http_trigger::HttpTriggers::new(config.http_triggers.clone()),
        domains: domains.clone(),
        vpcs: Arc::new(vpcs::VpcRegistry::from_config(&config.vpcs)),
        metrics: metrics.clone(),
        dispatcher: queue::dispatch::Dispatcher::new(
            queue,
            Arc::new(queue::invoker::GatewayInvoker {
                gw: me.clone(),
                webhooks,
            }),
            configs,
            clock.clone(),
            settings,
            config.region.clone(),
        ),
        clock,
        draining: std::sync::atomic::AtomicBool::new(false),
    });

    let public = bind("public", config.public.listen).await?;
    let internal_l = bind("internal", config.internal.listen).await?;
    let public_addr = public.local_addr().expect("bound");
    gw.http_triggers.set_public_port(
        config
            .http_triggers
            .public_port
            .unwrap_or(public_addr.port()),
    );
    let internal_addr = internal_l.local_addr().expect("bound");
    let metrics_l = match config.metrics_listen {
        Some(a) => Some(bind("metrics", a).await?),
        None => None,
    };
    let metrics_addr = metrics_l.as_ref().map(|l| l.local_addr().expect("bound"));
    let vpc_l = match &config.vpc_listener {
        Some(v) => Some((
            bind("vpc", v.listen).await?,
            kiln_pki::public_server_config(&v.cert, &v.key)?,
            api::vpc::Listener::Vpc(Arc::new(v.vpc_ids.clone())),
            v.limits.clone(),
        )),
        None => None,
    };
    let vpc_addr = vpc_l
        .as_ref()
        .map(|(l, _, _, _)| l.local_addr().expect("bound"));

    let (tx, rx) = watch::channel(false);
    let mut tasks = Vec::new();
    {
        let gw = gw.clone();
        // Custom domains' certificates and TLS versions by SNI.
        let public_tls =
            kiln_internal_api::server::ServerTls::PerHello(Arc::new(domains::tls::Selector {
                default: public_tls,
                domains,
            }));
        tasks.push(tokio::spawn(kiln_internal_api::server::serve(
            public,
            public_tls,
            None,
            config.public.limits.clone(),
            move |req, conn| api::handle(gw.clone(), req, conn),
            stopped(rx.clone()),
        )));
    }
    if let Some((listener, tls, marker, limits)) = vpc_l {
        let gw = gw.clone();
        tasks.push(tokio::spawn(kiln_internal_api::server::serve(
            listener,
            tls,
            None,
            limits,
            move |mut req: http::Request<hyper::body::Incoming>, conn| {
                req.extensions_mut().insert(marker.clone());
                api::handle(gw.clone(), req, conn)
            },
            stopped(rx.clone()),
        )));
    }
    tasks.push(tokio::spawn(kiln_internal_api::trust::follow_revocations(
        internal.clone(),
        config.scheduler_endpoints(),
        revoked.clone(),
        stopped(rx.clone()),
    )));
    tasks.push(tokio::spawn(kiln_internal_api::server::serve(
        internal_l,
        internal_tls,
        Some(revoked),
        config.internal.limits.clone(),
        move |req, conn| api::internal::handle(internal_api.clone(), req, conn),
        stopped(rx.clone()),
    )));
    if let Some(follow) = stores.follower(
        store::changes::Views {
            catalog: catalog.clone(),
            ram: Some(ram.clone()),
            domains: Some(gw.domains.clone()),
        },
        stopped(rx.clone()),
    ) {
        tasks.push(tokio::spawn(follow));
    }
    tasks.push(tokio::spawn(leases.run_sweeper(stopped(rx.clone()))));
    tasks.push(tokio::spawn(gw.dispatcher.clone().run(stopped(rx.clone()))));
    tasks.push(tokio::spawn(timers::run(gw.clone(), stopped(rx.clone()))));
    if let Some(c) = &cluster {
        tasks.extend(c.spawn(|| stopped(rx.clone()), gw.clock.clone()));
    }
    if let Some(l) = metrics_l {
        tasks.push(tokio::spawn(metrics::serve(
            l,
            metrics,
            stopped(rx.clone()),
        )));
    }
    tracing::info!(%public_addr, %internal_addr, ?metrics_addr, ?vpc_addr, region = %config.region, "gateway serving");
    Ok(GatewayHandle {
        public_addr,
        internal_addr,
        metrics_addr,
        vpc_addr,
        shutdown: tx,
        tasks,
        gw,
        drain_delay: std::time::Duration::from_millis(config.public.drain_delay_ms),
    })
}
