//! `envoy.filters.http.grpc_web`: gRPC-Web clients to gRPC upstreams, as
//! Envoy's filter converts them.
//!
//! A request whose `content-type` is exactly one of the four gRPC-Web
//! types becomes a gRPC request (`application/grpc`, `te: trailers`,
//! `grpc-accept-encoding: identity` unless given, no length; a `-text`
//! body base64-decoded, 400 when it is not base64). Its response gets the
//! gRPC-Web type (`-text` only when `accept` asks for it exactly), no
//! length, a `-text` body base64-encoded frame by frame, and its trailers
//! as a final frame (`0x80`, length, `name:value\r\n` lines) in the body.
//! A response that is not gRPC becomes a gRPC-Web error: `grpc-status`
//! from its HTTP status, `grpc-message` from its body, no body. Envoy
//! holds the headers of such a response until its body is in; Legate's
//! engine writes headers first, so for an upstream's non-gRPC response
//! the body is dropped and `grpc-message` left out (Legate's own replies
//! get Envoy's whole conversion). Stats: `cluster.<c>.grpc-web.<service>.
//! <method>.{<status>,success|failure,total}`.

use super::{Factory, FilterReply, Flow, HttpFilter, RequestInfo, ResponseInfo, State};
use crate::config::Result;
use crate::registry::MessageSupport;
use base64::Engine;
use bytes::{BufMut, Bytes, BytesMut};
use http::HeaderValue;
use legate_proto::envoy_types::pb::google::protobuf::Any;
use pingora_http::ResponseHeader;
use std::sync::{Arc, Mutex};

const TYPE: &str = "envoy.extensions.filters.http.grpc_web.v3.GrpcWeb";

pub static FACTORY: Factory = Factory {
    type_name: TYPE,
    build,
    per_route: &[],
};

pub static REGISTRY: &[MessageSupport] = &[MessageSupport {
    message: TYPE,
    supported: &[],
    warn: &[],
}];

const TEXT_TYPES: [&str; 2] = [
    "application/grpc-web-text",
    "application/grpc-web-text+proto",
];
const BINARY_TYPES: [&str; 2] = ["application/grpc-web", "application/grpc-web+proto"];

/// The reply to a `-text` body that is not base64, already in the
/// gRPC-Web form Envoy's conversion gives its 400.
const BAD_BASE64: &str = "Bad gRPC-web request, invalid base64 data.";

#[derive(Debug)]
pub struct GrpcWeb;

fn build(_a: &Any, _hcm_prefix: &str, _path: &str) -> Result<Arc<dyn HttpFilter>> {
    Ok(Arc::new(GrpcWeb))
}

/// One gRPC-Web request's state.
struct Call {
    /// The request body is base64 (`-text`).
    text_request: bool,
    /// The response is base64 (`accept` asked for `-text`).
    text_response: bool,
    /// Fewer than 4 base64 characters kept for the next chunk.
    pending_in: BytesMut,
    /// A partial response frame kept for the next chunk (text responses).
    pending_out: BytesMut,
    /// The response was converted: its body is dropped.
    drop_body: bool,
    /// `cluster.<c>.grpc-web.<service>.<method>.`, when the path names one.
    stats: Option<String>,
}

fn call(state: &mut Option<State>) -> Option<&mut Call> {
    state
        .as_mut()
        .and_then(|s| s.downcast_mut::<Mutex<Call>>())
        .map(|m| m.get_mut().unwrap_or_else(|e| e.into_inner()))
}

/// `cluster.<c>.grpc-web.<service>.<method>.` for a path of exactly two
/// segments (query removed).
fn stat_prefix(path: &str, cluster: Option<&str>) -> Option<String> {
    let path = path.split('?').next().unwrap_or("");
    let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match (parts.as_slice(), cluster) {
        ([service, method], Some(c)) => Some(format!("cluster.{c}.grpc-web.{service}.{method}.")),
        _ => None,
    }
}

fn charge(prefix: &Option<String>, status: &str) {
    let Some(p) = prefix else { return };
    crate::stats::counter(format!("{p}{status}")).increment(1);
    let outcome = if status == "0" { "success" } else { "failure" };
    crate::stats::counter(format!("{p}{outcome}")).increment(1);
    crate::stats::counter(format!("{p}total")).increment(1);
}

/// Envoy's HTTP status → gRPC status for a non-gRPC response.
fn grpc_status_for(http: u16) -> u32 {
    match http {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => 14,
        _ => 2,
    }
}

/// `grpc-message` as this filter writes it: controls, `~`, DEL, non-ASCII
/// and `%` percent-encoded.
fn percent_encode(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    for &c in b {
        if c < 0x20 || c == b'~' || c >= 0x7f || c == b'%' {
            out.push_str(&format!("%{c:02X}"));
        } else {
            out.push(c as char);
        }
    }
    out
}

