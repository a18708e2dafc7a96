//! Comparing what a client and the upstreams observed through Envoy and
//! through Legate. The tolerated differences are listed here, each with the
//! reason it cannot reflect a behavioural difference.

use serde_json::Value;
use std::collections::BTreeMap;

/// Response headers whose values legitimately differ between two runs.
pub const TOLERATED_RESPONSE_HEADERS: &[(&str, &str)] = &[
    ("date", "the wall-clock time of the response"),
    ("x-envoy-upstream-service-time", "a measured latency"),
];

/// `connection: keep-alive` on one side only: pingora states HTTP/1.1's
/// default explicitly, Envoy omits it; both keep the connection open.
pub const KEEP_ALIVE_REASON: &str =
    "HTTP/1.1 keep-alive is the default; stating it changes nothing";

/// Random request ids (UUID v4) are replaced by `<uuid>` everywhere before
/// comparing: their values are random by design, their presence and place
/// are still compared. An id whose version digit carries a tracing decision
/// (Envoy packs `9`, `a` or `b` there) keeps that digit: `<uuid traced=9>`.
/// Trace and span ids are random too: `traceparent`'s become
/// `<trace-id>`/`<span-id>` (its flags are kept), B3's `<hex id>`,
/// Datadog's `<decimal id>` and `<hex id>`.
pub fn normalize(s: &str) -> String {
    static RES: std::sync::OnceLock<Vec<(regex::Regex, &'static str)>> = std::sync::OnceLock::new();
    let res =
        RES.get_or_init(|| {
            [
            (
                "[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                "<uuid>",
            ),
            (
                "[0-9a-f]{8}-[0-9a-f]{4}-([9ab])[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                "<uuid traced=$1>",
            ),
            ("00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})", "00-<trace-id>-<span-id>-$3"),
            (
                r#""(x-b3-traceid|x-b3-spanid|x-b3-parentspanid)":"([0-9a-f]{16}|[0-9a-f]{32})""#,
                r#""$1":"<hex id>""#,
            ),
            (
                r#""(x-datadog-trace-id|x-datadog-parent-id)":"[0-9]+""#,
                r#""$1":"<decimal id>""#,
            ),
            (r"_dd\.p\.tid=[0-9a-f]{16}", "_dd.p.tid=<hex id>"),
            (r";p:[0-9a-f]{16}", ";p:<span-id>"),
        ]
        .into_iter()
        .map(|(re, to)| (regex::Regex::new(re).unwrap(), to))
        .collect()
        });
    let mut out = session_expiry(&oauth2_random(s));
    for (i, (re, to)) in res.iter().enumerate() {
        out = match i {
            // Ids the scenarios send are kept, so that their propagation
            // is compared, not just the shape.
            2 => re
                .replace_all(&out, |c: &regex::Captures| {
                    let keep = |id: &str, shape: &str| {
                        if KNOWN_TRACE_IDS.contains(&id) {
                            id.to_string()
                        } else {
                            shape.to_string()
                        }
                    };
                    format!(
                        "00-{}-{}-{}",
                        keep(&c[1], "<trace-id>"),
                        keep(&c[2], "<span-id>"),
                        &c[3]
                    )
                })
                .into_owned(),
            3..=6 => re
                .replace_all(&out, |c: &regex::Captures| {
                    let whole = &c[0];
                    if KNOWN_TRACE_IDS.iter().any(|k| whole.contains(k)) {
                        whole.to_string()
                    } else {
                        let mut e = String::new();
                        c.expand(to, &mut e);
                        e
                    }
                })
                .into_owned(),
            _ => re.replace_all(&out, *to).into_owned(),
        };
    }
    out
}

pub const OAUTH2_REASON: &str = "random per sign-in by design: the state's nonce and flow id, PKCE's challenge, the nonce and encrypted verifier cookies are compared by shape (the state's URL kept); the oauth2 part checks their signatures and encryption";

/// An OAuth2 sign-in's random values replaced by their shape: the state
/// decoded (its URL kept), PKCE's challenge, the flow id in cookie names,
/// the signed nonce and the encrypted code verifier (IV and AES-CBC of 43
/// bytes: 86 base64url characters).
fn oauth2_random(s: &str) -> String {
    use base64::Engine;
    static RES: std::sync::OnceLock<[regex::Regex; 5]> = std::sync::OnceLock::new();
    let [state, challenge, flow, nonce, verifier] = RES.get_or_init(|| {
        [
            r"state=(eyJ[A-Za-z0-9_-]+)",
            r"code_challenge=[A-Za-z0-9_-]{43}",
            r"\.[0-9a-f]{16}=",
            r"=[0-9a-f]{16}\.[A-Za-z0-9+/]{43}=",
            r"=[A-Za-z0-9_-]{86};",
        ]
        .map(|r| regex::Regex::new(r).unwrap())
    });
    let out = state.replace_all(s, |c: &regex::Captures| {
        let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&c[1])
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
        match decoded {
            Some(v) => format!("state=<url {} csrf_token flow_id>", v["url"]),
            None => c[0].to_string(),
        }
    });
    let out = challenge.replace_all(&out, "code_challenge=<challenge>");
    let out = nonce.replace_all(&out, "=<flow id>.<signature>");
    let out = flow.replace_all(&out, ".<flow id>=");
    verifier.replace_all(&out, "=<encrypted>;").into_owned()
}

