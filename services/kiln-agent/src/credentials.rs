//! Temporary credentials of instances whose function has a role (FC's
//! `role`): fetched from the gateway's internal API when the instance is
//! created (never carried in the spec, whose revision is hashed and
//! stored), given to the runtime as `ALIBABA_CLOUD_ACCESS_KEY_ID`,
//! `ALIBABA_CLOUD_ACCESS_KEY_SECRET` and `ALIBABA_CLOUD_SECURITY_TOKEN` at
//! start and as `x-fc-access-key-id`, `x-fc-access-key-secret` and
//! `x-fc-security-token` on every call, and refreshed in the background
//! once two thirds of their lifetime have passed.

use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use kiln_core::{Clock, FcError, InstanceId, InstanceSpec};
use kiln_internal_api::server::full;
use kiln_internal_api::{paths, CredentialsRequest, InternalClient, TemporaryCredentials};
use tokio::task::JoinHandle;
use tracing::Instrument;

pub const ENV_ACCESS_KEY_ID: &str = "ALIBABA_CLOUD_ACCESS_KEY_ID";
pub const ENV_ACCESS_KEY_SECRET: &str = "ALIBABA_CLOUD_ACCESS_KEY_SECRET";
pub const ENV_SECURITY_TOKEN: &str = "ALIBABA_CLOUD_SECURITY_TOKEN";
const H_ACCESS_KEY_ID: HeaderName = HeaderName::from_static("x-fc-access-key-id");
const H_ACCESS_KEY_SECRET: HeaderName = HeaderName::from_static("x-fc-access-key-secret");
const H_SECURITY_TOKEN: HeaderName = HeaderName::from_static("x-fc-security-token");

/// The shortest wait between two refresh attempts.
const RETRY_MIN: Duration = Duration::from_millis(500);

/// Where credentials come from.
#[async_trait::async_trait]
pub trait CredentialSource: Send + Sync + 'static {
    async fn fetch(&self, req: &CredentialsRequest) -> Result<TemporaryCredentials, FcError>;
}

/// The gateway's internal listener: `POST /v1/credentials`.
pub struct GatewayCredentialSource {
    client: InternalClient,
    base: String,
}

impl GatewayCredentialSource {
    pub fn new(client: InternalClient, gateway_internal_url: &str) -> Self {
        Self {
            client,
            base: gateway_internal_url.trim_end_matches('/').to_owned(),
        }
    }
}

#[async_trait::async_trait]
impl CredentialSource for GatewayCredentialSource {
    async fn fetch(&self, req: &CredentialsRequest) -> Result<TemporaryCredentials, FcError> {
        let body = serde_json::to_vec(req).expect("request serialises");
        let http_req = Request::builder()
            .method(Method::POST)
            .uri(format!("{}{}", self.base, paths::CREDENTIALS))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(full(body))
            .map_err(|e| FcError::internal(format!("cannot build the credentials request: {e}")))?;
        let resp = self.client.send(http_req).await.map_err(|e| e.to_fc())?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|e| FcError::unavailable(format!("credentials answer unreadable: {e}")))?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(kiln_internal_api::client::remote_error(status, &bytes));
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| FcError::internal(format!("the gateway answered bad credentials: {e}")))
    }
}

/// FC's three credential headers for `creds` (none if a value is not a
/// valid header value, which the gateway never issues).
pub fn headers(creds: &TemporaryCredentials) -> Vec<(HeaderName, HeaderValue)> {
    Current::new(creds.clone())
        .map(|c| c.headers.to_vec())
        .unwrap_or_default()
}

/// One set of credentials with its header values made once.
struct Current {
    creds: TemporaryCredentials,
    headers: [(HeaderName, HeaderValue); 3],
}

impl Current {
    fn new(creds: TemporaryCredentials) -> Option<Self> {
        let v = |s: &str| {
            let mut v = HeaderValue::from_str(s).ok()?;
            v.set_sensitive(true);
            Some(v)
        };
        Some(Self {
            headers: [
                (H_ACCESS_KEY_ID, v(&creds.access_key_id)?),
                (H_ACCESS_KEY_SECRET, v(&creds.access_key_secret)?),
                (H_SECURITY_TOKEN, v(&creds.security_token)?),
            ],
            creds,
        })
    }
}

