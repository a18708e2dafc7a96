//! Transport sockets: `DownstreamTlsContext` and `UpstreamTlsContext` →
//! ready rustls configs, built once per config version so a handshake never
//! rebuilds one; certificates and validation contexts from SDS are looked up
//! per handshake (see `tls::secrets`). Anything rustls cannot honour is an
//! error naming the field, never a silently weaker TLS.

use super::source::XdsSource;
use super::{index, join, ConfigError, Result, Wrapped};
use crate::tls::certs;
use crate::tls::secrets::{CertBundle, ClientCert, SecretValue, SniResolver, Src, Trust};
use crate::tls::verify::{ClientVerifier, Identity, SanMatcher, SanType, ServerVerifier};
use legate_proto::envoy_types::pb::envoy::config::core::v3 as core;
use legate_proto::envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as pb;
use rustls::crypto::CryptoProvider;
use rustls::{RootCertStore, SupportedProtocolVersion};
use std::sync::Arc;

pub const DOWNSTREAM_TLS: &str = "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
pub const UPSTREAM_TLS: &str = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
pub const RAW_BUFFER: &str = "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer";

/// A filter chain's TLS termination.
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    /// The certificates it serves (also inside `config`'s resolver).
    pub certs: Vec<Src<CertBundle>>,
    /// SDS secrets it uses: the listener warms until they are present.
    pub sds: Vec<(String, XdsSource)>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("alpn", &self.config.alpn_protocols)
            .finish()
    }
}

impl ServerTls {
    /// The URI SANs of the certificate served for `sni` (Envoy's `By` in
    /// `x-forwarded-client-cert`).
    pub fn local_uris(&self, sni: Option<&str>) -> Vec<String> {
        let have: Vec<Arc<CertBundle>> = self.certs.iter().filter_map(|c| c.current()).collect();
        let all = rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes();
        let Some(b) = certs::select(&have, sni, &all) else {
            return Vec::new();
        };
        crate::tls::verify::sans(&b.cert.key.cert[0])
            .into_iter()
            .filter(|(t, _)| *t == crate::tls::verify::SanType::Uri)
            .map(|(_, v)| v)
            .collect()
    }
}

/// A cluster's TLS origination. Every upstream TLS connection (HTTP
/// through pingora's `custom_l4`, and `tcp_proxy`) is made with `config`,
/// built once: its verifier and client certificate read SDS per handshake,
/// and its session cache resumes across connections.
pub struct ClientTls {
    pub config: Arc<rustls::ClientConfig>,
    /// `sni`; empty: none (unless chosen per host or request).
    pub sni: String,
    /// Where each connection's SNI comes from.
    pub sni_from: SniFrom,
    pub alpn: Vec<String>,
    /// Changes when the context does: part of the upstream pool key, so a
    /// connection made under an old context is never reused under a new one.
    pub key: u64,
    /// SDS secrets it uses: the cluster warms until they are present.
    pub sds: Vec<(String, XdsSource)>,
}

/// Where an upstream connection's SNI comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum SniFrom {
    /// `sni` (none when empty).
    Fixed,
    /// `auto_host_sni`: the endpoint's hostname, else `sni`.
    EndpointHostname,
    /// `upstream_http_protocol_options.auto_sni`: the upstream request's
    /// host, or the header `override_auto_sni_header` names when present.
    Request { header: Option<http::HeaderName> },
}

/// A cluster's `upstream_http_protocol_options`.
#[derive(Debug, Clone, Default)]
pub struct AutoSni {
    pub auto_sni: bool,
    pub auto_san_validation: bool,
    pub header: Option<http::HeaderName>,
}

impl ClientTls {
    /// The same context offering only `alpn`.
    pub fn with_alpn(&self, alpn: &[&str]) -> ClientTls {
        let mut config = (*self.config).clone();
        config.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
        ClientTls {
            config: Arc::new(config),
            sni: self.sni.clone(),
            sni_from: self.sni_from.clone(),
            alpn: alpn.iter().map(|a| a.to_string()).collect(),
            key: self.key,
            sds: self.sds.clone(),
        }
    }
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("sni", &self.sni)
            .field("alpn", &self.alpn)
            .finish()
    }
}

fn any<'a>(ts: &'a core::TransportSocket, path: &str) -> Result<(&'a str, &'a [u8])> {
    match &ts.config_type {
        Some(core::transport_socket::ConfigType::TypedConfig(a)) => {
            Ok((legate_proto::type_name(&a.type_url), a.value.as_slice()))
        }
        None => Err(ConfigError::new(
            join(path, "typed_config"),
            "typed_config is required",
        )),
    }
}

