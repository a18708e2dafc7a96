//! Istio's own extensions between two Legates over real sockets and TLS:
//! the TCP metadata exchange (each side's frame taken off the stream, the
//! bytes after it intact, each side labelled with the other's workload in
//! `istio.stats`), and `istio.alpn` (the upstream TLS connection offers the
//! configured list, which the server's filter chain matches on). istiod's
//! own output for these is exercised by `./conformance/run istio`.

mod common;
use common::*;
use legate_tests::pki::{s, Ca, Leaf, LeafOpts};
use legate_tests::tcp;
use serde_json::{json, Value};

const MX: &str = "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange";
const STATS: &str = "type.googleapis.com/stats.PluginConfig";
const ALPN: &str = "type.googleapis.com/istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig";
const DOWN_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
const UP_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
const EXCHANGE: &str = "istio-peer-exchange";

/// Node metadata as Istio's injector writes it for `app`-v1.
fn node(app: &str) -> Value {
    json!({
        "id": format!("sidecar~127.0.0.1~{app}-v1-0.legate~legate.svc.cluster.local"),
        "cluster": format!("{app}.legate"),
        "metadata": {
            "NAME": format!("{app}-v1-0"), "NAMESPACE": "legate", "WORKLOAD_NAME": format!("{app}-v1"),
            "CLUSTER_ID": "Kubernetes",
            "OWNER": format!("kubernetes://apis/apps/v1/namespaces/legate/deployments/{app}-v1"),
            "LABELS": {"app": app, "version": "v1",
                "service.istio.io/canonical-name": app, "service.istio.io/canonical-revision": "v1"},
        },
    })
}

fn boot(node: Value, admin: u16, listeners: Vec<Value>, clusters: Vec<Value>) -> String {
    json!({
        "node": node,
        "admin": {"address": addr("127.0.0.1", admin)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    })
    .to_string()
}

fn filter(name: &str, config: Value) -> Value {
    json!({"name": name, "typed_config": config})
}

fn exchange() -> Value {
    filter(
        "istio.metadata_exchange",
        json!({"@type": MX, "protocol": EXCHANGE, "enable_discovery": true}),
    )
}

fn tcp_proxy(cluster: &str) -> Value {
    filter(
        "envoy.filters.network.tcp_proxy",
        json!({"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": "tcp", "cluster": cluster}),
    )
}

fn files(l: &Leaf) -> Value {
    json!({"certificate_chain": {"filename": s(&l.cert)}, "private_key": {"filename": s(&l.key)}})
}

/// The client's cluster to the server's listener: TLS with Istio's ALPN
/// list and a client certificate when `tls`; the exchange in `filters`.
fn to_server(port: u16, tls: Option<(&Ca, &Leaf)>) -> Value {
    let mut extra = json!({
        "filters": [exchange()],
        "metadata": {"filter_metadata": {"istio": {"services": [
            {"host": "details.legate.svc.cluster.local", "name": "details", "namespace": "legate"}]}}},
    });
    if let Some((ca, leaf)) = tls {
        extra["transport_socket"] = json!({"name": "tls", "typed_config": {"@type": UP_TLS,
            "sni": "details.test",
            "common_tls_context": {"alpn_protocols": [EXCHANGE, "istio"],
                "tls_certificates": [files(leaf)],
                "validation_context": {"trusted_ca": {"filename": s(&ca.ca_path())}}}}});
    }
    cluster("details", &[([127, 0, 0, 1], port).into()], extra)
}

/// The server's TLS: its certificate, Istio's ALPN list for TCP, and a
/// client certificate required.
fn server_tls(ca: &Ca, leaf: &Leaf) -> Value {
    json!({"name": "tls", "typed_config": {"@type": DOWN_TLS,
        "require_client_certificate": true,
        "common_tls_context": {"alpn_protocols": [EXCHANGE, "h2", "http/1.1"],
            "tls_certificates": [files(leaf)],
            "validation_context": {"trusted_ca": {"filename": s(&ca.ca_path())}}}}})
}

/// The `metric` series' labels and value on a proxy's Prometheus page.
fn series(admin: u16, metric: &str) -> Vec<(Value, u64)> {
    let text = admin_get(admin, "/stats/prometheus").body;
    let re = regex::Regex::new(r#"([a-z_]+)="([^"]*)""#).unwrap();
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(metric)?.strip_prefix('{')?;
            let (labels, value) = rest.rsplit_once("} ")?;
            let map: serde_json::Map<String, Value> = re
                .captures_iter(labels)
                .map(|c| (c[1].to_string(), Value::String(c[2].to_string())))
                .collect();
            Some((Value::Object(map), value.parse().ok()?))
        })
        .collect()
}

