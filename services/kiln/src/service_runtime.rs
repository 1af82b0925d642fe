//! One tokio runtime per service of `kiln dev`.
//!
//! In a cluster, gateway, scheduler and agent are separate processes, each
//! with its own runtime. `kiln dev` keeps them in one process but gives
//! each its own runtime whose threads carry the service's name
//! (`kiln-gateway`, ...): work stays on its service's threads as it would
//! in its own process, and `kiln bench` can read each service's CPU time
//! per thread name from `/proc/self/task` (see `commands::bench::cpu`).

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, Result};

/// A multi-threaded runtime whose every thread (workers and blocking pool)
/// is named `name`, stopped without blocking when dropped.
pub struct ServiceRuntime {
    name: &'static str,
    runtime: Option<tokio::runtime::Runtime>,
}

impl ServiceRuntime {
    /// One worker per core, as the service's own binary runs, unless
    /// `KILN_DEV_WORKERS` sets how many workers each service gets.
    pub fn new(name: &'static str) -> Result<Self> {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = workers_from_env(std::env::var("KILN_DEV_WORKERS").ok().as_deref())? {
            builder.worker_threads(n);
        }
        let runtime = builder
            .thread_name(name)
            // Idle blocking threads are kept, not ended after tokio's 10 s:
            // a thread that ends takes its CPU time out of the per-thread
            // sums `kiln bench` reads.
            .thread_keep_alive(Duration::from_secs(3600))
            .enable_all()
            .build()
            .with_context(|| format!("cannot start the {name} runtime"))?;
        Ok(Self {
            name,
            runtime: Some(runtime),
        })
    }

    /// Run `fut` on this runtime (everything it spawns stays there) and
    /// wait for its output from any other runtime.
    pub async fn run<F>(&self, fut: F) -> Result<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let done = self.run_until(fut, std::future::pending()).await?;
        Ok(done.expect("never stopped"))
    }

    /// [`ServiceRuntime::run`], unless `stop` resolves first: then `fut`
    /// is cancelled and waited out (dropped, with whatever it held, by the
    /// time this returns), and the answer is `None`.
    pub async fn run_until<F>(
        &self,
        fut: F,
        stop: impl Future<Output = ()>,
    ) -> Result<Option<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let rt = self
            .runtime
            .as_ref()
            .expect("runtime present until dropped");
        let mut task = rt.spawn(fut);
        tokio::select! {
            biased;
            done = &mut task => done
                .map(Some)
                .with_context(|| format!("a task on the {} runtime failed", self.name)),
            () = stop => {
                task.abort();
                // Resolves once the task's future has been dropped.
                let _ = task.await;
                Ok(None)
            }
        }
    }
}

/// `KILN_DEV_WORKERS`: unset, or a number of worker threads from 1 up.
fn workers_from_env(value: Option<&str>) -> Result<Option<usize>> {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    match value.parse::<usize>() {
        Ok(n) if n > 0 => Ok(Some(n)),
        _ => anyhow::bail!("KILN_DEV_WORKERS must be a number of threads from 1 up, not {value:?}"),
    }
}

impl Drop for ServiceRuntime {
    fn drop(&mut self) {
        // Dropped from async code, where a blocking shutdown would panic.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_count_comes_from_the_environment_or_the_cores() {
        assert_eq!(workers_from_env(None).unwrap(), None);
        assert_eq!(workers_from_env(Some("")).unwrap(), None);
        assert_eq!(workers_from_env(Some("3")).unwrap(), Some(3));
        for bad in ["0", "-1", "two"] {
            let e = workers_from_env(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("KILN_DEV_WORKERS"), "{e}");
        }
    }

    #[tokio::test]
    async fn work_runs_on_threads_named_for_the_service() {
        let rt = ServiceRuntime::new("kiln-test-svc").unwrap();
        let (name, spawned) = rt
            .run(async {
                let spawned =
                    tokio::spawn(async { std::thread::current().name().map(str::to_owned) })
                        .await
                        .unwrap();
                let blocking = tokio::task::spawn_blocking(|| {
                    std::thread::current().name().map(str::to_owned)
                })
                .await
                .unwrap();
                assert_eq!(blocking.as_deref(), Some("kiln-test-svc"));
                (std::thread::current().name().map(str::to_owned), spawned)
            })
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("kiln-test-svc"));
        assert_eq!(spawned.as_deref(), Some("kiln-test-svc"));
    }

    /// Sets its flag when dropped.
    struct DropFlag(std::sync::Arc<std::sync::atomic::AtomicBool>);

    impl Drop for DropFlag {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_stopped_start_is_dropped_before_run_until_returns() {
        let rt = ServiceRuntime::new("kiln-test-svc").unwrap();
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let held = DropFlag(dropped.clone());
        let stuck = async move {
            let _held = held;
            let _ = started_tx.send(());
            // A build that would take minutes.
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
        };
        let stop = async {
            let _ = started_rx.await;
        };
        let out = rt.run_until(stuck, stop).await.unwrap();
        assert!(out.is_none());
        // Not eventually: by the time run_until has returned.
        assert!(dropped.load(std::sync::atomic::Ordering::SeqCst));

        // A start that finishes first gives its output.
        let out = rt
            .run_until(async { 7 }, std::future::pending())
            .await
            .unwrap();
        assert_eq!(out, Some(7));
    }
}
