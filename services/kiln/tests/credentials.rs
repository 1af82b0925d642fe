//! Temporary credentials end to end on `kiln dev` (runc sandboxes): a
//! function with a role gets short-lived credentials for it in its
//! environment and on every call; requests signed with them (token in
//! `x-acs-security-token`, as the SDKs send STS credentials) may do what
//! the role allows and nothing else, stop working when they expire, and
//! are refreshed before that. Bad roles, policies and tokens get FC's
//! error shape and change nothing. The function itself makes such calls
//! from inside its instance (examples/sts-python signs them in pure
//! Python), reaching the gateway at the host side of its link.

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::Method;
use kiln::client::{ApiResponse, FcClient};
use serde_json::{json, Value};

use common::{example_zip, Dev};

const LIFETIME_S: u64 = 8;

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// One set of credentials as the function reported them.
#[derive(Debug, Clone, PartialEq)]
struct Creds {
    id: String,
    secret: String,
    token: String,
}

impl Creds {
    fn of(v: &Value) -> Creds {
        let s = |k: &str| {
            v[k].as_str()
                .unwrap_or_else(|| panic!("{k} missing in {v}"))
                .to_owned()
        };
        Creds {
            id: s("accessKeyId"),
            secret: s("accessKeySecret"),
            token: s("securityToken"),
        }
    }
}

/// A client signing with temporary credentials (and `token` as the
/// security token; usually the credentials' own).
async fn sts_call(
    dev: &Dev,
    creds: &Creds,
    token: &str,
    method: Method,
    path: &str,
) -> ApiResponse {
    let mut c = dev.creds.clone();
    c.access_key_id = creds.id.clone();
    c.access_key_secret = creds.secret.clone();
    FcClient::new(c)
        .unwrap()
        .request(
            method,
            path,
            &[],
            &[
                ("x-acs-security-token", token),
                ("x-acs-accesskey-id", creds.id.as_str()),
            ],
            Bytes::new(),
        )
        .await
        .unwrap()
}

