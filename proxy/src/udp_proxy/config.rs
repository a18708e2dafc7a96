//! Translation of `UdpProxyConfig` and of a UDP listener's socket config.

use crate::config::unified_matcher::{Domain, Matcher};
use crate::config::{index, join, ConfigError, Result, Wrapped};
use legate_proto::envoy_types::pb::envoy::config::core::v3::UdpSocketConfig;
use legate_proto::envoy_types::pb::envoy::config::listener::v3::UdpListenerConfig;
use legate_proto::envoy_types::pb::envoy::extensions::filters::udp::udp_proxy::v3 as pb;
use legate_proto::envoy_types::pb::xds::core::v3::TypedExtensionConfig;
use std::sync::Arc;
use std::time::Duration;

pub const TYPE: &str = "envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig";
const ROUTE_TYPE: &str = "envoy.extensions.filters.udp.udp_proxy.v3.Route";
/// Envoy's default `max_rx_datagram_size`.
const DEFAULT_DATAGRAM: u64 = 1500;
/// With GRO (the upstream default) Envoy reads into a 64 KiB buffer, so
/// any datagram gets through whatever `max_rx_datagram_size` says.
const GRO_BUFFER: usize = 64 * 1024;

/// A UDP listener: its datagram size and its proxy, if any (Envoy drops
/// every datagram of a UDP listener without filters).
#[derive(Debug)]
pub struct UdpListener {
    /// Longest datagram read from clients; a longer one is dropped.
    pub max_datagram: usize,
    pub proxy: Option<Arc<UdpProxy>>,
}

/// `envoy.filters.udp_listener.udp_proxy`.
#[derive(Debug)]
pub struct UdpProxy {
    pub stat_prefix: String,
    /// The cluster of a new session, by the session's addresses.
    pub routes: Matcher<String>,
    /// A session ends after this long without a datagram either way
    /// (Envoy's default 60 s; 0 ends it at once).
    pub idle_timeout: Duration,
    pub hash: Option<Hash>,
    /// `use_per_packet_load_balancing`: a host for every datagram.
    pub per_packet: bool,
    /// Longest datagram read from upstream hosts; a longer one is dropped.
    pub upstream_max_datagram: usize,
    /// `access_log`: a line per session when it ends.
    pub access_log: Vec<Arc<crate::access_log::AccessLog>>,
}

/// `hash_policies`: what ring hash and Maglev clusters hash.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Hash {
    /// xxHash64 of the client's IP as text.
    SourceIp,
    /// xxHash64 of a fixed key.
    Key(u64),
}

impl UdpListener {
    pub fn from_proto(
        cfg: Option<&UdpListenerConfig>,
        proxy: Option<Arc<UdpProxy>>,
        path: &str,
    ) -> Result<Self> {
        let p = join(path, "udp_listener_config");
        if cfg.is_some_and(|c| c.quic_options.is_some()) {
            return Err(ConfigError::new(
                join(&p, "quic_options"),
                "QUIC (HTTP/3) listeners are not supported by Legate",
            ));
        }
        let sc = cfg.and_then(|c| c.downstream_socket_config.as_ref());
        let max = datagram_size(sc, &join(&p, "downstream_socket_config"))? as usize;
        // GRO is off by default on listeners.
        let gro = sc.and_then(|c| c.prefer_gro.val()).unwrap_or(false);
        if proxy.is_none() {
            tracing::warn!(
                path,
                "UDP listener has no filters; its datagrams are dropped, as in Envoy"
            );
        }
        Ok(Self {
            max_datagram: if gro { GRO_BUFFER } else { max },
            proxy,
        })
    }
}

fn datagram_size(c: Option<&UdpSocketConfig>, path: &str) -> Result<u64> {
    let size = c
        .and_then(|c| c.max_rx_datagram_size.val())
        .unwrap_or(DEFAULT_DATAGRAM);
    if !(1..65536).contains(&size) {
        return Err(ConfigError::new(
            join(path, "max_rx_datagram_size"),
            "must be in [1, 65535]",
        ));
    }
    Ok(size)
}

impl UdpProxy {
    pub fn from_proto(u: &pb::UdpProxyConfig, path: &str) -> Result<Self> {
        if u.stat_prefix.is_empty() {
            return Err(ConfigError::new(
                join(path, "stat_prefix"),
                "stat_prefix is required",
            ));
        }
        refuse_unsupported(u, path)?;
        let idle_timeout = match &u.idle_timeout {
            Some(d) => crate::config::duration(d, &join(path, "idle_timeout"))?,
            None => Duration::from_secs(60),
        };
        let up = u.upstream_socket_config.as_ref();
        let size = datagram_size(up, &join(path, "upstream_socket_config"))? as usize;
        let gro = up.and_then(|c| c.prefer_gro.val()).unwrap_or(true);
        Ok(Self {
            stat_prefix: u.stat_prefix.clone(),
            routes: routes(u, path)?,
            idle_timeout,
            hash: hash(&u.hash_policies, path)?,
            per_packet: u.use_per_packet_load_balancing,
            upstream_max_datagram: if gro { GRO_BUFFER } else { size },
            access_log: crate::access_log::list(&u.access_log, path)?,
        })
    }

    /// Clusters the routes name.
    pub fn clusters(&self) -> impl Iterator<Item = &String> {
        self.routes.actions()
    }
}

