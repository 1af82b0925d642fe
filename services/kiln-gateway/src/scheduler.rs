//! What the gateway asks of the scheduler, behind a trait: leases for
//! invocations, function retirement, provisioned instances, concurrency
//! limits and the node and instance listings. [`HttpScheduler`] is the one
//! place that builds the scheduler's URLs; its errors are
//! [`InternalClientError`]s, which the API maps to FC's in one function.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{header, Method, Request};
use http_body_util::BodyExt;
use kiln_core::{AccountId, FunctionName, InstanceId, LeaseId, NodeId};
use kiln_internal_api::client::remote_error;
use kiln_internal_api::server::full;
use kiln_internal_api::{
    paths, AccountLimits, Endpoints, FunctionLimits, FunctionRef, InstanceInfo, InternalClient,
    InternalClientError, Lease, LeaseOutcome, NodeInfo, PlacedInstance, ProvisionDetail,
    ProvisionStatus, PutProvision, ReleaseLease, RetireFunction,
};

type Result<T> = std::result::Result<T, InternalClientError>;

/// The scheduler's API as the gateway uses it.
pub trait SchedulerClient: Send + Sync + 'static {
    /// A slot for one invocation. `body` is an `AcquireLease` already in
    /// JSON (see [`crate::catalog::FunctionEntry::acquire_body`]: the warm
    /// path does not serialise the spec per call).
    fn acquire_lease(&self, body: Bytes) -> BoxFuture<'_, Result<Lease>>;
    fn release_lease<'a>(
        &'a self,
        lease: &'a LeaseId,
        outcome: LeaseOutcome,
    ) -> BoxFuture<'a, Result<()>>;
    /// Instances of other revisions take no new calls and go once idle.
    fn retire_function<'a>(&'a self, msg: &'a RetireFunction) -> BoxFuture<'a, Result<()>>;
    fn nodes(&self) -> BoxFuture<'_, Result<Vec<NodeInfo>>>;
    fn instances(&self) -> BoxFuture<'_, Result<Vec<InstanceInfo>>>;
    fn provisions<'a>(
        &'a self,
        account: &'a AccountId,
    ) -> BoxFuture<'a, Result<Vec<ProvisionDetail>>>;
    fn put_provision<'a>(&'a self, req: &'a PutProvision)
        -> BoxFuture<'a, Result<ProvisionStatus>>;
    fn delete_provision<'a>(&'a self, f: &'a FunctionRef) -> BoxFuture<'a, Result<()>>;
    fn account_limits<'a>(&'a self, account: &'a AccountId)
        -> BoxFuture<'a, Result<AccountLimits>>;
    /// Set a function's entry in its account's limits (`None`: remove it);
    /// answers the account's limits after the change.
    fn set_function_limits<'a>(
        &'a self,
        account: &'a AccountId,
        function: &'a FunctionName,
        limits: Option<&'a FunctionLimits>,
    ) -> BoxFuture<'a, Result<AccountLimits>>;
    /// The function of `instance` if the scheduler placed it on `node`
    /// (`None`: it did not).
    fn placed_instance<'a>(
        &'a self,
        node: &'a NodeId,
        instance: &'a InstanceId,
    ) -> BoxFuture<'a, Result<Option<PlacedInstance>>>;
    /// Whether `node` holds or is creating an instance that uses the code
    /// package or layer `digest`.
    fn node_uses_code<'a>(
        &'a self,
        node: &'a NodeId,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<bool>>;
}

/// A scheduler's 404 for a placement question: "no".
fn not_placed(e: &InternalClientError) -> bool {
    matches!(e, InternalClientError::Remote { error, .. } if error.code.http_status() == 404)
}

pub type SharedScheduler = Arc<dyn SchedulerClient>;

/// The scheduler's internal API over mTLS HTTP/2, at the scheduler that
/// leads among `endpoints` ([`Endpoints`]: standbys and dead addresses
/// are moved past).
pub struct HttpScheduler {
    client: InternalClient,
    endpoints: Endpoints,
}

