//! The OAuth2 filter's cookies: their names and attributes, the
//! `Set-Cookie` values it writes and deletes, and the request's `Cookie`
//! header as it reads and rewrites it.

use legate_proto::envoy_types::pb::envoy::extensions::filters::http::oauth2::v3 as pb;

/// The seven cookies, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bearer,
    Hmac,
    Expires,
    Id,
    Refresh,
    Nonce,
    Verifier,
}

const KINDS: [Kind; 7] = [
    Kind::Bearer,
    Kind::Hmac,
    Kind::Expires,
    Kind::Id,
    Kind::Refresh,
    Kind::Nonce,
    Kind::Verifier,
];

/// A cookie's name and the attributes it is set with.
#[derive(Debug, Clone)]
pub struct Cookie {
    pub name: String,
    path: String,
    /// `;SameSite=...`, or empty.
    same_site: &'static str,
    partitioned: bool,
}

/// Every cookie's settings, and the domain they are set for.
#[derive(Debug, Clone)]
pub struct Cookies {
    all: [Cookie; 7],
    /// `credentials.cookie_domain` (empty: host-only cookies).
    pub domain: String,
}

impl Cookies {
    pub fn from_proto(
        names: Option<&pb::o_auth2_credentials::CookieNames>,
        configs: Option<&pb::CookieConfigs>,
        domain: &str,
    ) -> Cookies {
        let all = KINDS.map(|k| {
            let (name, default, config) = pick(k, names, configs);
            let same_site = match config.map(|c| c.same_site) {
                Some(1) => ";SameSite=Strict",
                Some(2) => ";SameSite=Lax",
                Some(3) => ";SameSite=None",
                _ => "",
            };
            Cookie {
                name: if name.is_empty() { default } else { name }.to_string(),
                path: config
                    .map(|c| c.path.as_str())
                    .filter(|p| !p.is_empty())
                    .unwrap_or("/")
                    .to_string(),
                same_site,
                partitioned: config.is_some_and(|c| c.partitioned),
            }
        });
        Cookies {
            all,
            domain: domain.to_string(),
        }
    }

    pub fn get(&self, k: Kind) -> &Cookie {
        &self.all[KINDS.iter().position(|x| *x == k).unwrap_or(0)]
    }

    pub fn name(&self, k: Kind) -> &str {
        &self.get(k).name
    }

    /// `<name>=<value>` with the attributes Envoy sets.
    pub fn set(&self, k: Kind, name_suffix: &str, value: &str, max_age: u64) -> String {
        let c = self.get(k);
        let mut s = format!("{}{name_suffix}={value}", c.name);
        if !self.domain.is_empty() {
            s.push_str(&format!(";domain={}", self.domain));
        }
        s.push_str(&format!(
            ";path={};Max-Age={max_age};secure;HttpOnly{}",
            c.path, c.same_site
        ));
        if c.partitioned {
            s.push_str(";Partitioned");
        }
        s
    }

    /// The deletion of a token cookie after a login (never `Secure`).
    pub fn delete_token(&self, k: Kind) -> String {
        let c = self.get(k);
        self.deletion(&c.name, &c.path, false)
    }

    /// The deletion of cookie `name` (of `k`'s path) at sign-out or for a
    /// finished flow: `Secure` when the name's prefix demands it.
    pub fn delete(&self, k: Kind, name: &str) -> String {
        let secure = name.starts_with("__Secure-") || name.starts_with("__Host-");
        self.deletion(name, &self.get(k).path, secure)
    }

    fn deletion(&self, name: &str, path: &str, secure: bool) -> String {
        let mut s = format!("{name}=deleted; path={path}; expires=Thu, 01 Jan 1970 00:00:00 GMT");
        if !self.domain.is_empty() {
            s.push_str(&format!(";domain={}", self.domain));
        }
        if secure {
            s.push_str("; Secure");
        }
        s
    }

    /// Whether `name` is one of a login flow's cookies (the nonce and the
    /// code verifier, bare or suffixed with `.<flow id>`).
    pub fn is_flow(&self, name: &str) -> bool {
        [Kind::Nonce, Kind::Verifier].iter().any(|k| {
            let base = self.name(*k);
            name == base || name.strip_prefix(base).is_some_and(|r| r.starts_with('.'))
        })
    }

    /// The flow's kind of a flow cookie name.
    pub fn flow_kind(&self, name: &str) -> Kind {
        let n = self.name(Kind::Nonce);
        if name == n || name.strip_prefix(n).is_some_and(|r| r.starts_with('.')) {
            Kind::Nonce
        } else {
            Kind::Verifier
        }
    }
}

