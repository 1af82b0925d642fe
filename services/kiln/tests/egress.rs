//! A function's egress mode takes effect end to end: gateway, scheduler and
//! an agent with `[sandbox.network]` run (as separate processes, configured
//! as `kiln dev` configures them: network isolation on, the gateway's
//! public port the one node port instances may reach) inside a network
//! namespace this test creates. Its uplink leads to an "uplink" namespace
//! that holds a public-looking internet host and every address an
//! instance with internet access must not reach: the cloud metadata
//! address, private (RFC 1918) and CGNAT addresses, a public host the
//! operator denied (another cluster host); and one private address the
//! operator allowed (a DNS resolver). No probe can leave the machine: all
//! of those addresses exist only inside these namespaces.
//!
//! Functions in each of FC's four egress modes probe all of them, the
//! node's own ports (its agent, its public gateway, a control service on
//! every address) and each other's instance, and every probe's result is
//! asserted. For the two VPC modes the node also serves two VPCs over Open
//! vSwitch, each with a host of its own in a namespace on the VPC's
//! network. A VPC the node does not serve is refused with
//! `FunctionNotStarted`, saying why, and so is `internetAccess: false` on
//! an agent that runs without isolation. Nothing is created outside the
//! namespaces and the run's prefix (OVS bridges included); all of it goes
//! when each test ends.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use kiln::client::FcClient;
use kiln::credentials::Credentials;
use kiln_internal_api::{InternalClient, NodeInfo};
use serde_json::{json, Value};

/// The public-looking internet host, the node's uplink address and the
/// port every uplink address answers HTTP on.
const INTERNET: &str = "198.18.0.2";
const NODE_UPLINK: &str = "198.18.0.1";
const INTERNET_PORT: u16 = 8080;
/// Addresses on the uplink namespace an internet function must not reach
/// (none of them leaves the machine: they exist only there).
const METADATA: &str = "169.254.169.254";
const PRIVATE: &str = "10.99.0.1";
const PRIVATE_172: &str = "172.16.0.1";
const CGNAT: &str = "100.64.0.1";
/// A public-looking host the operator put in `deny` (another cluster
/// host), and a private one in `allow` (a DNS resolver).
const DENIED: &str = "198.18.0.3";
const RESOLVER: &str = "10.99.0.53";

/// Ports in the node's namespace: scheduler, gateway public, gateway
/// internal, agent, and a control service on every node address.
const PORTS: (u16, u16, u16, u16) = (17101, 17102, 17103, 17104);
const CONTROL_PORT: u16 = 17105;

/// A function that reports its own address and default gateway (the
/// node's side of its link) and tries TCP connections to `targets`, all at
/// once: for each, whether it connected and whether an HTTP answer came.
const PROBE: &str = r#"
import json, socket, struct, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

def gateway():
    with open("/proc/net/route") as f:
        for line in f.readlines()[1:]:
            p = line.split()
            if p[1] == "00000000":
                return socket.inet_ntoa(struct.pack("<L", int(p[2], 16)))
    return None

def me():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("198.18.0.2", 9))
        return s.getsockname()[0]

def probe(host, port, timeout, out):
    key = "%s:%d" % (host, port)
    r = {"connected": False, "http": False}
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            r["connected"] = True
            s.settimeout(timeout)
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            r["http"] = s.recv(64).startswith(b"HTTP/")
    except Exception as e:
        r["error"] = str(e)
    out[key] = r

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        n = int(self.headers.get("content-length", 0))
        req = json.loads(self.rfile.read(n) or b"{}")
        results = {}
        timeout = req.get("timeout", 3)
        threads = [threading.Thread(target=probe, args=(h, p, timeout, results)) for h, p in req.get("targets", [])]
        for t in threads: t.start()
        for t in threads: t.join()
        body = json.dumps({"me": me(), "gateway": gateway(), "results": results}).encode()
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

/// A python HTTP server in `ns` on `bind:port`, serving `dir`.
fn http_server(dir: &Path, ns: &str, name: &str, bind: &str, port: u16) -> std::process::Child {
    let www = dir.join(format!("www-{name}"));
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), format!("hello from {name}\n")).unwrap();
    spawn_in(
        dir,
        ns,
        name,
        Path::new("/usr/bin/env"),
        &[
            "python3",
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            bind,
            "--directory",
            www.to_str().unwrap(),
        ],
    )
}

/// A VPC the node serves and a host on its network. The VPC is
/// `vpc-<tag>` with one vSwitch `vsw-<tag>` and one security group
/// `sg-<tag>`; its host lives in namespace `<prefix>vpc<tag>`, linked to
/// ovs-vswitchd's namespace (this one) by the veth `<prefix>vh<tag>`,
/// which the agent's configuration names as the VPC's `ports`, and
/// answers HTTP on [`INTERNET_PORT`].
struct Vpc {
    tag: char,
    cidr: &'static str,
    vswitch_cidr: &'static str,
    /// The node's address on the vSwitch, and the host's default route
    /// (a VPC's hosts route through their vSwitch's gateway).
    gateway: &'static str,
    /// Where the instances' VPC addresses come from.
    instance_pool: &'static str,
    host: &'static str,
}

impl Vpc {
    fn id(&self) -> String {
        format!("vpc-{}", self.tag)
    }

    /// The host's link in ovs-vswitchd's namespace (`{PREFIX}` for the
    /// run's prefix, as in the agent's configuration).
    fn port(&self) -> String {
        format!("{{PREFIX}}vh{}", self.tag)
    }

