//! Custom-container functions end to end on `kiln dev` against a real
//! registry (Debian's `docker-registry` on loopback, TLS from the test's
//! CA, htpasswd basic auth): images the test builds from the `custom`
//! runtime's tree plus a static server, pushed with skopeo, deployed with
//! FC's `customContainerConfig`, invoked, updated to a new tag; two
//! functions on the same base share its unpacked layer; a tampered layer,
//! a registry that is down, bad credentials and an oversized image each
//! give a clear FC error.

mod common;
#[path = "common/registry.rs"]
mod registry;

use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use http::Method;
use serde_json::{json, Value};

use common::Dev;
use registry::{layer, layer_of_dir, write_layout, Layer, Registry};

/// The function: a static server (std only) that reports what it runs as
/// and where, so the test can check the image's config took effect.
const SERVER: &str = r#"
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;

fn esc(s: &str) -> String { s.replace('\\', "\\\\").replace('"', "\\\"") }

fn main() {
    let port = std::env::var("FC_CUSTOM_LISTEN_PORT").unwrap_or_else(|_| "9000".into());
    let l = TcpListener::bind(format!("0.0.0.0:{port}")).unwrap();
    for s in l.incoming().flatten() {
        std::thread::spawn(move || {
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 { return; }
                let mut len = 0usize;
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 { return; }
                    let h = h.trim_end().to_ascii_lowercase();
                    if h.is_empty() { break; }
                    if let Some(v) = h.strip_prefix("content-length:") { len = v.trim().parse().unwrap_or(0); }
                }
                let mut body = vec![0u8; len];
                if r.read_exact(&mut body).is_err() { return; }
                let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
                let uid = status.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(1)).unwrap_or("?").to_string();
                let argv: Vec<String> = std::env::args().map(|a| format!("\"{}\"", esc(&a))).collect();
                let out = format!(
                    "{{\"version\":\"{}\",\"file\":\"{}\",\"argv\":[{}],\"uid\":\"{}\",\"cwd\":\"{}\",\"root_writable\":{},\"tmp_writable\":{},\"code\":{},\"body\":\"{}\"}}",
                    esc(&std::env::var("VERSION").unwrap_or_default()),
                    esc(std::fs::read_to_string("/app/version.txt").unwrap_or_default().trim()),
                    argv.join(","),
                    uid,
                    esc(&std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default()),
                    std::fs::write("/kiln-probe", b"x").is_ok(),
                    std::fs::write("/tmp/kiln-probe", b"x").is_ok(),
                    std::fs::read_dir("/code").map(|d| d.count() > 0).unwrap_or(false),
                    esc(&String::from_utf8_lossy(&body)),
                );
                let head = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", out.len());
                if w.write_all(head.as_bytes()).and_then(|_| w.write_all(out.as_bytes())).is_err() { return; }
            }
        });
    }
}
"#;

fn build_server(dir: &Path) -> Vec<u8> {
    let src = dir.join("server.rs");
    std::fs::write(&src, SERVER).unwrap();
    let out = dir.join("server");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let status = Command::new(rustc)
        .args([
            "-O",
            "-C",
            "target-feature=+crt-static",
            "-C",
            "strip=symbols",
            "-o",
        ])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("run rustc");
    assert!(status.success(), "building the test server failed");
    std::fs::read(out).unwrap()
}

struct Images {
    reg: Registry,
    work: tempfile::TempDir,
    base: Layer,
    server: Vec<u8>,
}

impl Images {
    /// Push `repo:tag`: the base layer and a top layer with the server and
    /// `version.txt`, the config setting `VERSION`, user 1000 and /app.
    fn push(&self, repo: &str, tag: &str, version: &str, extra: Option<Layer>) -> Layer {
        let top = layer(&[
            ("app/server", &self.server, 0o755),
            ("app/version.txt", version.as_bytes(), 0o644),
        ]);
        let mut layers = vec![self.base.clone(), top.clone()];
        layers.extend(extra);
        let dir: PathBuf = self.work.path().join(format!("{repo}-{tag}"));
        write_layout(
            &dir,
            tag,
            &layers,
            json!({
                "Env": ["PATH=/usr/bin:/bin", format!("VERSION={version}")],
                "Entrypoint": ["/app/server"],
                "Cmd": ["--from-image"],
                "WorkingDir": "/app",
                "User": "1000:1000",
            }),
        )
        .unwrap();
        self.reg.push(&dir, repo, tag).unwrap();
        top
    }
}