/// A filter chain's `transport_socket`: None for plaintext.
pub fn downstream(ts: &core::TransportSocket, path: &str) -> Result<Option<Arc<ServerTls>>> {
    let (tn, bytes) = any(ts, path)?;
    let tc = join(path, "typed_config");
    match tn {
        RAW_BUFFER => Ok(None),
        DOWNSTREAM_TLS => {
            let d: pb::DownstreamTlsContext =
                prost::Message::decode(bytes).map_err(|e| ConfigError::new(&tc, e.to_string()))?;
            Ok(Some(Arc::new(server_tls(&d, &tc)?)))
        }
        _ => Err(ConfigError::new(
            tc,
            format!("transport socket {tn} is not supported on listeners"),
        )),
    }
}

/// A cluster's `transport_socket`: None for plaintext. `h2`: the cluster
/// speaks HTTP/2, offered by ALPN when the context names no protocols (as
/// Envoy's HTTP/2 connection pool does).
pub fn upstream(
    ts: &core::TransportSocket,
    path: &str,
    protocol: super::cluster::UpstreamProtocol,
    auto: &AutoSni,
) -> Result<Option<Arc<ClientTls>>> {
    let (tn, bytes) = any(ts, path)?;
    let tc = join(path, "typed_config");
    match tn {
        RAW_BUFFER => Ok(None),
        UPSTREAM_TLS => {
            let u: pb::UpstreamTlsContext =
                prost::Message::decode(bytes).map_err(|e| ConfigError::new(&tc, e.to_string()))?;
            Ok(Some(Arc::new(client_tls(&u, &tc, protocol, auto)?)))
        }
        _ => Err(ConfigError::new(
            tc,
            format!("transport socket {tn} is not supported on clusters"),
        )),
    }
}

/// The crypto provider and protocol versions `tls_params` ask for.
fn params(
    p: Option<&pb::TlsParameters>,
    path: &str,
) -> Result<(Arc<CryptoProvider>, Vec<&'static SupportedProtocolVersion>)> {
    use pb::tls_parameters::TlsProtocol as V;
    use rustls::crypto::ring::{cipher_suite as cs, kx_group};
    let mut provider = rustls::crypto::ring::default_provider();
    let Some(p) = p else {
        return Ok((
            Arc::new(provider),
            vec![&rustls::version::TLS12, &rustls::version::TLS13],
        ));
    };
    let path = join(path, "tls_params");
    let version = |v: i32, field: &str, auto: u8| -> Result<u8> {
        match V::try_from(v).unwrap_or(V::TlsAuto) {
            V::TlsAuto => Ok(auto),
            V::TlSv12 => Ok(2),
            V::TlSv13 => Ok(3),
            V::TlSv10 | V::TlSv11 => Err(ConfigError::new(
                join(&path, field),
                "TLS 1.0 and 1.1 are not supported (rustls implements TLS 1.2 and 1.3 only)",
            )),
        }
    };
    let min = version(
        p.tls_minimum_protocol_version,
        "tls_minimum_protocol_version",
        2,
    )?;
    let max = version(
        p.tls_maximum_protocol_version,
        "tls_maximum_protocol_version",
        3,
    )?;
    if min > max {
        return Err(ConfigError::new(
            join(&path, "tls_minimum_protocol_version"),
            "the minimum TLS version is above the maximum",
        ));
    }
    let mut versions = Vec::new();
    if min <= 2 {
        versions.push(&rustls::version::TLS12);
    }
    if max >= 3 {
        versions.push(&rustls::version::TLS13);
    }
    if !p.cipher_suites.is_empty() {
        // TLS 1.3 suites are not configurable in Envoy (BoringSSL): keep them.
        let mut suites: Vec<_> = provider
            .cipher_suites
            .iter()
            .filter(|s| s.version() == &rustls::version::TLS13)
            .copied()
            .collect();
        for (i, entry) in p.cipher_suites.iter().enumerate() {
            // `[A|B]` is an equal-preference group in BoringSSL's syntax.
            for name in entry.trim_matches(['[', ']']).split('|') {
                let s = match name {
                    "ECDHE-ECDSA-AES128-GCM-SHA256" => cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                    "ECDHE-RSA-AES128-GCM-SHA256" => cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
                    "ECDHE-ECDSA-AES256-GCM-SHA384" => cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                    "ECDHE-RSA-AES256-GCM-SHA384" => cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
                    "ECDHE-ECDSA-CHACHA20-POLY1305" => {
                        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
                    }
                    "ECDHE-RSA-CHACHA20-POLY1305" => {
                        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
                    }
                    _ => {
                        return Err(ConfigError::new(
                            index(&path, "cipher_suites", i),
                            format!("cipher suite '{name}' is not supported by rustls"),
                        ))
                    }
                };
                if !suites.contains(&s) {
                    suites.push(s);
                }
            }
        }
        provider.cipher_suites = suites;
    }
    if !p.ecdh_curves.is_empty() {
        let mut groups = Vec::new();
        for (i, c) in p.ecdh_curves.iter().enumerate() {
            groups.push(match c.as_str() {
                "X25519" => kx_group::X25519,
                "P-256" => kx_group::SECP256R1,
                "P-384" => kx_group::SECP384R1,
                _ => {
                    return Err(ConfigError::new(
                        index(&path, "ecdh_curves", i),
                        format!("curve '{c}' is not supported by rustls"),
                    ))
                }
            });
        }
        provider.kx_groups = groups;
    }
    Ok((Arc::new(provider), versions))
}

