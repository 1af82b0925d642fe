//! The instances on this node: create (code, sandbox, wait for the port),
//! destroy, list, and re-adoption after an agent restart.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use http::HeaderValue;
use kiln_core::{
    Clock, FcError, FcErrorCode, FcErrorKind, InstanceId, InstanceSpec, NodeId, RuntimeName,
};
use kiln_internal_api::{CreateInstance, InstanceCreated, InstanceInfo};
use kiln_sandbox::{SandboxDriver, SandboxError, SandboxRequest};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::code::{is_digest, CodeCache, CodeCacheError};
use crate::forward::Upstream;
use crate::metrics::Metrics;
use crate::runtime_addr::RuntimeAddr;

/// Why an instance could not be created.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("Invalid instance request: {0}")]
    Invalid(String),
    #[error("Instance {0} already exists on this node")]
    AlreadyExists(String),
    #[error("Node is full: {0}")]
    NodeFull(String),
    #[error(transparent)]
    Code(#[from] CodeCacheError),
    #[error("The sandbox backend failed: {0}")]
    Sandbox(#[from] SandboxError),
    #[error("{0}")]
    NotStarted(String),
    /// The function's initializer failed or timed out: FC's
    /// `InitializationError`; the instance was destroyed.
    #[error("InitializationError: {0}")]
    Initialization(#[from] crate::hooks::HookError),
    /// The spec attaches to a VPC its account does not own on this node.
    #[error("Account {account} may not attach instances to VPC {vpc}: it is not one of the VPC's owners in this node's [sandbox.network] configuration")]
    VpcNotOwned {
        account: kiln_core::AccountId,
        vpc: String,
    },
    /// The function has a role but no temporary credentials could be had.
    #[error("Cannot get temporary credentials for the function's role: {}", .0.message)]
    Credentials(FcError),
    /// A custom-container function's image could not be made available.
    #[error(transparent)]
    Image(#[from] crate::images::ImageError),
}

impl InstanceError {
    pub fn to_fc(&self) -> FcError {
        match self {
            Self::Invalid(_) | Self::AlreadyExists(_) => {
                FcError::invalid_argument(self.to_string())
            }
            Self::NodeFull(_) | Self::Sandbox(SandboxError::Exhausted(_)) => {
                FcError::throttled(self.to_string())
            }
            Self::Code(e) => e.to_fc(),
            // The sandbox refused what the node cannot enforce: the
            // function's configuration, not a node fault.
            Self::Sandbox(SandboxError::Unenforceable(m)) => {
                FcError::new(FcErrorCode::FunctionNotStarted, m.clone())
            }
            Self::Sandbox(_) => FcError::internal(kiln_core::error_chain(self)),
            Self::NotStarted(m) => FcError::new(FcErrorCode::FunctionNotStarted, m.clone()),
            // The kind, not the message, tells the gateway to answer with
            // FC's initialization error.
            Self::Initialization(e) => FcError::new(FcErrorCode::FunctionNotStarted, e.to_string())
                .with_kind(FcErrorKind::Initialization),
            Self::Credentials(_) => FcError::new(FcErrorCode::FunctionNotStarted, self.to_string()),
            Self::VpcNotOwned { .. } => FcError::new(FcErrorCode::AccessDenied, self.to_string()),
            Self::Image(e) => e.to_fc(),
        }
    }
}

/// An instance's lifecycle once its port answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum InstanceState {
    /// Takes invocations.
    Running = 0,
    /// Crashed or timed out: takes no more invocations, about to go.
    Failed = 1,
    /// Being destroyed.
    Destroying = 2,
}

impl InstanceState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Running,
            1 => Self::Failed,
            _ => Self::Destroying,
        }
    }

    pub fn can_invoke(self) -> bool {
        self == Self::Running
    }
}

/// One running instance.
pub struct Instance {
    pub id: InstanceId,
    pub spec: InstanceSpec,
    pub endpoint: SocketAddr,
    pub created_at_ms: u64,
    last_used_ms: AtomicU64,
    in_flight: AtomicU32,
    state: AtomicU8,
    /// FC's `alwaysAllocateCPU` (a provisioned instance whose configuration
    /// says so): never frozen while idle.
    always_allocate_cpu: AtomicBool,
    pub(crate) upstream: Upstream,
    /// Temporary credentials of the function's role (empty without one).
    pub(crate) credentials: Arc<crate::credentials::InstanceCredentials>,
    /// The instance's console, attributed to its calls.
    pub(crate) log: Arc<crate::logs::InstanceLog>,
}

impl Instance {
    fn new(
        id: InstanceId,
        spec: InstanceSpec,
        runtime: RuntimeAddr,
        now_ms: u64,
        region: Option<&HeaderValue>,
        log: Arc<crate::logs::InstanceLog>,
    ) -> Self {
        let endpoint = runtime.endpoint;
        let upstream = Upstream::new(runtime, &spec, region);
        Self {
            log,
            id,
            spec,
            endpoint,
            created_at_ms: now_ms,
            last_used_ms: AtomicU64::new(now_ms),
            in_flight: AtomicU32::new(0),
            state: AtomicU8::new(InstanceState::Running as u8),
            always_allocate_cpu: AtomicBool::new(false),
            upstream,
            credentials: Arc::default(),
        }
    }

