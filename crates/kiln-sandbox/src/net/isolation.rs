//! Per-instance network isolation on the host side of an instance's
//! interface, the same for a container's veth and a microVM's tap.
//!
//! [`NetIsolation`] owns one nftables table, `inet <prefix>`, and never
//! touches rules outside it. [`NetIsolation::attach`] gives one host-side
//! interface (named `<prefix>-<hex>`, carrying the host address of a /30 of
//! the instance subnet; the instance has the other) its egress mode:
//!
//! | mode | internet | its VPC | other instances | node services | spoofed source |
//! |---|---|---|---|---|---|
//! | internet (FC's default) | public addresses, masqueraded out the uplink | no | no | no | no |
//! | VPC | no | by its security group | no | no | no |
//! | internet and VPC | public addresses | yes | no | no | no |
//! | none | no | no | no | no | no |
//!
//! "Node services" are the node's own addresses: an instance gets only
//! replies from them (the agent reaching the instance's port is the one
//! way in), except that instances with internet access reach the node's
//! configured `public_ports` (its internet-facing gateway) as the internet
//! does. Every mode drops anything from the interface whose source is
//! not the instance's address, and everything but IPv4. "Public addresses":
//! not in [`super::config::ALWAYS_DENIED`] (private, CGNAT, link-local,
//! loopback, multicast) nor in the configured `deny` list (other cluster
//! hosts), unless in `allow` (a DNS resolver).
//!
//! VPCs: each VPC the node serves gets an Open vSwitch bridge
//! `<prefix>v<n>` (userspace `netdev` datapath) and a veth pair, `<prefix>v<n>g`
//! in the agent's namespace (holding the node's gateway address on every
//! vSwitch of that VPC) and `<prefix>v<n>o` as the bridge's port. An
//! attached instance gets an address from its vSwitch's `instance_pool`,
//! mapped 1:1 to its private address (DNAT in, SNAT out), so VPC hosts see
//! and reach it at its VPC address; its security group's ingress rules say
//! what may. The VPC's `ports` (the operator's interfaces that lead to the
//! VPC's network) join the bridge when it is made. The bridge and its
//! port exist while an instance uses the VPC. A VPC's hosts get no more
//! of the node than instances do: its gateway addresses take no
//! connections (replies only), and the node routes nothing into or out of
//! a VPC but its instances' traffic (not from one VPC to another, nor
//! between a VPC and the uplink or the node's other networks).
//!
//! Bandwidth: a tbf on the host interface (traffic to the instance) and one
//! on an ifb `<prefix>i<hex>` the interface's ingress is redirected to
//! (traffic from the instance), both at the instance's rate.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use kiln_core::NetworkSpec;
use tokio::sync::Mutex as AsyncMutex;
use tracing::Instrument;

use super::config::NetworkConfig;
use super::config::NetworkConfigError;
use super::exec::{HostCommandError, HostCommands};
use super::names::Names;
use super::rules::{self, InstanceRules, VpcRules};
use super::subnet::NetSlot;

/// FC's four egress modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EgressMode {
    Internet,
    Vpc,
    InternetAndVpc,
    None,
}

impl EgressMode {
    /// The mode of a function: FC's default (no network spec) is internet.
    pub fn of(spec: Option<&NetworkSpec>) -> Self {
        match spec {
            None => Self::Internet,
            Some(n) => match (n.internet_access, n.vpc.is_some()) {
                (true, false) => Self::Internet,
                (false, true) => Self::Vpc,
                (true, true) => Self::InternetAndVpc,
                (false, false) => Self::None,
            },
        }
    }
}

/// Why an instance in egress mode `mode` cannot start on a node without
/// network isolation; `None` when it can (FC's default, internet access,
/// on a node whose operator turned isolation off explicitly: see
/// `insecure_network_isolation_disabled`). Nothing is ever silently
/// ignored: a function that asks for less than the internet is refused.
pub fn unisolated_refusal(network: Option<&NetworkSpec>) -> Option<String> {
    match EgressMode::of(network) {
        EgressMode::Internet => None,
        mode => Some(format!(
            "the function's egress mode ({}) needs network isolation, and this node runs without it (no [sandbox.network] in the agent's configuration; sandbox.insecure_network_isolation_disabled = true). Configure [sandbox.network] on the node (docs/security.md, \"Egress\") or place the function on a node that has it",
            mode.describe()
        )),
    }
}

