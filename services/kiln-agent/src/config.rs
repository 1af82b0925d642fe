//! The agent's configuration file (TOML).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_core::SandboxKind;
use kiln_core::{AccountId, RuntimeName};
use kiln_internal_api::{Endpoints, Tenancy};
use kiln_pki::TlsFiles;
use kiln_sandbox::{ContainerConfig, MicroVmConfig};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot parse {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("Invalid [sandbox] section")]
    Sandbox(#[from] kiln_sandbox::ContainerConfigError),
    #[error("Invalid [sandbox.microvm] section")]
    MicroVm(#[from] kiln_sandbox::microvm::MicroVmConfigError),
}

/// `kiln-agent --config FILE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Node id, code cache, instance records, runtime root filesystems.
    pub state_dir: PathBuf,
    /// The agent's mTLS API (port 0 picks a free port).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Where the scheduler and the gateway reach this agent; default
    /// `https://<bound address>` (required when `listen` is a wildcard).
    #[serde(default)]
    pub advertise_url: Option<String>,
    pub scheduler_url: String,
    /// The gateway's internal (mTLS) listener, which serves code packages.
    pub gateway_internal_url: String,
    /// Plain-HTTP Prometheus endpoint (`GET /metrics`).
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Passed to functions in `x-fc-region` unless the gateway sends one.
    #[serde(default)]
    pub region: Option<String>,
    /// How long a new instance's process has to open its port.
    #[serde(default = "default_start_timeout_ms")]
    pub instance_start_timeout_ms: u64,
    /// Destroy every instance when the agent stops (`kiln dev`). Off by
    /// default, so a stopping agent leaves its calls in flight to finish;
    /// the container driver removes what is left when the agent starts
    /// again, and the scheduler learns from the next registration that
    /// those instances are gone.
    #[serde(default)]
    pub drain_on_shutdown: bool,
    /// Runtime root filesystems prepared at start and offered to functions.
    #[serde(default = "default_runtimes")]
    pub runtimes: Vec<RuntimeName>,
    pub tls: TlsFiles,
    /// Joining with a single-use bootstrap token: used at start when the
    /// `tls` certificate or key does not exist yet (docs/joining.md).
    #[serde(default)]
    pub bootstrap: Option<BootstrapSettings>,
    pub node: NodeConfig,
    #[serde(default)]
    pub sandbox: SandboxSection,
    /// Idle freezing and per-instance usage metrics (`[usage]`).
    #[serde(default)]
    pub usage: UsageConfig,
    /// Timeouts and connection caps of the API listener (`[limits]`; see
    /// docs/security.md, "The public edge").
    #[serde(default)]
    pub limits: kiln_internal_api::server::ListenerLimits,
    /// The node's code cache (`[code_cache]`).
    #[serde(default)]
    pub code_cache: CodeCacheConfig,
    /// Custom-container images: registries' trust, size limit, cache
    /// budget (`[images]`).
    #[serde(default)]
    pub images: ImagesConfig,
}

/// `[images]`: how the node pulls custom-container images and how much of
/// them it keeps unpacked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesConfig {
    /// PEM file of the CAs registries' certificates are verified against;
    /// absent: the system's roots. Registries are only reached over HTTPS.
    pub ca_bundle: Option<PathBuf>,
    /// The largest image, in MiB, counted both as downloaded (compressed)
    /// and as unpacked; FC's limit is 10 GB uncompressed.
    pub max_image_mb: u64,
    /// Unpacked layers kept, in MiB; over it the least recently used
    /// layers no instance uses are removed.
    pub budget_mb: u64,
    /// How long one pull may take, in seconds.
    pub pull_timeout_s: u64,
}

impl Default for ImagesConfig {
    fn default() -> Self {
        Self {
            ca_bundle: None,
            max_image_mb: 10 * 1024,
            budget_mb: 40 * 1024,
            pull_timeout_s: 600,
        }
    }
}

/// `[code_cache]`: how much extracted code the node keeps. Over the bound,
/// the least recently used packages no instance uses are removed (and
/// fetched again when needed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CodeCacheConfig {
    pub max_bytes: u64,
}

impl Default for CodeCacheConfig {
    fn default() -> Self {
        // 200 packages at FC's largest unzipped code size (500 MiB) would
        // be 100 GiB; nodes keep a fifth of that unless told otherwise.
        Self {
            max_bytes: 20 * 1024 * 1024 * 1024,
        }
    }
}

