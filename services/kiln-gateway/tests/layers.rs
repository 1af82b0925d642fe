//! FC's layer API and the runtime end-of-support stages, against the real
//! gateway on loopback (DevPki in a tempdir, a manual clock), driven with
//! signed requests. No scheduler runs: what is checked here is decided by
//! the gateway before any instance is asked for.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::Method;
use kiln_core::ManualClock;
use kiln_gateway::runtimes::RuntimeLifecycleConfig;
use kiln_gateway::{GatewayConfig, GatewayHandle};
use kiln_pki::DevPki;
use serde_json::{json, Value};

/// 2030-01-01T00:00:00Z.
const JAN1_2030: u64 = 1_893_456_000_000;
const DAY: Duration = Duration::from_secs(86_400);

struct Env {
    _dir: tempfile::TempDir,
    state_dir: std::path::PathBuf,
    pki: DevPki,
    clock: ManualClock,
    gateway: Option<GatewayHandle>,
}

fn config(
    state_dir: &std::path::Path,
    pki: &DevPki,
    runtimes: Vec<RuntimeLifecycleConfig>,
) -> GatewayConfig {
    let public = pki.files("gateway");
    let internal = pki.files("gateway-internal");
    // Through serde, so settings this test does not care about keep their
    // defaults.
    serde_json::from_value(json!({
        "state_dir": state_dir,
        "region": "cn-test",
        // Nothing listens there: a call that gets past the gateway's own
        // checks fails reaching the scheduler.
        "scheduler_url": "https://127.0.0.1:1",
        "public": {"listen": "127.0.0.1:0", "cert": public.cert, "key": public.key},
        "internal": {"listen": "127.0.0.1:0"},
        "tls": {"ca": internal.ca, "cert": internal.cert, "key": internal.key},
        "lease_hold_ms": 0,
        "runtimes": runtimes,
        "bootstrap_keys": [
            {"account_id": ACCOUNT_A, "access_key_id": AK_A, "access_key_secret": SK_A},
            {"account_id": ACCOUNT_B, "access_key_id": AK_B, "access_key_secret": SK_B},
        ],
    }))
    .unwrap()
}

impl Env {
    async fn new(runtimes: Vec<RuntimeLifecycleConfig>) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
        let state_dir = dir.path().join("gateway");
        let clock = ManualClock::new(JAN1_2030 - 10 * DAY.as_millis() as u64);
        let gateway = kiln_gateway::start_with_clock(
            config(&state_dir, &pki, runtimes),
            Arc::new(clock.clone()),
        )
        .await
        .unwrap();
        Env {
            _dir: dir,
            state_dir,
            pki,
            clock,
            gateway: Some(gateway),
        }
    }

    async fn restart(&mut self) {
        self.gateway.take().unwrap().shutdown().await;
        let g = kiln_gateway::start_with_clock(
            config(&self.state_dir, &self.pki, vec![]),
            Arc::new(self.clock.clone()),
        )
        .await
        .unwrap();
        self.gateway = Some(g);
    }

    fn client(&self, ak: &'static str, sk: &'static str) -> Api {
        let addr = self.gateway.as_ref().unwrap().public_addr();
        Api::new(&self.pki, addr, ak, sk, false).with_clock(Arc::new(self.clock.clone()))
    }

    fn zip_file(&self, sha256: &str) -> std::path::PathBuf {
        self.state_dir.join("code").join(format!("{sha256}.zip"))
    }
}

impl Api {
    async fn get(&self, path: &str) -> Answer {
        self.call_with(Method::GET, path, vec![], &[]).await
    }

    async fn create_layer(&self, name: &str, doc: &Value) -> Answer {
        self.call_with(
            Method::POST,
            &format!("/2023-03-30/layers/{name}/versions"),
            doc.to_string().into_bytes(),
            &[],
        )
        .await
    }

    async fn create_function(&self, doc: &Value) -> Answer {
        self.call_with(
            Method::POST,
            "/2023-03-30/functions",
            doc.to_string().into_bytes(),
            &[],
        )
        .await
    }

    async fn update_function(&self, name: &str, doc: &Value) -> Answer {
        self.call_with(
            Method::PUT,
            &format!("/2023-03-30/functions/{name}"),
            doc.to_string().into_bytes(),
            &[],
        )
        .await
    }

