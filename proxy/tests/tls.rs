//! TLS through the real binary with real clients (curl, openssl s_client)
//! and certificates made at test time: termination with SNI certificate
//! choice and ALPN, `tls_inspector` chain matching and passthrough, the
//! mTLS accept/reject matrix, and origination to TLS upstreams.

mod common;
use common::*;
use legate_tests::pki::{self, s, Ca, Leaf, LeafOpts};
use serde_json::{json, Value};
use std::process::Command;

const TLS_CTX: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
const UP_TLS_CTX: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";

fn file(p: &std::path::Path) -> Value {
    json!({"filename": s(p)})
}

fn cert(l: &Leaf) -> Value {
    json!({"certificate_chain": file(&l.cert), "private_key": file(&l.key)})
}

fn downstream(common: Value, extra: Value) -> Value {
    let mut ctx = json!({"@type": TLS_CTX, "common_tls_context": common});
    for (k, v) in extra.as_object().unwrap() {
        ctx[k] = v.clone();
    }
    json!({"name": "envoy.transport_sockets.tls", "typed_config": ctx})
}

fn http_filter(cluster: &str) -> Value {
    let rc = routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]));
    json!({"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm(rc, json!({}))})
}

fn tcp_filter(cluster: &str) -> Value {
    json!({"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": "tcp", "cluster": cluster}})
}

fn tls_inspector() -> Value {
    json!([{"name": "envoy.filters.listener.tls_inspector", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}])
}

/// An echo upstream behind TLS with `leaf`; with `client_ca` (PEM) it asks
/// for client certificates.
async fn tls_upstream(name: &str, leaf: &Leaf, client_ca: Option<&str>) -> echo::Echo {
    echo::start_tls(
        name,
        "127.0.0.1:0".parse().unwrap(),
        pki::server_config(leaf, &[], client_ca),
    )
    .await
    .unwrap()
}

/// What a curl run saw; Err carries curl's exit code and message.
struct Seen {
    status: u16,
    version: String,
    body: String,
    headers: String,
}

