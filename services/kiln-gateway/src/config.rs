//! The gateway's configuration file (TOML), parsed then validated.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use kiln_core::AccountId;
use kiln_pki::TlsFiles;
use serde::{Deserialize, Serialize};

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot parse config file {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("Invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Holds gateway.db and the code packages (code/<sha256>.zip).
    pub state_dir: PathBuf,
    /// Appears in function ARNs and `x-fc-region`.
    pub region: String,
    /// The scheduler's internal (mTLS) base URL.
    pub scheduler_url: String,
    /// Plain-HTTP Prometheus endpoint; none when absent.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    pub public: PublicListener,
    pub internal: InternalListener,
    /// This gateway's internal mTLS identity (server and client).
    pub tls: TlsFiles,
    /// How long a lease stays with the gateway after a healthy call, for
    /// the next call of the same function revision; 0 disables.
    #[serde(default = "default_lease_hold_ms")]
    pub lease_hold_ms: u64,
    /// How long temporary credentials issued to instances of functions
    /// with a role stay valid (agents refresh them well before).
    #[serde(default = "default_credentials_lifetime_s")]
    pub credentials_lifetime_s: u64,
    /// Accounts and keys ensured at start (development clusters): imported
    /// into the store sealed; rotate them with `kiln keys` in production.
    #[serde(default)]
    pub bootstrap_keys: Vec<BootstrapKey>,
    /// The key that seals access key secrets and function environments in
    /// the store (`[secrets]`). Absent: `state_dir/secrets.key`, created on
    /// first start (development only: it then sits beside what it seals).
    #[serde(default)]
    pub secrets: Option<SecretsConfig>,
    /// The async invocation queue's dispatcher.
    #[serde(default)]
    pub async_queue: AsyncQueueConfig,
    /// End-of-support dates of runtimes (`[[runtimes]]`); runtimes not
    /// listed are active. See [`crate::runtimes`].
    #[serde(default)]
    pub runtimes: Vec<crate::runtimes::RuntimeLifecycleConfig>,
    /// A second public listener, reachable from VPCs only (`[vpc_listener]`):
    /// it also serves functions that take calls only from their VPCs.
    #[serde(default)]
    pub vpc_listener: Option<VpcListener>,
    /// Request signatures: the date window and the replay cache's sizing
    /// (`[signatures]`).
    #[serde(default)]
    pub signatures: SignatureConfig,
    /// Per-account bounds: functions, code bytes, layer versions, async
    /// queue depth (see [`crate::bounds`]).
    #[serde(default)]
    pub tenant_bounds: crate::bounds::TenantBoundsConfig,
    /// The VPCs functions may attach to and the accounts that own each
    /// (`[[vpcs]]`, see [`crate::vpcs`]); a `vpcConfig` or VPC binding
    /// naming any other VPC is refused.
    #[serde(default)]
    pub vpcs: Vec<crate::vpcs::VpcOwners>,
    /// HTTP triggers' host names (`[http_triggers]`, see
    /// [`crate::http_trigger`]).
    #[serde(default)]
    pub http_triggers: HttpTriggersConfig,
    /// Several gateways sharing one PostgreSQL database (`[cluster]`;
    /// docs/ha.md): metadata, code packages, the async queue, signature
    /// nonces and timer ticks live there. Absent: this gateway alone, on
    /// SQLite files in `state_dir`.
    #[serde(default)]
    pub cluster: Option<GatewayCluster>,
}

/// `[cluster]`: the database the gateways of a cluster share.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayCluster {
    /// A `postgresql://` URL or `key=value` string; a unix socket or a
    /// loopback address (Kiln does not speak TLS to PostgreSQL yet).
    pub postgres_url: String,
    /// A file holding the database password (a systemd credential), when
    /// the URL has none: the URL may be world-readable, this file not.
    #[serde(default)]
    pub postgres_password_file: Option<PathBuf>,
    /// The most connections this gateway opens to the database.
    #[serde(default = "default_cluster_max_connections")]
    pub max_connections: usize,
}

impl std::fmt::Debug for GatewayCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password.
        f.debug_struct("GatewayCluster")
            .field("postgres_password_file", &self.postgres_password_file)
            .field("max_connections", &self.max_connections)
            .finish_non_exhaustive()
    }
}

fn default_cluster_max_connections() -> usize {
    16
}

