//! The host side effects of the microVM backend, each behind a trait with
//! the real implementation and a fake for unit tests: tap devices,
//! read-only disk images. (Starting the VMM is [`super::launch`]'s; its
//! cgroup is [`crate::cgroup`]'s, shared with the container backend.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::Command;

use crate::net::HostCommands;

const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a host operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("Cannot execute {tool}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {message}")]
    Command { command: String, message: String },
    #[error("`{0}` did not finish in time")]
    TimedOut(String),
    #[error("Cannot use {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> HostError + '_ {
    move |source| HostError::Io {
        path: path.to_owned(),
        source,
    }
}

async fn run_tool(tool: &Path, args: &[&str]) -> Result<Result<String, String>, HostError> {
    let child = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| HostError::Spawn {
            tool: tool.display().to_string(),
            source,
        })?;
    let command = format!("{} {}", tool.display(), args.join(" "));
    let out = tokio::time::timeout(TOOL_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| HostError::TimedOut(command.clone()))?
        .map_err(|source| HostError::Spawn {
            tool: tool.display().to_string(),
            source,
        })?;
    if out.status.success() {
        Ok(Ok(String::from_utf8_lossy(&out.stdout).into_owned()))
    } else {
        Ok(Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()))
    }
}

async fn must(tool: &Path, args: &[&str]) -> Result<String, HostError> {
    run_tool(tool, args)
        .await?
        .map_err(|message| HostError::Command {
            command: format!("{} {}", tool.display(), args.join(" ")),
            message,
        })
}

/// One VM's tap: its name and the host's address on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapSpec {
    pub name: String,
    /// `ADDRESS/30` of the host end.
    pub host_cidr: String,
    /// Owner of the tap (the VMM's uid), so an unprivileged VMM can open it.
    pub owner: Option<u32>,
}

/// Tap devices.
#[async_trait::async_trait]
pub trait TapOps: Send + Sync + 'static {
    /// Create the tap, address the host end and bring it up.
    async fn create(&self, tap: &TapSpec) -> Result<(), HostError>;
    /// Remove the tap; succeeds when it does not exist.
    async fn delete(&self, name: &str) -> Result<(), HostError>;
    /// Links whose names start with `prefix-`.
    async fn list(&self, prefix: &str) -> Result<BTreeSet<String>, HostError>;
}

/// Taps through iproute2's `ip`.
#[derive(Debug, Clone)]
pub struct IpTaps {
    pub ip: PathBuf,
}

impl Default for IpTaps {
    fn default() -> Self {
        Self { ip: "ip".into() }
    }
}

#[async_trait::async_trait]
impl TapOps for IpTaps {
    async fn create(&self, tap: &TapSpec) -> Result<(), HostError> {
        let owner = tap.owner.map(|u| u.to_string());
        let mut args = vec!["tuntap", "add", "dev", &tap.name, "mode", "tap"];
        if let Some(uid) = &owner {
            args.extend(["user", uid.as_str()]);
        }
        must(&self.ip, &args).await?;
        let rest = async {
            must(&self.ip, &["addr", "add", &tap.host_cidr, "dev", &tap.name]).await?;
            must(&self.ip, &["link", "set", &tap.name, "up"]).await
        }
        .await;
        if let Err(e) = rest {
            let _ = self.delete(&tap.name).await;
            return Err(e);
        }
        Ok(())
    }

    async fn delete(&self, name: &str) -> Result<(), HostError> {
        match run_tool(&self.ip, &["link", "del", name]).await? {
            Ok(_) => Ok(()),
            Err(m) if m.contains("Cannot find device") || m.contains("does not exist") => Ok(()),
            Err(message) => Err(HostError::Command {
                command: format!("ip link del {name}"),
                message,
            }),
        }
    }

    async fn list(&self, prefix: &str) -> Result<BTreeSet<String>, HostError> {
        let out = must(&self.ip, &["-o", "link", "show"]).await?;
        let want = format!("{prefix}-");
        Ok(out
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_owned())
            .filter(|n| n.starts_with(&want))
            .collect())
    }
}

