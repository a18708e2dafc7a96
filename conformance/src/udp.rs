//! The l4 tier's UDP proxy cases: UDP listeners with
//! `envoy.filters.udp_listener.udp_proxy`, real UDP clients and upstreams,
//! through Envoy, then Legate. Sessions must stick to a host (or not, per
//! packet), hash by source IP, route by the address dialled (answering
//! from it), drop what has no route, no healthy host, no room under the
//! circuit breaker or is too long, end after the idle timeout with an
//! access log line, and count all of it under Envoy's stat names.

use crate::proxies::{self, Binaries};
use crate::report::{Outcome, Report};
use crate::resilience::stat;
use anyhow::Result;
use legate_tests::udp::{ask, client, host_of, naming_echoes};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

const ROUTE: &str = "type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.Route";

/// A UDP listener whose proxy has `fields` (YAML flow entries).
fn listener(name: &str, addr: &str, port: u16, fields: &str) -> String {
    format!(
        r#"
  - name: {name}
    address: {{socket_address: {{protocol: UDP, address: {addr}, port_value: {port}}}}}
    listener_filters:
    - name: envoy.filters.udp_listener.udp_proxy
      typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig, stat_prefix: {name}, {fields}}}"#
    )
}

/// A matcher sending everything to `cluster`, as Envoy Gateway writes it.
fn to(cluster: &str) -> String {
    format!(
        r#"matcher: {{on_no_match: {{action: {{name: route, typed_config: {{"@type": {ROUTE}, cluster: {cluster}}}}}}}}}"#
    )
}

fn cluster(name: &str, lb: &str, extra: &str, hosts: &[SocketAddr]) -> String {
    let eps: Vec<String> = hosts
        .iter()
        .map(|a| {
            format!(
                "{{endpoint: {{address: {{socket_address: {{protocol: UDP, address: {}, port_value: {}}}}}}}}}",
                a.ip(),
                a.port()
            )
        })
        .collect();
    format!(
        "\n  - {{name: {name}, type: STATIC, lb_policy: {lb}, connect_timeout: 1s, {extra} load_assignment: {{cluster_name: {name}, endpoints: [{{lb_endpoints: [{}]}}]}}}}",
        eps.join(", ")
    )
}

struct Ports {
    basic: u16,
    per_packet: u16,
    hashed: u16,
    by_dest: u16,
    no_route: u16,
    empty: u16,
    limited: u16,
    idle: u16,
    legacy: u16,
    small: u16,
}

fn bootstrap(admin: u16, p: &Ports, hosts: &[SocketAddr], log: &Path) -> String {
    let (a, b) = (hosts[0], hosts[1]);
    let by_dest = format!(
        r#"matcher: {{matcher_list: {{matchers: [{{predicate: {{single_predicate: {{input: {{name: envoy.matching.inputs.destination_ip, typed_config: {{"@type": type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.DestinationIPInput}}}}, value_match: {{exact: 127.0.0.2}}}}}}, on_match: {{action: {{name: route, typed_config: {{"@type": {ROUTE}, cluster: b}}}}}}}}]}}, on_no_match: {{action: {{name: route, typed_config: {{"@type": {ROUTE}, cluster: a}}}}}}}}"#
    );
    let no_route = format!(
        r#"matcher: {{matcher_list: {{matchers: [{{predicate: {{single_predicate: {{input: {{name: envoy.matching.inputs.destination_port, typed_config: {{"@type": type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.DestinationPortInput}}}}, value_match: {{exact: "1"}}}}}}, on_match: {{action: {{name: route, typed_config: {{"@type": {ROUTE}, cluster: a}}}}}}}}]}}}}"#
    );
    let log = format!(
        r#"idle_timeout: 1s, access_log: [{{name: envoy.access_loggers.file, typed_config: {{"@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog, path: {}, log_format: {{text_format_source: {{inline_string: "%DOWNSTREAM_LOCAL_ADDRESS% %UPSTREAM_HOST% %BYTES_RECEIVED% %BYTES_SENT% %RESPONSE_FLAGS% %UPSTREAM_CLUSTER%\n"}}}}}}}}], {}"#,
        log.display(),
        to("a")
    );
    let listeners = [
        listener("basic", "127.0.0.1", p.basic, &to("pair")),
        listener(
            "per_packet",
            "127.0.0.1",
            p.per_packet,
            &format!("use_per_packet_load_balancing: true, {}", to("pair")),
        ),
        listener(
            "hashed",
            "127.0.0.1",
            p.hashed,
            &format!("hash_policies: [{{source_ip: true}}], {}", to("ring")),
        ),
        listener("by_dest", "0.0.0.0", p.by_dest, &by_dest),
        listener("no_route", "127.0.0.1", p.no_route, &no_route),
        listener("empty", "127.0.0.1", p.empty, &to("empty")),
        listener("limited", "127.0.0.1", p.limited, &to("limited")),
        listener("idle", "127.0.0.1", p.idle, &log),
        listener("legacy", "127.0.0.1", p.legacy, "cluster: b"),
        listener(
            "small",
            "127.0.0.1",
            p.small,
            &format!(
                "upstream_socket_config: {{max_rx_datagram_size: 1000, prefer_gro: false}}, {}",
                to("a")
            ),
        ),
    ];
    let clusters = [
        cluster("pair", "ROUND_ROBIN", "", &[a, b]),
        cluster("ring", "RING_HASH", "", &[a, b]),
        cluster("a", "ROUND_ROBIN", "", &[a]),
        cluster("b", "ROUND_ROBIN", "", &[b]),
        cluster("empty", "ROUND_ROBIN", "", &[]),
        cluster(
            "limited",
            "ROUND_ROBIN",
            "circuit_breakers: {thresholds: [{max_connections: 1}]},",
            &[a],
        ),
    ];
    format!(
        "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}\nstatic_resources:\n  listeners:{}\n  clusters:{}\n",
        listeners.concat(),
        clusters.concat()
    )
}

