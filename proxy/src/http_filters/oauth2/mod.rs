//! `envoy.filters.http.oauth2`: sign users in with an OAuth2 / OpenID
//! Connect provider, as Envoy's filter does. A request without valid
//! cookies is sent to the `authorization_endpoint` (PKCE, a signed CSRF
//! nonce in the state), the callback's code is exchanged at the
//! `token_endpoint`, and the tokens come back as cookies: encrypted
//! (AES-256-CBC) and bound together by an HMAC over the host, the expiry
//! and the tokens. Signed-in requests go upstream with the tokens in
//! plaintext (and as `Authorization` when asked); an expired login is
//! renewed with the refresh token. The filter's own `config` or a route's
//! `OAuth2PerRoute` (which replaces it) applies; with neither, requests
//! pass.

mod config;
mod cookies;
mod crypto;
mod token;

use super::{Factory, FilterReply, Flow, HttpFilter, PerRoute, RequestInfo, ResponseInfo, State};
use crate::config::matcher::Pseudo;
use crate::config::{join, ConfigError, Result};
use crate::registry::MessageSupport;
use config::{Config, PostLogout};
use cookies::{Jar, Kind};
use http::HeaderValue;
use legate_proto::envoy_types::pb::envoy::extensions::filters::http::oauth2::v3 as pb;
use legate_proto::envoy_types::pb::google::protobuf::Any;
use pingora_http::ResponseHeader;
use std::collections::BTreeMap;
use std::sync::Arc;
use token::{ExchangeError, Grant, Tokens};

const TYPE: &str = "envoy.extensions.filters.http.oauth2.v3.OAuth2";
const PER_ROUTE: &str = "envoy.extensions.filters.http.oauth2.v3.OAuth2PerRoute";
const STATUS: &str = "x-envoy-oauth-status";
const REASON: &str = "x-envoy-oauth-failure-reason";

pub static FACTORY: Factory = Factory {
    type_name: TYPE,
    build,
    per_route: &[(PER_ROUTE, per_route)],
};

