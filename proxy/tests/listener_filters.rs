//! Listener filters through the real binary: PROXY protocol v1 and v2,
//! `http_inspector`, and `use_original_dst` hand-over to `bind_to_port:
//! false` listeners, from a PROXY header's destination and from
//! SO_ORIGINAL_DST behind a real iptables REDIRECT in a network namespace.

mod common;
use common::*;
use serde_json::json;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn tcp(cluster: &str) -> serde_json::Value {
    json!({"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": cluster, "cluster": cluster}}]})
}

fn http_chain(m: serde_json::Value, cluster: &str, extra: serde_json::Value) -> serde_json::Value {
    let rc = routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]));
    json!({"filter_chain_match": m, "filters": [
        {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm(rc, extra)}]})
}

fn proxy_protocol(config: serde_json::Value) -> serde_json::Value {
    let mut tc = json!({"@type": "type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol"});
    tc.as_object_mut()
        .unwrap()
        .extend(config.as_object().unwrap().clone());
    json!({"name": "envoy.filters.listener.proxy_protocol", "typed_config": tc})
}

fn v1(src: &str, dst: &str) -> Vec<u8> {
    let (s, d): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
    format!(
        "PROXY TCP4 {} {} {} {}\r\n",
        s.ip(),
        d.ip(),
        s.port(),
        d.port()
    )
    .into_bytes()
}

fn v2(src: &str, dst: &str) -> Vec<u8> {
    let (s, d): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (s, d) else {
        panic!("IPv4 only here")
    };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11".to_vec();
    // The address block, then one TLV (ALPN) that must be skipped.
    h.extend_from_slice(&(12u16 + 5).to_be_bytes());
    h.extend_from_slice(&s.ip().octets());
    h.extend_from_slice(&d.ip().octets());
    h.extend_from_slice(&s.port().to_be_bytes());
    h.extend_from_slice(&d.port().to_be_bytes());
    h.extend_from_slice(&[0x01, 0x00, 0x02, b'h', b'2']);
    h
}

