//! Two `kiln-scheduler` processes on one real PostgreSQL: one leads, the
//! other turns callers away naming the leader; the standby takes over
//! within 10 s of the leader's SIGKILL with the state the leader wrote;
//! a leader paused (SIGSTOP) past its lease is deposed, writes nothing
//! when it resumes, and exits for its supervisor to restart it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_core::FcErrorKind;
use kiln_internal_api::{paths, AccountLimits, Endpoints, InternalClient, InternalClientError};
use kiln_pki::DevPki;
use kiln_test_support::postgres::PgServer;

const BIN: &str = env!("CARGO_BIN_EXE_kiln-scheduler");
const LEASE_MS: u64 = 1_500;

/// One scheduler process and its address; killed when dropped.
struct Sched {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Drop for Sched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sched {
    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Start scheduler `name` of the cluster in `dir`.
fn start(dir: &Path, pki: &DevPki, name: &str, port: u16, pg_url: &str) -> Sched {
    let files = pki.files("scheduler");
    let url = format!("https://127.0.0.1:{port}");
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "state_dir = {state:?}\nlisten = \"127.0.0.1:{port}\"\n\
             [tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n\
             [secrets]\nkey_file = {secret:?}\n\
             [cluster]\npostgres_url = {pg_url:?}\nadvertise_url = {url:?}\nlease_ms = {LEASE_MS}\n",
            state = dir.join(name),
            ca = files.ca,
            cert = files.cert,
            key = files.key,
            secret = dir.join("secrets.key"),
        ),
    )
    .unwrap();
    let log = dir.join(format!("{name}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    Sched { child, url, log }
}

async fn health(client: &InternalClient, s: &Sched) -> Result<(), InternalClientError> {
    client
        .get::<serde_json::Value>(&s.url, paths::HEALTH)
        .await
        .map(drop)
}

/// Wait until `s` answers as the leader; how long that took.
async fn until_leading(client: &InternalClient, s: &Sched, within: Duration) -> Duration {
    let t = Instant::now();
    while t.elapsed() < within {
        if health(client, s).await.is_ok() {
            return t.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} did not lead within {within:?}:\n{}", s.url, s.log());
}

/// Wait until `s` answers at all (as a standby: NotLeader).
async fn standing_by(client: &InternalClient, s: &Sched) -> String {
    for _ in 0..200 {
        match health(client, s).await {
            Err(InternalClientError::Remote { error, .. }) => {
                assert_eq!(error.kind, Some(FcErrorKind::NotLeader), "{error}");
                return error.message;
            }
            Ok(()) => panic!("{} leads while another scheduler holds the lease", s.url),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    panic!("{} never answered:\n{}", s.url, s.log());
}

fn limits(burst: u32) -> AccountLimits {
    AccountLimits {
        burst_instances: burst,
        memory_quota_mb: 8_192,
        vcpu_quota_milli: 8_000,
        scale_out_instances_per_minute: 60,
        scale_out_vcpus_per_minute: 60,
        functions: Default::default(),
    }
}

async fn put_burst(
    client: &InternalClient,
    s: &Sched,
    burst: u32,
) -> Result<(), InternalClientError> {
    let path = paths::account_limits(&"1234".parse().unwrap());
    client
        .call::<_, serde_json::Value>(http::Method::PUT, &s.url, &path, Some(&limits(burst)))
        .await
        .map(drop)
}

async fn get_burst(client: &InternalClient, s: &Sched) -> u32 {
    let path = paths::account_limits(&"1234".parse().unwrap());
    client
        .get::<AccountLimits>(&s.url, &path)
        .await
        .unwrap()
        .burst_instances
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_and_a_paused_leader_is_deposed() {
    let Some(pg) = PgServer::start() else { return };
    let pg_url = pg.create_database("failover");
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let key = dir.path().join("secrets.key");
    std::fs::write(&key, "ab".repeat(32)).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let client = InternalClient::new(&pki.files("operator"))
        .unwrap()
        .with_timeout(Duration::from_secs(2));
    let (pa, pb) = (
        kiln_test_support::free_port(),
        kiln_test_support::free_port(),
    );

    // A leads; B, started after, stands by and names A.
    let a = start(dir.path(), &pki, "a", pa, &pg_url);
    until_leading(&client, &a, Duration::from_secs(20)).await;
    let b = start(dir.path(), &pki, "b", pb, &pg_url);
    let refusal = standing_by(&client, &b).await;
    assert!(refusal.contains(&a.url), "{refusal}");
    put_burst(&client, &a, 17).await.unwrap();
    // Callers that know both (gateways, agents: `scheduler_url = "A,B"`)
    // reach the leader whichever they try first.
    let both = Endpoints::parse(&format!("{},{}", b.url, a.url)).unwrap();
    let through = |e: &Endpoints| {
        let (e, client) = (e.clone(), client.clone());
        async move {
            e.call(|base| {
                let client = client.clone();
                async move {
                    client
                        .get::<AccountLimits>(
                            &base,
                            &paths::account_limits(&"1234".parse().unwrap()),
                        )
                        .await
                }
            })
            .await
        }
    };
    assert_eq!(through(&both).await.unwrap().burst_instances, 17);
    assert_eq!(both.current(), a.url, "it follows the leader");
    let refused = put_burst(&client, &b, 99).await.unwrap_err();
    assert!(
        matches!(&refused, InternalClientError::Remote { error, .. } if error.kind == Some(FcErrorKind::NotLeader)),
        "{refused}"
    );

    // SIGKILL the leader: B takes over with A's state.
    a.signal("KILL");
    let took = until_leading(&client, &b, Duration::from_secs(10)).await;
    println!("standby took over {took:?} after the leader's SIGKILL (lease {LEASE_MS} ms)");
    assert_eq!(get_burst(&client, &b).await, 17, "the state A wrote");
    assert_eq!(through(&both).await.unwrap().burst_instances, 17);
    assert_eq!(both.current(), b.url, "it follows the new leader");
    drop(a);

    // A comes back as a standby; B is paused past its lease: A takes over.
    let a = start(dir.path(), &pki, "a2", pa, &pg_url);
    let refusal = standing_by(&client, &a).await;
    assert!(refusal.contains(&b.url), "{refusal}");
    b.signal("STOP");
    until_leading(&client, &a, Duration::from_secs(10)).await;
    put_burst(&client, &a, 23).await.unwrap();

    // B resumes: it refuses to act, is deposed and exits 1; nothing it
    // held changes the state.
    b.signal("CONT");
    let mut b = b;
    let t = Instant::now();
    let status = loop {
        if let Some(s) = b.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the deposed leader kept running:\n{}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(1), "{}", b.log());
    assert!(
        b.log().contains("lost the scheduler leadership"),
        "{}",
        b.log()
    );
    assert_eq!(get_burst(&client, &a).await, 23);
    drop(pg);
}