fn closed_total(admin: u16) -> u64 {
    series(admin, "istio_tcp_connections_closed_total")
        .iter()
        .map(|s| s.1)
        .sum()
}

/// The connection series once one more connection than `before` has
/// closed (waiting up to 2 s: metrics land as the connection ends).
fn closed_series(admin: u16, before: u64) -> Vec<(Value, u64)> {
    for _ in 0..100 {
        if closed_total(admin) > before {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    series(admin, "istio_tcp_connections_closed_total")
}

/// The connection count on each side before the test's own connection:
/// the start-up probes (a connect to each listener, the client's passed
/// on to the server) are connections too, and counted.
fn settled(p: &Pair) -> (u64, u64) {
    std::thread::sleep(std::time::Duration::from_millis(300));
    (closed_total(p.client_admin), closed_total(p.server_admin))
}

struct Pair {
    _server: Legate,
    _client: Legate,
    client_port: u16,
    client_admin: u16,
    server_admin: u16,
}

/// app <- server Legate (inbound, exchange, stats) <- client Legate
/// (outbound, stats, exchange on its cluster) <- the test.
fn pair(tls: bool) -> Pair {
    let app = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let app_addr = app.local_addr().unwrap();
    tcp::echo_upstream(app);
    let ca = Ca::new("istio-mx");
    let server_leaf = ca.leaf(
        "details",
        &["details.test"],
        LeafOpts {
            uris: &["spiffe://cluster.local/ns/legate/sa/details"],
            ..Default::default()
        },
    );
    let client_leaf = ca.leaf(
        "productpage",
        &["productpage.test"],
        LeafOpts {
            uris: &["spiffe://cluster.local/ns/legate/sa/productpage"],
            ..Default::default()
        },
    );
    let (server_port, server_admin) = (free_port(), free_port());
    let mut chain = json!({"filters": [
        exchange(),
        filter("istio.stats", json!({"@type": STATS, "disable_host_header_fallback": true})),
        tcp_proxy("app")]});
    if tls {
        chain["transport_socket"] = server_tls(&ca, &server_leaf);
    }
    let server_cfg = boot(
        node("details"),
        server_admin,
        vec![
            json!({"name": "virtualInbound", "address": addr("127.0.0.1", server_port),
            "traffic_direction": "INBOUND", "filter_chains": [chain]}),
        ],
        vec![cluster("app", &[app_addr], json!({}))],
    );
    let server = Legate::start(BIN, &server_cfg, &[server_port], Some(server_admin));
    let (client_port, client_admin) = (free_port(), free_port());
    let client_cfg = boot(
        node("productpage"),
        client_admin,
        vec![
            json!({"name": "outbound", "address": addr("127.0.0.1", client_port),
            "traffic_direction": "OUTBOUND", "filter_chains": [{"filters": [
                filter("istio.stats", json!({"@type": STATS})),
                tcp_proxy("details")]}]}),
        ],
        vec![to_server(server_port, tls.then_some((&ca, &client_leaf)))],
    );
    let client = Legate::start(BIN, &client_cfg, &[client_port], Some(client_admin));
    Pair {
        _server: server,
        _client: client,
        client_port,
        client_admin,
        server_admin,
    }
}

/// The bytes `tcp::echo_through` sends.
fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i % (64 * 1024)) * 7 % 251) as u8)
        .collect()
}

fn label<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or("<none>")
}

