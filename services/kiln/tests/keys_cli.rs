//! `kiln keys create|list|disable|enable|delete` against a real gateway
//! (in this process, with a real scheduler, no node): a created key signs
//! calls, a disabled or deleted one is refused at once with FC's
//! `InvalidAccessKeyId`, `list` never shows a secret, the secret is not in
//! the gateway's database file, and bad input gets FC-shaped errors.

mod common;

use std::path::Path;
use std::process::Output;

use kiln::client::{ClientError, FcClient};
use kiln::credentials::Credentials;
use kiln_core::FcErrorCode;
use kiln_internal_api::keys::paths;
use kiln_internal_api::InternalClient;
use kiln_pki::DevPki;
use serde_json::{json, Value};

const ACCOUNT: &str = "1000000000000015";
const AK: &str = "AKKEYS0000000015";
const SK: &str = "secret-of-the-keys-test-015";
const NEW_ACCOUNT: &str = "1000000000000016";

fn kiln(state: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("keys")
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .unwrap()
}

async fn run(state: &Path, args: &[&str]) -> Output {
    let state = state.to_owned();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        kiln(&state, &refs)
    })
    .await
    .unwrap()
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "{o:?}");
    out(&o)
}

/// The value after `label` on the line that starts with it.
fn field<'a>(text: &'a str, label: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(label))
        .unwrap_or_else(|| panic!("no {label:?} in {text}"))
        .split_whitespace()
        .next()
        .unwrap()
}

async fn refused(client: &FcClient) -> (u16, String) {
    match client.list_functions(None).await {
        Err(ClientError::Api { status, code, .. }) => (status, code),
        other => panic!("the call was not refused: {other:?}"),
    }
}

