//! The http tier's OAuth2 part: the whole sign-in flow of the `oauth2`
//! filter, run through Envoy and through Legate with the same client, the
//! same token endpoint and the same echo upstream. The flow's random parts
//! (flow ids, nonces, PKCE verifiers, IVs) differ from run to run, so
//! each is checked for what it must be, with the secrets the harness
//! knows (the nonce's HMAC, the verifier against the challenge, the token
//! cookies decrypted, the login HMAC recomputed), and replaced by that
//! verdict before the transcripts are compared. The token endpoint checks
//! PKCE as an authorization server does. Finally each proxy is handed the
//! login cookies Envoy minted: a user signed in through Envoy stays
//! signed in through Legate.

use crate::proxies::{self, Binaries};
use crate::report::{Outcome, Report};
use aes::cipher::{block_padding::Pkcs7, BlockDecryptMut, KeyIvInit};
use anyhow::Result;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const HMAC_SECRET: &str = "hmac-secret-1";
/// The client secret ends in a newline, as Envoy Gateway's secrets do.
const CLIENT_SECRET: &str = "s3cr:t/=&+~\n";

/// A response as the client read it.
#[derive(Debug, Default, Clone)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn one(&self, name: &str) -> &str {
        self.all(name).first().copied().unwrap_or("")
    }

    /// The cookies it set (deletions left out), as a `Cookie` value.
    fn cookies(&self) -> String {
        self.all("set-cookie")
            .iter()
            .filter_map(|c| c.split(';').next())
            .filter(|p| !p.ends_with("=deleted"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// One HTTP/1.1 request on its own connection.
fn request(port: u16, path: &str, headers: &[(&str, &str)]) -> Resp {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return Resp::default();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut text = format!("GET {path} HTTP/1.1\r\nconnection: close\r\n");
    if !headers.iter().any(|(k, _)| *k == "host") {
        text.push_str("host: app.test\r\n");
    }
    for (k, v) in headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    text.push_str("\r\n");
    if s.write_all(text.as_bytes()).is_err() {
        return Resp::default();
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Resp {
    let text = String::from_utf8_lossy(raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Resp::default();
    };
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Resp {
        status,
        headers,
        body: body.to_string(),
    }
}

/// What the harness knows of the flow in progress.
#[derive(Default)]
struct Flow {
    /// The PKCE challenge of the latest redirect.
    challenge: String,
}

/// The token endpoint: it checks the code verifier against the flow's
/// challenge, records each request (the verifier replaced by that
/// verdict), and answers code `abc` and refresh tokens with tokens, other
/// codes with a 500.
fn token_server(flow: Arc<Mutex<Flow>>) -> std::io::Result<(u16, Arc<Mutex<Vec<String>>>)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let (seen, flow) = (seen.clone(), flow.clone());
            std::thread::spawn(move || serve_token(&mut s, &seen, &flow));
        }
    });
    Ok((port, out))
}

fn serve_token(s: &mut TcpStream, seen: &Mutex<Vec<String>>, flow: &Mutex<Flow>) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    let (head, body) = loop {
        let Ok(n) = s.read(&mut b) else { return };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&b[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let len = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
            })
            .unwrap_or(0);
        if body.len() >= len {
            break (head.to_string(), body.to_string());
        }
    };
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("").to_string();
    // What the token call carries, but for what varies by run: the
    // request id and the connection's bookkeeping.
    let mut headers: Vec<String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "x-request-id" | "x-forwarded-for" | "connection"
            )
        })
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    headers.sort();
    let challenge = flow.lock().unwrap().challenge.clone();
    let params: Vec<(String, String)> = body
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let shown: Vec<String> = params
        .iter()
        .map(|(k, v)| {
            if k == "code_verifier" {
                let ok = URL_SAFE_NO_PAD.encode(sha256(v.as_bytes())) == challenge;
                format!(
                    "code_verifier=<{}>",
                    if ok {
                        "matches the challenge"
                    } else {
                        "MISMATCH"
                    }
                )
            } else {
                format!("{k}={v}")
            }
        })
        .collect();
    seen.lock().unwrap().push(format!(
        "{request_line} | {} | {}",
        headers.join(", "),
        shown.join("&")
    ));
    let get = |k: &str| {
        params
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    };
    let (status, answer) = match (get("grant_type"), get("code")) {
        ("authorization_code", "abc") => (
            200,
            r#"{"access_token":"access-1","id_token":"id-1","refresh_token":"refresh-1","expires_in":3600,"token_type":"Bearer"}"#,
        ),
        ("refresh_token", _) => (
            200,
            r#"{"access_token":"access-2","id_token":"id-2","expires_in":"1800"}"#,
        ),
        _ => (500, "nope"),
    };
    let _ = s.write_all(
        format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
            answer.len()
        )
        .as_bytes(),
    );
}

