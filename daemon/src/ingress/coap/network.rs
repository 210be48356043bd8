//! Address ranges (`192.168.0.0/16`, `::1/128`) for `coap.plain_networks`.
//!
//! Plain CoAP has no authentication, so the only thing standing between the endpoint and the
//! world is this list: a datagram whose source is not inside one of these ranges is refused with
//! 4.01 before anything else is looked at.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// One CIDR range. The address is stored with its host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

/// Why a CIDR string was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not a CIDR range such as 192.168.1.0/24 or fd00::/8: {reason}")]
pub struct NetworkError {
    pub text: String,
    pub reason: &'static str,
}

impl Network {
    /// True if `ip` is inside this range. IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`, what a
    /// dual-stack socket reports for IPv4 peers) are compared as the IPv4 address they carry.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask_v4(u32::from(ip), self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask_v6(u128::from(ip), self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

fn mask_v4(bits: u32, prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => bits & (u32::MAX << (32 - u32::from(p))),
    }
}

fn mask_v6(bits: u128, prefix: u8) -> u128 {
    match prefix {
        0 => 0,
        p => bits & (u128::MAX << (128 - u32::from(p))),
    }
}

impl FromStr for Network {
    type Err = NetworkError;

    /// Accepts `addr/prefix`, or a bare address meaning a single host.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = |reason| NetworkError {
            text: text.to_owned(),
            reason,
        };
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| error("not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| {
                    error("the prefix length is not a number within the address size")
                })?,
        };
        // Host bits below the prefix are cleared (`10.0.0.1/8` is `10.0.0.0/8`), as the config
        // validation accepts them.
        let addr = match addr {
            IpAddr::V4(v4) => IpAddr::V4(mask_v4(u32::from(v4), prefix).into()),
            IpAddr::V6(v6) => IpAddr::V6(mask_v6(u128::from(v6), prefix).into()),
        };
        Ok(Network { addr, prefix })
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Parses every entry; the first bad one is the error.
pub fn parse_all<S: AsRef<str>>(texts: &[S]) -> Result<Vec<Network>, NetworkError> {
    texts.iter().map(|t| t.as_ref().parse()).collect()
}

/// True if any range contains `ip`.
pub fn allowed(networks: &[Network], ip: IpAddr) -> bool {
    networks.iter().any(|n| n.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Network {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v4_ranges() {
        let n = net("192.168.4.0/22");
        assert!(n.contains(ip("192.168.4.1")));
        assert!(n.contains(ip("192.168.7.255")));
        assert!(!n.contains(ip("192.168.8.0")));
        assert!(!n.contains(ip("::1")));
        assert!(net("0.0.0.0/0").contains(ip("8.8.8.8")));
        assert!(net("10.1.2.3").contains(ip("10.1.2.3")));
        assert!(!net("10.1.2.3").contains(ip("10.1.2.4")));
    }

    #[test]
    fn v6_ranges_and_mapped_v4() {
        assert!(net("::1/128").contains(ip("::1")));
        assert!(net("fd00::/8").contains(ip("fd12:3456::1")));
        assert!(!net("fd00::/8").contains(ip("fe80::1")));
        assert!(net("127.0.0.0/8").contains(ip("::ffff:127.0.0.1")));
        assert!(net("::/0").contains(ip("2001:db8::1")));
    }

    #[test]
    fn refuses_bad_text() {
        for bad in ["", "10.0.0.0/33", "nonsense/8", "::1/129", "10.0.0.0/x"] {
            assert!(bad.parse::<Network>().is_err(), "{bad}");
        }
        let e = "10.0.0.0/33".parse::<Network>().unwrap_err();
        assert!(e.to_string().contains("10.0.0.0/33"), "{e}");
        assert_eq!(net("10.9.8.7/8"), net("10.0.0.0/8"));
    }

    #[test]
    fn display_round_trips() {
        assert_eq!(net("127.0.0.0/8").to_string(), "127.0.0.0/8");
        assert_eq!(net("::1").to_string(), "::1/128");
    }
}
