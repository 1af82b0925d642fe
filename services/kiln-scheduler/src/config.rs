//! The scheduler's configuration file (TOML), parsed then validated.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_internal_api::AccountLimits;
use kiln_pki::TlsFiles;

use crate::placement::default_account_limits;
use serde::{Deserialize, Serialize};

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Cannot read configuration file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot parse configuration file {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("Invalid setting {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// `kiln-scheduler --config FILE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Holds `scheduler.db`.
    pub state_dir: PathBuf,
    /// The mTLS listener agents and gateways call.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Plain-HTTP Prometheus endpoint (`GET /metrics`); off when absent.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// An instance with no lease for this long is destroyed.
    #[serde(default = "default_idle_timeout_s")]
    pub idle_timeout_s: u64,
    /// How often agents report (sent to them at registration).
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// A node silent this long is written off with its instances.
    #[serde(default = "default_node_failure_after_ms")]
    pub node_failure_after_ms: u64,
    /// How long an agent may take to start an instance.
    #[serde(default = "default_instance_start_timeout_ms")]
    pub instance_start_timeout_ms: u64,
    /// Instances one account may hold at once, across all nodes.
    #[serde(default = "default_max_instances_per_account")]
    pub max_instances_per_account: u32,
    /// A node is drained this long before its maximum validity, then
    /// retired and re-provisioned by its agent as a new node.
    #[serde(default = "default_node_max_validity_h")]
    pub node_max_validity_h: u64,
    #[serde(default = "default_node_drain_lead_s")]
    pub node_drain_lead_s: u64,
    /// An instance stops taking calls `instance_drain_lead_s` plus its
    /// function's timeout before its maximum validity, and goes once idle.
    #[serde(default = "default_instance_max_validity_h")]
    pub instance_max_validity_h: u64,
    #[serde(default = "default_instance_drain_lead_s")]
    pub instance_drain_lead_s: u64,
    /// The other limits of every account without limits of its own (set
    /// per account with `PUT /v1/accounts/{id}/limits`).
    #[serde(default)]
    pub account_defaults: AccountDefaults,
    /// Moving load off hot nodes (off by default).
    #[serde(default)]
    pub rebalance: RebalanceSettings,
    /// Signing agent certificates: renewal of short-lived certificates
    /// and bootstrap tokens. Off when absent (agents then keep the
    /// certificates they were installed with until those expire).
    #[serde(default)]
    pub certificates: Option<CertificateSettings>,
    /// Where a new node redeems its bootstrap token: TLS with the
    /// scheduler's certificate, no client certificate asked, only
    /// `POST /v1/bootstrap` served. Off when absent; needs `[certificates]`.
    #[serde(default)]
    pub bootstrap_listen: Option<SocketAddr>,
    /// The key that seals the function environments inside the instance
    /// and provision specs the store keeps (`[secrets]`). Absent:
    /// `state_dir/secrets.key`, created on first start, with a warning.
    #[serde(default)]
    pub secrets: Option<kiln_store::seal::SecretsConfig>,
    /// Server and client identity on the internal mTLS network.
    pub tls: TlsFiles,
    /// Timeouts and connection caps of `listen` and `bootstrap_listen`
    /// (`[limits]`; see docs/security.md, "The public edge").
    #[serde(default)]
    pub limits: kiln_internal_api::server::ListenerLimits,
    /// Several schedulers sharing one PostgreSQL database, one leading
    /// (`[cluster]`; docs/ha.md). Absent: this scheduler alone, on SQLite
    /// in `state_dir`.
    #[serde(default)]
    pub cluster: Option<ClusterSettings>,
}

/// `[cluster]`: the database the schedulers share and how this one is
/// known to the others.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// A `postgresql://` URL or `key=value` string; a unix socket or a
    /// loopback address (Kiln does not speak TLS to PostgreSQL yet).
    pub postgres_url: String,
    /// A file holding the database password (a systemd credential), when
    /// the URL has none: the URL may be world-readable, this file not.
    #[serde(default)]
    pub postgres_password_file: Option<PathBuf>,
    /// This scheduler's URL as gateways and agents reach it
    /// (`https://host:port`): the leader's is named to every caller a
    /// standby turns away.
    pub advertise_url: String,
    /// How long a leader's lease lasts unrenewed: a standby takes over
    /// within about this long (plus a renewal interval) of the leader's
    /// death. Renewed every third of it.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
}

