//! The three services as separate processes on separate addresses, each
//! configured by its own file, doing the whole invoke path.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use kiln::credentials::Credentials;
use kiln_internal_api::{InternalClient, NodeInfo};
use serde_json::{json, Value};

fn service_bin(name: &str) -> PathBuf {
    let dir = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_owned();
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        bin.display()
    );
    bin
}

struct Services {
    children: Vec<Child>,
    prefix: String,
    dir: PathBuf,
}

impl Drop for Services {
    fn drop(&mut self) {
        // The agent first: it removes its sandboxes on shutdown.
        for child in self.children.iter_mut().rev() {
            common::terminate(child, Duration::from_secs(30));
        }
        common::leftovers_cleanup(&self.prefix);
    }
}

impl Services {
    fn check_alive(&mut self) {
        for c in self.children.iter_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                let logs = self.logs();
                panic!("a service exited with {status}\n{logs}");
            }
        }
    }

    fn logs(&self) -> String {
        ["scheduler", "gateway", "agent"]
            .iter()
            .map(|s| {
                let log =
                    std::fs::read_to_string(self.dir.join(format!("{s}.log"))).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                format!(
                    "--- {s}\n{}",
                    lines[lines.len().saturating_sub(30)..].join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn spawn(dir: &Path, name: &str, config: &str) -> Child {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    Command::new(service_bin(&format!("kiln-{name}")))
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start kiln-{name}: {e}"))
}

fn tls(pki: &kiln_pki::DevPki, role: &str) -> String {
    let f = pki.files(role);
    format!(
        "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        f.ca, f.cert, f.key
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_run_as_separate_processes_from_config_files() {
    if common::skip("services_run_as_separate_processes_from_config_files") {
        return;
    }
    let state = tempfile::Builder::new()
        .prefix("kiln-sep-")
        .tempdir()
        .unwrap();
    let dir = state.path();
    let pki = kiln_pki::DevPki::ensure(&dir.join("pki"), &[]).unwrap();
    let (sp, gp, gi, ap) = (
        common::free_port(),
        common::free_port(),
        common::free_port(),
        common::free_port(),
    );
    let prefix = common::run_tag();
    let mut services = Services {
        children: vec![],
        prefix: prefix.clone(),
        dir: dir.to_owned(),
    };
    services.children.push(spawn(
        dir,
        "scheduler",
        &format!(
            "state_dir = {:?}\nlisten = \"127.0.0.1:{sp}\"\n{}",
            dir.join("scheduler"),
            tls(&pki, "scheduler")
        ),
    ));
    let gw = pki.files("gateway");
    services.children.push(spawn(
        dir,
        "gateway",
        &format!(
            "state_dir = {:?}\nregion = \"cn-hangzhou\"\nscheduler_url = \"https://127.0.0.1:{sp}\"\n\
             [public]\nlisten = \"127.0.0.1:{gp}\"\ncert = {:?}\nkey = {:?}\n\
             [internal]\nlisten = \"127.0.0.1:{gi}\"\n{}\
             [[bootstrap_keys]]\naccount_id = \"1200000000000001\"\naccess_key_id = \"LTAIseparate\"\naccess_key_secret = \"separate-secret-0123456789\"\n",
            dir.join("gateway"),
            gw.cert,
            gw.key,
            tls(&pki, "gateway-internal")
        ),
    ));
    services.children.push(spawn(
        dir,
        "agent",
        &format!(
            "state_dir = {:?}\nlisten = \"127.0.0.1:{ap}\"\nscheduler_url = \"https://127.0.0.1:{sp}\"\n\
             gateway_internal_url = \"https://127.0.0.1:{gi}\"\ndrain_on_shutdown = true\n{}\
             [node]\nzone = \"z1\"\ntenancy = \"dedicated\"\nmemory_mb = 4096\ncpu_milli = 16000\nmax_instances = 64\n\
             [sandbox]\nname_prefix = {prefix:?}\ninstance_subnet = {:?}\ncgroup_parent = {prefix:?}\nrootfs_dir = {:?}\n",
            dir.join("agent"),
            tls(&pki, "agent"),
            common::run_subnet(),
            common::rootfs_cache()
        ),
    ));

    // Wait for the agent to register (the first start builds the runtime).
    let internal = InternalClient::new(&pki.files("agent")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let nodes: Result<Vec<NodeInfo>, _> = internal
            .get(
                &format!("https://127.0.0.1:{sp}"),
                kiln_internal_api::paths::SCHEDULER_NODES,
            )
            .await;
        if nodes.is_ok_and(|n| !n.is_empty()) {
            break;
        }
        services.check_alive();
        assert!(
            Instant::now() < deadline,
            "agent never registered\n{}",
            services.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // And for the gateway's public listener.
    while std::net::TcpStream::connect(("127.0.0.1", gp)).is_err() {
        services.check_alive();
        assert!(
            Instant::now() < deadline,
            "gateway never listened\n{}",
            services.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let creds = Credentials {
        endpoint: format!("https://127.0.0.1:{gp}"),
        account_id: "1200000000000001".into(),
        access_key_id: "LTAIseparate".into(),
        access_key_secret: "separate-secret-0123456789".into(),
        ca_cert: pki.ca_cert(),
    };
    let c = kiln::client::FcClient::new(creds.clone()).unwrap();
    let zip = common::example_zip("hello-python");
    c.create_function(&json!({
        "functionName": "sep",
        "runtime": "custom.debian12",
        "handler": "index.handler",
        "customRuntimeConfig": {"command": ["python3", "server.py"]},
        "code": {"zipFile": base64::engine::general_purpose::STANDARD.encode(&zip)},
    }))
    .await
    .unwrap();
    let r = c
        .invoke("sep", Bytes::from_static(b"over the wire"), &[])
        .await
        .unwrap();
    assert_eq!(
        r.status,
        200,
        "{}\n{}",
        String::from_utf8_lossy(&r.body),
        services.logs()
    );
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["echo"], "over the wire");

    // A wrong secret is refused with FC's error and changes nothing.
    let bad = kiln::client::FcClient::new(Credentials {
        access_key_secret: "wrong".into(),
        ..creds
    })
    .unwrap();
    let r = bad
        .request(
            http::Method::DELETE,
            "/2023-03-30/functions/sep",
            &[],
            &[],
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    let e: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(e["Code"], "SignatureNotMatch");
    c.get_function("sep").await.unwrap();
}
