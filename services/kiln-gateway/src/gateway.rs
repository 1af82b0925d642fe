//! What every request handler, the invoke path and the async dispatcher
//! share.

use std::sync::Arc;

use kiln_core::Clock;
use kiln_internal_api::InternalClient;

use crate::auth::SharedAuthenticator;
use crate::catalog::Catalog;
use crate::invoke::pool::LeasePool;
use crate::metrics::Metrics;
use crate::scheduler::SharedScheduler;

pub struct Gateway {
    pub catalog: Arc<Catalog>,
    /// Roles, the STS key and credential lifetime (see [`crate::ram`]).
    pub ram: Arc<crate::ram::Ram>,
    /// Runtimes and their end-of-support stages.
    pub runtimes: Arc<crate::runtimes::RuntimeCatalogue>,
    pub auth: SharedAuthenticator,
    /// Control calls to agents (logs, exec) over mTLS HTTP/2.
    pub internal: InternalClient,
    /// The invocation data path to agents (HTTP/1.1 over the same mTLS).
    pub invoke_client: InternalClient,
    pub scheduler: SharedScheduler,
    pub leases: Arc<LeasePool>,
    pub region: String,
    pub metrics: Arc<Metrics>,
    pub clock: Arc<dyn Clock>,
    /// The async queue, its configs and dispatcher.
    pub dispatcher: Arc<crate::queue::dispatch::Dispatcher>,
}
