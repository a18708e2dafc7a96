//! The routing tier: scenario bootstraps with real echo upstreams, every
//! request sent with real curl through Envoy, then through Legate.

use crate::compare::{diff, Observation};
use crate::proxies::{self, Binaries, Kind};
use crate::report::{Outcome, Report};
use anyhow::{Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub description: String,
    #[serde(default)]
    pub upstreams: Vec<String>,
    pub bootstrap: String,
    pub requests: Vec<Request>,
    /// Echo upstreams behind TLS (certificate `upstream.test` from the
    /// scenario PKI, asking for client certificates from its CA).
    #[serde(default)]
    pub tls_upstreams: Vec<String>,
    /// The ALPN protocols a TLS upstream offers (none unless listed).
    #[serde(default)]
    pub tls_upstream_alpn: BTreeMap<String, Vec<String>>,
    /// The bootstrap names `{{ACCESS_LOG}}` as an access log path: the
    /// lines each proxy wrote are compared too (as request `access-log`).
    #[serde(default)]
    pub access_log: bool,
    /// Stats read from each proxy's admin page after the requests and
    /// compared (as request `stats`): a filter's counters, say.
    #[serde(default)]
    pub stats: Vec<String>,
    /// JWTs for the requests (`{{JWT_<name>}}` in a request's path or
    /// headers), signed at run time with keys made at run time
    /// (`legate_tests::jwt`). The bootstrap names their JWKS inline as
    /// `{{JWKS}}`, or the port of a real JWKS server as `{{JWKS_PORT}}`.
    #[serde(default)]
    pub jwt_tokens: BTreeMap<String, JwtToken>,
    /// Upstreams whose received requests are compared (as request
    /// `received-by-<name>`): mirror clusters, which the client never
    /// hears from.
    #[serde(default)]
    pub received_by: Vec<String>,
}

/// A token to sign: with key `key` (`rsa`, `ec256`, `ec384`, `ed`, `hs`),
/// `header` merged over the default header, and `claims`, where an `exp`,
/// `nbf` or `iat` written as a string (`"+3600"`, `"-120"`) is that many
/// seconds from now. `tamper` flips a bit of the signature.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtToken {
    pub key: String,
    #[serde(default)]
    pub header: serde_json::Value,
    pub claims: serde_json::Value,
    #[serde(default)]
    pub tamper: bool,
}

/// Signs the scenario's tokens and puts them into its requests; returns
/// the keys (for the JWKS placeholders), if the scenario has tokens.
fn sign_tokens(sc: &mut Scenario) -> Result<Option<legate_tests::jwt::Keys>> {
    if sc.jwt_tokens.is_empty() {
        return Ok(None);
    }
    let keys = legate_tests::jwt::Keys::generate()?;
    let now = legate_tests::jwt::now();
    let mut tokens = BTreeMap::new();
    for (name, t) in &sc.jwt_tokens {
        let mut claims = t.claims.clone();
        if let Some(m) = claims.as_object_mut() {
            for k in ["exp", "nbf", "iat"] {
                if let Some(rel) = m
                    .get(k)
                    .and_then(|v| v.as_str())
                    .and_then(|s| s.parse::<i64>().ok())
                {
                    m.insert(k.into(), (now + rel).into());
                }
            }
        }
        let mut token = keys.sign(&t.key, &t.header, &claims)?;
        if t.tamper {
            // The signature's first character changed: still base64url,
            // no longer the signature.
            let at = token.rfind('.').unwrap_or(0) + 1;
            let c = if token.as_bytes()[at] == b'A' {
                "B"
            } else {
                "A"
            };
            token.replace_range(at..at + 1, c);
        }
        tokens.insert(format!("{{{{JWT_{name}}}}}"), token);
    }
    for r in &mut sc.requests {
        for (k, v) in &tokens {
            r.path = r.path.replace(k, v);
            for h in r.headers.values_mut() {
                *h = h.replace(k, v);
            }
        }
    }
    Ok(Some(keys))
}

