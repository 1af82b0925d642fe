//! The scheduler's calls to agents, behind a trait so the lifecycle logic
//! is tested against a fake.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use kiln_core::{FcError, FcErrorCode, InstanceId};
use kiln_internal_api::{paths, CreateInstance, InstanceCreated, InternalClient};

/// What the scheduler asks of an agent.
pub trait AgentClient: Send + Sync + 'static {
    /// Start an instance; resolves once its runtime answers on its port.
    fn create_instance<'a>(
        &'a self,
        agent_url: &'a str,
        req: &'a CreateInstance,
    ) -> BoxFuture<'a, Result<InstanceCreated, FcError>>;

    /// Destroy an instance (idempotent on the agent).
    fn destroy_instance<'a>(
        &'a self,
        agent_url: &'a str,
        id: &'a InstanceId,
    ) -> BoxFuture<'a, Result<(), FcError>>;
}

/// The real agent API over mTLS HTTP/2.
#[derive(Clone)]
pub struct HttpAgentClient {
    create: InternalClient,
    destroy: InternalClient,
    start_timeout: Duration,
}

impl HttpAgentClient {
    /// `start_timeout` bounds a create call; destroys get 30 s.
    pub fn new(client: &InternalClient, start_timeout: Duration) -> Self {
        Self {
            // A second more than the scheduler waits, so its own timeout (and
            // its FunctionNotStarted) wins the race.
            create: client.with_timeout(start_timeout + Duration::from_secs(1)),
            destroy: client.with_timeout(Duration::from_secs(30)),
            start_timeout,
        }
    }
}

impl AgentClient for HttpAgentClient {
    fn create_instance<'a>(
        &'a self,
        agent_url: &'a str,
        req: &'a CreateInstance,
    ) -> BoxFuture<'a, Result<InstanceCreated, FcError>> {
        Box::pin(async move {
            // The agent runs the function's initializer inside the create.
            let timeout =
                self.start_timeout + initializer_allowance(&req.spec) + Duration::from_secs(1);
            self.create
                .with_timeout(timeout)
                .post(agent_url, paths::AGENT_INSTANCES, req)
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "agent could not create instance");
                    e.to_fc()
                })
        })
    }

    fn destroy_instance<'a>(
        &'a self,
        agent_url: &'a str,
        id: &'a InstanceId,
    ) -> BoxFuture<'a, Result<(), FcError>> {
        Box::pin(async move {
            self.destroy
                .delete(agent_url, &paths::agent_instance(id))
                .await
                .map_err(|e| e.to_fc())
        })
    }
}

/// An agent in memory: starts instances after `start_delay`, or fails them
/// with `fail_with`; records what it was asked.
#[derive(Default)]
pub struct FakeAgent {
    inner: Mutex<FakeAgentState>,
}

#[derive(Default)]
struct FakeAgentState {
    start_delay: Duration,
    fail_with: Option<FcError>,
    running: HashMap<InstanceId, String>,
    created: usize,
    destroyed: Vec<InstanceId>,
}

impl FakeAgent {
    pub fn new(start_delay: Duration) -> Arc<Self> {
        let a = Self::default();
        a.state().start_delay = start_delay;
        Arc::new(a)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FakeAgentState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every later create fails with `error` (None: succeeds again).
    pub fn fail_creates(&self, error: Option<FcError>) {
        self.state().fail_with = error;
    }

    pub fn set_start_delay(&self, d: Duration) {
        self.state().start_delay = d;
    }

    /// Instances started and not destroyed.
    pub fn running(&self) -> Vec<InstanceId> {
        let mut v: Vec<InstanceId> = self.state().running.keys().cloned().collect();
        v.sort();
        v
    }

    pub fn created(&self) -> usize {
        self.state().created
    }

    pub fn destroyed(&self) -> Vec<InstanceId> {
        self.state().destroyed.clone()
    }
}

impl AgentClient for FakeAgent {
    fn create_instance<'a>(
        &'a self,
        agent_url: &'a str,
        req: &'a CreateInstance,
    ) -> BoxFuture<'a, Result<InstanceCreated, FcError>> {
        Box::pin(async move {
            let delay = self.state().start_delay;
            tokio::time::sleep(delay).await;
            let mut s = self.state();
            if let Some(e) = s.fail_with.clone() {
                return Err(e);
            }
            s.created += 1;
            s.running
                .insert(req.instance_id.clone(), agent_url.to_owned());
            Ok(InstanceCreated {
                instance_id: req.instance_id.clone(),
                startup_ms: delay.as_millis() as u64,
            })
        })
    }

    fn destroy_instance<'a>(
        &'a self,
        _agent_url: &'a str,
        id: &'a InstanceId,
    ) -> BoxFuture<'a, Result<(), FcError>> {
        Box::pin(async move {
            let mut s = self.state();
            s.running.remove(id);
            s.destroyed.push(id.clone());
            Ok(())
        })
    }
}

/// The error a caller sees when the agent took too long.
/// How much longer than the plain start timeout a create may take: the
/// function's initializer timeout (FC's `instanceLifecycleConfig`), if any.
pub fn initializer_allowance(spec: &kiln_core::InstanceSpec) -> Duration {
    spec.initializer.as_ref().map_or(Duration::ZERO, |h| {
        Duration::from_secs(u64::from(h.timeout_s))
    })
}

pub fn start_timed_out(timeout: Duration) -> FcError {
    FcError::new(
        FcErrorCode::FunctionNotStarted,
        format!(
            "the function instance did not start within {} ms",
            timeout.as_millis()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_create_may_take_the_initializer_timeout_longer() {
        let spec = |initializer| {
            kiln_core::InstanceSpec {
                account_id: "1".parse().unwrap(),
                function_name: "f".parse().unwrap(),
                revision: String::new(),
                version: None,
                runtime: kiln_core::RuntimeName::Custom,
                handler: "h".into(),
                command: vec!["/code/bootstrap".into()],
                args: vec![],
                port: 9000,
                environment: Default::default(),
                memory_mb: 128,
                cpu_milli: 100,
                disk_mb: 512,
                timeout_s: 3,
                concurrency: 1,
                code_digest: "00".repeat(32),
                code_size: 1,
                initializer,
                pre_stop: None,
                layers: Vec::new(),
                role: None,
                network: None,
                image: None,
            }
            .seal()
        };
        assert_eq!(initializer_allowance(&spec(None)), Duration::ZERO);
        let hook = kiln_core::LifecycleHook {
            handler: "i".into(),
            timeout_s: 90,
        };
        assert_eq!(
            initializer_allowance(&spec(Some(hook))),
            Duration::from_secs(90)
        );
    }
}
