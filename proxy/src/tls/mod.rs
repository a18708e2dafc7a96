//! TLS on rustls: certificates and SNI selection ([`certs`]), peer
//! validation ([`verify`]), the `tls_inspector` ClientHello parser
//! ([`hello`]), the secret store ([`secrets`]), origination
//! ([`upstream`]) and `signature_algorithms` ([`sigalgs`]). The config side
//! (`DownstreamTlsContext` → `rustls::ServerConfig`) is `config::tls`.

pub mod certs;
pub mod hello;
pub mod secrets;
pub mod sigalgs;
pub mod upstream;
pub mod verify;
