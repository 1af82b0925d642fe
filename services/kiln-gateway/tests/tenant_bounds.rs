//! Per-account bounds through a real gateway (signed HTTPS, its SQLite
//! store and async queue, fake TLS scheduler and agent): each bound is
//! refused in FC's shape and changes nothing; a tenant with a full async
//! queue gets `ResourceThrottled` while another tenant's calls, sync and
//! async, keep succeeding; nothing already accepted is dropped; and VPC
//! owners are enforced on vpcConfig and VPC bindings.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{b64, zip_of, Answer, Api};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use kiln_core::{InstanceId, LeaseId, NodeId};
use kiln_internal_api::server::{self, full, Body};
use kiln_internal_api::Lease;
use serde_json::{json, Value};

const ACCOUNT_A: &str = "1000000000000011";
const ACCOUNT_B: &str = "1000000000000012";
const AK_A: &str = "AKBOUNDSA0000001";
const SK_A: &str = "secret-of-bounds-a-0001";
const AK_B: &str = "AKBOUNDSB0000001";
const SK_B: &str = "secret-of-bounds-b-0001";
/// A's async queue bound.
const A_DEPTH: usize = 5;

async fn serve<F, Fut>(tls: Arc<rustls::ServerConfig>, f: F) -> SocketAddr
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    common::serve_until(tls, std::future::pending(), f).await
}

fn function_doc(name: &str, files: &[(&str, &[u8])]) -> Vec<u8> {
    json!({
        "functionName": name,
        "runtime": "custom.debian12",
        "handler": "index.handler",
        "customRuntimeConfig": {"command": ["python3", "/code/app.py"], "port": 9000},
        "code": {"zipFile": b64(&zip_of(files))},
    })
    .to_string()
    .into_bytes()
}

fn app() -> Vec<(&'static str, &'static [u8])> {
    vec![("app.py", b"print('hi')\n")]
}

struct Cluster {
    _dir: tempfile::TempDir,
    a: Api,
    b: Api,
    /// Payloads the fake function finished, in order.
    done: Arc<Mutex<Vec<String>>>,
    /// Opens A's held calls.
    release: tokio::sync::watch::Sender<bool>,
    _gw: kiln_gateway::GatewayHandle,
}

/// A gateway whose fake agent holds every call with a payload starting
/// "hold-" until `release`, and answers the rest at once.
async fn cluster(extra: Value) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let pki = kiln_pki::DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let done: Arc<Mutex<Vec<String>>> = Arc::default();
    let (release, released) = tokio::sync::watch::channel(false);
    let d = done.clone();
    let agent = serve(
        kiln_pki::internal_server_config(&pki.files("agent")).unwrap(),
        move |req: Request<hyper::body::Incoming>| {
            let (d, mut released) = (d.clone(), released.clone());
            async move {
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let payload = String::from_utf8_lossy(&body).into_owned();
                if payload.starts_with("hold-") {
                    let _ = released.wait_for(|r| *r).await;
                }
                d.lock().unwrap().push(payload);
                Response::builder()
                    .status(200)
                    .header("x-kiln-invoke-outcome", "ok")
                    .body(full("ok"))
                    .unwrap()
            }
        },
    )
    .await;
    let agent_url = format!("https://127.0.0.1:{}", agent.port());
    let sched = serve(
        kiln_pki::internal_server_config(&pki.files("scheduler")).unwrap(),
        move |req: Request<hyper::body::Incoming>| {
            let agent_url = agent_url.clone();
            async move {
                let post = req.method() == Method::POST;
                let _ = req.into_body().collect().await;
                if !post {
                    return server::no_content();
                }
                server::json(
                    StatusCode::OK,
                    &Lease {
                        lease_id: LeaseId::generate(),
                        instance_id: InstanceId::generate(),
                        node_id: NodeId::generate(),
                        agent_url,
                        cold_start: false,
                        expires_in_ms: 600_000,
                    },
                )
            }
        },
    )
    .await;
    let public = pki.files("gateway");
    let internal = pki.files("gateway-internal");
    // Through serde, as an operator's file would be.
    let mut doc = json!({
        "state_dir": dir.path().join("gateway"),
        "region": "cn-test",
        "scheduler_url": format!("https://127.0.0.1:{}", sched.port()),
        "public": {"listen": "127.0.0.1:0", "cert": public.cert, "key": public.key},
        "internal": {"listen": "127.0.0.1:0"},
        "tls": {"ca": internal.ca, "cert": internal.cert, "key": internal.key},
        "lease_hold_ms": 0,
        "async_queue": {"max_in_flight": 16, "per_queue": 8},
        "bootstrap_keys": [
            {"account_id": ACCOUNT_A, "access_key_id": AK_A, "access_key_secret": SK_A},
            {"account_id": ACCOUNT_B, "access_key_id": AK_B, "access_key_secret": SK_B},
        ],
    });
    doc.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let config: kiln_gateway::GatewayConfig = serde_json::from_value(doc).unwrap();
    let gw = kiln_gateway::start(config).await.unwrap();
    let addr = gw.public_addr();
    Cluster {
        a: Api::new(&pki, addr, AK_A, SK_A, false),
        b: Api::new(&pki, addr, AK_B, SK_B, false),
        _dir: dir,
        done,
        release,
        _gw: gw,
    }
}

