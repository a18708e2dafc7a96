//! The HTTP connection manager and router as a pingora `ProxyHttp`.
//!
//! Phases (see pingora's `proxy_trait.rs` for the hook contracts):
//! - `request_filter`: header limits, path normalization, forwarding
//!   headers, route selection; local replies (404, redirects, direct
//!   responses) end the request here.
//! - `upstream_peer`: once per attempt: retry back-off, host pick (skipping
//!   previous hosts when asked), per-attempt timeouts.
//! - `upstream_request_filter`: host rewrite and Envoy's upstream headers.
//! - `upstream_response_filter`: retry-on-status decisions.
//! - `response_filter`: response header mutations, `server` header.
//! - `fail_to_connect` / `error_while_proxy` / `fail_to_proxy`: retry
//!   decisions and Envoy's 503/504 local replies.
//! - `logging`: stats and releasing per-host request counts.

use super::request::{self as rq, SlashOutcome};
use super::ConnMeta;
use crate::cluster_manager::{Cluster, ClusterManager, UpstreamHost};
use crate::config::listener::{Hcm, ServerHeader, UnderscoreAction};
use crate::config::route::{
    Action, ClusterSpec, HashPolicy, HostRewrite, RetryPolicy, Route, RouteConfig, VirtualHost,
};
use crate::header_case::{self, HeaderCase, Spellings};
use crate::headers::{self, FormatContext, HeaderOps};
use crate::http_filters::rate_limit_actions::RateLimit as RateLimitEntry;
use crate::outlier;
use crate::routing;
use crate::runtime::Runtime;
use async_trait::async_trait;
use bytes::Bytes;
use http::HeaderName;
use pingora_core::modules::http::HttpModules;
use pingora_core::protocols::ALPN;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long an HTTP/2 request answered locally keeps being read.
const H2_LOCAL_REPLY_DRAIN: Duration = Duration::from_secs(1);

/// State shared by every request.
pub struct Shared {
    pub clusters: Arc<ClusterManager>,
    pub runtime: Arc<arc_swap::ArcSwap<Runtime>>,
    pub routes: Arc<crate::route_tables::RouteTables>,
    pub hostname: String,
    /// This host's first non-loopback address (Envoy's local address),
    /// appended to XFF for loopback peers.
    pub local_ip: std::net::IpAddr,
    /// `node.cluster` (the `source_cluster` of rate limit descriptors).
    pub service_cluster: String,
    /// `/healthcheck/fail` is in force.
    pub health_failed: Arc<std::sync::atomic::AtomicBool>,
}

pub struct HcmProxy {
    pub shared: Arc<Shared>,
}

/// Where the selected route lives in its (immutable) route config.
struct Selected {
    config: Arc<RouteConfig>,
    vhost: usize,
    route: usize,
}

impl Selected {
    fn vhost(&self) -> &VirtualHost {
        &self.config.virtual_hosts[self.vhost]
    }
    fn route(&self) -> &Route {
        &self.vhost().routes[self.route]
    }
}

const DECORATOR: &str = "x-envoy-decorator-operation";

/// HCM tracing for a request whose route is chosen: the sampling decision
/// (packed into `x-request-id`), the provider's span, and the route
/// decorator, as Envoy's connection manager does before its filters run.
fn start_trace(req: &mut RequestHeader, ctx: &mut Ctx, hcm: &Hcm, t: &crate::trace::Tracing) {
    let route = ctx.selected.as_ref().map(|s| &s.route().tracing);
    let sampling = route.and_then(|r| r.sampling).unwrap_or(t.sampling);
    let reason = crate::trace::decision::decide(&sampling, hcm.request_id, req, rand::random());
    ctx.trace_forced = reason == crate::trace::decision::Reason::ServiceForced;
    if ctx.request_id.is_some() {
        ctx.request_id = req
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
    }
    if let Some(p) = &t.provider {
        ctx.span = crate::trace::propagation::start(p, reason.traced(), req, !ctx.outbound);
    }
    let decorator = route.and_then(|r| r.decorator.as_ref());
    ctx.span_operation = decorator.map(|(op, _)| op.clone());
    if ctx.outbound {
        if let Some((op, true)) = decorator {
            let _ = req.insert_header(DECORATOR, op.as_str());
        }
        return;
    }
    // Ingress: the client's operation, if it names one, replaces the
    // route's (for the span) and is not sent on.
    let client_op = req.remove_header(DECORATOR);
    match client_op.as_ref().and_then(|v| v.to_str().ok()) {
        Some(op) if !op.is_empty() => ctx.span_operation = Some(op.to_string()),
        _ => ctx.decorated = decorator.filter(|(_, p)| *p).map(|(op, _)| op.clone()),
    }
}

/// A reply Legate makes itself instead of the upstream's.
struct LocalReply {
    status: u16,
    body: &'static str,
}

#[derive(Default)]
pub struct Ctx {
    hcm: Option<Arc<Hcm>>,
    /// The downstream connection is TLS: the scheme is `https`.
    downstream_tls: bool,
    /// The client's certificate chain, on TLS connections.
    peer_tls: Option<Arc<std::sync::OnceLock<super::xfcc::PeerTls>>>,
    /// The connection's SNI, for filters.
    sni: String,
    downstream_remote: Option<SocketAddr>,
    downstream_local: Option<SocketAddr>,
    selected: Option<Selected>,
    cluster: Option<Arc<Cluster>>,
    weighted_index: Option<usize>,
    hash: Option<u64>,
    retry: Option<RetryPolicy>,
    attempts: u32,
    /// The tracing decision was forced by the service (`x-envoy-force-trace`
    /// honoured): what Envoy's traceable access log filter keeps.
    trace_forced: bool,
    /// A direct response's `body_format.content_type`, for its reply.
    reply_content_type: Option<String>,
    tried: Vec<SocketAddr>,
    /// The route's previous-priorities retry priority, for this request.
    retry_priority: RetryPriority,
    host: Option<Arc<UpstreamHost>>,
    pending_reply: Option<LocalReply>,
    /// A filter's reply to the response headers (ext_proc's immediate
    /// response), sent instead of them.
    filter_reply: Option<crate::http_filters::FilterReply>,
    /// The reply being written is a filter's direct one: no filter sees it.
    direct_reply: bool,
    /// State the request's filters share (Envoy's filter state).
    filter_state: http::Extensions,
    /// The body of the local reply being written, for the filters'
    /// response hooks.
    local_body: Option<Bytes>,
    /// The request was gRPC as it arrived (filters may rewrite its type).
    arrived_grpc: Option<bool>,
    /// The request body, read before a filter that needs it ran (pingora
    /// forwards it from its retry buffer).
    buffered_body: Option<Bytes>,
    /// The name spellings the HTTP/1 request arrived with, kept when the
    /// connection manager preserves case.
    request_spellings: Option<crate::header_case::Spellings>,
    /// The same for the upstream's HTTP/1 response, when its cluster
    /// preserves case.
    response_spellings: Option<crate::header_case::Spellings>,
    request_id: Option<String>,
    upstream_started: Option<Instant>,
    status: u16,
    original_host: String,
    /// An upgrade the listener allows (`upgrade_configs`): its value, kept
    /// on the upstream request so pingora tunnels after the upstream's 101.
    upgrade: Option<String>,
    /// The upgrade request's Connection header, forwarded as sent.
    upgrade_connection: Option<String>,
    /// Request headers Envoy forwards but pingora's upstream writer strips
    /// as hop-by-hop (`proxy-authorization`, `trailer`); put back upstream.
    kept_hop_headers: Vec<(HeaderName, http::HeaderValue)>,
    /// The client asked for trailers (`te` contained `trailers`).
    te_trailers: bool,
    /// The route timeout.
    timeout: Option<Duration>,
    /// The trusted client address (from XFF or the peer), Envoy's
    /// "downstream remote address".
    client_addr: Option<SocketAddr>,
    started: Option<Instant>,
    /// When the request arrived (request timeout, access logs).
    arrived: Option<Instant>,
    /// Envoy's response flags (`access_log::flags`) and response code
    /// details, for access logs.
    flags: crate::access_log::Flags,
    details: std::borrow::Cow<'static, str>,
    /// `details` was set, empty (not unset: the access log writes it as
    /// empty, not `-`).
    details_set_empty: bool,
    /// The upstream's response headers arrived.
    response_started: Option<Instant>,
    upstream_local: Option<SocketAddr>,
    /// The stream idle timeout in force: the route's `idle_timeout`, else
    /// the connection manager's `stream_idle_timeout`.
    idle: Option<Duration>,
    /// This attempt's upstream reads are bounded by `idle` rather than the
    /// route or per-try timeout: a timeout then is Envoy's stream timeout.
    idle_binds: bool,
    /// `request_timeout`: the request body must have arrived by then.
    request_deadline: Option<Instant>,
    /// The route's `max_stream_duration`: the stream ends by then.
    stream_deadline: Option<Instant>,
    /// The cluster's `max_stream_duration` for this attempt: it is reset
    /// then (Envoy's `UMSDR`).
    attempt_deadline: Option<Instant>,
    /// The gRPC status of a local reply when Envoy names one rather than
    /// mapping the HTTP status.
    grpc_status: Option<u32>,
    /// Cookies a hash policy made, set on the upstream's response.
    set_cookies: Vec<String>,
    /// An upstream's informational response went downstream.
    relayed_interim: bool,
    /// This request is the upstream connection's last.
    last_on_upstream_conn: bool,
    /// The listener's buffer limit, and the request body bytes so far: a
    /// body beyond the limit is not kept for retries, so none is made.
    buffer_limit: u32,
    body_read: u64,
    /// Circuit breaker slots this request holds: an upstream connection
    /// (HTTP/1), an active request, a retry.
    cx_slot: Option<crate::breakers::Slot>,
    /// The chosen host's connection slot, with `per_host_thresholds`.
    host_cx_slot: Option<crate::breakers::Slot>,
    rq_slot: Option<crate::breakers::Slot>,
    retry_slot: Option<crate::breakers::Slot>,
    /// A circuit breaker refused the request: `x-envoy-overloaded: true`.
    overloaded: bool,
    /// The HTTP filters enabled for this request (indices into the
    /// connection manager's chain), and each one's state from its request
    /// hook. Every enabled filter sees the response, as Envoy's encoder
    /// filters see local replies too.
    filters_active: Vec<usize>,
    filter_states: Vec<Option<crate::http_filters::State>>,
    /// This attempt's upstream speaks HTTP/1 (set with its peer).
    upstream_h1: bool,
    /// Copies of the request in flight to mirror clusters.
    mirrors: Vec<super::mirror::Mirror>,
    /// Dynamic metadata the filters wrote.
    metadata: crate::http_filters::Metadata,
    /// The listener's traffic_direction is OUTBOUND: tracing as egress.
    outbound: bool,
    /// ... or INBOUND.
    inbound: bool,
    /// The trace context each upstream attempt carries.
    span: Option<crate::trace::SpanContext>,
    /// An ingress route decorator's operation, for the response.
    decorated: Option<String>,
    /// The span's operation: the route decorator's, or on ingress the
    /// client's `x-envoy-decorator-operation`.
    span_operation: Option<String>,
    /// A span per upstream attempt (`spawn_upstream_span`), when spans
    /// are exported.
    upstream_spans: Vec<crate::trace::span::UpstreamSpan>,
    /// The current attempt's span id, with `spawn_upstream_span`.
    attempt_span: Option<u64>,
}

impl Ctx {
    /// Each downstream read waits at most for the stream idle timeout and
    /// what remains of the request timeout (HTTP/1; pingora's HTTP/2
    /// server has no read timeout).
    fn downstream_read_timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        let left = match (self.request_deadline, self.stream_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
        .map(|d| d.saturating_duration_since(now));
        match (self.idle, left) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

impl Ctx {
    /// The scheme of the downstream connection.
    fn scheme(&self) -> &'static str {
        if self.downstream_tls {
            "https"
        } else {
            "http"
        }
    }
}

fn hdr(name: &'static str) -> HeaderName {
    HeaderName::from_static(name)
}

/// Names set on every request or response: built once, at compile time
/// (`hdr` validates its name on each call).
const X_ENVOY_EXPECTED_RQ_TIMEOUT_MS: HeaderName =
    HeaderName::from_static("x-envoy-expected-rq-timeout-ms");
const X_ENVOY_UPSTREAM_SERVICE_TIME: HeaderName =
    HeaderName::from_static("x-envoy-upstream-service-time");
/// Hop-by-hop headers, as names (removing by `&str` parses the name on
/// every request).
const HOP_BY_HOP: [HeaderName; 4] = [
    http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::UPGRADE,
];

fn conn_meta(session: &Session) -> Option<&ConnMeta> {
    session
        .as_downstream()
        .digest()?
        .proxy_digest
        .as_ref()?
        .user_data
        .as_ref()?
        .downcast_ref::<ConnMeta>()
}

fn inet(a: Option<&pingora_core::protocols::l4::socket::SocketAddr>) -> Option<SocketAddr> {
    a.and_then(|a| a.as_inet()).copied()
}

impl HcmProxy {
    /// Writes a complete local reply, with Envoy's framing and headers.
    /// `route_headers`: apply the selected route's response header mutations
    /// (Envoy does for direct responses and redirects).
    async fn local_reply(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        status: u16,
        body: Bytes,
        extra: Vec<(HeaderName, String)>,
        route_headers: bool,
    ) -> Result<()> {
        // A gRPC client gets Envoy's gRPC form of the local reply: HTTP 200
        // with the status mapped into `grpc-status`. The request as it
        // arrived decides (a gRPC-Web one, rewritten to gRPC by its filter,
        // gets the plain reply, which that filter converts).
        let grpc = ctx.arrived_grpc.unwrap_or_else(|| is_grpc(session));
        let mut resp = if grpc {
            let mut r = ResponseHeader::build(200, Some(4))?;
            r.insert_header(http::header::CONTENT_TYPE, "application/grpc")?;
            let code = ctx
                .grpc_status
                .take()
                .unwrap_or_else(|| rq::grpc_status_for_http(status));
            r.insert_header("grpc-status", code.to_string())?;
            if !body.is_empty() {
                r.insert_header("grpc-message", rq::grpc_percent_encode(&body))?;
            }
            if session.req_header().version != http::Version::HTTP_2 {
                r.insert_header(http::header::CONTENT_LENGTH, "0")?;
            }
            r
        } else {
            let mut r = ResponseHeader::build(status, Some(4))?;
            // Envoy states no length for 1xx/204/304, nor for an empty
            // HTTP/2 reply (END_STREAM on the headers says it).
            let h2 = session.req_header().version == http::Version::HTTP_2;
            if !(status < 200 || status == 204 || status == 304 || (h2 && body.is_empty())) {
                r.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
            }
            r
        };
        let body = if grpc { Bytes::new() } else { body };
        // A name's first value replaces what the reply had; later ones are
        // added (an OAuth2 redirect sets several cookies).
        let mut seen: Vec<HeaderName> = Vec::new();
        for (k, v) in extra {
            if seen.contains(&k) {
                resp.append_header(k, v)?;
            } else {
                seen.push(k.clone());
                resp.insert_header(k, v)?;
            }
        }
        ctx.local_body = Some(body.clone());
        if let Some(r) = self
            .decorate_response(&mut resp, ctx, route_headers, session, true)
            .await
        {
            ctx.direct_reply = true;
            return Box::pin(self.send_filter_reply(session, ctx, r)).await;
        }
        // A direct response's body_format names its type over the route's
        // header mutations, as Envoy's does.
        if let Some(ct) = ctx.reply_content_type.take().filter(|_| !grpc) {
            resp.insert_header(http::header::CONTENT_TYPE, ct)?;
        }
        // Set after the route's header mutations when they left none (so a
        // route can choose the type but not remove it), as Envoy does.
        if !grpc && !body.is_empty() && !resp.headers.contains_key(http::header::CONTENT_TYPE) {
            resp.insert_header(http::header::CONTENT_TYPE, "text/plain")?;
        }
        ctx.status = status;
        if session.req_header().version != http::Version::HTTP_2 {
            // A local reply has no spellings of its own.
            let w = header_case::Writer {
                spellings: None,
                proper: ctx
                    .hcm
                    .as_ref()
                    .is_some_and(|h| h.header_case == HeaderCase::ProperCase),
            };
            header_case::write_response(&mut resp, w);
        }
        let end = body.is_empty() || session.req_header().method == http::Method::HEAD;
        // The body passes the filters' body hooks too (a compressor's).
        let mut body = Some(body);
        if !end {
            Self::filter_response_bodies(ctx, &mut body, true);
        }
        session.write_response_header(Box::new(resp), end).await?;
        if !end {
            session.write_response_body(body, true).await?;
        }
        // An HTTP/2 client may still be sending its request: read the rest
        // briefly rather than resetting the stream at once, so that a
        // malformed frame still arriving (a second HEADERS without
        // END_STREAM) is answered with PROTOCOL_ERROR, as Envoy's codec
        // does, whatever the scheduling.
        let down = session.as_downstream_mut();
        if down.req_header().version == http::Version::HTTP_2 && !down.is_body_done() {
            down.set_total_drain_timeout(Some(H2_LOCAL_REPLY_DRAIN));
            let _ = down.drain_request_body().await;
        }
        Ok(())
    }

