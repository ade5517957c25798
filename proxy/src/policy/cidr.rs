//! IP prefixes (`ipBlocks`, `cidrs`, `source.ip`, `destination.ip`): a few lines instead of a
//! dependency. IPv4 is kept as IPv4; v4-mapped IPv6 addresses are normalized to IPv4.

use std::net::IpAddr;

/// An address prefix; an address without `/len` is a full-length prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// Network bits (IPv4 in the low 32 bits).
    net: u128,
    /// Prefix length.
    len: u8,
    /// IPv4 prefix.
    v4: bool,
}

/// The numeric form of an address, IPv4 (and v4-mapped IPv6) as `(u32 as u128, true)`.
pub fn ip_key(ip: IpAddr) -> (u128, bool) {
    match ip {
        IpAddr::V4(a) => (u32::from(a) as u128, true),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => (u32::from(v4) as u128, true),
            None => (u128::from(a), false),
        },
    }
}

fn mask(len: u8, v4: bool) -> u128 {
    // The top `len` bits of a 128-bit word, shifted down to 32 bits for IPv4.
    let ones = !u128::MAX.checked_shr(u32::from(len)).unwrap_or(0);
    if v4 {
        ones >> 96
    } else {
        ones
    }
}

impl Cidr {
    /// Parses `a.b.c.d`, `a.b.c.d/n`, `v6` or `v6/n`. Host bits must be zero.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let (addr, len) = match raw.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (raw, None),
        };
        let ip: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{raw:?} is not an IP address or CIDR prefix"))?;
        let (net, v4) = ip_key(ip);
        let max = if v4 { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => match l.trim().parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("{raw:?}: prefix length must be 0-{max}")),
            },
        };
        let m = mask(len, v4);
        if net & !m != 0 {
            let canon = net & m;
            let shown = if v4 {
                IpAddr::from(std::net::Ipv4Addr::from(canon as u32))
            } else {
                IpAddr::from(std::net::Ipv6Addr::from(canon))
            };
            return Err(format!(
                "{raw:?} has host bits set (did you mean {shown}/{len}?)"
            ));
        }
        Ok(Self { net, len, v4 })
    }

    /// Whether `ip` is inside the prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (k, v4) = ip_key(ip);
        v4 == self.v4 && k & mask(self.len, v4) == self.net
    }
}