    /// `[[sandbox.network.vpcs]]`: owned by [`ACCOUNT`], reached through
    /// [`Vpc::port`], its security group letting the vSwitch's hosts reach
    /// the runtime's port.
    fn agent_config(&self) -> String {
        let (id, x, port) = (self.id(), self.tag, self.port());
        let (cidr, vsw, gateway, pool) = (
            self.cidr,
            self.vswitch_cidr,
            self.gateway,
            self.instance_pool,
        );
        format!(
            "[[sandbox.network.vpcs]]\nid = {id:?}\ncidr = {cidr:?}\nowners = [{ACCOUNT:?}]\nports = [{port:?}]\n\
             [[sandbox.network.vpcs.vswitches]]\nid = \"vsw-{x}\"\ncidr = {vsw:?}\ngateway = {gateway:?}\ninstance_pool = {pool:?}\n\
             [[sandbox.network.vpcs.security_groups]]\nid = \"sg-{x}\"\n\
             [[sandbox.network.vpcs.security_groups.ingress]]\nprotocol = \"tcp\"\nport_range = \"9000/9000\"\ncidr = {vsw:?}\n"
        )
    }
}

/// A function's `vpcConfig` for `vpc-<tag>`, `vsw-<tag>`, `sg-<tag>`.
fn vpc_config(tag: impl std::fmt::Display) -> Value {
    json!({"vpcId": format!("vpc-{tag}"), "vSwitchIds": [format!("vsw-{tag}")],
        "securityGroupId": format!("sg-{tag}")})
}

/// What a cluster is made with, besides its services: the agent's
/// `[sandbox]` section ends in `sandbox` and the gateway's configuration
/// in `gateway` (`{PREFIX}` in either: the run's prefix); with `uplink`
/// the node gets an uplink to namespace `<prefix>inet` holding every
/// address the module docs list; the hosts of `vpcs` are made before
/// the agent starts.
#[derive(Default)]
struct Setup<'a> {
    uplink: bool,
    sandbox: &'a str,
    gateway: &'a str,
    vpcs: &'a [Vpc],
}

/// Gateway, scheduler and agent in namespace `<prefix>node`, made as
/// [`Setup`] says. Dropping it stops the services and removes every
/// namespace, link, table, cgroup and OVS bridge of the run.
struct Cluster {
    services: common::Services,
    state: tempfile::TempDir,
    node: String,
    client: Option<FcClient>,
    creds: Option<Credentials>,
}

const ACCOUNT: &str = "1200000000000001";
const KEY_ID: &str = "LTAIegress";
const SECRET: &str = "egress-secret-0123456789";

