//! `kiln bench`: Kiln against baselines measured in the same run, printed
//! as ratios (this machine is shared and noisy; absolute figures are not
//! comparable between runs, ratios are).
//!
//! - warm invoke latency (p50/p99, one connection) and throughput
//!   (`--connections` keep-alive connections) through the gateway, against
//!   the same function binary called directly on loopback: as signed
//!   InvokeFunction calls, and as plain requests to an anonymous HTTP
//!   trigger of the function (FC's web-function path: Host routing, the
//!   function's own request line, no signature);
//! - CPU time per warm call of each service (gateway, agent, scheduler)
//!   over the throughput runs, against nginx as one TLS reverse-proxy hop
//!   in front of the same function: what an operator sizes machines by,
//!   where throughput on a small machine mostly measures who gets the
//!   cores. The services run in this process, each on a runtime of its own
//!   with its threads named for it, as it would in its own process; a
//!   service's CPU is the sum over its threads (`/proc/self/task`), so the
//!   in-process load generator (its own threads) is not counted. Separate
//!   processes (the service binaries) would count the same work but need
//!   those binaries beside `kiln`; the per-thread sum needs only this one.
//!   nginx's CPU is its master's and workers' (see [`cpu`]);
//! - cold start (no instance -> first response) against a bare `runc run`
//!   of a bundle holding the same binary, into a ready-made network
//!   namespace, until its port answers ([`runc`]); one at a time, and as a
//!   burst from parallel callers ([`burst`]);
//! - cold start of a handler function on each built-in runtime
//!   (`python3.11`, `nodejs18`, `python3.13`, `nodejs20`) against a bare
//!   `runc run` of the same root filesystem (`debian12-builtin`,
//!   `debian13-builtin`), bootstrap and code ([`cold_runtimes`]).

mod burst;
mod cluster;
mod container;
mod cpu;
mod runc;
mod stages;

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine;
use bytes::Bytes;
use clap::Args;
use futures_util::FutureExt;
use http::{Method, Request};
use http_body_util::Full;
use serde_json::json;

use crate::commands::dev::{DevCluster, DevOptions};
use crate::loadgen::{self, median, RunResult, Target};

/// The function every measurement uses: a std-only static HTTP server.
const STATIC_ECHO_SRC: &str = include_str!("../../../../examples/static-echo/main.rs");

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Rounds of each measurement; medians are reported.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Connections of the throughput runs.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Requests per throughput run.
    #[arg(long, default_value_t = 20_000)]
    pub requests: usize,
    /// Requests per latency run (one connection).
    #[arg(long, default_value_t = 2_000)]
    pub latency_requests: usize,
    /// Cold starts measured (each side).
    #[arg(long, default_value_t = 7)]
    pub cold_starts: usize,
    /// Where runtime root filesystems are cached.
    #[arg(long)]
    pub rootfs_dir: Option<PathBuf>,
    /// Skip the cold-start part.
    #[arg(long, conflicts_with = "cold_only")]
    pub no_cold: bool,
    /// Only the cold-start part (one at a time and the burst).
    #[arg(long)]
    pub cold_only: bool,
    /// Cold starts in the parallel burst (each side; 0 skips the burst).
    #[arg(long, default_value_t = 24)]
    pub burst_starts: usize,
    /// Concurrent callers of the parallel burst.
    #[arg(long, default_value_t = 8)]
    pub burst_callers: usize,
    /// Run the dev agent without pre-made sandboxes (`[sandbox.premade]`
    /// off): every cold start takes the ordinary path, as before them.
    #[arg(long)]
    pub no_premade: bool,
    /// A soak instead of the comparison: signed warm calls (each signed
    /// as it is sent) over `--connections` connections for this many
    /// seconds, reporting every 10 s the calls answered, the rate, 503s,
    /// 429s, other errors and the resident memory of this process (the
    /// gateway, scheduler and agent run in it, with the load generator).
    #[arg(long)]
    pub soak_seconds: Option<u64>,
    /// The gateway's signature skew window for the soak, in seconds
    /// (default: FC's 900). The replay cache fills for one window and then
    /// stays level, so a soak shorter than 15 minutes shows that level
    /// only with a shorter window.
    #[arg(long)]
    pub skew_seconds: Option<u64>,
    /// Instead of the comparison: a control plane on PostgreSQL (this
    /// many gateways behind HAProxy, two schedulers, as `kiln dev
    /// --postgres` runs them) against one gateway on SQLite, and async
    /// accepts against raw PostgreSQL inserts on the same server (a
    /// throwaway one from Debian's package). See `bench/cluster.rs`.
    #[arg(long, value_name = "GATEWAYS", num_args = 0..=1, default_missing_value = "2")]
    pub cluster: Option<usize>,
}

fn require_root() -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .is_some_and(|l| l.split_whitespace().nth(1) == Some("0"));
    if !root {
        bail!("kiln bench runs sandboxes and network namespaces: run it as root");
    }
    Ok(())
}