/// `[bootstrap]`: how a node without a certificate joins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapSettings {
    /// The scheduler's bootstrap listener (`bootstrap_listen`), https://.
    pub url: String,
    /// The file holding the token `kiln nodes bootstrap-token` printed;
    /// removed once the token is redeemed.
    pub token_file: PathBuf,
    /// DNS names and addresses the certificate carries besides the host
    /// of `advertise_url` (or the `listen` address).
    #[serde(default)]
    pub names: Vec<String>,
}

/// `[usage]`: idle freezing and per-instance usage sampling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsageConfig {
    /// Freeze instances with no call in flight (thawed before the next).
    pub freeze_idle: bool,
    /// How long an instance stays idle before it is frozen.
    pub freeze_after_idle_ms: u64,
    /// How often per-instance CPU, memory and network are sampled.
    pub sample_interval_ms: u64,
}

impl Default for UsageConfig {
    fn default() -> Self {
        Self {
            freeze_idle: true,
            freeze_after_idle_ms: 100,
            sample_interval_ms: 5_000,
        }
    }
}

impl UsageConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.freeze_after_idle_ms > 3_600_000 {
            return Err(ConfigError::Invalid(format!(
                "usage.freeze_after_idle_ms must be at most 3600000, got {}",
                self.freeze_after_idle_ms
            )));
        }
        if !(100..=600_000).contains(&self.sample_interval_ms) {
            return Err(ConfigError::Invalid(format!(
                "usage.sample_interval_ms must be between 100 and 600000, got {}",
                self.sample_interval_ms
            )));
        }
        Ok(())
    }

    /// The freeze delay, None when freezing is off.
    pub fn freeze_delay(&self) -> Option<Duration> {
        self.freeze_idle
            .then(|| Duration::from_millis(self.freeze_after_idle_ms))
    }

    pub fn sample_interval(&self) -> Duration {
        Duration::from_millis(self.sample_interval_ms)
    }
}

/// `[sandbox]`: which backend runs instances (`backend = "container"` or
/// `"microvm"`; default: microVMs on a multi-tenant node, containers
/// otherwise), the container backend's settings (the section's other keys,
/// as before) and `[sandbox.microvm]`. Derefs to the container settings so
/// `config.sandbox.uid_base` and friends read as they always did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxSection {
    pub backend: Option<SandboxKind>,
    pub container: ContainerConfig,
    pub microvm: MicroVmConfig,
}

impl std::ops::Deref for SandboxSection {
    type Target = ContainerConfig;
    fn deref(&self) -> &ContainerConfig {
        &self.container
    }
}

impl std::ops::DerefMut for SandboxSection {
    fn deref_mut(&mut self) -> &mut ContainerConfig {
        &mut self.container
    }
}

impl From<ContainerConfig> for SandboxSection {
    fn from(container: ContainerConfig) -> Self {
        Self {
            container,
            ..Self::default()
        }
    }
}

impl SandboxSection {
    /// The backend this node runs.
    pub fn backend_for(&self, tenancy: Tenancy) -> SandboxKind {
        self.backend.unwrap_or(match tenancy {
            Tenancy::MultiTenant => SandboxKind::Microvm,
            Tenancy::Dedicated => SandboxKind::Container,
        })
    }
}

impl<'de> Deserialize<'de> for SandboxSection {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut table = toml::Table::deserialize(d)?;
        let backend = match table.remove("backend") {
            None => None,
            Some(v) => Some(SandboxKind::deserialize(v).map_err(|e| {
                D::Error::custom(format!(
                    "sandbox.backend must be \"container\" or \"microvm\": {e}"
                ))
            })?),
        };
        let microvm = match table.remove("microvm") {
            None => MicroVmConfig::default(),
            Some(v) => MicroVmConfig::deserialize(v)
                .map_err(|e| D::Error::custom(format!("sandbox.microvm: {e}")))?,
        };
        let container = ContainerConfig::deserialize(toml::Value::Table(table))
            .map_err(|e| D::Error::custom(format!("sandbox: {e}")))?;
        Ok(Self {
            backend,
            container,
            microvm,
        })
    }
}

impl Serialize for SandboxSection {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error;
        let mut table = toml::Table::try_from(&self.container).map_err(S::Error::custom)?;
        if let Some(b) = self.backend {
            table.insert(
                "backend".into(),
                toml::Value::try_from(b).map_err(S::Error::custom)?,
            );
        }
        if self.microvm != MicroVmConfig::default() {
            table.insert(
                "microvm".into(),
                toml::Value::try_from(&self.microvm).map_err(S::Error::custom)?,
            );
        }
        table.serialize(s)
    }
}