/// Taps through `ip`, run by the same [`HostCommands`] as the network
/// isolation: with [`crate::net::RecordingCommands`] one log holds the
/// tap's creation, its isolation and its removal in the order they ran.
#[derive(Clone)]
pub struct CommandTaps {
    pub cmd: Arc<dyn HostCommands>,
}

impl std::fmt::Debug for CommandTaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandTaps").finish_non_exhaustive()
    }
}

impl CommandTaps {
    pub fn new(cmd: Arc<dyn HostCommands>) -> Self {
        Self { cmd }
    }

    async fn ip(&self, args: &[&str]) -> Result<String, HostError> {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        self.cmd
            .run("ip", &args, None)
            .await
            .map_err(|e| HostError::Command {
                command: format!("ip {}", args.join(" ")),
                message: e.to_string(),
            })
    }
}

#[async_trait::async_trait]
impl TapOps for CommandTaps {
    async fn create(&self, tap: &TapSpec) -> Result<(), HostError> {
        let owner = tap.owner.map(|u| u.to_string());
        let mut args = vec!["tuntap", "add", "dev", &tap.name, "mode", "tap"];
        if let Some(uid) = &owner {
            args.extend(["user", uid.as_str()]);
        }
        self.ip(&args).await?;
        let rest = async {
            self.ip(&["addr", "add", &tap.host_cidr, "dev", &tap.name])
                .await?;
            self.ip(&["link", "set", &tap.name, "up"]).await
        }
        .await;
        if let Err(e) = rest {
            let _ = self.delete(&tap.name).await;
            return Err(e);
        }
        Ok(())
    }

    async fn delete(&self, name: &str) -> Result<(), HostError> {
        let args: Vec<String> = ["link", "del", name].map(str::to_owned).to_vec();
        match self.cmd.run("ip", &args, None).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_absent() => Ok(()),
            Err(e) => Err(HostError::Command {
                command: format!("ip link del {name}"),
                message: e.to_string(),
            }),
        }
    }

    async fn list(&self, prefix: &str) -> Result<BTreeSet<String>, HostError> {
        let out = self.ip(&["-o", "link", "show"]).await?;
        let want = format!("{prefix}-");
        Ok(out
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_owned())
            .filter(|n| n.starts_with(&want))
            .collect())
    }
}

/// A fake that remembers which taps exist.
#[derive(Debug, Default)]
pub struct RecordingTaps {
    pub taps: Mutex<BTreeSet<String>>,
    pub fail_create: Mutex<bool>,
}

#[async_trait::async_trait]
impl TapOps for RecordingTaps {
    async fn create(&self, tap: &TapSpec) -> Result<(), HostError> {
        if *self.fail_create.lock().expect("lock") {
            return Err(HostError::Command {
                command: format!("ip tuntap add dev {}", tap.name),
                message: "Operation not permitted".into(),
            });
        }
        self.taps.lock().expect("lock").insert(tap.name.clone());
        Ok(())
    }
    async fn delete(&self, name: &str) -> Result<(), HostError> {
        self.taps.lock().expect("lock").remove(name);
        Ok(())
    }
    async fn list(&self, prefix: &str) -> Result<BTreeSet<String>, HostError> {
        let want = format!("{prefix}-");
        Ok(self
            .taps
            .lock()
            .expect("lock")
            .iter()
            .filter(|n| n.starts_with(&want))
            .cloned()
            .collect())
    }
}

/// Builds a read-only erofs image of `source` at `dest` (written to a
/// temporary name first, so a crash never leaves a half image in place).
pub async fn build_erofs(mkfs: &Path, source: &Path, dest: &Path) -> Result<(), HostError> {
    let tmp = dest.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let tmp_s = tmp.to_string_lossy().into_owned();
    let src_s = source.to_string_lossy().into_owned();
    if let Err(e) = must(mkfs, &["--all-root", &tmp_s, &src_s]).await {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, dest).map_err(io_err(dest))?;
    Ok(())
}
