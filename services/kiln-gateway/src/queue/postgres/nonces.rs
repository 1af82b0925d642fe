//! Signature nonces in the cluster's database, group-committed.
//!
//! `signature_nonces(access_key_id, nonce, expires_ms)`: a signed request's
//! nonce is new when no row holds it, or the row holding it expired. A
//! check was a transaction of its own, one flushed commit per signed
//! request. Now a writer takes every claim waiting and records them in
//! one `INSERT ... SELECT FROM unnest(...) ON CONFLICT DO UPDATE ... WHERE
//! expired RETURNING`: one round trip and one commit for the batch, and
//! each caller is answered after that commit, so a nonce reported new is
//! durable before its request goes on. The conflict is still decided by
//! the primary key, whichever gateway's commit came first. Measured
//! (docs/ha.md): 32 callers check 2.5 times as many nonces a second, ten
//! to a commit; one caller alone waits a few tens of microseconds longer
//! for the writer's hop.
//!
//! Within one batch the first claim of a (key, nonce) pair is recorded and
//! the others are replays (the same statement cannot touch a row twice).
//! An existing record is replaced only if it expired before the earliest
//! `now` of the batch: a clock a few milliseconds behind refuses a nonce at
//! its very expiry, never accepts one early. If a batch fails, each claim
//! is tried alone, so one bad claim fails only its own request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kiln_store::pg::{PgDatabase, PgStoreError};
use tokio::sync::{mpsc, oneshot};

use super::write::take_batch;
use crate::auth::{BoxFuture, SharedNonces};

/// The most claims one statement records.
const BATCH_MAX: usize = 512;
/// Writers one gateway runs: while one batch waits for its flush, the
/// next is collected and written.
const WRITERS: usize = 2;

const CLAIM_MANY: &str = "
    INSERT INTO signature_nonces (access_key_id, nonce, expires_ms)
    SELECT k, n, e FROM unnest($1::text[], $2::text[], $3::bigint[]) AS u(k, n, e)
    ON CONFLICT (access_key_id, nonce) DO UPDATE SET expires_ms = EXCLUDED.expires_ms
    WHERE signature_nonces.expires_ms < $4
    RETURNING access_key_id, nonce";

struct Claim {
    access_key_id: String,
    nonce: String,
    expires_ms: u64,
    now_ms: u64,
    reply: oneshot::Sender<Result<bool, String>>,
}

/// Signature nonces in the cluster's database.
pub struct PgNonces {
    tx: mpsc::UnboundedSender<Claim>,
    counts: Arc<Counts>,
}

/// Claims answered and statements that recorded them.
#[derive(Default)]
struct Counts {
    claims: AtomicU64,
    batches: AtomicU64,
}

impl PgNonces {
    /// The nonce record in `db` (migrated with the queue's migrations);
    /// its writers run until this value is dropped.
    pub fn new(db: PgDatabase) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let counts = Arc::new(Counts::default());
        for _ in 0..WRITERS {
            tokio::spawn(writer(db.clone(), rx.clone(), counts.clone()));
        }
        Self { tx, counts }
    }

    /// Claims recorded per statement so far (group commit at work: 1.0
    /// when callers never overlap).
    pub fn claims_per_batch(&self) -> f64 {
        let batches = self.counts.batches.load(Ordering::Relaxed);
        if batches == 0 {
            return 0.0;
        }
        self.counts.claims.load(Ordering::Relaxed) as f64 / batches as f64
    }
}

impl SharedNonces for PgNonces {
    fn claim(
        &self,
        access_key_id: &str,
        nonce: &str,
        expires_ms: u64,
        now_ms: u64,
    ) -> BoxFuture<Result<bool, String>> {
        let (reply, answer) = oneshot::channel();
        let sent = self.tx.send(Claim {
            access_key_id: access_key_id.to_owned(),
            nonce: nonce.to_owned(),
            expires_ms,
            now_ms,
            reply,
        });
        Box::pin(async move {
            sent.map_err(|_| "the nonce writers have stopped".to_owned())?;
            answer
                .await
                .map_err(|_| "the nonce writer ended before answering".to_owned())?
        })
    }
}

/// One writer: takes every claim waiting (the other takes the next ones
/// while this one commits) and records them in one statement.
async fn writer(
    db: PgDatabase,
    rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Claim>>>,
    counts: Arc<Counts>,
) {
    loop {
        let Some(claims) = take_batch(&rx, BATCH_MAX).await else {
            return;
        };
        match record(&db, &claims).await {
            Ok(fresh) => {
                counts.batches.fetch_add(1, Ordering::Relaxed);
                counts
                    .claims
                    .fetch_add(claims.len() as u64, Ordering::Relaxed);
                for (c, fresh) in claims.into_iter().zip(fresh) {
                    let _ = c.reply.send(Ok(fresh));
                }
            }
            Err(e) if claims.len() == 1 => {
                let why = kiln_core::error_chain(&e);
                tracing::warn!(error = %why, "cannot check a signature nonce");
                for c in claims {
                    let _ = c.reply.send(Err(why.clone()));
                }
            }
            Err(e) => {
                tracing::warn!(error = %kiln_core::error_chain(&e), claims = claims.len(), "nonce batch failed; checking its claims one by one");
                for c in claims {
                    let one = record(&db, std::slice::from_ref(&c)).await;
                    let answer = one.map(|f| f[0]).map_err(|e| {
                        let why = kiln_core::error_chain(&e);
                        tracing::warn!(error = %why, "cannot check a signature nonce");
                        why
                    });
                    let _ = c.reply.send(answer);
                }
            }
        }
    }
}

/// Record `claims` in one statement (its own transaction): for each,
/// whether its nonce was new.
async fn record(db: &PgDatabase, claims: &[Claim]) -> Result<Vec<bool>, PgStoreError> {
    // Each (key, nonce) once, by its first claim; later ones are replays.
    let mut first: HashMap<(&str, &str), usize> = HashMap::with_capacity(claims.len());
    for (i, c) in claims.iter().enumerate() {
        first
            .entry((c.access_key_id.as_str(), c.nonce.as_str()))
            .or_insert(i);
    }
    let (mut keys, mut nonces, mut expiries) = (Vec::new(), Vec::new(), Vec::new());
    for (&(key, nonce), &i) in &first {
        keys.push(key);
        nonces.push(nonce);
        expiries.push(clamp(claims[i].expires_ms));
    }
    let now = clamp(claims.iter().map(|c| c.now_ms).min().unwrap_or(0));
    let c = db.conn().await?;
    let st = c.prepare_cached(CLAIM_MANY).await?;
    let rows = c.query(&st, &[&keys, &nonces, &expiries, &now]).await?;
    let mut fresh = vec![false; claims.len()];
    for r in &rows {
        if let Some(&i) = first.get(&(r.get::<_, &str>(0), r.get::<_, &str>(1))) {
            fresh[i] = true;
        }
    }
    Ok(fresh)
}

/// Milliseconds as PostgreSQL's BIGINT (a far-future expiry saturates).
fn clamp(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}
