//! h2load (nghttp2) through Envoy and Legate: many concurrent requests on
//! a few connections, multiplexed over h2c and pipelined-free over
//! HTTP/1.1, to a real echo upstream. What the load generator counts
//! (requests done and succeeded, status classes) must be the same for both.

use crate::proxies::{self, Binaries, Kind};
use crate::report::{Outcome, Report};
use anyhow::{Context, Result};
use std::path::Path;
use std::process::Command;

/// (succeeded, failed, errored, status classes "2xx 3xx 4xx 5xx").
pub fn parse(out: &str) -> Option<(u64, u64, u64, String)> {
    let num = |line: &str, what: &str| -> Option<u64> {
        line.split(',')
            .find(|p| p.trim().ends_with(what))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let req = out.lines().find(|l| l.starts_with("requests:"))?;
    let codes = out.lines().find(|l| l.starts_with("status codes:"))?;
    Some((
        num(req, "succeeded")?,
        num(req, "failed")?,
        num(req, "errored")?,
        codes.trim_start_matches("status codes:").trim().to_string(),
    ))
}

const MODES: &[(&str, &[&str])] = &[
    ("h2c-multiplexed", &["-n", "2000", "-c", "4", "-m", "16"]),
    ("http1", &["--h1", "-n", "2000", "-c", "8"]),
];

pub async fn run(bins: &Binaries, work: &Path, report: &mut Report) -> Result<()> {
    let up = legate_tests::echo::start("h2load-up", "127.0.0.1:0".parse().unwrap()).await?;
    let crate::bootstrap::Written { path, port, admin } = crate::bootstrap::write_single(
        work,
        "h2load",
        "",
        "route: {cluster: up}",
        Some(("up", up.addr.port(), "")),
        |c| c,
    )?;
    let mut seen = Vec::new();
    for kind in [Kind::Envoy, Kind::Legate] {
        let _running = proxies::start(bins, kind, &path, admin, work)?;
        let mut per_mode = Vec::new();
        for (_, args) in MODES {
            let out = tokio::task::block_in_place(|| {
                Command::new("timeout")
                    .arg("120")
                    .arg("h2load")
                    .args(*args)
                    .arg(format!("http://127.0.0.1:{port}/load"))
                    .output()
            })
            .context("running h2load (nghttp2-client)")?;
            per_mode.push(parse(&String::from_utf8_lossy(&out.stdout)));
        }
        seen.push(per_mode);
    }
    for (i, (mode, _)) in MODES.iter().enumerate() {
        let (e, l) = (&seen[0][i], &seen[1][i]);
        let outcome = match (e, l) {
            (Some(e), _) if e.1 + e.2 > 0 => {
                Outcome::HarnessError(vec![format!("envoy itself failed requests: {e:?}")])
            }
            (Some(e), Some(l)) if e == l => Outcome::Match,
            _ => Outcome::Mismatch(vec![format!("envoy {e:?} / legate {l:?}")]),
        };
        report.add("http", "h2load", mode, outcome);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_h2loads_summary() {
        let out = "finished in 1.2s, 1600 req/s\nrequests: 2000 total, 2000 started, 2000 done, 1998 succeeded, 2 failed, 0 errored, 0 timeout\nstatus codes: 1998 2xx, 0 3xx, 0 4xx, 2 5xx\n";
        assert_eq!(
            super::parse(out),
            Some((1998, 2, 0, "1998 2xx, 0 3xx, 0 4xx, 2 5xx".into()))
        );
        assert_eq!(super::parse("nothing"), None);
    }
}