/// `tls_params.signature_algorithms`, in order (None when not set).
fn signature_algorithms(
    p: Option<&pb::TlsParameters>,
    path: &str,
) -> Result<Option<Arc<[rustls::SignatureScheme]>>> {
    let Some(p) = p.filter(|p| !p.signature_algorithms.is_empty()) else {
        return Ok(None);
    };
    let path = join(path, "tls_params");
    let mut out = Vec::new();
    for (i, name) in p.signature_algorithms.iter().enumerate() {
        let s = crate::tls::sigalgs::scheme(name).map_err(|e| {
            ConfigError::new(index(&path, "signature_algorithms", i), e.to_string())
        })?;
        if !out.contains(&s) {
            out.push(s);
        }
    }
    Ok(Some(out.into()))
}

/// The provider certificates and keys are loaded with, and peer chains
/// verified with: signature algorithms do not depend on `tls_params`.
fn default_provider() -> Arc<CryptoProvider> {
    static P: std::sync::LazyLock<Arc<CryptoProvider>> =
        std::sync::LazyLock::new(|| Arc::new(rustls::crypto::ring::default_provider()));
    P.clone()
}

/// One `TlsCertificate`.
fn certificate(c: &pb::TlsCertificate, path: &str) -> Result<CertBundle> {
    let chain_path = join(path, "certificate_chain");
    let key_path = join(path, "private_key");
    let chain = c
        .certificate_chain
        .as_ref()
        .ok_or_else(|| ConfigError::new(&chain_path, "certificate_chain is required"))?;
    let key = c
        .private_key
        .as_ref()
        .ok_or_else(|| ConfigError::new(&key_path, "private_key is required"))?;
    let chain = crate::datasource::read(chain, &chain_path)?;
    let key = crate::datasource::read(key, &key_path)?;
    let cert = certs::load(&chain, &key, &default_provider()).map_err(|e| {
        let at = match e {
            certs::CertError::NoKey
            | certs::CertError::BadKey(_)
            | certs::CertError::KeyMismatch => &key_path,
            _ => &chain_path,
        };
        ConfigError::new(at, e.to_string())
    })?;
    Ok(CertBundle { cert })
}