/// Connects, sends `bytes`, and reads until the proxy closes.
async fn exchange(port: u16, bytes: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the proxy answered or closed");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_gives_the_client_address_to_chain_matching_and_xff() {
    let (ten, other, web) = (
        naming_upstream("ten").await,
        naming_upstream("other").await,
        upstream("web").await,
    );
    let (port, admin) = (free_port(), free_port());
    let l = json!({"name": "pp", "address": addr("127.0.0.1", port),
        "listener_filters": [proxy_protocol(json!({}))],
        "filter_chains": [
            // Both name the direct source, so neither wins at that level.
            {"filter_chain_match": {
                "direct_source_prefix_ranges": [{"address_prefix": "127.0.0.0", "prefix_len": 8}],
                "source_prefix_ranges": [{"address_prefix": "10.0.0.0", "prefix_len": 8}]},
             "filters": tcp("ten")["filters"]},
            // The direct source is the real peer, not the PROXY header's.
            http_chain(json!({
                "direct_source_prefix_ranges": [{"address_prefix": "127.0.0.0", "prefix_len": 8}],
                "source_prefix_ranges": [{"address_prefix": "192.168.0.0", "prefix_len": 16}]}),
                "web", json!({"use_remote_address": true})),
        ],
        "default_filter_chain": tcp("other")});
    let cfg = bootstrap(
        admin,
        vec![l],
        vec![
            cluster("ten", &[ten], json!({})),
            cluster("other", &[other], json!({})),
            cluster("web", &[web.addr], json!({})),
        ],
    );
    let _l = Legate::start(BIN, &cfg, &[port], Some(admin));
    // The readiness probe connected without a header: count from here.
    let base = |n: &str| stat(admin, &format!("proxy_proto.{n}")).unwrap_or(0);
    let (nf, v1f, v2f, v1e) = (
        base("not_found_disallowed"),
        base("versions.v1.found"),
        base("versions.v2.found"),
        base("versions.v1.error"),
    );
    let dst = format!("127.0.0.1:{port}");
    assert_eq!(exchange(port, &v1("10.1.2.3:5555", &dst)).await, "ten");
    assert_eq!(exchange(port, &v2("10.9.8.7:5555", &dst)).await, "ten");
    assert_eq!(
        exchange(port, b"PROXY UNKNOWN\r\n").await,
        "other",
        "UNKNOWN keeps the real source"
    );
    // What follows the header reaches the chain intact, and the client
    // address is the header's.
    let mut req = v2("192.168.7.9:4444", &dst);
    req.extend_from_slice(b"GET /x HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n");
    let resp = exchange(port, &req).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("x-echo-server: web"), "{resp}");
    assert!(
        resp.contains("\"x-forwarded-for\":\"192.168.7.9\""),
        "XFF is the PROXY client: {resp}"
    );
    // Without a header, or with a bad one: closed without a byte.
    assert_eq!(exchange(port, b"GET / HTTP/1.1\r\n\r\n").await, "");
    assert_eq!(
        exchange(port, b"PROXY TCP4 10.0.0.1 nowhere 1 2\r\n").await,
        ""
    );
    let pp = |n: &str| format!("proxy_proto.{n}");
    // UNKNOWN is a v1 header too.
    assert_eq!(
        wait_stat(admin, &pp("versions.v1.found"), v1f + 2),
        Some(v1f + 2)
    );
    assert_eq!(
        wait_stat(admin, &pp("versions.v2.found"), v2f + 2),
        Some(v2f + 2)
    );
    assert_eq!(
        wait_stat(admin, &pp("not_found_disallowed"), nf + 1),
        Some(nf + 1)
    );
    assert_eq!(
        wait_stat(admin, &pp("versions.v1.error"), v1e + 1),
        Some(v1e + 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_optional_and_disallowed_versions() {
    let other = naming_upstream("other").await;
    let (optional, strict, admin) = (free_port(), free_port(), free_port());
    // Optional: a disallowed version is not looked for, so it passes on as
    // data. Strict: it closes the connection.
    let listener = |name: &str, port: u16, allow: bool| {
        json!({"name": name, "address": addr("127.0.0.1", port),
            "listener_filters": [proxy_protocol(json!({
                "allow_requests_without_proxy_protocol": allow,
                "disallowed_versions": ["V1"], "stat_prefix": name}))],
            "filter_chains": [tcp("other")]})
    };
    let cfg = bootstrap(
        admin,
        vec![
            listener("optional", optional, true),
            listener("strict", strict, false),
        ],
        vec![cluster("other", &[other], json!({}))],
    );
    let _l = Legate::start(BIN, &cfg, &[optional, strict], Some(admin));
    let dst = format!("127.0.0.1:{optional}");
    assert_eq!(exchange(optional, b"hello").await, "other");
    assert_eq!(exchange(optional, &v2("10.0.0.1:1", &dst)).await, "other");
    assert_eq!(exchange(optional, &v1("10.0.0.1:1", &dst)).await, "other");
    assert_eq!(exchange(strict, &v1("10.0.0.1:1", &dst)).await, "");
    assert_eq!(
        wait_stat(admin, "proxy_proto.strict.versions.v1.disallowed", 1),
        Some(1)
    );
    assert_eq!(
        wait_stat(admin, "proxy_proto.optional.versions.v2.found", 1),
        Some(1)
    );
    assert!(stat(admin, "proxy_proto.optional.not_found_allowed").unwrap_or(0) >= 2);
    assert_eq!(
        stat(admin, "proxy_proto.optional.versions.v1.disallowed"),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_inspector_chooses_chains_by_http_version() {
    let (h1, h2, raw) = (
        upstream("h1").await,
        upstream("h2").await,
        naming_upstream("raw").await,
    );
    let (port, admin) = (free_port(), free_port());
    let l = json!({"name": "hi", "address": addr("127.0.0.1", port),
        "listener_filters": [{"name": "envoy.filters.listener.http_inspector", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"}}],
        "filter_chains": [
            http_chain(json!({"application_protocols": ["http/1.1"]}), "h1", json!({})),
            http_chain(json!({"application_protocols": ["h2c"]}), "h2", json!({})),
        ],
        "default_filter_chain": tcp("raw")});
    let cfg = bootstrap(
        admin,
        vec![l],
        vec![
            cluster("h1", &[h1.addr], json!({})),
            cluster("h2", &[h2.addr], json!({})),
            cluster("raw", &[raw], json!({})),
        ],
    );
    let _l = Legate::start(BIN, &cfg, &[port], Some(admin));
    let url = format!("http://127.0.0.1:{port}/");
    assert_eq!(curl(&url, &[]).header("x-echo-server"), Some("h1"));
    assert_eq!(
        curl(&url, &["--http2-prior-knowledge"]).header("x-echo-server"),
        Some("h2")
    );
    assert_eq!(exchange(port, b"hello there\r\n").await, "raw");
    assert!(stat(admin, "http_inspector.http11_found").unwrap_or(0) >= 1);
    assert_eq!(stat(admin, "http_inspector.http2_found"), Some(1));
    assert!(stat(admin, "http_inspector.http_not_found").unwrap_or(0) >= 1);
}

/// A virtual listener (`use_original_dst`) and two `bind_to_port: false`
/// listeners: one on an exact VIP, one on 0.0.0.0 of a port.
fn virtual_listeners(
    virtual_addr: serde_json::Value,
    filters: serde_json::Value,
) -> Vec<serde_json::Value> {
    vec![
        json!({"name": "virtual", "address": virtual_addr, "use_original_dst": true,
            "listener_filters": filters, "filter_chains": [tcp("passthrough")]}),
        json!({"name": "vip", "address": addr("10.20.30.40", 80), "bind_to_port": false,
            "filter_chains": [tcp("vip")]}),
        json!({"name": "wild", "address": addr("0.0.0.0", 81), "bind_to_port": false,
            "filter_chains": [tcp("wild")]}),
    ]
}

async fn virtual_clusters() -> Vec<serde_json::Value> {
    let mut v = Vec::new();
    for n in ["passthrough", "vip", "wild"] {
        v.push(cluster(n, &[naming_upstream(n).await], json!({})));
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_original_dst_hands_connections_to_the_listener_at_the_proxy_protocol_destination() {
    let (port, admin) = (free_port(), free_port());
    let listeners = virtual_listeners(addr("127.0.0.1", port), json!([proxy_protocol(json!({}))]));
    let cfg = bootstrap(admin, listeners, virtual_clusters().await);
    // Off: the unbound listeners stay unbound, as in Envoy.
    let _l = Legate::start_with_args(BIN, &cfg, &["--kernel-lb", "off"], &[port], Some(admin));
    let to = |dst: &'static str| async move { exchange(port, &v1("192.0.2.1:1000", dst)).await };
    assert_eq!(to("10.20.30.40:80").await, "vip", "exact address");
    assert_eq!(to("10.1.1.1:81").await, "wild", "0.0.0.0 on the port");
    assert_eq!(
        to("10.20.30.40:82").await,
        "passthrough",
        "no listener there"
    );
    assert_eq!(
        wait_stat(admin, "listener.10.20.30.40_80.downstream_cx_total", 1),
        Some(1),
        "counted by the listener that served it"
    );
}

#[test]
fn original_dst_behind_iptables_redirect_dispatches_to_unbound_listeners() {
    if let Some(why) = legate_tests::netns::skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let ns = legate_tests::netns::Netns::new("odst").unwrap();
    // Every TCP connection to 10.20.0.0/16 goes to the virtual listener on
    // 15001, as Istio's init arranges.
    ns.redirect("10.20.0.0/16", 15001).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Upstreams in the namespace: their listening sockets are made there.
    let mut clusters = Vec::new();
    for name in ["passthrough", "vip", "wild"] {
        let l = ns.enter(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
        l.set_nonblocking(true).unwrap();
        let a = l.local_addr().unwrap();
        rt.spawn(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            while let Ok((mut s, _)) = l.accept().await {
                let _ = s.write_all(name.as_bytes()).await;
                let _ = s.shutdown().await;
            }
        });
        clusters.push(cluster(name, &[a], json!({})));
    }
    let original_dst = json!([{"name": "envoy.filters.listener.original_dst", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}}]);
    let listeners = virtual_listeners(addr("0.0.0.0", 15001), original_dst);
    let admin = 15000;
    let cfg = bootstrap(admin, listeners, clusters);
    let mut legate = Legate::spawn(ns.command(BIN), &cfg, &["--kernel-lb", "off"], None);
    let connects = |p: u16| ns.enter(|| std::net::TcpStream::connect(("127.0.0.1", p)).is_ok());
    legate.wait_until(connects, &[15001, admin]);
    let dial = |dst: &str| -> String {
        let dst: SocketAddr = dst.parse().unwrap();
        let mut s = ns.enter(|| std::net::TcpStream::connect(dst).unwrap());
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        // The client sees the address it dialled.
        assert_eq!(s.peer_addr().unwrap(), dst);
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut s, &mut out);
        out
    };
    assert_eq!(dial("10.20.30.40:80"), "vip");
    assert_eq!(dial("10.20.1.1:81"), "wild");
    assert_eq!(dial("10.20.30.40:9999"), "passthrough");
    drop(legate);
}