    /// Finds the virtual host and route for the request, and picks the
    /// weighted cluster now (as Envoy's route entry is that cluster), since
    /// the filters read its per-filter config.
    fn select_route(
        &self,
        session: &Session,
        ctx: &mut Ctx,
        rc: Arc<RouteConfig>,
        host: &str,
        path: &str,
    ) -> Option<Selected> {
        let runtime = self.shared.runtime.load();
        let random: u64 = rand::random();
        let vh = routing::find_virtual_host(&rc, host)?;
        let vi = rc.virtual_hosts.iter().position(|v| std::ptr::eq(v, vh))?;
        let view = routing::RequestView {
            path,
            headers: &session.req_header().headers,
            random,
            runtime: &runtime,
            pseudo: crate::config::matcher::Pseudo {
                method: session.req_header().method.as_str(),
                path,
                authority: host,
                scheme: ctx.scheme(),
                status: None,
            },
        };
        let r = routing::find_route(vh, &view)?;
        let ri = vh.routes.iter().position(|x| std::ptr::eq(x, r))?;
        if let Action::Forward(ra) = &r.action {
            if let ClusterSpec::Weighted(w) = &ra.cluster {
                let hashed = if w.use_hash_policy {
                    hash_for(
                        &ra.hash_policy,
                        session,
                        ctx.client_addr.or(ctx.downstream_remote),
                        None,
                    )
                } else {
                    None
                };
                let mut roll = hashed.unwrap_or(random) % w.total;
                let mut pick = 0;
                for (i, c) in w.clusters.iter().enumerate() {
                    if roll < c.weight {
                        pick = i;
                        break;
                    }
                    roll -= c.weight;
                }
                ctx.weighted_index = Some(pick);
            }
        }
        Some(Selected {
            config: rc,
            vhost: vi,
            route: ri,
        })
    }

    /// The route's per-filter configs, most specific first.
    fn filter_levels(ctx: &Ctx) -> crate::http_filters::chain::Levels<'_> {
        let Some(sel) = &ctx.selected else {
            return crate::http_filters::chain::Levels([None; 4]);
        };
        let wc = match (&sel.route().action, ctx.weighted_index) {
            (Action::Forward(ra), Some(i)) => match &ra.cluster {
                ClusterSpec::Weighted(w) => Some(&w.clusters[i].filters),
                _ => None,
            },
            _ => None,
        };
        crate::http_filters::chain::Levels([
            wc,
            Some(&sel.route().filters),
            Some(&sel.vhost().filters),
            Some(&sel.config.filters),
        ])
    }

