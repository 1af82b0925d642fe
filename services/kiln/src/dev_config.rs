//! The configurations `kiln dev` gives its three services: rendered as the
//! same TOML an operator writes, then parsed and validated through each
//! service's own schema, so dev runs exercise the production config path.

use anyhow::{Context, Result};
use kiln_pki::{DevPki, TlsFiles};

use crate::commands::dev::DevOptions;

fn tls_table(files: &TlsFiles) -> String {
    format!(
        "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        files.ca, files.cert, files.key
    )
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T> {
    toml::from_str(text)
        .with_context(|| format!("kiln dev built an invalid {what} config:\n{text}"))
}

pub fn scheduler(opts: &DevOptions, pki: &DevPki) -> Result<kiln_scheduler::SchedulerConfig> {
    let text = scheduler_text(
        opts,
        pki,
        &opts.state_dir.join("scheduler"),
        "127.0.0.1:0".parse().expect("an address"),
        "",
    );
    let config: kiln_scheduler::SchedulerConfig = parse("scheduler", &text)?;
    config.validate()?;
    Ok(config)
}

/// The database a `kiln dev --postgres` cluster shares.
#[derive(Debug, Clone)]
pub struct ClusterDatabase {
    pub url: String,
    pub password_file: Option<std::path::PathBuf>,
}

impl ClusterDatabase {
    /// The `[cluster]` lines both services share.
    fn lines(&self) -> String {
        let password = self
            .password_file
            .as_ref()
            .map(|p| format!("postgres_password_file = {p:?}\n"))
            .unwrap_or_default();
        format!("postgres_url = {:?}\n{password}", self.url)
    }
}

/// One scheduler of a `kiln dev --postgres` cluster: its own state
/// directory and fixed loopback port (its advertised URL), the shared
/// database and sealing key. Returned as the TOML file its process reads,
/// checked by parsing it here first.
pub fn cluster_scheduler(
    opts: &DevOptions,
    pki: &DevPki,
    name: &str,
    port: u16,
    db: &ClusterDatabase,
) -> Result<String> {
    let cluster = format!(
        "[cluster]\n{}advertise_url = \"https://127.0.0.1:{port}\"\n",
        db.lines()
    );
    let text = scheduler_text(
        opts,
        pki,
        &opts.state_dir.join(name),
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        &cluster,
    );
    let config: kiln_scheduler::SchedulerConfig = parse("scheduler", &text)?;
    config.validate()?;
    Ok(text)
}

fn scheduler_text(
    opts: &DevOptions,
    pki: &DevPki,
    state_dir: &std::path::Path,
    listen: std::net::SocketAddr,
    tail: &str,
) -> String {
    // The dev CA signs renewed agent certificates and bootstrap joins
    // (docs/security.md: a production cluster gives an intermediate).
    format!(
        "state_dir = {:?}\nlisten = \"{listen}\"\nidle_timeout_s = {}\n{}\n\
         [certificates]\nca_cert = {:?}\nca_key = {:?}\n\
         [secrets]\nkey_file = {:?}\n{tail}",
        state_dir,
        opts.idle_timeout_s,
        tls_table(&pki.files("scheduler")),
        pki.ca_cert(),
        pki.dir.join("ca-key.pem"),
        scheduler_key_file(opts),
    )
}

/// The scheduler's sealing key (the environments in the specs it keeps),
/// created 0600 by `kiln dev` on first run beside its state directory.
pub fn scheduler_key_file(opts: &DevOptions) -> std::path::PathBuf {
    opts.state_dir.join("secrets").join("scheduler.key")
}

/// The gateway's sealing key (`[secrets] key_file`), created 0600 by
/// `kiln dev` on first run: beside the gateway's state directory, not in
/// it, so a copy of `gateway/` alone opens no secret.
pub fn gateway_key_file(opts: &DevOptions) -> std::path::PathBuf {
    opts.state_dir.join("secrets").join("gateway.key")
}

pub fn gateway(
    opts: &DevOptions,
    pki: &DevPki,
    scheduler_url: &str,
    account: (&str, &str, &str),
) -> Result<kiln_gateway::GatewayConfig> {
    let text = gateway_text(
        opts,
        pki,
        GatewayPlace {
            state_dir: &opts.state_dir.join("gateway"),
            scheduler_url,
            public_listen: opts.listen,
            internal_listen: "127.0.0.1:0".parse().expect("an address"),
            public_extra: "",
            tail: "",
        },
        account,
    );
    let config: kiln_gateway::GatewayConfig = parse("gateway", &text)?;
    config.validate()?;
    Ok(config)
}

/// One gateway of a `kiln dev --postgres` cluster (`name`, e.g.
/// `gateway-1`): its own state directory and fixed loopback ports behind
/// HAProxy, every scheduler, the shared database and sealing key, and a
/// drain of `drain_delay_ms` on SIGTERM so HAProxy's health check takes
/// it out before it stops accepting; HTTP triggers' URLs name HAProxy's
/// port (`balancer_port`). Returned as the TOML file its process reads,
/// checked by parsing it here first.
#[allow(clippy::too_many_arguments)]
pub fn cluster_gateway(
    opts: &DevOptions,
    pki: &DevPki,
    name: &str,
    (public_port, internal_port): (u16, u16),
    balancer_port: u16,
    scheduler_url: &str,
    db: &ClusterDatabase,
    drain_delay_ms: u64,
    account: (&str, &str, &str),
) -> Result<String> {
    let public_extra = format!("drain_delay_ms = {drain_delay_ms}\n");
    let tail = format!(
        "[http_triggers]\npublic_port = {balancer_port}\n[cluster]\n{}",
        db.lines()
    );
    let text = gateway_text(
        opts,
        pki,
        GatewayPlace {
            state_dir: &opts.state_dir.join(name),
            scheduler_url,
            public_listen: std::net::SocketAddr::from(([127, 0, 0, 1], public_port)),
            internal_listen: std::net::SocketAddr::from(([127, 0, 0, 1], internal_port)),
            public_extra: &public_extra,
            tail: &tail,
        },
        account,
    );
    let config: kiln_gateway::GatewayConfig = parse("gateway", &text)?;
    config.validate()?;
    Ok(text)
}

/// Where a gateway keeps its state and listens, and what its config adds
/// to the public listener's table (`public_extra`) and at the end (`tail`,
/// whole tables).
struct GatewayPlace<'a> {
    state_dir: &'a std::path::Path,
    scheduler_url: &'a str,
    public_listen: std::net::SocketAddr,
    internal_listen: std::net::SocketAddr,
    public_extra: &'a str,
    tail: &'a str,
}

