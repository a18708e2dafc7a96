//! The http tier's raw HTTP/1.1 framing cases: bytes that clients and
//! smugglers send, written to a raw socket; Legate must answer as strictly
//! as Envoy (same status, or the same refusal).

use crate::proxies::{self, Binaries, Kind};
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

/// The status line's code, or "closed" when the proxy sent nothing.
fn send_raw(port: u16, bytes: &str) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return "connect failed".into();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = s.write_all(bytes.as_bytes());
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n) = s.read(&mut chunk) {
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
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
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("closed")
        .to_string();
    let accept = head
        .lines()
        .any(|l| l.to_ascii_lowercase() == "sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=");
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
    let mut answers = Vec::new();
    for kind in [Kind::Envoy, Kind::Legate] {
        let _r = proxies::start(bins, kind, &path, admin, work)?;
        answers.push(tokio::task::block_in_place(|| {
            let mut a: Vec<String> = CASES.iter().map(|(_, b)| send_raw(port, b)).collect();
            a.push(websocket_roundtrip(port));
            a
        }));
    }
    for (i, (name, _)) in CASES.iter().enumerate() {
        let (e, l) = (&answers[0][i], &answers[1][i]);
        let o = Outcome::compare(e, l);
        report.add("http", "http1-framing", name, o);
    }
    let (e, l) = (answers[0].last().unwrap(), answers[1].last().unwrap());
    let o = Outcome::compare(e, l);
    report.add("http", "websocket", "upgrade-and-tunnel", o);
    Ok(())
}
