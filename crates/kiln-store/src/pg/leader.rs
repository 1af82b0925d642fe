//! One leader among several services of a kind (the schedulers of a
//! cluster), elected through PostgreSQL, with a fencing token.
//!
//! The row `kiln_leader(component)` names the holder, its token and when
//! its lease ends, all by the database's clock (never a service's). A
//! candidate takes the lease when it is free or expired, which bumps the
//! token; the holder renews it well before it ends. Every write a leader
//! makes goes through [`Leadership::fenced`], a transaction that first
//! locks the row and checks that this holder, with this token, still holds
//! an unexpired lease; a leader paused past its lease (a long GC, a frozen
//! VM, a partition) finds another holder or a newer token and fails with
//! [`PgStoreError::NotLeader`] before it writes anything. While a fenced
//! transaction runs, its row lock keeps any candidate from taking over, so
//! no write lands after a takeover either.

use std::time::Duration;

use super::{PgDatabase, PgStoreError};

/// The lease table's migration, part of every component that elects.
pub const LEADER_TABLE: &str = "
    CREATE TABLE IF NOT EXISTS kiln_leader (
        component TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        token BIGINT NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL
    );";

/// What a candidate learned from one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Election {
    /// This candidate holds the lease, with this fencing token.
    Leader { token: i64 },
    /// Another holds it (its name, for redirecting callers).
    Follower { leader: String },
}

/// A candidate for one component's leadership.
#[derive(Debug, Clone)]
pub struct Leadership {
    db: PgDatabase,
    component: String,
    holder: String,
    lease: Duration,
}

impl Leadership {
    /// `holder` names this candidate (its advertised address: followers
    /// redirect there); `lease` is how long a lease lasts unrenewed.
    pub async fn new(
        db: PgDatabase,
        component: &str,
        holder: &str,
        lease: Duration,
    ) -> Result<Self, PgStoreError> {
        db.conn().await?.batch_execute(LEADER_TABLE).await?;
        Ok(Self {
            db,
            component: component.to_owned(),
            holder: holder.to_owned(),
            lease,
        })
    }

    /// Take the lease if it is free, expired or already ours (renewing
    /// it), else learn who holds it. A takeover bumps the token; a renewal
    /// keeps it.
    pub async fn campaign(&self) -> Result<Election, PgStoreError> {
        let conn = self.db.conn().await?;
        let lease_ms = self.lease.as_millis() as f64;
        let row = conn
            .query_opt(
                "INSERT INTO kiln_leader AS l (component, holder, token, expires_at)
                 VALUES ($1, $2, 1, now() + $3 * interval '1 millisecond')
                 ON CONFLICT (component) DO UPDATE SET
                     holder = EXCLUDED.holder,
                     token = CASE WHEN l.holder = EXCLUDED.holder AND l.expires_at > now()
                                  THEN l.token ELSE l.token + 1 END,
                     expires_at = EXCLUDED.expires_at
                 WHERE l.holder = EXCLUDED.holder OR l.expires_at <= now()
                 RETURNING token",
                &[&self.component, &self.holder, &lease_ms],
            )
            .await?;
        match row {
            Some(row) => Ok(Election::Leader { token: row.get(0) }),
            // The conditional update matched nothing: someone else holds it.
            None => {
                let leader: String = conn
                    .query_one(
                        "SELECT holder FROM kiln_leader WHERE component = $1",
                        &[&self.component],
                    )
                    .await?
                    .get(0);
                Ok(Election::Follower { leader })
            }
        }
    }

    /// Give the lease up at once (a clean shutdown), if it is ours.
    pub async fn resign(&self, token: i64) -> Result<(), PgStoreError> {
        self.db
            .conn()
            .await?
            .execute(
                "UPDATE kiln_leader SET expires_at = now()
                 WHERE component = $1 AND holder = $2 AND token = $3",
                &[&self.component, &self.holder, &token],
            )
            .await?;
        Ok(())
    }

    /// Run `write` in a transaction that commits only while this holder,
    /// with `token`, holds an unexpired lease; the row stays locked until
    /// it ends, so no candidate takes over in between.
    pub async fn fenced<T, F>(&self, token: i64, write: F) -> Result<T, PgStoreError>
    where
        F: for<'t> FnOnce(
            &'t tokio_postgres::Transaction<'t>,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, PgStoreError>> + Send + 't>,
        >,
    {
        let mut conn = self.db.conn().await?;
        let tx = conn.transaction().await?;
        let current = tx
            .query_opt(
                "SELECT holder, token, expires_at > now() FROM kiln_leader
                 WHERE component = $1 FOR UPDATE",
                &[&self.component],
            )
            .await?;
        let fresh = matches!(&current, Some(row)
            if row.get::<_, String>(0) == self.holder
                && row.get::<_, i64>(1) == token
                && row.get::<_, bool>(2));
        if !fresh {
            return Err(PgStoreError::NotLeader {
                component: self.component.clone(),
                token,
                leader: current.map(|r| r.get::<_, String>(0)),
            });
        }
        let out = write(&tx).await?;
        tx.commit().await?;
        Ok(out)
    }
}
