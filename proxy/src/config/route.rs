//! Route configuration: virtual hosts, routes and their actions.

use super::matcher::{CookieMatcher, FullRegex, HeaderMatcher, QueryMatcher};
use super::{duration, index, join, ConfigError, Result, Wrapped};
use crate::headers::HeaderOps;
use legate_proto::envoy_types::pb::envoy::config::core::v3 as core;
use legate_proto::envoy_types::pb::envoy::config::route::v3 as pb;
use std::time::Duration;

#[derive(Debug)]
pub struct RouteConfig {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHost>,
    pub headers: HeaderOps,
    pub ignore_port_in_host_matching: bool,
    pub most_specific_header_mutations_wins: bool,
    /// Whether routes to unknown clusters fail config loading (Envoy's
    /// default for inline route configs) or answer 503 at request time.
    pub validate_clusters: bool,
    /// `typed_per_filter_config`.
    pub filters: crate::http_filters::PerFilterConfigs,
}

impl RouteConfig {
    /// The SDS secrets its per-route filter configs read, at every level.
    pub fn sds_refs(&self) -> Vec<&(String, crate::config::source::XdsSource)> {
        let mut out: Vec<_> = self.filters.sds_refs().collect();
        for v in &self.virtual_hosts {
            out.extend(v.filters.sds_refs());
            for r in &v.routes {
                out.extend(r.filters.sds_refs());
                if let Action::Forward(ra) = &r.action {
                    if let ClusterSpec::Weighted(w) = &ra.cluster {
                        for c in &w.clusters {
                            out.extend(c.filters.sds_refs());
                        }
                    }
                }
            }
        }
        out
    }

    /// Every cluster named by a route (plain and weighted; not header-chosen).
    pub fn cluster_names(&self) -> impl Iterator<Item = &str> {
        self.virtual_hosts
            .iter()
            .flat_map(|v| v.routes.iter())
            .flat_map(|r| match &r.action {
                Action::Forward(ra) => match &ra.cluster {
                    ClusterSpec::Name(n) => vec![n.as_str()],
                    ClusterSpec::Weighted(w) => {
                        w.clusters.iter().map(|c| c.name.as_str()).collect()
                    }
                    ClusterSpec::Header(_) => vec![],
                },
                _ => vec![],
            })
    }
}

#[derive(Debug)]
pub struct VirtualHost {
    pub name: String,
    pub domains: Vec<String>,
    pub routes: Vec<Route>,
    pub headers: HeaderOps,
    pub retry_policy: Option<RetryPolicy>,
    pub filters: crate::http_filters::PerFilterConfigs,
    /// `rate_limits`, for the rate limit filters.
    pub rate_limits: Vec<crate::http_filters::rate_limit_actions::RateLimit>,
    /// `include_request_attempt_count`: `x-envoy-attempt-count` on each
    /// upstream request.
    pub attempt_count_upstream: bool,
    /// `include_attempt_count_in_response`: the same on the response.
    pub attempt_count_downstream: bool,
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub matcher: RouteMatch,
    pub action: Action,
    pub headers: HeaderOps,
    pub filters: crate::http_filters::PerFilterConfigs,
    /// `tracing` (sampling overrides) and `decorator`.
    pub tracing: crate::trace::RouteTracing,
    /// `metadata`, for the filters that send it on (ext_authz's
    /// `route_metadata_context_namespaces`).
    pub metadata:
        Option<std::sync::Arc<legate_proto::envoy_types::pb::envoy::config::core::v3::Metadata>>,
}

#[derive(Debug)]
pub enum PathMatch {
    Prefix(String),
    Path(String),
    Regex(FullRegex),
    SeparatedPrefix(String),
    /// uri_template path_match_policy, compiled to a regex.
    Template(FullRegex),
}

#[derive(Debug)]
pub struct RouteMatch {
    pub path: PathMatch,
    pub case_sensitive: bool,
    pub headers: Vec<HeaderMatcher>,
    pub query: Vec<QueryMatcher>,
    pub cookies: Vec<CookieMatcher>,
    pub grpc: bool,
    /// (runtime key, default numerator per million).
    pub runtime_fraction: Option<(String, u32)>,
}

// Built once per route config; the forward action's size is no cost.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Action {
    Forward(RouteAction),
    Redirect(Redirect),
    Direct(DirectResponse),
}

#[derive(Debug)]
pub enum ClusterSpec {
    Name(String),
    Header(http::HeaderName),
    Weighted(WeightedClusters),
}

#[derive(Debug)]
pub struct WeightedClusters {
    pub clusters: Vec<WeightedCluster>,
    pub total: u64,
    /// `use_hash_policy`: the route's hash policy, when it yields a hash,
    /// picks the cluster instead of a random value.
    pub use_hash_policy: bool,
}

#[derive(Debug)]
pub struct WeightedCluster {
    pub name: String,
    pub weight: u64,
    pub headers: HeaderOps,
    pub host_rewrite_literal: Option<String>,
    pub filters: crate::http_filters::PerFilterConfigs,
}

#[derive(Debug)]
pub enum HostRewrite {
    Literal(String),
    Auto,
    Header(http::HeaderName),
    /// `host_rewrite_path_regex`: every match in the request's path (no
    /// query) replaced; an empty result leaves the host.
    PathRegex(FullRegex, String),
}

#[derive(Debug)]
pub struct RouteAction {
    pub cluster: ClusterSpec,
    pub cluster_not_found_code: u16,
    pub prefix_rewrite: Option<String>,
    pub regex_rewrite: Option<(FullRegex, String)>,
    pub host_rewrite: Option<HostRewrite>,
    /// Upstream timeout; `None` = disabled. Envoy's default is 15 s.
    pub timeout: Option<Duration>,
    /// `idle_timeout`: replaces the connection manager's
    /// `stream_idle_timeout` for this route when set (`Some(None)`: 0s,
    /// disabled).
    pub idle_timeout: Option<Option<Duration>>,
    /// `max_stream_duration`: the stream's whole-life limit, from the
    /// route or a gRPC request's `grpc-timeout`.
    pub stream_duration: Option<StreamDuration>,
    /// The deprecated `max_grpc_timeout` (with `grpc_timeout_offset`): a
    /// gRPC request's `grpc-timeout` replaces `timeout`.
    pub grpc_timeout: Option<GrpcTimeout>,
    pub retry_policy: Option<RetryPolicy>,
    pub hash_policy: Vec<HashPolicy>,
    /// `upgrade_configs`: per upgrade type (lower case), whether this route
    /// allows it, overriding the connection manager's.
    pub upgrades: Vec<(String, bool)>,
    /// A host rewrite appends the original host to `x-forwarded-host`.
    pub append_x_forwarded_host: bool,
    /// `rate_limits`, for the rate limit filters.
    pub rate_limits: Vec<crate::http_filters::rate_limit_actions::RateLimit>,
    /// `include_vh_rate_limits`.
    pub include_vh_rate_limits: bool,
    /// `request_mirror_policies`.
    pub mirrors: Vec<MirrorPolicy>,
}

