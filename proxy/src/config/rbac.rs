//! The RBAC engine, shared by the `rbac` network filter and the HTTP one
//! (`http_filters::rbac`): policies of permissions (where the connection or
//! request goes) and principals (who sent it, including the identity in its
//! client certificate). Evaluation is pure over the facts. Header and path
//! rules exist only for requests.

use super::filter_chain::Cidr;
use super::matcher::{HeaderMatcher, Pseudo, StringMatcher};
use super::{index, join, ConfigError, Result};
use legate_proto::envoy_types::pb::envoy::config::rbac::v3 as pb;
use legate_proto::envoy_types::pb::envoy::extensions::filters::network::rbac::v3 as net;
use std::net::SocketAddr;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Action {
    Allow,
    Deny,
    /// LOG allows every connection (it only marks them for logging).
    Log,
}

#[derive(Debug)]
pub struct Rbac {
    pub stat_prefix: String,
    /// None: no `rules`, nothing is enforced.
    pub rules: Option<Rules>,
    /// The `matcher` form, instead of `rules`.
    pub matcher: Option<super::unified_matcher::Matcher<MatchedAction>>,
}

/// A matcher's `envoy.config.rbac.v3.Action`.
#[derive(Debug)]
pub struct MatchedAction {
    pub name: String,
    pub action: Action,
}

pub fn matched_action(
    t: &legate_proto::envoy_types::pb::xds::core::v3::TypedExtensionConfig,
    path: &str,
) -> Result<MatchedAction> {
    let a = t
        .typed_config
        .as_ref()
        .filter(|a| legate_proto::type_name(&a.type_url) == "envoy.config.rbac.v3.Action")
        .ok_or_else(|| {
            ConfigError::new(
                join(path, "typed_config"),
                "an envoy.config.rbac.v3.Action is required",
            )
        })?;
    let a: pb::Action = crate::http_filters::decode(a, &join(path, "typed_config"))?;
    use pb::rbac::Action as A;
    Ok(MatchedAction {
        name: a.name,
        action: match A::try_from(a.action) {
            Ok(A::Allow) => Action::Allow,
            Ok(A::Deny) => Action::Deny,
            Ok(A::Log) => Action::Log,
            Err(_) => {
                return Err(ConfigError::new(
                    join(path, "typed_config.action"),
                    "unknown action",
                ))
            }
        },
    })
}

/// An action and its policies, sorted by name.
#[derive(Debug)]
pub struct Rules {
    action: Action,
    policies: Vec<(String, Policy)>,
}

#[derive(Debug)]
pub struct Policy {
    permissions: Vec<Permission>,
    principals: Vec<Principal>,
}

#[derive(Debug)]
enum Permission {
    Any,
    And(Vec<Permission>),
    Or(Vec<Permission>),
    Not(Box<Permission>),
    DestinationIp(Cidr),
    DestinationPort(u16),
    /// [start, end)
    DestinationPortRange(i32, i32),
    ServerName(StringMatcher),
    Header(HeaderMatcher),
    /// The request's path without its query.
    UrlPath(StringMatcher),
}

#[derive(Debug)]
enum Principal {
    Any,
    And(Vec<Principal>),
    Or(Vec<Principal>),
    Not(Box<Principal>),
    /// A client certificate was presented (and verified); with a name, one
    /// of its URI SANs, DNS SANs or its subject matches.
    Authenticated(Option<StringMatcher>),
    /// `source_ip` and `direct_remote_ip`: the peer of the connection.
    DirectRemoteIp(Cidr),
    /// `remote_ip`: the original client (from XFF for requests, when the
    /// connection manager trusts it).
    RemoteIp(Cidr),
    Header(HeaderMatcher),
    UrlPath(StringMatcher),
}

/// What is known about a connection (and request) when the filter runs.
pub struct Facts<'a> {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// The original client: the peer, or for requests the address the
    /// connection manager derived from XFF.
    pub remote: SocketAddr,
    pub sni: &'a str,
    /// The verified client certificate (DER), on mTLS connections.
    pub peer_cert: Option<&'a [u8]>,
    /// The request, for the HTTP filter.
    pub http: Option<HttpFacts<'a>>,
}

