//! The cold-start baseline: a bare `runc run` of a bundle holding the same
//! binary as the measured function (or, for a built-in runtime, the same
//! root filesystem, bootstrap and code: [`Baseline`]), into a network
//! namespace made ready beforehand (a veth pair and addresses, as Kiln's
//! agent gives an instance), timed until the port answers an invocation.
//! One at a time ([`sequential`]) or `callers` at a time ([`burst`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

/// A network namespace with a veth to the host, removed when dropped.
struct Netns {
    name: String,
    /// The instance's address inside it.
    addr: SocketAddr,
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace removes the veth pair with it.
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

pub(super) fn sh(cmd: &[&str]) -> Result<()> {
    let status = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("cannot run {}", cmd.join(" ")))?;
    if !status.success() {
        bail!("`{}` failed", cmd.join(" "));
    }
    Ok(())
}

/// `count` namespaces `{prefix}-b{i}` on /30s of one random 10.250.x.0/24.
fn namespaces(prefix: &str, count: usize) -> Result<Vec<Netns>> {
    if count > 63 {
        bail!("at most 63 baseline namespaces (one /24 of /30s)");
    }
    let third: u8 = (rand::random::<u32>() % 250) as u8;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let name = format!("{prefix}-b{i}");
        let (host_if, peer_if) = (format!("{prefix}h{i}"), format!("{prefix}p{i}"));
        let o = (i * 4) as u8;
        let host_ip = Ipv4Addr::new(10, 250, third, o + 1);
        let inst_ip = Ipv4Addr::new(10, 250, third, o + 2);
        sh(&["ip", "netns", "add", &name])?;
        // From here on dropping it cleans up, whatever fails next.
        out.push(Netns {
            name: name.clone(),
            addr: SocketAddr::from((inst_ip, 9000)),
        });
        sh(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &peer_if,
        ])?;
        sh(&["ip", "link", "set", &peer_if, "netns", &name])?;
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &host_if,
        ])?;
        sh(&["ip", "link", "set", &host_if, "up"])?;
        sh(&[
            "ip",
            "-n",
            &name,
            "addr",
            "add",
            &format!("{inst_ip}/30"),
            "dev",
            &peer_if,
        ])?;
        sh(&["ip", "-n", &name, "link", "set", &peer_if, "up"])?;
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"])?;
    }
    Ok(out)
}

/// What a baseline container runs: a read-only root filesystem, the
/// process and its environment, and the code bound read-only at /code.
pub(super) struct Baseline {
    pub rootfs: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub code: Option<PathBuf>,
}

impl Baseline {
    /// A root filesystem holding `binary` at /code/server, run as is.
    pub fn static_binary(binary: &Path, work: &Path) -> Result<Self> {
        let rootfs = work.join("baseline-rootfs");
        for d in ["code", "proc", "dev", "sys", "tmp"] {
            std::fs::create_dir_all(rootfs.join(d))?;
        }
        std::fs::copy(binary, rootfs.join("code/server"))?;
        Ok(Self {
            rootfs,
            args: vec!["/code/server".into()],
            env: vec!["FC_CUSTOM_LISTEN_PORT=9000".into()],
            code: None,
        })
    }
}

/// A bundle per namespace whose config runs `base` in it.
fn bundles(base: &Baseline, work: &Path, nets: &[Netns]) -> Result<Vec<PathBuf>> {
    // One template per call: a burst follows the sequential run in the
    // same work directory, and `runc spec` will not overwrite.
    let template = work.join(format!("baseline-spec-{}", nets.len()));
    let _ = std::fs::remove_file(template.join("config.json"));
    std::fs::create_dir_all(&template)?;
    sh(&["runc", "spec", "--bundle", template.to_str().unwrap()])?;
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(template.join("config.json"))?)?;
    let mut out = Vec::with_capacity(nets.len());
    for net in nets {
        let mut spec = spec.clone();
        spec["process"]["terminal"] = json!(false);
        spec["process"]["args"] = json!(base.args);
        spec["process"]["env"]
            .as_array_mut()
            .context("runc spec has no env")?
            .extend(base.env.iter().map(|e| json!(e)));
        spec["root"]["path"] = json!(base.rootfs);
        spec["root"]["readonly"] = json!(true);
        if let Some(code) = &base.code {
            spec["mounts"]
                .as_array_mut()
                .context("runc spec has no mounts")?
                .push(
                    json!({"destination": "/code", "type": "bind", "source": code,
                             "options": ["rbind", "ro"]}),
                );
        }
        for ns in spec["linux"]["namespaces"]
            .as_array_mut()
            .context("runc spec has no namespaces")?
        {
            if ns["type"] == "network" {
                ns["path"] = json!(format!("/var/run/netns/{}", net.name));
            }
        }
        let bundle = work.join(format!("baseline-{}", net.name));
        std::fs::create_dir_all(&bundle)?;
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&spec)?,
        )?;
        out.push(bundle);
    }
    Ok(out)
}

