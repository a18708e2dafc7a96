//! `envoy.filters.http.ratelimit`: asks a rate limit service
//! (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`, over
//! gRPC to a cluster of the cluster manager) about the request's
//! descriptors, and answers 429 when it is over the limit. Descriptors come
//! from the most specific `RateLimitPerRoute`'s `rate_limits`, else the
//! filter's own, else the route's (with the virtual host's as
//! `vh_rate_limits` says). A service that errs or does not answer within
//! `timeout` lets the request through, or with `failure_mode_deny` answers
//! 500.

use super::rate_limit_actions::{self as actions, RateLimit, VhRateLimits, XRateLimit};
use super::{
    Factory, FilterReply, Flow, HttpFilter, PerRoute, RequestInfo, ResponseInfo, State, StreamDone,
};
use crate::config::{join, ConfigError, Result};
use crate::registry::MessageSupport;
use http::{HeaderName, HeaderValue};
use legate_proto::envoy_types::pb::envoy::extensions::common::ratelimit::v3 as common;
use legate_proto::envoy_types::pb::envoy::extensions::filters::http::ratelimit::v3 as pb;
use legate_proto::envoy_types::pb::envoy::service::ratelimit::v3 as rls;
use legate_proto::envoy_types::pb::google::protobuf::Any;
use pingora_http::ResponseHeader;
use std::sync::Arc;
use std::time::Duration;

const TYPE: &str = "envoy.extensions.filters.http.ratelimit.v3.RateLimit";
const PER_ROUTE_TYPE: &str = "envoy.extensions.filters.http.ratelimit.v3.RateLimitPerRoute";

pub static FACTORY: Factory = Factory {
    type_name: TYPE,
    build,
    per_route: &[(PER_ROUTE_TYPE, per_route)],
};

