//! Triggers on the real gateway (loopback, DevPki, fake scheduler and
//! agent under real mTLS): the Triggers API in FC's shapes, bad input
//! refused in FC's shape with nothing changed, persistence across a
//! restart, and HTTP trigger requests routed by Host to the function with
//! their method, path, query, headers and body, under both auth types.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use kiln_core::{InstanceId, LeaseId, NodeId};
use kiln_gateway::config::BootstrapKey;
use kiln_gateway::{GatewayConfig, GatewayHandle};
use kiln_internal_api::server::{self, full, Body};
use kiln_internal_api::Lease;
use kiln_pki::DevPki;
use serde_json::{json, Value};

/// What the fake agent was sent: headers and body per call.
type Seen = Arc<Mutex<Vec<(HeaderMap, Bytes)>>>;

struct Env {
    _dir: tempfile::TempDir,
    state_dir: std::path::PathBuf,
    pki: DevPki,
    gateway: Option<GatewayHandle>,
    seen: Seen,
    scheduler_url: String,
    /// The gateway's clock, when the test drives it.
    clock: Option<Arc<kiln_core::ManualClock>>,
    _stop: tokio::sync::watch::Sender<bool>,
}

async fn fake_scheduler(req: Request<hyper::body::Incoming>, agent_url: String) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let _ = read_all(body).await;
    match (parts.method.clone(), parts.uri.path()) {
        (Method::POST, "/v1/leases") => server::json(
            StatusCode::OK,
            &Lease {
                lease_id: LeaseId::generate(),
                instance_id: InstanceId::generate(),
                node_id: NodeId::generate(),
                agent_url,
                cold_start: false,
                expires_in_ms: 600_000,
            },
        ),
        (Method::DELETE, p) if p.starts_with("/v1/leases/") => server::no_content(),
        (Method::POST, "/v1/functions/retire") => server::no_content(),
        (_, p) => server::not_found(p, "sched"),
    }
}

/// Answers as a web function: 201 (500 under `/fail`) with its own
/// header, echoing the request line the gateway asked for and the body.
async fn fake_agent(req: Request<hyper::body::Incoming>, seen: Seen) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let bytes = read_all(body).await;
    seen.lock()
        .unwrap()
        .push((parts.headers.clone(), bytes.clone()));
    let h = |k: &str| parts.headers.get(k).map(|v| v.to_str().unwrap().to_owned());
    let path = h("x-kiln-http-path").unwrap_or_default();
    let (status, outcome) = if path.starts_with("/fail") {
        (500, "function-error")
    } else {
        (201, "ok")
    };
    let echo = json!({
        "method": h("x-kiln-http-method"),
        "path": path,
        "authorization": h("authorization"),
        "body": String::from_utf8_lossy(&bytes),
    });
    Response::builder()
        .status(status)
        .header("x-kiln-invoke-outcome", outcome)
        .header("x-echo", "yes")
        .header("content-type", "application/json")
        .body(full(echo.to_string()))
        .unwrap()
}

fn config(state_dir: &std::path::Path, pki: &DevPki, scheduler_url: &str) -> GatewayConfig {
    GatewayConfig {
        bootstrap_keys: vec![
            BootstrapKey::new(ACCOUNT_A.parse().unwrap(), AK_A, SK_A),
            BootstrapKey::new(ACCOUNT_B.parse().unwrap(), AK_B, SK_B),
        ],
        ..GatewayConfig::loopback(state_dir.to_owned(), "cn-test", scheduler_url, pki)
    }
}

/// Start the gateway on `clock`, or the system's.
async fn start_gateway(
    config: GatewayConfig,
    clock: &Option<Arc<kiln_core::ManualClock>>,
) -> GatewayHandle {
    match clock {
        Some(c) => kiln_gateway::start_with_clock(config, c.clone()).await,
        None => kiln_gateway::start(config).await,
    }
    .unwrap()
}

impl Env {
    async fn new() -> Env {
        Self::with_clock(None).await
    }