/// FC's official Python SDK (`KILN_FC_SDK_PYTHON`) configured with
/// temporary credentials: GetFunction on itself works, DeleteFunction is
/// refused with AccessDenied.
fn official_sdk_with_sts(dev: &Dev, creds: &Creds) {
    let Some(python) = kiln_test_support::sdk_python() else {
        return;
    };
    let script = r#"
import sys
from alibabacloud_fc20230330 import models
from alibabacloud_fc20230330.client import Client
from alibabacloud_tea_openapi.utils_models import Config
from Tea.exceptions import TeaException
endpoint, ak, sk, token, ca = sys.argv[1:6]
client = Client(Config(access_key_id=ak, access_key_secret=sk, security_token=token,
                       endpoint=endpoint, protocol="https", ca=ca, region_id="cn-hangzhou"))
got = client.get_function("sts-fn", models.GetFunctionRequest()).body
assert got.function_name == "sts-fn", got.to_map()
try:
    client.delete_function("sts-fn")
    raise AssertionError("DeleteFunction allowed")
except TeaException as e:
    assert e.code == "AccessDenied", (e.code, e.message)
print("SDK with STS ok")
"#;
    let endpoint = dev.creds.endpoint.trim_start_matches("https://").to_owned();
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .args([&endpoint, &creds.id, &creds.secret, &creds.token])
        .arg(&dev.creds.ca_cert)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("SDK with STS ok"),
        "SDK with STS failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn code_of(r: &ApiResponse) -> String {
    serde_json::from_slice::<Value>(&r.body)
        .ok()
        .and_then(|v| v["Code"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

async fn root(dev: &Dev, method: Method, path: &str, body: Value) -> ApiResponse {
    let body = if body.is_null() {
        Bytes::new()
    } else {
        Bytes::from(body.to_string())
    };
    dev.client()
        .request(method, path, &[], &[], body)
        .await
        .unwrap()
}

/// Have the function call Kiln's API from inside its instance: each
/// `(method, path, source)` is signed by the function with the credentials
/// of its environment (`"env"`) or of the call's headers (`"headers"`).
/// Returns what the API answered to each: (HTTP status, FC error code).
async fn from_inside(dev: &Dev, requests: &[(&str, &str, &str)]) -> Vec<(u16, String)> {
    let port = dev
        .creds
        .endpoint
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .expect("endpoint has a port");
    let ca = std::fs::read_to_string(&dev.creds.ca_cert).unwrap();
    let requests: Vec<Value> = requests
        .iter()
        .map(
            |(method, path, source)| json!({"method": method, "path": path, "credentials": source}),
        )
        .collect();
    let event = json!({"api": {"port": port, "ca": ca, "requests": requests}});
    let r = dev
        .client()
        .invoke("sts-fn", Bytes::from(event.to_string()), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    let answers = v["api"]
        .as_array()
        .unwrap_or_else(|| panic!("no api answers: {v}"));
    assert_eq!(answers.len(), requests.len(), "{v}");
    answers
        .iter()
        .map(|a| {
            let status = a["status"].as_u64().unwrap_or_else(|| {
                panic!(
                    "the function could not reach the API: {a}\n{}",
                    dev.log_tail()
                )
            });
            (
                status as u16,
                a["code"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Invoke the function and read the two credential sets it saw.
async fn credentials_seen(dev: &Dev) -> (Creds, Creds) {
    let r = dev
        .client()
        .invoke("sts-fn", Bytes::from_static(b"{}"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    (Creds::of(&v["env"]), Creds::of(&v["headers"]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_uses_its_roles_temporary_credentials() {
    if common::skip() {
        return;
    }
    let lifetime = LIFETIME_S.to_string();
    // On all addresses, so that instances reach the gateway at the host
    // side of their link.
    let dev = Dev::start_on("0.0.0.0", &["--credentials-lifetime", &lifetime]);
    let c = dev.client();
    let account = dev.creds.account_id.clone();

    // Roles: bad names and policies are refused, and nothing is created.
    let policy = json!({"Version": "1", "Statement": [
        {"Effect": "Allow", "Action": ["fc:GetFunction", "fc:InvokeFunction"],
         "Resource": "acs:fc:*:*:functions/sts-fn"}]});
    for (path, body, needle) in [
        (
            "/2023-03-30/roles/bad%20name",
            json!({"policy": policy}),
            "roleName",
        ),
        (
            "/2023-03-30/roles/self-reader",
            json!({"policy": {"Version": "1", "Statement": [
                {"Effect": "Allow", "Action": "ecs:*", "Resource": "*"}]}}),
            "Action",
        ),
        (
            "/2023-03-30/roles/self-reader",
            json!({"policy": policy, "extra": 1}),
            "unknown field",
        ),
    ] {
        let r = root(&dev, Method::PUT, path, body).await;
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(code_of(&r), "InvalidArgument");
        assert!(String::from_utf8_lossy(&r.body).contains(needle));
    }
    let r = root(
        &dev,
        Method::GET,
        "/2023-03-30/roles/self-reader",
        Value::Null,
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), code_of(&r).as_str()),
        (404, "EntityNotExist.Role")
    );

    let r = root(
        &dev,
        Method::PUT,
        "/2023-03-30/roles/Self-Reader",
        json!({"description": "reads itself", "policy": policy}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let role: Value = serde_json::from_slice(&r.body).unwrap();
    let arn = format!("acs:ram::{account}:role/self-reader");
    assert_eq!(role["arn"], arn.as_str());
    let r = root(&dev, Method::GET, "/2023-03-30/roles", Value::Null).await;
    let listed: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(listed["roles"][0]["roleName"], "self-reader", "{listed}");

    // A function's role: malformed, unknown or another account's is
    // InvalidArgument and creates nothing.
    let zip = example_zip("sts-python");
    let function = |role: &str| {
        json!({
            "functionName": "sts-fn",
            "runtime": "custom.debian12",
            "handler": "index.handler",
            "memorySize": 256,
            "timeout": 10,
            "role": role,
            "customRuntimeConfig": {"command": ["python3", "server.py"], "port": 9000},
            "code": {"zipFile": b64(&zip)},
        })
    };
    for bad in [
        "self-reader".to_owned(),
        "acs:ram::x:role/self-reader".to_owned(),
        format!("acs:ram::{account}:role/nobody"),
        "acs:ram::999999:role/self-reader".to_owned(),
    ] {
        let err = c
            .create_function(&function(&bad))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("InvalidArgument"), "{bad}: {err}");
        assert!(
            c.get_function("sts-fn").await.is_err(),
            "{bad} created the function"
        );
    }
    c.create_function(&function(&arn))
        .await
        .unwrap_or_else(|e| panic!("create failed: {e}\n{}", dev.log_tail()));
    c.create_function(&json!({
        "functionName": "other-fn",
        "runtime": "custom.debian12",
        "handler": "index.handler",
        "customRuntimeConfig": {"command": ["python3", "server.py"]},
        "code": {"zipFile": b64(&example_zip("hello-python"))},
    }))
    .await
    .unwrap();
    // A malformed role on update changes nothing.
    let err = c
        .update_function("sts-fn", &json!({"role": "acs:ram::1:nope"}))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("InvalidArgument"), "{err}");
    assert_eq!(
        c.get_function("sts-fn").await.unwrap()["role"],
        arn.as_str()
    );

    // The instance has the credentials in its environment and on the call.
    let issued_at = Instant::now();
    let (env, headers) = credentials_seen(&dev).await;
    assert!(env.id.starts_with("STS."), "{env:?}");
    assert_eq!(env, headers, "first call: the start's credentials");

    // Within the role: GetFunction on itself.
    let me = "/2023-03-30/functions/sts-fn";
    let r = sts_call(&dev, &env, &env.token, Method::GET, me).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // Outside it: deleting itself, reading another function, listing.
    let r = sts_call(&dev, &env, &env.token, Method::DELETE, me).await;
    assert_eq!(
        (r.status.as_u16(), code_of(&r).as_str()),
        (403, "AccessDenied")
    );
    assert!(
        c.get_function("sts-fn").await.is_ok(),
        "refused delete deleted"
    );
    let r = sts_call(
        &dev,
        &env,
        &env.token,
        Method::GET,
        "/2023-03-30/functions/other-fn",
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), code_of(&r).as_str()),
        (403, "AccessDenied")
    );
    let r = sts_call(&dev, &env, &env.token, Method::GET, "/2023-03-30/functions").await;
    assert_eq!(
        (r.status.as_u16(), code_of(&r).as_str()),
        (403, "AccessDenied")
    );
    let r = sts_call(&dev, &env, &env.token, Method::GET, "/2023-03-30/roles").await;
    assert_eq!(
        (r.status.as_u16(), code_of(&r).as_str()),
        (403, "AccessDenied")
    );

    // The same, from inside the instance: the function signs with the
    // credentials of its environment.
    let other = "/2023-03-30/functions/other-fn";
    let answers = from_inside(
        &dev,
        &[
            ("GET", me, "env"),
            ("DELETE", me, "env"),
            ("GET", other, "env"),
            ("GET", me, "headers"),
        ],
    )
    .await;
    let got: Vec<(u16, &str)> = answers.iter().map(|(s, c)| (*s, c.as_str())).collect();
    assert_eq!(
        got,
        [
            (200, ""),
            (403, "AccessDenied"),
            (403, "AccessDenied"),
            (200, "")
        ],
        "inside the role: GetFunction on itself; outside: DeleteFunction, another function"
    );
    assert!(
        c.get_function("sts-fn").await.is_ok(),
        "refused delete from inside deleted"
    );

    // The official Python SDK with the same temporary credentials (it
    // signs x-acs-security-token itself), when a virtualenv with it is given.
    official_sdk_with_sts(&dev, &env);

    // Forged or misused tokens.
    let mut forged = env.token.clone().into_bytes();
    let i = forged.len() - 3;
    forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    let r = sts_call(&dev, &env, &forged, Method::GET, me).await;
    assert_eq!(
        (r.status.as_u16(), code_of(&r).as_str()),
        (403, "InvalidSecurityToken.Malformed")
    );
    let mut wrong_secret = env.clone();
    wrong_secret.secret.push('x');
    let r = sts_call(&dev, &wrong_secret, &env.token, Method::GET, me).await;
    assert_eq!(
        (r.status.as_u16(), code_of(&r).as_str()),
        (403, "SignatureNotMatch")
    );

    // Refresh: before the start's credentials expire, calls carry new ones.
    let deadline = issued_at + Duration::from_secs(LIFETIME_S + 4);
    let fresh = loop {
        let (_, h) = credentials_seen(&dev).await;
        if h.id != env.id {
            break h;
        }
        assert!(
            Instant::now() < deadline,
            "credentials never refreshed\n{}",
            dev.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        issued_at.elapsed() < Duration::from_secs(LIFETIME_S),
        "refreshed only after expiry"
    );
    let r = sts_call(&dev, &fresh, &fresh.token, Method::GET, me).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // A genuine token presented with another key id.
    let r = sts_call(&dev, &fresh, &env.token, Method::GET, me).await;
    assert_eq!(
        (r.status.as_u16(), code_of(&r).as_str()),
        (403, "InvalidSecurityToken.MismatchWithAccessKey")
    );

    // Expiry: the environment's credentials stop working.
    let expiry = issued_at + Duration::from_secs(LIFETIME_S + 1);
    tokio::time::sleep(expiry.saturating_duration_since(Instant::now())).await;
    let r = sts_call(&dev, &env, &env.token, Method::GET, me).await;
    assert_eq!(
        (r.status.as_u16(), code_of(&r).as_str()),
        (403, "InvalidSecurityToken.Expired")
    );
    // From inside: the start's credentials in the environment have
    // expired; the refreshed ones on the call still work.
    let answers = from_inside(&dev, &[("GET", me, "env"), ("GET", me, "headers")]).await;
    let got: Vec<(u16, &str)> = answers.iter().map(|(s, c)| (*s, c.as_str())).collect();
    assert_eq!(
        got,
        [(403, "InvalidSecurityToken.Expired"), (200, "")],
        "after expiry, from inside"
    );

    // Deleting the role revokes what was issued for it.
    let (_, current) = credentials_seen(&dev).await;
    let r = sts_call(&dev, &current, &current.token, Method::GET, me).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = root(
        &dev,
        Method::DELETE,
        "/2023-03-30/roles/self-reader",
        Value::Null,
    )
    .await;
    assert_eq!(r.status, 204);
    let r = sts_call(&dev, &current, &current.token, Method::GET, me).await;
    assert_eq!(
        (r.status.as_u16(), code_of(&r).as_str()),
        (403, "AccessDenied")
    );
}
