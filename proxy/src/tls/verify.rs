//! Peer certificate validation as Envoy's `CertificateValidationContext`
//! does it: the chain against `trusted_ca` first, then the identity
//! (`match_typed_subject_alt_names`), then pins (`verify_certificate_hash`,
//! `verify_certificate_spki`). Any failure fails the handshake.

use super::secrets::{Src, Trust};
use crate::config::matcher::StringMatcher;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SanType {
    Dns,
    Email,
    Uri,
    Ip,
    /// An `otherName` of the matcher's `oid`.
    Other,
}

/// One `SubjectAltNameMatcher`.
#[derive(Debug, Clone)]
pub struct SanMatcher {
    pub ty: SanType,
    pub matcher: StringMatcher,
    /// The `otherName` type (dotted), for [`SanType::Other`].
    pub oid: Option<String>,
}

/// What a peer certificate must be, beyond a trusted chain.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub sans: Vec<SanMatcher>,
    /// SHA-256 of the whole DER certificate.
    pub hashes: Vec<Vec<u8>>,
    /// SHA-256 of the DER SubjectPublicKeyInfo.
    pub spki: Vec<Vec<u8>>,
}

/// The first URI SAN of a DER certificate ("" without one): Istio's
/// principal of a peer.
pub fn uri_san(der: Option<&[u8]>) -> String {
    der.map(sans)
        .unwrap_or_default()
        .into_iter()
        .find(|(t, _)| *t == SanType::Uri)
        .map(|(_, v)| v)
        .unwrap_or_default()
}

/// A certificate's subject alternative names, by type.
pub fn sans(der: &[u8]) -> Vec<(SanType, String)> {
    use x509_parser::extensions::GeneralName as G;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|g| match g {
            G::DNSName(n) => Some((SanType::Dns, n.to_string())),
            G::RFC822Name(n) => Some((SanType::Email, n.to_string())),
            G::URI(n) => Some((SanType::Uri, n.to_string())),
            G::IPAddress(b) => ip_string(b).map(|s| (SanType::Ip, s)),
            _ => None,
        })
        .collect()
}

/// A certificate's `otherName` SANs: (type OID dotted, value as Envoy
/// prints it).
pub fn other_names(der: &[u8]) -> Vec<(String, String)> {
    use x509_parser::extensions::GeneralName as G;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|g| match g {
            G::OtherName(oid, value) => Some((oid.to_id_string(), other_name_value(value))),
            _ => None,
        })
        .collect()
}

/// One DER element: (tag, contents, the rest).
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = b.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, b| (a << 8) | *b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// An `otherName` value (the `[0] EXPLICIT` element) as Envoy's
/// `generalNameAsString` prints it: strings as their bytes, a boolean as
/// `true`/`false`, an integer in decimal, an object identifier dotted, a
/// NULL (or anything else) as nothing.
fn other_name_value(explicit: &[u8]) -> String {
    let Some((0xa0, inner, _)) = tlv(explicit) else {
        return String::new();
    };
    let Some((tag, v, _)) = tlv(inner) else {
        return String::new();
    };
    match tag {
        0x01 => if v.first().is_some_and(|b| *b != 0) {
            "true"
        } else {
            "false"
        }
        .into(),
        0x02 | 0x0a if !v.is_empty() && v.len() <= 16 => {
            // Two's complement, big endian.
            let mut n: i128 = if v[0] & 0x80 != 0 { -1 } else { 0 };
            for b in v {
                n = (n << 8) | i128::from(*b);
            }
            n.to_string()
        }
        0x06 => x509_parser::der_parser::oid::Oid::new(v.into()).to_id_string(),
        // Bit, octet, UTF-8, numeric, printable, T61, IA5, UTC and
        // generalized time, visible, general, universal and BMP strings,
        // sequences and sets: the bytes.
        0x03 | 0x04 | 0x0c | 0x12 | 0x13 | 0x14 | 0x16 | 0x17 | 0x18 | 0x1a | 0x1b | 0x1c
        | 0x1e | 0x30 | 0x31 => String::from_utf8_lossy(v).into_owned(),
        _ => String::new(),
    }
}

fn ip_string(b: &[u8]) -> Option<String> {
    match b.len() {
        4 => Some(std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string()),
        16 => Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(b).ok()?).to_string()),
        _ => None,
    }
}

/// A certificate's subject as RFC 2253 prints it (BoringSSL's form in
/// Envoy's XFCC and RBAC).
pub fn subject(der: &[u8]) -> Option<String> {
    let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(rfc2253(c.subject()))
}

/// A certificate's issuer, as [`subject`].
pub fn issuer(der: &[u8]) -> Option<String> {
    let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(rfc2253(c.issuer()))
}

