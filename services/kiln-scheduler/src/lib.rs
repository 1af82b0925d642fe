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
pub mod election;
pub mod metrics;
pub mod placement;
mod sealed_env;
pub mod service;
pub mod simulate;
pub mod store;
pub mod trust;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kiln_core::{Clock, SystemClock};
use kiln_internal_api::InternalClient;
use kiln_pki::{LiveIdentity, PkiError};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use agent::{AgentClient, FakeAgent, HttpAgentClient};
pub use config::{ConfigError, SchedulerConfig};
pub use service::{Scheduler, SchedulerDeps};
pub use store::{PgSchedulerStore, SchedulerStore, SchedulerStoreError, SqliteSchedulerStore};

/// Why the scheduler could not start.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("Invalid configuration")]
    Config(#[from] ConfigError),
    #[error("Cannot load the TLS identity")]
    Tls(#[from] PkiError),
    #[error("Cannot load the scheduler's state")]
    Store(#[from] SchedulerStoreError),
    #[error("Cannot load the key that seals function environments")]
    SecretsKey(#[from] kiln_store::seal::KeyFileError),
    #[error("Cannot stand by for the scheduler leadership")]
    Standby(#[from] election::StandbyError),
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
    bootstrap_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    scheduler: Scheduler,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    writer: JoinHandle<()>,
    /// Says why, once this scheduler lost its cluster's leadership.
    deposed: watch::Receiver<Option<String>>,
    /// The election's task, stopped (resigning) after everything else.
    renewal: Option<JoinHandle<()>>,
}

impl SchedulerHandle {
    /// The mTLS listener.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The bootstrap listener (no client certificate), when configured.
    pub fn bootstrap_addr(&self) -> Option<SocketAddr> {
        self.bootstrap_addr
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// Resolves, with the reason, when a clustered scheduler has lost its
    /// leadership (never for a single scheduler): the process must stop
    /// so that its supervisor starts it again as a candidate.
    pub fn deposed(&self) -> impl std::future::Future<Output = String> + 'static {
        let mut rx = self.deposed.clone();
        async move {
            match rx.wait_for(Option::is_some).await {
                Ok(why) => why.clone().unwrap_or_default(),
                // The election task is gone with the handle: nothing ends.
                Err(_) => std::future::pending().await,
            }
        }
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
        if let Some(r) = self.renewal {
            let _ = r.await;
        }
        tracing::info!("scheduler stopped");
    }
}

/// Start the scheduler: load its state, bind its listeners, start its
/// background tasks. Returns once serving.
pub async fn start(config: SchedulerConfig) -> Result<SchedulerHandle, SchedulerError> {
    start_with(config, Overrides::default()).await
}

/// The certificate lifecycle: stored revocations, and the signing CA
/// when `[certificates]` is set (its key file checked first).
fn open_trust(
    config: &SchedulerConfig,
    store: Arc<dyn store::TrustStore>,
    clock: Arc<dyn Clock>,
) -> Result<trust::Trust, SchedulerError> {
    let own = kiln_pki::load_certs(&config.tls.cert)?;
    let identity = kiln_pki::Identity::from_certificate(&own[0]).map_err(PkiError::from)?;
    let issuer = match &config.certificates {
        None => None,
        Some(c) => {
            c.check_key_permissions()?;
            let root_pem =
                std::fs::read_to_string(&config.tls.ca).map_err(|source| PkiError::Read {
                    path: config.tls.ca.clone(),
                    source,
                })?;
            Some(trust::Issuer {
                ca: kiln_pki::Ca::load(&c.ca_cert, &c.ca_key)?,
                root_pem,
                lifetime: Duration::from_secs(c.agent_cert_lifetime_s),
                max_token_ttl: Duration::from_secs(c.max_bootstrap_token_ttl_s),
            })
        }
    };
    Ok(trust::Trust::open(
        store,
        clock,
        identity.trust_domain(),
        issuer,
    )?)
}

/// [`start`] with an injected clock and/or agent client.
pub async fn start_with(
    config: SchedulerConfig,
    overrides: Overrides,
) -> Result<SchedulerHandle, SchedulerError> {
    config.validate()?;
    let clock = overrides.clock.unwrap_or_else(|| Arc::new(SystemClock));
    let sealer =
        kiln_store::seal::load_sealer(config.secrets.as_ref(), &config.default_key_file())?;
    let (stop, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|v| *v).await;
        }
    };
    let (deposed_tx, deposed) = watch::channel(None);
    let (store, trust_store, lease, renewal, token): (
        Arc<dyn SchedulerStore>,
        Arc<dyn store::TrustStore>,
        election::Lease,
        _,
        Option<i64>,
    ) = match &config.cluster {
        None => {
            let s = Arc::new(SqliteSchedulerStore::open(
                &config.db_path(),
                Arc::new(sealer),
            )?);
            (s.clone(), s, election::Lease::sole(), None, None)
        }
        Some(cluster) => {
            let pg = PgSchedulerStore::open_with(
                &cluster.postgres_url,
                cluster.postgres_password_file.as_deref(),
                Arc::new(sealer),
            )?;
            let won = election::campaign_until_leader(
                cluster,
                &pg,
                config.listen,
                kiln_pki::internal_server_config(&config.tls)?,
                config.limits.clone(),
            )
            .await?;
            pg.fence(won.leadership.clone(), won.token);
            let (lease, token) = (won.lease.clone(), won.token);
            let renewal = tokio::spawn({
                let (pg, length, until) = (pg.clone(), cluster.lease(), stopped());
                async move { election::renew(pg, &won, length, deposed_tx, until).await }
            });
            let pg = Arc::new(pg);
            (pg.clone(), pg, lease, Some(renewal), Some(token))
        }
    };
    let trust = Arc::new(open_trust(&config, trust_store, clock.clone())?);
    let identity = LiveIdentity::load(&config.tls.cert, &config.tls.key)?;
    let revoked = trust.revocations().clone();
    let tls =
        kiln_pki::internal_server_config_live(&config.tls.ca, identity.clone(), revoked.clone())?;
    let agent = match overrides.agent {
        Some(a) => a,
        None => {
            // A revoked agent's server certificate fails our handshake too,
            // and our open connections to it close.
            let mut client = InternalClient::revoking(
                kiln_pki::internal_client_config_live(&config.tls.ca, identity, revoked.clone())?,
                revoked.clone(),
            );
            if let Some(t) = token {
                client = client.with_leader_token(t);
            }
            Arc::new(HttpAgentClient::new(
                &client,
                config.instance_start_timeout(),
            ))
        }
    };
    let (scheduler, writer) = Scheduler::new(
        &config,
        SchedulerDeps {
            clock,
            agent,
            store,
        },
    )?;
    scheduler.attach_trust(trust.clone());
    if let Some(t) = token {
        scheduler.attach_leader_token(t);
    }

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

    let mut tasks = Vec::new();
    let (s, held) = (scheduler.clone(), lease.clone());
    tasks.push(tokio::spawn(kiln_internal_api::server::serve(
        listener,
        tls,
        Some(revoked),
        config.limits.clone(),
        move |req, conn| {
            let (s, held) = (s.clone(), held.held());
            async move {
                if !held {
                    // Past the lease's local deadline: another scheduler
                    // may lead already.
                    return kiln_internal_api::server::error(
                        &election::not_leader(None),
                        "deposed",
                    );
                }
                api::handle(s, req, conn).await
            }
        },
        stopped(),
    )));
    let mut bootstrap_addr = None;
    if let Some(at) = config.bootstrap_listen {
        let bind_err = |source| SchedulerError::Bind { addr: at, source };
        let l = TcpListener::bind(at).await.map_err(bind_err)?;
        bootstrap_addr = Some(l.local_addr().map_err(bind_err)?);
        // Server authentication only: a joining node has no certificate
        // yet; it checks ours against the cluster CA it was given.
        let tls = kiln_pki::public_server_config(&config.tls.cert, &config.tls.key)?;
        let (t, m) = (trust.clone(), scheduler.metrics().clone());
        tasks.push(tokio::spawn(kiln_internal_api::server::serve(
            l,
            tls,
            None,
            config.limits.clone(),
            move |req, conn| api::trust::handle_bootstrap(t.clone(), m.clone(), req, conn.peer),
            stopped(),
        )));
    }
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
                _ = every.tick() => if lease.held() { s.tick() },
            }
        }
    }));
    tracing::info!(%addr, metrics = ?metrics_addr, bootstrap = ?bootstrap_addr, "scheduler serving");
    Ok(SchedulerHandle {
        addr,
        bootstrap_addr,
        metrics_addr,
        scheduler,
        stop,
        tasks,
        writer,
        deposed,
        renewal,
    })
}
