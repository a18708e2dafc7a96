//! grpc-go's interop server and client (built from the Go module proxy in
//! the scratch module the xds tier uses), with the proxy in between over
//! h2c: Envoy first, then Legate.

use crate::proxies::{self, Binaries, Kind};
use crate::report::{Outcome, Report};
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const CASES: &[&str] = &[
    "empty_unary",
    "large_unary",
    "client_streaming",
    "server_streaming",
    "ping_pong",
    "empty_stream",
    "timeout_on_sleeping_server",
    "cancel_after_begin",
    "cancel_after_first_response",
    "status_code_and_message",
    "special_status_message",
    "custom_metadata",
    "unimplemented_method",
    "unimplemented_service",
];

fn build(dir: &Path, name: &str, pkg: &str) -> Result<PathBuf> {
    let bin = dir.join("bin").join(name);
    if bin.exists() {
        return Ok(bin);
    }
    crate::tools::output_ok(
        crate::tools::go()
            .args(["build", "-o", &format!("bin/{name}"), pkg])
            .current_dir(dir),
        &format!("building {pkg}"),
    )?;
    Ok(bin)
}

pub fn run(bins: &Binaries, root: &Path, work: &Path, report: &mut Report) -> Result<()> {
    // The scratch module (and its go.mod) comes from the xds tier's driver build.
    let dir = root.join("../target/conformance/gcp");
    crate::xds::ensure_module(&dir)?;
    let server = build(
        &dir,
        "interop-server",
        "google.golang.org/grpc/interop/server",
    )?;
    let client = build(
        &dir,
        "interop-client",
        "google.golang.org/grpc/interop/client",
    )?;
    let backend = legate_tests::legate::free_port();
    let mut srv = Command::new(&server)
        .args(["-port", &backend.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let crate::bootstrap::Written { path, port, admin } = crate::bootstrap::write_single(
        work,
        "grpc-interop",
        "",
        "route: {cluster: interop, timeout: 0s}",
        Some(("interop", backend, "typed_extension_protocol_options: {envoy.extensions.upstreams.http.v3.HttpProtocolOptions: {\"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions, explicit_http_config: {http2_protocol_options: {}}}}")),
        // Istio's grpc_stats filter, counting every method by name.
        |c| c.replace("http_filters: [", GRPC_STATS),
    )?;
    let mut results = Vec::new();
    let mut stats = Vec::new();
    let mut retried = Vec::new();
    for kind in [Kind::Envoy, Kind::Legate] {
        let _running = proxies::start(bins, kind, &path, admin, work)?;
        let run_case = |case: &str| -> Result<(bool, String)> {
            let out = Command::new("timeout")
                .args(["30"])
                .arg(&client)
                .args([
                    "-server_host",
                    "127.0.0.1",
                    "-server_port",
                    &port.to_string(),
                    "-test_case",
                    case,
                ])
                .output()?;
            let tail = String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
                .to_string();
            Ok((out.status.success(), tail))
        };
        let mut r = Vec::new();
        let mut deltas = Vec::new();
        for case in CASES {
            let before = grpc_stats(admin);
            // Some cases race deadlines on a busy 2-core machine (Envoy
            // itself then fails timeout_on_sleeping_server): a failure is
            // tried twice more, for both proxies alike, before it counts.
            let mut result = run_case(case)?;
            let mut tries = 1;
            for _ in 0..2 {
                if result.0 {
                    break;
                }
                result = run_case(case)?;
                tries += 1;
            }
            retried.push(tries > 1);
            r.push(result);
            deltas.push(delta(&before, &grpc_stats(admin)));
        }
        results.push(r);
        stats.push(deltas);
    }
    let _ = srv.kill();
    let _ = srv.wait();
    for (i, case) in CASES.iter().enumerate() {
        let ((e_ok, e_msg), (l_ok, l_msg)) = (&results[0][i], &results[1][i]);
        let outcome = match (e_ok, l_ok) {
            (true, true) => Outcome::Match,
            (true, false) => {
                Outcome::Mismatch(vec![format!("envoy passes, legate fails: {l_msg}")])
            }
            (false, _) => {
                Outcome::HarnessError(vec![format!("envoy fails the interop case: {e_msg}")])
            }
        };
        report.add("http", "grpc-interop", case, outcome);
    }
    // The grpc_stats counters each case added, when both proxies ran it
    // once (a retried case counts twice); after the cases, so that each
    // scenario's rows stay together in the report.
    for (i, case) in CASES.iter().enumerate() {
        let n = CASES.len();
        if retried[i] || retried[n + i] || RACING.contains(case) {
            eprintln!(
                "grpc-interop-stats/{case}: retried or racing a deadline, counters not compared"
            );
            continue;
        }
        let (e, l) = (&stats[0][i], &stats[1][i]);
        let outcome = if e == l {
            Outcome::Match
        } else {
            Outcome::Mismatch(vec![format!("grpc_stats: envoy {e:?} / legate {l:?}")])
        };
        report.add("http", "grpc-interop-stats", case, outcome);
    }
    Ok(())
}

/// Cases whose message counts depend on when the client's cancellation or
/// deadline lands (whether the first message was read before the reset):
/// Envoy's own counts vary between runs.
const RACING: &[&str] = &[
    "timeout_on_sleeping_server",
    "cancel_after_begin",
    "cancel_after_first_response",
];

const GRPC_STATS: &str = r#"http_filters: [{name: envoy.filters.http.grpc_stats, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig, emit_filter_state: true, stats_for_all_methods: true}}, "#;

/// The cluster's grpc_stats counters, by name.
fn grpc_stats(admin: u16) -> std::collections::BTreeMap<String, u64> {
    let url = format!("http://127.0.0.1:{admin}/stats?filter=^cluster\\.interop\\.grpc\\.");
    legate_tests::legate::try_curl(&url, &["-g"])
        .map(|r| {
            r.body
                .lines()
                .filter_map(|l| {
                    let (k, v) = l.split_once(": ")?;
                    Some((k.to_string(), v.trim().parse().ok()?))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// What grew between two snapshots.
fn delta(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> Vec<String> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v.saturating_sub(before.get(k).copied().unwrap_or(0));
            (d > 0).then(|| format!("{k} +{d}"))
        })
        .collect()
}
