//! Fakes of the agent's side effects: a sandbox driver whose "sandboxes"
//! are whatever address a test says, a code source serving bytes from
//! memory, an unpacker that stores the bytes as one file, and a scheduler
//! that records what it is told. Public so integration tests and `kiln`'s
//! tests can run a real agent API without runc.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use kiln_core::{FcError, FcErrorCode, InstanceId, NodeId, SandboxKind};
use kiln_internal_api::{
    Heartbeat, HeartbeatResponse, InternalClientError, RegisterNode, RegisterNodeResponse,
};
use kiln_sandbox::{Sandbox, SandboxDriver, SandboxError, SandboxRequest};
use sha2::{Digest, Sha256};

use crate::code::{CodeCacheError, CodeSource, Unpacker};
use crate::registration::SchedulerApi;

type EndpointFn = dyn Fn(&SandboxRequest) -> Result<SocketAddr, SandboxError> + Send + Sync;

/// A driver that starts nothing: `create` answers the endpoint a test
/// chose (typically a local listener acting as the runtime).
pub struct FakeDriver {
    endpoint_for: Box<EndpointFn>,
    state: Mutex<FakeDriverState>,
}

#[derive(Default)]
struct FakeDriverState {
    running: HashMap<InstanceId, bool>,
    frozen: HashMap<InstanceId, bool>,
    freezes: usize,
    thaws: usize,
    stats: HashMap<InstanceId, kiln_sandbox::driver::SandboxStats>,
    requests: Vec<SandboxRequest>,
    destroyed: Vec<InstanceId>,
}

impl FakeDriver {
    pub fn new(
        endpoint_for: impl Fn(&SandboxRequest) -> Result<SocketAddr, SandboxError>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        Self {
            endpoint_for: Box::new(endpoint_for),
            state: Mutex::default(),
        }
    }

    /// Every sandbox answers on `addr`.
    pub fn at(addr: SocketAddr) -> Self {
        Self::new(move |_| Ok(addr))
    }

    /// The sandbox's process exits.
    pub fn kill(&self, id: &InstanceId) {
        if let Some(r) = self.state.lock().unwrap().running.get_mut(id) {
            *r = false;
        }
    }

    /// A sandbox that exists before the agent starts (an agent restart).
    pub fn preexisting(&self, id: InstanceId) {
        self.state.lock().unwrap().running.insert(id, true);
    }

    pub fn requests(&self) -> Vec<SandboxRequest> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn destroyed(&self) -> Vec<InstanceId> {
        self.state.lock().unwrap().destroyed.clone()
    }

    /// Whether the sandbox is frozen now.
    pub fn is_frozen(&self, id: &InstanceId) -> bool {
        self.state
            .lock()
            .unwrap()
            .frozen
            .get(id)
            .copied()
            .unwrap_or(false)
    }

    /// What `stats` answers for the sandbox (frozen state is the fake's).
    pub fn set_stats(&self, id: &InstanceId, stats: kiln_sandbox::driver::SandboxStats) {
        self.state.lock().unwrap().stats.insert(id.clone(), stats);
    }

    /// How many freezes and thaws the driver was asked for.
    pub fn freeze_counts(&self) -> (usize, usize) {
        let s = self.state.lock().unwrap();
        (s.freezes, s.thaws)
    }

    pub fn exists(&self, id: &InstanceId) -> bool {
        self.state.lock().unwrap().running.contains_key(id)
    }
}

#[async_trait::async_trait]
impl SandboxDriver for FakeDriver {
    fn kind(&self) -> SandboxKind {
        SandboxKind::Container
    }

    async fn create(&self, req: &SandboxRequest) -> Result<Sandbox, SandboxError> {
        self.state.lock().unwrap().requests.push(req.clone());
        let endpoint = (self.endpoint_for)(req)?;
        self.state
            .lock()
            .unwrap()
            .running
            .insert(req.instance_id.clone(), true);
        Ok(Sandbox {
            instance_id: req.instance_id.clone(),
            endpoint,
            pid: None,
            log_path: "/dev/null".into(),
        })
    }

