//! The admin API, in Envoy's paths and formats. It is served by its own
//! pingora `HttpProxy` whose every request is answered locally.

use crate::cluster_manager::ClusterManager;
use crate::runtime::Runtime;
use crate::server::ListenerManager;
use crate::stats;
use async_trait::async_trait;
use bytes::Bytes;
use legate_proto::envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType, Result};
use pingora_http::ResponseHeader;
use pingora_proxy::{ProxyHttp, Session};
use serde_json::json;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

/// Envoy's `server.state` values.
pub const STATE_LIVE: u8 = 0;
pub const STATE_DRAINING: u8 = 1;
pub const STATE_INITIALIZING: u8 = 3;

fn state_name(s: u8) -> &'static str {
    match s {
        STATE_LIVE => "LIVE",
        STATE_INITIALIZING => "INITIALIZING",
        _ => "DRAINING",
    }
}

pub struct AdminState {
    pub clusters: Arc<ClusterManager>,
    pub listeners: Arc<ListenerManager>,
    pub bootstrap: Bootstrap,
    pub runtime: Arc<arc_swap::ArcSwap<Runtime>>,
    /// The xDS applier, once started (for /config_dump).
    pub xds: std::sync::Mutex<Option<Arc<crate::xds::Applier>>>,
    pub state: AtomicU8,
    pub started: SystemTime,
    pub command_line: serde_json::Value,
    pub node: crate::config::Node,
    pub set_log_level: crate::logging::LevelSetter,
    pub log_level: std::sync::Mutex<String>,
    pub quit: tokio::sync::Notify,
    /// The kernel load balancer, once started (for /kernel_lb).
    pub kernel_lb: std::sync::Mutex<Option<Arc<crate::kernel_lb::Agent>>>,
}

impl AdminState {
    pub fn set_state(&self, s: u8) {
        self.state.store(s, Ordering::SeqCst);
        stats::gauge("server.state".into()).set(s as f64);
        stats::gauge("server.live".into()).set(if s == STATE_LIVE { 1.0 } else { 0.0 });
    }
}

pub struct Admin {
    pub state: Arc<AdminState>,
}

struct Reply {
    status: u16,
    content_type: &'static str,
    body: String,
}

fn text(status: u16, body: impl Into<String>) -> Reply {
    Reply {
        status,
        content_type: "text/plain; charset=UTF-8",
        body: body.into(),
    }
}

fn json_reply(v: serde_json::Value) -> Reply {
    Reply {
        status: 200,
        content_type: "application/json",
        body: serde_json::to_string_pretty(&v).unwrap_or_default(),
    }
}

fn query(q: &str) -> Vec<(String, String)> {
    crate::routing::query_params(&format!("?{q}"))
}

fn to_json<M: prost::Message>(m: &M, name: &str) -> serde_json::Value {
    let Ok(desc) = legate_proto::json::descriptor(name) else {
        return json!({});
    };
    let Ok(d) =
        legate_proto::prost_reflect::DynamicMessage::decode(desc, m.encode_to_vec().as_slice())
    else {
        return json!({});
    };
    let opts = legate_proto::prost_reflect::SerializeOptions::new().use_proto_field_name(true);
    d.serialize_with_options(serde_json::value::Serializer, &opts)
        .unwrap_or(json!({}))
}

fn epoch_str(t: SystemTime) -> String {
    httpdate::fmt_http_date(t)
}

