//! The validate tier: `--mode validate` must accept and reject exactly what
//! Envoy does, over our corpus and go-control-plane's sample bootstraps.

use crate::proxies::{self, Binaries, Kind};
use crate::report::{Outcome, Report};
use anyhow::Result;
use std::path::{Path, PathBuf};

/// Validates `run` (the case `file` with its placeholders filled) with both.
fn check(
    bins: &Binaries,
    tier_case: &str,
    file: &Path,
    run: &Path,
    report: &mut Report,
) -> Result<()> {
    let (e_ok, e_out) = proxies::validate(bins, Kind::Envoy, run)?;
    let (l_ok, l_out) = proxies::validate(bins, Kind::Legate, run)?;
    let outcome = if e_ok == l_ok {
        Outcome::Match
    } else {
        let first = |s: &str| {
            s.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .chars()
                .take(300)
                .collect::<String>()
        };
        Outcome::Mismatch(vec![format!(
            "envoy {} / legate {}: envoy said {:?}; legate said {:?}",
            if e_ok { "accepts" } else { "rejects" },
            if l_ok { "accepts" } else { "rejects" },
            first(&e_out),
            first(&l_out)
        )])
    };
    report.add(
        "validate",
        tier_case,
        &file.file_name().unwrap().to_string_lossy(),
        outcome,
    );
    Ok(())
}

/// go-control-plane's `sample/` bootstraps, from the Go module cache.
pub fn go_control_plane_samples() -> Result<Vec<PathBuf>> {
    crate::tools::yaml_files(&crate::tools::gcp_module_dir()?.join("sample"))
}

pub fn run(bins: &Binaries, corpus: &Path, work: &Path, report: &mut Report) -> Result<()> {
    let files = crate::tools::yaml_files(corpus)?;
    for f in files {
        // Cases with certificates name the run's PKI as `{{PKI}}`.
        let text = std::fs::read_to_string(&f)?;
        if text.contains("{{PKI}}") {
            let pki = crate::pki::ensure(work)?;
            let out = work.join(format!(
                "validate-{}",
                f.file_name().unwrap().to_string_lossy()
            ));
            std::fs::write(&out, text.replace("{{PKI}}", &pki.display().to_string()))?;
            check(bins, "corpus", &f, &out, report)?;
        } else {
            check(bins, "corpus", &f, &f, report)?;
        }
    }
    match go_control_plane_samples() {
        Ok(samples) => {
            for f in samples {
                check(bins, "go-control-plane-sample", &f, &f, report)?;
            }
        }
        Err(e) => report.add(
            "validate",
            "go-control-plane-sample",
            "*",
            Outcome::Mismatch(vec![format!("could not read the samples: {e:#}")]),
        ),
    }
    Ok(())
}