fn gateway_text(
    opts: &DevOptions,
    pki: &DevPki,
    place: GatewayPlace<'_>,
    (account_id, access_key_id, access_key_secret): (&str, &str, &str),
) -> String {
    let public = pki.files("gateway");
    let text = format!(
        "state_dir = {:?}\nregion = \"cn-hangzhou\"\nscheduler_url = {:?}\ncredentials_lifetime_s = {}\n\
         [public]\nlisten = {:?}\ncert = {:?}\nkey = {:?}\n{}\
         [internal]\nlisten = {:?}\n\
         {}\
         [secrets]\nkey_file = {:?}\n\
         [[bootstrap_keys]]\naccount_id = {:?}\naccess_key_id = {:?}\naccess_key_secret = {:?}\n",
        place.state_dir,
        place.scheduler_url,
        opts.credentials_lifetime_s,
        place.public_listen.to_string(),
        public.cert,
        public.key,
        place.public_extra,
        place.internal_listen.to_string(),
        tls_table(&pki.files("gateway-internal")),
        gateway_key_file(opts),
        account_id,
        access_key_id,
        access_key_secret,
    );
    let text = match opts.signature_skew_s {
        Some(skew_s) => format!("{text}[signatures]\nskew_s = {skew_s}\n"),
        None => text,
    };
    format!("{text}{}", place.tail)
}

