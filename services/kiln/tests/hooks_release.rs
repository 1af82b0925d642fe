//! FC's PreStop hook on every way an instance is released, end to end on
//! `kiln dev` (runc sandboxes): the idle timeout, a provisioned
//! configuration scaled in, and a drained node. Each test reads what the
//! function printed in PreStop from the function's log (the agent keeps
//! it) and the hook's outcome and duration from the dev log. Also a
//! timed-out initializer.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use hyper::Method;
use serde_json::{json, Value};

use common::{example_zip, Dev};

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn dev_log(dev: &Dev) -> String {
    std::fs::read_to_string(dev.state.path().join("dev.log")).unwrap_or_default()
}

/// hello-python with an initializer and a PreStop of `pre_stop_timeout` s;
/// `env` is passed to the function (PRE_STOP_SLEEP, INITIALIZER_SLEEP).
async fn create_hooked(
    dev: &Dev,
    name: &str,
    env: Value,
    init_timeout: u32,
    pre_stop_timeout: u32,
) {
    dev.client()
        .create_function(&json!({
            "functionName": name,
            "runtime": "custom.debian12",
            "handler": "index.handler",
            "memorySize": 128,
            "timeout": 10,
            "customRuntimeConfig": {"command": ["python3", "server.py"], "port": 9000},
            "environmentVariables": env,
            "instanceLifecycleConfig": {
                "initializer": {"handler": "index.initialize", "timeout": init_timeout},
                "preStop": {"handler": "index.preStop", "timeout": pre_stop_timeout},
            },
            "code": {"zipFile": b64(&example_zip("hello-python"))},
        }))
        .await
        .unwrap_or_else(|e| panic!("create {name} failed: {e}\n{}", dev.log_tail()));
}

async fn get(dev: &Dev, path: &str) -> Value {
    dev.client()
        .request(Method::GET, path, &[], &[], Bytes::new())
        .await
        .unwrap()
        .error_for_status()
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
        .json()
        .unwrap()
}

async fn put(dev: &Dev, path: &str, doc: &Value) -> Value {
    dev.client()
        .request(Method::PUT, path, &[], &[], Bytes::from(doc.to_string()))
        .await
        .unwrap()
        .error_for_status()
        .unwrap_or_else(|e| panic!("PUT {path}: {e}"))
        .json()
        .unwrap()
}

/// The function's log lines.
async fn logs(dev: &Dev, function: &str) -> Vec<Value> {
    let v = get(dev, &format!("/2023-03-30/functions/{function}/logs")).await;
    v["logs"].as_array().cloned().unwrap_or_default()
}

/// The function's live instances (ListInstances).
async fn instances(dev: &Dev, function: &str) -> Vec<String> {
    let v = get(dev, &format!("/2023-03-30/functions/{function}/instances")).await;
    v["instances"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|i| i["instanceId"].as_str().unwrap().to_owned())
        .collect()
}

/// One PreStop as the function printed it: `pre-stop <request id> <time>`.
#[derive(Debug)]
struct PreStop {
    instance: String,
    request_id: String,
    at: f64,
}

fn pre_stops(lines: &[Value]) -> Vec<PreStop> {
    lines
        .iter()
        .filter_map(|l| {
            let msg = l["message"].as_str()?;
            let mut words = msg.strip_prefix("pre-stop ")?.split(' ');
            Some(PreStop {
                instance: l["instanceId"].as_str()?.to_owned(),
                request_id: words.next()?.to_owned(),
                at: words.next()?.parse().ok()?,
            })
        })
        .collect()
}

/// A dev log line without its colours.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The dev log's PreStop outcome lines for `instance`.
fn pre_stop_outcomes(dev: &Dev, instance: &str) -> Vec<String> {
    dev_log(dev)
        .lines()
        .map(plain)
        .filter(|l| l.contains("lifecycle hook") && l.contains("PreStop") && l.contains(instance))
        .collect()
}

