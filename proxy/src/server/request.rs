//! Pure request transformations of the connection manager: path
//! normalization, rewrites, redirects, request ids, forwarding headers.

use crate::config::listener::EscapedSlashes;
use crate::config::route::{PathMatch, Redirect, RouteMatch};
use crate::routing::{path_only, strip_port};
use std::net::IpAddr;

/// The request methods Envoy's HTTP/1 codec knows (http_parser's list);
/// any other method is a 400 there.
pub const HTTP1_METHODS: &[&str] = &[
    "DELETE",
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "CONNECT",
    "OPTIONS",
    "TRACE",
    "COPY",
    "LOCK",
    "MKCOL",
    "MOVE",
    "PROPFIND",
    "PROPPATCH",
    "SEARCH",
    "UNLOCK",
    "BIND",
    "REBIND",
    "UNBIND",
    "ACL",
    "REPORT",
    "MKACTIVITY",
    "CHECKOUT",
    "MERGE",
    "M-SEARCH",
    "NOTIFY",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "PATCH",
    "PURGE",
    "MKCALENDAR",
    "LINK",
    "UNLINK",
    "SOURCE",
];

/// Envoy's HTTP/1 codec checks that pingora's parser does not make: the
/// (status, body) of the refusal, if any.
pub fn http1_codec_check(req: &pingora_http::RequestHeader) -> Option<(u16, &'static str)> {
    if req.version == http::Version::HTTP_10 || req.version == http::Version::HTTP_09 {
        // Envoy's default (accept_http_10: false).
        return Some((426, "Upgrade Required"));
    }
    if !HTTP1_METHODS.contains(&req.method.as_str()) {
        return Some((400, "Bad Request"));
    }
    let h = &req.headers;
    if h.contains_key(http::header::CONTENT_LENGTH)
        && h.contains_key(http::header::TRANSFER_ENCODING)
    {
        return Some((400, "Bad Request"));
    }
    if !h.contains_key(http::header::HOST) && req.uri.authority().is_none() {
        return Some((400, ""));
    }
    None
}

