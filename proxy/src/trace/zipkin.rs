//! The Zipkin tracer's spans: each traced request's span and its upstream
//! attempts' as Zipkin v2 JSON, batched and POSTed to the collector
//! cluster's `collector_endpoint` off the request path (a slow or absent
//! collector costs requests nothing; spans beyond a bound are dropped and
//! counted).

use super::span::{request_tags, upstream_tags, upstream_times, SpanFacts, UpstreamSpan};
use crate::cluster_manager::ClusterManager;
use crate::config::{join, ConfigError, Result, Wrapped};
use bytes::Bytes;
use legate_proto::envoy_types::pb::envoy::config::trace::v3::ZipkinConfig;
use serde_json::{json, Map, Value};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;

/// Envoy's runtime defaults: `tracing.zipkin.flush_interval_ms`,
/// `tracing.zipkin.min_flush_spans`, `tracing.zipkin.request_timeout`.
const FLUSH_INTERVAL: Duration = Duration::from_secs(5);
const MIN_FLUSH_SPANS: usize = 5;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const QUEUE: usize = 8192;
const STATS: &str = "tracing.zipkin";

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<Bytes>,
>;

#[derive(Debug)]
struct Target {
    cluster: String,
    endpoint: String,
    /// The Host of the reports: `collector_hostname`, else the cluster.
    hostname: String,
    client: Client,
    /// `shared_span_context`: server spans are marked shared.
    shared: bool,
}

/// A provider's exporter: its target and, once the first span arrives, the
/// batching task fed through a queue.
#[derive(Debug)]
pub struct Exporter {
    target: Arc<Target>,
    queue: OnceLock<mpsc::Sender<Value>>,
}

impl Exporter {
    /// The exporter of `collector_cluster`, if the config names one.
    pub fn from_proto(z: &ZipkinConfig, path: &str) -> Result<Option<Arc<Self>>> {
        if z.collector_cluster.is_empty() {
            return Ok(None);
        }
        use legate_proto::envoy_types::pb::envoy::config::trace::v3::zipkin_config::CollectorEndpointVersion as V;
        if V::try_from(z.collector_endpoint_version) != Ok(V::HttpJson) {
            return Err(ConfigError::new(
                join(path, "collector_endpoint_version"),
                "only HTTP_JSON is supported by Legate",
            ));
        }
        if z.collector_endpoint.is_empty() || !z.collector_endpoint.starts_with('/') {
            return Err(ConfigError::new(
                join(path, "collector_endpoint"),
                "a path is required",
            ));
        }
        let hostname = if z.collector_hostname.is_empty() {
            z.collector_cluster.clone()
        } else {
            z.collector_hostname.clone()
        };
        Ok(Some(Arc::new(Self {
            target: Arc::new(Target {
                cluster: z.collector_cluster.clone(),
                endpoint: z.collector_endpoint.clone(),
                hostname,
                shared: z.shared_span_context.val().unwrap_or(true),
                client: hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .build_http(),
            }),
            queue: OnceLock::new(),
        })))
    }

    /// A finished request's span: named by the request's host unless a
    /// decorator (or the client) names its operation; a server span is
    /// marked shared with `shared_span_context`, as Envoy marks it.
    pub fn request_span(&self, f: &SpanFacts) -> Value {
        let e = f.entry;
        let c = f.context;
        let (tags, _) = request_tags(f);
        let start = super::span::nanos(e.start) / 1000;
        let duration = e.duration.as_micros() as u64;
        let host = e.http.as_ref().map_or("", |h| h.pseudo.authority);
        let kind = if f.ingress { "SERVER" } else { "CLIENT" };
        let mut s = json!({
            "traceId": hex_trace(f),
            "name": f.operation.unwrap_or(host),
            "id": format!("{:016x}", c.span_id()),
            "kind": kind,
            "timestamp": start,
            "duration": duration,
            "localEndpoint": local_endpoint(),
            "tags": tags_object(tags),
            "annotations": [finish_annotation(f.ingress, start + duration)],
        });
        if let Some(p) = c.parent_id() {
            s["parentId"] = Value::String(format!("{p:016x}"));
        }
        if self.target.shared && f.ingress {
            s["shared"] = Value::Bool(true);
        }
        s
    }