pub struct HttpFacts<'a> {
    pub headers: &'a http::HeaderMap,
    pub pseudo: Pseudo<'a>,
    /// The path without query or fragment.
    pub path: &'a str,
}

pub const RBAC_TYPE: &str = "envoy.extensions.filters.network.rbac.v3.RBAC";

impl Rbac {
    pub fn from_proto(r: &net::Rbac, path: &str) -> Result<Self> {
        if r.stat_prefix.is_empty() {
            return Err(ConfigError::new(
                join(path, "stat_prefix"),
                "stat_prefix is required",
            ));
        }
        if r.enforcement_type != net::rbac::EnforcementType::OneTimeOnFirstByte as i32 {
            return Err(ConfigError::new(
                join(path, "enforcement_type"),
                "only ONE_TIME_ON_FIRST_BYTE is supported",
            ));
        }
        let matcher = r
            .matcher
            .as_ref()
            .map(|m| {
                super::unified_matcher::Matcher::from_proto_in(
                    m,
                    &join(path, "matcher"),
                    &matched_action,
                    super::unified_matcher::Domain::Network,
                )
            })
            .transpose()?;
        let rules = match &r.rules {
            Some(rules) if matcher.is_none() => {
                Some(Rules::from_proto(rules, &join(path, "rules"), false)?)
            }
            _ => None,
        };
        // Envoy's counters exist (at zero) from the start.
        for n in ["allowed", "denied", "shadow_allowed", "shadow_denied"] {
            let _ = crate::stats::counter(format!("{}rbac.{n}", r.stat_prefix));
        }
        Ok(Self {
            stat_prefix: r.stat_prefix.clone(),
            rules,
            matcher,
        })
    }

    /// Whether the connection may go on, and the policy (or the matcher's
    /// action) that decided (for ALLOW, the one that matched; for DENY,
    /// the one that denied). A matcher that matches nothing denies.
    pub fn allows(&self, f: &Facts) -> (bool, Option<&str>) {
        if let Some(m) = &self.matcher {
            let headers = http::HeaderMap::new();
            let metadata = serde_json::Map::new();
            let data = super::unified_matcher::Data {
                headers: &headers,
                pseudo: Pseudo::default(),
                metadata: &metadata,
                remote: Some(f.remote),
                direct_remote: Some(f.peer),
                local: Some(f.local),
                sni: f.sni,
                response: None,
            };
            return match m.evaluate(&data) {
                Some(a) => (a.action != Action::Deny, Some(a.name.as_str())),
                None => (false, None),
            };
        }
        match &self.rules {
            Some(r) => r.allows(f),
            None => (true, None),
        }
    }
}

impl Rules {
    /// `http`: header and path rules are allowed (the HTTP filter).
    pub fn from_proto(rules: &pb::Rbac, p: &str, http: bool) -> Result<Self> {
        use pb::rbac::Action as A;
        let action = match A::try_from(rules.action).unwrap_or(A::Allow) {
            A::Allow => Action::Allow,
            A::Deny => Action::Deny,
            A::Log => Action::Log,
        };
        // Sorted by name, so evaluation does not depend on map order.
        let mut names: Vec<&String> = rules.policies.keys().collect();
        names.sort();
        let mut policies = Vec::new();
        for name in names {
            let pp = format!("{p}.policies[\"{name}\"]");
            let pol = &rules.policies[name];
            if pol.condition.is_some() || pol.checked_condition.is_some() {
                return Err(ConfigError::new(
                    join(&pp, "condition"),
                    "CEL conditions are not supported",
                ));
            }
            let permissions = pol
                .permissions
                .iter()
                .enumerate()
                .map(|(i, x)| permission(x, &index(&pp, "permissions", i), http))
                .collect::<Result<_>>()?;
            let principals = pol
                .principals
                .iter()
                .enumerate()
                .map(|(i, x)| principal(x, &index(&pp, "principals", i), http))
                .collect::<Result<_>>()?;
            policies.push((
                name.clone(),
                Policy {
                    permissions,
                    principals,
                },
            ));
        }
        Ok(Self { action, policies })
    }