pub static REGISTRY: &[MessageSupport] = &[
    MessageSupport {
        message: TYPE,
        supported: &[
            "domain",
            "stage",
            "request_type",
            "timeout",
            "failure_mode_deny",
            "rate_limited_as_resource_exhausted",
            "rate_limit_service",
            "enable_x_ratelimit_headers",
            "disable_x_envoy_ratelimited_header",
            "stat_prefix",
            "rate_limits",
        ],
        warn: &[],
    },
    MessageSupport {
        message: PER_ROUTE_TYPE,
        supported: &["vh_rate_limits", "override_option", "rate_limits", "domain"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.ratelimit.v3.RateLimitServiceConfig",
        supported: &["grpc_service", "transport_api_version"],
        warn: &[],
    },
];

/// The filter's config (immutable) and its gRPC channels (live state).
#[derive(Debug)]
pub struct RateLimitFilter {
    domain: String,
    /// `grpc_service.initial_metadata`, on every call.
    metadata: super::side::Metadata,
    stage: u32,
    request_type: RequestType,
    timeout: Duration,
    failure_mode_deny: bool,
    resource_exhausted: bool,
    x_ratelimit_headers: bool,
    x_envoy_ratelimited: bool,
    stat_prefix: String,
    rate_limits: Vec<RateLimit>,
    /// The rate limit service's cluster.
    cluster: String,
    channels: super::side::Channels,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum RequestType {
    Both,
    Internal,
    External,
}

/// A route's `RateLimitPerRoute`.
#[derive(Debug)]
pub struct RouteConfig {
    vh: VhRateLimits,
    rate_limits: Vec<RateLimit>,
    domain: String,
}

fn build(a: &Any, _hcm_prefix: &str, path: &str) -> Result<Arc<dyn HttpFilter>> {
    let c: pb::RateLimit = super::decode(a, path)?;
    if c.domain.is_empty() {
        return Err(ConfigError::new(join(path, "domain"), "domain is required"));
    }
    let cluster = service_cluster(
        c.rate_limit_service.as_ref(),
        &join(path, "rate_limit_service"),
    )?;
    let grpc = c
        .rate_limit_service
        .as_ref()
        .and_then(|s| s.grpc_service.clone())
        .unwrap_or_default();
    let authority = crate::config::grpc_service_authority(&grpc);
    let metadata =
        super::side::Metadata::from_service(&grpc, &join(path, "rate_limit_service.grpc_service"))?;
    let request_type = match c.request_type.as_str() {
        "" | "both" => RequestType::Both,
        "internal" => RequestType::Internal,
        "external" => RequestType::External,
        other => {
            return Err(ConfigError::new(
                join(path, "request_type"),
                format!("'{other}' is not one of internal, external and both"),
            ))
        }
    };
    let timeout = match &c.timeout {
        Some(t) => crate::config::duration(t, &join(path, "timeout"))?,
        None => Duration::from_millis(20),
    };
    Ok(Arc::new(RateLimitFilter {
        domain: c.domain.clone(),
        metadata,
        stage: c.stage,
        request_type,
        timeout,
        failure_mode_deny: c.failure_mode_deny,
        resource_exhausted: c.rate_limited_as_resource_exhausted,
        x_ratelimit_headers: c.enable_x_ratelimit_headers
            == common::XRateLimitHeadersRfcVersion::DraftVersion03 as i32,
        x_envoy_ratelimited: !c.disable_x_envoy_ratelimited_header,
        stat_prefix: c.stat_prefix.clone(),
        rate_limits: actions::global_list(&c.rate_limits, path, "rate_limits")?,
        cluster,
        channels: super::side::Channels::new(&authority),
    }))
}

/// The cluster of `rate_limit_service.grpc_service.envoy_grpc`, V3 only.
fn service_cluster(
    s: Option<&legate_proto::envoy_types::pb::envoy::config::ratelimit::v3::RateLimitServiceConfig>,
    path: &str,
) -> Result<String> {
    let s = s.ok_or_else(|| ConfigError::new(path, "rate_limit_service is required"))?;
    if s.transport_api_version
        != legate_proto::envoy_types::pb::envoy::config::core::v3::ApiVersion::V3 as i32
    {
        return Err(ConfigError::new(
            join(path, "transport_api_version"),
            "only V3 is supported",
        ));
    }
    let g = s
        .grpc_service
        .as_ref()
        .ok_or_else(|| ConfigError::new(join(path, "grpc_service"), "grpc_service is required"))?;
    if g.retry_policy.is_some() {
        return Err(ConfigError::new(
            join(path, "grpc_service.retry_policy"),
            "retries of rate limit service calls are not supported",
        ));
    }
    crate::config::grpc_service_cluster(g, &join(path, "grpc_service"))
}

fn per_route(a: &Any, path: &str) -> Result<PerRoute> {
    let c: pb::RateLimitPerRoute = super::decode(a, path)?;
    use pb::rate_limit_per_route::{OverrideOptions as O, VhRateLimitsOptions as V};
    // override_option DEFAULT defers to vh_rate_limits.
    let vh = match O::try_from(c.override_option).unwrap_or(O::Default) {
        O::IncludePolicy => VhRateLimits::Include,
        O::IgnorePolicy => VhRateLimits::Ignore,
        O::OverridePolicy => VhRateLimits::Override,
        O::Default => match V::try_from(c.vh_rate_limits).unwrap_or(V::Override) {
            V::Override => VhRateLimits::Override,
            V::Include => VhRateLimits::Include,
            V::Ignore => VhRateLimits::Ignore,
        },
    };
    Ok(Arc::new(RouteConfig {
        vh,
        rate_limits: actions::global_list(&c.rate_limits, path, "rate_limits")?,
        domain: c.domain.clone(),
    }))
}

/// What the service said.
enum Verdict {
    Ok(rls::RateLimitResponse),
    OverLimit(rls::RateLimitResponse),
    Error,
}

/// Kept from the request: headers the service asked to add to the
/// response, and what the stream-done descriptors need.
struct Kept {
    headers: Vec<(HeaderName, HeaderValue)>,
    done: Option<Done>,
}

/// The request's context for `apply_on_stream_done` entries, fixed when
/// the request was checked, as Envoy keeps its route and cluster.
struct Done {
    route: Option<Arc<RouteConfig>>,
    cluster: String,
    domain: String,
}

/// One descriptor for the service, with its own `x-ratelimit-*` choice.
struct Described {
    proto: common::RateLimitDescriptor,
    x: XRateLimit,
}

impl Described {
    fn plain(entries: actions::Descriptor) -> Self {
        Self {
            proto: common::RateLimitDescriptor {
                entries: entries
                    .into_iter()
                    .map(|(key, value)| common::rate_limit_descriptor::Entry { key, value })
                    .collect(),
                ..Default::default()
            },
            x: XRateLimit::Inherit,
        }
    }
}

/// What the filter's own lists' descriptors read besides the request.
struct Context<'a> {
    metadata: &'a super::Metadata,
    render: &'a dyn Fn(&crate::access_log::Format) -> String,
}

impl RateLimitFilter {
    fn stat(&self, cluster: &str, name: &str) {
        let p = if self.stat_prefix.is_empty() {
            "ratelimit".to_string()
        } else {
            format!("ratelimit.{}", self.stat_prefix)
        };
        crate::stats::counter(format!("cluster.{cluster}.{p}.{name}")).increment(1);
    }

    /// The most specific `RateLimitPerRoute`'s list, else the filter's
    /// own, if either has entries.
    fn own_list<'a>(&'a self, route: Option<&'a RouteConfig>) -> Option<&'a [RateLimit]> {
        match route {
            Some(r) if !r.rate_limits.is_empty() => Some(&r.rate_limits),
            _ if !self.rate_limits.is_empty() => Some(&self.rate_limits),
            _ => None,
        }
    }

    fn descriptors(&self, rq: &RequestInfo<'_>, route: Option<&RouteConfig>) -> Vec<Described> {
        let runtime = rq.runtime;
        if let Some(list) = self.own_list(route) {
            // Built only for a format hits addend, which reads it.
            let cx = Context {
                metadata: rq.metadata,
                render: &|f| f.render(&rq.log_entry("")),
            };
            return self.described(list, &rq.rate_limit_facts(), &cx, false);
        }
        let skip = |r: &RateLimit| disabled(runtime, r);
        let vh = route.map_or(VhRateLimits::Override, |r| r.vh);
        actions::route_descriptors(rq, self.stage, vh, &skip)
            .into_iter()
            .map(Described::plain)
            .collect()
    }

    /// The descriptors of the entries of `list` at this stage that apply
    /// on the request (`on_done` false) or when the stream ends, with
    /// their hits, limit override and header choice. An entry whose hits
    /// do not resolve to a number makes no descriptor, as in Envoy.
    fn described(
        &self,
        list: &[RateLimit],
        facts: &actions::RequestFacts,
        cx: &Context,
        on_done: bool,
    ) -> Vec<Described> {
        let extras = actions::ExtrasContext {
            metadata: cx.metadata,
            render: cx.render,
        };
        list.iter()
            // Envoy applies a filter's own entries whatever its stage (and
            // refuses stage and disable_key on them).
            .filter(|r| r.extras.on_stream_done == on_done)
            .filter_map(|r| r.produce(facts, &extras))
            .map(|p| {
                let mut d = Described::plain(p.entries);
                d.proto.hits_addend = p.hits.map(|value| {
                    legate_proto::envoy_types::pb::google::protobuf::UInt64Value { value }
                });
                d.proto.is_negative_hits = p.negative_hits;
                d.proto.limit = p.limit.map(|(requests_per_unit, unit)| {
                    common::rate_limit_descriptor::RateLimitOverride {
                        requests_per_unit,
                        unit,
                    }
                });
                d.x = p.x_ratelimit;
                d
            })
            .collect()
    }

    /// The rate limit service's request.
    fn request(&self, domain: &str, descriptors: Vec<Described>) -> rls::RateLimitRequest {
        rls::RateLimitRequest {
            domain: domain.to_string(),
            descriptors: descriptors.into_iter().map(|d| d.proto).collect(),
            hits_addend: 0,
        }
    }

    async fn ask(&self, rq: &RequestInfo<'_>, request: rls::RateLimitRequest) -> Verdict {
        let Some(addr) = super::side::plaintext_host(rq.clusters, &self.cluster) else {
            return Verdict::Error;
        };
        let Some(channel) = self.channels.get(addr) else {
            return Verdict::Error;
        };
        let mut client = rls::rate_limit_service_client::RateLimitServiceClient::new(channel);
        let call = client.should_rate_limit(self.metadata.request(request));
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(resp)) => {
                let resp = resp.into_inner();
                match rls::rate_limit_response::Code::try_from(resp.overall_code) {
                    Ok(rls::rate_limit_response::Code::Ok) => Verdict::Ok(resp),
                    Ok(rls::rate_limit_response::Code::OverLimit) => Verdict::OverLimit(resp),
                    _ => Verdict::Error,
                }
            }
            _ => Verdict::Error,
        }
    }
}

