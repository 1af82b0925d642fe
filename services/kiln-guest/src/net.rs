//! Guest networking from the host's [`NetworkConfig`], with the classic
//! interface ioctls (there is no `ip` binary in the guest and these few
//! calls need no netlink library). The ioctls are the only unsafe code in
//! kiln-guest and live in [`sys`].

use std::net::Ipv4Addr;
use std::time::Duration;

use kiln_guest_proto::NetworkConfig;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("Interface name {0:?} is too long")]
    Name(String),
    #[error("{op} on {interface}")]
    Ioctl {
        op: &'static str,
        interface: String,
        #[source]
        source: nix::Error,
    },
    #[error("Opening a configuration socket")]
    Socket(#[source] nix::Error),
}

/// The network side effects.
pub trait NetOps {
    fn link_up(&self, interface: &str) -> Result<(), NetError>;
    fn set_address(
        &self,
        interface: &str,
        address: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), NetError>;
    fn set_mtu(&self, interface: &str, mtu: u32) -> Result<(), NetError>;
    fn add_default_route(&self, gateway: Ipv4Addr) -> Result<(), NetError>;
}

/// Loopback only; it is up whatever the host sends.
pub fn loopback(ops: &dyn NetOps) -> Result<(), NetError> {
    ops.link_up("lo")
}

/// Configure the instance's interface (the driver for it may still be
/// probing: ENODEV is retried for `wait`).
pub fn configure(ops: &dyn NetOps, net: &NetworkConfig, wait: Duration) -> Result<(), NetError> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match ops.link_up(&net.interface) {
            Err(NetError::Ioctl {
                source: nix::errno::Errno::ENODEV,
                ..
            }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            other => {
                other?;
                break;
            }
        }
    }
    if let Some(mtu) = net.mtu {
        ops.set_mtu(&net.interface, mtu)?;
    }
    ops.set_address(&net.interface, net.address, net.prefix_len)?;
    if let Some(gw) = net.gateway {
        ops.add_default_route(gw)?;
    }
    Ok(())
}

/// The ioctls.
pub struct IoctlNet;

impl NetOps for IoctlNet {
    fn link_up(&self, interface: &str) -> Result<(), NetError> {
        sys::link_up(interface)
    }
    fn set_address(
        &self,
        interface: &str,
        address: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), NetError> {
        sys::set_address(interface, address, prefix_len)
    }
    fn set_mtu(&self, interface: &str, mtu: u32) -> Result<(), NetError> {
        sys::set_mtu(interface, mtu)
    }
    fn add_default_route(&self, gateway: Ipv4Addr) -> Result<(), NetError> {
        sys::add_default_route(gateway)
    }
}

pub fn netmask(prefix_len: u8) -> Ipv4Addr {
    match prefix_len {
        0 => Ipv4Addr::UNSPECIFIED,
        p => Ipv4Addr::from(u32::MAX << (32 - u32::from(p.min(32)))),
    }
}

mod sys {
    use std::net::Ipv4Addr;
    use std::os::fd::{AsRawFd, OwnedFd};

    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

    use super::NetError;

    /// `struct ifreq` with the union member we use; 40 bytes like the C one.
    #[repr(C)]
    struct IfReq {
        name: [libc::c_char; libc::IFNAMSIZ],
        value: IfValue,
        // The C union is 24 bytes (struct ifmap); ours is 16.
        _pad: [u8; 8],
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    union IfValue {
        addr: libc::sockaddr_in,
        flags: libc::c_short,
        mtu: libc::c_int,
    }

    fn sock() -> Result<OwnedFd, NetError> {
        socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(NetError::Socket)
    }

    fn ifreq(interface: &str, value: IfValue) -> Result<IfReq, NetError> {
        let bytes = interface.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return Err(NetError::Name(interface.into()));
        }
        let mut name = [0 as libc::c_char; libc::IFNAMSIZ];
        for (d, s) in name.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        Ok(IfReq {
            name,
            value,
            _pad: [0; 8],
        })
    }

    fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr_in {
        libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(ip).to_be(),
            },
            sin_zero: [0; 8],
        }
    }

    fn ioctl(
        op: &'static str,
        interface: &str,
        request: libc::c_ulong,
        arg: *mut libc::c_void,
    ) -> Result<(), NetError> {
        let fd = sock()?;
        // SAFETY: `fd` is an open socket; `arg` points to a live, properly
        // initialised `struct ifreq`/`struct rtentry` owned by the caller for
        // the duration of the call, as the request expects.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg) };
        if rc < 0 {
            return Err(NetError::Ioctl {
                op,
                interface: interface.into(),
                source: nix::errno::Errno::last(),
            });
        }
        Ok(())
    }

    pub fn link_up(interface: &str) -> Result<(), NetError> {
        let mut req = ifreq(interface, IfValue { flags: 0 })?;
        ioctl(
            "SIOCGIFFLAGS",
            interface,
            libc::SIOCGIFFLAGS,
            (&mut req as *mut IfReq).cast(),
        )?;
        // SAFETY: SIOCGIFFLAGS filled the `flags` member of the union.
        let flags = unsafe { req.value.flags };
        req.value = IfValue {
            flags: flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short,
        };
        ioctl(
            "SIOCSIFFLAGS",
            interface,
            libc::SIOCSIFFLAGS,
            (&mut req as *mut IfReq).cast(),
        )
    }

    pub fn set_address(interface: &str, address: Ipv4Addr, prefix_len: u8) -> Result<(), NetError> {
        let mut req = ifreq(
            interface,
            IfValue {
                addr: sockaddr(address),
            },
        )?;
        ioctl(
            "SIOCSIFADDR",
            interface,
            libc::SIOCSIFADDR,
            (&mut req as *mut IfReq).cast(),
        )?;
        let mut req = ifreq(
            interface,
            IfValue {
                addr: sockaddr(super::netmask(prefix_len)),
            },
        )?;
        ioctl(
            "SIOCSIFNETMASK",
            interface,
            libc::SIOCSIFNETMASK,
            (&mut req as *mut IfReq).cast(),
        )
    }

    pub fn set_mtu(interface: &str, mtu: u32) -> Result<(), NetError> {
        let mut req = ifreq(
            interface,
            IfValue {
                mtu: mtu as libc::c_int,
            },
        )?;
        ioctl(
            "SIOCSIFMTU",
            interface,
            libc::SIOCSIFMTU,
            (&mut req as *mut IfReq).cast(),
        )
    }

    pub fn add_default_route(gateway: Ipv4Addr) -> Result<(), NetError> {
        let to_sockaddr = |ip| {
            let sin = sockaddr(ip);
            // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes)
            // and sockaddr_in is a valid bit pattern for sockaddr.
            unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
        };
        // SAFETY: rtentry is plain old data; all-zero is its "unset" value.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = to_sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = to_sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = to_sockaddr(gateway);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        ioctl(
            "SIOCADDRT",
            "default route",
            libc::SIOCADDRT,
            (&mut rt as *mut libc::rtentry).cast(),
        )
    }

    #[cfg(test)]
    #[test]
    fn ifreq_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert_eq!(
            std::mem::size_of::<libc::sockaddr_in>(),
            std::mem::size_of::<libc::sockaddr>()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<String>>,
        missing_for: Mutex<u32>,
    }

    impl NetOps for Recorder {
        fn link_up(&self, i: &str) -> Result<(), NetError> {
            let mut missing = self.missing_for.lock().unwrap();
            if *missing > 0 {
                *missing -= 1;
                return Err(NetError::Ioctl {
                    op: "SIOCGIFFLAGS",
                    interface: i.into(),
                    source: nix::errno::Errno::ENODEV,
                });
            }
            self.calls.lock().unwrap().push(format!("up {i}"));
            Ok(())
        }
        fn set_address(&self, i: &str, a: Ipv4Addr, p: u8) -> Result<(), NetError> {
            self.calls.lock().unwrap().push(format!("addr {i} {a}/{p}"));
            Ok(())
        }
        fn set_mtu(&self, i: &str, m: u32) -> Result<(), NetError> {
            self.calls.lock().unwrap().push(format!("mtu {i} {m}"));
            Ok(())
        }
        fn add_default_route(&self, g: Ipv4Addr) -> Result<(), NetError> {
            self.calls.lock().unwrap().push(format!("route {g}"));
            Ok(())
        }
    }

    fn cfg() -> NetworkConfig {
        NetworkConfig {
            interface: "eth0".into(),
            address: "10.0.2.15".parse().unwrap(),
            prefix_len: 24,
            gateway: Some("10.0.2.2".parse().unwrap()),
            mtu: Some(1400),
            dns: vec![],
        }
    }

    #[test]
    fn configures_in_order_and_waits_for_the_driver() {
        let r = Recorder::default();
        *r.missing_for.lock().unwrap() = 3;
        configure(&r, &cfg(), Duration::from_secs(2)).unwrap();
        assert_eq!(
            *r.calls.lock().unwrap(),
            [
                "up eth0",
                "mtu eth0 1400",
                "addr eth0 10.0.2.15/24",
                "route 10.0.2.2"
            ]
        );
    }

    #[test]
    fn missing_interface_fails_after_the_wait() {
        let r = Recorder::default();
        *r.missing_for.lock().unwrap() = u32::MAX;
        assert!(matches!(
            configure(&r, &cfg(), Duration::from_millis(50)),
            Err(NetError::Ioctl { .. })
        ));
    }

    #[test]
    fn netmasks() {
        assert_eq!(netmask(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(32), Ipv4Addr::new(255, 255, 255, 255));
        assert_eq!(netmask(17), Ipv4Addr::new(255, 255, 128, 0));
    }
}
