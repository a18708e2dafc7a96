//! Conversions between socket addresses and the kernel's `bpf_sock_addr`
//! representation ([`Addr`]: network byte order, read as native words).

use legate_bpf_common::{Addr, FAMILY_V4, FAMILY_V6};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub fn to_kernel(a: SocketAddr) -> Addr {
    let (ip, family) = match a.ip() {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], FAMILY_V6)
        }
    };
    Addr {
        ip,
        port: u16::from_ne_bytes(a.port().to_be_bytes()),
        family,
        _pad: 0,
    }
}

pub fn from_kernel(a: &Addr) -> SocketAddr {
    let port = u16::from_be_bytes(a.port.to_ne_bytes());
    let ip = if a.family == FAMILY_V4 {
        IpAddr::V4(Ipv4Addr::from(a.ip[0].to_ne_bytes()))
    } else {
        let mut o = [0u8; 16];
        for (i, w) in a.ip.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(o))
    };
    SocketAddr::new(ip, port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_both_families() {
        for s in [
            "127.100.0.1:80",
            "10.0.0.7:65535",
            "[::1]:8080",
            "[fd00::5]:1",
        ] {
            let a: SocketAddr = s.parse().unwrap();
            assert_eq!(from_kernel(&to_kernel(a)), a);
        }
    }

    #[test]
    fn matches_the_kernels_byte_order() {
        // bpf_sock_addr.user_ip4 holds the address bytes in network order,
        // user_port holds htons(port).
        let k = to_kernel("127.0.0.1:80".parse().unwrap());
        assert_eq!(k.ip[0].to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(k.port.to_ne_bytes(), [0, 80]);
        assert_eq!(k.family, FAMILY_V4);
    }
}
