//! `kiln dev --postgres URL --gateways N`: a cluster on one machine. N
//! gateways and two schedulers (a leader and a standby) run as OS
//! processes of their own against one PostgreSQL database, HAProxy in
//! front of the gateways is the endpoint clients get, and the agent runs
//! in this process as in the one-box `kiln dev`.
//!
//! The agent stays in-process: it is the compute node, not part of the
//! control plane this topology makes redundant; it needs the private
//! mount namespace `kiln dev` enters before any thread starts, and its
//! sandboxes then live and are drained exactly as the one-box `kiln dev`'s
//! (one process whose stop removes them). The services run from this same
//! binary (`kiln serve ...`, hidden), so one `kiln` binary is all a fresh
//! machine needs. `DIR/cluster.json` lists every process with its role,
//! pid and address, rewritten whenever one is started again.

pub mod haproxy;
pub mod supervisor;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kiln_internal_api::{paths, InternalClient};

use crate::commands::dev::{self, DevAccount, DevOptions};
use crate::credentials::Credentials;
use crate::dev_config::{self, ClusterDatabase};
use crate::service_runtime::ServiceRuntime;
use supervisor::{ProcessInfo, Role, Spec, Supervisor};

/// What `--postgres`, `--postgres-password-file` and `--gateways` ask for.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub database: ClusterDatabase,
    pub gateways: usize,
}

/// The schedulers: one leads, the other stands by.
const SCHEDULERS: [&str; 2] = ["scheduler-a", "scheduler-b"];
/// How long a service has to come up (a gateway's first start migrates
/// the database).
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// A scheduler that died is started again only after its lease (the
/// default 5 s) has run out: the standby takes over, as it would when a
/// machine is lost, and the restarted one stands by.
const SCHEDULER_RESTART_DELAY: Duration = Duration::from_secs(6);
/// The order children stop in: gateways drain while HAProxy still routes
/// to the others, then HAProxy, then the schedulers.
const STOP_ORDER: [Role; 3] = [Role::Gateway, Role::Haproxy, Role::Scheduler];

/// A running cluster.
pub struct Cluster {
    pub credentials: Credentials,
    pub credentials_path: PathBuf,
    pub cluster_json: PathBuf,
    supervisor: Supervisor,
    agent: Option<(kiln_agent::AgentHandle, ServiceRuntime)>,
    /// Keeps `cluster.json`'s `schedulerUrl` on the leader.
    follower: Option<Follower>,
}

/// The task of [`follow_the_leader`], ended with the cluster.
struct Follower(tokio::task::JoinHandle<()>);

impl Drop for Follower {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `cluster.json`: the fixed part (URLs) and the processes, rewritten on
/// every change.
struct ClusterFile {
    path: PathBuf,
    fixed: serde_json::Map<String, serde_json::Value>,
    /// Processes the supervisor does not run (the agent in this process).
    others: Vec<ProcessInfo>,
    children: Vec<ProcessInfo>,
}

impl ClusterFile {
    fn write(&self) {
        let mut v = self.fixed.clone();
        let processes: Vec<&ProcessInfo> = self.children.iter().chain(&self.others).collect();
        v.insert(
            "processes".into(),
            serde_json::to_value(processes).expect("serializable"),
        );
        let text = serde_json::Value::Object(v).to_string();
        let tmp = self.path.with_extension("json.tmp");
        let written = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write cluster.json");
        }
    }
}

