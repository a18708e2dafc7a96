//! Clusters: discovery type, endpoints, load-balancing policy and upstream
//! protocol options.

use super::{duration, host_port, index, join, ConfigError, Result, Wrapped};
use crate::lb::LbPolicy;
use legate_proto::envoy_types::pb::envoy::config::cluster::v3 as pb;
use legate_proto::envoy_types::pb::envoy::config::core::v3 as core;
use legate_proto::envoy_types::pb::envoy::config::endpoint::v3 as ep;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Discovery {
    Static,
    StrictDns,
    LogicalDns,
    /// Endpoints from EDS.
    Eds,
    /// ORIGINAL_DST: no configured hosts; each request or connection goes
    /// to its downstream connection's original destination.
    OriginalDst,
}

impl ClusterConfig {
    /// Whether a request in `version` goes upstream over HTTP/2 (not
    /// knowable here for `auto_config`, whose ALPN decides: false).
    pub fn h2_for(&self, version: http::Version) -> bool {
        match self.protocol {
            UpstreamProtocol::Http2 => true,
            UpstreamProtocol::Downstream => version == http::Version::HTTP_2,
            UpstreamProtocol::Http1 | UpstreamProtocol::Auto => false,
        }
    }
}

/// An ORIGINAL_DST cluster's `original_dst_lb_config`.
#[derive(Debug, Clone, PartialEq)]
pub struct OriginalDstConfig {
    /// `use_http_header`: the header whose `ip:port` overrides the
    /// destination (`http_header_name`, else `x-envoy-original-dst-host`).
    pub header: Option<http::HeaderName>,
    /// `upstream_port_override`: the port used whatever the destination's.
    pub port_override: Option<u16>,
}

impl OriginalDstConfig {
    fn from_proto(c: &pb::Cluster, path: &str) -> Result<Self> {
        let lb = match &c.lb_config {
            Some(pb::cluster::LbConfig::OriginalDstLbConfig(o)) => o.clone(),
            _ => Default::default(),
        };
        let lp = join(path, "original_dst_lb_config");
        if lb.metadata_key.is_some() {
            return Err(ConfigError::new(join(&lp, "metadata_key"), "not supported"));
        }
        let header = if lb.use_http_header {
            let name = if lb.http_header_name.is_empty() {
                "x-envoy-original-dst-host"
            } else {
                lb.http_header_name.as_str()
            };
            Some(http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                ConfigError::new(join(&lp, "http_header_name"), "not a valid header name")
            })?)
        } else {
            None
        };
        let port_override = match lb.upstream_port_override.val() {
            None => None,
            Some(p) => Some(u16::try_from(p).ok().filter(|p| *p > 0).ok_or_else(|| {
                ConfigError::new(
                    join(&lp, "upstream_port_override"),
                    "must be a port (1-65535)",
                )
            })?),
        };
        Ok(Self {
            header,
            port_override,
        })
    }

    /// The destination of a request: the header's `ip:port` when the
    /// cluster reads one and the request has it (the first value), else
    /// the connection's restored destination. The flag: the header was
    /// there but not an address (Envoy counts it and falls back).
    pub fn destination(
        &self,
        headers: Option<&http::HeaderMap>,
        restored: Option<SocketAddr>,
    ) -> (Option<SocketAddr>, bool) {
        let value = match (&self.header, headers) {
            (Some(name), Some(h)) => h.get(name),
            _ => None,
        };
        let from_header = value.and_then(|v| v.to_str().ok()?.trim().parse::<SocketAddr>().ok());
        let invalid = value.is_some() && from_header.is_none();
        let dst = from_header.or(restored).map(|mut a| {
            if let Some(p) = self.port_override {
                a.set_port(p);
            }
            a
        });
        (dst, invalid)
    }
}

/// `upstream_bind_config`: the source addresses of upstream connections
/// (port 0: any), one per IP family: `source_address`, and with
/// `extra_source_addresses` (what istiod sends a dual-stack sidecar) one of
/// the other family. A connection binds the one of its upstream's family,
/// else `source_address`, as Envoy's default address selector does.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Bind {
    pub source: Option<SocketAddr>,
    /// An extra source of the other family.
    pub other: Option<SocketAddr>,
}

impl Bind {
    pub const NONE: Bind = Bind {
        source: None,
        other: None,
    };

    /// The source address for a connection to `peer`.
    pub fn for_peer(&self, peer: SocketAddr) -> Option<SocketAddr> {
        let source = self.source?;
        match self.other {
            Some(o) if source.is_ipv4() != peer.is_ipv4() && o.is_ipv4() == peer.is_ipv4() => {
                Some(o)
            }
            _ => Some(source),
        }
    }

    pub fn is_set(&self) -> bool {
        self.source.is_some()
    }
}

fn upstream_bind(c: &pb::Cluster, path: &str) -> Result<Bind> {
    let Some(b) = &c.upstream_bind_config else {
        return Ok(Bind::NONE);
    };
    let bp = join(path, "upstream_bind_config");
    let unsupported = [
        (b.freebind.as_ref().is_some_and(|f| f.value), "freebind"),
        (!b.socket_options.is_empty(), "socket_options"),
        (
            !b.additional_source_addresses.is_empty(),
            "additional_source_addresses",
        ),
        (b.local_address_selector.is_some(), "local_address_selector"),
    ];
    if let Some((_, f)) = unsupported.iter().find(|(set, _)| *set) {
        return Err(ConfigError::new(join(&bp, f), "not supported"));
    }
    let Some(sa) = &b.source_address else {
        return Err(ConfigError::new(join(&bp, "source_address"), "is required"));
    };
    let source = source_address(sa, &join(&bp, "source_address"))?;
    let mut other = None;
    for (i, extra) in b.extra_source_addresses.iter().enumerate() {
        let p = index(&bp, "extra_source_addresses", i);
        if extra.socket_options.is_some() {
            return Err(ConfigError::new(
                join(&p, "socket_options"),
                "not supported",
            ));
        }
        let a = extra
            .address
            .as_ref()
            .ok_or_else(|| ConfigError::new(join(&p, "address"), "is required"))?;
        let a = source_address(a, &join(&p, "address"))?;
        // Envoy: one extra address, of the other family.
        if a.is_ipv4() == source.is_ipv4() || other.is_some() {
            return Err(ConfigError::new(
                p,
                "must be of the other IP family than source_address, and only one",
            ));
        }
        other = Some(a);
    }
    Ok(Bind {
        source: Some(source),
        other,
    })
}

fn source_address(sa: &core::SocketAddress, sp: &str) -> Result<SocketAddr> {
    let ip: std::net::IpAddr = sa.address.parse().map_err(|_| {
        ConfigError::new(
            join(sp, "address"),
            format!("'{}' is not an IP address", sa.address),
        )
    })?;
    let port = match sa.port_specifier {
        Some(core::socket_address::PortSpecifier::PortValue(p)) => u16::try_from(p)
            .map_err(|_| ConfigError::new(join(sp, "port_value"), "must be a port"))?,
        Some(_) => return Err(ConfigError::new(join(sp, "named_port"), "not supported")),
        None => 0,
    };
    Ok(SocketAddr::new(ip, port))
}

