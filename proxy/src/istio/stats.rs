//! `istio.stats` (`stats.PluginConfig`): Istio's standard metrics, with its
//! labels, as Istio's proxy reports them (see [`super::metrics`] for how
//! they print). HTTP: `istio_requests_total`, and the histograms
//! `istio_request_duration_milliseconds`, `istio_request_bytes`,
//! `istio_response_bytes`, recorded when the stream ends. TCP (the network
//! filter): `istio_tcp_connections_opened_total` / `_closed_total`,
//! `istio_tcp_sent_bytes_total` / `_received_bytes_total`, recorded as the
//! connection opens and closes. The peer comes from the peer metadata
//! filter or the TCP metadata exchange (else, on the client side, the
//! endpoint's `istio.workload` metadata); the reporter from the listener's
//! direction (INBOUND: `destination`) or `reporter: SERVER_GATEWAY`.
//!
//! Not as Istio's proxy: byte sizes count an HTTP/1 rendering of the
//! headers (what the wire carries on HTTP/1; HTTP/2's compressed headers
//! are smaller); TCP connections count as opened when they start (or, when
//! the exchange may name the peer, when they end), and their bytes at the
//! end, not every `tcp_reporting_duration`; the principals of this proxy's
//! own certificate (the server side's `destination_principal`, the client
//! side's `source_principal`) and of the upstream's certificate (the client
//! side's `destination_principal`, else the peer's `IDENTITY`) are
//! `unknown`: Legate does not keep those certificates per stream; gRPC
//! message counts are not kept. None of these changes traffic.

use super::metrics::{store, Labels};
use super::peer::{Peers, Workload};
use crate::cel::Expression;
use crate::config::{index, join, ConfigError, Result};
use crate::http_filters::{
    Factory, Flow, HttpFilter, RequestInfo, ResponseInfo, State, StreamDone,
};
use crate::registry::MessageSupport;
use legate_proto::envoy_types::pb::google::protobuf::Any;
use legate_proto::istio::STATS as TYPE;
use legate_proto::prost_reflect::{DynamicMessage, MapKey, Value};
use pingora_http::ResponseHeader;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

pub static FACTORY: Factory = Factory {
    type_name: TYPE,
    build,
    per_route: &[],
};

pub static REGISTRY: &[MessageSupport] = &[
    MessageSupport {
        message: TYPE,
        supported: &["disable_host_header_fallback", "metrics", "reporter"],
        warn: &[
            (
                "tcp_reporting_duration",
                "TCP metrics are reported as connections open and close, not on an interval",
            ),
            ("rotation_interval", "Istio's proxy does not read it"),
            (
                "graceful_deletion_interval",
                "Istio's proxy does not read it",
            ),
            ("debug", "reserved in Istio's proxy, which ignores it"),
            (
                "max_peer_cache_size",
                "reserved in Istio's proxy, which ignores it",
            ),
            ("stat_prefix", "reserved in Istio's proxy, which ignores it"),
            (
                "field_separator",
                "reserved in Istio's proxy, which ignores it",
            ),
            (
                "value_separator",
                "reserved in Istio's proxy, which ignores it",
            ),
        ],
    },
    MessageSupport {
        message: "stats.MetricConfig",
        supported: &["dimensions", "name", "tags_to_remove", "drop"],
        warn: &[("match", "Istio's proxy does not implement it")],
    },
];

/// Who reports: the client's sidecar (`source`), the server's
/// (`destination`), or a waypoint (`waypoint`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reporter {
    Client,
    Server,
    Gateway,
}

impl Reporter {
    fn name(self) -> &'static str {
        match self {
            Reporter::Client => "source",
            Reporter::Server => "destination",
            Reporter::Gateway => "waypoint",
        }
    }
}

/// A `metrics` entry: what it changes, on one metric (by its short name,
/// `requests_total`) or on all.
#[derive(Debug)]
struct Override {
    metric: Option<String>,
    drop: bool,
    remove: Vec<String>,
    /// (tag, expression), tags in name order.
    dimensions: Vec<(String, Expression)>,
}