fn refuse_unsupported(u: &pb::UdpProxyConfig, path: &str) -> Result<()> {
    let refuse = |field: &str, why: &str| Err(ConfigError::new(join(path, field), why));
    if u.use_original_src_ip {
        return refuse(
            "use_original_src_ip",
            "transparent UDP proxying (IP_TRANSPARENT) is not supported by Legate",
        );
    }
    if !u.session_filters.is_empty() {
        return refuse(
            "session_filters",
            "UDP session filters are not supported by Legate",
        );
    }
    if u.tunneling_config.is_some() {
        return refuse(
            "tunneling_config",
            "UDP over HTTP tunneling is not supported by Legate",
        );
    }
    if !u.proxy_access_log.is_empty() {
        return refuse(
            "proxy_access_log",
            "the proxy-wide UDP access log is not supported by Legate",
        );
    }
    if u.access_log_options.is_some() {
        return refuse(
            "access_log_options",
            "periodic UDP session logs are not supported by Legate",
        );
    }
    Ok(())
}

fn routes(u: &pb::UdpProxyConfig, path: &str) -> Result<Matcher<String>> {
    use pb::udp_proxy_config::RouteSpecifier as R;
    match &u.route_specifier {
        Some(R::Matcher(m)) => {
            Matcher::from_proto_in(m, &join(path, "matcher"), &route_action, Domain::Udp)
        }
        Some(R::Cluster(c)) if !c.is_empty() => Ok(Matcher::always(c.clone())),
        _ => Err(ConfigError::new(
            join(path, "matcher"),
            "a route is required: matcher (or the deprecated cluster)",
        )),
    }
}

fn route_action(a: &TypedExtensionConfig, path: &str) -> Result<String> {
    let tc = join(path, "typed_config");
    let any = a
        .typed_config
        .as_ref()
        .ok_or_else(|| ConfigError::new(&tc, "typed_config is required"))?;
    let tn = legate_proto::type_name(&any.type_url);
    if tn != ROUTE_TYPE {
        return Err(ConfigError::new(
            &tc,
            format!("a UDP route's action must be {ROUTE_TYPE}, not {tn}"),
        ));
    }
    let r: pb::Route = prost::Message::decode(any.value.as_slice())
        .map_err(|e| ConfigError::new(&tc, e.to_string()))?;
    if r.cluster.is_empty() {
        return Err(ConfigError::new(
            join(&tc, "cluster"),
            "cluster is required",
        ));
    }
    Ok(r.cluster)
}

fn hash(h: &[pb::udp_proxy_config::HashPolicy], path: &str) -> Result<Option<Hash>> {
    use pb::udp_proxy_config::hash_policy::PolicySpecifier as P;
    if h.len() > 1 {
        return Err(ConfigError::new(
            join(path, "hash_policies"),
            "at most one hash policy is allowed",
        ));
    }
    Ok(match h.first().and_then(|h| h.policy_specifier.as_ref()) {
        None if h.is_empty() => None,
        Some(P::SourceIp(true)) => Some(Hash::SourceIp),
        Some(P::Key(k)) if !k.is_empty() => {
            Some(Hash::Key(xxhash_rust::xxh64::xxh64(k.as_bytes(), 0)))
        }
        _ => {
            return Err(ConfigError::new(
                index(path, "hash_policies", 0),
                "source_ip: true or a non-empty key is required",
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<UdpProxy> {
        let json = legate_proto::json::parse_yaml(yaml).unwrap();
        let msg: pb::UdpProxyConfig = legate_proto::json::to_message(json, TYPE, true).unwrap();
        UdpProxy::from_proto(&msg, "p")
    }

    #[test]
    fn envoy_gateways_route_and_defaults() {
        let u = parse(
            r#"
stat_prefix: service
matcher:
  on_no_match:
    action:
      name: route
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.Route
        cluster: udp-route-dest
"#,
        )
        .unwrap();
        assert_eq!(u.clusters().collect::<Vec<_>>(), ["udp-route-dest"]);
        assert_eq!(u.idle_timeout, Duration::from_secs(60));
        assert_eq!(u.upstream_max_datagram, 64 * 1024);
        assert_eq!(u.hash, None);
    }

    #[test]
    fn refusals_name_the_field() {
        let cases = [
            ("stat_prefix: s", "p.matcher"),
            ("{stat_prefix: s, cluster: c, use_original_src_ip: true}", "p.use_original_src_ip"),
            (
                "{stat_prefix: s, cluster: c, hash_policies: [{source_ip: true}, {key: k}]}",
                "p.hash_policies",
            ),
            ("{stat_prefix: s, cluster: c, hash_policies: [{key: ''}]}", "p.hash_policies[0]"),
            (
                "{stat_prefix: s, cluster: c, upstream_socket_config: {max_rx_datagram_size: 70000}}",
                "p.upstream_socket_config.max_rx_datagram_size",
            ),
            (
                r#"{stat_prefix: s, matcher: {matcher_list: {matchers: [{predicate: {single_predicate: {input: {name: h, typed_config: {"@type": type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput, header_name: x}}, value_match: {exact: a}}}, on_match: {action: {name: r, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.Route, cluster: c}}}}]}}}"#,
                "p.matcher.matcher_list.matchers[0].predicate.single_predicate.input.typed_config",
            ),
        ];
        for (yaml, path) in cases {
            let e = parse(yaml).expect_err(yaml);
            assert_eq!(e.path, path, "{yaml}: {e}");
        }
    }

    #[test]
    fn a_key_hash_is_computed_once() {
        let u =
            parse("{stat_prefix: s, cluster: c, hash_policies: [{key: abc}], idle_timeout: 0s}")
                .unwrap();
        assert_eq!(
            u.hash,
            Some(Hash::Key(xxhash_rust::xxh64::xxh64(b"abc", 0)))
        );
        assert_eq!(
            u.idle_timeout,
            Duration::ZERO,
            "0 is not 'disabled' in Envoy's UDP proxy"
        );
    }
}
