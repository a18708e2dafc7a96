//! HTTP filters: the connection manager's `http_filters` before the router.
//!
//! Each filter is one module with its config translation (`from_proto`,
//! with field paths in errors), its registry entries (so
//! `docs/compatibility.md` lists its fields), its runtime and its tests.
//! A module's [`Factory`] turns the filter's `typed_config` into an
//! [`HttpFilter`]: the immutable config plus whatever live state the filter
//! keeps (a token bucket). Per-route configs (`typed_per_filter_config`) are
//! translated with the route table, by the `Any`'s type, since RDS arrives
//! without its listener.
//!
//! The interface is Legate's own, called by the HTTP engine
//! (`server::hcm`): once per request after route selection
//! ([`HttpFilter::on_request`], in configured order), and on the response
//! headers ([`HttpFilter::on_response`], in reverse order) of every
//! response, proxied or local, as Envoy's encoder filters see local replies
//! too.

pub mod api_key_auth;
pub mod basic_auth;
pub mod buffer;
pub mod chain;
pub mod compressor;
pub mod cors;
pub mod credential_injector;
pub mod csrf;
pub mod custom_response;
pub mod ext_authz;
pub mod ext_proc;
pub mod fault;
pub mod grpc_stats;
pub mod grpc_web;
pub mod header_mutation;
pub mod health_check;
pub mod jwt_authn;
pub mod local_ratelimit;
pub mod oauth2;
pub mod rate_limit_actions;
pub mod ratelimit;
pub mod rbac;
pub mod retry;
pub mod side;
pub mod stateful_session;

use crate::config::Result;
use crate::registry::MessageSupport;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use legate_proto::envoy_types::pb::google::protobuf::Any;
use pingora_http::{RequestHeader, ResponseHeader};
use std::any::Any as StdAny;
use std::net::SocketAddr;
use std::sync::Arc;

pub use chain::{FilterChain, PerFilterConfigs};

/// A filter's per-request state, kept from its request hook for its
/// response hook.
pub type State = Box<dyn StdAny + Send + Sync>;

/// A translated per-route config (`typed_per_filter_config`), downcast by
/// the filter that owns it.
pub type PerRoute = Arc<dyn StdAny + Send + Sync>;

/// What the request side knows, for filters to read and change.
pub struct RequestInfo<'a> {
    pub req: &'a mut RequestHeader,
    /// The trusted client address (XFF-derived when configured).
    pub remote: Option<SocketAddr>,
    /// The peer of the connection.
    pub direct_remote: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    /// What the client's certificate showed, on mTLS connections.
    pub peer_tls: Option<&'a crate::server::xfcc::PeerTls>,
    /// The connection's requested server name (SNI), or empty.
    pub sni: &'a str,
    /// `http` or `https`.
    pub scheme: &'a str,
    /// The request carries `content-type: application/grpc*`.
    pub grpc: bool,
    /// The request has no body (its headers ended the stream).
    pub end_of_stream: bool,
    /// The request body, for a filter that asked for it
    /// ([`HttpFilter::request_body_limit`]).
    pub body: Option<&'a Bytes>,
    /// State the request's filters share (Envoy's filter state): the
    /// compressors register themselves here.
    pub filter_state: &'a mut http::Extensions,
    /// This filter's per-route configs: the weighted cluster's, the
    /// route's, the virtual host's and the route configuration's (most
    /// specific first), where set.
    pub per_route: [Option<&'a PerRoute>; 4],
    /// The upstream cluster the route chose, if it forwards.
    pub cluster: Option<&'a str>,
    /// A route was selected and it forwards (Envoy's route entry); false
    /// for no route, a direct response or a redirect.
    pub forwards: bool,
    /// A route was selected (of any action).
    pub has_route: bool,
    /// The selected route's `metadata`.
    pub route_metadata:
        Option<&'a legate_proto::envoy_types::pb::envoy::config::core::v3::Metadata>,
    pub runtime: &'a crate::runtime::Runtime,
    /// Response flags the filter sets while letting the request go on
    /// (a fault's `DI`).
    pub flags: Vec<&'static str>,
    /// Set by a filter that changed what routing reads (Envoy's
    /// `clearRouteCache`): the route is selected again before the next
    /// filter runs.
    pub clear_route_cache: bool,
    /// The forwarding route's `rate_limits`, its virtual host's, and the
    /// route's `include_vh_rate_limits` (empty without such a route).
    pub route_rate_limits: &'a [rate_limit_actions::RateLimit],
    pub vhost_rate_limits: &'a [rate_limit_actions::RateLimit],
    pub include_vh_rate_limits: bool,
    /// `node.cluster`.
    pub service_cluster: &'a str,
    /// The cluster manager, for filters that call side services.
    pub clusters: &'a Arc<crate::cluster_manager::ClusterManager>,
    /// `/healthcheck/fail` is in force.
    pub health_failed: bool,
    /// The request's dynamic metadata: namespace → object. Filters write
    /// it (jwt_authn's payloads) for later filters and the access log.
    pub metadata: &'a mut Metadata,
}

