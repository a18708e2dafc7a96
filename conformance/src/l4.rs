//! The l4 tier: `tcp_proxy` and listener filters with raw TCP clients,
//! through Envoy, then Legate. A half-close must carry the upstream's
//! answer back, a large transfer must arrive intact, and `original_dst`
//! behind a real iptables REDIRECT (in a network namespace of its own)
//! must hand connections to the `bind_to_port: false` listener at the
//! address the client dialled.

use crate::proxies::{self, Binaries, Kind};
use crate::report::{Outcome, Report};
use anyhow::Result;
use legate_tests::netns::Netns;
use legate_tests::tcp::{
    counting_upstream, echo_through, echo_upstream, naming_upstream, read_outcome,
    resetting_upstream, Fnv,
};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

/// Legate's kernel LB would serve the VIPs below itself (connect-time
/// rewriting); off, Legate takes the same path as Envoy. Envoy ignores the
/// runtime key.
const KERNEL_LB_OFF: &str =
    "layered_runtime: {layers: [{name: static, static_layer: {legate.kernel_lb.mode: \"off\"}}]}";

fn tcp_listener(name: &str, addr: &str, port: u16, extra: &str, cluster: &str) -> String {
    format!(
        r#"
  - name: {name}
    address: {{socket_address: {{address: {addr}, port_value: {port}}}}}
{extra}    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {cluster}
          cluster: {cluster}"#
    )
}

fn bootstrap(admin: u16, listeners: &[String], clusters: &[(&str, SocketAddr)]) -> String {
    let mut s = format!(
        "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}\n{KERNEL_LB_OFF}\nstatic_resources:\n  listeners:"
    );
    for l in listeners {
        s.push_str(l);
    }
    s.push_str("\n  clusters:");
    for (name, a) in clusters {
        s.push_str(&format!(
            "\n  - {{name: {name}, type: STATIC, connect_timeout: 1s, load_assignment: {{cluster_name: {name}, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {}, port_value: {}}}}}}}}}]}}]}}}}",
            a.ip(),
            a.port()
        ));
    }
    s.push('\n');
    s
}

/// Sends `len` patterned bytes, half-closes, and reads the answer.
fn transfer(port: u16, len: usize) -> (String, String) {
    let mut expect = Fnv::default();
    let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let answer = (|| -> std::io::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut left = len;
        while left > 0 {
            let k = left.min(chunk.len());
            s.write_all(&chunk[..k])?;
            expect.feed(&chunk[..k]);
            left -= k;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        let mut a = String::new();
        s.read_to_string(&mut a)?;
        Ok(a)
    })()
    .unwrap_or_else(|e| format!("failed: {e}"));
    (answer, legate_tests::tcp::answer(len as u64, expect))
}

fn compare(report: &mut Report, case: &str, envoy: &str, legate: &str, want: Option<&str>) {
    let o = match want {
        Some(w) if envoy != w => {
            Outcome::HarnessError(vec![format!("envoy answered {envoy:?}, expected {w:?}")])
        }
        _ if envoy == legate => Outcome::Match,
        _ => Outcome::Mismatch(vec![format!("envoy {envoy:?} / legate {legate:?}")]),
    };
    report.add("l4", "tcp_proxy", case, o);
}

pub fn run(bins: &Binaries, work: &Path, report: &mut Report) -> Result<()> {
    let up = TcpListener::bind("127.0.0.1:0")?;
    let up_addr = up.local_addr()?;
    counting_upstream(up);
    let (port, admin) = (
        legate_tests::legate::free_port(),
        legate_tests::legate::free_port(),
    );
    let cfg = work.join("l4-tcp-proxy.yaml");
    std::fs::write(
        &cfg,
        bootstrap(
            admin,
            &[tcp_listener("tcp", "127.0.0.1", port, "", "count")],
            &[("count", up_addr)],
        ),
    )?;
    // Half-close with a few MB in flight, and 256 MiB checksummed.
    let cases = [("half-close", 3_000_000), ("256-mib-intact", 256 << 20)];
    let mut seen = Vec::new();
    for kind in [Kind::Envoy, Kind::Legate] {
        let _r = proxies::start(bins, kind, &cfg, admin, work)?;
        seen.push(
            cases
                .iter()
                .map(|(_, len)| transfer(port, *len))
                .collect::<Vec<_>>(),
        );
    }
    for (i, (case, _)) in cases.iter().enumerate() {
        let ((e, want), (l, _)) = (&seen[0][i], &seen[1][i]);
        compare(report, case, e, l, Some(want));
    }
    faults(bins, work, report)?;
    crate::udp::run(bins, work, report)?;
    socket_options(bins, work, report)?;
    global_limit(bins, work, report)?;
    original_dst(bins, work, report)
}

