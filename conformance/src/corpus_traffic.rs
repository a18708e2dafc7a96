//! Traffic for the corpus tier: a case both proxies accept is served by
//! Envoy, then by Legate, with every cluster's endpoints pointed at a local
//! echo server of its own (HTTP, and UDP on the same port) and every
//! listener moved to a free loopback port. One request per route, built
//! from the route's match (path, headers, query, method), and one datagram
//! per UDP listener are compared as the routing tier compares them.
//!
//! Routes whose match cannot be satisfied by a made-up request (a regular
//! expression, a URI template, CONNECT, a header that must be absent) are
//! left out and counted, so the report says how much of the case was
//! exercised.

use crate::compare::Observation;
use crate::proxies::{self, Binaries};
use crate::report::{Outcome, Report};
use crate::routing::Request;
use anyhow::Result;
use serde_json::{json, Value};
use std::path::Path;

/// Most requests made for one case: the big cases repeat one shape.
const MAX_REQUESTS: usize = 40;
/// Where one answer of each proxy differs, the request is sent this many
/// times more to each, and the sets of distinct answers are compared:
/// weighted clusters, balancers and trace sampling make some answers
/// random (an answer given one time in ten shows up in 150 tries but for
/// odds of 1 in 7 million).
const SAMPLES: usize = 150;

/// What one case's traffic found.
#[derive(Default)]
pub struct CaseTraffic {
    /// Requests and datagrams compared.
    pub compared: usize,
    /// Routes left out (their match cannot be made up).
    pub skipped: usize,
    /// Every compared exchange matched Envoy.
    pub matched: bool,
}

/// A field by its camelCase name or its snake_case one (the corpus has
/// both spellings).
fn get<'a>(v: &'a Value, camel: &str) -> Option<&'a Value> {
    v.get(camel).or_else(|| v.get(snake(camel)))
}

fn get_mut<'a>(v: &'a mut Value, camel: &str) -> Option<&'a mut Value> {
    let key = if v.get(camel).is_some() {
        camel.to_string()
    } else {
        snake(camel)
    };
    v.get_mut(key)
}

fn snake(camel: &str) -> String {
    let mut s = String::new();
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            s.push('_');
            s.push(c.to_ascii_lowercase());
        } else {
            s.push(c);
        }
    }
    s
}

fn items<'a>(v: &'a Value, camel: &str) -> impl Iterator<Item = &'a Value> {
    get(v, camel)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// The case's upstreams: one echo server per cluster with endpoints.
struct Upstreams {
    _echoes: Vec<legate_tests::echo::Echo>,
}

/// Points each cluster's endpoints at an echo server of its own.
fn point_clusters(b: &mut Value) -> Result<Upstreams> {
    let mut echoes = Vec::new();
    let Some(clusters) = get_mut(b, "staticResources")
        .and_then(|s| get_mut(s, "clusters"))
        .and_then(Value::as_array_mut)
    else {
        return Ok(Upstreams { _echoes: echoes });
    };
    for c in clusters {
        let name = get(c, "name")
            .and_then(Value::as_str)
            .unwrap_or("cluster")
            .to_string();
        let Some(la) = get_mut(c, "loadAssignment") else {
            continue;
        };
        let echo = tokio::runtime::Handle::current().block_on(legate_tests::echo::start(
            &name,
            "127.0.0.1:0".parse().unwrap(),
        ))?;
        let port = echo.addr.port();
        // UDP routes reach the same port; a taken UDP port only loses the
        // datagram answers, which both proxies then miss alike.
        if let Ok(u) = std::net::UdpSocket::bind(("127.0.0.1", port)) {
            legate_tests::udp::naming_echo(u, name.clone());
        }
        for lle in get_mut(la, "endpoints")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            for lbe in get_mut(lle, "lbEndpoints")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                let sa = get_mut(lbe, "endpoint")
                    .and_then(|e| get_mut(e, "address"))
                    .and_then(|a| get_mut(a, "socketAddress"));
                if let Some(Value::Object(sa)) = sa {
                    sa.remove("address");
                    sa.remove("portValue");
                    sa.remove("port_value");
                    sa.insert("address".into(), json!("127.0.0.1"));
                    sa.insert("portValue".into(), json!(port));
                }
            }
        }
        echoes.push(echo);
    }
    Ok(Upstreams { _echoes: echoes })
}

