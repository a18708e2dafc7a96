//! The istio tier: a real istiod (`pilot-discovery`, built once from the
//! `istio.io/istio` Go module with `istio/no-kube.patch`, see
//! `istio/README.md`) on the file config in `istio/config/`, in Istio's
//! upstream profile (no istio-proxy-only extensions). Envoy 1.40 and then
//! Legate connect to it as a sidecar node (Istio's REDIRECT shape, and
//! INTERCEPTION_MODE NONE whose outbound listeners a client can reach
//! without iptables) and as an ingress gateway node, over SotW and Delta.
//! For each, istiod's own view (`/debug/syncz`) must show every type it
//! sent acknowledged; then the requests of `istio/requests.yaml` go through
//! the gateway and the sidecar, and Legate's answers are compared with
//! Envoy's.
//!
//! The tier runs in a network namespace of its own: istiod's config names
//! fixed ports (the gateway's 0.0.0.0:18000, the sidecar's 127.0.0.1:18080)
//! which another service on the machine may hold, and then the requests
//! would reach that service instead of the proxy.

use crate::compare::{diff, Observation};
use crate::proxies::{self, Binaries, Kind};
use crate::report::{Outcome, Report};
use crate::routing::Request;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The workloads of `istio/config/10-services.yaml`: echo servers named
/// after them, on their WorkloadEntry addresses.
pub(crate) const WORKLOADS: &[(&str, &str)] = &[
    ("productpage-v1", "127.0.0.10:19080"),
    ("reviews-v1", "127.0.0.21:19081"),
    ("reviews-v2", "127.0.0.22:19082"),
    ("reviews-v3", "127.0.0.23:19083"),
    ("ratings-v1", "127.0.0.31:19091"),
    ("details-v1", "127.0.0.41:19101"),
    ("httpbin-v1", "127.0.0.51:19111"),
    ("shadow-v1", "127.0.0.52:19112"),
];

/// The xDS types istiod sends, as `/debug/syncz` names them.
const TYPES: &[&str] = &["cluster", "listener", "route", "endpoint"];

