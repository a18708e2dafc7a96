//! `x-forwarded-client-cert`: Envoy's `forward_client_cert_details` and
//! `set_current_client_cert_details`. Pure over the request and what the
//! TLS handshake showed, so it is tested here without sockets.

use crate::tls::verify::{issuer, sans, sha256, subject, SanType};

pub use crate::config::listener::{XfccDetails as Details, XfccMode as Mode};

/// What the handshake of an mTLS connection showed.
#[derive(Debug, Clone, Default)]
pub struct PeerTls {
    /// The client's chain, leaf first (DER).
    pub chain: Vec<Vec<u8>>,
    /// URI SANs of the certificate Legate presented.
    pub local_uris: Vec<String>,
    /// The client certificate's first URI SAN, read once per connection
    /// when a filter asks (Istio's peer principal).
    pub uri: std::sync::OnceLock<String>,
}

impl PeerTls {
    /// The client's leaf certificate (DER).
    pub fn leaf(&self) -> Option<&[u8]> {
        self.chain.first().map(Vec::as_slice)
    }

    /// The client certificate's first URI SAN ("" without one).
    pub fn peer_uri(&self) -> &str {
        self.uri
            .get_or_init(|| crate::tls::verify::uri_san(self.leaf()))
    }
}

pub const HEADER: &str = "x-forwarded-client-cert";

/// Envoy's `mutateXfccRequestHeader`: the header's new value, or None to
/// remove it. `current` is the existing value; `peer` is set only when the
/// client presented a certificate.
pub fn mutate(
    mode: Mode,
    details: &Details,
    peer: Option<&PeerTls>,
    current: Option<&str>,
) -> Option<String> {
    if mode == Mode::AlwaysForwardOnly {
        return current.map(str::to_string);
    }
    let peer = match peer {
        Some(p) if mode != Mode::Sanitize && !p.chain.is_empty() => p,
        _ => return None,
    };
    if mode == Mode::ForwardOnly {
        return current.map(str::to_string);
    }
    let element = element(details, peer);
    match (mode, current) {
        (Mode::AppendForward, Some(c)) if !c.is_empty() => Some(format!("{c},{element}")),
        _ => Some(element),
    }
}

/// This hop's element: `By`, `Hash`, then the requested details in Envoy's
/// order (Cert, Chain, Subject, URI, DNS, Issuer).
fn element(d: &Details, peer: &PeerTls) -> String {
    let leaf = &peer.chain[0];
    let mut parts: Vec<String> = peer.local_uris.iter().map(|u| format!("By={u}")).collect();
    parts.push(format!("Hash={}", hex(&sha256(leaf))));
    if d.cert {
        parts.push(format!("Cert=\"{}\"", url_encode(&pem(leaf))));
    }
    if d.chain {
        let all: String = peer.chain.iter().map(|c| pem(c)).collect();
        parts.push(format!("Chain=\"{}\"", url_encode(&all)));
    }
    if d.subject {
        let s = subject(leaf).unwrap_or_default();
        parts.push(format!("Subject=\"{s}\""));
    }
    let names = sans(leaf);
    if d.uri {
        let uris: Vec<&String> = names
            .iter()
            .filter(|(t, _)| *t == SanType::Uri)
            .map(|(_, v)| v)
            .collect();
        if uris.is_empty() {
            // The key is present even without a URI SAN, as in Envoy.
            parts.push("URI=".into());
        }
        parts.extend(uris.into_iter().map(|u| format!("URI={u}")));
    }
    if d.dns {
        parts.extend(
            names
                .iter()
                .filter(|(t, _)| *t == SanType::Dns)
                .map(|(_, v)| format!("DNS={v}")),
        );
    }
    // Issuer comes last in Envoy (measured against 1.40: tls-xfcc).
    if d.issuer {
        let s = issuer(leaf).unwrap_or_default();
        parts.push(format!("Issuer=\"{s}\""));
    }
    parts.join(";")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Percent-encodes all but RFC 3986's unreserved characters.
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3 / 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uri: &str) -> PeerTls {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["client.test".to_string()]).unwrap();
        p.subject_alt_names.push(rcgen::SanType::URI(
            rcgen::Ia5String::try_from(uri).unwrap(),
        ));
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "Org, Inc");
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "client");
        let c = p.self_signed(&key).unwrap();
        PeerTls {
            chain: vec![c.der().to_vec()],
            local_uris: vec!["spiffe://td/proxy".into()],
            ..Default::default()
        }
    }

    #[test]
    fn modes_without_mtls() {
        let d = Details::default();
        let plain = None;
        assert_eq!(mutate(Mode::Sanitize, &d, plain, Some("x")), None);
        assert_eq!(mutate(Mode::ForwardOnly, &d, plain, Some("x")), None);
        assert_eq!(mutate(Mode::AppendForward, &d, plain, Some("x")), None);
        assert_eq!(mutate(Mode::SanitizeSet, &d, plain, Some("x")), None);
        assert_eq!(
            mutate(Mode::AlwaysForwardOnly, &d, plain, Some("x")).as_deref(),
            Some("x")
        );
        assert_eq!(mutate(Mode::AlwaysForwardOnly, &d, plain, None), None);
    }

    #[test]
    fn modes_with_mtls() {
        let p = peer("spiffe://td/client");
        let d = Details {
            subject: true,
            uri: true,
            dns: true,
            ..Default::default()
        };
        assert_eq!(mutate(Mode::Sanitize, &d, Some(&p), Some("x")), None);
        assert_eq!(
            mutate(Mode::ForwardOnly, &d, Some(&p), Some("x")).as_deref(),
            Some("x")
        );
        let set = mutate(Mode::SanitizeSet, &d, Some(&p), Some("x")).unwrap();
        assert!(set.starts_with("By=spiffe://td/proxy;Hash="), "{set}");
        assert!(
            set.ends_with(
                ";Subject=\"CN=client,O=Org\\, Inc\";URI=spiffe://td/client;DNS=client.test"
            ),
            "{set}"
        );
        let appended = mutate(Mode::AppendForward, &d, Some(&p), Some("x")).unwrap();
        assert_eq!(appended, format!("x,{set}"));
        assert_eq!(
            mutate(Mode::AppendForward, &d, Some(&p), None).unwrap(),
            set
        );
    }

    #[test]
    fn cert_is_url_encoded_pem() {
        let p = peer("spiffe://td/c");
        let d = Details {
            cert: true,
            ..Default::default()
        };
        let v = mutate(Mode::SanitizeSet, &d, Some(&p), None).unwrap();
        assert!(v.contains("Cert=\"-----BEGIN%20CERTIFICATE-----%0A"), "{v}");
    }
}
