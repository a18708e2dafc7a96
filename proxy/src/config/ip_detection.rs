//! `original_ip_detection_extensions` of the HTTP connection manager: how
//! the client's address is found when `use_remote_address` is off, from
//! `x-forwarded-for` (trusted hops or trusted proxy CIDRs) or from a header
//! of the operator's choosing (refusing requests without one when asked).

use super::{join, ConfigError, Result};
use legate_proto::envoy_types::pb::envoy::extensions::http::original_ip_detection as pb;
use legate_proto::envoy_types::pb::google::protobuf::Any;
use std::net::IpAddr;

const XFF: &str = "envoy.extensions.http.original_ip_detection.xff.v3.XffConfig";
const CUSTOM_HEADER: &str =
    "envoy.extensions.http.original_ip_detection.custom_header.v3.CustomHeaderConfig";

#[derive(Debug, Clone, PartialEq)]
pub enum Detection {
    Xff {
        /// Addresses from the right of `x-forwarded-for` to skip.
        hops: u32,
        /// With these, only a peer inside them is trusted to have set XFF,
        /// and the client is the rightmost address outside them.
        trusted: Vec<(IpAddr, u8)>,
        /// `skip_xff_append: false`: once this extension is asked, the
        /// peer is appended to XFF (whether or not it finds the client).
        append: bool,
    },
    Header {
        name: http::HeaderName,
        /// `allow_extension_to_set_address_as_trusted`.
        trusted: bool,
        /// `reject_with_status`: refuse a request without a usable address.
        reject: Option<u16>,
    },
}

/// What a detection found.
#[derive(Debug, PartialEq)]
pub enum Found {
    /// The client, and whether it may be checked as internal.
    Client(IpAddr, bool),
    /// Nothing: the next extension is asked.
    Nothing,
    /// Refuse the request with this status.
    Reject(u16),
}

impl Detection {
    pub fn from_any(a: &Any, path: &str) -> Result<Self> {
        let tc = join(path, "typed_config");
        let bad = |e: prost::DecodeError| ConfigError::new(&tc, e.to_string());
        match legate_proto::type_name(&a.type_url) {
            XFF => {
                let c: pb::xff::v3::XffConfig =
                    prost::Message::decode(a.value.as_slice()).map_err(bad)?;
                let mut trusted = Vec::new();
                for (i, r) in c
                    .xff_trusted_cidrs
                    .iter()
                    .flat_map(|t| &t.cidrs)
                    .enumerate()
                {
                    let p = format!("{tc}.xff_trusted_cidrs.cidrs[{i}]");
                    let ip: IpAddr = r.address_prefix.parse().map_err(|_| {
                        ConfigError::new(join(&p, "address_prefix"), "not an IP address")
                    })?;
                    let len = r.prefix_len.as_ref().map_or(0, |l| l.value);
                    let max = if ip.is_ipv4() { 32 } else { 128 };
                    if len > max {
                        return Err(ConfigError::new(join(&p, "prefix_len"), "too long"));
                    }
                    trusted.push((ip, len as u8));
                }
                if !trusted.is_empty() && c.xff_num_trusted_hops > 0 {
                    return Err(ConfigError::new(
                        &tc,
                        "only one of xff_num_trusted_hops and xff_trusted_cidrs can be set",
                    ));
                }
                Ok(Detection::Xff {
                    hops: c.xff_num_trusted_hops,
                    trusted,
                    // Unset means skipped, for backwards compatibility.
                    append: c.skip_xff_append.is_some_and(|b| !b.value),
                })
            }
            CUSTOM_HEADER => {
                let c: pb::custom_header::v3::CustomHeaderConfig =
                    prost::Message::decode(a.value.as_slice()).map_err(bad)?;
                let name =
                    http::HeaderName::from_bytes(c.header_name.to_ascii_lowercase().as_bytes())
                        .map_err(|_| {
                            ConfigError::new(join(&tc, "header_name"), "not a valid header name")
                        })?;
                let reject = match &c.reject_with_status {
                    Some(s) if (200..600).contains(&s.code) => Some(s.code as u16),
                    Some(_) => {
                        return Err(ConfigError::new(
                            join(&tc, "reject_with_status.code"),
                            "not an HTTP status Legate can send",
                        ))
                    }
                    None => None,
                };
                Ok(Detection::Header {
                    name,
                    trusted: c.allow_extension_to_set_address_as_trusted,
                    reject,
                })
            }
            other => Err(ConfigError::new(
                tc,
                format!("original IP detection {other} is not supported"),
            )),
        }
    }

