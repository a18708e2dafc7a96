//! xDS through the real binary, driven by a scripted ADS control plane
//! (a real gRPC server): NACKs that keep the last good config serving,
//! protocol-level rejections, warming and removal, reconnects, and updates
//! under load with zero failed requests.

mod common;
use common::*;
use legate_tests::xds_server::{any, ScriptedAds, CLUSTER, ENDPOINT, LISTENER, ROUTE};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

fn ads_bootstrap(xds: SocketAddr, admin: u16) -> String {
    json!({
        "node": {"id": "test-node", "cluster": "test"},
        "admin": {"address": addr("127.0.0.1", admin)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC", "transport_api_version": "V3", "set_node_on_first_message_only": true,
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [cluster("xds", &[xds], json!({"http2_protocol_options": {}}))]},
    })
    .to_string()
}

/// A listener routing everything to `cluster`, tagging responses with
/// `x-version: tag`.
fn tagged_listener(name: &str, port: u16, cluster: &str, tag: &str) -> Value {
    let mut rc = routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]));
    rc["response_headers_to_add"] = json!([{"header": {"key": "x-version", "value": tag}}]);
    listener(name, port, hcm(rc, json!({})))
}

/// Version "1" of one cluster `c1` (to `up`) and one listener `l1` on
/// `port` whose routes answer with `x-version: tag`.
fn serve_one(ads: &ScriptedAds, up: SocketAddr, port: u16, tag: &str) {
    ads.set(
        CLUSTER,
        "1",
        vec![any(CLUSTER, cluster("c1", &[up], json!({})))],
    );
    ads.set(
        LISTENER,
        "1",
        vec![any(LISTENER, tagged_listener("l1", port, "c1", tag))],
    );
}

fn rds_listener(name: &str, port: u16, route: &str, server_name: &str) -> Value {
    let mut h = hcm(json!({}), json!({"server_name": server_name}));
    h.as_object_mut().unwrap().remove("route_config");
    h["rds"] = json!({"route_config_name": route, "config_source": {"ads": {}, "resource_api_version": "V3"}});
    listener(name, port, h)
}