fn sha256(b: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .to_vec()
}

fn hmac(msg: &str) -> Vec<u8> {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, HMAC_SECRET.as_bytes());
    ring::hmac::sign(&k, msg.as_bytes()).as_ref().to_vec()
}

fn decrypt(v: &str) -> Option<String> {
    let raw = URL_SAFE_NO_PAD.decode(v).ok()?;
    if raw.len() <= 16 {
        return None;
    }
    let key = sha256(HMAC_SECRET.as_bytes());
    let (iv, ct) = raw.split_at(16);
    let plain = cbc::Decryptor::<aes::Aes256>::new_from_slices(&key, iv)
        .ok()?
        .decrypt_padded_vec_mut::<Pkcs7>(ct)
        .ok()?;
    String::from_utf8(plain).ok()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A CSRF token checked: `<flow>.<base64 HMAC of flow>`.
fn csrf_ok(token: &str) -> bool {
    token
        .split_once('.')
        .is_some_and(|(id, sig)| id.len() == 16 && STANDARD.encode(hmac(id)) == sig)
}

/// The state parameter decoded and checked.
fn show_state(state: &str) -> String {
    let Some(json) = URL_SAFE_NO_PAD
        .decode(state)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
    else {
        return "<state not base64url>".into();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&json) else {
        return format!("<state not JSON: {json}>");
    };
    let keys: Vec<&str> = v
        .as_object()
        .map_or(Vec::new(), |o| o.keys().map(String::as_str).collect());
    let csrf = v["csrf_token"].as_str().unwrap_or("");
    let flow = v["flow_id"].as_str().unwrap_or("");
    format!(
        "<state keys {keys:?} url {} csrf {} flow {}>",
        v["url"],
        if csrf_ok(csrf) { "signed" } else { "UNSIGNED" },
        if csrf.starts_with(&format!("{flow}.")) {
            "matches"
        } else {
            "DIFFERS"
        }
    )
}

/// A `Location` with its random parameters checked and replaced.
fn show_location(loc: &str, flow: &Mutex<Flow>) -> String {
    let Some((base, query)) = loc.split_once('?') else {
        return loc.to_string();
    };
    let parts: Vec<String> = query
        .split('&')
        .map(|p| match p.split_once('=') {
            Some(("state", v)) => format!("state={}", show_state(v)),
            Some(("code_challenge", v)) => {
                flow.lock().unwrap().challenge = v.to_string();
                format!("code_challenge=<{} chars>", v.len())
            }
            _ => p.to_string(),
        })
        .collect();
    format!("{base}?{}", parts.join("&"))
}

/// A `Set-Cookie` with its random parts checked and replaced.
fn show_set_cookie(c: &str, all: &[&str], host: &str) -> String {
    let (pair, attrs) = c.split_once(';').unwrap_or((c, ""));
    let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
    let shown_name = match name.rsplit_once('.') {
        Some((base, id)) if id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) => {
            format!("{base}.<flow>")
        }
        _ => name.to_string(),
    };
    let attrs = attrs.split(';').map(|a| match a.split_once('=') {
        Some(("Max-Age", n)) if n.parse::<u64>().is_ok_and(|n| n > 1_000_000) => {
            "Max-Age=<large>".to_string()
        }
        _ => a.to_string(),
    });
    let value = if value == "deleted" {
        value.to_string()
    } else if name.contains("Nonce") {
        format!(
            "<csrf {}>",
            if csrf_ok(value) { "signed" } else { "UNSIGNED" }
        )
    } else if name.contains("CodeVerifier") {
        match decrypt(value) {
            Some(v) if v.len() == 43 => "<encrypted verifier>".to_string(),
            other => format!("<verifier {other:?}>"),
        }
    } else if name.contains("HMAC") {
        // The cookies by role (config B names the access token's cookie
        // AccessToken-1).
        let get = |n: &str| {
            all.iter()
                .filter_map(|c| c.split(';').next()?.split_once('='))
                .find(|(k, _)| n.split('|').any(|n| k.contains(n)))
                .map(|(_, v)| v.to_string())
                .unwrap_or_default()
        };
        let plain = |n: &str| {
            let v = get(n);
            decrypt(&v).unwrap_or(v)
        };
        let domain = attrs_domain(c).unwrap_or_else(|| host.to_string());
        let payload = format!(
            "{domain}\n{}\n{}\n{}\n{}",
            get("Expires"),
            plain("Access|Bearer"),
            plain("IdToken"),
            plain("Refresh")
        );
        format!(
            "<hmac {}>",
            if STANDARD.encode(hmac(&payload)) == value {
                "valid"
            } else {
                "INVALID"
            }
        )
    } else if name.contains("Expires") {
        let left = value.parse::<i64>().unwrap_or(0) - now() as i64;
        format!("<now+{}>", (left + 5) / 10 * 10)
    } else {
        match decrypt(value) {
            Some(p) => format!("<encrypted {p}>"),
            None => value.to_string(),
        }
    };
    std::iter::once(format!("{shown_name}={value}"))
        .chain(attrs)
        .collect::<Vec<_>>()
        .join(";")
}

