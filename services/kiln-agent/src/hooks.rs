//! FC's instance lifecycle hooks for a custom runtime: `POST /initialize`
//! once per instance after its port opens and before its first call, and
//! `GET /pre-stop` before its sandbox is destroyed. Each runs with its own
//! timeout over a fresh HTTP/1.1 connection to the instance.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use kiln_core::{InstanceSpec, LifecycleHook, RequestId};

use crate::runtime_addr::RuntimeAddr;

/// Why a hook did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("{hook} hook did not finish within {timeout_s} s")]
    Timeout { hook: &'static str, timeout_s: u32 },
    #[error("{hook} hook failed with HTTP status {status}: {body}")]
    Failed {
        hook: &'static str,
        status: u16,
        body: String,
    },
    #[error("{hook} hook could not reach the runtime: {reason}")]
    Unreachable { hook: &'static str, reason: String },
}

const INITIALIZE: &str = "Initializer";
const PRE_STOP: &str = "PreStop";
/// How much of a failing hook's answer is kept for the error message.
const BODY_KEPT: usize = 512;

/// Run the spec's initializer, if any. `Ok` when there is none.
/// `credentials` are the instance's credential headers (none without a role).
pub async fn initialize(
    runtime: &RuntimeAddr,
    spec: &InstanceSpec,
    region: Option<&HeaderValue>,
    request_id: &RequestId,
    credentials: Vec<(HeaderName, HeaderValue)>,
) -> Result<(), HookError> {
    let Some(hook) = &spec.initializer else {
        return Ok(());
    };
    let mut extra = vec![
        (
            HeaderName::from_static("x-fc-function-initializer"),
            value(&hook.handler),
        ),
        (
            HeaderName::from_static("x-fc-initialization-timeout"),
            HeaderValue::from(hook.timeout_s),
        ),
        (
            HeaderName::from_static("x-fc-control-path"),
            HeaderValue::from_static("/initialize"),
        ),
    ];
    extra.extend(region.map(|r| (HeaderName::from_static("x-fc-region"), r.clone())));
    extra.extend(credentials);
    run(
        INITIALIZE,
        runtime,
        Method::POST,
        "/initialize",
        spec,
        hook,
        extra,
        request_id,
    )
    .await
}

/// Run the spec's PreStop hook, if any. `Ok` when there is none.
pub async fn pre_stop(
    runtime: &RuntimeAddr,
    spec: &InstanceSpec,
    region: Option<&HeaderValue>,
    credentials: Vec<(HeaderName, HeaderValue)>,
) -> Result<(), HookError> {
    let Some(hook) = &spec.pre_stop else {
        return Ok(());
    };
    let mut extra = vec![
        (
            HeaderName::from_static("x-fc-instance-lifecycle-pre-stop-handler"),
            value(&hook.handler),
        ),
        (
            HeaderName::from_static("x-fc-control-path"),
            HeaderValue::from_static("/pre-stop"),
        ),
    ];
    extra.extend(region.map(|r| (HeaderName::from_static("x-fc-region"), r.clone())));
    extra.extend(credentials);
    run(
        PRE_STOP,
        runtime,
        Method::GET,
        "/pre-stop",
        spec,
        hook,
        extra,
        &RequestId::generate(),
    )
    .await
}

fn value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[allow(clippy::too_many_arguments)]
async fn run(
    name: &'static str,
    runtime: &RuntimeAddr,
    method: Method,
    path: &'static str,
    spec: &InstanceSpec,
    hook: &LifecycleHook,
    extra: Vec<(HeaderName, HeaderValue)>,
    request_id: &RequestId,
) -> Result<(), HookError> {
    let timeout_s = hook.timeout_s;
    let call = call(name, runtime, method, path, spec, extra, request_id);
    let started = std::time::Instant::now();
    let result = match tokio::time::timeout(Duration::from_secs(u64::from(timeout_s)), call).await {
        Ok(r) => r,
        Err(_) => Err(HookError::Timeout {
            hook: name,
            timeout_s,
        }),
    };
    let ms = started.elapsed().as_millis() as u64;
    match &result {
        Ok(()) => tracing::info!(hook = name, %request_id, ms, "lifecycle hook succeeded"),
        Err(e) => tracing::warn!(hook = name, %request_id, ms, error = %e, "lifecycle hook failed"),
    }
    result
}

async fn call(
    name: &'static str,
    runtime: &RuntimeAddr,
    method: Method,
    path: &'static str,
    spec: &InstanceSpec,
    extra: Vec<(HeaderName, HeaderValue)>,
    request_id: &RequestId,
) -> Result<(), HookError> {
    let unreachable = |e: &dyn std::fmt::Display| HookError::Unreachable {
        hook: name,
        reason: e.to_string(),
    };
    let stream = runtime.connect().await.map_err(|e| unreachable(&e))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(&e))?;
    let conn = tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, runtime.endpoint.to_string())
        .header("x-fc-request-id", request_id.as_str())
        .header("x-fc-function-name", value(spec.function_name.as_str()))
        .header("x-fc-function-handler", value(&spec.handler))
        .header("x-fc-function-memory", spec.memory_mb)
        .header("x-fc-function-timeout", spec.timeout_s)
        .header("x-fc-account-id", value(spec.account_id.as_str()))
        .header(
            "x-fc-qualifier",
            value(spec.version.as_deref().unwrap_or("LATEST")),
        )
        .body(Empty::<Bytes>::new())
        .expect("a valid hook request");
    for (n, v) in extra {
        req.headers_mut().insert(n, v);
    }
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| unreachable(&e))?;
    let status = resp.status();
    let fc_status = resp
        .headers()
        .get("x-fc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u16>().ok());
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| unreachable(&e))?
        .to_bytes();
    conn.abort();
    let failed_status = if !status.is_success() {
        Some(status.as_u16())
    } else {
        fc_status.filter(|s| !StatusCode::from_u16(*s).is_ok_and(|s| s.is_success()))
    };
    match failed_status {
        None => Ok(()),
        Some(status) => Err(HookError::Failed {
            hook: name,
            status,
            body: String::from_utf8_lossy(&body[..body.len().min(BODY_KEPT)]).into_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use http::{Response, StatusCode};
    use hyper::body::Incoming;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use kiln_core::{FcErrorCode, InstanceId};
    use kiln_internal_api::server::{full, Body};
    use kiln_internal_api::CreateInstance;
    use tokio::net::TcpListener;

    use super::*;
    use crate::instances::{InstanceError, InstanceManager};
    use crate::testing::{manager, sample_spec, serve_http1, FakeCodeSource, FakeDriver};

    /// What the fake runtime does on each path, and what it saw.
    #[derive(Default)]
    struct Behaviour {
        init_status: Option<u16>,
        init_fc_status: Option<u16>,
        init_delay: Option<Duration>,
        pre_stop_delay: Option<Duration>,
        pre_stop_status: Option<u16>,
        seen: Vec<(Method, String, http::HeaderMap)>,
    }

    struct Runtime {
        state: Arc<Mutex<Behaviour>>,
        addr: SocketAddr,
    }

    impl Runtime {
        async fn start(b: Behaviour) -> Self {
            let state = Arc::new(Mutex::new(b));
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let s = state.clone();
            serve_http1(l, move |req: http::Request<Incoming>| {
                let s = s.clone();
                async move {
                    let path = req.uri().path().to_owned();
                    let (status, fc_status, delay) = {
                        let mut b = s.lock().unwrap();
                        b.seen
                            .push((req.method().clone(), path.clone(), req.headers().clone()));
                        match path.as_str() {
                            "/initialize" => (b.init_status, b.init_fc_status, b.init_delay),
                            "/pre-stop" => (b.pre_stop_status, None, b.pre_stop_delay),
                            _ => (None, None, None),
                        }
                    };
                    if let Some(d) = delay {
                        tokio::time::sleep(d).await;
                    }
                    let mut resp = Response::builder().status(status.unwrap_or(200));
                    if let Some(s) = fc_status {
                        resp = resp.header("x-fc-status", s);
                    }
                    resp.body(full(format!("{path} answered"))).unwrap()
                }
            });
            Self { state, addr }
        }

        fn calls(&self, path: &str) -> Vec<http::HeaderMap> {
            let b = self.state.lock().unwrap();
            b.seen
                .iter()
                .filter(|(_, p, _)| p == path)
                .map(|(_, _, h)| h.clone())
                .collect()
        }

        /// Paths in the order they were called.
        fn order(&self) -> Vec<String> {
            let b = self.state.lock().unwrap();
            b.seen.iter().map(|(_, p, _)| p.clone()).collect()
        }
    }

    struct Node {
        _dir: tempfile::TempDir,
        driver: Arc<FakeDriver>,
        manager: Arc<InstanceManager>,
        digest: String,
    }

    fn node(runtime: SocketAddr) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let driver = Arc::new(FakeDriver::at(runtime));
        let code = Arc::new(FakeCodeSource::new(Duration::ZERO));
        let digest = code.add(b"zip".to_vec());
        let manager = manager(dir.path(), driver.clone(), code);
        Node {
            _dir: dir,
            driver,
            manager,
            digest,
        }
    }

    fn hook(handler: &str, timeout_s: u32) -> Option<LifecycleHook> {
        Some(LifecycleHook {
            handler: handler.into(),
            timeout_s,
        })
    }

    impl Node {
        fn spec(
            &self,
            initializer: Option<LifecycleHook>,
            pre_stop: Option<LifecycleHook>,
        ) -> InstanceSpec {
            let mut s = sample_spec(&self.digest, 9000);
            s.initializer = initializer;
            s.pre_stop = pre_stop;
            s.seal()
        }

        async fn create(&self, spec: InstanceSpec) -> Result<InstanceId, InstanceError> {
            let id = InstanceId::generate();
            self.manager
                .create(CreateInstance {
                    instance_id: id.clone(),
                    spec,
                    always_allocate_cpu: false,
                })
                .await
                .map(|_| id)
        }
    }

    #[tokio::test]
    async fn initializer_runs_once_before_the_first_call() {
        let rt = Runtime::start(Behaviour::default()).await;
        let n = node(rt.addr);
        let id = n.create(n.spec(hook("index.init", 5), None)).await.unwrap();
        // Ran during the create, before any call.
        assert_eq!(rt.order(), vec!["/initialize"]);
        let h = &rt.calls("/initialize")[0];
        assert_eq!(h["x-fc-function-initializer"], "index.init");
        assert_eq!(h["x-fc-initialization-timeout"], "5");
        assert_eq!(h["x-fc-function-name"], "hello");
        assert_eq!(h["x-fc-function-handler"], "index.handler");
        assert_eq!(h["x-fc-function-memory"], "128");
        assert_eq!(h["x-fc-account-id"], "1234");
        assert_eq!(h["x-fc-region"], "cn-test");
        assert_eq!(h["x-fc-control-path"], "/initialize");
        assert!(h["x-fc-request-id"].to_str().unwrap().len() > 8);

        // Several calls through the agent's API: none re-runs it.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let agent = l.local_addr().unwrap();
        let m = n.manager.clone();
        serve_http1(l, move |req| {
            crate::api::handle(
                m.clone(),
                req,
                crate::testing::conn_of(kiln_pki::Role::Gateway),
            )
        });
        let client: Client<HttpConnector, Body> =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        for i in 0..3 {
            let req = http::Request::post(format!("http://{agent}/v1/instances/{id}/invoke"))
                .header("x-fc-request-id", format!("req-{i}"))
                .body(full("x"))
                .unwrap();
            let resp = client.request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            resp.into_body().collect().await.unwrap();
        }
        assert_eq!(
            rt.order(),
            vec!["/initialize", "/invoke", "/invoke", "/invoke"]
        );
    }

    #[tokio::test]
    async fn no_initializer_no_initialize_call() {
        let rt = Runtime::start(Behaviour::default()).await;
        let n = node(rt.addr);
        let id = n.create(n.spec(None, None)).await.unwrap();
        n.manager.destroy(&id).await.unwrap();
        assert!(rt.order().is_empty(), "{:?}", rt.order());
    }

    async fn assert_create_fails(b: Behaviour, timeout_s: u32, needle: &str) {
        let rt = Runtime::start(b).await;
        let n = node(rt.addr);
        let spec = n.spec(hook("index.init", timeout_s), hook("index.stop", 1));
        let started = std::time::Instant::now();
        let e = n.create(spec).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(u64::from(timeout_s) + 2));
        assert!(matches!(e, InstanceError::Initialization(_)), "{e}");
        let fc = e.to_fc();
        assert_eq!(fc.code, FcErrorCode::FunctionNotStarted);
        assert_eq!(fc.kind, Some(kiln_core::FcErrorKind::Initialization));
        assert!(fc.message.contains(needle), "{}", fc.message);
        // The sandbox is gone, never listed, and got no PreStop.
        let created = n.driver.requests()[0].instance_id.clone();
        assert_eq!(n.driver.destroyed(), vec![created.clone()]);
        assert!(!n.driver.exists(&created));
        assert!(n.manager.get(created.as_str()).is_none());
        assert!(n.manager.list().is_empty() && n.manager.ids().is_empty());
        assert_eq!(rt.order(), vec!["/initialize"]);
    }

    #[tokio::test]
    async fn a_failing_initializer_fails_the_create() {
        let b = Behaviour {
            init_status: Some(500),
            ..Default::default()
        };
        assert_create_fails(b, 5, "status 500").await;
        let b = Behaviour {
            init_fc_status: Some(404),
            ..Default::default()
        };
        assert_create_fails(b, 5, "status 404").await;
    }

    #[tokio::test]
    async fn a_hanging_initializer_times_out() {
        let b = Behaviour {
            init_delay: Some(Duration::from_secs(30)),
            ..Default::default()
        };
        assert_create_fails(b, 1, "within 1 s").await;
    }

    #[tokio::test]
    async fn a_runtime_that_drops_the_initializer_fails_the_create() {
        // Accepts and closes every connection: the port "opens" but the
        // hook gets no answer (a crash).
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                drop(tcp);
            }
        });
        let n = node(addr);
        let e = n
            .create(n.spec(hook("index.init", 5), None))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("could not reach"), "{e}");
        assert!(n.manager.ids().is_empty());
        assert_eq!(n.driver.destroyed().len(), 1);
    }

    #[tokio::test]
    async fn pre_stop_runs_before_destroy_with_its_headers() {
        let rt = Runtime::start(Behaviour::default()).await;
        let n = node(rt.addr);
        let id = n.create(n.spec(None, hook("index.stop", 2))).await.unwrap();
        assert!(rt.order().is_empty());
        // The scheduler's DELETE (idle release, scale-in, retire) lands here.
        n.manager.destroy(&id).await.unwrap();
        assert_eq!(rt.order(), vec!["/pre-stop"]);
        let h = &rt.calls("/pre-stop")[0];
        assert_eq!(h["x-fc-instance-lifecycle-pre-stop-handler"], "index.stop");
        assert_eq!(h["x-fc-function-name"], "hello");
        assert_eq!(h["x-fc-control-path"], "/pre-stop");
        assert!(h.contains_key("x-fc-request-id"));
        assert_eq!(n.driver.destroyed(), vec![id.clone()]);
        // Idempotent: a second destroy runs nothing again.
        n.manager.destroy(&id).await.unwrap();
        assert_eq!(rt.calls("/pre-stop").len(), 1);
    }

    #[tokio::test]
    async fn pre_stop_runs_for_every_instance_on_drain() {
        let rt = Runtime::start(Behaviour::default()).await;
        let n = node(rt.addr);
        let spec = n.spec(hook("index.init", 2), hook("index.stop", 2));
        n.create(spec.clone()).await.unwrap();
        n.create(spec).await.unwrap();
        // drain_on_shutdown and a reprovisioned node destroy everything.
        n.manager.destroy_all().await;
        assert_eq!(rt.calls("/pre-stop").len(), 2);
        assert_eq!(n.driver.destroyed().len(), 2);
        assert!(n.manager.ids().is_empty());
    }

    #[tokio::test]
    async fn a_hanging_or_failing_pre_stop_does_not_block_the_destroy() {
        let rt = Runtime::start(Behaviour {
            pre_stop_delay: Some(Duration::from_secs(30)),
            ..Default::default()
        })
        .await;
        let n = node(rt.addr);
        let id = n.create(n.spec(None, hook("index.stop", 1))).await.unwrap();
        let started = std::time::Instant::now();
        n.manager.destroy(&id).await.unwrap();
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(900), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        assert_eq!(n.driver.destroyed(), vec![id]);

        let rt = Runtime::start(Behaviour {
            pre_stop_status: Some(500),
            ..Default::default()
        })
        .await;
        let n = node(rt.addr);
        let id = n.create(n.spec(None, hook("index.stop", 1))).await.unwrap();
        n.manager.destroy(&id).await.unwrap();
        assert_eq!(rt.calls("/pre-stop").len(), 1);
        assert_eq!(n.driver.destroyed(), vec![id]);
    }

    #[tokio::test]
    async fn a_destroy_abandoned_during_pre_stop_still_destroys_the_sandbox() {
        let rt = Runtime::start(Behaviour {
            pre_stop_delay: Some(Duration::from_secs(30)),
            ..Default::default()
        })
        .await;
        let n = node(rt.addr);
        let id = n.create(n.spec(None, hook("index.stop", 1))).await.unwrap();
        // The caller (the scheduler's DELETE) gives up while PreStop runs.
        let gave_up =
            tokio::time::timeout(Duration::from_millis(200), n.manager.destroy(&id)).await;
        assert!(gave_up.is_err());
        assert!(n.driver.destroyed().is_empty());
        for _ in 0..300 {
            if n.driver.destroyed().contains(&id) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(n.driver.destroyed(), vec![id.clone()]);
        assert!(n.manager.get(id.as_str()).is_none());
    }

    #[tokio::test]
    async fn no_pre_stop_after_a_crash() {
        let rt = Runtime::start(Behaviour::default()).await;
        let n = node(rt.addr);
        let id = n.create(n.spec(None, hook("index.stop", 2))).await.unwrap();
        let instance = n.manager.get(id.as_str()).unwrap();
        // What the forwarder does when the runtime crashes mid-call.
        n.manager.fail(&instance, "crashed");
        for _ in 0..200 {
            if n.driver.destroyed().contains(&id) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(n.driver.destroyed(), vec![id]);
        assert!(rt.calls("/pre-stop").is_empty());
    }
}