/// One `request_mirror_policies` entry.
#[derive(Debug)]
pub struct MirrorPolicy {
    pub cluster: MirrorCluster,
    /// (runtime key, default parts per million); None: always.
    pub fraction: Option<(String, u32)>,
    /// `disable_shadow_host_suffix_append`.
    pub disable_suffix: bool,
    /// `host_rewrite_literal`: the copy's host.
    pub host_rewrite: Option<String>,
}

#[derive(Debug)]
pub enum MirrorCluster {
    Name(String),
    /// `cluster_header`: the cluster the request's header names.
    Header(http::HeaderName),
}

impl MirrorPolicy {
    fn from_proto(m: &pb::route_action::RequestMirrorPolicy, path: &str) -> Result<Self> {
        if !m.request_headers_mutations.is_empty() {
            return Err(ConfigError::new(
                join(path, "request_headers_mutations"),
                "not supported by Legate yet",
            ));
        }
        let cluster = match (m.cluster.is_empty(), m.cluster_header.is_empty()) {
            (false, true) => MirrorCluster::Name(m.cluster.clone()),
            (true, false) => MirrorCluster::Header(crate::headers::header_name(
                &m.cluster_header,
                &join(path, "cluster_header"),
            )?),
            _ => {
                return Err(ConfigError::new(
                    path,
                    "exactly one of cluster and cluster_header is required",
                ))
            }
        };
        Ok(MirrorPolicy {
            cluster,
            fraction: m.runtime_fraction.as_ref().map(|rf| {
                let d = rf.default_value.unwrap_or_default();
                (rf.runtime_key.clone(), crate::runtime::per_million(&d))
            }),
            disable_suffix: m.disable_shadow_host_suffix_append,
            host_rewrite: (!m.host_rewrite_literal.is_empty())
                .then(|| m.host_rewrite_literal.clone()),
        })
    }
}

#[derive(Debug, Clone)]
pub enum HashPolicy {
    Header {
        name: http::HeaderName,
        terminal: bool,
    },
    SourceIp {
        terminal: bool,
    },
    Query {
        name: String,
        terminal: bool,
    },
    /// A cookie's value; when the request has none and `ttl` is set, the
    /// router makes one (Set-Cookie on the response) and hashes that.
    Cookie {
        cookie: CookiePolicy,
        terminal: bool,
    },
}

#[derive(Debug, Clone)]
pub struct CookiePolicy {
    pub name: String,
    /// None: never generated; zero: a session cookie.
    pub ttl: Option<Duration>,
    pub path: String,
    pub attributes: Vec<(String, String)>,
}

impl CookiePolicy {
    /// The Set-Cookie value Envoy writes for a generated cookie.
    pub fn set_cookie(&self, value: &str, max_age: Duration) -> String {
        let mut s = format!("{}=\"{value}\"", self.name);
        if !max_age.is_zero() {
            s.push_str(&format!("; Max-Age={}", max_age.as_secs()));
        }
        if !self.path.is_empty() {
            s.push_str(&format!("; Path={}", self.path));
        }
        for (k, v) in &self.attributes {
            if v.is_empty() {
                s.push_str(&format!("; {k}"));
            } else {
                s.push_str(&format!("; {k}={v}"));
            }
        }
        s.push_str("; HttpOnly");
        s
    }
}

#[derive(Debug, Clone, Default)]
pub struct RetryOn {
    pub r5xx: bool,
    /// Only resets before the request was sent (connection failures here).
    pub reset_before_request: bool,
    pub gateway_error: bool,
    pub reset: bool,
    pub connect_failure: bool,
    pub retriable_4xx: bool,
    pub refused_stream: bool,
    pub retriable_status_codes: bool,
    pub retriable_headers: bool,
    /// gRPC conditions (`cancelled`, `deadline-exceeded`, `internal`,
    /// `resource-exhausted`, `unavailable`): the `grpc-status` codes of a
    /// response's headers that are retried.
    pub grpc_statuses: Vec<u32>,
}

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub retry_on: RetryOn,
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
    pub base_interval: Duration,
    pub max_interval: Duration,
    pub retriable_status_codes: Vec<u16>,
    pub retriable_headers: Vec<HeaderMatcher>,
    pub previous_hosts: bool,
    /// Host selection attempts with the previous_hosts predicate:
    /// `host_selection_retry_max_attempts` (default 1) + 1, as in Envoy.
    pub host_selection_attempts: Option<u32>,
    /// `envoy.retry_priorities.previous_priorities`: its update frequency.
    pub previous_priorities: Option<u32>,
}

#[derive(Debug)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<String>,
    pub prefix_rewrite: Option<String>,
    pub regex_rewrite: Option<(FullRegex, String)>,
    pub code: u16,
    pub strip_query: bool,
}

#[derive(Debug)]
pub struct DirectResponse {
    pub status: u16,
    pub body: Option<bytes::Bytes>,
    /// `body_format`: the body sent instead, and its content type.
    pub body_format: Option<BodyFormat>,
}

/// A direct response's `body_format`: literal text around
/// `%LOCAL_REPLY_BODY%` (the configured body).
#[derive(Debug, Clone, PartialEq)]
pub struct BodyFormat {
    /// Literal bytes, or None where the configured body goes.
    parts: Vec<Option<Vec<u8>>>,
    pub content_type: Option<String>,
}

impl BodyFormat {
    pub fn from_proto(f: &core::SubstitutionFormatString, path: &str) -> Result<Self> {
        use core::substitution_format_string::Format as F;
        let (bytes, p) = match &f.format {
            Some(F::TextFormat(t)) => (t.as_bytes().to_vec(), join(path, "text_format")),
            Some(F::TextFormatSource(ds)) => {
                let p = join(path, "text_format_source");
                (crate::datasource::read(ds, &p)?.to_vec(), p)
            }
            _ => {
                return Err(ConfigError::new(
                    path,
                    "only text formats are supported in a direct response's body_format",
                ))
            }
        };
        // A body that is not text (an image) is sent as it is.
        let parts = match std::str::from_utf8(&bytes) {
            Err(_) => vec![Some(bytes.clone())],
            Ok(text) => crate::headers::parse_pieces(
                text,
                &p,
                |l| Some(l.into_bytes()),
                |cmd| {
                    match cmd {
                    "LOCAL_REPLY_BODY" => Ok(None),
                    other => Err(ConfigError::new(
                        &p,
                        format!("%{other}% is not supported in a direct response's body_format (only %LOCAL_REPLY_BODY%)"),
                    )),
                }
                },
            )?,
        };
        if !f.content_type.is_empty() && http::HeaderValue::from_str(&f.content_type).is_err() {
            return Err(ConfigError::new(
                join(path, "content_type"),
                "not a valid header value",
            ));
        }
        Ok(Self {
            parts,
            content_type: (!f.content_type.is_empty()).then(|| f.content_type.clone()),
        })
    }

