//! Two gateways sharing one PostgreSQL database (`[cluster]`), started in
//! this process with separate state directories and one secrets key: what
//! one writes, the other serves within a second (LISTEN/NOTIFY), code
//! packages included (each gateway's files are a cache of the database),
//! and whatever both could race on is decided by the database.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use kiln_gateway::config::BootstrapKey;
use kiln_gateway::{GatewayCluster, GatewayConfig, GatewayHandle};
use kiln_internal_api::keys::{paths, AccessKeyInfo};
use kiln_pki::DevPki;
use kiln_test_support::postgres::PgServer;
use serde_json::{json, Value};

/// What a change made through one gateway may take to show on another.
const WITHIN: Duration = Duration::from_secs(1);

struct Cluster {
    _dir: tempfile::TempDir,
    _pg: PgServer,
    pki: DevPki,
    a: GatewayHandle,
    b: GatewayHandle,
}

fn config(dir: &std::path::Path, name: &str, pki: &DevPki, url: &str) -> GatewayConfig {
    let mut c = GatewayConfig::loopback(dir.join(name), "cn-test", "https://127.0.0.1:1", pki);
    c.bootstrap_keys = vec![
        BootstrapKey::new(ACCOUNT_A.parse().unwrap(), AK_A, SK_A),
        BootstrapKey::new(ACCOUNT_B.parse().unwrap(), AK_B, SK_B),
    ];
    c.secrets = Some(kiln_gateway::config::SecretsConfig {
        key_file: dir.join("secrets.key"),
        previous_key_files: Vec::new(),
    });
    c.cluster = Some(GatewayCluster {
        postgres_url: url.to_owned(),
        postgres_password_file: None,
        max_connections: 4,
    });
    c
}

impl Cluster {
    async fn start() -> Option<Cluster> {
        let pg = PgServer::start()?;
        let url = pg.create_database("gateways");
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
        kiln_store::seal::generate_key_file(&dir.path().join("secrets.key")).unwrap();
        let a = kiln_gateway::start(config(dir.path(), "a", &pki, &url))
            .await
            .unwrap();
        let b = kiln_gateway::start(config(dir.path(), "b", &pki, &url))
            .await
            .unwrap();
        Some(Cluster {
            _dir: dir,
            _pg: pg,
            pki,
            a,
            b,
        })
    }

    fn api(&self, gw: &GatewayHandle, ak: &'static str, sk: &'static str) -> Api {
        Api::new(&self.pki, gw.public_addr(), ak, sk, false)
    }

    /// The operator API of `gw` (keys).
    async fn operator<T: serde::de::DeserializeOwned>(&self, gw: &GatewayHandle, path: &str) -> T {
        let client = kiln_internal_api::InternalClient::new(&self.pki.files("operator")).unwrap();
        client
            .post(
                &format!("https://127.0.0.1:{}", gw.internal_addr().port()),
                path,
                &(),
            )
            .await
            .unwrap()
    }
}

/// Poll `probe` until it answers `Some`, at most [`WITHIN`] (plus slack
/// for a loaded machine is NOT granted: the promise is one second); the
/// value and how long it took.
async fn within<T, F, Fut>(what: &str, mut probe: F) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = probe().await {
            let took = start.elapsed();
            println!("{what}: seen after {} ms", took.as_millis());
            return (v, took);
        }
        assert!(
            start.elapsed() < WITHIN,
            "{what}: not seen within {WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn function_doc(name: &str, zip: &[u8]) -> Value {
    json!({
        "functionName": name,
        "runtime": "custom.debian12",
        "handler": "index.handler",
        "customRuntimeConfig": {"command": ["python3", "/code/app.py"], "port": 9000},
        "environmentVariables": {"TOKEN": "cluster-secret"},
        "code": {"zipFile": b64(zip)},
    })
}