#[test]
fn the_exchange_over_mtls_labels_both_sides_and_keeps_the_bytes() {
    let p = pair(true);
    let (c0, s0) = settled(&p);
    let len = 300_000;
    let want = tcp::answer_for(&pattern(len));
    assert_eq!(tcp::echo_through(p.client_port, len), want);
    let server = closed_series(p.server_admin, s0);
    let client = closed_series(p.client_admin, c0);
    // One series each side (the probe's connection has the same labels).
    let [(s, n)] = server.as_slice() else {
        panic!("server: {server:?}")
    };
    assert_eq!(*n, s0 + 1);
    let [(c, n)] = client.as_slice() else {
        panic!("client: {client:?}")
    };
    assert_eq!(*n, c0 + 1);
    // Each side learned the other from its frame.
    assert_eq!(label(s, "reporter"), "destination");
    assert_eq!(label(s, "source_workload"), "productpage-v1");
    assert_eq!(label(s, "source_app"), "productpage");
    assert_eq!(
        label(s, "source_principal"),
        "spiffe://cluster.local/ns/legate/sa/productpage"
    );
    assert_eq!(label(s, "connection_security_policy"), "mutual_tls");
    assert_eq!(label(s, "destination_workload"), "details-v1");
    assert_eq!(label(s, "request_protocol"), "tcp");
    assert_eq!(label(c, "reporter"), "source");
    assert_eq!(label(c, "source_workload"), "productpage-v1");
    assert_eq!(label(c, "destination_workload"), "details-v1");
    assert_eq!(
        label(c, "destination_service"),
        "details.legate.svc.cluster.local"
    );
    assert_eq!(label(c, "connection_security_policy"), "unknown");
    // The application's bytes, not the frames, are what each side counts.
    let received = series(p.server_admin, "istio_tcp_received_bytes_total");
    assert_eq!(
        received.first().map(|r| r.1),
        Some(len as u64),
        "{received:?}"
    );
    for admin in [p.client_admin, p.server_admin] {
        let found = stat(admin, "metadata_exchange.alpn_protocol_found").unwrap_or(0);
        assert!(found >= 1, "{found}");
        assert_eq!(stat(admin, "metadata_exchange.metadata_added"), Some(found));
        assert_eq!(stat(admin, "metadata_exchange.header_not_found"), None);
    }
}

#[test]
fn without_the_protocol_nothing_is_exchanged() {
    let p = pair(false);
    let (_, s0) = settled(&p);
    let len = 70_000;
    let want = tcp::answer_for(&pattern(len));
    assert_eq!(tcp::echo_through(p.client_port, len), want);
    let server = closed_series(p.server_admin, s0);
    let [(s, n)] = server.as_slice() else {
        panic!("server: {server:?}")
    };
    assert_eq!(*n, s0 + 1);
    assert_eq!(label(s, "source_workload"), "unknown");
    assert_eq!(label(s, "connection_security_policy"), "none");
    let opened = series(p.server_admin, "istio_tcp_connections_opened_total");
    assert_eq!(opened.first().map(|o| o.1), Some(s0 + 1), "{opened:?}");
    for admin in [p.client_admin, p.server_admin] {
        assert!(stat(admin, "metadata_exchange.alpn_protocol_not_found").unwrap_or(0) >= 1);
        assert_eq!(stat(admin, "metadata_exchange.metadata_added"), None);
        assert_eq!(stat(admin, "metadata_exchange.alpn_protocol_found"), None);
    }
}

/// `istio.alpn`: the upstream TLS connection offers `istio-http/1.1`
/// first, and the server's chain matching it answers; without the filter
/// the default chain does.
#[test]
fn istio_alpn_decides_the_servers_chain() {
    let ca = Ca::new("istio-alpn");
    let leaf = ca.leaf("details", &["details.test"], LeafOpts::default());
    let (server_port, server_admin) = (free_port(), free_port());
    let answer = |body: &str| {
        let rc = routes(
            json!([{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": body}}}]),
        );
        json!({"filters": [filter("envoy.filters.network.http_connection_manager", hcm(rc, json!({})))],
            "transport_socket": {"name": "tls", "typed_config": {"@type": DOWN_TLS,
                "common_tls_context": {"alpn_protocols": ["h2", "http/1.1"], "tls_certificates": [files(&leaf)]}}}})
    };
    let mut istio = answer("istio chain");
    istio["filter_chain_match"] =
        json!({"application_protocols": ["istio-http/1.0", "istio-http/1.1", "istio-h2"]});
    let server_cfg = boot(
        node("details"),
        server_admin,
        vec![
            json!({"name": "in", "address": addr("127.0.0.1", server_port),
            "listener_filters": [{"name": "envoy.filters.listener.tls_inspector", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}],
            "filter_chains": [istio], "default_filter_chain": answer("default chain")}),
        ],
        vec![],
    );
    let _server = Legate::start(BIN, &server_cfg, &[server_port], Some(server_admin));
    let up = cluster(
        "details",
        &[([127, 0, 0, 1], server_port).into()],
        json!({"transport_socket": {"name": "tls", "typed_config": {"@type": UP_TLS, "sni": "details.test",
            "common_tls_context": {"validation_context": {"trusted_ca": {"filename": s(&ca.ca_path())}}}}}}),
    );
    let route = routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "details"}}]));
    let with_alpn = hcm(
        route.clone(),
        json!({"http_filters": [
            {"name": "istio.alpn", "typed_config": {"@type": ALPN, "alpn_override": [
                {"upstream_protocol": "HTTP10", "alpn_override": ["istio-http/1.0", "istio", "http/1.0"]},
                {"upstream_protocol": "HTTP11", "alpn_override": ["istio-http/1.1", "istio", "http/1.1"]},
                {"upstream_protocol": "HTTP2", "alpn_override": ["istio-h2", "istio", "h2"]}]}},
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}]}),
    );
    let (a, b, admin) = (free_port(), free_port(), free_port());
    let client_cfg = boot(
        node("productpage"),
        admin,
        vec![
            listener("alpn", a, with_alpn),
            listener("plain", b, hcm(route, json!({}))),
        ],
        vec![up],
    );
    let _client = Legate::start(BIN, &client_cfg, &[a, b], Some(admin));
    assert_eq!(
        curl(&format!("http://127.0.0.1:{a}/"), &[]).body,
        "istio chain"
    );
    assert_eq!(
        curl(&format!("http://127.0.0.1:{b}/"), &[]).body,
        "default chain"
    );
    // Again on each: pooled connections keep their own lists.
    assert_eq!(
        curl(&format!("http://127.0.0.1:{b}/"), &[]).body,
        "default chain"
    );
    assert_eq!(
        curl(&format!("http://127.0.0.1:{a}/"), &[]).body,
        "istio chain"
    );
}

