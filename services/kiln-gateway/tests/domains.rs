//! Custom domains on the real gateway (loopback, DevPki, fake scheduler and
//! agent under real mTLS): FC's CustomDomain API shapes, requests by a real
//! TLS client naming the domain (SNI and Host) routed by path to the right
//! function through its HTTP trigger, the domain's own certificate served,
//! a TLSv1.3-only domain refusing TLS 1.2, bad certificates refused with
//! nothing changed, accounts kept apart, the key sealed at rest, and the
//! domains back after a restart.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use kiln_core::{InstanceId, LeaseId, NodeId};
use kiln_gateway::config::BootstrapKey;
use kiln_gateway::{GatewayConfig, GatewayHandle};
use kiln_internal_api::server::{self, full, Body};
use kiln_internal_api::Lease;
use kiln_pki::DevPki;
use serde_json::{json, Value};

/// Instance id -> function name, as the fake scheduler leased them.
type Leased = Arc<Mutex<HashMap<String, String>>>;

struct Env {
    _dir: tempfile::TempDir,
    state_dir: std::path::PathBuf,
    pki: DevPki,
    gateway: Option<GatewayHandle>,
    scheduler_url: String,
    _stop: tokio::sync::watch::Sender<bool>,
}

async fn fake_scheduler(
    req: Request<hyper::body::Incoming>,
    agent_url: String,
    leased: Leased,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let bytes = read_all(body).await;
    match (parts.method.clone(), parts.uri.path()) {
        (Method::POST, "/v1/leases") => {
            let v: Value = serde_json::from_slice(&bytes).unwrap();
            let spec = &v["spec"];
            let function = spec["function_name"]
                .as_str()
                .or(spec["functionName"].as_str())
                .unwrap()
                .to_owned();
            let instance_id = InstanceId::generate();
            leased
                .lock()
                .unwrap()
                .insert(instance_id.to_string(), function);
            server::json(
                StatusCode::OK,
                &Lease {
                    lease_id: LeaseId::generate(),
                    instance_id,
                    node_id: NodeId::generate(),
                    agent_url,
                    cold_start: false,
                    expires_in_ms: 600_000,
                },
            )
        }
        (Method::DELETE, p) if p.starts_with("/v1/leases/") => server::no_content(),
        (Method::POST, "/v1/functions/retire") => server::no_content(),
        (_, p) => server::not_found(p, "sched"),
    }
}

/// Answers as a web function: 201 with its own header, echoing which
/// function was called, the request line and the body.
async fn fake_agent(req: Request<hyper::body::Incoming>, leased: Leased) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let bytes = read_all(body).await;
    let h = |k: &str| parts.headers.get(k).map(|v| v.to_str().unwrap().to_owned());
    let instance = parts
        .uri
        .path()
        .trim_start_matches("/v1/instances/")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let function = leased.lock().unwrap().get(&instance).cloned();
    let echo = json!({
        "function": function,
        "method": h("x-kiln-http-method"),
        "path": h("x-kiln-http-path"),
        "body": String::from_utf8_lossy(&bytes),
    });
    Response::builder()
        .status(201)
        .header("x-kiln-invoke-outcome", "ok")
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

impl Env {
    async fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        // The gateway's own public name, which no custom domain may take.
        let pki = DevPki::ensure(&dir.path().join("pki"), &["api.gateway.test".into()]).unwrap();
        let leased: Leased = Arc::default();
        let (tx, rx) = tokio::sync::watch::channel(false);
        let agent_tls = kiln_pki::internal_server_config(&pki.files("agent")).unwrap();
        let l = leased.clone();
        let agent = serve_fake(agent_tls, rx.clone(), move |r| fake_agent(r, l.clone())).await;
        let agent_url = format!("https://127.0.0.1:{}", agent.port());
        let sched_tls = kiln_pki::internal_server_config(&pki.files("scheduler")).unwrap();
        let sched = serve_fake(sched_tls, rx, move |r| {
            fake_scheduler(r, agent_url.clone(), leased.clone())
        })
        .await;
        let scheduler_url = format!("https://127.0.0.1:{}", sched.port());
        let state_dir = dir.path().join("gateway");
        let gateway = kiln_gateway::start(config(&state_dir, &pki, &scheduler_url))
            .await
            .unwrap();
        Env {
            _dir: dir,
            state_dir,
            pki,
            gateway: Some(gateway),
            scheduler_url,
            _stop: tx,
        }
    }

    fn port(&self) -> u16 {
        self.gateway.as_ref().unwrap().public_addr().port()
    }

    fn client(&self, ak: &'static str, sk: &'static str) -> Api {
        Api::new(
            &self.pki,
            self.gateway.as_ref().unwrap().public_addr(),
            ak,
            sk,
            false,
        )
    }

    async fn restart(&mut self) {
        self.gateway.take().unwrap().shutdown().await;
        self.gateway = Some(
            kiln_gateway::start(config(&self.state_dir, &self.pki, &self.scheduler_url))
                .await
                .unwrap(),
        );
    }
}

