//! Shared harness of the end-to-end tests: a `kiln dev` process (or the
//! three service binaries) with a per-run state directory, sandbox prefix
//! and instance subnet, torn down even when a test fails.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln::client::FcClient;
use kiln::credentials::Credentials;

pub use kiln_test_support::Category;

/// Why this machine cannot run the end-to-end tests, if it cannot.
pub fn skip_reason() -> Option<(Category, String)> {
    if !kiln_test_support::is_root() {
        return Some((
            Category::Root,
            "needs root (runc, network namespaces, mounts)".into(),
        ));
    }
    ["runc", "ip", "debootstrap"]
        .into_iter()
        .find(|tool| !on_path(tool))
        .map(missing_tool)
}

/// Skip the calling test when this machine cannot run the end-to-end
/// tests (see [`kiln_test_support::skip`]); true when it must return.
pub fn skip() -> bool {
    match skip_reason() {
        Some((category, why)) => {
            kiln_test_support::skip(category, why);
            true
        }
        None => false,
    }
}

/// Skip the calling test when one of `tools` is not installed; true when
/// it must return.
pub fn skip_without(tools: &[&str]) -> bool {
    match tools.iter().find(|tool| !on_path(tool)) {
        Some(tool) => {
            let (category, why) = missing_tool(tool);
            kiln_test_support::skip(category, why);
            true
        }
        None => false,
    }
}

fn missing_tool(tool: &str) -> (Category, String) {
    (
        Category::Tool,
        format!("`{tool}` is not installed (run scripts/install-deps.sh)"),
    )
}

pub fn on_path(tool: &str) -> bool {
    kiln_test_support::which(tool).is_some()
}

pub use kiln_test_support::free_port;

/// A short random tag for names (interface names are at most 15 bytes).
pub fn run_tag() -> String {
    let n: u32 = rand::random();
    format!("k{:05x}", n & 0xfffff)
}

/// A /22 of its own for each run, so concurrent tests never share
/// addresses. Instances' routes live in the host's table, so the suites
/// that nextest runs side by side keep to ranges of their own: these tests
/// (and `kiln bench`) 10.100-149, kiln-sandbox's limits 10.230-239 and
/// runc 10.240-249, ip_netns 10.252, the microVM tests 10.214-217. (This
/// range was 10.200-249 and overlapped the sandbox suites'.)
pub fn run_subnet() -> String {
    let n: u32 = rand::random();
    format!("10.{}.{}.0/22", 100 + (n % 50), ((n >> 8) % 64) * 4)
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_owned()
}

pub fn rootfs_cache() -> PathBuf {
    std::env::var_os("KILN_ROOTFS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/kiln/rootfs"))
}

/// A running `kiln dev`.
pub struct Dev {
    pub child: Child,
    pub state: tempfile::TempDir,
    pub prefix: String,
    pub creds: Credentials,
    pub creds_path: PathBuf,
}

