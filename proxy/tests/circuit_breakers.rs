//! Circuit breakers through the real binary: requests over a cluster's
//! limits get Envoy's 503 with `UO` and `x-envoy-overloaded`, waiting
//! requests are served when a connection frees, retries stop at the
//! retry limit, and tcp_proxy refuses connections over `max_connections`.

mod common;
use common::*;
use serde_json::json;
use std::time::Duration;

/// Runs `n` requests at once; their statuses, sorted, and the overloaded
/// header of each refused one.
async fn concurrent(url: String, n: usize) -> Vec<(u16, Option<String>)> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let url = url.clone();
            tokio::task::spawn_blocking(move || {
                let r = curl(&url, &[]);
                (r.status, r.header("x-envoy-overloaded").map(str::to_string))
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out.sort();
    out
}

/// Legate with one route to cluster "cb" (one upstream) and these
/// circuit breaker thresholds; three requests at once, each held upstream
/// for `hold_ms`: two are served and the third gets Envoy's overflow reply.
/// Returns the upstream too, so it keeps serving while the caller checks.
async fn three_at_once(
    thresholds: serde_json::Value,
    hold_ms: u64,
) -> (Legate, String, u16, legate_tests::echo::Echo) {
    let up = upstream("a").await;
    let rc = routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "cb"}}]));
    let cb = json!({"circuit_breakers": {"thresholds": [thresholds]}});
    let (l, url, admin) = start(hcm(rc, json!({})), vec![cluster("cb", &[up.addr], cb)]);
    let got = concurrent(format!("{url}/delay/{hold_ms}"), 3).await;
    assert_eq!(
        got,
        vec![(200, None), (200, None), (503, Some("true".into()))]
    );
    assert_eq!(
        stat(admin, "cluster.cb.upstream_rq_pending_overflow"),
        Some(1)
    );
    (l, url, admin, up)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_max_requests_get_envoys_overflow_reply() {
    // The third is refused at once.
    let (_l, url, admin, _up) =
        three_at_once(json!({"max_requests": 2, "track_remaining": true}), 1500).await;
    assert_eq!(stat(admin, "cluster.cb.upstream_rq_total"), Some(2));
    // Every slot is given back: the gauges say so once the requests end.
    assert_eq!(
        wait_stat(admin, "cluster.cb.circuit_breakers.default.remaining_rq", 2),
        Some(2)
    );
    assert_eq!(
        stat(admin, "cluster.cb.circuit_breakers.default.rq_open"),
        Some(0)
    );
    assert_eq!(curl(&format!("{url}/"), &[]).status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_requests_over_max_connections_wait_or_overflow_as_pending() {
    // One request holds the one connection, one waits for it (pending) and
    // is served after, one finds the pending queue full.
    let (_l, _url, admin, _up) = three_at_once(
        json!({"max_connections": 1, "max_pending_requests": 1}),
        1000,
    )
    .await;
    assert_eq!(stat(admin, "cluster.cb.upstream_cx_overflow"), Some(2));
}

/// A cluster "cb" with `extra`, behind a route that retries 5xx three
/// times; returns Legate, its URL, its admin port and the upstream.
async fn retrying(extra: serde_json::Value) -> (Legate, String, u16, legate_tests::echo::Echo) {
    let up = upstream("a").await;
    let retry =
        json!({"retry_on": "5xx", "num_retries": 3, "retry_back_off": {"base_interval": "0.001s"}});
    let rc = routes(
        json!([{"match": {"prefix": "/"}, "route": {"cluster": "cb", "retry_policy": retry}}]),
    );
    let (l, url, admin) = start(hcm(rc, json!({})), vec![cluster("cb", &[up.addr], extra)]);
    (l, url, admin, up)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoys_default_allows_three_concurrent_retries() {
    let (_l, url, admin, up) = retrying(json!({})).await;
    let hits = || up.hits.load(std::sync::atomic::Ordering::Relaxed);
    // Envoy's default of 3 concurrent retries: all three retries run.
    let before = hits();
    assert_eq!(curl(&format!("{url}/status/503"), &[]).status, 503);
    assert_eq!(hits() - before, 4);
    assert_eq!(stat(admin, "cluster.cb.upstream_rq_retry"), Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_over_max_retries_is_not_made() {
    let (_l, url, admin, up) =
        retrying(json!({"circuit_breakers": {"thresholds": [{"max_retries": 0}]}})).await;
    let hits = || up.hits.load(std::sync::atomic::Ordering::Relaxed);
    // No retry may run: the upstream's own 503 passes through after one try.
    let before = hits();
    let r = curl(&format!("{url}/status/503"), &[]);
    assert_eq!(r.status, 503);
    assert!(r.header("x-echo-server").is_some(), "the upstream's reply");
    assert_eq!(hits() - before, 1);
    assert_eq!(
        stat(admin, "cluster.cb.upstream_rq_retry_overflow"),
        Some(1)
    );
    assert_eq!(stat(admin, "cluster.cb.upstream_rq_retry").unwrap_or(0), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_refuses_connections_over_max_connections() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up = l.local_addr().unwrap();
    legate_tests::tcp::counting_upstream(l);
    let (port, admin) = (free_port(), free_port());
    let tcp = json!({"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": "tcp", "cluster": "t"}});
    let listener = json!({"name": "l", "address": addr("127.0.0.1", port),
        "filter_chains": [{"filters": [tcp]}]});
    let cfg = bootstrap(
        admin,
        vec![listener],
        vec![cluster(
            "t",
            &[up],
            json!({"circuit_breakers": {"thresholds": [{"max_connections": 1}]}}),
        )],
    );
    let _l = Legate::start(BIN, &cfg, &[port], Some(admin));
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The readiness probe's connection may still hold the slot for a moment.
    wait_stat_until(admin, "cluster.t.circuit_breakers.default.cx_open", |v| {
        v == Some(0)
    });
    let mut first = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    first.write_all(b"held").await.unwrap();
    wait_stat_until(admin, "cluster.t.circuit_breakers.default.cx_open", |v| {
        v == Some(1)
    });
    let mut second = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), second.read_to_end(&mut buf))
        .await
        .expect("the connection over the limit is closed");
    assert_eq!(
        n.map(|_| buf.len()).unwrap_or(0),
        0,
        "closed without an answer"
    );
    assert_eq!(stat(admin, "cluster.t.upstream_cx_overflow"), Some(1));
    first.shutdown().await.unwrap();
    let mut answer = String::new();
    first.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer, legate_tests::tcp::answer_for(b"held"));
}

/// Outlier detection: a host that refuses every connection is ejected
/// after its fifth consecutive failure (each a 503 to outlier detection),
/// then every request goes to the healthy host; it comes back at the
/// first interval tick after its ejection time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_host_is_ejected_and_comes_back() {
    let good = upstream("good").await;
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let rc = routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "od"}}]));
    let od = json!({"lb_policy": "ROUND_ROBIN", "outlier_detection": {
        "max_ejection_percent": 100, "interval": "0.2s", "base_ejection_time": "1s"}});
    let (_l, url, admin) = start(
        hcm(rc, json!({})),
        vec![cluster("od", &[dead, good.addr], od)],
    );
    let statuses: Vec<u16> = (0..30)
        .map(|_| curl(&format!("{url}/"), &[]).status)
        .collect();
    let failed = statuses.iter().filter(|s| **s == 503).count();
    assert_eq!(
        failed, 5,
        "five failures, then the dead host is out: {statuses:?}"
    );
    assert!(
        statuses[statuses.len() - 20..].iter().all(|s| *s == 200),
        "{statuses:?}"
    );
    let p = "cluster.od.outlier_detection.";
    assert_eq!(
        stat(admin, &format!("{p}ejections_enforced_consecutive_5xx")),
        Some(1)
    );
    assert_eq!(
        stat(admin, &format!("{p}ejections_detected_consecutive_5xx")),
        Some(1)
    );
    assert_eq!(stat(admin, "cluster.od.membership_healthy"), Some(1));
    // Back after its second, at a tick; then it fails again.
    assert_eq!(
        wait_stat_until(admin, &format!("{p}ejections_active"), |v| v == Some(0)),
        Some(0)
    );
    assert_eq!(stat(admin, "cluster.od.membership_healthy"), Some(2));
}