    /// Selects the route again from the request as the filters left it
    /// (one cleared the route cache), as Envoy's next route lookup does.
    fn reselect_route(&self, session: &Session, ctx: &mut Ctx, hcm: &Hcm) {
        let req = session.req_header();
        let host = routing::authority(req).to_string();
        let path = req
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let header = |name: &str| -> Option<String> {
            if name == "host" || name == ":authority" {
                return Some(host.clone());
            }
            req.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let rc = self.shared.routes.resolve(&hcm.routes, &header);
        ctx.weighted_index = None;
        ctx.selected = rc.and_then(|rc| self.select_route(session, ctx, rc, &host, &path));
    }

    /// The cluster the selected route forwards to, as far as it is known
    /// before the router runs.
    fn route_cluster(session: &Session, ctx: &Ctx) -> Option<String> {
        let Action::Forward(ra) = &ctx.selected.as_ref()?.route().action else {
            return None;
        };
        Some(match &ra.cluster {
            ClusterSpec::Name(n) => n.clone(),
            ClusterSpec::Header(h) => session
                .req_header()
                .headers
                .get(h)
                .and_then(|v| v.to_str().ok())?
                .to_string(),
            ClusterSpec::Weighted(w) => w.clusters[ctx.weighted_index?].name.clone(),
        })
    }

    /// Runs the enabled HTTP filters' request hooks in order. True: a
    /// filter answered the request itself.
    async fn run_filters(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        use crate::http_filters::{Flow, RequestInfo};
        let Some(hcm) = ctx.hcm.clone() else {
            return Ok(false);
        };
        let enabled: Vec<usize> = {
            let levels = Self::filter_levels(ctx);
            (0..hcm.filters.entries.len())
                .filter(|&i| levels.enabled(&hcm.filters.entries[i]))
                .collect()
        };
        if enabled.is_empty() {
            return Ok(false);
        }
        let runtime = self.shared.runtime.load();
        let grpc = is_grpc(session);
        let end_of_stream = session.as_downstream_mut().is_body_empty();
        let mut cluster = Self::route_cluster(session, ctx);
        let forwards = |ctx: &Ctx| {
            ctx.selected
                .as_ref()
                .is_some_and(|s| matches!(s.route().action, Action::Forward(_)))
        };
        let peer = ctx.peer_tls.clone();
        let sni = std::mem::take(&mut ctx.sni);
        let scheme = ctx.scheme();
        let peer_tls = peer.as_ref().and_then(|p| p.get());
        ctx.filter_states = enabled.iter().map(|_| None).collect();
        ctx.filters_active = enabled;
        for k in 0..ctx.filters_active.len() {
            let entry = &hcm.filters.entries[ctx.filters_active[k]];
            // Without a route no filter checks anything (the router's 404
            // follows), so no body is held for one.
            let limit = if ctx.selected.is_some() {
                let levels = Self::filter_levels(ctx);
                entry
                    .filter
                    .request_body_limit(&levels.configs(&entry.name))
            } else {
                None
            };
            if let Some(max) = limit {
                if !self.buffer_request_body(session, ctx, max).await? {
                    hcm.stats().downstream_rq_too_large.increment(1);
                    ctx.details = "request_payload_too_large".into();
                    self.local_reply(
                        session,
                        ctx,
                        413,
                        Bytes::from_static(b"Payload Too Large"),
                        vec![],
                        false,
                    )
                    .await?;
                    return Ok(true);
                }
            }
            let mut state = None;
            let mut metadata = std::mem::take(&mut ctx.metadata);
            let mut filter_state = std::mem::take(&mut ctx.filter_state);
            let flow = {
                let levels = Self::filter_levels(ctx);
                let rl = Self::rate_limits(ctx);
                let mut info = RequestInfo {
                    req: session.req_header_mut(),
                    remote: ctx.client_addr.or(ctx.downstream_remote),
                    direct_remote: ctx.downstream_remote,
                    local: ctx.downstream_local,
                    peer_tls,
                    sni: &sni,
                    scheme,
                    grpc,
                    end_of_stream,
                    body: ctx.buffered_body.as_ref(),
                    filter_state: &mut filter_state,
                    per_route: levels.configs(&entry.name),
                    cluster: cluster.as_deref(),
                    forwards: forwards(ctx),
                    has_route: ctx.selected.is_some(),
                    route_metadata: ctx
                        .selected
                        .as_ref()
                        .and_then(|s| s.route().metadata.as_deref()),
                    runtime: &runtime,
                    flags: Vec::new(),
                    clear_route_cache: false,
                    route_rate_limits: rl.0,
                    vhost_rate_limits: rl.1,
                    include_vh_rate_limits: rl.2,
                    service_cluster: &self.shared.service_cluster,
                    clusters: &self.shared.clusters,
                    metadata: &mut metadata,
                    health_failed: self
                        .shared
                        .health_failed
                        .load(std::sync::atomic::Ordering::Relaxed),
                };
                let flow = entry.filter.on_request(&mut info, &mut state).await;
                (flow, info.flags, info.clear_route_cache)
            };
            let (flow, flags, clear_route_cache) = flow;
            ctx.metadata = metadata;
            ctx.filter_state = filter_state;
            for f in flags {
                ctx.flags.add(f);
            }
            ctx.filter_states[k] = state;
            if clear_route_cache && matches!(flow, Flow::Continue) {
                self.reselect_route(session, ctx, &hcm);
                cluster = Self::route_cluster(session, ctx);
            }
            if let Flow::Reply(r) = flow {
                self.send_filter_reply(session, ctx, r).await?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Reads the request body for a filter that needs `max` bytes of it,
    /// keeping it in pingora's retry buffer, which forwards it; false when
    /// it is longer (the request is refused, nothing is forwarded). The
    /// body is read once, for every filter that asks.
    async fn buffer_request_body(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        max: usize,
    ) -> Result<bool> {
        if let Some(b) = &ctx.buffered_body {
            return Ok(b.len() <= max);
        }
        let down = session.as_downstream_mut();
        let declared = down
            .req_header()
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        if declared.is_some_and(|n| n > max) {
            return Ok(false);
        }
        let mut buf = bytes::BytesMut::new();
        if !down.is_body_empty() {
            down.enable_retry_buffering();
            loop {
                // The client's read: its timeouts (request_timeout, the
                // idle timeout) and errors are the downstream's.
                session.set_read_timeout(ctx.downstream_read_timeout());
                let Some(chunk) = session
                    .as_downstream_mut()
                    .read_request_body()
                    .await
                    .map_err(|e| e.into_down())?
                else {
                    break;
                };
                buf.extend_from_slice(&chunk);
                if buf.len() > max {
                    return Ok(false);
                }
            }
        }
        ctx.buffered_body = Some(buf.freeze());
        Ok(true)
    }

    /// Answers with a filter's reply: its status, body, headers, details
    /// and flag.
    async fn send_filter_reply(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        r: crate::http_filters::FilterReply,
    ) -> Result<()> {
        if let Some(f) = r.flag {
            ctx.flags.add(f);
        }
        ctx.details_set_empty = r.details.is_empty();
        ctx.details = r.details;
        let mut extra: Vec<(HeaderName, String)> = r
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        if let (true, Some(g)) = (
            ctx.arrived_grpc.unwrap_or_else(|| is_grpc(session)),
            r.grpc_status,
        ) {
            extra.push((hdr("grpc-status"), g.to_string()));
        }
        self.local_reply(session, ctx, r.status, r.body, extra, false)
            .await
    }

    /// The selected route's rate limit actions: the route's, its virtual
    /// host's, and whether the route includes the virtual host's.
    fn rate_limits(ctx: &Ctx) -> (&[RateLimitEntry], &[RateLimitEntry], bool) {
        let Some(sel) = &ctx.selected else {
            return (&[], &[], false);
        };
        match &sel.route().action {
            Action::Forward(ra) => (
                &ra.rate_limits,
                &sel.vhost().rate_limits,
                ra.include_vh_rate_limits,
            ),
            _ => (&[], &[], false),
        }
    }

    /// The enabled filters' request body hooks, in order, for the filters
    /// that read bodies; each may replace the chunk, or refuse it with a
    /// reply.
    fn filter_request_bodies(
        ctx: &mut Ctx,
        body: &mut Option<Bytes>,
        end: bool,
    ) -> std::result::Result<(), crate::http_filters::FilterReply> {
        if ctx.filters_active.is_empty() {
            return Ok(());
        }
        let Some(hcm) = ctx.hcm.clone() else {
            return Ok(());
        };
        for k in 0..ctx.filters_active.len() {
            let f = &hcm.filters.entries[ctx.filters_active[k]].filter;
            if f.reads_bodies() {
                f.on_request_body(body, end, &mut ctx.filter_states[k])?;
            }
        }
        Ok(())
    }

    /// The enabled filters' response body hooks, in reverse order, for the
    /// filters that read bodies; each may replace the chunk.
    fn filter_response_bodies(ctx: &mut Ctx, body: &mut Option<Bytes>, end: bool) {
        if ctx.filters_active.is_empty() || ctx.direct_reply {
            return;
        }
        let Some(hcm) = ctx.hcm.clone() else { return };
        for k in (0..ctx.filters_active.len()).rev() {
            let f = &hcm.filters.entries[ctx.filters_active[k]].filter;
            if f.reads_bodies() {
                f.on_response_body(body, end, &mut ctx.filter_states[k]);
            }
        }
    }

    /// The enabled filters' response hooks, in reverse order; a filter's
    /// reply instead of the response, if one makes it.
    async fn filter_responses(
        &self,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
        session: &Session,
        local: bool,
    ) -> Option<crate::http_filters::FilterReply> {
        let hcm = ctx.hcm.clone()?;
        if ctx.filters_active.is_empty() || ctx.direct_reply {
            return None;
        }
        let info = crate::http_filters::ResponseInfo {
            req: session.req_header(),
            local,
            remote: ctx.client_addr.or(ctx.downstream_remote),
            direct_remote: ctx.downstream_remote,
            local_addr: ctx.downstream_local,
            health_failed: self
                .shared
                .health_failed
                .load(std::sync::atomic::Ordering::Relaxed),
            service_cluster: &self.shared.service_cluster,
            clusters: &self.shared.clusters,
            filter_state: &ctx.filter_state,
            local_body: if local { ctx.local_body.as_ref() } else { None },
            upstream: if local {
                None
            } else {
                ctx.host.as_ref().map(|h| h.addr)
            },
        };
        for k in (0..ctx.filters_active.len()).rev() {
            let f = &hcm.filters.entries[ctx.filters_active[k]].filter;
            if !f.waits_on_response() {
                let state = ctx.filter_states.get(k).and_then(|s| s.as_ref());
                f.on_response(resp, &info, state);
            } else if let Some(state) = ctx.filter_states.get_mut(k) {
                if let Some(r) = f.on_response_wait(resp, &info, state).await {
                    return Some(r);
                }
            }
        }
        None
    }

    /// Response-side header work shared by proxied and local replies
    /// (`route_headers`: with the route's response header mutations); a
    /// filter's reply instead of the response, if one makes it.
    async fn decorate_response(
        &self,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
        route_headers: bool,
        session: &Session,
        local: bool,
    ) -> Option<crate::http_filters::FilterReply> {
        if route_headers {
            let ops = Self::header_levels(ctx);
            if ops.iter().any(|o| o.touches_response()) {
                self.mutate_response(resp, ctx, &ops, session);
            }
        }
        if let Some(r) = self.filter_responses(resp, ctx, session, local).await {
            return Some(r);
        }
        // Envoy answers an HTTP/1.0 client it accepts (accept_http_10) in
        // HTTP/1.0; its 426 refusal is HTTP/1.1.
        let accepts_10 = ctx.hcm.as_ref().is_some_and(|h| h.http10.is_some());
        if accepts_10 && session.req_header().version == http::Version::HTTP_10 {
            resp.set_version(http::Version::HTTP_10);
            // HTTP/1.0 has no chunked coding: a body of unstated length
            // ends when the connection closes.
            resp.remove_header(&http::header::TRANSFER_ENCODING);
        }
        if let Some(hcm) = &ctx.hcm {
            match hcm.server_header {
                ServerHeader::Overwrite => {
                    let _ = resp.insert_header(http::header::SERVER, hcm.server_name.as_str());
                }
                ServerHeader::AppendIfAbsent
                    if !resp.headers.contains_key(http::header::SERVER) =>
                {
                    let _ = resp.insert_header(http::header::SERVER, hcm.server_name.as_str());
                }
                _ => {}
            }
            if hcm.always_set_request_id_in_response {
                if let Some(id) = &ctx.request_id {
                    let _ = resp.insert_header(hdr("x-request-id"), id.as_str());
                }
            }
            if hcm.tracing.is_some() {
                // Ingress tells the client the route's operation; egress
                // takes the upstream's (for its span) off the response.
                if ctx.outbound {
                    resp.remove_header(DECORATOR);
                } else if let Some(op) = &ctx.decorated {
                    let _ = resp.insert_header(hdr(DECORATOR), op.as_str());
                }
            }
        }
        None
    }

    /// The route's response header mutations. Only routes that have some
    /// pay for the copies of both header maps the formatters read (they
    /// see the headers as they were before any mutation).
    fn mutate_response(
        &self,
        resp: &mut ResponseHeader,
        ctx: &Ctx,
        ops: &[&HeaderOps],
        session: &Session,
    ) {
        let req_headers = session.req_header().headers.clone();
        let resp_headers = resp.headers.clone();
        let fctx = FormatContext {
            downstream_remote: ctx.client_addr.or(ctx.downstream_remote),
            downstream_direct_remote: ctx.downstream_remote,
            downstream_local: ctx.downstream_local,
            upstream_remote: ctx.host.as_ref().map(|h| h.addr),
            upstream_cluster: ctx.cluster.as_ref().map_or("", |c| c.config.name.as_str()),
            protocol: protocol(session),
            request_headers: Some(&req_headers),
            response_headers: Some(&resp_headers),
            hostname: &self.shared.hostname,
            pseudo: crate::config::matcher::Pseudo {
                method: session.req_header().method.as_str(),
                path: session
                    .req_header()
                    .uri
                    .path_and_query()
                    .map_or("", |p| p.as_str()),
                authority: &ctx.original_host,
                scheme: ctx.scheme(),
                status: None,
            },
            response_code: Some(resp.status.as_u16()),
        };
        for o in ops {
            headers::apply(&o.response_add, &o.response_remove, resp, &fctx);
        }
    }

    /// Header mutation levels for the selected route, in Envoy's order: the
    /// most specific first, so less specific levels win, unless
    /// `most_specific_header_mutations_wins`.
    fn header_levels(ctx: &Ctx) -> Vec<&HeaderOps> {
        let Some(sel) = &ctx.selected else {
            return Vec::new();
        };
        let mut v = Vec::with_capacity(4);
        if let (Some(i), Action::Forward(ra)) = (ctx.weighted_index, &sel.route().action) {
            if let ClusterSpec::Weighted(w) = &ra.cluster {
                v.push(&w.clusters[i].headers);
            }
        }
        // The weighted cluster's mutations always come first (Envoy's
        // cluster entry); most_specific_header_mutations_wins reverses only
        // the route, virtual host and route configuration levels.
        let mut levels = [
            &sel.route().headers,
            &sel.vhost().headers,
            &sel.config.headers,
        ];
        if sel.config.most_specific_header_mutations_wins {
            levels.reverse();
        }
        v.extend(levels);
        v
    }

    /// One line per request for each of the connection manager's logs.
    /// The stream as its access log (and its filters' stream-done hooks)
    /// see it.
    fn log_entry<'a>(
        session: &'a Session,
        ctx: &'a Ctx,
        status: u16,
        flags: &'a str,
    ) -> crate::access_log::Entry<'a> {
        let req = session.req_header();
        // The wall clock is read once, here, only for logged requests.
        let began = ctx.arrived.unwrap_or_else(Instant::now);
        let start = std::time::SystemTime::now() - began.elapsed();
        let authority = req
            .headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri.authority().map(|a| a.as_str()))
            .unwrap_or("");
        let unknown: SocketAddr = ([0, 0, 0, 0], 0).into();
        crate::access_log::Entry {
            start,
            duration: began.elapsed(),
            bytes_received: session.body_bytes_read() as u64,
            bytes_sent: session.body_bytes_sent() as u64,
            downstream_remote: ctx.client_addr.or(ctx.downstream_remote).unwrap_or(unknown),
            downstream_direct_remote: ctx.downstream_remote.unwrap_or(unknown),
            downstream_local: ctx.downstream_local.unwrap_or(unknown),
            upstream_host: ctx
                .host
                .as_ref()
                .map(|h| h.addr)
                .or(ctx.tried.last().copied()),
            upstream_local: ctx.upstream_local,
            upstream_cluster: ctx.cluster.as_ref().map_or("", |c| c.config.name.as_str()),
            response_flags: flags,
            requested_server_name: "",
            http: Some(crate::access_log::HttpFacts {
                request: &req.headers,
                pseudo: crate::config::matcher::Pseudo {
                    method: req.method.as_str(),
                    path: req.uri.path_and_query().map_or("", |p| p.as_str()),
                    authority,
                    scheme: ctx.scheme(),
                    status: None,
                },
                response: final_response(session).map(|r| &r.headers),
                protocol: protocol(session),
                response_code: status,
                details: (!ctx.details.is_empty() || ctx.details_set_empty)
                    .then_some(&*ctx.details),
                route_name: ctx
                    .selected
                    .as_ref()
                    .map_or("", |s| s.route().name.as_str()),
                response_duration: ctx.response_started.map(|t| t.duration_since(began)),
                attempts: ctx.attempts,
                health_check: ctx
                    .filter_states
                    .iter()
                    .flatten()
                    .any(|s| s.is::<crate::http_filters::health_check::IsHealthCheck>()),
                traced: ctx.trace_forced,
            }),
            trace: ctx.span.as_ref().and_then(|s| s.log_ids()),
        }
    }

    /// With `spawn_upstream_span`, the attempt's child span: its id (sent
    /// upstream) and, when spans are exported, its record.
    fn start_attempt_span(ctx: &mut Ctx, cluster: &str, addr: SocketAddr) {
        let Some(hcm) = ctx.hcm.clone() else {
            return;
        };
        let Some(span) = ctx
            .span
            .as_ref()
            .filter(|_| hcm.tracing.as_ref().is_some_and(|t| t.spawn_upstream_span))
        else {
            return;
        };
        let id = span.child_id();
        ctx.attempt_span = Some(id);
        // A retried attempt (on its status, say) ended when this began.
        if let Some(prev) = ctx.upstream_spans.last_mut().filter(|s| s.end.is_none()) {
            prev.end = Some(std::time::SystemTime::now());
        }
        if Self::span_exporter(&hcm, ctx).is_some() {
            ctx.upstream_spans.push(crate::trace::span::UpstreamSpan {
                id,
                start: std::time::SystemTime::now(),
                end: None,
                address: Some(addr),
                cluster: cluster.to_string(),
                status: 0,
                protocol: None,
                error_reason: None,
            });
        }
    }

    /// Ends the current attempt's span with Envoy's reset reason.
    fn end_upstream_span(ctx: &mut Ctx, reason: &'static str) {
        if let Some(s) = ctx.upstream_spans.last_mut().filter(|s| s.end.is_none()) {
            s.end = Some(std::time::SystemTime::now());
            s.error_reason = Some(reason);
        }
    }

    /// The OpenTelemetry exporter the request's span goes to, if it is
    /// traced and sampled.
    fn span_exporter<'a>(hcm: &'a Hcm, ctx: &Ctx) -> Option<SpanSink<'a>> {
        if !ctx.span.as_ref().is_some_and(|s| s.sampled()) {
            return None;
        }
        use crate::trace::Provider as P;
        match &hcm.tracing.as_ref()?.provider {
            Some(P::OpenTelemetry { exporter, .. }) => exporter.as_deref().map(SpanSink::Otel),
            Some(P::Zipkin { exporter, .. }) => exporter.as_deref().map(SpanSink::Zipkin),
            _ => None,
        }
    }

    /// Sends the request's span and its upstream attempts' to `sink`.
    fn export_spans(&self, sink: SpanSink<'_>, facts: &crate::trace::span::SpanFacts, ctx: &Ctx) {
        let clusters = &self.shared.clusters;
        match sink {
            SpanSink::Otel(x) => {
                x.export(crate::trace::otel::request_span(facts), clusters);
                for u in &ctx.upstream_spans {
                    x.export(crate::trace::otel::upstream_span(facts, u), clusters);
                }
            }
            SpanSink::Zipkin(x) => {
                x.export(x.request_span(facts), clusters);
                for u in &ctx.upstream_spans {
                    x.export(crate::trace::zipkin::upstream_span(facts, u), clusters);
                }
            }
        }
    }

    /// Ends the stream for its filters (those that kept state), its
    /// access logs and its span.
    fn stream_done(&self, session: &Session, ctx: &Ctx, status: u16) {
        let Some(hcm) = ctx.hcm.as_ref() else {
            return;
        };
        let filters = ctx
            .filters_active
            .iter()
            .zip(&ctx.filter_states)
            .any(|(&i, s)| {
                let f = &hcm.filters.entries[i].filter;
                f.wants_stream_done() && (s.is_some() || f.logs_every_stream())
            });
        let exporter = Self::span_exporter(hcm, ctx);
        if !filters && hcm.access_log.is_empty() && exporter.is_none() {
            return;
        }
        let flags = ctx.flags.joined();
        let e = Self::log_entry(session, ctx, status, &flags);
        if let (Some(x), Some(span)) = (exporter, ctx.span.as_ref()) {
            let t = hcm.tracing.as_ref();
            let facts = crate::trace::span::SpanFacts {
                entry: &e,
                custom_tags: t.map_or(&[], |t| t.custom_tags.as_slice()),
                context: span,
                operation: ctx.span_operation.as_deref(),
                ingress: !ctx.outbound,
                max_path_tag: t.map_or(crate::trace::span::MAX_PATH_TAG, |t| t.max_path_tag_length),
            };
            self.export_spans(x, &facts, ctx);
        }
        if filters {
            let runtime = self.shared.runtime.load();
            let done = crate::http_filters::StreamDone {
                req: session.req_header(),
                entry: &e,
                metadata: &ctx.metadata,
                runtime: &runtime,
                clusters: &self.shared.clusters,
                service_cluster: &self.shared.service_cluster,
                filter_state: &ctx.filter_state,
                host: ctx.host.as_ref(),
                inbound: ctx.inbound,
            };
            for (k, &i) in ctx.filters_active.iter().enumerate() {
                let f = &hcm.filters.entries[i].filter;
                match ctx.filter_states.get(k).and_then(|s| s.as_ref()) {
                    Some(state) => f.on_stream_done(&done, Some(state)),
                    None if f.logs_every_stream() => f.on_stream_done(&done, None),
                    None => {}
                }
            }
        }
        for l in hcm.access_log.iter() {
            l.log(&e, &self.shared.clusters);
        }
    }

    /// The retry priority's loads for this attempt, if the route has one.
    fn retry_priority_loads(
        cluster: &Cluster,
        ctx: &mut Ctx,
    ) -> Option<crate::cluster_manager::LoadOverride> {
        let frequency = ctx.retry.as_ref()?.previous_priorities?;
        let snapshot = cluster.snapshot();
        ctx.retry_priority.loads(&snapshot, &ctx.tried, frequency)
    }

    fn retry_allows(ctx: &Ctx) -> bool {
        Self::body_kept(ctx) && Self::retries_left(ctx)
    }

    /// Whether to retry a failure the policy `wants` to retry: retries
    /// left (else Envoy's `URX`), the body kept, and a retry slot under the
    /// cluster's `max_retries` or retry budget (else Envoy's `UO` and
    /// `upstream_rq_retry_overflow`). The slot is held until the retry's
    /// own outcome is decided, as Envoy's retry state holds it.
    fn decide_retry(ctx: &mut Ctx, wants: bool, truncated: bool) -> bool {
        ctx.retry_slot = None;
        Self::note_retry_limit(ctx, wants);
        if !(wants && !truncated && Self::retry_allows(ctx)) {
            return false;
        }
        let Some(cluster) = &ctx.cluster else {
            return true;
        };
        match cluster.breakers.default_priority().try_retry() {
            Some(slot) => {
                ctx.retry_slot = Some(slot);
                true
            }
            None => {
                cluster.stats.upstream_rq_retry_overflow.increment(1);
                ctx.flags.add("UO");
                false
            }
        }
    }

    /// Tells the cluster's outlier detection how this attempt's host did.
    fn report_outlier(ctx: &Ctx, outcome: outlier::Outcome) {
        if let (Some(c), Some(h)) = (&ctx.cluster, &ctx.host) {
            c.report(h.addr, outcome);
        }
    }

    /// Copies the request to the route's mirror clusters (first attempt
    /// only: a retry is not mirrored again).
    fn start_mirrors(&self, session: &mut Session, req: &RequestHeader, ctx: &mut Ctx) {
        let Some(Action::Forward(ra)) = ctx.selected.as_ref().map(|s| &s.route().action) else {
            return;
        };
        if ra.mirrors.is_empty() {
            return;
        }
        let runtime = self.shared.runtime.load();
        let with_body = !session.as_downstream_mut().is_body_empty();
        ctx.mirrors = ra
            .mirrors
            .iter()
            .filter_map(|m| {
                super::mirror::start(
                    &self.shared.clusters,
                    m,
                    req,
                    &runtime,
                    with_body,
                    self.shared.local_ip,
                    ctx.timeout,
                )
            })
            .collect();
    }

    /// `auto_sni`: the SNI is the upstream request's host (after host
    /// rewrites, the automatic one to the host's name included), or the
    /// header `override_auto_sni_header` names when the request has it.
    fn request_sni(
        tls: &crate::config::tls::ClientTls,
        req: &RequestHeader,
        ctx: &Ctx,
        host: &crate::cluster_manager::UpstreamHost,
    ) -> Option<String> {
        use crate::config::tls::SniFrom;
        // A name, not an IP literal (with an IP the context's own `sni`
        // stands, as in Envoy).
        let name = |h: &str| {
            let h = crate::routing::strip_port(h);
            let bare = h.trim_start_matches('[').trim_end_matches(']');
            if h.is_empty() || bare.parse::<std::net::IpAddr>().is_ok() {
                Some(tls.sni.clone()).filter(|s| !s.is_empty())
            } else {
                Some(h.to_string())
            }
        };
        if let SniFrom::Request { header: Some(h) } = &tls.sni_from {
            if let Some(v) = req
                .headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
            {
                return name(v);
            }
        }
        let auto_rewrite = matches!(
            ctx.selected.as_ref().map(|s| &s.route().action),
            Some(Action::Forward(ra)) if matches!(ra.host_rewrite, Some(HostRewrite::Auto))
        );
        let h = if auto_rewrite && !host.hostname.is_empty() {
            host.hostname.as_str()
        } else {
            routing::authority(req)
        };
        name(h)
    }

    /// `auto_config` over TLS: the connector for this host and whether it
    /// speaks h2. A host's protocol is learnt from its first handshake
    /// (offering h2 and http/1.1, made here so its ALPN is known before
    /// pingora picks a codec); later connections offer only that protocol.
    async fn auto_alpn(
        cluster: &Cluster,
        addr: std::net::SocketAddr,
        connect: &Arc<crate::tls::upstream::TlsConnect>,
    ) -> (
        Arc<dyn pingora_core::connectors::L4Connect + Send + Sync>,
        bool,
    ) {
        use crate::tls::upstream::{Prepared, Probe, TlsConnect};
        let narrowed = |h2: bool| {
            Arc::new(TlsConnect {
                tls: cluster.alpn.narrowed(&connect.tls, h2),
                sni: connect.sni.clone(),
                timeout: connect.timeout,
                keepalive: connect.keepalive,
                bind: connect.bind,
            })
        };
        if let Some(h2) = cluster.alpn.picked(addr) {
            return (narrowed(h2), h2);
        }
        let probe = Probe::run(connect, addr).await;
        let h2 = match &probe {
            Probe::Ready(s) => {
                let h2 = crate::tls::upstream::negotiated_h2(s);
                cluster.alpn.record(addr, h2);
                h2
            }
            _ => false,
        };
        let prepared = Prepared {
            probe: std::sync::Mutex::new(Some(probe)),
            then: narrowed(h2),
        };
        (Arc::new(prepared), h2)
    }

    /// Takes the request's circuit breaker slots on its chosen cluster: a
    /// connection for an HTTP/1 upstream (each request holds one; waiting
    /// for one is Envoy's pending request, bounded by the route timeout),
    /// then an active request. Over a limit: Envoy's 503 with flag `UO`.
    async fn take_slots(
        cluster: &Cluster,
        ctx: &mut Ctx,
        h2: bool,
        host: std::net::SocketAddr,
    ) -> Result<()> {
        (ctx.cx_slot, ctx.rq_slot, ctx.host_cx_slot) = (None, None, None);
        let b = cluster.breakers.default_priority();
        if !h2 {
            if let Some(limit) = cluster.host_connections(host) {
                ctx.host_cx_slot = Some(Self::host_slot(cluster, ctx, &limit).await?);
            }
        }
        // An `auto_config` cluster's protocol is known per connection only:
        // its requests hold connection slots as HTTP/1 ones do.
        if !h2 {
            let cx = match b.connections.try_acquire() {
                Some(cx) => cx,
                // Envoy opens a pool's first connection over the limit.
                None if b.connections.count() == 0 => {
                    cluster.stats.upstream_cx_overflow.increment(1);
                    b.connections.acquire_over_limit()
                }
                None => {
                    cluster.stats.upstream_cx_overflow.increment(1);
                    let Some(_pending) = b.pending.try_acquire() else {
                        return Self::overflow(cluster, ctx);
                    };
                    let left = ctx.timeout.map(|t| {
                        t.saturating_sub(ctx.started.map_or(Duration::ZERO, |s| s.elapsed()))
                    });
                    let wait = b.connections.acquire();
                    match left {
                        None => wait.await,
                        Some(left) => match tokio::time::timeout(left, wait).await {
                            Ok(cx) => cx,
                            Err(_) => {
                                cluster.stats.upstream_rq_timeout.increment(1);
                                return refuse(
                                    ctx,
                                    504,
                                    "upstream request timeout",
                                    "UT",
                                    "response_timeout",
                                );
                            }
                        },
                    }
                }
            };
            ctx.cx_slot = Some(cx);
        }
        match b.requests.try_acquire() {
            Some(rq) => ctx.rq_slot = Some(rq),
            None => return Self::overflow(cluster, ctx),
        }
        Ok(())
    }

    /// A connection slot of the chosen host (`per_host_thresholds`): over
    /// the limit the request waits for one as a pending request, as it
    /// would for the cluster's (it cannot go to another host).
    async fn host_slot(
        cluster: &Cluster,
        ctx: &mut Ctx,
        limit: &Arc<crate::breakers::Resource>,
    ) -> Result<crate::breakers::Slot> {
        if let Some(s) = limit.try_acquire() {
            return Ok(s);
        }
        cluster.stats.upstream_cx_overflow.increment(1);
        let b = cluster.breakers.default_priority();
        let Some(_pending) = b.pending.try_acquire() else {
            Self::overflow(cluster, ctx)?;
            return Error::e_explain(ErrorType::InternalError, "per-host overflow");
        };
        let left = ctx
            .timeout
            .map(|t| t.saturating_sub(ctx.started.map_or(Duration::ZERO, |s| s.elapsed())));
        match left {
            None => Ok(limit.acquire().await),
            Some(left) => match tokio::time::timeout(left, limit.acquire()).await {
                Ok(s) => Ok(s),
                Err(_) => {
                    cluster.stats.upstream_rq_timeout.increment(1);
                    refuse::<()>(
                        ctx,
                        504,
                        "upstream request timeout",
                        "UT",
                        "response_timeout",
                    )?;
                    Error::e_explain(ErrorType::InternalError, "per-host wait timed out")
                }
            },
        }
    }

    /// A request refused by a circuit breaker: Envoy counts it as a pending
    /// overflow (for max_requests too) and answers 503 with `UO` and
    /// `x-envoy-overloaded: true`; it is never retried.
    fn overflow(cluster: &Cluster, ctx: &mut Ctx) -> Result<()> {
        (ctx.cx_slot, ctx.rq_slot, ctx.host_cx_slot) = (None, None, None);
        cluster.stats.upstream_rq_pending_overflow.increment(1);
        cluster.stats.upstream_rq_completed.increment(1);
        cluster.stats.record_status(503);
        ctx.overloaded = true;
        let body = if ctx.attempts > 1 {
            "upstream connect error or disconnect/reset before headers. retried and the latest reset reason: overflow"
        } else {
            "upstream connect error or disconnect/reset before headers. reset reason: overflow"
        };
        refuse(
            ctx,
            503,
            body,
            "UO",
            "upstream_reset_before_response_started{overflow}",
        )
    }

    fn retries_left(ctx: &Ctx) -> bool {
        ctx.retry
            .as_ref()
            .is_some_and(|r| ctx.attempts <= r.num_retries)
    }

    /// The request body so far fits the listener's buffer limit, so it can
    /// be sent again (as Envoy's router, which stops retrying beyond it).
    fn body_kept(ctx: &Ctx) -> bool {
        ctx.body_read <= u64::from(ctx.buffer_limit)
    }

    /// A failure the policy would retry, with no retries left: Envoy's
    /// `URX` flag.
    fn note_retry_limit(ctx: &mut Ctx, retriable: bool) {
        if retriable && ctx.retry.is_some() && Self::body_kept(ctx) && !Self::retries_left(ctx) {
            ctx.flags.add("URX");
        }
    }
}