const FUNCTIONS: &str = "/2023-03-30/functions";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_written_through_one_gateway_is_served_by_the_other_within_a_second() {
    let Some(c) = Cluster::start().await else {
        return;
    };
    let (on_a, on_b) = (c.api(&c.a, AK_A, SK_A), c.api(&c.b, AK_A, SK_A));
    let zip = zip_of(&[("app.py", b"print('one')\n")]);
    let created = on_a
        .call(
            Method::POST,
            FUNCTIONS,
            function_doc("hello", &zip).to_string().into_bytes(),
        )
        .await
        .ok();
    let path = format!("{FUNCTIONS}/hello");
    let (got, _) = within("created on A, got on B", || async {
        let r = on_b.call(Method::GET, &path, Vec::new()).await;
        (r.status == StatusCode::OK).then(|| r.json())
    })
    .await;
    assert_eq!(got["functionId"], created["functionId"]);
    assert_eq!(got["environmentVariables"]["TOKEN"], "cluster-secret");
    let listed = on_b.call(Method::GET, FUNCTIONS, Vec::new()).await.ok();
    assert_eq!(listed["functions"][0]["functionName"], "hello");
    // The name is taken for B too: the database decides.
    on_b.call(
        Method::POST,
        FUNCTIONS,
        function_doc("hello", &zip).to_string().into_bytes(),
    )
    .await
    .fc_error(409, "FunctionAlreadyExists");

    // New code through A: B serves its checksum within a second ...
    let zip2 = zip_of(&[("app.py", b"print('two')\n")]);
    let updated = on_a
        .call(
            Method::PUT,
            &path,
            json!({"code": {"zipFile": b64(&zip2)}})
                .to_string()
                .into_bytes(),
        )
        .await
        .ok();
    assert_ne!(updated["codeChecksum"], created["codeChecksum"]);
    within("new code on A, its checksum on B", || async {
        let r = on_b.call(Method::GET, &path, Vec::new()).await;
        (r.status == StatusCode::OK && r.json()["codeChecksum"] == updated["codeChecksum"])
            .then_some(())
    })
    .await;
    // ... and the package itself, which B never received: its files are
    // filled from the database (and checked against the digest).
    let code = on_b
        .call(Method::GET, &format!("{path}/code"), Vec::new())
        .await
        .ok();
    let url: http::Uri = code["url"].as_str().unwrap().parse().unwrap();
    let download = on_b
        .send(
            http::Request::get(format!("{}{}", on_b.base, url.path()))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(download.status, StatusCode::OK);
    assert_eq!(&download.body[..], &zip2[..]);
    // A download URL one gateway hands out works on another (the load
    // balancer may send the download anywhere): one STS key.
    let code = on_a
        .call(Method::GET, &format!("{path}/code"), Vec::new())
        .await
        .ok();
    let url: http::Uri = code["url"].as_str().unwrap().parse().unwrap();
    let download = on_b
        .send(
            http::Request::get(format!("{}{}", on_b.base, url.path()))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(download.status, StatusCode::OK);
    assert_eq!(&download.body[..], &zip2[..]);

    // Deleted through B: gone on A.
    on_b.call(Method::DELETE, &path, Vec::new()).await.ok();
    within("deleted on B, gone on A", || async {
        let r = on_a.call(Method::GET, &path, Vec::new()).await;
        (r.status == StatusCode::NOT_FOUND).then_some(())
    })
    .await;
    c.a.shutdown().await;
    c.b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_disabled_through_one_gateway_is_refused_by_the_other_within_a_second() {
    let Some(c) = Cluster::start().await else {
        return;
    };
    let on_b = c.api(&c.b, AK_B, SK_B);
    on_b.call(Method::GET, FUNCTIONS, Vec::new()).await.ok();
    let info: AccessKeyInfo = c.operator(&c.a, &paths::disable(AK_B)).await;
    assert_eq!(info.access_key_id, AK_B);
    within("key disabled on A, refused on B", || async {
        let r = on_b.call(Method::GET, FUNCTIONS, Vec::new()).await;
        (r.status == StatusCode::FORBIDDEN || r.status == StatusCode::UNAUTHORIZED).then_some(())
    })
    .await;
    let _: AccessKeyInfo = c.operator(&c.a, &paths::enable(AK_B)).await;
    within("key enabled on A, accepted on B", || async {
        let r = on_b.call(Method::GET, FUNCTIONS, Vec::new()).await;
        (r.status == StatusCode::OK).then_some(())
    })
    .await;
    c.a.shutdown().await;
    c.b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_published_through_both_gateways_at_once_never_share_an_id() {
    let Some(c) = Cluster::start().await else {
        return;
    };
    let (on_a, on_b) = (c.api(&c.a, AK_A, SK_A), c.api(&c.b, AK_A, SK_A));
    let zip = zip_of(&[("app.py", b"print('v')\n")]);
    on_a.call(
        Method::POST,
        FUNCTIONS,
        function_doc("v", &zip).to_string().into_bytes(),
    )
    .await
    .ok();
    let path = format!("{FUNCTIONS}/v");
    within("created on A, got on B", || async {
        let r = on_b.call(Method::GET, &path, Vec::new()).await;
        (r.status == StatusCode::OK).then_some(())
    })
    .await;
    let versions = format!("{path}/versions");
    let mut ids = Vec::new();
    for round in 0..8 {
        // A change, then both publish at once: each publication gets its
        // own id, or B (whose view may lag) is told nothing changed.
        on_a.call(
            Method::PUT,
            &path,
            json!({"description": format!("round {round}")})
                .to_string()
                .into_bytes(),
        )
        .await
        .ok();
        let body = || json!({"description": "p"}).to_string().into_bytes();
        let (ra, rb) = tokio::join!(
            on_a.call(Method::POST, &versions, body()),
            on_b.call(Method::POST, &versions, body())
        );
        for r in [ra, rb] {
            match r.status {
                StatusCode::OK => ids.push(r.json()["versionId"].as_str().unwrap().to_owned()),
                _ => {
                    r.fc_error(400, "InvalidArgument");
                }
            }
        }
    }
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "an id handed out twice: {ids:?}");
    assert!(ids.len() >= 8, "{ids:?}");
    // Both gateways list exactly the published ids.
    for api in [&on_a, &on_b] {
        let listed = within("every version listed", || async {
            let r = api.call(Method::GET, &versions, Vec::new()).await.ok();
            let got: Vec<String> = r["versions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v["versionId"].as_str().unwrap().to_owned())
                .collect();
            (got.len() == ids.len()).then_some(got)
        })
        .await
        .0;
        let mut listed = listed;
        listed.sort();
        assert_eq!(listed, unique);
    }
    c.a.shutdown().await;
    c.b.shutdown().await;
}