impl Admin {
    fn handle(&self, method: &http::Method, path: &str, q: &str) -> Reply {
        let s = &self.state;
        let params = query(q);
        let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let mutating = matches!(
            path,
            "/healthcheck/fail"
                | "/healthcheck/ok"
                | "/drain_listeners"
                | "/quitquitquit"
                | "/logging"
                | "/runtime_modify"
        );
        if mutating && method != http::Method::POST && !(path == "/logging" && params.is_empty()) {
            return text(405, "This endpoint requires POST.\n");
        }
        match path {
            "/" => text(200, "admin commands are:\n  /ready\n  /server_info\n  /config_dump\n  /kernel_lb\n  /clusters\n  /listeners\n  /stats\n  /stats/prometheus\n  /runtime\n  /logging\n  /healthcheck/fail\n  /healthcheck/ok\n  /drain_listeners\n  /quitquitquit\n"),
            "/ready" => match s.state.load(Ordering::SeqCst) {
                STATE_LIVE => text(200, "LIVE\n"),
                other => text(503, format!("{}\n", state_name(other))),
            },
            "/server_info" => {
                let state = state_name(s.state.load(Ordering::SeqCst));
                let up = s.started.elapsed().map(|d| d.as_secs()).unwrap_or(0);
                json_reply(json!({
                    "version": crate::version_string(),
                    "state": state,
                    "hot_restart_version": "disabled",
                    "command_line_options": s.command_line,
                    "node": {"id": s.node.id, "cluster": s.node.cluster, "locality": {"zone": s.node.zone}},
                    "uptime_current_epoch": format!("{up}s"),
                    "uptime_all_epochs": format!("{up}s"),
                }))
            }
            "/stats" | "/stats/prometheus" => {
                let filter = match param("filter").map(|f| regex::Regex::new(&f)) {
                    Some(Ok(r)) => Some(r),
                    Some(Err(e)) => return text(400, format!("Invalid re2 regex: {e}\n")),
                    None => None,
                };
                let mut all = stats::store().snapshot();
                if path == "/stats" && param("format").as_deref() != Some("prometheus") {
                    all.extend(crate::istio::metrics::store().text().into_iter().map(|(n, v)| (n, v, true)));
                }
                all.retain(|(n, _, _)| filter.as_ref().is_none_or(|f| f.is_match(n)));
                if param("usedonly").is_some() {
                    // Envoy's "used": a counter ever incremented, a gauge
                    // ever set (every Legate gauge is set when made, and
                    // pilot-agent's readiness probe wants `server.state: 0`).
                    all.retain(|(_, v, is_counter)| *v > 0 || !is_counter);
                }
                if path == "/stats/prometheus" || param("format").as_deref() == Some("prometheus") {
                    let mut out = String::new();
                    for (n, v, is_counter) in all {
                        let pn = stats::prometheus_name(&n);
                        out.push_str(&format!("# TYPE {pn} {}\n{pn}{{}} {v}\n", if is_counter { "counter" } else { "gauge" }));
                    }
                    // Istio's labelled metrics (`istio.stats`), named as
                    // Istio's proxy prints them.
                    if filter.is_none() {
                        out.push_str(&crate::istio::metrics::store().prometheus());
                    }
                    Reply { status: 200, content_type: "text/plain; version=0.0.4", body: out }
                } else if param("format").as_deref() == Some("json") {
                    json_reply(json!({"stats": all.iter().map(|(n, v, _)| json!({"name": n, "value": v})).collect::<Vec<_>>()}))
                } else {
                    text(200, all.iter().map(|(n, v, _)| format!("{n}: {v}\n")).collect::<String>())
                }
            }
            "/clusters" => {
                if param("format").as_deref() == Some("json") {
                    let statuses: Vec<_> = s
                        .clusters
                        .all()
                        .iter()
                        .map(|c| {
                            let hosts: Vec<_> = c
                                .snapshot()
                                .all_hosts
                                .iter()
                                .map(|h| {
                                    json!({
                                        "address": {"socket_address": {"address": h.addr.ip().to_string(), "port_value": h.addr.port()}},
                                        "stats": [{"name": "rq_active", "type": "GAUGE", "value": h.active_requests.load(Ordering::Relaxed).to_string()}],
                                        "health_status": {"eds_health_status": if h.healthy { "HEALTHY" } else { "UNHEALTHY" }},
                                        "weight": h.weight,
                                        "hostname": h.hostname,
                                    })
                                })
                                .collect();
                            json!({"name": c.config.name, "added_via_api": false, "host_statuses": hosts})
                        })
                        .collect();
                    json_reply(json!({"cluster_statuses": statuses}))
                } else {
                    let mut out = String::new();
                    for c in s.clusters.all() {
                        let n = &c.config.name;
                        out.push_str(&format!("{n}::observability_name::{n}\n{n}::added_via_api::false\n"));
                        for h in &c.snapshot().all_hosts {
                            let a = h.addr;
                            out.push_str(&format!("{n}::{a}::rq_active::{}\n", h.active_requests.load(Ordering::Relaxed)));
                            out.push_str(&format!("{n}::{a}::hostname::{}\n", h.hostname));
                            out.push_str(&format!("{n}::{a}::health_flags::{}\n", if h.healthy { "healthy" } else { "/eds_health_status/unhealthy" }));
                            out.push_str(&format!("{n}::{a}::weight::{}\n", h.weight));
                        }
                    }
                    text(200, out)
                }
            }
            "/listeners" => {
                let ls = s.listeners.list();
                if param("format").as_deref() == Some("json") {
                    json_reply(json!({"listener_statuses": ls.iter().map(|(n, a)| json!({
                        "name": n,
                        "local_address": {"socket_address": {"address": a.ip().to_string(), "port_value": a.port()}}
                    })).collect::<Vec<_>>()}))
                } else {
                    text(200, ls.iter().map(|(n, a)| format!("{n}::{a}\n")).collect::<String>())
                }
            }
            "/config_dump" => self.config_dump(param("resource"), param("mask")),
            "/kernel_lb" => match s.kernel_lb.lock().unwrap().as_ref() {
                Some(a) => json_reply(a.status_json()),
                None => text(503, "the kernel LB is not started\n"),
            },
            "/runtime" => {
                let mut entries = serde_json::Map::new();
                for (k, v) in s.runtime.load().entries() {
                    let fv = match v {
                        serde_json::Value::String(x) => x.clone(),
                        other => other.to_string(),
                    };
                    entries.insert(k.clone(), json!({"final_value": fv, "layer_values": [fv]}));
                }
                json_reply(json!({"layers": ["static_layer"], "entries": entries}))
            }
            "/logging" => {
                if let Some(level) = param("level") {
                    match (s.set_log_level)(&level) {
                        Ok(()) => *s.log_level.lock().unwrap() = level,
                        Err(e) => return text(400, format!("error: {e}\n")),
                    }
                }
                text(200, format!("active loggers:\n  legate: {}\n", s.log_level.lock().unwrap()))
            }
            "/healthcheck/fail" => {
                s.listeners.set_health_check_failed(true);
                s.set_state(STATE_DRAINING);
                text(200, "OK\n")
            }
            "/healthcheck/ok" => {
                s.listeners.set_health_check_failed(false);
                s.set_state(STATE_LIVE);
                text(200, "OK\n")
            }
            "/drain_listeners" => {
                s.listeners.drain_all(params.iter().any(|(k, _)| k == "inboundonly"));
                s.set_state(STATE_DRAINING);
                text(200, "OK\n")
            }
            "/quitquitquit" => {
                s.quit.notify_one();
                text(200, "OK\n")
            }
            _ => text(404, "invalid path. admin commands are listed at /\n"),
        }
    }

