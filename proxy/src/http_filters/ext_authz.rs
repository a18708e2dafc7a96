//! `envoy.filters.http.ext_authz`: asks an external authorization service,
//! over gRPC (`envoy.service.auth.v3.Authorization/Check`) or plain HTTP,
//! whether the request may go on, through a cluster of the cluster
//! manager. OK: the service's headers are applied to the upstream request
//! and the response; denied: its status, body and headers answer the client
//! (`UAEX`); no answer in time, or an error: the request goes on with
//! `failure_mode_allow`, else `status_on_error` (403 by default).
//!
//! `with_request_body`: the engine buffers the request body (up to
//! `max_request_bytes`, else 413 before any check) and the check carries
//! it (`body`, or `raw_body` with `pack_as_bytes`; the HTTP service gets it
//! as its body) with `x-envoy-auth-partial-body: false`; the upstream gets
//! the whole body. `allow_partial_message` is refused: the engine forwards
//! a buffered body only while it fits pingora's 64 KiB retry buffer.

use super::{
    Factory, FilterReply, Flow, Fraction, HttpFilter, PerRoute, RequestInfo, ResponseInfo, State,
};
use crate::config::matcher::StringMatcher;
use crate::config::{index, join, ConfigError, Result, Wrapped};
use crate::registry::MessageSupport;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use legate_proto::envoy_types::pb::envoy::config::core::v3 as core;
use legate_proto::envoy_types::pb::envoy::extensions::filters::http::ext_authz::v3 as pb;
use legate_proto::envoy_types::pb::envoy::service::auth::v3 as auth;
use legate_proto::envoy_types::pb::google::protobuf::Any;
use pingora_http::ResponseHeader;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

