//! The real `legate` binary, real echo upstreams and real curl: routing,
//! rewrites, local replies and header handling.

mod common;
use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_http1_and_h2c_with_envoy_headers() {
    let up = upstream("a").await;
    let (_l, url, _) = start(
        hcm(
            routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "a"}}])),
            json!({}),
        ),
        vec![cluster("a", &[up.addr], json!({}))],
    );
    let r = curl(&format!("{url}/x?y=1"), &["-H", "x-custom: v"]);
    assert_eq!(r.status, 200);
    let e = r.echo();
    assert_eq!(e["path"], "/x?y=1");
    assert_eq!(e["headers"]["x-custom"], "v");
    assert_eq!(e["headers"]["x-forwarded-proto"], "http");
    assert_eq!(e["headers"]["x-envoy-expected-rq-timeout-ms"], "15000");
    assert_eq!(e["headers"]["x-request-id"].as_str().unwrap().len(), 36);
    assert_eq!(r.header("server"), Some("envoy"));
    assert!(r.header("x-envoy-upstream-service-time").is_some());

    let r2 = curl(
        &format!("{url}/h2"),
        &["--http2-prior-knowledge", "-d", "hello"],
    );
    assert_eq!(r2.status, 200);
    let e2 = r2.echo();
    assert_eq!(e2["method"], "POST");
    assert_eq!(e2["body"], "hello");
    assert_eq!(e2["headers"]["host"], url.trim_start_matches("http://"));

    // Chunked request bodies are re-framed and delivered whole.
    let r3 = curl(
        &format!("{url}/c"),
        &["-H", "Transfer-Encoding: chunked", "-d", "chunky-body"],
    );
    assert_eq!(r3.echo()["body"], "chunky-body");
    // HTTP/2 downstream → HTTP/1 chunked upstream (pingora #935 path).
    let r4 = curl(
        &format!("{url}/c2"),
        &[
            "--http2-prior-knowledge",
            "-H",
            "content-length:",
            "--data-binary",
            "@/etc/hostname",
        ],
    );
    assert_eq!(r4.status, 200);
    assert_eq!(
        r4.echo()["body"],
        std::fs::read_to_string("/etc/hostname").unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_hosts_and_route_matchers() {
    let dr = |body: &str| json!({"status": 200, "body": {"inline_string": body}});
    let rc = json!({"name": "rc", "virtual_hosts": [
        {"name": "exact", "domains": ["api.example.com"], "routes": [{"match": {"prefix": "/"}, "direct_response": dr("exact")}]},
        {"name": "wild", "domains": ["*.example.com"], "routes": [{"match": {"prefix": "/"}, "direct_response": dr("suffix")}]},
        {"name": "pre", "domains": ["api.*"], "routes": [{"match": {"prefix": "/"}, "direct_response": dr("prefix")}]},
        {"name": "any", "domains": ["*"], "routes": [
            {"match": {"path": "/exact"}, "direct_response": dr("path")},
            {"match": {"safe_regex": {"regex": "/items/[0-9]+"}}, "direct_response": dr("regex")},
            {"match": {"path_separated_prefix": "/sep"}, "direct_response": dr("sep")},
            {"match": {"prefix": "/CASE", "case_sensitive": false}, "direct_response": dr("case")},
            {"match": {"prefix": "/hdr", "headers": [{"name": "x-ver", "string_match": {"prefix": "v2"}}]}, "direct_response": dr("hdr-v2")},
            {"match": {"prefix": "/hdr", "headers": [{"name": "x-ver", "present_match": true, "invert_match": true}]}, "direct_response": dr("hdr-none")},
            {"match": {"prefix": "/q", "query_parameters": [{"name": "debug", "present_match": true}]}, "direct_response": dr("query")},
            {"match": {"prefix": "/svc", "grpc": {}}, "direct_response": dr("grpc")},
            {"match": {"prefix": "/rt", "runtime_fraction": {"default_value": {"numerator": 0}, "runtime_key": "routing.rt"}}, "direct_response": dr("runtime")},
            {"match": {"path_match_policy": {"name": "envoy.path.match.uri_template.uri_template_matcher", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig", "path_template": "/users/{id}/posts/{rest=**}"}}},
             "direct_response": dr("template")},
        ]},
    ]});
    let (port, admin) = (free_port(), free_port());
    let mut boot: serde_json::Value = serde_json::from_str(&bootstrap(
        admin,
        vec![listener("l", port, hcm(rc, json!({})))],
        vec![],
    ))
    .unwrap();
    boot["layered_runtime"] =
        json!({"layers": [{"name": "static", "static_layer": {"routing": {"rt": 100}}}]});
    let _l = Legate::start(BIN, &boot.to_string(), &[port], Some(admin));
    let url = format!("http://127.0.0.1:{port}");
    let get = |path: &str, args: &[&str]| {
        let r = curl(&format!("{url}{path}"), args);
        if r.status == 404 {
            "404".to_string()
        } else {
            r.body
        }
    };
    assert_eq!(get("/", &["-H", "host: api.example.com"]), "exact");
    assert_eq!(get("/", &["-H", "host: www.example.com"]), "suffix");
    assert_eq!(get("/", &["-H", "host: api.other.net"]), "prefix");
    assert_eq!(get("/exact", &[]), "path");
    assert_eq!(get("/exact/more", &[]), "404");
    assert_eq!(get("/items/42", &[]), "regex");
    assert_eq!(get("/items/4x", &[]), "404");
    assert_eq!(get("/sep/a", &[]), "sep");
    assert_eq!(get("/separate", &[]), "404");
    assert_eq!(get("/case/x", &[]), "case");
    assert_eq!(get("/hdr", &["-H", "x-ver: v2.1"]), "hdr-v2");
    assert_eq!(get("/hdr", &[]), "hdr-none");
    assert_eq!(get("/hdr", &["-H", "x-ver: v1"]), "404");
    assert_eq!(get("/q?debug", &[]), "query");
    assert_eq!(get("/q?x=1", &[]), "404");
    // A gRPC request gets Envoy's gRPC form of the direct response.
    let g = curl(
        &format!("{url}/svc"),
        &["-H", "content-type: application/grpc"],
    );
    assert_eq!(
        (g.status, g.header("grpc-status"), g.header("grpc-message")),
        (200, Some("2"), Some("grpc"))
    );
    assert_eq!(get("/svc", &[]), "404");
    assert_eq!(
        get("/rt", &[]),
        "runtime",
        "the static runtime layer turns the 0% default into 100%"
    );
    assert_eq!(get("/users/7/posts/a/b", &[]), "template");
    assert_eq!(get("/users/7/comments", &[]), "404");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_replies_redirects_and_direct_responses() {
    let body_file = legate_tests::legate::write_config("from a file\n");
    let up = upstream("a").await;
    let rc = routes(json!([
        {"match": {"prefix": "/inline"}, "direct_response": {"status": 418, "body": {"inline_string": "teapot"}},
         "response_headers_to_add": [{"header": {"key": "x-route", "value": "direct"}}]},
        {"match": {"prefix": "/file"}, "direct_response": {"status": 200, "body": {"filename": body_file.0.to_str().unwrap()}}},
        {"match": {"prefix": "/empty"}, "direct_response": {"status": 204}},
        {"match": {"prefix": "/https"}, "redirect": {"https_redirect": true}},
        {"match": {"prefix": "/moved"}, "redirect": {"path_redirect": "/new", "response_code": "PERMANENT_REDIRECT"}},
        {"match": {"prefix": "/old/"}, "redirect": {"prefix_rewrite": "/fresh/", "host_redirect": "other.example", "strip_query": true}},
        {"match": {"prefix": "/nocluster"}, "route": {"cluster_header": "x-cluster"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "a"}},
    ]));
    let (_l, url, _) = start(
        hcm(rc, json!({})),
        vec![cluster("a", &[up.addr], json!({}))],
    );
    let r = curl(&format!("{url}/inline"), &[]);
    assert_eq!(
        (r.status, r.body.as_str(), r.header("x-route")),
        (418, "teapot", Some("direct"))
    );
    assert_eq!(r.header("content-type"), Some("text/plain"));
    let r = curl(&format!("{url}/file"), &[]);
    assert_eq!((r.status, r.body.as_str()), (200, "from a file\n"));
    assert_eq!(curl(&format!("{url}/empty"), &[]).status, 204);
    let host = url.trim_start_matches("http://");
    let r = curl(&format!("{url}/https/a?b=1"), &[]);
    assert_eq!(r.status, 301);
    // Envoy keeps a non-default port when only the scheme changes.
    assert_eq!(
        r.header("location").unwrap(),
        format!("https://{host}/https/a?b=1")
    );
    let r = curl(&format!("{url}/moved?k=v"), &[]);
    assert_eq!(
        (r.status, r.header("location").unwrap()),
        (308, format!("http://{host}/new?k=v").as_str())
    );
    let r = curl(&format!("{url}/old/page?k=v"), &[]);
    assert_eq!(
        r.header("location"),
        Some("http://other.example/fresh/page")
    );
    // cluster_header naming no cluster: Envoy's 503.
    assert_eq!(
        curl(&format!("{url}/nocluster"), &["-H", "x-cluster: nope"]).status,
        503
    );
    assert_eq!(
        curl(&format!("{url}/nocluster"), &["-H", "x-cluster: a"]).status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_is_404_and_unknown_host_too() {
    let rc = json!({"name": "rc", "virtual_hosts": [{"name": "v", "domains": ["known.example"], "routes": [
        {"match": {"prefix": "/only"}, "direct_response": {"status": 200}}]}]});
    let (_l, url, admin) = start(hcm(rc, json!({})), vec![]);
    let r = curl(&format!("{url}/only"), &["-H", "host: unknown.example"]);
    assert_eq!((r.status, r.body.as_str()), (404, ""));
    assert_eq!(
        curl(&format!("{url}/other"), &["-H", "host: known.example"]).status,
        404
    );
    assert_eq!(
        curl(&format!("{url}/only"), &["-H", "host: known.example"]).status,
        200
    );
    assert_eq!(stat(admin, "http.ingress.no_route"), Some(2));
    assert_eq!(stat(admin, "http.ingress.downstream_rq_4xx"), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_and_host_rewrites() {
    let up = upstream("a").await;
    let rc = routes(json!([
        {"match": {"prefix": "/api/v1/"}, "route": {"cluster": "a", "prefix_rewrite": "/v1/"}},
        {"match": {"prefix": "/re/"}, "route": {"cluster": "a", "regex_rewrite": {"pattern": {"regex": "^/re/([a-z]+)/(\\d+)$"}, "substitution": "/\\2/\\1"}}},
        {"match": {"prefix": "/lit"}, "route": {"cluster": "a", "host_rewrite_literal": "rewritten.example"}},
        {"match": {"prefix": "/fromhdr"}, "route": {"cluster": "a", "host_rewrite_header": "x-host"}},
        {"match": {"prefix": "/auto"}, "route": {"cluster": "dns", "auto_host_rewrite": true}},
    ]));
    let dns = json!({"name": "dns", "type": "STRICT_DNS", "connect_timeout": "1s", "dns_lookup_family": "V4_ONLY",
        "load_assignment": {"cluster_name": "dns", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": addr("localhost", up.addr.port())}}]}]}});
    let (_l, url, _) = start(
        hcm(rc, json!({})),
        vec![cluster("a", &[up.addr], json!({})), dns],
    );
    let e = curl(&format!("{url}/api/v1/users?x=1"), &[]).echo();
    assert_eq!(e["path"], "/v1/users?x=1");
    assert_eq!(e["headers"]["x-envoy-original-path"], "/api/v1/users?x=1");
    assert_eq!(
        curl(&format!("{url}/re/abc/123"), &[]).echo()["path"],
        "/123/abc"
    );
    assert_eq!(
        curl(&format!("{url}/lit"), &[]).echo()["headers"]["host"],
        "rewritten.example"
    );
    assert_eq!(
        curl(&format!("{url}/fromhdr"), &["-H", "x-host: h.example"]).echo()["headers"]["host"],
        "h.example"
    );
    // STRICT_DNS resolved `localhost` offline; auto_host_rewrite uses its name.
    assert_eq!(
        curl(&format!("{url}/auto"), &[]).echo()["headers"]["host"],
        "localhost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_mutations_at_every_level() {
    let up = upstream("a").await;
    let hv = |k: &str, v: &str, action: &str| json!({"header": {"key": k, "value": v}, "append_action": action});
    let rc = json!({
        "name": "rc",
        "request_headers_to_add": [hv("x-level", "global", "APPEND_IF_EXISTS_OR_ADD")],
        "response_headers_to_add": [hv("x-resp", "global", "OVERWRITE_IF_EXISTS_OR_ADD")],
        "virtual_hosts": [{
            "name": "v", "domains": ["*"],
            "request_headers_to_add": [hv("x-level", "vhost", "APPEND_IF_EXISTS_OR_ADD")],
            "routes": [{
                "match": {"prefix": "/"},
                "route": {"cluster": "a"},
                "request_headers_to_add": [
                    hv("x-level", "route", "APPEND_IF_EXISTS_OR_ADD"),
                    hv("x-client", "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", "OVERWRITE_IF_EXISTS_OR_ADD"),
                    hv("x-copy", "%REQ(x-src)%!", "OVERWRITE_IF_EXISTS_OR_ADD"),
                    hv("x-keep", "new", "ADD_IF_ABSENT"),
                    hv("x-only-if", "set", "OVERWRITE_IF_EXISTS"),
                ],
                "request_headers_to_remove": ["x-drop"],
                "response_headers_to_add": [hv("x-resp", "route", "OVERWRITE_IF_EXISTS_OR_ADD")],
                "response_headers_to_remove": ["x-echo-server"],
            }],
        }],
    });
    let (_l, url, _) = start(
        hcm(rc, json!({})),
        vec![cluster("a", &[up.addr], json!({}))],
    );
    let r = curl(
        &format!("{url}/"),
        &["-H", "x-src: s", "-H", "x-keep: old", "-H", "x-drop: 1"],
    );
    let h = &r.echo()["headers"];
    // Most specific first, so the global value is added last.
    assert_eq!(h["x-level"], "route,vhost,global");
    assert_eq!(h["x-client"], "127.0.0.1");
    assert_eq!(h["x-copy"], "s!");
    assert_eq!(h["x-keep"], "old");
    assert!(h.get("x-only-if").is_none());
    assert!(h.get("x-drop").is_none());
    assert_eq!(
        r.header("x-resp"),
        Some("global"),
        "less specific levels win by default"
    );
    assert_eq!(r.header("x-echo-server"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_with_use_remote_address() {
    let up = upstream("a").await;
    let rc = routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "a"}}]));
    let (_l, url, _) = start(
        hcm(rc, json!({"use_remote_address": true})),
        vec![cluster("a", &[up.addr], json!({}))],
    );
    let h = curl(
        &format!("{url}/"),
        &[
            "-H",
            "x-forwarded-for: 203.0.113.9",
            "-H",
            "x-request-id: keep-me",
        ],
    )
    .echo()["headers"]
        .clone();
    // Envoy appends its own local address for a loopback peer.
    let local = legate::server::request::local_ip();
    assert_eq!(h["x-forwarded-for"], format!("203.0.113.9,{local}"));
    assert_eq!(h["x-forwarded-proto"], "http");
    // No client is internal by Envoy 1.40's default: an edge request gets a
    // fresh id and the external address, never x-envoy-internal.
    assert_ne!(h["x-request-id"], "keep-me");
    assert_eq!(h["x-envoy-external-address"], "127.0.0.1");
    let h = curl(
        &format!("{url}/"),
        &[
            "-H",
            "x-envoy-internal: true",
            "-H",
            "x-envoy-retry-on: 5xx",
        ],
    )
    .echo()["headers"]
        .clone();
    assert!(h.get("x-envoy-internal").is_none());
    assert!(
        h.get("x-envoy-retry-on").is_none(),
        "client control headers are stripped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_underscored_headers() {
    let up = upstream("a").await;
    let rc = routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "a"}}]));
    let extra = json!({"common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST"}});
    let (_l, url, _) = start(hcm(rc, extra), vec![cluster("a", &[up.addr], json!({}))]);
    let big = format!("x-big: {}", "a".repeat(61 * 1024));
    assert_eq!(curl(&format!("{url}/"), &["-H", &big]).status, 431);
    let mut many = Vec::new();
    for i in 0..101 {
        many.push("-H".to_string());
        many.push(format!("x-h{i}: v"));
    }
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_eq!(curl(&format!("{url}/"), &many).status, 431);
    assert_eq!(curl(&format!("{url}/"), &["-H", "x_under: 1"]).status, 400);
    assert_eq!(curl(&format!("{url}/"), &["-H", "x-fine: 1"]).status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_normalization() {
    let up = upstream("a").await;
    let rc = routes(json!([
        {"match": {"prefix": "/admin"}, "direct_response": {"status": 403}},
        {"match": {"prefix": "/"}, "route": {"cluster": "a"}},
    ]));
    let (_l, url, _) = start(
        hcm(
            rc,
            json!({"normalize_path": true, "merge_slashes": true, "path_with_escaped_slashes_action": "REJECT_REQUEST"}),
        ),
        vec![cluster("a", &[up.addr], json!({}))],
    );
    assert_eq!(
        curl(&format!("{url}/public/../admin"), &["--path-as-is"]).status,
        403
    );
    assert_eq!(
        curl(&format!("{url}//admin"), &["--path-as-is"]).status,
        403
    );
    assert_eq!(
        curl(&format!("{url}/a/%2Fadmin"), &["--path-as-is"]).status,
        400
    );
    assert_eq!(
        curl(&format!("{url}/a//b/./c?q=/../"), &["--path-as-is"]).echo()["path"],
        "/a/b/c?q=/../"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_http1_requests_are_answered_in_order() {
    use std::io::{Read, Write};
    let rc = routes(
        json!([{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}]),
    );
    let (_l, url, _) = start(hcm(rc, json!({})), vec![]);
    let mut s = std::net::TcpStream::connect(url.trim_start_matches("http://")).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    s.write_all(b"GET /1 HTTP/1.1\r\nhost: a\r\n\r\nGET /2 HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert_eq!(out.matches("HTTP/1.1 200").count(), 2, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_follow_upgrade_configs() {
    use std::io::{Read, Write};
    let up = upstream("ws").await;
    let rc = routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "a"}}]));
    let (_l1, allowed, _) = start(
        hcm(
            rc.clone(),
            json!({"upgrade_configs": [{"upgrade_type": "websocket"}]}),
        ),
        vec![cluster("a", &[up.addr], json!({}))],
    );
    let (_l2, refused, _) = start(
        hcm(rc, json!({})),
        vec![cluster("a", &[up.addr], json!({}))],
    );
    let handshake = b"GET /ws HTTP/1.1\r\nhost: a\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n";
    let open = |url: &str| {
        let mut s = std::net::TcpStream::connect(url.trim_start_matches("http://")).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        s.write_all(handshake).unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && s.read(&mut b).unwrap_or(0) == 1 {
            head.push(b[0]);
        }
        (s, String::from_utf8_lossy(&head).to_string())
    };
    let (mut s, head) = open(&allowed);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    s.write_all(b"frames both ways").unwrap();
    let mut got = [0u8; 16];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"frames both ways");
    let (_, head) = open(&refused);
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_header_cannot_strip_what_legate_adds() {
    let up = upstream("a").await;
    let rc = routes(
        json!([{"match": {"prefix": "/"}, "route": {"cluster": "a", "host_rewrite_literal": "rewritten.example"},
        "request_headers_to_add": [{"header": {"key": "x-added", "value": "by-route"}}]}]),
    );
    let (_l, url, _) = start(
        hcm(rc, json!({})),
        vec![cluster("a", &[up.addr], json!({}))],
    );
    // Naming a header the proxy relies on is refused, as Envoy refuses it.
    assert_eq!(
        curl(&format!("{url}/"), &["-H", "connection: host"]).status,
        400
    );
    assert_eq!(
        curl(&format!("{url}/"), &["-H", "connection: x-forwarded-proto"]).status,
        400
    );
    let h = curl(
        &format!("{url}/"),
        &[
            "-H",
            "connection: x-added, x-request-id, x-hop",
            "-H",
            "x-hop: 1",
            "-H",
            "x-request-id: client",
        ],
    )
    .echo()["headers"]
        .clone();
    assert_eq!(h["host"], "rewritten.example");
    assert_eq!(h["x-added"], "by-route");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_ne!(
        h["x-request-id"], "client",
        "a nominated request id is dropped, then generated"
    );
    assert!(
        h.get("x-hop").is_none(),
        "a client header named in Connection is hop-by-hop"
    );
}
