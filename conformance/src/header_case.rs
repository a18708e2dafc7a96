//! The http tier's header-name case check: Envoy's HTTP/1 codec writes
//! every header name in lower case, both ways (`header_key_format` is what
//! would change that, and Legate rejects it). The client and the upstream
//! here are raw sockets, because HTTP libraries hide the case.

use crate::proxies::{self, Binaries};
use crate::report::{Outcome, Report};
use anyhow::Result;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const REQUEST: &[u8] =
    b"GET /case HTTP/1.1\r\nHost: a\r\nUser-Agent: Raw/1\r\nX-Mixed-Case: Yes\r\nAccept: */*\r\n\r\n";
const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Upstream-Mixed: Yes\r\nContent-Length: 2\r\n\r\nok";
/// The names each side wrote, the ones compared.
const SENT_UP: [&str; 4] = ["host", "user-agent", "x-mixed-case", "accept"];
const SENT_DOWN: [&str; 3] = ["content-type", "x-upstream-mixed", "content-length"];

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

/// "upstream saw <names>; client saw <names>", the names as written, of
/// the headers each side sent.
fn observe(port: u16, seen: &Mutex<Vec<String>>) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return "connect failed".into();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    if s.write_all(REQUEST).is_err() {
        return "write failed".into();
    }
    let Some(down) = head_names(&mut s) else {
        return "no response".into();
    };
    let pick = |names: &[String], wanted: &[&str]| -> String {
        names
            .iter()
            .filter(|n| wanted.iter().any(|w| n.eq_ignore_ascii_case(w)))
            .cloned()
            .collect::<Vec<_>>()
            .join(",")
    };
    let up = seen.lock().unwrap().clone();
    format!(
        "upstream saw {}; client saw {}",
        pick(&up, &SENT_UP),
        pick(&down, &SENT_DOWN)
    )
}

pub async fn run(bins: &Binaries, work: &std::path::Path, report: &mut Report) -> Result<()> {
    let (up, seen) = raw_upstream()?;
    let crate::bootstrap::Written { path, port, admin } = crate::bootstrap::write_single(
        work,
        "header-case",
        "",
        "route: {cluster: a}",
        Some(("a", up, "")),
        |c| c,
    )?;
    let answers = proxies::each(bins, &path, admin, work, || observe(port, &seen))?;
    let (e, l) = (&answers[0], &answers[1]);
    let o = Outcome::compare(e, l);
    report.add("http", "http1-header-case", "lowercase-both-ways", o);
    Ok(())
}
