//! Headers to and from the processor: the headers message Envoy sends
//! (pseudo-headers first, values in `raw_value`), and the processor's
//! header mutations applied under Envoy's default mutation rules.
//!
//! Envoy's default checker ignores (and counts in
//! `rejected_header_mutations`) setting `host`, `:authority`, `:method`,
//! `:scheme` or any `x-envoy-*` header, appending to a pseudo-header, and
//! removing a pseudo-header or `host`; `:path` and `:status` may be set.
//! A value with characters no header may carry, or a header given both
//! `value` and `raw_value`, fails the stream instead. As Envoy 1.40 reads
//! them, `append_action` is ignored: only the deprecated `append` flag
//! chooses between adding a value and replacing the header, and a header
//! sent with `value` alone gets an empty value (Envoy reads `raw_value`).

use http::{HeaderName, HeaderValue};
use legate_proto::envoy_types::pb::envoy::config::core::v3 as core;
use legate_proto::envoy_types::pb::envoy::service::ext_proc::v3 as ep;
use pingora_http::{RequestHeader, ResponseHeader};

/// A mutation that fails the stream, as Envoy's `applyHeaderMutations`
/// errors do (the local reply's details are the message, spaces as `_`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MutationError {
    /// A value no header may carry (Envoy counts it as a rejected
    /// mutation too).
    #[error("header_mutation_set_contains_invalid_character")]
    InvalidSet,
    #[error("Invalid character in remove_headers mutation.")]
    InvalidRemove,
    #[error("Only one of value or raw_value in set_headers mutation may be set.")]
    BothValues,
}

fn proto_header(key: &str, value: &[u8]) -> core::HeaderValue {
    core::HeaderValue {
        key: key.to_string(),
        raw_value: value.to_vec(),
        ..Default::default()
    }
}

/// The request's headers as Envoy's header map holds them: the
/// pseudo-headers first (HTTP/1's Host is `:authority`), then the rest in
/// order, those `keep` lets through.
pub fn request_headers(
    req: &RequestHeader,
    authority: &str,
    scheme: &str,
    keep: &dyn Fn(&str) -> bool,
) -> core::HeaderMap {
    let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut headers = vec![
        proto_header(":authority", authority.as_bytes()),
        proto_header(":path", path.as_bytes()),
        proto_header(":method", req.method.as_str().as_bytes()),
        proto_header(":scheme", scheme.as_bytes()),
    ];
    // Envoy's map holds neither HTTP/1's Host (it is `:authority`) nor
    // its transfer-encoding (the codec's framing).
    headers.extend(
        req.headers
            .iter()
            .filter(|(k, _)| *k != http::header::HOST && *k != http::header::TRANSFER_ENCODING)
            .map(|(k, v)| proto_header(k.as_str(), v.as_bytes())),
    );
    headers.retain(|h| keep(&h.key));
    core::HeaderMap { headers }
}

/// The response's headers: `:status`, then the rest.
pub fn response_headers(resp: &ResponseHeader, keep: &dyn Fn(&str) -> bool) -> core::HeaderMap {
    let mut headers = vec![proto_header(":status", resp.status.as_str().as_bytes())];
    headers.extend(
        resp.headers
            .iter()
            .map(|(k, v)| proto_header(k.as_str(), v.as_bytes())),
    );
    headers.retain(|h| keep(&h.key));
    core::HeaderMap { headers }
}

/// One header change, read and checked.
enum Change {
    Set(HeaderName, HeaderValue, bool),
    Remove(HeaderName),
    /// `:path` or `:status`, set.
    Pseudo(String, HeaderValue),
}

/// Whether Envoy's default rules let `name` be set (`append`: added to).
fn settable(name: &str, append: bool) -> bool {
    if name.starts_with(':') {
        return !append && matches!(name, ":path" | ":status");
    }
    name != "host" && !name.starts_with("x-envoy")
}

/// Reads the mutation into changes Envoy's rules allow, counting the
/// ones they ignore in `rejected`.
fn changes(m: &ep::HeaderMutation, rejected: &mut u64) -> Result<Vec<Change>, MutationError> {
    let mut out = Vec::with_capacity(m.set_headers.len() + m.remove_headers.len());
    for name in &m.remove_headers {
        let lower = name.to_ascii_lowercase();
        if lower.starts_with(':') || lower == "host" || lower.starts_with("x-envoy") {
            *rejected += 1;
            continue;
        }
        let n =
            HeaderName::from_bytes(lower.as_bytes()).map_err(|_| MutationError::InvalidRemove)?;
        out.push(Change::Remove(n));
    }
    for o in &m.set_headers {
        let Some(h) = &o.header else { continue };
        if !h.value.is_empty() && !h.raw_value.is_empty() {
            return Err(MutationError::BothValues);
        }
        #[allow(deprecated)]
        let append = o.append.as_ref().is_some_and(|a| a.value);
        let key = h.key.to_ascii_lowercase();
        let Ok(value) = HeaderValue::from_bytes(&h.raw_value) else {
            *rejected += 1;
            return Err(MutationError::InvalidSet);
        };
        if !settable(&key, append) {
            *rejected += 1;
            continue;
        }
        if key.starts_with(':') {
            out.push(Change::Pseudo(key, value));
            continue;
        }
        let n = HeaderName::from_bytes(key.as_bytes()).map_err(|_| MutationError::InvalidSet)?;
        out.push(Change::Set(n, value, append));
    }
    Ok(out)
}