fn eds_cluster(name: &str, connect_timeout: &str) -> Value {
    json!({"name": name, "type": "EDS", "connect_timeout": connect_timeout,
           "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}}})
}

fn cla(name: &str, hosts: &[SocketAddr]) -> Value {
    let eps: Vec<Value> = hosts
        .iter()
        .map(|a| json!({"endpoint": {"address": addr(&a.ip().to_string(), a.port())}}))
        .collect();
    json!({"cluster_name": name, "endpoints": [{"lb_endpoints": eps}]})
}

fn wait_port(port: u16, open: bool) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let up = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        if up == open {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "port {port} did not become {}",
        if open { "open" } else { "closed" }
    );
}

/// Polls until `check` holds for a curl result.
fn eventually(url: &str, check: impl Fn(&CurlResult) -> bool) -> CurlResult {
    let deadline = Instant::now() + WAIT;
    loop {
        let r = curl(url, &[]);
        if check(&r) || Instant::now() > deadline {
            return r;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn acked(ads: &ScriptedAds, type_url: &str, version: &str) {
    let found = ads
        .wait_for(WAIT, |_, r| {
            r.type_url == type_url && r.version_info == version && r.error_detail.is_none()
        })
        .await;
    assert!(found.is_some(), "no ACK of {type_url} {version}");
}

async fn nacked(ads: &ScriptedAds, type_url: &str, nonce: &str) -> (String, String) {
    let r = ads
        .wait_for(WAIT, |_, r| {
            r.type_url == type_url && r.response_nonce == nonce && r.error_detail.is_some()
        })
        .await
        .unwrap_or_else(|| panic!("no NACK of {type_url} nonce {nonce}"));
    let d = r.error_detail.unwrap();
    assert_eq!(d.code, 13, "Envoy NACKs with INTERNAL");
    (r.version_info, d.message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_names_the_bad_resource_and_the_last_good_config_keeps_serving() {
    let up = upstream("a").await;
    let ads = ScriptedAds::start("127.0.0.1:0".parse().unwrap()).await;
    let (port, admin) = (free_port(), free_port());
    serve_one(&ads, up.addr, port, "1");
    let _l = Legate::start(BIN, &ads_bootstrap(ads.addr, admin), &[], Some(admin));
    wait_port(port, true);
    assert_eq!(
        curl(&format!("http://127.0.0.1:{port}/"), &[]).header("x-version"),
        Some("1")
    );
    acked(&ads, LISTENER, "1").await;
    let first = ads.requests()[0].1.clone();
    assert_eq!(
        first.node.unwrap().id,
        "test-node",
        "the first request carries the node"
    );

    // A batch with one bad listener: the good one applies, the NACK names the bad one.
    let mut bad = tagged_listener("bad", free_port(), "c1", "x");
    bad["transparent"] = json!(true);
    ads.set(
        LISTENER,
        "2",
        vec![
            any(LISTENER, tagged_listener("l1", port, "c1", "2")),
            any(LISTENER, bad),
        ],
    );
    let (version, message) = nacked(&ads, LISTENER, &ads.last_nonce()).await;
    assert_eq!(version, "1", "a NACK carries the last accepted version");
    assert!(
        message.contains("bad") && message.contains("transparent"),
        "{message}"
    );
    let r = eventually(&format!("http://127.0.0.1:{port}/"), |r| {
        r.header("x-version") == Some("2")
    });
    assert_eq!(
        r.header("x-version"),
        Some("2"),
        "the good listener of the batch applied"
    );

    // A bad update of the serving listener: rejected, the old one serves on.
    let mut broken = tagged_listener("l1", port, "c1", "3");
    broken["transparent"] = json!(true);
    ads.set(LISTENER, "3", vec![any(LISTENER, broken)]);
    let (version, _) = nacked(&ads, LISTENER, &ads.last_nonce()).await;
    assert_eq!(version, "1");
    assert_eq!(
        curl(&format!("http://127.0.0.1:{port}/"), &[]).header("x-version"),
        Some("2")
    );

    // Duplicate names and a resource of the wrong type are rejected whole.
    let l = tagged_listener("l1", port, "c1", "4");
    ads.set(
        LISTENER,
        "4",
        vec![any(LISTENER, l.clone()), any(LISTENER, l)],
    );
    let (_, message) = nacked(&ads, LISTENER, &ads.last_nonce()).await;
    assert!(message.contains("duplicate"), "{message}");
    let wrong =
        legate_tests::xds_server::any(LISTENER, tagged_listener("l9", free_port(), "c1", "9"));
    ads.set(CLUSTER, "2", vec![wrong]);
    let (version, message) = nacked(&ads, CLUSTER, &ads.last_nonce()).await;
    assert_eq!(version, "1");
    assert!(message.contains("does not match"), "{message}");
    let r = curl(&format!("http://127.0.0.1:{port}/"), &[]);
    assert_eq!((r.status, r.header("x-version")), (200, Some("2")));
    assert!(stat(admin, "listener_manager.lds.update_rejected").unwrap() >= 3);
    assert!(stat(admin, "cluster_manager.cds.update_rejected").unwrap() >= 1);

    // /config_dump shows what serves and what was rejected.
    let dump: Value =
        serde_json::from_str(&admin_get(admin, "/config_dump?resource=dynamic_listeners").body)
            .unwrap();
    let items = dump["configs"].as_array().unwrap();
    let l1 = items.iter().find(|l| l["name"] == "l1").unwrap();
    assert_eq!(l1["active_state"]["version_info"], "2");
    assert_eq!(l1["active_state"]["listener"]["name"], "l1");
    assert!(l1["error_state"]["details"]
        .as_str()
        .unwrap()
        .contains("transparent"));
    let bad = items.iter().find(|l| l["name"] == "bad").unwrap();
    assert!(bad.get("active_state").is_none() && bad["error_state"]["details"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eds_clusters_warm_and_unreferenced_resources_go() {
    let up = upstream("a").await;
    let ads = ScriptedAds::start("127.0.0.1:0".parse().unwrap()).await;
    let (port, admin) = (free_port(), free_port());
    ads.set(CLUSTER, "1", vec![any(CLUSTER, eds_cluster("e1", "1s"))]);
    ads.set(
        LISTENER,
        "1",
        vec![any(LISTENER, rds_listener("l1", port, "r1", "v1"))],
    );
    let _l = Legate::start(BIN, &ads_bootstrap(ads.addr, admin), &[], Some(admin));
    // The listener warms until its route table arrives.
    let rds = ads
        .wait_for(WAIT, |_, r| {
            r.type_url == ROUTE && r.resource_names == ["r1"]
        })
        .await;
    assert!(
        rds.is_some(),
        "RDS subscribes to the listener's route table"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "warming listener"
    );
    let route = routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "e1"}}]));
    let mut route = route;
    route["name"] = json!("r1");
    ads.set(ROUTE, "1", vec![any(ROUTE, route)]);
    wait_port(port, true);
    // The cluster warms until its endpoints arrive: no such cluster yet.
    let eds = ads
        .wait_for(WAIT, |_, r| {
            r.type_url == ENDPOINT && r.resource_names == ["e1"]
        })
        .await;
    assert!(eds.is_some(), "EDS subscribes to the cluster's endpoints");
    assert_eq!(curl(&format!("http://127.0.0.1:{port}/"), &[]).status, 503);
    assert_eq!(stat(admin, "cluster_manager.warming_clusters"), Some(1));
    ads.set(ENDPOINT, "1", vec![any(ENDPOINT, cla("e1", &[up.addr]))]);
    let r = eventually(&format!("http://127.0.0.1:{port}/"), |r| r.status == 200);
    assert_eq!(r.status, 200);
    assert_eq!(stat(admin, "cluster_manager.warming_clusters"), Some(0));
    let dump: Value = serde_json::from_str(
        &admin_get(admin, "/config_dump?resource=dynamic_active_clusters").body,
    )
    .unwrap();
    assert_eq!(dump["configs"][0]["cluster"]["name"], "e1");
    assert_eq!(dump["configs"][0]["version_info"], "1");

    // SotW: clusters and listeners missing from a response are removed.
    ads.set(CLUSTER, "2", vec![]);
    let r = eventually(&format!("http://127.0.0.1:{port}/"), |r| r.status == 503);
    assert_eq!(r.status, 503, "the removed cluster no longer serves");
    acked(&ads, CLUSTER, "2").await;
    ads.set(LISTENER, "2", vec![]);
    wait_port(port, false);
    assert!(stat(admin, "listener_manager.listener_removed").unwrap() >= 1);
}

/// Sends requests back to back on one client until `stop`; counts results.
fn load(
    url: String,
    h2: bool,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, u64, Vec<String>)> {
    tokio::spawn(async move {
        use http_body_util::{BodyExt, Empty};
        use hyper_util::client::legacy::Client;
        let mut builder = Client::builder(hyper_util::rt::TokioExecutor::new());
        builder.http2_only(h2);
        let client = builder.build_http::<Empty<bytes::Bytes>>();
        let (mut ok, mut failed, mut errors) = (0u64, 0u64, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            let mut r = client.get(url.parse().unwrap()).await;
            // A stream above a graceful GOAWAY's last stream id was never
            // processed, and RFC 9113 §6.8 lets the client retry it on a new
            // connection, as any HTTP/2 client (Envoy too) does.
            if matches!(&r, Err(e) if format!("{e:?}").contains("GoAway(b\"\", NO_ERROR")) {
                r = client.get(url.parse().unwrap()).await;
            }
            match r {
                Ok(resp) => {
                    let status = resp.status();
                    let _ = resp.into_body().collect().await;
                    if status == 200 {
                        ok += 1;
                    } else {
                        failed += 1;
                        errors.push(format!("status {status}"));
                    }
                }
                Err(e) => {
                    failed += 1;
                    errors.push(format!("{e:?}"));
                }
            }
        }
        (ok, failed, errors)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_down_for_10s_under_load_fails_nothing_and_reconnect_resumes() {
    let up = upstream("a").await;
    let mut ads = ScriptedAds::start("127.0.0.1:0".parse().unwrap()).await;
    let (port, admin) = (free_port(), free_port());
    serve_one(&ads, up.addr, port, "1");
    let _l = Legate::start(BIN, &ads_bootstrap(ads.addr, admin), &[], Some(admin));
    wait_port(port, true);
    acked(&ads, LISTENER, "1").await;
    acked(&ads, CLUSTER, "1").await;
    let stop = Arc::new(AtomicBool::new(false));
    let url = format!("http://127.0.0.1:{port}/");
    let (h1, h2) = (
        load(url.clone(), false, stop.clone()),
        load(url, true, stop.clone()),
    );

    ads.shutdown().await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(stat(admin, "control_plane.connected_state"), Some(0));
    ads.restart().await;
    // The new stream re-requests each type with the last accepted version,
    // no nonce, and the node on its first message.
    let again = ads
        .wait_for(Duration::from_secs(40), |stream, r| {
            stream == 2 && r.type_url == LISTENER
        })
        .await
        .expect("Legate reconnects");
    assert_eq!(
        (again.version_info.as_str(), again.response_nonce.as_str()),
        ("1", "")
    );
    let first = ads.requests().into_iter().find(|(s, _)| *s == 2).unwrap().1;
    assert!(first.node.is_some(), "a new stream sends the node again");
    assert!(
        first.response_nonce.is_empty(),
        "nonces never cross streams"
    );
    stop.store(true, Ordering::Relaxed);
    let (ok1, failed1, e1) = h1.await.unwrap();
    let (ok2, failed2, e2) = h2.await.unwrap();
    println!("control plane down 10 s: HTTP/1 {ok1} ok / {failed1} failed, HTTP/2 {ok2} ok / {failed2} failed");
    assert_eq!((failed1, failed2), (0, 0), "{e1:?} {e2:?}");
    assert!(ok1 > 100 && ok2 > 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_updates_under_load_fail_no_request() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let ads = ScriptedAds::start("127.0.0.1:0".parse().unwrap()).await;
    let (port, admin) = (free_port(), free_port());
    let route = |tag: &str| {
        let mut r = routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "e1"}}]));
        r["name"] = json!("r1");
        r["response_headers_to_add"] = json!([{"header": {"key": "x-version", "value": tag}}]);
        any(ROUTE, r)
    };
    ads.set(CLUSTER, "0", vec![any(CLUSTER, eds_cluster("e1", "1s"))]);
    ads.set(ENDPOINT, "0", vec![any(ENDPOINT, cla("e1", &[a.addr]))]);
    ads.set(ROUTE, "0", vec![route("0")]);
    ads.set(
        LISTENER,
        "0",
        vec![any(LISTENER, rds_listener("l1", port, "r1", "s0"))],
    );
    let _l = Legate::start(BIN, &ads_bootstrap(ads.addr, admin), &[], Some(admin));
    wait_port(port, true);
    let url = format!("http://127.0.0.1:{port}/");
    eventually(&url, |r| r.status == 200);

    let stop = Arc::new(AtomicBool::new(false));
    let (h1, h2) = (
        load(url.clone(), false, stop.clone()),
        load(url, true, stop.clone()),
    );
    let updates = AtomicU64::new(0);
    let (only_b, both) = (vec![b.addr], vec![a.addr, b.addr]);
    for i in 1..=100u32 {
        let v = i.to_string();
        match i % 4 {
            0 => ads.set(
                LISTENER,
                &v,
                vec![any(
                    LISTENER,
                    rds_listener("l1", port, "r1", &format!("s{i}")),
                )],
            ),
            1 => ads.set(ROUTE, &v, vec![route(&v)]),
            2 => ads.set(
                CLUSTER,
                &v,
                vec![any(CLUSTER, eds_cluster("e1", &format!("{}s", 1 + i % 3)))],
            ),
            _ => ads.set(
                ENDPOINT,
                &v,
                vec![any(
                    ENDPOINT,
                    cla("e1", if i % 8 == 3 { &only_b } else { &both }),
                )],
            ),
        }
        updates.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    // Every type's last version was accepted.
    acked(&ads, LISTENER, "100").await;
    acked(&ads, ROUTE, "97").await;
    acked(&ads, CLUSTER, "98").await;
    acked(&ads, ENDPOINT, "99").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok1, failed1, e1) = h1.await.unwrap();
    let (ok2, failed2, e2) = h2.await.unwrap();
    println!(
        "{} updates: HTTP/1 keep-alive {ok1} ok / {failed1} failed, HTTP/2 {ok2} ok / {failed2} failed",
        updates.load(Ordering::Relaxed)
    );
    assert_eq!((failed1, failed2), (0, 0), "{e1:?} {e2:?}");
    assert!(ok1 > 100 && ok2 > 100);
    assert!(stat(admin, "listener_manager.listener_modified").unwrap() >= 20);
}

fn with_ads_source(boot: &str, grpc_service: Value, clusters: Vec<Value>) -> String {
    let mut b: Value = serde_json::from_str(boot).unwrap();
    b["dynamic_resources"]["ads_config"]["grpc_services"] = json!([grpc_service]);
    b["static_resources"]["clusters"] = json!(clusters);
    b.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_servers_on_unix_sockets_and_google_grpc_targets() {
    let up = upstream("a").await;
    // Istio's shape: the xDS cluster's endpoint is a Unix socket.
    let sock = std::env::temp_dir().join(format!("legate-xds-{}.sock", std::process::id()));
    let ads = ScriptedAds::start_unix(&sock).await;
    let (port, admin) = (free_port(), free_port());
    serve_one(&ads, up.addr, port, "uds");
    let pipe_cluster = json!({"name": "xds", "type": "STATIC", "connect_timeout": "1s", "http2_protocol_options": {},
        "load_assignment": {"cluster_name": "xds", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"pipe": {"path": sock.to_string_lossy()}}}}]}]}});
    let boot = with_ads_source(
        &ads_bootstrap("127.0.0.1:1".parse().unwrap(), admin),
        json!({"envoy_grpc": {"cluster_name": "xds"}}),
        vec![pipe_cluster.clone()],
    );
    let l = Legate::start(BIN, &boot, &[], Some(admin));
    wait_port(port, true);
    assert_eq!(
        curl(&format!("http://127.0.0.1:{port}/"), &[]).header("x-version"),
        Some("uds")
    );
    drop(l);

    // A route may not send traffic to a pipe cluster: refused, naming it.
    let mut b: Value = serde_json::from_str(&boot).unwrap();
    b["static_resources"]["listeners"] = json!([tagged_listener("s", free_port(), "xds", "x")]);
    let out = validate(BIN, &b.to_string());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cluster 'xds' has Unix-socket"));

    // google_grpc with a target URI, no cluster involved.
    let tcp = ScriptedAds::start("127.0.0.1:0".parse().unwrap()).await;
    let (port2, admin2) = (free_port(), free_port());
    serve_one(&tcp, up.addr, port2, "google");
    let boot = with_ads_source(
        &ads_bootstrap("127.0.0.1:1".parse().unwrap(), admin2),
        json!({"google_grpc": {"target_uri": tcp.addr.to_string(), "stat_prefix": "xds"}}),
        vec![],
    );
    let _l = Legate::start(BIN, &boot, &[], Some(admin2));
    wait_port(port2, true);
    assert_eq!(
        curl(&format!("http://127.0.0.1:{port2}/"), &[]).header("x-version"),
        Some("google")
    );
    let _ = std::fs::remove_file(&sock);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecds_router_config_gates_its_listener() {
    const EXT: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
    let up = upstream("a").await;
    let ads = ScriptedAds::start("127.0.0.1:0".parse().unwrap()).await;
    let (port, admin) = (free_port(), free_port());
    let mut l = tagged_listener("l1", port, "c1", "ecds");
    l["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"] = json!([{
        "name": "the-router",
        "config_discovery": {
            "config_source": {"ads": {}, "resource_api_version": "V3"},
            "type_urls": [ROUTER],
        },
    }]);
    ads.set(
        CLUSTER,
        "1",
        vec![any(CLUSTER, cluster("c1", &[up.addr], json!({})))],
    );
    ads.set(LISTENER, "1", vec![any(LISTENER, l)]);
    let _l = Legate::start(BIN, &ads_bootstrap(ads.addr, admin), &[], Some(admin));
    let sub = ads
        .wait_for(WAIT, |_, r| {
            r.type_url == EXT && r.resource_names == ["the-router"]
        })
        .await;
    assert!(
        sub.is_some(),
        "ECDS subscribes to the filter's config by its name"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "warming"
    );
    // A config of another filter type is refused: the listener stays warming.
    ads.set(
        EXT,
        "1",
        vec![any(EXT, json!({"name": "the-router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer", "max_request_bytes": 10}}))],
    );
    let (_, message) = nacked(&ads, EXT, &ads.last_nonce()).await;
    assert!(message.contains("Buffer"), "{message}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "still warming"
    );
    ads.set(
        EXT,
        "2",
        vec![any(
            EXT,
            json!({"name": "the-router", "typed_config": {"@type": ROUTER}}),
        )],
    );
    wait_port(port, true);
    assert_eq!(
        curl(&format!("http://127.0.0.1:{port}/"), &[]).header("x-version"),
        Some("ecds")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_server_over_tls_with_the_xds_clusters_context() {
    use legate_tests::pki::{self, Ca, LeafOpts};
    let up = upstream("a").await;
    let ca = Ca::new("xds-tls");
    let leaf = ca.leaf("xds", &["xds.test"], LeafOpts::default());
    // The server offers h2 only: a client without ALPN h2 cannot talk gRPC.
    let ads = ScriptedAds::start_tls(
        "127.0.0.1:0".parse().unwrap(),
        pki::server_config(&leaf, &["h2"], None),
    )
    .await;
    let (port, admin) = (free_port(), free_port());
    serve_one(&ads, up.addr, port, "tls");
    let xds_cluster = |ca_file: &str| {
        cluster(
            "xds",
            &[ads.addr],
            json!({"http2_protocol_options": {}, "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": "xds.test",
                "common_tls_context": {"validation_context": {
                    "trusted_ca": {"filename": ca_file},
                    "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": "xds.test"}}],
                }},
            }}}),
        )
    };
    let boot = with_ads_source(
        &ads_bootstrap(ads.addr, admin),
        json!({"envoy_grpc": {"cluster_name": "xds"}}),
        vec![xds_cluster(pki::s(&ca.ca_path()))],
    );
    let l = Legate::start(BIN, &boot, &[], Some(admin));
    wait_port(port, true);
    assert_eq!(
        curl(&format!("http://127.0.0.1:{port}/"), &[]).header("x-version"),
        Some("tls")
    );
    drop(l);

    // A CA that did not sign the server: no connection, so no config, and
    // never a plaintext fallback.
    let other = Ca::new("xds-tls-other");
    let (port2, admin2) = (free_port(), free_port());
    ads.set(
        LISTENER,
        "2",
        vec![any(LISTENER, tagged_listener("l2", port2, "c1", "tls"))],
    );
    let boot = with_ads_source(
        &ads_bootstrap(ads.addr, admin2),
        json!({"envoy_grpc": {"cluster_name": "xds"}}),
        vec![xds_cluster(pki::s(&other.ca_path()))],
    );
    let _l = Legate::start(BIN, &boot, &[], Some(admin2));
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port2)).is_err(),
        "no listener from an unverified server"
    );
    let stats = admin_get(admin2, "/stats?filter=control_plane.connected_state");
    assert!(
        stats.body.contains("control_plane.connected_state: 0"),
        "{}",
        stats.body
    );

    // SDS-delivered secrets for the xDS connection itself are refused,
    // naming the field, rather than waited on.
    let mut sds = xds_cluster("unused");
    sds["transport_socket"]["typed_config"]["common_tls_context"] = json!({
        "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": {"ads": {}, "resource_api_version": "V3"}}});
    let boot = with_ads_source(
        &ads_bootstrap(ads.addr, free_port()),
        json!({"envoy_grpc": {"cluster_name": "xds"}}),
        vec![sds],
    );
    let out = validate(BIN, &boot);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("static_resources.clusters[0].transport_socket") && err.contains("SDS"),
        "{err}"
    );
}

