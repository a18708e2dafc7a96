//! `legate-conformance [TIER...]`: runs each scenario against the real Envoy
//! 1.40 and against Legate with identical inputs, and reports differences.
//! Tiers: routing, validate, corpus, http, l4, xds, xds-wire. Closing line: `N passed, N failed`.

mod bootstrap;
mod compare;
mod corpus;
mod corpus_traffic;
mod dns;
mod framing;
mod gaps;
mod grpc;
mod h2load;
mod h2spec;
mod header_case;
mod istio;
mod istio_agent;
mod istio_mesh;
mod l4;
mod oauth2;
mod otel_log;
mod pki;
mod proxies;
mod ratelimit;
mod raw;
mod report;
mod resilience;
mod routing;
mod slow_start;
mod tools;
mod udp;
mod validate;
mod xds;
mod xds_wire;
mod zipkin;

use anyhow::{Context, Result};
use report::{Outcome, Report};
use std::path::PathBuf;

const ALL_TIERS: &[&str] = &[
    "routing",
    "validate",
    "corpus",
    "http",
    "ratelimit",
    "l4",
    "xds",
    "xds-wire",
    "istio",
];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bins = proxies::Binaries {
        envoy: std::env::var("ENVOY")
            .map(PathBuf::from)
            .context("ENVOY must name the Envoy 1.40 binary (conformance/run sets it)")?,
        legate: std::env::var("LEGATE")
            .map(PathBuf::from)
            .context("LEGATE must name the legate binary")?,
    };
    let mut tiers: Vec<String> = std::env::args().skip(1).collect();
    if tiers.is_empty() {
        tiers = ALL_TIERS.iter().map(|s| s.to_string()).collect();
    }
    let work = root.join("../target/conformance/work");
    std::fs::create_dir_all(&work)?;
    // A fresh PKI each run (its certificates expire).
    let _ = std::fs::remove_dir_all(work.join("pki"));
    println!("tolerated differences (not compared):");
    for (what, why) in compare::TOLERATED_RESPONSE_HEADERS.iter().chain(
        [
            ("connection: keep-alive vs none", compare::KEEP_ALIVE_REASON),
            (
                "UUID values",
                "request ids are random; compared as <uuid> (or <uuid traced=X> with the tracing reason Envoy packs into them)",
            ),
            (
                "trace and span ids",
                "random by design; traceparent, B3 and Datadog ids are compared by shape (flags and sampling kept)",
            ),
            (
                "content-length of an echo's answer",
                "the echo's body is the request it saw, compared field by field; its length moves with random ids",
            ),
            (
                "x-ratelimit-remaining in corpus traffic",
                "Envoy's local rate limit refills continuously (100 tokens/s is one per 10 ms): counts within 3 are the same answer",
            ),
            (
                "upstream x-envoy-expected-rq-timeout-ms",
                compare::EXPECTED_TIMEOUT_REASON,
            ),
            ("x-ratelimit-reset", compare::RATELIMIT_RESET_REASON),
            ("OAuth2 sign-in values", compare::OAUTH2_REASON),
            ("stateful session cookie expiry", compare::SESSION_REASON),
        ]
        .iter(),
    ) {
        println!("  {what}: {why}");
    }
    let mut report = Report::default();
    let mut corpus_tally = None;
    for tier in &tiers {
        match tier.as_str() {
            "routing" => {
                let files = tools::yaml_files(&root.join("scenarios/routing"))?;
                // CONFORMANCE_SCENARIOS=prefix[,prefix...] runs only the
                // scenarios whose file names start with one (when working
                // on a few).
                let only = std::env::var("CONFORMANCE_SCENARIOS").unwrap_or_default();
                for f in files.into_iter().filter(|f| {
                    f.file_name().is_some_and(|n| {
                        let n = n.to_string_lossy();
                        only.split(',').any(|p| n.starts_with(p))
                    })
                }) {
                    if let Err(e) = routing::run_file(&bins, &f, &work, &mut report).await {
                        report.add(
                            "routing",
                            &f.file_stem().unwrap().to_string_lossy(),
                            "*",
                            Outcome::Mismatch(vec![format!("{e:#}")]),
                        );
                    }
                }
            }
            "validate" => {
                validate::run(&bins, &root.join("scenarios/validate"), &work, &mut report)?
            }
            "ratelimit" => ratelimit::run(&bins, &root, &work, &mut report).await?,
            // The http tier's DNS cluster part alone (part of `http`).
            "dns" => dns::run(&bins, &work, &mut report).await?,
            // The http tier's OpenTelemetry access log part alone.
            "otel-log" => otel_log::run(&bins, &work, &mut report).await?,
            // The http tier's header-name case part alone.
            "header-case" => header_case::run(&bins, &work, &mut report).await?,
            // The http tier's Zipkin span part alone.
            "zipkin" => zipkin::run(&bins, &work, &mut report).await?,
            // The http tier's OAuth2 sign-in part alone.
            "oauth2" => oauth2::run(&bins, &work, &mut report).await?,
            // The http tier's slow start part alone.
            "slow-start" => slow_start::run(&bins, &work, &mut report).await?,
            // The http tier's connection-age part alone.
            "keepalive" => {
                resilience::keepalive_after_local_reply(&bins, &work, &mut report).await?
            }
            "per-host" => resilience::per_host_connections(&bins, &work, &mut report).await?,
            "h2-keepalive" => resilience::h2_keepalive(&bins, &work, &mut report).await?,
            "max-duration" => {
                resilience::max_connection_duration(&bins, &work, &mut report).await?;
                resilience::downstream_max_connection_duration(&bins, &work, &mut report).await?;
            }
            // The http tier's gRPC interop part alone (part of `http`).
            "grpc" => tokio::task::block_in_place(|| grpc::run(&bins, &root, &work, &mut report))?,
            "http" => {
                framing::run(&bins, &work, &mut report).await?;
                resilience::run(&bins, &work, &mut report).await?;
                resilience::max_connection_duration(&bins, &work, &mut report).await?;
                resilience::downstream_max_connection_duration(&bins, &work, &mut report).await?;
                resilience::keepalive_after_local_reply(&bins, &work, &mut report).await?;
                resilience::per_host_connections(&bins, &work, &mut report).await?;
                resilience::h2_keepalive(&bins, &work, &mut report).await?;
                dns::run(&bins, &work, &mut report).await?;
                header_case::run(&bins, &work, &mut report).await?;
                otel_log::run(&bins, &work, &mut report).await?;
                zipkin::run(&bins, &work, &mut report).await?;
                oauth2::run(&bins, &work, &mut report).await?;
                slow_start::run(&bins, &work, &mut report).await?;
                if let Err(e) = h2load::run(&bins, &work, &mut report).await {
                    report.add(
                        "http",
                        "h2load",
                        "*",
                        Outcome::HarnessError(vec![format!("{e:#}")]),
                    );
                }
                if let Err(e) =
                    tokio::task::block_in_place(|| grpc::run(&bins, &root, &work, &mut report))
                {
                    report.add(
                        "http",
                        "grpc-interop",
                        "*",
                        Outcome::HarnessError(vec![format!("{e:#}")]),
                    );
                }
                if let Err(e) =
                    tokio::task::block_in_place(|| h2spec::run(&bins, &root, &work, &mut report))
                {
                    report.add(
                        "http",
                        "h2spec",
                        "*",
                        Outcome::HarnessError(vec![format!("{e:#}")]),
                    );
                }
            }
            "corpus" => corpus_tally = Some(corpus::run(&bins, &root, &work, &mut report)?),
            "xds-wire" => xds_wire::run(&bins, &work, &mut report).await?,
            "istio" => {
                let isolated = || istio::run_isolated(&bins, &root, &work, &mut report);
                if let Err(e) = tokio::task::block_in_place(isolated) {
                    report.add(
                        "istio",
                        "istiod",
                        "*",
                        Outcome::HarnessError(vec![format!("{e:#}")]),
                    );
                }
            }
            "l4" => {
                if let Err(e) = tokio::task::block_in_place(|| l4::run(&bins, &work, &mut report)) {
                    report.add(
                        "l4",
                        "tcp_proxy",
                        "*",
                        Outcome::HarnessError(vec![format!("{e:#}")]),
                    );
                }
            }
            "xds" => {
                if let Err(e) = xds::run(&bins, &root, &work, &mut report) {
                    report.add(
                        "xds",
                        "go-control-plane",
                        "*",
                        Outcome::Mismatch(vec![format!("{e:#}")]),
                    );
                }
            }
            other => anyhow::bail!("unknown tier '{other}' (tiers: {})", ALL_TIERS.join(", ")),
        }
    }
    let c = report.print();
    if tiers.len() == ALL_TIERS.len() {
        let corpus = corpus_tally.map(|t| t.markdown()).unwrap_or_default();
        write_compatibility_section(
            &root.join("../docs/compatibility.md"),
            &format!("{}{corpus}", report.markdown()),
        )?;
    }
    println!("{} known gaps reported as NOT YET SUPPORTED above (listed with reasons in conformance/src/gaps.rs)", c.gaps);
    println!("conformance: {} passed, {} failed", c.passed, c.failed);
    if c.failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// Replaces the conformance section of docs/compatibility.md (after the
/// marker), leaving the generated field tables before it untouched.
fn write_compatibility_section(path: &std::path::Path, section: &str) -> Result<()> {
    const MARK: &str = "<!-- conformance results -->";
    let doc = std::fs::read_to_string(path).unwrap_or_default();
    let head = doc.split(MARK).next().unwrap_or("");
    std::fs::write(path, format!("{head}{MARK}\n{section}"))?;
    Ok(())
}
