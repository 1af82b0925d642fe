//! The `kiln-scheduler` binary: starts from a config file, serves, stops
//! cleanly on SIGTERM; a bad config exits 1 with the reason.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use kiln_internal_api::{paths, InternalClient};
use kiln_pki::DevPki;

const BIN: &str = env!("CARGO_BIN_EXE_kiln-scheduler");

/// A scheduler config in `dir` on a free loopback port, with the cluster
/// PKI it names: (pki, port, config file).
fn scheduler_config(dir: &Path) -> (DevPki, u16, PathBuf) {
    let pki = DevPki::ensure(&dir.join("pki"), &[]).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let files = pki.files("scheduler");
    let config = dir.join("scheduler.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\nlisten = \"127.0.0.1:{port}\"\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            dir.join("state"),
            files.ca,
            files.cert,
            files.key
        ),
    )
    .unwrap();
    (pki, port, config)
}

#[tokio::test]
async fn serves_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, port, config) = scheduler_config(dir.path());
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = InternalClient::new(&pki.files("gateway-internal"))
        .unwrap()
        .with_timeout(Duration::from_secs(2));
    let base = format!("https://127.0.0.1:{port}");
    let mut up = false;
    for _ in 0..100 {
        if client
            .get::<serde_json::Value>(&base, paths::HEALTH)
            .await
            .is_ok()
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(up, "the scheduler never answered /v1/health");
    assert_eq!(exit.code(), Some(0));
    assert!(dir.path().join("state/scheduler.db").exists());
}

#[test]
fn a_bad_config_exits_1_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "state_dir = \"/tmp/x\"\nidle_timeout_s = 0\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("idle_timeout_s"), "{err}");
}

#[test]
fn simulate_prints_the_bench_and_every_workload() {
    let out = Command::new(BIN)
        .args([
            "simulate",
            "--nodes",
            "5",
            "--functions",
            "50",
            "--instances",
            "250",
            "--decisions",
            "5000",
            "--hours",
            "0.05",
            "--rate",
            "20",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("acquire-and-release decisions"), "{text}");
    for w in ["steady", "diurnal", "bursty"] {
        assert!(text.contains(&format!("simulate {w}")), "{text}");
    }
    assert!(
        text.contains("cold starts") && text.contains("instance-seconds"),
        "{text}"
    );
}

#[test]
fn neither_config_nor_simulate_exits_1() {
    let out = Command::new(BIN).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"));
}

/// `--log-format json`: every stdout line is a JSON object; each request
/// has one access line with its method, path (no query), status, duration,
/// request id and peer; SIGTERM is logged by name.
#[tokio::test]
async fn json_logs_have_one_access_line_per_request() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, port, config) = scheduler_config(dir.path());
    let log = dir.path().join("scheduler.log");
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("--log-format")
        .arg("json")
        .env("RUST_LOG", "info")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = InternalClient::new(&pki.files("gateway-internal"))
        .unwrap()
        .with_timeout(Duration::from_secs(2));
    let base = format!("https://127.0.0.1:{port}");
    let mut up = false;
    for _ in 0..100 {
        if client
            .get::<serde_json::Value>(&base, paths::HEALTH)
            .await
            .is_ok()
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A 404 with a query string that must not reach the log.
    let missing = client
        .get::<serde_json::Value>(&base, "/v1/nope?Signature=s3cr3t-signature")
        .await;
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(up, "the scheduler never answered /v1/health");
    assert!(missing.is_err());
    assert_eq!(exit.code(), Some(0));

    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("s3cr3t-signature"), "{text}");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let access: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["target"] == "kiln::access")
        .collect();
    let health = access
        .iter()
        .find(|l| l["path"] == paths::HEALTH && l["status"] == 200)
        .unwrap_or_else(|| panic!("no access line for the health check: {text}"));
    assert_eq!(health["level"], "INFO");
    assert_eq!(health["method"], "GET");
    assert!(health["duration_us"].is_u64(), "{health}");
    assert!(health["request_id"].is_string(), "{health}");
    assert!(
        health["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{health}"
    );
    let nope = access
        .iter()
        .find(|l| l["path"] == "/v1/nope")
        .unwrap_or_else(|| panic!("no access line for the 404: {text}"));
    assert_eq!(nope["status"], 404);
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "shutting down" && l["signal"] == "SIGTERM"),
        "{text}"
    );
}