#[derive(Debug)]
pub struct PluginConfig {
    disable_host_header_fallback: bool,
    /// `reporter: SERVER_GATEWAY`; otherwise the listener's direction.
    gateway: bool,
    overrides: Vec<Override>,
    local: Local,
}

/// The local node's values, as `istio.stats` reads them (plain `app` and
/// `version` labels only; a missing value is empty).
#[derive(Debug, Default)]
struct Local {
    workload: String,
    namespace: String,
    cluster: String,
    app: String,
    version: String,
    canonical_name: String,
    canonical_revision: String,
}

impl Local {
    /// The node's workload as the peer model reads it, but with the plain
    /// `app` and `version` labels (the peer model prefers the
    /// `app.kubernetes.io/*` ones).
    fn from_node() -> Local {
        let node = crate::config::local_node();
        let w = Workload::from_metadata(&node.metadata, &[], ("", ""));
        Local {
            app: super::peer::node_label(&node.metadata, "app"),
            version: super::peer::node_label(&node.metadata, "version"),
            workload: w.workload_name,
            namespace: w.namespace,
            cluster: w.cluster,
            canonical_name: w.canonical_name,
            canonical_revision: w.canonical_revision,
        }
    }
}

pub fn from_any(a: &Any, path: &str) -> Result<Arc<PluginConfig>> {
    let m = legate_proto::walk::decode_any(&a.type_url, &a.value, path)
        .map_err(|e| ConfigError::new(path, e.to_string()))?;
    let flag = |k: &str| {
        m.get_field_by_name(k)
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
    };
    let mut overrides = Vec::new();
    if let Some(Value::List(items)) = m.get_field_by_name("metrics").as_deref() {
        for (i, item) in items.iter().filter_map(Value::as_message).enumerate() {
            overrides.push(metric_override(item, &index(path, "metrics", i))?);
        }
    }
    // Istio's proxy sets its version once, as the config is made.
    let version = crate::config::local_node()
        .metadata
        .get("ISTIO_VERSION")
        .and_then(|v| v.as_str())
        .filter(|v| !v.is_empty())
        .unwrap_or("unknown")
        .to_string();
    store().set(
        "istio_build",
        vec![
            ("component".into(), "proxy".into()),
            ("tag".into(), version),
        ],
        1,
    );
    Ok(Arc::new(PluginConfig {
        disable_host_header_fallback: flag("disable_host_header_fallback"),
        gateway: m
            .get_field_by_name("reporter")
            .and_then(|v| v.as_enum_number())
            == Some(1),
        overrides,
        local: Local::from_node(),
    }))
}

fn metric_override(m: &DynamicMessage, path: &str) -> Result<Override> {
    let text = |k: &str| {
        m.get_field_by_name(k)
            .and_then(|v| v.as_str().map(String::from))
    };
    let mut dimensions = Vec::new();
    if let Some(Value::Map(d)) = m.get_field_by_name("dimensions").as_deref() {
        for (k, v) in d {
            let (MapKey::String(tag), Some(expr)) = (k, v.as_str()) else {
                continue;
            };
            let p = join(&join(path, "dimensions"), tag);
            dimensions.push((tag.clone(), Expression::parse(expr, &p)?));
        }
    }
    dimensions.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Override {
        metric: text("name").filter(|n| !n.is_empty()),
        drop: m
            .get_field_by_name("drop")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
        remove: match m.get_field_by_name("tags_to_remove").as_deref() {
            Some(Value::List(l)) => l
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect(),
            _ => Vec::new(),
        },
        dimensions,
    })
}

impl PluginConfig {
    fn reporter(&self, inbound: bool) -> Reporter {
        if self.gateway {
            Reporter::Gateway
        } else if inbound {
            Reporter::Server
        } else {
            Reporter::Client
        }
    }

