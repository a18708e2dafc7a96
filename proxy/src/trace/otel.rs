//! The OpenTelemetry tracer's spans: each traced request's span, with the
//! tags Envoy's connection manager gives it, batched and sent with
//! `TraceService/Export` over gRPC to a host of the configured cluster, off
//! the request path (a slow or absent collector costs requests nothing;
//! spans beyond a bound are dropped and counted).

use super::span::{nanos, request_tags, upstream_tags, upstream_times, SpanFacts, UpstreamSpan};
use crate::cluster_manager::ClusterManager;
use crate::config::{join, ConfigError, Result};
use legate_proto::envoy_types::pb::envoy::config::trace::v3::OpenTelemetryConfig;
use opentelemetry_proto::tonic::collector::trace::v1::{
    trace_service_client::TraceServiceClient, ExportTraceServiceRequest,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    span::SpanKind, status::StatusCode, ResourceSpans, ScopeSpans, Span, Status,
};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;

/// Envoy's span flush interval and its `max_cache_size` default.
const FLUSH_INTERVAL: Duration = Duration::from_secs(5);
const MAX_CACHE: usize = 1024;
/// Spans waiting for the exporter task; beyond this they are dropped.
const QUEUE: usize = 8192;
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const STATS: &str = "tracing.opentelemetry";
/// W3C span flags: the parent's remoteness is known, and it is remote.
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

/// Where spans go.
#[derive(Debug)]
struct Target {
    to: crate::otlp::Destination,
    max_cache: usize,
    resource: Resource,
}

/// A provider's exporter: its target (config) and, once the first span
/// arrives, the batching task fed through a queue (live state).
#[derive(Debug)]
pub struct Exporter {
    target: Arc<Target>,
    queue: OnceLock<mpsc::Sender<Span>>,
}

fn string_kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

/// What the exporter reports as itself: Legate, not Envoy.
fn sdk_version() -> String {
    format!("legate/{}", env!("CARGO_PKG_VERSION"))
}

impl Exporter {
    /// The exporter of `grpc_service`, if the config names one.
    pub fn from_proto(c: &OpenTelemetryConfig, path: &str) -> Result<Option<Arc<Self>>> {
        let Some(grpc) = &c.grpc_service else {
            return Ok(None);
        };
        let gp = join(path, "grpc_service");
        let cluster = crate::config::grpc_service_cluster(grpc, &gp)?;
        if grpc.retry_policy.is_some() {
            return Err(ConfigError::new(
                join(&gp, "retry_policy"),
                "retries of span exports are not supported",
            ));
        }
        let service = if c.service_name.is_empty() {
            "unknown_service:envoy"
        } else {
            c.service_name.as_str()
        };
        let mut attributes = vec![
            string_kv("telemetry.sdk.name", "legate"),
            string_kv("service.name", service),
            string_kv("telemetry.sdk.language", "rust"),
            string_kv("telemetry.sdk.version", &sdk_version()),
        ];
        // What the detectors find is merged over those, a detected
        // service.name included (as Envoy merges them).
        for (i, d) in c.resource_detectors.iter().enumerate() {
            let dp = crate::config::index(path, "resource_detectors", i);
            for (k, v) in detected(d, &dp)? {
                match attributes.iter_mut().find(|a| a.key == k) {
                    Some(a) => *a = string_kv(&k, &v),
                    None => attributes.push(string_kv(&k, &v)),
                }
            }
        }
        let target = Target {
            to: crate::otlp::Destination::new(
                cluster,
                crate::http_filters::side::Channels::new(&crate::config::grpc_service_authority(
                    grpc,
                )),
                crate::http_filters::side::Metadata::from_service(grpc, &gp)?,
                grpc.timeout
                    .as_ref()
                    .and_then(|d| crate::config::duration(d, &join(&gp, "timeout")).ok())
                    .filter(|d| !d.is_zero())
                    .unwrap_or(CALL_TIMEOUT),
            ),
            max_cache: c
                .max_cache_size
                .as_ref()
                .map_or(MAX_CACHE, |m| m.value as usize)
                .max(1),
            resource: Resource {
                attributes,
                ..Default::default()
            },
        };
        Ok(Some(Arc::new(Self {
            target: Arc::new(target),
            queue: OnceLock::new(),
        })))
    }

    /// Queues a finished span; never waits.
    pub fn export(&self, span: Span, clusters: &Arc<ClusterManager>) {
        let queue = self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            let (target, clusters) = (self.target.clone(), clusters.clone());
            tokio::spawn(crate::otlp::batch_loop(
                rx,
                FLUSH_INTERVAL,
                crate::otlp::Limit::Items(self.target.max_cache),
                move |batch| send(batch, &target, &clusters),
            ));
            tx
        });
        if queue.try_send(span).is_err() {
            crate::stats::counter(format!("{STATS}.spans_dropped")).increment(1);
        }
    }
}