/// Where an EDS cluster's endpoints come from.
#[derive(Debug, Clone, PartialEq)]
pub struct EdsConfig {
    /// The ClusterLoadAssignment name: `service_name`, else the cluster's.
    pub service_name: String,
    pub source: super::source::XdsSource,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DnsFamily {
    Auto,
    V4Only,
    V6Only,
    V4Preferred,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UpstreamProtocol {
    Http1,
    Http2,
    /// `auto_config`: over TLS, what ALPN (offering h2 and http/1.1)
    /// picks; in plaintext, HTTP/1.1.
    Auto,
    /// `use_downstream_protocol_config`: each request goes upstream in the
    /// HTTP version it came in (HTTP/1.0 as HTTP/1.1), plaintext only.
    Downstream,
}

/// One configured endpoint: a host name or IP literal, before resolution.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EndpointConfig {
    pub host: String,
    pub port: u16,
    pub weight: u32,
    pub healthy: bool,
    /// DEGRADED: used only when healthy hosts cannot take all the load.
    pub degraded: bool,
    pub hostname: String,
    /// `filter_metadata["envoy.lb"]["hash_key"]`: the key ring hash and
    /// Maglev hash instead of the address, as in Envoy.
    pub hash_key: Option<String>,
    /// A Unix socket (`pipe`) endpoint: STATIC clusters only, and only to
    /// reach management servers (the data plane proxies over TCP).
    pub pipe: Option<String>,
    /// `filter_metadata["envoy.transport_socket_match"]` of the endpoint:
    /// what `transport_socket_matches` look at.
    pub socket_match: serde_json::Map<String, serde_json::Value>,
    /// Its locality's `load_balancing_weight` (0 when unset).
    pub locality_weight: u32,
    /// `health_check_config`: the port and host name active checks use
    /// instead of the endpoint's.
    pub hc_port: Option<u16>,
    pub hc_hostname: String,
    /// `filter_metadata.istio.workload`: who the endpoint is, for
    /// `istio.stats` when the peer does not say.
    pub istio_workload: Option<Arc<str>>,
}

/// One `transport_socket_matches` entry.
#[derive(Debug)]
pub struct TransportMatch {
    pub name: String,
    /// Every key must be in the endpoint's metadata with an equal value.
    pub criteria: serde_json::Map<String, serde_json::Value>,
    /// None: plaintext (`raw_buffer`).
    pub tls: Option<Arc<super::tls::ClientTls>>,
}

#[derive(Debug, Clone)]
pub struct LocalityConfig {
    pub priority: u32,
    pub weight: u32,
    pub endpoints: Vec<EndpointConfig>,
}

/// The limits on an upstream response's head (the cluster's
/// `common_http_protocol_options`): Envoy's defaults are 100 headers and
/// 60 KiB (80 KiB for HTTP/1 responses), and a response over either is a
/// protocol error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHeaderLimits {
    pub max_count: usize,
    /// `max_response_headers_kb`; None: the protocol's default.
    pub max_bytes: Option<usize>,
}

impl Default for ResponseHeaderLimits {
    fn default() -> Self {
        Self {
            max_count: 100,
            max_bytes: None,
        }
    }
}

impl ResponseHeaderLimits {
    fn from_proto(common: &core::HttpProtocolOptions, path: &str) -> Result<Self> {
        let mut l = Self::default();
        if let Some(n) = common.max_headers_count.val() {
            if n < 1 {
                return Err(ConfigError::new(
                    join(path, "max_headers_count"),
                    "must be at least 1",
                ));
            }
            if n > 256 {
                // pingora's HTTP/1 parser stops at 256 headers.
                return Err(ConfigError::new(
                    join(path, "max_headers_count"),
                    "values above 256 are not supported (pingora's HTTP/1 limit)",
                ));
            }
            l.max_count = n as usize;
        }
        if let Some(kb) = common.max_response_headers_kb.val() {
            // Envoy's range: (0, 8192].
            if kb == 0 || kb > 8192 {
                return Err(ConfigError::new(
                    join(path, "max_response_headers_kb"),
                    "must be between 1 and 8192",
                ));
            }
            if kb > 1023 {
                // pingora's HTTP/1 client reads at most 1 MiB of head.
                return Err(ConfigError::new(
                    join(path, "max_response_headers_kb"),
                    "values above 1023 are not supported (pingora's HTTP/1 limit)",
                ));
            }
            l.max_bytes = Some(kb as usize * 1024);
        }
        Ok(l)
    }

    /// Whether a response head is over the limits: its header count, or
    /// its names and values together.
    pub fn exceeded_by(&self, version: http::Version, h: &http::HeaderMap) -> bool {
        let default_kb = if version <= http::Version::HTTP_11 {
            80
        } else {
            60
        };
        let max_bytes = self.max_bytes.unwrap_or(default_kb * 1024);
        let bytes: usize = h.iter().map(|(k, v)| k.as_str().len() + v.len()).sum();
        h.len() > self.max_count || bytes > max_bytes
    }
}