    /// As [`Rbac::allows`].
    pub fn allows(&self, f: &Facts) -> (bool, Option<&str>) {
        let (action, policies) = (&self.action, &self.policies);
        let hit = policies
            .iter()
            .find(|(_, p)| {
                p.permissions.iter().any(|x| x.matches(f))
                    && p.principals.iter().any(|x| x.matches(f))
            })
            .map(|(n, _)| n.as_str());
        match action {
            Action::Allow => (hit.is_some(), hit),
            Action::Deny => (hit.is_none(), hit),
            Action::Log => (true, hit),
        }
    }
}

fn cidr(
    c: &legate_proto::envoy_types::pb::envoy::config::core::v3::CidrRange,
    path: &str,
) -> Result<Cidr> {
    Cidr::from_proto(c, path)
}

fn url_path(
    m: &legate_proto::envoy_types::pb::envoy::r#type::matcher::v3::PathMatcher,
    path: &str,
) -> Result<StringMatcher> {
    use legate_proto::envoy_types::pb::envoy::r#type::matcher::v3::path_matcher::Rule;
    match &m.rule {
        Some(Rule::Path(s)) => StringMatcher::from_proto(s, &join(path, "path")),
        None => Err(ConfigError::new(path, "path is required")),
    }
}

fn permission(p: &pb::Permission, path: &str, http: bool) -> Result<Permission> {
    use pb::permission::Rule as R;
    let set = |s: &pb::permission::Set, f: &str| -> Result<Vec<Permission>> {
        s.rules
            .iter()
            .enumerate()
            .map(|(i, r)| permission(r, &index(&join(path, f), "rules", i), http))
            .collect()
    };
    Ok(match &p.rule {
        Some(R::Any(true)) => Permission::Any,
        Some(R::AndRules(s)) => Permission::And(set(s, "and_rules")?),
        Some(R::OrRules(s)) => Permission::Or(set(s, "or_rules")?),
        Some(R::NotRule(n)) => Permission::Not(Box::new(permission(n, &join(path, "not_rule"), http)?)),
        Some(R::Header(h)) if http => Permission::Header(HeaderMatcher::from_proto(h, &join(path, "header"))?),
        Some(R::UrlPath(m)) if http => Permission::UrlPath(url_path(m, &join(path, "url_path"))?),
        Some(R::DestinationIp(c)) => Permission::DestinationIp(cidr(c, &join(path, "destination_ip"))?),
        Some(R::DestinationPort(port)) => Permission::DestinationPort(u16::try_from(*port).map_err(|_| {
            ConfigError::new(join(path, "destination_port"), format!("{port} is not a port"))
        })?),
        Some(R::DestinationPortRange(r)) => Permission::DestinationPortRange(r.start, r.end),
        Some(R::RequestedServerName(m)) => Permission::ServerName(StringMatcher::from_proto(
            m,
            &join(path, "requested_server_name"),
        )?),
        Some(R::Any(false)) | None => {
            return Err(ConfigError::new(path, "a permission rule is required"))
        }
        Some(_) => {
            return Err(ConfigError::new(
                path,
                "only any, and_rules, or_rules, not_rule, destination_ip, destination_port, destination_port_range and requested_server_name apply to connections",
            ))
        }
    })
}

