//! Route matching cost at 10, 1 000 and 10 000 routes: the first route, a
//! route in the middle, the last one, and a miss (every route is tried, as in
//! Envoy's linear route table).

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use legate::config::route::RouteConfig;
use legate::routing::{find_route, find_virtual_host, RequestView};
use legate::runtime::Runtime;
use legate_proto::envoy_types::pb::envoy::config::route::v3::RouteConfiguration;

fn config(n: usize) -> RouteConfig {
    let routes: Vec<serde_json::Value> = (0..n)
        .map(|i| serde_json::json!({"match": {"prefix": format!("/service-{i}/"), "headers": [{"name": "x-tenant", "present_match": true}]}, "route": {"cluster": format!("c{i}")}}))
        .collect();
    let v = serde_json::json!({"name": "bench", "virtual_hosts": [
        {"name": "other", "domains": ["other.example"], "routes": []},
        {"name": "main", "domains": ["*.example.com", "example.com"], "routes": routes},
    ]});
    let pb: RouteConfiguration =
        legate_proto::json::to_message(v, "envoy.config.route.v3.RouteConfiguration", true)
            .unwrap();
    RouteConfig::from_proto(&pb, "bench").unwrap()
}

fn bench(c: &mut Criterion) {
    let rt = Runtime::default();
    let mut headers = http::HeaderMap::new();
    headers.insert("x-tenant", "t1".parse().unwrap());
    let mut g = c.benchmark_group("route_match");
    for n in [10usize, 1_000, 10_000] {
        let rc = config(n);
        for (label, path) in [
            ("first", "/service-0/x".to_string()),
            ("middle", format!("/service-{}/x", n / 2)),
            ("last", format!("/service-{}/x", n - 1)),
            ("miss", "/nope".to_string()),
        ] {
            g.bench_with_input(BenchmarkId::new(label, n), &path, |b, path| {
                b.iter(|| {
                    let vh = find_virtual_host(&rc, black_box("api.example.com")).unwrap();
                    let view = RequestView {
                        path,
                        headers: &headers,
                        random: 0,
                        runtime: &rt,
                        pseudo: Default::default(),
                    };
                    black_box(find_route(vh, &view).is_some())
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