    async fn is_running(&self, id: &InstanceId) -> Result<bool, SandboxError> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .running
            .get(id)
            .copied()
            .unwrap_or(false))
    }

    async fn stats(
        &self,
        id: &InstanceId,
    ) -> Result<Option<kiln_sandbox::driver::SandboxStats>, SandboxError> {
        let s = self.state.lock().unwrap();
        if !s.running.contains_key(id) {
            return Err(SandboxError::NotFound(id.clone()));
        }
        let mut stats = s.stats.get(id).cloned().unwrap_or_default();
        stats.frozen = s.frozen.get(id).copied().unwrap_or(false);
        Ok(Some(stats))
    }

    async fn freeze(&self, id: &InstanceId) -> Result<(), SandboxError> {
        let mut s = self.state.lock().unwrap();
        if !s.running.contains_key(id) {
            return Err(SandboxError::NotFound(id.clone()));
        }
        s.freezes += 1;
        s.frozen.insert(id.clone(), true);
        Ok(())
    }

    async fn thaw(&self, id: &InstanceId) -> Result<(), SandboxError> {
        let mut s = self.state.lock().unwrap();
        if !s.running.contains_key(id) {
            return Err(SandboxError::NotFound(id.clone()));
        }
        s.thaws += 1;
        s.frozen.insert(id.clone(), false);
        Ok(())
    }

    async fn destroy(&self, id: &InstanceId) -> Result<(), SandboxError> {
        let mut s = self.state.lock().unwrap();
        s.running.remove(id);
        s.frozen.remove(id);
        s.destroyed.push(id.clone());
        Ok(())
    }

    async fn list(&self) -> Result<Vec<InstanceId>, SandboxError> {
        Ok(self.state.lock().unwrap().running.keys().cloned().collect())
    }
}

/// Code packages from memory, each fetch taking `delay`.
pub struct FakeCodeSource {
    delay: Duration,
    packages: Mutex<HashMap<String, Bytes>>,
    fetches: AtomicUsize,
}

impl FakeCodeSource {
    pub fn new(delay: Duration) -> Self {
        Self {
            delay,
            packages: Mutex::default(),
            fetches: AtomicUsize::new(0),
        }
    }

    /// Store `zip` under its sha256, which is returned.
    pub fn add(&self, zip: Vec<u8>) -> String {
        let digest = hex::encode(Sha256::digest(&zip));
        self.insert_raw(&digest, zip);
        digest
    }

    /// Store bytes under any digest (to serve a corrupted package).
    pub fn insert_raw(&self, digest: &str, zip: Vec<u8>) {
        self.packages
            .lock()
            .unwrap()
            .insert(digest.to_owned(), Bytes::from(zip));
    }

    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl CodeSource for FakeCodeSource {
    async fn fetch(&self, digest: &str, _limit: usize) -> Result<Bytes, CodeCacheError> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        let found = self.packages.lock().unwrap().get(digest).cloned();
        found.ok_or_else(|| CodeCacheError::Fetch {
            digest: digest.to_owned(),
            source: InternalClientError::Remote {
                url: format!("fake:/v1/code/{digest}"),
                error: FcError::new(
                    FcErrorCode::FunctionNotFound,
                    format!("code package {digest} does not exist"),
                ),
            },
        })
    }
}

/// Stores the package bytes as `dest/payload` (created atomically).
pub struct DirUnpacker;

impl Unpacker for DirUnpacker {
    fn unpack(&self, zip: &[u8], dest: &Path, _owner: Option<(u32, u32)>) -> Result<(), FcError> {
        let tmp = dest.with_extension("tmp");
        let io = |e: std::io::Error| FcError::internal(e.to_string());
        std::fs::create_dir_all(&tmp).map_err(io)?;
        std::fs::write(tmp.join("payload"), zip).map_err(io)?;
        std::fs::rename(&tmp, dest).map_err(io)
    }
}

/// A scheduler that answers from a script and records what it was told.
#[derive(Default)]
pub struct FakeScheduler {
    pub state: Mutex<FakeSchedulerState>,
}

#[derive(Default)]
pub struct FakeSchedulerState {
    /// Calls to fail (unreachable) before answering.
    pub fail_next: usize,
    pub registrations: Vec<RegisterNode>,
    pub heartbeats: Vec<(NodeId, Heartbeat)>,
    /// Returned by the next register / heartbeat.
    pub destroy_next: Vec<InstanceId>,
    pub reregister_next: bool,
    pub reprovision_next: bool,
    /// A clustered leader's token, sent with every answer.
    pub leader_token: Option<i64>,
    pub heartbeat_interval_ms: u64,
    /// Answered with every heartbeat (FC's alwaysAllocateCPU).
    pub always_allocate_cpu: Vec<InstanceId>,
}

impl FakeScheduler {
    pub fn new(heartbeat_interval_ms: u64) -> Self {
        let s = Self::default();
        s.state.lock().unwrap().heartbeat_interval_ms = heartbeat_interval_ms;
        s
    }

    fn unreachable(&self) -> Option<InternalClientError> {
        let mut s = self.state.lock().unwrap();
        if s.fail_next > 0 {
            s.fail_next -= 1;
            return Some(InternalClientError::Transport {
                url: "fake:scheduler".into(),
                message: "connection refused".into(),
            });
        }
        None
    }
}

