//! Downstream HTTP connection limits through the real binary with real
//! HTTP/1.1 and HTTP/2 (h2c) clients: `idle_timeout`,
//! `max_requests_per_connection`, `http2_protocol_options` and the
//! `/healthcheck/fail` drain of `drain_type: DEFAULT` listeners.

mod common;
use common::*;
use serde_json::json;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One keep-alive GET on an open HTTP/1.1 connection: the response head,
/// lower-cased, or None when the connection was closed instead.
async fn h1_get(s: &mut TcpStream) -> Option<String> {
    h1_request(s, "/").await
}

/// The same for any path.
async fn h1_request(s: &mut TcpStream, path: &str) -> Option<String> {
    let req = format!("GET {path} HTTP/1.1\r\nhost: t\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    read_response(s).await
}

/// Reads one response (head and content-length body): its head,
/// lower-cased, or None when the connection was closed instead.
async fn read_response(s: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("response in time")
            .ok()?;
        if n == 0 {
            assert!(buf.is_empty(), "closed mid-response");
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
        if let Some(end) = text.find("\r\n\r\n") {
            let head = &text[..end];
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if buf.len() >= end + 4 + len {
                return Some(head.to_string());
            }
        }
    }
}

/// Whether the peer closes the connection within `within`.
async fn closes_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(within, s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

async fn connect(url: &str) -> TcpStream {
    TcpStream::connect(url.trim_start_matches("http://"))
        .await
        .unwrap()
}

fn keep_alive(head: &str) -> bool {
    !head.contains("\r\nconnection: close")
}

/// An h2c client connection and the task driving it; the task ends when
/// the server closes the connection.
async fn h2c(
    url: &str,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
    tokio::sync::oneshot::Receiver<usize>,
) {
    let (client, mut conn) = h2::client::handshake(connect(url).await).await.unwrap();
    // Reports the server's SETTINGS_MAX_CONCURRENT_STREAMS once a response
    // has proven the settings were received.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut probe = client.clone().ready();
    let task = tokio::spawn(async move {
        tokio::select! {
            r = &mut conn => return r,
            _ = &mut probe => {}
        }
        // A ping round trip: the server's SETTINGS precede its PONG.
        let mut ping = conn.ping_pong().unwrap();
        let pong = ping.ping(h2::Ping::opaque());
        tokio::select! {
            r = &mut conn => return r,
            _ = pong => {}
        }
        let _ = tx.send(conn.max_concurrent_send_streams());
        conn.await
    });
    (client, task, rx)
}

async fn h2_get(client: &mut h2::client::SendRequest<bytes::Bytes>) -> Result<u16, h2::Error> {
    let req = http::Request::get("http://t/").body(()).unwrap();
    let (resp, _) = client.clone().ready().await?.send_request(req, true)?;
    let resp = resp.await?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    while let Some(c) = body.data().await {
        let c = c?;
        let _ = body.flow_control().release_capacity(c.len());
    }
    Ok(status)
}

fn hcm_with(extra: serde_json::Value) -> serde_json::Value {
    hcm(
        routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "up"}}])),
        extra,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_per_connection_closes_http1_and_sends_goaway_on_http2() {
    let up = upstream("up").await;
    let (_l, url, _admin) = start(
        hcm_with(json!({
            "common_http_protocol_options": {"max_requests_per_connection": 2},
            "http2_protocol_options": {"max_concurrent_streams": 7, "initial_stream_window_size": 131072},
        })),
        vec![cluster("up", &[up.addr], json!({}))],
    );
    // HTTP/1.1: the second response says close, then the connection ends.
    let mut s = connect(&url).await;
    let first = h1_get(&mut s).await.expect("first response");
    assert!(
        first.starts_with("http/1.1 200") && keep_alive(&first),
        "{first}"
    );
    let second = h1_get(&mut s).await.expect("second response");
    assert!(second.starts_with("http/1.1 200"), "{second}");
    assert!(
        !keep_alive(&second),
        "the last request's response closes: {second}"
    );
    assert!(closes_within(&mut s, Duration::from_secs(2)).await);

    // HTTP/2: the listener's SETTINGS, then GOAWAY after the second stream;
    // both streams are answered and the connection ends.
    let (mut client, task, streams) = h2c(&url).await;
    assert_eq!(h2_get(&mut client).await.unwrap(), 200);
    assert_eq!(
        streams.await.unwrap(),
        7,
        "max_concurrent_streams reaches the client"
    );
    assert_eq!(h2_get(&mut client).await.unwrap(), 200);
    let ended = tokio::time::timeout(Duration::from_secs(3), task).await;
    assert!(ended.is_ok(), "the connection ends after the limit");
    assert!(h2_get(&mut client).await.is_err(), "no third stream on it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_after_idle_timeout_and_not_before() {
    let up = upstream("up").await;
    let (_l, url, _admin) = start(
        hcm_with(json!({"common_http_protocol_options": {"idle_timeout": "1s"}})),
        vec![cluster("up", &[up.addr], json!({}))],
    );
    let mut s = connect(&url).await;
    let head = h1_get(&mut s).await.expect("response");
    assert!(keep_alive(&head), "{head}");
    assert!(
        closes_within(&mut s, Duration::from_secs(4)).await,
        "HTTP/1.1 idle close"
    );

    let (mut client, task, _) = h2c(&url).await;
    assert_eq!(h2_get(&mut client).await.unwrap(), 200);
    let ended = tokio::time::timeout(Duration::from_secs(4), task).await;
    assert!(ended.is_ok(), "HTTP/2 idle close");

    // The default (1 h) keeps them.
    let (_l2, url2, _admin2) = start(
        hcm_with(json!({})),
        vec![cluster("up", &[up.addr], json!({}))],
    );
    let mut s = connect(&url2).await;
    assert!(h1_get(&mut s).await.is_some());
    assert!(
        !closes_within(&mut s, Duration::from_secs(2)).await,
        "open after 2 s"
    );
    assert!(h1_get(&mut s).await.is_some(), "and still serving");
}

// Between requests Legate reads the next request's first bytes itself and
// hands them to pingora: heads and bodies that arrive in pieces, or with
// the next request, must still be read whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_arriving_in_pieces_are_read_whole_on_a_kept_connection() {
    let up = upstream("up").await;
    let (_l, url, _admin) = start(
        hcm_with(json!({})),
        vec![cluster("up", &[up.addr], json!({}))],
    );
    let mut s = connect(&url).await;
    let cases: [&[&[u8]]; 3] = [
        // A head split mid-line, then its end.
        &[b"GET / HTT", b"P/1.1\r\nhost: t\r\n\r\n"],
        // A body after its head, in two pieces.
        &[
            b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n\r\nab",
            b"cde",
        ],
        // Head and body in one write.
        &[b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\nok"],
    ];
    for _ in 0..2 {
        for pieces in cases {
            for (i, piece) in pieces.iter().enumerate() {
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                s.write_all(piece).await.unwrap();
            }
            let head = read_response(&mut s).await.expect("a response");
            assert!(
                head.starts_with("http/1.1 200") && keep_alive(&head),
                "{head}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_fail_drains_default_listeners_only() {
    let up = upstream("up").await;
    let (drains, modify_only, admin) = (free_port(), free_port(), free_port());
    let mut keeps = listener("keeps", modify_only, hcm_with(json!({})));
    keeps["drain_type"] = json!("MODIFY_ONLY");
    let cfg = bootstrap(
        admin,
        vec![listener("drains", drains, hcm_with(json!({}))), keeps],
        vec![cluster("up", &[up.addr], json!({}))],
    );
    let _l = Legate::start(BIN, &cfg, &[drains, modify_only], Some(admin));
    let (url_d, url_m) = (
        format!("http://127.0.0.1:{drains}"),
        format!("http://127.0.0.1:{modify_only}"),
    );
    let (mut d, mut m) = (connect(&url_d).await, connect(&url_m).await);
    assert!(keep_alive(&h1_get(&mut d).await.unwrap()));
    assert!(keep_alive(&h1_get(&mut m).await.unwrap()));
    let (mut h2d, task_d, _) = h2c(&url_d).await;
    assert_eq!(h2_get(&mut h2d).await.unwrap(), 200);

    assert_eq!(admin_post(admin, "/healthcheck/fail").status, 200);
    let head = h1_get(&mut d).await.expect("still answered");
    assert!(!keep_alive(&head), "DEFAULT drains: {head}");
    assert!(closes_within(&mut d, Duration::from_secs(2)).await);
    let head = h1_get(&mut m).await.expect("answered");
    assert!(
        keep_alive(&head),
        "MODIFY_ONLY keeps the connection: {head}"
    );
    assert_eq!(
        h2_get(&mut h2d).await.unwrap(),
        200,
        "the stream is answered"
    );
    let ended = tokio::time::timeout(Duration::from_secs(3), task_d).await;
    assert!(ended.is_ok(), "then GOAWAY ends the HTTP/2 connection");

    assert_eq!(admin_post(admin, "/healthcheck/ok").status, 200);
    let mut d = connect(&url_d).await;
    assert!(keep_alive(&h1_get(&mut d).await.unwrap()), "healthy again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_max_requests_per_connection_retires_pooled_connections() {
    use std::sync::atomic::Ordering;
    let (capped, free) = (upstream("capped").await, upstream("free").await);
    let options = |max: serde_json::Value| {
        json!({"typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http_protocol_options": {}},
                "common_http_protocol_options": max,
            }
        }})
    };
    let rc = routes(json!([
        {"match": {"prefix": "/capped"}, "route": {"cluster": "capped"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "free"}},
    ]));
    let (_l, url, _admin) = start(
        hcm(rc, json!({})),
        vec![
            cluster(
                "capped",
                &[capped.addr],
                options(json!({"max_requests_per_connection": 3})),
            ),
            cluster("free", &[free.addr], options(json!({}))),
        ],
    );
    // One client connection, requests one after another: the pool reuses
    // one upstream connection, three requests at most on the capped one.
    let mut s = connect(&url).await;
    for _ in 0..9 {
        let head = h1_request(&mut s, "/capped").await.unwrap();
        assert!(head.starts_with("http/1.1 200"), "{head}");
    }
    for _ in 0..9 {
        assert!(h1_get(&mut s).await.unwrap().starts_with("http/1.1 200"));
    }
    assert_eq!(capped.hits.load(Ordering::Relaxed), 9);
    assert_eq!(
        capped.conns.load(Ordering::Relaxed),
        3,
        "9 requests, 3 per connection"
    );
    assert_eq!(
        free.conns.load(Ordering::Relaxed),
        1,
        "no cap: one connection"
    );
}

/// HTTP/2 upstreams with `max_requests_per_connection: 1` (what
/// pilot-agent gives its xDS cluster): a connection per request, each
/// closed after its one request; without the cap, one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_http2_one_request_per_connection() {
    use std::sync::atomic::Ordering;
    let (capped, free) = (upstream("capped").await, upstream("free").await);
    let options = |max: serde_json::Value| {
        json!({"typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
                "common_http_protocol_options": max,
            }
        }})
    };
    let rc = routes(json!([
        {"match": {"prefix": "/capped"}, "route": {"cluster": "capped"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "free"}},
    ]));
    let (_l, url, _admin) = start(
        hcm(rc, json!({})),
        vec![
            cluster(
                "capped",
                &[capped.addr],
                options(json!({"max_requests_per_connection": 1})),
            ),
            cluster("free", &[free.addr], options(json!({}))),
        ],
    );
    let mut s = connect(&url).await;
    for _ in 0..4 {
        let head = h1_request(&mut s, "/capped").await.unwrap();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(h1_get(&mut s).await.unwrap().starts_with("http/1.1 200"));
    }
    assert_eq!(capped.hits.load(Ordering::Relaxed), 4);
    assert_eq!(
        capped.conns.load(Ordering::Relaxed),
        4,
        "one request per connection"
    );
    assert_eq!(
        free.conns.load(Ordering::Relaxed),
        1,
        "no cap: one connection"
    );
    // Above one is refused (pingora pools HTTP/2 connections by streams).
    let cfg = bootstrap(
        free_port(),
        vec![],
        vec![cluster(
            "c",
            &[capped.addr],
            options(json!({"max_requests_per_connection": 2})),
        )],
    );
    let out = validate(BIN, &cfg);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_requests_per_connection"));
}

