//! Two gateways sharing one PostgreSQL database (`[cluster]`), started in
//! this process with separate state directories and one secrets key: what
//! one writes, the other serves within a second (LISTEN/NOTIFY), code
//! packages included (each gateway's files are a cache of the database),
//! and whatever both could race on is decided by the database.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http::{Method, Request, Response, StatusCode};
use kiln_core::{InstanceId, LeaseId};
use kiln_gateway::config::BootstrapKey;
use kiln_gateway::{GatewayCluster, GatewayConfig, GatewayHandle};
use kiln_internal_api::keys::{paths, AccessKeyInfo};
use kiln_internal_api::server::{self, full, Body};
use kiln_internal_api::{AcquireLease, Lease};
use kiln_pki::DevPki;
use kiln_test_support::postgres::PgServer;
use serde_json::{json, Value};

/// What a change made through one gateway may take to show on another.
const WITHIN: Duration = Duration::from_secs(1);

struct Cluster {
    _dir: tempfile::TempDir,
    _pg: PgServer,
    _stop: tokio::sync::watch::Sender<bool>,
    pki: DevPki,
    a: GatewayHandle,
    b: GatewayHandle,
    /// The code digest of every lease the fake scheduler was asked for.
    acquired: Arc<Mutex<Vec<String>>>,
}

/// The fake scheduler: leases on the fake agent (recording the spec's
/// code digest); node n-dev holds every package.
async fn fake_scheduler(
    req: Request<hyper::body::Incoming>,
    acquired: Arc<Mutex<Vec<String>>>,
    agent_url: String,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let bytes = read_all(body).await;
    let path = parts.uri.path().to_owned();
    match (parts.method.clone(), path.as_str()) {
        (Method::POST, "/v1/leases") => {
            let msg: AcquireLease = serde_json::from_slice(&bytes).unwrap();
            acquired.lock().unwrap().push(msg.spec.code_digest.clone());
            let lease = Lease {
                lease_id: LeaseId::generate(),
                instance_id: InstanceId::generate(),
                node_id: "n-dev".parse().unwrap(),
                agent_url,
                cold_start: false,
                expires_in_ms: 600_000,
            };
            server::json(StatusCode::OK, &lease)
        }
        (Method::DELETE, p) if p.starts_with("/v1/leases/") => server::no_content(),
        (Method::GET, p) if p.starts_with("/v1/nodes/n-dev/code/") => server::no_content(),
        _ => server::not_found(&path, "sched"),
    }
}

/// The fake agent: every call succeeds with its payload.
async fn fake_agent(req: Request<hyper::body::Incoming>) -> Response<Body> {
    let bytes = read_all(req.into_body()).await;
    Response::builder()
        .status(200)
        .header("x-kiln-invoke-outcome", "ok")
        .header("x-fc-status", "200")
        .body(full(bytes.to_vec()))
        .unwrap()
}