#[async_trait::async_trait]
impl SchedulerApi for FakeScheduler {
    async fn register(
        &self,
        req: &RegisterNode,
    ) -> Result<RegisterNodeResponse, InternalClientError> {
        if let Some(e) = self.unreachable() {
            return Err(e);
        }
        let mut s = self.state.lock().unwrap();
        s.registrations.push(req.clone());
        Ok(RegisterNodeResponse {
            node_id: req.node_id.clone().unwrap_or_else(NodeId::generate),
            heartbeat_interval_ms: s.heartbeat_interval_ms,
            destroy: std::mem::take(&mut s.destroy_next),
            leader_token: s.leader_token,
        })
    }

    async fn heartbeat(
        &self,
        node: &NodeId,
        req: &Heartbeat,
    ) -> Result<HeartbeatResponse, InternalClientError> {
        if let Some(e) = self.unreachable() {
            return Err(e);
        }
        let mut s = self.state.lock().unwrap();
        s.heartbeats.push((node.clone(), req.clone()));
        Ok(HeartbeatResponse {
            always_allocate_cpu: s.always_allocate_cpu.clone(),
            destroy: std::mem::take(&mut s.destroy_next),
            reregister: std::mem::take(&mut s.reregister_next),
            reprovision: std::mem::take(&mut s.reprovision_next),
            leader_token: s.leader_token,
        })
    }
}

/// A spec that passes the manager's checks, sealed.
pub fn sample_spec(code_digest: &str, port: u16) -> kiln_core::InstanceSpec {
    kiln_core::InstanceSpec {
        account_id: "1234".parse().expect("valid account"),
        function_name: "hello".parse().expect("valid name"),
        revision: String::new(),
        version: None,
        runtime: kiln_core::RuntimeName::Custom,
        handler: "index.handler".into(),
        command: vec!["/code/server".into()],
        args: vec![],
        port,
        environment: Default::default(),
        memory_mb: 128,
        cpu_milli: 100,
        disk_mb: 512,
        timeout_s: 1,
        concurrency: 4,
        code_digest: code_digest.to_owned(),
        code_size: 0,
        initializer: None,
        pre_stop: None,
        layers: Vec::new(),
        role: None,
        network: None,
        image: None,
    }
    .seal()
}

/// An instance manager over the fakes, keeping its files under `dir`.
pub fn manager(
    dir: &Path,
    driver: std::sync::Arc<FakeDriver>,
    code: std::sync::Arc<FakeCodeSource>,
) -> std::sync::Arc<crate::InstanceManager> {
    let cache = crate::CodeCache::new(
        dir.join("code"),
        None,
        code,
        std::sync::Arc::new(DirUnpacker),
    );
    std::sync::Arc::new(crate::InstanceManager::new(
        driver,
        cache,
        crate::ManagerSettings {
            memory_mb: 1024,
            max_instances: 4,
            runtimes: kiln_core::RuntimeName::ALL.to_vec(),
            start_timeout: Duration::from_secs(2),
            region: Some("cn-test".into()),
            records_dir: dir.join("instance-records"),
            network_isolation: Default::default(),
            vpc_owners: Default::default(),
        },
        std::sync::Arc::new(crate::metrics::Metrics::new()),
        std::sync::Arc::new(kiln_core::SystemClock),
    ))
}

/// A local HTTP/1.1 server (see [`serve_http1`]).
pub struct HttpServer {
    pub task: tokio::task::JoinHandle<()>,
    /// Connections accepted so far.
    pub connections: std::sync::Arc<AtomicUsize>,
}

/// Serve plain HTTP/1.1 (keep-alive) on `listener` with `handler`: a
/// stand-in for a function's runtime.
pub fn serve_http1<F, Fut>(listener: tokio::net::TcpListener, handler: F) -> HttpServer
where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<kiln_internal_api::server::Body>>
        + Send
        + 'static,
{
    let connections = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let fut = handler(req);
                    async move { Ok::<_, std::convert::Infallible>(fut.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    HttpServer { task, connections }
}

/// A connection from a peer holding a certificate of `role` (an agent's
/// names node `n-test`): what `serve_tls` hands the API for a real one.
pub fn conn_of(role: kiln_pki::Role) -> kiln_internal_api::server::ConnInfo {
    let identity = match role {
        kiln_pki::Role::Agent => {
            kiln_pki::Identity::agent("kiln", "n-test".parse().expect("a valid node id"))
        }
        role => kiln_pki::Identity::service("kiln", role),
    }
    .expect("a valid identity");
    kiln_internal_api::server::ConnInfo {
        peer: "127.0.0.1:1".parse().expect("an address"),
        local: "127.0.0.1:2".parse().expect("an address"),
        identity: Some(std::sync::Arc::new(identity)),
        certificate: None,
        certificate_sha256: None,
        server_name: None,
    }
}