    /// Records `value` for metric `short` (`requests_total`), with the
    /// overrides applied to `labels`.
    fn emit(&self, short: &str, labels: &Labels, entry: &crate::access_log::Entry, value: Emit) {
        let applies = |o: &&Override| o.metric.as_deref().is_none_or(|m| m == short);
        if self.overrides.iter().filter(applies).any(|o| o.drop) {
            return;
        }
        let mut labels = labels.clone();
        for o in self.overrides.iter().filter(applies) {
            labels.retain(|(k, _)| !o.remove.contains(k));
            for (tag, expr) in &o.dimensions {
                let v = expr
                    .evaluate(entry)
                    .map(|v| crate::cel::text(&v))
                    .unwrap_or_else(|| "unknown".into());
                match labels.iter_mut().find(|(k, _)| k == tag) {
                    Some(slot) => slot.1 = v,
                    None => labels.push((tag.clone(), v)),
                }
            }
        }
        let name = format!("istio_{short}");
        match value {
            Emit::Count(n) => store().add(&name, labels, n),
            Emit::Sample(v) => store().record(&name, labels, v),
        }
    }
}

enum Emit {
    Count(u64),
    Sample(u64),
}

/// What a stream's labels are made of, besides the local node.
pub struct Facts<'a> {
    pub reporter: Reporter,
    pub peer: Option<&'a Workload>,
    /// The endpoint's `istio.workload` (client side, no peer).
    pub endpoint: Option<&'a str>,
    /// The request's host, when the config lets it stand in.
    pub host: Option<&'a str>,
    pub route_name: &'a str,
    pub cluster: Option<&'a crate::cluster_manager::Cluster>,
    pub cluster_name: &'a str,
    /// The downstream peer certificate's first URI SAN (what the server
    /// side reports; the client side does not read it).
    pub peer_san: &'a str,
}

const UNKNOWN: &str = "unknown";

fn or<'a>(v: &'a str, default: &'a str) -> &'a str {
    if v.is_empty() {
        default
    } else {
        v
    }
}