fn attrs_domain(c: &str) -> Option<String> {
    c.split(';')
        .find_map(|a| a.trim().strip_prefix("domain=").map(str::to_string))
}

/// A response as compared: status, location, cookies, body.
fn show(r: &Resp, flow: &Mutex<Flow>) -> String {
    let cookies = r.all("set-cookie");
    let mut out = format!(
        "{} location={}",
        r.status,
        show_location(r.one("location"), flow)
    );
    for c in &cookies {
        out.push_str(&format!(
            " | set-cookie {}",
            show_set_cookie(c, &cookies, "app.test")
        ));
    }
    if r.status != 200 {
        out.push_str(&format!(
            " | body {:?} content-type {:?}",
            r.body,
            r.one("content-type")
        ));
    }
    out
}

/// As [`show`], the cookies sorted: Envoy deletes the sign-in flow's
/// cookies at sign-out in its hash map's order, which is unspecified.
fn show_sorted(r: &Resp, flow: &Mutex<Flow>) -> String {
    let cookies = r.all("set-cookie");
    let mut out = format!(
        "{} location={}",
        r.status,
        show_location(r.one("location"), flow)
    );
    let mut shown: Vec<String> = cookies
        .iter()
        .map(|c| show_set_cookie(c, &cookies, "app.test"))
        .collect();
    shown.sort();
    for c in shown {
        out.push_str(&format!(" | set-cookie {c}"));
    }
    if r.status != 200 {
        out.push_str(&format!(
            " | body {:?} content-type {:?}",
            r.body,
            r.one("content-type")
        ));
    }
    out
}

/// What the echo upstream saw of a request the proxy let through.
fn upstream_view(r: &Resp) -> String {
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
    let h = &v["headers"];
    let mut cookie: Vec<String> = h["cookie"]
        .as_str()
        .map(|c| {
            c.split("; ")
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    format!(
                        "{k}={}",
                        decrypt(v).map_or(v.to_string(), |p| format!("<encrypted {p}>"))
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    cookie.sort();
    format!(
        "{} upstream: authorization={} x-id-token={} cookie={:?} oauth-status={}",
        r.status, h["authorization"], h["x-id-token"], cookie, h["x-envoy-oauth-status"]
    )
}

const FILTER_A: &str = r#"{name: envoy.filters.http.oauth2, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.oauth2.v3.OAuth2, config: {
  token_endpoint: {cluster: token, uri: "http://auth.test/oauth/token?x=1", timeout: 3s},
  authorization_endpoint: "https://auth.test/authorize?prompt=login",
  end_session_endpoint: "https://auth.test/logout",
  redirect_uri: "%REQ(x-forwarded-proto)%://%REQ(:authority)%/callback",
  redirect_path_matcher: {path: {exact: /callback}}, signout_path: {path: {exact: /signout}},
  forward_bearer_token: true, auth_scopes: [openid, email], resources: ["api://x", "b c"],
  pass_through_matcher: [{name: x-pass, present_match: true}],
  deny_redirect_matcher: [{name: x-requested-with, string_match: {exact: XMLHttpRequest}}],
  allow_failed_matcher: [{name: x-allow-failed, present_match: true}],
  credentials: {client_id: "app client", token_secret: {name: tok}, hmac_secret: {name: hmac}}}}}"#;