/// What one proxy showed for a scenario: an observation per request, and
/// its access log lines.
struct Seen {
    requests: Vec<Observation>,
    access_log: Vec<String>,
    stats: Vec<String>,
    /// What each `received_by` upstream was sent.
    received: Vec<Vec<serde_json::Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub name: String,
    #[serde(default)]
    pub method: Option<String>,
    pub path: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub http2: bool,
    #[serde(default)]
    pub expect: Option<Expect>,
    /// Send over TLS; the negotiated HTTP version is compared too.
    #[serde(default)]
    pub tls: Option<TlsRequest>,
    /// curl `--http1.0` (with `raw`, an `HTTP/1.0` request line).
    #[serde(default)]
    pub http1_0: bool,
    /// curl `--compressed`: the body is compared decoded (name the
    /// `accept-encoding` in `headers`, or curl sends its own).
    #[serde(default)]
    pub compressed: bool,
    /// With `raw`: no `host` header at all.
    #[serde(default)]
    pub omit_host: bool,
    /// Send HTTP/1.1 by hand over a plain socket instead of curl (for
    /// what curl cannot send: PROXY headers).
    #[serde(default)]
    pub raw: bool,
    /// A PROXY protocol header before the request (implies `raw`).
    #[serde(default)]
    pub proxy_protocol: Option<ProxyHeader>,
    /// Header lines sent verbatim after `headers`, repeats allowed, for
    /// framing no client library sends (implies `raw`).
    #[serde(default)]
    pub header_lines: Vec<String>,
    /// An admin endpoint POSTed to before the request
    /// (`/healthcheck/fail`).
    #[serde(default)]
    pub admin_post: Option<String>,
    /// Milliseconds to wait before sending (for work a proxy does after
    /// the previous response, such as a stream-done rate limit call).
    #[serde(default)]
    pub pause_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyHeader {
    /// 1 or 2.
    pub version: u8,
    /// The client it names; none: v1 `UNKNOWN`, v2 `LOCAL`.
    #[serde(default)]
    pub source: Option<String>,
    /// The destination it names; default: the listener's address.
    #[serde(default)]
    pub destination: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsRequest {
    /// The name dialled (SNI and host), resolved to 127.0.0.1.
    pub sni: String,
    /// A client certificate from the scenario PKI (`client-good`, ...).
    #[serde(default)]
    pub client_cert: Option<String>,
    /// Offer only HTTP/1.1 in ALPN.
    #[serde(default)]
    pub http1: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    pub status: Option<u16>,
    pub served_by: Option<String>,
}

/// Runs the scenario's requests through Envoy, then Legate; the error names
/// the proxy that did not start.
#[allow(clippy::too_many_arguments)] // a scenario runner's inputs, each needed
fn observe_both(
    bins: &Binaries,
    sc: &Scenario,
    cfg: &std::path::Path,
    port: u16,
    admin: u16,
    work: &std::path::Path,
    access_log: &Path,
    before_each: &(dyn Fn() + Sync),
    received_by: &[Received],
) -> std::result::Result<BTreeMap<Kind, Seen>, (Kind, String)> {
    let mut seen = BTreeMap::new();
    for kind in [Kind::Envoy, Kind::Legate] {
        let _ = std::fs::remove_file(access_log);
        for r in received_by {
            r.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
        before_each();
        let running =
            proxies::start(bins, kind, cfg, admin, work).map_err(|e| (kind, format!("{e:#}")))?;
        let requests: Vec<Observation> = tokio::task::block_in_place(|| {
            sc.requests
                .iter()
                .map(|r| {
                    if let Some(p) = &r.admin_post {
                        admin_post(admin, p);
                    }
                    if let Some(ms) = r.pause_ms {
                        std::thread::sleep(std::time::Duration::from_millis(ms));
                    }
                    send(port, r, work)
                })
                .collect()
        });
        if sc.access_log {
            // Envoy runs first: Legate's log is awaited until it has as many
            // lines as Envoy's had.
            let envoys = seen
                .get(&Kind::Envoy)
                .map_or(0, |s: &Seen| s.access_log.len());
            wait_for_log_lines(access_log, envoys);
        }
        let received = received_by.iter().map(settled).collect();
        let stats = sc
            .stats
            .iter()
            .map(|n| format!("{n}: {}", crate::resilience::stat(admin, n)))
            .collect();
        drop(running);
        let access_log = std::fs::read_to_string(access_log)
            .unwrap_or_default()
            .lines()
            .map(normalize_log_line)
            .collect();
        seen.insert(
            kind,
            Seen {
                requests,
                access_log,
                stats,
                received,
            },
        );
    }
    Ok(seen)
}

/// Both proxies flush access logs every 100 ms (proxies::start): waits
/// 500 ms, then until the log has `at_least` lines (or 5 s pass), then
/// until it has not grown for 300 ms, so a late line is read on a loaded
/// machine too.
fn wait_for_log_lines(path: &Path, at_least: usize) {
    use std::time::{Duration, Instant};
    let count = || {
        std::fs::read_to_string(path)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    std::thread::sleep(Duration::from_millis(500));
    while count() < at_least && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut last = count();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = count();
        if now == last {
            break;
        }
        last = now;
    }
}

/// What an upstream records of the requests it answers.
type Received = std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>;

/// An upstream's requests once no more have come for 300 ms (mirrors are
/// sent in the background), sorted (they arrive in any order), without
/// what differs between runs by nature (request ids, ports).
fn settled(r: &Received) -> Vec<serde_json::Value> {
    let len = || r.lock().unwrap_or_else(|e| e.into_inner()).len();
    let mut last = len();
    for _ in 0..20 {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let now = len();
        if now == last {
            break;
        }
        last = now;
    }
    let mut v: Vec<serde_json::Value> = r
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .cloned()
        .map(|mut j| {
            if let Some(h) = j.get_mut("headers").and_then(|h| h.as_object_mut()) {
                h.remove("x-request-id");
            }
            j
        })
        .collect();
    v.sort_by_key(|j| j.to_string());
    v
}

/// START_TIME differs between runs by nature.
fn normalize_log_line(l: &str) -> String {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| regex::Regex::new(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z").unwrap())
        .replace_all(l, "<start-time>")
        .into_owned()
}

/// POSTs to an admin endpoint with curl; a failure shows in the requests
/// that follow.
fn admin_post(admin: u16, path: &str) {
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-X",
            "POST",
            &format!("http://127.0.0.1:{admin}{path}"),
        ])
        .output();
    if !out.is_ok_and(|o| o.status.success()) {
        eprintln!("admin POST {path} failed");
    }
}

fn b64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A stateful session cookie as Envoy writes it: base64 of a message with
/// the address (field 1) and the expiry in epoch seconds (field 2).
fn session_cookie(addr: &str, expires: u64) -> String {
    let mut m = vec![0x0a, addr.len() as u8];
    m.extend_from_slice(addr.as_bytes());
    m.push(0x10);
    let mut v = expires;
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            m.push(byte);
            break;
        }
        m.push(byte | 0x80);
    }
    b64(&m)
}

