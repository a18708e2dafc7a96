//! Listeners, filter chains and the HTTP connection manager.

use super::filter_chain::ChainMatch;
use super::route::RouteConfig;
use super::source::XdsSource;
use super::{index, join, socket_addr, ConfigError, Result, Wrapped};
use legate_proto::envoy_types::pb::envoy::config::core::v3 as core;
use legate_proto::envoy_types::pb::envoy::config::listener::v3 as pb;
use legate_proto::envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub const HCM_TYPE: &str =
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
pub const ROUTER_TYPE: &str = "envoy.extensions.filters.http.router.v3.Router";
pub const TCP_PROXY_TYPE: &str = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";

/// The network filter that terminates a listener's filter chain.
#[derive(Debug, Clone)]
pub enum NetworkFilter {
    Http(Arc<Hcm>),
    Tcp(Arc<TcpProxy>),
}

pub const CONNECTION_LIMIT_TYPE: &str =
    "envoy.extensions.filters.network.connection_limit.v3.ConnectionLimit";

/// A filter chain: connection limits, then the terminal network filter.
#[derive(Debug, Clone)]
pub struct FilterChain {
    pub limits: Vec<Arc<ConnectionLimit>>,
    /// `rbac` network filters, checked once the connection's identity is
    /// known (after the TLS handshake).
    pub rbac: Vec<Arc<super::rbac::Rbac>>,
    /// `local_ratelimit` network filters, checked as the connection opens.
    pub ratelimits: Vec<Arc<super::local_ratelimit::LocalRateLimit>>,
    /// Istio's metadata exchange (`tcp_proxy` chains; see
    /// `istio::exchange`).
    pub exchange: Option<Arc<crate::istio::exchange::Exchange>>,
    /// Istio's network `istio.stats` (`tcp_proxy` chains).
    pub istio_stats: Option<Arc<crate::istio::stats::PluginConfig>>,
    pub filter: NetworkFilter,
    /// TLS termination (`transport_socket` with a `DownstreamTlsContext`).
    pub tls: Option<Arc<super::tls::ServerTls>>,
    /// `transport_socket_connect_timeout`: the TLS handshake's deadline.
    pub handshake_timeout: std::time::Duration,
}

/// The TLS handshake deadline when `transport_socket_connect_timeout` is
/// unset. Envoy has none; a connection that never finishes its handshake
/// would then be held until the client leaves, so Legate bounds it (the
/// same bound as the listener filters' default timeout).
pub const DEFAULT_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

pub const TLS_INSPECTOR_TYPE: &str =
    "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector";
pub const HTTP_INSPECTOR_TYPE: &str =
    "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector";
pub const ORIGINAL_DST_TYPE: &str = "envoy.extensions.filters.listener.original_dst.v3.OriginalDst";
pub const PROXY_PROTOCOL_TYPE: &str =
    "envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol";

/// A listener filter (see `server::listener_filters`).
#[derive(Debug, Clone, PartialEq)]
pub enum ListenerFilter {
    TlsInspector,
    HttpInspector,
    OriginalDst,
    ProxyProtocol(ProxyProtocolConfig),
}

/// A listener filter with its `filter_disabled` predicate: the filter is
/// skipped for connections the predicate matches.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerFilterEntry {
    pub filter: ListenerFilter,
    pub disabled: Option<FilterPredicate>,
}

/// `ListenerFilterChainMatchPredicate`, evaluated on the destination port
/// (the restored one after `original_dst`).
#[derive(Debug, Clone, PartialEq)]
pub enum FilterPredicate {
    Or(Vec<FilterPredicate>),
    And(Vec<FilterPredicate>),
    Not(Box<FilterPredicate>),
    Any,
    /// `[start, end)`.
    DestinationPort(i64, i64),
}

impl FilterPredicate {
    fn from_proto(p: &pb::ListenerFilterChainMatchPredicate, path: &str) -> Result<Self> {
        use pb::listener_filter_chain_match_predicate::Rule;
        let set = |s: &pb::listener_filter_chain_match_predicate::MatchSet, f: &str| {
            s.rules
                .iter()
                .enumerate()
                .map(|(i, r)| Self::from_proto(r, &index(&join(path, f), "rules", i)))
                .collect::<Result<Vec<_>>>()
        };
        Ok(match &p.rule {
            Some(Rule::OrMatch(s)) => Self::Or(set(s, "or_match")?),
            Some(Rule::AndMatch(s)) => Self::And(set(s, "and_match")?),
            Some(Rule::NotMatch(n)) => {
                Self::Not(Box::new(Self::from_proto(n, &join(path, "not_match"))?))
            }
            Some(Rule::AnyMatch(true)) => Self::Any,
            Some(Rule::DestinationPortRange(r)) => {
                Self::DestinationPort(r.start.into(), r.end.into())
            }
            Some(Rule::AnyMatch(false)) | None => {
                return Err(ConfigError::new(path, "a rule is required"))
            }
        })
    }

    pub fn matches(&self, port: u16) -> bool {
        match self {
            Self::Or(v) => v.iter().any(|p| p.matches(port)),
            Self::And(v) => v.iter().all(|p| p.matches(port)),
            Self::Not(p) => !p.matches(port),
            Self::Any => true,
            Self::DestinationPort(s, e) => (*s..*e).contains(&i64::from(port)),
        }
    }
}

/// The `proxy_protocol` listener filter.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyProtocolConfig {
    /// `allow_requests_without_proxy_protocol`.
    pub allow_without: bool,
    pub disallow_v1: bool,
    pub disallow_v2: bool,
    /// `proxy_proto.` or `proxy_proto.<stat_prefix>.`
    pub stat_prefix: String,
}

impl ProxyProtocolConfig {
    fn from_proto(
        p: &legate_proto::envoy_types::pb::envoy::extensions::filters::listener::proxy_protocol::v3::ProxyProtocol,
        path: &str,
    ) -> Result<Self> {
        use legate_proto::envoy_types::pb::envoy::config::core::v3::proxy_protocol_config::Version;
        let mut c = Self {
            allow_without: p.allow_requests_without_proxy_protocol,
            disallow_v1: false,
            disallow_v2: false,
            stat_prefix: if p.stat_prefix.is_empty() {
                "proxy_proto.".into()
            } else {
                format!("proxy_proto.{}.", p.stat_prefix)
            },
        };
        for (i, v) in p.disallowed_versions.iter().enumerate() {
            match Version::try_from(*v) {
                Ok(Version::V1) => c.disallow_v1 = true,
                Ok(Version::V2) => c.disallow_v2 = true,
                Err(_) => {
                    return Err(ConfigError::new(
                        index(path, "disallowed_versions", i),
                        format!("unknown version {v}"),
                    ))
                }
            }
        }
        Ok(c)
    }
}

/// `connection_limit`: at most `max` connections at once through this
/// filter; beyond that a connection is closed, after `delay`.
#[derive(Debug)]
pub struct ConnectionLimit {
    pub stat_prefix: String,
    pub max: u64,
    pub delay: Option<std::time::Duration>,
    pub active: std::sync::atomic::AtomicU64,
}

/// Holds one of a limit's slots; gives it back on drop.
pub struct LimitSlot(Arc<ConnectionLimit>);

impl Drop for LimitSlot {
    fn drop(&mut self) {
        let now = self
            .0
            .active
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            - 1;
        crate::stats::gauge(format!(
            "connection_limit.{}.active_connections",
            self.0.stat_prefix
        ))
        .set(now as f64);
    }
}

impl ConnectionLimit {
    pub fn from_proto(
        c: &legate_proto::envoy_types::pb::envoy::extensions::filters::network::connection_limit::v3::ConnectionLimit,
        path: &str,
    ) -> Result<Self> {
        if c.runtime_enabled.is_some() {
            return Err(ConfigError::new(
                join(path, "runtime_enabled"),
                "runtime switches for filters are not supported",
            ));
        }
        let max = c.max_connections.val().ok_or_else(|| {
            ConfigError::new(join(path, "max_connections"), "max_connections is required")
        })?;
        let delay = match &c.delay {
            Some(d) => Some(super::duration(d, &join(path, "delay"))?).filter(|d| !d.is_zero()),
            None => None,
        };
        Ok(Self {
            stat_prefix: c.stat_prefix.clone(),
            max,
            delay,
            active: Default::default(),
        })
    }

