//! Route selection as pure functions over a `RouteConfig` snapshot, so it
//! can be unit-, property- and bench-tested without sockets.

use crate::config::route::{PathMatch, Route, RouteConfig, RouteMatch, VirtualHost};
use crate::runtime::Runtime;
use http::HeaderMap;

/// What route matching may look at.
pub struct RequestView<'a> {
    /// The `:path` as received, query included.
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    /// A random value in [0, u64::MAX] for runtime_fraction.
    pub random: u64,
    pub runtime: &'a Runtime,
    /// `:method`, `:authority`, ... for header matchers that name them.
    pub pseudo: crate::config::matcher::Pseudo<'a>,
}

/// The path without query string and fragment.
pub fn path_only(path: &str) -> &str {
    path.split(['?', '#']).next().unwrap_or(path)
}

/// Query parameters in order, not percent-decoded: Envoy matches the raw values.
pub fn query_params(path: &str) -> Vec<(String, String)> {
    let Some((_, q)) = path.split_once('?') else {
        return Vec::new();
    };
    let q = q.split('#').next().unwrap_or(q);
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// A request's authority: HTTP/2 `:authority` (the URI's), else HTTP/1
/// Host, else empty; the order the connection manager reads it in.
pub fn authority(req: &pingora_http::RequestHeader) -> &str {
    req.uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            req.headers
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
        })
        .unwrap_or("")
}

/// Query parameters of `path`, names and values percent-decoded (`+`
/// stays a plus); a parameter without `=` has an empty value.
pub fn decoded_query_params(path: &str) -> Vec<(String, String)> {
    query_params(path)
        .into_iter()
        .map(|(k, v)| (percent_decode(&k), percent_decode(&v)))
        .collect()
}

/// `%XX` decoded where XX is hex; anything else kept as it is.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Drops parameter `name` from the request's query as Envoy's filters do:
/// the query is rebuilt from the decoded parameters that remain, sorted by
/// name (Envoy keeps them in an ordered map).
pub fn remove_query_param(req: &mut pingora_http::RequestHeader, name: &str) {
    let path = req
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let mut kept: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (k, v) in decoded_query_params(&path) {
        if k != name {
            kept.entry(k).or_default().push(v);
        }
    }
    let query: Vec<String> = kept
        .iter()
        .flat_map(|(k, vs)| vs.iter().map(move |v| format!("{k}={v}")))
        .collect();
    let base = path_only(&path);
    let new = if query.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", query.join("&"))
    };
    // Envoy writes decoded bytes as they are, even those a request line
    // may not carry (a space); Legate cannot send those and encodes them.
    let pq = new
        .parse::<http::uri::PathAndQuery>()
        .or_else(|_| encode_unsafe(&new).parse::<http::uri::PathAndQuery>());
    // Only the path and query change: an HTTP/2 request keeps its
    // scheme and authority.
    let mut parts = req.uri.clone().into_parts();
    parts.path_and_query = pq.ok();
    if let Ok(uri) = http::Uri::from_parts(parts) {
        req.set_uri(uri);
    }
}

