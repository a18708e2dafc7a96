//! `envoy.access_loggers.open_telemetry`: each finished request becomes an
//! OTLP `LogRecord` whose body and attributes are the config's `AnyValue`
//! templates with every string formatted as an access log format. Records
//! are batched and sent with `LogsService/Export` over gRPC to a host of
//! the configured cluster, off the request path: a slow or absent
//! collector costs requests nothing (records beyond a bound are dropped
//! and counted).

use super::{Entry, Format};
use crate::cluster_manager::ClusterManager;
use crate::config::{join, ConfigError, Result};
use legate_proto::envoy_types::pb::envoy::extensions::access_loggers::grpc::v3::CommonGrpcAccessLogConfig;
use legate_proto::envoy_types::pb::envoy::extensions::access_loggers::open_telemetry::v3::OpenTelemetryAccessLogConfig;
use legate_proto::envoy_types::pb::opentelemetry::proto::common::v1 as envoy_otel;
use opentelemetry_proto::tonic::collector::logs::v1::{
    logs_service_client::LogsServiceClient, ExportLogsServiceRequest,
};
use opentelemetry_proto::tonic::common::v1::{
    any_value, AnyValue, ArrayValue, KeyValue, KeyValueList,
};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

/// Envoy's defaults for `buffer_flush_interval` and `buffer_size_bytes`.
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
const BUFFER_BYTES: usize = 16 * 1024;
/// Records waiting for the exporter task; beyond this they are dropped.
const QUEUE: usize = 4096;
/// A call without `grpc_service.timeout` still ends (Envoy's has no
/// deadline; a collector that never answers must not hold batches forever).
const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
const STATS: &str = "access_logs.open_telemetry_access_log";

/// A body or attribute value: strings are formats, lists and arrays nest.
#[derive(Debug, Clone, PartialEq)]
enum Template {
    Text(Format),
    List(Vec<(String, Template)>),
    Array(Vec<Template>),
}

impl Template {
    fn from_any(v: &envoy_otel::AnyValue, path: &str) -> Result<Self> {
        use envoy_otel::any_value::Value as V;
        match &v.value {
            Some(V::StringValue(s)) => Ok(Self::Text(Format::parse(s, path)?)),
            Some(V::KvlistValue(l)) => Self::from_list(l, path),
            Some(V::ArrayValue(a)) => a
                .values
                .iter()
                .enumerate()
                .map(|(i, v)| Self::from_any(v, &format!("{path}[{i}]")))
                .collect::<Result<_>>()
                .map(Self::Array),
            _ => Err(ConfigError::new(
                path,
                "only string values, key value lists and arrays are allowed in an OpenTelemetry access log format (as in Envoy)",
            )),
        }
    }

    fn from_list(l: &envoy_otel::KeyValueList, path: &str) -> Result<Self> {
        let mut out = Vec::with_capacity(l.values.len());
        for (i, kv) in l.values.iter().enumerate() {
            let p = format!("{path}.values[{i}].value");
            let v = kv.value.clone().unwrap_or_default();
            out.push((kv.key.clone(), Self::from_any(&v, &p)?));
        }
        Ok(Self::List(out))
    }

    fn render(&self, e: &Entry) -> AnyValue {
        let value = match self {
            Self::Text(f) => any_value::Value::StringValue(f.render(e)),
            Self::List(kvs) => any_value::Value::KvlistValue(KeyValueList {
                values: render_list(kvs, e),
            }),
            Self::Array(vs) => any_value::Value::ArrayValue(ArrayValue {
                values: vs.iter().map(|v| v.render(e)).collect(),
            }),
        };
        AnyValue { value: Some(value) }
    }
}

fn render_list(kvs: &[(String, Template)], e: &Entry) -> Vec<KeyValue> {
    kvs.iter()
        .map(|(k, v)| KeyValue {
            key: k.clone(),
            value: Some(v.render(e)),
            ..Default::default()
        })
        .collect()
}

/// Where and how records are sent.
#[derive(Debug)]
struct Target {
    to: crate::otlp::Destination,
    flush_interval: Duration,
    buffer_bytes: usize,
    /// The resource every batch carries (built-in labels first).
    resource: Resource,
}

/// One configured OpenTelemetry access log: its templates (config) and,
/// once the first record arrives, the exporter task fed through a queue
/// (live state, ended when the config is dropped).
#[derive(Debug)]
pub struct Logger {
    body: Option<Template>,
    attributes: Vec<(String, Template)>,
    target: Arc<Target>,
    queue: OnceLock<mpsc::Sender<LogRecord>>,
}