fn try_curl(url: &str, args: &[&str]) -> Result<Seen, String> {
    let out = Command::new("curl")
        .args([
            "-s",
            "-S",
            "--max-time",
            "10",
            "-D",
            "-",
            "-w",
            "\n%{http_version}",
        ])
        .args(args)
        .arg(url)
        .output()
        .expect("curl must be installed");
    if !out.status.success() {
        return Err(format!(
            "curl exit {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (rest, version) = text.rsplit_once('\n').unwrap();
    let (headers, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    let status = headers
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok(Seen {
        status,
        version: version.to_string(),
        body: body.to_string(),
        headers: headers.to_ascii_lowercase(),
    })
}

fn resolve(name: &str, port: u16) -> String {
    format!("{name}:{port}:127.0.0.1")
}

/// The subject CN of the certificate `openssl s_client` is shown for `sni`.
fn served_cn(port: u16, sni: &str) -> String {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            sni,
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl must be installed");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("subject=").map(str::to_string))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminates_tls_choosing_the_certificate_by_sni_and_h2_by_alpn() {
    let ca = Ca::new("term");
    let a = ca.leaf("a", &["a.test"], LeafOpts::default());
    let wild = ca.leaf("wild", &["*.b.test"], LeafOpts::default());
    let up = upstream("up").await;
    let (port, admin) = (free_port(), free_port());
    // Both certificates from static secrets (Envoy refuses mixing them
    // with inline ones).
    let l = json!({
        "name": "tls", "address": addr("127.0.0.1", port),
        "filter_chains": [{
            "filters": [http_filter("up")],
            "transport_socket": downstream(json!({
                "tls_certificate_sds_secret_configs": [{"name": "a"}, {"name": "wild"}],
                "alpn_protocols": ["h2", "http/1.1"],
            }), json!({})),
        }],
    });
    let mut cfg: Value = serde_json::from_str(&bootstrap(
        admin,
        vec![l],
        vec![cluster("up", &[up.addr], json!({}))],
    ))
    .unwrap();
    cfg["static_resources"]["secrets"] = json!([
        {"name": "a", "tls_certificate": cert(&a)},
        {"name": "wild", "tls_certificate": cert(&wild)},
    ]);
    let _legate = Legate::start(BIN, &cfg.to_string(), &[port], Some(admin));

    let ca_arg = s(&ca.ca_path()).to_string();
    // curl checks the host name against the certificate it is given, so
    // each success proves the right certificate was chosen.
    for host in ["a.test", "x.b.test"] {
        let r = try_curl(
            &format!("https://{host}:{port}/p"),
            &["--cacert", &ca_arg, "--resolve", &resolve(host, port)],
        )
        .unwrap_or_else(|e| panic!("{host}: {e}"));
        assert_eq!(r.status, 200, "{host}");
        assert_eq!(r.version, "2", "ALPN h2 offered by curl and the listener");
        let echo: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(echo["headers"]["x-forwarded-proto"], "https");
    }
    assert!(served_cn(port, "x.b.test").contains("b.test"));
    assert!(served_cn(port, "a.test").contains("a.test"));
    // HTTP/1.1 when the client offers only that.
    let r = try_curl(
        &format!("https://a.test:{port}/"),
        &[
            "--cacert",
            &ca_arg,
            "--resolve",
            &resolve("a.test", port),
            "--http1.1",
        ],
    )
    .unwrap();
    assert_eq!((r.status, r.version.as_str()), (200, "1.1"));
    // A plaintext client gets no HTTP answer from a TLS chain.
    assert!(try_curl(&format!("http://127.0.0.1:{port}/"), &[]).is_err());
    let hs = stat(
        admin,
        "listener.127.0.0.1_{port}.ssl.handshake"
            .replace("{port}", &port.to_string())
            .as_str(),
    );
    assert!(hs.unwrap_or(0) >= 3, "handshakes counted: {hs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_inspector_routes_by_sni_passes_tls_through_and_keeps_plaintext() {
    let ca = Ca::new("insp");
    let term = ca.leaf("term", &["term.test"], LeafOpts::default());
    let pass = ca.leaf("pass", &["pass.test"], LeafOpts::default());
    let terminated = upstream("terminated").await;
    let plain = upstream("plain").await;
    // The passthrough upstream terminates TLS itself, with its own cert.
    let behind = tls_upstream("behind", &pass, None).await;
    let (port, admin) = (free_port(), free_port());
    let l = json!({
        "name": "edge", "address": addr("127.0.0.1", port),
        "listener_filters": tls_inspector(),
        "filter_chains": [
            {
                "filter_chain_match": {"server_names": ["term.test"]},
                "filters": [http_filter("terminated")],
                "transport_socket": downstream(json!({"tls_certificates": [cert(&term)]}), json!({})),
            },
            {
                "filter_chain_match": {"server_names": ["pass.test"]},
                "filters": [tcp_filter("behind")],
            },
            {
                "filter_chain_match": {"transport_protocol": "raw_buffer"},
                "filters": [http_filter("plain")],
            },
        ],
    });
    let cfg = bootstrap(
        admin,
        vec![l],
        vec![
            cluster("terminated", &[terminated.addr], json!({})),
            cluster("behind", &[behind.addr], json!({})),
            cluster("plain", &[plain.addr], json!({})),
        ],
    );
    let _legate = Legate::start(BIN, &cfg, &[port], Some(admin));
    let ca_arg = s(&ca.ca_path()).to_string();
    let get = |host: &str, scheme: &str| {
        try_curl(
            &format!("{scheme}://{host}:{port}/"),
            &["--cacert", &ca_arg, "--resolve", &resolve(host, port)],
        )
        .unwrap_or_else(|e| panic!("{host}: {e}"))
    };
    let t = get("term.test", "https");
    assert!(
        t.headers.contains("x-echo-server: terminated"),
        "{}",
        t.headers
    );
    // Passthrough: the upstream's own certificate and SNI, untouched.
    let p = get("pass.test", "https");
    assert!(p.headers.contains("x-echo-server: behind"), "{}", p.headers);
    assert!(p.headers.contains("x-echo-sni: pass.test"), "{}", p.headers);
    let c = get("127.0.0.1", "http");
    assert!(c.headers.contains("x-echo-server: plain"), "{}", c.headers);
    // An SNI no chain names: no chain matches (transport is tls, not
    // raw_buffer), so the connection is closed.
    assert!(try_curl(
        &format!("https://other.test:{port}/"),
        &[
            "--cacert",
            &ca_arg,
            "--resolve",
            &resolve("other.test", port)
        ],
    )
    .is_err());
    assert!(stat(admin, "tls_inspector.sni_found").unwrap_or(0) >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_accepts_only_the_right_identity_from_the_right_ca() {
    let ca = Ca::new("mtls");
    let rogue = Ca::new("rogue");
    let server = ca.leaf("server", &["mtls.test"], LeafOpts::default());
    const GOOD: &str = "spiffe://td.test/ns/a/sa/good";
    let id = |uri| LeafOpts {
        uris: std::slice::from_ref(uri),
        ..Default::default()
    };
    let good = ca.leaf("good", &[], id(&GOOD));
    let wrong_san = ca.leaf("wrongsan", &[], id(&"spiffe://td.test/ns/a/sa/bad"));
    let wrong_ca = rogue.leaf("wrongca", &[], id(&GOOD));
    let expired = ca.leaf(
        "expired",
        &[],
        LeafOpts {
            uris: &[GOOD],
            not_before_days: Some(-10),
            not_after_days: Some(-1),
            ..Default::default()
        },
    );
    let future = ca.leaf(
        "future",
        &[],
        LeafOpts {
            uris: &[GOOD],
            not_before_days: Some(2),
            not_after_days: Some(10),
            ..Default::default()
        },
    );
    let up = upstream("up").await;
    let (port, admin) = (free_port(), free_port());
    let l = json!({
        "name": "mtls", "address": addr("127.0.0.1", port),
        "filter_chains": [{
            "filters": [http_filter("up")],
            "transport_socket": downstream(json!({
                "tls_certificates": [cert(&server)],
                "validation_context": {
                    "trusted_ca": file(&ca.ca_path()),
                    "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": GOOD}}],
                },
            }), json!({"require_client_certificate": true})),
        }],
    });
    let cfg = bootstrap(admin, vec![l], vec![cluster("up", &[up.addr], json!({}))]);
    let _legate = Legate::start(BIN, &cfg, &[port], Some(admin));
    let ca_arg = s(&ca.ca_path()).to_string();
    let url = format!("https://mtls.test:{port}/");
    let rs = resolve("mtls.test", port);
    let with = |leaf: Option<&Leaf>| {
        let mut args = vec!["--cacert", &ca_arg, "--resolve", &rs];
        if let Some(l) = leaf {
            args.extend(["--cert", s(&l.cert), "--key", s(&l.key)]);
        }
        // TLS 1.3 reports a rejected client certificate after the
        // handshake: the request itself must fail.
        try_curl(&url, &args).map(|r| r.status)
    };
    assert_eq!(with(Some(&good)), Ok(200), "the right identity is served");
    let mut false_accepts = Vec::new();
    for (what, leaf) in [
        ("no client certificate", None),
        ("wrong SAN", Some(&wrong_san)),
        ("wrong CA", Some(&wrong_ca)),
        ("expired", Some(&expired)),
        ("not yet valid", Some(&future)),
    ] {
        if let Ok(status) = with(leaf) {
            false_accepts.push(format!("{what}: {status}"));
        }
    }
    assert!(false_accepts.is_empty(), "false accepts: {false_accepts:?}");
    assert_eq!(
        up.hits.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "only the good client reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn originates_tls_with_sni_ca_check_and_client_certificate() {
    let ca = Ca::new("orig");
    let rogue = Ca::new("orig-rogue");
    let up_leaf = ca.leaf("up", &["up.test"], LeafOpts::default());
    let client = ca.leaf("client", &["legate.test"], LeafOpts::default());
    let up = tls_upstream("tls-up", &up_leaf, Some(&ca.cert_pem)).await;
    let ctx = |ca: &Ca, sni: &str| {
        json!({"transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": UP_TLS_CTX, "sni": sni,
            "common_tls_context": {
                "tls_certificates": [cert(&client)],
                "validation_context": {"trusted_ca": file(&ca.ca_path())},
            },
        }}})
    };
    let with_san = |dns: &str| {
        let mut c = ctx(&ca, "up.test");
        c["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]
            ["match_typed_subject_alt_names"] =
            json!([{"san_type": "DNS", "matcher": {"exact": dns}}]);
        c
    };
    let mut h2 = ctx(&ca, "up.test");
    h2["http2_protocol_options"] = json!({});
    let rc = routes(json!([
        {"match": {"prefix": "/good"}, "route": {"cluster": "good"}},
        {"match": {"prefix": "/rogue"}, "route": {"cluster": "rogue"}},
        {"match": {"prefix": "/san-ok"}, "route": {"cluster": "san-ok"}},
        {"match": {"prefix": "/san-bad"}, "route": {"cluster": "san-bad"}},
        {"match": {"prefix": "/h2"}, "route": {"cluster": "h2"}},
    ]));
    let (l, url, admin) = start(
        hcm(rc, json!({})),
        vec![
            cluster("good", &[up.addr], ctx(&ca, "up.test")),
            cluster("rogue", &[up.addr], ctx(&rogue, "up.test")),
            cluster("san-ok", &[up.addr], with_san("up.test")),
            cluster("san-bad", &[up.addr], with_san("other.test")),
            cluster("h2", &[up.addr], h2),
        ],
    );
    let r = try_curl(&format!("{url}/good"), &[]).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.headers.contains("x-echo-sni: up.test"), "{}", r.headers);
    assert!(
        r.headers.contains("x-echo-client-cert: true"),
        "{}",
        r.headers
    );
    // A server certificate from a CA the cluster does not trust: 503.
    let r = try_curl(&format!("{url}/rogue"), &[]).unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    // SAN matchers on the upstream certificate.
    assert_eq!(try_curl(&format!("{url}/san-ok"), &[]).unwrap().status, 200);
    let r = try_curl(&format!("{url}/san-bad"), &[]).unwrap();
    assert_eq!(r.status, 503, "a SAN mismatch must not connect: {}", r.body);
    // HTTP/2 over TLS to the upstream.
    let r = try_curl(&format!("{url}/h2"), &[]).unwrap();
    assert_eq!(r.status, 200);
    let echo: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(echo["version"], "HTTP/2.0", "{echo}");
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::Relaxed), 3);
    drop(l);
    let _ = admin;

    // tcp_proxy originates TLS too: plaintext in, TLS to the upstream.
    let (port, admin) = (free_port(), free_port());
    let l = json!({"name": "tcp", "address": addr("127.0.0.1", port),
        "filter_chains": [{"filters": [tcp_filter("good")]}]});
    let cfg = bootstrap(
        admin,
        vec![l],
        vec![cluster("good", &[up.addr], ctx(&ca, "up.test"))],
    );
    let _legate = Legate::start(BIN, &cfg, &[port], Some(admin));
    let r = try_curl(&format!("http://127.0.0.1:{port}/tcp"), &[]).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.headers.contains("x-echo-sni: up.test"), "{}", r.headers);
}

