//! The PROXY protocol header (HAProxy's spec, v1 text and v2 binary), as a
//! pure parser over the bytes peeked so far: the runner reads exactly the
//! header's length once this says it is complete, so what follows is left
//! for the next filter and the chain.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest v1 line, CRLF included (the spec's 107 bytes).
const V1_MAX: usize = 107;
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
const V2_FIXED: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    /// How Envoy names it in stats (`versions.v1.found`).
    pub fn stat(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// A prefix of a header: peek again.
    NeedMore,
    /// The bytes are not a PROXY header.
    NotProxy,
    /// A malformed header of this version, or an address family Envoy
    /// refuses (AF_UNIX): close the connection.
    Error(Version),
    /// A whole header of `len` bytes. `addrs` is (source, destination), or
    /// None for v1 `UNKNOWN` and v2 `LOCAL`/`AF_UNSPEC`, where the
    /// connection keeps its own addresses.
    Header {
        version: Version,
        len: usize,
        addrs: Option<(SocketAddr, SocketAddr)>,
    },
}

/// Parses the start of a connection.
pub fn parse(b: &[u8]) -> Parse {
    if is_prefix(b, V1_PREFIX) {
        return if b.len() < V1_PREFIX.len() {
            Parse::NeedMore
        } else {
            v1(b)
        };
    }
    if is_prefix(b, V2_SIGNATURE) {
        return v2(b);
    }
    Parse::NotProxy
}

/// `b` starts with `p`, or is a (possibly empty) prefix of it.
fn is_prefix(b: &[u8], p: &[u8]) -> bool {
    let n = b.len().min(p.len());
    b[..n] == p[..n]
}

fn v1(b: &[u8]) -> Parse {
    let window = &b[..b.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if b.len() >= V1_MAX {
            Parse::Error(Version::V1)
        } else {
            Parse::NeedMore
        };
    };
    let len = end + 2;
    let Ok(line) = std::str::from_utf8(&b[V1_PREFIX.len()..end]) else {
        return Parse::Error(Version::V1);
    };
    let fields: Vec<&str> = line.split(' ').collect();
    let addrs = match fields.as_slice() {
        ["UNKNOWN", ..] => None,
        [proto @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let v4 = *proto == "TCP4";
            let ip = |s: &str| -> Option<IpAddr> {
                let ip: IpAddr = s.parse().ok()?;
                (ip.is_ipv4() == v4).then_some(ip)
            };
            // Decimal, no sign, no leading zeros beyond "0" itself.
            let port = |s: &str| -> Option<u16> {
                if s.is_empty() || (s.len() > 1 && s.starts_with('0')) {
                    return None;
                }
                if !s.bytes().all(|c| c.is_ascii_digit()) {
                    return None;
                }
                s.parse().ok()
            };
            match (ip(src), ip(dst), port(sport), port(dport)) {
                (Some(s), Some(d), Some(sp), Some(dp)) => {
                    Some((SocketAddr::new(s, sp), SocketAddr::new(d, dp)))
                }
                _ => return Parse::Error(Version::V1),
            }
        }
        _ => return Parse::Error(Version::V1),
    };
    Parse::Header {
        version: Version::V1,
        len,
        addrs,
    }
}

/// A v2 header's whole length, once its fixed part is in `b`.
pub fn v2_len(b: &[u8]) -> Option<usize> {
    (b.len() >= V2_FIXED && b.starts_with(V2_SIGNATURE))
        .then(|| V2_FIXED + u16::from_be_bytes([b[14], b[15]]) as usize)
}