const F: &str = "/2023-03-30/functions";
const D: &str = "/2023-03-30/custom-domains";

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

impl Api {
    async fn json_call(&self, method: Method, path: &str, doc: &Value) -> Answer {
        self.call(method, path, doc.to_string().into_bytes()).await
    }

    async fn web_function(&self, name: &str, methods: &[&str]) {
        self.web_function_auth(name, methods, "anonymous").await
    }

    async fn web_function_auth(&self, name: &str, methods: &[&str], auth: &str) {
        self.json_call(Method::POST, F, &function_doc(name))
            .await
            .ok();
        self.json_call(
            Method::POST,
            &format!("{F}/{name}/triggers"),
            &json!({"triggerName": "http", "triggerType": "http",
                    "triggerConfig": json!({"methods": methods, "authType": auth}).to_string()}),
        )
        .await
        .ok();
    }

    async fn domains(&self, query: &str) -> Vec<String> {
        let v = self
            .call(Method::GET, &format!("{D}{query}"), vec![])
            .await
            .ok();
        v["customDomains"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["domainName"].as_str().unwrap().to_owned())
            .collect()
    }
}

/// A certificate authority of the domain owner's, and certificates it
/// issues.
struct OwnerCa {
    ca: kiln_pki::Ca,
}

impl OwnerCa {
    fn new() -> Self {
        Self {
            ca: kiln_pki::Ca::generate("domain owner's CA").unwrap(),
        }
    }

    fn issue(&self, names: &[&str]) -> kiln_pki::Issued {
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        self.ca
            .issue(&kiln_pki::CertRequest::public_server(&names[0]).names(&names))
            .unwrap()
    }
}

/// What a real TLS client saw: the answer, the server certificate's names
/// and the negotiated version.
struct Seen {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
    peer_names: Vec<String>,
    version: rustls::ProtocolVersion,
}

impl Seen {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&self.body)))
    }
}

/// A request to `https://{domain}:{port}{path}` resolved to 127.0.0.1 (as
/// `curl --resolve` does), trusting only `ca_pem`, speaking only
/// `versions`: SNI and Host name the domain.
async fn to_domain(
    port: u16,
    ca_pem: &str,
    domain: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
    method: Method,
    path: &str,
    body: &[u8],
) -> Result<Seen, String> {
    let none = http::HeaderMap::new();
    to_host(
        port, ca_pem, domain, domain, versions, method, path, body, &none,
    )
    .await
}

/// [`to_domain`] with `sni` in the handshake, `host` in the request, and
/// `headers`.
#[allow(clippy::too_many_arguments)]
async fn to_host(
    port: u16,
    ca_pem: &str,
    sni: &str,
    host: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
    method: Method,
    path: &str,
    body: &[u8],
    headers: &http::HeaderMap,
) -> Result<Seen, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let conn = stream.get_ref().1;
    let version = conn.protocol_version().unwrap();
    let leaf = conn.peer_certificates().unwrap()[0].clone();
    let peer_names = kiln_pki::certificate_names(&leaf).unwrap();
    let (mut send, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .body(Full::new(Bytes::copy_from_slice(body)))
        .unwrap();
    *req.headers_mut() = headers.clone();
    req.headers_mut()
        .insert("host", format!("{host}:{port}").parse().unwrap());
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    Ok(Seen {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
        peer_names,
        version,
    })
}

