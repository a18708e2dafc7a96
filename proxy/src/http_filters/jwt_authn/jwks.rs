//! JSON Web Key Sets, read as jwt_verify_lib reads them (a key that does
//! not parse is skipped; a set without any usable key is an error), and
//! a token's signature checked against them: ring for RSA (PKCS#1 and
//! PSS), P-256/P-384 ECDSA, Ed25519 and HMAC; the `p521` crate for
//! ES512, which ring lacks.

use super::status::Status;
use super::token::{b64url, Jwt};
use ring::signature::{self as sig, UnparsedPublicKey};
use serde_json::{Map, Value};

#[derive(Debug, Clone)]
enum Key {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// An uncompressed point (0x04 ‖ x ‖ y) on `crv`.
    Ec {
        crv: Curve,
        point: Vec<u8>,
    },
    Oct(Vec<u8>),
    Ed25519(Vec<u8>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Curve {
    P256,
    P384,
    P521,
}

impl Curve {
    fn coordinate_len(self) -> usize {
        match self {
            Curve::P256 => 32,
            Curve::P384 => 48,
            Curve::P521 => 66,
        }
    }
}

#[derive(Debug, Clone)]
struct Jwk {
    kid: String,
    alg: String,
    key: Key,
}

/// A parsed key set.
#[derive(Debug, Clone)]
pub struct Jwks(Vec<Jwk>);

fn field<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    m.get(k).and_then(Value::as_str)
}

/// A base64url field, required.
fn bytes(m: &Map<String, Value>, k: &str) -> Option<Vec<u8>> {
    field(m, k).and_then(b64url).filter(|b| !b.is_empty())
}

fn jwk(m: &Map<String, Value>) -> Option<Jwk> {
    let kty = field(m, "kty")?;
    let kid = match m.get("kid") {
        None => String::new(),
        Some(v) => v.as_str()?.to_string(),
    };
    let alg = match m.get("alg") {
        None => String::new(),
        Some(v) => v.as_str()?.to_string(),
    };
    let alg_is = |prefix: &str| alg.is_empty() || alg.starts_with(prefix);
    let key = match kty {
        "RSA" if alg_is("RS") || alg_is("PS") => Key::Rsa {
            n: bytes(m, "n")?,
            e: bytes(m, "e")?,
        },
        "EC" if alg_is("ES") => {
            let from_alg = match alg.as_str() {
                "ES256" | "" => Curve::P256,
                "ES384" => Curve::P384,
                "ES512" => Curve::P521,
                _ => return None,
            };
            let crv = match field(m, "crv") {
                None => from_alg,
                Some("P-256") => Curve::P256,
                Some("P-384") => Curve::P384,
                Some("P-521") => Curve::P521,
                Some(_) => return None,
            };
            if !alg.is_empty() && crv != from_alg {
                return None;
            }
            let (x, y) = (bytes(m, "x")?, bytes(m, "y")?);
            let n = crv.coordinate_len();
            if x.len() > n || y.len() > n {
                return None;
            }
            // Coordinates shorter than the field are left-padded.
            let mut point = vec![4u8];
            for c in [&x, &y] {
                point.extend(std::iter::repeat_n(0, n - c.len()));
                point.extend_from_slice(c);
            }
            Key::Ec { crv, point }
        }
        "oct" if alg_is("HS") => Key::Oct(bytes(m, "k")?),
        "OKP" if alg.is_empty() || alg == "EdDSA" => {
            if field(m, "crv") != Some("Ed25519") {
                return None;
            }
            let x = bytes(m, "x")?;
            (x.len() == 32).then_some(Key::Ed25519(x))?
        }
        _ => return None,
    };
    Some(Jwk { kid, alg, key })
}

impl Jwks {
    pub fn parse(text: &[u8]) -> Result<Jwks, Status> {
        let v: Value = serde_json::from_slice(text).map_err(|_| Status::JwksParseError)?;
        let Value::Object(doc) = v else {
            return Err(Status::JwksParseError);
        };
        let keys = match doc.get("keys") {
            None => return Err(Status::JwksNoKeys),
            Some(Value::Array(k)) => k,
            Some(_) => return Err(Status::JwksBadKeys),
        };
        let keys: Vec<Jwk> = keys
            .iter()
            .filter_map(Value::as_object)
            .filter_map(jwk)
            .collect();
        if keys.is_empty() {
            return Err(Status::JwksNoValidKeys);
        }
        Ok(Jwks(keys))
    }

