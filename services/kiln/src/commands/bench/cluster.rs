//! `kiln bench --cluster`: what a control plane on PostgreSQL costs and
//! gives (issue 17), each figure a ratio within one run.
//!
//! The same echo function behind two control planes, one after the other
//! on this machine: one gateway on SQLite (`kiln dev`, in this process)
//! and `--cluster N` (2 by default) gateways on PostgreSQL behind HAProxy with two
//! schedulers (`kiln dev --postgres`, each service a process of its own).
//! For each: async accepts per second (signed `InvokeFunction` with
//! `x-fc-invocation-type: Async`, each answered 202 once its message is
//! committed) and warm sync calls per second, over `--connections`
//! keep-alive connections, medians of `--runs` rounds. Then, on the same
//! PostgreSQL server, raw single-row `INSERT`s with the same durability
//! (fsync and synchronous_commit on, one commit per request, as many
//! callers) and the shared queue alone
//! ([`kiln_gateway::queue::bench::compare_pg_accepts`]).
//!
//! Where the time goes in the cluster's async run: the CPU time the
//! gateways, PostgreSQL's processes and HAProxy used over it, per accept.
//! The database is a throwaway server from Debian's `postgresql` package
//! (initdb into /var/tmp, a unix socket only), stopped at the end.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures_util::FutureExt;
use http::{Method, Request};
use http_body_util::Full;

use super::{build_static_echo, deploy_echo, dev_options, BenchArgs};
use crate::cluster::{Cluster, ClusterOptions};
use crate::commands::dev::DevCluster;
use crate::credentials::Credentials;
use crate::dev_config::ClusterDatabase;
use crate::loadgen::{median, LoadRuntime, Target};

/// Async requests per round: the per-account queue bound (100,000
/// unfinished) stays far away even if dispatch lags.
const ASYNC_PER_ROUND: usize = 6_000;
/// Seconds per round of the raw-insert and queue-alone comparison.
const RAW_SECONDS: u64 = 4;

/// What one control plane measured (medians over the rounds).
#[derive(Debug, Default, Clone, Copy)]
struct Figures {
    async_rate: f64,
    async_errors: u64,
    sync_rate: f64,
    sync_errors: u64,
}

/// CPU seconds each part of the cluster used (over a window, or per
/// accept), and the database's committed transactions.
#[derive(Debug, Default, Clone, Copy)]
struct CpuSplit {
    gateways: f64,
    postgres: f64,
    haproxy: f64,
    commits: f64,
}