/// An instance's credentials: the current set and the task refreshing it
/// (stopped when this is dropped).
#[derive(Default)]
pub struct InstanceCredentials {
    current: RwLock<Option<Arc<Current>>>,
    refresher: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for InstanceCredentials {
    fn drop(&mut self) {
        self.stop();
    }
}

impl InstanceCredentials {
    fn get(&self) -> Option<Arc<Current>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set(&self, creds: TemporaryCredentials) -> bool {
        let Some(c) = Current::new(creds) else {
            return false;
        };
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(c));
        true
    }

    /// FC's three credential headers on a call to the runtime (replacing
    /// any the caller sent); nothing when the function has no role.
    pub fn apply(&self, headers: &mut HeaderMap) {
        if let Some(c) = self.get() {
            for (n, v) in &c.headers {
                headers.insert(n.clone(), v.clone());
            }
        }
    }

    /// The current credential headers (for the lifecycle hooks).
    pub fn header_pairs(&self) -> Vec<(HeaderName, HeaderValue)> {
        self.get().map(|c| c.headers.to_vec()).unwrap_or_default()
    }

    /// The current access key id (for logs and tests).
    pub fn access_key_id(&self) -> Option<String> {
        self.get().map(|c| c.creds.access_key_id.clone())
    }

    pub fn stop(&self) {
        if let Some(t) = self
            .refresher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            t.abort();
        }
    }
}

/// Credentials just fetched for a new instance, with where to refresh them.
pub struct Fetched {
    pub creds: TemporaryCredentials,
    pub source: Arc<dyn CredentialSource>,
    pub req: CredentialsRequest,
}

/// The credentials request of an instance.
pub fn request(id: &InstanceId, spec: &InstanceSpec, role: &str) -> CredentialsRequest {
    CredentialsRequest {
        account_id: spec.account_id.clone(),
        function_name: spec.function_name.clone(),
        role: role.to_owned(),
        instance_id: id.clone(),
    }
}

/// `spec` with the credentials in its environment, for the sandbox only
/// (the instance keeps, and records on disk, the spec without them).
pub fn with_env(spec: &InstanceSpec, creds: &TemporaryCredentials) -> InstanceSpec {
    let mut s = spec.clone();
    s.environment
        .insert(ENV_ACCESS_KEY_ID.into(), creds.access_key_id.clone());
    s.environment.insert(
        ENV_ACCESS_KEY_SECRET.into(),
        creds.access_key_secret.clone(),
    );
    s.environment
        .insert(ENV_SECURITY_TOKEN.into(), creds.security_token.clone());
    s
}

/// How long to wait before refreshing credentials expiring at
/// `expiration_ms`: until a third of their remaining lifetime is left.
pub fn refresh_delay(now_ms: u64, expiration_ms: u64) -> Duration {
    let left = expiration_ms.saturating_sub(now_ms);
    Duration::from_millis(left - left / 3).max(RETRY_MIN)
}