#[derive(Debug)]
pub struct ClusterConfig {
    pub name: String,
    pub discovery: Discovery,
    pub connect_timeout: Duration,
    pub lb: LbPolicy,
    pub localities: Vec<LocalityConfig>,
    pub overprovisioning_factor: u32,
    pub dns_family: DnsFamily,
    pub dns_refresh: Duration,
    /// DnsCluster `dns_jitter`: each re-resolution waits a random part of
    /// it more, as Envoy's.
    pub dns_jitter: Duration,
    /// How DNS names resolve (`respect_dns_ttl`, resolvers).
    pub dns: DnsSettings,
    pub protocol: UpstreamProtocol,
    pub upstream_idle_timeout: Option<Duration>,
    /// How large an upstream's response head may be before it is a
    /// protocol error (502 `UPE`).
    pub response_headers: ResponseHeaderLimits,
    /// HTTP/1 `header_key_format`: how responses read from this cluster
    /// reach the client (preserve_case), and how requests without
    /// spellings of their own are written to it (proper_case_words).
    pub header_case: crate::header_case::HeaderCase,
    /// ORIGINAL_DST: where the destination comes from.
    pub original_dst: Option<OriginalDstConfig>,
    /// `upstream_bind_config`: the source address by upstream family.
    pub bind: Bind,
    /// `max_requests_per_connection` (HTTP/1 upstreams): the connection's
    /// last request asks the upstream to close it.
    pub max_requests_per_connection: Option<u32>,
    /// `common_http_protocol_options.max_connection_duration`: no pooled
    /// connection is used once this long has passed since it was made.
    pub max_connection_duration: Option<Duration>,
    /// `common_http_protocol_options.max_stream_duration`: each attempt's
    /// whole life, after which it is reset (flag `UMSDR`).
    pub max_stream_duration: Option<Duration>,
    pub max_concurrent_streams: u32,
    /// `HttpProtocolOptions.hash_policy`: when set, it replaces the route's
    /// hash policy for requests to this cluster.
    pub hash_policy: Vec<super::route::HashPolicy>,
    pub eds: Option<EdsConfig>,
    /// TLS origination (`transport_socket` with an `UpstreamTlsContext`).
    pub tls: Option<Arc<super::tls::ClientTls>>,
    /// `transport_socket_matches`, tried in order per endpoint before
    /// falling back to `tls`.
    pub tls_matches: Vec<TransportMatch>,
    pub circuit_breakers: super::circuit_breakers::CircuitBreakers,
    /// `common_lb_config.healthy_panic_threshold`, in percent.
    pub panic_threshold: u32,
    /// Localities are picked by weight first, then a host within one.
    pub locality_weighted: bool,
    /// `upstream_connection_options.tcp_keepalive`: keep-alive probes on
    /// every upstream socket.
    pub tcp_keepalive: Option<TcpKeepalive>,
    pub outlier: Option<super::outlier::OutlierConfig>,
    /// `health_checks` (at most one).
    pub health_check: Option<super::health_check::HealthCheckConfig>,
    /// What Istio's extensions read from `metadata.filter_metadata.istio`.
    pub istio: crate::istio::ClusterFacts,
    /// `filters`: Istio's metadata exchange on upstream connections (the
    /// only upstream network filter Legate has).
    pub exchange: Option<Arc<crate::istio::exchange::Exchange>>,
}

/// TCP keep-alive for upstream sockets; Envoy leaves unset values to the
/// system, whose values are read here so all three can be set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TcpKeepalive {
    pub idle: Duration,
    pub interval: Duration,
    pub probes: u32,
}

impl TcpKeepalive {
    fn from_proto(k: &core::TcpKeepalive) -> Self {
        let system = |name: &str, default: u64| {
            std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(default)
        };
        Self {
            idle: Duration::from_secs(
                k.keepalive_time
                    .val()
                    .map_or_else(|| system("tcp_keepalive_time", 7200), u64::from),
            ),
            interval: Duration::from_secs(
                k.keepalive_interval
                    .val()
                    .map_or_else(|| system("tcp_keepalive_intvl", 75), u64::from),
            ),
            probes: k
                .keepalive_probes
                .val()
                .unwrap_or_else(|| system("tcp_keepalive_probes", 9) as u32),
        }
    }

    /// Sets SO_KEEPALIVE and the three values on a socket.
    pub fn apply(&self, s: &tokio::net::TcpStream) -> std::io::Result<()> {
        let k = socket2::TcpKeepalive::new()
            .with_time(self.idle)
            .with_interval(self.interval)
            .with_retries(self.probes);
        socket2::SockRef::from(s).set_tcp_keepalive(&k)
    }
}

impl ClusterConfig {
    /// How its host snapshots spread load beyond the policy.
    pub fn spread(&self) -> crate::cluster_manager::Spread {
        crate::cluster_manager::Spread {
            panic_threshold: self.panic_threshold,
            locality_weighted: self.locality_weighted,
        }
    }

    /// Whether any endpoint is a Unix socket: such a cluster can reach a
    /// management server but carries no proxied traffic.
    /// The SDS secrets the cluster's TLS uses.
    pub fn sds_refs(&self) -> Vec<(String, super::source::XdsSource)> {
        self.tls
            .iter()
            .chain(self.tls_matches.iter().filter_map(|m| m.tls.as_ref()))
            .flat_map(|t| t.sds.iter().cloned())
            .collect()
    }

    /// Whether any endpoint may be reached over TLS.
    pub fn originates_tls(&self) -> bool {
        self.tls.is_some() || self.tls_matches.iter().any(|m| m.tls.is_some())
    }

    /// An endpoint's transport socket: the first `transport_socket_matches`
    /// entry its metadata satisfies, else the cluster's `transport_socket`.
    pub fn tls_for(&self, e: &EndpointConfig) -> Option<Arc<super::tls::ClientTls>> {
        match self.tls_matches.iter().find(|m| {
            m.criteria
                .iter()
                .all(|(k, v)| e.socket_match.get(k) == Some(v))
        }) {
            Some(m) => m.tls.clone(),
            None => self.tls.clone(),
        }
    }

    pub fn has_pipe(&self) -> bool {
        self.localities
            .iter()
            .flat_map(|l| l.endpoints.iter())
            .any(|e| e.pipe.is_some())
    }