    /// The body, with the configured one where the format names it.
    pub fn render(&self, body: &[u8]) -> bytes::Bytes {
        let mut out = Vec::new();
        for p in &self.parts {
            match p {
                Some(text) => out.extend_from_slice(text),
                None => out.extend_from_slice(body),
            }
        }
        out.into()
    }
}

fn header_ops(
    add: &[core::HeaderValueOption],
    remove: &[String],
    resp_add: &[core::HeaderValueOption],
    resp_remove: &[String],
    path: &str,
) -> Result<HeaderOps> {
    HeaderOps::from_proto(add, remove, resp_add, resp_remove, path)
}

impl RouteConfig {
    pub fn from_proto(rc: &pb::RouteConfiguration, path: &str) -> Result<Self> {
        if rc.vhds.is_some() {
            // The xDS layer merges VHDS virtual hosts in before translation;
            // an inline route_config cannot use VHDS.
            return Err(ConfigError::new(
                join(path, "vhds"),
                "VHDS needs a route configuration delivered by RDS",
            ));
        }
        let mut virtual_hosts = Vec::with_capacity(rc.virtual_hosts.len());
        let mut seen_domains = std::collections::HashSet::new();
        // Envoy's limit on a direct response's body (4 KiB by default).
        let max_body = rc.max_direct_response_body_size_bytes.val().unwrap_or(4096) as usize;
        for (i, vh) in rc.virtual_hosts.iter().enumerate() {
            let p = index(path, "virtual_hosts", i);
            let v = VirtualHost::from_proto(vh, &p)?;
            for (j, r) in v.routes.iter().enumerate() {
                if let Action::Direct(DirectResponse { body: Some(b), .. }) = &r.action {
                    if b.len() > max_body {
                        return Err(ConfigError::new(
                            join(&index(&p, "routes", j), "direct_response.body"),
                            format!(
                                "response body size is {} bytes; maximum is {max_body}",
                                b.len()
                            ),
                        ));
                    }
                }
            }
            for (j, d) in v.domains.iter().enumerate() {
                // Envoy rejects a domain that appears in two virtual hosts.
                if !seen_domains.insert(d.clone()) {
                    return Err(ConfigError::new(
                        index(&p, "domains", j),
                        format!("only unique values for domains are permitted: duplicate '{d}'"),
                    ));
                }
            }
            virtual_hosts.push(v);
        }
        Ok(Self {
            name: rc.name.clone(),
            virtual_hosts,
            headers: header_ops(
                &rc.request_headers_to_add,
                &rc.request_headers_to_remove,
                &rc.response_headers_to_add,
                &rc.response_headers_to_remove,
                path,
            )?,
            ignore_port_in_host_matching: rc.ignore_port_in_host_matching,
            most_specific_header_mutations_wins: rc.most_specific_header_mutations_wins,
            validate_clusters: rc.validate_clusters.val().unwrap_or(true),
            filters: crate::http_filters::PerFilterConfigs::from_proto(
                &rc.typed_per_filter_config,
                path,
            )?,
        })
    }
}

impl VirtualHost {
    fn from_proto(vh: &pb::VirtualHost, path: &str) -> Result<Self> {
        if vh.domains.is_empty() {
            return Err(ConfigError::new(
                join(path, "domains"),
                "at least one domain is required",
            ));
        }
        // A '*' inside a domain is a literal character in Envoy, and an
        // empty domain an exact one (matching an empty host only).
        let domains = vh.domains.iter().map(|d| d.to_ascii_lowercase()).collect();
        let routes = vh
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| Route::from_proto(r, &index(path, "routes", i)))
            .collect::<Result<_>>()?;
        Ok(Self {
            name: vh.name.clone(),
            domains,
            routes,
            headers: header_ops(
                &vh.request_headers_to_add,
                &vh.request_headers_to_remove,
                &vh.response_headers_to_add,
                &vh.response_headers_to_remove,
                path,
            )?,
            retry_policy: vh
                .retry_policy
                .as_ref()
                .map(|r| RetryPolicy::from_proto(r, &join(path, "retry_policy")))
                .transpose()?,
            filters: crate::http_filters::PerFilterConfigs::from_proto(
                &vh.typed_per_filter_config,
                path,
            )?,
            rate_limits: crate::http_filters::rate_limit_actions::list(
                &vh.rate_limits,
                path,
                "rate_limits",
            )?,
            attempt_count_upstream: vh.include_request_attempt_count,
            attempt_count_downstream: vh.include_attempt_count_in_response,
        })
    }
}

impl Route {
    fn from_proto(r: &pb::Route, path: &str) -> Result<Self> {
        let m = r
            .r#match
            .as_ref()
            .ok_or_else(|| ConfigError::new(join(path, "match"), "match is required"))?;
        let matcher = RouteMatch::from_proto(m, &join(path, "match"))?;
        use pb::route::Action as A;
        let action = match &r.action {
            Some(A::Route(ra)) => {
                Action::Forward(RouteAction::from_proto(ra, &join(path, "route"))?)
            }
            Some(A::Redirect(rd)) => {
                Action::Redirect(Redirect::from_proto(rd, &join(path, "redirect"))?)
            }
            Some(A::DirectResponse(dr)) => Action::Direct(DirectResponse::from_proto(
                dr,
                &join(path, "direct_response"),
            )?),
            Some(_) => return Err(ConfigError::new(path, "this route action is not supported")),
            None => {
                return Err(ConfigError::new(
                    path,
                    "one of route, redirect or direct_response is required",
                ))
            }
        };
        Ok(Self {
            name: r.name.clone(),
            matcher,
            action,
            headers: header_ops(
                &r.request_headers_to_add,
                &r.request_headers_to_remove,
                &r.response_headers_to_add,
                &r.response_headers_to_remove,
                path,
            )?,
            filters: crate::http_filters::PerFilterConfigs::from_proto(
                &r.typed_per_filter_config,
                path,
            )?,
            tracing: crate::trace::RouteTracing::from_proto(
                r.tracing.as_ref(),
                r.decorator.as_ref(),
                path,
            )?,
            metadata: r.metadata.clone().map(std::sync::Arc::new),
        })
    }
}

