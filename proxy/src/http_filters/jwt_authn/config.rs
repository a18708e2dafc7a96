//! `JwtAuthentication` translated: providers, where their tokens are, the
//! requirement trees of `rules` and `requirement_map`, and per-route
//! `PerRouteConfig`.

use super::extract::Extractor;
use super::jwks::Jwks;
use super::remote::RemoteJwks;
use crate::config::matcher::StringMatcher;
use crate::config::{join, ConfigError, Result};
use http::HeaderName;
use legate_proto::envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3 as pb;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Envoy's skew when `clock_skew_seconds` is 0 or unset.
const DEFAULT_SKEW: u64 = 60;

/// Where a provider's keys come from.
// One per provider, built with the config: the size difference costs
// nothing per request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum KeySource {
    /// `local_jwks`; None for an empty data source (every token then
    /// fails with `JwksNoValidKeys`, as in Envoy).
    Local(Option<Jwks>),
    Remote(RemoteJwks),
}

/// One `JwtProvider`.
#[derive(Debug)]
pub struct Provider {
    pub name: String,
    pub issuer: String,
    pub audiences: Vec<String>,
    pub subjects: Option<StringMatcher>,
    /// `require_expiration` (unbounded) or `max_lifetime`.
    pub max_lifetime: Option<Duration>,
    pub forward: bool,
    /// Select the route again when `claim_to_headers` added a header.
    pub clear_route_cache: bool,
    pub forward_payload_header: Option<HeaderName>,
    pub pad_forward_payload_header: bool,
    pub payload_in_metadata: String,
    pub header_in_metadata: String,
    pub failed_status_in_metadata: String,
    pub space_delimited_claims: Vec<String>,
    pub clock_skew: u64,
    /// (header, claim path).
    pub claim_to_headers: Vec<(HeaderName, Vec<String>)>,
    pub keys: KeySource,
    pub cache: Option<super::cache::TokenCache>,
    pub(super) locations: Vec<super::extract::Location>,
}

/// A requirement tree, with the token extractor each node uses.
#[derive(Debug)]
pub enum Requirement {
    Provider {
        provider: Arc<Provider>,
        /// `provider_and_audiences`: these replace the provider's.
        audiences: Option<Vec<String>>,
        extractor: Extractor,
    },
    /// `requires_any`: the children, and the `allow_missing` /
    /// `allow_missing_or_failed` entries among them as flags.
    Any {
        children: Vec<Requirement>,
        allow_missing: bool,
        allow_failed: bool,
    },
    All(Vec<Requirement>),
    /// `allow_missing` (false) or `allow_missing_or_failed` (true): every
    /// provider's locations, each token checked by its issuer's provider.
    AllowMissing {
        failed_too: bool,
        extractor: Extractor,
    },
    /// An empty requirement: always satisfied.
    Pass,
}

/// One of `rules`: a route match and what it requires (None: nothing).
#[derive(Debug)]
pub struct Rule {
    pub matcher: crate::config::route::RouteMatch,
    pub requires: Option<Arc<Requirement>>,
}

/// The filter's configuration.
#[derive(Debug)]
pub struct Config {
    pub providers: Vec<Arc<Provider>>,
    pub rules: Vec<Rule>,
    pub requirement_map: BTreeMap<String, Arc<Requirement>>,
    pub bypass_cors_preflight: bool,
    pub strip_failure_response: bool,
}

/// `PerRouteConfig`.
#[derive(Debug)]
pub enum PerRoute {
    Disabled,
    RequirementName(String),
}

