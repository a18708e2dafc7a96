//! Certificates and keys: PEM → rustls `CertifiedKey`, the names a
//! certificate serves, and Envoy's choice of certificate by SNI.

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;
use std::borrow::Borrow;
use std::sync::Arc;

/// A server (or client) certificate with its key, ready for rustls.
#[derive(Debug, Clone)]
pub struct Cert {
    pub key: Arc<CertifiedKey>,
    /// The DNS names the leaf serves, lower case: its DNS SANs, or its
    /// subject CN when it has none (as BoringSSL's name check in Envoy).
    pub names: Vec<String>,
}

/// Why a certificate or key could not be loaded.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CertError {
    #[error("no PEM certificate found")]
    NoCertificate,
    #[error("no PEM private key found")]
    NoKey,
    #[error("the private key is not usable: {0}")]
    BadKey(String),
    #[error("the certificate is not valid X.509: {0}")]
    BadCertificate(String),
    #[error("the private key does not match the certificate")]
    KeyMismatch,
}

/// Every certificate in a PEM blob.
pub fn pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::BadCertificate(e.to_string()))?;
    if certs.is_empty() {
        return Err(CertError::NoCertificate);
    }
    for c in &certs {
        x509_parser::parse_x509_certificate(c)
            .map_err(|e| CertError::BadCertificate(e.to_string()))?;
    }
    Ok(certs)
}

/// Loads a PEM chain (leaf first) and its PEM private key.
pub fn load(
    chain_pem: &[u8],
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<Cert, CertError> {
    let chain = pem_certs(chain_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| CertError::NoKey)?;
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| CertError::BadKey(e.to_string()))?;
    let names = dns_names(&chain[0]);
    let key = CertifiedKey::new(chain, signer);
    match key.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(CertError::KeyMismatch)
        }
        // A key whose public half cannot be computed is not checkable; the
        // handshake itself will fail if it is wrong.
        Err(_) => {}
    }
    Ok(Cert {
        key: Arc::new(key),
        names,
    })
}

/// The names a certificate serves: DNS SANs, else the subject CN.
pub fn dns_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|g| match g {
                x509_parser::extensions::GeneralName::DNSName(n) => Some(n.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    if names.is_empty() {
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    names
}

/// Whether a certificate name (`*.example.com` or exact) covers `sni`. A
/// wildcard covers exactly one label, as in RFC 6125.
pub fn name_matches(name: &str, sni: &str) -> bool {
    match name.strip_prefix("*.") {
        Some(suffix) => sni
            .split_once('.')
            .is_some_and(|(first, rest)| !first.is_empty() && rest.eq_ignore_ascii_case(suffix)),
        None => name.eq_ignore_ascii_case(sni),
    }
}

/// Envoy's certificate choice: certificates whose names match the SNI
/// exactly, else by wildcard, else all of them; among those, the first whose
/// key the client can verify (an ECDSA certificate only for a client that
/// offers ECDSA), else the first.
pub fn select<'a, C: Borrow<Cert>>(
    certs: &'a [C],
    sni: Option<&str>,
    schemes: &[SignatureScheme],
) -> Option<&'a C> {
    let by = |f: &dyn Fn(&str, &str) -> bool| -> Vec<&'a C> {
        match sni {
            Some(s) => certs
                .iter()
                .filter(|c| (*c).borrow().names.iter().any(|n| f(n, s)))
                .collect(),
            None => Vec::new(),
        }
    };
    let mut candidates = by(&|n, s| !n.starts_with("*.") && n.eq_ignore_ascii_case(s));
    if candidates.is_empty() {
        candidates = by(&|n, s| n.starts_with("*.") && name_matches(n, s));
    }
    if candidates.is_empty() {
        candidates = certs.iter().collect();
    }
    candidates
        .iter()
        .find(|c| {
            let c: &Cert = (**c).borrow();
            c.key.key.choose_scheme(schemes).is_some()
        })
        .or(candidates.first())
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> CryptoProvider {
        rustls::crypto::ring::default_provider()
    }

    fn gen(names: &[&str], alg: &'static rcgen::SignatureAlgorithm) -> Cert {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.self_signed(&key).unwrap();
        load(
            cert.pem().as_bytes(),
            key.serialize_pem().as_bytes(),
            &provider(),
        )
        .unwrap()
    }

    #[test]
    fn wildcards_cover_one_label() {
        assert!(name_matches("*.example.com", "a.example.com"));
        assert!(!name_matches("*.example.com", "a.b.example.com"));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(name_matches("Example.com", "example.COM"));
    }

    #[test]
    fn exact_beats_wildcard_and_unknown_names_get_the_first() {
        let ecdsa = &rcgen::PKCS_ECDSA_P256_SHA256;
        let certs = vec![
            gen(&["default.test"], ecdsa),
            gen(&["*.example.com"], ecdsa),
            gen(&["a.example.com"], ecdsa),
        ];
        let all = [SignatureScheme::ECDSA_NISTP256_SHA256];
        let pick = |sni| select(&certs, sni, &all).unwrap().names[0].clone();
        assert_eq!(pick(Some("a.example.com")), "a.example.com");
        assert_eq!(pick(Some("b.example.com")), "*.example.com");
        assert_eq!(pick(Some("other.test")), "default.test");
        assert_eq!(pick(None), "default.test");
    }

    #[test]
    fn key_type_follows_the_client() {
        let certs = vec![
            gen(&["x.test"], &rcgen::PKCS_ECDSA_P256_SHA256),
            gen(&["x.test"], &rcgen::PKCS_ED25519),
        ];
        let ed_only = [SignatureScheme::ED25519];
        let c = select(&certs, Some("x.test"), &ed_only).unwrap();
        assert!(c.key.key.choose_scheme(&ed_only).is_some());
        let ecdsa_only = [SignatureScheme::ECDSA_NISTP256_SHA256];
        let c = select(&certs, Some("x.test"), &ecdsa_only).unwrap();
        assert!(c.key.key.choose_scheme(&ecdsa_only).is_some());
    }

    #[test]
    fn bad_pem_and_mismatched_keys_are_errors() {
        let p = provider();
        assert_eq!(
            load(b"junk", b"junk", &p).unwrap_err(),
            CertError::NoCertificate
        );
        let k1 = rcgen::KeyPair::generate().unwrap();
        let k2 = rcgen::KeyPair::generate().unwrap();
        let c = rcgen::CertificateParams::new(vec!["a.test".into()])
            .unwrap()
            .self_signed(&k1)
            .unwrap();
        assert_eq!(
            load(c.pem().as_bytes(), b"junk", &p).unwrap_err(),
            CertError::NoKey
        );
        assert_eq!(
            load(c.pem().as_bytes(), k2.serialize_pem().as_bytes(), &p).unwrap_err(),
            CertError::KeyMismatch
        );
    }
}