    pub fn state(&self) -> InstanceState {
        InstanceState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Running -> Failed. True for the one caller that made the change.
    pub fn mark_failed(&self) -> bool {
        self.state
            .compare_exchange(
                InstanceState::Running as u8,
                InstanceState::Failed as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    fn mark_destroying(&self) {
        self.state
            .store(InstanceState::Destroying as u8, Ordering::Release);
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether the instance keeps its CPU while idle (never frozen).
    pub fn always_allocate_cpu(&self) -> bool {
        self.always_allocate_cpu.load(Ordering::Acquire)
    }

    /// Set FC's `alwaysAllocateCPU`; true when it changed.
    pub(crate) fn set_always_allocate_cpu(&self, on: bool) -> bool {
        self.always_allocate_cpu.swap(on, Ordering::AcqRel) != on
    }

    pub(crate) fn enter(&self, now_ms: u64) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.last_used_ms.store(now_ms, Ordering::Relaxed);
    }

    pub(crate) fn leave(&self, now_ms: u64) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.last_used_ms.store(now_ms, Ordering::Relaxed);
    }

    fn info(&self, node_id: Option<NodeId>) -> InstanceInfo {
        InstanceInfo {
            instance_id: self.id.clone(),
            account_id: self.spec.account_id.clone(),
            function_name: self.spec.function_name.clone(),
            revision: self.spec.revision.clone(),
            node_id,
            in_flight: self.in_flight(),
            concurrency: self.spec.concurrency,
            created_at_ms: self.created_at_ms,
            last_used_ms: self.last_used_ms.load(Ordering::Relaxed),
            always_allocate_cpu: self.always_allocate_cpu(),
        }
    }
}

enum Slot {
    /// Reserved by a create that has not finished.
    Starting {
        memory_mb: u32,
    },
    Ready(Arc<Instance>),
}

impl Slot {
    fn memory_mb(&self) -> u32 {
        match self {
            Slot::Starting { memory_mb } => *memory_mb,
            Slot::Ready(i) => i.spec.memory_mb,
        }
    }
}

/// What an instance looks like on disk, so a restarted agent can adopt the
/// sandboxes that kept running.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceRecord {
    instance_id: InstanceId,
    spec: InstanceSpec,
    endpoint: SocketAddr,
    created_at_ms: u64,
    /// The sandbox's console (absent in records of older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    log_path: Option<PathBuf>,
    /// FC's `alwaysAllocateCPU` as last set (absent: false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    always_allocate_cpu: bool,
}

/// Node-wide settings of the manager.
pub struct ManagerSettings {
    pub memory_mb: u64,
    pub max_instances: u32,
    pub runtimes: Vec<RuntimeName>,
    pub start_timeout: Duration,
    pub region: Option<String>,
    /// Where instance records live (`state_dir/instances`).
    pub records_dir: PathBuf,
    /// What the node's sandboxes enforce of a function's network
    /// configuration; anything else is refused before a sandbox is made.
    pub network_isolation: kiln_internal_api::NetworkIsolation,
    /// The owners of each VPC this node attaches instances to
    /// (`[[sandbox.network.vpcs]]` `owners`), by VPC id.
    pub vpc_owners: HashMap<String, Vec<kiln_core::AccountId>>,
}

/// Every instance of the node. Lookups take a read lock for a map access
/// and never hold it across an await.
pub struct InstanceManager {
    pub(crate) driver: Arc<dyn SandboxDriver>,
    code: CodeCache,
    slots: RwLock<HashMap<String, Slot>>,
    settings: ManagerSettings,
    region: Option<HeaderValue>,
    /// The newest scheduler leader seen: older leaders' calls are refused.
    leader: crate::leader_fence::LeaderFence,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) clock: Arc<dyn Clock>,
    node_id: Mutex<Option<NodeId>>,
    credential_source: RwLock<Option<Arc<dyn crate::credentials::CredentialSource>>>,
    /// Every function's logs on this node.
    pub(crate) logs: Arc<crate::logs::LogStore>,
    /// Freezes idle instances and thaws them for calls (off by default).
    pub freezer: Arc<crate::freeze::Freezer>,
    /// Custom-container images, on nodes that run them.
    images: Option<Arc<crate::images::ImageCache>>,
}

impl InstanceManager {
    pub fn new(
        driver: Arc<dyn SandboxDriver>,
        code: CodeCache,
        settings: ManagerSettings,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let region = settings
            .region
            .as_deref()
            .and_then(|r| HeaderValue::from_str(r).ok());
        let logs = Arc::new(crate::logs::LogStore::new(
            crate::logs::Retention::default(),
            clock.clone(),
        ));
        let freezer = Arc::new(crate::freeze::Freezer::new(
            driver.clone(),
            metrics.usage.clone(),
        ));
        Self {
            freezer,
            driver,
            code,
            slots: RwLock::new(HashMap::new()),
            settings,
            region,
            leader: Default::default(),
            metrics,
            clock,
            node_id: Mutex::new(None),
            credential_source: RwLock::new(None),
            logs,
            images: None,
        }
    }

    /// Run custom-container functions with `images` (before any instance
    /// exists).
    pub fn with_images(mut self, images: Arc<crate::images::ImageCache>) -> Self {
        self.images = Some(images);
        self
    }

    /// Keep each function's log within `retention` (before any instance
    /// exists).
    pub fn with_log_retention(mut self, retention: crate::logs::Retention) -> Self {
        self.logs = Arc::new(crate::logs::LogStore::new(retention, self.clock.clone()));
        self
    }

    /// Which scheduler leader may create and destroy instances here.
    pub fn leader(&self) -> &crate::leader_fence::LeaderFence {
        &self.leader
    }

    /// The node's function logs.
    pub fn logs(&self) -> &Arc<crate::logs::LogStore> {
        &self.logs
    }

    fn instance_log(
        &self,
        id: &InstanceId,
        spec: &InstanceSpec,
        path: Option<PathBuf>,
        adopted: bool,
    ) -> Arc<crate::logs::InstanceLog> {
        Arc::new(crate::logs::InstanceLog::new(
            self.logs.clone(),
            spec.account_id.clone(),
            spec.function_name.clone(),
            id.clone(),
            path,
            adopted,
        ))
    }

    /// Read every instance's console (the background reader).
    pub fn drain_logs(&self) {
        let instances: Vec<Arc<Instance>> = self
            .slots
            .read()
            .expect("slots lock")
            .values()
            .filter_map(|s| match s {
                Slot::Ready(i) => Some(i.clone()),
                Slot::Starting { .. } => None,
            })
            .collect();
        for i in instances {
            i.log.drain();
        }
    }