/// `CertificateValidationContext`, its verifiers built.
pub fn validation(v: &pb::CertificateValidationContext, path: &str) -> Result<Trust> {
    let mut identity = Identity::default();
    for (i, m) in v.match_typed_subject_alt_names.iter().enumerate() {
        let p = index(path, "match_typed_subject_alt_names", i);
        use pb::subject_alt_name_matcher::SanType as T;
        let ty = match T::try_from(m.san_type).unwrap_or(T::Unspecified) {
            T::Dns => SanType::Dns,
            T::Email => SanType::Email,
            T::Uri => SanType::Uri,
            T::IpAddress => SanType::Ip,
            T::OtherName => SanType::Other,
            T::Unspecified => {
                return Err(ConfigError::new(
                    join(&p, "san_type"),
                    "san_type must be DNS, EMAIL, URI, IP_ADDRESS or OTHER_NAME",
                ))
            }
        };
        let oid = match (ty, m.oid.as_str()) {
            (SanType::Other, "") => {
                return Err(ConfigError::new(
                    join(&p, "oid"),
                    "an OTHER_NAME matcher needs the oid",
                ))
            }
            (SanType::Other, o) => {
                let parsed = o
                    .split('.')
                    .map(str::parse::<u64>)
                    .collect::<std::result::Result<Vec<_>, _>>();
                if parsed.map_or(true, |a| a.len() < 2) {
                    return Err(ConfigError::new(
                        join(&p, "oid"),
                        format!("'{o}' is not a dotted object identifier"),
                    ));
                }
                Some(o.to_string())
            }
            // Envoy reads the oid of OTHER_NAME matchers only.
            _ => None,
        };
        let sm = m
            .matcher
            .as_ref()
            .ok_or_else(|| ConfigError::new(join(&p, "matcher"), "matcher is required"))?;
        identity.sans.push(SanMatcher {
            ty,
            oid,
            matcher: super::matcher::StringMatcher::from_proto(sm, &join(&p, "matcher"))?,
        });
    }
    for (i, h) in v.verify_certificate_hash.iter().enumerate() {
        let hex: String = h.chars().filter(|c| *c != ':').collect();
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| {
                hex.get(i..i + 2)
                    .and_then(|b| u8::from_str_radix(b, 16).ok())
            })
            .collect::<Option<Vec<u8>>>()
            .filter(|b| b.len() == 32);
        identity.hashes.push(bytes.ok_or_else(|| {
            ConfigError::new(
                index(path, "verify_certificate_hash", i),
                format!("'{h}' is not a hex SHA-256 hash"),
            )
        })?);
    }
    for (i, s) in v.verify_certificate_spki.iter().enumerate() {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s)
            .ok()
            .filter(|b| b.len() == 32);
        identity.spki.push(bytes.ok_or_else(|| {
            ConfigError::new(
                index(path, "verify_certificate_spki", i),
                format!("'{s}' is not a base64 SHA-256 hash"),
            )
        })?);
    }
    let mut trust = Trust::default();
    if let Some(ca) = &v.trusted_ca {
        let p = join(path, "trusted_ca");
        let pem = crate::datasource::read(ca, &p)?;
        let ders = certs::pem_certs(&pem).map_err(|e| ConfigError::new(&p, e.to_string()))?;
        let mut store = RootCertStore::empty();
        for d in &ders {
            store
                .add(d.clone())
                .map_err(|e| ConfigError::new(&p, format!("not a usable CA certificate: {e}")))?;
        }
        let roots = Arc::new(store);
        let provider = default_provider();
        let crls = match &v.crl {
            Some(ds) => crls(ds, &join(path, "crl"))?,
            None => Vec::new(),
        };
        trust.crl_unusable = v.crl.is_some() && crls.is_empty();
        // BoringSSL under Envoy: every certificate of the chain checked
        // (only the leaf with only_verify_leaf_cert_crl), a missing CRL or
        // an expired one failing it.
        let leaf_only = v.only_verify_leaf_cert_crl;
        let mut client = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .allow_unauthenticated();
        let mut server =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider);
        if !crls.is_empty() {
            client = client
                .with_crls(crls.clone())
                .enforce_revocation_expiration();
            server = server.with_crls(crls).enforce_revocation_expiration();
            if leaf_only {
                client = client.only_check_end_entity_revocation();
                server = server.only_check_end_entity_revocation();
            }
        }
        trust.client_chain = Some(
            client
                .build()
                .map_err(|e| ConfigError::new(&p, e.to_string()))?,
        );
        trust.server_chain = Some(
            server
                .build()
                .map_err(|e| ConfigError::new(&p, e.to_string()))?,
        );
    } else if v.crl.is_some() {
        return Err(ConfigError::new(
            join(path, "crl"),
            "a crl needs trusted_ca (revocation is checked on a trusted chain)",
        ));
    } else if !identity.sans.is_empty() {
        return Err(ConfigError::new(
            join(path, "trusted_ca"),
            "match_typed_subject_alt_names needs trusted_ca (a name is only meaningful on a trusted chain)",
        ));
    }
    trust.identity = identity;
    trust.allow_expired = v.allow_expired_certificate;
    use pb::certificate_validation_context::TrustChainVerification as T;
    trust.accept_untrusted = match T::try_from(v.trust_chain_verification) {
        Ok(T::VerifyTrustChain) => false,
        Ok(T::AcceptUntrusted) => true,
        Err(_) => {
            return Err(ConfigError::new(
                join(path, "trust_chain_verification"),
                "unknown value",
            ))
        }
    };
    trust.source = v.clone();
    Ok(trust)
}

/// A `combined_validation_context` over an SDS secret: its default
/// context merged with the secret's (protobuf merge: the secret's
/// singular fields win, lists are joined), rebuilt when the secret
/// changes.
#[derive(Debug)]
struct Combined {
    default: pb::CertificateValidationContext,
    secret: String,
    path: String,
    /// The secret it was last built from, and the result.
    built: std::sync::Mutex<Option<(Arc<SecretValue>, Arc<Trust>)>>,
}

fn merged(
    default: &pb::CertificateValidationContext,
    secret: &pb::CertificateValidationContext,
    path: &str,
) -> Result<Trust> {
    let mut m = default.clone();
    prost::Message::merge(&mut m, prost::Message::encode_to_vec(secret).as_slice())
        .map_err(|e| ConfigError::new(path, e.to_string()))?;
    validation(&m, path)
}

impl crate::tls::secrets::Derive<Trust> for Combined {
    fn current(&self) -> Option<Arc<Trust>> {
        let secret = crate::tls::secrets::get_dynamic(&self.secret)?;
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((s, t)) = &*built {
            if Arc::ptr_eq(s, &secret) {
                return Some(t.clone());
            }
        }
        let SecretValue::Trust(t) = &*secret else {
            return None;
        };
        match merged(&self.default, &t.source, &self.path) {
            Ok(trust) => {
                let trust = Arc::new(trust);
                *built = Some((secret.clone(), trust.clone()));
                Some(trust)
            }
            Err(e) => {
                // The handshake fails, as with a missing secret.
                tracing::warn!(
                    "combined validation context with secret {}: {e}",
                    self.secret
                );
                None
            }
        }
    }
}

