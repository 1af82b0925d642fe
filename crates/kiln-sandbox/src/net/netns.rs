//! Per-instance network namespaces: a named netns with a veth pair whose
//! host side stays in the agent's namespace (the container backend's link),
//! behind a trait with a real implementation over iproute2's `ip` and a
//! recording fake.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use super::exec::{run_program, HostCommandError};
use super::subnet::{is_own_name, NetSlot};

const IP_TIMEOUT: Duration = Duration::from_secs(10);
/// Name of the instance's interface inside its namespace.
pub const INSTANCE_IFNAME: &str = "eth0";

/// Why a network operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("Cannot execute ip")]
    Spawn(#[source] std::io::Error),
    #[error("`ip {args}` failed: {message}")]
    Command { args: String, message: String },
    #[error("`ip {0}` did not finish in time")]
    TimedOut(String),
    #[error("All {0} instance addresses of the subnet are in use")]
    Exhausted(u32),
}

/// Network side effects of the container backend.
#[async_trait::async_trait]
pub trait NetworkOps: Send + Sync + 'static {
    /// Create the slot's netns and veth pair, address both ends, bring up
    /// `lo` and `eth0` and route everything via the host side.
    async fn create(&self, slot: &NetSlot) -> Result<(), NetworkError>;
    /// Remove the host veth (which takes its peer along) and the netns.
    /// Succeeds when neither exists.
    async fn delete(&self, name: &str) -> Result<(), NetworkError>;
    /// Names of the namespaces and links that carry `prefix`.
    async fn list(&self, prefix: &str) -> Result<BTreeSet<String>, NetworkError>;
}

/// The real thing: iproute2's `ip`.
#[derive(Debug, Clone)]
pub struct IpCommand {
    binary: PathBuf,
}

impl Default for IpCommand {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("ip"),
        }
    }
}

impl IpCommand {
    pub fn new(binary: PathBuf) -> Self {
        Self { binary }
    }

    /// Run `ip args...`; returns stdout, or stderr as the error message.
    async fn ip(&self, args: &[&str]) -> Result<Result<String, String>, NetworkError> {
        self.ip_with_input(args, None).await
    }

    /// As `ip`, with `input` on its stdin (for `-batch -`).
    async fn ip_with_input(
        &self,
        args: &[&str],
        input: Option<&str>,
    ) -> Result<Result<String, String>, NetworkError> {
        match run_program(&self.binary, args, input, IP_TIMEOUT).await {
            Ok(stdout) => Ok(Ok(stdout)),
            Err(HostCommandError::Failed { message, .. }) => Ok(Err(message)),
            Err(HostCommandError::TimedOut { .. }) => Err(NetworkError::TimedOut(args.join(" "))),
            Err(HostCommandError::Spawn { source, .. }) => Err(NetworkError::Spawn(source)),
        }
    }

    /// Run `ip args...` (ending in `-batch -`) fed `script`; fails with
    /// ip's message and the script.
    async fn batch(&self, args: &[&str], script: &str) -> Result<String, NetworkError> {
        self.ip_with_input(args, Some(script))
            .await?
            .map_err(|message| NetworkError::Command {
                args: format!("{} <<< {:?}", args.join(" "), script),
                message,
            })
    }

    async fn must(&self, args: &[&str]) -> Result<String, NetworkError> {
        self.ip(args)
            .await?
            .map_err(|message| NetworkError::Command {
                args: args.join(" "),
                message,
            })
    }

    async fn create_inner(&self, slot: &NetSlot) -> Result<(), NetworkError> {
        let ns = slot.name.as_str();
        let host = format!("{}/30", slot.host_addr);
        let inst = format!("{}/30", slot.instance_addr);
        let gw = slot.host_addr.to_string();
        // Two processes, not eight: the pool refills after every cold start,
        // on the same CPUs. A batch stops at its first failing line (ip
        // names it), and `create` undoes whatever was made.
        self.batch(
            &["-batch", "-"],
            &format!(
                "netns add {ns}\n\
                 link add {ns} type veth peer name {INSTANCE_IFNAME} netns {ns}\n\
                 addr add {host} dev {ns}\n\
                 link set {ns} up\n"
            ),
        )
        .await?;
        self.batch(
            &["-n", ns, "-batch", "-"],
            &format!(
                "link set lo up\n\
                 addr add {inst} dev {INSTANCE_IFNAME}\n\
                 link set {INSTANCE_IFNAME} up\n\
                 route add default via {gw}\n"
            ),
        )
        .await?;
        Ok(())
    }
}

