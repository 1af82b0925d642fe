//! The scheduler service: the placement core behind a mutex, plus what the
//! core leaves to its caller: starting instances on agents, waking the calls
//! that wait for them, destroying instances, persisting the journal.
//!
//! The mutex is never held across an await; every decision under it is
//! O(log n), so it is not a bottleneck at the scales Kiln targets.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use kiln_core::{
    AccountId, Clock, FcError, FcErrorCode, FunctionName, InstanceId, LeaseId, NodeId,
};
use kiln_internal_api::{
    AccountLimits, AcquireLease, CreateInstance, FunctionRef, Heartbeat, HeartbeatResponse,
    InstanceInfo, Lease, LeaseOutcome, NodeInfo, ProvisionStatus, PutProvision, RegisterNode,
    RegisterNodeResponse, RetireFunction,
};
use tokio::sync::watch;
use tracing::Instrument;

use crate::agent::{start_timed_out, AgentClient};
use crate::config::SchedulerConfig;
use crate::metrics::Metrics;
use crate::placement::{Acquired, CreateJob, Destroy, Effects, Placement, PlacementConfig};
use crate::store::{SchedulerStore, SchedulerStoreError, Writer};
use crate::trust::Trust;

/// How a start ended, as seen by the calls waiting for it.
type StartResult = Option<Result<(), FcError>>;

/// What the service needs from the outside world.
pub struct SchedulerDeps {
    pub clock: Arc<dyn Clock>,
    pub agent: Arc<dyn AgentClient>,
    pub store: Arc<dyn SchedulerStore>,
}

/// A handle on the running scheduler; cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    clock: Arc<dyn Clock>,
    agent: Arc<dyn AgentClient>,
    writer: Writer,
    metrics: Arc<Metrics>,
    start_timeout: Duration,
    heartbeat_interval_ms: u64,
    /// Revocations, renewal, bootstrap: attached once by [`crate::start`].
    trust: OnceLock<Arc<Trust>>,
    /// A clustered leader's fencing token, told to agents so that they
    /// refuse an older leader's calls: attached once by [`crate::start`].
    leader_token: OnceLock<i64>,
}

struct State {
    core: Placement,
    /// One channel per starting instance; its waiters subscribe.
    starting: HashMap<InstanceId, watch::Sender<StartResult>>,
    /// SHA-256 of the client certificate each node last registered with
    /// (kept in the trust store too, and loaded from it at start).
    holders: HashMap<NodeId, [u8; 32]>,
}

/// Why a registration was not taken.
#[derive(Debug)]
pub enum RegisterError {
    /// The node is live at `url`, registered with another certificate.
    Held {
        url: String,
    },
    Invalid(FcError),
}