    fn config_dump(&self, resource: Option<String>, mask: Option<String>) -> Reply {
        let b = &self.state.bootstrap;
        let last_updated = epoch_str(self.state.started);
        let sr = b.static_resources.clone().unwrap_or_default();
        let listeners: Vec<_> = sr
            .listeners
            .iter()
            .map(|l| json!({"listener": with_type(to_json(l, "envoy.config.listener.v3.Listener"), "envoy.config.listener.v3.Listener"), "last_updated": last_updated}))
            .collect();
        let clusters: Vec<_> = sr
            .clusters
            .iter()
            .map(|c| json!({"cluster": with_type(to_json(c, "envoy.config.cluster.v3.Cluster"), "envoy.config.cluster.v3.Cluster"), "last_updated": last_updated}))
            .collect();
        // Envoy's field mask: comma-separated dotted paths kept from each
        // resource (e.g. `cluster.name`).
        let apply_mask = |v: serde_json::Value| match &mask {
            Some(m) => {
                let mut out = serde_json::Value::Object(Default::default());
                for path in m.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    copy_path(&v, &mut out, &path.split('.').collect::<Vec<_>>());
                }
                out
            }
            None => v,
        };
        let dynamic = self.dynamic_dump();
        let dyn_items = |k: &str| -> Vec<serde_json::Value> {
            dynamic
                .get(k)
                .and_then(|v| v.as_array())
                .cloned()
                .unwrap_or_default()
        };
        if let Some(r) = resource {
            let items: Vec<serde_json::Value> = match r.as_str() {
                "static_listeners" => listeners,
                "static_clusters" => clusters,
                "dynamic_listeners"
                | "dynamic_active_clusters"
                | "dynamic_warming_clusters"
                | "dynamic_route_configs"
                | "dynamic_scoped_route_configs" => dyn_items(&r),
                _ => return text(404, format!("unknown resource {r}\n")),
            };
            return json_reply(
                json!({"configs": items.into_iter().map(apply_mask).collect::<Vec<_>>()}),
            );
        }
        json_reply(json!({"configs": [
            {"@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump",
             "bootstrap": to_json(b, "envoy.config.bootstrap.v3.Bootstrap"), "last_updated": last_updated},
            {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump", "static_clusters": clusters,
             "dynamic_active_clusters": dyn_items("dynamic_active_clusters"),
             "dynamic_warming_clusters": dyn_items("dynamic_warming_clusters")},
            {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump", "static_listeners": listeners,
             "dynamic_listeners": dyn_items("dynamic_listeners")},
            {"@type": "type.googleapis.com/envoy.admin.v3.ScopedRoutesConfigDump",
             "dynamic_scoped_route_configs": dyn_items("dynamic_scoped_route_configs")},
            {"@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
             "dynamic_route_configs": dyn_items("dynamic_route_configs")},
        ]}))
    }

    /// xDS resources in Envoy's config_dump shapes, keyed by section.
    fn dynamic_dump(&self) -> serde_json::Map<String, serde_json::Value> {
        use legate_xds_client::types as t;
        let mut out = serde_json::Map::new();
        let Some(xds) = self.state.xds.lock().unwrap().clone() else {
            return out;
        };
        let mut push = |k: &str, v: serde_json::Value| {
            out.entry(k.to_string())
                .or_insert_with(|| json!([]))
                .as_array_mut()
                .expect("array")
                .push(v);
        };
        let errors = xds.errors();
        for (type_url, name, a, active) in xds.dump() {
            let body = any_json(&a.body);
            let updated = epoch_str(a.last_updated);
            match type_url {
                t::LISTENER => {
                    let state = json!({"version_info": a.version, "listener": body, "last_updated": updated});
                    let mut l = json!({"name": name});
                    l[if active {
                        "active_state"
                    } else {
                        "warming_state"
                    }] = state;
                    if let Some((_, e)) = errors
                        .iter()
                        .find(|((tu, n), _)| tu == t::LISTENER && *n == name)
                    {
                        l["error_state"] = json!({"details": e});
                    }
                    push("dynamic_listeners", l);
                }
                t::CLUSTER => push(
                    if active {
                        "dynamic_active_clusters"
                    } else {
                        "dynamic_warming_clusters"
                    },
                    json!({"version_info": a.version, "cluster": body, "last_updated": updated}),
                ),
                t::ROUTE => push(
                    "dynamic_route_configs",
                    json!({"version_info": a.version, "route_config": body, "last_updated": updated}),
                ),
                t::SCOPED_ROUTE => push(
                    "dynamic_scoped_route_configs",
                    json!({"name": name, "version_info": a.version, "scoped_route_configs": [body], "last_updated": updated}),
                ),
                _ => {}
            }
        }
        // Rejected listeners that never applied still show their error.
        let shown: std::collections::HashSet<String> = xds
            .dump()
            .into_iter()
            .filter(|(tu, ..)| *tu == t::LISTENER)
            .map(|(_, n, ..)| n)
            .collect();
        for ((tu, name), e) in &errors {
            if tu == t::LISTENER && !shown.contains(name) {
                push(
                    "dynamic_listeners",
                    json!({"name": name, "error_state": {"details": e}}),
                );
            }
        }
        out
    }
}

