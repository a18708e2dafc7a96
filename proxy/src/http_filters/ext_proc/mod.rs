//! `envoy.filters.http.ext_proc`: an external processor, over a gRPC
//! stream per request (`envoy.service.ext_proc.v3.ExternalProcessor/Process`)
//! to a cluster of the cluster manager, sees the request and response
//! headers as `processing_mode` asks, and answers each with header
//! mutations, an immediate response, or a cleared route cache.
//!
//! What Legate has of it: request and response headers (SEND or SKIP),
//! and the request body BUFFERED: the engine holds the whole body (up to
//! pingora's 64 KiB retry buffer, else 413; Envoy's limit is the
//! connection's buffer limit, 1 MiB by default), the processor gets it in
//! one message after the headers and may change the headers, replace or
//! clear the body (the length follows), or answer. Other body modes,
//! trailers (SEND), `mode_override`, `response_attributes`, metadata options,
//! mutation rules, observability mode and an HTTP service are refused by
//! name: the engine's response body hook cannot wait for a processor yet.
//!
//! `request_attributes` are CEL expressions over the request in flight,
//! sent with the request headers message as Envoy sends them; one reading
//! what Legate has no value for then (`xds.*`, `connection.mtls`, ...) is
//! refused naming it.
//!
//! - [`mutation`]: the headers messages and the processor's mutations,
//!   under Envoy's default mutation rules;
//! - [`stream`]: the gRPC stream, opened at the first message.

mod mutation;
mod stream;

use super::{Factory, FilterReply, Flow, HttpFilter, PerRoute, RequestInfo, ResponseInfo, State};
use crate::config::matcher::StringMatcher;
use crate::config::{index, join, ConfigError, Result};
use crate::registry::MessageSupport;
use bytes::Bytes;
use legate_proto::envoy_types::pb::envoy::config::core::v3 as core;
use legate_proto::envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3 as pb;
use legate_proto::envoy_types::pb::envoy::service::ext_proc::v3 as ep;
use legate_proto::envoy_types::pb::google::protobuf::Any;
use pingora_http::ResponseHeader;
use std::sync::Arc;
use std::time::Duration;
use stream::{Conversation, Failure, Reply};

const TYPE: &str = "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor";
const PER_ROUTE_TYPE: &str = "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute";

pub static FACTORY: Factory = Factory {
    type_name: TYPE,
    build,
    per_route: &[(PER_ROUTE_TYPE, per_route)],
};

pub static REGISTRY: &[MessageSupport] = &[
    MessageSupport {
        message: TYPE,
        supported: &[
            "grpc_service",
            "failure_mode_allow",
            "processing_mode",
            "message_timeout",
            "stat_prefix",
            "forward_rules",
            "disable_immediate_response",
            "disable_clear_route_cache",
            "route_cache_action",
            "status_on_error",
            "request_attributes",
        ],
        // Envoy waits this long before closing the stream only in
        // observability mode, which is refused.
        warn: &[(
            "deferred_close_timeout",
            "used only in observability_mode, which Legate refuses",
        )],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.ext_proc.v3.ProcessingMode",
        supported: &[
            "request_header_mode",
            "response_header_mode",
            "request_body_mode",
            "response_body_mode",
            "request_trailer_mode",
            "response_trailer_mode",
        ],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.ext_proc.v3.HeaderForwardingRules",
        supported: &["allowed_headers", "disallowed_headers"],
        warn: &[],
    },
    MessageSupport {
        message: PER_ROUTE_TYPE,
        supported: &["disabled", "overrides"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.ext_proc.v3.ExtProcOverrides",
        supported: &["processing_mode", "grpc_service", "failure_mode_allow"],
        // Envoy 1.40 reads neither from a route's overrides.
        warn: &[
            ("async_mode", "Envoy does not read it from a route"),
            ("request_attributes", "Envoy does not read it from a route"),
            ("response_attributes", "Envoy does not read it from a route"),
        ],
    },
];

/// The processor: its cluster, the channels to its hosts, the call's
/// metadata and retries.
#[derive(Debug)]
pub struct Service {
    cluster: String,
    channels: super::side::Channels,
    metadata: super::side::Metadata,
    retry: Option<super::retry::Retry>,
}

impl Service {
    fn from_proto(g: &core::GrpcService, path: &str) -> Result<Arc<Service>> {
        Ok(Arc::new(Service {
            cluster: crate::config::grpc_service_cluster(g, path)?,
            channels: super::side::Channels::new(&crate::config::grpc_service_authority(g)),
            metadata: super::side::Metadata::from_service(g, path)?,
            retry: g
                .retry_policy
                .as_ref()
                .map(|r| {
                    super::retry::Retry::from_proto(
                        r,
                        &join(path, "retry_policy"),
                        "ext_proc streams",
                    )
                })
                .transpose()?,
        }))
    }
}

/// What goes to the processor (of bodies, only a buffered request body;
/// trailers never).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mode {
    request_headers: bool,
    response_headers: bool,
    request_body_buffered: bool,
}

