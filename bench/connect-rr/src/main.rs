//! `connect-rr serve ADDR`: answers each connection's first byte with one
//! byte, then closes (the server closes first, so clients and proxies never
//! pile up TIME_WAIT on ephemeral ports).
//!
//! `connect-rr run TARGET SECONDS THREADS [CGROUP]`: `THREADS` loops of
//! connect, write 1 byte, read 1 byte, wait for the close; prints JSON with
//! connections per second and the connect-to-reply latency percentiles.
//! With `CGROUP`, the process first moves itself into that cgroup v2
//! directory, so the kernel LB attached there balances its connects.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("serve") => serve(args[2].parse().expect("ADDR")),
        Some("run") => run(
            args[2].parse().expect("TARGET"),
            args[3].parse().expect("SECONDS"),
            args[4].parse().expect("THREADS"),
            args.get(5),
        ),
        _ => {
            eprintln!("usage: connect-rr serve ADDR | run TARGET SECONDS THREADS [CGROUP]");
            std::process::exit(2);
        }
    }
}

fn serve(addr: SocketAddr) {
    let l = TcpListener::bind(addr).expect("bind");
    println!("{}", l.local_addr().unwrap());
    // Two acceptors answer inline: the reply is immediate, and a thread
    // per connection would cost more than the exchange itself.
    let acceptors: Vec<_> = (0..2)
        .map(|_| {
            let l = l.try_clone().expect("clone listener");
            std::thread::spawn(move || {
                for s in l.incoming() {
                    let Ok(mut s) = s else { continue };
                    let mut b = [0u8; 1];
                    if s.read_exact(&mut b).is_ok() {
                        let _ = s.write_all(&b);
                    }
                }
            })
        })
        .collect();
    for a in acceptors {
        let _ = a.join();
    }
}

fn run(target: SocketAddr, seconds: f64, threads: usize, cgroup: Option<&String>) {
    if let Some(cg) = cgroup {
        std::fs::write(format!("{cg}/cgroup.procs"), std::process::id().to_string())
            .expect("joining the cgroup");
    }
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let mut lat = Vec::with_capacity(100_000);
                let mut errors = 0u64;
                while Instant::now() < deadline {
                    let t0 = Instant::now();
                    match once(target) {
                        Ok(()) => lat.push(t0.elapsed().as_nanos() as u64),
                        Err(_) => errors += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (l, e) = w.join().unwrap();
        lat.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    println!(
        "{}",
        serde_json::json!({
            "connections": lat.len(), "errors": errors,
            "cps": lat.len() as f64 / elapsed,
            "p50_us": pct(0.50), "p99_us": pct(0.99),
        })
    );
}

/// One connection; the latency ends when the reply byte arrives, the loop
/// continues after the server's close.
fn once(target: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect(target)?;
    s.set_nodelay(true)?;
    s.write_all(b"x")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    let mut rest = [0u8; 16];
    while s.read(&mut rest)? > 0 {}
    Ok(())
}