pub static REGISTRY: &[MessageSupport] = &[
    MessageSupport {
        message: TYPE,
        supported: &["config"],
        warn: &[],
    },
    MessageSupport {
        message: PER_ROUTE,
        supported: &["config"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.oauth2.v3.OAuth2Config",
        supported: &[
            "token_endpoint",
            "retry_policy",
            "authorization_endpoint",
            "end_session_endpoint",
            "post_logout_redirect_uri",
            "credentials",
            "redirect_uri",
            "redirect_path_matcher",
            "signout_path",
            "forward_bearer_token",
            "forward_id_token",
            "preserve_authorization_header",
            "pass_through_matcher",
            "auth_scopes",
            "resources",
            "auth_type",
            "use_refresh_token",
            "default_expires_in",
            "deny_redirect_matcher",
            "default_refresh_token_expires_in",
            "disable_id_token_set_cookie",
            "disable_access_token_set_cookie",
            "disable_refresh_token_set_cookie",
            "cookie_configs",
            "stat_prefix",
            "csrf_token_expires_in",
            "code_verifier_token_expires_in",
            "disable_token_encryption",
            "allow_failed_matcher",
            "original_request_uri",
            "allowed_redirect_domains",
            "use_access_token_expiry_for_id_token_cookie",
        ],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.oauth2.v3.OAuth2Credentials",
        supported: &[
            "client_id",
            "token_secret",
            "hmac_secret",
            "cookie_names",
            "cookie_domain",
        ],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.oauth2.v3.OAuth2Credentials.CookieNames",
        supported: &[
            "bearer_token",
            "oauth_hmac",
            "oauth_expires",
            "id_token",
            "refresh_token",
            "oauth_nonce",
            "code_verifier",
        ],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.oauth2.v3.CookieConfigs",
        supported: &[
            "bearer_token_cookie_config",
            "oauth_hmac_cookie_config",
            "oauth_expires_cookie_config",
            "id_token_cookie_config",
            "refresh_token_cookie_config",
            "oauth_nonce_cookie_config",
            "code_verifier_cookie_config",
        ],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.oauth2.v3.CookieConfig",
        supported: &["same_site", "path", "partitioned"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.oauth2.v3.OAuth2TokenForwarding",
        supported: &["header"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.oauth2.v3.PostLogoutRedirectUri",
        supported: &["disabled", "uri"],
        warn: &[],
    },
];

#[derive(Debug)]
pub struct OAuth2 {
    /// The filter's own config; None: only routes' configs apply.
    config: Option<Arc<Config>>,
}

fn build(a: &Any, hcm_prefix: &str, path: &str) -> Result<Arc<dyn HttpFilter>> {
    let f: pb::OAuth2 = super::decode(a, path)?;
    let config = f
        .config
        .as_ref()
        .map(|c| Config::from_proto(c, &join(path, "config"), &format!("http.{hcm_prefix}.")))
        .transpose()?
        .map(Arc::new);
    Ok(Arc::new(OAuth2 { config }))
}

fn per_route(a: &Any, path: &str) -> Result<PerRoute> {
    let r: pb::OAuth2PerRoute = super::decode(a, path)?;
    let c = r
        .config
        .as_ref()
        .ok_or_else(|| ConfigError::new(join(path, "config"), "config is required"))?;
    Ok(Arc::new(Config::from_proto(c, &join(path, "config"), "")?))
}

/// The SDS secrets a route's `OAuth2PerRoute` reads (its route table's
/// owner subscribes to them; until they arrive its requests get Envoy's
/// 503).
pub fn per_route_sds(c: &PerRoute) -> &[(String, crate::config::source::XdsSource)] {
    c.downcast_ref::<Config>().map_or(&[], |c| &c.sds)
}

/// Set-Cookie values a renewed login adds to the upstream's response.
struct Renewed(Vec<String>);

/// Response details as Envoy records them: whitespace as `_`.
fn details(msg: &str) -> String {
    msg.replace(char::is_whitespace, "_")
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The 302 the filter answers with (no body: Envoy sends it as headers
/// only).
fn found(location: &str, set_cookies: Vec<String>, why: &'static str) -> FilterReply {
    let mut r = FilterReply::new(302, "", why);
    for c in set_cookies {
        if let Ok(v) = HeaderValue::from_str(&c) {
            r.headers.push((http::header::SET_COOKIE, v));
        }
    }
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers.push((http::header::LOCATION, v));
    }
    r
}

/// One request's pass through a config: its secrets and what it read.
struct Pass<'a> {
    c: &'a Config,
    /// The HMAC secret (also the encryption key's source).
    key: bytes::Bytes,
    /// The client secret (empty for TLS client authentication).
    secret: String,
    /// Host or `:authority`, port included.
    host: String,
    /// `:scheme` as Envoy's connection manager sets it.
    scheme: String,
    path: String,
    jar: Jar,
    /// The request came with cookies (their header is rewritten, even
    /// when none is left, as Envoy does).
    had_cookies: bool,
    now: u64,
}

impl Pass<'_> {
    fn count(&self, name: &'static str) {
        self.c.stats.increment(name);
    }

    fn unauthorized(&self, msg: &str, flow_id: &str) -> Flow {
        self.count("oauth_failure");
        let mut r = FilterReply::new(401, "OAuth flow failed.", "");
        r.details = details(msg).into();
        for d in self.flow_deletions(flow_id) {
            if let Ok(v) = HeaderValue::from_str(&d) {
                r.headers.push((http::header::SET_COOKIE, v));
            }
        }
        Flow::Reply(r)
    }

    /// The deletions of a finished flow's cookies (none without its id).
    fn flow_deletions(&self, flow_id: &str) -> Vec<String> {
        if flow_id.is_empty() {
            return Vec::new();
        }
        let k = &self.c.cookies;
        let (n, v) = (k.name(Kind::Nonce), k.name(Kind::Verifier));
        vec![
            k.delete(Kind::Nonce, &format!("{n}.{flow_id}")),
            k.delete(Kind::Nonce, n),
            k.delete(Kind::Verifier, &format!("{v}.{flow_id}")),
            k.delete(Kind::Verifier, v),
        ]
    }

    /// The domain the HMAC binds: `cookie_domain`, else the host.
    fn domain(&self) -> &str {
        if self.c.cookies.domain.is_empty() {
            &self.host
        } else {
            &self.c.cookies.domain
        }
    }

    fn signature(&self, expires: &str, access: &str, id: &str, refresh: &str) -> [u8; 32] {
        let payload = format!("{}\n{expires}\n{access}\n{id}\n{refresh}", self.domain());
        crypto::hmac(&self.key, payload.as_bytes())
    }

    /// Whether the cookies hold a login: their HMAC (raw or hex digest,
    /// base64) matches and `OauthExpires` is in the future.
    fn signed_in(&self) -> bool {
        let j = &self.jar;
        let k = &self.c.cookies;
        let expires = j.get(k.name(Kind::Expires));
        let sig = self.signature(
            expires,
            j.get(k.name(Kind::Bearer)),
            j.get(k.name(Kind::Id)),
            j.get(k.name(Kind::Refresh)),
        );
        let got = j.get(k.name(Kind::Hmac)).as_bytes();
        let hex: String = sig.iter().map(|b| format!("{b:02x}")).collect();
        let eq = |want: String| {
            ring::constant_time::verify_slices_are_equal(want.as_bytes(), got).is_ok()
        };
        (eq(crypto::b64(&sig)) || eq(crypto::b64(hex.as_bytes())))
            && expires.parse::<u64>().is_ok_and(|e| e > self.now)
    }

    fn pseudo<'b>(&'b self, rq: &'b RequestInfo<'_>) -> Pseudo<'b> {
        Pseudo {
            method: rq.req.method.as_str(),
            path: &self.path,
            authority: &self.host,
            scheme: &self.scheme,
            status: None,
        }
    }

    /// The path without its query or fragment, as path matchers see it.
    fn bare_path(&self) -> &str {
        self.path.split(['?', '#']).next().unwrap_or("")
    }
}

