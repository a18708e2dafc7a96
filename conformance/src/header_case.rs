//! The http tier's header-name case checks: Envoy's HTTP/1 codec writes
//! every header name in lower case, both ways, unless `header_key_format`
//! says otherwise: `preserve_case` on the side that reads a message keeps
//! the spellings it arrived with, `proper_case_words` on the side that
//! writes it proper-cases the rest. Every name each side wrote is
//! compared, as written. The client and the upstream here are raw sockets,
//! because HTTP libraries hide the case.

use crate::proxies::{self, Binaries};
use crate::report::{Outcome, Report};
use anyhow::Result;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const REQUEST: &[u8] =
    b"GET /case HTTP/1.1\r\nHost: a\r\nUser-Agent: Raw/1\r\nX-Mixed-Case: Yes\r\nx-mixed-CASE: Again\r\nACCEPT: */*\r\n\r\n";
const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Upstream-Mixed: Yes\r\nx-UPSTREAM-mixed: Again\r\nContent-Length: 2\r\n\r\nok";

/// The `header_key_format` settings each case runs with, on the
/// connection manager and on the cluster.
const PRESERVE: &str = "header_key_format: {stateful_formatter: {name: preserve_case, typed_config: {'@type': type.googleapis.com/envoy.extensions.http.header_formatters.preserve_case.v3.PreserveCaseFormatterConfig}}}";
const PRESERVE_PROPER: &str = "header_key_format: {stateful_formatter: {name: preserve_case, typed_config: {'@type': type.googleapis.com/envoy.extensions.http.header_formatters.preserve_case.v3.PreserveCaseFormatterConfig, formatter_type_on_envoy_headers: PROPER_CASE}}}";
const PROPER: &str = "header_key_format: {proper_case_words: {}}";

/// (case, connection manager's setting, cluster's setting).
const CASES: &[(&str, Option<&str>, Option<&str>)] = &[
    ("lowercase-both-ways", None, None),
    ("preserve-case-both", Some(PRESERVE), Some(PRESERVE)),
    ("preserve-case-connection-manager", Some(PRESERVE), None),
    ("preserve-case-cluster", None, Some(PRESERVE)),
    (
        "preserve-case-proper-envoy-headers",
        Some(PRESERVE_PROPER),
        Some(PRESERVE_PROPER),
    ),
    ("proper-case-words", Some(PROPER), Some(PROPER)),
];

/// Reads one message head (to the blank line) and returns its header names
/// as written.
fn head_names(s: &mut TcpStream) -> Option<Vec<String>> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => return None,
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    Some(
        text.split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':').map(|(n, _)| n.to_string()))
            .collect(),
    )
}

/// An upstream that records the header names of the last request it read
/// and answers each with `RESPONSE`, keeping the connection.
fn raw_upstream() -> std::io::Result<(u16, Arc<Mutex<Vec<String>>>)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let seen = seen.clone();
            std::thread::spawn(move || {
                while let Some(names) = head_names(&mut s) {
                    *seen.lock().unwrap() = names;
                    if s.write_all(RESPONSE).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok((port, out))
}

/// ("upstream saw <names>; client saw <names>", the client's `Date`
/// spelling): the names as written, of the headers each side sent, the
/// `Date` pingora writes compared on its own (a known gap).
fn observe(port: u16, seen: &Mutex<Vec<String>>) -> (String, String) {
    let failed = |why: &str| (why.to_string(), why.to_string());
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return failed("connect failed");
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    if s.write_all(REQUEST).is_err() {
        return failed("write failed");
    }
    let Some(down) = head_names(&mut s) else {
        return failed("no response");
    };
    // Every name as written, sorted (the order Envoy adds its own headers
    // in is not what is compared), but for pingora's `Connection:
    // keep-alive`, which Envoy leaves unsaid (the routing tier tolerates it
    // too: it is HTTP/1.1's default), and `Date` (compared on its own).
    let all = |names: &[String]| -> String {
        let mut v: Vec<String> = names
            .iter()
            .filter(|n| !n.eq_ignore_ascii_case("connection") && !n.eq_ignore_ascii_case("date"))
            .cloned()
            .collect();
        v.sort();
        v.join(",")
    };
    let up = seen.lock().unwrap().clone();
    let date = down
        .iter()
        .filter(|n| n.eq_ignore_ascii_case("date"))
        .cloned()
        .collect::<Vec<_>>()
        .join(",");
    (
        format!("upstream saw {}; client saw {}", all(&up), all(&down)),
        format!("client saw {date}"),
    )
}

pub async fn run(bins: &Binaries, work: &std::path::Path, report: &mut Report) -> Result<()> {
    for (case, hcm, cluster) in CASES {
        let (up, seen) = raw_upstream()?;
        let hcm = hcm.map_or(String::new(), |f| format!("http_protocol_options: {{{f}}}"));
        let cluster = cluster.map_or(String::new(), |f| {
            format!(
                "typed_extension_protocol_options: {{envoy.extensions.upstreams.http.v3.HttpProtocolOptions: {{'@type': type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions, explicit_http_config: {{http_protocol_options: {{{f}}}}}}}}}"
            )
        });
        let crate::bootstrap::Written { path, port, admin } = crate::bootstrap::write_single(
            work,
            &format!("header-case-{case}"),
            &hcm,
            "route: {cluster: a}",
            Some(("a", up, &cluster)),
            |c| c,
        )?;
        let answers = proxies::each(bins, &path, admin, work, || observe(port, &seen))?;
        let (e, l) = (&answers[0], &answers[1]);
        report.add(
            "http",
            "http1-header-case",
            case,
            Outcome::compare(&e.0, &l.0),
        );
        report.add(
            "http",
            "http1-header-case",
            &format!("{case}-date"),
            Outcome::compare(&e.1, &l.1),
        );
    }
    Ok(())
}