/// The `ms=` field of a tracing line.
fn ms(line: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("ms="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no ms= in {line}"))
}

/// Wait until the function printed `n` PreStops, each on an instance of
/// its own, and the agent logged the outcome of each and removed it.
async fn wait_for_pre_stops(dev: &Dev, function: &str, n: usize, within: Duration) -> Vec<PreStop> {
    let deadline = Instant::now() + within;
    loop {
        let seen = pre_stops(&logs(dev, function).await);
        let done = seen.len() >= n
            && seen
                .iter()
                .all(|p| !pre_stop_outcomes(dev, &p.instance).is_empty())
            && instances(dev, function).await.is_empty();
        if done {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "{function}: {} PreStops of {n} after {within:?}: {seen:?}\n{}",
            seen.len(),
            dev.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The instance that served the call `rid`, from the function's log.
async fn instance_of(dev: &Dev, function: &str, rid: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = logs(dev, function).await;
        if let Some(l) = lines.iter().find(|l| l["requestId"] == rid) {
            return l["instanceId"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "no log line of {rid}: {lines:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn call(dev: &Dev, function: &str, body: &'static [u8]) -> String {
    let r = dev
        .client()
        .invoke(function, Bytes::from_static(body), &[])
        .await
        .unwrap();
    assert_eq!(
        r.status,
        200,
        "{}\n{}",
        String::from_utf8_lossy(&r.body),
        dev.log_tail()
    );
    assert_eq!(r.header("x-fc-error-type"), None);
    r.header("x-fc-request-id").unwrap().to_owned()
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_release_runs_pre_stop_and_a_hanging_one_is_cut_at_its_timeout() {
    if common::skip() {
        return;
    }
    let dev = Dev::start_with(&["--idle-timeout", "2"]);
    // PreStop sleeps 30 s; its timeout is 2 s.
    create_hooked(&dev, "idler", json!({"PRE_STOP_SLEEP": "30"}), 10, 2).await;
    let rid = call(&dev, "idler", b"{}").await;
    let instance = instance_of(&dev, "idler", &rid).await;
    let idle_since = Instant::now();

    let seen = wait_for_pre_stops(&dev, "idler", 1, Duration::from_secs(30)).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].instance, instance);
    assert!(!seen[0].request_id.is_empty() && seen[0].request_id != rid);
    // Not before the idle timeout, and cut at PreStop's 2 s, not its 30.
    assert!(idle_since.elapsed() >= Duration::from_secs(2));
    assert!(idle_since.elapsed() < Duration::from_secs(20));
    let outcome = pre_stop_outcomes(&dev, &instance);
    assert_eq!(outcome.len(), 1, "{outcome:?}");
    assert!(
        outcome[0].contains("lifecycle hook failed")
            && outcome[0].contains("PreStop hook did not finish within 2 s"),
        "{outcome:?}"
    );
    let took = ms(&outcome[0]);
    assert!((1900..6000).contains(&took), "PreStop took {took} ms");

    // The next call starts a fresh instance.
    let rid = call(&dev, "idler", b"{}").await;
    assert_ne!(instance_of(&dev, "idler", &rid).await, instance);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_provisioned_instances_in_runs_pre_stop_on_each() {
    if common::skip() {
        return;
    }
    let dev = Dev::start();
    // PreStop takes 1 s of its 5.
    create_hooked(&dev, "warm", json!({"PRE_STOP_SLEEP": "1"}), 10, 5).await;
    let prov = "/2023-03-30/functions/warm/provision-config";
    put(&dev, prov, &json!({"target": 2})).await;
    let deadline = Instant::now() + Duration::from_secs(40);
    while get(&dev, prov).await["current"] != 2 || instances(&dev, "warm").await.len() != 2 {
        assert!(
            Instant::now() < deadline,
            "no two provisioned instances: {}\n{}",
            get(&dev, prov).await,
            dev.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut before = instances(&dev, "warm").await;
    before.sort();
    assert!(pre_stops(&logs(&dev, "warm").await).is_empty());

    put(&dev, prov, &json!({"target": 0})).await;
    let seen = wait_for_pre_stops(&dev, "warm", 2, Duration::from_secs(30)).await;
    let mut stopped: Vec<String> = seen.iter().map(|p| p.instance.clone()).collect();
    stopped.sort();
    assert_eq!(stopped, before, "{seen:?}");
    for i in &before {
        let outcome = pre_stop_outcomes(&dev, i);
        assert_eq!(outcome.len(), 1, "{outcome:?}");
        assert!(
            outcome[0].contains("lifecycle hook succeeded"),
            "{outcome:?}"
        );
        let took = ms(&outcome[0]);
        assert!((900..5000).contains(&took), "PreStop took {took} ms");
    }
    assert_eq!(get(&dev, prov).await["current"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_the_node_runs_pre_stop_once_the_call_in_flight_is_done() {
    if common::skip() {
        return;
    }
    let dev = Dev::start();
    create_hooked(&dev, "drained", json!({}), 10, 5).await;
    let rid = call(&dev, "drained", b"{}").await;
    let instance = instance_of(&dev, "drained", &rid).await;

    let state_dir = dev.state.path().to_str().unwrap().to_owned();
    let out = dev.cli(&["nodes", "list", "--json", "--state-dir", &state_dir]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nodes: Value = serde_json::from_slice(&out.stdout).unwrap();
    let node = nodes[0]["nodeId"]
        .as_str()
        .or(nodes[0]["node_id"].as_str())
        .unwrap_or_else(|| panic!("no node id in {nodes}"))
        .to_owned();

    // A 3 s call is in flight when the node is drained: it finishes, then
    // the instance goes, with PreStop.
    let started = now_s();
    let busy = {
        let c = dev.client();
        tokio::spawn(async move {
            c.invoke("drained", Bytes::from_static(br#"{"sleep": 3}"#), &[])
                .await
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let out = dev.cli(&["nodes", "drain", &node, "--state-dir", &state_dir]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r = busy.await.unwrap().unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("x-fc-error-type"), None);

    let seen = wait_for_pre_stops(&dev, "drained", 1, Duration::from_secs(30)).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].instance, instance);
    assert!(
        seen[0].at >= started + 2.5,
        "PreStop at {} before the call in flight ended (started {started})",
        seen[0].at
    );
    let outcome = pre_stop_outcomes(&dev, &instance);
    assert!(
        outcome[0].contains("lifecycle hook succeeded"),
        "{outcome:?}"
    );

    // A drained node takes no new calls' instances.
    let r = dev
        .client()
        .invoke("drained", Bytes::new(), &[])
        .await
        .unwrap();
    assert_ne!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_initializer_fails_the_call_and_the_instance_is_not_used() {
    if common::skip() {
        return;
    }
    let dev = Dev::start();
    // The initializer sleeps 30 s; its timeout is 2 s.
    create_hooked(&dev, "slowinit", json!({"INITIALIZER_SLEEP": "30"}), 2, 5).await;
    let mut failed_on = Vec::new();
    for _ in 0..2 {
        let started = Instant::now();
        let r = dev
            .client()
            .invoke("slowinit", Bytes::from_static(br#"{"hooks": true}"#), &[])
            .await
            .unwrap();
        let body = String::from_utf8_lossy(&r.body).into_owned();
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the call waited {:?}",
            started.elapsed()
        );
        assert_eq!(r.status, 200, "{body}");
        assert_eq!(
            r.header("x-fc-error-type"),
            Some("UnhandledInitializationError"),
            "{body}"
        );
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["errorType"], "InitializationError", "{body}");
        assert!(
            v["errorMessage"]
                .as_str()
                .unwrap()
                .contains("did not finish within 2 s"),
            "{body}"
        );
        // The handler never ran: the body is FC's error, not the hooks log.
        assert!(v.get("hooks").is_none(), "{body}");
        failed_on.push(r.header("x-fc-request-id").unwrap().to_owned());
    }
    // Each call tried a fresh instance whose initializer was cut at its
    // 2 s (one timed-out Initializer each, under ids of their own), the
    // handler never ran, and no instance is left serving. (The agent keeps
    // no function log for an instance that never started, so this reads
    // the dev log.)
    let timed_out: Vec<String> = dev_log(&dev)
        .lines()
        .map(plain)
        .filter(|l| l.contains("lifecycle hook failed") && l.contains("Initializer"))
        .collect();
    assert_eq!(timed_out.len(), 2, "{timed_out:?}");
    for l in &timed_out {
        assert!(l.contains("did not finish within 2 s"), "{l}");
        let took = ms(l);
        assert!((1900..6000).contains(&took), "Initializer took {took} ms");
        assert!(!failed_on.iter().any(|rid| l.contains(rid.as_str())), "{l}");
    }
    let ids: std::collections::HashSet<&str> = timed_out
        .iter()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("request_id=")))
        .collect();
    assert_eq!(ids.len(), 2, "{timed_out:?}");
    let lines = logs(&dev, "slowinit").await;
    assert!(
        !lines.iter().any(|l| failed_on
            .iter()
            .any(|rid| l["message"].as_str().unwrap_or("").contains(rid.as_str()))),
        "the handler ran: {lines:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !instances(&dev, "slowinit").await.is_empty() {
        assert!(Instant::now() < deadline, "{}", dev.log_tail());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