fn set_cookie_header(rq: &mut RequestInfo<'_>, jar: &Jar) {
    let _ = rq.req.insert_header(http::header::COOKIE, jar.header());
}

impl OAuth2 {
    /// The tokens go upstream: `Authorization: Bearer` and the ID token's
    /// header, as configured.
    fn forward(c: &Config, rq: &mut RequestInfo<'_>, access: &str, id: &str) {
        if c.forward_bearer && !access.is_empty() {
            let _ = rq
                .req
                .insert_header(http::header::AUTHORIZATION, format!("Bearer {access}"));
        }
        if let Some(h) = &c.forward_id {
            if !id.is_empty() {
                let v = if *h == http::header::AUTHORIZATION {
                    format!("Bearer {id}")
                } else {
                    id.to_string()
                };
                let _ = rq.req.insert_header(h.clone(), v);
            }
        }
    }

    /// The request goes on without the cookies only the filter reads.
    fn strip_flow_cookies(p: &mut Pass<'_>, rq: &mut RequestInfo<'_>) {
        if !p.had_cookies {
            return;
        }
        let k = &p.c.cookies;
        let gone = [Kind::Hmac, Kind::Expires, Kind::Refresh].map(|x| k.name(x).to_string());
        p.jar
            .retain(|n| !gone.iter().any(|g| g == n) && !k.is_flow(n));
        set_cookie_header(rq, &p.jar);
    }

    /// Token cookies hold plaintext from here on (a value that does not
    /// decrypt is kept as it is: an older login's plaintext).
    fn decrypt_cookies(p: &mut Pass<'_>, rq: &mut RequestInfo<'_>) {
        let mut any = false;
        for kind in [Kind::Bearer, Kind::Id, Kind::Refresh] {
            let name = p.c.cookies.name(kind).to_string();
            if !p.jar.has(&name) {
                continue;
            }
            any = true;
            let v = p.jar.get(&name);
            if v.is_empty() {
                continue;
            }
            if let Ok(plain) = crypto::decrypt(&p.key, v) {
                if let Ok(s) = String::from_utf8(plain) {
                    if HeaderValue::from_str(&s).is_ok() {
                        p.jar.replace(&name, s);
                        p.count("oauth_legacy_cbc_decrypt");
                    }
                }
            }
        }
        if any {
            set_cookie_header(rq, &p.jar);
        }
    }

    fn maybe_encrypt(p: &Pass<'_>, v: &str) -> String {
        if p.c.encrypt_tokens {
            crypto::encrypt(&p.key, v.as_bytes())
        } else {
            v.to_string()
        }
    }

