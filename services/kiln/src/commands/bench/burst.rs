//! Parallel cold starts: `n` functions that have no instance, invoked for
//! the first time by `callers` concurrent callers, against `n` bare
//! `runc run`s into namespaces made beforehand with the same parallelism
//! ([`super::runc::burst`]). Reported as rates (starts per second over the
//! whole burst) and median calls, in the same run.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use serde_json::json;

use super::stages::{Sample, Stages};
use crate::client::FcClient;
use crate::commands::dev::DevCluster;

/// A burst's wall time, its calls' times (ms) and where they went.
pub(super) type Burst = (Duration, Vec<f64>, Stages);

/// `n` functions on the same code, created first (not timed), then
/// invoked once each by `callers` callers; their code is on the node
/// already (an unmeasured cold start of one more function fetched it).
pub(super) async fn kiln(
    cluster: &DevCluster,
    client: &FcClient,
    zip_b64: &str,
    n: usize,
    callers: usize,
) -> Result<Burst> {
    let names: Vec<String> = (0..=n).map(|i| format!("bench-burst-{i}")).collect();
    for name in &names {
        client
            .create_function(&json!({
                "functionName": name,
                "runtime": "custom",
                "handler": "main",
                "memorySize": 128,
                "customRuntimeConfig": {"command": ["/code/server"]},
                "code": {"zipFile": zip_b64},
            }))
            .await?;
    }
    let result = async {
        // Fetches the code onto the node.
        client
            .invoke(&names[n], Bytes::from_static(b"ping"), &[])
            .await?
            .error_for_status()?;
        let next = Arc::new(AtomicUsize::new(0));
        let names = Arc::new(names[..n].to_vec());
        let before = Sample::parse(&cluster.metrics_text());
        let t = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..callers {
            let (client, names, next) = (client.clone(), names.clone(), next.clone());
            tasks.spawn(async move {
                let mut times = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(name) = names.get(i) else {
                        return Ok::<_, anyhow::Error>(times);
                    };
                    let c = Instant::now();
                    client
                        .invoke(name, Bytes::from_static(b"ping"), &[])
                        .await?
                        .error_for_status()?;
                    times.push(c.elapsed().as_secs_f64() * 1000.0);
                }
            });
        }
        let mut times = Vec::with_capacity(n);
        while let Some(r) = tasks.join_next().await {
            times.extend(r??);
        }
        let took = t.elapsed();
        let stages = Stages::between(&before, &Sample::parse(&cluster.metrics_text()), &times);
        Ok((took, times, stages))
    }
    .await;
    for name in &names {
        let _ = client.delete_function(name).await;
    }
    result
}

/// The burst's lines of the report.
pub(super) fn report(
    n: usize,
    callers: usize,
    runc: &(Duration, Vec<f64>),
    kiln: &Burst,
) -> String {
    let rate = |d: &Duration| n as f64 / d.as_secs_f64();
    let (rr, kr) = (rate(&runc.0), rate(&kiln.0));
    let (rm, km) = (
        crate::loadgen::median(&runc.1),
        crate::loadgen::median(&kiln.1),
    );
    format!(
        "{:<34} {:>10.1}/s {:>10.1}/s {:>11.2}    (kiln/runc starts per second)\n\
         {:<34} {:>10.1}ms {:>10.1}ms {:>11.2}x\n{}",
        format!("cold burst: {n} starts, {callers} callers"),
        rr,
        kr,
        kr / rr,
        "cold burst: median call",
        rm,
        km,
        km / rm,
        kiln.2.report(),
    )
}