    /// A slot for a new connection, or None when the limit is reached.
    pub fn try_acquire(self: &Arc<Self>) -> Option<LimitSlot> {
        use std::sync::atomic::Ordering;
        let prev = self.active.fetch_add(1, Ordering::AcqRel);
        if prev >= self.max {
            self.active.fetch_sub(1, Ordering::AcqRel);
            crate::stats::counter(format!(
                "connection_limit.{}.limited_connections",
                self.stat_prefix
            ))
            .increment(1);
            return None;
        }
        crate::stats::gauge(format!(
            "connection_limit.{}.active_connections",
            self.stat_prefix
        ))
        .set((prev + 1) as f64);
        Some(LimitSlot(self.clone()))
    }
}

/// `tcp_proxy`: bytes both ways to one cluster (or one of weighted ones).
#[derive(Debug)]
pub struct TcpProxy {
    pub stat_prefix: String,
    /// (cluster, weight); one entry with weight 1 for `cluster`.
    pub clusters: Vec<(String, u32)>,
    /// Envoy's default is 1 h; None: disabled (an explicit 0).
    pub idle_timeout: Option<std::time::Duration>,
    pub max_connect_attempts: u32,
    /// `max_downstream_connection_duration`: the connection is closed
    /// this long after it was accepted.
    pub max_duration: Option<std::time::Duration>,
    /// `hash_policy` `source_ip`: ring hash and Maglev clusters pick by the
    /// client's address.
    pub hash_source_ip: bool,
    /// `access_log`: a line per connection when it closes.
    pub access_log: Vec<Arc<crate::access_log::AccessLog>>,
}

impl TcpProxy {
    /// The cluster for a connection, by weight (`random` is uniform).
    pub fn pick_cluster(&self, random: u64) -> &str {
        let total: u64 = self.clusters.iter().map(|(_, w)| *w as u64).sum();
        let mut roll = random % total.max(1);
        for (name, w) in &self.clusters {
            if roll < *w as u64 {
                return name;
            }
            roll -= *w as u64;
        }
        &self.clusters[0].0
    }
}

/// Where an HTTP connection manager's routes come from.
#[derive(Debug, Clone)]
pub enum RouteSource {
    Static(Arc<RouteConfig>),
    Rds { name: String, source: XdsSource },
    Scoped(Arc<Scoped>),
}

/// One fragment of a scope key: a header's value, split by `separator`,
/// element `index` (Envoy's HeaderValueExtractor with `index`).
#[derive(Debug, Clone, PartialEq)]
pub struct KeyFragment {
    pub header: String,
    pub separator: String,
    pub index: u32,
}

/// Scoped routes: a key built from the request picks a scope, whose route
/// configuration comes from RDS.
#[derive(Debug)]
pub struct Scoped {
    pub fragments: Vec<KeyFragment>,
    pub rds_source: XdsSource,
    /// Scopes from SRDS, or listed inline.
    pub scopes: ScopeList,
}

#[derive(Debug)]
pub enum ScopeList {
    Srds(XdsSource),
    Inline(Vec<super::scoped::Scope>),
}

#[derive(Debug)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    /// `additional_addresses`: more addresses the listener accepts on
    /// (istiod gives a dual-stack sidecar's listeners their other family's
    /// address), with the same socket options and chains.
    pub additional: Vec<SocketAddr>,
    /// Stat prefix: `listener.<address>.` unless `stat_prefix` is set.
    pub stat_prefix: String,
    /// Filter chains with their `filter_chain_match`, in config order.
    pub chains: Vec<(ChainMatch, FilterChain)>,
    pub default_chain: Option<FilterChain>,
    /// traffic_direction INBOUND: drained by `/drain_listeners?inboundonly`.
    pub inbound: bool,
    /// `ignore_global_conn_limit` and `bypass_overload_manager`: what
    /// exempts its connections from the global connection limit.
    pub exempt: crate::overload::Exempt,
    /// traffic_direction OUTBOUND: its connection managers trace as egress
    /// (decorators are propagated upstream).
    pub outbound: bool,
    /// `listener.<stat_prefix>.downstream_cx_total`, registered on first use.
    pub cx_total: std::sync::OnceLock<metrics::Counter>,
    /// `per_connection_buffer_limit_bytes` (Envoy's default 1 MiB): for
    /// HTTP, the most request body the router keeps for retries; a longer
    /// body is not retried.
    pub buffer_limit: u32,
    /// `drain_type: DEFAULT` (not `MODIFY_ONLY`): `/healthcheck/fail` makes
    /// its HTTP connections close after their next request.
    pub drains_on_health_check_fail: bool,
    /// Listener filters, in order.
    pub listener_filters: Vec<ListenerFilterEntry>,
    /// `use_original_dst`: a connection whose destination was restored (by
    /// `original_dst` or PROXY protocol) is handed to the listener on that
    /// address, if there is one: Istio's 15001 virtual listener.
    pub use_original_dst: bool,
    /// `listener_filters_timeout` (default 15 s; None: disabled).
    pub listener_filters_timeout: Option<std::time::Duration>,
    /// `continue_on_listener_filters_timeout`: on timeout, match the chain
    /// with what is known instead of closing.
    pub continue_on_listener_filters_timeout: bool,
    /// `access_log`: a line for each connection no filter chain takes
    /// (flag `NR`), as Envoy's listener logs them.
    pub access_log: Vec<Arc<crate::access_log::AccessLog>>,
    /// `bind_to_port` (default true). An unbound listener accepts nothing
    /// itself: in Envoy it gets connections another listener hands over
    /// (`use_original_dst`); in Legate its address is a VIP the kernel load
    /// balancer may serve (see `kernel_lb`).
    pub bind_to_port: bool,
    /// A `protocol: UDP` listener (no filter chains): its datagram size
    /// and UDP proxy.
    pub udp: Option<Arc<crate::udp_proxy::UdpListener>>,
    /// `socket_options`, set on the listening socket.
    pub socket_options: Vec<super::socket_options::SocketOpt>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Codec {
    Auto,
    Http1,
    Http2,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ServerHeader {
    Overwrite,
    AppendIfAbsent,
    PassThrough,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UnderscoreAction {
    Allow,
    RejectRequest,
    DropHeader,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EscapedSlashes {
    KeepUnchanged,
    RejectRequest,
    UnescapeAndRedirect,
    UnescapeAndForward,
}

/// `forward_client_cert_details` (see `server::xfcc`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum XfccMode {
    /// Remove the header (the default).
    #[default]
    Sanitize,
    /// Forward it as is on mTLS connections, remove it otherwise.
    ForwardOnly,
    /// On mTLS connections, append this hop's element.
    AppendForward,
    /// On mTLS connections, replace the header with this hop's element.
    SanitizeSet,
    /// Forward it as is, mTLS or not.
    AlwaysForwardOnly,
}

/// `set_current_client_cert_details`: what this hop's element carries
/// beyond `By` and `Hash`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct XfccDetails {
    pub subject: bool,
    pub issuer: bool,
    pub cert: bool,
    pub chain: bool,
    pub dns: bool,
    pub uri: bool,
}

/// The HTTP connection manager of a filter chain.
#[derive(Debug)]
pub struct Hcm {
    pub stat_prefix: String,
    pub codec: Codec,
    pub routes: RouteSource,
    pub use_remote_address: bool,
    /// `scheme_header_transformation.match_upstream`: an HTTP/2 upstream
    /// is sent `:scheme` by its own transport, not the request's.
    pub scheme_matches_upstream: bool,
    /// `early_header_mutation_extensions`, applied in order before routing.
    pub early_mutations: Vec<crate::http_filters::header_mutation::Early>,
    pub xff_num_trusted_hops: u32,
    pub skip_xff_append: bool,
    /// `original_ip_detection_extensions`, asked in order when
    /// `use_remote_address` is off (empty: XFF by `xff_num_trusted_hops`).
    pub ip_detection: Vec<super::ip_detection::Detection>,
    pub server_name: String,
    pub server_header: ServerHeader,
    pub strip_matching_host_port: bool,
    pub strip_any_host_port: bool,
    /// `strip_trailing_host_dot`: `example.com.` is `example.com`.
    pub strip_trailing_host_dot: bool,
    pub normalize_path: bool,
    pub merge_slashes: bool,
    pub escaped_slashes: EscapedSlashes,
    pub max_request_headers_kb: u32,
    pub max_headers_count: u32,
    pub underscores: UnderscoreAction,
    pub generate_request_id: bool,
    /// The UUID request id extension's tracing options.
    pub request_id: crate::trace::decision::IdOptions,
    /// `tracing`: sampling, the provider's propagation, decorators.
    pub tracing: Option<crate::trace::Tracing>,
    pub preserve_external_request_id: bool,
    pub always_set_request_id_in_response: bool,
    /// HTTP filters whose config comes from ECDS: (filter name = resource
    /// name, source). The listener warms until each has arrived.
    pub ecds: Vec<(String, XdsSource)>,
    /// The HTTP filters before the router, in order.
    pub filters: crate::http_filters::FilterChain,
    /// Upgrade types allowed through (lower case), from `upgrade_configs`.
    pub upgrades: Vec<String>,
    /// The router's `suppress_envoy_headers`: no `x-envoy-` headers of the
    /// router's own (expected timeout, original path and host, upstream
    /// service time, overloaded) are added.
    pub suppress_envoy_headers: bool,
    /// `proxy_100_continue`: forward `Expect: 100-continue` and relay the
    /// upstream's 100; otherwise Legate answers 100 itself and strips it.
    pub proxy_100_continue: bool,
    pub xfcc: XfccMode,
    pub xfcc_details: XfccDetails,
    /// `access_log`: a line per request when it ends.
    pub access_log: Vec<Arc<crate::access_log::AccessLog>>,
    pub conn: HttpConnSettings,
    /// `http_protocol_options.accept_http_10`: HTTP/1.0 requests are
    /// served (else 426), with `default_host_for_http_10` as the host of
    /// those that name none (empty: none).
    pub http10: Option<String>,
    /// `http_protocol_options.header_key_format`: how requests read here
    /// are written upstream (preserve_case), and how this side writes
    /// what has no spellings of its own (proper_case_words).
    pub header_case: crate::header_case::HeaderCase,
    /// `http_protocol_options.ignore_http_11_upgrade`: HTTP/1.1 upgrades to
    /// these are not upgrades (Upgrade and its Connection token go).
    pub ignore_upgrades: Vec<super::matcher::StringMatcher>,
    /// `stream_idle_timeout`: a request with no activity either way for
    /// this long ends (408 `stream timeout`, or a reset once the response
    /// started). Envoy's default 5 min; None: disabled.
    pub stream_idle_timeout: Option<Duration>,
    /// `request_timeout`: the whole request must arrive within this long
    /// (408 `request timeout`). Envoy's default: disabled.
    pub request_timeout: Option<Duration>,
    /// `common_http_protocol_options.max_stream_duration`: the limit of a
    /// stream whose route sets none of its own.
    pub max_stream_duration: Option<Duration>,
    stats: std::sync::OnceLock<crate::stats::HttpStats>,
}

/// A downstream HTTP connection's own limits.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConnSettings {
    /// `common_http_protocol_options.idle_timeout`: closed after this long
    /// without a request in flight (Envoy's default 1 h; None: never).
    pub idle_timeout: Option<Duration>,
    /// `common_http_protocol_options.max_requests_per_connection`.
    pub max_requests: Option<u32>,
    /// `common_http_protocol_options.max_connection_duration`: the
    /// connection drains once it is this old (HTTP/1: the next response
    /// closes it; HTTP/2: GOAWAY).
    pub max_duration: Option<Duration>,
    /// How long an idle HTTP/1 connection drained by `max_duration` stays
    /// open for one more request: the connection manager's
    /// default `drain_timeout` (5 s), or for ever with
    /// `http1_safe_max_connection_duration`.
    pub max_duration_drain: Option<Duration>,
    pub h2: H2Settings,
}