impl Cluster {
    fn start(setup: Setup) -> Self {
        let Setup {
            uplink,
            sandbox: sandbox_extra,
            gateway: gateway_extra,
            vpcs,
        } = setup;
        let state = tempfile::Builder::new()
            .prefix("kiln-egress-")
            .tempdir()
            .unwrap();
        let dir = state.path().to_owned();
        let prefix = common::run_tag();
        let (node, inet) = (format!("{prefix}node"), format!("{prefix}inet"));
        let sandbox_extra = sandbox_extra.replace("{PREFIX}", &prefix);
        let gateway_extra = gateway_extra.replace("{PREFIX}", &prefix);
        let mut services = common::Services::new(
            &dir,
            &prefix,
            &["internet", "control", "scheduler", "gateway", "agent"],
        );
        ip(&["netns", "add", &node]);
        ip(&["-n", &node, "link", "set", "lo", "up"]);
        if uplink {
            let (up, up_peer) = (format!("{prefix}up"), format!("{prefix}upi"));
            ip(&["netns", "add", &inet]);
            ip(&[
                "link", "add", &up, "netns", &node, "type", "veth", "peer", "name", &up_peer,
                "netns", &inet,
            ]);
            for (ns, dev, addr) in [(&node, &up, NODE_UPLINK), (&inet, &up_peer, INTERNET)] {
                ip(&["-n", ns, "link", "set", "lo", "up"]);
                ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
                ip(&["-n", ns, "link", "set", dev, "up"]);
            }
            for addr in [METADATA, PRIVATE, PRIVATE_172, CGNAT, DENIED, RESOLVER] {
                ip(&[
                    "-n",
                    &inet,
                    "addr",
                    "add",
                    &format!("{addr}/32"),
                    "dev",
                    &up_peer,
                ]);
            }
            // Everything the node does not know goes to the uplink
            // namespace, which holds all of it: nothing leaves the machine.
            ip(&["-n", &node, "route", "add", "default", "via", INTERNET]);
            if !vpcs.is_empty() {
                // The way back to the VPCs' hosts, should the node ever
                // route their traffic out: a leak must show, not time out.
                ip(&["-n", &inet, "route", "add", "default", "via", NODE_UPLINK]);
            }
            services.children.push(http_server(
                &dir,
                &inet,
                "internet",
                "0.0.0.0",
                INTERNET_PORT,
            ));
        }
        for vpc in vpcs {
            let (ns, name) = (format!("{prefix}vpc{}", vpc.tag), format!("vpc{}", vpc.tag));
            let port = vpc.port().replace("{PREFIX}", &prefix);
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&[
                "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", vpc.host),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "route", "add", "default", "via", vpc.gateway]);
            ip(&["link", "set", &port, "up"]);
            // A real VPC host's NIC finishes its checksums; a veth leaves
            // them to offload, which the userspace datapath does not do.
            let ethtool = Command::new("ip")
                .args(["netns", "exec", &ns, "ethtool", "-K", "eth0", "tx", "off"])
                .output()
                .expect("run ethtool");
            assert!(ethtool.status.success(), "ethtool: {ethtool:?}");
            services.names.push(name.clone());
            services
                .children
                .push(http_server(&dir, &ns, &name, "0.0.0.0", INTERNET_PORT));
        }
        // A control service of the node on every node address.
        services
            .children
            .push(http_server(&dir, &node, "control", "0.0.0.0", CONTROL_PORT));

        let pki = kiln_pki::DevPki::ensure(&dir.join("pki"), &[]).unwrap();
        let (sp, gp, gi, ap) = PORTS;
        services.children.push(spawn_service_in(
            &dir,
            &node,
            "scheduler",
            &common::scheduler_config(&dir, &pki, sp, ""),
        ));
        // The public listener on every address, as `kiln dev --listen
        // 0.0.0.0:...` has it; the internal one too, so that only the
        // firewall keeps instances from it.
        let gateway = common::gateway_config(&dir, &pki, (sp, gp, gi), (ACCOUNT, KEY_ID, SECRET))
            .replace(&format!("127.0.0.1:{gp}"), &format!("0.0.0.0:{gp}"))
            .replace(
                &format!("listen = \"127.0.0.1:{gi}\""),
                &format!("listen = \"0.0.0.0:{gi}\""),
            )
            + &gateway_extra;
        services
            .children
            .push(spawn_service_in(&dir, &node, "gateway", &gateway));
        services.children.push(spawn_service_in(
            &dir,
            &node,
            "agent",
            &format!(
                "state_dir = {:?}\nlisten = \"0.0.0.0:{ap}\"\nadvertise_url = \"https://127.0.0.1:{ap}\"\n\
                 scheduler_url = \"https://127.0.0.1:{sp}\"\n\
                 gateway_internal_url = \"https://127.0.0.1:{gi}\"\ndrain_on_shutdown = true\n{}\
                 [node]\nzone = \"z1\"\ntenancy = \"dedicated\"\nmemory_mb = 4096\ncpu_milli = 16000\nmax_instances = 64\n\
                 [sandbox]\nname_prefix = {prefix:?}\ninstance_subnet = {:?}\ncgroup_parent = {prefix:?}\nrootfs_dir = {:?}\n\
                 {sandbox_extra}",
                dir.join("agent"),
                common::tls_table(&pki, "agent"),
                common::run_subnet(),
                common::rootfs_cache()
            ),
        ));
        let mut cluster = Self {
            services,
            state,
            node,
            client: None,
            creds: None,
        };
        let operator = pki.files("operator");
        let ca = pki.ca_cert();
        let ready = cluster.run(|_| async move {
            // The agent registers once its runtime is ready.
            let internal = InternalClient::new(&operator).unwrap();
            let deadline = Instant::now() + Duration::from_secs(600);
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
                    return Ok(());
                }
                if Instant::now() > deadline {
                    return Err("the agent never registered".to_owned());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        if let Err(e) = ready {
            panic!("{e}\n{}", cluster.services.logs());
        }
        let creds = Credentials {
            endpoint: format!("https://127.0.0.1:{gp}"),
            account_id: ACCOUNT.into(),
            access_key_id: KEY_ID.into(),
            access_key_secret: SECRET.into(),
            ca_cert: ca,
            security_token: None,
        };
        cluster.client = Some(FcClient::new(creds.clone()).unwrap());
        cluster.creds = Some(creds);
        cluster
    }

    /// Run `f` (given the API client, once there is one) on a runtime
    /// inside the node's namespace.
    fn run<T: Send, F: std::future::Future<Output = T>>(
        &self,
        f: impl FnOnce(Option<FcClient>) -> F + Send,
    ) -> T {
        let client = self.client.clone();
        in_netns(&self.node, move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f(client))
        })
    }

    fn dir(&self) -> &Path {
        self.state.path()
    }
}

/// The probe function's code, zipped.
fn probe_zip(dir: &Path) -> String {
    let code = dir.join("probe");
    std::fs::create_dir_all(&code).unwrap();
    std::fs::write(code.join("server.py"), PROBE).unwrap();
    base64::engine::general_purpose::STANDARD.encode(kiln::zipdir::zip_dir(&code).unwrap())
}

async fn create(c: &FcClient, zip: &str, name: &str, extra: Value) -> Result<Value, String> {
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
    c.get_function(name).await.map_err(|e| e.to_string())
}

/// How long a probe waits to connect, and then for an answer: long
/// enough that a loaded machine (Open vSwitch's userspace datapath on two
/// busy cores) does not pass for a refusal.
const PROBE_TIMEOUT_S: u64 = 5;

/// Invoke `name` with `targets`: (status, body).
async fn probe(
    c: &FcClient,
    name: &str,
    targets: &[(String, u16)],
) -> Result<(u16, Value), String> {
    let req = json!({"targets": targets, "timeout": PROBE_TIMEOUT_S}).to_string();
    let r = c
        .invoke(name, Bytes::from(req), &[])
        .await
        .map_err(|e| format!("invoke {name}: {e}"))?;
    let body =
        serde_json::from_slice(&r.body).unwrap_or_else(|_| json!(String::from_utf8_lossy(&r.body)));
    Ok((r.status.as_u16(), body))
}