impl std::fmt::Debug for ClusterSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password.
        f.debug_struct("ClusterSettings")
            .field("advertise_url", &self.advertise_url)
            .field("lease_ms", &self.lease_ms)
            .finish_non_exhaustive()
    }
}

fn default_lease_ms() -> u64 {
    5_000
}

impl ClusterSettings {
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }
}

/// `[certificates]`: the CA the scheduler signs agent certificates with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateSettings {
    /// The signing CA's certificate: an intermediate signed by the
    /// cluster root (recommended: docs/security.md), or the root itself.
    pub ca_cert: PathBuf,
    /// Its key; refused unless no group or other permission is set (0600
    /// or stricter; systemd credentials are 0400).
    pub ca_key: PathBuf,
    /// How long an agent certificate lives. Agents renew at two thirds.
    #[serde(default = "default_agent_cert_lifetime_s")]
    pub agent_cert_lifetime_s: u64,
    /// The longest `kiln nodes bootstrap-token --ttl` may ask for.
    #[serde(default = "default_max_bootstrap_token_ttl_s")]
    pub max_bootstrap_token_ttl_s: u64,
}

fn default_agent_cert_lifetime_s() -> u64 {
    12 * 3600
}
fn default_max_bootstrap_token_ttl_s() -> u64 {
    7 * 24 * 3600
}

impl CertificateSettings {
    pub fn new(ca_cert: PathBuf, ca_key: PathBuf) -> Self {
        Self {
            ca_cert,
            ca_key,
            agent_cert_lifetime_s: default_agent_cert_lifetime_s(),
            max_bootstrap_token_ttl_s: default_max_bootstrap_token_ttl_s(),
        }
    }

    /// Refuse a CA key others can read or write: whoever reads it can
    /// mint any identity the CA can sign.
    pub fn check_key_permissions(&self) -> Result<(), ConfigError> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&self.ca_key).map_err(|source| ConfigError::Read {
            path: self.ca_key.clone(),
            source,
        })?;
        if meta.mode() & 0o077 != 0 {
            return Err(ConfigError::Invalid {
                field: "certificates.ca_key",
                reason: format!(
                    "{} has mode {:o}; the CA key must be readable by the scheduler only \
                     (chmod 600 {})",
                    self.ca_key.display(),
                    meta.mode() & 0o777,
                    self.ca_key.display()
                ),
            });
        }
        Ok(())
    }
}

/// How often the scheduler's periodic work runs.
pub const TICK_INTERVAL_MS: u64 = 250;

/// `[rebalance]`: see [`crate::placement::RebalanceConfig`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebalanceSettings {
    #[serde(default)]
    pub enabled: bool,
    /// Seconds between rebalancing rounds.
    #[serde(default = "default_rebalance_interval_s")]
    pub interval_s: u64,
    /// A node above this share of its memory is hot; new instances avoid
    /// going over it while another node has room.
    #[serde(default = "default_rebalance_high_pct")]
    pub high_watermark_pct: u64,
    /// Instances move only to nodes below this share.
    #[serde(default = "default_rebalance_low_pct")]
    pub low_watermark_pct: u64,
    /// Instances drained per round at most.
    #[serde(default = "default_rebalance_max_moves")]
    pub max_moves: usize,
}

