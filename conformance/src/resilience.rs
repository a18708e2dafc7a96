//! The http tier's cluster resilience cases, compared by counts (never by
//! wall-clock): the same requests through Envoy and Legate, and the same
//! outcomes and outlier detection stats.

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