/// `http2_protocol_options` for downstream connections.
#[derive(Debug, Clone, PartialEq)]
pub struct H2Settings {
    pub max_concurrent_streams: u32,
    pub initial_stream_window_size: u32,
    pub initial_connection_window_size: u32,
    /// `connection_keepalive`: a PING every interval (plus jitter); no
    /// answer within the timeout closes the connection.
    pub keepalive: Option<H2Keepalive>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct H2Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
    /// Percent of the interval added at random to each one.
    pub jitter_percent: f64,
}

impl Default for H2Settings {
    /// Legate's edge defaults (`shared/reference/hardening.md`), not
    /// Envoy's unbounded ones: 100 streams, 64 KiB per stream, 1 MiB per
    /// connection.
    fn default() -> Self {
        Self {
            max_concurrent_streams: 100,
            initial_stream_window_size: 64 * 1024,
            initial_connection_window_size: 1024 * 1024,
            keepalive: None,
        }
    }
}

impl H2Settings {
    /// Envoy's ranges for these fields are its proto constraints, checked
    /// (by `pgv::validate`) before any `from_proto`.
    fn from_proto(
        o: Option<&legate_proto::envoy_types::pb::envoy::config::core::v3::Http2ProtocolOptions>,
    ) -> Self {
        let d = Self::default();
        let Some(o) = o else { return d };
        Self {
            max_concurrent_streams: o
                .max_concurrent_streams
                .val()
                .unwrap_or(d.max_concurrent_streams),
            initial_stream_window_size: o
                .initial_stream_window_size
                .val()
                .unwrap_or(d.initial_stream_window_size),
            initial_connection_window_size: o
                .initial_connection_window_size
                .val()
                .unwrap_or(d.initial_connection_window_size),
            keepalive: o.connection_keepalive.as_ref().and_then(|k| {
                let ms = |d: &legate_proto::envoy_types::pb::google::protobuf::Duration| {
                    Duration::from_secs(d.seconds.max(0) as u64)
                        + Duration::from_nanos(d.nanos.max(0) as u64)
                };
                // Without an interval Envoy's server sends no pings.
                let interval = k.interval.as_ref().map(ms).filter(|d| !d.is_zero())?;
                Some(H2Keepalive {
                    interval,
                    timeout: k.timeout.as_ref().map(ms).unwrap_or_default(),
                    // Envoy's default jitter is 15 %.
                    jitter_percent: k.interval_jitter.as_ref().map_or(15.0, |p| p.value),
                })
            }),
        }
    }
}

impl Listener {
    pub fn from_proto(l: &pb::Listener, path: &str) -> Result<Self> {
        if l.name.is_empty() {
            return Err(ConfigError::new(
                join(path, "name"),
                "listener name is required",
            ));
        }
        let addr = l
            .address
            .as_ref()
            .ok_or_else(|| ConfigError::new(join(path, "address"), "address is required"))?;
        let (address, udp) = listener_address(addr, &join(path, "address"))?;
        let additional = additional_addresses(l, udp, path)?;
        let (chains, default_chain, listener_filters, udp) = if udp {
            (Vec::new(), None, Vec::new(), Some(udp_listener(l, path)?))
        } else {
            let (chains, default_chain) = filter_chains(l, path)?;
            (chains, default_chain, listener_filters(l, path)?, None)
        };
        let listener_filters_timeout = super::timeout_or(
            l.listener_filters_timeout.as_ref(),
            Some(std::time::Duration::from_secs(15)),
            &join(path, "listener_filters_timeout"),
        )?;
        let stat_prefix = if l.stat_prefix.is_empty() {
            format!("listener.{address}")
        } else {
            format!("listener.{}", l.stat_prefix)
        };
        let access_log = if udp.is_some() {
            if !l.access_log.is_empty() {
                tracing::warn!(
                    path,
                    "a UDP listener's access_log is never written (as in Envoy)"
                );
            }
            Vec::new()
        } else {
            listener_access_log(&l.access_log, path)?
        };
        Ok(Self {
            name: l.name.clone(),
            address,
            additional,
            stat_prefix,
            chains,
            default_chain,
            udp,
            socket_options: super::socket_options::list(&l.socket_options, path)?,
            bind_to_port: l.bind_to_port.as_ref().is_none_or(|b| b.value),
            listener_filters,
            use_original_dst: l.use_original_dst.as_ref().is_some_and(|b| b.value),
            listener_filters_timeout,
            cx_total: Default::default(),
            continue_on_listener_filters_timeout: l.continue_on_listener_filters_timeout,
            access_log,
            buffer_limit: l
                .per_connection_buffer_limit_bytes
                .val()
                .unwrap_or(1024 * 1024),
            drains_on_health_check_fail: l.drain_type
                == legate_proto::envoy_types::pb::envoy::config::listener::v3::listener::DrainType::Default as i32,
            inbound: l.traffic_direction == core::TrafficDirection::Inbound as i32,
            exempt: crate::overload::Exempt {
                ignore_limit: l.ignore_global_conn_limit,
                bypass: l.bypass_overload_manager,
            },
            outbound: l.traffic_direction == core::TrafficDirection::Outbound as i32,
        })
    }
}

