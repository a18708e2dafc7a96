//! Where tokens are found: each provider's headers (with an optional value
//! prefix), query parameters and cookies, `Authorization: Bearer` and
//! `access_token` when it names none. An extractor merges the locations of
//! the providers a requirement may use; each location remembers which
//! issuers may be found there.

use super::config::Provider;
use crate::config::{join, Result};
use http::HeaderName;
use legate_proto::envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3 as pb;
use pingora_http::RequestHeader;
use std::collections::BTreeMap;
use std::sync::Arc;

/// One place a provider reads tokens from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Location {
    /// A header (its lower-case name), and the prefix the token follows
    /// ("" for the whole value).
    Header(String, String),
    Param(String),
    Cookie(String),
}

impl Location {
    pub fn of_provider(p: &pb::JwtProvider, path: &str) -> Result<Vec<Location>> {
        if p.from_headers.is_empty() && p.from_params.is_empty() && p.from_cookies.is_empty() {
            return Ok(vec![
                Location::Header("authorization".into(), "Bearer ".into()),
                Location::Param("access_token".into()),
            ]);
        }
        let mut out = Vec::new();
        for (i, h) in p.from_headers.iter().enumerate() {
            let name = crate::headers::header_name(
                &h.name,
                &join(&format!("{path}.from_headers[{i}]"), "name"),
            )?;
            out.push(Location::Header(
                name.as_str().to_string(),
                h.value_prefix.clone(),
            ));
        }
        out.extend(p.from_params.iter().cloned().map(Location::Param));
        out.extend(p.from_cookies.iter().cloned().map(Location::Cookie));
        Ok(out)
    }
}

/// The issuers a location accepts: those of the providers that read it,
/// or any when one of them names no issuer.
#[derive(Debug, Clone, Default)]
pub struct Issuers {
    any: bool,
    names: Vec<String>,
}

impl Issuers {
    pub fn allows(&self, iss: &str) -> bool {
        self.any || self.names.iter().any(|n| n == iss)
    }
}

/// The merged locations of some providers.
#[derive(Debug)]
pub struct Extractor {
    /// Ordered as Envoy's maps order them: headers by name then prefix,
    /// parameters and cookies by name.
    locations: BTreeMap<Location, Issuers>,
    /// Headers verified tokens produce, removed before extracting.
    sanitize: Vec<HeaderName>,
    /// The providers, for tokens checked by their issuer.
    pub providers: Vec<Arc<Provider>>,
}

/// A token and where it was.
#[derive(Debug)]
pub struct Token<'a> {
    pub value: String,
    pub location: &'a Location,
    pub issuers: &'a Issuers,
}

impl Extractor {
    pub fn new(providers: &[Arc<Provider>]) -> Extractor {
        let mut locations: BTreeMap<Location, Issuers> = BTreeMap::new();
        let mut sanitize = Vec::new();
        for p in providers {
            for l in &p.locations {
                let e = locations.entry(l.clone()).or_default();
                if p.issuer.is_empty() {
                    e.any = true;
                } else {
                    e.names.push(p.issuer.clone());
                }
            }
            for h in p.output_headers() {
                if !sanitize.contains(h) {
                    sanitize.push(h.clone());
                }
            }
        }
        Extractor {
            locations,
            sanitize,
            providers: providers.to_vec(),
        }
    }

    /// Removes the headers that verified tokens would add.
    pub fn sanitize(&self, req: &mut RequestHeader) {
        for h in &self.sanitize {
            req.remove_header(h);
        }
    }