/// `s` with the bytes a request target may not carry percent-encoded.
fn encode_unsafe(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_graphic() && !b"\"<>\\^`{|}".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Envoy's gRPC check: `application/grpc` or `application/grpc+<codec>`
/// (so `application/grpc-web` is not gRPC).
pub fn is_grpc_content_type(ct: &str) -> bool {
    ct == "application/grpc" || ct.starts_with("application/grpc+")
}

/// Envoy's virtual host search: exact domains, then `*suffix` wildcards
/// (longest first), then `prefix*` wildcards (longest first), then `*`.
pub fn find_virtual_host<'a>(rc: &'a RouteConfig, host: &str) -> Option<&'a VirtualHost> {
    let mut host = host.to_ascii_lowercase();
    if rc.ignore_port_in_host_matching {
        // Envoy drops whatever follows the last ':' here, numeric or not.
        host = match host.rfind(':') {
            Some(i) if !host.starts_with('[') || host[..i].ends_with(']') => host[..i].to_string(),
            _ => host,
        };
    }
    let mut best_suffix: Option<(usize, &VirtualHost)> = None;
    let mut best_prefix: Option<(usize, &VirtualHost)> = None;
    let mut default = None;
    for vh in &rc.virtual_hosts {
        for d in &vh.domains {
            if d == "*" {
                default = default.or(Some(vh));
            } else if let Some(suffix) = d.strip_prefix('*') {
                // The wildcard must match at least one character.
                if host.len() > suffix.len()
                    && host.ends_with(suffix)
                    && best_suffix.is_none_or(|(l, _)| suffix.len() > l)
                {
                    best_suffix = Some((suffix.len(), vh));
                }
            } else if let Some(prefix) = d.strip_suffix('*') {
                if host.len() > prefix.len()
                    && host.starts_with(prefix)
                    && best_prefix.is_none_or(|(l, _)| prefix.len() > l)
                {
                    best_prefix = Some((prefix.len(), vh));
                }
            } else if *d == host {
                return Some(vh);
            }
        }
    }
    best_suffix.or(best_prefix).map(|(_, v)| v).or(default)
}

/// Removes a `:port` suffix (IPv6 literals keep their brackets).
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(i) => &host[..=i],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|c| c.is_ascii_digit()) && !h.contains(':') => h,
        _ => host,
    }
}

/// The first route of `vh` that matches.
pub fn find_route<'a>(vh: &'a VirtualHost, req: &RequestView) -> Option<&'a Route> {
    let mut query = None;
    vh.routes
        .iter()
        .find(|r| route_matches(&r.matcher, req, &mut query))
}