/// What the node offers the scheduler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    #[serde(default = "default_zone")]
    pub zone: String,
    #[serde(default = "default_tenancy")]
    pub tenancy: Tenancy,
    #[serde(default)]
    pub dedicated_account: Option<AccountId>,
    pub memory_mb: u64,
    pub cpu_milli: u64,
    pub max_instances: u32,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7443))
}
fn default_start_timeout_ms() -> u64 {
    30_000
}
fn default_runtimes() -> Vec<RuntimeName> {
    RuntimeName::ALL.to_vec()
}
fn default_zone() -> String {
    "zone-a".into()
}
fn default_tenancy() -> Tenancy {
    Tenancy::Dedicated
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Self = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        self.limits
            .validate("limits")
            .map_err(ConfigError::Invalid)?;
        if !self.state_dir.is_absolute() {
            return invalid(format!(
                "state_dir must be an absolute path, got {:?}",
                self.state_dir
            ));
        }
        if self.images.max_image_mb == 0 || self.images.budget_mb < self.images.max_image_mb {
            return invalid(format!(
                "images: max_image_mb must be at least 1 and budget_mb ({}) at least max_image_mb ({}), so one image of the largest size fits",
                self.images.budget_mb, self.images.max_image_mb
            ));
        }
        if self.images.pull_timeout_s == 0 {
            return invalid("images.pull_timeout_s must be at least 1".into());
        }
        if let Err(reason) = Endpoints::parse(&self.scheduler_url) {
            return invalid(format!("scheduler_url: {reason}"));
        }
        check_https_url("gateway_internal_url", &self.gateway_internal_url)?;
        if let Some(b) = &self.bootstrap {
            check_https_url("bootstrap.url", &b.url)?;
        }
        match &self.advertise_url {
            Some(url) => check_https_url("advertise_url", url)?,
            None if self.listen.ip().is_unspecified() => {
                return invalid(format!(
                    "advertise_url is required when listen is a wildcard address ({})",
                    self.listen
                ))
            }
            None => {}
        }
        if let Some(region) = &self.region {
            let ok = !region.is_empty()
                && region.len() <= 64
                && region
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !ok {
                return invalid(format!(
                    "region {region:?} must be 1 to 64 lower-case letters, digits or '-'"
                ));
            }
        }
        if !(100..=600_000).contains(&self.instance_start_timeout_ms) {
            return invalid(format!(
                "instance_start_timeout_ms must be between 100 and 600000, got {}",
                self.instance_start_timeout_ms
            ));
        }
        if self.runtimes.is_empty() {
            return invalid("runtimes must name at least one runtime".into());
        }
        let n = &self.node;
        if n.zone.is_empty() || n.zone.len() > 64 {
            return invalid(format!(
                "node.zone must be 1 to 64 characters, got {:?}",
                n.zone
            ));
        }
        if n.tenancy == Tenancy::MultiTenant
            && self.sandbox.backend_for(n.tenancy) != SandboxKind::Microvm
        {
            return invalid(
                "node.tenancy = \"multi-tenant\" needs the microVM backend (sandbox.backend = \"microvm\"); container sandboxes serve dedicated nodes only".into(),
            );
        }
        if n.memory_mb < u64::from(kiln_core::limits::MEMORY_MIN_MB) {
            return invalid(format!(
                "node.memory_mb must be at least {}, got {}",
                kiln_core::limits::MEMORY_MIN_MB,
                n.memory_mb
            ));
        }
        if n.cpu_milli < u64::from(kiln_core::limits::CPU_MIN_MILLI) {
            return invalid(format!(
                "node.cpu_milli must be at least {}, got {}",
                kiln_core::limits::CPU_MIN_MILLI,
                n.cpu_milli
            ));
        }
        if !(1..=65_536).contains(&n.max_instances) {
            return invalid(format!(
                "node.max_instances must be between 1 and 65536, got {}",
                n.max_instances
            ));
        }
        self.sandbox.validate()?;
        self.usage.validate()?;
        if self.sandbox.backend_for(n.tenancy) == SandboxKind::Microvm {
            if n.tenancy == Tenancy::MultiTenant && !self.sandbox.microvm.jail.enabled() {
                return invalid(
                    "node.tenancy = \"multi-tenant\" refuses sandbox.microvm.jail.insecure_disabled = true: tenants' VMMs must run jailed (own uid, namespaces, chroot, no capabilities); remove the setting (a dedicated development node may keep it)".into(),
                );
            }
            self.sandbox.microvm.validate()?;
        }
        if n.tenancy == Tenancy::MultiTenant && self.sandbox.insecure_network_isolation_disabled {
            return invalid(
                "node.tenancy = \"multi-tenant\" refuses sandbox.insecure_network_isolation_disabled = true: tenants' instances must be confined to their egress mode; configure [sandbox.network] instead (a dedicated development node may keep the setting)".into(),
            );
        }
        Ok(())
    }

    /// Fail closed: a node that would run instances without network
    /// isolation must say so explicitly. Checked when the real backends
    /// start (fakes need no firewall).
    pub fn require_network_isolation(&self) -> Result<(), ConfigError> {
        if self.sandbox.network.is_none() && !self.sandbox.insecure_network_isolation_disabled {
            return Err(ConfigError::Invalid(
                "no [sandbox.network] section: instances would run without network isolation (reaching this node's ports, the private network and the cloud metadata address). Add [sandbox.network] (an empty section isolates with the defaults; see docs/security.md, \"Egress\"), or on a dedicated development node set sandbox.insecure_network_isolation_disabled = true".into(),
            ));
        }
        Ok(())
    }

    /// What this node tells the scheduler it enforces.
    pub fn network_isolation(&self) -> kiln_internal_api::NetworkIsolation {
        match &self.sandbox.network {
            Some(n) => kiln_internal_api::NetworkIsolation {
                enforced: true,
                vpcs: n.vpcs.iter().map(|v| v.id.clone()).collect(),
            },
            None => kiln_internal_api::NetworkIsolation::default(),
        }
    }

    /// The IPv4 hosts of the cluster services this agent talks to (the
    /// scheduler, the gateway's internal listener, the bootstrap
    /// listener) and its own advertised address, when the URLs name
    /// them by address: instances with internet access never reach them
    /// (added to `[sandbox.network] deny`). Hosts named by DNS name, and
    /// other cluster hosts, go in `deny` by hand.
    /// The schedulers (`scheduler_url`: one URL, or a cluster's, comma
    /// separated). Validated by [`Self::validate`].
    pub fn scheduler_endpoints(&self) -> Endpoints {
        Endpoints::parse(&self.scheduler_url).expect("scheduler_url is validated before use")
    }

    pub fn cluster_hosts(&self) -> Vec<kiln_sandbox::net::Ipv4Net> {
        // Every scheduler of a cluster (`scheduler_url` lists them).
        let mut urls: Vec<&str> = self.scheduler_url.split(',').map(str::trim).collect();
        urls.push(self.gateway_internal_url.as_str());
        urls.extend(self.advertise_url.as_deref());
        urls.extend(self.bootstrap.as_ref().map(|b| b.url.as_str()));
        let mut hosts: Vec<kiln_sandbox::net::Ipv4Net> = urls
            .into_iter()
            .filter_map(|u| {
                let rest = u.strip_prefix("https://")?.trim_end_matches('/');
                let host = match rest.rsplit_once(':') {
                    Some((h, _)) => h,
                    None => rest,
                };
                let addr: std::net::Ipv4Addr = host.parse().ok()?;
                Some(kiln_sandbox::net::Ipv4Net {
                    addr,
                    prefix_len: 32,
                })
            })
            .collect();
        if let std::net::IpAddr::V4(addr) = self.listen.ip() {
            if !addr.is_unspecified() {
                hosts.push(kiln_sandbox::net::Ipv4Net {
                    addr,
                    prefix_len: 32,
                });
            }
        }
        hosts.sort_by_key(|n| (n.addr, n.prefix_len));
        hosts.dedup();
        hosts
    }

    /// The configuration the sandbox backends get: `[sandbox.network]`
    /// with [`Self::cluster_hosts`] added to its deny list.
    pub fn sandbox_network(&self) -> Option<kiln_sandbox::net::NetworkConfig> {
        let mut network = self.sandbox.network.clone()?;
        for host in self.cluster_hosts() {
            if !network.deny.contains(&host) {
                network.deny.push(host);
            }
        }
        Some(network)
    }

    /// Log, at warn, what an insecure setting leaves open: on every start.
    pub fn warn_insecure(&self) {
        if self.sandbox.insecure_network_isolation_disabled {
            tracing::warn!(
                "sandbox.insecure_network_isolation_disabled = true: instances run WITHOUT network isolation; they reach this node's ports, the private network and the cloud metadata address. Functions with internetAccess: false or a vpcConfig are refused. Only for a dedicated development node."
            );
        }
    }

    pub fn instance_start_timeout(&self) -> Duration {
        Duration::from_millis(self.instance_start_timeout_ms)
    }

    pub fn code_dir(&self) -> PathBuf {
        self.state_dir.join("code")
    }

    /// The unpacked image layers (`images/layers/<sha256>`).
    pub fn images_dir(&self) -> PathBuf {
        self.state_dir.join("images")
    }
}