    /// The Set-Cookie values of a login: the HMAC, the expiry and each
    /// token (or the deletion of a token the request had and the login
    /// lacks).
    /// `received_refresh`: the refresh token the endpoint sent (its `exp`
    /// gives the cookie's age), which `t` may have replaced with the old.
    fn token_cookies(p: &Pass<'_>, t: &Tokens, received_refresh: &str) -> Vec<String> {
        let c = p.c;
        let k = &c.cookies;
        let expires = p.now.saturating_add(t.expires_in).to_string();
        let sig = crypto::b64(&p.signature(&expires, &t.access, &t.id, &t.refresh));
        let mut out = vec![
            k.set(Kind::Hmac, "", &sig, t.expires_in),
            k.set(Kind::Expires, "", &expires, t.expires_in),
        ];
        let left = |exp: u64| exp.saturating_sub(p.now);
        let id_age = match crypto::jwt_exp(&t.id) {
            Some(exp) if !c.id_expiry_from_access => left(exp),
            _ => t.expires_in,
        };
        let refresh_age = if c.use_refresh {
            crypto::jwt_exp(received_refresh).map_or(c.default_refresh_expires_in, left)
        } else {
            t.expires_in
        };
        for (kind, value, age) in [
            (Kind::Bearer, &t.access, t.expires_in),
            (Kind::Id, &t.id, id_age),
            (Kind::Refresh, &t.refresh, refresh_age),
        ] {
            if !value.is_empty() {
                out.push(k.set(kind, "", &Self::maybe_encrypt(p, value), age));
            } else if p.jar.has(k.name(kind)) {
                out.push(k.delete_token(kind));
            }
        }
        out
    }

    /// The tokens a login keeps, as the disable_* switches say.
    fn kept(c: &Config, t: Tokens) -> Tokens {
        Tokens {
            access: if c.disable_access_cookie {
                String::new()
            } else {
                t.access
            },
            id: if c.disable_id_cookie {
                String::new()
            } else {
                t.id
            },
            refresh: if c.use_refresh && !c.disable_refresh_cookie {
                t.refresh
            } else {
                String::new()
            },
            expires_in: t.expires_in,
        }
    }

    /// Off to the authorization server: the original URL in the state
    /// with a signed nonce, PKCE's challenge, and the flow's cookies.
    fn redirect(p: &Pass<'_>, rq: &RequestInfo<'_>) -> Flow {
        let c = p.c;
        let pseudo = p.pseudo(rq);
        let base = match &c.original_request_uri {
            Some(f) => f.render(&rq.req.headers, &pseudo),
            None => {
                let scheme = if p.scheme.eq_ignore_ascii_case("http") {
                    "http"
                } else {
                    "https"
                };
                format!("{scheme}://{}", p.host)
            }
        };
        if !c.domain_allowed(&base) {
            return p.unauthorized(
                &format!(
                    "authority or original_request_uri failed domain allow-list validation: {base}"
                ),
                "",
            );
        }
        let url = format!("{base}{}", p.path);
        let flow = crypto::flow_id();
        let csrf = crypto::csrf_token(&p.key, &flow);
        let json = |s: &str| serde_json::Value::from(s).to_string();
        let state = crypto::b64url(
            format!(
                "{{\"url\":{},\"csrf_token\":{},\"flow_id\":{}}}",
                json(&url),
                json(&csrf),
                json(&flow)
            )
            .as_bytes(),
        );
        let redirect_uri = c.redirect_uri.render(&rq.req.headers, &pseudo);
        if !c.domain_allowed(&redirect_uri) {
            return p.unauthorized(
                &format!("redirect_uri failed domain allow-list validation: {redirect_uri}"),
                "",
            );
        }
        let (verifier, challenge) = crypto::pkce();
        let mut q: BTreeMap<&str, String> = c
            .authorize_query
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        q.insert("client_id", c.client_id.clone());
        q.insert("code_challenge", challenge);
        q.insert("code_challenge_method", "S256".into());
        q.insert("redirect_uri", crypto::url_encode(&redirect_uri));
        q.insert("response_type", "code".into());
        q.insert("scope", c.scope.clone());
        q.insert("state", state);
        let mut location = format!(
            "{}?{}",
            c.authorize,
            q.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("&")
        );
        for r in &c.resources {
            location.push_str(&format!("&resource={}", crypto::url_encode(r)));
        }
        let k = &c.cookies;
        let enc_verifier = crypto::encrypt(&p.key, verifier.as_bytes());
        let cookies = vec![
            k.set(Kind::Nonce, &format!(".{flow}"), &csrf, c.csrf_expires_in),
            k.set(Kind::Nonce, "", &csrf, c.csrf_expires_in),
            k.set(
                Kind::Verifier,
                &format!(".{flow}"),
                &enc_verifier,
                c.verifier_expires_in,
            ),
            k.set(Kind::Verifier, "", &enc_verifier, c.verifier_expires_in),
        ];
        p.count("oauth_unauthorized_rq");
        Flow::Reply(found(&location, cookies, "oauth.missing_credentials"))
    }