pub fn route_matches(
    m: &RouteMatch,
    req: &RequestView,
    query: &mut Option<Vec<(String, String)>>,
) -> bool {
    let lowered;
    let full = if m.case_sensitive {
        req.path
    } else {
        lowered = req.path.to_ascii_lowercase();
        lowered.as_str()
    };
    let path = path_only(full);
    let path_ok = match &m.path {
        PathMatch::Prefix(p) => full.starts_with(p.as_str()),
        PathMatch::Path(p) => path == p,
        PathMatch::Regex(r) => r.is_match(path_only(req.path)),
        PathMatch::SeparatedPrefix(p) => {
            path == p
                || (path.starts_with(p.as_str()) && path.as_bytes().get(p.len()) == Some(&b'/'))
        }
        PathMatch::Template(r) => r.is_match(path_only(req.path)),
    };
    if !path_ok {
        return false;
    }
    if m.grpc
        && !req
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(is_grpc_content_type)
    {
        return false;
    }
    if !m
        .headers
        .iter()
        .all(|h| h.matches_with(req.headers, &req.pseudo))
    {
        return false;
    }
    if !m.cookies.iter().all(|c| c.matches(req.headers)) {
        return false;
    }
    if !m.query.is_empty() {
        let q = query.get_or_insert_with(|| query_params(req.path));
        if !m.query.iter().all(|qm| qm.matches(q)) {
            return false;
        }
    }
    if let Some((key, default)) = &m.runtime_fraction {
        let threshold = req.runtime.fraction_per_million(key, *default) as u64;
        if req.random % 1_000_000 >= threshold {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use legate_proto::envoy_types::pb::envoy::config::route::v3 as pb;

    fn rc(yaml: &str) -> RouteConfig {
        let v = legate_proto::json::parse_yaml(yaml).unwrap();
        let p: pb::RouteConfiguration =
            legate_proto::json::to_message(v, "envoy.config.route.v3.RouteConfiguration", true)
                .unwrap();
        RouteConfig::from_proto(&p, "rc").unwrap()
    }

    #[test]
    fn domain_search_order() {
        let c = rc(r#"
virtual_hosts:
- {name: exact, domains: ["api.example.com"]}
- {name: suffix_long, domains: ["*.example.com"]}
- {name: suffix_short, domains: ["*.com"]}
- {name: prefix, domains: ["api.*"]}
- {name: any, domains: ["*"]}
- {name: port, domains: ["p.example.org:8080"]}
"#);
        let name = |h: &str| find_virtual_host(&c, h).map(|v| v.name.clone()).unwrap();
        assert_eq!(name("api.example.com"), "exact");
        assert_eq!(name("API.Example.com"), "exact");
        assert_eq!(name("www.example.com"), "suffix_long");
        assert_eq!(name("x.com"), "suffix_short");
        assert_eq!(name("api.example.net"), "prefix");
        assert_eq!(name("other"), "any");
        assert_eq!(name("p.example.org:8080"), "port");
        assert_eq!(name("p.example.org"), "any");
        assert_eq!(
            name(".com"),
            "any",
            "a wildcard matches at least one character"
        );
    }

    #[test]
    fn path_matchers() {
        let c = rc(r#"
virtual_hosts:
- name: v
  domains: ["*"]
  routes:
  - {name: exact, match: {path: /exact}, direct_response: {status: 200}}
  - {name: sep, match: {path_separated_prefix: /sep}, direct_response: {status: 200}}
  - {name: re, match: {safe_regex: {regex: "/re/[0-9]+"}}, direct_response: {status: 200}}
  - {name: ci, match: {prefix: /CI, case_sensitive: false}, direct_response: {status: 200}}
  - {name: hdr, match: {prefix: /h, headers: [{name: x-v, string_match: {exact: "1"}}]}, direct_response: {status: 200}}
  - {name: q, match: {prefix: /q, query_parameters: [{name: a, string_match: {exact: "b c"}}]}, direct_response: {status: 200}}
  - {name: grpc, match: {prefix: /g, grpc: {}}, direct_response: {status: 200}}
  - {name: tmpl, match: {path_match_policy: {name: t, typed_config: {"@type": type.googleapis.com/envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig, path_template: "/t/{id}/x"}}}, direct_response: {status: 200}}
  - {name: fallback, match: {prefix: /}, direct_response: {status: 404}}
"#);
        let rt = Runtime::default();
        let vh = &c.virtual_hosts[0];
        let pick = |p: &str, h: &[(&str, &str)]| {
            let mut hm = HeaderMap::new();
            for (k, v) in h {
                hm.insert(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            find_route(
                vh,
                &RequestView {
                    path: p,
                    headers: &hm,
                    random: 0,
                    runtime: &rt,
                    pseudo: Default::default(),
                },
            )
            .unwrap()
            .name
            .clone()
        };
        assert_eq!(pick("/exact?x=1", &[]), "exact");
        assert_eq!(pick("/exact/", &[]), "fallback");
        assert_eq!(pick("/sep", &[]), "sep");
        assert_eq!(pick("/sep/a", &[]), "sep");
        assert_eq!(pick("/separate", &[]), "fallback");
        assert_eq!(pick("/re/123?q", &[]), "re");
        assert_eq!(pick("/re/12a", &[]), "fallback");
        assert_eq!(pick("/ci/x", &[]), "ci");
        assert_eq!(pick("/h", &[("x-v", "1")]), "hdr");
        assert_eq!(pick("/h", &[("x-v", "2")]), "fallback");
        assert_eq!(pick("/q?z=1&a=b c", &[]), "q");
        assert_eq!(
            pick("/q?a=b%20c", &[]),
            "fallback",
            "values are matched undecoded, as in Envoy"
        );
        assert_eq!(pick("/q?a=bc", &[]), "fallback");
        assert_eq!(
            pick("/g", &[("content-type", "application/grpc+proto")]),
            "grpc"
        );
        assert_eq!(pick("/g", &[]), "fallback");
        assert_eq!(pick("/t/42/x", &[]), "tmpl");
        assert_eq!(pick("/t/42/y", &[]), "fallback");
    }

    #[test]
    fn strip_ports() {
        assert_eq!(strip_port("a.b:80"), "a.b");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("a.b"), "a.b");
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use legate_proto::envoy_types::pb::envoy::config::route::v3 as pb;
    use proptest::prelude::*;

    fn rc(json: serde_json::Value) -> RouteConfig {
        let p: pb::RouteConfiguration =
            legate_proto::json::to_message(json, "envoy.config.route.v3.RouteConfiguration", true)
                .unwrap();
        RouteConfig::from_proto(&p, "rc").unwrap()
    }

    fn view<'a>(path: &'a str, h: &'a HeaderMap, rt: &'a Runtime) -> RequestView<'a> {
        RequestView {
            path,
            headers: h,
            random: 0,
            runtime: rt,
            pseudo: Default::default(),
        }
    }

    proptest! {
        /// A prefix route matches exactly the paths that start with it, and
        /// a path route exactly its path (ignoring the query).
        #[test]
        fn prefix_and_path_semantics(prefix in "/[a-z]{0,4}", path in "/[a-z/]{0,8}", query in "(\\?[a-z=]{0,5})?") {
            let c = rc(serde_json::json!({"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
                {"name": "path", "match": {"path": prefix.clone()}, "direct_response": {"status": 200}},
                {"name": "prefix", "match": {"prefix": prefix.clone()}, "direct_response": {"status": 200}},
            ]}]}));
            let (h, rt) = (HeaderMap::new(), Runtime::default());
            let full = format!("{path}{query}");
            let got = find_route(&c.virtual_hosts[0], &view(&full, &h, &rt)).map(|r| r.name.clone());
            let want = if path == prefix { Some("path".to_string()) } else if full.starts_with(&prefix) { Some("prefix".to_string()) } else { None };
            prop_assert_eq!(got, want);
        }

        /// An exact domain always beats any wildcard, and a longer suffix
        /// wildcard beats a shorter one, whatever the order of the hosts.
        #[test]
        fn domain_precedence_is_order_independent(labels in prop::collection::vec("[a-z]{1,5}", 2..4), rotate in 0usize..4) {
            let host = labels.join(".");
            let suffix_long = format!("*.{}", labels[1..].join("."));
            let suffix_short = format!("*.{}", labels[labels.len() - 1]);
            let mut vhosts = vec![
                serde_json::json!({"name": "any", "domains": ["*"]}),
                serde_json::json!({"name": "short", "domains": [suffix_short]}),
                serde_json::json!({"name": "long", "domains": [suffix_long]}),
                serde_json::json!({"name": "exact", "domains": [host.clone()]}),
            ];
            if labels.len() == 2 {
                vhosts.remove(1); // the two suffixes are the same domain
            }
            let n = vhosts.len();
            vhosts.rotate_left(rotate % n);
            let c = rc(serde_json::json!({"virtual_hosts": vhosts}));
            prop_assert_eq!(find_virtual_host(&c, &host).unwrap().name.as_str(), "exact");
            // Another host under the long suffix (never equal to `host`).
            let other = format!("{}x.{}", labels[0], labels[1..].join("."));
            prop_assert_eq!(find_virtual_host(&c, &other).unwrap().name.as_str(), "long");
        }

        /// Route matching never panics on arbitrary request paths.
        #[test]
        fn arbitrary_paths_do_not_panic(path in "\\PC{0,40}") {
            let c = rc(serde_json::json!({"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
                {"match": {"safe_regex": {"regex": "/a.*"}}, "direct_response": {"status": 200}},
                {"match": {"path_separated_prefix": "/b"}, "direct_response": {"status": 200}},
                {"match": {"prefix": "/C", "case_sensitive": false, "query_parameters": [{"name": "q"}]}, "direct_response": {"status": 200}},
            ]}]}));
            let (h, rt) = (HeaderMap::new(), Runtime::default());
            let _ = find_route(&c.virtual_hosts[0], &view(&path, &h, &rt));
            let _ = find_virtual_host(&c, &path);
        }
    }
}
