//! Active health checks through the real binary, over time: a host that
//! goes away is taken out of rotation once it fails its checks (no
//! request reaches it after), and comes back after `healthy_threshold`
//! passing checks when it returns on the same port.

mod common;
use common::*;
use serde_json::json;
use std::time::Duration;

/// The servers that answered `n` requests.
fn served(url: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let r = curl(url, &[]);
            if r.status != 200 {
                return format!("status {}", r.status);
            }
            serde_json::from_str::<serde_json::Value>(&r.body)
                .ok()
                .and_then(|v| v["server"].as_str().map(str::to_string))
                .unwrap_or_default()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_host_leaves_rotation_and_returns() {
    let a = upstream("a").await;
    let b = upstream("b").await;
    let b_addr = b.addr;
    let hc = json!({"health_checks": [{
        "timeout": "0.2s",
        "interval": "0.2s",
        "no_traffic_interval": "0.2s",
        "unhealthy_threshold": 2,
        "healthy_threshold": 2,
        "http_health_check": {"path": "/healthy-if/a,b"},
    }]});
    let rc = routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "hc"}}]));
    let (_l, url, admin) = start(
        hcm(rc, json!({})),
        vec![cluster("hc", &[a.addr, b.addr], hc)],
    );
    assert_eq!(stat(admin, "cluster.hc.health_check.healthy"), Some(2));
    let both = served(&format!("{url}/x"), 6);
    assert!(
        both.contains(&"a".to_string()) && both.contains(&"b".to_string()),
        "{both:?}"
    );

    // b goes away: connections refused count as network failures.
    drop(b);
    assert_eq!(
        wait_stat(admin, "cluster.hc.health_check.healthy", 1),
        Some(1)
    );
    assert_eq!(served(&format!("{url}/x"), 6), vec!["a"; 6]);
    assert!(stat(admin, "cluster.hc.health_check.network_failure").unwrap_or(0) >= 2);

    // b returns on its port: two passing checks bring it back.
    let _b = legate_tests::echo::start("b", b_addr).await.unwrap();
    assert_eq!(
        wait_stat(admin, "cluster.hc.health_check.healthy", 2),
        Some(2)
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let back = served(&format!("{url}/x"), 6);
    assert!(back.contains(&"b".to_string()), "{back:?}");
}