/// Hash policies (a route's, or a cluster's `HttpProtocolOptions`), each
/// named `<path>.hash_policy[i]` in errors.
pub fn hash_policies(list: &[pb::route_action::HashPolicy], path: &str) -> Result<Vec<HashPolicy>> {
    let mut hash_policy = Vec::new();
    for (i, h) in list.iter().enumerate() {
        use pb::route_action::hash_policy::PolicySpecifier as S;
        let p = index(path, "hash_policy", i);
        hash_policy.push(match &h.policy_specifier {
            Some(S::Header(hd)) => HashPolicy::Header {
                name: http::HeaderName::from_bytes(hd.header_name.to_ascii_lowercase().as_bytes())
                    .map_err(|_| {
                        ConfigError::new(join(&p, "header.header_name"), "invalid header name")
                    })?,
                terminal: h.terminal,
            },
            Some(S::ConnectionProperties(c)) if c.source_ip => HashPolicy::SourceIp {
                terminal: h.terminal,
            },
            Some(S::QueryParameter(q)) => HashPolicy::Query {
                name: q.name.clone(),
                terminal: h.terminal,
            },
            Some(S::Cookie(c)) => HashPolicy::Cookie {
                cookie: CookiePolicy {
                    name: c.name.clone(),
                    ttl: c
                        .ttl
                        .as_ref()
                        .map(|t| super::duration(t, &join(&p, "cookie.ttl")))
                        .transpose()?,
                    path: c.path.clone(),
                    attributes: c
                        .attributes
                        .iter()
                        .map(|a| (a.name.clone(), a.value.clone()))
                        .collect(),
                },
                terminal: h.terminal,
            },
            _ => return Err(ConfigError::new(
                p,
                "only header, cookie, source_ip and query_parameter hash policies are supported",
            )),
        });
    }
    Ok(hash_policy)
}

/// Compiles a uri_template (`/a/{name}/{rest=**}`) to a full regex, per
/// Envoy's `envoy.path.match.uri_template`: `*` and `{var}` match one or more
/// characters of one path segment (and may sit beside literals, as in
/// `/{name}.css`), `**` matches any characters including `/`, possibly none,
/// and `{var=pattern}` matches `pattern`.
pub fn uri_template_regex(t: &str, path: &str) -> Result<FullRegex> {
    let err = |m: &str| {
        ConfigError::new(
            join(path, "path_template"),
            format!("invalid uri template '{t}': {m}"),
        )
    };
    if !t.starts_with('/') {
        return Err(err("must start with '/'"));
    }
    let out = template_to_regex(t, false).map_err(|m| err(&m))?;
    FullRegex::new(&out, path)
}

const SEGMENT_CHARS: &str = "[a-zA-Z0-9\\-._~%!$&'()+,;:@=]";

fn template_to_regex(t: &str, in_variable: bool) -> std::result::Result<String, String> {
    let mut out = String::new();
    let mut rest = t;
    while let Some(c) = rest.chars().next() {
        if let Some(r) = rest.strip_prefix("**") {
            out.push_str(&format!("(?:{SEGMENT_CHARS}|/)*"));
            rest = r;
        } else if let Some(r) = rest.strip_prefix('*') {
            out.push_str(&format!("{SEGMENT_CHARS}+"));
            rest = r;
        } else if c == '{' {
            if in_variable {
                return Err("nested variables".into());
            }
            let end = rest.find('}').ok_or("unterminated variable")?;
            let var = &rest[1..end];
            let (name, pattern) = var.split_once('=').unwrap_or((var, "*"));
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("bad variable name '{name}'"));
            }
            out.push_str(&format!("(?:{})", template_to_regex(pattern, true)?));
            rest = &rest[end + 1..];
        } else if c == '}' {
            return Err("unbalanced '}'".into());
        } else {
            out.push_str(&regex::escape(&c.to_string()));
            rest = &rest[c.len_utf8()..];
        }
    }
    Ok(out)
}

impl RouteMatch {
    pub fn from_proto(m: &pb::RouteMatch, path: &str) -> Result<Self> {
        use pb::route_match::PathSpecifier as P;
        let case_sensitive = m.case_sensitive.val().unwrap_or(true);
        let lower = |s: &String| {
            if case_sensitive {
                s.clone()
            } else {
                s.to_ascii_lowercase()
            }
        };
        let path_match = match &m.path_specifier {
            Some(P::Prefix(p)) => PathMatch::Prefix(lower(p)),
            Some(P::Path(p)) => PathMatch::Path(lower(p)),
            Some(P::SafeRegex(r)) => {
                PathMatch::Regex(super::matcher::regex(r, &join(path, "safe_regex"))?)
            }
            Some(P::PathSeparatedPrefix(p)) => {
                if p.contains(['?', '#']) || p.ends_with('/') {
                    return Err(ConfigError::new(
                        join(path, "path_separated_prefix"),
                        "must not contain ?/# or end with /",
                    ));
                }
                PathMatch::SeparatedPrefix(lower(p))
            }
            Some(P::PathMatchPolicy(ext)) => {
                let any = ext.typed_config.as_ref().ok_or_else(|| {
                    ConfigError::new(join(path, "path_match_policy"), "typed_config is required")
                })?;
                let url = legate_proto::type_name(&any.type_url);
                if url != "envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig" {
                    return Err(ConfigError::new(
                        join(path, "path_match_policy.typed_config"),
                        format!("unsupported path matcher {url}"),
                    ));
                }
                let cfg: legate_proto::envoy_types::pb::envoy::extensions::path::r#match::uri_template::v3::UriTemplateMatchConfig =
                    prost::Message::decode(any.value.as_slice()).map_err(|e| ConfigError::new(join(path, "path_match_policy"), e.to_string()))?;
                PathMatch::Template(uri_template_regex(
                    &cfg.path_template,
                    &join(path, "path_match_policy.typed_config"),
                )?)
            }
            Some(P::ConnectMatcher(_)) => {
                return Err(ConfigError::new(
                    join(path, "connect_matcher"),
                    "CONNECT matching is not supported",
                ))
            }
            None => {
                return Err(ConfigError::new(
                    path,
                    "a path specifier (prefix, path, safe_regex, ...) is required",
                ))
            }
        };
        let headers = m
            .headers
            .iter()
            .enumerate()
            .map(|(i, h)| HeaderMatcher::from_proto(h, &index(path, "headers", i)))
            .collect::<Result<_>>()?;
        let query = m
            .query_parameters
            .iter()
            .enumerate()
            .map(|(i, q)| QueryMatcher::from_proto(q, &index(path, "query_parameters", i)))
            .collect::<Result<_>>()?;
        let cookies = m
            .cookies
            .iter()
            .enumerate()
            .map(|(i, c)| CookieMatcher::from_proto(c, &index(path, "cookies", i)))
            .collect::<Result<_>>()?;
        let runtime_fraction = match &m.runtime_fraction {
            None => None,
            Some(rf) => {
                let d = rf.default_value.unwrap_or_default();
                Some((rf.runtime_key.clone(), crate::runtime::per_million(&d)))
            }
        };
        Ok(Self {
            path: path_match,
            case_sensitive,
            headers,
            query,
            cookies,
            grpc: m.grpc.is_some(),
            runtime_fraction,
        })
    }
}