impl EgressMode {
    /// The mode as FC's settings say it.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Internet => "internetAccess: true",
            Self::Vpc => "internetAccess: false with vpcConfig",
            Self::InternetAndVpc => "internetAccess: true with vpcConfig",
            Self::None => "internetAccess: false",
        }
    }
}

/// Standard or performance instance: which configured rate applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BandwidthClass {
    Standard,
    Performance,
}

impl BandwidthClass {
    /// FC's performance instances: the 10 GB disk is theirs alone (FC 3.0
    /// offers `diskSize` 10240 only to them), and FC sizes them from 4 GB
    /// of memory up; everything else is a standard instance.
    pub fn of(spec: &kiln_core::InstanceSpec) -> Self {
        let [standard_disk, _] = kiln_core::limits::DISK_SIZES_MB;
        if spec.disk_mb > standard_disk || spec.memory_mb >= PERFORMANCE_MEMORY_MB {
            Self::Performance
        } else {
            Self::Standard
        }
    }
}

/// Memory from which an instance is a performance instance.
pub const PERFORMANCE_MEMORY_MB: u32 = 4096;

/// The host side of an instance's link (a veth or a tap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInterface {
    /// `<prefix>-<hex>`.
    pub name: String,
    pub instance_addr: Ipv4Addr,
}

impl From<&NetSlot> for HostInterface {
    fn from(s: &NetSlot) -> Self {
        Self {
            name: s.name.clone(),
            instance_addr: s.instance_addr,
        }
    }
}

/// What [`NetIsolation::attach`] set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceNetwork {
    pub iface: String,
    pub egress: EgressMode,
    /// The instance's address in its VPC, with the vSwitch it is from.
    pub vpc_address: Option<(String, Ipv4Addr)>,
    pub bandwidth_mbit: u32,
}

/// Why isolating an instance's network failed.
#[derive(Debug, thiserror::Error)]
pub enum NetIsolationError {
    #[error(transparent)]
    Command(#[from] HostCommandError),
    #[error("Invalid network configuration: {0}")]
    Config(#[from] NetworkConfigError),
    #[error("VPC {0} is not served by this node")]
    UnknownVpc(String),
    #[error("None of the vSwitches {0:?} is served by this node")]
    UnknownVSwitch(Vec<String>),
    #[error("Security group {sg} does not exist in VPC {vpc}")]
    UnknownSecurityGroup { vpc: String, sg: String },
    #[error("vSwitch {0} has no free instance address left on this node")]
    VpcAddressesExhausted(String),
    #[error("Interface {0:?} is not an instance interface of this agent")]
    Interface(String),
    #[error("Interface {0} is already attached")]
    AlreadyAttached(String),
}

#[derive(Debug, Clone)]
struct Attached {
    rules: InstanceRules,
    vpc_index: Option<usize>,
    vswitch: Option<String>,
    ifb: String,
}

#[derive(Debug, Default)]
struct State {
    attached: HashMap<String, Attached>,
    /// Interfaces being attached (reserved before the first command).
    attaching: HashSet<String>,
    /// Instance addresses in use per vSwitch.
    vpc_addrs: HashMap<String, BTreeSet<Ipv4Addr>>,
    /// Attached instances per VPC bridge.
    bridges: HashMap<usize, usize>,
}

/// The agent's network isolation. See the module docs.
pub struct NetIsolation {
    config: NetworkConfig,
    names: Names,
    cmd: Arc<dyn HostCommands>,
    state: Mutex<State>,
    /// Serialises attaching and detaching instances on a VPC, so bridge
    /// reference counts (and creating or removing a bridge) stay exact.
    /// Instances without a VPC touch nothing shared but the nftables
    /// table, whose transactions the kernel serialises: they attach and
    /// detach concurrently, so parallel cold starts do not queue here.
    vpc_ops: AsyncMutex<()>,
}

/// An interface reserved for an attach in progress; unreserved on drop.
struct Reservation<'a> {
    state: &'a Mutex<State>,
    iface: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.state
            .lock()
            .expect("lock")
            .attaching
            .remove(&self.iface);
    }
}

impl std::fmt::Debug for NetIsolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetIsolation")
            .field("table", &self.names.table())
            .finish_non_exhaustive()
    }
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| (*x).to_owned()).collect()
}

