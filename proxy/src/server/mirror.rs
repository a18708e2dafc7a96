//! `request_mirror_policies`: a copy of the upstream request (headers as
//! sent upstream, the body as it streams) sent to each mirror cluster the
//! route names, its response discarded. The copy's host gets Envoy's
//! `-shadow` suffix unless `disable_shadow_host_suffix_append`; as any of
//! Envoy's own requests it is marked `x-envoy-internal: true` and has
//! Envoy's local address appended to `x-forwarded-for`. A mirror
//! never slows or fails the request it copies: when it falls behind, its
//! copy is abandoned.

use crate::cluster_manager::ClusterManager;
use crate::config::route::MirrorPolicy;
use bytes::Bytes;
use http_body_util::BodyExt;
use pingora_http::RequestHeader;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// How long a mirror may take when its route sets no timeout.
const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Chunks a mirror may queue before it is abandoned.
const QUEUE: usize = 64;

/// A mirror in flight: where the request body's chunks go.
#[derive(Debug)]
pub struct Mirror {
    body: Option<mpsc::Sender<Bytes>>,
    /// Set when the whole body was copied: a copy that ends without it
    /// (abandoned, or the request died) is reset, never sent as complete.
    complete: Arc<AtomicBool>,
}

impl Mirror {
    /// Copies a chunk of the request body; the last one closes the copy.
    pub fn body(&mut self, chunk: Option<&[u8]>, end: bool) {
        if let (Some(tx), Some(c)) = (&self.body, chunk) {
            if !c.is_empty() && tx.try_send(Bytes::copy_from_slice(c)).is_err() {
                // Full or gone: the mirror is abandoned, never waited for.
                self.body = None;
                return;
            }
        }
        if end && self.body.take().is_some() {
            self.complete.store(true, Ordering::SeqCst);
        }
    }
}

/// Why a mirror's body stopped short.
#[derive(Debug, thiserror::Error)]
#[error("the mirrored request's body was abandoned")]
pub struct Abandoned;

/// `host` with Envoy's `-shadow` suffix before any port.
pub fn shadow_host(host: &str) -> String {
    if let Some((h, port)) = host.rsplit_once(':') {
        // A colon inside a bare IPv6 literal starts no port.
        let bare_ipv6 = !host.starts_with('[') && h.contains(':');
        if !bare_ipv6 && !port.is_empty() && port.chars().all(|c| c.is_ascii_digit()) {
            return format!("{h}-shadow:{port}");
        }
    }
    format!("{host}-shadow")
}