fn build_static_echo(dir: &Path) -> Result<PathBuf> {
    let src = dir.join("static-echo.rs");
    std::fs::write(&src, STATIC_ECHO_SRC)?;
    let out = dir.join("code").join("server");
    std::fs::create_dir_all(out.parent().unwrap())?;
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let status = Command::new(&rustc)
        .args(["-O", "-C", "target-feature=+crt-static", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .with_context(|| format!("cannot run {rustc} to build the benchmark function"))?;
    if !status.success() {
        bail!("building the static benchmark function failed");
    }
    Ok(out)
}

/// Where the runtime trees are: `--rootfs-dir`, `$KILN_ROOTFS_CACHE`, or
/// the node's default cache.
fn rootfs_dir(args: &BenchArgs) -> PathBuf {
    args.rootfs_dir
        .clone()
        .or_else(|| std::env::var_os("KILN_ROOTFS_CACHE").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOTFS_CACHE))
}

const DEFAULT_ROOTFS_CACHE: &str = "/var/cache/kiln/rootfs";

/// A bench's dev cluster: its own state, port, sandbox names and
/// instance subnet; pre-made sandboxes on.
fn dev_options(args: &BenchArgs, state_dir: &Path) -> Result<DevOptions> {
    let n: u32 = rand::random();
    Ok(DevOptions {
        state_dir: state_dir.to_owned(),
        listen: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        sandbox_prefix: tag(),
        // Clear of the test suites' ranges (see services/kiln/tests/common).
        instance_subnet: format!("10.{}.{}.0/22", 100 + n % 50, ((n >> 8) % 64) * 4),
        // The node's cache by default: the runtimes' trees are built once
        // (debootstrap, minutes), and the baselines run the same trees.
        rootfs_dir: Some(rootfs_dir(args)),
        idle_timeout_s: 300,
        credentials_lifetime_s: 3600,
        insecure_no_network_isolation: false,
        signature_skew_s: None,
        premade: true,
        registry_ca_bundle: None,
        max_image_mb: None,
        image_budget_mb: None,
    })
}

/// Deploy `bench-echo`, the function every measurement calls, from the
/// static echo binary's zip.
async fn deploy_echo(client: &crate::client::FcClient, code_zip: &[u8]) -> Result<()> {
    let zip_b64 = base64::engine::general_purpose::STANDARD.encode(code_zip);
    client
        .create_function(&json!({
            "functionName": "bench-echo",
            "runtime": "custom",
            "handler": "main",
            "memorySize": 1024,
            "instanceConcurrency": 200,
            "customRuntimeConfig": {"command": ["/code/server"]},
            "code": {"zipFile": zip_b64},
        }))
        .await?;
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn tag() -> String {
    format!("kb{:04x}", rand::random::<u16>())
}

struct Summary {
    p50_us: f64,
    p99_us: f64,
    rps: f64,
}

fn summarise(latency: &[RunResult], throughput: &[RunResult]) -> Summary {
    Summary {
        p50_us: median(
            &latency
                .iter()
                .map(|r| r.quantile_us(0.5) as f64)
                .collect::<Vec<_>>(),
        ),
        p99_us: median(
            &latency
                .iter()
                .map(|r| r.quantile_us(0.99) as f64)
                .collect::<Vec<_>>(),
        ),
        rps: median(
            &throughput
                .iter()
                .map(|r| r.throughput())
                .collect::<Vec<_>>(),
        ),
    }
}

pub async fn run(args: &BenchArgs) -> Result<()> {
    if args.cluster.is_some() {
        return cluster::run(args).await;
    }
    require_root()?;
    let work = tempfile::Builder::new().prefix("kiln-bench-").tempdir()?;
    let binary = build_static_echo(work.path())?;
    let code_zip = crate::zipdir::zip_dir(binary.parent().unwrap())?;
    let prefix = tag();
    // Started before the cluster, whose agent must trust its registry.
    let image = if args.no_cold {
        None
    } else {
        container::Image::push(&binary, work.path())?
    };
    let opts = DevOptions {
        sandbox_prefix: prefix.clone(),
        signature_skew_s: args.skew_seconds,
        premade: !args.no_premade,
        registry_ca_bundle: image.as_ref().map(container::Image::ca),
        ..dev_options(args, &work.path().join("state"))?
    };
    eprintln!("starting a dev cluster in {}", work.path().display());
    let cluster = DevCluster::start(&opts).await?;
    let agent_state = crate::dev_config::agent_state_dir(&opts.state_dir);
    // Shut the cluster down (its agent removes the sandboxes, netns and
    // disks) whether measuring returned or panicked: a panic skipping it
    // left containers, network namespaces and loop devices behind.
    let result = AssertUnwindSafe(async {
        if args.cold_only {
            let client = crate::client::FcClient::new(cluster.credentials.clone())?;
            cold(
                args,
                &cluster,
                &client,
                &binary,
                &code_zip,
                &prefix,
                work.path(),
                &agent_state,
                image.as_ref(),
            )
            .await
        } else {
            measure(
                args,
                &cluster,
                &binary,
                &code_zip,
                &prefix,
                work.path(),
                &agent_state,
                image.as_ref(),
            )
            .await
        }
    })
    .catch_unwind()
    .await;
    cluster.shutdown().await;
    match result {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// `--soak-seconds`: see [`BenchArgs::soak_seconds`].
async fn soak(
    args: &BenchArgs,
    cluster: &DevCluster,
    gw_uri: &http::Uri,
    duration: Duration,
) -> Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::Arc;
    let host = gw_uri.host().unwrap_or("127.0.0.1").to_owned();
    let target = Target {
        addr: format!("{host}:{}", gw_uri.port_u16().unwrap_or(443)).parse()?,
        tls: Some((
            kiln_pki::public_client_config(&cluster.credentials.ca_cert)?,
            rustls::pki_types::ServerName::try_from(host)?,
        )),
    };
    let creds = cluster.credentials.clone();
    let make = Arc::new(move || {
        crate::signing::signed_request(
            &creds,
            Method::POST,
            "/2023-03-30/functions/bench-echo/invocations",
            &[("content-type".into(), "application/octet-stream".into())],
            Bytes::from_static(b"ping"),
            Some("InvokeFunction"),
        )
        .map_err(std::io::Error::other)
    });
    let counts = Arc::new(loadgen::SoakCounts::default());
    let lg = loadgen::LoadRuntime::new(2)?;
    eprintln!(
        "soak: signed warm calls over {} connections for {}s",
        args.connections,
        duration.as_secs()
    );
    println!(
        "elapsed_s\tcalls_ok\tcalls_per_s\t503\t429\tother_errors\trss_kB\tleases_written_off"
    );
    let run = lg.soak(&target, args.connections, duration, make, counts.clone());
    tokio::pin!(run);
    let started = Instant::now();
    let mut every = tokio::time::interval(Duration::from_secs(10));
    every.tick().await;
    // Calls answered and when, at the last report.
    let mut last = (0, Instant::now());
    let report = |last: &mut (u64, Instant)| {
        let ok = counts.ok.load(Relaxed);
        let interval_s = last.1.elapsed().as_secs_f64().max(0.001);
        println!(
            "{:.1}\t{ok}\t{:.0}\t{}\t{}\t{}\t{}\t{}",
            started.elapsed().as_secs_f64(),
            (ok - last.0) as f64 / interval_s,
            counts.unavailable.load(Relaxed),
            counts.throttled.load(Relaxed),
            counts.other_errors.load(Relaxed),
            loadgen::rss_kb(),
            cluster.leases_written_off()
        );
        *last = (ok, Instant::now());
    };
    loop {
        tokio::select! {
            r = &mut run => {
                r?;
                break;
            }
            _ = every.tick() => report(&mut last),
        }
    }
    // The calls since the last full interval, when it is long enough
    // for a rate.
    if last.1.elapsed() >= Duration::from_secs(1) {
        report(&mut last);
    }
    let bad = counts.unavailable.load(Relaxed)
        + counts.throttled.load(Relaxed)
        + counts.other_errors.load(Relaxed);
    if bad > 0 {
        bail!("soak: {bad} calls were not answered with success");
    }
    let written_off = cluster.leases_written_off();
    if written_off > 0 {
        bail!(
            "soak: the scheduler took back {written_off} leases at expiry: \
             the gateway held slots longer than granted"
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    args: &BenchArgs,
    cluster: &DevCluster,
    binary: &Path,
    code_zip: &[u8],
    prefix: &str,
    work: &Path,
    agent_state: &Path,
    image: Option<&container::Image>,
) -> Result<()> {
    let client = crate::client::FcClient::new(cluster.credentials.clone())?;
    deploy_echo(&client, code_zip).await?;
    // The same function behind an anonymous HTTP trigger: the caller's
    // `POST /invoke` reaches the function as such, as direct calls do.
    let trigger = crate::commands::triggers::create(
        &client,
        "bench-echo",
        "bench-http",
        &crate::commands::triggers::TriggerFields {
            trigger_type: Some("http".into()),
            config: Some(crate::commands::triggers::http_config(
                &["POST".into()],
                "anonymous",
                false,
            )?),
            ..Default::default()
        },
    )
    .await?;
    let trigger_uri: http::Uri = trigger["httpTrigger"]["urlInternet"]
        .as_str()
        .context("CreateTrigger answered without httpTrigger.urlInternet")?
        .parse()?;
    let trigger_authority = trigger_uri
        .authority()
        .context("the trigger URL has no host")?
        .to_string();
    let trigger_host = trigger_uri.host().unwrap_or_default().to_owned();
    // Warm up: the first call starts the instance.
    for _ in 0..50 {
        client
            .invoke("bench-echo", Bytes::from_static(b"ping"), &[])
            .await?
            .error_for_status()?;
    }

    // The baseline: the same binary, on loopback, no sandbox.
    let direct_port = free_port()?;
    let direct = KillOnDrop(
        Command::new(binary)
            .env("FC_CUSTOM_LISTEN_PORT", direct_port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start the baseline function")?,
    );
    let direct_addr = SocketAddr::from(([127, 0, 0, 1], direct_port));
    wait_port(direct_addr, Duration::from_secs(5)).await?;

    // The strongest peer on this machine: nginx as one TLS reverse-proxy hop
    // in front of the same baseline function.
    let nginx = match Nginx::start(work, direct_addr, &cluster.pki, NginxHops::One) {
        Ok(n) => Some(n),
        Err(e) => {
            eprintln!("nginx peer not measured: {e:#}");
            None
        }
    };
    // The same peer laid out as Kiln is: a TLS front, then mutual TLS to a
    // node-side proxy, then the function.
    let nginx2 = match Nginx::start(work, direct_addr, &cluster.pki, NginxHops::Two) {
        Ok(n) => Some(n),
        Err(e) => {
            eprintln!("two-hop nginx peer not measured: {e:#}");
            None
        }
    };

    let gw_uri: http::Uri = cluster.credentials.endpoint.parse()?;
    if let Some(seconds) = args.soak_seconds {
        return soak(args, cluster, &gw_uri, Duration::from_secs(seconds)).await;
    }
    let gw_addr: SocketAddr = format!(
        "{}:{}",
        gw_uri.host().unwrap_or("127.0.0.1"),
        gw_uri.port_u16().unwrap_or(443)
    )
    .parse()?;
    let tls = kiln_pki::public_client_config(&cluster.credentials.ca_cert)?;
    let kiln_target = Target {
        addr: gw_addr,
        tls: Some((
            tls.clone(),
            rustls::pki_types::ServerName::try_from(
                gw_uri.host().unwrap_or("127.0.0.1").to_owned(),
            )?,
        )),
    };
    let direct_target = Target {
        addr: direct_addr,
        tls: None,
    };
    // The trigger's host names it (SNI and Host); it resolves to loopback,
    // the gateway's address.
    let trigger_target = Target {
        addr: gw_addr,
        tls: Some((
            tls.clone(),
            rustls::pki_types::ServerName::try_from(trigger_host)?,
        )),
    };
    let trigger_reqs = |n: usize| -> Vec<Request<Full<Bytes>>> {
        (0..n)
            .map(|_| {
                Request::builder()
                    .method(Method::POST)
                    .uri("/invoke")
                    .header("host", trigger_authority.as_str())
                    .header("content-type", "application/octet-stream")
                    .body(Full::new(Bytes::from_static(b"ping")))
                    .expect("request")
            })
            .collect()
    };
    let nginx_target = nginx.as_ref().map(|n| Target {
        addr: n.addr,
        tls: kiln_target.tls.clone(),
    });
    let nginx2_target = nginx2.as_ref().map(|n| Target {
        addr: n.addr,
        tls: kiln_target.tls.clone(),
    });
    let direct_reqs = |n: usize| -> Vec<Request<Full<Bytes>>> {
        (0..n)
            .map(|_| {
                Request::builder()
                    .method(Method::POST)
                    .uri("/invoke")
                    .header("host", direct_addr.to_string())
                    .header("x-fc-request-id", "bench")
                    .body(Full::new(Bytes::from_static(b"ping")))
                    .expect("request")
            })
            .collect()
    };
    let creds = cluster.credentials.clone();
    let kiln_reqs = |n: usize| -> Result<Vec<Request<Full<Bytes>>>> {
        (0..n)
            .map(|_| {
                crate::signing::signed_request(
                    &creds,
                    Method::POST,
                    "/2023-03-30/functions/bench-echo/invocations",
                    &[("content-type".into(), "application/octet-stream".into())],
                    Bytes::from_static(b"ping"),
                    Some("InvokeFunction"),
                )
                .map_err(Into::into)
            })
            .collect()
    };

    // Two threads: one per core, as the services have.
    let lg = loadgen::LoadRuntime::new(2)?;
    // Kiln's node hop alone: the gateway's own mTLS client identity,
    // straight to the agent's invoke endpoint for the warm instance. What
    // the full path costs beyond it is the gateway's hop.
    let node = node_hop(cluster).await?;
    let node_reqs = |n: usize| -> Vec<Request<Full<Bytes>>> {
        (0..n)
            .map(|i| {
                Request::builder()
                    .method(Method::POST)
                    .uri(node.path.as_str())
                    .header("host", node.target.addr.to_string())
                    .header("x-fc-request-id", format!("bench-node-{i}"))
                    .header("content-type", "application/octet-stream")
                    .body(Full::new(Bytes::from_static(b"ping")))
                    .expect("request")
            })
            .collect()
    };
    let (mut d_lat, mut d_thr, mut k_lat, mut k_thr) = (vec![], vec![], vec![], vec![]);
    let (mut n_lat, mut n_thr) = (vec![], vec![]);
    let (mut n2_lat, mut n2_thr) = (vec![], vec![]);
    let (mut a_lat, mut a_thr) = (vec![], vec![]);
    let (mut t_lat, mut t_thr) = (vec![], vec![]);
    // CPU microseconds per call of each throughput run: Kiln's services,
    // and the nginx hop.
    let (mut k_cpu, mut n_cpu, mut n2_cpu) = (vec![], vec![], vec![]);
    // And context switches per call, the same way.
    let (mut k_cs, mut n_cs, mut n2_cs) = (vec![], vec![], vec![]);
    let mut errors = 0;
    for round in 0..args.runs {
        eprintln!("warm round {}/{}", round + 1, args.runs);
        let r = lg
            .run(&direct_target, 1, direct_reqs(args.latency_requests))
            .await?;
        errors += r.errors;
        d_lat.push(r);
        let r = lg
            .run(&kiln_target, 1, kiln_reqs(args.latency_requests)?)
            .await?;
        errors += r.errors;
        k_lat.push(r);
        let r = lg
            .run(&direct_target, args.connections, direct_reqs(args.requests))
            .await?;
        errors += r.errors;
        d_thr.push(r);
        let reqs = kiln_reqs(args.requests)?;
        let before = cpu::services_now();
        let r = lg.run(&kiln_target, args.connections, reqs).await?;
        let (cpu, switches) =
            cpu::services_per_call(&before, &cpu::services_now(), r.latencies_us.len());
        k_cpu.push(cpu);
        k_cs.push(switches);
        errors += r.errors;
        k_thr.push(r);
        let r = lg
            .run(&trigger_target, 1, trigger_reqs(args.latency_requests))
            .await?;
        errors += r.errors;
        t_lat.push(r);
        let r = lg
            .run(
                &trigger_target,
                args.connections,
                trigger_reqs(args.requests),
            )
            .await?;
        errors += r.errors;
        t_thr.push(r);
        let r = lg
            .run(&node.target, 1, node_reqs(args.latency_requests))
            .await?;
        errors += r.errors;
        a_lat.push(r);
        let r = lg
            .run(&node.target, args.connections, node_reqs(args.requests))
            .await?;
        errors += r.errors;
        a_thr.push(r);
        if let Some(t) = &nginx_target {
            let r = lg.run(t, 1, direct_reqs(args.latency_requests)).await?;
            errors += r.errors;
            n_lat.push(r);
            let reqs = direct_reqs(args.requests);
            let pid = nginx.as_ref().map_or(0, |n| n.child.id());
            let before = cpu::process_tree_now(pid);
            let r = lg.run(t, args.connections, reqs).await?;
            let after = cpu::process_tree_now(pid);
            let calls = r.latencies_us.len();
            n_cpu.push(cpu::per_call_us(before.cpu, after.cpu, calls));
            n_cs.push(cpu::switches_per_call(
                before.switches,
                after.switches,
                calls,
            ));
            errors += r.errors;
            n_thr.push(r);
        }
        if let Some(t) = &nginx2_target {
            let r = lg.run(t, 1, direct_reqs(args.latency_requests)).await?;
            errors += r.errors;
            n2_lat.push(r);
            let pid = nginx2.as_ref().map_or(0, |n| n.child.id());
            let before = cpu::process_tree_now(pid);
            let r = lg
                .run(t, args.connections, direct_reqs(args.requests))
                .await?;
            let after = cpu::process_tree_now(pid);
            let calls = r.latencies_us.len();
            n2_cpu.push(cpu::per_call_us(before.cpu, after.cpu, calls));
            n2_cs.push(cpu::switches_per_call(
                before.switches,
                after.switches,
                calls,
            ));
            errors += r.errors;
            n2_thr.push(r);
        }
    }
    drop(lg);
    drop(nginx);
    drop(nginx2);
    drop(direct);
    let d = summarise(&d_lat, &d_thr);
    let k = summarise(&k_lat, &k_thr);
    let peer = (!n_thr.is_empty()).then(|| summarise(&n_lat, &n_thr));
    let peer2 = (!n2_thr.is_empty()).then(|| summarise(&n2_lat, &n2_thr));
    let a = summarise(&a_lat, &a_thr);
    let t = summarise(&t_lat, &t_thr);

    println!();
    println!(
        "kiln bench: medians of {} rounds; {} failed requests",
        args.runs, errors
    );
    println!(
        "{:<34} {:>12} {:>12} {:>12}",
        "warm invoke", "direct", "via kiln", "kiln/direct"
    );
    println!(
        "{:<34} {:>10.0}us {:>10.0}us {:>11.2}x   (added {:.0} us; target < 1000 us)",
        "latency p50 (1 connection)",
        d.p50_us,
        k.p50_us,
        k.p50_us / d.p50_us,
        k.p50_us - d.p50_us
    );
    println!(
        "{:<34} {:>10.0}us {:>10.0}us {:>11.2}x",
        "latency p99 (1 connection)",
        d.p99_us,
        k.p99_us,
        k.p99_us / d.p99_us
    );
    println!(
        "{:<34} {:>10.0}/s {:>10.0}/s {:>11.2}    (target >= 0.50)",
        format!("throughput ({} connections)", args.connections),
        d.rps,
        k.rps,
        k.rps / d.rps
    );
    println!(
        "{:<34} {:>10.0}us {:>10.0}us {:>11.2}x   (anonymous trigger; added {:.0} us)",
        "http trigger: latency p50",
        d.p50_us,
        t.p50_us,
        t.p50_us / d.p50_us,
        t.p50_us - d.p50_us
    );
    println!(
        "{:<34} {:>10.0}us {:>10.0}us {:>11.2}x",
        "http trigger: latency p99",
        d.p99_us,
        t.p99_us,
        t.p99_us / d.p99_us
    );
    println!(
        "{:<34} {:>10.0}/s {:>10.0}/s {:>11.2}    (trigger/signed invoke: {:.2})",
        "http trigger: throughput",
        d.rps,
        t.rps,
        t.rps / d.rps,
        t.rps / k.rps
    );
    println!(
        "{:<34} {:>10.0}us {:>10.0}us {:>11.2}x   (mTLS straight to the agent, no gateway)",
        "node hop only: latency p50",
        d.p50_us,
        a.p50_us,
        a.p50_us / d.p50_us
    );
    println!(
        "{:<34} {:>10.0}/s {:>10.0}/s {:>11.2}    (the gateway's hop is the rest)",
        "node hop only: throughput",
        d.rps,
        a.rps,
        a.rps / d.rps
    );
    if let Some(n) = peer {
        println!(
            "{:<34} {:>10.0}us {:>10.0}us {:>11.2}x   (nginx: one TLS proxy hop, p50 vs direct)",
            "peer: nginx latency p50",
            d.p50_us,
            n.p50_us,
            n.p50_us / d.p50_us
        );
        println!(
            "{:<34} {:>10.0}/s {:>10.0}/s {:>11.2}    (kiln/nginx throughput: {:.2})",
            "peer: nginx throughput",
            d.rps,
            n.rps,
            n.rps / d.rps,
            k.rps / n.rps
        );
    }

    if let Some(n) = peer2 {
        println!(
            "{:<34} {:>10.0}us {:>10.0}us {:>11.2}x   (nginx: TLS, then mTLS to a node-side nginx)",
            "peer: nginx two hops latency p50",
            d.p50_us,
            n.p50_us,
            n.p50_us / d.p50_us
        );
        println!(
            "{:<34} {:>10.0}/s {:>10.0}/s {:>11.2}    (kiln/nginx two hops throughput: {:.2})",
            "peer: nginx two hops throughput",
            d.rps,
            n.rps,
            n.rps / d.rps,
            k.rps / n.rps
        );
    }

    print!(
        "{}",
        per_call_table(&CPU, args.connections, &k_cpu, &n_cpu, &n2_cpu)
    );
    print!(
        "{}",
        per_call_table(&SWITCHES, args.connections, &k_cs, &n_cs, &n2_cs)
    );

    if !args.no_cold {
        cold(
            args,
            cluster,
            &client,
            binary,
            code_zip,
            prefix,
            work,
            agent_state,
            image,
        )
        .await?;
    }
    Ok(())
}

/// Pre-made sandboxes ready on the dev agent: directories of the pool
/// (claimed ones are symlinks) that the pool marked `ready`.
fn premade_ready(agent_state: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(agent_state.join("premade")) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| e.path().join("ready").is_file())
        .count()
}

/// Wait until the pool holds `want` ready sandboxes.
async fn wait_for_pool(agent_state: &Path, want: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let ready = premade_ready(agent_state);
        if ready >= want {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "the pre-made sandbox pool holds {ready} after 180 s, not {want}: \
                 see the agent's log (budget_mb, max_per_runtime)"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The cold-start part: bare runc one at a time and in a burst; Kiln one at
/// a time (pool warm: an idle runtime keeps one sandbox, refilled between
/// starts), then in a burst with the pool empty (the burst that sizes it)
/// and warm (the same burst again once the pool refilled). One at a time
/// goes first: after a burst its instances' teardown and the pool's refill
/// would share the CPUs with the next starts.
#[allow(clippy::too_many_arguments)]
async fn cold(
    args: &BenchArgs,
    cluster: &DevCluster,
    client: &crate::client::FcClient,
    binary: &Path,
    code_zip: &[u8],
    prefix: &str,
    work: &Path,
    agent_state: &Path,
    image: Option<&container::Image>,
) -> Result<()> {
    let zip_b64 = zip_b64_of(code_zip);
    let static_function = |name: &str| {
        json!({
            "functionName": name,
            "runtime": "custom",
            "handler": "main",
            "memorySize": 512,
            "customRuntimeConfig": {"command": ["/code/server"]},
            "code": {"zipFile": zip_b64},
        })
    };
    let baseline = runc::Baseline::static_binary(binary, work)?;
    let runc_cold = runc::sequential(&baseline, prefix, work, args.cold_starts).await?;
    let premade = !args.no_premade;
    if premade {
        wait_for_pool(agent_state, 1).await?;
    }
    let (kiln_cold, single) =
        kiln_cold_starts_profiled(Some(cluster), client, args.cold_starts, static_function).await?;
    let (n, k) = (args.burst_starts, args.burst_callers.max(1));
    let bursts = if n > 0 && !premade {
        let runc = runc::burst(&baseline, prefix, work, n, k).await?;
        let kiln = burst::kiln(cluster, client, &zip_b64, n, k).await?;
        Some((runc, kiln.clone(), kiln))
    } else if n > 0 {
        let runc = runc::burst(&baseline, prefix, work, n, k).await?;
        // An idle runtime's pool holds one sandbox: the first burst finds
        // it empty and sizes it (its demand); the second finds it warm.
        wait_for_pool(agent_state, 1).await?;
        let empty = burst::kiln(cluster, client, &zip_b64, n, k).await?;
        wait_for_pool(agent_state, n + 1).await?;
        let warm = burst::kiln(cluster, client, &zip_b64, n, k).await?;
        Some((runc, empty, warm))
    } else {
        None
    };
    let (kc, rc) = (median(&kiln_cold), median(&runc_cold));
    let label = if premade {
        "cold start, pool warm (median)"
    } else {
        "cold start, no pool (median)"
    };
    println!(
        "{:<34} {:>10.1}ms {:>10.1}ms {:>11.2}x   (target <= 1.00 with pre-made sandboxes)",
        label,
        rc,
        kc,
        kc / rc
    );
    println!("  bare runc run runs (ms): {runc_cold:.1?}");
    println!("  kiln cold starts (ms):   {kiln_cold:.1?}");
    if let Some(s) = single {
        print!("{}", s.report());
    }
    match bursts {
        Some((runc, kiln, _)) if !premade => {
            println!("no pool:");
            print!("{}", burst::report(n, k, &runc, &kiln));
        }
        Some((runc, empty, warm)) => {
            println!("pool empty at the start (it refills in the gaps):");
            print!("{}", burst::report(n, k, &runc, &empty));
            println!("pool warm:");
            print!("{}", burst::report(n, k, &runc, &warm));
        }
        None => {}
    }
    if let Some(image) = image {
        // The first function pulls the image onto the node (not measured);
        // the measured ones start from the node's cache.
        let pull = "bench-image-pull";
        client.create_function(&image.function(pull)).await?;
        client
            .invoke(pull, Bytes::from_static(b"ping"), &[])
            .await?
            .error_for_status()?;
        client.delete_function(pull).await?;
        let cached =
            kiln_cold_starts(client, args.cold_starts, |name| image.function(name)).await?;
        let kc = median(&cached);
        println!(
            "{:<34} {:>10.1}ms {:>10.1}ms {:>11.2}x   (image cached; the same root filesystem and command)",
            "cold start custom-container",
            rc,
            kc,
            kc / rc
        );
        println!("  kiln cold starts (ms):   {cached:.1?}");
    }
    cold_runtimes(args, client, prefix, work).await
}

/// The echo handler each built-in runtime's cold start runs: the event
/// back as the body.
const HANDLERS: [(&str, &str, &str); 4] = [
    ("python3.11", "index.py", PY_ECHO),
    ("nodejs18", "index.js", JS_ECHO),
    ("python3.13", "index.py", PY_ECHO),
    ("nodejs20", "index.js", JS_ECHO),
];
const PY_ECHO: &str = "def handler(event, context):\n    return event\n";
const JS_ECHO: &str = "exports.handler = async (event) => event;\n";

/// Per built-in runtime: new handler functions invoked once each, against
/// bare `runc run`s of the runtime's tree running its bootstrap with the
/// same code bound at /code, in the same run.
async fn cold_runtimes(
    args: &BenchArgs,
    client: &crate::client::FcClient,
    prefix: &str,
    work: &Path,
) -> Result<()> {
    for (runtime, file, source) in HANDLERS {
        let rt: kiln_core::RuntimeName = runtime.parse().map_err(anyhow::Error::msg)?;
        let code = work.join(format!("code-{runtime}"));
        std::fs::create_dir_all(&code)?;
        std::fs::write(code.join(file), source)?;
        let zip_b64 = zip_b64_of(&crate::zipdir::zip_dir(&code)?);
        let kiln_cold = kiln_cold_starts(client, args.cold_starts, |name| {
            json!({
                "functionName": name,
                "runtime": runtime,
                "handler": "index.handler",
                "memorySize": 512,
                "code": {"zipFile": zip_b64},
            })
        })
        .await?;
        let tree = rootfs_dir(args).join(rt.rootfs());
        let baseline = runc::Baseline {
            rootfs: tree,
            args: rt
                .bootstrap_command()
                .context("a built-in runtime has a bootstrap")?
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            env: vec![
                "FC_CUSTOM_LISTEN_PORT=9000".into(),
                "FC_FUNC_CODE_PATH=/code".into(),
                "FC_FUNCTION_HANDLER=index.handler".into(),
            ],
            code: Some(code),
        };
        let runc_cold = runc::sequential(
            &baseline,
            &format!("{prefix}{}", &runtime[..2]),
            work,
            args.cold_starts,
        )
        .await?;
        let (kc, rc) = (median(&kiln_cold), median(&runc_cold));
        println!(
            "{:<34} {:>10.1}ms {:>10.1}ms {:>11.2}x",
            format!("cold start {runtime} (median)"),
            rc,
            kc,
            kc / rc
        );
        println!("  bare runc run runs (ms): {runc_cold:.1?}");
        println!("  kiln cold starts (ms):   {kiln_cold:.1?}");
    }
    Ok(())
}

/// A per-call figure of the throughput runs, as [`per_call_table`] prints it.
struct PerCall {
    title: &'static str,
    row: &'static str,
    unit: &'static str,
    decimals: usize,
}

const CPU: PerCall = PerCall {
    title: "cpu per warm call",
    row: "  (us of CPU time per call)",
    unit: "us",
    decimals: 1,
};

const SWITCHES: PerCall = PerCall {
    title: "context switches per warm call",
    row: "  (voluntary + preempted)",
    unit: "",
    decimals: 2,
};

/// Medians of a figure per warm call: each service, Kiln's total, the
/// nginx hop and Kiln's total over it, nginx's two hops (Kiln's shape:
/// TLS in, mTLS to the node) and Kiln's total over them; two lines.
fn per_call_table(
    what: &PerCall,
    connections: usize,
    kiln: &[std::collections::BTreeMap<&'static str, f64>],
    nginx: &[f64],
    nginx2: &[f64],
) -> String {
    let service = |s: &str| {
        median(
            &kiln
                .iter()
                .map(|r| r.get(s).copied().unwrap_or_default())
                .collect::<Vec<_>>(),
        )
    };
    let total = median(&kiln.iter().map(|r| r.values().sum()).collect::<Vec<_>>());
    let (unit, decimals) = (what.unit, what.decimals);
    let cell = |v: f64, width: usize| format!(" {v:>w$.decimals$}{unit}", w = width - unit.len());
    let mut head = format!("{:<42}", format!("{} ({connections} conn.)", what.title));
    let mut row = format!("{:<42}", what.row);
    for s in cpu::SERVICES {
        head.push_str(&format!(" {s:>10}"));
        row.push_str(&cell(service(s), 10));
    }
    head.push_str(&format!(" {:>10}", "kiln"));
    row.push_str(&cell(total, 10));
    if !nginx.is_empty() {
        let n = median(nginx);
        head.push_str(&format!(" {:>10} {:>10}", "nginx hop", "kiln/nginx"));
        row.push_str(&format!("{} {:>9.2}x", cell(n, 10), total / n));
    }
    if !nginx2.is_empty() {
        let n = median(nginx2);
        head.push_str(&format!(" {:>12} {:>11}", "nginx 2 hops", "kiln/2 hops"));
        row.push_str(&format!("{} {:>10.2}x", cell(n, 12), total / n));
    }
    format!("{head}\n{row}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// One throughput run's per-call figures for gateway and agent.
    fn round(gateway: f64, agent: f64) -> BTreeMap<&'static str, f64> {
        BTreeMap::from([("gateway", gateway), ("agent", agent), ("scheduler", 0.0)])
    }

    #[test]
    fn the_cpu_table_gives_medians_totals_and_the_ratio_to_nginx() {
        let kiln = [round(40.0, 30.0), round(50.0, 35.0), round(45.0, 90.0)];
        let table = per_call_table(&CPU, 16, &kiln, &[20.0, 15.0, 16.0], &[]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2, "{table}");
        assert!(
            lines[0].starts_with("cpu per warm call (16 conn.)"),
            "{table}"
        );
        let cells: Vec<&str> = lines[1].split_whitespace().collect();
        // gateway, agent, scheduler medians; the total is the median of
        // each round's sum (70, 85, 135), not the sum of medians.
        assert_eq!(
            &cells[cells.len() - 6..],
            ["45.0us", "35.0us", "0.0us", "85.0us", "16.0us", "5.31x"],
            "{table}"
        );
        // nginx's two hops (medians 40) follow with Kiln's total over them.
        let table = per_call_table(&CPU, 16, &kiln, &[20.0, 15.0, 16.0], &[50.0, 40.0, 30.0]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].ends_with("kiln/2 hops"), "{table}");
        let cells: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(&cells[cells.len() - 2..], ["40.0us", "2.12x"], "{table}");
        // Without the nginx peer the last two columns are left out.
        let table = per_call_table(&CPU, 16, &kiln, &[], &[]);
        assert!(!table.contains("nginx"), "{table}");
        assert!(table.trim_end().ends_with("85.0us"), "{table}");
    }

    #[test]
    fn the_switches_table_has_no_unit_and_two_decimals() {
        let kiln = [round(0.6, 0.85), round(0.55, 0.9), round(0.62, 0.8)];
        let table = per_call_table(&SWITCHES, 16, &kiln, &[0.5, 0.4, 0.45], &[0.9]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[0].starts_with("context switches per warm call (16 conn.)"),
            "{table}"
        );
        let cells: Vec<&str> = lines[1].split_whitespace().collect();
        // Medians 0.60 and 0.85; the total is the median of the sums
        // (1.45, 1.45, 1.42); nginx 0.45, two hops 0.90.
        assert_eq!(
            &cells[cells.len() - 8..],
            ["0.60", "0.85", "0.00", "1.45", "0.45", "3.22x", "0.90", "1.61x"],
            "{table}"
        );
        // Columns line up with the head's.
        assert_eq!(lines[0].len(), lines[1].len(), "{table}");
    }
}

/// The agent's invoke endpoint for the bench function's warm instance,
/// reached as the gateway reaches it (its mTLS client certificate).
struct NodeHop {
    target: Target,
    path: String,
}

async fn node_hop(cluster: &DevCluster) -> Result<NodeHop> {
    let files = cluster.pki.files("gateway-internal");
    let agent = cluster.agent_addr();
    let base = format!("https://{agent}");
    // Listing an agent's instances is the operator's (and the
    // scheduler's); invoking is the gateway's.
    let operator = cluster.pki.files("operator");
    let instances: Vec<kiln_internal_api::InstanceInfo> =
        kiln_internal_api::client::InternalClient::new(&operator)?
            .get(&base, kiln_internal_api::paths::AGENT_INSTANCES)
            .await
            .map_err(|e| anyhow::anyhow!("cannot list the agent's instances at {base}: {e}"))?;
    let instance = instances
        .iter()
        .find(|i| i.function_name.as_str() == "bench-echo")
        .context("the agent has no instance of bench-echo after the warm-up")?;
    Ok(NodeHop {
        target: Target {
            addr: agent,
            tls: Some((
                kiln_pki::internal_client_config(&files)?,
                rustls::pki_types::ServerName::from(agent.ip()),
            )),
        },
        path: kiln_internal_api::paths::agent_invoke(&instance.instance_id),
    })
}

/// A process of ours (the baseline function) killed and reaped when
/// dropped, on every path out of the measurement.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How the nginx peer is laid out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum NginxHops {
    /// TLS in, plain keep-alive HTTP/1.1 to the function.
    One,
    /// Kiln's own shape: TLS in, mutual TLS (TLS 1.3, client certificate
    /// checked against the cluster CA) to a second server block that
    /// stands where the agent does, then plain HTTP/1.1 to the function;
    /// keep-alive on both upstreams.
    Two,
}

/// nginx as a TLS reverse proxy (keep-alive upstream) in front of the
/// baseline function, stopped when dropped.
struct Nginx {
    child: std::process::Child,
    addr: SocketAddr,
}

impl Nginx {
    fn start(
        work: &Path,
        upstream: SocketAddr,
        pki: &kiln_pki::DevPki,
        hops: NginxHops,
    ) -> Result<Self> {
        let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .context("nginx is not installed (apt-get install nginx-light)")?;
        let dir = work.join(match hops {
            NginxHops::One => "nginx",
            NginxHops::Two => "nginx-two-hops",
        });
        std::fs::create_dir_all(dir.join("tmp"))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let tls = pki.files("gateway");
        let inner = match hops {
            NginxHops::One => String::new(),
            NginxHops::Two => {
                let agent = pki.files("agent");
                format!(
                    "  upstream agent {{ server {agent_addr}; keepalive 64; }}\n\
                     server {{\n  listen {agent_addr} ssl;\n  ssl_certificate {acert};\n  ssl_certificate_key {akey};\n\
                      ssl_protocols TLSv1.3;\n  ssl_client_certificate {ca};\n  ssl_verify_client on;\n\
                      keepalive_requests 1000000;\n\
                      location / {{ proxy_pass http://fn; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n }}\n",
                    agent_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?)),
                    acert = agent.cert.display(),
                    akey = agent.key.display(),
                    ca = agent.ca.display(),
                )
            }
        };
        let front_location = match hops {
            NginxHops::One => "proxy_pass http://fn;".to_owned(),
            NginxHops::Two => {
                let client = pki.files("gateway-internal");
                format!(
                    "proxy_pass https://agent; proxy_ssl_protocols TLSv1.3; proxy_ssl_session_reuse on; \
                     proxy_ssl_certificate {}; proxy_ssl_certificate_key {}; \
                     proxy_ssl_verify on; proxy_ssl_trusted_certificate {}; proxy_ssl_name kiln-agent;",
                    client.cert.display(),
                    client.key.display(),
                    client.ca.display()
                )
            }
        };
        let conf = format!(
            "worker_processes auto;\ndaemon off;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n access_log off;\n client_body_temp_path {dir}/tmp;\n proxy_temp_path {dir}/tmp;\n\
              upstream fn {{ server {upstream}; keepalive 64; }}\n{inner}\
              server {{\n  listen {addr} ssl;\n  ssl_certificate {cert};\n  ssl_certificate_key {key};\n\
               ssl_protocols TLSv1.2 TLSv1.3;\n  keepalive_requests 1000000;\n\
               location / {{ {front_location} proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n }}\n}}\n",
            dir = dir.display(),
            cert = tls.cert.display(),
            key = tls.key.display(),
        );
        std::fs::write(dir.join("nginx.conf"), conf)?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-p")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start nginx")?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "nginx did not listen on {addr}; see {}",
                    dir.join("error.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self { child, addr })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers and exits. SIGKILL would
        // leave the workers running, orphaned.
        let pid = self.child.id().to_string();
        let _ = Command::new("kill")
            .args(["-TERM", &pid])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn zip_b64_of(zip: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(zip)
}

async fn wait_port(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{addr} did not open within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// New functions (no instance yet; `function` gives each one's create
/// body) invoked once each: client-side time to the first response. The
/// first one also pays the node's code download and is not counted.
async fn kiln_cold_starts(
    client: &crate::client::FcClient,
    n: usize,
    function: impl Fn(&str) -> serde_json::Value,
) -> Result<Vec<f64>> {
    kiln_cold_starts_profiled(None, client, n, function)
        .await
        .map(|(times, _)| times)
}

/// [`kiln_cold_starts`], and where the starts after the first went when
/// `cluster` is given ([`stages`]).
async fn kiln_cold_starts_profiled(
    cluster: Option<&DevCluster>,
    client: &crate::client::FcClient,
    n: usize,
    function: impl Fn(&str) -> serde_json::Value,
) -> Result<(Vec<f64>, Option<stages::Stages>)> {
    let sample = || cluster.map(|c| stages::Sample::parse(&c.metrics_text()));
    let (mut before, mut after) = (None, None);
    let mut out = Vec::new();
    for i in 0..=n {
        if i == 1 {
            before = sample();
        }
        let name = format!("bench-cold-{i}");
        client.create_function(&function(&name)).await?;
        let t = Instant::now();
        client
            .invoke(&name, Bytes::from_static(b"ping"), &[])
            .await?
            .error_for_status()?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        if i > 0 {
            out.push(ms);
        }
        // Sampled before the delete: the destroy is not part of a start.
        if i == n {
            after = sample();
        }
        client.delete_function(&name).await?;
        // Let the node settle between starts.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let profile = match (&before, &after) {
        (Some(b), Some(a)) => Some(stages::Stages::between(b, a, &out)),
        _ => None,
    };
    Ok((out, profile))
}
