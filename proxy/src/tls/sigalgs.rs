//! `tls_params.signature_algorithms`: the handshake signature schemes a
//! context may use, in preference order. As BoringSSL's sigalgs list does
//! for Envoy, it limits both halves: what this side signs with (its
//! certificate's key chooses only among them) and what it accepts and
//! offers for the peer's signature (the verifier's schemes). Certificate
//! chain signatures are not affected.

use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SigalgError {
    #[error("unknown signature algorithm '{0}'")]
    Unknown(String),
    #[error("signature algorithm '{0}' is not supported by rustls (no SHA-1, MD5 or P-521 handshake signatures)")]
    Unsupported(String),
}

/// One name as BoringSSL's list reads it: the TLS 1.3 name
/// (`ecdsa_secp256r1_sha256`) or the `KEY+HASH` form (`ECDSA+SHA256`).
pub fn scheme(name: &str) -> Result<SignatureScheme, SigalgError> {
    use SignatureScheme as S;
    let s = match name {
        "rsa_pkcs1_sha256" | "RSA+SHA256" => S::RSA_PKCS1_SHA256,
        "rsa_pkcs1_sha384" | "RSA+SHA384" => S::RSA_PKCS1_SHA384,
        "rsa_pkcs1_sha512" | "RSA+SHA512" => S::RSA_PKCS1_SHA512,
        "ecdsa_secp256r1_sha256" | "ECDSA+SHA256" => S::ECDSA_NISTP256_SHA256,
        "ecdsa_secp384r1_sha384" | "ECDSA+SHA384" => S::ECDSA_NISTP384_SHA384,
        "rsa_pss_rsae_sha256" | "PSS+SHA256" | "RSA-PSS+SHA256" => S::RSA_PSS_SHA256,
        "rsa_pss_rsae_sha384" | "PSS+SHA384" | "RSA-PSS+SHA384" => S::RSA_PSS_SHA384,
        "rsa_pss_rsae_sha512" | "PSS+SHA512" | "RSA-PSS+SHA512" => S::RSA_PSS_SHA512,
        "ed25519" | "Ed25519" => S::ED25519,
        "rsa_pkcs1_sha1"
        | "RSA+SHA1"
        | "ecdsa_sha1"
        | "ECDSA+SHA1"
        | "ecdsa_secp521r1_sha512"
        | "ECDSA+SHA512" => return Err(SigalgError::Unsupported(name.into())),
        _ => return Err(SigalgError::Unknown(name.into())),
    };
    Ok(s)
}

/// The verifier's algorithms limited to `schemes`, in their order. The
/// mapping must be `'static`; each distinct list is built once.
pub fn verification(schemes: &[SignatureScheme]) -> WebPkiSupportedAlgorithms {
    static BUILT: LazyLock<Mutex<HashMap<Vec<u16>, WebPkiSupportedAlgorithms>>> =
        LazyLock::new(Default::default);
    let key = schemes.iter().map(|s| u16::from(*s)).collect();
    let mut built = BUILT.lock().unwrap();
    *built.entry(key).or_insert_with(|| {
        let base = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        let mapping: Vec<_> = schemes
            .iter()
            .filter_map(|s| base.mapping.iter().find(|(x, _)| x == s).copied())
            .collect();
        WebPkiSupportedAlgorithms {
            all: base.all,
            mapping: Box::leak(mapping.into_boxed_slice()),
        }
    })
}

/// A key that signs only with the allowed schemes.
#[derive(Debug)]
struct Restricted {
    inner: Arc<dyn SigningKey>,
    allowed: Arc<[SignatureScheme]>,
}

impl SigningKey for Restricted {
    /// The first allowed scheme the peer offers and the key can use: the
    /// configured order is the preference, as in BoringSSL.
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        self.allowed
            .iter()
            .filter(|s| offered.contains(s))
            .find_map(|s| self.inner.choose_scheme(std::slice::from_ref(s)))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        self.inner.algorithm()
    }
}

/// `key` limited to `allowed` (None: as it is).
pub fn restrict(
    key: &Arc<CertifiedKey>,
    allowed: Option<&Arc<[SignatureScheme]>>,
) -> Arc<CertifiedKey> {
    match allowed {
        None => key.clone(),
        Some(a) => Arc::new(CertifiedKey {
            cert: key.cert.clone(),
            key: Arc::new(Restricted {
                inner: key.key.clone(),
                allowed: a.clone(),
            }),
            ocsp: key.ocsp.clone(),
        }),
    }
}

/// The offered schemes that are also allowed.
pub fn offered(
    offered: &[SignatureScheme],
    allowed: Option<&Arc<[SignatureScheme]>>,
) -> Vec<SignatureScheme> {
    offered
        .iter()
        .copied()
        .filter(|s| allowed.is_none_or(|a| a.contains(s)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_spellings_are_read_and_sha1_is_refused() {
        assert_eq!(scheme("ECDSA+SHA256"), scheme("ecdsa_secp256r1_sha256"));
        assert_eq!(
            scheme("RSA-PSS+SHA256"),
            Ok(SignatureScheme::RSA_PSS_SHA256)
        );
        assert!(matches!(
            scheme("ecdsa_sha1"),
            Err(SigalgError::Unsupported(_))
        ));
        assert!(matches!(
            scheme("ECDSA-SECP256R1-SHA256"),
            Err(SigalgError::Unknown(_))
        ));
    }

    #[test]
    fn verification_keeps_only_the_listed_schemes_in_their_order() {
        let a = verification(&[
            SignatureScheme::RSA_PSS_SHA256,
            SignatureScheme::ECDSA_NISTP256_SHA256,
        ]);
        assert_eq!(
            a.supported_schemes(),
            vec![
                SignatureScheme::RSA_PSS_SHA256,
                SignatureScheme::ECDSA_NISTP256_SHA256
            ]
        );
    }
}