    /// Where instances of functions with a role get their credentials.
    /// Instances already running (adopted after a restart) get theirs now.
    pub async fn set_credential_source(
        &self,
        source: Arc<dyn crate::credentials::CredentialSource>,
    ) {
        *self.credential_source.write().expect("source lock") = Some(source.clone());
        let running: Vec<Arc<Instance>> = self
            .slots
            .read()
            .expect("slots lock")
            .values()
            .filter_map(|s| match s {
                Slot::Ready(i) if i.spec.role.is_some() => Some(i.clone()),
                _ => None,
            })
            .collect();
        for i in running {
            let role = i.spec.role.clone().unwrap_or_default();
            let req = crate::credentials::request(&i.id, &i.spec, &role);
            match source.fetch(&req).await {
                Ok(c) => crate::credentials::install(
                    &i.credentials,
                    c,
                    source.clone(),
                    req,
                    self.clock.clone(),
                ),
                Err(e) => {
                    tracing::warn!(instance_id = %i.id, error = %e, "cannot get temporary credentials for an adopted instance")
                }
            }
        }
    }

    /// Credentials for a new instance of a function with a role.
    async fn fetch_credentials(
        &self,
        id: &InstanceId,
        spec: &InstanceSpec,
        role: &str,
    ) -> Result<crate::credentials::Fetched, InstanceError> {
        let source = self
            .credential_source
            .read()
            .expect("source lock")
            .clone()
            .ok_or_else(|| {
                InstanceError::Credentials(FcError::unavailable(
                    "this node has no credential source",
                ))
            })?;
        let req = crate::credentials::request(id, spec, role);
        let creds = source
            .fetch(&req)
            .await
            .map_err(InstanceError::Credentials)?;
        Ok(crate::credentials::Fetched { creds, source, req })
    }

    pub fn set_node_id(&self, id: NodeId) {
        *self.node_id.lock().expect("node id lock") = Some(id);
    }

    /// The running instance `id`, if any.
    pub fn get(&self, id: &str) -> Option<Arc<Instance>> {
        match self.slots.read().expect("slots lock").get(id) {
            Some(Slot::Ready(i)) => Some(i.clone()),
            _ => None,
        }
    }

    /// Every instance on the node, starting ones included (for the
    /// scheduler's reconciliation).
    pub fn ids(&self) -> Vec<InstanceId> {
        self.slots
            .read()
            .expect("slots lock")
            .keys()
            .filter_map(|k| k.parse().ok())
            .collect()
    }

    pub fn list(&self) -> Vec<InstanceInfo> {
        let node = self.node_id.lock().expect("node id lock").clone();
        let mut out: Vec<_> = self
            .slots
            .read()
            .expect("slots lock")
            .values()
            .filter_map(|s| match s {
                Slot::Ready(i) => Some(i.info(node.clone())),
                Slot::Starting { .. } => None,
            })
            .collect();
        out.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        out
    }

    /// FC's `alwaysAllocateCPU` as the scheduler wants it now: the
    /// instances in `always` keep their CPU while idle (thawed at once if
    /// frozen), every other running instance may be frozen between calls
    /// again. Changes are recorded, so a restarted agent keeps them.
    pub async fn set_always_allocate_cpu(self: &Arc<Self>, always: &[InstanceId]) {
        let always: std::collections::HashSet<&str> = always.iter().map(|i| i.as_str()).collect();
        let changed: Vec<Arc<Instance>> = self
            .slots
            .read()
            .expect("slots lock")
            .iter()
            .filter_map(|(id, s)| match s {
                Slot::Ready(i) if i.set_always_allocate_cpu(always.contains(id.as_str())) => {
                    Some(i.clone())
                }
                _ => None,
            })
            .collect();
        for i in changed {
            let on = i.always_allocate_cpu();
            tracing::info!(instance_id = %i.id, always_allocate_cpu = on, "CPU allocation changed");
            if on {
                if let Err(e) = self.freezer.hold(&i.id).await {
                    tracing::warn!(instance_id = %i.id, error = %kiln_core::error_chain(&e), "cannot thaw an always-allocated instance");
                }
            } else {
                self.freezer.after_call(&i);
            }
            self.save_record(&i).await;
        }
    }

