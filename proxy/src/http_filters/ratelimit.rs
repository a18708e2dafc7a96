//! `envoy.filters.http.ratelimit`: asks a rate limit service
//! (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`, over
//! gRPC to a cluster of the cluster manager) about the request's
//! descriptors, and answers 429 when it is over the limit. Descriptors come
//! from the most specific `RateLimitPerRoute`'s `rate_limits`, else the
//! filter's own, else the route's (with the virtual host's as
//! `vh_rate_limits` says). A service that errs or does not answer within
//! `timeout` lets the request through, or with `failure_mode_deny` answers
//! 500.

use super::rate_limit_actions::{self as actions, Descriptor, RateLimit, VhRateLimits};
use super::{Factory, FilterReply, Flow, HttpFilter, PerRoute, RequestInfo, ResponseInfo, State};
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
        rate_limits: actions::list(&c.rate_limits, path, "rate_limits")?,
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
        rate_limits: actions::list(&c.rate_limits, path, "rate_limits")?,
        domain: c.domain.clone(),
    }))
}

/// What the service said.
enum Verdict {
    Ok(rls::RateLimitResponse),
    OverLimit(rls::RateLimitResponse),
    Error,
}

/// Kept for the response: headers the service asked to add.
struct Answer {
    headers: Vec<(HeaderName, HeaderValue)>,
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

    fn descriptors(&self, rq: &RequestInfo<'_>, route: Option<&RouteConfig>) -> Vec<Descriptor> {
        let runtime = rq.runtime;
        // An entry with a disable key runs only while its runtime switch
        // (`ratelimit.<key>.http_filter_enabled`, 100 % by default) is on.
        let skip = |r: &RateLimit| {
            !r.disable_key.is_empty()
                && !super::roll(runtime.fraction_per_million(
                    &format!("ratelimit.{}.http_filter_enabled", r.disable_key),
                    1_000_000,
                ))
        };
        let own = match route {
            Some(r) if !r.rate_limits.is_empty() => Some(&r.rate_limits),
            _ if !self.rate_limits.is_empty() => Some(&self.rate_limits),
            _ => None,
        };
        if let Some(list) = own {
            let mut out = Vec::new();
            actions::descriptors(list, self.stage, &rq.rate_limit_facts(), &skip, &mut out);
            return out;
        }
        let vh = route.map_or(VhRateLimits::Override, |r| r.vh);
        actions::route_descriptors(rq, self.stage, vh, &skip)
    }

    async fn ask(
        &self,
        rq: &RequestInfo<'_>,
        domain: &str,
        descriptors: Vec<Descriptor>,
    ) -> Verdict {
        let Some(addr) = super::side::plaintext_host(rq.clusters, &self.cluster) else {
            return Verdict::Error;
        };
        let Some(channel) = self.channels.get(addr) else {
            return Verdict::Error;
        };
        let request = rls::RateLimitRequest {
            domain: domain.to_string(),
            descriptors: descriptors
                .into_iter()
                .map(|d| common::RateLimitDescriptor {
                    entries: d
                        .into_iter()
                        .map(|(key, value)| common::rate_limit_descriptor::Entry { key, value })
                        .collect(),
                    ..Default::default()
                })
                .collect(),
            hits_addend: 0,
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
) -> Vec<(HeaderName, HeaderValue)> {
    let mut min: Option<&rls::rate_limit_response::DescriptorStatus> = None;
    let mut policy = String::new();
    for s in statuses {
        let Some(limit) = &s.current_limit else {
            continue;
        };
        if min.is_none_or(|m| s.limit_remaining < m.limit_remaining) {
            min = Some(s);
        }
        if let Some(w) = unit_seconds(limit.unit) {
            policy.push_str(&format!(", {};w={w}", limit.requests_per_unit));
            if !limit.name.is_empty() {
                policy.push_str(&format!(";name=\"{}\"", limit.name));
            }
        }
    }
    let Some(m) = min else {
        return Vec::new();
    };
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
        let descriptors = self.descriptors(rq, route.as_deref());
        if descriptors.is_empty() {
            return Flow::Continue;
        }
        let domain = route
            .as_deref()
            .map(|r| r.domain.as_str())
            .filter(|d| !d.is_empty())
            .unwrap_or(&self.domain)
            .to_string();
        let (resp, over) = match self.ask(rq, &domain, descriptors).await {
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
        if self.x_ratelimit_headers {
            response_headers.extend(x_ratelimit(&resp.statuses));
        }
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
            *state = Some(Box::new(Answer {
                headers: response_headers,
            }));
        }
        Flow::Continue
    }

    fn on_response(
        &self,
        resp: &mut ResponseHeader,
        _info: &ResponseInfo<'_>,
        state: Option<&State>,
    ) {
        if let Some(a) = state.and_then(|s| s.downcast_ref::<Answer>()) {
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
        let h = x_ratelimit(&[status(10, Unit::Minute, 7), status(3, Unit::Hour, 2)]);
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
        assert!(x_ratelimit(&[]).is_empty());
    }
}