/// The gRPC response check Envoy makes before converting.
fn is_grpc_response(resp: &ResponseHeader, no_body: bool) -> bool {
    if no_body && resp.headers.contains_key("grpc-status") {
        return true;
    }
    let ct = resp
        .headers
        .get(http::header::CONTENT_TYPE)
        .map_or("", |v| v.to_str().unwrap_or(""));
    if resp.status == 200 && (ct == "application/grpc" || ct.starts_with("application/grpc+")) {
        return true;
    }
    let web = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim_end()
        .to_ascii_lowercase();
    resp.status == 200 && BINARY_TYPES.contains(&web.as_str())
}

impl GrpcWeb {
    /// Decodes what whole base64 quads there are; the rest waits, unless
    /// this is the end.
    /// Err: Envoy's details for the failure.
    fn decode(
        c: &mut Call,
        body: &mut Option<Bytes>,
        end: bool,
    ) -> std::result::Result<(), &'static str> {
        if let Some(b) = body.take() {
            c.pending_in.extend_from_slice(&b);
        }
        let n = if end {
            if !c.pending_in.len().is_multiple_of(4) {
                return Err("grpc_base_64_decode_failed_bad_size");
            }
            c.pending_in.len()
        } else {
            c.pending_in.len() / 4 * 4
        };
        if n == 0 {
            // Nothing whole yet: an empty chunk (pingora takes a missing
            // one as the end of the body).
            *body = Some(Bytes::new());
            return Ok(());
        }
        let quads = c.pending_in.split_to(n);
        const FAILED: &str = "grpc_base_64_decode_failed";
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(&quads)
            .map_err(|_| FAILED)?;
        if decoded.is_empty() {
            return Err(FAILED);
        }
        *body = Some(Bytes::from(decoded));
        Ok(())
    }

    /// Base64-encodes each whole frame of a text response on its own.
    fn encode_frames(c: &mut Call, body: &mut Option<Bytes>) {
        if let Some(b) = body.take() {
            c.pending_out.extend_from_slice(&b);
        }
        let mut out = String::new();
        loop {
            if c.pending_out.len() < 5 {
                break;
            }
            let len = u32::from_be_bytes([
                c.pending_out[1],
                c.pending_out[2],
                c.pending_out[3],
                c.pending_out[4],
            ]) as usize;
            if c.pending_out.len() < 5 + len {
                break;
            }
            let frame = c.pending_out.split_to(5 + len);
            out.push_str(&base64::engine::general_purpose::STANDARD.encode(&frame));
        }
        if !out.is_empty() {
            *body = Some(Bytes::from(out));
        }
    }
}

#[async_trait::async_trait]
impl HttpFilter for GrpcWeb {
    async fn on_request(&self, rq: &mut RequestInfo<'_>, state: &mut Option<State>) -> Flow {
        let ct = rq
            .req
            .headers
            .get(http::header::CONTENT_TYPE)
            .map_or("", |v| v.to_str().unwrap_or(""));
        let text_request = TEXT_TYPES.contains(&ct);
        if !text_request && !BINARY_TYPES.contains(&ct) {
            return Flow::Continue;
        }
        let text_response = rq
            .req
            .headers
            .get(http::header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| TEXT_TYPES.contains(&a));
        let req = &mut *rq.req;
        req.remove_header(&http::header::CONTENT_LENGTH);
        let _ = req.insert_header(http::header::CONTENT_TYPE, "application/grpc");
        let _ = req.insert_header(http::header::TE, "trailers");
        if !req.headers.contains_key("grpc-accept-encoding") {
            let _ = req.insert_header("grpc-accept-encoding", "identity");
        }
        let path = req
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        *state = Some(Box::new(Mutex::new(Call {
            text_request,
            text_response,
            pending_in: BytesMut::new(),
            pending_out: BytesMut::new(),
            drop_body: false,
            stats: stat_prefix(&path, rq.cluster),
        })));
        Flow::Continue
    }

    fn on_response(
        &self,
        resp: &mut ResponseHeader,
        info: &ResponseInfo<'_>,
        state: Option<&State>,
    ) {
        let Some(m) = state.and_then(|s| s.downcast_ref::<Mutex<Call>>()) else {
            return;
        };
        let mut c = m.lock().unwrap_or_else(|e| e.into_inner());
        let no_body = info.req.method == http::Method::HEAD
            || resp
                .headers
                .get(http::header::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() == b"0")
            || info.local_body.is_some_and(|b| b.is_empty());
        let grpc = is_grpc_response(resp, no_body);
        resp.remove_header(&http::header::CONTENT_LENGTH);
        let ct = if c.text_response {
            "application/grpc-web-text+proto"
        } else {
            "application/grpc-web+proto"
        };
        let _ = resp.insert_header(http::header::CONTENT_TYPE, ct);
        if let Some(s) = resp
            .headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
        {
            charge(&c.stats, s);
        }
        if grpc || no_body {
            return;
        }
        // Not gRPC: an error in gRPC-Web's terms, with no body.
        let _ = resp.insert_header(
            "grpc-status",
            grpc_status_for(resp.status.as_u16()).to_string(),
        );
        if let Some(b) = info.local_body {
            let cut = &b[..b.len().min(16384)];
            if let Ok(v) = HeaderValue::from_str(&percent_encode(cut)) {
                let _ = resp.insert_header("grpc-message", v);
            }
        }
        let _ = resp.insert_header(http::header::CONTENT_LENGTH, "0");
        resp.remove_header(&http::header::TRANSFER_ENCODING);
        c.drop_body = true;
    }

