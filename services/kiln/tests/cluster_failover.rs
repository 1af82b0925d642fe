//! `kiln dev --postgres URL --gateways 3` on a real PostgreSQL: three
//! gateway processes behind HAProxy, two schedulers (leader and standby),
//! the agent in kiln dev.
//!
//! - The topology: every process in cluster.json with its role, pid and
//!   address; the endpoint is HAProxy's; a gateway SIGKILLed is taken out
//!   by HAProxy and calls go on through the others; kiln dev starts it
//!   again; and when kiln dev itself is SIGKILLed nothing it started
//!   outlives it.
//! - The failure test: mixed sync and async load from three tenants (each
//!   with its own key and functions); one gateway SIGKILLed, then the
//!   scheduler leader, both started again by kiln dev; every async call
//!   answered 202 is delivered at least once (duplicates counted and
//!   printed), sync calls fail only inside the failover windows (printed),
//!   and afterwards the agent runs exactly the instances the leader knows.
//!   kiln dev then stops cleanly (SIGTERM) and every process it started is
//!   gone.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use kiln::client::FcClient;
use kiln_internal_api::{paths, Endpoints, InstanceInfo, InternalClient};
use kiln_test_support::postgres::PgServer;
use serde_json::{json, Value};

/// One process as kiln dev's cluster.json lists it.
#[derive(Debug, Clone)]
struct Process {
    name: String,
    role: String,
    pid: Option<u32>,
    address: String,
    restarts: u64,
}