    pub fn from_proto(c: &pb::Cluster, path: &str) -> Result<Self> {
        use pb::cluster::{ClusterDiscoveryType, DiscoveryType as D};
        if c.name.is_empty() {
            return Err(ConfigError::new(
                join(path, "name"),
                "cluster name is required",
            ));
        }
        let mut dns_cluster = None;
        let discovery = match &c.cluster_discovery_type {
            None => Discovery::Static,
            Some(ClusterDiscoveryType::Type(t)) => match D::try_from(*t) {
                Ok(D::Static) => Discovery::Static,
                Ok(D::StrictDns) => Discovery::StrictDns,
                Ok(D::LogicalDns) => Discovery::LogicalDns,
                Ok(D::Eds) => Discovery::Eds,
                Ok(D::OriginalDst) => Discovery::OriginalDst,
                Err(_) => return Err(ConfigError::new(join(path, "type"), "unknown type")),
            },
            Some(ClusterDiscoveryType::ClusterType(t)) => {
                dns_cluster = Some(DnsClusterConfig::from_proto(
                    t,
                    &join(path, "cluster_type"),
                )?);
                dns_cluster
                    .as_ref()
                    .map_or(Discovery::StrictDns, |d| d.discovery)
            }
        };
        let original_dst = original_dst(c, discovery, path)?;
        let (lb, locality_weighted) = if original_dst.is_some() {
            (LbPolicy::RoundRobin, false)
        } else {
            lb_policy(c, path)?
        };
        let panic_threshold = panic_threshold(c, path)?;
        let bind = upstream_bind(c, path)?;
        let (localities, overprovisioning_factor) = match &c.load_assignment {
            Some(_) if discovery == Discovery::Eds => {
                return Err(ConfigError::new(
                    join(path, "load_assignment"),
                    "EDS clusters take their endpoints from EDS",
                ))
            }
            Some(la) => load_assignment(la, &join(path, "load_assignment"), discovery)?,
            None => (Vec::new(), 140),
        };
        let eds = match (&c.eds_cluster_config, discovery) {
            (Some(e), Discovery::Eds) => {
                let p = join(path, "eds_cluster_config");
                let source = e.eds_config.as_ref().ok_or_else(|| {
                    ConfigError::new(join(&p, "eds_config"), "eds_config is required")
                })?;
                Some(EdsConfig {
                    service_name: if e.service_name.is_empty() {
                        c.name.clone()
                    } else {
                        e.service_name.clone()
                    },
                    source: super::source::XdsSource::from_proto(source, &join(&p, "eds_config"))?,
                })
            }
            (None, Discovery::Eds) => {
                return Err(ConfigError::new(
                    join(path, "eds_cluster_config"),
                    "EDS clusters need eds_cluster_config",
                ))
            }
            (Some(_), _) => {
                return Err(ConfigError::new(
                    join(path, "eds_cluster_config"),
                    "only EDS clusters take eds_cluster_config",
                ))
            }
            (None, _) => None,
        };
        if discovery == Discovery::LogicalDns {
            let n: usize = localities.iter().map(|l| l.endpoints.len()).sum();
            if n != 1 {
                return Err(ConfigError::new(
                    join(path, "load_assignment"),
                    "LOGICAL_DNS clusters must have exactly one endpoint",
                ));
            }
        }
        use pb::cluster::DnsLookupFamily as F;
        let dns_family = match F::try_from(c.dns_lookup_family).unwrap_or(F::Auto) {
            F::Auto => DnsFamily::Auto,
            F::V4Only => DnsFamily::V4Only,
            F::V6Only => DnsFamily::V6Only,
            F::V4Preferred => DnsFamily::V4Preferred,
            F::All => DnsFamily::All,
        };
        // A DnsCluster's own fields replace the Cluster's, as in Envoy.
        let dns_family = dns_cluster.as_ref().map_or(dns_family, |d| d.family);
        let mut protocol = if c.http2_protocol_options.is_some() {
            UpstreamProtocol::Http2
        } else {
            UpstreamProtocol::Http1
        };
        if let Some(h2) = &c.http2_protocol_options {
            upstream_h2(h2, &join(path, "http2_protocol_options"))?;
        }
        let mut upstream_idle_timeout = Some(Duration::from_secs(3600));
        let mut max_connection_duration = None;
        let mut max_stream_duration = None;
        let mut response_headers = ResponseHeaderLimits::default();
        let mut header_case = crate::header_case::HeaderCase::Lower;
        // The deprecated Cluster field, overridden by the protocol options.
        #[allow(deprecated)]
        let mut max_requests = c
            .max_requests_per_connection
            .val()
            .map(|m| (m, join(path, "max_requests_per_connection")));
        let mut max_concurrent_streams = c
            .http2_protocol_options
            .as_ref()
            .and_then(|h| h.max_concurrent_streams.val())
            .unwrap_or(2147483647);
        let mut auto_sni = super::tls::AutoSni::default();
        let mut hash_policy = Vec::new();
        for (key, any) in &c.typed_extension_protocol_options {
            let p = format!(
                "{}[{key:?}]",
                join(path, "typed_extension_protocol_options")
            );
            let tn = legate_proto::type_name(&any.type_url);
            if tn != HTTP_PROTOCOL_OPTIONS {
                return Err(ConfigError::new(
                    p,
                    format!("protocol options {tn} are not supported"),
                ));
            }
            use legate_proto::envoy_types::pb::envoy::extensions::upstreams::http::v3 as up;
            let o: up::HttpProtocolOptions = prost::Message::decode(any.value.as_slice())
                .map_err(|e| ConfigError::new(&p, e.to_string()))?;
            hash_policy = super::route::hash_policies(&o.hash_policy, &p)?;
            use up::http_protocol_options::{
                explicit_http_config::ProtocolConfig, UpstreamProtocolOptions as U,
            };
            if let Some(u) = &o.upstream_http_protocol_options {
                let up = join(&p, "upstream_http_protocol_options");
                auto_sni = super::tls::AutoSni {
                    auto_sni: u.auto_sni,
                    auto_san_validation: u.auto_san_validation,
                    header: (!u.override_auto_sni_header.is_empty())
                        .then(|| {
                            crate::headers::header_name(
                                &u.override_auto_sni_header,
                                &join(&up, "override_auto_sni_header"),
                            )
                        })
                        .transpose()?,
                };
            }
            match &o.upstream_protocol_options {
                Some(U::ExplicitHttpConfig(e)) => match &e.protocol_config {
                    Some(ProtocolConfig::HttpProtocolOptions(h1)) => {
                        protocol = UpstreamProtocol::Http1;
                        header_case = crate::header_case::HeaderCase::from_proto(
                            Some(h1),
                            &join(&p, "explicit_http_config.http_protocol_options"),
                            true,
                        )?;
                    }
                    Some(ProtocolConfig::Http2ProtocolOptions(h2)) => {
                        protocol = UpstreamProtocol::Http2;
                        upstream_h2(h2, &join(&p, "explicit_http_config.http2_protocol_options"))?;
                        if let Some(m) = h2.max_concurrent_streams.val() {
                            max_concurrent_streams = m;
                        }
                    }
                    _ => {
                        return Err(ConfigError::new(
                            join(&p, "explicit_http_config"),
                            "HTTP/3 upstreams are not supported",
                        ))
                    }
                },
                Some(U::UseDownstreamProtocolConfig(d)) => {
                    if d.http3_protocol_options.is_some() {
                        return Err(ConfigError::new(
                            join(&p, "use_downstream_protocol_config.http3_protocol_options"),
                            "HTTP/3 upstreams are not supported",
                        ));
                    }
                    protocol = UpstreamProtocol::Downstream;
                    header_case = crate::header_case::HeaderCase::from_proto(
                        d.http_protocol_options.as_ref(),
                        &join(&p, "use_downstream_protocol_config.http_protocol_options"),
                        true,
                    )?;
                    if let Some(h2) = &d.http2_protocol_options {
                        upstream_h2(
                            h2,
                            &join(&p, "use_downstream_protocol_config.http2_protocol_options"),
                        )?;
                        if let Some(m) = h2.max_concurrent_streams.val() {
                            max_concurrent_streams = m;
                        }
                    }
                }
                Some(U::AutoConfig(a)) => {
                    if a.http3_protocol_options.is_some() {
                        return Err(ConfigError::new(
                            join(&p, "auto_config.http3_protocol_options"),
                            "HTTP/3 upstreams are not supported",
                        ));
                    }
                    protocol = UpstreamProtocol::Auto;
                    header_case = crate::header_case::HeaderCase::from_proto(
                        a.http_protocol_options.as_ref(),
                        &join(&p, "auto_config.http_protocol_options"),
                        true,
                    )?;
                    if let Some(h2) = &a.http2_protocol_options {
                        upstream_h2(h2, &join(&p, "auto_config.http2_protocol_options"))?;
                        if let Some(m) = h2.max_concurrent_streams.val() {
                            max_concurrent_streams = m;
                        }
                    }
                }
                None => {}
            }
            if let Some(common) = &o.common_http_protocol_options {
                let cp = join(&p, "common_http_protocol_options");
                if common.headers_with_underscores_action != 0 {
                    return Err(ConfigError::new(
                        cp,
                        "headers_with_underscores_action is a connection manager's setting; Legate does not apply it to upstream responses",
                    ));
                }
                response_headers = ResponseHeaderLimits::from_proto(common, &cp)?;
                if let Some(m) = common.max_requests_per_connection.val() {
                    max_requests = Some((
                        m,
                        join(
                            &p,
                            "common_http_protocol_options.max_requests_per_connection",
                        ),
                    ));
                }
                if let Some(t) = &common.max_stream_duration {
                    let d = duration(
                        t,
                        &join(&p, "common_http_protocol_options.max_stream_duration"),
                    )?;
                    max_stream_duration = (!d.is_zero()).then_some(d);
                }
                if let Some(t) = &common.max_connection_duration {
                    let d = duration(
                        t,
                        &join(&p, "common_http_protocol_options.max_connection_duration"),
                    )?;
                    max_connection_duration = (!d.is_zero()).then_some(d);
                }
                if let Some(t) = &common.idle_timeout {
                    let d = duration(t, &join(&p, "common_http_protocol_options.idle_timeout"))?;
                    upstream_idle_timeout = (!d.is_zero()).then_some(d);
                }
            }
        }
        let connect_timeout = match &c.connect_timeout {
            Some(d) => duration(d, &join(path, "connect_timeout"))?,
            None => Duration::from_secs(5),
        };
        if connect_timeout.is_zero() {
            return Err(ConfigError::new(
                join(path, "connect_timeout"),
                "must be greater than zero",
            ));
        }
        let dns_refresh = match (&dns_cluster, &c.dns_refresh_rate) {
            (Some(d), _) => d.refresh,
            (None, Some(d)) => duration(d, &join(path, "dns_refresh_rate"))?,
            (None, None) => Duration::from_secs(5),
        };
        let built = Self {
            istio: crate::istio::ClusterFacts::from_metadata(c.metadata.as_ref()),
            exchange: upstream_filters(&c.filters, path)?,
            circuit_breakers: super::circuit_breakers::CircuitBreakers::from_proto(
                c.circuit_breakers.as_ref(),
                &join(path, "circuit_breakers"),
            )?,
            panic_threshold,
            locality_weighted,
            health_check: health_check(c, path)?,
            outlier: c
                .outlier_detection
                .as_ref()
                .map(|o| {
                    super::outlier::OutlierConfig::from_proto(o, &join(path, "outlier_detection"))
                })
                .transpose()?,
            tcp_keepalive: c
                .upstream_connection_options
                .as_ref()
                .and_then(|o| o.tcp_keepalive.as_ref())
                .map(TcpKeepalive::from_proto),
            name: c.name.clone(),
            discovery,
            connect_timeout,
            lb,
            localities,
            overprovisioning_factor,
            dns_family,
            dns_refresh,
            dns_jitter: dns_cluster.as_ref().map_or(Duration::ZERO, |d| d.jitter),
            dns: match &dns_cluster {
                Some(d) => d.dns.clone(),
                None => DnsSettings {
                    respect_ttl: c.respect_dns_ttl,
                    min_refresh: Duration::ZERO,
                    resolvers: dns_resolvers(
                        c.typed_dns_resolver_config.as_ref(),
                        &join(path, "typed_dns_resolver_config"),
                    )?,
                },
            },
            protocol,
            upstream_idle_timeout,
            response_headers,
            header_case,
            original_dst,
            bind,
            max_requests_per_connection: match max_requests {
                Some((0, _)) | None => None,
                // pingora pools HTTP/2 connections by concurrent streams
                // and cannot retire one after N; one request per
                // connection (pilot-agent's xDS cluster) is not pooling.
                Some((m, p)) if protocol == UpstreamProtocol::Http2 && m > 1 => {
                    return Err(ConfigError::new(
                        p,
                        "not supported for HTTP/2 upstreams above 1",
                    ))
                }
                Some((m, _)) => Some(m),
            },
            max_connection_duration,
            max_stream_duration,
            max_concurrent_streams,
            hash_policy,
            eds,
            tls: match &c.transport_socket {
                Some(ts) => {
                    super::tls::upstream(ts, &join(path, "transport_socket"), protocol, &auto_sni)?
                }
                None => None,
            },
            tls_matches: c
                .transport_socket_matches
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let p = index(path, "transport_socket_matches", i);
                    let ts = m.transport_socket.as_ref().ok_or_else(|| {
                        ConfigError::new(
                            join(&p, "transport_socket"),
                            "transport_socket is required",
                        )
                    })?;
                    Ok(TransportMatch {
                        name: m.name.clone(),
                        criteria: match m.r#match.as_ref().map(crate::bootstrap::struct_to_json) {
                            Some(serde_json::Value::Object(o)) => o,
                            _ => serde_json::Map::new(),
                        },
                        tls: super::tls::upstream(
                            ts,
                            &join(&p, "transport_socket"),
                            protocol,
                            &auto_sni,
                        )?,
                    })
                })
                .collect::<Result<_>>()?,
        };
        built.check_auto_config(path)?;
        Ok(built)
    }

    /// `auto_config` needs ALPN: every transport socket of the cluster
    /// must be TLS, as Envoy requires.
    fn check_auto_config(&self, path: &str) -> Result<()> {
        let plaintext = self.tls.is_none() || self.tls_matches.iter().any(|m| m.tls.is_none());

        if self.protocol == UpstreamProtocol::Auto && plaintext {
            return Err(ConfigError::new(
                join(path, "typed_extension_protocol_options"),
                format!(
                    "ALPN configured for cluster {} which has a non-ALPN transport socket",
                    self.name
                ),
            ));
        }
        Ok(())
    }
}

