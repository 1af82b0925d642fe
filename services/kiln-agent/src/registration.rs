//! The node's membership in the cluster: register with the scheduler (with
//! capacity, labels and the instances running now), then heartbeat; destroy
//! what the scheduler does not know; register again when it asks.
//!
//! The node id is the one the agent's certificate names
//! (`spiffe://<cluster>/agent/<node-id>`, see [`node_identity`]): the
//! scheduler admits an agent only for that node, so there is no id to
//! assign or to keep on disk.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kiln_core::NodeId;
use kiln_internal_api::Endpoints;
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

/// The real scheduler, over mTLS: the one leading among `endpoints`.
pub struct HttpScheduler {
    client: InternalClient,
    endpoints: Endpoints,
}

impl HttpScheduler {
    pub fn new(client: InternalClient, endpoints: Endpoints) -> Self {
        Self {
            client: client.with_timeout(Duration::from_secs(10)),
            endpoints,
        }
    }
}

#[async_trait::async_trait]
impl SchedulerApi for HttpScheduler {
    async fn register(
        &self,
        req: &RegisterNode,
    ) -> Result<RegisterNodeResponse, InternalClientError> {
        self.endpoints
            .call(|base| async move { self.client.post(&base, paths::NODES_REGISTER, req).await })
            .await
    }

