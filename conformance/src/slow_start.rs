//! The http tier's slow start part: a round robin cluster with
//! `slow_start_config` gets its endpoints over EDS (the scripted ADS
//! server), then a third host. Envoy 1.40, measured here, ramps neither:
//! the first host set splits evenly and the added host takes its full
//! share at once (also with the legacy `round_robin_lb_config` and with
//! active health checks, tried while writing this part). The counts are
//! compared within a small margin, as round robin starts at a random
//! host.

use crate::proxies::{self, Binaries, Kind};
use crate::report::{Outcome, Report};
use anyhow::{bail, Result};
use legate_tests::xds_server::{any, ScriptedAds, ENDPOINT};
use serde_json::json;
use std::io::{Read, Write};
use std::time::Duration;

/// Requests per measurement.
const N: usize = 100;

fn addr(port: u16) -> serde_json::Value {
    json!({"socket_address": {"address": "127.0.0.1", "port_value": port}})
}

fn bootstrap(xds: u16, admin: u16, port: u16) -> String {
    json!({
        "admin": {"address": addr(admin)},
        "node": {"id": "slow-start", "cluster": "slow-start"},
        "dynamic_resources": {"ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]}},
        "static_resources": {
            "listeners": [{"name": "l", "address": addr(port), "filter_chains": [{"filters": [{
                "name": "hcm", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "slow_start",
                "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "c1"}}]}]},
                "http_filters": [{"name": "r", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]}],
            "clusters": [
                {"name": "xds", "type": "STATIC", "connect_timeout": "1s", "http2_protocol_options": {},
                 "load_assignment": {"cluster_name": "xds", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": addr(xds)}}]}]}},
                {"name": "c1", "type": "EDS", "connect_timeout": "1s",
                 "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}},
                 "load_balancing_policy": {"policies": [{"typed_extension_config": {
                    "name": "envoy.load_balancing_policies.round_robin",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin",
                        "slow_start_config": {"slow_start_window": "60s", "min_weight_percent": {"value": 10}}}}}]}}
            ]
        }
    })
    .to_string()
}

fn cla(ports: &[u16]) -> serde_json::Value {
    let eps: Vec<_> = ports
        .iter()
        .map(|p| json!({"endpoint": {"address": addr(*p)}}))
        .collect();
    json!({"cluster_name": "c1", "endpoints": [{"lb_endpoints": eps}]})
}

/// Which upstream answered one request (its `x-echo-server`).
fn served_by(port: u16) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return "no connection".into();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(b"GET / HTTP/1.1\r\nhost: slow.test\r\nconnection: close\r\n\r\n");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    text.lines()
        .find_map(|l| {
            l.strip_prefix("x-echo-server: ")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "none".into())
}

/// How many of `N` requests host `b` served.
/// (how many of `N` requests host `b` served, how many no host served).
fn count_b(port: u16) -> (usize, usize) {
    let all: Vec<String> = (0..N).map(|_| served_by(port)).collect();
    let count = |name: &str| all.iter().filter(|s| *s == name).count();
    (count("b"), count("none") + count("no connection"))
}

/// (with the first host set {a, b}: b's count and the requests no host
/// served, from the moment the proxy is ready; after c joins: c's count).
async fn measure(
    bins: &Binaries,
    kind: Kind,
    work: &std::path::Path,
) -> Result<((usize, usize), usize)> {
    let a = legate_tests::echo::start("a", "127.0.0.1:0".parse()?).await?;
    let b = legate_tests::echo::start("b", "127.0.0.1:0".parse()?).await?;
    let c = legate_tests::echo::start("c", "127.0.0.1:0".parse()?).await?;
    let ads = ScriptedAds::start("127.0.0.1:0".parse()?).await;
    ads.set(
        ENDPOINT,
        "1",
        vec![any(ENDPOINT, cla(&[a.addr.port(), b.addr.port()]))],
    );
    let (port, admin) = (
        legate_tests::legate::free_port(),
        legate_tests::legate::free_port(),
    );
    let cfg = work.join(format!("slow-start-{}.yaml", kind.name()));
    std::fs::write(&cfg, bootstrap(ads.addr.port(), admin, port))?;
    let _proxy = tokio::task::block_in_place(|| proxies::start(bins, kind, &cfg, admin, work))?;
    let first = tokio::task::block_in_place(|| count_b(port));
    ads.set(
        ENDPOINT,
        "2",
        vec![any(
            ENDPOINT,
            cla(&[a.addr.port(), b.addr.port(), c.addr.port()]),
        )],
    );
    let acked = ads
        .wait_for(Duration::from_secs(20), |_, r| {
            r.type_url == ENDPOINT && r.version_info == "2"
        })
        .await;
    if acked.is_none() {
        bail!("no ACK of the second endpoint set");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let warming = tokio::task::block_in_place(|| (0..N).filter(|_| served_by(port) == "c").count());
    Ok((first, warming))
}

pub async fn run(bins: &Binaries, work: &std::path::Path, report: &mut Report) -> Result<()> {
    let envoy = measure(bins, Kind::Envoy, work).await;
    let legate = measure(bins, Kind::Legate, work).await;
    let (e, l) = match (envoy, legate) {
        (Ok(e), Ok(l)) => (e, l),
        (Err(e), _) => {
            report.add(
                "http",
                "slow-start",
                "*",
                Outcome::HarnessError(vec![format!("envoy: {e:#}")]),
            );
            return Ok(());
        }
        (_, Err(l)) => {
            report.add(
                "http",
                "slow-start",
                "*",
                Outcome::Mismatch(vec![format!("legate: {l:#}")]),
            );
            return Ok(());
        }
    };
    // Within 3 of Envoy's count: round robin starts at a random host.
    let close = |x: usize, y: usize| x.abs_diff(y) <= 3;
    let verdict = |name: &str, x: usize, y: usize| {
        if close(x, y) {
            Outcome::Match
        } else {
            Outcome::Mismatch(vec![format!("{name}: envoy {x} of {N}, legate {y} of {N}")])
        }
    };
    // A static EDS cluster holds readiness until its endpoints arrive.
    report.add(
        "http",
        "slow-start",
        "served-from-readiness",
        Outcome::compare(
            &format!("{} of {N} unserved", e.0 .1),
            &format!("{} of {N} unserved", l.0 .1),
        ),
    );
    report.add(
        "http",
        "slow-start",
        "first-host-set-spreads-at-once",
        verdict("b", e.0 .0, l.0 .0),
    );
    report.add(
        "http",
        "slow-start",
        "added-host-takes-its-share",
        verdict("c", e.1, l.1),
    );
    Ok(())
}