/// `health_checks`: one active checker. Hosts that service discovery
/// drops go at once in Legate, so a discovered cluster must say so with
/// `ignore_health_on_host_removal` (Envoy would otherwise keep a dropped
/// host until it fails its checks).
fn health_check(
    c: &pb::Cluster,
    path: &str,
) -> Result<Option<super::health_check::HealthCheckConfig>> {
    let p = join(path, "health_checks");
    match c.health_checks.as_slice() {
        [] => Ok(None),
        [h] => {
            let static_hosts = c.cluster_discovery_type
                == Some(pb::cluster::ClusterDiscoveryType::Type(
                    pb::cluster::DiscoveryType::Static as i32,
                ))
                || c.cluster_discovery_type.is_none();
            if !static_hosts && !c.ignore_health_on_host_removal {
                return Err(ConfigError::new(
                    join(path, "ignore_health_on_host_removal"),
                    "health_checks on a cluster whose hosts change need ignore_health_on_host_removal: true (Legate removes a dropped host at once)",
                ));
            }
            super::health_check::HealthCheckConfig::from_proto(h, &format!("{p}[0]")).map(Some)
        }
        _ => Err(ConfigError::new(
            format!("{p}[1]"),
            "Legate runs one health checker per cluster",
        )),
    }
}

/// How a DNS cluster's names resolve.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DnsSettings {
    /// `respect_dns_ttl`: re-resolve when the answer's TTL runs out (not
    /// before `min_refresh`) rather than every `dns_refresh_rate`.
    pub respect_ttl: bool,
    pub min_refresh: Duration,
    /// The c-ares resolver config's `resolvers`: ask these name servers
    /// instead of the system's.
    pub resolvers: Vec<std::net::SocketAddr>,
}

