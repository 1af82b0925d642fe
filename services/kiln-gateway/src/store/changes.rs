//! Keeping the in-memory views of a cluster's gateways in step.
//!
//! Requests read functions, keys, layers, versions, triggers, roles and
//! custom domains from memory ([`crate::catalog::Catalog`],
//! [`crate::ram::Ram`], [`crate::domains::Domains`]). On PostgreSQL every
//! write appends a change row (kind, account, name) in its transaction and
//! notifies [`super::postgres::CHANNEL`] ([`super::postgres`]). Each
//! gateway's [`follow`] LISTENs on a dedicated connection and, on a
//! notification, on a slow safety-net poll ([`SAFETY_POLL`]) and after
//! every reconnect, reads the changes after the last one it applied and
//! reloads just those: one function by name, or the one kind of index that
//! changed. A gateway so far behind that the changes it needs were purged
//! reloads everything. Unchanged function entries keep their `Arc`.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

use super::postgres::{ChangeRow, PgMetaStore, CHANNEL};
use super::MetaStoreError;
use crate::catalog::Catalog;
use crate::domains::Domains;
use crate::ram::Ram;

/// What a change row names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// A function (account, function name).
    Function,
    /// An access key (account, key id).
    Key,
    /// A layer or one of its versions (account, layer name).
    Layer,
    /// A function's versions or aliases (account, function name).
    Version,
    /// A function's triggers (account, function name).
    Trigger,
    /// A role (account, role name).
    Role,
    /// A custom domain (account, domain name).
    Domain,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Function => "function",
            Self::Key => "key",
            Self::Layer => "layer",
            Self::Version => "version",
            Self::Trigger => "trigger",
            Self::Role => "role",
            Self::Domain => "domain",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "function" => Self::Function,
            "key" => Self::Key,
            "layer" => Self::Layer,
            "version" => Self::Version,
            "trigger" => Self::Trigger,
            "role" => Self::Role,
            "domain" => Self::Domain,
            _ => return None,
        })
    }
}

/// The read without a notification (a lost notification, a connection
/// that died silently) happens this often.
pub const SAFETY_POLL: Duration = Duration::from_secs(3);
/// Change rows are kept this long (a gateway further behind reloads
/// everything).
pub const KEEP_CHANGES_MS: i64 = 10 * 60 * 1000;
/// An unreferenced code zip stays this long after its last write (the
/// row naming it may be on its way from another gateway).
pub const ZIP_GRACE_MS: i64 = 10 * 60 * 1000;
/// How often a gateway purges old change rows and unreferenced zips.
const HOUSEKEEPING: Duration = Duration::from_secs(60);
/// Changes read at once.
const BATCH: i64 = 1000;

/// The views a follower keeps in step.
#[derive(Clone)]
pub struct Views {
    pub catalog: Arc<Catalog>,
    pub ram: Option<Arc<Ram>>,
    pub domains: Option<Arc<Domains>>,
}

/// Why a reload failed (it is retried at the next notification or poll).
#[derive(Debug, thiserror::Error)]
enum ReloadError {
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error(transparent)]
    Roles(#[from] crate::ram::RoleError),
    #[error(transparent)]
    Domains(#[from] crate::domains::DomainsLoadError),
    #[error(transparent)]
    Store(#[from] MetaStoreError),
    #[error("store task failed")]
    Join,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, MetaStoreError> + Send + 'static,
) -> Result<T, ReloadError> {
    Ok(tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| ReloadError::Join)??)
}

/// Follow the change feed from `after` (the newest change when the views
/// were loaded) until `stop` resolves.
pub async fn follow(
    store: PgMetaStore,
    after: i64,
    views: Views,
    stop: impl Future<Output = ()> + Send,
) {
    let mut last = after;
    let mut stop = std::pin::pin!(stop);
    let mut housekeeping = Instant::now() + HOUSEKEEPING;
    loop {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let listener = match listen(store.listen_config().clone(), tx).await {
            Ok(client) => Some(client),
            Err(e) => {
                tracing::warn!(target = store.target(), error = %e, "cannot LISTEN for metadata changes; polling every {}s until it can", SAFETY_POLL.as_secs());
                None
            }
        };
        // Whatever happened while not listening.
        catch_up(&store, &views, &mut last).await;
        loop {
            let lost = tokio::select! {
                _ = &mut stop => return,
                n = rx.recv(), if listener.is_some() => n.is_none(),
                _ = tokio::time::sleep(SAFETY_POLL) => listener.is_none(),
            };
            while rx.try_recv().is_ok() {}
            catch_up(&store, &views, &mut last).await;
            if Instant::now() >= housekeeping {
                housekeeping = Instant::now() + HOUSEKEEPING;
                purge(&store).await;
            }
            if lost {
                if listener.is_some() {
                    tracing::warn!(
                        target = store.target(),
                        "the LISTEN connection for metadata changes closed; reconnecting"
                    );
                }
                break;
            }
        }
        drop(listener);
    }
}

/// A dedicated connection LISTENing on the channel; every notification
/// sends `()` on `tx`, and `tx` drops when the connection ends.
async fn listen(
    config: tokio_postgres::Config,
    tx: mpsc::UnboundedSender<()>,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, mut conn) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => {
                    if tx.send(()).is_err() {
                        break;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "the LISTEN connection failed");
                    break;
                }
                None => break,
            }
        }
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    Ok(client)
}