/// `[http_triggers]`: the domains under which HTTP triggers get their
/// host names, `https://{function}-{id}.{domain}`. The public listener's
/// certificate must name `*.{domain}` (`kiln dev`'s does), and the names
/// must resolve to the gateway (any `*.localhost` name resolves to
/// loopback; elsewhere a wildcard DNS record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpTriggersConfig {
    /// The internet domain: a trigger's `urlInternet` host lives under it.
    pub domain: String,
    /// The intranet (VPC) domain for `urlIntranet`; none: triggers have no
    /// intranet URL (`urlIntranet` is empty).
    pub intranet_domain: Option<String>,
    /// The port clients reach triggers at, when it is not the public
    /// listener's own (a load balancer in front of several gateways
    /// listens on another): trigger URLs name it. None: the listener's.
    pub public_port: Option<u16>,
}

/// `kiln dev`'s and the default trigger domain.
pub const DEFAULT_TRIGGER_DOMAIN: &str = "fcapp.localhost";

impl Default for HttpTriggersConfig {
    fn default() -> Self {
        Self {
            domain: DEFAULT_TRIGGER_DOMAIN.to_owned(),
            intranet_domain: None,
            public_port: None,
        }
    }
}

/// A lower-case DNS name of at least two labels.
fn is_domain(d: &str) -> bool {
    d.contains('.')
        && d.len() <= 200
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// `[signatures]`: how far a request's date may be from the gateway's
/// clock, and the signed-request rate the replay cache is sized for (see
/// `kiln_auth::nonce` and docs/security.md, "The public edge"). The cache
/// holds `provisioned_rps * skew_s` nonces; an account may hold
/// `account_rps * skew_s` of them, and once the cache is full an account
/// over its fair share (the capacity divided by the accounts signing) gets
/// `ResourceThrottled` while the others carry on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SignatureConfig {
    /// FC's window is 15 minutes (900).
    pub skew_s: u64,
    /// Signed requests per second the gateway is provisioned for.
    pub provisioned_rps: u64,
    /// The most one account may sustain; absent: `provisioned_rps` (an
    /// account alone may use the whole cache; fair shares still apply
    /// once it is full).
    pub account_rps: Option<u64>,
}

impl Default for SignatureConfig {
    fn default() -> Self {
        Self {
            skew_s: kiln_core::limits::SIGNATURE_SKEW_MS / 1000,
            provisioned_rps: kiln_auth::NonceLimits::DEFAULT_RATE,
            account_rps: None,
        }
    }
}

impl SignatureConfig {
    pub fn account_rps(&self) -> u64 {
        self.account_rps.unwrap_or(self.provisioned_rps)
    }
}

/// `[vpc_listener]`: FC's API on an address only the listed VPCs reach.
/// A call to a function comes through when the function is bound to one of
/// `vpc_ids` (CreateVpcBinding).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VpcListener {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub vpc_ids: Vec<String>,
    #[serde(default)]
    pub limits: ListenerLimits,
}

pub use kiln_internal_api::server::ListenerLimits;

/// The async dispatcher (`[async_queue]`); the queue itself is
/// `state_dir/queue.db`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AsyncQueueConfig {
    /// Async invocations in flight across all queues.
    pub max_in_flight: usize,
    /// Async invocations in flight for one queue (an account's, or a
    /// function's own): the bound that keeps one backlog from taking every slot.
    pub per_queue: usize,
    /// How long a delivery holds its message before it is redelivered
    /// (a dispatcher that died mid-flight); longer than any function timeout.
    pub lease_ms: u64,
    /// The longest backoff after throttling or a system error.
    pub backoff_cap_ms: u64,
    /// Extra CA (PEM) trusted for https webhook destinations, besides the
    /// system's roots.
    pub webhook_ca: Option<PathBuf>,
    /// How long a finished async task stays readable before it is purged.
    pub task_retention_s: u64,
}

impl Default for AsyncQueueConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 256,
            per_queue: 32,
            lease_ms: 15 * 60 * 1000,
            backoff_cap_ms: 60_000,
            webhook_ca: None,
            task_retention_s: 7 * 24 * 3600,
        }
    }
}

