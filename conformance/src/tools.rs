//! Small helpers the tiers share: the Go toolchain, go-control-plane's
//! module directory, and listing scenario files.

use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// go-control-plane's version under test (its `/envoy` module is v1.40.0).
pub const GCP_VERSION: &str = "v0.14.0";

/// `go`, found also where it is installed but not on PATH, resolving
/// modules through the module proxy.
pub fn go() -> Command {
    let mut c = Command::new("go");
    c.env(
        "PATH",
        format!(
            "{}:/usr/local/go/bin",
            std::env::var("PATH").unwrap_or_default()
        ),
    );
    c.env("GOFLAGS", "-mod=mod");
    c
}

/// Runs `cmd`; an error naming `what` with its stderr when it fails.
pub fn output_ok(cmd: &mut Command, what: &str) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    ensure!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

/// The go-control-plane module's directory in the Go module cache
/// (downloaded if missing); it holds `sample/` and the driver sources.
pub fn gcp_module_dir() -> Result<PathBuf> {
    let out = output_ok(
        go().args([
            "mod",
            "download",
            "-json",
            &format!("github.com/envoyproxy/go-control-plane@{GCP_VERSION}"),
        ]),
        "go mod download",
    )?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("go mod download output")?;
    Ok(PathBuf::from(v["Dir"].as_str().unwrap_or_default()))
}

/// The `.yaml` files of `dir`, sorted.
pub fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    Ok(files)
}