#[test]
fn egress_modes_take_effect_through_the_agent() {
    egress_modes(false);
}

/// The same probes from instances started in pre-made sandboxes: each
/// gets its own function's egress rules at the claim, before its process
/// starts (the pool's sandboxes all wait behind the same default-deny).
#[test]
fn egress_modes_take_effect_in_pre_made_sandboxes() {
    egress_modes(true);
}

/// A started, unclaimed pre-made `custom.debian12` sandbox of the agent.
async fn premade_ready(premade_dir: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = std::fs::read_dir(premade_dir).ok().is_some_and(|rd| {
            rd.flatten().any(|e| {
                let dir = e.path();
                e.file_type().is_ok_and(|t| t.is_dir())
                    && dir.join("ready").is_file()
                    && std::fs::read(dir.join("bundle/config.json"))
                        .ok()
                        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                        .is_some_and(|c| c["annotations"]["io.kiln.runtime"] == "custom.debian12")
            })
        });
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("no pre-made sandbox was ready within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn egress_modes(premade: bool) {
    if common::skip() || common::skip_without(&["nft", "tc", "nsenter", "python3"]) {
        return;
    }
    let (_, gp, gi, ap) = PORTS;
    // As `kiln dev` writes it (dev_config.rs), plus the operator's lists.
    let premade_section = if premade {
        "[sandbox.premade]\nenabled = true\nbudget_mb = 256\n"
    } else {
        ""
    };
    let cluster = Cluster::start(Setup {
        uplink: true,
        sandbox: &format!(
            "[sandbox.network]\nuplink_interface = \"{{PREFIX}}up\"\nstandard_bandwidth_mbit = 100\n\
             performance_bandwidth_mbit = 500\npublic_ports = [{gp}]\n\
             deny = [\"{DENIED}/32\"]\nallow = [\"{RESOLVER}/32\"]\n{premade_section}"
        ),
        ..Setup::default()
    });
    let zip = probe_zip(cluster.dir());
    let premade_dir = cluster.dir().join("agent/premade");
    let outcome = cluster.run(|c| async move {
        let c = c.unwrap();
        let modes = [
            ("egress-internet", json!({})),
            ("egress-none", json!({"internetAccess": false})),
        ];
        let mut got = BTreeMap::new();
        for (name, extra) in &modes {
            got.insert(*name, create(&c, &zip, name, extra.clone()).await?);
        }
        // Each instance's own address and the node's side of its link.
        let mut whoami = BTreeMap::new();
        for (name, _) in &modes {
            if premade {
                premade_ready(&premade_dir).await?;
            }
            let (status, v) = probe(&c, name, &[]).await?;
            if status != 200 {
                return Err(format!("invoke {name}: {status} {v}"));
            }
            whoami.insert(*name, v);
        }
        let mut results = BTreeMap::new();
        for (name, _) in &modes {
            let other = if *name == "egress-internet" {
                "egress-none"
            } else {
                "egress-internet"
            };
            let node_side = whoami[name]["gateway"].as_str().unwrap_or("").to_owned();
            let other_me = whoami[other]["me"].as_str().unwrap_or("").to_owned();
            let mut targets: Vec<(String, u16)> = [
                INTERNET,
                METADATA,
                PRIVATE,
                PRIVATE_172,
                CGNAT,
                DENIED,
                RESOLVER,
            ]
            .iter()
            .map(|a| (a.to_string(), INTERNET_PORT))
            .collect();
            for host in [NODE_UPLINK.to_owned(), node_side.clone()] {
                for port in [ap, gp, gi, CONTROL_PORT] {
                    targets.push((host.clone(), port));
                }
            }
            targets.push((other_me, 9000));
            let (status, v) = probe(&c, name, &targets).await?;
            if status != 200 {
                return Err(format!("invoke {name}: {status} {v}"));
            }
            results.insert(*name, (node_side, whoami[other]["me"].clone(), v));
        }
        Ok::<_, String>((got, results))
    });
    let (got, results) = outcome.unwrap_or_else(|e| panic!("{e}\n{}", cluster.services.logs()));
    assert_eq!(
        got["egress-internet"]["internetAccess"],
        json!(true),
        "FC's default"
    );
    assert_eq!(got["egress-none"]["internetAccess"], json!(false));

    let mut table: BTreeMap<String, BTreeMap<String, bool>> = BTreeMap::new();
    for (name, (node_side, other_me, v)) in &results {
        eprintln!("{name}: {v}");
        let r = &v["results"];
        let connected = |host: &str, port: u16| {
            r[format!("{host}:{port}")]["connected"]
                .as_bool()
                .unwrap_or_else(|| panic!("no result for {host}:{port} in {v}"))
        };
        let http = |host: &str, port: u16| r[format!("{host}:{port}")]["http"] == json!(true);
        let mut row = BTreeMap::new();
        row.insert("internet host".to_owned(), http(INTERNET, INTERNET_PORT));
        for (label, addr) in [
            ("metadata", METADATA),
            ("private 10/8", PRIVATE),
            ("private 172.16/12", PRIVATE_172),
            ("cgnat", CGNAT),
            ("operator-denied host", DENIED),
            ("operator-allowed resolver", RESOLVER),
        ] {
            row.insert(label.to_owned(), connected(addr, INTERNET_PORT));
        }
        for (label, host) in [("uplink", NODE_UPLINK), ("link", node_side.as_str())] {
            row.insert(format!("node {label} agent port"), connected(host, ap));
            row.insert(
                format!("node {label} gateway internal port"),
                connected(host, gi),
            );
            row.insert(
                format!("node {label} control service"),
                connected(host, CONTROL_PORT),
            );
            row.insert(
                format!("node {label} public gateway port"),
                connected(host, gp),
            );
        }
        row.insert(
            "other instance".to_owned(),
            connected(other_me.as_str().unwrap_or(""), 9000),
        );
        table.insert(name.to_string(), row);
    }
    eprintln!("reachability (function -> target -> connected):");
    for (name, row) in &table {
        eprintln!("  {name}: {row:?}");
    }
    let expect = |internet: bool| -> BTreeMap<String, bool> {
        let mut row: BTreeMap<String, bool> = [
            ("internet host", internet),
            ("metadata", false),
            ("private 10/8", false),
            ("private 172.16/12", false),
            ("cgnat", false),
            ("operator-denied host", false),
            ("operator-allowed resolver", internet),
            ("other instance", false),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for label in ["uplink", "link"] {
            row.insert(format!("node {label} agent port"), false);
            row.insert(format!("node {label} gateway internal port"), false);
            row.insert(format!("node {label} control service"), false);
            // The internet-facing gateway, as any internet client.
            row.insert(format!("node {label} public gateway port"), internet);
        }
        row
    };
    let want: BTreeMap<String, BTreeMap<String, bool>> = [
        ("egress-internet".to_owned(), expect(true)),
        ("egress-none".to_owned(), expect(false)),
    ]
    .into_iter()
    .collect();
    assert_eq!(table, want, "{}", cluster.services.logs());
    let agent_log = std::fs::read_to_string(cluster.dir().join("agent.log")).unwrap();
    let claimed = agent_log
        .matches("instance started in a pre-made sandbox")
        .count();
    if premade {
        assert_eq!(claimed, 2, "both instances from the pool:\n{agent_log}");
    } else {
        assert_eq!(claimed, 0);
    }

    // The agent's isolation lives in the node's namespace, in its own table.
    let prefix = cluster.services.prefix.clone();
    let tables = Command::new("ip")
        .args(["netns", "exec", &cluster.node, "nft", "list", "tables"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&tables.stdout).contains(&format!("inet {prefix}")),
        "{}",
        String::from_utf8_lossy(&tables.stdout)
    );
    // Each instance's veth is shaped at the standard rate.
    let qdiscs = Command::new("ip")
        .args(["netns", "exec", &cluster.node, "tc", "qdisc", "show"])
        .output()
        .unwrap();
    let qdiscs = String::from_utf8_lossy(&qdiscs.stdout);
    assert!(
        qdiscs.lines().any(|l| l.contains(&format!("dev {prefix}-"))
            && l.contains("tbf")
            && l.contains("100Mbit")),
        "{qdiscs}"
    );
    drop(cluster);
    assert!(common::netns_with_prefix(&prefix).is_empty());
}

#[test]
fn an_agent_without_isolation_refuses_what_it_cannot_enforce() {
    if common::skip() || common::skip_without(&["nsenter", "python3"]) {
        return;
    }
    let cluster = Cluster::start(Setup {
        sandbox: "insecure_network_isolation_disabled = true\n",
        ..Setup::default()
    });
    // Said at every start.
    let log = std::fs::read_to_string(cluster.dir().join("agent.log")).unwrap();
    assert!(
        log.contains("WARN") && log.contains("insecure_network_isolation_disabled"),
        "{log}"
    );
    let zip = probe_zip(cluster.dir());
    let outcome = cluster.run(|c| async move {
        let c = c.unwrap();
        create(
            &c,
            &zip,
            "unisolated-none",
            json!({"internetAccess": false}),
        )
        .await?;
        let refused = probe(&c, "unisolated-none", &[]).await?;
        // FC's default runs: the operator turned isolation off explicitly.
        create(&c, &zip, "unisolated-default", json!({})).await?;
        let ran = probe(&c, "unisolated-default", &[]).await?;
        Ok::<_, String>((refused, ran))
    });
    let ((status, body), (ran_status, ran)) =
        outcome.unwrap_or_else(|e| panic!("{e}\n{}", cluster.services.logs()));
    let text = body.to_string();
    assert_ne!(status, 200, "{text}");
    assert!(
        text.contains("FunctionNotStarted")
            && text.contains("no network isolation")
            && text.contains("internetAccess: false"),
        "refused, saying why: {status} {text}"
    );
    assert_eq!(ran_status, 200, "{ran}\n{}", cluster.services.logs());
    let prefix = cluster.services.prefix.clone();
    drop(cluster);
    assert!(common::netns_with_prefix(&prefix).is_empty());
}

/// The two VPCs the node serves in
/// [`vpc_modes_reach_their_vpc_and_nothing_else`].
const VPC_A: Vpc = Vpc {
    tag: 'a',
    cidr: "192.168.0.0/16",
    vswitch_cidr: "192.168.50.0/24",
    gateway: "192.168.50.1",
    instance_pool: "192.168.50.128/25",
    host: "192.168.50.10",
};
const VPC_B: Vpc = Vpc {
    tag: 'b',
    cidr: "172.20.0.0/16",
    vswitch_cidr: "172.20.50.0/24",
    gateway: "172.20.50.1",
    instance_pool: "172.20.50.128/25",
    host: "172.20.50.10",
};
/// An account with a key of its own that owns no VPC.
const STRANGER: (&str, &str, &str) = (
    "1200000000000002",
    "LTAIstranger",
    "stranger-secret-0123456789",
);

/// The client addresses in a python `http.server` log.
fn http_clients(log: &str) -> BTreeSet<String> {
    log.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|a| a.parse::<std::net::Ipv4Addr>().is_ok())
        .map(str::to_owned)
        .collect()
}

/// Whether IPv4 address `addr` lies in network `net` (`a.b.c.d/len`).
fn in_network(addr: &str, net: &str) -> bool {
    let (base, len) = net.split_once('/').unwrap();
    let len: u32 = len.parse().unwrap();
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    let ip = |a: &str| u32::from(a.parse::<std::net::Ipv4Addr>().unwrap());
    ip(addr) & mask == ip(base) & mask
}

/// FC's two VPC egress modes through the real gateway, scheduler and
/// agent. The processes are configured as `kiln dev` configures them
/// (`kiln dev` itself has no way to declare a VPC) plus the VPC sections:
/// the agent serves VPCs A and B (`[[sandbox.network.vpcs]]`, each with
/// a "VPC host" in a namespace of its own on the VPC's network, joined to
/// the agent's OVS bridge through the VPC's `ports`), the gateway's
/// `[[vpcs]]` names [`ACCOUNT`] as the owner of both and of a VPC no node
/// serves. Three functions probe: "VPC only" and "internet and VPC" in A,
/// "VPC only" in B. Each reaches its own VPC's host and nothing of the
/// other VPC, the internet only with internet access, none of the
/// metadata, private and CGNAT addresses on the uplink, none of the
/// node's ports on any of its addresses (its uplink, its side of the
/// instance's link, its gateway address in the VPC) except the public
/// gateway port with internet access, and no other instance (at its
/// private or its VPC address). A function in the unserved VPC is refused
/// with `FunctionNotStarted` saying why; an account that owns no VPC is
/// refused at CreateFunction with FC's `AccessDenied` (the gateway's own
/// cases are in kiln-gateway's `tenant_bounds.rs`,
/// `vpcs_take_functions_of_their_owners_only`). The bridges go with the
/// run, also when the test fails (`common::leftovers_cleanup`).
#[test]
fn vpc_modes_reach_their_vpc_and_nothing_else() {
    if common::skip()
        || common::skip_without(&[
            "nft",
            "tc",
            "nsenter",
            "python3",
            "ovs-vsctl",
            "ovs-ofctl",
            "ethtool",
        ])
    {
        return;
    }
    let ovs_pid = kiln_test_support::ovs::ensure_ovs()
        .unwrap_or_else(|e| panic!("Open vSwitch is needed for the VPC modes: {e}"));
    let (_, gp, gi, ap) = PORTS;
    let (stranger, stranger_key, stranger_secret) = STRANGER;
    let cluster = Cluster::start(Setup {
        uplink: true,
        sandbox: &format!(
            "[sandbox.network]\nuplink_interface = \"{{PREFIX}}up\"\nstandard_bandwidth_mbit = 100\n\
             performance_bandwidth_mbit = 500\npublic_ports = [{gp}]\novs_netns = \"{ovs_pid}\"\n{}{}",
            VPC_A.agent_config(),
            VPC_B.agent_config(),
        ),
        gateway: &format!(
            "[[bootstrap_keys]]\naccount_id = {stranger:?}\naccess_key_id = {stranger_key:?}\naccess_key_secret = {stranger_secret:?}\n\
             [[vpcs]]\nid = \"vpc-a\"\nowners = [{ACCOUNT:?}]\n\
             [[vpcs]]\nid = \"vpc-b\"\nowners = [{ACCOUNT:?}]\n\
             [[vpcs]]\nid = \"vpc-unserved\"\nowners = [{ACCOUNT:?}]\n"
        ),
        vpcs: &[VPC_A, VPC_B],
    });
    let stranger_client = FcClient::new(Credentials {
        account_id: stranger.into(),
        access_key_id: stranger_key.into(),
        access_key_secret: stranger_secret.into(),
        ..cluster.creds.clone().unwrap()
    })
    .unwrap();
    let zip = probe_zip(cluster.dir());
    let vpca_log = cluster.dir().join("vpca.log");
    // (function, its settings, its VPC, the other VPC)
    let functions = [
        (
            "vpc-only",
            json!({"internetAccess": false, "vpcConfig": vpc_config('a')}),
            &VPC_A,
            &VPC_B,
        ),
        (
            "vpc-and-internet",
            json!({"internetAccess": true, "vpcConfig": vpc_config('a')}),
            &VPC_A,
            &VPC_B,
        ),
        (
            "vpc-b-only",
            json!({"internetAccess": false, "vpcConfig": vpc_config('b')}),
            &VPC_B,
            &VPC_A,
        ),
    ];
    let functions = &functions;
    let outcome = cluster.run(|c| async move {
        let c = c.unwrap();
        for (name, extra, ..) in functions {
            let got = create(&c, &zip, name, extra.clone()).await?;
            if got["vpcConfig"]["vpcId"] != extra["vpcConfig"]["vpcId"] {
                return Err(format!("{name} lost its vpcConfig: {got}"));
            }
        }
        // Each instance's own address and the node's side of its link.
        let mut whoami = BTreeMap::new();
        for (name, ..) in functions {
            let (status, v) = probe(&c, name, &[]).await?;
            if status != 200 {
                return Err(format!("invoke {name}: {status} {v}"));
            }
            whoami.insert(*name, v);
        }
        let mut results = BTreeMap::new();
        for (i, (name, _, own, other_vpc)) in functions.iter().enumerate() {
            let other = functions[(i + 1) % functions.len()].0;
            let node_side = whoami[name]["gateway"].as_str().unwrap_or("").to_owned();
            let other_me = whoami[other]["me"].as_str().unwrap_or("").to_owned();
            let mut targets: Vec<(String, u16)> = [
                own.host,
                other_vpc.host,
                INTERNET,
                METADATA,
                PRIVATE,
                PRIVATE_172,
                CGNAT,
            ]
            .iter()
            .map(|a| (a.to_string(), INTERNET_PORT))
            .collect();
            for host in [NODE_UPLINK, node_side.as_str(), own.gateway] {
                for port in [ap, gp, gi, CONTROL_PORT] {
                    targets.push((host.to_owned(), port));
                }
            }
            targets.push((other_me.clone(), 9000));
            let (status, v) = probe(&c, name, &targets).await?;
            if status != 200 {
                return Err(format!("invoke {name}: {status} {v}"));
            }
            results.insert(*name, (node_side, other_me, v));
        }
        // The VPC A host has now seen VPC A's instances at their VPC
        // addresses: no instance reaches another (nor itself) there.
        let seen_a = http_clients(&std::fs::read_to_string(&vpca_log).unwrap_or_default());
        let targets: Vec<(String, u16)> = seen_a.iter().map(|a| (a.clone(), 9000)).collect();
        let mut via_vpc = BTreeMap::new();
        for (name, ..) in functions {
            let (status, v) = probe(&c, name, &targets).await?;
            if status != 200 {
                return Err(format!("invoke {name}: {status} {v}"));
            }
            via_vpc.insert(*name, v);
        }
        // A VPC the account owns but no node serves: the function is
        // accepted and refused when it would start, saying why.
        create(
            &c,
            &zip,
            "vpc-unserved",
            json!({"vpcConfig": vpc_config("unserved")}),
        )
        .await?;
        let unserved = probe(&c, "vpc-unserved", &[]).await?;
        // An account that owns no VPC: refused at CreateFunction.
        let mut doc = json!({
            "functionName": "stranger-in-vpc-a",
            "runtime": "custom.debian12",
            "handler": "index.handler",
            "customRuntimeConfig": {"command": ["python3", "server.py"]},
            "code": {"zipFile": zip},
            "vpcConfig": vpc_config('a'),
        });
        let refused = stranger_client.create_function(&doc).await;
        doc["functionName"] = json!("stranger-plain");
        doc.as_object_mut().unwrap().remove("vpcConfig");
        stranger_client
            .create_function(&doc)
            .await
            .map_err(|e| format!("the stranger's own function: {e}"))?;
        let listed = stranger_client
            .list_functions(None)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((results, seen_a, via_vpc, unserved, refused, listed))
    });
    let (results, seen_a, via_vpc, (unserved_status, unserved), refused, listed) =
        outcome.unwrap_or_else(|e| panic!("{e}\n{}", cluster.services.logs()));
    // Both VPC A functions' instances, so that the probes between them
    // at their VPC addresses probed something.
    assert!(seen_a.len() >= 2, "the VPC A host saw {seen_a:?}");

    let modes: BTreeMap<&str, (&str, &str, &str)> = functions
        .iter()
        .map(|(name, _, own, other)| (*name, (own.gateway, own.host, other.host)))
        .collect();
    let mut table: BTreeMap<String, BTreeMap<String, bool>> = BTreeMap::new();
    for (name, (node_side, other_me, v)) in &results {
        eprintln!("{name}: {v}");
        let (vpc_gateway, own_host, other_host) = modes[name];
        let r = &v["results"];
        let connected = |host: &str, port: u16| {
            r[format!("{host}:{port}")]["connected"]
                .as_bool()
                .unwrap_or_else(|| panic!("no result for {host}:{port} in {v}"))
        };
        let http = |host: &str, port: u16| r[format!("{host}:{port}")]["http"] == json!(true);
        let mut row = BTreeMap::new();
        row.insert("its VPC's host".to_owned(), http(own_host, INTERNET_PORT));
        row.insert(
            "the other VPC's host".to_owned(),
            connected(other_host, INTERNET_PORT),
        );
        row.insert("internet host".to_owned(), http(INTERNET, INTERNET_PORT));
        for (label, addr) in [
            ("metadata", METADATA),
            ("private 10/8", PRIVATE),
            ("private 172.16/12", PRIVATE_172),
            ("cgnat", CGNAT),
        ] {
            row.insert(label.to_owned(), connected(addr, INTERNET_PORT));
        }
        for (label, host) in [
            ("uplink", NODE_UPLINK),
            ("link", node_side.as_str()),
            ("VPC gateway", vpc_gateway),
        ] {
            for (port_label, port) in [
                ("agent port", ap),
                ("gateway internal port", gi),
                ("control service", CONTROL_PORT),
                ("public gateway port", gp),
            ] {
                row.insert(format!("node {label} {port_label}"), connected(host, port));
            }
        }
        row.insert("other instance".to_owned(), connected(other_me, 9000));
        let r = &via_vpc[*name]["results"];
        row.insert(
            "VPC A's instances at their VPC addresses".to_owned(),
            seen_a
                .iter()
                .any(|a| r[format!("{a}:9000")]["connected"] != json!(false)),
        );
        table.insert(name.to_string(), row);
    }
    eprintln!("reachability (function -> target -> connected):");
    for (name, row) in &table {
        eprintln!("  {name}: {row:?}");
    }
    let expect = |internet: bool| -> BTreeMap<String, bool> {
        let mut row: BTreeMap<String, bool> = [
            ("its VPC's host", true),
            ("the other VPC's host", false),
            ("internet host", internet),
            ("metadata", false),
            ("private 10/8", false),
            ("private 172.16/12", false),
            ("cgnat", false),
            ("other instance", false),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for label in ["uplink", "link", "VPC gateway"] {
            row.insert(format!("node {label} agent port"), false);
            row.insert(format!("node {label} gateway internal port"), false);
            row.insert(format!("node {label} control service"), false);
            // The internet-facing gateway, as any internet client.
            row.insert(format!("node {label} public gateway port"), internet);
        }
        row.insert("VPC A's instances at their VPC addresses".to_owned(), false);
        row
    };
    let want: BTreeMap<String, BTreeMap<String, bool>> = [
        ("vpc-only".to_owned(), expect(false)),
        ("vpc-and-internet".to_owned(), expect(true)),
        ("vpc-b-only".to_owned(), expect(false)),
    ]
    .into_iter()
    .collect();
    assert_eq!(table, want, "{}", cluster.services.logs());

    // The VPCs' hosts saw each instance at its VPC address (SNAT), never at
    // its private one: VPC A its two functions' instances (at least), VPC B
    // its one function's.
    for (vpc, at_least) in [(&VPC_A, 2), (&VPC_B, 1)] {
        let (host, pool) = (format!("vpc{}", vpc.tag), vpc.instance_pool);
        let log = std::fs::read_to_string(cluster.dir().join(format!("{host}.log"))).unwrap();
        let seen = http_clients(&log);
        assert!(
            seen.len() >= at_least && seen.iter().all(|a| in_network(a, pool)),
            "{host} saw {seen:?}, not instances in {pool}: {log}"
        );
    }
    // From the VPC A host: the instances' VPC addresses as their security
    // group allows (TCP 9000 from the vSwitch); the node's address in the
    // VPC is no way into the node, nor is the node a router to the other
    // VPC or the internet.
    let node_ports = [ap, gi, CONTROL_PORT, gp];
    let mut want: BTreeMap<String, bool> =
        seen_a.iter().map(|a| (format!("{a}:9000"), true)).collect();
    for host in [VPC_A.gateway, NODE_UPLINK] {
        for port in node_ports {
            want.insert(format!("{host}:{port}"), false);
        }
    }
    for host in [VPC_B.host, INTERNET] {
        want.insert(format!("{host}:{INTERNET_PORT}"), false);
    }
    let prefix = cluster.services.prefix.clone();
    let targets: Vec<String> = want.keys().cloned().collect();
    let reached: BTreeMap<String, bool> = in_netns(&format!("{prefix}vpca"), || {
        // Threads made here live in the VPC host's namespace too.
        std::thread::scope(|s| {
            let probes: Vec<_> = targets
                .iter()
                .map(|t| {
                    s.spawn(move || {
                        let addr: std::net::SocketAddr = t.parse().unwrap();
                        let ok = std::net::TcpStream::connect_timeout(
                            &addr,
                            Duration::from_secs(PROBE_TIMEOUT_S),
                        )
                        .is_ok();
                        (t.clone(), ok)
                    })
                })
                .collect();
            probes.into_iter().map(|p| p.join().unwrap()).collect()
        })
    });
    eprintln!("from the VPC A host: {reached:?}");
    assert_eq!(reached, want, "{}", cluster.services.logs());

    // The unserved VPC never runs, and the answer says why.
    let text = unserved.to_string();
    assert_ne!(unserved_status, 200, "an unserved VPC never runs: {text}");
    assert!(
        text.contains("FunctionNotStarted") && text.contains("vpc-unserved"),
        "says why: {unserved_status} {text}"
    );
    // The stranger: FC's error shape, nothing made.
    match refused {
        Err(kiln::client::ClientError::Api {
            status,
            code,
            message,
            request_id,
        }) => {
            assert_eq!((status, code.as_str()), (403, "AccessDenied"), "{message}");
            assert!(
                message.contains("vpc-a") && message.contains(stranger),
                "{message}"
            );
            assert!(!request_id.is_empty());
        }
        other => panic!("the stranger's vpcConfig was not refused with AccessDenied: {other:?}"),
    }
    let names: Vec<&str> = listed
        .iter()
        .filter_map(|f| f["functionName"].as_str())
        .collect();
    assert_eq!(names, ["stranger-plain"]);

    // The agent made one bridge per VPC in use, each with its VPC's port.
    for (i, vpc) in [VPC_A, VPC_B].iter().enumerate() {
        let port = vpc.port().replace("{PREFIX}", &prefix);
        let out = Command::new("ovs-vsctl")
            .args(["--timeout=5", "port-to-br", &port])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("{prefix}v{i}"),
            "{port}: {out:?}"
        );
    }
    drop(cluster);
    assert!(common::netns_with_prefix(&prefix).is_empty());
    let bridges = Command::new("ovs-vsctl")
        .args(["--timeout=5", "list-br"])
        .output()
        .unwrap();
    let bridges = String::from_utf8_lossy(&bridges.stdout);
    assert!(
        !bridges.lines().any(|b| b.starts_with(&prefix)),
        "{bridges}"
    );
}