/// What istiod sends a dual-stack sidecar: a listener with the other
/// family's address in `additional_addresses` (both accept, one set of
/// chains), and a cluster whose `upstream_bind_config` has an
/// `extra_source_addresses` entry of the other family (each connection
/// binds the source of its upstream's family).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_listeners_and_source_addresses() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback here");
        return;
    }
    let up = upstream("app").await;
    let (port, admin) = (free_port(), free_port());
    let rc = routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "app"}}]));
    let mut l = listener("dual", port, hcm(rc, json!({})));
    l["additional_addresses"] = json!([{"address": addr("::1", port)}]);
    let c = cluster(
        "app",
        &[up.addr],
        json!({"upstream_bind_config": {"source_address": {"address": "::1", "port_value": 0},
            "extra_source_addresses": [{"address": {"address": "127.0.0.6", "port_value": 0}}]}}),
    );
    let cfg = bootstrap(admin, vec![l], vec![c]);
    let _l = Legate::start(BIN, &cfg, &[port], Some(admin));
    for url in [
        format!("http://127.0.0.1:{port}/"),
        format!("http://[::1]:{port}/"),
    ] {
        let r = curl(&url, &[]);
        assert_eq!(r.status, 200, "{url}");
        // An IPv4 upstream: the IPv4 extra source, not the IPv6 one.
        assert_eq!(r.header("x-echo-peer-ip"), Some("127.0.0.6"), "{url}");
    }
    // The other family's source must be of the other family.
    let bad = cluster(
        "app",
        &[up.addr],
        json!({"upstream_bind_config": {"source_address": {"address": "127.0.0.1", "port_value": 0},
            "extra_source_addresses": [{"address": {"address": "127.0.0.6", "port_value": 0}}]}}),
    );
    let out = validate(BIN, &bootstrap(free_port(), vec![], vec![bad]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("extra_source_addresses[0]"));
}

/// `istio.stats` counts every stream, also those an earlier filter
/// answered: here a fault filter's abort, which never reaches it.
#[test]
fn istio_stats_counts_what_earlier_filters_answer() {
    let (port, admin) = (free_port(), free_port());
    let rc = routes(json!([{"match": {"prefix": "/"}, "direct_response": {"status": 200}}]));
    let h = hcm(
        rc,
        json!({"http_filters": [
            {"name": "envoy.filters.http.fault", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
                "abort": {"http_status": 418, "percentage": {"numerator": 100}}}},
            {"name": "istio.stats", "typed_config": {"@type": STATS}},
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}]}),
    );
    let mut l = listener("in", port, h);
    l["traffic_direction"] = json!("INBOUND");
    let cfg = boot(node("details"), admin, vec![l], vec![]);
    let _l = Legate::start(BIN, &cfg, &[port], Some(admin));
    assert_eq!(curl(&format!("http://127.0.0.1:{port}/"), &[]).status, 418);
    let mut seen = Vec::new();
    for _ in 0..100 {
        seen = series(admin, "istio_requests_total");
        if !seen.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let [(s, 1)] = seen.as_slice() else {
        panic!("{seen:?}")
    };
    assert_eq!(label(s, "reporter"), "destination");
    assert_eq!(label(s, "response_code"), "418");
    assert_eq!(label(s, "response_flags"), "FI");
    assert_eq!(label(s, "destination_workload"), "details-v1");
}