/// A listener's `additional_addresses` change in place: the primary keeps
/// its socket (no EADDRINUSE from binding it again), an added address
/// accepts, a removed one stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn additional_addresses_update_in_place() {
    let up = upstream("a").await;
    let ads = ScriptedAds::start("127.0.0.1:0".parse().unwrap()).await;
    let (port, extra1, extra2, admin) = (free_port(), free_port(), free_port(), free_port());
    let with = |extra: u16, tag: &str| {
        let mut l = tagged_listener("l1", port, "c1", tag);
        l["additional_addresses"] = json!([{"address": addr("127.0.0.2", extra)}]);
        l
    };
    ads.set(
        CLUSTER,
        "1",
        vec![any(CLUSTER, cluster("c1", &[up.addr], json!({})))],
    );
    ads.set(LISTENER, "1", vec![any(LISTENER, with(extra1, "1"))]);
    let _l = Legate::start(BIN, &ads_bootstrap(ads.addr, admin), &[], Some(admin));
    wait_port(port, true);
    let on = |ip: &str, p: u16| curl(&format!("http://{ip}:{p}/"), &[]);
    assert_eq!(on("127.0.0.2", extra1).header("x-version"), Some("1"));
    ads.set(LISTENER, "2", vec![any(LISTENER, with(extra2, "2"))]);
    acked(&ads, LISTENER, "2").await;
    assert_eq!(on("127.0.0.1", port).header("x-version"), Some("2"));
    assert_eq!(on("127.0.0.2", extra2).header("x-version"), Some("2"));
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.2", extra1)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the removed address still accepts"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An HTTP filter of a type Legate does not know: skipped when it is
/// `is_optional` (the listener is acknowledged and serves), refused
/// naming it otherwise, as Envoy does over xDS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_optional_filter_of_an_unknown_type_is_skipped() {
    use legate_proto::envoy_types::pb::envoy::config::listener::v3::{filter, Listener};
    use legate_proto::envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        http_filter, HttpConnectionManager, HttpFilter,
    };
    use prost::Message;
    let up = upstream("a").await;
    let ads = ScriptedAds::start("127.0.0.1:0".parse().unwrap()).await;
    let (port, admin) = (free_port(), free_port());
    // The listener with an unknown filter first, `optional` or not.
    let with_unknown = |optional: bool| {
        let mut a = any(LISTENER, tagged_listener("l1", port, "c1", "1"));
        let mut l = Listener::decode(a.value.as_slice()).unwrap();
        let Some(filter::ConfigType::TypedConfig(h)) =
            &mut l.filter_chains[0].filters[0].config_type
        else {
            panic!("the HCM")
        };
        let mut hcm = HttpConnectionManager::decode(h.value.as_slice()).unwrap();
        hcm.http_filters.insert(
            0,
            HttpFilter {
                name: "acme.unknown".into(),
                is_optional: optional,
                config_type: Some(http_filter::ConfigType::TypedConfig(
                    legate_proto::envoy_types::pb::google::protobuf::Any {
                        type_url: "type.googleapis.com/acme.filters.Unknown".into(),
                        value: vec![8, 1],
                    },
                )),
                ..Default::default()
            },
        );
        h.value = hcm.encode_to_vec();
        a.value = l.encode_to_vec();
        a
    };
    ads.set(
        CLUSTER,
        "1",
        vec![any(CLUSTER, cluster("c1", &[up.addr], json!({})))],
    );
    ads.set(LISTENER, "1", vec![with_unknown(true)]);
    let _l = Legate::start(BIN, &ads_bootstrap(ads.addr, admin), &[], Some(admin));
    wait_port(port, true);
    acked(&ads, LISTENER, "1").await;
    assert_eq!(curl(&format!("http://127.0.0.1:{port}/"), &[]).status, 200);
    ads.set(LISTENER, "2", vec![with_unknown(false)]);
    let (_, message) = nacked(&ads, LISTENER, &ads.last_nonce()).await;
    assert!(message.contains("acme.filters.Unknown"), "{message}");
}