/// An entry with a disable key runs only while its runtime switch
/// (`ratelimit.<key>.http_filter_enabled`, 100 % by default) is on.
fn disabled(runtime: &crate::runtime::Runtime, r: &RateLimit) -> bool {
    !r.disable_key.is_empty()
        && !super::roll(runtime.fraction_per_million(
            &format!("ratelimit.{}.http_filter_enabled", r.disable_key),
            1_000_000,
        ))
}

fn header_pairs(
    hs: &[legate_proto::envoy_types::pb::envoy::config::core::v3::HeaderValue],
) -> Vec<(HeaderName, HeaderValue)> {
    hs.iter().filter_map(super::side::header_pair).collect()
}

/// Seconds of a rate limit unit.
fn unit_seconds(unit: i32) -> Option<u64> {
    use rls::rate_limit_response::rate_limit::Unit as U;
    match U::try_from(unit).ok()? {
        U::Second => Some(1),
        U::Minute => Some(60),
        U::Hour => Some(3600),
        U::Day => Some(86400),
        U::Week => Some(604800),
        U::Month => Some(2592000),
        U::Year => Some(31536000),
        U::Unknown => None,
    }
}

/// The draft-03 `x-ratelimit-*` headers from the descriptor statuses: the
/// limit with the least remaining, and every limit's quota policy.
fn x_ratelimit(
    statuses: &[rls::rate_limit_response::DescriptorStatus],
    options: &[XRateLimit],
    default: bool,
) -> Vec<(HeaderName, HeaderValue)> {
    // Statuses answer the descriptors one for one; a descriptor's own
    // option wins over the filter's.
    let enabled = |i: usize| match options.get(i) {
        Some(XRateLimit::Off) => false,
        Some(XRateLimit::DraftVersion03) => true,
        _ => default,
    };
    let mut min: Option<(usize, &rls::rate_limit_response::DescriptorStatus)> = None;
    for (i, s) in statuses.iter().enumerate() {
        if s.current_limit.is_some()
            && min.is_none_or(|(_, m)| s.limit_remaining < m.limit_remaining)
        {
            min = Some((i, s));
        }
    }
    let Some((_, m)) = min.filter(|(i, _)| enabled(*i)) else {
        return Vec::new();
    };
    let mut policy = String::new();
    for (i, s) in statuses.iter().enumerate() {
        let Some(limit) = s.current_limit.as_ref().filter(|_| enabled(i)) else {
            continue;
        };
        if let Some(w) = unit_seconds(limit.unit) {
            policy.push_str(&format!(", {};w={w}", limit.requests_per_unit));
            if !limit.name.is_empty() {
                policy.push_str(&format!(";name=\"{}\"", limit.name));
            }
        }
    }
    let limit = m.current_limit.as_ref().map_or(0, |l| l.requests_per_unit);
    let reset = m
        .duration_until_reset
        .as_ref()
        .map_or(0, |d| d.seconds.max(0));
    [
        ("x-ratelimit-limit", format!("{limit}{policy}")),
        ("x-ratelimit-remaining", m.limit_remaining.to_string()),
        ("x-ratelimit-reset", reset.to_string()),
    ]
    .into_iter()
    .filter_map(|(k, v)| Some((HeaderName::from_static(k), HeaderValue::from_str(&v).ok()?)))
    .collect()
}

