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
    // The dev CA signs renewed agent certificates and bootstrap joins
    // (docs/security.md: a production cluster gives an intermediate).
    let text = format!(
        "state_dir = {:?}\nlisten = \"127.0.0.1:0\"\nidle_timeout_s = {}\n{}\n\
         [certificates]\nca_cert = {:?}\nca_key = {:?}\n\
         [secrets]\nkey_file = {:?}\n",
        opts.state_dir.join("scheduler"),
        opts.idle_timeout_s,
        tls_table(&pki.files("scheduler")),
        pki.ca_cert(),
        pki.dir.join("ca-key.pem"),
        scheduler_key_file(opts),
    );
    let config: kiln_scheduler::SchedulerConfig = parse("scheduler", &text)?;
    config.validate()?;
    Ok(config)
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
    (account_id, access_key_id, access_key_secret): (&str, &str, &str),
) -> Result<kiln_gateway::GatewayConfig> {
    let public = pki.files("gateway");
    let text = format!(
        "state_dir = {:?}\nregion = \"cn-hangzhou\"\nscheduler_url = {:?}\ncredentials_lifetime_s = {}\n\
         [public]\nlisten = {:?}\ncert = {:?}\nkey = {:?}\n\
         [internal]\nlisten = \"127.0.0.1:0\"\n\
         {}\
         [secrets]\nkey_file = {:?}\n\
         [[bootstrap_keys]]\naccount_id = {:?}\naccess_key_id = {:?}\naccess_key_secret = {:?}\n",
        opts.state_dir.join("gateway"),
        scheduler_url,
        opts.credentials_lifetime_s,
        opts.listen.to_string(),
        public.cert,
        public.key,
        tls_table(&pki.files("gateway-internal")),
        gateway_key_file(opts),
        account_id,
        access_key_id,
        access_key_secret,
    );
    let config: kiln_gateway::GatewayConfig = parse("gateway", &text)?;
    config.validate()?;
    Ok(config)
}

pub fn agent(
    opts: &DevOptions,
    agent_state: &std::path::Path,
    pki: &DevPki,
    scheduler_url: &str,
    gateway_internal_url: &str,
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
    // A development node overcommits CPU (functions mostly wait) but not
    // memory.
    let text = format!(
        "state_dir = {:?}\nlisten = \"127.0.0.1:0\"\nscheduler_url = {:?}\n\
         gateway_internal_url = {:?}\nregion = \"cn-hangzhou\"\ndrain_on_shutdown = true\n\
         {}\
         [node]\nzone = \"dev\"\ntenancy = \"dedicated\"\nmemory_mb = {}\ncpu_milli = {}\nmax_instances = 512\n\
         [sandbox]\nname_prefix = {:?}\ninstance_subnet = {:?}\ncgroup_parent = {:?}\n{}",
        agent_state,
        scheduler_url,
        gateway_internal_url,
        tls_table(&pki.files("agent")),
        memory_mb * 3 / 4,
        cpus * 1000 * 16,
        opts.sandbox_prefix,
        opts.instance_subnet,
        opts.sandbox_prefix,
        rootfs,
    );
    let config: kiln_agent::AgentConfig = parse("agent", &text)?;
    config.validate()?;
    Ok(config)
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
