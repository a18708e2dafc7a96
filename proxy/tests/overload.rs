//! The overload manager's global downstream connection limit through the
//! real binary: connections over the limit are closed and counted per
//! listener, a listener with `ignore_global_conn_limit` is exempt, a
//! closed connection frees its place, and the admin listener counts
//! unless it ignores the limit too.

mod common;
use common::*;
use serde_json::json;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn direct(name: &str, port: u16, extra: serde_json::Value) -> serde_json::Value {
    let rc = routes(
        json!([{"match": {"prefix": "/"}, "direct_response": {"status": 200,
        "body": {"inline_string": name}}}]),
    );
    let mut l = listener(name, port, hcm(rc, json!({})));
    l.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    l
}

/// A bootstrap whose global limit of 2 comes from the overload manager's
/// monitor, or else from the deprecated runtime key.
fn limited(admin: u16, listeners: Vec<serde_json::Value>, monitor: bool) -> String {
    let mut b: serde_json::Value =
        serde_json::from_str(&bootstrap(admin, listeners, vec![])).unwrap();
    if monitor {
        b["overload_manager"] = json!({"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                "max_active_downstream_connections": 2}}]});
    } else {
        b["layered_runtime"] = json!({"layers": [{"name": "static",
            "static_layer": {"overload.global_downstream_max_connections": 2}}]});
    }
    b.to_string()
}

/// One request on a new connection: the body, or "" when the proxy closed
/// the connection without an answer.
async fn get(port: u16) -> String {
    get_path(port, "/").await
}

async fn get_path(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    let _ = s.write_all(req.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("answered or closed");
    let text = String::from_utf8_lossy(&out);
    text.split("\r\n\r\n").nth(1).unwrap_or("").to_string()
}

/// A connection Legate has accepted and holds open (it waits for a
/// request); proven held by the limit's count.
async fn hold(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port)).await.unwrap()
}

/// Retries `f` until it says yes (connections close asynchronously).
async fn eventually<F: std::future::Future<Output = bool>>(mut f: impl FnMut() -> F) -> bool {
    for _ in 0..50 {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

fn overflow(admin: u16, port: u16) -> u64 {
    stat(
        admin,
        &format!("listener.127.0.0.1_{port}.downstream_global_cx_overflow"),
    )
    .unwrap_or(0)
}

/// Legate with a limit of 2 (from the monitor, else the runtime key) and
/// three listeners: one limited, one ignoring the limit, one bypassing
/// the overload manager; with their ports and the admin port.
fn three_listeners(monitor: bool) -> (Legate, [u16; 3], u16) {
    let (a, b, c, admin) = (free_port(), free_port(), free_port(), free_port());
    let cfg = limited(
        admin,
        vec![
            direct("limited", a, json!({})),
            direct("ignoring", b, json!({"ignore_global_conn_limit": true})),
            direct("bypassing", c, json!({"bypass_overload_manager": true})),
        ],
        monitor,
    );
    let l = Legate::start(BIN, &cfg, &[a, b, c], Some(admin));
    (l, [a, b, c], admin)
}

/// The monitor's limit: a third connection is refused and counted; the
/// listeners that ignore the limit or bypass the overload manager, and the
/// admin listener, are served and do not count; a closed connection gives
/// its place back. (Each fact as Envoy 1.40 behaves on the same config.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitor_limit_refuses_and_counts_and_exempts() {
    let (_l, [a, b, c], admin) = three_listeners(true);
    assert_eq!(get(a).await, "limited", "under the limit");
    // Exempt connections held open do not take places.
    let exempt = vec![hold(b).await, hold(b).await, hold(c).await, hold(c).await];
    let held = vec![hold(a).await, hold(a).await];
    assert!(
        eventually(|| async { get(a).await.is_empty() }).await,
        "a third connection is closed while two are open"
    );
    assert!(overflow(admin, a) >= 1, "the overflow is counted");
    assert_eq!(get(b).await, "ignoring");
    assert_eq!(get(c).await, "bypassing");
    assert_eq!(
        get_path(admin, "/ready").await.trim(),
        "LIVE",
        "the admin listener bypasses it"
    );
    assert_eq!((overflow(admin, b), overflow(admin, c)), (0, 0));
    drop(held);
    assert!(
        eventually(|| async { get(a).await == "limited" }).await,
        "served again once the held connections closed"
    );
    drop(exempt);
}

/// The deprecated runtime key: every accepted connection counts, even on
/// a listener that ignores the limit, and only that listener is exempt
/// from refusal; `bypass_overload_manager` and the admin listener are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_key_limit_counts_every_connection() {
    let (_l, [a, b, c], admin) = three_listeners(false);
    let held = vec![hold(b).await, hold(b).await];
    assert!(
        eventually(|| async { get(a).await.is_empty() }).await,
        "two connections on the ignoring listener fill the limit"
    );
    assert_eq!(get(c).await, "", "bypass_overload_manager does not exempt");
    assert_eq!(
        get_path(admin, "/ready").await,
        "",
        "nor does the admin listener"
    );
    assert_eq!(get(b).await, "ignoring", "ignore_global_conn_limit does");
    drop(held);
    assert!(eventually(|| async { get(a).await == "limited" }).await);
    assert!(overflow(admin, a) >= 1 && overflow(admin, c) >= 1);
    assert!(stat(admin, "listener.admin.downstream_global_cx_overflow").unwrap_or(0) >= 1);
}
