//! The http tier's cluster resilience cases, compared by counts (never by
//! wall-clock): the same requests through Envoy and Legate, and the same
//! outcomes, outlier detection stats and upstream connection counts.

use crate::proxies::{self, Binaries, Kind};
use crate::report::{Outcome, Report};
use anyhow::Result;

/// A stat from the admin page, or "absent".
pub fn stat(admin: u16, name: &str) -> String {
    let url = format!(
        "http://127.0.0.1:{admin}/stats?filter=^{}$",
        name.replace('.', "\\.")
    );
    legate_tests::legate::try_curl(&url, &["-g"])
        .ok()
        .and_then(|r| {
            r.body
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_string))
        })
        .unwrap_or_else(|| "absent".into())
}

/// A host refusing every connection beside a healthy one, round robin,
/// outlier detection on: 30 requests fail exactly five times (the refusing
/// host's five consecutive 503s eject it), whichever host the balancer
/// starts on.
pub async fn run(bins: &Binaries, work: &std::path::Path, report: &mut Report) -> Result<()> {
    let up = legate_tests::echo::start("a", "127.0.0.1:0".parse().unwrap()).await?;
    let dead = legate_tests::legate::free_port();
    let crate::bootstrap::Written { path, port, admin } = crate::bootstrap::write_single(
        work,
        "outlier",
        "",
        "route: {cluster: od}",
        Some((
            "od",
            up.addr.port(),
            "outlier_detection: {max_ejection_percent: 100, interval: 30s, base_ejection_time: 30s}",
        )),
        |c| {
            c.replace(
                "lb_endpoints: [{endpoint:",
                &format!("lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {dead}}}}}}}}}, {{endpoint:"),
            )
        },
    )?;
    let stats = [
        "cluster.od.outlier_detection.ejections_active",
        "cluster.od.outlier_detection.ejections_enforced_consecutive_5xx",
        "cluster.od.outlier_detection.ejections_detected_consecutive_5xx",
        "cluster.od.outlier_detection.ejections_detected_consecutive_gateway_failure",
        "cluster.od.outlier_detection.ejections_enforced_consecutive_gateway_failure",
    ];
    let mut seen = Vec::new();
    for kind in [Kind::Envoy, Kind::Legate] {
        let _r = proxies::start(bins, kind, &path, admin, work)?;
        let failed = tokio::task::block_in_place(|| {
            (0..30)
                .filter(|_| {
                    legate_tests::legate::try_curl(&format!("http://127.0.0.1:{port}/"), &[])
                        .map_or(true, |r| r.status != 200)
                })
                .count()
        });
        let mut got = vec![format!("{failed} of 30 failed")];
        got.extend(stats.iter().map(|s| format!("{s}: {}", stat(admin, s))));
        seen.push(got);
    }
    report.add(
        "http",
        "outlier-detection",
        "refusing-host-ejected-after-five",
        Outcome::compare(&seen[0].join("; "), &seen[1].join("; ")),
    );
    Ok(())
}

/// `max_connection_duration: 2s`: two requests back to back share one
/// upstream connection; one made after the limit gets a new connection,
/// also when the connection never idled (a request every half second, so
/// an idle timeout alone would keep it).
pub async fn max_connection_duration(
    bins: &Binaries,
    work: &std::path::Path,
    report: &mut Report,
) -> Result<()> {
    let up = legate_tests::echo::start("a", "127.0.0.1:0".parse().unwrap()).await?;
    let crate::bootstrap::Written { path, port, admin } = crate::bootstrap::write_single(
        work,
        "maxdur",
        "",
        "route: {cluster: md}",
        Some((
            "md",
            up.addr.port(),
            r#"typed_extension_protocol_options: {envoy.extensions.upstreams.http.v3.HttpProtocolOptions: {"@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions, common_http_protocol_options: {max_connection_duration: 2s}, explicit_http_config: {http_protocol_options: {}}}}"#,
        )),
        |c| c,
    )?;
    let mut seen = Vec::new();
    for kind in [Kind::Envoy, Kind::Legate] {
        let _r = proxies::start(bins, kind, &path, admin, work)?;
        let url = format!("http://127.0.0.1:{port}/");
        let get = || legate_tests::legate::try_curl(&url, &[]).map_or(0, |r| r.status);
        let mut got = Vec::new();
        tokio::task::block_in_place(|| {
            got.push(format!("first {}", get()));
            got.push(format!("second {}", get()));
        });
        got.push(format!(
            "after two: {}",
            stat(admin, "cluster.md.upstream_cx_total")
        ));
        let mut codes = Vec::new();
        for _ in 0..6 {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            codes.push(tokio::task::block_in_place(get));
        }
        got.push(format!("busy for 3 s: {codes:?}"));
        got.push(format!(
            "after them: {}",
            stat(admin, "cluster.md.upstream_cx_total")
        ));
        seen.push(got);
    }
    report.add(
        "http",
        "max-connection-duration",
        "new-connection-after-the-limit",
        Outcome::compare(&seen[0].join("; "), &seen[1].join("; ")),
    );
    Ok(())
}