fn any_json(a: &legate_xds_client::Any) -> serde_json::Value {
    let name = legate_proto::type_name(&a.type_url);
    let Ok(d) = legate_proto::walk::decode_any(&a.type_url, &a.value, "") else {
        return json!({});
    };
    let opts = legate_proto::prost_reflect::SerializeOptions::new().use_proto_field_name(true);
    with_type(
        d.serialize_with_options(serde_json::value::Serializer, &opts)
            .unwrap_or(json!({})),
        name,
    )
}

/// Copies the value at `path` from `src` into `dst`, creating parents.
fn copy_path(src: &serde_json::Value, dst: &mut serde_json::Value, path: &[&str]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let Some(v) = src.get(*first) else { return };
    let obj = match dst {
        serde_json::Value::Object(o) => o,
        _ => return,
    };
    if rest.is_empty() {
        obj.insert(first.to_string(), v.clone());
    } else {
        let child = obj
            .entry(first.to_string())
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
        copy_path(v, child, rest);
    }
}

fn with_type(mut v: serde_json::Value, t: &str) -> serde_json::Value {
    if let serde_json::Value::Object(o) = &mut v {
        o.insert("@type".into(), json!(format!("type.googleapis.com/{t}")));
    }
    v
}

#[async_trait]
impl ProxyHttp for Admin {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> Result<bool> {
        let req = session.req_header();
        let method = req.method.clone();
        let path = req.uri.path().to_string();
        let q = req.uri.query().unwrap_or("").to_string();
        let reply = self.handle(&method, &path, &q);
        let mut resp = ResponseHeader::build(reply.status, Some(3))?;
        resp.insert_header(http::header::CONTENT_TYPE, reply.content_type)?;
        resp.insert_header(http::header::CONTENT_LENGTH, reply.body.len().to_string())?;
        resp.insert_header("cache-control", "no-cache, max-age=0")?;
        session.write_response_header(Box::new(resp), false).await?;
        session
            .write_response_body(Some(Bytes::from(reply.body)), true)
            .await?;
        Ok(true)
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Error::e_explain(ErrorType::InternalError, "the admin API has no upstream")
    }
}