#[test]
fn validate_names_what_rustls_cannot_honour() {
    let ca = Ca::new("val");
    let leaf = ca.leaf("v", &["v.test"], LeafOpts::default());
    let with = |common: Value, extra: Value| {
        let l = json!({"name": "l", "address": addr("127.0.0.1", 10000),
            "filter_chains": [{"filters": [http_filter("c")], "transport_socket": downstream(common, extra)}]});
        let cfg = bootstrap(
            1,
            vec![l],
            vec![cluster("c", &["127.0.0.1:1".parse().unwrap()], json!({}))],
        );
        validate(BIN, &cfg)
    };
    let ok = with(json!({"tls_certificates": [cert(&leaf)]}), json!({}));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    for (common, extra, field) in [
        (
            json!({"tls_certificates": [cert(&leaf)], "tls_params": {"tls_minimum_protocol_version": "TLSv1_0"}}),
            json!({}),
            "tls_params.tls_minimum_protocol_version",
        ),
        (
            json!({"tls_certificates": [cert(&leaf)], "tls_params": {"cipher_suites": ["AES128-SHA"]}}),
            json!({}),
            "tls_params.cipher_suites[0]",
        ),
        (
            json!({"tls_certificate_sds_secret_configs": [{"name": "missing"}]}),
            json!({}),
            "tls_certificate_sds_secret_configs[0].name",
        ),
        (
            json!({"tls_certificates": [{"certificate_chain": file(&leaf.cert), "private_key": file(&ca.ca_path())}]}),
            json!({}),
            "tls_certificates[0].private_key",
        ),
        (json!({}), json!({}), "common_tls_context.tls_certificates"),
    ] {
        let out = with(common, extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted: {field}");
        assert!(err.contains(field), "{field} not named in: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_socket_matches_pick_tls_per_endpoint_metadata() {
    // Istio's auto-mTLS shape: endpoints labelled tlsMode=istio get TLS,
    // the rest plaintext.
    let ca = Ca::new("tsm");
    let up_leaf = ca.leaf("up", &["up.test"], LeafOpts::default());
    let secure = tls_upstream("secure", &up_leaf, None).await;
    let plain = upstream("plain").await;
    let matches = json!({"transport_socket_matches": [
        {"name": "tlsMode-istio", "match": {"tlsMode": "istio"}, "transport_socket": {
            "name": "envoy.transport_sockets.tls", "typed_config": {"@type": UP_TLS_CTX, "sni": "up.test",
                "common_tls_context": {"validation_context": {"trusted_ca": file(&ca.ca_path())}}}}},
        {"name": "tlsMode-disabled", "match": {}, "transport_socket": {
            "name": "envoy.transport_sockets.raw_buffer", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}}},
    ]});
    let mut labelled = cluster("labelled", &[secure.addr], matches.clone());
    labelled["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["metadata"] =
        json!({"filter_metadata": {"envoy.transport_socket_match": {"tlsMode": "istio"}}});
    let unlabelled = cluster("unlabelled", &[plain.addr], matches);
    let rc = routes(json!([
        {"match": {"prefix": "/labelled"}, "route": {"cluster": "labelled"}},
        {"match": {"prefix": "/unlabelled"}, "route": {"cluster": "unlabelled"}},
    ]));
    let (_l, url, _admin) = start(hcm(rc, json!({})), vec![labelled, unlabelled]);
    let r = try_curl(&format!("{url}/labelled"), &[]).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.headers.contains("x-echo-server: secure"), "{}", r.headers);
    assert!(r.headers.contains("x-echo-sni: up.test"), "{}", r.headers);
    let r = try_curl(&format!("{url}/unlabelled"), &[]).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.headers.contains("x-echo-server: plain"), "{}", r.headers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_and_a_stalled_handshake_is_closed_at_its_deadline() {
    let ca = Ca::new("resume");
    let leaf = ca.leaf("r", &["resume.test"], LeafOpts::default());
    let up = upstream("up").await;
    let (port, admin) = (free_port(), free_port());
    let l = json!({
        "name": "tls", "address": addr("127.0.0.1", port),
        "filter_chains": [{
            "filters": [http_filter("up")],
            "transport_socket": downstream(json!({"tls_certificates": [cert(&leaf)]}), json!({})),
            "transport_socket_connect_timeout": "1s",
        }],
    });
    let cfg = bootstrap(admin, vec![l], vec![cluster("up", &[up.addr], json!({}))]);
    let _legate = Legate::start(BIN, &cfg, &[port], Some(admin));
    // TLS 1.2: openssl reconnects five times with the first session.
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            "resume.test",
            "-reconnect",
            "-tls1_2",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let reused = text.matches("Reused, TLSv1.2").count();
    assert!(
        reused >= 5,
        "TLS 1.2: {reused} resumed of 5 reconnects\n{text}"
    );
    // TLS 1.3: tickets come after the handshake, with the first response;
    // a rustls client that made one request resumes on its next connects.
    let mut roots = rustls::RootCertStore::empty();
    for c in pki::pem_certs(&ca.cert_pem) {
        roots.add(c).unwrap();
    }
    let client = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
    let mut kinds = Vec::new();
    for _ in 0..4 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let mut tls = connector
            .connect("resume.test".try_into().unwrap(), tcp)
            .await
            .unwrap();
        kinds.push(tls.get_ref().1.handshake_kind());
        tls.write_all(b"GET / HTTP/1.1\r\nhost: resume.test\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut body = Vec::new();
        let _ = tls.read_to_end(&mut body).await;
        assert!(
            body.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
    use rustls::HandshakeKind::{Full, Resumed};
    assert_eq!(
        kinds,
        vec![Some(Full), Some(Resumed), Some(Resumed), Some(Resumed)]
    );
    // A client that connects and never says hello is closed after the
    // chain's transport_socket_connect_timeout (1 s).
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut s, &mut buf),
    )
    .await
    .expect("closed before 5 s")
    .unwrap_or(0);
    assert_eq!(n, 0);
    let took = started.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(900),
        "closed too early: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_host_sni_with_san_validation_checks_the_host_against_the_certificate() {
    let ca = Ca::new("autosni");
    let up_leaf = ca.leaf("up", &["up.test"], LeafOpts::default());
    let up = tls_upstream("auto", &up_leaf, None).await;
    let ctx = json!({"transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": UP_TLS_CTX, "auto_host_sni": true, "auto_sni_san_validation": true,
        "common_tls_context": {"validation_context": {"trusted_ca": file(&ca.ca_path())}}}}});
    // auto_host_sni sends the endpoint's hostname (Envoy's documented
    // behaviour, conformance tls-upstream-auto-sni), whatever the request's
    // host.
    let named = |name: &str, host: &str| {
        let mut c = cluster(name, &[up.addr], ctx.clone());
        c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["hostname"] =
            json!(host);
        c
    };
    let rc = routes(json!([
        {"match": {"prefix": "/other"}, "route": {"cluster": "other"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "auto"}},
    ]));
    let (_l, url, _admin) = start(
        hcm(rc, json!({})),
        vec![named("auto", "up.test"), named("other", "other.test")],
    );
    let r = try_curl(&format!("{url}/"), &["-H", "host: anything.test"]).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.headers.contains("x-echo-sni: up.test"), "{}", r.headers);
    // Another host name: its SNI is sent, and the certificate does not
    // cover it.
    let r = try_curl(&format!("{url}/other"), &["-H", "host: up.test"]).unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::Relaxed), 1);
}

