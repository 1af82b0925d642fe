//! Plumbing for Kiln's stores: SQLite here, PostgreSQL in [`pg`].
//!
//! Each database has exactly one owning service; that service defines its
//! store trait and schema and opens the file through [`Database::open`],
//! which applies WAL, the pragmas Kiln relies on and the service's
//! versioned migrations, in one transaction per migration.
#![forbid(unsafe_code)]

pub mod pg;
pub mod seal;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

/// Why a database could not be opened, migrated or queried.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Cannot open database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("Migration {version} ({name}) failed")]
    Migration {
        version: usize,
        name: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "Database {path} has schema version {found}, newer than this binary knows ({known}); \
         run a newer Kiln or restore a backup"
    )]
    TooNew {
        path: PathBuf,
        found: usize,
        known: usize,
    },
    #[error("Database query failed")]
    Sqlite(#[from] rusqlite::Error),
    #[error("Database task panicked or was cancelled")]
    Join,
}

/// One schema step. Migrations are applied in order and never edited once
/// released: add a new one instead.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub name: &'static str,
    pub sql: &'static str,
}

/// A SQLite database owned by one service: one connection behind a mutex,
/// used from tokio through `spawn_blocking`.
#[derive(Clone)]
pub struct Database {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl Database {
    /// Open (creating if needed) and migrate.
    pub fn open(path: &Path, migrations: &[Migration]) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })?;
        Self::setup(conn, path, migrations)
    }

    /// A private in-memory database, for tests.
    pub fn open_in_memory(migrations: &[Migration]) -> Result<Self, StoreError> {
        let conn = Connection::open_in_memory()?;
        Self::setup(conn, Path::new(":memory:"), migrations)
    }

    fn setup(
        mut conn: Connection,
        path: &Path,
        migrations: &[Migration],
    ) -> Result<Self, StoreError> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // WAL with synchronous=FULL: a committed transaction survives power
        // loss, which the async queue's "202 means durable" relies on.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn, path, migrations)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Run `f` with the connection on the calling thread.
    pub fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn)
    }

    /// Run `f` with the connection on tokio's blocking pool.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.clone();
        tokio::task::spawn_blocking(move || db.with_conn(f))
            .await
            .map_err(|_| StoreError::Join)?
    }
}

fn migrate(conn: &mut Connection, path: &Path, migrations: &[Migration]) -> Result<(), StoreError> {
    let current: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if current > migrations.len() {
        return Err(StoreError::TooNew {
            path: path.to_owned(),
            found: current,
            known: migrations.len(),
        });
    }
    for (i, m) in migrations.iter().enumerate().skip(current) {
        let version = i + 1;
        let err = |source| StoreError::Migration {
            version,
            name: m.name,
            source,
        };
        let tx = conn.transaction().map_err(err)?;
        tx.execute_batch(m.sql).map_err(err)?;
        tx.pragma_update(None, "user_version", version)
            .map_err(err)?;
        tx.commit().map_err(err)?;
        tracing::info!(db = %path.display(), version, name = m.name, "applied migration");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: Migration = Migration {
        name: "things",
        sql: "CREATE TABLE things (id INTEGER PRIMARY KEY, name TEXT NOT NULL);",
    };
    const V2: Migration = Migration {
        name: "things.size",
        sql: "ALTER TABLE things ADD COLUMN size INTEGER NOT NULL DEFAULT 0;",
    };

    #[test]
    fn migrations_apply_once_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let db = Database::open(&path, &[V1]).unwrap();
        db.with_conn(|c| Ok(c.execute("INSERT INTO things (name) VALUES ('a')", [])?))
            .unwrap();
        drop(db);
        let db = Database::open(&path, &[V1, V2]).unwrap();
        let (n, size): (i64, i64) = db
            .with_conn(|c| {
                Ok(
                    c.query_row("SELECT count(*), sum(size) FROM things", [], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })?,
                )
            })
            .unwrap();
        assert_eq!((n, size), (1, 0));
        let mode: String = db
            .with_conn(|c| Ok(c.pragma_query_value(None, "journal_mode", |r| r.get(0))?))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        Database::open(&path, &[V1, V2]).unwrap();
        let err = Database::open(&path, &[V1]).err().unwrap();
        assert!(matches!(
            err,
            StoreError::TooNew {
                found: 2,
                known: 1,
                ..
            }
        ));
    }

    #[test]
    fn a_failing_migration_leaves_the_old_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        Database::open(&path, &[V1]).unwrap();
        let bad = Migration {
            name: "bad",
            sql: "CREATE TABLE x (a); SELECT * FROM nope;",
        };
        assert!(Database::open(&path, &[V1, bad]).is_err());
        let db = Database::open(&path, &[V1, V2]).unwrap();
        let has_x: i64 = db
            .with_conn(|c| {
                Ok(c.query_row(
                    "SELECT count(*) FROM sqlite_master WHERE name = 'x'",
                    [],
                    |r| r.get(0),
                )?)
            })
            .unwrap();
        assert_eq!(has_x, 0);
    }
}
