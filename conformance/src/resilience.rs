//! The http tier's cluster resilience cases, compared by counts (never by
//! wall-clock): the same requests through Envoy and Legate, and the same
//! outcomes, outlier detection stats and upstream connection counts.

use crate::proxies::{self, Binaries, Kind};
use crate::report::{Outcome, Report};
use anyhow::Result;

/// A stat from the admin page, or "absent".
pub fn stat(admin: u16, name: &str) -> String {
    let url = format!(
        "http://127.0.0.1:{admin}/stats?filter=^{}$",
        name.replace('.', "\\.")
    );
    legate_tests::legate::try_curl(&url, &["-g"])
        .ok()
        .and_then(|r| {
            r.body
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_string))
        })
        .unwrap_or_else(|| "absent".into())
}

/// A host refusing every connection beside a healthy one, round robin,
/// outlier detection on: 30 requests fail exactly five times (the refusing
/// host's five consecutive 503s eject it), whichever host the balancer
/// starts on.
pub async fn run(bins: &Binaries, work: &std::path::Path, report: &mut Report) -> Result<()> {
    let up = legate_tests::echo::start("a", "127.0.0.1:0".parse().unwrap()).await?;
    let dead = legate_tests::legate::free_port();
    let crate::bootstrap::Written { path, port, admin } = crate::bootstrap::write_single(
        work,
        "outlier",
        "",
        "route: {cluster: od}",
        Some((
            "od",
            up.addr.port(),
            "outlier_detection: {max_ejection_percent: 100, interval: 30s, base_ejection_time: 30s}",
        )),
        |c| {
            c.replace(
                "lb_endpoints: [{endpoint:",
                &format!("lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {dead}}}}}}}}}, {{endpoint:"),
            )
        },
    )?;
    let stats = [
        "cluster.od.outlier_detection.ejections_active",
        "cluster.od.outlier_detection.ejections_enforced_consecutive_5xx",
        "cluster.od.outlier_detection.ejections_detected_consecutive_5xx",
        "cluster.od.outlier_detection.ejections_detected_consecutive_gateway_failure",
        "cluster.od.outlier_detection.ejections_enforced_consecutive_gateway_failure",
    ];
    let mut seen = Vec::new();
    for kind in [Kind::Envoy, Kind::Legate] {
        let _r = proxies::start(bins, kind, &path, admin, work)?;
        let failed = tokio::task::block_in_place(|| {
            (0..30)
                .filter(|_| {
                    legate_tests::legate::try_curl(&format!("http://127.0.0.1:{port}/"), &[])
                        .map_or(true, |r| r.status != 200)
                })
                .count()
        });
        let mut got = vec![format!("{failed} of 30 failed")];
        got.extend(stats.iter().map(|s| format!("{s}: {}", stat(admin, s))));
        seen.push(got);
    }
    report.add(
        "http",
        "outlier-detection",
        "refusing-host-ejected-after-five",
        Outcome::compare(&seen[0].join("; "), &seen[1].join("; ")),
    );
    Ok(())
}

/// `max_connection_duration: 2s`: two requests back to back share one
/// upstream connection; one made after the limit gets a new connection,
/// also when the connection never idled (a request every half second, so
/// an idle timeout alone would keep it).
pub async fn max_connection_duration(
    bins: &Binaries,
    work: &std::path::Path,
    report: &mut Report,
) -> Result<()> {
    let up = legate_tests::echo::start("a", "127.0.0.1:0".parse().unwrap()).await?;
    let crate::bootstrap::Written { path, port, admin } = crate::bootstrap::write_single(
        work,
        "maxdur",
        "",
        "route: {cluster: md}",
        Some((
            "md",
            up.addr.port(),
            r#"typed_extension_protocol_options: {envoy.extensions.upstreams.http.v3.HttpProtocolOptions: {"@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions, common_http_protocol_options: {max_connection_duration: 2s}, explicit_http_config: {http_protocol_options: {}}}}"#,
        )),
        |c| c,
    )?;
    let mut seen = Vec::new();
    for kind in [Kind::Envoy, Kind::Legate] {
        let _r = proxies::start(bins, kind, &path, admin, work)?;
        let url = format!("http://127.0.0.1:{port}/");
        let get = || legate_tests::legate::try_curl(&url, &[]).map_or(0, |r| r.status);
        let mut got = Vec::new();
        tokio::task::block_in_place(|| {
            got.push(format!("first {}", get()));
            got.push(format!("second {}", get()));
        });
        got.push(format!(
            "after two: {}",
            stat(admin, "cluster.md.upstream_cx_total")
        ));
        let mut codes = Vec::new();
        for _ in 0..6 {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            codes.push(tokio::task::block_in_place(get));
        }
        got.push(format!("busy for 3 s: {codes:?}"));
        got.push(format!(
            "after them: {}",
            stat(admin, "cluster.md.upstream_cx_total")
        ));
        seen.push(got);
    }
    report.add(
        "http",
        "max-connection-duration",
        "new-connection-after-the-limit",
        Outcome::compare(&seen[0].join("; "), &seen[1].join("; ")),
    );
    Ok(())
}