fn protocol(session: &Session) -> &'static str {
    match session.req_header().version {
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    }
}

#[async_trait]
impl ProxyHttp for HcmProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::default()
    }

    /// None. Pingora's default adds its response compression module
    /// switched off (level 0), and every request still built its context
    /// and boxed a future for each of its filters to do nothing. Legate
    /// compresses nothing: Envoy's compressor filter is not among its
    /// filters, so a listener that configures it is rejected.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    async fn early_request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        ctx.arrived = Some(Instant::now());
        // Envoy answers pipelined HTTP/1.1 requests one after another, in
        // order; pingora drops them unless asked (the setting then persists
        // across the connection's reuses).
        session.as_downstream_mut().set_pipelining_enabled(true);
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let Some(meta) = conn_meta(session) else {
            return Error::e_explain(
                ErrorType::InternalError,
                "connection has no listener metadata",
            );
        };
        let hcm = meta.hcm.clone();
        // HTTP/1 only: HTTP/2 streams are counted as they are accepted.
        let last = session.req_header().version != http::Version::HTTP_2
            && meta.closing.after_this_request();
        hcm.stats().downstream_rq_total.increment(1);
        ctx.downstream_remote = inet(session.client_addr());
        ctx.downstream_local = inet(session.server_addr());
        ctx.hcm = Some(hcm.clone());
        ctx.arrived_grpc = Some(is_grpc(session));
        if matches!(hcm.header_case, HeaderCase::Preserve { .. })
            && session.req_header().version != http::Version::HTTP_2
        {
            ctx.request_spellings = Some(Spellings::of_request(session.req_header()));
        }
        ctx.downstream_tls = meta.tls;
        ctx.peer_tls = meta.peer_tls.clone();
        if !hcm.filters.is_empty() {
            ctx.sni.clone_from(&meta.sni);
        }
        ctx.buffer_limit = meta.buffer_limit;
        ctx.outbound = meta.outbound;
        ctx.inbound = meta.inbound;
        if last {
            session.set_keepalive(None);
        }
        ctx.idle = hcm.stream_idle_timeout;
        ctx.request_deadline = hcm
            .request_timeout
            .map(|t| ctx.arrived.unwrap_or_else(Instant::now) + t);
        session.set_read_timeout(ctx.downstream_read_timeout());
        ctx.kept_hop_headers = [http::header::PROXY_AUTHORIZATION, http::header::TRAILER]
            .into_iter()
            .flat_map(|n| {
                session
                    .req_header()
                    .headers
                    .get_all(&n)
                    .iter()
                    .map(move |v| (n.clone(), v.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        ctx.te_trailers = session.req_header().headers.get_all("te").iter().any(|v| {
            v.to_str()
                .unwrap_or("")
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });

        if session.req_header().version != http::Version::HTTP_2 {
            let raw = session.as_downstream().to_h1_raw();
            let http10 = hcm.http10.as_deref();
            if let Some((status, body)) = rq::http1_codec_check(session.req_header(), &raw, http10)
            {
                session.set_keepalive(None);
                self.local_reply(
                    session,
                    ctx,
                    status,
                    Bytes::from_static(body.as_bytes()),
                    vec![],
                    false,
                )
                .await?;
                return Ok(true);
            }
        }
        // An HTTP/1.0 request without a host gets the configured one.
        if let Some(default) = hcm.http10.as_deref().filter(|d| !d.is_empty()) {
            let req = session.req_header_mut();
            if req.version == http::Version::HTTP_10
                && !req.headers.contains_key(http::header::HOST)
            {
                req.insert_header(http::header::HOST, default)?;
            }
        }
        // Envoy answers `Expect: 100-continue` itself unless told to proxy
        // it, and the upstream never sees the expectation.
        if !hcm.proxy_100_continue && expects_continue(session.req_header()) {
            // Not the response: the connection may stay open after it.
            session.set_close_on_response_before_downstream_finish(false);
            session.write_continue_response().await?;
            session.set_close_on_response_before_downstream_finish(true);
            // Then the expectation goes (pingora writes a 100 only while
            // the request has one), and so do the upstream's own 1xx.
            session
                .req_header_mut()
                .remove_header(&http::header::EXPECT);
            session.as_downstream_mut().set_ignore_info_resp(true);
        }
        ignore_upgrade(session.req_header_mut(), &hcm.ignore_upgrades);
        // Upgrades: h2c is dropped here, as Envoy's HTTP/1 codec drops it
        // before proxying; any other is decided once the route is known (a
        // route's upgrade_configs override the connection manager's).
        if let Some(up) = session
            .req_header()
            .headers
            .get(http::header::UPGRADE)
            .map(|v| v.as_bytes().to_ascii_lowercase())
        {
            if up == b"h2c" {
                let req = session.req_header_mut();
                req.remove_header(&http::header::UPGRADE);
                req.remove_header("http2-settings");
            } else if connection_tokens(session.req_header())
                .iter()
                .any(|t| t == "upgrade")
            {
                // Forwarded as sent (Envoy keeps an upgrade's Connection and
                // Upgrade headers). Unless it becomes a tunnel, Envoy ends
                // the connection after the response: the request never
                // completed.
                let header = |name| {
                    let v = session.req_header().headers.get(name)?.to_str().ok()?;
                    Some(v.to_string())
                };
                ctx.upgrade = header(http::header::UPGRADE);
                ctx.upgrade_connection = header(http::header::CONNECTION);
                session.set_keepalive(None);
            }
        }
        // Headers the client's Connection header names are hop-by-hop: drop
        // them now, before Legate adds its own (so a client can never strip
        // those), keeping the ones the proxy itself interprets.
        let tokens = connection_tokens(session.req_header());
        // Envoy refuses a Connection header naming the headers it relies on
        // (with an empty body for `host`: the request then has none).
        let names_host = tokens.iter().any(|t| t == "host");
        let names_protected = tokens.iter().any(|t| {
            t.starts_with(':')
                || matches!(
                    t.as_str(),
                    "x-forwarded-for" | "x-forwarded-host" | "x-forwarded-proto"
                )
        });
        if names_host || names_protected {
            session.set_keepalive(None);
            let body = if names_host {
                Bytes::new()
            } else {
                Bytes::from_static(b"Bad Request")
            };
            self.local_reply(session, ctx, 400, body, vec![], false)
                .await?;
            return Ok(true);
        }
        for t in &tokens {
            if !matches!(
                t.as_str(),
                "te" | "upgrade" | "connection" | "close" | "keep-alive"
            ) {
                session.req_header_mut().remove_header(t.as_str());
                ctx.kept_hop_headers.retain(|(n, _)| n.as_str() != t);
            }
        }
        // The nominations are handled: pingora must not apply them again to
        // the upstream request Legate builds (it would strip route-added
        // headers). An allowed upgrade keeps `connection: upgrade`.
        if !tokens.is_empty() {
            let req = session.req_header_mut();
            req.remove_header(&http::header::CONNECTION);
            if let Some(c) = &ctx.upgrade_connection {
                req.insert_header(http::header::CONNECTION, c.as_str())?;
            } else if tokens.iter().any(|t| t == "close") {
                req.insert_header(http::header::CONNECTION, "close")?;
            }
        }
        // Header limits (Envoy: 60 KiB and 100 headers by default → 431).
        // Envoy counts the request line's path and method in the header size.
        let (count, size) = {
            let r = session.req_header();
            let h = &r.headers;
            let pseudo =
                r.uri.path_and_query().map_or(0, |p| p.as_str().len()) + r.method.as_str().len();
            (
                h.len(),
                pseudo
                    + h.iter()
                        .map(|(k, v)| k.as_str().len() + v.len())
                        .sum::<usize>(),
            )
        };
        if count > hcm.max_headers_count as usize
            || size > hcm.max_request_headers_kb as usize * 1024
        {
            session.set_keepalive(None);
            self.local_reply(
                session,
                ctx,
                431,
                Bytes::from_static(b"Request Header Fields Too Large"),
                vec![],
                false,
            )
            .await?;
            return Ok(true);
        }
        let underscored: Vec<HeaderName> = session
            .req_header()
            .headers
            .keys()
            .filter(|k| k.as_str().contains('_'))
            .cloned()
            .collect();
        if !underscored.is_empty() {
            match hcm.underscores {
                UnderscoreAction::Allow => {}
                UnderscoreAction::DropHeader => {
                    for k in underscored {
                        session.req_header_mut().remove_header(&k);
                    }
                }
                UnderscoreAction::RejectRequest => {
                    session.set_keepalive(None);
                    self.local_reply(
                        session,
                        ctx,
                        400,
                        Bytes::from_static(b"Bad Request"),
                        vec![],
                        false,
                    )
                    .await?;
                    return Ok(true);
                }
            }
        }

        // Early header mutations come before anything else looks at the
        // request.
        for m in &hcm.early_mutations {
            m.apply(
                session.req_header_mut(),
                ctx.downstream_remote,
                ctx.downstream_local,
            );
        }

        // Path checks and normalization happen before routing, as in Envoy.
        let raw_path = session
            .req_header()
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        // CONNECT needs a connect_matcher route, which Legate does not
        // support (and rejects in config): so no route matches, as in Envoy.
        let asterisk = raw_path == "*" && session.req_header().method == http::Method::OPTIONS;
        if session.req_header().method == http::Method::CONNECT || asterisk {
            hcm.stats().no_route.increment(1);
            ctx.flags.add("NR");
            ctx.details = "route_not_found".into();
            self.local_reply(session, ctx, 404, Bytes::new(), vec![], false)
                .await?;
            return Ok(true);
        }
        if !raw_path.starts_with('/') {
            self.local_reply(session, ctx, 400, Bytes::new(), vec![], false)
                .await?;
            return Ok(true);
        }
        let mut path = raw_path.clone();
        match rq::escaped_slashes(&path, hcm.escaped_slashes) {
            SlashOutcome::Keep => {}
            SlashOutcome::Reject => {
                session.set_keepalive(None);
                self.local_reply(session, ctx, 400, Bytes::new(), vec![], false)
                    .await?;
                return Ok(true);
            }
            SlashOutcome::Redirect(p) => {
                let p = rq::normalized(&p, hcm.normalize_path, hcm.merge_slashes);
                self.local_reply(
                    session,
                    ctx,
                    307,
                    Bytes::new(),
                    vec![(http::header::LOCATION, p)],
                    false,
                )
                .await?;
                return Ok(true);
            }
            SlashOutcome::Rewrite(p) => path = p,
        }
        if hcm.normalize_path || hcm.merge_slashes {
            path = rq::normalized(&path, hcm.normalize_path, hcm.merge_slashes);
        }
        if path != raw_path {
            set_path(session.req_header_mut(), &path)?;
        }

        // Host: HTTP/2 :authority or HTTP/1 Host.
        let mut host = routing::authority(session.req_header()).to_string();
        // Envoy strips the trailing dot first, then the port.
        if hcm.strip_trailing_host_dot {
            if let Some(h) = rq::strip_trailing_host_dot(&host) {
                host = h;
                set_host_only(session.req_header_mut(), &host)?;
            }
        }
        if hcm.strip_any_host_port
            || (hcm.strip_matching_host_port
                && ctx
                    .downstream_local
                    .is_some_and(|l| host.ends_with(&format!(":{}", l.port()))))
        {
            host = routing::strip_port(&host).to_string();
            set_host_only(session.req_header_mut(), &host)?;
        }
        ctx.original_host = host.clone();

        // x-forwarded-client-cert (Envoy's mutateXfccRequestHeader).
        {
            use super::xfcc;
            let req = session.req_header_mut();
            let current = req.headers.get(xfcc::HEADER).and_then(|v| v.to_str().ok());
            let peer = ctx.peer_tls.as_ref().and_then(|p| p.get());
            match xfcc::mutate(hcm.xfcc, &hcm.xfcc_details, peer, current) {
                None => {
                    req.remove_header(xfcc::HEADER);
                }
                Some(v) if Some(v.as_str()) != current => {
                    req.insert_header(xfcc::HEADER, v)?;
                }
                Some(_) => {}
            }
        }

        // Forwarding headers, as Envoy's ConnectionManagerUtility.
        if let Some(peer) = ctx.downstream_remote {
            let local_ip = self.shared.local_ip;
            let fwd = rq::forwarding(
                &hcm,
                peer.ip(),
                local_ip,
                ctx.scheme(),
                session.req_header_mut(),
            )?;
            ctx.client_addr = Some(SocketAddr::new(
                fwd.client,
                if fwd.client == peer.ip() {
                    peer.port()
                } else {
                    0
                },
            ));
            ctx.request_id = fwd.request_id;
            if let Some(code) = fwd.reject {
                ctx.details = "rejecting_because_detection_failed".into();
                self.local_reply(session, ctx, code, Bytes::new(), Vec::new(), false)
                    .await?;
                return Ok(true);
            }
        }

        // Route selection.
        let rc = {
            let req = session.req_header();
            let header = |name: &str| -> Option<String> {
                if name == "host" || name == ":authority" {
                    return Some(host.clone());
                }
                req.headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            self.shared.routes.resolve(&hcm.routes, &header)
        };
        if let Some(rc) = rc {
            ctx.selected = self.select_route(session, ctx, rc, &host, &path);
        }
        if let Some(sel) = &ctx.selected {
            if let Some(up) = &ctx.upgrade {
                if !upgrade_allowed(&hcm, sel.route(), up) {
                    // Envoy answers 403 and closes the connection.
                    ctx.details = "upgrade_failed".into();
                    session.set_keepalive(None);
                    self.local_reply(session, ctx, 403, Bytes::new(), vec![], false)
                        .await?;
                    return Ok(true);
                }
            }
        }
        if let Some(t) = &hcm.tracing {
            start_trace(session.req_header_mut(), ctx, &hcm, t);
        }
        if !hcm.filters.is_empty() {
            if self.run_filters(session, ctx).await? {
                return Ok(true);
            }
            // A filter may ask for trailers (gRPC-Web's `te: trailers`),
            // which the hop-by-hop cleanup would otherwise remove.
            ctx.te_trailers |= session
                .req_header()
                .headers
                .get("te")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
        }
        let Some(sel) = &ctx.selected else {
            hcm.stats().no_route.increment(1);
            ctx.flags.add("NR");
            ctx.details = "route_not_found".into();
            self.local_reply(session, ctx, 404, Bytes::new(), vec![], false)
                .await?;
            return Ok(true);
        };
        let rc = sel.config.clone();
        let (vi, ri) = (sel.vhost, sel.route);
        let route = &rc.virtual_hosts[vi].routes[ri];
        match &route.action {
            Action::Direct(d) => {
                ctx.details = "direct_response".into();
                let mut body = d.body.clone().unwrap_or_default();
                // A 201 or 3xx direct response points back at the request's URL.
                let extra = if d.status == 201 || (300..400).contains(&d.status) {
                    vec![(
                        http::header::LOCATION,
                        format!("{}://{host}{path}", request_scheme(session)),
                    )]
                } else {
                    vec![]
                };
                if let Some(f) = &d.body_format {
                    body = f.render(&body);
                    ctx.reply_content_type.clone_from(&f.content_type);
                }
                self.local_reply(session, ctx, d.status, body, extra, true)
                    .await?;
                Ok(true)
            }
            Action::Redirect(r) => {
                ctx.details = "direct_response".into();
                let scheme = request_scheme(session);
                let loc = rq::redirect_location(r, &route.matcher, &scheme, &host, &path);
                self.local_reply(
                    session,
                    ctx,
                    r.code,
                    Bytes::new(),
                    vec![(http::header::LOCATION, loc)],
                    true,
                )
                .await?;
                Ok(true)
            }
            Action::Forward(ra) => {
                let name = match &ra.cluster {
                    ClusterSpec::Name(n) => n.clone(),
                    ClusterSpec::Header(h) => session
                        .req_header()
                        .headers
                        .get(h)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string(),
                    ClusterSpec::Weighted(w) => {
                        w.clusters[ctx.weighted_index.unwrap_or(0)].name.clone()
                    }
                };
                let Some(cluster) = self.shared.clusters.get(&name) else {
                    hcm.stats().no_cluster.increment(1);
                    ctx.flags.add("NC");
                    ctx.details = "cluster_not_found".into();
                    self.local_reply(
                        session,
                        ctx,
                        ra.cluster_not_found_code,
                        Bytes::new(),
                        vec![],
                        // Router local replies get the route's response headers (Envoy's modify_headers).
                        ctx.selected.is_some(),
                    )
                    .await?;
                    return Ok(true);
                };
                ctx.cluster = Some(cluster);
                ctx.retry = ra
                    .retry_policy
                    .clone()
                    .or_else(|| rc.virtual_hosts[vi].retry_policy.clone());
                let jar = CookieJar {
                    remote: ctx.downstream_remote,
                    local: ctx.downstream_local,
                    set_cookies: &mut ctx.set_cookies,
                };
                // A cluster's own hash policy replaces the route's.
                let own = ctx.cluster.as_ref().map(|c| c.config.clone());
                let policies = match own.as_deref() {
                    Some(c) if !c.hash_policy.is_empty() => &c.hash_policy,
                    _ => &ra.hash_policy,
                };
                ctx.hash = hash_for(
                    policies,
                    session,
                    ctx.client_addr.or(ctx.downstream_remote),
                    Some(jar),
                );

                // Path rewrites; Envoy keeps the original in x-envoy-original-path.
                let new_path = if let Some(pr) = &ra.prefix_rewrite {
                    Some(rq::prefix_rewrite(&path, &route.matcher, pr))
                } else {
                    ra.regex_rewrite
                        .as_ref()
                        .map(|(re, sub)| rq::regex_rewrite(&path, &re.0, sub))
                };
                let keep_original = !hcm.suppress_envoy_headers;
                if let Some(np) = new_path {
                    let req = session.req_header_mut();
                    if keep_original {
                        req.insert_header(hdr("x-envoy-original-path"), path.as_str())?;
                    }
                    set_path(req, &np)?;
                }
                let wc_host = ctx.weighted_index.and_then(|i| match &ra.cluster {
                    ClusterSpec::Weighted(w) => w.clusters[i].host_rewrite_literal.clone(),
                    _ => None,
                });
                match (&ra.host_rewrite, wc_host) {
                    // Envoy keeps no x-envoy-original-host for a weighted
                    // cluster's own host rewrite.
                    (_, Some(h)) => set_host_only(session.req_header_mut(), &h)?,
                    (Some(HostRewrite::Literal(h)), None) => set_host(
                        session.req_header_mut(),
                        h,
                        keep_original,
                        ra.append_x_forwarded_host,
                    )?,
                    (Some(HostRewrite::PathRegex(re, sub)), None) => {
                        let host =
                            re.0.replace_all(crate::routing::path_only(&path), sub.as_str());
                        if !host.is_empty() {
                            set_host(
                                session.req_header_mut(),
                                &host,
                                keep_original,
                                ra.append_x_forwarded_host,
                            )?;
                        }
                    }
                    (Some(HostRewrite::Header(hn)), None) => {
                        if let Some(v) = session
                            .req_header()
                            .headers
                            .get(hn)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string)
                        {
                            set_host(
                                session.req_header_mut(),
                                &v,
                                keep_original,
                                ra.append_x_forwarded_host,
                            )?;
                        }
                    }
                    _ => {}
                }
                // With max_stream_duration (Envoy's "new timeouts") the
                // route's `timeout` is not used.
                ctx.timeout = match (&ra.stream_duration, &ra.grpc_timeout) {
                    (Some(_), _) => None,
                    (None, Some(g)) if is_grpc(session) => {
                        g.route_timeout(&session.req_header().headers)
                    }
                    _ => ra.timeout,
                };
                let limit = match &ra.stream_duration {
                    Some(s) => s.limit(&session.req_header().headers, hcm.max_stream_duration),
                    None => hcm.max_stream_duration,
                };
                // A gRPC upstream is told the limit the route sets.
                if let Some(t) = limit.filter(|_| is_grpc(session) && ra.stream_duration.is_some())
                {
                    let v = crate::config::route::format_grpc_timeout(t);
                    session.req_header_mut().insert_header("grpc-timeout", v)?;
                }
                ctx.stream_deadline =
                    limit.and_then(|t| ctx.arrived.unwrap_or_else(Instant::now).checked_add(t));
                if ctx.stream_deadline.is_some() {
                    session.set_read_timeout(ctx.downstream_read_timeout());
                }
                if let Some(idle) = ra.idle_timeout {
                    ctx.idle = idle;
                    session.set_read_timeout(ctx.downstream_read_timeout());
                }
                ctx.started = Some(Instant::now());
                // Set before the header mutations, which may remove it.
                if let Some(t) = attempt_timeout(ctx).filter(|_| keep_original) {
                    session
                        .req_header_mut()
                        .insert_header(X_ENVOY_EXPECTED_RQ_TIMEOUT_MS, t.as_millis().to_string())?;
                }
                // Request header mutations. Most routes have none: then
                // the request's headers are not copied for the formatters.
                let levels = Self::header_levels(ctx);
                if !levels.iter().any(|o| o.touches_request()) {
                    return Ok(false);
                }
                let snapshot = session.req_header().headers.clone();
                let method = session.req_header().method.clone();
                let fctx = FormatContext {
                    // Envoy evaluates these before its path rewrite.
                    pseudo: crate::config::matcher::Pseudo {
                        method: method.as_str(),
                        path: &path,
                        authority: &host,
                        scheme: ctx.scheme(),
                        status: None,
                    },
                    downstream_remote: ctx.client_addr.or(ctx.downstream_remote),
                    downstream_direct_remote: ctx.downstream_remote,
                    downstream_local: ctx.downstream_local,
                    upstream_cluster: &name,
                    protocol: protocol(session),
                    request_headers: Some(&snapshot),
                    hostname: &self.shared.hostname,
                    ..Default::default()
                };
                for o in levels {
                    headers::apply(
                        &o.request_add,
                        &o.request_remove,
                        session.req_header_mut(),
                        &fctx,
                    );
                }
                Ok(false)
            }
        }
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.body_read += body.as_ref().map_or(0, |b| b.len() as u64);
        let filtered = Self::filter_request_bodies(ctx, body, end_of_stream);
        // pingora takes a missing chunk as the end of the body.
        if !end_of_stream && body.is_none() {
            *body = Some(Bytes::new());
        }
        if let Err(r) = filtered {
            // Sent by fail_to_proxy, as a filter's reply. A downstream
            // error: pingora's HTTP/2 upstream loop ends the request only
            // on those (it takes others as the upstream's and waits on).
            ctx.filter_reply = Some(r);
            // The request did not end as it should: Envoy closes the
            // connection after such a reply.
            session.set_keepalive(None);
            return Err(Error::explain(
                ErrorType::Custom("FilterReply"),
                "a filter refused the request body",
            )
            .into_down());
        }
        for m in &mut ctx.mirrors {
            m.body(body.as_deref(), end_of_stream);
        }
        if end_of_stream {
            ctx.mirrors.clear();
        }
        // The whole request is in: request_timeout is disarmed. Until then
        // the next read gets what remains of it.
        if end_of_stream {
            ctx.request_deadline = None;
        }
        if ctx.request_deadline.is_some() || end_of_stream {
            session.set_read_timeout(ctx.downstream_read_timeout());
        }
        // pingora #935: an HTTP/2 downstream's empty final DATA frame would
        // make an HTTP/1 chunked upstream see the terminating chunk twice.
        if end_of_stream && body.as_ref().is_some_and(|b| b.is_empty()) {
            *body = None;
        }
        Ok(())
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let cluster = ctx
            .cluster
            .clone()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no cluster selected"))?;
        if ctx.attempts > 0 {
            cluster.stats.upstream_rq_retry.increment(1);
            if let Some(r) = &ctx.retry {
                // Envoy's fully jittered exponential back-off.
                let exp = r
                    .base_interval
                    .saturating_mul(1 << (ctx.attempts - 1).min(16))
                    .min(r.max_interval);
                let jitter =
                    Duration::from_nanos(rand::random::<u64>() % (exp.as_nanos() as u64).max(1));
                tokio::time::sleep(jitter).await;
            }
            if let Some(h) = ctx.host.take() {
                h.active_requests.fetch_sub(1, Ordering::Relaxed);
            }
        }
        ctx.attempts += 1;
        let loads = Self::retry_priority_loads(&cluster, ctx);
        let Some(host) = choose_host(&cluster, session, ctx, loads.as_ref()) else {
            cluster.stats.upstream_cx_none_healthy.increment(1);
            return refuse(ctx, 503, "no healthy upstream", "UH", "no_healthy_upstream");
        };
        let h2 = cluster.config.h2_for(session.req_header().version);
        Self::take_slots(&cluster, ctx, h2, host.addr).await?;
        host.active_requests.fetch_add(1, Ordering::Relaxed);
        ctx.tried.push(host.addr);
        ctx.host = Some(host.clone());
        Self::start_attempt_span(ctx, &cluster.config.name, host.addr);
        cluster.stats.upstream_rq_total.increment(1);
        cluster.stats.upstream_rq_active.increment(1.0);
        ctx.upstream_started = Some(Instant::now());

        let cfg = &cluster.config;
        let mut h2 = cfg.h2_for(session.req_header().version);
        let mut alpn_pool = None;
        let mut peer = match &host.tls {
            None => HttpPeer::new(host.addr, false, String::new()),
            // pingora sees plaintext; the TLS is ours (`tls::upstream`). The
            // SNI is still the peer's, so pooled connections stay apart.
            Some(t) => {
                let connect = match &t.connect {
                    Some(c) => c.clone(),
                    None => Arc::new(crate::tls::upstream::TlsConnect {
                        tls: t.tls.clone(),
                        sni: Self::request_sni(&t.tls, session.req_header(), ctx, &host),
                        timeout: cfg.connect_timeout,
                        keepalive: cfg.tcp_keepalive,
                        bind: cfg.bind,
                    }),
                };
                let mut peer =
                    HttpPeer::new(host.addr, false, connect.sni.clone().unwrap_or_default());
                use crate::config::cluster::UpstreamProtocol as P;
                let alpn_override = ctx.filter_state.get::<crate::istio::alpn::AlpnOverride>();
                peer.options.custom_l4 = Some(match cfg.protocol {
                    // `istio.alpn`: the request's list replaces whatever the
                    // connection would offer (Envoy's application protocol
                    // override); such connections pool apart (below).
                    P::Http1 | P::Http2 | P::Downstream if alpn_override.is_some() => {
                        let o = alpn_override.expect("checked");
                        alpn_pool = Some(o.pool_key());
                        Arc::new(crate::tls::upstream::TlsConnect {
                            tls: cluster.alpn.overridden(&connect.tls, o),
                            sni: connect.sni.clone(),
                            timeout: connect.timeout,
                            keepalive: connect.keepalive,
                            bind: connect.bind,
                        })
                    }
                    P::Auto => {
                        let (l4, picked) = Self::auto_alpn(&cluster, host.addr, &connect).await;
                        h2 = picked;
                        l4
                    }
                    // Without ALPN of its own, a connection offers the
                    // protocol of the request it is made for, as Envoy's
                    // pools do; pingora keeps h2 and HTTP/1 ones apart.
                    P::Downstream if connect.tls.alpn.is_empty() => {
                        Arc::new(crate::tls::upstream::TlsConnect {
                            tls: cluster.alpn.narrowed(&connect.tls, h2),
                            sni: connect.sni.clone(),
                            timeout: connect.timeout,
                            keepalive: connect.keepalive,
                            bind: connect.bind,
                        })
                    }
                    _ => connect,
                });
                peer
            }
        };
        ctx.upstream_h1 = !h2;
        ctx.attempt_deadline = cfg.max_stream_duration.map(|d| Instant::now() + d);
        peer.group_key = match &cluster.generations {
            Some(g) => g.key(cluster.pool_key, Instant::now()),
            None => cluster.pool_key,
        } ^ alpn_pool.unwrap_or(0);
        if let Some(b) = cfg.bind.for_peer(host.addr) {
            let mut to = pingora_core::connectors::l4::BindTo::default();
            to.addr = Some(b);
            peer.options.bind_to = Some(to);
        }
        peer.options.tcp_keepalive =
            cfg.tcp_keepalive
                .map(|k| pingora_core::protocols::TcpKeepalive {
                    idle: k.idle,
                    interval: k.interval,
                    count: k.probes as usize,
                    #[cfg(target_os = "linux")]
                    user_timeout: Duration::ZERO,
                });
        peer.options.connection_timeout = Some(cfg.connect_timeout);
        // Upstream reads wait for the attempt's timeout or the stream idle
        // timeout, whichever is shorter.
        let t = upstream_read_bound(ctx);
        let (t, idle_binds) = match (t, ctx.idle) {
            (Some(a), Some(i)) if i < a => (Some(i), true),
            (None, Some(i)) => (Some(i), true),
            (t, _) => (t, false),
        };
        ctx.idle_binds = idle_binds;
        peer.options.read_timeout = t;
        peer.options.write_timeout = Some(t.unwrap_or(Duration::from_secs(60)));
        peer.options.idle_timeout = match &cluster.generations {
            Some(g) => g.idle_bound(cfg.upstream_idle_timeout),
            None => cfg.upstream_idle_timeout,
        };
        if h2 {
            peer.options.alpn = ALPN::H2;
            peer.options.max_h2_streams = (cfg.max_concurrent_streams as usize).clamp(1, 1000);
            if cfg.max_requests_per_connection == Some(1) {
                // One request per HTTP/2 connection: a pool key no other
                // request has, and the connection closed once idle.
                peer.group_key ^= rand::random::<u64>() | 1;
                peer.options.idle_timeout = Some(Duration::ZERO);
            }
        }
        let _ = session;
        Ok(Box::new(peer))
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] fd: std::os::unix::io::RawFd,
        digest: Option<&pingora_core::protocols::Digest>,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.upstream_local = digest
            .and_then(|d| d.socket_digest.as_ref())
            .and_then(|s| inet(s.local_addr()));
        // Envoy arms the cluster's max_stream_duration when the connection
        // is ready, not while connecting.
        if let Some(d) = ctx
            .cluster
            .as_ref()
            .and_then(|c| c.config.max_stream_duration)
        {
            ctx.attempt_deadline = Some(Instant::now() + d);
        }
        if let Some(c) = &ctx.cluster {
            if !reused {
                c.stats.upstream_cx_total.increment(1);
                if let Some(h) = &c.health {
                    h.had_traffic
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            // HTTP/2 connections made for one request are not pooled at
            // all (`upstream_peer`); the header is HTTP/1's.
            ctx.last_on_upstream_conn = ctx.upstream_h1 && c.last_request_on(fd, reused);
        }
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if req.headers.get(http::header::HOST).is_none() {
            if let Some(a) = req.uri.authority().map(|a| a.as_str().to_string()) {
                req.insert_header(http::header::HOST, a)?;
            }
        }
        if let (Some(Action::Forward(ra)), Some(h)) =
            (ctx.selected.as_ref().map(|s| &s.route().action), &ctx.host)
        {
            // Envoy rewrites only to a host that has a name.
            if matches!(ra.host_rewrite, Some(HostRewrite::Auto)) && !h.hostname.is_empty() {
                let keep = !ctx.hcm.as_ref().is_some_and(|h| h.suppress_envoy_headers);
                set_host(req, &h.hostname, keep, ra.append_x_forwarded_host)?;
            }
        }
        if ctx
            .selected
            .as_ref()
            .is_some_and(|s| s.vhost().attempt_count_upstream)
        {
            req.insert_header("x-envoy-attempt-count", ctx.attempts.to_string())?;
        }
        // max_grpc_timeout: the gRPC upstream is told this attempt's time.
        let old_grpc_timeouts = ctx.selected.as_ref().is_some_and(|s| {
            matches!(&s.route().action, Action::Forward(ra)
                if ra.grpc_timeout.is_some() && ra.stream_duration.is_none())
        });
        if old_grpc_timeouts && is_grpc(session) {
            if let Some(t) = attempt_timeout(ctx).filter(|t| !t.is_zero()) {
                let v = crate::config::route::format_grpc_timeout(t);
                req.insert_header("grpc-timeout", v)?;
            }
        }
        // The time this attempt is expected to get, as Envoy tells upstreams.
        let suppress = ctx.hcm.as_ref().is_some_and(|h| h.suppress_envoy_headers);
        if ctx.attempts > 1
            && !suppress
            && req.headers.contains_key("x-envoy-expected-rq-timeout-ms")
        {
            if let Some(t) = attempt_timeout(ctx) {
                req.insert_header("x-envoy-expected-rq-timeout-ms", t.as_millis().to_string())?;
            }
        }
        // Envoy's HTTP/1 codec states an empty body explicitly for methods
        // that may carry one.
        if ctx.upstream_h1
            && !matches!(
                req.method,
                http::Method::GET
                    | http::Method::HEAD
                    | http::Method::DELETE
                    | http::Method::TRACE
                    | http::Method::CONNECT
            )
            && !req.headers.contains_key(http::header::CONTENT_LENGTH)
            && !req.headers.contains_key(http::header::TRANSFER_ENCODING)
            && session.as_downstream_mut().is_body_empty()
        {
            req.insert_header(http::header::CONTENT_LENGTH, "0")?;
        }
        // Hop-by-hop headers never go upstream (those the client's
        // Connection header named were removed when the request arrived),
        // and `te` travels only as `trailers`, as Envoy sends it on. One
        // pass over the request's names finds them: most requests carry
        // none, and a removal looks each name up in both of pingora's
        // header maps.
        let hop: Vec<HeaderName> = req
            .headers
            .keys()
            .filter(|n| HOP_BY_HOP.contains(n) || *n == http::header::TE)
            .cloned()
            .collect();
        for h in &hop {
            req.remove_header(h);
        }
        if ctx.last_on_upstream_conn {
            // max_requests_per_connection: the upstream closes after this
            // one, so pingora never pools it again.
            req.insert_header(http::header::CONNECTION, "close")?;
        }
        if let Some(up) = &ctx.upgrade {
            let c = ctx.upgrade_connection.as_deref().unwrap_or("upgrade");
            req.insert_header(http::header::CONNECTION, c)?;
            req.insert_header(http::header::UPGRADE, up.as_str())?;
        }
        if ctx.te_trailers {
            req.insert_header("te", "trailers")?;
        }
        for (name, value) in &ctx.kept_hop_headers {
            req.append_header(name.clone(), value.clone())?;
        }
        if ctx.attempts == 1 && ctx.upgrade.is_none() {
            self.start_mirrors(session, req, ctx);
        }
        if let Some(span) = &ctx.span {
            let spawn = ctx
                .hcm
                .as_ref()
                .and_then(|h| h.tracing.as_ref())
                .is_some_and(|t| t.spawn_upstream_span);
            span.inject(ctx.attempt_span.filter(|_| spawn), req);
        }
        // A body whose length a filter removed (gRPC-Web, ext_proc) goes
        // chunked to an HTTP/1 upstream, as Envoy's codec sends it.
        if ctx.upstream_h1
            && !req.headers.contains_key(http::header::CONTENT_LENGTH)
            && !req.headers.contains_key(http::header::TRANSFER_ENCODING)
            && !session.as_downstream_mut().is_body_empty()
        {
            req.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
        }
        if ctx.upstream_h1 {
            header_case::write_request(req, request_writer(ctx));
        }
        // Last: it moves Host into the URI.
        if !ctx.upstream_h1 {
            h2_scheme(session, req, ctx);
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if is_interim(resp) {
            return Ok(());
        }
        if ctx
            .cluster
            .as_ref()
            .is_some_and(|c| matches!(c.config.header_case, HeaderCase::Preserve { .. }))
            && resp.version != http::Version::HTTP_2
        {
            ctx.response_spellings = Some(Spellings::of_response(resp));
        }
        if let Some(s) = ctx.upstream_spans.last_mut() {
            s.status = resp.status.as_u16();
            s.protocol = Some(match resp.version {
                http::Version::HTTP_2 => "HTTP/2",
                http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            });
        }
        if ctx.cluster.as_ref().is_some_and(|c| {
            c.config
                .response_headers
                .exceeded_by(resp.version, &resp.headers)
        }) {
            // Envoy's codec refuses the head: 502 `UPE`, as for a response
            // that is not HTTP (see `fail_to_proxy`).
            let mut e = Error::explain(ErrorType::InvalidHTTPHeader, "response headers too large");
            e.as_up();
            return Err(e);
        }
        let status = resp.status.as_u16();
        Self::report_outlier(ctx, outlier::Outcome::Response(outlier_code(session, resp)));
        if let Some(r) = &ctx.retry {
            let on = &r.retry_on;
            let retriable = (on.r5xx && status >= 500)
                || (on.gateway_error && matches!(status, 502..=504))
                || (on.retriable_4xx && status == 409)
                || (!on.grpc_statuses.is_empty()
                    && resp
                        .headers
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok()?.parse::<u32>().ok())
                        .is_some_and(|c| on.grpc_statuses.contains(&c)))
                || (on.retriable_status_codes && r.retriable_status_codes.contains(&status))
                || (on.retriable_headers
                    && r.retriable_headers.iter().any(|h| {
                        let pseudo = crate::config::matcher::Pseudo {
                            status: Some(status),
                            ..Default::default()
                        };
                        h.matches_with(&resp.headers, &pseudo)
                    }));
            // A body pingora could not keep (over 64 KiB) cannot be replayed:
            // then the response passes through, as when retries run out.
            let truncated = session.as_ref().retry_buffer_truncated();
            if Self::decide_retry(ctx, retriable, truncated) {
                if let Some(c) = &ctx.cluster {
                    c.stats.record_status(status);
                }
                let mut e =
                    Error::explain(ErrorType::HTTPStatus(status), "retriable upstream status");
                e.set_retry(true);
                return Err(e);
            }
        }
        ctx.response_started = Some(Instant::now());
        let suppress = ctx.hcm.as_ref().is_some_and(|h| h.suppress_envoy_headers);
        if let Some(t) = ctx.upstream_started.filter(|_| !suppress) {
            resp.insert_header(
                X_ENVOY_UPSTREAM_SERVICE_TIME,
                t.elapsed().as_millis().to_string(),
            )?;
        }
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        // Envoy's route timeout covers the whole response, not each read:
        // a response still streaming when it expires is cut (every read is
        // already bounded by what remains, see `attempt_timeout`).
        if !end_of_stream && ctx.stream_deadline.is_some_and(|d| d <= Instant::now()) {
            return Error::e_explain(ErrorType::ReadTimedout, "max_stream_duration reached");
        }
        if !end_of_stream && attempt_over(ctx) {
            return Error::e_explain(
                ErrorType::ReadTimedout,
                "upstream max_stream_duration reached",
            );
        }
        if let (Some(t), Some(start), false) = (ctx.timeout, ctx.started, end_of_stream) {
            if start.elapsed() > t {
                // Counted in upstream_rq_timeout by fail_to_proxy.
                return Error::e_explain(
                    ErrorType::ReadTimedout,
                    "route timeout expired while the response was streaming",
                );
            }
        }
        Ok(None)
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // pingora closes a connection whose response goes out before the
        // request body is in; a `100 Continue` is sent exactly then, and
        // must not (the final response sets it back).
        session.set_close_on_response_before_downstream_finish(!is_interim(resp));
        // An HTTP/1 connection that reached max_connection_duration while
        // this request was in flight closes after it, saying so.
        if !is_interim(resp)
            && session.req_header().version != http::Version::HTTP_2
            && conn_meta(session).is_some_and(|m| m.closing.expired())
        {
            session.set_keepalive(None);
        }
        if is_interim(resp) {
            // A relayed `100 Continue` goes out as the upstream sent it;
            // the request can no longer be retried.
            ctx.relayed_interim = true;
            return Ok(());
        }
        ctx.status = resp.status.as_u16();
        ctx.details = "via_upstream".into();
        if ctx
            .selected
            .as_ref()
            .is_some_and(|s| s.vhost().attempt_count_downstream)
        {
            resp.insert_header("x-envoy-attempt-count", ctx.attempts.to_string())?;
        }
        for c in std::mem::take(&mut ctx.set_cookies) {
            resp.append_header(http::header::SET_COOKIE, c)?;
        }
        if let Some(r) = self
            .decorate_response(resp, ctx, true, session, false)
            .await
        {
            // Sent by fail_to_proxy, in place of the upstream's response.
            ctx.filter_reply = Some(r);
            return Err(Error::explain(
                ErrorType::Custom("FilterReply"),
                "a filter answered the response headers",
            ));
        }
        if session.req_header().version != http::Version::HTTP_2 {
            header_case::write_response(resp, response_writer(ctx));
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        if !ctx.filters_active.is_empty() {
            Self::filter_response_bodies(ctx, body, end_of_stream);
        }
        Ok(None)
    }

    async fn response_trailer_filter(
        &self,
        _session: &mut Session,
        trailers: &mut http::HeaderMap,
        ctx: &mut Ctx,
    ) -> Result<Option<Bytes>> {
        let Some(hcm) = ctx.hcm.clone().filter(|_| !ctx.filters_active.is_empty()) else {
            return Ok(None);
        };
        // Trailers end the body: each body-reading filter finishes its
        // stream here (a compressor's last bytes), in the response order.
        // A filter may turn the trailers into a last body chunk (gRPC-Web),
        // which the filters before it see as body. Bytes left to send go
        // out in place of the trailers (pingora can add no data before
        // them; an HTTP/1 client gets no trailers anyway).
        let mut out: Option<Bytes> = None;
        let mut converted = false;
        for k in (0..ctx.filters_active.len()).rev() {
            let f = &hcm.filters.entries[ctx.filters_active[k]].filter;
            if !f.reads_bodies() {
                continue;
            }
            if !converted {
                if let Some(chunk) = f.on_response_trailers(trailers, &mut ctx.filter_states[k]) {
                    converted = true;
                    let mut joined = out.take().map(|b| b.to_vec()).unwrap_or_default();
                    joined.extend_from_slice(&chunk);
                    out = Some(Bytes::from(joined));
                    continue;
                }
            }
            let mut body = Some(out.take().unwrap_or_default());
            f.on_response_body(&mut body, true, &mut ctx.filter_states[k]);
            out = body.filter(|b| !b.is_empty());
        }
        Ok(if converted {
            Some(out.unwrap_or_default())
        } else {
            out
        })
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let Some(c) = &ctx.cluster {
            c.stats.upstream_cx_connect_fail.increment(1);
        }
        let reason = if matches!(e.etype(), ErrorType::ConnectTimedout) {
            "connection timeout"
        } else {
            "remote connection failure"
        };
        Self::end_upstream_span(ctx, reason);
        // A connect timeout too: Envoy's router reports a pool failure.
        Self::report_outlier(ctx, outlier::Outcome::ConnectFailed);
        let on = ctx.retry.as_ref().map(|r| &r.retry_on);
        let wants = on.is_some_and(|o| {
            o.connect_failure || o.r5xx || o.gateway_error || o.reset || o.reset_before_request
        });
        e.set_retry(Self::decide_retry(ctx, wants, false));
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        _client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        if matches!(e.etype(), ErrorType::HTTPStatus(_)) && e.retry() {
            return e; // our own retry-on-status decision
        }
        let reason = match e.etype() {
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => "local reset",
            ErrorType::H2Error => "remote reset",
            _ => "connection termination",
        };
        Self::end_upstream_span(ctx, reason);
        // Envoy never retries once response bytes went downstream, nor for
        // the client's own errors.
        if final_response(session).is_some()
            || ctx.relayed_interim
            || e.esource() != &pingora_error::ErrorSource::Upstream
        {
            e.set_retry(false);
            return e;
        }
        // The stream's max_stream_duration ended it: Envoy resets the
        // stream, without a retry and without blaming the host.
        if ctx.stream_deadline.is_some_and(|d| d <= Instant::now()) {
            e.set_retry(false);
            return e;
        }
        // The cluster's max_stream_duration reset the attempt: retried as
        // a reset (never as a timeout), without blaming the host.
        if attempt_over(ctx) {
            let wants = ctx.retry.as_ref().is_some_and(|r| r.retry_on.reset);
            let truncated = session.as_ref().retry_buffer_truncated();
            e.set_retry(Self::decide_retry(ctx, wants, truncated));
            return e;
        }
        let on = ctx.retry.as_ref().map(|r| &r.retry_on);
        let timed_out = matches!(
            e.etype(),
            ErrorType::ReadTimedout | ErrorType::WriteTimedout
        );
        // Envoy reports the per-try and route timeouts as timeouts and
        // resets as connect failures; a stream idle timeout is neither.
        if !(timed_out && ctx.idle_binds) {
            let o = if timed_out {
                outlier::Outcome::Timeout
            } else {
                outlier::Outcome::ConnectFailed
            };
            Self::report_outlier(ctx, o);
        }
        // A timeout is retried only when it was the per-try timeout that
        // fired; the route's own timeout ends the request, as in Envoy.
        let per_try_fired = timed_out && !ctx.idle_binds && per_try_is_binding(ctx);
        // An HTTP/2 upstream refusing the stream before processing it.
        let refused = format!("{e:?}").contains("REFUSED_STREAM");
        let wants = on.is_some_and(|o| {
            if timed_out {
                per_try_fired && (o.r5xx || o.gateway_error || o.reset)
            } else {
                o.r5xx || o.gateway_error || o.reset || (o.refused_stream && refused)
            }
        });
        let truncated = session.as_ref().retry_buffer_truncated();
        e.set_retry(Self::decide_retry(ctx, wants, truncated));
        e
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        if let Some(r) = ctx.filter_reply.take() {
            ctx.direct_reply = true;
            let status = r.status;
            let sent = self.send_filter_reply(session, ctx, r).await.is_ok();
            return FailToProxy {
                error_code: status,
                can_reuse_downstream: sent && session.as_downstream_mut().is_body_done(),
            };
        }
        let stream_over = ctx.stream_deadline.is_some_and(|d| d <= Instant::now());
        let reply = ctx.pending_reply.take().unwrap_or_else(|| match e.etype() {
            ErrorType::ReadTimedout | ErrorType::WriteTimedout
                if attempt_over(ctx)
                    && !stream_over
                    && e.esource() != &pingora_error::ErrorSource::Downstream =>
            {
                ctx.flags.add("UMSDR");
                ctx.details = "upstream_max_stream_duration_reached".into();
                let status = if session.as_downstream_mut().is_body_done() { 504 } else { 408 };
                LocalReply { status, body: "upstream max stream duration reached" }
            }
            // The route's max_stream_duration, whichever read noticed it.
            ErrorType::ReadTimedout | ErrorType::WriteTimedout if stream_over => {
                if let Some(h) = &ctx.hcm {
                    h.stats().downstream_rq_max_duration_reached.increment(1);
                }
                // Envoy 1.40 sets no response flag here.
                ctx.details = "max_duration_timeout".into();
                ctx.grpc_status = Some(4); // DEADLINE_EXCEEDED
                // Envoy: 408 while the request is still arriving.
                let status = if session.as_downstream_mut().is_body_done() { 504 } else { 408 };
                LocalReply { status, body: "downstream duration timeout" }
            }
            ErrorType::ReadTimedout | ErrorType::WriteTimedout
                if e.esource() == &pingora_error::ErrorSource::Downstream
                    && ctx.request_deadline.is_some_and(|d| d <= Instant::now()) =>
            {
                if let Some(h) = &ctx.hcm {
                    h.stats().downstream_rq_timeout.increment(1);
                }
                ctx.details = "request_overall_timeout".into();
                LocalReply { status: 408, body: "request timeout" }
            }
            ErrorType::ReadTimedout | ErrorType::WriteTimedout
                if e.esource() == &pingora_error::ErrorSource::Downstream || ctx.idle_binds =>
            {
                if let Some(h) = &ctx.hcm {
                    h.stats().downstream_rq_idle_timeout.increment(1);
                }
                ctx.flags.add("SI");
                ctx.details = "stream_idle_timeout".into();
                // Envoy: 408 while the request is still arriving, 504 once
                // it is all in (the upstream is the silent one), whichever
                // side's read noticed first.
                let status = if session.as_downstream_mut().is_body_done() { 504 } else { 408 };
                LocalReply { status, body: "stream timeout" }
            }
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                if let Some(c) = &ctx.cluster {
                    c.stats.upstream_rq_timeout.increment(1);
                }
                ctx.flags.add("UT");
 ctx.details = "response_timeout".into();
                LocalReply { status: 504, body: "upstream request timeout" }
            }
            ErrorType::HTTPStatus(s) if *s >= 400 => LocalReply { status: *s, body: "" },
            ErrorType::ConnectTimedout | ErrorType::ConnectRefused | ErrorType::ConnectError | ErrorType::ConnectNoRoute => {
                ctx.flags.add("UF");
                // Envoy adds the socket error it saw (checked for refusals).
                ctx.details = if e.etype() == &ErrorType::ConnectRefused {
                    "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}"
                } else {
                    "upstream_reset_before_response_started{remote_connection_failure}"
                }
                .into();
                LocalReply {
                status: 503,
                body: if ctx.attempts > 1 {
                    "upstream connect error or disconnect/reset before headers. retried and the latest reset reason: remote connection failure"
                } else {
                    "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure"
                },
            }},
            ErrorType::Custom(c) if *c == "InvalidChunk" => LocalReply { status: 400, body: "Bad Request" },
            _ if upstream_protocol_error(e) =>
            {
                ctx.flags.add("UPE");
 ctx.details = "upstream_reset_before_response_started{protocol_error}".into();
                LocalReply {
                    status: 502,
                    body: "upstream connect error or disconnect/reset before headers. reset reason: protocol error",
                }
            }
            _ => match e.esource() {
                pingora_error::ErrorSource::Downstream => {
                    ctx.flags.add("DC");
 ctx.details = "downstream_remote_disconnect".into();
                    LocalReply { status: 0, body: "" }
                }
                _ => {
                    ctx.flags.add("UC");
 ctx.details = "upstream_reset_before_response_started{connection_termination}".into();
                    LocalReply { status: 503, body: "upstream connect error or disconnect/reset before headers. reset reason: connection termination" }
                }
            },
        });
        let replied = reply.status > 0 && final_response(session).is_none();
        if replied {
            let suppress = ctx.hcm.as_ref().is_some_and(|h| h.suppress_envoy_headers);
            let mut extra = if ctx.overloaded && !suppress {
                vec![(hdr("x-envoy-overloaded"), "true".to_string())]
            } else {
                vec![]
            };
            // The router's own replies count its attempts too.
            if ctx.attempts > 0
                && ctx
                    .selected
                    .as_ref()
                    .is_some_and(|s| s.vhost().attempt_count_downstream)
            {
                extra.push((hdr("x-envoy-attempt-count"), ctx.attempts.to_string()));
            }
            let _ = self
                .local_reply(
                    session,
                    ctx,
                    reply.status,
                    Bytes::from_static(reply.body.as_bytes()),
                    extra,
                    // Router local replies get the route's response headers (Envoy's modify_headers).
                    ctx.selected.is_some(),
                )
                .await;
        }
        // Envoy keeps a client's connection after its own reply once the
        // request has been read whole; a framing error in the request
        // itself ends it. (pingora heeds this only for errors before
        // proxying: after a failed upstream attempt its loop decides, and
        // ends the connection: a known gap.)
        let framing = matches!(e.etype(), ErrorType::HTTPStatus(_))
            || matches!(e.etype(), ErrorType::Custom(c) if *c == "InvalidChunk");
        FailToProxy {
            error_code: reply.status,
            can_reuse_downstream: replied && !framing && session.as_downstream_mut().is_body_done(),
        }
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, _error: &Error) -> bool {
        // Upstream failures are counted in stats and answered as Envoy does;
        // Envoy logs them at debug level, not per request at error level.
        !tracing::enabled!(tracing::Level::DEBUG)
    }

    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        _ctx: &Ctx,
        _error: &Error,
        _c: pingora_proxy::ProxyWarnLogContext,
    ) -> bool {
        !tracing::enabled!(tracing::Level::DEBUG)
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        // The host stays for the stream's end (istio.stats reads its
        // endpoint metadata); it is let go after.
        if let Some(h) = &ctx.host {
            h.active_requests.fetch_sub(1, Ordering::Relaxed);
        }
        (ctx.cx_slot, ctx.rq_slot, ctx.retry_slot, ctx.host_cx_slot) = (None, None, None, None);
        let status = final_response(session).map_or(ctx.status, |r| r.status.as_u16());
        if let Some(c) = &ctx.cluster {
            if ctx.upstream_started.is_some() {
                c.stats.upstream_rq_active.decrement(1.0);
                c.stats.upstream_rq_completed.increment(1);
                if status > 0 {
                    c.stats.record_status(status);
                }
            }
        }
        if let Some(h) = ctx.hcm.as_ref().filter(|_| status > 0) {
            h.stats().downstream_rq.record(status);
            h.stats().downstream_rq_completed.increment(1);
        }
        self.stream_done(session, ctx, status);
        ctx.host = None;
    }
}

/// Ends the attempt with a reply of Legate's own, before any upstream
/// answered: Envoy's flag and response details, then the error pingora
/// answers with (`fail_to_proxy` sends the pending reply).
fn refuse<T>(
    ctx: &mut Ctx,
    status: u16,
    body: &'static str,
    flag: &'static str,
    details: &'static str,
) -> Result<T> {
    ctx.flags.add(flag);
    ctx.details = details.into();
    ctx.pending_reply = Some(LocalReply { status, body });
    Error::e_explain(ErrorType::HTTPStatus(status), details)
}

/// The request is gRPC (by its content type).
fn is_grpc(session: &Session) -> bool {
    session
        .req_header()
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(routing::is_grpc_content_type)
}

/// The status outlier detection sees: a gRPC status in the response
/// headers (a trailers-only answer) mapped to HTTP as Envoy maps it; a
/// status sent in trailers is not seen, as in Envoy.
fn outlier_code(session: &Session, resp: &ResponseHeader) -> u16 {
    let grpc = is_grpc(session);
    let status = resp
        .headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok());
    match (grpc, status) {
        (true, Some(s)) => rq::http_status_for_grpc(s),
        _ => resp.status.as_u16(),
    }
}

/// Whether an upgrade (lower case) may go through on `route`: the route's
/// `upgrade_configs` entry for it, else the connection manager's.
fn upgrade_allowed(hcm: &Hcm, route: &Route, upgrade: &str) -> bool {
    let upgrade = upgrade.to_ascii_lowercase();
    let on_route = match &route.action {
        Action::Forward(ra) => ra.upgrades.iter().find(|(t, _)| *t == upgrade),
        _ => None,
    };
    match on_route {
        Some((_, enabled)) => *enabled,
        None => hcm.upgrades.contains(&upgrade),
    }
}

/// The lower-cased tokens of the Connection header(s).
fn connection_tokens(req: &RequestHeader) -> Vec<String> {
    req.headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| {
            v.to_str()
                .unwrap_or("")
                .split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .filter(|t| !t.is_empty())
        .collect()
}

/// Whether this attempt's deadline is its per-try timeout (shorter than
/// what remains of the route timeout).
fn per_try_is_binding(ctx: &Ctx) -> bool {
    let Some(per_try) = ctx.retry.as_ref().and_then(|r| r.per_try_timeout) else {
        return false;
    };
    match ctx.timeout {
        None => true,
        Some(t) => {
            let elapsed = ctx.started.map_or(Duration::ZERO, |s| s.elapsed());
            per_try < t.saturating_sub(elapsed)
        }
    }
}

/// This attempt's timeout: the per-try timeout, bounded by what remains of
/// the route timeout.
fn attempt_timeout(ctx: &Ctx) -> Option<Duration> {
    // The first attempt gets the whole route timeout; retries what is left.
    let elapsed = if ctx.attempts <= 1 {
        Duration::ZERO
    } else {
        ctx.started.map_or(Duration::ZERO, |s| s.elapsed())
    };
    let remaining = ctx.timeout.map(|t| t.saturating_sub(elapsed));
    let per_try = ctx.retry.as_ref().and_then(|r| r.per_try_timeout);
    match (per_try, remaining) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// How long this attempt's upstream reads may wait: its timeout, and what
/// remains of the stream's `max_stream_duration`.
fn upstream_read_bound(ctx: &Ctx) -> Option<Duration> {
    let left = |d: Instant| d.saturating_duration_since(Instant::now());
    let stream = ctx.stream_deadline.map(left);
    let attempt = ctx.attempt_deadline.map(left);
    [attempt_timeout(ctx), stream, attempt]
        .into_iter()
        .flatten()
        .min()
}

/// The attempt has lived its cluster's `max_stream_duration`.
fn attempt_over(ctx: &Ctx) -> bool {
    ctx.attempt_deadline.is_some_and(|d| d <= Instant::now())
}

/// The `:scheme` an HTTP/2 upstream is sent, as Envoy's router sets it: the
/// request's own (x-forwarded-proto on HTTP/1, which the connection manager
/// set from the connection when absent), or with `match_upstream` the
/// upstream's transport. It goes in the request's URI with the authority,
/// and Host leaves the headers, so pingora keeps them rather than choosing
/// a scheme of its own.
fn h2_scheme(session: &Session, req: &mut RequestHeader, ctx: &Ctx) {
    let by_transport = ctx.hcm.as_ref().is_some_and(|h| h.scheme_matches_upstream);
    let scheme = if by_transport {
        if ctx.host.as_ref().is_some_and(|h| h.tls.is_some()) {
            "https".to_string()
        } else {
            "http".to_string()
        }
    } else {
        match session.req_header().uri.scheme_str() {
            Some(s @ ("http" | "https"))
                if session.req_header().version == http::Version::HTTP_2 =>
            {
                s.to_string()
            }
            _ => match request_scheme(session).as_str() {
                s @ ("http" | "https") => s.to_string(),
                _ => ctx.scheme().to_string(),
            },
        }
    };
    let Some(host) = req
        .headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
    else {
        return;
    };
    let pq = req
        .uri
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    if let Ok(uri) = http::Uri::builder()
        .scheme(scheme.as_str())
        .authority(host.as_str())
        .path_and_query(pq)
        .build()
    {
        req.set_uri(uri);
        req.remove_header(&http::header::HOST);
    }
}

/// `ignore_http_11_upgrade`: an HTTP/1.1 upgrade to a matching protocol
/// is an ordinary request, its Upgrade header and Connection token gone,
/// as Envoy's HTTP/1 codec makes it.
fn ignore_upgrade(req: &mut RequestHeader, ignore: &[crate::config::matcher::StringMatcher]) {
    if ignore.is_empty() || req.version != http::Version::HTTP_11 {
        return;
    }
    let Some(up) = req
        .headers
        .get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
    else {
        return;
    };
    if !ignore.iter().any(|m| m.matches(&up)) {
        return;
    }
    req.remove_header(&http::header::UPGRADE);
    let rest: Vec<String> = connection_tokens(req)
        .into_iter()
        .filter(|t| t != "upgrade")
        .collect();
    if rest.is_empty() {
        req.remove_header(&http::header::CONNECTION);
    } else {
        let _ = req.insert_header(http::header::CONNECTION, rest.join(","));
    }
}

/// The request's scheme as Envoy's router sees it: x-forwarded-proto.
fn request_scheme(session: &Session) -> String {
    session
        .req_header()
        .headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .map_or("http".to_string(), |s| s.to_ascii_lowercase())
}

fn set_path(req: &mut RequestHeader, path_and_query: &str) -> Result<()> {
    let mut parts = req.uri.clone().into_parts();
    parts.path_and_query = Some(
        path_and_query
            .parse()
            .map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "bad path"))?,
    );
    let uri = http::Uri::from_parts(parts)
        .map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "bad uri"))?;
    req.set_uri(uri);
    Ok(())
}

