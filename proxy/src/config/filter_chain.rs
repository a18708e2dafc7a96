//! `filter_chain_match`: which filter chain a new connection gets, with
//! Envoy's precedence. The criteria are taken in Envoy's order
//! (destination port, destination IP, server names, transport protocol,
//! application protocols, direct source IP, source type, source IP, source
//! port); at each step only the most specific matching chains go on, and a
//! chain that set nothing for a criterion matches it least specifically.
//! Like Envoy there is no backtracking: once a more specific group is
//! chosen, a failure later does not fall back to a less specific one.

use super::{index, join, ConfigError, Result, Wrapped};
use legate_proto::envoy_types::pb::envoy::config::core::v3::CidrRange;
use legate_proto::envoy_types::pb::envoy::config::listener::v3 as pb;
use std::net::{IpAddr, SocketAddr};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceType {
    Any,
    SameIpOrLoopback,
    External,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.len as u32)
                };
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.len as u32)
                };
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    }

    pub fn from_proto(c: &CidrRange, path: &str) -> Result<Self> {
        let addr: IpAddr = c.address_prefix.parse().map_err(|_| {
            ConfigError::new(
                join(path, "address_prefix"),
                format!("'{}' is not an IP address", c.address_prefix),
            )
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = c.prefix_len.val().unwrap_or(max);
        if len > max {
            return Err(ConfigError::new(
                join(path, "prefix_len"),
                format!("{len} is longer than the address"),
            ));
        }
        Ok(Self {
            addr,
            len: len as u8,
        })
    }
}

/// One chain's criteria; empty means "not set".
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ChainMatch {
    pub destination_port: Option<u16>,
    pub prefix_ranges: Vec<Cidr>,
    pub server_names: Vec<String>,
    pub transport_protocol: String,
    pub application_protocols: Vec<String>,
    pub direct_source_prefix_ranges: Vec<Cidr>,
    pub source_type: Option<SourceType>,
    pub source_prefix_ranges: Vec<Cidr>,
    pub source_ports: Vec<u16>,
}

/// What is known about a new connection.
#[derive(Debug, Clone)]
pub struct ConnInfo<'a> {
    pub local: SocketAddr,
    /// The client: from a PROXY header when there is one.
    pub peer: SocketAddr,
    /// The socket's own peer (the proxy that sent a PROXY header).
    pub direct_peer: SocketAddr,
    /// SNI, from a TLS inspector (none yet: empty).
    pub server_name: &'a str,
    /// `raw_buffer`, or `tls` from a TLS inspector.
    pub transport_protocol: &'a str,
    pub application_protocols: &'a [String],
}

