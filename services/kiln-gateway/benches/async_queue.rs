//! Durable async accept throughput: the queue's group-committed enqueue
//! (what an async InvokeFunction waits for before its 202) against raw
//! SQLite inserts with fsync, measured in the same run on the same disk.
//!
//! Run: `cargo bench -p kiln-gateway --bench async_queue` (optimised) or
//! `cargo test -p kiln-gateway --bench async_queue` (debug build).
//! Environment: KILN_BENCH_DIR (default: a temp dir under /var/tmp, a real
//! disk rather than tmpfs), KILN_BENCH_SECS (default 3), KILN_BENCH_CALLERS
//! (default 64), KILN_BENCH_PAYLOAD (bytes, default 512).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_gateway::queue::{NewMessage, Queue};
use kiln_store::{Database, Migration};

fn env_num(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const RAW: &[Migration] = &[Migration {
    name: "raw",
    sql: "CREATE TABLE raw (id INTEGER PRIMARY KEY, task TEXT NOT NULL UNIQUE, payload BLOB NOT NULL);",
}];

/// Rows per second inserting `total` rows, `group` per fsync'd transaction.
fn raw_inserts(
    dir: &std::path::Path,
    name: &str,
    total: usize,
    group: usize,
    payload: &[u8],
) -> f64 {
    let db = Database::open(&dir.join(name), RAW).unwrap();
    let started = Instant::now();
    db.with_conn(|c| {
        let mut n = 0;
        while n < total {
            let tx = c.transaction()?;
            for _ in 0..group {
                tx.prepare_cached("INSERT INTO raw (task, payload) VALUES (?1, ?2)")?
                    .execute(rusqlite::params![format!("t{n}"), payload])?;
                n += 1;
            }
            tx.commit()?;
        }
        Ok(())
    })
    .unwrap();
    total as f64 / started.elapsed().as_secs_f64()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    // Arguments (`--bench` from cargo bench, test filters) are ignored.
    let secs = env_num("KILN_BENCH_SECS", 3);
    let callers = env_num("KILN_BENCH_CALLERS", 64) as usize;
    let payload = vec![b'x'; env_num("KILN_BENCH_PAYLOAD", 512) as usize];
    let base = std::env::var_os("KILN_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("/var/tmp"));
    let dir = tempfile::tempdir_in(&base).unwrap();
    println!(
        "async accept benchmark in {} ({} s, {callers} concurrent callers, {} B payloads)",
        dir.path().display(),
        secs,
        payload.len()
    );

    let single = raw_inserts(dir.path(), "single.db", 2_000, 1, &payload);
    let grouped = raw_inserts(dir.path(), "grouped.db", 50_000, 100, &payload);
    println!("raw SQLite, one fsync'd transaction per row: {single:>9.0} rows/s");
    println!("raw SQLite, 100 rows per fsync'd transaction: {grouped:>9.0} rows/s");

    let queue = Queue::open(&dir.path().join("queue.db")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let batches_before = queue.batches();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..callers {
        let (queue, stop, payload) = (queue.clone(), stop.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let m = NewMessage {
                    account: format!("{}", 1_000_000 + c % 8).parse().unwrap(),
                    function: "bench".parse().unwrap(),
                    queue: format!("{}", 1_000_000 + c % 8),
                    task_id: format!("c{c}-{i}"),
                    request_id: format!("r{c}-{i}"),
                    payload: payload.clone(),
                    headers: vec![("content-type".into(), "application/octet-stream".into())],
                    now_ms: 1,
                };
                let t = Instant::now();
                queue.enqueue(m).await.unwrap();
                lat.push(t.elapsed());
                i += 1;
            }
            lat
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort();
    let rate = lat.len() as f64 / elapsed;
    let batches = queue.batches() - batches_before;
    println!(
        "queue enqueue (durable, group commit):       {rate:>9.0} accepted/s; p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {:.0} messages per transaction",
        percentile(&lat, 0.50).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        lat.len() as f64 / batches.max(1) as f64,
    );
    println!(
        "vs raw single-row fsync: {:.1}x; target >= 10000/s and p99 < 10 ms: {}",
        rate / single,
        if rate >= 10_000.0 && percentile(&lat, 0.99) < Duration::from_millis(10) {
            "met"
        } else {
            "NOT met"
        }
    );
}
