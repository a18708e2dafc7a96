//! The http tier's Zipkin check: the same requests through Envoy, then
//! Legate, each reporting spans as Zipkin v2 JSON over HTTP to a real HTTP
//! collector (an echo upstream, which keeps every body it receives); every
//! span is compared field by field, ids by their relation (the client's,
//! the proxy's own, random) and times by being recent.

use crate::proxies::{self, Binaries, Kind};
use crate::report::{Outcome, Report};
use anyhow::Result;
use serde_json::Value;
use std::time::{Duration, SystemTime};

/// A sampled B3 context: the server span continues it.
const B3: [&str; 6] = [
    "-H",
    "x-b3-traceid: 0af7651916cd43dd8448eb211c80319c",
    "-H",
    "x-b3-spanid: b7ad6b7169203331",
    "-H",
    "x-b3-sampled: 1",
];
const CLIENT_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN: &str = "b7ad6b7169203331";

/// (path, with the client's B3 context).
const REQUESTS: [(&str, bool); 4] = [
    ("/echo/a", true),
    ("/echo/b?q=1", false),
    ("/local", true),
    ("/dead", false),
];
/// One span per request, and one per upstream attempt of the three that
/// go upstream (spawn_upstream_span).
const SPANS: usize = REQUESTS.len() + 3;

fn bootstrap(admin: u16, port: u16, echo: u16, collector: u16) -> String {
    format!(
        r#"node: {{id: node-1, cluster: service-1, locality: {{zone: zone-1}}}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
static_resources:
  listeners:
  - name: zipkin
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: hcm
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: zipkin
          tracing:
            spawn_upstream_span: true
            custom_tags: [{{tag: lit, literal: {{value: fixed}}}}]
            provider:
              name: envoy.tracers.zipkin
              typed_config:
                "@type": type.googleapis.com/envoy.config.trace.v3.ZipkinConfig
                collector_cluster: collector
                collector_endpoint: /api/v2/spans
                collector_endpoint_version: HTTP_JSON
                trace_id_128bit: true
          route_config:
            virtual_hosts: [{{name: v, domains: ["*"], routes: [
              {{match: {{prefix: "/echo"}}, route: {{cluster: echo}}}},
              {{match: {{prefix: "/dead"}}, route: {{cluster: dead}}}},
              {{match: {{prefix: "/local"}}, direct_response: {{status: 418}}}}]}}]
          http_filters: [{{name: r, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]
  clusters:
  - {{name: echo, connect_timeout: 1s, load_assignment: {{cluster_name: echo, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {echo}}}}}}}}}]}}]}}}}
  - {{name: dead, connect_timeout: 1s, load_assignment: {{cluster_name: dead, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 1}}}}}}}}]}}]}}}}
  - {{name: collector, connect_timeout: 1s, load_assignment: {{cluster_name: collector, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {collector}}}}}}}}}]}}]}}}}
"#
    )
}

/// Whether a Zipkin timestamp (microseconds) is of this run.
fn recent(micros: u64) -> bool {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    now.saturating_sub(Duration::from_micros(micros)) < Duration::from_secs(60)
}

