//! The filter on requests built here, with HS256 tokens signed here
//! against a local JWKS. Conformance (`filter-jwt-authn`) compares it with
//! Envoy on real traffic and every key type.

use super::*;
use crate::http_filters::Flow;
use pingora_http::RequestHeader;

const SECRET: &[u8] = b"a-test-secret-of-enough-length!!";

fn jwks() -> String {
    let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(SECRET);
    format!(r#"{{"keys":[{{"kty":"oct","kid":"k","alg":"HS256","k":"{k}"}}]}}"#)
}

fn sign(claims: &str) -> String {
    let b = |s: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let input = format!(
        "{}.{}",
        b(br#"{"alg":"HS256","kid":"k"}"#),
        b(claims.as_bytes())
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET);
    let tag = ring::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", b(tag.as_ref()))
}

fn filter(extra: &str) -> Arc<dyn HttpFilter> {
    let yaml = format!(
        r#"
providers:
  p:
    issuer: https://issuer.test
    audiences: [api.test]
    local_jwks: {{inline_string: '{jwks}'}}
    forward_payload_header: x-payload
    claim_to_headers: [{{header_name: x-sub, claim_name: sub}}, {{header_name: x-n, claim_name: nested.n}}]
    payload_in_metadata: pl
    normalize_payload_in_metadata: {{space_delimited_claims: [scope]}}
  q:
    issuer: https://other.test
    local_jwks: {{inline_string: '{jwks}'}}
    from_headers: [{{name: x-jwt}}]
    forward: true
requirement_map:
  p_only: {{provider_name: p}}
  p_or_missing: {{requires_any: {{requirements: [{{provider_name: p}}, {{allow_missing: {{}}}}]}}}}
rules:
  - match: {{prefix: /open}}
  - match: {{prefix: /either}}
    requires: {{requires_any: {{requirements: [{{provider_name: p}}, {{provider_name: q}}]}}}}
  - match: {{prefix: /}}
    requirement_name: p_only
{extra}"#,
        jwks = jwks()
    );
    let v = legate_proto::json::parse_yaml(&yaml).unwrap();
    let c: pb::JwtAuthentication = legate_proto::json::to_message(v, TYPE, true).unwrap();
    let any = Any {
        type_url: format!("type.googleapis.com/{TYPE}"),
        value: prost::Message::encode_to_vec(&c),
    };
    build(&any, "test", "f").unwrap()
}

struct Outcome {
    flow: Flow,
    req: RequestHeader,
    metadata: super::super::Metadata,
}

fn run(f: &Arc<dyn HttpFilter>, path: &str, headers: &[(&str, &str)]) -> Outcome {
    let mut req = RequestHeader::build("GET", path.as_bytes(), None).unwrap();
    req.insert_header("host", "h.test").unwrap();
    for (k, v) in headers {
        req.append_header(k.to_string(), *v).unwrap();
    }
    let runtime = crate::runtime::Runtime::default();
    let clusters = Arc::new(crate::cluster_manager::ClusterManager::default());
    let mut metadata = super::super::Metadata::new();
    let mut fs = http::Extensions::new();
    let flow = {
        let mut info = RequestInfo {
            req: &mut req,
            remote: None,
            direct_remote: None,
            local: None,
            peer_tls: None,
            sni: "",
            scheme: "http",
            grpc: false,
            end_of_stream: true,
            body: None,
            filter_state: &mut fs,
            per_route: [None; 4],
            cluster: Some("c"),
            forwards: true,
            has_route: true,
            route_metadata: None,
            clear_route_cache: false,
            runtime: &runtime,
            flags: Vec::new(),
            route_rate_limits: &[],
            vhost_rate_limits: &[],
            include_vh_rate_limits: false,
            service_cluster: "",
            clusters: &clusters,
            metadata: &mut metadata,
            health_failed: false,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(f.on_request(&mut info, &mut None))
    };
    Outcome {
        flow,
        req,
        metadata,
    }
}

fn reply(o: &Outcome) -> (u16, String, String, String) {
    let Flow::Reply(r) = &o.flow else {
        panic!("expected a reply")
    };
    let challenge = r
        .headers
        .iter()
        .find(|(k, _)| k == http::header::WWW_AUTHENTICATE)
        .map(|(_, v)| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (
        r.status,
        String::from_utf8_lossy(&r.body).into_owned(),
        challenge,
        r.details.to_string(),
    )
}

fn exp(offset: i64) -> i64 {
    tests_now() + offset
}

fn tests_now() -> i64 {
    now().0 as i64
}

#[test]
fn missing_bad_expired_and_wrong_audience() {
    let f = filter("");
    let (status, body, challenge, details) = reply(&run(&f, "/x?q=1", &[]));
    assert_eq!(status, 401);
    assert_eq!(body, "Jwt is missing");
    assert_eq!(challenge, r#"Bearer realm="http://h.test/x?q=1""#);
    assert_eq!(details, "jwt_authn_access_denied{Jwt_is_missing}");

    let bad = run(&f, "/x", &[("authorization", "Bearer abc")]);
    let (status, body, challenge, _) = reply(&bad);
    assert_eq!(
        (status, body.as_str()),
        (401, Status::JwtBadFormat.to_string().as_str())
    );
    assert!(challenge.ends_with(r#", error="invalid_token""#));

    let t = sign(&format!(
        r#"{{"iss":"https://issuer.test","aud":"api.test","exp":{}}}"#,
        exp(-120)
    ));
    let o = run(&f, "/x", &[("authorization", &format!("Bearer {t}"))]);
    assert_eq!(reply(&o).1, "Jwt is expired");

    let t = sign(r#"{"iss":"https://issuer.test","aud":"other"}"#);
    let o = run(&f, "/x", &[("authorization", &format!("Bearer {t}"))]);
    assert_eq!(reply(&o).0, 403);
    assert_eq!(reply(&o).1, "Audiences in Jwt are not allowed");

    let t = sign(r#"{"iss":"https://nobody.test","aud":"api.test"}"#);
    let o = run(&f, "/x", &[("authorization", &format!("Bearer {t}"))]);
    assert_eq!(reply(&o).1, "Jwt issuer is not configured");
}

#[test]
fn a_good_token_forwards_its_outputs() {
    let f = filter("");
    let t = sign(
        r#"{"iss":"https://issuer.test","aud":["x","https://api.test/"],"sub":"alice","nested":{"n":7},"scope":"read  write"}"#,
    );
    let o = run(
        &f,
        "/x",
        &[
            ("authorization", &format!("Bearer {t}")),
            ("x-sub", "forged"),
        ],
    );
    assert!(matches!(o.flow, Flow::Continue));
    // forward: false (the default) strips the token's header.
    assert!(o.req.headers.get("authorization").is_none());
    let subs: Vec<_> = o.req.headers.get_all("x-sub").iter().collect();
    assert_eq!(subs, ["alice"], "the client's x-sub is removed first");
    assert_eq!(o.req.headers["x-n"], "7");
    assert_eq!(o.req.headers["x-payload"], t.split('.').nth(1).unwrap());
    let md = &o.metadata[NAMESPACE]["pl"];
    assert_eq!(md["sub"], "alice");
    assert_eq!(md["scope"], serde_json::json!(["read", "write"]));
}

#[test]
fn rules_any_and_per_route() {
    let f = filter("");
    assert!(matches!(run(&f, "/open", &[]).flow, Flow::Continue));
    // requires_any: q's token in x-jwt satisfies it; with none, the
    // failure is "missing".
    let t = sign(r#"{"iss":"https://other.test"}"#);
    let o = run(&f, "/either", &[("x-jwt", &t)]);
    assert!(matches!(o.flow, Flow::Continue));
    assert_eq!(o.req.headers["x-jwt"], t.as_str(), "q forwards");
    assert_eq!(reply(&run(&f, "/either", &[])).1, "Jwt is missing");
    // A token of the wrong issuer in q's header: q says unknown issuer,
    // p says missing; the issuer failure wins.
    let t = sign(r#"{"iss":"https://issuer.test","aud":"api.test"}"#);
    assert_eq!(
        reply(&run(&f, "/either", &[("x-jwt", &t)])).1,
        "Jwt issuer is not configured"
    );
}

#[test]
fn a_rule_naming_an_unknown_requirement_is_a_config_error() {
    let yaml = r#"
providers: {p: {issuer: i, local_jwks: {inline_string: '{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}'}}}
requirement_map: {a: {provider_name: p}}
rules: [{match: {prefix: /}, requirement_name: nope}]
"#;
    let v = legate_proto::json::parse_yaml(yaml).unwrap();
    let c: pb::JwtAuthentication = legate_proto::json::to_message(v, TYPE, true).unwrap();
    let e = Config::from_proto(&c, "f").unwrap_err();
    assert_eq!(
        e.message,
        "Wrong requirement_name: nope. It should be one of [a]"
    );
    let v =
        legate_proto::json::parse_yaml(r#"{providers: {p: {local_jwks: {inline_string: 'x'}}}}"#)
            .unwrap();
    let c: pb::JwtAuthentication = legate_proto::json::to_message(v, TYPE, true).unwrap();
    let e = Config::from_proto(&c, "f").unwrap_err();
    assert!(
        e.message
            .contains("invalid local jwks: Jwks is an invalid JSON"),
        "{e:?}"
    );
}

#[test]
fn claim_values_as_envoy_writes_them() {
    let p: Map<String, Value> = serde_json::from_str(
        r#"{"s":"x","e":"","i":3,"f":1.5,"b":true,"a":[1],"o":{"k":{"z":null}}}"#,
    )
    .unwrap();
    let c = |path: &str| claim_value(&p, &path.split('.').map(str::to_string).collect::<Vec<_>>());
    assert_eq!(c("s").as_deref(), Some("x"));
    assert_eq!(c("e"), None);
    assert_eq!(c("i").as_deref(), Some("3"));
    assert_eq!(c("f").as_deref(), Some("1.500000"));
    assert_eq!(c("b").as_deref(), Some("true"));
    assert_eq!(c("a").as_deref(), Some("WzFd"));
    assert_eq!(c("o.k.z"), None);
    assert_eq!(c("s.x"), None);
}