fn principal(p: &pb::Principal, path: &str, http: bool) -> Result<Principal> {
    use pb::principal::Identifier as I;
    let set = |s: &pb::principal::Set, f: &str| -> Result<Vec<Principal>> {
        s.ids
            .iter()
            .enumerate()
            .map(|(i, r)| principal(r, &index(&join(path, f), "ids", i), http))
            .collect()
    };
    Ok(match &p.identifier {
        Some(I::Any(true)) => Principal::Any,
        Some(I::AndIds(s)) => Principal::And(set(s, "and_ids")?),
        Some(I::OrIds(s)) => Principal::Or(set(s, "or_ids")?),
        Some(I::NotId(n)) => Principal::Not(Box::new(principal(n, &join(path, "not_id"), http)?)),
        Some(I::Header(h)) if http => Principal::Header(HeaderMatcher::from_proto(h, &join(path, "header"))?),
        Some(I::UrlPath(m)) if http => Principal::UrlPath(url_path(m, &join(path, "url_path"))?),
        Some(I::Authenticated(a)) => Principal::Authenticated(
            a.principal_name
                .as_ref()
                .map(|m| StringMatcher::from_proto(m, &join(path, "authenticated.principal_name")))
                .transpose()?,
        ),
        Some(I::SourceIp(c)) => Principal::DirectRemoteIp(cidr(c, &join(path, "source_ip"))?),
        Some(I::DirectRemoteIp(c)) => {
            Principal::DirectRemoteIp(cidr(c, &join(path, "direct_remote_ip"))?)
        }
        Some(I::RemoteIp(c)) => Principal::RemoteIp(cidr(c, &join(path, "remote_ip"))?),
        Some(I::Any(false)) | None => {
            return Err(ConfigError::new(path, "a principal identifier is required"))
        }
        Some(_) => {
            return Err(ConfigError::new(
                path,
                "only any, and_ids, or_ids, not_id, authenticated, source_ip, direct_remote_ip and remote_ip apply to connections",
            ))
        }
    })
}

fn header_matches(h: &HeaderMatcher, f: &Facts) -> bool {
    f.http
        .as_ref()
        .is_some_and(|r| h.matches_with(r.headers, &r.pseudo))
}

impl Permission {
    fn matches(&self, f: &Facts) -> bool {
        match self {
            Permission::Any => true,
            Permission::And(v) => v.iter().all(|p| p.matches(f)),
            Permission::Or(v) => v.iter().any(|p| p.matches(f)),
            Permission::Not(p) => !p.matches(f),
            Permission::DestinationIp(c) => c.contains(f.local.ip()),
            Permission::DestinationPort(p) => f.local.port() == *p,
            Permission::DestinationPortRange(s, e) => (*s..*e).contains(&(f.local.port() as i32)),
            Permission::ServerName(m) => m.matches(f.sni),
            Permission::Header(h) => header_matches(h, f),
            Permission::UrlPath(m) => f.http.as_ref().is_some_and(|h| m.matches(h.path)),
        }
    }
}

