//! Settings from the kernel command line (the host sets them when it boots
//! the VM; everything else arrives over the channel).

use kiln_guest_proto::vsock::GUEST_VSOCK_PORT;

/// Where the host reaches kiln-guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Channel {
    /// Listen on this AF_VSOCK port (production: cloud-hypervisor).
    Vsock(u32),
    /// The virtio-serial port with this name (tests under qemu).
    Serial(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootArgs {
    pub channel: Channel,
    /// `kiln.debug`: verbose logs on the console.
    pub debug: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BootArgsError {
    #[error("Bad kiln.channel {0:?} (want vsock:PORT or serial:NAME)")]
    Channel(String),
}

impl BootArgs {
    pub fn parse(cmdline: &str) -> Result<BootArgs, BootArgsError> {
        let mut args = BootArgs {
            channel: Channel::Vsock(GUEST_VSOCK_PORT),
            debug: false,
        };
        for word in cmdline.split_whitespace() {
            if let Some(value) = word.strip_prefix("kiln.channel=") {
                args.channel = match value.split_once(':') {
                    Some(("vsock", port)) => Channel::Vsock(
                        port.parse()
                            .map_err(|_| BootArgsError::Channel(value.into()))?,
                    ),
                    Some(("serial", name))
                        if !name.is_empty()
                            && name
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c)) =>
                    {
                        Channel::Serial(name.into())
                    }
                    _ => return Err(BootArgsError::Channel(value.into())),
                };
            } else if word == "kiln.debug" {
                args.debug = true;
            }
        }
        Ok(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_to_vsock() {
        let a = BootArgs::parse("console=ttyS0 quiet").unwrap();
        assert_eq!(a.channel, Channel::Vsock(GUEST_VSOCK_PORT));
        assert!(!a.debug);
    }

    #[test]
    fn parses_channels() {
        let a = BootArgs::parse("kiln.channel=serial:kiln.0 kiln.debug").unwrap();
        assert_eq!(a.channel, Channel::Serial("kiln.0".into()));
        assert!(a.debug);
        assert_eq!(
            BootArgs::parse("kiln.channel=vsock:5000").unwrap().channel,
            Channel::Vsock(5000)
        );
        for bad in [
            "kiln.channel=vsock:x",
            "kiln.channel=tcp:1",
            "kiln.channel=serial:../x",
            "kiln.channel=serial:",
        ] {
            assert!(BootArgs::parse(bad).is_err(), "{bad}");
        }
    }
}