impl Mode {
    fn from_proto(m: Option<&pb::ProcessingMode>, path: &str) -> Result<Mode> {
        let Some(m) = m else {
            return Ok(Mode {
                request_headers: true,
                response_headers: true,
                request_body_buffered: false,
            });
        };
        use pb::processing_mode::{BodySendMode as B, HeaderSendMode as H};
        if !matches!(B::try_from(m.request_body_mode), Ok(B::None | B::Buffered)) {
            return Err(ConfigError::new(
                join(path, "request_body_mode"),
                "only NONE and BUFFERED are supported",
            ));
        }
        if m.response_body_mode != B::None as i32 {
            return Err(ConfigError::new(
                join(path, "response_body_mode"),
                "only NONE is supported: the engine's response body hook cannot wait for a processor yet",
            ));
        }
        for (field, v) in [
            ("request_trailer_mode", m.request_trailer_mode),
            ("response_trailer_mode", m.response_trailer_mode),
        ] {
            if v == H::Send as i32 {
                return Err(ConfigError::new(
                    join(path, field),
                    "sending trailers to the processor is not supported",
                ));
            }
        }
        // DEFAULT is SEND for headers.
        Ok(Mode {
            request_headers: m.request_header_mode != H::Skip as i32,
            response_headers: m.response_header_mode != H::Skip as i32,
            request_body_buffered: m.request_body_mode == B::Buffered as i32,
        })
    }
}

/// `route_cache_action`, with `disable_clear_route_cache` as RETAIN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RouteCache {
    Default,
    Clear,
    Retain,
}

/// Envoy's counters, all made when the filter is built.
#[derive(Debug)]
pub struct Stats {
    streams_started: metrics::Counter,
    stream_msgs_sent: metrics::Counter,
    stream_msgs_received: metrics::Counter,
    spurious_msgs_received: metrics::Counter,
    streams_closed: metrics::Counter,
    streams_failed: metrics::Counter,
    failure_mode_allowed: metrics::Counter,
    message_timeouts: metrics::Counter,
    rejected_header_mutations: metrics::Counter,
    override_message_timeout_ignored: metrics::Counter,
    clear_route_cache_ignored: metrics::Counter,
    clear_route_cache_disabled: metrics::Counter,
}

impl Stats {
    fn new(prefix: &str) -> Stats {
        let c = |n: &str| crate::stats::counter(format!("{prefix}{n}"));
        for n in [
            "override_message_timeout_received",
            "clear_route_cache_upstream_ignored",
            "http_not_ok_resp_received",
        ] {
            let _ = c(n);
        }
        Stats {
            streams_started: c("streams_started"),
            stream_msgs_sent: c("stream_msgs_sent"),
            stream_msgs_received: c("stream_msgs_received"),
            spurious_msgs_received: c("spurious_msgs_received"),
            streams_closed: c("streams_closed"),
            streams_failed: c("streams_failed"),
            failure_mode_allowed: c("failure_mode_allowed"),
            message_timeouts: c("message_timeouts"),
            rejected_header_mutations: c("rejected_header_mutations"),
            override_message_timeout_ignored: c("override_message_timeout_ignored"),
            clear_route_cache_ignored: c("clear_route_cache_ignored"),
            clear_route_cache_disabled: c("clear_route_cache_disabled"),
        }
    }
}

#[derive(Debug)]
pub struct ExtProc {
    service: Arc<Service>,
    mode: Mode,
    failure_mode_allow: bool,
    status_on_error: u16,
    message_timeout: Duration,
    /// `forward_rules`: headers sent only if allowed and not disallowed.
    allowed: Option<Vec<StringMatcher>>,
    disallowed: Vec<StringMatcher>,
    disable_immediate_response: bool,
    route_cache: RouteCache,
    /// `request_attributes`: each expression, by its text, evaluated for
    /// the request headers message.
    request_attributes: Vec<(String, crate::cel::Expression)>,
    stats: Stats,
}

