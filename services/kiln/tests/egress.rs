//! A function's egress mode takes effect end to end: gateway, scheduler and
//! an agent with `[sandbox.network]` run (as separate processes) inside a
//! network namespace this test creates, whose uplink leads to a fake
//! "internet" host in a second namespace. A function with FC's default
//! (internet access) reaches that host through the agent's NAT; one with
//! `internetAccess: false` cannot. Nothing is created outside the two
//! namespaces and the run's prefix; all of it goes when the test ends.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use kiln::credentials::Credentials;
use kiln_internal_api::{InternalClient, NodeInfo};
use serde_json::{json, Value};

/// The fake internet host, the node's uplink address and its port.
const INTERNET: &str = "198.18.0.2";
const NODE_UPLINK: &str = "198.18.0.1";
const INTERNET_PORT: u16 = 8080;

/// A function that tries a TCP connection to `{host, port}` and says
/// whether it got an HTTP answer.
const PROBE: &str = r#"
import json, socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        n = int(self.headers.get("content-length", 0))
        req = json.loads(self.rfile.read(n) or b"{}")
        try:
            with socket.create_connection((req["host"], req["port"]), timeout=3) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                data = s.recv(64).decode(errors="replace")
            out = {"reached": data.startswith("HTTP/"), "data": data}
        except Exception as e:
            out = {"reached": False, "error": str(e)}
        body = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

ThreadingHTTPServer(("0.0.0.0", 9000), H).serve_forever()
"#;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Run `f` on a thread inside network namespace `ns`: every socket it
/// opens lives there.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let file = std::fs::File::open(Path::new("/run/netns").join(ns)).expect("open netns");
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("netns thread")
    })
}

/// `nsenter --net=<ns> <program> args...`, logging to `dir/<name>.log`.
fn spawn_in(
    dir: &Path,
    ns: &str,
    name: &str,
    program: &Path,
    args: &[&str],
) -> std::process::Child {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .arg(program)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"))
}

fn spawn_service_in(dir: &Path, ns: &str, name: &str, config: &str) -> std::process::Child {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    let bin = common::service_bin(&format!("kiln-{name}"));
    spawn_in(dir, ns, name, &bin, &["--config", path.to_str().unwrap()])
}