/// Sets `Host` (and the HTTP/2 authority) without recording the original.
fn set_host_only(req: &mut RequestHeader, host: &str) -> Result<()> {
    req.insert_header(http::header::HOST, host)?;
    if req.uri.authority().is_some() {
        let mut parts = req.uri.clone().into_parts();
        parts.authority = host.parse().ok();
        if let Ok(uri) = http::Uri::from_parts(parts) {
            req.set_uri(uri);
        }
    }
    Ok(())
}

/// Rewrites the host, keeping the original in `x-envoy-original-host` as
/// Envoy's router does (unless it suppresses its headers), and with
/// `append_x_forwarded_host` appending it to `x-forwarded-host` unless it
/// is the last value there already.
fn set_host(
    req: &mut RequestHeader,
    host: &str,
    keep_original: bool,
    append_xfh: bool,
) -> Result<()> {
    let original = req
        .headers
        .get(http::header::HOST)
        .map(|v| v.to_str().unwrap_or("").to_string())
        .or_else(|| req.uri.authority().map(|a| a.to_string()))
        .filter(|o| !o.is_empty());
    if let (Some(o), true) = (&original, append_xfh) {
        let xfh = req
            .headers
            .get("x-forwarded-host")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        // Envoy compares the text after the last comma as it is, spaces
        // included.
        let last = xfh.rsplit(',').next().unwrap_or("");
        if last != o {
            let v = if xfh.is_empty() {
                o.clone()
            } else {
                format!("{xfh},{o}")
            };
            req.insert_header("x-forwarded-host", v)?;
        }
    }
    if let Some(o) = original.filter(|_| keep_original) {
        req.insert_header("x-envoy-original-host", o)?;
    }
    set_host_only(req, host)
}