async fn create(c: &kiln::client::FcClient, name: &str, container: Value) -> (u16, Value) {
    let doc = json!({
        "functionName": name,
        "runtime": "custom-container",
        "handler": "index.handler",
        "memorySize": 256,
        "customContainerConfig": container,
    });
    let r = c
        .request(
            Method::POST,
            "/2023-03-30/functions",
            &[],
            &[],
            Bytes::from(doc.to_string()),
        )
        .await
        .unwrap();
    (r.status.as_u16(), r.json().unwrap_or(Value::Null))
}

fn auth() -> Value {
    json!({"authConfig": {"userName": registry::USER, "password": registry::PASSWORD}})
}

async fn invoke(c: &kiln::client::FcClient, name: &str) -> (u16, Value) {
    let r = c
        .invoke(name, Bytes::from_static(b"ping"), &[])
        .await
        .unwrap();
    let v = r
        .json()
        .unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&r.body)}));
    (r.status.as_u16(), v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_container_functions_pull_verify_share_and_fail_clearly() {
    if common::skip() || common::skip_without(&["docker-registry", "skopeo", "htpasswd"]) {
        return;
    }
    let base_tree = common::rootfs_cache().join("custom");
    if !base_tree.join("etc/passwd").is_file() {
        // `kiln dev` builds it on its first start; this test needs it before.
        let _dev = Dev::start();
    }
    let work = tempfile::tempdir().unwrap();
    let images = Images {
        reg: Registry::start().unwrap(),
        base: layer_of_dir(&base_tree),
        server: build_server(work.path()),
        work,
    };
    let host = images.reg.host();
    images.push("app", "v1", "v1", None);
    images.push("app", "v2", "v2", None);
    images.push("other", "v1", "other", None);
    // An image whose layer is then rewritten in the registry's storage.
    let tampered = images.push("tampered", "v1", "tampered", None);
    {
        let path = images.reg.blob_path(&tampered.digest);
        let mut data = std::fs::read(&path).unwrap();
        let n = data.len();
        data[n / 2] ^= 0xff;
        std::fs::write(&path, data).unwrap();
    }
    // 12 MB that do not compress: over the 8 MB limit the cluster runs with.
    let big: Vec<u8> = (0..12 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    images.push(
        "big",
        "v1",
        "big",
        Some(layer(&[("app/big.bin", &big, 0o644)])),
    );

    let ca = images.reg.ca_pem();
    let dev = Dev::start_with(&[
        "--registry-ca-bundle",
        ca.to_str().unwrap(),
        "--max-image-mb",
        "8",
    ]);
    let c = dev.client();

    // Deploy and invoke: the image's config (entrypoint, Cmd, Env, user,
    // working directory) runs; the root is read-only, /tmp writable, no
    // code package at /code (the base tree has the empty directory).
    let (status, f) = create(
        &c,
        "app",
        json!({"image": format!("{host}/app:v1"), "port": 9000, "registryConfig": auth()}),
    )
    .await;
    assert_eq!(status, 200, "{f}");
    assert_eq!(f["runtime"], "custom-container");
    assert_eq!(
        f["customContainerConfig"]["image"],
        format!("{host}/app:v1")
    );
    assert_eq!(
        f["customContainerConfig"]["registryConfig"]["authConfig"]["userName"],
        registry::USER
    );
    assert!(
        !f.to_string().contains(registry::PASSWORD),
        "the registry password is never returned: {f}"
    );
    let (status, out) = invoke(&c, "app").await;
    assert_eq!(status, 200, "{out}\n{}", dev.log_tail());
    assert_eq!(out["version"], "v1");
    assert_eq!(out["file"], "v1");
    assert_eq!(out["argv"], json!(["/app/server", "--from-image"]));
    assert_eq!(out["uid"], "1000");
    assert_eq!(out["cwd"], "/app");
    assert_eq!(out["root_writable"], false);
    assert_eq!(out["tmp_writable"], true);
    assert_eq!(out["code"], false);
    assert_eq!(out["body"], "ping");

    // No code package to download.
    let r = c
        .request(
            Method::GET,
            "/2023-03-30/functions/app/code",
            &[],
            &[],
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(
        r.status.as_u16(),
        400,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(String::from_utf8_lossy(&r.body).contains("custom-container"));

    // Update to a new tag (and FC's command replacing the image's Cmd):
    // new instances run the new image.
    let r = c
        .request(
            Method::PUT,
            "/2023-03-30/functions/app",
            &[],
            &[],
            Bytes::from(
                json!({"customContainerConfig": {"image": format!("{host}/app:v2"), "command": ["--updated"],
                        "registryConfig": {"authConfig": {"userName": registry::USER}}}})
                .to_string(),
            ),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let (status, out) = invoke(&c, "app").await;
    assert_eq!(status, 200, "{out}\n{}", dev.log_tail());
    assert_eq!(out["version"], "v2", "{out}");
    assert_eq!(out["argv"], json!(["/app/server", "--updated"]));

    // A second function on the same base: the base layer is pulled and
    // unpacked once on the node.
    let (status, f) = create(
        &c,
        "other",
        json!({"image": format!("{host}/other:v1"), "registryConfig": auth()}),
    )
    .await;
    assert_eq!(status, 200, "{f}");
    let (status, out) = invoke(&c, "other").await;
    assert_eq!(status, 200, "{out}\n{}", dev.log_tail());
    assert_eq!(out["version"], "other");
    let log = std::fs::read_to_string(dev.state.path().join("dev.log")).unwrap();
    let base_pulls = log
        .lines()
        .filter(|l| {
            l.contains("image layer pulled and unpacked") && l.contains(&images.base.digest)
        })
        .count();
    assert_eq!(
        base_pulls, 1,
        "the shared base layer was unpacked {base_pulls} times"
    );
    let layer_dirs = find_layer_dirs(dev.state.path());
    let base_hex = images.base.digest.trim_start_matches("sha256:");
    assert_eq!(
        layer_dirs.iter().filter(|d| d.ends_with(base_hex)).count(),
        1,
        "{layer_dirs:?}"
    );
    // base + three top layers (app v1, app v2, other).
    assert_eq!(layer_dirs.len(), 4, "{layer_dirs:?}");
    // The registry password is sealed at rest: not in the gateway's or
    // the scheduler's database files.
    for db in ["gateway/gateway.db", "scheduler/scheduler.db"] {
        let bytes = std::fs::read(dev.state.path().join(db)).unwrap();
        let wal = std::fs::read(dev.state.path().join(format!("{db}-wal"))).unwrap_or_default();
        for data in [bytes, wal] {
            assert!(
                !data
                    .windows(registry::PASSWORD.len())
                    .any(|w| w == registry::PASSWORD.as_bytes()),
                "{db} holds the registry password in plaintext"
            );
        }
    }

    // Concurrent cold starts of one image (two functions) pull it once.
    let conc = images.push("conc", "v1", "conc", None);
    for name in ["conc-a", "conc-b"] {
        let (status, f) = create(
            &c,
            name,
            json!({"image": format!("{host}/conc:v1"), "registryConfig": auth()}),
        )
        .await;
        assert_eq!(status, 200, "{f}");
    }
    let (a, b) = tokio::join!(invoke(&c, "conc-a"), invoke(&c, "conc-b"));
    assert_eq!((a.0, b.0), (200, 200), "{a:?} {b:?}\n{}", dev.log_tail());
    assert_eq!(
        (&a.1["version"], &b.1["version"]),
        (&json!("conc"), &json!("conc"))
    );
    let log = std::fs::read_to_string(dev.state.path().join("dev.log")).unwrap();
    let pulls = log
        .lines()
        .filter(|l| l.contains("image layer pulled and unpacked") && l.contains(&conc.digest))
        .count();
    assert_eq!(
        pulls, 1,
        "concurrent cold starts pulled the layer {pulls} times"
    );

    // Failures, each a clear FC error and nothing cached.
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "tampered",
            json!({"image": format!("{host}/tampered:v1"), "registryConfig": auth()}),
            "failed verification",
        ),
        (
            "down",
            json!({"image": format!("127.0.0.1:{}/app:v1", kiln_test_support::free_port()), "registryConfig": auth()}),
            "Cannot reach registry",
        ),
        (
            "badcreds",
            json!({"image": format!("{host}/app:v1"),
                   "registryConfig": {"authConfig": {"userName": registry::USER, "password": "wrong"}}}),
            "refused the credentials",
        ),
        (
            "big",
            json!({"image": format!("{host}/big:v1"), "registryConfig": auth()}),
            "larger than this node's limit",
        ),
    ];
    for (name, container, says) in cases {
        let (status, f) = create(&c, name, container).await;
        assert_eq!(status, 200, "{name}: {f}");
        let (status, out) = invoke(&c, name).await;
        assert_eq!(status, 502, "{name}: {out}");
        assert_eq!(out["Code"], "FunctionNotStarted", "{name}: {out}");
        let msg = out["Message"].as_str().unwrap_or_default();
        assert!(msg.contains(says), "{name}: {msg}");
        assert!(!msg.contains(registry::PASSWORD), "{name}: {msg}");
    }
    // The official Python SDK, unmodified: its CustomContainerConfig and
    // RegistryConfig models.
    if let Some(python) = kiln_test_support::sdk_python() {
        let out = Command::new(python)
            .arg(common::repo_root().join("tests/sdk/python_sdk_container.py"))
            .arg(&dev.creds_path)
            .arg(format!("{host}/other:v1"))
            .arg(registry::USER)
            .arg(registry::PASSWORD)
            .output()
            .expect("run python_sdk_container.py");
        println!("{}", String::from_utf8_lossy(&out.stdout));
        assert!(
            out.status.success(),
            "the SDK run failed:\n{}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            dev.log_tail()
        );
    }
    // A layer gone from the node (as after an eviction) of an image this
    // node has resolved: the next cold start authenticates and pulls it
    // again.
    let conc_dir = kiln::dev_config::agent_state_dir(dev.state.path())
        .join("images/layers")
        .join(conc.digest.trim_start_matches("sha256:"));
    std::fs::remove_dir_all(&conc_dir).unwrap();
    let (status, f) = create(
        &c,
        "conc-c",
        json!({"image": format!("{host}/conc:v1"), "registryConfig": auth()}),
    )
    .await;
    assert_eq!(status, 200, "{f}");
    let (status, out) = invoke(&c, "conc-c").await;
    assert_eq!(status, 200, "{out}\n{}", dev.log_tail());
    assert!(conc_dir.is_dir());

    // What the pulls and cold starts took, for the record.
    let log = std::fs::read_to_string(dev.state.path().join("dev.log")).unwrap();
    for line in log.lines().filter(|l| {
        l.contains("image ready")
            || l.contains("image layer pulled")
            || l.contains("instance ready")
    }) {
        println!("{line}");
    }
    let tampered_hex = tampered.digest.trim_start_matches("sha256:");
    assert!(
        !find_layer_dirs(dev.state.path())
            .iter()
            .any(|d| d.ends_with(tampered_hex)),
        "a tampered layer must not be kept"
    );
}

/// The agent's unpacked layers (`<agent state>/images/layers/<hex>`).
fn find_layer_dirs(state: &Path) -> Vec<String> {
    let dir = kiln::dev_config::agent_state_dir(state).join("images/layers");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 64)
        .collect()
}