    fn check_spec(&self, spec: &InstanceSpec) -> Result<(), InstanceError> {
        let invalid = |m: String| Err(InstanceError::Invalid(m));
        if !spec.is_sealed() {
            return invalid("the spec's revision does not match its content".into());
        }
        if !self.settings.runtimes.contains(&spec.runtime) {
            return invalid(format!(
                "runtime {} is not offered by this node",
                spec.runtime
            ));
        }
        // A custom-container spec's command comes from its image (or its
        // own entrypoint), resolved when the image is pulled.
        if spec.runtime.is_container_image() != spec.image.is_some() {
            return invalid("an image is given exactly for runtime custom-container".into());
        }
        if spec.image.is_none() && (spec.command.is_empty() || spec.command[0].is_empty()) {
            return invalid("the spec has no command".into());
        }
        if spec.port == 0 {
            return invalid("the spec's port must not be 0".into());
        }
        if spec.timeout_s == 0 || spec.timeout_s > kiln_core::limits::TIMEOUT_MAX_S {
            return invalid(format!("timeout_s {} is out of range", spec.timeout_s));
        }
        if spec.concurrency == 0 {
            return invalid("concurrency must be at least 1".into());
        }
        if !is_digest(&spec.code_digest) {
            return invalid("code_digest must be 64 lower-case hex digits".into());
        }
        // Fail closed: never run a function with less isolation than it
        // asks for (the scheduler avoids such nodes; this is the node's
        // own word on it).
        if let Some(why) = self
            .settings
            .network_isolation
            .refusal(spec.network.as_ref())
        {
            self.metrics.creates_failed.inc();
            tracing::warn!(reason = %why, "refusing an instance whose network this node cannot enforce");
            return Err(InstanceError::NotStarted(format!(
                "This node cannot run the function: {why}. Configure [sandbox.network] (and its VPCs) on the node (docs/security.md, \"Egress\")"
            )));
        }
        // Whoever asked (a scheduler, or something holding its key), an
        // instance attaches only to a VPC its own account owns. A VPC this
        // node does not know is refused by the network isolation.
        if let Some(att) = spec.network.as_ref().and_then(|n| n.vpc.as_ref()) {
            if let Some(owners) = self.settings.vpc_owners.get(&att.vpc_id) {
                if !owners.contains(&spec.account_id) {
                    tracing::warn!(account_id = %spec.account_id, vpc_id = %att.vpc_id, "refused an instance for a VPC its account does not own");
                    return Err(InstanceError::VpcNotOwned {
                        account: spec.account_id.clone(),
                        vpc: att.vpc_id.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Reserve a slot for `id`, refusing duplicates and overcommit.
    fn reserve(&self, id: &InstanceId, spec: &InstanceSpec) -> Result<(), InstanceError> {
        let mut slots = self.slots.write().expect("slots lock");
        if slots.contains_key(id.as_str()) {
            return Err(InstanceError::AlreadyExists(id.to_string()));
        }
        if slots.len() >= self.settings.max_instances as usize {
            return Err(InstanceError::NodeFull(format!(
                "{} instances is the node's maximum",
                self.settings.max_instances
            )));
        }
        let used: u64 = slots.values().map(|s| u64::from(s.memory_mb())).sum();
        if used + u64::from(spec.memory_mb) > self.settings.memory_mb {
            return Err(InstanceError::NodeFull(format!(
                "{} MB of {} MB memory in use, {} MB asked",
                used, self.settings.memory_mb, spec.memory_mb
            )));
        }
        slots.insert(
            id.to_string(),
            Slot::Starting {
                memory_mb: spec.memory_mb,
            },
        );
        Ok(())
    }

    /// Create an instance and return once its runtime's port accepts
    /// connections.
    pub async fn create(
        self: &Arc<Self>,
        req: CreateInstance,
    ) -> Result<InstanceCreated, InstanceError> {
        let span = tracing::info_span!(
            "instance_create",
            instance_id = %req.instance_id,
            function = %req.spec.function_name,
            account_id = %req.spec.account_id,
        );
        self.create_inner(req).instrument(span).await
    }

    async fn create_inner(
        self: &Arc<Self>,
        req: CreateInstance,
    ) -> Result<InstanceCreated, InstanceError> {
        let started = Instant::now();
        let CreateInstance {
            instance_id: id,
            spec,
            always_allocate_cpu,
        } = req;
        self.check_spec(&spec)?;
        self.reserve(&id, &spec)?;
        // A role's credentials reach the runtime in its environment; the
        // spec kept and recorded is the one without them.
        let credentials = match &spec.role {
            None => None,
            Some(role) => match self.fetch_credentials(&id, &spec, role).await {
                Ok(c) => Some(c),
                Err(e) => {
                    self.slots.write().expect("slots lock").remove(id.as_str());
                    self.metrics.creates_failed.inc();
                    tracing::warn!(error = %kiln_core::error_chain(&e), "instance did not start");
                    return Err(e);
                }
            },
        };
        let result = match &credentials {
            None => self.start_sandbox(&id, &spec).await,
            Some(f) => {
                self.start_sandbox(&id, &crate::credentials::with_env(&spec, &f.creds))
                    .await
            }
        };
        // FC's Initializer runs once, after the port opened and before the
        // instance can take its first call.
        let result = match result {
            Ok((endpoint, log_path)) => {
                let runtime = RuntimeAddr {
                    endpoint,
                    netns: self.driver.dial_netns(&id),
                };
                let request_id = kiln_core::RequestId::generate();
                let creds = credentials
                    .as_ref()
                    .map(|f| crate::credentials::headers(&f.creds))
                    .unwrap_or_default();
                match crate::hooks::initialize(
                    &runtime,
                    &spec,
                    self.region.as_ref(),
                    &request_id,
                    creds,
                )
                .await
                {
                    Ok(()) => Ok((runtime, log_path)),
                    Err(e) => {
                        self.destroy_sandbox(&id).await;
                        Err(InstanceError::from(e))
                    }
                }
            }
            Err(e) => Err(e),
        };
        let (runtime, log_path) = match result {
            Ok(started) => started,
            Err(e) => {
                self.slots.write().expect("slots lock").remove(id.as_str());
                // Whatever failed, no sandbox of this id is left (each
                // failure after the sandbox was made destroyed it).
                self.code.unpin(id.as_str());
                if let Some(images) = &self.images {
                    images.unpin(id.as_str());
                }
                self.metrics.creates_failed.inc();
                tracing::warn!(error = %kiln_core::error_chain(&e), "instance did not start");
                return Err(e);
            }
        };
        let now = self.clock.now_ms();
        let log = self.instance_log(&id, &spec, log_path, false);
        let instance = Arc::new(Instance::new(
            id.clone(),
            spec,
            runtime,
            now,
            self.region.as_ref(),
            log,
        ));
        instance.set_always_allocate_cpu(always_allocate_cpu);
        if let Some(f) = credentials {
            crate::credentials::install(
                &instance.credentials,
                f.creds,
                f.source,
                f.req,
                self.clock.clone(),
            );
        }
        let placed = {
            let mut slots = self.slots.write().expect("slots lock");
            match slots.get_mut(id.as_str()) {
                Some(slot @ Slot::Starting { .. }) => {
                    *slot = Slot::Ready(instance.clone());
                    true
                }
                _ => false,
            }
        };
        if !placed {
            // Destroyed while it was starting: finish the job.
            self.destroy_sandbox(&id).await;
            self.metrics.creates_failed.inc();
            return Err(InstanceError::NotStarted(format!(
                "instance {id} was destroyed while it was starting"
            )));
        }
        self.save_record(&instance).await;
        let startup = started.elapsed();
        self.metrics.creates_ok.inc();
        self.metrics.create_seconds.observe(startup.as_secs_f64());
        self.update_gauge();
        tracing::info!(startup_ms = startup.as_millis() as u64, endpoint = %instance.endpoint, "instance ready");
        Ok(InstanceCreated {
            instance_id: id,
            startup_ms: startup.as_millis() as u64,
        })
    }

    /// Code, sandbox, port. On failure nothing of the sandbox is left.
    async fn start_sandbox(
        &self,
        id: &InstanceId,
        spec: &InstanceSpec,
    ) -> Result<(SocketAddr, Option<PathBuf>), InstanceError> {
        let request = if spec.image.is_some() {
            // A custom-container function: its image instead of a package
            // (pinned by `prepare` before anything is fetched).
            let images = self.images.as_ref().ok_or_else(|| {
                InstanceError::NotStarted(
                    "this node does not run custom-container functions".into(),
                )
            })?;
            let prepared = images.prepare(id.as_str(), spec).await?;
            SandboxRequest {
                instance_id: id.clone(),
                spec: prepared.spec,
                code_dir: images.layer_path(&prepared.layer_digests[0]),
                image: Some(prepared.rootfs),
            }
        } else {
            // Pinned first: the cache never evicts what this instance uses.
            let mut digests = vec![spec.code_digest.clone()];
            digests.extend(spec.layers.iter().cloned());
            self.code.pin(id.as_str(), digests);
            let code_dir = self.code.ensure(&spec.code_digest, spec.code_size).await?;
            // Layer zips share the code cache (one extracted dir per digest);
            // the driver finds them beside `code_dir` (SandboxRequest::layer_dirs).
            for digest in &spec.layers {
                self.code.ensure(digest, 0).await?;
            }
            SandboxRequest {
                instance_id: id.clone(),
                spec: spec.clone(),
                code_dir,
                image: None,
            }
        };
        let sandbox = match self.driver.create(&request).await {
            Ok(s) => s,
            Err(e) => {
                // A half-created sandbox may hold a netns or a cgroup.
                self.destroy_sandbox(id).await;
                return Err(e.into());
            }
        };
        if let Err(e) = wait_for_port(
            self.driver.as_ref(),
            id,
            sandbox.endpoint,
            spec.port,
            self.settings.start_timeout,
        )
        .await
        {
            self.destroy_sandbox(id).await;
            return Err(e);
        }
        Ok((sandbox.endpoint, Some(sandbox.log_path)))
    }

    async fn destroy_sandbox(&self, id: &InstanceId) {
        match self.driver.destroy(id).await {
            Ok(()) => {
                self.code.unpin(id.as_str());
                if let Some(images) = &self.images {
                    images.unpin(id.as_str());
                }
            }
            Err(e) => {
                tracing::error!(instance_id = %id, error = %kiln_core::error_chain(&e), "cannot destroy sandbox");
            }
        }
    }

    /// Destroy an instance. Idempotent: unknown ids succeed.
    pub async fn destroy(&self, id: &InstanceId) -> Result<(), InstanceError> {
        let span = tracing::info_span!("instance_destroy", instance_id = %id);
        async {
            let removed = self.slots.write().expect("slots lock").remove(id.as_str());
            match removed {
                // The create in progress sees its slot gone and cleans up.
                Some(Slot::Starting { .. }) => {
                    tracing::info!("instance destroyed while starting");
                    return Ok(());
                }
                Some(Slot::Ready(i)) => {
                    // Frozen processes can neither answer PreStop nor die.
                    self.freezer.release(id).await;
                    // A crashed instance gets no PreStop; a failing or hanging
                    // one delays the destroy by at most its timeout. PreStop
                    // and the destroy run in a task of their own, so a caller
                    // that gives up meanwhile leaves no sandbox behind.
                    let crashed = i.state() == InstanceState::Failed;
                    i.mark_destroying();
                    i.credentials.stop();
                    // The log is finished after PreStop, so what PreStop
                    // prints is kept with the instance's other lines.
                    if !crashed && i.spec.pre_stop.is_some() {
                        let driver = self.driver.clone();
                        let region = self.region.clone();
                        let task = tokio::spawn(
                            async move {
                                let creds = i.credentials.header_pairs();
                                let _ = crate::hooks::pre_stop(
                                    i.upstream.runtime(),
                                    &i.spec,
                                    region.as_ref(),
                                    creds,
                                )
                                .await;
                                i.log.finish();
                                driver.destroy(&i.id).await
                            }
                            .in_current_span(),
                        );
                        match task.await {
                            Ok(r) => r?,
                            Err(e) => {
                                tracing::error!(error = %e, "PreStop task failed");
                                self.driver.destroy(id).await?;
                            }
                        }
                    } else {
                        i.log.finish();
                        self.driver.destroy(id).await?;
                    }
                }
                None => self.driver.destroy(id).await?,
            }
            self.code.unpin(id.as_str());
            if let Some(images) = &self.images {
                images.unpin(id.as_str());
            }
            self.remove_record(id).await;
            self.update_gauge();
            tracing::info!("instance destroyed");
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Take the instance out of service after a crash or a timeout and
    /// destroy it in the background. Only the first report acts.
    pub fn fail(self: &Arc<Self>, instance: &Arc<Instance>, reason: &'static str) {
        if !instance.mark_failed() {
            return;
        }
        tracing::warn!(instance_id = %instance.id, reason, "instance failed; destroying it");
        instance.log.event(&format!(
            "Instance {} failed ({reason}); it is being replaced",
            instance.id
        ));
        let this = self.clone();
        let id = instance.id.clone();
        tokio::spawn(async move {
            if let Err(e) = this.destroy(&id).await {
                tracing::error!(instance_id = %id, error = %kiln_core::error_chain(&e), "cannot destroy failed instance");
            }
        });
    }

    /// Destroy every instance (drain on shutdown).
    pub async fn destroy_all(&self) {
        for id in self.ids() {
            if let Err(e) = self.destroy(&id).await {
                tracing::error!(instance_id = %id, error = %kiln_core::error_chain(&e), "cannot destroy instance");
            }
        }
    }

    fn update_gauge(&self) {
        let n = self.slots.read().expect("slots lock").len();
        self.metrics.instances.set(n as i64);
    }

    fn record_path(&self, id: &InstanceId) -> PathBuf {
        self.settings.records_dir.join(format!("{id}.json"))
    }

    async fn save_record(&self, instance: &Instance) {
        let record = InstanceRecord {
            instance_id: instance.id.clone(),
            spec: instance.spec.clone(),
            endpoint: instance.endpoint,
            created_at_ms: instance.created_at_ms,
            log_path: instance.log.path(),
            always_allocate_cpu: instance.always_allocate_cpu(),
        };
        let path = self.record_path(&instance.id);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec(&record).expect("record serialises");
        let result = async {
            tokio::fs::create_dir_all(&self.settings.records_dir).await?;
            tokio::fs::write(&tmp, bytes).await?;
            tokio::fs::rename(&tmp, &path).await
        }
        .await;
        if let Err(e) = result {
            // The instance works; only adoption after a restart is lost.
            tracing::error!(path = %path.display(), error = %e, "cannot save instance record");
        }
    }

    async fn remove_record(&self, id: &InstanceId) {
        let path = self.record_path(id);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot remove instance record")
            }
        }
    }

    /// After a restart: adopt the sandboxes that still run and have a
    /// record, destroy those without one, forget records without a sandbox.
    pub async fn reconcile(&self) -> Result<(), SandboxError> {
        let mut records = HashMap::new();
        if let Ok(mut dir) = tokio::fs::read_dir(&self.settings.records_dir).await {
            while let Ok(Some(entry)) = dir.next_entry().await {
                let path = entry.path();
                if path.extension().and_then(|e| e.to_str()) != Some("json") {
                    let _ = tokio::fs::remove_file(&path).await;
                    continue;
                }
                match tokio::fs::read(&path)
                    .await
                    .ok()
                    .and_then(|b| serde_json::from_slice::<InstanceRecord>(&b).ok())
                {
                    Some(r) => {
                        records.insert(r.instance_id.clone(), r);
                    }
                    None => {
                        tracing::warn!(path = %path.display(), "unreadable instance record removed");
                        let _ = tokio::fs::remove_file(&path).await;
                    }
                }
            }
        }
        for id in self.driver.list().await? {
            let adopt = match records.remove(&id) {
                Some(r) if self.driver.is_running(&id).await.unwrap_or(false) => Some(r),
                Some(_) | None => None,
            };
            match adopt {
                Some(r) => {
                    let log = self.instance_log(&r.instance_id, &r.spec, r.log_path, true);
                    let always_allocate_cpu = r.always_allocate_cpu;
                    let mut digests = vec![r.spec.code_digest.clone()];
                    digests.extend(r.spec.layers.iter().cloned());
                    self.code.pin(id.as_str(), digests);
                    let runtime = RuntimeAddr {
                        endpoint: r.endpoint,
                        netns: self.driver.dial_netns(&id),
                    };
                    let instance = Instance::new(
                        r.instance_id,
                        r.spec,
                        runtime,
                        r.created_at_ms,
                        self.region.as_ref(),
                        log,
                    );
                    instance.set_always_allocate_cpu(always_allocate_cpu);
                    tracing::info!(instance_id = %id, "adopted instance from before the restart");
                    self.slots
                        .write()
                        .expect("slots lock")
                        .insert(id.to_string(), Slot::Ready(Arc::new(instance)));
                }
                None => {
                    tracing::info!(instance_id = %id, "destroying sandbox left without a usable record");
                    self.destroy_sandbox(&id).await;
                    self.remove_record(&id).await;
                }
            }
        }
        for id in records.keys() {
            self.remove_record(id).await;
        }
        self.update_gauge();
        Ok(())
    }
}

/// Wait until `endpoint` accepts a TCP connection: the runtime listens.
/// Fails with FC's FunctionNotStarted message when the sandbox's process
/// exits first or `timeout` passes.
pub async fn wait_for_port(
    driver: &dyn SandboxDriver,
    id: &InstanceId,
    endpoint: SocketAddr,
    port: u16,
    timeout: Duration,
) -> Result<(), InstanceError> {
    const POLL: Duration = Duration::from_millis(2);
    const LIVENESS_EVERY: Duration = Duration::from_millis(25);
    let started = Instant::now();
    let deadline = started + timeout;
    let mut last_liveness = started;
    loop {
        let attempt =
            tokio::time::timeout(Duration::from_millis(250), TcpStream::connect(endpoint)).await;
        if let Ok(Ok(_stream)) = attempt {
            return Ok(());
        }
        let now = Instant::now();
        if now.duration_since(last_liveness) >= LIVENESS_EVERY {
            last_liveness = now;
            if !driver.is_running(id).await? {
                return Err(InstanceError::NotStarted(format!(
                    "Function instance exited unexpectedly after {} ms without listening on port {port}. \
                     The function's process must listen on 0.0.0.0:{port}; check its command and its log",
                    started.elapsed().as_millis()
                )));
            }
        }
        if now >= deadline {
            return Err(InstanceError::NotStarted(format!(
                "Function instance health check failed on port {port} in {:.1} seconds. \
                 The function's process must listen on 0.0.0.0:{port}",
                timeout.as_secs_f64()
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{manager, sample_spec, FakeCodeSource, FakeDriver};
    use tokio::net::TcpListener;

    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
        driver: Arc<FakeDriver>,
        code: Arc<FakeCodeSource>,
        manager: Arc<InstanceManager>,
        digest: String,
    }

    fn fixture(driver: FakeDriver) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let driver = Arc::new(driver);
        let code = Arc::new(FakeCodeSource::new(Duration::ZERO));
        let digest = code.add(b"code".to_vec());
        let manager = manager(&root, driver.clone(), code.clone());
        Fixture {
            _dir: dir,
            root,
            driver,
            code,
            manager,
            digest,
        }
    }

    async fn listening() -> (TcpListener, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        (l, a)
    }

    /// An address nothing listens on.
    async fn closed_port() -> SocketAddr {
        listening().await.1
    }

    fn create(f: &Fixture) -> CreateInstance {
        CreateInstance {
            instance_id: InstanceId::generate(),
            spec: sample_spec(&f.digest, 9000),
            always_allocate_cpu: false,
        }
    }

    #[tokio::test]
    async fn an_instance_pins_its_code_from_create_to_destroy() {
        let (_l, addr) = listening().await;
        let f = fixture(FakeDriver::at(addr));
        let req = create(&f);
        let id = req.instance_id.clone();
        f.manager.create(req).await.unwrap();
        assert!(f.manager.code.is_pinned(&f.digest));
        f.manager.destroy(&id).await.unwrap();
        assert!(!f.manager.code.is_pinned(&f.digest));
        // A create that fails leaves nothing pinned.
        let mut bad = create(&f);
        bad.spec = sample_spec(&"ab".repeat(32), 9000);
        f.manager.create(bad).await.unwrap_err();
        assert!(!f.manager.code.is_pinned(&"ab".repeat(32)));
        // A sandbox whose port never opens is destroyed and unpinned.
        let g = fixture(FakeDriver::at(closed_port().await));
        g.manager.create(create(&g)).await.unwrap_err();
        assert!(!g.manager.code.is_pinned(&g.digest));
    }

    #[tokio::test]
    async fn create_list_destroy() {
        let (_l, addr) = listening().await;
        let f = fixture(FakeDriver::at(addr));
        let req = create(&f);
        let id = req.instance_id.clone();
        let created = f.manager.create(req).await.unwrap();
        assert_eq!(created.instance_id, id);

        let sandbox_req = &f.driver.requests()[0];
        assert_eq!(sandbox_req.code_dir, f.root.join("code").join(&f.digest));
        assert_eq!(
            std::fs::read(sandbox_req.code_dir.join("payload")).unwrap(),
            b"code"
        );
        let list = f.manager.list();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].instance_id, id);
        assert_eq!(list[0].function_name.as_str(), "hello");
        assert_eq!(list[0].in_flight, 0);
        assert_eq!(list[0].concurrency, 4);
        assert!(f.manager.get(id.as_str()).unwrap().state().can_invoke());
        let record = f.root.join("instance-records").join(format!("{id}.json"));
        assert!(record.exists());
        assert_eq!(f.manager.metrics.instances.get(), 1);

        f.manager.destroy(&id).await.unwrap();
        assert!(f.manager.list().is_empty());
        assert!(f.driver.destroyed().contains(&id));
        assert!(!record.exists());
        // Idempotent.
        f.manager.destroy(&id).await.unwrap();
        f.manager.destroy(&InstanceId::generate()).await.unwrap();
        assert_eq!(f.manager.metrics.instances.get(), 0);
        // The code stays for the next instance.
        assert!(f.root.join("code").join(&f.digest).is_dir());
    }

    #[tokio::test]
    async fn layers_are_fetched_once_into_the_code_cache_in_order() {
        let (_l, addr) = listening().await;
        let f = fixture(FakeDriver::at(addr));
        let first = f.code.add(b"layer-1".to_vec());
        let second = f.code.add(b"layer-2".to_vec());
        let with_layers = |layers: Vec<String>| {
            let mut req = create(&f);
            req.spec.layers = layers;
            req.spec = req.spec.seal();
            req
        };
        f.manager
            .create(with_layers(vec![first.clone(), second.clone()]))
            .await
            .unwrap();
        let sr = &f.driver.requests()[0];
        let cache = f.root.join("code");
        assert_eq!(
            sr.layer_dirs(),
            vec![cache.join(&first), cache.join(&second)]
        );
        assert_eq!(
            std::fs::read(sr.layer_dirs()[1].join("payload")).unwrap(),
            b"layer-2"
        );
        // Another instance with the same layers fetches nothing again.
        let fetched = f.code.fetches();
        f.manager
            .create(with_layers(vec![second.clone(), first.clone()]))
            .await
            .unwrap();
        assert_eq!(f.code.fetches(), fetched);
        // A layer the gateway does not have fails the create before any
        // sandbox is asked for.
        let err = f
            .manager
            .create(with_layers(vec!["f".repeat(64)]))
            .await
            .unwrap_err();
        assert!(err.to_string().contains(&"f".repeat(64)), "{err}");
        assert_eq!(f.driver.requests().len(), 2);
    }

    #[tokio::test]
    async fn bad_requests_are_refused_and_change_nothing() {
        let (_l, addr) = listening().await;
        let f = fixture(FakeDriver::at(addr));
        let expect = |r: Result<InstanceCreated, InstanceError>, code: FcErrorCode, text: &str| {
            let e = r.unwrap_err().to_fc();
            assert_eq!(e.code, code, "{e}");
            assert!(e.message.contains(text), "{e}");
        };
        let mut req = create(&f);
        req.spec.memory_mb = 256; // not re-sealed
        expect(
            f.manager.create(req).await,
            FcErrorCode::InvalidArgument,
            "revision",
        );
        let mut req = create(&f);
        req.spec.port = 0;
        req.spec = req.spec.seal();
        expect(
            f.manager.create(req).await,
            FcErrorCode::InvalidArgument,
            "port",
        );
        let mut req = create(&f);
        req.spec.command.clear();
        req.spec = req.spec.seal();
        expect(
            f.manager.create(req).await,
            FcErrorCode::InvalidArgument,
            "command",
        );
        let mut req = create(&f);
        req.spec.code_digest = "../../etc/passwd".into();
        req.spec = req.spec.seal();
        expect(
            f.manager.create(req).await,
            FcErrorCode::InvalidArgument,
            "code_digest",
        );
        // A network this node (no isolation) cannot enforce: refused,
        // saying why, before any sandbox or code fetch.
        for network in [
            kiln_core::NetworkSpec {
                internet_access: false,
                vpc: None,
            },
            kiln_core::NetworkSpec {
                internet_access: true,
                vpc: Some(kiln_core::VpcAttachment {
                    vpc_id: "vpc-a".into(),
                    vswitch_ids: vec!["vsw-a".into()],
                    security_group_id: "sg-a".into(),
                }),
            },
        ] {
            let mut req = create(&f);
            req.spec.network = Some(network);
            req.spec = req.spec.seal();
            expect(
                f.manager.create(req).await,
                FcErrorCode::FunctionNotStarted,
                "no network isolation",
            );
        }
        assert!(f.driver.requests().is_empty());
        assert!(f.manager.ids().is_empty());

        // A package the gateway does not have: its error, nothing kept.
        let mut req = create(&f);
        req.spec.code_digest = "ef".repeat(32);
        req.spec = req.spec.seal();
        expect(
            f.manager.create(req).await,
            FcErrorCode::FunctionNotFound,
            "does not exist",
        );
        assert!(f.driver.requests().is_empty());
        assert!(f.manager.ids().is_empty());

        // Duplicates and overcommit.
        let req = create(&f);
        f.manager.create(req.clone()).await.unwrap();
        expect(
            f.manager.create(req).await,
            FcErrorCode::InvalidArgument,
            "already exists",
        );
        for _ in 0..3 {
            f.manager.create(create(&f)).await.unwrap();
        }
        expect(
            f.manager.create(create(&f)).await,
            FcErrorCode::ResourceThrottled,
            "maximum",
        );
        assert_eq!(f.manager.ids().len(), 4);
        assert_eq!(
            f.code.fetches(),
            2,
            "one fetch for the real package, one for the missing one"
        );
    }

    #[tokio::test]
    async fn memory_is_not_overcommitted() {
        let (_l, addr) = listening().await;
        let f = fixture(FakeDriver::at(addr));
        let mut req = create(&f);
        req.spec.memory_mb = 1024;
        req.spec = req.spec.seal();
        f.manager.create(req).await.unwrap();
        let e = f.manager.create(create(&f)).await.unwrap_err();
        assert_eq!(e.to_fc().code, FcErrorCode::ResourceThrottled);
        assert!(e.to_string().contains("memory"), "{e}");
    }

    #[tokio::test]
    async fn a_port_that_opens_late_is_waited_for() {
        let addr = closed_port().await;
        let f = fixture(FakeDriver::at(addr));
        let opener = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(150)).await;
            TcpListener::bind(addr).await.unwrap()
        });
        let created = f.manager.create(create(&f)).await.unwrap();
        assert!(created.startup_ms >= 140, "{created:?}");
        let _listener = opener.await.unwrap();
    }

    #[tokio::test]
    async fn a_port_that_never_opens_is_function_not_started() {
        let addr = closed_port().await;
        let driver = FakeDriver::at(addr);
        let id = InstanceId::generate();
        driver.preexisting(id.clone());
        let started = Instant::now();
        let e = wait_for_port(&driver, &id, addr, 9000, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(300));
        let fc = e.to_fc();
        assert_eq!(fc.code, FcErrorCode::FunctionNotStarted);
        assert!(fc.message.contains("port 9000"), "{}", fc.message);
        assert!(fc.message.contains("0.0.0.0:9000"), "{}", fc.message);

        // Through the manager: the sandbox is destroyed, the slot freed.
        let f = fixture(FakeDriver::at(addr));
        let req = create(&f);
        let id = req.instance_id.clone();
        let e = f.manager.create(req).await.unwrap_err();
        assert_eq!(e.to_fc().code, FcErrorCode::FunctionNotStarted);
        assert!(f.driver.destroyed().contains(&id));
        assert!(f.manager.ids().is_empty());
        assert_eq!(f.manager.metrics.creates_failed.get(), 1);
    }

    #[tokio::test]
    async fn a_process_that_exits_fails_fast() {
        let addr = closed_port().await;
        let f = fixture(FakeDriver::at(addr));
        let req = create(&f);
        let id = req.instance_id.clone();
        let driver = f.driver.clone();
        let killer = {
            let id = id.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(60)).await;
                driver.kill(&id);
            })
        };
        let started = Instant::now();
        let e = f.manager.create(req).await.unwrap_err();
        killer.await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "not the 2 s start timeout"
        );
        let fc = e.to_fc();
        assert_eq!(fc.code, FcErrorCode::FunctionNotStarted);
        assert!(fc.message.contains("exited"), "{}", fc.message);
        assert!(fc.message.contains("0.0.0.0:9000"), "{}", fc.message);
        assert!(f.driver.destroyed().contains(&id));
        assert!(f.manager.ids().is_empty());
    }