/// Reads one HTTP/1 response (head, then a Content-Length body) from a
/// keep-alive connection: its status and Connection header, or how the
/// connection ended instead.
fn read_response(s: &mut std::net::TcpStream) -> String {
    use std::io::Read;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            // A FIN or a reset (a write after the close draws one): closed
            // either way; which comes first is timing.
            Ok(_) => return "closed".into(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return "no answer".into(),
            Err(_) => return "closed".into(),
        }
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let field = |n: &str| {
        head.lines().find_map(|l| {
            l.strip_prefix(&format!("{n}:"))
                .map(|v| v.trim().to_string())
        })
    };
    let len: usize = field("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    if s.read_exact(&mut body).is_err() {
        return "body cut".into();
    }
    let status = head.split(' ').nth(1).unwrap_or("?").to_string();
    // keep-alive is HTTP/1.1's default: stating it changes nothing.
    let connection = field("connection").filter(|c| c != "keep-alive");
    format!(
        "{status} connection: {}",
        connection.unwrap_or_else(|| "-".into())
    )
}

/// The connection manager's `max_connection_duration: 1s` on HTTP/1: a
/// request in flight when it runs out is answered with `connection:
/// close`; an idle connection stays open past it for the drain
/// (`drain_timeout`, 5 s), its next request answered with `connection:
/// close`, and is closed after it.
pub async fn downstream_max_connection_duration(
    bins: &Binaries,
    work: &std::path::Path,
    report: &mut Report,
) -> Result<()> {
    use std::io::Write;
    let up = legate_tests::echo::start("a", "127.0.0.1:0".parse().unwrap()).await?;
    let crate::bootstrap::Written { path, port, admin } = crate::bootstrap::write_single(
        work,
        "cxdur",
        "common_http_protocol_options: {max_connection_duration: 1s}",
        "route: {cluster: a}",
        Some(("a", up.addr.port(), "")),
        |c| c,
    )?;
    let request = |p: &str| format!("GET {p} HTTP/1.1\r\nhost: a\r\n\r\n");
    let mut seen = Vec::new();
    for kind in [Kind::Envoy, Kind::Legate] {
        let _r = proxies::start(bins, kind, &path, admin, work)?;
        let got = tokio::task::block_in_place(|| -> std::io::Result<Vec<String>> {
            let mut got = Vec::new();
            let timeout = Some(std::time::Duration::from_secs(5));
            // A request still in flight when the second runs out.
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(timeout)?;
            s.write_all(request("/first").as_bytes())?;
            got.push(format!("first: {}", read_response(&mut s)));
            s.write_all(request("/delay/1500").as_bytes())?;
            got.push(format!(
                "in flight over the limit: {}",
                read_response(&mut s)
            ));
            // An idle connection past the limit.
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(timeout)?;
            s.write_all(request("/first").as_bytes())?;
            got.push(format!("idle first: {}", read_response(&mut s)));
            std::thread::sleep(std::time::Duration::from_millis(1500));
            let _ = s.write_all(request("/late").as_bytes());
            got.push(format!("idle past the limit: {}", read_response(&mut s)));
            // Idle past the limit and the drain (drain_timeout, 5 s).
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(timeout)?;
            s.write_all(request("/first").as_bytes())?;
            got.push(format!("drained first: {}", read_response(&mut s)));
            std::thread::sleep(std::time::Duration::from_millis(6800));
            let _ = s.write_all(request("/late").as_bytes());
            got.push(format!("idle past the drain: {}", read_response(&mut s)));
            Ok(got)
        })?;
        seen.push(got);
    }
    report.add(
        "http",
        "max-connection-duration",
        "downstream-http1",
        Outcome::compare(&seen[0].join("; "), &seen[1].join("; ")),
    );
    Ok(())
}