impl HttpScheduler {
    pub fn new(client: InternalClient, endpoints: Endpoints) -> Self {
        Self { client, endpoints }
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.endpoints
            .call(|base| async move { self.client.get(&base, path).await })
            .await
    }

    async fn call<B: serde::Serialize + Sync, T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T> {
        self.endpoints
            .call(|base| {
                let method = method.clone();
                async move { self.client.call(method, &base, path, body).await }
            })
            .await
    }

    /// `acquire_lease` at one scheduler: the body is already JSON.
    async fn acquire_at(&self, base: String, body: Bytes) -> Result<Lease> {
        let url = format!("{base}{}", paths::LEASES);
        let transport = |message: String| InternalClientError::Transport {
            url: url.clone(),
            message,
        };
        let req = Request::builder()
            .method(Method::POST)
            .uri(&url)
            .header(header::CONTENT_TYPE, "application/json")
            .body(full(body))
            .map_err(|e| transport(e.to_string()))?;
        let resp = self.client.send(req).await?;
        let status = resp.status();
        let bytes = http_body_util::Limited::new(resp.into_body(), 1024 * 1024)
            .collect()
            .await
            .map_err(|e| transport(format!("the answer could not be read: {e}")))?
            .to_bytes();
        if !status.is_success() {
            return Err(InternalClientError::Remote {
                url: url.clone(),
                error: remote_error(status, &bytes),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| InternalClientError::Decode {
            url: url.clone(),
            message: e.to_string(),
        })
    }
}

impl SchedulerClient for HttpScheduler {
    fn acquire_lease(&self, body: Bytes) -> BoxFuture<'_, Result<Lease>> {
        Box::pin(
            self.endpoints
                .call(move |base| self.acquire_at(base, body.clone())),
        )
    }

    fn release_lease<'a>(
        &'a self,
        lease: &'a LeaseId,
        outcome: LeaseOutcome,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.call::<_, serde_json::Value>(
                Method::DELETE,
                &paths::lease(lease),
                Some(&ReleaseLease { outcome }),
            )
            .await
            .map(drop)
        })
    }

    fn retire_function<'a>(&'a self, msg: &'a RetireFunction) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.call::<_, serde_json::Value>(Method::POST, paths::FUNCTIONS_RETIRE, Some(msg))
                .await
                .map(drop)
        })
    }

    fn nodes(&self) -> BoxFuture<'_, Result<Vec<NodeInfo>>> {
        Box::pin(self.get(paths::SCHEDULER_NODES))
    }

    fn instances(&self) -> BoxFuture<'_, Result<Vec<InstanceInfo>>> {
        Box::pin(self.get(paths::SCHEDULER_INSTANCES))
    }

    fn provisions<'a>(
        &'a self,
        account: &'a AccountId,
    ) -> BoxFuture<'a, Result<Vec<ProvisionDetail>>> {
        Box::pin(async move { self.get(&paths::account_provisions(account)).await })
    }

    fn put_provision<'a>(
        &'a self,
        req: &'a PutProvision,
    ) -> BoxFuture<'a, Result<ProvisionStatus>> {
        Box::pin(self.call(Method::PUT, paths::FUNCTIONS_PROVISION, Some(req)))
    }

    fn delete_provision<'a>(&'a self, f: &'a FunctionRef) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.call::<_, ()>(Method::DELETE, paths::FUNCTIONS_PROVISION, Some(f)))
    }

    fn account_limits<'a>(
        &'a self,
        account: &'a AccountId,
    ) -> BoxFuture<'a, Result<AccountLimits>> {
        Box::pin(async move { self.get(&paths::account_limits(account)).await })
    }

    fn set_function_limits<'a>(
        &'a self,
        account: &'a AccountId,
        function: &'a FunctionName,
        limits: Option<&'a FunctionLimits>,
    ) -> BoxFuture<'a, Result<AccountLimits>> {
        Box::pin(async move {
            let path = paths::function_limits(account, function);
            match limits {
                None => self.call::<(), _>(Method::DELETE, &path, None).await,
                Some(f) => self.call(Method::PUT, &path, Some(f)).await,
            }
        })
    }

    fn placed_instance<'a>(
        &'a self,
        node: &'a NodeId,
        instance: &'a InstanceId,
    ) -> BoxFuture<'a, Result<Option<PlacedInstance>>> {
        Box::pin(async move {
            match self.get(&paths::placed_instance(node, instance)).await {
                Ok(placed) => Ok(Some(placed)),
                Err(e) if not_placed(&e) => Ok(None),
                Err(e) => Err(e),
            }
        })
    }

    fn node_uses_code<'a>(
        &'a self,
        node: &'a NodeId,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            match self.get::<()>(&paths::placed_code(node, digest)).await {
                Ok(()) => Ok(true),
                Err(e) if not_placed(&e) => Ok(false),
                Err(e) => Err(e),
            }
        })
    }
}