impl Dev {
    pub fn start() -> Dev {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Dev {
        Self::start_on("127.0.0.1", extra)
    }

    /// `kiln dev` with its gateway listening on `ip` (`0.0.0.0` lets
    /// instances reach it at the host side of their link); clients still
    /// use 127.0.0.1.
    pub fn start_on(ip: &str, extra: &[&str]) -> Dev {
        let state = tempfile::Builder::new()
            .prefix("kiln-e2e-")
            .tempdir()
            .unwrap();
        let prefix = run_tag();
        let port = free_port();
        let log = std::fs::File::create(state.path().join("dev.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("dev")
            .arg("--state-dir")
            .arg(state.path())
            .arg("--listen")
            .arg(format!("{ip}:{port}"))
            .arg("--sandbox-prefix")
            .arg(&prefix)
            .arg("--instance-subnet")
            .arg(run_subnet())
            .arg("--rootfs-dir")
            .arg(rootfs_cache())
            .args(extra)
            .env("RUST_LOG", "info,kiln=debug")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn kiln dev");
        let creds_path = state.path().join("credentials.json");
        let mut dev = Dev {
            child,
            state,
            prefix,
            creds: placeholder_creds(),
            creds_path: creds_path.clone(),
        };
        // The first start builds the custom.debian12 root filesystem.
        let deadline = Instant::now() + Duration::from_secs(900);
        loop {
            if let Ok(c) = Credentials::load(&creds_path) {
                dev.creds = c;
                break;
            }
            if let Ok(Some(status)) = dev.child.try_wait() {
                panic!("kiln dev exited with {status}:\n{}", dev.log_tail());
            }
            if Instant::now() > deadline {
                panic!("kiln dev did not become ready:\n{}", dev.log_tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        dev
    }

    pub fn client(&self) -> FcClient {
        FcClient::new(self.creds.clone()).unwrap()
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.state.path().join("dev.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// Run the `kiln` CLI against this cluster.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("--credentials")
            .arg(&self.creds_path)
            .args(args)
            .output()
            .expect("run kiln")
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(30));
        leftovers_cleanup(&self.prefix);
    }
}

/// SIGTERM, wait, then SIGKILL a child we started.
pub fn terminate(child: &mut Child, grace: Duration) {
    // The pid is our own child's.
    signal(child.id(), nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Network namespaces whose names start with `prefix`.
pub fn netns_with_prefix(prefix: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output();
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(prefix))
            .map(str::to_owned)
            .collect()
    })
    .unwrap_or_default()
}

/// What a run with `prefix` has on the host: its network namespaces, its
/// nftables table and its cgroups, named (empty when nothing is left).
pub fn host_state_of(prefix: &str) -> Vec<String> {
    let mut found: Vec<String> = netns_with_prefix(prefix)
        .into_iter()
        .map(|ns| format!("netns {ns}"))
        .collect();
    if nft_table_exists(prefix) {
        found.push(format!("nft table inet {prefix}"));
    }
    found.extend(
        cgroup_tops(prefix)
            .into_iter()
            .map(|c| format!("cgroup {}", c.display())),
    );
    found
}

/// Whether the agent's isolation table (`inet <prefix>`) exists.
fn nft_table_exists(prefix: &str) -> bool {
    Command::new("nft")
        .args(["list", "table", "inet", prefix])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Remove what a run may have left: sandbox processes whose agent died
/// first, namespaces (their veths go with them), OVS bridges and the
/// cgroups named with this run's prefix. runc removes each container's cgroup; the parent the
/// agent was given stays until here.
pub fn leftovers_cleanup(prefix: &str) {
    kill_cgroup_processes(prefix);
    for ns in netns_with_prefix(prefix) {
        eprintln!("cleaning up leftover netns {ns}");
        let _ = Command::new("ip").args(["netns", "delete", &ns]).status();
    }
    // The agent's isolation table (`inet <prefix>`, in the host's
    // namespace for `kiln dev`), when its agent did not remove it.
    if nft_table_exists(prefix) {
        eprintln!("cleaning up leftover nft table inet {prefix}");
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", prefix])
            .status();
    }
    remove_ovs_bridges(prefix);
    remove_ifbs(prefix);
    remove_cgroups(prefix);
}

/// Delete the ifb devices (`<prefix>i<hex>`, an instance's shaped ingress,
/// in the host's namespace) that a killed agent left.
fn remove_ifbs(prefix: &str) {
    let Ok(out) = Command::new("ip").args(["-o", "link", "show"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line
            .split(": ")
            .nth(1)
            .map(|n| n.split('@').next().unwrap_or(n))
        else {
            continue;
        };
        let ours = name
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('i'))
            .is_some_and(|hex| !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()));
        if ours {
            eprintln!("cleaning up leftover ifb {name}");
            let _ = Command::new("ip").args(["link", "delete", name]).status();
        }
    }
}

/// Delete the Open vSwitch bridges named with `prefix` (an agent's VPC
/// bridges, `<prefix>v<n>`) that its agent did not remove. Without Open
/// vSwitch there are none.
fn remove_ovs_bridges(prefix: &str) {
    if !on_path("ovs-vsctl") {
        return;
    }
    let Ok(out) = Command::new("ovs-vsctl")
        .args(["--timeout=5", "list-br"])
        .output()
    else {
        return;
    };
    for br in String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|b| b.starts_with(prefix))
    {
        eprintln!("cleaning up leftover OVS bridge {br}");
        let _ = Command::new("ovs-vsctl")
            .args(["--timeout=5", "--if-exists", "del-br", br])
            .status();
    }
}

/// SIGKILL every process still in the run's cgroups: sandboxes whose agent
/// was killed (or whose test failed) before it removed them. They were
/// started by this run, in cgroups named with its prefix; a frozen cgroup
/// is thawed first so the signal is delivered. Their mounts and loop
/// devices go with their mount namespaces.
fn kill_cgroup_processes(prefix: &str) {
    let mut dirs = Vec::new();
    for top in cgroup_tops(prefix) {
        collect_dirs(&top, &mut dirs);
    }
    let mut pids = std::collections::BTreeSet::new();
    for dir in &dirs {
        let _ = std::fs::write(dir.join("freezer.state"), "THAWED");
        let _ = std::fs::write(dir.join("cgroup.freeze"), "0");
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
    }
    if pids.is_empty() {
        return;
    }
    eprintln!(
        "killing {} leftover sandbox processes of {prefix}",
        pids.len()
    );
    for pid in &pids {
        signal(*pid, nix::sys::signal::Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    // Gone, or a zombie waiting for its parent (init reaps sandboxes).
    let alive = |pid: &u32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .is_ok_and(|s| !s.contains("State:\tZ"))
    };
    while pids.iter().any(alive) {
        if Instant::now() > deadline {
            eprintln!("leftover sandbox processes of {prefix} did not exit in 5 s");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Send `sig` to `pid`; a process already gone is fine.
fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_owned());
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.path().is_dir() {
            collect_dirs(&entry.path(), out);
        }
    }
}

/// `rmdir` every cgroup directory named with `prefix`, deepest first, in
/// the v2 hierarchy and in every v1 controller. A cgroup with processes
/// stays (rmdir refuses), which is what we want.
fn remove_cgroups(prefix: &str) {
    for top in cgroup_tops(prefix) {
        rmdir_tree(&top);
    }
}

/// The run's top cgroup directories (named with `prefix`), in the v2
/// hierarchy and in every v1 controller.
fn cgroup_tops(prefix: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut tops = Vec::new();
    let hierarchies = std::iter::once(root.to_owned()).chain(
        std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir()),
    );
    for h in hierarchies {
        for entry in std::fs::read_dir(&h).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(prefix) && entry.path().is_dir() {
                tops.push(entry.path());
            }
        }
    }
    tops
}

fn rmdir_tree(dir: &Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.path().is_dir() {
            rmdir_tree(&entry.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

fn placeholder_creds() -> Credentials {
    Credentials {
        endpoint: String::new(),
        account_id: String::new(),
        access_key_id: String::new(),
        access_key_secret: String::new(),
        ca_cert: PathBuf::new(),
        security_token: None,
    }
}

/// The zip of an example function folder.
/// `curl --cacert CA -sS -D - --max-time 60 ARGS`: the status, the head
/// (lower case) and the body; curl itself must succeed.
pub fn curl(ca: &Path, args: &[&str]) -> (u16, String, Vec<u8>) {
    let out = Command::new("curl")
        .arg("--cacert")
        .arg(ca)
        .args(["-sS", "-D", "-", "--max-time", "60"])
        .args(args)
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let split = out
        .stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head");
    let head = String::from_utf8_lossy(&out.stdout[..split]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    (status, head, out.stdout[split + 4..].to_vec())
}

pub fn example_zip(name: &str) -> Vec<u8> {
    kiln::zipdir::zip_dir(&repo_root().join("examples").join(name)).unwrap()
}

/// Build examples/static-echo as a static binary into `dir/server`.
pub fn build_static_echo(dir: &Path) -> PathBuf {
    let out = dir.join("server");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let status = Command::new(rustc)
        .args(["-O", "-C", "target-feature=+crt-static", "-o"])
        .arg(&out)
        .arg(repo_root().join("examples/static-echo/main.rs"))
        .status()
        .expect("run rustc");
    assert!(status.success(), "building static-echo failed");
    out
}

pub fn service_bin(name: &str) -> PathBuf {
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

pub struct Services {
    pub children: Vec<Child>,
    pub prefix: String,
    pub dir: PathBuf,
    /// Log names, as given to [`spawn_service`].
    pub names: Vec<String>,
}

impl Drop for Services {
    fn drop(&mut self) {
        // Agents first (started last): they remove their sandboxes.
        for child in self.children.iter_mut().rev() {
            terminate(child, Duration::from_secs(30));
        }
        leftovers_cleanup(&self.prefix);
    }
}

impl Services {
    /// None started yet: `logs` names the `dir/<name>.log` files shown when
    /// one dies, and everything named with `prefix` is removed at the end.
    pub fn new(dir: &Path, prefix: &str, logs: &[&str]) -> Self {
        Self {
            children: vec![],
            prefix: prefix.to_owned(),
            dir: dir.to_owned(),
            names: logs.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    pub fn check_alive(&mut self) {
        for c in self.children.iter_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                let logs = self.logs();
                panic!("a service exited with {status}\n{logs}");
            }
        }
    }

    pub fn logs(&self) -> String {
        self.names
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

/// A test cluster's scheduler config: state under `dir/scheduler`,
/// listening on loopback `port`, the dev PKI's certificates, and `extra`
/// settings (whole lines) before them.
pub fn scheduler_config(dir: &Path, pki: &kiln_pki::DevPki, port: u16, extra: &str) -> String {
    format!(
        "state_dir = {:?}\nlisten = \"127.0.0.1:{port}\"\n{extra}{}",
        dir.join("scheduler"),
        tls_table(pki, "scheduler")
    )
}

/// Start `kiln-<binary>` with `config` written to `dir/<name>.toml`, its log
/// in `dir/<name>.log`.
pub fn spawn_service(dir: &Path, name: &str, binary: &str, config: &str) -> Child {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    Command::new(service_bin(&format!("kiln-{binary}")))
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start kiln-{binary}: {e}"))
}

/// What a test running the services as processes starts from: a state
/// directory named `prefix...` (removed when dropped), the dev PKI in it,
/// and free ports for the scheduler, the gateway's public listener and
/// its internal one.
pub fn cluster_dir(prefix: &str) -> (tempfile::TempDir, kiln_pki::DevPki, (u16, u16, u16)) {
    let state = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    let pki = kiln_pki::DevPki::ensure(&state.path().join("pki"), &[]).unwrap();
    (state, pki, (free_port(), free_port(), free_port()))
}

/// An API client of the gateway whose public listener is on loopback
/// `port`, signing with `key` (account id, access key id, secret).
pub fn loopback_client(
    pki: &kiln_pki::DevPki,
    port: u16,
    (account_id, access_key_id, access_key_secret): (&str, &str, &str),
) -> FcClient {
    FcClient::new(kiln::credentials::Credentials {
        endpoint: format!("https://127.0.0.1:{port}"),
        account_id: account_id.into(),
        access_key_id: access_key_id.into(),
        access_key_secret: access_key_secret.into(),
        ca_cert: pki.ca_cert(),
        security_token: None,
    })
    .unwrap()
}

pub fn tls_table(pki: &kiln_pki::DevPki, role: &str) -> String {
    let f = pki.files(role);
    format!(
        "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        f.ca, f.cert, f.key
    )
}

/// The config of a gateway run as its own process on loopback: public
/// listener on `public_port`, internal on `internal_port`, in front of
/// the scheduler on `scheduler_port`, with one bootstrap access key
/// (`key`: account id, access key id, secret).
pub fn gateway_config(
    dir: &Path,
    pki: &kiln_pki::DevPki,
    (scheduler_port, public_port, internal_port): (u16, u16, u16),
    (account_id, access_key_id, access_key_secret): (&str, &str, &str),
) -> String {
    let gw = pki.files("gateway");
    format!(
        "state_dir = {:?}\nregion = \"cn-hangzhou\"\nscheduler_url = \"https://127.0.0.1:{scheduler_port}\"\n\
         [public]\nlisten = \"127.0.0.1:{public_port}\"\ncert = {:?}\nkey = {:?}\n\
         [internal]\nlisten = \"127.0.0.1:{internal_port}\"\n{}\
         [[bootstrap_keys]]\naccount_id = {account_id:?}\naccess_key_id = {access_key_id:?}\naccess_key_secret = {access_key_secret:?}\n",
        dir.join("gateway"),
        gw.cert,
        gw.key,
        tls_table(pki, "gateway-internal")
    )
}

/// A real gateway, in-process, in front of `scheduler_url`, with one
/// bootstrap access key (`key`: account id, access key id, secret), and the
/// credentials.json the CLI reads for it, for tests that drive `kiln`
/// commands without sandboxes. Returns the gateway, the credentials file
/// and an API client with the same key.
pub async fn cli_gateway(
    dir: &Path,
    pki: &kiln_pki::DevPki,
    scheduler_url: &str,
    key: (&str, &str, &str),
) -> (kiln_gateway::GatewayHandle, PathBuf, FcClient) {
    cli_gateway_with(dir, pki, scheduler_url, key, |_| {}).await
}

/// [`cli_gateway`] with its configuration changed by `tweak` first.
pub async fn cli_gateway_with(
    dir: &Path,
    pki: &kiln_pki::DevPki,
    scheduler_url: &str,
    key: (&str, &str, &str),
    tweak: impl FnOnce(&mut kiln_gateway::GatewayConfig),
) -> (kiln_gateway::GatewayHandle, PathBuf, FcClient) {
    use kiln_gateway::config::BootstrapKey;
    let (account, access_key_id, secret) = key;
    let mut config = kiln_gateway::GatewayConfig {
        lease_hold_ms: 0,
        bootstrap_keys: vec![BootstrapKey::new(
            account.parse().unwrap(),
            access_key_id,
            secret,
        )],
        ..kiln_gateway::GatewayConfig::loopback(dir.join("gateway"), "cn-test", scheduler_url, pki)
    };
    tweak(&mut config);
    let gateway = kiln_gateway::start(config).await.unwrap();
    let creds = Credentials {
        endpoint: format!("https://localhost:{}", gateway.addr().port()),
        account_id: account.into(),
        access_key_id: access_key_id.into(),
        access_key_secret: secret.into(),
        ca_cert: pki.ca_cert(),
        security_token: None,
    };
    let credentials_path = dir.join("credentials.json");
    creds.write(&credentials_path).unwrap();
    let client = FcClient::new(creds).unwrap();
    (gateway, credentials_path, client)
}

/// A code package of one file.
pub fn one_file_zip(name: &str, content: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    w.start_file(name, zip::write::SimpleFileOptions::default())
        .unwrap();
    w.write_all(content).unwrap();
    w.finish().unwrap().into_inner()
}

/// A real scheduler in this process on a loopback port, with the dev
/// PKI's scheduler certificate and its state under `dir/scheduler`.
pub async fn loopback_scheduler(
    dir: &Path,
    pki: &kiln_pki::DevPki,
) -> kiln_scheduler::SchedulerHandle {
    kiln_scheduler::start(kiln_scheduler::SchedulerConfig::new(
        dir.join("scheduler"),
        "127.0.0.1:0".parse().unwrap(),
        pki.files("scheduler"),
    ))
    .await
    .unwrap()
}

/// A fake internal service (scheduler or agent) under `tls` on a loopback
/// port, answering every request with `f`, until the test ends.
pub async fn serve_fake<F, Fut>(
    tls: std::sync::Arc<rustls::ServerConfig>,
    f: F,
) -> std::net::SocketAddr
where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<kiln_internal_api::server::Body>>
        + Send
        + 'static,
{
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(kiln_internal_api::server::serve_tls(
        l,
        tls,
        move |req, _| f(req),
        std::future::pending(),
    ));
    addr
}
