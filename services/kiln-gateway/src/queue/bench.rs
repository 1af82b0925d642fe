//! Measuring durable async accepts on the shared queue (PostgreSQL)
//! against raw PostgreSQL inserts with the same durability, in one run
//! (`benches/async_queue.rs` target `pg`; callable from `kiln bench`).
//!
//! Both sides write one row per request with `synchronous_commit = on`
//! (set on the database, so every session of both has it), from the same
//! number of concurrent callers, the same payload, against the same
//! server: the queue's callers wait for its group commit (one writer
//! transaction per gateway takes every waiting enqueue), the raw callers
//! each commit their own `INSERT` on their own connection (PostgreSQL's
//! WAL flush is shared by commits that land together, its own group
//! commit). The figures only compare within one run on one machine.
//!
//! It also times the shared nonce check (group-committed claims, see
//! `postgres/nonces.rs`), from one caller and from as many as the others:
//! what a cluster adds to every signed call.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_store::pg::{PgDatabase, PgStoreError};

use super::postgres::{PgQueue, COMPONENT, MIGRATIONS};
use super::{NewMessage, Queue};

/// One measurement.
#[derive(Debug, Clone, Copy, Default)]
pub struct AcceptRate {
    /// Requests acknowledged (committed) per second.
    pub rate: f64,
    pub p50: Duration,
    pub p99: Duration,
    /// Rows per commit (the queue's group commit; 1 for raw inserts).
    pub per_commit: f64,
}

impl std::fmt::Display for AcceptRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>7.0}/s p50 {:>5.2} ms p99 {:>6.2} ms, {:>5.1} rows per commit",
            self.rate,
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.per_commit
        )
    }
}

/// The medians of several rounds of both.
#[derive(Debug, Clone, Copy, Default)]
pub struct PgAcceptComparison {
    pub queue: AcceptRate,
    pub raw: AcceptRate,
    /// The shared nonce check a signed request pays in a cluster: one
    /// caller (its latency is the warm path's added cost) ...
    pub nonce_one: AcceptRate,
    /// ... and as many callers as the others.
    pub nonce_many: AcceptRate,
}

impl PgAcceptComparison {
    /// The queue's rate as a share of raw inserts'.
    pub fn ratio(&self) -> f64 {
        self.queue.rate / self.raw.rate.max(f64::MIN_POSITIVE)
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn median(mut v: Vec<AcceptRate>) -> AcceptRate {
    if v.is_empty() {
        return AcceptRate::default();
    }
    let mid = v.len() / 2;
    let by = |f: fn(&AcceptRate) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        x[mid]
    };
    let (p50, p99) = (
        Duration::from_secs_f64(by(|a| a.p50.as_secs_f64())),
        Duration::from_secs_f64(by(|a| a.p99.as_secs_f64())),
    );
    let per_commit = by(|a| a.per_commit);
    v.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    AcceptRate {
        rate: v[mid].rate,
        p50,
        p99,
        per_commit,
    }
}

async fn gather(
    started: Instant,
    tasks: Vec<tokio::task::JoinHandle<Result<Vec<Duration>, String>>>,
) -> Result<(f64, Vec<Duration>), String> {
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.map_err(|e| e.to_string())??);
    }
    let rate = lat.len() as f64 / started.elapsed().as_secs_f64();
    lat.sort();
    Ok((rate, lat))
}

/// `callers` concurrent enqueues on `queue` for `secs`, `round` keeping
/// task ids apart between rounds.
pub async fn queue_accepts(
    queue: &Queue,
    round: usize,
    secs: u64,
    callers: usize,
    payload: &[u8],
) -> Result<AcceptRate, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let batches = queue.batches();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..callers {
        let (queue, stop, payload) = (queue.clone(), stop.clone(), payload.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let account = format!("{}", 1_000_000 + c % 8);
                let m = NewMessage {
                    account: account.parse().expect("digits"),
                    function: "bench".parse().expect("a name"),
                    queue: account,
                    task_id: format!("r{round}-c{c}-{i}"),
                    request_id: format!("r{round}-{c}-{i}"),
                    payload: payload.clone(),
                    headers: vec![("content-type".into(), "application/octet-stream".into())],
                    now_ms: 1,
                    depth_limit: None,
                };
                let t = Instant::now();
                queue.enqueue(m).await.map_err(|e| e.to_string())?;
                lat.push(t.elapsed());
                i += 1;
            }
            Ok(lat)
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let (rate, lat) = gather(started, tasks).await?;
    let commits = queue.batches() - batches;
    Ok(AcceptRate {
        rate,
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
        per_commit: lat.len() as f64 / commits.max(1) as f64,
    })
}