    /// Sign-out: every login cookie deleted, and off to the provider's
    /// end-session endpoint or the host's root.
    fn sign_out(p: &Pass<'_>, rq: &RequestInfo<'_>) -> Flow {
        let c = p.c;
        let k = &c.cookies;
        let mut cookies: Vec<String> = [
            Kind::Hmac,
            Kind::Bearer,
            Kind::Id,
            Kind::Refresh,
            Kind::Expires,
        ]
        .iter()
        .map(|x| k.delete(*x, k.name(*x)))
        .collect();
        for n in p.jar.names().filter(|n| k.is_flow(n)) {
            cookies.push(k.delete(k.flow_kind(n), n));
        }
        let root = format!("{}://{}/", p.scheme, p.host);
        let location = match &c.end_session {
            None => root,
            Some(es) => {
                let mut l = format!(
                    "{es}?id_token_hint={}&client_id={}",
                    p.jar.get(k.name(Kind::Id)),
                    c.client_id
                );
                let after = match &c.post_logout {
                    PostLogout::Disabled => None,
                    PostLogout::Default => Some(root),
                    PostLogout::Uri(f) => Some(f.render(&rq.req.headers, &p.pseudo(rq))),
                };
                if let Some(a) = after {
                    l.push_str(&format!(
                        "&post_logout_redirect_uri={}",
                        crypto::url_encode(&a)
                    ));
                }
                l
            }
        };
        Flow::Reply(found(&location, cookies, "oauth.sign_out"))
    }
}

/// A callback that checks out: where the user was going, the flow, the
/// code and the flow's code verifier.
struct Callback {
    url: String,
    flow_id: String,
    code: String,
    verifier: String,
}

/// A callback that does not: why, and the flow if its CSRF token held.
struct Refused {
    msg: String,
    flow_id: String,
}

fn refused(msg: String) -> Refused {
    Refused {
        msg,
        flow_id: String::new(),
    }
}

/// The query's parameters, raw, sorted by name (each name's values in
/// order), as Envoy's filter parses them.
fn query_params(path: &str) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let q = path.split_once('?').map_or("", |(_, q)| q);
    let q = q.split('#').next().unwrap_or("");
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        m.entry(k.to_string()).or_default().push(v.to_string());
    }
    m
}

fn query_text(m: &BTreeMap<String, Vec<String>>) -> String {
    let pairs: Vec<String> = m
        .iter()
        .flat_map(|(k, vs)| vs.iter().map(move |v| format!("{k}={v}")))
        .collect();
    format!("?{}", pairs.join("&"))
}

