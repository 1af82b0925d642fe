//! HAProxy in front of the gateways of `kiln dev --postgres`: its
//! configuration (a pure function of the topology, so it is unit tested)
//! and where its binary is.
//!
//! TCP mode end to end: TLS passes through to the gateways untouched, so
//! custom domains and HTTP-trigger hosts still pick their certificate by
//! SNI on the gateway. Each gateway's unauthenticated `GET /healthz` is
//! probed over TLS, verified against the cluster CA; a gateway that
//! answers anything but 200 (draining, store unreachable) or does not
//! answer twice in a row leaves the rotation within about a second, and
//! a connection that cannot be made to a dead gateway before then is
//! retried on another (`option redispatch`). The gateways' internal (mTLS)
//! listeners, which agents fetch code and credentials from, sit behind a
//! second frontend that follows the public checks (`track`).

use std::fmt::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// How often each gateway is probed, and after how many failed probes it
/// leaves the rotation (`fall`; `rise` to come back).
pub const CHECK_INTERVAL_MS: u64 = 500;
pub const CHECK_FALL: u64 = 2;
pub const CHECK_RISE: u64 = 2;

/// How long a stopping gateway keeps serving while its `/healthz` says
/// `draining`: longer than HAProxy takes to notice (interval times fall),
/// so no new connection reaches a gateway that stops accepting.
pub const GATEWAY_DRAIN_MS: u64 = CHECK_INTERVAL_MS * (CHECK_FALL + 1);
const _: () = assert!(GATEWAY_DRAIN_MS > CHECK_INTERVAL_MS * CHECK_FALL);

/// One gateway as HAProxy sees it.
#[derive(Debug, Clone)]
pub struct Backend {
    pub name: String,
    pub public: SocketAddr,
    pub internal: SocketAddr,
}

/// What HAProxy listens on and sends to.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Clients' address (`kiln dev --listen`).
    pub public: SocketAddr,
    /// The agents' address for the gateways' internal API.
    pub internal: SocketAddr,
    pub gateways: Vec<Backend>,
    /// The cluster CA, which the gateways' certificates chain to.
    pub ca_file: PathBuf,
    /// Connections HAProxy holds at once (each takes two descriptors).
    pub maxconn: u64,
}

/// The most connections HAProxy can hold within this process's open-files
/// hard limit (which it inherits): two descriptors per connection and some
/// to spare, at most 10 000. HAProxy refuses to start when its `maxconn`
/// needs more descriptors than it may open.
pub fn maxconn_within(proc_limits: &str) -> u64 {
    let hard = proc_limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|h| {
            if h == "unlimited" {
                Some(u64::MAX)
            } else {
                h.parse().ok()
            }
        })
        .unwrap_or(1024);
    (hard.saturating_sub(200) / 2).clamp(100, 10_000)
}

/// The name every gateway's public certificate carries (kiln dev's PKI),
/// sent as SNI and verified in health checks.
const CHECK_NAME: &str = "localhost";

/// HAProxy's configuration file for `topology`.
pub fn config(t: &Topology) -> String {
    let mut out = format!(
        "# Written by `kiln dev --postgres` at each start; edits are lost.\n\
         global\n\
         \x20   log stdout format raw local0 info\n\
         \x20   maxconn {}\n\
         \n\
         defaults\n\
         \x20   mode tcp\n\
         \x20   log global\n\
         \x20   option tcplog\n\
         \x20   option dontlog-normal\n\
         \x20   timeout connect 3s\n\
         \x20   timeout client 1h\n\
         \x20   timeout server 1h\n\
         \x20   timeout check 2s\n\
         \x20   retries 2\n\
         \x20   option redispatch\n\
         \x20   # A draining gateway's sessions are left to finish (no\n\
         \x20   # shutdown-sessions); a lost machine's are found by keepalive.\n\
         \x20   option srvtcpka\n\
         \x20   srvtcpka-idle 10s\n\
         \x20   srvtcpka-intvl 5s\n\
         \x20   srvtcpka-cnt 3\n\
         \x20   default-server inter {CHECK_INTERVAL_MS}ms fall {CHECK_FALL} rise {CHECK_RISE}\n\
         \n\
         frontend kiln-public\n\
         \x20   bind {}\n\
         \x20   default_backend kiln-gateways\n\
         \n\
         backend kiln-gateways\n\
         \x20   balance leastconn\n\
         \x20   option httpchk\n\
         \x20   http-check send meth GET uri /healthz ver HTTP/1.1 hdr Host {CHECK_NAME}\n\
         \x20   http-check expect status 200\n",
        t.maxconn, t.public
    );
    for g in &t.gateways {
        let _ = writeln!(
            out,
            "    server {} {} check check-ssl check-sni {CHECK_NAME} verify required ca-file {} verifyhost {CHECK_NAME}",
            g.name,
            g.public,
            quoted(&t.ca_file)
        );
    }
    let _ = write!(
        out,
        "\nfrontend kiln-internal\n    bind {}\n    default_backend kiln-gateways-internal\n\n\
         backend kiln-gateways-internal\n    balance leastconn\n",
        t.internal
    );
    for g in &t.gateways {
        let _ = writeln!(
            out,
            "    server {} {} track kiln-gateways/{}",
            g.name, g.internal, g.name
        );
    }
    out
}