/// `additional_addresses` of a TCP listener (their own socket options are
/// refused; the listener's apply).
fn additional_addresses(l: &pb::Listener, udp: bool, path: &str) -> Result<Vec<SocketAddr>> {
    let mut out = Vec::with_capacity(l.additional_addresses.len());
    for (i, a) in l.additional_addresses.iter().enumerate() {
        let p = index(path, "additional_addresses", i);
        if udp {
            return Err(ConfigError::new(p, "not supported on UDP listeners"));
        }
        if a.socket_options.is_some() {
            return Err(ConfigError::new(
                join(&p, "socket_options"),
                "not supported",
            ));
        }
        let addr = a
            .address
            .as_ref()
            .ok_or_else(|| ConfigError::new(join(&p, "address"), "address is required"))?;
        let (addr, other_udp) = listener_address(addr, &join(&p, "address"))?;
        if other_udp {
            return Err(ConfigError::new(
                join(&p, "address"),
                "must be TCP, as the listener",
            ));
        }
        out.push(addr);
    }
    Ok(out)
}

/// A listener's address, and whether it is UDP.
fn listener_address(addr: &core::Address, path: &str) -> Result<(SocketAddr, bool)> {
    use core::address::Address as A;
    use core::socket_address::Protocol;
    let udp =
        matches!(&addr.address, Some(A::SocketAddress(sa)) if sa.protocol == Protocol::Udp as i32);
    if !udp {
        return Ok((socket_addr(addr, path)?, false));
    }
    let mut tcp = addr.clone();
    if let Some(A::SocketAddress(sa)) = &mut tcp.address {
        sa.protocol = Protocol::Tcp as i32;
    }
    Ok((socket_addr(&tcp, path)?, true))
}

/// A listener's chains with their matches, and its default chain.
type Chains = (Vec<(ChainMatch, FilterChain)>, Option<FilterChain>);

fn filter_chains(l: &pb::Listener, path: &str) -> Result<Chains> {
    let mut chains = Vec::with_capacity(l.filter_chains.len());
    for (i, fc) in l.filter_chains.iter().enumerate() {
        let p = index(path, "filter_chains", i);
        let m = match &fc.filter_chain_match {
            Some(m) => ChainMatch::from_proto(m, &join(&p, "filter_chain_match"))?,
            None => ChainMatch::default(),
        };
        chains.push((m, chain_filter(fc, &p)?));
    }
    let matches: Vec<ChainMatch> = chains.iter().map(|(m, _)| m.clone()).collect();
    super::filter_chain::check_unique(&matches, path)?;
    let default_chain = match &l.default_filter_chain {
        Some(fc) => Some(chain_filter(fc, &join(path, "default_filter_chain"))?),
        None => None,
    };
    if chains.is_empty() && default_chain.is_none() {
        return Err(ConfigError::new(
            join(path, "filter_chains"),
            "a listener needs a filter chain or a default_filter_chain",
        ));
    }
    Ok((chains, default_chain))
}

/// The typed config type of a listener filter; ECDS is refused.
fn listener_filter_type<'a>(f: &'a pb::ListenerFilter, p: &str) -> Result<&'a str> {
    use pb::listener_filter::ConfigType;
    match &f.config_type {
        Some(ConfigType::TypedConfig(a)) => Ok(legate_proto::type_name(&a.type_url)),
        Some(ConfigType::ConfigDiscovery(_)) => Err(ConfigError::new(
            join(p, "config_discovery"),
            "listener filters from ECDS are not supported",
        )),
        None => Err(ConfigError::new(
            join(p, "typed_config"),
            "typed_config is required",
        )),
    }
}

fn listener_filters(l: &pb::Listener, path: &str) -> Result<Vec<ListenerFilterEntry>> {
    use pb::listener_filter::ConfigType;
    let mut listener_filters = Vec::with_capacity(l.listener_filters.len());
    for (i, f) in l.listener_filters.iter().enumerate() {
        let p = index(path, "listener_filters", i);
        let tn = listener_filter_type(f, &p)?;
        let disabled = f
            .filter_disabled
            .as_ref()
            .map(|d| FilterPredicate::from_proto(d, &join(&p, "filter_disabled")))
            .transpose()?;
        let filter = match tn {
            TLS_INSPECTOR_TYPE => ListenerFilter::TlsInspector,
            HTTP_INSPECTOR_TYPE => ListenerFilter::HttpInspector,
            ORIGINAL_DST_TYPE => ListenerFilter::OriginalDst,
            PROXY_PROTOCOL_TYPE => {
                let tc = join(&p, "typed_config");
                let Some(ConfigType::TypedConfig(a)) = &f.config_type else {
                    unreachable!("typed_config checked above")
                };
                let pp = prost::Message::decode(a.value.as_slice())
                    .map_err(|e| ConfigError::new(&tc, e.to_string()))?;
                ListenerFilter::ProxyProtocol(ProxyProtocolConfig::from_proto(&pp, &tc)?)
            }
            _ => {
                return Err(ConfigError::new(
                    join(&p, "typed_config"),
                    format!("listener filter {tn} is not supported"),
                ))
            }
        };
        listener_filters.push(ListenerFilterEntry { filter, disabled });
    }
    Ok(listener_filters)
}

/// A `protocol: UDP` listener: no filter chains, and its one UDP listener
/// filter, the UDP proxy.
fn udp_listener(l: &pb::Listener, path: &str) -> Result<Arc<crate::udp_proxy::UdpListener>> {
    use pb::listener_filter::ConfigType;
    let chains = l.filter_chains.len() + usize::from(l.default_filter_chain.is_some());
    if chains > 0 {
        return Err(ConfigError::new(
            join(path, "filter_chains"),
            format!(
                "error adding listener '{}': {chains} filter chain(s) specified for connection-less UDP listener.",
                l.name
            ),
        ));
    }
    let mut proxy = None;
    for (i, f) in l.listener_filters.iter().enumerate() {
        let p = index(path, "listener_filters", i);
        let tn = listener_filter_type(f, &p)?;
        let tc = join(&p, "typed_config");
        if tn != crate::udp_proxy::config::TYPE {
            return Err(ConfigError::new(
                tc,
                format!("UDP listener filter {tn} is not supported"),
            ));
        }
        if f.filter_disabled.is_some() {
            return Err(ConfigError::new(
                join(&p, "filter_disabled"),
                "not supported on UDP listener filters",
            ));
        }
        if proxy.is_some() {
            return Err(ConfigError::new(
                tc,
                "a second udp_proxy would never see a datagram (the first one takes them all)",
            ));
        }
        let Some(ConfigType::TypedConfig(a)) = &f.config_type else {
            unreachable!("typed_config checked above")
        };
        let u = prost::Message::decode(a.value.as_slice())
            .map_err(|e| ConfigError::new(&tc, e.to_string()))?;
        proxy = Some(Arc::new(crate::udp_proxy::UdpProxy::from_proto(&u, &tc)?));
    }
    Ok(Arc::new(crate::udp_proxy::UdpListener::from_proto(
        l.udp_listener_config.as_ref(),
        proxy,
        path,
    )?))
}

