//! TLS on rustls: certificates and SNI selection ([`certs`]), peer
//! validation ([`verify`]), the `tls_inspector` ClientHello parser
//! ([`hello`]), the secret store ([`secrets`]) and origination
//! ([`upstream`]). The config side
//! (`DownstreamTlsContext` → `rustls::ServerConfig`) is `config::tls`.

pub mod certs;
pub mod hello;
pub mod secrets;
pub mod upstream;
pub mod verify;