/// Istio's standard labels up to `destination_cluster`, in its order.
fn peer_labels(local: &Local, f: &Facts) -> Labels {
    let endpoint_peer;
    let peer = match (f.peer, f.reporter, f.endpoint) {
        (Some(p), _, _) => Some(p),
        (None, Reporter::Client, Some(e)) => {
            endpoint_peer = workload_from_endpoint(e);
            endpoint_peer.as_ref()
        }
        _ => None,
    };
    let empty = Workload::default();
    let p = peer.unwrap_or(&empty);
    // The service: the host unless disabled, then what the route or the
    // cluster says.
    let (mut host, mut host_name, mut ns) = (
        f.host.unwrap_or("").to_string(),
        f.host.unwrap_or("").to_string(),
        String::new(),
    );
    const PASS: &[&str] = &[
        "BlackHoleCluster",
        "PassthroughCluster",
        "InboundPassthroughCluster",
        "InboundPassthroughClusterIpv4",
        "InboundPassthroughClusterIpv6",
    ];
    if f.route_name == "block_all" {
        host_name = "BlackHoleCluster".into();
    } else if f.route_name == "allow_any" {
        host_name = "PassthroughCluster".into();
    } else if PASS.contains(&f.cluster_name) {
        host_name = f.cluster_name.to_string();
    } else if let Some((h, n, s)) = f.cluster.and_then(|c| c.config.istio.service.as_ref()) {
        host = h.clone();
        ns = s.clone();
        host_name = if n.is_empty() {
            h.split('.').next().unwrap_or("").to_string()
        } else {
            n.clone()
        };
    }
    // The server side's peer is its client's certificate; the client
    // side's would be the upstream's certificate, which Legate does not
    // keep (below): it says the peer's own `IDENTITY`, if any.
    let peer_san = match f.reporter {
        Reporter::Client => p.identity.as_str(),
        _ => f.peer_san,
    };
    let peer_ns = peer_san
        .split_once("/ns/")
        .map(|(_, r)| r.split('/').next().unwrap_or(""))
        .filter(|n| !n.is_empty())
        .unwrap_or(&p.namespace);
    let mut l: Vec<(&str, String)> = Vec::with_capacity(20);
    match f.reporter {
        Reporter::Server | Reporter::Gateway => {
            l.push(("source_workload", or(&p.workload_name, UNKNOWN).into()));
            l.push((
                "source_canonical_service",
                or(&p.canonical_name, UNKNOWN).into(),
            ));
            l.push((
                "source_canonical_revision",
                or(&p.canonical_revision, "latest").into(),
            ));
            l.push(("source_workload_namespace", or(peer_ns, UNKNOWN).into()));
            l.push(("source_principal", or(peer_san, UNKNOWN).into()));
            l.push(("source_app", or(&p.app, UNKNOWN).into()));
            l.push(("source_version", or(&p.version, UNKNOWN).into()));
            l.push(("source_cluster", or(&p.cluster, UNKNOWN).into()));
            l.push(("destination_workload", local.workload.clone()));
            l.push(("destination_workload_namespace", local.namespace.clone()));
            l.push(("destination_principal", UNKNOWN.into()));
            l.push(("destination_app", local.app.clone()));
            l.push(("destination_version", local.version.clone()));
            l.push((
                "destination_service",
                or(&host, &local.canonical_name).into(),
            ));
            l.push((
                "destination_canonical_service",
                local.canonical_name.clone(),
            ));
            l.push((
                "destination_canonical_revision",
                local.canonical_revision.clone(),
            ));
            l.push((
                "destination_service_name",
                or(&host_name, &local.canonical_name).into(),
            ));
            l.push(("destination_service_namespace", local.namespace.clone()));
            l.push(("destination_cluster", local.cluster.clone()));
        }
        Reporter::Client => {
            l.push(("source_workload", local.workload.clone()));
            l.push(("source_canonical_service", local.canonical_name.clone()));
            l.push((
                "source_canonical_revision",
                local.canonical_revision.clone(),
            ));
            l.push(("source_workload_namespace", local.namespace.clone()));
            l.push(("source_principal", UNKNOWN.into()));
            l.push(("source_app", local.app.clone()));
            l.push(("source_version", local.version.clone()));
            l.push(("source_cluster", local.cluster.clone()));
            l.push(("destination_workload", or(&p.workload_name, UNKNOWN).into()));
            l.push((
                "destination_workload_namespace",
                or(peer_ns, UNKNOWN).into(),
            ));
            l.push(("destination_principal", or(peer_san, UNKNOWN).into()));
            l.push(("destination_app", or(&p.app, UNKNOWN).into()));
            l.push(("destination_version", or(&p.version, UNKNOWN).into()));
            l.push(("destination_service", or(&host, UNKNOWN).into()));
            l.push((
                "destination_canonical_service",
                or(&p.canonical_name, UNKNOWN).into(),
            ));
            l.push((
                "destination_canonical_revision",
                or(&p.canonical_revision, "latest").into(),
            ));
            l.push(("destination_service_name", or(&host_name, UNKNOWN).into()));
            let ns = if ns.is_empty() {
                or(peer_ns, UNKNOWN)
            } else {
                &ns
            };
            l.push(("destination_service_namespace", ns.into()));
            l.push(("destination_cluster", or(&p.cluster, UNKNOWN).into()));
        }
    }
    let mut out: Labels = vec![("reporter".into(), f.reporter.name().into())];
    out.extend(l.into_iter().map(|(k, v)| (k.to_string(), v)));
    out
}

/// A peer from an endpoint's `workload;namespace;canonical name;canonical
/// revision;cluster` (fewer than five parts: none).
fn workload_from_endpoint(s: &str) -> Option<Workload> {
    let parts: Vec<&str> = s.split(';').collect();
    if parts.len() < 5 {
        return None;
    }
    Some(Workload {
        workload_name: parts[0].into(),
        namespace: parts[1].into(),
        canonical_name: parts[2].into(),
        canonical_revision: parts[3].into(),
        cluster: parts[4].into(),
        ..Default::default()
    })
}