/// Where a cookie hash policy may make its cookie: the downstream
/// connection's addresses (what Envoy hashes into the value) and the
/// Set-Cookie values for the response. None where Envoy makes none
/// (weighted cluster choice).
struct CookieJar<'a> {
    remote: Option<SocketAddr>,
    local: Option<SocketAddr>,
    set_cookies: &'a mut Vec<String>,
}

/// A cookie hash policy's value: the request's cookie, else one made for
/// it when the policy has a ttl (Envoy hashes its own cookie's text).
fn cookie_hash(
    c: &crate::config::route::CookiePolicy,
    session: &Session,
    jar: Option<&mut CookieJar>,
) -> Option<u64> {
    let value = crate::headers::cookie(&session.req_header().headers, &c.name)
        // An empty cookie is no cookie (Envoy then makes one).
        .filter(|v| !v.is_empty());
    if let Some(v) = value {
        return Some(xxhash_rust::xxh64::xxh64(v.as_bytes(), 0));
    }
    let (ttl, jar) = (c.ttl?, jar?);
    let addrs = format!(
        "{}{}",
        jar.remote.map(|a| a.to_string()).unwrap_or_default(),
        jar.local.map(|a| a.to_string()).unwrap_or_default()
    );
    let made = format!("{:016x}", xxhash_rust::xxh64::xxh64(addrs.as_bytes(), 0));
    jar.set_cookies.push(c.set_cookie(&made, ttl));
    Some(xxhash_rust::xxh64::xxh64(made.as_bytes(), 0))
}