/// Dynamic metadata: namespace → its fields.
pub type Metadata = serde_json::Map<String, serde_json::Value>;

impl RequestInfo<'_> {
    /// Every level's per-route config, most specific first.
    pub fn all_levels<T: Send + Sync + 'static>(&self) -> impl Iterator<Item = Arc<T>> + '_ {
        self.per_route
            .iter()
            .flatten()
            .filter_map(|c| Arc::clone(c).downcast::<T>().ok())
    }

    /// The request's authority (`:authority`, else Host), in the order the
    /// connection manager reads it for routing.
    pub fn authority(&self) -> &str {
        crate::routing::authority(self.req)
    }

    /// The request's pseudo-headers as matchers read them.
    pub fn pseudo(&self) -> crate::config::matcher::Pseudo<'_> {
        crate::config::matcher::Pseudo {
            method: self.req.method.as_str(),
            path: self.req.uri.path_and_query().map_or("/", |p| p.as_str()),
            authority: self.authority(),
            scheme: self.scheme,
            status: None,
        }
    }

    /// What unified matchers (and CEL at request time) read from this
    /// request.
    pub fn match_data(&self) -> crate::config::unified_matcher::Data<'_> {
        crate::config::unified_matcher::Data {
            headers: &self.req.headers,
            pseudo: self.pseudo(),
            metadata: self.metadata,
            remote: self.remote.or(self.direct_remote),
            direct_remote: self.direct_remote,
            local: self.local,
            sni: self.sni,
            response: None,
        }
    }

    /// What rate limit actions read from this request.
    pub fn rate_limit_facts(&self) -> rate_limit_actions::RequestFacts<'_> {
        let pseudo = self.pseudo();
        rate_limit_actions::RequestFacts {
            headers: &self.req.headers,
            pseudo,
            path_and_query: pseudo.path,
            remote: self.remote,
            cluster: self.cluster.unwrap_or(""),
            local_cluster: self.service_cluster,
        }
    }

    /// The request as an access log format sees it before any response
    /// (the rate limit filters' `hits_addend.format`).
    pub fn log_entry<'b>(&'b self, flags: &'b str) -> crate::access_log::Entry<'b> {
        let unknown: std::net::SocketAddr = ([0, 0, 0, 0], 0).into();
        crate::access_log::Entry {
            start: std::time::SystemTime::now(),
            duration: std::time::Duration::ZERO,
            bytes_received: 0,
            bytes_sent: 0,
            downstream_remote: self.remote.unwrap_or(unknown),
            downstream_direct_remote: self.direct_remote.unwrap_or(unknown),
            downstream_local: self.local.unwrap_or(unknown),
            upstream_host: None,
            upstream_local: None,
            upstream_cluster: self.cluster.unwrap_or(""),
            response_flags: flags,
            requested_server_name: self.sni,
            http: Some(crate::access_log::HttpFacts {
                request: &self.req.headers,
                pseudo: crate::config::matcher::Pseudo {
                    method: self.req.method.as_str(),
                    path: self.req.uri.path_and_query().map_or("", |p| p.as_str()),
                    authority: self.authority(),
                    scheme: self.scheme,
                    status: None,
                },
                response: None,
                protocol: "",
                response_code: 0,
                details: None,
                route_name: "",
                response_duration: None,
                attempts: 0,
                health_check: false,
                traced: false,
            }),
            trace: None,
        }
    }

    /// A header formatter's view of this request, read from `snapshot`
    /// (a copy of the request, so that the request itself can change).
    pub fn format_context<'b>(
        &self,
        snapshot: &'b RequestHeader,
    ) -> crate::headers::FormatContext<'b> {
        crate::headers::FormatContext {
            downstream_remote: self.remote,
            downstream_direct_remote: self.direct_remote,
            downstream_local: self.local,
            request_headers: Some(&snapshot.headers),
            pseudo: crate::config::matcher::Pseudo {
                method: snapshot.method.as_str(),
                path: snapshot.uri.path_and_query().map_or("/", |p| p.as_str()),
                authority: "",
                scheme: "",
                status: None,
            },
            ..Default::default()
        }
    }
}