impl Hcm {
    pub fn from_proto(h: &hcm::HttpConnectionManager, path: &str) -> Result<Self> {
        use hcm::http_connection_manager::{
            CodecType, PathWithEscapedSlashesAction as E, RouteSpecifier,
            ServerHeaderTransformation as S,
        };
        if h.stat_prefix.is_empty() {
            return Err(ConfigError::new(
                join(path, "stat_prefix"),
                "stat_prefix is required",
            ));
        }
        let codec = match CodecType::try_from(h.codec_type) {
            Ok(CodecType::Auto) => Codec::Auto,
            Ok(CodecType::Http1) => Codec::Http1,
            Ok(CodecType::Http2) => Codec::Http2,
            _ => {
                return Err(ConfigError::new(
                    join(path, "codec_type"),
                    "only AUTO, HTTP1 and HTTP2 are supported",
                ))
            }
        };
        let routes = match &h.route_specifier {
            Some(RouteSpecifier::RouteConfig(rc)) => RouteSource::Static(Arc::new(
                RouteConfig::from_proto(rc, &join(path, "route_config"))?,
            )),
            Some(RouteSpecifier::Rds(rds)) => {
                let p = join(path, "rds");
                let source = rds.config_source.as_ref().ok_or_else(|| {
                    ConfigError::new(join(&p, "config_source"), "config_source is required")
                })?;
                RouteSource::Rds {
                    name: rds.route_config_name.clone(),
                    source: XdsSource::from_proto(source, &join(&p, "config_source"))?,
                }
            }
            Some(RouteSpecifier::ScopedRoutes(sr)) => RouteSource::Scoped(Arc::new(
                Scoped::from_proto(sr, &join(path, "scoped_routes"))?,
            )),
            None => return Err(ConfigError::new(path, "route_config is required")),
        };
        let (filters, ecds, suppress_envoy_headers) = http_filters(h, path)?;
        let server_header =
            match S::try_from(h.server_header_transformation).unwrap_or(S::Overwrite) {
                S::Overwrite => ServerHeader::Overwrite,
                S::AppendIfAbsent => ServerHeader::AppendIfAbsent,
                S::PassThrough => ServerHeader::PassThrough,
            };
        let escaped_slashes = match E::try_from(h.path_with_escaped_slashes_action)
            .unwrap_or(E::ImplementationSpecificDefault)
        {
            E::ImplementationSpecificDefault | E::KeepUnchanged => EscapedSlashes::KeepUnchanged,
            E::RejectRequest => EscapedSlashes::RejectRequest,
            E::UnescapeAndRedirect => EscapedSlashes::UnescapeAndRedirect,
            E::UnescapeAndForward => EscapedSlashes::UnescapeAndForward,
        };
        let common = h.common_http_protocol_options.unwrap_or_default();
        let cp = join(path, "common_http_protocol_options");
        let conn = HttpConnSettings {
            idle_timeout: super::timeout_or(
                common.idle_timeout.as_ref(),
                Some(Duration::from_secs(3600)),
                &join(&cp, "idle_timeout"),
            )?,
            max_requests: common.max_requests_per_connection.val().filter(|&m| m > 0),
            max_duration_drain: if h.http1_safe_max_connection_duration {
                None
            } else {
                // Envoy's default drain_timeout (the field itself is
                // refused: it also times listener drains, which follow
                // --drain-time-s in Legate).
                Some(Duration::from_secs(5))
            },
            max_duration: common
                .max_connection_duration
                .as_ref()
                .map(|d| super::duration(d, &join(&cp, "max_connection_duration")))
                .transpose()?
                .filter(|d| !d.is_zero()),
            h2: H2Settings::from_proto(h.http2_protocol_options.as_ref()),
        };
        if h.http2_protocol_options
            .as_ref()
            .is_some_and(|o| o.override_stream_error_on_invalid_http_message.is_some())
        {
            return Err(ConfigError::new(
                join(
                    path,
                    "http2_protocol_options.override_stream_error_on_invalid_http_message",
                ),
                "supported on clusters only (a connection manager's malformed-request handling is its codec's)",
            ));
        }
        use legate_proto::envoy_types::pb::envoy::config::core::v3::http_protocol_options::HeadersWithUnderscoresAction as U;
        let underscores =
            match U::try_from(common.headers_with_underscores_action).unwrap_or(U::Allow) {
                U::Allow => UnderscoreAction::Allow,
                U::RejectRequest => UnderscoreAction::RejectRequest,
                U::DropHeader => UnderscoreAction::DropHeader,
            };
        let max_kb = h.max_request_headers_kb.val().unwrap_or(60);
        if !(1..=64).contains(&max_kb) {
            // pingora's HTTP/2 server caps the header list at 64 KiB.
            return Err(ConfigError::new(
                join(path, "max_request_headers_kb"),
                "values above 64 are not supported (pingora's HTTP/2 limit)",
            ));
        }
        let h1 = h.http_protocol_options.as_ref();
        Ok(Self {
            header_case: crate::header_case::HeaderCase::from_proto(
                h1,
                &join(path, "http_protocol_options"),
                false,
            )?,
            http10: h1
                .filter(|o| o.accept_http_10)
                .map(|o| o.default_host_for_http_10.clone()),
            ignore_upgrades: h1
                .map(|o| &o.ignore_http_11_upgrade[..])
                .unwrap_or_default()
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    super::matcher::StringMatcher::from_proto(
                        m,
                        &index(
                            &join(path, "http_protocol_options"),
                            "ignore_http_11_upgrade",
                            i,
                        ),
                    )
                })
                .collect::<Result<_>>()?,
            stat_prefix: h.stat_prefix.clone(),
            codec,
            routes,
            ip_detection: ip_detection(h, path)?,
            early_mutations: h
                .early_header_mutation_extensions
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    let p = index(path, "early_header_mutation_extensions", i);
                    let any = e.typed_config.as_ref().ok_or_else(|| {
                        ConfigError::new(join(&p, "typed_config"), "typed_config is required")
                    })?;
                    crate::http_filters::header_mutation::Early::from_any(any, &p)
                })
                .collect::<Result<_>>()?,
            use_remote_address: h.use_remote_address.val().unwrap_or(false),
            scheme_matches_upstream: h
                .scheme_header_transformation
                .as_ref()
                .is_some_and(|t| t.match_upstream),
            xff_num_trusted_hops: h.xff_num_trusted_hops,
            skip_xff_append: h.skip_xff_append,
            server_name: if h.server_name.is_empty() {
                "envoy".into()
            } else {
                h.server_name.clone()
            },
            server_header,
            strip_matching_host_port: h.strip_matching_host_port,
            strip_trailing_host_dot: h.strip_trailing_host_dot,
            strip_any_host_port: matches!(
                h.strip_port_mode,
                Some(hcm::http_connection_manager::StripPortMode::StripAnyHostPort(true))
            ),
            normalize_path: h.normalize_path.val().unwrap_or(false),
            merge_slashes: h.merge_slashes,
            escaped_slashes,
            max_request_headers_kb: max_kb,
            max_headers_count: {
                if common.max_response_headers_kb.is_some() {
                    // Envoy refuses it here too: it limits upstream responses.
                    return Err(ConfigError::new(
                        join(&cp, "max_response_headers_kb"),
                        "cannot be set on http_connection_manager (it is a cluster's)",
                    ));
                }
                let n = common.max_headers_count.val().unwrap_or(100);
                if n > 256 {
                    // pingora's HTTP/1 parser stops at 256 headers.
                    return Err(ConfigError::new(
                        join(&cp, "max_headers_count"),
                        "values above 256 are not supported (pingora's HTTP/1 limit)",
                    ));
                }
                n
            },
            underscores,
            generate_request_id: h.generate_request_id.val().unwrap_or(true),
            request_id: request_id_extension(
                h.request_id_extension.as_ref(),
                &join(path, "request_id_extension"),
            )?,
            tracing: h
                .tracing
                .as_ref()
                .map(|t| {
                    crate::trace::Tracing::from_proto(
                        t,
                        start_child_span(h),
                        &join(path, "tracing"),
                    )
                })
                .transpose()?,
            preserve_external_request_id: h.preserve_external_request_id,
            always_set_request_id_in_response: h.always_set_request_id_in_response,
            ecds,
            filters,
            suppress_envoy_headers,
            proxy_100_continue: h.proxy_100_continue,
            upgrades: h
                .upgrade_configs
                .iter()
                .filter(|u| u.enabled.as_ref().is_none_or(|e| e.value))
                .map(|u| u.upgrade_type.to_ascii_lowercase())
                .collect(),
            xfcc: {
                use hcm::http_connection_manager::ForwardClientCertDetails as F;
                match F::try_from(h.forward_client_cert_details).unwrap_or(F::Sanitize) {
                    F::Sanitize => XfccMode::Sanitize,
                    F::ForwardOnly => XfccMode::ForwardOnly,
                    F::AppendForward => XfccMode::AppendForward,
                    F::SanitizeSet => XfccMode::SanitizeSet,
                    F::AlwaysForwardOnly => XfccMode::AlwaysForwardOnly,
                }
            },
            xfcc_details: match &h.set_current_client_cert_details {
                None => XfccDetails::default(),
                Some(d) => {
                    if d.format != 0 {
                        return Err(ConfigError::new(
                            join(path, "set_current_client_cert_details.format"),
                            "only the ENVOY format is supported",
                        ));
                    }
                    XfccDetails {
                        subject: d.subject.val().unwrap_or(false),
                        issuer: d.issuer,
                        cert: d.cert,
                        chain: d.chain,
                        dns: d.dns,
                        uri: d.uri,
                    }
                }
            },
            access_log: crate::access_log::list(&h.access_log, path)?,
            conn,
            max_stream_duration: common
                .max_stream_duration
                .as_ref()
                .map(|d| super::duration(d, &join(&cp, "max_stream_duration")))
                .transpose()?
                .filter(|d| !d.is_zero()),
            stream_idle_timeout: super::timeout_or(
                h.stream_idle_timeout.as_ref(),
                Some(Duration::from_secs(300)),
                &join(path, "stream_idle_timeout"),
            )?,
            request_timeout: super::timeout_or(
                h.request_timeout.as_ref(),
                None,
                &join(path, "request_timeout"),
            )?,
            stats: Default::default(),
        })
    }
}