fn cluster_json(dev: &common::Dev) -> Value {
    let text = std::fs::read_to_string(dev.state.path().join("cluster.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn processes(dev: &common::Dev) -> Vec<Process> {
    cluster_json(dev)["processes"]
        .as_array()
        .expect("cluster.json lists the processes")
        .iter()
        .map(|p| Process {
            name: p["name"].as_str().unwrap().to_owned(),
            role: p["role"].as_str().unwrap().to_owned(),
            pid: p["pid"].as_u64().map(|p| p as u32),
            address: p["address"].as_str().unwrap().to_owned(),
            restarts: p["restarts"].as_u64().unwrap(),
        })
        .collect()
}

fn process(dev: &common::Dev, name: &str) -> Process {
    processes(dev)
        .into_iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("{name} is not in cluster.json"))
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// SIGKILL a process kiln dev started (its pid from cluster.json).
fn sigkill(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

/// Wait until kiln dev has started `name` again after `old_pid` died.
fn restarted(dev: &common::Dev, name: &str, old_pid: u32) -> Process {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = process(dev, name);
        if let Some(pid) = p.pid.filter(|p| *p != old_pid && alive(*p)) {
            eprintln!("kiln dev started {name} again: pid {old_pid} -> {pid}");
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "kiln dev did not start {name} again:\n{}",
            dev.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The status of `GET /healthz` on the gateway at `addr` (0: no answer).
fn healthz(ca: &std::path::Path, addr: &str) -> u16 {
    let port = addr.rsplit(':').next().unwrap();
    let out = std::process::Command::new("curl")
        .arg("--cacert")
        .arg(ca)
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
        ])
        .arg(format!("https://localhost:{port}/healthz"))
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

fn cluster_dev(pg: &PgServer, db: &str) -> common::Dev {
    let url = pg.create_database(db);
    common::Dev::start_with(&["--postgres", &url, "--gateways", "3"])
}

fn skip() -> bool {
    common::skip() || common::skip_without(&["haproxy"])
}

fn function(name: &str, concurrency: u32) -> Value {
    json!({
        "functionName": name,
        "runtime": "custom.debian12",
        "handler": "index.handler",
        "memorySize": 128,
        "instanceConcurrency": concurrency,
        "timeout": 10,
        "customRuntimeConfig": {"command": ["python3", "server.py"]},
        "code": {"zipFile": base64::engine::general_purpose::STANDARD.encode(common::example_zip("hello-python"))},
    })
}

/// Call `name` until it answers 200 (a function created through one
/// gateway reaches the others within a second; the first call is cold).
async fn until_served(c: &FcClient, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match c.invoke(name, Bytes::from_static(b"{}"), &[]).await {
            Ok(r) if r.status == 200 && r.header("x-fc-error-type").is_none() => return,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "{name} never answered: {:?}",
                    other.map(|r| (r.status, String::from_utf8_lossy(&r.body).into_owned()))
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn ok(r: &Result<kiln::client::ApiResponse, kiln::client::ClientError>, status: u16) -> bool {
    matches!(r, Ok(r) if r.status == status && r.header("x-fc-error-type").is_none())
}

fn describe(r: &Result<kiln::client::ApiResponse, kiln::client::ClientError>) -> String {
    match r {
        Ok(r) => format!("{} {}", r.status, String::from_utf8_lossy(&r.body)),
        Err(e) => format!("{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kiln_dev_runs_gateways_and_schedulers_as_processes_behind_haproxy() {
    if skip() {
        return;
    }
    let Some(pg) = PgServer::start() else { return };
    let mut dev = cluster_dev(&pg, "cluster_topology");
    let all = processes(&dev);
    let roles: BTreeMap<String, usize> = all.iter().fold(BTreeMap::new(), |mut m, p| {
        *m.entry(p.role.clone()).or_default() += 1;
        m
    });
    assert_eq!(
        roles,
        BTreeMap::from([
            ("agent".into(), 1),
            ("gateway".into(), 3),
            ("haproxy".into(), 1),
            ("scheduler".into(), 2)
        ]),
        "{all:?}"
    );
    for p in &all {
        let pid = p.pid.unwrap_or_else(|| panic!("{} has no pid", p.name));
        assert!(alive(pid), "{} ({pid}) is not running", p.name);
        let expected_pid = p.role == "agent";
        assert_eq!(pid == dev.child.id(), expected_pid, "{p:?}");
    }
    // Clients get HAProxy, which listens where kiln dev was told to.
    let haproxy = process(&dev, "haproxy");
    assert_eq!(
        dev.creds.endpoint,
        format!("https://{}", haproxy.address),
        "credentials.json's endpoint is HAProxy's"
    );
    assert_eq!(cluster_json(&dev)["endpoint"], dev.creds.endpoint);
    // Every gateway answers its health check directly, unauthenticated.
    for g in all.iter().filter(|p| p.role == "gateway") {
        assert_eq!(healthz(&dev.creds.ca_cert, &g.address), 200, "{}", g.name);
    }

    let c = dev.client();
    c.create_function(&function("steady", 4)).await.unwrap();
    until_served(&c, "steady").await;

    // An HTTP trigger's host reaches its function through HAProxy (TLS
    // passes through; the gateway picks the certificate by SNI), and its
    // URL names HAProxy's port.
    let out = dev.cli(&[
        "triggers", "create", "steady", "site", "--type", "http", "--method", "POST", "-o", "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let trigger: Value = serde_json::from_slice(&out.stdout).unwrap();
    let url = trigger["httpTrigger"]["urlInternet"]
        .as_str()
        .unwrap()
        .to_owned();
    let haproxy_port = haproxy.address.rsplit(':').next().unwrap();
    assert!(
        url.ends_with(&format!(".fcapp.localhost:{haproxy_port}")),
        "{url}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // hello-python answers any path but /invoke with a 404 of its own.
        let (status, _, body) = tokio::task::block_in_place(|| {
            common::curl(
                &dev.creds.ca_cert,
                &["-X", "POST", "--data-binary", "x", &format!("{url}/")],
            )
        });
        let body = String::from_utf8_lossy(&body).into_owned();
        if body.contains("unknown path /") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the trigger never reached its function: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // A gateway SIGKILLed: HAProxy takes it out, calls go on.
    let victim = process(&dev, "gateway-1");
    let old = victim.pid.unwrap();
    sigkill(old);
    let killed = Instant::now();
    let mut failures = vec![];
    let mut calls = 0;
    while killed.elapsed() < Duration::from_secs(6) {
        let at = killed.elapsed();
        let r = c
            .invoke("steady", Bytes::from_static(br#"{"sleep": 0.02}"#), &[])
            .await;
        calls += 1;
        if !ok(&r, 200) {
            failures.push((at, describe(&r)));
        }
    }
    eprintln!(
        "gateway-1 SIGKILLed: {calls} calls in the next 6 s, {} failed: {failures:?}",
        failures.len()
    );
    for (at, what) in &failures {
        assert!(
            *at < Duration::from_secs(2),
            "a call failed {at:?} after the kill, when HAProxy should have taken the gateway out: {what}"
        );
    }
    let again = tokio::task::block_in_place(|| restarted(&dev, "gateway-1", old));
    assert_eq!(again.restarts, 1);
    let deadline = Instant::now() + Duration::from_secs(60);
    while healthz(&dev.creds.ca_cert, &again.address) != 200 {
        assert!(Instant::now() < deadline, "gateway-1 never came back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // HAProxy's health checks took it out and put it back.
    let haproxy_log = dev.state.path().join("cluster").join("haproxy.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = std::fs::read_to_string(&haproxy_log).unwrap_or_default();
        let down = log.find("Server kiln-gateways/gateway-1 is DOWN");
        let up = log.rfind("Server kiln-gateways/gateway-1 is UP");
        if down.is_some() && up > down {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "HAProxy never marked gateway-1 down and up again:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // kiln dev SIGKILLed: the kernel takes every process it started.
    let children: Vec<Process> = processes(&dev)
        .into_iter()
        .filter(|p| p.role != "agent")
        .collect();
    dev.child.kill().unwrap();
    dev.child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<&Process> = children
            .iter()
            .filter(|p| p.pid.is_some_and(alive))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processes outlived kiln dev: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(dev);
    drop(pg);
}

/// A compute node dedicated to `account` beside kiln dev's own (which is
/// dedicated to the first account that places on it): `kiln serve agent`
/// as a process, its node certificate from kiln dev's CA, both
/// schedulers, and the gateways' internal API through HAProxy.
fn tenant_agent(dev: &common::Dev, account: &str, suffix: char) -> (std::process::Child, Node) {
    let state = dev.state.path();
    let pki = kiln_pki::DevPki::ensure(&state.join("pki"), &[]).unwrap();
    let node: kiln_core::NodeId = format!("n-t{suffix}").parse().unwrap();
    let tls = pki.agent(&node).unwrap();
    let cluster = cluster_json(dev);
    let schedulers: Vec<&str> = cluster["schedulerUrls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap())
        .collect();
    let dir = state.join(format!("agent-{suffix}"));
    let prefix = format!("{}{suffix}", dev.prefix);
    let port = common::free_port();
    let config = format!(
        "state_dir = {:?}\nlisten = \"127.0.0.1:{}\"\nscheduler_url = {:?}\n\
         gateway_internal_url = {:?}\ndrain_on_shutdown = true\n\
         [tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
         [node]\ntenancy = \"dedicated\"\ndedicated_account = {account:?}\n\
         memory_mb = 4096\ncpu_milli = 16000\nmax_instances = 64\n\
         [sandbox]\nname_prefix = {prefix:?}\ninstance_subnet = {:?}\ncgroup_parent = {prefix:?}\n\
         rootfs_dir = {:?}\ninsecure_network_isolation_disabled = true\n",
        dir,
        port,
        schedulers.join(","),
        cluster["gatewayInternalUrl"].as_str().unwrap(),
        tls.ca,
        tls.cert,
        tls.key,
        common::run_subnet(),
        common::rootfs_cache(),
    );
    let path = state.join(format!("agent-{suffix}.toml"));
    std::fs::write(&path, config).unwrap();
    let log = std::fs::File::create(state.join(format!("agent-{suffix}.log"))).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["serve", "agent", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start kiln serve agent");
    let node = Node {
        url: format!("https://127.0.0.1:{port}"),
        runc_root: dir.join("runc"),
        prefix,
    };
    (child, node)
}

/// A compute node as the leak check sees it: its agent's API, where its
/// containers are, and their names' prefix.
struct Node {
    url: String,
    runc_root: std::path::PathBuf,
    prefix: String,
}

/// One tenant: its client and its functions.
struct Tenant {
    name: String,
    client: Arc<FcClient>,
}

/// A call's record: when it started (since t0), whether it did what it
/// should, and what it got.
type Call = (Duration, bool, String);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_and_the_scheduler_leader_killed_under_load_lose_no_accepted_call() {
    if skip() {
        return;
    }
    let Some(pg) = PgServer::start() else { return };
    let mut dev = cluster_dev(&pg, "cluster_failover");
    let state = dev.state.path().to_owned();

    // Three tenants: kiln dev's account and two more with their own keys.
    let keys = kiln::commands::keys::Gateway::from_state_dir(&state).unwrap();
    let mut tenants = vec![Tenant {
        name: "dev".into(),
        client: Arc::new(dev.client()),
    }];
    // Their nodes, stopped (SIGTERM: they remove their sandboxes) before
    // kiln dev is.
    let mut agents = TenantAgents(vec![]);
    let mut nodes = vec![Node {
        url: cluster_json(&dev)["agentUrl"].as_str().unwrap().to_owned(),
        runc_root: kiln::dev_config::agent_state_dir(&state).join("runc"),
        prefix: dev.prefix.clone(),
    }];
    for (account, suffix) in [("1300000000000171", 'a'), ("1300000000000172", 'b')] {
        let (child, node) = tenant_agent(&dev, account, suffix);
        agents.0.push(child);
        nodes.push(node);
    }
    for account in ["1300000000000171", "1300000000000172"] {
        let key = keys.create(account).await.unwrap();
        let mut creds = dev.creds.clone();
        creds.account_id = account.into();
        creds.access_key_id = key.access_key_id;
        creds.access_key_secret = key.access_key_secret;
        tenants.push(Tenant {
            name: account.into(),
            client: Arc::new(FcClient::new(creds).unwrap()),
        });
    }
    for t in &tenants {
        // A new key reaches every gateway within a second.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match t.client.create_function(&function("steady", 4)).await {
                Ok(_) => break,
                Err(e) => assert!(Instant::now() < deadline, "{}: {e}", t.name),
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        t.client
            .create_function(&function("recorder", 10))
            .await
            .unwrap();
        until_served(&t.client, "steady").await;
        until_served(&t.client, "recorder").await;
    }

    // Load: per tenant two sync callers and one async caller, for 45 s.
    let t0 = Instant::now();
    let load_for = Duration::from_secs(45);
    let mut sync_workers = vec![];
    let mut async_workers = vec![];
    for t in &tenants {
        for _ in 0..2 {
            let c = t.client.clone();
            sync_workers.push(tokio::spawn(async move {
                let mut calls: Vec<Call> = vec![];
                while t0.elapsed() < load_for {
                    let at = t0.elapsed();
                    let r = tokio::time::timeout(
                        Duration::from_secs(60),
                        c.invoke("steady", Bytes::from_static(br#"{"sleep": 0.05}"#), &[]),
                    )
                    .await
                    .expect("a sync call hung for 60 s");
                    calls.push((at, ok(&r, 200), describe(&r)));
                }
                calls
            }));
        }
        let c = t.client.clone();
        let name = t.name.clone();
        async_workers.push(tokio::spawn(async move {
            let mut accepted: Vec<String> = vec![];
            let mut refused: Vec<Call> = vec![];
            while t0.elapsed() < load_for {
                let at = t0.elapsed();
                let r = tokio::time::timeout(
                    Duration::from_secs(60),
                    c.invoke(
                        "recorder",
                        Bytes::from_static(b"{}"),
                        &[("x-fc-invocation-type", "Async")],
                    ),
                )
                .await
                .expect("an async call hung for 60 s");
                match &r {
                    Ok(resp) if resp.status == 202 => accepted.push(
                        resp.header("x-fc-request-id")
                            .expect("a 202 names its request id")
                            .to_owned(),
                    ),
                    _ => refused.push((at, false, describe(&r))),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (name, accepted, refused)
        }));
    }

    // At 10 s a gateway dies; at 25 s the scheduler leader. kiln dev
    // starts both again.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let gw = process(&dev, "gateway-2");
    let gw_pid = gw.pid.unwrap();
    let gateway_killed = t0.elapsed();
    sigkill(gw_pid);
    eprintln!("SIGKILLed gateway-2 (pid {gw_pid}) at {gateway_killed:?}");
    let _ = tokio::task::block_in_place(|| restarted(&dev, "gateway-2", gw_pid));

    tokio::time::sleep(Duration::from_secs(25).saturating_sub(t0.elapsed())).await;
    let operator = InternalClient::new(&kiln_pki::DevPki::files_in(&state.join("pki"), "operator"))
        .unwrap()
        .with_timeout(Duration::from_secs(3));
    let schedulers: Vec<Process> = processes(&dev)
        .into_iter()
        .filter(|p| p.role == "scheduler")
        .collect();
    let mut leader = None;
    for s in &schedulers {
        if operator
            .get::<Value>(&format!("https://{}", s.address), paths::HEALTH)
            .await
            .is_ok()
        {
            leader = Some(s.clone());
        }
    }
    let leader = leader.expect("one scheduler leads");
    let leader_pid = leader.pid.unwrap();
    let leader_killed = t0.elapsed();
    sigkill(leader_pid);
    eprintln!(
        "SIGKILLed the scheduler leader {} (pid {leader_pid}) at {leader_killed:?}",
        leader.name
    );
    let _ = tokio::task::block_in_place(|| restarted(&dev, &leader.name, leader_pid));

    let mut sync_calls: Vec<Call> = vec![];
    for w in sync_workers {
        sync_calls.extend(w.await.unwrap());
    }
    // cluster.json names the new leader for the operator commands.
    let standby = schedulers.iter().find(|s| s.name != leader.name).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster_json(&dev)["schedulerUrl"] != format!("https://{}", standby.address) {
        assert!(
            Instant::now() < deadline,
            "cluster.json does not name the new leader {}: {}",
            standby.name,
            cluster_json(&dev)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut accepted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut async_refused: Vec<Call> = vec![];
    for w in async_workers {
        let (name, ids, refused) = w.await.unwrap();
        accepted.insert(name, ids);
        async_refused.extend(refused);
    }

    // Sync calls fail only inside a failover window: from the kill until
    // HAProxy has taken the gateway out (and the callers' connections to
    // it are gone), or until the standby leads (lease 5 s plus a renewal).
    let windows = [
        ("gateway", gateway_killed, Duration::from_secs(5)),
        ("scheduler", leader_killed, Duration::from_secs(10)),
    ];
    let in_window = |at: Duration| {
        windows
            .iter()
            .find(|(_, start, len)| at + Duration::from_secs(1) >= *start && at <= *start + *len)
            .map(|w| w.0)
    };
    let failed: Vec<&Call> = sync_calls.iter().filter(|c| !c.1).collect();
    for (at, _, what) in &failed {
        eprintln!("  a sync call started at {at:?} failed: {what:.200}");
    }
    eprintln!("sync: {} calls, {} failed", sync_calls.len(), failed.len());
    for (what, start, len) in windows {
        let inside: Vec<Duration> = failed
            .iter()
            .filter(|c| in_window(c.0) == Some(what))
            .map(|c| c.0)
            .collect();
        eprintln!(
            "  {what} window ({start:?} + {len:?}): {} failed, at {inside:?}",
            inside.len()
        );
    }
    let outside: Vec<&&Call> = failed.iter().filter(|c| in_window(c.0).is_none()).collect();
    assert!(
        outside.is_empty(),
        "sync calls failed outside the failover windows: {outside:?}\n{}",
        dev.log_tail()
    );
    eprintln!(
        "async: {} accepted, {} refused at {:?}",
        accepted.values().map(Vec::len).sum::<usize>(),
        async_refused.len(),
        async_refused.iter().map(|c| c.0).collect::<Vec<_>>()
    );
    for (at, _, what) in &async_refused {
        eprintln!("  an async call sent at {at:?} was refused: {what:.200}");
    }
    let outside: Vec<&Call> = async_refused
        .iter()
        .filter(|c| in_window(c.0).is_none())
        .collect();
    assert!(
        outside.is_empty(),
        "async calls refused outside the failover windows: {outside:?}"
    );
    let late = sync_calls
        .iter()
        .filter(|c| c.0 > leader_killed + Duration::from_secs(10))
        .count();
    assert!(late >= 10, "too few calls after both failovers: {late}");

    // Every 202 is delivered at least once: each delivery is an "FC
    // Invoke Start RequestId: <id>" line of the recorder's logs.
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut duplicates_total = 0;
    for t in &tenants {
        let ids = &accepted[&t.name];
        loop {
            let deliveries = deliveries(&t.client).await;
            let missing: Vec<&String> = ids
                .iter()
                .filter(|id| !deliveries.contains_key(id.as_str()))
                .collect();
            if missing.is_empty() {
                let dups: Vec<(&String, usize)> = ids
                    .iter()
                    .map(|id| (id, deliveries[id.as_str()]))
                    .filter(|(_, n)| *n > 1)
                    .collect();
                duplicates_total += dups.len();
                eprintln!(
                    "tenant {}: {} accepted, all delivered; {} delivered more than once: {dups:?}",
                    t.name,
                    ids.len(),
                    dups.len()
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "tenant {}: {} of {} accepted calls never delivered: {:?}\n{}",
                t.name,
                missing.len(),
                ids.len(),
                &missing[..missing.len().min(20)],
                dev.log_tail()
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    eprintln!("duplicates over all tenants: {duplicates_total}");

    // No instance leaked: the agents together run exactly the instances
    // the leader knows, each on one node once, and every container of a
    // node is one of its instances (or a pre-made sandbox not yet
    // claimed, `<prefix>-p<n>`, which kiln dev's own node keeps; a claimed
    // one keeps its name, so there the agent's own list is the check).
    let urls: Vec<String> = schedulers
        .iter()
        .map(|s| format!("https://{}", s.address))
        .collect();
    let leader_now = Endpoints::parse(&urls.join(",")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let instances: Vec<InstanceInfo> = leader_now
            .call(|base| {
                let operator = &operator;
                async move { operator.get(&base, paths::SCHEDULER_INSTANCES).await }
            })
            .await
            .unwrap();
        let known: BTreeSet<String> = instances
            .iter()
            .map(|i| i.instance_id.as_str().to_owned())
            .collect();
        assert_eq!(
            known.len(),
            instances.len(),
            "an instance listed twice: {instances:?}"
        );
        let mut problems = vec![];
        let mut on_agents: Vec<String> = vec![];
        for node in &nodes {
            let listed: Vec<InstanceInfo> = operator
                .get(&node.url, paths::AGENT_INSTANCES)
                .await
                .unwrap();
            let ids: BTreeSet<String> = listed
                .iter()
                .map(|i| i.instance_id.as_str().to_owned())
                .collect();
            on_agents.extend(ids.iter().cloned());
            for c in containers(&node.runc_root) {
                let premade = c
                    .strip_prefix(&format!("{}-p", node.prefix))
                    .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()));
                if !premade && !ids.iter().any(|id| c.contains(id.as_str())) {
                    problems.push(format!(
                        "{}: container {c} is no instance of its agent",
                        node.url
                    ));
                }
            }
        }
        let running: BTreeSet<String> = on_agents.iter().cloned().collect();
        if running.len() != on_agents.len() {
            problems.push(format!("an instance on two nodes: {on_agents:?}"));
        }
        if running != known {
            problems.push(format!(
                "agents run {running:?}, the leader knows {known:?}"
            ));
        }
        if problems.is_empty() {
            eprintln!(
                "{} instances on {} nodes, all known to the leader ({}), no stray container",
                known.len(),
                nodes.len(),
                leader_now.current()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "instances leaked or lost: {problems:#?}\n{}",
            dev.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    drop(agents);
    // A clean stop: SIGTERM, exit 0, and every process kiln dev started
    // is gone.
    let children: Vec<Process> = processes(&dev)
        .into_iter()
        .filter(|p| p.role != "agent")
        .collect();
    common::terminate(&mut dev.child, Duration::from_secs(60));
    let status = dev.child.wait().unwrap();
    assert!(status.success(), "kiln dev exited with {status}");
    let left: Vec<&Process> = children
        .iter()
        .filter(|p| p.pid.is_some_and(alive))
        .collect();
    assert!(left.is_empty(), "processes outlived kiln dev: {left:?}");
    drop(dev);
    drop(pg);
}

/// The tenants' agents, stopped with SIGTERM (and SIGKILL after 30 s)
/// even when the test fails.
struct TenantAgents(Vec<std::process::Child>);

impl Drop for TenantAgents {
    fn drop(&mut self) {
        for child in &mut self.0 {
            common::terminate(child, Duration::from_secs(30));
        }
    }
}

/// How many times each request id was delivered to the tenant's recorder.
async fn deliveries(c: &FcClient) -> BTreeMap<String, usize> {
    const START: &str = "FC Invoke Start RequestId: ";
    let r = c
        .request(
            http::Method::GET,
            "/2023-03-30/functions/recorder/logs",
            &[("limit", "10000")],
            &[],
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json().unwrap();
    let mut out = BTreeMap::new();
    for line in v["logs"].as_array().into_iter().flatten() {
        if let Some(id) = line["message"].as_str().and_then(|m| m.strip_prefix(START)) {
            *out.entry(id.trim().to_owned()).or_insert(0) += 1;
        }
    }
    out
}

fn containers(runc_root: &std::path::Path) -> BTreeSet<String> {
    let out = std::process::Command::new("runc")
        .arg("--root")
        .arg(runc_root)
        .args(["list", "-q"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `kiln serve` under kiln dev (`KILN_DEV_PARENT`) starts only while that
/// parent lives: a child whose parent died before it asked for the death
/// signal must not run on orphaned.
#[test]
fn a_served_process_whose_parent_is_gone_does_not_start() {
    let serve = |parent: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["serve", "exec", "--", "/bin/true"])
            .env("KILN_DEV_PARENT", parent)
            .output()
            .unwrap()
    };
    let ours = serve(&std::process::id().to_string());
    assert!(ours.status.success(), "{ours:?}");
    // pid 1 is not this test: as if kiln dev had died and the child been
    // reparented.
    let orphan = serve("1");
    assert!(!orphan.status.success());
    assert!(
        String::from_utf8_lossy(&orphan.stderr).contains("(pid 1) is gone; not starting"),
        "{orphan:?}"
    );
    let bad = serve("kiln");
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("must be a process id"),
        "{bad:?}"
    );
}