fn check_https_url(name: &str, url: &str) -> Result<(), ConfigError> {
    let rest = url.strip_prefix("https://").unwrap_or("");
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') || host.bytes().any(|b| b.is_ascii_whitespace()) {
        return Err(ConfigError::Invalid(format!(
            "{name} must be an https://host:port URL without a path, got {url:?}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml");

    fn example() -> AgentConfig {
        AgentConfig::load(Path::new(EXAMPLE)).unwrap()
    }

    #[test]
    fn example_loads_and_validates() {
        let c = example();
        assert_eq!(c.node.tenancy, Tenancy::Dedicated);
        assert!(
            c.sandbox.microvm.jail.enabled(),
            "the example jails its VMMs"
        );
        assert_eq!(c.runtimes, RuntimeName::ALL.to_vec());
        assert!(!c.drain_on_shutdown);
        assert!(c.metrics_listen.unwrap().ip().is_loopback());
    }

    #[test]
    fn the_sandbox_section_selects_the_backend() {
        let text = std::fs::read_to_string(EXAMPLE).unwrap();
        assert!(text.contains("[sandbox]\n") && text.contains("tenancy = \"dedicated\""));
        let c = example();
        assert_eq!(c.sandbox.backend, None);
        assert_eq!(
            c.sandbox.backend_for(c.node.tenancy),
            SandboxKind::Container
        );
        // A multi-tenant node runs microVMs without saying so.
        let multi = text.replace("tenancy = \"dedicated\"", "tenancy = \"multi-tenant\"");
        let m: AgentConfig = toml::from_str(&multi).unwrap();
        m.validate().unwrap();
        assert_eq!(m.sandbox.backend_for(m.node.tenancy), SandboxKind::Microvm);
        let with_vm = format!(
            "{}\n[sandbox.microvm]\nkernel = \"/boot/k\"\n[sandbox.microvm.premade]\nenabled = true\nmax_per_runtime = 2\n",
            text.replace("[sandbox]\n", "[sandbox]\nbackend = \"microvm\"\n")
        );
        let v: AgentConfig = toml::from_str(&with_vm).unwrap();
        v.validate().unwrap();
        assert_eq!(v.sandbox.backend, Some(SandboxKind::Microvm));
        assert!(v.sandbox.microvm.premade.enabled);
        assert_eq!(v.sandbox.microvm.premade.max_per_runtime, 2);
        // The old fixed pool size is refused with what to write instead.
        let old = with_vm.replace("kernel = ", "pool_size = 2\nkernel = ");
        let old: AgentConfig = toml::from_str(&old).unwrap();
        let e = kiln_core::error_chain(&old.validate().unwrap_err()).to_string();
        assert!(e.contains("[sandbox.microvm.premade]"), "{e}");
        assert_eq!(v.sandbox.microvm.kernel, Path::new("/boot/k"));
        // The container keys stay where they were, and round-trip.
        assert_eq!(v.sandbox.container, c.sandbox.container);
        let again: AgentConfig = toml::from_str(&toml::to_string(&v).unwrap()).unwrap();
        assert_eq!(again, v);
        for bad in [
            text.replace("[sandbox]\n", "[sandbox]\nbackend = \"vm\"\n"),
            text.replace("[sandbox]\n", "[sandbox]\nnmae_prefix = \"x\"\n"),
            format!("{text}\n[sandbox.microvm]\npool = 1\n"),
        ] {
            let err = toml::from_str::<AgentConfig>(&bad).unwrap_err().to_string();
            assert!(err.contains("sandbox"), "{err}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let text = std::fs::read_to_string(EXAMPLE).unwrap();
        let bad = text.replace("[node]", "[node]\nmemroy_mb = 5");
        assert!(toml::from_str::<AgentConfig>(&bad).is_err());
        let bad = format!("listne = \"127.0.0.1:1\"\n{text}");
        assert!(toml::from_str::<AgentConfig>(&bad).is_err());
    }

    #[test]
    fn network_isolation_is_required_unless_turned_off_explicitly() {
        let c = example();
        assert!(c.sandbox.network.is_some(), "the example isolates");
        c.require_network_isolation().unwrap();
        let iso = c.network_isolation();
        assert!(iso.enforced);
        let mut none = example();
        none.sandbox.network = None;
        none.validate().unwrap();
        let e = none.require_network_isolation().unwrap_err().to_string();
        assert!(
            e.contains("[sandbox.network]") && e.contains("insecure_network_isolation_disabled"),
            "{e}"
        );
        assert_eq!(none.network_isolation(), Default::default());
        assert_eq!(none.sandbox_network(), None);
        none.sandbox.insecure_network_isolation_disabled = true;
        none.validate().unwrap();
        none.require_network_isolation().unwrap();
        assert!(!none.network_isolation().enforced);
    }

    #[test]
    fn cluster_hosts_join_the_deny_list() {
        let mut c = example();
        c.scheduler_url = "https://203.0.113.10:7400".into();
        c.gateway_internal_url = "https://gateway.internal:7401".into();
        c.advertise_url = Some("https://198.51.100.7:7443".into());
        c.listen = "198.51.100.7:7443".parse().unwrap();
        let hosts: Vec<String> = c.cluster_hosts().iter().map(ToString::to_string).collect();
        assert_eq!(hosts, ["198.51.100.7/32", "203.0.113.10/32"]);
        let deny = c.sandbox_network().unwrap().deny;
        assert!(
            deny.iter().any(|n| n.to_string() == "203.0.113.10/32"),
            "{deny:?}"
        );
    }

    #[test]
    fn validate_names_what_is_wrong() {
        let bad = |f: fn(&mut AgentConfig)| {
            let mut c = example();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(bad(|c| c.state_dir = "rel".into()).contains("state_dir"));
        assert!(bad(|c| c.scheduler_url = "http://x:1".into()).contains("scheduler_url"));
        assert!(bad(|c| c.gateway_internal_url = "https://x/v1".into())
            .contains("gateway_internal_url"));
        assert!(bad(|c| {
            c.advertise_url = None;
            c.listen = "0.0.0.0:7443".parse().unwrap();
        })
        .contains("advertise_url"));
        assert!(bad(|c| c.node.memory_mb = 1).contains("memory_mb"));
        assert!(bad(|c| c.node.max_instances = 0).contains("max_instances"));
        assert!(bad(|c| c.runtimes.clear()).contains("runtimes"));
        assert!(bad(|c| c.instance_start_timeout_ms = 1).contains("instance_start_timeout_ms"));
        assert!(bad(|c| c.region = Some("CN HZ".into())).contains("region"));
        assert!(bad(|c| c.sandbox.uid_base = 0).contains("sandbox"));
        assert!(bad(|c| {
            c.node.tenancy = Tenancy::MultiTenant;
            c.sandbox.backend = Some(SandboxKind::Container);
        })
        .contains("microVM"));
        assert!(bad(|c| {
            c.sandbox.backend = Some(SandboxKind::Microvm);
            c.sandbox.microvm.api_timeout_ms = 1;
        })
        .contains("microvm"));
        // The jail can be turned off on a dedicated node only.
        let e = bad(|c| {
            c.node.tenancy = Tenancy::MultiTenant;
            c.sandbox.backend = Some(SandboxKind::Microvm);
            c.sandbox.microvm.jail.insecure_disabled = true;
        });
        assert!(
            e.contains("sandbox.microvm.jail.insecure_disabled") && e.contains("multi-tenant"),
            "{e}"
        );
        let mut dev = example();
        dev.sandbox.backend = Some(SandboxKind::Microvm);
        dev.sandbox.microvm.jail.insecure_disabled = true;
        dev.validate().unwrap();
        // So can network isolation.
        let e = bad(|c| {
            c.node.tenancy = Tenancy::MultiTenant;
            c.sandbox.network = None;
            c.sandbox.insecure_network_isolation_disabled = true;
        });
        assert!(
            e.contains("sandbox.insecure_network_isolation_disabled") && e.contains("multi-tenant"),
            "{e}"
        );
        let mut both = example();
        both.sandbox.insecure_network_isolation_disabled = true;
        let e = kiln_core::error_chain(&both.validate().unwrap_err());
        assert!(e.contains("contradict"), "{e}");
        let mut ok = example();
        ok.advertise_url = None;
        ok.listen = "127.0.0.1:0".parse().unwrap();
        ok.validate().unwrap();
    }
}