/// What the response side sees.
pub struct ResponseInfo<'a> {
    pub req: &'a RequestHeader,
    /// The response is Legate's own (a local reply), not the upstream's.
    pub local: bool,
    pub remote: Option<SocketAddr>,
    pub direct_remote: Option<SocketAddr>,
    pub local_addr: Option<SocketAddr>,
    /// `/healthcheck/fail` is in force.
    pub health_failed: bool,
    /// `node.cluster`.
    pub service_cluster: &'a str,
    /// The cluster manager, for filters that call side services.
    pub clusters: &'a Arc<crate::cluster_manager::ClusterManager>,
    /// What the request's filters shared ([`RequestInfo::filter_state`]).
    pub filter_state: &'a http::Extensions,
    /// A local reply's body (None for an upstream's response).
    pub local_body: Option<&'a Bytes>,
    /// The upstream host that answered (None for a local reply).
    pub upstream: Option<SocketAddr>,
}

/// The upstream host a filter asks for (stateful_session's), in the
/// request's filter state: the router takes it when its cluster has it
/// healthy or degraded, whatever the balancer would pick (Envoy's override
/// host).
#[derive(Debug, Clone, Copy)]
pub struct OverrideHost(pub SocketAddr);

/// A reply a filter makes instead of letting the request go on.
#[derive(Debug, Clone)]
pub struct FilterReply {
    pub status: u16,
    pub body: Bytes,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Envoy's response code details (`%RESPONSE_CODE_DETAILS%`).
    pub details: std::borrow::Cow<'static, str>,
    /// Envoy's response flag, if the filter sets one (`RL`, `FI`, `UAEX`).
    pub flag: Option<&'static str>,
    /// For gRPC requests, the `grpc-status` to answer with instead of the
    /// one mapped from `status`.
    pub grpc_status: Option<u32>,
}

impl FilterReply {
    pub fn new(status: u16, body: &'static str, details: &'static str) -> Self {
        Self {
            status,
            body: Bytes::from_static(body.as_bytes()),
            headers: Vec::new(),
            details: details.into(),
            flag: None,
            grpc_status: None,
        }
    }
}

/// A filter's verdict on the request.
pub enum Flow {
    Continue,
    Reply(FilterReply),
}

