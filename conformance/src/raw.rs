//! Requests the routing tier sends by hand over a plain socket: HTTP/1.1
//! after an optional PROXY protocol header, which curl cannot send in v2.
//! The response is read to the end (the request says `connection: close`)
//! and compared like curl's.

use crate::compare::Observation;
use crate::routing::{ProxyHeader, Request};
use legate_tests::legate::CurlResult;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

/// A PROXY header as HAProxy's spec writes it.
fn header(h: &ProxyHeader, listener: SocketAddr) -> Vec<u8> {
    let addr = |s: &str| -> SocketAddr { s.parse().expect("a PROXY address is ip:port") };
    let dst = h.destination.as_deref().map_or(listener, addr);
    let src = h.source.as_deref().map(addr);
    match (h.version, src) {
        (1, None) => b"PROXY UNKNOWN\r\n".to_vec(),
        (1, Some(s)) => {
            let fam = if s.is_ipv4() { "TCP4" } else { "TCP6" };
            let (si, di, sp, dp) = (s.ip(), dst.ip(), s.port(), dst.port());
            format!("PROXY {fam} {si} {di} {sp} {dp}\r\n").into_bytes()
        }
        (2, src) => {
            let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
            let mut block = Vec::new();
            let (cmd, fam) = match (src, dst) {
                (None, _) => (0x20, 0x00),
                (Some(SocketAddr::V4(s)), SocketAddr::V4(d)) => {
                    block.extend_from_slice(&s.ip().octets());
                    block.extend_from_slice(&d.ip().octets());
                    (0x21, 0x11)
                }
                (Some(SocketAddr::V6(s)), SocketAddr::V6(d)) => {
                    block.extend_from_slice(&s.ip().octets());
                    block.extend_from_slice(&d.ip().octets());
                    (0x21, 0x21)
                }
                _ => panic!("PROXY source and destination of different families"),
            };
            if let Some(s) = src {
                block.extend_from_slice(&s.port().to_be_bytes());
                block.extend_from_slice(&dst.port().to_be_bytes());
            }
            out.extend_from_slice(&[cmd, fam]);
            out.extend_from_slice(&(block.len() as u16).to_be_bytes());
            out.extend_from_slice(&block);
            out
        }
        (v, _) => panic!("PROXY protocol version {v}"),
    }
}

/// Sends the request by hand; a connection closed without a response is
/// `Observation::failed()`.
pub fn http1(port: u16, r: &Request) -> Observation {
    let listener = SocketAddr::from(([127, 0, 0, 1], port));
    let mut bytes = r
        .proxy_protocol
        .as_ref()
        .map_or_else(Vec::new, |h| header(h, listener));
    let method = r.method.as_deref().unwrap_or("GET");
    let version = if r.http1_0 { "HTTP/1.0" } else { "HTTP/1.1" };
    let mut head = format!("{method} {} {version}\r\n", r.path);
    if !r.omit_host && !r.headers.keys().any(|k| k.eq_ignore_ascii_case("host")) {
        head.push_str("host: conformance.test\r\n");
    }
    for (k, v) in &r.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    for line in &r.header_lines {
        head.push_str(&format!("{line}\r\n"));
    }
    let body = r.body.as_deref().unwrap_or("");
    let names = r
        .headers
        .keys()
        .map(String::as_str)
        .chain(r.header_lines.iter().filter_map(|l| l.split(':').next()));
    let states_length = names.into_iter().any(|k| {
        k.trim().eq_ignore_ascii_case("content-length")
            || k.trim().eq_ignore_ascii_case("transfer-encoding")
    });
    // A request may state a longer body than it sends (timeouts).
    if r.body.is_some() && !states_length {
        head.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    head.push_str("connection: close\r\n\r\n");
    bytes.extend_from_slice(head.as_bytes());
    bytes.extend_from_slice(body.as_bytes());
    let Ok(mut s) = std::net::TcpStream::connect(listener) else {
        return Observation::failed();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.write_all(&bytes);
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    match parse(&got) {
        Some(res) => {
            let mut o = Observation::from_curl(&res);
            // An HTTP/1.0 client may be answered in either version.
            if r.http1_0 {
                o.headers
                    .insert(":version".into(), vec![res.version.clone()]);
            }
            o
        }
        None => Observation::failed(),
    }
}

/// An HTTP/1.1 response read to the end of the connection. Interim
/// responses before it (`100 Continue`) are skipped, their statuses kept
/// in an `x-conformance-interim` header so they are compared too.
fn parse(mut b: &[u8]) -> Option<CurlResult> {
    let mut interim = Vec::new();
    while b.starts_with(b"HTTP/1.1 1") && !b.starts_with(b"HTTP/1.1 101") {
        let end = b.windows(4).position(|w| w == b"\r\n\r\n")?;
        interim.push(String::from_utf8_lossy(&b[9..12]).into_owned());
        b = &b[end + 4..];
    }
    let mut res = parse_final(b)?;
    if !interim.is_empty() {
        res.headers
            .push(("x-conformance-interim".into(), interim.join(",")));
    }
    Some(res)
}

fn parse_final(b: &[u8]) -> Option<CurlResult> {
    let end = b.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&b[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let mut status_line = lines.next()?.splitn(3, ' ');
    let version = status_line.next()?.to_string();
    let status = status_line.next()?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let raw = &b[end + 4..];
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = if chunked { dechunk(raw)? } else { raw.to_vec() };
    Some(CurlResult {
        version,
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&b[..eol]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}