impl Logger {
    pub fn from_proto(c: &OpenTelemetryAccessLogConfig, path: &str) -> Result<Self> {
        let common = c.common_config.clone().unwrap_or_default();
        check_common(&common, &join(path, "common_config"))?;
        super::formatters(&c.formatters, &join(path, "formatters"))?;
        let (grpc, grpc_path) = match &c.grpc_service {
            Some(g) => (g.clone(), join(path, "grpc_service")),
            None => (
                common.grpc_service.clone().unwrap_or_default(),
                join(path, "common_config.grpc_service"),
            ),
        };
        let cluster = crate::config::grpc_service_cluster(&grpc, &grpc_path)?;
        if grpc.retry_policy.is_some() {
            return Err(ConfigError::new(
                join(&grpc_path, "retry_policy"),
                "retries of access log exports are not supported",
            ));
        }
        let log_name = if c.log_name.is_empty() {
            common.log_name.clone()
        } else {
            c.log_name.clone()
        };
        let body = match &c.body {
            Some(b) if b.value.is_some() => Some(Template::from_any(b, &join(path, "body"))?),
            _ => None,
        };
        let attributes = match Template::from_list(
            &c.attributes.clone().unwrap_or_default(),
            &join(path, "attributes"),
        )? {
            Template::List(kvs) => kvs,
            _ => Vec::new(),
        };
        let target = Target {
            to: crate::otlp::Destination::new(
                cluster,
                crate::http_filters::side::Channels::new(&crate::config::grpc_service_authority(
                    &grpc,
                )),
                crate::http_filters::side::Metadata::from_service(&grpc, &grpc_path)?,
                grpc.timeout
                    .as_ref()
                    .and_then(|d| crate::config::duration(d, &join(&grpc_path, "timeout")).ok())
                    .filter(|d| !d.is_zero())
                    .unwrap_or(DEFAULT_CALL_TIMEOUT),
            ),
            flush_interval: c
                .buffer_flush_interval
                .or(common.buffer_flush_interval)
                .and_then(|d| crate::config::duration(&d, path).ok())
                .filter(|d| !d.is_zero())
                .unwrap_or(FLUSH_INTERVAL),
            buffer_bytes: c
                .buffer_size_bytes
                .or(common.buffer_size_bytes)
                .map_or(BUFFER_BYTES, |b| b.value as usize),
            resource: resource(c, &log_name),
        };
        Ok(Self {
            body,
            attributes,
            target: Arc::new(target),
            queue: OnceLock::new(),
        })
    }

    /// Formats the record now (the entry borrows the request) and queues
    /// it; never waits.
    pub fn log(&self, e: &Entry, clusters: &Arc<ClusterManager>) {
        let record = LogRecord {
            time_unix_nano: e
                .start
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            body: self.body.as_ref().map(|b| b.render(e)),
            attributes: render_list(&self.attributes, e),
            // Envoy names the request's span, when it has one.
            trace_id: e.trace.map(|t| t.0.to_vec()).unwrap_or_default(),
            span_id: e.trace.map(|t| t.1.to_vec()).unwrap_or_default(),
            ..Default::default()
        };
        let queue = self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            let (target, clusters) = (self.target.clone(), clusters.clone());
            tokio::spawn(crate::otlp::batch_loop(
                rx,
                self.target.flush_interval,
                crate::otlp::Limit::Bytes(self.target.buffer_bytes),
                move |batch| send(batch, &target, &clusters),
            ));
            tx
        });
        if queue.try_send(record).is_err() {
            crate::stats::counter(format!("{STATS}.logs_dropped")).increment(1);
        }
    }
}

