//! The http tier's OpenTelemetry access log check: the same requests
//! through Envoy, then Legate, each exporting OTLP log records over gRPC
//! to a real collector (`legate_tests::otlp`); compared are the call's
//! metadata, the resource, and every record's body and attributes (the
//! records sorted, since batching may differ; times compared by being
//! within a minute of now). The requests carry a sampled trace context, so
//! each record names its trace.

use crate::proxies::{self, Binaries, Kind};
use crate::report::{Outcome, Report};
use anyhow::Result;
use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, KeyValue};
use std::time::{Duration, SystemTime};

const REQUESTS: [(&str, &str); 3] = [
    ("GET", "/echo/a"),
    ("POST", "/echo/b?q=1"),
    ("GET", "/local"),
];
/// Requests whose spans are compared too: (method, path, extra curl
/// arguments); none carries a client trace context, so the proxy starts
/// one (random sampling is 100 %).
const TRACED: [(&str, &str, &[&str]); 3] = [
    ("GET", "/dead", &[]),
    (
        "GET",
        "/decorated/x",
        &["-H", "x-envoy-downstream-service-cluster: client-svc"],
    ),
    (
        "GET",
        "/echo/named",
        &["-H", "x-envoy-decorator-operation: client-op"],
    ),
];
/// A sampled W3C context: the records name its trace (and a span of the
/// proxy's own).
const TRACEPARENT: &str = "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
const CLIENT_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN: &str = "b7ad6b7169203331";
/// Spans expected: one per request, and one per upstream attempt of the
/// five that go upstream (spawn_upstream_span).
const SPANS: usize = REQUESTS.len() + TRACED.len() + 5;

fn bootstrap(admin: u16, port: u16, echo: u16, collector: u16) -> String {
    let logger = r#"{name: envoy.access_loggers.open_telemetry, typed_config: {"@type": type.googleapis.com/envoy.extensions.access_loggers.open_telemetry.v3.OpenTelemetryAccessLogConfig,
            common_config: {log_name: otel_conformance, transport_api_version: V3, buffer_flush_interval: 0.2s,
              grpc_service: {envoy_grpc: {cluster_name: collector, authority: otel-collector.example}, initial_metadata: [{key: x-tenant, value: legate-conformance}]}},
            resource_attributes: {values: [{key: cluster_name, value: {string_value: replaced}}, {key: region, value: {string_value: r1}}, {key: shards, value: {int_value: 3}}]},
            body: {string_value: "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL% %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %UPSTREAM_CLUSTER% %UPSTREAM_HOST% %REQ(X-ABSENT)%"},
            attributes: {values: [
              {key: code, value: {string_value: "%RESPONSE_CODE%"}},
              {key: home, value: {string_value: "%ENVIRONMENT(HOME)%"}},
              {key: route, value: {string_value: "%ROUTE_NAME%"}},
              {key: details, value: {string_value: "%RESPONSE_CODE_DETAILS%"}},
              {key: request, value: {kvlist_value: {values: [{key: authority, value: {string_value: "%REQ(:AUTHORITY)%"}}, {key: agent, value: {string_value: "%REQ(USER-AGENT)%"}}]}}},
              {key: list, value: {array_value: {values: [{string_value: "%REQ(:METHOD)%"}, {string_value: "literal"}]}}}]}}}"#;
    format!(
        r#"node: {{id: node-1, cluster: service-1, locality: {{zone: zone-1}}}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
static_resources:
  listeners:
  - name: otel
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: hcm
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: otel
          tracing:
            spawn_upstream_span: true
            custom_tags:
            - {{tag: lit, literal: {{value: fixed}}}}
            - {{tag: env, environment: {{name: HOME, default_value: none}}}}
            - {{tag: env-missing, environment: {{name: LEGATE_NO_SUCH_VAR, default_value: fallback}}}}
            - {{tag: hdr, request_header: {{name: x-custom, default_value: no-header}}}}
            provider:
              name: envoy.tracers.opentelemetry
              typed_config:
                "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
                grpc_service: {{envoy_grpc: {{cluster_name: collector}}}}
                service_name: conformance
                resource_detectors:
                - name: envoy.tracers.opentelemetry.resource_detectors.static_config
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.tracers.opentelemetry.resource_detectors.v3.StaticConfigResourceDetectorConfig
                    attributes: {{deployment.environment: test, service.name: detected-name, service.version: v1}}
          access_log: [{logger}]
          route_config:
            virtual_hosts: [{{name: v, domains: ["*"], routes: [
              {{name: to-echo, match: {{prefix: "/echo"}}, route: {{cluster: echo}}}},
              {{name: dead, match: {{prefix: "/dead"}}, route: {{cluster: dead}}}},
              {{name: decorated, match: {{prefix: "/decorated"}}, route: {{cluster: echo}}, decorator: {{operation: decorated-op}}}},
              {{name: local, match: {{prefix: "/local"}}, direct_response: {{status: 418}}}}]}}]
          http_filters: [{{name: r, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]
  clusters:
  - {{name: echo, connect_timeout: 1s, load_assignment: {{cluster_name: echo, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {echo}}}}}}}}}]}}]}}}}
  - {{name: dead, connect_timeout: 1s, load_assignment: {{cluster_name: dead, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 1}}}}}}}}]}}]}}}}
  - name: collector
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment: {{cluster_name: collector, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {collector}}}}}}}}}]}}]}}
"#
    )
}