/// Map an attach failure to the sandbox's error: a VPC, vSwitch or
/// security group the node does not serve is the function's
/// configuration this node cannot enforce, not a node fault.
pub fn attach_error(e: NetIsolationError) -> crate::SandboxError {
    use crate::SandboxError;
    match e {
        NetIsolationError::VpcAddressesExhausted(_) => SandboxError::Exhausted(e.to_string()),
        NetIsolationError::UnknownVpc(_)
        | NetIsolationError::UnknownVSwitch(_)
        | NetIsolationError::UnknownSecurityGroup { .. } => {
            SandboxError::Unenforceable(e.to_string())
        }
        other => SandboxError::network("isolation", other),
    }
}

impl NetIsolation {
    /// Remove whatever a previous run with this prefix left (its table,
    /// bridges, gateways, ifbs), enable forwarding and create the table.
    pub async fn start(
        prefix: &str,
        config: NetworkConfig,
        cmd: Arc<dyn HostCommands>,
    ) -> Result<Self, NetIsolationError> {
        config.validate()?;
        let me = Self {
            config,
            names: Names::new(prefix),
            cmd,
            state: Mutex::new(State::default()),
            vpc_ops: AsyncMutex::new(()),
        };
        me.remove_all().await?;
        me.cmd
            .run("sysctl", &s(&["-q", "-w", "net.ipv4.ip_forward=1"]), None)
            .await?;
        let table = rules::base_table(
            &me.names,
            me.config.uplink_interface.as_deref(),
            &me.config.denied(),
            &me.config.allow,
            &me.config.public_ports,
        );
        me.nft(&table).await?;
        tracing::info!(table = %me.names.table(), "network isolation table created");
        Ok(me)
    }

    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    pub fn table(&self) -> &str {
        self.names.table()
    }

    /// The rate an instance of `class` is shaped to.
    pub fn rate_mbit(&self, class: BandwidthClass) -> u32 {
        match class {
            BandwidthClass::Standard => self.config.standard_bandwidth_mbit,
            BandwidthClass::Performance => self.config.performance_bandwidth_mbit,
        }
    }

    async fn nft(&self, script: &str) -> Result<(), HostCommandError> {
        self.cmd
            .run("nft", &s(&["-f", "-"]), Some(script))
            .await
            .map(|_| ())
    }

    async fn ignore_absent(&self, program: &str, args: &[&str]) -> Result<(), HostCommandError> {
        match self.cmd.run(program, &s(args), None).await {
            Err(e) if !e.is_absent() => Err(e),
            _ => Ok(()),
        }
    }

    /// Delete the table, bridges, gateways and ifbs carrying the prefix.
    async fn remove_all(&self) -> Result<(), NetIsolationError> {
        self.ignore_absent("nft", &["delete", "table", "inet", self.names.table()])
            .await?;
        let bridges = self.cmd.run("ovs-vsctl", &s(&["list-br"]), None).await;
        match bridges {
            Ok(out) => {
                for br in out
                    .lines()
                    .map(str::trim)
                    .filter(|b| self.names.is_own_aux(b))
                {
                    tracing::info!(bridge = br, "removing leftover VPC bridge");
                    self.ignore_absent("ovs-vsctl", &["--if-exists", "del-br", br])
                        .await?;
                }
            }
            // No Open vSwitch on this node: no VPC bridges to remove.
            Err(e) => {
                tracing::debug!(error = %kiln_core::error_chain(&e), "cannot list OVS bridges")
            }
        }
        let links = self
            .cmd
            .run("ip", &s(&["-o", "link", "show"]), None)
            .await?;
        for name in links.lines().filter_map(|l| {
            let n = l.split(": ").nth(1)?;
            Some(n.split('@').next()?.to_owned())
        }) {
            if self.names.is_own_aux(&name) && !name.ends_with('o') {
                tracing::info!(link = %name, "removing leftover link");
                self.ignore_absent("ip", &["link", "delete", &name]).await?;
            }
        }
        Ok(())
    }

    /// Give the instance behind `iface` its egress mode, VPC address and
    /// bandwidth. On failure nothing of it is left.
    pub async fn attach(
        &self,
        iface: &HostInterface,
        network: Option<&NetworkSpec>,
        class: BandwidthClass,
    ) -> Result<InstanceNetwork, NetIsolationError> {
        let span = tracing::info_span!("net_attach", iface = %iface.name);
        self.attach_inner(iface, network, class)
            .instrument(span)
            .await
    }

