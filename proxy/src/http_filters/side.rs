//! Calling side services (the rate limit service, authorization servers)
//! from filters: a host of their cluster from the cluster manager, and a
//! gRPC channel per host kept for the filter's life.

use crate::cluster_manager::ClusterManager;
use crate::config::{join, ConfigError};
use http::{HeaderName, HeaderValue};
use legate_proto::envoy_types::pb::envoy::config::core::v3 as core;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// A host of `cluster` picked by its balancer. Plaintext only: a TLS
/// endpoint is None (the call fails as the service failing), never a
/// downgrade.
pub fn plaintext_host(clusters: &ClusterManager, cluster: &str) -> Option<SocketAddr> {
    let c = clusters.get(cluster)?;
    let host = c.snapshot().pick(None, rand::random(), &|_| false, None)?;
    host.tls.is_none().then_some(host.addr)
}

/// gRPC channels (h2c) by host, made lazily and reused, their calls
/// carrying the service's `:authority` (Envoy's: `envoy_grpc.authority`,
/// else the cluster's name).
#[derive(Debug, Default)]
pub struct Channels {
    /// None: the host's address (a name that is no URI authority, such
    /// as Istio's `outbound|9091||...` cluster names, cannot be sent).
    origin: Option<http::Uri>,
    map: Mutex<HashMap<SocketAddr, tonic::transport::Channel>>,
}

impl Channels {
    pub fn new(authority: &str) -> Channels {
        Channels {
            origin: format!("http://{authority}")
                .parse::<http::Uri>()
                .ok()
                .filter(|u| u.authority().is_some_and(|a| a.as_str() == authority)),
            map: Mutex::default(),
        }
    }

    pub fn get(&self, addr: SocketAddr) -> Option<tonic::transport::Channel> {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = m.get(&addr) {
            return Some(c.clone());
        }
        let mut e = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).ok()?;
        if let Some(o) = &self.origin {
            e = e.origin(o.clone());
        }
        let c = e.connect_lazy();
        m.insert(addr, c.clone());
        Some(c)
    }
}

/// Headers added to every call: Envoy's gRPC client marks its calls
/// internal and forwarded for this host (`x-envoy-internal`,
/// `x-forwarded-for`), then `GrpcService.initial_metadata`.
#[derive(Debug, Default, Clone)]
pub struct Metadata(
    Vec<(
        tonic::metadata::AsciiMetadataKey,
        tonic::metadata::AsciiMetadataValue,
    )>,
);

impl Metadata {
    pub fn from_service(g: &core::GrpcService, path: &str) -> Result<Metadata, ConfigError> {
        let envoys = [
            ("x-envoy-internal", "true".to_string()),
            ("x-forwarded-for", local_ip().to_string()),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k.parse().ok()?, v.parse().ok()?)));
        let configured = g
            .initial_metadata
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let p = format!("{path}.initial_metadata[{i}]");
                let key = h.key.to_ascii_lowercase().parse().map_err(|_| {
                    ConfigError::new(
                        join(&p, "key"),
                        format!("'{}' is not a gRPC metadata key", h.key),
                    )
                })?;
                let raw = if h.raw_value.is_empty() {
                    h.value.clone()
                } else {
                    String::from_utf8_lossy(&h.raw_value).into_owned()
                };
                let value = raw.parse().map_err(|_| {
                    ConfigError::new(join(&p, "value"), "not a valid gRPC metadata value")
                })?;
                Ok((key, value))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Metadata(envoys.chain(configured).collect()))
    }

    /// A call's request carrying the metadata.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        for (k, v) in &self.0 {
            r.metadata_mut().append(k.clone(), v.clone());
        }
        r
    }
}

/// This host's address, as side calls name it (read once).
fn local_ip() -> std::net::IpAddr {
    static IP: std::sync::OnceLock<std::net::IpAddr> = std::sync::OnceLock::new();
    *IP.get_or_init(crate::server::request::local_ip)
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

/// Why a side-service HTTP call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cluster '{0}' has no healthy host")]
    NoHost(String),
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("HTTP exchange with {0}: {1}")]
    Http(SocketAddr, hyper::Error),
    #[error("bad request URI: {0}")]
    Uri(#[from] http::Error),
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
}

/// A `GET uri` to a host of `cluster` over HTTP/1.1, through the host's
/// TLS when the cluster originates TLS (SNI: the cluster's, else the
/// URI's host), the whole exchange within `timeout`: (status, body).
pub async fn http_get(
    clusters: &ClusterManager,
    cluster: &str,
    uri: &http::Uri,
    timeout: std::time::Duration,
) -> Result<(u16, bytes::Bytes), CallError> {
    let req = http::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .body(bytes::Bytes::new())?;
    http_request(clusters, cluster, uri, req, timeout).await
}

/// `req` (its path in its URI, a `host` of `uri`'s authority added) sent
/// to a host of `cluster` as [`http_get`] sends its GET.
pub async fn http_request(
    clusters: &ClusterManager,
    cluster: &str,
    uri: &http::Uri,
    mut req: http::Request<bytes::Bytes>,
    timeout: std::time::Duration,
) -> Result<(u16, bytes::Bytes), CallError> {
    let no_host = || CallError::NoHost(cluster.to_string());
    let c = clusters.get(cluster).ok_or_else(no_host)?;
    let host = c
        .snapshot()
        .pick(None, rand::random(), &|_| false, None)
        .ok_or_else(no_host)?;
    let (addr, tls, bind) = (host.addr, host.tls.clone(), c.config.bind);
    let authority = uri.authority().map_or("", |a| a.as_str()).to_string();
    req.headers_mut().insert(
        http::header::HOST,
        http::HeaderValue::from_str(&authority).map_err(http::Error::from)?,
    );
    let req = req.map(http_body_util::Full::new);
    // HTTP/1.1 is spoken: no protocol is offered in ALPN.
    let tls = tls.map(|t| crate::cluster_manager::HostTls {
        tls: Arc::new(t.tls.with_alpn(&[])),
        connect: t.connect,
    });
    let work = async move {
        let sni = crate::routing::strip_port(&authority);
        let (io, _) =
            crate::tls::upstream::connect_host(addr, tls.as_ref(), Some(sni), bind.for_peer(addr))
                .await
                .map_err(|e| CallError::Connect(addr, e))?;
        exchange(addr, io, req).await
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| CallError::Timeout(timeout))?
}

async fn exchange<S>(
    addr: SocketAddr,
    io: S,
    req: http::Request<http_body_util::Full<bytes::Bytes>>,
) -> Result<(u16, bytes::Bytes), CallError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::BodyExt;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|e| CallError::Http(addr, e))?;
    let conn = tokio::spawn(conn);
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| CallError::Http(addr, e))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| CallError::Http(addr, e))?
        .to_bytes();
    conn.abort();
    Ok((status, body))
}
