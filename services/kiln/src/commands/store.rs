//! `kiln store copy`: a one-box scheduler's SQLite state into the
//! PostgreSQL database of a scheduler cluster
//! ([`kiln_scheduler::store::copy`]).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
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

pub fn copy(a: &CopyArgs<'_>) -> Result<()> {
    let db = a.from.join("scheduler.db");
    if !db.is_file() {
        anyhow::bail!(
            "{} does not exist: --from names the scheduler's state directory",
            db.display()
        );
    }
    let from_key = a
        .from_key_file
        .map(Path::to_owned)
        .unwrap_or_else(|| a.from.join("secrets.key"));
    let source = SqliteSchedulerStore::open(&db, sealer(&from_key)?)
        .with_context(|| format!("cannot open {}", db.display()))?;
    let target = PgSchedulerStore::open_with(
        a.to,
        a.password_file,
        sealer(a.key_file.unwrap_or(&from_key))?,
    )
    .context("cannot open the cluster's PostgreSQL database")?;
    let copied = kiln_scheduler::store::copy::copy(&source, &target)?;
    println!("copied {copied} from {} into PostgreSQL", db.display());
    Ok(())
}
