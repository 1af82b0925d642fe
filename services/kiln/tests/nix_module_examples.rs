//! The NixOS modules (`modules/*.nix`) render `services.kiln.<role>.settings`
//! into each service's TOML file. Their defaults (`modules/defaults/<role>.json`)
//! and the example settings the docs and the NixOS VM tests use
//! (`modules/examples/<role>.json`) are rendered here the same way (JSON ->
//! TOML, the module's defaults under the example's values) and parsed by the
//! service's own config type (`deny_unknown_fields`) and `validate()`, so a
//! module setting that a service would refuse fails this test.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::Value;

fn modules_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../modules")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// `lib.recursiveUpdate defaults example`: tables merge, anything else in
/// `over` replaces what `base` had.
fn recursive_update(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) if slot.is_object() && v.is_object() => recursive_update(slot, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

/// What the module writes: defaults, then the example, as TOML text
/// (the way `pkgs.formats.toml` renders it; TOML has no null, so the
/// modules drop unset options before rendering and these files have none).
fn render(role: &str) -> String {
    let dir = modules_dir();
    let mut settings = read_json(&dir.join(format!("defaults/{role}.json")));
    recursive_update(
        &mut settings,
        read_json(&dir.join(format!("examples/{role}.json"))),
    );
    let as_toml: toml::Value = serde_json::from_value(settings)
        .unwrap_or_else(|e| panic!("{role}: settings cannot be TOML: {e}"));
    toml::to_string(&as_toml).unwrap_or_else(|e| panic!("{role}: cannot render TOML: {e}"))
}

fn parse<T: DeserializeOwned>(role: &str) -> T {
    parse_text(role, &render(role))
}

fn parse_text<T: DeserializeOwned>(role: &str, text: &str) -> T {
    let text = text.to_owned();
    toml::from_str(&text).unwrap_or_else(|e| {
        panic!("{role}: the service refuses the module's settings: {e}\n{text}")
    })
}

#[test]
fn gateway_module_settings_parse_and_validate() {
    let c: kiln_gateway::GatewayConfig = parse("gateway");
    c.validate().expect("gateway example validates");
    assert_eq!(c.region, "cn-hangzhou");
    assert_eq!(c.async_queue.per_queue, 16);
    // From the module's defaults, not the example.
    assert_eq!(c.state_dir, Path::new("/var/lib/kiln/gateway"));
    assert_eq!(c.async_queue.lease_ms, 900_000);
}

#[test]
fn scheduler_module_settings_parse_and_validate() {
    let c: kiln_scheduler::SchedulerConfig = parse("scheduler");
    c.validate().expect("scheduler example validates");
    assert_eq!(c.heartbeat_interval_ms, 1_000);
    assert_eq!(c.state_dir, Path::new("/var/lib/kiln/scheduler"));
    assert!(!c.rebalance.enabled);
}

#[test]
fn agent_module_settings_parse_and_validate() {
    let c: kiln_agent::AgentConfig = parse("agent");
    c.validate().expect("agent example validates");
    assert_eq!(c.node.max_instances, 20);
    assert_eq!(c.state_dir, Path::new("/var/lib/kiln/agent"));
    assert_eq!(c.sandbox.tmp_size_mb, 64);
    assert_eq!(c.sandbox.name_prefix, "kiln");
}

#[test]
fn a_key_the_service_does_not_know_is_refused() {
    // The check above can fail: an unknown key in the module's settings
    // (a typo, or a key a service dropped) makes the service refuse it.
    let text = render("agent").replace("[node]", "[node]\nmemroy_mb = 5");
    assert!(toml::from_str::<kiln_agent::AgentConfig>(&text).is_err());
    let text = format!("bogus = 1\n{}", render("gateway"));
    assert!(toml::from_str::<kiln_gateway::GatewayConfig>(&text).is_err());
    let text = format!("bogus = 1\n{}", render("scheduler"));
    assert!(toml::from_str::<kiln_scheduler::SchedulerConfig>(&text).is_err());
}

/// The names of the typed settings a module declares
/// (`name = kiln.setting|required|optional ...` in `modules/<role>.nix`).
fn typed_option_names(role: &str) -> Vec<String> {
    let path = modules_dir().join(format!("{role}.nix"));
    let text = std::fs::read_to_string(&path).unwrap();
    text.lines()
        .filter_map(|l| {
            let (name, rest) = l.trim().split_once(" = ")?;
            let typed = ["kiln.setting ", "kiln.required ", "kiln.optional "]
                .iter()
                .any(|p| rest.starts_with(p));
            (typed && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
                .then(|| name.to_owned())
        })
        .collect()
}

fn keys(v: &toml::Value, out: &mut std::collections::BTreeSet<String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                out.insert(k.clone());
                keys(v, out);
            }
        }
        toml::Value::Array(a) => a.iter().for_each(|v| keys(v, out)),
        _ => {}
    }
}