fn default_rebalance_interval_s() -> u64 {
    30
}
fn default_rebalance_high_pct() -> u64 {
    85
}
fn default_rebalance_low_pct() -> u64 {
    50
}
fn default_rebalance_max_moves() -> usize {
    10
}

impl Default for RebalanceSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            interval_s: default_rebalance_interval_s(),
            high_watermark_pct: default_rebalance_high_pct(),
            low_watermark_pct: default_rebalance_low_pct(),
            max_moves: default_rebalance_max_moves(),
        }
    }
}

impl RebalanceSettings {
    /// The placement core's form; `None` when off.
    pub fn placement(&self) -> Option<crate::placement::RebalanceConfig> {
        self.enabled.then(|| crate::placement::RebalanceConfig {
            every_ticks: (self.interval_s * 1000 / TICK_INTERVAL_MS).max(1),
            high_pct: self.high_watermark_pct,
            low_pct: self.low_watermark_pct,
            max_moves: self.max_moves,
        })
    }
}

/// `[account_defaults]`: quotas and scale-out rates of every account
/// without limits of its own. The burst pool is `max_instances_per_account`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountDefaults {
    #[serde(default = "default_memory_quota_mb")]
    pub memory_quota_mb: u64,
    #[serde(default = "default_vcpu_quota_milli")]
    pub vcpu_quota_milli: u64,
    #[serde(default = "default_scale_out_instances")]
    pub scale_out_instances_per_minute: u32,
    #[serde(default = "default_scale_out_vcpus")]
    pub scale_out_vcpus_per_minute: u32,
}

impl Default for AccountDefaults {
    fn default() -> Self {
        Self {
            memory_quota_mb: default_memory_quota_mb(),
            vcpu_quota_milli: default_vcpu_quota_milli(),
            scale_out_instances_per_minute: default_scale_out_instances(),
            scale_out_vcpus_per_minute: default_scale_out_vcpus(),
        }
    }
}

fn default_memory_quota_mb() -> u64 {
    default_account_limits().memory_quota_mb
}
fn default_vcpu_quota_milli() -> u64 {
    default_account_limits().vcpu_quota_milli
}
fn default_scale_out_instances() -> u32 {
    default_account_limits().scale_out_instances_per_minute
}
fn default_scale_out_vcpus() -> u32 {
    default_account_limits().scale_out_vcpus_per_minute
}

fn default_node_max_validity_h() -> u64 {
    120
}
fn default_node_drain_lead_s() -> u64 {
    3_600
}
fn default_instance_max_validity_h() -> u64 {
    36
}
fn default_instance_drain_lead_s() -> u64 {
    600
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9443))
}
fn default_idle_timeout_s() -> u64 {
    300
}
fn default_heartbeat_interval_ms() -> u64 {
    2_000
}
fn default_node_failure_after_ms() -> u64 {
    10_000
}
fn default_instance_start_timeout_ms() -> u64 {
    30_000
}
fn default_max_instances_per_account() -> u32 {
    300
}

impl SchedulerConfig {
    /// A configuration with every default, for `kiln dev` and tests.
    pub fn new(state_dir: PathBuf, listen: SocketAddr, tls: TlsFiles) -> Self {
        Self {
            state_dir,
            listen,
            metrics_listen: None,
            idle_timeout_s: default_idle_timeout_s(),
            heartbeat_interval_ms: default_heartbeat_interval_ms(),
            node_failure_after_ms: default_node_failure_after_ms(),
            instance_start_timeout_ms: default_instance_start_timeout_ms(),
            max_instances_per_account: default_max_instances_per_account(),
            account_defaults: AccountDefaults::default(),
            node_max_validity_h: default_node_max_validity_h(),
            node_drain_lead_s: default_node_drain_lead_s(),
            instance_max_validity_h: default_instance_max_validity_h(),
            instance_drain_lead_s: default_instance_drain_lead_s(),
            rebalance: RebalanceSettings::default(),
            certificates: None,
            secrets: None,
            bootstrap_listen: None,
            tls,
            limits: Default::default(),
            cluster: None,
        }
    }