impl Cluster {
    pub async fn start(opts: &DevOptions, cluster: &ClusterOptions) -> Result<Self> {
        if cluster.gateways == 0 {
            bail!("--gateways must be at least 1");
        }
        let state = &opts.state_dir;
        std::fs::create_dir_all(state)
            .with_context(|| format!("cannot create state directory {}", state.display()))?;
        let public_host = dev::public_host(opts);
        let pki = kiln_pki::DevPki::ensure(&state.join("pki"), &dev::public_names(&public_host))
            .context("cannot create the dev cluster's certificates")?;
        let account = DevAccount::load_or_create(&state.join("dev-account.json"))?;
        kiln_gateway::secrets::generate_key_file(&dev_config::scheduler_key_file(opts))
            .context("cannot create the schedulers' secrets key")?;
        kiln_gateway::secrets::generate_key_file(&dev_config::gateway_key_file(opts))
            .context("cannot create the gateways' secrets key")?;
        let haproxy_bin = haproxy::find()?;
        // HAProxy takes --listen; say now, not after its restarts, that
        // something else holds it.
        drop(std::net::TcpListener::bind(opts.listen).with_context(|| {
            format!(
                "cannot listen on {} for HAProxy (is another kiln dev running? see --listen)",
                opts.listen
            )
        })?);
        // The last run's processes are gone: its list must not outlive them.
        let _ = std::fs::remove_file(state.join("cluster.json"));
        let kiln_bin = std::env::current_exe().context("cannot find the kiln binary to run")?;
        let dir = state.join("cluster");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;

        let file = Arc::new(Mutex::new(ClusterFile {
            path: state.join("cluster.json"),
            fixed: serde_json::Map::new(),
            others: vec![],
            children: vec![],
        }));
        let on_change = {
            let file = file.clone();
            move |children: &[ProcessInfo]| {
                let mut f = file.lock().expect("not poisoned");
                f.children = children.to_vec();
                if !f.fixed.is_empty() {
                    f.write();
                }
            }
        };
        let supervisor = Supervisor::new(&STOP_ORDER, on_change)?;
        let mut running = Self {
            credentials: dev::placeholder_credentials(),
            credentials_path: state.join("credentials.json"),
            cluster_json: state.join("cluster.json"),
            supervisor,
            agent: None,
            follower: None,
        };
        let operator =
            InternalClient::new(&pki.files("operator"))?.with_timeout(Duration::from_secs(3));

        // The schedulers, one after the other: the first leads (it creates
        // the election's tables), the second stands by.
        let mut scheduler_urls = vec![];
        for name in SCHEDULERS {
            let port = free_port()?;
            let config = dev_config::cluster_scheduler(opts, &pki, name, port, &cluster.database)?;
            let config_path = write_private(&dir.join(format!("{name}.toml")), &config)?;
            let url = format!("https://127.0.0.1:{port}");
            running
                .supervisor
                .start(Spec {
                    name: name.into(),
                    role: Role::Scheduler,
                    address: format!("127.0.0.1:{port}"),
                    internal_address: None,
                    program: kiln_bin.clone(),
                    args: serve_args("scheduler", &config_path),
                    log: dir.join(format!("{name}.log")),
                    min_restart_delay: SCHEDULER_RESTART_DELAY,
                })
                .await?;
            scheduler_urls.push(url);
            // Led (the first) or standing by (NotLeader): it answers.
            wait_for(
                &format!("{name} to answer"),
                (&dir, &file),
                &[name],
                || async {
                    match operator
                        .get::<serde_json::Value>(
                            scheduler_urls.last().expect("one"),
                            paths::HEALTH,
                        )
                        .await
                    {
                        Ok(_) => true,
                        Err(kiln_internal_api::InternalClientError::Remote { error, .. }) => {
                            error.kind == Some(kiln_core::FcErrorKind::NotLeader)
                        }
                        Err(_) => false,
                    }
                },
            )
            .await?;
        }
        let scheduler_url = scheduler_urls.join(",");

        // The gateways; wait for each to be healthy.
        let mut backends = vec![];
        let names: Vec<String> = (1..=cluster.gateways)
            .map(|i| format!("gateway-{i}"))
            .collect();
        let key = (
            account.account_id.as_str(),
            account.access_key_id.as_str(),
            account.access_key_secret.as_str(),
        );
        for name in &names {
            let (public, internal) = (free_port()?, free_port()?);
            let config = dev_config::cluster_gateway(
                opts,
                &pki,
                name,
                (public, internal),
                opts.listen.port(),
                &scheduler_url,
                &cluster.database,
                haproxy::GATEWAY_DRAIN_MS,
                key,
            )?;
            let config_path = write_private(&dir.join(format!("{name}.toml")), &config)?;
            let backend = haproxy::Backend {
                name: name.clone(),
                public: SocketAddr::from(([127, 0, 0, 1], public)),
                internal: SocketAddr::from(([127, 0, 0, 1], internal)),
            };
            running
                .supervisor
                .start(Spec {
                    name: name.clone(),
                    role: Role::Gateway,
                    address: backend.public.to_string(),
                    internal_address: Some(backend.internal.to_string()),
                    program: kiln_bin.clone(),
                    args: serve_args("gateway", &config_path),
                    log: dir.join(format!("{name}.log")),
                    min_restart_delay: Duration::ZERO,
                })
                .await?;
            // One at a time: the first migrates the database.
            let probe = healthz_client(&pki, backend.public, key)?;
            wait_for(
                &format!("{name} to be healthy"),
                (&dir, &file),
                &[name],
                || async { healthy(&probe).await },
            )
            .await?;
            backends.push(backend);
        }

        // HAProxy in front of them.
        let internal = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let topology = haproxy::Topology {
            public: opts.listen,
            internal,
            gateways: backends,
            ca_file: pki.ca_cert(),
            maxconn: haproxy::maxconn_within(
                &std::fs::read_to_string("/proc/self/limits").unwrap_or_default(),
            ),
        };
        let config_path = dir.join("haproxy.cfg");
        std::fs::write(&config_path, haproxy::config(&topology))
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        let checked = std::process::Command::new(&haproxy_bin)
            .arg("-c")
            .arg("-f")
            .arg(&config_path)
            .output()
            .with_context(|| format!("cannot run {}", haproxy_bin.display()))?;
        if !checked.status.success() {
            bail!(
                "HAProxy refuses {}: {}{}",
                config_path.display(),
                String::from_utf8_lossy(&checked.stdout),
                String::from_utf8_lossy(&checked.stderr)
            );
        }
        let mut args = vec!["serve".into(), "exec".into(), "--".into()];
        args.push(haproxy_bin.into_os_string());
        args.extend(["-db".into(), "-f".into(), config_path.into_os_string()]);
        running
            .supervisor
            .start(Spec {
                name: "haproxy".into(),
                role: Role::Haproxy,
                address: opts.listen.to_string(),
                internal_address: Some(internal.to_string()),
                program: kiln_bin.clone(),
                args,
                log: dir.join("haproxy.log"),
                min_restart_delay: Duration::ZERO,
            })
            .await?;
        let endpoint_port = opts.listen.port();
        let through = healthz_client(&pki, SocketAddr::from(([127, 0, 0, 1], endpoint_port)), key)?;
        wait_for(
            "HAProxy to reach a gateway",
            (&dir, &file),
            &["haproxy"],
            || async { healthy(&through).await },
        )
        .await?;
        let gateway_internal = format!("https://{internal}");

        // The agent, in this process.
        let agent_state = dev_config::agent_state_dir(state);
        let runtime = ServiceRuntime::new(dev::AGENT_THREADS)?;
        let agent = runtime
            .run(kiln_agent::start(dev_config::agent(
                opts,
                &agent_state,
                &pki,
                &scheduler_url,
                &gateway_internal,
                endpoint_port,
                dev::host_memory_mb(),
            )?))
            .await?
            .context("agent failed to start")?;
        let agent_addr = format!("127.0.0.1:{}", agent.addr().port());
        let agent_url = format!("https://{agent_addr}");
        running.agent = Some((agent, runtime));

        let endpoint = format!("https://{public_host}:{endpoint_port}");
        running.credentials = Credentials {
            endpoint: endpoint.clone(),
            account_id: account.account_id.clone(),
            access_key_id: account.access_key_id.clone(),
            access_key_secret: account.access_key_secret.clone(),
            ca_cert: pki.ca_cert(),
            security_token: None,
        };
        {
            let mut f = file.lock().expect("not poisoned");
            let fixed = serde_json::json!({
                "endpoint": endpoint,
                // The one that leads (`kiln nodes`, `kiln limits` call it),
                // kept current by `follow_the_leader`.
                "schedulerUrl": scheduler_urls[0],
                "schedulerUrls": scheduler_urls,
                "gatewayInternalUrl": gateway_internal,
                "agentUrl": agent_url,
            });
            f.fixed = fixed.as_object().expect("an object").clone();
            f.others = vec![ProcessInfo {
                name: "agent".into(),
                role: Role::Agent,
                pid: Some(std::process::id()),
                address: agent_addr,
                internal_address: None,
                log: None,
                restarts: 0,
            }];
            f.write();
        }
        running.follower = Some(Follower(tokio::spawn(follow_the_leader(
            file.clone(),
            operator,
            scheduler_urls,
        ))));
        running.credentials.write(&running.credentials_path)?;
        Ok(running)
    }