/// Applies the processor's mutation to the request; returns how many
/// changes the rules ignored.
pub fn apply_to_request(
    req: &mut RequestHeader,
    m: &ep::HeaderMutation,
) -> Result<u64, MutationError> {
    let mut rejected = 0;
    for c in changes(m, &mut rejected)? {
        match c {
            Change::Remove(n) => {
                req.remove_header(&n);
            }
            Change::Set(n, v, true) => {
                let _ = req.append_header(n, v);
            }
            Change::Set(n, v, false) => {
                let _ = req.insert_header(n, v);
            }
            Change::Pseudo(name, v) if name == ":path" => {
                match v.to_str().ok().and_then(|p| p.parse::<http::Uri>().ok()) {
                    Some(uri) if uri.path().starts_with('/') => req.set_uri(uri),
                    _ => rejected += 1,
                }
            }
            Change::Pseudo(..) => rejected += 1,
        }
    }
    Ok(rejected)
}

/// Applies the processor's mutation to the response; returns how many
/// changes the rules ignored (`:status` must be a number from 200).
pub fn apply_to_response(
    resp: &mut ResponseHeader,
    m: &ep::HeaderMutation,
) -> Result<u64, MutationError> {
    let mut rejected = 0;
    for c in changes(m, &mut rejected)? {
        match c {
            Change::Remove(n) => {
                resp.remove_header(&n);
            }
            Change::Set(n, v, true) => {
                let _ = resp.append_header(n, v);
            }
            Change::Set(n, v, false) => {
                let _ = resp.insert_header(n, v);
            }
            Change::Pseudo(name, v) if name == ":status" => {
                match v.to_str().ok().and_then(|s| s.parse::<u16>().ok()) {
                    Some(s) if (200..1000).contains(&s) => {
                        if resp.set_status(s).is_err() {
                            rejected += 1;
                        }
                    }
                    _ => rejected += 1,
                }
            }
            Change::Pseudo(..) => rejected += 1,
        }
    }
    Ok(rejected)
}

/// An immediate response's headers, as (name, value) pairs for a local
/// reply; the rules' rejections counted in `rejected`.
pub fn reply_headers(
    m: Option<&ep::HeaderMutation>,
    rejected: &mut u64,
) -> Vec<(HeaderName, HeaderValue)> {
    let Some(m) = m else { return Vec::new() };
    let Ok(cs) = changes(m, rejected) else {
        return Vec::new();
    };
    cs.into_iter()
        .filter_map(|c| match c {
            Change::Set(n, v, _) => Some((n, v)),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(key: &str, raw: &str, append: Option<bool>) -> core::HeaderValueOption {
        #[allow(deprecated)]
        core::HeaderValueOption {
            header: Some(core::HeaderValue {
                key: key.into(),
                raw_value: raw.as_bytes().to_vec(),
                ..Default::default()
            }),
            append: append
                .map(|value| legate_proto::envoy_types::pb::google::protobuf::BoolValue { value }),
            ..Default::default()
        }
    }

    fn request() -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/a?b=1", None).unwrap();
        r.insert_header("host", "h").unwrap();
        r.insert_header("x-user", "mallory").unwrap();
        r.insert_header("x-remove-me", "1").unwrap();
        r
    }

    #[test]
    fn sets_replace_unless_append_and_rules_ignore_routing_headers() {
        let mut r = request();
        let m = ep::HeaderMutation {
            set_headers: vec![
                set("X-User", "alice", None),
                set("x-more", "1", Some(true)),
                set("host", "evil", None),
                set(":scheme", "ftp", None),
                set("x-envoy-x", "1", None),
                set(":path", "/new?q", None),
            ],
            remove_headers: vec!["x-remove-me".into(), ":method".into(), "host".into()],
        };
        assert_eq!(apply_to_request(&mut r, &m), Ok(5));
        assert_eq!(r.headers["x-user"], "alice");
        assert_eq!(r.headers["x-more"], "1");
        assert_eq!(r.headers["host"], "h");
        assert!(!r.headers.contains_key("x-remove-me"));
        assert_eq!(r.uri.path_and_query().unwrap().as_str(), "/new?q");
    }

    #[test]
    fn bad_values_fail_the_stream() {
        let mut r = request();
        let bad = ep::HeaderMutation {
            set_headers: vec![set("x-bad", "a\nb", None)],
            remove_headers: vec![],
        };
        assert_eq!(
            apply_to_request(&mut r, &bad),
            Err(MutationError::InvalidSet)
        );
        let mut both = set("x-both", "raw", None);
        both.header.as_mut().unwrap().value = "v".into();
        let m = ep::HeaderMutation {
            set_headers: vec![both],
            remove_headers: vec![],
        };
        assert_eq!(apply_to_request(&mut r, &m), Err(MutationError::BothValues));
    }

    #[test]
    fn status_is_settable_from_200() {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        let m = |s: &str| ep::HeaderMutation {
            set_headers: vec![set(":status", s, None)],
            remove_headers: vec![],
        };
        assert_eq!(apply_to_response(&mut resp, &m("202")), Ok(0));
        assert_eq!(resp.status.as_u16(), 202);
        assert_eq!(apply_to_response(&mut resp, &m("100")), Ok(1));
        assert_eq!(apply_to_response(&mut resp, &m("x")), Ok(1));
        assert_eq!(resp.status.as_u16(), 202);
    }

    #[test]
    fn headers_go_with_pseudo_headers_first() {
        let r = request();
        let m = request_headers(&r, "h", "http", &|k| k != "x-remove-me");
        let keys: Vec<&str> = m.headers.iter().map(|h| h.key.as_str()).collect();
        assert_eq!(
            keys,
            [":authority", ":path", ":method", ":scheme", "x-user"]
        );
        assert_eq!(m.headers[1].raw_value, b"/a?b=1");
    }
}
