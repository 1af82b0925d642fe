//! A PostgreSQL pool behind a synchronous store trait.
//!
//! Kiln's store traits are synchronous (SQLite answers in microseconds and
//! is called from `spawn_blocking`). A PostgreSQL store implements the same
//! traits by running its queries on a runtime of its own: one worker
//! thread that owns the pool's connections, whatever runtime (or none) the
//! caller is on. A synchronous call parks its thread on a channel until
//! the query's answer comes back; an async caller awaits the task instead.

use std::future::Future;

use super::PgStoreError;

/// The runtime a PostgreSQL store's connections live on.
pub struct PgRuntime {
    rt: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for PgRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgRuntime").finish_non_exhaustive()
    }
}

impl PgRuntime {
    /// One worker thread named `thread` (`ps -T` shows it).
    pub fn new(thread: &str) -> Result<Self, PgStoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(thread)
            .enable_all()
            .build()
            .map_err(|e| PgStoreError::Pool(format!("cannot start the store's runtime: {e}")))?;
        Ok(Self { rt: Some(rt) })
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.rt.as_ref().expect("runtime lives until drop").handle()
    }

    /// Run `work` to completion and wait for it, blocking this thread
    /// (from sync code, or a tokio thread that may block).
    pub fn block<T, F>(&self, work: F) -> Result<T, PgStoreError>
    where
        F: Future<Output = Result<T, PgStoreError>> + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle().spawn(async move {
            let _ = tx.send(work.await);
        });
        rx.recv()
            .map_err(|_| PgStoreError::Pool("the store's runtime stopped mid-query".into()))?
    }

    /// Run `work` there and await it from any runtime.
    pub async fn run<T, F>(&self, work: F) -> Result<T, PgStoreError>
    where
        F: Future<Output = Result<T, PgStoreError>> + Send + 'static,
        T: Send + 'static,
    {
        self.handle()
            .spawn(work)
            .await
            .map_err(|_| PgStoreError::Pool("the store's runtime stopped mid-query".into()))?
    }
}

impl Drop for PgRuntime {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which tokio forbids inside another
        // runtime; its connections need no goodbye.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_from_plain_threads() {
        let rt = PgRuntime::new("kiln-test-pg").unwrap();
        assert_eq!(rt.block(async { Ok(7) }).unwrap(), 7);
    }

    #[tokio::test]
    async fn blocks_and_awaits_from_inside_another_runtime() {
        let rt = PgRuntime::new("kiln-test-pg").unwrap();
        // A current-thread runtime may block on it: the work runs elsewhere.
        assert_eq!(rt.block(async { Ok("sync") }).unwrap(), "sync");
        assert_eq!(rt.run(async { Ok("async") }).await.unwrap(), "async");
        // And it may be dropped here without tokio's blocking-drop panic.
        drop(rt);
    }
}
