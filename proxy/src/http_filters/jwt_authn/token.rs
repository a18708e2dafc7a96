//! A JWT parsed as jwt_verify_lib parses it: three base64url sections,
//! a JSON header with a supported `alg`, a JSON payload whose registered
//! claims have the right types, and the signature's bytes.

use super::status::Status;
use base64::Engine;
use serde_json::{Map, Value};

/// The algorithms a token may name (anything else is
/// `JwtHeaderNotImplementedAlg`).
pub const ALGORITHMS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "HS256",
    "HS384", "HS512", "EdDSA",
];

#[derive(Debug, Clone)]
pub struct Jwt {
    pub alg: String,
    pub kid: String,
    pub iss: String,
    /// The header, as sent (for `header_in_metadata`).
    pub header: Map<String, Value>,
    pub audiences: Vec<String>,
    /// 0 when absent.
    pub nbf: u64,
    pub exp: u64,
    /// The payload, as sent (for `payload_in_metadata`, claim headers).
    pub payload: Map<String, Value>,
    /// The payload section as it came (base64url, for the forwarded
    /// payload header).
    pub payload_b64: String,
    /// `header.payload`, what the signature signs.
    pub signed: String,
    pub signature: Vec<u8>,
}

/// base64url, with or without padding, as absl's web-safe decoder reads it.
pub fn b64url(s: &str) -> Option<Vec<u8>> {
    use base64::engine::{
        general_purpose, DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig,
    };
    // absl's web-safe decoder: whitespace anywhere is skipped, padding is
    // optional, and stray low bits in the last character are accepted.
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        GeneralPurposeConfig::new()
            .with_decode_padding_mode(DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true),
    );
    let _ = general_purpose::URL_SAFE_NO_PAD;
    let compact: String = s
        .chars()
        .filter(|c| !" \t\n\x0b\x0c\r".contains(*c))
        .collect();
    LENIENT.decode(compact).ok()
}

/// A JSON object; `null` reads as an empty one, as protobuf's Struct
/// parser reads it.
fn object(bytes: &[u8]) -> Option<Map<String, Value>> {
    match serde_json::from_slice(bytes).ok()? {
        Value::Object(m) => Some(m),
        Value::Null => Some(Map::new()),
        _ => None,
    }
}

/// A claim that must be a string when present.
fn string(m: &Map<String, Value>, key: &str, bad: Status) -> Result<String, Status> {
    match m.get(key) {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(bad),
    }
}

/// A time claim: a non-negative number below 2^64 when present.
fn seconds(
    m: &Map<String, Value>,
    key: &str,
    not_int: Status,
    range: Status,
) -> Result<u64, Status> {
    match m.get(key) {
        None => Ok(0),
        Some(Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
            (Some(v), _) => Ok(v),
            (None, Some(f)) if (0.0..18_446_744_073_709_551_616.0).contains(&f) => Ok(f as u64),
            _ => Err(range),
        },
        Some(_) => Err(not_int),
    }
}

