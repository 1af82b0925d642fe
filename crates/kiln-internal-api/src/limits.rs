//! The bounds every listener runs under ([`ListenerLimits`], one per
//! listener in each service's config) and the bookkeeping behind them:
//! connections per peer address, requests in flight per connection, and
//! rate-limited warnings when a cap turns connections away.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Timeouts and caps of one listener. Every field has a default; a config
/// names only what it changes (`[public.limits]`, say). What happens at
/// each bound:
///
/// - `tls_handshake_timeout_ms`: a connection that has not finished its
///   TLS handshake by then is closed (a client that connects and sends
///   nothing holds a slot this long at most).
/// - `header_read_timeout_ms`: HTTP/1.1: a request's headers must have
///   arrived this long after the connection started waiting for them
///   (including the keep-alive wait between requests), or the connection
///   is closed: the slowloris bound.
/// - `body_read_timeout_ms`: a handler that reads a request's body gets
///   it in whole by then, or answers InvalidArgument and the connection
///   closes.
/// - `idle_timeout_ms`: a connection with no request in flight for this
///   long is closed gracefully (HTTP/2: GOAWAY).
/// - `http2_keepalive_interval_ms` / `http2_keepalive_timeout_ms`: HTTP/2
///   PINGs on a connection this often; one unanswered within the timeout
///   closes it (a dead peer does not hold its streams). 0 disables.
/// - `max_connections`: connections open at once on the listener; more
///   are closed as soon as they are accepted.
/// - `max_connections_per_ip`: the same per peer address (IPv6: per /64),
///   so one client cannot take the listener's every slot.
/// - `max_header_bytes`: the most a request's headers may take (HTTP/1.1
///   read buffer, HTTP/2 header list).
/// - `drain_timeout_ms`: on shutdown (SIGTERM), how long requests in
///   flight get to finish before their connections are closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerLimits {
    pub tls_handshake_timeout_ms: u64,
    pub header_read_timeout_ms: u64,
    pub body_read_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub http2_keepalive_interval_ms: u64,
    pub http2_keepalive_timeout_ms: u64,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub max_header_bytes: usize,
    pub drain_timeout_ms: u64,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            tls_handshake_timeout_ms: 10_000,
            header_read_timeout_ms: 60_000,
            body_read_timeout_ms: 120_000,
            idle_timeout_ms: 120_000,
            http2_keepalive_interval_ms: 30_000,
            http2_keepalive_timeout_ms: 20_000,
            max_connections: 10_000,
            max_connections_per_ip: 1_000,
            max_header_bytes: 64 * 1024,
            drain_timeout_ms: 30_000,
        }
    }
}

impl ListenerLimits {
    /// Refuses values that would disable a bound by accident (zeros where
    /// zero is not "off", a per-address cap above the listener's).
    pub fn validate(&self, listener: &str) -> Result<(), String> {
        for (name, v) in [
            ("tls_handshake_timeout_ms", self.tls_handshake_timeout_ms),
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("body_read_timeout_ms", self.body_read_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("drain_timeout_ms", self.drain_timeout_ms),
            ("max_connections", self.max_connections as u64),
            ("max_connections_per_ip", self.max_connections_per_ip as u64),
        ] {
            if v == 0 {
                return Err(format!("{listener}.limits.{name} must be above 0"));
            }
        }
        if self.max_connections_per_ip > self.max_connections {
            return Err(format!(
                "{listener}.limits.max_connections_per_ip ({}) exceeds max_connections ({})",
                self.max_connections_per_ip, self.max_connections
            ));
        }
        if self.max_header_bytes < 8192 {
            return Err(format!(
                "{listener}.limits.max_header_bytes must be at least 8192"
            ));
        }
        if self.http2_keepalive_interval_ms > 0 && self.http2_keepalive_timeout_ms == 0 {
            return Err(format!(
                "{listener}.limits.http2_keepalive_timeout_ms must be above 0 when pings are on"
            ));
        }
        Ok(())
    }

    pub fn tls_handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.tls_handshake_timeout_ms)
    }
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }
    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_millis(self.body_read_timeout_ms)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
    pub fn http2_keepalive_interval(&self) -> Option<Duration> {
        (self.http2_keepalive_interval_ms > 0)
            .then(|| Duration::from_millis(self.http2_keepalive_interval_ms))
    }
    pub fn http2_keepalive_timeout(&self) -> Duration {
        Duration::from_millis(self.http2_keepalive_timeout_ms.max(1))
    }
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}

