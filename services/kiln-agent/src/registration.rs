//! The node's membership in the cluster: register with the scheduler (with
//! capacity, labels and the instances running now), then heartbeat; destroy
//! what the scheduler does not know; register again when it asks.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_core::NodeId;
use kiln_internal_api::{
    paths, Heartbeat, HeartbeatResponse, InternalClient, InternalClientError, NodeCapacity,
    NodeLabels, RegisterNode, RegisterNodeResponse,
};
use tokio::sync::watch;

use crate::instances::InstanceManager;

/// The scheduler's node API.
#[async_trait::async_trait]
pub trait SchedulerApi: Send + Sync + 'static {
    async fn register(
        &self,
        req: &RegisterNode,
    ) -> Result<RegisterNodeResponse, InternalClientError>;
    async fn heartbeat(
        &self,
        node: &NodeId,
        req: &Heartbeat,
    ) -> Result<HeartbeatResponse, InternalClientError>;
}

/// The real scheduler, over mTLS.
pub struct HttpScheduler {
    client: InternalClient,
    base: String,
}

impl HttpScheduler {
    pub fn new(client: InternalClient, scheduler_url: &str) -> Self {
        Self {
            client: client.with_timeout(Duration::from_secs(10)),
            base: scheduler_url.trim_end_matches('/').to_owned(),
        }
    }
}

#[async_trait::async_trait]
impl SchedulerApi for HttpScheduler {
    async fn register(
        &self,
        req: &RegisterNode,
    ) -> Result<RegisterNodeResponse, InternalClientError> {
        self.client
            .post(&self.base, paths::NODES_REGISTER, req)
            .await
    }

    async fn heartbeat(
        &self,
        node: &NodeId,
        req: &Heartbeat,
    ) -> Result<HeartbeatResponse, InternalClientError> {
        self.client
            .post(&self.base, &paths::node_heartbeat(node), req)
            .await
    }
}

/// What the node tells the scheduler about itself.
#[derive(Debug, Clone)]
pub struct NodeDescription {
    pub agent_url: String,
    pub capacity: NodeCapacity,
    pub labels: NodeLabels,
}

const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// The node id kept across restarts in `state_dir/node-id`.
pub struct NodeIdFile(PathBuf);

impl NodeIdFile {
    pub fn new(state_dir: &Path) -> Self {
        Self(state_dir.join("node-id"))
    }

    pub fn load(&self) -> Option<NodeId> {
        let text = std::fs::read_to_string(&self.0).ok()?;
        match text.trim().parse() {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::warn!(path = %self.0.display(), error = %e, "ignoring unreadable node id");
                None
            }
        }
    }

    /// Forget the id: the next registration makes a new node.
    pub fn clear(&self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.0) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    pub fn store(&self, id: &NodeId) -> std::io::Result<()> {
        let tmp = self.0.with_extension("tmp");
        std::fs::write(&tmp, format!("{id}\n"))?;
        std::fs::rename(&tmp, &self.0)
    }
}