pub const SESSION_REASON: &str = "a stateful session cookie's expiry is the wall clock plus its ttl: its address is compared, its expiry within 5 s of the ttl";

/// A stateful session cookie (`name="<base64 message>"; Max-Age=N`) with
/// its expiry replaced by whether it is N seconds away (within 5 s).
fn session_expiry(s: &str) -> String {
    use base64::Engine;
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let re =
        RE.get_or_init(|| regex::Regex::new(r#"="([A-Za-z0-9+/]+=*)"; Max-Age=([0-9]+)"#).unwrap());
    re.replace_all(s, |c: &regex::Captures| {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&c[1])
            .unwrap_or_default();
        let ttl: u64 = c[2].parse().unwrap_or(0);
        match decode_session(&raw) {
            Some((addr, expires)) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let close = expires.abs_diff(now + ttl) <= 5;
                format!(
                    "=\"<session {addr} expires {}>\"; Max-Age={ttl}",
                    if close { "after the ttl" } else { "ELSEWHEN" }
                )
            }
            None => c[0].to_string(),
        }
    })
    .into_owned()
}

/// (address, expiry) of a session cookie's message: field 1 a string,
/// field 2 a varint.
fn decode_session(m: &[u8]) -> Option<(String, u64)> {
    let [0x0a, len, rest @ ..] = m else {
        return None;
    };
    let (addr, rest) = rest.split_at_checked(*len as usize)?;
    let [0x10, varint @ ..] = rest else {
        return None;
    };
    let mut v = 0u64;
    for (i, b) in varint.iter().enumerate() {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return (i + 1 == varint.len())
                .then(|| (String::from_utf8_lossy(addr).into_owned(), v));
        }
    }
    None
}

/// Trace and span ids the routing scenarios send (W3C's example ids, and
/// Datadog's decimal ones): kept by [`normalize`].
pub const KNOWN_TRACE_IDS: &[&str] = &[
    "0af7651916cd43dd8448eb211c80319c",
    "0af7651916cd43dd",
    "8448eb211c80319c",
    "b7ad6b7169203331",
    "1234567890123456789",
    "987654321",
];

/// What one request observed through one proxy.
#[derive(Debug, Clone)]
pub struct Observation {
    pub status: u16,
    pub headers: BTreeMap<String, Vec<String>>,
    pub body: String,
    /// The echo upstream's JSON view of the request, when an upstream answered.
    pub upstream: Option<Value>,
    pub served_by: String,
}

impl Observation {
    /// A request whose connection failed (refused TLS handshake, closed
    /// connection): only the failure is compared, as curl's wording of it
    /// depends on when the peer gave up.
    pub fn failed() -> Self {
        Self {
            status: 0,
            headers: BTreeMap::new(),
            body: "connection failed".into(),
            upstream: None,
            served_by: "none".into(),
        }
    }