// ---- HTTP ----

/// The HTTP filter.
#[derive(Debug)]
pub struct IstioStats(Arc<PluginConfig>);

fn build(a: &Any, _hcm_prefix: &str, path: &str) -> Result<Arc<dyn HttpFilter>> {
    Ok(Arc::new(IstioStats(from_any(a, path)?)))
}

/// One stream, as the filter sees it on the way.
struct Stream {
    grpc: bool,
    peer_san: String,
    host: String,
    request_head: u64,
    response_head: AtomicU64,
    /// grpc-status + 1 (0: none seen).
    grpc_status: AtomicU64,
}

impl Stream {
    /// A stream whose request hook never ran, from what its end shows
    /// (the client certificate is not there: its principal is unknown).
    fn after(done: &StreamDone<'_>) -> Stream {
        let req = done.req;
        let http = done.entry.http.as_ref();
        let grpc = req
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("application/grpc"));
        let grpc_status = http
            .and_then(|h| h.response)
            .and_then(|r| grpc_status(r.get("grpc-status")))
            .map_or(0, |g| g + 1);
        Stream {
            grpc,
            peer_san: String::new(),
            host: crate::routing::authority(req).to_string(),
            request_head: request_head(req),
            response_head: AtomicU64::new(
                http.and_then(|h| h.response)
                    .map_or(0, |r| "HTTP/1.1 200 \r\n".len() as u64 + header_bytes(r)),
            ),
            grpc_status: AtomicU64::new(grpc_status),
        }
    }
}

/// An HTTP/1 rendering's size of a request head.
fn request_head(req: &pingora_http::RequestHeader) -> u64 {
    let line = req.method.as_str().len()
        + req.uri.path_and_query().map_or(1, |p| p.as_str().len())
        + " HTTP/1.1\r\n".len()
        + 1;
    line as u64 + header_bytes(&req.headers)
}

/// An HTTP/1 rendering's size of a head's header lines.
fn header_bytes(h: &http::HeaderMap) -> u64 {
    h.iter()
        .map(|(k, v)| (k.as_str().len() + v.len() + 4) as u64)
        .sum::<u64>()
        + 2
}