fn pick<'a>(
    k: Kind,
    names: Option<&'a pb::o_auth2_credentials::CookieNames>,
    configs: Option<&'a pb::CookieConfigs>,
) -> (&'a str, &'static str, Option<&'a pb::CookieConfig>) {
    let n = |f: fn(&pb::o_auth2_credentials::CookieNames) -> &String| {
        names.map_or("", |n| f(n).as_str())
    };
    let c = |f: fn(&pb::CookieConfigs) -> Option<&pb::CookieConfig>| configs.and_then(f);
    match k {
        Kind::Bearer => (
            n(|n| &n.bearer_token),
            "BearerToken",
            c(|c| c.bearer_token_cookie_config.as_ref()),
        ),
        Kind::Hmac => (
            n(|n| &n.oauth_hmac),
            "OauthHMAC",
            c(|c| c.oauth_hmac_cookie_config.as_ref()),
        ),
        Kind::Expires => (
            n(|n| &n.oauth_expires),
            "OauthExpires",
            c(|c| c.oauth_expires_cookie_config.as_ref()),
        ),
        Kind::Id => (
            n(|n| &n.id_token),
            "IdToken",
            c(|c| c.id_token_cookie_config.as_ref()),
        ),
        Kind::Refresh => (
            n(|n| &n.refresh_token),
            "RefreshToken",
            c(|c| c.refresh_token_cookie_config.as_ref()),
        ),
        Kind::Nonce => (
            n(|n| &n.oauth_nonce),
            "OauthNonce",
            c(|c| c.oauth_nonce_cookie_config.as_ref()),
        ),
        Kind::Verifier => (
            n(|n| &n.code_verifier),
            "CodeVerifier",
            c(|c| c.code_verifier_cookie_config.as_ref()),
        ),
    }
}

/// The request's cookies as Envoy's filter reads them: every `Cookie`
/// header, pairs split on `;`, leading spaces dropped, the value after the
/// first `=` unquoted, the first of a name kept.
#[derive(Debug, Default, Clone)]
pub struct Jar(Vec<(String, String)>);

impl Jar {
    pub fn read(headers: &http::HeaderMap) -> Jar {
        let mut out: Vec<(String, String)> = Vec::new();
        for h in headers.get_all(http::header::COOKIE) {
            for part in String::from_utf8_lossy(h.as_bytes()).split(';') {
                let Some((k, v)) = part.trim_start().split_once('=') else {
                    continue;
                };
                let v = v
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(v);
                if !out.iter().any(|(n, _)| n == k) {
                    out.push((k.to_string(), v.to_string()));
                }
            }
        }
        Jar(out)
    }

    /// Cookie `name`'s value, empty when absent.
    pub fn get(&self, name: &str) -> &str {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, v)| v.as_str())
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(n, _)| n == name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(n, _)| n.as_str())
    }

    pub fn replace(&mut self, name: &str, value: String) {
        if let Some(p) = self.0.iter_mut().find(|(n, _)| n == name) {
            p.1 = value;
        }
    }

    /// Sets cookie `name` (added at the end when absent).
    pub fn set(&mut self, name: &str, value: String) {
        match self.0.iter_mut().find(|(n, _)| n == name) {
            Some(p) => p.1 = value,
            None => self.0.push((name.to_string(), value)),
        }
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.0.retain(|(n, _)| keep(n));
    }

    /// The jar as one `Cookie` header value.
    pub fn header(&self) -> String {
        self.0
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_and_deletions_as_envoy_writes_them() {
        let names = pb::o_auth2_credentials::CookieNames {
            oauth_nonce: "__Host-N".into(),
            ..Default::default()
        };
        let configs = pb::CookieConfigs {
            bearer_token_cookie_config: Some(pb::CookieConfig {
                same_site: 1,
                path: "/app".into(),
                partitioned: true,
            }),
            ..Default::default()
        };
        let c = Cookies::from_proto(Some(&names), Some(&configs), "");
        assert_eq!(
            c.set(Kind::Bearer, "", "t", 5),
            "BearerToken=t;path=/app;Max-Age=5;secure;HttpOnly;SameSite=Strict;Partitioned"
        );
        assert_eq!(
            c.set(Kind::Nonce, ".ab", "v", 600),
            "__Host-N.ab=v;path=/;Max-Age=600;secure;HttpOnly"
        );
        assert_eq!(
            c.delete(Kind::Nonce, "__Host-N.ab"),
            "__Host-N.ab=deleted; path=/; expires=Thu, 01 Jan 1970 00:00:00 GMT; Secure"
        );
        let d = Cookies::from_proto(None, None, "example.com");
        assert_eq!(
            d.delete_token(Kind::Id),
            "IdToken=deleted; path=/; expires=Thu, 01 Jan 1970 00:00:00 GMT;domain=example.com"
        );
        assert!(
            d.is_flow("OauthNonce.00ff") && d.is_flow("CodeVerifier") && !d.is_flow("OauthNoncex")
        );
    }

    #[test]
    fn the_jar_keeps_the_first_of_a_name() {
        let mut h = http::HeaderMap::new();
        h.append(http::header::COOKIE, "a=1; b=\"2\"".parse().unwrap());
        h.append(http::header::COOKIE, "a=3;c=x=y".parse().unwrap());
        let j = Jar::read(&h);
        assert_eq!((j.get("a"), j.get("b"), j.get("c")), ("1", "2", "x=y"));
        assert_eq!(j.header(), "a=1; b=2; c=x=y");
    }
}