fn raw_db(dir: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for f in ["gateway.db", "gateway.db-wal"] {
        if let Ok(b) = std::fs::read(dir.join("gateway").join(f)) {
            all.extend(b);
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_created_used_disabled_enabled_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let pki = DevPki::ensure(&state.join("pki"), &[]).unwrap();
    let sched = common::loopback_scheduler(state, &pki).await;
    let (gw, _creds, bootstrap) = common::cli_gateway(
        state,
        &pki,
        &format!("https://127.0.0.1:{}", sched.addr().port()),
        (ACCOUNT, AK, SK),
    )
    .await;
    let internal_url = format!("https://127.0.0.1:{}", gw.internal_addr().port());
    std::fs::write(
        state.join("cluster.json"),
        json!({ "gatewayInternalUrl": internal_url }).to_string(),
    )
    .unwrap();

    // Create: the secret is printed once.
    let created = ok(run(state, &["create", "--account", NEW_ACCOUNT]).await);
    let id = field(&created, "access key ").to_owned();
    let secret = field(&created, "secret: ").to_owned();
    assert!(id.starts_with("LTAI") && secret.len() == 30, "{created}");
    assert!(created.contains(NEW_ACCOUNT), "{created}");

    // It signs calls for its account.
    let client = FcClient::new(Credentials {
        endpoint: format!("https://localhost:{}", gw.addr().port()),
        account_id: NEW_ACCOUNT.into(),
        access_key_id: id.clone(),
        access_key_secret: secret.clone(),
        ca_cert: pki.ca_cert(),
        security_token: None,
    })
    .unwrap();
    assert_eq!(
        client.list_functions(None).await.unwrap(),
        Vec::<Value>::new()
    );

    // List: both keys, enabled, and never a secret.
    let table = ok(run(state, &["list"]).await);
    assert!(table.contains(&id) && table.contains(AK), "{table}");
    assert!(!table.contains(&secret) && !table.contains(SK), "{table}");
    let listed: Value = serde_json::from_str(&ok(run(
        state,
        &["list", "--json", "--account", NEW_ACCOUNT],
    )
    .await))
    .unwrap();
    assert_eq!(
        listed,
        json!([{
            "access_key_id": id,
            "account_id": NEW_ACCOUNT,
            "status": "enabled",
            "created_ms": listed[0]["created_ms"],
        }])
    );
    assert!(!listed.to_string().contains(&secret));

    // Neither secret is in the gateway's database file.
    let bytes = raw_db(state);
    assert!(!bytes.is_empty());
    for s in [&secret, SK] {
        assert!(
            !bytes.windows(s.len()).any(|w| w == s.as_bytes()),
            "a secret is in gateway.db"
        );
    }

    // Disable: refused on the next call, as FC refuses an unknown key.
    assert!(ok(run(state, &["disable", &id]).await).contains("disabled"));
    assert_eq!(
        refused(&client).await,
        (403, "InvalidAccessKeyId".to_owned())
    );
    assert!(ok(run(state, &["list"]).await).contains("disabled"));
    // The other account's key is untouched.
    bootstrap.list_functions(None).await.unwrap();

    // Enable: accepted again.
    assert!(ok(run(state, &["enable", &id]).await).contains("enabled"));
    client.list_functions(None).await.unwrap();

    // Delete: refused, and gone from the list.
    assert!(ok(run(state, &["delete", &id]).await).contains("deleted"));
    assert_eq!(
        refused(&client).await,
        (403, "InvalidAccessKeyId".to_owned())
    );
    assert!(!ok(run(state, &["list"]).await).contains(&id));

    // Unknown and malformed ids.
    for args in [
        ["disable", id.as_str()],
        ["enable", "LTAInosuchkey"],
        ["delete", id.as_str()],
    ] {
        let o = run(state, &args).await;
        assert!(!o.status.success(), "{o:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("EntityNotExist.AccessKey") && err.contains("does not exist"),
            "{err}"
        );
    }
    let o = run(state, &["delete", "a/b"]).await;
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not an access key id"),
        "{o:?}"
    );
    let o = run(state, &["create", "--account", "not an account"]).await;
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not an account id"),
        "{o:?}"
    );

    // Access keys are the operator's: the gateway's own certificate is
    // refused.
    let gateway = InternalClient::new(&pki.files("gateway-internal")).unwrap();
    let e = gateway
        .get::<Value>(&internal_url, paths::ACCESS_KEYS)
        .await
        .unwrap_err()
        .to_fc();
    assert_eq!(e.code, FcErrorCode::AccessDenied, "{e}");

    // The API itself answers malformed bodies and unknown keys in FC's shape.
    let api = InternalClient::new(&pki.files("operator")).unwrap();
    for body in [
        json!({ "account": NEW_ACCOUNT }),
        json!({ "account_id": "not an account" }),
        json!([]),
    ] {
        let e = api
            .post::<_, Value>(&internal_url, paths::ACCESS_KEYS, &body)
            .await
            .unwrap_err()
            .to_fc();
        assert_eq!(e.code, FcErrorCode::InvalidArgument, "{body}: {e}");
    }
    let e = api
        .delete(&internal_url, &paths::access_key("LTAInosuchkey"))
        .await
        .unwrap_err()
        .to_fc();
    assert_eq!(e.code, FcErrorCode::EntityNotExistAccessKey);
    let e = api
        .post::<_, Value>(&internal_url, &paths::disable("LTAInosuchkey"), &())
        .await
        .unwrap_err()
        .to_fc();
    assert_eq!(e.code, FcErrorCode::EntityNotExistAccessKey);

    gw.shutdown().await;
    sched.shutdown().await;
}

#[tokio::test]
async fn a_gateway_refuses_a_key_file_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let key = dir.path().join("gateway.key");
    std::fs::write(&key, [5u8; 32]).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = kiln_gateway::GatewayConfig {
        secrets: Some(kiln_gateway::config::SecretsConfig {
            key_file: key.clone(),
            previous_key_files: Vec::new(),
        }),
        ..kiln_gateway::GatewayConfig::loopback(
            dir.path().join("gateway"),
            "cn-test",
            "https://127.0.0.1:1",
            &pki,
        )
    };
    let err = match kiln_gateway::start(config.clone()).await {
        Ok(_) => panic!("a gateway started with a world-readable key file"),
        Err(e) => e,
    };
    let msg = format!("{:#}", anyhow::Error::from(err));
    assert!(
        msg.contains(&format!("chmod 600 {}", key.display())),
        "{msg}"
    );
    assert!(
        !dir.path().join("gateway/gateway.db").exists(),
        "nothing was stored before the key was checked"
    );

    // Fixed as the error says, it starts.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    kiln_gateway::start(config).await.unwrap().shutdown().await;
}