/// A route's `ExtProcPerRoute`.
#[derive(Debug)]
pub struct RouteConfig {
    disabled: bool,
    mode: Option<Mode>,
    service: Option<Arc<Service>>,
    failure_mode_allow: Option<bool>,
}

fn matchers(
    l: Option<&legate_proto::envoy_types::pb::envoy::r#type::matcher::v3::ListStringMatcher>,
    path: &str,
) -> Result<Option<Vec<StringMatcher>>> {
    l.map(|l| {
        l.patterns
            .iter()
            .enumerate()
            .map(|(i, m)| StringMatcher::from_proto(m, &index(path, "patterns", i)))
            .collect()
    })
    .transpose()
}

fn build(a: &Any, hcm_prefix: &str, path: &str) -> Result<Arc<dyn HttpFilter>> {
    let c: pb::ExternalProcessor = super::decode(a, path)?;
    let g = c
        .grpc_service
        .as_ref()
        .ok_or_else(|| ConfigError::new(join(path, "grpc_service"), "grpc_service is required"))?;
    let rules = c.forward_rules.clone().unwrap_or_default();
    let rp = join(path, "forward_rules");
    use pb::external_processor::RouteCacheAction as A;
    let route_cache = if c.disable_clear_route_cache || c.route_cache_action == A::Retain as i32 {
        RouteCache::Retain
    } else if c.route_cache_action == A::Clear as i32 {
        RouteCache::Clear
    } else {
        RouteCache::Default
    };
    Ok(Arc::new(ExtProc {
        service: Service::from_proto(g, &join(path, "grpc_service"))?,
        mode: Mode::from_proto(c.processing_mode.as_ref(), &join(path, "processing_mode"))?,
        failure_mode_allow: c.failure_mode_allow,
        status_on_error: c
            .status_on_error
            .as_ref()
            .and_then(|s| u16::try_from(s.code).ok())
            .filter(|c| (200..600).contains(c))
            .unwrap_or(500),
        message_timeout: c
            .message_timeout
            .as_ref()
            .map(|t| crate::config::duration(t, &join(path, "message_timeout")))
            .transpose()?
            .unwrap_or(Duration::from_millis(200)),
        allowed: matchers(
            rules.allowed_headers.as_ref(),
            &join(&rp, "allowed_headers"),
        )?,
        disallowed: matchers(
            rules.disallowed_headers.as_ref(),
            &join(&rp, "disallowed_headers"),
        )?
        .unwrap_or_default(),
        disable_immediate_response: c.disable_immediate_response,
        route_cache,
        request_attributes: attributes(&c.request_attributes, path)?,
        stats: Stats::new(&format!("http.{hcm_prefix}.ext_proc.{}", c.stat_prefix)),
    }))
}

/// `request_attributes`: CEL expressions over the request in flight, as
/// Envoy parses each; one Legate has no value for then is refused.
fn attributes(list: &[String], path: &str) -> Result<Vec<(String, crate::cel::Expression)>> {
    let mut out: Vec<(String, crate::cel::Expression)> = Vec::new();
    for (i, s) in list.iter().enumerate() {
        if out.iter().any(|(k, _)| k == s) {
            continue;
        }
        let e = crate::cel::Expression::parse_at_request(s, &index(path, "request_attributes", i))?;
        out.push((s.clone(), e));
    }
    Ok(out)
}

/// The attributes as Envoy sends them: bools and numbers as such, any other
/// value printed; one whose evaluation fails is left out.
fn attribute_struct(
    list: &[(String, crate::cel::Expression)],
    d: &crate::config::unified_matcher::Data<'_>,
) -> legate_proto::envoy_types::pb::google::protobuf::Struct {
    use cel::objects::Value as V;
    use legate_proto::envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
    let fields = list
        .iter()
        .filter_map(|(name, e)| {
            let kind = match e.evaluate_at_request(d)? {
                V::Bool(b) => Kind::BoolValue(b),
                V::Int(i) => Kind::NumberValue(i as f64),
                V::UInt(u) => Kind::NumberValue(u as f64),
                other => Kind::StringValue(crate::cel::text(&other)),
            };
            Some((name.clone(), Value { kind: Some(kind) }))
        })
        .collect();
    Struct { fields }
}