/// One way of connecting to istiod.
pub(crate) struct Node {
    /// `istio/envoy-<template>.yaml`.
    pub(crate) template: &'static str,
    /// The node id's workload part, as syncz lists it.
    pub(crate) proxy_id: &'static str,
    /// INTERCEPTION_MODE override.
    pub(crate) interception: Option<&'static str>,
    /// Where its requests go (`requests.yaml` section and port), if any.
    pub(crate) traffic: Option<(&'static str, u16)>,
}

pub(crate) const NODES: &[(&str, Node)] = &[
    (
        "sidecar",
        Node {
            template: "sidecar",
            proxy_id: "productpage-v1-0.legate",
            interception: None,
            traffic: None,
        },
    ),
    (
        "sidecar-interception-none",
        Node {
            template: "sidecar",
            proxy_id: "productpage-v1-0.legate",
            interception: Some("NONE"),
            traffic: Some(("sidecar", 18080)),
        },
    ),
    (
        "gateway",
        Node {
            template: "router",
            proxy_id: "istio-ingressgateway-0.istio-system",
            interception: None,
            traffic: Some(("router", 18000)),
        },
    ),
];

/// istiod, stopped when dropped.
pub(crate) struct Istiod {
    child: Child,
    pub(crate) xds: u16,
    debug: u16,
}

impl Drop for Istiod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds (once per machine, into `~/.cache/legate`) and returns istiod.
fn istiod_binary(root: &Path) -> Result<PathBuf> {
    let out = crate::tools::output_ok(
        Command::new(root.join("istio/build-istiod.sh")).stderr(Stdio::inherit()),
        "building istiod (conformance/istio/build-istiod.sh)",
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let path = text.lines().last().unwrap_or_default().trim();
    Ok(PathBuf::from(path))
}

fn free() -> u16 {
    legate_tests::legate::free_port()
}

/// Istio's two profiles: "upstream" (only extensions upstream Envoy has:
/// no metadata exchange, no ALPN filter, no metrics provider) and
/// "default" (as Istio's Helm chart installs it: all of them, and the
/// `prometheus` metrics provider).
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Profile {
    Upstream,
    Default,
}

pub(crate) fn start_istiod(
    bin: &Path,
    root: &Path,
    work: &Path,
    profile: Profile,
) -> Result<Istiod> {
    let (xds, debug) = (free(), free());
    let log = std::fs::File::create(work.join("istiod.log"))?;
    let mut mesh = root.join("istio/mesh.yaml");
    let mut command = Command::new(bin);
    match profile {
        Profile::Upstream => {
            command
                .env("PILOT_ENABLE_METADATA_EXCHANGE", "false")
                .env("PILOT_ENABLE_ALPN_FILTER", "false");
        }
        Profile::Default => {
            let text = std::fs::read_to_string(&mesh)?;
            let text = text.replace(
                "defaultProviders: {}",
                "defaultProviders:\n  metrics: [prometheus]",
            );
            if !text.contains("metrics: [prometheus]") {
                bail!("istio/mesh.yaml no longer has `defaultProviders: {{}}`");
            }
            mesh = work.join("mesh-default.yaml");
            std::fs::write(&mesh, text)?;
        }
    }
    let child = command
        .args(["discovery", "--registries="])
        .arg(format!(
            "--configDir={}",
            root.join("istio/config").display()
        ))
        .arg(format!("--meshConfig={}", mesh.display()))
        .arg(format!("--grpcAddr=127.0.0.1:{xds}"))
        .arg(format!("--httpAddr=127.0.0.1:{debug}"))
        .arg(format!("--monitoringAddr=127.0.0.1:{}", free()))
        .args(["--httpsAddr=", "--secureGRPCAddr="])
        .arg(format!("--ctrlz_port={}", free()))
        .env("POD_NAMESPACE", "istio-system")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting istiod")?;
    let d = Istiod { child, xds, debug };
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", xds)).is_err() {
        if Instant::now() > deadline {
            bail!(
                "istiod did not listen on {xds}; see {}",
                work.join("istiod.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(d)
}

/// istiod's `/debug/syncz` entry for `proxy_id`, if it is connected.
fn syncz(istiod: &Istiod, proxy_id: &str) -> Option<serde_json::Value> {
    let url = format!("http://127.0.0.1:{}/debug/syncz", istiod.debug);
    let out = Command::new("curl")
        .args(["-s", "--max-time", "3", &url])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.as_array()?
        .iter()
        .find(|p| p["proxy"].as_str() == Some(proxy_id))
        .cloned()
}

/// Waits until istiod has every type acknowledged by `proxy_id`; the
/// answer names the types that were not ("all acknowledged" otherwise).
pub(crate) fn wait_acked(istiod: &Istiod, proxy_id: &str) -> String {
    wait_acked_of(istiod, proxy_id, TYPES)
}

/// As [`wait_acked`], for the `types` a node is sent (a node importing no
/// services is sent no routes and no endpoints).
pub(crate) fn wait_acked_of(istiod: &Istiod, proxy_id: &str, types: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut pending: Vec<&str> = types.to_vec();
    while Instant::now() < deadline {
        if let Some(p) = syncz(istiod, proxy_id) {
            pending = types
                .iter()
                .copied()
                .filter(|t| {
                    let sent = p[format!("{t}_sent")].as_str().unwrap_or("");
                    sent.is_empty() || p[format!("{t}_acked")].as_str() != Some(sent)
                })
                .collect();
            if pending.is_empty() {
                return "all acknowledged".into();
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    format!("not acknowledged: {}", pending.join(", "))
}

/// Waits until istiod has let go of `proxy_id` (the last proxy stopped).
pub(crate) fn wait_gone(istiod: &Istiod, proxy_id: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && syncz(istiod, proxy_id).is_some() {
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub(crate) fn bootstrap(
    root: &Path,
    work: &Path,
    node: &Node,
    api: &str,
    xds: u16,
) -> Result<(PathBuf, u16)> {
    let admin = free();
    let mut text =
        std::fs::read_to_string(root.join(format!("istio/envoy-{}.yaml", node.template)))?
            .replace("{{XDS_PORT}}", &xds.to_string())
            .replace("{{ADMIN_PORT}}", &admin.to_string())
            .replace("{{ADS_API_TYPE}}", api);
    if let Some(mode) = node.interception {
        let re = regex::Regex::new(r"INTERCEPTION_MODE: \w+")?;
        text = re
            .replace(&text, format!("INTERCEPTION_MODE: {mode}"))
            .into_owned();
    }
    let path = work.join(format!("istio-{}-{api}.yaml", node.template));
    std::fs::write(&path, text)?;
    Ok((path, admin))
}

/// Builds istiod (which needs the network), then runs the tier in a fresh
/// network namespace on a runtime whose threads all live there.
pub fn run_isolated(bins: &Binaries, root: &Path, work: &Path, report: &mut Report) -> Result<()> {
    let bin = istiod_binary(root)?;
    let ns = legate_tests::netns::Netns::new("istio").context("making the tier's namespace")?;
    ns.enter(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(run(bins, root, work, report, &bin))
    })
}

async fn run(
    bins: &Binaries,
    root: &Path,
    work: &Path,
    report: &mut Report,
    bin: &Path,
) -> Result<()> {
    let requests: BTreeMap<String, Vec<Request>> =
        serde_yaml::from_str(&std::fs::read_to_string(root.join("istio/requests.yaml"))?)
            .context("parsing istio/requests.yaml")?;
    let mut echoes = Vec::new();
    for (name, addr) in WORKLOADS {
        let addr: SocketAddr = addr.parse()?;
        echoes.push(legate_tests::echo::start(name, addr).await?);
    }
    let istiod = tokio::task::block_in_place(|| start_istiod(bin, root, work, Profile::Upstream))?;
    for (label, node) in NODES {
        for (flavour, api) in [("sotw", "GRPC"), ("delta", "DELTA_GRPC")] {
            let case = format!("{label}-{flavour}");
            let (cfg, admin) = bootstrap(root, work, node, api, istiod.xds)?;
            let mut acks = Vec::new();
            let mut seen: Vec<Vec<Result<Observation, String>>> = Vec::new();
            for kind in [Kind::Envoy, Kind::Legate] {
                tokio::task::block_in_place(|| wait_gone(&istiod, node.proxy_id));
                let running = proxies::start(bins, kind, &cfg, admin, work);
                let Ok(_running) = running else {
                    acks.push(format!("{} did not start", kind.name()));
                    seen.push(Vec::new());
                    continue;
                };
                acks.push(tokio::task::block_in_place(|| {
                    wait_acked(&istiod, node.proxy_id)
                }));
                // Traffic once per node shape (SotW), after every type is in.
                let reqs = match node.traffic {
                    Some((section, port)) if flavour == "sotw" => {
                        requests.get(section).map(|rs| (rs, port))
                    }
                    _ => None,
                };
                seen.push(match reqs {
                    Some((rs, port)) => tokio::task::block_in_place(|| {
                        rs.iter()
                            .map(|r| crate::routing::try_send(port, r, work))
                            .collect()
                    }),
                    None => Vec::new(),
                });
            }
            let ack = if acks[0] != "all acknowledged" {
                Outcome::HarnessError(vec![format!("envoy: {}", acks[0])])
            } else {
                Outcome::compare(&acks[0], &acks[1])
            };
            report.add("istio", &case, "ack", ack);
            if let Some((section, _)) = node.traffic.filter(|_| flavour == "sotw") {
                for (i, r) in requests.get(section).into_iter().flatten().enumerate() {
                    let (e, l) = (seen[0].get(i), seen[1].get(i));
                    let o = match (e, l) {
                        (Some(Err(e)), _) => Outcome::HarnessError(vec![format!("envoy: {e}")]),
                        (_, Some(Err(l))) => Outcome::Mismatch(vec![format!("legate: {l}")]),
                        (Some(Ok(e)), Some(Ok(l))) => {
                            let d = diff(e, l);
                            if d.is_empty() {
                                Outcome::Match
                            } else {
                                Outcome::Mismatch(d)
                            }
                        }
                        _ => Outcome::Mismatch(vec!["a proxy did not start".into()]),
                    };
                    report.add("istio", &case, &r.name, o);
                }
            }
        }
    }
    drop(istiod);
    crate::istio_mesh::run(bins, root, work, report, bin, &mut echoes).await?;
    drop(echoes);
    Ok(())
}