/// A path as one HAProxy word.
fn quoted(path: &Path) -> String {
    format!("\"{}\"", path.display().to_string().replace('"', "\\\""))
}

/// The `haproxy` binary: on PATH, or where Debian's package puts it.
pub fn find() -> anyhow::Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("haproxy"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "HAProxy is not installed; `kiln dev --postgres` puts it in front of the \
                 gateways: run `apt-get install haproxy` (scripts/install-deps.sh does)"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology() -> Topology {
        Topology {
            public: "127.0.0.1:8443".parse().unwrap(),
            internal: "127.0.0.1:7400".parse().unwrap(),
            gateways: (1..=3)
                .map(|i| Backend {
                    name: format!("gateway-{i}"),
                    public: format!("127.0.0.1:{}", 9000 + i).parse().unwrap(),
                    internal: format!("127.0.0.1:{}", 9100 + i).parse().unwrap(),
                })
                .collect(),
            ca_file: "/state dir/pki/ca.pem".into(),
            maxconn: 4000,
        }
    }

    #[test]
    fn maxconn_fits_the_open_files_limit() {
        let limits = |soft: &str, hard: &str| {
            format!(
                "Limit                     Soft Limit           Hard Limit           Units\n\
                 Max cpu time              unlimited            unlimited            seconds\n\
                 Max open files            {soft:<20} {hard:<20} files\n"
            )
        };
        assert_eq!(maxconn_within(&limits("1024", "20000")), 9_900);
        assert_eq!(maxconn_within(&limits("1024", "4096")), 1_948);
        assert_eq!(maxconn_within(&limits("1024", "1048576")), 10_000);
        assert_eq!(maxconn_within(&limits("unlimited", "unlimited")), 10_000);
        assert_eq!(maxconn_within(&limits("256", "256")), 100);
        assert_eq!(maxconn_within(""), 412);
    }

    #[test]
    fn every_gateway_is_health_checked_over_verified_tls_and_passed_through() {
        let c = config(&topology());
        assert!(c.contains("mode tcp"), "TLS passes through: {c}");
        assert!(!c.contains("mode http"));
        assert!(c.contains("bind 127.0.0.1:8443\n"));
        assert!(c.contains("maxconn 4000\n"));
        for i in 1..=3 {
            assert!(
                c.contains(&format!(
                    "server gateway-{i} 127.0.0.1:900{i} check check-ssl check-sni localhost \
                     verify required ca-file \"/state dir/pki/ca.pem\" verifyhost localhost\n"
                )),
                "{c}"
            );
            assert!(
                c.contains(&format!(
                    "server gateway-{i} 127.0.0.1:910{i} track kiln-gateways/gateway-{i}\n"
                )),
                "{c}"
            );
        }
        assert!(c.contains("http-check send meth GET uri /healthz"));
        assert!(c.contains("http-check expect status 200"));
        assert!(c.contains("option redispatch"));
        assert!(c.contains("balance leastconn"));
    }

    /// The configuration is one HAProxy accepts (`haproxy -c`), when
    /// HAProxy is installed (the cluster tests require it).
    #[test]
    fn haproxy_accepts_the_configuration() {
        let Ok(haproxy) = find() else {
            kiln_test_support::skip(
                kiln_test_support::Category::Tool,
                "`haproxy` is not installed (run scripts/install-deps.sh)",
            );
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let mut t = topology();
        let ca = dir.path().join("ca.pem");
        let pki = kiln_pki::DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
        std::fs::copy(pki.ca_cert(), &ca).unwrap();
        t.ca_file = ca;
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config(&t)).unwrap();
        let out = std::process::Command::new(haproxy)
            .arg("-c")
            .arg("-f")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