impl DnsSettings {
    /// Whether the system resolver (which gives no TTLs and knows only the
    /// system's name servers) will not do.
    pub fn needs_dns_client(&self) -> bool {
        self.respect_ttl || !self.resolvers.is_empty()
    }
}

/// `typed_dns_resolver_config`: the c-ares resolver's name servers.
fn dns_resolvers(
    t: Option<&legate_proto::envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig>,
    path: &str,
) -> Result<Vec<std::net::SocketAddr>> {
    let Some(t) = t else { return Ok(Vec::new()) };
    use legate_proto::envoy_types::pb::envoy::extensions::network::dns_resolver::cares::v3::CaresDnsResolverConfig;
    const CARES: &str = "envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig";
    let tc = join(path, "typed_config");
    let any = t
        .typed_config
        .as_ref()
        .filter(|a| legate_proto::type_name(&a.type_url) == CARES)
        .ok_or_else(|| ConfigError::new(&tc, "only the c-ares resolver config is supported"))?;
    let c: CaresDnsResolverConfig = prost::Message::decode(any.value.as_slice())
        .map_err(|e| ConfigError::new(&tc, e.to_string()))?;
    if c.use_resolvers_as_fallback {
        return Err(ConfigError::new(
            join(&tc, "use_resolvers_as_fallback"),
            "falling back to the system's name servers is not supported",
        ));
    }
    c.resolvers
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let p = format!("{}[{i}]", join(&tc, "resolvers"));
            super::socket_addr(a, &p)
        })
        .collect()
}

/// The `envoy.cluster.dns` extension (`cluster_type` with a DnsCluster):
/// STRICT_DNS, or LOGICAL_DNS with `all_addresses_in_single_endpoint`.
struct DnsClusterConfig {
    discovery: Discovery,
    family: DnsFamily,
    refresh: Duration,
    jitter: Duration,
    dns: DnsSettings,
}

const DNS_CLUSTER: &str = "envoy.extensions.clusters.dns.v3.DnsCluster";

impl DnsClusterConfig {
    fn from_proto(t: &pb::cluster::CustomClusterType, path: &str) -> Result<Self> {
        let tc = join(path, "typed_config");
        // Envoy looks the extension up by its config's type.
        let any = t
            .typed_config
            .as_ref()
            .filter(|a| legate_proto::type_name(&a.type_url) == DNS_CLUSTER)
            .ok_or_else(|| {
                ConfigError::new(&tc, "only the envoy.cluster.dns cluster type is supported")
            })?;
        use legate_proto::envoy_types::pb::envoy::extensions::clusters::{
            common::dns::v3::DnsLookupFamily as F, dns::v3::DnsCluster,
        };
        let d: DnsCluster = prost::Message::decode(any.value.as_slice())
            .map_err(|e| ConfigError::new(&tc, e.to_string()))?;
        let family = match F::try_from(d.dns_lookup_family).unwrap_or(F::Unspecified) {
            F::Unspecified | F::Auto => DnsFamily::Auto,
            F::V4Only => DnsFamily::V4Only,
            F::V6Only => DnsFamily::V6Only,
            F::V4Preferred => DnsFamily::V4Preferred,
            F::All => DnsFamily::All,
        };
        let refresh = match &d.dns_refresh_rate {
            Some(r) => duration(r, &join(&tc, "dns_refresh_rate"))?,
            None => Duration::from_secs(5),
        };
        let jitter = match &d.dns_jitter {
            Some(j) => duration(j, &join(&tc, "dns_jitter"))?,
            None => Duration::ZERO,
        };
        let dns = DnsSettings {
            respect_ttl: d.respect_dns_ttl,
            min_refresh: match &d.dns_min_refresh_rate {
                Some(r) => duration(r, &join(&tc, "dns_min_refresh_rate"))?,
                None => Duration::from_secs(5),
            },
            resolvers: dns_resolvers(
                d.typed_dns_resolver_config.as_ref(),
                &join(&tc, "typed_dns_resolver_config"),
            )?,
        };
        Ok(Self {
            jitter,
            dns,
            discovery: if d.all_addresses_in_single_endpoint {
                Discovery::LogicalDns
            } else {
                Discovery::StrictDns
            },
            family,
            refresh,
        })
    }
}

/// The cluster's load balancer: `load_balancing_policy` when set (its first
/// policy; Envoy then ignores `lb_policy`), else `lb_policy` with its
/// `*_lb_config`. Also whether locality weights apply.
fn lb_policy(c: &pb::Cluster, path: &str) -> Result<(LbPolicy, bool)> {
    let common = c.common_lb_config.as_ref();
    let legacy_locality = common.is_some_and(|cl| {
        matches!(
            cl.locality_config_specifier,
            Some(
                pb::cluster::common_lb_config::LocalityConfigSpecifier::LocalityWeightedLbConfig(_)
            )
        )
    });
    match &c.load_balancing_policy {
        Some(p) => {
            if legacy_locality {
                return Err(ConfigError::new(
                    join(path, "common_lb_config.locality_weighted_lb_config"),
                    "cannot be combined with load_balancing_policy (as in Envoy)",
                ));
            }
            super::lb_policy::from_proto(p, &join(path, "load_balancing_policy"))
        }
        None => Ok((legacy_lb_policy(c, path)?, legacy_locality)),
    }
}

/// An ORIGINAL_DST cluster's config, checked as Envoy checks it: its
/// load balancer is CLUSTER_PROVIDED and it has no endpoints; the
/// `original_dst_lb_config` of any other cluster is an error.
fn original_dst(
    c: &pb::Cluster,
    discovery: Discovery,
    path: &str,
) -> Result<Option<OriginalDstConfig>> {
    use pb::cluster::LbPolicy as L;
    let has_lb_config = matches!(
        c.lb_config,
        Some(pb::cluster::LbConfig::OriginalDstLbConfig(_))
    );
    if discovery != Discovery::OriginalDst {
        if has_lb_config {
            return Err(ConfigError::new(
                join(path, "original_dst_lb_config"),
                "only an ORIGINAL_DST cluster takes it",
            ));
        }
        return Ok(None);
    }
    if c.lb_policy != L::ClusterProvided as i32 || c.load_balancing_policy.is_some() {
        return Err(ConfigError::new(
            join(path, "lb_policy"),
            "an ORIGINAL_DST cluster's must be CLUSTER_PROVIDED (as in Envoy)",
        ));
    }
    if c.load_assignment
        .as_ref()
        .is_some_and(|l| !l.endpoints.is_empty())
    {
        return Err(ConfigError::new(
            join(path, "load_assignment"),
            "an ORIGINAL_DST cluster has no endpoints (as in Envoy)",
        ));
    }
    OriginalDstConfig::from_proto(c, path).map(Some)
}