    async fn heartbeat(
        &self,
        node: &NodeId,
        req: &Heartbeat,
    ) -> Result<HeartbeatResponse, InternalClientError> {
        let path = paths::node_heartbeat(node);
        self.endpoints
            .call(|base| {
                let path = &path;
                async move { self.client.post(&base, path, req).await }
            })
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

/// Why the agent's certificate cannot name its node.
#[derive(Debug, thiserror::Error)]
pub enum NodeIdentityError {
    #[error("cannot read the agent certificate {path}")]
    Load {
        path: std::path::PathBuf,
        #[source]
        source: kiln_pki::PkiError,
    },
    #[error("the agent certificate {path} names no Kiln identity ({source}); issue one with `kiln-pki issue DIR agent <node-id> NAME...` (nix/kiln-pki.sh, see docs/joining.md)")]
    NoIdentity {
        path: std::path::PathBuf,
        #[source]
        source: kiln_pki::IdentityError,
    },
    #[error("the agent certificate {path} is a {role} certificate, not an agent's (spiffe://<cluster>/agent/<node-id>); issue one with `kiln-pki issue DIR agent <node-id> NAME...` (nix/kiln-pki.sh, see docs/joining.md)")]
    NotAnAgent {
        path: std::path::PathBuf,
        role: kiln_pki::Role,
    },
}

/// The node the agent certificate at `cert` names: the agent's node id.
pub fn node_identity(cert: &Path) -> Result<NodeId, NodeIdentityError> {
    let certs = kiln_pki::load_certs(cert).map_err(|source| NodeIdentityError::Load {
        path: cert.to_owned(),
        source,
    })?;
    let leaf = certs.first().ok_or_else(|| NodeIdentityError::NoIdentity {
        path: cert.to_owned(),
        source: kiln_pki::IdentityError::Missing,
    })?;
    let identity = kiln_pki::Identity::from_certificate(leaf).map_err(|source| {
        NodeIdentityError::NoIdentity {
            path: cert.to_owned(),
            source,
        }
    })?;
    identity
        .node()
        .cloned()
        .ok_or_else(|| NodeIdentityError::NotAnAgent {
            path: cert.to_owned(),
            role: identity.role(),
        })
}

/// Register, heartbeat, repeat, until `shutdown` turns true.
pub async fn run(
    scheduler: Arc<dyn SchedulerApi>,
    manager: Arc<InstanceManager>,
    node: NodeDescription,
    node_id: NodeId,
    mut shutdown: watch::Receiver<bool>,
) {
    manager.set_node_id(node_id.clone());
    'register: loop {
        let mut backoff = BACKOFF_FIRST;
        let mut attempt = 0u32;
        let registered = loop {
            let req = RegisterNode {
                node_id: Some(node_id.clone()),
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
        if registered.node_id != node_id {
            // A scheduler that predates certificate identities: it must
            // not move this node under another id.
            tracing::error!(
                node_id = %node_id,
                answered = %registered.node_id,
                "the scheduler answered another node id than this agent's certificate names; retrying"
            );
            if sleep_or_shutdown(BACKOFF_MAX, &mut shutdown).await {
                return;
            }
            continue 'register;
        }
        tracing::info!(
            node_id = %node_id,
            instances = manager.ids().len(),
            "registered with the scheduler"
        );
        if let Some(t) = registered.leader_token {
            manager.leader().observe(t);
        }
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
                    if let Some(t) = resp.leader_token {
                        manager.leader().observe(t);
                    }
                    destroy_all(&manager, resp.destroy).await;
                    if resp.reprovision {
                        // The node reached its maximum validity: start over
                        // with nothing running (same id: its certificate's).
                        tracing::warn!(node_id = %id, "the scheduler retired this node; re-provisioning it empty");
                        destroy_all(&manager, manager.ids()).await;
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
                network_isolation: Default::default(),
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
        let node_id: NodeId = "n-test".parse().unwrap();
        let task = tokio::spawn(run(
            scheduler.clone(),
            manager.clone(),
            node(),
            node_id.clone(),
            rx,
        ));
        // Unreachable twice, then registered with what runs.
        until("registration", || {
            !scheduler.state.lock().unwrap().registrations.is_empty()
        })
        .await;
        let first = scheduler.state.lock().unwrap().registrations[0].clone();
        assert_eq!(first.node_id, Some(node_id.clone()));
        assert_eq!(first.instances, vec![id.clone()]);
        assert_eq!(first.capacity.max_instances, 4);
        assert_eq!(first.agent_url, "https://127.0.0.1:7443");
        until("heartbeats", || {
            scheduler.state.lock().unwrap().heartbeats.len() >= 2
        })
        .await;
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

        // A new leader's token arrives with the heartbeats: calls stamped
        // with an older leader's are refused from then on.
        manager.leader().admit(Some(3)).unwrap();
        scheduler.state.lock().unwrap().leader_token = Some(4);
        until("the new leader's token", || {
            manager.leader().admit(Some(3)).is_err()
        })
        .await;
        manager.leader().admit(Some(4)).unwrap();

        // The scheduler does not know the instance: it goes.
        scheduler.state.lock().unwrap().destroy_next = vec![id.clone()];
        until("destroy", || manager.ids().is_empty()).await;
        assert!(driver.destroyed().contains(&id));

        // Retired: everything goes, and the node comes back empty.
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
        until("registration of the re-provisioned node", || {
            scheduler.state.lock().unwrap().registrations.len() == 2
        })
        .await;
        let renewed = scheduler.state.lock().unwrap().registrations[1].clone();
        assert_eq!(renewed.node_id, Some(node_id.clone()));
        assert!(renewed.instances.is_empty());
        assert!(manager.ids().is_empty());

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

        // A restarted agent registers its certificate's node again.
        let scheduler = Arc::new(FakeScheduler::new(20));
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(run(scheduler.clone(), manager, node(), node_id.clone(), rx));
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

    #[test]
    fn the_node_id_is_the_certificates_and_other_certificates_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pki = kiln_pki::DevPki::ensure(dir.path(), &[]).unwrap();
        let node: NodeId = "n-a1".parse().unwrap();
        let files = pki.agent(&node).unwrap();
        assert_eq!(node_identity(&files.cert).unwrap(), node);
        let e = node_identity(&pki.files("gateway-internal").cert).unwrap_err();
        assert!(
            matches!(
                e,
                NodeIdentityError::NotAnAgent {
                    role: kiln_pki::Role::Gateway,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string().contains("kiln-pki issue DIR agent <node-id>"),
            "{e}"
        );
        // The public listener's certificate names no cluster identity.
        let e = node_identity(&pki.files("gateway").cert).unwrap_err();
        assert!(matches!(e, NodeIdentityError::NoIdentity { .. }), "{e}");
        let e = node_identity(&dir.path().join("missing.pem")).unwrap_err();
        assert!(matches!(e, NodeIdentityError::Load { .. }), "{e}");
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
            "n-test".parse().unwrap(),
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