impl Pass<'_> {
    /// The state's URL and flow, if its CSRF token matches the flow's
    /// signed nonce cookie.
    fn check_state(&self, state: &str) -> std::result::Result<(String, String), Refused> {
        let decoded = crypto::unb64url(state)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&decoded)
            .ok()
            .filter(|v: &serde_json::Value| v.is_object())
            .ok_or_else(|| refused(format!("State query param is not a valid JSON: {decoded}")))?;
        // A key that is there but not a string counts as empty, as Envoy
        // reads it (its checks then fail further on).
        let field = |k: &str| v.get(k).map(|x| x.as_str().unwrap_or("").to_string());
        let (Some(url), Some(csrf)) = (field("url"), field("csrf_token")) else {
            return Err(refused(format!(
                "State query param does not contain url or CSRF token: {decoded}"
            )));
        };
        let flow_id = field("flow_id").unwrap_or_default();
        let k = &self.c.cookies;
        let nonce = Some(self.jar.get(&format!("{}.{flow_id}", k.name(Kind::Nonce))))
            .filter(|n| !n.is_empty() && !flow_id.is_empty())
            .unwrap_or_else(|| self.jar.get(k.name(Kind::Nonce)));
        let same =
            ring::constant_time::verify_slices_are_equal(nonce.as_bytes(), csrf.as_bytes()).is_ok();
        if nonce.is_empty() || !same || !crypto::csrf_signed(&self.key, &csrf) {
            return Err(refused("CSRF token validation failed".into()));
        }
        Ok((url, flow_id))
    }

    /// Envoy's checks of a callback, in its order: the state's, then the
    /// flow's code verifier.
    fn check_callback(&self) -> std::result::Result<Callback, Refused> {
        let mut cb = self.check_state_url()?;
        let flow_id = &cb.flow_id;
        let fail = |msg: String| Refused {
            msg,
            flow_id: flow_id.clone(),
        };
        let k = &self.c.cookies;
        let vname = k.name(Kind::Verifier);
        let cookie = Some(self.jar.get(&format!("{vname}.{flow_id}")))
            .filter(|v| !v.is_empty() && !flow_id.is_empty())
            .unwrap_or_else(|| self.jar.get(vname));
        if cookie.is_empty() {
            return Err(fail(
                "Code verifier cookie is missing in the request".into(),
            ));
        }
        let verifier = crypto::decrypt(&self.key, cookie)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .map_err(|e| {
                fail(format!(
                    "Failed to decrypt code verifier: {cookie}, error: {e}"
                ))
            })?;
        self.count("oauth_legacy_cbc_decrypt");
        cb.verifier = verifier;
        Ok(cb)
    }

    /// The callback's query and state: the provider's error, the code and
    /// state, the CSRF token, the URL to go back to (a signed-in user's
    /// second callback stops here).
    fn check_state_url(&self) -> std::result::Result<Callback, Refused> {
        let q = query_params(&self.path);
        let first = |k: &str| q.get(k).and_then(|v| v.first()).cloned();
        if q.contains_key("error") {
            let flow_id = first("state")
                .and_then(|s| self.check_state(&s).ok())
                .map(|(_, f)| f)
                .unwrap_or_default();
            return Err(Refused {
                msg: format!("OAuth server returned an error: {}", query_text(&q)),
                flow_id,
            });
        }
        let (Some(code), Some(state)) = (first("code"), first("state")) else {
            return Err(refused(format!(
                "Code or state query param does not exist: {}",
                query_text(&q)
            )));
        };
        let (url, flow_id) = self.check_state(&state)?;
        let fail = |msg: String| Refused {
            msg,
            flow_id: flow_id.clone(),
        };
        let parsed = url
            .parse::<http::Uri>()
            .ok()
            .filter(|u| u.scheme().is_some() && u.authority().is_some());
        if parsed.is_none() {
            return Err(fail(format!("State url can not be initialized: {url}")));
        }
        if !self.c.domain_allowed(&url) {
            return Err(fail(format!(
                "State url host is not in the allowed redirect domains: {url}"
            )));
        }
        Ok(Callback {
            url,
            flow_id,
            code,
            verifier: String::new(),
        })
    }
}

impl OAuth2 {
    /// A signed-in user back at the callback (a second tab, a reload):
    /// sent on to where the state says, the flow's cookies deleted.
    fn race(p: &Pass<'_>) -> Flow {
        let cb = match p.check_state_url() {
            Ok(cb) => cb,
            Err(r) => return p.unauthorized(&r.msg, &r.flow_id),
        };
        let target = cb.url.parse::<http::Uri>().ok();
        let target_path = target.as_ref().map_or("", |u| u.path());
        if p.c.redirect_path.matches(target_path) {
            let pq = target
                .as_ref()
                .and_then(|u| u.path_and_query())
                .map_or("", |x| x.as_str());
            return p.unauthorized(
                &format!("State url query params matches the redirect path matcher: {pq}"),
                &cb.flow_id,
            );
        }
        Flow::Reply(found(
            &cb.url,
            p.flow_deletions(&cb.flow_id),
            "oauth.race_redirect",
        ))
    }

    /// The provider's callback: the code exchanged for tokens, which come
    /// back as cookies with a redirect to where the user was going.
    async fn callback(p: &Pass<'_>, rq: &RequestInfo<'_>) -> Flow {
        let cb = match p.check_callback() {
            Ok(cb) => cb,
            Err(r) => return p.unauthorized(&r.msg, &r.flow_id),
        };
        let redirect_uri = p.c.redirect_uri.render(&rq.req.headers, &p.pseudo(rq));
        let grant = Grant::Code {
            code: &cb.code,
            redirect_uri: &redirect_uri,
            verifier: &cb.verifier,
        };
        let tokens = match token::exchange(p.c, rq.clusters, &p.secret, &grant).await {
            Ok(t) => Self::kept(p.c, t),
            Err(e) => return p.unauthorized(&e.to_string(), &cb.flow_id),
        };
        let mut cookies = Self::token_cookies(p, &tokens, &tokens.refresh);
        cookies.extend(p.flow_deletions(&cb.flow_id));
        p.count("oauth_success");
        Flow::Reply(found(&cb.url, cookies, "oauth.logged_in"))
    }