impl Scheduler {
    /// Load the persisted state and start the write-behind task. Must be
    /// called inside a tokio runtime.
    pub fn new(
        config: &SchedulerConfig,
        deps: SchedulerDeps,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), SchedulerStoreError> {
        let placement = PlacementConfig {
            default_limits: config.default_account_limits(),
            idle_timeout_ms: config.idle_timeout_s * 1000,
            node_failure_after_ms: config.node_failure_after_ms,
            lease_grace_ms: config.instance_start_timeout_ms + 60_000,
            reconcile_grace_ms: config.heartbeat_interval_ms * 2,
            node_max_validity_ms: config.node_max_validity_h * 3_600_000,
            node_drain_lead_ms: config.node_drain_lead_s * 1000,
            instance_max_validity_ms: config.instance_max_validity_h * 3_600_000,
            instance_drain_lead_ms: config.instance_drain_lead_s * 1000,
            rebalance: config.rebalance.placement(),
        };
        let (nodes, instances) = deps.store.load()?;
        let now = deps.clock.now_ms();
        let limits = deps.store.load_account_limits()?;
        let provisions = deps.store.load_provisions()?;
        let (mut core, effects) = Placement::restore(placement, nodes, instances, now);
        core.load_account_limits(limits);
        core.load_provisions(provisions, now);
        tracing::info!(
            nodes = core.node_count(),
            instances = core.instance_count(),
            "scheduler state loaded"
        );
        let (writer, writer_task) = Writer::spawn(deps.store);
        let sched = Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    core,
                    starting: HashMap::new(),
                    holders: HashMap::new(),
                }),
                clock: deps.clock,
                agent: deps.agent,
                writer,
                metrics: Arc::new(Metrics::default()),
                start_timeout: config.instance_start_timeout(),
                heartbeat_interval_ms: config.heartbeat_interval_ms,
                trust: OnceLock::new(),
                leader_token: OnceLock::new(),
            }),
        };
        {
            let mut st = sched.lock();
            sched.finish(&mut st, effects);
            sched.update_node_gauges(&st);
        }
        Ok((sched, writer_task))
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Attach the certificate lifecycle (once; later calls are ignored).
    /// This scheduler leads its cluster with `token` (see [`crate::election`]).
    pub fn attach_leader_token(&self, token: i64) {
        let _ = self.inner.leader_token.set(token);
    }

    pub fn attach_trust(&self, trust: Arc<Trust>) {
        let revoked = trust.revocations().list().nodes.len();
        match trust.node_holders() {
            Ok(holders) => self.lock().holders.extend(holders),
            // Then the first registration of each node claims it, as
            // before holders were stored.
            Err(e) => tracing::error!(error = %e, "cannot load which certificate holds each node"),
        }
        if self.inner.trust.set(trust).is_ok() {
            self.inner.metrics.revoked_nodes.set(revoked as i64);
        }
    }

    pub fn trust(&self) -> Result<&Arc<Trust>, FcError> {
        self.inner
            .trust
            .get()
            .ok_or_else(|| FcError::internal("the certificate lifecycle is not set up"))
    }

    /// Revoke every certificate of `node` (durably, before answering),
    /// and write off its instances so they are replaced elsewhere.
    pub fn revoke(&self, node: &NodeId) -> Result<kiln_internal_api::NodeRevoked, FcError> {
        let trust = self.trust()?;
        let revoked_at_ms = trust.revoke(node)?;
        self.inner
            .metrics
            .revoked_nodes
            .set(trust.revocations().list().nodes.len() as i64);
        let mut st = self.lock();
        let (instances_written_off, effects) = st.core.revoke_node(node);
        self.finish(&mut st, effects);
        self.update_node_gauges(&st);
        Ok(kiln_internal_api::NodeRevoked {
            node_id: node.clone(),
            revoked_at_ms,
            instances_written_off,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Uncontended, the lock is taken without a clock read.
        if let Ok(st) = self.inner.state.try_lock() {
            self.inner.metrics.lock_wait.observe(0.0);
            return st;
        }
        let t = Instant::now();
        let st = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        self.inner
            .metrics
            .lock_wait
            .observe(t.elapsed().as_secs_f64());
        st
    }

    fn now(&self) -> u64 {
        self.inner.clock.now_ms()
    }

    /// Carry out what a core operation asked for. Called with the lock
    /// held, so the journal reaches the writer in decision order.
    fn finish(&self, st: &mut State, effects: Effects) {
        self.inner.writer.send(st.core.take_changes());
        for (id, err) in effects.aborted_starts {
            if let Some(tx) = st.starting.remove(&id) {
                tx.send_replace(Some(Err(err)));
            }
        }
        for d in effects.destroy {
            self.spawn_destroy(d);
        }
        // Provisioned instances: started in the background, no call waits.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            for job in effects.create {
                let (tx, _) = watch::channel(None);
                st.starting.insert(job.instance_id.clone(), tx);
                rt.spawn(self.clone().start_instance(job));
            }
        }
        self.inner
            .metrics
            .instances
            .set(st.core.instance_count() as i64);
    }

    fn update_node_gauges(&self, st: &State) {
        let m = &self.inner.metrics;
        m.nodes.set(st.core.node_count() as i64);
        m.nodes_ready.set(st.core.ready_node_count() as i64);
    }

    fn spawn_destroy(&self, d: Destroy) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let agent = self.inner.agent.clone();
        let span = tracing::info_span!("instance.destroy", instance_id = %d.instance_id, node_id = %d.node_id);
        rt.spawn(
            async move {
                match agent.destroy_instance(&d.agent_url, &d.instance_id).await {
                    Ok(()) => tracing::info!("instance destroyed"),
                    // The agent's next report names it; reconciliation
                    // asks again.
                    Err(e) => tracing::warn!(error = %e, "agent could not destroy instance"),
                }
            }
            .instrument(span),
        );
    }

    // ---- leases ---------------------------------------------------------

    /// A slot for one call. Waits while the instance it lands on starts.
    pub async fn acquire(&self, req: AcquireLease) -> Result<Lease, FcError> {
        let span = tracing::info_span!(
            "acquire",
            request_id = %req.request_id,
            account_id = %req.spec.account_id,
            function = %req.spec.function_name,
        );
        self.acquire_inner(req).instrument(span).await
    }

    async fn acquire_inner(&self, req: AcquireLease) -> Result<Lease, FcError> {
        let t0 = Instant::now();
        let m = &self.inner.metrics;
        let (lease, wait) = {
            let mut st = self.lock();
            let now = self.now();
            let result = st.core.acquire(&req.spec, now);
            let out = match result {
                Err(e) => {
                    if e.code == FcErrorCode::ResourceThrottled {
                        m.throttles.inc();
                        // Tenant-triggered: debug only; the counter tells operators.
                        tracing::debug!(error = %e, "acquire throttled");
                    }
                    return Err(e);
                }
                Ok(Acquired::Ready(lease)) => (lease, None),
                Ok(Acquired::Starting { lease, create }) => {
                    if let Some(job) = create {
                        let (tx, _) = watch::channel(None);
                        st.starting.insert(job.instance_id.clone(), tx);
                        m.cold_starts.inc();
                        tokio::spawn(self.clone().start_instance(job));
                    }
                    let rx = st.starting.get(&lease.instance_id).map(|tx| tx.subscribe());
                    (lease, Some(rx))
                }
            };
            self.finish(&mut st, Effects::default());
            out
        };
        if let Some(rx) = wait {
            // Dropped before the start resolves (the caller went away):
            // give the slot back.
            let guard = LeaseGuard {
                sched: self.clone(),
                lease_id: Some(lease.lease_id.clone()),
            };
            let Some(mut rx) = rx else {
                return Err(FcError::internal("the instance's start is not tracked"));
            };
            let result = match rx.wait_for(Option::is_some).await {
                Ok(v) => v.clone().unwrap_or(Ok(())),
                Err(_) => Err(FcError::unavailable(
                    "the instance's start was abandoned; retry the call",
                )),
            };
            result?;
            guard.disarm();
        }
        m.acquires.inc();
        m.acquire_latency.observe(t0.elapsed().as_secs_f64());
        tracing::debug!(lease_id = %lease.lease_id, instance_id = %lease.instance_id, cold_start = lease.cold_start, "lease granted");
        Ok(lease)
    }

    async fn start_instance(self, job: CreateJob) {
        let span = tracing::info_span!(
            "instance.create",
            instance_id = %job.instance_id,
            node_id = %job.node_id,
            account_id = %job.spec.account_id,
            function = %job.spec.function_name,
        );
        async move {
            let req = CreateInstance {
                instance_id: job.instance_id.clone(),
                spec: (*job.spec).clone(),
                always_allocate_cpu: job.always_allocate_cpu,
            };
            let timeout = self.inner.start_timeout + crate::agent::initializer_allowance(&job.spec);
            let create = self.inner.agent.create_instance(&job.agent_url, &req);
            let result = match tokio::time::timeout(timeout, create).await {
                Ok(r) => r,
                Err(_) => Err(start_timed_out(timeout)),
            };
            let mut st = self.lock();
            let now = self.now();
            let mut effects = Effects::default();
            let outcome = match result {
                Ok(created) => {
                    tracing::info!(startup_ms = created.startup_ms, "instance started");
                    let (known, e) = st.core.instance_started(&job.instance_id, now);
                    effects = e;
                    if !known {
                        // Written off meanwhile (its node went silent):
                        // clean up in case the agent is alive after all.
                        effects.destroy.push(destroy_of(&job));
                    }
                    Ok(())
                }
                Err(e) => {
                    tracing::warn!(error = %e, "instance did not start");
                    self.inner.metrics.start_failures.inc();
                    st.core.instance_start_failed(&job.instance_id);
                    // The agent may hold half of it; destroy is idempotent.
                    effects.destroy.push(destroy_of(&job));
                    Err(e)
                }
            };
            if let Some(tx) = st.starting.remove(&job.instance_id) {
                tx.send_replace(Some(outcome));
            }
            self.finish(&mut st, effects);
        }
        .instrument(span)
        .await
    }

    /// Give a slot back. See [`Placement::release`] for the answers.
    pub fn release(&self, lease_id: &LeaseId, outcome: LeaseOutcome) -> Result<(), FcError> {
        let mut st = self.lock();
        let now = self.now();
        let result = st.core.release(lease_id, outcome, now);
        let effects = match result {
            Ok(e) => e,
            Err(e) => {
                self.finish(&mut st, Effects::default());
                return Err(e);
            }
        };
        self.finish(&mut st, effects);
        Ok(())
    }

    pub fn retire(&self, req: &RetireFunction) {
        let mut st = self.lock();
        let mut effects = st.core.retire(
            &req.account_id,
            &req.function_name,
            req.keep_revision.as_deref(),
            &req.keep_versions,
        );
        if req.abort_in_flight {
            effects.extend(st.core.abort_retired(&req.account_id, &req.function_name));
        }
        tracing::info!(
            account_id = %req.account_id,
            function = %req.function_name,
            keep_revision = req.keep_revision.as_deref().unwrap_or("-"),
            keep_versions = req.keep_versions.len(),
            abort_in_flight = req.abort_in_flight,
            destroyed_now = effects.destroy.len(),
            "function retired"
        );
        self.finish(&mut st, effects);
    }

    // ---- nodes ----------------------------------------------------------

    pub fn register(&self, req: &RegisterNode) -> Result<RegisterNodeResponse, FcError> {
        self.register_with(req, None).map_err(|e| match e {
            RegisterError::Invalid(e) => e,
            RegisterError::Held { url } => FcError::new(
                kiln_core::FcErrorCode::AccessDenied,
                format!("the node is live at {url} with another certificate"),
            ),
        })
    }

    /// Register a node for the agent presenting `certificate` (its
    /// SHA-256). A node that is live at another URL and was registered
    /// with another certificate is not taken over: that is a second agent
    /// claiming a node id (a stolen or duplicated certificate), refused
    /// and logged. The same certificate at a new URL (an agent restarted
    /// on another port) and a new certificate at the same URL (a renewed
    /// one) are the node itself.
    pub fn register_with(
        &self,
        req: &RegisterNode,
        certificate: Option<[u8; 32]>,
    ) -> Result<RegisterNodeResponse, RegisterError> {
        if let (Some(id), Some(trust)) = (&req.node_id, self.inner.trust.get()) {
            if trust.is_revoked(id) {
                tracing::warn!(node_id = %id, "registration of a revoked node refused");
                return Err(RegisterError::Invalid(FcError::new(
                    FcErrorCode::AccessDenied,
                    format!("node {id} is revoked; it cannot register again"),
                )));
            }
        }
        let mut st = self.lock();
        let now = self.now();
        if let Some(id) = &req.node_id {
            let live_url = st.core.live_agent_url(id).map(str::to_owned);
            if let (Some(url), Some(held)) = (live_url, st.holders.get(id)) {
                if url != req.agent_url && certificate.as_ref() != Some(held) {
                    tracing::warn!(
                        node_id = %id,
                        live_url = %url,
                        claimed_url = %req.agent_url,
                        "refused a registration for a live node from another certificate at another URL"
                    );
                    return Err(RegisterError::Held { url });
                }
            }
        }
        let r = st.core.register(req, now).map_err(RegisterError::Invalid)?;
        if let Some(cert) = certificate {
            let changed = st.holders.insert(r.node_id.clone(), cert) != Some(cert);
            if let (true, Some(trust)) = (changed, self.inner.trust.get()) {
                if let Err(e) = trust.record_holder(&r.node_id, &cert) {
                    tracing::error!(node_id = %r.node_id, error = %e, "cannot store which certificate holds the node; after a restart its next registration claims it");
                }
            }
        }
        self.finish(&mut st, r.effects);
        self.update_node_gauges(&st);
        Ok(RegisterNodeResponse {
            node_id: r.node_id,
            heartbeat_interval_ms: self.inner.heartbeat_interval_ms,
            destroy: r.destroy,
            leader_token: self.inner.leader_token.get().copied(),
        })
    }

    pub fn heartbeat(&self, node: &NodeId, hb: &Heartbeat) -> HeartbeatResponse {
        let mut st = self.lock();
        let now = self.now();
        let out = st.core.heartbeat(node, &hb.instances, now);
        self.finish(&mut st, out.effects);
        HeartbeatResponse {
            always_allocate_cpu: st.core.always_allocated_on(node),
            destroy: out.destroy,
            reregister: out.reregister,
            reprovision: out.reprovision,
            leader_token: self.inner.leader_token.get().copied(),
        }
    }

    /// The function of `instance` if the scheduler placed it on `node`.
    pub fn placed_instance(
        &self,
        node: &NodeId,
        instance: &InstanceId,
    ) -> Option<kiln_internal_api::PlacedInstance> {
        let st = self.lock();
        st.core
            .placed_on(node, instance)
            .map(|spec| kiln_internal_api::PlacedInstance {
                account_id: spec.account_id.clone(),
                function_name: spec.function_name.clone(),
                role: spec.role.clone(),
            })
    }

    /// Whether `node` holds or is creating an instance whose code package
    /// or one of whose layers is `digest`.
    pub fn node_needs_code(&self, node: &NodeId, digest: &str) -> bool {
        self.lock().core.node_uses_code(node, digest)
    }

    /// Operator actions on a node; each answers the node as it is now.
    pub fn cordon(&self, node: &NodeId) -> Result<NodeInfo, FcError> {
        self.node_action(node, |core| core.cordon(node).map(|()| Effects::default()))
    }

    pub fn drain(&self, node: &NodeId) -> Result<NodeInfo, FcError> {
        self.node_action(node, |core| core.drain(node))
    }

    pub fn uncordon(&self, node: &NodeId) -> Result<NodeInfo, FcError> {
        self.node_action(node, |core| {
            core.uncordon(node).map(|()| Effects::default())
        })
    }

    fn node_action(
        &self,
        node: &NodeId,
        f: impl FnOnce(&mut Placement) -> Result<Effects, FcError>,
    ) -> Result<NodeInfo, FcError> {
        let mut st = self.lock();
        let effects = f(&mut st.core)?;
        self.finish(&mut st, effects);
        self.update_node_gauges(&st);
        st.core
            .node_info(node)
            .ok_or_else(|| FcError::internal("the node vanished"))
    }

    /// Periodic work: idle instances, lost leases, silent nodes.
    pub fn tick(&self) {
        let mut st = self.lock();
        let now = self.now();
        let moved = st.core.rebalanced_count();
        let written_off = st.core.leases_written_off_count();
        let effects = st.core.tick(now);
        let metrics = &self.inner.metrics;
        metrics
            .rebalanced
            .inc_by(st.core.rebalanced_count() - moved);
        metrics
            .leases_written_off
            .inc_by(st.core.leases_written_off_count() - written_off);
        self.finish(&mut st, effects);
        self.update_node_gauges(&st);
    }

    // ---- accounts -------------------------------------------------------

    /// The limits in force for `account` (its own or the defaults).
    pub fn account_limits(&self, account: &AccountId) -> AccountLimits {
        (*self.lock().core.account_limits(account)).clone()
    }

    /// Set (or with `None` reset to the defaults) an account's limits;
    /// resolves once they are on disk.
    pub async fn set_account_limits(
        &self,
        account: &AccountId,
        limits: Option<AccountLimits>,
    ) -> Result<AccountLimits, FcError> {
        let now = {
            let mut st = self.lock();
            st.core.set_account_limits(account, limits)?;
            self.finish(&mut st, Effects::default());
            (*st.core.account_limits(account)).clone()
        };
        self.flush().await?;
        Ok(now)
    }

    /// Set (or with `None` remove) one function's limits of an account,
    /// atomically; resolves once on disk with the limits now in force.
    pub async fn set_function_limits(
        &self,
        account: &AccountId,
        function: &FunctionName,
        limits: Option<kiln_internal_api::FunctionLimits>,
    ) -> Result<AccountLimits, FcError> {
        let now = {
            let mut st = self.lock();
            let l = st.core.set_function_limits(account, function, limits)?;
            self.finish(&mut st, Effects::default());
            (*l).clone()
        };
        self.flush().await?;
        Ok(now)
    }

    /// One account's provision configurations with their status.
    pub fn provision_details(
        &self,
        account: &AccountId,
    ) -> Vec<kiln_internal_api::ProvisionDetail> {
        self.lock().core.provision_details(account)
    }

    // ---- provisioned instances ------------------------------------------

    /// FC's PutProvisionConfig; resolves once stored. Instances start in
    /// the background (and on every tick until the target is met).
    pub async fn put_provision(&self, req: PutProvision) -> Result<ProvisionStatus, FcError> {
        let key = (req.spec.account_id.clone(), req.spec.function_name.clone());
        {
            let mut st = self.lock();
            let now = self.now();
            let effects = st
                .core
                .put_provision(&req.spec, &req.qualifier, req.config, now)?;
            self.finish(&mut st, effects);
        }
        self.flush().await?;
        self.provisions()
            .into_iter()
            .find(|p| {
                p.account_id == key.0 && p.function_name == key.1 && p.qualifier == req.qualifier
            })
            .ok_or_else(|| FcError::internal("the provision configuration vanished"))
    }

    /// Remove a provision configuration; its instances become on-demand.
    pub async fn delete_provision(&self, f: &FunctionRef) -> Result<(), FcError> {
        let found = {
            let mut st = self.lock();
            let found = st
                .core
                .delete_provision(&f.account_id, &f.function_name, &f.qualifier);
            self.finish(&mut st, Effects::default());
            found
        };
        if !found {
            return Err(FcError::new(
                FcErrorCode::FunctionNotFound,
                format!(
                    "function {} of account {} has no provision configuration for {}",
                    f.function_name, f.account_id, f.qualifier
                ),
            ));
        }
        self.flush().await
    }

    pub fn provisions(&self) -> Vec<ProvisionStatus> {
        self.lock().core.provisions_info()
    }

    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.lock().core.nodes_info()
    }

    pub fn instances(&self) -> Vec<InstanceInfo> {
        self.lock().core.instances_info()
    }

    /// Resolves once every change so far is on disk.
    pub async fn flush(&self) -> Result<(), FcError> {
        self.inner.writer.flush().await
    }
}

fn destroy_of(job: &CreateJob) -> Destroy {
    Destroy {
        instance_id: job.instance_id.clone(),
        node_id: job.node_id.clone(),
        agent_url: job.agent_url.clone(),
    }
}

/// Releases a lease when the acquire that took it is abandoned.
struct LeaseGuard {
    sched: Scheduler,
    lease_id: Option<LeaseId>,
}

impl LeaseGuard {
    fn disarm(mut self) {
        self.lease_id = None;
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if let Some(id) = self.lease_id.take() {
            let _ = self.sched.release(&id, LeaseOutcome::Ok);
        }
    }
}

#[cfg(test)]
mod tests;
