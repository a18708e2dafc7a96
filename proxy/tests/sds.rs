//! SDS through the real binary, driven by a scripted ADS control plane: a
//! listener warms until its certificate arrives, certificates rotate under
//! continuous load with no failed handshake and no dropped connection, and
//! a secret that never arrives fails closed.

mod common;
use common::*;
use legate_tests::pki::{Ca, Leaf, LeafOpts};
use legate_tests::xds_server::{any, ScriptedAds, CLUSTER, LISTENER, SECRET};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const SNI: &str = "sds.test";

/// A TLS listener whose certificate is the SDS secret `secret`.
fn tls_listener(port: u16, secret: &str, fetch_timeout: &str) -> Value {
    let mut l = listener(
        "tls",
        port,
        hcm(
            routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "up"}}])),
            json!({}),
        ),
    );
    l["filter_chains"][0]["transport_socket"] = json!({"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "common_tls_context": {"tls_certificate_sds_secret_configs": [{"name": secret, "sds_config": {
            "ads": {}, "resource_api_version": "V3", "initial_fetch_timeout": fetch_timeout}}]},
    }});
    l
}

fn secret(name: &str, leaf: &Leaf) -> Value {
    json!({"name": name, "tls_certificate": {
        "certificate_chain": {"inline_string": leaf.cert_pem},
        "private_key": {"inline_string": leaf.key_pem}}})
}

fn connector(ca: &Ca) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in legate_tests::pki::pem_certs(&ca.cert_pem) {
        roots.add(c).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    // Full handshakes only: a resumed session shows the certificate of the
    // session it resumes, not the one the listener holds now.
    let mut cfg = cfg;
    cfg.resumption = rustls::client::Resumption::disabled();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A verified TLS connection to the listener, and the CN it was shown.
async fn connect(c: &tokio_rustls::TlsConnector, port: u16) -> std::io::Result<(Tls, String)> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let tls = c.connect(SNI.try_into().unwrap(), tcp).await?;
    let der = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or("")
        .to_string();
    Ok((tls, cn))
}

/// One keep-alive request; Ok(status).
async fn request(r: &mut BufReader<Tls>) -> std::io::Result<u16> {
    r.get_mut()
        .write_all(format!("GET / HTTP/1.1\r\nhost: {SNI}\r\n\r\n").as_bytes())
        .await?;
    let mut status_line = String::new();
    r.read_line(&mut status_line).await?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).await?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(status)
}

