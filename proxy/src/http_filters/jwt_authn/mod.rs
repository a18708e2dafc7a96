//! `envoy.filters.http.jwt_authn`: JSON Web Tokens checked against each
//! provider's keys (local or fetched through a cluster), by the
//! requirement a route's `PerRouteConfig` names or the first of `rules`
//! that matches. A request that fails its requirement gets 401 (403 when
//! only the audience is wrong) with the reason as the body and a
//! `www-authenticate: Bearer` challenge; a verified token can be forwarded
//! as a payload header, claims as headers, and its payload as dynamic
//! metadata.
//!
//! - `config`: the translation; `extract`: where tokens are; `token` and
//!   `jwks`: parsing and signatures; `remote`: fetched key sets;
//!   `cache`: verified tokens; `status`: the failure reasons.

mod cache;
mod config;
mod extract;
mod jwks;
mod remote;
mod status;
mod token;

use super::{Factory, FilterReply, Flow, HttpFilter, PerRoute, RequestInfo, State};
use crate::config::Result;
use crate::registry::MessageSupport;
use base64::Engine;
use config::{Config, KeySource, Provider, Requirement};
use extract::{Extractor, Location};
use futures_util::future::BoxFuture;
use legate_proto::envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3 as pb;
use legate_proto::envoy_types::pb::google::protobuf::Any;
use serde_json::{Map, Value};
use status::Status;
use std::sync::Arc;
use token::Jwt;

const TYPE: &str = "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication";
const PER_ROUTE_TYPE: &str = "envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig";
/// The dynamic metadata namespace the filter writes.
pub const NAMESPACE: &str = "envoy.filters.http.jwt_authn";

pub static FACTORY: Factory = Factory {
    type_name: TYPE,
    build,
    per_route: &[(PER_ROUTE_TYPE, per_route)],
};