impl RetryOn {
    /// Sets the condition a `retry_on` token names; false when the token
    /// is not one Legate implements.
    fn set(&mut self, token: &str) -> bool {
        let flag = match token {
            "5xx" => &mut self.r5xx,
            "gateway-error" => &mut self.gateway_error,
            "reset" => &mut self.reset,
            "reset-before-request" => &mut self.reset_before_request,
            "connect-failure" => &mut self.connect_failure,
            "retriable-4xx" => &mut self.retriable_4xx,
            "refused-stream" => &mut self.refused_stream,
            "retriable-status-codes" => &mut self.retriable_status_codes,
            "retriable-headers" => &mut self.retriable_headers,
            grpc => {
                let code = match grpc {
                    "cancelled" => 1,
                    "deadline-exceeded" => 4,
                    "resource-exhausted" => 8,
                    "internal" => 13,
                    "unavailable" => 14,
                    _ => return false,
                };
                self.grpc_statuses.push(code);
                return true;
            }
        };
        *flag = true;
        true
    }
}

impl RetryPolicy {
    pub fn from_proto(r: &pb::RetryPolicy, path: &str) -> Result<Self> {
        let mut on = RetryOn::default();
        for cond in r
            .retry_on
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            if on.set(cond) {
                continue;
            }
            match cond {
                // Conditions Envoy knows but Legate cannot honour yet.
                other @ ("envoy-ratelimited" | "http3-post-connect-failure") => {
                    return Err(ConfigError::new(
                        join(path, "retry_on"),
                        format!("retry condition '{other}' is not supported"),
                    ))
                }
                // Envoy logs and ignores tokens it does not know.
                other => {
                    tracing::warn!(path = %join(path, "retry_on"), token = other, "unknown retry_on token ignored, as Envoy does")
                }
            }
        }
        let mut previous_hosts = false;
        for (i, p) in r.retry_host_predicate.iter().enumerate() {
            if p.name == "envoy.retry_host_predicates.previous_hosts" {
                previous_hosts = true;
            } else {
                return Err(ConfigError::new(
                    index(path, "retry_host_predicate", i),
                    format!("unsupported predicate '{}'", p.name),
                ));
            }
        }
        let previous_priorities = r
            .retry_priority
            .as_ref()
            .map(|p| previous_priorities(p, &join(path, "retry_priority")))
            .transpose()?;
        let (base, max) = match &r.retry_back_off {
            Some(b) => {
                let base = b
                    .base_interval
                    .as_ref()
                    .map(|d| duration(d, &join(path, "retry_back_off.base_interval")))
                    .transpose()?
                    .unwrap_or(Duration::from_millis(25));
                if base.is_zero() {
                    return Err(ConfigError::new(
                        join(path, "retry_back_off.base_interval"),
                        "must be greater than zero",
                    ));
                }
                let max = b
                    .max_interval
                    .as_ref()
                    .map(|d| duration(d, &join(path, "retry_back_off.max_interval")))
                    .transpose()?
                    .unwrap_or(base * 10);
                if max < base {
                    return Err(ConfigError::new(
                        join(path, "retry_back_off.max_interval"),
                        "must be >= base_interval",
                    ));
                }
                (base, max)
            }
            None => (Duration::from_millis(25), Duration::from_millis(250)),
        };
        Ok(Self {
            retry_on: on,
            num_retries: r.num_retries.val().unwrap_or(1),
            per_try_timeout: super::timeout_or(
                r.per_try_timeout.as_ref(),
                None,
                &join(path, "per_try_timeout"),
            )?,
            base_interval: base,
            max_interval: max,
            retriable_status_codes: r.retriable_status_codes.iter().map(|c| *c as u16).collect(),
            retriable_headers: r
                .retriable_headers
                .iter()
                .enumerate()
                .map(|(i, h)| HeaderMatcher::from_proto(h, &index(path, "retriable_headers", i)))
                .collect::<Result<_>>()?,
            previous_hosts,
            host_selection_attempts: previous_hosts
                .then(|| (r.host_selection_retry_max_attempts.max(1) as u32).saturating_add(1)),
            previous_priorities,
        })
    }
}

/// The update frequency of a `previous_priorities` retry priority, the one
/// Envoy has.
fn previous_priorities(p: &pb::retry_policy::RetryPriority, path: &str) -> Result<u32> {
    use legate_proto::envoy_types::pb::envoy::extensions::retry::priority::previous_priorities::v3::PreviousPrioritiesConfig;
    use pb::retry_policy::retry_priority::ConfigType;
    // Envoy finds the extension by its config's type, whatever the name.
    let Some(ConfigType::TypedConfig(a)) = &p.config_type else {
        return Err(ConfigError::new(
            join(path, "typed_config"),
            "a PreviousPrioritiesConfig is required",
        ));
    };
    if legate_proto::type_name(&a.type_url)
        != "envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig"
    {
        return Err(ConfigError::new(
            join(path, "typed_config"),
            format!(
                "retry priority {} is not supported by Legate",
                legate_proto::type_name(&a.type_url)
            ),
        ));
    }
    let c: PreviousPrioritiesConfig = crate::http_filters::decode(a, &join(path, "typed_config"))?;
    u32::try_from(c.update_frequency)
        .ok()
        .filter(|f| *f > 0)
        .ok_or_else(|| {
            ConfigError::new(
                join(path, "typed_config.update_frequency"),
                "must be greater than 0",
            )
        })
}

/// A route's `upgrade_configs`. Types compare in lower case, and one
/// named twice is an error, as in Envoy.
fn upgrades(u: &[pb::route_action::UpgradeConfig], path: &str) -> Result<Vec<(String, bool)>> {
    let mut out: Vec<(String, bool)> = Vec::new();
    for (i, c) in u.iter().enumerate() {
        let t = c.upgrade_type.to_ascii_lowercase();
        if out.iter().any(|(x, _)| *x == t) {
            return Err(ConfigError::new(
                join(&index(path, "upgrade_configs", i), "upgrade_type"),
                format!("Duplicate upgrade {t}"),
            ));
        }
        out.push((t, c.enabled.val().unwrap_or(true)));
    }
    Ok(out)
}