/// One connection through a `tcp_proxy` listener: the upstream's count of
/// what it got, or how the proxy refused it.
fn probe(port: u16) -> String {
    let r = (|| -> std::io::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        // A refused connection may be closed before the bytes arrive.
        let _ = s.write_all(b"ping");
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut a = String::new();
        s.read_to_string(&mut a)?;
        Ok(a)
    })();
    match r {
        Ok(a) if a.is_empty() => "closed".into(),
        Ok(a) => format!("served: {a}"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset".into(),
        Err(e) => format!("failed: {e}"),
    }
}

/// The overload manager's global connection limit (2, from the
/// downstream connections monitor, as Envoy Gateway and pilot-agent write
/// it): with two connections held open, a third is refused and counted;
/// listeners with `ignore_global_conn_limit` or `bypass_overload_manager`
/// are exempt and do not count; a closed connection frees its place.
fn global_limit(bins: &Binaries, work: &Path, report: &mut Report) -> Result<()> {
    let up = TcpListener::bind("127.0.0.1:0")?;
    let up_addr = up.local_addr()?;
    counting_upstream(up);
    let free = legate_tests::legate::free_port;
    let (limited, ignoring, bypassing, admin) = (free(), free(), free(), free());
    let overload = "overload_manager:\n  resource_monitors:\n  - name: envoy.resource_monitors.global_downstream_max_connections\n    typed_config: {\"@type\": type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig, max_active_downstream_connections: 2}\n";
    let cfg = work.join("l4-global-limit.yaml");
    std::fs::write(
        &cfg,
        format!(
            "{overload}{}",
            bootstrap(
                admin,
                &[
                    tcp_listener("limited", "127.0.0.1", limited, "", "count"),
                    tcp_listener(
                        "ignoring",
                        "127.0.0.1",
                        ignoring,
                        "    ignore_global_conn_limit: true\n",
                        "count"
                    ),
                    tcp_listener(
                        "bypassing",
                        "127.0.0.1",
                        bypassing,
                        "    bypass_overload_manager: true\n",
                        "count"
                    ),
                ],
                &[("count", up_addr)],
            )
        ),
    )?;
    let observe = || {
        let mut seen = vec![probe(limited)];
        let exempt: Vec<_> = [ignoring, bypassing]
            .iter()
            .filter_map(|p| TcpStream::connect(("127.0.0.1", *p)).ok())
            .collect();
        let held: Vec<_> = (0..2)
            .filter_map(|_| TcpStream::connect(("127.0.0.1", limited)).ok())
            .collect();
        // Both held connections accepted and counted.
        std::thread::sleep(Duration::from_millis(300));
        seen.extend([probe(limited), probe(ignoring), probe(bypassing)]);
        drop(held);
        std::thread::sleep(Duration::from_millis(300));
        seen.push(probe(limited));
        drop(exempt);
        let stat = format!("listener.127.0.0.1_{limited}.downstream_global_cx_overflow");
        seen.push(format!("{stat}: {}", crate::resilience::stat(admin, &stat)));
        seen
    };
    let [envoy, legate] = proxies::each(bins, &cfg, admin, work, observe)?;
    let mut f = Fnv::default();
    f.feed(b"ping");
    let served = format!("served: {}", legate_tests::tcp::answer(4, f));
    let overflow = format!("listener.127.0.0.1_{limited}.downstream_global_cx_overflow: 1");
    let cases = [
        ("global-limit-under", served.as_str()),
        ("global-limit-third-refused", "reset"),
        ("global-limit-ignore-listener", &served),
        ("global-limit-bypass-listener", &served),
        ("global-limit-place-freed", &served),
        ("global-limit-overflow-counted", &overflow),
    ];
    for (i, (case, want)) in cases.iter().enumerate() {
        compare(report, case, &envoy[i], &legate[i], Some(want));
    }
    Ok(())
}

