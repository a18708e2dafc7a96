//! JWTs made at test time: signing keys generated per run (RSA by the
//! `openssl` tool, EC and Ed25519 by ring, an HMAC secret from the system
//! RNG), their JWKS, tokens signed with them, and a real HTTP server that
//! serves the JWKS (and misbehaves on request) for remote JWKS fetching.

use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// One signing key of each kind. Their key ids are `rsa`, `ec256`,
/// `ec384`, `ed` and `hs`.
pub struct Keys {
    rsa: RsaKeyPair,
    ec256: EcdsaKeyPair,
    ec384: EcdsaKeyPair,
    ed: Ed25519KeyPair,
    hs: Vec<u8>,
}

/// The key ids and the algorithm each signs with.
pub const KEYS: &[(&str, &str)] = &[
    ("rsa", "RS256"),
    ("ec256", "ES256"),
    ("ec384", "ES384"),
    ("ed", "EdDSA"),
    ("hs", "HS256"),
];

impl Keys {
    pub fn generate() -> Result<Self> {
        let rng = SystemRandom::new();
        let out = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-outform",
                "DER",
            ])
            .stderr(std::process::Stdio::piped())
            .output()
            .context("running openssl genpkey")?;
        if !out.status.success() {
            bail!("openssl genpkey: {}", String::from_utf8_lossy(&out.stderr));
        }
        let rsa = RsaKeyPair::from_der(&out.stdout).map_err(|e| anyhow::anyhow!("{e}"))?;
        let ec = |alg: &'static signature::EcdsaSigningAlgorithm| -> Result<EcdsaKeyPair> {
            let doc =
                EcdsaKeyPair::generate_pkcs8(alg, &rng).map_err(|e| anyhow::anyhow!("{e}"))?;
            EcdsaKeyPair::from_pkcs8(alg, doc.as_ref(), &rng).map_err(|e| anyhow::anyhow!("{e}"))
        };
        let ed_doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut hs = vec![0u8; 32];
        rng.fill(&mut hs).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Self {
            rsa,
            ec256: ec(&signature::ECDSA_P256_SHA256_FIXED_SIGNING)?,
            ec384: ec(&signature::ECDSA_P384_SHA384_FIXED_SIGNING)?,
            ed: Ed25519KeyPair::from_pkcs8(ed_doc.as_ref()).map_err(|e| anyhow::anyhow!("{e}"))?,
            hs,
        })
    }

    /// The public keys (and the HMAC secret) as a JWKS document.
    pub fn jwks(&self) -> String {
        let ec_key = |kid: &str, crv: &str, alg: &str, k: &EcdsaKeyPair| {
            // An uncompressed point: 0x04, then x and y of equal length.
            let p = &k.public_key().as_ref()[1..];
            let (x, y) = p.split_at(p.len() / 2);
            json!({"kty": "EC", "kid": kid, "crv": crv, "alg": alg,
                   "x": B64.encode(x), "y": B64.encode(y)})
        };
        let rsa: signature::RsaPublicKeyComponents<Vec<u8>> = self.rsa.public().into();
        json!({"keys": [
            {"kty": "RSA", "kid": "rsa", "alg": "RS256",
             "n": B64.encode(&rsa.n),
             "e": B64.encode(&rsa.e)},
            ec_key("ec256", "P-256", "ES256", &self.ec256),
            ec_key("ec384", "P-384", "ES384", &self.ec384),
            {"kty": "OKP", "kid": "ed", "crv": "Ed25519", "alg": "EdDSA",
             "x": B64.encode(self.ed.public_key().as_ref())},
            {"kty": "oct", "kid": "hs", "alg": "HS256", "k": B64.encode(&self.hs)},
        ]})
        .to_string()
    }

    /// A token signed with key `kid` (see [`KEYS`]): `header` is merged
    /// over `{"alg": .., "kid": kid, "typ": "JWT"}` (a `null` removes a
    /// field).
    pub fn sign(&self, kid: &str, header: &Value, claims: &Value) -> Result<String> {
        let alg = KEYS
            .iter()
            .find(|(k, _)| *k == kid)
            .map(|(_, a)| *a)
            .with_context(|| format!("no key {kid}"))?;
        let mut h = json!({"alg": alg, "kid": kid, "typ": "JWT"});
        if let (Some(h), Some(extra)) = (h.as_object_mut(), header.as_object()) {
            for (k, v) in extra {
                if v.is_null() {
                    h.remove(k);
                } else {
                    h.insert(k.clone(), v.clone());
                }
            }
        }
        let input = format!(
            "{}.{}",
            B64.encode(h.to_string()),
            B64.encode(claims.to_string())
        );
        let rng = SystemRandom::new();
        let sig = match kid {
            "rsa" => {
                let mut sig = vec![0; self.rsa.public().modulus_len()];
                self.rsa
                    .sign(
                        &signature::RSA_PKCS1_SHA256,
                        &rng,
                        input.as_bytes(),
                        &mut sig,
                    )
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                sig
            }
            "ec256" | "ec384" => {
                let k = if kid == "ec256" {
                    &self.ec256
                } else {
                    &self.ec384
                };
                k.sign(&rng, input.as_bytes())
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .as_ref()
                    .to_vec()
            }
            "ed" => self.ed.sign(input.as_bytes()).as_ref().to_vec(),
            _ => {
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.hs);
                ring::hmac::sign(&key, input.as_bytes()).as_ref().to_vec()
            }
        };
        Ok(format!("{input}.{}", B64.encode(sig)))
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A running JWKS server; stopped when dropped. It answers
/// - `/jwks`: the JWKS, as `application/json`;
/// - `/garbage`: 200 with a body that is no JWKS;
/// - `/error`: 503;
/// - `/hang`: never (until the client gives up);
/// - `/flaky`: 503 to every other request to it (the 1st, 3rd, ...), the
///   JWKS to the others (a fetch that succeeds on retry);
///
/// and counts the requests it was sent.
pub struct JwksServer {
    pub addr: SocketAddr,
    pub fetches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl JwksServer {
    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

pub async fn serve_jwks(addr: SocketAddr, jwks: String) -> Result<JwksServer> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let fetches = Arc::new(AtomicUsize::new(0));
    let flaky = Arc::new(AtomicUsize::new(0));
    let (jwks, count) = (Arc::new(jwks), fetches.clone());
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (jwks, count, flaky) = (jwks.clone(), count.clone(), flaky.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    count.fetch_add(1, Ordering::SeqCst);
                    let jwks = jwks.clone();
                    let mut path = req.uri().path().to_string();
                    if path == "/flaky" {
                        let n = flaky.fetch_add(1, Ordering::SeqCst);
                        path = if n % 2 == 0 {
                            "/error".into()
                        } else {
                            "/jwks".into()
                        };
                    }
                    async move { Ok::<_, Infallible>(answer(&path, &jwks).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(JwksServer {
        addr,
        fetches,
        task,
    })
}

async fn answer(path: &str, jwks: &str) -> Response<Full<Bytes>> {
    let (status, body) = match path {
        "/jwks" => (200, jwks.to_string()),
        "/garbage" => (200, "this is not a JWKS".to_string()),
        "/hang" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            (200, String::new())
        }
        _ => (503, "unavailable".to_string()),
    };
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_with_their_jwks() {
        let keys = Keys::generate().unwrap();
        let jwks: Value = serde_json::from_str(&keys.jwks()).unwrap();
        assert_eq!(jwks["keys"].as_array().unwrap().len(), KEYS.len());
        let t = keys
            .sign("ec256", &json!({}), &json!({"iss": "a"}))
            .unwrap();
        let parts: Vec<&str> = t.split('.').collect();
        assert_eq!(parts.len(), 3);
        let k = &jwks["keys"][1];
        let mut point = vec![4u8];
        point.extend(B64.decode(k["x"].as_str().unwrap()).unwrap());
        point.extend(B64.decode(k["y"].as_str().unwrap()).unwrap());
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
            .verify(
                format!("{}.{}", parts[0], parts[1]).as_bytes(),
                &B64.decode(parts[2]).unwrap(),
            )
            .unwrap();
    }
}