fn per_route(a: &Any, path: &str) -> Result<PerRoute> {
    let c: pb::ExtProcPerRoute = super::decode(a, path)?;
    use pb::ext_proc_per_route::Override as O;
    Ok(Arc::new(match &c.r#override {
        Some(O::Disabled(d)) => RouteConfig {
            disabled: *d,
            mode: None,
            service: None,
            failure_mode_allow: None,
        },
        Some(O::Overrides(o)) => {
            let op = join(path, "overrides");
            RouteConfig {
                disabled: false,
                mode: o
                    .processing_mode
                    .as_ref()
                    .map(|m| Mode::from_proto(Some(m), &join(&op, "processing_mode")))
                    .transpose()?,
                service: o
                    .grpc_service
                    .as_ref()
                    .map(|g| Service::from_proto(g, &join(&op, "grpc_service")))
                    .transpose()?,
                failure_mode_allow: o.failure_mode_allow.as_ref().map(|b| b.value),
            }
        }
        None => RouteConfig {
            disabled: false,
            mode: None,
            service: None,
            failure_mode_allow: None,
        },
    }))
}

/// The filter's settings for one request, its route's configs merged in.
struct Settings {
    mode: Mode,
    service: Arc<Service>,
    failure_mode_allow: bool,
}

/// Kept from the request headers for the response headers.
struct Pending {
    /// The conversation, for the response headers.
    talk: std::sync::Mutex<Option<Talk>>,
    /// The processor's body for the upstream, sent in place of the
    /// buffered one: at the final chunk of every attempt (a retry replays
    /// the buffered body), the other chunks emptied.
    body: Option<Bytes>,
}

/// The conversation and what it runs with.
struct Talk {
    conv: Conversation,
    service: Arc<Service>,
    failure_mode_allow: bool,
}

/// The most request body the engine holds for the processor: pingora's
/// retry buffer, which forwards it.
const BODY_LIMIT: usize = 65536;

/// Spaces as `_`, as Envoy writes details.
fn details(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join("_")
}

impl ExtProc {
    /// The route's configs merged from the least specific level, as
    /// Envoy's: a level's `disabled` turns the filter off, a later
    /// level's overrides turn it on again.
    fn settings(&self, per_route: &[Option<&PerRoute>; 4]) -> Option<Settings> {
        let mut s = Settings {
            mode: self.mode,
            service: self.service.clone(),
            failure_mode_allow: self.failure_mode_allow,
        };
        let mut disabled = false;
        let levels: Vec<&RouteConfig> = per_route
            .iter()
            .flatten()
            .filter_map(|c| c.downcast_ref::<RouteConfig>())
            .collect();
        for l in levels.iter().rev() {
            if l.disabled {
                disabled = true;
                continue;
            }
            disabled = false;
            if let Some(m) = l.mode {
                s.mode = m;
            }
            if let Some(svc) = &l.service {
                s.service = svc.clone();
            }
            if let Some(f) = l.failure_mode_allow {
                s.failure_mode_allow = f;
            }
        }
        (!disabled).then_some(s)
    }

    fn keep(&self, name: &str) -> bool {
        self.allowed
            .as_ref()
            .is_none_or(|a| a.iter().any(|m| m.matches(name)))
            && !self.disallowed.iter().any(|m| m.matches(name))
    }

    fn message(&self, request: ep::processing_request::Request) -> ep::ProcessingRequest {
        ep::ProcessingRequest {
            request: Some(request),
            metadata_context: Some(Default::default()),
            ..Default::default()
        }
    }

    /// The reply for a failed stream, or None when `failure_mode_allow`
    /// lets the request go on.
    fn failed(&self, f: Failure, allow: bool) -> Option<FilterReply> {
        let (status, why) = match &f {
            Failure::Timeout => {
                self.stats.message_timeouts.increment(1);
                self.stats.streams_closed.increment(1);
                (
                    504,
                    "ext_proc_error_per-message_timeout_exceeded".to_string(),
                )
            }
            Failure::Grpc(s) => {
                self.stats.streams_failed.increment(1);
                if allow {
                    self.stats.streams_closed.increment(1);
                }
                (self.status_on_error, grpc_error_details(s))
            }
            Failure::NoHost => {
                self.stats.streams_failed.increment(1);
                (
                    self.status_on_error,
                    "ext_proc_error_gRPC_error_14{no_healthy_upstream}".to_string(),
                )
            }
        };
        if allow {
            self.stats.failure_mode_allowed.increment(1);
            return None;
        }
        Some(error_reply(status, why))
    }

