//! `kiln store copy`: a stopped one-box scheduler's or gateway's state
//! moves into an empty PostgreSQL database (a real server), once; what
//! cannot be copied is refused with the reason.

mod common;

use std::process::Command;
use std::sync::Arc;

use kiln_scheduler::placement::{default_account_limits, Change};
use kiln_scheduler::store::TrustStore;
use kiln_scheduler::{PgSchedulerStore, SchedulerStore, SqliteSchedulerStore};
use kiln_store::seal::{load_key_file, Sealer};
use kiln_test_support::postgres::PgServer;

fn kiln(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn a_one_box_scheduler_moves_into_postgres_once() {
    let Some(pg) = PgServer::start() else { return };
    let url = pg.create_database("kiln_copy");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("scheduler");
    std::fs::create_dir(&state).unwrap();
    let key_file = state.join("secrets.key");
    kiln_store::seal::generate_key_file(&key_file).unwrap();
    let sealer = || Arc::new(Sealer::new(&load_key_file(&key_file).unwrap(), &[]));
    {
        let one_box = SqliteSchedulerStore::open(&state.join("scheduler.db"), sealer()).unwrap();
        one_box
            .apply(&[Change::UpsertAccountLimits(
                "1234".parse().unwrap(),
                default_account_limits(),
            )])
            .unwrap();
        let node = "n-old".parse().unwrap();
        one_box.revoke_node(&node, 42).unwrap();
        one_box.add_bootstrap_token("cafe", &node, 1, 2).unwrap();
    }

    let missing = kiln(&["store", "copy", "--from", "/nonexistent", "--to", &url]);
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("/nonexistent/scheduler.db does not exist, nor /nonexistent/gateway.db"),
        "{err}"
    );

    let from = state.to_str().unwrap();
    let out = kiln(&["store", "copy", "--from", from, "--to", &url]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("0 nodes, 0 instances, 0 provisions, 1 account limits, 1 revoked nodes, 0 node certificate holders, 1 bootstrap tokens"),
        "{text}"
    );
    let cluster = PgSchedulerStore::open(&url, sealer()).unwrap();
    assert_eq!(cluster.load_account_limits().unwrap().len(), 1);
    assert_eq!(cluster.revoked_nodes().unwrap()[0].1, 42);
    assert_eq!(cluster.bootstrap_tokens().unwrap().len(), 1);

    let again = kiln(&["store", "copy", "--from", from, "--to", &url]);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already holds scheduler state"), "{err}");
    assert_eq!(
        cluster.bootstrap_tokens().unwrap().len(),
        1,
        "nothing merged"
    );
}

