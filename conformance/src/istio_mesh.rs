//! The istio tier's default profile: istiod as Istio's Helm chart installs
//! it, sending Istio's own extensions (the HTTP peer metadata filter, the
//! TCP metadata exchange, `istio.alpn`, `istio.stats`), which upstream
//! Envoy does not have, so there is no oracle: Legate alone.
//!
//! - Acknowledgement: Legate connects as each node of the upstream profile
//!   (sidecar, sidecar with INTERCEPTION_MODE NONE, gateway), over SotW and
//!   Delta; istiod's `/debug/syncz` must show every type acknowledged.
//! - Two sidecars: productpage-v1's (NONE, outbound on 127.0.0.1:18080) and
//!   details-v1's (NONE, an inbound listener on 127.0.0.41:19101 from
//!   `config/50-sidecar-details.yaml`, forwarding to the application on
//!   127.0.0.1:29101). Requests for details go through both. The peer
//!   headers must reach neither the application nor the client, and each
//!   sidecar must report `istio_requests_total` with Istio's labels, the
//!   client as `source` and the server as `destination`, each naming the
//!   other's workload learned from the peer headers.

use crate::istio::{
    bootstrap, start_istiod, wait_acked, wait_acked_of, wait_gone, Node, Profile, NODES,
};
use crate::proxies::{self, Binaries, Kind};
use crate::report::{Outcome, Report};
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

const TIER: &str = "istio";

/// The details-v1 sidecar node.
const DETAILS: Node = Node {
    template: "sidecar-details",
    proxy_id: "details-v1-0.legate",
    interception: None,
    traffic: None,
};

/// Where details-v1 listens once its sidecar has its address.
const DETAILS_APP: &str = "127.0.0.1:29101";
const DETAILS_INBOUND: &str = "127.0.0.41:19101";
const REQUESTS: u64 = 3;

/// Istio's standard HTTP labels, in its order.
const HTTP_LABELS: &[&str] = &[
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];

pub async fn run(
    bins: &Binaries,
    root: &Path,
    work: &Path,
    report: &mut Report,
    istiod_bin: &Path,
    echoes: &mut Vec<legate_tests::echo::Echo>,
) -> Result<()> {
    let dir = work.join("istio-default");
    std::fs::create_dir_all(&dir)?;
    let istiod =
        tokio::task::block_in_place(|| start_istiod(istiod_bin, root, &dir, Profile::Default))?;
    for (label, node) in NODES {
        for (flavour, api) in [("sotw", "GRPC"), ("delta", "DELTA_GRPC")] {
            let case = format!("default-{label}-{flavour}");
            let (cfg, admin) = bootstrap(root, &dir, node, api, istiod.xds)?;
            tokio::task::block_in_place(|| wait_gone(&istiod, node.proxy_id));
            let outcome = match proxies::start(bins, Kind::Legate, &cfg, admin, &dir) {
                Err(e) => Outcome::Mismatch(vec![format!("legate did not start: {e:#}")]),
                Ok(_running) => {
                    let acked = tokio::task::block_in_place(|| wait_acked(&istiod, node.proxy_id));
                    if acked == "all acknowledged" {
                        Outcome::Match
                    } else {
                        Outcome::Mismatch(vec![acked])
                    }
                }
            };
            report.add(TIER, &case, "ack", outcome);
        }
    }
    tokio::task::block_in_place(|| wait_gone(&istiod, "productpage-v1-0.legate"));
    crate::istio_agent::run(bins, &dir, report, &istiod, istiod_bin).await?;
    two_sidecars(bins, root, &dir, report, &istiod, echoes).await
}

