//! `kiln dev`: gateway, scheduler and agent in one process on one machine,
//! talking over their real mTLS APIs on loopback, with a cluster CA, a dev
//! account and an access key made on first start. Each service runs on a
//! runtime of its own ([`ServiceRuntime`]), as it would in its own process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::credentials::Credentials;
use crate::service_runtime::ServiceRuntime;

#[derive(Debug, Clone)]
pub struct DevOptions {
    pub state_dir: PathBuf,
    pub listen: SocketAddr,
    /// Prefix of every netns, veth, container and cgroup the agent makes.
    pub sandbox_prefix: String,
    pub instance_subnet: String,
    /// Where runtime root filesystems are built and cached.
    pub rootfs_dir: Option<PathBuf>,
    pub idle_timeout_s: u64,
    /// The gateway's `credentials_lifetime_s`.
    pub credentials_lifetime_s: u64,
    /// Run instances without network isolation
    /// (`sandbox.insecure_network_isolation_disabled`).
    pub insecure_no_network_isolation: bool,
    /// The gateway's `[signatures] skew_s` (None: FC's 15 minutes). The
    /// replay cache holds a skew window of nonces, so a soak shortens it
    /// to reach the cache's steady state within its run.
    pub signature_skew_s: Option<u64>,
    /// Keep pre-made sandboxes (`[sandbox.premade]`) for cold starts.
    pub premade: bool,
    /// The agent's `[images]`: the registries' CA bundle (None: the
    /// system's roots), FC's image size limit and the cache budget, in MB
    /// (None: the agent's defaults).
    pub registry_ca_bundle: Option<PathBuf>,
    pub max_image_mb: Option<u64>,
    pub image_budget_mb: Option<u64>,
}

/// The dev account and key, kept across restarts so clients stay valid.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DevAccount {
    pub(crate) account_id: String,
    pub(crate) access_key_id: String,
    pub(crate) access_key_secret: String,
}

impl DevAccount {
    pub(crate) fn load_or_create(path: &Path) -> Result<Self> {
        if let Ok(text) = std::fs::read_to_string(path) {
            return serde_json::from_str(&text).with_context(|| {
                format!(
                    "{} is corrupt; remove it to mint a new dev key",
                    path.display()
                )
            });
        }
        let mut rng = rand::thread_rng();
        let alnum = |n: usize, rng: &mut rand::rngs::ThreadRng| -> String {
            (0..n)
                .map(|_| rng.sample(rand::distributions::Alphanumeric) as char)
                .collect()
        };
        let account = Self {
            account_id: format!(
                "{}",
                rng.gen_range(1_000_000_000_000_000u64..9_999_999_999_999_999)
            ),
            access_key_id: format!("LTAI{}", alnum(20, &mut rng)),
            access_key_secret: alnum(30, &mut rng),
        };
        let creds_like = serde_json::to_string_pretty(&account)?;
        std::fs::write(path, creds_like)
            .with_context(|| format!("cannot write {}", path.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(account)
    }
}

pub(crate) fn host_memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(4096)
}

/// The host clients reach the public listener at (loopback when it
/// listens on every address).
pub(crate) fn public_host(opts: &DevOptions) -> String {
    if opts.listen.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        opts.listen.ip().to_string()
    }
}

/// The names the public certificate carries: the host, and HTTP
/// triggers' hosts `{function}-{id}.fcapp.localhost`, which curl and most
/// resolvers send to loopback.
pub(crate) fn public_names(public_host: &str) -> [String; 2] {
    [
        public_host.to_owned(),
        format!("*.{}", kiln_gateway::config::DEFAULT_TRIGGER_DOMAIN),
    ]
}

/// Credentials not yet known (filled in once the endpoint is).
pub(crate) fn placeholder_credentials() -> Credentials {
    Credentials {
        endpoint: String::new(),
        account_id: String::new(),
        access_key_id: String::new(),
        access_key_secret: String::new(),
        ca_cert: PathBuf::new(),
        security_token: None,
    }
}