/// Envoy's hash policy evaluation: each policy that yields a value is mixed
/// in; a terminal one that yields a value ends the walk.
fn hash_for(
    policies: &[HashPolicy],
    session: &Session,
    remote: Option<SocketAddr>,
    mut jar: Option<CookieJar>,
) -> Option<u64> {
    let mut hash: Option<u64> = None;
    for p in policies {
        let (value, terminal) = match p {
            HashPolicy::Cookie { cookie, terminal } => {
                (cookie_hash(cookie, session, jar.as_mut()), *terminal)
            }
            HashPolicy::Header { name, terminal } => (
                session
                    .req_header()
                    .headers
                    .get(name)
                    .map(|v| xxhash_rust::xxh64::xxh64(v.as_bytes(), 0)),
                *terminal,
            ),
            HashPolicy::SourceIp { terminal } => (
                remote.map(|a| xxhash_rust::xxh64::xxh64(a.ip().to_string().as_bytes(), 0)),
                *terminal,
            ),
            HashPolicy::Query { name, terminal } => {
                let path = session
                    .req_header()
                    .uri
                    .path_and_query()
                    .map_or("", |p| p.as_str());
                let q = routing::query_params(path);
                (
                    q.iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| xxhash_rust::xxh64::xxh64(v.as_bytes(), 0)),
                    *terminal,
                )
            }
        };
        if let Some(v) = value {
            // Envoy: hash = ((hash << 1) | (hash >> 63)) ^ new.
            hash = Some(hash.map_or(v, |h| h.rotate_left(1) ^ v));
            if terminal {
                break;
            }
        }
    }
    hash
}

