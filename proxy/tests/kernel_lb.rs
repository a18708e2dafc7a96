//! The kernel load balancer through the real binary: a `bind_to_port:
//! false` tcp_proxy listener served by eBPF at connect() with the cluster's
//! weights, stats that count kernel-balanced connections, EDS updates
//! under load with zero failed connects, and the fallbacks when BPF cannot
//! load. The privileged tests say "skipped" without root or an eBPF build.

mod common;
use common::*;
use legate_tests::cgroup::{skip_reason, Cgroup, TagServer};
use legate_tests::xds_server::{any, ScriptedAds, CLUSTER, ENDPOINT, LISTENER};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn skip() -> bool {
    skip_reason(legate_bpf::built_with_ebpf()).is_some()
}

/// A base id of its own per test, so instances never share pinned maps.
fn base_id() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (u64::from(std::process::id()) * 1000 + n).to_string()
}

fn vip_listener(name: &str, vip: SocketAddr, cluster: &str) -> Value {
    json!({"name": name, "bind_to_port": false, "address": addr(&vip.ip().to_string(), vip.port()),
           "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
               "stat_prefix": "vip", "cluster": cluster}}]}]})
}

fn weighted_cluster(name: &str, hosts: &[(SocketAddr, u32)]) -> Value {
    let eps: Vec<Value> = hosts
        .iter()
        .map(|(a, w)| json!({"endpoint": {"address": addr(&a.ip().to_string(), a.port())}, "load_balancing_weight": w}))
        .collect();
    json!({"name": name, "type": "STATIC", "connect_timeout": "1s",
           "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": eps}]}})
}

/// `/kernel_lb`, or Null before the agent has started (the admin API
/// opens first).
fn kernel_status(admin: u16) -> Value {
    serde_json::from_str(&admin_get(admin, "/kernel_lb").body).unwrap_or(Value::Null)
}

