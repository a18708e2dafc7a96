//! A real HTTP/1.1 + HTTP/2 (h2c) upstream that answers every request with a
//! JSON description of what it received and which server answered.
//!
//! Special paths: `/status/<code>` answers with that status,
//! `/healthy-if/<names>` 200 only on the named servers, `/delay/<ms>`
//! waits before answering, `/size/<n>` answers with n bytes, `/drip/<n>`
//! streams n chunks 200 ms apart.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A running echo server.
pub struct Echo {
    pub addr: SocketAddr,
    pub name: String,
    pub hits: Arc<AtomicU64>,
    /// The JSON description of every request answered through `handle`
    /// (what a mirror cluster received, say).
    pub seen: Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    /// Connections accepted.
    pub conns: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

/// `n` chunks of 10 bytes, 200 ms apart (a slowly streaming upstream).
fn drip(n: u64) -> Body {
    let chunks = futures_util::stream::unfold(0u64, move |i| async move {
        if i == n {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Some((
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"drip-drip\n"))),
            i + 1,
        ))
    });
    BodyExt::boxed(StreamBody::new(chunks))
}

/// `Sec-WebSocket-Accept` for a key (RFC 6455 §4.2.2).
fn websocket_accept(key: &[u8]) -> String {
    use base64::Engine;
    let mut h = sha1_smol::Sha1::new();
    h.update(key);
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.digest().bytes())
}