pub fn agent(
    opts: &DevOptions,
    agent_state: &std::path::Path,
    pki: &DevPki,
    scheduler_url: &str,
    gateway_internal_url: &str,
    gateway_public_port: u16,
    memory_mb: u64,
) -> Result<kiln_agent::AgentConfig> {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as u64;
    let rootfs = opts
        .rootfs_dir
        .as_ref()
        .map(|d| format!("rootfs_dir = {d:?}\n"))
        .unwrap_or_default();
    // Network isolation is on unless asked otherwise: instances reach the
    // public internet (not this machine's ports, its private network or
    // the metadata address) and, of this machine, only the gateway's
    // public port, as any internet client can.
    // The machine's DNS resolvers (often a private address) stay
    // reachable, so that functions resolve names as the host does.
    let network = if opts.insecure_no_network_isolation {
        "insecure_network_isolation_disabled = true\n".to_owned()
    } else {
        let resolvers: Vec<String> =
            nameservers(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default())
                .iter()
                .map(|a| format!("\"{a}/32\""))
                .collect();
        format!(
            "[sandbox.network]\npublic_ports = [{gateway_public_port}]\nallow = [{}]\n",
            resolvers.join(", ")
        )
    };
    // Pre-made sandboxes (issue 20): on, within 1/16 of the node's memory
    // (at least 256 MB, at most 2 GB), each limited by its cgroup to the
    // 32 MB it is charged until a cold start claims it.
    let premade = if opts.premade {
        format!(
            "[sandbox.premade]\nenabled = true\nbudget_mb = {}\nmax_per_runtime = 32\n",
            (memory_mb / 16).clamp(256, 2048)
        )
    } else {
        String::new()
    };
    // Custom-container images: the registries' trust and sizes.
    let mut images = String::new();
    if let Some(ca) = &opts.registry_ca_bundle {
        images += &format!("ca_bundle = {ca:?}\n");
    }
    if let Some(mb) = opts.max_image_mb {
        images += &format!("max_image_mb = {mb}\n");
    }
    if let Some(mb) = opts
        .image_budget_mb
        .or(opts.max_image_mb.map(|m| m.max(40 * 1024)))
    {
        images += &format!("budget_mb = {mb}\n");
    }
    if !images.is_empty() {
        images = format!("[images]\n{images}");
    }
    // A development node overcommits CPU (functions mostly wait) but not
    // memory.
    let text = format!(
        "state_dir = {:?}\nlisten = \"127.0.0.1:0\"\nscheduler_url = {:?}\n\
         gateway_internal_url = {:?}\nregion = \"cn-hangzhou\"\ndrain_on_shutdown = true\n\
         {}\
         [node]\nzone = \"dev\"\ntenancy = \"dedicated\"\nmemory_mb = {}\ncpu_milli = {}\nmax_instances = 512\n\
         {}\
         [sandbox]\nname_prefix = {:?}\ninstance_subnet = {:?}\ncgroup_parent = {:?}\n{}{}{}",
        agent_state,
        scheduler_url,
        gateway_internal_url,
        tls_table(&pki.files("agent")),
        memory_mb * 3 / 4,
        cpus * 1000 * 16,
        images,
        opts.sandbox_prefix,
        opts.instance_subnet,
        opts.sandbox_prefix,
        rootfs,
        network,
        premade,
    );
    let config: kiln_agent::AgentConfig = parse("agent", &text)?;
    config.validate()?;
    Ok(config)
}

/// The IPv4 name servers of a resolv.conf an instance can reach (not the
/// host's loopback, which is not the instance's).
fn nameservers(resolv_conf: &str) -> Vec<std::net::Ipv4Addr> {
    let mut out: Vec<std::net::Ipv4Addr> = resolv_conf
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next())?
        })
        .filter_map(|a| a.parse().ok())
        .filter(|a: &std::net::Ipv4Addr| !a.is_loopback() && !a.is_unspecified())
        .collect();
    out.dedup();
    out
}