/// A sidecar started in a folder of its own (its log, its config).
fn sidecar(
    bins: &Binaries,
    root: &Path,
    dir: &Path,
    node: &Node,
    istiod: &crate::istio::Istiod,
) -> Result<(proxies::Running, u16)> {
    let own = dir.join(node.template.to_string() + "-" + node.proxy_id);
    std::fs::create_dir_all(&own)?;
    let (cfg, admin) = bootstrap(root, &own, node, "GRPC", istiod.xds)?;
    tokio::task::block_in_place(|| wait_gone(istiod, node.proxy_id));
    let running = proxies::start(bins, Kind::Legate, &cfg, admin, &own)?;
    // details-v1's sidecar imports no services: its inbound listener's
    // routes are inline and its application's cluster is static.
    let types: &[&str] = if node.proxy_id == DETAILS.proxy_id {
        &["cluster", "listener"]
    } else {
        &["cluster", "listener", "route", "endpoint"]
    };
    let acked = tokio::task::block_in_place(|| wait_acked_of(istiod, node.proxy_id, types));
    anyhow::ensure!(acked == "all acknowledged", "{}: {acked}", node.proxy_id);
    Ok((running, admin))
}

async fn two_sidecars(
    bins: &Binaries,
    root: &Path,
    dir: &Path,
    report: &mut Report,
    istiod: &crate::istio::Istiod,
    echoes: &mut Vec<legate_tests::echo::Echo>,
) -> Result<()> {
    let case = "default-two-sidecars";
    // The application moves behind its sidecar.
    echoes.retain(|e| e.name != "details-v1");
    let _app = legate_tests::echo::start("details-v1", DETAILS_APP.parse()?).await?;
    let client_node = &NODES
        .iter()
        .find(|(l, _)| *l == "sidecar-interception-none")
        .context("the NONE sidecar node")?
        .1;
    let started = (|| -> Result<_> {
        let server = tokio::task::block_in_place(|| sidecar(bins, root, dir, &DETAILS, istiod))?;
        let client = tokio::task::block_in_place(|| sidecar(bins, root, dir, client_node, istiod))?;
        Ok((server, client))
    })();
    let ((_server, server_admin), (_client, client_admin)) = match started {
        Ok(s) => s,
        Err(e) => {
            report.add(
                TIER,
                case,
                "sidecars start",
                Outcome::Mismatch(vec![format!("{e:#}")]),
            );
            return Ok(());
        }
    };
    let inbound: SocketAddr = DETAILS_INBOUND.parse()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(inbound).is_err() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let request: crate::routing::Request = serde_yaml::from_str(
        "{name: details, path: /details/0, headers: {host: details.legate.svc.cluster.local}}",
    )?;
    let mut seen = Vec::new();
    for _ in 0..REQUESTS {
        seen.push(tokio::task::block_in_place(|| {
            crate::routing::send(18080, &request, dir)
        }));
    }
    report.add(TIER, case, "served through both", served(&seen));
    let client = stats(client_admin).await;
    let server = stats(server_admin).await;
    let peer = [
        ("source_workload", "productpage-v1"),
        ("source_canonical_service", "productpage"),
        ("source_canonical_revision", "v1"),
        ("source_workload_namespace", "legate"),
        ("source_app", "productpage"),
        ("source_version", "v1"),
        ("source_cluster", "Kubernetes"),
        ("destination_workload", "details-v1"),
        ("destination_workload_namespace", "legate"),
        ("destination_app", "details"),
        ("destination_version", "v1"),
        ("destination_service", "details.legate.svc.cluster.local"),
        ("destination_canonical_service", "details"),
        ("destination_canonical_revision", "v1"),
        // The cluster's `istio.services[0].name`: for a ServiceEntry istiod
        // names the service by its host.
        (
            "destination_service_name",
            "details.legate.svc.cluster.local",
        ),
        ("destination_service_namespace", "legate"),
        ("destination_cluster", "Kubernetes"),
        ("request_protocol", "http"),
        ("response_code", "200"),
        ("grpc_response_status", ""),
        ("response_flags", "-"),
    ];
    let mut want_client: Vec<(&str, &str)> = vec![("reporter", "source")];
    want_client.extend(peer);
    want_client.extend([
        ("source_principal", "unknown"),
        ("destination_principal", "unknown"),
        ("connection_security_policy", "unknown"),
    ]);
    let mut want_server: Vec<(&str, &str)> = vec![("reporter", "destination")];
    want_server.extend(peer);
    want_server.extend([
        ("source_principal", "unknown"),
        ("destination_principal", "unknown"),
        ("connection_security_policy", "none"),
    ]);
    report.add(
        TIER,
        case,
        "client istio_requests_total",
        requests_total(&client, &want_client),
    );
    report.add(
        TIER,
        case,
        "server istio_requests_total",
        requests_total(&server, &want_server),
    );
    for (side, text) in [("client", &client), ("server", &server)] {
        report.add(
            TIER,
            case,
            &format!("{side} request duration histogram"),
            histogram(text),
        );
    }
    Ok(())
}