#[test]
fn egress_modes_take_effect_through_the_agent() {
    if common::skip() || common::skip_without(&["nft", "tc", "nsenter", "python3"]) {
        return;
    }
    let state = tempfile::Builder::new()
        .prefix("kiln-egress-")
        .tempdir()
        .unwrap();
    let dir = state.path();
    let prefix = common::run_tag();
    let (node, inet) = (format!("{prefix}node"), format!("{prefix}inet"));
    // Dropped first on failure: stops the services, then removes every
    // namespace (and with them every link and table in them) and cgroup
    // carrying the prefix.
    let mut services = common::Services {
        children: vec![],
        prefix: prefix.clone(),
        dir: dir.to_owned(),
        names: vec![
            "internet".into(),
            "scheduler".into(),
            "gateway".into(),
            "agent".into(),
        ],
    };

    // The node and its "internet": a veth between two namespaces.
    let (up, up_peer) = (format!("{prefix}up"), format!("{prefix}upi"));
    ip(&["netns", "add", &node]);
    ip(&["netns", "add", &inet]);
    ip(&[
        "link", "add", &up, "netns", &node, "type", "veth", "peer", "name", &up_peer, "netns",
        &inet,
    ]);
    for (ns, dev, addr) in [(&node, &up, NODE_UPLINK), (&inet, &up_peer, INTERNET)] {
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
        ip(&["-n", ns, "link", "set", dev, "up"]);
    }
    let www = dir.join("www");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello from the internet\n").unwrap();
    services.children.push(spawn_in(
        dir,
        &inet,
        "internet",
        Path::new("/usr/bin/env"),
        &[
            "python3",
            "-m",
            "http.server",
            &INTERNET_PORT.to_string(),
            "--bind",
            INTERNET,
            "--directory",
            www.to_str().unwrap(),
        ],
    ));

    // The three services inside the node's namespace.
    let pki = kiln_pki::DevPki::ensure(&dir.join("pki"), &[]).unwrap();
    let (sp, gp, gi, ap) = (17101, 17102, 17103, 17104);
    services.children.push(spawn_service_in(
        dir,
        &node,
        "scheduler",
        &format!(
            "state_dir = {:?}\nlisten = \"127.0.0.1:{sp}\"\n{}",
            dir.join("scheduler"),
            common::tls_table(&pki, "scheduler")
        ),
    ));
    let gw = pki.files("gateway");
    services.children.push(spawn_service_in(
        dir,
        &node,
        "gateway",
        &format!(
            "state_dir = {:?}\nregion = \"cn-hangzhou\"\nscheduler_url = \"https://127.0.0.1:{sp}\"\n\
             [public]\nlisten = \"127.0.0.1:{gp}\"\ncert = {:?}\nkey = {:?}\n\
             [internal]\nlisten = \"127.0.0.1:{gi}\"\n{}\
             [[bootstrap_keys]]\naccount_id = \"1200000000000001\"\naccess_key_id = \"LTAIegress\"\naccess_key_secret = \"egress-secret-0123456789\"\n",
            dir.join("gateway"),
            gw.cert,
            gw.key,
            common::tls_table(&pki, "gateway-internal")
        ),
    ));
    services.children.push(spawn_service_in(
        dir,
        &node,
        "agent",
        &format!(
            "state_dir = {:?}\nlisten = \"127.0.0.1:{ap}\"\nscheduler_url = \"https://127.0.0.1:{sp}\"\n\
             gateway_internal_url = \"https://127.0.0.1:{gi}\"\ndrain_on_shutdown = true\n{}\
             [node]\nzone = \"z1\"\ntenancy = \"dedicated\"\nmemory_mb = 4096\ncpu_milli = 16000\nmax_instances = 64\n\
             [sandbox]\nname_prefix = {prefix:?}\ninstance_subnet = {:?}\ncgroup_parent = {prefix:?}\nrootfs_dir = {:?}\n\
             [sandbox.network]\nuplink_interface = {up:?}\nstandard_bandwidth_mbit = 100\nperformance_bandwidth_mbit = 500\n",
            dir.join("agent"),
            common::tls_table(&pki, "agent"),
            common::run_subnet(),
            common::rootfs_cache()
        ),
    ));

    let code = dir.join("probe");
    std::fs::create_dir(&code).unwrap();
    std::fs::write(code.join("server.py"), PROBE).unwrap();
    let zip =
        base64::engine::general_purpose::STANDARD.encode(kiln::zipdir::zip_dir(&code).unwrap());
    let ca = pki.ca_cert();
    let operator_files = pki.files("operator");

    let results = in_netns(&node, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                // The agent registers once its runtime is ready.
                let internal = InternalClient::new(&operator_files).unwrap();
                let deadline = Instant::now() + Duration::from_secs(90);
                loop {
                    let nodes: Result<Vec<NodeInfo>, _> = internal
                        .get(
                            &format!("https://127.0.0.1:{sp}"),
                            kiln_internal_api::paths::SCHEDULER_NODES,
                        )
                        .await;
                    if nodes.is_ok_and(|n| !n.is_empty())
                        && std::net::TcpStream::connect(("127.0.0.1", gp)).is_ok()
                    {
                        break;
                    }
                    if Instant::now() > deadline {
                        return Err("the agent never registered".to_owned());
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                let c = kiln::client::FcClient::new(Credentials {
                    endpoint: format!("https://127.0.0.1:{gp}"),
                    account_id: "1200000000000001".into(),
                    access_key_id: "LTAIegress".into(),
                    access_key_secret: "egress-secret-0123456789".into(),
                    ca_cert: ca,
                })
                .unwrap();
                let mut results = Vec::new();
                for (name, extra) in [
                    ("egress-internet", json!({})),
                    ("egress-none", json!({"internetAccess": false})),
                ] {
                    let mut body = json!({
                        "functionName": name,
                        "runtime": "custom.debian12",
                        "handler": "index.handler",
                        "timeout": 30,
                        "customRuntimeConfig": {"command": ["python3", "server.py"]},
                        "code": {"zipFile": zip},
                    });
                    body.as_object_mut()
                        .unwrap()
                        .extend(extra.as_object().unwrap().clone());
                    c.create_function(&body)
                        .await
                        .map_err(|e| format!("create {name}: {e}"))?;
                    let got = c.get_function(name).await.map_err(|e| e.to_string())?;
                    let probe = json!({"host": INTERNET, "port": INTERNET_PORT}).to_string();
                    let r = c
                        .invoke(name, Bytes::from(probe), &[])
                        .await
                        .map_err(|e| format!("invoke {name}: {e}"))?;
                    if r.status != 200 {
                        return Err(format!(
                            "invoke {name}: {} {}",
                            r.status,
                            String::from_utf8_lossy(&r.body)
                        ));
                    }
                    let out: Value = serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
                    results.push((name, got, out));
                }
                Ok(results)
            })
    });
    let results = results.unwrap_or_else(|e| panic!("{e}\n{}", services.logs()));
    for (name, _, out) in &results {
        eprintln!("{name}: {out}");
    }
    let (_, internet_fn, internet) = &results[0];
    let (_, none_fn, none) = &results[1];
    assert_eq!(internet_fn["internetAccess"], json!(true), "FC's default");
    assert_eq!(none_fn["internetAccess"], json!(false));
    assert_eq!(
        internet["reached"],
        json!(true),
        "an internet function reaches the internet host: {internet}\n{}",
        services.logs()
    );
    assert_eq!(
        none["reached"],
        json!(false),
        "a function without internet access does not: {none}"
    );
    // The agent's isolation lives in the node's namespace, in its own table.
    let tables = Command::new("ip")
        .args(["netns", "exec", &node, "nft", "list", "tables"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&tables.stdout).contains(&format!("inet {prefix}")),
        "{}",
        String::from_utf8_lossy(&tables.stdout)
    );
    // Each instance's veth is shaped at the standard rate.
    let qdiscs = Command::new("ip")
        .args(["netns", "exec", &node, "tc", "qdisc", "show"])
        .output()
        .unwrap();
    let qdiscs = String::from_utf8_lossy(&qdiscs.stdout);
    assert!(
        qdiscs.lines().any(|l| l.contains(&format!("dev {prefix}-"))
            && l.contains("tbf")
            && l.contains("100Mbit")),
        "{qdiscs}"
    );
    drop(services);
    assert!(common::netns_with_prefix(&prefix).is_empty());
}