impl Config {
    pub fn from_proto(c: &pb::JwtAuthentication, path: &str) -> Result<Config> {
        if c.filter_state_rules.is_some() {
            return Err(ConfigError::new(
                join(path, "filter_state_rules"),
                "not supported by Legate (it keeps no filter state)",
            ));
        }
        let pp = join(path, "providers");
        let mut names: Vec<&String> = c.providers.keys().collect();
        names.sort();
        let providers = names
            .into_iter()
            .map(|n| Provider::from_proto(n, &c.providers[n], &join(&pp, n)).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        let mut map_names: Vec<&String> = c.requirement_map.keys().collect();
        map_names.sort();
        let mp = join(path, "requirement_map");
        let mut requirement_map = BTreeMap::new();
        for n in map_names {
            let r = Requirement::from_proto(&c.requirement_map[n], &providers, &join(&mp, n))?;
            requirement_map.insert(n.clone(), Arc::new(r));
        }
        let rules = c
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                Rule::from_proto(
                    r,
                    &providers,
                    &requirement_map,
                    &format!("{path}.rules[{i}]"),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Config {
            providers,
            rules,
            requirement_map,
            bypass_cors_preflight: c.bypass_cors_preflight,
            strip_failure_response: c.strip_failure_response,
        })
    }

    /// Envoy's message for a requirement name that is not in the map.
    pub fn wrong_name(&self, name: &str) -> String {
        let names: Vec<&str> = self.requirement_map.keys().map(String::as_str).collect();
        format!(
            "Wrong requirement_name: {name}. It should be one of [{}]",
            names.join(",")
        )
    }
}

impl Rule {
    fn from_proto(
        r: &pb::RequirementRule,
        providers: &[Arc<Provider>],
        map: &BTreeMap<String, Arc<Requirement>>,
        path: &str,
    ) -> Result<Rule> {
        let m = r
            .r#match
            .as_ref()
            .ok_or_else(|| ConfigError::new(join(path, "match"), "match is required"))?;
        let mut matcher = crate::config::route::RouteMatch::from_proto(m, &join(path, "match"))?;
        // Envoy's rule matcher ignores these two.
        matcher.grpc = false;
        matcher.runtime_fraction = None;
        use pb::requirement_rule::RequirementType as T;
        let requires = match &r.requirement_type {
            None => None,
            Some(T::Requires(q)) => Some(Arc::new(Requirement::from_proto(
                q,
                providers,
                &join(path, "requires"),
            )?)),
            Some(T::RequirementName(n)) => Some(map.get(n).cloned().ok_or_else(|| {
                let names: Vec<&str> = map.keys().map(String::as_str).collect();
                ConfigError::new(
                    join(path, "requirement_name"),
                    format!(
                        "Wrong requirement_name: {n}. It should be one of [{}]",
                        names.join(",")
                    ),
                )
            })?),
        };
        Ok(Rule { matcher, requires })
    }
}

impl Requirement {
    fn from_proto(r: &pb::JwtRequirement, providers: &[Arc<Provider>], path: &str) -> Result<Self> {
        use pb::jwt_requirement::RequiresType as T;
        let find = |name: &str, field: &str| {
            providers
                .iter()
                .find(|p| p.name == name)
                .cloned()
                .ok_or_else(|| {
                    ConfigError::new(
                        join(path, field),
                        format!("Required provider ['{name}'] is not configured."),
                    )
                })
        };
        let single = |p: Arc<Provider>, audiences| {
            let extractor = Extractor::new(std::slice::from_ref(&p));
            Requirement::Provider {
                provider: p,
                audiences,
                extractor,
            }
        };
        Ok(match &r.requires_type {
            None => Requirement::Pass,
            Some(T::ProviderName(n)) => single(find(n, "provider_name")?, None),
            Some(T::ProviderAndAudiences(pa)) => {
                let p = find(&pa.provider_name, "provider_and_audiences.provider_name")?;
                let aud = (!pa.audiences.is_empty()).then(|| pa.audiences.clone());
                single(p, aud)
            }
            Some(T::RequiresAll(l)) => Requirement::All(
                l.requirements
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        Self::from_proto(
                            c,
                            providers,
                            &format!("{path}.requires_all.requirements[{i}]"),
                        )
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(T::RequiresAny(l)) => {
                let (mut allow_missing, mut allow_failed) = (false, false);
                let mut children = Vec::new();
                for (i, c) in l.requirements.iter().enumerate() {
                    match &c.requires_type {
                        Some(T::AllowMissing(_)) => allow_missing = true,
                        Some(T::AllowMissingOrFailed(_)) => allow_failed = true,
                        _ => children.push(Self::from_proto(
                            c,
                            providers,
                            &format!("{path}.requires_any.requirements[{i}]"),
                        )?),
                    }
                }
                // Only the flags: one child of their kind, the more
                // permissive preferred, as Envoy builds it.
                if children.is_empty() && (allow_missing || allow_failed) {
                    children.push(Requirement::AllowMissing {
                        failed_too: allow_failed,
                        extractor: Extractor::new(providers),
                    });
                }
                Requirement::Any {
                    children,
                    allow_missing,
                    allow_failed,
                }
            }
            Some(T::AllowMissing(_)) => Requirement::AllowMissing {
                failed_too: false,
                extractor: Extractor::new(providers),
            },
            Some(T::AllowMissingOrFailed(_)) => Requirement::AllowMissing {
                failed_too: true,
                extractor: Extractor::new(providers),
            },
            Some(T::ExtractOnlyWithoutValidation(_)) => {
                return Err(ConfigError::new(
                    join(path, "extract_only_without_validation"),
                    "not supported by Legate yet",
                ))
            }
        })
    }
}

impl Provider {
    fn from_proto(name: &str, p: &pb::JwtProvider, path: &str) -> Result<Provider> {
        let header = |s: &str, f: &str| crate::headers::header_name(s, &join(path, f));
        let keys = match &p.jwks_source_specifier {
            None => {
                return Err(ConfigError::new(
                    path,
                    "one of remote_jwks or local_jwks is required",
                ))
            }
            Some(pb::jwt_provider::JwksSourceSpecifier::LocalJwks(ds)) => {
                let lp = join(path, "local_jwks");
                let text = crate::datasource::read(ds, &lp)?;
                if text.is_empty() {
                    KeySource::Local(None)
                } else {
                    KeySource::Local(Some(Jwks::parse(&text).map_err(|s| {
                        ConfigError::new(
                            &lp,
                            format!(
                                "Provider '{name}' in jwt_authn config has invalid local jwks: {s}"
                            ),
                        )
                    })?))
                }
            }
            Some(pb::jwt_provider::JwksSourceSpecifier::RemoteJwks(r)) => {
                KeySource::Remote(RemoteJwks::from_proto(name, r, &join(path, "remote_jwks"))?)
            }
        };
        let max_lifetime = match &p.max_lifetime {
            Some(d) => Some(crate::config::duration(d, &join(path, "max_lifetime"))?),
            None if p.require_expiration => Some(Duration::MAX),
            None => None,
        };
        let claim_to_headers = p
            .claim_to_headers
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let cp = format!("{path}.claim_to_headers[{i}]");
                let name = crate::headers::header_name(&c.header_name, &join(&cp, "header_name"))?;
                let claim: Vec<String> = if c.claim_path.is_empty() {
                    c.claim_name.split('.').map(str::to_string).collect()
                } else {
                    c.claim_path.iter().map(|s| s.key.clone()).collect()
                };
                Ok((name, claim))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Provider {
            name: name.to_string(),
            issuer: p.issuer.clone(),
            audiences: p.audiences.clone(),
            subjects: p
                .subjects
                .as_ref()
                .map(|s| StringMatcher::from_proto(s, &join(path, "subjects")))
                .transpose()?,
            max_lifetime,
            forward: p.forward,
            clear_route_cache: p.clear_route_cache,
            forward_payload_header: (!p.forward_payload_header.is_empty())
                .then(|| header(&p.forward_payload_header, "forward_payload_header"))
                .transpose()?,
            pad_forward_payload_header: p.pad_forward_payload_header,
            payload_in_metadata: p.payload_in_metadata.clone(),
            header_in_metadata: p.header_in_metadata.clone(),
            failed_status_in_metadata: p.failed_status_in_metadata.clone(),
            space_delimited_claims: p
                .normalize_payload_in_metadata
                .as_ref()
                .map(|n| n.space_delimited_claims.clone())
                .unwrap_or_default(),
            clock_skew: if p.clock_skew_seconds > 0 {
                u64::from(p.clock_skew_seconds)
            } else {
                DEFAULT_SKEW
            },
            claim_to_headers,
            keys,
            cache: p
                .jwt_cache_config
                .as_ref()
                .map(super::cache::TokenCache::new),
            locations: super::extract::Location::of_provider(p, path)?,
        })
    }

    /// The headers a verifier removes before extracting, so a client
    /// cannot pose as a verified token's output.
    pub fn output_headers(&self) -> impl Iterator<Item = &HeaderName> {
        self.forward_payload_header
            .iter()
            .chain(self.claim_to_headers.iter().map(|(h, _)| h))
    }
}

impl PerRoute {
    pub fn from_proto(c: &pb::PerRouteConfig, path: &str) -> Result<PerRoute> {
        use pb::per_route_config::RequirementSpecifier as S;
        match &c.requirement_specifier {
            Some(S::Disabled(true)) => Ok(PerRoute::Disabled),
            Some(S::RequirementName(n)) if !n.is_empty() => {
                Ok(PerRoute::RequirementName(n.clone()))
            }
            _ => Err(ConfigError::new(
                path,
                "one of disabled (true) or requirement_name is required",
            )),
        }
    }
}
