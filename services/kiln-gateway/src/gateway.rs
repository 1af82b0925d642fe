//! What every request handler, the invoke path and the async dispatcher
//! share.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::agent::SharedAgents;
use crate::auth::SharedAuthenticator;
use crate::catalog::Catalog;
use crate::invoke::pool::LeasePool;
use crate::metrics::Metrics;
use crate::scheduler::SharedScheduler;
use kiln_core::Clock;

pub struct Gateway {
    pub catalog: Arc<Catalog>,
    /// Roles, the STS key and credential lifetime (see [`crate::ram`]).
    pub ram: Arc<crate::ram::Ram>,
    /// Runtimes and their end-of-support stages.
    pub runtimes: Arc<crate::runtimes::RuntimeCatalogue>,
    pub auth: SharedAuthenticator,
    pub agents: SharedAgents,
    pub scheduler: SharedScheduler,
    pub leases: Arc<LeasePool>,
    pub region: String,
    /// HTTP triggers' domains and URLs (see [`crate::http_trigger`]).
    pub http_triggers: crate::http_trigger::HttpTriggers,
    /// Custom domains: routes, certificates (see [`crate::domains`]).
    pub domains: Arc<crate::domains::Domains>,
    /// Which accounts may attach functions to which VPC.
    pub vpcs: Arc<crate::vpcs::VpcRegistry>,
    pub metrics: Arc<Metrics>,
    pub clock: Arc<dyn Clock>,
    /// The async queue, its configs and dispatcher.
    pub dispatcher: Arc<crate::queue::dispatch::Dispatcher>,
    /// Shutting down: `/healthz` answers 503 so load balancers move
    /// traffic away before the listeners close.
    pub draining: AtomicBool,
}
