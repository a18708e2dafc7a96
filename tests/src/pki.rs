//! Certificates made at test time (rcgen): a CA and the leaves it signs,
//! written as PEM files for bootstraps and for curl/openssl.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};
use std::path::{Path, PathBuf};

/// A CA whose files live in a fresh directory.
pub struct Ca {
    pub dir: PathBuf,
    pub cert_pem: String,
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A leaf's files.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
    /// The certificate's serial number, for a CRL to revoke it (unknown
    /// for a leaf loaded from disk).
    pub serial: Option<Vec<u8>>,
}

/// What a leaf looks like beyond its DNS names.
#[derive(Default)]
pub struct LeafOpts<'a> {
    pub uris: &'a [&'a str],
    /// Days from now; negative = in the past.
    pub not_before_days: Option<i64>,
    pub not_after_days: Option<i64>,
    /// `otherName` SANs: (type OID arcs, UTF-8 string value).
    pub other_names: &'a [(&'a [u64], &'a str)],
}

fn ring_serial() -> [u8; 16] {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut b).unwrap();
    b
}

impl Ca {
    /// A CRL (PEM) of this CA revoking `revoked`, valid from a day ago for
    /// `next_update_days` (negative: already expired).
    pub fn crl(&self, revoked: &[&Leaf], next_update_days: i64) -> String {
        let now = time::OffsetDateTime::now_utc();
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - time::Duration::days(2),
            next_update: now + time::Duration::days(next_update_days),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .filter_map(|l| l.serial.as_ref())
                .map(|s| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(s),
                    revocation_time: now - time::Duration::days(1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        params
            .signed_by(&self.cert, &self.key)
            .unwrap()
            .pem()
            .unwrap()
    }

    /// A new CA named `name`, in a new directory under the system temp dir.
    pub fn new(name: &str) -> Ca {
        let dir = std::env::temp_dir().join(format!(
            "legate-pki-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = p.self_signed(&key).unwrap();
        let cert_pem = cert.pem();
        std::fs::write(dir.join("ca.pem"), &cert_pem).unwrap();
        Ca {
            dir,
            cert_pem,
            cert,
            key,
        }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A leaf for `dns` names, signed by this CA, written as `<stem>.pem`
    /// and `<stem>.key`.
    pub fn leaf(&self, stem: &str, dns: &[&str], opts: LeafOpts) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name
            .push(DnType::CommonName, dns.first().copied().unwrap_or(stem));
        for u in opts.uris {
            p.subject_alt_names
                .push(SanType::URI(rcgen::Ia5String::try_from(*u).unwrap()));
        }
        for (oid, v) in opts.other_names {
            p.subject_alt_names
                .push(SanType::OtherName((oid.to_vec(), (*v).into())));
        }
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now + time::Duration::days(opts.not_before_days.unwrap_or(-1));
        p.not_after = now + time::Duration::days(opts.not_after_days.unwrap_or(30));
        // A positive 16-byte serial a CRL can name.
        let mut serial: [u8; 16] = ring_serial();
        serial[0] &= 0x7f;
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        let leaf = Leaf {
            serial: Some(serial.to_vec()),
            cert: self.dir.join(format!("{stem}.pem")),
            key: self.dir.join(format!("{stem}.key")),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        std::fs::write(&leaf.cert, &leaf.cert_pem).unwrap();
        std::fs::write(&leaf.key, &leaf.key_pem).unwrap();
        leaf
    }
}

impl Leaf {
    /// The leaf written as `<dir>/<stem>.pem` and `.key`.
    pub fn load(dir: &Path, stem: &str) -> std::io::Result<Leaf> {
        let (cert, key) = (
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}.key")),
        );
        Ok(Leaf {
            cert_pem: std::fs::read_to_string(&cert)?,
            key_pem: std::fs::read_to_string(&key)?,
            serial: None,
            cert,
            key,
        })
    }

    /// Copies the files to `<dir>/<stem>.pem` and `.key`.
    pub fn copy_to(&self, dir: &Path, stem: &str) -> std::io::Result<()> {
        std::fs::write(dir.join(format!("{stem}.pem")), &self.cert_pem)?;
        std::fs::write(dir.join(format!("{stem}.key")), &self.key_pem)
    }
}

impl Drop for Ca {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A rustls server config presenting `leaf` (for TLS upstreams); with
/// `client_ca` (PEM), it asks for a client certificate signed by that CA
/// (and still serves clients without one).
pub fn server_config(
    leaf: &Leaf,
    alpn: &[&str],
    client_ca: Option<&str>,
) -> std::sync::Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    let chain: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca.as_bytes()) {
                roots.add(c.unwrap()).unwrap();
            }
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                std::sync::Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .unwrap();
            builder.with_client_cert_verifier(v)
        }
    };
    let mut c = builder.with_single_cert(chain, key).unwrap();
    c.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    std::sync::Arc::new(c)
}

/// The DER certificates of a PEM blob.
pub fn pem_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

/// A path as a str, for bootstraps and command lines.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