impl RouteAction {
    fn from_proto(ra: &pb::RouteAction, path: &str) -> Result<Self> {
        use pb::route_action::ClusterSpecifier as C;
        let cluster = match &ra.cluster_specifier {
            Some(C::Cluster(c)) if !c.is_empty() => ClusterSpec::Name(c.clone()),
            Some(C::ClusterHeader(h)) => ClusterSpec::Header(
                http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).map_err(|_| {
                    ConfigError::new(join(path, "cluster_header"), "invalid header name")
                })?,
            ),
            Some(C::WeightedClusters(wc)) => {
                ClusterSpec::Weighted(weighted(wc, &join(path, "weighted_clusters"))?)
            }
            Some(C::Cluster(_)) => {
                return Err(ConfigError::new(join(path, "cluster"), "must not be empty"))
            }
            Some(_) => {
                return Err(ConfigError::new(
                    path,
                    "cluster specifier plugins are not supported",
                ))
            }
            None => {
                return Err(ConfigError::new(
                    path,
                    "one of cluster, cluster_header or weighted_clusters is required",
                ))
            }
        };
        use pb::route_action::HostRewriteSpecifier as H;
        let host_rewrite = match &ra.host_rewrite_specifier {
            None => None,
            Some(H::HostRewriteLiteral(s)) => Some(HostRewrite::Literal(s.clone())),
            Some(H::AutoHostRewrite(b)) if b.value => Some(HostRewrite::Auto),
            Some(H::AutoHostRewrite(_)) => None,
            Some(H::HostRewriteHeader(h)) => Some(HostRewrite::Header(
                http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).map_err(|_| {
                    ConfigError::new(join(path, "host_rewrite_header"), "invalid header name")
                })?,
            )),
            Some(H::HostRewritePathRegex(r)) => {
                let p = join(path, "host_rewrite_path_regex");
                let re = r
                    .pattern
                    .as_ref()
                    .ok_or_else(|| ConfigError::new(join(&p, "pattern"), "pattern is required"))?;
                let compiled = regex::Regex::new(&re.regex)
                    .map_err(|e| ConfigError::new(join(&p, "pattern.regex"), e.to_string()))?;
                Some(HostRewrite::PathRegex(
                    FullRegex(compiled),
                    envoy_substitution(&r.substitution),
                ))
            }
            Some(H::HostRewrite(_)) => {
                return Err(ConfigError::new(
                    join(path, "host_rewrite"),
                    "formatted host rewrites are not supported",
                ))
            }
        };
        let regex_rewrite =
            ra.regex_rewrite
                .as_ref()
                .map(|r| {
                    let p = join(path, "regex_rewrite");
                    let re = r.pattern.as_ref().ok_or_else(|| {
                        ConfigError::new(join(&p, "pattern"), "pattern is required")
                    })?;
                    // Rewrites search (not full-match), so compile as-is.
                    let compiled = regex::Regex::new(&re.regex)
                        .map_err(|e| ConfigError::new(join(&p, "pattern.regex"), e.to_string()))?;
                    Ok::<_, ConfigError>((FullRegex(compiled), envoy_substitution(&r.substitution)))
                })
                .transpose()?;
        if !ra.prefix_rewrite.is_empty() && regex_rewrite.is_some() {
            return Err(ConfigError::new(
                join(path, "regex_rewrite"),
                "cannot be combined with prefix_rewrite",
            ));
        }
        let hash_policy = hash_policies(&ra.hash_policy, path)?;
        let code = match pb::route_action::ClusterNotFoundResponseCode::try_from(
            ra.cluster_not_found_response_code,
        ) {
            Ok(pb::route_action::ClusterNotFoundResponseCode::NotFound) => 404,
            Ok(pb::route_action::ClusterNotFoundResponseCode::InternalServerError) => 500,
            _ => 503,
        };
        Ok(Self {
            cluster,
            cluster_not_found_code: code,
            prefix_rewrite: (!ra.prefix_rewrite.is_empty()).then(|| ra.prefix_rewrite.clone()),
            regex_rewrite,
            host_rewrite,
            timeout: super::timeout_or(
                ra.timeout.as_ref(),
                Some(Duration::from_secs(15)),
                &join(path, "timeout"),
            )?,
            idle_timeout: ra
                .idle_timeout
                .as_ref()
                .map(|t| super::timeout_or(Some(t), None, &join(path, "idle_timeout")))
                .transpose()?,
            grpc_timeout: GrpcTimeout::from_proto(ra, path)?,
            stream_duration: ra
                .max_stream_duration
                .as_ref()
                .map(|m| StreamDuration::from_proto(m, &join(path, "max_stream_duration")))
                .transpose()?,
            retry_policy: ra
                .retry_policy
                .as_ref()
                .map(|r| RetryPolicy::from_proto(r, &join(path, "retry_policy")))
                .transpose()?,
            hash_policy,
            upgrades: upgrades(&ra.upgrade_configs, path)?,
            append_x_forwarded_host: ra.append_x_forwarded_host,
            rate_limits: crate::http_filters::rate_limit_actions::list(
                &ra.rate_limits,
                path,
                "rate_limits",
            )?,
            include_vh_rate_limits: ra.include_vh_rate_limits.val().unwrap_or(false),
            mirrors: ra
                .request_mirror_policies
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    MirrorPolicy::from_proto(m, &index(path, "request_mirror_policies", i))
                })
                .collect::<Result<_>>()?,
        })
    }
}

/// Envoy substitutions use `\1`; the regex crate wants `${1}`.
fn envoy_substitution(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(|d| d.is_ascii_digit()) => {
                out.push_str(&format!("${{{}}}", chars.next().unwrap()));
            }
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out
}