/// Apply every change after `last`; `last` advances only past what was
/// applied.
async fn catch_up(store: &PgMetaStore, views: &Views, last: &mut i64) {
    loop {
        let (s, from) = (store.clone(), *last);
        let (rows, oldest) = match blocking(move || s.changes_since(from, BATCH)).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the metadata change feed; retrying");
                return;
            }
        };
        if oldest.is_some_and(|o| o > from + 1) {
            // Purged before this gateway read them: everything.
            let s = store.clone();
            let newest = match blocking(move || s.last_change()).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the metadata change feed; retrying");
                    return;
                }
            };
            tracing::info!(
                from,
                newest,
                "metadata changes were purged before this gateway read them; reloading everything"
            );
            match reload_all(views).await {
                Ok(()) => *last = newest,
                Err(e) => tracing::warn!(error = %e, "cannot reload metadata; retrying"),
            }
            return;
        }
        let Some(newest) = rows.last().map(|r| r.seq) else {
            return;
        };
        let full = rows.len() as i64 == BATCH;
        match apply(views, &rows).await {
            Ok(()) => *last = newest,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reload changed metadata; retrying");
                return;
            }
        }
        if !full {
            return;
        }
    }
}

/// Reload what `rows` name: each function by name, each other kind once.
async fn apply(views: &Views, rows: &[ChangeRow]) -> Result<(), ReloadError> {
    let mut functions = BTreeSet::new();
    let mut kinds = BTreeSet::new();
    for r in rows {
        match r.kind {
            Kind::Function => {
                functions.insert((r.account_id.clone(), r.name.clone()));
            }
            k => {
                kinds.insert(k);
            }
        }
    }
    for (account, name) in functions {
        let (Ok(a), Ok(n)) = (account.parse(), name.parse()) else {
            tracing::warn!(%account, %name, "skipping a change naming an invalid function");
            continue;
        };
        views.catalog.refresh_function(&a, &n).await?;
    }
    for k in kinds {
        reload(views, k).await?;
    }
    tracing::debug!(changes = rows.len(), "applied metadata changes");
    Ok(())
}

async fn reload(views: &Views, kind: Kind) -> Result<(), ReloadError> {
    match kind {
        Kind::Function => views.catalog.reload_functions().await?,
        Kind::Key => views.catalog.reload_keys().await?,
        Kind::Layer => views.catalog.reload_layers().await?,
        Kind::Version => views.catalog.reload_versions().await?,
        Kind::Trigger => views.catalog.reload_triggers().await?,
        Kind::Role => {
            if let Some(ram) = &views.ram {
                ram.reload().await?;
            }
        }
        Kind::Domain => {
            if let Some(d) = &views.domains {
                d.reload().await?;
            }
        }
    }
    Ok(())
}

async fn reload_all(views: &Views) -> Result<(), ReloadError> {
    for k in [
        Kind::Function,
        Kind::Key,
        Kind::Layer,
        Kind::Version,
        Kind::Trigger,
        Kind::Role,
        Kind::Domain,
    ] {
        reload(views, k).await?;
    }
    Ok(())
}

