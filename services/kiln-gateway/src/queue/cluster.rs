//! The gateway's shared state in a cluster (`[cluster]`): the async queue,
//! signature nonces and timer ticks on PostgreSQL (component
//! `gateway-queue`), the notification listener and the cleanup every
//! gateway runs.
//!
//! Nonces: `signature_nonces(access_key_id, nonce, expires_ms)`, claims
//! group-committed ([`PgNonces`]); expired rows are deleted in batches by
//! every gateway, which is safe to run concurrently (`FOR UPDATE SKIP
//! LOCKED`).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kiln_store::pg::{PgDatabase, PgStoreError};
use tokio_postgres::AsyncMessage;

use super::dispatch::DispatchSettings;
pub use super::postgres::PgNonces;
use super::postgres::{self, parse_signal, PgQueue, Signal, CHANNEL};
use super::{Queue, QueueError};
use crate::config::GatewayCluster;

/// How often each gateway deletes expired nonces and old timer ticks.
const CLEANUP_EVERY: Duration = Duration::from_secs(10);
/// Rows one cleanup statement deletes.
const CLEANUP_BATCH: i64 = 5_000;
/// How long a fired tick's claim is kept (ticks never fire late, so
/// anything older can no longer be claimed twice).
const TICK_RETENTION_MS: u64 = 3_600_000;

/// A delivery's lease in a cluster: short, renewed every
/// [`RENEW_EVERY`] while its gateway lives, so the deliveries of a
/// gateway killed with SIGKILL go back to the queue within this long.
pub const CLUSTER_LEASE_MS: u64 = 30_000;
/// How often a cluster gateway renews the leases of its running calls.
pub const RENEW_EVERY: Duration = Duration::from_secs(10);
/// How often an idle dispatcher of a cluster looks for messages whose
/// backoff ended (alone it does every 100 ms on its own SQLite file; in a
/// cluster new messages wake it at once through their notification, so
/// only retries after a backoff wait for this).
const CLUSTER_IDLE_POLL: Duration = Duration::from_millis(500);

/// The dispatcher's timings on a shared queue: `[async_queue] lease_ms`
/// capped at [`CLUSTER_LEASE_MS`] and renewed at least three times a
/// lease, and a slower idle poll.
pub fn shared_timings(settings: DispatchSettings) -> DispatchSettings {
    let lease_ms = settings.lease_ms.min(CLUSTER_LEASE_MS);
    DispatchSettings {
        lease_ms,
        renew_every: Some(
            RENEW_EVERY.min(Duration::from_millis(lease_ms / 3).max(Duration::from_millis(100))),
        ),
        idle_poll: CLUSTER_IDLE_POLL,
        ..settings
    }
}

/// The cluster's shared queue, nonces and what keeps them running.
pub struct Cluster {
    pub queue: Queue,
    pub nonces: Arc<PgNonces>,
    listen: tokio_postgres::Config,
}

/// Open the `gateway-queue` component of `[cluster]`'s database, start
/// the queue's writer. `owner` names this gateway in leases (stable
/// across its restarts, distinct between gateways).
pub async fn open_cluster(cluster: &GatewayCluster, owner: &str) -> Result<Cluster, QueueError> {
    let db = PgDatabase::open_with(
        &cluster.postgres_url,
        cluster.postgres_password_file.as_deref(),
        cluster.max_connections,
        postgres::COMPONENT,
        postgres::MIGRATIONS,
    )
    .await?;
    let listen = kiln_store::pg::connect_config(
        &cluster.postgres_url,
        cluster.postgres_password_file.as_deref(),
    )?;
    let nonces = Arc::new(PgNonces::new(db.clone()));
    Ok(Cluster {
        queue: Queue::postgres(PgQueue::new(db, owner)),
        nonces,
        listen,
    })
}

/// This gateway's name in leases: its host and state directory, the same
/// after a restart, different for another gateway.
pub fn owner_name(state_dir: &std::path::Path) -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{}", state_dir.display())
}

