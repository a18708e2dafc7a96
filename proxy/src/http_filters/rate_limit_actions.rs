//! Rate limit actions (`config.route.v3.RateLimit`): how a request becomes
//! descriptors, lists of (key, value) entries, for the local and the global
//! rate limit filters. Each `RateLimit` yields one descriptor when all its
//! actions produce an entry (an action may instead skip itself, or void
//! the whole descriptor), as Envoy's `RateLimitPolicyEntryImpl`.

use crate::config::matcher::{HeaderMatcher, Pseudo, QueryMatcher};
use crate::config::{index, join, ConfigError, Result, Wrapped};
use crate::registry::MessageSupport;
use legate_proto::envoy_types::pb::envoy::config::route::v3 as pb;
use std::net::{IpAddr, SocketAddr};

pub static REGISTRY: &[MessageSupport] = &[
    MessageSupport {
        message: "envoy.config.route.v3.RateLimit",
        supported: &["stage", "disable_key", "actions"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.route.v3.RateLimit.Action",
        supported: &[
            "source_cluster",
            "destination_cluster",
            "request_headers",
            "query_parameters",
            "remote_address",
            "generic_key",
            "header_value_match",
            "masked_remote_address",
            "query_parameter_value_match",
            "remote_address_match",
        ],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.route.v3.RateLimit.Action.RemoteAddressMatch",
        supported: &[
            "descriptor_value",
            "descriptor_key",
            "default_value",
            "address_matcher",
        ],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.type.matcher.v3.AddressMatcher",
        supported: &["ranges", "invert_match"],
        warn: &[],
    },
    MessageSupport {
        message: "xds.core.v3.CidrRange",
        supported: &["address_prefix", "prefix_len"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.route.v3.RateLimit.Action.SourceCluster",
        supported: &[],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.route.v3.RateLimit.Action.DestinationCluster",
        supported: &[],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.route.v3.RateLimit.Action.RequestHeaders",
        supported: &["header_name", "descriptor_key", "skip_if_absent"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.route.v3.RateLimit.Action.QueryParameters",
        supported: &["query_parameter_name", "descriptor_key", "skip_if_absent"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.route.v3.RateLimit.Action.RemoteAddress",
        supported: &[],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.route.v3.RateLimit.Action.MaskedRemoteAddress",
        supported: &["v4_prefix_mask_len", "v6_prefix_mask_len"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.route.v3.RateLimit.Action.GenericKey",
        supported: &["descriptor_value", "default_value", "descriptor_key"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.route.v3.RateLimit.Action.HeaderValueMatch",
        supported: &[
            "descriptor_value",
            "default_value",
            "descriptor_key",
            "expect_match",
            "headers",
        ],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.route.v3.RateLimit.Action.QueryParameterValueMatch",
        supported: &[
            "descriptor_value",
            "default_value",
            "descriptor_key",
            "expect_match",
            "query_parameters",
        ],
        warn: &[],
    },
];

/// One descriptor: its entries in order.
pub type Descriptor = Vec<(String, String)>;

#[derive(Debug)]
enum Action {
    SourceCluster,
    DestinationCluster,
    RequestHeader {
        name: http::HeaderName,
        key: String,
        skip_if_absent: bool,
    },
    QueryParameter {
        name: String,
        key: String,
        skip_if_absent: bool,
    },
    RemoteAddress,
    MaskedRemoteAddress {
        v4: u8,
        v6: u8,
    },
    GenericKey {
        key: String,
        value: String,
    },
    HeaderValueMatch {
        key: String,
        value: String,
        default: String,
        expect: bool,
        headers: Vec<HeaderMatcher>,
    },
    QueryValueMatch {
        key: String,
        value: String,
        default: String,
        expect: bool,
        params: Vec<QueryMatcher>,
    },
    RemoteAddressMatch {
        key: String,
        value: String,
        default: String,
        ranges: Vec<crate::config::filter_chain::Cidr>,
        invert: bool,
    },
}

/// One `RateLimit`: a stage, and actions making one descriptor.
#[derive(Debug)]
pub struct RateLimit {
    pub stage: u32,
    /// Envoy's filters skip entries that have a `disable_key`.
    pub disable_key: String,
    actions: Vec<Action>,
}

/// What the actions read from a request.
pub struct RequestFacts<'a> {
    pub headers: &'a http::HeaderMap,
    pub pseudo: Pseudo<'a>,
    /// The path with its query.
    pub path_and_query: &'a str,
    /// The trusted client address.
    pub remote: Option<SocketAddr>,
    /// The route's upstream cluster.
    pub cluster: &'a str,
    /// This proxy's service cluster (`node.cluster`).
    pub local_cluster: &'a str,
}

pub fn list(rls: &[pb::RateLimit], path: &str, field: &str) -> Result<Vec<RateLimit>> {
    rls.iter()
        .enumerate()
        .map(|(i, r)| RateLimit::from_proto(r, &index(path, field, i)))
        .collect()
}

impl RateLimit {
    pub fn from_proto(r: &pb::RateLimit, path: &str) -> Result<Self> {
        for (set, field) in [
            (r.limit.is_some(), "limit"),
            (r.hits_addend.is_some(), "hits_addend"),
            (r.apply_on_stream_done, "apply_on_stream_done"),
            (r.x_ratelimit_option != 0, "x_ratelimit_option"),
        ] {
            if set {
                return Err(ConfigError::new(join(path, field), "not supported yet"));
            }
        }
        let actions = r
            .actions
            .iter()
            .enumerate()
            .map(|(i, a)| action(a, &index(path, "actions", i)))
            .collect::<Result<_>>()?;
        Ok(Self {
            stage: r.stage.val().unwrap_or(0),
            disable_key: r.disable_key.clone(),
            actions,
        })
    }

    /// The descriptor this entry makes for the request, if every action
    /// produced its entry (or skipped itself).
    pub fn descriptor(&self, f: &RequestFacts) -> Option<Descriptor> {
        let mut d = Vec::with_capacity(self.actions.len());
        for a in &self.actions {
            match a.entry(f) {
                Entry::Add(k, v) => d.push((k, v)),
                Entry::Skip => {}
                Entry::Void => return None,
            }
        }
        (!d.is_empty()).then_some(d)
    }
}

enum Entry {
    Add(String, String),
    /// This action adds nothing; the descriptor goes on.
    Skip,
    /// No descriptor for this entry.
    Void,
}

fn or(key: &str, default: &str) -> String {
    if key.is_empty() {
        default.to_string()
    } else {
        key.to_string()
    }
}

fn action(a: &pb::rate_limit::Action, path: &str) -> Result<Action> {
    use pb::rate_limit::action::ActionSpecifier as A;
    Ok(match &a.action_specifier {
        Some(A::SourceCluster(_)) => Action::SourceCluster,
        Some(A::DestinationCluster(_)) => Action::DestinationCluster,
        Some(A::RequestHeaders(h)) => Action::RequestHeader {
            name: crate::headers::header_name(
                &h.header_name,
                &join(path, "request_headers.header_name"),
            )?,
            key: h.descriptor_key.clone(),
            skip_if_absent: h.skip_if_absent,
        },
        Some(A::QueryParameters(q)) => Action::QueryParameter {
            name: q.query_parameter_name.clone(),
            key: q.descriptor_key.clone(),
            skip_if_absent: q.skip_if_absent,
        },
        Some(A::RemoteAddress(_)) => Action::RemoteAddress,
        Some(A::MaskedRemoteAddress(m)) => Action::MaskedRemoteAddress {
            v4: m.v4_prefix_mask_len.val().unwrap_or(32).min(32) as u8,
            v6: m.v6_prefix_mask_len.val().unwrap_or(128).min(128) as u8,
        },
        Some(A::GenericKey(g)) => Action::GenericKey {
            key: or(&g.descriptor_key, "generic_key"),
            value: g.descriptor_value.clone(),
        },
        Some(A::HeaderValueMatch(h)) => Action::HeaderValueMatch {
            key: or(&h.descriptor_key, "header_match"),
            value: h.descriptor_value.clone(),
            default: h.default_value.clone(),
            expect: h.expect_match.val().unwrap_or(true),
            headers: h
                .headers
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    HeaderMatcher::from_proto(
                        m,
                        &index(&join(path, "header_value_match"), "headers", i),
                    )
                })
                .collect::<Result<_>>()?,
        },
        Some(A::QueryParameterValueMatch(q)) => Action::QueryValueMatch {
            key: or(&q.descriptor_key, "query_match"),
            value: q.descriptor_value.clone(),
            default: q.default_value.clone(),
            expect: q.expect_match.val().unwrap_or(true),
            params: q
                .query_parameters
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    QueryMatcher::from_proto(
                        m,
                        &index(
                            &join(path, "query_parameter_value_match"),
                            "query_parameters",
                            i,
                        ),
                    )
                })
                .collect::<Result<_>>()?,
        },
        Some(A::RemoteAddressMatch(r)) => {
            let mp = join(path, "remote_address_match.address_matcher");
            let m = r
                .address_matcher
                .as_ref()
                .ok_or_else(|| ConfigError::new(&mp, "address_matcher is required"))?;
            let ranges = m
                .ranges
                .iter()
                .enumerate()
                .map(|(i, c)| xds_cidr(c, &index(&mp, "ranges", i)))
                .collect::<Result<_>>()?;
            Action::RemoteAddressMatch {
                key: or(&r.descriptor_key, "remote_address_match"),
                value: r.descriptor_value.clone(),
                default: r.default_value.clone(),
                ranges,
                invert: m.invert_match,
            }
        }
        Some(_) => {
            return Err(ConfigError::new(
                path,
                "this rate limit action is not supported yet (metadata and extensions)",
            ))
        }
        None => return Err(ConfigError::new(path, "an action is required")),
    })
}

/// The client's network, `a.b.c.0/24`.
fn masked(ip: IpAddr, v4: u8, v6: u8) -> String {
    match ip {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(v4)).unwrap_or(0);
            format!("{}/{v4}", std::net::Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(v6)).unwrap_or(0);
            format!("{}/{v6}", std::net::Ipv6Addr::from(u128::from(a) & mask))
        }
    }
}

