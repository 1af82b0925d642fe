//! `kiln dev` and secrets at rest: it creates the gateway's sealing key
//! (0600, beside the gateway's state), a function's environment and the
//! dev key's secret never reach gateway.db in plaintext, and `kiln keys`
//! works against it with nothing but its state directory.

mod common;

use std::os::unix::fs::PermissionsExt;

use base64::Engine;
use serde_json::json;

use common::{example_zip, Dev};

const ENV_VALUE: &str = "dev-e2e-Sealed-Env-Value-7731";

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_seals_secrets_and_its_operator_manages_keys() {
    if common::skip() {
        return;
    }
    let dev = Dev::start();
    let state = dev.state.path();
    let key = state.join("secrets/gateway.key");
    let mode = std::fs::metadata(&key)
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", key.display(), dev.log_tail()))
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let zip = example_zip("hello-python");
    dev.client()
        .create_function(&json!({
            "functionName": "sealed",
            "runtime": "custom.debian12",
            "handler": "index.handler",
            "customRuntimeConfig": {"command": ["python3", "server.py"], "port": 9000},
            "environmentVariables": {"DB_PASSWORD": ENV_VALUE},
            "code": {"zipFile": base64::engine::general_purpose::STANDARD.encode(&zip)},
        }))
        .await
        .unwrap_or_else(|e| panic!("create failed: {e}\n{}", dev.log_tail()));
    let f = dev.client().get_function("sealed").await.unwrap();
    assert_eq!(f["environmentVariables"]["DB_PASSWORD"], ENV_VALUE);

    let mut raw = Vec::new();
    for name in ["gateway.db", "gateway.db-wal"] {
        if let Ok(b) = std::fs::read(state.join("gateway").join(name)) {
            raw.extend(b);
        }
    }
    assert!(contains(&raw, "sealed"), "the search finds stored names");
    assert!(
        !contains(&raw, ENV_VALUE),
        "an environment value is in gateway.db"
    );
    assert!(
        !contains(&raw, &dev.creds.access_key_secret),
        "the dev key's secret is in gateway.db"
    );

    let state_arg = state.to_str().unwrap();
    let o = dev.cli(&["keys", "--state-dir", state_arg, "list"]);
    let listed = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{o:?}");
    assert!(listed.contains(&dev.creds.access_key_id), "{listed}");
    assert!(!listed.contains(&dev.creds.access_key_secret), "{listed}");
}
