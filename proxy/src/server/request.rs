//! Pure request transformations of the connection manager: path
//! normalization, rewrites, redirects, request ids, forwarding headers.

use crate::config::listener::EscapedSlashes;
use crate::config::route::{PathMatch, Redirect, RouteMatch};
use crate::routing::path_only;
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
/// (status, body) of the refusal, if any. `raw` is the request head as the
/// client sent it: pingora collapses repeated `Content-Length` headers and
/// drops `Content-Length` beside `Transfer-Encoding` before Legate sees the
/// parsed head, and Envoy refuses both framings (a request smuggling vector).
pub fn http1_codec_check(
    req: &pingora_http::RequestHeader,
    raw: &[u8],
    http10: Option<&str>,
) -> Option<(u16, &'static str)> {
    let old = match req.version {
        http::Version::HTTP_09 => true,
        http::Version::HTTP_10 => http10.is_none(),
        _ => false,
    };
    if old {
        // Envoy's default (accept_http_10: false).
        return Some((426, "Upgrade Required"));
    }
    if !HTTP1_METHODS.contains(&req.method.as_str()) {
        return Some((400, "Bad Request"));
    }
    // pingora leaves at least one of the two in the parsed head when the
    // client sent either, so most requests skip reading the raw head.
    let h = &req.headers;
    if h.contains_key(http::header::CONTENT_LENGTH)
        || h.contains_key(http::header::TRANSFER_ENCODING)
    {
        let framing = Framing::of(raw);
        if framing.content_lengths > 1 || (framing.content_lengths > 0 && framing.transfer_encoding)
        {
            return Some((400, "Bad Request"));
        }
    }
    // An HTTP/1.0 request without a host gets `default_host_for_http_10`
    // (see the connection manager), when there is one.
    let defaulted = req.version == http::Version::HTTP_10 && http10.is_some_and(|d| !d.is_empty());
    if !req.headers.contains_key(http::header::HOST) && req.uri.authority().is_none() && !defaulted
    {
        return Some((400, ""));
    }
    None
}

/// The framing headers of a raw HTTP/1 request head.
#[derive(Debug, Default, PartialEq)]
struct Framing {
    content_lengths: usize,
    transfer_encoding: bool,
}

impl Framing {
    fn of(raw: &[u8]) -> Self {
        let mut f = Framing::default();
        // The first line is the request line; header names end at ':'.
        for line in raw.split(|&b| b == b'\n').skip(1) {
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            let name = line[..colon].trim_ascii();
            if name.eq_ignore_ascii_case(b"content-length") {
                f.content_lengths += 1;
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                f.transfer_encoding = true;
            }
        }
        f
    }
}