/// RFC 3986 §5.2.4 dot-segment removal, with `\` treated as `/` as Envoy's
/// `normalize_path` does. Works on the path part only.
pub fn normalize_path(path: &str) -> String {
    let path = path.replace('\\', "/");
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let n = segments.len();
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {
                if i + 1 == n {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if i + 1 == n {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

/// Collapses runs of `/`.
pub fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut prev = false;
    for c in path.chars() {
        if c == '/' {
            if !prev {
                out.push(c);
            }
            prev = true;
        } else {
            out.push(c);
            prev = false;
        }
    }
    out
}

/// Outcome of the escaped-slash check.
pub enum SlashOutcome {
    Keep,
    Reject,
    Redirect(String),
    Rewrite(String),
}

pub fn escaped_slashes(path: &str, action: EscapedSlashes) -> SlashOutcome {
    let p = path_only(path);
    let has = p.contains("%2F") || p.contains("%2f") || p.contains("%5C") || p.contains("%5c");
    if !has {
        return SlashOutcome::Keep;
    }
    let unescaped = || {
        let fixed = p
            .replace("%2F", "/")
            .replace("%2f", "/")
            .replace("%5C", "\\")
            .replace("%5c", "\\");
        format!("{fixed}{}", &path[p.len()..])
    };
    match action {
        EscapedSlashes::KeepUnchanged => SlashOutcome::Keep,
        EscapedSlashes::RejectRequest => SlashOutcome::Reject,
        EscapedSlashes::UnescapeAndRedirect => SlashOutcome::Redirect(unescaped()),
        EscapedSlashes::UnescapeAndForward => SlashOutcome::Rewrite(unescaped()),
    }
}

/// Applies normalize_path / merge_slashes to the path part, keeping the query.
pub fn normalized(path: &str, normalize: bool, merge: bool) -> String {
    let p = path_only(path);
    let rest = &path[p.len()..];
    let mut np = p.to_string();
    if normalize {
        np = normalize_path(&np);
    }
    if merge {
        np = merge_slashes(&np);
    }
    format!("{np}{rest}")
}

/// Envoy's `prefix_rewrite`: replace what the route matched (the prefix, or
/// the whole path for `path` matches) and keep the rest.
pub fn prefix_rewrite(path: &str, m: &RouteMatch, replacement: &str) -> String {
    let matched_len = match &m.path {
        PathMatch::Prefix(p) | PathMatch::SeparatedPrefix(p) => p.len(),
        PathMatch::Path(p) => p.len(),
        // Envoy rejects prefix_rewrite with regex routes at config time in
        // newer versions; here the whole path is replaced.
        PathMatch::Regex(_) | PathMatch::Template(_) => path_only(path).len(),
    };
    format!("{replacement}{}", &path[matched_len.min(path.len())..])
}

/// `regex_rewrite`: substitute in the path part, keep the query.
pub fn regex_rewrite(path: &str, re: &regex::Regex, sub: &str) -> String {
    let p = path_only(path);
    format!("{}{}", re.replace_all(p, sub), &path[p.len()..])
}

/// The `Location` of a redirect route.
pub fn redirect_location(
    r: &Redirect,
    m: &RouteMatch,
    scheme: &str,
    host: &str,
    path: &str,
) -> String {
    let new_scheme = r.scheme.as_deref().unwrap_or(scheme);
    let mut new_host = r.host.clone().unwrap_or_else(|| host.to_string());
    if let Some(port) = r.port {
        new_host = format!("{}:{port}", strip_port(&new_host));
    } else if new_scheme != scheme {
        // Changing scheme drops the old (now wrong) port, as Envoy does.
        new_host = strip_port(&new_host).to_string();
    }
    let mut new_path = if let Some(p) = &r.path {
        p.clone()
    } else if let Some(pr) = &r.prefix_rewrite {
        prefix_rewrite(path, m, pr)
    } else if let Some((re, sub)) = &r.regex_rewrite {
        regex_rewrite(path, &re.0, sub)
    } else {
        path.to_string()
    };
    if r.path.is_some() && !new_path.contains('?') {
        // path_redirect without its own query keeps the original query.
        if let Some((_, q)) = path.split_once('?') {
            new_path = format!("{new_path}?{q}");
        }
    }
    if r.strip_query {
        new_path = path_only(&new_path).to_string();
    }
    format!("{new_scheme}://{new_host}{new_path}")
}

/// A random UUID v4, as Envoy's request id extension generates.
pub fn uuid4(r: u128) -> String {
    let b = (r & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    let h = format!("{b:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Envoy's "internal" addresses: RFC 1918, loopback, unique-local IPv6.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private() || v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

/// The trusted client address: with `use_remote_address` the peer itself,
/// otherwise the XFF entry `xff_num_trusted_hops` from the right.
pub fn trusted_client(
    peer: IpAddr,
    xff: Option<&str>,
    use_remote: bool,
    trusted_hops: u32,
) -> IpAddr {
    if use_remote && trusted_hops == 0 {
        return peer;
    }
    let entries: Vec<&str> = xff
        .map(|x| x.split(',').map(str::trim).collect())
        .unwrap_or_default();
    let skip = if use_remote {
        trusted_hops as usize - 1
    } else {
        trusted_hops as usize
    };
    entries
        .iter()
        .rev()
        .nth(skip)
        .and_then(|s| s.parse().ok())
        .unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments() {
        assert_eq!(normalize_path("/a/b/../c/./d"), "/a/c/d");
        assert_eq!(normalize_path("/../a"), "/a");
        assert_eq!(normalize_path("/a/.."), "/");
        assert_eq!(normalize_path("/a\\b"), "/a/b");
        assert_eq!(normalized("/a/../b?x=/../", true, false), "/b?x=/../");
        assert_eq!(merge_slashes("//a///b/"), "/a/b/");
    }

    #[test]
    fn uuid_shape() {
        let u = uuid4(u128::MAX);
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"), "{u}");
    }

    #[test]
    fn xff_trust() {
        let peer: IpAddr = "10.0.0.9".parse().unwrap();
        assert_eq!(
            trusted_client(peer, Some("1.1.1.1, 2.2.2.2"), true, 0),
            peer
        );
        assert_eq!(
            trusted_client(peer, Some("1.1.1.1, 2.2.2.2"), false, 0).to_string(),
            "2.2.2.2"
        );
        assert_eq!(
            trusted_client(peer, Some("1.1.1.1, 2.2.2.2"), false, 1).to_string(),
            "1.1.1.1"
        );
    }
}
