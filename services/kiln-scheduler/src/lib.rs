//! Kiln's scheduling service: the node registry, instance lifecycle and
//! bin-packing placement behind an mTLS HTTP/2 API.
//!
//! Layout: [`placement`] is the pure core (every decision in memory,
//! O(log n)); [`service`] wraps it with the agent calls, waiters and
//! write-behind persistence ([`store`]); [`api`] is the HTTP surface;
//! [`start`] wires them to listeners.
#![forbid(unsafe_code)]

pub mod agent;
pub mod api;
pub mod config;
pub mod metrics;
pub mod placement;
pub mod service;
pub mod simulate;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kiln_core::{Clock, SystemClock};
use kiln_internal_api::InternalClient;
use kiln_pki::PkiError;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use agent::{AgentClient, FakeAgent, HttpAgentClient};
pub use config::{ConfigError, SchedulerConfig};
pub use service::{Scheduler, SchedulerDeps};
pub use store::{SchedulerStore, SchedulerStoreError, SqliteSchedulerStore};

/// Why the scheduler could not start.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("Invalid configuration")]
    Config(#[from] ConfigError),
    #[error("Cannot load the TLS identity")]
    Tls(#[from] PkiError),
    #[error("Cannot load the scheduler's state")]
    Store(#[from] SchedulerStoreError),
    #[error("Cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Test seams for [`start_with`]; `None` means the real thing.
#[derive(Default)]
pub struct Overrides {
    pub clock: Option<Arc<dyn Clock>>,
    pub agent: Option<Arc<dyn AgentClient>>,
}

/// A running scheduler.
pub struct SchedulerHandle {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    scheduler: Scheduler,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    writer: JoinHandle<()>,
}

impl SchedulerHandle {
    /// The mTLS listener.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// Stop accepting, stop background work, write what is pending.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        if let Err(e) = self.scheduler.flush().await {
            tracing::warn!(error = %e, "could not flush scheduler state");
        }
        self.writer.abort();
        tracing::info!("scheduler stopped");
    }
}

/// Start the scheduler: load its state, bind its listeners, start its
/// background tasks. Returns once serving.
pub async fn start(config: SchedulerConfig) -> Result<SchedulerHandle, SchedulerError> {
    start_with(config, Overrides::default()).await
}

/// [`start`] with an injected clock and/or agent client.
pub async fn start_with(
    config: SchedulerConfig,
    overrides: Overrides,
) -> Result<SchedulerHandle, SchedulerError> {
    config.validate()?;
    let tls = kiln_pki::internal_server_config(&config.tls)?;
    let agent = match overrides.agent {
        Some(a) => a,
        None => {
            let client = InternalClient::new(&config.tls)?;
            Arc::new(HttpAgentClient::new(
                &client,
                config.instance_start_timeout(),
            ))
        }
    };
    let clock = overrides.clock.unwrap_or_else(|| Arc::new(SystemClock));
    let store = SqliteSchedulerStore::open(&config.db_path())?;
    let (scheduler, writer) = Scheduler::new(
        &config,
        SchedulerDeps {
            clock,
            agent,
            store: Arc::new(store),
        },
    )?;

    let listener =
        TcpListener::bind(config.listen)
            .await
            .map_err(|source| SchedulerError::Bind {
                addr: config.listen,
                source,
            })?;
    let addr = listener
        .local_addr()
        .map_err(|source| SchedulerError::Bind {
            addr: config.listen,
            source,
        })?;
    let metrics_listener = match config.metrics_listen {
        Some(a) => Some(
            metrics::bind(a)
                .await
                .map_err(|source| SchedulerError::Bind { addr: a, source })?,
        ),
        None => None,
    };
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());

    let (stop, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|v| *v).await;
        }
    };
    let mut tasks = Vec::new();
    let s = scheduler.clone();
    tasks.push(tokio::spawn(kiln_internal_api::server::serve_tls(
        listener,
        tls,
        move |req, conn| api::handle(s.clone(), req, conn),
        stopped(),
    )));
    if let Some(l) = metrics_listener {
        tasks.push(tokio::spawn(metrics::serve(
            l,
            scheduler.metrics().clone(),
            stopped(),
        )));
    }
    let s = scheduler.clone();
    let until = stopped();
    tasks.push(tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(config::TICK_INTERVAL_MS));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(until);
        loop {
            tokio::select! {
                _ = &mut until => break,
                _ = every.tick() => s.tick(),
            }
        }
    }));
    tracing::info!(%addr, metrics = ?metrics_addr, "scheduler serving");
    Ok(SchedulerHandle {
        addr,
        metrics_addr,
        scheduler,
        stop,
        tasks,
        writer,
    })
}