/// Polls /kernel_lb until `check` holds.
fn wait_status(admin: u16, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = kernel_status(admin);
        if check(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "/kernel_lb never matched: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Some listener is served by the kernel.
fn offloaded(s: &Value) -> bool {
    s["listeners"]
        .as_array()
        .is_some_and(|l| l.iter().any(|l| l["offloaded"] == true))
}

/// Starts Legate with `--kernel-lb required` on `cg` and a base id of its
/// own; its pins go when the returned guard drops.
fn start_required(cfg: &str, cg: &Cgroup, admin: u16) -> (Pins, Legate) {
    start_with_base_id(cfg, cg, admin, base_id())
}

fn start_with_base_id(cfg: &str, cg: &Cgroup, admin: u16, id: String) -> (Pins, Legate) {
    let cgroup = cg.path.display().to_string();
    let args = [
        "--kernel-lb",
        "required",
        "--kernel-lb-cgroup",
        &cgroup,
        "--base-id",
        &id,
    ];
    let l = Legate::start_with_args(BIN, cfg, &args, &[], Some(admin));
    (Pins(id), l)
}

/// A listener's `downstream_cx_total` by address, named as Envoy names it
/// (`:` becomes `_`).
fn listener_cx_total(vip: SocketAddr) -> String {
    format!("listener.{vip}.downstream_cx_total").replace(':', "_")
}

/// Whether the instance pinned an attached link for `program`.
fn pinned_link(pins: &Pins, program: &str) -> bool {
    std::path::Path::new(&format!("/sys/fs/bpf/legate/{}/link_{program}", pins.0)).exists()
}

/// Removes what the instance pinned: Legate leaves its pins on exit so a
/// restart adopts them.
struct Pins(String);
impl Drop for Pins {
    fn drop(&mut self) {
        let _ = legate_bpf::unpin(std::path::Path::new(&format!(
            "/sys/fs/bpf/legate/{}",
            self.0
        )));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vip_listener_is_balanced_in_the_kernel_with_the_cluster_weights() {
    if skip() {
        return;
    }
    let cg = Cgroup::new(&legate_bpf::cgroup2_root().unwrap(), "proxy-weights");
    let (a, b) = (TagServer::start('a').await, TagServer::start('b').await);
    let vip: SocketAddr = "127.100.1.1:80".parse().unwrap();
    let admin = free_port();
    let cfg = bootstrap(
        admin,
        vec![vip_listener("vip", vip, "svc")],
        vec![weighted_cluster("svc", &[(a.addr, 1), (b.addr, 3)])],
    );
    let l = start_required(&cfg, &cg, admin);
    let s = wait_status(admin, offloaded);
    assert_eq!(s["listeners"][0]["mode"], "DIRECT");
    assert_eq!(stat(admin, "kernel_lb.enabled"), Some(1));
    // Nothing is redirected, so no sock_ops program runs on every socket.
    assert_eq!(s["sock_ops_attached"], false, "{s}");
    assert!(!pinned_link(&l.0, "legate_sockops"));

    let lines = cg.connect(vip, 2000);
    let mut to_a = 0;
    for l in &lines {
        let (peer, tag) = l
            .split_once(' ')
            .unwrap_or_else(|| panic!("failed connect: {l}"));
        assert_eq!(peer, "127.100.1.1:80", "getpeername shows the VIP");
        to_a += u32::from(tag == "a");
    }
    let share = f64::from(to_a) / 2000.0;
    assert!((share - 0.25).abs() < 0.04, "weight 1 of 4 got {share:.3}");
    assert_eq!(
        a.accepted() + b.accepted(),
        2000,
        "every connect reached a backend directly"
    );

    // The kernel's connections show in the cluster's stats and per backend.
    let deadline = Instant::now() + Duration::from_secs(5);
    while stat(admin, "cluster.svc.upstream_cx_total") != Some(2000) {
        assert!(
            Instant::now() < deadline,
            "upstream_cx_total: {:?}",
            stat(admin, "cluster.svc.upstream_cx_total")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = kernel_status(admin);
    let per: Vec<u64> = s["listeners"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["connections"].as_u64().unwrap())
        .collect();
    assert_eq!(per.iter().sum::<u64>(), 2000, "{s}");
    // No proxy hop: the listener itself accepted nothing.
    assert_eq!(
        stat(admin, "listener.127.100.1.1_80.downstream_cx_total").unwrap_or(0),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_vip_is_redirected_to_legate_which_serves_it_with_that_listener() {
    if skip() {
        return;
    }
    let cg = Cgroup::new(&legate_bpf::cgroup2_root().unwrap(), "proxy-redirect");
    let up = upstream("web").await;
    // One VIP of each family: IPv4 connects go to the redirect listener on
    // 127.0.0.1, IPv6 ones to the same port on [::1].
    let vips: [SocketAddr; 2] = [
        "127.100.1.4:80".parse().unwrap(),
        "[fd00::1:4]:80".parse().unwrap(),
    ];
    let admin = free_port();
    let rc = routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "web"}}]));
    let ls = vips
        .iter()
        .enumerate()
        .map(|(i, vip)| {
            let mut l = listener(
                &format!("http-vip{i}"),
                vip.port(),
                hcm(rc.clone(), json!({})),
            );
            l["address"] = addr(&vip.ip().to_string(), vip.port());
            l["bind_to_port"] = json!(false);
            l
        })
        .collect();
    let cfg = bootstrap(admin, ls, vec![cluster("web", &[up.addr], json!({}))]);
    let l = start_required(&cfg, &cg, admin);
    let s = wait_status(admin, |s| {
        (0..2).all(|i| s["listeners"][i]["redirected"] == true)
    });
    assert_eq!(s["listeners"][1]["address"], vips[1].to_string(), "{s}");
    assert_eq!(s["sock_ops_attached"], true, "{s}");
    assert!(pinned_link(&l.0, "legate_sockops"));
    for vip in vips {
        // curl inside the cgroup dials the VIP; nothing listens there, the
        // kernel sends it to Legate, which routes it with that listener.
        let url = format!("http://{vip}/hello");
        let out = cg.run("curl", &["-s", "-i", "-g", "--max-time", "5", &url]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.starts_with("HTTP/1.1 200"), "{url}: {text}");
        assert!(
            text.to_ascii_lowercase().contains("x-echo-server: web"),
            "{text}"
        );
        assert_eq!(stat(admin, &listener_cx_total(vip)), Some(1), "{vip}");
        // Outside the cgroup nothing is rewritten: the VIP has no listener.
        assert!(std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(1)).is_err());
    }
    assert_eq!(
        stat(admin, "kernel_lb.redirect_no_original_dst").unwrap_or(0),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legates_own_connects_are_never_rewritten() {
    if skip() {
        return;
    }
    // Legate runs inside the balanced cgroup, and one of its clusters has
    // the VIP itself as endpoint. Were Legate's own connect rewritten, it
    // would reach the VIP's backend; it must reach the VIP address, where
    // nothing listens (503), as it would without the kernel LB.
    let cg = Cgroup::new(&legate_bpf::cgroup2_root().unwrap(), "proxy-self");
    let backend = TagServer::start('k').await;
    let vip: SocketAddr = "127.100.1.5:80".parse().unwrap();
    let (port, admin) = (free_port(), free_port());
    let rc = routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "via-vip"}}]));
    let cfg = bootstrap(
        admin,
        vec![
            vip_listener("vip", vip, "svc"),
            listener("http", port, hcm(rc, json!({}))),
        ],
        vec![
            weighted_cluster("svc", &[(backend.addr, 1)]),
            cluster("via-vip", &[vip], json!({})),
        ],
    );
    let id = base_id();
    let _pins = Pins(id.clone());
    let path = legate_tests::legate::write_config(&cfg);
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = Kill(
        cg.inside(BIN)
            .args([
                "--concurrency",
                "1",
                "-l",
                "warning",
                "--kernel-lb",
                "required",
                "--base-id",
                &id,
            ])
            .arg("--kernel-lb-cgroup")
            .arg(&cg.path)
            .arg("-c")
            .arg(&path.0)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", admin)).is_err() {
        assert!(Instant::now() < deadline, "legate did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = wait_status(admin, offloaded);
    assert_eq!(s["listeners"][1]["mode"], "DIRECT", "{s}");
    // Another process in the cgroup is balanced to the backend...
    assert_eq!(cg.connect(vip, 1), vec!["127.100.1.5:80 k".to_string()]);
    // ...while Legate's own upstream connect to the VIP is left alone.
    let r = curl(&format!("http://127.0.0.1:{port}/"), &[]);
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(
        backend.accepted(),
        1,
        "only the client's connect reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balancing_survives_a_crash_and_a_restart_adopts_the_pins() {
    if skip() {
        return;
    }
    let cg = Cgroup::new(&legate_bpf::cgroup2_root().unwrap(), "proxy-restart");
    let (a, b) = (TagServer::start('a').await, TagServer::start('b').await);
    let vip: SocketAddr = "127.100.1.6:80".parse().unwrap();
    let id = base_id();
    let admin = free_port();
    let only = |server: &TagServer| {
        bootstrap(
            admin,
            vec![vip_listener("vip", vip, "svc")],
            vec![weighted_cluster("svc", &[(server.addr, 1)])],
        )
    };
    let (pins, first) = start_with_base_id(&only(&a), &cg, admin, id.clone());
    wait_status(admin, offloaded);
    assert_eq!(cg.connect(vip, 1), vec!["127.100.1.6:80 a".to_string()]);
    // SIGKILL: no chance to clean up. The pinned programs and maps keep
    // balancing without any Legate.
    drop(first);
    assert_eq!(cg.connect(vip, 3), vec!["127.100.1.6:80 a".to_string(); 3]);
    // A new Legate with the same base id adopts the pins and applies its
    // own config.
    std::mem::forget(pins);
    let (_pins, _second) = start_with_base_id(&only(&b), &cg, admin, id);
    wait_status(admin, offloaded);
    let deadline = Instant::now() + Duration::from_secs(5);
    while cg.connect(vip, 1) != vec!["127.100.1.6:80 b".to_string()] {
        assert!(
            Instant::now() < deadline,
            "the restarted Legate did not take over"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        cg.connect(vip, 20),
        vec!["127.100.1.6:80 b".to_string(); 20]
    );
}

fn cla(hosts: &[SocketAddr]) -> Value {
    let eps: Vec<Value> = hosts
        .iter()
        .map(|a| json!({"endpoint": {"address": addr(&a.ip().to_string(), a.port())}}))
        .collect();
    json!({"cluster_name": "svc", "endpoints": [{"lb_endpoints": eps}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_eds_updates_under_load_fail_no_connect() {
    if skip() {
        return;
    }
    let cg = Cgroup::new(&legate_bpf::cgroup2_root().unwrap(), "proxy-eds");
    let ads = ScriptedAds::start("127.0.0.1:0".parse().unwrap()).await;
    let vip: SocketAddr = "127.100.1.2:80".parse().unwrap();
    let admin = free_port();
    // A rolling update: each step adds a new backend and drops the oldest;
    // a dropped backend's server closes once /kernel_lb (written after the
    // maps) no longer lists it and one more step has passed, so a connect
    // sent to it after that would be refused.
    let mut servers: Vec<Option<TagServer>> = vec![
        Some(TagServer::start('0').await),
        Some(TagServer::start('1').await),
    ];
    ads.set(
        LISTENER,
        "1",
        vec![any(LISTENER, vip_listener("vip", vip, "svc"))],
    );
    ads.set(
        CLUSTER,
        "1",
        vec![any(
            CLUSTER,
            json!({"name": "svc", "type": "EDS", "connect_timeout": "1s",
            "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}}}),
        )],
    );
    let addrs = |s: &[Option<TagServer>], i: usize| {
        vec![s[i - 1].as_ref().unwrap().addr, s[i].as_ref().unwrap().addr]
    };
    ads.set(ENDPOINT, "1", vec![any(ENDPOINT, cla(&addrs(&servers, 1)))]);
    let _l = start_required(&ads_bootstrap(ads.addr, admin, "kernel-lb"), &cg, admin);
    wait_status(admin, offloaded);

    let stop = std::env::temp_dir().join(format!("legate-kernel-eds-stop-{}", std::process::id()));
    let _ = std::fs::remove_file(&stop);
    let client = cg.connect_until(vip, &stop);
    for i in 2..=101usize {
        servers.push(Some(TagServer::start('x').await));
        ads.set(
            ENDPOINT,
            &i.to_string(),
            vec![any(ENDPOINT, cla(&addrs(&servers, i)))],
        );
        // Removed from the set by the push of step i - 3: on a loaded
        // machine its apply may lag, so wait until the kernel's maps drop it
        // (normally long done), then give connects in flight a step.
        let gone = (i >= 5).then(|| servers[i - 5].as_ref().unwrap().addr.to_string());
        if let Some(gone) = &gone {
            wait_status(admin, |s| {
                s["listeners"][0]["backends"]
                    .as_array()
                    .is_some_and(|b| b.iter().all(|b| b["address"] != gone.as_str()))
            });
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        if i >= 5 {
            servers[i - 5] = None;
        }
    }
    std::fs::write(&stop, b"").unwrap();
    let lines = tokio::task::spawn_blocking(move || client.finish())
        .await
        .unwrap();
    let _ = std::fs::remove_file(&stop);
    let failed = lines.iter().filter(|l| l.as_str() == "refused").count();
    eprintln!(
        "kernel LB under 100 EDS updates: {} connects, {failed} failed",
        lines.len()
    );
    assert!(
        lines.len() > 200,
        "the client kept connecting: {}",
        lines.len()
    );
    assert_eq!(
        failed,
        0,
        "{failed} of {} connects failed across 100 EDS updates",
        lines.len()
    );
    assert!(lines.iter().all(|l| l.starts_with("127.100.1.2:80 ")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_serves_the_vip_from_userspace_when_bpf_cannot_load() {
    // Runs without privileges: the cgroup does not exist, so loading fails
    // wherever this runs.
    let (a, b) = (TagServer::start('a').await, TagServer::start('b').await);
    let vip: SocketAddr = format!("127.100.1.3:{}", free_port()).parse().unwrap();
    let admin = free_port();
    let cfg = bootstrap(
        admin,
        vec![vip_listener("vip", vip, "svc")],
        vec![weighted_cluster("svc", &[(a.addr, 1), (b.addr, 1)])],
    );
    let id = base_id();
    let _l = Legate::start_with_args(
        BIN,
        &cfg,
        &[
            "--kernel-lb",
            "auto",
            "--kernel-lb-cgroup",
            "/nonexistent/legate-cgroup",
            "--base-id",
            &id,
        ],
        &[],
        Some(admin),
    );
    let s = wait_status(admin, |s| {
        s["listeners"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("served in userspace"))
    });
    assert_eq!(s["loaded"], false);
    assert!(
        s["unavailable_reason"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/legate-cgroup"),
        "{s}"
    );
    assert_eq!(stat(admin, "kernel_lb.enabled"), Some(0));
    // Legate's own tcp_proxy now serves the VIP from the same endpoints.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut seen = std::collections::HashSet::new();
    for _ in 0..20 {
        let mut s = tokio::net::TcpStream::connect(vip)
            .await
            .expect("the VIP accepts in userspace");
        s.write_all(b"x").await.unwrap();
        let mut r = [0u8; 1];
        s.read_exact(&mut r).await.unwrap();
        seen.insert(r[0]);
    }
    assert_eq!(seen.len(), 2, "both endpoints serve");
    assert!(stat(admin, &listener_cx_total(vip)).unwrap_or(0) >= 20);
}

#[test]
fn required_refuses_to_start_when_bpf_cannot_load() {
    let admin = free_port();
    let cfg = bootstrap(admin, vec![], vec![]);
    let path = legate_tests::legate::write_config(&cfg);
    let out = std::process::Command::new(BIN)
        .args([
            "--kernel-lb",
            "required",
            "--kernel-lb-cgroup",
            "/nonexistent/legate-cgroup",
            "-c",
        ])
        .arg(&path.0)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--kernel-lb required"), "{err}");
}

#[test]
fn the_mode_can_come_from_the_bootstrap_runtime() {
    let admin = free_port();
    let mut cfg: Value = serde_json::from_str(&bootstrap(admin, vec![], vec![])).unwrap();
    cfg["layered_runtime"] = json!({"layers": [{"name": "static", "static_layer": {
        "legate.kernel_lb.mode": "required", "legate.kernel_lb.cgroup": "/nonexistent/legate-cgroup"}}]});
    let path = legate_tests::legate::write_config(&cfg.to_string());
    let out = std::process::Command::new(BIN)
        .arg("-c")
        .arg(&path.0)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "required from the runtime layer"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/legate-cgroup"));
    // --mode validate checks the setting too.
    let mut bad = cfg.clone();
    bad["layered_runtime"]["layers"][0]["static_layer"]["legate.kernel_lb.mode"] = json!("fast");
    let bad_path = legate_tests::legate::write_config(&bad.to_string());
    let out = std::process::Command::new(BIN)
        .args(["--mode", "validate", "-c"])
        .arg(&bad_path.0)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("legate.kernel_lb.mode"));
    // The command line wins.
    let id = base_id();
    let _l = Legate::start_with_args(
        BIN,
        &cfg.to_string(),
        &["--kernel-lb", "off", "--base-id", &id],
        &[],
        Some(admin),
    );
    wait_status(admin, |s| s["mode"] == "off" && s["loaded"] == false);
}