impl Jwt {
    pub fn parse(token: &str) -> Result<Jwt, Status> {
        // Empty sections are skipped before counting, as absl's split
        // with SkipEmpty does.
        let parts: Vec<&str> = token.split('.').filter(|p| !p.is_empty()).collect();
        let [h, p, s] = parts[..] else {
            return Err(Status::JwtBadFormat);
        };
        let header = b64url(h).ok_or(Status::JwtHeaderParseErrorBadBase64)?;
        let header = object(&header).ok_or(Status::JwtHeaderParseErrorBadJson)?;
        let alg = match header.get("alg") {
            Some(Value::String(a)) => a.clone(),
            _ => return Err(Status::JwtHeaderBadAlg),
        };
        if !ALGORITHMS.contains(&alg.as_str()) {
            return Err(Status::JwtHeaderNotImplementedAlg);
        }
        let kid = string(&header, "kid", Status::JwtHeaderBadKid)?;
        let payload = b64url(p).ok_or(Status::JwtPayloadParseErrorBadBase64)?;
        let payload = object(&payload).ok_or(Status::JwtPayloadParseErrorBadJson)?;
        let iss = string(&payload, "iss", Status::JwtPayloadParseErrorIssNotString)?;
        string(&payload, "sub", Status::JwtPayloadParseErrorSubNotString)?;
        seconds(
            &payload,
            "iat",
            Status::JwtPayloadParseErrorIatNotInteger,
            Status::JwtPayloadParseErrorIatOutOfRange,
        )?;
        let nbf = seconds(
            &payload,
            "nbf",
            Status::JwtPayloadParseErrorNbfNotInteger,
            Status::JwtPayloadParseErrorNbfOutOfRange,
        )?;
        let exp = seconds(
            &payload,
            "exp",
            Status::JwtPayloadParseErrorExpNotInteger,
            Status::JwtPayloadParseErrorExpOutOfRange,
        )?;
        string(&payload, "jti", Status::JwtPayloadParseErrorJtiNotString)?;
        let audiences = match payload.get("aud") {
            None => Vec::new(),
            Some(Value::String(a)) => vec![a.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or(Status::JwtPayloadParseErrorAudNotString)?,
            Some(_) => return Err(Status::JwtPayloadParseErrorAudNotString),
        };
        let signature = b64url(s).ok_or(Status::JwtSignatureParseErrorBadBase64)?;
        Ok(Jwt {
            alg,
            kid,
            iss,
            header,
            audiences,
            nbf,
            exp,
            payload,
            payload_b64: p.to_string(),
            signed: format!("{h}.{p}"),
            signature,
        })
    }

    /// `nbf` and `exp` against `now`, each allowed `skew` seconds.
    pub fn check_time(&self, now: u64, skew: u64) -> Result<(), Status> {
        if self.nbf > now.saturating_add(skew) {
            return Err(Status::JwtNotYetValid);
        }
        if self.exp != 0 && self.exp.saturating_add(skew) < now {
            return Err(Status::JwtExpired);
        }
        Ok(())
    }
}

/// An audience as jwt_verify_lib compares it: without an `http://` or
/// `https://` scheme and without a trailing slash.
fn sanitize(aud: &str) -> &str {
    let a = aud
        .strip_prefix("http://")
        .or_else(|| aud.strip_prefix("https://"))
        .unwrap_or(aud);
    a.strip_suffix('/').unwrap_or(a)
}

/// Whether a token's audiences meet a provider's: any when none are
/// configured, else at least one in common.
pub fn audiences_allowed(configured: &[String], token: &[String]) -> bool {
    configured.is_empty()
        || token
            .iter()
            .any(|t| configured.iter().any(|c| sanitize(c) == sanitize(t)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(v: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
    }

    fn token(header: &str, payload: &str) -> String {
        format!("{}.{}.c2ln", enc(header), enc(payload))
    }

    #[test]
    fn parse_errors_in_jwt_verify_lib_order() {
        let ok = r#"{"alg":"RS256"}"#;
        for (t, want) in [
            ("a.b".to_string(), Status::JwtBadFormat),
            ("a..b".to_string(), Status::JwtBadFormat),
            ("a..b.c".to_string(), Status::JwtHeaderParseErrorBadBase64),
            (
                "%%%.e30.c2ln".to_string(),
                Status::JwtHeaderParseErrorBadBase64,
            ),
            (token("[1]", "{}"), Status::JwtHeaderParseErrorBadJson),
            (token("{}", "{}"), Status::JwtHeaderBadAlg),
            (
                token(r#"{"alg":"none"}"#, "{}"),
                Status::JwtHeaderNotImplementedAlg,
            ),
            (
                token(r#"{"alg":"RS256","kid":1}"#, "{}"),
                Status::JwtHeaderBadKid,
            ),
            (token(ok, "nope"), Status::JwtPayloadParseErrorBadJson),
            (
                token(ok, r#"{"iss":1}"#),
                Status::JwtPayloadParseErrorIssNotString,
            ),
            (
                token(ok, r#"{"exp":"x"}"#),
                Status::JwtPayloadParseErrorExpNotInteger,
            ),
            (
                token(ok, r#"{"exp":-1}"#),
                Status::JwtPayloadParseErrorExpOutOfRange,
            ),
            (
                token(ok, r#"{"aud":[1]}"#),
                Status::JwtPayloadParseErrorAudNotString,
            ),
        ] {
            assert_eq!(Jwt::parse(&t).unwrap_err(), want, "{t}");
        }
        let j = Jwt::parse(&token(ok, r#"{"iss":"i","aud":"a","exp":5,"nbf":2}"#)).unwrap();
        assert_eq!((j.iss.as_str(), j.exp, j.nbf), ("i", 5, 2));
        assert_eq!(j.audiences, vec!["a"]);
        assert_eq!(j.signature, b"sig");
    }

    #[test]
    fn time_and_audiences() {
        let j = Jwt::parse(&token(r#"{"alg":"RS256"}"#, r#"{"exp":1000,"nbf":900}"#)).unwrap();
        assert_eq!(j.check_time(1000, 60), Ok(()));
        assert_eq!(j.check_time(1061, 60), Err(Status::JwtExpired));
        assert_eq!(j.check_time(839, 60), Err(Status::JwtNotYetValid));
        let c = vec!["https://foo.com/".to_string()];
        assert!(audiences_allowed(&c, &["foo.com".into()]));
        assert!(!audiences_allowed(&c, &[]));
        assert!(audiences_allowed(&[], &[]));
    }
}