fn combined(
    c: &pb::common_tls_context::CombinedCertificateValidationContext,
    path: &str,
    sds: &mut Vec<(String, XdsSource)>,
) -> Result<Src<Trust>> {
    let default = c.default_validation_context.clone().unwrap_or_default();
    let sp = join(path, "validation_context_sds_secret_config");
    let s = c
        .validation_context_sds_secret_config
        .as_ref()
        .ok_or_else(|| ConfigError::new(&sp, "validation_context_sds_secret_config is required"))?;
    match named(s, &sp)? {
        Named::Static(v) => match &*v {
            SecretValue::Trust(t) => Ok(Src::Fixed(Arc::new(merged(&default, &t.source, path)?))),
            _ => Err(ConfigError::new(
                join(&sp, "name"),
                format!("secret {} is not a validation_context", s.name),
            )),
        },
        Named::Sds(name, source) => {
            sds.push((name.clone(), source));
            Ok(Src::Derived(Arc::new(Combined {
                default,
                secret: name,
                path: path.to_string(),
                built: Default::default(),
            })))
        }
    }
}

/// A `Secret`, from `static_resources.secrets` or SDS.
pub fn secret(s: &pb::Secret, path: &str) -> Result<(String, SecretValue)> {
    let (name, v) = static_secret(s, path)?;
    Ok((name, v?))
}

/// As [`secret`], but the content's error (a certificate without its key,
/// PEM that does not parse) is kept for whoever names the secret, as Envoy
/// checks a static secret only at its use. A nameless or typeless secret
/// is still refused at once.
pub fn static_secret(s: &pb::Secret, path: &str) -> Result<(String, Result<SecretValue>)> {
    if s.name.is_empty() {
        return Err(ConfigError::new(
            join(path, "name"),
            "secret name is required",
        ));
    }
    Ok((s.name.clone(), secret_value(s, path)?))
}

/// The content of a named secret: Err(outer) for a secret of no or an
/// unsupported type, Ok(Err(inner)) for content that cannot serve.
fn secret_value(s: &pb::Secret, path: &str) -> Result<Result<SecretValue>> {
    use pb::secret::Type as T;
    Ok(Ok(match &s.r#type {
        Some(T::TlsCertificate(c)) => match certificate(c, &join(path, "tls_certificate")) {
            Ok(c) => SecretValue::Cert(Arc::new(c)),
            Err(e) => return Ok(Err(e)),
        },
        Some(T::ValidationContext(v)) => match validation(v, &join(path, "validation_context")) {
            Ok(t) => SecretValue::Trust(Arc::new(t)),
            Err(e) => return Ok(Err(e)),
        },
        Some(T::SessionTicketKeys(_)) => {
            return Err(ConfigError::new(
                join(path, "session_ticket_keys"),
                "session ticket key secrets are not supported",
            ))
        }
        Some(T::GenericSecret(g)) => match generic(g, &join(path, "generic_secret")) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        },
        None => return Err(ConfigError::new(path, "a secret needs a type")),
    }))
}

/// The CRLs of a `crl` data source (PEM). Data with none in it is
/// accepted, as Envoy accepts it (and then fails every certificate).
fn crls(
    ds: &core::DataSource,
    path: &str,
) -> Result<Vec<rustls::pki_types::CertificateRevocationListDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    let pem = crate::datasource::read(ds, path)?;
    let mut out = Vec::new();
    for c in rustls::pki_types::CertificateRevocationListDer::pem_slice_iter(&pem) {
        match c {
            Ok(c) => out.push(c),
            // Not PEM at all: no CRL, as BoringSSL reads it.
            Err(rustls::pki_types::pem::Error::NoItemsFound) => break,
            Err(e) => return Err(ConfigError::new(path, format!("not a PEM CRL: {e}"))),
        }
    }
    if out.is_empty() {
        tracing::warn!("{path}: no CRL in it; every certificate it checks will fail, as in Envoy");
    }
    Ok(out)
}

/// A `generic_secret`: its `secret` bytes. The named `secrets` map serves
/// only extensions Legate does not have, so it is refused.
fn generic(g: &pb::GenericSecret, path: &str) -> Result<SecretValue> {
    if !g.secrets.is_empty() {
        return Err(ConfigError::new(
            join(path, "secrets"),
            "named generic secrets are not supported",
        ));
    }
    let ds = g
        .secret
        .as_ref()
        .ok_or_else(|| ConfigError::new(join(path, "secret"), "secret is required"))?;
    Ok(SecretValue::Generic(crate::datasource::read(
        ds,
        &join(path, "secret"),
    )?))
}

/// A generic secret for a filter: fixed (inline or static, which must
/// exist now) or from SDS, read at each use.
#[derive(Debug, Clone)]
pub enum GenericSecret {
    Fixed(bytes::Bytes),
    Sds(String),
}

impl GenericSecret {
    /// Its bytes now (None while an SDS secret is missing or of another
    /// kind).
    pub fn current(&self) -> Option<bytes::Bytes> {
        match self {
            Self::Fixed(b) => Some(b.clone()),
            Self::Sds(name) => match &*crate::tls::secrets::get_dynamic(name)? {
                SecretValue::Generic(b) => Some(b.clone()),
                _ => None,
            },
        }
    }