impl ChainMatch {
    pub fn from_proto(m: &pb::FilterChainMatch, path: &str) -> Result<Self> {
        let cidrs = |v: &[CidrRange], f: &str| -> Result<Vec<Cidr>> {
            v.iter()
                .enumerate()
                .map(|(i, c)| Cidr::from_proto(c, &index(path, f, i)))
                .collect()
        };
        if !m.address_suffix.is_empty() || m.suffix_len.is_some() {
            return Err(ConfigError::new(
                join(path, "address_suffix"),
                "address_suffix is not supported (Envoy does not implement it either)",
            ));
        }
        use pb::filter_chain_match::ConnectionSourceType as S;
        let source_type = match S::try_from(m.source_type).unwrap_or(S::Any) {
            S::Any => None,
            S::SameIpOrLoopback => Some(SourceType::SameIpOrLoopback),
            S::External => Some(SourceType::External),
        };
        let destination_port = match m.destination_port.val() {
            None => None,
            Some(p) if (1..=65535).contains(&p) => Some(p as u16),
            Some(p) => {
                return Err(ConfigError::new(
                    join(path, "destination_port"),
                    format!("{p} is not a port"),
                ))
            }
        };
        let ports = m
            .source_ports
            .iter()
            .map(|p| {
                u16::try_from(*p).map_err(|_| {
                    ConfigError::new(join(path, "source_ports"), format!("{p} is not a port"))
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            destination_port,
            prefix_ranges: cidrs(&m.prefix_ranges, "prefix_ranges")?,
            server_names: m
                .server_names
                .iter()
                .map(|s| s.to_ascii_lowercase())
                .collect(),
            transport_protocol: m.transport_protocol.clone(),
            application_protocols: m.application_protocols.clone(),
            direct_source_prefix_ranges: cidrs(
                &m.direct_source_prefix_ranges,
                "direct_source_prefix_ranges",
            )?,
            source_type,
            source_prefix_ranges: cidrs(&m.source_prefix_ranges, "source_prefix_ranges")?,
            source_ports: ports,
        })
    }
}

/// How specifically `ranges` match `ip`: None no match, 0 unset, else the
/// longest matching prefix + 1.
fn cidr_score(ranges: &[Cidr], ip: IpAddr) -> Option<u32> {
    if ranges.is_empty() {
        return Some(0);
    }
    ranges
        .iter()
        .filter(|c| c.contains(ip))
        .map(|c| c.len as u32 + 1)
        .max()
}

fn server_name_score(names: &[String], sni: &str) -> Option<u32> {
    if names.is_empty() {
        return Some(0);
    }
    let sni = sni.to_ascii_lowercase();
    names
        .iter()
        .filter_map(|n| {
            if *n == sni {
                Some(1_000_000 + n.len() as u32)
            } else if let Some(suffix) = n.strip_prefix('*') {
                // `*.example.com` matches `a.example.com` (longest wins).
                (sni.len() > suffix.len() && sni.ends_with(suffix))
                    .then_some(1 + suffix.len() as u32)
            } else {
                None
            }
        })
        .max()
}

fn is_local(peer: IpAddr, local: IpAddr) -> bool {
    peer.is_loopback() || peer == local
}

/// The score of each criterion in Envoy's order.
fn scores(m: &ChainMatch, c: &ConnInfo) -> [Option<u32>; 9] {
    let port = match m.destination_port {
        None => Some(0),
        Some(p) => (p == c.local.port()).then_some(1),
    };
    let transport = if m.transport_protocol.is_empty() {
        Some(0)
    } else {
        (m.transport_protocol == c.transport_protocol).then_some(1)
    };
    let alpn = if m.application_protocols.is_empty() {
        Some(0)
    } else {
        m.application_protocols
            .iter()
            .any(|p| c.application_protocols.contains(p))
            .then_some(1)
    };
    let source_type = match m.source_type {
        None | Some(SourceType::Any) => Some(0),
        Some(SourceType::SameIpOrLoopback) => is_local(c.peer.ip(), c.local.ip()).then_some(1),
        Some(SourceType::External) => (!is_local(c.peer.ip(), c.local.ip())).then_some(1),
    };
    let source_port = if m.source_ports.is_empty() {
        Some(0)
    } else {
        m.source_ports.contains(&c.peer.port()).then_some(1)
    };
    [
        port,
        cidr_score(&m.prefix_ranges, c.local.ip()),
        server_name_score(&m.server_names, c.server_name),
        transport,
        alpn,
        cidr_score(&m.direct_source_prefix_ranges, c.direct_peer.ip()),
        source_type,
        cidr_score(&m.source_prefix_ranges, c.peer.ip()),
        source_port,
    ]
}

/// The index of the chain a connection gets, or None (then the listener's
/// default chain, if any).
pub fn select<'a>(
    chains: impl IntoIterator<Item = &'a ChainMatch>,
    conn: &ConnInfo,
) -> Option<usize> {
    let scored: Vec<[Option<u32>; 9]> = chains.into_iter().map(|m| scores(m, conn)).collect();
    let mut candidates: Vec<usize> = (0..scored.len()).collect();
    // Level by level, narrowing the candidates (each chain's scores are
    // indexed by level: no iterator over `scored` fits).
    #[allow(clippy::needless_range_loop)]
    for level in 0..9 {
        let best = candidates.iter().filter_map(|&i| scored[i][level]).max()?;
        candidates.retain(|&i| scored[i][level] == Some(best));
    }
    candidates.first().copied()
}

/// Envoy refuses two chains with identical criteria.
pub fn check_unique(chains: &[ChainMatch], path: &str) -> Result<()> {
    for (i, a) in chains.iter().enumerate() {
        if let Some(j) = chains[..i].iter().position(|b| b == a) {
            return Err(ConfigError::new(
                index(path, "filter_chains", i),
                format!("multiple filter chains with the same matching rules are defined (filter_chains[{j}] and filter_chains[{i}])"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(local: &str, peer: &str) -> (SocketAddr, SocketAddr) {
        (local.parse().unwrap(), peer.parse().unwrap())
    }

    fn pick(chains: &[ChainMatch], local: &str, peer: &str) -> Option<usize> {
        let (l, p) = conn(local, peer);
        select(
            chains,
            &ConnInfo {
                local: l,
                peer: p,
                direct_peer: p,
                server_name: "",
                transport_protocol: "raw_buffer",
                application_protocols: &[],
            },
        )
    }

    fn cidr(s: &str) -> Cidr {
        let (a, l) = s.split_once('/').unwrap();
        Cidr {
            addr: a.parse().unwrap(),
            len: l.parse().unwrap(),
        }
    }

    #[test]
    fn most_specific_wins_at_each_level() {
        let chains = vec![
            ChainMatch::default(),
            ChainMatch {
                source_prefix_ranges: vec![cidr("127.0.0.0/8")],
                ..Default::default()
            },
            ChainMatch {
                source_prefix_ranges: vec![cidr("127.0.0.2/32")],
                ..Default::default()
            },
        ];
        assert_eq!(pick(&chains, "127.0.0.1:80", "127.0.0.2:5000"), Some(2));
        assert_eq!(pick(&chains, "127.0.0.1:80", "127.0.0.3:5000"), Some(1));
        assert_eq!(pick(&chains, "10.0.0.1:80", "10.0.0.3:5000"), Some(0));
    }

    #[test]
    fn destination_port_comes_first_and_there_is_no_backtracking() {
        let chains = vec![
            ChainMatch {
                destination_port: Some(80),
                source_ports: vec![1111],
                ..Default::default()
            },
            ChainMatch::default(),
        ];
        assert_eq!(pick(&chains, "127.0.0.1:80", "127.0.0.1:1111"), Some(0));
        // Port 80 selects chain 0's group; its source port fails: no match,
        // as in Envoy (chain 1 is not tried).
        assert_eq!(pick(&chains, "127.0.0.1:80", "127.0.0.1:2222"), None);
        assert_eq!(pick(&chains, "127.0.0.1:81", "127.0.0.1:2222"), Some(1));
    }

    #[test]
    fn source_type_and_server_names() {
        let chains = vec![
            ChainMatch {
                source_type: Some(SourceType::External),
                ..Default::default()
            },
            ChainMatch {
                source_type: Some(SourceType::SameIpOrLoopback),
                ..Default::default()
            },
        ];
        assert_eq!(pick(&chains, "127.0.0.1:80", "127.0.0.1:1"), Some(1));
        assert_eq!(pick(&chains, "10.0.0.1:80", "10.0.0.2:1"), Some(0));
        let names = vec!["*.example.com".to_string(), "a.example.com".to_string()];
        assert_eq!(server_name_score(&names, "a.example.com"), Some(1_000_013));
        assert_eq!(server_name_score(&names, "b.example.com"), Some(13));
        assert_eq!(server_name_score(&names, "example.com"), None);
        // Without SNI, chains naming servers do not match.
        let chains = vec![ChainMatch {
            server_names: names,
            ..Default::default()
        }];
        assert_eq!(pick(&chains, "127.0.0.1:80", "127.0.0.1:1"), None);
    }

    #[test]
    fn duplicates_are_refused() {
        let a = ChainMatch {
            destination_port: Some(80),
            ..Default::default()
        };
        assert!(check_unique(&[a.clone(), ChainMatch::default()], "l").is_ok());
        let e = check_unique(&[a.clone(), a], "l").unwrap_err();
        assert_eq!(e.path, "l.filter_chains[1]");
    }

    proptest::proptest! {
        /// Whatever the chains, the selected one matches every criterion.
        #[test]
        fn the_chosen_chain_matches(
            ports in proptest::collection::vec(proptest::option::of(80u16..83), 1..6),
            src in proptest::collection::vec(proptest::option::of(0u8..3), 1..6),
            local_port in 80u16..83,
            peer_last in 0u8..3,
        ) {
            let chains: Vec<ChainMatch> = ports.iter().zip(src.iter()).map(|(p, s)| ChainMatch {
                destination_port: *p,
                source_prefix_ranges: s.map(|s| vec![cidr(&format!("127.0.0.{s}/32"))]).unwrap_or_default(),
                ..Default::default()
            }).collect();
            let local = format!("127.0.0.1:{local_port}");
            let peer = format!("127.0.0.{peer_last}:9");
            if let Some(i) = pick(&chains, &local, &peer) {
                let (l, p) = conn(&local, &peer);
                let s = scores(&chains[i], &ConnInfo { local: l, peer: p, direct_peer: p, server_name: "", transport_protocol: "raw_buffer", application_protocols: &[] });
                proptest::prop_assert!(s.iter().all(Option::is_some));
            }
        }
    }
}
