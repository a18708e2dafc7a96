//! Calling side services (the rate limit service, authorization servers)
//! from filters: a host of their cluster from the cluster manager, and a
//! gRPC channel per host kept for the filter's life.

use crate::cluster_manager::ClusterManager;
use http::{HeaderName, HeaderValue};
use legate_proto::envoy_types::pb::envoy::config::core::v3 as core;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

/// A host of `cluster` picked by its balancer. Plaintext only: a TLS
/// endpoint is None (the call fails as the service failing), never a
/// downgrade.
pub fn plaintext_host(clusters: &ClusterManager, cluster: &str) -> Option<SocketAddr> {
    let c = clusters.get(cluster)?;
    let host = c.snapshot().pick(None, rand::random(), &|_| false, None)?;
    host.tls.is_none().then_some(host.addr)
}

/// gRPC channels (h2c) by host, made lazily and reused.
#[derive(Debug, Default)]
pub struct Channels(Mutex<HashMap<SocketAddr, tonic::transport::Channel>>);

impl Channels {
    pub fn get(&self, addr: SocketAddr) -> Option<tonic::transport::Channel> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = m.get(&addr) {
            return Some(c.clone());
        }
        let c = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .ok()?
            .connect_lazy();
        m.insert(addr, c.clone());
        Some(c)
    }
}

/// A header a service sent (`raw_value` when set, else `value`), if valid.
pub fn header_pair(h: &core::HeaderValue) -> Option<(HeaderName, HeaderValue)> {
    let value = if h.raw_value.is_empty() {
        h.value.as_bytes()
    } else {
        h.raw_value.as_slice()
    };
    Some((
        HeaderName::from_bytes(h.key.to_ascii_lowercase().as_bytes()).ok()?,
        HeaderValue::from_bytes(value).ok()?,
    ))
}