/// A listener's chains that end in an HTTP connection manager: (TLS server
/// name if the chain is TLS, the manager's config).
fn hcm_chains(l: &Value) -> Vec<(Option<String>, &Value)> {
    let mut out = Vec::new();
    let chains = items(l, "filterChains").chain(get(l, "defaultFilterChain"));
    for fc in chains {
        let tls = get(fc, "transportSocket").is_some().then(|| {
            get(fc, "filterChainMatch")
                .and_then(|m| get(m, "serverNames"))
                .and_then(|n| n.get(0))
                .and_then(Value::as_str)
                .map(|s| s.replace("*.", "www."))
                .unwrap_or_default()
        });
        for f in items(fc, "filters") {
            let tc = get(f, "typedConfig");
            let is_hcm = tc
                .and_then(|t| t.get("@type"))
                .and_then(Value::as_str)
                .is_some_and(|t| t.ends_with("HttpConnectionManager"));
            if let (true, Some(tc)) = (is_hcm, tc) {
                out.push((tls.clone(), tc));
            }
        }
    }
    out
}

/// A host a virtual host's first domain accepts.
fn host_for(vh: &Value) -> String {
    let d = items(vh, "domains")
        .next()
        .and_then(Value::as_str)
        .unwrap_or("*");
    if d == "*" {
        "corpus.example".into()
    } else if let Some(rest) = d.strip_prefix("*") {
        format!("www{rest}")
    } else if let Some(rest) = d.strip_suffix("*") {
        format!("{rest}com")
    } else {
        d.to_string()
    }
}

/// A value a string matcher accepts, if one can be made up.
fn string_for(m: &Value) -> Option<String> {
    for (k, pad) in [
        ("exact", ""),
        ("prefix", "x"),
        ("suffix", "x"),
        ("contains", "x"),
    ] {
        if let Some(v) = get(m, k).and_then(Value::as_str) {
            return Some(match k {
                "exact" => v.to_string(),
                "prefix" => format!("{v}{pad}"),
                _ => format!("{pad}{v}"),
            });
        }
    }
    None
}

/// A header value a header matcher accepts: Some(None) to leave it out.
fn header_for(h: &Value) -> Option<Option<String>> {
    if get(h, "invertMatch").and_then(Value::as_bool) == Some(true) {
        return Some(None);
    }
    if let Some(p) = get(h, "presentMatch").and_then(Value::as_bool) {
        return Some(p.then(|| "present".to_string()));
    }
    if let Some(v) = get(h, "exactMatch").and_then(Value::as_str) {
        return Some(Some(v.to_string()));
    }
    if let Some(v) = get(h, "prefixMatch").and_then(Value::as_str) {
        return Some(Some(format!("{v}x")));
    }
    get(h, "stringMatch").and_then(string_for).map(Some)
}

/// A made-up request: path (with query), method, headers.
type MadeUp = (String, Option<String>, Vec<(String, String)>);

/// The request a route's match takes, if one can be made up.
fn request_for(route: &Value, host: &str) -> Option<MadeUp> {
    let m = get(route, "match")?;
    let mut path = if let Some(p) = get(m, "prefix").and_then(Value::as_str) {
        if p.is_empty() {
            "/".to_string()
        } else {
            p.to_string()
        }
    } else if let Some(p) = get(m, "path").and_then(Value::as_str) {
        p.to_string()
    } else if let Some(p) = get(m, "pathSeparatedPrefix").and_then(Value::as_str) {
        p.to_string()
    } else {
        return None;
    };
    if !path.starts_with('/') {
        return None;
    }
    let mut method = None;
    let mut headers = vec![("host".to_string(), host.to_string())];
    for h in items(m, "headers") {
        let name = get(h, "name")?.as_str()?.to_ascii_lowercase();
        let value = header_for(h)?;
        match (name.as_str(), value) {
            (_, None) => {}
            (":method", Some(v)) => method = Some(v),
            (":authority", Some(v)) => headers[0].1 = v,
            (n, _) if n.starts_with(':') => return None,
            (n, Some(v)) => headers.push((n.to_string(), v)),
        }
    }
    if get(m, "grpc").is_some() {
        headers.push(("content-type".into(), "application/grpc".into()));
        method.get_or_insert_with(|| "POST".into());
    }
    let mut query = Vec::new();
    for q in items(m, "queryParameters") {
        let name = get(q, "name")?.as_str()?;
        if get(q, "presentMatch").and_then(Value::as_bool) == Some(true) {
            query.push(format!("{name}=1"));
        } else {
            query.push(format!(
                "{name}={}",
                get(q, "stringMatch").and_then(string_for)?
            ));
        }
    }
    if !query.is_empty() {
        path = format!("{path}?{}", query.join("&"));
    }
    Some((path, method, headers))
}

/// A listener's place in the run: its new port and what it serves.
enum Target {
    Http { port: u16, request: Box<Request> },
    Udp { port: u16, name: String },
}

