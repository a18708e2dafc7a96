//! Clusters, load balancing, retries, timeouts and Envoy's upstream error
//! replies, through the real binary with real upstreams.

mod common;
use common::*;
use serde_json::json;
use std::collections::HashMap;

fn dead_addr() -> std::net::SocketAddr {
    // A port nothing listens on: bound then released.
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

fn servers(results: impl Iterator<Item = CurlResult>) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in results {
        *m.entry(r.header("x-echo-server").unwrap_or("none").to_string())
            .or_default() += 1;
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_visits_every_host_equally() {
    let (a, b, c) = (
        upstream("a").await,
        upstream("b").await,
        upstream("c").await,
    );
    let rc = routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "rr"}}]));
    let (_l, url, admin) = start(
        hcm(rc, json!({})),
        vec![cluster(
            "rr",
            &[a.addr, b.addr, c.addr],
            json!({"lb_policy": "ROUND_ROBIN"}),
        )],
    );
    let got = servers((0..30).map(|_| curl(&format!("{url}/"), &[])));
    assert_eq!(
        got,
        HashMap::from([("a".into(), 10), ("b".into(), 10), ("c".into(), 10)])
    );
    assert_eq!(stat(admin, "cluster.rr.upstream_rq_total"), Some(30));
    // Counted when the request ends, after the response is written.
    assert_eq!(wait_stat(admin, "cluster.rr.upstream_rq_2xx", 30), Some(30));
    assert_eq!(stat(admin, "cluster.rr.membership_total"), Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_endpoints_and_weighted_clusters() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let weighted_eps = json!({"name": "w", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {"cluster_name": "w", "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": addr("127.0.0.1", a.addr.port())}, "load_balancing_weight": 3},
        {"endpoint": {"address": addr("127.0.0.1", b.addr.port())}, "load_balancing_weight": 1},
    ]}]}});
    let rc = routes(json!([
        {"match": {"prefix": "/eps"}, "route": {"cluster": "w"}},
        {"match": {"prefix": "/split"}, "route": {"weighted_clusters": {"clusters": [
            {"name": "only_a", "weight": 80, "request_headers_to_add": [{"header": {"key": "x-split", "value": "a"}}]},
            {"name": "only_b", "weight": 20},
        ]}}},
    ]));
    let (_l, url, _) = start(
        hcm(rc, json!({})),
        vec![
            weighted_eps,
            cluster("only_a", &[a.addr], json!({})),
            cluster("only_b", &[b.addr], json!({})),
        ],
    );
    // Smooth weighted round robin is exact over whole cycles.
    let got = servers((0..40).map(|_| curl(&format!("{url}/eps"), &[])));
    assert_eq!(got, HashMap::from([("a".into(), 30), ("b".into(), 10)]));
    // Weighted clusters are a random split: 400 requests at 80/20 have a
    // standard deviation of 8, so ±40 is five sigma.
    let rs: Vec<CurlResult> = (0..400)
        .map(|_| curl(&format!("{url}/split"), &[]))
        .collect();
    let to_a = rs
        .iter()
        .filter(|r| r.header("x-echo-server") == Some("a"))
        .count();
    assert!(
        (280..=360).contains(&to_a),
        "80% split sent {to_a}/400 to a"
    );
    assert!(rs
        .iter()
        .filter(|r| r.header("x-echo-server") == Some("a"))
        .all(|r| r.echo()["headers"]["x-split"] == "a"));
    assert!(rs
        .iter()
        .filter(|r| r.header("x-echo-server") == Some("b"))
        .all(|r| r.echo()["headers"].get("x-split").is_none()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_policies_pin_keys_to_hosts() {
    let ups = [
        upstream("a").await,
        upstream("b").await,
        upstream("c").await,
        upstream("d").await,
    ];
    let addrs: Vec<_> = ups.iter().map(|u| u.addr).collect();
    let rc = routes(json!([
        {"match": {"prefix": "/maglev"}, "route": {"cluster": "mg", "hash_policy": [{"header": {"header_name": "x-user"}}]}},
        {"match": {"prefix": "/ring"}, "route": {"cluster": "rh", "hash_policy": [{"query_parameter": {"name": "u"}}]}},
    ]));
    let (_l, url, _) = start(
        hcm(rc, json!({})),
        vec![
            cluster("mg", &addrs, json!({"lb_policy": "MAGLEV"})),
            cluster("rh", &addrs, json!({"lb_policy": "RING_HASH"})),
        ],
    );
    let mut seen = std::collections::HashSet::new();
    for user in 0..20 {
        let h = format!("x-user: user-{user}");
        let first = curl(&format!("{url}/maglev"), &["-H", &h])
            .header("x-echo-server")
            .unwrap()
            .to_string();
        for _ in 0..3 {
            assert_eq!(
                curl(&format!("{url}/maglev"), &["-H", &h])
                    .header("x-echo-server")
                    .unwrap(),
                first
            );
        }
        let ring = curl(&format!("{url}/ring?u={user}"), &[])
            .header("x-echo-server")
            .unwrap()
            .to_string();
        assert_eq!(
            curl(&format!("{url}/ring?u={user}"), &[])
                .header("x-echo-server")
                .unwrap(),
            ring
        );
        seen.insert(first);
    }
    assert!(
        seen.len() >= 3,
        "20 keys should spread over the hosts, got {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_get_envoys_replies() {
    let up = upstream("a").await;
    let rc = routes(json!([
        {"match": {"prefix": "/down"}, "route": {"cluster": "down"}},
        {"match": {"prefix": "/empty"}, "route": {"cluster": "empty"}},
        {"match": {"prefix": "/slow"}, "route": {"cluster": "a", "timeout": "0.3s", "prefix_rewrite": "/delay/2000"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "a"}},
    ]));
    let empty = json!({"name": "empty", "type": "STATIC", "connect_timeout": "1s"});
    let (_l, url, admin) = start(
        hcm(rc, json!({})),
        vec![
            cluster("down", &[dead_addr()], json!({})),
            cluster("a", &[up.addr], json!({})),
            empty,
        ],
    );
    let r = curl(&format!("{url}/down"), &[]);
    assert_eq!(r.status, 503);
    assert!(
        r.body
            .starts_with("upstream connect error or disconnect/reset before headers"),
        "{}",
        r.body
    );
    let r = curl(&format!("{url}/empty"), &[]);
    assert_eq!((r.status, r.body.as_str()), (503, "no healthy upstream"));
    let t = std::time::Instant::now();
    let r = curl(&format!("{url}/slow"), &[]);
    assert_eq!(
        (r.status, r.body.as_str()),
        (504, "upstream request timeout")
    );
    assert!(t.elapsed() < std::time::Duration::from_millis(1500));
    // An upstream's own 5xx passes through untouched.
    assert_eq!(curl(&format!("{url}/status/502"), &[]).status, 502);
    assert_eq!(
        stat(admin, "cluster.down.upstream_cx_connect_fail"),
        Some(1)
    );
    assert_eq!(
        stat(admin, "cluster.empty.upstream_cx_none_healthy"),
        Some(1)
    );
    assert_eq!(stat(admin, "cluster.a.upstream_rq_timeout"), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_on_connect_failure_and_status() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let retry = json!({"retry_on": "connect-failure", "num_retries": 3,
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
        "retry_back_off": {"base_interval": "0.001s"}});
    let rc = routes(json!([
        {"match": {"prefix": "/cf"}, "route": {"cluster": "half_dead", "retry_policy": retry}},
        {"match": {"prefix": "/status/503"}, "route": {"cluster": "ab", "retry_policy": {"retry_on": "5xx", "num_retries": 2, "retry_back_off": {"base_interval": "0.001s"}}}},
        {"match": {"prefix": "/status/409"}, "route": {"cluster": "ab", "retry_policy": {"retry_on": "retriable-4xx", "num_retries": 1, "retry_back_off": {"base_interval": "0.001s"}}}},
        {"match": {"prefix": "/status/404"}, "route": {"cluster": "ab", "retry_policy": {"retry_on": "5xx", "num_retries": 2}}},
    ]));
    let (_l, url, admin) = start(
        hcm(rc, json!({})),
        vec![
            cluster("half_dead", &[dead_addr(), a.addr], json!({})),
            cluster("ab", &[a.addr, b.addr], json!({})),
        ],
    );
    // Half the picks hit the dead host; previous_hosts moves the retry on.
    for _ in 0..20 {
        assert_eq!(curl(&format!("{url}/cf"), &[]).status, 200);
    }
    assert!(stat(admin, "cluster.half_dead.upstream_rq_retry").unwrap() >= 1);
    // All attempts answer 503: 1 + 2 retries, then the real 503 passes through.
    let before = a.hits.load(std::sync::atomic::Ordering::Relaxed)
        + b.hits.load(std::sync::atomic::Ordering::Relaxed);
    let r = curl(&format!("{url}/status/503"), &[]);
    assert_eq!(r.status, 503);
    assert!(
        r.header("x-echo-server").is_some(),
        "the upstream's own reply is passed on after the last try"
    );
    let after = a.hits.load(std::sync::atomic::Ordering::Relaxed)
        + b.hits.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(after - before, 3);
    assert_eq!(stat(admin, "cluster.ab.upstream_rq_retry"), Some(2));
    assert_eq!(curl(&format!("{url}/status/409"), &[]).status, 409);
    assert_eq!(stat(admin, "cluster.ab.upstream_rq_retry"), Some(3));
    // 404 is not a retry condition for 5xx.
    assert_eq!(curl(&format!("{url}/status/404"), &[]).status, 404);
    assert_eq!(stat(admin, "cluster.ab.upstream_rq_retry"), Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_upstreams_both_ways_of_configuring() {
    let up = upstream("h2").await;
    let explicit = json!({"typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}}}});
    let rc = routes(json!([
        {"match": {"prefix": "/new"}, "route": {"cluster": "new"}},
        {"match": {"prefix": "/old"}, "route": {"cluster": "old"}},
        {"match": {"prefix": "/h1"}, "route": {"cluster": "h1"}},
    ]));
    let (_l, url, _) = start(
        hcm(rc, json!({})),
        vec![
            cluster("new", &[up.addr], explicit),
            cluster("old", &[up.addr], json!({"http2_protocol_options": {}})),
            cluster("h1", &[up.addr], json!({})),
        ],
    );
    assert_eq!(
        curl(&format!("{url}/new"), &[]).echo()["version"],
        "HTTP/2.0"
    );
    assert_eq!(
        curl(&format!("{url}/old"), &[]).echo()["version"],
        "HTTP/2.0"
    );
    assert_eq!(
        curl(&format!("{url}/h1"), &["--http2-prior-knowledge"]).echo()["version"],
        "HTTP/1.1"
    );
    let r = curl(
        &format!("{url}/new"),
        &["--http2-prior-knowledge", "-d", "body over h2 both ways"],
    );
    assert_eq!(r.echo()["body"], "body over h2 both ways");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codec_type_restricts_protocols() {
    let rc = routes(
        json!([{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}]),
    );
    let (_l1, url1, _) = start(hcm(rc.clone(), json!({"codec_type": "HTTP1"})), vec![]);
    let (_l2, url2, _) = start(hcm(rc, json!({"codec_type": "HTTP2"})), vec![]);
    assert_eq!(curl(&format!("{url1}/"), &[]).status, 200);
    assert_eq!(
        curl(&format!("{url2}/"), &["--http2-prior-knowledge"]).status,
        200
    );
    // HTTP/1.1 on an HTTP2-only listener, and h2c on an HTTP1-only one, fail.
    let out = std::process::Command::new("curl")
        .args(["-s", "--max-time", "3", &format!("{url2}/")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "3",
            "--http2-prior-knowledge",
            &format!("{url1}/"),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_dns_cluster_resolves_offline() {
    let up = upstream("logical").await;
    let logical = json!({"name": "ldns", "type": "LOGICAL_DNS", "connect_timeout": "1s", "dns_lookup_family": "V4_ONLY",
        "load_assignment": {"cluster_name": "ldns", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": addr("localhost", up.addr.port())}}]}]}});
    let rc = routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "ldns"}}]));
    let (_l, url, admin) = start(hcm(rc, json!({})), vec![logical]);
    assert_eq!(
        curl(&format!("{url}/"), &[]).header("x-echo-server"),
        Some("logical")
    );
    assert_eq!(stat(admin, "cluster.ldns.membership_total"), Some(1));
    // LOGICAL_DNS takes exactly one endpoint, as Envoy requires.
    let two = json!({"name": "ldns", "type": "LOGICAL_DNS", "load_assignment": {"cluster_name": "ldns", "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": addr("localhost", 1)}}, {"endpoint": {"address": addr("localhost", 2)}}]}]}});
    let out = validate(BIN, &bootstrap(1, vec![], vec![two]));
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timeout_bounds_the_whole_response() {
    let up = upstream("drip").await;
    let rc = routes(json!([
        {"match": {"prefix": "/short"}, "route": {"cluster": "a", "timeout": "0.5s", "prefix_rewrite": "/drip/6"}},
        {"match": {"prefix": "/long"}, "route": {"cluster": "a", "timeout": "3s", "prefix_rewrite": "/drip/6"}},
    ]));
    let (_l, url, admin) = start(
        hcm(rc, json!({})),
        vec![cluster("a", &[up.addr], json!({}))],
    );
    // Six chunks 200 ms apart: every read is well inside 0.5 s, the whole
    // response is not, so Envoy's (and Legate's) route timeout cuts it.
    let out = std::process::Command::new("curl")
        .args(["-s", "--max-time", "5", &format!("{url}/short")])
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "the stream must be cut");
    assert!(body.matches("drip-drip").count() < 6, "{body}");
    assert_eq!(stat(admin, "cluster.a.upstream_rq_timeout"), Some(1));
    let full = curl(&format!("{url}/long"), &[]);
    assert_eq!(full.body.matches("drip-drip").count(), 6);
}

/// The keep-alive timers of established connections to `port`, as `ss`
/// shows them (`timer:(keepalive,...)`), one entry per socket.
fn keepalive_timers(port: u16) -> Vec<String> {
    let out = std::process::Command::new("ss")
        .args([
            "-tnoH",
            "state",
            "established",
            "dport",
            "=",
            &format!(":{port}"),
        ])
        .output()
        .expect("ss runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with("timer:("))
                .unwrap_or("none")
                .to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tcp_keepalive_is_set_on_upstream_sockets() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let rc = routes(json!([
        {"match": {"prefix": "/ka"}, "route": {"cluster": "ka"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "plain"}},
    ]));
    let ka = json!({"upstream_connection_options": {"tcp_keepalive": {
        "keepalive_time": 40, "keepalive_interval": 5, "keepalive_probes": 3}}});
    let (_l, url, _admin) = start(
        hcm(rc, json!({})),
        vec![
            cluster("ka", &[a.addr], ka),
            cluster("plain", &[b.addr], json!({})),
        ],
    );
    assert_eq!(curl(&format!("{url}/ka"), &[]).status, 200);
    assert_eq!(curl(&format!("{url}/"), &[]).status, 200);
    // The pooled connections stay open: one keeps alive with the configured
    // idle time (under 40 s left), the other has no keep-alive timer.
    let with = keepalive_timers(a.addr.port());
    assert_eq!(with.len(), 1, "{with:?}");
    assert!(with[0].starts_with("timer:(keepalive,"), "{with:?}");
    let secs: String = with[0]["timer:(keepalive,".len()..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    assert!(
        with[0].contains("sec") && secs.parse::<u32>().is_ok_and(|s| s <= 40),
        "{with:?}"
    );
    assert_eq!(keepalive_timers(b.addr.port()), vec!["none".to_string()]);
}
