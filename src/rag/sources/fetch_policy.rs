//! Which addresses server-side fetches may reach. A client names the
//! sitemap the server fetches, and the sitemap names the pages; without a
//! check, a tenant could make the server read its own loopback services,
//! the private network or a cloud metadata endpoint, and get the answers
//! back as ingested pages. Names are resolved here, every address is
//! checked, and the connection goes to the checked addresses only (ureq
//! asks this resolver again for every redirect hop).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};

/// What an operator allows beyond public addresses.
#[derive(Debug, Clone, Default)]
pub struct FetchPolicy {
    /// Any address, private ones included (`--allow-private-fetch`).
    pub allow_private: bool,
    /// Hosts fetched whatever their addresses (`--allow-fetch-host`), as
    /// written in URLs: a name or an IP literal (IPv6 without brackets).
    pub allowed_hosts: Vec<String>,
}

impl FetchPolicy {
    /// The addresses of `netloc` (`host:port`), all checked; an error names
    /// the first refused one.
    pub fn resolve(&self, netloc: &str) -> io::Result<Vec<SocketAddr>> {
        let addresses: Vec<SocketAddr> = netloc.to_socket_addrs()?.collect();
        let host = host_of(netloc);
        let trusted = self.allow_private
            || self
                .allowed_hosts
                .iter()
                .any(|allowed| allowed.eq_ignore_ascii_case(host));
        if !trusted && let Some(refused) = addresses.iter().find(|a| !is_public(a.ip())) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "refusing to fetch from {host}: {} is not a public address \
                     (--allow-fetch-host {host} or --allow-private-fetch allow it)",
                    refused.ip()
                ),
            ));
        }
        Ok(addresses)
    }
}

/// The host of `host:port` (brackets of an IPv6 literal removed).
fn host_of(netloc: &str) -> &str {
    let host = netloc.rsplit_once(':').map_or(netloc, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Whether `ip` is a public unicast address: not loopback, private,
/// link-local (cloud metadata lives at 169.254.169.254), shared (CGNAT,
/// where some clouds put theirs), multicast, broadcast, unspecified,
/// documentation or reserved.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || a == 0
        // Shared address space (RFC 6598): carrier NAT, and metadata
        // endpoints of some clouds (100.100.100.200).
        || (a == 100 && (64..128).contains(&b))
        // IETF protocol assignments (192.0.0.0/24) and benchmarking (198.18.0.0/15).
        || (a == 192 && b == 0 && c == 0)
        || (a == 198 && (b == 18 || b == 19))
        // Reserved (240.0.0.0/4).
        || a >= 240)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        // Unique local (fc00::/7; AWS metadata is fd00:ec2::254).
        || (first & 0xfe00) == 0xfc00
        // Link-local (fe80::/10).
        || (first & 0xffc0) == 0xfe80
        // Documentation (2001:db8::/32).
        || (first == 0x2001 && ip.segments()[1] == 0xdb8)
        // IPv4-compatible and other addresses under ::/96 , and NAT64's
        // well-known prefix, which would reach IPv4 addresses unchecked.
        || ip.segments()[..6].iter().all(|&s| s == 0)
        || (first == 0x64 && ip.segments()[1] == 0xff9b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_pass() {
        for refused in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.100.100.200",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "198.18.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2001:db8::1",
        ] {
            assert!(!is_public(refused.parse().unwrap()), "{refused}");
        }
        for allowed in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(allowed.parse().unwrap()), "{allowed}");
        }
    }

    #[test]
    fn the_policy_refuses_private_hosts_unless_the_operator_allows_them() {
        let default = FetchPolicy::default();
        let error = default.resolve("127.0.0.1:8080").unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::PermissionDenied);
        assert!(
            error.to_string().contains("--allow-fetch-host 127.0.0.1"),
            "{error}"
        );
        assert!(default.resolve("[::1]:80").is_err());
        assert!(default.resolve("localhost:80").is_err());
        let host = FetchPolicy {
            allowed_hosts: vec!["127.0.0.1".into(), "::1".into()],
            ..FetchPolicy::default()
        };
        assert_eq!(host.resolve("127.0.0.1:8080").unwrap().len(), 1);
        assert!(host.resolve("[::1]:80").is_ok());
        assert!(host.resolve("localhost:80").is_err());
        let private = FetchPolicy {
            allow_private: true,
            ..FetchPolicy::default()
        };
        assert!(private.resolve("localhost:80").is_ok());
    }
}