/// Envoy's HTTP status → gRPC status, for a gRPC response without one.
fn grpc_from_http(code: u16) -> u64 {
    match code {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

#[async_trait::async_trait]
impl HttpFilter for IstioStats {
    async fn on_request(&self, rq: &mut RequestInfo<'_>, state: &mut Option<State>) -> Flow {
        *state = Some(Box::new(Stream {
            grpc: rq.grpc,
            peer_san: rq
                .peer_tls
                .map(|p| p.peer_uri().to_string())
                .unwrap_or_default(),
            host: rq.authority().to_string(),
            request_head: request_head(rq.req),
            response_head: AtomicU64::new(0),
            grpc_status: AtomicU64::new(0),
        }));
        Flow::Continue
    }

    fn on_response(
        &self,
        resp: &mut ResponseHeader,
        _info: &ResponseInfo<'_>,
        state: Option<&State>,
    ) {
        let Some(s) = state.and_then(|s| s.downcast_ref::<Stream>()) else {
            return;
        };
        let line = "HTTP/1.1 200 \r\n".len() + resp.get_reason_phrase().map_or(0, str::len);
        s.response_head
            .store(line as u64 + header_bytes(&resp.headers), Ordering::Relaxed);
        if let Some(g) = grpc_status(resp.headers.get("grpc-status")) {
            s.grpc_status.store(g + 1, Ordering::Relaxed);
        }
    }

    fn on_response_trailers(
        &self,
        trailers: &http::HeaderMap,
        state: &mut Option<State>,
    ) -> Option<bytes::Bytes> {
        let s = state.as_ref()?.downcast_ref::<Stream>()?;
        if let Some(g) = grpc_status(trailers.get("grpc-status")) {
            s.grpc_status.store(g + 1, Ordering::Relaxed);
        }
        None
    }

    fn wants_stream_done(&self) -> bool {
        true
    }

    /// Istio's stats count every stream, also those an earlier filter
    /// answered (an RBAC 403, a fault's abort).
    fn logs_every_stream(&self) -> bool {
        true
    }

    fn on_stream_done(&self, done: &StreamDone<'_>, state: Option<&State>) {
        let made;
        let s = match state.and_then(|s| s.downcast_ref::<Stream>()) {
            Some(s) => s,
            None => {
                made = Stream::after(done);
                &made
            }
        };
        let c = &self.0;
        let reporter = c.reporter(done.inbound);
        let peers = done.filter_state.get::<Arc<Peers>>();
        let peer = peers.and_then(|p| match reporter {
            Reporter::Client => p.upstream.get(),
            _ => p.downstream.get(),
        });
        let e = done.entry;
        let cluster = done.clusters.get(e.upstream_cluster);
        let http = e.http.as_ref();
        let facts = Facts {
            reporter,
            peer: peer.map(|p| &**p),
            endpoint: done.host.and_then(|h| h.istio_workload.as_deref()),
            host: (!c.disable_host_header_fallback).then_some(s.host.as_str()),
            route_name: http.map_or("", |h| h.route_name),
            cluster: cluster.as_deref(),
            cluster_name: e.upstream_cluster,
            peer_san: &s.peer_san,
        };
        let mut labels = peer_labels(&c.local, &facts);
        let code = http.map_or(0, |h| h.response_code);
        let grpc_status = match s.grpc_status.load(Ordering::Relaxed) {
            _ if !s.grpc => String::new(),
            0 => grpc_from_http(code).to_string(),
            g => (g - 1).to_string(),
        };
        labels.push((
            "request_protocol".into(),
            if s.grpc { "grpc" } else { "http" }.into(),
        ));
        labels.push(("response_code".into(), code.to_string()));
        labels.push(("grpc_response_status".into(), grpc_status));
        labels.push(("response_flags".into(), or(e.response_flags, "-").into()));
        labels.push((
            "connection_security_policy".into(),
            match reporter {
                Reporter::Client => UNKNOWN,
                _ if !s.peer_san.is_empty() => "mutual_tls",
                _ => "none",
            }
            .into(),
        ));
        c.emit("requests_total", &labels, e, Emit::Count(1));
        c.emit(
            "request_duration_milliseconds",
            &labels,
            e,
            Emit::Sample(e.duration.as_millis() as u64),
        );
        c.emit(
            "request_bytes",
            &labels,
            e,
            Emit::Sample(s.request_head + e.bytes_received),
        );
        let response_head = s.response_head.load(Ordering::Relaxed);
        c.emit(
            "response_bytes",
            &labels,
            e,
            Emit::Sample(response_head + e.bytes_sent),
        );
    }
}

fn grpc_status(v: Option<&http::HeaderValue>) -> Option<u64> {
    v?.to_str().ok()?.trim().parse().ok()
}

// ---- TCP ----

/// A TCP connection's reporting: opened when it starts, bytes and closed
/// when it ends.
pub struct TcpReport {
    config: Arc<PluginConfig>,
    labels: OnceLock<Labels>,
}

impl TcpReport {
    pub fn new(config: Arc<PluginConfig>) -> TcpReport {
        TcpReport {
            config,
            labels: OnceLock::new(),
        }
    }

    fn labels(&self, f: &Facts, flags: &str) -> Labels {
        let mut l = peer_labels(&self.config.local, f);
        l.push(("request_protocol".into(), "tcp".into()));
        l.push(("response_flags".into(), or(flags, "-").into()));
        l.push((
            "connection_security_policy".into(),
            match f.reporter {
                Reporter::Client => UNKNOWN,
                _ if !f.peer_san.is_empty() => "mutual_tls",
                _ => "none",
            }
            .into(),
        ));
        l
    }

    pub fn reporter(&self, inbound: bool) -> Reporter {
        self.config.reporter(inbound)
    }

    /// The connection is open and its peer (if any) known.
    pub fn opened(&self, f: &Facts, entry: &crate::access_log::Entry) {
        let l = self.labels.get_or_init(|| self.labels(f, ""));
        self.config
            .emit("tcp_connections_opened_total", l, entry, Emit::Count(1));
    }

    /// The connection ended, having moved these bytes.
    pub fn closed(&self, f: &Facts, entry: &crate::access_log::Entry) {
        let l = self.labels(f, entry.response_flags);
        if self.labels.get().is_none() {
            self.config
                .emit("tcp_connections_opened_total", &l, entry, Emit::Count(1));
        }
        let c = &self.config;
        c.emit(
            "tcp_received_bytes_total",
            &l,
            entry,
            Emit::Count(entry.bytes_received),
        );
        c.emit(
            "tcp_sent_bytes_total",
            &l,
            entry,
            Emit::Count(entry.bytes_sent),
        );
        c.emit("tcp_connections_closed_total", &l, entry, Emit::Count(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> Local {
        Local {
            workload: "reviews-v1".into(),
            namespace: "legate".into(),
            cluster: "Kubernetes".into(),
            app: "reviews".into(),
            version: "v1".into(),
            canonical_name: "reviews".into(),
            canonical_revision: "v1".into(),
        }
    }

    fn get<'a>(l: &'a Labels, k: &str) -> &'a str {
        l.iter().find(|(n, _)| n == k).map_or("<none>", |(_, v)| v)
    }

    #[test]
    fn server_labels_read_the_peer_and_the_local_node() {
        let peer = Workload {
            workload_name: "productpage-v1".into(),
            namespace: "legate".into(),
            app: "productpage".into(),
            ..Default::default()
        };
        let f = Facts {
            reporter: Reporter::Server,
            peer: Some(&peer),
            endpoint: None,
            host: None,
            route_name: "",
            cluster: None,
            cluster_name: "inbound|19081||",
            peer_san: "",
        };
        let l = peer_labels(&local(), &f);
        assert_eq!(l.len(), 20);
        assert_eq!(get(&l, "reporter"), "destination");
        assert_eq!(get(&l, "source_workload"), "productpage-v1");
        assert_eq!(get(&l, "source_canonical_revision"), "latest");
        assert_eq!(get(&l, "source_version"), "unknown");
        assert_eq!(get(&l, "destination_workload"), "reviews-v1");
        assert_eq!(get(&l, "destination_service"), "reviews");
    }

    #[test]
    fn client_labels_fall_back_to_the_endpoint() {
        let f = Facts {
            reporter: Reporter::Client,
            peer: None,
            endpoint: Some("details-v1;legate;details;;Kubernetes"),
            host: Some("details:18080"),
            route_name: "",
            cluster: None,
            cluster_name: "PassthroughCluster",
            peer_san: "",
        };
        let l = peer_labels(&local(), &f);
        assert_eq!(get(&l, "source_workload"), "reviews-v1");
        assert_eq!(get(&l, "destination_workload"), "details-v1");
        assert_eq!(get(&l, "destination_canonical_revision"), "latest");
        assert_eq!(get(&l, "destination_service"), "details:18080");
        assert_eq!(get(&l, "destination_service_name"), "PassthroughCluster");
        assert_eq!(get(&l, "destination_service_namespace"), "legate");
        assert_eq!(workload_from_endpoint("a;b;c;d"), None);
    }

    #[test]
    fn grpc_status_falls_back_to_envoys_mapping() {
        assert_eq!(grpc_from_http(503), 14);
        assert_eq!(grpc_from_http(200), 2);
    }
}