const BOTH: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];
const TLS12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
const TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

fn domain_doc(name: &str, cert: &kiln_pki::Issued, routes: Value) -> Value {
    json!({
        "domainName": name,
        "protocol": "HTTPS",
        "certConfig": {"certName": "shop-cert", "certificate": cert.cert_pem, "privateKey": cert.key_pem},
        "routeConfig": {"routes": routes},
    })
}

#[tokio::test]
async fn custom_domains_route_by_host_and_path_with_their_own_certificates() {
    let mut env = Env::new().await;
    let a = env.client(AK_A, SK_A);
    let b = env.client(AK_B, SK_B);
    a.web_function("web", &["GET", "POST", "PUT"]).await;
    a.web_function("api", &["GET", "POST"]).await;
    a.web_function_auth("signed", &["GET"], "function").await;
    // A function without an HTTP trigger.
    a.json_call(Method::POST, F, &function_doc("plain"))
        .await
        .ok();
    let owner = OwnerCa::new();
    let shop = owner.issue(&["shop.example.test"]);
    let routes = json!([
        {"path": "/*", "functionName": "web"},
        {"path": "/api/*", "functionName": "api", "qualifier": "LATEST", "methods": ["GET", "post"]},
        {"path": "/api/login", "functionName": "web", "methods": ["POST"]},
        {"path": "/gone/*", "functionName": "nosuchfn"},
        {"path": "/plain", "functionName": "plain"},
        {"path": "/signed/*", "functionName": "signed"},
    ]);
    let created = a
        .json_call(
            Method::POST,
            D,
            &domain_doc("Shop.Example.Test", &shop, routes),
        )
        .await
        .ok();
    // FC's shape: the certificate but never the private key.
    assert_eq!(created["domainName"], "shop.example.test");
    assert_eq!(created["accountId"], ACCOUNT_A);
    assert_eq!(created["apiVersion"], "2023-03-30");
    assert_eq!(created["protocol"], "HTTPS");
    assert_eq!(created["certConfig"]["certName"], "shop-cert");
    assert_eq!(created["certConfig"]["certificate"], shop.cert_pem.as_str());
    assert!(
        created["certConfig"].get("privateKey").is_none(),
        "{created}"
    );
    assert!(!created.to_string().contains("PRIVATE KEY"));
    assert_eq!(created["tlsConfig"]["minVersion"], "TLSv1.2");
    assert_eq!(
        created["routeConfig"]["routes"][1]["methods"],
        json!(["GET", "POST"])
    );
    assert_eq!(created["routeConfig"]["routes"][0]["qualifier"], "LATEST");
    assert!(created["createdTime"].as_str().unwrap().ends_with('Z'));
    assert!(created["lastModifiedTime"].as_str().unwrap().ends_with('Z'));
    let got = a
        .call(Method::GET, &format!("{D}/shop.example.test"), vec![])
        .await
        .ok();
    assert_eq!(got, created);

    // A real TLS client naming the domain: its certificate, routed by path.
    let port = env.port();
    let req = |path: &'static str, method: Method, body: &'static [u8]| {
        let ca = owner.ca.cert_pem().to_owned();
        async move {
            to_domain(port, &ca, "shop.example.test", BOTH, method, path, body)
                .await
                .unwrap()
        }
    };
    let r = req("/api/users?id=7&x=a%20b", Method::GET, b"").await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.peer_names, vec!["shop.example.test"]);
    assert_eq!(r.headers["x-echo"], "yes");
    assert!(r.headers.contains_key("x-fc-request-id"));
    let v = r.json();
    assert_eq!(v["function"], "api");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/api/users?id=7&x=a%20b");
    let v = req("/api/login", Method::POST, b"user=a").await.json();
    assert_eq!(
        (v["function"].as_str(), v["body"].as_str()),
        (Some("web"), Some("user=a"))
    );
    let v = req("/index.html", Method::PUT, b"page").await.json();
    assert_eq!(
        (v["function"].as_str(), v["path"].as_str()),
        (Some("web"), Some("/index.html"))
    );
    assert_eq!(
        req("/api", Method::GET, b"").await.json()["function"],
        "web"
    );
    // The route's methods, then the trigger's.
    let r = req("/api/login", Method::GET, b"").await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        serde_json::from_slice::<Value>(&r.body).unwrap()["Code"],
        "MethodNotAllowed"
    );
    assert_eq!(
        req("/api/x", Method::PUT, b"").await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    let r = req("/gone/x", Method::GET, b"").await;
    assert_eq!(
        (r.status, r.json()["Code"].as_str()),
        (StatusCode::NOT_FOUND, Some("FunctionNotFound"))
    );
    let r = req("/plain", Method::GET, b"").await;
    assert_eq!(
        (r.status, r.json()["Code"].as_str()),
        (StatusCode::NOT_FOUND, Some("TriggerNotFound"))
    );
    // The trigger's authType applies: `function` takes only requests signed
    // by the function's account.
    let r = req("/signed/x", Method::GET, b"").await;
    assert_eq!(
        (r.status, r.json()["Code"].as_str()),
        (StatusCode::FORBIDDEN, Some("AccessDenied"))
    );
    let host = format!("shop.example.test:{port}");
    for (who, status) in [(&a, StatusCode::CREATED), (&b, StatusCode::FORBIDDEN)] {
        let signed = who.signed(
            Method::GET,
            "/signed/x?y=1",
            vec![],
            &[("host", host.as_str())],
            now_ms(),
        );
        let r = to_host(
            port,
            owner.ca.cert_pem(),
            "shop.example.test",
            "shop.example.test",
            BOTH,
            Method::GET,
            "/signed/x?y=1",
            b"",
            signed.headers(),
        )
        .await
        .unwrap();
        assert_eq!(r.status, status, "{:?}", r.body);
    }
    // The API host keeps the gateway's certificate.
    assert_eq!(a.domains("").await, ["shop.example.test"]);

    // A TLSv1.3-only domain refuses a TLS 1.2 handshake; the default one
    // takes both.
    let secure = owner.issue(&["*.secure.example.test"]);
    let mut doc = domain_doc(
        "api.secure.example.test",
        &secure,
        json!([{"path": "/*", "functionName": "api"}]),
    );
    doc["tlsConfig"] = json!({"minVersion": "TLSv1.3"});
    let s = a.json_call(Method::POST, D, &doc).await.ok();
    assert_eq!(s["tlsConfig"]["minVersion"], "TLSv1.3");
    let ca = owner.ca.cert_pem();
    let e = to_domain(
        port,
        ca,
        "api.secure.example.test",
        TLS12,
        Method::GET,
        "/",
        b"",
    )
    .await
    .err()
    .expect("TLS 1.2 refused");
    assert!(e.contains("TLS handshake"), "{e}");
    let r = to_domain(
        port,
        ca,
        "api.secure.example.test",
        TLS13,
        Method::GET,
        "/x",
        b"",
    )
    .await
    .unwrap();
    assert_eq!(
        (r.status, r.version),
        (StatusCode::CREATED, rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(r.peer_names, vec!["*.secure.example.test"]);
    let r = to_domain(port, ca, "shop.example.test", TLS12, Method::GET, "/x", b"")
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.version),
        (StatusCode::CREATED, rustls::ProtocolVersion::TLSv1_2)
    );
    // Nor is it reached over TLS 1.2 by naming another domain in the
    // handshake: a connection set up for one name serves only that one.
    let r = to_host(
        port,
        ca,
        "shop.example.test",
        "api.secure.example.test",
        TLS12,
        Method::GET,
        "/x",
        b"",
        &http::HeaderMap::new(),
    )
    .await
    .unwrap();
    assert_eq!(
        (r.status, r.json()["Code"].as_str()),
        (StatusCode::MISDIRECTED_REQUEST, Some("MisdirectedRequest"))
    );

    // Bad input: FC's InvalidArgument naming the field, nothing stored.
    let other_ca = OwnerCa::new();
    let other = other_ca.issue(&["bad.example.test"]);
    let wrong_name = owner.issue(&["elsewhere.example.test"]);
    let mismatched = kiln_pki::Issued {
        cert_pem: owner.issue(&["bad.example.test"]).cert_pem,
        key_pem: other.key_pem.clone(),
    };
    let route = json!([{"path": "/*", "functionName": "web"}]);
    let mut cases = vec![
        (
            domain_doc("bad.example.test", &wrong_name, route.clone()),
            "does not cover",
        ),
        (
            domain_doc("bad.example.test", &mismatched, route.clone()),
            "does not match",
        ),
        (
            domain_doc(
                "bad.example.test",
                &kiln_pki::Issued {
                    cert_pem: "junk".into(),
                    key_pem: other.key_pem.clone(),
                },
                route.clone(),
            ),
            "certConfig.certificate",
        ),
        (
            domain_doc(
                "bad.example.test",
                &kiln_pki::Issued {
                    cert_pem: other.cert_pem.clone(),
                    key_pem: "junk".into(),
                },
                route.clone(),
            ),
            "certConfig.privateKey",
        ),
        (
            domain_doc(
                "bad.example.test",
                &other,
                json!([{"path": "/*", "functionName": "web", "rewriteConfig": {"equalRules": [{"match": "/a", "replacement": "/b"}]}}]),
            ),
            "rewriteConfig",
        ),
        (
            domain_doc(
                "bad.example.test",
                &other,
                json!([{"path": "a/*", "functionName": "web"}]),
            ),
            "path",
        ),
        (
            domain_doc("x.fcapp.localhost", &other, route.clone()),
            "domainName",
        ),
        (
            domain_doc(
                "api.gateway.test",
                &owner.issue(&["api.gateway.test"]),
                route.clone(),
            ),
            "domainName",
        ),
    ];
    let mut http_only = domain_doc("bad.example.test", &other, route.clone());
    http_only["protocol"] = json!("HTTP");
    cases.push((http_only, "protocol"));
    let mut waf = domain_doc("bad.example.test", &other, route.clone());
    waf["wafConfig"] = json!({"enableWAF": true});
    cases.push((waf, "wafConfig"));
    let mut tls10 = domain_doc("bad.example.test", &other, route.clone());
    tls10["tlsConfig"] = json!({"minVersion": "TLSv1.0"});
    cases.push((tls10, "tlsConfig"));
    let mut no_cert = domain_doc("bad.example.test", &other, route.clone());
    no_cert.as_object_mut().unwrap().remove("certConfig");
    cases.push((no_cert, "certConfig"));
    for (doc, field) in &cases {
        let msg = a
            .json_call(Method::POST, D, doc)
            .await
            .fc_error(400, "InvalidArgument");
        assert!(msg.contains(field), "{field}: {msg}");
    }
    a.call(Method::GET, &format!("{D}/bad.example.test"), vec![])
        .await
        .fc_error(404, "DomainNameNotFound");
    assert_eq!(
        a.domains("").await,
        ["api.secure.example.test", "shop.example.test"]
    );
    // A refused update changes nothing either.
    let path = format!("{D}/shop.example.test");
    a.json_call(Method::PUT, &path, &json!({"certConfig": {"certificate": wrong_name.cert_pem, "privateKey": wrong_name.key_pem}}))
        .await
        .fc_error(400, "InvalidArgument");
    assert_eq!(a.call(Method::GET, &path, vec![]).await.ok(), created);

    // Another account sees nothing, changes nothing, cannot take the name.
    assert!(b.domains("").await.is_empty());
    b.call(Method::GET, &path, vec![])
        .await
        .fc_error(404, "DomainNameNotFound");
    b.json_call(Method::PUT, &path, &json!({"routeConfig": {"routes": []}}))
        .await
        .fc_error(404, "DomainNameNotFound");
    b.call(Method::DELETE, &path, vec![])
        .await
        .fc_error(404, "DomainNameNotFound");
    let theirs = owner.issue(&["shop.example.test"]);
    b.web_function("web", &["GET"]).await;
    b.json_call(
        Method::POST,
        D,
        &domain_doc("shop.example.test", &theirs, route.clone()),
    )
    .await
    .fc_error(409, "DomainNameAlreadyExists");
    assert_eq!(a.call(Method::GET, &path, vec![]).await.ok(), created);
    assert_eq!(
        req("/api/x", Method::GET, b"").await.json()["function"],
        "api"
    );

    // Listing: prefix, limit, nextToken.
    assert_eq!(a.domains("?prefix=shop").await, ["shop.example.test"]);
    let page = a
        .call(Method::GET, &format!("{D}?limit=1"), vec![])
        .await
        .ok();
    assert_eq!(page["customDomains"].as_array().unwrap().len(), 1);
    let token = page["nextToken"].as_str().unwrap();
    assert_eq!(
        a.domains(&format!("?limit=1&nextToken={token}")).await,
        ["shop.example.test"]
    );

    // An update serves at once: new routes, a new certificate.
    let renewed = owner.issue(&["shop.example.test", "www.shop.example.test"]);
    let u = a
        .json_call(
            Method::PUT,
            &path,
            &json!({
                "routeConfig": {"routes": [{"path": "/*", "functionName": "api"}]},
                "certConfig": {"certName": "renewed", "certificate": renewed.cert_pem, "privateKey": renewed.key_pem},
            }),
        )
        .await
        .ok();
    assert_eq!(u["certConfig"]["certName"], "renewed");
    assert_eq!(u["createdTime"], created["createdTime"]);
    let r = req("/index.html", Method::GET, b"").await;
    assert_eq!(r.json()["function"], "api");
    assert_eq!(
        r.peer_names,
        vec!["shop.example.test", "www.shop.example.test"]
    );

    // The private key is sealed at rest; domains come back after a restart.
    env.restart().await;
    let mut db = std::fs::read(env.state_dir.join("gateway.db")).unwrap();
    db.extend(std::fs::read(env.state_dir.join("gateway.db-wal")).unwrap_or_default());
    let key_body: String = renewed.key_pem.lines().nth(1).unwrap().to_owned();
    assert!(!db.is_empty());
    assert!(
        !db.windows(key_body.len()).any(|w| w == key_body.as_bytes()),
        "the private key is in the store in plaintext"
    );
    let a = env.client(AK_A, SK_A);
    assert_eq!(a.call(Method::GET, &path, vec![]).await.ok(), u);
    let port = env.port();
    let r = to_domain(
        port,
        owner.ca.cert_pem(),
        "shop.example.test",
        BOTH,
        Method::GET,
        "/y",
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.json()["function"], "api");

    // Deleted: gone from the API, its name and certificate no longer served.
    let d = a.call(Method::DELETE, &path, vec![]).await;
    assert_eq!(d.status, StatusCode::NO_CONTENT);
    a.call(Method::GET, &path, vec![])
        .await
        .fc_error(404, "DomainNameNotFound");
    let e = to_domain(
        port,
        owner.ca.cert_pem(),
        "shop.example.test",
        BOTH,
        Method::GET,
        "/",
        b"",
    )
    .await
    .err()
    .expect("the gateway's own certificate, not trusted by the owner's CA");
    assert!(e.contains("TLS handshake"), "{e}");
    assert_eq!(a.domains("").await, ["api.secure.example.test"]);
}

/// The official Python SDK drives Create/Get/Update/List/Delete.
#[tokio::test]
async fn official_python_sdk_custom_domains() {
    let Some(python) = kiln_test_support::sdk_python() else {
        return;
    };
    let env = Env::new().await;
    let owner = OwnerCa::new();
    let issued = owner.issue(&["sdk.example.test", "mismatch.example.test"]);
    let other = owner.issue(&["sdk.example.test"]);
    let dir = &env.state_dir;
    let (cert, key, other_key) = (dir.join("c.pem"), dir.join("k.pem"), dir.join("o.pem"));
    std::fs::write(&cert, &issued.cert_pem).unwrap();
    std::fs::write(&key, &issued.key_pem).unwrap();
    std::fs::write(&other_key, &other.key_pem).unwrap();
    run_python_sdk(
        &python,
        "fc_sdk_domains.py",
        env.gateway.as_ref().unwrap().public_addr(),
        &env.pki,
        &[cert.as_os_str(), key.as_os_str(), other_key.as_os_str()],
        "SDK domains ok",
    )
    .await;
}