/// `common_config` fields Envoy's OpenTelemetry logger reads; the rest
/// belong to the streaming gRPC logger and are refused here.
fn check_common(c: &CommonGrpcAccessLogConfig, path: &str) -> Result<()> {
    use legate_proto::envoy_types::pb::envoy::config::core::v3::ApiVersion;
    if c.transport_api_version != ApiVersion::V3 as i32 {
        return Err(ConfigError::new(
            join(path, "transport_api_version"),
            "only V3 is supported (as in Envoy)",
        ));
    }
    Ok(())
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

/// Envoy's resource: the built-in labels (unless disabled), then
/// `resource_attributes`, a later key replacing an earlier one in place.
fn resource(c: &OpenTelemetryAccessLogConfig, log_name: &str) -> Resource {
    let mut attrs: Vec<KeyValue> = Vec::new();
    if !c.disable_builtin_labels {
        let node = crate::config::local_node();
        attrs.push(string_kv("log_name", log_name));
        attrs.push(string_kv("zone_name", &node.zone));
        attrs.push(string_kv("cluster_name", &node.cluster));
        attrs.push(string_kv("node_name", &node.id));
    }
    for kv in c.resource_attributes.iter().flat_map(|l| &l.values) {
        // The same message on the wire: re-read as the exporter's type.
        let Ok(kv) = KeyValue::decode(kv.encode_to_vec().as_slice()) else {
            continue;
        };
        match attrs.iter_mut().find(|a| a.key == kv.key) {
            Some(a) => *a = kv,
            None => attrs.push(kv),
        }
    }
    Resource {
        attributes: attrs,
        ..Default::default()
    }
}

fn send(records: Vec<LogRecord>, target: &Arc<Target>, clusters: &Arc<ClusterManager>) {
    let n = records.len() as u64;
    let message = ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(target.resource.clone()),
            scope_logs: vec![ScopeLogs {
                log_records: records,
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    target.to.send(
        clusters,
        n,
        message,
        (STATS, "logs_written", "logs_dropped"),
        |channel, request| async move { LogsServiceClient::new(channel).export(request).await },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use legate_proto::envoy_types::pb::envoy::config::core::v3 as core;

    fn text(s: &str) -> envoy_otel::AnyValue {
        envoy_otel::AnyValue {
            value: Some(envoy_otel::any_value::Value::StringValue(s.into())),
        }
    }

    fn kv(k: &str, v: envoy_otel::AnyValue) -> envoy_otel::KeyValue {
        envoy_otel::KeyValue {
            key: k.into(),
            value: Some(v),
            ..Default::default()
        }
    }

    fn config() -> OpenTelemetryAccessLogConfig {
        OpenTelemetryAccessLogConfig {
            common_config: Some(CommonGrpcAccessLogConfig {
                log_name: "otel".into(),
                transport_api_version: core::ApiVersion::V3 as i32,
                grpc_service: Some(core::GrpcService {
                    target_specifier: Some(core::grpc_service::TargetSpecifier::EnvoyGrpc(
                        core::grpc_service::EnvoyGrpc {
                            cluster_name: "collector".into(),
                            ..Default::default()
                        },
                    )),
                    initial_metadata: vec![core::HeaderValue {
                        key: "X-Tenant".into(),
                        value: "a".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            body: Some(text("%UPSTREAM_CLUSTER% %BYTES_SENT%")),
            attributes: Some(envoy_otel::KeyValueList {
                values: vec![
                    kv("code", text("%RESPONSE_CODE%")),
                    kv(
                        "nested",
                        envoy_otel::AnyValue {
                            value: Some(envoy_otel::any_value::Value::ArrayValue(
                                envoy_otel::ArrayValue {
                                    values: vec![text("%DURATION%"), text("literal")],
                                },
                            )),
                        },
                    ),
                ],
            }),
            resource_attributes: Some(envoy_otel::KeyValueList {
                values: vec![
                    kv("cluster_name", text("overridden")),
                    kv(
                        "n",
                        envoy_otel::AnyValue {
                            value: Some(envoy_otel::any_value::Value::IntValue(7)),
                        },
                    ),
                ],
            }),
            ..Default::default()
        }
    }

    fn string(v: &AnyValue) -> &str {
        match &v.value {
            Some(any_value::Value::StringValue(s)) => s,
            other => panic!("not a string: {other:?}"),
        }
    }

    #[test]
    fn body_and_attributes_are_formatted_and_nested_values_kept() {
        let l = Logger::from_proto(&config(), "c").unwrap();
        let e = super::super::tests::entry();
        assert_eq!(string(&l.body.as_ref().unwrap().render(&e)), "echo 20");
        let attrs = render_list(&l.attributes, &e);
        assert_eq!(attrs[0].key, "code");
        assert_eq!(string(attrs[0].value.as_ref().unwrap()), "0");
        let Some(any_value::Value::ArrayValue(a)) = &attrs[1].value.as_ref().unwrap().value else {
            panic!("not an array")
        };
        assert_eq!(string(&a.values[0]), "1234");
        assert_eq!(string(&a.values[1]), "literal");
        assert_eq!(l.target.to.cluster, "collector");
        let r = l.target.to.metadata.request(());
        assert_eq!(r.metadata().get("x-tenant").unwrap(), "a");
        assert_eq!(l.target.flush_interval, FLUSH_INTERVAL);
        assert_eq!(l.target.buffer_bytes, BUFFER_BYTES);
    }

    #[test]
    fn the_resource_has_the_builtin_labels_then_the_configured_ones_replacing_in_place() {
        let l = Logger::from_proto(&config(), "c").unwrap();
        let keys: Vec<&str> = l
            .target
            .resource
            .attributes
            .iter()
            .map(|a| a.key.as_str())
            .collect();
        assert_eq!(
            keys,
            ["log_name", "zone_name", "cluster_name", "node_name", "n"]
        );
        assert_eq!(
            string(l.target.resource.attributes[0].value.as_ref().unwrap()),
            "otel"
        );
        assert_eq!(
            string(l.target.resource.attributes[2].value.as_ref().unwrap()),
            "overridden"
        );
        let mut c = config();
        c.disable_builtin_labels = true;
        let l = Logger::from_proto(&c, "c").unwrap();
        assert_eq!(l.target.resource.attributes.len(), 2);
    }

    #[test]
    fn other_value_types_in_a_format_and_old_api_versions_are_refused_naming_the_field() {
        let mut c = config();
        c.body = Some(envoy_otel::AnyValue {
            value: Some(envoy_otel::any_value::Value::BoolValue(true)),
        });
        let e = Logger::from_proto(&c, "c").unwrap_err();
        assert!(e.to_string().contains("c.body"), "{e}");
        let mut c = config();
        c.common_config.as_mut().unwrap().transport_api_version = 0;
        let e = Logger::from_proto(&c, "c").unwrap_err();
        assert!(e.to_string().contains("transport_api_version"), "{e}");
    }
}
