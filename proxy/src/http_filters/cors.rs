//! `envoy.filters.http.cors`: answers CORS preflights itself and adds the
//! `access-control-*` headers to responses for allowed origins. Policies
//! come from the routes' `typed_per_filter_config` (`CorsPolicy`); each
//! property is taken from the most specific level that sets it, and the
//! most specific policy alone says whether CORS is enabled.

use super::{
    Factory, FilterReply, Flow, Fraction, HttpFilter, PerRoute, RequestInfo, ResponseInfo, State,
};
use crate::config::matcher::StringMatcher;
use crate::config::{index, ConfigError, Result, Wrapped};
use crate::registry::MessageSupport;
use http::{HeaderName, HeaderValue};
use legate_proto::envoy_types::pb::envoy::extensions::filters::http::cors::v3 as pb;
use legate_proto::envoy_types::pb::google::protobuf::Any;
use metrics::Counter;
use pingora_http::ResponseHeader;
use std::sync::{Arc, OnceLock};

const TYPE: &str = "envoy.extensions.filters.http.cors.v3.Cors";
const POLICY_TYPE: &str = "envoy.extensions.filters.http.cors.v3.CorsPolicy";

pub static FACTORY: Factory = Factory {
    type_name: TYPE,
    build,
    per_route: &[(POLICY_TYPE, per_route)],
};

pub static REGISTRY: &[MessageSupport] = &[
    MessageSupport {
        message: TYPE,
        supported: &[],
        warn: &[],
    },
    MessageSupport {
        message: POLICY_TYPE,
        supported: &[
            "allow_origin_string_match",
            "allow_methods",
            "allow_headers",
            "expose_headers",
            "max_age",
            "allow_credentials",
            "filter_enabled",
            "shadow_enabled",
            "allow_private_network_access",
            "forward_not_matching_preflights",
        ],
        warn: &[],
    },
];

/// One level's `CorsPolicy`.
#[derive(Debug)]
pub struct Policy {
    origins: Vec<StringMatcher>,
    methods: String,
    headers: String,
    expose: String,
    max_age: String,
    credentials: Option<bool>,
    private_network: Option<bool>,
    forward_not_matching: Option<bool>,
    enabled: Fraction,
    /// None: no shadow policy.
    shadow: Option<Fraction>,
}

impl Policy {
    pub fn from_proto(p: &pb::CorsPolicy, path: &str) -> Result<Self> {
        let origins = p
            .allow_origin_string_match
            .iter()
            .enumerate()
            .map(|(i, m)| {
                StringMatcher::from_proto(m, &index(path, "allow_origin_string_match", i))
            })
            .collect::<Result<_>>()?;
        for (field, v) in [
            ("allow_methods", &p.allow_methods),
            ("allow_headers", &p.allow_headers),
            ("expose_headers", &p.expose_headers),
            ("max_age", &p.max_age),
        ] {
            if HeaderValue::from_str(v).is_err() {
                return Err(ConfigError::new(
                    crate::config::join(path, field),
                    "not a valid header value",
                ));
            }
        }
        Ok(Self {
            origins,
            methods: p.allow_methods.clone(),
            headers: p.allow_headers.clone(),
            expose: p.expose_headers.clone(),
            max_age: p.max_age.clone(),
            credentials: p.allow_credentials.val(),
            private_network: p.allow_private_network_access.val(),
            forward_not_matching: p.forward_not_matching_preflights.val(),
            enabled: Fraction::from_proto(p.filter_enabled.as_ref(), Fraction::ALWAYS),
            shadow: p
                .shadow_enabled
                .as_ref()
                .map(|s| Fraction::from_proto(Some(s), Fraction::ALWAYS)),
        })
    }
}

/// The policies that apply, most specific first; each property is the
/// first level's that sets it.
struct Policies(Vec<Arc<Policy>>);

impl Policies {
    fn first<'a, T>(&'a self, f: impl Fn(&'a Policy) -> Option<T>) -> Option<T> {
        self.0.iter().find_map(|p| f(p))
    }
    fn text(&self, f: impl Fn(&Policy) -> &String) -> Option<&str> {
        self.0.iter().map(|p| f(p).as_str()).find(|s| !s.is_empty())
    }
    fn credentials(&self) -> bool {
        self.first(|p| p.credentials).unwrap_or(false)
    }
    fn origin_allowed(&self, origin: &str) -> bool {
        let origins = self.0.iter().map(|p| &p.origins).find(|o| !o.is_empty());
        origins.is_some_and(|os| os.iter().any(|m| m.matches("*") || m.matches(origin)))
    }
}

#[derive(Debug)]
struct Stats {
    origin_valid: Counter,
    origin_invalid: Counter,
}

#[derive(Debug)]
pub struct Cors {
    prefix: String,
    stats: OnceLock<Stats>,
}

impl Cors {
    fn stats(&self) -> &Stats {
        self.stats.get_or_init(|| Stats {
            origin_valid: crate::stats::counter(format!("{}origin_valid", self.prefix)),
            origin_invalid: crate::stats::counter(format!("{}origin_invalid", self.prefix)),
        })
    }
}

/// A CORS request from an allowed origin: the response gets the headers.
struct Allowed {
    origin: HeaderValue,
    policies: Policies,
}