pub static REGISTRY: &[MessageSupport] = &[
    MessageSupport {
        message: TYPE,
        supported: &[
            "providers",
            "rules",
            "requirement_map",
            "bypass_cors_preflight",
            "strip_failure_response",
            "stat_prefix",
        ],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.jwt_authn.v3.JwtProvider",
        supported: &[
            "issuer",
            "audiences",
            "subjects",
            "require_expiration",
            "max_lifetime",
            "remote_jwks",
            "local_jwks",
            "forward",
            "from_headers",
            "from_params",
            "from_cookies",
            "forward_payload_header",
            "pad_forward_payload_header",
            "payload_in_metadata",
            "normalize_payload_in_metadata",
            "header_in_metadata",
            "failed_status_in_metadata",
            "clock_skew_seconds",
            "jwt_cache_config",
            "claim_to_headers",
            "clear_route_cache",
        ],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.jwt_authn.v3.JwtProvider.NormalizePayload",
        supported: &["space_delimited_claims"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.jwt_authn.v3.RemoteJwks",
                supported: &["http_uri", "cache_duration", "async_fetch", "retry_policy"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.core.v3.RetryPolicy",
        supported: &["retry_back_off", "num_retries", "retry_on"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.core.v3.BackoffStrategy",
        supported: &["base_interval", "max_interval"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.jwt_authn.v3.JwksAsyncFetch",
        // The first fetch waits for the first request rather than holding
        // the listener back: same keys, fetched a moment later.
        supported: &["failed_refetch_duration"],
        warn: &[(
            "fast_listener",
            "the first fetch runs with the first request that needs the keys, whether or not the listener waits",
        )],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.jwt_authn.v3.JwtCacheConfig",
        supported: &["jwt_cache_size", "jwt_max_token_size"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.jwt_authn.v3.JwtHeader",
        supported: &["name", "value_prefix"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.jwt_authn.v3.JwtClaimToHeader",
        supported: &["header_name", "claim_name", "claim_path"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.jwt_authn.v3.JwtClaimToHeader.PathSegment",
        supported: &["key"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.jwt_authn.v3.JwtRequirement",
        supported: &[
            "provider_name",
            "provider_and_audiences",
            "requires_any",
            "requires_all",
            "allow_missing_or_failed",
            "allow_missing",
        ],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.jwt_authn.v3.ProviderWithAudiences",
        supported: &["provider_name", "audiences"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.jwt_authn.v3.JwtRequirementOrList",
        supported: &["requirements"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.jwt_authn.v3.JwtRequirementAndList",
        supported: &["requirements"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.jwt_authn.v3.RequirementRule",
        supported: &["match", "requires", "requirement_name"],
        warn: &[],
    },
    MessageSupport {
        message: PER_ROUTE_TYPE,
        supported: &["disabled", "requirement_name"],
        warn: &[],
    },
];

#[derive(Debug)]
pub struct JwtAuthn {
    config: Config,
    stats: Arc<Stats>,
}

/// `http.<hcm prefix>.jwt_authn.[<stat_prefix>.]*`
#[derive(Debug)]
struct Stats(crate::stats::NamedCounters);

impl remote::FetchStats for Stats {
    fn fetched(&self, ok: bool) {
        self.0.increment(if ok {
            "jwks_fetch_success"
        } else {
            "jwks_fetch_failed"
        });
    }
}

fn build(a: &Any, hcm_prefix: &str, path: &str) -> Result<Arc<dyn HttpFilter>> {
    let c: pb::JwtAuthentication = super::decode(a, path)?;
    let mut prefix = format!("http.{hcm_prefix}.jwt_authn.");
    if !c.stat_prefix.is_empty() {
        prefix.push_str(&c.stat_prefix);
        prefix.push('.');
    }
    Ok(Arc::new(JwtAuthn {
        config: Config::from_proto(&c, path)?,
        stats: Arc::new(Stats(crate::stats::NamedCounters::new(prefix))),
    }))
}

fn per_route(a: &Any, path: &str) -> Result<PerRoute> {
    let c: pb::PerRouteConfig = super::decode(a, path)?;
    Ok(Arc::new(config::PerRoute::from_proto(&c, path)?))
}

/// How an authenticator treats its tokens' failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Every token must pass; none is `JwtMissed`.
    Strict,
    /// No token is fine; otherwise the last token checked decides.
    AllowMissing,
    /// Always satisfied; good tokens still produce their outputs.
    AllowFailed,
}

/// What verified tokens leave for the rest of the request: the filter's
/// dynamic metadata.
#[derive(Debug, Default)]
struct Outputs {
    metadata: Map<String, Value>,
}

/// A token taken out of the request, so the request can change while it
/// is checked.
struct Found {
    value: String,
    location: Location,
    issuers: extract::Issuers,
}

fn now() -> (u64, f64) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs(), d.as_secs_f64())
}

impl JwtAuthn {
    /// The requirement for this request: the route's `PerRouteConfig`,
    /// else the first rule that matches. Err: the route names a
    /// requirement that does not exist.
    fn requirement(
        &self,
        rq: &RequestInfo<'_>,
    ) -> std::result::Result<Option<Arc<Requirement>>, String> {
        if let Some(pr) = rq.all_levels::<config::PerRoute>().next() {
            return match &*pr {
                config::PerRoute::Disabled => Ok(None),
                config::PerRoute::RequirementName(n) => self
                    .config
                    .requirement_map
                    .get(n)
                    .cloned()
                    .map(Some)
                    .ok_or_else(|| self.config.wrong_name(n)),
            };
        }
        if self.config.rules.is_empty() {
            return Ok(None);
        }
        let path = rq.req.uri.path_and_query().map_or("/", |p| p.as_str());
        let view = crate::routing::RequestView {
            path,
            headers: &rq.req.headers,
            random: 0,
            runtime: rq.runtime,
            pseudo: crate::config::matcher::Pseudo {
                method: rq.req.method.as_str(),
                path,
                authority: rq.authority(),
                scheme: rq.scheme,
                status: None,
            },
        };
        Ok(self
            .config
            .rules
            .iter()
            .find(|r| crate::routing::route_matches(&r.matcher, &view, &mut None))
            .and_then(|r| r.requires.clone()))
    }

    fn verify<'a, 'r>(
        &'a self,
        r: &'a Requirement,
        rq: &'a mut RequestInfo<'r>,
        out: &'a mut Outputs,
    ) -> BoxFuture<'a, std::result::Result<(), Status>>
    where
        'r: 'a,
    {
        Box::pin(async move {
            match r {
                Requirement::Pass => Ok(()),
                Requirement::Provider {
                    provider,
                    audiences,
                    extractor,
                } => {
                    let p = Some((provider, audiences.as_deref()));
                    self.authenticate(extractor, p, Mode::Strict, rq, out).await
                }
                Requirement::All(children) => {
                    for c in children {
                        self.verify(c, rq, out).await?;
                    }
                    Ok(())
                }
                Requirement::Any {
                    children,
                    allow_missing,
                    allow_failed,
                } => {
                    let mut last = Status::JwtMissed;
                    for c in children {
                        match self.verify(c, rq, out).await {
                            Ok(()) => return Ok(()),
                            // A real failure outranks a missing token or
                            // an unknown issuer; the last one wins.
                            Err(s) => {
                                let weak =
                                    matches!(s, Status::JwtMissed | Status::JwtUnknownIssuer);
                                if !weak || last == Status::JwtMissed {
                                    last = s;
                                }
                            }
                        }
                    }
                    if *allow_failed || (*allow_missing && last == Status::JwtMissed) {
                        Ok(())
                    } else {
                        Err(last)
                    }
                }
                Requirement::AllowMissing {
                    failed_too,
                    extractor,
                } => {
                    let mode = if *failed_too {
                        Mode::AllowFailed
                    } else {
                        Mode::AllowMissing
                    };
                    self.authenticate(extractor, None, mode, rq, out).await
                }
            }
        })
    }

    /// Checks the tokens `extractor` finds, last found first, as Envoy's
    /// authenticator pops them.
    async fn authenticate(
        &self,
        extractor: &Extractor,
        provider: Option<(&Arc<Provider>, Option<&[String]>)>,
        mode: Mode,
        rq: &mut RequestInfo<'_>,
        out: &mut Outputs,
    ) -> std::result::Result<(), Status> {
        extractor.sanitize(rq.req);
        let found: Vec<Found> = extractor
            .extract(rq.req)
            .into_iter()
            .map(|t| Found {
                value: t.value,
                location: t.location.clone(),
                issuers: t.issuers.clone(),
            })
            .collect();
        if found.is_empty() {
            let only = match self.config.providers.as_slice() {
                [p] => Some(p.clone()),
                _ => None,
            };
            self.failed_status(only.as_deref(), Status::JwtMissed, out);
            return match mode {
                Mode::Strict => Err(Status::JwtMissed),
                _ => Ok(()),
            };
        }
        let mut last = Ok(());
        for t in found.iter().rev() {
            let (result, used) = self.check(t, extractor, provider, rq, out).await;
            if let Err(s) = result {
                let only = match self.config.providers.as_slice() {
                    [p] => Some(p),
                    _ => None,
                };
                self.failed_status(used.as_deref().or(only.map(|p| &**p)), s, out);
            }
            match mode {
                Mode::Strict => result?,
                Mode::AllowFailed => {}
                Mode::AllowMissing => last = result,
            }
        }
        last
    }

    /// `failed_status_in_metadata`: the failure's code and message.
    fn failed_status(&self, p: Option<&Provider>, s: Status, out: &mut Outputs) {
        if let Some(p) = p.filter(|p| !p.failed_status_in_metadata.is_empty()) {
            out.metadata.insert(
                p.failed_status_in_metadata.clone(),
                serde_json::json!({"code": s.code(), "message": s.to_string()}),
            );
        }
    }

    /// One token, in Envoy's order of checks; on success its outputs.
    /// Also returns the provider that checked it, once known.
    async fn check(
        &self,
        t: &Found,
        extractor: &Extractor,
        provider: Option<(&Arc<Provider>, Option<&[String]>)>,
        rq: &mut RequestInfo<'_>,
        out: &mut Outputs,
    ) -> (std::result::Result<(), Status>, Option<Arc<Provider>>) {
        let (secs, exact) = now();
        let mut cached = None;
        if let Some((p, _)) = provider {
            cached = p.cache.as_ref().and_then(|c| c.lookup(&t.value, secs));
            self.stats.0.increment(if cached.is_some() {
                "jwt_cache_hit"
            } else {
                "jwt_cache_miss"
            });
        }
        let jwt = match cached.clone() {
            Some(j) => j,
            None => match Jwt::parse(&t.value) {
                Ok(j) => Arc::new(j),
                Err(s) => return (Err(s), provider.map(|(p, _)| p.clone())),
            },
        };
        if !t.issuers.allows(&jwt.iss) {
            return (
                Err(Status::JwtUnknownIssuer),
                provider.map(|(p, _)| p.clone()),
            );
        }
        let p = match provider {
            Some((p, _)) => p.clone(),
            None => match by_issuer(&extractor.providers, &jwt.iss) {
                Some(p) => p,
                None => return (Err(Status::JwtUnknownIssuer), None),
            },
        };
        let audiences = provider.and_then(|(_, a)| a).unwrap_or(&p.audiences);
        let r = self
            .claims_and_keys(&jwt, &p, audiences, (secs, exact), cached.is_none(), rq)
            .await;
        if r.is_ok() {
            if cached.is_none() && provider.is_some() {
                if let Some(c) = &p.cache {
                    c.insert(&t.value, jwt.clone());
                }
            }
            good_jwt(&jwt, &p, &t.location, rq, out);
        }
        (r, Some(p))
    }

    /// Time, audience, subject, lifetime, then the signature (unless the
    /// token came from the cache).
    async fn claims_and_keys(
        &self,
        jwt: &Jwt,
        p: &Provider,
        audiences: &[String],
        (secs, exact): (u64, f64),
        check_signature: bool,
        rq: &RequestInfo<'_>,
    ) -> std::result::Result<(), Status> {
        jwt.check_time(secs, p.clock_skew)?;
        if !token::audiences_allowed(audiences, &jwt.audiences) {
            return Err(Status::JwtAudienceNotAllowed);
        }
        if let Some(m) = &p.subjects {
            let sub = jwt.payload.get("sub").and_then(Value::as_str).unwrap_or("");
            if !m.matches(sub) {
                return Err(Status::JwtVerificationFail);
            }
        }
        if let Some(max) = p.max_lifetime {
            if jwt.exp == 0 || (jwt.exp as f64 - exact) >= max.as_secs_f64() {
                return Err(Status::JwtVerificationFail);
            }
        }
        if !check_signature {
            return Ok(());
        }
        match &p.keys {
            KeySource::Local(Some(keys)) => keys.verify(jwt),
            KeySource::Local(None) => Err(Status::JwksNoValidKeys),
            KeySource::Remote(r) => r.keys(rq.clusters, self.stats.clone()).await?.verify(jwt),
        }
    }

    fn deny(&self, status: u16, body: String, challenge: Option<String>, details: String) -> Flow {
        self.stats.0.increment("denied");
        let mut r = FilterReply::new(status, "", "");
        r.details = details.into();
        if !self.config.strip_failure_response {
            r.body = body.into();
            if let Some(v) = challenge.and_then(|c| http::HeaderValue::from_str(&c).ok()) {
                r.headers.push((http::header::WWW_AUTHENTICATE, v));
            }
        }
        Flow::Reply(r)
    }
}

/// The provider for a token checked by its issuer: the one with that
/// issuer, else (for a named issuer) one that names none.
fn by_issuer(providers: &[Arc<Provider>], iss: &str) -> Option<Arc<Provider>> {
    providers
        .iter()
        .find(|p| p.issuer == iss)
        .or_else(|| {
            (!iss.is_empty())
                .then(|| providers.iter().find(|p| p.issuer.is_empty()))
                .flatten()
        })
        .cloned()
}

/// A verified token's outputs: the payload header, claim headers, the
/// token's removal (`forward: false`) and metadata.
fn good_jwt(
    jwt: &Jwt,
    p: &Provider,
    location: &Location,
    rq: &mut RequestInfo<'_>,
    out: &mut Outputs,
) {
    if let Some(h) = &p.forward_payload_header {
        let mut v = jwt.payload_b64.clone();
        if p.pad_forward_payload_header {
            while !v.len().is_multiple_of(4) {
                v.push('=');
            }
        }
        if let Ok(v) = http::HeaderValue::from_str(&v) {
            let _ = rq.req.append_header(h.clone(), v);
        }
    }
    for (h, claim) in &p.claim_to_headers {
        let v = claim_value(&jwt.payload, claim).and_then(|v| http::HeaderValue::from_str(&v).ok());
        if let Some(v) = v {
            let _ = rq.req.append_header(h.clone(), v);
            // Routing may read the claim's header now.
            rq.clear_route_cache |= p.clear_route_cache;
        }
    }
    if !p.forward {
        extract::remove(rq.req, location);
    }
    if !p.header_in_metadata.is_empty() {
        out.metadata.insert(
            p.header_in_metadata.clone(),
            Value::Object(jwt.header.clone()),
        );
    }
    if !p.payload_in_metadata.is_empty() {
        let mut payload = jwt.payload.clone();
        for c in &p.space_delimited_claims {
            if let Some(Value::String(s)) = payload.get(c) {
                let parts: Vec<Value> = s
                    .split(' ')
                    .filter(|x| !x.is_empty())
                    .map(|x| Value::String(x.to_string()))
                    .collect();
                if !parts.is_empty() {
                    payload.insert(c.clone(), Value::Array(parts));
                }
            }
        }
        out.metadata
            .insert(p.payload_in_metadata.clone(), Value::Object(payload));
    }
}

/// A claim as Envoy writes it into a header: strings as they are (none
/// when empty), whole numbers in decimal, other numbers with six
/// decimals, booleans as words, objects and arrays as base64 of their
/// JSON.
fn claim_value(payload: &Map<String, Value>, path: &[String]) -> Option<String> {
    let (last, parents) = path.split_last()?;
    let mut m = payload;
    for k in parents {
        m = m.get(k)?.as_object()?;
    }
    match m.get(last)? {
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(match (n.as_u64(), n.as_f64()) {
            (Some(u), _) => u.to_string(),
            (None, Some(f))
                if (0.0..18_446_744_073_709_551_616.0).contains(&f) && f.fract() == 0.0 =>
            {
                (f as u64).to_string()
            }
            (_, f) => format!("{:.6}", f.unwrap_or(0.0)),
        }),
        Value::Bool(b) => Some(b.to_string()),
        v @ (Value::Object(_) | Value::Array(_)) => {
            Some(base64::engine::general_purpose::STANDARD.encode(v.to_string()))
        }
        Value::Null => None,
    }
}

/// Envoy's original URI for the challenge's realm: scheme, authority and
/// the first 256 bytes of the path (`x-envoy-original-path` if set).
fn original_uri(rq: &RequestInfo<'_>) -> String {
    let path = rq
        .req
        .headers
        .get("x-envoy-original-path")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| rq.req.uri.path_and_query().map_or("", |p| p.as_str()));
    let mut end = path.len().min(256);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}://{}{}", rq.scheme, rq.authority(), &path[..end])
}

fn is_preflight(req: &pingora_http::RequestHeader) -> bool {
    let non_empty = |h: &str| req.headers.get(h).is_some_and(|v| !v.is_empty());
    req.method == http::Method::OPTIONS
        && non_empty("origin")
        && non_empty("access-control-request-method")
}

#[async_trait::async_trait]
impl HttpFilter for JwtAuthn {
    async fn on_request(&self, rq: &mut RequestInfo<'_>, _state: &mut Option<State>) -> Flow {
        if self.config.bypass_cors_preflight && is_preflight(rq.req) {
            self.stats.0.increment("cors_preflight_bypassed");
            self.stats.0.increment("allowed");
            return Flow::Continue;
        }
        let requirement = match self.requirement(rq) {
            Ok(Some(r)) => r,
            Ok(None) => {
                self.stats.0.increment("allowed");
                return Flow::Continue;
            }
            Err(message) => {
                let details = status::details(&message);
                let body = format!("Failed JWT authentication: {message}");
                return self.deny(403, body, None, details);
            }
        };
        let uri = original_uri(rq);
        let mut out = Outputs::default();
        let result = self.verify(&requirement, rq, &mut out).await;
        if !out.metadata.is_empty() {
            let ns = rq
                .metadata
                .entry(NAMESPACE)
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(ns) = ns {
                ns.extend(out.metadata);
            }
        }
        match result {
            Ok(()) => {
                self.stats.0.increment("allowed");
                Flow::Continue
            }
            Err(s) => {
                let mut challenge = format!("Bearer realm=\"{uri}\"");
                if s != Status::JwtMissed {
                    challenge.push_str(", error=\"invalid_token\"");
                }
                let code = if s == Status::JwtAudienceNotAllowed {
                    403
                } else {
                    401
                };
                self.deny(code, s.to_string(), Some(challenge), s.details())
            }
        }
    }
}

#[cfg(test)]
mod tests;