/// `common_lb_config.healthy_panic_threshold`: Envoy's 50 % unless set; 0
/// turns panic mode off.
fn panic_threshold(c: &pb::Cluster, path: &str) -> Result<u32> {
    let Some(p) = c
        .common_lb_config
        .as_ref()
        .and_then(|cl| cl.healthy_panic_threshold.as_ref())
    else {
        return Ok(50);
    };
    if !(0.0..=100.0).contains(&p.value) {
        return Err(ConfigError::new(
            join(path, "common_lb_config.healthy_panic_threshold"),
            "must be between 0 and 100",
        ));
    }
    Ok(p.value.round() as u32)
}

/// `lb_policy` with its `*_lb_config` (the legacy form).
fn legacy_lb_policy(c: &pb::Cluster, path: &str) -> Result<LbPolicy> {
    use pb::cluster::LbPolicy as L;
    let lb = match L::try_from(c.lb_policy)
        .map_err(|_| ConfigError::new(join(path, "lb_policy"), "unknown policy"))?
    {
        L::RoundRobin => LbPolicy::RoundRobin,
        L::LeastRequest => {
            let cfg = match &c.lb_config {
                Some(pb::cluster::LbConfig::LeastRequestLbConfig(l)) => l.clone(),
                _ => Default::default(),
            };
            let choice_count = cfg.choice_count.val().unwrap_or(2);
            if choice_count < 2 {
                return Err(ConfigError::new(
                    join(path, "least_request_lb_config.choice_count"),
                    "must be at least 2",
                ));
            }
            let bias = cfg
                .active_request_bias
                .as_ref()
                .map_or(1.0, |b| b.default_value);
            LbPolicy::LeastRequest {
                choice_count,
                active_request_bias: bias,
            }
        }
        L::Random => LbPolicy::Random,
        L::RingHash => {
            let cfg = match &c.lb_config {
                Some(pb::cluster::LbConfig::RingHashLbConfig(r)) => *r,
                _ => Default::default(),
            };
            use pb::cluster::ring_hash_lb_config::HashFunction;
            let murmur = match HashFunction::try_from(cfg.hash_function) {
                Ok(HashFunction::XxHash) => false,
                Ok(HashFunction::MurmurHash2) => true,
                Err(_) => {
                    return Err(ConfigError::new(
                        join(path, "ring_hash_lb_config.hash_function"),
                        format!("unknown hash function {}", cfg.hash_function),
                    ))
                }
            };
            let min = cfg.minimum_ring_size.val().unwrap_or(1024);
            let max = cfg.maximum_ring_size.val().unwrap_or(8 * 1024 * 1024);
            if min > max {
                return Err(ConfigError::new(
                    join(path, "ring_hash_lb_config.minimum_ring_size"),
                    "must not exceed maximum_ring_size",
                ));
            }
            LbPolicy::RingHash {
                min_ring_size: min,
                max_ring_size: max,
                murmur,
            }
        }
        L::Maglev => {
            let size = match &c.lb_config {
                Some(pb::cluster::LbConfig::MaglevLbConfig(m)) => {
                    m.table_size.val().unwrap_or(65537)
                }
                _ => 65537,
            };
            if !is_prime(size) {
                return Err(ConfigError::new(
                    join(path, "maglev_lb_config.table_size"),
                    format!("{size} is not a prime number"),
                ));
            }
            LbPolicy::Maglev { table_size: size }
        }
        other => {
            return Err(ConfigError::new(
                join(path, "lb_policy"),
                format!("{} is not supported", other.as_str_name()),
            ))
        }
    };
    Ok(lb)
}

pub fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

/// The localities of a ClusterLoadAssignment (EDS resources and inline
/// `load_assignment`), with its overprovisioning factor.
pub fn load_assignment(
    la: &ep::ClusterLoadAssignment,
    path: &str,
    discovery: Discovery,
) -> Result<(Vec<LocalityConfig>, u32)> {
    let mut out = Vec::new();
    for (i, l) in la.endpoints.iter().enumerate() {
        let lp = index(path, "endpoints", i);
        let mut endpoints = Vec::new();
        for (j, e) in l.lb_endpoints.iter().enumerate() {
            let p = index(&lp, "lb_endpoints", j);
            use ep::lb_endpoint::HostIdentifier as H;
            let endpoint = match &e.host_identifier {
                Some(H::Endpoint(ep)) => ep,
                _ => {
                    return Err(ConfigError::new(
                        join(&p, "endpoint"),
                        "an endpoint is required",
                    ))
                }
            };
            let addr = endpoint.address.as_ref().ok_or_else(|| {
                ConfigError::new(join(&p, "endpoint.address"), "address is required")
            })?;
            let pipe = match &addr.address {
                Some(core::address::Address::Pipe(pipe)) => {
                    if discovery != Discovery::Static {
                        return Err(ConfigError::new(
                            join(&p, "endpoint.address.pipe"),
                            "pipe endpoints are supported in STATIC clusters only",
                        ));
                    }
                    Some(pipe.path.clone())
                }
                _ => None,
            };
            let (host, port) = if pipe.is_some() {
                (String::new(), 0)
            } else {
                host_port(addr, &join(&p, "endpoint.address"))?
            };
            if pipe.is_none()
                && discovery == Discovery::Static
                && host.parse::<std::net::IpAddr>().is_err()
            {
                return Err(ConfigError::new(
                    join(&p, "endpoint.address.socket_address.address"),
                    format!("'{host}' is not an IP address (STATIC clusters need IPs)"),
                ));
            }
            let weight = e.load_balancing_weight.val().unwrap_or(1);
            if weight == 0 {
                return Err(ConfigError::new(
                    join(&p, "load_balancing_weight"),
                    "must be at least 1",
                ));
            }
            let hs = core::HealthStatus::try_from(e.health_status)
                .unwrap_or(core::HealthStatus::Unknown);
            let healthy = matches!(
                hs,
                core::HealthStatus::Unknown | core::HealthStatus::Healthy
            );
            let degraded = hs == core::HealthStatus::Degraded;
            // The endpoint's own metadata only: Envoy 1.40 does not look at
            // the locality's (conformance tls-transport-socket-matches).
            let socket_match = e
                .metadata
                .as_ref()
                .and_then(|m| m.filter_metadata.get("envoy.transport_socket_match"))
                .map(crate::bootstrap::struct_to_json)
                .and_then(|v| match v {
                    serde_json::Value::Object(o) => Some(o),
                    _ => None,
                })
                .unwrap_or_default();
            let hash_key = e
                .metadata
                .as_ref()
                .and_then(|m| m.filter_metadata.get("envoy.lb"))
                .and_then(|s| s.fields.get("hash_key"))
                .and_then(|v| match &v.kind {
                    Some(super::wkt::value::Kind::StringValue(s)) => Some(s.clone()),
                    _ => None,
                });
            let istio_workload = e
                .metadata
                .as_ref()
                .and_then(|m| m.filter_metadata.get("istio"))
                .and_then(|s| s.fields.get("workload"))
                .and_then(|v| match &v.kind {
                    Some(super::wkt::value::Kind::StringValue(s)) => Some(Arc::from(s.as_str())),
                    _ => None,
                });
            endpoints.push(EndpointConfig {
                istio_workload,
                host,
                port,
                weight,
                healthy,
                degraded,
                hostname: endpoint.hostname.clone(),
                hash_key,
                pipe,
                socket_match,
                locality_weight: l.load_balancing_weight.val().unwrap_or(0),
                hc_port: endpoint
                    .health_check_config
                    .as_ref()
                    .map(|h| h.port_value)
                    .filter(|p| *p != 0)
                    .map(|p| p as u16),
                hc_hostname: endpoint
                    .health_check_config
                    .as_ref()
                    .map(|h| h.hostname.clone())
                    .unwrap_or_default(),
            });
        }
        out.push(LocalityConfig {
            priority: l.priority,
            // Envoy: a locality without a weight gets none (no traffic
            // when locality weights apply).
            weight: l.load_balancing_weight.val().unwrap_or(0),
            endpoints,
        });
    }
    let opf = la
        .policy
        .as_ref()
        .and_then(|p| p.overprovisioning_factor.val())
        .unwrap_or(140);
    Ok((out, opf))
}