/// A running one-machine cluster.
pub struct DevCluster {
    pub credentials: Credentials,
    pub credentials_path: PathBuf,
    pub pki: kiln_pki::DevPki,
    pub scheduler_url: String,
    scheduler: Service<kiln_scheduler::SchedulerHandle>,
    gateway: Service<kiln_gateway::GatewayHandle>,
    agent: Service<kiln_agent::AgentHandle>,
}

/// A running service and the runtime it runs on.
struct Service<H> {
    handle: H,
    runtime: ServiceRuntime,
}

/// Thread names of the services' runtimes (at most 15 bytes: Linux keeps
/// no more of a thread's name).
pub const GATEWAY_THREADS: &str = "kiln-gateway";
pub const SCHEDULER_THREADS: &str = "kiln-scheduler";
pub const AGENT_THREADS: &str = "kiln-agent";

impl DevCluster {
    /// Start scheduler, gateway and agent, and write credentials.json.
    pub async fn start(opts: &DevOptions) -> Result<Self> {
        let started = Self::start_until(opts, std::future::pending()).await?;
        Ok(started.expect("never stopped"))
    }

    /// [`DevCluster::start`], unless `until` resolves while the agent
    /// starts (its first start builds root filesystems for minutes): then
    /// the agent's start is abandoned and waited out (the builds it ran
    /// are ended, and it has made nothing else on the host yet), the
    /// gateway and the scheduler are shut down, and the answer is `None`.
    pub async fn start_until(
        opts: &DevOptions,
        until: impl std::future::Future<Output = ()>,
    ) -> Result<Option<Self>> {
        let state = &opts.state_dir;
        std::fs::create_dir_all(state)
            .with_context(|| format!("cannot create state directory {}", state.display()))?;
        let public_host = public_host(opts);
        let pki = kiln_pki::DevPki::ensure(&state.join("pki"), &public_names(&public_host))
            .context("cannot create the dev cluster's certificates")?;
        let account = DevAccount::load_or_create(&state.join("dev-account.json"))?;

        kiln_gateway::secrets::generate_key_file(&crate::dev_config::scheduler_key_file(opts))
            .context("cannot create the scheduler's secrets key")?;
        let runtime = ServiceRuntime::new(SCHEDULER_THREADS)?;
        let scheduler = Service {
            handle: runtime
                .run(kiln_scheduler::start(crate::dev_config::scheduler(
                    opts, &pki,
                )?))
                .await?
                .context("scheduler failed to start")?,
            runtime,
        };
        let scheduler_url = format!("https://127.0.0.1:{}", scheduler.handle.addr().port());

        let key_file = crate::dev_config::gateway_key_file(opts);
        kiln_gateway::secrets::generate_key_file(&key_file)
            .context("cannot create the gateway's secrets key")?;
        let runtime = ServiceRuntime::new(GATEWAY_THREADS)?;
        let gateway = Service {
            handle: runtime
                .run(kiln_gateway::start(crate::dev_config::gateway(
                    opts,
                    &pki,
                    &scheduler_url,
                    (
                        &account.account_id,
                        &account.access_key_id,
                        &account.access_key_secret,
                    ),
                )?))
                .await?
                .context("gateway failed to start")?,
            runtime,
        };
        let gateway_internal = format!(
            "https://127.0.0.1:{}",
            gateway.handle.internal_addr().port()
        );

        let agent_state = crate::dev_config::agent_state_dir(state);
        if !agent_state.starts_with(state) {
            tracing::info!(
                agent_state = %agent_state.display(),
                "the state directory is private to its owner, which sandboxes cannot reach; \
                 the agent keeps its instances here instead"
            );
        }
        let runtime = ServiceRuntime::new(AGENT_THREADS)?;
        let started = runtime
            .run_until(
                kiln_agent::start(crate::dev_config::agent(
                    opts,
                    &agent_state,
                    &pki,
                    &scheduler_url,
                    &gateway_internal,
                    gateway.handle.public_addr().port(),
                    host_memory_mb(),
                )?),
                until,
            )
            .await?;
        let Some(started) = started else {
            warn_unless_stopped(GATEWAY_THREADS, stop(gateway, |h| h.shutdown()).await);
            warn_unless_stopped(SCHEDULER_THREADS, stop(scheduler, |h| h.shutdown()).await);
            return Ok(None);
        };
        let agent = Service {
            handle: started.context("agent failed to start")?,
            runtime,
        };

        let endpoint = format!(
            "https://{}:{}",
            public_host,
            gateway.handle.public_addr().port()
        );
        let credentials = Credentials {
            endpoint,
            account_id: account.account_id.clone(),
            access_key_id: account.access_key_id.clone(),
            access_key_secret: account.access_key_secret.clone(),
            ca_cert: pki.ca_cert(),
            security_token: None,
        };
        // Where the internal APIs listen, for operators and tests (they
        // need a certificate from pki/ to call them).
        let cluster = serde_json::json!({
            "schedulerUrl": scheduler_url,
            "gatewayInternalUrl": gateway_internal,
            "agentUrl": format!("https://127.0.0.1:{}", agent.handle.addr().port()),
        });
        std::fs::write(state.join("cluster.json"), cluster.to_string())
            .with_context(|| format!("cannot write {}", state.join("cluster.json").display()))?;
        let credentials_path = state.join("credentials.json");
        credentials.write(&credentials_path)?;
        Ok(Some(Self {
            credentials,
            credentials_path,
            pki,
            scheduler_url,
            scheduler,
            gateway,
            agent,
        }))
    }