impl Hcm {
    /// `http.<stat_prefix>.*`, registered on the first request.
    pub fn stats(&self) -> &crate::stats::HttpStats {
        self.stats
            .get_or_init(|| crate::stats::HttpStats::new(&self.stat_prefix))
    }

    /// The inline route table, when routes are not dynamic.
    pub fn static_routes(&self) -> Option<&Arc<RouteConfig>> {
        match &self.routes {
            RouteSource::Static(rc) => Some(rc),
            _ => None,
        }
    }
}

impl Listener {
    /// Every chain's network filter, the default chain's last.
    pub fn filters(&self) -> impl Iterator<Item = &NetworkFilter> {
        self.chains
            .iter()
            .map(|(_, c)| &c.filter)
            .chain(self.default_chain.iter().map(|c| &c.filter))
    }

    /// The SDS secrets the listener's TLS chains, HTTP filters and inline
    /// route tables' per-route filter configs use.
    pub fn sds_refs(&self) -> impl Iterator<Item = &(String, XdsSource)> {
        let filters = self
            .hcms()
            .flat_map(|h| h.filters.entries.iter())
            .flat_map(|e| e.filter.sds_refs().iter());
        let routes = self.hcms().flat_map(|h| match &h.routes {
            RouteSource::Static(rc) => rc.sds_refs(),
            _ => Vec::new(),
        });
        self.chains
            .iter()
            .map(|(_, c)| c)
            .chain(self.default_chain.iter())
            .filter_map(|c| c.tls.as_ref())
            .flat_map(|t| t.sds.iter())
            .chain(filters)
            .chain(routes)
    }

    /// Every HTTP connection manager of the listener.
    pub fn hcms(&self) -> impl Iterator<Item = &Arc<Hcm>> {
        self.filters().filter_map(|f| match f {
            NetworkFilter::Http(h) => Some(h),
            NetworkFilter::Tcp(_) => None,
        })
    }

    /// The chain a new connection gets (Envoy's filter_chain_match), else
    /// the default chain; None: the connection is closed.
    pub fn select(&self, conn: &super::filter_chain::ConnInfo) -> Option<&FilterChain> {
        // Runs on every accepted connection: scores the chains in place.
        match super::filter_chain::select(self.chains.iter().map(|(m, _)| m), conn) {
            Some(i) => Some(&self.chains[i].1),
            None => self.default_chain.as_ref(),
        }
    }

    /// Clusters named by the listener's inline routes and tcp_proxy filters.
    pub fn static_cluster_refs(&self) -> Vec<String> {
        let mut out = Vec::new();
        for f in self.filters() {
            match f {
                NetworkFilter::Http(h) => {
                    if let Some(rc) = h.static_routes() {
                        out.extend(rc.cluster_names().map(str::to_string));
                    }
                }
                NetworkFilter::Tcp(t) => out.extend(t.clusters.iter().map(|(c, _)| c.clone())),
            }
        }
        if let Some(p) = self.udp.as_ref().and_then(|u| u.proxy.as_ref()) {
            out.extend(p.clusters().cloned());
        }
        out
    }
}

/// The network filter a filter chain ends in.
fn chain_filter(fc: &pb::FilterChain, fc_path: &str) -> Result<FilterChain> {
    let fc_path = fc_path.to_string();
    let Some(last) = fc.filters.len().checked_sub(1) else {
        return Err(ConfigError::new(
            join(&fc_path, "filters"),
            "a network filter (http_connection_manager or tcp_proxy) is required",
        ));
    };
    let mut limits = Vec::new();
    let mut rbac = Vec::new();
    let mut ratelimits = Vec::new();
    let (mut exchange, mut istio_stats) = (None, None);
    for (i, f) in fc.filters[..last].iter().enumerate() {
        let f_path = join(&index(&fc_path, "filters", i), "typed_config");
        let any = match &f.config_type {
            Some(pb::filter::ConfigType::TypedConfig(a)) => a,
            _ => return Err(ConfigError::new(f_path, "typed_config is required")),
        };
        let tn = legate_proto::type_name(&any.type_url);
        match tn {
            CONNECTION_LIMIT_TYPE => {
                let c: legate_proto::envoy_types::pb::envoy::extensions::filters::network::connection_limit::v3::ConnectionLimit =
                    prost::Message::decode(any.value.as_slice())
                        .map_err(|e| ConfigError::new(&f_path, e.to_string()))?;
                limits.push(Arc::new(ConnectionLimit::from_proto(&c, &f_path)?));
            }
            super::local_ratelimit::LOCAL_RATELIMIT_TYPE => {
                let l = prost::Message::decode(any.value.as_slice())
                    .map_err(|e| ConfigError::new(&f_path, e.to_string()))?;
                ratelimits.push(Arc::new(
                    super::local_ratelimit::LocalRateLimit::from_proto(&l, &f_path)?,
                ));
            }
            super::rbac::RBAC_TYPE => {
                let r = prost::Message::decode(any.value.as_slice())
                    .map_err(|e| ConfigError::new(&f_path, e.to_string()))?;
                rbac.push(Arc::new(super::rbac::Rbac::from_proto(&r, &f_path)?));
            }
            legate_proto::istio::METADATA_EXCHANGE if exchange.is_none() => {
                exchange = Some(Arc::new(crate::istio::exchange::Exchange::from_any(
                    any, &f_path,
                )?));
            }
            legate_proto::istio::STATS if istio_stats.is_none() => {
                istio_stats = Some(crate::istio::stats::from_any(any, &f_path)?);
            }
            _ => {
                return Err(ConfigError::new(
                    f_path,
                    format!("network filter {tn} is not supported before the terminal filter"),
                ))
            }
        }
    }
    let filter = terminal_filter(fc, &fc_path, last)?;
    let tls = match &fc.transport_socket {
        Some(ts) => super::tls::downstream(ts, &join(&fc_path, "transport_socket"))?,
        None => None,
    };
    istio_before_hcm(
        fc,
        &fc_path,
        &filter,
        tls.as_deref(),
        exchange.as_deref(),
        istio_stats.is_some(),
    )?;
    let handshake_timeout = match &fc.transport_socket_connect_timeout {
        Some(d) => super::duration(d, &join(&fc_path, "transport_socket_connect_timeout"))?,
        None => DEFAULT_HANDSHAKE_TIMEOUT,
    };
    Ok(FilterChain {
        limits,
        rbac,
        ratelimits,
        exchange,
        istio_stats,
        filter,
        tls,
        handshake_timeout,
    })
}