/// Downstream, `http2_protocol_options` window sizes are applied per
/// listener; upstream, pingora's HTTP/2 client keeps its own (64 KiB). They
/// pace traffic without changing it, so they are accepted with a warning
/// and counted, as the registry does for such fields.
/// `connection_keepalive` upstream (pings to detect a dead upstream
/// connection) is refused: pingora's HTTP/2 client is not driven to ping.
fn upstream_h2(
    h2: &legate_proto::envoy_types::pb::envoy::config::core::v3::Http2ProtocolOptions,
    path: &str,
) -> Result<()> {
    if h2.connection_keepalive.is_some() {
        return Err(ConfigError::new(
            join(path, "connection_keepalive"),
            "HTTP/2 keepalive pings are sent on downstream connections only",
        ));
    }
    // The upstream HTTP/2 client (the h2 crate) answers a malformed
    // response by resetting only its stream, which is what `true` asks;
    // Envoy's `false` would close the whole connection.
    if h2
        .override_stream_error_on_invalid_http_message
        .as_ref()
        .is_some_and(|b| !b.value)
    {
        return Err(ConfigError::new(
            join(path, "override_stream_error_on_invalid_http_message"),
            "only true is supported: Legate resets just the stream of a malformed response",
        ));
    }
    for (set, field) in [
        (
            h2.initial_stream_window_size.is_some(),
            "initial_stream_window_size",
        ),
        (
            h2.initial_connection_window_size.is_some(),
            "initial_connection_window_size",
        ),
    ] {
        if set {
            tracing::warn!(path = %join(path, field), "upstream HTTP/2 window sizes are pingora's; ignored");
            crate::stats::counter("legate.config.fields_ignored".into()).increment(1);
        }
    }
    Ok(())
}

/// `Cluster.filters`: Istio's metadata exchange, at most once; any other
/// upstream network filter is refused.
fn upstream_filters(
    filters: &[pb::Filter],
    path: &str,
) -> Result<Option<Arc<crate::istio::exchange::Exchange>>> {
    let mut out = None;
    for (i, f) in filters.iter().enumerate() {
        let p = join(&index(path, "filters", i), "typed_config");
        let a = f
            .typed_config
            .as_ref()
            .ok_or_else(|| ConfigError::new(&p, "typed_config is required"))?;
        let tn = legate_proto::type_name(&a.type_url);
        if tn != legate_proto::istio::METADATA_EXCHANGE {
            return Err(ConfigError::new(
                p,
                format!("upstream network filter {tn} is not supported"),
            ));
        }
        if out.is_some() {
            return Err(ConfigError::new(
                p,
                "a second metadata exchange is not supported",
            ));
        }
        out = Some(Arc::new(crate::istio::exchange::Exchange::from_any(a, &p)?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_h2_takes_only_a_stream_level_error_override() {
        let with = |v: bool| core::Http2ProtocolOptions {
            override_stream_error_on_invalid_http_message: Some(
                legate_proto::envoy_types::pb::google::protobuf::BoolValue { value: v },
            ),
            ..Default::default()
        };
        assert!(upstream_h2(&with(true), "h2").is_ok());
        let e = upstream_h2(&with(false), "h2").unwrap_err();
        assert!(e
            .to_string()
            .contains("h2.override_stream_error_on_invalid_http_message"));
    }

    #[test]
    fn response_header_limits_follow_envoys_defaults_and_range() {
        let mut common = core::HttpProtocolOptions::default();
        let l = ResponseHeaderLimits::from_proto(&common, "c").unwrap();
        let big = |n: usize| {
            let mut h = http::HeaderMap::new();
            h.insert("x-big", "a".repeat(n).parse().unwrap());
            h
        };
        // HTTP/1: 80 KiB; HTTP/2: 60 KiB (name and value counted).
        assert!(!l.exceeded_by(http::Version::HTTP_11, &big(70 * 1024)));
        assert!(l.exceeded_by(http::Version::HTTP_2, &big(70 * 1024)));
        assert!(l.exceeded_by(http::Version::HTTP_11, &big(80 * 1024)));
        common.max_response_headers_kb =
            Some(legate_proto::envoy_types::pb::google::protobuf::UInt32Value { value: 1 });
        common.max_headers_count =
            Some(legate_proto::envoy_types::pb::google::protobuf::UInt32Value { value: 2 });
        let l = ResponseHeaderLimits::from_proto(&common, "c").unwrap();
        assert!(l.exceeded_by(http::Version::HTTP_11, &big(1024)));
        let mut three = http::HeaderMap::new();
        for n in ["a", "b", "c"] {
            three.insert(n, "v".parse().unwrap());
        }
        assert!(l.exceeded_by(http::Version::HTTP_11, &three));
        common.max_response_headers_kb =
            Some(legate_proto::envoy_types::pb::google::protobuf::UInt32Value { value: 8193 });
        let e = ResponseHeaderLimits::from_proto(&common, "c").unwrap_err();
        assert!(e.to_string().contains("c.max_response_headers_kb"), "{e}");
    }
}