fn at(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// How many hosts answered: one client's datagrams, or one datagram from
/// each of four clients.
fn hosts_seen(port: u16, clients: usize, each: usize) -> String {
    let mut hosts = BTreeSet::new();
    let mut wrong = Vec::new();
    for c in 0..clients {
        let Ok(s) = client(at(port)) else {
            return "client failed".into();
        };
        for i in 0..each {
            let r = ask(&s, format!("p{c}.{i}").as_bytes());
            if !r.ends_with(&format!(":p{c}.{i}")) {
                wrong.push(r);
            } else {
                hosts.insert(host_of(&r).to_string());
            }
        }
    }
    format!("{} host(s); unanswered or wrong: {wrong:?}", hosts.len())
}

fn one(to: SocketAddr, payload: &[u8]) -> String {
    client(to).map_or_else(|e| format!("client failed: {e}"), |s| ask(&s, payload))
}

/// Each case's answer with one proxy.
fn observe(p: &Ports, log: &Path) -> Vec<(&'static str, String)> {
    let mut out = vec![
        ("sticky-session", hosts_seen(p.basic, 1, 4)),
        ("sessions-spread-round-robin", hosts_seen(p.basic, 4, 1)),
        ("per-packet-balancing", hosts_seen(p.per_packet, 1, 4)),
        ("source-ip-hash", hosts_seen(p.hashed, 4, 1)),
        (
            "destination-ip-route-answers-from-127.0.0.2",
            one(SocketAddr::from(([127, 0, 0, 2], p.by_dest)), b"x"),
        ),
        ("destination-ip-no-match", one(at(p.by_dest), b"x")),
        ("no-route-dropped", one(at(p.no_route), b"x")),
        ("no-healthy-host-dropped", one(at(p.empty), b"x")),
        ("deprecated-cluster-field", one(at(p.legacy), b"x")),
        (
            "client-datagram-over-1500-dropped",
            one(at(p.basic), &[b'y'; 2000]),
        ),
        (
            "upstream-reply-20000-bytes",
            one(at(p.basic), b"size:20000"),
        ),
        (
            "upstream-reply-30000-bytes",
            one(at(p.basic), b"size:30000"),
        ),
        (
            "upstream-reply-1000-bytes-limit-1000",
            one(at(p.small), b"size:1000"),
        ),
        (
            "upstream-reply-1001-bytes-limit-1000-dropped",
            one(at(p.small), b"size:1001"),
        ),
    ];
    // One session fits under max_connections 1; a second client's is
    // refused while the first lives.
    let breaker = match (client(at(p.limited)), client(at(p.limited))) {
        (Ok(first), Ok(second)) => {
            [ask(&first, b"1"), ask(&second, b"2"), ask(&first, b"3")].join(" ")
        }
        _ => "client failed".into(),
    };
    out.push(("circuit-breaker-one-session", breaker));
    out.push(("idle-session-answered", one(at(p.idle), b"hello")));
    // The session ends a second after its last datagram; the file logger
    // flushes every 100 ms.
    std::thread::sleep(Duration::from_millis(1700));
    let lines = std::fs::read_to_string(log).unwrap_or_else(|e| format!("no log: {e}"));
    let _ = std::fs::remove_file(log);
    out.push(("idle-session-access-log", lines));
    out
}

const STATS: &[&str] = &[
    "udp.basic.downstream_sess_total",
    "udp.basic.downstream_sess_active",
    "udp.basic.downstream_sess_rx_datagrams",
    "udp.basic.downstream_sess_rx_bytes",
    "udp.basic.downstream_sess_tx_datagrams",
    "udp.basic.downstream_sess_tx_bytes",
    "udp.basic.downstream_sess_no_route",
    "udp.basic.downstream_sess_rx_errors",
    "udp.basic.downstream_sess_tx_errors",
    "udp.per_packet.downstream_sess_total",
    "udp.hashed.downstream_sess_total",
    "udp.no_route.downstream_sess_no_route",
    "udp.no_route.downstream_sess_total",
    "udp.empty.downstream_sess_total",
    "cluster.empty.upstream_cx_none_healthy",
    "udp.limited.downstream_sess_total",
    "udp.limited.downstream_sess_active",
    "cluster.limited.upstream_cx_overflow",
    "udp.idle.idle_timeout",
    "udp.idle.downstream_sess_active",
    "cluster.pair.udp.sess_tx_datagrams",
    "cluster.pair.udp.sess_rx_datagrams",
    "cluster.pair.udp.sess_rx_datagrams_dropped",
    "cluster.pair.udp.sess_tx_errors",
    "cluster.pair.upstream_cx_tx_bytes_total",
    "cluster.pair.upstream_cx_rx_bytes_total",
    "cluster.a.udp.sess_tx_datagrams",
    "cluster.a.udp.sess_rx_datagrams_dropped",
    "cluster.b.udp.sess_rx_datagrams",
];

pub fn run(bins: &Binaries, work: &Path, report: &mut Report) -> Result<()> {
    let hosts = naming_echoes(&["a", "b"])?;
    let free = legate_tests::legate::free_udp_port;
    let p = Ports {
        basic: free(),
        per_packet: free(),
        hashed: free(),
        by_dest: free(),
        no_route: free(),
        empty: free(),
        limited: free(),
        idle: free(),
        legacy: free(),
        small: free(),
    };
    let admin = legate_tests::legate::free_port();
    let log = work.join("udp-sessions.log");
    let cfg = work.join("l4-udp.yaml");
    std::fs::write(&cfg, bootstrap(admin, &p, &hosts, &log))?;
    let dropped = format!(
        "listener.127.0.0.1_{}.udp.downstream_rx_datagram_dropped",
        p.basic
    );
    let [envoy, legate] = proxies::each(bins, &cfg, admin, work, || {
        let answers = observe(&p, &log);
        let mut names: Vec<String> = STATS.iter().map(|s| s.to_string()).collect();
        names.push(dropped.clone());
        let stats: Vec<(String, String)> = names
            .into_iter()
            .map(|n| {
                let v = stat(admin, &n);
                (n, v)
            })
            .collect();
        (answers, stats)
    })?;
    for ((case, e), (_, l)) in envoy.0.iter().zip(&legate.0) {
        report.add("l4", "udp_proxy", case, verdict(e, l));
    }
    for ((name, e), (_, l)) in envoy.1.iter().zip(&legate.1) {
        let case = name.replace(&p.basic.to_string(), "<port>");
        report.add("l4", "udp_proxy", &format!("stat {case}"), verdict(e, l));
    }
    Ok(())
}

fn verdict(envoy: &str, legate: &str) -> Outcome {
    if envoy == legate {
        Outcome::Match
    } else {
        Outcome::Mismatch(vec![format!("envoy {envoy:?} / legate {legate:?}")])
    }
}