    /// Stop the agent first (it removes its sandboxes), then the children
    /// by pid: gateways, HAProxy, schedulers.
    pub async fn shutdown(mut self) {
        self.follower.take();
        if let Some((agent, runtime)) = self.agent.take() {
            if let Err(e) = runtime.run(agent.shutdown()).await {
                tracing::warn!(error = %format!("{e:#}"), "the agent's shutdown failed");
            }
        }
        self.supervisor.stop().await;
    }
}

/// Start the cluster, serve until SIGINT/SIGTERM, stop it.
pub async fn run(opts: DevOptions, cluster: ClusterOptions) -> Result<()> {
    let mut signals = kiln_service::signals::StopSignals::install()
        .context("Cannot install the SIGTERM and SIGINT handlers")?;
    let running = tokio::select! {
        started = Cluster::start(&opts, &cluster) => started?,
        signal = signals.recv() => {
            tracing::info!(signal, "stopped before the cluster finished starting");
            return Ok(());
        }
    };
    tracing::info!(
        endpoint = %running.credentials.endpoint,
        credentials = %running.credentials_path.display(),
        cluster = %running.cluster_json.display(),
        gateways = cluster.gateways,
        "kiln dev is ready (a cluster on PostgreSQL behind HAProxy)"
    );
    println!("kiln dev is ready: {}", running.credentials.endpoint);
    println!("credentials: {}", running.credentials_path.display());
    println!("processes: {}", running.cluster_json.display());
    let signal = signals.recv().await;
    tracing::info!(signal, "shutting down");
    running.shutdown().await;
    Ok(())
}