    /// Checks `jwt`'s signature with the keys its `kid` and `alg` allow.
    pub fn verify(&self, jwt: &Jwt) -> Result<(), Status> {
        let mut matched = false;
        for k in &self.0 {
            if !jwt.kid.is_empty() && !k.kid.is_empty() && k.kid != jwt.kid {
                continue;
            }
            if !k.alg.is_empty() && k.alg != jwt.alg {
                continue;
            }
            matched = true;
            if verify_with(&k.key, &jwt.alg, jwt.signed.as_bytes(), &jwt.signature)? {
                return Ok(());
            }
        }
        Err(if matched {
            Status::JwtVerificationFail
        } else {
            Status::JwksKidAlgMismatch
        })
    }
}

/// One key against one token, as jwt_verify_lib pairs them: the key's
/// type picks the scheme and the token's `alg` only the digest, so an
/// alg-less key is tried whatever the token names.
fn verify_with(key: &Key, alg: &str, msg: &[u8], signature: &[u8]) -> Result<bool, Status> {
    let digest = |family: &str| match alg.strip_prefix(family) {
        Some("384") => 384,
        Some("512") => 512,
        _ => 256,
    };
    Ok(match key {
        Key::Rsa { n, e } => {
            let pss = alg.starts_with("PS");
            if !pss && !alg.starts_with("RS") {
                return Ok(false);
            }
            let scheme: &sig::RsaParameters = match (pss, digest(&alg[..2])) {
                (false, 384) => &sig::RSA_PKCS1_2048_8192_SHA384,
                (false, 512) => &sig::RSA_PKCS1_2048_8192_SHA512,
                (false, _) => &sig::RSA_PKCS1_2048_8192_SHA256,
                (true, 384) => &sig::RSA_PSS_2048_8192_SHA384,
                (true, 512) => &sig::RSA_PSS_2048_8192_SHA512,
                (true, _) => &sig::RSA_PSS_2048_8192_SHA256,
            };
            sig::RsaPublicKeyComponents { n, e }
                .verify(scheme, msg, signature)
                .is_ok()
        }
        Key::Ec { crv, point } => ecdsa(*crv, digest("ES"), point, msg, signature),
        Key::Oct(secret) => {
            let a = match digest("HS") {
                384 => ring::hmac::HMAC_SHA384,
                512 => ring::hmac::HMAC_SHA512,
                _ => ring::hmac::HMAC_SHA256,
            };
            ring::hmac::verify(&ring::hmac::Key::new(a, secret), msg, signature).is_ok()
        }
        Key::Ed25519(x) => {
            if signature.len() != 64 {
                return Err(Status::JwtEd25519SignatureWrongLength);
            }
            UnparsedPublicKey::new(&sig::ED25519, x)
                .verify(msg, signature)
                .is_ok()
        }
    })
}

/// ECDSA with a JWS (r ‖ s) signature. The curve and the digest are
/// paired as the token's `alg` and the key say; pairs ring has only in
/// ASN.1 form get their signature re-encoded.
fn ecdsa(crv: Curve, digest: u16, point: &[u8], msg: &[u8], signature: &[u8]) -> bool {
    if signature.len() != 2 * crv.coordinate_len() {
        return false;
    }
    let fixed: &sig::EcdsaVerificationAlgorithm = match (crv, digest) {
        (Curve::P256, 256) => &sig::ECDSA_P256_SHA256_FIXED,
        (Curve::P384, 384) => &sig::ECDSA_P384_SHA384_FIXED,
        (Curve::P256, 384) => {
            return asn1(&sig::ECDSA_P256_SHA384_ASN1, point, msg, signature);
        }
        (Curve::P384, 256) => {
            return asn1(&sig::ECDSA_P384_SHA256_ASN1, point, msg, signature);
        }
        (Curve::P521, 512) => return p521(point, msg, signature),
        _ => return false,
    };
    UnparsedPublicKey::new(fixed, point)
        .verify(msg, signature)
        .is_ok()
}

fn asn1(
    alg: &'static sig::EcdsaVerificationAlgorithm,
    point: &[u8],
    msg: &[u8],
    rs: &[u8],
) -> bool {
    let (r, s) = rs.split_at(rs.len() / 2);
    UnparsedPublicKey::new(alg, point)
        .verify(msg, &der_signature(r, s))
        .is_ok()
}

/// `SEQUENCE { INTEGER r, INTEGER s }`.
fn der_signature(r: &[u8], s: &[u8]) -> Vec<u8> {
    fn integer(v: &[u8]) -> Vec<u8> {
        let v = &v[v
            .iter()
            .position(|b| *b != 0)
            .unwrap_or(v.len().saturating_sub(1))..];
        let mut out = vec![2u8];
        let pad = v.first().is_some_and(|b| b & 0x80 != 0);
        out.push((v.len() + usize::from(pad)) as u8);
        if pad {
            out.push(0);
        }
        out.extend_from_slice(v);
        out
    }
    let body = [integer(r), integer(s)].concat();
    let mut out = vec![0x30u8];
    if body.len() >= 0x80 {
        out.push(0x81);
    }
    out.push(body.len() as u8);
    out.extend(body);
    out
}

fn p521(point: &[u8], msg: &[u8], signature: &[u8]) -> bool {
    use p521::ecdsa::signature::Verifier;
    let Ok(key) = p521::ecdsa::VerifyingKey::from_sec1_bytes(point) else {
        return false;
    };
    let Ok(s) = p521::ecdsa::Signature::from_slice(signature) else {
        return false;
    };
    key.verify(msg, &s).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_skip_bad_keys_and_fail_without_good_ones() {
        assert_eq!(Jwks::parse(b"x").unwrap_err(), Status::JwksParseError);
        assert_eq!(Jwks::parse(b"{}").unwrap_err(), Status::JwksNoKeys);
        assert_eq!(
            Jwks::parse(br#"{"keys":{}}"#).unwrap_err(),
            Status::JwksBadKeys
        );
        assert_eq!(
            Jwks::parse(br#"{"keys":[{"kty":"RSA","alg":"ES256","n":"AQ","e":"AQ"}]}"#)
                .unwrap_err(),
            Status::JwksNoValidKeys
        );
        let j = Jwks::parse(
            br#"{"keys":[{"kty":"XX"},{"kty":"oct","kid":"a","k":"c2VjcmV0"},
                          {"kty":"EC","crv":"P-384","alg":"ES256","x":"AQ","y":"AQ"}]}"#,
        )
        .unwrap();
        assert_eq!(j.0.len(), 1);
    }

    #[test]
    fn hmac_and_kid_matching() {
        use base64::Engine;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks =
            Jwks::parse(br#"{"keys":[{"kty":"oct","kid":"a","alg":"HS256","k":"c2VjcmV0"}]}"#)
                .unwrap();
        let signed = format!("{}.{}", b64(br#"{"alg":"HS256","kid":"a"}"#), b64(b"{}"));
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"secret");
        let tag = ring::hmac::sign(&key, signed.as_bytes());
        let jwt = Jwt::parse(&format!("{signed}.{}", b64(tag.as_ref()))).unwrap();
        assert_eq!(jwks.verify(&jwt), Ok(()));
        let mut other = jwt.clone();
        other.kid = "b".into();
        assert_eq!(jwks.verify(&other), Err(Status::JwksKidAlgMismatch));
        let mut bad = jwt.clone();
        bad.signature[0] ^= 1;
        assert_eq!(jwks.verify(&bad), Err(Status::JwtVerificationFail));
    }

    #[test]
    fn der_signature_pads_high_bits() {
        assert_eq!(
            der_signature(&[0, 0x80], &[1]),
            vec![0x30, 7, 2, 2, 0, 0x80, 2, 1, 1]
        );
    }
}