/// Envoy keeps a client's keep-alive connection after answering a failed
/// upstream itself (503 connection refused, 504 timeout) or relaying an
/// upstream's 5xx: the next request on the same socket is served.
pub async fn keepalive_after_local_reply(
    bins: &Binaries,
    work: &std::path::Path,
    report: &mut Report,
) -> Result<()> {
    use std::io::Write;
    let up = legate_tests::echo::start("a", "127.0.0.1:0".parse().unwrap()).await?;
    let dead = legate_tests::legate::free_port();
    let crate::bootstrap::Written { path, port, admin } = crate::bootstrap::write_single(
        work,
        "keepalive5xx",
        "",
        "route: {cluster: a, timeout: 0.3s}",
        Some(("a", up.addr.port(), "")),
        |c| {
            c.replace(
                r#"routes: [{match: {prefix: "/"}"#,
                r#"routes: [{match: {prefix: "/dead"}, route: {cluster: dead}}, {match: {prefix: "/"}"#,
            ) + &format!(
                "  - {{name: dead, connect_timeout: 1s, load_assignment: {{cluster_name: dead, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {dead}}}}}}}}}]}}]}}}}\n"
            )
        },
    )?;
    let request = |p: &str| format!("GET {p} HTTP/1.1\r\nhost: a\r\n\r\n");
    let mut seen = Vec::new();
    for kind in [Kind::Envoy, Kind::Legate] {
        let _r = proxies::start(bins, kind, &path, admin, work)?;
        let got = tokio::task::block_in_place(|| -> std::io::Result<Vec<String>> {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
            let mut got = Vec::new();
            for p in ["/dead", "/ok", "/status/503", "/ok2", "/delay/1000", "/ok3"] {
                if s.write_all(request(p).as_bytes()).is_err() {
                    got.push(format!("{p}: write failed"));
                    break;
                }
                got.push(format!("{p}: {}", read_response(&mut s)));
            }
            Ok(got)
        })?;
        seen.push(got);
    }
    report.add(
        "http",
        "keepalive-after-5xx",
        "same-connection",
        Outcome::compare(&seen[0].join("; "), &seen[1].join("; ")),
    );
    Ok(())
}

/// `per_host_thresholds.max_connections: 1`: while one slow request holds
/// the host's only connection, a second one to that host waits for it (a
/// pending request) instead of opening another; both are served over one
/// connection. (`max_pending_requests: 0` is not used: Envoy counts every
/// request pending while its connection opens, a known gap.)
pub async fn per_host_connections(
    bins: &Binaries,
    work: &std::path::Path,
    report: &mut Report,
) -> Result<()> {
    let up = legate_tests::echo::start("a", "127.0.0.1:0".parse().unwrap()).await?;
    let crate::bootstrap::Written { path, port, admin } = crate::bootstrap::write_single(
        work,
        "perhost",
        "",
        "route: {cluster: ph}",
        Some((
            "ph",
            up.addr.port(),
            "circuit_breakers: {per_host_thresholds: [{max_connections: 1}]}",
        )),
        |c| c,
    )?;
    let stats = [
        "cluster.ph.upstream_rq_pending_overflow",
        "cluster.ph.upstream_cx_total",
    ];
    let mut seen = Vec::new();
    for kind in [Kind::Envoy, Kind::Legate] {
        let _r = proxies::start(bins, kind, &path, admin, work)?;
        let got = tokio::task::block_in_place(|| {
            let url = |p: &str| format!("http://127.0.0.1:{port}{p}");
            let slow = std::thread::spawn({
                let u = url("/delay/1000");
                move || legate_tests::legate::try_curl(&u, &[]).map_or(0, |r| r.status)
            });
            std::thread::sleep(std::time::Duration::from_millis(300));
            let second = legate_tests::legate::try_curl(&url("/b"), &[]).map_or(0, |r| r.status);
            let first = slow.join().unwrap_or(0);
            let after = legate_tests::legate::try_curl(&url("/c"), &[]).map_or(0, |r| r.status);
            format!("slow {first}; concurrent {second}; after {after}")
        });
        let mut all = vec![got];
        all.extend(stats.iter().map(|s| format!("{s}: {}", stat(admin, s))));
        seen.push(all);
    }
    report.add(
        "http",
        "per-host-connections",
        "second-request-overflows",
        Outcome::compare(&seen[0].join("; "), &seen[1].join("; ")),
    );
    Ok(())
}

