//! L4 through the real binary: filter chain selection by Envoy's
//! `filter_chain_match` rules and `tcp_proxy` with half-close.

mod common;
use common::*;
use serde_json::json;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn chain(m: serde_json::Value, filter: serde_json::Value) -> serde_json::Value {
    json!({"filter_chain_match": m, "filters": [filter]})
}

fn http(cluster: &str) -> serde_json::Value {
    let rc = routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]));
    json!({"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm(rc, json!({}))})
}

fn tcp(cluster: &str) -> serde_json::Value {
    json!({"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": "tcp", "cluster": cluster}})
}

fn start_listener(
    chains: Vec<serde_json::Value>,
    clusters: Vec<serde_json::Value>,
) -> (Legate, u16, u16) {
    let (port, admin) = (free_port(), free_port());
    let l = json!({"name": "l", "address": addr("127.0.0.1", port), "filter_chains": chains});
    let cfg = bootstrap(admin, vec![l], clusters);
    (Legate::start(BIN, &cfg, &[port], Some(admin)), port, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_chains_are_chosen_by_source_address_most_specific_first() {
    let (a, b, c) = (
        upstream("a").await,
        upstream("b").await,
        upstream("c").await,
    );
    let (_l, port, _admin) = start_listener(
        vec![
            chain(json!({}), http("a")),
            chain(
                json!({"source_prefix_ranges": [{"address_prefix": "127.0.0.0", "prefix_len": 8}]}),
                http("b"),
            ),
            chain(
                json!({"source_prefix_ranges": [{"address_prefix": "127.0.0.3", "prefix_len": 32}]}),
                http("c"),
            ),
        ],
        vec![
            cluster("a", &[a.addr], json!({})),
            cluster("b", &[b.addr], json!({})),
            cluster("c", &[c.addr], json!({})),
        ],
    );
    let url = format!("http://127.0.0.1:{port}/");
    let from = |ip: &str| {
        curl(&url, &["--interface", ip])
            .header("x-echo-server")
            .map(str::to_string)
    };
    assert_eq!(from("127.0.0.3").as_deref(), Some("c"), "/32 beats /8");
    assert_eq!(from("127.0.0.2").as_deref(), Some("b"), "/8 beats no range");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_matching_chain_closes_the_connection_and_counts_it() {
    let a = upstream("a").await;
    let (_l, port, admin) = start_listener(
        vec![chain(json!({"source_ports": [1]}), http("a"))],
        vec![cluster("a", &[a.addr], json!({}))],
    );
    let name = format!("listener.127.0.0.1_{port}.no_filter_chain_match");
    // Legate::start's readiness probe is one connection, which no chain
    // matches either: count from once it is counted.
    let before = wait_stat_until(admin, &name, |v| v >= Some(1)).expect("the probe was counted");
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let n = s.read_to_end(&mut buf).await.unwrap_or(0);
    assert_eq!(n, 0, "closed without a response");
    assert_eq!(wait_stat(admin, &name, before + 1), Some(before + 1));
}

/// A TCP upstream that reads until the client half-closes, then answers
/// with the byte count and a checksum, and closes.
async fn counting_upstream() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    legate_tests::tcp::counting_upstream(l);
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_carries_a_half_close_both_ways() {
    let up = counting_upstream().await;
    let (_l, port, _admin) = start_listener(
        vec![chain(json!({}), tcp("t"))],
        vec![cluster("t", &[up], json!({}))],
    );
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    s.write_all(&payload).await.unwrap();
    // Half-close: the upstream sees EOF, and its answer still comes back.
    s.shutdown().await.unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer, legate_tests::tcp::answer_for(&payload));
}

/// An upstream that echoes stops reading while its answers go unread, so
/// the two directions must be copied independently: 64 MiB sent and read
/// back at once through a listener with `tls_inspector` and a plaintext
/// client (the outside test's stall: it stopped after the first 64 KiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_echoes_64_mib_both_ways_behind_tls_inspector() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up = l.local_addr().unwrap();
    legate_tests::tcp::echo_upstream(l);
    let (port, admin) = (free_port(), free_port());
    let listener = json!({"name": "l", "address": addr("127.0.0.1", port),
        "listener_filters": [{"name": "envoy.filters.listener.tls_inspector", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}],
        "default_filter_chain": {"filters": [tcp("e")]}});
    let cfg = bootstrap(admin, vec![listener], vec![cluster("e", &[up], json!({}))]);
    let _l = Legate::start(BIN, &cfg, &[port], Some(admin));
    const LEN: usize = 64 << 20;
    let got = tokio::task::spawn_blocking(move || legate_tests::tcp::echo_through(port, LEN))
        .await
        .unwrap();
    let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let mut sum = legate_tests::tcp::Fnv::default();
    for _ in 0..LEN / chunk.len() {
        sum.feed(&chunk);
    }
    assert_eq!(got, legate_tests::tcp::answer(LEN as u64, sum));
}

/// An upstream reset reaches the client as a reset, at once or after data
/// (as Envoy passes it on), never as a clean end of a truncated transfer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_passes_an_upstream_reset_on() {
    for after in [0, 64 * 1024] {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let up = l.local_addr().unwrap();
        legate_tests::tcp::resetting_upstream(l, after);
        let (_l, port, _admin) = start_listener(
            vec![chain(json!({}), tcp("r"))],
            vec![cluster("r", &[up], json!({}))],
        );
        let seen = tokio::task::spawn_blocking(move || legate_tests::tcp::read_outcome(port))
            .await
            .unwrap();
        assert_eq!(seen, "reset", "upstream reset after {after} bytes");
    }
}