impl Action {
    fn entry(&self, f: &RequestFacts) -> Entry {
        match self {
            Action::SourceCluster => Entry::Add("source_cluster".into(), f.local_cluster.into()),
            Action::DestinationCluster => {
                Entry::Add("destination_cluster".into(), f.cluster.into())
            }
            Action::RequestHeader {
                name,
                key,
                skip_if_absent,
            } => match f.headers.get(name).and_then(|v| v.to_str().ok()) {
                Some(v) => Entry::Add(key.clone(), v.to_string()),
                None if *skip_if_absent => Entry::Skip,
                None => Entry::Void,
            },
            Action::QueryParameter {
                name,
                key,
                skip_if_absent,
            } => match crate::routing::query_params(f.path_and_query)
                .into_iter()
                .find(|(k, _)| k == name)
            {
                Some((_, v)) => Entry::Add(key.clone(), v),
                None if *skip_if_absent => Entry::Skip,
                None => Entry::Void,
            },
            Action::RemoteAddress => match f.remote {
                Some(a) => Entry::Add("remote_address".into(), a.ip().to_string()),
                None => Entry::Void,
            },
            Action::MaskedRemoteAddress { v4, v6 } => match f.remote {
                Some(a) => Entry::Add("masked_remote_address".into(), masked(a.ip(), *v4, *v6)),
                None => Entry::Void,
            },
            Action::GenericKey { key, value } => Entry::Add(key.clone(), value.clone()),
            Action::HeaderValueMatch {
                key,
                value,
                default,
                expect,
                headers,
            } => {
                let hit = headers.iter().all(|m| m.matches_with(f.headers, &f.pseudo));
                matched(hit == *expect, key, value, default)
            }
            Action::RemoteAddressMatch {
                key,
                value,
                default,
                ranges,
                invert,
            } => {
                let inside = f
                    .remote
                    .is_some_and(|a| ranges.iter().any(|c| c.contains(a.ip())));
                matched(inside != *invert, key, value, default)
            }
            Action::QueryValueMatch {
                key,
                value,
                default,
                expect,
                params,
            } => {
                let q = crate::routing::query_params(f.path_and_query);
                let hit = params.iter().all(|m| m.matches(&q));
                matched(hit == *expect, key, value, default)
            }
        }
    }
}

