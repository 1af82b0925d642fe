//! Open vSwitch for the tests that attach VPCs to it.

use std::process::{Command, Stdio};

/// Where Debian's openvswitch-switch keeps the script that starts the
/// daemons.
const OVS_CTL: &str = "/usr/share/openvswitch/scripts/ovs-ctl";

fn answers(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Make sure ovsdb-server and ovs-vswitchd both run and answer, starting
/// whichever is missing (installing the package can leave ovsdb-server
/// running without ovs-vswitchd; `ovs-ctl start` starts only what is
/// missing), and return ovs-vswitchd's pid: its network namespace is where
/// bridge ports live. `scripts/test.sh` starts them once before the suite,
/// so that tests running in parallel never race to; this is for a test
/// run on its own. The daemons are the host's and stay running.
pub fn ensure_ovs() -> Result<u32, String> {
    let vsctl = ["ovs-vsctl", "--timeout=5", "show"];
    let vswitchd = ["ovs-appctl", "--timeout=5", "-t", "ovs-vswitchd", "version"];
    if !answers(&vsctl) || !answers(&vswitchd) {
        let out = Command::new(OVS_CTL)
            .args(["start", "--system-id=random"])
            .output()
            .map_err(|e| format!("cannot run {OVS_CTL} (install openvswitch-switch): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{OVS_CTL} start failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    if !answers(&vsctl) || !answers(&vswitchd) {
        return Err(
            "Open vSwitch does not answer after `ovs-ctl start` (see /var/log/openvswitch)".into(),
        );
    }
    let pid = std::fs::read_to_string("/run/openvswitch/ovs-vswitchd.pid")
        .map_err(|e| format!("cannot read ovs-vswitchd's pid file: {e}"))?;
    pid.trim()
        .parse()
        .map_err(|_| format!("ovs-vswitchd's pid file holds {pid:?}"))
}