/// Hold `creds` for an instance and keep them fresh until `holder` is
/// dropped or stopped.
pub fn install(
    holder: &Arc<InstanceCredentials>,
    creds: TemporaryCredentials,
    source: Arc<dyn CredentialSource>,
    req: CredentialsRequest,
    clock: Arc<dyn Clock>,
) {
    let mut expiration_ms = creds.expiration_ms;
    holder.set(creds);
    let weak: Weak<InstanceCredentials> = Arc::downgrade(holder);
    let span = tracing::info_span!("credentials_refresh", instance_id = %req.instance_id);
    let task = tokio::spawn(
        async move {
            let mut delay = refresh_delay(clock.now_ms(), expiration_ms);
            loop {
                tokio::time::sleep(delay).await;
                let Some(holder) = weak.upgrade() else {
                    return;
                };
                match source.fetch(&req).await {
                    Ok(c) => {
                        expiration_ms = c.expiration_ms;
                        let id = c.access_key_id.clone();
                        if holder.set(c) {
                            tracing::info!(access_key_id = %id, expiration_ms, "temporary credentials refreshed");
                        }
                        delay = refresh_delay(clock.now_ms(), expiration_ms);
                    }
                    Err(e) => {
                        // Keep the current ones (they may still be valid)
                        // and retry sooner.
                        tracing::warn!(error = %e, "cannot refresh temporary credentials");
                        let left = expiration_ms.saturating_sub(clock.now_ms());
                        delay = Duration::from_millis(left / 4).clamp(RETRY_MIN, Duration::from_secs(30));
                    }
                }
            }
        }
        .instrument(span),
    );
    if let Some(old) = holder
        .refresher
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .replace(task)
    {
        old.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use kiln_core::SystemClock;

    use super::*;

    /// Issues `STS.<n>` credentials valid for `lifetime_ms`; fails while
    /// `failing` is set.
    struct FakeSource {
        issued: AtomicU32,
        lifetime_ms: u64,
        failing: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl CredentialSource for FakeSource {
        async fn fetch(&self, _req: &CredentialsRequest) -> Result<TemporaryCredentials, FcError> {
            if self.failing.load(Ordering::SeqCst) {
                return Err(FcError::unavailable("gateway away"));
            }
            let n = self.issued.fetch_add(1, Ordering::SeqCst);
            Ok(TemporaryCredentials {
                access_key_id: format!("STS.{n}"),
                access_key_secret: format!("secret-{n}"),
                security_token: format!("token-{n}"),
                expiration_ms: SystemClock.now_ms() + self.lifetime_ms,
            })
        }
    }

    fn req() -> CredentialsRequest {
        CredentialsRequest {
            account_id: "1".parse().unwrap(),
            function_name: "f".parse().unwrap(),
            role: "acs:ram::1:role/r".into(),
            instance_id: InstanceId::generate(),
        }
    }

    #[test]
    fn refresh_comes_at_two_thirds_of_the_lifetime() {
        assert_eq!(refresh_delay(0, 3_600_000), Duration::from_secs(2400));
        assert_eq!(refresh_delay(1000, 4000), Duration::from_secs(2));
        assert_eq!(refresh_delay(5000, 4000), RETRY_MIN);
    }

    #[tokio::test]
    async fn credentials_go_on_every_call_and_are_refreshed_before_expiry() {
        let source = Arc::new(FakeSource {
            issued: AtomicU32::new(0),
            lifetime_ms: 1500,
            failing: false.into(),
        });
        let first = source.fetch(&req()).await.unwrap();
        let holder = Arc::new(InstanceCredentials::default());
        install(&holder, first, source.clone(), req(), Arc::new(SystemClock));
        let mut h = HeaderMap::new();
        h.insert("x-fc-access-key-id", HeaderValue::from_static("forged"));
        holder.apply(&mut h);
        assert_eq!(h["x-fc-access-key-id"], "STS.0");
        assert_eq!(h["x-fc-access-key-secret"], "secret-0");
        assert_eq!(h["x-fc-security-token"], "token-0");
        // Refreshed once 1 s (2/3 of 1.5 s) has passed.
        tokio::time::sleep(Duration::from_millis(1300)).await;
        assert_eq!(holder.access_key_id().as_deref(), Some("STS.1"));
        let mut h = HeaderMap::new();
        holder.apply(&mut h);
        assert_eq!(h["x-fc-security-token"], "token-1");
        // A failing source keeps the current set; dropping stops the task.
        source.failing.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(holder.access_key_id().as_deref(), Some("STS.1"));
        source.failing.store(false, Ordering::SeqCst);
        drop(holder);
        let issued = source.issued.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(source.issued.load(Ordering::SeqCst), issued);
    }

    /// An instance of a function with a role, end to end through the
    /// manager and the agent's API: the sandbox's environment, the headers
    /// of a call, and nothing secret in the instance's record.
    #[tokio::test]
    async fn an_instance_with_a_role_gets_credentials_at_start_and_on_calls() {
        use http_body_util::BodyExt;
        use hyper_util::client::legacy::connect::HttpConnector;
        use hyper_util::client::legacy::Client;
        use hyper_util::rt::TokioExecutor;
        use kiln_internal_api::server::Body;
        use kiln_internal_api::CreateInstance;
        use tokio::net::TcpListener;

        use crate::testing::{manager, sample_spec, serve_http1, FakeCodeSource, FakeDriver};

        // The runtime answers with the credential headers it was given,
        // and records the key id each path saw.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let runtime = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
        let s = seen.clone();
        serve_http1(l, move |req: http::Request<hyper::body::Incoming>| {
            let s = s.clone();
            async move {
                let h = |n: &str| {
                    req.headers()
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned()
                };
                s.lock()
                    .unwrap()
                    .push((req.uri().path().to_owned(), h("x-fc-access-key-id")));
                let body = format!(
                    "{} {} {}",
                    h("x-fc-access-key-id"),
                    h("x-fc-access-key-secret"),
                    h("x-fc-security-token")
                );
                http::Response::new(full(body))
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let driver = Arc::new(FakeDriver::at(runtime));
        let code = Arc::new(FakeCodeSource::new(Duration::ZERO));
        let digest = code.add(b"zip".to_vec());
        let m = manager(dir.path(), driver.clone(), code);
        let mut spec = sample_spec(&digest, 9000);
        spec.role = Some("acs:ram::1234:role/reader".into());
        let hook = |h: &str| {
            Some(kiln_core::LifecycleHook {
                handler: h.into(),
                timeout_s: 2,
            })
        };
        spec.initializer = hook("index.init");
        spec.pre_stop = hook("index.stop");
        let spec = spec.seal();
        let create = |id: &InstanceId| CreateInstance {
            instance_id: id.clone(),
            spec: spec.clone(),
            always_allocate_cpu: false,
        };

        // No credential source: the create fails before any sandbox.
        let e = m.create(create(&InstanceId::generate())).await.unwrap_err();
        assert_eq!(e.to_fc().code, kiln_core::FcErrorCode::FunctionNotStarted);
        assert!(e.to_string().contains("temporary credentials"), "{e}");
        assert!(driver.requests().is_empty());

        // A failing source: the same.
        let source = Arc::new(FakeSource {
            issued: AtomicU32::new(0),
            lifetime_ms: 3_600_000,
            failing: true.into(),
        });
        m.set_credential_source(source.clone()).await;
        let e = m.create(create(&InstanceId::generate())).await.unwrap_err();
        assert!(e.to_string().contains("gateway away"), "{e}");
        assert!(driver.requests().is_empty());
        assert!(m.list().is_empty());

        source.failing.store(false, Ordering::SeqCst);
        let id = InstanceId::generate();
        m.create(create(&id)).await.unwrap();
        let env = &driver.requests()[0].spec.environment;
        assert_eq!(env[ENV_ACCESS_KEY_ID], "STS.0");
        assert_eq!(env[ENV_ACCESS_KEY_SECRET], "secret-0");
        assert_eq!(env[ENV_SECURITY_TOKEN], "token-0");
        // The instance keeps (and records) its spec without them.
        assert_eq!(m.get(id.as_str()).unwrap().spec, spec);
        for f in std::fs::read_dir(dir.path().join("instance-records")).unwrap() {
            let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
            assert!(
                !text.contains("secret-0") && !text.contains("token-0"),
                "{text}"
            );
        }

        // A call through the agent's API carries them; a caller's own
        // x-fc-access-key-id is replaced.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let agent = l.local_addr().unwrap();
        let mm = m.clone();
        serve_http1(l, move |req| {
            crate::api::handle(
                mm.clone(),
                req,
                crate::testing::conn_of(kiln_pki::Role::Gateway),
            )
        });
        let client: Client<HttpConnector, Body> =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let req = http::Request::post(format!("http://{agent}/v1/instances/{id}/invoke"))
            .header("x-fc-request-id", "req-1")
            .header("x-fc-access-key-id", "forged")
            .body(full("x"))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"STS.0 secret-0 token-0");

        // Destroying the instance stops its refresher; the hooks had the
        // credentials too.
        m.destroy(&id).await.unwrap();
        assert!(m.get(id.as_str()).is_none());
        let seen = seen.lock().unwrap().clone();
        let key = |p: &str| {
            seen.iter()
                .find(|(path, _)| path == p)
                .map(|(_, k)| k.clone())
        };
        assert_eq!(key("/initialize").as_deref(), Some("STS.0"), "{seen:?}");
        assert_eq!(key("/pre-stop").as_deref(), Some("STS.0"), "{seen:?}");
    }

    #[test]
    fn the_environment_gets_the_three_variables_and_the_spec_stays_sealed() {
        let spec = crate::testing::sample_spec(&"a".repeat(64), 9000);
        let creds = TemporaryCredentials {
            access_key_id: "STS.a".into(),
            access_key_secret: "s".into(),
            security_token: "t".into(),
            expiration_ms: 1,
        };
        let s = with_env(&spec, &creds);
        assert_eq!(s.environment[ENV_ACCESS_KEY_ID], "STS.a");
        assert_eq!(s.environment[ENV_ACCESS_KEY_SECRET], "s");
        assert_eq!(s.environment[ENV_SECURITY_TOKEN], "t");
        assert!(spec.is_sealed());
        assert!(!spec.environment.contains_key(ENV_ACCESS_KEY_ID));
    }
}
