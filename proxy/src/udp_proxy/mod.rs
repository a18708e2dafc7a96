//! The UDP proxy listener filter (`envoy.filters.udp_listener.udp_proxy`):
//! its translation (`config`), the listener's socket (`socket`) and its
//! sessions at run time (`session`).

pub mod config;
pub mod session;
pub mod socket;

pub use config::{UdpListener, UdpProxy};