    async fn attach_inner(
        &self,
        iface: &HostInterface,
        network: Option<&NetworkSpec>,
        class: BandwidthClass,
    ) -> Result<InstanceNetwork, NetIsolationError> {
        let _vpc_guard = match network.and_then(|n| n.vpc.as_ref()) {
            Some(_) => Some(self.vpc_ops.lock().await),
            None => None,
        };
        let ifb = self
            .names
            .ifb(&iface.name)
            .ok_or_else(|| NetIsolationError::Interface(iface.name.clone()))?;
        let _reserved = {
            let mut st = self.state.lock().expect("lock");
            if st.attached.contains_key(&iface.name) || !st.attaching.insert(iface.name.clone()) {
                return Err(NetIsolationError::AlreadyAttached(iface.name.clone()));
            }
            Reservation {
                state: &self.state,
                iface: iface.name.clone(),
            }
        };
        let egress = EgressMode::of(network);
        // Resolve the VPC before changing anything.
        let mut vpc_index = None;
        let mut vswitch = None;
        let mut vpc_rules = None;
        if let Some(att) = network.and_then(|n| n.vpc.as_ref()) {
            let (idx, vpc) = self
                .config
                .vpc(&att.vpc_id)
                .ok_or_else(|| NetIsolationError::UnknownVpc(att.vpc_id.clone()))?;
            let sg = vpc
                .security_groups
                .iter()
                .find(|g| g.id == att.security_group_id)
                .ok_or_else(|| NetIsolationError::UnknownSecurityGroup {
                    vpc: vpc.id.clone(),
                    sg: att.security_group_id.clone(),
                })?;
            let vsw = att
                .vswitch_ids
                .iter()
                .find_map(|id| vpc.vswitches.iter().find(|v| &v.id == id))
                .ok_or_else(|| NetIsolationError::UnknownVSwitch(att.vswitch_ids.clone()))?;
            let addr = {
                let mut st = self.state.lock().expect("lock");
                let used = st.vpc_addrs.entry(vsw.id.clone()).or_default();
                let addr = vsw
                    .instance_pool
                    .hosts()
                    .find(|a| !used.contains(a) && *a != vsw.gateway)
                    .ok_or_else(|| NetIsolationError::VpcAddressesExhausted(vsw.id.clone()))?;
                used.insert(addr);
                addr
            };
            vpc_index = Some(idx);
            vswitch = Some(vsw.id.clone());
            vpc_rules = Some(VpcRules {
                gateway_iface: self.names.gateway(idx),
                vpc_cidr: vpc.cidr.to_string(),
                vpc_addr: addr,
                ingress: sg.ingress.clone(),
                egress: sg.egress.clone(),
            });
        }
        let record = Attached {
            rules: InstanceRules {
                iface: iface.name.clone(),
                instance_addr: iface.instance_addr,
                internet: matches!(egress, EgressMode::Internet | EgressMode::InternetAndVpc),
                vpc: vpc_rules,
            },
            vpc_index,
            vswitch: vswitch.clone(),
            ifb,
        };
        let rate = self.rate_mbit(class);
        let mut done = Progress::default();
        match self.attach_steps(&record, rate, &mut done).await {
            Ok(()) => {
                let vpc_address = vswitch.zip(record.rules.vpc.as_ref().map(|v| v.vpc_addr));
                self.state
                    .lock()
                    .expect("lock")
                    .attached
                    .insert(iface.name.clone(), record);
                tracing::info!(iface = %iface.name, ?egress, rate_mbit = rate, ?vpc_address, "instance network attached");
                Ok(InstanceNetwork {
                    iface: iface.name.clone(),
                    egress,
                    vpc_address,
                    bandwidth_mbit: rate,
                })
            }
            Err(e) => {
                tracing::warn!(iface = %iface.name, error = %kiln_core::error_chain(&e), "attach failed; undoing");
                if let Err(undo) = self.undo(&record, &done).await {
                    tracing::error!(iface = %iface.name, error = %undo, "cannot undo a half-made attachment");
                }
                Err(e)
            }
        }
    }

