//! The OAuth2 filter's config (`OAuth2Config`), translated once: the same
//! shape serves the filter's own config and a route's `OAuth2PerRoute`.

use super::cookies::Cookies;
use crate::config::matcher::{HeaderMatcher, Pseudo, StringMatcher};
use crate::config::source::XdsSource;
use crate::config::tls::GenericSecret;
use crate::config::{index, join, ConfigError, Result, Wrapped};
use crate::headers::HeaderLookup;
use crate::http_filters::retry::Retry;
use http::HeaderName;
use legate_proto::envoy_types::pb::envoy::extensions::filters::http::oauth2::v3 as pb;
use std::time::Duration;

/// How the client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthType {
    UrlEncodedBody,
    BasicAuth,
    TlsClientAuth,
}

/// `token_endpoint`: where codes and refresh tokens are exchanged.
#[derive(Debug, Clone)]
pub struct TokenEndpoint {
    pub cluster: String,
    pub uri: http::Uri,
    pub timeout: Duration,
}

/// `post_logout_redirect_uri`, for an `end_session_endpoint`.
#[derive(Debug, Clone)]
pub enum PostLogout {
    /// `<scheme>://<host>/`.
    Default,
    Disabled,
    Uri(UriFormat),
}

#[derive(Debug)]
pub struct Config {
    pub token: Option<TokenEndpoint>,
    pub retry: Option<Retry>,
    /// `authorization_endpoint` up to its query, and its own query pairs.
    pub authorize: String,
    pub authorize_query: Vec<(String, String)>,
    pub end_session: Option<String>,
    pub post_logout: PostLogout,
    pub client_id: String,
    /// None for `TLS_CLIENT_AUTH`, which sends no secret.
    pub token_secret: Option<GenericSecret>,
    pub hmac_secret: GenericSecret,
    pub cookies: Cookies,
    pub redirect_uri: UriFormat,
    pub redirect_path: StringMatcher,
    pub signout_path: StringMatcher,
    pub forward_bearer: bool,
    /// `forward_id_token.header`, lowercased.
    pub forward_id: Option<HeaderName>,
    pub preserve_authorization: bool,
    pub pass_through: Vec<HeaderMatcher>,
    /// `auth_scopes`, space-joined and URL-encoded.
    pub scope: String,
    pub resources: Vec<String>,
    pub auth_type: AuthType,
    pub use_refresh: bool,
    pub default_expires_in: u64,
    pub deny_redirect: Vec<HeaderMatcher>,
    pub default_refresh_expires_in: u64,
    pub disable_id_cookie: bool,
    pub disable_access_cookie: bool,
    pub disable_refresh_cookie: bool,
    pub csrf_expires_in: u64,
    pub verifier_expires_in: u64,
    pub encrypt_tokens: bool,
    pub allow_failed: Vec<HeaderMatcher>,
    pub original_request_uri: Option<UriFormat>,
    pub allowed_domains: Vec<String>,
    pub id_expiry_from_access: bool,
    /// `<prefix><stat_prefix>oauth_*`.
    pub stats: crate::stats::NamedCounters,
    /// The SDS secrets it reads.
    pub sds: Vec<(String, XdsSource)>,
}

/// The filter's counters (`<prefix><stat_prefix>.<name>`). The token
/// cookie chunking ones stay at zero: Legate does not split large tokens
/// over several cookies (Envoy 1.40 does).
const STATS: [&str; 12] = [
    "oauth_unauthorized_rq",
    "oauth_failure",
    "oauth_passthrough",
    "oauth_success",
    "oauth_refreshtoken_success",
    "oauth_refreshtoken_failure",
    "oauth_allow_failed_passthrough",
    "oauth_legacy_cbc_decrypt",
    "oauth_token_cookie_chunked",
    "oauth_token_cookie_malformed_chunks",
    "oauth_token_cookie_oversized",
    "oauth_token_cookie_reassembled",
];

/// A URI format string (`redirect_uri`, `original_request_uri`): literal
/// text and `%REQ(...)%`, a missing header rendered `-` as Envoy's
/// substitution formatter renders it.
#[derive(Debug, Clone)]
pub struct UriFormat(Vec<Piece>);