fn header(name: &'static str, v: &str) -> Option<(HeaderName, HeaderValue)> {
    Some((
        HeaderName::from_static(name),
        HeaderValue::from_str(v).ok()?,
    ))
}

#[async_trait::async_trait]
impl HttpFilter for Cors {
    async fn on_request(&self, rq: &mut RequestInfo<'_>, state: &mut Option<State>) -> Flow {
        // Only routes that forward have a route entry, which Envoy's CORS
        // needs: a direct response or redirect gets no CORS headers.
        if !rq.forwards {
            return Flow::Continue;
        }
        let policies = Policies(rq.all_levels::<Policy>().collect());
        let Some(top) = policies.0.first() else {
            return Flow::Continue;
        };
        let enabled = top.enabled.roll(rq.runtime);
        let shadow = top.shadow.as_ref().is_some_and(|s| s.roll(rq.runtime));
        if !enabled && !shadow {
            return Flow::Continue;
        }
        let Some(origin) = rq
            .req
            .headers
            .get(http::header::ORIGIN)
            .filter(|o| !o.is_empty())
            .cloned()
        else {
            return Flow::Continue;
        };
        let allowed = policies.origin_allowed(origin.to_str().unwrap_or(""));
        if allowed {
            self.stats().origin_valid.increment(1);
        } else {
            self.stats().origin_invalid.increment(1);
        }
        if !enabled {
            return Flow::Continue;
        }
        let request_method = rq
            .req
            .headers
            .get(http::header::ACCESS_CONTROL_REQUEST_METHOD)
            .filter(|v| !v.is_empty())
            .cloned();
        let preflight = rq.req.method == http::Method::OPTIONS && request_method.is_some();
        if !preflight || (!allowed && policies.first(|p| p.forward_not_matching).unwrap_or(true)) {
            if allowed {
                *state = Some(Box::new(Allowed { origin, policies }));
            }
            return Flow::Continue;
        }
        let reply = preflight_reply(
            rq,
            &policies,
            allowed.then_some(origin.clone()),
            request_method,
        );
        // The preflight passes this filter's own response side too (it adds
        // the expose headers there), as Envoy's does.
        if allowed {
            *state = Some(Box::new(Allowed { origin, policies }));
        }
        Flow::Reply(reply)
    }

    fn on_response(
        &self,
        resp: &mut ResponseHeader,
        _info: &ResponseInfo<'_>,
        state: Option<&State>,
    ) {
        let Some(a) = state.and_then(|s| s.downcast_ref::<Allowed>()) else {
            return;
        };
        let _ = resp.insert_header(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, a.origin.clone());
        if a.policies.credentials() {
            let _ = resp.insert_header(http::header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true");
        }
        if let Some(e) = a.policies.text(|p| &p.expose) {
            let _ = resp.insert_header(http::header::ACCESS_CONTROL_EXPOSE_HEADERS, e);
        }
    }
}

/// Envoy's answer to a preflight: 200, no body, the allowed origin,
/// methods, headers, max age and credentials.
fn preflight_reply(
    rq: &RequestInfo<'_>,
    policies: &Policies,
    origin: Option<HeaderValue>,
    request_method: Option<HeaderValue>,
) -> FilterReply {
    let mut r = FilterReply::new(200, "", "cors_response");
    let req = &rq.req.headers;
    let echo = |name: http::HeaderName| {
        req.get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    if let Some(o) = origin {
        r.headers
            .push((http::header::ACCESS_CONTROL_ALLOW_ORIGIN, o));
    }
    if policies.credentials() {
        r.headers
            .extend(header("access-control-allow-credentials", "true"));
    }
    if let Some(m) = policies.text(|p| &p.methods) {
        let v = if m == "*" {
            request_method
                .and_then(|v| v.to_str().ok().map(str::to_string))
                .unwrap_or_default()
        } else {
            m.to_string()
        };
        r.headers.extend(header("access-control-allow-methods", &v));
    }
    if let Some(h) = policies.text(|p| &p.headers) {
        let v = if h == "*" {
            echo(http::header::ACCESS_CONTROL_REQUEST_HEADERS)
        } else {
            h.to_string()
        };
        r.headers.extend(header("access-control-allow-headers", &v));
    }
    if let Some(m) = policies.text(|p| &p.max_age) {
        r.headers.extend(header("access-control-max-age", m));
    }
    if policies.first(|p| p.private_network).unwrap_or(false)
        && req
            .get("access-control-request-private-network")
            .is_some_and(|v| v == "true")
    {
        r.headers
            .extend(header("access-control-allow-private-network", "true"));
    }
    r
}

fn build(a: &Any, hcm_prefix: &str, path: &str) -> Result<Arc<dyn HttpFilter>> {
    let _: pb::Cors = super::decode(a, path)?;
    Ok(Arc::new(Cors {
        prefix: format!("http.{hcm_prefix}.cors."),
        stats: OnceLock::new(),
    }))
}

fn per_route(a: &Any, path: &str) -> Result<PerRoute> {
    let p: pb::CorsPolicy = super::decode(a, path)?;
    Ok(Arc::new(Policy::from_proto(&p, path)?))
}
