//! DNS clusters against a real DNS server (legate-tests' `dns`), given to
//! both proxies as the c-ares resolver: a name moves from one upstream's
//! address to another's; the cluster with `respect_dns_ttl` follows within
//! the answer's 1 s TTL, the one without waits for its 60 s refresh. By
//! counts of which upstream answered, never by wall-clock assertions.

use crate::proxies::{self, Binaries, Kind};
use crate::report::{Outcome, Report};
use anyhow::Result;
use std::time::Duration;

fn bootstrap(admin: u16, port: u16, dns: u16, upstream_port: u16) -> String {
    let cluster = |name: &str, respect: bool| {
        format!(
            r#"  - name: {name}
    connect_timeout: 1s
    cluster_type:
      name: envoy.cluster.dns
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.clusters.dns.v3.DnsCluster
        respect_dns_ttl: {respect}
        dns_refresh_rate: 60s
        dns_min_refresh_rate: 1s
        dns_lookup_family: V4_ONLY
        typed_dns_resolver_config:
          name: envoy.network.dns_resolver.cares
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig
            resolvers: [{{socket_address: {{address: 127.0.0.1, port_value: {dns}}}}}]
    load_assignment:
      cluster_name: {name}
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: svc.test, port_value: {upstream_port}}}}}}}}}]}}]
"#
        )
    };
    format!(
        r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
static_resources:
  listeners:
  - name: l
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: hcm
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: dns
          route_config:
            virtual_hosts: [{{name: v, domains: ["*"], routes: [{{match: {{prefix: "/ttl"}}, route: {{cluster: ttl}}}}, {{match: {{prefix: "/"}}, route: {{cluster: fixed}}}}]}}]
          http_filters: [{{name: r, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]
  clusters:
{}{}"#,
        cluster("ttl", true),
        cluster("fixed", false)
    )
}

fn served_by(port: u16, path: &str) -> String {
    legate_tests::legate::try_curl(&format!("http://127.0.0.1:{port}{path}"), &[])
        .map(|r| {
            r.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("x-echo-server"))
                .map_or_else(|| format!("status {}", r.status), |(_, v)| v.clone())
        })
        .unwrap_or_else(|e| format!("error: {e}"))
}

pub async fn run(bins: &Binaries, work: &std::path::Path, report: &mut Report) -> Result<()> {
    // Two upstreams on one port, at 127.0.0.1 and 127.0.0.2.
    let a = legate_tests::echo::start("a", "127.0.0.1:0".parse().unwrap()).await?;
    let port = a.addr.port();
    let b = legate_tests::echo::start("b", format!("127.0.0.2:{port}").parse().unwrap()).await?;
    let mut seen = Vec::new();
    for kind in [Kind::Envoy, Kind::Legate] {
        let dns = legate_tests::dns::start("127.0.0.1".parse().unwrap(), 1).await?;
        let (lport, admin) = (
            legate_tests::legate::free_port(),
            legate_tests::legate::free_port(),
        );
        let cfg = work.join("dns-ttl.yaml");
        std::fs::write(&cfg, bootstrap(admin, lport, dns.addr.port(), port))?;
        let _running = proxies::start(bins, kind, &cfg, admin, work)?;
        let mut row = Vec::new();
        tokio::task::block_in_place(|| {
            row.push(format!("ttl before: {}", served_by(lport, "/ttl")));
            row.push(format!("fixed before: {}", served_by(lport, "/fixed")));
        });
        dns.set("127.0.0.2".parse().unwrap(), 1);
        // Two TTLs and a margin: the TTL cluster has re-resolved, the
        // fixed one (60 s) has not.
        tokio::time::sleep(Duration::from_millis(3500)).await;
        tokio::task::block_in_place(|| {
            row.push(format!("ttl after: {}", served_by(lport, "/ttl")));
            row.push(format!("fixed after: {}", served_by(lport, "/fixed")));
        });
        seen.push(row);
    }
    drop((a, b));
    let want = [
        "ttl before: a",
        "fixed before: a",
        "ttl after: b",
        "fixed after: a",
    ];
    let outcome = if seen[0] != want {
        Outcome::HarnessError(vec![format!("envoy saw {:?}, expected {want:?}", seen[0])])
    } else if seen[0] == seen[1] {
        Outcome::Match
    } else {
        Outcome::Mismatch(vec![format!("envoy {:?} / legate {:?}", seen[0], seen[1])])
    };
    report.add(
        "http",
        "dns-cluster",
        "respect-dns-ttl-follows-the-answer",
        outcome,
    );
    Ok(())
}