fn weighted(wc: &pb::WeightedCluster, path: &str) -> Result<WeightedClusters> {
    if wc.clusters.is_empty() {
        return Err(ConfigError::new(
            join(path, "clusters"),
            "at least one cluster is required",
        ));
    }
    let mut clusters = Vec::new();
    for (i, c) in wc.clusters.iter().enumerate() {
        let p = index(path, "clusters", i);
        if c.name.is_empty() {
            return Err(ConfigError::new(
                join(&p, "name"),
                "name is required (cluster_header is not supported)",
            ));
        }
        use pb::weighted_cluster::cluster_weight::HostRewriteSpecifier as H;
        clusters.push(WeightedCluster {
            name: c.name.clone(),
            weight: c.weight.val().unwrap_or(0) as u64,
            headers: header_ops(
                &c.request_headers_to_add,
                &c.request_headers_to_remove,
                &c.response_headers_to_add,
                &c.response_headers_to_remove,
                &p,
            )?,
            host_rewrite_literal: c
                .host_rewrite_specifier
                .as_ref()
                .map(|H::HostRewriteLiteral(s)| s.clone()),
            filters: crate::http_filters::PerFilterConfigs::from_proto(
                &c.typed_per_filter_config,
                &p,
            )?,
        });
    }
    let sum: u64 = clusters.iter().map(|c| c.weight).sum();
    // total_weight is deprecated and not enforced by Envoy 1.40: the split
    // follows the weights themselves.
    let total = sum;
    if total == 0 {
        return Err(ConfigError::new(
            join(path, "clusters"),
            "the sum of weights must be greater than 0",
        ));
    }
    Ok(WeightedClusters {
        clusters,
        total,
        use_hash_policy: matches!(
            &wc.random_value_specifier,
            Some(pb::weighted_cluster::RandomValueSpecifier::UseHashPolicy(b)) if b.value
        ),
    })
}

impl Redirect {
    fn from_proto(r: &pb::RedirectAction, path: &str) -> Result<Self> {
        use pb::redirect_action::{
            PathRewriteSpecifier as P, RedirectResponseCode as C, SchemeRewriteSpecifier as S,
        };
        let code = match C::try_from(r.response_code)
            .map_err(|_| ConfigError::new(join(path, "response_code"), "unknown code"))?
        {
            C::MovedPermanently => 301,
            C::Found => 302,
            C::SeeOther => 303,
            C::TemporaryRedirect => 307,
            C::PermanentRedirect => 308,
        };
        let scheme = match &r.scheme_rewrite_specifier {
            Some(S::HttpsRedirect(true)) => Some("https".to_string()),
            Some(S::HttpsRedirect(false)) | None => None,
            Some(S::SchemeRedirect(s)) => Some(s.to_ascii_lowercase()),
        };
        let (path_redirect, prefix_rewrite, regex_rewrite) = match &r.path_rewrite_specifier {
            None => (None, None, None),
            Some(P::PathRedirect(p)) => (Some(p.clone()), None, None),
            Some(P::PrefixRewrite(p)) => (None, Some(p.clone()), None),
            Some(P::RegexRewrite(rr)) => {
                let re = rr.pattern.as_ref().ok_or_else(|| {
                    ConfigError::new(join(path, "regex_rewrite.pattern"), "required")
                })?;
                let compiled = regex::Regex::new(&re.regex).map_err(|e| {
                    ConfigError::new(join(path, "regex_rewrite.pattern.regex"), e.to_string())
                })?;
                (
                    None,
                    None,
                    Some((FullRegex(compiled), envoy_substitution(&rr.substitution))),
                )
            }
            Some(P::PathRewrite(_)) => {
                return Err(ConfigError::new(
                    join(path, "path_rewrite"),
                    "not supported",
                ))
            }
        };
        Ok(Self {
            scheme,
            host: (!r.host_redirect.is_empty()).then(|| r.host_redirect.clone()),
            port: (r.port_redirect != 0).then_some(r.port_redirect as u16),
            path: path_redirect,
            prefix_rewrite,
            regex_rewrite,
            code,
            strip_query: r.strip_query,
        })
    }
}

impl DirectResponse {
    fn from_proto(d: &pb::DirectResponseAction, path: &str) -> Result<Self> {
        if !(200..600).contains(&d.status) {
            return Err(ConfigError::new(
                join(path, "status"),
                format!("{} is not a valid HTTP status", d.status),
            ));
        }
        let body = match &d.body {
            None => None,
            Some(ds) => Some(crate::datasource::read(ds, &join(path, "body"))?),
        };
        let body_format = d
            .body_format
            .as_ref()
            .map(|f| BodyFormat::from_proto(f, &join(path, "body_format")))
            .transpose()?;
        Ok(Self {
            status: d.status as u16,
            body,
            body_format,
        })
    }
}

/// A route's `max_stream_duration` (Envoy's "new timeouts"): how long a
/// stream may live from its first byte, after which the connection manager
/// answers 408 (request still arriving) or 504 with flag `DT`.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamDuration {
    /// The route's limit; `Some(ZERO)` disables the connection manager's.
    pub max: Option<Duration>,
    /// `grpc_timeout_header_max`: when set, a request's `grpc-timeout`
    /// header is the limit, capped by this unless it is zero.
    pub grpc_header_max: Option<Duration>,
    /// `grpc_timeout_header_offset`: taken off the header's timeout.
    pub grpc_header_offset: Option<Duration>,
}

impl StreamDuration {
    fn from_proto(m: &pb::route_action::MaxStreamDuration, path: &str) -> Result<Self> {
        let d = |v: Option<&legate_proto::envoy_types::pb::google::protobuf::Duration>, f: &str| {
            v.map(|v| super::duration(v, &join(path, f))).transpose()
        };
        Ok(Self {
            max: d(m.max_stream_duration.as_ref(), "max_stream_duration")?,
            grpc_header_max: d(
                m.grpc_timeout_header_max.as_ref(),
                "grpc_timeout_header_max",
            )?,
            grpc_header_offset: d(
                m.grpc_timeout_header_offset.as_ref(),
                "grpc_timeout_header_offset",
            )?,
        })
    }

    /// The limit for a request with these headers; without a limit of the
    /// route's own, the connection manager's (`hcm`); None: no limit.
    pub fn limit(&self, headers: &http::HeaderMap, hcm: Option<Duration>) -> Option<Duration> {
        let grpc = headers
            .get("grpc-timeout")
            .and_then(|v| grpc_timeout(v.as_bytes()));
        match (grpc, self.grpc_header_max) {
            (Some(mut t), Some(max)) => {
                if !max.is_zero() && t > max {
                    t = max;
                }
                if let Some(off) = self.grpc_header_offset.filter(|_| !t.is_zero()) {
                    t = t.saturating_sub(off);
                }
                Some(t)
            }
            _ => self.max.or(hcm).filter(|d| !d.is_zero()),
        }
    }
}

/// A route's `max_grpc_timeout` and `grpc_timeout_offset` (Envoy's older
/// gRPC timeouts, unused when the route has `max_stream_duration`).
#[derive(Debug, Clone, PartialEq)]
pub struct GrpcTimeout {
    /// Zero: no cap.
    pub max: Duration,
    pub offset: Option<Duration>,
}

