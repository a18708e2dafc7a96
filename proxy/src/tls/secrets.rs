//! Secrets and where transport sockets get them.
//!
//! Static secrets (`static_resources.secrets`) are resolved when a config is
//! translated, as Envoy requires them to exist then. SDS secrets are looked
//! up in the dynamic store at every handshake, so a rotation applies to the
//! next handshake without touching listeners, clusters or open connections;
//! a secret that is missing fails the handshake (never plaintext, never
//! unverified).

use super::certs::{self, Cert};
use super::verify::Identity;
use rustls::client::ResolvesClientCert;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, RwLock};

/// A certificate with its key.
#[derive(Debug)]
pub struct CertBundle {
    pub cert: Cert,
}

impl std::borrow::Borrow<Cert> for Arc<CertBundle> {
    fn borrow(&self) -> &Cert {
        &self.cert
    }
}

/// A validation context with its verifiers built once.
#[derive(Debug, Default)]
pub struct Trust {
    pub identity: Identity,
    /// `trusted_ca` as a client-certificate chain check.
    pub client_chain: Option<Arc<dyn ClientCertVerifier>>,
    /// `trusted_ca` as a server-certificate chain check.
    pub server_chain: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    /// `allow_expired_certificate`: an expired chain is otherwise good.
    pub allow_expired: bool,
    /// `trust_chain_verification: ACCEPT_UNTRUSTED`: a certificate that
    /// fails verification is let through anyway.
    pub accept_untrusted: bool,
    /// A `crl` that holds no CRL: Envoy still turns CRL checking on, so no
    /// certificate's revocation status can be known and every one fails.
    pub crl_unusable: bool,
    /// The validation context it was built from, for a
    /// `combined_validation_context` to merge its defaults over.
    pub source: legate_proto::envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::CertificateValidationContext,
}

/// A `Secret` Legate can use.
#[derive(Debug, Clone)]
pub enum SecretValue {
    Cert(Arc<CertBundle>),
    Trust(Arc<Trust>),
    /// A `generic_secret`'s `secret` bytes (credentials for filters).
    Generic(bytes::Bytes),
}

/// Where a transport socket's certificate or validation context comes from.
#[derive(Debug)]
pub enum Src<T> {
    /// Inline, from files, or a static secret.
    Fixed(Arc<T>),
    /// An SDS secret, by name: looked up at each use.
    Sds(String),
    /// Made from an SDS secret at each use (a combined validation
    /// context: its defaults merged with the secret).
    Derived(Arc<dyn Derive<T>>),
}

/// A value made from the current secrets.
pub trait Derive<T>: std::fmt::Debug + Send + Sync {
    fn current(&self) -> Option<Arc<T>>;
}

impl<T> Clone for Src<T> {
    fn clone(&self) -> Self {
        match self {
            Src::Fixed(t) => Src::Fixed(t.clone()),
            Src::Sds(n) => Src::Sds(n.clone()),
            Src::Derived(d) => Src::Derived(d.clone()),
        }
    }
}

/// What an SDS secret must hold to serve as a `T`.
pub trait FromSecret: Sized {
    fn from_secret(v: &SecretValue) -> Option<Arc<Self>>;
}

impl FromSecret for CertBundle {
    fn from_secret(v: &SecretValue) -> Option<Arc<Self>> {
        match v {
            SecretValue::Cert(c) => Some(c.clone()),
            _ => None,
        }
    }
}

impl FromSecret for Trust {
    fn from_secret(v: &SecretValue) -> Option<Arc<Self>> {
        match v {
            SecretValue::Trust(t) => Some(t.clone()),
            _ => None,
        }
    }
}

impl<T: FromSecret> Src<T> {
    /// The value now: fixed, or the SDS secret's current version (None
    /// while it is missing or of the wrong kind).
    pub fn current(&self) -> Option<Arc<T>> {
        match self {
            Src::Fixed(t) => Some(t.clone()),
            Src::Sds(name) => T::from_secret(get_dynamic(name)?.as_ref()),
            Src::Derived(d) => d.current(),
        }
    }
}

type Store = LazyLock<RwLock<HashMap<String, Arc<SecretValue>>>>;
static DYNAMIC: Store = LazyLock::new(Default::default);

/// A static secret, or why its content cannot serve: Envoy reads a static
/// secret's certificate or trust only when a transport socket names it,
/// so an unused incomplete one is no error.
pub type StaticSecret = Result<Arc<SecretValue>, crate::config::ConfigError>;
static STATIC: LazyLock<RwLock<HashMap<String, StaticSecret>>> = LazyLock::new(Default::default);

/// Replaces the static secrets (a bootstrap's whole set).
pub fn set_static(secrets: HashMap<String, StaticSecret>) {
    *STATIC.write().unwrap() = secrets;
}

pub fn get_static(name: &str) -> Option<StaticSecret> {
    STATIC.read().unwrap().get(name).cloned()
}

/// Adds or replaces an SDS secret: the next handshake uses it.
pub fn set_dynamic(name: &str, v: SecretValue) {
    DYNAMIC
        .write()
        .unwrap()
        .insert(name.to_string(), Arc::new(v));
}

pub fn remove_dynamic(name: &str) {
    DYNAMIC.write().unwrap().remove(name);
}

pub fn get_dynamic(name: &str) -> Option<Arc<SecretValue>> {
    DYNAMIC.read().unwrap().get(name).cloned()
}

/// The server certificate resolver of a `DownstreamTlsContext`: Envoy's
/// choice by SNI over the certificates present at this handshake.
#[derive(Debug)]
pub struct SniResolver {
    pub certs: Vec<Src<CertBundle>>,
    /// `require_sni`: refuse a handshake without SNI.
    pub require_sni: bool,
    /// `tls_params.signature_algorithms`: the schemes it may sign with.
    pub signing: Option<Arc<[rustls::SignatureScheme]>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name();
        if sni.is_none() && self.require_sni {
            return None;
        }
        let have: Vec<Arc<CertBundle>> = self.certs.iter().filter_map(|s| s.current()).collect();
        let offered = super::sigalgs::offered(hello.signature_schemes(), self.signing.as_ref());
        certs::select(&have, sni, &offered)
            .map(|b| super::sigalgs::restrict(&b.cert.key, self.signing.as_ref()))
    }
}

/// Sends the configured client certificate whatever the server asks,
/// signing only with `tls_params.signature_algorithms` when set.
#[derive(Debug)]
pub struct ClientCert(
    pub Src<CertBundle>,
    pub Option<Arc<[rustls::SignatureScheme]>>,
);

impl ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0
            .current()
            .map(|b| super::sigalgs::restrict(&b.cert.key, self.1.as_ref()))
    }

    fn has_certs(&self) -> bool {
        true
    }
}