fn show(v: &AnyValue) -> String {
    match &v.value {
        Some(Value::StringValue(s)) => format!("{s:?}"),
        Some(Value::IntValue(n)) => n.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::BytesValue(b)) => format!("bytes({})", b.len()),
        Some(Value::ArrayValue(a)) => {
            format!(
                "[{}]",
                a.values.iter().map(show).collect::<Vec<_>>().join(", ")
            )
        }
        Some(Value::KvlistValue(l)) => format!("{{{}}}", show_kvs(&l.values)),
        Some(Value::StringValueStrindex(i)) => format!("strindex({i})"),
        None => "unset".into(),
    }
}

fn show_kvs(kvs: &[KeyValue]) -> String {
    kvs.iter()
        .map(|kv| {
            format!(
                "{}: {}",
                kv.key,
                kv.value.as_ref().map_or("none".into(), show)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether a record's time is a real timestamp of this run.
fn recent(nanos: u64) -> bool {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    now.saturating_sub(Duration::from_nanos(nanos)) < Duration::from_secs(60)
}

/// What one proxy exported, as comparable lines.
fn exported(c: &legate_tests::otlp::Collector) -> Vec<String> {
    let mut out = Vec::new();
    let mut records = Vec::new();
    for e in c.exports() {
        let tenant: Vec<_> = e
            .metadata
            .iter()
            .filter(|(k, _)| k.starts_with("x-"))
            .collect();
        out.push(format!("call metadata {tenant:?}"));
        for r in &e.request.resource_logs {
            let attrs = r
                .resource
                .as_ref()
                .map(|r| show_kvs(&r.attributes))
                .unwrap_or_default();
            out.push(format!(
                "resource {{{attrs}}} schema_url {:?}",
                r.schema_url
            ));
            for s in &r.scope_logs {
                out.push(format!("scope {:?}", s.scope));
                for l in &s.log_records {
                    records.push(format!(
                        "record time {} observed {} severity {} {:?} flags {} trace_id {} span_id bytes {} body {} attributes {{{}}}",
                        if recent(l.time_unix_nano) { "now".to_string() } else { l.time_unix_nano.to_string() },
                        l.observed_time_unix_nano,
                        l.severity_number,
                        l.severity_text,
                        l.flags,
                        // The trace id is the client's (TRACEPARENT), or
                        // one the proxy made up; the span id is each
                        // proxy's own, random.
                        match hex(&l.trace_id) {
                            t if t == CLIENT_TRACE => t,
                            t => format!("random of {} hex digits", t.len()),
                        },
                        l.span_id.len(),
                        l.body.as_ref().map_or("none".into(), show),
                        show_kvs(&l.attributes)
                    ));
                }
            }
        }
    }
    // Batches may split differently: one line per distinct header.
    out.sort();
    out.dedup();
    records.sort();
    out.extend(records);
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// What one proxy exported as spans, as comparable lines: every span's
/// name, kind, status, attributes and links to its trace (the client's
/// trace id; the parent is the client's span; the span's own id, random,
/// by its length), times by being recent and ordered.
fn exported_spans(c: &legate_tests::otlp::Collector) -> Vec<String> {
    let mut out = Vec::new();
    let mut spans = Vec::new();
    // A parent is the client's span, or one of the proxy's own.
    let own: std::collections::BTreeSet<Vec<u8>> = c
        .trace_exports()
        .iter()
        .flat_map(|e| &e.request.resource_spans)
        .flat_map(|r| &r.scope_spans)
        .flat_map(|s| &s.spans)
        .map(|sp| sp.span_id.clone())
        .collect();
    let parent = |p: &[u8]| match hex(p) {
        h if h.is_empty() || h == CLIENT_SPAN => h,
        _ if own.contains(p) => "a span of the proxy's".to_string(),
        h => format!("unknown {h}"),
    };
    for e in c.trace_exports() {
        for r in &e.request.resource_spans {
            // The SDK attributes name the proxy itself.
            let attrs = r
                .resource
                .as_ref()
                .map(|r| {
                    // Their order carries nothing (Envoy's comes from a
                    // hash map).
                    let mut kept: Vec<KeyValue> = r
                        .attributes
                        .iter()
                        .map(|kv| {
                            let mut kv = kv.clone();
                            if kv.key.starts_with("telemetry.sdk.") {
                                kv.value = None;
                            }
                            kv
                        })
                        .collect();
                    kept.sort_by(|a, b| a.key.cmp(&b.key));
                    show_kvs(&kept)
                })
                .unwrap_or_default();
            out.push(format!(
                "span resource {{{attrs}}} schema_url {:?}",
                r.schema_url
            ));
            for s in &r.scope_spans {
                // The scope names the proxy itself.
                let scope = s
                    .scope
                    .as_ref()
                    .map(|sc| (sc.attributes.len(), sc.dropped_attributes_count));
                out.push(format!("span scope (own name and version) {scope:?}"));
                for sp in &s.spans {
                    let mut attrs = sp.attributes.clone();
                    attrs.sort_by(|a, b| a.key.cmp(&b.key));
                    for a in &mut attrs {
                        // Request ids are random.
                        if a.key == "guid:x-request-id" {
                            a.value = None;
                        }
                    }
                    let trace = hex(&sp.trace_id);
                    spans.push(format!(
                        "span {:?} kind {} trace_id {} parent {} span_id bytes {} trace_state {:?} flags {} times {} status {:?} events {} links {} attributes {{{}}}",
                        sp.name,
                        sp.kind,
                        if trace == CLIENT_TRACE { trace } else { format!("random of {} bytes", sp.trace_id.len()) },
                        parent(&sp.parent_span_id),
                        sp.span_id.len(),
                        sp.trace_state,
                        sp.flags,
                        if recent(sp.start_time_unix_nano) && sp.end_time_unix_nano >= sp.start_time_unix_nano { "recent" } else { "wrong" },
                        sp.status,
                        sp.events.len(),
                        sp.links.len(),
                        show_kvs(&attrs)
                    ));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    spans.sort();
    out.extend(spans);
    out
}

pub async fn run(bins: &Binaries, work: &std::path::Path, report: &mut Report) -> Result<()> {
    let echo = legate_tests::echo::start("echo", "127.0.0.1:0".parse()?).await?;
    let (admin, port) = (
        legate_tests::legate::free_port(),
        legate_tests::legate::free_port(),
    );
    let path = work.join("otel-access-log.yaml");
    let mut seen = Vec::new();
    let mut seen_spans = Vec::new();
    for kind in [Kind::Envoy, Kind::Legate] {
        let collector = legate_tests::otlp::start("127.0.0.1:0".parse()?).await?;
        std::fs::write(
            &path,
            bootstrap(admin, port, echo.addr.port(), collector.addr.port()),
        )?;
        let _running = proxies::start(bins, kind, &path, admin, work)?;
        tokio::task::block_in_place(|| {
            for (method, p) in REQUESTS {
                let url = format!("http://127.0.0.1:{port}{p}");
                let _ = legate_tests::legate::try_curl(
                    &url,
                    &["-X", method, "-A", "conformance/1", "-H", TRACEPARENT],
                );
            }
            for (method, p, extra) in TRACED {
                let url = format!("http://127.0.0.1:{port}{p}");
                let mut args = vec!["-X", method];
                args.extend_from_slice(extra);
                let _ = legate_tests::legate::try_curl(&url, &args);
            }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while collector.record_count() < REQUESTS.len() + TRACED.len()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Spans are flushed on Envoy's 5 s timer.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(12);
        while collector.span_count() < SPANS && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // A batch more than asked for would show here too.
        tokio::time::sleep(Duration::from_millis(300)).await;
        seen.push(exported(&collector));
        seen_spans.push(exported_spans(&collector));
    }
    let n = seen_spans[0].len().max(seen_spans[1].len());
    for i in 0..n {
        let get = |s: &Vec<String>| s.get(i).cloned().unwrap_or_else(|| "nothing".into());
        report.add(
            "http",
            "otel-trace",
            &format!("line-{i}"),
            Outcome::compare(&get(&seen_spans[0]), &get(&seen_spans[1])),
        );
    }
    let n = seen[0].len().max(seen[1].len());
    for i in 0..n {
        let get = |s: &Vec<String>| s.get(i).cloned().unwrap_or_else(|| "nothing".into());
        report.add(
            "http",
            "otel-access-log",
            &format!("line-{i}"),
            Outcome::compare(&get(&seen[0]), &get(&seen[1])),
        );
    }
    if n == 0 {
        report.add(
            "http",
            "otel-access-log",
            "*",
            Outcome::Mismatch(vec!["neither proxy exported anything".into()]),
        );
    }
    Ok(())
}
