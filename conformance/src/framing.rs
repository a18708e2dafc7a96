//! The http tier's raw HTTP/1.1 framing cases: bytes that clients and
//! smugglers send, written to a raw socket; Legate must answer as strictly
//! as Envoy (same status, or the same refusal).

use crate::proxies::{self, Binaries};
use crate::report::{Outcome, Report};
use anyhow::Result;
use std::io::{Read, Write};
use std::time::Duration;

pub const CASES: &[(&str, &str)] = &[
    ("plain-get", "GET / HTTP/1.1\r\nhost: a\r\n\r\n"),
    ("http10", "GET / HTTP/1.0\r\nhost: a\r\n\r\n"),
    ("cl-and-te", "POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("two-different-cl", "POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd"),
    ("cl-plus-sign", "POST / HTTP/1.1\r\nhost: a\r\ncontent-length: +3\r\n\r\nabc"),
    ("cl-not-a-number", "POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 0x3\r\n\r\nabc"),
    ("te-gzip-last", "POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked, gzip\r\n\r\n0\r\n\r\n"),
    ("te-unknown", "POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: xchunked\r\n\r\n0\r\n\r\n"),
    ("bad-chunk-size", "POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"),
    ("chunked-ok", "POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
    ("obs-fold", "GET / HTTP/1.1\r\nhost: a\r\nx-a: b\r\n c\r\n\r\n"),
    ("space-before-colon", "GET / HTTP/1.1\r\nhost: a\r\nx-a : b\r\n\r\n"),
    ("nul-in-value", "GET / HTTP/1.1\r\nhost: a\r\nx-a: b\u{0}c\r\n\r\n"),
    ("bad-version", "GET / HTTP/9.9\r\nhost: a\r\n\r\n"),
    ("lowercase-method", "get / HTTP/1.1\r\nhost: a\r\n\r\n"),
    ("no-host-http11", "GET / HTTP/1.1\r\n\r\n"),
    ("absolute-uri", "GET http://a/x HTTP/1.1\r\nhost: a\r\n\r\n"),
    ("absolute-uri-other-host", "GET http://other.example/x HTTP/1.1\r\nhost: a\r\n\r\n"),
    ("asterisk-options", "OPTIONS * HTTP/1.1\r\nhost: a\r\n\r\n"),
    ("connect", "CONNECT a:443 HTTP/1.1\r\nhost: a:443\r\n\r\n"),
    ("bare-lf", "GET / HTTP/1.1\nhost: a\n\n"),
    ("websocket-upgrade-status", "GET /chat HTTP/1.1\r\nhost: a\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"),
    ("h2c-upgrade-ignored", "GET / HTTP/1.1\r\nhost: a\r\nupgrade: h2c\r\nconnection: Upgrade, HTTP2-Settings\r\nhttp2-settings: AAMAAABkAAQAAP__\r\n\r\n"),
    ("expect-100-continue", "POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\nexpect: 100-continue\r\n\r\nabc"),
];

/// Response heads an upstream may send that Envoy's codec refuses (502,
/// "protocol error"), and a well-formed one: served by [`raw_upstream`] at
/// `/<name>`. A head cut short (by FIN or by reset) is also a protocol
/// error in Envoy; a close before any byte is not.
pub const UPSTREAM_CASES: &[(&str, &[u8])] = &[
    ("well-formed", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
    ("cl-and-te", b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    ("two-equal-cl", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\nok"),
    ("head-of-79-kib", b""),
    ("head-of-81-kib", b""),
    ("101-headers", b""),
    ("head-cut-by-fin", b"HTTP/1.1 200 OK\r\nx-a: b\r\n"),
    ("head-cut-by-reset", b"HTTP/1.1 200 OK\r\nx-a: b\r\n"),
    ("closed-before-any-byte", b""),
];

/// A plain TCP upstream answering `GET /<case>` with that case's bytes and
/// closing (by reset for `head-cut-by-reset`); its port.
fn raw_upstream() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let buf = read_head(&mut c);
                if !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    return;
                }
                let head = String::from_utf8_lossy(&buf);
                let path = head.split(' ').nth(1).unwrap_or("/");
                let case = path.trim_start_matches('/');
                let bytes = if let Some(kb) = case
                    .strip_prefix("head-of-")
                    .and_then(|k| k.strip_suffix("-kib"))
                {
                    // Envoy's HTTP/1 default limit is 80 KiB.
                    let n = kb.parse::<usize>().unwrap_or(0) * 1024 - 200;
                    let big = "a".repeat(n);
                    format!("HTTP/1.1 200 OK\r\nx-big: {big}\r\ncontent-length: 2\r\n\r\nok")
                        .into_bytes()
                } else if case == "101-headers" {
                    let many: String = (0..101).map(|i| format!("x-h{i}: v\r\n")).collect();
                    format!("HTTP/1.1 200 OK\r\n{many}content-length: 2\r\n\r\nok").into_bytes()
                } else {
                    UPSTREAM_CASES
                        .iter()
                        .find(|(n, _)| *n == case)
                        .map_or(b"".to_vec(), |(_, b)| b.to_vec())
                };
                let _ = c.write_all(&bytes);
                if case == "head-cut-by-reset" {
                    let _ = socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO));
                }
                // The proxy's read ends here: a FIN, or the reset above.
            });
        }
    });
    Ok(port)
}