/// `runc run --detach` of `bundle` as `id`, timed until `addr` answers;
/// the container is deleted before returning.
async fn start_one(runc_root: &Path, bundle: &Path, id: &str, addr: SocketAddr) -> Result<f64> {
    let t = Instant::now();
    let status = tokio::process::Command::new("runc")
        .arg("--root")
        .arg(runc_root)
        .args(["run", "--detach", "--bundle"])
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await?;
    let answered = if status.success() {
        invoke_raw(addr, Duration::from_secs(10)).await
    } else {
        Err(anyhow::anyhow!(
            "bare `runc run` of the baseline bundle failed"
        ))
    };
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    let _ = tokio::process::Command::new("runc")
        .arg("--root")
        .arg(runc_root)
        .args(["delete", "--force", id])
        .status()
        .await;
    answered.map(|()| ms)
}

/// `n` starts one after another into one namespace (plus one unmeasured
/// first start): milliseconds each.
pub(super) async fn sequential(
    base: &Baseline,
    prefix: &str,
    work: &Path,
    n: usize,
) -> Result<Vec<f64>> {
    let nets = namespaces(prefix, 1)?;
    let bundle = bundles(base, work, &nets)?.remove(0);
    let runc_root = work.join("baseline-runc");
    let mut out = Vec::new();
    for i in 0..=n {
        let ms = start_one(
            &runc_root,
            &bundle,
            &format!("{prefix}-base-{i}"),
            nets[0].addr,
        )
        .await?;
        if i > 0 {
            out.push(ms);
        }
    }
    Ok(out)
}

/// `n` starts, each into a namespace of its own made beforehand, by
/// `callers` concurrent callers: the whole burst's wall time and each
/// start's milliseconds.
pub(super) async fn burst(
    base: &Baseline,
    prefix: &str,
    work: &Path,
    n: usize,
    callers: usize,
) -> Result<(Duration, Vec<f64>)> {
    let nets = Arc::new(namespaces(&format!("{prefix}x"), n)?);
    let bundles = Arc::new(bundles(base, work, &nets)?);
    let runc_root = Arc::new(work.join("baseline-runc-burst"));
    let next = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..callers {
        let (nets, bundles, runc_root, next) = (
            nets.clone(),
            bundles.clone(),
            runc_root.clone(),
            next.clone(),
        );
        let prefix = prefix.to_owned();
        tasks.spawn(async move {
            let mut times = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= bundles.len() {
                    return Ok::<_, anyhow::Error>(times);
                }
                let id = format!("{prefix}-burst-{i}");
                times.push(start_one(&runc_root, &bundles[i], &id, nets[i].addr).await?);
            }
        });
    }
    let mut times = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        times.extend(r??);
    }
    Ok((t.elapsed(), times))
}

/// Poll `addr` until `POST /invoke` answers 200.
pub(super) async fn invoke_raw(addr: SocketAddr, timeout: Duration) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
            let req = b"POST /invoke HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\nconnection: close\r\n\r\nping";
            if s.write_all(req).await.is_ok() {
                let mut buf = Vec::new();
                if s.read_to_end(&mut buf).await.is_ok() && buf.starts_with(b"HTTP/1.1 200") {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            bail!("{addr} did not answer within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