    fn reads_bodies(&self) -> bool {
        true
    }

    fn on_request_body(
        &self,
        body: &mut Option<Bytes>,
        end: bool,
        state: &mut Option<State>,
    ) -> std::result::Result<(), FilterReply> {
        let Some(c) = call(state) else { return Ok(()) };
        if !c.text_request {
            return Ok(());
        }
        Self::decode(c, body, end).map_err(|details| {
            let mut r = FilterReply::new(400, "", details);
            r.headers = vec![
                (
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static(if c.text_response {
                        "application/grpc-web-text+proto"
                    } else {
                        "application/grpc-web+proto"
                    }),
                ),
                (
                    http::HeaderName::from_static("grpc-status"),
                    HeaderValue::from_static("13"),
                ),
                (
                    http::HeaderName::from_static("grpc-message"),
                    HeaderValue::from_static(BAD_BASE64),
                ),
            ];
            r
        })
    }

    fn on_response_body(&self, body: &mut Option<Bytes>, _end: bool, state: &mut Option<State>) {
        let Some(c) = call(state) else { return };
        if c.drop_body {
            *body = None;
        } else if c.text_response {
            Self::encode_frames(c, body);
        }
    }

    fn on_response_trailers(
        &self,
        trailers: &http::HeaderMap,
        state: &mut Option<State>,
    ) -> Option<Bytes> {
        let c = call(state)?;
        // A converted answer has no body, and so no trailer frame.
        if c.drop_body {
            return None;
        }
        if let Some(s) = trailers.get("grpc-status").and_then(|v| v.to_str().ok()) {
            charge(&c.stats, s);
        }
        let mut text = Vec::new();
        for (k, v) in trailers {
            text.extend_from_slice(k.as_str().as_bytes());
            text.push(b':');
            text.extend_from_slice(v.as_bytes());
            text.extend_from_slice(b"\r\n");
        }
        let mut frame = BytesMut::with_capacity(5 + text.len());
        frame.put_u8(0x80);
        frame.put_u32(text.len() as u32);
        frame.extend_from_slice(&text);
        Some(if c.text_response {
            Bytes::from(base64::engine::general_purpose::STANDARD.encode(&frame))
        } else {
            frame.freeze()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(text: bool) -> Call {
        Call {
            text_request: text,
            text_response: text,
            pending_in: BytesMut::new(),
            pending_out: BytesMut::new(),
            drop_body: false,
            stats: None,
        }
    }

    #[test]
    fn text_bodies_decode_by_whole_quads() {
        let mut c = call(true);
        let mut b = Some(Bytes::from_static(b"AAAAA"));
        GrpcWeb::decode(&mut c, &mut b, false).unwrap();
        assert_eq!(b.as_deref(), Some(&[0u8, 0, 0][..]));
        let mut b = Some(Bytes::from_static(b"AA="));
        GrpcWeb::decode(&mut c, &mut b, true).unwrap();
        assert_eq!(b.as_deref(), Some(&[0u8, 0][..]));
        let mut b = Some(Bytes::from_static(b"AAA"));
        assert!(GrpcWeb::decode(&mut call(true), &mut b, true).is_err());
        // Held back whole: an empty chunk, never a missing one (the end).
        let mut c = call(true);
        let mut b = Some(Bytes::from_static(b"AA"));
        GrpcWeb::decode(&mut c, &mut b, false).unwrap();
        assert_eq!(b.as_deref(), Some(&b""[..]));
    }

    #[test]
    fn text_responses_encode_frame_by_frame() {
        let mut c = call(true);
        let mut b = Some(Bytes::from_static(&[0, 0, 0, 0, 1, 7, 0, 0]));
        GrpcWeb::encode_frames(&mut c, &mut b);
        assert_eq!(b.as_deref(), Some(&b"AAAAAAEH"[..]));
        assert_eq!(c.pending_out.len(), 2);
    }

    #[test]
    fn stats_need_a_service_and_method() {
        assert_eq!(
            stat_prefix("/svc.S/M?x", Some("c")).as_deref(),
            Some("cluster.c.grpc-web.svc.S.M.")
        );
        assert_eq!(stat_prefix("/a/b/c", Some("c")), None);
        assert_eq!(grpc_status_for(503), 14);
        assert_eq!(percent_encode(b"a~%\n"), "a%7E%25%0A");
    }
}