const FILTER_B: &str = r#"{name: envoy.filters.http.oauth2, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.oauth2.v3.OAuth2}}"#;

/// Envoy Gateway's shape: an empty filter, the config on one route.
const ROUTE_B: &str = r#"typed_per_filter_config: {envoy.filters.http.oauth2: {"@type": type.googleapis.com/envoy.extensions.filters.http.oauth2.v3.OAuth2PerRoute, config: {
  token_endpoint: {cluster: token, uri: "http://auth.test/token", timeout: 3s},
  retry_policy: {num_retries: 1, retry_on: "5xx", retry_back_off: {base_interval: 0.01s}},
  authorization_endpoint: "https://auth.test/authorize",
  redirect_uri: "https://app.test/eg/callback", auth_type: BASIC_AUTH,
  redirect_path_matcher: {path: {exact: /eg/callback}}, signout_path: {path: {exact: /eg/logout}},
  forward_id_token: {header: X-ID-Token}, disable_token_encryption: true, default_expires_in: 60s,
  csrf_token_expires_in: 300s, stat_prefix: eg_,
  cookie_configs: {bearer_token_cookie_config: {same_site: LAX}, id_token_cookie_config: {same_site: STRICT, path: /eg}},
  credentials: {client_id: client1, cookie_domain: app.test, token_secret: {name: tok}, hmac_secret: {name: hmac},
    cookie_names: {bearer_token: AccessToken-1, oauth_hmac: OauthHMAC-1, oauth_expires: OauthExpires-1, id_token: IdToken-1, refresh_token: RefreshToken-1, oauth_nonce: OauthNonce-1}}}}}"#;

fn bootstrap(admin: u16, port: u16, app: u16, token: u16, filter: &str, routes: &str) -> String {
    format!(
        r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
static_resources:
  secrets:
  - {{name: hmac, generic_secret: {{secret: {{inline_string: "{HMAC_SECRET}"}}}}}}
  - {{name: tok, generic_secret: {{secret: {{inline_bytes: "{}"}}}}}}
  listeners:
  - name: oauth2
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: hcm
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: oauth2
          route_config:
            virtual_hosts: [{{name: v, domains: ["*"], routes: [{routes}]}}]
          http_filters:
          - {filter}
          - {{name: r, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}
  clusters:
  - {{name: app, connect_timeout: 1s, load_assignment: {{cluster_name: app, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {app}}}}}}}}}]}}]}}}}
  - {{name: token, connect_timeout: 1s, load_assignment: {{cluster_name: token, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {token}}}}}}}}}]}}]}}}}
"#,
        STANDARD.encode(CLIENT_SECRET)
    )
}

