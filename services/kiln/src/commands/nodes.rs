//! `kiln nodes list|cordon|drain|uncordon` and `kiln limits
//! get|set|reset`: the scheduler's admin API,
//! reached with the dev cluster's certificate (`<state>/pki`) at the
//! address `kiln dev` wrote to `<state>/cluster.json`.

use std::path::Path;

use anyhow::{Context, Result};
use kiln_core::{AccountId, NodeId};
use kiln_internal_api::{paths, trust_paths, AccountLimits, InternalClient, NodeInfo};

/// The scheduler, and a client with a cluster certificate.
pub struct Scheduler {
    pub url: String,
    client: InternalClient,
}

impl Scheduler {
    /// The scheduler of the `kiln dev` at `state_dir`, as the operator.
    pub fn from_state_dir(state_dir: &Path) -> Result<Self> {
        let (url, client) = super::operator::connect(state_dir, "schedulerUrl")?;
        Ok(Self { url, client })
    }

    pub async fn list(&self) -> Result<Vec<NodeInfo>> {
        self.client
            .get(&self.url, paths::SCHEDULER_NODES)
            .await
            .context("cannot list nodes")
    }

    /// `action` is `cordon`, `drain` or `uncordon`; answers the node.
    pub async fn act(&self, node: &str, action: &str) -> Result<NodeInfo> {
        let id: NodeId = node
            .parse()
            .with_context(|| format!("{node:?} is not a node id"))?;
        self.client
            .post(&self.url, &paths::node_action(&id, action), &())
            .await
            .with_context(|| format!("cannot {action} node {node}"))
    }
}

impl Scheduler {
    /// Revoke every certificate of `node`, for good.
    pub async fn revoke(&self, node: &str) -> Result<kiln_internal_api::NodeRevoked> {
        let id: NodeId = node
            .parse()
            .with_context(|| format!("{node:?} is not a node id"))?;
        self.client
            .post(&self.url, &trust_paths::node_revoke(&id), &())
            .await
            .with_context(|| format!("cannot revoke node {node}"))
    }

    /// A single-use bootstrap token valid for `ttl`.
    pub async fn bootstrap_token(
        &self,
        ttl: std::time::Duration,
        node: Option<&str>,
    ) -> Result<kiln_internal_api::BootstrapToken> {
        let node_id = node
            .map(|n| {
                n.parse::<NodeId>()
                    .with_context(|| format!("{n:?} is not a node id"))
            })
            .transpose()?;
        self.client
            .post(
                &self.url,
                trust_paths::BOOTSTRAP_TOKENS,
                &kiln_internal_api::CreateBootstrapToken {
                    ttl_s: ttl.as_secs(),
                    node_id,
                },
            )
            .await
            .context("cannot create a bootstrap token")
    }
}

fn account(id: &str) -> Result<AccountId> {
    id.parse()
        .with_context(|| format!("{id:?} is not an account id"))
}

impl Scheduler {
    /// The limits in force for the account (its own or the defaults).
    pub async fn limits(&self, account_id: &str) -> Result<AccountLimits> {
        let a = account(account_id)?;
        self.client
            .get(&self.url, &paths::account_limits(&a))
            .await
            .with_context(|| format!("cannot read the limits of account {account_id}"))
    }

    /// Replace the account's limits (validated whole by the scheduler).
    pub async fn set_limits(
        &self,
        account_id: &str,
        limits: &AccountLimits,
    ) -> Result<AccountLimits> {
        let a = account(account_id)?;
        self.client
            .call(
                http::Method::PUT,
                &self.url,
                &paths::account_limits(&a),
                Some(limits),
            )
            .await
            .with_context(|| format!("cannot set the limits of account {account_id}"))
    }

    /// Back to the defaults.
    pub async fn reset_limits(&self, account_id: &str) -> Result<()> {
        let a = account(account_id)?;
        self.client
            .delete(&self.url, &paths::account_limits(&a))
            .await
            .with_context(|| format!("cannot reset the limits of account {account_id}"))
    }
}

/// Read limits from a JSON file (`-` for stdin).
pub fn read_limits(path: &Path) -> Result<AccountLimits> {
    let text = if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
        s
    } else {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?
    };
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid limits JSON", path.display()))
}