/// Moves each listener to a free loopback port and makes its requests.
fn plan(b: &mut Value, skipped: &mut usize) -> Result<Vec<Target>> {
    let mut out = Vec::new();
    let Some(listeners) = get_mut(b, "staticResources")
        .and_then(|s| get_mut(s, "listeners"))
        .and_then(Value::as_array_mut)
    else {
        return Ok(out);
    };
    for l in listeners {
        let lname = get(l, "name")
            .and_then(Value::as_str)
            .unwrap_or("listener")
            .to_string();
        let Some(Value::Object(sa)) =
            get_mut(l, "address").and_then(|a| get_mut(a, "socketAddress"))
        else {
            continue;
        };
        let udp = sa.get("protocol").and_then(Value::as_str) == Some("UDP");
        let port = if udp {
            legate_tests::legate::free_udp_port()
        } else {
            legate_tests::legate::free_port()
        };
        sa.remove("port_value");
        sa.insert("address".into(), json!("127.0.0.1"));
        sa.insert("portValue".into(), json!(port));
        if udp {
            out.push(Target::Udp { port, name: lname });
            continue;
        }
        for (tls, hcm) in hcm_chains(l) {
            let Some(rc) = get(hcm, "routeConfig") else {
                continue;
            };
            for vh in items(rc, "virtualHosts") {
                let host = host_for(vh);
                let vname = get(vh, "name").and_then(Value::as_str).unwrap_or("vhost");

                for (i, r) in items(vh, "routes").enumerate() {
                    let Some((path, method, headers)) = request_for(r, &host) else {
                        *skipped += 1;
                        continue;
                    };
                    let rname = get(r, "name")
                        .and_then(Value::as_str)
                        .map_or(i.to_string(), str::to_string);
                    let mut req = json!({
                        "name": format!("{lname}/{vname}/{rname}"),
                        "path": path,
                        "headers": headers.into_iter().map(|(k, v)| (k, Value::from(v))).collect::<serde_json::Map<_, _>>(),
                    });
                    if let Some(m) = method {
                        req["method"] = json!(m);
                    }
                    if let Some(sni) = &tls {
                        let sni = if sni.is_empty() {
                            host.clone()
                        } else {
                            sni.clone()
                        };
                        req["tls"] = json!({"sni": sni});
                    }
                    out.push(Target::Http {
                        port,
                        request: Box::new(serde_json::from_value(req)?),
                    });
                }
            }
        }
    }
    Ok(out)
}

/// Each target's distinct answers to `times[i]` tries (none for 0).
fn observe(targets: &[Target], times: &[usize], work: &Path) -> Vec<Vec<Observation>> {
    targets
        .iter()
        .zip(times)
        .map(|(t, &n)| match t {
            _ if n == 0 => Vec::new(),
            Target::Http { port, request } => {
                let mut seen: Vec<Observation> = Vec::new();
                for _ in 0..n {
                    let o = crate::routing::try_send(*port, request, work)
                        .unwrap_or_else(|_| Observation::failed());
                    if !seen.iter().any(|s| diff(s, &o).is_empty()) {
                        seen.push(o);
                    }
                }
                seen
            }
            Target::Udp { port, .. } => {
                let to = std::net::SocketAddr::from(([127, 0, 0, 1], *port));
                let body = legate_tests::udp::client(to).map_or_else(
                    |e| format!("client failed: {e}"),
                    |s| legate_tests::udp::ask(&s, b"corpus"),
                );
                vec![Observation {
                    status: 0,
                    headers: Default::default(),
                    body,
                    upstream: None,
                    served_by: String::new(),
                }]
            }
        })
        .collect()
}

fn target_name(t: &Target) -> String {
    match t {
        Target::Http { request, .. } => request.name.clone(),
        Target::Udp { name, .. } => format!("udp {name}"),
    }
}