    /// Where the agent's internal (mTLS) API listens.
    pub fn agent_addr(&self) -> SocketAddr {
        self.agent.handle.addr()
    }

    /// Stop the agent first (it removes its sandboxes), then the others,
    /// each on its own runtime.
    /// Leases the scheduler took back at expiry: each one a slot a
    /// gateway held longer than granted (0 on a healthy cluster).
    pub fn leases_written_off(&self) -> u64 {
        self.scheduler
            .handle
            .scheduler()
            .metrics()
            .leases_written_off
            .get()
    }

    /// Every service's metrics in Prometheus' text format, one after the
    /// other (their names carry the service's prefix).
    pub fn metrics_text(&self) -> String {
        [
            self.gateway.handle.metrics_text(),
            self.scheduler.handle.scheduler().metrics().render(),
            self.agent.handle.metrics_text(),
        ]
        .join("\n")
    }

    pub async fn shutdown(self) {
        warn_unless_stopped(AGENT_THREADS, stop(self.agent, |h| h.shutdown()).await);
        warn_unless_stopped(GATEWAY_THREADS, stop(self.gateway, |h| h.shutdown()).await);
        warn_unless_stopped(
            SCHEDULER_THREADS,
            stop(self.scheduler, |h| h.shutdown()).await,
        );
    }
}

/// Say so when a service's shutdown failed (the others still stop).
fn warn_unless_stopped(service: &str, stopped: Result<()>) {
    if let Err(e) = stopped {
        tracing::warn!(service, error = %format!("{e:#}"), "shutdown failed");
    }
}

/// Run a service's shutdown on its own runtime, then end that runtime.
async fn stop<H, F>(service: Service<H>, shutdown: impl FnOnce(H) -> F) -> Result<()>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    service.runtime.run(shutdown(service.handle)).await
}

/// Start everything, serve until SIGINT/SIGTERM.
pub async fn run(opts: DevOptions) -> Result<()> {
    let mut signals = kiln_service::signals::StopSignals::install()
        .context("Cannot install the SIGTERM and SIGINT handlers")?;
    // The first start builds root filesystems for minutes: a signal
    // meanwhile stops it there.
    let stopped = std::cell::Cell::new(None);
    let stop = async {
        stopped.set(Some(signals.recv().await));
    };
    let Some(cluster) = DevCluster::start_until(&opts, stop).await? else {
        tracing::info!(
            signal = stopped.get().unwrap_or("a stop signal"),
            "stopped before it finished starting"
        );
        return Ok(());
    };
    tracing::info!(
        endpoint = %cluster.credentials.endpoint,
        credentials = %cluster.credentials_path.display(),
        account_id = %cluster.credentials.account_id,
        "kiln dev is ready"
    );
    println!("kiln dev is ready: {}", cluster.credentials.endpoint);
    println!("credentials: {}", cluster.credentials_path.display());
    let signal = signals.recv().await;
    tracing::info!(signal, "shutting down");
    cluster.shutdown().await;
    Ok(())
}