type Transcript = Vec<(&'static str, String)>;

/// The verdicts of checks that failed.
const BROKEN: &[&str] = &["INVALID", "MISMATCH", "UNSIGNED", "DIFFERS", "<verifier "];

/// Config A's flow: sign-in, the signed-in request, refresh, sign-out and
/// the refusals. `envoy_login`: the login cookies Envoy's run minted.
fn flow_a(
    port: u16,
    admin: u16,
    flow: &Mutex<Flow>,
    tokens: &Mutex<Vec<String>>,
    envoy_login: &Mutex<Option<String>>,
) -> Transcript {
    let xfp = ("x-forwarded-proto", "https");
    let mut t: Transcript = Vec::new();
    let token_call = |t: &mut Transcript, name| {
        let calls = std::mem::take(&mut *tokens.lock().unwrap());
        t.push((name, calls.join(" || ")));
    };
    let login = request(port, "/app/page?x=1&y=%20", &[xfp]);
    t.push(("redirect-to-provider", show(&login, flow)));
    let state = login
        .one("location")
        .split('&')
        .find_map(|p| p.strip_prefix("state="))
        .unwrap_or("")
        .to_string();
    let flow_cookies = login.cookies();
    let cb = request(
        port,
        &format!("/callback?state={state}&code=abc"),
        &[xfp, ("cookie", &flow_cookies)],
    );
    t.push(("callback", show(&cb, flow)));
    token_call(&mut t, "code-exchange-request");
    let signed_in = format!("{}; other=1", cb.cookies());
    t.push((
        "signed-in",
        upstream_view(&request(
            port,
            "/app/page",
            &[xfp, ("cookie", &signed_in), ("authorization", "Basic x")],
        )),
    ));
    t.push((
        "callback-when-signed-in",
        show(
            &request(
                port,
                &format!("/callback?state={state}&code=abc"),
                &[xfp, ("cookie", &format!("{signed_in}; {flow_cookies}"))],
            ),
            flow,
        ),
    ));
    let mut mine = envoy_login.lock().unwrap();
    let envoys = mine.get_or_insert_with(|| signed_in.clone()).clone();
    drop(mine);
    t.push((
        "signed-in-with-envoys-cookies",
        upstream_view(&request(port, "/app/page", &[xfp, ("cookie", &envoys)])),
    ));
    let forged = signed_in.replace("OauthExpires=", "OauthExpires=1");
    t.push((
        "forged-expiry",
        show(
            &request(port, "/app/page", &[xfp, ("cookie", &forged)]),
            flow,
        ),
    ));
    let refresh = request(
        port,
        "/app/refresh",
        &[
            xfp,
            (
                "cookie",
                "RefreshToken=refresh-1; BearerToken=old; IdToken=old-id",
            ),
        ],
    );
    let set: Vec<&str> = refresh.all("set-cookie");
    let set: Vec<String> = set
        .iter()
        .map(|c| show_set_cookie(c, &set, "app.test"))
        .collect();
    t.push((
        "refresh",
        format!(
            "{} | set-cookie {}",
            upstream_view(&refresh),
            set.join(" | ")
        ),
    ));
    token_call(&mut t, "refresh-request");
    // The browser no longer sends the expired access token: the new one
    // goes upstream all the same.
    let bare = request(
        port,
        "/app/refresh",
        &[xfp, ("cookie", "RefreshToken=refresh-1")],
    );
    t.push(("refresh-only-the-refresh-token", upstream_view(&bare)));
    token_call(&mut t, "second-refresh-request");
    let forged_only = forged.replace("; other=1", "");
    t.push((
        "allow-failed",
        upstream_view(&request(
            port,
            "/app/x",
            &[
                xfp,
                ("x-allow-failed", "1"),
                ("cookie", &forged_only.replace("RefreshToken=", "Gone=")),
            ],
        )),
    ));
    t.push((
        "sign-out",
        show_sorted(
            &request(
                port,
                "/signout",
                &[
                    xfp,
                    (
                        "cookie",
                        &format!("{signed_in}; OauthNonce.0123456789abcdef=x; CodeVerifier=y"),
                    ),
                ],
            ),
            flow,
        ),
    ));
    t.push((
        "pass-through",
        upstream_view(&request(
            port,
            "/app",
            &[
                xfp,
                ("x-pass", "1"),
                ("authorization", "Bearer mine"),
                ("cookie", "BearerToken=zz"),
            ],
        )),
    ));
    t.push((
        "deny-redirect",
        show(
            &request(port, "/app", &[xfp, ("x-requested-with", "XMLHttpRequest")]),
            flow,
        ),
    ));
    t.push((
        "callback-without-nonce",
        show(
            &request(port, &format!("/callback?code=abc&state={state}"), &[xfp]),
            flow,
        ),
    ));
    t.push((
        "callback-provider-error",
        show(
            &request(
                port,
                &format!("/callback?error=access_denied&state={state}"),
                &[xfp, ("cookie", &flow_cookies)],
            ),
            flow,
        ),
    ));
    t.push((
        "callback-missing-code",
        show(
            &request(
                port,
                &format!("/callback?state={state}"),
                &[xfp, ("cookie", &flow_cookies)],
            ),
            flow,
        ),
    ));
    t.push((
        "callback-bad-state",
        show(
            &request(
                port,
                "/callback?code=abc&state=e30",
                &[xfp, ("cookie", &flow_cookies)],
            ),
            flow,
        ),
    ));
    let again = request(port, "/app/two", &[("x-forwarded-proto", "http")]);
    t.push(("redirect-plain-http", show(&again, flow)));
    let state2 = again
        .one("location")
        .split('&')
        .find_map(|p| p.strip_prefix("state="))
        .unwrap_or("")
        .to_string();
    let failed = request(
        port,
        &format!("/callback?code=fail&state={state2}"),
        &[xfp, ("cookie", &again.cookies())],
    );
    t.push(("token-endpoint-fails", show(&failed, flow)));
    token_call(&mut t, "failed-exchange-request");
    t.push(("stats", oauth_stats(admin)));
    t
}

/// The filter's counters as the admin's `/stats` shows them.
fn oauth_stats(admin: u16) -> String {
    let get = || request(admin, "/stats?filter=oauth_", &[]);
    let mut r = get();
    // Counters reach the admin after a short flush interval.
    for _ in 0..20 {
        if r.body.contains("oauth_") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        r = get();
    }
    let mut lines: Vec<&str> = r.body.lines().filter(|l| l.contains("oauth_")).collect();
    lines.sort();
    lines.join(", ")
}

/// Config B's flow: Envoy Gateway's shape (per-route config, Basic
/// authentication, plaintext cookies with their own names and domain).
fn flow_b(port: u16, admin: u16, flow: &Mutex<Flow>, tokens: &Mutex<Vec<String>>) -> Transcript {
    let mut t: Transcript = Vec::new();
    t.push((
        "unprotected-route",
        upstream_view(&request(
            port,
            "/open",
            &[("cookie", "a=1"), ("authorization", "Bearer keep")],
        )),
    ));
    let login = request(port, "/eg/page", &[]);
    t.push(("eg-redirect", show(&login, flow)));
    let state = login
        .one("location")
        .split('&')
        .find_map(|p| p.strip_prefix("state="))
        .unwrap_or("")
        .to_string();
    let cb = request(
        port,
        &format!("/eg/callback?code=abc&state={state}"),
        &[("cookie", &login.cookies())],
    );
    t.push(("eg-callback", show(&cb, flow)));
    t.push((
        "eg-code-exchange-request",
        std::mem::take(&mut *tokens.lock().unwrap()).join(" || "),
    ));
    t.push((
        "eg-signed-in",
        upstream_view(&request(
            port,
            "/eg/page",
            &[("cookie", &cb.cookies()), ("x-id-token", "spoofed")],
        )),
    ));
    t.push((
        "eg-sign-out",
        show(
            &request(port, "/eg/logout", &[("cookie", &cb.cookies())]),
            flow,
        ),
    ));
    t.push(("eg-stats", oauth_stats(admin)));
    t
}

pub async fn run(bins: &Binaries, work: &std::path::Path, report: &mut Report) -> Result<()> {
    let app = legate_tests::echo::start("app", "127.0.0.1:0".parse()?).await?;
    let flow = Arc::new(Mutex::new(Flow::default()));
    let (token, tokens) = token_server(flow.clone())?;
    let envoy_login = Mutex::new(None);
    let cases: [(&str, String); 2] = [
        ("filter-config", "{match: {prefix: /}, route: {cluster: app}}".to_string()),
        ("per-route-config", format!("{{match: {{prefix: /eg}}, route: {{cluster: app}}, {ROUTE_B}}}, {{match: {{prefix: /}}, route: {{cluster: app}}}}")),
    ];
    for (case, routes) in cases {
        let (port, admin) = (
            legate_tests::legate::free_port(),
            legate_tests::legate::free_port(),
        );
        let filter = if case == "filter-config" {
            FILTER_A
        } else {
            FILTER_B
        };
        let path = work.join(format!("oauth2-{case}.yaml"));
        std::fs::write(
            &path,
            bootstrap(admin, port, app.addr.port(), token, filter, &routes),
        )?;
        let answers = proxies::each(bins, &path, admin, work, || {
            if case == "filter-config" {
                flow_a(port, admin, &flow, &tokens, &envoy_login)
            } else {
                flow_b(port, admin, &flow, &tokens)
            }
        })?;
        for ((name, e), (_, l)) in answers[0].iter().zip(answers[1].iter()) {
            // A check that failed on both sides fails too: equal is not
            // enough when neither signed or encrypted what it must.
            let broken = |s: &str| BROKEN.iter().any(|b| s.contains(b));
            let outcome = if broken(e) || broken(l) {
                Outcome::Mismatch(vec![format!("a check failed: envoy: {e} / legate: {l}")])
            } else {
                Outcome::compare(e, l)
            };
            report.add("http", &format!("oauth2-{case}"), name, outcome);
        }
    }
    Ok(())
}