    async fn with_clock(clock: Option<Arc<kiln_core::ManualClock>>) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
        let seen: Seen = Arc::default();
        let (tx, rx) = tokio::sync::watch::channel(false);
        let agent_tls = kiln_pki::internal_server_config(&pki.files("agent")).unwrap();
        let s = seen.clone();
        let agent = serve_fake(agent_tls, rx.clone(), move |r| fake_agent(r, s.clone())).await;
        let agent_url = format!("https://127.0.0.1:{}", agent.port());
        let sched_tls = kiln_pki::internal_server_config(&pki.files("scheduler")).unwrap();
        let sched = serve_fake(sched_tls, rx, move |r| fake_scheduler(r, agent_url.clone())).await;
        let scheduler_url = format!("https://127.0.0.1:{}", sched.port());
        let state_dir = dir.path().join("gateway");
        let gateway = start_gateway(config(&state_dir, &pki, &scheduler_url), &clock).await;
        Env {
            clock,
            _dir: dir,
            state_dir,
            pki,
            gateway: Some(gateway),
            seen,
            scheduler_url,
            _stop: tx,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.gateway.as_ref().unwrap().public_addr()
    }

    fn client(&self, ak: &'static str, sk: &'static str) -> Api {
        Api::new(&self.pki, self.addr(), ak, sk, false)
    }

    async fn restart(&mut self) {
        self.gateway.take().unwrap().shutdown().await;
        let g = start_gateway(
            config(&self.state_dir, &self.pki, &self.scheduler_url),
            &self.clock,
        )
        .await;
        self.gateway = Some(g);
    }
}

fn function_doc(name: &str) -> Value {
    json!({
        "functionName": name,
        "runtime": "custom.debian12",
        "handler": "index.handler",
        "memorySize": 128,
        "timeout": 10,
        "customRuntimeConfig": {"command": ["python3", "/code/app.py"], "port": 9000},
        "code": {"zipFile": b64(&zip_of(&[("app.py", b"print('hi')\n")]))},
    })
}

fn http_config(methods: &[&str], auth: &str) -> String {
    json!({"methods": methods, "authType": auth}).to_string()
}

const F: &str = "/2023-03-30/functions";

impl Api {
    async fn post_json(&self, path: &str, doc: &Value) -> Answer {
        self.call(Method::POST, path, doc.to_string().into_bytes())
            .await
    }

    async fn create_trigger(&self, function: &str, doc: &Value) -> Answer {
        self.post_json(&format!("{F}/{function}/triggers"), doc)
            .await
    }

    async fn triggers(&self, function: &str, query: &str) -> Value {
        self.call(
            Method::GET,
            &format!("{F}/{function}/triggers{query}"),
            vec![],
        )
        .await
        .ok()
    }

    /// A request to the trigger host `host`, by the gateway's address
    /// (the test resolves no names), signed by this caller when `sign`.
    async fn to_trigger(
        &self,
        host: &str,
        method: Method,
        path: &str,
        body: &[u8],
        headers: &[(&str, &str)],
        sign: bool,
    ) -> Answer {
        let mut all: Vec<(&str, &str)> = vec![("host", host)];
        all.extend_from_slice(headers);
        let req = if sign {
            self.signed(method, path, body.to_vec(), &all, now_ms())
        } else {
            let mut b = Request::builder()
                .method(method)
                .uri(format!("{}{path}", self.base));
            for (k, v) in &all {
                b = b.header(*k, *v);
            }
            b.body(http_body_util::Full::new(Bytes::copy_from_slice(body)))
                .unwrap()
        };
        self.send(req).await
    }
}

/// `https://LABEL.fcapp.localhost:PORT` -> `LABEL.fcapp.localhost:PORT`.
fn host_of(url: &str) -> String {
    url.strip_prefix("https://").unwrap().to_owned()
}

