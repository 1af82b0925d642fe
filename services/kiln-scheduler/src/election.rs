//! Leadership among the schedulers of a cluster (`[cluster]`).
//!
//! A scheduler starts as a candidate: it binds its listener and answers
//! every call there with `ServiceUnavailable` (kind `NotLeader`, naming
//! the leader's URL) while it campaigns every third of a lease
//! ([`kiln_store::pg::leader`]). Once it wins, the standby listener stops,
//! the scheduler loads the state the last leader left in PostgreSQL and
//! starts as a single scheduler does, its store fenced with the token it
//! won.
//!
//! A leader renews its lease every third of it and counts its lease as
//! held only until the *local* deadline of the last renewal it started
//! (its send time plus the lease: never later than the database's own
//! expiry). Past that deadline it refuses calls and skips its periodic
//! work, and when it finds another holder, a newer token, or cannot renew
//! before the deadline, it is *deposed*: the process stops, and its
//! supervisor starts it again as a candidate. A leader paused past its
//! lease therefore acts on nothing when it resumes, and its store's
//! fenced writes fail even if it tried.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_core::{FcError, FcErrorKind};
use kiln_internal_api::server::ListenerLimits;
use kiln_store::pg::leader::{Election, Leadership};
use kiln_store::pg::PgStoreError;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::ClusterSettings;
use crate::store::postgres::COMPONENT;
use crate::store::PgSchedulerStore;

/// Whether this scheduler may act now.
#[derive(Clone)]
pub struct Lease {
    /// Milliseconds since `epoch` until which the lease is held: 0 not
    /// at all, `u64::MAX` for ever (a single scheduler).
    held_until_ms: Arc<AtomicU64>,
    epoch: Instant,
}

impl Lease {
    /// A single scheduler's: held for ever.
    pub fn sole() -> Self {
        Self {
            held_until_ms: Arc::new(AtomicU64::new(u64::MAX)),
            epoch: Instant::now(),
        }
    }

    fn clustered(epoch: Instant) -> Self {
        Self {
            held_until_ms: Arc::new(AtomicU64::new(0)),
            epoch,
        }
    }

    /// True while the lease is held by the local clock.
    pub fn held(&self) -> bool {
        (self.epoch.elapsed().as_millis() as u64) < self.held_until_ms.load(Ordering::Acquire)
    }

    fn hold_until(&self, deadline: Instant) {
        let ms = deadline.saturating_duration_since(self.epoch).as_millis() as u64;
        self.held_until_ms.store(ms, Ordering::Release);
    }

    fn drop_now(&self) {
        self.held_until_ms.store(0, Ordering::Release);
    }
}

/// The answer a standby (or a leader past its local deadline) gives.
pub fn not_leader(leader: Option<&str>) -> FcError {
    FcError::unavailable(format!(
        "this scheduler is not the leader (the leader is {}); call the leader",
        leader.unwrap_or("being elected")
    ))
    .with_kind(FcErrorKind::NotLeader)
}

/// What winning gave: the fenced store's leadership and the token.
pub struct Won {
    pub leadership: Leadership,
    pub token: i64,
    pub lease: Lease,
    /// When the winning campaign was sent (the lease's local start).
    sent: Instant,
}

/// Campaign until this scheduler leads, answering `NotLeader` on
/// `listen` meanwhile (TLS as the real listener; nothing else served).
pub async fn campaign_until_leader(
    cluster: &ClusterSettings,
    store: &PgSchedulerStore,
    listen: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    limits: ListenerLimits,
) -> Result<Won, StandbyError> {
    let leadership = {
        let (db, holder, lease) = (
            store.database().clone(),
            cluster.advertise_url.clone(),
            cluster.lease(),
        );
        store
            .run(async move { Leadership::new(db, COMPONENT, &holder, lease).await })
            .await?
    };
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| StandbyError::Bind {
            addr: listen,
            source,
        })?;
    let (leader_tx, leader_rx) = watch::channel::<Option<String>>(None);
    let (stop, stop_rx) = watch::channel(false);
    let standby = tokio::spawn(kiln_internal_api::server::serve(
        listener,
        tls,
        None,
        limits,
        move |_req, _conn| {
            let leader = leader_rx.borrow().clone();
            async move { kiln_internal_api::server::error(&not_leader(leader.as_deref()), "standby") }
        },
        async move {
            let mut rx = stop_rx;
            let _ = rx.wait_for(|v| *v).await;
        },
    ));
    let every = cluster.lease() / 3;
    let epoch = Instant::now();
    let mut last_seen: Option<String> = None;
    let won = loop {
        let sent = Instant::now();
        let l = leadership.clone();
        match store.run(async move { l.campaign().await }).await {
            Ok(Election::Leader { token }) => break (token, sent),
            Ok(Election::Follower { leader }) => {
                if last_seen.as_deref() != Some(&leader) {
                    tracing::info!(%leader, "standing by: another scheduler leads");
                    last_seen = Some(leader.clone());
                }
                let _ = leader_tx.send(Some(leader));
            }
            Err(e) => {
                tracing::warn!(error = %kiln_core::error_chain(&e), "cannot campaign for leadership; retrying")
            }
        }
        tokio::time::sleep(every).await;
    };
    let _ = stop.send(true);
    let _ = standby.await;
    let (token, sent) = won;
    let lease = Lease::clustered(epoch);
    lease.hold_until(sent + cluster.lease());
    tracing::info!(token, advertise = %cluster.advertise_url, "elected scheduler leader");
    Ok(Won {
        leadership,
        token,
        lease,
        sent,
    })
}

/// Why a candidate could not campaign.
#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    #[error("Cannot reach the cluster's PostgreSQL")]
    Postgres(#[from] PgStoreError),
    #[error("Cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Keep the lease: renew every third of it, extend [`Lease`] on each
/// success, and on losing it (another holder, a new token, no renewal by
/// the deadline) drop it and say why on `deposed`.
pub async fn renew(
    store: PgSchedulerStore,
    won: &Won,
    lease_length: Duration,
    deposed: watch::Sender<Option<String>>,
    stopped: impl std::future::Future<Output = ()>,
) {
    let (leadership, token, lease) = (won.leadership.clone(), won.token, won.lease.clone());
    let mut deadline = won.sent + lease_length;
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            () = &mut stopped => {
                let l = leadership.clone();
                // A clean stop hands over at once instead of after a lease.
                if let Err(e) = store.run(async move { l.resign(token).await }).await {
                    tracing::warn!(error = %kiln_core::error_chain(&e), "could not resign the leadership");
                }
                return;
            }
            () = tokio::time::sleep(lease_length / 3) => {}
        }
        let sent = Instant::now();
        let l = leadership.clone();
        let why = match store.run(async move { l.campaign().await }).await {
            Ok(Election::Leader { token: t }) if t == token => {
                deadline = sent + lease_length;
                lease.hold_until(deadline);
                continue;
            }
            Ok(Election::Leader { token: t }) => {
                format!("the lease lapsed and was taken again with token {t}")
            }
            Ok(Election::Follower { leader }) => format!("{leader} holds the lease now"),
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(error = %kiln_core::error_chain(&e), "cannot renew the leadership lease; retrying until it lapses");
                continue;
            }
            Err(e) => format!(
                "the lease lapsed while PostgreSQL could not be reached ({})",
                kiln_core::error_chain(&e)
            ),
        };
        lease.drop_now();
        tracing::error!(token, reason = %why, "lost the scheduler leadership");
        let _ = deposed.send(Some(why));
        return;
    }
}