    /// Queues a finished span; never waits.
    pub fn export(&self, span: Value, clusters: &Arc<ClusterManager>) {
        let queue = self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Value>(QUEUE);
            let (target, clusters) = (self.target.clone(), clusters.clone());
            tokio::spawn(batch(rx, target, clusters));
            tx
        });
        if queue.try_send(span).is_err() {
            crate::stats::counter(format!("{STATS}.spans_dropped")).increment(1);
        }
    }
}

/// Batches spans and reports them every flush interval, or as soon as the
/// minimum is reached, as Envoy's Zipkin driver does.
async fn batch(mut rx: mpsc::Receiver<Value>, target: Arc<Target>, clusters: Arc<ClusterManager>) {
    let mut spans = Vec::new();
    let mut tick = tokio::time::interval(FLUSH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let flush = tokio::select! {
            s = rx.recv() => match s {
                Some(s) => {
                    spans.push(s);
                    spans.len() >= MIN_FLUSH_SPANS
                }
                None => {
                    report(std::mem::take(&mut spans), &target, &clusters);
                    return;
                }
            },
            _ = tick.tick() => true,
        };
        if flush && !spans.is_empty() {
            report(std::mem::take(&mut spans), &target, &clusters);
        }
    }
}

fn report(spans: Vec<Value>, target: &Arc<Target>, clusters: &Arc<ClusterManager>) {
    if spans.is_empty() {
        return;
    }
    let n = spans.len() as u64;
    let count = move |name: &str| crate::stats::counter(format!("{STATS}.{name}")).increment(n);
    let Some(addr) = crate::http_filters::side::plaintext_host(clusters, &target.cluster) else {
        return count("spans_dropped");
    };
    let body = Value::Array(spans).to_string();
    let request = http::Request::post(format!("http://{addr}{}", target.endpoint))
        .header(http::header::HOST, target.hostname.as_str())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(Bytes::from(body)));
    let Ok(request) = request else {
        return count("spans_dropped");
    };
    let client = target.client.clone();
    tokio::spawn(async move {
        let name = match tokio::time::timeout(REQUEST_TIMEOUT, client.request(request)).await {
            Ok(Ok(r)) if r.status().is_success() => "spans_sent",
            _ => "spans_dropped",
        };
        count(name);
    });
}

fn hex_trace(f: &SpanFacts) -> String {
    let id = f.context.trace_id();
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    if f.context.wide() {
        hex
    } else {
        hex[16..].to_string()
    }
}

fn tags_object(tags: Vec<(&str, String)>) -> Value {
    let mut m = Map::new();
    for (k, v) in tags {
        m.insert(k.to_string(), Value::String(v));
    }
    Value::Object(m)
}

/// The span's end as Zipkin v1 annotates it: `ss` (server send) or `cr`
/// (client receive), which Envoy still writes.
fn finish_annotation(server: bool, micros: u64) -> Value {
    json!({ "timestamp": micros, "value": if server { "ss" } else { "cr" } })
}

/// This proxy as Zipkin's local endpoint: the node's cluster, and the
/// host's first IPv4 address that is not a loopback one (else loopback),
/// as Envoy's local address is found.
fn local_endpoint() -> Value {
    static IPV4: OnceLock<String> = OnceLock::new();
    let ip = IPV4.get_or_init(|| {
        nix::ifaddrs::getifaddrs()
            .ok()
            .into_iter()
            .flatten()
            .filter_map(|i| i.address?.as_sockaddr_in().map(|a| a.ip()))
            .find(|ip| !ip.is_loopback())
            .unwrap_or(std::net::Ipv4Addr::LOCALHOST)
            .to_string()
    });
    json!({
        "serviceName": crate::config::local_node().cluster,
        "ipv4": ip,
        "port": 0,
    })
}

/// An upstream attempt's span.
pub fn upstream_span(f: &SpanFacts, u: &UpstreamSpan) -> Value {
    let (start, end) = upstream_times(f, u);
    let (start, end) = (start / 1000, end / 1000);
    json!({
        "traceId": hex_trace(f),
        "name": format!("router {} egress", u.cluster),
        "id": format!("{:016x}", u.id),
        "parentId": format!("{:016x}", f.context.span_id()),
        "kind": "CLIENT",
        "timestamp": start,
        "duration": end - start,
        "localEndpoint": local_endpoint(),
        "tags": tags_object(upstream_tags(f, u)),
        "annotations": [finish_annotation(false, end)],
    })
}