/// One HTTP filter, built once per connection manager config.
#[async_trait::async_trait]
pub trait HttpFilter: Send + Sync + std::fmt::Debug {
    /// Runs once per request, after route selection. A filter that waits
    /// for something (a fault's delay) awaits here.
    async fn on_request(&self, rq: &mut RequestInfo<'_>, state: &mut Option<State>) -> Flow;

    /// Runs on the response headers, proxied or local.
    fn on_response(
        &self,
        _resp: &mut ResponseHeader,
        _info: &ResponseInfo<'_>,
        _state: Option<&State>,
    ) {
    }

    /// The most request body bytes this filter needs before its request
    /// hook runs (ext_authz's `with_request_body`), given its per-route
    /// configs (most specific first); None: it reads no body. The engine
    /// buffers the body (still forwarded whole) and hands it over as
    /// [`RequestInfo::body`]; a body over the limit is refused with 413.
    fn request_body_limit(&self, _per_route: &[Option<&PerRoute>; 4]) -> Option<usize> {
        None
    }

    /// Whether the response headers wait for this filter: the engine then
    /// awaits [`Self::on_response_wait`] instead of calling
    /// [`Self::on_response`] (only such filters pay for the await).
    fn waits_on_response(&self) -> bool {
        false
    }

    /// The response headers, for a filter that asks someone about them
    /// (ext_proc's processor): it may change them, or answer with a reply
    /// of its own instead, which the client gets directly, as Envoy's
    /// local reply from an encoder filter (no filter sees it).
    async fn on_response_wait(
        &self,
        _resp: &mut ResponseHeader,
        _info: &ResponseInfo<'_>,
        _state: &mut Option<State>,
    ) -> Option<FilterReply> {
        None
    }

    /// Whether the filter reads bodies and trailers: the engine calls the
    /// hooks below only for filters that say so.
    fn reads_bodies(&self) -> bool {
        false
    }

    /// Each chunk of the request body, as it is read, which the filter may
    /// replace (gRPC-Web's base64 decoding), or refuse with a reply.
    fn on_request_body(
        &self,
        _body: &mut Option<Bytes>,
        _end: bool,
        _state: &mut Option<State>,
    ) -> std::result::Result<(), FilterReply> {
        Ok(())
    }

    /// Each chunk of the response body (the upstream's, or a local
    /// reply's), which the filter may replace (a compressor's output).
    fn on_response_body(&self, _body: &mut Option<Bytes>, _end: bool, _state: &mut Option<State>) {}

    /// The upstream's response trailers; Some: they are sent as this last
    /// body chunk instead (gRPC-Web's trailer frame).
    fn on_response_trailers(
        &self,
        _trailers: &http::HeaderMap,
        _state: &mut Option<State>,
    ) -> Option<Bytes> {
        None
    }

    /// When the stream ends (Envoy's `onDestroy`), for a filter that kept
    /// state from its request hook and says it [`Self::wants_stream_done`].
    fn on_stream_done(&self, _done: &StreamDone<'_>, _state: Option<&State>) {}

    /// Whether [`Self::on_stream_done`] does anything (the engine builds
    /// what it reads only then).
    fn wants_stream_done(&self) -> bool {
        false
    }

    /// Whether [`Self::on_stream_done`] is called for every stream, also
    /// when this filter's request hook never ran (an earlier filter
    /// answered): an access log's view, as Istio's stats have.
    fn logs_every_stream(&self) -> bool {
        false
    }

    /// The SDS secrets the filter reads, which its listener subscribes to
    /// (and waits for, as Envoy's listener warms on them).
    fn sds_refs(&self) -> &[(String, crate::config::source::XdsSource)] {
        &[]
    }
}

/// What a finished stream tells its filters.
pub struct StreamDone<'a> {
    /// The request headers as the stream ended with them.
    pub req: &'a RequestHeader,
    /// The stream as its access log sees it.
    pub entry: &'a crate::access_log::Entry<'a>,
    pub metadata: &'a Metadata,
    pub runtime: &'a crate::runtime::Runtime,
    pub clusters: &'a Arc<crate::cluster_manager::ClusterManager>,
    /// `node.cluster`.
    pub service_cluster: &'a str,
    pub filter_state: &'a http::Extensions,
    /// The last attempt's host.
    pub host: Option<&'a Arc<crate::cluster_manager::UpstreamHost>>,
    /// The listener's traffic_direction is INBOUND.
    pub inbound: bool,
}

impl StreamDone<'_> {
    /// What rate limit actions read, from the final request and the
    /// `cluster` the request was routed to.
    pub fn facts<'b>(&'b self, cluster: &'b str) -> rate_limit_actions::RequestFacts<'b> {
        let path_and_query = self.req.uri.path_and_query().map_or("/", |p| p.as_str());
        let pseudo = self.entry.http.as_ref().map(|h| h.pseudo);
        rate_limit_actions::RequestFacts {
            headers: &self.req.headers,
            pseudo: crate::config::matcher::Pseudo {
                path: path_and_query,
                ..pseudo.unwrap_or_default()
            },
            path_and_query,
            remote: Some(self.entry.downstream_remote),
            cluster,
            local_cluster: self.service_cluster,
        }
    }
}

/// How a filter type is built: the factory table's row.
pub struct Factory {
    /// The type of its `typed_config`.
    pub type_name: &'static str,
    /// `typed_config` and the connection manager's stat prefix → the filter.
    pub build: fn(&Any, &str, &str) -> Result<Arc<dyn HttpFilter>>,
    /// Types accepted in `typed_per_filter_config`, each with its
    /// translation.
    pub per_route: &'static [(&'static str, PerRouteFn)],
}

/// Translates one per-route config type: (`Any`, field path) → config.
pub type PerRouteFn = fn(&Any, &str) -> Result<PerRoute>;

