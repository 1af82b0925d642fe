//! `kiln store copy`: a one-box install's SQLite state into the
//! PostgreSQL database of a cluster: a scheduler's state directory
//! (scheduler.db, [`kiln_scheduler::store::copy`]) and a gateway's
//! (gateway.db and its code packages, [`kiln_gateway::store::copy`];
//! its async queue, queue.db, [`kiln_gateway::queue::copy`]).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use kiln_gateway::store::postgres::PgMetaStore;
use kiln_gateway::store::{CodeFiles, SqliteStore};
use kiln_scheduler::{PgSchedulerStore, SqliteSchedulerStore};
use kiln_store::seal::{load_key_file, Sealer};

pub struct CopyArgs<'a> {
    pub from: &'a Path,
    pub to: &'a str,
    pub from_key_file: Option<&'a Path>,
    pub key_file: Option<&'a Path>,
    pub password_file: Option<&'a Path>,
}

fn sealer(path: &Path) -> Result<Arc<Sealer>> {
    let key = load_key_file(path)
        .with_context(|| format!("cannot load the sealing key {}", path.display()))?;
    Ok(Arc::new(Sealer::new(&key, &[])))
}

/// Copy whatever `--from` holds: a scheduler's state, a gateway's, or
/// both (a directory holding both files).
pub fn copy(a: &CopyArgs<'_>) -> Result<()> {
    let scheduler = a.from.join("scheduler.db");
    let gateway = a.from.join("gateway.db");
    if !scheduler.is_file() && !gateway.is_file() && !a.from.join(QUEUE_DB).is_file() {
        anyhow::bail!(
            "{} does not exist, nor {}: --from names the scheduler's or the gateway's state \
             directory",
            scheduler.display(),
            gateway.display()
        );
    }
    let from_key = a
        .from_key_file
        .map(Path::to_owned)
        .unwrap_or_else(|| a.from.join("secrets.key"));
    if scheduler.is_file() {
        copy_scheduler(a, &scheduler, &from_key)?;
    }
    if gateway.is_file() {
        copy_gateway_metadata(a, &gateway, &from_key)?;
    }
    // The gateway's async queue (queue.db: messages, task events, async
    // configurations, destinations outbox): component `gateway-queue`.
    if a.from.join(QUEUE_DB).is_file() {
        copy_gateway_queue(a.from, a.to, a.password_file)?;
    }
    Ok(())
}

fn copy_scheduler(a: &CopyArgs<'_>, db: &Path, from_key: &Path) -> Result<()> {
    let source = SqliteSchedulerStore::open(db, sealer(from_key)?)
        .with_context(|| format!("cannot open {}", db.display()))?;
    let target = PgSchedulerStore::open_with(
        a.to,
        a.password_file,
        sealer(a.key_file.unwrap_or(from_key))?,
    )
    .context("cannot open the cluster's PostgreSQL database")?;
    let copied = kiln_scheduler::store::copy::copy(&source, &target)?;
    println!("copied {copied} from {} into PostgreSQL", db.display());
    Ok(())
}

/// The gateway's metadata and code packages (`gateway.db`, `code/`).
fn copy_gateway_metadata(a: &CopyArgs<'_>, db: &Path, from_key: &Path) -> Result<()> {
    let from_sealer = sealer(from_key)?;
    let to_sealer = sealer(a.key_file.unwrap_or(from_key))?;
    let source = SqliteStore::open(db, from_sealer.clone())
        .with_context(|| format!("cannot open {}", db.display()))?;
    let code = CodeFiles::new(a.from.join("code"))
        .with_context(|| format!("cannot open {}", a.from.join("code").display()))?;
    let target = PgMetaStore::open(a.to, a.password_file, 4, to_sealer.clone())
        .context("cannot open the cluster's PostgreSQL database")?;
    let copied =
        kiln_gateway::store::copy::copy(&source, &from_sealer, &code, &target, &to_sealer)?;
    println!("copied {copied} from {} into PostgreSQL", db.display());
    Ok(())
}

/// The gateway's async queue file in its state directory.
const QUEUE_DB: &str = "queue.db";

/// Copy a stopped one-box gateway's async queue (`FROM/queue.db`: every
/// task with its events, the destinations outbox, the async invoke
/// configs) into the cluster's empty shared queue at `to`.
pub fn copy_gateway_queue(from: &Path, to: &str, password_file: Option<&Path>) -> Result<()> {
    let db = from.join(QUEUE_DB);
    if !db.is_file() {
        anyhow::bail!(
            "{} does not exist: --from names the gateway's state directory",
            db.display()
        );
    }
    let (path, url, password) = (db.clone(), to.to_owned(), password_file.map(Path::to_owned));
    // Its own runtime on its own thread: this may be called from async code.
    let copied = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let now = kiln_core::Clock::now_ms(&kiln_core::SystemClock);
        rt.block_on(kiln_gateway::queue::copy::copy_from_sqlite(
            &path,
            &url,
            password.as_deref(),
            now,
        ))
        .map_err(anyhow::Error::from)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the queue copy panicked"))?
    .context("cannot copy the gateway's async queue")?;
    println!("copied {copied} from {} into PostgreSQL", db.display());
    Ok(())
}