    /// A message the filter did not ask for (or an immediate response it
    /// was told to refuse): a failure, or ignored with failure_mode_allow.
    fn spurious(&self, allow: bool, why: &str) -> Option<FilterReply> {
        self.stats.spurious_msgs_received.increment(1);
        if allow {
            self.stats.failure_mode_allowed.increment(1);
            return None;
        }
        Some(error_reply(self.status_on_error, why.to_string()))
    }

    /// A value no header may carry is a rejected mutation too.
    fn count_invalid(&self, e: &mutation::MutationError) {
        if *e == mutation::MutationError::InvalidSet {
            self.stats.rejected_header_mutations.increment(1);
        }
    }

    /// The processor's immediate response, as a reply.
    fn immediate(&self, ir: &ep::ImmediateResponse) -> FilterReply {
        let status = ir
            .status
            .as_ref()
            .and_then(|s| u16::try_from(s.code).ok())
            .filter(|c| (200..1000).contains(c))
            .unwrap_or(200);
        let mut rejected = 0;
        let headers = mutation::reply_headers(ir.headers.as_ref(), &mut rejected);
        self.stats.rejected_header_mutations.increment(rejected);
        self.stats.streams_closed.increment(1);
        FilterReply {
            status,
            body: ir.body.clone().into(),
            headers,
            details: details(&ir.details).into(),
            flag: None,
            grpc_status: ir.grpc_status.as_ref().map(|g| g.status),
        }
    }

    /// Whether the answer's `clear_route_cache` clears it, counting the
    /// cases Envoy counts.
    fn clears_route(&self, common: &ep::CommonResponse) -> bool {
        if common.header_mutation.is_none() {
            if common.clear_route_cache {
                self.stats.clear_route_cache_ignored.increment(1);
            }
            return false;
        }
        match self.route_cache {
            RouteCache::Clear => true,
            RouteCache::Default => common.clear_route_cache,
            RouteCache::Retain => {
                if common.clear_route_cache {
                    self.stats.clear_route_cache_disabled.increment(1);
                }
                false
            }
        }
    }

    /// Sends the request headers and applies the answer; Err: the reply
    /// that ends the request. Ok(false): processing is over.
    async fn request_headers(
        &self,
        rq: &mut RequestInfo<'_>,
        talk: &mut Talk,
    ) -> std::result::Result<bool, FilterReply> {
        let headers =
            mutation::request_headers(rq.req, rq.authority(), rq.scheme, &|k| self.keep(k));
        let mut msg = self.message(ep::processing_request::Request::RequestHeaders(
            ep::HttpHeaders {
                headers: Some(headers),
                end_of_stream: rq.end_of_stream,
                ..Default::default()
            },
        ));
        if !self.request_attributes.is_empty() {
            let attrs = attribute_struct(&self.request_attributes, &rq.match_data());
            msg.attributes
                .insert("envoy.filters.http.ext_proc".into(), attrs);
        }
        let allow = talk.failure_mode_allow;
        let reply = talk
            .conv
            .exchange(
                msg,
                &talk.service,
                &self.stats,
                rq.clusters,
                self.message_timeout,
            )
            .await;
        use ep::processing_response::Response as R;
        let m = match reply {
            Reply::Message(m) => m,
            Reply::Closed => {
                self.stats.streams_closed.increment(1);
                return Ok(false);
            }
            Reply::Failed(f) => return self.failed(f, allow).map_or(Ok(false), Err),
        };
        match &m.response {
            Some(R::RequestHeaders(h)) => {
                let common = h.response.clone().unwrap_or_default();
                if let Some(mu) = &common.header_mutation {
                    match mutation::apply_to_request(rq.req, mu) {
                        Ok(n) => self.stats.rejected_header_mutations.increment(n),
                        Err(e) => {
                            self.count_invalid(&e);
                            talk.conv.close();
                            self.stats.streams_closed.increment(1);
                            return Err(error_reply(self.status_on_error, details(&e.to_string())));
                        }
                    }
                }
                rq.clear_route_cache |= self.clears_route(&common);
                Ok(true)
            }
            Some(R::ImmediateResponse(ir)) if !self.disable_immediate_response => {
                talk.conv.close();
                Err(self.immediate(ir))
            }
            Some(R::ImmediateResponse(_)) => {
                talk.conv.close();
                self.spurious(
                    allow,
                    "unhandled_immediate_response_due_to_config_disabled_it",
                )
                .map_or(Ok(false), Err)
            }
            _ => {
                talk.conv.close();
                self.spurious(allow, "spurious_message")
                    .map_or(Ok(false), Err)
            }
        }
    }