#[async_trait::async_trait]
impl HttpFilter for RateLimitFilter {
    async fn on_request(&self, rq: &mut RequestInfo<'_>, state: &mut Option<State>) -> Flow {
        if !super::roll(
            rq.runtime
                .fraction_per_million("ratelimit.http_filter_enabled", 1_000_000),
        ) {
            return Flow::Continue;
        }
        let internal = rq
            .req
            .headers
            .get("x-envoy-internal")
            .is_some_and(|v| v == "true");
        match (self.request_type, internal) {
            (RequestType::Internal, false) | (RequestType::External, true) => {
                return Flow::Continue
            }
            _ => {}
        }
        // Needs a forwarding route to a cluster that exists.
        let Some(cluster) = rq
            .cluster
            .filter(|c| rq.forwards && rq.clusters.get(c).is_some())
        else {
            return Flow::Continue;
        };
        let cluster = cluster.to_string();
        let route: Option<Arc<RouteConfig>> = rq.all_levels::<RouteConfig>().next();
        let domain = route
            .as_deref()
            .map(|r| r.domain.as_str())
            .filter(|d| !d.is_empty())
            .unwrap_or(&self.domain);
        // Entries applied when the stream ends need this request's context
        // then, whatever happens to it now (a 429 included), as in Envoy.
        let mut kept = Kept {
            headers: Vec::new(),
            done: self
                .own_list(route.as_deref())
                .is_some_and(|l| l.iter().any(|r| r.extras.on_stream_done))
                .then(|| Done {
                    route: route.clone(),
                    cluster: cluster.clone(),
                    domain: domain.to_string(),
                }),
        };
        let descriptors = self.descriptors(rq, route.as_deref());
        if descriptors.is_empty() {
            if kept.done.is_some() {
                *state = Some(Box::new(kept));
            }
            return Flow::Continue;
        }
        let options: Vec<XRateLimit> = descriptors.iter().map(|d| d.x).collect();
        let verdict = self.ask(rq, self.request(domain, descriptors)).await;
        if kept.done.is_some() {
            // Set now so that every way out below keeps it.
            *state = Some(Box::new(Kept {
                headers: Vec::new(),
                done: kept.done.take(),
            }));
        }
        let (resp, over) = match verdict {
            Verdict::Ok(r) => {
                self.stat(&cluster, "ok");
                (r, false)
            }
            Verdict::OverLimit(r) => {
                self.stat(&cluster, "over_limit");
                (r, true)
            }
            Verdict::Error => {
                self.stat(&cluster, "error");
                if self.failure_mode_deny {
                    let mut r = FilterReply::new(500, "", "rate_limiter_error");
                    r.flag = Some("RLSE");
                    return Flow::Reply(r);
                }
                self.stat(&cluster, "failure_mode_allowed");
                return Flow::Continue;
            }
        };
        let mut response_headers = header_pairs(&resp.response_headers_to_add);
        if over && self.x_envoy_ratelimited {
            response_headers.push((
                HeaderName::from_static("x-envoy-ratelimited"),
                HeaderValue::from_static("true"),
            ));
        }
        response_headers.extend(x_ratelimit(
            &resp.statuses,
            &options,
            self.x_ratelimit_headers,
        ));
        if over
            && super::roll(
                rq.runtime
                    .fraction_per_million("ratelimit.http_filter_enforcing", 1_000_000),
            )
        {
            if let Some(c) = rq.clusters.get(&cluster) {
                c.stats.record_status(429);
            }
            let mut r = FilterReply::new(429, "", "request_rate_limited");
            r.body = bytes::Bytes::from(resp.raw_body.clone());
            r.flag = Some("RL");
            r.grpc_status = self.resource_exhausted.then_some(8);
            r.headers = response_headers;
            return Flow::Reply(r);
        }
        for (k, v) in header_pairs(&resp.request_headers_to_add) {
            let _ = rq.req.append_header(k, v);
        }
        if !response_headers.is_empty() {
            kept.done = state
                .take()
                .and_then(|s| s.downcast::<Kept>().ok())
                .and_then(|k| k.done);
            kept.headers = response_headers;
            *state = Some(Box::new(kept));
        }
        Flow::Continue
    }