impl GrpcTimeout {
    #[allow(deprecated)]
    fn from_proto(ra: &pb::RouteAction, path: &str) -> Result<Option<Self>> {
        let Some(max) = &ra.max_grpc_timeout else {
            return Ok(None);
        };
        Ok(Some(Self {
            max: super::duration(max, &join(path, "max_grpc_timeout"))?,
            offset: ra
                .grpc_timeout_offset
                .as_ref()
                .map(|o| super::duration(o, &join(path, "grpc_timeout_offset")))
                .transpose()?,
        }))
    }

    /// A gRPC request's route timeout: its `grpc-timeout` (none: no limit)
    /// less the offset when that leaves some, capped by `max`; None: no
    /// timeout.
    pub fn route_timeout(&self, headers: &http::HeaderMap) -> Option<Duration> {
        let mut t = headers
            .get("grpc-timeout")
            .and_then(|v| grpc_timeout(v.as_bytes()))
            .unwrap_or(Duration::ZERO);
        if let Some(off) = self.offset.filter(|o| *o < t) {
            t -= off;
        }
        if !self.max.is_zero() && (t.is_zero() || t > self.max) {
            t = self.max;
        }
        (!t.is_zero()).then_some(t)
    }
}

/// Envoy's `grpc-timeout` form of a timeout: milliseconds, in a larger
/// unit only when they need more than 8 digits.
pub fn format_grpc_timeout(t: Duration) -> String {
    let mut n = t.as_millis();
    for (unit, next) in [("m", 1000), ("S", 60), ("M", 60)] {
        if n <= 99_999_999 {
            return format!("{n}{unit}");
        }
        n /= next;
    }
    format!("{}H", n.min(99_999_999))
}

/// A `grpc-timeout` value (gRPC over HTTP/2: up to 8 digits and a unit of
/// H, M, S, m, u or n); None when it is not one.
pub fn grpc_timeout(v: &[u8]) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        // Envoy counts in whole milliseconds, rounding up.
        b"u" => Duration::from_millis(n.div_ceil(1000)),
        b"n" => Duration::from_millis(n.div_ceil(1_000_000)),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_hash_cookie_is_written_as_envoy_writes_it() {
        let c = CookiePolicy {
            name: "session".into(),
            ttl: Some(Duration::from_secs(3600)),
            path: "/".into(),
            attributes: vec![
                ("SameSite".into(), "Lax".into()),
                ("Secure".into(), String::new()),
            ],
        };
        assert_eq!(
            c.set_cookie("0123456789abcdef", Duration::from_secs(3600)),
            "session=\"0123456789abcdef\"; Max-Age=3600; Path=/; SameSite=Lax; Secure; HttpOnly"
        );
        // A zero ttl makes a session cookie.
        let session = CookiePolicy {
            path: String::new(),
            attributes: vec![],
            ..c
        };
        assert_eq!(
            session.set_cookie("v", Duration::ZERO),
            "session=\"v\"; HttpOnly"
        );
    }

    #[test]
    fn stream_duration_from_the_route_or_grpc_timeout() {
        let h = |v: &str| {
            let mut m = http::HeaderMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            m
        };
        let none = http::HeaderMap::new();
        let istio = StreamDuration {
            max: Some(Duration::ZERO),
            grpc_header_max: Some(Duration::ZERO),
            grpc_header_offset: None,
        };
        assert_eq!(istio.limit(&none, None), None);
        assert_eq!(
            istio.limit(&h("300m"), None),
            Some(Duration::from_millis(300))
        );
        assert_eq!(istio.limit(&h("2S"), None), Some(Duration::from_secs(2)));
        // Not a valid grpc-timeout: the route's limit (none here).
        assert_eq!(istio.limit(&h("10s"), None), None);
        assert_eq!(istio.limit(&h("123456789m"), None), None);
        let capped = StreamDuration {
            max: Some(Duration::from_secs(1)),
            grpc_header_max: Some(Duration::from_millis(400)),
            grpc_header_offset: Some(Duration::from_millis(100)),
        };
        assert_eq!(
            capped.limit(&h("10S"), None),
            Some(Duration::from_millis(300))
        );
        assert_eq!(capped.limit(&none, None), Some(Duration::from_secs(1)));
        // A route without its own limit takes the connection manager's.
        let own = StreamDuration {
            max: None,
            grpc_header_max: None,
            grpc_header_offset: None,
        };
        assert_eq!(
            own.limit(&none, Some(Duration::from_secs(4))),
            Some(Duration::from_secs(4))
        );
        assert_eq!(
            capped.limit(&none, Some(Duration::from_secs(4))),
            Some(Duration::from_secs(1))
        );
        assert_eq!(format_grpc_timeout(Duration::from_millis(300)), "300m");
        assert_eq!(format_grpc_timeout(Duration::from_secs(200_000)), "200000S");
        assert_eq!(
            format_grpc_timeout(Duration::from_secs(200_000_000)),
            "3333333M"
        );
    }

    #[test]
    fn uri_templates() {
        let r = uri_template_regex("/api/{version}/users/{rest=**}", "p").unwrap();
        assert!(r.is_match("/api/v1/users/a/b/c"));
        assert!(!r.is_match("/api/v1/users"));
        assert!(!r.is_match("/api/v1/x/users/a"));
        let r = uri_template_regex("/static/*/{name}.css", "p").unwrap();
        assert!(r.is_match("/static/theme/main.css"));
        assert!(!r.is_match("/static/a/b/main.css"));
        let r = uri_template_regex("/files/{path=**}", "p").unwrap();
        assert!(r.is_match("/files/"), "** may match nothing");
        assert!(r.is_match("/files/a/b.txt"));
        assert!(!r.is_match("/files"));
        assert!(uri_template_regex("/a/{x", "p").is_err());
    }

    #[test]
    fn retry_on_tokens() {
        let p = |on: &str| {
            RetryPolicy::from_proto(
                &pb::RetryPolicy {
                    retry_on: on.into(),
                    ..Default::default()
                },
                "r",
            )
        };
        let r = p("5xx, connect-failure,reset-before-request")
            .unwrap()
            .retry_on;
        assert!(r.r5xx && r.connect_failure && r.reset_before_request && !r.reset);
        // Known to Envoy but not implemented: rejected naming the field.
        assert_eq!(p("5xx,envoy-ratelimited").unwrap_err().path, "r.retry_on");
        let g = p("unavailable,cancelled").unwrap().retry_on;
        assert_eq!(g.grpc_statuses, vec![14, 1]);
        // Unknown to Envoy too: ignored, as Envoy does.
        assert!(!p("sometimes").unwrap().retry_on.r5xx);
    }

    #[test]
    fn substitution() {
        assert_eq!(envoy_substitution("/x/\\1/\\2$"), "/x/${1}/${2}$$");
    }
}