/// TLS to management servers works over gRPC (tests/xds.rs); REST polling
/// has no TLS client, so a secured REST server is refused, never polled in
/// plaintext.
#[test]
fn a_rest_management_server_behind_tls_is_refused_not_reached_in_plaintext() {
    let mut xds = cluster(
        "xds",
        &["127.0.0.1:1".parse().unwrap()],
        json!({"transport_socket": {"name": "tls", "typed_config": {"@type": UP_TLS_CTX}}}),
    );
    xds["type"] = json!("STATIC");
    let cfg = json!({
        "dynamic_resources": {
            "cds_config": {"resource_api_version": "V3", "api_config_source": {
                "api_type": "REST", "transport_api_version": "V3",
                "cluster_names": ["xds"], "refresh_delay": "1s"}},
        },
        "static_resources": {"clusters": [xds]},
    });
    let out = validate(BIN, &cfg.to_string());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("static_resources.clusters[0].transport_socket")
            && err.contains("REST over TLS"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_rbac_admits_by_certificate_identity_and_source_address() {
    let ca = Ca::new("rbac");
    let server = ca.leaf("server", &["rbac.test"], LeafOpts::default());
    const GOOD: &str = "spiffe://td.test/ns/a/sa/good";
    let good = ca.leaf(
        "good",
        &[],
        LeafOpts {
            uris: &[GOOD],
            ..Default::default()
        },
    );
    let other = ca.leaf(
        "other",
        &[],
        LeafOpts {
            uris: &["spiffe://td.test/ns/a/sa/other"],
            ..Default::default()
        },
    );
    let up = upstream("up").await;
    let rbac = |rules: Value| {
        json!({"name": "envoy.filters.network.rbac", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
            "stat_prefix": "authz.", "rules": rules}})
    };
    let (port, admin) = (free_port(), free_port());
    let l = json!({
        "name": "rbac", "address": addr("127.0.0.1", port),
        "listener_filters": tls_inspector(),
        "filter_chains": [
            {
                // mTLS: any client certificate from the CA completes the
                // handshake; RBAC admits only the good identity.
                "filter_chain_match": {"transport_protocol": "tls"},
                "filters": [
                    rbac(json!({"action": "ALLOW", "policies": {"good": {
                        "permissions": [{"any": true}],
                        "principals": [{"authenticated": {"principal_name": {"exact": GOOD}}}]}}})),
                    http_filter("up"),
                ],
                "transport_socket": downstream(json!({
                    "tls_certificates": [cert(&server)],
                    "validation_context": {"trusted_ca": file(&ca.ca_path())},
                }), json!({})),
            },
            {
                // Plaintext: 127.0.0.2 is denied.
                "filter_chain_match": {"transport_protocol": "raw_buffer"},
                "filters": [
                    rbac(json!({"action": "DENY", "policies": {"block": {
                        "permissions": [{"any": true}],
                        "principals": [{"source_ip": {"address_prefix": "127.0.0.2", "prefix_len": 32}}]}}})),
                    http_filter("up"),
                ],
            },
        ],
    });
    let cfg = bootstrap(admin, vec![l], vec![cluster("up", &[up.addr], json!({}))]);
    let _legate = Legate::start(BIN, &cfg, &[port], Some(admin));
    let ca_arg = s(&ca.ca_path()).to_string();
    let rs = resolve("rbac.test", port);
    let tls = |leaf: Option<&Leaf>| {
        let mut args = vec!["--cacert", ca_arg.as_str(), "--resolve", rs.as_str()];
        if let Some(l) = leaf {
            args.extend(["--cert", s(&l.cert), "--key", s(&l.key)]);
        }
        try_curl(&format!("https://rbac.test:{port}/"), &args).map(|r| r.status)
    };
    assert_eq!(tls(Some(&good)), Ok(200));
    assert!(
        tls(Some(&other)).is_err(),
        "another identity from the same CA is denied"
    );
    assert!(tls(None).is_err(), "no certificate, no identity: denied");
    let plain = |ip: &str| {
        try_curl(&format!("http://127.0.0.1:{port}/"), &["--interface", ip]).map(|r| r.status)
    };
    assert_eq!(plain("127.0.0.1"), Ok(200));
    assert!(plain("127.0.0.2").is_err(), "a denied source is closed");
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::Relaxed), 2);
    assert_eq!(stat(admin, "authz.rbac.denied"), Some(3));
}