    /// An expired login renewed with its refresh token: the request goes
    /// on with the new tokens, which the response sets as cookies.
    async fn refresh(
        p: &mut Pass<'_>,
        rq: &mut RequestInfo<'_>,
        state: &mut Option<State>,
    ) -> Flow {
        let k = p.c.cookies.clone();
        let old = p.jar.get(k.name(Kind::Refresh)).to_string();
        let got =
            token::exchange(p.c, rq.clusters, &p.secret, &Grant::Refresh { token: &old }).await;
        let t = match got {
            Ok(t) => t,
            Err(e) => return Self::refresh_failed(p, rq, &e),
        };
        let mut t = Self::kept(p.c, t);
        let received = std::mem::take(&mut t.refresh);
        t.refresh = if received.is_empty() {
            old
        } else {
            received.clone()
        };
        *state = Some(Box::new(Renewed(Self::token_cookies(p, &t, &received))));
        // The new tokens go upstream in the cookies too, added when the
        // browser no longer sent them (expired with the login).
        for (kind, v) in [(Kind::Bearer, &t.access), (Kind::Id, &t.id)] {
            if !v.is_empty() {
                p.jar.set(k.name(kind), v.clone());
            }
        }
        set_cookie_header(rq, &p.jar);
        Self::forward(p.c, rq, &t.access, &t.id);
        Self::strip_flow_cookies(p, rq);
        p.count("oauth_refreshtoken_success");
        p.count("oauth_success");
        Flow::Continue
    }

    fn refresh_failed(p: &mut Pass<'_>, rq: &mut RequestInfo<'_>, e: &ExchangeError) -> Flow {
        let allowed = Self::allow_failed(p, rq);
        if !e.is_call_failure() {
            if allowed {
                return Self::pass_unauthenticated(p, rq, &e.to_string());
            }
            return p.unauthorized(&e.to_string(), "");
        }
        p.count("oauth_refreshtoken_failure");
        if allowed {
            return Self::pass_unauthenticated(
                p,
                rq,
                "Failed to refresh the access token, and forwarding as unauthorized because OAuth failure is allowed",
            );
        }
        if Self::deny_redirect(p, rq) {
            return p.unauthorized("Failed to refresh the access token, and redirecting to OAuth server is not allowed", "");
        }
        Self::redirect(p, rq)
    }

    fn allow_failed(p: &Pass<'_>, rq: &RequestInfo<'_>) -> bool {
        let pseudo = p.pseudo(rq);
        p.c.allow_failed
            .iter()
            .any(|m| m.matches_with(&rq.req.headers, &pseudo))
    }

    fn deny_redirect(p: &Pass<'_>, rq: &RequestInfo<'_>) -> bool {
        let pseudo = p.pseudo(rq);
        p.c.deny_redirect
            .iter()
            .any(|m| m.matches_with(&rq.req.headers, &pseudo))
    }

    /// `allow_failed_matcher`: on upstream without any login cookie,
    /// marked as failed.
    fn pass_unauthenticated(p: &mut Pass<'_>, rq: &mut RequestInfo<'_>, reason: &str) -> Flow {
        let k = p.c.cookies.clone();
        let tokens = [
            Kind::Bearer,
            Kind::Id,
            Kind::Hmac,
            Kind::Expires,
            Kind::Refresh,
        ]
        .map(|x| k.name(x).to_string());
        p.jar.retain(|n| !tokens.iter().any(|t| t == n));
        Self::strip_flow_cookies(p, rq);
        let _ = rq.req.insert_header(STATUS, "failed");
        if let Ok(v) = HeaderValue::from_str(reason) {
            let _ = rq.req.insert_header(REASON, v);
        }
        p.count("oauth_allow_failed_passthrough");
        Flow::Continue
    }