    pub fn from_curl(r: &legate_tests::legate::CurlResult) -> Self {
        let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (k, v) in &r.headers {
            headers
                .entry(k.to_ascii_lowercase())
                .or_default()
                .push(normalize(v));
        }
        let served_by = r.header("x-echo-server").unwrap_or("none").to_string();
        let upstream = if served_by != "none" {
            serde_json::from_str::<Value>(&normalize(&r.body)).ok()
        } else {
            None
        };
        Self {
            status: r.status,
            headers,
            body: normalize(&r.body),
            upstream,
            served_by,
        }
    }
}

/// `x-envoy-expected-rq-timeout-ms` is what remains of the route timeout
/// when an attempt starts, so after a retry it depends on elapsed time:
/// values within 100 ms of each other are the same behaviour. Retries wait
/// a random back-off in each proxy independently, so a scenario that
/// retries more than twice sets a short `retry_back_off` to keep the two
/// elapsed times comparable (`route-action-timeout-retry.yaml`).
pub const EXPECTED_TIMEOUT_REASON: &str = "the remaining route timeout when an attempt starts depends on elapsed time; compared within 100 ms";

fn close_millis(a: Option<&Value>, b: Option<&Value>) -> bool {
    let n = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .and_then(|s| s.parse::<i64>().ok())
    };
    matches!((n(a), n(b)), (Some(x), Some(y)) if (x - y).abs() <= 100)
}

/// `x-ratelimit-reset` from the global rate limit service counts the
/// seconds to the end of the limit's window on the wall clock, which moves
/// between the two proxies' runs: values within 5 s are the same.
pub const RATELIMIT_RESET_REASON: &str =
    "the global rate limit service's seconds to the window's end move with the wall clock; compared within 5 s";

fn close_seconds(a: Option<&Vec<String>>, b: Option<&Vec<String>>) -> bool {
    let n = |v: Option<&Vec<String>>| {
        v.and_then(|v| v.first())
            .and_then(|s| s.parse::<i64>().ok())
    };
    matches!((n(a), n(b)), (Some(x), Some(y)) if (x - y).abs() <= 5)
}