const TYPE: &str = "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz";
const PER_ROUTE_TYPE: &str = "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute";

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
            "http_service",
            "transport_api_version",
            "failure_mode_allow",
            "failure_mode_allow_header_add",
            "status_on_error",
            "filter_enabled",
            "stat_prefix",
            "allowed_headers",
            "disallowed_headers",
            "charge_cluster_response_stats",
            "route_metadata_context_namespaces",
            "route_typed_metadata_context_namespaces",
            "clear_route_cache",
            "with_request_body",
        ],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.ext_authz.v3.BufferSettings",
        supported: &[
            "max_request_bytes",
            "allow_partial_message",
            "pack_as_bytes",
        ],
        warn: &[],
    },
    MessageSupport {
        message: PER_ROUTE_TYPE,
        supported: &["disabled", "check_settings"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.ext_authz.v3.CheckSettings",
        supported: &[
            "context_extensions",
            "disable_request_body_buffering",
            "with_request_body",
        ],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.ext_authz.v3.HttpService",
        supported: &[
            "server_uri",
            "path_prefix",
            "path_override",
            "authorization_request",
            "authorization_response",
            "retry_policy",
        ],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.ext_authz.v3.AuthorizationRequest",
        supported: &["allowed_headers", "headers_to_add"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.ext_authz.v3.AuthorizationResponse",
        supported: &[
            "allowed_upstream_headers",
            "allowed_upstream_headers_to_append",
            "allowed_client_headers",
            "allowed_client_headers_on_success",
        ],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.type.matcher.v3.ListStringMatcher",
        supported: &["patterns"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.core.v3.HttpUri",
        supported: &["uri", "cluster", "timeout"],
        warn: &[],
    },
];

#[derive(Debug)]
enum Service {
    Grpc {
        cluster: String,
        timeout: Duration,
        /// Which request headers go in the check (None: all).
        allowed: Option<Vec<StringMatcher>>,
        disallowed: Vec<StringMatcher>,
        /// `grpc_service.retry_policy`.
        retry: Option<super::retry::Retry>,
        /// `grpc_service.initial_metadata`, on every call.
        metadata: super::side::Metadata,
    },
    Http(HttpService),
}

#[derive(Debug)]
struct HttpService {
    cluster: String,
    /// The `server_uri`'s authority, sent as Host.
    authority: String,
    timeout: Duration,
    path_prefix: String,
    /// `path_override`: the check's path instead of the request's.
    path_override: Option<String>,
    /// `retry_policy`: the check is tried again on a server failure.
    retry: Option<super::retry::Retry>,
    /// Request headers sent beside the defaults.
    allowed: Vec<StringMatcher>,
    headers_to_add: Vec<(HeaderName, HeaderValue)>,
    upstream: Vec<StringMatcher>,
    upstream_append: Vec<StringMatcher>,
    /// Sent to the client on denial (empty: all but a few).
    client: Vec<StringMatcher>,
    client_on_success: Vec<StringMatcher>,
}

#[derive(Debug)]
pub struct ExtAuthz {
    service: Service,
    failure_mode_allow: bool,
    failure_mode_header: bool,
    /// `with_request_body.max_request_bytes`: the body goes in the check.
    body_limit: Option<usize>,
    /// `with_request_body.pack_as_bytes` (always, for the HTTP service).
    pack_as_bytes: bool,
    status_on_error: u16,
    enabled: Option<Fraction>,
    charge_cluster: bool,
    /// The route metadata namespaces sent in the check (untyped, typed).
    route_namespaces: (Vec<String>, Vec<String>),
    /// Select the route again after an allowed check changed the
    /// request's headers.
    clear_route_cache: bool,
    /// `http.<hcm prefix>.ext_authz.[<stat_prefix>.]*`
    stats: crate::stats::NamedCounters,
    /// Live state: one channel or client per service host.
    grpc: super::side::Channels,
    http: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<Bytes>,
    >,
}

/// A route's `ExtAuthzPerRoute`.
#[derive(Debug)]
pub struct RouteConfig {
    disabled: bool,
    context_extensions: HashMap<String, String>,
    /// `check_settings`: Some(None) disables body buffering, Some(Some(n))
    /// sets the route's own limit.
    body_limit: Option<Option<usize>>,
}

/// The `with_request_body` limit at `path`: at most pingora's retry
/// buffer, whole messages only.
fn body_limit(b: &pb::BufferSettings, path: &str) -> Result<usize> {
    if b.allow_partial_message {
        refuse(
            path,
            "allow_partial_message",
            "partial bodies are not supported (a buffered body is forwarded from pingora's 64 KiB retry buffer)",
        )?;
    }
    if b.max_request_bytes == 0 || b.max_request_bytes > 65536 {
        refuse(
            path,
            "max_request_bytes",
            "must be from 1 to 65536 (pingora's retry buffer holds the body it forwards)",
        )?;
    }
    Ok(b.max_request_bytes as usize)
}

fn matchers(
    l: Option<&legate_proto::envoy_types::pb::envoy::r#type::matcher::v3::ListStringMatcher>,
    path: &str,
) -> Result<Vec<StringMatcher>> {
    let Some(l) = l else { return Ok(Vec::new()) };
    l.patterns
        .iter()
        .enumerate()
        .map(|(i, m)| StringMatcher::from_proto(m, &index(path, "patterns", i)))
        .collect()
}

fn refuse(path: &str, field: &str, why: &str) -> Result<()> {
    Err(ConfigError::new(join(path, field), why))
}

fn build(a: &Any, hcm_prefix: &str, path: &str) -> Result<Arc<dyn HttpFilter>> {
    let c: pb::ExtAuthz = super::decode(a, path)?;
    if c.transport_api_version != core::ApiVersion::V3 as i32 {
        refuse(path, "transport_api_version", "only V3 is supported")?;
    }
    let limit = c
        .with_request_body
        .as_ref()
        .map(|b| body_limit(b, &join(path, "with_request_body")))
        .transpose()?;
    use pb::ext_authz::Services as S;
    let service = match &c.services {
        Some(S::GrpcService(g)) => {
            let gp = join(path, "grpc_service");
            Service::Grpc {
                cluster: crate::config::grpc_service_cluster(g, &gp)?,
                metadata: super::side::Metadata::from_service(g, &gp)?,
                timeout: g
                    .timeout
                    .as_ref()
                    .map(|t| crate::config::duration(t, &join(&gp, "timeout")))
                    .transpose()?
                    .unwrap_or(Duration::from_millis(200)),
                allowed: c
                    .allowed_headers
                    .as_ref()
                    .map(|l| matchers(Some(l), &join(path, "allowed_headers")))
                    .transpose()?,
                disallowed: matchers(
                    c.disallowed_headers.as_ref(),
                    &join(path, "disallowed_headers"),
                )?,
                retry: g
                    .retry_policy
                    .as_ref()
                    .map(|r| {
                        super::retry::Retry::from_proto(
                            r,
                            &join(&gp, "retry_policy"),
                            "ext_authz checks",
                        )
                    })
                    .transpose()?,
            }
        }
        Some(S::HttpService(h)) => Service::Http(http_service(h, &join(path, "http_service"))?),
        None => {
            return Err(ConfigError::new(
                path,
                "grpc_service or http_service is required",
            ))
        }
    };
    let stat = if c.stat_prefix.is_empty() {
        String::new()
    } else {
        format!("{}.", c.stat_prefix)
    };
    Ok(Arc::new(ExtAuthz {
        body_limit: limit,
        pack_as_bytes: c
            .with_request_body
            .as_ref()
            .is_some_and(|b| b.pack_as_bytes)
            || matches!(service, Service::Http(_)),
        clear_route_cache: c.clear_route_cache,
        route_namespaces: (
            c.route_metadata_context_namespaces.clone(),
            c.route_typed_metadata_context_namespaces.clone(),
        ),
        service,
        failure_mode_allow: c.failure_mode_allow,
        failure_mode_header: c.failure_mode_allow_header_add,
        status_on_error: c
            .status_on_error
            .as_ref()
            .and_then(|s| u16::try_from(s.code).ok())
            .filter(|c| (200..600).contains(c))
            .unwrap_or(403),
        enabled: c
            .filter_enabled
            .as_ref()
            .map(|f| Fraction::from_proto(Some(f), Fraction::ALWAYS)),
        charge_cluster: c.charge_cluster_response_stats.val().unwrap_or(true),
        stats: crate::stats::NamedCounters::new(format!("http.{hcm_prefix}.ext_authz.{stat}")),
        grpc: super::side::Channels::new(&match &c.services {
            Some(S::GrpcService(g)) => crate::config::grpc_service_authority(g),
            _ => String::new(),
        }),
        http: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http(),
    }))
}

fn http_service(h: &pb::HttpService, path: &str) -> Result<HttpService> {
    if !h.path_prefix.is_empty() && !h.path_override.is_empty() {
        return Err(ConfigError::new(
            join(path, "path_override"),
            "only one of path_prefix and path_override may be set",
        ));
    }
    let up = join(path, "server_uri");
    let uri = h
        .server_uri
        .as_ref()
        .ok_or_else(|| ConfigError::new(&up, "server_uri is required"))?;
    let authority = uri
        .uri
        .parse::<http::Uri>()
        .ok()
        .and_then(|u| u.authority().map(|a| a.as_str().to_string()))
        .ok_or_else(|| ConfigError::new(join(&up, "uri"), "not a URI with an authority"))?;
    use core::http_uri::HttpUpstreamType as U;
    let cluster = match &uri.http_upstream_type {
        Some(U::Cluster(c)) if !c.is_empty() => c.clone(),
        _ => {
            return Err(ConfigError::new(
                join(&up, "cluster"),
                "cluster is required",
            ))
        }
    };
    let timeout = uri
        .timeout
        .as_ref()
        .map(|t| crate::config::duration(t, &join(&up, "timeout")))
        .transpose()?
        .unwrap_or(Duration::from_millis(200));
    let rq = h.authorization_request.clone().unwrap_or_default();
    let rp = h.authorization_response.clone().unwrap_or_default();
    let rqp = join(path, "authorization_request");
    let rpp = join(path, "authorization_response");
    let headers_to_add = rq
        .headers_to_add
        .iter()
        .enumerate()
        .map(|(i, hv)| {
            let p = index(&rqp, "headers_to_add", i);
            Ok((
                crate::headers::header_name(&hv.key, &join(&p, "key"))?,
                HeaderValue::from_str(&hv.value)
                    .map_err(|_| ConfigError::new(join(&p, "value"), "not a valid header value"))?,
            ))
        })
        .collect::<Result<_>>()?;
    Ok(HttpService {
        cluster,
        authority,
        timeout,
        path_prefix: h.path_prefix.clone(),
        path_override: (!h.path_override.is_empty()).then(|| h.path_override.clone()),
        retry: h
            .retry_policy
            .as_ref()
            .map(|r| {
                super::retry::Retry::from_proto(r, &join(path, "retry_policy"), "ext_authz checks")
            })
            .transpose()?,
        allowed: matchers(rq.allowed_headers.as_ref(), &join(&rqp, "allowed_headers"))?,
        headers_to_add,
        upstream: matchers(
            rp.allowed_upstream_headers.as_ref(),
            &join(&rpp, "allowed_upstream_headers"),
        )?,
        upstream_append: matchers(
            rp.allowed_upstream_headers_to_append.as_ref(),
            &join(&rpp, "allowed_upstream_headers_to_append"),
        )?,
        client: matchers(
            rp.allowed_client_headers.as_ref(),
            &join(&rpp, "allowed_client_headers"),
        )?,
        client_on_success: matchers(
            rp.allowed_client_headers_on_success.as_ref(),
            &join(&rpp, "allowed_client_headers_on_success"),
        )?,
    })
}

fn per_route(a: &Any, path: &str) -> Result<PerRoute> {
    let c: pb::ExtAuthzPerRoute = super::decode(a, path)?;
    use pb::ext_authz_per_route::Override as O;
    Ok(Arc::new(match &c.r#override {
        Some(O::Disabled(d)) => RouteConfig {
            disabled: *d,
            context_extensions: HashMap::new(),
            body_limit: None,
        },
        Some(O::CheckSettings(s)) => {
            let cp = join(path, "check_settings");
            if s.with_request_body.is_some() && s.disable_request_body_buffering {
                refuse(
                    &cp,
                    "with_request_body",
                    "only one of disable_request_body_buffering or with_request_body can be set",
                )?;
            }
            RouteConfig {
                disabled: false,
                context_extensions: s.context_extensions.clone(),
                body_limit: match &s.with_request_body {
                    Some(b) => Some(Some(body_limit(b, &join(&cp, "with_request_body"))?)),
                    None if s.disable_request_body_buffering => Some(None),
                    None => None,
                },
            }
        }
        None => RouteConfig {
            disabled: false,
            context_extensions: HashMap::new(),
            body_limit: None,
        },
    }))
}

/// The service's answer.
enum Answer {
    Ok {
        /// (name, value, append) for the upstream request.
        upstream: Vec<(HeaderName, HeaderValue, bool)>,
        remove: Vec<HeaderName>,
        /// For the client's response.
        response: Vec<(HeaderName, HeaderValue)>,
    },
    Denied {
        status: u16,
        body: Bytes,
        headers: Vec<(HeaderName, HeaderValue)>,
    },
    Error,
}

/// Headers saved for the response.
struct OnResponse(Vec<(HeaderName, HeaderValue)>);

fn any_match(ms: &[StringMatcher], name: &str) -> bool {
    ms.iter().any(|m| m.matches(name))
}

impl ExtAuthz {
    /// The selected route's metadata in the configured namespaces, as
    /// Envoy sends it in `route_metadata_context` (always, if empty).
    fn route_metadata(&self, rq: &RequestInfo<'_>) -> Option<core::Metadata> {
        let (plain, typed) = &self.route_namespaces;
        let Some(md) = rq.route_metadata else {
            return Some(core::Metadata::default());
        };
        Some(core::Metadata {
            filter_metadata: plain
                .iter()
                .filter_map(|n| Some((n.clone(), md.filter_metadata.get(n)?.clone())))
                .collect(),
            typed_filter_metadata: typed
                .iter()
                .filter_map(|n| Some((n.clone(), md.typed_filter_metadata.get(n)?.clone())))
                .collect(),
        })
    }

    fn count(&self, name: &'static str) {
        self.stats.increment(name);
    }

    fn count_cluster(&self, cluster: Option<&str>, name: &str) {
        if let Some(c) = cluster {
            crate::stats::counter(format!("cluster.{c}.ext_authz.{name}")).increment(1);
        }
    }

    /// The buffered body the check carries: for a request with a body,
    /// when `with_request_body` applies to its route.
    fn check_body<'b>(&self, rq: &'b RequestInfo<'_>) -> Option<&'b Bytes> {
        rq.body
            .filter(|_| !rq.end_of_stream && self.request_body_limit(&rq.per_route).is_some())
    }

    async fn check(&self, rq: &RequestInfo<'_>, ext: HashMap<String, String>) -> Answer {
        match &self.service {
            Service::Grpc {
                cluster,
                timeout,
                allowed,
                disallowed,
                retry,
                metadata,
            } => {
                let Some(addr) = super::side::plaintext_host(rq.clusters, cluster) else {
                    return Answer::Error;
                };
                let mut request = check_request(rq, ext, allowed.as_deref(), disallowed);
                if let Some(b) = self.check_body(rq) {
                    add_body(&mut request, b, self.pack_as_bytes);
                }
                if let Some(a) = request.attributes.as_mut() {
                    a.route_metadata_context = self.route_metadata(rq);
                }
                let Some(channel) = self.grpc.get(addr) else {
                    return Answer::Error;
                };
                let client = auth::authorization_client::AuthorizationClient::new(channel);
                // The timeout covers every attempt, as the router's does.
                let call = grpc_check(client, request, retry.as_ref(), metadata);
                match tokio::time::timeout(*timeout, call).await {
                    Ok(Ok(r)) => grpc_answer(r),
                    _ => Answer::Error,
                }
            }
            Service::Http(h) => {
                let Some(addr) = super::side::plaintext_host(rq.clusters, &h.cluster) else {
                    return Answer::Error;
                };
                match tokio::time::timeout(h.timeout, self.http_check(rq, h, addr)).await {
                    Ok(Some(a)) => a,
                    _ => Answer::Error,
                }
            }
        }
    }

    /// The check, tried again as `retry_policy` says.
    async fn http_check(
        &self,
        rq: &RequestInfo<'_>,
        h: &HttpService,
        addr: SocketAddr,
    ) -> Option<Answer> {
        let mut n = 0;
        loop {
            let (answer, failure) = self.http_attempt(rq, h, addr).await;
            match &h.retry {
                Some(r)
                    if n < r.num_retries
                        && matches!(answer, Some(Answer::Error))
                        && r.retries(&failure) =>
                {
                    tokio::time::sleep(r.backoff(n)).await;
                    n += 1;
                }
                _ => return answer,
            }
        }
    }

    /// One try: the answer, and how it failed if it did (a status, a
    /// connection that failed, or else a reset, as Envoy's router sees it).
    async fn http_attempt(
        &self,
        rq: &RequestInfo<'_>,
        h: &HttpService,
        addr: SocketAddr,
    ) -> (Option<Answer>, super::retry::Failure) {
        let mut failure = super::retry::Failure::Reset;
        let answer = self.http_once(rq, h, addr, &mut failure).await;
        (answer, failure)
    }

    async fn http_once(
        &self,
        rq: &RequestInfo<'_>,
        h: &HttpService,
        addr: SocketAddr,
        seen: &mut super::retry::Failure,
    ) -> Option<Answer> {
        let path = match &h.path_override {
            Some(p) => p.clone(),
            None => format!(
                "{}{}",
                h.path_prefix,
                rq.req.uri.path_and_query().map_or("/", |p| p.as_str())
            ),
        };
        // As Envoy's async client through its router: the timeout it
        // expects and the internal mark.
        let mut b = http::Request::builder()
            .method(rq.req.method.clone())
            .uri(format!("http://{addr}{path}"))
            .header(http::header::HOST, h.authority.as_str())
            .header(
                http::header::CONTENT_LENGTH,
                self.check_body(rq).map_or(0, |b| b.len()).to_string(),
            )
            .header(
                "x-envoy-expected-rq-timeout-ms",
                h.timeout.as_millis().to_string(),
            )
            .header("x-envoy-internal", "true");
        for (k, v) in rq.req.headers.iter() {
            // Host, method and path travel in the request line; these
            // always go along, and whatever allowed_headers matches.
            let always = k == http::header::AUTHORIZATION;
            if k == http::header::HOST || k == http::header::CONTENT_LENGTH {
                continue;
            }
            if always || any_match(&h.allowed, k.as_str()) {
                b = b.header(k, v);
            }
        }
        for (k, v) in &h.headers_to_add {
            b = b.header(k, v);
        }
        let body = match self.check_body(rq) {
            Some(body) => {
                b = b.header(PARTIAL_BODY, "false");
                body.clone()
            }
            None => Bytes::new(),
        };
        let req = b.body(http_body_util::Full::new(body)).ok()?;
        let resp = match self.http.request(req).await {
            Ok(r) => r,
            Err(e) => {
                if e.is_connect() {
                    *seen = super::retry::Failure::Connect;
                }
                return Some(Answer::Error);
            }
        };
        let (parts, body) = resp.into_parts();
        let body = http_body_util::BodyExt::collect(body)
            .await
            .ok()?
            .to_bytes();
        let status = parts.status.as_u16();
        *seen = super::retry::Failure::Status(status);
        let headers = parts.headers;
        // A server error is the service failing, not a denial.
        if status >= 500 {
            return Some(Answer::Error);
        }
        if status == 200 {
            let pick = |ms: &[StringMatcher], append: bool| {
                headers
                    .iter()
                    .filter(|(k, _)| any_match(ms, k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone(), append))
                    .collect::<Vec<_>>()
            };
            let mut upstream = pick(&h.upstream, false);
            upstream.extend(pick(&h.upstream_append, true));
            let response = pick(&h.client_on_success, false)
                .into_iter()
                .map(|(k, v, _)| (k, v))
                .collect();
            return Some(Answer::Ok {
                upstream,
                remove: Vec::new(),
                response,
            });
        }
        Some(Answer::Denied {
            status,
            body,
            headers: denied_headers(&headers, &h.client),
        })
    }
}

/// The gRPC check, tried again on the status codes `retry_on` names (a
/// connection that fails is `unavailable`, as tonic reports it).
async fn grpc_check(
    mut client: auth::authorization_client::AuthorizationClient<tonic::transport::Channel>,
    request: auth::CheckRequest,
    retry: Option<&super::retry::Retry>,
    metadata: &super::side::Metadata,
) -> std::result::Result<auth::CheckResponse, tonic::Status> {
    let mut n = 0;
    loop {
        let status = match client.check(metadata.request(request.clone())).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) => s,
        };
        use super::retry::Failure;
        // A status the server sent is a gRPC failure; one tonic made from a
        // transport error (it carries the error as its source) is the
        // connection failing, which Envoy's router sees as a reset.
        let failure = if std::error::Error::source(&status).is_some() {
            Failure::Reset
        } else {
            Failure::Grpc(status.code() as i32)
        };
        match retry {
            Some(r) if n < r.num_retries && r.retries(&failure) => {
                tokio::time::sleep(r.backoff(n)).await;
                n += 1;
            }
            _ => return Err(status),
        }
    }
}