fn v2(b: &[u8]) -> Parse {
    if b.len() < V2_FIXED {
        return Parse::NeedMore;
    }
    let (ver, cmd) = (b[12] >> 4, b[12] & 0x0f);
    if ver != 2 || cmd > 1 {
        return Parse::Error(Version::V2);
    }
    let len = v2_len(b).expect("fixed part present");
    if b.len() < len {
        return Parse::NeedMore;
    }
    let a = &b[V2_FIXED..len];
    let (family, transport) = (b[13] >> 4, b[13] & 0x0f);
    let header = |addrs| Parse::Header {
        version: Version::V2,
        len,
        addrs,
    };
    // LOCAL: a health check from the proxy itself; the addresses are the
    // connection's own, whatever the block says.
    if cmd == 0 || family == 0 {
        return header(None);
    }
    if transport != 1 && transport != 2 {
        return Parse::Error(Version::V2);
    }
    let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
    match family {
        1 if a.len() >= 12 => {
            let ip = |i: usize| IpAddr::V4(Ipv4Addr::new(a[i], a[i + 1], a[i + 2], a[i + 3]));
            header(Some((
                SocketAddr::new(ip(0), port(8)),
                SocketAddr::new(ip(4), port(10)),
            )))
        }
        2 if a.len() >= 36 => {
            let ip = |i: usize| {
                let o: [u8; 16] = a[i..i + 16].try_into().expect("16 bytes");
                IpAddr::V6(Ipv6Addr::from(o))
            };
            header(Some((
                SocketAddr::new(ip(0), port(32)),
                SocketAddr::new(ip(16), port(34)),
            )))
        }
        // AF_UNIX, unknown families, or an address block too short.
        _ => Parse::Error(Version::V2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let h = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET /";
        assert_eq!(
            parse(h),
            Parse::Header {
                version: Version::V1,
                len: 45,
                addrs: Some((sa("192.0.2.1:56324"), sa("198.51.100.2:443")))
            }
        );
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n";
        assert!(matches!(parse(h), Parse::Header { addrs: Some((s, d)), .. }
            if s == sa("[2001:db8::1]:1") && d == sa("[2001:db8::2]:65535")));
        assert!(matches!(
            parse(b"PROXY UNKNOWN\r\n"),
            Parse::Header {
                addrs: None,
                len: 15,
                ..
            }
        ));
        assert!(matches!(
            parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"),
            Parse::Header { addrs: None, .. }
        ));
    }

    #[test]
    fn v1_errors() {
        for bad in [
            &b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n"[..],
            b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n",
            b"PROXY TCP6 192.0.2.1 192.0.2.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 65536 2\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 01 2\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 +1 2\r\n",
            b"PROXY UDP4 192.0.2.1 192.0.2.2 1 2\r\n",
            b"PROXY TCP4  192.0.2.1 192.0.2.2 1 2\r\n",
        ] {
            assert_eq!(parse(bad), Parse::Error(Version::V1), "{:?}", bad);
        }
        // No CRLF within 107 bytes.
        let long = [b"PROXY ".as_slice(), &[b'A'; 120]].concat();
        assert_eq!(parse(&long), Parse::Error(Version::V1));
    }

    #[test]
    fn prefixes_wait_and_other_bytes_are_not_proxy() {
        assert_eq!(parse(b""), Parse::NeedMore);
        assert_eq!(parse(b"PRO"), Parse::NeedMore);
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4"), Parse::NeedMore);
        assert_eq!(parse(b"\r\n\r\n\0"), Parse::NeedMore);
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Parse::NotProxy);
        assert_eq!(parse(b"PRI * HTTP/2.0"), Parse::NotProxy);
        assert_eq!(parse(b"\x16\x03\x01"), Parse::NotProxy);
        assert_eq!(parse(b"\r\n\r\nX"), Parse::NotProxy);
    }

    fn v2_header(cmd: u8, fam: u8, addr: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | cmd);
        h.push(fam);
        h.extend_from_slice(&((addr.len() + tlvs.len()) as u16).to_be_bytes());
        h.extend_from_slice(addr);
        h.extend_from_slice(tlvs);
        h
    }

    #[test]
    fn v2_inet_inet6_local_and_tlvs() {
        let addr4 = [10, 0, 0, 1, 10, 0, 0, 2, 0x1f, 0x90, 0x01, 0xbb];
        let tlv = [0x04, 0x00, 0x02, b'h', b'i'];
        let h = v2_header(1, 0x11, &addr4, &tlv);
        let mut with_data = h.clone();
        with_data.extend_from_slice(b"payload");
        assert_eq!(
            parse(&with_data),
            Parse::Header {
                version: Version::V2,
                len: h.len(),
                addrs: Some((sa("10.0.0.1:8080"), sa("10.0.0.2:443")))
            }
        );
        // Every shorter prefix waits.
        for n in 0..h.len() {
            assert_eq!(parse(&h[..n]), Parse::NeedMore, "prefix of {n}");
        }
        let mut addr6 = [0u8; 36];
        addr6[15] = 1;
        addr6[31] = 2;
        addr6[32..34].copy_from_slice(&7u16.to_be_bytes());
        addr6[34..36].copy_from_slice(&9u16.to_be_bytes());
        assert!(matches!(parse(&v2_header(1, 0x21, &addr6, &[])),
            Parse::Header { addrs: Some((s, d)), .. } if s == sa("[::1]:7") && d == sa("[::2]:9")));
        // LOCAL ignores the block; AF_UNSPEC keeps the real addresses.
        assert!(matches!(
            parse(&v2_header(0, 0x11, &addr4, &[])),
            Parse::Header { addrs: None, .. }
        ));
        assert!(matches!(
            parse(&v2_header(1, 0x00, &[], &[])),
            Parse::Header { addrs: None, .. }
        ));
    }

    #[test]
    fn v2_errors() {
        let addr4 = [10, 0, 0, 1, 10, 0, 0, 2, 0, 1, 0, 2];
        // AF_UNIX, short address block, bad command, bad version.
        assert_eq!(
            parse(&v2_header(1, 0x31, &[0; 216], &[])),
            Parse::Error(Version::V2)
        );
        assert_eq!(
            parse(&v2_header(1, 0x11, &addr4[..8], &[])),
            Parse::Error(Version::V2)
        );
        assert_eq!(
            parse(&v2_header(2, 0x11, &addr4, &[])),
            Parse::Error(Version::V2)
        );
        let mut h = v2_header(1, 0x11, &addr4, &[]);
        h[12] = 0x11;
        assert_eq!(parse(&h), Parse::Error(Version::V2));
    }

    proptest! {
        #[test]
        fn never_panics_and_never_claims_more_than_it_saw(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Parse::Header { len, .. } = parse(&b) {
                prop_assert!(len <= b.len());
            }
        }

        #[test]
        fn v1_prefixed_noise_never_panics(s in "PROXY [ -~]{0,120}(\r\n)?") {
            if let Parse::Header { len, .. } = parse(s.as_bytes()) {
                prop_assert!(len <= s.len());
            }
        }
    }
}
