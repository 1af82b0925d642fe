//! PostgreSQL for Kiln's stores in a cluster (several gateways and
//! schedulers sharing one database): a connection pool and versioned
//! migrations.
//!
//! Each service owns a *component* of the schema (`gateway`,
//! `scheduler`) with its own ordered [`Migration`]s, in PostgreSQL's
//! dialect. [`PgDatabase::open`] applies the ones the database lacks in one
//! transaction under an advisory lock, so services of the same version
//! starting together apply each migration exactly once, a failed migration
//! leaves nothing behind, and a database migrated by a newer Kiln is
//! refused rather than written by an older one. The applied version of
//! each component is the row `kiln_schema(component, version)`.
//!
//! Connections go over a unix socket or to a loopback address without TLS.
//! A database on another host is refused until TLS to PostgreSQL is
//! supported: credentials and tenants' data must not cross a network in
//! clear (run PostgreSQL on the control node, or a local TLS proxy).

pub mod leader;
pub mod runtime;

use std::str::FromStr;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::config::Host;
use tokio_postgres::NoTls;

use crate::Migration;

/// Every migration runs under this advisory lock (any 64-bit key works;
/// this one is "kiln" in ASCII).
const MIGRATION_LOCK: i64 = 0x6b69_6c6e;

/// Why a PostgreSQL database could not be opened, migrated or queried.
#[derive(Debug, thiserror::Error)]
pub enum PgStoreError {
    #[error("invalid PostgreSQL URL: {0}")]
    Url(String),
    #[error(
        "PostgreSQL at {0} is neither a unix socket nor a loopback address; Kiln does not speak \
         TLS to PostgreSQL yet, so it refuses to send credentials and data in clear: run the \
         database on this host (or behind a local TLS proxy) and connect over its socket"
    )]
    NotLocal(String),
    #[error("cannot connect to PostgreSQL at {target}")]
    Connect {
        target: String,
        #[source]
        source: deadpool_postgres::PoolError,
    },
    #[error("migration {version} ({name}) of the {component} schema failed")]
    Migration {
        component: &'static str,
        version: usize,
        name: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "the {component} schema in PostgreSQL is at version {found}, newer than this binary \
         knows ({known}); run a newer Kiln or restore a backup"
    )]
    TooNew {
        component: &'static str,
        found: usize,
        known: usize,
    },
    #[error(
        "not the {component} leader (fencing token {token}; the lease is held by {}): \
         nothing was written",
        leader.as_deref().unwrap_or("no one")
    )]
    NotLeader {
        component: String,
        token: i64,
        leader: Option<String>,
    },
    #[error("cannot read the PostgreSQL password file {path}")]
    PasswordFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("PostgreSQL query failed")]
    Query(#[from] tokio_postgres::Error),
    #[error("cannot build the PostgreSQL pool: {0}")]
    Pool(String),
}

/// A pooled PostgreSQL database holding one service's component of
/// Kiln's schema.
#[derive(Clone)]
pub struct PgDatabase {
    pool: Pool,
    /// Where it is, without credentials, for messages.
    target: String,
}

impl std::fmt::Debug for PgDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgDatabase")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// The connection settings of `url` (a `postgresql://` URL or `key=value`
/// string) with the password read from `password_file`, if any (one
/// trailing newline ignored): for a pool, or a connection of its own such
/// as a LISTEN.
pub fn connect_config(
    url: &str,
    password_file: Option<&std::path::Path>,
) -> Result<tokio_postgres::Config, PgStoreError> {
    let mut config =
        tokio_postgres::Config::from_str(url).map_err(|e| PgStoreError::Url(e.to_string()))?;
    if let Some(path) = password_file {
        let text = std::fs::read_to_string(path).map_err(|source| PgStoreError::PasswordFile {
            path: path.to_owned(),
            source,
        })?;
        let password = text.strip_suffix('\n').unwrap_or(&text);
        config.password(password.strip_suffix('\r').unwrap_or(password));
    }
    Ok(config)
}

impl PgDatabase {
    /// Connect to `url` (a `postgresql://` URL or `key=value` string) with
    /// up to `max_connections`, and bring `component`'s schema up to
    /// `migrations`.
    pub async fn open(
        url: &str,
        max_connections: usize,
        component: &'static str,
        migrations: &[Migration],
    ) -> Result<Self, PgStoreError> {
        Self::open_with(url, None, max_connections, component, migrations).await
    }