/// Every HTTP filter Legate has, besides the router.
pub static FACTORIES: &[&Factory] = &[
    &api_key_auth::FACTORY,
    &basic_auth::FACTORY,
    &buffer::FACTORY,
    &compressor::FACTORY,
    &cors::FACTORY,
    &credential_injector::FACTORY,
    &csrf::FACTORY,
    &custom_response::FACTORY,
    &ext_authz::FACTORY,
    &ext_proc::FACTORY,
    &fault::FACTORY,
    &grpc_stats::FACTORY,
    &grpc_web::FACTORY,
    &header_mutation::FACTORY,
    &health_check::FACTORY,
    &jwt_authn::FACTORY,
    &local_ratelimit::FACTORY,
    &oauth2::FACTORY,
    &crate::istio::peer_metadata::FACTORY,
    &crate::istio::alpn::FACTORY,
    &crate::istio::stats::FACTORY,
    &ratelimit::FACTORY,
    &rbac::FACTORY,
    &stateful_session::FACTORY,
];

/// The registry entries of every filter, for [`crate::registry`].
pub static REGISTRIES: &[&[MessageSupport]] = &[
    api_key_auth::REGISTRY,
    basic_auth::REGISTRY,
    buffer::REGISTRY,
    compressor::REGISTRY,
    cors::REGISTRY,
    credential_injector::REGISTRY,
    csrf::REGISTRY,
    custom_response::REGISTRY,
    ext_authz::REGISTRY,
    ext_proc::REGISTRY,
    fault::REGISTRY,
    grpc_stats::REGISTRY,
    grpc_web::REGISTRY,
    header_mutation::REGISTRY,
    health_check::REGISTRY,
    jwt_authn::REGISTRY,
    local_ratelimit::REGISTRY,
    oauth2::REGISTRY,
    crate::istio::peer_metadata::REGISTRY,
    crate::istio::alpn::REGISTRY,
    crate::istio::stats::REGISTRY,
    rate_limit_actions::REGISTRY,
    ratelimit::REGISTRY,
    rbac::REGISTRY,
    stateful_session::REGISTRY,
];

pub fn factory(type_name: &str) -> Option<&'static Factory> {
    FACTORIES.iter().copied().find(|f| f.type_name == type_name)
}

/// The translation of a per-route config type, if a filter accepts it.
pub fn per_route_translator(type_name: &str) -> Option<PerRouteFn> {
    FACTORIES
        .iter()
        .flat_map(|f| f.per_route.iter())
        .find(|(t, _)| *t == type_name)
        .map(|(_, f)| *f)
}

/// The SDS secrets a per-route config reads: an `OAuth2PerRoute`'s.
pub fn per_route_sds(c: &PerRoute) -> &[(String, crate::config::source::XdsSource)] {
    oauth2::per_route_sds(c)
}

/// Decodes an `Any` as `M`, naming `path` on failure.
pub fn decode<M: prost::Message + Default>(a: &Any, path: &str) -> Result<M> {
    M::decode(a.value.as_slice()).map_err(|e| crate::config::ConfigError::new(path, e.to_string()))
}

/// Envoy's `RuntimeFractionalPercent`: a default share, which a runtime
/// key (when set and present in the runtime) overrides.
#[derive(Debug, Clone)]
pub struct Fraction {
    pub key: Option<String>,
    /// Parts per million.
    pub default: u32,
}

impl Fraction {
    pub const ALWAYS: Fraction = Fraction {
        key: None,
        default: 1_000_000,
    };

    pub fn from_proto(
        f: Option<
            &legate_proto::envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent,
        >,
        otherwise: Fraction,
    ) -> Fraction {
        let Some(f) = f else { return otherwise };
        Fraction {
            key: Some(f.runtime_key.clone()).filter(|k| !k.is_empty()),
            default: f
                .default_value
                .as_ref()
                .map_or(0, crate::runtime::per_million),
        }
    }

    /// Whether this request falls in the share.
    pub fn roll(&self, runtime: &crate::runtime::Runtime) -> bool {
        let share = match &self.key {
            Some(k) => runtime.fraction_per_million(k, self.default),
            None => self.default,
        };
        roll(share)
    }
}

/// A roll against parts per million.
pub fn roll(per_million: u32) -> bool {
    per_million >= 1_000_000 || (per_million > 0 && rand::random::<u32>() % 1_000_000 < per_million)
}