    /// Every token of the request, headers first, then parameters, then
    /// cookies.
    pub fn extract(&self, req: &RequestHeader) -> Vec<Token<'_>> {
        let mut out = Vec::new();
        let path = req.uri.path_and_query().map_or("", |p| p.as_str());
        let params = if self.has(|l| matches!(l, Location::Param(_))) {
            crate::routing::decoded_query_params(path)
        } else {
            Vec::new()
        };
        for (loc, issuers) in &self.locations {
            let mut push = |value: String| {
                out.push(Token {
                    value,
                    location: loc,
                    issuers,
                })
            };
            match loc {
                Location::Header(name, prefix) => {
                    for v in req.headers.get_all(name.as_str()) {
                        let v = String::from_utf8_lossy(v.as_bytes());
                        if let Some(t) = after_prefix(&v, prefix) {
                            push(t);
                        }
                    }
                }
                Location::Param(name) => {
                    if let Some((_, v)) = params.iter().find(|(k, _)| k == name) {
                        push(v.clone());
                    }
                }
                Location::Cookie(name) => {
                    if let Some(v) = crate::headers::cookie(&req.headers, name) {
                        push(v);
                    }
                }
            }
        }
        // Envoy visits headers, then parameters, then cookies; the map
        // orders locations by kind in that same order.
        out
    }

    fn has(&self, f: impl Fn(&Location) -> bool) -> bool {
        self.locations.keys().any(f)
    }
}

/// The token in a header value: everything from the first base64url
/// character (or dot) after `prefix`, found anywhere in the value. With
/// no prefix, the whole value; no token when the prefix is absent.
fn after_prefix(value: &str, prefix: &str) -> Option<String> {
    if prefix.is_empty() {
        return Some(value.to_string());
    }
    let pos = value.find(prefix)? + prefix.len();
    let start = value[pos..]
        .find(|c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        .map(|i| pos + i);
    Some(match start {
        Some(s) => value[s..].to_string(),
        // Nothing token-like after the prefix: Envoy takes the whole value.
        None => value.to_string(),
    })
}

/// Removes a verified token from where it was found (`forward: false`):
/// a header goes whole; a parameter is dropped from the query, which is
/// rebuilt from the decoded parameters that remain; cookies stay, as in
/// Envoy.
pub fn remove(req: &mut RequestHeader, location: &Location) {
    match location {
        Location::Header(name, _) => {
            req.remove_header(name.as_str());
        }
        Location::Param(name) => crate::routing::remove_query_param(req, name),
        Location::Cookie(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_after_the_prefix() {
        assert_eq!(
            after_prefix("Bearer abc.def.ghi", "Bearer ").as_deref(),
            Some("abc.def.ghi")
        );
        assert_eq!(
            after_prefix("x Bearer   a.b.c junk", "Bearer ").as_deref(),
            Some("a.b.c junk")
        );
        assert_eq!(after_prefix("bearer a.b.c", "Bearer "), None);
        assert_eq!(
            after_prefix("Bearer ", "Bearer ").as_deref(),
            Some("Bearer ")
        );
        assert_eq!(after_prefix("raw", "").as_deref(), Some("raw"));
    }

    #[test]
    fn params_and_cookies() {
        assert_eq!(
            crate::routing::decoded_query_params("/p?a=1&access_token=x%2Ey&flag"),
            vec![
                ("a".into(), "1".into()),
                ("access_token".into(), "x.y".into()),
                ("flag".into(), "".into())
            ]
        );
        let mut h = http::HeaderMap::new();
        h.append(
            http::header::COOKIE,
            "a=1; tok=\"v\"; tok=w".parse().unwrap(),
        );
        assert_eq!(crate::headers::cookie(&h, "tok").as_deref(), Some("v"));
        assert_eq!(crate::headers::cookie(&h, "b"), None);
        assert_eq!(crate::routing::percent_decode("%zz%41%4"), "%zzA%4");
    }

    #[test]
    fn removing_a_parameter_rebuilds_the_query() {
        let mut r = RequestHeader::build("GET", b"/p?z=1&access_token=t&a=%41", None).unwrap();
        remove(&mut r, &Location::Param("access_token".into()));
        assert_eq!(r.uri.to_string(), "/p?a=A&z=1");
        let mut r = RequestHeader::build("GET", b"/p?access_token=t", None).unwrap();
        remove(&mut r, &Location::Param("access_token".into()));
        assert_eq!(r.uri.to_string(), "/p");
    }
}