    /// Sends the buffered request body and applies the answer: Ok(Some):
    /// go on (with the body that replaces the request's, if any);
    /// Ok(None): processing is over; Err: the reply that ends the request.
    /// `headers_held`: the request headers waited for the processor (they
    /// were sent to it), so its answer may still change them.
    async fn request_body(
        &self,
        rq: &mut RequestInfo<'_>,
        talk: &mut Talk,
        headers_held: bool,
    ) -> std::result::Result<Option<Option<Bytes>>, FilterReply> {
        let body = rq.body.cloned().unwrap_or_default();
        let msg = self.message(ep::processing_request::Request::RequestBody(ep::HttpBody {
            body: body.to_vec(),
            end_of_stream: true,
            ..Default::default()
        }));
        let allow = talk.failure_mode_allow;
        let reply = talk
            .conv
            .exchange(
                msg,
                &talk.service,
                &self.stats,
                rq.clusters,
                self.message_timeout,
            )
            .await;
        use ep::processing_response::Response as R;
        let m = match reply {
            Reply::Message(m) => m,
            Reply::Closed => {
                self.stats.streams_closed.increment(1);
                return Ok(None);
            }
            Reply::Failed(f) => return self.failed(f, allow).map_or(Ok(None), Err),
        };
        match &m.response {
            Some(R::RequestBody(b)) => {
                let common = b.response.clone().unwrap_or_default();
                // Headers that went on without the processor (SKIP) are
                // upstream already: its header changes no longer apply.
                let mutation = common.header_mutation.as_ref().filter(|_| headers_held);
                if let Some(mu) = mutation {
                    match mutation::apply_to_request(rq.req, mu) {
                        Ok(n) => self.stats.rejected_header_mutations.increment(n),
                        Err(e) => {
                            self.count_invalid(&e);
                            talk.conv.close();
                            self.stats.streams_closed.increment(1);
                            return Err(error_reply(self.status_on_error, details(&e.to_string())));
                        }
                    }
                }
                rq.clear_route_cache |= self.clears_route(&common);
                use ep::body_mutation::Mutation as M;
                let new = match common.body_mutation.and_then(|b| b.mutation) {
                    Some(M::Body(b)) => Some(Bytes::from(b)),
                    Some(M::ClearBody(true)) => Some(Bytes::new()),
                    _ => None,
                };
                // A stated length must be the new body's (the processor
                // may set it), as Envoy checks.
                let stated = rq
                    .req
                    .headers
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
                if let (Some(n), Some(stated)) = (&new, stated) {
                    if n.len() != stated {
                        talk.conv.close();
                        self.stats.streams_closed.increment(1);
                        return Err(error_reply(
                            self.status_on_error,
                            "mismatch_between_content_length_and_the_length_of_the_mutated_body"
                                .to_string(),
                        ));
                    }
                }
                Ok(Some(new))
            }
            Some(R::ImmediateResponse(ir)) if !self.disable_immediate_response => {
                talk.conv.close();
                Err(self.immediate(ir))
            }
            Some(R::ImmediateResponse(_)) => {
                talk.conv.close();
                self.spurious(
                    allow,
                    "unhandled_immediate_response_due_to_config_disabled_it",
                )
                .map_or(Ok(None), Err)
            }
            _ => {
                talk.conv.close();
                self.spurious(allow, "spurious_message")
                    .map_or(Ok(None), Err)
            }
        }
    }