/// Istio's network filters before a connection manager: the exchange only
/// if the handshake can never settle on its protocol (then it does
/// nothing, as in Istio's proxy), and no TCP metrics.
fn istio_before_hcm(
    fc: &pb::FilterChain,
    fc_path: &str,
    filter: &NetworkFilter,
    tls: Option<&super::tls::ServerTls>,
    exchange: Option<&crate::istio::exchange::Exchange>,
    istio_stats: bool,
) -> Result<()> {
    if !matches!(filter, NetworkFilter::Http(_)) {
        return Ok(());
    }
    let at = |t: &str| {
        fc.filters
            .iter()
            .position(|f| {
                matches!(&f.config_type, Some(pb::filter::ConfigType::TypedConfig(a))
                    if legate_proto::type_name(&a.type_url) == t)
            })
            .map(|i| index(fc_path, "filters", i))
            .unwrap_or_default()
    };
    if istio_stats {
        return Err(ConfigError::new(
            at(legate_proto::istio::STATS),
            "the network istio.stats is supported before tcp_proxy only",
        ));
    }
    if let (Some(x), Some(tls)) = (exchange, tls) {
        if tls
            .config
            .alpn_protocols
            .iter()
            .any(|p| p == x.protocol.as_bytes())
        {
            return Err(ConfigError::new(
                at(legate_proto::istio::METADATA_EXCHANGE),
                "a metadata exchange before http_connection_manager whose TLS offers its protocol is not supported",
            ));
        }
    }
    Ok(())
}

fn terminal_filter(fc: &pb::FilterChain, fc_path: &str, last: usize) -> Result<NetworkFilter> {
    let fc_path = fc_path.to_string();
    let f = &fc.filters[last];
    let f_path = index(&fc_path, "filters", last);
    use pb::filter::ConfigType;
    let any = match &f.config_type {
        Some(ConfigType::TypedConfig(a)) => a,
        _ => {
            return Err(ConfigError::new(
                join(&f_path, "typed_config"),
                "typed_config is required",
            ))
        }
    };
    let tn = legate_proto::type_name(&any.type_url);
    let tc_path = join(&f_path, "typed_config");
    let filter = match tn {
        HCM_TYPE => {
            let h: hcm::HttpConnectionManager = prost::Message::decode(any.value.as_slice())
                .map_err(|e| ConfigError::new(&tc_path, e.to_string()))?;
            NetworkFilter::Http(Arc::new(Hcm::from_proto(&h, &tc_path)?))
        }
        TCP_PROXY_TYPE => {
            use legate_proto::envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp;
            let t: tcp::TcpProxy = prost::Message::decode(any.value.as_slice())
                .map_err(|e| ConfigError::new(&tc_path, e.to_string()))?;
            NetworkFilter::Tcp(Arc::new(TcpProxy::from_proto(&t, &tc_path)?))
        }
        _ => {
            return Err(ConfigError::new(
                tc_path,
                format!("network filter {tn} is not supported"),
            ))
        }
    };
    Ok(filter)
}

impl TcpProxy {
    pub fn from_proto(
        t: &legate_proto::envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy,
        path: &str,
    ) -> Result<Self> {
        use legate_proto::envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::ClusterSpecifier;
        if t.stat_prefix.is_empty() {
            return Err(ConfigError::new(
                join(path, "stat_prefix"),
                "stat_prefix is required",
            ));
        }
        let clusters = match &t.cluster_specifier {
            Some(ClusterSpecifier::Cluster(c)) => vec![(c.clone(), 1)],
            Some(ClusterSpecifier::WeightedClusters(w)) => {
                if w.clusters.is_empty() {
                    return Err(ConfigError::new(
                        join(path, "weighted_clusters.clusters"),
                        "at least one cluster is required",
                    ));
                }
                w.clusters
                    .iter()
                    .map(|c| (c.name.clone(), c.weight))
                    .collect()
            }
            None => {
                return Err(ConfigError::new(
                    join(path, "cluster"),
                    "cluster is required",
                ))
            }
        };
        let idle_timeout = super::timeout_or(
            t.idle_timeout.as_ref(),
            Some(std::time::Duration::from_secs(3600)),
            &join(path, "idle_timeout"),
        )?;
        Ok(Self {
            stat_prefix: t.stat_prefix.clone(),
            clusters,
            idle_timeout,
            max_connect_attempts: t.max_connect_attempts.val().unwrap_or(1).max(1),
            max_duration: super::timeout_or(
                t.max_downstream_connection_duration.as_ref(),
                None,
                &join(path, "max_downstream_connection_duration"),
            )?,
            hash_source_ip: {
                use legate_proto::envoy_types::pb::envoy::r#type::v3::hash_policy::PolicySpecifier as P;
                let mut on = false;
                for (i, h) in t.hash_policy.iter().enumerate() {
                    match &h.policy_specifier {
                        Some(P::SourceIp(_)) => on = true,
                        _ => {
                            return Err(ConfigError::new(
                                index(path, "hash_policy", i),
                                "only source_ip hashing is supported",
                            ))
                        }
                    }
                }
                on
            },
            access_log: crate::access_log::list(&t.access_log, path)?,
        })
    }
}

impl Scoped {
    pub fn from_proto(sr: &hcm::ScopedRoutes, path: &str) -> Result<Self> {
        use hcm::scoped_routes::scope_key_builder::fragment_builder::{
            header_value_extractor::ExtractType, Type,
        };
        use hcm::scoped_routes::ConfigSpecifier;
        let kb = sr.scope_key_builder.as_ref().ok_or_else(|| {
            ConfigError::new(
                join(path, "scope_key_builder"),
                "scope_key_builder is required",
            )
        })?;
        let mut fragments = Vec::new();
        for (i, f) in kb.fragments.iter().enumerate() {
            let p = index(&join(path, "scope_key_builder"), "fragments", i);
            let Some(Type::HeaderValueExtractor(h)) = &f.r#type else {
                return Err(ConfigError::new(
                    join(&p, "header_value_extractor"),
                    "a header_value_extractor is required",
                ));
            };
            let index = match &h.extract_type {
                Some(ExtractType::Index(i)) => *i,
                None => 0,
                Some(ExtractType::Element(_)) => {
                    return Err(ConfigError::new(
                        join(&p, "header_value_extractor.element"),
                        "key-value elements are not supported yet",
                    ))
                }
            };
            fragments.push(KeyFragment {
                header: h.name.to_ascii_lowercase(),
                separator: if h.element_separator.is_empty() {
                    ",".into()
                } else {
                    h.element_separator.clone()
                },
                index,
            });
        }
        let rds = sr.rds_config_source.as_ref().ok_or_else(|| {
            ConfigError::new(
                join(path, "rds_config_source"),
                "rds_config_source is required",
            )
        })?;
        let rds_source = XdsSource::from_proto(rds, &join(path, "rds_config_source"))?;
        let scopes = match &sr.config_specifier {
            Some(ConfigSpecifier::ScopedRds(s)) => {
                let cs = s.scoped_rds_config_source.as_ref().ok_or_else(|| {
                    ConfigError::new(
                        join(path, "scoped_rds.scoped_rds_config_source"),
                        "scoped_rds_config_source is required",
                    )
                })?;
                ScopeList::Srds(XdsSource::from_proto(
                    cs,
                    &join(path, "scoped_rds.scoped_rds_config_source"),
                )?)
            }
            Some(ConfigSpecifier::ScopedRouteConfigurationsList(l)) => ScopeList::Inline(
                l.scoped_route_configurations
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        super::scoped::Scope::from_proto(
                            c,
                            &index(
                                &join(path, "scoped_route_configurations_list"),
                                "scoped_route_configurations",
                                i,
                            ),
                        )
                    })
                    .collect::<Result<_>>()?,
            ),
            None => {
                return Err(ConfigError::new(
                    join(path, "scoped_rds"),
                    "scoped_rds or scoped_route_configurations_list is required",
                ))
            }
        };
        Ok(Self {
            fragments,
            rds_source,
            scopes,
        })
    }
}

/// The router filter's config.
/// `http_filters`: the filters before the router, the router's ECDS
/// sources, and its `suppress_envoy_headers`. The list must end in the
/// router.
type HttpFilters = (
    crate::http_filters::FilterChain,
    Vec<(String, XdsSource)>,
    bool,
);