/// "<status> <body>" of `GET /<case>` through the proxy on `port`.
fn through_proxy(port: u16, case: &str) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return "connect failed".into();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let req = format!("GET /{case} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n");
    let _ = s.write_all(req.as_bytes());
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got);
    let status = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("closed");
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    format!("{status} {body}")
}

/// The upstream response cases, each through Envoy and Legate.
async fn upstream_framing(
    bins: &Binaries,
    work: &std::path::Path,
    report: &mut Report,
) -> Result<()> {
    let up = raw_upstream()?;
    let crate::bootstrap::Written { path, port, admin } = crate::bootstrap::write_single(
        work,
        "upstream-framing",
        "",
        "route: {cluster: a}",
        Some(("a", up, "")),
        |c| c,
    )?;
    let answers = proxies::each(bins, &path, admin, work, || {
        UPSTREAM_CASES
            .iter()
            .map(|(n, _)| through_proxy(port, n))
            .collect::<Vec<_>>()
    })?;
    for (i, (name, _)) in UPSTREAM_CASES.iter().enumerate() {
        let o = Outcome::compare(&answers[0][i], &answers[1][i]);
        report.add("http", "upstream-framing", name, o);
    }
    Ok(())
}

/// Reads until the end of an HTTP head (and whatever came with it), or
/// until the peer closes or fails: what was read.
fn read_head(s: &mut impl Read) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    buf
}

/// The status line's code, or "closed" when the proxy sent nothing.
fn send_raw(port: u16, bytes: &str) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return "connect failed".into();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = s.write_all(bytes.as_bytes());
    let buf = read_head(&mut s);
    let text = String::from_utf8_lossy(&buf);
    text.lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .map_or("closed".into(), str::to_string)
}

/// A WebSocket upgrade, then bytes through the tunnel: "<status> <echoed>".
fn websocket_roundtrip(port: u16) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return "connect failed".into();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = s.write_all(b"GET /ws HTTP/1.1\r\nhost: a\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n");
    let buf = read_head(&mut s);
    let head = String::from_utf8_lossy(&buf).to_string();
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("closed")
        .to_string();
    let accept = head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="));
    let _ = s.write_all(b"through-the-tunnel");
    let mut got = vec![0u8; 18];
    let echoed = s.read_exact(&mut got).is_ok() && got == b"through-the-tunnel";
    format!("{status} accept={accept} echoed={echoed}")
}

pub async fn run(bins: &Binaries, work: &std::path::Path, report: &mut Report) -> Result<()> {
    let up = legate_tests::echo::start("a", "127.0.0.1:0".parse().unwrap()).await?;
    let crate::bootstrap::Written { path, port, admin } = crate::bootstrap::write_single(
        work,
        "framing",
        "upgrade_configs: [{upgrade_type: websocket}]",
        "route: {cluster: a}",
        Some(("a", up.addr.port(), "")),
        |c| c,
    )?;
    let answers = proxies::each(bins, &path, admin, work, || {
        let mut a: Vec<String> = CASES.iter().map(|(_, b)| send_raw(port, b)).collect();
        a.push(websocket_roundtrip(port));
        a
    })?;
    for (i, (name, _)) in CASES.iter().enumerate() {
        let (e, l) = (&answers[0][i], &answers[1][i]);
        let o = Outcome::compare(e, l);
        report.add("http", "http1-framing", name, o);
    }
    let (e, l) = (answers[0].last().unwrap(), answers[1].last().unwrap());
    let o = Outcome::compare(e, l);
    report.add("http", "websocket", "upgrade-and-tunnel", o);
    upstream_framing(bins, work, report).await
}