/// Each worker has its own upstream connections, as each Envoy worker has
/// its own pools: two client connections, which land on the two workers,
/// taking turns with one request at a time, use one upstream connection
/// each. (A pool shared by the workers would have served all six requests
/// on one connection.)
#[tokio::test]
async fn each_worker_keeps_its_own_upstream_connections() {
    use std::sync::atomic::Ordering;
    let up = upstream("up").await;
    let rc = routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "up"}}]));
    let (port, admin) = (free_port(), free_port());
    let cfg = bootstrap(
        admin,
        vec![listener("ingress", port, hcm(rc, json!({})))],
        vec![cluster("up", &[up.addr], json!({}))],
    );
    let _l = Legate::start_with_args(BIN, &cfg, &["--concurrency", "2"], &[port], Some(admin));
    let url = format!("http://127.0.0.1:{port}");
    let mut a = connect(&url).await;
    let mut b = connect(&url).await;
    for _ in 0..3 {
        for s in [&mut a, &mut b] {
            let head = h1_get(s).await.expect("answered");
            assert!(head.starts_with("http/1.1 200"), "{head}");
        }
    }
    assert_eq!(up.hits.load(Ordering::Relaxed), 6);
    assert_eq!(
        up.conns.load(Ordering::Relaxed),
        2,
        "one upstream connection per worker"
    );
}