    /// Sends the response headers and applies the answer; Some: the reply
    /// sent instead of the response.
    async fn response_headers(
        &self,
        resp: &mut ResponseHeader,
        info: &ResponseInfo<'_>,
        talk: &mut Talk,
    ) -> Option<FilterReply> {
        let headers = mutation::response_headers(resp, &|k| self.keep(k));
        let status = resp.status.as_u16();
        let no_body = info.req.method == http::Method::HEAD
            || status == 204
            || status == 304
            || resp
                .headers
                .get(http::header::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() == b"0");
        let msg = self.message(ep::processing_request::Request::ResponseHeaders(
            ep::HttpHeaders {
                headers: Some(headers),
                end_of_stream: no_body,
                ..Default::default()
            },
        ));
        let allow = talk.failure_mode_allow;
        let reply = talk
            .conv
            .exchange(
                msg,
                &talk.service,
                &self.stats,
                info.clusters,
                self.message_timeout,
            )
            .await;
        use ep::processing_response::Response as R;
        let m = match reply {
            Reply::Message(m) => m,
            Reply::Closed => {
                self.stats.streams_closed.increment(1);
                return None;
            }
            Reply::Failed(f) => return self.failed(f, allow),
        };
        talk.conv.close();
        match &m.response {
            Some(R::ResponseHeaders(h)) => {
                self.stats.streams_closed.increment(1);
                let common = h.response.clone().unwrap_or_default();
                let mu = common.header_mutation.as_ref()?;
                match mutation::apply_to_response(resp, mu) {
                    Ok(n) => {
                        self.stats.rejected_header_mutations.increment(n);
                        None
                    }
                    Err(e) => {
                        self.count_invalid(&e);
                        Some(error_reply(self.status_on_error, details(&e.to_string())))
                    }
                }
            }
            Some(R::ImmediateResponse(ir)) if !self.disable_immediate_response => {
                Some(self.immediate(ir))
            }
            Some(R::ImmediateResponse(_)) => self.spurious(
                allow,
                "unhandled_immediate_response_due_to_config_disabled_it",
            ),
            _ => self.spurious(allow, "spurious_message"),
        }
    }
}

/// Envoy's details for a stream that failed with `s`: the code, and the
/// message as its gRPC client holds it, which for a status the processor
/// sent is the `grpc-message` header as it came (percent-encoded) followed
/// by the stream's own details (`{via_upstream}`). tonic hands over the
/// message decoded, so it is encoded again as tonic's servers encode it.
fn grpc_error_details(s: &tonic::Status) -> String {
    let from_server = std::error::Error::source(s).is_none();
    let message = if from_server {
        format!("{}{{via_upstream}}", grpc_message_encode(s.message()))
    } else {
        s.message().to_string()
    };
    format!(
        "ext_proc_error_gRPC_error_{}{{{}}}",
        s.code() as i32,
        details(&message)
    )
}

/// The `grpc-message` encoding of tonic's servers: controls, space, `%`
/// and ``"#<>`?{}`` percent-encoded.
fn grpc_message_encode(m: &str) -> String {
    let mut out = String::with_capacity(m.len());
    for b in m.bytes() {
        if b <= b' ' || b >= 0x7f || b"%\"#<>`?{}".contains(&b) {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(b as char);
        }
    }
    out
}

fn error_reply(status: u16, why: String) -> FilterReply {
    FilterReply {
        status,
        body: Default::default(),
        headers: Vec::new(),
        details: why.into(),
        flag: None,
        grpc_status: None,
    }
}

#[async_trait::async_trait]
impl HttpFilter for ExtProc {
    fn request_body_limit(&self, per_route: &[Option<&PerRoute>; 4]) -> Option<usize> {
        self.settings(per_route)
            .filter(|s| s.mode.request_body_buffered)
            .map(|_| BODY_LIMIT)
    }

    async fn on_request(&self, rq: &mut RequestInfo<'_>, state: &mut Option<State>) -> Flow {
        let Some(s) = self.settings(&rq.per_route) else {
            return Flow::Continue;
        };
        let with_body = s.mode.request_body_buffered && !rq.end_of_stream && rq.body.is_some();
        if !s.mode.request_headers && !s.mode.response_headers && !with_body {
            return Flow::Continue;
        }
        use pb::processing_mode::BodySendMode as B;
        let mut talk = Talk {
            conv: Conversation::new(if s.mode.request_body_buffered {
                B::Buffered as i32
            } else {
                B::None as i32
            }),
            service: s.service,
            failure_mode_allow: s.failure_mode_allow,
        };
        if s.mode.request_headers {
            match self.request_headers(rq, &mut talk).await {
                Ok(true) => {}
                Ok(false) => return Flow::Continue,
                Err(r) => return Flow::Reply(r),
            }
        }
        let mut body = None;
        if with_body {
            if !s.mode.request_headers {
                // The headers go on before the body is processed, so the
                // length cannot be promised (Envoy sends the body chunked).
                rq.req.remove_header(&http::header::CONTENT_LENGTH);
            }
            match self
                .request_body(rq, &mut talk, s.mode.request_headers)
                .await
            {
                Ok(Some(b)) => body = b,
                Ok(None) => return Flow::Continue,
                Err(r) => return Flow::Reply(r),
            }
        }
        if !s.mode.response_headers && talk.conv.is_open() {
            talk.conv.close();
            self.stats.streams_closed.increment(1);
        }
        if s.mode.response_headers || body.is_some() {
            *state = Some(Box::new(Pending {
                talk: std::sync::Mutex::new(s.mode.response_headers.then_some(talk)),
                body,
            }));
        }
        Flow::Continue
    }