pub fn print_table(nodes: &[NodeInfo]) {
    println!(
        "{:<36} {:<9} {:<8} {:<13} {:>9} {:>15}  AGENT",
        "NODE", "STATE", "ZONE", "TENANCY", "INSTANCES", "MEMORY MB"
    );
    for n in nodes {
        let tenancy = match n.labels.tenancy {
            kiln_internal_api::Tenancy::MultiTenant => "multi-tenant",
            kiln_internal_api::Tenancy::Dedicated => "dedicated",
        };
        println!(
            "{:<36} {:<9} {:<8} {:<13} {:>9} {:>15}  {}",
            n.node_id,
            n.state,
            n.labels.zone,
            tenancy,
            n.instances,
            format!("{}/{}", n.memory_used_mb, n.capacity.memory_mb),
            n.agent_url
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::SandboxKind;
    use kiln_internal_api::{
        NodeCapacity, NodeLabels, RegisterNode, RegisterNodeResponse, Tenancy,
    };

    #[tokio::test]
    async fn list_cordon_drain_uncordon_against_a_real_scheduler() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path();
        let pki = kiln_pki::DevPki::ensure(&state.join("pki"), &[]).unwrap();
        let handle = kiln_scheduler::start(kiln_scheduler::SchedulerConfig::new(
            state.join("scheduler"),
            "127.0.0.1:0".parse().unwrap(),
            pki.files("scheduler"),
        ))
        .await
        .unwrap();
        let url = format!("https://127.0.0.1:{}", handle.addr().port());

        // Without cluster.json: a clear error.
        let err = Scheduler::from_state_dir(state).err().unwrap();
        assert!(format!("{err:#}").contains("cluster.json"), "{err:#}");
        std::fs::write(
            state.join("cluster.json"),
            serde_json::json!({ "schedulerUrl": url }).to_string(),
        )
        .unwrap();
        let s = Scheduler::from_state_dir(state).unwrap();

        let agent = InternalClient::new(&pki.files("agent")).unwrap();
        let reg: RegisterNodeResponse = agent
            .post(
                &url,
                paths::NODES_REGISTER,
                &RegisterNode {
                    node_id: None,
                    agent_url: "https://127.0.0.1:1".into(),
                    capacity: NodeCapacity {
                        memory_mb: 1024,
                        cpu_milli: 1000,
                        max_instances: 10,
                    },
                    labels: NodeLabels {
                        zone: "zone-a".into(),
                        tenancy: Tenancy::Dedicated,
                        sandbox_kinds: vec![SandboxKind::Container],
                        dedicated_account: None,
                        runtimes: None,
                        network_isolation: Default::default(),
                    },
                    instances: vec![],
                },
            )
            .await
            .unwrap();
        let id = reg.node_id.to_string();
        let nodes = s.list().await.unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].state, "ready");
        print_table(&nodes);
        assert_eq!(s.act(&id, "cordon").await.unwrap().state, "cordoned");
        assert_eq!(s.act(&id, "drain").await.unwrap().state, "draining");
        assert_eq!(s.act(&id, "uncordon").await.unwrap().state, "ready");
        let err = s.act("no/such", "drain").await.unwrap_err();
        assert!(format!("{err:#}").contains("not a node id"), "{err:#}");
        let err = s.act("n-unknown", "drain").await.unwrap_err();
        assert!(format!("{err:#}").contains("not registered"), "{err:#}");
        // Revoking: the node is retired for good; a token needs a signing
        // CA, which this scheduler has not.
        let r = s.revoke(&id).await.unwrap();
        assert_eq!(r.node_id.to_string(), id);
        assert_eq!(s.list().await.unwrap()[0].state, "retired");
        let err = s
            .bootstrap_token(std::time::Duration::from_secs(60), None)
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("[certificates]"), "{err:#}");

        // Limits: read, replace from a file, refuse nonsense, reset.
        let defaults = s.limits("42").await.unwrap();
        assert_eq!(defaults.burst_instances, 300);
        let file = state.join("limits.json");
        let mut mine = defaults.clone();
        mine.burst_instances = 5;
        std::fs::write(&file, serde_json::to_string(&mine).unwrap()).unwrap();
        let stored = s
            .set_limits("42", &read_limits(&file).unwrap())
            .await
            .unwrap();
        assert_eq!(stored.burst_instances, 5);
        mine.burst_instances = 0;
        let err = s.set_limits("42", &mine).await.unwrap_err();
        assert!(format!("{err:#}").contains("burst_instances"), "{err:#}");
        std::fs::write(&file, r#"{"burst":1}"#).unwrap();
        assert!(read_limits(&file).is_err());
        s.reset_limits("42").await.unwrap();
        assert_eq!(s.limits("42").await.unwrap(), defaults);
        assert!(s.limits("not-an-account!").await.is_err());
        handle.shutdown().await;
    }
}