/// Register, heartbeat, repeat, until `shutdown` turns true.
pub async fn run(
    scheduler: Arc<dyn SchedulerApi>,
    manager: Arc<InstanceManager>,
    node: NodeDescription,
    id_file: NodeIdFile,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut node_id = id_file.load();
    'register: loop {
        let mut backoff = BACKOFF_FIRST;
        let mut attempt = 0u32;
        let registered = loop {
            let req = RegisterNode {
                node_id: node_id.clone(),
                agent_url: node.agent_url.clone(),
                capacity: node.capacity.clone(),
                labels: node.labels.clone(),
                instances: manager.ids(),
            };
            attempt += 1;
            match scheduler.register(&req).await {
                Ok(r) => break r,
                Err(e) => {
                    tracing::warn!(
                        attempt,
                        retry_in_ms = backoff.as_millis() as u64,
                        error = %e,
                        "cannot register with the scheduler; retrying"
                    );
                }
            }
            if sleep_or_shutdown(backoff, &mut shutdown).await {
                return;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        };
        if node_id.as_ref() != Some(&registered.node_id) {
            if let Err(e) = id_file.store(&registered.node_id) {
                tracing::error!(error = %e, "cannot persist the node id; a restart will register a new node");
            }
        }
        node_id = Some(registered.node_id.clone());
        manager.set_node_id(registered.node_id.clone());
        tracing::info!(
            node_id = %registered.node_id,
            instances = manager.ids().len(),
            "registered with the scheduler"
        );
        destroy_all(&manager, registered.destroy).await;
        let interval = Duration::from_millis(registered.heartbeat_interval_ms.clamp(50, 60_000));
        let id = registered.node_id;
        let mut failures = 0u32;
        loop {
            if sleep_or_shutdown(interval, &mut shutdown).await {
                return;
            }
            let beat = Heartbeat {
                instances: manager.ids(),
            };
            match scheduler.heartbeat(&id, &beat).await {
                Ok(resp) => {
                    if failures > 0 {
                        tracing::info!(failures, "scheduler reachable again");
                        failures = 0;
                    }
                    destroy_all(&manager, resp.destroy).await;
                    if resp.reprovision {
                        // The node reached its maximum validity: start over
                        // as a new node, with nothing running.
                        tracing::warn!(node_id = %id, "the scheduler retired this node; re-provisioning it as a new node");
                        destroy_all(&manager, manager.ids()).await;
                        if let Err(e) = id_file.clear() {
                            tracing::error!(error = %e, "cannot forget the node id");
                        }
                        node_id = None;
                        continue 'register;
                    }
                    if resp.reregister {
                        tracing::warn!(node_id = %id, "the scheduler asked this node to register again");
                        continue 'register;
                    }
                    // FC's alwaysAllocateCPU, the node's whole set each
                    // time: provision config changes reach running
                    // instances here.
                    manager
                        .set_always_allocate_cpu(&resp.always_allocate_cpu)
                        .await;
                }
                Err(InternalClientError::Remote { error, .. }) => {
                    tracing::warn!(node_id = %id, %error, "the scheduler refused the heartbeat; registering again");
                    continue 'register;
                }
                Err(e) => {
                    failures += 1;
                    // First failure, then every tenth: an outage stays visible
                    // without flooding the log.
                    if failures == 1 || failures.is_multiple_of(10) {
                        tracing::warn!(failures, error = %e, "heartbeat failed; the scheduler is unreachable");
                    }
                }
            }
        }
    }
}

async fn destroy_all(manager: &InstanceManager, ids: Vec<kiln_core::InstanceId>) {
    for id in ids {
        tracing::info!(instance_id = %id, "the scheduler does not know this instance; destroying it");
        if let Err(e) = manager.destroy(&id).await {
            tracing::error!(instance_id = %id, error = %e, "cannot destroy instance");
        }
    }
}

/// Sleep; true when shutdown was asked for instead.
async fn sleep_or_shutdown(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stopped(shutdown) => true,
    }
}