pub async fn run(args: &BenchArgs) -> Result<()> {
    super::require_root()?;
    let Some(pg) = kiln_test_support::postgres::PgServer::start_durable() else {
        bail!(
            "--cluster needs PostgreSQL (Debian's postgresql package; scripts/install-deps.sh \
             installs it) and root to run it as the postgres user"
        );
    };
    let gateways = args.cluster.unwrap_or(2).max(1);
    let work = tempfile::Builder::new().prefix("kiln-bench-").tempdir()?;
    let binary = build_static_echo(work.path())?;
    let code_zip = crate::zipdir::zip_dir(binary.parent().expect("a directory"))?;
    let lg = LoadRuntime::new(2)?;

    eprintln!("one gateway on SQLite (kiln dev)");
    let opts = dev_options(args, &work.path().join("one-box"))?;
    let one = DevCluster::start(&opts).await?;
    let one_box = AssertUnwindSafe(measure(args, &lg, &one.credentials, &code_zip, None))
        .catch_unwind()
        .await;
    one.shutdown().await;
    let (one_box, _, _) = unwind(one_box)?;

    eprintln!(
        "{} gateways on PostgreSQL behind HAProxy, two schedulers (kiln dev --postgres)",
        gateways
    );
    let url = pg.create_database("kiln_cluster_bench");
    let statements = Statements::enable(&url).await;
    let opts = dev_options(args, &work.path().join("cluster"))?;
    let cluster = Cluster::start(
        &opts,
        &ClusterOptions {
            database: ClusterDatabase {
                url: url.clone(),
                password_file: None,
            },
            gateways,
        },
    )
    .await?;
    let pids = ClusterPids::read(&cluster.cluster_json, &pg.data_dir(), &url)?;
    let clustered = AssertUnwindSafe(measure(
        args,
        &lg,
        &cluster.credentials,
        &code_zip,
        Some((&pids, statements.as_ref())),
    ))
    .catch_unwind()
    .await;
    cluster.shutdown().await;
    let (clustered, split, top) = unwind(clustered)?;

    eprintln!("raw PostgreSQL inserts and the shared queue alone, same server");
    let raw_url = pg.create_database("kiln_raw_bench");
    let raw = kiln_gateway::queue::bench::compare_pg_accepts(
        &raw_url,
        RAW_SECONDS,
        args.connections,
        b"ping",
        args.runs,
    )
    .await
    .map_err(|e| anyhow::anyhow!("the raw insert comparison failed: {e}"))?;

    println!();
    println!(
        "control plane (medians of {} rounds, {} connections)   1 gateway/SQLite   {gateways} gateways/PostgreSQL+HAProxy   ratio",
        args.runs, args.connections
    );
    println!(
        "  async accepts/s                                   {:>12.0}   {:>28.0}   {:>5.2}x",
        one_box.async_rate,
        clustered.async_rate,
        clustered.async_rate / one_box.async_rate.max(f64::MIN_POSITIVE)
    );
    println!(
        "  warm sync calls/s                                 {:>12.0}   {:>28.0}   {:>5.2}x",
        one_box.sync_rate,
        clustered.sync_rate,
        clustered.sync_rate / one_box.sync_rate.max(f64::MIN_POSITIVE)
    );
    println!(
        "  failed requests (async, sync)                     {:>5}, {:<5}   {:>20}, {:<5}",
        one_box.async_errors, one_box.sync_errors, clustered.async_errors, clustered.sync_errors
    );
    println!(
        "raw PostgreSQL inserts (one commit each, fsync and synchronous_commit on, {} callers): {:.0}/s; \
         {gateways} gateways' async accepts / raw inserts: {:.2}x",
        args.connections,
        raw.raw.rate,
        clustered.async_rate / raw.raw.rate.max(f64::MIN_POSITIVE)
    );
    println!(
        "shared queue alone (group commit, no HTTP):  {}  ({:.2}x raw)",
        raw.queue,
        raw.ratio()
    );
    println!(
        "shared nonce check per signed request:       {} (1 caller)",
        raw.nonce_one
    );
    println!(
        "                                             {} ({} callers)",
        raw.nonce_many, args.connections
    );
    if let Some(s) = split {
        println!(
            "cluster async rounds, per accept (its dispatch included): CPU of the gateways {:.0} us, \
             PostgreSQL {:.0} us, HAProxy {:.0} us; {:.1} PostgreSQL commits",
            s.gateways * 1e6,
            s.postgres * 1e6,
            s.haproxy * 1e6,
            s.commits
        );
    }
    if !top.is_empty() {
        println!(
            "PostgreSQL's busiest statements in those rounds (pg_stat_statements, per accept):"
        );
        for t in &top {
            println!(
                "  {:>5.2} calls {:>7.1} us  {}",
                t.calls,
                t.exec_s * 1e6,
                t.query
            );
        }
    }
    drop(pg);
    Ok(())
}