impl Principal {
    fn matches(&self, f: &Facts) -> bool {
        match self {
            Principal::Any => true,
            Principal::And(v) => v.iter().all(|p| p.matches(f)),
            Principal::Or(v) => v.iter().any(|p| p.matches(f)),
            Principal::Not(p) => !p.matches(f),
            Principal::DirectRemoteIp(c) => c.contains(f.peer.ip()),
            Principal::RemoteIp(c) => c.contains(f.remote.ip()),
            Principal::Header(h) => header_matches(h, f),
            Principal::UrlPath(m) => f.http.as_ref().is_some_and(|h| m.matches(h.path)),
            Principal::Authenticated(name) => {
                let Some(der) = f.peer_cert else {
                    return false;
                };
                let Some(m) = name else {
                    return true;
                };
                // Envoy: URI SANs, then DNS SANs, then the subject.
                use crate::tls::verify::{sans, SanType};
                let all = sans(der);
                let of = |t: SanType| all.iter().filter(move |(ty, _)| *ty == t).map(|(_, v)| v);
                of(SanType::Uri)
                    .chain(of(SanType::Dns))
                    .any(|v| m.matches(v))
                    || crate::tls::verify::subject(der).is_some_and(|s| m.matches(&s))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rbac(yaml: &str) -> Rbac {
        let v = legate_proto::json::parse_yaml(yaml).unwrap();
        let m = legate_proto::json::to_dynamic(
            v,
            "envoy.extensions.filters.network.rbac.v3.RBAC",
            true,
        )
        .unwrap();
        let r: net::Rbac = m.transcode_to().unwrap();
        Rbac::from_proto(&r, "rbac").unwrap()
    }

    fn cert(uri: &str) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["dns.test".to_string()]).unwrap();
        p.subject_alt_names.push(rcgen::SanType::URI(
            rcgen::Ia5String::try_from(uri).unwrap(),
        ));
        p.self_signed(&key).unwrap().der().to_vec()
    }

    fn facts<'a>(peer: &str, cert: Option<&'a [u8]>) -> Facts<'a> {
        Facts {
            local: "10.0.0.1:443".parse().unwrap(),
            peer: peer.parse().unwrap(),
            remote: peer.parse().unwrap(),
            sni: "api.test",
            peer_cert: cert,
            http: None,
        }
    }

    #[test]
    fn allow_by_spiffe_identity_and_port() {
        let r = rbac(
            r#"{stat_prefix: t, rules: {action: ALLOW, policies: {good: {
            permissions: [{destination_port: 443}],
            principals: [{authenticated: {principal_name: {exact: "spiffe://td/good"}}}]}}}}"#,
        );
        let good = cert("spiffe://td/good");
        let bad = cert("spiffe://td/bad");
        assert_eq!(
            r.allows(&facts("10.0.0.2:1", Some(&good))),
            (true, Some("good"))
        );
        assert!(!r.allows(&facts("10.0.0.2:1", Some(&bad))).0);
        assert!(
            !r.allows(&facts("10.0.0.2:1", None)).0,
            "no certificate, no identity"
        );
        // The DNS SAN counts too, after the URI SANs.
        let r = rbac(
            r#"{stat_prefix: t, rules: {policies: {d: {permissions: [{any: true}],
            principals: [{authenticated: {principal_name: {exact: "dns.test"}}}]}}}}"#,
        );
        assert!(r.allows(&facts("10.0.0.2:1", Some(&bad))).0);
    }

    #[test]
    fn deny_by_source_and_combinators() {
        let r = rbac(
            r#"{stat_prefix: t, rules: {action: DENY, policies: {p: {
            permissions: [{not_rule: {destination_port_range: {start: 8000, end: 9000}}}],
            principals: [{or_ids: {ids: [{source_ip: {address_prefix: 192.168.0.0, prefix_len: 16}},
                                         {remote_ip: {address_prefix: 172.16.0.1, prefix_len: 32}}]}}]}}}}"#,
        );
        assert_eq!(r.allows(&facts("192.168.1.1:5", None)), (false, Some("p")));
        assert!(!r.allows(&facts("172.16.0.1:5", None)).0);
        assert_eq!(r.allows(&facts("10.9.9.9:5", None)), (true, None));
        // No rules: nothing is enforced.
        assert!(rbac("{stat_prefix: t}").allows(&facts("1.2.3.4:5", None)).0);
    }

    #[test]
    fn http_rules_read_headers_and_the_path_without_query() {
        let v = legate_proto::json::parse_yaml(
            r#"{action: ALLOW, policies: {p: {
            permissions: [{and_rules: {rules: [{header: {name: ":method", string_match: {exact: GET}}},
                                               {url_path: {path: {prefix: "/a/"}}}]}}],
            principals: [{remote_ip: {address_prefix: 192.168.0.0, prefix_len: 16}}]}}}"#,
        )
        .unwrap();
        let m = legate_proto::json::to_dynamic(v, "envoy.config.rbac.v3.RBAC", true).unwrap();
        let r: pb::Rbac = m.transcode_to().unwrap();
        assert!(
            Rules::from_proto(&r, "rules", false).is_err(),
            "not for connections"
        );
        let rules = Rules::from_proto(&r, "rules", true).unwrap();
        let headers = http::HeaderMap::new();
        let facts = |method: &'static str, path: &'static str, remote: &str| Facts {
            local: "10.0.0.1:80".parse().unwrap(),
            peer: "10.0.0.9:5".parse().unwrap(),
            remote: remote.parse().unwrap(),
            sni: "",
            peer_cert: None,
            http: Some(HttpFacts {
                headers: &headers,
                pseudo: Pseudo {
                    method,
                    path,
                    ..Default::default()
                },
                path,
            }),
        };
        assert!(rules.allows(&facts("GET", "/a/b", "192.168.1.1:0")).0);
        assert!(!rules.allows(&facts("POST", "/a/b", "192.168.1.1:0")).0);
        assert!(!rules.allows(&facts("GET", "/b", "192.168.1.1:0")).0);
        // remote_ip is the trusted client, not the peer.
        assert!(!rules.allows(&facts("GET", "/a/b", "10.0.0.9:0")).0);
    }
}