    async fn attach_steps(
        &self,
        rec: &Attached,
        rate: u32,
        done: &mut Progress,
    ) -> Result<(), NetIsolationError> {
        self.nft(&rules::add_instance(&self.names, &rec.rules))
            .await?;
        done.rules = true;
        if let (Some(idx), Some(v)) = (rec.vpc_index, &rec.rules.vpc) {
            let first = {
                let mut st = self.state.lock().expect("lock");
                let n = st.bridges.entry(idx).or_insert(0);
                *n += 1;
                *n == 1
            };
            done.bridge_ref = true;
            if first {
                self.create_bridge(idx).await?;
            }
            let addr = format!("{}/32", v.vpc_addr);
            self.cmd
                .run(
                    "ip",
                    &s(&["addr", "add", &addr, "dev", &v.gateway_iface]),
                    None,
                )
                .await?;
            done.vpc_addr = true;
        }
        done.shaping = true;
        self.shape(&rec.rules.iface, &rec.ifb, rate).await?;
        Ok(())
    }

    async fn create_bridge(&self, idx: usize) -> Result<(), NetIsolationError> {
        let (_, vpc) = (idx, &self.config.vpcs[idx]);
        let br = self.names.bridge(idx);
        let gw = self.names.gateway(idx);
        let port = self.names.ovs_port(idx);
        tracing::info!(bridge = %br, vpc = %vpc.id, "creating VPC bridge");
        self.cmd
            .run(
                "ovs-vsctl",
                &s(&[
                    "--may-exist",
                    "add-br",
                    &br,
                    "--",
                    "set",
                    "bridge",
                    &br,
                    "datapath_type=netdev",
                ]),
                None,
            )
            .await?;
        let mut args = s(&["link", "add", &gw, "type", "veth", "peer", "name", &port]);
        if let Some(ns) = &self.config.ovs_netns {
            args.extend(s(&["netns", ns]));
        }
        self.cmd.run("ip", &args, None).await?;
        self.cmd
            .run(
                "ovs-vsctl",
                &s(&["--may-exist", "add-port", &br, &port]),
                None,
            )
            .await?;
        for vsw in &vpc.vswitches {
            let a = format!("{}/{}", vsw.gateway, vsw.cidr.prefix_len);
            self.cmd
                .run("ip", &s(&["addr", "add", &a, "dev", &gw]), None)
                .await?;
        }
        // The userspace datapath reads the port with AF_PACKET and passes
        // checksums the sender left to offload on unfinished: have the
        // kernel finish them before the packet reaches the bridge.
        self.cmd
            .run("ethtool", &s(&["-K", &gw, "tx", "off"]), None)
            .await?;
        self.cmd
            .run("ip", &s(&["link", "set", &gw, "up"]), None)
            .await?;
        // Up in ovs-vswitchd's namespace, whichever that is.
        self.cmd
            .run("ovs-ofctl", &s(&["mod-port", &br, &port, "up"]), None)
            .await?;
        // The way to the VPC's hosts. They stay the operator's interfaces:
        // removing the bridge takes them off it, not away.
        for uplink in &vpc.ports {
            self.cmd
                .run(
                    "ovs-vsctl",
                    &s(&["--may-exist", "add-port", &br, uplink]),
                    None,
                )
                .await?;
        }
        Ok(())
    }

    async fn remove_bridge(&self, idx: usize) -> Result<(), NetIsolationError> {
        let br = self.names.bridge(idx);
        tracing::info!(bridge = %br, "removing VPC bridge");
        // Deleting the gateway takes its peer, the bridge's port, along.
        self.ignore_absent("ip", &["link", "delete", &self.names.gateway(idx)])
            .await?;
        self.ignore_absent("ovs-vsctl", &["--if-exists", "del-br", &br])
            .await?;
        Ok(())
    }