/// `[secrets]`: the sealing key and the keys it replaced (see
/// [`crate::secrets`] and docs/security.md, "Secrets at rest").
pub use kiln_store::seal::SecretsConfig;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicListener {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Timeouts and connection caps (`[public.limits]`; see
    /// [`ListenerLimits`] for each and its default).
    #[serde(default)]
    pub limits: ListenerLimits,
    /// On shutdown (SIGTERM), how long `GET /healthz` answers 503
    /// `draining` while this listener keeps serving, before it stops
    /// accepting and drains: set it above the load balancer's check
    /// interval times its fall count, so the balancer stops sending new
    /// connections first. 0 (the default, for a gateway without a
    /// balancer): stop accepting at once.
    #[serde(default)]
    pub drain_delay_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InternalListener {
    pub listen: SocketAddr,
    /// `[internal.limits]`, as the public listener's.
    #[serde(default)]
    pub limits: ListenerLimits,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapKey {
    pub account_id: AccountId,
    pub access_key_id: String,
    pub access_key_secret: String,
}

impl BootstrapKey {
    pub fn new(account_id: AccountId, access_key_id: &str, access_key_secret: &str) -> Self {
        Self {
            account_id,
            access_key_id: access_key_id.to_owned(),
            access_key_secret: access_key_secret.to_owned(),
        }
    }
}

pub const LEASE_HOLD_MAX_MS: u64 = 5_000;

fn default_lease_hold_ms() -> u64 {
    250
}

fn default_credentials_lifetime_s() -> u64 {
    3600
}

impl GatewayConfig {
    /// Both listeners on loopback (ports chosen by the system), the
    /// certificates of a development PKI (roles `gateway` and
    /// `gateway-internal`), no bootstrap keys and every other setting at
    /// its default: what tests and benchmarks start from.
    pub fn loopback(
        state_dir: PathBuf,
        region: &str,
        scheduler_url: &str,
        pki: &kiln_pki::DevPki,
    ) -> Self {
        let public = pki.files("gateway");
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            state_dir,
            region: region.to_owned(),
            scheduler_url: scheduler_url.to_owned(),
            metrics_listen: None,
            public: PublicListener {
                listen: any_port,
                cert: public.cert,
                key: public.key,
                limits: ListenerLimits::default(),
                drain_delay_ms: 0,
            },
            internal: InternalListener {
                listen: any_port,
                limits: ListenerLimits::default(),
            },
            tls: pki.files("gateway-internal"),
            lease_hold_ms: default_lease_hold_ms(),
            credentials_lifetime_s: default_credentials_lifetime_s(),
            bootstrap_keys: Vec::new(),
            secrets: None,
            async_queue: AsyncQueueConfig::default(),
            runtimes: Vec::new(),
            vpc_listener: None,
            signatures: SignatureConfig::default(),
            tenant_bounds: Default::default(),
            vpcs: Vec::new(),
            http_triggers: HttpTriggersConfig::default(),
            cluster: None,
        }
    }

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
        if self.state_dir.as_os_str().is_empty() {
            return invalid("state_dir must not be empty".into());
        }
        let t = &self.http_triggers;
        for d in std::iter::once(&t.domain).chain(t.intranet_domain.as_ref()) {
            if !is_domain(d) {
                return invalid(format!(
                    "http_triggers domain {d:?} must be a lower-case DNS name such as fcapp.localhost"
                ));
            }
        }
        if t.intranet_domain.as_ref() == Some(&t.domain) {
            return invalid("http_triggers intranet_domain must differ from domain".into());
        }
        if t.public_port == Some(0) {
            return invalid(
                "http_triggers public_port must be the port clients reach (1 to 65535); \
                 remove it to use the public listener's"
                    .into(),
            );
        }
        if self.region.is_empty()
            || !self
                .region
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return invalid(format!(
                "region {:?} must be lower-case letters, digits and '-'",
                self.region
            ));
        }
        if let Err(reason) = kiln_internal_api::Endpoints::parse(&self.scheduler_url) {
            return invalid(format!("scheduler_url: {reason}"));
        }
        if let Some(c) = &self.cluster {
            if self.secrets.is_none() {
                return invalid(
                    "[cluster] needs [secrets] key_file: every gateway of a cluster must seal \
                     secrets with the same key, kept apart from the data"
                        .into(),
                );
            }
            if c.postgres_password_file
                .as_ref()
                .is_some_and(|p| p.starts_with("/nix/store"))
            {
                return invalid(
                    "cluster.postgres_password_file must not be in the Nix store, which every \
                     user can read"
                        .into(),
                );
            }
            if !(1..=256).contains(&c.max_connections) {
                return invalid("cluster.max_connections must be between 1 and 256".into());
            }
        }
        self.public
            .limits
            .validate("public")
            .and_then(|()| self.internal.limits.validate("internal"))
            .map_err(ConfigError::Invalid)?;
        if let Some(v) = &self.vpc_listener {
            v.limits
                .validate("vpc_listener")
                .map_err(ConfigError::Invalid)?;
        }
        if self.signatures.skew_s == 0 || self.signatures.skew_s > 3600 {
            return invalid(format!(
                "signatures.skew_s {} must be between 1 and 3600 seconds",
                self.signatures.skew_s
            ));
        }
        if self.signatures.provisioned_rps == 0 || self.signatures.account_rps() == 0 {
            return invalid("signatures.provisioned_rps and account_rps must be above 0".into());
        }
        if self.public.listen == self.internal.listen && self.public.listen.port() != 0 {
            return invalid("public and internal listeners must use different addresses".into());
        }
        if let Some(v) = &self.vpc_listener {
            if v.listen.port() != 0
                && (v.listen == self.public.listen || v.listen == self.internal.listen)
            {
                return invalid(
                    "vpc_listener must use an address of its own (not public's or internal's)"
                        .into(),
                );
            }
            if v.vpc_ids.is_empty() {
                return invalid("vpc_listener.vpc_ids must name at least one VPC".into());
            }
            for id in &v.vpc_ids {
                crate::validate::check_network_id("vpc_listener.vpc_ids", "vpc-", id)
                    .map_err(|e| ConfigError::Invalid(e.message))?;
            }
        }
        let (lo, hi) = (crate::ram::LIFETIME_MIN_S, crate::ram::LIFETIME_MAX_S);
        if !(lo..=hi).contains(&self.credentials_lifetime_s) {
            return invalid(format!(
                "credentials_lifetime_s must be between {lo} and {hi}, got {}",
                self.credentials_lifetime_s
            ));
        }
        if self.lease_hold_ms > LEASE_HOLD_MAX_MS {
            return invalid(format!(
                "lease_hold_ms must be at most {LEASE_HOLD_MAX_MS}, got {}",
                self.lease_hold_ms
            ));
        }
        let q = &self.async_queue;
        if q.max_in_flight == 0 || q.per_queue == 0 || q.per_queue > q.max_in_flight {
            return invalid(format!(
                "async_queue: need 0 < per_queue ({}) <= max_in_flight ({})",
                q.per_queue, q.max_in_flight
            ));
        }
        if q.lease_ms < 1_000 || q.backoff_cap_ms < 500 {
            return invalid(
                "async_queue: lease_ms must be at least 1000 and backoff_cap_ms at least 500"
                    .into(),
            );
        }
        self.tenant_bounds.validate().or_else(invalid)?;
        crate::vpcs::validate(&self.vpcs).or_else(invalid)?;
        crate::runtimes::RuntimeCatalogue::from_config(&self.runtimes)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if let Some(sec) = &self.secrets {
            sec.validate().or_else(invalid)?;
        }
        let mut seen = std::collections::HashSet::new();
        for k in &self.bootstrap_keys {
            if !valid_access_key_id(&k.access_key_id) {
                return invalid(format!(
                    "bootstrap access_key_id {:?} must be 1 to 128 letters or digits",
                    k.access_key_id
                ));
            }
            if k.access_key_secret.len() < 16 {
                return invalid(format!(
                    "bootstrap key {}: access_key_secret must be at least 16 characters",
                    k.access_key_id
                ));
            }
            if !seen.insert(k.access_key_id.as_str()) {
                return invalid(format!(
                    "bootstrap access_key_id {} appears twice",
                    k.access_key_id
                ));
            }
        }
        Ok(())
    }

    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join("gateway.db")
    }

    /// The schedulers (`scheduler_url`: one URL, or a cluster's, comma
    /// separated). Validated by [`Self::validate`].
    pub fn scheduler_endpoints(&self) -> kiln_internal_api::Endpoints {
        kiln_internal_api::Endpoints::parse(&self.scheduler_url)
            .expect("scheduler_url is validated before use")
    }

    pub fn queue_path(&self) -> PathBuf {
        self.state_dir.join("queue.db")
    }

    /// The sealing key's file when `[secrets]` names none.
    pub fn default_key_file(&self) -> PathBuf {
        self.state_dir.join("secrets.key")
    }

    pub fn code_dir(&self) -> PathBuf {
        self.state_dir.join("code")
    }
}