    /// Not signed in, not at the callback.
    async fn signed_out(
        p: &mut Pass<'_>,
        rq: &mut RequestInfo<'_>,
        state: &mut Option<State>,
    ) -> Flow {
        if p.c.use_refresh && !p.jar.get(p.c.cookies.name(Kind::Refresh)).is_empty() {
            return Self::refresh(p, rq, state).await;
        }
        if Self::allow_failed(p, rq) {
            let reason = format!(
                "Unauthorized, and forwarding as unauthorized because OAuth failure is allowed: {}",
                p.path
            );
            return Self::pass_unauthenticated(p, rq, &reason);
        }
        if Self::deny_redirect(p, rq) {
            let msg = format!(
                "Unauthorized, and redirecting to OAuth server is not allowed: {}",
                p.path
            );
            return p.unauthorized(&msg, "");
        }
        Self::redirect(p, rq)
    }

    async fn run(c: &Config, rq: &mut RequestInfo<'_>, state: &mut Option<State>) -> Flow {
        if let Some(h) = &c.forward_id {
            if *h != http::header::AUTHORIZATION {
                rq.req.remove_header(h);
            }
        }
        let host = rq.authority().to_string();
        let path = rq
            .req
            .uri
            .path_and_query()
            .map_or("/", |x| x.as_str())
            .to_string();
        let scheme = rq
            .req
            .headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .filter(|s| s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https"))
            .unwrap_or(rq.scheme)
            .to_string();
        let pseudo = Pseudo {
            method: rq.req.method.as_str(),
            path: &path,
            authority: &host,
            scheme: &scheme,
            status: None,
        };
        if c.pass_through
            .iter()
            .any(|m| m.matches_with(&rq.req.headers, &pseudo))
        {
            c.stats.increment("oauth_passthrough");
            return Flow::Continue;
        }
        let key = c.hmac_secret.current().filter(|k| !k.is_empty());
        let secret = match &c.token_secret {
            None => Some(bytes::Bytes::new()),
            Some(s) => s.current().filter(|s| !s.is_empty()),
        };
        let (Some(key), Some(secret)) = (key, secret) else {
            c.stats.increment("oauth_failure");
            return Flow::Reply(FilterReply::new(
                503,
                "Service Unavailable",
                "OAuth2_secrets_are_not_ready",
            ));
        };
        let mut p = Pass {
            c,
            key,
            secret: String::from_utf8_lossy(&secret).into_owned(),
            host,
            scheme,
            path,
            jar: Jar::read(&rq.req.headers),
            had_cookies: rq.req.headers.contains_key(http::header::COOKIE),
            now: now(),
        };
        if c.encrypt_tokens {
            Self::decrypt_cookies(&mut p, rq);
        }
        if !c.preserve_authorization {
            rq.req.remove_header(&http::header::AUTHORIZATION);
        }
        let callback = c.redirect_path.matches(p.bare_path());
        if c.signout_path.matches(p.bare_path()) {
            return Self::sign_out(&p, rq);
        }
        if p.signed_in() {
            p.count("oauth_success");
            let k = &c.cookies;
            let (access, id) = (
                p.jar.get(k.name(Kind::Bearer)).to_string(),
                p.jar.get(k.name(Kind::Id)).to_string(),
            );
            Self::forward(c, rq, &access, &id);
            if callback {
                return Self::race(&p);
            }
            Self::strip_flow_cookies(&mut p, rq);
            return Flow::Continue;
        }
        if callback {
            return Self::callback(&p, rq).await;
        }
        Self::signed_out(&mut p, rq, state).await
    }
}

#[async_trait::async_trait]
impl HttpFilter for OAuth2 {
    async fn on_request(&self, rq: &mut RequestInfo<'_>, state: &mut Option<State>) -> Flow {
        rq.req.remove_header(STATUS);
        rq.req.remove_header(REASON);
        let route: Option<Arc<Config>> = rq.all_levels::<Config>().next();
        let Some(c) = route.or_else(|| self.config.clone()) else {
            return Flow::Continue;
        };
        Self::run(&c, rq, state).await
    }

    fn on_response(
        &self,
        resp: &mut ResponseHeader,
        _info: &ResponseInfo<'_>,
        state: Option<&State>,
    ) {
        let Some(Renewed(cookies)) = state.and_then(|s| s.downcast_ref::<Renewed>()) else {
            return;
        };
        for c in cookies {
            if let Ok(v) = HeaderValue::from_str(c) {
                let _ = resp.append_header(http::header::SET_COOKIE, v);
            }
        }
    }

    fn sds_refs(&self) -> &[(String, crate::config::source::XdsSource)] {
        self.config.as_ref().map_or(&[], |c| &c.sds)
    }
}