fn config(
    dir: &std::path::Path,
    name: &str,
    pki: &DevPki,
    url: &str,
    scheduler_url: &str,
) -> GatewayConfig {
    let mut c = GatewayConfig::loopback(dir.join(name), "cn-test", scheduler_url, pki);
    c.lease_hold_ms = 0;
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
        Self::start_with(|_| {}).await
    }

    /// Two gateways whose configurations `tweak` changed alike.
    async fn start_with(tweak: impl Fn(&mut GatewayConfig)) -> Option<Cluster> {
        let pg = PgServer::start()?;
        let url = pg.create_database("gateways");
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
        kiln_store::seal::generate_key_file(&dir.path().join("secrets.key")).unwrap();
        let (stop, rx) = tokio::sync::watch::channel(false);
        let agent_tls = kiln_pki::internal_server_config(&pki.files("agent")).unwrap();
        let agent = serve_fake(agent_tls, rx.clone(), fake_agent).await;
        let agent_url = format!("https://127.0.0.1:{}", agent.port());
        let acquired: Arc<Mutex<Vec<String>>> = Arc::default();
        let sched_tls = kiln_pki::internal_server_config(&pki.files("scheduler")).unwrap();
        let seen = acquired.clone();
        let sched = serve_fake(sched_tls, rx, move |r| {
            fake_scheduler(r, seen.clone(), agent_url.clone())
        })
        .await;
        let sched_url = format!("https://127.0.0.1:{}", sched.port());
        let configured = |name| {
            let mut c = config(dir.path(), name, &pki, &url, &sched_url);
            tweak(&mut c);
            c
        };
        let a = kiln_gateway::start(configured("a")).await.unwrap();
        let b = kiln_gateway::start(configured("b")).await.unwrap();
        Some(Cluster {
            _dir: dir,
            _pg: pg,
            _stop: stop,
            pki,
            a,
            b,
            acquired,
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

/// Poll `probe` until it answers `Some`, failing past [`WITHIN`] (the
/// promise is one second, on a loaded machine too); the value and how
/// long it took (printed: the measured invalidation delay).
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

/// Create function `name` through A and wait until B serves it; its path.
async fn create_seen_by_both(on_a: &Api, on_b: &Api, name: &str, app: &[u8]) -> String {
    let zip = zip_of(&[("app.py", app)]);
    on_a.call(
        Method::POST,
        FUNCTIONS,
        function_doc(name, &zip).to_string().into_bytes(),
    )
    .await
    .ok();
    let path = format!("{FUNCTIONS}/{name}");
    within("created on A, got on B", || async {
        let r = on_b.call(Method::GET, &path, Vec::new()).await;
        (r.status == StatusCode::OK).then_some(())
    })
    .await;
    path
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
    // ... invokes it with the new code (the spec B asks a lease for names
    // the new package) ...
    let digest2 = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(&zip2))
    };
    let invocations = format!("{path}/invocations");
    within("new code on A, invoked with it through B", || async {
        let r = on_b
            .call(Method::POST, &invocations, b"ping".to_vec())
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        (c.acquired.lock().unwrap().last() == Some(&digest2)).then_some(())
    })
    .await;
    // ... and serves an agent the package, which B never received: its
    // files are filled from the database (and checked against the digest).
    let agent = kiln_internal_api::InternalClient::new(&c.pki.files("agent")).unwrap();
    let r = agent
        .send(
            Request::get(format!(
                "https://127.0.0.1:{}/v1/code/{digest2}",
                c.b.internal_addr().port()
            ))
            .body(server::empty())
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(&read_all(r.into_body()).await[..], &zip2[..]);
    // So does a caller's download URL.
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
    let path = create_seen_by_both(&on_a, &on_b, "v", b"print('v')\n").await;
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
    println!("version ids handed out through both gateways: {ids:?}");
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

/// Two updates of one function through two gateways at once, each of a
/// different field: neither is lost (the store refuses a write built on a
/// stale copy, and the gateway applies its change again to the fresh one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_through_both_gateways_are_both_kept() {
    let Some(c) = Cluster::start().await else {
        return;
    };
    let (on_a, on_b) = (c.api(&c.a, AK_A, SK_A), c.api(&c.b, AK_A, SK_A));
    let path = create_seen_by_both(&on_a, &on_b, "u", b"print('u')\n").await;
    for round in 0..10 {
        let description = format!("round {round}");
        let timeout = 10 + round;
        let (ra, rb) = tokio::join!(
            on_a.call(
                Method::PUT,
                &path,
                json!({"description": description}).to_string().into_bytes()
            ),
            on_b.call(
                Method::PUT,
                &path,
                json!({"timeout": timeout}).to_string().into_bytes()
            )
        );
        ra.ok();
        rb.ok();
        // Both changes are in the stored function, seen through either.
        for api in [&on_a, &on_b] {
            within("both updates kept", || async {
                let got = api.call(Method::GET, &path, Vec::new()).await.ok();
                (got["description"] == description.as_str() && got["timeout"] == timeout)
                    .then_some(())
            })
            .await;
        }
    }
    c.a.shutdown().await;
    c.b.shutdown().await;
}

/// An account's bounds hold across gateways. A create through each
/// gateway at once, both gateways counting the same functions (so alone
/// each would admit its own): with room for both, both are created; with
/// room for one, exactly one, the other refused with LimitExceeded; with
/// none, neither. The account never holds more than its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accounts_bounds_hold_when_both_gateways_create_at_once() {
    let Some(c) = Cluster::start_with(|g| g.tenant_bounds.max_functions = 4).await else {
        return;
    };
    let (on_a, on_b) = (c.api(&c.a, AK_A, SK_A), c.api(&c.b, AK_A, SK_A));
    create_seen_by_both(&on_a, &on_b, "f0", b"print('f0')\n").await;
    let zip = zip_of(&[("app.py", b"print('f')\n")]);
    let doc = |name: String| function_doc(&name, &zip).to_string().into_bytes();
    // (functions before the race, creates that may succeed)
    for (round, (before, room)) in [(1, 2), (3, 1), (4, 0)].into_iter().enumerate() {
        for api in [&on_a, &on_b] {
            within("both gateways count the same functions", || async {
                let got = api.call(Method::GET, FUNCTIONS, Vec::new()).await.ok();
                (got["functions"].as_array().map_or(0, |f| f.len()) == before).then_some(())
            })
            .await;
        }
        let (ra, rb) = tokio::join!(
            on_a.call(Method::POST, FUNCTIONS, doc(format!("a{round}"))),
            on_b.call(Method::POST, FUNCTIONS, doc(format!("b{round}")))
        );
        let created = [&ra, &rb].iter().filter(|r| r.status.is_success()).count();
        println!("{before} functions, room for {room}: {created} created");
        let said = |r: &Answer| format!("{} {}", r.status, String::from_utf8_lossy(&r.body));
        assert_eq!(created, room, "A: {}; B: {}", said(&ra), said(&rb));
        for refused in [&ra, &rb].into_iter().filter(|r| !r.status.is_success()) {
            let e: Value = serde_json::from_slice(&refused.body).unwrap();
            assert_eq!(e["Code"], "LimitExceeded", "{e}");
            assert!(
                e["Message"].as_str().unwrap().contains("max_functions"),
                "{e}"
            );
        }
    }
    c.a.shutdown().await;
    c.b.shutdown().await;
}