/// Drop old change rows and unreferenced zips (any gateway may; each
/// statement is idempotent).
async fn purge(store: &PgMetaStore) {
    let s = store.clone();
    match blocking(move || {
        Ok((
            s.purge_changes(KEEP_CHANGES_MS)?,
            s.collect_zips(ZIP_GRACE_MS)?,
        ))
    })
    .await
    {
        Ok((0, 0)) => {}
        Ok((changes, zips)) => {
            tracing::info!(
                changes,
                zips,
                "purged old metadata changes and unreferenced code zips"
            )
        }
        Err(e) => tracing::warn!(error = %e, "cannot purge old metadata changes"),
    }
}

#[cfg(test)]
mod tests {
    use kiln_test_support::postgres::PgServer;

    use super::*;
    use crate::store::tests::{record, sealer};
    use crate::store::{AccessKey, CodeFiles, MetaStore};

    async fn catalog(store: &PgMetaStore, dir: &std::path::Path) -> Arc<Catalog> {
        let code = CodeFiles::new(dir.to_owned())
            .unwrap()
            .with_source(Arc::new(store.clone()));
        Arc::new(Catalog::open(Arc::new(store.clone()), code).await.unwrap())
    }

    /// A follower applies the changes after the last one it read: one
    /// function by name, keys as a kind; and one that fell behind purged
    /// changes reloads everything.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_follower_applies_changes_and_reloads_all_after_a_gap() {
        let Some(pg) = PgServer::start() else { return };
        let url = pg.create_database("follow");
        let dir = tempfile::tempdir().unwrap();
        let writer = PgMetaStore::open(&url, None, 2, sealer()).unwrap();
        let reader = PgMetaStore::open(&url, None, 2, sealer()).unwrap();
        let ram = Ram::open(
            Arc::new(reader.clone()),
            crate::ram::Sts::new([1; 32]),
            60,
            Arc::new(kiln_core::SystemClock),
        )
        .await
        .unwrap();
        let views = Views {
            catalog: catalog(&reader, dir.path()).await,
            ram: Some(Arc::new(ram)),
            domains: None,
        };
        let a: kiln_core::AccountId = "1".parse().unwrap();
        writer.ensure_account(&a, 1).unwrap();
        let f = record("1", "f", &"a".repeat(64));
        writer.insert_function(&f).unwrap();
        let mut last = 0;
        catch_up(&reader, &views, &mut last).await;
        assert_eq!(last, writer.last_change().unwrap());
        let entry = views.catalog.function(&a, &f.name).unwrap();
        assert_eq!(entry.record, f);

        // A key and a change to another function: the unchanged entry
        // keeps its Arc.
        writer
            .put_access_key(
                &AccessKey {
                    access_key_id: "AK1".into(),
                    account_id: a.clone(),
                    secret: "s".repeat(20),
                },
                1,
            )
            .unwrap();
        writer
            .insert_function(&record("1", "g", &"a".repeat(64)))
            .unwrap();
        let policy = crate::ram::policy::Policy::parse(&serde_json::json!({"Version": "1",
            "Statement": [{"Effect": "Allow", "Action": "fc:GetFunction", "Resource": "*"}]}))
        .unwrap();
        crate::ram::RoleStore::put_role(
            &writer,
            &crate::ram::RoleRecord {
                account_id: a.clone(),
                name: "reader".into(),
                description: String::new(),
                policy,
                created_ms: 1,
                modified_ms: 1,
            },
        )
        .unwrap();
        catch_up(&reader, &views, &mut last).await;
        assert!(views.ram.as_ref().unwrap().role(&a, "reader").is_some());
        assert!(views.catalog.key("AK1").is_some());
        assert!(views.catalog.function(&a, &"g".parse().unwrap()).is_some());
        assert!(Arc::ptr_eq(
            &entry,
            &views.catalog.function(&a, &f.name).unwrap()
        ));

        // Behind purged changes: everything is reloaded.
        writer.delete_function(&a, &f.name).unwrap();
        assert!(writer.set_access_key_enabled("AK1", false).unwrap());
        writer.purge_changes(-60_000).unwrap();
        catch_up(&reader, &views, &mut last).await;
        assert_eq!(last, writer.last_change().unwrap());
        assert!(views.catalog.function(&a, &f.name).is_none());
        assert!(
            views.catalog.key("AK1").is_none(),
            "disabled keys do not sign"
        );
    }
}