/// A distinguished name as RFC 2253 prints it (most specific first).
fn rfc2253(name: &x509_parser::x509::X509Name) -> String {
    let registry = x509_parser::objects::oid_registry();
    let mut rdns: Vec<String> = name
        .iter()
        .map(|rdn| {
            rdn.iter()
                .map(|a| {
                    let key = x509_parser::objects::oid2abbrev(a.attr_type(), registry)
                        .map(str::to_string)
                        .unwrap_or_else(|_| a.attr_type().to_id_string());
                    let value = a.as_str().unwrap_or("");
                    format!("{key}={}", escape_dn(value))
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    rdns.reverse();
    rdns.join(",")
}

fn escape_dn(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i + 1 == v.chars().count() && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// SHA-256 of `b`.
pub fn sha256(b: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .to_vec()
}

impl Identity {
    pub fn is_empty(&self) -> bool {
        self.sans.is_empty() && self.hashes.is_empty() && self.spki.is_empty()
    }

    /// Envoy's rules: some SAN matches some matcher of its type (a DNS
    /// `exact` matcher also accepts a wildcard SAN covering it); and if any
    /// pin is set, the certificate or its key matches one.
    pub fn accepts(&self, der: &[u8]) -> bool {
        if !self.sans.is_empty() {
            let have = sans(der);
            let others = if self.sans.iter().any(|m| m.ty == SanType::Other) {
                other_names(der)
            } else {
                Vec::new()
            };
            let ok = self.sans.iter().any(|m| {
                if m.ty == SanType::Other {
                    return others
                        .iter()
                        .any(|(oid, v)| Some(oid) == m.oid.as_ref() && m.matcher.matches(v));
                }
                have.iter().any(|(ty, v)| {
                    *ty == m.ty
                        && (m.matcher.matches(v)
                            || (m.ty == SanType::Dns
                                && m.matcher
                                    .exact_value()
                                    .is_some_and(|e| super::certs::name_matches(v, e))))
                })
            });
            if !ok {
                return false;
            }
        }
        if self.hashes.is_empty() && self.spki.is_empty() {
            return true;
        }
        if self.hashes.contains(&sha256(der)) {
            return true;
        }
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
            return false;
        };
        self.spki.contains(&sha256(cert.public_key().raw))
    }
}

/// The handshake-signature half of a verifier, the same for both sides:
/// checked with the provider's algorithms (`self.algs`).
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls12_signature(message, cert, dss, &self.algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls13_signature(message, cert, dss, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algs.supported_schemes()
        }
    };
}

fn rejected() -> Error {
    Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
}

fn unknown_revocation() -> Error {
    Error::InvalidCertificate(CertificateError::UnknownRevocationStatus)
}

/// Verifies client certificates for a `DownstreamTlsContext` against its
/// validation context as it is at this handshake.
#[derive(Debug)]
pub struct ClientVerifier {
    pub trust: Src<Trust>,
    /// `require_client_certificate`.
    pub required: bool,
    pub algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.required
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // CA names are hinted for a fixed trust; an SDS one can change
        // under the handshake, so it sends none.
        match &self.trust {
            Src::Fixed(t) => t
                .client_chain
                .as_ref()
                .map(|c| c.root_hint_subjects())
                .unwrap_or(&[]),
            Src::Sds(_) | Src::Derived(_) => &[],
        }
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let Some(trust) = self.trust.current() else {
            return Err(rejected());
        };
        let checked = (|| {
            if trust.crl_unusable {
                return Err(unknown_revocation());
            }
            if let Some(chain) = &trust.client_chain {
                chain_check(&trust, end_entity, intermediates, now, |at| {
                    chain
                        .verify_client_cert(end_entity, intermediates, at)
                        .map(|_| ())
                })?;
            }
            if !trust.identity.accepts(end_entity) {
                return Err(rejected());
            }
            Ok(())
        })();
        match checked {
            Ok(()) => Ok(ClientCertVerified::assertion()),
            Err(_) if trust.accept_untrusted => Ok(ClientCertVerified::assertion()),
            Err(e) => Err(e),
        }
    }

    signature_checks!();
}

/// Verifies upstream certificates for an `UpstreamTlsContext` as Envoy
/// does: without a validation context nothing is checked; with one, the
/// chain against `trusted_ca`, then SAN matchers and pins, and with
/// `auto_sni_san_validation` the SNI sent against the DNS SANs. The host
/// name alone is never checked (Envoy checks names only when told to).
#[derive(Debug)]
pub struct ServerVerifier {
    pub trust: Option<Src<Trust>>,
    pub san_is_sni: bool,
    pub algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let Some(src) = &self.trust else {
            return Ok(ServerCertVerified::assertion());
        };
        let Some(trust) = src.current() else {
            return Err(rejected());
        };
        match self.check_server(&trust, end_entity, intermediates, server_name, ocsp, now) {
            Ok(()) => Ok(ServerCertVerified::assertion()),
            Err(_) if trust.accept_untrusted => Ok(ServerCertVerified::assertion()),
            Err(e) => Err(e),
        }
    }

    signature_checks!();
}

impl ServerVerifier {
    fn check_server(
        &self,
        trust: &Trust,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<(), Error> {
        if trust.crl_unusable {
            return Err(unknown_revocation());
        }
        if let Some(chain) = &trust.server_chain {
            let r = chain_check(trust, end_entity, intermediates, now, |at| {
                chain
                    .verify_server_cert(end_entity, intermediates, server_name, ocsp, at)
                    .map(|_| ())
            });
            match r {
                Ok(()) => {}
                Err(Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => {}
                Err(e) => return Err(e),
            }
        }
        if !trust.identity.accepts(end_entity) {
            return Err(rejected());
        }
        if self.san_is_sni {
            let ServerName::DnsName(n) = server_name else {
                return Err(rejected());
            };
            let ok = sans(end_entity)
                .iter()
                .any(|(t, v)| *t == SanType::Dns && super::certs::name_matches(v, n.as_ref()));
            if !ok {
                return Err(rejected());
            }
        }
        Ok(())
    }
}

/// Runs a chain check as of `now`; with `allow_expired_certificate`, a
/// chain refused only for having expired is checked again as of just
/// before its earliest expiry (Envoy ignores the expiry error alone).
fn chain_check(
    trust: &Trust,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    check: impl Fn(UnixTime) -> Result<(), Error>,
) -> Result<(), Error> {
    match check(now) {
        Err(Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        )) if trust.allow_expired => {
            let earliest = std::iter::once(end_entity)
                .chain(intermediates)
                .filter_map(|c| x509_parser::parse_x509_certificate(c).ok())
                .map(|(_, c)| c.validity().not_after.timestamp())
                .min()
                .ok_or_else(rejected)?;
            let at = u64::try_from(earliest - 1).map_err(|_| rejected())?;
            check(UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                at,
            )))
        }
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(sans: Vec<rcgen::SanType>) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = sans;
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn other_name_values_print_as_envoy_prints_them() {
        // [0] EXPLICIT around each value.
        let wrap = |inner: &[u8]| [&[0xa0, inner.len() as u8][..], inner].concat();
        assert_eq!(other_name_value(&wrap(&[0x0c, 2, b'h', b'i'])), "hi");
        assert_eq!(other_name_value(&wrap(&[0x01, 1, 0xff])), "true");
        assert_eq!(other_name_value(&wrap(&[0x02, 2, 0x01, 0x00])), "256");
        assert_eq!(other_name_value(&wrap(&[0x02, 1, 0xff])), "-1");
        assert_eq!(
            other_name_value(&wrap(&[0x06, 3, 0x2a, 0x03, 0x04])),
            "1.2.3.4"
        );
        assert_eq!(other_name_value(&wrap(&[0x05, 0])), "");
        assert_eq!(other_name_value(&[0x0c, 1, b'x']), "");
    }

    fn m(ty: SanType, exact: &str) -> SanMatcher {
        SanMatcher {
            oid: None,
            ty,
            matcher: StringMatcher::exact(exact),
        }
    }

    #[test]
    fn spiffe_uri_sans_match_by_type() {
        let der = cert_with(vec![rcgen::SanType::URI(
            rcgen::Ia5String::try_from("spiffe://td/ns/a/sa/b").unwrap(),
        )]);
        let id = |ms| Identity {
            sans: ms,
            ..Default::default()
        };
        assert!(id(vec![m(SanType::Uri, "spiffe://td/ns/a/sa/b")]).accepts(&der));
        assert!(!id(vec![m(SanType::Uri, "spiffe://td/ns/a/sa/c")]).accepts(&der));
        // The right string under the wrong type is no match.
        assert!(!id(vec![m(SanType::Dns, "spiffe://td/ns/a/sa/b")]).accepts(&der));
        assert!(Identity::default().accepts(&der));
    }

    #[test]
    fn dns_exact_accepts_a_covering_wildcard_san() {
        let der = cert_with(vec![rcgen::SanType::DnsName(
            rcgen::Ia5String::try_from("*.svc.test").unwrap(),
        )]);
        let id = |e: &str| Identity {
            sans: vec![m(SanType::Dns, e)],
            ..Default::default()
        };
        assert!(id("a.svc.test").accepts(&der));
        assert!(!id("a.b.svc.test").accepts(&der));
    }

    #[test]
    fn pins_by_hash_or_spki() {
        let der = cert_with(vec![]);
        let other = cert_with(vec![]);
        let by_hash = Identity {
            hashes: vec![sha256(&der)],
            ..Default::default()
        };
        assert!(by_hash.accepts(&der));
        assert!(!by_hash.accepts(&other));
        let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
        let by_spki = Identity {
            spki: vec![sha256(c.public_key().raw)],
            ..Default::default()
        };
        assert!(by_spki.accepts(&der));
        assert!(!by_spki.accepts(&other));
    }
}