/// A one-box gateway's functions (with a sealed environment, a published
/// version and their code) move into PostgreSQL; a gateway of the cluster,
/// with another state directory and no code files of its own, serves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_box_gateway_moves_into_postgres_and_a_cluster_gateway_serves_it() {
    let Some(pg) = PgServer::start() else { return };
    let url = pg.create_database("kiln_gateway_copy");
    let dir = tempfile::tempdir().unwrap();
    let pki = kiln_pki::DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let key = (
        "1000000000000001",
        "AKCOPY0000000001",
        "secret-of-the-copy-test-01",
    );
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let zip = common::one_file_zip("app.py", b"print('copied')\n");
    let (gw, _, client) = common::cli_gateway(&one, &pki, "https://127.0.0.1:1", key).await;
    let created = client
        .create_function(&serde_json::json!({
            "functionName": "hello",
            "runtime": "custom.debian12",
            "handler": "index.handler",
            "customRuntimeConfig": {"command": ["python3", "/code/app.py"], "port": 9000},
            "environmentVariables": {"TOKEN": "copied-secret"},
            "code": {"zipFile": base64_of(&zip)},
        }))
        .await
        .unwrap();
    let published = client
        .request(
            http::Method::POST,
            "/2023-03-30/functions/hello/versions",
            &[],
            &[],
            bytes::Bytes::from_static(b"{}"),
        )
        .await
        .unwrap();
    assert_eq!(published.status, 200);
    gw.shutdown().await;

    let state = one.join("gateway");
    let from = state.to_str().unwrap();
    let out = kiln(&["store", "copy", "--from", from, "--to", &url]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("1 access keys, 1 functions, 1 versions, 0 aliases"),
        "{text}"
    );
    assert!(text.contains("1 code packages"), "{text}");

    let (gw, _, client) = common::cli_gateway_with(&two, &pki, "https://127.0.0.1:1", key, |c| {
        c.secrets = Some(kiln_store::seal::SecretsConfig {
            key_file: state.join("secrets.key"),
            previous_key_files: Vec::new(),
        });
        c.cluster = Some(kiln_gateway::GatewayCluster {
            postgres_url: url.clone(),
            postgres_password_file: None,
            max_connections: 4,
        });
    })
    .await;
    let got = client.get_function("hello").await.unwrap();
    assert_eq!(got["functionId"], created["functionId"]);
    assert_eq!(got["codeChecksum"], created["codeChecksum"]);
    assert_eq!(got["environmentVariables"]["TOKEN"], "copied-secret");
    let versions = client
        .request(
            http::Method::GET,
            "/2023-03-30/functions/hello/versions",
            &[],
            &[],
            bytes::Bytes::new(),
        )
        .await
        .unwrap();
    let versions: serde_json::Value = serde_json::from_slice(&versions.body).unwrap();
    assert_eq!(versions["versions"][0]["versionId"], "1", "{versions}");
    // The package came from the database: this gateway never had it.
    let code = client
        .request(
            http::Method::GET,
            "/2023-03-30/functions/hello/code",
            &[],
            &[],
            bytes::Bytes::new(),
        )
        .await
        .unwrap();
    let code: serde_json::Value = serde_json::from_slice(&code.body).unwrap();
    let link: http::Uri = code["url"].as_str().unwrap().parse().unwrap();
    let download = client
        .request(
            http::Method::GET,
            link.path(),
            &[],
            &[],
            bytes::Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(download.status, 200);
    assert_eq!(&download.body[..], &zip[..]);
    gw.shutdown().await;

    let again = kiln(&["store", "copy", "--from", from, "--to", &url]);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already holds gateway metadata"), "{err}");
}

fn base64_of(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Given a gateway's state directory, `kiln store copy` moves its async
/// queue (tasks, configs) into the cluster's shared queue, once.
#[test]
fn a_one_box_gateways_async_queue_moves_into_postgres_once() {
    use kiln_gateway::queue::{AsyncConfig, NewMessage, Queue};
    let Some(pg) = PgServer::start() else { return };
    let url = pg.create_database("kiln_queue_copy");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("gateway");
    std::fs::create_dir(&state).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let q = Queue::open(&state.join("queue.db")).unwrap();
        q.enqueue(NewMessage {
            account: "1234".parse().unwrap(),
            function: "f".parse().unwrap(),
            queue: "1234".into(),
            task_id: "job-1".into(),
            request_id: "r-1".into(),
            payload: b"{}".to_vec(),
            headers: vec![],
            now_ms: 1_000,
            depth_limit: None,
        })
        .await
        .unwrap();
        q.put_config(
            &"1234".parse().unwrap(),
            &"f".parse().unwrap(),
            "LATEST",
            &AsyncConfig::parse(br#"{"asyncTask":true}"#, "r", "1234").unwrap(),
        )
        .await
        .unwrap();
    });
    let from = state.to_str().unwrap();
    let out = kiln(&["store", "copy", "--from", from, "--to", &url]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("1 async messages (1 unfinished), 0 task events, 0 destination deliveries, 1 async invoke configs"),
        "{text}"
    );
    let again = kiln(&["store", "copy", "--from", from, "--to", &url]);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already holds async queue state"), "{err}");
}