/// Reads HTTP/2 frames from a raw client connection for up to `for_long`,
/// acknowledging the server's SETTINGS and, when `answer`, its PINGs: how
/// many PINGs came, and how the connection ended (or that it did not).
fn h2_watch(s: &mut std::net::TcpStream, answer: bool, for_long: std::time::Duration) -> String {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + for_long;
    let (mut pings, mut goaway) = (0, false);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return format!("pings {pings}, goaway {goaway}, still open");
        }
        let _ = s.set_read_timeout(Some(left));
        let mut head = [0u8; 9];
        if let Err(e) = s.read_exact(&mut head) {
            let ended = if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) {
                "still open"
            } else {
                "closed"
            };
            return format!("pings {pings}, goaway {goaway}, {ended}");
        }
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        if s.read_exact(&mut payload).is_err() {
            return format!("pings {pings}, goaway {goaway}, closed");
        }
        let (kind, flags) = (head[3], head[4]);
        match kind {
            4 if flags & 1 == 0 => {
                let _ = s.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]);
            }
            6 if flags & 1 == 0 => {
                pings += 1;
                if answer {
                    let mut ack = vec![0, 0, 8, 6, 1, 0, 0, 0, 0];
                    ack.extend_from_slice(&payload);
                    let _ = s.write_all(&ack);
                }
            }
            7 => goaway = true,
            _ => {}
        }
    }
}

/// HTTP/2 `connection_keepalive` (interval 1 s, timeout 1 s, no jitter) on
/// raw client connections: one that never answers a PING is closed after
/// the first goes unanswered; one that answers stays open.
pub async fn h2_keepalive(
    bins: &Binaries,
    work: &std::path::Path,
    report: &mut Report,
) -> Result<()> {
    use std::io::Write;
    let up = legate_tests::echo::start("a", "127.0.0.1:0".parse().unwrap()).await?;
    let crate::bootstrap::Written { path, port, admin } = crate::bootstrap::write_single(
        work,
        "h2keepalive",
        "http2_protocol_options: {connection_keepalive: {interval: 1s, timeout: 1s, interval_jitter: {value: 0}}}",
        "route: {cluster: a}",
        Some(("a", up.addr.port(), "")),
        |c| c,
    )?;
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    let mut seen = Vec::new();
    for kind in [Kind::Envoy, Kind::Legate] {
        let _r = proxies::start(bins, kind, &path, admin, work)?;
        let got = tokio::task::block_in_place(|| -> std::io::Result<Vec<String>> {
            let mut silent = std::net::TcpStream::connect(("127.0.0.1", port))?;
            silent.write_all(PREFACE)?;
            let mut answering = std::net::TcpStream::connect(("127.0.0.1", port))?;
            answering.write_all(PREFACE)?;
            let quiet = std::thread::spawn(move || {
                h2_watch(&mut silent, false, std::time::Duration::from_millis(3500))
            });
            let kept = h2_watch(&mut answering, true, std::time::Duration::from_millis(3500));
            Ok(vec![
                format!("silent client: {}", quiet.join().unwrap_or_default()),
                // How many pings an answering client sees moves with timing.
                format!(
                    "answering client: {}",
                    if kept.ends_with("still open") {
                        "still open"
                    } else {
                        "closed"
                    }
                ),
            ])
        })?;
        seen.push(got);
    }
    report.add(
        "http",
        "h2-keepalive",
        "unanswered-ping-closes",
        Outcome::compare(&seen[0].join("; "), &seen[1].join("; ")),
    );
    Ok(())
}