/// The measurement's result, or the panic it raised (after the caller
/// stopped what it started).
fn unwind<T>(r: std::thread::Result<Result<T>>) -> Result<T> {
    match r {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Deploy the echo function, warm it, then the async and sync rounds.
async fn measure(
    args: &BenchArgs,
    lg: &LoadRuntime,
    creds: &Credentials,
    code_zip: &[u8],
    cluster: Option<(&ClusterPids, Option<&Statements>)>,
) -> Result<(Figures, Option<CpuSplit>, Vec<StatementCost>)> {
    let pids = cluster.map(|(p, _)| p);
    let statements = cluster.and_then(|(_, s)| s);
    let client = crate::client::FcClient::new(creds.clone())?;
    deploy_echo(&client, code_zip).await?;
    // Every gateway of a cluster must know it before the load starts.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut warm = 0;
    while warm < 50 {
        match client
            .invoke("bench-echo", Bytes::from_static(b"ping"), &[])
            .await
        {
            Ok(r) if r.status == 200 => warm += 1,
            _ if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Ok(r) => bail!("warming bench-echo: {}", r.status),
            Err(e) => return Err(e).context("warming bench-echo"),
        }
    }
    let uri: http::Uri = creds.endpoint.parse()?;
    let host = uri.host().unwrap_or("127.0.0.1").to_owned();
    let target = Target {
        addr: format!("{host}:{}", uri.port_u16().unwrap_or(443)).parse()?,
        tls: Some((
            kiln_pki::public_client_config(&creds.ca_cert)?,
            rustls::pki_types::ServerName::try_from(host)?,
        )),
    };
    let requests = |n: usize, kind: Option<&str>| -> Result<Vec<Request<Full<Bytes>>>> {
        let mut headers = vec![(
            "content-type".to_owned(),
            "application/octet-stream".to_owned(),
        )];
        if let Some(kind) = kind {
            headers.push(("x-fc-invocation-type".to_owned(), kind.to_owned()));
        }
        (0..n)
            .map(|_| {
                crate::signing::signed_request(
                    creds,
                    Method::POST,
                    "/2023-03-30/functions/bench-echo/invocations",
                    &headers,
                    Bytes::from_static(b"ping"),
                    Some("InvokeFunction"),
                )
                .map_err(Into::into)
            })
            .collect()
    };
    let (mut async_rates, mut sync_rates) = (Vec::new(), Vec::new());
    let (mut async_errors, mut sync_errors) = (0, 0);
    if let Some(s) = statements {
        s.reset().await?;
    }
    let before = match pids {
        Some(p) => Some(p.cpu().await?),
        None => None,
    };
    let mut accepted = 0usize;
    for _ in 0..args.runs {
        let r = lg
            .run(
                &target,
                args.connections,
                requests(ASYNC_PER_ROUND, Some("Async"))?,
            )
            .await?;
        async_rates.push(r.throughput());
        async_errors += r.errors;
        accepted += r.latencies_us.len();
    }
    let after = match pids {
        Some(p) => Some(p.cpu().await?),
        None => None,
    };
    let top = match statements {
        Some(s) => s.top(TOP_STATEMENTS).await?,
        None => Vec::new(),
    };
    // Let the dispatch of the accepted calls finish before the sync runs.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for _ in 0..args.runs {
        let r = lg
            .run(&target, args.connections, requests(args.requests, None)?)
            .await?;
        sync_rates.push(r.throughput());
        sync_errors += r.errors;
    }
    let figures = Figures {
        async_rate: median(&async_rates),
        async_errors,
        sync_rate: median(&sync_rates),
        sync_errors,
    };
    // CPU seconds per accept over all async rounds (the dispatch of what
    // they accepted included, as it runs meanwhile).
    let per = 1.0 / (accepted.max(1) as f64);
    let split = match (before, after) {
        (Some(b), Some(a)) => Some(CpuSplit {
            gateways: (a.gateways - b.gateways) * per,
            postgres: (a.postgres - b.postgres) * per,
            haproxy: (a.haproxy - b.haproxy) * per,
            commits: (a.commits - b.commits) * per,
        }),
        _ => None,
    };
    let per_accept = |c: StatementCost| StatementCost {
        calls: c.calls * per,
        exec_s: c.exec_s * per,
        ..c
    };
    Ok((figures, split, top.into_iter().map(per_accept).collect()))
}

/// Statements listed in the cluster's report.
const TOP_STATEMENTS: i64 = 8;

/// One statement's share of the server's work (totals, or per accept).
#[derive(Debug, Clone)]
struct StatementCost {
    calls: f64,
    /// Execution time (the commit's flush of a single-statement
    /// transaction is not in it).
    exec_s: f64,
    /// The normalised text, whitespace collapsed and cut short.
    query: String,
}

/// `pg_stat_statements` in the cluster's database, when the server
/// loaded it ([`kiln_test_support::postgres::PgServer::start_durable`]).
struct Statements {
    url: String,
}

impl Statements {
    /// Create the extension in the database at `url`; `None` (and a note)
    /// when the server cannot count statements.
    async fn enable(url: &str) -> Option<Self> {
        match one_shot(url, &["CREATE EXTENSION IF NOT EXISTS pg_stat_statements"]).await {
            Ok(_) => Some(Self {
                url: url.to_owned(),
            }),
            Err(e) => {
                eprintln!("PostgreSQL cannot count statements here ({e}); its busiest statements are not listed");
                None
            }
        }
    }

    async fn query(&self, sql: &str) -> Result<Vec<tokio_postgres::Row>> {
        one_shot(&self.url, &[sql])
            .await
            .context("cannot query the cluster's database")
    }

    async fn reset(&self) -> Result<()> {
        self.query("SELECT pg_stat_statements_reset()").await?;
        Ok(())
    }

    /// The `n` statements of this database that took the most execution
    /// time since the last reset.
    async fn top(&self, n: i64) -> Result<Vec<StatementCost>> {
        let rows = self
            .query(&format!(
                "SELECT calls::float8, total_exec_time / 1000.0, query FROM pg_stat_statements
                 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                 ORDER BY total_exec_time DESC LIMIT {n}"
            ))
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let text: String = r.get(2);
                let mut query = text.split_whitespace().collect::<Vec<_>>().join(" ");
                if query.chars().count() > 90 {
                    query = query.chars().take(89).collect::<String>() + "…";
                }
                StatementCost {
                    calls: r.get(0),
                    exec_s: r.get(1),
                    query,
                }
            })
            .collect())
    }
}