/// Every typed option of a module names a key the service's schema has:
/// the service's own serialisation of a config with every optional key set
/// carries all its keys.
fn assert_typed_options_exist<T: DeserializeOwned + serde::Serialize>(role: &str, optional: &str) {
    // Merge the optional keys into the rendered tables.
    let mut base: toml::Table = toml::from_str(&render(role)).unwrap();
    let extra: toml::Table = toml::from_str(optional).unwrap();
    for (k, v) in extra {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(e)) => b.extend(e),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
    let config: T = parse_text(role, &toml::to_string(&base).unwrap());
    let mut known = std::collections::BTreeSet::new();
    keys(&toml::Value::try_from(&config).unwrap(), &mut known);
    let declared = typed_option_names(role);
    assert!(declared.len() > 10, "{role}: found only {declared:?}");
    let unknown: Vec<_> = declared.iter().filter(|n| !known.contains(*n)).collect();
    assert!(
        unknown.is_empty(),
        "{role}: typed module options the service does not know: {unknown:?}"
    );
}

#[test]
fn every_typed_module_option_is_a_key_of_the_service() {
    assert_typed_options_exist::<kiln_gateway::GatewayConfig>(
        "gateway",
        "[async_queue]\nwebhook_ca = \"/etc/kiln/pki/webhook-ca.pem\"\n\
         [cluster]\npostgres_url = \"host=/run/postgresql dbname=kiln\"\n\
         postgres_password_file = \"/etc/kiln/pgpass\"\n",
    );
    assert_typed_options_exist::<kiln_scheduler::SchedulerConfig>(
        "scheduler",
        "bootstrap_listen = \"0.0.0.0:9444\"\n\
         [secrets]\nkey_file = \"/etc/kiln/scheduler-secrets.key\"\n\
         previous_key_files = [\"/etc/kiln/scheduler-secrets.old.key\"]\n\
         [certificates]\nca_cert = \"/etc/kiln/pki/signing-ca.pem\"\n\
         ca_key = \"/etc/kiln/pki/signing-ca-key.pem\"\n\
         [cluster]\npostgres_url = \"host=/run/postgresql dbname=kiln\"\n\
         postgres_password_file = \"/etc/kiln/pgpass\"\n\
         advertise_url = \"https://10.0.0.2:9443\"\n",
    );
    assert_typed_options_exist::<kiln_agent::AgentConfig>(
        "agent",
        "[bootstrap]\nurl = \"https://kiln-control:9444\"\n\
         token_file = \"/var/lib/kiln/pki/bootstrap-token\"\nnames = [\"compute-1\"]\n\
         [node]\ndedicated_account = \"1000000000000001\"\n\
         [sandbox]\nbackend = \"container\"\nrootfs_dir = \"/var/lib/kiln/rootfs\"\n\
         debootstrap_mirror = \"http://deb.debian.org/debian\"\n\
         [sandbox.network]\nuplink_interface = \"eth0\"\novs_netns = \"ovs\"\n",
    );
}

/// The scheduler module's default lease (`cluster`, off by default) is
/// the scheduler's own.
#[test]
fn scheduler_cluster_defaults_are_the_services() {
    let mut section = read_json(&modules_dir().join("defaults/scheduler-cluster.json"));
    recursive_update(
        &mut section,
        serde_json::json!({"postgres_url": "host=/run/postgresql", "advertise_url": "https://a:9443"}),
    );
    let text = format!(
        "[cluster]\n{}",
        toml::to_string(&serde_json::from_value::<toml::Table>(section).unwrap()).unwrap()
    );
    #[derive(serde::Deserialize)]
    struct Only {
        cluster: kiln_scheduler::config::ClusterSettings,
    }
    let from_module: Only = toml::from_str(&text).unwrap();
    let defaults: Only = toml::from_str(
        "[cluster]\npostgres_url = \"host=/run/postgresql\"\nadvertise_url = \"https://a:9443\"\n",
    )
    .unwrap();
    assert_eq!(from_module.cluster, defaults.cluster);
}

/// The gateway module's cluster defaults (`cluster`, off by default) are
/// the gateway's own.
#[test]
fn gateway_cluster_defaults_are_the_services() {
    let mut section = read_json(&modules_dir().join("defaults/gateway-cluster.json"));
    recursive_update(
        &mut section,
        serde_json::json!({"postgres_url": "host=/run/postgresql"}),
    );
    let from_module: kiln_gateway::GatewayCluster = serde_json::from_value(section).unwrap();
    let defaults: kiln_gateway::GatewayCluster =
        toml::from_str("postgres_url = \"host=/run/postgresql\"\n").unwrap();
    assert_eq!(from_module, defaults);
}

/// The scheduler module's defaults for `certificates` (off by default, so
/// in a file of their own) are the scheduler's own.
#[test]
fn scheduler_certificate_defaults_are_the_services() {
    let mut section = read_json(&modules_dir().join("defaults/scheduler-certificates.json"));
    recursive_update(
        &mut section,
        serde_json::json!({"ca_cert": "/etc/kiln/pki/ca.pem", "ca_key": "/etc/kiln/pki/ca-key.pem"}),
    );
    let from_module: kiln_scheduler::config::CertificateSettings =
        serde_json::from_value(section).unwrap();
    assert_eq!(
        from_module,
        kiln_scheduler::config::CertificateSettings::new(
            "/etc/kiln/pki/ca.pem".into(),
            "/etc/kiln/pki/ca-key.pem".into()
        )
    );
}