/// Serves one accepted case to both proxies and compares the answers.
pub fn run_case(
    bins: &Binaries,
    case: &str,
    bootstrap: &Value,
    work: &Path,
    report: &mut Report,
) -> Result<CaseTraffic> {
    let mut b = bootstrap.clone();
    let admin = legate_tests::legate::free_port();
    b["admin"] =
        json!({"address": {"socketAddress": {"address": "127.0.0.1", "portValue": admin}}});
    let mut t = CaseTraffic::default();
    let targets = plan(&mut b, &mut t.skipped)?;
    if targets.is_empty() {
        return Ok(t);
    }
    let _upstreams = tokio::task::block_in_place(|| point_clusters(&mut b))?;
    let cfg = work.join(format!("{case}.traffic.json"));
    std::fs::write(&cfg, serde_json::to_vec_pretty(&b)?)?;
    let scenario = format!("traffic/{case}");
    let targets = &targets[..targets.len().min(MAX_REQUESTS)];
    let once = vec![1; targets.len()];
    let [mut envoy, mut legate] =
        match proxies::each(bins, &cfg, admin, work, || observe(targets, &once, work)) {
            Ok(seen) => seen,
            Err(e) => {
                report.add(
                    "corpus",
                    &scenario,
                    "*",
                    Outcome::Mismatch(vec![format!("{e:#}")]),
                );
                return Ok(t);
            }
        };
    let again: Vec<usize> = (0..targets.len())
        .map(|i| {
            if diff_any(&envoy[i], &legate[i]) {
                SAMPLES
            } else {
                0
            }
        })
        .collect();
    if again.iter().any(|&n| n > 0) {
        if let Ok([e, l]) =
            proxies::each(bins, &cfg, admin, work, || observe(targets, &again, work))
        {
            for (i, _) in again.iter().enumerate().filter(|(_, &n)| n > 0) {
                (envoy[i], legate[i]) = (e[i].clone(), l[i].clone());
            }
        }
    }
    t.matched = true;
    for (i, target) in targets.iter().enumerate() {
        let problems = differences(&envoy[i], &legate[i]);
        t.compared += 1;
        t.matched &= problems.is_empty();
        let outcome = if problems.is_empty() {
            Outcome::Match
        } else {
            Outcome::Mismatch(problems)
        };
        report.add("corpus", &scenario, &target_name(target), outcome);
    }
    Ok(t)
}

/// Envoy's local rate limit buckets refill continuously (100 tokens a
/// second is one every 10 ms), and the corpus's buckets are that fast, so
/// `x-ratelimit-remaining` moves with the milliseconds between requests:
/// counts a few tokens apart are the same answer.
const REFILL_SLACK: i64 = 3;

fn diff(e: &Observation, l: &Observation) -> Vec<String> {
    const H: &str = "x-ratelimit-remaining";
    let count = |o: &Observation| -> Option<i64> { o.headers.get(H)?.first()?.parse().ok() };
    match (count(e), count(l)) {
        (Some(a), Some(b)) if a != b && (a - b).abs() <= REFILL_SLACK => {
            let mut l = l.clone();
            l.headers.insert(H.into(), e.headers[H].clone());
            crate::compare::diff(e, &l)
        }
        _ => crate::compare::diff(e, l),
    }
}

fn diff_any(envoy: &[Observation], legate: &[Observation]) -> bool {
    !differences(envoy, legate).is_empty()
}

/// How two sets of distinct answers differ: each answer of one proxy must
/// be among the other's; one answer each is compared field by field.
fn differences(envoy: &[Observation], legate: &[Observation]) -> Vec<String> {
    if let ([e], [l]) = (envoy, legate) {
        return diff(e, l);
    }
    let missing = |from: &[Observation], to: &[Observation]| -> Vec<String> {
        from.iter()
            .filter(|o| !to.iter().any(|t| diff(o, t).is_empty()))
            .map(|o| format!("status {} served by {}", o.status, o.served_by))
            .collect()
    };
    let mut out = Vec::new();
    for (who, m) in [
        ("only envoy answered", missing(envoy, legate)),
        ("only legate answered", missing(legate, envoy)),
    ] {
        if !m.is_empty() {
            out.push(format!("{who}: {}", m.join("; ")));
        }
    }
    // Each of Envoy's answers Legate never gave, beside Legate's nearest.
    for e in envoy {
        let nearest = legate.iter().map(|l| diff(e, l)).min_by_key(Vec::len);
        if let Some(d) = nearest.filter(|d| !d.is_empty()) {
            out.push(format!(
                "nearest to envoy's {}: {}",
                e.served_by,
                d.join("; ")
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_made_from_the_route_match() {
        let r = json!({"match": {"prefix": "/api", "headers": [
            {"name": "x-user", "stringMatch": {"exact": "alice"}},
            {"name": ":method", "exactMatch": "PUT"},
            {"name": "x-gone", "presentMatch": true, "invertMatch": true}
        ], "queryParameters": [{"name": "debug", "presentMatch": true}]}});
        let (path, method, headers) = request_for(&r, "foo.example").unwrap();
        assert_eq!(path, "/api?debug=1");
        assert_eq!(method.as_deref(), Some("PUT"));
        assert_eq!(
            headers,
            [
                ("host".to_string(), "foo.example".to_string()),
                ("x-user".into(), "alice".into())
            ]
        );
        let regex = json!({"match": {"safeRegex": {"regex": "/a.*"}}});
        assert!(
            request_for(&regex, "h").is_none(),
            "a regex cannot be made up"
        );
    }

    #[test]
    fn wildcard_domains_get_a_host_they_accept() {
        for (d, want) in [
            ("*", "corpus.example"),
            ("*.example.com", "www.example.com"),
            ("foo.*", "foo.com"),
            ("a.b", "a.b"),
        ] {
            assert_eq!(host_for(&json!({"domains": [d]})), want);
        }
    }
}