/// Run `statements` in order on a connection of their own to `url`; the
/// last one's rows.
async fn one_shot(
    url: &str,
    statements: &[&str],
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let conn = tokio::spawn(conn);
    let mut rows = Ok(Vec::new());
    for sql in statements {
        rows = client.query(*sql, &[]).await;
        if rows.is_err() {
            break;
        }
    }
    drop(client);
    let _ = conn.await;
    rows
}

/// The processes whose CPU the cluster's split counts.
struct ClusterPids {
    gateways: Vec<u32>,
    haproxy: Vec<u32>,
    postmaster: u32,
    /// The cluster's database, for its commit counter.
    url: String,
}

impl ClusterPids {
    fn read(cluster_json: &Path, pg_data: &Path, url: &str) -> Result<Self> {
        let text = std::fs::read_to_string(cluster_json)
            .with_context(|| format!("cannot read {}", cluster_json.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let (mut gateways, mut haproxy) = (Vec::new(), Vec::new());
        for p in v["processes"].as_array().into_iter().flatten() {
            let Some(pid) = p["pid"].as_u64() else {
                continue;
            };
            match p["role"].as_str() {
                Some("gateway") => gateways.push(pid as u32),
                Some("haproxy") => haproxy.push(pid as u32),
                _ => {}
            }
        }
        let pidfile = std::fs::read_to_string(pg_data.join("postmaster.pid"))
            .context("cannot read PostgreSQL's postmaster.pid")?;
        let postmaster = pidfile
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .context("postmaster.pid names no process")?;
        Ok(Self {
            gateways,
            haproxy,
            postmaster,
            url: url.to_owned(),
        })
    }

    /// CPU seconds (user + system, with reaped children) and the
    /// database's commits so far.
    async fn cpu(&self) -> Result<CpuSplit> {
        // The statistics of this backend's transaction are a snapshot:
        // clear it so the counter is read fresh.
        let rows = one_shot(
            &self.url,
            &[
                "SELECT pg_stat_clear_snapshot()",
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
            ],
        )
        .await
        .context("cannot read the cluster's database's commits")?;
        let commits: i64 = rows.first().context("no row for the database")?.get(0);
        let sum = |pids: &[u32]| pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
        // PostgreSQL's backends are the postmaster's children; the ones
        // that ended are in its children's counters.
        let backends: Vec<u32> = std::iter::once(self.postmaster)
            .chain(children(self.postmaster))
            .collect();
        Ok(CpuSplit {
            gateways: sum(&self.gateways),
            postgres: sum(&backends),
            haproxy: sum(&self.haproxy),
            commits: commits as f64,
        })
    }
}

/// utime + stime + cutime + cstime of a process, in seconds (0 if gone).
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command (which may hold spaces) end with ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14.
    let ticks: u64 = (11..=14)
        .filter_map(|i| f.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    ticks as f64 / hz
}

/// The direct children of `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let path = t.path().join("children");
            if let Ok(text) = std::fs::read_to_string(path) {
                out.extend(
                    text.split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    out
}