/// The authorization response's headers the client gets on a denial: those
/// `allowed_client_headers` matches, or without it all but the framing
/// ones.
fn denied_headers(headers: &HeaderMap, client: &[StringMatcher]) -> Vec<(HeaderName, HeaderValue)> {
    headers
        .iter()
        .filter(|(k, _)| {
            if client.is_empty() {
                !matches!(
                    k.as_str(),
                    "content-length" | "transfer-encoding" | "connection" | "date" | "host"
                )
            } else {
                any_match(client, k.as_str())
            }
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn grpc_answer(r: auth::CheckResponse) -> Answer {
    let code = r.status.as_ref().map_or(0, |s| s.code);
    use auth::check_response::HttpResponse as H;
    if code == 0 {
        let Some(H::OkResponse(ok)) = r.http_response else {
            return Answer::Ok {
                upstream: Vec::new(),
                remove: Vec::new(),
                response: Vec::new(),
            };
        };
        let upstream = ok
            .headers
            .iter()
            .filter_map(|o| {
                let h = o.header.as_ref()?;
                let (k, v) = super::side::header_pair(h)?;
                Some((k, v, o.append.as_ref().is_some_and(|a| a.value)))
            })
            .collect();
        let remove = ok
            .headers_to_remove
            .iter()
            .filter_map(|n| HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes()).ok())
            .collect();
        let response = ok
            .response_headers_to_add
            .iter()
            .filter_map(|o| {
                let h = o.header.as_ref()?;
                super::side::header_pair(h)
            })
            .collect();
        return Answer::Ok {
            upstream,
            remove,
            response,
        };
    }
    let (status, body, headers) = match r.http_response {
        Some(H::DeniedResponse(d)) => (
            d.status
                .as_ref()
                .and_then(|s| u16::try_from(s.code).ok())
                .filter(|c| (200..600).contains(c))
                .unwrap_or(403),
            Bytes::from(d.body),
            d.headers
                .iter()
                .filter_map(|o| {
                    let h = o.header.as_ref()?;
                    super::side::header_pair(h)
                })
                .collect(),
        ),
        _ => (403, Bytes::new(), Vec::new()),
    };
    Answer::Denied {
        status,
        body,
        headers,
    }
}

/// Envoy's mark on a check that carries the request body.
const PARTIAL_BODY: &str = "x-envoy-auth-partial-body";

/// The buffered body in the check: as text (invalid UTF-8 replaced) or,
/// with `pack_as_bytes`, as bytes; marked whole.
fn add_body(request: &mut auth::CheckRequest, body: &Bytes, pack_as_bytes: bool) {
    let Some(http) = request
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
    else {
        return;
    };
    if pack_as_bytes {
        http.raw_body = body.to_vec();
    } else {
        http.body = String::from_utf8_lossy(body).into_owned();
    }
    http.size = body.len() as i64;
    http.headers.insert(PARTIAL_BODY.into(), "false".into());
}

/// The gRPC `CheckRequest`: the request's attributes.
fn check_request(
    rq: &RequestInfo<'_>,
    context_extensions: HashMap<String, String>,
    allowed: Option<&[StringMatcher]>,
    disallowed: &[StringMatcher],
) -> auth::CheckRequest {
    let authority = rq.authority().to_string();
    let req = &*rq.req;
    let path = req
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let mut headers: HashMap<String, String> = HashMap::new();
    let keep =
        |name: &str| allowed.is_none_or(|a| any_match(a, name)) && !any_match(disallowed, name);
    for (k, v) in &req.headers {
        // The client's own partial-body mark never reaches the service.
        if k == PARTIAL_BODY {
            continue;
        }
        let name = if k == http::header::HOST {
            ":authority"
        } else {
            k.as_str()
        };
        if !keep(name) {
            continue;
        }
        let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
        headers
            .entry(name.to_string())
            .and_modify(|e| {
                e.push(',');
                e.push_str(&v);
            })
            .or_insert(v);
    }
    for (k, v) in [
        (":authority", authority.clone()),
        (":method", req.method.as_str().to_string()),
        (":path", path.clone()),
        (":scheme", rq.scheme.to_string()),
    ] {
        if keep(k) {
            headers.entry(k.to_string()).or_insert(v);
        }
    }
    let sock = |a: Option<SocketAddr>| {
        a.map(|a| core::Address {
            address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                address: a.ip().to_string(),
                port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(
                    a.port(),
                ))),
                ..Default::default()
            })),
        })
    };
    let size = req
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<i64>().ok())
        .unwrap_or(-1);
    let protocol = match req.version {
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    };
    let query = path
        .split_once('?')
        .map_or_else(String::new, |(_, q)| q.to_string());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    auth::CheckRequest {
        attributes: Some(auth::AttributeContext {
            source: Some(auth::attribute_context::Peer {
                address: sock(rq.direct_remote),
                ..Default::default()
            }),
            destination: Some(auth::attribute_context::Peer {
                address: sock(rq.local),
                ..Default::default()
            }),
            request: Some(auth::attribute_context::Request {
                time: Some(legate_proto::envoy_types::pb::google::protobuf::Timestamp {
                    seconds: now.as_secs() as i64,
                    nanos: now.subsec_nanos() as i32,
                }),
                http: Some(auth::attribute_context::HttpRequest {
                    id: req
                        .headers
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string(),
                    method: req.method.as_str().to_string(),
                    headers,
                    path,
                    host: authority,
                    scheme: rq.scheme.to_string(),
                    query,
                    size,
                    protocol: protocol.to_string(),
                    ..Default::default()
                }),
            }),
            context_extensions,
            tls_session: (!rq.sni.is_empty()).then(|| auth::attribute_context::TlsSession {
                sni: rq.sni.to_string(),
            }),
            ..Default::default()
        }),
    }
}