    async fn shape(&self, iface: &str, ifb: &str, rate_mbit: u32) -> Result<(), NetIsolationError> {
        let rate = format!("{rate_mbit}mbit");
        // 10 ms worth of tokens, at least 64 KiB (one GSO segment).
        let burst = (u64::from(rate_mbit) * 1_000_000 / 8 / 100)
            .max(65_536)
            .to_string();
        let tbf = |dev: &str| {
            format!("qdisc replace dev {dev} root tbf rate {rate} burst {burst} latency 50ms\n")
        };
        // Two processes, not six: these run on every cold start. Each batch
        // stops at its first failing line, and undo removes what was made.
        self.cmd
            .run(
                "ip",
                &s(&["-batch", "-"]),
                Some(&format!("link add {ifb} type ifb\nlink set {ifb} up\n")),
            )
            .await?;
        let script = [
            tbf(iface),
            tbf(ifb),
            format!("qdisc replace dev {iface} handle ffff: ingress\n"),
            format!(
                "filter replace dev {iface} parent ffff: protocol all prio 1 u32 match u32 0 0 \
                 action mirred egress redirect dev {ifb}\n"
            ),
        ]
        .concat();
        self.cmd
            .run("tc", &s(&["-batch", "-"]), Some(&script))
            .await?;
        Ok(())
    }

    async fn undo(&self, rec: &Attached, done: &Progress) -> Result<(), NetIsolationError> {
        let mut first: Option<NetIsolationError> = None;
        let mut note = |r: Result<(), NetIsolationError>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };
        if done.shaping {
            note(
                self.ignore_absent("tc", &["qdisc", "del", "dev", &rec.rules.iface, "ingress"])
                    .await
                    .map_err(Into::into),
            );
            note(
                self.ignore_absent("tc", &["qdisc", "del", "dev", &rec.rules.iface, "root"])
                    .await
                    .map_err(Into::into),
            );
            note(
                self.ignore_absent("ip", &["link", "delete", &rec.ifb])
                    .await
                    .map_err(Into::into),
            );
        }
        if let Some(v) = &rec.rules.vpc {
            if done.vpc_addr {
                let addr = format!("{}/32", v.vpc_addr);
                note(
                    self.ignore_absent("ip", &["addr", "del", &addr, "dev", &v.gateway_iface])
                        .await
                        .map_err(Into::into),
                );
            }
            if done.bridge_ref {
                let idx = rec.vpc_index.expect("vpc index with vpc rules");
                let last = {
                    let mut st = self.state.lock().expect("lock");
                    let n = st.bridges.entry(idx).or_insert(1);
                    *n -= 1;
                    let last = *n == 0;
                    if last {
                        st.bridges.remove(&idx);
                    }
                    last
                };
                if last {
                    note(self.remove_bridge(idx).await);
                }
            }
            if let Some(vsw) = &rec.vswitch {
                if let Some(used) = self.state.lock().expect("lock").vpc_addrs.get_mut(vsw) {
                    used.remove(&v.vpc_addr);
                }
            }
        }
        if done.rules {
            note(
                self.nft(&rules::delete_instance(&self.names, &rec.rules))
                    .await
                    .map_err(Into::into),
            );
        }
        match first {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// Remove the instance's rules, shaping, VPC address (and the VPC's
    /// bridge when it was the last instance on it). Succeeds for an
    /// interface that is not attached.
    pub async fn detach(&self, iface: &str) -> Result<(), NetIsolationError> {
        let rec = self.state.lock().expect("lock").attached.remove(iface);
        let Some(rec) = rec else { return Ok(()) };
        let _vpc_guard = match rec.vpc_index {
            Some(_) => Some(self.vpc_ops.lock().await),
            None => None,
        };
        let all = Progress {
            rules: true,
            bridge_ref: rec.vpc_index.is_some(),
            vpc_addr: rec.vpc_index.is_some(),
            shaping: true,
        };
        let result = self.undo(&rec, &all).await;
        match &result {
            Ok(()) => tracing::info!(iface, "instance network detached"),
            Err(e) => {
                tracing::warn!(iface, error = %kiln_core::error_chain(&e), "instance network not fully detached")
            }
        }
        result
    }

    /// Interfaces currently attached.
    pub fn attached(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .state
            .lock()
            .expect("lock")
            .attached
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Remove everything: every instance's rules, the table, the bridges.
    pub async fn shutdown(&self) -> Result<(), NetIsolationError> {
        for iface in self.attached() {
            if let Err(e) = self.detach(&iface).await {
                tracing::warn!(iface = %iface, error = %kiln_core::error_chain(&e), "detach at shutdown failed");
            }
        }
        self.remove_all().await
    }
}

#[derive(Debug, Default)]
struct Progress {
    rules: bool,
    bridge_ref: bool,
    vpc_addr: bool,
    shaping: bool,
}

#[cfg(test)]
mod tests;
