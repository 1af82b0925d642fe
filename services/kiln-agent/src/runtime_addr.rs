//! Where the agent reaches an instance's runtime: its endpoint, dialled
//! from inside the sandbox's network namespace when the driver has one
//! (a container: the call goes over the namespace's loopback, not through
//! the veth, the host's rules or the instance's bandwidth shaping; see
//! [`kiln_sandbox::net::dial`]). Calls, WebSocket upgrades and lifecycle
//! hooks all connect through it.

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::net::TcpStream;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeAddr {
    pub endpoint: SocketAddr,
    /// The sandbox's network namespace (`/run/netns/<name>`), when the
    /// driver has one (`SandboxDriver::dial_netns`).
    pub netns: Option<PathBuf>,
}

impl RuntimeAddr {
    /// A new connection to the runtime, with `TCP_NODELAY` set.
    pub async fn connect(&self) -> std::io::Result<TcpStream> {
        match &self.netns {
            Some(netns) => kiln_sandbox::net::dial::connect_in(netns, self.endpoint).await,
            None => {
                let tcp = TcpStream::connect(self.endpoint).await?;
                tcp.set_nodelay(true)?;
                Ok(tcp)
            }
        }
    }
}