/// `callers` connections each committing one `INSERT` per request (a row
/// shaped like a message: a unique task id and the payload) for `secs`.
pub async fn raw_inserts(
    config: &tokio_postgres::Config,
    round: usize,
    secs: u64,
    callers: usize,
    payload: &[u8],
) -> Result<AcceptRate, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..callers {
        let (client, conn) = config
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        clients.push(client);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (c, client) in clients.into_iter().enumerate() {
        let (stop, payload) = (stop.clone(), payload.to_vec());
        tasks.push(tokio::spawn(async move {
            let st = client
                .prepare("INSERT INTO bench_raw_accepts (task, payload) VALUES ($1, $2)")
                .await
                .map_err(|e| e.to_string())?;
            let mut lat = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let task = format!("r{round}-c{c}-{i}");
                let t = Instant::now();
                client
                    .execute(&st, &[&task, &payload])
                    .await
                    .map_err(|e| e.to_string())?;
                lat.push(t.elapsed());
                i += 1;
            }
            Ok(lat)
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let (rate, lat) = gather(started, tasks).await?;
    Ok(AcceptRate {
        rate,
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
        per_commit: 1.0,
    })
}

/// `callers` concurrent shared nonce claims (each a new nonce, as signed
/// requests are) for `secs`.
pub async fn nonce_claims(
    db: &PgDatabase,
    round: usize,
    secs: u64,
    callers: usize,
) -> Result<AcceptRate, String> {
    use crate::auth::SharedNonces;
    let nonces = Arc::new(super::cluster::PgNonces::new(db.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..callers {
        let (nonces, stop) = (nonces.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let nonce = format!("r{round}-c{c}-{i}");
                let t = Instant::now();
                let fresh = nonces.claim("AKBENCH", &nonce, u64::MAX / 2, 1).await?;
                if !fresh {
                    return Err(format!("nonce {nonce} refused"));
                }
                lat.push(t.elapsed());
                i += 1;
            }
            Ok(lat)
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let (rate, lat) = gather(started, tasks).await?;
    Ok(AcceptRate {
        rate,
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
        per_commit: nonces.claims_per_batch(),
    })
}

/// Both, alternating, `rounds` times, on the database at `url` (it gets
/// the queue's tables, a `bench_raw_accepts` table, and
/// `synchronous_commit = on` for every session); the medians.
pub async fn compare_pg_accepts(
    url: &str,
    secs: u64,
    callers: usize,
    payload: &[u8],
    rounds: usize,
) -> Result<PgAcceptComparison, String> {
    let err = |e: PgStoreError| kiln_core::error_chain(&e);
    let db = PgDatabase::open(url, callers.max(4), COMPONENT, MIGRATIONS)
        .await
        .map_err(err)?;
    let config: tokio_postgres::Config = url.parse().map_err(|e| format!("{e}"))?;
    {
        let c = db.conn().await.map_err(err)?;
        let name: String = c
            .query_one("SELECT current_database()", &[])
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        c.batch_execute(&format!(
            "ALTER DATABASE \"{}\" SET synchronous_commit = on;
             CREATE TABLE IF NOT EXISTS bench_raw_accepts (
                 id BIGSERIAL PRIMARY KEY,
                 task TEXT NOT NULL UNIQUE,
                 payload BYTEA NOT NULL
             );",
            name.replace('"', "\"\"")
        ))
        .await
        .map_err(|e| e.to_string())?;
    }
    // Sessions opened from now on have the setting: a fresh pool.
    drop(db);
    let db = PgDatabase::open(url, callers.max(4), COMPONENT, MIGRATIONS)
        .await
        .map_err(err)?;
    {
        let c = db.conn().await.map_err(err)?;
        let on: String = c
            .query_one("SHOW synchronous_commit", &[])
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        if on != "on" {
            return Err(format!("synchronous_commit is {on}, not on"));
        }
    }
    let queue = Queue::postgres(PgQueue::new(db.clone(), "bench"));
    let (mut q, mut r, mut n1, mut nn) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds.max(1) {
        q.push(queue_accepts(&queue, round, secs, callers, payload).await?);
        r.push(raw_inserts(&config, round, secs, callers, payload).await?);
        n1.push(nonce_claims(&db, 2 * round, secs, 1).await?);
        nn.push(nonce_claims(&db, 2 * round + 1, secs, callers).await?);
    }
    Ok(PgAcceptComparison {
        queue: median(q),
        raw: median(r),
        nonce_one: median(n1),
        nonce_many: median(nn),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::test_backends::TestPg;

    /// The comparison runs (briefly): both sides accept, and the queue's
    /// concurrent callers share commits.
    #[tokio::test]
    async fn the_comparison_measures_both_sides() {
        let Some(pg) = TestPg::start().await else {
            return;
        };
        let c = compare_pg_accepts(&pg.url, 1, 16, b"payload", 1)
            .await
            .unwrap();
        assert!(c.queue.rate > 0.0 && c.raw.rate > 0.0, "{c:?}");
        assert!(c.queue.per_commit > 1.0, "no group commit: {}", c.queue);
        assert!(c.nonce_one.rate > 0.0 && c.nonce_many.rate > 0.0, "{c:?}");
    }
}