/// Envoy closes an idle upstream connection when its idle timeout passes,
/// not because many others are idle: after a burst of concurrent requests
/// (more than pingora's default pool of 128), the next burst of the same
/// size reuses every connection the first opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_beyond_128_concurrent_requests_reuses_all_its_upstream_connections() {
    use std::sync::atomic::Ordering;
    const BURST: usize = 160;
    let up = upstream("up").await;
    let rc = routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "up"}}]));
    let (_l, url, _admin) = start(
        hcm(rc, json!({})),
        vec![cluster("up", &[up.addr], json!({}))],
    );
    let mut clients = Vec::new();
    for _ in 0..BURST {
        clients.push(connect(&url).await);
    }
    let burst = |clients: Vec<TcpStream>| async move {
        // Each request waits 1.5 s upstream, so all of them are in flight
        // together and each needs an upstream connection of its own, even
        // when a loaded machine is slow to send them (were the first burst
        // spread out enough to reuse a connection, the second, quicker one
        // would need more than the first opened).
        let tasks: Vec<_> = clients
            .into_iter()
            .map(|mut s| {
                tokio::spawn(async move {
                    let head = h1_request(&mut s, "/delay/1500").await.expect("answered");
                    assert!(head.starts_with("http/1.1 200"), "{head}");
                    s
                })
            })
            .collect();
        let mut back = Vec::new();
        for t in tasks {
            back.push(t.await.expect("request task"));
        }
        back
    };
    let clients = burst(clients).await;
    let first = up.conns.load(Ordering::Relaxed);
    assert!(
        first >= BURST as u64 - 10,
        "the burst ran concurrently: {first} upstream connections"
    );
    burst(clients).await;
    assert_eq!(up.hits.load(Ordering::Relaxed), 2 * BURST as u64);
    assert_eq!(
        up.conns.load(Ordering::Relaxed),
        first,
        "the second burst reuses the first one's idle connections"
    );
}