fn tcp_with(extra: serde_json::Value) -> serde_json::Value {
    let mut f = tcp("t");
    let tc = f["typed_config"].as_object_mut().unwrap();
    for (k, v) in extra.as_object().unwrap() {
        tc.insert(k.clone(), v.clone());
    }
    if tc.contains_key("weighted_clusters") {
        tc.remove("cluster");
    }
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_weighted_clusters_and_connect_attempts() {
    let (a, b) = (naming_upstream("a").await, naming_upstream("b").await);
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (_l, port, _) = start_listener(
        vec![chain(
            json!({}),
            tcp_with(json!({"weighted_clusters": {"clusters": [
                {"name": "ca", "weight": 1}, {"name": "cb", "weight": 5}]}})),
        )],
        vec![
            cluster("ca", &[a], json!({})),
            cluster("cb", &[b], json!({})),
        ],
    );
    let mut seen = std::collections::HashMap::new();
    for _ in 0..60 {
        *seen.entry(read_all(port).await).or_insert(0) += 1;
    }
    let (na, nb) = (
        seen.get("a").copied().unwrap_or(0),
        seen.get("b").copied().unwrap_or(0),
    );
    assert_eq!(na + nb, 60, "{seen:?}");
    assert!(na > 0 && nb > na, "weights 1:5 gave {na}:{nb}");

    // Every other host refuses (round robin): with two attempts every
    // connection gets through.
    let (_l2, port2, admin2) = start_listener(
        vec![chain(
            json!({}),
            tcp_with(json!({"max_connect_attempts": 2})),
        )],
        vec![cluster("t", &[dead, a], json!({}))],
    );
    for _ in 0..20 {
        assert_eq!(read_all(port2).await, "a");
    }
    assert!(stat(admin2, "cluster.t.upstream_cx_connect_fail").unwrap_or(0) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_closes_idle_connections() {
    let up = counting_upstream().await;
    let (_l, port, admin) = start_listener(
        vec![chain(json!({}), tcp_with(json!({"idle_timeout": "0.3s"})))],
        vec![cluster("t", &[up], json!({}))],
    );
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(b"hello").await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    // The upstream waits for EOF that never comes: only the idle timeout
    // ends the connection.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("closed by the idle timeout");
    assert!(started.elapsed() >= std::time::Duration::from_millis(250));
    assert_eq!(stat(admin, "tcp.tcp.idle_timeout"), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_closes_connections_over_the_limit() {
    let up = counting_upstream().await;
    let limit = json!({"name": "envoy.filters.network.connection_limit", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.connection_limit.v3.ConnectionLimit",
        "stat_prefix": "cl", "max_connections": 1}});
    let (port, admin) = (free_port(), free_port());
    let l = json!({"name": "l", "address": addr("127.0.0.1", port),
        "filter_chains": [{"filters": [limit, tcp("t")]}]});
    let cfg = bootstrap(admin, vec![l], vec![cluster("t", &[up], json!({}))]);
    let _l = Legate::start(BIN, &cfg, &[port], Some(admin));
    // Legate::start's readiness probe is a connection too: it must have
    // come and gone before `first` takes the one slot.
    let active = "connection_limit.cl.active_connections";
    wait_stat_until(admin, "tcp.tcp.downstream_cx_total", |v| v >= Some(1));
    assert_eq!(wait_stat(admin, active, 0), Some(0));
    let before = stat(admin, "connection_limit.cl.limited_connections").unwrap_or(0);
    let mut first = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    first.write_all(b"hold").await.unwrap();
    assert_eq!(wait_stat(admin, active, 1), Some(1), "first holds the slot");
    // Over the limit: closed without an upstream.
    let mut second = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let _ = second.write_all(b"x").await;
    let mut buf = Vec::new();
    let _ = second.read_to_end(&mut buf).await;
    assert!(buf.is_empty());
    assert_eq!(
        stat(admin, "connection_limit.cl.limited_connections"),
        Some(before + 1)
    );
    // The first still works, and its end frees the slot.
    first.shutdown().await.unwrap();
    let mut answer = String::new();
    first.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer, legate_tests::tcp::answer_for(b"hold"));
    assert_eq!(wait_stat(admin, active, 0), Some(0), "the slot is free");
    let mut third = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    third.write_all(b"ok").await.unwrap();
    third.shutdown().await.unwrap();
    let mut answer = String::new();
    third.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer, legate_tests::tcp::answer_for(b"ok"));
}

/// A TCP server that hashes everything it receives (SHA-256) and answers
/// with the digest once the client half-closes.
async fn hashing_server() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => ctx.update(&buf[..n]),
                    }
                }
                let _ = s.write_all(ctx.finish().as_ref()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gibibyte_through_tcp_proxy_arrives_intact() {
    let up = hashing_server().await;
    let (_l, port, admin) = start_listener(
        vec![chain(json!({}), tcp("h"))],
        vec![cluster("h", &[up], json!({}))],
    );
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    // 1 GiB of xorshift bytes, hashed as they are sent.
    const TOTAL: usize = 1 << 30;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut chunk = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let started = std::time::Instant::now();
    for _ in 0..TOTAL / chunk.len() {
        for w in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        ctx.update(&chunk);
        s.write_all(&chunk).await.unwrap();
    }
    s.shutdown().await.unwrap();
    let mut digest = Vec::new();
    s.read_to_end(&mut digest).await.unwrap();
    let took = started.elapsed();
    println!("1 GiB through tcp_proxy in {took:?}");
    assert_eq!(
        digest,
        ctx.finish().as_ref(),
        "the upstream saw other bytes"
    );
    // Counted when the connection's pipe ends, after the client has its
    // answer.
    assert_eq!(
        wait_stat(admin, "tcp.tcp.downstream_cx_rx_bytes_total", TOTAL as u64),
        Some(TOTAL as u64)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_ratelimit_closes_connections_beyond_the_bucket() {
    let a = upstream("a").await;
    let limit = json!({"name": "envoy.filters.network.local_ratelimit", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit",
        "stat_prefix": "conns", "token_bucket": {"max_tokens": 2, "fill_interval": "60s"}}});
    let (_l, port, admin) = start_listener(
        vec![json!({"filters": [limit, http("a")]})],
        vec![cluster("a", &[a.addr], json!({}))],
    );
    // Legate::start's readiness probe took one token: one is left.
    let url = format!("http://127.0.0.1:{port}/");
    assert_eq!(curl(&url, &[]).status, 200);
    assert!(
        legate_tests::legate::try_curl(&url, &[]).is_err(),
        "the bucket is empty"
    );
    assert_eq!(stat(admin, "local_ratelimit.conns.rate_limited"), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_downstream_connection_duration_closes_the_connection() {
    let up = hashing_server().await;
    let mut t = tcp("h");
    t["typed_config"]["max_downstream_connection_duration"] = json!("1s");
    let (_l, port, admin) = start_listener(
        vec![chain(json!({}), t)],
        vec![cluster("h", &[up], json!({}))],
    );
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(b"still here").await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    // Closed by Legate (without the digest: the upstream never saw EOF).
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed within 5 s")
        .unwrap_or(0);
    assert_eq!(n, 0);
    let took = started.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(800),
        "closed after {took:?}"
    );
    assert_eq!(
        stat(admin, "tcp.tcp.max_downstream_connection_duration"),
        Some(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_source_ip_hash_pins_each_client_to_one_maglev_host() {
    let ups = [
        upstream("a").await,
        upstream("b").await,
        upstream("c").await,
    ];
    let addrs: Vec<SocketAddr> = ups.iter().map(|u| u.addr).collect();
    let mut t = tcp("m");
    t["typed_config"]["hash_policy"] = json!([{"source_ip": {}}]);
    // Fixed hash keys: the table would otherwise be built from the
    // upstreams' random ports, and all six clients would share one host in
    // 3 runs of 729.
    let mut m = cluster("m", &addrs, json!({"lb_policy": "MAGLEV"}));
    for (i, ep) in m["load_assignment"]["endpoints"][0]["lb_endpoints"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .enumerate()
    {
        ep["metadata"] =
            json!({"filter_metadata": {"envoy.lb": {"hash_key": format!("host-{i}")}}});
    }
    let (_l, port, _admin) = start_listener(vec![chain(json!({}), t)], vec![m]);
    let url = format!("http://127.0.0.1:{port}/");
    let mut seen = std::collections::BTreeMap::new();
    for ip in [
        "127.0.0.1",
        "127.0.0.2",
        "127.0.0.3",
        "127.0.0.4",
        "127.0.0.5",
        "127.0.0.6",
    ] {
        let hosts: std::collections::BTreeSet<String> = (0..8)
            .map(|_| {
                curl(&url, &["--interface", ip])
                    .header("x-echo-server")
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(hosts.len(), 1, "{ip} went to {hosts:?}");
        seen.insert(ip, hosts.into_iter().next().unwrap());
    }
    // Six clients over three hosts: the hash spreads them.
    let distinct: std::collections::BTreeSet<_> = seen.values().collect();
    assert!(distinct.len() >= 2, "all clients on one host: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_access_logs_a_line_per_connection() {
    let up = counting_upstream().await;
    let dir = std::env::temp_dir().join(format!("legate-al-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (custom, default) = (dir.join("custom.log"), dir.join("default.log"));
    let file_log = |path: &std::path::Path, format: Option<&str>| {
        let mut tc = json!({"@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": path.display().to_string()});
        if let Some(f) = format {
            tc["log_format"] = json!({"text_format_source": {"inline_string": f}});
        }
        json!({"name": "envoy.access_loggers.file", "typed_config": tc})
    };
    let logs = json!([
        file_log(&custom, Some("%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %UPSTREAM_CLUSTER% %BYTES_RECEIVED% %BYTES_SENT% %RESPONSE_FLAGS% %UPSTREAM_HOST%\n")),
        file_log(&default, None),
    ]);
    let (_l, port, _admin) = start_listener(
        vec![
            chain(
                json!({"source_prefix_ranges": [{"address_prefix": "127.0.0.9", "prefix_len": 32}]}),
                tcp_with(json!({"cluster": "missing", "access_log": logs})),
            ),
            chain(json!({}), tcp_with(json!({"access_log": logs}))),
        ],
        vec![cluster("t", &[up], json!({}))],
    );
    // Legate::start's readiness probe is one connection through the second
    // chain, logged in both files when it ends: only lines after its line
    // count.
    let skip = |p: &std::path::Path| {
        for _ in 0..100 {
            let n = std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .count();
            if n >= 1 {
                return n;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("{} has no line for the readiness probe", p.display());
    };
    let (skip_custom, skip_default) = (skip(&custom), skip(&default));
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(b"hello").await.unwrap();
    s.shutdown().await.unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer, legate_tests::tcp::answer_for(b"hello"));
    // From 127.0.0.9: the chain whose cluster does not exist.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.9:0".parse().unwrap()).unwrap();
    let mut s = sock
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap();
    let mut nothing = Vec::new();
    let _ = s.read_to_end(&mut nothing).await;
    let lines = |p: &std::path::Path, skip: usize, want: usize| {
        for _ in 0..100 {
            let all = std::fs::read_to_string(p).unwrap_or_default();
            let v: Vec<String> = all.lines().skip(skip).map(str::to_string).collect();
            if v.len() >= want {
                return v;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("{} has fewer than {want} new lines", p.display());
    };
    let c = lines(&custom, skip_custom, 2);
    assert_eq!(c[0], format!("127.0.0.1 t 5 {} - {up}", answer.len()));
    // Envoy prints no cluster name when the cluster does not exist.
    assert_eq!(c[1], "127.0.0.9 - 0 0 NC -");
    let d = lines(&default, skip_default, 1);
    // Envoy's default line for a TCP connection.
    assert!(
        is_envoys_default_tcp_line(&d[0]),
        "default format line: {}",
        d[0]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `[<RFC 3339 ms>Z] "- - -" 0 - 5 <n> <ms> - "-" "-" "-" "-" "<upstream>"`
fn is_envoys_default_tcp_line(line: &str) -> bool {
    let Some(rest) = line.strip_prefix('[') else {
        return false;
    };
    let Some((time, rest)) = rest.split_once("] ") else {
        return false;
    };
    let time_ok = time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T';
    let f: Vec<&str> = rest.split(' ').collect();
    time_ok
        && f.len() == 14
        && f[0..3] == ["\"-", "-", "-\""]
        && f[3] == "0"
        && f[4] == "-"
        && f[5] == "5"
        && f[6].parse::<u64>().is_ok()
        && f[7].parse::<u64>().is_ok()
        && f[8] == "-"
        && f[9..13] == ["\"-\""; 4]
        && f[13].starts_with("\"127.0.0.1:")
}

/// tcp_proxy to an ORIGINAL_DST cluster (Istio's PassthroughCluster):
/// each connection goes to the destination its PROXY header restored; a
/// connection whose destination was not restored has no host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_to_original_dst_follows_the_restored_destination() {
    let (a, b) = (naming_upstream("a").await, naming_upstream("b").await);
    let (port, admin) = (free_port(), free_port());
    let l = json!({"name": "l", "address": addr("127.0.0.1", port),
        "listener_filters": [{"name": "envoy.filters.listener.proxy_protocol", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol",
            "allow_requests_without_proxy_protocol": true}}],
        "filter_chains": [chain(json!({}), tcp("od"))]});
    let od = json!({"name": "od", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "1s", "upstream_bind_config": {"source_address": {"address": "127.0.0.6", "port_value": 0}}});
    let cfg = bootstrap(admin, vec![l], vec![od]);
    let _l = Legate::start(BIN, &cfg, &[port], Some(admin));
    let send = |first: String| async move {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(first.as_bytes()).await.unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    };
    let via = |dst: SocketAddr| {
        send(format!(
            "PROXY TCP4 10.0.0.1 {} 1234 {}\r\n",
            dst.ip(),
            dst.port()
        ))
    };
    assert_eq!(via(a).await, "a");
    assert_eq!(via(b).await, "b");
    // Not a PROXY header (allowed): the destination is not restored.
    assert_eq!(
        send("hello".into()).await,
        "",
        "no restored destination: no host"
    );
    assert_eq!(stat(admin, "cluster.od.upstream_cx_none_healthy"), Some(1));
}