/// The host of this attempt: the balancer's pick (avoiding hosts
/// already tried when the retry policy says so), or for an
/// ORIGINAL_DST cluster the request's destination. None: no host.
/// Where a request's spans go: the tracer's exporter.
#[derive(Clone, Copy)]
enum SpanSink<'a> {
    Otel(&'a crate::trace::otel::Exporter),
    Zipkin(&'a crate::trace::zipkin::Exporter),
}

/// Envoy's previous-priorities retry priority, per request: the hosts
/// attempted since it last started over, the priorities they left out, and
/// the loads made without them.
#[derive(Default)]
struct RetryPriority {
    attempted: Vec<SocketAddr>,
    /// How much of `Ctx::tried` is in `attempted`.
    seen: usize,
    excluded: Vec<bool>,
    loads: Option<crate::cluster_manager::LoadOverride>,
}

impl RetryPriority {
    /// The loads for the next attempt (None: the cluster's own), as
    /// Envoy's `determinePriorityLoad`: the original until `frequency`
    /// hosts were attempted; then, every `frequency` attempts, the
    /// priorities of the attempted hosts are left out; when that leaves
    /// nothing, the attempts start over (the exclusions stay, as in
    /// Envoy) and the original loads serve.
    fn loads(
        &mut self,
        snapshot: &crate::cluster_manager::HostSnapshot,
        tried: &[SocketAddr],
        frequency: u32,
    ) -> Option<crate::cluster_manager::LoadOverride> {
        self.attempted
            .extend_from_slice(&tried[self.seen.min(tried.len())..]);
        self.seen = tried.len();
        let n = self.attempted.len() as u32;
        if n < frequency {
            return None;
        }
        if n.is_multiple_of(frequency) {
            for a in &self.attempted {
                if let Some(p) = snapshot.priority_of(*a) {
                    if self.excluded.len() <= p {
                        self.excluded.resize(p + 1, false);
                    }
                    self.excluded[p] = true;
                }
            }
            match snapshot.loads_without(&self.excluded) {
                Some(l) => self.loads = Some(l),
                None => {
                    self.attempted.clear();
                    return None;
                }
            }
        }
        self.loads.clone()
    }
}

fn choose_host(
    cluster: &Cluster,
    session: &Session,
    ctx: &Ctx,
    loads: Option<&crate::cluster_manager::LoadOverride>,
) -> Option<Arc<UpstreamHost>> {
    if let Some(od) = &cluster.config.original_dst {
        let restored = conn_meta(session).is_some_and(|m| m.restored);
        let local = ctx.downstream_local.filter(|_| restored);
        let (dst, invalid) = od.destination(Some(&session.req_header().headers), local);
        if invalid {
            crate::stats::counter(format!(
                "cluster.{}.original_dst_host_invalid",
                cluster.config.name
            ))
            .increment(1);
        }
        return dst.map(|a| cluster.original_dst_host(a));
    }
    let avoid_previous = ctx.retry.as_ref().is_some_and(|r| r.previous_hosts);
    let attempts = ctx.retry.as_ref().and_then(|r| r.host_selection_attempts);
    // A filter's override host (a stateful session's) wins on the first
    // attempt when the cluster has it healthy or degraded; retries are the
    // balancer's, as Envoy's router offers the override once.
    if let Some(crate::http_filters::OverrideHost(a)) = ctx.filter_state.get() {
        if ctx.tried.is_empty() {
            if let Some(h) = cluster.snapshot().find_host(*a) {
                return Some(h);
            }
        }
    }
    cluster.snapshot().pick_with(
        ctx.hash,
        rand::random(),
        &|a| avoid_previous && ctx.tried.contains(&a),
        attempts,
        loads,
    )
}

/// The response sent downstream, if one was: a `100 Continue` before it
/// is not the response (errors after it still get their reply).
fn final_response(session: &Session) -> Option<&ResponseHeader> {
    session.response_written().filter(|r| !is_interim(r))
}

/// An informational response other than 101 (which starts an upgrade):
/// passed on untouched, and not the request's response.
fn is_interim(resp: &ResponseHeader) -> bool {
    resp.status.is_informational() && resp.status != http::StatusCode::SWITCHING_PROTOCOLS
}

/// `Expect: 100-continue` (the one expectation HTTP defines).
fn expects_continue(req: &RequestHeader) -> bool {
    req.headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Whether the upstream broke HTTP: a response head that is not HTTP or
/// is over the cluster's limits, or a connection that ended in the middle
/// of its head (Envoy: 502 `UPE`). A close before any byte of the head is
/// a connection termination instead, as in Envoy. pingora states how much
/// of the head it had read only in the error's context.
fn upstream_protocol_error(e: &Error) -> bool {
    if e.esource() != &pingora_error::ErrorSource::Upstream {
        return false;
    }
    match e.etype() {
        ErrorType::InvalidHTTPHeader | ErrorType::InvalidH2 => true,
        ErrorType::ConnectionClosed | ErrorType::ReadError => {
            // The read's own error is the cause of the one naming the peer.
            let mut cur = Some(e);
            while let Some(err) = cur {
                let read = err
                    .context
                    .as_ref()
                    .and_then(|c| c.as_str().rsplit_once("bytes already read: "))
                    .and_then(|(_, n)| n.trim().parse::<usize>().ok());
                if let Some(n) = read {
                    return n > 0;
                }
                cur = err.cause.as_ref().and_then(|c| {
                    c.downcast_ref::<Error>()
                        .or_else(|| c.downcast_ref::<Box<Error>>().map(|b| &**b))
                });
            }
            false
        }
        _ => false,
    }
}

/// How the request's names go out to an HTTP/1 upstream: as the client
/// spelled them when the connection manager preserves case, else as the
/// cluster's `proper_case_words` says, else lower case.
fn request_writer(ctx: &Ctx) -> header_case::Writer<'_> {
    let hcm = ctx.hcm.as_ref().map(|h| h.header_case).unwrap_or_default();
    match (&ctx.request_spellings, hcm) {
        (Some(s), HeaderCase::Preserve { proper_unknown }) => header_case::Writer {
            spellings: Some(s),
            proper: proper_unknown,
        },
        _ => header_case::Writer {
            spellings: None,
            proper: ctx
                .cluster
                .as_ref()
                .is_some_and(|c| c.config.header_case == HeaderCase::ProperCase),
        },
    }
}

/// How the response's names go out to an HTTP/1 client: as the upstream
/// spelled them when its cluster preserves case, else as the connection
/// manager's `proper_case_words` says, else lower case.
fn response_writer(ctx: &Ctx) -> header_case::Writer<'_> {
    let cluster = ctx
        .cluster
        .as_ref()
        .map(|c| c.config.header_case)
        .unwrap_or_default();
    match (&ctx.response_spellings, cluster) {
        (Some(s), HeaderCase::Preserve { proper_unknown }) => header_case::Writer {
            spellings: Some(s),
            proper: proper_unknown,
        },
        _ => header_case::Writer {
            spellings: None,
            proper: ctx
                .hcm
                .as_ref()
                .is_some_and(|h| h.header_case == HeaderCase::ProperCase),
        },
    }
}