#[async_trait::async_trait]
impl HttpFilter for ExtAuthz {
    async fn on_request(&self, rq: &mut RequestInfo<'_>, state: &mut Option<State>) -> Flow {
        // No route: no check, as Envoy's (which needs the route's config).
        if !rq.has_route {
            return Flow::Continue;
        }
        let levels: Vec<Arc<RouteConfig>> = rq.all_levels::<RouteConfig>().collect();
        if levels.first().is_some_and(|r| r.disabled) {
            self.count("disabled");
            return Flow::Continue;
        }
        if let Some(f) = &self.enabled {
            if !f.roll(rq.runtime) {
                return Flow::Continue;
            }
        }
        // Context extensions merge, the more specific level winning.
        let mut ext = HashMap::new();
        for l in levels.iter().rev() {
            ext.extend(
                l.context_extensions
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone())),
            );
        }
        let cluster = rq.cluster.map(str::to_string);
        match self.check(rq, ext).await {
            Answer::Ok {
                upstream,
                remove,
                response,
            } => {
                // Envoy clears the route cache when the answer changes the
                // request's headers.
                rq.clear_route_cache |=
                    self.clear_route_cache && (!upstream.is_empty() || !remove.is_empty());
                for (k, v, append) in upstream {
                    if append {
                        if rq.req.headers.contains_key(&k) {
                            let _ = rq.req.append_header(k, v);
                        }
                    } else {
                        let _ = rq.req.insert_header(k, v);
                    }
                }
                for k in remove {
                    if k != http::header::HOST {
                        let _ = rq.req.remove_header(&k);
                    }
                }
                if !response.is_empty() {
                    *state = Some(Box::new(OnResponse(response)));
                }
                self.count("ok");
                self.count_cluster(cluster.as_deref(), "ok");
                Flow::Continue
            }
            Answer::Denied {
                status,
                body,
                headers,
            } => {
                self.count("denied");
                self.count_cluster(cluster.as_deref(), "denied");
                if let (true, Some(c)) = (
                    self.charge_cluster,
                    cluster.as_deref().and_then(|c| rq.clusters.get(c)),
                ) {
                    c.stats.record_status(status);
                }
                let mut r = FilterReply::new(status, "", "ext_authz_denied");
                r.body = body;
                r.headers = headers;
                r.flag = Some("UAEX");
                Flow::Reply(r)
            }
            Answer::Error => {
                self.count("error");
                self.count_cluster(cluster.as_deref(), "error");
                if self.failure_mode_allow {
                    self.count("failure_mode_allowed");
                    self.count_cluster(cluster.as_deref(), "failure_mode_allowed");
                    if self.failure_mode_header {
                        let _ = rq
                            .req
                            .insert_header("x-envoy-auth-failure-mode-allowed", "true");
                    }
                    return Flow::Continue;
                }
                let mut r = FilterReply::new(self.status_on_error, "", "ext_authz_error");
                r.flag = Some("UAEX");
                Flow::Reply(r)
            }
        }
    }

    fn request_body_limit(&self, per_route: &[Option<&PerRoute>; 4]) -> Option<usize> {
        // Only the most specific route config counts, as Envoy's.
        let route = per_route
            .iter()
            .flatten()
            .find_map(|c| c.downcast_ref::<RouteConfig>());
        if route.is_some_and(|r| r.disabled) {
            return None;
        }
        match route.and_then(|r| r.body_limit) {
            Some(limit) => limit,
            None => self.body_limit,
        }
    }

    fn on_response(
        &self,
        resp: &mut ResponseHeader,
        _info: &ResponseInfo<'_>,
        state: Option<&State>,
    ) {
        if let Some(OnResponse(hs)) = state.and_then(|s| s.downcast_ref::<OnResponse>()) {
            for (k, v) in hs {
                let _ = resp.append_header(k.clone(), v.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_limits_fit_the_retry_buffer_and_whole_messages() {
        let b = |max, partial| pb::BufferSettings {
            max_request_bytes: max,
            allow_partial_message: partial,
            pack_as_bytes: false,
        };
        assert_eq!(body_limit(&b(8192, false), "w").unwrap(), 8192);
        assert_eq!(body_limit(&b(65536, false), "w").unwrap(), 65536);
        let e = body_limit(&b(65537, false), "w").unwrap_err().to_string();
        assert!(e.contains("w.max_request_bytes"), "{e}");
        let e = body_limit(&b(1024, true), "w").unwrap_err().to_string();
        assert!(e.contains("w.allow_partial_message"), "{e}");
    }

    #[test]
    fn the_body_goes_as_text_or_bytes_marked_whole() {
        let mut r = auth::CheckRequest {
            attributes: Some(auth::AttributeContext {
                request: Some(auth::attribute_context::Request {
                    http: Some(Default::default()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        add_body(&mut r, &Bytes::from_static(b"hi"), false);
        let h = r
            .attributes
            .as_ref()
            .unwrap()
            .request
            .as_ref()
            .unwrap()
            .http
            .as_ref()
            .unwrap();
        assert_eq!((h.body.as_str(), h.size), ("hi", 2));
        assert_eq!(h.headers[PARTIAL_BODY], "false");
        add_body(&mut r, &Bytes::from_static(b"\xff"), true);
        let h = r
            .attributes
            .as_ref()
            .unwrap()
            .request
            .as_ref()
            .unwrap()
            .http
            .as_ref()
            .unwrap();
        assert_eq!(h.raw_body, b"\xff");
    }
}