/// Envoy's `Grpc::Utility::httpToGrpcStatus`.
pub fn grpc_status_for_http(status: u16) -> u32 {
    match status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// Envoy's gRPC status to HTTP status (`Grpc::Utility::grpcToHttpStatus`).
pub fn http_status_for_grpc(status: u32) -> u16 {
    match status {
        0 => 200,
        1 => 499,
        3 | 9 | 11 => 400,
        5 => 404,
        6 | 10 => 409,
        7 => 403,
        8 => 429,
        12 => 501,
        14 => 503,
        4 => 504,
        16 => 401,
        _ => 500,
    }
}

/// gRPC's percent-encoding of `grpc-message`.
pub fn grpc_percent_encode(b: &[u8]) -> String {
    b.iter()
        .map(|&c| {
            if (0x20..0x7f).contains(&c) && c != b'%' {
                (c as char).to_string()
            } else {
                format!("%{c:02X}")
            }
        })
        .collect()
}

/// HCM `strip_trailing_host_dot`: `example.com.` and `example.com.:8080`
/// lose the dot before the port, as Envoy's `stripTrailingHostDot`; None
/// when there is none.
pub fn strip_trailing_host_dot(host: &str) -> Option<String> {
    // A port follows the last ':' unless that is inside an IPv6 literal.
    let port_start = host.rfind(':').filter(|&i| !host[i..].contains(']'));
    match port_start {
        Some(i) if i > 0 && host.as_bytes()[i - 1] == b'.' => {
            Some(format!("{}{}", &host[..i - 1], &host[i..]))
        }
        Some(_) => None,
        None => host.strip_suffix('.').map(str::to_string),
    }
}

/// RFC 3986 §5.2.4 dot-segment removal, with `\` treated as `/` as Envoy's
/// `normalize_path` does. Works on the path part only.
pub fn normalize_path(path: &str) -> String {
    let path = decode_unreserved(&path.replace('\\', "/"));
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

/// URL canonicalization as Envoy's `normalize_path` does it: percent-encoded
/// unreserved characters (ALPHA, DIGIT, `-._~`) are decoded, and the hex of
/// every other escape is upper-cased.
pub fn decode_unreserved(path: &str) -> String {
    let b = path.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        // Work on bytes: the path may hold raw UTF-8, and `%` may sit
        // before one.
        if b[i] == b'%'
            && i + 2 < b.len()
            && b[i + 1].is_ascii_hexdigit()
            && b[i + 2].is_ascii_hexdigit()
        {
            let v = (hex(b[i + 1]) << 4) | hex(b[i + 2]);
            if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') {
                out.push(v);
            } else {
                out.extend([
                    b'%',
                    b[i + 1].to_ascii_uppercase(),
                    b[i + 2].to_ascii_uppercase(),
                ]);
            }
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    // Only ASCII bytes were produced from escapes, so UTF-8 stays valid.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn hex(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => c - b'A' + 10,
    }
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

/// Envoy's `processRequestHost`: the request host, without its port when
/// a new port is set, or when the scheme changes and the port is the old
/// scheme's default.
fn redirect_host(host: &str, new_scheme: &str, old_scheme: &str, new_port: bool) -> String {
    let port_at = if host.starts_with('[') {
        host.rfind("]:").map(|i| i + 1)
    } else {
        host.rfind(':')
    };
    let Some(i) = port_at else {
        return host.to_string();
    };
    let port = &host[i..];
    let remove = new_port
        || (new_scheme != old_scheme
            && ((old_scheme == "https" && port == ":443")
                || (old_scheme == "http" && port == ":80")));
    if remove {
        host[..i].to_string()
    } else {
        host.to_string()
    }
}

/// The `Location` of a redirect route, as Envoy's `Utility::newUri`.
/// `scheme` is the request's scheme as Envoy sees it (x-forwarded-proto).
pub fn redirect_location(
    r: &Redirect,
    m: &RouteMatch,
    scheme: &str,
    host: &str,
    path: &str,
) -> String {
    let new_scheme = r.scheme.as_deref().unwrap_or(scheme);
    let new_port = r.port.map(|p| format!(":{p}")).unwrap_or_default();
    let new_host = match &r.host {
        Some(h) => h.clone(),
        None => redirect_host(host, new_scheme, scheme, r.port.is_some()),
    };
    let mut path_has_query = false;
    let mut new_path = if let Some(p) = &r.path {
        path_has_query = p.contains('?');
        match path.find('?') {
            Some(q) if !path_has_query => format!("{p}{}", &path[q..]),
            _ => p.clone(),
        }
    } else if let Some(pr) = &r.prefix_rewrite {
        prefix_rewrite(path, m, pr)
    } else if let Some((re, sub)) = &r.regex_rewrite {
        regex_rewrite(path, &re.0, sub)
    } else {
        path.to_string()
    };
    if !new_path.starts_with('/') {
        new_path.insert(0, '/');
    }
    if r.strip_query && !path_has_query {
        new_path = path_only(&new_path).to_string();
    }
    format!("{new_scheme}://{new_host}{new_port}{new_path}")
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

/// The `n`th address from the right of XFF (0 = last), as Envoy's
/// `getLastAddressFromXFF`; also whether XFF held a single address.
pub fn xff_from_right(xff: &str, n: usize) -> (Option<IpAddr>, bool) {
    let entries: Vec<&str> = xff
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let single = entries.len() == 1;
    (
        entries.iter().rev().nth(n).and_then(|s| s.parse().ok()),
        single,
    )
}

/// What the forwarding-header step decided.
pub struct Forwarding {
    /// Envoy's final remote address: the trusted client.
    pub client: IpAddr,
    pub request_id: Option<String>,
    /// An original IP detection extension refuses the request with this
    /// status (the headers are left as they came).
    pub reject: Option<u16>,
}

const X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: http::HeaderName = http::HeaderName::from_static("x-forwarded-proto");
const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// Client `x-envoy-*` control headers that Envoy removes from requests that
/// are not internal (with Envoy 1.40's default internal-address config no
/// request is internal, so they are always removed).
const ENVOY_CONTROL_HEADERS: &[&str] = &[
    "x-envoy-retriable-status-codes",
    "x-envoy-retriable-header-names",
    "x-envoy-retry-on",
    "x-envoy-retry-grpc-on",
    "x-envoy-max-retries",
    "x-envoy-upstream-alt-stat-name",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-upstream-rq-timeout-alt-response",
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-force-trace",
    "x-envoy-ip-tags",
    "x-envoy-original-url",
    "x-envoy-hedge-on-per-try-timeout",
];

/// Envoy's `ConnectionManagerUtility::mutateRequestHeaders` for forwarding
/// headers: XFF, x-forwarded-proto, internal/edge status, request id.
pub fn forwarding(
    hcm: &crate::config::listener::Hcm,
    peer: IpAddr,
    local_ip: IpAddr,
    scheme: &'static str,
    req: &mut pingora_http::RequestHeader,
) -> pingora_error::Result<Forwarding> {
    // Every request passes here, and few carry `x-envoy-*` headers: one
    // look at the names spares the twenty removals (each a parse and two
    // hash lookups) for all the others.
    let envoy_headers = req
        .headers
        .keys()
        .any(|k| k.as_str().starts_with("x-envoy-"));
    if envoy_headers {
        req.remove_header("x-envoy-internal");
    }
    // Several XFF lines are one list (Envoy joins them).
    let lines: Vec<&str> = req
        .headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let xff = (!lines.is_empty()).then(|| lines.join(","));
    let mut final_addr = None;
    let mut allow_trusted_checks = false;
    if hcm.use_remote_address {
        allow_trusted_checks = xff.is_none();
        if hcm.xff_num_trusted_hops > 0 {
            final_addr = xff
                .as_deref()
                .and_then(|x| xff_from_right(x, hcm.xff_num_trusted_hops as usize - 1).0);
        }
        final_addr = final_addr.or(Some(peer));
        if !hcm.skip_xff_append {
            let append = if peer.is_loopback() { local_ip } else { peer };
            let v = match &xff {
                Some(x) if !x.is_empty() => format!("{x},{append}"),
                _ => append.to_string(),
            };
            req.insert_header("x-forwarded-for", v)?;
        }
        if hcm.xff_num_trusted_hops == 0 || !req.headers.contains_key(&X_FORWARDED_PROTO) {
            req.insert_header("x-forwarded-proto", scheme)?;
        }
    } else if !hcm.ip_detection.is_empty() {
        use crate::config::ip_detection::Found;
        let mut append = false;
        for d in &hcm.ip_detection {
            append |= d.appends();
            match d.detect(&req.headers, peer) {
                Found::Nothing => continue,
                Found::Reject(code) => {
                    return Ok(Forwarding {
                        client: peer,
                        request_id: None,
                        reject: Some(code),
                    })
                }
                Found::Client(a, trusted) => {
                    final_addr = Some(a);
                    allow_trusted_checks = trusted;
                    break;
                }
            }
        }
        if append {
            // As with use_remote_address, a loopback peer is written as
            // this host's address.
            let peer = if peer.is_loopback() { local_ip } else { peer };
            let v = match &xff {
                Some(x) if !x.is_empty() => format!("{x},{peer}"),
                _ => peer.to_string(),
            };
            req.insert_header("x-forwarded-for", v)?;
        }
    } else if let Some(x) = &xff {
        let (addr, single) = xff_from_right(x, hcm.xff_num_trusted_hops as usize);
        if addr.is_some() {
            final_addr = addr;
            allow_trusted_checks = single;
        }
    }
    if !req.headers.contains_key(&X_FORWARDED_PROTO) {
        req.insert_header("x-forwarded-proto", scheme)?;
    }
    let internal = allow_trusted_checks && final_addr.is_some_and(configured_internal);
    let client = final_addr.unwrap_or(peer);
    let edge = !internal && hcm.use_remote_address;
    if !internal && envoy_headers {
        for h in ENVOY_CONTROL_HEADERS {
            req.remove_header(*h);
        }
    }
    if edge {
        if envoy_headers {
            for h in [
                "x-envoy-decorator-operation",
                "x-envoy-downstream-service-cluster",
                "x-envoy-downstream-service-node",
            ] {
                req.remove_header(h);
            }
        }
        req.insert_header("x-envoy-external-address", client.to_string())?;
    }
    let existing = req
        .headers
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let request_id = if hcm.generate_request_id {
        let force = !hcm.preserve_external_request_id && edge;
        match existing {
            Some(id) if !force => Some(id),
            _ => {
                let id = uuid4(rand::random());
                req.insert_header("x-request-id", id.as_str())?;
                Some(id)
            }
        }
    } else {
        existing
    };
    Ok(Forwarding {
        client,
        request_id,
        reject: None,
    })
}

/// Envoy 1.40's default internal address config lists no addresses (the
/// `internal_address_config` field, which would add some, is rejected by
/// Legate), so no client is internal.
fn configured_internal(_ip: IpAddr) -> bool {
    false
}

/// The machine's host name (`%HOSTNAME%`), read once.
pub fn hostname() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
}

/// This host's first non-loopback IPv4 address, else loopback: Envoy's
/// local address (`--local-address-ip-version v4`).
pub fn local_ip() -> IpAddr {
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for ifa in addrs {
            if let Some(sin) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
                let ip = sin.ip();
                if !ip.is_loopback() {
                    return IpAddr::V4(ip);
                }
            }
        }
    }
    IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_host_dots() {
        assert_eq!(
            strip_trailing_host_dot("a.example."),
            Some("a.example".into())
        );
        assert_eq!(
            strip_trailing_host_dot("a.example.:8080"),
            Some("a.example:8080".into())
        );
        assert_eq!(strip_trailing_host_dot("a.example:8080"), None);
        assert_eq!(strip_trailing_host_dot("a.example"), None);
        assert_eq!(strip_trailing_host_dot("[::1]:80"), None);
    }

    #[test]
    fn framing_headers_are_counted_in_the_raw_head() {
        let f = |s: &str| Framing::of(s.as_bytes());
        let two =
            f("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\ncontent-length : 3\r\n\r\n");
        assert_eq!(two.content_lengths, 2);
        let te = f("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n");
        assert_eq!((te.content_lengths, te.transfer_encoding), (1, true));
        // A value that mentions a header name is not that header.
        let v = f("GET /content-length: HTTP/1.1\r\nX: transfer-encoding: chunked\r\n\r\n");
        assert_eq!(v, Framing::default());
    }

    #[test]
    fn dot_segments() {
        assert_eq!(normalize_path("/a/b/../c/./d"), "/a/c/d");
        assert_eq!(normalize_path("/../a"), "/a");
        assert_eq!(normalize_path("/a/.."), "/");
        assert_eq!(normalize_path("/a\\b"), "/a/b");
        assert_eq!(normalize_path("/b/%7e/%2e%2e/c%2f"), "/b/c%2F");
        // Escapes next to raw UTF-8 and incomplete escapes are left intact.
        assert_eq!(decode_unreserved("/%a€/é/%"), "/%a€/é/%");
        assert_eq!(decode_unreserved("/%41%e2%82%ac"), "/A%E2%82%AC");
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
    fn xff_from_the_right() {
        assert_eq!(
            xff_from_right("1.1.1.1, 2.2.2.2", 0),
            (Some("2.2.2.2".parse().unwrap()), false)
        );
        assert_eq!(
            xff_from_right("1.1.1.1, 2.2.2.2", 1),
            (Some("1.1.1.1".parse().unwrap()), false)
        );
        assert_eq!(
            xff_from_right("1.1.1.1", 0),
            (Some("1.1.1.1".parse().unwrap()), true)
        );
        assert_eq!(xff_from_right("junk", 0).0, None);
    }
}
