//! h2spec (v2.2.1, from the Go module proxy) against an h2c listener of
//! Envoy and of Legate, then against a TLS listener offering h2 by ALPN
//! (`h2spec-tls`). A case Legate fails where Envoy passes is run again alone
//! against both before it counts as a difference, because some cases depend
//! on timing (Envoy's own results vary between runs).

use crate::proxies::{self, Binaries, Kind};
use crate::report::{Outcome, Report};
use anyhow::{ensure, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const H2SPEC: &str = "github.com/summerwind/h2spec/cmd/h2spec@v2.2.1+incompatible";

fn install(dir: &Path) -> Result<PathBuf> {
    let bin = dir.join("h2spec");
    if bin.exists() {
        return Ok(bin);
    }
    std::fs::create_dir_all(dir)?;
    crate::tools::output_ok(
        crate::tools::go()
            .args(["install", H2SPEC])
            .env("GOBIN", dir),
        "installing h2spec",
    )?;
    Ok(bin)
}

/// Test id (`http2/3.5/2`) → passed, from h2spec's text report.
pub fn parse(report: &str) -> BTreeMap<String, bool> {
    let mut out = BTreeMap::new();
    let (mut spec, mut section) = (String::new(), String::new());
    for line in report.lines() {
        // Each test line is redrawn after a carriage return; keep the last.
        let line = line.rsplit('\r').next().unwrap_or(line);
        if line.starts_with("Failures:") {
            break;
        }
        let t = line.trim();
        if !line.starts_with(' ') && !t.is_empty() {
            spec = if t.starts_with("Generic") {
                "generic".into()
            } else if t.starts_with("HPACK") {
                "hpack".into()
            } else {
                "http2".into()
            };
            continue;
        }
        let (mark, rest) = match t.chars().next() {
            Some('✔') => (Some(true), &t['✔'.len_utf8()..]),
            Some('×') => (Some(false), &t['×'.len_utf8()..]),
            _ => (None, t),
        };
        match mark {
            Some(passed) => {
                if let Some((n, _)) = rest.trim().split_once(':') {
                    out.insert(format!("{spec}/{section}/{}", n.trim()), passed);
                }
            }
            None => {
                // A section heading: "3.5. HTTP/2 Connection Preface".
                if let Some((num, _)) = t.split_once(' ') {
                    if num.ends_with('.')
                        && num
                            .trim_end_matches('.')
                            .split('.')
                            .all(|p| p.chars().all(|c| c.is_ascii_digit()) && !p.is_empty())
                    {
                        section = num.trim_end_matches('.').to_string();
                    }
                }
            }
        }
    }
    out
}

fn run_h2spec(
    h2spec: &Path,
    port: u16,
    tls: bool,
    only: Option<&str>,
) -> Result<BTreeMap<String, bool>> {
    let mut c = Command::new("timeout");
    c.args(["300"]).arg(h2spec).args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-P",
        "/",
        "-o",
        "2",
    ]);
    if tls {
        // TLS with ALPN h2; the certificate is the run's own test PKI.
        c.args(["-t", "-k"]);
    }
    if let Some(id) = only {
        c.arg(id);
    }
    let out = c.output()?;
    Ok(parse(&String::from_utf8_lossy(&out.stdout)))
}

pub fn run(bins: &Binaries, root: &Path, work: &Path, report: &mut Report) -> Result<()> {
    let h2spec = install(&root.join("../target/conformance/h2spec"))?;
    run_one(bins, &h2spec, work, report, false)?;
    run_one(bins, &h2spec, work, report, true)
}

fn run_one(
    bins: &Binaries,
    h2spec: &Path,
    work: &Path,
    report: &mut Report,
    tls: bool,
) -> Result<()> {
    let name = if tls { "h2spec-tls" } else { "h2spec" };
    let pki = if tls {
        Some(crate::pki::ensure(work)?)
    } else {
        None
    };
    let crate::bootstrap::Written { path, port, admin } = crate::bootstrap::write_single(
        work,
        name,
        "",
        "direct_response: {status: 200, body: {inline_string: ok}}",
        None,
        |cfg| match &pki {
            None => cfg,
            Some(pki) => {
                let p = pki.display();
                cfg.replacen(
                    "    - filters:\n",
                    &format!(
                        "    - transport_socket: {{name: tls, typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext, common_tls_context: {{alpn_protocols: [h2], tls_certificates: [{{certificate_chain: {{filename: \"{p}/server.pem\"}}, private_key: {{filename: \"{p}/server.key\"}}}}]}}}}}}\n      filters:\n"
                    ),
                    1,
                )
            }
        },
    )?;
    let mut results = Vec::new();
    for kind in [Kind::Envoy, Kind::Legate] {
        let _running = proxies::start(bins, kind, &path, admin, work)?;
        results.push(run_h2spec(h2spec, port, tls, None)?);
    }
    let (envoy, legate) = (&results[0], &results[1]);
    ensure!(
        !envoy.is_empty() && !legate.is_empty(),
        "h2spec produced no results"
    );
    for (id, e_pass) in envoy {
        let l_pass = legate.get(id).copied().unwrap_or(false);
        let outcome = if l_pass || !e_pass {
            Outcome::Match
        } else {
            // Confirm alone, against both, before calling it a difference.
            let again = |kind| -> Result<bool> {
                let _r = proxies::start(bins, kind, &path, admin, work)?;
                Ok(run_h2spec(h2spec, port, tls, Some(id))?
                    .get(id)
                    .copied()
                    .unwrap_or(false))
            };
            let (e2, l2) = (again(Kind::Envoy)?, again(Kind::Legate)?);
            if l2 || !e2 {
                Outcome::Match
            } else {
                Outcome::Mismatch(vec![format!("{name} {id}: envoy passes, legate fails")])
            }
        };
        report.add("http", name, id, outcome);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_h2specs_text_report() {
        let text = "Hypertext Transfer Protocol Version 2 (HTTP/2)\n  3. Starting HTTP/2\n    3.5. HTTP/2 Connection Preface\n        1: Sends client connection preface\r      \u{2714} 1: Sends client connection preface\n      \u{00d7} 2: Sends invalid connection preface\n\nHPACK: Header Compression for HTTP/2\n  2. Compression Process Overview\n    2.3. Indexing Tables\n      2.3.3. Index Address Space\n        \u{2714} 1: Sends a indexed header field representation with invalid index\n\nFailures: \n  \u{00d7} 2: ignored\n";
        let r = super::parse(text);
        assert_eq!(r.get("http2/3.5/1"), Some(&true));
        assert_eq!(r.get("http2/3.5/2"), Some(&false));
        assert_eq!(r.get("hpack/2.3.3/1"), Some(&true));
        assert_eq!(r.len(), 3);
    }
}