fn http_filters(h: &hcm::HttpConnectionManager, path: &str) -> Result<HttpFilters> {
    if h.http_filters.is_empty() {
        return Err(ConfigError::new(
            join(path, "http_filters"),
            "the router filter is required",
        ));
    }
    let mut chain = crate::http_filters::FilterChain::default();
    let mut ecds = Vec::new();
    let mut suppress_envoy_headers = false;
    let last = h.http_filters.len() - 1;
    for (i, f) in h.http_filters.iter().enumerate() {
        let p = index(path, "http_filters", i);
        use hcm::http_filter::ConfigType;
        let typed = match &f.config_type {
            Some(ConfigType::TypedConfig(a)) => a,
            Some(ConfigType::ConfigDiscovery(cd)) => {
                ecds.extend(discovered(&f.name, cd, &join(&p, "config_discovery"))?);
                if i != last {
                    return Err(ConfigError::new(
                        p,
                        "the router must be the last HTTP filter",
                    ));
                }
                continue;
            }
            None => {
                return Err(ConfigError::new(
                    join(&p, "typed_config"),
                    "typed_config is required",
                ))
            }
        };
        let tp = join(&p, "typed_config");
        let tn = legate_proto::type_name(&typed.type_url);
        if tn == ROUTER_TYPE {
            if i != last {
                return Err(ConfigError::new(
                    p,
                    "the router must be the last HTTP filter",
                ));
            }
            suppress_envoy_headers = router(typed, &tp)?.suppress_envoy_headers;
            continue;
        }
        match crate::http_filters::FilterChain::entry(
            &f.name,
            typed,
            f.disabled,
            &h.stat_prefix,
            &tp,
        )? {
            Some(_) if i == last => {
                return Err(ConfigError::new(
                    p,
                    "the last HTTP filter must be the router",
                ));
            }
            Some(e) => chain.entries.push(e),
            None if f.is_optional && legate_proto::pool().get_message_by_name(tn).is_none() => {
                tracing::warn!(path = %p, filter = %tn, "optional HTTP filter is not supported; skipped as Envoy skips unknown optional filters");
            }
            None => {
                return Err(ConfigError::new(
                    tp,
                    format!("HTTP filter {tn} is not supported"),
                ))
            }
        }
    }
    Ok((chain, ecds, suppress_envoy_headers))
}

/// An ECDS-discovered filter: only the router's config can be discovered
/// yet. Its source, unless its default config applies without warming.
fn discovered(
    name: &str,
    cd: &legate_proto::envoy_types::pb::envoy::config::core::v3::ExtensionConfigSource,
    cp: &str,
) -> Result<Option<(String, XdsSource)>> {
    let only_router = !cd.type_urls.is_empty()
        && cd
            .type_urls
            .iter()
            .all(|u| legate_proto::type_name(u) == ROUTER_TYPE);
    if !only_router {
        return Err(ConfigError::new(
            join(cp, "type_urls"),
            "only the router filter's config can be discovered (ECDS)",
        ));
    }
    if let Some(d) = &cd.default_config {
        if legate_proto::type_name(&d.type_url) != ROUTER_TYPE {
            return Err(ConfigError::new(
                join(cp, "default_config"),
                "the default config must be the router's",
            ));
        }
        discovered_router(d, &join(cp, "default_config"))?;
    }
    let source = cd
        .config_source
        .as_ref()
        .ok_or_else(|| ConfigError::new(join(cp, "config_source"), "config_source is required"))?;
    let source = XdsSource::from_proto(source, &join(cp, "config_source"))?;
    if cd.apply_default_config_without_warming && cd.default_config.is_some() {
        return Ok(None);
    }
    Ok(Some((name.to_string(), source)))
}

/// The router's `start_child_span`: what `spawn_upstream_span` is when the
/// connection manager's tracing leaves it unset.
fn start_child_span(h: &hcm::HttpConnectionManager) -> bool {
    use hcm::http_filter::ConfigType;
    h.http_filters.iter().any(|f| match &f.config_type {
        Some(ConfigType::TypedConfig(a)) if legate_proto::type_name(&a.type_url) == ROUTER_TYPE => {
            router(a, "").is_ok_and(|r| r.start_child_span)
        }
        _ => false,
    })
}

fn router(
    a: &legate_proto::envoy_types::pb::google::protobuf::Any,
    path: &str,
) -> Result<legate_proto::envoy_types::pb::envoy::extensions::filters::http::router::v3::Router> {
    prost::Message::decode(a.value.as_slice()).map_err(|e| ConfigError::new(path, e.to_string()))
}

/// A router config found through ECDS: Legate applies none of its fields
/// yet, so one that would change traffic is refused.
pub fn discovered_router(
    a: &legate_proto::envoy_types::pb::google::protobuf::Any,
    path: &str,
) -> Result<()> {
    if router(a, path)?.suppress_envoy_headers {
        return Err(ConfigError::new(
            join(path, "suppress_envoy_headers"),
            "not applied to a router config discovered through ECDS yet",
        ));
    }
    Ok(())
}

/// `request_id_extension`: only Envoy's default, the UUID one, which is
/// what Legate's request ids are.
fn request_id_extension(
    e: Option<&hcm::RequestIdExtension>,
    path: &str,
) -> Result<crate::trace::decision::IdOptions> {
    const UUID: &str = "envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig";
    match e.and_then(|e| e.typed_config.as_ref()) {
        None => Ok(Default::default()),
        Some(a) if legate_proto::type_name(&a.type_url) == UUID => {
            let u: legate_proto::envoy_types::pb::envoy::extensions::request_id::uuid::v3::UuidRequestIdConfig =
                prost::Message::decode(a.value.as_slice())
                    .map_err(|e| ConfigError::new(join(path, "typed_config"), e.to_string()))?;
            Ok(crate::trace::decision::IdOptions {
                pack: u.pack_trace_reason.val().unwrap_or(true),
                sample_by_id: u.use_request_id_for_trace_sampling.val().unwrap_or(true),
            })
        }
        Some(a) => Err(ConfigError::new(
            join(path, "typed_config"),
            format!(
                "{} is not supported (only {UUID})",
                legate_proto::type_name(&a.type_url)
            ),
        )),
    }
}

/// `original_ip_detection_extensions` (Envoy refuses them beside
/// `use_remote_address`).
fn ip_detection(
    h: &legate_proto::envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager,
    path: &str,
) -> Result<Vec<super::ip_detection::Detection>> {
    let p = join(path, "original_ip_detection_extensions");
    if !h.original_ip_detection_extensions.is_empty() && h.use_remote_address.val().unwrap_or(false)
    {
        return Err(ConfigError::new(
            &p,
            "original IP detection extensions and use_remote_address may not be mixed",
        ));
    }
    h.original_ip_detection_extensions
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let ep = format!("{p}[{i}]");
            let any = e.typed_config.as_ref().ok_or_else(|| {
                ConfigError::new(join(&ep, "typed_config"), "typed_config is required")
            })?;
            super::ip_detection::Detection::from_any(any, &ep)
        })
        .collect()
}

/// A listener's `access_log`. Envoy writes a line for every connection
/// when it closes; Legate writes one only for a connection no filter chain
/// takes, so it takes only loggers that keep just those lines (a
/// `response_flag_filter` of `NR`, what Istio and Envoy Gateway send).
fn listener_access_log(
    logs: &[legate_proto::envoy_types::pb::envoy::config::accesslog::v3::AccessLog],
    path: &str,
) -> Result<Vec<Arc<crate::access_log::AccessLog>>> {
    for (i, a) in logs.iter().enumerate() {
        let p = join(&index(path, "access_log", i), "filter");
        let filter = a
            .filter
            .as_ref()
            .map(|f| crate::access_log::filter::Filter::from_proto(f, &p))
            .transpose()?;
        if !filter.is_some_and(|f| f.implies_no_route()) {
            return Err(ConfigError::new(
                p,
                "a listener's access log must keep only NR lines (a response_flag_filter of NR, alone or under and_filter): Legate logs only connections no filter chain takes",
            ));
        }
    }
    crate::access_log::list(logs, path)
}

#[cfg(test)]
mod filter_predicate_tests {
    use super::FilterPredicate as P;

    #[test]
    fn istio_skips_http_inspector_on_its_own_ports() {
        // Istio's virtualInbound: not on 15006, nor on a port it knows.
        let p = P::Or(vec![
            P::DestinationPort(15006, 15007),
            P::DestinationPort(19080, 19081),
        ]);
        assert!(p.matches(15006) && p.matches(19080));
        assert!(!p.matches(15007) && !p.matches(8080));
        assert!(P::Not(Box::new(p.clone())).matches(8080));
        assert!(!P::And(vec![p, P::Any]).matches(8080));
    }
}