#[derive(Debug, Clone)]
enum Piece {
    Lit(String),
    Req(HeaderLookup),
}

impl UriFormat {
    pub fn parse(s: &str, path: &str) -> Result<Self> {
        crate::headers::parse_pieces(s, path, Piece::Lit, |cmd| {
            HeaderLookup::parse(cmd, "REQ", path)?
                .map(Piece::Req)
                .ok_or_else(|| {
                    ConfigError::new(
                        path,
                        format!("%{cmd}% is not supported by Legate here (%REQ(...)% is)"),
                    )
                })
        })
        .map(UriFormat)
    }

    pub fn render(&self, headers: &http::HeaderMap, pseudo: &Pseudo) -> String {
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Piece::Lit(s) => out.push_str(s),
                Piece::Req(l) => {
                    let v = l.value(Some(headers), pseudo).unwrap_or_default();
                    out.push_str(if v.is_empty() { "-" } else { &v });
                }
            }
        }
        out
    }
}

/// Cookie names, domain and paths as Envoy's validation takes them: they
/// go into Set-Cookie as they are, so nothing may end or extend one.
fn check_cookies(cr: &pb::OAuth2Credentials, c: &pb::OAuth2Config, path: &str) -> Result<()> {
    let token = |s: &str| {
        s.strip_prefix(':')
            .unwrap_or(s)
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_|~`".contains(&b))
    };
    let attr = |s: &str| {
        !s.bytes()
            .any(|b| b < 0x20 || b == 0x7f || b" \",;<>\\".contains(&b))
    };
    let cp = join(path, "credentials");
    if let Some(n) = &cr.cookie_names {
        for (field, v) in [
            ("bearer_token", &n.bearer_token),
            ("oauth_hmac", &n.oauth_hmac),
            ("oauth_expires", &n.oauth_expires),
            ("id_token", &n.id_token),
            ("refresh_token", &n.refresh_token),
            ("oauth_nonce", &n.oauth_nonce),
            ("code_verifier", &n.code_verifier),
        ] {
            if !v.is_empty() && !token(v) {
                return Err(ConfigError::new(
                    join(&join(&cp, "cookie_names"), field),
                    format!("'{v}' is not a cookie name"),
                ));
            }
        }
    }
    if !attr(&cr.cookie_domain) {
        return Err(ConfigError::new(
            join(&cp, "cookie_domain"),
            "not a cookie domain (no spaces, controls or any of \",;<>\\)",
        ));
    }
    let Some(cc) = &c.cookie_configs else {
        return Ok(());
    };
    for (field, v) in [
        ("bearer_token_cookie_config", &cc.bearer_token_cookie_config),
        ("oauth_hmac_cookie_config", &cc.oauth_hmac_cookie_config),
        (
            "oauth_expires_cookie_config",
            &cc.oauth_expires_cookie_config,
        ),
        ("id_token_cookie_config", &cc.id_token_cookie_config),
        (
            "refresh_token_cookie_config",
            &cc.refresh_token_cookie_config,
        ),
        ("oauth_nonce_cookie_config", &cc.oauth_nonce_cookie_config),
        (
            "code_verifier_cookie_config",
            &cc.code_verifier_cookie_config,
        ),
    ] {
        let p = v.as_ref().map_or("", |c| c.path.as_str());
        if !p.is_empty() && (!p.starts_with('/') || !attr(p)) {
            return Err(ConfigError::new(
                join(&join(&join(path, "cookie_configs"), field), "path"),
                format!("'{p}' is not a cookie path"),
            ));
        }
    }
    Ok(())
}

fn required<'a, T>(v: Option<&'a T>, path: &str, field: &str) -> Result<&'a T> {
    v.ok_or_else(|| ConfigError::new(join(path, field), format!("{field} is required")))
}

fn matchers(
    ms: &[legate_proto::envoy_types::pb::envoy::config::route::v3::HeaderMatcher],
    path: &str,
    field: &str,
) -> Result<Vec<HeaderMatcher>> {
    ms.iter()
        .enumerate()
        .map(|(i, m)| HeaderMatcher::from_proto(m, &index(path, field, i)))
        .collect()
}

fn path_matcher(
    m: Option<&legate_proto::envoy_types::pb::envoy::r#type::matcher::v3::PathMatcher>,
    path: &str,
    field: &str,
) -> Result<StringMatcher> {
    use legate_proto::envoy_types::pb::envoy::r#type::matcher::v3::path_matcher::Rule;
    let p = join(path, field);
    match &required(m, path, field)?.rule {
        Some(Rule::Path(s)) => StringMatcher::from_proto(s, &join(&p, "path")),
        None => Err(ConfigError::new(&p, "a path rule is required")),
    }
}

fn seconds(
    d: &Option<legate_proto::envoy_types::pb::google::protobuf::Duration>,
    path: &str,
    field: &str,
    default: u64,
) -> Result<u64> {
    Ok(d.as_ref()
        .map(|d| crate::config::duration(d, &join(path, field)))
        .transpose()?
        .map_or(default, |d| d.as_secs()))
}

fn token_endpoint(
    h: Option<&legate_proto::envoy_types::pb::envoy::config::core::v3::HttpUri>,
    path: &str,
) -> Result<Option<TokenEndpoint>> {
    use legate_proto::envoy_types::pb::envoy::config::core::v3::http_uri::HttpUpstreamType as U;
    let Some(h) = h else { return Ok(None) };
    let p = join(path, "token_endpoint");
    let uri: http::Uri = h
        .uri
        .parse()
        .ok()
        .filter(|u: &http::Uri| u.authority().is_some())
        .ok_or_else(|| {
            ConfigError::new(join(&p, "uri"), format!("not an absolute URI: '{}'", h.uri))
        })?;
    let cluster = match &h.http_upstream_type {
        Some(U::Cluster(c)) if !c.is_empty() => c.clone(),
        _ => return Err(ConfigError::new(join(&p, "cluster"), "cluster is required")),
    };
    let timeout = h
        .timeout
        .as_ref()
        .map(|d| crate::config::duration(d, &join(&p, "timeout")))
        .transpose()?
        .ok_or_else(|| ConfigError::new(join(&p, "timeout"), "timeout is required"))?;
    Ok(Some(TokenEndpoint {
        cluster,
        uri,
        timeout,
    }))
}

/// `authorization_endpoint`: an absolute URL, split at its query.
fn authorize(s: &str, path: &str) -> Result<(String, Vec<(String, String)>)> {
    let bad = || {
        ConfigError::new(
            join(path, "authorization_endpoint"),
            format!("OAuth2 filter: invalid authorization endpoint URL '{s}' in config."),
        )
    };
    let u: http::Uri = s.parse().map_err(|_| bad())?;
    let (Some(scheme), Some(authority)) = (u.scheme_str(), u.authority()) else {
        return Err(bad());
    };
    let base = format!(
        "{scheme}://{authority}{}",
        if u.path().is_empty() { "/" } else { u.path() }
    );
    let query = u
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    Ok((base, query))
}

fn forward_id(
    c: &pb::OAuth2Config,
    pass_through: &[HeaderMatcher],
    path: &str,
) -> Result<Option<HeaderName>> {
    let Some(f) = &c.forward_id_token else {
        return Ok(None);
    };
    let p = join(&join(path, "forward_id_token"), "header");
    let lower = f.header.to_ascii_lowercase();
    if lower.is_empty() || lower.starts_with(':') || lower == "host" {
        return Err(ConfigError::new(
            &p,
            format!("invalid forward_id_token configuration: header '{}' can not be used to forward the ID token; pseudo-headers and the Host header are not allowed", f.header),
        ));
    }
    let name = crate::headers::header_name(&lower, &p)?;
    if pass_through
        .iter()
        .any(|m| matches!(&m.name, crate::config::matcher::MatchName::Header(h) if *h == name))
    {
        return Err(ConfigError::new(
            join(path, "pass_through_matcher"),
            format!("invalid forward_id_token configuration: pass_through_matcher can not match on the forwarded ID token header '{}'", f.header),
        ));
    }
    Ok(Some(name))
}

impl Config {
    /// `stats_prefix`: where the counters live (`http.<hcm>.` for the
    /// filter's own config, the root for a route's).
    pub fn from_proto(c: &pb::OAuth2Config, path: &str, stats_prefix: &str) -> Result<Config> {
        if c.private_key_jwt_config.is_some() || c.auth_type == 3 {
            return Err(ConfigError::new(
                join(path, "auth_type"),
                "PRIVATE_KEY_JWT client authentication is not supported by Legate",
            ));
        }
        let auth_type = match c.auth_type {
            0 => AuthType::UrlEncodedBody,
            1 => AuthType::BasicAuth,
            2 => AuthType::TlsClientAuth,
            n => {
                return Err(ConfigError::new(
                    join(path, "auth_type"),
                    format!("unknown auth type {n}"),
                ))
            }
        };
        let cp = join(path, "credentials");
        let cr = required(c.credentials.as_ref(), path, "credentials")?;
        if cr.client_id.is_empty() {
            return Err(ConfigError::new(
                join(&cp, "client_id"),
                "client_id is required",
            ));
        }
        check_cookies(cr, c, path)?;
        let mut sds = Vec::new();
        use pb::o_auth2_credentials::TokenFormation;
        let hmac_secret = match &cr.token_formation {
            Some(TokenFormation::HmacSecret(s)) => {
                GenericSecret::from_proto(s, &join(&cp, "hmac_secret"), &mut sds)?
            }
            None => {
                return Err(ConfigError::new(
                    join(&cp, "hmac_secret"),
                    "hmac_secret is required",
                ))
            }
        };
        let token_secret = match (&cr.token_secret, auth_type) {
            (_, AuthType::TlsClientAuth) => None,
            (Some(s), _) => Some(GenericSecret::from_proto(
                s,
                &join(&cp, "token_secret"),
                &mut sds,
            )?),
            (None, _) => {
                return Err(ConfigError::new(
                    join(&cp, "token_secret"),
                    "token_secret is required when auth_type is not TLS_CLIENT_AUTH",
                ))
            }
        };
        if c.authorization_endpoint.is_empty() {
            return Err(ConfigError::new(
                join(path, "authorization_endpoint"),
                "authorization_endpoint is required",
            ));
        }
        let (authorize, authorize_query) = authorize(&c.authorization_endpoint, path)?;
        if c.redirect_uri.is_empty() {
            return Err(ConfigError::new(
                join(path, "redirect_uri"),
                "redirect_uri is required",
            ));
        }
        let pass_through = matchers(&c.pass_through_matcher, path, "pass_through_matcher")?;
        let forward_id = forward_id(c, &pass_through, path)?;
        let id_on_authorization = forward_id.as_ref() == Some(&http::header::AUTHORIZATION);
        if [
            c.forward_bearer_token,
            c.preserve_authorization_header,
            id_on_authorization,
        ]
        .iter()
        .filter(|b| **b)
        .count()
            > 1
        {
            return Err(ConfigError::new(
                path,
                "invalid OAuth2 configuration: at most one of forward_bearer_token, preserve_authorization_header, or forward_id_token (when forwarding the ID token on the Authorization header) may be set, as they all use the Authorization header",
            ));
        }
        let scopes: Vec<&str> = if c.auth_scopes.is_empty() {
            vec!["user"]
        } else {
            c.auth_scopes.iter().map(String::as_str).collect()
        };
        let end_session = Some(c.end_session_endpoint.clone()).filter(|e| !e.is_empty());
        if end_session.is_some() && !c.auth_scopes.iter().any(|s| s == "openid") {
            return Err(ConfigError::new(
                join(path, "end_session_endpoint"),
                "OAuth2 filter: end session endpoint is only supported for OpenID Connect.",
            ));
        }
        use pb::post_logout_redirect_uri::Config as P;
        let post_logout = match c
            .post_logout_redirect_uri
            .as_ref()
            .and_then(|p| p.config.as_ref())
        {
            None => PostLogout::Default,
            Some(P::Disabled(_)) => PostLogout::Disabled,
            Some(P::Uri(u)) => PostLogout::Uri(UriFormat::parse(
                u,
                &join(&join(path, "post_logout_redirect_uri"), "uri"),
            )?),
        };
        let retry = c
            .retry_policy
            .as_ref()
            .map(|p| Retry::from_proto(p, &join(path, "retry_policy"), "token requests"))
            .transpose()?;
        Ok(Config {
            token: token_endpoint(c.token_endpoint.as_ref(), path)?,
            retry,
            authorize,
            authorize_query,
            end_session,
            post_logout,
            client_id: cr.client_id.clone(),
            token_secret,
            hmac_secret,
            cookies: Cookies::from_proto(
                cr.cookie_names.as_ref(),
                c.cookie_configs.as_ref(),
                &cr.cookie_domain,
            ),
            redirect_uri: UriFormat::parse(&c.redirect_uri, &join(path, "redirect_uri"))?,
            redirect_path: path_matcher(
                c.redirect_path_matcher.as_ref(),
                path,
                "redirect_path_matcher",
            )?,
            signout_path: path_matcher(c.signout_path.as_ref(), path, "signout_path")?,
            forward_bearer: c.forward_bearer_token,
            forward_id,
            preserve_authorization: c.preserve_authorization_header,
            pass_through,
            scope: super::crypto::url_encode(&scopes.join(" ")),
            resources: c.resources.clone(),
            auth_type,
            use_refresh: c.use_refresh_token.val().unwrap_or(true),
            default_expires_in: seconds(&c.default_expires_in, path, "default_expires_in", 0)?,
            deny_redirect: matchers(&c.deny_redirect_matcher, path, "deny_redirect_matcher")?,
            default_refresh_expires_in: seconds(
                &c.default_refresh_token_expires_in,
                path,
                "default_refresh_token_expires_in",
                604_800,
            )?,
            disable_id_cookie: c.disable_id_token_set_cookie,
            disable_access_cookie: c.disable_access_token_set_cookie,
            disable_refresh_cookie: c.disable_refresh_token_set_cookie,
            csrf_expires_in: seconds(&c.csrf_token_expires_in, path, "csrf_token_expires_in", 600)?,
            verifier_expires_in: seconds(
                &c.code_verifier_token_expires_in,
                path,
                "code_verifier_token_expires_in",
                600,
            )?,
            encrypt_tokens: !c.disable_token_encryption,
            allow_failed: matchers(&c.allow_failed_matcher, path, "allow_failed_matcher")?,
            original_request_uri: Some(&c.original_request_uri)
                .filter(|u| !u.is_empty())
                .map(|u| UriFormat::parse(u, &join(path, "original_request_uri")))
                .transpose()?,
            allowed_domains: c.allowed_redirect_domains.clone(),
            id_expiry_from_access: c.use_access_token_expiry_for_id_token_cookie,
            // A stat_prefix is a scope of its own: a dot follows it.
            stats: crate::stats::NamedCounters::with(
                if c.stat_prefix.is_empty() {
                    stats_prefix.to_string()
                } else {
                    format!("{stats_prefix}{}.", c.stat_prefix)
                },
                &STATS,
            ),
            sds,
        })
    }

    /// Whether `url`'s host passes `allowed_redirect_domains` (all pass
    /// when it is empty): exact (any case), or `*.suffix` for a longer host.
    pub fn domain_allowed(&self, url: &str) -> bool {
        if self.allowed_domains.is_empty() {
            return true;
        }
        let Some(host) = url
            .parse::<http::Uri>()
            .ok()
            .and_then(|u| u.host().map(str::to_string))
        else {
            return false;
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.allowed_domains
            .iter()
            .any(|d| match d.strip_prefix("*.") {
                Some(suffix) => {
                    host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}"))
                }
                None => host.eq_ignore_ascii_case(d),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use legate_proto::envoy_types::pb::envoy::config::core::v3 as core;
    use legate_proto::envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::SdsSecretConfig;
    use legate_proto::envoy_types::pb::envoy::r#type::matcher::v3 as m;

    fn sds(name: &str) -> SdsSecretConfig {
        SdsSecretConfig {
            name: name.into(),
            sds_config: Some(core::ConfigSource {
                config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
                    Default::default(),
                )),
                resource_api_version: core::ApiVersion::V3 as i32,
                ..Default::default()
            }),
        }
    }

    fn exact(p: &str) -> Option<m::PathMatcher> {
        Some(m::PathMatcher {
            rule: Some(m::path_matcher::Rule::Path(m::StringMatcher {
                match_pattern: Some(m::string_matcher::MatchPattern::Exact(p.into())),
                ignore_case: false,
            })),
        })
    }

    fn config() -> pb::OAuth2Config {
        pb::OAuth2Config {
            authorization_endpoint: "https://idp.test/authorize?prompt=login".into(),
            redirect_uri: "%REQ(x-forwarded-proto)%://%REQ(:authority)%/callback".into(),
            redirect_path_matcher: exact("/callback"),
            signout_path: exact("/signout"),
            credentials: Some(pb::OAuth2Credentials {
                client_id: "app".into(),
                token_secret: Some(sds("tok")),
                token_formation: Some(pb::o_auth2_credentials::TokenFormation::HmacSecret(sds(
                    "hmac",
                ))),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_and_the_authorization_endpoint_split() {
        let c = Config::from_proto(&config(), "c", "http.x.").unwrap();
        assert_eq!(c.authorize, "https://idp.test/authorize");
        assert_eq!(
            c.authorize_query,
            vec![("prompt".to_string(), "login".to_string())]
        );
        assert_eq!(c.scope, "user");
        assert!(c.use_refresh && c.encrypt_tokens);
        assert_eq!(
            (c.csrf_expires_in, c.default_refresh_expires_in),
            (600, 604_800)
        );
        assert_eq!(c.sds.len(), 2);
        let mut h = http::HeaderMap::new();
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        let p = Pseudo {
            authority: "app.test",
            ..Default::default()
        };
        assert_eq!(c.redirect_uri.render(&h, &p), "https://app.test/callback");
        // A missing header renders as Envoy's substitution formatter does.
        assert_eq!(
            c.redirect_uri.render(&http::HeaderMap::new(), &p),
            "-://app.test/callback"
        );
    }

    #[test]
    fn refusals_name_their_field() {
        let mut c = config();
        c.auth_type = 3;
        let e = Config::from_proto(&c, "c", "").unwrap_err();
        assert_eq!(e.path, "c.auth_type");
        let mut c = config();
        c.forward_bearer_token = true;
        c.forward_id_token = Some(pb::OAuth2TokenForwarding {
            header: "Authorization".into(),
        });
        assert!(Config::from_proto(&c, "c", "").is_err());
        let mut c = config();
        c.redirect_uri = "%START_TIME%".into();
        assert_eq!(
            Config::from_proto(&c, "c", "").unwrap_err().path,
            "c.redirect_uri"
        );
    }

    #[test]
    fn cookie_settings_that_would_break_set_cookie_are_refused() {
        let mut c = config();
        c.credentials.as_mut().unwrap().cookie_domain = "a.test;secure".into();
        let e = Config::from_proto(&c, "c", "").unwrap_err();
        assert_eq!(e.path, "c.credentials.cookie_domain");
        let mut c = config();
        c.credentials.as_mut().unwrap().cookie_names = Some(pb::o_auth2_credentials::CookieNames {
            id_token: "Id Token".into(),
            ..Default::default()
        });
        let e = Config::from_proto(&c, "c", "").unwrap_err();
        assert_eq!(e.path, "c.credentials.cookie_names.id_token");
        let mut c = config();
        c.cookie_configs = Some(pb::CookieConfigs {
            oauth_hmac_cookie_config: Some(pb::CookieConfig {
                path: "app".into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        let e = Config::from_proto(&c, "c", "").unwrap_err();
        assert_eq!(e.path, "c.cookie_configs.oauth_hmac_cookie_config.path");
    }

    #[test]
    fn redirect_domains_allow_exact_hosts_and_wildcard_subdomains() {
        let mut c = config();
        c.allowed_redirect_domains = vec!["App.test".into(), "*.corp.test".into()];
        let c = Config::from_proto(&c, "c", "").unwrap();
        assert!(c.domain_allowed("https://app.test:8443/x"));
        assert!(c.domain_allowed("https://a.corp.test/"));
        assert!(!c.domain_allowed("https://corp.test/"));
        assert!(!c.domain_allowed("https://evil.test/"));
        assert!(!c.domain_allowed("/relative"));
    }
}