#[tokio::test]
async fn triggers_api_has_fcs_shapes_and_refuses_bad_input() {
    let mut env = Env::new().await;
    let a = env.client(AK_A, SK_A);
    let b = env.client(AK_B, SK_B);
    a.post_json(F, &function_doc("web")).await.ok();

    let t = a
        .create_trigger(
            "web",
            &json!({
                "triggerName": "http-1",
                "triggerType": "http",
                "triggerConfig": http_config(&["GET", "post"], "anonymous"),
                "description": "the site",
            }),
        )
        .await
        .ok();
    assert_eq!(t["triggerName"], "http-1");
    assert_eq!(t["triggerType"], "http");
    assert_eq!(t["qualifier"], "LATEST");
    assert_eq!(t["status"], "OK");
    assert_eq!(t["description"], "the site");
    assert_eq!(
        t["targetArn"],
        format!("acs:fc:cn-test:{ACCOUNT_A}:functions/web")
    );
    // FC's triggerConfig is a JSON string; it comes back as given.
    assert_eq!(
        t["triggerConfig"],
        http_config(&["GET", "post"], "anonymous")
    );
    assert!(!t["triggerId"].as_str().unwrap().is_empty());
    assert!(t["createdTime"].as_str().unwrap().ends_with('Z'));
    let url = t["httpTrigger"]["urlInternet"].as_str().unwrap().to_owned();
    let port = env.addr().port();
    assert!(
        url.starts_with("https://web-") && url.ends_with(&format!(".fcapp.localhost:{port}")),
        "{url}"
    );
    assert_eq!(t["httpTrigger"]["urlIntranet"], "");

    let timer = a
        .create_trigger(
            "web",
            &json!({
                "triggerName": "tick",
                "triggerType": "timer",
                "triggerConfig": json!({"cronExpression": "CRON_TZ=Asia/Shanghai 0 0 8 * * *", "payload": "{}", "enable": true}).to_string(),
            }),
        )
        .await
        .ok();
    assert!(timer.get("httpTrigger").is_none(), "{timer}");

    // Bad input: FC's error shape, nothing stored.
    let bad = |name: &str, ty: &str, config: Value| json!({"triggerName": name, "triggerType": ty, "triggerConfig": config});
    let cases = [
        (bad("x", "http", json!("{not json")), 400, "InvalidArgument"),
        (
            bad("x", "http", json!({"methods": ["GET"]})),
            400,
            "InvalidArgument",
        ),
        (bad("x", "http", json!("{}")), 400, "InvalidArgument"),
        (
            bad("x", "http", json!(http_config(&["BREW"], "anonymous"))),
            400,
            "InvalidArgument",
        ),
        (
            bad("x", "http", json!(http_config(&["GET"], "jwt"))),
            400,
            "InvalidArgument",
        ),
        (
            bad("x", "timer", json!(r#"{"cronExpression":"61 * * * * *"}"#)),
            400,
            "InvalidArgument",
        ),
        (
            bad("x", "oss", json!(r#"{"events":["oss:ObjectCreated:*"]}"#)),
            400,
            "InvalidArgument",
        ),
        (
            bad("x", "carrier-pigeon", json!("{}")),
            400,
            "InvalidArgument",
        ),
        (
            bad("1x", "http", json!(http_config(&["GET"], "anonymous"))),
            400,
            "InvalidArgument",
        ),
        (
            bad("http-1", "http", json!(http_config(&["GET"], "anonymous"))),
            409,
            "TriggerAlreadyExists",
        ),
        (
            json!({"triggerName": "x", "triggerType": "http", "qualifier": "prod",
                   "triggerConfig": http_config(&["GET"], "anonymous")}),
            404,
            "AliasNotFound",
        ),
        (
            json!({"triggerName": "x", "triggerType": "http", "triggerConfig": "{}", "extra": 1}),
            400,
            "InvalidArgument",
        ),
        // One HTTP trigger per version or alias.
        (
            bad("http-2", "http", json!(http_config(&["GET"], "anonymous"))),
            400,
            "InvalidArgument",
        ),
    ];
    for (doc, status, code) in &cases {
        let msg = a.create_trigger("web", doc).await.fc_error(*status, code);
        assert!(!msg.is_empty(), "{doc}");
    }
    let oss = a
        .create_trigger(
            "web",
            &bad("x", "oss", json!(r#"{"events":["oss:ObjectCreated:*"]}"#)),
        )
        .await
        .fc_error(400, "InvalidArgument");
    assert!(oss.contains("not supported"), "{oss}");
    a.create_trigger(
        "nope",
        &bad("x", "http", json!(http_config(&["GET"], "anonymous"))),
    )
    .await
    .fc_error(404, "FunctionNotFound");
    // Another account's function is as absent as a missing one.
    b.create_trigger(
        "web",
        &bad("x", "http", json!(http_config(&["GET"], "anonymous"))),
    )
    .await
    .fc_error(404, "FunctionNotFound");
    b.call(Method::GET, &format!("{F}/web/triggers/http-1"), vec![])
        .await
        .fc_error(404, "FunctionNotFound");
    let names = |v: &Value| -> Vec<String> {
        v["triggers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["triggerName"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(&a.triggers("web", "").await), ["http-1", "tick"]);

    // Get, list with prefix, limit and nextToken.
    let got = a
        .call(Method::GET, &format!("{F}/web/triggers/http-1"), vec![])
        .await
        .ok();
    assert_eq!(got, t);
    a.call(Method::GET, &format!("{F}/web/triggers/none"), vec![])
        .await
        .fc_error(404, "TriggerNotFound");
    assert_eq!(names(&a.triggers("web", "?prefix=ti").await), ["tick"]);
    let page = a.triggers("web", "?limit=1").await;
    assert_eq!(names(&page), ["http-1"]);
    let token = page["nextToken"].as_str().unwrap();
    let rest = a
        .triggers("web", &format!("?limit=1&nextToken={token}"))
        .await;
    assert_eq!(names(&rest), ["tick"]);
    assert!(rest.get("nextToken").is_none(), "{rest}");

    // Update: a new config of the same type; a bad one changes nothing.
    let path = format!("{F}/web/triggers/http-1");
    a.call(
        Method::PUT,
        &path,
        json!({"triggerConfig": "{oops"}).to_string().into_bytes(),
    )
    .await
    .fc_error(400, "InvalidArgument");
    a.call(
        Method::PUT,
        &path,
        json!({"triggerConfig": r#"{"cronExpression":"@every 1m"}"#})
            .to_string()
            .into_bytes(),
    )
    .await
    .fc_error(400, "InvalidArgument");
    assert_eq!(
        a.call(Method::GET, &path, vec![]).await.ok(),
        t,
        "refused updates change nothing"
    );
    let u = a
        .call(
            Method::PUT,
            &path,
            json!({"triggerConfig": http_config(&["PUT"], "function"), "description": "v2"})
                .to_string()
                .into_bytes(),
        )
        .await
        .ok();
    assert_eq!(u["triggerConfig"], http_config(&["PUT"], "function"));
    assert_eq!(u["description"], "v2");
    assert_eq!(
        u["httpTrigger"]["urlInternet"],
        url.as_str(),
        "the URL stays"
    );
    assert_eq!(u["triggerId"], t["triggerId"]);

    // FC's rule: a function with triggers is not deleted.
    a.call(Method::DELETE, &format!("{F}/web"), vec![])
        .await
        .fc_error(400, "InvalidArgument");

    // Triggers survive a restart, URL and all.
    env.restart().await;
    let a = env.client(AK_A, SK_A);
    let after = a.call(Method::GET, &path, vec![]).await.ok();
    assert_eq!(
        after["httpTrigger"]["urlInternet"]
            .as_str()
            .unwrap()
            .split(':')
            .next(),
        url.split(':').next()
    );
    assert_eq!(after["triggerId"], t["triggerId"]);
    assert_eq!(after["triggerConfig"], u["triggerConfig"]);

    for name in ["http-1", "tick"] {
        let r = a
            .call(Method::DELETE, &format!("{F}/web/triggers/{name}"), vec![])
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
    }
    a.call(Method::DELETE, &path, vec![])
        .await
        .fc_error(404, "TriggerNotFound");
    assert!(names(&a.triggers("web", "").await).is_empty());
    let r = a.call(Method::DELETE, &format!("{F}/web"), vec![]).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn http_triggers_route_by_host_and_check_method_and_signature() {
    let env = Env::new().await;
    let a = env.client(AK_A, SK_A);
    let b = env.client(AK_B, SK_B);
    a.post_json(F, &function_doc("web")).await.ok();
    let open = a
        .create_trigger(
            "web",
            &json!({"triggerName": "open", "triggerType": "http",
                    "triggerConfig": http_config(&["GET", "POST"], "anonymous")}),
        )
        .await
        .ok();
    let open_host = host_of(open["httpTrigger"]["urlInternet"].as_str().unwrap());

    // Anonymous: any path, the query, the caller's headers (its own
    // Authorization included) and body reach the function; its status and
    // headers come back.
    let r = a
        .to_trigger(
            &open_host,
            Method::POST,
            "/some/path?q=1&r=a%20b",
            b"hello body",
            &[("authorization", "Bearer app-token"), ("x-custom", "7")],
            false,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.headers["x-echo"], "yes");
    assert!(r.headers.contains_key("x-fc-request-id"));
    let v = r.json();
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], "/some/path?q=1&r=a%20b");
    assert_eq!(v["authorization"], "Bearer app-token");
    assert_eq!(v["body"], "hello body");
    let (headers, _) = env.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(headers["x-custom"], "7");
    // Even an API path under a trigger's host is the function's.
    let r = a
        .to_trigger(
            &open_host,
            Method::GET,
            "/2023-03-30/functions",
            b"",
            &[],
            false,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.json()["path"], "/2023-03-30/functions");
    // The function's own error status passes through.
    let r = a
        .to_trigger(&open_host, Method::GET, "/fail", b"", &[], false)
        .await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!r.headers.contains_key("x-fc-error-type"));

    let calls = env.seen.lock().unwrap().len();
    // A method the trigger does not take, and a host naming no trigger.
    a.to_trigger(&open_host, Method::PUT, "/x", b"", &[], false)
        .await
        .fc_error(405, "MethodNotAllowed");
    let port = env.addr().port();
    a.to_trigger(
        &format!("nobody-0000000000.fcapp.localhost:{port}"),
        Method::GET,
        "/",
        b"",
        &[],
        false,
    )
    .await
    .fc_error(404, "TriggerNotFound");

    // authType function: unsigned, wrongly signed and other-account
    // requests are refused with 403; a signed one passes without its
    // Authorization reaching the function.
    let signed = a
        .create_trigger(
            "web",
            &json!({"triggerName": "signed", "triggerType": "http", "qualifier": "LATEST",
                    "triggerConfig": http_config(&["POST"], "function")}),
        )
        .await;
    // One HTTP trigger per qualifier: this one needs another qualifier.
    signed.fc_error(400, "InvalidArgument");
    a.call(Method::DELETE, &format!("{F}/web/triggers/open"), vec![])
        .await;
    let signed = a
        .create_trigger(
            "web",
            &json!({"triggerName": "signed", "triggerType": "http",
                    "triggerConfig": http_config(&["POST"], "function")}),
        )
        .await
        .ok();
    let host = host_of(signed["httpTrigger"]["urlInternet"].as_str().unwrap());
    a.to_trigger(&open_host, Method::GET, "/", b"", &[], false)
        .await
        .fc_error(404, "TriggerNotFound");
    a.to_trigger(&host, Method::POST, "/p", b"x", &[], false)
        .await
        .fc_error(403, "AccessDenied");
    let wrong = Api::new(&env.pki, env.addr(), AK_A, "not-the-secret", false);
    wrong
        .to_trigger(&host, Method::POST, "/p", b"x", &[], true)
        .await
        .fc_error(403, "SignatureNotMatch");
    b.to_trigger(&host, Method::POST, "/p", b"x", &[], true)
        .await
        .fc_error(403, "AccessDenied");
    assert_eq!(
        env.seen.lock().unwrap().len(),
        calls,
        "refused calls reach no function"
    );
    let r = a
        .to_trigger(&host, Method::POST, "/p?x=1", b"signed body", &[], true)
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let v = r.json();
    assert_eq!(v["path"], "/p?x=1");
    assert_eq!(v["body"], "signed body");
    assert_eq!(v["authorization"], Value::Null);

    // disableURLInternet: the internet URL refuses.
    a.call(
        Method::PUT,
        &format!("{F}/web/triggers/signed"),
        json!({"triggerConfig": json!({"methods": ["POST"], "authType": "function", "disableURLInternet": true}).to_string()})
            .to_string()
            .into_bytes(),
    )
    .await
    .ok();
    a.to_trigger(&host, Method::POST, "/p", b"x", &[], true)
        .await
        .fc_error(403, "AccessDenied");
}

#[tokio::test]
async fn official_python_sdk_triggers() {
    let Some(python) = kiln_test_support::sdk_python() else {
        return;
    };
    let env = Env::new().await;
    let zip_path = env.state_dir.join("sdk.zip");
    std::fs::write(&zip_path, zip_of(&[("app.py", b"print('hi')\n")])).unwrap();
    run_python_sdk(
        &python,
        "fc_sdk_triggers.py",
        env.addr(),
        &env.pki,
        &[zip_path.as_os_str()],
        "SDK triggers ok",
    )
    .await;
}

/// The timer events the fake agent was sent for `trigger`: their times.
fn timer_ticks(seen: &Seen, trigger: &str) -> Vec<String> {
    seen.lock()
        .unwrap()
        .iter()
        .filter_map(|(_, body)| serde_json::from_slice::<Value>(body).ok())
        .filter(|e| e["triggerName"] == trigger)
        .map(|e| {
            assert_eq!(e["payload"], "tick", "{e}");
            e["triggerTime"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// A timer trigger's ticks are async invocations through the durable
/// queue (listed as async tasks), FC's timer event as the payload, each
/// tick once, across a gateway restart; a disabled one never fires.
#[tokio::test]
async fn timer_triggers_fire_through_the_async_queue_once_per_tick() {
    let mut env = Env::new().await;
    let a = env.client(AK_A, SK_A);
    a.post_json(F, &function_doc("cron")).await.ok();
    // FC lists async tasks of functions with `asyncTask` on.
    a.call(
        Method::PUT,
        &format!("{F}/cron/async-invoke-config"),
        json!({"asyncTask": true}).to_string().into_bytes(),
    )
    .await
    .ok();
    let timer = |name: &str, enable: bool| {
        json!({
            "triggerName": name,
            "triggerType": "timer",
            "triggerConfig": json!({"cronExpression": "*/1 * * * * *", "payload": "tick", "enable": enable}).to_string(),
        })
    };
    a.create_trigger("cron", &timer("every-second", true))
        .await
        .ok();
    a.create_trigger("cron", &timer("off", false)).await.ok();

    let wait_for = |n: usize, seen: Seen| async move {
        for _ in 0..100 {
            if timer_ticks(&seen, "every-second").len() >= n {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("fewer than {n} ticks in 10 s");
    };
    wait_for(2, env.seen.clone()).await;
    env.restart().await;
    let a = env.client(AK_A, SK_A);
    let before = timer_ticks(&env.seen, "every-second").len();
    wait_for(before + 2, env.seen.clone()).await;

    let ticks = timer_ticks(&env.seen, "every-second");
    let mut unique = ticks.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ticks.len(), "a tick fired twice: {ticks:?}");
    assert!(
        timer_ticks(&env.seen, "off").is_empty(),
        "a disabled timer fired"
    );

    let tasks = a
        .call(
            Method::GET,
            &format!("{F}/cron/async-tasks?prefix=timer-&limit=100"),
            vec![],
        )
        .await
        .ok();
    let listed = tasks["tasks"].as_array().unwrap();
    assert!(listed.len() >= ticks.len().min(4), "{tasks}");
    assert!(
        listed
            .iter()
            .all(|t| t["taskId"].as_str().unwrap().starts_with("timer-")),
        "{tasks}"
    );
}

/// `@every 1m` fires once a minute of the gateway's clock (driven by the
/// test), across a restart, each tick an async task.
#[tokio::test]
async fn an_every_minute_timer_fires_each_minute_across_a_restart() {
    let clock = Arc::new(kiln_core::ManualClock::new(now_ms()));
    let mut env = Env::with_clock(Some(clock.clone())).await;
    let a = env.client(AK_A, SK_A);
    a.post_json(F, &function_doc("minutely")).await.ok();
    a.call(
        Method::PUT,
        &format!("{F}/minutely/async-invoke-config"),
        json!({"asyncTask": true}).to_string().into_bytes(),
    )
    .await
    .ok();
    a.create_trigger(
        "minutely",
        &json!({
            "triggerName": "each-minute",
            "triggerType": "timer",
            "triggerConfig": json!({"cronExpression": "@every 1m", "payload": "tick", "enable": true}).to_string(),
        }),
    )
    .await
    .ok();
    let ticks = |env: &Env| timer_ticks(&env.seen, "each-minute");
    let wait_for = |n: usize, seen: Seen| async move {
        for _ in 0..100 {
            if timer_ticks(&seen, "each-minute").len() >= n {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("fewer than {n} ticks");
    };
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    assert!(ticks(&env).is_empty(), "fired before a minute passed");

    clock.advance(std::time::Duration::from_secs(60));
    wait_for(1, env.seen.clone()).await;
    env.restart().await;
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    assert_eq!(ticks(&env).len(), 1, "the restart fired nothing by itself");
    clock.advance(std::time::Duration::from_secs(60));
    wait_for(2, env.seen.clone()).await;
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;

    let t = ticks(&env);
    assert_eq!(t.len(), 2, "{t:?}");
    let at = |s: &str| s.parse::<jiff::Timestamp>().unwrap().as_second();
    assert_eq!(at(&t[1]) - at(&t[0]), 60, "{t:?}");
    let a = env.client(AK_A, SK_A);
    let tasks = a
        .call(
            Method::GET,
            &format!("{F}/minutely/async-tasks?prefix=timer-&limit=100"),
            vec![],
        )
        .await
        .ok();
    assert_eq!(tasks["tasks"].as_array().unwrap().len(), 2, "{tasks}");
}