    fn wants_stream_done(&self) -> bool {
        true
    }

    /// Sends the `apply_on_stream_done` descriptors, fire and forget: the
    /// answer enforces nothing and counts in no stat, as in Envoy.
    fn on_stream_done(&self, done: &StreamDone<'_>, state: Option<&State>) {
        let Some(d) = state
            .and_then(|s| s.downcast_ref::<Kept>())
            .and_then(|k| k.done.as_ref())
        else {
            return;
        };
        let Some(list) = self.own_list(d.route.as_deref()) else {
            return;
        };
        let cx = Context {
            metadata: done.metadata,
            render: &|f| f.render(done.entry),
        };
        let descriptors = self.described(list, &done.facts(&d.cluster), &cx, true);
        if descriptors.is_empty() {
            return;
        }
        let Some(channel) = super::side::plaintext_host(done.clusters, &self.cluster)
            .and_then(|addr| self.channels.get(addr))
        else {
            return;
        };
        let request = self.metadata.request(self.request(&d.domain, descriptors));
        let timeout = self.timeout;
        tokio::spawn(async move {
            let mut client = rls::rate_limit_service_client::RateLimitServiceClient::new(channel);
            let _ = tokio::time::timeout(timeout, client.should_rate_limit(request)).await;
        });
    }