async fn handle(
    name: Arc<String>,
    hits: Arc<AtomicU64>,
    seen: Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, hyper::Error> {
    hits.fetch_add(1, Ordering::Relaxed);
    // A WebSocket upgrade: answer 101, then echo whatever the tunnel carries.
    if req
        .headers()
        .get("upgrade")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
    {
        let accept = websocket_accept(
            req.headers()
                .get("sec-websocket-key")
                .map_or(&b""[..], |v| v.as_bytes()),
        );
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = upgrade.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        return Ok(Response::builder()
            .status(101)
            .header("upgrade", "websocket")
            .header("connection", "Upgrade")
            .header("sec-websocket-accept", accept)
            .header("x-echo-server", name.as_str())
            .body(full(Bytes::new()))
            .unwrap());
    }
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let version = format!("{:?}", req.version());
    let mut headers = serde_json::Map::new();
    for (k, v) in req.headers() {
        let v = String::from_utf8_lossy(v.as_bytes()).to_string();
        match headers.get_mut(k.as_str()) {
            Some(serde_json::Value::String(prev)) => *prev = format!("{prev},{v}"),
            _ => {
                headers.insert(k.to_string(), serde_json::Value::String(v));
            }
        }
    }
    if let Some(auth) = req.uri().authority() {
        headers
            .entry(":authority")
            .or_insert(serde_json::Value::String(auth.to_string()));
    }
    // HTTP/2 requests carry :scheme (HTTP/1 origin-form targets have none).
    if let Some(scheme) = req.uri().scheme_str() {
        headers
            .entry(":scheme")
            .or_insert(serde_json::Value::String(scheme.to_string()));
    }
    let body = req.into_body().collect().await?.to_bytes();
    let mut status = 200u16;
    // gRPC health checks: SERVING when the requested service names this
    // server (comma-separated), else NOT_SERVING.
    if path == "/grpc.health.v1.Health/Check" {
        // HealthCheckRequest { service = 1 } after the 5-byte prefix.
        let service = body
            .get(7..)
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .unwrap_or_default();
        let serving = service.split(',').any(|n| n == name.as_str());
        let msg: [u8; 7] = [0, 0, 0, 0, 2, 0x08, if serving { 1 } else { 2 }];
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let frames = futures_util::stream::iter(vec![
            Ok::<_, Infallible>(Frame::data(Bytes::copy_from_slice(&msg))),
            Ok(Frame::trailers(trailers)),
        ]);
        return Ok(Response::builder()
            .header("content-type", "application/grpc")
            .body(BodyExt::boxed(StreamBody::new(frames)))
            .unwrap());
    }
    // `/echo.Grpc/<method>`, gRPC: the request's frames back as the
    // response's, with trailers whose status is `x-echo-grpc-status` (0 by
    // default; else with a message), or in the headers alone with
    // `x-echo-grpc-trailers-only`. What arrived is reported in headers.
    if path.starts_with("/echo.Grpc/") {
        let status = headers
            .get("x-echo-grpc-status")
            .and_then(|v| v.as_str())
            .unwrap_or("0")
            .to_string();
        let seen = |k: &str| {
            headers
                .get(k)
                .and_then(|v| v.as_str())
                .unwrap_or("-")
                .to_string()
        };
        let b = Response::builder()
            .header("content-type", "application/grpc")
            .header("x-echo-seen-content-type", seen("content-type"))
            .header("x-echo-seen-te", seen("te"))
            .header("x-echo-seen-length", body.len().to_string());
        if headers.contains_key("x-echo-grpc-trailers-only") {
            let frames = futures_util::stream::iter(Vec::<Result<Frame<Bytes>, Infallible>>::new());
            return Ok(b
                .header("grpc-status", status)
                .header("grpc-message", "trailers only")
                .body(BodyExt::boxed(StreamBody::new(frames)))
                .unwrap());
        }
        let mut trailers = http::HeaderMap::new();
        if let Ok(v) = http::HeaderValue::from_str(&status) {
            trailers.insert("grpc-status", v);
        }
        if status != "0" {
            trailers.insert(
                "grpc-message",
                http::HeaderValue::from_static("echo failed"),
            );
        }
        let frames = futures_util::stream::iter(vec![
            Ok::<_, Infallible>(Frame::data(body.clone())),
            Ok(Frame::trailers(trailers)),
        ]);
        return Ok(b.body(BodyExt::boxed(StreamBody::new(frames))).unwrap());
    }
    // `/healthy-if/<names>`: 200 when this server is one of the
    // comma-separated names, else 503 (per-host answers to one health
    // check path); `/degraded-if/<names>` adds `x-envoy-degraded` then.
    let mut hc = path.split('?').next().unwrap_or("").split('/').skip(1);
    if let (Some(kind @ ("healthy-if" | "degraded-if")), Some(names)) = (hc.next(), hc.next()) {
        let listed = names.split(',').any(|n| n == name.as_str());
        let mut b = Response::builder().header("x-echo-server", name.as_str());
        b = match (kind, listed) {
            ("healthy-if", true) => b.status(200),
            ("healthy-if", false) => b.status(503),
            (_, true) => b.status(200).header("x-envoy-degraded", "true"),
            _ => b.status(200),
        };
        return Ok(b.body(full("health")).unwrap());
    }
    let mut seg = path.split('?').next().unwrap_or("").split('/').skip(1);
    match (seg.next(), seg.next().and_then(|s| s.parse::<u64>().ok())) {
        (Some("status"), Some(code)) => status = code as u16,
        (Some("delay"), Some(ms)) => tokio::time::sleep(Duration::from_millis(ms)).await,
        (Some("size"), Some(n)) => {
            return Ok(Response::builder()
                .header("x-echo-server", name.as_str())
                .body(full(vec![b'x'; n as usize]))
                .unwrap());
        }
        (Some("drip"), Some(n)) => {
            return Ok(Response::builder()
                .header("x-echo-server", name.as_str())
                .body(drip(n))
                .unwrap());
        }
        _ => {}
    }
    let json = serde_json::json!({
        "server": name.as_str(),
        "method": method,
        "path": path,
        "version": version,
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    });
    seen.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(json.clone());
    let mut b = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-echo-server", name.as_str());
    // `x-echo-response-header: <name>: <value>` adds that response header.
    if let Some((k, v)) = json["headers"]["x-echo-response-header"]
        .as_str()
        .and_then(|h| h.split_once(": "))
    {
        b = b.header(k, v);
    }
    Ok(b.body(full(Bytes::from(json.to_string()))).unwrap())
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// Starts an echo server on `addr` (port 0 = any free port).
pub async fn start(name: &str, addr: SocketAddr) -> std::io::Result<Echo> {
    start_inner(name, addr, None, None).await
}

/// Starts an echo server behind TLS (`tls`); its answers carry the SNI it
/// was sent in `x-echo-sni` and whether the client presented a certificate
/// in `x-echo-client-cert`.
pub async fn start_tls(
    name: &str,
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
) -> std::io::Result<Echo> {
    start_inner(name, addr, None, Some(tokio_rustls::TlsAcceptor::from(tls))).await
}

/// Starts a server answering every request with exactly `message`.
pub async fn start_fixed(name: &str, addr: SocketAddr, message: String) -> std::io::Result<Echo> {
    start_inner(name, addr, Some(Arc::new(message)), None).await
}

async fn start_inner(
    name: &str,
    addr: SocketAddr,
    fixed: Option<Arc<String>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> std::io::Result<Echo> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let name_arc = Arc::new(name.to_string());
    let hits = Arc::new(AtomicU64::new(0));
    let conns = Arc::new(AtomicU64::new(0));
    let seen: Arc<std::sync::Mutex<Vec<serde_json::Value>>> = Arc::default();
    let (n, h, accepted, sn) = (name_arc.clone(), hits.clone(), conns.clone(), seen.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((sock, peer)) = listener.accept().await else {
                continue;
            };
            accepted.fetch_add(1, Ordering::Relaxed);
            let (n, h, f, tls, sn) = (n.clone(), h.clone(), fixed.clone(), tls.clone(), sn.clone());
            tokio::spawn(async move {
                // The connection's source address (a proxy's upstream bind).
                let mut conn_headers: Vec<(&'static str, String)> =
                    vec![("x-echo-peer-ip", peer.ip().to_string())];
                let io: Box<dyn Io> = match tls {
                    None => Box::new(sock),
                    Some(acceptor) => {
                        let Ok(s) = acceptor.accept(sock).await else {
                            return;
                        };
                        let c = s.get_ref().1;
                        conn_headers
                            .push(("x-echo-sni", c.server_name().unwrap_or("").to_string()));
                        conn_headers.push((
                            "x-echo-client-cert",
                            c.peer_certificates()
                                .is_some_and(|p| !p.is_empty())
                                .to_string(),
                        ));
                        Box::new(s)
                    }
                };
                let conn_headers = Arc::new(conn_headers);
                let svc = hyper::service::service_fn(move |req| {
                    let (n, h, f, ch, sn) = (
                        n.clone(),
                        h.clone(),
                        f.clone(),
                        conn_headers.clone(),
                        sn.clone(),
                    );
                    async move {
                        let mut r = match f {
                            Some(m) => {
                                h.fetch_add(1, Ordering::Relaxed);
                                Response::new(full(m.as_bytes().to_vec()))
                            }
                            None => handle(n, h, sn, req).await?,
                        };
                        for (k, v) in ch.iter() {
                            r.headers_mut().insert(*k, v.parse().unwrap());
                        }
                        Ok::<_, hyper::Error>(r)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(io), svc)
                    .await;
            });
        }
    });
    Ok(Echo {
        addr,
        name: name.to_string(),
        hits,
        seen,
        conns,
        task,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn websocket_accept_matches_rfc6455_example() {
        assert_eq!(
            super::websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