    /// Whether asking this extension appends the peer to XFF.
    pub fn appends(&self) -> bool {
        matches!(self, Detection::Xff { append: true, .. })
    }

    /// The client this extension finds for a request from `peer`.
    pub fn detect(&self, headers: &http::HeaderMap, peer: IpAddr) -> Found {
        match self {
            Detection::Header {
                name,
                trusted,
                reject,
            } => {
                let addr = headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<IpAddr>().ok());
                match (addr, reject) {
                    (Some(a), _) => Found::Client(a, *trusted),
                    (None, Some(code)) => Found::Reject(*code),
                    (None, None) => Found::Nothing,
                }
            }
            Detection::Xff { hops, trusted, .. } => {
                let xff: Vec<&str> = headers
                    .get_all("x-forwarded-for")
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(','))
                    .map(str::trim)
                    .collect();
                let found = if trusted.is_empty() {
                    last_but(&xff, *hops as usize)
                } else if !in_any(peer, trusted) {
                    None
                } else {
                    rightmost_untrusted(&xff, trusted)
                };
                match found {
                    Some((a, single)) => Found::Client(a, single),
                    None => Found::Nothing,
                }
            }
        }
    }
}

/// The address `skip` places from the right of XFF (and whether XFF held
/// just one), as Envoy's `getLastAddressFromXFF`.
fn last_but(xff: &[&str], skip: usize) -> Option<(IpAddr, bool)> {
    if xff.is_empty() || skip >= xff.len() {
        return None;
    }
    let a = xff[xff.len() - 1 - skip].parse().ok()?;
    Some((a, xff.len() == 1))
}

/// From the right, the first address outside the trusted ranges (all
/// trusted: the leftmost), read only as far as needed: an entry that is no
/// address ends the search with nothing. Never "single" (Envoy does not
/// let such a client be checked as internal).
fn rightmost_untrusted(xff: &[&str], trusted: &[(IpAddr, u8)]) -> Option<(IpAddr, bool)> {
    let mut last = None;
    for entry in xff.iter().rev() {
        let a: IpAddr = entry.parse().ok()?;
        if !in_any(a, trusted) {
            return Some((a, false));
        }
        last = Some(a);
    }
    last.map(|a| (a, false))
}

fn in_any(ip: IpAddr, ranges: &[(IpAddr, u8)]) -> bool {
    ranges.iter().any(|(net, len)| in_range(ip, *net, *len))
}

fn in_range(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert("x-forwarded-for", xff.parse().unwrap());
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn xff_by_hops_and_by_trusted_proxies() {
        let by_hops = Detection::Xff {
            hops: 1,
            trusted: vec![],
            append: false,
        };
        let h = headers("1.1.1.1, 2.2.2.2, 3.3.3.3");
        assert_eq!(
            by_hops.detect(&h, ip("9.9.9.9")),
            Found::Client(ip("2.2.2.2"), false)
        );
        let cidrs = Detection::Xff {
            hops: 0,
            trusted: vec![(ip("10.0.0.0"), 8), (ip("3.3.3.0"), 24)],
            append: true,
        };
        assert_eq!(
            cidrs.detect(&h, ip("10.1.2.3")),
            Found::Client(ip("2.2.2.2"), false)
        );
        // A peer outside the trusted ranges may not name the client.
        assert_eq!(cidrs.detect(&h, ip("9.9.9.9")), Found::Nothing);
        let all = headers("10.0.0.1, 10.0.0.2");
        assert_eq!(
            cidrs.detect(&all, ip("10.1.2.3")),
            Found::Client(ip("10.0.0.1"), false)
        );
    }

    #[test]
    fn a_custom_header_names_the_client_or_refuses_the_request() {
        let d = Detection::Header {
            name: http::HeaderName::from_static("x-client"),
            trusted: true,
            reject: Some(403),
        };
        let mut h = http::HeaderMap::new();
        assert_eq!(d.detect(&h, ip("9.9.9.9")), Found::Reject(403));
        h.insert("x-client", "not an ip".parse().unwrap());
        assert_eq!(d.detect(&h, ip("9.9.9.9")), Found::Reject(403));
        h.insert("x-client", "2001:db8::1".parse().unwrap());
        assert_eq!(
            d.detect(&h, ip("9.9.9.9")),
            Found::Client(ip("2001:db8::1"), true)
        );
    }
}