/// Where the agent keeps its instances. Sandboxes run as an unprivileged
/// user (the user namespace's root), which must be able to reach their
/// bundles: under a home directory like `/root` (mode 0700) it cannot, so
/// then the agent's state goes below `/var/lib/kiln/dev/` instead.
pub fn agent_state_dir(state_dir: &std::path::Path) -> std::path::PathBuf {
    let preferred = state_dir.join("agent");
    if reachable_by_others(state_dir) {
        return preferred;
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(state_dir.as_os_str().as_encoded_bytes());
    std::path::PathBuf::from("/var/lib/kiln/dev").join(&hex::encode(digest)[..16])
}

/// Whether every directory from `/` down to `path` lets others search it.
fn reachable_by_others(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Ok(path) = path.canonicalize() else {
        return false;
    };
    path.ancestors().all(|dir| {
        std::fs::metadata(dir)
            .map(|m| m.permissions().mode() & 0o001 != 0)
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn kiln_dev_isolates_instances_unless_told_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let pki = kiln_pki::DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
        let mut opts = DevOptions {
            state_dir: dir.path().to_owned(),
            listen: "127.0.0.1:8443".parse().unwrap(),
            sandbox_prefix: "kiln".into(),
            instance_subnet: "10.213.0.0/16".into(),
            rootfs_dir: None,
            idle_timeout_s: 300,
            credentials_lifetime_s: 3600,
            insecure_no_network_isolation: false,
            signature_skew_s: None,
            premade: true,
            registry_ca_bundle: None,
            max_image_mb: None,
            image_budget_mb: None,
        };
        let make = |opts: &DevOptions| {
            agent(
                opts,
                dir.path(),
                &pki,
                "https://127.0.0.1:7001",
                "https://127.0.0.1:7002",
                8443,
                4096,
            )
            .unwrap()
        };
        let c = make(&opts);
        let network = c.sandbox.network.as_ref().expect("isolation is on");
        assert_eq!(network.public_ports, [8443]);
        assert!(!c.sandbox.insecure_network_isolation_disabled);
        c.require_network_isolation().unwrap();
        assert!(c.network_isolation().enforced);
        // Pre-made sandboxes are on, within a budget the cgroups enforce.
        assert!(c.sandbox.premade.enabled);
        assert_eq!(c.sandbox.premade.budget_mb, 256);
        assert!(c.sandbox.premade.capacity() >= 8);
        opts.insecure_no_network_isolation = true;
        let c = make(&opts);
        assert!(c.sandbox.network.is_none() && c.sandbox.insecure_network_isolation_disabled);
        c.require_network_isolation().unwrap();
    }

    #[test]
    fn a_clusters_services_share_the_database_and_keys_on_fixed_ports() {
        let dir = tempfile::tempdir().unwrap();
        let pki = kiln_pki::DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
        let opts = DevOptions {
            state_dir: dir.path().to_owned(),
            listen: "127.0.0.1:8443".parse().unwrap(),
            sandbox_prefix: "kiln".into(),
            instance_subnet: "10.213.0.0/16".into(),
            rootfs_dir: None,
            idle_timeout_s: 300,
            credentials_lifetime_s: 3600,
            insecure_no_network_isolation: false,
            signature_skew_s: None,
            premade: true,
            registry_ca_bundle: None,
            max_image_mb: None,
            image_budget_mb: None,
        };
        let db = ClusterDatabase {
            url: "host=/run/postgresql dbname=kiln".into(),
            password_file: Some("/etc/kiln/pgpass".into()),
        };
        let text = cluster_gateway(
            &opts,
            &pki,
            "gateway-2",
            (9002, 9102),
            8443,
            "https://127.0.0.1:7001,https://127.0.0.1:7002",
            &db,
            1500,
            ("1000000000000001", "LTAIdev", "secret-0123456789abcdef"),
        )
        .unwrap();
        let g: kiln_gateway::GatewayConfig = toml::from_str(&text).unwrap();
        assert_eq!(g.state_dir, dir.path().join("gateway-2"));
        assert_eq!(g.public.listen, "127.0.0.1:9002".parse().unwrap());
        assert_eq!(g.internal.listen, "127.0.0.1:9102".parse().unwrap());
        assert_eq!(g.public.drain_delay_ms, 1500);
        assert_eq!(g.http_triggers.public_port, Some(8443));
        let c = g.cluster.expect("[cluster]");
        assert_eq!(c.postgres_url, db.url);
        assert_eq!(c.postgres_password_file, db.password_file);
        assert_eq!(g.secrets.unwrap().key_file, gateway_key_file(&opts));

        let text = cluster_scheduler(&opts, &pki, "scheduler-b", 7002, &db).unwrap();
        let s: kiln_scheduler::SchedulerConfig = toml::from_str(&text).unwrap();
        assert_eq!(s.listen, "127.0.0.1:7002".parse().unwrap());
        let c = s.cluster.expect("[cluster]");
        assert_eq!(c.advertise_url, "https://127.0.0.1:7002");
        assert_eq!(c.postgres_password_file, db.password_file);
        assert_eq!(s.secrets.unwrap().key_file, scheduler_key_file(&opts));
    }

    #[test]
    fn the_hosts_resolvers_stay_reachable() {
        let conf = "# generated\nnameserver 10.255.255.53\nnameserver 127.0.0.53\n\
                    nameserver fd00::1\nsearch example\nnameserver 1.1.1.1\n";
        assert_eq!(
            nameservers(conf),
            [
                "10.255.255.53".parse::<std::net::Ipv4Addr>().unwrap(),
                "1.1.1.1".parse().unwrap()
            ]
        );
    }

    #[test]
    fn agent_state_moves_out_of_private_directories() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(agent_state_dir(&open), open.join("agent"));
        let private = dir.path().join("private");
        std::fs::create_dir(&private).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        let moved = agent_state_dir(&private);
        assert!(
            moved.starts_with("/var/lib/kiln/dev"),
            "{}",
            moved.display()
        );
        assert_eq!(moved, agent_state_dir(&private), "stable across starts");
    }
}
