//! The xds tier: go-control-plane v0.14.0's own integration driver
//! (`pkg/test/main`) in each of its modes, first against Envoy (which proves
//! the driver and this harness), then against Legate. Each run happens in a
//! network namespace of its own (`unshare -rn`), so the driver's fixed ports
//! never collide with anything.

use crate::proxies::{self, Binaries, Kind};
use crate::report::{Outcome, Report};
use crate::tools::{go, output_ok, GCP_VERSION};
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::process::Command;

const GCP_ENVOY_VERSION: &str = "v1.40.0";
const MESSAGE: &str = "Hi, there!\n";

/// (mode name, --xds value, extra driver flags), as the Makefile's targets.
pub const MODES: &[(&str, &str, &[&str])] = &[
    ("ads", "ads", &[]),
    ("xds", "xds", &[]),
    ("rest", "rest", &[]),
    ("delta", "delta", &[]),
    ("delta-ads", "delta-ads", &[]),
    ("mux", "xds", &["-mux"]),
    // Each request batch opens new TLS connections under the driver's
    // 100 ms client timeout; more batches per update (10, not 5) leave a
    // loaded machine more chances at the one all-successful batch an
    // update needs.
    ("tls", "ads", &["-tls", "-r", "10"]),
];

/// The scratch Go module under target/ that pins go-control-plane (and so
/// grpc-go) at the versions under test.
pub fn ensure_module(dir: &Path) -> Result<()> {
    if dir.join("go.sum").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    if !dir.join("go.mod").exists() {
        output_ok(
            go().args(["mod", "init", "gcp-peer"]).current_dir(dir),
            "go mod init",
        )?;
    }
    output_ok(
        go().args([
            "get",
            &format!("github.com/envoyproxy/go-control-plane@{GCP_VERSION}"),
            &format!("github.com/envoyproxy/go-control-plane/envoy@{GCP_ENVOY_VERSION}"),
            &format!("github.com/envoyproxy/go-control-plane/pkg/test/main@{GCP_VERSION}"),
        ])
        .current_dir(dir),
        "go get",
    )?;
    Ok(())
}

/// Builds the driver in the scratch module (`go install` refuses modules
/// with replace directives).
fn build_driver(dir: &Path) -> Result<PathBuf> {
    let bin = dir.join("bin/test");
    if bin.exists() {
        return Ok(bin);
    }
    ensure_module(dir)?;
    output_ok(
        go().args([
            "build",
            "-o",
            "bin/test",
            "github.com/envoyproxy/go-control-plane/pkg/test/main",
        ])
        .current_dir(dir),
        "building the driver",
    )?;
    Ok(bin)
}

/// Runs one mode against one proxy; Ok(log tail) when the driver passed.
#[allow(clippy::too_many_arguments)] // a scenario runner's inputs, each needed
fn run_mode(
    bins: &Binaries,
    kind: Kind,
    driver: &Path,
    echo: &Path,
    bootstrap: &Path,
    xds: &str,
    extra: &[&str],
    work: &Path,
) -> Result<std::result::Result<(), String>> {
    let runtimes = if xds == "ads" { "2" } else { "1" };
    let log = work.join(format!("xds-{}-{xds}{}.log", kind.name(), extra.join("")));
    let script = r#"
set -u
ip link set lo up
"$ECHO" --listen 127.0.0.1:18080 --name upstream --message "$MESSAGE" 2>/dev/null &
UP=$!
"$PROXY" -c "$BOOTSTRAP" --drain-time-s 1 -l debug --disable-hot-restart --concurrency 1 2>"$PROXY_LOG" &
PX=$!
timeout 150 "$DRIVER" --xds="$XDS" --runtimes="$RUNTIMES" -debug -message="$MESSAGE" "$@"
rc=$?
kill $PX $UP 2>/dev/null
wait 2>/dev/null
exit $rc
"#;
    let out = Command::new("unshare")
        .args(["-rn", "bash", "-c", script, "xds-run"])
        .args(extra)
        .env("ECHO", echo)
        .env("PROXY", bins.path(kind))
        .env("BOOTSTRAP", bootstrap)
        .env("PROXY_LOG", &log)
        .env("DRIVER", driver)
        .env("XDS", xds)
        .env("RUNTIMES", runtimes)
        .env("MESSAGE", MESSAGE)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && text.contains("passed!") {
        Ok(Ok(()))
    } else {
        let tail: Vec<&str> = text.lines().rev().take(3).collect();
        Ok(Err(format!(
            "driver exit {:?}: {}",
            out.status.code(),
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )))
    }
}

pub fn run(bins: &Binaries, root: &Path, work: &Path, report: &mut Report) -> Result<()> {
    let driver = build_driver(&root.join("../target/conformance/gcp"))?;
    let samples = crate::tools::gcp_module_dir()?.join("sample");
    let echo = bins.legate.with_file_name("echo-upstream");
    for (mode, xds, extra) in MODES {
        let bootstrap = samples.join(format!("bootstrap-{xds}.yaml"));
        let envoy = run_mode(
            bins,
            Kind::Envoy,
            &driver,
            &echo,
            &bootstrap,
            xds,
            extra,
            work,
        )?;
        let outcome = match envoy {
            Err(e) => Outcome::HarnessError(vec![format!("envoy failed its own driver run: {e}")]),
            Ok(()) => {
                // A bootstrap Legate rejects cannot pass: say why without
                // waiting for the driver's timeout.
                let (ok, why) = proxies::validate(bins, Kind::Legate, &bootstrap)?;
                if !ok {
                    Outcome::Mismatch(vec![format!(
                        "legate rejects the bootstrap: {}",
                        why.lines().last().unwrap_or("")
                    )])
                } else {
                    match run_mode(
                        bins,
                        Kind::Legate,
                        &driver,
                        &echo,
                        &bootstrap,
                        xds,
                        extra,
                        work,
                    )? {
                        Ok(()) => Outcome::Match,
                        Err(e) => Outcome::Mismatch(vec![format!("legate failed the driver: {e}")]),
                    }
                }
            }
        };
        report.add("xds", "go-control-plane", mode, outcome);
    }
    Ok(())
}