fn is_absent(message: &str) -> bool {
    message.contains("Cannot find device")
        || message.contains("No such file or directory")
        || message.contains("does not exist")
}

#[async_trait::async_trait]
impl NetworkOps for IpCommand {
    async fn create(&self, slot: &NetSlot) -> Result<(), NetworkError> {
        let result = self.create_inner(slot).await;
        if result.is_err() {
            if let Err(e) = self.delete(&slot.name).await {
                tracing::warn!(netns = %slot.name, error = %kiln_core::error_chain(&e), "cannot undo a half-made network namespace");
            }
        }
        result
    }

    async fn delete(&self, name: &str) -> Result<(), NetworkError> {
        for args in [["link", "delete", name], ["netns", "delete", name]] {
            if let Err(message) = self.ip(&args).await? {
                if !is_absent(&message) {
                    return Err(NetworkError::Command {
                        args: args.join(" "),
                        message,
                    });
                }
            }
        }
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<BTreeSet<String>, NetworkError> {
        let mut names = BTreeSet::new();
        let netns = self.must(&["netns", "list"]).await?;
        names.extend(parse_netns_list(&netns));
        let links = self.must(&["-o", "link", "show"]).await?;
        names.extend(parse_link_list(&links));
        names.retain(|n| is_own_name(prefix, n));
        Ok(names)
    }
}

/// `ip netns list` prints `name (id: 3)` or `name` per line.
fn parse_netns_list(out: &str) -> impl Iterator<Item = String> + '_ {
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
}

/// `ip -o link show` prints `12: name@if2: <...> ...` per line.
fn parse_link_list(out: &str) -> impl Iterator<Item = String> + '_ {
    out.lines().filter_map(|l| {
        let name = l.split(": ").nth(1)?;
        Some(name.split('@').next()?.to_owned())
    })
}

/// One call the fake received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetCall {
    Create(String),
    Delete(String),
    List,
}

/// Fake network for unit tests: records calls and the names that exist.
#[derive(Debug, Default)]
pub struct RecordingNetwork {
    calls: Mutex<Vec<NetCall>>,
    existing: Mutex<BTreeSet<String>>,
    fail_create: Mutex<bool>,
}

impl RecordingNetwork {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn calls(&self) -> Vec<NetCall> {
        self.calls.lock().expect("lock").clone()
    }

    pub fn existing(&self) -> BTreeSet<String> {
        self.existing.lock().expect("lock").clone()
    }

    pub fn insert_leftover(&self, name: &str) {
        self.existing.lock().expect("lock").insert(name.to_owned());
    }

    pub fn fail_creates(&self, fail: bool) {
        *self.fail_create.lock().expect("lock") = fail;
    }
}

#[async_trait::async_trait]
impl NetworkOps for RecordingNetwork {
    async fn create(&self, slot: &NetSlot) -> Result<(), NetworkError> {
        self.calls
            .lock()
            .expect("lock")
            .push(NetCall::Create(slot.name.clone()));
        if *self.fail_create.lock().expect("lock") {
            return Err(NetworkError::Command {
                args: format!("netns add {}", slot.name),
                message: "injected failure".into(),
            });
        }
        let mut existing = self.existing.lock().expect("lock");
        if !existing.insert(slot.name.clone()) {
            return Err(NetworkError::Command {
                args: format!("netns add {}", slot.name),
                message: "File exists".into(),
            });
        }
        Ok(())
    }

    async fn delete(&self, name: &str) -> Result<(), NetworkError> {
        self.calls
            .lock()
            .expect("lock")
            .push(NetCall::Delete(name.to_owned()));
        self.existing.lock().expect("lock").remove(name);
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<BTreeSet<String>, NetworkError> {
        self.calls.lock().expect("lock").push(NetCall::List);
        let mut names = self.existing();
        names.retain(|n| is_own_name(prefix, n));
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_listings_parse() {
        let netns: Vec<String> = parse_netns_list("kt-1 (id: 3)\nother\n").collect();
        assert_eq!(netns, ["kt-1", "other"]);
        let links: Vec<String> = parse_link_list(
            "1: lo: <LOOPBACK,UP> mtu 65536 qdisc noqueue\n7: kt-1@if2: <BROADCAST> mtu 1500\n",
        )
        .collect();
        assert_eq!(links, ["lo", "kt-1"]);
    }
}