/// A client that cancels a burst of its own requests (25 HEADERS, each
/// followed at once by RST_STREAM) is not punished, as Envoy does not punish
/// it: its next request is answered. (The h2 crate's default of 20 reset
/// streams waiting to be accepted would end the connection with
/// ENHANCE_YOUR_CALM.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_cancelled_h2_requests_is_not_punished() {
    let up = upstream("up").await;
    let (_l, url, _admin) = start(
        hcm_with(json!({})),
        vec![cluster("up", &[up.addr], json!({}))],
    );
    let (mut client, _task, _streams) = h2c(&url).await;
    assert_eq!(h2_get(&mut client).await.unwrap(), 200);
    let mut c = client.clone().ready().await.unwrap();
    for _ in 0..25 {
        let req = http::Request::get("http://t/cancelled").body(()).unwrap();
        let (_resp, mut stream) = c.send_request(req, false).unwrap();
        stream.send_reset(h2::Reason::CANCEL);
    }
    assert_eq!(
        h2_get(&mut client)
            .await
            .expect("the connection survives the burst"),
        200
    );
    // A flood of them (rapid reset) may end that connection, but the proxy
    // keeps serving others.
    let (client, _task, _streams) = h2c(&url).await;
    if let Ok(mut c) = client.ready().await {
        for _ in 0..2000 {
            let req = http::Request::get("http://t/flood").body(()).unwrap();
            let Ok((_resp, mut stream)) = c.send_request(req, false) else {
                break; // the server ended the connection
            };
            stream.send_reset(h2::Reason::CANCEL);
        }
    }
    let (mut fresh, _task, _streams) = h2c(&url).await;
    assert_eq!(h2_get(&mut fresh).await.unwrap(), 200);
}