/// Every second, find the scheduler that leads and, when it changed, name
/// it as `schedulerUrl` in `cluster.json` (the operator commands call that
/// one; a standby only answers `NotLeader`).
async fn follow_the_leader(
    file: Arc<Mutex<ClusterFile>>,
    operator: InternalClient,
    urls: Vec<String>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let mut leader = None;
        for url in &urls {
            if operator
                .get::<serde_json::Value>(url, paths::HEALTH)
                .await
                .is_ok()
            {
                leader = Some(url.clone());
                break;
            }
        }
        let Some(leader) = leader else { continue };
        let mut f = file.lock().expect("not poisoned");
        if f.fixed.get("schedulerUrl").and_then(|u| u.as_str()) != Some(leader.as_str()) {
            tracing::info!(leader = %leader, "the scheduler leadership moved");
            f.fixed.insert("schedulerUrl".into(), leader.into());
            f.write();
        }
    }
}

fn serve_args(service: &str, config: &Path) -> Vec<std::ffi::OsString> {
    vec![
        "serve".into(),
        service.into(),
        "--config".into(),
        config.as_os_str().to_owned(),
    ]
}

/// Write a file only its owner reads (configs hold the dev key and may
/// hold the database URL's password).
fn write_private(path: &Path, text: &str) -> Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path.to_owned())
}

/// A free loopback port (the services need fixed ones: HAProxy and the
/// other scheduler name them).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(l.local_addr()?.port())
}

/// A client of one gateway's public listener for `/healthz`.
fn healthz_client(
    pki: &kiln_pki::DevPki,
    addr: SocketAddr,
    (account_id, access_key_id, secret): (&str, &str, &str),
) -> Result<crate::client::FcClient> {
    Ok(crate::client::FcClient::new(Credentials {
        endpoint: format!("https://{addr}"),
        account_id: account_id.into(),
        access_key_id: access_key_id.into(),
        access_key_secret: secret.into(),
        ca_cert: pki.ca_cert(),
        security_token: None,
    })?)
}

async fn healthy(client: &crate::client::FcClient) -> bool {
    let asked = tokio::time::timeout(
        Duration::from_secs(3),
        client.request(http::Method::GET, "/healthz", &[], &[], bytes::Bytes::new()),
    )
    .await;
    matches!(asked, Ok(Ok(r)) if r.status == http::StatusCode::OK)
}

/// How many times a process is started again while the cluster starts
/// before `kiln dev` gives up (a bad database URL, a port taken).
const START_EXITS: u32 = 2;

/// Poll `ready` until it holds, or fail after [`START_TIMEOUT`], or as soon
/// as one of the named processes was started again [`START_EXITS`] times, with
/// the end of their logs.
async fn wait_for<F, Fut>(
    what: &str,
    (dir, file): (&Path, &Mutex<ClusterFile>),
    names: &[&str],
    ready: F,
) -> Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + START_TIMEOUT;
    while !ready().await {
        let crashing = file
            .lock()
            .expect("not poisoned")
            .children
            .iter()
            .find(|c| names.contains(&c.name.as_str()) && c.restarts >= START_EXITS)
            .map(|c| c.name.clone());
        let why = match crashing {
            Some(name) => format!("{name} kept exiting ({START_EXITS} restarts)"),
            None if Instant::now() > deadline => {
                format!("timed out after {} s", START_TIMEOUT.as_secs())
            }
            None => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let tails: Vec<String> = names
            .iter()
            .map(|name| {
                let path = dir.join(format!("{name}.log"));
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                format!(
                    "--- {}\n{}",
                    path.display(),
                    lines[lines.len().saturating_sub(15)..].join("\n")
                )
            })
            .collect();
        bail!("{why} waiting for {what}:\n{}", tails.join("\n"));
    }
    Ok(())
}