    async fn invoke(&self, name: &str, headers: &[(&str, &str)]) -> Answer {
        self.call_with(
            Method::POST,
            &format!("/2023-03-30/functions/{name}/invocations"),
            b"{}".to_vec(),
            headers,
        )
        .await
    }
}

/// Layer files are data, not programs.
fn zip_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    zip_with_mode(files, 0o644)
}

fn layer_doc(files: &[(&str, &[u8])]) -> Value {
    json!({
        "code": {"zipFile": b64(&zip_of(files))},
        "compatibleRuntime": ["custom.debian12", "custom"],
        "description": "shared files",
        "license": "MIT",
    })
}

fn function_doc(name: &str, runtime: &str, layers: &[&str]) -> Value {
    json!({
        "functionName": name,
        "runtime": runtime,
        "handler": "index.handler",
        "code": {"zipFile": b64(&zip_of(&[("app.py", b"print('hi')\n")]))},
        "layers": layers,
    })
}

fn encode(arn: &str) -> String {
    percent_encoding::utf8_percent_encode(arn, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[tokio::test]
async fn layer_versions_listing_acl_and_references() {
    let env = Env::new(vec![]).await;
    let a = env.client(AK_A, SK_A);
    let b = env.client(AK_B, SK_B);

    // Versions are numbered 1, 2, ... with FC's ARN.
    let v1 = a
        .create_layer("lib", &layer_doc(&[("python/x.py", b"one")]))
        .await
        .ok();
    assert_eq!(v1["version"], 1);
    assert_eq!(v1["layerName"], "lib");
    assert_eq!(v1["acl"], "0");
    assert_eq!(
        v1["layerVersionArn"],
        format!("acs:fc:cn-test:{ACCOUNT_A}:layers/lib/versions/1")
    );
    assert_eq!(
        v1["compatibleRuntime"],
        json!(["custom.debian12", "custom"])
    );
    assert!(v1["codeSize"].as_u64().unwrap() > 0);
    assert!(!v1["codeChecksum"].as_str().unwrap().is_empty());
    let v2 = a
        .create_layer("lib", &layer_doc(&[("python/x.py", b"two")]))
        .await
        .ok();
    assert_eq!(v2["version"], 2);
    let other = a
        .create_layer("other", &layer_doc(&[("o", b"o")]))
        .await
        .ok();
    let other_arn = other["layerVersionArn"].as_str().unwrap().to_owned();
    let arn1 = v1["layerVersionArn"].as_str().unwrap().to_owned();
    let arn2 = v2["layerVersionArn"].as_str().unwrap().to_owned();

    let got = a.get("/2023-03-30/layers/lib/versions/2").await.ok();
    assert_eq!(got["layerVersionArn"], arn2.as_str());
    let got = a
        .get(&format!("/2023-03-30/layerarn/{}", encode(&arn1)))
        .await
        .ok();
    assert_eq!(got["version"], 1);
    let page = a.get("/2023-03-30/layers/lib/versions?limit=1").await.ok();
    assert_eq!(page["layers"].as_array().unwrap().len(), 1);
    assert_eq!(page["nextVersion"], 2);
    let page = a
        .get("/2023-03-30/layers/lib/versions?startVersion=2")
        .await
        .ok();
    assert_eq!(page["layers"][0]["version"], 2);
    assert!(page.get("nextVersion").is_none());

    // ListLayers: latest version of each, prefix, paging, filters.
    let l = a.get("/2023-03-30/layers").await.ok();
    let names: Vec<_> = l["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["layerName"].clone())
        .collect();
    assert_eq!(names, vec![json!("lib"), json!("other")]);
    assert_eq!(l["layers"][0]["version"], 2);
    let l = a.get("/2023-03-30/layers?limit=1").await.ok();
    let token = l["nextToken"].as_str().unwrap().to_owned();
    let l = a
        .get(&format!("/2023-03-30/layers?limit=1&nextToken={token}"))
        .await
        .ok();
    assert_eq!(l["layers"][0]["layerName"], "other");
    let l = a.get("/2023-03-30/layers?prefix=oth").await.ok();
    assert_eq!(l["layers"].as_array().unwrap().len(), 1);
    let l = a.get("/2023-03-30/layers?public=true").await.ok();
    assert!(l["layers"].as_array().unwrap().is_empty());
    let l = a.get("/2023-03-30/layers?official=true").await.ok();
    assert!(l["layers"].as_array().unwrap().is_empty());
    let l = b.get("/2023-03-30/layers").await.ok();
    assert!(l["layers"].as_array().unwrap().is_empty());

    // Another account's private layer is as absent as a missing one.
    b.get(&format!("/2023-03-30/layerarn/{}", encode(&arn1)))
        .await
        .fc_error(404, "LayerNotFound");
    let msg = b
        .create_function(&function_doc("fb", "custom.debian12", &[&arn1]))
        .await
        .fc_error(400, "InvalidArgument");
    assert!(msg.contains("layers"), "{msg}");
    b.get("/2023-03-30/functions/fb")
        .await
        .fc_error(404, "FunctionNotFound");

    // Public: B may read and use it; A's listing shows it as public.
    a.call_with(
        Method::PUT,
        "/2023-03-30/layers/lib/acl?public=true",
        vec![],
        &[],
    )
    .await
    .ok();
    let got = b
        .get(&format!("/2023-03-30/layerarn/{}", encode(&arn1)))
        .await
        .ok();
    assert_eq!(got["acl"], "1");
    let f = b
        .create_function(&function_doc("fb", "custom.debian12", &[&arn1]))
        .await
        .ok();
    assert_eq!(f["layers"][0]["arn"], arn1.as_str());
    assert_eq!(f["layers"][0]["size"], v1["codeSize"]);
    // Two versions of one layer on a function are refused.
    let msg = b
        .create_function(&function_doc("fb2", "custom.debian12", &[&arn2, &arn1]))
        .await
        .fc_error(400, "InvalidArgument");
    assert!(msg.contains("more than once"), "{msg}");
    let l = a.get("/2023-03-30/layers?public=true").await.ok();
    assert_eq!(l["layers"][0]["layerName"], "lib");
    // B still cannot change A's layer.
    b.call_with(Method::PUT, "/2023-03-30/layers/lib/acl?acl=0", vec![], &[])
        .await
        .fc_error(404, "LayerNotFound");
    b.call_with(
        Method::DELETE,
        "/2023-03-30/layers/lib/versions/1",
        vec![],
        &[],
    )
    .await
    .fc_error(404, "LayerNotFound");
    // Private again: existing users keep it, new references are refused.
    a.call_with(Method::PUT, "/2023-03-30/layers/lib/acl?acl=0", vec![], &[])
        .await
        .ok();
    b.create_function(&function_doc("fb2", "custom.debian12", &[&arn1]))
        .await
        .fc_error(400, "InvalidArgument");
    b.get("/2023-03-30/functions/fb").await.ok();

    // Deleting a version in use (allowed, as in FC): the function keeps
    // its layer and the zip stays; the version is gone for new uses.
    let fa = a
        .create_function(&function_doc("fa", "custom", &[&other_arn, &arn1]))
        .await
        .ok();
    assert_eq!(fa["layers"][0]["arn"], other_arn.as_str());
    assert_eq!(fa["layers"][1]["arn"], arn1.as_str());
    let digest1 = {
        let zip = zip_of(&[("python/x.py", b"one")]);
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&zip))
    };
    assert!(env.zip_file(&digest1).exists());
    a.call_with(
        Method::DELETE,
        "/2023-03-30/layers/lib/versions/1",
        vec![],
        &[],
    )
    .await
    .ok();
    a.get("/2023-03-30/layers/lib/versions/1")
        .await
        .fc_error(404, "LayerNotFound");
    assert!(env.zip_file(&digest1).exists(), "zip kept for fa and fb");
    let msg = a
        .create_function(&function_doc("fc", "custom", &[&arn1]))
        .await
        .fc_error(400, "InvalidArgument");
    assert!(msg.contains("does not exist"), "{msg}");
    // An update that does not touch layers keeps them.
    let u = a
        .update_function("fa", &json!({"description": "still layered"}))
        .await
        .ok();
    assert_eq!(u["layers"][1]["arn"], arn1.as_str());
    a.call_with(Method::DELETE, "/2023-03-30/functions/fa", vec![], &[])
        .await
        .ok();
    assert!(env.zip_file(&digest1).exists(), "fb still uses it");
    let u = b.update_function("fb", &json!({"layers": []})).await.ok();
    assert!(u.get("layers").is_none(), "{u}");
    assert!(!env.zip_file(&digest1).exists(), "last user gone");
    // Version numbers are never reused.
    let v3 = a
        .create_layer("lib", &layer_doc(&[("python/x.py", b"three")]))
        .await
        .ok();
    assert_eq!(v3["version"], 3);
}

#[tokio::test]
async fn bad_layer_input_is_refused_and_changes_nothing() {
    let env = Env::new(vec![]).await;
    let a = env.client(AK_A, SK_A);
    let v1 = a.create_layer("lib", &layer_doc(&[("f", b"1")])).await.ok();
    let arn1 = v1["layerVersionArn"].as_str().unwrap().to_owned();
    let versions = || async {
        a.get("/2023-03-30/layers/lib/versions").await.ok()["layers"]
            .as_array()
            .unwrap()
            .len()
    };

    // Oversize zip: FC's EntityTooLarge, nothing stored.
    let big = "A".repeat(kiln_core::limits::CODE_ZIP_MAX.div_ceil(3) * 4 + 8);
    let mut doc = layer_doc(&[]);
    doc["code"]["zipFile"] = json!(big);
    a.create_layer("lib", &doc)
        .await
        .fc_error(400, "EntityTooLarge");
    drop(doc);
    assert_eq!(versions().await, 1);
    let files = std::fs::read_dir(env.state_dir.join("code"))
        .unwrap()
        .count();

    for (name, doc, code, status) in [
        (
            "lib",
            json!({"code": {"zipFile": "%%%"}, "compatibleRuntime": ["custom"]}),
            "InvalidArgument",
            400,
        ),
        (
            "lib",
            json!({"code": {"zipFile": b64(b"not a zip")}, "compatibleRuntime": ["custom"]}),
            "InvalidArgument",
            400,
        ),
        (
            "lib",
            json!({"code": {"zipFile": b64(&zip_of(&[("f", b"x")]))}}),
            "InvalidArgument",
            400,
        ),
        (
            "lib",
            json!({"code": {"zipFile": b64(&zip_of(&[("f", b"x")]))}, "compatibleRuntime": ["python3.10"]}),
            "InvalidArgument",
            400,
        ),
        (
            "lib",
            json!({"compatibleRuntime": ["custom"]}),
            "InvalidArgument",
            400,
        ),
        (
            "lib",
            json!({"code": {"zipFile": b64(&zip_of(&[("../x", b"x")]))}, "compatibleRuntime": ["custom"]}),
            "InvalidArgument",
            400,
        ),
        ("1bad", layer_doc(&[("f", b"x")]), "InvalidArgument", 400),
        ("lib", json!([1]), "InvalidArgument", 400),
    ] {
        let r = a.create_layer(name, &doc).await;
        r.fc_error(status, code);
    }
    assert_eq!(versions().await, 1);
    assert_eq!(
        std::fs::read_dir(env.state_dir.join("code"))
            .unwrap()
            .count(),
        files
    );

    // Bad references on a function: nothing is created.
    let too_many: Vec<String> = (0..6).map(|_| arn1.clone()).collect();
    let too_many: Vec<&str> = too_many.iter().map(String::as_str).collect();
    for (layers, needle) in [
        (vec!["not-an-arn"], "malformed"),
        (
            vec!["acs:fc:cn-test:1000000000000001:layers/lib/versions/x"],
            "malformed",
        ),
        (
            vec!["acs:fc:cn-test:1000000000000001:layers/lib/versions/9"],
            "does not exist",
        ),
        (
            vec!["acs:fc:cn-test:1000000000000001:layers/nope/versions/1"],
            "does not exist",
        ),
        (
            vec!["acs:fc:other-region:1000000000000001:layers/lib/versions/1"],
            "does not exist",
        ),
        (vec![arn1.as_str(), arn1.as_str()], "more than once"),
        (too_many, "at most 5"),
    ] {
        let msg = a
            .create_function(&function_doc("f", "custom", &layers))
            .await
            .fc_error(400, "InvalidArgument");
        assert!(msg.contains(needle), "{layers:?}: {msg}");
    }
    a.get("/2023-03-30/functions/f")
        .await
        .fc_error(404, "FunctionNotFound");
    // A layer that does not list the runtime, FC's message.
    let only_custom =
        json!({"code": {"zipFile": b64(&zip_of(&[("g", b"g")]))}, "compatibleRuntime": ["custom"]});
    let c = a.create_layer("customonly", &only_custom).await.ok();
    let carn = c["layerVersionArn"].as_str().unwrap();
    let msg = a
        .create_function(&function_doc("f", "custom.debian12", &[carn]))
        .await
        .fc_error(400, "InvalidArgument");
    assert!(
        msg.contains("runtime: custom.debian12 is not supported by layer:"),
        "{msg}"
    );
    // An update with a bad reference changes nothing.
    a.create_function(&function_doc("f", "custom", &[&arn1]))
        .await
        .ok();
    a.update_function("f", &json!({"layers": ["bad"], "description": "changed"}))
        .await
        .fc_error(400, "InvalidArgument");
    let f = a.get("/2023-03-30/functions/f").await.ok();
    assert_eq!(f["layers"][0]["arn"], arn1.as_str());
    assert_ne!(f["description"], "changed");

    // Bad paths and parameters.
    a.get("/2023-03-30/layers/lib/versions/0")
        .await
        .fc_error(400, "InvalidArgument");
    a.get("/2023-03-30/layers/lib/versions/abc")
        .await
        .fc_error(400, "InvalidArgument");
    a.get("/2023-03-30/layers/lib/versions/7")
        .await
        .fc_error(404, "LayerNotFound");
    a.get("/2023-03-30/layerarn/nonsense")
        .await
        .fc_error(400, "InvalidArgument");
    a.get("/2023-03-30/layers?limit=0")
        .await
        .fc_error(400, "InvalidArgument");
    a.get("/2023-03-30/layers?nextToken=%21%21")
        .await
        .fc_error(400, "InvalidArgument");
    a.get("/2023-03-30/layers?public=maybe")
        .await
        .fc_error(400, "InvalidArgument");
    a.call_with(Method::PUT, "/2023-03-30/layers/lib/acl", vec![], &[])
        .await
        .fc_error(400, "InvalidArgument");
    a.call_with(Method::PUT, "/2023-03-30/layers/lib/acl?acl=2", vec![], &[])
        .await
        .fc_error(400, "InvalidArgument");
    a.call_with(
        Method::PUT,
        "/2023-03-30/layers/nope/acl?acl=1",
        vec![],
        &[],
    )
    .await
    .fc_error(404, "LayerNotFound");
    a.call_with(
        Method::DELETE,
        "/2023-03-30/layers/lib/versions/7",
        vec![],
        &[],
    )
    .await
    .fc_error(404, "LayerNotFound");
    let got = a.get("/2023-03-30/layers/lib/versions/1").await.ok();
    assert_eq!(got["acl"], "0");
}

#[tokio::test]
async fn layers_survive_a_restart() {
    let mut env = Env::new(vec![]).await;
    let a = env.client(AK_A, SK_A);
    let v = a.create_layer("lib", &layer_doc(&[("f", b"1")])).await.ok();
    a.call_with(Method::PUT, "/2023-03-30/layers/lib/acl?acl=1", vec![], &[])
        .await
        .ok();
    a.call_with(
        Method::DELETE,
        "/2023-03-30/layers/lib/versions/1",
        vec![],
        &[],
    )
    .await
    .ok();
    let arn = v["layerVersionArn"].as_str().unwrap().to_owned();
    drop(a);
    env.restart().await;
    let a = env.client(AK_A, SK_A);
    a.get(&format!("/2023-03-30/layerarn/{}", encode(&arn)))
        .await
        .fc_error(404, "LayerNotFound");
    let v2 = a.create_layer("lib", &layer_doc(&[("f", b"2")])).await.ok();
    assert_eq!(v2["version"], 2, "numbers are not reused after a restart");
    assert_eq!(v2["acl"], "1", "the ACL persisted");
}

#[tokio::test]
async fn runtime_end_of_support_stages_each_refuse_one_more_thing() {
    let env = Env::new(vec![RuntimeLifecycleConfig {
        name: "custom.debian12".into(),
        deprecation_date: Some("2030-01-01".into()),
        block_update_date: Some("2030-02-01".into()),
        end_of_life_date: Some("2030-03-01".into()),
    }])
    .await;
    let a = env.client(AK_A, SK_A);
    let status = || async {
        let l = a.get("/2023-03-30/runtimes").await.ok();
        let r = l["runtimes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["runtime"] == "custom.debian12")
            .unwrap()
            .clone();
        assert_eq!(r["deprecationDate"], "2030-01-01");
        assert_eq!(r["endOfLifeDate"], "2030-03-01");
        let custom = l["runtimes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["runtime"] == "custom")
            .unwrap()
            .clone();
        assert_eq!(custom["status"], "Active");
        r["status"].as_str().unwrap().to_owned()
    };
    // Past the runtime checks a call fails reaching the (absent) scheduler.
    let not_refused_for_runtime = |r: &Answer| {
        assert_ne!(
            r.status.as_u16(),
            400,
            "{:?}",
            String::from_utf8_lossy(&r.body)
        );
    };

    assert_eq!(status().await, "Active");
    a.create_function(&function_doc("old", "custom.debian12", &[]))
        .await
        .ok();
    a.create_function(&function_doc("mover", "custom.debian12", &[]))
        .await
        .ok();

    // Stage 1: no new functions; updates and calls still work.
    env.clock.set(JAN1_2030);
    assert_eq!(status().await, "Deprecated");
    let msg = a
        .create_function(&function_doc("new", "custom.debian12", &[]))
        .await
        .fc_error(400, "InvalidArgument");
    assert!(
        msg.contains("custom.debian12")
            && msg.contains("2030-01-01")
            && msg.contains("2030-02-01")
            && msg.contains("2030-03-01"),
        "{msg}"
    );
    a.get("/2023-03-30/functions/new")
        .await
        .fc_error(404, "FunctionNotFound");
    a.create_function(&function_doc("new", "custom", &[]))
        .await
        .ok();
    // Moving a function onto a deprecated runtime counts as a new use.
    a.update_function("new", &json!({"runtime": "custom.debian12"}))
        .await
        .fc_error(400, "InvalidArgument");
    a.update_function("old", &json!({"description": "still updatable"}))
        .await
        .ok();
    not_refused_for_runtime(&a.invoke("old", &[]).await);

    // Stage 2: no updates (moving off the runtime is the way out).
    env.clock.set(JAN1_2030 + 31 * DAY.as_millis() as u64);
    assert_eq!(status().await, "UpdateBlocked");
    let msg = a
        .update_function("old", &json!({"description": "x"}))
        .await
        .fc_error(400, "InvalidArgument");
    assert!(
        msg.contains("custom.debian12") && msg.contains("updated"),
        "{msg}"
    );
    assert_eq!(
        a.get("/2023-03-30/functions/old").await.ok()["description"],
        "still updatable"
    );
    a.update_function("mover", &json!({"runtime": "custom"}))
        .await
        .ok();
    not_refused_for_runtime(&a.invoke("old", &[]).await);

    // Stage 3: no invocations, sync or async.
    env.clock.set(JAN1_2030 + 59 * DAY.as_millis() as u64);
    assert_eq!(status().await, "EndOfLife");
    let msg = a.invoke("old", &[]).await.fc_error(400, "InvalidArgument");
    assert!(
        msg.contains("custom.debian12") && msg.contains("invoked"),
        "{msg}"
    );
    a.invoke("old", &[("x-fc-invocation-type", "Async")])
        .await
        .fc_error(400, "InvalidArgument");
    not_refused_for_runtime(&a.invoke("mover", &[]).await);
    // Reads and deletes still work.
    a.get("/2023-03-30/functions/old").await.ok();
    a.call_with(Method::DELETE, "/2023-03-30/functions/old", vec![], &[])
        .await
        .ok();
}
