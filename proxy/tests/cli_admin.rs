//! The command line (`--mode validate`, `--config-yaml`, `--version`) and
//! the admin API, through the real binary.

mod common;
use common::*;
use serde_json::json;

fn minimal(port: u16, cluster_extra: serde_json::Value) -> String {
    let rc = routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "c"}}]));
    bootstrap(
        free_port(),
        vec![listener("l", port, hcm(rc, json!({})))],
        vec![cluster(
            "c",
            &["127.0.0.1:1".parse().unwrap()],
            cluster_extra,
        )],
    )
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn validate_accepts_a_good_config_without_opening_sockets() {
    // The listener's port is taken: validate must not try to bind it.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let out = validate(BIN, &minimal(held.local_addr().unwrap().port(), json!({})));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
    // The shipped example is valid too.
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/basic.yaml"
    ))
    .unwrap();
    assert!(validate(BIN, &example).status.success());
}

#[test]
fn validate_rejects_bad_configs_naming_the_field() {
    let cases: Vec<(String, &str)> = vec![
        // Unknown field (a typo).
        (
            minimal(1000, json!({"conect_timeout": "1s"})),
            "static_resources.clusters[0]",
        ),
        // A real Envoy field that Legate does not implement and that changes traffic.
        (
            minimal(1000, json!({"health_checks": [{"timeout": "1s"}]})),
            "static_resources.clusters[0].health_checks",
        ),
        // A bad value.
        (
            minimal(1000, json!({"connect_timeout": "-1s"})),
            "connect_timeout",
        ),
        (
            minimal(
                1000,
                json!({"lb_policy": "MAGLEV", "maglev_lb_config": {"table_size": 100}}),
            ),
            "maglev_lb_config.table_size",
        ),
    ];
    for (cfg, path) in cases {
        let out = validate(BIN, &cfg);
        assert_eq!(out.status.code(), Some(1), "{cfg}");
        assert!(
            stderr(&out).contains(path),
            "expected '{path}' in: {}",
            stderr(&out)
        );
    }
    // A route to a cluster that does not exist.
    let rc = routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "missing"}}]));
    let out = validate(
        BIN,
        &bootstrap(1, vec![listener("l", 1000, hcm(rc, json!({})))], vec![]),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("unknown cluster 'missing'"),
        "{}",
        stderr(&out)
    );
    // A bad regex names its route.
    let rc = routes(
        json!([{"match": {"safe_regex": {"regex": "(unclosed"}}, "direct_response": {"status": 200}}]),
    );
    let out = validate(
        BIN,
        &bootstrap(1, vec![listener("l", 1000, hcm(rc, json!({})))], vec![]),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("routes[0].match.safe_regex.regex"),
        "{}",
        stderr(&out)
    );
    // An HTTP filter Legate does not have is rejected, not skipped.
    let mut h = hcm(routes(json!([])), json!({}));
    h["http_filters"] = json!([{"name": "lua", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"}},
        {"name": "router", "typed_config": {"@type": ROUTER}}]);
    let out = validate(BIN, &bootstrap(1, vec![listener("l", 1000, h)], vec![]));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("http_filters[0]"), "{}", stderr(&out));
    // Garbage.
    let out = validate(BIN, "static_resources: [not, a, map]");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn version_and_unknown_flags() {
    let out = std::process::Command::new(BIN)
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("version"));
    let out = std::process::Command::new(BIN)
        .arg("--no-such-flag")
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_yaml_merges_over_the_file() {
    let up = upstream("merged").await;
    let (port, admin) = (free_port(), free_port());
    let rc = routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "late"}}]));
    // The file's route needs a cluster that only the overlay defines.
    let file =
        json!({"static_resources": {"listeners": [listener("l", port, hcm(rc, json!({})))]}})
            .to_string();
    let overlay = json!({"admin": {"address": addr("127.0.0.1", admin)}, "static_resources": {"clusters": [cluster("late", &[up.addr], json!({}))]}}).to_string();
    let _l = Legate::start_with_args(
        BIN,
        &file,
        &["--config-yaml", &overlay],
        &[port],
        Some(admin),
    );
    assert_eq!(
        curl(&format!("http://127.0.0.1:{port}/"), &[]).header("x-echo-server"),
        Some("merged")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_in_envoys_formats() {
    let up = upstream("a").await;
    let rc = routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "a"}}]));
    let (port, admin) = (free_port(), free_port());
    let mut boot: serde_json::Value = serde_json::from_str(&bootstrap(
        admin,
        vec![listener("main", port, hcm(rc, json!({})))],
        vec![cluster("a", &[up.addr], json!({}))],
    ))
    .unwrap();
    boot["layered_runtime"] =
        json!({"layers": [{"name": "s", "static_layer": {"feature": {"x": true}}}]});
    boot["node"] = json!({"id": "node-1", "cluster": "svc"});
    let mut l = Legate::start(BIN, &boot.to_string(), &[port], Some(admin));
    curl(&format!("http://127.0.0.1:{port}/"), &[]);

    assert_eq!(admin_get(admin, "/ready").body, "LIVE\n");
    let info: serde_json::Value =
        serde_json::from_str(&admin_get(admin, "/server_info").body).unwrap();
    assert_eq!(info["state"], "LIVE");
    assert_eq!(info["node"]["id"], "node-1");

    let text = admin_get(admin, "/stats").body;
    assert!(text.contains("cluster.a.upstream_rq_total: 1\n"), "{text}");
    assert!(text.contains("http.ingress.downstream_rq_2xx: 1\n"));
    // Two connections: the kit's readiness probe, then curl.
    assert!(
        text.contains(&format!(
            "listener.127.0.0.1_{port}.downstream_cx_total: 2\n"
        )),
        "{text}"
    );
    assert!(text.contains("server.live: 1\n"));
    let filtered = admin_get(admin, "/stats?filter=upstream_rq_total").body;
    assert!(filtered.lines().all(|l| l.contains("upstream_rq_total")) && !filtered.is_empty());
    let prom = admin_get(admin, "/stats/prometheus").body;
    assert!(
        prom.contains("# TYPE envoy_cluster_a_upstream_rq_total counter"),
        "{prom}"
    );

    let clusters: serde_json::Value =
        serde_json::from_str(&admin_get(admin, "/clusters?format=json").body).unwrap();
    assert_eq!(clusters["cluster_statuses"][0]["name"], "a");
    assert_eq!(
        clusters["cluster_statuses"][0]["host_statuses"][0]["address"]["socket_address"]
            ["port_value"],
        up.addr.port()
    );
    assert!(admin_get(admin, "/clusters")
        .body
        .contains(&format!("a::{}::health_flags::healthy", up.addr)));
    let listeners: serde_json::Value =
        serde_json::from_str(&admin_get(admin, "/listeners?format=json").body).unwrap();
    assert_eq!(listeners["listener_statuses"][0]["name"], "main");
    assert_eq!(
        admin_get(admin, "/listeners").body,
        format!("main::127.0.0.1:{port}\n")
    );

    let dump: serde_json::Value =
        serde_json::from_str(&admin_get(admin, "/config_dump").body).unwrap();
    assert_eq!(
        dump["configs"][0]["@type"],
        "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump"
    );
    assert_eq!(dump["configs"][0]["bootstrap"]["node"]["id"], "node-1");
    let only: serde_json::Value = serde_json::from_str(
        &admin_get(
            admin,
            "/config_dump?resource=static_clusters&mask=cluster.name",
        )
        .body,
    )
    .unwrap();
    assert_eq!(
        only["configs"][0],
        json!({"cluster": {"name": "a"}}),
        "the mask keeps exactly cluster.name"
    );
    assert!(only["configs"].as_array().unwrap().len() == 1);

    let rt: serde_json::Value = serde_json::from_str(&admin_get(admin, "/runtime").body).unwrap();
    assert_eq!(rt["entries"]["feature.x"]["final_value"], "true");

    assert_eq!(
        admin_get(admin, "/healthcheck/fail").status,
        405,
        "mutations need POST"
    );
    assert_eq!(admin_post(admin, "/healthcheck/fail").status, 200);
    assert_eq!(admin_get(admin, "/ready").status, 503);
    assert_eq!(stat(admin, "server.live"), Some(0));
    admin_post(admin, "/healthcheck/ok");
    assert_eq!(admin_get(admin, "/ready").status, 200);
    assert_eq!(admin_post(admin, "/logging?level=debug").status, 200);
    assert_eq!(admin_post(admin, "/logging?level=nonsense").status, 400);
    assert_eq!(admin_get(admin, "/nope").status, 404);

    assert_eq!(admin_post(admin, "/quitquitquit").status, 200);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if let Some(status) = l.child.try_wait().unwrap() {
            assert!(status.success());
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "legate did not exit after /quitquitquit"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_listeners_stops_accepting_and_reports_draining() {
    let rc = routes(json!([{"match": {"prefix": "/"}, "direct_response": {"status": 200}}]));
    let (_l, url, admin) = start(hcm(rc, json!({})), vec![]);
    assert_eq!(curl(&format!("{url}/"), &[]).status, 200);
    assert_eq!(admin_post(admin, "/drain_listeners?graceful").status, 200);
    assert_eq!(admin_get(admin, "/ready").status, 503);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::net::TcpStream::connect(url.trim_start_matches("http://")).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the drained listener still accepts connections"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