/// The address a per-peer cap counts: the IPv4 address, or the /64 of an
/// IPv6 one (a host usually owns a whole /64).
fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Open connections per peer address, capped.
#[derive(Debug)]
pub struct PerPeer {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place in [`PerPeer`], given back when dropped.
#[derive(Debug)]
pub struct PeerSlot {
    of: Arc<PerPeer>,
    key: IpAddr,
}

impl PerPeer {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for one more connection from `ip`, or `None` at the cap.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<PeerSlot> {
        let key = peer_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            of: self.clone(),
            key,
        })
    }

    /// Connections open from `ip`.
    pub fn open(&self, ip: IpAddr) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(&peer_key(ip)).copied().unwrap_or(0)
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.of.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// Requests in flight on one connection, and since when it has had none.
#[derive(Debug)]
pub struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `started` of the last request start or end.
    last_ms: AtomicU64,
}

/// One request in flight; ends when dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Activity {
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        InFlight(self.clone())
    }

    /// How long the connection has had no request in flight (zero while
    /// one is).
    pub fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Connections turned away by a cap: one warning per listener every 10 s
/// at most (a flood must not become a log flood), with the count since.
#[derive(Debug, Default)]
pub struct Refusals {
    since_warned: AtomicUsize,
    last_warn: Mutex<Option<Instant>>,
}

impl Refusals {
    pub fn note(&self, local: SocketAddr, peer: SocketAddr, cap: &str, limit: usize) {
        let n = self.since_warned.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last_warn.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            *last = Some(Instant::now());
            self.since_warned.store(0, Ordering::Relaxed);
            tracing::warn!(%local, %peer, refused = n, limit, "connections refused at {cap}; raise it in the listener's limits if this is legitimate load");
        } else {
            tracing::debug!(%local, %peer, "connection refused at {cap}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_peer_caps_and_gives_back() {
        let p = Arc::new(PerPeer::new(2));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = p.acquire(a).unwrap();
        let _s2 = p.acquire(a).unwrap();
        assert!(p.acquire(a).is_none());
        assert!(p.acquire(b).is_some());
        drop(s1);
        assert_eq!(p.open(a), 1);
        assert!(p.acquire(a).is_some());
    }

    #[test]
    fn ipv6_peers_count_per_64() {
        let p = Arc::new(PerPeer::new(1));
        let _s = p.acquire("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert!(p.acquire("2001:db8:1:2::ffff".parse().unwrap()).is_none());
        assert!(p.acquire("2001:db8:1:3::1".parse().unwrap()).is_some());
        let _m = p.acquire("::ffff:10.0.0.9".parse().unwrap()).unwrap();
        assert!(p.acquire("10.0.0.9".parse().unwrap()).is_none());
    }

    #[test]
    fn activity_is_idle_only_without_requests() {
        let a = Arc::new(Activity::new());
        let r = a.begin();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(a.idle_for(), Duration::ZERO);
        drop(r);
        std::thread::sleep(Duration::from_millis(20));
        assert!(a.idle_for() >= Duration::from_millis(15));
    }

    #[test]
    fn limits_validate() {
        ListenerLimits::default().validate("public").unwrap();
        let l = ListenerLimits {
            max_connections_per_ip: 20_000,
            ..Default::default()
        };
        assert!(l
            .validate("public")
            .unwrap_err()
            .contains("max_connections_per_ip"));
        let l = ListenerLimits {
            header_read_timeout_ms: 0,
            ..Default::default()
        };
        assert_eq!(
            l.validate("scheduler").unwrap_err(),
            "scheduler.limits.header_read_timeout_ms must be above 0"
        );
        let l: ListenerLimits = toml_like();
        assert_eq!(l.idle_timeout_ms, 5_000);
        assert_eq!(l.max_connections, ListenerLimits::default().max_connections);
    }

    fn toml_like() -> ListenerLimits {
        serde_json::from_str(r#"{"idle_timeout_ms": 5000}"#).unwrap()
    }
}
