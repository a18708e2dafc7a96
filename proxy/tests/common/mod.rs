//! Bootstrap builders for the integration tests. Configs are built as JSON
//! (valid YAML), so tests state only what they are about.
#![allow(dead_code, unused_imports)]

pub use legate_tests::echo;
pub use legate_tests::legate::{curl, free_port, validate, CurlResult, Legate};
use serde_json::{json, Value};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const BIN: &str = env!("CARGO_BIN_EXE_legate");

pub const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
pub const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";

pub fn addr(ip: &str, port: u16) -> Value {
    json!({"socket_address": {"address": ip, "port_value": port}})
}

/// An HCM with `route_config`, merged with `extra` HCM fields.
pub fn hcm(route_config: Value, extra: Value) -> Value {
    let mut h = json!({
        "@type": HCM,
        "stat_prefix": "ingress",
        "route_config": route_config,
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
    });
    if let (Some(h), Some(e)) = (h.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            h.insert(k.clone(), v.clone());
        }
    }
    h
}

pub fn listener(name: &str, port: u16, hcm: Value) -> Value {
    json!({
        "name": name,
        "address": addr("127.0.0.1", port),
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    })
}

/// A STATIC cluster over `endpoints`, merged with `extra` cluster fields.
pub fn cluster(name: &str, endpoints: &[SocketAddr], extra: Value) -> Value {
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|a| json!({"endpoint": {"address": addr(&a.ip().to_string(), a.port())}}))
        .collect();
    let mut c = json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": eps}]},
    });
    if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    c
}

/// One virtual host `*` with `routes`.
pub fn routes(routes: Value) -> Value {
    json!({"name": "local", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]})
}

pub fn bootstrap(admin_port: u16, listeners: Vec<Value>, clusters: Vec<Value>) -> String {
    json!({
        "admin": {"address": addr("127.0.0.1", admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    })
    .to_string()
}

/// A bootstrap taking listeners and clusters over ADS from the xDS server
/// at `xds` (static cluster `xds`), as node `node`.
pub fn ads_bootstrap(xds: SocketAddr, admin: u16, node: &str) -> String {
    json!({
        "node": {"id": node, "cluster": "test"},
        "admin": {"address": addr("127.0.0.1", admin)},
        "dynamic_resources": {
            "ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
                           "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [cluster("xds", &[xds], json!({"http2_protocol_options": {}}))]},
    })
    .to_string()
}

/// Starts legate with one listener (`hcm`) and `clusters`; returns it with
/// the listener's base URL and the admin port.
pub fn start(hcm: Value, clusters: Vec<Value>) -> (Legate, String, u16) {
    let (port, admin) = (free_port(), free_port());
    let cfg = bootstrap(admin, vec![listener("ingress", port, hcm)], clusters);
    let l = Legate::start(BIN, &cfg, &[port], Some(admin));
    (l, format!("http://127.0.0.1:{port}"), admin)
}

pub async fn upstream(name: &str) -> echo::Echo {
    echo::start(name, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// `-g`: brackets in a stats filter are regex, not curl's URL globbing.
pub fn admin_get(admin: u16, path: &str) -> CurlResult {
    curl(&format!("http://127.0.0.1:{admin}{path}"), &["-g"])
}

pub fn admin_post(admin: u16, path: &str) -> CurlResult {
    curl(&format!("http://127.0.0.1:{admin}{path}"), &["-X", "POST"])
}

/// A stat's value from `/stats?format=json`.
pub fn stat(admin: u16, name: &str) -> Option<u64> {
    let r = admin_get(
        admin,
        &format!(
            "/stats?format=json&filter=^{}$",
            name.replace('.', "\\.")
                .replace('[', "\\[")
                .replace(']', "\\]")
        ),
    );
    let v: Value = serde_json::from_str(&r.body).unwrap();
    v["stats"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == name)
        .and_then(|s| s["value"].as_u64())
}

/// Polls a stat (up to 2 s) until `check` holds; returns the last value.
/// Stats recorded when a connection or request ends can land a moment
/// after the client has its answer.
pub fn wait_stat_until(admin: u16, name: &str, check: impl Fn(Option<u64>) -> bool) -> Option<u64> {
    let mut seen = None;
    for _ in 0..100 {
        seen = stat(admin, name);
        if check(seen) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    seen
}

/// Polls a stat (up to 2 s) until it is `want`; returns the last value.
pub fn wait_stat(admin: u16, name: &str, want: u64) -> Option<u64> {
    wait_stat_until(admin, name, |v| v == Some(want))
}

/// A TCP upstream that writes its name and closes.
pub async fn naming_upstream(name: &'static str) -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    legate_tests::tcp::naming_upstream(l, name);
    addr
}

pub async fn read_all(port: u16) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out
}
