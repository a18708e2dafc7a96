//! Legate: an Envoy-compatible data plane on pingora.
//!
//! Config flows one way: bootstrap proto → [`registry`] check → validated
//! [`config`] model → runtime ([`cluster_manager`], [`server`]).

// Envoy still honours its deprecated fields (append, exact_match, cluster
// http2_protocol_options, ...), so Legate reads them too.
#![allow(deprecated)]

pub mod access_log;
pub mod admin;
pub mod allocator;
pub mod bootstrap;
pub mod breakers;
pub mod cel;
pub mod cli;
pub mod cluster_manager;
pub mod config;
pub mod datasource;
pub mod header_case;
pub mod headers;
pub mod health_check;
pub mod http_filters;
pub mod istio;
pub mod kernel_lb;
pub mod lb;
pub mod logging;
pub mod otlp;
pub mod outlier;
pub mod overload;
pub mod pool_age;
pub mod registry;
pub mod route_tables;
pub mod routing;
pub mod runtime;
pub mod server;
pub mod stats;
pub mod tls;
pub mod trace;
pub mod udp_proxy;
pub mod xds;

/// The version reported by `--version` and `/server_info`.
pub fn version_string() -> String {
    format!("legate/{}/Clean/RELEASE/Rustls", env!("CARGO_PKG_VERSION"))
}
