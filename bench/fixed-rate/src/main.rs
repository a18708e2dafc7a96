//! `fixed-rate URL RATE SECS CONNS`: sends HTTP/1.1 keep-alive GETs to
//! `URL` (http only) at RATE requests per second in total, spread evenly
//! over CONNS connections, for SECS seconds, and prints one JSON line:
//! the rate achieved, latency percentiles in milliseconds and errors.
//!
//! Open loop, as wrk2: each request has a start time fixed in advance.
//! When a connection is still waiting for an earlier response at that
//! time, the request's latency counts from its scheduled start, so a
//! stall is charged to every request it delays (coordinated omission
//! corrected). Otherwise it counts from the moment it was sent, so this
//! client's own sleep granularity is not charged to the server.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

struct Target {
    addr: String,
    host: String,
    path: String,
}

fn parse_url(url: &str) -> Target {
    let rest = url
        .strip_prefix("http://")
        .expect("fixed-rate: only http:// URLs");
    let (hostport, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    Target {
        addr: hostport.to_string(),
        host: hostport.to_string(),
        path: if path.is_empty() {
            "/".into()
        } else {
            path.to_string()
        },
    }
}

/// Reads one response (status line, headers, Content-Length body).
fn read_response(r: &mut BufReader<TcpStream>) -> std::io::Result<u16> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut len = 0usize;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(status)
}

/// One connection's share: requests every `interval` from `first`.
fn connection(t: &Target, first: Instant, interval: Duration, end: Instant) -> (Vec<u32>, u64) {
    let (mut samples, mut errors) = (Vec::new(), 0u64);
    let req = format!("GET {} HTTP/1.1\r\nHost: {}\r\n\r\n", t.path, t.host);
    let connect = || -> std::io::Result<(TcpStream, BufReader<TcpStream>)> {
        let s = TcpStream::connect(&t.addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let r = BufReader::new(s.try_clone()?);
        Ok((s, r))
    };
    let Ok((mut w, mut r)) = connect() else {
        return (samples, 1);
    };
    let mut prev_done = first;
    let mut k: u32 = 0;
    loop {
        let scheduled = first + interval * k;
        k += 1;
        if scheduled >= end {
            break;
        }
        let now = Instant::now();
        if scheduled > now {
            std::thread::sleep(scheduled - now);
        }
        let sent = Instant::now();
        let ok = w
            .write_all(req.as_bytes())
            .and_then(|_| read_response(&mut r))
            .is_ok_and(|s| s < 500);
        let done = Instant::now();
        // Late because the previous response was: charged from the
        // schedule. Late because this thread overslept: from the send.
        let from = if prev_done > scheduled {
            scheduled
        } else {
            sent
        };
        prev_done = done;
        if ok {
            samples.push((done - from).as_micros().min(u32::MAX as u128) as u32);
        } else {
            errors += 1;
            match connect() {
                Ok((a, b)) => (w, r) = (a, b),
                Err(_) => break,
            }
        }
    }
    (samples, errors)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: fixed-rate URL RATE SECS CONNS");
        std::process::exit(2);
    }
    let target = parse_url(&args[1]);
    let rate: f64 = args[2].parse().expect("RATE");
    let secs: f64 = args[3].parse().expect("SECS");
    let conns: u32 = args[4].parse().expect("CONNS");
    let interval = Duration::from_secs_f64(f64::from(conns) / rate);
    let start = Instant::now() + Duration::from_millis(200);
    let end = start + Duration::from_secs_f64(secs);
    let results: Vec<(Vec<u32>, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..conns)
            .map(|i| {
                // Staggered so that the requests are spread evenly in time.
                let first = start + interval.mul_f64(f64::from(i) / f64::from(conns));
                let t = &target;
                s.spawn(move || connection(t, first, interval, end))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let errors: u64 = results.iter().map(|r| r.1).sum();
    let mut all: Vec<u32> = results.into_iter().flat_map(|r| r.0).collect();
    all.sort_unstable();
    let pct = |p: f64| -> Option<f64> {
        (!all.is_empty()).then(|| {
            let i = ((p / 100.0) * (all.len() - 1) as f64).round() as usize;
            f64::from(all[i]) / 1000.0
        })
    };
    println!(
        "{}",
        serde_json::json!({
            "target_rps": rate,
            "rps": all.len() as f64 / secs,
            "p50_ms": pct(50.0),
            "p99_ms": pct(99.0),
            "p999_ms": pct(99.9),
            "max_ms": all.last().map(|v| f64::from(*v) / 1000.0),
            "errors": errors,
        })
    );
}
