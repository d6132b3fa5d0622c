//! Which network an IP address is on, for the policy's address rule: a download must not
//! become a way to reach the node's own services, the cloud's metadata endpoint
//! (169.254.169.254) or the private network behind the node. Pure.
//!
//! IPv6 forms that carry an IPv4 address (mapped `::ffff:a.b.c.d`, compatible `::a.b.c.d`,
//! NAT64 `64:ff9b::a.b.c.d`, 6to4 `2002:AABB:CCDD::`) are classified by that address, so
//! `::ffff:127.0.0.1` is loopback.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The kinds of network an address can be on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AddressClass {
    /// Routable on the internet.
    Public,
    /// 127.0.0.0/8, ::1: this node.
    Loopback,
    /// 10/8, 172.16/12, 192.168/16, 100.64/10 (carrier-grade NAT), 198.18/15
    /// (benchmarking), 64:ff9b:1::/48 (local NAT64).
    Private,
    /// 169.254/16 (the metadata endpoint of most clouds), fe80::/10.
    LinkLocal,
    /// fc00::/7, and the deprecated site-local fec0::/10.
    UniqueLocal,
    /// 0.0.0.0/8, `::`: connecting there reaches this node. Never allowed.
    Unspecified,
    /// Multicast, broadcast, reserved, documentation and Teredo ranges. Never allowed.
    Other,
}

impl AddressClass {
    /// The classes a policy file may allow, by the names it uses.
    pub const ALLOWABLE: [AddressClass; 4] =
        [AddressClass::Loopback, AddressClass::Private, AddressClass::LinkLocal, AddressClass::UniqueLocal];

    /// The class's name in policy files and refusals.
    pub fn name(self) -> &'static str {
        match self {
            AddressClass::Public => "public",
            AddressClass::Loopback => "loopback",
            AddressClass::Private => "private",
            AddressClass::LinkLocal => "link_local",
            AddressClass::UniqueLocal => "unique_local",
            AddressClass::Unspecified => "unspecified",
            AddressClass::Other => "reserved",
        }
    }

    /// The allowable class named `s`.
    pub fn parse(s: &str) -> Option<AddressClass> {
        AddressClass::ALLOWABLE.into_iter().find(|c| c.name() == s.replace('-', "_"))
    }
}

/// The class of `ip`.
pub fn classify(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    let [a, b, c, _] = ip.octets();
    match (a, b, c) {
        (0, _, _) => AddressClass::Unspecified,
        (127, _, _) => AddressClass::Loopback,
        (10, _, _) | (192, 168, _) => AddressClass::Private,
        (172, b, _) if (16..32).contains(&b) => AddressClass::Private,
        (100, b, _) if (64..128).contains(&b) => AddressClass::Private,
        (198, 18 | 19, _) => AddressClass::Private,
        (169, 254, _) => AddressClass::LinkLocal,
        // IETF protocol assignments, documentation.
        (192, 0, 0 | 2) | (198, 51, 100) | (203, 0, 113) => AddressClass::Other,
        // Multicast, reserved, broadcast.
        (224..=255, _, _) => AddressClass::Other,
        _ => AddressClass::Public,
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    let s = ip.segments();
    if ip.is_unspecified() {
        return AddressClass::Unspecified;
    }
    if ip.is_loopback() {
        return AddressClass::Loopback;
    }
    let low_v4 = || Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        // ::ffff:a.b.c.d (mapped) and ::a.b.c.d (compatible, deprecated).
        [0, 0, 0, 0, 0, 0xffff, _, _] | [0, 0, 0, 0, 0, 0, _, _] => classify_v4(low_v4()),
        // NAT64, well-known prefix: reaches the IPv4 address it embeds.
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => classify_v4(low_v4()),
        [0x64, 0xff9b, 1, ..] => AddressClass::Private,
        // 6to4: the IPv4 address is in segments 1 and 2.
        [0x2002, hi, lo, ..] => classify_v4(Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8)),
        // Teredo (its client address is obfuscated) and documentation.
        [0x2001, 0, ..] | [0x2001, 0xdb8, ..] => AddressClass::Other,
        // Discard-only.
        [0x100, 0, 0, 0, ..] => AddressClass::Other,
        [a, ..] if a & 0xffc0 == 0xfe80 => AddressClass::LinkLocal,
        [a, ..] if a & 0xffc0 == 0xfec0 => AddressClass::UniqueLocal,
        [a, ..] if a & 0xfe00 == 0xfc00 => AddressClass::UniqueLocal,
        [a, ..] if a & 0xff00 == 0xff00 => AddressClass::Other,
        _ => AddressClass::Public,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AddressClass::*;

    #[test]
    fn addresses_are_classified() {
        for (ip, class) in [
            ("8.8.8.8", Public),
            ("1.1.1.1", Public),
            ("172.32.0.1", Public),
            ("100.128.0.1", Public),
            ("127.0.0.1", Loopback),
            ("127.255.255.254", Loopback),
            ("10.1.2.3", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("192.168.1.1", Private),
            ("100.64.0.1", Private),
            ("198.18.0.1", Private),
            ("169.254.169.254", LinkLocal),
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Unspecified),
            ("224.0.0.1", Other),
            ("255.255.255.255", Other),
            ("240.0.0.1", Other),
            ("192.0.2.1", Other),
            ("2606:4700::1111", Public),
            ("::1", Loopback),
            ("::", Unspecified),
            ("::ffff:127.0.0.1", Loopback),
            ("::ffff:10.0.0.1", Private),
            ("::ffff:169.254.169.254", LinkLocal),
            ("::ffff:8.8.8.8", Public),
            ("::127.0.0.1", Loopback),
            ("64:ff9b::a9fe:a9fe", LinkLocal),
            ("64:ff9b::808:808", Public),
            ("64:ff9b:1::1", Private),
            ("2002:7f00:1::1", Loopback),
            ("2002:0808:0808::1", Public),
            ("fe80::1", LinkLocal),
            ("febf::1", LinkLocal),
            ("fec0::1", UniqueLocal),
            ("fc00::1", UniqueLocal),
            ("fd12:3456::1", UniqueLocal),
            ("ff02::1", Other),
            ("2001:db8::1", Other),
            ("2001:0::1", Other),
            ("100::1", Other),
        ] {
            assert_eq!(classify(ip.parse().unwrap()), class, "{ip}");
        }
    }

    #[test]
    fn class_names_round_trip() {
        for c in AddressClass::ALLOWABLE {
            assert_eq!(AddressClass::parse(c.name()), Some(c));
        }
        assert_eq!(AddressClass::parse("link-local"), Some(LinkLocal));
        assert_eq!(AddressClass::parse("public"), None);
        assert_eq!(AddressClass::parse("unspecified"), None);
    }
}