/// An `xds.core.v3.CidrRange` as Legate's CIDR.
fn xds_cidr(
    c: &legate_proto::envoy_types::pb::xds::core::v3::CidrRange,
    path: &str,
) -> Result<crate::config::filter_chain::Cidr> {
    let core = legate_proto::envoy_types::pb::envoy::config::core::v3::CidrRange {
        address_prefix: c.address_prefix.clone(),
        prefix_len: c.prefix_len,
    };
    crate::config::filter_chain::Cidr::from_proto(&core, path)
}

fn matched(hit: bool, key: &str, value: &str, default: &str) -> Entry {
    if hit {
        Entry::Add(key.to_string(), value.to_string())
    } else if !default.is_empty() {
        Entry::Add(key.to_string(), default.to_string())
    } else {
        Entry::Void
    }
}

/// Which of the virtual host's `rate_limits` apply with the route's
/// (`vh_rate_limits` of the local filter).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum VhRateLimits {
    /// The virtual host's, only when the route has none.
    Override,
    Include,
    Ignore,
}

/// The descriptors of the entries in `list` at `stage`, skipping those
/// `skip` says to.
pub fn descriptors(
    list: &[RateLimit],
    stage: u32,
    facts: &RequestFacts,
    skip: &dyn Fn(&RateLimit) -> bool,
    out: &mut Vec<Descriptor>,
) {
    for r in list.iter().filter(|r| r.stage == stage && !skip(r)) {
        out.extend(r.descriptor(facts));
    }
}