/// Starts one mirror of `req` (the upstream request), if its fraction
/// rolls in and its cluster exists.
pub fn start(
    clusters: &Arc<ClusterManager>,
    policy: &MirrorPolicy,
    req: &RequestHeader,
    runtime: &crate::runtime::Runtime,
    with_body: bool,
    local_ip: std::net::IpAddr,
    timeout: Option<std::time::Duration>,
) -> Option<Mirror> {
    if let Some((key, default)) = &policy.fraction {
        if !crate::http_filters::roll(runtime.fraction_per_million(key, *default)) {
            return None;
        }
    }
    let cluster_name = match &policy.cluster {
        crate::config::route::MirrorCluster::Name(n) => n.clone(),
        crate::config::route::MirrorCluster::Header(h) => {
            req.headers.get(h)?.to_str().ok()?.to_string()
        }
    };
    let cluster = clusters.get(&cluster_name)?;
    // An ORIGINAL_DST cluster has no host for a copy (it has no connection
    // of its own to take a destination from), as in Envoy.
    let Some(host) = cluster
        .snapshot()
        .pick(None, rand::random(), &|_| false, None)
    else {
        cluster.stats.upstream_cx_none_healthy.increment(1);
        return None;
    };
    let authority = crate::routing::authority(req).to_string();
    let authority = match &policy.host_rewrite {
        Some(h) => h.clone(),
        None if policy.disable_suffix => authority,
        None => shadow_host(&authority),
    };
    let mut b = http::Request::builder()
        .method(req.method.clone())
        .uri(req.uri.path_and_query().map_or("/", |p| p.as_str()));
    let xff = http::HeaderName::from_static("x-forwarded-for");
    for (k, v) in req.headers.iter() {
        if k != http::header::HOST && k != xff && k != "x-envoy-internal" {
            b = b.header(k, v);
        }
    }
    let forwarded: Vec<&str> = req
        .headers
        .get_all(&xff)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let forwarded = match forwarded.join(",") {
        x if x.is_empty() => local_ip.to_string(),
        x => format!("{x},{local_ip}"),
    };
    b = b
        .header(http::header::HOST, authority.as_str())
        .header(xff, forwarded)
        .header("x-envoy-internal", "true");
    let (tx, rx) = mpsc::channel::<Bytes>(QUEUE);
    let complete = Arc::new(AtomicBool::new(false));
    let done = complete.clone();
    // The body's chunks, then its end; or an error (hyper resets the
    // copy) when the sender went away before the end.
    let stream = futures_util::stream::unfold(Some(rx), move |rx| {
        let done = done.clone();
        async move {
            let mut rx = rx?;
            match rx.recv().await {
                Some(c) => Some((Ok(hyper::body::Frame::data(c)), Some(rx))),
                None if done.load(Ordering::SeqCst) => None,
                None => Some((Err(Abandoned), None)),
            }
        }
    });
    let body: MirrorBody = if with_body {
        http_body_util::StreamBody::new(stream).boxed()
    } else {
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed()
    };
    let request = b.body(body).ok()?;
    let connect_timeout = cluster.config.connect_timeout;
    let h2 = cluster.config.h2_for(req.version);
    let (addr, tls, bind) = (host.addr, host.tls.clone(), cluster.config.bind);
    let whole = timeout.unwrap_or(DEFAULT_TIMEOUT);
    tokio::spawn(async move {
        let send = send(addr, bind.for_peer(addr), tls, h2, connect_timeout, request);
        let r = tokio::time::timeout(whole, send).await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!("mirror to {cluster_name} ({addr}): {e}"),
            Err(_) => tracing::debug!("mirror to {cluster_name} ({addr}): timed out"),
        }
    });
    Some(Mirror {
        body: with_body.then_some(tx),
        complete,
    })
}

type MirrorBody = http_body_util::combinators::BoxBody<Bytes, Abandoned>;

async fn send(
    addr: std::net::SocketAddr,
    bind: Option<std::net::SocketAddr>,
    tls: Option<crate::cluster_manager::HostTls>,
    h2: bool,
    connect_timeout: std::time::Duration,
    req: http::Request<MirrorBody>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let connect = crate::tls::upstream::connect_host(addr, tls.as_ref(), None, bind);
    let (io, negotiated) = tokio::time::timeout(connect_timeout, connect).await??;
    // The codec follows ALPN when the context offered protocols (h2 for
    // HTTP/2 and auto_config clusters).
    exchange(io, negotiated.unwrap_or(h2), req).await
}

async fn exchange<S>(
    io: S,
    h2: bool,
    req: http::Request<MirrorBody>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = hyper_util::rt::TokioIo::new(io);
    let resp = if h2 {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        send.send_request(req).await?
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        send.send_request(req).await?
    };
    // The response is read and dropped frame by frame, as Envoy's shadow
    // discards it.
    let mut body = resp.into_body();
    while let Some(f) = body.frame().await {
        f?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_suffix_goes_before_the_port() {
        assert_eq!(shadow_host("example.com"), "example.com-shadow");
        assert_eq!(shadow_host("example.com:8080"), "example.com-shadow:8080");
        assert_eq!(shadow_host("[::1]:80"), "[::1]-shadow:80");
        assert_eq!(shadow_host("::1"), "::1-shadow");
    }

    #[test]
    fn a_copy_is_complete_only_when_the_body_ended() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut m = Mirror {
            body: Some(tx),
            complete: Arc::new(AtomicBool::new(false)),
        };
        m.body(Some(b"a"), false);
        // The queue is full: the copy is abandoned, not completed.
        m.body(Some(b"b"), false);
        m.body(None, true);
        assert!(!m.complete.load(Ordering::SeqCst));
        assert_eq!(rx.try_recv().unwrap(), Bytes::from_static(b"a"));
        let (tx, _rx) = mpsc::channel(4);
        let mut m = Mirror {
            body: Some(tx),
            complete: Arc::new(AtomicBool::new(false)),
        };
        m.body(Some(b"a"), false);
        m.body(Some(b"b"), true);
        assert!(m.complete.load(Ordering::SeqCst));
    }
}
