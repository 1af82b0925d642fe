//! Queue tests run on both backends: SQLite in memory, and a fresh
//! database on a throwaway PostgreSQL server (kiln-test-support; under
//! `CI=true` a machine that cannot run one fails the test).

use kiln_store::pg::PgDatabase;
use kiln_test_support::postgres::PgServer;

use super::postgres::{PgQueue, COMPONENT, MIGRATIONS};
use super::Queue;

/// A throwaway PostgreSQL server with one migrated database.
pub struct TestPg {
    pub db: PgDatabase,
    pub url: String,
    // Dropped last: stops the server.
    _server: PgServer,
}

impl TestPg {
    pub async fn start() -> Option<Self> {
        let server = PgServer::start()?;
        let url = server.create_database("queue");
        let db = PgDatabase::open(&url, 16, COMPONENT, MIGRATIONS)
            .await
            .unwrap_or_else(|e| panic!("{}\n{}", kiln_core::error_chain(&e), server.log()));
        Some(Self {
            db,
            url,
            _server: server,
        })
    }

    /// A queue as the gateway `owner` sees it (several share the database).
    pub fn queue(&self, owner: &str) -> Queue {
        Queue::postgres(PgQueue::new(self.db.clone(), owner))
    }
}

/// `on_both!(name, body)`: tests `name::sqlite` and `name::postgres`
/// running `body(queue)`.
macro_rules! on_both {
    ($name:ident, $body:ident) => {
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$body(crate::queue::Queue::open_in_memory().unwrap()).await
            }

            #[tokio::test]
            async fn postgres() {
                let Some(pg) = crate::queue::test_backends::TestPg::start().await else {
                    return;
                };
                super::$body(pg.queue("gateway-a")).await;
                drop(pg);
            }
        }
    };
}
pub(crate) use on_both;