/// A resource detector's attributes: the static config's, or the
/// environment's `OTEL_RESOURCE_ATTRIBUTES` (`k=v,k=v`).
fn detected(
    d: &legate_proto::envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig,
    path: &str,
) -> Result<Vec<(String, String)>> {
    use legate_proto::envoy_types::pb::envoy::extensions::tracers::opentelemetry::resource_detectors::v3 as rd;
    let a = d
        .typed_config
        .as_ref()
        .ok_or_else(|| ConfigError::new(join(path, "typed_config"), "typed_config is required"))?;
    match legate_proto::type_name(&a.type_url) {
        "envoy.extensions.tracers.opentelemetry.resource_detectors.v3.StaticConfigResourceDetectorConfig" => {
            let c: rd::StaticConfigResourceDetectorConfig =
                crate::http_filters::decode(a, &join(path, "typed_config"))?;
            let mut out: Vec<(String, String)> = c.attributes.into_iter().collect();
            out.sort();
            Ok(out)
        }
        "envoy.extensions.tracers.opentelemetry.resource_detectors.v3.EnvironmentResourceDetectorConfig" => {
            Ok(std::env::var("OTEL_RESOURCE_ATTRIBUTES")
                .unwrap_or_default()
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect())
        }
        other => {
            // Span resource attributes only: no traffic changes.
            tracing::warn!("{path}: resource detector {other} is not supported by Legate; its attributes are left out");
            Ok(Vec::new())
        }
    }
}

fn send(spans: Vec<Span>, target: &Arc<Target>, clusters: &Arc<ClusterManager>) {
    let n = spans.len() as u64;
    let message = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(target.resource.clone()),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "legate".into(),
                    version: sdk_version(),
                    ..Default::default()
                }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    target.to.send(
        clusters,
        n,
        message,
        (STATS, "spans_sent", "spans_dropped"),
        |channel, request| async move { TraceServiceClient::new(channel).export(request).await },
    );
}

/// An upstream attempt's span, as Envoy's router makes it
/// (`router <cluster> egress`, a client span under the request's).
pub fn upstream_span(f: &SpanFacts, u: &UpstreamSpan) -> Span {
    let tags = upstream_tags(f, u);
    let c = f.context;
    let (start, end) = upstream_times(f, u);
    Span {
        trace_id: c.trace_id().to_vec(),
        span_id: u.id.to_be_bytes().to_vec(),
        trace_state: c.tracestate().to_string(),
        parent_span_id: c.span_id().to_be_bytes().to_vec(),
        flags: u32::from(c.sampled()) | HAS_IS_REMOTE,
        name: format!("router {} egress", u.cluster),
        kind: SpanKind::Client as i32,
        start_time_unix_nano: start,
        end_time_unix_nano: end,
        attributes: tags.iter().map(|(k, v)| string_kv(k, v)).collect(),
        status: (u.status >= 500).then(|| Status {
            code: StatusCode::Error as i32,
            message: String::new(),
        }),
        ..Default::default()
    }
}

/// A finished request's span.
pub fn request_span(f: &SpanFacts) -> Span {
    let e = f.entry;
    let (tags, error) = request_tags(f);
    let c = f.context;
    let mut flags = u32::from(c.sampled()) | HAS_IS_REMOTE;
    if c.parent_id().is_some() {
        flags |= IS_REMOTE;
    }
    let start = nanos(e.start);
    Span {
        trace_id: c.trace_id().to_vec(),
        span_id: c.span_id().to_be_bytes().to_vec(),
        trace_state: c.tracestate().to_string(),
        parent_span_id: c
            .parent_id()
            .map(|p| p.to_be_bytes().to_vec())
            .unwrap_or_default(),
        flags,
        name: f
            .operation
            .unwrap_or(if f.ingress { "ingress" } else { "egress" })
            .to_string(),
        kind: if f.ingress {
            SpanKind::Server as i32
        } else {
            SpanKind::Client as i32
        },
        start_time_unix_nano: start,
        end_time_unix_nano: start + e.duration.as_nanos() as u64,
        attributes: tags.iter().map(|(k, v)| string_kv(k, v)).collect(),
        // Envoy's tracer turns the error tag into the span's status.
        status: error.then(|| Status {
            code: StatusCode::Error as i32,
            message: String::new(),
        }),
        ..Default::default()
    }
}