/// Access key ids: the alphabet FC's keys use.
pub fn valid_access_key_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> GatewayConfig {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
        GatewayConfig::load(&path).unwrap()
    }

    #[test]
    fn example_loads_and_validates() {
        let c = example();
        assert_eq!(c.region, "cn-hangzhou");
        assert_eq!(c.bootstrap_keys.len(), 1);
        assert!(c.metrics_listen.is_some());
        assert_eq!(c.lease_hold_ms, 250);
        assert_eq!(c.credentials_lifetime_s, 3600);
        assert_eq!(c.async_queue.per_queue, 32);
        let secrets = c.secrets.unwrap();
        assert_eq!(secrets.key_file, Path::new("/etc/kiln/gateway-secrets.key"));
        assert!(secrets.previous_key_files.is_empty());
    }

    #[test]
    fn a_key_file_in_the_nix_store_is_refused() {
        let mut c = example();
        c.secrets.as_mut().unwrap().key_file = "/nix/store/abc-gateway.key".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("Nix store") && e.contains("LoadCredential"),
            "{e}"
        );
        let mut c = example();
        c.secrets.as_mut().unwrap().previous_key_files = vec!["/nix/store/old.key".into()];
        assert!(c.validate().is_err());
        let mut c = example();
        c.secrets = None;
        c.validate().unwrap();
    }

    #[test]
    fn a_cluster_needs_the_shared_key_and_a_password_file_outside_the_store() {
        let mut c = example();
        c.cluster = Some(GatewayCluster {
            postgres_url: "host=/run/postgresql user=kiln dbname=kiln".into(),
            postgres_password_file: Some("/etc/kiln/pgpass".into()),
            max_connections: default_cluster_max_connections(),
        });
        c.validate().unwrap();
        assert!(
            !format!("{:?}", c.cluster).contains("dbname"),
            "the URL may hold a password"
        );
        let mut bad = c.clone();
        bad.secrets = None;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("[secrets] key_file"));
        let mut bad = c.clone();
        bad.cluster.as_mut().unwrap().postgres_password_file = Some("/nix/store/x-pgpass".into());
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("Nix store"));
        let mut bad = c;
        bad.cluster.as_mut().unwrap().max_connections = 0;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("max_connections"));
    }

    #[test]
    fn the_vpc_listener_is_optional_and_checked() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
        let text = std::fs::read_to_string(path).unwrap();
        assert_eq!(example().vpc_listener, None);
        let with = format!(
            "{text}\n[vpc_listener]\nlisten = \"10.0.0.11:8443\"\ncert = \"/c.pem\"\nkey = \"/k.pem\"\nvpc_ids = [\"vpc-a\"]\n"
        );
        let c: GatewayConfig = toml::from_str(&with).unwrap();
        c.validate().unwrap();
        assert_eq!(c.vpc_listener.as_ref().unwrap().vpc_ids, ["vpc-a"]);
        let bad = |f: fn(&mut VpcListener)| {
            let mut c = c.clone();
            f(c.vpc_listener.as_mut().unwrap());
            c.validate().unwrap_err().to_string()
        };
        assert!(bad(|v| v.vpc_ids.clear()).contains("vpc_ids"));
        assert!(bad(|v| v.vpc_ids = vec!["a".into()]).contains("vpc_ids"));
        let public = c.public.listen;
        let mut same = c.clone();
        same.vpc_listener.as_mut().unwrap().listen = public;
        assert!(same
            .validate()
            .unwrap_err()
            .to_string()
            .contains("vpc_listener"));
        assert!(toml::from_str::<GatewayConfig>(&format!("{with}bogus = 1\n")).is_err());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
        let text = std::fs::read_to_string(path).unwrap() + "\nbogus = 1\n";
        assert!(toml::from_str::<GatewayConfig>(&text).is_err());
    }

    #[test]
    fn validation_catches_bad_values() {
        let mut c = example();
        c.scheduler_url = "http://x".into();
        assert!(c.validate().is_err());
        let mut c = example();
        c.region = "CN Hangzhou".into();
        assert!(c.validate().is_err());
        let mut c = example();
        c.bootstrap_keys[0].access_key_secret = "short".into();
        assert!(c.validate().is_err());
        let mut c = example();
        let k = c.bootstrap_keys[0].clone();
        c.bootstrap_keys.push(k);
        assert!(c.validate().is_err());
        let mut c = example();
        c.bootstrap_keys[0].access_key_id = "a/b".into();
        assert!(c.validate().is_err());
        let mut c = example();
        c.lease_hold_ms = 60_000;
        assert!(c.validate().is_err());
        for bad in [0, 4, 43_201] {
            let mut c = example();
            c.credentials_lifetime_s = bad;
            assert!(c.validate().is_err(), "{bad}");
        }
        let mut c = example();
        c.async_queue.per_queue = c.async_queue.max_in_flight + 1;
        assert!(c.validate().is_err());
        let mut c = example();
        c.async_queue.lease_ms = 10;
        assert!(c.validate().is_err());
    }

    #[test]
    fn trigger_urls_may_name_a_load_balancers_port() {
        assert_eq!(example().http_triggers.public_port, None);
        let mut c = example();
        c.http_triggers.public_port = Some(8443);
        c.validate().unwrap();
        c.http_triggers.public_port = Some(0);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("public_port"), "{e}");
    }
}