/// Every answer from details-v1, with no peer header left on either side.
fn served(seen: &[crate::compare::Observation]) -> Outcome {
    let mut bad = Vec::new();
    for (i, o) in seen.iter().enumerate() {
        if o.status != 200 || o.served_by != "details-v1" {
            bad.push(format!("request {i}: {} from {}", o.status, o.served_by));
        }
        for h in ["x-envoy-peer-metadata", "x-envoy-peer-metadata-id"] {
            if o.headers.contains_key(h) {
                bad.push(format!("request {i}: the client got {h}"));
            }
            let upstream = o
                .upstream
                .as_ref()
                .map(|u| u["headers"].to_string())
                .unwrap_or_default();
            if upstream.contains(&format!("\"{h}\"")) {
                bad.push(format!("request {i}: the application got {h}"));
            }
        }
    }
    if bad.is_empty() {
        Outcome::Match
    } else {
        Outcome::Mismatch(bad)
    }
}

async fn stats(admin: u16) -> String {
    let url = format!("http://127.0.0.1:{admin}/stats/prometheus");
    tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-s", "--max-time", "3", &url])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    })
    .await
    .unwrap_or_default()
}

/// A Prometheus sample's labels, in order.
type Labels = Vec<(String, String)>;

/// A Prometheus sample line's (name, labels, value).
fn sample(line: &str) -> Option<(&str, Labels, &str)> {
    let (name, rest) = line.split_once('{')?;
    let (labels, value) = rest.rsplit_once("} ")?;
    let re = regex::Regex::new(r#"([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)""#).ok()?;
    let labels = re
        .captures_iter(labels)
        .map(|c| (c[1].to_string(), c[2].to_string()))
        .collect();
    Some((name, labels, value))
}

/// The one `istio_requests_total` series, with Istio's labels in order,
/// equal to `want`, counting every request.
fn requests_total(text: &str, want: &[(&str, &str)]) -> Outcome {
    let series: Vec<_> = text
        .lines()
        .filter_map(sample)
        .filter(|(n, _, _)| *n == "istio_requests_total")
        .collect();
    let [(_, labels, value)] = series.as_slice() else {
        return Outcome::Mismatch(vec![format!(
            "{} istio_requests_total series (want 1):\n{}",
            series.len(),
            text.lines()
                .filter(|l| l.starts_with("istio_requests_total"))
                .collect::<Vec<_>>()
                .join("\n")
        )]);
    };
    let mut bad = Vec::new();
    let names: Vec<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
    if names != HTTP_LABELS {
        bad.push(format!("labels {names:?}"));
    }
    for (k, v) in want {
        let got = labels.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        if got != Some(v) {
            bad.push(format!("{k}: want {v:?}, got {got:?}"));
        }
    }
    if *value != REQUESTS.to_string() {
        bad.push(format!("value {value}, want {REQUESTS}"));
    }
    if bad.is_empty() {
        Outcome::Match
    } else {
        Outcome::Mismatch(bad)
    }
}

/// `istio_request_duration_milliseconds` counts every request, its
/// buckets cumulative up to `+Inf`.
fn histogram(text: &str) -> Outcome {
    let count = text
        .lines()
        .filter_map(sample)
        .find(|(n, _, _)| *n == "istio_request_duration_milliseconds_count")
        .map(|(_, _, v)| v.to_string());
    let inf = text
        .lines()
        .filter_map(sample)
        .find(|(n, l, _)| {
            *n == "istio_request_duration_milliseconds_bucket"
                && l.last().is_some_and(|(k, v)| k == "le" && v == "+Inf")
        })
        .map(|(_, _, v)| v.to_string());
    let want = Some(REQUESTS.to_string());
    if count == want && inf == want {
        Outcome::Match
    } else {
        Outcome::Mismatch(vec![format!(
            "count {count:?}, +Inf bucket {inf:?}, want {REQUESTS}"
        )])
    }
}
