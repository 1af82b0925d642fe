//! What the network tests share: running commands, entering the network
//! namespaces they create, and a UDP echo server inside one.

#![allow(dead_code)] // each test file uses its own part

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_test_support::Category;
use nix::sched::{setns, CloneFlags};

/// Why the test cannot run here: not root, or one of `tools` missing.
pub fn missing_prerequisite(tools: &[&str]) -> Option<(Category, String)> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some((Category::Root, "needs root".into()));
    }
    for tool in tools {
        let ok = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Some((
                Category::Tool,
                format!("{tool} is not installed (scripts/install-deps.sh installs it)"),
            ));
        }
    }
    None
}

/// Run `args`; its standard output, or what it said on failure.
pub fn sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

pub fn must(args: &[&str]) -> String {
    sh(args).unwrap_or_else(|e| panic!("{e}"))
}

/// Move this thread into netns `ns`.
pub fn enter(ns: &str) {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    setns(f, CloneFlags::CLONE_NEWNET).unwrap();
}

/// Run `f` on a thread inside netns `ns`: every process it spawns (ip,
/// nft, tc) is in that namespace too.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        enter(&ns);
        f()
    })
    .join()
    .unwrap()
}

/// A UDP echo server in a namespace, recording what it received; bound
/// to `[::]` it takes IPv4 too (as mapped addresses).
pub struct Echo {
    seen: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl Echo {
    pub fn start(ns: &str, bind: IpAddr, port: u16) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, st2, ns) = (seen.clone(), stop.clone(), ns.to_owned());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            enter(&ns);
            let sock = UdpSocket::bind((bind, port)).unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            tx.send(()).unwrap();
            let mut buf = [0u8; 512];
            while !st2.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    s2.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        rx.recv().unwrap();
        Self { seen, stop }
    }

    pub fn saw(&self, token: &str) -> bool {
        self.seen.lock().unwrap().iter().any(|t| t == token)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// From netns `ns` (bound to `src` when given) send `token` to `to`:
/// whether the echo came back.
pub fn probe(ns: &str, src: Option<IpAddr>, to: SocketAddr, token: &str) -> bool {
    let token = token.to_owned();
    in_ns(ns, move || {
        let any: IpAddr = if to.is_ipv4() {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            Ipv6Addr::UNSPECIFIED.into()
        };
        let sock = UdpSocket::bind((src.unwrap_or(any), 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(400)))
            .unwrap();
        let _ = sock.send_to(token.as_bytes(), to);
        let mut buf = [0u8; 512];
        matches!(sock.recv_from(&mut buf), Ok((n, _)) if buf[..n] == *token.as_bytes())
    })
}