/// Field-by-field differences (empty = the same).
pub fn diff(envoy: &Observation, legate: &Observation) -> Vec<String> {
    let mut out = Vec::new();
    if envoy.status != legate.status {
        out.push(format!(
            "status: envoy {} / legate {}",
            envoy.status, legate.status
        ));
    }
    if envoy.served_by != legate.served_by {
        out.push(format!(
            "served_by: envoy {} / legate {}",
            envoy.served_by, legate.served_by
        ));
    }
    let names: std::collections::BTreeSet<&String> =
        envoy.headers.keys().chain(legate.headers.keys()).collect();
    for n in names {
        if TOLERATED_RESPONSE_HEADERS.iter().any(|(t, _)| t == n) {
            continue;
        }
        let (e, l) = (envoy.headers.get(n), legate.headers.get(n));
        if n == "connection" {
            let ka = |v: Option<&Vec<String>>| {
                v.is_none_or(|v| v.iter().all(|x| x.eq_ignore_ascii_case("keep-alive")))
            };
            if ka(e) && ka(l) {
                continue;
            }
        }
        if n == "x-ratelimit-reset" && close_seconds(e, l) {
            continue;
        }
        // An echo's body is the request it saw, compared field by field
        // below; its length moves with random ids (Datadog's are decimal).
        if n == "content-length" && envoy.upstream.is_some() && legate.upstream.is_some() {
            continue;
        }
        if e != l {
            out.push(format!("response header {n}: envoy {e:?} / legate {l:?}"));
        }
    }
    match (&envoy.upstream, &legate.upstream) {
        (Some(e), Some(l)) => {
            for key in ["method", "path", "body", "version"] {
                if e[key] != l[key] {
                    out.push(format!(
                        "upstream {key}: envoy {} / legate {}",
                        e[key], l[key]
                    ));
                }
            }
            let empty = serde_json::Map::new();
            let eh = e["headers"].as_object().unwrap_or(&empty);
            let lh = l["headers"].as_object().unwrap_or(&empty);
            let names: std::collections::BTreeSet<&String> = eh.keys().chain(lh.keys()).collect();
            for n in names {
                if n == "x-envoy-expected-rq-timeout-ms" && close_millis(eh.get(n), lh.get(n)) {
                    continue;
                }
                if eh.get(n) != lh.get(n) {
                    out.push(format!(
                        "upstream header {n}: envoy {:?} / legate {:?}",
                        eh.get(n),
                        lh.get(n)
                    ));
                }
            }
        }
        _ => {
            if envoy.body != legate.body {
                out.push(format!(
                    "body: envoy {:?} / legate {:?}",
                    envoy.body, legate.body
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(status: u16, headers: &[(&str, &str)], body: &str) -> Observation {
        let r = legate_tests::legate::CurlResult {
            version: "HTTP/1.1".into(),
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.to_string(),
        };
        Observation::from_curl(&r)
    }

    #[test]
    fn tolerated_fields_are_ignored_and_others_reported() {
        let a = obs(
            200,
            &[
                ("date", "x"),
                ("x-request-id", "0f8b3a2e-1c4d-4e5f-9a6b-7c8d9e0f1a2b"),
                ("a", "1"),
            ],
            "",
        );
        let b = obs(
            200,
            &[
                ("date", "y"),
                ("connection", "keep-alive"),
                ("x-request-id", "11111111-2222-4333-8444-555555555555"),
                ("a", "1"),
            ],
            "",
        );
        assert!(diff(&a, &b).is_empty(), "{:?}", diff(&a, &b));
        let c = obs(404, &[("a", "2")], "");
        let d = diff(&a, &c);
        assert!(
            d.iter().any(|x| x.starts_with("status"))
                && d.iter().any(|x| x.starts_with("response header a")),
            "{d:?}"
        );
        let e = obs(
            200,
            &[
                ("date", "x"),
                ("connection", "close"),
                ("a", "1"),
                ("x-request-id", "0f8b3a2e-1c4d-4e5f-9a6b-7c8d9e0f1a2b"),
            ],
            "",
        );
        assert!(
            !diff(&a, &e).is_empty(),
            "connection: close is a real difference"
        );
    }

    #[test]
    fn oauth2_sign_in_values_compare_by_shape() {
        let loc = "https://idp/authorize?client_id=c&code_challenge=1Lax5P8djOLPc-NzOf7XmOhtZpTLCwzXH536cJd9HeY&state=eyJ1cmwiOiJodHRwOi8vd3d3LmV4YW1wbGUuY29tLyIsImNzcmZfdG9rZW4iOiJkOGRhOTJhZGVhYTA5MGRmLnFTT0J0UnFibmMxUng2a1BMWEVkTlRpTHc1RjFRWWV6eGZkaEwzOVU2OTA9IiwiZmxvd19pZCI6ImQ4ZGE5MmFkZWFhMDkwZGYifQ";
        assert_eq!(
            super::normalize(loc),
            "https://idp/authorize?client_id=c&code_challenge=<challenge>&state=<url \"http://www.example.com/\" csrf_token flow_id>"
        );
        let cookie = "OauthNonce-1.d8da92adeaa090df=d8da92adeaa090df.qSOBtRqbnc1Rx6kPLXEdNTiLw5F1QYezxfdhL39U690=;path=/";
        assert_eq!(
            super::normalize(cookie),
            "OauthNonce-1.<flow id>=<flow id>.<signature>;path=/"
        );
        let verifier = "CodeVerifier=Xtn2PoiYjrLhoKtgtOi-Bt3cqkqQ5-1ljozOBc2OxfEEys-Y8fW4BWUQ0s8gKmgQKLKhtbH-Sw3FnSmLr9itbg;path=/";
        assert_eq!(
            super::normalize(verifier),
            "CodeVerifier=<encrypted>;path=/"
        );
    }

    #[test]
    fn session_cookies_compare_by_address_and_ttl() {
        // Envoy 1.40's cookie for 127.0.0.1:18181, an hour's ttl, set at a
        // time long past: its expiry is not an hour from now.
        let c = "sess=\"Cg8xMjcuMC4wLjE6MTgxODEQ2qPb2AY=\"; Max-Age=3600; Path=/v1";
        assert_eq!(
            super::normalize(c),
            "sess=\"<session 127.0.0.1:18181 expires ELSEWHEN>\"; Max-Age=3600; Path=/v1"
        );
        assert_eq!(
            super::decode_session(b"\x0a\x01a\x10\x96\x01"),
            Some(("a".into(), 150))
        );
        assert_eq!(super::decode_session(b"\x0a\x05a"), None);
    }
}