    fn reads_bodies(&self) -> bool {
        true
    }

    fn on_request_body(
        &self,
        body: &mut Option<Bytes>,
        end: bool,
        state: &mut Option<State>,
    ) -> std::result::Result<(), FilterReply> {
        let Some(p) = state.as_ref().and_then(|s| s.downcast_ref::<Pending>()) else {
            return Ok(());
        };
        if let Some(b) = &p.body {
            // Empty, not missing: pingora takes a missing chunk as the end.
            *body = Some(if end { b.clone() } else { Bytes::new() });
        }
        Ok(())
    }

    fn waits_on_response(&self) -> bool {
        true
    }

    async fn on_response_wait(
        &self,
        resp: &mut ResponseHeader,
        info: &ResponseInfo<'_>,
        state: &mut Option<State>,
    ) -> Option<FilterReply> {
        let pending = state.as_mut()?.downcast_mut::<Pending>()?;
        let mut talk = pending
            .talk
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()?;
        // Local replies are processed too (direct responses, the router's
        // errors, a later filter's denial), as Envoy's; the filter's own
        // replies keep no state and are not.
        self.response_headers(resp, info, &mut talk).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn any(c: &pb::ExternalProcessor) -> Any {
        Any {
            type_url: format!("type.googleapis.com/{TYPE}"),
            value: c.encode_to_vec(),
        }
    }

    fn config(mode: Option<pb::ProcessingMode>) -> pb::ExternalProcessor {
        pb::ExternalProcessor {
            grpc_service: Some(core::GrpcService {
                target_specifier: Some(core::grpc_service::TargetSpecifier::EnvoyGrpc(
                    core::grpc_service::EnvoyGrpc {
                        cluster_name: "proc".into(),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }),
            processing_mode: mode,
            ..Default::default()
        }
    }

    #[test]
    fn body_and_trailer_modes_are_refused_by_name() {
        use pb::processing_mode::{BodySendMode as B, HeaderSendMode as H};
        let body = pb::ProcessingMode {
            response_body_mode: B::Streamed as i32,
            ..Default::default()
        };
        let e = build(&any(&config(Some(body))), "p", "f").unwrap_err();
        assert!(
            e.to_string()
                .contains("f.processing_mode.response_body_mode"),
            "{e}"
        );
        let trailers = pb::ProcessingMode {
            request_trailer_mode: H::Send as i32,
            ..Default::default()
        };
        let e = build(&any(&config(Some(trailers))), "p", "f").unwrap_err();
        assert!(e.to_string().contains("request_trailer_mode"), "{e}");
        let skip = pb::ProcessingMode {
            request_header_mode: H::Skip as i32,
            response_header_mode: H::Skip as i32,
            request_trailer_mode: H::Skip as i32,
            ..Default::default()
        };
        assert!(build(&any(&config(Some(skip))), "p", "f").is_ok());
        assert!(build(&any(&config(None)), "p", "f").is_ok());
    }

    #[test]
    fn the_request_body_may_be_buffered_only() {
        use pb::processing_mode::BodySendMode as B;
        let mode = |b: B| pb::ProcessingMode {
            request_body_mode: b as i32,
            ..Default::default()
        };
        let m = Mode::from_proto(Some(&mode(B::Buffered)), "m").unwrap();
        assert!(m.request_body_buffered);
        let e = Mode::from_proto(Some(&mode(B::Streamed)), "m").unwrap_err();
        assert!(e.to_string().contains("m.request_body_mode"), "{e}");
    }

    #[test]
    fn headers_default_to_send() {
        let m = Mode::from_proto(Some(&pb::ProcessingMode::default()), "m").unwrap();
        assert!(m.request_headers && m.response_headers);
    }

    #[test]
    fn grpc_errors_read_as_envoys_details() {
        let s = tonic::Status::internal("processor failed");
        assert_eq!(
            grpc_error_details(&s),
            "ext_proc_error_gRPC_error_13{processor%20failed{via_upstream}}"
        );
    }
}
