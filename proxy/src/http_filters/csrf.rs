//! `envoy.filters.http.csrf`: a mutating request (POST, PUT, DELETE,
//! PATCH) must come from its own origin: the host and port of `Origin`
//! (else `Referer`) must be the request's host, or match one of
//! `additional_origins`; otherwise 403 `Invalid origin`. The policy is the
//! filter's or the most specific route's `CsrfPolicy`.

use super::{Factory, FilterReply, Flow, Fraction, HttpFilter, PerRoute, RequestInfo, State};
use crate::config::matcher::StringMatcher;
use crate::config::{index, Result};
use crate::registry::MessageSupport;
use legate_proto::envoy_types::pb::envoy::extensions::filters::http::csrf::v3 as pb;
use legate_proto::envoy_types::pb::google::protobuf::Any;
use std::sync::Arc;

const TYPE: &str = "envoy.extensions.filters.http.csrf.v3.CsrfPolicy";

pub static FACTORY: Factory = Factory {
    type_name: TYPE,
    build,
    per_route: &[(TYPE, per_route)],
};

pub static REGISTRY: &[MessageSupport] = &[MessageSupport {
    message: TYPE,
    supported: &["filter_enabled", "shadow_enabled", "additional_origins"],
    warn: &[],
}];

#[derive(Debug)]
pub struct Policy {
    enabled: Fraction,
    shadow: Option<Fraction>,
    additional: Vec<StringMatcher>,
}

impl Policy {
    fn from_proto(p: &pb::CsrfPolicy, path: &str) -> Result<Self> {
        Ok(Self {
            // filter_enabled is required; unset it is Envoy's 0 %.
            enabled: Fraction::from_proto(
                p.filter_enabled.as_ref(),
                Fraction {
                    key: None,
                    default: 0,
                },
            ),
            shadow: p
                .shadow_enabled
                .as_ref()
                .map(|s| Fraction::from_proto(Some(s), Fraction::ALWAYS)),
            additional: p
                .additional_origins
                .iter()
                .enumerate()
                .map(|(i, m)| StringMatcher::from_proto(m, &index(path, "additional_origins", i)))
                .collect::<Result<_>>()?,
        })
    }
}

#[derive(Debug)]
pub struct Csrf {
    policy: Policy,
    /// `http.<hcm prefix>.csrf.*`
    stats: crate::stats::NamedCounters,
}

fn build(a: &Any, hcm_prefix: &str, path: &str) -> Result<Arc<dyn HttpFilter>> {
    let p: pb::CsrfPolicy = super::decode(a, path)?;
    Ok(Arc::new(Csrf {
        policy: Policy::from_proto(&p, path)?,
        stats: crate::stats::NamedCounters::new(format!("http.{hcm_prefix}.csrf.")),
    }))
}

fn per_route(a: &Any, path: &str) -> Result<PerRoute> {
    let p: pb::CsrfPolicy = super::decode(a, path)?;
    Ok(Arc::new(Policy::from_proto(&p, path)?))
}

/// The host and port of a header holding a URL, or the value itself.
fn host_and_port(v: &str) -> &str {
    match v.split_once("://") {
        Some((_, rest)) => rest.split(['/', '?', '#']).next().unwrap_or(""),
        None => v,
    }
}

#[async_trait::async_trait]
impl HttpFilter for Csrf {
    async fn on_request(&self, rq: &mut RequestInfo<'_>, _state: &mut Option<State>) -> Flow {
        let route: Option<Arc<Policy>> = rq.all_levels::<Policy>().next();
        let policy = route.as_deref().unwrap_or(&self.policy);
        let enabled = policy.enabled.roll(rq.runtime);
        let shadow = policy.shadow.as_ref().is_some_and(|s| s.roll(rq.runtime));
        if !enabled && !shadow {
            return Flow::Continue;
        }
        use http::Method;
        if !matches!(
            rq.req.method,
            Method::POST | Method::PUT | Method::DELETE | Method::PATCH
        ) {
            return Flow::Continue;
        }
        let header = |n: http::HeaderName| {
            rq.req
                .headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .map(host_and_port)
        };
        let count = |n: &'static str| self.stats.increment(n);
        let source = header(http::header::ORIGIN)
            .or_else(|| header(http::header::REFERER))
            .unwrap_or("");
        let target = rq.authority();
        let valid = if source.is_empty() {
            count("missing_source_origin");
            false
        } else if source == target || policy.additional.iter().any(|m| m.matches(source)) {
            true
        } else {
            count("request_invalid");
            false
        };
        if valid {
            count("request_valid");
            return Flow::Continue;
        }
        if !enabled {
            return Flow::Continue;
        }
        Flow::Reply(FilterReply::new(
            403,
            "Invalid origin",
            "csrf_origin_mismatch",
        ))
    }
}