async fn invoke_async(api: &Api, f: &str, payload: &str) -> Answer {
    api.call_with(
        Method::POST,
        &format!("/2023-03-30/functions/{f}/invocations"),
        payload.as_bytes().to_vec(),
        &[("x-fc-invocation-type", "Async")],
    )
    .await
}

async fn create(api: &Api, name: &str) -> Answer {
    api.call(
        Method::POST,
        "/2023-03-30/functions",
        function_doc(name, &app()),
    )
    .await
}

async fn names(api: &Api) -> Vec<String> {
    let v = api
        .call(Method::GET, "/2023-03-30/functions?limit=100", vec![])
        .await
        .ok();
    v["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["functionName"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_with_a_full_async_queue_is_throttled_while_others_go_on() {
    let c = cluster(json!({"tenant_bounds": {"accounts": [
        {"account_id": ACCOUNT_A, "max_async_queue_depth": A_DEPTH},
    ]}}))
    .await;
    create(&c.a, "slow").await.ok();
    create(&c.b, "fast").await.ok();

    // A fills its queue: every accepted call is held by the function.
    for i in 0..A_DEPTH {
        let r = invoke_async(&c.a, "slow", &format!("hold-{i}")).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    }
    for i in 0..3 {
        let m = invoke_async(&c.a, "slow", &format!("over-{i}"))
            .await
            .fc_error(429, "ResourceThrottled");
        assert!(
            m.contains(ACCOUNT_A) && m.contains(&A_DEPTH.to_string()),
            "{m}"
        );
    }

    // B is untouched: async and sync calls succeed while A is throttled.
    for i in 0..20 {
        let r = invoke_async(&c.b, "fast", &format!("b-{i}")).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
        let r =
            c.b.call(
                Method::POST,
                "/2023-03-30/functions/fast/invocations",
                b"sync".to_vec(),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }
    // A's sync calls are not bounded by its async backlog either.
    let r =
        c.a.call(
            Method::POST,
            "/2023-03-30/functions/slow/invocations",
            b"a-sync".to_vec(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    // B's async calls all ran; A's are still held, and still refused.
    wait_for(&c.done, |v| {
        v.iter().filter(|p| p.starts_with("b-")).count() == 20
    })
    .await;
    invoke_async(&c.a, "slow", "over-again")
        .await
        .fc_error(429, "ResourceThrottled");

    // Released, A's accepted calls all run (none dropped, none of the
    // refused ones) and its queue takes calls again.
    c.release.send(true).unwrap();
    wait_for(&c.done, |v| {
        v.iter().filter(|p| p.starts_with("hold-")).count() == A_DEPTH
    })
    .await;
    let mut accepted = None;
    for _ in 0..100 {
        let r = invoke_async(&c.a, "slow", "after").await;
        if r.status == StatusCode::ACCEPTED {
            accepted = Some(r);
            break;
        }
        // Finished messages are counted once their completion commits.
        r.fc_error(429, "ResourceThrottled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(accepted.is_some(), "A's queue never took calls again");
    wait_for(&c.done, |v| v.iter().any(|p| p == "after")).await;
    let done = c.done.lock().unwrap().clone();
    for i in 0..A_DEPTH {
        assert_eq!(
            done.iter().filter(|p| **p == format!("hold-{i}")).count(),
            1,
            "{done:?}"
        );
    }
    assert!(!done.iter().any(|p| p.starts_with("over-")), "{done:?}");
}

async fn wait_for(done: &Mutex<Vec<String>>, f: impl Fn(&[String]) -> bool) {
    for _ in 0..400 {
        if f(&done.lock().unwrap()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("not reached: {:?}", done.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_stored_bound_is_refused_with_limit_exceeded_and_changes_nothing() {
    let one_zip = zip_of(&app()).len() as u64;
    let c = cluster(json!({"tenant_bounds": {
        "max_functions": 2,
        "max_layer_versions": 1,
        "accounts": [{"account_id": ACCOUNT_B, "max_code_bytes": one_zip * 3 / 2, "max_functions": 10}],
    }}))
    .await;

    // Functions (A, the default of 2).
    create(&c.a, "f1").await.ok();
    create(&c.a, "f2").await.ok();
    let m = create(&c.a, "f3").await.fc_error(400, "LimitExceeded");
    assert!(m.contains("max_functions"), "{m}");
    assert_eq!(names(&c.a).await, ["f1", "f2"]);
    // Deleting one frees its slot.
    c.a.call(Method::DELETE, "/2023-03-30/functions/f2", vec![])
        .await
        .ok();
    create(&c.a, "f3").await.ok();

    // Layer versions (A: 1).
    let layer = json!({"code": {"zipFile": b64(&zip_of(&[("lib/x", b"x")]))},
        "compatibleRuntime": ["custom.debian12"]})
    .to_string()
    .into_bytes();
    c.a.call(
        Method::POST,
        "/2023-03-30/layers/lib/versions",
        layer.clone(),
    )
    .await
    .ok();
    let m =
        c.a.call(
            Method::POST,
            "/2023-03-30/layers/lib/versions",
            layer.clone(),
        )
        .await
        .fc_error(400, "LimitExceeded");
    assert!(m.contains("max_layer_versions"), "{m}");
    let versions =
        c.a.call(Method::GET, "/2023-03-30/layers/lib/versions", vec![])
            .await
            .ok();
    assert_eq!(
        versions["layers"].as_array().unwrap().len(),
        1,
        "{versions}"
    );

    // Code bytes (B: one and a half packages): the second function is
    // refused, and so is an update that grows the first past the bound.
    create(&c.b, "g1").await.ok();
    let m = create(&c.b, "g2").await.fc_error(400, "LimitExceeded");
    assert!(m.contains("max_code_bytes"), "{m}");
    assert_eq!(names(&c.b).await, ["g1"]);
    let before =
        c.b.call(Method::GET, "/2023-03-30/functions/g1", vec![])
            .await
            .ok();
    let big: Vec<u8> = (0..one_zip * 2).map(|i| (i * 7919 % 251) as u8).collect();
    let grown = json!({"code": {"zipFile": b64(&zip_of(&[("app.py", &big)]))}})
        .to_string()
        .into_bytes();
    c.b.call(Method::PUT, "/2023-03-30/functions/g1", grown)
        .await
        .fc_error(400, "LimitExceeded");
    let after =
        c.b.call(Method::GET, "/2023-03-30/functions/g1", vec![])
            .await
            .ok();
    assert_eq!(before["codeChecksum"], after["codeChecksum"]);
    // A configuration change without new code is not a code change.
    c.b.call(
        Method::PUT,
        "/2023-03-30/functions/g1",
        json!({"description": "still fits"})
            .to_string()
            .into_bytes(),
    )
    .await
    .ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vpcs_take_functions_of_their_owners_only() {
    let c = cluster(json!({"vpcs": [
        {"id": "vpc-a", "owners": [ACCOUNT_A]},
        {"id": "vpc-shared", "owners": [ACCOUNT_A, ACCOUNT_B]},
    ]}))
    .await;
    let vpc_config =
        |vpc: &str| json!({"vpcId": vpc, "vSwitchIds": ["vsw-1"], "securityGroupId": "sg-1"});
    let with_vpc = |name: &str, vpc: &str| {
        let mut doc: Value = serde_json::from_slice(&function_doc(name, &app())).unwrap();
        doc["vpcConfig"] = vpc_config(vpc);
        doc.to_string().into_bytes()
    };
    // The owner creates; a stranger is refused for the VPC it does not
    // own and for one that does not exist, with the same answer.
    c.a.call(
        Method::POST,
        "/2023-03-30/functions",
        with_vpc("fa", "vpc-a"),
    )
    .await
    .ok();
    let m =
        c.b.call(
            Method::POST,
            "/2023-03-30/functions",
            with_vpc("fb", "vpc-a"),
        )
        .await
        .fc_error(403, "AccessDenied");
    assert!(m.contains("owners") && m.contains(ACCOUNT_B), "{m}");
    c.b.call(
        Method::POST,
        "/2023-03-30/functions",
        with_vpc("fb", "vpc-nope"),
    )
    .await
    .fc_error(403, "AccessDenied");
    assert!(names(&c.b).await.is_empty());
    c.b.call(
        Method::POST,
        "/2023-03-30/functions",
        with_vpc("fb", "vpc-shared"),
    )
    .await
    .ok();

    // Moving a function into a VPC it does not own is refused and
    // changes nothing.
    create(&c.b, "plain").await.ok();
    let before =
        c.b.call(Method::GET, "/2023-03-30/functions/plain", vec![])
            .await
            .ok();
    c.b.call(
        Method::PUT,
        "/2023-03-30/functions/plain",
        json!({"vpcConfig": vpc_config("vpc-a")})
            .to_string()
            .into_bytes(),
    )
    .await
    .fc_error(403, "AccessDenied");
    let after =
        c.b.call(Method::GET, "/2023-03-30/functions/plain", vec![])
            .await
            .ok();
    assert_eq!(before, after);

    // VPC bindings likewise.
    let bind = |vpc: &str| json!({ "vpcId": vpc }).to_string().into_bytes();
    let bindings = "/2023-03-30/functions/plain/vpc-bindings";
    c.b.call(Method::POST, bindings, bind("vpc-a"))
        .await
        .fc_error(403, "AccessDenied");
    c.b.call(Method::POST, bindings, bind("vpc-shared"))
        .await
        .ok();
    assert_eq!(
        c.b.call(Method::GET, bindings, vec![]).await.ok(),
        json!({"vpcIds": ["vpc-shared"]})
    );
}