impl Cluster {
    /// Start the listener and the cleanup; both end when `stop()`'s
    /// futures resolve.
    pub fn spawn<F>(
        &self,
        stop: impl Fn() -> F,
        clock: Arc<dyn kiln_core::Clock>,
    ) -> Vec<tokio::task::JoinHandle<()>>
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let pg = self.queue.shared().expect("a cluster queue").clone();
        let listener = tokio::spawn(listen(self.listen.clone(), pg.signal_sender(), stop()));
        let cleanup = tokio::spawn(cleanup(pg, clock, stop()));
        vec![listener, cleanup]
    }

    /// The nonce record for the authenticator.
    pub fn shared_nonces(&self) -> Arc<dyn crate::auth::SharedNonces> {
        self.nonces.clone()
    }
}

/// Follow the queue's notifications until `stop`; reconnect (and ask for
/// a resync) whenever the connection drops.
async fn listen(
    config: tokio_postgres::Config,
    signals: tokio::sync::mpsc::UnboundedSender<Signal>,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut first = true;
    loop {
        let session = async {
            let (client, mut conn) = config.connect(tokio_postgres::NoTls).await?;
            let mut messages =
                futures_util::stream::poll_fn(move |cx| conn.poll_message(cx)).boxed();
            let sql = format!("LISTEN {CHANNEL}");
            let listen = client.batch_execute(&sql);
            tokio::pin!(listen);
            // The connection only makes progress while it is polled.
            loop {
                tokio::select! {
                    r = &mut listen => { r?; break; }
                    m = messages.next() => match m {
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(e),
                        None => return Ok(()),
                    },
                }
            }
            if !first {
                // Notifications sent while disconnected are lost.
                let _ = signals.send(Signal::Resync);
            }
            first = false;
            while let Some(m) = messages.next().await {
                match m? {
                    AsyncMessage::Notification(n) => {
                        if let Some(s) = parse_signal(n.payload()) {
                            if signals.send(s).is_err() {
                                return Ok(());
                            }
                        }
                    }
                    AsyncMessage::Notice(_) => {}
                    _ => {}
                }
            }
            Ok::<(), tokio_postgres::Error>(())
        };
        tokio::select! {
            () = &mut stop => return,
            r = session => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "the async queue's notification connection failed; reconnecting");
                }
            }
        }
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Delete expired nonces and old timer-tick claims every
/// [`CLEANUP_EVERY`] (every gateway does; they skip each other's rows).
async fn cleanup(
    pg: PgQueue,
    clock: Arc<dyn kiln_core::Clock>,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(CLEANUP_EVERY) => {}
        }
        let now = clock.now_ms();
        match purge_expired(pg.db(), now).await {
            Ok((0, 0)) => {}
            Ok((nonces, ticks)) => {
                tracing::debug!(nonces, ticks, "deleted expired nonces and timer ticks")
            }
            Err(e) => {
                tracing::warn!(error = %kiln_core::error_chain(&e), "cannot delete expired signature nonces")
            }
        }
    }
}

/// One cleanup pass: (nonces, ticks) deleted.
pub async fn purge_expired(db: &PgDatabase, now_ms: u64) -> Result<(u64, u64), PgStoreError> {
    let c = db.conn().await?;
    let mut nonces = 0;
    loop {
        let n = c
            .execute(
                "DELETE FROM signature_nonces WHERE ctid IN (
                     SELECT ctid FROM signature_nonces WHERE expires_ms < $1
                     LIMIT $2 FOR UPDATE SKIP LOCKED)",
                &[&(now_ms as i64), &CLEANUP_BATCH],
            )
            .await?;
        nonces += n;
        if n < CLEANUP_BATCH as u64 {
            break;
        }
    }
    let ticks = c
        .execute(
            "DELETE FROM timer_ticks WHERE ctid IN (
                 SELECT ctid FROM timer_ticks WHERE tick_ms < $1
                 LIMIT $2 FOR UPDATE SKIP LOCKED)",
            &[
                &(now_ms.saturating_sub(TICK_RETENTION_MS) as i64),
                &CLEANUP_BATCH,
            ],
        )
        .await?;
    Ok((nonces, ticks))
}

/// The cluster's shared state when `config` has `[cluster]`.
pub async fn open(config: &crate::GatewayConfig) -> Result<Option<Cluster>, QueueError> {
    match &config.cluster {
        Some(c) => Ok(Some(open_cluster(c, &owner_name(&config.state_dir)).await?)),
        None => Ok(None),
    }
}