    fn on_response(
        &self,
        resp: &mut ResponseHeader,
        _info: &ResponseInfo<'_>,
        state: Option<&State>,
    ) {
        if let Some(a) = state.and_then(|s| s.downcast_ref::<Kept>()) {
            for (k, v) in &a.headers {
                let _ = resp.append_header(k.clone(), v.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rls::rate_limit_response::{rate_limit::Unit, DescriptorStatus, RateLimit as Limit};

    #[test]
    fn x_ratelimit_headers_show_the_tightest_limit_and_every_policy() {
        let status = |rpu, unit: Unit, remaining| DescriptorStatus {
            code: 1,
            current_limit: Some(Limit {
                name: String::new(),
                requests_per_unit: rpu,
                unit: unit as i32,
            }),
            limit_remaining: remaining,
            duration_until_reset: Some(legate_proto::envoy_types::pb::google::protobuf::Duration {
                seconds: 42,
                nanos: 0,
            }),
            quota: None,
        };
        let statuses = [status(10, Unit::Minute, 7), status(3, Unit::Hour, 2)];
        let h = x_ratelimit(&statuses, &[], true);
        let get = |n: &str| {
            h.iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.to_str().unwrap().to_string())
        };
        assert_eq!(
            get("x-ratelimit-limit").as_deref(),
            Some("3, 10;w=60, 3;w=3600")
        );
        assert_eq!(get("x-ratelimit-remaining").as_deref(), Some("2"));
        assert_eq!(get("x-ratelimit-reset").as_deref(), Some("42"));
        assert!(x_ratelimit(&[], &[], true).is_empty());
        // The tightest limit's descriptor turns the headers off: none.
        let off = [XRateLimit::Inherit, XRateLimit::Off];
        assert!(x_ratelimit(&statuses, &off, true).is_empty());
        // Another's does: its policy is left out.
        let off = [XRateLimit::Off, XRateLimit::Inherit];
        let h = x_ratelimit(&statuses, &off, true);
        assert_eq!(h[0].1, "3, 3;w=3600");
        // The filter's are off, a descriptor's own option turns them on.
        let on = [XRateLimit::Inherit, XRateLimit::DraftVersion03];
        let h = x_ratelimit(&statuses, &on, false);
        assert_eq!(h[0].1, "3, 3;w=3600");
    }
}