/// An echoing upstream behind `tls_inspector` with a plaintext client (64
/// MiB both ways at once, the default chain), and upstreams that reset at
/// once or after 64 KiB: the client must see the reset, not a clean end.
fn faults(bins: &Binaries, work: &Path, report: &mut Report) -> Result<()> {
    const ECHOED: usize = 64 << 20;
    let echo = TcpListener::bind("127.0.0.1:0")?;
    let (rst0, rst64k) = (
        TcpListener::bind("127.0.0.1:0")?,
        TcpListener::bind("127.0.0.1:0")?,
    );
    let clusters = [
        ("echo", echo.local_addr()?),
        ("rst0", rst0.local_addr()?),
        ("rst64k", rst64k.local_addr()?),
    ];
    echo_upstream(echo);
    resetting_upstream(rst0, 0);
    resetting_upstream(rst64k, 64 * 1024);
    let free = legate_tests::legate::free_port;
    let (inspect, r0, r64, admin) = (free(), free(), free(), free());
    let inspected = format!(
        r#"
  - name: inspect
    address: {{socket_address: {{address: 127.0.0.1, port_value: {inspect}}}}}
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}}
    default_filter_chain:
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: echo
          cluster: echo"#
    );
    let listeners = [
        inspected,
        tcp_listener("rst0", "127.0.0.1", r0, "", "rst0"),
        tcp_listener("rst64k", "127.0.0.1", r64, "", "rst64k"),
    ];
    let cfg = work.join("l4-faults.yaml");
    std::fs::write(&cfg, bootstrap(admin, &listeners, &clusters))?;
    let mut echoed = Fnv::default();
    let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    for _ in 0..ECHOED / chunk.len() {
        echoed.feed(&chunk);
    }
    let cases = [
        (
            "tls-inspector-plaintext-64-mib-echoed",
            legate_tests::tcp::answer(ECHOED as u64, echoed),
        ),
        ("upstream-reset-at-once", "reset".to_string()),
        ("upstream-reset-after-64-kib", "reset".to_string()),
    ];
    let mut seen = Vec::new();
    for kind in [Kind::Envoy, Kind::Legate] {
        let _r = proxies::start(bins, kind, &cfg, admin, work)?;
        seen.push([
            echo_through(inspect, ECHOED),
            read_outcome(r0),
            read_outcome(r64),
        ]);
    }
    for (i, (case, want)) in cases.iter().enumerate() {
        compare(report, case, &seen[0][i], &seen[1][i], Some(want));
    }
    Ok(())
}

/// The keepalive timer of the proxy's side of a connection to `port`, as
/// `ss` shows it (`keepalive` with whole seconds left, or `none`).
fn server_timer(port: u16) -> String {
    let out = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established"])
        .arg(format!("( sport = :{port} )"))
        .output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    match text.split("timer:(").nth(1) {
        Some(t) => {
            let mut f = t.split(',');
            let kind = f.next().unwrap_or("");
            // "6.796ms" (ss's way of writing 6 s 796 ms) left of 7: the
            // configured idle time, rounded up.
            let secs = f
                .next()
                .map(|s| s.trim_end_matches(|c: char| c.is_ascii_alphabetic()))
                .and_then(|s| s.parse::<f64>().ok())
                .map_or(0, |s| s.ceil() as u64);
            format!("{kind} {secs}s")
        }
        None => "none".into(),
    }
}