    #[tokio::test]
    async fn destroy_during_start_wins() {
        let addr = closed_port().await;
        let f = fixture(FakeDriver::at(addr));
        let req = create(&f);
        let id = req.instance_id.clone();
        let manager = f.manager.clone();
        let creating = tokio::spawn(async move { manager.create(req).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(f.manager.ids(), vec![id.clone()]);
        f.manager.destroy(&id).await.unwrap();
        let _listener = TcpListener::bind(addr).await.unwrap();
        let e = creating.await.unwrap().unwrap_err();
        assert!(
            e.to_string().contains("destroyed while it was starting"),
            "{e}"
        );
        assert!(f.driver.destroyed().contains(&id));
        assert!(f.manager.ids().is_empty());
    }

    #[tokio::test]
    async fn reconcile_adopts_recorded_sandboxes_and_destroys_strays() {
        let (_l, addr) = listening().await;
        let f = fixture(FakeDriver::at(addr));
        let kept = create(&f);
        let kept_id = kept.instance_id.clone();
        f.manager.create(kept).await.unwrap();
        let gone = create(&f);
        let gone_id = gone.instance_id.clone();
        f.manager.create(gone).await.unwrap();
        // The agent restarts: a new manager over the same state and
        // driver; one sandbox died meanwhile, one unknown sandbox exists.
        f.driver.kill(&gone_id);
        let stray = InstanceId::generate();
        f.driver.preexisting(stray.clone());
        let restarted = manager(&f.root, f.driver.clone(), f.code.clone());
        restarted.reconcile().await.unwrap();
        assert_eq!(restarted.ids(), vec![kept_id.clone()]);
        assert!(restarted.get(kept_id.as_str()).is_some());
        assert!(f.driver.destroyed().contains(&stray));
        assert!(f.driver.destroyed().contains(&gone_id));
        let records: Vec<_> = std::fs::read_dir(f.root.join("instance-records"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(records, vec![format!("{kept_id}.json")]);
    }
}