    /// Read, parse and validate `path`.
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
        let invalid = |field, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.to_owned(),
            })
        };
        if let Err(reason) = self.limits.validate("limits") {
            return invalid("limits", &reason);
        }
        if self.state_dir.as_os_str().is_empty() {
            return invalid("state_dir", "must not be empty");
        }
        if let Some(secrets) = &self.secrets {
            secrets
                .validate()
                .or_else(|reason| invalid("secrets", &reason))?;
        }
        if let Some(c) = &self.cluster {
            if self.secrets.is_none() {
                return invalid(
                    "cluster",
                    "needs [secrets] key_file: every scheduler of a cluster must seal function \
                     environments with the same key, kept apart from the data",
                );
            }
            if c.postgres_password_file
                .as_ref()
                .is_some_and(|p| p.starts_with("/nix/store"))
            {
                return invalid(
                    "cluster.postgres_password_file",
                    "must not be in the Nix store, which every user can read",
                );
            }
            if !c.advertise_url.starts_with("https://") {
                return invalid("cluster.advertise_url", "must be an https:// URL");
            }
            if self.listen.port() == 0 {
                return invalid(
                    "listen",
                    "needs a fixed port in a cluster: the standby's listener and the leader's \
                     are the same address, named by cluster.advertise_url",
                );
            }
            if !(1_000..=60_000).contains(&c.lease_ms) {
                return invalid("cluster.lease_ms", "must be between 1000 and 60000");
            }
        }
        if !(1..=7 * 24 * 3600).contains(&self.idle_timeout_s) {
            return invalid("idle_timeout_s", "must be between 1 and 604800 (a week)");
        }
        if !(100..=60_000).contains(&self.heartbeat_interval_ms) {
            return invalid("heartbeat_interval_ms", "must be between 100 and 60000");
        }
        if self.node_failure_after_ms < 2 * self.heartbeat_interval_ms {
            return invalid(
                "node_failure_after_ms",
                "must be at least twice heartbeat_interval_ms, or one late heartbeat fails a node",
            );
        }
        if !(100..=600_000).contains(&self.instance_start_timeout_ms) {
            return invalid(
                "instance_start_timeout_ms",
                "must be between 100 and 600000",
            );
        }
        if self.max_instances_per_account == 0 {
            return invalid("max_instances_per_account", "must be at least 1");
        }
        if !(1..=24 * 365).contains(&self.node_max_validity_h) {
            return invalid("node_max_validity_h", "must be between 1 and 8760 (a year)");
        }
        if self.node_drain_lead_s >= self.node_max_validity_h * 3600 {
            return invalid(
                "node_drain_lead_s",
                "must be shorter than node_max_validity_h",
            );
        }
        if !(1..=24 * 365).contains(&self.instance_max_validity_h) {
            return invalid(
                "instance_max_validity_h",
                "must be between 1 and 8760 (a year)",
            );
        }
        if self.instance_drain_lead_s >= self.instance_max_validity_h * 3600 {
            return invalid(
                "instance_drain_lead_s",
                "must be shorter than instance_max_validity_h",
            );
        }
        if let Some(c) = &self.certificates {
            // Ten seconds (tests) to thirty days.
            if !(10..=30 * 24 * 3600).contains(&c.agent_cert_lifetime_s) {
                return invalid(
                    "certificates.agent_cert_lifetime_s",
                    "must be between 10 and 2592000 (thirty days)",
                );
            }
            if !(60..=30 * 24 * 3600).contains(&c.max_bootstrap_token_ttl_s) {
                return invalid(
                    "certificates.max_bootstrap_token_ttl_s",
                    "must be between 60 and 2592000 (thirty days)",
                );
            }
        } else if self.bootstrap_listen.is_some() {
            return invalid(
                "bootstrap_listen",
                "needs [certificates]: bootstrap issues a certificate",
            );
        }
        let r = &self.rebalance;
        if !(1..=3600).contains(&r.interval_s) {
            return invalid("rebalance.interval_s", "must be between 1 and 3600");
        }
        if !(1..=100).contains(&r.high_watermark_pct) {
            return invalid("rebalance.high_watermark_pct", "must be between 1 and 100");
        }
        if r.low_watermark_pct >= r.high_watermark_pct {
            return invalid(
                "rebalance.low_watermark_pct",
                "must be below rebalance.high_watermark_pct",
            );
        }
        if !(1..=10_000).contains(&r.max_moves) {
            return invalid("rebalance.max_moves", "must be between 1 and 10000");
        }
        let d = &self.account_defaults;
        if d.memory_quota_mb < 128 {
            return invalid("account_defaults.memory_quota_mb", "must be at least 128");
        }
        if d.vcpu_quota_milli < 50 {
            return invalid("account_defaults.vcpu_quota_milli", "must be at least 50");
        }
        if d.scale_out_instances_per_minute == 0 {
            return invalid(
                "account_defaults.scale_out_instances_per_minute",
                "must be at least 1",
            );
        }
        if d.scale_out_vcpus_per_minute == 0 {
            return invalid(
                "account_defaults.scale_out_vcpus_per_minute",
                "must be at least 1",
            );
        }
        for (field, path) in [
            ("tls.ca", &self.tls.ca),
            ("tls.cert", &self.tls.cert),
            ("tls.key", &self.tls.key),
        ] {
            if path.as_os_str().is_empty() {
                return invalid(field, "must not be empty");
            }
        }
        Ok(())
    }

    /// The limits of an account without limits of its own.
    pub fn default_account_limits(&self) -> AccountLimits {
        let d = &self.account_defaults;
        AccountLimits {
            burst_instances: self.max_instances_per_account,
            memory_quota_mb: d.memory_quota_mb,
            vcpu_quota_milli: d.vcpu_quota_milli,
            scale_out_instances_per_minute: d.scale_out_instances_per_minute,
            scale_out_vcpus_per_minute: d.scale_out_vcpus_per_minute,
            functions: Default::default(),
        }
    }

    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join("scheduler.db")
    }

    /// The sealing key's file when `[secrets]` names none.
    pub fn default_key_file(&self) -> PathBuf {
        self.state_dir.join("secrets.key")
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_s)
    }

    pub fn instance_start_timeout(&self) -> Duration {
        Duration::from_millis(self.instance_start_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml")
    }

    #[test]
    fn example_loads_and_validates() {
        let c = SchedulerConfig::load(&example_path()).unwrap();
        assert_eq!(c.idle_timeout_s, 300);
        assert_eq!(c.heartbeat_interval_ms, 2_000);
        assert_eq!(c.node_failure_after_ms, 10_000);
        assert_eq!(c.instance_start_timeout_ms, 30_000);
        assert_eq!(c.max_instances_per_account, 300);
        assert_eq!(c.node_max_validity_h, 120);
        assert_eq!(c.instance_max_validity_h, 36);
        let d = c.default_account_limits();
        assert_eq!(d.burst_instances, 300);
        assert_eq!(d.scale_out_instances_per_minute, 300);
        assert_eq!(d.scale_out_vcpus_per_minute, 360);
        crate::placement::validate_limits(&d).unwrap();
        assert_eq!(c.listen.port(), 9443);
        assert!(c.metrics_listen.unwrap().ip().is_loopback());
        assert_eq!(c.rebalance, RebalanceSettings::default());
        assert!(c.rebalance.placement().is_none(), "off unless enabled");
        let mut r = c.rebalance.clone();
        r.enabled = true;
        let p = r.placement().unwrap();
        assert_eq!((p.every_ticks, p.high_pct, p.low_pct), (120, 85, 50));
    }

    #[test]
    fn a_cluster_needs_a_shared_key_a_fixed_port_and_an_https_address() {
        let mut c = SchedulerConfig::load(&example_path()).unwrap();
        c.secrets = None;
        c.cluster = Some(ClusterSettings {
            postgres_url: "host=/run/postgresql user=kiln password=s3cret dbname=kiln".into(),
            advertise_url: "https://10.0.0.2:9443".into(),
            postgres_password_file: None,
            lease_ms: default_lease_ms(),
        });
        let field = |c: &SchedulerConfig| match c.validate() {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field(&c),
            "cluster",
            "no [secrets]: each would seal its own way"
        );
        c.secrets = Some(kiln_store::seal::SecretsConfig {
            key_file: "/run/credentials/kiln-scheduler/secrets.key".into(),
            previous_key_files: Vec::new(),
        });
        c.validate().unwrap();
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "the database password never reaches a log line"
        );
        let mut bad = c.clone();
        bad.listen.set_port(0);
        assert_eq!(field(&bad), "listen");
        let mut bad = c.clone();
        bad.cluster.as_mut().unwrap().advertise_url = "http://10.0.0.2:9443".into();
        assert_eq!(field(&bad), "cluster.advertise_url");
        let mut bad = c.clone();
        bad.cluster.as_mut().unwrap().lease_ms = 100;
        assert_eq!(field(&bad), "cluster.lease_ms");
        let mut bad = c;
        bad.cluster.as_mut().unwrap().postgres_password_file = Some("/nix/store/abc-pgpass".into());
        assert_eq!(field(&bad), "cluster.postgres_password_file");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let text = std::fs::read_to_string(example_path()).unwrap();
        let text = format!("idle_timout_s = 3\n{text}");
        let err = toml::from_str::<SchedulerConfig>(&text).unwrap_err();
        assert!(err.to_string().contains("idle_timout_s"), "{err}");
    }

    #[test]
    fn bad_values_are_refused_with_the_field_name() {
        let base = SchedulerConfig::load(&example_path()).unwrap();
        type Mutation = Box<dyn Fn(&mut SchedulerConfig)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("idle_timeout_s", Box::new(|c| c.idle_timeout_s = 0)),
            (
                "heartbeat_interval_ms",
                Box::new(|c| c.heartbeat_interval_ms = 5),
            ),
            (
                "node_failure_after_ms",
                Box::new(|c| c.node_failure_after_ms = 3_000),
            ),
            (
                "instance_start_timeout_ms",
                Box::new(|c| c.instance_start_timeout_ms = 0),
            ),
            (
                "max_instances_per_account",
                Box::new(|c| c.max_instances_per_account = 0),
            ),
            ("state_dir", Box::new(|c| c.state_dir = PathBuf::new())),
            (
                "node_max_validity_h",
                Box::new(|c| c.node_max_validity_h = 0),
            ),
            (
                "instance_drain_lead_s",
                Box::new(|c| c.instance_drain_lead_s = 36 * 3600),
            ),
            (
                "account_defaults.scale_out_vcpus_per_minute",
                Box::new(|c| c.account_defaults.scale_out_vcpus_per_minute = 0),
            ),
            ("tls.key", Box::new(|c| c.tls.key = PathBuf::new())),
            (
                "rebalance.low_watermark_pct",
                Box::new(|c| c.rebalance.low_watermark_pct = 90),
            ),
            (
                "rebalance.high_watermark_pct",
                Box::new(|c| c.rebalance.high_watermark_pct = 101),
            ),
            (
                "rebalance.interval_s",
                Box::new(|c| c.rebalance.interval_s = 0),
            ),
            (
                "rebalance.max_moves",
                Box::new(|c| c.rebalance.max_moves = 0),
            ),
        ];
        for (field, mutate) in cases {
            let mut c = base.clone();
            mutate(&mut c);
            match c.validate() {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: expected Invalid, got {other:?}"),
            }
        }
    }
}