    /// The secret `s` names; `sds` gains the subscription an SDS one needs.
    pub fn from_proto(
        s: &pb::SdsSecretConfig,
        path: &str,
        sds: &mut Vec<(String, XdsSource)>,
    ) -> Result<Self> {
        match named(s, path)? {
            Named::Static(v) => match &*v {
                SecretValue::Generic(b) => Ok(Self::Fixed(b.clone())),
                _ => Err(ConfigError::new(
                    join(path, "name"),
                    format!("secret {} is not a generic_secret", s.name),
                )),
            },
            Named::Sds(name, source) => {
                sds.push((name.clone(), source));
                Ok(Self::Sds(name))
            }
        }
    }
}

/// What an `SdsSecretConfig` names: a static secret (which must exist now),
/// or an SDS one (looked up at each handshake).
enum Named {
    Static(Arc<SecretValue>),
    Sds(String, XdsSource),
}

fn named(s: &pb::SdsSecretConfig, path: &str) -> Result<Named> {
    if s.name.is_empty() {
        return Err(ConfigError::new(
            join(path, "name"),
            "a secret name is required",
        ));
    }
    match &s.sds_config {
        Some(cs) => Ok(Named::Sds(
            s.name.clone(),
            XdsSource::from_proto(cs, &join(path, "sds_config"))?,
        )),
        None => match crate::tls::secrets::get_static(&s.name) {
            Some(Ok(v)) => Ok(Named::Static(v)),
            Some(Err(e)) => Err(ConfigError::new(
                join(path, "name"),
                format!("static secret {} cannot serve: {e}", s.name),
            )),
            None => Err(ConfigError::new(
                join(path, "name"),
                format!("unknown static secret: {}", s.name),
            )),
        },
    }
}

struct Common {
    provider: Arc<CryptoProvider>,
    /// `tls_params.signature_algorithms`: the schemes this side signs with.
    signing: Option<Arc<[rustls::SignatureScheme]>>,
    versions: Vec<&'static SupportedProtocolVersion>,
    certs: Vec<Src<CertBundle>>,
    trust: Option<Src<Trust>>,
    alpn: Vec<String>,
    sds: Vec<(String, XdsSource)>,
}

fn common(c: Option<&pb::CommonTlsContext>, path: &str) -> Result<Common> {
    let default = pb::CommonTlsContext::default();
    let c = c.unwrap_or(&default);
    let path = join(path, "common_tls_context");
    let (mut provider, versions) = params(c.tls_params.as_ref(), &path)?;
    let signing = signature_algorithms(c.tls_params.as_ref(), &path)?;
    if let Some(s) = &signing {
        Arc::make_mut(&mut provider).signature_verification_algorithms =
            crate::tls::sigalgs::verification(s);
    }
    let mut certs = Vec::new();
    let mut sds = Vec::new();
    for (i, t) in c.tls_certificates.iter().enumerate() {
        certs.push(Src::Fixed(Arc::new(certificate(
            t,
            &index(&path, "tls_certificates", i),
        )?)));
    }
    if !c.tls_certificates.is_empty() && !c.tls_certificate_sds_secret_configs.is_empty() {
        // Envoy's rule too.
        return Err(ConfigError::new(
            join(&path, "tls_certificate_sds_secret_configs"),
            "SDS and non-SDS TLS certificates may not be mixed",
        ));
    }
    let not_a = |p: &str, name: &str, what: &str| {
        ConfigError::new(join(p, "name"), format!("secret {name} is not a {what}"))
    };
    for (i, s) in c.tls_certificate_sds_secret_configs.iter().enumerate() {
        let p = index(&path, "tls_certificate_sds_secret_configs", i);
        certs.push(match named(s, &p)? {
            Named::Static(v) => match &*v {
                SecretValue::Cert(c) => Src::Fixed(c.clone()),
                _ => return Err(not_a(&p, &s.name, "tls_certificate")),
            },
            Named::Sds(name, source) => {
                sds.push((name.clone(), source));
                Src::Sds(name)
            }
        });
    }
    use pb::common_tls_context::ValidationContextType as V;
    let trust = match &c.validation_context_type {
        None => None,
        Some(V::ValidationContext(v)) => Some(Src::Fixed(Arc::new(validation(
            v,
            &join(&path, "validation_context"),
        )?))),
        Some(V::ValidationContextSdsSecretConfig(s)) => {
            let p = join(&path, "validation_context_sds_secret_config");
            Some(match named(s, &p)? {
                Named::Static(v) => match &*v {
                    SecretValue::Trust(t) => Src::Fixed(t.clone()),
                    _ => return Err(not_a(&p, &s.name, "validation_context")),
                },
                Named::Sds(name, source) => {
                    sds.push((name.clone(), source));
                    Src::Sds(name)
                }
            })
        }
        Some(V::CombinedValidationContext(cv)) => Some(combined(
            cv,
            &join(&path, "combined_validation_context"),
            &mut sds,
        )?),
        Some(_) => {
            return Err(ConfigError::new(
                join(&path, "validation_context_certificate_provider"),
                "certificate providers are not supported",
            ))
        }
    };
    Ok(Common {
        provider,
        signing,
        versions,
        certs,
        trust,
        alpn: c.alpn_protocols.clone(),
        sds,
    })
}