/// Listener `socket_options` (Envoy Gateway's TCP keepalive settings): set
/// on the listening socket, inherited by the accepted connection, whose
/// keepalive timer `ss` shows; a listener without them has none.
fn socket_options(bins: &Binaries, work: &Path, report: &mut Report) -> Result<()> {
    let up = TcpListener::bind("127.0.0.1:0")?;
    let up_addr = up.local_addr()?;
    counting_upstream(up);
    let free = legate_tests::legate::free_port;
    let (with, without, admin) = (free(), free(), free());
    let opts = "    socket_options:\n    - {level: 1, name: 9, int_value: 1}\n    - {level: 6, name: 4, int_value: 7}\n    - {level: 6, name: 5, int_value: 3, state: STATE_LISTENING}\n";
    let cfg = work.join("l4-socket-options.yaml");
    std::fs::write(
        &cfg,
        bootstrap(
            admin,
            &[
                tcp_listener("keepalive", "127.0.0.1", with, opts, "count"),
                tcp_listener("plain", "127.0.0.1", without, "", "count"),
            ],
            &[("count", up_addr)],
        ),
    )?;
    let observe = || {
        [with, without].map(|port| match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => {
                std::thread::sleep(Duration::from_millis(200));
                let t = server_timer(port);
                drop(s);
                t
            }
            Err(e) => format!("connect failed: {e}"),
        })
    };
    let [envoy, legate] = proxies::each(bins, &cfg, admin, work, observe)?;
    let cases = ["keepalive-socket-options", "no-socket-options"];
    for (i, case) in cases.iter().enumerate() {
        let want = if i == 0 { "keepalive 7s" } else { "none" };
        compare(report, case, &envoy[i], &legate[i], Some(want));
    }
    Ok(())
}

/// Istio's capture: every TCP connection to 10.21.0.0/16 is redirected to
/// the virtual listener on 15001, which hands it to the listener at the
/// address dialled.
fn original_dst(bins: &Binaries, work: &Path, report: &mut Report) -> Result<()> {
    if let Some(why) = legate_tests::netns::skip_reason() {
        eprintln!("l4/original-dst: skipped: {why}");
        return Ok(());
    }
    let ns = Netns::new("conf-odst")?;
    ns.redirect("10.21.0.0/16", 15001)?;
    let mut clusters = Vec::new();
    for name in ["passthrough", "vip", "wild"] {
        let l = ns.enter(|| TcpListener::bind("127.0.0.1:0"))?;
        clusters.push((name, l.local_addr()?));
        naming_upstream(l, name);
    }
    let od = "    listener_filters:\n    - name: envoy.filters.listener.original_dst\n      typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst}\n    use_original_dst: true\n";
    let unbound = "    bind_to_port: false\n";
    let listeners = [
        tcp_listener("virtual", "0.0.0.0", 15001, od, "passthrough"),
        tcp_listener("vip", "10.21.30.40", 80, unbound, "vip"),
        tcp_listener("wild", "0.0.0.0", 81, unbound, "wild"),
    ];
    let cfg = work.join("l4-original-dst.yaml");
    std::fs::write(&cfg, bootstrap(15000, &listeners, &clusters))?;
    let dials = [
        ("original-dst-exact-listener", "10.21.30.40:80", "vip"),
        ("original-dst-any-address-listener", "10.21.1.1:81", "wild"),
        (
            "original-dst-no-listener-stays",
            "10.21.30.40:9999",
            "passthrough",
        ),
    ];
    let mut seen = Vec::new();
    for kind in [Kind::Envoy, Kind::Legate] {
        let _r = proxies::start_in(Some(&ns), bins, kind, &cfg, 15000, work)?;
        seen.push(
            dials
                .iter()
                .map(|(_, dst, _)| {
                    let dst: SocketAddr = dst.parse().expect("address");
                    ns.enter(|| -> std::io::Result<String> {
                        let mut s = TcpStream::connect(dst)?;
                        s.set_read_timeout(Some(Duration::from_secs(10)))?;
                        let mut a = String::new();
                        s.read_to_string(&mut a)?;
                        Ok(a)
                    })
                    .unwrap_or_else(|e| format!("failed: {e}"))
                })
                .collect::<Vec<_>>(),
        );
    }
    for (i, (case, _, want)) in dials.iter().enumerate() {
        compare(report, case, &seen[0][i], &seen[1][i], Some(want));
    }
    Ok(())
}