/// A scheduler for unit tests: hands out the leases it is given and
/// records releases; everything else is refused.
#[cfg(test)]
pub mod fake {
    use std::sync::Mutex;

    use kiln_core::FcError;

    use super::*;

    #[derive(Default)]
    pub struct FakeScheduler {
        pub leases: Mutex<Vec<Lease>>,
        pub released: Mutex<Vec<(LeaseId, LeaseOutcome)>>,
    }

    fn refused<T>(what: &str) -> Result<T> {
        Err(InternalClientError::Remote {
            url: format!("fake://{what}"),
            error: FcError::internal(format!("the fake scheduler has no {what}")),
        })
    }

    impl SchedulerClient for FakeScheduler {
        fn acquire_lease(&self, _body: Bytes) -> BoxFuture<'_, Result<Lease>> {
            let next = self.leases.lock().unwrap().pop();
            Box::pin(async move { next.map_or_else(|| refused("lease"), Ok) })
        }
        fn release_lease<'a>(
            &'a self,
            lease: &'a LeaseId,
            outcome: LeaseOutcome,
        ) -> BoxFuture<'a, Result<()>> {
            self.released.lock().unwrap().push((lease.clone(), outcome));
            Box::pin(async { Ok(()) })
        }
        fn retire_function<'a>(&'a self, _: &'a RetireFunction) -> BoxFuture<'a, Result<()>> {
            Box::pin(async { refused("retire") })
        }
        fn nodes(&self) -> BoxFuture<'_, Result<Vec<NodeInfo>>> {
            Box::pin(async { refused("nodes") })
        }
        fn instances(&self) -> BoxFuture<'_, Result<Vec<InstanceInfo>>> {
            Box::pin(async { refused("instances") })
        }
        fn placed_instance<'a>(
            &'a self,
            _: &'a NodeId,
            _: &'a InstanceId,
        ) -> BoxFuture<'a, Result<Option<PlacedInstance>>> {
            Box::pin(async { refused("placements") })
        }
        fn node_uses_code<'a>(&'a self, _: &'a NodeId, _: &'a str) -> BoxFuture<'a, Result<bool>> {
            Box::pin(async { refused("placements") })
        }
        fn provisions<'a>(
            &'a self,
            _: &'a AccountId,
        ) -> BoxFuture<'a, Result<Vec<ProvisionDetail>>> {
            Box::pin(async { refused("provisions") })
        }
        fn put_provision<'a>(
            &'a self,
            _: &'a PutProvision,
        ) -> BoxFuture<'a, Result<ProvisionStatus>> {
            Box::pin(async { refused("provisions") })
        }
        fn delete_provision<'a>(&'a self, _: &'a FunctionRef) -> BoxFuture<'a, Result<()>> {
            Box::pin(async { refused("provisions") })
        }
        fn account_limits<'a>(&'a self, _: &'a AccountId) -> BoxFuture<'a, Result<AccountLimits>> {
            Box::pin(async { refused("limits") })
        }
        fn set_function_limits<'a>(
            &'a self,
            _: &'a AccountId,
            _: &'a FunctionName,
            _: Option<&'a FunctionLimits>,
        ) -> BoxFuture<'a, Result<AccountLimits>> {
            Box::pin(async { refused("limits") })
        }
    }
}