/// Resolves once shutdown is asked for (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{manager, sample_spec, FakeCodeSource, FakeDriver, FakeScheduler};
    use kiln_core::{InstanceId, SandboxKind};
    use kiln_internal_api::{CreateInstance, Tenancy};

    fn node() -> NodeDescription {
        NodeDescription {
            agent_url: "https://127.0.0.1:7443".into(),
            capacity: NodeCapacity {
                memory_mb: 1024,
                cpu_milli: 1000,
                max_instances: 4,
            },
            labels: NodeLabels {
                zone: "zone-a".into(),
                tenancy: Tenancy::Dedicated,
                sandbox_kinds: vec![SandboxKind::Container],
                dedicated_account: None,
                runtimes: Some(vec![kiln_core::RuntimeName::Custom]),
            },
        }
    }

    async fn until(what: &str, f: impl Fn() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn registers_heartbeats_destroys_and_reregisters() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let driver = Arc::new(FakeDriver::at(runtime.local_addr().unwrap()));
        let code = Arc::new(FakeCodeSource::new(Duration::ZERO));
        let digest = code.add(b"zip".to_vec());
        let manager = manager(dir.path(), driver.clone(), code);
        let id = InstanceId::generate();
        manager
            .create(CreateInstance {
                instance_id: id.clone(),
                spec: sample_spec(&digest, 9000),
                always_allocate_cpu: false,
            })
            .await
            .unwrap();

        let scheduler = Arc::new(FakeScheduler::new(20));
        scheduler.state.lock().unwrap().fail_next = 2;
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(run(
            scheduler.clone(),
            manager.clone(),
            node(),
            NodeIdFile::new(dir.path()),
            rx,
        ));
        // Unreachable twice, then registered with what runs.
        until("registration", || {
            !scheduler.state.lock().unwrap().registrations.is_empty()
        })
        .await;
        let first = scheduler.state.lock().unwrap().registrations[0].clone();
        assert_eq!(first.node_id, None);
        assert_eq!(first.instances, vec![id.clone()]);
        assert_eq!(first.capacity.max_instances, 4);
        assert_eq!(first.agent_url, "https://127.0.0.1:7443");
        until("heartbeats", || {
            scheduler.state.lock().unwrap().heartbeats.len() >= 2
        })
        .await;
        let node_id = NodeIdFile::new(dir.path()).load().unwrap();
        {
            let s = scheduler.state.lock().unwrap();
            assert_eq!(s.heartbeats[0].0, node_id);
            assert_eq!(s.heartbeats[0].1.instances, vec![id.clone()]);
        }

        // FC's alwaysAllocateCPU arrives with heartbeats, and goes with them.
        scheduler.state.lock().unwrap().always_allocate_cpu = vec![id.clone()];
        until("always-allocated", || {
            manager
                .get(id.as_str())
                .is_some_and(|i| i.always_allocate_cpu())
        })
        .await;
        scheduler.state.lock().unwrap().always_allocate_cpu = vec![];
        until("no longer always-allocated", || {
            manager
                .get(id.as_str())
                .is_some_and(|i| !i.always_allocate_cpu())
        })
        .await;

        // The scheduler does not know the instance: it goes.
        scheduler.state.lock().unwrap().destroy_next = vec![id.clone()];
        until("destroy", || manager.ids().is_empty()).await;
        assert!(driver.destroyed().contains(&id));

        // Retired: everything goes, and the node comes back as a new one.
        manager
            .create(CreateInstance {
                instance_id: InstanceId::generate(),
                spec: sample_spec(&digest, 9000),
                always_allocate_cpu: false,
            })
            .await
            .unwrap();
        assert_eq!(manager.ids().len(), 1);
        scheduler.state.lock().unwrap().reprovision_next = true;
        until("registration as a new node", || {
            scheduler.state.lock().unwrap().registrations.len() == 2
        })
        .await;
        let renewed = scheduler.state.lock().unwrap().registrations[1].clone();
        assert_eq!(renewed.node_id, None);
        assert!(renewed.instances.is_empty());
        assert!(manager.ids().is_empty());
        until("the new id on disk", || {
            NodeIdFile::new(dir.path())
                .load()
                .is_some_and(|n| n != node_id)
        })
        .await;
        let node_id = NodeIdFile::new(dir.path()).load().unwrap();

        // Written off: register again, same node id.
        scheduler.state.lock().unwrap().reregister_next = true;
        until("re-registration", || {
            scheduler.state.lock().unwrap().registrations.len() == 3
        })
        .await;
        let second = scheduler.state.lock().unwrap().registrations[2].clone();
        assert_eq!(second.node_id, Some(node_id.clone()));

        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .unwrap()
            .unwrap();

        // A restarted agent keeps its node id.
        let scheduler = Arc::new(FakeScheduler::new(20));
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(run(
            scheduler.clone(),
            manager,
            node(),
            NodeIdFile::new(dir.path()),
            rx,
        ));
        until("registration after restart", || {
            !scheduler.state.lock().unwrap().registrations.is_empty()
        })
        .await;
        assert_eq!(
            scheduler.state.lock().unwrap().registrations[0].node_id,
            Some(node_id)
        );
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn shutdown_stops_the_retry_loop() {
        let dir = tempfile::tempdir().unwrap();
        let driver = Arc::new(FakeDriver::at("127.0.0.1:1".parse().unwrap()));
        let manager = manager(
            dir.path(),
            driver,
            Arc::new(FakeCodeSource::new(Duration::ZERO)),
        );
        let scheduler = Arc::new(FakeScheduler::new(20));
        scheduler.state.lock().unwrap().fail_next = usize::MAX;
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(run(
            scheduler.clone(),
            manager,
            node(),
            NodeIdFile::new(dir.path()),
            rx,
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .unwrap()
            .unwrap();
        let s = scheduler.state.lock().unwrap();
        assert!(s.registrations.is_empty());
        assert!(s.fail_next < usize::MAX, "it tried");
        assert!(!dir.path().join("node-id").exists());
    }
}