/// The route's descriptors, then its virtual host's as `vh` says (a route
/// with `include_vh_rate_limits` always includes them).
pub fn route_descriptors(
    rq: &super::RequestInfo<'_>,
    stage: u32,
    vh: VhRateLimits,
    skip: &dyn Fn(&RateLimit) -> bool,
) -> Vec<Descriptor> {
    let facts = rq.rate_limit_facts();
    let mut out = Vec::new();
    descriptors(rq.route_rate_limits, stage, &facts, skip, &mut out);
    let vh = if rq.include_vh_rate_limits {
        VhRateLimits::Include
    } else {
        vh
    };
    let with_vhost = match vh {
        VhRateLimits::Include => true,
        VhRateLimits::Override => rq.route_rate_limits.is_empty(),
        VhRateLimits::Ignore => false,
    };
    if with_vhost {
        descriptors(rq.vhost_rate_limits, stage, &facts, skip, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_keep_the_network() {
        assert_eq!(
            masked("192.168.7.9".parse().unwrap(), 16, 128),
            "192.168.0.0/16"
        );
        assert_eq!(masked("192.168.7.9".parse().unwrap(), 0, 128), "0.0.0.0/0");
        assert_eq!(
            masked("2001:db8::1".parse().unwrap(), 32, 64),
            "2001:db8::/64"
        );
    }

    #[test]
    fn a_missing_header_voids_the_descriptor_unless_skipped() {
        let v = legate_proto::json::parse_yaml(
            "{actions: [{generic_key: {descriptor_value: g}}, {request_headers: {header_name: x-user, descriptor_key: user}}, {request_headers: {header_name: x-opt, descriptor_key: opt, skip_if_absent: true}}]}",
        )
        .unwrap();
        let m = legate_proto::json::to_dynamic(v, "envoy.config.route.v3.RateLimit", true).unwrap();
        let r = RateLimit::from_proto(&m.transcode_to().unwrap(), "rl").unwrap();
        let mut h = http::HeaderMap::new();
        let facts = |h: &http::HeaderMap| -> Option<Descriptor> {
            r.descriptor(&RequestFacts {
                headers: h,
                pseudo: Pseudo::default(),
                path_and_query: "/",
                remote: None,
                cluster: "c",
                local_cluster: "",
            })
        };
        assert_eq!(facts(&h), None);
        h.insert("x-user", "u1".parse().unwrap());
        assert_eq!(
            facts(&h),
            Some(vec![
                ("generic_key".into(), "g".into()),
                ("user".into(), "u1".into())
            ])
        );
    }
}