    /// [`Self::open`] with the password read from `password_file` (a
    /// systemd credential: the URL itself may sit in the Nix store, the
    /// password must not). One trailing newline is ignored.
    pub async fn open_with(
        url: &str,
        password_file: Option<&std::path::Path>,
        max_connections: usize,
        component: &'static str,
        migrations: &[Migration],
    ) -> Result<Self, PgStoreError> {
        let config = connect_config(url, password_file)?;
        let target = describe(&config);
        if !is_local(&config) {
            return Err(PgStoreError::NotLocal(target));
        }
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(max_connections.max(1))
            .build()
            .map_err(|e| PgStoreError::Pool(e.to_string()))?;
        let db = Self { pool, target };
        db.migrate(component, migrations).await?;
        Ok(db)
    }

    /// A connection from the pool.
    pub async fn conn(&self) -> Result<deadpool_postgres::Object, PgStoreError> {
        self.pool
            .get()
            .await
            .map_err(|source| PgStoreError::Connect {
                target: self.target.clone(),
                source,
            })
    }

    /// Where the database is, without credentials.
    pub fn target(&self) -> &str {
        &self.target
    }

    async fn migrate(
        &self,
        component: &'static str,
        migrations: &[Migration],
    ) -> Result<(), PgStoreError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS kiln_schema (
                component TEXT PRIMARY KEY,
                version INTEGER NOT NULL
            )",
        )
        .await?;
        let found: i32 = tx
            .query_opt(
                "SELECT version FROM kiln_schema WHERE component = $1",
                &[&component],
            )
            .await?
            .map_or(0, |row| row.get(0));
        let found = usize::try_from(found).unwrap_or(0);
        if found > migrations.len() {
            return Err(PgStoreError::TooNew {
                component,
                found,
                known: migrations.len(),
            });
        }
        for (i, m) in migrations.iter().enumerate().skip(found) {
            let version = i + 1;
            tx.batch_execute(m.sql)
                .await
                .map_err(|source| PgStoreError::Migration {
                    component,
                    version,
                    name: m.name,
                    source,
                })?;
            tracing::info!(component, version, name = m.name, target = %self.target, "applied PostgreSQL migration");
        }
        if migrations.len() > found {
            tx.execute(
                "INSERT INTO kiln_schema (component, version) VALUES ($1, $2)
                 ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version",
                &[&component, &(migrations.len() as i32)],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Unix sockets and loopback addresses only (see the module docs).
fn is_local(config: &tokio_postgres::Config) -> bool {
    let hosts = config.get_hosts();
    !hosts.is_empty()
        && hosts.iter().all(|h| match h {
            Host::Unix(_) => true,
            Host::Tcp(name) => {
                name == "localhost"
                    || name
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
        })
}

fn describe(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Unix(p) => p.display().to_string(),
            Host::Tcp(n) => n.clone(),
        })
        .collect();
    format!(
        "{} database {}",
        if hosts.is_empty() {
            "(no host)".to_owned()
        } else {
            hosts.join(",")
        },
        config.get_dbname().unwrap_or("(default)")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(url: &str) -> bool {
        is_local(&tokio_postgres::Config::from_str(url).unwrap())
    }

    #[test]
    fn only_sockets_and_loopback_are_local() {
        assert!(local("host=/run/postgresql dbname=kiln"));
        assert!(local("postgresql://kiln@localhost/kiln"));
        assert!(local("postgresql://kiln@127.0.0.1:5432/kiln"));
        assert!(local("postgresql://kiln@[::1]/kiln"));
        assert!(!local("postgresql://kiln:pw@db.example.com/kiln"));
        assert!(!local("postgresql://kiln@10.0.0.5/kiln"));
        assert!(!local("postgresql://kiln@localhost,10.0.0.5/kiln"));
        assert!(!local("dbname=kiln"), "no host at all is not assumed local");
    }

    #[tokio::test]
    async fn a_remote_database_is_refused_before_connecting() {
        let err = PgDatabase::open(
            "postgresql://kiln:secret@db.example.com/kiln",
            2,
            "gateway",
            &[],
        )
        .await
        .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, PgStoreError::NotLocal(_)), "{text}");
        assert!(
            !text.contains("secret"),
            "the password never reaches a message"
        );
        assert!(text.contains("db.example.com"));
    }
}
