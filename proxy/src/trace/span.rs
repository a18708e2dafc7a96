//! What a request's spans are made of, whatever the tracer: the facts the
//! engine gathers and the tags Envoy gives a request's span and each
//! upstream attempt's, every value a string as Envoy's.

use super::SpanContext;
use std::time::SystemTime;

/// Envoy's default `http.url` path length (`max_path_tag_length`).
pub const MAX_PATH_TAG: usize = 256;

/// What a request's span is made of.
pub struct SpanFacts<'a> {
    pub entry: &'a crate::access_log::Entry<'a>,
    pub custom_tags: &'a [super::config::CustomTag],
    pub context: &'a SpanContext,
    /// The operation a decorator (or on ingress the client) names.
    pub operation: Option<&'a str>,
    pub ingress: bool,
    pub max_path_tag: usize,
}

/// One upstream attempt's span (`spawn_upstream_span`), as the engine
/// records it.
#[derive(Debug, Clone)]
pub struct UpstreamSpan {
    /// The id propagated to the upstream.
    pub id: u64,
    pub start: SystemTime,
    /// When the attempt failed; else the stream's end.
    pub end: Option<SystemTime>,
    pub address: Option<std::net::SocketAddr>,
    pub cluster: String,
    /// The upstream's status, 0 when it gave none.
    pub status: u16,
    /// The upstream response's protocol.
    pub protocol: Option<&'static str>,
    /// Envoy's reset reason, when the attempt failed.
    pub error_reason: Option<&'static str>,
}

/// Nanoseconds since the epoch.
pub fn nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The tags Envoy's connection manager sets on a request's span
/// (`finalizeDownstreamSpan`), and whether its status code is a 5xx.
pub fn request_tags<'a>(f: &'a SpanFacts) -> (Vec<(&'a str, String)>, bool) {
    let e = f.entry;
    let mut error = false;
    let mut tags: Vec<(&str, String)> = vec![
        ("component", "proxy".into()),
        ("node_id", crate::config::local_node().id.clone()),
        ("zone", crate::config::local_node().zone.clone()),
    ];
    if let Some(h) = &e.http {
        let header = |n: &str| {
            h.request
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        if let Some(id) = header("x-request-id") {
            tags.push(("guid:x-request-id", id));
        }
        // Envoy cuts the path to max_path_tag_length, then puts the scheme
        // and host before it.
        let mut path = header("x-envoy-original-path").unwrap_or_else(|| h.pseudo.path.to_string());
        if path.len() > f.max_path_tag {
            let mut at = f.max_path_tag;
            while !path.is_char_boundary(at) {
                at -= 1;
            }
            path.truncate(at);
        }
        let url = format!("{}://{}{}", h.pseudo.scheme, h.pseudo.authority, path);
        tags.push(("http.url", url));
        tags.push(("http.method", h.pseudo.method.to_string()));
        tags.push((
            "downstream_cluster",
            header("x-envoy-downstream-service-cluster").unwrap_or_else(|| "-".into()),
        ));
        tags.push((
            "user_agent",
            header("user-agent").unwrap_or_else(|| "-".into()),
        ));
        tags.push(("http.protocol", h.protocol.to_string()));
        tags.push(("peer.address", e.downstream_remote.ip().to_string()));
        tags.push(("request_size", e.bytes_received.to_string()));
        tags.push(("response_size", e.bytes_sent.to_string()));
        let flags = if e.response_flags.is_empty() {
            "-"
        } else {
            e.response_flags
        };
        tags.push(("response_flags", flags.to_string()));
        if h.response_code > 0 {
            tags.push(("http.status_code", h.response_code.to_string()));
        }
        if !e.upstream_cluster.is_empty() {
            tags.push(("upstream_cluster", e.upstream_cluster.to_string()));
            tags.push(("upstream_cluster.name", e.upstream_cluster.to_string()));
        }
        if h.response_code == 0 || h.response_code >= 500 {
            tags.push(("error", "true".into()));
        }
        // Envoy's span status follows the status code.
        error = h.response_code >= 500;
        for t in f.custom_tags {
            if let Some(v) = t.value(h.request) {
                tags.push((t.tag.as_str(), v));
            }
        }
    }
    (tags, error)
}

/// The tags Envoy's router sets on an upstream attempt's span.
pub fn upstream_tags<'a>(f: &'a SpanFacts, u: &UpstreamSpan) -> Vec<(&'a str, String)> {
    let e = f.entry;
    let mut tags: Vec<(&str, String)> = vec![("component", "proxy".into())];
    if let Some(h) = &e.http {
        for t in f.custom_tags {
            if let Some(v) = t.value(h.request) {
                tags.push((t.tag.as_str(), v));
            }
        }
    }
    let addr = u.address.map(|a| a.to_string()).unwrap_or_default();
    tags.push(("http.protocol", u.protocol.unwrap_or("-").to_string()));
    tags.push(("http.status_code", u.status.to_string()));
    tags.push(("peer.address", addr.clone()));
    let flags = if e.response_flags.is_empty() {
        "-"
    } else {
        e.response_flags
    };
    tags.push(("response_flags", flags.to_string()));
    tags.push(("upstream_address", addr));
    tags.push(("upstream_cluster", u.cluster.clone()));
    tags.push(("upstream_cluster.name", u.cluster.clone()));
    if u.status == 0 || u.status >= 500 {
        tags.push(("error", "true".into()));
    }
    if let Some(r) = u.error_reason {
        tags.push(("error.reason", r.to_string()));
    }
    tags
}

/// An upstream attempt's (start, end) in nanoseconds: a failed attempt
/// ended when it failed, the last one with the stream.
pub fn upstream_times(f: &SpanFacts, u: &UpstreamSpan) -> (u64, u64) {
    let e = f.entry;
    let start = nanos(u.start);
    let end = u
        .end
        .map_or_else(|| nanos(e.start) + e.duration.as_nanos() as u64, nanos);
    (start, end.max(start))
}