/// What the collector received, as comparable lines: each report's
/// method, path and content type, then every span.
fn reported(seen: &[Value]) -> Vec<String> {
    let mut out = Vec::new();
    let mut spans: Vec<Value> = Vec::new();
    for r in seen {
        let ct = r["headers"]["content-type"].as_str().unwrap_or("");
        out.push(format!(
            "report {} {} content-type {ct} host {}",
            r["method"].as_str().unwrap_or(""),
            r["path"].as_str().unwrap_or(""),
            r["headers"]["host"].as_str().unwrap_or("")
        ));
        let body = r["body"].as_str().unwrap_or("");
        if let Ok(Value::Array(a)) = serde_json::from_str::<Value>(body) {
            spans.extend(a);
        } else {
            out.push(format!("report body not a JSON array: {body:?}"));
        }
    }
    let own: std::collections::BTreeSet<String> = spans
        .iter()
        .filter_map(|s| s["id"].as_str().map(str::to_string))
        .collect();
    let id = |v: &Value| match v.as_str() {
        None => "absent".to_string(),
        Some(CLIENT_TRACE) => "the client's trace".into(),
        Some(CLIENT_SPAN) => "the client's span".into(),
        Some(s) if own.contains(s) => format!("a span of the proxy's ({} hex digits)", s.len()),
        Some(s) => format!("other ({} hex digits)", s.len()),
    };
    let mut lines: Vec<String> = spans
        .iter()
        .map(|s| {
            let mut s = s.clone();
            let o = s.as_object_mut().expect("a span is an object");
            let mut fields = Vec::new();
            for k in ["traceId", "id", "parentId"] {
                fields.push(format!("{k}: {}", id(&o.remove(k).unwrap_or(Value::Null))));
            }
            let ts = o.remove("timestamp").and_then(|v| v.as_u64()).unwrap_or(0);
            fields.push(format!(
                "timestamp: {}",
                if recent(ts) { "recent" } else { "wrong" }
            ));
            let d = o.remove("duration");
            fields.push(format!(
                "duration: {}",
                if d.as_ref().is_some_and(|d| d.is_u64()) {
                    "a number"
                } else {
                    "absent"
                }
            ));
            if let Some(Value::Array(notes)) = o.get_mut("annotations") {
                for n in notes {
                    let t = n["timestamp"].as_u64().unwrap_or(0);
                    n["timestamp"] =
                        Value::String(if recent(t) { "recent" } else { "wrong" }.into());
                }
            }
            if let Some(Value::Object(tags)) = o.get_mut("tags") {
                // Request ids are random.
                if let Some(v) = tags.get_mut("guid:x-request-id") {
                    *v = Value::String("<uuid>".into());
                }
            }
            fields.push(format!("rest: {}", Value::Object(o.clone())));
            fields.join(", ")
        })
        .collect();
    out.sort();
    out.dedup();
    lines.sort();
    out.extend(lines);
    out
}

pub async fn run(bins: &Binaries, work: &std::path::Path, report: &mut Report) -> Result<()> {
    let echo = legate_tests::echo::start("echo", "127.0.0.1:0".parse()?).await?;
    let (admin, port) = (
        legate_tests::legate::free_port(),
        legate_tests::legate::free_port(),
    );
    let path = work.join("zipkin.yaml");
    let mut seen = Vec::new();
    for kind in [Kind::Envoy, Kind::Legate] {
        let collector = legate_tests::echo::start("collector", "127.0.0.1:0".parse()?).await?;
        std::fs::write(
            &path,
            bootstrap(admin, port, echo.addr.port(), collector.addr.port()),
        )?;
        let _running = proxies::start(bins, kind, &path, admin, work)?;
        tokio::task::block_in_place(|| {
            for (p, b3) in REQUESTS {
                let url = format!("http://127.0.0.1:{port}{p}");
                let mut args = vec!["-A", "conformance/1"];
                if b3 {
                    args.extend_from_slice(&B3);
                }
                let _ = legate_tests::legate::try_curl(&url, &args);
            }
        });
        let count = |c: &legate_tests::echo::Echo| -> usize {
            c.seen
                .lock()
                .unwrap()
                .iter()
                .filter_map(|r| serde_json::from_str::<Value>(r["body"].as_str()?).ok())
                .map(|a| a.as_array().map_or(0, Vec::len))
                .sum()
        };
        // Spans go on a 5 s timer.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(12);
        while count(&collector) < SPANS && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let got = collector.seen.lock().unwrap().clone();
        seen.push(reported(&got));
    }
    let n = seen[0].len().max(seen[1].len());
    for i in 0..n {
        let get = |s: &Vec<String>| s.get(i).cloned().unwrap_or_else(|| "nothing".into());
        report.add(
            "http",
            "zipkin",
            &format!("line-{i}"),
            Outcome::compare(&get(&seen[0]), &get(&seen[1])),
        );
    }
    if n == 0 {
        report.add(
            "http",
            "zipkin",
            "*",
            Outcome::Mismatch(vec!["neither proxy reported anything".into()]),
        );
    }
    Ok(())
}
