//! The instances' network, the same for a container's veth and a
//! microVM's tap. Its parts, each using only those listed before it:
//!
//! - [`config`]: the `[sandbox.network]` section (VPCs, vSwitches,
//!   security groups, bandwidth).
//! - [`exec`]: every host tool (`ip`, `nft`, `tc`, `ovs-vsctl`, `sysctl`)
//!   run through [`HostCommands`], with a recording fake.
//! - [`names`]: the names of what the agent creates, all carrying its prefix.
//! - [`subnet`]: the instance subnet and the /30 [`NetSlot`] of each instance.
//! - [`rules`]: the nftables rules, from pure functions.
//! - [`netns`]: a container's network namespace and veth pair ([`NetworkOps`]).
//! - [`pool`]: namespaces made ahead of time ([`NetPool`]).
//! - [`dial`]: connecting to a container's runtime from inside its
//!   namespace, over its loopback.
//! - [`isolation`]: [`NetIsolation`], attaching an instance's host
//!   interface to its egress mode, VPC and bandwidth.

pub mod config;
pub mod dial;
pub mod exec;
pub mod isolation;
pub mod names;
pub mod netns;
pub mod pool;
pub mod rules;
pub mod subnet;

pub use config::{
    Ipv4Net, NetworkConfig, NetworkConfigError, SecurityGroupDef, SgProtocol, SgRule, VSwitchDef,
    VpcDef,
};
pub use exec::{
    HostCommandError, HostCommands, RecordedCommand, RecordingCommands, SystemCommands,
};
pub use isolation::{
    BandwidthClass, EgressMode, HostInterface, InstanceNetwork, NetIsolation, NetIsolationError,
};
pub use netns::{IpCommand, NetworkError, NetworkOps};
pub use pool::NetPool;
pub use subnet::{Ipv4Cidr, NetSlot};