pub(crate) fn send(port: u16, r: &Request, work: &Path) -> Observation {
    try_send(port, r, work).unwrap_or_else(|e| panic!("curl failed: {e}"))
}

/// As [`send`]; a plain request whose connection failed is an error
/// (a failed TLS one is an observation: [`Observation::failed`]).
pub(crate) fn try_send(port: u16, r: &Request, work: &Path) -> Result<Observation, String> {
    if r.raw || r.proxy_protocol.is_some() || !r.header_lines.is_empty() {
        return Ok(crate::raw::http1(port, r));
    }
    let mut args: Vec<String> = vec!["--path-as-is".into()];
    let mut url = format!("http://127.0.0.1:{port}{}", r.path);
    if let Some(t) = &r.tls {
        let pki = work.join("pki");
        url = format!("https://{}:{port}{}", t.sni, r.path);
        args.extend([
            "--resolve".into(),
            format!("{}:{port}:127.0.0.1", t.sni),
            "--cacert".into(),
            pki.join("ca.pem").display().to_string(),
        ]);
        if let Some(c) = &t.client_cert {
            args.extend([
                "--cert".into(),
                pki.join(format!("{c}.pem")).display().to_string(),
                "--key".into(),
                pki.join(format!("{c}.key")).display().to_string(),
            ]);
        }
        if t.http1 {
            args.push("--http1.1".into());
        }
    }
    if let Some(m) = &r.method {
        args.extend(["-X".into(), m.clone()]);
    }
    if r.tls.is_none() && !r.headers.keys().any(|k| k.eq_ignore_ascii_case("host")) {
        args.extend(["-H".into(), "host: conformance.test".into()]);
    }
    for (k, v) in &r.headers {
        args.extend(["-H".into(), format!("{k}: {v}")]);
    }
    if let Some(b) = &r.body {
        args.extend(["--data-binary".into(), b.clone()]);
    }
    if r.http2 {
        args.push("--http2-prior-knowledge".into());
    }
    if r.http1_0 {
        args.push("--http1.0".into());
    }
    if r.compressed {
        args.push("--compressed".into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match legate_tests::legate::try_curl(&url, &args) {
        Ok(res) => {
            let mut o = Observation::from_curl(&res);
            if r.tls.is_some() {
                o.headers
                    .insert(":version".into(), vec![res.version.clone()]);
            }
            Ok(o)
        }
        Err(_) if r.tls.is_some() => Ok(Observation::failed()),
        Err(e) => Err(e.to_string()),
    }
}

fn check_expect(e: &Option<Expect>, o: &Observation) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(e) = e {
        if let Some(s) = e.status {
            if s != o.status {
                out.push(format!("expected status {s}, got {}", o.status));
            }
        }
        if let Some(s) = &e.served_by {
            if *s != o.served_by {
                out.push(format!("expected served_by {s}, got {}", o.served_by));
            }
        }
    }
    out
}

/// Runs one scenario file; appends one outcome per request.
pub async fn run_file(
    bins: &Binaries,
    file: &Path,
    work: &Path,
    report: &mut Report,
) -> Result<()> {
    run_file_with(bins, file, work, report, "routing", &[], &|| {}).await
}

/// As [`run_file`], reported under `tier`, with more `{{NAME}}`
/// placeholders, and `before_each` run before each proxy starts (to reset a
/// side service both proxies share).
pub async fn run_file_with(
    bins: &Binaries,
    file: &Path,
    work: &Path,
    report: &mut Report,
    tier: &str,
    vars: &[(&str, String)],
    before_each: &(dyn Fn() + Sync),
) -> Result<()> {
    let stem = file.file_stem().unwrap().to_string_lossy().to_string();
    let mut sc: Scenario = serde_yaml::from_str(&std::fs::read_to_string(file)?)
        .with_context(|| format!("parsing {}", file.display()))?;
    let _ = &sc.description;
    let mut ups = Vec::new();
    let mut text = sc.bootstrap.clone();
    for (name, value) in vars {
        text = text.replace(&format!("{{{{{name}}}}}"), value);
    }
    // Every scenario gets the same PKI (written to <work>/pki, `{{PKI}}`).
    let pki = crate::pki::ensure(work)?;
    text = text.replace("{{PKI}}", &pki.display().to_string());
    let upstream_tls = legate_tests::pki::server_config(
        &legate_tests::pki::Leaf::load(&pki, "upstream")?,
        &[],
        Some(&std::fs::read_to_string(pki.join("ca.pem"))?),
    );
    let upstream_leaf = legate_tests::pki::Leaf::load(&pki, "upstream")?;
    let ca_pem = std::fs::read_to_string(pki.join("ca.pem"))?;
    for name in &sc.tls_upstreams {
        let tls = match sc.tls_upstream_alpn.get(name) {
            Some(alpn) => {
                let alpn: Vec<&str> = alpn.iter().map(String::as_str).collect();
                legate_tests::pki::server_config(&upstream_leaf, &alpn, Some(&ca_pem))
            }
            None => upstream_tls.clone(),
        };
        let u = legate_tests::echo::start_tls(name, "127.0.0.1:0".parse().unwrap(), tls).await?;
        text = text.replace(
            &format!("{{{{UPSTREAM_{name}}}}}"),
            &u.addr.port().to_string(),
        );
        ups.push(u);
    }
    // Keys and a JWKS server for jwt_authn scenarios.
    let mut jwks_server = None;
    if let Some(keys) = sign_tokens(&mut sc)? {
        let jwks = keys.jwks();
        text = text.replace("{{JWKS}}", &jwks);
        if text.contains("{{JWKS_PORT}}") {
            let s = legate_tests::jwt::serve_jwks("127.0.0.1:0".parse().unwrap(), jwks).await?;
            text = text.replace("{{JWKS_PORT}}", &s.addr.port().to_string());
            jwks_server = Some(s);
        }
    }
    // Real external authorization servers, when the bootstrap names them.
    let mut authz = Vec::new();
    if text.contains("{{AUTHZ_GRPC}}") {
        let a = legate_tests::authz::start_grpc("127.0.0.1:0".parse().unwrap()).await?;
        text = text.replace("{{AUTHZ_GRPC}}", &a.addr.port().to_string());
        authz.push(a);
    }
    if text.contains("{{AUTHZ_HTTP}}") {
        let a = legate_tests::authz::start_http("127.0.0.1:0".parse().unwrap()).await?;
        text = text.replace("{{AUTHZ_HTTP}}", &a.addr.port().to_string());
        authz.push(a);
    }
    // A real external processor, when the bootstrap names one.
    let mut processor = None;
    if text.contains("{{EXT_PROC}}") {
        let p = legate_tests::ext_proc::start("127.0.0.1:0".parse().unwrap()).await?;
        text = text.replace("{{EXT_PROC}}", &p.addr.port().to_string());
        processor = Some(p);
    }
    for name in &sc.upstreams {
        let u = legate_tests::echo::start(name, "127.0.0.1:0".parse().unwrap()).await?;
        text = text.replace(
            &format!("{{{{UPSTREAM_{name}}}}}"),
            &u.addr.port().to_string(),
        );
        ups.push(u);
    }
    // Requests may name upstream ports too (an ORIGINAL_DST destination),
    // and stateful sessions naming an upstream (its address in base64 for
    // a header session; Envoy's cookie message, live or expired).
    let ports: Vec<(String, String)> = ups
        .iter()
        .flat_map(|u| {
            let addr = u.addr.to_string();
            [
                (
                    format!("{{{{SESSION_COOKIE_EXPIRED_{}}}}}", u.name),
                    session_cookie(&addr, 1),
                ),
                (
                    format!("{{{{SESSION_COOKIE_{}}}}}", u.name),
                    session_cookie(&addr, 4_102_444_800),
                ),
                (format!("{{{{SESSION_{}}}}}", u.name), b64(addr.as_bytes())),
                (
                    format!("{{{{UPSTREAM_{}}}}}", u.name),
                    u.addr.port().to_string(),
                ),
            ]
        })
        .collect();
    for r in &mut sc.requests {
        for (k, v) in &ports {
            r.path = r.path.replace(k, v);
            r.headers.values_mut().for_each(|h| *h = h.replace(k, v));
            r.header_lines.iter_mut().for_each(|h| *h = h.replace(k, v));
            if let Some(d) = r
                .proxy_protocol
                .as_mut()
                .and_then(|p| p.destination.as_mut())
            {
                *d = d.replace(k, v);
            }
        }
    }
    // Ports are picked free, then bound by the proxies a moment later; an
    // outgoing connection can take one in between. A start that fails with
    // "Address already in use" is retried on fresh ports.
    let mut attempts = 0;
    let seen = loop {
        attempts += 1;
        let (port, admin) = (
            legate_tests::legate::free_port(),
            legate_tests::legate::free_port(),
        );
        let access_log = work.join(format!("{stem}.access.log"));
        let text = text
            .replace("{{LISTENER}}", &port.to_string())
            .replace("{{ADMIN}}", &admin.to_string())
            .replace("{{ACCESS_LOG}}", &access_log.display().to_string());
        let cfg = work.join(format!("{stem}.yaml"));
        std::fs::write(&cfg, &text)?;
        let received: Vec<Received> = sc
            .received_by
            .iter()
            .filter_map(|n| ups.iter().find(|u| &u.name == n).map(|u| u.seen.clone()))
            .collect();
        match observe_both(
            bins,
            &sc,
            &cfg,
            port,
            admin,
            work,
            &access_log,
            before_each,
            &received,
        ) {
            Ok(seen) => break seen,
            Err((kind, e)) if attempts < 3 && e.contains("Address already in use") => {
                eprintln!(
                    "routing/{stem}: {} could not bind, retrying on new ports",
                    kind.name()
                );
            }
            Err((kind, e)) => {
                for r in &sc.requests {
                    report.add(
                        tier,
                        &stem,
                        &r.name,
                        Outcome::Mismatch(vec![format!("{} did not start: {e}", kind.name())]),
                    );
                }
                return Ok(());
            }
        }
    };
    let (envoy, legate) = (&seen[&Kind::Envoy].requests, &seen[&Kind::Legate].requests);
    if sc.access_log {
        let (e, l) = (
            &seen[&Kind::Envoy].access_log,
            &seen[&Kind::Legate].access_log,
        );
        let outcome = if e.is_empty() {
            Outcome::HarnessError(vec!["envoy wrote no access log lines".into()])
        } else if e == l {
            Outcome::Match
        } else {
            Outcome::Mismatch(vec![format!("access log: envoy {e:?} / legate {l:?}")])
        };
        report.add(tier, &stem, "access-log", outcome);
    }
    if !sc.stats.is_empty() {
        let (e, l) = (&seen[&Kind::Envoy].stats, &seen[&Kind::Legate].stats);
        let outcome = if e.iter().all(|s| s.ends_with(": absent")) {
            Outcome::HarnessError(vec![format!("envoy has none of the stats: {e:?}")])
        } else if e == l {
            Outcome::Match
        } else {
            Outcome::Mismatch(vec![format!("stats: envoy {e:?} / legate {l:?}")])
        };
        report.add(tier, &stem, "stats", outcome);
    }
    for (i, name) in sc.received_by.iter().enumerate() {
        let (e, l) = (
            &seen[&Kind::Envoy].received[i],
            &seen[&Kind::Legate].received[i],
        );
        let outcome = if e.is_empty() {
            Outcome::HarnessError(vec![format!("envoy sent {name} nothing")])
        } else if e == l {
            Outcome::Match
        } else {
            Outcome::Mismatch(vec![format!(
                "received by {name}: envoy {} / legate {}",
                serde_json::Value::from(e.clone()),
                serde_json::Value::from(l.clone())
            )])
        };
        report.add(tier, &stem, &format!("received-by-{name}"), outcome);
    }
    for (i, r) in sc.requests.iter().enumerate() {
        let oracle: Vec<String> = check_expect(&r.expect, &envoy[i])
            .into_iter()
            .map(|p| format!("envoy: {p}"))
            .collect();
        let problems = diff(&envoy[i], &legate[i]);
        let outcome = if !oracle.is_empty() {
            Outcome::HarnessError(oracle)
        } else if problems.is_empty() {
            Outcome::Match
        } else {
            Outcome::Mismatch(problems)
        };
        report.add(tier, &stem, &r.name, outcome);
    }
    drop(ups);
    drop(authz);
    drop(processor);
    drop(jwks_server);
    Ok(())
}

impl PartialOrd for Kind {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Kind {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (*self as u8).cmp(&(*other as u8))
    }
}
impl Eq for Kind {}
