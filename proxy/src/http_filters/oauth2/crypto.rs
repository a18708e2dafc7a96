//! The OAuth2 filter's cryptography and encodings, as Envoy's filter uses
//! them: HMAC-SHA256 signatures (the CSRF token, the `OauthHMAC` cookie),
//! AES-256-CBC for tokens in cookies (keyed by the SHA-256 of the HMAC
//! secret), PKCE's S256 challenge, and two percent-encodings.

use aes::cipher::{block_padding::Pkcs7, BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;

/// Why a ciphertext did not decrypt, in Envoy's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecryptError {
    #[error("Invalid encrypted data")]
    Invalid,
    #[error("failed to finalize decryption")]
    Finalize,
    /// AES-GCM ciphertexts (marked `gcm.`), which Envoy writes only with a
    /// runtime guard that is off by default; Legate never writes them.
    #[error("failed to decrypt data")]
    Gcm,
}

/// HMAC-SHA256 of `msg` under `key`.
pub fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let tag = ring::hmac::sign(&k, msg);
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

pub fn sha256(b: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, b);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

pub fn b64(b: &[u8]) -> String {
    STANDARD.encode(b)
}

pub fn b64url(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

/// Base64url without padding; Envoy's decoder also takes padded input.
pub fn unb64url(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()
}

/// `<flow_id>.<base64 HMAC of flow_id>`: the CSRF token the state carries
/// and the nonce cookie holds.
pub fn csrf_token(secret: &[u8], flow_id: &str) -> String {
    format!("{flow_id}.{}", b64(&hmac(secret, flow_id.as_bytes())))
}

/// Whether a CSRF token's signature is the secret's.
pub fn csrf_signed(secret: &[u8], token: &str) -> bool {
    let Some((id, sig)) = token.split_once('.') else {
        return false;
    };
    ring::constant_time::verify_slices_are_equal(
        b64(&hmac(secret, id.as_bytes())).as_bytes(),
        sig.as_bytes(),
    )
    .is_ok()
}

/// A new flow id: 16 lowercase hex digits.
pub fn flow_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// A new PKCE code verifier (32 random bytes, base64url) and its S256
/// challenge.
pub fn pkce() -> (String, String) {
    let verifier = b64url(&rand::random::<[u8; 32]>());
    let challenge = b64url(&sha256(verifier.as_bytes()));
    (verifier, challenge)
}

type Enc = cbc::Encryptor<aes::Aes256>;
type Dec = cbc::Decryptor<aes::Aes256>;

/// `plain` encrypted for a cookie: base64url(IV ‖ AES-256-CBC(plain)).
pub fn encrypt(secret: &[u8], plain: &[u8]) -> String {
    let iv: [u8; 16] = rand::random();
    let key = sha256(secret);
    let ct = Enc::new(&key.into(), &iv.into()).encrypt_padded_vec_mut::<Pkcs7>(plain);
    let mut out = iv.to_vec();
    out.extend_from_slice(&ct);
    b64url(&out)
}

/// The plaintext of an [`encrypt`]ed cookie value.
pub fn decrypt(secret: &[u8], value: &str) -> Result<Vec<u8>, DecryptError> {
    if value.starts_with("gcm.") {
        return Err(DecryptError::Gcm);
    }
    let raw = unb64url(value).ok_or(DecryptError::Invalid)?;
    if raw.len() <= 16 {
        return Err(DecryptError::Invalid);
    }
    let (iv, ct) = raw.split_at(16);
    let iv: [u8; 16] = iv.try_into().map_err(|_| DecryptError::Invalid)?;
    let key = sha256(secret);
    Dec::new(&key.into(), &iv.into())
        .decrypt_padded_vec_mut::<Pkcs7>(ct)
        .map_err(|_| DecryptError::Finalize)
}

/// Envoy's `urlEncode`: everything but `A-Za-z0-9*-._` as `%XX`.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'*' | b'-' | b'.' | b'_') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Envoy's `PercentEncoding::encode(s, ":/=&?+")` for the token request's
/// form values: those characters, control bytes, `~`, DEL and every
/// non-ASCII byte as `%XX`; `%` and space stay as they are.
pub fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if !(b' '..b'~').contains(&b) || b":/=&?+".contains(&b) {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(b as char);
        }
    }
    out
}

/// The `exp` claim of a JWT, if `token` is one and has it (non-zero).
pub fn jwt_exp(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let v: serde_json::Value = serde_json::from_slice(&unb64url(payload)?).ok()?;
    v.get("exp")?.as_u64().filter(|e| *e != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values Envoy 1.40 produced with the HMAC secret `hmacsecret`.
    #[test]
    fn matches_what_envoy_made() {
        assert_eq!(
            csrf_token(b"hmacsecret", "bc9b0c896c2b2299"),
            "bc9b0c896c2b2299.pEVeuyPLyJVFERRl0MzEtT62xAsJT/15hRxkvQRd7EE="
        );
        let verifier = decrypt(
            b"hmacsecret",
            "ppSzIeruISXTRJG-IZavIuUlZIc9slwbjaR1rhbOV4toR04I92dS_9EG1lw79x4L0QGRIpDcfSJ64HfaVP7Yrw",
        )
        .unwrap();
        assert_eq!(verifier, b"rjMw4pxq7s8yOATzivi0D4miXKoMOIVmSCaq2l1B-E4");
        assert_eq!(
            b64url(&sha256(&verifier)),
            "j8DBnvm6X69aUnjTw1s7grsHIATzRrH449HpQ2swM_A"
        );
    }

    #[test]
    fn encryption_round_trips_and_refuses_tampering() {
        let c = encrypt(b"k", b"token");
        assert_eq!(decrypt(b"k", &c).unwrap(), b"token");
        assert!(decrypt(b"other", &c).is_err());
        assert_eq!(decrypt(b"k", "short"), Err(DecryptError::Invalid));
        assert!(csrf_signed(b"k", &csrf_token(b"k", "00ff")));
        assert!(!csrf_signed(b"j", &csrf_token(b"k", "00ff")));
    }

    #[test]
    fn encodings() {
        assert_eq!(url_encode("https://a b/~"), "https%3A%2F%2Fa%20b%2F%7E");
        assert_eq!(form_encode("a:b/c d%~é"), "a%3Ab%2Fc d%%7E%C3%A9");
    }
}