fn server_tls(d: &pb::DownstreamTlsContext, path: &str) -> Result<ServerTls> {
    let c = common(d.common_tls_context.as_ref(), path)?;
    if c.certs.is_empty() {
        return Err(ConfigError::new(
            join(path, "common_tls_context.tls_certificates"),
            "no TLS certificates found for server context",
        ));
    }
    let builder = rustls::ServerConfig::builder_with_provider(c.provider.clone())
        .with_protocol_versions(&c.versions)
        .map_err(|e| {
            ConfigError::new(join(path, "common_tls_context.tls_params"), e.to_string())
        })?;
    // Envoy asks for client certificates only with a validation context:
    // without one, `require_client_certificate` has no effect (measured
    // against Envoy 1.40 in conformance/scenarios/routing/tls-mtls.yaml).
    let builder = match c.trust {
        None => builder.with_no_client_auth(),
        Some(trust) => builder.with_client_cert_verifier(Arc::new(ClientVerifier {
            trust,
            required: d.require_client_certificate.val().unwrap_or(false),
            algs: c.provider.signature_verification_algorithms,
        })),
    };
    let mut config = builder.with_cert_resolver(Arc::new(SniResolver {
        certs: c.certs.clone(),
        signing: c.signing.clone(),
        require_sni: d.require_sni.val().unwrap_or(false),
    }));
    config.alpn_protocols = c.alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    // Envoy (BoringSSL) prefers the server's cipher order unless told not to.
    config.ignore_client_order = !d.prefer_client_ciphers;
    use pb::downstream_tls_context::SessionTicketKeysType as K;
    let tickets = match &d.session_ticket_keys_type {
        None | Some(K::DisableStatelessSessionResumption(false)) => true,
        Some(K::DisableStatelessSessionResumption(true)) => false,
        Some(_) => {
            return Err(ConfigError::new(
                join(path, "session_ticket_keys"),
                "explicit session ticket keys are not supported; rustls rotates its own",
            ))
        }
    };
    if tickets {
        config.ticketer = rustls::crypto::ring::Ticketer::new()
            .map_err(|e| ConfigError::new(path, format!("session tickets: {e}")))?;
    }
    if d.disable_stateful_session_resumption {
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    }
    Ok(ServerTls {
        config: Arc::new(config),
        certs: c.certs,
        sds: c.sds,
    })
}