/// An upstream, the scripted ADS server with a cluster to it and a TLS
/// listener on `secret`, and Legate on them; returns the listener port.
async fn start(secret: &str, fetch_timeout: &str) -> (echo::Echo, ScriptedAds, Legate, u16) {
    let up = upstream("up").await;
    let ads = ScriptedAds::start("127.0.0.1:0".parse().unwrap()).await;
    let (port, admin) = (free_port(), free_port());
    ads.set(
        CLUSTER,
        "1",
        vec![any(CLUSTER, cluster("up", &[up.addr], json!({})))],
    );
    ads.set(
        LISTENER,
        "1",
        vec![any(LISTENER, tls_listener(port, secret, fetch_timeout))],
    );
    let legate = Legate::start(
        BIN,
        &ads_bootstrap(ads.addr, admin, "sds"),
        &[],
        Some(admin),
    );
    (up, ads, legate, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_with_no_failed_handshake_or_dropped_connection() {
    let ca = Ca::new("sds");
    let (_up, ads, _legate, port) = start("cert", "30s").await;

    // Warming: no certificate yet, so the listener is not serving.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "a listener must warm until its SDS certificate arrives"
    );
    let gen = |n: u32| ca.leaf(&format!("gen{n}"), &[SNI], LeafOpts::default());
    let first = gen(0);
    ads.set(SECRET, "0", vec![any(SECRET, secret("cert", &first))]);
    let c = connector(&ca);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok((_, cn)) = connect(&c, port).await {
            assert_eq!(cn, SNI);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "listener never served the certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Load: fresh handshakes in a loop, and long-lived keep-alive
    // connections sending requests throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let (handshakes, failures) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let serials = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (c, stop, hs, failures, serials) = (
            c.clone(),
            stop.clone(),
            handshakes.clone(),
            failures.clone(),
            serials.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match connect(&c, port).await {
                    Ok((tls, _)) => {
                        let der = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
                        serials.lock().unwrap().insert(der);
                        let mut r = BufReader::new(tls);
                        match request(&mut r).await {
                            Ok(200) => {}
                            other => failures.lock().unwrap().push(format!("request: {other:?}")),
                        }
                        hs.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.lock().unwrap().push(format!("handshake: {e}")),
                }
            }
        }));
    }
    let long_lived_requests = Arc::new(AtomicU64::new(0));
    for _ in 0..2 {
        let (c, stop, failures, n) = (
            c.clone(),
            stop.clone(),
            failures.clone(),
            long_lived_requests.clone(),
        );
        let (tls, _) = connect(&c, port).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut r = BufReader::new(tls);
            while !stop.load(Ordering::Relaxed) {
                match request(&mut r).await {
                    Ok(200) => {
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("long-lived connection: {other:?}"));
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    // Rotate every 300 ms for 4 s.
    let mut last = first;
    for n in 1..=13 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        last = gen(n);
        ads.set(
            SECRET,
            &n.to_string(),
            vec![any(SECRET, secret("cert", &last))],
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    let handshakes = handshakes.load(Ordering::Relaxed);
    let served = serials.lock().unwrap().len();
    println!(
        "rotation: 13 rotations, {handshakes} handshakes, {served} distinct certificates served, {} long-lived requests, {} failures",
        long_lived_requests.load(Ordering::Relaxed),
        failures.len()
    );
    assert!(failures.is_empty(), "failures under rotation: {failures:?}");
    assert!(
        handshakes > 50,
        "too little load to prove anything: {handshakes}"
    );
    assert!(
        served >= 5,
        "rotations reached new handshakes: {served} certificates seen"
    );
    // The newest certificate is what a new handshake gets now.
    let (tls, _) = connect(&c, port).await.unwrap();
    let der = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    assert_eq!(
        der,
        legate_tests::pki::pem_certs(&last.cert_pem)[0].to_vec()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_that_never_arrives_fails_closed() {
    let ca = Ca::new("sds-missing");
    let (up, _ads, _legate, port) = start("never", "1s").await;
    // After initial_fetch_timeout the listener serves without the secret.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "listener never activated");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c = connector(&ca);
    assert!(
        connect(&c, port).await.is_err(),
        "no certificate: no handshake"
    );
    // Nor is it served in plaintext.
    let r = legate_tests::legate::try_curl(&format!("http://127.0.0.1:{port}/"), &[]);
    assert!(r.is_err(), "served in plaintext: {:?}", r.map(|r| r.status));
    assert_eq!(up.hits.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_listener_warms_for_its_certificate_from_an_sds_server_on_a_unix_socket() {
    // Istio's shape: no dynamic_resources for it, a static `sds-grpc`
    // cluster with a pipe address, and SDS as its own gRPC service.
    let ca = Ca::new("sds-uds");
    let up = upstream("up").await;
    let sock = ca.dir.join("sds.sock");
    let sds = ScriptedAds::start_unix(&sock).await;
    let leaf = ca.leaf("uds", &[SNI], LeafOpts::default());
    let (port, admin) = (free_port(), free_port());
    let mut l = tls_listener(port, "default", "10s");
    l["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"]
        ["tls_certificate_sds_secret_configs"][0]["sds_config"] = json!({
            "api_config_source": {"api_type": "GRPC", "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}]},
            "resource_api_version": "V3"});
    let sds_cluster = json!({"name": "sds-grpc", "type": "STATIC", "connect_timeout": "1s",
        "http2_protocol_options": {},
        "load_assignment": {"cluster_name": "sds-grpc", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"pipe": {"path": sock.to_str().unwrap()}}}}]}]}});
    let cfg = common::bootstrap(
        admin,
        vec![l],
        vec![cluster("up", &[up.addr], json!({})), sds_cluster],
    );
    let _legate = Legate::start(BIN, &cfg, &[], Some(admin));
    // The static listener warms until its secret is there.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "a static listener must warm until its SDS certificate arrives"
    );
    sds.set(SECRET, "1", vec![any(SECRET, secret("default", &leaf))]);
    let c = connector(&ca);
    let deadline = Instant::now() + Duration::from_secs(10);
    let (tls, _) = loop {
        match connect(&c, port).await {
            Ok(x) => break x,
            Err(e) => {
                assert!(Instant::now() < deadline, "never served: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let der = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    assert_eq!(
        der,
        legate_tests::pki::pem_certs(&leaf.cert_pem)[0].to_vec()
    );
    let mut r = BufReader::new(tls);
    assert_eq!(request(&mut r).await.unwrap(), 200);
    assert!(sds
        .requests()
        .iter()
        .any(|(_, q)| q.type_url == SECRET && q.resource_names == ["default"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_warms_until_its_sds_client_certificate_arrives() {
    let ca = Ca::new("sds-cluster");
    let up_leaf = ca.leaf("up", &["up.test"], LeafOpts::default());
    let up = echo::start_tls(
        "tls-up",
        "127.0.0.1:0".parse().unwrap(),
        legate_tests::pki::server_config(&up_leaf, &[], Some(&ca.cert_pem)),
    )
    .await
    .unwrap();
    let ads = ScriptedAds::start("127.0.0.1:0".parse().unwrap()).await;
    let (port, admin) = (free_port(), free_port());
    let mut c = cluster("tls-up", &[up.addr], json!({}));
    c["transport_socket"] = json!({"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "sni": "up.test",
        "common_tls_context": {"tls_certificate_sds_secret_configs": [{"name": "client",
            "sds_config": {"ads": {}, "resource_api_version": "V3", "initial_fetch_timeout": "30s"}}]}}});
    ads.set(CLUSTER, "1", vec![any(CLUSTER, c)]);
    let rc = routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "tls-up"}}]));
    ads.set(
        LISTENER,
        "1",
        vec![any(LISTENER, listener("l", port, hcm(rc, json!({}))))],
    );
    let _legate = Legate::start(
        BIN,
        &ads_bootstrap(ads.addr, admin, "sds"),
        &[],
        Some(admin),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "listener never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Warming: the cluster is not there yet.
    let url = format!("http://127.0.0.1:{port}/");
    assert_eq!(curl(&url, &[]).status, 503);
    assert_eq!(stat(admin, "cluster_manager.warming_clusters"), Some(1));
    let client = ca.leaf("client", &["legate.test"], LeafOpts::default());
    ads.set(SECRET, "1", vec![any(SECRET, secret("client", &client))]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = curl(&url, &[]);
        if r.status == 200 {
            assert_eq!(r.header("x-echo-client-cert"), Some("true"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cluster never warmed: {}",
            r.status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(up.hits.load(Ordering::Relaxed), 1);
}