fn client_tls(
    u: &pb::UpstreamTlsContext,
    path: &str,
    protocol: super::cluster::UpstreamProtocol,
    auto: &AutoSni,
) -> Result<ClientTls> {
    let c = common(u.common_tls_context.as_ref(), path)?;
    if c.certs.len() > 1 {
        return Err(ConfigError::new(
            join(path, "common_tls_context.tls_certificates"),
            "an upstream context takes at most one client certificate",
        ));
    }
    let builder = rustls::ClientConfig::builder_with_provider(c.provider.clone())
        .with_protocol_versions(&c.versions)
        .map_err(|e| ConfigError::new(join(path, "common_tls_context.tls_params"), e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerVerifier {
            trust: c.trust,
            san_is_sni: u.auto_sni_san_validation || auto.auto_san_validation,
            algs: c.provider.signature_verification_algorithms,
        }));
    let mut config = match c.certs.into_iter().next() {
        Some(src) => builder.with_client_cert_resolver(Arc::new(ClientCert(src, c.signing))),
        None => builder.with_no_client_auth(),
    };
    let alpn = if !c.alpn.is_empty() {
        c.alpn
    } else if protocol == super::cluster::UpstreamProtocol::Http2 {
        vec!["h2".to_string()]
    } else if protocol == super::cluster::UpstreamProtocol::Auto {
        vec!["h2".to_string(), "http/1.1".to_string()]
    } else {
        Vec::new()
    };
    config.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    // Envoy sends SNI only when told to (`sni`, `auto_host_sni`,
    // `auto_sni`).
    config.enable_sni = !u.sni.is_empty() || u.auto_host_sni || auto.auto_sni;
    Ok(ClientTls {
        config: Arc::new(config),
        sni: u.sni.clone(),
        sni_from: if auto.auto_sni {
            SniFrom::Request {
                header: auto.header.clone(),
            }
        } else if u.auto_host_sni {
            SniFrom::EndpointHostname
        } else {
            SniFrom::Fixed
        },
        alpn,
        key: xxhash_rust::xxh64::xxh64(&prost::Message::encode_to_vec(u), 0),
        sds: c.sds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls_params(min: i32, max: i32, suites: &[&str]) -> pb::TlsParameters {
        pb::TlsParameters {
            tls_minimum_protocol_version: min,
            tls_maximum_protocol_version: max,
            cipher_suites: suites.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn versions_rustls_cannot_do_are_refused_by_name() {
        let e = params(Some(&tls_params(1, 0, &[])), "x").unwrap_err();
        assert_eq!(e.path, "x.tls_params.tls_minimum_protocol_version");
        let (_, v) = params(Some(&tls_params(3, 3, &[])), "x").unwrap();
        assert_eq!(v, vec![&rustls::version::TLS12]);
        let (_, v) = params(Some(&tls_params(4, 0, &[])), "x").unwrap();
        assert_eq!(v, vec![&rustls::version::TLS13]);
        let e = params(Some(&tls_params(4, 3, &[])), "x").unwrap_err();
        assert_eq!(e.path, "x.tls_params.tls_minimum_protocol_version");
    }

    #[test]
    fn cipher_suites_map_or_fail() {
        let (p, _) = params(
            Some(&tls_params(
                0,
                0,
                &["[ECDHE-ECDSA-AES128-GCM-SHA256|ECDHE-ECDSA-CHACHA20-POLY1305]"],
            )),
            "x",
        )
        .unwrap();
        // The three TLS 1.3 suites and the two named.
        assert_eq!(p.cipher_suites.len(), 5);
        let e = params(
            Some(&tls_params(
                0,
                0,
                &["ECDHE-RSA-AES128-GCM-SHA256", "AES128-SHA"],
            )),
            "x",
        )
        .unwrap_err();
        assert_eq!(e.path, "x.tls_params.cipher_suites[1]");
    }

    #[test]
    fn a_server_context_needs_a_certificate() {
        let e = server_tls(&pb::DownstreamTlsContext::default(), "t").unwrap_err();
        assert_eq!(e.path, "t.common_tls_context.tls_certificates");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let ds = |s: String| core::DataSource {
            specifier: Some(core::data_source::Specifier::InlineString(s)),
            ..Default::default()
        };
        let d = pb::DownstreamTlsContext {
            common_tls_context: Some(pb::CommonTlsContext {
                tls_certificates: vec![pb::TlsCertificate {
                    certificate_chain: Some(ds(cert.pem())),
                    private_key: Some(ds(key.serialize_pem())),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            require_client_certificate: Some(crate::config::wkt::BoolValue { value: true }),
            ..Default::default()
        };
        // As Envoy: accepted; without a validation context no client
        // certificate is asked for, required or not (conformance tls-mtls).
        assert!(server_tls(&d, "t").is_ok());
    }

    #[test]
    fn bad_pins_are_named() {
        let v = pb::CertificateValidationContext {
            verify_certificate_hash: vec!["zz".into()],
            ..Default::default()
        };
        assert_eq!(
            validation(&v, "v").unwrap_err().path,
            "v.verify_certificate_hash[0]"
        );
        let v = pb::CertificateValidationContext {
            verify_certificate_spki: vec!["AAAA".into()],
            ..Default::default()
        };
        assert_eq!(
            validation(&v, "v").unwrap_err().path,
            "v.verify_certificate_spki[0]"
        );
    }

    #[test]
    fn a_combined_context_follows_its_sds_secret() {
        use crate::tls::secrets::Derive;
        let ca = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(vec![name.into()]).unwrap();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.self_signed(&key).unwrap().pem()
        };
        let trust_secret = |pem: String| {
            SecretValue::Trust(Arc::new(
                validation(
                    &pb::CertificateValidationContext {
                        trusted_ca: Some(core::DataSource {
                            specifier: Some(core::data_source::Specifier::InlineString(pem)),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                    "s",
                )
                .unwrap(),
            ))
        };
        let default = pb::CertificateValidationContext {
            match_typed_subject_alt_names: vec![pb::SubjectAltNameMatcher {
                san_type: pb::subject_alt_name_matcher::SanType::Dns as i32,
                matcher: Some(legate_proto::envoy_types::pb::envoy::r#type::matcher::v3::StringMatcher {
                    match_pattern: Some(
                        legate_proto::envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern::Exact(
                            "a.test".into(),
                        ),
                    ),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let c = Combined {
            default,
            secret: "combined-test-ca".into(),
            path: "c".into(),
            built: Default::default(),
        };
        // No secret yet: no trust, so handshakes fail.
        assert!(c.current().is_none());
        crate::tls::secrets::set_dynamic("combined-test-ca", trust_secret(ca("ca-1")));
        let first = c.current().unwrap();
        assert!(first.server_chain.is_some(), "the secret's CA");
        assert_eq!(first.identity.sans.len(), 1, "the default's SAN matcher");
        assert!(
            Arc::ptr_eq(&first, &c.current().unwrap()),
            "built once per secret"
        );
        crate::tls::secrets::set_dynamic("combined-test-ca", trust_secret(ca("ca-2")));
        assert!(
            !Arc::ptr_eq(&first, &c.current().unwrap()),
            "rebuilt on rotation"
        );
        crate::tls::secrets::remove_dynamic("combined-test-ca");
    }
}
